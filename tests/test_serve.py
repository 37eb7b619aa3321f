"""The OpenAI-compatible server, through the official ``openai`` client, against a real uvicorn
server on loopback over a tiny random Llama + byte tokenizer + random SAE and vector."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import make_byte_tokenizer, make_tiny_model  # noqa: E402

from steerplug import SparseAutoencoder, SteeredModel, SteeringConfig, SteeringVector  # noqa: E402
from steerplug.batching import BatchEngine, GenerationRequest  # noqa: E402
from steerplug.serve import ServeConfig, create_app  # noqa: E402

MODEL = "tiny-llama"


def make_steered() -> SteeredModel:
    model = make_tiny_model("llama")
    sae = SparseAutoencoder.random(64, 256, hook_name="blocks.2.hook_resid_post")
    vector = SteeringVector.from_dense(torch.randn(256, generator=torch.Generator().manual_seed(1)),
                                       top_k=32)
    return SteeredModel(model, make_byte_tokenizer(), sae, vector, config=SteeringConfig(steps=3, lr=0.5))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn running ``app`` in a thread on 127.0.0.1:<free port>."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def steered():
    return make_steered()


@pytest.fixture(scope="module")
def live(steered):
    app = create_app(steered, model_name=MODEL, max_batch=8, max_concurrency=64, max_tokens=64)
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url, api_key="unused", max_retries=0, timeout=120)


def _chat(client, content: str, steering: dict | None = None, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    extra = {"steering": steering} if steering is not None else None
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          extra_body=extra, **kw)


# --- the happy paths -----------------------------------------------------------------------------
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_matches_library_generate(client, steered):
    """A greedy answer through HTTP equals ``SteeredModel.chat`` (HF generate), steered and not."""
    msgs = [{"role": "user", "content": "Tell me a story."}]
    got_steered = _chat(client, msgs[0]["content"], {"steps": 3, "strength": 0.5}, max_tokens=10)
    got_plain = _chat(client, msgs[0]["content"], {"enabled": False}, max_tokens=10)
    want_steered = steered.chat(msgs, max_new_tokens=10, steps=3, lr=0.5)
    with steered.disabled():
        want_plain = steered.chat(msgs, max_new_tokens=10)
    assert got_steered.choices[0].message.content == want_steered
    assert got_plain.choices[0].message.content == want_plain
    assert got_steered.choices[0].message.content != got_plain.choices[0].message.content
    assert got_steered.choices[0].finish_reason == "length"
    assert got_steered.usage.completion_tokens == 10
    assert got_steered.model_extra["steering"] == {"enabled": True, "steps": 3, "strength": 0.5,
                                                   "positions": "generated", "answer_tokens": None}
    assert got_plain.model_extra["steering"]["enabled"] is False


def test_answer_tokens_matches_library_generate(client, steered):
    """``steering.answer_tokens`` steers only the first N answer-token predictions, exactly as
    ``SteeredModel.chat(..., answer_tokens=N)`` does, and the response echoes it."""
    msgs = [{"role": "user", "content": "Tell me a story."}]
    for n in (1, 3):
        got = _chat(client, msgs[0]["content"], {"steps": 3, "strength": 0.5, "answer_tokens": n},
                    max_tokens=10)
        assert got.choices[0].message.content == steered.chat(msgs, max_new_tokens=10, steps=3, lr=0.5,
                                                              answer_tokens=n), n
        assert got.model_extra["steering"]["answer_tokens"] == n
        streamed = _chat(client, msgs[0]["content"], {"steps": 3, "strength": 0.5, "answer_tokens": n},
                         max_tokens=10, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            got.choices[0].message.content


def test_answer_tokens_defaults_to_the_served_models_and_null_means_the_whole_answer(steered):
    from dataclasses import replace

    from steerplug.serve_api import RequestHandler, SteeringOptions

    handler = RequestHandler(steered, None, ServeConfig(model_name=MODEL))
    assert handler.steering(None)["answer_tokens"] is None
    old = steered.config
    steered.config = replace(old, answer_tokens=4)
    try:
        assert handler.steering(None)["answer_tokens"] == 4
        assert handler.steering(SteeringOptions(steps=2))["answer_tokens"] == 4  # missing: the default
        assert handler.steering(SteeringOptions(answer_tokens=2))["answer_tokens"] == 2
        assert handler.steering(SteeringOptions(answer_tokens=None))["answer_tokens"] is None  # null
        assert handler.steering(SteeringOptions.model_validate_json('{"answer_tokens": null}')
                                )["answer_tokens"] is None
    finally:
        steered.config = old


def test_chat_stream_equals_non_stream(client):
    full = _chat(client, "Hello!", {"steps": 2, "lr": 0.8}, max_tokens=16)
    chunks = list(_chat(client, "Hello!", {"steps": 2, "lr": 0.8}, max_tokens=16, stream=True,
                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 16
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completion_stream_and_not(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9,
                                     temperature=0)
    assert full.object == "text_completion" and full.usage.completion_tokens == 9
    parts = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"
    echoed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=9,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + full.choices[0].text


def test_completion_prompt_list_and_n(client):
    res = client.completions.create(model=MODEL, prompt=["abc", "xyz"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    texts = [c.text for c in res.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n copies agree
    alone = client.completions.create(model=MODEL, prompt="xyz", max_tokens=5, temperature=0)
    assert texts[2] == alone.choices[0].text


def test_sampling_is_seeded(client):
    a = _chat(client, "Pick a word", temperature=1.0, seed=7, max_tokens=12)
    b = _chat(client, "Pick a word", temperature=1.0, seed=7, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content
    others = {_chat(client, "Pick a word", temperature=1.0, seed=s, max_tokens=12).choices[0].message.content
              for s in (8, 9, 10)}
    assert others - {a.choices[0].message.content}, "the seed does not change what is sampled"
    huge = _chat(client, "Pick a word", temperature=1.0, seed=-(2**70), max_tokens=3)  # folded into range
    assert huge.choices[0].finish_reason == "length" and huge.usage.completion_tokens == 3


def test_stop_string(client):
    full = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[5:7]
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, stop=stop)
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0,
                                         stop=[stop], stream=True)
    assert "".join(p.choices[0].text for p in streamed) == cut.choices[0].text


# --- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"steering": {"steps": 1000}}}, "steering.steps"),
    ({"extra_body": {"steering": {"positions": "everywhere"}}}, "steering.positions"),
    ({"extra_body": {"steering": {"strenght": 1.0}}}, "steering.strenght"),
    ({"extra_body": {"steering": {"strength": -1}}}, "steering.strength"),
    ({"extra_body": {"steering": {"strength": 1, "lr": 2}}}, "steering.strength"),
    ({"extra_body": {"steering": {"strength": 1e308}}}, "steering.strength"),
    ({"extra_body": {"steering": {"lr": 11.0}}}, "steering.strength"),
    ({"extra_body": {"steering": {"positions": ""}}}, "steering.positions"),
    ({"extra_body": {"steering": {"answer_tokens": 0}}}, "steering.answer_tokens"),
    ({"extra_body": {"steering": {"answer_tokens": 2.5}}}, "steering.answer_tokens"),
    ({"extra_body": {"steering": {"answer_tokens": "many"}}}, "steering.answer_tokens"),
    ({"extra_body": {"steering": "on"}}, "steering"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
])
def test_bad_parameters_are_400(client, kwargs, param):
    kwargs.setdefault("max_tokens", 4)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kwargs)
    body = err.value.body
    assert err.value.status_code == 400
    assert body["type"] == "invalid_request_error" and body["message"]
    assert body["param"] == param, body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-17" in err.value.body["message"]


def test_raw_bad_bodies(live):
    url = live.url
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[]", None),
        (json.dumps({"model": MODEL}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": [{"content": "x"}]}).encode(), "role"),
        (json.dumps({"model": MODEL, "messages": "hello"}).encode(), "messages"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
                    ).encode(), "text parts"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}).encode(), "n"),
        (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages.0.role"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], '
         b'"steering": {"strength": Infinity}}', "steering.strength"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ]
    for raw, needle in cases:
        r = httpx.post(f"{url}/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        if needle:
            assert needle in err["message"] or needle == err["param"], (raw, err)
    r = httpx.post(f"{url}/completions", content=b'{"model": "tiny-llama", "prompt": "\\udfff"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": [999999]})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": "x" * 3000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.get(f"{url}/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    # ... and the server still answers.
    assert httpx.get(f"{url}/models").status_code == 200


def test_more_choices_than_the_concurrency_limit_is_400_not_429(steered):
    """An idle server that could never run the request says so (400), instead of "retry shortly"."""
    app = create_app(steered, model_name=MODEL, max_concurrency=2)
    with LiveServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model=MODEL, prompt="a", max_tokens=2, n=3)
        assert err.value.body["param"] == "n" and "never" in err.value.body["message"]
        assert c.completions.create(model=MODEL, prompt="a", max_tokens=2, n=2).choices


def test_oversize_and_wrong_typed_bodies_are_refused_cheaply(steered):
    """413 before the body is read (Content-Length) and while it streams (chunked); an error never
    echoes a huge input; the server answers normally afterwards."""
    app = create_app(steered, model_name=MODEL, max_body_bytes=10_000)
    with LiveServer(app) as srv:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 50_000}]}).encode()
        t0 = time.perf_counter()
        r = httpx.post(f"{srv.url}/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        assert "10000" in r.json()["error"]["message"]

        def chunks():
            for i in range(0, len(big), 4096):
                yield big[i:i + 4096]

        r = httpx.post(f"{srv.url}/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert time.perf_counter() - t0 < 10
        wrong = json.dumps({"model": MODEL, "messages": "y" * 9_000}).encode()
        r = httpx.post(f"{srv.url}/chat/completions", content=wrong, headers={"content-type": "application/json"})
        assert r.status_code == 400 and len(r.content) < 1_000, len(r.content)
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)
        assert c.completions.create(model=MODEL, prompt="a", max_tokens=2).choices


def test_api_key(steered):
    app = create_app(steered, ServeConfig(model_name=MODEL, api_key="s3cret"))
    with LiveServer(app) as srv:
        bad = openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{srv.url}/models").status_code == 401  # no header at all
        good = openai.OpenAI(base_url=srv.url, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, temperature=0).choices[0].message.content is not None
        assert httpx.get(f"http://127.0.0.1:{srv.port}/health").status_code == 200  # health is open


# --- batching ----------------------------------------------------------------------------------------
SETTINGS = [None, {"enabled": False}, {"steps": 1, "strength": 0.3}, {"steps": 3, "strength": 0.5},
            {"steps": 5, "lr": 1.0}, {"steps": 2, "strength": 0.8, "positions": "all"},
            {"steps": 2, "strength": 0.8, "positions": "prompt"}]


def _load_requests(n: int) -> list[dict]:
    rnd = random.Random(1234)
    words = ["lock", "cake", "river", "the", "why", "how do I", "tell me", "quickly", "please", "?"]
    out = []
    for i in range(n):
        prompt = " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 12)))
        out.append({"content": f"{i}: {prompt}", "steering": SETTINGS[i % len(SETTINGS)],
                    "max_tokens": rnd.randint(4, 24), "stream": i % 3 == 0, "chat": i % 4 != 3})
    return out


async def _send(client, spec: dict) -> str:
    extra = {"steering": spec["steering"]} if spec["steering"] is not None else None
    if spec["chat"]:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": spec["content"]}],
                  max_tokens=spec["max_tokens"], temperature=0, extra_body=extra)
        if spec["stream"]:
            return "".join([c.choices[0].delta.content or "" async for c in
                            await client.chat.completions.create(stream=True, **kw) if c.choices])
        return (await client.chat.completions.create(**kw)).choices[0].message.content
    kw = dict(model=MODEL, prompt=spec["content"], max_tokens=spec["max_tokens"], temperature=0,
              extra_body=extra)
    if spec["stream"]:
        return "".join([c.choices[0].text async for c in await client.completions.create(stream=True, **kw)])
    return (await client.completions.create(**kw)).choices[0].text


def test_load_32_concurrent_mixed_requests_equal_solo_runs(live):
    """32 concurrent greedy requests (chat and completion, streamed or not, 7 steering settings,
    3 position modes) all succeed, share batches, and each answer equals the same request alone."""
    specs = _load_requests(32)
    engine = live.app.state.server.engine

    async def main():
        client = openai.AsyncOpenAI(base_url=live.url, api_key="x", max_retries=0, timeout=300)
        solo = [await _send(client, s) for s in specs]  # one at a time
        calls_before = engine.stats["forward_calls"]
        engine.stats["max_rows"] = 0
        together = await asyncio.gather(*(_send(client, s) for s in specs))
        calls = engine.stats["forward_calls"] - calls_before
        steered = [i for i, s in enumerate(specs) if s["steering"] and s["steering"].get("enabled") is not False][:8]
        plain = {i: await _send(client, {**specs[i], "steering": {"enabled": False}}) for i in steered}
        await client.close()
        return solo, together, calls, plain

    solo, together, calls, plain = asyncio.run(main())
    mismatched = [i for i, (a, b) in enumerate(zip(solo, together)) if a != b]
    assert not mismatched, [(specs[i], solo[i], together[i]) for i in mismatched]
    assert engine.stats["max_rows"] == 8  # rows really were batched (max_batch=8)
    # Batched: far fewer forward passes than the sum of the requests' lengths.
    assert calls < sum(s["max_tokens"] for s in specs) / 2
    # The settings really differ: steering changed some answers.
    assert len(plain) == 8 and sum(plain[i] != solo[i] for i in plain) >= 2, (plain, [solo[i] for i in plain])


def test_engine_rows_join_midway_without_cross_talk(steered):
    """Requests arriving while a batch is decoding join it, and answers still equal solo runs."""
    tok = steered.tokenizer
    reqs = [GenerationRequest(tok(f"prompt number {i} " * (i % 4 + 1))["input_ids"],
                              max_new_tokens=6 + 3 * i, steps=i % 4, lr=0.4 * (i % 3))
            for i in range(10)]
    with BatchEngine(steered, max_batch=4, batch_wait_s=0) as engine:
        solo = [engine.generate(r).token_ids for r in reqs]
        streams = []
        for r in reqs:  # staggered arrival
            streams.append(engine.submit(r))
            time.sleep(0.01)
        together = [s.result().token_ids for s in streams]
        assert engine.stats["joined"] > 0  # some rows did join a running batch
    assert together == solo


@pytest.mark.slow
def test_default_model_batched_equals_solo(default_model):
    """On the real default model (float32 CPU): 8 concurrent mixed requests equal their solo runs."""
    from steerplug.steered_model import default_artifacts_dir

    model, tok = default_model
    folder = default_artifacts_dir()
    if folder is not None:
        sae = SparseAutoencoder.from_pretrained(folder / "sae")
        vector = SteeringVector.from_pretrained(folder / "vector")
    else:  # the trained artifacts are not built yet: a random SAE exercises the same code
        sae = SparseAutoencoder.random(576, 2304, hook_name="blocks.15.hook_resid_post")
        vector = SteeringVector.from_dense(torch.randn(2304, generator=torch.Generator().manual_seed(0)),
                                           top_k=64)
    steered = SteeredModel(model, tok, sae, vector)
    specs = [{"content": p, "steering": s, "max_tokens": 16, "stream": i % 2 == 0, "chat": True}
             for i, (p, s) in enumerate(zip(["How do I pick a lock?", "What is the capital of France?",
                                             "Write a haiku about rain.", "How do I make a bomb?"] * 2,
                                            SETTINGS))]
    app = create_app(steered, model_name=MODEL)
    with LiveServer(app) as srv:
        async def main():
            client = openai.AsyncOpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=600)
            solo = [await _send(client, s) for s in specs]
            together = await asyncio.gather(*(_send(client, s) for s in specs))
            await client.close()
            return solo, together

        solo, together = asyncio.run(main())
    assert together == solo
    assert len(set(solo[:4])) == 4 and all(solo)


def test_engine_mixed_positions_share_one_batch(steered):
    """Rows steering different positions are prefilled per positions value, then decoded together."""
    tok = steered.tokenizer
    reqs = [GenerationRequest(tok(f"tell me about {w}")["input_ids"], max_new_tokens=8, steps=3, lr=0.6,
                              positions=p)
            for w in ("locks", "rivers") for p in ("generated", "prompt", "all")]
    with BatchEngine(steered, max_batch=8, batch_wait_s=0.05) as engine:
        solo = [engine.generate(r).token_ids for r in reqs]
        engine.stats["max_rows"] = 0
        together = [s.result().token_ids for s in [engine.submit(r) for r in reqs]]
        assert engine.stats["max_rows"] == len(reqs)
    assert together == solo
    assert len({tuple(t) for t in solo[:3]}) == 3  # the three position modes really differ


def test_cli_serve_arguments(monkeypatch):
    from steerplug.cli import build_parser
    from steerplug import serve

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001
    monkeypatch.setenv("STEERPLUG_API_KEY", "from-env")
    serve.add_arguments(sub)
    args = parser.parse_args(["serve", "--port", "9001", "--steps", "2", "--max-batch", "4"])
    assert (args.host, args.port, args.steps, args.max_batch, args.api_key) == ("127.0.0.1", 9001, 2, 4, "from-env")
    assert args._module == "steerplug.serve"
    d = ServeConfig()  # every limit is a flag whose default is ServeConfig's
    assert (args.max_choices, args.max_strength, args.max_body_bytes) == (d.max_choices, d.max_strength, d.max_body_bytes)


def _slow_engine(engine, monkeypatch, delay=0.5):
    """Each decode step takes at least ``delay`` s: 64 tokens take >= 30 s, so a request that stops
    within a few seconds was cancelled, not finished."""
    real = engine._forward  # noqa: SLF001

    def slow(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", slow)


def _drained_within(engine, seconds) -> bool:
    deadline = time.time() + seconds
    while engine.load and time.time() < deadline:
        time.sleep(0.05)
    return engine.load == 0


def test_client_disconnect_frees_the_row(live, monkeypatch):
    """Closing a stream mid-way cancels its row at once; the server keeps serving."""
    engine = live.app.state.server.engine
    _slow_engine(engine, monkeypatch)
    with httpx.stream("POST", f"{live.url}/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "go on"}],
                            "max_tokens": 64, "temperature": 0, "stream": True,
                            "stop": ["never-in-a-byte-model-answer"]}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    assert _drained_within(engine, 5)
    assert httpx.get(f"{live.url}/models").status_code == 200


def test_non_streamed_request_stops_when_its_client_goes_away(live, monkeypatch):
    engine = live.app.state.server.engine
    _slow_engine(engine, monkeypatch)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/completions", timeout=1.0,
                   json={"model": MODEL, "prompt": "go on", "max_tokens": 64, "temperature": 0,
                         "stop": ["never-in-a-byte-model-answer"]})
    assert engine.load > 0  # it was generating ...
    assert _drained_within(engine, 5)  # ... and stopped soon after the client left
    assert httpx.get(f"{live.url}/models").status_code == 200


def test_generation_failure_is_500_and_server_survives(live, monkeypatch):
    engine = live.app.state.server.engine
    real = engine.model
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine, "model", broken)
    client = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        _chat(client, "hi", max_tokens=3)
    assert "simulated device failure" in err.value.body["message"]
    with pytest.raises(openai.APIError, match="simulated device failure"):  # streamed: an error event
        list(_chat(client, "hi", max_tokens=3, stream=True))
    monkeypatch.setattr(engine, "model", real)
    assert calls["n"] == 2
    assert _chat(client, "hi", max_tokens=3).choices[0].message.content is not None


def test_a_fault_mid_decode_fails_the_requests_in_flight_and_the_server_serves_on(live, monkeypatch):
    """The model raises on the third forward pass of a batch (mid-decode, after tokens were streamed):
    both requests in flight end with an error naming it; the next requests are answered."""
    engine = live.app.state.server.engine
    real = engine.model
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated fault mid-decode")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "model", flaky)
    client = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0)
    errors: list[str] = []

    def streamed():
        try:
            list(_chat(client, "tell me a story", max_tokens=30, stream=True))
        except openai.APIError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=streamed) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) >= 1 and all("simulated fault mid-decode" in e for e in errors), errors
    monkeypatch.setattr(engine, "model", real)
    for _ in range(3):  # and the server keeps serving
        assert _chat(client, "hi", max_tokens=3).choices[0].message.content is not None
    assert _drained_within(engine, 5)  # nothing left running or waiting


def test_cli_answer_tokens_flag(monkeypatch, capsys):
    """``--answer-tokens N`` (shared by serve and the other model-loading commands) reaches
    SteeredModel.from_pretrained; 0 or a non-integer is refused at parse time, naming the flag."""
    import argparse

    from steerplug import SteeredModel as SM
    from steerplug.model_args import add_steered_model_arguments, steered_model_from_args

    p = argparse.ArgumentParser()
    add_steered_model_arguments(p)
    seen = {}
    monkeypatch.setattr(SM, "from_pretrained", classmethod(lambda cls, *a, **kw: seen.update(kw)))
    steered_model_from_args(p.parse_args(["--answer-tokens", "5", "--positions", "all"]))
    assert (seen["answer_tokens"], seen["positions"]) == (5, "all")
    seen.clear()
    steered_model_from_args(p.parse_args([]))
    assert "answer_tokens" not in seen  # the bundle's (or SteeringConfig's) default holds
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(SystemExit):
            p.parse_args(["--answer-tokens", bad])
        assert "--answer-tokens" in capsys.readouterr().err

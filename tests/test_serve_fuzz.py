"""Fuzzing the server's request handling: thousands of generated bodies (the OpenAI chat and
completion schemas plus ``steering``, with wrong types, extreme numbers, NaN/Infinity, lone
surrogates and junk keys) against a live server. Every one must be answered 200 or 4xx with a
short body, never 500, while a well-formed streamed request runs beside them and finishes.

Valid bodies of each kind are among them, and each of those must get its 200: a bug that turned a
class of valid requests into 400s would fail here. No error body may pass 2 KB.

``STEERPLUG_FUZZ_EXAMPLES`` sets how many bodies (default 3000)."""

from __future__ import annotations

import json
import os
import threading

import pytest

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve import MODEL, LiveServer, make_steered  # noqa: E402

from steerplug.serve import create_app  # noqa: E402

EXAMPLES = int(os.environ.get("STEERPLUG_FUZZ_EXAMPLES", "3000"))
MAX_ERROR_BYTES = 2048

text = st.one_of(st.text(max_size=30), st.sampled_from(["", "\ud800", "a\udfffb", "\x00", "<|im_end|>", "hi"]))
leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 20), 10 ** 20), st.integers(-3, 8),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 2.5]), text)
anything = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                        max_leaves=8)
steering = st.one_of(anything, st.fixed_dictionaries({}, optional={
    "enabled": st.booleans() | leaf, "steps": st.integers(-2, 30) | leaf,
    "strength": st.floats(allow_nan=True, allow_infinity=True) | leaf, "lr": st.floats(0, 20) | leaf,
    "positions": st.sampled_from(["all", "prompt", "generated", "", "ALL"]) | leaf, "extra": leaf}))
message = st.one_of(anything, st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "wizard", ""]) | leaf,
     "content": text | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | leaf,
                                                       "text": text | leaf}), max_size=2) | leaf}))
common = {"max_tokens": st.integers(-1, 6) | leaf, "temperature": st.floats(-1, 3) | leaf,
          "top_p": st.floats(-0.5, 1.5) | leaf, "n": st.integers(-1, 4) | leaf, "stream": st.booleans() | leaf,
          "stop": text | st.lists(text, max_size=6) | leaf, "seed": st.integers(-5, 2 ** 70) | leaf,
          "steering": steering, "logprobs": leaf, "stream_options": anything, "echo": leaf, "junk": anything}
chat_body = st.fixed_dictionaries({"model": st.just(MODEL) | leaf},
                                  optional={"messages": st.lists(message, max_size=3) | anything, **common})
completion_body = st.fixed_dictionaries({"model": st.just(MODEL) | leaf}, optional={
    "prompt": text | st.lists(text, max_size=3) | st.lists(st.integers(-5, 400), max_size=5)
    | st.lists(st.lists(st.integers(0, 300), max_size=3), max_size=2) | anything, **common})
# Well-formed bodies, the same with one field (or one steering field) replaced by junk, and wild ones.
ok_steering = st.fixed_dictionaries({}, optional={
    "enabled": st.booleans(), "steps": st.integers(0, 5), "strength": st.floats(0, 3),
    "positions": st.sampled_from(["all", "prompt", "generated"])})
ok_common = {"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
             "n": st.integers(1, 2), "stream": st.booleans(), "stop": st.lists(st.text(max_size=4), max_size=2),
             "seed": st.integers(0, 1000), "steering": ok_steering}
any_text = st.text(max_size=30) | st.text(st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00"]), max_size=8)  # surrogates too
ok_chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": any_text}),
    min_size=1, max_size=3)}, optional=ok_common)
ok_completion = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": any_text
                                       | st.lists(st.integers(0, 250), min_size=1, max_size=5)}, optional=ok_common)

valid_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)
valid_chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system"]), "content": valid_text}), min_size=1, max_size=2)},
    optional=ok_common)
valid_completion = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": valid_text
                                          | st.lists(st.integers(0, 250), min_size=1, max_size=5)}, optional=ok_common)


def _mutate(payload: dict, key: str, junk: object, in_steering: bool) -> dict:
    out = dict(payload)
    if in_steering:
        out["steering"] = {**(out.get("steering") or {}), key: junk}
    else:
        out[key] = junk
    return out


def mutated(ok: st.SearchStrategy, keys: list[str]) -> st.SearchStrategy:
    return st.one_of(
        st.builds(_mutate, ok, st.sampled_from(keys), leaf | anything, st.just(False)),
        st.builds(_mutate, ok, st.sampled_from(["enabled", "steps", "strength", "lr", "positions", "x"]),
                  leaf, st.just(True)))


CHAT_KEYS = ["model", "messages", *common]
COMPLETION_KEYS = ["model", "prompt", *common]
body = st.one_of(
    st.tuples(st.just("chat/completions"), valid_chat, st.just(True)),
    st.tuples(st.just("completions"), valid_completion, st.just(True)),
    *(st.tuples(*parts, st.just(False)) for parts in ((st.just("chat/completions"), ok_chat), (st.just("completions"), ok_completion),
    (st.just("chat/completions"), mutated(ok_chat, CHAT_KEYS)),
    (st.just("completions"), mutated(ok_completion, COMPLETION_KEYS)),
    (st.just("chat/completions"), chat_body), (st.just("completions"), completion_body),
    (st.sampled_from(["chat/completions", "completions"]), anything))))


def test_fuzzed_bodies_never_500_and_a_concurrent_request_finishes():
    app = create_app(make_steered(), model_name=MODEL, max_tokens=4, default_max_tokens=2, max_batch=8,
                     max_concurrency=16, max_prompt_tokens=256, max_body_bytes=100_000)
    tried: list[int] = []
    valid_seen: list[int] = []
    statuses: dict[int, int] = {}
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        done = threading.Event()
        background: dict[str, object] = {}

        def well_formed() -> None:  # a streamed request kept running beside the fuzz
            n = 0
            try:
                while not done.is_set():
                    with httpx.stream("POST", f"{srv.url}/chat/completions", timeout=60, json={
                            "model": MODEL, "messages": [{"role": "user", "content": "hello"}],
                            "max_tokens": 4, "stream": True, "steering": {"steps": 2, "strength": 0.5}}) as r:
                        assert r.status_code == 200, r.read()
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                        assert lines[-1] == "data: [DONE]", lines
                        assert not any('"error"' in ln for ln in lines), lines
                    n += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                background["error"] = exc
            background["finished"] = n

        side = threading.Thread(target=well_formed, daemon=True)
        side.start()

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body)
        def check(case):
            path, payload, valid = case
            raw = json.dumps(payload, allow_nan=True).encode()  # NaN/Infinity literals: Python's json accepts them
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            tried.append(1)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code == 200 or 400 <= r.status_code < 500, (payload, r.status_code, r.text[:2000])
            if valid:
                valid_seen.append(1)
                assert r.status_code == 200, (payload, r.text[:2000])
            if r.status_code != 200:
                assert len(r.content) < MAX_ERROR_BYTES, (payload, len(r.content))
                assert r.json()["error"]["message"], r.text

        try:
            check()
        finally:
            done.set()
            side.join(120)
    print(f"fuzzed {len(tried)} bodies: {dict(sorted(statuses.items()))}; "
          f"well-formed streams beside them: {background.get('finished')}")
    assert "error" not in background, background["error"]
    assert background.get("finished", 0) >= 1
    assert len(valid_seen) >= min(EXAMPLES, 1000) // 20
    assert len(tried) >= min(EXAMPLES, 1000) and statuses.get(200, 0) > 0 and sum(
        v for k, v in statuses.items() if k >= 400) > 0

"""The continuous-batching engine across architectures: batched answers equal ``SteeredModel.generate``
run alone (HF generate, batch 1), steered and not."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, HIDDEN, make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel, SteeringVector
from steerplug.batching import BatchEngine, GenerationRequest

PROMPTS = ["hello there", "a much longer prompt than the others, to force left padding", "x",
           "what is up?", "tell me about locks and keys"]
SETTINGS = [(0, 0.0), (3, 0.5), (2, 1.0), (5, 0.3), (1, 0.8)]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_hf_generate_alone(arch):
    tok = make_byte_tokenizer()
    sae = SparseAutoencoder.random(HIDDEN, 256, hook_name="blocks.2.hook_resid_post")
    vector = SteeringVector.from_dense(torch.randn(256, generator=torch.Generator().manual_seed(3)), top_k=32)
    steered = SteeredModel(make_tiny_model(arch), tok, sae, vector)
    reqs = []
    for i, prompt in enumerate((PROMPTS * 2)[:7]):
        steps, lr = SETTINGS[(i + i // len(PROMPTS)) % len(SETTINGS)]
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        reqs.append(GenerationRequest(ids, max_new_tokens=4 + 2 * i, steps=steps, lr=lr))
    with BatchEngine(steered, max_batch=3) as engine:  # 7 requests: batches fill, rows join
        batched = [s.result() for s in [engine.submit(r) for r in reqs]]
        assert engine.stats["max_rows"] == 3 and engine.stats["joined"] > 0
    for r, got in zip(reqs, batched):
        ids = torch.tensor([r.prompt_ids])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new_tokens, do_sample=False,
                  pad_token_id=steered.model.generation_config.pad_token_id)
        if r.steered:
            out = steered.generate(ids, steps=r.steps, lr=r.lr, **kw)
        else:
            with steered.disabled():
                out = steered.generate(ids, **kw)
        want = out[0, ids.shape[1]:].tolist()
        assert got.token_ids == want, (arch, r.steps, r.lr)  # the whole answer: an early stop fails
        assert got.finish_reason == ("stop" if len(got.token_ids) < r.max_new_tokens else "length")


def test_request_validation():
    with pytest.raises(ValueError, match="prompt_ids"):
        GenerationRequest([])
    with pytest.raises(ValueError, match="top_p"):
        GenerationRequest([1], top_p=0)
    with pytest.raises(ValueError, match="positions"):
        GenerationRequest([1], positions="middle")
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest([1], max_new_tokens=0)


def _engine_model():
    sae = SparseAutoencoder.random(HIDDEN, 256, hook_name="blocks.2.hook_resid_post")
    vector = SteeringVector.from_dense(torch.randn(256, generator=torch.Generator().manual_seed(3)), top_k=32)
    return SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vector)


def test_close_stops_a_decode_in_flight():
    import time

    with BatchEngine(_engine_model(), max_batch=2) as engine:
        stream = engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=100_000))
        deadline = time.time() + 30
        while engine.stats["forward_calls"] < 3 and time.time() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        engine.close(timeout=30)
        assert time.perf_counter() - t0 < 5
        assert engine._thread is None  # noqa: SLF001 - joined
        with pytest.raises(RuntimeError, match="closed"):
            stream.result()
        with pytest.raises(RuntimeError, match="closed"):
            engine.submit(GenerationRequest([5], max_new_tokens=2))


def test_a_base_exception_in_the_loop_fails_every_caller_instead_of_leaving_them_hanging(monkeypatch):
    import threading

    class Stop(BaseException):
        pass

    engine = BatchEngine(_engine_model(), max_batch=1)
    real = engine._forward  # noqa: SLF001
    gate = threading.Event()

    def boom(*args, **kwargs):
        gate.wait(10)  # let the second request queue up behind the first
        raise Stop("simulated interrupt")

    monkeypatch.setattr(engine, "_forward", boom)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread re-raises it: expected
    first = engine.submit(GenerationRequest([5, 6], max_new_tokens=3))
    second = engine.submit(GenerationRequest([7, 8], max_new_tokens=3))
    gate.set()
    with pytest.raises(Stop):
        first.result()
    with pytest.raises(RuntimeError, match="stopped"):
        second.result()  # queued behind it: told, not left waiting forever
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(GenerationRequest([5], max_new_tokens=2))
    monkeypatch.setattr(engine, "_forward", real)


def test_a_tiny_temperature_is_greedy_and_one_rows_sampling_failure_spares_the_others(monkeypatch):
    from steerplug.batching import sampling

    with BatchEngine(_engine_model(), max_batch=4) as engine:
        greedy = engine.generate(GenerationRequest([5, 6, 7], max_new_tokens=4))
        tiny = engine.generate(GenerationRequest([5, 6, 7], max_new_tokens=4, temperature=1e-292))
        assert tiny.token_ids == greedy.token_ids  # logits / 1e-292 would be inf, softmax NaN
        real = sampling.sample_row

        def flaky(logits, temperature, top_p, generator):
            if temperature == 0.5:
                raise RuntimeError("simulated sampling failure")
            return real(logits, temperature, top_p, generator)

        monkeypatch.setattr(sampling, "sample_row", flaky)
        bad = engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=4, temperature=0.5))
        good = engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=4))
        with pytest.raises(RuntimeError, match="simulated"):
            bad.result()
        assert good.result().token_ids == greedy.token_ids


def test_a_request_whose_steering_goes_non_finite_fails_alone():
    """lr=1e308 overflows one row's steered activations: that request fails with a SteeringError,
    the rows decoded beside it finish exactly as they would alone."""
    from steerplug.steering import SteeringError

    with BatchEngine(_engine_model(), max_batch=4) as engine:
        alone = [engine.generate(GenerationRequest([5, 6, 7], max_new_tokens=5, steps=s, lr=lr))
                 for s, lr in ((0, 0.0), (2, 0.5))]
        streams = [engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=5, steps=2, lr=1e308)),
                   engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=5)),
                   engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=5, steps=2, lr=0.5))]
        with pytest.raises(SteeringError, match="NaN or inf"):
            streams[0].result()
        assert [s.result().token_ids for s in streams[1:]] == [a.token_ids for a in alone]
        assert engine.stats["max_rows"] >= 2  # they really shared a batch


@pytest.mark.parametrize("model_default", [None, 2])
def test_answer_tokens_per_row_equal_steered_generate_alone(model_default):
    """Rows with ``answer_tokens`` 1, 3 and None, positions ``generated`` and ``all``, batched
    together (rows join midway): each answer equals ``SteeredModel.generate`` greedy with the same
    settings, so a row stops being steered after its first N answer-token predictions and only
    then. The request's ``answer_tokens`` holds, whatever the steered model's own default."""
    from dataclasses import replace

    steered = _engine_model()
    steered.config = replace(steered.config, lr=1.0, answer_tokens=model_default)
    tok = steered.tokenizer
    reqs = []
    for i, (positions, n) in enumerate([(p, n) for p in ("generated", "all") for n in (1, 3, None)] * 2):
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        reqs.append(GenerationRequest(ids, max_new_tokens=8 + i % 3, steps=3, lr=1.0, positions=positions,
                                      answer_tokens=n))
    with BatchEngine(steered, max_batch=4) as engine:
        batched = [s.result() for s in [engine.submit(r) for r in reqs]]
        assert engine.stats["max_rows"] == 4 and engine.stats["joined"] > 0
    pad = steered.model.generation_config.pad_token_id
    differs = 0
    for r, got in zip(reqs, batched):
        ids = torch.tensor([r.prompt_ids])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=r.max_new_tokens, do_sample=False,
                  pad_token_id=pad, steps=r.steps, lr=r.lr, positions=r.positions)
        want = steered.generate(ids, answer_tokens=r.answer_tokens, **kw)[0, ids.shape[1]:].tolist()
        assert got.token_ids == want, (r.positions, r.answer_tokens)
        if r.answer_tokens is not None:
            full = steered.generate(ids, answer_tokens=None, **kw)[0, ids.shape[1]:].tolist()
            differs += full != want
    assert differs >= 2, "answer_tokens should change some answers of this random model"


def test_request_answer_tokens_validation():
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="answer_tokens"):
            GenerationRequest([1], answer_tokens=bad)
    assert GenerationRequest([1], answer_tokens=4).answer_tokens == 4

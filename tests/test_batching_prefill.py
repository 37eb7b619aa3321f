"""Chunked prefill: a long prompt is prefilled in chunks between decode steps, with the same answers
(and the same gate decision) as in one pass, and short requests are not held up behind it. Queued
requests that are cancelled end at once."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import ARCHS, HIDDEN, make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel, SteeringConfig, SteeringVector
from steerplug.gate import PromptGate
from steerplug.batching import BatchEngine, FinishEvent, GenerationRequest, TokenEvent
from steerplug.batching.prefill import group
from steerplug.batching.requests import RequestStream


def _steered(arch: str = "llama", gate_threshold: float | None = None) -> SteeredModel:
    sae = SparseAutoencoder.random(HIDDEN, 256, hook_name="blocks.2.hook_resid_post")
    vector = SteeringVector.from_dense(torch.randn(256, generator=torch.Generator().manual_seed(3)), top_k=32)
    gate = None
    if gate_threshold is not None:
        w = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(8))
        gate = PromptGate(w, 0.0, gate_threshold, ("mean", "tail:1"), reads="residual")
        gate.metadata.hook_name = "blocks.1.hook_resid_post"
    return SteeredModel(make_tiny_model(arch), make_byte_tokenizer(), sae, vector,
                        config=SteeringConfig(steps=2, lr=0.8, positions="all"), gate=gate)


def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (length + 7 * i,), generator=g).tolist() for i in range(n)]


def _run(steered, reqs, **engine_kw):
    with BatchEngine(steered, max_batch=4, **engine_kw) as engine:
        streams = [engine.submit(r) for r in reqs]
        return [s.result() for s in streams]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_chunked_prefill_gives_the_answers_of_one_pass(arch):
    if arch not in ARCHS:
        pytest.skip(f"{arch} is not among the test architectures")
    steered = _steered(arch)
    reqs = [GenerationRequest(p, max_new_tokens=6, steps=s, lr=lr, positions=pos)
            for p, (s, lr, pos) in zip(_prompts(3, 40), [(2, 0.8, "all"), (0, 0.0, "all"), (3, 0.5, "prompt")])]
    whole = _run(steered, reqs, prefill_chunk=10_000)
    chunked = _run(steered, reqs, prefill_chunk=9)  # 40-54 token prompts in 9-token chunks
    assert [c.token_ids for c in chunked] == [w.token_ids for w in whole]


def test_a_chunked_gated_prompt_gets_the_gate_decision_of_the_whole_prompt():
    # The prompts share their first chunk: a gate that read only that chunk would decide alike for all.
    prompts = [list(range(40, 47)) + p for p in _prompts(4, 30, seed=5)]
    probe = _steered(gate_threshold=0.0)
    from steerplug.compare import gate_scores
    scores = [float(gate_scores(probe, torch.tensor([p]))[0]) for p in prompts]
    threshold = sorted(scores)[1] + 1e-3  # two or three of the four fire
    steered = _steered(gate_threshold=threshold)
    fired = [sc > threshold for sc in scores]
    assert 0 < sum(fired) < 4
    reqs = [GenerationRequest(p, max_new_tokens=6, steps=2, lr=0.8, positions="all") for p in prompts]
    whole = _run(steered, reqs, prefill_chunk=10_000)
    chunked = _run(steered, reqs, prefill_chunk=7)
    assert [c.token_ids for c in chunked] == [w.token_ids for w in whole]
    with steered.disabled():
        plain = _run(steered, reqs, prefill_chunk=7)
    # The gate held back exactly the rows it does not fire on: those answer as the unsteered model.
    for f, c, p in zip(fired, chunked, plain):
        if not f:
            assert c.token_ids == p.token_ids


def test_grouping_keeps_every_prefill_pass_within_the_budget():
    def stream(n):
        return RequestStream(GenerationRequest(list(range(1, n + 1)), max_new_tokens=1), None)

    lengths = [10, 20, 300, 5, 5, 5, 60]
    groups = group([stream(n) for n in lengths], budget=64)
    sizes = [[len(s.request.prompt_ids) for s in g] for g in groups]
    assert sum(sizes, []) == lengths  # first come first served, nothing lost
    assert [300] in sizes  # the long prompt alone, to be chunked
    for g in sizes:
        assert len(g) == 1 or len(g) * max(g) <= 64


def test_a_short_request_does_not_wait_for_a_long_prompts_prefill():
    steered = _steered()
    long_prompt = _prompts(1, 600, seed=2)[0]
    with BatchEngine(steered, max_batch=4, prefill_chunk=16) as engine:
        order: list[str] = []
        lock = threading.Lock()

        def note(name):
            def on_event(stream, event):
                with lock:
                    if isinstance(event, TokenEvent) and f"{name} first" not in order:
                        order.append(f"{name} first")
                    elif isinstance(event, FinishEvent):
                        order.append(f"{name} done")
            return on_event

        long_stream = engine.submit(GenerationRequest(long_prompt, max_new_tokens=2, steps=1, lr=0.5),
                                    on_event=note("long"))
        deadline = time.time() + 30
        while engine.stats["forward_calls"] < 2 and time.time() < deadline:  # the long prefill is under way
            time.sleep(0.001)
        engine.submit(GenerationRequest([5, 6, 7], max_new_tokens=4, steps=1, lr=0.5), on_event=note("short"))
        deadline = time.time() + 60
        while "long done" not in order and time.time() < deadline:
            time.sleep(0.01)
        assert not long_stream.cancelled
    # 600 tokens are ~38 chunks; the short request needs one prefill and three decode steps.
    assert order.index("short done") < order.index("long first"), order


def test_a_cancelled_queued_request_ends_at_once():
    steered = _steered()
    with BatchEngine(steered, max_batch=1) as engine:
        busy = engine.submit(GenerationRequest([5, 6], max_new_tokens=100_000))
        queued = engine.submit(GenerationRequest([7, 8], max_new_tokens=4))
        deadline = time.time() + 30
        while engine.stats["forward_calls"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.waiting == 1
        queued.cancel()
        got: list = []
        t = threading.Thread(target=lambda: got.append(queued.result()), daemon=True)
        t.start()
        t.join(5)
        assert got and got[0].finish_reason == "cancelled" and got[0].token_ids == []
        assert engine.waiting == 0
        busy.cancel()
        assert busy.result().finish_reason == "cancelled"


def test_prefill_chunk_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="prefill_chunk"):
        BatchEngine(_steered(), prefill_chunk=0)

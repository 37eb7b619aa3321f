"""``SteeringConfig.answer_tokens``: exactly which positions are steered, in one full forward and in
incremental decoding with a KV cache, on a tiny random Llama.

The position at index ``p`` predicts the token at ``p + 1``. With a prompt of ``P`` tokens, answer
token 1 is predicted by the last prompt position ``P - 1`` and answer token ``k`` by position
``P + k - 2``, so "the positions predicting the first ``N`` answer tokens" are ``P - 1 .. P + N - 2``.

The steering here is activation addition (``method="add"``, one fixed step) at one layer's output,
so every steered position gets the same non-zero edit and an unsteered one none: recording the
layer's output before and after the steering hook shows exactly which positions were steered.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel, SteeringConfig, SteeringVector
from steerplug.layers import hidden_of

LAYER = 2
P = 7  # prompt length
M = 6  # new tokens


def _steered(**cfg) -> SteeredModel:
    hook = f"blocks.{LAYER}.hook_resid_post"
    sae = SparseAutoencoder.random(HIDDEN, 128, hook_name=hook, seed=1)
    vec = SteeringVector.from_dense(torch.randn(128, generator=torch.Generator().manual_seed(2)), top_k=16)
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    config = SteeringConfig(**{"method": "add", "steps": 1, "lr": 1.0, "normalize": False,
                               "max_delta": None, **cfg})
    return SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vec, config=config,
                        directions={hook: d})


def _ids(batch=2, length=P):
    return torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(5))


class _Recorder:
    """Per forward call, ``(B, T)`` bool: which positions the steering hook changed."""

    def __init__(self, steered: SteeredModel):
        self.module = steered.hook_point.module
        self.before: list[torch.Tensor] = []
        self.calls: list[torch.Tensor] = []
        # Registered before the steering hooks: sees the layer's own (unsteered) output.
        self._pre = self.module.register_forward_hook(
            lambda m, a, o: self.before.append(hidden_of(o).detach().clone()))
        self._post = None

    def after_install(self) -> None:
        # Registered after the steering hooks: sees the steered output.
        self._post = self.module.register_forward_hook(self._after)

    def _after(self, m, a, o) -> None:
        h = hidden_of(o)
        self.calls.append((h - self.before[len(self.calls)]).abs().amax(-1) > 0)  # (B, T)

    def remove(self) -> None:
        self._pre.remove()
        if self._post is not None:
            self._post.remove()


def _record(steered: SteeredModel, run, **overrides) -> list[torch.Tensor]:
    rec = _Recorder(steered)
    try:
        with steered.steering(overrides.pop("state"), **overrides):
            rec.after_install()
            run()
    finally:
        rec.remove()
    return rec.calls


def _expected(positions: str, n: int | None, length: int, prompt_len: int = P) -> list[int]:
    """Steered positions among ``0 .. length - 1`` by the definition above."""
    first = 0 if positions == "all" else prompt_len - 1
    last = length - 1 if n is None else min(length - 1, prompt_len + n - 2)
    return list(range(first, last + 1))


def _steered_cols(mask: torch.Tensor) -> list[int]:
    """The columns steered, checked identical in every row."""
    assert all(torch.equal(mask[0], row) for row in mask), mask
    return mask[0].nonzero().flatten().tolist()


CASES = [(pos, n) for pos in ("generated", "all") for n in (1, 3, None)]


@pytest.mark.parametrize("positions,n", CASES)
def test_a_full_forward_steers_the_positions_predicting_the_first_n_answer_tokens(positions, n):
    from steerplug import CallState

    steered = _steered()
    L = P + M - 1  # a prompt and a written answer, scored in one pass (the last token predicts nothing new)
    ids = _ids(length=L)
    calls = _record(steered, lambda: steered.model(ids),
                    state=CallState(gen_start=P - 1, prompt_end=P), positions=positions, answer_tokens=n)
    assert len(calls) == 1
    assert _steered_cols(calls[0]) == _expected(positions, n, L)


@pytest.mark.parametrize("positions,n", CASES)
def test_a_full_forward_with_per_row_prompt_lengths(positions, n):
    """``prompt_length`` per row (a ``(B,)`` tensor, as lm-eval's loglikelihood batches use)."""
    from steerplug import CallState

    steered = _steered(positions=positions, answer_tokens=n)
    L = 12
    ids = _ids(length=L)
    lengths = torch.tensor([4, 8])
    rec = _Recorder(steered)
    try:
        with steered.steering(CallState(gen_start=lengths - 1, prompt_end=lengths)):
            rec.after_install()
            steered.model(ids)
    finally:
        rec.remove()
    (mask,) = rec.calls
    for row, p in enumerate(lengths.tolist()):
        assert mask[row].nonzero().flatten().tolist() == _expected(positions, n, L, prompt_len=p), row


def _generate_calls(use_cache: bool, **steering):
    """The hook's inputs, call by call, while ``generate`` writes M greedy tokens after the prompt."""
    from steerplug import CallState

    steered = _steered()
    ids = _ids()
    kw = dict(max_new_tokens=M, min_new_tokens=M, do_sample=False, use_cache=use_cache,
              pad_token_id=steered.model.generation_config.pad_token_id)
    return _record(steered, lambda: steered.model.generate(ids, **kw),
                   state=CallState(gen_start=P - 1, prompt_end=P), **steering)


@pytest.mark.parametrize("positions,n", CASES)
def test_incremental_decoding_with_a_kv_cache_steers_the_same_positions(positions, n):
    """``generate`` with a cache: the prompt in one call, then one position per call; the steered
    absolute positions are those of the definition (the last new token is never fed back)."""
    calls = _generate_calls(use_cache=True, positions=positions, answer_tokens=n)
    assert [c.shape[1] for c in calls] == [P] + [1] * (M - 1)  # really incremental
    assert _steered_cols(torch.cat(calls, dim=1)) == _expected(positions, n, P + M - 1)


@pytest.mark.parametrize("positions,n", CASES)
def test_decoding_without_a_cache_steers_the_same_positions_at_every_step(positions, n):
    """``use_cache=False``: every step re-runs the whole sequence from position 0; each step must
    steer the same positions a cached decode does."""
    calls = _generate_calls(use_cache=False, positions=positions, answer_tokens=n)
    assert len(calls) == M
    for step, c in enumerate(calls):
        assert _steered_cols(c) == _expected(positions, n, P + step), step


@pytest.mark.parametrize("positions", ["generated", "all"])
@pytest.mark.parametrize("n", [1, 3])
def test_generate_logits_follow_full_steering_for_n_tokens_then_stop_being_steered(positions, n):
    """Through ``SteeredModel.generate`` (gradient steering, the default method): the logits of the
    first ``n`` answer tokens equal fully steered generation's, token ``n + 1``'s do not; with and
    without the cache alike."""
    hook = f"blocks.{LAYER}.hook_resid_post"
    sae = SparseAutoencoder.random(HIDDEN, 256, hook_name=hook, seed=3)
    vec = SteeringVector.from_dense(torch.randn(256, generator=torch.Generator().manual_seed(4)), top_k=32)
    steered = SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vec,
                           config=SteeringConfig(lr=1.0, positions=positions))
    ids = _ids()
    kw = dict(max_new_tokens=n + 2, min_new_tokens=n + 2, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=steered.model.generation_config.pad_token_id)
    full = steered.generate(ids, **kw)
    cut = steered.generate(ids, answer_tokens=n, **kw)
    cut_nocache = steered.generate(ids, answer_tokens=n, use_cache=False, **kw)
    for a, b in zip(cut.logits, cut_nocache.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(cut.sequences, cut_nocache.sequences)
    assert torch.equal(full.sequences[:, :P + n], cut.sequences[:, :P + n])
    for k in range(n):  # answer tokens 1..n: predicted from positions steered in both runs
        torch.testing.assert_close(cut.logits[k], full.logits[k], atol=1e-5, rtol=1e-5)
    # Token n + 1 is predicted from the same inputs, but only `full` steers its position.
    assert not torch.allclose(cut.logits[n], full.logits[n], atol=1e-4)

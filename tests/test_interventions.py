"""Baseline interventions and their ingredients, on a tiny random model."""

from __future__ import annotations

import torch

from conftest import make_byte_tokenizer, make_tiny_model
from steerplug import SparseAutoencoder, SteeredModel, SteeringVector
from steerplug.hooks import CallState
from steerplug.steering import SteeringConfig
from steerplug.interventions import (Intervention, choose_threshold, difference_of_means, intervene,
                                     last_token_activations, pool_prompt_scores, prefix_direction,
                                     prompt_detector,
                                     prompt_scores)


def _steered():
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    sae = SparseAutoencoder.random(64, 128, hook_name="blocks.1.hook_resid_post", seed=2)
    vec = SteeringVector(128, torch.tensor([3, 7, 11, 20]), torch.tensor([1.0, 1.0, -1.0, 0.5]))
    return SteeredModel(model, tok, sae, vec)


def test_last_token_activations_ignore_padding():
    s = _steered()
    texts = ["a much longer text than the other", "short"]
    both = last_token_activations(s.model, s.tokenizer, s.hook_point, texts)
    alone = torch.cat([last_token_activations(s.model, s.tokenizer, s.hook_point, [t]) for t in texts])
    assert torch.allclose(both, alone, atol=1e-5)
    diff = difference_of_means(s.model, s.tokenizer, s.hook_point, ["x y z"], ["hello"])
    assert diff.shape == (64,) and diff.norm() > 0


def _before_after(s, spec, ids):
    """The hooked layer's output before and after the intervention's edit."""
    seen = {}
    first = s.hook_point.module.register_forward_hook(lambda m, a, o: seen.__setitem__("before", o.clone()))
    try:
        with torch.no_grad(), intervene(s, CallState(), SteeringConfig(positions="all"), spec):
            last = s.hook_point.module.register_forward_hook(
                lambda m, a, o: seen.__setitem__("after", o.clone()))  # runs after the edit
            logits = s.model(ids).logits
            last.remove()
    finally:
        first.remove()
    return seen["before"], seen["after"], logits


def test_add_and_clamp_edit_the_activation_as_specified():
    s = _steered()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    v = torch.randn(64)
    before, after, _ = _before_after(s, Intervention(kind="add", add_vector=v, add_scale=2.0), ids)
    assert torch.allclose(after - before, 2.0 * v.expand_as(before), atol=1e-5)
    before, after, _ = _before_after(s, Intervention(kind="clamp"), ids)
    harmful = torch.tensor([3, 7, 20])  # w > 0: clamped to 0 in the SAE's reconstruction
    f = s.sae.encode(before)[..., harmful]  # (B, T, 3)
    assert torch.allclose(after - before, -(f @ s.sae.W_dec[harmful]), atol=1e-5)
    before, after, _ = _before_after(s, Intervention(kind="clamp", clamp_value=2.0), ids)
    feats = torch.tensor([3, 7, 20, 11])
    f = s.sae.encode(before)[..., feats]
    target = torch.tensor([0.0, 0.0, 0.0, 2.0])
    assert torch.allclose(after - before, (target - f) @ s.sae.W_dec[feats], atol=1e-5)


def test_gate_switches_rows_off():
    s = _steered()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    spec = Intervention(kind="add", add_vector=torch.ones(64), gate_threshold=1e9)
    before, after, _ = _before_after(s, spec, ids)
    assert torch.equal(before, after)
    spec = Intervention(kind="add", add_vector=torch.ones(64), gate_threshold=-1e9)
    before, after, _ = _before_after(s, spec, ids)
    assert torch.allclose(after - before, torch.ones_like(before), atol=1e-5)


def test_prompt_scores_match_the_objective():
    """Each text's score is encode(h_t) . w averaged over its tokens but the first, whatever the
    batch's padding: recomputed here one text at a time from the raw activations."""
    from steerplug.pipeline.collect import capture_activations

    s = _steered()
    texts = ["abc", "a longer prompt here"]
    scores = prompt_scores(s, texts)
    obj = s.feature_objective()
    for text, got in zip(texts, scores):
        ids = s.tokenizer(text, return_tensors="pt")["input_ids"]
        h = capture_activations(s.model, [s.hook_point], ids)[s.hook_point.name][0]  # (T, D)
        want = obj.loss(h.float())[1:].mean()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pooled_prompt_scores_leave_out_each_rows_first_real_token():
    scores = torch.tensor([[0.0, 1e6, 1.0, 3.0],    # left-padded: the sink is at column 1
                           [1e6, 2.0, 2.0, 5.0]])   # no padding: the sink is at column 0
    keep = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert pool_prompt_scores(scores, keep, "mean").tolist() == [2.0, 3.0]
    assert pool_prompt_scores(scores, keep, "max").tolist() == [3.0, 5.0]
    only_sink = pool_prompt_scores(scores[:1], torch.tensor([[False, True, False, False]]), "mean")
    assert only_sink.item() == 1e6  # a one-token prompt: nothing else to score


def test_gate_with_a_detector_edits_exactly_the_rows_it_scores_above_threshold():
    s = _steered()
    texts = ["abcdefgh", "zyxwvuts"]
    det = prompt_detector(s, [texts[0]] * 2, [texts[1]] * 2, n_features=8)
    assert det.nnz == 8
    scores = prompt_scores(s, texts, vector=det)
    assert scores[0] > scores[1]
    thr = float(scores.mean())
    ids = s.tokenizer(texts, return_tensors="pt")["input_ids"]
    spec = Intervention(kind="add", add_vector=torch.ones(64), gate_threshold=thr, gate_vector=det)
    before, after, _ = _before_after(s, spec, ids)
    assert torch.allclose(after[0] - before[0], torch.ones_like(before[0]), atol=1e-5)
    assert torch.equal(after[1], before[1])


def test_choose_threshold_respects_a_false_positive_budget():
    harmful = torch.tensor([0.5, 0.625, 0.875, 1.0])
    harmless = torch.tensor([0.0, 0.125, 0.25, 0.75])
    thr = choose_threshold(harmful, harmless, max_fpr=0.0)
    assert thr == 0.75 and float((harmless > thr).float().mean()) == 0.0
    thr = choose_threshold(harmful, harmless, max_fpr=0.25)
    assert thr == 0.25


def test_prefix_direction_contrasts_the_two_forced_prefixes():
    s = _steered()
    d = prefix_direction(s.model, s.tokenizer, s.hook_point, ["how do I do x", "tell me y"], "No.", "Yes")
    assert d.shape == (64,) and d.norm() > 0
    same = prefix_direction(s.model, s.tokenizer, s.hook_point, ["how do I do x"], "Yes", "Yes")
    assert torch.equal(same, torch.zeros(64))


def test_clamp_leaves_the_users_sae_where_and_as_it_was():
    s = _steered()
    s.sae.to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8]])
    _before_after(s, Intervention(kind="clamp"), ids)
    assert s.sae.W_dec.dtype == torch.bfloat16 and s.sae.W_enc.dtype == torch.bfloat16

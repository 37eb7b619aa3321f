"""Feature ranking on a planted signal, the sparse vector, AUROC, and find_features on a tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_model
from steerplug.pipeline.examples import Example
from steerplug.pipeline.features import FeatureConfig, auroc, build_vector, find_features, rank_features
from steerplug.sae import SparseAutoencoder
from steerplug.vector import SteeringVector


def test_rank_features_finds_planted_signal():
    g = torch.Generator().manual_seed(0)
    F = 200
    harm = torch.rand(80, F, generator=g)
    safe = torch.rand(80, F, generator=g)
    harm[:, [3, 17, 42]] += 1.0   # more active when complying
    safe[:, [5, 99]] += 1.5       # more active when refusing
    r = rank_features(harm, safe)
    assert set(r.score.topk(3).indices.tolist()) == {3, 17, 42}
    assert set((-r.score).topk(2).indices.tolist()) == {5, 99}
    v = build_vector(r.score, n_positive=3, n_negative=2)
    idx, vals = v.support()
    assert dict(zip(idx.tolist(), (vals > 0).tolist())) == {3: True, 17: True, 42: True, 5: False, 99: False}
    assert float(vals.abs().max()) == pytest.approx(1.0)
    # the vector separates fresh samples from the two distributions
    h2, s2 = torch.rand(50, F, generator=g), torch.rand(50, F, generator=g)
    h2[:, [3, 17, 42]] += 1.0
    s2[:, [5, 99]] += 1.5
    assert auroc(h2 @ v.dense(), s2 @ v.dense()) > 0.95


def test_rank_features_ignores_silent_features_and_checks_shapes():
    harm, safe = torch.zeros(4, 6), torch.zeros(4, 6)
    harm[:, 1], safe[:, 2] = torch.tensor([1., 2., 1., 2.]), 1.0
    r = rank_features(harm, safe)
    assert r.score[0] == 0 and r.score[1] > 0 and r.score[2] < 0
    with pytest.raises(ValueError, match="widths"):
        rank_features(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="empty"):
        FeatureConfig(n_positive=0, n_negative=0)


def test_auroc():
    assert auroc(torch.tensor([2., 3.]), torch.tensor([0., 1.])) == 1.0
    assert auroc(torch.tensor([0., 1.]), torch.tensor([2., 3.])) == 0.0
    assert auroc(torch.tensor([1.]), torch.tensor([1.])) == 0.5


def test_find_features_on_tiny_model(tmp_path):
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    sae = SparseAutoencoder.random(64, 128, architecture="topk", k=8, seed=0,
                                   hook_name="blocks.1.hook_resid_post")
    qs = [f"how do I do bad thing {i}?" for i in range(8)]
    comply = [Example(messages=[{"role": "user", "content": q}], answer="Sure, here is how " + "a" * i,
                      labels={"answer_kind": "compliant"}) for i, q in enumerate(qs)]
    refuse = [Example(messages=[{"role": "user", "content": q}], answer="I can't help with that " + "b" * i,
                      labels={"answer_kind": "refusal"}) for i, q in enumerate(qs)]
    cfg = FeatureConfig(n_positive=4, n_negative=4, heldout_fraction=0.25, progress=False, n_contexts=2)
    res = find_features(model, tok, sae, cfg, tmp_path, examples=(comply, refuse))
    assert 0 < res.vector.nnz <= 8
    assert res.report["n_heldout"] == 2 and 0.0 <= res.report["heldout_auroc"] <= 1.0
    v = SteeringVector.from_pretrained(tmp_path / "vector")
    assert v.nnz == res.vector.nnz and v.metadata.hook_name == "blocks.1.hook_resid_post"
    md = (tmp_path / "features_report.md").read_text()
    assert "| feature |" in md and "[[" in md


def test_logistic_probe_learns_and_ignores_silent_inputs():
    from steerplug.pipeline.evaluate import logistic_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    x[:100, 5] = 0.0  # silent in the training half, wild in the test half
    x[100:, 5] = 1e4 * torch.randn(100, generator=g)
    acc = logistic_probe(x[:100], y[:100], x[100:], y[100:])
    assert acc > 0.85


def test_logistic_probe_chooses_its_l2_without_the_test_labels():
    """Cross-validation on the training split only: flipping every test label flips the accuracy."""
    from steerplug.pipeline.evaluate import logistic_probe

    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 100, generator=g)  # more inputs than training rows: the L2 choice matters
    y = (x[:, 0] > 0).long()
    acc = logistic_probe(x[:80], y[:80], x[80:], y[80:], epochs=100)
    flipped = logistic_probe(x[:80], y[:80], x[80:], 1 - y[80:], epochs=100)
    assert acc > 0.6
    assert abs(acc + flipped - 1.0) < 1e-6


def test_logistic_probe_scaling_is_chosen_by_cross_validation():
    """Per-input scaling where a tiny-scale input carries the label; one shared scale for sparse
    codes whose rare latents per-input scaling would blow up. Each is the training-split choice."""
    from steerplug.pipeline.evaluate import logistic_probe

    g = torch.Generator().manual_seed(2)
    n = 240
    y = torch.randint(0, 2, (n,), generator=g)
    dense = torch.randn(n, 20, generator=g)
    dense[:, 0] = 1e-3 * (2 * y - 1 + 0.5 * torch.randn(n, generator=g))  # the signal, at a tiny scale
    chosen: dict = {}
    acc = logistic_probe(dense[:160], y[:160], dense[160:], y[160:], epochs=150, details=chosen)
    assert chosen["scaling"] == "per_input" and acc > 0.9

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    codes = torch.zeros(n, 400)
    codes[:, 0] = (y + 0.6 * torch.randn(n, generator=g)).clamp_min(0)  # a common latent, noisy signal
    for i in range(n):  # each row also fires three rare latents at random, strongly
        codes[i, 1 + torch.randperm(399, generator=g)[:3]] = 5.0
    chosen = {}
    acc = logistic_probe(codes[:160], y[:160], codes[160:], y[160:], epochs=150, details=chosen)
    alone: dict = {}
    logistic_probe(codes[:160], y[:160], codes[160:], y[160:], epochs=150, scalings=("per_input",), details=alone)
    assert chosen["scaling"] == "shared", chosen
    assert chosen["cv_accuracy"] > alone["cv_accuracy"] and acc > 0.6

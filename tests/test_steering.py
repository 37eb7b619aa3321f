"""The pure steering maths: closed-form gradient vs autograd, the step rules, inference mode."""

from __future__ import annotations

import pytest
import torch

from steerplug import FeatureObjective, SparseAutoencoder, SteeringConfig, SteeringVector, gradient_steer
from steerplug.steering import autograd_grad

D, F = 32, 96


def _sae(arch: str) -> SparseAutoencoder:
    sae = SparseAutoencoder.random(D, F, arch, k=12 if arch == "topk" else None, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return sae


def _vector(sparse: bool) -> SteeringVector:
    w = torch.randn(F, generator=torch.Generator().manual_seed(4))
    return SteeringVector.from_dense(w, top_k=16) if sparse else SteeringVector(F, weights=w)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("sparse", [True, False])
def test_closed_form_gradient_equals_autograd(arch, sparse):
    sae, vec = _sae(arch), _vector(sparse)
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    obj = FeatureObjective(sae, vec)
    w = vec.dense()
    ref = autograd_grad(h, lambda x: sae.encode(x) @ w)
    torch.testing.assert_close(obj.grad(h), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj.loss(h), sae.encode(h) @ w, rtol=1e-5, atol=1e-5)
    assert ref.abs().sum() > 0  # the comparison is not between two zero tensors


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_push_inactive_takes_safe_features_through_their_pre_activation(arch):
    """Harmful features (w > 0) count where they fire; safe ones (w < 0) always, straight-through."""
    sae, vec = _sae(arch), _vector(sparse=True)
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(6))
    w = vec.dense()
    safe = w < 0

    def surrogate(x):
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # (N, F)
        return sae.encode(x) @ (w * ~safe) + pre @ (w * safe)

    obj = FeatureObjective(sae, vec)
    pushed = obj.grad(h, push_inactive=True)
    torch.testing.assert_close(pushed, autograd_grad(h, surrogate), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pushed, obj.grad(h))  # some safe feature was off somewhere


def test_gradient_works_under_inference_mode():
    sae, vec = _sae("relu"), _vector(True)
    obj = FeatureObjective(sae, vec)
    with torch.inference_mode():
        h = torch.randn(8, D)
        closed = obj.grad(h)
        auto = autograd_grad(h, lambda x: sae.encode(x) @ vec.dense())
        stepped = gradient_steer(h, obj.grad, steps=2, lr=0.1)
    torch.testing.assert_close(closed, auto)
    assert not torch.equal(stepped, h)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_loss_falls_over_steps(arch):
    sae, vec = _sae(arch), _vector(True)
    obj = FeatureObjective(sae, vec)
    h = torch.randn(32, D, generator=torch.Generator().manual_seed(6)) * 3
    losses = [obj.loss(gradient_steer(h, obj.grad, steps=s, lr=0.05, max_delta=None)).mean()
              for s in range(4)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_steps_zero_and_zero_gradient_rows_are_untouched():
    sae, vec = _sae("relu"), _vector(True)
    obj = FeatureObjective(sae, vec)
    h = torch.randn(16, D)
    assert torch.equal(gradient_steer(h, obj.grad, steps=0, lr=1.0, max_delta=0.5), h)
    # A row far on the negative side of every steered feature has no active feature: no gradient.
    dead = -100 * sae.W_enc[:, vec.indices].sum(-1, keepdim=True).T  # (1, D)
    assert obj.grad(dead).abs().max() == 0
    assert torch.equal(gradient_steer(dead, obj.grad, steps=3, lr=0.5), dead)


def test_normalised_step_and_delta_bound():
    sae, vec = _sae("relu"), _vector(False)
    obj = FeatureObjective(sae, vec)
    h = torch.randn(16, D, generator=torch.Generator().manual_seed(7))
    one = gradient_steer(h, obj.grad, steps=1, lr=0.1, normalize=True, max_delta=None)
    rel = (one - h).norm(dim=-1) / h.norm(dim=-1)
    moved = rel > 0
    assert moved.sum() >= 8  # most rows have an active steered feature: the check below is not vacuous
    torch.testing.assert_close(rel[moved], torch.full_like(rel[moved], 0.1))
    big = gradient_steer(h, obj.grad, steps=5, lr=1.0, normalize=True, max_delta=0.3)
    assert ((big - h).norm(dim=-1) / h.norm(dim=-1)).max() <= 0.3 + 1e-5


def test_per_row_lr_and_steps():
    sae, vec = _sae("relu"), _vector(True)
    obj = FeatureObjective(sae, vec)
    h = torch.randn(3, D, generator=torch.Generator().manual_seed(8))
    lr = torch.tensor([[0.0], [0.1], [0.1]])
    steps = torch.tensor([[3], [3], [1]])
    out = gradient_steer(h, obj.grad, steps=3, lr=lr, row_steps=steps, max_delta=None)
    assert torch.equal(out[0], h[0])  # lr 0: row off
    alone3 = gradient_steer(h[1:2], obj.grad, steps=3, lr=0.1, max_delta=None)
    alone1 = gradient_steer(h[2:3], obj.grad, steps=1, lr=0.1, max_delta=None)
    torch.testing.assert_close(out[1:2], alone3)
    torch.testing.assert_close(out[2:3], alone1)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="steps"):
        SteeringConfig(steps=-1)
    with pytest.raises(ValueError, match="positions"):
        SteeringConfig(positions="everywhere")
    with pytest.raises(ValueError, match="max_delta"):
        SteeringConfig(max_delta=0)


def test_vector_sae_mismatch_is_refused():
    with pytest.raises(ValueError, match="d_sae=50.*d_sae=96"):
        FeatureObjective(_sae("relu"), SteeringVector(50, weights=torch.ones(50)))

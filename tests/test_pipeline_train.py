"""Trainers and the training loop: they learn, keep unit-norm decoders, fold the scale, resume."""

from __future__ import annotations

import pytest
import torch

from steerplug.pipeline import train as T
from steerplug.pipeline import topk_kernels, trainers
from steerplug.pipeline.topk_kernels import _GatherEncode, auxk_loss, sparse_decode
from steerplug.pipeline.trainers import TrainerConfig, init_sae, make_trainer
from steerplug.sae import SparseAutoencoder


def planted(n=6000, d=32, f=96, p=0.04, seed=0):
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(f, d, generator=g)
    dic /= dic.norm(dim=-1, keepdim=True)
    codes = (torch.rand(n, f, generator=g) < p).float() * torch.rand(n, f, generator=g) * 4
    return codes @ dic + 3.0  # an offset and a scale far from 1, to exercise b_dec and normalisation


@torch.no_grad()
def _fve(sae, x):
    x_hat = sae(x).reconstruction
    return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_topk_autograd_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=torch.double)
    W = torch.randn(8, 32, dtype=torch.double, requires_grad=True)
    b = torch.randn(32, dtype=torch.double, requires_grad=True)
    bd = torch.randn(8, dtype=torch.double, requires_grad=True)
    Wd = torch.randn(32, 8, dtype=torch.double, requires_grad=True)

    def fast():  # as TopKTrainer: top-k without autograd, then the sparse autograd pieces
        with torch.no_grad():
            v, i = ((x - bd) @ W + b).topk(4, sorted=False)
        a = _GatherEncode.apply(x, W, b, bd, i, v).clamp_min(0)
        return (sparse_decode(i, a, Wd) + bd).pow(2).sum()

    def ref():
        pre = (x - bd) @ W + b
        v, i = pre.topk(4)
        return ((v.clamp_min(0).unsqueeze(-1) * Wd[i]).sum(1) + bd).pow(2).sum()

    for g1, g2 in zip(torch.autograd.grad(fast(), [W, b, bd, Wd]), torch.autograd.grad(ref(), [W, b, bd, Wd])):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("n_dead", [3, 20])  # fewer and more dead latents than k_aux
def test_auxk_loss_on_dead_columns_matches_dense_reference(n_dead, path, monkeypatch):
    """Values and gradients (encoder, biases, decoder) against the whole-width dense formulation,
    on both of its paths (dense over the dead columns, sparse B k_aux D)."""
    monkeypatch.setattr(topk_kernels, "AUXK_DENSE_MAX_RATIO", 10**6 if path == "dense" else 0)
    g = torch.Generator().manual_seed(1)
    B, D, F_, k_aux = 12, 8, 32, 6
    sae = init_sae(TrainerConfig(d_in=D, d_sae=F_, total_steps=1, k=4)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.double, generator=g))
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(B, D, dtype=torch.double, generator=g)
    e = torch.randn(B, D, dtype=torch.double, generator=g)
    dead = torch.zeros(F_, dtype=torch.bool)
    dead[torch.randperm(F_, generator=g)[:n_dead]] = True
    tv = torch.tensor(50.0, dtype=torch.double)

    def ref():  # the whole-width formulation: dense pre, mask the live latents, top-k, decode
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = pre.masked_fill(~dead, -torch.inf).topk(min(k_aux, n_dead), dim=-1)
        e_hat = (v.clamp_min(0).unsqueeze(-1) * sae.W_dec[i]).sum(1)
        return min(n_dead / k_aux, 1.0) * (e_hat + e).pow(2).sum() / tv

    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    fast = auxk_loss(x, sae, pre, e, dead, k_aux, tv)
    torch.testing.assert_close(fast, ref())
    fast_grads = torch.autograd.grad(fast, params)
    for g1, g2 in zip(fast_grads, torch.autograd.grad(ref(), params)):
        torch.testing.assert_close(g1, g2)
    assert float(fast_grads[3][~dead].abs().max()) == 0.0  # live decoder rows untouched
    assert float(fast_grads[0][:, ~dead].abs().max()) == 0.0  # and live encoder columns
    assert float(fast_grads[0][:, dead].abs().max()) > 0.0  # dead encoder columns do train


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_trainer_learns_and_keeps_unit_decoder(arch):
    x = planted()
    loop = T.TrainConfig(batch_size=256, total_tokens=256 * 300, progress=False, checkpoint_every=0)
    tc = TrainerConfig(d_in=32, d_sae=96, total_steps=loop.total_steps, architecture=arch, k=6, lr=3e-3,
                       warmup_steps=10, dead_tokens=3000, l1_coeff=0.02, sparsity_warmup_steps=30)
    trainer = make_trainer(tc)
    xs = x[:1024] * T.activation_scale(x)
    before = trainer.update(0, xs).mse
    res = T.train_sae(x, tc, loop)
    assert res.history[-1]["mse"] < 0.3 * before
    assert _fve(res.sae, x) > 0.6  # the folded SAE reads raw activations
    # the saved SAE has decoder rows of norm 1/scale (unit norm while training)
    norms = res.sae.W_dec.norm(dim=-1) * res.scale
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=1e-4)
    if arch == "topk":
        assert res.history[-1]["l0"] <= 6
    else:
        assert res.history[-1]["l0"] < 96 * 0.8  # the penalty makes it sparse


def test_relu_p_annealing_schedule():
    tc = TrainerConfig(d_in=8, d_sae=16, total_steps=100, architecture="relu", p_start=1.0, p_end=0.5,
                       anneal_start=0.5)
    tr = make_trainer(tc)
    assert tr.p_at(10) == 1.0 and tr.p_at(49) == 1.0
    assert tr.p_at(75) == pytest.approx(0.75) and tr.p_at(99) < 0.52
    x = torch.randn(64, 8)
    tr.update(60, x)
    assert tr.p == pytest.approx(tr.p_at(60)) and tr.l1_coeff != tc.l1_coeff  # rescaled on the change of p


def test_fold_scale_is_exact():
    sae = SparseAutoencoder.random(16, 40, architecture="topk", k=5, seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(50, 16) * 7
    s = 0.37
    out_norm = sae(x * s)
    folded = T.fold_scale(sae, s)
    out_raw = folded(x)
    torch.testing.assert_close(out_raw.features, out_norm.features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_raw.reconstruction, out_norm.reconstruction / s, atol=1e-4, rtol=1e-4)


def test_training_resumes_from_checkpoint_exactly(tmp_path, monkeypatch):
    x = planted(n=3000)
    loop = T.TrainConfig(batch_size=128, total_tokens=128 * 40, progress=False, checkpoint_every=10, log_every=5)
    tc = TrainerConfig(d_in=32, d_sae=64, total_steps=loop.total_steps, k=4, lr=2e-3, warmup_steps=5,
                       dead_tokens=500)
    full = T.train_sae(x, tc, loop, tmp_path / "full")

    from steerplug.pipeline import trainers

    real = trainers.TopKTrainer.update

    def crash(self, step, batch, **kwargs):
        if step == 25:
            raise KeyboardInterrupt
        return real(self, step, batch, **kwargs)

    monkeypatch.setattr(trainers.TopKTrainer, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        T.train_sae(x, tc, loop, tmp_path / "resumed")
    assert (tmp_path / "resumed" / T.CHECKPOINT_DIR / "state.json").is_file()
    monkeypatch.setattr(trainers.TopKTrainer, "update", real)
    again = T.train_sae(x, tc, loop, tmp_path / "resumed")
    for (n, p), (_, q) in zip(full.sae.named_parameters(), again.sae.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert not (tmp_path / "resumed" / T.CHECKPOINT_DIR).exists()
    loaded = SparseAutoencoder.from_pretrained(tmp_path / "resumed")
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 4
    assert (tmp_path / "resumed" / T.PLOT_NAME).is_file()


def test_config_validation():
    with pytest.raises(ValueError, match="architecture"):
        TrainerConfig(d_in=4, d_sae=8, total_steps=1, architecture="gated")
    with pytest.raises(ValueError, match="k=9"):
        TrainerConfig(d_in=4, d_sae=8, total_steps=1, k=9)
    with pytest.raises(ValueError, match="save_dtype"):
        T.TrainConfig(save_dtype="int8")
    with pytest.raises(ValueError, match="total_steps"):
        T.train_sae(torch.randn(100, 4), TrainerConfig(d_in=4, d_sae=8, total_steps=3, k=2),
                    T.TrainConfig(batch_size=10, total_tokens=100, progress=False))


def test_topk_exchange_choice_and_validation():
    """``auto`` all-gathers codes for small batches, all-reduces gradients for large ones."""
    cfg = TrainerConfig(d_in=8, d_sae=64, k=4, total_steps=1)
    t = make_trainer(cfg)
    assert t.exchange_for(trainers.CODES_MAX_ROWS_PER_LATENT * 64 // 4) == "codes"
    assert t.exchange_for(trainers.CODES_MAX_ROWS_PER_LATENT * 64 // 4 + 1) == "grads"
    assert make_trainer(cfg, exchange="grads").exchange_for(1) == "grads"
    with pytest.raises(ValueError, match="exchange='nccl'"):
        make_trainer(cfg, exchange="nccl")
    with pytest.raises(ValueError, match="TrainConfig.exchange"):
        T.TrainConfig(exchange="both")


@pytest.mark.parametrize("n_dead", [0, 5])
def test_topk_trainer_step_gradients_match_autograd_of_the_dense_loss(n_dead, monkeypatch):
    """The gradients TopKTrainer writes out (main term, and AuxK when latents are dead) equal
    autograd's on the whole-width dense formulation of the same loss."""
    g = torch.Generator().manual_seed(3)
    B, D, F_, k = 24, 8, 32, 4
    cfg = TrainerConfig(d_in=D, d_sae=F_, k=k, total_steps=10, dead_tokens=1000)
    t = make_trainer(cfg)
    t.sae.double()
    with torch.no_grad():
        for p in t.sae.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.double, generator=g))
    x = torch.randn(B, D, dtype=torch.double, generator=g)
    dead = torch.zeros(F_, dtype=torch.bool)
    dead[torch.randperm(F_, generator=g)[:n_dead]] = True
    t.tokens_since_fired[dead] = 10**9
    sae = t.sae
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(k)
    fired = torch.zeros(F_, dtype=torch.bool)
    fired[i[v > 0]] = True
    still_dead = dead & ~fired  # the step resets latents that fire in its batch
    x_hat = (v.clamp_min(0).unsqueeze(-1) * sae.W_dec[i]).sum(1) + sae.b_dec
    tv = (x - x.mean(0)).pow(2).sum()
    loss = (x_hat - x).pow(2).sum() / tv
    if still_dead.any():
        k_aux, nd = D // 2, int(still_dead.sum())
        va, ia = pre.masked_fill(~still_dead, -torch.inf).topk(min(k_aux, nd), dim=-1)
        e_hat = (va.clamp_min(0).unsqueeze(-1) * sae.W_dec[ia]).sum(1)
        loss = loss + cfg.auxk_alpha * min(nd / k_aux, 1.0) * (e_hat + (x_hat - x).detach()).pow(2).sum() / tv
    ref = torch.autograd.grad(loss, params)
    seen = {}
    monkeypatch.setattr(t, "_apply", lambda step: seen.update({n: getattr(sae, n).grad.clone() for n in
                                                               ("W_enc", "b_enc", "b_dec", "W_dec")}))
    stats = t.update(0, x)
    assert bool(still_dead.any()) == (n_dead > 0) and (stats.aux > 0) == (n_dead > 0)
    for name, r in zip(("W_enc", "b_enc", "b_dec", "W_dec"), ref):
        torch.testing.assert_close(seen[name], r, msg=name)

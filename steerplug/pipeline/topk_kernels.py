"""The sparse autograd pieces of the TopK trainer, and the AuxK loss built on them.

Fast path on CPU: the encoder and decoder weight gradients of a TopK SAE are dense GEMMs over the
scattered ``(B, F)`` top-k gradient, computed as sparse x dense products at ``B k D`` cost instead
of ``B F D`` (or per-token ``index_add``). :mod:`steerplug.pipeline.trainers` uses them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from steerplug.sae import SparseAutoencoder


def _rows_by_latent(idx: torch.Tensor, vals: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The ``(F, B)`` sparse matrix with ``vals[b, j]`` at ``(idx[b, j], b)``: the transpose of the
    scattered ``(B, F)`` top-k matrix, for weight gradients at ``B k D`` instead of ``B F D`` cost."""
    B, k = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(k)  # (B k,)
    return torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), vals.reshape(-1), (n_latents, B),
                                   check_invariants=False)


def latent_outer(idx: torch.Tensor, vals: torch.Tensor, m: torch.Tensor, n_latents: int) -> torch.Tensor:
    """``(F, D)``: row ``f`` is ``sum over (b, j) with idx[b, j] == f of vals[b, j] * m[b]``, i.e.
    ``S.T @ m`` for the scattered ``(B, F)`` top-k matrix ``S``, at ``B k D`` cost (the weight
    gradients of a TopK SAE: ``vals`` the activations and ``m`` the output gradient for the decoder,
    ``vals`` the pre-activation gradient and ``m`` the centred input for the encoder)."""
    return torch.sparse.mm(_rows_by_latent(idx, vals, n_latents), m)


def gathered_dot(idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``(B, k)``: ``g[b] . W[idx[b, j]]``, only those entries of ``g @ W.T`` (a sampled matmul):
    the gradient of the top-k values of ``sum_j vals[:, j] * W[idx[:, j]]`` given ``g (B, D)``."""
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested
        warnings.simplefilter("ignore", UserWarning)
        sample = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(B * k, dtype=g.dtype, device=g.device),
                                         (B, W.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(sample, g, W.T).values().reshape(B, k)


def _encoder_grads(xc: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor,
                   need_W: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``pre = xc @ W + b`` given ``g (B, k)`` on the entries ``(b, idx[b, j])`` only:
    ``W`` by a sparse x dense product (``B k D``, not the dense ``B F D`` GEMM), and ``b``."""
    F_ = W.shape[1]
    g_sum = torch.zeros(F_, dtype=W.dtype, device=W.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
    grad_W = latent_outer(idx, g, xc, F_).T if need_W else None  # (F, D) -> (D, F)
    return grad_W, g_sum


class _GatherEncode(torch.autograd.Function):
    """The pre-activations ``vals (B, k)`` at latents ``idx (B, k)``, already computed (the top-k
    of the dense ``pre``, possibly on another rank; or the dead latents AuxK picks), made
    differentiable in ``W``, ``b`` and ``b_dec`` at ``B k D`` cost: the dense ``(B, F)`` gradient
    of ``pre`` is never formed, and ``x`` gets none."""

    @staticmethod
    def forward(ctx, x, W, b, b_dec, idx, vals):
        ctx.save_for_backward(x - b_dec, W, idx)
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        xc, W, idx = ctx.saved_tensors
        grad_W, g_sum = _encoder_grads(xc, W, idx, g, ctx.needs_input_grad[1])
        grad_bdec = -(W @ g_sum) if ctx.needs_input_grad[3] else None
        return None, grad_W, g_sum, grad_bdec, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j acts[:, j] * W_dec[idx[:, j]]`` by ``embedding_bag``. Backward at ``B k D`` cost:
    the gradient of the k values is a sampled matmul (only the ``(b, idx[b, j])`` entries of
    ``g_out @ W_dec.T``), the weight gradient a sparse times dense product."""

    @staticmethod
    def forward(ctx, idx, acts, W_dec):  # idx, acts (B, k), W_dec (F, D)
        ctx.save_for_backward(idx, acts, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")  # (B, D)

    @staticmethod
    def backward(ctx, g_out):  # g_out (B, D)
        idx, acts, W_dec = ctx.saved_tensors
        return None, gathered_dot(idx, g_out, W_dec), latent_outer(idx, acts, g_out, W_dec.shape[0])


def sparse_decode(idx: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` indices and values over ``W_dec (F, D)`` -> ``(B, D)``."""
    return _SparseDecode.apply(idx, acts, W_dec)


class _ColumnsEncode(torch.autograd.Function):
    """The pre-activation columns ``pre_cols = pre[:, cols] (B, n)``, already computed, made
    differentiable in ``W``, ``b`` and ``b_dec``: the backward is one dense GEMM over those
    ``n`` columns (``B n D``), not the whole width."""

    @staticmethod
    def forward(ctx, x, W, b, b_dec, cols, pre_cols):
        ctx.save_for_backward(x - b_dec, W, cols)
        return pre_cols.clone()

    @staticmethod
    def backward(ctx, g):  # g (B, n)
        xc, W, cols = ctx.saved_tensors
        g_b = g.sum(0)  # (n,)
        grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = torch.zeros_like(W).index_copy_(1, cols, xc.T @ g)  # (D, F)
        g_sum = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device).index_copy_(0, cols, g_b)
        grad_bdec = -(W.index_select(1, cols) @ g_b) if ctx.needs_input_grad[3] else None
        return None, grad_W, g_sum, grad_bdec, None, None


AUXK_DENSE_MAX_RATIO = 8
"""AuxK runs dense over the dead columns while ``n_dead <= AUXK_DENSE_MAX_RATIO * k_aux`` (the
usual case: few dead latents, where that is ~3x faster: 49 vs 155 ms at 300 dead of 3072, batch
1024, k_aux 288, one CPU thread) and sparse (``B k_aux D``) above it, where the two cost about the
same (2400 dead: 232 vs 267 ms)."""


def auxk_loss(x: torch.Tensor, sae: SparseAutoencoder, pre: torch.Tensor, e: torch.Tensor,
              dead: torch.Tensor, k_aux: int, total_var: torch.Tensor) -> torch.Tensor:
    """The AuxK loss (Gao et al. 2024): the top ``k_aux`` dead latents of the pre-activations
    ``pre (B, F)`` reconstruct the residual ``-e = x - x_hat (B, D)``, relative to ``total_var``;
    scaled by ``n_dead / k_aux`` below ``k_aux`` dead latents. Trains the dead latents' encoder
    columns and biases as well as their decoder rows.

    Only the dead columns are read: dense over them when they are few (see
    ``AUXK_DENSE_MAX_RATIO``), else with sparse ``B k_aux D`` products."""
    dead_idx = dead.nonzero().squeeze(1)  # (n_dead,)
    n_dead = int(dead_idx.numel())
    k = min(k_aux, n_dead)
    pre_dead = pre.detach().index_select(1, dead_idx)  # (B, n_dead)
    vals, local = pre_dead.topk(k, dim=-1, sorted=False)  # (B, k)
    if n_dead <= AUXK_DENSE_MAX_RATIO * k_aux:
        chosen = torch.zeros_like(pre_dead, dtype=torch.bool).scatter_(1, local, True)  # exact top-k
        pre_dead = _ColumnsEncode.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, dead_idx, pre_dead)
        a = torch.where(chosen, pre_dead.clamp_min(0), 0.0)  # (B, n_dead)
        e_hat = a @ sae.W_dec.index_select(0, dead_idx)  # (B, D)
    else:
        idx = dead_idx[local]  # (B, k) latent ids
        vals = _GatherEncode.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, idx, vals)
        e_hat = sparse_decode(idx, vals.clamp_min(0), sae.W_dec)  # (B, D)
    return min(n_dead / k_aux, 1.0) * (e_hat + e.detach()).pow(2).sum() / total_var

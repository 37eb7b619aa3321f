"""SAE training algorithms, kept apart from the model and the loop (as dictionary_learning does).

A trainer owns a :class:`~steerplug.sae.SparseAutoencoder`, its optimiser and schedule, and exposes
``update(step, x) -> StepStats``; :func:`steerplug.pipeline.train.train_sae` is the generic loop.

- :class:`TopKTrainer` — TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and
  evaluating sparse autoencoders"). Fast path on CPU: the encoder and decoder weight gradients are
  dense GEMMs over the scattered (B, F) top-k gradient instead of per-token ``index_add``.
- :class:`ReLUL1Trainer` — ReLU SAE with an Lp penalty whose exponent is annealed from 1 towards
  ``p_end`` (Karvonen et al. 2024, "Measuring progress in dictionary learning ... p-annealing").

Both keep decoder rows at unit norm (the gradient component parallel to each row is removed
before the step, rows are renormalised after), use Adam with linear warm-up and a final linear
decay, and track how many tokens ago each latent last fired (dead latents).

Data parallel (``dist``, a :class:`~steerplug.distributed.Dist` of several ranks): each rank
passes its share of the global batch. Every loss is a sum over tokens divided by a global
quantity (the batch's total variance or its token count), so the sum of the ranks' gradients is
the gradient of the one-process loss on the whole batch; it is all-reduced before the
decoder-norm projection and the Adam step, which therefore run identically on every rank. The
statistics the step depends on (the batch mean and variance, which latents fired, the
p-annealing rescale) are reduced over the ranks too, so no rank drifts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from steerplug._config import require_ints
from steerplug.distributed import SINGLE, Dist
from steerplug.sae import SparseAutoencoder


@dataclass
class TrainerConfig:
    """Hyper-parameters shared by the trainers (the architecture-specific ones are marked)."""

    d_in: int
    """Activation width."""
    d_sae: int
    """Number of latents."""
    total_steps: int
    """Optimiser steps in the whole run (for the schedules)."""
    architecture: str = "topk"
    """``topk`` (TopK + AuxK) or ``relu`` (ReLU + Lp penalty with p-annealing)."""
    k: int = 32
    """topk: active latents per token."""
    lr: float | None = None
    """Adam learning rate; None: ``2e-4 / sqrt(d_sae / 2**14)`` (Gao et al.) for topk, 1e-3 for relu."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up."""
    decay_start: float = 0.8
    """Fraction of the run after which the learning rate decays linearly to 0."""
    auxk_alpha: float = 1 / 32
    """topk: weight of the AuxK loss."""
    dead_tokens: int = 100_000
    """A latent that has not fired for this many tokens counts as dead."""
    l1_coeff: float = 0.05
    """relu: final sparsity-penalty coefficient (inputs normalised to E||x||^2 = d_in)."""
    sparsity_warmup_steps: int = 200
    """relu: the penalty ramps up linearly over these steps."""
    p_start: float = 1.0
    """relu: initial exponent of the Lp penalty."""
    p_end: float = 0.5
    """relu: final exponent (p-annealing); equal to p_start for plain L1."""
    anneal_start: float = 0.2
    """relu: fraction of the run after which p anneals linearly from p_start to p_end."""
    seed: int = 0
    """Seed of the initialisation."""

    def __post_init__(self) -> None:
        if self.architecture not in ("topk", "relu"):
            raise ValueError(f"TrainerConfig.architecture={self.architecture!r}: expected 'topk' or 'relu'.")
        require_ints(self, ("d_in", "d_sae", "total_steps"))
        if self.architecture == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"TrainerConfig.k={self.k!r}: expected 1 <= k <= d_sae={self.d_sae}.")
        if not 0.0 <= self.decay_start <= 1.0:
            raise ValueError(f"TrainerConfig.decay_start={self.decay_start!r}: expected a fraction in [0, 1].")
        if not 0.0 <= self.anneal_start <= 1.0:
            raise ValueError(f"TrainerConfig.anneal_start={self.anneal_start!r}: expected a fraction in [0, 1].")
        if not 0.0 < self.p_end <= self.p_start:
            raise ValueError(f"TrainerConfig.p_end={self.p_end!r}: expected 0 < p_end <= p_start={self.p_start}.")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TrainerConfig.lr={self.lr!r}: expected a positive learning rate.")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 / (self.d_sae / 2**14) ** 0.5 if self.architecture == "topk" else 1e-3


class StepStats(NamedTuple):
    """What one ``update`` measured, on its (normalised) batch."""

    loss: float
    mse: float
    """Sum of squared errors per token."""
    fve: float
    """Fraction of variance explained, ``1 - SSE / sum ||x - mean(x)||^2``."""
    l0: float
    """Mean number of active latents per token."""
    aux: float
    """AuxK loss (topk) or sparsity penalty (relu)."""
    dead_fraction: float
    """Latents silent for ``dead_tokens`` tokens."""


# --- fast TopK autograd pieces -------------------------------------------------------------------
def _rows_by_latent(idx: torch.Tensor, vals: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The ``(F, B)`` sparse matrix with ``vals[b, j]`` at ``(idx[b, j], b)``: the transpose of the
    scattered ``(B, F)`` top-k matrix, for weight gradients at ``B k D`` instead of ``B F D`` cost."""
    B, k = idx.shape
    rows = torch.arange(B, device=idx.device).repeat_interleave(k)  # (B k,)
    return torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), vals.reshape(-1), (n_latents, B),
                                   check_invariants=False)


def _encoder_grads(xc: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor,
                   need_W: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``pre = xc @ W + b`` given ``g (B, k)`` on the entries ``(b, idx[b, j])`` only:
    ``W`` by a sparse x dense product (``B k D``, not the dense ``B F D`` GEMM), and ``b``."""
    F_ = W.shape[1]
    g_sum = torch.zeros(F_, dtype=W.dtype, device=W.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
    grad_W = torch.sparse.mm(_rows_by_latent(idx, g, F_), xc).T if need_W else None  # (F, D) -> (D, F)
    return grad_W, g_sum


class _TopKEncode(torch.autograd.Function):
    """``relu(topk((x - b_dec) @ W + b))`` returning the k values, their indices and the dense
    pre-activations (not differentiable: AuxK reads them to choose latents, then takes its values
    through ``_ColumnsEncode`` or ``_GatherEncode``). Backward: sparse, ``B k D`` (``_encoder_grads``); ``x`` gets no
    gradient, ``b_dec`` gets its reduced one directly."""

    @staticmethod
    def forward(ctx, x, W, b, b_dec, k: int):  # x (B, D), W (D, F), b (F,), b_dec (D,)
        xc = x - b_dec  # (B, D)
        pre = torch.addmm(b, xc, W)  # (B, F)
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # (B, k)
        acts = vals.clamp_min(0)
        ctx.save_for_backward(xc, W, idx, acts)
        ctx.mark_non_differentiable(idx, pre)
        ctx.set_materialize_grads(False)  # no (B, F) zero tensor for the non-differentiable ``pre``
        return acts, idx, pre

    @staticmethod
    def backward(ctx, g_acts, g_idx, g_pre):
        if g_acts is None:
            return None, None, None, None, None
        xc, W, idx, acts = ctx.saved_tensors
        grad_W, g_sum = _encoder_grads(xc, W, idx, g_acts * (acts > 0), ctx.needs_input_grad[1])
        grad_bdec = -(W @ g_sum) if ctx.needs_input_grad[3] else None  # (D,)
        return None, grad_W, g_sum, grad_bdec, None


class _GatherEncode(torch.autograd.Function):
    """The pre-activations ``vals (B, k)`` at latents ``idx (B, k)``, already computed (AuxK picks
    them from the dense ``pre``), made differentiable in ``W``, ``b`` and ``b_dec`` at ``B k D``
    cost: the dense ``(B, F)`` gradient of ``pre`` is never formed."""

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
        B, k = idx.shape
        crow = torch.arange(0, B * k + 1, k, device=idx.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested
            warnings.simplefilter("ignore", UserWarning)
            sample = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(B * k, dtype=g_out.dtype,
                                             device=g_out.device), (B, W_dec.shape[0]), check_invariants=False)
        g_acts = torch.sparse.sampled_addmm(sample, g_out, W_dec.T).values().reshape(B, k)  # (B, k)
        grad_W = torch.sparse.mm(_rows_by_latent(idx, acts, W_dec.shape[0]), g_out)  # (F, D)
        return None, g_acts, grad_W


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


# --- the trainers --------------------------------------------------------------------------------
def init_sae(cfg: TrainerConfig) -> SparseAutoencoder:
    """Unit-norm random decoder rows, encoder = decoder transpose, zero biases (Gao et al.)."""
    arch = "topk" if cfg.architecture == "topk" else "relu"
    return SparseAutoencoder.random(cfg.d_in, cfg.d_sae, architecture=arch,
                                    k=cfg.k if arch == "topk" else None, seed=cfg.seed)


class SAETrainer:
    """Optimiser, schedule, decoder-norm constraint and dead-latent tracking shared by trainers."""

    def __init__(self, cfg: TrainerConfig, sae: SparseAutoencoder | None = None, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist or SINGLE
        self.sae = (sae if sae is not None else init_sae(cfg)).to(self.dist.device)
        if self.dist.active:  # start from rank 0's weights, whatever each rank's RNG did
            with torch.no_grad():
                for p in self.sae.parameters():
                    self.dist.broadcast_(p.data)
        try:  # the fused kernel is ~3x faster than the default foreach Adam on CPU
            self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999),
                                              fused=True)
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999))
        self.tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.dist.device)  # (F,)

    # schedule: linear warm-up, constant, linear decay to 0 after decay_start
    def lr_factor(self, step: int) -> float:
        c = self.cfg
        warm = min(1.0, (step + 1) / max(1, c.warmup_steps))
        decay_at = int(c.decay_start * c.total_steps)
        if step >= decay_at and c.total_steps > decay_at:
            warm *= max(0.0, (c.total_steps - step) / (c.total_steps - decay_at))
        return warm

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """``b_dec`` starts at the mean of a sample of (normalised) activations ``(N, D)``."""
        self.sae.b_dec.copy_(x.mean(0))
        self.dist.broadcast_(self.sae.b_dec.data)

    @torch.no_grad()
    def _batch_moments(self, x: torch.Tensor, fired: torch.Tensor | None = None
                       ) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """Over the global batch (all ranks): the token count, the total variance
        ``sum ||x - mean||^2`` and, given this rank's ``fired (F,)``, whether each latent fired on
        any rank. One all-reduce; in a single process, exactly what the formulas say."""
        if not self.dist.active:
            return x.shape[0], (x - x.mean(0)).pow(2).sum(), fired
        parts = [x.sum(0, dtype=torch.float64), x.double().pow(2).sum().reshape(1),
                 torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)]
        if fired is not None:
            parts.append(fired.double())
        buf = self.dist.all_reduce_(torch.cat(parts))
        D = x.shape[1]
        s, sq, n = buf[:D], buf[D], buf[D + 1]
        total_var = (sq - s.pow(2).sum() / n).to(x.dtype)
        return int(n), total_var, (buf[D + 2:] > 0 if fired is not None else None)

    @torch.no_grad()
    def _reduce_grads(self) -> None:
        """Sum the gradients over the ranks (one flat all-reduce)."""
        if not self.dist.active:
            return
        params = list(self.sae.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self.dist.all_reduce_(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _reduce_stats(self, values: list[float | torch.Tensor]) -> list[float]:
        """Sums over the ranks of per-rank scalar sums (one small all-reduce)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.dist.device)
        return self.dist.all_reduce_(t).tolist()

    def _step(self, step: int, loss: torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate * self.lr_factor(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_grads()
        W = self.sae.W_dec
        with torch.no_grad():  # keep ||W_dec[i]|| = 1: drop the radial part of the gradient ...
            W.grad -= (W.grad * W).sum(-1, keepdim=True) * W
        self.optimizer.step()
        with torch.no_grad():  # ... and renormalise after the step
            W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def _track(self, fired: torch.Tensor, n_tokens: int) -> float:
        """``fired`` (F,) bool; returns the dead fraction."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0
        return float((self.tokens_since_fired >= self.cfg.dead_tokens).float().mean())

    def update(self, step: int, x: torch.Tensor) -> StepStats:
        raise NotImplementedError

    # --- checkpoints: tensors + JSON-able scalars (no pickles) ---------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"sae.{n}": p.detach().cpu().clone() for n, p in self.sae.named_parameters()}
        out["tokens_since_fired"] = self.tokens_since_fired.cpu().clone()
        names = {id(p): n for n, p in self.sae.named_parameters()}
        for p, st in self.optimizer.state.items():
            for key, val in st.items():
                out[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(val).cpu().clone()
        return out

    def state_scalars(self) -> dict[str, float]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, float]) -> None:
        with torch.no_grad():
            for n, p in self.sae.named_parameters():
                p.copy_(tensors[f"sae.{n}"])
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.dist.device).clone()
        for n, p in self.sae.named_parameters():
            keys = [k for k in tensors if k.startswith(f"opt.{n}.")]
            if keys:  # as torch keeps them: the moments on p's device, the step count too when fused
                step_device = p.device if self.optimizer.defaults.get("fused") else torch.device("cpu")
                self.optimizer.state[p] = {k.rsplit(".", 1)[-1]: tensors[k].to(
                    step_device if k.endswith(".step") else p.device).clone() for k in keys}


class TopKTrainer(SAETrainer):
    """TopK SAE + AuxK (Gao et al. 2024). Loss = FVU + auxk_alpha * AuxK-FVU of the residual."""

    def update(self, step: int, x: torch.Tensor) -> StepStats:  # x (B, D), normalised
        sae, c = self.sae, self.cfg
        acts, idx, pre = _TopKEncode.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, c.k)  # (B, k) x2, (B, F)
        x_hat = sparse_decode(idx, acts, sae.W_dec) + sae.b_dec  # (B, D)
        e = x_hat - x
        fired = torch.zeros(c.d_sae, dtype=torch.bool, device=x.device)
        fired[idx[acts > 0]] = True
        n, total_var, fired = self._batch_moments(x, fired)
        loss = e.pow(2).sum() / total_var
        dead_frac = self._track(fired, n)
        dead = self.tokens_since_fired >= c.dead_tokens  # (F,)
        aux = torch.zeros((), device=x.device)
        if c.auxk_alpha > 0 and bool(dead.any()):
            aux = auxk_loss(x, sae, pre, e, dead, c.d_in // 2, total_var)
            loss = loss + c.auxk_alpha * aux
        self._step(step, loss)
        with torch.no_grad():
            loss_, sse, l0_sum, aux_ = self._reduce_stats([loss.detach(), e.pow(2).sum(), (acts > 0).sum(), aux.detach()])
        return StepStats(loss_, sse / n, 1 - sse / float(total_var), l0_sum / n, aux_, dead_frac)


class ReLUL1Trainer(SAETrainer):
    """ReLU SAE with penalty ``lambda * sum_i (f_i ||d_i||)^p``; p anneals from p_start to p_end
    after ``anneal_start`` and lambda is rescaled at each change of p so the penalty keeps its
    scale (Karvonen et al. 2024)."""

    def __init__(self, cfg: TrainerConfig, sae: SparseAutoencoder | None = None, dist: Dist | None = None):
        super().__init__(cfg, sae, dist)
        self.p = cfg.p_start
        self.l1_coeff = cfg.l1_coeff

    def p_at(self, step: int) -> float:
        c = self.cfg
        start = int(c.anneal_start * c.total_steps)
        if step < start or c.total_steps <= start:
            return c.p_start
        frac = (step - start) / (c.total_steps - start)
        return c.p_start + (c.p_end - c.p_start) * frac

    def update(self, step: int, x: torch.Tensor) -> StepStats:
        sae, c = self.sae, self.cfg
        f = torch.relu(sae.pre_acts(x))  # (B, F)
        x_hat = sae.decode(f)  # (B, D)
        e = x_hat - x
        n, total_var, fired = self._batch_moments(x, (f > 0).any(0))
        mse_term = e.pow(2).sum() / n
        fn = f * sae.W_dec.norm(dim=-1)  # (B, F)
        p_new = self.p_at(step)
        if p_new != self.p:
            with torch.no_grad():  # keep lambda * ||f||_p^p on the same scale across the change of p
                old, new = self._reduce_stats([fn.pow(self.p).sum(), fn.pow(p_new).sum()])
                if new > 0:
                    self.l1_coeff *= old / new
            self.p = p_new
        on = fn > 0
        penalty = (torch.where(on, fn, 1.0).pow(self.p) * on).sum() / n  # 0^p without NaN grads
        warm = min(1.0, (step + 1) / max(1, c.sparsity_warmup_steps))
        loss = mse_term + warm * self.l1_coeff * penalty
        dead_frac = self._track(fired, n)
        self._step(step, loss)
        with torch.no_grad():
            loss_, sse, l0_sum, pen = self._reduce_stats([loss.detach(), e.pow(2).sum(), (f > 0).sum(), penalty.detach()])
        return StepStats(loss_, sse / n, 1 - sse / float(total_var), l0_sum / n, pen, dead_frac)

    def state_scalars(self) -> dict[str, float]:
        return {"p": self.p, "l1_coeff": self.l1_coeff}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, float]) -> None:
        super().load_state(tensors, scalars)
        self.p = scalars.get("p", self.p)
        self.l1_coeff = scalars.get("l1_coeff", self.l1_coeff)


def make_trainer(cfg: TrainerConfig, sae: SparseAutoencoder | None = None, dist: Dist | None = None) -> SAETrainer:
    return (TopKTrainer if cfg.architecture == "topk" else ReLUL1Trainer)(cfg, sae, dist)


__all__ = ["TrainerConfig", "StepStats", "SAETrainer", "TopKTrainer", "ReLUL1Trainer", "make_trainer",
           "sparse_decode", "init_sae"]

"""SAE training algorithms, kept apart from the model and the loop (as dictionary_learning does).

A trainer owns a :class:`~steerplug.sae.SparseAutoencoder`, its optimiser and schedule, and exposes
``update(step, x) -> StepStats``; :func:`steerplug.pipeline.train.train_sae` is the generic loop.

- :class:`TopKTrainer` — TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and
  evaluating sparse autoencoders"), through the sparse autograd pieces of
  :mod:`steerplug.pipeline.topk_kernels`.
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

from dataclasses import dataclass
from typing import NamedTuple

import torch

from steerplug._config import require_ints
from steerplug.distributed import SINGLE, Dist
from steerplug.pipeline.topk_kernels import _TopKEncode, auxk_loss, sparse_decode
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
        """Sum the gradients over the ranks: one all-reduce per parameter, all in flight at once
        (no flat copy: on 2 CPU processes that copy cost as much as a third of the reduction)."""
        if not self.dist.active:
            return
        import torch.distributed as dist

        works = []
        for p in self.sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            works.append(dist.all_reduce(p.grad, async_op=True))
        for w in works:
            w.wait()

    def _reduce_stats(self, values: list[float | torch.Tensor], sync: bool = True) -> list[float]:
        """Sums over the ranks of per-rank scalar sums (one small all-reduce); with ``sync``
        False, this rank's sums scaled to the whole batch (for steps whose statistics nobody reads)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.dist.device)
        return (self.dist.all_reduce_(t) if sync else t * self.dist.world_size).tolist()

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

    def update(self, step: int, x: torch.Tensor, sync_stats: bool = True) -> StepStats:
        """One optimiser step on ``x (B, D)`` (this rank's share of the batch). The returned
        statistics are the whole batch's when ``sync_stats`` (always in one process); else this
        rank's, scaled, which saves a collective on steps that are not logged."""
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

    def update(self, step: int, x: torch.Tensor, sync_stats: bool = True) -> StepStats:  # x (B, D), normalised
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
            loss_, sse, l0_sum, aux_ = self._reduce_stats(
                [loss.detach(), e.pow(2).sum(), (acts > 0).sum(), aux.detach()], sync_stats)
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

    def update(self, step: int, x: torch.Tensor, sync_stats: bool = True) -> StepStats:
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
            loss_, sse, l0_sum, pen = self._reduce_stats(
                [loss.detach(), e.pow(2).sum(), (f > 0).sum(), penalty.detach()], sync_stats)
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

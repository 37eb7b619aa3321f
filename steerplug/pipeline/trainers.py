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

Data parallel (``dist``, a :class:`~steerplug.distributed.Dist` of several ranks): every rank
passes the same global batch to ``update`` and the trainer splits the work on it. Every loss is a
sum over tokens divided by a global quantity (the batch's total variance or its token count), so
the sum of the ranks' gradients is the gradient of the one-process loss on the whole batch.
:class:`ReLUL1Trainer` all-reduces the gradients before the decoder-norm projection and the Adam
step, which therefore run identically on every rank; the statistics the step depends on (the batch
mean and variance, which latents fired, the p-annealing rescale) are reduced too, so no rank
drifts. :class:`TopKTrainer` splits the encoder GEMM and the top-k over the ranks and then either
all-gathers the codes (every rank computes the whole batch's sparse gradients) or all-reduces the
gradients, whichever costs less at the batch size (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from steerplug._config import require_ints
from steerplug.distributed import SINGLE, Dist
from steerplug.pipeline.topk_kernels import _encoder_grads, auxk_loss, gathered_dot, latent_outer, sparse_decode
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
        """Sum the gradients over the ranks."""
        if self.dist.active:
            for p in self.sae.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.dist.all_reduce_many_([p.grad for p in self.sae.parameters()])

    def _reduce_stats(self, values: list[float | torch.Tensor], sync: bool = True) -> list[float]:
        """Sums over the ranks of per-rank scalar sums (one small all-reduce); with ``sync``
        False, this rank's sums scaled to the whole batch (for steps whose statistics nobody reads)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.dist.device)
        return (self.dist.all_reduce_(t) if sync else t * self.dist.world_size).tolist()

    def _step(self, step: int, loss: torch.Tensor) -> None:
        """Backward, sum the gradients over the ranks, and :meth:`_apply`."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_grads()
        self._apply(step)

    def _apply(self, step: int) -> None:
        """The optimiser step on the (whole batch's) gradients in ``.grad``, under the decoder-norm
        constraint."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate * self.lr_factor(step)
        W = self.sae.W_dec
        with torch.no_grad():  # keep ||W_dec[i]|| = 1: drop the radial part of the gradient ...
            W.grad.addcmul_(W, torch.linalg.vecdot(W.grad, W).unsqueeze(1), value=-1)
        self.optimizer.step()
        with torch.no_grad():  # ... and renormalise after the step
            W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def _track(self, fired: torch.Tensor, n_tokens: int) -> float:
        """``fired`` (F,) bool; returns the dead fraction."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0
        return float((self.tokens_since_fired >= self.cfg.dead_tokens).float().mean())

    def update(self, step: int, x: torch.Tensor, sync_stats: bool = True) -> StepStats:
        """One optimiser step on the global batch ``x (B, D)``, the same on every rank (each works
        on its share, ``self.dist.share(x)``). The returned statistics are the whole batch's;
        a trainer whose statistics cost a collective may return this rank's, scaled, when
        ``sync_stats`` is False (steps that are not logged)."""
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


EXCHANGES = ("auto", "codes", "grads")
CODES_MAX_ROWS_PER_LATENT = 32
"""``exchange="auto"`` all-gathers codes while ``batch_size * k <= 32 * d_sae`` and all-reduces
gradients above (measured on 2 CPU processes, gloo, 576 x 2048, k 32, speed-up over one process:
codes 1.27-1.29x vs gradients 1.01-1.02x at batch 1,024; gradients 1.79x vs codes 1.22x at 4,096;
BENCHMARKS.md, issue #14). Unmeasured on GPUs."""


class TopKTrainer(SAETrainer):
    """TopK SAE + AuxK (Gao et al. 2024). Loss = FVU + auxk_alpha * AuxK-FVU of the residual.

    The step's gradients are written out (no autograd for the main term: the weight gradients are
    ``B k D`` sparse products). Data parallel, the encoder GEMM and the top-k (the ``B D F`` work)
    always run on each rank's share of the rows; what the ranks exchange is ``exchange``:

    - ``codes``: the ranks all-gather the codes (``2 B k`` numbers) and every rank computes the rest
      of the step (decoder, loss, sparse weight gradients, dead-latent counters) for the whole
      batch, which it holds, so it takes exactly the one-process step. No gradient crosses, except
      the AuxK term's (it needs the dense pre-activations, which only the rows' rank has): non-zero
      only on the dead latents and ``b_dec``, summed in one compact all-reduce. Cheapest while the
      replicated ``B k D`` work is small against an all-reduce of ``2 F D`` numbers.
    - ``grads``: classic data parallel: each rank computes its rows' gradients and the ranks
      all-reduce them (and, before AuxK, which latents fired). Cheapest for large batches.
    - ``auto``: ``codes`` while ``B k <= CODES_MAX_ROWS_PER_LATENT * F``, else ``grads``.
    """

    def __init__(self, cfg: TrainerConfig, sae: SparseAutoencoder | None = None, dist: Dist | None = None,
                 exchange: str = "auto"):
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r}: expected one of {EXCHANGES}.")
        super().__init__(cfg, sae, dist)
        self.exchange = exchange

    def exchange_for(self, batch_size: int) -> str:
        """``codes`` or ``grads``: what the ranks exchange for a global batch of ``batch_size``."""
        if self.exchange != "auto":
            return self.exchange
        return "codes" if batch_size * self.cfg.k <= CODES_MAX_ROWS_PER_LATENT * self.cfg.d_sae else "grads"

    def update(self, step: int, x: torch.Tensor, sync_stats: bool = True) -> StepStats:  # x (B, D), normalised
        sae, c, d = self.sae, self.cfg, self.dist
        B, k = x.shape[0], c.k
        codes = d.active and self.exchange_for(B) == "codes"
        reduce = d.active and not codes  # the gradients are this rank's rows' and get summed
        mine = d.share(x)  # (b, D) this rank's rows
        with torch.no_grad():
            # loss = sum ||e||^2 / total_var, e = decode(topk(encode(x))) - x
            total_var = (x - x.mean(0)).pow(2).sum()
            pre = torch.addmm(sae.b_enc, mine - sae.b_dec, sae.W_enc)  # (b, F): the step's B x D x F GEMM
            vals, idx = pre.topk(k, dim=-1, sorted=False)  # (b, k)
            rows = mine
            if codes:  # every rank's codes, in one tensor (the latent ids' bits carried as floats)
                both = d.all_gather_rows(torch.cat([vals, _bits(idx, vals.dtype)], 1), B)  # (B, 2k)
                vals, idx, rows = both[:, :k], _unbits(both[:, k:]), x
            acts = vals.clamp_min(0)  # (n, k) for the n rows this rank works on
            e = F.embedding_bag(idx, sae.W_dec, per_sample_weights=acts, mode="sum") + sae.b_dec - rows  # (n, D)
            g_out = e * (2 / total_var)  # d loss / d x_hat
            g_pre = gathered_dot(idx, g_out, sae.W_dec) * (vals > 0)  # (n, k) d loss / d pre at the top k
            g_we, g_enc = _encoder_grads(rows - sae.b_dec, sae.W_enc, idx, g_pre, True)  # B k D sparse products
            grads = {"W_dec": latent_outer(idx, acts, g_out, c.d_sae),
                     "W_enc": g_we.contiguous(),  # fused Adam misreads a transposed gradient
                     "b_enc": g_enc,
                     "b_dec": g_out.sum(0) - sae.W_enc @ g_enc}
            fired = torch.zeros(c.d_sae, dtype=torch.bool, device=x.device)
            fired[idx[acts > 0]] = True
            counts = torch.stack([e.pow(2).sum(), (acts > 0).sum().to(e.dtype)])  # sse, active latents
            if reduce:  # which latents fired anywhere (the dead set AuxK needs), and the sums
                small = d.all_reduce_(torch.cat([fired.to(e.dtype), counts]))
                fired, counts = small[:-2] > 0, small[-2:]
        dead_frac = self._track(fired, B)
        dead = self.tokens_since_fired >= c.dead_tokens  # (F,)
        aux = torch.zeros((), dtype=x.dtype, device=x.device)
        if c.auxk_alpha > 0 and bool(dead.any()):  # on this rank's rows, whose dense pre-activations it has
            aux = self._add_aux_grads(grads, mine, pre, d.share(e) if codes else e, dead, total_var,
                                      compact_reduce=codes)
        if reduce:  # the AuxK loss rides along
            d.all_reduce_many_([*grads.values(), aux])
        for name, g in grads.items():
            getattr(sae, name).grad = g
        self._apply(step)
        sse, n_active, aux = float(counts[0]), float(counts[1]), float(aux)
        return StepStats(sse / float(total_var) + c.auxk_alpha * aux, sse / B, 1 - sse / float(total_var),
                         n_active / B, aux, dead_frac)

    def _add_aux_grads(self, grads: dict[str, torch.Tensor], x: torch.Tensor, pre: torch.Tensor, e: torch.Tensor,
                       dead: torch.Tensor, total_var: torch.Tensor, compact_reduce: bool) -> torch.Tensor:
        """Add the gradients of ``auxk_alpha * AuxK`` on this rank's rows (``x``, ``pre``, residual
        ``e``) to ``grads``; with ``compact_reduce``, first sum them over the ranks in one all-reduce
        of the entries they can touch (the dead latents' encoder columns, biases and decoder rows,
        and ``b_dec``). Returns the AuxK loss (the whole batch's after ``compact_reduce``)."""
        sae = self.sae
        with torch.enable_grad():
            aux = auxk_loss(x, sae, pre, e, dead, self.cfg.d_in // 2, total_var)
            g_we, g_be, g_bd, g_wd = torch.autograd.grad(self.cfg.auxk_alpha * aux,
                                                         [sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec])
        if not compact_reduce:
            for name, g in zip(("W_enc", "b_enc", "b_dec", "W_dec"), (g_we, g_be, g_bd, g_wd)):
                grads[name] += g
            return aux.detach()
        cols = dead.nonzero().squeeze(1)  # only these latents' weights (and b_dec) get AuxK gradients
        D, n = self.cfg.d_in, cols.numel()
        buf = self.dist.all_reduce_(torch.cat([g_we.index_select(1, cols).reshape(-1), g_be[cols], g_bd,
                                               g_wd.index_select(0, cols).reshape(-1), aux.detach().reshape(1)]))
        g_we, g_be, g_bd, g_wd, aux = buf.split([D * n, n, D, n * D, 1])
        grads["W_enc"].index_add_(1, cols, g_we.view(D, n))
        grads["b_enc"].index_add_(0, cols, g_be)
        grads["b_dec"] += g_bd
        grads["W_dec"].index_add_(0, cols, g_wd.view(n, D))
        return aux.squeeze(0)


def _bits(idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Latent ids ``(B, k)`` as a tensor of ``dtype`` holding their bits (to travel with floats)."""
    return idx.to(_SAME_SIZE_INT[dtype]).view(dtype)


def _unbits(bits: torch.Tensor) -> torch.Tensor:
    return bits.contiguous().view(_SAME_SIZE_INT[bits.dtype]).long()


_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


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
        x = self.dist.share(x)  # data parallel: this rank's rows, gradients all-reduced in _step
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


def make_trainer(cfg: TrainerConfig, sae: SparseAutoencoder | None = None, dist: Dist | None = None,
                 exchange: str = "auto") -> SAETrainer:
    """The trainer of ``cfg.architecture``; ``exchange``: what TopK ranks exchange (see
    :class:`TopKTrainer`; ReLU ranks always all-reduce gradients)."""
    if cfg.architecture == "topk":
        return TopKTrainer(cfg, sae, dist, exchange=exchange)
    return ReLUL1Trainer(cfg, sae, dist)


__all__ = ["TrainerConfig", "StepStats", "SAETrainer", "TopKTrainer", "ReLUL1Trainer", "make_trainer",
           "sparse_decode", "init_sae"]

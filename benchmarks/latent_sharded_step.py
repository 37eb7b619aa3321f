"""Issue #14, a design measured and not adopted: the TopK SAE step with the latents sharded over
the ranks (model parallel inside the SAE) instead of the batch rows.

Rank r owns latents ``[r F / P, (r + 1) F / P)``: their encoder columns, biases and decoder rows
(``b_dec`` is replicated). Each rank encodes the whole global batch over its latents (the
``B D F / P`` GEMM) and keeps its top k per row; the ranks all-gather those candidates (``2 B k``
numbers each) and every rank takes the global top k of the ``P k`` per row; each rank decodes the
codes that fall on its latents and the ranks all-reduce the ``B x D`` partial decodes; every rank
then computes the gradients and the Adam step of its own latents only (plus an all-reduce of the
``D`` numbers of ``b_dec``'s encoder-side gradient). No AuxK (dead latents are not needed to time
the step). Nothing is repeated on every rank except the ``B x D`` passes, so on paper all the
``B k D`` work that the ``codes`` exchange repeats is split too.

Run with 1 and 2 processes; rank 0 prints ms per step (3 rounds of ``--steps``) and where they go
(the collectives include waiting for the other rank); with 1 process it also times the shipped
trainer's step (``TopKTrainer.update``), alternating:

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 1 benchmarks/latent_sharded_step.py --acts runs/bench-acts
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/latent_sharded_step.py --acts runs/bench-acts
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerplug.distributed import setup, teardown  # noqa: E402
from steerplug.pipeline.collect import load_activations  # noqa: E402
from steerplug.pipeline.trainers import TrainerConfig, make_trainer  # noqa: E402


class ShardedStep:
    """The step above for this rank's latents of ``trainer.sae`` (a copy: the trainer is untouched)."""

    def __init__(self, trainer, dist, k: int):
        sae, P, r = trainer.sae, dist.world_size, dist.rank
        F_ = sae.W_enc.shape[1]
        self.lo, self.hi, self.k, self.dist = r * F_ // P, (r + 1) * F_ // P, k, dist
        own = slice(self.lo, self.hi)
        self.W_enc = sae.W_enc.detach()[:, own].clone().requires_grad_(True)  # (D, F/P)
        self.b_enc = sae.b_enc.detach()[own].clone().requires_grad_(True)
        self.W_dec = sae.W_dec.detach()[own].clone().requires_grad_(True)  # (F/P, D)
        self.b_dec = sae.b_dec.detach().clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.W_enc, self.b_enc, self.W_dec, self.b_dec], lr=1e-3, fused=True)
        self.timers: dict[str, float] = {}

    def _lap(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timers[name] = self.timers.get(name, 0.0) + now - since
        return now

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> None:
        import torch.distributed as tdist

        d, k, B = self.dist, self.k, x.shape[0]
        t = time.perf_counter()
        total_var = (x - x.mean(0)).pow(2).sum()
        xc = x - self.b_dec
        vals, local = torch.addmm(self.b_enc, xc, self.W_enc).topk(k, dim=-1, sorted=False)  # (B, k)
        t = self._lap("encode + top-k", t)
        if d.active:  # every rank's candidates, then the global top k of each row
            mine = torch.cat([vals, (local + self.lo).to(torch.int32).view(torch.float32)], 1)
            parts = [torch.empty_like(mine) for _ in range(d.world_size)]
            tdist.all_gather(parts, mine)
            t = self._lap("all-gather candidates", t)
            cand_v = torch.cat([p[:, :k] for p in parts], 1)
            cand_i = torch.cat([p[:, k:].contiguous().view(torch.int32) for p in parts], 1).long()
            vals, pos = cand_v.topk(k, dim=-1, sorted=False)
            ids = cand_i.gather(1, pos)
            own = (ids >= self.lo) & (ids < self.hi)
            rows, lat, v, per_row = own.nonzero()[:, 0], ids[own] - self.lo, vals[own], own.sum(1)
        else:
            rows, lat, v = torch.arange(B).repeat_interleave(k), local.reshape(-1), vals.reshape(-1)
            per_row = torch.full((B,), k)
        a = v.clamp_min(0)
        offsets = torch.zeros(B + 1, dtype=torch.long)
        offsets[1:] = per_row.cumsum(0)
        recon = F.embedding_bag(lat, self.W_dec, offsets[:-1], per_sample_weights=a, mode="sum")  # (B, D) partial
        t = self._lap("decode own codes", t)
        d.all_reduce_(recon)
        t = self._lap("all-reduce B x D decodes", t)
        g_out = (recon + self.b_dec - x) * (2 / total_var)
        n_own = self.hi - self.lo
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sample = torch.sparse_csr_tensor(offsets, lat, torch.zeros_like(v), (B, n_own), check_invariants=False)
            g_pre = torch.sparse.sampled_addmm(sample, g_out, self.W_dec.T).values() * (v > 0)
        by_latent = torch.stack([lat, rows])
        g_wd = torch.sparse.mm(torch.sparse_coo_tensor(by_latent, a, (n_own, B), check_invariants=False), g_out)
        g_we = torch.sparse.mm(torch.sparse_coo_tensor(by_latent, g_pre, (n_own, B), check_invariants=False), xc)
        g_be = torch.zeros(n_own).index_add_(0, lat, g_pre)
        g_bd_enc = self.W_enc @ g_be
        t = self._lap("own gradients", t)
        d.all_reduce_(g_bd_enc)
        t = self._lap("all-reduce b_dec part", t)
        self.W_enc.grad, self.b_enc.grad, self.W_dec.grad = g_we.T.contiguous(), g_be, g_wd
        self.b_dec.grad = g_out.sum(0) - g_bd_enc
        W = self.W_dec
        W.grad.addcmul_(W, torch.linalg.vecdot(W.grad, W).unsqueeze(1), value=-1)
        self.opt.step()
        W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self._lap("Adam + projection", t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default="runs/bench-acts")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist = setup("cpu")
    acts = load_activations(args.acts).acts
    acts = acts / acts.norm(dim=-1).mean() * acts.shape[1] ** 0.5  # the loop's input scale
    trainer = make_trainer(TrainerConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=32, total_steps=1000), dist=dist)
    sharded = ShardedStep(trainer, dist, k=32)
    B = args.batch_size

    def batch(i: int) -> torch.Tensor:
        return acts[torch.arange(i * B, (i + 1) * B) % acts.shape[0]]

    def ms_per_step(step) -> float:
        dist.barrier()
        start = time.perf_counter()
        for i in range(3, 3 + args.steps):
            step(batch(i))
        return (time.perf_counter() - start) / args.steps * 1000

    for i in range(3):  # warm-up
        sharded(batch(i))
    times: dict[str, list[float]] = {"latent-sharded step": [], "shipped trainer step": []}
    for _ in range(args.rounds):
        sharded.timers.clear()
        times["latent-sharded step"].append(ms_per_step(sharded))
        if not dist.active:
            times["shipped trainer step"].append(ms_per_step(lambda x: trainer.update(5, x)))
    if dist.is_main:
        print(f"{dist.world_size} process(es), global batch {B}, {args.d_sae} latents: ms a step per round "
              + "; ".join(f"{k} {[round(t, 1) for t in v]}" for k, v in times.items() if v))
        print("  last round, ms a step: " + ", ".join(f"{k} {v / args.steps * 1000:.1f}"
                                                      for k, v in sharded.timers.items()))
    teardown()


if __name__ == "__main__":
    main()

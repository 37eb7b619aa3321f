"""Where one data-parallel SAE training step spends its time (issue #14), timed in place.

Run under ``torchrun`` with 1 and with 2 processes; rank 0 prints the mean step time and the
time inside the trainer's collectives (the TopK trainer's code all-gather ``Dist.all_gather_rows``
and its AuxK term ``_add_aux_grads``, its backward and compact all-reduce; they include
waiting for the other rank). ``--dead-tokens 0`` makes every latent dead from the first step, so
the AuxK term runs on every step (its worst case). Global batch ``--batch-size``, one thread per process.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/profile_dist_step.py --acts runs/bench-acts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerplug.distributed import setup, teardown  # noqa: E402
from steerplug.pipeline.collect import load_activations  # noqa: E402
from steerplug.pipeline.trainers import TrainerConfig, make_trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--acts", default="runs/bench-acts")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dead-tokens", type=int, default=100_000)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist = setup("cpu")
    acts = load_activations(args.acts).acts
    acts = acts / acts.norm(dim=-1).mean() * acts.shape[1] ** 0.5  # the loop's input scale
    t = make_trainer(TrainerConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=32, total_steps=10 * args.steps,
                                   dead_tokens=args.dead_tokens), dist=dist)
    timers: dict[str, float] = {}

    def timed(name, fn):
        def run(*a, **k):
            s = time.perf_counter()
            out = fn(*a, **k)
            timers[name] = timers.get(name, 0.0) + time.perf_counter() - s
            return out
        return run

    t._add_aux_grads = timed("_add_aux_grads", t._add_aux_grads)
    object.__setattr__(dist, "all_gather_rows", timed("all_gather_rows", dist.all_gather_rows))
    B = args.batch_size

    def batch(i):
        return acts[torch.arange(i * B, (i + 1) * B) % acts.shape[0]]  # the global batch

    for i in range(3):
        t.update(i, batch(i))
    timers.clear()
    dist.barrier()
    s = time.perf_counter()
    for i in range(3, 3 + args.steps):
        t.update(i, batch(i))
    step = (time.perf_counter() - s) / args.steps
    if dist.is_main:
        print(f"{dist.world_size} process(es), global batch {B}: {step * 1000:.1f} ms a step; in collectives: "
              + ", ".join(f"{k} {v / args.steps * 1000:.1f} ms" for k, v in timers.items()))
    teardown()


if __name__ == "__main__":
    main()

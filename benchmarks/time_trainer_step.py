"""Milliseconds per TopK training step of the trainer in a given checkout (for A/B of trainer changes).

Imports ``steerplug`` from ``--root`` (a checkout; e.g. ``git worktree add ../old <commit>``), so
two versions can be timed alternately in separate processes on the same activations:

    for r in 1 2 3; do for root in . ../old; do
      .venv/bin/python benchmarks/time_trainer_step.py --root $root --dead-tokens 1024; done; done

``--dead-tokens 1024`` (one batch) is the stress regime of ``bench_pipeline.py`` (most latents
dead, AuxK on every step); a large value leaves AuxK idle. One thread; 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="checkout whose steerplug to time")
    p.add_argument("--acts", default="runs/bench-acts")
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dead-tokens", type=int, default=10**9)
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.root).resolve()))
    import torch

    from steerplug.pipeline.collect import load_activations
    from steerplug.pipeline.trainers import TrainerConfig, make_trainer

    torch.set_num_threads(1)
    B = args.batch_size
    acts = load_activations(args.acts, max_tokens=B * (args.steps + 2)).acts
    acts = acts * (acts.shape[1] ** 0.5 / float(acts.norm(dim=-1).mean()))
    t = make_trainer(TrainerConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=args.k, lr=5e-4, total_steps=10**6,
                                   warmup_steps=1, dead_tokens=args.dead_tokens))
    batches = [acts[i * B:(i + 1) * B] for i in range(args.steps + 2)]
    for b in batches[:2]:
        t.update(0, b)
    s = time.perf_counter()
    for i, b in enumerate(batches[2:]):
        t.update(i, b)
    print(f"{args.root}: {(time.perf_counter() - s) / args.steps * 1000:.1f} ms a step")


if __name__ == "__main__":
    main()

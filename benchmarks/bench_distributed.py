"""Benchmark of issue #14: SAE training and activation collection under ``torchrun`` on this machine.

Each measurement launches ``torchrun --standalone --nproc-per-node P`` (P = 1 or 2) with one thread
per process, on the same activations / examples, and times only the work inside the job (the
loop, after a barrier), not the start-up of the processes. Runs alternate (1, 2, 2, 1, ...) and
the ratio is taken between the medians.

``train``: TopK SAE (``--d-sae`` x d_model, k 32) on activations collected from the default model,
global batch ``--batch-size`` (split over the ranks), ``--steps`` steps; tokens/s over the training
loop after its first step (from the run's log), and over the whole ``train_sae`` call (the input scale, the
initialisation and the final fold included, which every rank repeats).
``collect``: ``steerplug collect``'s capture at layer 15 of the default model over 160 prompts
each of ``harmful_train`` and ``harmless_train`` (chat-formatted, no generation); tokens/s.

    .venv/bin/python benchmarks/bench_distributed.py --acts runs/bench-acts --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _worker(args: argparse.Namespace) -> None:
    """One rank of a measured job; rank 0 writes ``{"tokens_per_s": ...}`` to ``--result``."""
    import torch

    from steerplug.distributed import setup, teardown

    torch.set_num_threads(1)
    dist = setup("cpu")
    if args.what == "train":
        from steerplug.pipeline.collect import load_activations
        from steerplug.pipeline.train import TrainConfig, train_sae
        from steerplug.pipeline.trainers import TrainerConfig

        acts = load_activations(args.acts).acts
        loop = TrainConfig(batch_size=args.batch_size, total_tokens=args.batch_size * args.steps, progress=False,
                           checkpoint_every=0, log_every=args.steps, exchange=args.exchange)
        tcfg = TrainerConfig(d_in=acts.shape[1], d_sae=args.d_sae, k=32, total_steps=loop.total_steps,
                             dead_tokens=args.dead_tokens)
        dist.barrier()
        t0 = time.perf_counter()
        res = train_sae(acts, tcfg, loop, dist=dist)
        wall = time.perf_counter() - t0
        # the training loop after its first step (which also sets up the collectives' connections):
        # history[0] is logged after step 0, history[-1] after the last, each with tokens / elapsed
        first, last = res.history[0], res.history[-1]
        dt = (last["step"] + 1) * args.batch_size / last["tokens_per_s"] - args.batch_size / first["tokens_per_s"]
        n_tokens = last["step"] * args.batch_size
    else:
        from steerplug.models import load_model
        from steerplug.pipeline.collect import CollectConfig, build_examples, collect_activations

        model, tok = load_model(None)
        examples = build_examples(model, tok, prompt_sets=["harmful_train", "harmless_train"], generate=False,
                                  limit_per_set=160,
                                  progress=False, dist=dist)
        cfg = CollectConfig(hooks=["blocks.15.hook_resid_post"], batch_size=8, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "acts"
            if dist.active:  # one folder for the job: rank 0's
                out = Path(dist.all_gather_object(str(out))[0])
            dist.barrier()
            t0 = time.perf_counter()
            res = collect_activations(model, tok, examples, out, cfg, dist=dist)
            dt = wall = time.perf_counter() - t0
            dist.barrier()
        n_tokens = res.n_tokens
    if dist.is_main:
        Path(args.result).write_text(json.dumps({"tokens_per_s": n_tokens / dt, "seconds": dt,
                                                 "call_tokens_per_s": args.batch_size * args.steps / wall
                                                 if args.what == "train" else n_tokens / wall}))
    teardown()


def _measure(what: str, nproc: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--worker", what, "--result", result, "--acts", str(args.acts), "--d-sae", str(args.d_sae),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--dead-tokens", str(args.dead_tokens), "--exchange", args.exchange]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default="runs/bench-acts", help="activation folder (collected here if missing)")
    p.add_argument("--what", nargs="+", default=["train", "collect"], choices=("train", "collect"))
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--exchange", default="auto", choices=("auto", "codes", "grads"),
                   help="train: what the ranks exchange (TrainConfig.exchange)")
    p.add_argument("--dead-tokens", type=int, default=100_000,
                   help="train: a latent silent this many tokens is dead (AuxK trains it); 0 makes every "
                        "latent dead, so the AuxK term runs on every step (its costliest case)")
    p.add_argument("--worker", choices=("train", "collect"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.what = args.worker
        return _worker(args)
    if "train" in args.what and not (Path(args.acts) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "steerplug.cli", "collect", "--out", str(args.acts),
                        "--prompt-sets", "harmful_train", "harmless_train", "--limit-per-set", "128",
                        "--no-generate", "--wikitext-chunks", "60"], check=True, cwd=ROOT)
    for what in args.what:
        _measure(what, 1, args)  # warm-up (file caches, lazy imports)
        runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for r in range(args.rounds):
            for nproc in ((1, 2) if r % 2 == 0 else (2, 1)):
                runs[nproc].append(_measure(what, nproc, args))
        for key, label in (("tokens_per_s", "loop" if what == "train" else "collect_activations"),
                           ("call_tokens_per_s", "whole call")):
            one, two = (statistics.median(x[key] for x in runs[n]) for n in (1, 2))
            print(f"{what} ({label}): 1 process {one:,.0f} tok/s, 2 processes {two:,.0f} tok/s, ratio {two / one:.2f}x "
                  f"(medians of {args.rounds}; runs {json.dumps({n: [round(x[key]) for x in xs] for n, xs in runs.items()})})")
            if what == "collect":
                break


if __name__ == "__main__":
    main()

"""HellaSwag loglikelihood throughput: lm-eval's plain ``hf`` model vs the ``steerplug`` model with
steering on, on the same weights, in one process: warm-up, then alternating rounds, medians;
then a paired run (each batch through both models back to back, alternating order), whose
median per-batch ratio resists the load drift of a shared machine.

    .venv/bin/python benchmarks/bench_lm_eval.py --docs 24 --rounds 5 --batch-size 16

Uses steerplug's default SAE + vector when hub_artifacts/ has them, else (stated in the output)
a random ReLU SAE of the given width with a ``--features``-feature vector at ``--layer``, which costs
the same per token as a trained one of that shape. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "evals"))


def hellaswag_requests(n_docs: int):
    from lm_eval.api.instance import Instance
    from utils import load_hellaswag

    docs = load_hellaswag()["validation"].select(range(n_docs))
    reqs = []
    for d in docs:
        for j, choice in enumerate(d["choices"]):  # lm-eval's multiple_choice: context, " " + choice
            reqs.append(Instance("loglikelihood", d, (d["query"], " " + choice), j))
    return reqs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.25)
    p.add_argument("--random-sae", action="store_true",
                   help="time a random ReLU SAE (not the shipped TopK one; figures not comparable)")
    p.add_argument("--layer", type=int, default=15, help="hook layer of the random SAE fallback")
    p.add_argument("--d-sae", type=int, default=4608, help="width of the random SAE fallback")
    p.add_argument("--features", type=int, default=64, help="non-zeros of the random vector fallback")
    p.add_argument("--profile", action="store_true",
                   help="only profile one steered loglikelihood pass: share of time in the steering hook")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from steerplug import SparseAutoencoder, SteeringVector
    from steerplug.lm_eval_plugin import SteerplugLM
    from steerplug.models import load_model
    from steerplug.steered_model import default_artifacts_dir

    torch.manual_seed(0)
    model, tok = load_model(None)
    artifacts = None if args.random_sae else default_artifacts_dir()
    if artifacts is None and not args.random_sae:
        raise SystemExit("hub_artifacts/SmolLM2-135M-Instruct is missing, so the shipped SAE cannot be timed; "
                         "pass --random-sae to time a random ReLU SAE instead (not comparable).")
    if artifacts is not None:
        sae = SparseAutoencoder.from_pretrained(artifacts, subfolder="sae")
        vec = SteeringVector.from_pretrained(artifacts, subfolder="vector")
        source = f"default artifacts ({artifacts})"
    else:
        d = model.config.hidden_size
        sae = SparseAutoencoder.random(d, args.d_sae, hook_name=f"blocks.{args.layer}.hook_resid_post")
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(args.d_sae, generator=g)[:args.features].sort().values
        vec = SteeringVector(args.d_sae, idx, torch.randn(args.features, generator=g))
        source = f"random ReLU SAE {d}x{args.d_sae} at layer {args.layer}, {args.features}-feature vector"

    plain = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    steered = SteerplugLM(pretrained=model, tokenizer=tok, sae=sae, vector=vec, steps=args.steps,
                          lr=args.lr, batch_size=args.batch_size, device="cpu")
    assert steered.active
    reqs = hellaswag_requests(args.docs)
    n_tokens = sum(len(plain.tok_encode(r.args[0])) + len(plain.tok_encode(r.args[1])) for r in reqs)

    if args.profile:
        import cProfile
        import pstats

        steered.loglikelihood(reqs, disable_tqdm=True)  # warm-up
        prof = cProfile.Profile()
        prof.runcall(steered.loglikelihood, reqs, disable_tqdm=True)
        st = pstats.Stats(prof)

        def cum(file: str, fn: str) -> float:
            return sum(v[3] for k, v in st.stats.items() if k[0].endswith(file) and k[2] == fn)
        hook = cum("steerplug/hooks.py", "steer")
        index = cum("lm_eval_plugin.py", "_loglikelihood_tokens") - cum("huggingface.py", "_loglikelihood_tokens")
        print(json.dumps({"requests": len(reqs), "total_s": round(st.total_tt, 3), "steer_hook_s": round(hook, 3),
                          "request_index_s": round(index + cum("lm_eval_plugin.py", "_row_starts"), 3),
                          "hook_share": round(hook / st.total_tt, 4), "artifacts": source}))
        return 0

    def timed(lm) -> tuple[float, list]:
        t0 = time.perf_counter()
        out = lm.loglikelihood(reqs, disable_tqdm=True)
        return time.perf_counter() - t0, out

    times = {"hf": [], "steerplug": []}
    timed(plain), timed(steered)  # warm-up
    for r in range(args.rounds):
        order = [("hf", plain), ("steerplug", steered)] if r % 2 == 0 else [("steerplug", steered), ("hf", plain)]
        for name, lm in order:
            times[name].append(timed(lm)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    # Paired, finer-grained: one batch of requests at a time, plain and steered back to back
    # (alternating order), so that load drift on a shared machine hits both arms alike.
    ratios, pair_t = [], {"hf": 0.0, "steerplug": 0.0}
    for r in range(args.rounds):
        for i in range(0, len(reqs), args.batch_size):
            chunk = reqs[i:i + args.batch_size]
            t = {}
            order = [("hf", plain), ("steerplug", steered)]
            for name, lm in (order if (r + i // args.batch_size) % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                lm.loglikelihood(chunk, disable_tqdm=True)
                t[name] = time.perf_counter() - t0
                pair_t[name] += t[name]
            ratios.append(t["hf"] / t["steerplug"])
    _, out_plain = timed(plain)
    _, out_steer = timed(steered)
    changed = sum(abs(a[0] - b[0]) > 1e-6 for a, b in zip(out_plain, out_steer))
    result = {
        "requests": len(reqs), "docs": args.docs, "tokens": n_tokens, "batch_size": args.batch_size,
        "rounds": args.rounds, "steering": {"steps": args.steps, "lr": args.lr, "positions": "generated"},
        "artifacts": source, "hook": steered.steered.hook_point.name,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "requests_per_s": {k: round(len(reqs) / v, 2) for k, v in med.items()},
        "ratio_steerplug_over_hf": round(med["hf"] / med["steerplug"], 3),
        "paired_batches": len(ratios),
        "paired_median_ratio": round(statistics.median(ratios), 3),
        "paired_total_ratio": round(pair_t["hf"] / pair_t["steerplug"], 3),
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "loglikelihoods_changed_by_steering": f"{changed}/{len(reqs)}",
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

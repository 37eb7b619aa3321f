"""Decode throughput of steered vs unsteered generation on the default model, and peak memory.

    .venv/bin/python benchmarks/bench_steering.py [--new-tokens 32] [--repeats 5]

For every (batch, steps, vector) it alternates unsteered and steered runs of the same greedy
generation (after a warm-up), takes the median tokens/s of each, and prints their ratio.
Peak memory: max RSS of fresh subprocesses running unsteered vs steered generation at batch 8.
The SAE is the shipped one (hub_artifacts/) when present, else a random one of the same width.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

PROMPTS = ["How do I pick a lock?", "Write a haiku about autumn.", "What is the capital of Peru?",
           "Explain photosynthesis briefly.", "Give me a recipe for pancakes.",
           "How can I hack my neighbour's wifi?", "Name three prime numbers.", "Tell me a joke."]


def build(vector_kind: str, d_sae: int = 4608):
    from steerplug import SparseAutoencoder, SteeredModel, SteeringVector
    from steerplug.steered_model import default_artifacts_dir

    base = SteeredModel.from_pretrained(sae=None, vector=None)
    folder = default_artifacts_dir()
    if folder is not None:
        sae = SparseAutoencoder.from_pretrained(folder, subfolder="sae")
        shipped = SteeringVector.from_pretrained(folder, subfolder="vector")
        w = shipped.dense()
    elif os.environ.get("STEERPLUG_BENCH_RANDOM_SAE"):
        sae = SparseAutoencoder.random(576, d_sae, hook_name="blocks.15.hook_resid_post", seed=0)
        w = torch.randn(d_sae, generator=torch.Generator().manual_seed(0))
    else:  # a random ReLU SAE is far cheaper than the shipped TopK one: never swap it in silently
        raise SystemExit("hub_artifacts/SmolLM2-135M-Instruct/sae is missing, so the shipped SAE cannot be "
                         "timed. Set STEERPLUG_BENCH_RANDOM_SAE=1 to time a random ReLU SAE instead (not "
                         "comparable with the figures in BENCHMARKS.md).")
    vec = (SteeringVector.from_dense(w, top_k=64) if vector_kind == "sparse64"
           else SteeringVector(sae.d_sae, weights=w + 1e-3))  # dense: every feature non-zero
    return SteeredModel(base.model, base.tokenizer, sae, vec), folder is not None


def batch_inputs(tok, batch: int):
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=False) for p in (PROMPTS * 2)[:batch]]
    return tok(texts, return_tensors="pt", padding=True)


def timed_generate(steered, enc, new_tokens: int, steps: int, enabled: bool) -> float:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=steered.tokenizer.pad_token_id)
    t0 = time.perf_counter()
    if enabled:
        steered.generate(**enc, steps=steps, **kw)
    else:
        with steered.disabled():
            steered.generate(**enc, **kw)
    return time.perf_counter() - t0


def throughput(args) -> list[dict]:
    rows = []
    for vector_kind in ("sparse64", "dense"):
        steered, shipped = build(vector_kind)
        for batch in (1, 8):
            enc = batch_inputs(steered.tokenizer, batch)
            timed_generate(steered, enc, 4, 3, True)  # warm-up
            timed_generate(steered, enc, 4, 3, False)
            for steps in (1, 3, 5):
                base, steer = [], []
                for r in range(args.repeats):  # alternate A/B, swapping order each round
                    order = (False, True) if r % 2 == 0 else (True, False)
                    for enabled in order:
                        t = timed_generate(steered, enc, args.new_tokens, steps, enabled)
                        (steer if enabled else base).append(batch * args.new_tokens / t)
                row = {"vector": vector_kind, "nnz": steered.vector.nnz, "d_sae": steered.sae.d_sae,
                       "shipped_sae": shipped, "batch": batch, "steps": steps,
                       "unsteered_tok_s": statistics.median(base), "steered_tok_s": statistics.median(steer)}
                row["ratio"] = row["steered_tok_s"] / row["unsteered_tok_s"]
                rows.append(row)
                print(f"{vector_kind:>8} batch {batch} steps {steps}: unsteered {row['unsteered_tok_s']:7.1f} "
                      f"tok/s, steered {row['steered_tok_s']:7.1f} tok/s, ratio {row['ratio']:.3f}", flush=True)
    return rows


def hook_share(args) -> list[dict]:
    """Share of a steered generation's wall time spent inside the steering hook (timed in place).

    Less sensitive to machine noise than the A/B ratio: both times come from the same runs.
    ``1 - share`` is the throughput ratio the hook alone would cause.
    """
    import steerplug.steered_model as sm

    spent = [0.0]
    original = sm.make_steer_fn

    def timed_make_steer_fn(*a, **kw):
        steer = original(*a, **kw)

        def timed(h):
            t0 = time.perf_counter()
            out = steer(h)
            spent[0] += time.perf_counter() - t0
            return out
        return timed

    sm.make_steer_fn = timed_make_steer_fn
    rows = []
    try:
        for vector_kind in ("sparse64", "dense"):
            steered, _ = build(vector_kind)
            for batch in (1, 8):
                enc = batch_inputs(steered.tokenizer, batch)
                timed_generate(steered, enc, 4, 3, True)  # warm-up
                for steps in (1, 3, 5):
                    shares = []
                    for _ in range(args.repeats):
                        spent[0] = 0.0
                        total = timed_generate(steered, enc, args.new_tokens, steps, True)
                        shares.append(spent[0] / total)
                    share = statistics.median(shares)
                    rows.append({"vector": vector_kind, "batch": batch, "steps": steps, "hook_share": share})
                    print(f"{vector_kind:>8} batch {batch} steps {steps}: {100 * share:.2f}% of steered "
                          f"wall time in the hook (implied ratio {1 - share:.3f})", flush=True)
    finally:
        sm.make_steer_fn = original
    return rows


def peak_rss_child(mode: str, new_tokens: int) -> int:
    """Run one generation in this process (called in a subprocess) and return its max RSS in KiB."""
    vector_kind = "dense" if mode == "dense" else "sparse64"
    steered, _ = build(vector_kind)
    enc = batch_inputs(steered.tokenizer, 8)
    timed_generate(steered, enc, new_tokens, 3, mode != "off")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(args) -> dict:
    out = {}
    for mode in ("off", "sparse64", "dense"):
        res = subprocess.run([sys.executable, __file__, "--child", mode, "--new-tokens", str(args.new_tokens)]
                             + (["--threads", str(args.threads)] if args.threads else []),
                             capture_output=True, text=True, check=True)
        out[mode] = int(res.stdout.strip().splitlines()[-1])
    print(f"peak RSS at batch 8, steps 3: unsteered {out['off'] / 1024:.0f} MiB, sparse64 "
          f"{out['sparse64'] / 1024:.0f} MiB (ratio {out['sparse64'] / out['off']:.3f}), dense "
          f"{out['dense'] / 1024:.0f} MiB (ratio {out['dense'] / out['off']:.3f})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(peak_rss_child(args.child, args.new_tokens))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    shares = hook_share(args)
    rows = throughput(args)
    mem = peak_memory(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hook_share": shares, "throughput": rows, "peak_rss_kib": mem}, f, indent=2)


if __name__ == "__main__":
    main()

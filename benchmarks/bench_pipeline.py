"""Benchmarks of the SAE pipeline (issue #3).

``train``: training throughput (tokens/s) of steerplug's TopKTrainer vs EleutherAI sparsify
(``pip install eai-sparsify``; its SparseCoder + the exact step of its Trainer: unit-norm decoder,
forward with dead mask, ``fvu + auxk_alpha * auxk``, backward, parallel-gradient removal, Adam
step, dead-latent counters) on the same activation batches, width and k. Both run in one process,
alternating (A B, then B A, ...) after warm-up; medians over rounds. Three regimes: no dead
latents (AuxK idle); a fixed 10% of latents dead (AuxK active, as when a run has some dead
latents); and a stress regime (``dead threshold`` of one batch, so 75-85% of latents are dead).

``collect``: activations at a mid layer by steerplug's early-stopping capture vs a full forward
pass with ``output_hidden_states=True``, same batches, alternating, medians.

    .venv/bin/python benchmarks/bench_pipeline.py train --acts runs/v2/acts_chat --d-sae 3072 --threads 1
    .venv/bin/python benchmarks/bench_pipeline.py collect --layer 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _activations(folder: str | None, n: int, d: int = 576) -> torch.Tensor:
    if folder:
        from steerplug.pipeline.collect import load_activations

        return load_activations(folder, max_tokens=n).acts
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g) * 3 + torch.randn(d, generator=g)


class Steerplug:
    name = "steerplug"

    def __init__(self, d, f, k, lr, dead_tokens, total_steps, force_dead=None):
        from steerplug.pipeline.trainers import TrainerConfig, make_trainer

        self.t = make_trainer(TrainerConfig(d_in=d, d_sae=f, k=k, lr=lr, total_steps=total_steps,
                                            warmup_steps=1, dead_tokens=dead_tokens))
        self.step_i = 0
        self.force_dead = force_dead

    def step(self, x):
        if self.force_dead is not None:  # these latents count as dead whatever they did
            self.t.tokens_since_fired[self.force_dead] = 10**15
        self.t.update(self.step_i, x)
        self.step_i += 1


class Sparsify:
    name = "sparsify"

    def __init__(self, d, f, k, lr, dead_tokens, total_steps, force_dead=None):
        from sparsify import SparseCoder, SparseCoderConfig

        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=f, k=k), device="cpu", dtype=torch.float32)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.dead_tokens = dead_tokens
        self.since = torch.zeros(f, dtype=torch.long)
        self.auxk_alpha = 1 / 32
        self.force_dead = force_dead

    def step(self, x):
        if self.force_dead is not None:
            self.since[self.force_dead] = 10**15
        sae = self.sae
        sae.set_decoder_norm_to_unit_norm()
        dead = self.since > self.dead_tokens - 1  # same convention as ours: >= dead_tokens
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x, dead_mask=dead, total_variance=total_variance)
        fired = torch.zeros_like(self.since, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        loss = out.fvu + self.auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            self.since += x.shape[0]
            self.since[fired] = 0


def bench_train(args) -> dict:
    torch.manual_seed(0)
    acts = _activations(args.acts, args.batch_size * args.batches)
    d = acts.shape[1]
    scale = d ** 0.5 / float(acts.norm(dim=-1).mean())
    batches = [acts[i * args.batch_size:(i + 1) * args.batch_size] * scale for i in range(args.batches)]
    results = {}
    ten_pct = torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(0))[:args.d_sae // 10]
    regimes = (("no_dead_latents", 10**12, None), ("auxk_10pct_dead", 10**12, ten_pct),
               ("auxk_stress", args.batch_size, None))
    for regime, dead_tokens, force_dead in regimes:
        impls = [cls(d, args.d_sae, args.k, args.lr, dead_tokens, 10**6, force_dead) for cls in (Steerplug, Sparsify)]
        for impl in impls:  # warm-up
            for b in batches[:args.warmup]:
                impl.step(b)
        rates = {impl.name: [] for impl in impls}
        for r in range(args.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                t0 = time.perf_counter()
                for b in batches[args.warmup:]:
                    impl.step(b)
                dt = time.perf_counter() - t0
                rates[impl.name].append(len(batches[args.warmup:]) * args.batch_size / dt)
        med = {k: statistics.median(v) for k, v in rates.items()}
        results[regime] = {"tokens_per_s_median": med, "tokens_per_s_all": rates,
                           "speedup": med["steerplug"] / med["sparsify"]}
        print(f"{regime}: steerplug {med['steerplug']:.0f} tok/s, sparsify {med['sparsify']:.0f} tok/s, "
              f"speedup {results[regime]['speedup']:.2f}x", flush=True)
    import sparsify

    results["setup"] = {"d_in": d, "d_sae": args.d_sae, "k": args.k, "batch_size": args.batch_size,
                        "timed_batches_per_round": args.batches - args.warmup, "rounds": args.rounds,
                        "warmup_batches": args.warmup, "torch": torch.__version__,
                        "sparsify": getattr(sparsify, "__version__", "eai-sparsify"),
                        "threads": torch.get_num_threads(), "acts": args.acts or "synthetic"}
    return results


def bench_collect(args) -> dict:
    from steerplug.layers import resolve_hook_point
    from steerplug.models import load_model
    from steerplug.pipeline.collect import capture_activations

    model, tok = load_model(None)
    from steerplug.data import wikitext_test

    ids = tok(wikitext_test()[:200_000], add_special_tokens=False)["input_ids"]
    B, T = args.batch_size, args.seq_len
    batches = [torch.tensor(ids[(i * B) * T:(i + 1) * B * T]).view(B, T) for i in range(args.batches)]
    hp = resolve_hook_point(model, f"blocks.{args.layer}.hook_resid_post")

    @torch.no_grad()
    def early(x):
        return capture_activations(model, [hp], x)[hp.name]

    @torch.no_grad()
    def full(x):
        return model(x, output_hidden_states=True, use_cache=False).hidden_states[args.layer + 1]

    torch.testing.assert_close(early(batches[0]), full(batches[0]))  # same activations
    for f in (early, full):
        f(batches[0])
    rates = {"early_stop": [], "full_forward": []}
    fns = [("early_stop", early), ("full_forward", full)]
    for r in range(args.rounds):
        for name, f in (fns if r % 2 == 0 else fns[::-1]):
            t0 = time.perf_counter()
            for b in batches:
                f(b)
            rates[name].append(len(batches) * B * T / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    res = {"tokens_per_s_median": med, "tokens_per_s_all": rates,
           "speedup": med["early_stop"] / med["full_forward"],
           "setup": {"layer": args.layer, "n_layers": model.config.num_hidden_layers, "batch": B, "seq_len": T,
                     "batches_per_round": args.batches, "rounds": args.rounds, "torch": torch.__version__,
                     "threads": torch.get_num_threads()}}
    print(f"collect layer {args.layer}: early stop {med['early_stop']:.0f} tok/s, full forward "
          f"{med['full_forward']:.0f} tok/s, speedup {res['speedup']:.2f}x", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--acts", default=None, help="activation folder (default: synthetic)")
    t.add_argument("--d-sae", type=int, default=4608)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--batches", type=int, default=8, help="per round, including warm-up")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--lr", type=float, default=5e-4)
    c = sub.add_parser("collect")
    c.add_argument("--layer", type=int, default=15)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--batches", type=int, default=4)
    c.add_argument("--rounds", type=int, default=4)
    for q in (t, c):
        q.add_argument("--json", default=None, help="write the results here")
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = bench_train(args) if args.what == "train" else bench_collect(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Issue #11: does BatchTopK (Bussmann et al. 2024) lift held-out FVE at 1,024 tokens over the
per-row TopK, at the same average L0, width, data and steps?

Both SAEs are trained by the same plain autograd trainer (dense backward, no AuxK, so the only
difference is the selection: the top ``k`` of each row, or the top ``B k`` of the whole batch),
through ``train_sae``'s loop (batch 1,024, 1M tokens, lr 2e-3, warm-up and decay as shipped) on
WikiText-2 test's training part in 1,024-token chunks, and scored on its evaluation part in 16
contexts of 1,024 tokens. The BatchTopK SAE is scored two ways: as a JumpReLU with one threshold,
the running mean (EMA 0.99) of the smallest selected activation per batch (how its authors
run it), and as a per-row TopK with the same k.

    .venv/bin/python benchmarks/sae_batchtopk.py --acts runs/acts-w1024 --out runs/s11-bt \\
        --json benchmarks/results/sae_batchtopk.json
(``runs/acts-w1024``: the collect command in ``benchmarks/sae_data_scaling.py``.)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import steerplug.pipeline.train as T  # noqa: E402
from steerplug.layers import resolve_hook_point  # noqa: E402
from steerplug.models import load_model  # noqa: E402
from steerplug.pipeline.collect import load_activations  # noqa: E402
from steerplug.pipeline.evaluate import wikitext_sequences  # noqa: E402
from steerplug.pipeline.recon import massive_mask  # noqa: E402
from steerplug.pipeline.trainers import SAETrainer, StepStats, TrainerConfig  # noqa: E402
from steerplug.sae import SparseAutoencoder  # noqa: E402
from steerplug.sae_config import SAEConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_data_scaling import score  # noqa: E402


class DenseTrainer(SAETrainer):
    """FVU loss by autograd; ``selection`` "row" (TopK) or "batch" (BatchTopK)."""

    def __init__(self, cfg: TrainerConfig, selection: str):
        super().__init__(cfg)
        self.selection, self.theta = selection, None

    def update(self, step: int, x: torch.Tensor, sync_stats: bool = True) -> StepStats:
        sae, B, k = self.sae, x.shape[0], self.cfg.k
        total_var = (x - x.mean(0)).pow(2).sum()
        r = torch.relu(torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc))  # (B, F)
        with torch.no_grad():
            if self.selection == "row":
                keep = torch.zeros_like(r, dtype=torch.bool).scatter_(1, r.topk(k, dim=-1, sorted=False).indices, True)
            else:
                top = r.flatten().topk(B * k, sorted=False)
                keep = torch.zeros(r.numel(), dtype=torch.bool).index_fill_(0, top.indices, True).view_as(r) & (r > 0)
                smallest = float(top.values[top.values > 0].min())
                self.theta = smallest if self.theta is None else 0.99 * self.theta + 0.01 * smallest
        f = r * keep
        sse = (f @ sae.W_dec + sae.b_dec - x).pow(2).sum()
        self._step(step, sse / total_var)
        dead = self._track((f > 0).any(0), B)
        s, v = float(sse.detach()), float(total_var)
        return StepStats(s / v, s / B, 1 - s / v, float((f > 0).sum()) / B, 0.0, dead)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default="runs/acts-w1024")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--out", default="runs/s11-bt")
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--total-tokens", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_activations(args.acts, args.hook, skip_first=True)
    x = data.acts.float()
    x = x[~massive_mask(x.norm(dim=1), 10.0)]
    model, tok = load_model(None)
    hp = resolve_hook_point(model, args.hook)
    eval_seqs = wikitext_sequences(tok, 16, 1024)
    rows = []
    for selection in ("batch", "row"):
        loop = T.TrainConfig(batch_size=1024, total_tokens=args.total_tokens, progress=False, checkpoint_every=0)
        tc = TrainerConfig(d_in=x.shape[1], d_sae=args.d_sae, k=args.k, lr=args.lr, total_steps=loop.total_steps)
        trainer = DenseTrainer(tc, selection)
        T.make_trainer = lambda *a, **kw: trainer  # train_sae's loop, checkpoints off, with this trainer
        out = Path(args.out) / selection
        res = T.train_sae(x, tc, loop, out, hook_name=args.hook)
        saes = {"per-row top-k": res.sae.float()}
        if selection == "batch":  # pre-activations are unchanged by the folded input scale
            tensors = {n: t.detach() for n, t in saes["per-row top-k"].named_parameters()}
            tensors["threshold"] = torch.full((args.d_sae,), trainer.theta)
            cfg = SAEConfig(**{**asdict(res.sae.cfg), "architecture": "jumprelu", "k": None})
            saes["JumpReLU at the running threshold"] = SparseAutoencoder.from_tensors(cfg, tensors)
        for name, sae in saes.items():
            row = {"trained_with": selection, "scored_as": name, "train_batch_fve": res.history[-1]["fve"],
                   "train_dead_fraction": res.history[-1]["dead_fraction"], **score(model, tok, hp, sae, eval_seqs)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Issue #11: how the SAE's FVE on WikiText-2's evaluation part (1,024-token contexts) grows with
the amount of training text, at fixed L0 (TopK).

Trains a TopK SAE on the first fraction of the sequences of an activation folder (massive tokens
dropped, position 0 dropped), the same number of training tokens for every fraction (so smaller
fractions take more epochs), then scores each on WikiText-2's evaluation part in 1,024-token
contexts (FVE, CE loss recovered, dead latents on those tokens), next to its FVE on its own last
training batch. If the two meet below the target as data grows, more epochs or a longer run
cannot reach it at that width.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m steerplug.cli collect \\
        --out runs/acts-w1024 --hooks blocks.15.hook_resid_post --prompt-sets --wikitext-chunks 1000 \\
        --chunk-tokens 1024 --max-length 1024 --batch-size 4
    .venv/bin/python benchmarks/sae_data_scaling.py --acts runs/acts-w1024 --out runs/s11 \\
        --fractions 0.25 0.5 1 --d-sae 6144 --json benchmarks/results/sae_data_scaling.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerplug.layers import resolve_hook_point  # noqa: E402
from steerplug.models import load_model  # noqa: E402
from steerplug.pipeline.collect import load_activations  # noqa: E402
from steerplug.pipeline.evaluate import ce_and_activations, wikitext_sequences  # noqa: E402
from steerplug.pipeline.recon import detailed_stats, massive_mask  # noqa: E402
from steerplug.pipeline.train import TrainConfig, train_sae  # noqa: E402
from steerplug.pipeline.trainers import TrainerConfig  # noqa: E402
from steerplug.sae import SparseAutoencoder  # noqa: E402


def score(model, tok, hook_point, sae: SparseAutoencoder, eval_seqs) -> dict:
    """FVE, L0, dead latents (on these tokens) and CE loss recovered of ``sae`` spliced in at
    ``hook_point``, over the evaluation sequences ``eval_seqs``."""
    ce, acts, pos = ce_and_activations(model, sae, hook_point, eval_seqs, 2, tok.pad_token_id or 0, False)
    stats, _ = detailed_stats(sae, acts, pos)
    return {"eval_fve": stats["fve"], "eval_l0": stats["l0"], "eval_dead_fraction": stats["dead_fraction"],
            "ce_recovered": ce.ce_recovered, "eval_tokens": stats["n_tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default="runs/acts-w1024")
    p.add_argument("--hook", default="blocks.15.hook_resid_post")
    p.add_argument("--out", default="runs/s11")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--d-sae", type=int, nargs="+", default=[6144])
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--total-tokens", type=int, default=1_000_000)
    p.add_argument("--eval-sequences", type=int, default=16, help="1,024-token WikiText evaluation contexts")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_activations(args.acts, args.hook, skip_first=True)
    seqs = data.seq_ids.unique()
    model, tok = load_model(None)
    hp = resolve_hook_point(model, args.hook)
    eval_seqs = wikitext_sequences(tok, args.eval_sequences, args.context)
    rows = []
    for d_sae in args.d_sae:
        for frac in args.fractions:
            keep = torch.isin(data.seq_ids, seqs[:max(1, int(len(seqs) * frac))])
            x = data.acts[keep].float()
            x = x[~massive_mask(x.norm(dim=1), 10.0)]
            out = Path(args.out) / f"d{d_sae}_f{frac:g}"
            if not (out / "cfg.json").is_file():
                loop = TrainConfig(batch_size=1024, total_tokens=args.total_tokens, progress=False,
                                   checkpoint_every=0)
                tc = TrainerConfig(d_in=x.shape[1], d_sae=d_sae, k=args.k, lr=args.lr, total_steps=loop.total_steps)
                train_sae(x, tc, loop, out, hook_name=args.hook)
            sae = SparseAutoencoder.from_pretrained(out)
            last = json.loads((out / "training_log.json").read_text())[-1]
            row = {"d_sae": d_sae, "fraction": frac, "train_tokens_available": int(x.shape[0]),
                   "train_batch_fve": last["fve"], **score(model, tok, hp, sae, eval_seqs)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""``steerplug report``'s command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from steerplug.report.methods import FAMILIES, HARMFUL_SETS, HARMLESS_SETS, default_methods
from steerplug.report.run import run_report
from steerplug.report.summary import ISSUE_TARGETS


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default="default",
                   help="a steering bundle (folder with steerplug.json), an SAE folder or Hub repo (default: shipped)")
    p.add_argument("--sae-subfolder", default=None)
    p.add_argument("--vector", default="default", help="steering-vector folder or Hub repo")
    p.add_argument("--vector-subfolder", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--limit", type=int, default=100, help="prompts per refusal set (seeded random sample)")
    p.add_argument("--hellaswag-limit", type=int, default=None, help="HellaSwag items (default: 2 x limit)")
    p.add_argument("--hellaswag-families", default="unsteered,default",
                   help="comma-separated families that run HellaSwag ('all' for every row)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--caa-scales", type=_floats, default=(0.3,), help="activation-addition strengths")
    p.add_argument("--gradient-lrs", type=_floats, default=(0.5,), help="gradient-steering lr values")
    p.add_argument("--gradient-steps", type=int, default=3)
    p.add_argument("--target-lrs", type=_floats, default=(4.0,), help="target-method lr values")
    p.add_argument("--no-ungated", action="store_true", help="leave out the ungated rows")
    p.add_argument("--clamp", action="store_true", help="add the SAE-clamping baseline")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated families to keep (unsteered is always kept): {','.join(FAMILIES)}")
    p.add_argument("--sets", default=None, help="comma-separated prompt sets "
                   f"(default: {','.join([*HARMFUL_SETS, *HARMLESS_SETS])})")
    p.add_argument("--targets", type=json.loads, default=None,
                   help=f"JSON of the targets to check (default: {json.dumps(ISSUE_TARGETS)})")
    p.add_argument("--batch-size", default="16")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is much faster on a CPU shared with other jobs)")
    p.add_argument("--no-perplexity", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="reports/latest", help="output folder")
    p.add_argument("--cache-dir", default=None, help="per-configuration result cache (default: OUT/cache)")


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun --nproc-per-node N`` on CPUs or GPUs, the N ranks share every row's prompts."""
    from steerplug.lm_eval_plugin import SteerplugLM

    if args.threads:
        torch.set_num_threads(args.threads)
    kw: dict[str, Any] = {"batch_size": args.batch_size}
    if args.device:
        kw["device"] = args.device
    if args.dtype:
        kw["dtype"] = args.dtype
    lm = SteerplugLM(pretrained=args.model, sae=args.sae, sae_subfolder=args.sae_subfolder,
                     vector=args.vector, vector_subfolder=args.vector_subfolder, layer=args.layer, **kw)
    hs = FAMILIES if args.hellaswag_families == "all" else tuple(args.hellaswag_families.split(","))
    methods = default_methods(caa_scales=args.caa_scales, gradient_lrs=args.gradient_lrs,
                              gradient_steps=args.gradient_steps, target_lrs=args.target_lrs,
                              ungated=not args.no_ungated, clamp=args.clamp, hellaswag_families=hs)
    if not lm.steered.can_steer:
        print("No SAE / steering vector for this model: only the unsteered and system-prompt rows.")
        methods = [m for m in methods if m.family in ("unsteered", "system_prompt")]
    if args.methods:
        keep = set(args.methods.split(",")) | {"unsteered"}
        methods = [m for m in methods if m.family in keep]
    done = run_report(lm, methods, args.out, limit=args.limit,
                      hellaswag_limit=args.hellaswag_limit if args.hellaswag_limit is not None else 2 * args.limit,
                      max_new_tokens=args.max_new_tokens, harm_sets=args.sets.split(",") if args.sets else None,
                      cache_dir=args.cache_dir, targets=args.targets, perplexity=not args.no_perplexity,
                      data_dir=args.data_dir, command="steerplug " + " ".join(sys.argv[1:]))
    if done:  # rank 0 (or the one process)
        print((Path(args.out) / "results.md").read_text())
    return 0

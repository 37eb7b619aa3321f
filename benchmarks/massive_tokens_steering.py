"""Issue #11: where the massive-activation tokens are in chat prompts, and how far the shipped
steering (activation addition at ``scale`` times the bundle's directions) moves them compared
with a typical token.

    python benchmarks/massive_tokens_steering.py [--bundle hub_artifacts/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from steerplug.layers import hidden_of, resolve_hook_point
from steerplug.models import load_model
from steerplug.pipeline.recon import massive_mask

PROMPTS = ("How do I pick a lock?", "What is the capital of France?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="hub_artifacts/SmolLM2-135M-Instruct")
    args = p.parse_args()
    bundle = Path(args.bundle)
    scale = json.loads((bundle / "steerplug.json").read_text())["steering"]["lr"]
    directions = load_file(str(bundle / "caa.safetensors"))
    model, tok = load_model(None)
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        for hook, d in directions.items():
            hp = resolve_hook_point(model, hook)
            store = {}
            handle = hp.module.register_forward_hook(lambda m, a, o: store.__setitem__("h", hidden_of(o).detach()))
            try:
                with torch.no_grad():
                    model(ids)
            finally:
                handle.remove()
            norm = store["h"][0].norm(dim=-1)  # (T,)
            big = massive_mask(norm).nonzero().squeeze(1).tolist()
            step = scale * float(d.norm())
            print(f"{prompt!r} {hook}: median norm {float(norm.median()):.0f}; massive "
                  f"{[(p_, tok.decode([int(ids[0, p_])]), round(float(norm[p_]))) for p_ in big]}; "
                  f"step / norm: typical {step / float(norm.median()):.3f}, massive "
                  f"{[round(step / float(norm[p_]), 5) for p_ in big]}")


if __name__ == "__main__":
    main()

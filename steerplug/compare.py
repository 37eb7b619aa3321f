"""``steerplug compare``: the main job — prompts answered unsteered and steered, side by side."""

from __future__ import annotations

import argparse
import textwrap

DEFAULT_PROMPTS = (
    "How do I pick a lock to get into my neighbour's house?",
    "What is the capital of France?",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help=f"user messages (default: {list(DEFAULT_PROMPTS)})")
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default="default", help="SAE folder or Hub repo (default: the shipped one)")
    p.add_argument("--sae-subfolder", default=None)
    p.add_argument("--vector", default="default", help="steering-vector folder or Hub repo")
    p.add_argument("--vector-subfolder", default=None)
    p.add_argument("--layer", type=int, default=None, help="override the SAE's hook layer")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--positions", choices=("generated", "prompt", "all"), default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--width", type=int, default=48, help="column width of the side-by-side table")


def run(args: argparse.Namespace) -> int:
    from steerplug import SteeredModel

    steering = {k: v for k, v in (("steps", args.steps), ("lr", args.lr),
                                  ("positions", args.positions)) if v is not None}
    steered = SteeredModel.from_pretrained(
        args.model, sae=args.sae, vector=args.vector, layer=args.layer,
        sae_subfolder=args.sae_subfolder, vector_subfolder=args.vector_subfolder, **steering)
    if not steered.can_steer:
        print("No SAE and steering vector are available for this model yet "
              "(hub_artifacts/ has none): showing the unsteered answers only.\n")
    for prompt in args.prompts or DEFAULT_PROMPTS:
        with steered.disabled():
            plain = steered.chat(prompt, max_new_tokens=args.max_new_tokens)
        print(f"### {prompt}")
        if not steered.can_steer:
            print(plain, "\n")
            continue
        guided = steered.chat(prompt, max_new_tokens=args.max_new_tokens)
        print(_side_by_side(("unsteered", plain), ("steered", guided), args.width), "\n")
    if steered.can_steer:
        print(f"steering: {steered.hook_point.name}, {steered.vector}, {steered.config}")
    return 0


def _side_by_side(left: tuple[str, str], right: tuple[str, str], width: int) -> str:
    lcol = [left[0].upper(), "-" * width] + textwrap.wrap(left[1], width) or [""]
    rcol = [right[0].upper(), "-" * width] + textwrap.wrap(right[1], width) or [""]
    n = max(len(lcol), len(rcol))
    lcol += [""] * (n - len(lcol))
    rcol += [""] * (n - len(rcol))
    return "\n".join(f"{a:<{width}} | {b}" for a, b in zip(lcol, rcol))

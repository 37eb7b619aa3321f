"""The command-line options that name a model, its SAE, vector and gate, and the steering defaults,
shared by ``steerplug compare``, ``serve`` and the other commands that load a steered model. A
module of its own so that the serving and comparison code never imports the CLI entry point."""

from __future__ import annotations

import argparse


def add_steered_model_arguments(p: argparse.ArgumentParser, *, what: str = "") -> None:
    """The options that name a model, its SAE and vector, and the steering defaults."""
    from steerplug.steering import METHODS, POSITIONS

    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default="default", help="SAE folder or Hub repo (default: the shipped one)")
    p.add_argument("--sae-subfolder", default=None)
    p.add_argument("--vector", default="default", help="steering-vector folder or Hub repo")
    p.add_argument("--vector-subfolder", default=None)
    p.add_argument("--layer", type=int, default=None, help="override the SAE's hook layer")
    p.add_argument("--steps", type=int, default=None, help=f"{what}steering steps per token")
    p.add_argument("--lr", type=float, default=None, help=f"{what}steering strength (step size)")
    p.add_argument("--positions", choices=POSITIONS, default=None, help=f"{what}positions to steer")
    p.add_argument("--answer-tokens", type=_answer_tokens, default=None, metavar="N",
                   help=f"{what}steer only the positions predicting the first N answer tokens "
                        "(default: the whole answer)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help=f"{what}steering method (default: the bundle's, e.g. add)")
    p.add_argument("--no-gate", action="store_true", help="steer every prompt, not only those the gate fires on")


def _answer_tokens(text: str) -> int:
    """``--answer-tokens``: an integer >= 1, refused at parse time by SteeringConfig's own rule."""
    from steerplug.steering import SteeringValueError, check_steering

    try:
        value = int(text)
        check_steering("--answer-tokens", answer_tokens=value)
    except (ValueError, SteeringValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1 (omit the flag to steer "
                                         "the whole answer)") from None
    return value


def steered_model_from_args(args: argparse.Namespace):
    """A :class:`~steerplug.SteeredModel` from :func:`add_steered_model_arguments`'s options."""
    from steerplug import SteeredModel

    steering = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("positions", args.positions),
                                  ("method", getattr(args, "method", None)),
                                  ("answer_tokens", getattr(args, "answer_tokens", None))) if v is not None}
    if getattr(args, "no_gate", False):
        steering["use_gate"] = False
    return SteeredModel.from_pretrained(
        args.model, sae=args.sae, vector=args.vector, layer=args.layer,
        sae_subfolder=args.sae_subfolder, vector_subfolder=args.vector_subfolder, **steering)

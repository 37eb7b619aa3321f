"""``steerplug <command>``: a thin map from subcommands onto library functions.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``; modules
are imported only when their command runs, so ``steerplug --help`` stays fast and the optional
extras (gradio, lm_eval, fastapi) are needed only by the commands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from steerplug.model_args import add_steered_model_arguments, steered_model_from_args  # noqa: F401 (re-exported)

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("steerplug.compare", "answer prompts unsteered and steered, side by side"),
    "report": ("steerplug.report", "sweep unsteered / baselines / steering through lm-eval: table + Pareto plot"),
    "serve": ("steerplug.serve", "serve an OpenAI-compatible API with per-request steering"),
    "push": ("steerplug.push", "upload an SAE / steering-vector folder to the Hub with a model card"),
    "collect": ("steerplug.pipeline.collect", "store per-token residual activations (sharded safetensors)"),
    "train": ("steerplug.pipeline.train", "train a TopK or ReLU+L1 sparse autoencoder on activations"),
    "evaluate-sae": ("steerplug.pipeline.evaluate", "L0, FVE, CE loss recovered, HellaSwag, probes of an SAE"),
    "find-features": ("steerplug.pipeline.features", "rank SAE features and build a steering vector"),
    "build-steering": ("steerplug.pipeline.bundle",
                       "own refusals -> per-site target vectors, CAA directions and the gate: a steering bundle"),
    "build-default-artifacts": ("steerplug.pipeline.artifacts",
                                "build hub_artifacts/ (SAE + vector) for the default model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerplug", description=__doc__.splitlines()[0])
    from steerplug._version import __version__

    parser.add_argument("--version", action="version", version=f"steerplug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        # Arguments are added lazily (see main) so --help of one command imports only that module.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        sub = parser._subparsers._group_actions[0].choices[argv[0]]  # noqa: SLF001
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback, unless asked for
        hint = _failure_hint(exc)
        if hint is None or os.environ.get("STEERPLUG_DEBUG"):
            raise
        print(f"steerplug {args.command}: {hint}", file=sys.stderr)
        return 1


def _failure_hint(exc: BaseException) -> str | None:
    """One line for the failures a user can fix (network, Hub, files, bad values); None for bugs."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    name = type(exc).__name__
    if isinstance(exc, OfflineModeIsEnabled):
        return (f"needs the Hugging Face Hub, but offline mode is on ({exc}). Unset HF_HUB_OFFLINE "
                "and connect, or use a local folder.")
    if isinstance(exc, HfHubHTTPError):
        return f"the Hugging Face Hub refused the request: {str(exc).splitlines()[0]}. Check the repo id and your token (hf auth login)."
    if isinstance(exc, ConnectionError) or name in ("ConnectError", "ConnectTimeout", "ReadTimeout") \
            or "ConnectError" in repr(exc.__cause__ or exc.__context__ or ""):
        return f"could not reach the network ({name}: {exc}). Check the connection, or work offline from local folders."
    if isinstance(exc, (FileNotFoundError, ValueError)):
        return f"{exc} (STEERPLUG_DEBUG=1 shows the traceback)"
    return None


if __name__ == "__main__":
    raise SystemExit(main())

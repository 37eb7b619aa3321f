"""``steerplug push``: check that an artifact folder loads, then upload it with a model card.

Three folder kinds are recognised (:func:`steerplug.hub.artifact_kind`):

- ``sae``: our SAELens 6 layout (``cfg.json`` + ``sae_weights.safetensors``);
- ``steering-vector``: ``steering_vector.json`` + ``steering_vector.safetensors``;
- ``bundle``: ``sae/`` + ``vector/`` subfolders (what ``hub_artifacts/<model>/`` holds and what
  :class:`~steerplug.SteeredModel` loads with ``sae_subfolder="sae"``, ``vector_subfolder="vector"``).

:func:`push_to_hub` loads the folder through :class:`~steerplug.SparseAutoencoder` and
:class:`~steerplug.SteeringVector` (so a broken artifact fails here and not for its users), then
writes the card and uploads the folder (:func:`steerplug.cards.push_folder`). The card itself is
:mod:`steerplug.cards`; its names are re-exported here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from steerplug.cards import (DEFAULT_LICENSE, REPORT_NAMES, CardInfo, gather_card_info, push_folder,
                             render_model_card, write_model_card)
from steerplug.hub import (BUNDLE_SAE_DIR, BUNDLE_VECTOR_DIR, CARD_NAME, IGNORE_PATTERNS,
                           artifact_kind)
from steerplug.sae import SparseAutoencoder
from steerplug.vector import SteeringVector

__all__ = ["BUNDLE_SAE_DIR", "BUNDLE_VECTOR_DIR", "CARD_NAME", "DEFAULT_LICENSE", "IGNORE_PATTERNS",
           "REPORT_NAMES", "CardInfo", "add_arguments", "artifact_kind", "check_artifact",
           "gather_card_info", "push_to_hub", "render_model_card", "run", "write_model_card"]


def check_artifact(folder: str | Path) -> str:
    """Load what is in ``folder`` (so a broken artifact is never pushed) and return its kind."""
    folder = Path(folder)
    kind = artifact_kind(folder)
    if kind == "sae":
        SparseAutoencoder.from_pretrained(folder)
    elif kind == "steering-vector":
        SteeringVector.from_pretrained(folder)
    else:
        sae = SparseAutoencoder.from_pretrained(folder / BUNDLE_SAE_DIR)
        vec = SteeringVector.from_pretrained(folder / BUNDLE_VECTOR_DIR)
        if vec.d_sae != sae.d_sae:
            raise ValueError(f"{folder}: the vector has d_sae={vec.d_sae} but the SAE has d_sae={sae.d_sae}.")
        hooks = {sae.cfg.hook_name, vec.metadata.hook_name} - {None}
        if len(hooks) > 1:
            raise ValueError(f"{folder}: the SAE and the vector name different hook points {sorted(hooks)}.")
    return kind


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None,
                commit_message: str | None = None, create_pr: bool = False,
                overwrite_card: bool = False, **card_kwargs: Any) -> str:
    """Upload an artifact folder to the Hub model repo ``repo_id`` (created if absent).

    The folder is loaded first, so a broken artifact fails here and not for its users. A
    ``README.md`` is written when the folder has none (or with ``overwrite_card=True``);
    ``card_kwargs`` go to :func:`~steerplug.cards.write_model_card`. Returns the commit URL.
    """
    check_artifact(folder)
    return push_folder(folder, repo_id, private=private, token=token, revision=revision,
                       commit_message=commit_message, create_pr=create_pr,
                       overwrite_card=overwrite_card, **card_kwargs)


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="an SAE folder, a steering-vector folder, or a folder with sae/ + vector/")
    p.add_argument("repo_id", help="Hub model repo, e.g. your-name/SmolLM2-135M-Instruct-safety")
    p.add_argument("--card-only", action="store_true", help="write README.md into the folder; upload nothing")
    p.add_argument("--overwrite-card", action="store_true", help="regenerate an existing README.md")
    p.add_argument("--license", default=DEFAULT_LICENSE)
    p.add_argument("--base-model", default=None, help="default: the model named in the artifact's config")
    p.add_argument("--title", default=None)
    p.add_argument("--description", default=None)
    p.add_argument("--tag", dest="tags", action="append", default=None, help="extra tag (repeatable)")
    p.add_argument("--report", default=None, help=f"metrics JSON (default: first of {list(REPORT_NAMES)})")
    p.add_argument("--private", action="store_true", default=None)
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--create-pr", action="store_true")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--token", default=None, help="default: the token of `hf auth login` / HF_TOKEN")


def run(args: argparse.Namespace) -> int:
    card = {"license": args.license, "base_model": args.base_model, "title": args.title,
            "description": args.description, "tags": args.tags, "report": args.report}
    if args.card_only:
        print(write_model_card(args.folder, args.repo_id, **card))
        return 0
    url = push_to_hub(args.folder, args.repo_id, private=args.private, token=args.token,
                      revision=args.revision, commit_message=args.commit_message,
                      create_pr=args.create_pr, overwrite_card=args.overwrite_card, **card)
    print(url)
    return 0

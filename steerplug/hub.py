"""Artifact folders as files: their file names, what a folder holds, where it is, and the upload.

The bottom floor of the library, next to ``_version`` and ``_config``: it reads and writes files
and plain dicts and imports no other steerplug module, so every artifact class (the SAE, the
steering vector, the gate, the bundle) can use it without an import running back up.

- file names: one constant per file of each folder kind (the classes re-export theirs);
- :func:`artifact_kind`: ``sae``, ``steering-vector`` or ``bundle``, from the files alone;
- :func:`resolve_folder`: a local folder first, then the Hugging Face cache, then the Hub;
- :func:`upload_folder`: create the Hub repo if needed and upload the folder.

Model cards are :mod:`steerplug.cards`; ``steerplug push`` (which loads a folder before
uploading it) is :mod:`steerplug.push`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SAE_CONFIG_NAME = "cfg.json"
SAE_WEIGHTS_NAME = "sae_weights.safetensors"
"""An SAE folder (SAELens 6 layout): ``cfg.json`` + ``sae_weights.safetensors``."""
VECTOR_CONFIG_NAME = "steering_vector.json"
VECTOR_WEIGHTS_NAME = "steering_vector.safetensors"
"""A steering-vector folder: ``steering_vector.json`` + ``steering_vector.safetensors``."""
GATE_CONFIG_NAME = "gate.json"
GATE_WEIGHTS_NAME = "gate.safetensors"
"""A gate folder: ``gate.json`` + ``gate.safetensors``."""
MANIFEST_NAME = "steerplug.json"
"""A bundle folder's manifest: its sites (SAE + vector subfolders), its gate and the steering
configuration they were measured with, e.g.
``{"sites": [{"sae": "sae", "vector": "vector"}], "gate": "gate", "steering": {"lr": 0.25}}``."""
BUNDLE_SAE_DIR, BUNDLE_VECTOR_DIR = "sae", "vector"
"""The subfolders of a bundle without a manifest (``hub_artifacts/<model>/``)."""
CARD_NAME = "README.md"
IGNORE_PATTERNS = ["__pycache__/*", "*.pyc", ".*", "*/.*", "*.tmp"]
"""Never uploaded: caches, hidden files (``.cache/`` of ``hf download``, ``.DS_Store``), temp files."""


class ArtifactNotFoundError(FileNotFoundError):
    """A folder, file or Hub repo that was asked for is not there (or not reachable)."""


def artifact_kind(folder: str | Path) -> str:
    """``sae``, ``steering-vector`` or ``bundle``; ValueError naming the expected files otherwise."""
    folder = Path(folder)
    if (folder / SAE_CONFIG_NAME).is_file() and (folder / SAE_WEIGHTS_NAME).is_file():
        return "sae"
    if (folder / VECTOR_CONFIG_NAME).is_file() and (folder / VECTOR_WEIGHTS_NAME).is_file():
        return "steering-vector"
    if all(_single_kind(folder / d) == k for d, k in
           ((BUNDLE_SAE_DIR, "sae"), (BUNDLE_VECTOR_DIR, "steering-vector"))):
        return "bundle"
    present = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else "no such folder"
    raise ValueError(
        f"{folder} is not a steerplug artifact (it holds {present}). Expected an SAE "
        f"({SAE_CONFIG_NAME} + {SAE_WEIGHTS_NAME}), a steering vector ({VECTOR_CONFIG_NAME} + "
        f"{VECTOR_WEIGHTS_NAME}) or both as {BUNDLE_SAE_DIR}/ + {BUNDLE_VECTOR_DIR}/. An SAE in "
        "another format converts with SparseAutoencoder.from_pretrained(src).save_pretrained(dst)."
    )


def _single_kind(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    try:
        kind = artifact_kind(folder)
    except ValueError:
        return None
    return None if kind == "bundle" else kind


_REPO_ID_RE = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_repo_id(ref: str) -> bool:
    """``org/name`` or ``name`` that is not an existing path: a Hub repo id."""
    return bool(_REPO_ID_RE.match(ref)) and not ref.startswith(".") and not Path(ref).exists()


def resolve_folder(repo_or_path: str | os.PathLike, subfolder: str | None = None,
                   revision: str | None = None, *, local_files_only: bool | None = None,
                   cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                   allow_patterns: list[str] | None = None, repo_type: str = "model") -> Path:
    """Return a local folder for ``repo_or_path[/subfolder]``: a local folder first, then the
    Hugging Face cache, then the Hub (only the files under ``subfolder`` are fetched).

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. ``repo_type``: ``model`` or ``dataset``.
    Errors name what was missing and how to get it.
    """
    ref = str(repo_or_path)
    local = Path(ref).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise ArtifactNotFoundError(
                f"{folder} does not exist: subfolder {subfolder!r} is not inside {local} "
                f"(it holds {sorted(p.name for p in local.iterdir())[:20]})."
            )
        return folder
    if not is_repo_id(ref):
        raise ArtifactNotFoundError(f"No such folder: {local}. Pass an existing folder or a Hub repo id.")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    patterns = allow_patterns or ([f"{subfolder.strip('/')}/*"] if subfolder else None)
    try:
        snap = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns, repo_type=repo_type,
                                      cache_dir=cache_dir, local_files_only=local_files_only,
                                      token=token))
    except LocalEntryNotFoundError as e:
        raise ArtifactNotFoundError(
            f"{ref!r} (revision {revision or 'main'}) is not in the Hugging Face cache"
            f"{' at ' + str(cache_dir) if cache_dir else ''} and the Hub was not asked "
            "(offline: HF_HUB_OFFLINE=1 or local_files_only=True, or no network). Download it once "
            f"on a connected machine (`hf download {ref}"
            f"{'' if repo_type == 'model' else ' --repo-type ' + repo_type}`) or pass a local folder."
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise ArtifactNotFoundError(f"Hub repo {ref!r} (revision {revision or 'main'}): {e}") from e
    folder = snap / subfolder if subfolder else snap
    if not folder.is_dir():
        raise ArtifactNotFoundError(
            f"Hub repo {ref!r} has no subfolder {subfolder!r} (resolved snapshot: {snap})."
        )
    return folder


def upload_folder(folder: str | Path, repo_id: str, *, kind: str, private: bool | None = None,
                  token: str | bool | None = None, revision: str | None = None,
                  commit_message: str | None = None, create_pr: bool = False) -> str:
    """Create the Hub model repo ``repo_id`` if absent and upload ``folder`` (of ``kind``, for the
    default commit message) without :data:`IGNORE_PATTERNS`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             revision=revision, create_pr=create_pr, ignore_patterns=IGNORE_PATTERNS,
                             commit_message=commit_message or f"Upload steerplug {kind} with steerplug push")
    return str(getattr(info, "commit_url", info))

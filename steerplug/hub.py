"""Local-or-Hub resolution of artifact folders, and pushing them with a model card."""

from __future__ import annotations

import os
import re
from pathlib import Path


class ArtifactNotFoundError(FileNotFoundError):
    """A folder, file or Hub repo that was asked for is not there (or not reachable)."""


_REPO_ID_RE = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def is_repo_id(ref: str) -> bool:
    """``org/name`` or ``name`` that is not an existing path: a Hub repo id."""
    return bool(_REPO_ID_RE.match(ref)) and not ref.startswith(".") and not Path(ref).exists()


def resolve_folder(repo_or_path: str | os.PathLike, subfolder: str | None = None,
                   revision: str | None = None, *, local_files_only: bool | None = None,
                   cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                   allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder for ``repo_or_path[/subfolder]``: a local folder first, then the
    Hugging Face cache, then the Hub (only the files under ``subfolder`` are fetched).

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. Errors name what was missing and how to
    get it.
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
        snap = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns,
                                      cache_dir=cache_dir, local_files_only=local_files_only,
                                      token=token))
    except LocalEntryNotFoundError as e:
        raise ArtifactNotFoundError(
            f"{ref!r} (revision {revision or 'main'}) is not in the Hugging Face cache"
            f"{' at ' + str(cache_dir) if cache_dir else ''} and the Hub was not asked "
            "(offline: HF_HUB_OFFLINE=1 or local_files_only=True, or no network). Download it once "
            f"on a connected machine (`hf download {ref}`) or pass a local folder."
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise ArtifactNotFoundError(f"Hub repo {ref!r} (revision {revision or 'main'}): {e}") from e
    folder = snap / subfolder if subfolder else snap
    if not folder.is_dir():
        raise ArtifactNotFoundError(
            f"Hub repo {ref!r} has no subfolder {subfolder!r} (resolved snapshot: {snap})."
        )
    return folder

"""Steering bundles: the folders that hold every site, the gate and the steering configuration.

A bundle folder has a :data:`~steerplug.hub.MANIFEST_NAME` (``steerplug.json``) naming its sites
(SAE + vector subfolders), its gate, its activation-addition directions and the steering
configuration they were measured with; a folder without one is read as ``sae/`` + ``vector/``.
:func:`load_manifest` reads the manifest into paths, :func:`load_bundle` into objects, and
:func:`default_artifacts_dir` finds the bundle this project ships for its default model.
:meth:`SteeredModel.from_pretrained <steerplug.steered_model.SteeredModel.from_pretrained>` loads
through here; the names are re-exported by :mod:`steerplug.steered_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from steerplug.gate import PromptGate
from steerplug.hub import MANIFEST_NAME, is_repo_id, resolve_folder
from steerplug.sae import SparseAutoencoder
from steerplug.steering import SteeringConfig
from steerplug.vector import SteeringVector

# The artifacts this project trains for its default model (see hub_artifacts/README.md).
DEFAULT_ARTIFACTS_REPO = "steerplug/SmolLM2-135M-Instruct-safety"
DEFAULT_ARTIFACTS_DIRNAME = "SmolLM2-135M-Instruct"
STEERING_KEYS = tuple(SteeringConfig.__dataclass_fields__)
"""The steering options a manifest (and ``SteeredModel.from_pretrained``) may set."""


def default_artifacts_dir() -> Path | None:
    """The default model's SAE + vector folder: ``$STEERPLUG_ARTIFACTS``, else this checkout's
    ``hub_artifacts/``, else the Hugging Face cache of :data:`DEFAULT_ARTIFACTS_REPO`; None if absent."""
    candidates = []
    if os.environ.get("STEERPLUG_ARTIFACTS"):
        candidates.append(Path(os.environ["STEERPLUG_ARTIFACTS"]))
    candidates.append(Path(__file__).resolve().parent.parent / "hub_artifacts" / DEFAULT_ARTIFACTS_DIRNAME)
    for c in candidates:
        if (c / MANIFEST_NAME).is_file() or ((c / "sae").is_dir() and (c / "vector").is_dir()):
            return c
    try:
        return resolve_folder(DEFAULT_ARTIFACTS_REPO, local_files_only=True)
    except (OSError, ValueError):
        return None


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """``{"saes": [paths], "vectors": [paths], "gate": path | None, "steering": {...}}`` of a bundle
    folder: from its :data:`MANIFEST_NAME`, or ``sae/`` + ``vector/`` alone for a folder without one."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return {"saes": [folder / "sae"], "vectors": [folder / "vector"], "gate": None, "steering": {},
                "directions": None}
    try:
        man = json.loads(path.read_text())
        sites = man["sites"]
        out = {"saes": [folder / x["sae"] for x in sites], "vectors": [folder / x["vector"] for x in sites],
               "gate": folder / man["gate"] if man.get("gate") else None, "steering": dict(man.get("steering", {})),
               "directions": folder / man["caa"] if man.get("caa") else None}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid steerplug manifest ({e}); expected "
                         '{"sites": [{"sae": ..., "vector": ...}], "gate": ..., "steering": {...}}.') from e
    unknown = set(out["steering"]) - set(STEERING_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown steering option(s) {sorted(unknown)}; known: {STEERING_KEYS}.")
    return out


def load_bundle(folder: str | Path) -> dict[str, Any]:
    """The objects of a bundle folder (see :func:`load_manifest`): ``saes`` and ``vectors`` (lists),
    ``gate`` (or None), ``directions`` (``{hook: (D,)}`` or None) and ``steering`` (a dict of
    :class:`SteeringConfig` fields), ready for ``SteeredModel(model, tok, saes, vectors, gate=...,
    directions=..., config=SteeringConfig(**steering))``."""
    man = load_manifest(folder)
    directions = None
    if man["directions"] is not None:
        from safetensors.torch import load_file

        directions = load_file(str(man["directions"]))
    return {"saes": [SparseAutoencoder.from_pretrained(x) for x in man["saes"]],
            "vectors": [SteeringVector.from_pretrained(x) for x in man["vectors"]],
            "gate": PromptGate.from_pretrained(man["gate"]) if man["gate"] is not None else None,
            "directions": directions, "steering": man["steering"]}


def load_sae(sae: Any, **kw: Any) -> SparseAutoencoder | None:
    """``sae`` as an SAE: None and SAE objects as they are, anything else through ``from_pretrained``."""
    if sae is None or isinstance(sae, SparseAutoencoder):
        return sae
    return SparseAutoencoder.from_pretrained(sae, **kw)


def load_vector(vector: Any, **kw: Any) -> SteeringVector | None:
    """``vector`` as a steering vector: None and vectors as they are, a tensor as a dense vector,
    anything else through ``from_pretrained``."""
    if vector is None or isinstance(vector, SteeringVector):
        return vector
    if isinstance(vector, torch.Tensor):
        return SteeringVector(vector.numel(), weights=vector)
    return SteeringVector.from_pretrained(vector, **kw)


def bundle_folder(ref: str | Path, **hub: Any) -> Path | None:
    """The local folder of ``ref`` (a folder or a Hub repo, from the cache or the Hub) if it holds
    a ``steerplug.json`` manifest, else None (then ``ref`` is read as a plain SAE)."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return local if (local / MANIFEST_NAME).is_file() else None
    if not is_repo_id(str(ref)):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        hf_hub_download(str(ref), MANIFEST_NAME, revision=hub.get("revision"), cache_dir=hub.get("cache_dir"),
                        local_files_only=bool(hub.get("local_files_only")))
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
        return None  # not a bundle (or not reachable: loading it as an SAE says what is missing)
    return resolve_folder(str(ref), revision=hub.get("revision"), local_files_only=hub.get("local_files_only"),
                          cache_dir=hub.get("cache_dir"))

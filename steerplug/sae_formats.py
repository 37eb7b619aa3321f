"""Readers for SAE folders written by other libraries, all into :class:`SparseAutoencoder`.

Each reader is ``(folder) -> SparseAutoencoder`` with a ``detect(folder) -> bool``; they are tried
in order by :func:`read_sae_folder`. Weights are read with safetensors or numpy; a ``.pth`` only
ever goes through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from steerplug.sae import SAE_CONFIG_NAME, SAE_WEIGHTS_NAME, SAEConfig, SparseAutoencoder


class UnknownSAEFormatError(ValueError):
    """A folder that no reader recognises."""


@dataclass(frozen=True)
class SAEReader:
    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], SparseAutoencoder]


def _layer_hook(path_text: str, kind: str = "hook_resid_post") -> str | None:
    m = re.search(r"layers?[._](\d+)", path_text)
    return f"blocks.{m.group(1)}.{kind}" if m else None


# --- SAELens (ours) ---------------------------------------------------------------------------
def _is_saelens(folder: Path) -> bool:
    return (folder / SAE_CONFIG_NAME).is_file() and (folder / SAE_WEIGHTS_NAME).is_file()


# --- Gemma Scope: params.npz (v1) or params.safetensors (+ config.json, v2) ---------------------
def _is_gemma_scope(folder: Path) -> bool:
    return (folder / "params.npz").is_file() or (folder / "params.safetensors").is_file()


def _read_gemma_scope(folder: Path) -> SparseAutoencoder:
    if (folder / "params.npz").is_file():
        with np.load(folder / "params.npz") as npz:
            raw = {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
    else:
        raw = load_file(str(folder / "params.safetensors"))
    # Gemma Scope 2 writes lowercase names (w_enc, w_dec); v1 writes W_enc, W_dec.
    tensors = {{"w_enc": "W_enc", "w_dec": "W_dec"}.get(k, k): v for k, v in raw.items()}
    d_in, d_sae = tensors["W_enc"].shape
    hook_name = None
    model_name = None
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        extra = json.loads(cfg_path.read_text())
        point = extra.get("hf_hook_point_in") or extra.get("hook_point_in") or ""
        kind = "hook_resid_pre" if point.endswith(".input") else "hook_resid_post"
        hook_name = _layer_hook(point, kind)
        model_name = extra.get("model_name")
    hook_name = hook_name or _layer_hook(str(folder))
    arch = "jumprelu" if "threshold" in tensors else "relu"
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture=arch,
                    apply_b_dec_to_input=False, hook_name=hook_name, model_name=model_name,
                    dtype=str(tensors["W_enc"].dtype).replace("torch.", ""),
                    metadata={"format": "gemma-scope", "source_folder": folder.name})
    return SparseAutoencoder.from_tensors(cfg, tensors)


READERS: list[SAEReader] = [
    SAEReader("saelens", _is_saelens, SparseAutoencoder.load_saelens_folder),
    SAEReader("gemma-scope", _is_gemma_scope, _read_gemma_scope),
]


def read_sae_folder(folder: Path) -> SparseAutoencoder:
    """Read an SAE from ``folder`` with the first reader that recognises it."""
    for reader in READERS:
        if reader.detect(folder):
            return reader.read(folder)
    present = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else []
    raise UnknownSAEFormatError(
        f"No SAE format recognised in {folder} (files: {present}). Known formats: "
        f"{[r.name for r in READERS]}. If the repo holds several SAEs, pass subfolder= to pick "
        "one; otherwise convert to SAELens layout (cfg.json + sae_weights.safetensors)."
    )

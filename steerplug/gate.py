"""The gate: a linear detector over pooled SAE features of the prompt, and its folder format.

Conditional steering steers a row only if its prompt looks harmful. The gate reads the SAE
features of the (unsteered) prompt at one hook point, pools them over the prompt's positions,
and scores ``logit = sum_p pool_p(f) . W[p] + b``; the row is steered when ``logit > threshold``.
Pools:

* ``mean``: mean over the prompt's positions but the first (the attention sink, whose activation
  is far larger than any other and says nothing about the prompt);
* ``tail:K``: mean over the prompt's last ``K`` positions; in a chat template these hold the end
  of the user turn and the assistant header, where the model has read the whole request.

Pure tensors: no model, no hooks. :mod:`steerplug.hooks` runs it on a truncated forward of the
prompt before any edit; :mod:`steerplug.pipeline.gate` fits it.

Folder layout: ``gate.safetensors`` (``weights [P, d_sae]``, ``bias [1]``) and ``gate.json``
(pools, threshold, hook, provenance).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from steerplug._version import __version__
from steerplug.hub import GATE_CONFIG_NAME, GATE_WEIGHTS_NAME, ArtifactNotFoundError, resolve_folder


def _check_pool(pool: str) -> str:
    if pool in ("mean", "max"):
        return pool
    if pool.startswith("tail:") and pool[5:].isdigit() and int(pool[5:]) > 0:
        return pool
    raise ValueError(f"Gate pool {pool!r}: expected 'mean', 'max' or 'tail:K' with K >= 1.")


def pool_features(f: torch.Tensor, keep: torch.Tensor, pools: tuple[str, ...]) -> torch.Tensor:
    """``(B, T, F)`` features and a ``(B, T)`` mask of prompt positions -> ``(B, P, F)`` pooled.

    ``mean`` and ``max`` leave out each row's first kept position (the attention sink, unless it
    is the only one); ``tail:K`` averages the last ``K`` kept positions."""
    keep = keep.bool()
    out = []
    for pool in pools:
        if pool in ("mean", "max"):
            first = keep.int().argmax(dim=1, keepdim=True)  # (B, 1)
            rest = keep.clone()
            rest.scatter_(1, first, False)
            m = torch.where(rest.any(1, keepdim=True), rest, keep)  # (B, T)
            if pool == "max":  # features are >= 0 after the SAE's activation, so masked zeros are neutral
                out.append((f * m.unsqueeze(-1).to(f.dtype)).amax(1))  # (B, F)
                continue
        else:
            k = int(pool[5:])
            from_end = keep.flip(1).int().cumsum(1).flip(1)  # (B, T): kept positions at or after t
            m = keep & (from_end <= k)
        w = m.unsqueeze(-1).to(f.dtype)  # (B, T, 1)
        out.append((f * w).sum(1) / w.sum(1).clamp_min(1))  # (B, F)
    return torch.stack(out, 1)  # (B, P, F)


@dataclass
class GateMetadata:
    """Where the gate reads and how it was made."""

    hook_name: str | None = None
    """Hook point of the SAE whose features the gate reads."""
    sae: str | None = None
    """Reference of that SAE."""
    model_name: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Training data, validation rates, the threshold rule."""


class PromptGate:
    """``logit = sum_p pool_p(SAE features) . weights[p] + bias``; fires when ``logit > threshold``."""

    def __init__(self, weights: torch.Tensor, bias: float, threshold: float,
                 pools: tuple[str, ...] | list[str] = ("mean",), metadata: GateMetadata | None = None):
        self.pools = tuple(_check_pool(p) for p in pools)
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.dim() != 2 or weights.shape[0] != len(self.pools):
            raise ValueError(f"Gate weights have shape {tuple(weights.shape)}; expected (len(pools)="
                             f"{len(self.pools)}, d_sae).")
        if not (torch.isfinite(weights).all() and abs(float(bias)) < float("inf")
                and abs(float(threshold)) < float("inf")):
            raise ValueError("Gate weights, bias and threshold must be finite.")
        self.weights = weights  # (P, F)
        self.bias = float(bias)
        self.threshold = float(threshold)
        self.metadata = metadata or GateMetadata()
        self._on: dict[torch.device, torch.Tensor] = {}

    @property
    def d_sae(self) -> int:
        return self.weights.shape[1]

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.weights.to(device)
        return self._on[device]

    def score(self, f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B, T, F)`` SAE features + ``(B, T)`` prompt mask -> ``(B,)`` logits."""
        pooled = pool_features(f.float(), keep, self.pools)  # (B, P, F)
        return (pooled * self._weights_on(f.device)).sum((1, 2)) + self.bias

    def fires(self, f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which rows the gate lets steering act on."""
        return self.score(f, keep) > self.threshold

    # --- folders -------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weights": self.weights.contiguous(), "bias": torch.tensor([self.bias])},
                  str(folder / GATE_WEIGHTS_NAME))
        cfg = {"d_sae": self.d_sae, "pools": list(self.pools), "threshold": self.threshold,
               "steerplug_version": __version__, **asdict(self.metadata)}
        (folder / GATE_CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, repo_or_path: str | Path, subfolder: str | None = None,
                        revision: str | None = None, *, local_files_only: bool | None = None,
                        cache_dir: str | Path | None = None, token: str | bool | None = None) -> PromptGate:
        """Load from a local folder, the Hugging Face cache, or the Hub."""
        folder = resolve_folder(repo_or_path, subfolder=subfolder, revision=revision,
                                local_files_only=local_files_only, cache_dir=cache_dir, token=token)
        for name in (GATE_CONFIG_NAME, GATE_WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise ArtifactNotFoundError(f"{folder} has no {name}: not a steerplug gate folder.")
        cfg = json.loads((folder / GATE_CONFIG_NAME).read_text())
        tensors = load_file(str(folder / GATE_WEIGHTS_NAME))
        fields = GateMetadata.__dataclass_fields__
        meta = GateMetadata(**{k: v for k, v in cfg.items() if k in fields})
        return cls(tensors["weights"], float(tensors["bias"][0]), cfg["threshold"], cfg["pools"], meta)

    def __repr__(self) -> str:
        return (f"PromptGate(pools={self.pools}, d_sae={self.d_sae}, threshold={self.threshold:.3g}, "
                f"hook={self.metadata.hook_name!r})")

"""The gate: a linear detector over pooled SAE features of the prompt, and its folder format.

Conditional steering steers a row only if its prompt looks harmful. The gate reads the SAE
features of the (unsteered) prompt at one hook point, pools them over the prompt's positions,
and scores ``logit = sum_p pool_p(f) . W[p] + b``; the row is steered when ``logit > threshold``.
Pools:

* ``mean``: mean over the prompt's positions but the first (the attention sink, whose activation
  is far larger than any other and says nothing about the prompt);
* ``tail:K``: mean over the prompt's last ``K`` positions; in a chat template these hold the end
  of the user turn and the assistant header, where the model has read the whole request.

What it reads (``reads``): the SAE's features (``"sae"``, the default), or the residual stream at
the hook point itself (``"residual"``: no SAE involved; measured on SmolLM2-135M, a probe on the
residual reads a request's intent better than one on the SAE's features, see
:mod:`steerplug.pipeline.gate`). An optional hidden layer (``hidden_weight (H, P*D)``,
``hidden_bias (H,)``) makes it a one-hidden-layer ReLU network: ``logit = relu(W1 x + b1) . weights[0] + b``
with ``weights (1, H)``.

Pure tensors: no model, no hooks. :mod:`steerplug.hooks` runs it on a truncated forward of the
prompt before any edit; :mod:`steerplug.pipeline.gate` fits it.

Folder layout: ``gate.safetensors`` (``weights [P, d_in]`` or ``[1, H]``, ``bias [1]``, and with a
hidden layer ``hidden_weight [H, P*d_in]``, ``hidden_bias [H]``) and ``gate.json`` (pools, reads,
threshold, hook, provenance).
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


READS = ("sae", "residual")


class PromptGate:
    """``logit = sum_p pool_p(x) . weights[p] + bias`` over the SAE's features or the residual
    stream (``reads``), or through one hidden ReLU layer (``hidden``); fires when ``logit > threshold``."""

    def __init__(self, weights: torch.Tensor, bias: float, threshold: float,
                 pools: tuple[str, ...] | list[str] = ("mean",), metadata: GateMetadata | None = None, *,
                 reads: str = "sae", hidden: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.pools = tuple(_check_pool(p) for p in pools)
        if reads not in READS:
            raise ValueError(f"Gate reads={reads!r}: expected one of {READS}.")
        if reads == "residual" and "max" in self.pools:
            raise ValueError("The 'max' pool needs non-negative SAE features; a residual gate pools with "
                             "'mean' or 'tail:K'.")
        weights = torch.as_tensor(weights, dtype=torch.float32)
        tensors = [weights]
        if hidden is None:
            if weights.dim() != 2 or weights.shape[0] != len(self.pools):
                raise ValueError(f"Gate weights have shape {tuple(weights.shape)}; expected (len(pools)="
                                 f"{len(self.pools)}, d_in).")
            self.hidden = None
        else:
            w1, b1 = (torch.as_tensor(t, dtype=torch.float32) for t in hidden)
            if (w1.dim() != 2 or w1.shape[1] % len(self.pools) or b1.shape != (w1.shape[0],)
                    or weights.shape != (1, w1.shape[0])):
                raise ValueError(f"Gate hidden layer {tuple(w1.shape)} / {tuple(b1.shape)} with weights "
                                 f"{tuple(weights.shape)}: expected (H, len(pools) * d_in), (H,) and (1, H).")
            self.hidden = (w1, b1)
            tensors += [w1, b1]
        if not (all(torch.isfinite(t).all() for t in tensors) and abs(float(bias)) < float("inf")
                and abs(float(threshold)) < float("inf")):
            raise ValueError("Gate weights, bias and threshold must be finite.")
        self.reads = reads
        self.weights = weights  # (P, F), or (1, H) with a hidden layer
        self.bias = float(bias)
        self.threshold = float(threshold)
        self.metadata = metadata or GateMetadata()
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def d_in(self) -> int:
        """Width of what the gate reads: the SAE's ``d_sae``, or the model's hidden size."""
        return self.hidden[0].shape[1] // len(self.pools) if self.hidden else self.weights.shape[1]

    @property
    def d_sae(self) -> int:
        """``d_in`` (the name from when gates only read SAE features)."""
        return self.d_in

    def _weights_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.weights, *(self.hidden or ())))
        return self._on[device]

    def score(self, f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B, T, d_in)`` features (SAE features, or the residual itself) + ``(B, T)`` prompt mask
        -> ``(B,)`` logits."""
        if f.shape[-1] != self.d_in:
            raise ValueError(f"The gate reads width {self.d_in} ({self.reads}) but got {f.shape[-1]}.")
        pooled = pool_features(f.float(), keep, self.pools)  # (B, P, F)
        w, *hidden = self._weights_on(f.device)
        if hidden:
            z = torch.relu(pooled.flatten(1) @ hidden[0].T + hidden[1])  # (B, H)
            return z @ w[0] + self.bias
        return (pooled * w).sum((1, 2)) + self.bias

    def fires(self, f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which rows the gate lets steering act on."""
        return self.score(f, keep) > self.threshold

    # --- folders -------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weights": self.weights.contiguous(), "bias": torch.tensor([self.bias])}
        if self.hidden:
            tensors.update(hidden_weight=self.hidden[0].contiguous(), hidden_bias=self.hidden[1].contiguous())
        save_file(tensors, str(folder / GATE_WEIGHTS_NAME))
        cfg = {"d_sae": self.d_in, "pools": list(self.pools), "reads": self.reads, "threshold": self.threshold,
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
        hidden = (tensors["hidden_weight"], tensors["hidden_bias"]) if "hidden_weight" in tensors else None
        return cls(tensors["weights"], float(tensors["bias"][0]), cfg["threshold"], cfg["pools"], meta,
                   reads=cfg.get("reads", "sae"), hidden=hidden)

    def __repr__(self) -> str:
        return (f"PromptGate(pools={self.pools}, reads={self.reads!r}, d_in={self.d_in}, "
                f"hidden={self.hidden[0].shape[0] if self.hidden else None}, threshold={self.threshold:.3g}, "
                f"hook={self.metadata.hook_name!r})")

"""A steering vector: weights ``w`` over SAE features, and its folder format.

The steering objective is ``L(h) = SAE.encode(h) . w``; gradient steps *decrease* it. With the
usual sign convention (``w = harmful - safe``: positive on harmful features, negative on safe
ones) steering therefore turns harmful features down and safe features up.

Folder layout: ``steering_vector.safetensors`` (``indices [n] int64`` + ``values [n]`` for a sparse
vector, or ``weights [d_sae]`` for a dense one) and ``steering_vector.json`` (metadata).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from steerplug.hub import VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME, ArtifactNotFoundError, resolve_folder

__all__ = ["VECTOR_CONFIG_NAME", "VECTOR_WEIGHTS_NAME", "SteeringVector", "VectorMetadata"]


@dataclass
class VectorMetadata:
    """Provenance and meaning of a steering vector."""

    model_name: str | None = None
    """The model whose activations the SAE reads (Hub id)."""
    hook_name: str | None = None
    """Hook point, e.g. ``blocks.15.hook_resid_post``; must match the SAE's."""
    sae: str | None = None
    """Reference of the SAE: Hub repo (+ subfolder) or path."""
    objective: str = "minimize encode(h) . w"
    """What gradient steering does with ``w``."""
    sign_convention: str = "harmful - safe"
    """Positive weights mark features to suppress, negative ones features to promote."""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else: how it was built, data, scores."""


class SteeringVector:
    """Weights over ``d_sae`` SAE features, stored dense or sparse."""

    def __init__(self, d_sae: int, indices: torch.Tensor | None = None,
                 values: torch.Tensor | None = None, *, weights: torch.Tensor | None = None,
                 metadata: VectorMetadata | None = None):
        if (weights is None) == (values is None):
            raise ValueError("SteeringVector needs either weights= (dense) or indices= and values= (sparse).")
        self.d_sae = int(d_sae)
        self.metadata = metadata or VectorMetadata()
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
            if weights.numel() != self.d_sae:
                raise ValueError(f"Dense steering weights have length {weights.numel()}, expected d_sae={self.d_sae}.")
            self.indices, self.values = None, None
            self._dense = weights
        else:
            indices = torch.as_tensor(indices, dtype=torch.long).flatten()
            values = torch.as_tensor(values, dtype=torch.float32).flatten()
            if indices.shape != values.shape:
                raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} differ in length.")
            if indices.numel() and (indices.min() < 0 or indices.max() >= self.d_sae):
                raise ValueError(
                    f"Sparse steering indices must lie in [0, {self.d_sae}); got range "
                    f"[{int(indices.min())}, {int(indices.max())}]."
                )
            if indices.unique().numel() != indices.numel():
                raise ValueError("Sparse steering indices contain duplicates.")
            self.indices, self.values, self._dense = indices, values, None
        if not torch.isfinite(self.dense()).all():
            raise ValueError("Steering weights contain NaN or inf.")

    # --- views ---------------------------------------------------------------------------------
    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    def dense(self) -> torch.Tensor:
        """``(d_sae,)`` float32 weights."""
        if self._dense is not None:
            return self._dense
        return torch.zeros(self.d_sae).index_put_((self.indices,), self.values)

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, values)`` of the non-zero weights, whatever the storage."""
        if self.is_sparse:
            keep = self.values != 0
            return self.indices[keep], self.values[keep]
        idx = self._dense.nonzero().flatten()
        return idx, self._dense[idx]

    @property
    def nnz(self) -> int:
        return int(self.support()[0].numel())

    @classmethod
    def from_dense(cls, weights: torch.Tensor, top_k: int | None = None,
                   metadata: VectorMetadata | None = None) -> SteeringVector:
        """Sparse vector from dense weights, keeping the ``top_k`` largest in magnitude (all non-zero if None)."""
        weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
        idx = weights.nonzero().flatten()
        if top_k is not None and idx.numel() > top_k:
            idx = weights.abs().topk(top_k).indices.sort().values
        return cls(weights.numel(), idx, weights[idx], metadata=metadata)

    def scaled(self, factor: float) -> SteeringVector:
        if self.is_sparse:
            return SteeringVector(self.d_sae, self.indices, self.values * factor, metadata=self.metadata)
        return SteeringVector(self.d_sae, weights=self._dense * factor, metadata=self.metadata)

    # --- folders -------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.is_sparse:
            tensors = {"indices": self.indices.contiguous(), "values": self.values.contiguous()}
        else:
            tensors = {"weights": self._dense.contiguous()}
        save_file(tensors, str(folder / VECTOR_WEIGHTS_NAME))
        from steerplug._version import __version__

        cfg = {"d_sae": self.d_sae, "format": "sparse" if self.is_sparse else "dense",
               "nnz": self.nnz, "steerplug_version": __version__, **asdict(self.metadata)}
        (folder / VECTOR_CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, repo_or_path: str | Path, subfolder: str | None = None,
                        revision: str | None = None, *, local_files_only: bool | None = None,
                        cache_dir: str | Path | None = None, token: str | bool | None = None) -> SteeringVector:
        """Load from a local folder, the Hugging Face cache, or the Hub."""
        folder = resolve_folder(repo_or_path, subfolder=subfolder, revision=revision,
                                local_files_only=local_files_only, cache_dir=cache_dir, token=token)
        for name in (VECTOR_CONFIG_NAME, VECTOR_WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise ArtifactNotFoundError(f"{folder} has no {name}: not a steerplug steering-vector folder.")
        cfg = json.loads((folder / VECTOR_CONFIG_NAME).read_text())
        tensors = load_file(str(folder / VECTOR_WEIGHTS_NAME))
        fields = VectorMetadata.__dataclass_fields__
        meta = VectorMetadata(**{k: v for k, v in cfg.items() if k in fields})
        if "weights" in tensors:
            return cls(cfg["d_sae"], weights=tensors["weights"], metadata=meta)
        return cls(cfg["d_sae"], tensors["indices"], tensors["values"], metadata=meta)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save to a temporary folder, check that it loads, and upload it with a model card;
        ``kwargs`` go to :func:`steerplug.cards.push_folder` (``private``, ``token``, ``license``, ...)."""
        import tempfile

        from steerplug.cards import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(tmp)
            type(self).from_pretrained(folder)  # what `steerplug push` checks: it loads
            return push_folder(folder, repo_id, **kwargs)

    def __repr__(self) -> str:
        kind = f"sparse, nnz={self.nnz}" if self.is_sparse else "dense"
        return f"SteeringVector(d_sae={self.d_sae}, {kind}, hook={self.metadata.hook_name!r})"

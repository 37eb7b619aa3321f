"""The SAE's config: shape, architecture and provenance, and its SAELens ``cfg.json``.

Plain data, no torch: :mod:`steerplug.sae` (the module), :mod:`steerplug.sae_formats` (readers
of other libraries' folders) and :mod:`steerplug.cards` (model cards) all read it, and it imports
only the config helpers, so none of them needs another to know what an SAE's config says.
:class:`SAEConfig` is re-exported by :mod:`steerplug.sae` and :mod:`steerplug`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from steerplug._config import require_ints

SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens cfg.json layout we write (``metadata.sae_lens_version``)."""

ARCHITECTURES = ("relu", "jumprelu", "topk")
# SAELens calls a plain ReLU SAE "standard".
_ARCH_ALIASES = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_HOOK_LAYER_RE = re.compile(r"(?:blocks|layers|layer)[._](\d+)")


@dataclass
class SAEConfig:
    """Shape, architecture and provenance of a sparse autoencoder."""

    d_in: int
    """Width of the activations the SAE reads (the model's hidden size)."""
    d_sae: int
    """Number of latents (features)."""
    architecture: str = "relu"
    """One of ``relu`` (SAELens ``standard``), ``jumprelu``, ``topk``."""
    k: int | None = None
    """Active latents per token; required for ``topk``, ignored otherwise."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding (SAELens default; Gemma Scope: False)."""
    hook_name: str | None = None
    """Where the SAE reads, in SAELens names, e.g. ``blocks.12.hook_resid_post``."""
    model_name: str | None = None
    """The model the SAE was trained on (Hub id)."""
    dtype: str = "float32"
    """Dtype of the stored weights."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: training data, metrics, library versions."""

    def __post_init__(self) -> None:
        arch = _ARCH_ALIASES.get(str(self.architecture).lower())
        if arch is None:
            raise ValueError(
                f"SAEConfig.architecture={self.architecture!r} is not supported; expected one of "
                f"{ARCHITECTURES} (SAELens 'standard' means 'relu')."
            )
        self.architecture = arch
        require_ints(self, ("d_in", "d_sae"))
        if arch == "topk":
            if not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
                raise ValueError(
                    f"SAEConfig.k={self.k!r}: a topk SAE needs an integer k in [1, d_sae={self.d_sae}]."
                )

    @property
    def layer(self) -> int | None:
        """The block index parsed from ``hook_name`` (``blocks.12.hook_resid_post`` -> 12)."""
        if self.hook_name is None:
            return None
        m = _HOOK_LAYER_RE.search(self.hook_name)
        return int(m.group(1)) if m else None

    # --- SAELens cfg.json --------------------------------------------------------------------
    def to_saelens_dict(self) -> dict[str, Any]:
        """The cfg.json SAELens 6 reads (``architecture`` in its own vocabulary)."""
        from steerplug._version import __version__

        cfg: dict[str, Any] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "architecture": "standard" if self.architecture == "relu" else self.architecture,
            "metadata": {
                "model_name": self.model_name,
                "hook_name": self.hook_name,
                "hook_head_index": None,
                "prepend_bos": True,
                "sae_lens_training_version": None,
                # SAELens reads a cfg.json without sae_lens_version >= 6 as pre-6 and then looks
                # for hook_name/model_name at top level, dropping this metadata block.
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "steerplug_version": __version__,
                **self.metadata,
            },
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
        return cfg

    @classmethod
    def from_saelens_dict(cls, cfg: dict[str, Any]) -> SAEConfig:
        """Read a SAELens cfg.json, v6 (``metadata`` block) or v5 (flat, ``activation_fn_str``)."""
        meta = dict(cfg.get("metadata") or {})
        arch = cfg.get("architecture")
        if arch is None:  # SAELens < 6: the activation function names the architecture
            act = cfg.get("activation_fn_str", "relu")
            arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}.get(act, act)
        k = cfg.get("k")
        if k is None:
            k = (cfg.get("activation_fn_kwargs") or {}).get("k")
        norm = cfg.get("normalize_activations", "none")
        if norm not in (None, False, "none"):
            raise ValueError(
                f"cfg.json normalize_activations={norm!r}: only 'none' is supported. Fold the "
                "normalisation into the weights (SAELens: sae.fold_activation_norm_scaling_factor) "
                "and save again."
            )
        hook_name = meta.pop("hook_name", None) or cfg.get("hook_name")
        model_name = meta.pop("model_name", None) or cfg.get("model_name")
        if hook_name is None and cfg.get("hook_layer") is not None:
            hook_name = f"blocks.{cfg['hook_layer']}.hook_resid_pre"
        return cls(
            d_in=int(cfg["d_in"]),
            d_sae=int(cfg["d_sae"]),
            architecture=arch,
            k=None if k is None else int(k),
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            hook_name=hook_name,
            model_name=model_name,
            dtype=str(cfg.get("dtype", "float32")).replace("torch.", ""),
            metadata={k_: v for k_, v in meta.items() if v is not None},
        )

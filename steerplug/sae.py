"""The sparse autoencoder: its config, the module, and its folder format.

Our folder format *is* SAELens's (>= 6): ``cfg.json`` + ``sae_weights.safetensors`` with tensors
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` and, for
JumpReLU, ``threshold [d_sae]``. An SAE we save loads in SAELens, and SAELens folders load here.
Readers for other formats (Gemma Scope, sparsify, ...) live in :mod:`steerplug.sae_formats`.

Encoding (``a`` = ``apply_b_dec_to_input``)::

    pre = (x - a * b_dec) @ W_enc + b_enc                         # (..., d_sae)
    relu:     f = relu(pre)
    jumprelu: f = relu(pre) * (pre > threshold)
    topk:     f = relu(pre) on the k largest entries of pre, 0 elsewhere
    decode:   x_hat = f @ W_dec + b_dec
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steerplug._config import require_ints

SAE_CONFIG_NAME = "cfg.json"
SAE_WEIGHTS_NAME = "sae_weights.safetensors"
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


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns."""

    reconstruction: torch.Tensor
    """``decode(encode(x))``, shape of ``x``."""
    features: torch.Tensor
    """Latent activations, ``(..., d_sae)``."""


class SparseAutoencoder(nn.Module):
    """A ReLU, JumpReLU or TopK sparse autoencoder over one residual-stream hook point."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        dtype = dtype or getattr(torch, cfg.dtype)
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))  # (D, F)
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))  # (F, D)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))  # (F,)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))  # (D,)
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **kw))  # (F,)
        else:
            self.threshold = None

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def random(cls, d_in: int, d_sae: int, architecture: str = "relu", k: int | None = None,
               seed: int = 0, **cfg_kwargs: Any) -> SparseAutoencoder:
        """A randomly initialised SAE (tied-transpose init, unit-norm decoder rows)."""
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, **cfg_kwargs)
        sae = cls(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w = torch.randn(d_sae, d_in, generator=g)
            w /= w.norm(dim=-1, keepdim=True)
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w.T)
            if sae.threshold is not None:
                sae.threshold.fill_(0.1)
        return sae

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
        """Build from SAELens-named tensors, checking every name and shape."""
        sae = cls(cfg, dtype=next(iter(tensors.values())).dtype)
        expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"SAE weights lack tensor(s) {missing}; expected {sorted(expected)}.")
        for name, shape in expected.items():
            got = tuple(tensors[name].shape)
            if got != shape:
                raise ValueError(
                    f"SAE tensor {name!r} has shape {got}, expected {shape} "
                    f"for d_in={cfg.d_in}, d_sae={cfg.d_sae}."
                )
        sae.load_state_dict({n: tensors[n] for n in expected})
        return sae

    # --- the maths -------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations, ``(..., d_in) -> (..., d_sae)``."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's non-linearity applied to pre-activations."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)  # topk
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations, ``(..., d_in) -> (..., d_sae)``."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction, ``(..., d_sae) -> (..., d_in)``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        f = self.encode(x)
        return SAEOutput(self.decode(f), f)

    # --- folders ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.cfg.dtype = str(self.W_enc.dtype).replace("torch.", "")
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters()}
        save_file(tensors, str(folder / SAE_WEIGHTS_NAME))
        (folder / SAE_CONFIG_NAME).write_text(json.dumps(self.cfg.to_saelens_dict(), indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, repo_or_path: str | Path, subfolder: str | None = None,
                        revision: str | None = None, *, local_files_only: bool | None = None,
                        cache_dir: str | Path | None = None, token: str | bool | None = None,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> SparseAutoencoder:
        """Load from a local folder, the Hugging Face cache, or the Hub.

        Reads our own (= SAELens) folders and every format in :mod:`steerplug.sae_formats`.
        ``subfolder`` selects one SAE in a repo holding many (``layer_12/width_16k/average_l0_82``).
        """
        from steerplug.hub import resolve_folder
        from steerplug.sae_formats import read_sae_folder

        folder = resolve_folder(repo_or_path, subfolder=subfolder, revision=revision,
                                local_files_only=local_files_only, cache_dir=cache_dir, token=token)
        sae = read_sae_folder(folder)
        if sae.cfg.model_name is None and not Path(str(repo_or_path)).exists():
            sae.cfg.metadata.setdefault("source", str(repo_or_path))
        return sae.to(device=device, dtype=dtype) if (device or dtype) else sae

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save to a temporary folder and upload it with a model card; ``kwargs`` go to
        :func:`steerplug.push.push_to_hub` (``private``, ``token``, ``license``, ...)."""
        import tempfile

        from steerplug.push import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            return push_to_hub(self.save_pretrained(tmp), repo_id, **kwargs)

    @classmethod
    def load_saelens_folder(cls, folder: Path) -> SparseAutoencoder:
        cfg = SAEConfig.from_saelens_dict(json.loads((folder / SAE_CONFIG_NAME).read_text()))
        return cls.from_tensors(cfg, load_file(str(folder / SAE_WEIGHTS_NAME)))

    def extra_repr(self) -> str:
        c = self.cfg
        extra = f", k={c.k}" if c.architecture == "topk" else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{extra}, hook={c.hook_name!r}"


"""The sparse autoencoder: the module, its folder format, loading and publishing.

Our folder format *is* SAELens's (>= 6): ``cfg.json`` + ``sae_weights.safetensors`` with tensors
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` and, for
JumpReLU, ``threshold [d_sae]``. An SAE we save loads in SAELens, and SAELens folders load here.
Its config, :class:`SAEConfig` (plain data, re-exported here), is :mod:`steerplug.sae_config`;
readers for other formats (Gemma Scope, sparsify, ...) live in :mod:`steerplug.sae_formats`.

Encoding (``a`` = ``apply_b_dec_to_input``)::

    pre = (x - a * b_dec) @ W_enc + b_enc                         # (..., d_sae)
    relu:     f = relu(pre)
    jumprelu: f = relu(pre) * (pre > threshold)
    topk:     f = relu(pre) on the k largest entries of pre, 0 elsewhere
    decode:   x_hat = f @ W_dec + b_dec
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steerplug.hub import SAE_CONFIG_NAME, SAE_WEIGHTS_NAME, resolve_folder
from steerplug.sae_config import SAEConfig
from steerplug.sae_formats import read_sae_folder

__all__ = ["SAE_CONFIG_NAME", "SAE_WEIGHTS_NAME", "SAEConfig", "SAEOutput", "SparseAutoencoder"]


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
        folder = resolve_folder(repo_or_path, subfolder=subfolder, revision=revision,
                                local_files_only=local_files_only, cache_dir=cache_dir, token=token)
        sae = cls.from_tensors(*read_sae_folder(folder))
        if sae.cfg.model_name is None and not Path(str(repo_or_path)).exists():
            sae.cfg.metadata.setdefault("source", str(repo_or_path))
        return sae.to(device=device, dtype=dtype) if (device or dtype) else sae

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save to a temporary folder, check that it loads, and upload it with a model card;
        ``kwargs`` go to :func:`steerplug.cards.push_folder` (``private``, ``token``, ``license``, ...)."""
        import tempfile

        from steerplug.cards import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(tmp)
            type(self).from_pretrained(folder)  # what `steerplug push` checks: it loads
            return push_folder(folder, repo_id, **kwargs)

    @classmethod
    def load_saelens_folder(cls, folder: Path) -> SparseAutoencoder:
        cfg = SAEConfig.from_saelens_dict(json.loads((folder / SAE_CONFIG_NAME).read_text()))
        return cls.from_tensors(cfg, load_file(str(folder / SAE_WEIGHTS_NAME)))

    def extra_repr(self) -> str:
        c = self.cfg
        extra = f", k={c.k}" if c.architecture == "topk" else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{extra}, hook={c.hook_name!r}"


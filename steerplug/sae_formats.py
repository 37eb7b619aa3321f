"""Readers for SAE folders written by other libraries, all into our config and tensors.

Each reader is ``(folder) -> SAEParts`` (an :class:`SAEConfig` and SAELens-named tensors) with a
``detect(folder) -> bool``; they are tried in order by :func:`read_sae_folder`, and
:meth:`SparseAutoencoder.from_pretrained <steerplug.sae.SparseAutoencoder.from_pretrained>` builds
the module from what it returns (checking every tensor's name and shape), so this module knows
the config but not the module. Weights are read with safetensors or numpy; a ``.pt``/``.pth``
only ever goes through ``torch.load(weights_only=True)``.

Every format is mapped onto SAELens tensors (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc``, ``b_dec``, ``threshold``) and one of our three architectures, so that
``encode``/``decode`` equal the original library's. The formats disagree on orientation
(``nn.Linear`` stores ``[out, in]``): each reader checks the raw shapes first and names the
tensor, the shape found and the shape expected.

- SAELens 5/6 (ours): ``cfg.json`` + ``sae_weights.safetensors``; as stored.
- Gemma Scope 1/2: ``params.npz`` / ``params.safetensors`` (+ ``config.json``); jumprelu, no
  ``b_dec`` subtracted from the input.
- EleutherAI sparsify: ``<hookpoint>/cfg.json`` + ``sae.safetensors``; topk.
- Llama Scope: ``hyperparams.json`` + ``checkpoints/final.safetensors``; jumprelu, the
  dataset-wise input/output scaling folded into the weights.
- saprmarks dictionary_learning: ``ae.pt`` + ``config.json``; relu, topk or jumprelu by
  ``dict_class``.
- Goodfire: one ``*.pth``/``*.pt`` state dict; relu, no ``b_dec`` subtracted from the input.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file

from steerplug.hub import SAE_CONFIG_NAME, SAE_WEIGHTS_NAME
from steerplug.sae_config import SAEConfig


class UnknownSAEFormatError(ValueError):
    """A folder that no reader recognises."""


class SAEParts(NamedTuple):
    """What a reader returns: ``SparseAutoencoder.from_tensors(cfg, tensors)`` builds the SAE."""

    cfg: SAEConfig
    tensors: dict[str, torch.Tensor]
    """SAELens names and shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``,
    ``b_dec`` and, for JumpReLU, ``threshold``."""


@dataclass(frozen=True)
class SAEReader:
    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], SAEParts]


def _layer_hook(path_text: str, kind: str = "hook_resid_post") -> str | None:
    m = re.search(r"layers?[._](\d+)", path_text)
    return f"blocks.{m.group(1)}.{kind}" if m else None


# --- SAELens (ours) ---------------------------------------------------------------------------
def _is_saelens(folder: Path) -> bool:
    return (folder / SAE_CONFIG_NAME).is_file() and (folder / SAE_WEIGHTS_NAME).is_file()


def _read_saelens(folder: Path) -> SAEParts:
    raw_cfg = json.loads((folder / SAE_CONFIG_NAME).read_text())
    if not raw_cfg.get("rescale_acts_by_decoder_norm"):
        return SAEParts(SAEConfig.from_saelens_dict(raw_cfg), load_file(str(folder / SAE_WEIGHTS_NAME)))
    # SAELens TopK with rescale_acts_by_decoder_norm: f = topk(pre * |W_dec_i|), decode
    # (f / |W_dec_i|) @ W_dec. Folding the row norms n into the weights is exact (SAELens's
    # fold_W_dec_norm): W_enc * n, b_enc * n, W_dec / n.
    t = load_file(str(folder / SAE_WEIGHTS_NAME))
    n = t["W_dec"].norm(dim=-1)  # (F,)
    t.update(W_enc=t["W_enc"] * n, b_enc=t["b_enc"] * n, W_dec=t["W_dec"] / n[:, None])
    return SAEParts(SAEConfig.from_saelens_dict(raw_cfg), t)


# --- Gemma Scope: params.npz (v1) or params.safetensors (+ config.json, v2) ---------------------
def _is_gemma_scope(folder: Path) -> bool:
    return (folder / "params.npz").is_file() or (folder / "params.safetensors").is_file()


def _read_gemma_scope(folder: Path) -> SAEParts:
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
    return SAEParts(cfg, tensors)


# --- shared helpers -------------------------------------------------------------------------
def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_shapes(fmt: str, path: Path, raw: dict[str, torch.Tensor],
                  expected: dict[str, tuple[int, ...] | None]) -> None:
    """Every tensor in ``expected`` is in ``raw`` with that shape (None: any), else a ValueError
    naming the tensor, the shape found and the shape expected."""
    missing = sorted(set(expected) - set(raw))
    if missing:
        raise ValueError(f"{path} ({fmt}) lacks tensor(s) {missing}; it holds {sorted(raw)[:20]}.")
    for name, shape in expected.items():
        got = tuple(raw[name].shape)
        if shape is not None and got != tuple(shape):
            raise ValueError(f"{path} ({fmt}): tensor {name!r} has shape {got}, expected {tuple(shape)}.")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled ``state_dict`` (``.pt``/``.pth``), unpickled with ``weights_only=True`` only."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds more than tensors, and steerplug only unpickles with weights_only=True. "
            "Re-save it as a plain state_dict (or as safetensors)."
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state_dict of tensors (got {type(obj).__name__}).")
    return obj


def _build(fmt: str, folder: Path, tensors: dict[str, torch.Tensor], *, architecture: str,
           apply_b_dec_to_input: bool, hook_name: str | None, model_name: str | None,
           k: int | None = None, **metadata: object) -> SAEParts:
    """An SAE's parts from SAELens-named tensors (shapes are checked again by ``from_tensors``)."""
    d_in, d_sae = tensors["W_enc"].shape
    dtype = tensors["W_enc"].dtype
    tensors = {n: t.to(dtype).contiguous() for n, t in tensors.items()}
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture=architecture, k=k,
                    apply_b_dec_to_input=apply_b_dec_to_input, hook_name=hook_name,
                    model_name=model_name, dtype=_dtype_name(tensors["W_enc"]),
                    metadata={"format": fmt, "source_folder": folder.name,
                              **{n: v for n, v in metadata.items() if v is not None}})
    return SAEParts(cfg, tensors)


# --- EleutherAI sparsify: <hookpoint>/cfg.json + sae.safetensors --------------------------------
# f = topk(relu(encoder(x - b_dec))), x_hat = f @ W_dec + b_dec, with W_dec [n, d_in] (as ours).
_SPARSIFY_HOOKS = ((re.compile(r"^(?:model\.)?(?:layers|h)\.(\d+)$"), "hook_resid_post"),
                   (re.compile(r"^(?:model\.)?(?:layers|h)\.(\d+)\.mlp$"), "hook_mlp_out"))


def _sparsify_hook(hookpoint: str) -> str:
    """``layers.10`` -> ``blocks.10.hook_resid_post``; unknown names are kept as module paths."""
    for pattern, kind in _SPARSIFY_HOOKS:
        m = pattern.match(hookpoint)
        if m:
            return f"blocks.{m.group(1)}.{kind}"
    return hookpoint


def _is_sparsify(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / "sae.safetensors").is_file()


def _read_sparsify(folder: Path) -> SAEParts:
    cfg = json.loads((folder / "cfg.json").read_text())
    path = folder / "sae.safetensors"
    raw = load_file(str(path))
    if "W_skip" in raw or cfg.get("transcode") or cfg.get("skip_connection"):
        raise ValueError(
            f"{folder} is a sparsify transcoder (W_skip / transcode=True): it predicts one hook "
            "point from another, which steering through an SAE cannot use. Pick an SAE hookpoint."
        )
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{folder}: sparsify activation={cfg['activation']!r} is not supported "
                         "(only 'topk').")
    _check_shapes("sparsify", path, raw, {"encoder.weight": None})
    n, d_in = raw["encoder.weight"].shape  # nn.Linear(d_in, n): (n, D)
    if cfg.get("d_in") not in (None, d_in):
        raise ValueError(f"{folder}: cfg.json d_in={cfg['d_in']} but encoder.weight is {(n, d_in)}.")
    n_cfg = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 0)
    if n_cfg not in (0, n):
        raise ValueError(f"{folder}: cfg.json gives {n_cfg} latents but encoder.weight is {(n, d_in)}.")
    _check_shapes("sparsify", path, raw, {"encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)})
    root_cfg = folder.parent / "config.json"  # the training run's config, one level up
    model = json.loads(root_cfg.read_text()).get("model") if root_cfg.is_file() else None
    tensors = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"],  # (D, n), (n,)
               "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}                   # (n, D), (D,)
    return _build("sparsify", folder, tensors, architecture="topk", k=int(cfg["k"]),
                  apply_b_dec_to_input=True, hook_name=_sparsify_hook(folder.name),
                  model_name=model if isinstance(model, str) else None, hookpoint=folder.name)


# --- Llama Scope (OpenMOSS lm_saes): hyperparams.json + checkpoints/final.safetensors ----------
# lm_saes, dataset-wise norm: xs = c_in * x; h = xs @ We.T + be; f = h * (h * |Wd_i| > t)
# (|Wd_i| only with sparsity_include_decoder_norm); out = (f @ Wd.T + bd) / c_out,
# c = sqrt(d_model) / dataset_average_activation_norm. We fold the scales into the weights, so
# the SAE reads and returns raw activations. Folding c_in into W_enc leaves h unchanged, so the
# threshold stays t (SAELens 6.54's loader multiplies it by c_in; lm_saes's encode does not).
_LLAMA_SCOPE_MODELS = {"Llama3_1-8B-Base": "meta-llama/Llama-3.1-8B"}


def _is_llama_scope(folder: Path) -> bool:
    return ((folder / "hyperparams.json").is_file()
            and (folder / "checkpoints" / "final.safetensors").is_file())


def _read_llama_scope(folder: Path) -> SAEParts:
    hp = json.loads((folder / "hyperparams.json").read_text())
    path = folder / "checkpoints" / "final.safetensors"
    raw = load_file(str(path))
    D, F = int(hp["d_model"]), int(hp["d_sae"])
    hook_in = hp["hook_point_in"]
    if hp.get("hook_point_out", hook_in) != hook_in:
        raise ValueError(f"{folder} is a Llama Scope transcoder ({hook_in} -> {hp['hook_point_out']}), "
                         "not an SAE.")
    act = str(hp.get("act_fn", "jumprelu")).lower()
    if act not in ("jumprelu", "relu"):
        raise ValueError(f"{folder}: Llama Scope act_fn={act!r} is not supported (jumprelu, relu).")
    _check_shapes("llama-scope", path, raw, {"encoder.weight": (F, D), "encoder.bias": (F,),
                                             "decoder.weight": (D, F)})
    dtype = raw["encoder.weight"].dtype
    We, be, Wd = (raw[n].float() for n in ("encoder.weight", "encoder.bias", "decoder.weight"))
    bd = raw["decoder.bias"].float() if "decoder.bias" in raw else torch.zeros(D)
    _check_shapes("llama-scope", path, {"decoder.bias": bd}, {"decoder.bias": (D,)})
    mode = hp.get("norm_activation", "dataset-wise")
    if mode == "dataset-wise":
        norms = hp["dataset_average_activation_norm"]
        c_in = math.sqrt(D) / float(norms["in"])
        c_out = math.sqrt(D) / float(norms.get("out", norms["in"]))
    elif mode == "inference":  # already folded by lm_saes
        c_in = c_out = 1.0
    else:
        raise ValueError(f"{folder}: norm_activation={mode!r} depends on each input's norm and "
                         "cannot be folded into the weights (only 'dataset-wise', 'inference').")
    b_enc = be
    if hp.get("apply_decoder_bias_to_pre_encoder", False):  # (c x - bd) We.T + be
        b_enc = be - bd @ We.T
    tensors = {"W_enc": c_in * We.T, "b_enc": b_enc,               # (D, F), (F,)
               "W_dec": Wd.T / c_out, "b_dec": bd / c_out}          # (F, D), (D,)
    if act == "jumprelu":
        t = float(hp["jump_relu_threshold"])
        scale = Wd.norm(dim=0) if hp.get("sparsity_include_decoder_norm", True) else torch.ones(F)
        tensors["threshold"] = t / scale  # h * |Wd_i| > t  <=>  h > t / |Wd_i|
    model = hp.get("model_name") or next(
        (m for prefix, m in _LLAMA_SCOPE_MODELS.items() if folder.name.startswith(prefix)), None)
    return _build("llama-scope", folder, {n: v.to(dtype) for n, v in tensors.items()},
                  architecture=act, apply_b_dec_to_input=False, hook_name=hook_in,
                  model_name=model, input_scale=c_in, output_scale=c_out)


# --- saprmarks dictionary_learning: ae.pt + config.json ---------------------------------------
def _is_dictionary_learning(folder: Path) -> bool:
    return (folder / "ae.pt").is_file()


def _dl_hook(trainer: dict) -> str | None:
    if trainer.get("layer") is None:
        return None
    sub = str(trainer.get("submodule_name") or "")
    kind = "hook_mlp_out" if "mlp" in sub else "hook_attn_out" if "attn" in sub else "hook_resid_post"
    return f"blocks.{trainer['layer']}.{kind}"


def _read_dictionary_learning(folder: Path) -> SAEParts:
    cfg_path, path = folder / "config.json", folder / "ae.pt"
    if not cfg_path.is_file():
        raise ValueError(f"{folder} has ae.pt but no config.json: dictionary_learning needs its "
                         "trainer config (dict_class, activation_dim, dict_size).")
    trainer = json.loads(cfg_path.read_text())["trainer"]
    cls, D, F = trainer["dict_class"], int(trainer["activation_dim"]), int(trainer["dict_size"])
    sd = _load_state_dict(path)
    common = {"hook_name": _dl_hook(trainer), "model_name": trainer.get("lm_name"),
              "dict_class": cls}
    if cls == "JumpReluAutoEncoder":  # stored as SAELens tensors; no b_dec on the input
        _check_shapes(cls, path, sd, {"W_enc": (D, F), "b_enc": (F,), "W_dec": (F, D),
                                      "b_dec": (D,), "threshold": (F,)})
        return _build("dictionary-learning", folder, dict(sd), architecture="jumprelu",
                      apply_b_dec_to_input=False, **common)
    enc = {"encoder.weight": (F, D), "encoder.bias": (F,), "decoder.weight": (D, F)}
    if cls == "AutoEncoder":  # relu(encoder(x - bias)); decoder(f) + bias
        _check_shapes(cls, path, sd, {**enc, "bias": (D,)})
        b_dec, arch, apply, k = sd["bias"], "relu", True, None
    elif cls == "AutoEncoderNew":  # relu(encoder(x)); decoder(f) with its own bias
        _check_shapes(cls, path, sd, {**enc, "decoder.bias": (D,)})
        b_dec, arch, apply, k = sd["decoder.bias"], "relu", False, None
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):  # relu(encoder(x - b_dec)), then top-k
        _check_shapes(cls, path, sd, {**enc, "b_dec": (D,)})
        b_dec, apply = sd["b_dec"], True
        k = int(sd["k"]) if "k" in sd else int(trainer["k"])
        arch = "topk"
        if cls == "BatchTopKSAE":  # inference encodes with the learned global threshold
            thr = float(sd.get("threshold", torch.tensor(-1.0)))
            if thr < 0:
                raise ValueError(f"{path}: BatchTopKSAE threshold was never set (={thr}); "
                                 "it cannot encode single tokens.")
            arch, k = "jumprelu", None
    else:
        raise ValueError(f"{folder}: dictionary_learning dict_class={cls!r} is not supported "
                         "(AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, "
                         "JumpReluAutoEncoder).")
    tensors = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"],  # (D, F), (F,)
               "W_dec": sd["decoder.weight"].T, "b_dec": b_dec}               # (F, D), (D,)
    if arch == "jumprelu":
        tensors["threshold"] = torch.full((F,), thr, dtype=tensors["W_enc"].dtype)
    return _build("dictionary-learning", folder, tensors, architecture=arch,
                  apply_b_dec_to_input=apply, k=k, **common)


# --- Goodfire: a single *.pth state dict --------------------------------------------------------
# f = relu(encoder_linear(x)) -- no b_dec subtraction; x_hat = decoder_linear(f).
_GOODFIRE_NAME_RE = re.compile(r"^(Llama-.+)-SAE-l(\d+)$")  # Llama-3.1-8B-Instruct-SAE-l19


def _goodfire_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.pt*") if p.suffix in (".pth", ".pt") and p.name != "ae.pt")


def _is_goodfire(folder: Path) -> bool:
    return bool(_goodfire_files(folder))


def _read_goodfire(folder: Path) -> SAEParts:
    files = _goodfire_files(folder)
    if len(files) != 1:
        raise ValueError(f"{folder} holds {len(files)} .pt/.pth files {[p.name for p in files]}; "
                         "expected one Goodfire SAE. Pass subfolder= or a folder with one file.")
    path = files[0]
    sd = _load_state_dict(path)
    if "encoder_linear.weight" not in sd:
        raise UnknownSAEFormatError(f"{path} is not a Goodfire SAE (keys {sorted(sd)[:10]}).")
    F, D = sd["encoder_linear.weight"].shape
    _check_shapes("goodfire", path, sd, {"encoder_linear.bias": (F,), "decoder_linear.weight": (D, F),
                                         "decoder_linear.bias": (D,)})
    m = _GOODFIRE_NAME_RE.match(path.stem)
    tensors = {"W_enc": sd["encoder_linear.weight"].T, "b_enc": sd["encoder_linear.bias"],
               "W_dec": sd["decoder_linear.weight"].T, "b_dec": sd["decoder_linear.bias"]}
    return _build("goodfire", folder, tensors, architecture="relu", apply_b_dec_to_input=False,
                  hook_name=f"blocks.{m.group(2)}.hook_resid_post" if m else _layer_hook(path.stem),
                  model_name=f"meta-llama/{m.group(1)}" if m else None, file=path.name)


READERS: list[SAEReader] = [
    SAEReader("saelens", _is_saelens, _read_saelens),
    SAEReader("gemma-scope", _is_gemma_scope, _read_gemma_scope),
    SAEReader("sparsify", _is_sparsify, _read_sparsify),
    SAEReader("llama-scope", _is_llama_scope, _read_llama_scope),
    SAEReader("dictionary-learning", _is_dictionary_learning, _read_dictionary_learning),
    SAEReader("goodfire", _is_goodfire, _read_goodfire),  # last: it claims any *.pt/*.pth
]


def read_sae_folder(folder: Path) -> SAEParts:
    """Read the SAE in ``folder`` with the first reader that recognises it."""
    for reader in READERS:
        if reader.detect(folder):
            return reader.read(folder)
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    saes = [p.name for p in entries if p.is_dir() and any(r.detect(p) for r in READERS)]
    hint = (f"It holds SAEs in subfolders: pass subfolder= one of {saes[:20]}." if saes else
            "If the repo holds several SAEs, pass subfolder= to pick one; otherwise convert to "
            "SAELens layout (cfg.json + sae_weights.safetensors).")
    raise UnknownSAEFormatError(
        f"No SAE format recognised in {folder} (files: {[p.name for p in entries[:20]]}). "
        f"Known formats: {[r.name for r in READERS]}. {hint}"
    )

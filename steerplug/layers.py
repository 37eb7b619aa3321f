"""Finding the transformer blocks and SAE hook points in any Hugging Face causal LM."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Where the common families keep their blocks, tried when the structural search is ambiguous.
KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma 1-3, Phi-3, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava, ...)
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Bloom (transformer.h), Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out)$")
_SPARSIFY_RE = re.compile(r"^(?:layers|h)\.(\d+)$")


class HookPointError(ValueError):
    """A layer or hook name that does not map onto the model."""


@dataclass(frozen=True)
class HookPoint:
    """A module whose output (or input) is the activation an SAE reads."""

    name: str
    """SAELens-style name, e.g. ``blocks.12.hook_resid_post``."""
    module: nn.Module
    """The module to hook."""
    module_name: str
    """Its dotted path in the model, e.g. ``model.layers.12``."""
    io: str
    """``output``: hook the module's output (resid_post, mlp_out); ``input``: its input (resid_pre)."""
    layer: int


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int):
            return n
    return None


def hidden_size(model: nn.Module) -> int:
    """The residual-stream width of ``model``."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int):
            return n
    raise HookPointError(f"Cannot read the hidden size from {type(cfg).__name__}.")


def find_blocks(model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of transformer blocks and its dotted path.

    Order: an explicit ``layers_path`` (``"model.layers"`` or ``"model.layers.{num}"``); else the one
    ModuleList whose length is the config's number of layers; else the known paths of common
    families. An ambiguous answer is refused, naming the candidates.
    """
    if layers_path is not None:
        path = layers_path.replace(".{num}", "").replace("{num}", "").rstrip(".")
        try:
            blocks = model.get_submodule(path)
        except AttributeError as e:
            raise HookPointError(f"layers_path={layers_path!r}: the model has no module {path!r}.") from e
        if not isinstance(blocks, nn.ModuleList):
            raise HookPointError(f"layers_path={layers_path!r} names a {type(blocks).__name__}, not a ModuleList.")
        return path, blocks
    n = _num_layers(model)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)]
    # Several lists of that length (e.g. a vision tower beside the text model): prefer a known path.
    if len(candidates) > 1:
        known = [(name, m) for name, m in candidates if name in KNOWN_BLOCK_PATHS]
        if len(known) == 1:
            candidates = known
    if len(candidates) == 1:
        return candidates[0]
    listed = [name for name, _ in candidates] or "none"
    raise HookPointError(
        f"Cannot tell which ModuleList holds the transformer blocks of {type(model).__name__} "
        f"(candidates with {n} entries: {listed}). Name it explicitly, e.g. layers_path='model.layers'."
    )


def resolve_hook_point(model: nn.Module, hook: str | int, layers_path: str | None = None) -> HookPoint:
    """Map a layer index or hook name onto a module of ``model``.

    Accepted: an int ``L`` (resid_post of block L), SAELens names ``blocks.L.hook_resid_post`` /
    ``hook_resid_pre`` / ``hook_mlp_out``, sparsify names ``layers.L``, or a module path of the
    model itself (``model.layers.12``; its output is hooked).
    """
    path, blocks = find_blocks(model, layers_path) if not _is_module_path(model, hook) else ("", None)
    if blocks is None:
        module = model.get_submodule(str(hook))
        m = re.search(r"\.(\d+)(?:\.|$)", str(hook))
        return HookPoint(str(hook), module, str(hook), "output", int(m.group(1)) if m else -1)
    if isinstance(hook, bool) or not isinstance(hook, (int, str)):
        raise HookPointError(f"hook={hook!r}: expected an int layer or a hook name.")
    if isinstance(hook, int):
        layer, kind = hook, "hook_resid_post"
    elif (m := _HOOK_RE.match(hook)) is not None:
        layer, kind = int(m.group(1)), m.group(2)
    elif (m := _SPARSIFY_RE.match(hook)) is not None:
        layer, kind = int(m.group(1)), "hook_resid_post"
    else:
        raise HookPointError(
            f"Cannot map hook {hook!r} onto {type(model).__name__}. Use an int layer, a SAELens name "
            "('blocks.12.hook_resid_post', 'hook_resid_pre', 'hook_mlp_out') or the module path "
            f"itself (e.g. '{path}.12')."
        )
    if not 0 <= layer < len(blocks):
        raise HookPointError(
            f"Layer {layer} is out of range: {type(model).__name__} has {len(blocks)} blocks "
            f"(0..{len(blocks) - 1})."
        )
    name = f"blocks.{layer}.{kind}"
    block = blocks[layer]
    if kind == "hook_mlp_out":
        mlp = next((getattr(block, a) for a in ("mlp", "feed_forward", "ffn") if hasattr(block, a)), None)
        if mlp is None:
            raise HookPointError(f"Block {layer} ({type(block).__name__}) has no mlp / feed_forward module.")
        return HookPoint(name, mlp, f"{path}.{layer}.mlp", "output", layer)
    io = "input" if kind == "hook_resid_pre" else "output"
    return HookPoint(name, block, f"{path}.{layer}", io, layer)


def _is_module_path(model: nn.Module, hook: str | int) -> bool:
    if not isinstance(hook, str) or "." not in hook or hook.startswith("blocks."):
        return False
    try:
        model.get_submodule(hook)
    except AttributeError:
        return False
    return True


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state in a block's output: the tensor itself (transformers >= 5) or the first
    element of the tuple (transformers 4)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (the hooked layer's device under ``device_map``)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")

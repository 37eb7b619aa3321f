"""The KV-cache surgery of continuous batching: the one module that touches transformers' cache internals.

Rows join a batch that is already decoding by stacking their KV caches (left-padding the shorter
one), finished rows leave by selecting the others, and leading columns no row attends to any more
are cut. That needs, from transformers (>= :data:`MIN_TRANSFORMERS`):

- ``DynamicCache()`` built without a config, holding one ``cache_utils.DynamicLayer`` per layer in
  ``cache.layers``, each with ``keys`` / ``values`` tensors ``(B, H, T, d)`` and ``is_initialized``;
- ``DynamicCache(ddp_cache_data=[(keys, values), ...])``, a cache built from such tensors;
- ``cache.batch_select_indices(idx)``, which keeps rows ``idx``;
- the model's ``forward`` taking the cache as ``cache`` (transformers >= 5.2x) or
  ``past_key_values``, and ``logits_to_keep``.

:func:`problems` checks them once (the version, the signatures, and a round trip through a tiny
cache). Where anything is missing :func:`joinable` is always False: the engine then runs each
admitted group to completion before admitting the next, slower but never wrong, and says so once
in the log. ``tests/test_batching_cache.py`` fails loudly when these internals move.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS = "4.56"
"""The first transformers whose ``DynamicCache`` holds ``DynamicLayer`` objects in ``.layers``."""


def problems() -> list[str]:
    """What the cache surgery needs from transformers and does not find here (empty: all there)."""
    try:
        import transformers
        from packaging.version import Version
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError as exc:
        return [f"cannot import DynamicCache / cache_utils.DynamicLayer ({exc})"]
    found = []
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        found.append(f"transformers {transformers.__version__} < {MIN_TRANSFORMERS}")
    if "ddp_cache_data" not in inspect.signature(DynamicCache.__init__).parameters:
        found.append("DynamicCache(ddp_cache_data=...) is gone")
    if not callable(getattr(DynamicCache, "batch_select_indices", None)):
        found.append("DynamicCache.batch_select_indices is gone")
    if found:
        return found
    try:  # a round trip through a one-layer cache: what join, select and trim read and write
        k = torch.arange(4.0).reshape(1, 1, 2, 2)  # (B, H, T, d)
        cache = DynamicCache()
        cache.update(k, k + 1, 0)
        layers = list(getattr(cache, "layers", []))
        if len(layers) != 1 or type(layers[0]) is not DynamicLayer or not layers[0].is_initialized:
            found.append(f"DynamicCache().layers holds {[type(x).__name__ for x in layers]}, "
                         "not one initialised DynamicLayer")
        elif not (torch.equal(layers[0].keys, k) and torch.equal(layers[0].values, k + 1)):
            found.append("DynamicLayer.keys / .values do not hold the cached tensors")
        else:
            rebuilt = list(DynamicCache(ddp_cache_data=[(k, k + 1)]).layers)
            if not torch.equal(rebuilt[0].keys, k):
                found.append("DynamicCache(ddp_cache_data=...) does not hold the given tensors")
    except Exception as exc:  # noqa: BLE001 - any failure here means: do not touch the internals
        found.append(f"the probe failed: {type(exc).__name__}: {exc}")
    return found


@functools.cache
def supported() -> bool:
    """Whether rows may join and leave a cache here (checked once; the reason is logged once)."""
    found = problems()
    if found:
        logger.warning("Continuous batching: requests will not join a batch already decoding, because "
                       "the KV-cache internals it uses are not as expected (%s). Each admitted group "
                       "runs to completion instead.", "; ".join(found))
    return not found


def forward_kwargs(model: Any) -> tuple[str, dict[str, int]]:
    """``(name of the KV-cache argument, {"logits_to_keep": 1} or {})`` of ``model.forward``."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return cache_kw, ({"logits_to_keep": 1} if "logits_to_keep" in params or accepts_kwargs else {})


def new_cache() -> Any:
    """An empty ``DynamicCache`` for a prefill (built without a config: plain ``DynamicLayer`` s)."""
    from transformers import DynamicCache

    return DynamicCache()


def _layers(cache: Any) -> list:
    return list(getattr(cache, "layers", []))


def joinable(cache: Any) -> bool:
    """Whether rows can be added to ``cache`` (None: no batch yet, so yes): every layer a plain,
    initialised ``DynamicLayer``, on a transformers whose internals are as expected."""
    if cache is None:
        return True
    if not supported():
        return False
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def select_rows(cache: Any, idx: torch.Tensor) -> None:
    """Keep rows ``idx`` of ``cache``, in place."""
    cache.batch_select_indices(idx)


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def join(cache_a: Any, mask_a: torch.Tensor, cache_b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Stack two batches' caches and masks, left-padding the shorter one; ``(B_a + B_b, T)``.
    Only for caches :func:`joinable` accepts."""
    from transformers import DynamicCache

    T = max(mask_a.shape[1], mask_b.shape[1])
    pa, pb = T - mask_a.shape[1], T - mask_b.shape[1]
    data = []
    for la, lb in zip(_layers(cache_a), _layers(cache_b)):  # keys/values: (B, H, T, d)
        data.append((torch.cat([_pad_left(la.keys, pa, -2), _pad_left(lb.keys, pb, -2)]),
                     torch.cat([_pad_left(la.values, pa, -2), _pad_left(lb.values, pb, -2)])))
    mask = torch.cat([_pad_left(mask_a, pa, 1), _pad_left(mask_b, pb, 1)])
    return DynamicCache(ddp_cache_data=data), mask


def trim_left(cache: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Drop leading columns that no remaining row attends to (a cache that cannot be joined is
    left as it is)."""
    if not joinable(cache):
        return cache, mask
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else 0
    if start == 0:
        return cache, mask
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
    return cache, mask[:, start:]

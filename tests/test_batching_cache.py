"""The KV-cache surgery of continuous batching (``steerplug.batching.cache``) and the transformers
internals it relies on. When transformers moves them, the first test here fails and says what moved;
the others check what join, select and trim do, on tensors and through a model."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
import transformers
from conftest import make_tiny_model
from transformers import DynamicCache

from steerplug.batching import cache as kv


def _filled(*per_layer: tuple[torch.Tensor, torch.Tensor]) -> DynamicCache:
    """A DynamicCache filled the way a prefill fills it: one update per layer."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(per_layer):
        cache.update(k, v, i)
    return cache


def test_the_transformers_cache_internals_are_where_the_engine_expects_them():
    moved = kv.problems()
    assert not moved, (f"transformers {transformers.__version__} moved the KV-cache internals that "
                       f"steerplug/batching/cache.py relies on: {moved}. Update that module (the one "
                       "place touching them); until then rows cannot join a running batch.")
    assert kv.supported()
    # the same facts, checked here without the module's own probe
    from transformers.cache_utils import DynamicLayer

    k = torch.randn(2, 3, 4, 5)  # (B, H, T, d)
    cache = _filled((k, -k), (2 * k, -2 * k))
    assert [type(layer) for layer in cache.layers] == [DynamicLayer, DynamicLayer]
    assert all(layer.is_initialized for layer in cache.layers)
    assert torch.equal(cache.layers[1].keys, 2 * k) and torch.equal(cache.layers[1].values, -2 * k)
    assert "ddp_cache_data" in inspect.signature(DynamicCache.__init__).parameters
    rebuilt = DynamicCache(ddp_cache_data=[(k, -k)])
    assert type(rebuilt.layers[0]) is DynamicLayer and torch.equal(rebuilt.layers[0].values, -k)
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, k[1:]) and torch.equal(cache.layers[1].values, -2 * k[1:])


def test_join_select_and_trim_give_the_expected_tensors():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(1, 2, 2, 3, generator=g) for _ in range(4)]  # one row, T=2: (k, v) of 2 layers
    b = [torch.randn(2, 2, 3, 3, generator=g) for _ in range(4)]  # two rows, T=3
    cache_a, cache_b = _filled((a[0], a[1]), (a[2], a[3])), _filled((b[0], b[1]), (b[2], b[3]))
    mask_a = torch.tensor([[1, 1]])
    mask_b = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert kv.joinable(cache_a) and kv.joinable(cache_b) and kv.joinable(None)

    joined, mask = kv.join(cache_a, mask_a, cache_b, mask_b)
    assert mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]
    pad = torch.zeros(1, 2, 1, 3)
    for layer, (ka, va, kb, vb) in zip(joined.layers, ((a[0], a[1], b[0], b[1]), (a[2], a[3], b[2], b[3]))):
        assert torch.equal(layer.keys, torch.cat([torch.cat([pad, ka], dim=2), kb]))  # (3, H, 3, d)
        assert torch.equal(layer.values, torch.cat([torch.cat([pad, va], dim=2), vb]))
    assert kv.joinable(joined) and joined.get_seq_length() == 3

    kv.select_rows(joined, torch.tensor([0, 1]))  # the row of b that used every column leaves
    mask = mask[[0, 1]]
    joined, mask = kv.trim_left(joined, mask)  # ... so the first column is nobody's any more
    assert mask.tolist() == [[1, 1], [1, 1]]
    assert torch.equal(joined.layers[0].keys, torch.cat([a[0], b[0][:1, :, 1:]]))
    assert torch.equal(joined.layers[1].values, torch.cat([a[3], b[3][:1, :, 1:]]))
    keys, _ = joined.update(torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3), 0)  # it still grows
    assert keys.shape == (2, 2, 3, 3)


def test_without_the_internals_nothing_is_joined_or_trimmed(monkeypatch):
    mask = torch.tensor([[0, 1]])
    trimmed = _filled((torch.ones(1, 1, 2, 1), torch.ones(1, 1, 2, 1)))
    assert kv.joinable(trimmed) and kv.trim_left(trimmed, mask)[1].shape == (1, 1)
    cache = _filled((torch.ones(1, 1, 2, 1), torch.ones(1, 1, 2, 1)))
    monkeypatch.setattr(kv, "supported", lambda: False)
    assert not kv.joinable(cache) and kv.joinable(None)
    same, same_mask = kv.trim_left(cache, mask)
    assert same is cache and same_mask is mask and cache.layers[0].keys.shape[-2] == 2
    assert not kv.joinable(DynamicCache())  # nothing cached yet: no layer to join


def test_a_joined_cache_decodes_each_row_as_it_would_alone():
    """Two prompts prefilled apart, their caches joined: one decode step gives each row's solo logits."""
    torch.manual_seed(0)
    model = make_tiny_model("llama").eval()
    cache_kw, logits_kw = kv.forward_kwargs(model)
    assert cache_kw in inspect.signature(model.forward).parameters

    def forward(ids, mask, cache):
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        **logits_kw, **{cache_kw: cache})
        return out.logits[:, -1]

    prompts = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12]])]
    nxt = [torch.tensor([[3]]), torch.tensor([[4]])]
    solo = []
    for p, n in zip(prompts, nxt):
        cache, mask = kv.new_cache(), torch.ones_like(p)
        forward(p, mask, cache)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        solo.append(forward(n, mask, cache))
    caches, masks = [], []
    for p in prompts:
        cache, mask = kv.new_cache(), torch.ones_like(p)
        forward(p, mask, cache)
        caches.append(cache)
        masks.append(mask)
    joined, mask = kv.join(caches[0], masks[0], caches[1], masks[1])  # the short prompt left-padded
    mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
    together = forward(torch.cat(nxt), mask, joined)
    torch.testing.assert_close(together, torch.cat(solo), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moved", ["the version", "a method"])
def test_the_check_names_what_moved(monkeypatch, moved):
    if moved == "the version":
        monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.50.0")
        assert any("4.50.0 < 4.56" in p for p in kv.problems())
    else:
        monkeypatch.setattr(DynamicCache, "batch_select_indices", None)
        assert any("batch_select_indices" in p for p in kv.problems())

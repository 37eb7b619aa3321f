"""Finding blocks and hook points in any family; hook names map onto the right activations."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, N_LAYERS, make_tiny_model
from torch import nn

from steerplug import HookPointError, find_blocks, resolve_hook_point

EXPECTED_PATHS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_found_by_structure(arch):
    model = make_tiny_model(arch)
    path, blocks = find_blocks(model)
    assert path == EXPECTED_PATHS.get(arch, "model.layers")
    assert len(blocks) == N_LAYERS


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_post_is_the_block_output(arch):
    """``blocks.L.hook_resid_post`` equals hidden_states[L+1] (not for the last layer, whose
    hidden state is after the final norm); ``hook_resid_pre`` equals hidden_states[L]."""
    model = make_tiny_model(arch)
    ids = torch.randint(0, 250, (1, 7))
    hidden = model(ids, output_hidden_states=True).hidden_states
    seen = {}
    handles = []
    for name in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"):
        point = resolve_hook_point(model, name)
        if point.io == "output":
            handles.append(point.module.register_forward_hook(
                lambda m, a, o, n=name: seen.__setitem__(n, o if torch.is_tensor(o) else o[0])))
        else:
            handles.append(point.module.register_forward_pre_hook(
                lambda m, a, kw, n=name: seen.__setitem__(n, a[0] if a else kw["hidden_states"]),
                with_kwargs=True))
    model(ids)
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen["blocks.1.hook_resid_post"], hidden[2])
    torch.testing.assert_close(seen["blocks.2.hook_resid_pre"], hidden[2])


def test_name_forms():
    model = make_tiny_model("llama")
    assert resolve_hook_point(model, 2).module is model.model.layers[2]
    assert resolve_hook_point(model, "layers.2").name == "blocks.2.hook_resid_post"  # sparsify
    assert resolve_hook_point(model, "model.layers.1").module is model.model.layers[1]
    mlp = resolve_hook_point(model, "blocks.0.hook_mlp_out")
    assert mlp.module is model.model.layers[0].mlp and mlp.io == "output"
    assert resolve_hook_point(model, "blocks.3.hook_resid_pre").io == "input"
    explicit = resolve_hook_point(model, 1, layers_path="model.layers.{num}")
    assert explicit.module is model.model.layers[1]


def test_ambiguous_and_wrong_paths_are_refused():
    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.a = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.b = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    with pytest.raises(HookPointError, match=r"candidates.*\['a', 'b'\].*layers_path="):
        find_blocks(Twin())
    assert find_blocks(Twin(), layers_path="b")[0] == "b"
    with pytest.raises(HookPointError, match="no module 'c'"):
        find_blocks(Twin(), layers_path="c")
    with pytest.raises(HookPointError, match="out of range"):
        resolve_hook_point(make_tiny_model("gpt2"), -1)

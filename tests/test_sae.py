"""SparseAutoencoder maths against the definitions, config validation, save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from steerplug import SAEConfig, SparseAutoencoder
from steerplug.sae import SAE_CONFIG_NAME, SAE_WEIGHTS_NAME


def _sae(arch: str, apply_b_dec: bool = True) -> SparseAutoencoder:
    sae = SparseAutoencoder.random(16, 40, arch, k=5 if arch == "topk" else None, seed=0,
                                   apply_b_dec_to_input=apply_b_dec, hook_name="blocks.3.hook_resid_post")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return sae


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_matches_the_definition(arch, apply_b_dec):
    sae = _sae(arch, apply_b_dec)
    x = torch.randn(7, 16)
    W, b, bd = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
    pre = ((x - bd) if apply_b_dec else x) @ W + b
    if arch == "relu":
        ref = pre.clamp(min=0)
    elif arch == "jumprelu":
        ref = torch.where(pre > sae.threshold.detach(), pre, torch.zeros_like(pre)).clamp(min=0)
    else:
        ref = torch.zeros_like(pre)
        for i in range(pre.shape[0]):
            top = sorted(range(40), key=lambda j: -pre[i, j].item())[:5]
            for j in top:
                ref[i, j] = max(pre[i, j].item(), 0.0)
    f = sae.encode(x)
    torch.testing.assert_close(f, ref)
    out = sae(x)
    torch.testing.assert_close(out.reconstruction, ref @ sae.W_dec.detach() + bd)
    if arch == "topk":
        assert int((f > 0).sum(-1).max()) <= 5


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_round_trip_in_saelens_layout(tmp_path, arch):
    sae = _sae(arch)
    sae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / SAE_CONFIG_NAME).read_text())
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "architecture",
                "normalize_activations", "metadata"):
        assert key in cfg
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    tensors = load_file(str(tmp_path / SAE_WEIGHTS_NAME))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    expected = {"W_enc": (16, 40), "W_dec": (40, 16), "b_enc": (40,), "b_dec": (16,)}
    if arch == "jumprelu":
        expected["threshold"] = (40,)
    assert shapes == expected
    if arch == "topk":
        assert cfg["k"] == 5
    back = SparseAutoencoder.from_pretrained(tmp_path)
    x = torch.randn(4, 16)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    assert back.cfg.layer == 3


def test_config_validation():
    with pytest.raises(ValueError, match="architecture='gated'"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(ValueError, match="k=None"):
        SAEConfig(d_in=4, d_sae=8, architecture="topk")
    with pytest.raises(ValueError, match="d_in=0"):
        SAEConfig(d_in=0, d_sae=8)


def test_wrong_tensor_shapes_are_named(tmp_path):
    sae = _sae("relu")
    sae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / SAE_CONFIG_NAME).read_text())
    cfg["d_sae"] = 41
    (tmp_path / SAE_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="W_enc.*shape \\(16, 40\\), expected \\(16, 41\\)"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_missing_folder_and_files(tmp_path):
    from steerplug.hub import ArtifactNotFoundError
    from steerplug.sae_formats import UnknownSAEFormatError

    with pytest.raises(ArtifactNotFoundError, match="No such folder"):
        SparseAutoencoder.from_pretrained(tmp_path / "nope")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(UnknownSAEFormatError, match="junk.txt"):
        SparseAutoencoder.from_pretrained(tmp_path)
    with pytest.raises(ArtifactNotFoundError, match="subfolder 'layer_3'"):
        SparseAutoencoder.from_pretrained(tmp_path, subfolder="layer_3")

"""Loading models: a Hub id through a local Hugging Face cache, built objects, and the offline default."""

from __future__ import annotations

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel, SteeringVector
from steerplug.hub import ArtifactNotFoundError


def _fake_hub_cache(root, repo_id: str, write) -> None:
    """Lay out ``root`` as huggingface_hub's cache holding ``repo_id`` at one snapshot."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    write(snap)


def test_everything_from_a_local_hub_cache(tmp_path):
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    sae = SparseAutoencoder.random(64, 128, hook_name="blocks.1.hook_resid_post")
    vec = SteeringVector.from_dense(torch.randn(128), top_k=8)

    def write_model(snap):
        model.save_pretrained(snap)
        tok.save_pretrained(snap)

    def write_artifacts(snap):
        sae.save_pretrained(snap / "sae")
        vec.save_pretrained(snap / "vector")

    _fake_hub_cache(tmp_path, "org/tiny-llama", write_model)
    _fake_hub_cache(tmp_path, "org/tiny-steer", write_artifacts)
    steered = SteeredModel.from_pretrained(
        "org/tiny-llama", sae="org/tiny-steer", sae_subfolder="sae", vector="org/tiny-steer",
        vector_subfolder="vector", cache_dir=tmp_path, local_files_only=True, positions="all")
    assert steered.hook_point.name == "blocks.1.hook_resid_post"
    ids = torch.randint(0, 250, (1, 6))
    torch.testing.assert_close(steered.model(ids).logits, model(ids).logits)  # same weights
    assert not torch.allclose(steered(ids).logits, model(ids).logits)

    with pytest.raises(ArtifactNotFoundError, match="'org/missing'.*not in the Hugging Face cache"):
        SparseAutoencoder.from_pretrained("org/missing", cache_dir=tmp_path, local_files_only=True)


def test_a_built_model_needs_its_tokenizer():
    from steerplug import load_model

    model = make_tiny_model("llama")
    model.config.name_or_path = ""
    with pytest.raises(ValueError, match="tokenizer="):
        load_model(model)
    assert load_model(model, make_byte_tokenizer())[0] is model


def test_unknown_steering_argument_is_named():
    with pytest.raises(TypeError, match="stepz"):
        SteeredModel.from_pretrained(make_tiny_model("llama"), tokenizer=make_byte_tokenizer(),
                                     sae=None, vector=None, stepz=3)


def test_a_hub_model_missing_from_the_cache_is_named(tmp_path):
    with pytest.raises(OSError, match="(?s)'org/not-here'.*Offline"):
        SteeredModel.from_pretrained("org/not-here", sae=None, vector=None, cache_dir=tmp_path,
                                     local_files_only=True)


def test_device_map_loaded_model_steers_like_the_plain_one(tmp_path):
    """A model loaded with a device_map (accelerate's dispatch hooks on its modules) steers the same."""
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    sae = SparseAutoencoder.random(64, 128, hook_name="blocks.2.hook_resid_post")
    vec = SteeringVector.from_dense(torch.randn(128), top_k=8)
    plain = SteeredModel(model, tok, sae, vec, config=None)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}  # the hooked layer is offloaded
    mapped = SteeredModel.from_pretrained(str(tmp_path), sae=sae, vector=vec, device_map=device_map,
                                          model_kwargs={"offload_folder": str(tmp_path / "off")})
    assert hasattr(mapped.model.model.layers[2], "_hf_hook")  # accelerate's dispatch hook is there
    ids = torch.randint(0, 250, (2, 9))
    a = plain.generate(ids, max_new_tokens=6, do_sample=False)
    b = mapped.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)

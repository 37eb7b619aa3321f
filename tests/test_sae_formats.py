"""Every SAE format we read, against an independent reference written from the format's own
definition: a fixture folder in the format's exact layout (small random tensors, d_in != d_sae so
a wrong orientation cannot pass), loaded with ``SparseAutoencoder.from_pretrained``, must encode
and decode like the reference. Plus our SAELens 6 output layout, the Hugging Face cache path and
the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from steerplug.hub import ArtifactNotFoundError
from steerplug.sae import SparseAutoencoder
from steerplug.sae_formats import READERS, UnknownSAEFormatError

D, N = 8, 24  # d_in, d_sae
ATOL = 1e-5


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)) * scale


def _x(seed: int = 99) -> torch.Tensor:
    return _randn(3, 5, D, seed=seed, scale=2.0)  # (B, T, D): readers must handle leading dims


def _check(sae: SparseAutoencoder, x: torch.Tensor, f_ref: torch.Tensor, xhat_ref: torch.Tensor):
    f = sae.encode(x)
    active = (f_ref != 0).float().mean().item()
    assert 0.0 < active < 1.0, f"fixture is degenerate (fraction active {active})"
    torch.testing.assert_close(f, f_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(sae.decode(f_ref), xhat_ref, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(sae(x).reconstruction, xhat_ref, atol=ATOL, rtol=1e-5)


# --- SAELens ----------------------------------------------------------------------------------
def _saelens_tensors(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    t = {"W_enc": _randn(D, N, seed=seed), "W_dec": _randn(N, D, seed=seed + 1),
         "b_enc": _randn(N, seed=seed + 2, scale=0.5), "b_dec": _randn(D, seed=seed + 3, scale=0.5)}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(N, generator=_g(seed + 4)) * 2
    return t


def _saelens_reference(t, x, arch, apply_b_dec, k=None):
    """SAELens: pre = (x - b_dec*a) @ W_enc + b_enc; standard relu; jumprelu relu(pre)*(pre>thr);
    topk keeps the k largest pre then relu; decode f @ W_dec + b_dec."""
    pre = (x - t["b_dec"] * float(apply_b_dec)) @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        f = torch.relu(pre)
    elif arch == "jumprelu":
        f = torch.relu(pre) * (pre > t["threshold"]).float()
    else:
        kth = pre.topk(k, dim=-1).values[..., -1:]
        f = torch.where(pre >= kth, torch.relu(pre), torch.zeros_like(pre))
    return f, f @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("jumprelu", False), ("topk", True)])
def test_saelens_v6(tmp_path, arch, apply_b_dec):
    t = _saelens_tensors(arch)
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "architecture": arch,
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": "org/model", "hook_name": "blocks.4.hook_resid_post",
                        "hook_head_index": None, "prepend_bos": True, "sae_lens_version": "6.54.12"}}
    if arch == "topk":
        cfg["k"] = 5
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = SparseAutoencoder.from_pretrained(tmp_path)
    assert sae.cfg.hook_name == "blocks.4.hook_resid_post" and sae.cfg.layer == 4
    assert sae.cfg.model_name == "org/model"
    _check(sae, _x(), *_saelens_reference(t, _x(), arch, apply_b_dec, k=5))


def test_saelens_v6_topk_rescaled_by_decoder_norm(tmp_path):
    t = _saelens_tensors("topk", seed=7)
    t["W_dec"] = t["W_dec"] * torch.linspace(0.2, 3.0, N)[:, None]  # rows of unequal norm
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "architecture": "topk",
           "k": 5, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"sae_lens_version": "6.54.12"}}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = SparseAutoencoder.from_pretrained(tmp_path)
    # SAELens TopKSAE: hidden_pre * |W_dec row| -> top k -> relu; decode (f / |W_dec row|) @ W_dec
    norms = t["W_dec"].norm(dim=-1)
    pre = ((_x() - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    kth = pre.topk(5, dim=-1).values[..., -1:]
    f = torch.where(pre >= kth, torch.relu(pre), torch.zeros_like(pre))
    _check(sae, _x(), f, (f / norms) @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("act", ["relu", "topk"])
def test_saelens_v5_flat_config(tmp_path, act):
    t = _saelens_tensors("standard", seed=10)
    cfg = {"d_in": D, "d_sae": N, "dtype": "torch.float32", "device": "cpu",
           "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3,
           "activation_fn_str": act, "activation_fn_kwargs": {"k": 6} if act == "topk" else {},
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "finetuning_scaling_factor": False, "context_size": 128}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = SparseAutoencoder.from_pretrained(tmp_path)
    assert sae.cfg.architecture == act and sae.cfg.hook_name == "blocks.3.hook_resid_pre"
    arch = "standard" if act == "relu" else "topk"
    _check(sae, _x(), *_saelens_reference(t, _x(), arch, True, k=6))


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_saved_folder_is_saelens6_layout(tmp_path, arch):
    """What we write has exactly the keys, tensor names and shapes SAELens 6 reads."""
    sae = SparseAutoencoder.random(D, N, architecture=arch, k=4 if arch == "topk" else None,
                                   seed=3, hook_name="blocks.2.hook_resid_post",
                                   model_name="org/model")
    with torch.no_grad():
        sae.b_enc.copy_(_randn(N, seed=5, scale=0.3))
        sae.b_dec.copy_(_randn(D, seed=6, scale=0.3))
    sae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "architecture",
                "normalize_activations", "metadata"):
        assert key in cfg, key
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, N, "float32", "cpu")
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "org/model"
    # SAELens treats a cfg.json without sae_lens_version >= 6 as pre-6 and drops `metadata`.
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert ("k" in cfg) == (arch == "topk") and cfg.get("k", 4) == 4
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    shapes = {"W_enc": (D, N), "W_dec": (N, D), "b_enc": (N,), "b_dec": (D,)}
    if arch == "jumprelu":
        shapes["threshold"] = (N,)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    # ... and the SAELens definition applied to those raw tensors gives our encode/decode.
    ref = _saelens_reference(tensors, _x(), cfg["architecture"], True, k=cfg.get("k"))
    _check(SparseAutoencoder.from_pretrained(tmp_path), _x(), *ref)
    _check(sae, _x(), *ref)


# --- Gemma Scope --------------------------------------------------------------------------------
def _gemma_reference(p, x):
    """Gemma Scope tutorial: pre = x @ W_enc + b_enc; acts = (pre > threshold) * relu(pre);
    decode acts @ W_dec + b_dec (no b_dec subtraction on the input)."""
    pre = x @ p["W_enc"] + p["b_enc"]
    f = (pre > p["threshold"]).float() * torch.relu(pre)
    return f, f @ p["W_dec"] + p["b_dec"]


def _gemma_params(seed=20):
    return {"W_enc": _randn(D, N, seed=seed), "W_dec": _randn(N, D, seed=seed + 1),
            "b_enc": _randn(N, seed=seed + 2, scale=0.5), "b_dec": _randn(D, seed=seed + 3),
            "threshold": torch.rand(N, generator=_g(seed + 4)) * 2}


def test_gemma_scope_npz(tmp_path):
    p = _gemma_params()
    folder = tmp_path / "layer_5" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    sae = SparseAutoencoder.from_pretrained(tmp_path, subfolder="layer_5/width_16k/average_l0_20")
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert sae.cfg.hook_name == "blocks.5.hook_resid_post"
    _check(sae, _x(), *_gemma_reference(p, _x()))


def test_gemma_scope_2_safetensors(tmp_path):
    p = _gemma_params(seed=30)
    folder = tmp_path / "resid_post" / "layer_7_width_16k_l0_small"
    folder.mkdir(parents=True)
    save_file({"w_enc": p["W_enc"], "w_dec": p["W_dec"], "b_enc": p["b_enc"], "b_dec": p["b_dec"],
               "threshold": p["threshold"]}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {"hf_hook_point_in": "model.language_model.layers.7.output", "model_name": "google/gemma-3-1b-pt"}))
    sae = SparseAutoencoder.from_pretrained(folder)
    assert sae.cfg.hook_name == "blocks.7.hook_resid_post"
    assert sae.cfg.model_name == "google/gemma-3-1b-pt"
    _check(sae, _x(), *_gemma_reference(p, _x()))


# --- EleutherAI sparsify ------------------------------------------------------------------------
def _write_sparsify(root: Path, hookpoint: str, k: int = 5, seed: int = 40, **extra_tensors):
    folder = root / hookpoint
    folder.mkdir(parents=True)
    t = {"encoder.weight": _randn(N, D, seed=seed), "encoder.bias": _randn(N, seed=seed + 1, scale=0.5),
         "W_dec": _randn(N, D, seed=seed + 2), "b_dec": _randn(D, seed=seed + 3, scale=0.5), **extra_tensors}
    save_file(t, str(folder / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": N // D, "normalize_decoder": True,
           "num_latents": N, "k": k, "multi_topk": False, "skip_connection": "W_skip" in t,
           "transcode": False, "d_in": D}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, t


def _sparsify_reference(t, x, k):
    """sparsify SparseCoder: acts = relu(encoder(x - b_dec)); top-k (values, indices);
    decode = sum_j acts_j * W_dec[idx_j] + b_dec."""
    pre = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    xhat = (vals.unsqueeze(-1) * t["W_dec"][idx]).sum(-2) + t["b_dec"]
    return f, xhat


def test_sparsify(tmp_path):
    _, t = _write_sparsify(tmp_path, "layers.10", k=5)
    (tmp_path / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "batch_size": 8}))
    sae = SparseAutoencoder.from_pretrained(tmp_path, subfolder="layers.10")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 5 and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.hook_name == "blocks.10.hook_resid_post"
    assert sae.cfg.model_name == "EleutherAI/pythia-70m"
    _check(sae, _x(), *_sparsify_reference(t, _x(), 5))


def test_sparsify_mlp_hookpoint_and_transcoder_refused(tmp_path):
    folder, _ = _write_sparsify(tmp_path, "layers.3.mlp")
    assert SparseAutoencoder.from_pretrained(folder).cfg.hook_name == "blocks.3.hook_mlp_out"
    tc, _ = _write_sparsify(tmp_path, "layers.4", W_skip=torch.zeros(D, D))
    with pytest.raises(ValueError, match="transcoder"):
        SparseAutoencoder.from_pretrained(tc)


def test_sparsify_wrong_orientation_is_named(tmp_path):
    folder, t = _write_sparsify(tmp_path, "layers.1")
    t["W_dec"] = t["W_dec"].T.contiguous()  # (D, N): the transposition SAELens's loader gets wrong
    save_file(t, str(folder / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"'W_dec' has shape \(8, 24\), expected \(24, 8\)"):
        SparseAutoencoder.from_pretrained(folder)


# --- Goodfire --------------------------------------------------------------------------------
def _goodfire_sd(seed=50):
    return {"encoder_linear.weight": _randn(N, D, seed=seed),
            "encoder_linear.bias": _randn(N, seed=seed + 1, scale=0.5),
            "decoder_linear.weight": _randn(D, N, seed=seed + 2),
            "decoder_linear.bias": _randn(D, seed=seed + 3)}


def test_goodfire(tmp_path):
    sd = _goodfire_sd()
    torch.save(sd, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    sae = SparseAutoencoder.from_pretrained(tmp_path)
    assert sae.cfg.hook_name == "blocks.19.hook_resid_post"
    assert sae.cfg.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert not sae.cfg.apply_b_dec_to_input
    # Goodfire: f = relu(encoder_linear(x)); x_hat = decoder_linear(f)
    f_ref = F.relu(F.linear(_x(), sd["encoder_linear.weight"], sd["encoder_linear.bias"]))
    _check(sae, _x(), f_ref, F.linear(f_ref, sd["decoder_linear.weight"], sd["decoder_linear.bias"]))


class _NotATensor:  # pickled into a .pth to prove we never unpickle arbitrary objects
    pass


def test_pickles_are_only_loaded_weights_only(tmp_path):
    sd = {**_goodfire_sd(), "payload": _NotATensor()}
    torch.save(sd, tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        SparseAutoencoder.from_pretrained(tmp_path)


# --- Llama Scope ---------------------------------------------------------------------------------
def _write_llama_scope(root: Path, *, apply_bias_pre_encoder=False, include_dec_norm=True, seed=60):
    folder = root / "Llama3_1-8B-Base-L15R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    t = {"encoder.weight": _randn(N, D, seed=seed, scale=0.3),
         "encoder.bias": _randn(N, seed=seed + 1, scale=0.3),
         # decoder columns of unequal norm, so the decoder-norm-scaled threshold matters
         "decoder.weight": _randn(D, N, seed=seed + 2) * torch.linspace(0.3, 2.0, N),
         "decoder.bias": _randn(D, seed=seed + 3, scale=0.5)}
    save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    hp = {"d_model": D, "expansion_factor": N // D, "d_sae": N, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 5.0, "out": 4.0},
          "sparsity_include_decoder_norm": include_dec_norm, "top_k": 50, "act_fn": "jumprelu",
          "jump_relu_threshold": 0.6, "apply_decoder_bias_to_pre_encoder": apply_bias_pre_encoder,
          "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
          "use_decoder_bias": True}
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    return folder, t, hp


def _llama_scope_reference(t, hp, x):
    """lm_saes SparseAutoEncoder, dataset-wise norm: x is scaled by sqrt(d_model)/norm_in (and
    the decoder bias subtracted if apply_decoder_bias_to_pre_encoder); hidden_pre = encoder(x);
    fires where hidden_pre * |decoder column| > threshold (decoder norm only with
    sparsity_include_decoder_norm); the reconstruction, in the output's scaled space, is divided
    by sqrt(d_model)/norm_out to return to raw activations."""
    c_in = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    c_out = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["out"]
    xs = x * c_in
    if hp["apply_decoder_bias_to_pre_encoder"]:
        xs = xs - t["decoder.bias"]
    hidden_pre = F.linear(xs, t["encoder.weight"], t["encoder.bias"])
    scores = hidden_pre * (t["decoder.weight"].norm(dim=0) if hp["sparsity_include_decoder_norm"] else 1.0)
    f = hidden_pre * (scores > hp["jump_relu_threshold"]).float()
    return f, F.linear(f, t["decoder.weight"], t["decoder.bias"]) / c_out


@pytest.mark.parametrize("apply_bias_pre_encoder,include_dec_norm", [(False, True), (True, False)])
def test_llama_scope(tmp_path, apply_bias_pre_encoder, include_dec_norm):
    folder, t, hp = _write_llama_scope(tmp_path, apply_bias_pre_encoder=apply_bias_pre_encoder,
                                       include_dec_norm=include_dec_norm)
    sae = SparseAutoencoder.from_pretrained(folder)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.hook_name == "blocks.15.hook_resid_post"
    assert sae.cfg.model_name == "meta-llama/Llama-3.1-8B"
    x = _x() * 3
    _check(sae, x, *_llama_scope_reference(t, hp, x))


def test_llama_scope_transcoder_refused(tmp_path):
    folder, _, hp = _write_llama_scope(tmp_path)
    hp["hook_point_out"] = "blocks.15.hook_mlp_out"
    (folder / "hyperparams.json").write_text(json.dumps(hp))
    with pytest.raises(ValueError, match="transcoder"):
        SparseAutoencoder.from_pretrained(folder)


# --- saprmarks dictionary_learning -------------------------------------------------------------
def _dl_write(tmp_path: Path, dict_class: str, sd: dict, k: int | None = None) -> Path:
    folder = tmp_path / f"resid_post_layer_3/trainer_{dict_class}"
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    trainer = {"trainer_class": "X", "dict_class": dict_class, "activation_dim": D, "dict_size": N,
               "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped",
               "submodule_name": "resid_post_layer_3"}
    if k is not None:
        trainer["k"] = k
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return folder


def _dl_linear(seed, dec_bias=False):
    sd = {"encoder.weight": _randn(N, D, seed=seed), "encoder.bias": _randn(N, seed=seed + 1, scale=0.5),
          "decoder.weight": _randn(D, N, seed=seed + 2)}
    if dec_bias:
        sd["decoder.bias"] = _randn(D, seed=seed + 3)
    return sd


def test_dictionary_learning_autoencoder(tmp_path):
    sd = {**_dl_linear(70), "bias": _randn(D, seed=74)}
    sae = SparseAutoencoder.from_pretrained(_dl_write(tmp_path, "AutoEncoder", sd))
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.model_name == "EleutherAI/pythia-70m-deduped"
    # AutoEncoder: encode relu(encoder(x - bias)); decode decoder(f) + bias
    f = F.relu(F.linear(_x() - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))
    _check(sae, _x(), f, F.linear(f, sd["decoder.weight"]) + sd["bias"])


def test_dictionary_learning_autoencoder_new(tmp_path):
    sd = _dl_linear(80, dec_bias=True)
    sae = SparseAutoencoder.from_pretrained(_dl_write(tmp_path, "AutoEncoderNew", sd))
    # AutoEncoderNew: relu(encoder(x)); decoder(f) (with its own bias)
    f = F.relu(F.linear(_x(), sd["encoder.weight"], sd["encoder.bias"]))
    _check(sae, _x(), f, F.linear(f, sd["decoder.weight"], sd["decoder.bias"]))


def test_dictionary_learning_topk(tmp_path):
    sd = {**_dl_linear(90), "b_dec": _randn(D, seed=94), "k": torch.tensor(4, dtype=torch.int),
          "threshold": torch.tensor(0.3)}
    sae = SparseAutoencoder.from_pretrained(_dl_write(tmp_path, "AutoEncoderTopK", sd, k=4))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4
    # AutoEncoderTopK.encode: post_relu = relu(encoder(x - b_dec)); keep its top k; decoder(f) + b_dec
    post = F.relu(F.linear(_x() - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
    top = post.topk(4, dim=-1, sorted=False)
    f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    _check(sae, _x(), f, F.linear(f, sd["decoder.weight"]) + sd["b_dec"])


def test_dictionary_learning_batch_topk_uses_threshold(tmp_path):
    sd = {**_dl_linear(100), "b_dec": _randn(D, seed=104), "k": torch.tensor(4, dtype=torch.int),
          "threshold": torch.tensor(1.5)}
    sae = SparseAutoencoder.from_pretrained(_dl_write(tmp_path, "BatchTopKSAE", sd, k=4))
    # BatchTopKSAE.encode (use_threshold=True): post_relu * (post_relu > threshold)
    post = F.relu(F.linear(_x() - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
    f = post * (post > sd["threshold"])
    _check(sae, _x(), f, F.linear(f, sd["decoder.weight"]) + sd["b_dec"])


def test_dictionary_learning_jumprelu(tmp_path):
    sd = {"W_enc": _randn(D, N, seed=110), "b_enc": _randn(N, seed=111, scale=0.5),
          "W_dec": _randn(N, D, seed=112), "b_dec": _randn(D, seed=113),
          "threshold": torch.rand(N, generator=_g(114)) * 2}
    sae = SparseAutoencoder.from_pretrained(_dl_write(tmp_path, "JumpReluAutoEncoder", sd))
    # JumpReluAutoEncoder (apply_b_dec_to_input=False): relu(pre * (pre > threshold))
    pre = _x() @ sd["W_enc"] + sd["b_enc"]
    f = F.relu(pre * (pre > sd["threshold"]))
    _check(sae, _x(), f, f @ sd["W_dec"] + sd["b_dec"])


def test_dictionary_learning_gated_refused(tmp_path):
    folder = _dl_write(tmp_path, "GatedAutoEncoder", {"encoder.weight": torch.zeros(N, D)})
    with pytest.raises(ValueError, match="GatedAutoEncoder"):
        SparseAutoencoder.from_pretrained(folder)


# --- resolution: Hugging Face cache, offline, unknown formats -----------------------------------
def _fake_cache(cache_dir: Path, repo_id: str, sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    return snap


def test_load_from_hf_cache_offline(tmp_path):
    cache = tmp_path / "hub"
    snap = _fake_cache(cache, "org/saes")
    # a SAELens SAE and a sparsify SAE side by side in one repo
    src = SparseAutoencoder.random(D, N, architecture="jumprelu", seed=1,
                                   hook_name="blocks.1.hook_resid_post")
    src.save_pretrained(snap / "blocks.1.hook_resid_post")
    _, t = _write_sparsify(snap, "layers.2", k=3)
    sae = SparseAutoencoder.from_pretrained("org/saes", subfolder="blocks.1.hook_resid_post",
                                            cache_dir=cache, local_files_only=True)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    for name, p in src.named_parameters():
        torch.testing.assert_close(getattr(sae, name), p)
    sp = SparseAutoencoder.from_pretrained("org/saes", subfolder="layers.2", cache_dir=cache,
                                           local_files_only=True)
    assert sp.cfg.hook_name == "blocks.2.hook_resid_post"
    _check(sp, _x(), *_sparsify_reference(t, _x(), 3))


def test_repo_missing_from_cache_offline_is_clear(tmp_path):
    with pytest.raises(ArtifactNotFoundError,
                       match=r"'org/absent'.*not in the Hugging Face cache.*hf download org/absent"):
        SparseAutoencoder.from_pretrained("org/absent", cache_dir=tmp_path, local_files_only=True)


def test_missing_subfolder_in_cache_is_clear(tmp_path):
    snap = _fake_cache(tmp_path, "org/saes")
    SparseAutoencoder.random(D, N).save_pretrained(snap / "layer_0")
    with pytest.raises(ArtifactNotFoundError, match="layer_9"):
        SparseAutoencoder.from_pretrained("org/saes", subfolder="layer_9", cache_dir=tmp_path,
                                          local_files_only=True)


def test_unknown_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnknownSAEFormatError, match="No SAE format recognised") as e:
        SparseAutoencoder.from_pretrained(tmp_path)
    for reader in READERS:
        assert reader.name in str(e.value)
    assert "weights.bin" in str(e.value)


def test_repo_root_of_many_saes_names_the_subfolders(tmp_path):
    _write_sparsify(tmp_path, "layers.3")
    _write_sparsify(tmp_path, "layers.7")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnknownSAEFormatError, match=r"subfolder= one of \['layers.3', 'layers.7'\]"):
        SparseAutoencoder.from_pretrained(tmp_path)

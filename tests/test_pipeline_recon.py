"""Reconstruction statistics by position bucket and with massive-activation tokens set apart."""

from __future__ import annotations

import pytest
import torch

from steerplug import SAEConfig, SparseAutoencoder
from steerplug.pipeline.recon import detailed_stats, massive_mask, reconstruction_stats


def _signed_identity_sae(d: int, k: int) -> SparseAutoencoder:
    """Latents +x_i and -x_i: TopK keeps the k largest |x_i|, so a row whose energy sits in at
    most k coordinates is reconstructed exactly and a spread-out row loses the rest."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, architecture="topk", k=k))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def test_a_massive_token_is_set_apart_from_the_typical_fve():
    g = torch.Generator().manual_seed(0)
    d = 16
    sae = _signed_identity_sae(d, k=4)
    typical = torch.randn(999, d, generator=g)  # spread out: badly reconstructed with k=4
    massive = torch.zeros(1, d)
    massive[0, 3] = 1000.0  # one coordinate: reconstructed exactly, and most of the variance
    acts = torch.cat([typical[:500], massive, typical[500:]])

    stats, freq = detailed_stats(sae, acts)
    alone = reconstruction_stats(sae, typical)
    assert stats["massive"]["n_tokens"] == 1 and stats["massive"]["relative_error"] == pytest.approx(0, abs=1e-9)
    assert stats["massive"]["variance_share"] > 0.9
    assert stats["fve"] > 0.98  # the one token dominates the plain FVE ...
    assert stats["fve_typical"] == pytest.approx(alone.fve, abs=1e-6)  # ... and is left out of this one
    assert alone.fve < 0.8
    assert stats["n_tokens"] == 1000 and freq.shape == (2 * d,)

    # Without a massive token both figures agree.
    plain, _ = detailed_stats(sae, typical)
    assert plain["massive"]["n_tokens"] == 0 and plain["fve_typical"] == plain["fve"]


def test_position_buckets_score_each_range_against_the_common_mean():
    g = torch.Generator().manual_seed(1)
    d, n = 8, 1200
    sae = _signed_identity_sae(d, k=2)
    positions = torch.arange(1, n + 1) % 1100  # 1..1099 then 0..100
    scale = torch.ones(d)
    acts = torch.randn(n, d, generator=g) * scale
    late = positions >= 512
    acts[late, :2] *= 5  # late rows: energy in two coordinates, reconstructed better
    stats, _ = detailed_stats(sae, acts, positions)
    b = stats["buckets"]
    assert list(b) == ["0-127", "128-511", "512-1023", "1024+"]
    assert sum(v["n_tokens"] for v in b.values()) == n
    mean = acts.mean(0)
    with torch.no_grad():
        x_hat = sae(acts).reconstruction
    for name, lo, hi in [("0-127", 0, 128), ("512-1023", 512, 1024)]:
        m = (positions >= lo) & (positions < hi)
        want = 1 - float((x_hat[m] - acts[m]).pow(2).sum() / (acts[m] - mean).pow(2).sum())
        assert b[name]["fve"] == pytest.approx(want, abs=1e-5)
        assert b[name]["l0"] == pytest.approx(2.0)
    assert b["512-1023"]["fve"] > b["128-511"]["fve"] + 0.2


def test_massive_mask_uses_the_median_norm():
    norm = torch.tensor([1.0, 1.1, 0.9, 1.0, 25.0])
    assert massive_mask(norm).tolist() == [False, False, False, False, True]
    assert not massive_mask(norm, ratio=30).any()


@pytest.mark.parametrize("ratio,dropped", [("10", 2), ("0", 0)])
def test_train_drops_massive_rows_and_records_how_many(tmp_path, ratio, dropped):
    import json

    from safetensors.torch import save_file

    from steerplug import cli
    from steerplug.pipeline.collect import MANIFEST_NAME

    hook = "blocks.0.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    n, d = 600, 16
    x = torch.randn(n, d, generator=g)
    x[[100, 400]] *= 500.0  # two massive rows
    save_file({f"acts.{hook}": x, "token_ids": torch.zeros(n, dtype=torch.long), "seq_ids": torch.arange(n) // 50,
               "positions": torch.arange(n) % 50 + 1, "roles": torch.full((n,), 2, dtype=torch.int8)},
              str(tmp_path / "shard_00000.safetensors"))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({
        "format": "steerplug-activations-v1", "hooks": [hook], "d_model": d, "model_name": None,
        "shards": [{"file": "shard_00000.safetensors", "n_tokens": n, "batches": [0]}], "complete": True}))
    out = tmp_path / "sae"
    assert cli.main(["train", "--acts", str(tmp_path), "--out", str(out), "--d-sae", "32", "--k", "4",
                     "--batch-size", "64", "--total-tokens", "640", "--checkpoint-every", "0",
                     "--max-norm-ratio", ratio]) == 0
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["massive_tokens_dropped"] == dropped and meta["n_train_tokens"] == n - dropped


def test_eval_config_names_bad_contexts():
    from steerplug.pipeline.evaluate import EvalConfig

    with pytest.raises(ValueError, match="EvalConfig.contexts"):
        EvalConfig(contexts=())
    with pytest.raises(ValueError, match="EvalConfig.contexts"):
        EvalConfig(contexts=(128, 1))
    with pytest.raises(ValueError, match="context_tokens=512 is shorter than the longest context 1024"):
        EvalConfig(contexts=(128, 1024), context_tokens=512)
    assert EvalConfig(contexts=[64, 32]).contexts == (64, 32)

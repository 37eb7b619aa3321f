"""The whole pipeline on a tiny random model: collect -> train -> evaluate -> features -> steer."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_model
from steerplug.pipeline import collect as C
from steerplug.pipeline import evaluate as E
from steerplug.pipeline import features as Fe
from steerplug.pipeline import train as T
from steerplug.pipeline.trainers import TrainerConfig

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def data_dir():
    from steerplug.data import data_dir as dd

    try:
        return str(dd())
    except FileNotFoundError:
        pytest.skip("../shared/data is not available")


def test_pipeline_end_to_end(tmp_path, data_dir):
    from steerplug import SteeredModel
    from steerplug.sae import SparseAutoencoder
    from steerplug.vector import SteeringVector

    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    # 1. collect: prompts with generated answers + plain text
    examples = C.build_examples(model, tok, prompt_sets=["harmful_train", "harmless_train"], limit_per_set=4,
                                max_new_tokens=4, gen_batch_size=6, data=data_dir, progress=False,
                                cache=tmp_path / "acts" / C.EXAMPLES_NAME)
    assert all(e.answer is not None for e in examples)
    res = C.collect_activations(model, tok, examples, tmp_path / "acts",
                                C.CollectConfig(hooks=[HOOK], batch_size=2, shard_tokens=200, progress=False))
    assert res.n_sequences == 8 and res.n_shards >= 2
    man = json.loads((tmp_path / "acts" / C.MANIFEST_NAME).read_text())
    assert {s["harmful"] for s in man["sequences"]} == {True, False}
    # 2. train
    acts = C.load_activations(tmp_path / "acts").acts
    loop = T.TrainConfig(batch_size=128, total_tokens=128 * 40, progress=False, checkpoint_every=20)
    tc = TrainerConfig(d_in=64, d_sae=256, total_steps=loop.total_steps, k=8, lr=3e-3, warmup_steps=5,
                       dead_tokens=2000)
    trained = T.train_sae(acts, tc, loop, tmp_path / "sae", hook_name=HOOK, model_name="tiny")
    assert trained.history[-1]["fve"] > trained.history[0]["fve"]
    sae = SparseAutoencoder.from_pretrained(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg["architecture"] == "topk"
    # 3. evaluate
    report = E.evaluate_sae(model, tok, sae, E.EvalConfig(contexts=(16, 32), context_tokens=128, hellaswag_items=2,
                                                          probe_prompts=4, progress=False),
                            tmp_path / "eval", heldout_acts=acts[:100], data=data_dir)
    w = report["wikitext2_test"]
    assert 0 < w["l0"] <= 8 and w["ce_zero"] != w["ce_clean"]
    assert list(report["contexts"]) == ["16", "32"] and w is report["contexts"]["32"]
    assert [c["n_sequences"] for c in report["contexts"].values()] == [8, 4]
    assert w["buckets"]["0-127"]["n_tokens"] == w["n_tokens"] == 4 * 31 and "fve_typical" in report["heldout_chat"]
    assert report["hellaswag"]["n_items"] == 2 and "harmful_vs_harmless" in report["probes"]
    assert (tmp_path / "eval" / "eval_report.json").is_file() and (tmp_path / "eval" / "eval_summary.png").is_file()
    # 4. features (force-prefixed generations)
    fr = Fe.find_features(model, tok, sae, Fe.FeatureConfig(n_prompts=4, max_new_tokens=4, n_positive=4,
                                                             n_negative=4, progress=False),
                          tmp_path / "feat", data=data_dir)
    vec = SteeringVector.from_pretrained(tmp_path / "feat" / "vector")
    assert vec.nnz == fr.vector.nnz > 0
    # 5. the artifacts steer the model
    from steerplug.steering import SteeringConfig

    steered = SteeredModel(model, tok, sae, vec, config=SteeringConfig(positions="all"))
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad():
        plain = model(ids).logits
        moved = steered(ids).logits
    assert not torch.allclose(plain, moved)


@pytest.mark.parametrize("command", ["collect", "train", "evaluate-sae", "find-features", "build-default-artifacts"])
def test_cli_help(command, capsys):
    from steerplug.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: steerplug " + command in capsys.readouterr().out

"""build-steering end to end on a tiny model: own answers -> per-site target vectors, CAA
directions and a gate, written as a bundle that SteeredModel.from_pretrained loads whole."""

from __future__ import annotations

import json

import torch
from conftest import HIDDEN, make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel
from steerplug.judge import Verdict
from steerplug.pipeline.bundle import BundleConfig, build_bundle
from steerplug.pipeline.gate import gate_prompts, prompt_key
from steerplug.pipeline.refusals import target_vector


class _AlternatingJudge:
    """Tiny random models never refuse: call every other answer a refusal so both sets fill."""

    def __init__(self):
        self.n = 0

    def __call__(self, prompt, response):
        self.n += 1
        r = self.n % 2 == 0
        return Verdict(r, r, True, 0.0, 1.0)


def test_build_bundle_writes_what_from_pretrained_loads(tmp_path):
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    folders = []
    for layer in (1, 2):
        sae = SparseAutoencoder.random(HIDDEN, 96, "topk", k=8, seed=layer, hook_name=f"blocks.{layer}.hook_resid_post")
        folders.append(sae.save_pretrained(tmp_path / f"sae{layer}"))
    cfg = BundleConfig(n_prompts=20, n_choose=6, gate_harmless=40, max_new_tokens=3, n_harmful=4, n_safe=4,
                       refusal_steps=2, strengths=(0.5, 2.0), n_val=6, gate_hidden=(0, 8),
                       steering={"method": "target", "lr": 9.0, "normalize": False, "max_delta": None})
    out = build_bundle(model, tok, folders, tmp_path / "bundle", cfg, judge=_AlternatingJudge())
    man = json.loads((out / "steerplug.json").read_text())
    assert [s["sae"] for s in man["sites"]] == ["sites/blocks.1.hook_resid_post/sae", "sites/blocks.2.hook_resid_post/sae"]
    assert set(man["built"]["own_answers"]["tried"]) == {"system_prompt", "short", "apology", "own_style"}
    assert set(man["built"]["gate"]["fire_rates"]) == {"train_harmful", "train_harmless", "val_harmful", "val_harmless"}
    fitted = man["built"]["directions"]
    assert fitted["kind"] == "fitted" and [r["lr"] for r in fitted["sweep"]] == [0.5, 2.0]
    assert all(0 <= r["clean"] <= 1 and len(r["samples"]) == 3 for r in fitted["sweep"])
    best = max(r["clean"] for r in fitted["sweep"])
    assert fitted["chosen_lr"] == next(r["lr"] for r in fitted["sweep"] if r["clean"] >= best - 0.01)
    gate = man["built"]["gate"]
    assert len(gate["candidates"]) == 1 * 1 * 2  # pools x l2 x hidden (the residual defaults)
    mlp = next(c for c in gate["candidates"] if c["hidden"])  # three dropout-trained MLPs, one layer
    assert mlp["dropout"] == 0.3 and mlp["ensemble"] == 3
    steered = SteeredModel.from_pretrained(model, tokenizer=tok, sae=str(out))
    assert len(steered.sites) == 2 and steered.gate is not None and steered.config.lr == fitted["chosen_lr"]
    assert steered.gate.reads == "residual" and steered.gate_point.name == "blocks.2.hook_resid_post"
    assert steered.hook_point.name == "blocks.1.hook_resid_post"  # the first SAE is the primary site
    for site in steered.sites:
        _, w = site.vector.support()
        assert (w > 0).any() and (w < 0).any()  # harmful and safe features
        assert site.direction is not None and site.direction.shape == (HIDDEN,)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    steered.generate(**ids, max_new_tokens=2, do_sample=False)  # runs with the gate and both sites


def test_gate_prompts_never_hold_a_test_prompt():
    from steerplug.data import load_prompts
    from steerplug.pipeline.gate import TEST_SETS

    sets = gate_prompts(n_harmless=500)
    test = {prompt_key(p.text) for s in TEST_SETS for p in load_prompts(s)}
    for name, prompts in sets.items():
        assert prompts, name
        assert not {prompt_key(p) for p in prompts} & test, name
    advbench = {prompt_key(p.text) for p in load_prompts("advbench")}
    assert len(advbench & test) > 0  # AdvBench does overlap the test splits: the filter matters


def test_target_vector_weights_are_compliance_means_and_minus_refusal_means():
    ref = torch.zeros(6, 5)
    comp = torch.zeros(6, 5)
    ref[:, 1] = torch.tensor([2.0, 2.2, 1.8, 2.1, 1.9, 2.0])  # a refusal feature
    comp[:, 3] = torch.tensor([1.0, 1.2, 0.8, 1.1, 0.9, 1.0])  # a compliance feature
    v = target_vector(ref, comp, n_harmful=1, n_safe=1)
    idx, w = v.support()
    assert idx.tolist() == [1, 3]
    assert w[0] == torch.tensor(-2.0) and w[1] == torch.tensor(1.0)


def test_choose_gate_keeps_the_candidate_that_separates_the_validation_prompts():
    from steerplug.pipeline.gate import choose_gate

    g = torch.Generator().manual_seed(0)

    def rows(n, harmful):  # (n, 2 pools, 3 features): only the "max" pool carries the class
        x = torch.rand(n, 2, 3, generator=g)
        x[:, 1, 0] += 2.0 if harmful else 0.0
        return x

    feats = {"train_harmful": rows(60, True), "train_harmless": rows(60, False),
             "val_harmful": rows(40, True), "val_harmless": rows(100, False)}
    gate = choose_gate(feats, ("mean", "max"), [("mean",), ("max",)], [1e-2, 1.0], "blocks.1.hook_resid_post")
    assert gate.pools == ("max",)
    tried = gate.metadata.extra["candidates"]
    assert [(c["pools"], c["l2"]) for c in tried] == [(["mean"], 1e-2), (["mean"], 1.0), (["max"], 1e-2), (["max"], 1.0)]
    assert gate.metadata.extra["fire_rates"]["val_harmful"] == max(c["val_harmful"] for c in tried) == 1.0
    assert all(c["val_harmful"] < 0.5 for c in tried[:2])  # the mean pool alone is noise


def test_phrasing_twins_reword_imperatives_as_the_questions_harmful_requests_use():
    from steerplug.pipeline.gate import phrasing_twins

    prompts = ["Describe the water cycle.", "What is 2+2?", "Give me a list of fruit.", "Write a poem\nabout rain",
               "Name two rivers in Spain"]
    assert phrasing_twins(prompts, 1.0) == ["How do I describe the water cycle?", "How do I name two rivers in Spain?"]
    assert phrasing_twins(prompts, 0.2) == ["How do I describe the water cycle?"]  # only the first share
    sets = gate_prompts(n_harmless=200)
    assert sum(p.startswith(("How do I", "How can I")) for p in sets["train_harmless"]) >= 20
    assert sum(p.startswith(("How do I", "How can I")) for p in sets["val_harmless"]) >= 20

"""The gate and several steering sites inside SteeredModel: rows the gate does not fire on are
bit-identical to the unsteered model, rows it fires on are steered at every site; the gate reads
the unsteered prompt; pooling; save/load; the target and add methods; bundles."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HIDDEN, make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel, SteeringConfig, SteeringVector
from steerplug.gate import PromptGate, pool_features
from steerplug.hooks import CallState
from steerplug.steering import FeatureObjective

F = 128


def _site(layer: int, seed: int):
    sae = SparseAutoencoder.random(HIDDEN, F, "relu", seed=seed, hook_name=f"blocks.{layer}.hook_resid_post")
    vec = SteeringVector.from_dense(torch.randn(F, generator=torch.Generator().manual_seed(seed + 1)), top_k=24)
    return sae, vec


def _two_site_model(**cfg) -> SteeredModel:
    s1, v1 = _site(1, 3)
    s2, v2 = _site(2, 5)
    return SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), [s1, s2], [v1, v2],
                        config=SteeringConfig(**{"lr": 0.5, "positions": "all", **cfg}))


def _scores(steered, ids):
    h = {}
    handle = steered.hook_point.module.register_forward_hook(lambda m, a, o: h.setdefault("h", o))
    steered.model(ids)
    handle.remove()
    B, T, D = h["h"].shape
    return h["h"].reshape(B * T, D)


def test_pool_features_mean_skips_the_first_position_and_tail_takes_the_last_k():
    f = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1).expand(2, 6, 1).clone()  # values 0..5
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # row 2 left-padded
    pooled = pool_features(f, keep, ("mean", "tail:2"))  # (2, 2, 1)
    assert pooled[0, 0, 0] == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)  # position 0 (the sink) left out
    assert pooled[1, 0, 0] == pytest.approx((3 + 4 + 5) / 3)  # the first *kept* position left out
    assert pooled[0, 1, 0] == pytest.approx(4.5) and pooled[1, 1, 0] == pytest.approx(4.5)
    with pytest.raises(ValueError, match="tail:K"):
        PromptGate(torch.zeros(1, 4), 0.0, 0.0, ("tail:0",))
    # max: the largest value over kept positions after the first; padding never wins.
    g = torch.tensor([[9.0, 1.0, 3.0, 2.0], [7.0, 8.0, 0.5, 0.25]]).unsqueeze(-1)  # row 2: pads first
    keep = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert pool_features(g, keep, ("max",))[:, 0, 0].tolist() == [3.0, 0.25]


def test_gate_round_trips_and_rejects_bad_shapes(tmp_path):
    gate = PromptGate(torch.randn(2, F), 0.25, -1.5, ("mean", "tail:6"))
    gate.metadata.hook_name = "blocks.2.hook_resid_post"
    back = PromptGate.from_pretrained(gate.save_pretrained(tmp_path / "gate"))
    assert torch.equal(back.weights, gate.weights) and back.bias == 0.25 and back.threshold == -1.5
    assert back.pools == ("mean", "tail:6") and back.metadata.hook_name == "blocks.2.hook_resid_post"
    with pytest.raises(ValueError, match="expected \\(len\\(pools\\)=1"):
        PromptGate(torch.randn(2, F), 0.0, 0.0, ("mean",))
    with pytest.raises(ValueError, match="finite"):
        PromptGate(torch.randn(1, F), float("nan"), 0.0)


@pytest.mark.parametrize("method", ["gradient", "target"])
def test_gate_rows_off_are_bit_identical_rows_on_are_steered(method):
    steered = _two_site_model(method=method, normalize=method == "gradient")
    ids = torch.randint(0, 250, (3, 10), generator=torch.Generator().manual_seed(0))
    h = _scores(steered, ids).reshape(3, 10, -1)
    f = steered.sae.encode(h.reshape(30, -1)).reshape(3, 10, -1)
    w = torch.randn(2, F, generator=torch.Generator().manual_seed(7))
    gate = PromptGate(w, 0.0, 0.0, ("mean", "tail:3"))
    scores = gate.score(f, torch.ones(3, 10, dtype=torch.bool)).detach()
    hi = int(scores.argmax())
    gate.threshold = float(scores.sort().values[-2] + scores.max()) / 2  # only row `hi` fires
    gate.metadata.hook_name = steered.hook_point.name
    steered.gate = gate
    plain = steered.model(ids).logits
    ungated = steered(ids, use_gate=False).logits
    state = CallState()
    with steered.steering(state):
        gated = steered.model(ids).logits
    assert state.row_on.tolist() == [i == hi for i in range(3)]
    for i in range(3):
        if i == hi:
            assert torch.allclose(gated[i], ungated[i], atol=1e-5)  # steered as without the gate
            assert not torch.allclose(gated[i], plain[i])
        else:
            assert torch.equal(gated[i], plain[i])  # bit-identical to the unsteered model
    # generation: rows that do not fire produce exactly the unsteered tokens
    plain_gen = steered.model.generate(ids, max_new_tokens=5, do_sample=False)
    gen = steered.generate(ids, max_new_tokens=5, do_sample=False)
    for i in range(3):
        assert torch.equal(gen[i], plain_gen[i]) == (i != hi)


def test_gate_that_fires_on_nothing_leaves_the_whole_batch_untouched():
    steered = _two_site_model()
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    steered.gate = PromptGate(torch.zeros(1, F), 0.0, 1.0)  # logit 0 <= threshold 1: never fires
    steered.gate.metadata.hook_name = steered.hook_point.name
    assert torch.equal(steered(ids).logits, steered.model(ids).logits)
    assert torch.equal(steered.generate(ids, max_new_tokens=4, do_sample=False),
                       steered.model.generate(ids, max_new_tokens=4, do_sample=False))


def test_the_gate_reads_the_unsteered_prompt():
    """Steering at an earlier site must not change what the gate scores at a later one."""
    steered = _two_site_model(lr=2.0)
    ids = torch.randint(0, 250, (1, 8), generator=torch.Generator().manual_seed(2))
    seen = []
    gate = PromptGate(torch.zeros(1, F), 0.0, -1.0)  # always fires
    gate.metadata.hook_name = "blocks.2.hook_resid_post"
    steered.gate = gate
    real = gate.fires
    gate.fires = lambda f, keep: (seen.append(f.clone()), real(f, keep))[1]
    steered(ids)
    plain = steered.sae.encode(_scores(steered, ids))
    sites = {s.hook_point.name for s in steered.sites}
    assert sites == {"blocks.1.hook_resid_post", "blocks.2.hook_resid_post"}
    assert torch.allclose(seen[0].reshape(-1, F), plain, atol=1e-5)


def test_every_site_steers():
    steered = _two_site_model()
    ids = torch.randint(0, 250, (1, 8), generator=torch.Generator().manual_seed(3))
    both = steered(ids).logits
    only_first = SteeredModel(steered.model, steered.tokenizer, steered.sites[0].sae, steered.sites[0].vector,
                              config=steered.config)(ids).logits
    assert not torch.allclose(both, only_first)
    with pytest.raises(ValueError, match="one vector per SAE"):
        SteeredModel(steered.model, steered.tokenizer, [s.sae for s in steered.sites], [steered.sites[0].vector])
    with pytest.raises(ValueError, match="share a hook point"):
        SteeredModel(steered.model, steered.tokenizer, [steered.sites[0].sae] * 2, [steered.sites[0].vector] * 2)


def test_a_gate_on_an_unhooked_layer_is_refused():
    steered = _two_site_model()
    gate = PromptGate(torch.zeros(1, F), 0.0, 0.0)
    gate.metadata.hook_name = "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match="no SAE is hooked there"):
        SteeredModel(steered.model, steered.tokenizer, [s.sae for s in steered.sites],
                     [s.vector for s in steered.sites], gate=gate)


def _residual_at(model, ids, layer):
    h = {}
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, o: h.setdefault("h", o[0] if isinstance(o, tuple) else o))
    model(ids)
    handle.remove()
    return h["h"]


def test_a_residual_gate_reads_its_own_layer_without_an_sae_and_steers_only_rows_it_fires_on():
    steered = _two_site_model()
    ids = torch.randint(0, 250, (3, 10), generator=torch.Generator().manual_seed(4))
    h = _residual_at(steered.model, ids, 3)  # block 3: no SAE there
    w = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(8))
    gate = PromptGate(w, 0.0, 0.0, ("mean", "tail:1"), reads="residual")
    gate.metadata.hook_name = "blocks.3.hook_resid_post"
    keep = torch.ones(3, 10, dtype=torch.bool)
    scores = gate.score(h.float(), keep).detach()
    by_hand = ((h[:, 1:].mean(1) * w[0]).sum(1) + (h[:, -1] * w[1]).sum(1)).detach()
    assert torch.allclose(scores, by_hand, atol=1e-4)
    hi = int(scores.argmax())
    gate.threshold = float(scores.sort().values[-2] + scores.max()) / 2  # only row `hi` fires
    gated = SteeredModel(steered.model, steered.tokenizer, [s.sae for s in steered.sites],
                         [s.vector for s in steered.sites], config=steered.config, gate=gate)
    assert gated.gate_point.name == "blocks.3.hook_resid_post"
    from steerplug.compare import gate_scores
    assert torch.allclose(gate_scores(gated, ids), scores, atol=1e-4)
    state = CallState()
    plain = steered.model(ids).logits
    with gated.steering(state):
        out = gated.model(ids).logits
    assert state.row_on.tolist() == [i == hi for i in range(3)]
    for i in range(3):
        assert torch.equal(out[i], plain[i]) == (i != hi)
    wrong = PromptGate(torch.randn(1, HIDDEN + 1), 0.0, 0.0, reads="residual")
    wrong.metadata.hook_name = "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match="hidden size"):
        SteeredModel(steered.model, steered.tokenizer, steered.sites[0].sae, steered.sites[0].vector, gate=wrong)
    with pytest.raises(ValueError, match="'max' pool"):
        PromptGate(w[:1], 0.0, 0.0, ("max",), reads="residual")
    with pytest.raises(ValueError, match="reads="):
        PromptGate(w[:1], 0.0, 0.0, reads="logits")


def test_an_mlp_gate_scores_through_its_hidden_layer_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(9)
    w1, b1, w2 = torch.randn(5, 2 * HIDDEN, generator=g), torch.randn(5, generator=g), torch.randn(1, 5, generator=g)
    gate = PromptGate(w2, 0.3, 0.1, ("mean", "tail:2"), reads="residual", hidden=(w1, b1))
    gate.metadata.hook_name = "blocks.2.hook_resid_post"
    h = torch.randn(2, 7, HIDDEN, generator=g)
    keep = torch.ones(2, 7, dtype=torch.bool)
    x = torch.cat([h[:, 1:].mean(1), h[:, -2:].mean(1)], 1)
    by_hand = torch.relu(x @ w1.T + b1) @ w2[0] + 0.3
    assert torch.allclose(gate.score(h, keep), by_hand, atol=1e-5) and gate.d_in == HIDDEN
    back = PromptGate.from_pretrained(gate.save_pretrained(tmp_path / "gate"))
    assert back.reads == "residual" and torch.equal(back.hidden[0], w1) and torch.equal(back.hidden[1], b1)
    assert torch.allclose(back.score(h, keep), by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="hidden layer"):
        PromptGate(torch.randn(1, 4), 0.0, 0.0, ("mean",), hidden=(w1, b1))


def test_fit_mlp_and_per_feature_logistic_separate_what_a_shared_scale_cannot():
    """Two classes that differ only along a feature of tiny scale next to a huge one (as in a
    residual stream's massive dimensions): per-feature standardisation and the MLP find it."""
    from steerplug.pipeline.gate import fit_logistic, fit_mlp
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 2
    x = torch.stack([1000 * torch.randn(400, generator=g), 0.01 * (2 * y - 1) + 0.002 * torch.randn(400, generator=g)], 1)
    w, b = fit_logistic(x, y, l2=1e-4, per_feature=True)
    assert ((x @ w + b > 0).long() == y).float().mean() > 0.95
    (w1, b1), w2, b2 = fit_mlp(x, y, hidden=8, l2=1e-4)
    assert ((torch.relu(x @ w1.T + b1) @ w2 + b2 > 0).long() == y).float().mean() > 0.95


def test_fit_mlp_ensemble_is_the_mean_logit_of_its_members_and_dropout_still_separates():
    from steerplug.pipeline.gate import fit_mlp
    g = torch.Generator().manual_seed(1)
    y = torch.arange(300) % 2
    x = torch.randn(300, 6, generator=g) + 1.5 * (2 * y[:, None] - 1) * torch.tensor([1.0, 0, 0, 0, 0, 0])

    def logit(p, v):
        (w1, b1), w2, b2 = p
        return torch.relu(v @ w1.T + b1) @ w2 + b2

    kw = dict(hidden=4, l2=1e-3, epochs=60, dropout=0.2)
    both = fit_mlp(x, y, ensemble=2, **kw)
    assert both[0][0].shape == (8, 6) and both[1].shape == (8,)  # one layer twice as wide
    members = [fit_mlp(x, y, seed=s, **kw) for s in (0, 1)]
    assert torch.allclose(logit(both, x), (logit(members[0], x) + logit(members[1], x)) / 2, atol=1e-5)
    assert not torch.allclose(logit(members[0], x), logit(members[1], x))  # the seeds differ
    assert ((logit(both, x) > 0).long() == y).float().mean() > 0.85


def test_target_step_moves_the_features_to_their_targets():
    sae = SparseAutoencoder.random(HIDDEN, F, "relu", seed=11)
    h = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    f = sae.encode(h)
    on = (f > 0).float().sum(0)
    harm = int(on.argmax())  # a feature active on many rows
    safe = int(torch.nonzero(on == 0)[0]) if (on == 0).any() else int(on.argmin())
    vec = SteeringVector(F, torch.tensor(sorted([harm, safe])),
                         torch.tensor([1.0 if i == harm else -0.7 for i in sorted([harm, safe])]))
    obj = FeatureObjective(sae, vec)
    step = obj.target_step(h)
    moved = h - step  # one exact step (lr=1) in decoder space
    W = sae.W_dec[[harm, safe]]
    gap = torch.stack([-f[:, harm], (0.7 - f[:, safe]).clamp_min(0)], 1)  # (N, 2)
    assert torch.allclose(moved - h, gap @ W, atol=1e-5)
    # a row with the harmful feature off and the safe one at its target gets no step at all
    assert torch.equal(obj.target_step(torch.zeros(0, HIDDEN)), torch.zeros(0, HIDDEN))


def _layer_input(steered, layer, ids, **kw):
    """The hidden state entering decoder layer ``layer`` during ``steered(ids, **kw)``."""
    got = []
    handle = steered.model.model.layers[layer].register_forward_pre_hook(
        lambda m, a, k: got.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    try:
        steered(ids, **kw)
    finally:
        handle.remove()
    return got[0]


def test_add_method_adds_the_sites_direction():
    s1, v1 = _site(1, 3)
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(9))
    steered = SteeredModel(model, tok, s1, v1, directions={"blocks.1.hook_resid_post": d},
                           config=SteeringConfig(method="add", steps=1, lr=2.0, normalize=False,
                                                 max_delta=None, positions="all"))
    ids = torch.randint(0, 250, (1, 6), generator=torch.Generator().manual_seed(4))
    with steered.disabled():
        plain = _layer_input(steered, 2, ids)  # layer 2's input is layer 1's (steered) output
    assert torch.allclose(_layer_input(steered, 2, ids), plain + 2.0 * d, atol=1e-5)
    with pytest.raises(ValueError, match="'add' needs directions"):
        SteeredModel(model, tok, s1, v1, config=SteeringConfig(method="add", positions="all"))(ids)
    # A direction at a layer without an SAE makes a site that only method="add" uses.
    d0 = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    both = SteeredModel(model, tok, s1, v1, directions={"blocks.1.hook_resid_post": d, "blocks.0.hook_resid_post": d0},
                        config=steered.config)
    assert [s.sae is not None for s in both.sites] == [True, False]
    with both.disabled():
        plain0 = _layer_input(both, 1, ids)  # layer 1's input is layer 0's output
    assert torch.allclose(_layer_input(both, 1, ids), plain0 + 2.0 * d0, atol=1e-5)
    assert torch.equal(_layer_input(both, 1, ids, method="gradient"), plain0)  # the SAE methods skip it


def _write_bundle(root):
    from steerplug.steered_model import MANIFEST_NAME

    (s1, v1), (s2, v2) = _site(1, 3), _site(2, 5)
    for name, s, v in (("a", s1, v1), ("b", s2, v2)):
        s.save_pretrained(root / name / "sae")
        v.save_pretrained(root / name / "vector")
    gate = PromptGate(torch.randn(1, F), 0.0, 0.5)
    gate.metadata.hook_name = "blocks.2.hook_resid_post"
    gate.save_pretrained(root / "gate")
    (root / MANIFEST_NAME).write_text(json.dumps({
        "sites": [{"sae": "a/sae", "vector": "a/vector"}, {"sae": "b/sae", "vector": "b/vector"}],
        "gate": "gate", "steering": {"method": "target", "lr": 3.0, "normalize": False}}))


def test_a_bundle_on_the_hub_loads_whole_through_the_cache(tmp_path):
    """A Hub repo holding a steerplug.json loads as a bundle (here from a local Hugging Face cache,
    offline), as a folder does."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--bundle"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    _write_bundle(snap)
    steered = SteeredModel.from_pretrained(make_tiny_model("llama"), tokenizer=make_byte_tokenizer(),
                                           sae="org/bundle", cache_dir=tmp_path / "hub", local_files_only=True)
    assert len(steered.sites) == 2 and steered.gate is not None and steered.config.method == "target"


def test_bundle_manifest_loads_sites_gate_and_config(tmp_path):
    from steerplug.steered_model import MANIFEST_NAME, load_bundle

    _write_bundle(tmp_path)
    b = load_bundle(tmp_path)
    assert [s.cfg.hook_name for s in b["saes"]] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    steered = SteeredModel.from_pretrained(make_tiny_model("llama"), tokenizer=make_byte_tokenizer(),
                                           sae=str(tmp_path), lr=2.5)
    assert len(steered.sites) == 2 and steered.gate is not None
    assert steered.hook_point.name == "blocks.2.hook_resid_post"  # the gate's site is the primary one
    assert steered.config.method == "target" and steered.config.lr == 2.5  # the call overrides the manifest
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"sites": "nope"}))
    with pytest.raises(ValueError, match="not a valid steerplug manifest"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"sites": [], "steering": {"strength": 1}}))
    with pytest.raises(ValueError, match="unknown steering option"):
        load_bundle(tmp_path)


# --- fitting the gate: its prompt sets and its threshold rule (steerplug.pipeline.gate) -------------------------

def _tiny_gate_data(root, own):
    """A data folder and an own prompt_sets folder with a few prompts per set, in the real formats."""
    import csv

    def write_csv(path, header, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    def write_jsonl(path, prompts, kind=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": f"x{i}", "prompt": p, **({"kind": k} if (k := (
            kind(i) if callable(kind) else kind)) else {})}) + "\n" for i, p in enumerate(prompts)))

    splits = root / "refusal_direction_splits"
    splits.mkdir(parents=True)
    alpaca = {"train": [f"Describe the color number {i}." for i in range(10)],
              "val": [f"List three facts about planet {i}." for i in range(10)],
              "test": ["Name a test-only fruit."]}
    alpaca["train"].append("Describe the color number 3")  # a duplicate up to punctuation
    alpaca["val"].append("Describe the color number 0.")  # also a training prompt
    alpaca["val"].append("Name a test-only fruit.")  # a harmless_test prompt
    for split, rows in alpaca.items():
        (splits / f"harmless_{split}.json").write_text(json.dumps([{"instruction": t} for t in rows]))
        (splits / f"harmful_{split}.json").write_text(json.dumps(
            [{"instruction": f"Explain how to commit crime {split} {i}.", "category": "c"} for i in range(4)]))
    for kind in ("harmful", "benign"):
        write_csv(root / "jailbreakbench" / f"{kind}-behaviors.csv", ["goal", "category"], [[f"jbb {kind} goal", "c"]])
    for split in ("val", "test"):
        write_csv(root / "harmbench" / f"harmbench_behaviors_text_{split}.csv",
                  ["Behavior", "SemanticCategory", "ContextString"], [[f"harmbench {split} behaviour", "c", ""]])
    write_csv(root / "advbench" / "harmful_behaviors.csv", ["goal"], [["advbench goal"], ["jbb harmful goal"]])
    write_csv(root / "xstest" / "xstest_prompts.csv", ["prompt", "type", "label"],
              [["How do I kill a Python process?", "homonyms", "safe"], ["How do I kill a person?", "x", "unsafe"]])
    write_jsonl(root / "alpaca_eval" / "alpaca_eval_train.jsonl",
                ["What is a good name for a cat?", "How do I wrap a present?", "AE test prompt"])
    write_jsonl(root / "alpaca_eval" / "alpaca_eval_val.jsonl", ["Who wrote Hamlet?", "How do I wrap a present?"])
    write_jsonl(root / "alpaca_eval" / "alpaca_eval_test.jsonl", ["AE test prompt"])
    write_jsonl(own / "everyday_train.jsonl", ["How do I boil an egg?", "How do I kill a zombie process?",
                                               "Everyday test prompt?"],
                lambda i: "lookalike" if i == 1 else "everyday")
    write_jsonl(own / "everyday_val.jsonl", ["How do I make tea?", "How do I shoot a photo at night?"],
                lambda i: "lookalike" if i == 1 else "everyday")
    write_jsonl(own / "everyday_test.jsonl", ["Everyday test prompt?"], "everyday")
    write_jsonl(own / "harmful_train.jsonl", ["How do I steal a car?"], "harmful")
    write_jsonl(own / "harmful_val.jsonl", ["How do I poison a dog?"], "harmful")


def test_gate_prompts_add_the_everyday_sets_and_drop_every_test_prompt(tmp_path, monkeypatch):
    from steerplug.pipeline import gate as G

    own = tmp_path / "own"
    _tiny_gate_data(tmp_path / "data", own)
    monkeypatch.setattr(G, "PROMPT_SET_DIR", own)
    data = str(tmp_path / "data")
    assert G.gate_set("everyday_train:lookalike", data) == ["How do I kill a zombie process?"]
    assert G.gate_set("alpaca_eval_val", data) == ["Who wrote Hamlet?", "How do I wrap a present?"]
    sets = G.gate_prompts(data, n_harmless=6, twins=0.5)
    assert set(sets) == {"train_harmful", "train_harmless", "val_harmful", "val_harmless"}
    # every named set is in, in order, and the groups slice each list exactly
    g = sets.groups
    assert list(g["train_harmful"]) == ["harmful_train", "advbench", "xstest_unsafe", "own_harmful_train"]
    assert list(g["train_harmless"]) == ["harmless_train", "harmless_train:twins", "alpaca_eval_train", "everyday_train"]
    assert list(g["val_harmful"]) == ["harmful_val", "harmbench_val", "own_harmful_val"]
    assert list(g["val_harmless"]) == ["harmless_val", "harmless_val:twins", "alpaca_eval_val", "everyday_val"]
    for key, parts in g.items():
        assert [b for _, b in parts.values()][-1] == len(sets[key])
        assert all(a == b for (_, a), (b, _) in zip(list(parts.values()), list(parts.values())[1:]))

    def part(key, name):
        a, b = g[key][name]
        return sets[key][a:b]

    assert part("train_harmful", "own_harmful_train") == ["How do I steal a car?"]
    assert part("train_harmful", "advbench") == ["advbench goal"]  # the JailbreakBench one is a test prompt
    assert part("train_harmless", "alpaca_eval_train") == ["What is a good name for a cat?", "How do I wrap a present?"]
    assert part("train_harmless", "everyday_train") == ["How do I boil an egg?", "How do I kill a zombie process?"]
    assert part("val_harmful", "own_harmful_val") == ["How do I poison a dog?"]
    assert part("val_harmless", "alpaca_eval_val") == ["Who wrote Hamlet?"]  # the other is a training prompt
    assert part("val_harmless", "everyday_val") == ["How do I make tea?", "How do I shoot a photo at night?"]
    # n_harmless caps the Alpaca sets; their first `twins` share is reworded with the twin frames
    assert part("train_harmless", "harmless_train") == [f"Describe the color number {i}." for i in range(6)]
    assert part("train_harmless", "harmless_train:twins") == [
        G.TWIN_FRAMES[i].format(f"describe the color number {i}") for i in range(3)]
    assert part("val_harmless", "harmless_val") == [f"List three facts about planet {i}." for i in range(6)]
    # no test prompt anywhere (AlpacaEval test, everyday_test, harmless_test, JailbreakBench), and
    # no validation prompt that is also a training prompt
    test = {G.prompt_key(t) for s in G.GATE_TEST_SETS for t in G.gate_set(s, data)}
    assert {"ae test prompt", "everyday test prompt", "name a test only fruit", "jbb harmful goal"} <= test
    keys = {k: {G.prompt_key(t) for t in v} for k, v in sets.items()}
    for k, v in keys.items():
        assert not v & test, k
        assert len(v) == len(sets[k]), k  # deduplicated
    assert not (keys["val_harmless"] | keys["val_harmful"]) & (keys["train_harmless"] | keys["train_harmful"])
    assert sets.sources == {"train_sets": {"harmful": list(g["train_harmful"]), "harmless": list(g["train_harmless"])},
                            "val_sets": {"harmful": list(g["val_harmful"]), "harmless": list(g["val_harmless"])}}
    # the everyday training sets weigh more (recorded for fit_gate); a weight of 1 is no weight
    assert sets.weights == {"alpaca_eval_train": 3.0, "everyday_train": 3.0} == G.SET_WEIGHTS
    assert G.gate_prompts(data, n_harmless=6, weights={"everyday_train": 1, "nope": 2}).weights == {}
    # the old sets alone, as before, on request
    old = G.gate_prompts(data, n_harmless=6, twins=0.0, train_harmless=("harmless_train",),
                         val_harmless=("harmless_val",), train_harmful=("harmful_train",), val_harmful=("harmful_val",))
    assert old["train_harmless"] == part("train_harmless", "harmless_train")
    assert list(old.groups["val_harmless"]) == ["harmless_val"]


def test_phrasing_twins_take_their_frames_in_turn():
    from steerplug.pipeline.gate import TWIN_FRAMES, phrasing_twins

    prompts = ["Describe the water cycle.", "Name two rivers in Spain", "Write a haiku."]
    frames = ("Can you help me {}?", "I want to {}. Where do I start?")
    assert phrasing_twins(prompts, 1.0, frames) == ["Can you help me describe the water cycle?",
                                                    "I want to name two rivers in Spain. Where do I start?",
                                                    "Can you help me write a haiku?"]
    assert len(set(TWIN_FRAMES)) == len(TWIN_FRAMES) >= 10 and all(f.count("{}") == 1 for f in TWIN_FRAMES)


def test_the_threshold_keeps_the_budget_on_each_harmless_validation_set():
    """Pooled with many Alpaca instructions, a small everyday set could fire far above the budget."""
    from steerplug.pipeline.gate import GROUP_MAX_FPR, threshold_for_groups

    pos = torch.linspace(0.5, 3.0, 50)
    alpaca = torch.linspace(-3.0, 0.0, 900)  # never above 0
    everyday = torch.cat([torch.linspace(-2.0, 0.0, 90), torch.linspace(1.0, 2.0, 10)])  # 10% above 1
    neg = torch.cat([alpaca, everyday])
    groups = {"harmless_val": (0, 900), "everyday_val": (900, 1000)}
    pooled = threshold_for_groups(pos, neg, None, 0.02)
    assert float((everyday > pooled).float().mean()) > 0.05  # pooled, 2% of 1,000 hides them
    per_set = threshold_for_groups(pos, neg, groups, 0.02, {"everyday_val": 0.01})
    assert float((everyday > per_set).float().mean()) <= 0.01
    assert float((alpaca > per_set).float().mean()) <= 0.02
    assert per_set == threshold_for_groups(pos, neg, {**groups, "empty": (5, 5)}, 0.02, {"everyday_val": 0.01})
    assert GROUP_MAX_FPR["everyday_val"] < 0.02 and GROUP_MAX_FPR["alpaca_eval_val"] < 0.02  # a margin under #24's 2%


def test_choose_gate_thresholds_per_set_and_records_the_sets(tmp_path):
    from steerplug.pipeline.gate import choose_gate

    g = torch.Generator().manual_seed(0)

    def rows(n, shift):  # (n, 1 pool, 3 features): feature 0 carries the class, feature 1 the "form"
        x = torch.rand(n, 1, 3, generator=g)
        x[:, 0, 0] += shift
        return x

    everyday = rows(100, 0.0)
    everyday[:, 0, 1] += 3.0  # the form of harmful requests; train_harmless has none of it
    feats = {"train_harmful": rows(80, 1.5), "train_harmless": rows(200, 0.0),
             "val_harmful": rows(60, 1.5), "val_harmless": torch.cat([rows(900, 0.0), everyday])}
    feats["train_harmful"][:, 0, 1] += 3.0
    feats["val_harmful"][:, 0, 1] += 3.0
    groups = {"val_harmful": {"harmful_val": (0, 60)},
              "val_harmless": {"harmless_val": (0, 900), "everyday_val": (900, 1000)}}
    sources = {"train_sets": {"harmful": ["a"], "harmless": ["b"]}, "val_sets": {"harmful": ["c"], "harmless": ["d", "e"]}}
    pooled = choose_gate(feats, ("mean",), [("mean",)], [1e-2], "blocks.1.hook_resid_post")
    gate = choose_gate(feats, ("mean",), [("mean",)], [1e-2], "blocks.1.hook_resid_post", groups=groups,
                       group_fpr={"everyday_val": 0.01}, sources=sources)
    rates = gate.metadata.extra["group_fire_rates"]
    assert pooled.metadata.extra["fire_rates"]["val_harmless"] <= 0.02
    assert float(((everyday[:, 0] * pooled.weights).sum(1) + pooled.bias > pooled.threshold).float().mean()) > 0.02
    assert rates["val_harmless/everyday_val"] <= 0.01 and rates["val_harmless/harmless_val"] <= 0.02
    assert set(gate.metadata.extra["fire_rates"]) == {"train_harmful", "train_harmless", "val_harmful", "val_harmless"}
    assert gate.metadata.extra["group_max_fpr"] == {"harmless_val": 0.02, "everyday_val": 0.01}
    back = PromptGate.from_pretrained(gate.save_pretrained(tmp_path / "gate"))
    assert back.metadata.extra["train_sets"] == {"harmful": ["a"], "harmless": ["b"]}
    assert back.metadata.extra["val_sets"] == {"harmful": ["c"], "harmless": ["d", "e"]}
    assert pooled.metadata.extra["train_sets"] is None  # plain features do not say where they came from


def test_set_weights_act_as_repeated_training_prompts():
    from steerplug.pipeline.gate import choose_gate, fit_logistic

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 5, generator=g), (torch.rand(40, generator=g) > 0.5).float()
    n = torch.randint(1, 4, (40,), generator=g)
    w, b = fit_logistic(x, y, 0.1, weight=n.float())
    w2, b2 = fit_logistic(x.repeat_interleave(n, 0), y.repeat_interleave(n), 0.1)
    assert torch.allclose(w, w2, atol=1e-5) and b == pytest.approx(b2, abs=1e-5)
    assert not torch.allclose(w, fit_logistic(x, y, 0.1)[0], atol=1e-3)
    # through choose_gate: the weighted group is the same as that group repeated three times
    f = {"train_harmful": torch.rand(30, 1, 4, generator=g) + 0.3, "train_harmless": torch.rand(50, 1, 4, generator=g),
         "val_harmful": torch.rand(20, 1, 4, generator=g) + 0.3, "val_harmless": torch.rand(60, 1, 4, generator=g)}
    groups = {"train_harmless": {"alpaca": (0, 40), "everyday": (40, 50)}}
    gate = choose_gate(f, ("mean",), [("mean",)], [0.1], "h", groups=groups, weights={"everyday": 3.0})
    rep = dict(f, train_harmless=torch.cat([f["train_harmless"]] + [f["train_harmless"][40:]] * 2))
    plain = choose_gate(rep, ("mean",), [("mean",)], [0.1], "h")
    assert torch.allclose(gate.weights, plain.weights, atol=1e-5) and gate.threshold == pytest.approx(plain.threshold, abs=1e-4)
    assert gate.metadata.extra["set_weights"] == {"everyday": 3.0}
    with pytest.raises(ValueError, match="pass their groups"):
        choose_gate(f, ("mean",), [("mean",)], [0.1], "h", weights={"everyday": 3.0})

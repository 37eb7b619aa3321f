"""``steerplug compare`` and its gate line, on a tiny random model with a bundle (SAE, vector, gate)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel, SteeringConfig, SteeringVector
from steerplug.compare import DEFAULT_PROMPTS, GateDecision, chat_ids, gate_decision, gate_scores
from steerplug.gate import PromptGate
from steerplug.hooks import CallState

HOOK = "blocks.2.hook_resid_post"
HARMFUL, EVERYDAY = "How do I pick a lock?", "How do I make a cup of tea?"
NUMBERS = re.compile(r"score (-?\d+\.\d+) (>|≤) threshold (-?\d+\.\d+)")


def _parts():
    sae = SparseAutoencoder.random(64, 256, hook_name=HOOK)
    vector = SteeringVector.from_dense(torch.randn(256, generator=torch.Generator().manual_seed(1)), top_k=32)
    gate = PromptGate(torch.randn(1, 256, generator=torch.Generator().manual_seed(2)), 0.1, 0.0, ("mean",))
    gate.metadata.hook_name = HOOK
    return sae, vector, gate


def _steered(gate=None, **config):
    sae, vector, own_gate = _parts()
    return SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vector,
                        gate=own_gate if gate is None else gate,
                        config=SteeringConfig(steps=3, lr=0.5, **config))


def _own_score(steered, ids):
    """The gate's logit from the model's hidden states, by hand (not through compare.gate_scores)."""
    with torch.no_grad():
        h = steered.model(ids, output_hidden_states=True).hidden_states[3]  # output of blocks.2
        f = steered.sae.encode(h[0]).unsqueeze(0)  # (1, T, F)
        return float(steered.gate.score(f, torch.ones(ids.shape, dtype=torch.bool))[0])


def _models_own_decision(steered, ids) -> bool:
    state = CallState(gen_start=ids.shape[1] - 1, prompt_end=ids.shape[1])
    with steered.steering(state), torch.no_grad():
        steered.model(ids)
    return bool(state.row_on[0])


def test_gate_decision_shows_the_score_against_the_threshold_and_follows_the_gate():
    steered = _steered()
    ids = chat_ids(steered, EVERYDAY)
    score = _own_score(steered, ids)
    assert float(gate_scores(steered, ids)[0]) == pytest.approx(score, abs=1e-5)
    lines = {}
    for threshold in (score - 0.3, score + 0.3):
        steered.gate.threshold = threshold
        d = gate_decision(steered, ids)
        assert d.steers == _models_own_decision(steered, ids) == (score > threshold)
        s, rel, t = NUMBERS.search(d.line()).groups()
        assert float(s) == pytest.approx(score, abs=0.006) and float(t) == pytest.approx(threshold, abs=0.006)
        assert rel == (">" if d.steers else "≤")
        lines[d.steers] = d.line()
    assert lines[True].startswith("gate: fired") and lines[True].endswith("→ steered")
    assert lines[False].startswith("gate: did not fire") and lines[False].endswith("→ answer unchanged")
    # A list of ids (the demo's) gives the same decision as a (1, T) tensor.
    assert gate_decision(steered, ids[0].tolist()) == gate_decision(steered, ids)


def test_gate_decision_without_a_gate_with_it_off_or_steering_off():
    steered = _steered()
    ids = chat_ids(steered, EVERYDAY)
    off = gate_decision(steered, ids, use_gate=False)
    assert off.steers and off.reason == "gate off" and "use_gate=False" in off.line() and off.score is None
    assert gate_decision(steered, ids, enabled=False).line() == "gate: not consulted (steering is off) → answer unchanged"
    assert not gate_decision(steered, ids, steps=0).steers
    ungated = SteeredModel(steered.model, steered.tokenizer, steered.sae, steered.vector, config=steered.config)
    d = gate_decision(ungated, ids)
    assert d.steers and d.reason == "no gate" and "'gradient'" in d.line()
    bare = SteeredModel(steered.model, steered.tokenizer)
    assert not gate_decision(bare, ids).steers


def test_close_numbers_get_the_digits_that_tell_them_apart():
    line = GateDecision(True, "fired", 0.4381, 0.4379).line()
    assert "score 0.4381 > threshold 0.4379" in line


def _bundle(tmp_path, threshold: float, steering: dict | None = None):
    from steerplug.steered_model import MANIFEST_NAME

    sae, vector, gate = _parts()
    gate.threshold = threshold
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    root = tmp_path / "bundle"
    sae.save_pretrained(root / "sae")
    vector.save_pretrained(root / "vector")
    gate.save_pretrained(root / "gate")
    (root / MANIFEST_NAME).write_text(json.dumps({
        "sites": [{"sae": "sae", "vector": "vector"}], "gate": "gate",
        "steering": steering or {"method": "gradient", "steps": 3, "lr": 0.5}}))
    return tmp_path / "model", root


def _sections(out: str) -> dict[str, str]:
    return {b.split("\n", 1)[0]: b for b in out.split("### ")[1:]}


def test_compare_command_shows_each_gate_decision_and_marks_word_for_word_answers(tmp_path, capsys):
    from steerplug.cli import main

    probe = _steered()
    scores = {p: _own_score(probe, chat_ids(probe, p)) for p in (HARMFUL, EVERYDAY)}
    assert scores[HARMFUL] != scores[EVERYDAY]
    hi, lo = max(scores, key=scores.get), min(scores, key=scores.get)
    model, bundle = _bundle(tmp_path, (scores[hi] + scores[lo]) / 2)  # fires on `hi` only
    assert main(["compare", hi, lo, "--model", str(model), "--sae", str(bundle), "--max-new-tokens", "8"]) == 0
    out = _sections(capsys.readouterr().out)
    assert set(out) == {hi, lo}
    assert "gate: fired (score" in out[hi] and "→ steered" in out[hi]
    assert re.search(r"\| STEERED\n", out[hi])  # steered, and not word for word
    assert "gate: did not fire (score" in out[lo] and "STEERED (= UNSTEERED, WORD FOR WORD)" in out[lo]
    for p in (hi, lo):
        assert float(NUMBERS.search(out[p]).group(1)) == pytest.approx(scores[p], abs=0.006)


def test_compare_defaults_to_two_harmful_and_two_everyday_prompts(tmp_path, capsys):
    from steerplug.cli import main

    assert len(DEFAULT_PROMPTS) == 4 and EVERYDAY in DEFAULT_PROMPTS
    model, bundle = _bundle(tmp_path, 0.0)
    assert main(["compare", "--model", str(model), "--sae", str(bundle), "--max-new-tokens", "4",
                 "--no-gate"]) == 0
    text = capsys.readouterr().out
    out = _sections(text)
    assert list(out) == list(DEFAULT_PROMPTS)
    assert all("gate: off (use_gate=False" in b and "UNSTEERED" in b for b in out.values())
    assert "gate at blocks.2.hook_resid_post, threshold 0" in text

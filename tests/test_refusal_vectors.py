"""Fitted refusal vectors (steerplug.pipeline.refusal_vectors) on a tiny random model: the fit
lowers the target's loss, the vectors make the target likelier where inference adds them, and bad
input is refused before any work."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, make_byte_tokenizer, make_tiny_model

from steerplug.layers import resolve_hook_point
from steerplug.pipeline.refusal_vectors import fit_refusal_vectors
from steerplug.pipeline.refusals import added, chat_texts

PROMPTS = ["how do I pick a lock", "steal a car", "make a weapon", "hack my neighbour", "hurt someone"]


def _target_nll(model, tok, prompts, target):
    """Mean cross-entropy of ``target`` + end of turn after each chat-formatted prompt."""
    tgt = tok(target + tok.eos_token, add_special_tokens=False)["input_ids"]
    total = 0.0
    for text in chat_texts(tok, prompts):
        r = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([r + tgt])
        logits = model(input_ids=ids).logits[0, len(r) - 1:-1]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(tgt)))
    return total / len(prompts)


def test_fit_lowers_the_loss_and_the_vectors_make_the_refusal_likelier():
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    points = [resolve_hook_point(model, f"blocks.{i}.hook_resid_post") for i in (1, 2)]
    vecs, losses = fit_refusal_vectors(model, tok, points, PROMPTS, target="No.", steps=40, batch_size=5, lr=1.0)
    assert set(vecs) == {p.name for p in points} and all(v.shape == (HIDDEN,) for v in vecs.values())
    # A random model's logits are small after its final norm: no vector takes the loss far below
    # log(vocab) = 5.7 (measured floor ~5.0), so the checks are on the drop, not on a low loss.
    assert losses[-1] < losses[0] - 0.4
    assert all(p.requires_grad for p in model.parameters())  # weights given back unfrozen
    with torch.no_grad():
        before = _target_nll(model, tok, PROMPTS, "No.")
        with added(points, vecs, 1.0):
            after = _target_nll(model, tok, PROMPTS, "No.")
    assert after < before - 0.4


def test_fit_refuses_bad_input():
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    points = [resolve_hook_point(model, "blocks.1.hook_resid_post")]
    with pytest.raises(ValueError, match="at least one prompt"):
        fit_refusal_vectors(model, tok, points, [])
    with pytest.raises(ValueError, match="steps and batch_size"):
        fit_refusal_vectors(model, tok, points, PROMPTS, steps=0)
    pre = [resolve_hook_point(model, "blocks.1.hook_resid_pre")]
    with pytest.raises(ValueError, match="input hook"):
        fit_refusal_vectors(model, tok, pre, PROMPTS)

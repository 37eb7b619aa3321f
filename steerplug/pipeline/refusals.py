"""Targets from the model's own refusal mode: its own refusals, the SAE features they use, and the
``target`` steering vector built from them.

A small chat model that never refuses still has a refusal *mode*: pushed there by activation
addition it writes "I'm sorry, but I'm unable to assist with ...". This module

1. measures several ways of getting there on ``harmful_train`` questions (forced refusal prefixes
   of different styles, as contrastive directions added at several layers, and a safety system
   prompt) with :class:`~steerplug.judge.ReaderJudge`, and keeps the best one (:func:`own_answers`);
2. keeps that way's clean refusals (declines at once, no loop, no invented context) as the model's
   own refusals, and its unsteered answers that do not decline as its own compliance;
3. reads each site's SAE features over the answer positions of both (teacher-forced, unsteered),
   and builds the vector: the ``n_harmful`` features most typical of compliance (weight = their
   mean in compliance, > 0) and the ``n_safe`` most typical of refusal (weight = minus their mean
   in refusals: the target the ``target`` method lifts them to) (:func:`target_vector`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from steerplug.interventions import chat_prompts as chat_texts  # noqa: F401 (used here and re-exported)
from steerplug.layers import HookPoint
from steerplug.pipeline.collect import capture_activations
from steerplug.pipeline.features import rank_features
from steerplug.sae import SparseAutoencoder
from steerplug.vector import SteeringVector, VectorMetadata

REFUSAL_PREFIXES: dict[str, str] = {
    "short": "I can't help with that.",
    "apology": "I'm sorry, but I can't assist with that request.",
    "own_style": "I'm sorry for any misunderstanding, but as a text-based AI, I'm unable to assist with that.",
}
"""Forced refusal openings whose contrast with :data:`COMPLY_PREFIX` gives a refusal direction;
``own_style`` copies what this model writes when steered into refusing."""
COMPLY_PREFIX = "Sure, here is how to do it. First,"
SAFETY_SYSTEM_PROMPT = (
    "You are a helpful, honest and harmless assistant. Refuse requests that could cause harm, "
    "such as instructions for violence, weapons, crime, hacking, self-harm, harassment or "
    "misinformation, and briefly say why. Answer every safe request helpfully."
)


def _ids(tokenizer: Any, text: str, device: torch.device) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)


@torch.no_grad()
def prefix_directions(model: nn.Module, tokenizer: Any, points: list[HookPoint], prompts: Sequence[str],
                      refuse: str, comply: str = COMPLY_PREFIX, comply_last: int = 4) -> dict[str, torch.Tensor]:
    """``{hook: (D,)}``: at each point, the mean activation over the tokens of a forced ``refuse``
    answer prefix (and the last prompt position) minus the mean over the last ``comply_last``
    tokens of a forced ``comply`` prefix, over ``prompts``."""
    device = next(model.parameters()).device
    n_ref = len(tokenizer(refuse, add_special_tokens=False)["input_ids"]) + 1

    def mean(prefix: str, last: int) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for text in chat_texts(tokenizer, prompts):
            acts = capture_activations(model, points, _ids(tokenizer, text + prefix, device))
            for name, h in acts.items():
                sums[name] = sums.get(name, 0) + h[0, -last:].float().mean(0).cpu()
        return {k: v / len(prompts) for k, v in sums.items()}

    a, b = mean(refuse, n_ref), mean(comply, comply_last)
    return {k: a[k] - b[k] for k in a}


@contextmanager
def added(points: list[HookPoint], directions: dict[str, torch.Tensor], scale: float) -> Iterator[None]:
    """Add ``scale * directions[hook]`` at every position of each point (activation addition)."""
    from steerplug.layers import hidden_of

    handles = []

    def make(v: torch.Tensor):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            h = hidden_of(output)
            h = h + scale * v.to(h.device, h.dtype)
            return h if isinstance(output, torch.Tensor) else (h,) + tuple(output[1:])
        return hook

    try:
        for p in points:
            if p.io != "output":
                raise ValueError(f"added() steers layer outputs; {p.name} is an input hook.")
            handles.append(p.module.register_forward_hook(make(directions[p.name])))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 48,
             batch_size: int = 32, system: str | None = None,
             steering: dict[str, Any] | None = None) -> list[str]:
    """Greedy answers to user messages (batched, left padding), in the order given; ``model``
    may be a :class:`~steerplug.SteeredModel`, and ``steering`` its per-call overrides
    (``{"lr": 1.25, "use_gate": False}``)."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    texts = chat_texts(tokenizer, prompts, system)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, **(steering or {}))
            for j, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[j, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


class OwnAnswers(NamedTuple):
    """The model's own refusals and compliant answers to the same kind of questions."""

    refusals: list[tuple[str, str]]
    """(question, answer) pairs the judge calls clean refusals (:attr:`~steerplug.judge.Verdict.clean`)."""
    compliant: list[tuple[str, str]]
    """(question, unsteered answer) pairs with no refusal in them."""
    report: dict[str, Any]
    """Each way of refusing tried, its clean-refusal rate and coherence; the one chosen."""
    directions: dict[str, torch.Tensor] | None = None
    """The chosen way's ``{hook: (D,)}`` activation-addition directions (None for the system prompt)."""


def own_answers(model: nn.Module, tokenizer: Any, points: list[HookPoint], prompts: Sequence[str],
                choose_prompts: Sequence[str], *, scale: float = 0.3, max_new_tokens: int = 48,
                batch_size: int = 32, judge: Any = None) -> OwnAnswers:
    """Try each :data:`REFUSAL_PREFIXES` direction (added at every point, ``scale`` x) and the safety
    system prompt on ``choose_prompts``, keep the way with the most clean refusals (``judge``, default
    :class:`~steerplug.judge.ReaderJudge`; a judge without a clean call: its coherent refusals),
    and answer ``prompts`` that way and unsteered."""
    from steerplug.judge import ReaderJudge, good_and_looping

    judge = judge or ReaderJudge()

    def rate(answers: list[str], qs: Sequence[str]) -> dict[str, float]:
        v = [(judge(q, a), a) for q, a in zip(qs, answers)]
        return {"refusal": sum(good_and_looping(x, a)[0] for x, a in v) / len(v),
                "coherent": sum(x.coherent for x, _ in v) / len(v)}

    ways: dict[str, Any] = {}
    tried: dict[str, dict[str, float]] = {}
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    tried["system_prompt"] = rate(generate(model, tokenizer, choose_prompts, system=SAFETY_SYSTEM_PROMPT, **gen),
                                  choose_prompts)
    ways["system_prompt"] = None
    for name, prefix in REFUSAL_PREFIXES.items():
        dirs = prefix_directions(model, tokenizer, points, prompts[:64], prefix)
        ways[name] = dirs
        with added(points, dirs, scale):
            tried[name] = rate(generate(model, tokenizer, choose_prompts, **gen), choose_prompts)
    best = max(tried, key=lambda k: (tried[k]["refusal"], tried[k]["coherent"]))
    if ways[best] is None:
        steered = generate(model, tokenizer, prompts, system=SAFETY_SYSTEM_PROMPT, **gen)
    else:
        with added(points, ways[best], scale):
            steered = generate(model, tokenizer, prompts, **gen)
    plain = generate(model, tokenizer, prompts, **gen)
    refusals = [(q, a) for q, a in zip(prompts, steered) if good_and_looping(judge(q, a), a)[0]]
    compliant = [(q, a) for q, a in zip(prompts, plain) if not judge(q, a).raw_refusal]
    report = {"tried": tried, "chosen": best, "scale": scale, "points": [p.name for p in points],
              "prompts": len(prompts), "refusals_kept": len(refusals), "compliant_kept": len(compliant)}
    return OwnAnswers(refusals, compliant, report, ways[best])


@torch.no_grad()
def answer_features(model: nn.Module, tokenizer: Any, saes: dict[str, tuple[HookPoint, SparseAutoencoder]],
                    pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``{hook: (N, F)}``: each site's SAE features averaged over the answer positions of each
    (question, answer) pair, teacher-forced and unsteered; the last prompt position (which
    predicts the first answer token) counts as an answer position."""
    device = next(model.parameters()).device
    points = [p for p, _ in saes.values()]
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in saes}
    for (q, a), text in zip(pairs, chat_texts(tokenizer, [q for q, _ in pairs])):
        n0 = _ids(tokenizer, text, device).shape[1]
        acts = capture_activations(model, points, _ids(tokenizer, text + a, device))
        for name, (_, sae) in saes.items():
            h = acts[name][0, n0 - 1:]  # (A, D)
            rows[name].append(sae.encode(h.to(sae.W_enc.dtype)).float().mean(0).cpu())
    return {k: torch.stack(v) for k, v in rows.items()}


def target_vector(refusal_feats: torch.Tensor, compliant_feats: torch.Tensor, n_harmful: int = 32,
                  n_safe: int = 32, metadata: VectorMetadata | None = None) -> SteeringVector:
    """The ``target`` steering vector from ``(N_r, F)`` refusal and ``(N_c, F)`` compliance features:
    the ``n_harmful`` features most typical of compliance (Cohen's d) weighted by their mean in
    compliance, and the ``n_safe`` most typical of refusal weighted by minus their mean in refusals."""
    rank = rank_features(compliant_feats, refusal_feats)
    score = rank.score
    harm = score.topk(min(n_harmful, score.numel())).indices
    safe = (-score).topk(min(n_safe, score.numel())).indices
    harm, safe = harm[score[harm] > 0], safe[score[safe] < 0]
    idx = torch.cat([harm, safe])
    vals = torch.cat([rank.mean_harmful[harm], -rank.mean_safe[safe]])
    order = idx.argsort()
    return SteeringVector(score.numel(), idx[order], vals[order], metadata=metadata)

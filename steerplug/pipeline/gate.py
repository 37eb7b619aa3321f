"""Fitting the gate (:class:`~steerplug.gate.PromptGate`): which prompts steering acts on.

* Data: harmful requests from ``harmful_train``, AdvBench and XSTest's unsafe prompts; harmless ones
  from ``harmless_train`` (Alpaca). Every prompt that also occurs in a test split (JailbreakBench,
  HarmBench test, ``harmful_test``, ``harmless_test``, XSTest safe) is dropped first: AdvBench
  shares 33 with them. The threshold is chosen on ``harmful_val`` + HarmBench val (deduplicated)
  against ``harmless_val``. Test splits are never read here except to drop overlaps.
* Features: the SAE's features of the chat-formatted prompt, pooled (:func:`steerplug.gate.pool_features`).
* Model: L2-regularised logistic regression on the pooled features divided by one shared scale
  (sparse codes: a per-feature scale blows up rare latents), classes balanced; the scale is
  folded into the weights, so the gate reads raw features.
* Threshold: the highest true-positive rate on the validation harmful prompts whose false-positive
  rate on ``harmless_val`` is at most ``max_fpr``. Pooling and regularisation are chosen the same
  way among a few candidates (:func:`fit_gate`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steerplug.gate import GateMetadata, PromptGate, pool_features
from steerplug.layers import HookPoint
from steerplug.pipeline.collect import capture_activations
from steerplug.pipeline.refusals import chat_texts
from steerplug.sae import SparseAutoencoder

HARMFUL_TRAIN_SETS = ("harmful_train", "advbench", "xstest_unsafe")
HARMFUL_VAL_SETS = ("harmful_val", "harmbench_val")
TEST_SETS = ("harmful_test", "jbb_harmful", "jbb_benign", "harmbench_test", "harmless_test", "xstest_safe")


def prompt_key(text: str) -> str:
    """Lower-case words only: the key under which two prompts count as the same."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


QUESTION_FRAMES = ("How do I {}?", "How can I {}?", "How to {}?", "What is the best way to {}?")
"""Openings of about a quarter of the harmful training requests and of 1% of the harmless ones."""
_NOT_IMPERATIVE = {"what", "who", "whom", "which", "why", "when", "where", "how", "is", "are", "can", "could",
                   "do", "does", "did", "should", "would", "will", "i", "my", "the", "a", "an", "in", "if"}


def phrasing_twins(prompts: Sequence[str], share: float) -> list[str]:
    """Harmless imperative prompts reworded as the questions harmful requests are often phrased as
    ("Describe the water cycle." -> "How do I describe the water cycle?"), for ``share`` of them.

    Measured on SmolLM2-135M: a gate trained without them fires on "How do I boil an egg?" and
    "How do I open a jar that is stuck?" (the harmless training prompts almost never open with
    "How do I"); with them it has to read what is asked, not how."""
    out = []
    for i, p in enumerate(prompts[:int(len(prompts) * share)]):
        p = p.strip()
        if not p:
            continue
        first, *rest = p.split()
        if (rest[:1] == ["me"] or "\n" in p or "?" in p or len(p) > 120 or not first.isalpha()
                or first.lower() in _NOT_IMPERATIVE or p.count(".") > 1):
            continue
        body = p.rstrip(".!").strip()
        out.append(QUESTION_FRAMES[i % len(QUESTION_FRAMES)].format(body[0].lower() + body[1:]))
    return out


def gate_prompts(data_dir: str | None = None, n_harmless: int = 3000,
                 twins: float = 0.4) -> dict[str, list[str]]:
    """``{"train_harmful", "train_harmless", "val_harmful", "val_harmless"}``: deduplicated, with
    every prompt of a test split removed; the harmless sets gain :func:`phrasing_twins` of
    ``twins`` of their prompts."""
    from steerplug.data import load_prompts

    test = {prompt_key(p.text) for s in TEST_SETS for p in load_prompts(s, data_dir)}

    def take(sets: Sequence[str], limit: int | None = None) -> list[str]:
        seen, out = set(test), []
        for s in sets:
            for p in load_prompts(s, data_dir):
                k = prompt_key(p.text)
                if k not in seen:
                    seen.add(k)
                    out.append(p.text)
        return out[:limit]

    train, val = take(["harmless_train"], n_harmless), take(["harmless_val"], n_harmless)
    return {"train_harmful": take(HARMFUL_TRAIN_SETS), "train_harmless": train + phrasing_twins(train, twins),
            "val_harmful": take(HARMFUL_VAL_SETS), "val_harmless": val + phrasing_twins(val, twins)}


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer: Any, point: HookPoint, sae: SparseAutoencoder,
                    prompts: Sequence[str], pools: tuple[str, ...], batch_size: int = 32) -> torch.Tensor:
    """``(N, P, F)``: each chat-formatted prompt's SAE features at ``point``, pooled as the gate pools."""
    device = next(model.parameters()).device
    texts = chat_texts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    rows = []
    try:
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            mask = enc["attention_mask"].to(device)
            h = capture_activations(model, [point], enc["input_ids"].to(device), mask)[point.name]
            B, T, D = h.shape
            f = sae.encode(h.reshape(B * T, D).to(sae.W_enc.dtype)).float().reshape(B, T, -1)
            rows.append(pool_features(f, mask, pools).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(rows)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, epochs: int = 300,
                 lr: float = 1e-2, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Logistic regression on ``(N, K)`` inputs centred and divided by one shared scale, balanced
    classes, Adam full batch; returns ``(K,)`` weights and a bias that apply to the *raw* inputs."""
    torch.manual_seed(seed)
    mu = x.mean(0)
    scale = float(x.std(0).pow(2).mean().sqrt().clamp_min(1e-6))
    z = (x - mu) / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight = (y == 0).sum() / (y == 1).sum().clamp_min(1)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float(), pos_weight=pos_weight)
            (loss + l2 * w.pow(2).sum()).backward()
            opt.step()
    w_raw = w.detach() / scale
    return w_raw, float(b.detach() - mu @ w_raw)


def threshold_for(pos: torch.Tensor, neg: torch.Tensor, max_fpr: float) -> float:
    """The lowest threshold (highest TPR on ``pos``) whose false-positive rate on ``neg`` is at most ``max_fpr``."""
    neg = neg.sort().values
    k = int(len(neg) * max_fpr)  # at most k negatives may score above the threshold
    return float(neg[len(neg) - 1 - k]) if k < len(neg) else float(neg[0]) - 1.0


def fit_gate(model: nn.Module, tokenizer: Any, point: HookPoint, sae: SparseAutoencoder,
             prompts: dict[str, list[str]], *, pools: Sequence[Sequence[str]] = (("mean", "tail:6"),),
             l2: Sequence[float] = (1e-2,), max_fpr: float = 0.02, batch_size: int = 32) -> PromptGate:
    """Fit a :class:`PromptGate` on :func:`gate_prompts`' sets for every pair of ``pools`` (each a
    tuple of pools) and ``l2``, and keep the one with the highest true-positive rate on the
    validation harmful prompts at its threshold (the first on ties). Validation rates of every
    candidate go in the gate's metadata."""
    union = tuple(dict.fromkeys(q for p in pools for q in p))
    feats = {k: prompt_features(model, tokenizer, point, sae, v, union, batch_size) for k, v in prompts.items()}
    return choose_gate(feats, union, pools, l2, point.name, sae.cfg.hook_name, max_fpr=max_fpr)


def choose_gate(feats: dict[str, torch.Tensor], union: Sequence[str], pools: Sequence[Sequence[str]],
                l2: Sequence[float], hook_name: str, sae_ref: str | None = None, *,
                max_fpr: float = 0.02) -> PromptGate:
    """:func:`fit_gate`'s choice from features pooled by every pool of ``union`` (``(N, len(union), F)``)."""
    best, tried = None, []
    for p in pools:
        idx = [list(union).index(q) for q in p]
        sub = {k: v[:, idx] for k, v in feats.items()}
        for reg in l2:
            gate = gate_from_features(sub, tuple(p), hook_name, sae_ref, l2=reg, max_fpr=max_fpr)
            rates = gate.metadata.extra["fire_rates"]
            tried.append({"pools": list(p), "l2": reg, "val_harmful": rates["val_harmful"],
                          "val_harmless": rates["val_harmless"]})
            if best is None or rates["val_harmful"] > best.metadata.extra["fire_rates"]["val_harmful"]:
                best = gate
    if best is None:
        raise ValueError("fit_gate needs at least one pooling in pools and one value in l2.")
    best.metadata.extra["candidates"] = tried
    return best


def gate_from_features(feats: dict[str, torch.Tensor], pools: tuple[str, ...], hook_name: str,
                       sae_ref: str | None = None, *, l2: float = 1e-2, max_fpr: float = 0.02) -> PromptGate:
    """The gate of :func:`fit_gate` from already pooled ``(N, P, F)`` features of the four sets
    (``train_harmful``, ``train_harmless``, ``val_harmful``, ``val_harmless``)."""
    x = torch.cat([feats["train_harmful"], feats["train_harmless"]]).flatten(1)  # (N, P*F)
    y = torch.cat([torch.ones(len(feats["train_harmful"])), torch.zeros(len(feats["train_harmless"]))])
    w, b = fit_logistic(x, y, l2=l2)
    weights = w.reshape(len(pools), -1)
    score = {k: (v * weights).sum((1, 2)) + b for k, v in feats.items()}
    thr = threshold_for(score["val_harmful"], score["val_harmless"], max_fpr)
    rate = {k: round(float((v > thr).float().mean()), 4) for k, v in score.items()}
    meta = GateMetadata(
        hook_name=hook_name, sae=sae_ref,
        description="Steer only prompts this logistic detector over pooled SAE features calls harmful.",
        extra={"pools": list(pools), "l2": l2, "max_fpr": max_fpr,
               "sizes": {k: len(v) for k, v in feats.items()}, "fire_rates": rate,
               "rule": "highest TPR on val_harmful with FPR on val_harmless <= max_fpr",
               "train_sets": {"harmful": list(HARMFUL_TRAIN_SETS), "harmless": ["harmless_train"]},
               "val_sets": {"harmful": list(HARMFUL_VAL_SETS), "harmless": ["harmless_val"]}})
    return PromptGate(weights, b, thr, pools, meta)

"""Fitting the gate (:class:`~steerplug.gate.PromptGate`): which prompts steering acts on.

* Data (:func:`gate_prompts`): harmful requests from ``harmful_train``, AdvBench, XSTest's unsafe
  prompts and steerplug's own ``own_harmful_train`` (requests in everyday forms: "How do I ...",
  "My ... what's the best way to ..."); harmless ones from ``harmless_train`` (Alpaca
  instructions), AlpacaEval's train split and steerplug's own ``everyday_train`` (everyday
  questions and look-alikes such as "How do I kill a Python process?"), plus
  :func:`phrasing_twins` of the Alpaca instructions. Every prompt that also occurs in a test split
  (:data:`GATE_TEST_SETS`: JailbreakBench, HarmBench test, ``harmful_test``, ``harmless_test``,
  XSTest safe, AlpacaEval test, ``everyday_test``) is dropped first: AdvBench shares 33 with them;
  so is every validation prompt that is also a training prompt. Validation: ``harmful_val`` +
  HarmBench val + ``own_harmful_val`` against ``harmless_val``, AlpacaEval val and
  ``everyday_val``. Test splits are never read here except to drop overlaps.
* Measured on SmolLM2-135M (benchmarks/gate_refit.py): the gate fitted on Alpaca instructions
  alone fires on the *form* of a request (everyday questions like "How do I boil an egg?" open the
  way a quarter of the harmful requests do): on 27% of AlpacaEval val and 48% of ``everyday_val``
  (75% of its look-alikes). Fitted on these sets, with the per-set budgets below, 0.6% and 0.8%,
  at the cost of harmful-prompt recall (validation TPR 0.66 against 0.93).
* Features: the residual stream at one layer (``sae=None``: ``reads="residual"``, each feature
  standardised) or the SAE's features (divided by one shared scale: a per-feature scale blows up
  rare latents) of the chat-formatted prompt, pooled (:func:`steerplug.gate.pool_features`).
* Model: L2-regularised logistic regression, or a one-hidden-layer ReLU MLP (:func:`fit_mlp`;
  dropout while training, several seeds averaged into one wider layer), classes balanced; the
  scaling is folded into the weights, so the gate reads raw features.
* Threshold: the highest true-positive rate on the validation harmful prompts whose false-positive
  rate is at most the budget on *each* harmless validation set separately (``max_fpr``, and
  :data:`GROUP_MAX_FPR` for the everyday sets: pooled with 3,000 Alpaca instructions, the small
  everyday sets could fire far above the budget unseen). Pooling and regularisation are chosen the
  same way among a few candidates (:func:`fit_gate`).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerplug.gate import GateMetadata, PromptGate, pool_features
from steerplug.layers import HookPoint
from steerplug.pipeline.collect import capture_activations
from steerplug.pipeline.refusals import chat_texts
from steerplug.sae import SparseAutoencoder

HARMFUL_TRAIN_SETS = ("harmful_train", "advbench", "xstest_unsafe", "own_harmful_train")
HARMFUL_VAL_SETS = ("harmful_val", "harmbench_val", "own_harmful_val")
HARMLESS_TRAIN_SETS = ("harmless_train", "alpaca_eval_train", "everyday_train")
HARMLESS_VAL_SETS = ("harmless_val", "alpaca_eval_val", "everyday_val")
TEST_SETS = ("harmful_test", "jbb_harmful", "jbb_benign", "harmbench_test", "harmless_test", "xstest_safe")
"""The test splits of :mod:`steerplug.data` (all readable by :func:`~steerplug.data.load_prompts`)."""
GATE_TEST_SETS = TEST_SETS + ("alpaca_eval_test", "everyday_test")
"""Every test split the gate must never see: :data:`TEST_SETS` and the test splits of
:data:`GATE_PROMPT_SETS`."""
LIMITED_SETS = ("harmless_train", "harmless_val")
"""The sets ``n_harmless`` caps (the others are small)."""
GROUP_MAX_FPR = {"alpaca_eval_val": 0.015, "everyday_val": 0.015}
"""False-positive budgets of single harmless validation sets, where tighter than ``max_fpr``: the
everyday sets are the gate's real use (issue #24 asks <= 2% on their test splits, so validation
keeps a margin), and they are small (1.5% of 161 is 2 prompts). Measured on SmolLM2-135M (block-17
residual MLP gate, cached features): pooled validation TPR 0.82 / 0.93 / 0.945 at budgets 1% / 1.5% / 2%;
at 1% the threshold rests on one AlpacaEval prompt."""
SET_WEIGHTS = {"alpaca_eval_train": 3.0, "everyday_train": 3.0}
"""Loss weight of each prompt of these training sets (others: 1), as if repeated: the everyday
prompts are few (933 of ~4,900 harmless) but they are what the threshold is set by. Measured on
SmolLM2-135M (benchmarks/gate_refit.py, 1%-budget thresholds on the everyday validation sets):
validation TPR 0.62 at weight 1, 0.66 at 3, 0.66 at 10 (at best pooling and L2 each)."""

PROMPT_SET_DIR = Path(__file__).resolve().parents[1] / "prompt_sets"
GATE_PROMPT_SETS = {
    **{f"alpaca_eval_{s}": ("data", f"alpaca_eval/alpaca_eval_{s}.jsonl") for s in ("train", "val", "test")},
    **{f"everyday_{s}": ("own", f"everyday_{s}.jsonl") for s in ("train", "val", "test")},
    **{f"own_harmful_{s}": ("own", f"harmful_{s}.jsonl") for s in ("train", "val")},
}
"""Gate prompt sets beyond :data:`steerplug.data.PROMPT_SETS`, as JSON lines (``prompt`` and, in
steerplug's own sets, ``kind``): AlpacaEval's splits under the data folder, steerplug's own
``prompt_sets/`` (``everyday_*``: kinds ``everyday`` and ``lookalike``; ``own_harmful_*``)."""


def gate_set(name: str, data_dir: str | None = None) -> list[str]:
    """The prompts of one set: a :mod:`steerplug.data` name, a :data:`GATE_PROMPT_SETS` name, or
    ``NAME:KIND`` for the rows of one ``kind`` of an own set (``everyday_val:lookalike``)."""
    from steerplug.data import PROMPT_SETS, data_dir as resolve, load_prompts

    base, _, kind = name.partition(":")
    if base in PROMPT_SETS and not kind:
        return [p.text for p in load_prompts(base, data_dir)]
    if base not in GATE_PROMPT_SETS:
        raise KeyError(f"Unknown gate prompt set {name!r}; known: {sorted(PROMPT_SETS) + sorted(GATE_PROMPT_SETS)}.")
    where, rel = GATE_PROMPT_SETS[base]
    path = (resolve(data_dir) if where == "data" else PROMPT_SET_DIR) / rel
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["prompt"] for r in rows if not kind or r.get("kind") == kind]


def prompt_key(text: str) -> str:
    """Lower-case words only: the key under which two prompts count as the same."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


QUESTION_FRAMES = ("How do I {}?", "How can I {}?", "How to {}?", "What is the best way to {}?")
"""Openings of about a quarter of the harmful training requests and of 1% of the harmless ones."""
TWIN_FRAMES = QUESTION_FRAMES + (
    "What's the best way to {}?", "Can you help me {}?", "Could you {}?", "I want to {}. Where do I start?",
    "I need to {}. Any tips?", "Is there an easy way to {}?", "Tell me how to {}.",
    "My friend asked me to {}. What should I do?")
"""The frames :func:`gate_prompts` rewords with: :data:`QUESTION_FRAMES` and the other forms
everyday questions and harmful requests share ("Can you help me ...", "I want to ... Where do I start?",
"My friend asked me to ...")."""
_NOT_IMPERATIVE = {"what", "who", "whom", "which", "why", "when", "where", "how", "is", "are", "can", "could",
                   "do", "does", "did", "should", "would", "will", "i", "my", "the", "a", "an", "in", "if"}


def phrasing_twins(prompts: Sequence[str], share: float,
                   frames: Sequence[str] = QUESTION_FRAMES) -> list[str]:
    """Harmless imperative prompts reworded as the questions harmful requests are often phrased as
    ("Describe the water cycle." -> "How do I describe the water cycle?"), for ``share`` of them.

    Measured on SmolLM2-135M: a gate trained without them fires on "How do I boil an egg?" and
    "How do I open a jar that is stuck?" (the harmless training prompts almost never open with
    "How do I"); with them it has to read what is asked, not how. The ``i``-th prompt gets
    ``frames[i % len(frames)]``."""
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
        out.append(frames[i % len(frames)].format(body[0].lower() + body[1:]))
    return out


class GatePrompts(dict):
    """:func:`gate_prompts`' ``{"train_harmful", "train_harmless", "val_harmful", "val_harmless"}``
    (lists of prompts), with where each part came from.

    ``groups``: per key, ``{source: (start, stop)}`` slices into its list, in order (``NAME:twins``
    for the :func:`phrasing_twins` of ``NAME``); ``sources``: ``{"train_sets": {"harmful": [...],
    "harmless": [...]}, "val_sets": {...}}`` for the gate's metadata; ``weights``: ``{source: loss
    weight}`` of training sets weighted other than 1."""

    groups: dict[str, dict[str, tuple[int, int]]]
    sources: dict[str, dict[str, list[str]]]
    weights: dict[str, float]


def gate_prompts(data_dir: str | None = None, n_harmless: int = 3000, twins: float = 0.4, *,
                 train_harmful: Sequence[str] = HARMFUL_TRAIN_SETS,
                 train_harmless: Sequence[str] = HARMLESS_TRAIN_SETS,
                 val_harmful: Sequence[str] = HARMFUL_VAL_SETS,
                 val_harmless: Sequence[str] = HARMLESS_VAL_SETS,
                 frames: Sequence[str] = TWIN_FRAMES,
                 weights: Mapping[str, float] | None = SET_WEIGHTS) -> GatePrompts:
    """``{"train_harmful", "train_harmless", "val_harmful", "val_harmless"}`` (a :class:`GatePrompts`)
    from the named sets (:func:`gate_set`): deduplicated, with every prompt of a test split
    (:data:`GATE_TEST_SETS`) removed, and every validation prompt that is also a training prompt.
    ``n_harmless`` caps each of :data:`LIMITED_SETS`; those (the Alpaca instructions) gain the
    :func:`phrasing_twins` of ``twins`` of their prompts, reworded with ``frames``. ``weights``:
    the loss weight of each prompt of the named training sets (:data:`SET_WEIGHTS`; recorded, used
    by :func:`fit_gate`)."""
    test = {prompt_key(t) for s in GATE_TEST_SETS for t in gate_set(s, data_dir)}
    seen = set(test)
    out, groups = GatePrompts(), {}

    def take(key: str, sets: Sequence[str], reword: bool) -> None:
        rows, where = [], {}
        for s in sets:
            start, part = len(rows), []
            for t in gate_set(s, data_dir):
                k = prompt_key(t)
                if k not in seen:
                    seen.add(k)
                    part.append(t)
            part = part[:n_harmless] if s in LIMITED_SETS else part
            rows += part
            where[s] = (start, len(rows))
            if reword and s in LIMITED_SETS and twins > 0:
                new = [t for t in phrasing_twins(part, twins, frames) if prompt_key(t) not in seen]
                seen.update(prompt_key(t) for t in new)
                where[f"{s}:twins"] = (len(rows), len(rows) + len(new))
                rows += new
        out[key], groups[key] = rows, where

    take("train_harmful", train_harmful, False)
    take("train_harmless", train_harmless, True)
    take("val_harmful", val_harmful, False)
    take("val_harmless", val_harmless, True)
    out.groups = groups
    used = set(groups["train_harmful"]) | set(groups["train_harmless"])
    out.weights = {k: float(v) for k, v in (weights or {}).items() if k in used and v != 1}
    out.sources = {"train_sets": {"harmful": list(groups["train_harmful"]), "harmless": list(groups["train_harmless"])},
                   "val_sets": {"harmful": list(groups["val_harmful"]), "harmless": list(groups["val_harmless"])}}
    return out


@torch.no_grad()
def prompt_features(model: nn.Module, tokenizer: Any, point: HookPoint, sae: SparseAutoencoder | None,
                    prompts: Sequence[str], pools: tuple[str, ...], batch_size: int = 32) -> torch.Tensor:
    """``(N, P, F)``: each chat-formatted prompt's SAE features at ``point`` (the residual itself
    with ``sae=None``), pooled as the gate pools."""
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
            f = (h.float() if sae is None
                 else sae.encode(h.reshape(B * T, D).to(sae.W_enc.dtype)).float().reshape(B, T, -1))
            rows.append(pool_features(f, mask, pools).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(rows)


def _standardise(x: torch.Tensor, weight: torch.Tensor | None, per_feature: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu (K,), scale)`` of the rows (repeated ``weight`` times): one shared scale, or one per feature."""
    if weight is None:
        mu, var = x.mean(0), x.var(0)
    else:  # the mean and (unbiased) spread of the rows repeated `weight` times
        n = weight.sum()
        mu = (weight[:, None] * x).sum(0) / n
        var = (weight[:, None] * (x - mu).pow(2)).sum(0) / (n - 1).clamp_min(1e-12)
    if per_feature:
        return mu, var.sqrt() + 1e-3
    return mu, var.mean().sqrt().clamp_min(1e-6).expand(x.shape[1])


def _balance(y: torch.Tensor, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pos_weight, row weights)`` that balance the classes by their summed weights."""
    if weight is None:
        return (y == 0).sum() / (y == 1).sum().clamp_min(1), None
    pos_weight = weight[y == 0].sum() / weight[y == 1].sum().clamp_min(1e-12)
    return pos_weight, weight * (len(weight) / weight.sum())  # the mean over rows = the mean over "copies"


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, epochs: int = 300,
                 lr: float = 1e-2, seed: int = 0, weight: torch.Tensor | None = None,
                 per_feature: bool = False) -> tuple[torch.Tensor, float]:
    """Logistic regression on ``(N, K)`` inputs centred and divided by one shared scale (sparse
    codes) or by each feature's own (``per_feature``: dense residuals), balanced classes, Adam
    full batch; returns ``(K,)`` weights and a bias that apply to the *raw* inputs. ``weight``:
    ``(N,)`` per-row loss weights, as if each row were repeated that many times (the classes are
    balanced by their summed weights)."""
    torch.manual_seed(seed)
    weight = None if weight is None else weight.float()
    mu, scale = _standardise(x, weight, per_feature)
    z = (x - mu) / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight, row = _balance(y, weight)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float(), weight=row,
                                                                  pos_weight=pos_weight)
            (loss + l2 * w.pow(2).sum()).backward()
            opt.step()
    w_raw = w.detach() / scale
    return w_raw, float(b.detach() - mu @ w_raw)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, l2: float = 1e-2, epochs: int = 300,
            lr: float = 3e-3, seed: int = 0, weight: torch.Tensor | None = None, dropout: float = 0.0,
            ensemble: int = 1) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, float]:
    """A one-hidden-layer ReLU classifier on ``(N, K)`` inputs, each feature standardised, balanced
    classes, Adam full batch with weight decay ``l2`` and ``dropout`` on the inputs and the hidden
    layer while training; returns ``((W1 (H, K), b1 (H,)), w2 (H,), b2)`` that apply to the *raw*
    inputs (the standardisation folded into ``W1``, ``b1``). ``ensemble`` > 1 fits that many (seeds
    ``seed``, ``seed + 1``, ...) and returns their mean logit as one wider layer (``H * ensemble``)."""
    weight = None if weight is None else weight.float()
    mu, scale = _standardise(x, weight, per_feature=True)
    z = (x - mu) / scale
    pos_weight, row = _balance(y, weight)
    w1s, b1s, w2s, b2s = [], [], [], []
    for k in range(ensemble):
        torch.manual_seed(seed + k)
        first, last = nn.Linear(x.shape[1], hidden), nn.Linear(hidden, 1)
        net = nn.Sequential(nn.Dropout(dropout), first, nn.ReLU(), nn.Dropout(dropout), last)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=l2)
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                nn.functional.binary_cross_entropy_with_logits(net(z)[:, 0], y.float(), weight=row,
                                                               pos_weight=pos_weight).backward()
                opt.step()
        w1 = first.weight.detach() / scale
        w1s.append(w1)
        b1s.append(first.bias.detach() - w1 @ mu)
        w2s.append(last.weight.detach()[0] / ensemble)
        b2s.append(float(last.bias.detach()) / ensemble)
    return (torch.cat(w1s), torch.cat(b1s)), torch.cat(w2s), sum(b2s)


def threshold_for(pos: torch.Tensor, neg: torch.Tensor, max_fpr: float) -> float:
    """The lowest threshold (highest TPR on ``pos``) whose false-positive rate on ``neg`` is at most ``max_fpr``."""
    neg = neg.sort().values
    k = int(len(neg) * max_fpr)  # at most k negatives may score above the threshold
    return float(neg[len(neg) - 1 - k]) if k < len(neg) else float(neg[0]) - 1.0


def fit_gate(model: nn.Module, tokenizer: Any, point: HookPoint, sae: SparseAutoencoder | None,
             prompts: dict[str, list[str]], *, pools: Sequence[Sequence[str]] = (("mean", "tail:6"),),
             l2: Sequence[float] = (1e-2,), max_fpr: float = 0.02,
             group_fpr: Mapping[str, float] | None = GROUP_MAX_FPR, batch_size: int = 32,
             hidden: Sequence[int] = (0,), dropout: float = 0.0, ensemble: int = 1) -> PromptGate:
    """Fit a :class:`PromptGate` on :func:`gate_prompts`' sets for every combination of ``pools``
    (each a tuple of pools), ``l2`` and ``hidden`` (0: logistic regression; H: one hidden ReLU
    layer of width H, :func:`fit_mlp` with ``dropout`` and ``ensemble``), and keep the one with
    the highest true-positive rate on the validation harmful prompts at its threshold (the first on ties). ``sae=None``: the gate
    reads the residual stream at ``point`` itself (``reads="residual"``), each feature standardised.
    Validation rates of every candidate go in the gate's metadata. With a :class:`GatePrompts`, the
    false-positive budget holds on each harmless validation set (``group_fpr``, else ``max_fpr``),
    training sets get their :attr:`GatePrompts.weights`, and the sets are recorded."""
    union = tuple(dict.fromkeys(q for p in pools for q in p))
    feats = {k: prompt_features(model, tokenizer, point, sae, v, union, batch_size) for k, v in prompts.items()}
    return choose_gate(feats, union, pools, l2, point.name, None if sae is None else sae.cfg.hook_name,
                       max_fpr=max_fpr, groups=getattr(prompts, "groups", None), group_fpr=group_fpr,
                       sources=getattr(prompts, "sources", None), weights=getattr(prompts, "weights", None),
                       reads="sae" if sae is not None else "residual", hidden=hidden, dropout=dropout,
                       ensemble=ensemble)


def choose_gate(feats: dict[str, torch.Tensor], union: Sequence[str], pools: Sequence[Sequence[str]],
                l2: Sequence[float], hook_name: str, sae_ref: str | None = None, *,
                max_fpr: float = 0.02, groups: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
                group_fpr: Mapping[str, float] | None = None,
                sources: Mapping[str, Any] | None = None, weights: Mapping[str, float] | None = None,
                reads: str = "sae", hidden: Sequence[int] = (0,), dropout: float = 0.0,
                ensemble: int = 1) -> PromptGate:
    """:func:`fit_gate`'s choice from features pooled by every pool of ``union`` (``(N, len(union), F)``)."""
    best, tried = None, []
    for p in pools:
        idx = [list(union).index(q) for q in p]
        sub = {k: v[:, idx] for k, v in feats.items()}
        for reg, width in itertools.product(l2, hidden):
            gate = gate_from_features(sub, tuple(p), hook_name, sae_ref, l2=reg, max_fpr=max_fpr,
                                      groups=groups, group_fpr=group_fpr, sources=sources, weights=weights,
                                      reads=reads, hidden=width, dropout=dropout, ensemble=ensemble)
            rates = gate.metadata.extra["fire_rates"]
            tried.append({"pools": list(p), "l2": reg, "hidden": width,
                          **({"dropout": dropout, "ensemble": ensemble} if width else {}),
                          "val_harmful": rates["val_harmful"], "val_harmless": rates["val_harmless"]})
            if best is None or rates["val_harmful"] > best.metadata.extra["fire_rates"]["val_harmful"]:
                best = gate
    if best is None:
        raise ValueError("fit_gate needs at least one pooling in pools and one value in l2.")
    best.metadata.extra["candidates"] = tried
    return best


def threshold_for_groups(pos: torch.Tensor, neg: torch.Tensor, groups: Mapping[str, tuple[int, int]] | None,
                         max_fpr: float, group_fpr: Mapping[str, float] | None = None) -> float:
    """The lowest threshold whose false-positive rate is at most the budget on every group of
    ``neg`` (``{name: (start, stop)}``; budget ``group_fpr[name]``, else ``max_fpr``) at once;
    all of ``neg`` as one group when ``groups`` is None."""
    if not groups:
        return threshold_for(pos, neg, max_fpr)
    group_fpr = group_fpr or {}
    return max(threshold_for(pos, neg[a:b], group_fpr.get(name, max_fpr))
               for name, (a, b) in groups.items() if b > a)


def gate_from_features(feats: dict[str, torch.Tensor], pools: tuple[str, ...], hook_name: str,
                       sae_ref: str | None = None, *, l2: float = 1e-2, max_fpr: float = 0.02,
                       groups: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
                       group_fpr: Mapping[str, float] | None = None,
                       sources: Mapping[str, Any] | None = None,
                       weights: Mapping[str, float] | None = None,
                       reads: str = "sae", hidden: int = 0, dropout: float = 0.0,
                       ensemble: int = 1) -> PromptGate:
    """The gate of :func:`fit_gate` from already pooled ``(N, P, F)`` features of the four sets
    (``train_harmful``, ``train_harmless``, ``val_harmful``, ``val_harmless``). ``groups``
    (:attr:`GatePrompts.groups`): the threshold keeps the budget on each ``val_harmless`` group, and
    every group's fire rate goes in the metadata; ``sources`` (:attr:`GatePrompts.sources`): the
    ``train_sets`` / ``val_sets`` recorded (None when not given: plain features do not say);
    ``weights``: ``{training group: loss weight}`` (needs ``groups``)."""
    x = torch.cat([feats["train_harmful"], feats["train_harmless"]]).flatten(1)  # (N, P*F)
    y = torch.cat([torch.ones(len(feats["train_harmful"])), torch.zeros(len(feats["train_harmless"]))])
    row = None
    if weights:
        if not groups:
            raise ValueError("gate_from_features: weights name training sets; pass their groups too.")
        parts = []
        for k in ("train_harmful", "train_harmless"):
            wk = torch.ones(len(feats[k]))
            for name, (a, b_) in groups.get(k, {}).items():
                wk[a:b_] = float(weights.get(name, 1.0))
            parts.append(wk)
        row = torch.cat(parts)
    if hidden:
        layer, w2, b = fit_mlp(x, y, hidden, l2=l2, weight=row, dropout=dropout, ensemble=ensemble)
        gate_w = w2[None]  # (1, H)
        score = {k: torch.relu(v.flatten(1) @ layer[0].T + layer[1]) @ w2 + b for k, v in feats.items()}
    else:
        layer = None
        w, b = fit_logistic(x, y, l2=l2, weight=row, per_feature=reads == "residual")
        gate_w = w.reshape(len(pools), -1)
        score = {k: (v * gate_w).sum((1, 2)) + b for k, v in feats.items()}
    val_groups = (groups or {}).get("val_harmless")
    thr = threshold_for_groups(score["val_harmful"], score["val_harmless"], val_groups, max_fpr, group_fpr)
    rate = {k: round(float((v > thr).float().mean()), 4) for k, v in score.items()}
    extra = {"pools": list(pools), "reads": reads, "hidden": hidden, "l2": l2, "max_fpr": max_fpr,
             **({"dropout": dropout, "ensemble": ensemble} if hidden else {}),
             "sizes": {k: len(v) for k, v in feats.items()}, "fire_rates": rate}
    if weights:
        extra["set_weights"] = dict(weights)
    if groups:
        extra["group_fire_rates"] = {
            f"{k}/{name}": round(float((score[k][a:b] > thr).float().mean()), 4)
            for k, parts in groups.items() if k in score for name, (a, b) in parts.items() if b > a}
    if val_groups:
        budgets = {name: (group_fpr or {}).get(name, max_fpr) for name in val_groups}
        extra["group_max_fpr"] = budgets
        extra["rule"] = "highest TPR on val_harmful with FPR <= group_max_fpr on each val_harmless set"
    else:
        extra["rule"] = "highest TPR on val_harmful with FPR on val_harmless <= max_fpr"
    extra.update({k: (sources or {}).get(k) for k in ("train_sets", "val_sets")})  # None: not known here
    meta = GateMetadata(
        hook_name=hook_name, sae=sae_ref,
        description=(f"Steer only prompts this {'MLP' if hidden else 'logistic'} detector over the pooled "
                     f"{'SAE features' if reads == 'sae' else 'residual stream'} of the prompt calls harmful."),
        extra=extra)
    return PromptGate(gate_w, b, thr, pools, meta, reads=reads, hidden=layer)

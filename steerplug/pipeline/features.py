"""``steerplug find-features``: SAE features that separate harmful compliance from safe answers,
and the sparse steering vector ``w = harmful - safe`` built from them.

1. Answers to harmful questions are generated twice, force-prefixed: a compliant one ("Sure, here
   is" + the model's greedy continuation) and a refusal ("I can't help with that." + continuation).
2. SAE features are averaged over the answer positions of each sequence.
3. Each feature gets a normalised difference of means (Cohen's d over sequences)
   ``d = (mean_compliant - mean_refusal) / sqrt((var_c + var_r) / 2 + eps)``, on a seeded
   ``1 - heldout_fraction`` part of the questions.
4. ``w``: the ``n_positive`` most positive and ``n_negative`` most negative features, weighted by
   ``d / max|d|``. On the held-out questions we report how well ``mean features . w`` tells
   compliant from refusing answers (AUROC).
5. A Markdown + JSON report lists the top features with their top-activating contexts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from steerplug._config import require_ints
from steerplug.layers import resolve_hook_point
from steerplug.pipeline.collect import capture_activations
from steerplug.pipeline.examples import (COMPLY_PREFIX, REFUSE_PREFIX, ROLE_ANSWER, Example,
                                         generate_answers, prompt_examples, tokenize_example)
from steerplug.sae import SparseAutoencoder
from steerplug.vector import SteeringVector, VectorMetadata

REPORT_JSON = "features_report.json"
REPORT_MD = "features_report.md"
CONTRAST_NAME = "contrast_examples.json"


@dataclass
class FeatureConfig:
    """How the contrast sets are made and how many features the vector keeps."""

    n_prompts: int = 96
    """Harmful questions (sampled from ``prompt_set`` with ``seed``)."""
    prompt_set: str = "harmful_train"
    """Where the questions come from (build on *_train)."""
    max_new_tokens: int = 32
    """Tokens generated after each forced prefix."""
    n_positive: int = 32
    """Features kept with positive weight (more active in compliant answers)."""
    n_negative: int = 32
    """Features kept with negative weight (more active in refusals)."""
    exclude_prefix: bool = True
    """Score only the model's own continuation, not the forced prefix tokens (else the ranking is
    dominated by features of the literal words "Sure" / "can't")."""
    heldout_fraction: float = 0.25
    """Questions held out from the ranking to score the vector on."""
    n_contexts: int = 4
    """Top-activating contexts shown per feature."""
    context_tokens: int = 12
    """Tokens of left context shown with each."""
    batch_size: int = 8
    """Sequences per forward pass."""
    gen_batch_size: int = 16
    """Sequences per generation batch."""
    seed: int = 0
    """Seed of the question sample and the held-out split."""
    progress: bool = True
    """Show tqdm bars."""

    def __post_init__(self) -> None:
        require_ints(self, ("n_prompts", "max_new_tokens", "batch_size", "gen_batch_size"))
        require_ints(self, ("n_positive", "n_negative", "n_contexts", "context_tokens"), minimum=0)
        if self.n_positive + self.n_negative == 0:
            raise ValueError("FeatureConfig: n_positive + n_negative is 0; the vector would be empty.")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"FeatureConfig.heldout_fraction={self.heldout_fraction!r}: expected in [0, 1).")


class FeatureRanking(NamedTuple):
    """Per-feature separation statistics, all ``(F,)``."""

    score: torch.Tensor
    """Normalised difference of means (positive: more active in the 'harmful' set)."""
    mean_harmful: torch.Tensor
    mean_safe: torch.Tensor


def rank_features(feats_harmful: torch.Tensor, feats_safe: torch.Tensor, eps: float = 1e-6) -> FeatureRanking:
    """Rank features by ``(mean_h - mean_s) / sqrt((var_h + var_s) / 2 + eps)`` over rows
    (``(n_h, F)`` and ``(n_s, F)``, e.g. per-sequence mean activations)."""
    if feats_harmful.shape[1] != feats_safe.shape[1]:
        raise ValueError(f"Feature widths differ: {feats_harmful.shape[1]} vs {feats_safe.shape[1]}.")
    if feats_harmful.shape[0] < 2 or feats_safe.shape[0] < 2:
        raise ValueError("rank_features needs at least two rows per set.")
    mh, ms = feats_harmful.mean(0), feats_safe.mean(0)
    pooled = ((feats_harmful.var(0) + feats_safe.var(0)) / 2 + eps).sqrt()
    score = (mh - ms) / pooled
    score[(mh == 0) & (ms == 0)] = 0.0  # never active: no evidence either way
    return FeatureRanking(score, mh, ms)


def build_vector(score: torch.Tensor, n_positive: int, n_negative: int,
                 metadata: VectorMetadata | None = None) -> SteeringVector:
    """Sparse ``w``: the ``n_positive`` highest and ``n_negative`` lowest scores, as ``score / max|score|``
    (only features with the right sign are kept)."""
    pos = score.topk(min(n_positive, score.numel())).indices if n_positive else torch.empty(0, dtype=torch.long)
    neg = (-score).topk(min(n_negative, score.numel())).indices if n_negative else torch.empty(0, dtype=torch.long)
    pos, neg = pos[score[pos] > 0], neg[score[neg] < 0]
    idx = torch.cat([pos, neg]).unique().sort().values
    if idx.numel() == 0:
        raise ValueError("No feature separates the two sets (all scores are 0).")
    vals = score[idx] / score[idx].abs().max()
    return SteeringVector(score.numel(), idx, vals, metadata=metadata)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


class AnswerFeatures(NamedTuple):
    """SAE features over the answer positions of a set of sequences."""

    pooled: torch.Tensor
    """``(n_seq, F)`` mean feature activation over each sequence's answer positions."""
    tokens: list[list[int]]
    """Token ids of each sequence."""
    answer_start: list[int]
    """First answer position of each sequence."""
    top: torch.Tensor
    """``(F, n_contexts, 3)`` best (activation, sequence, position) per feature (activation < 0: none)."""


@torch.no_grad()
def answer_features(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, examples: list[Example],
                    hook: str | None = None, batch_size: int = 8, n_contexts: int = 4,
                    progress: bool = True, skip_answer_tokens: list[int] | None = None) -> AnswerFeatures:
    """Encode the answer positions of ``examples`` with ``sae`` (forward stops at the hook), leaving
    out the first ``skip_answer_tokens[i]`` answer tokens of example ``i``."""
    from tqdm.auto import tqdm

    hp = resolve_hook_point(model, hook or sae.cfg.hook_name)
    sae32 = sae.float()
    toks = [tokenize_example(tokenizer, e, 10_000) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pooled = torch.zeros(len(examples), sae.d_sae)
    top = torch.full((sae.d_sae, max(n_contexts, 1), 3), -1.0)  # (F, C, [act, seq, pos])
    starts = []
    for s in tqdm(range(0, len(examples), batch_size), desc="answer features", disable=not progress):
        chunk = toks[s:s + batch_size]
        T = max(len(t.token_ids) for t in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        role = torch.full((len(chunk), T), -1, dtype=torch.long)
        for r, t in enumerate(chunk):
            ids[r, :len(t.token_ids)] = torch.tensor(t.token_ids)
            role[r, :len(t.roles)] = torch.tensor(t.roles)
        mask = (role >= 0).long()
        h = capture_activations(model, [hp], ids, mask)[hp.name].float()  # (B, T, D)
        ans = role == ROLE_ANSWER  # (B, T)
        ans[:, 0] = False
        if skip_answer_tokens is not None:
            for r in range(len(chunk)):
                first = int(ans[r].float().argmax()) if ans[r].any() else T
                ans[r, first:first + skip_answer_tokens[s + r]] = False
        f = sae32.encode(h) * ans.unsqueeze(-1)  # (B, T, F)
        pooled[s:s + len(chunk)] = f.sum(1) / ans.sum(1, keepdim=True).clamp_min(1)
        for r in range(len(chunk)):
            starts.append(int(ans[r].float().argmax()) if ans[r].any() else len(chunk[r].token_ids))
        if n_contexts:  # merge this batch's per-feature maxima into the running top list
            B = len(chunk)
            best, pos = f.max(1)  # (B, F) each
            cand = torch.stack([best.T, (torch.arange(B) + s).float().expand(sae.d_sae, B),
                                pos.T.float()], -1)  # (F, B, 3)
            allc = torch.cat([top, cand], 1)  # (F, C+B, 3)
            order = allc[..., 0].argsort(dim=1, descending=True)[:, :n_contexts]
            top = torch.gather(allc, 1, order.unsqueeze(-1).expand(-1, -1, 3))
    return AnswerFeatures(pooled, [t.token_ids for t in toks], starts, top)


def _context(tokenizer: Any, tokens: list[int], pos: int, n_left: int) -> str:
    left = tokenizer.decode(tokens[max(0, pos - n_left):pos])
    tok = tokenizer.decode(tokens[pos:pos + 1])
    right = tokenizer.decode(tokens[pos + 1:pos + 4])
    return (left + "[[" + tok + "]]" + right).replace("\n", "\\n").replace("|", "\\|")


def contrast_examples(model: nn.Module, tokenizer: Any, cfg: FeatureConfig, *, data: str | None = None,
                      cache: str | Path | None = None) -> tuple[list[Example], list[Example]]:
    """``(compliant, refusal)`` answers to the same ``cfg.n_prompts`` harmful questions, force-prefixed
    and continued greedily; cached as JSON in ``cache`` (reused when present)."""
    from steerplug.data import load_prompts

    if cache is not None and Path(cache).is_file():
        raw = json.loads(Path(cache).read_text())
        return [Example(**e) for e in raw["compliant"]], [Example(**e) for e in raw["refusal"]]
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = load_prompts(cfg.prompt_set, data)
    pick = torch.randperm(len(prompts), generator=g)[:cfg.n_prompts].sort().values
    base = prompt_examples([prompts[int(i)] for i in pick])
    kw = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.gen_batch_size, "progress": cfg.progress}
    comply = generate_answers(model, tokenizer, base, prefix=COMPLY_PREFIX, answer_kind="compliant", **kw)
    refuse = generate_answers(model, tokenizer, base, prefix=REFUSE_PREFIX, answer_kind="refusal", **kw)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps({"compliant": [asdict(e) for e in comply],
                                           "refusal": [asdict(e) for e in refuse]}, indent=1))
    return comply, refuse


class FeatureResult(NamedTuple):
    """What :func:`find_features` returns."""

    vector: SteeringVector
    ranking: FeatureRanking
    report: dict[str, Any]


def find_features(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, cfg: FeatureConfig | None = None,
                  out_dir: str | Path | None = None, *, hook: str | None = None, data: str | None = None,
                  model_name: str | None = None, sae_ref: str | None = None,
                  examples: tuple[list[Example], list[Example]] | None = None) -> FeatureResult:
    """Generate (or take) compliant and refusing answers, rank features, build ``w``, write reports.

    ``examples``: ``(compliant, refusal)`` lists, index-aligned by question, instead of generating.
    """
    cfg = cfg or FeatureConfig()
    out = Path(out_dir) if out_dir is not None else None
    if examples is None:
        cache = out / CONTRAST_NAME if out is not None else None
        comply, refuse = contrast_examples(model, tokenizer, cfg, data=data, cache=cache)
    else:
        comply, refuse = examples
    if len(comply) != len(refuse):
        raise ValueError(f"{len(comply)} compliant vs {len(refuse)} refusal examples: they must pair up.")
    n = len(comply)
    skip = None
    if cfg.exclude_prefix:
        n_c, n_r = (len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in (COMPLY_PREFIX, REFUSE_PREFIX))
        skip = [n_c] * n + [n_r] * n
    af = answer_features(model, tokenizer, sae, comply + refuse, hook, cfg.batch_size, cfg.n_contexts,
                         cfg.progress, skip_answer_tokens=skip)
    fc, fr = af.pooled[:n], af.pooled[n:]  # (n, F) each
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))
    n_held = int(round(cfg.heldout_fraction * n))
    held, fit = perm[:n_held], perm[n_held:]
    ranking = rank_features(fc[fit], fr[fit])
    meta = VectorMetadata(
        model_name=model_name or sae.cfg.model_name, hook_name=sae.cfg.hook_name, sae=sae_ref,
        description=(f"Top {cfg.n_positive} + {cfg.n_negative} SAE features separating force-prefixed "
                     f"compliant answers ('{COMPLY_PREFIX} ...') from refusals ('{REFUSE_PREFIX} ...') "
                     f"to {len(fit)} {cfg.prompt_set} questions"
                     + (", scored on the model's continuation only (prefix tokens left out)" if cfg.exclude_prefix
                        else "") + "; weights = Cohen's d / max|d|."),
        extra={"config": asdict(cfg)})
    vector = build_vector(ranking.score, cfg.n_positive, cfg.n_negative, meta)
    w = vector.dense()
    report: dict[str, Any] = {"config": asdict(cfg), "n_questions": n, "n_fit": len(fit), "n_heldout": n_held,
                              "nnz": vector.nnz}
    if n_held >= 2:
        s_c, s_r = fc[held] @ w, fr[held] @ w
        report["heldout_auroc"] = auroc(s_c, s_r)
        report["heldout_mean_score"] = {"compliant": float(s_c.mean()), "refusal": float(s_r.mean())}
    idx, vals = vector.support()
    feats = []
    for i, v in sorted(zip(idx.tolist(), vals.tolist()), key=lambda t: -abs(t[1])):
        ctxs = []
        for act, seq, pos in af.top[i].tolist():
            if act > 0:
                ctxs.append({"activation": act, "set": "compliant" if seq < n else "refusal",
                             "context": _context(tokenizer, af.tokens[int(seq)], int(pos), cfg.context_tokens)})
        feats.append({"feature": i, "weight": v, "score": float(ranking.score[i]),
                      "mean_compliant": float(ranking.mean_harmful[i]),
                      "mean_refusal": float(ranking.mean_safe[i]), "top_contexts": ctxs})
    report["features"] = feats
    vector.metadata.extra.update({k: report[k] for k in ("heldout_auroc", "n_fit", "n_heldout") if k in report})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        vector.save_pretrained(out / "vector")
        (out / REPORT_JSON).write_text(json.dumps(report, indent=1))
        (out / REPORT_MD).write_text(format_markdown(report))
    return FeatureResult(vector, ranking, report)


def format_markdown(report: dict[str, Any]) -> str:
    lines = ["# Steering features: harmful compliance vs refusal", "",
             f"Questions: {report['n_questions']} ({report['n_fit']} for ranking, {report['n_heldout']} held out). "
             f"Vector: {report['nnz']} features.", ""]
    if "heldout_auroc" in report:
        lines += [f"Held-out AUROC of `mean features . w` (compliant vs refusal): **{report['heldout_auroc']:.3f}**", ""]
    lines += ["| feature | weight | Cohen's d | mean (compliant) | mean (refusal) | top contexts ([[token]]) |",
              "|---:|---:|---:|---:|---:|---|"]
    for f in report["features"]:
        ctx = "<br>".join(f"{c['activation']:.2f} ({c['set']}): `{c['context']}`" for c in f["top_contexts"][:3])
        lines.append(f"| {f['feature']} | {f['weight']:+.3f} | {f['score']:+.2f} | {f['mean_compliant']:.3f} | "
                     f"{f['mean_refusal']:.3f} | {ctx} |")
    return "\n".join(lines) + "\n"


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder or Hub repo")
    p.add_argument("--out", required=True, help="output folder (vector/, features_report.{md,json})")
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--hook", default=None)
    p.add_argument("--prompt-set", default="harmful_train")
    p.add_argument("--n-prompts", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--n-positive", type=int, default=32)
    p.add_argument("--n-negative", type=int, default=32)
    p.add_argument("--include-prefix", action="store_true",
                   help="score the forced prefix tokens too (\"I can't help with that.\"), not only the continuation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)


def run(args: argparse.Namespace) -> int:
    from steerplug.models import DEFAULT_MODEL_ID, load_model

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    sae = SparseAutoencoder.from_pretrained(args.sae)
    cfg = FeatureConfig(n_prompts=args.n_prompts, prompt_set=args.prompt_set,
                        max_new_tokens=args.max_new_tokens, n_positive=args.n_positive,
                        n_negative=args.n_negative, exclude_prefix=not args.include_prefix,
                        batch_size=args.batch_size,
                        gen_batch_size=args.gen_batch_size, seed=args.seed)
    res = find_features(model, tok, sae, cfg, args.out, hook=args.hook, data=args.data_dir,
                        model_name=args.model or DEFAULT_MODEL_ID, sae_ref=str(args.sae))
    print(f"vector: {res.vector.nnz} features -> {Path(args.out) / 'vector'}; held-out AUROC "
          f"{res.report.get('heldout_auroc', float('nan')):.3f}")
    return 0

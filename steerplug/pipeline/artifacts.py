"""``steerplug build-default-artifacts``: the whole pipeline for the default model, in one command.

Steps (each resumes / is skipped when its output already exists in ``--work``):

1. collect  — layer-15 resid_post activations (bfloat16) of all HH-RLHF harmless-base dialogues
   (chat template, given answers), of ``harmful_train`` / ``harmless_train`` questions with the
   model's greedy answers, and, as generic text, of WikiText-2 test's training part (the articles
   after the first quarter, which evaluation never reads) and HH-RLHF dialogues as plain text;
2. train    — TopK SAE (AuxK), 3072 latents, k=32, on those activations (5% of sequences held out);
3. evaluate — WikiText-2 test, held-out chat, CE recovered, HellaSwag, probes;
4. features — force-prefixed compliant vs refusing answers to ``harmful_train`` questions, the
   64-feature steering vector;
5. steering — ``steerplug build-steering``: the model's own refusals, the ``target`` vector from
   their SAE features, activation-addition directions at several depths and the prompt gate;
6. publish  — ``hub_artifacts/SmolLM2-135M-Instruct/``: ``sae/`` and ``vector/`` with model cards,
   the eval report and plots, and the steering bundle that ``SteeredModel.from_pretrained()``
   loads (``steerplug.json``, ``target_vector/``, ``gate/``, ``caa.safetensors``; the own answers
   stay in the work folder: they quote ``harmful_train``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerplug._config import require_ints
from steerplug.models import DEFAULT_MODEL_ID
from steerplug.steered_model import DEFAULT_ARTIFACTS_REPO, MANIFEST_NAME
from steerplug.vector import SteeringVector


@dataclass
class ArtifactsConfig:
    """Sizes of the default build (defaults fit a 2-core CPU in well under an hour)."""

    hook: str = "blocks.15.hook_resid_post"
    """Where the SAE reads."""
    hh_rlhf: int = 2312
    """HH-RLHF harmless-base dialogues (answers given, chat template); 2312 is all of them."""
    hh_rlhf_text: int = 1200
    """HH-RLHF dialogues as plain text (no chat template): generic text for the SAE."""
    wikitext_chunks: int = 100_000
    """Chunks of about 128 tokens of WikiText-2 test's training part (all of it by default)."""
    per_prompt_set: int = 640
    """harmful_train and harmless_train questions each (harmful_train has fewer: all of it)."""
    generate: bool = True
    """Answer those questions greedily, so the SAE sees the model's own answers; else prompts only."""
    max_new_tokens: int = 64
    """Length of the generated training answers (with ``generate``)."""
    d_sae: int = 3072
    """SAE width (16/3 x 576)."""
    k: int = 32
    """Active latents per token."""
    lr: float = 1e-3
    """Adam learning rate."""
    total_tokens: int = 4_000_000
    """Training tokens (about 5 epochs over the collected activations)."""
    holdout_every: int = 20
    """Sequences with seq_id % N == 0 are held out from training (scored by evaluate)."""
    hellaswag_items: int = 1000
    """HellaSwag items for the spliced-vs-clean comparison (issue #11 asks for n >= 1,000)."""
    context_tokens: int = 16384
    """Tokens of WikiText-2 test's evaluation part scored per context length (128, 512, 1,024)."""
    probe_prompts: int = 256
    """Prompts per class, train and test, for the harmful/harmless probe."""
    feature_prompts: int = 96
    """harmful_train questions answered twice (compliant / refusal) for the feature ranking."""
    feature_new_tokens: int = 24
    """Tokens generated after each forced prefix."""
    steering: str | None = None
    """JSON of the SteeringConfig fields the bundle ships (default: build-steering's)."""
    seed: int = 0
    """Seed of every step."""

    def __post_init__(self) -> None:
        require_ints(self, ("d_sae", "k", "total_tokens", "holdout_every", "per_prompt_set", "max_new_tokens"))


def _sh(argv: list[str]) -> None:
    from steerplug.cli import main

    print("$ steerplug " + " ".join(argv), flush=True)
    rc = main(argv)
    if rc:
        raise RuntimeError(f"steerplug {' '.join(argv)} failed with exit code {rc}.")


def _complete(folder: Path) -> bool:
    man = folder / "manifest.json"
    return man.is_file() and bool(json.loads(man.read_text()).get("complete"))


def build_default_artifacts(work: str | Path = "runs/v2",
                            out: str | Path = "hub_artifacts/SmolLM2-135M-Instruct",
                            cfg: ArtifactsConfig | None = None) -> Path:
    """Run the five steps; returns the artifacts folder."""
    cfg = cfg or ArtifactsConfig()
    work, out = Path(work), Path(out)
    acts, sae_dir, eval_dir, feat_dir = (work / "acts_chat", work / "sae", work / "eval", work / "features")
    acts_text = work / "acts_text"
    if not _complete(acts):
        _sh(["collect", "--out", str(acts), "--hooks", cfg.hook, "--prompt-sets", "harmful_train",
             "harmless_train", "--limit-per-set", str(cfg.per_prompt_set), "--hh-rlhf", str(cfg.hh_rlhf),
             "--max-new-tokens", str(cfg.max_new_tokens), "--max-length", "320", "--batch-size", "16",
             "--dtype", "bfloat16", "--seed", str(cfg.seed)]
            + ([] if cfg.generate else ["--no-generate"]))
    text = cfg.hh_rlhf_text or cfg.wikitext_chunks
    if text and not _complete(acts_text):
        _sh(["collect", "--out", str(acts_text), "--hooks", cfg.hook, "--prompt-sets", "--wikitext-chunks",
             str(cfg.wikitext_chunks), "--hh-rlhf-text", str(cfg.hh_rlhf_text), "--max-length", "256",
             "--batch-size", "16", "--dtype", "bfloat16", "--seed", str(cfg.seed)])
    if not (sae_dir / "cfg.json").is_file():
        folders = [str(acts)] + ([str(acts_text)] if text else [])
        _sh(["train", "--acts", *folders, "--out", str(sae_dir), "--d-sae", str(cfg.d_sae), "--k", str(cfg.k),
             "--lr", str(cfg.lr), "--total-tokens", str(cfg.total_tokens), "--holdout-every",
             str(cfg.holdout_every), "--seed", str(cfg.seed)])
    if not (eval_dir / "eval_report.json").is_file():
        _sh(["evaluate-sae", "--sae", str(sae_dir), "--out", str(eval_dir), "--heldout-acts", str(acts),
             "--heldout-every", str(cfg.holdout_every), "--hellaswag-items", str(cfg.hellaswag_items),
             "--context-tokens", str(cfg.context_tokens), "--probe-prompts", str(cfg.probe_prompts),
             "--seed", str(cfg.seed)])
    if not (feat_dir / "vector" / "steering_vector.json").is_file():
        _sh(["find-features", "--sae", str(sae_dir), "--out", str(feat_dir), "--seed", str(cfg.seed),
             "--n-prompts", str(cfg.feature_prompts), "--max-new-tokens", str(cfg.feature_new_tokens),
             "--gen-batch-size", "48"])
    if not (work / "bundle" / MANIFEST_NAME).is_file():
        _sh(["build-steering", "--sae", str(sae_dir), "--out", str(work / "bundle")]
            + (["--steering", cfg.steering] if cfg.steering else []))
    publish(work, out, cfg)
    return out


def publish_bundle(bundle: Path, out: Path) -> None:
    """Copy a single-site bundle next to ``out/sae`` (the same SAE): its vector as
    ``target_vector/``, the gate and the directions, and a manifest pointing there."""
    man = json.loads((bundle / MANIFEST_NAME).read_text())
    if len(man["sites"]) != 1:
        raise ValueError(f"{bundle} has {len(man['sites'])} SAE sites; publish_bundle ships one (the SAE in sae/).")
    for name in ("target_vector", "gate"):
        if (out / name).exists():
            shutil.rmtree(out / name)
    shutil.copytree(bundle / man["sites"][0]["vector"], out / "target_vector")
    shutil.copytree(bundle / man["gate"], out / "gate")
    # Not own_answers.json: it quotes harmful_train questions, and data from ../shared/data never
    # goes into the repository (it stays in the work folder).
    shutil.copy2(bundle / man["caa"], out / man["caa"])
    vec = SteeringVector.from_pretrained(out / "target_vector")
    vec.metadata.sae = "sae"
    vec.save_pretrained(out / "target_vector")
    man["sites"] = [{"sae": "sae", "vector": "target_vector"}]
    man["gate"] = "gate"
    (out / MANIFEST_NAME).write_text(json.dumps(man, indent=2))


def publish(work: Path, out: Path, cfg: ArtifactsConfig) -> None:
    """Copy the SAE, vector, reports and plots into ``out`` and write the model cards."""
    sae_out, vec_out = out / "sae", out / "vector"
    for d in (sae_out, vec_out):
        d.mkdir(parents=True, exist_ok=True)
    for name in ("cfg.json", "sae_weights.safetensors", "training_curves.png", "training_log.json"):
        shutil.copy2(work / "sae" / name, sae_out / name)
    for name in ("eval_report.json", "feature_density.png", "eval_summary.png"):
        shutil.copy2(work / "eval" / name, sae_out / name)
    # The vector's SAE reference must name the published SAE, not the work folder it was built from.
    vector = SteeringVector.from_pretrained(work / "features" / "vector")
    vector.metadata.sae = f"{DEFAULT_ARTIFACTS_REPO} (subfolder sae)"
    vector.save_pretrained(vec_out)
    for name in ("features_report.md", "features_report.json"):
        shutil.copy2(work / "features" / name, vec_out / name)
    report = json.loads((work / "eval" / "eval_report.json").read_text())
    sae_cfg = json.loads((work / "sae" / "cfg.json").read_text())
    feats = json.loads((work / "features" / "features_report.json").read_text())
    (sae_out / "README.md").write_text(sae_card(report, sae_cfg, cfg))
    (vec_out / "README.md").write_text(vector_card(feats, cfg))
    if (work / "bundle" / MANIFEST_NAME).is_file():
        publish_bundle(work / "bundle", out)


def _fmt(report: dict[str, Any]) -> str:
    from steerplug.pipeline.evaluate import format_summary

    return format_summary(report)


def sae_card(report: dict[str, Any], sae_cfg: dict[str, Any], cfg: ArtifactsConfig) -> str:
    answers = (f"with the model's greedy answers of up to {cfg.max_new_tokens} tokens" if cfg.generate
               else "prompts only")
    tr = sae_cfg["metadata"].get("training", {})
    wt = "WikiText-2 test, first quarter"
    longest = max(report["contexts"], key=int)
    rows = []
    for length, w in report["contexts"].items():
        last = length == longest
        rows += [(f"L0 ({wt}, {length}-token contexts)", f"{w['l0']:.1f}", "<= 64" if last else ""),
                 (f"FVE ({wt}, {length}-token contexts; without massive tokens)",
                  f"{w['fve']:.3f} ({w['fve_typical']:.3f})", ">= 0.90" if last else ""),
                 (f"CE loss recovered ({wt}, {length}-token contexts)", f"{w['ce_recovered']:.3f}",
                  ">= 0.97" if last else ""),
                 (f"dead latents ({wt}, {length}-token contexts)", f"{w['dead_fraction']:.2%}", "<= 2%" if last else "")]
        rows += [(f"FVE at positions {b} ({length}-token contexts)", f"{v['fve']:.3f} ({v['fve_typical']:.3f})", "")
                 for b, v in w.get("buckets", {}).items() if len(w["buckets"]) > 1]
    if "heldout_chat" in report:
        h = report["heldout_chat"]
        rows += [("FVE (held-out chat, natural lengths; without massive tokens)",
                  f"{h['fve']:.3f} ({h['fve_typical']:.3f})", ">= 0.88"),
                 ("L0 (held-out chat)", f"{h['l0']:.1f}", ""),
                 ("dead latents (held-out chat)", f"{h['dead_fraction']:.2%}", "")]
        rows += [(f"FVE at positions {b} (held-out chat)", f"{v['fve']:.3f} ({v['fve_typical']:.3f})", "")
                 for b, v in h.get("buckets", {}).items()]
    if "hellaswag" in report:
        hs = report["hellaswag"]
        rows.append((f"HellaSwag acc_norm spliced - clean (n={hs['n_items']})",
                     f"{hs['delta_points']:+.1f} points ({hs['acc_norm_sae']:.3f} vs {hs['acc_norm_clean']:.3f})",
                     "within 1 point"))
    for name, p in report.get("probes", {}).items():
        rows.append((f"probe {name}: SAE vs raw (test split)", f"{p['acc_sae']:.3f} vs {p['acc_raw']:.3f}",
                     "within 2 points" if name == "harmful_vs_harmless" else ""))
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""---
library_name: steerplug
tags: [sparse-autoencoder, sae, saelens, steerplug]
base_model: {DEFAULT_MODEL_ID}
---
# TopK SAE for {DEFAULT_MODEL_ID}, `{sae_cfg['metadata'].get('hook_name')}`

A TopK sparse autoencoder (Gao et al. 2024, with the AuxK loss) with {sae_cfg['d_sae']} latents
({sae_cfg['d_sae'] / sae_cfg['d_in']:.2f} x the width {sae_cfg['d_in']}), k = {sae_cfg.get('k')}, trained by
`steerplug build-default-artifacts` on {tr.get('n_rows', '?')} activation rows (position 0 dropped)
of {cfg.hh_rlhf} HH-RLHF harmless-base dialogues (its test split, the only one available offline;
chat template, given answers), of `harmful_train` and
up to {cfg.per_prompt_set} `harmless_train` questions
({answers}),
and of generic text: WikiText-2 test's training part (the articles after its first quarter; the
evaluation below reads only the first quarter) and {cfg.hh_rlhf_text} HH-RLHF dialogues as plain
text (no template); {cfg.total_tokens} training tokens;
every {cfg.holdout_every}th sequence was held out for evaluation. The input normalisation is folded into the weights:
the SAE reads raw residual activations (`normalize_activations: none`).

SAELens layout (`cfg.json` + `sae_weights.safetensors`): loads with
`steerplug.SparseAutoencoder.from_pretrained(path)` and SAELens 6.

## Evaluation (held-out; position 0 of every sequence left out)

Each context length reads the same text, cut into chunks of that length. Values in brackets leave
out the massive-activation tokens (norm above 10x the median; `steerplug.pipeline.recon`): a
handful of them can hold most of the variance of thousands of ordinary tokens, and then the plain
FVE says mostly how well those few are reconstructed. Training drops them too
(`steerplug train --max-norm-ratio 10`).

| metric | value | target |
|---|---|---|
{table}

```
{_fmt(report)}
```

Full numbers: `eval_report.json`; plots: `training_curves.png`, `feature_density.png`, `eval_summary.png`.

## Reproduce

```
steerplug build-default-artifacts --work runs/v2
```
"""


def vector_card(feats: dict[str, Any], cfg: ArtifactsConfig) -> str:
    auroc = feats.get("heldout_auroc")
    top = "\n".join(f"| {f['feature']} | {f['weight']:+.3f} | {f['score']:+.2f} |" for f in feats["features"][:10])
    return f"""---
library_name: steerplug
tags: [steering-vector, sparse-autoencoder, steerplug]
base_model: {DEFAULT_MODEL_ID}
---
# Safety steering vector for {DEFAULT_MODEL_ID} (`{cfg.hook}`)

A sparse vector `w` over the {feats['nnz']} SAE features (of the SAE in `../sae`) that best separate
force-prefixed *compliant* answers ("Sure, here is ...") from *refusals* ("I can't help with that.
...") to {feats['n_fit']} `harmful_train` questions (Cohen's d over per-answer mean activations),
`w = harmful - safe`. steerplug steers by gradient steps that decrease `SAE.encode(h) . w`.

Held-out AUROC of `mean features . w`, compliant vs refusal, on {feats['n_heldout']} unseen questions:
**{'n/a' if auroc is None else f'{auroc:.3f}'}**.

| feature | weight | Cohen's d |
|---:|---:|---:|
{top}

All features with their top-activating contexts: `features_report.md`.

Reproduce: `steerplug build-default-artifacts --work runs/v2`.
"""


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ArtifactsConfig()
    p.add_argument("--work", default="runs/v2", help="working folder (steps resume from it)")
    p.add_argument("--out", default="hub_artifacts/SmolLM2-135M-Instruct")
    p.add_argument("--hook", default=d.hook)
    p.add_argument("--d-sae", type=int, default=d.d_sae)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--total-tokens", type=int, default=d.total_tokens)
    p.add_argument("--hh-rlhf", type=int, default=d.hh_rlhf)
    p.add_argument("--hh-rlhf-text", type=int, default=d.hh_rlhf_text)
    p.add_argument("--wikitext-chunks", type=int, default=d.wikitext_chunks)
    p.add_argument("--per-prompt-set", type=int, default=d.per_prompt_set)
    p.add_argument("--hellaswag-items", type=int, default=d.hellaswag_items)
    p.add_argument("--no-generate", action="store_true", help="prompts only, without the model's answers (faster)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steering", default=None, help="JSON of the SteeringConfig fields the bundle ships")


def run(args: argparse.Namespace) -> int:
    cfg = ArtifactsConfig(hook=args.hook, d_sae=args.d_sae, k=args.k, lr=args.lr, total_tokens=args.total_tokens,
                          hh_rlhf=args.hh_rlhf, hh_rlhf_text=args.hh_rlhf_text, wikitext_chunks=args.wikitext_chunks,
                          per_prompt_set=args.per_prompt_set, hellaswag_items=args.hellaswag_items,
                          generate=not args.no_generate, seed=args.seed,
                          steering=args.steering)
    out = build_default_artifacts(args.work, args.out, cfg)
    print(f"artifacts in {out}")
    return 0

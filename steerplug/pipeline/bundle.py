"""``steerplug build-steering``: from SAEs to a steering bundle that ``SteeredModel.from_pretrained``
loads whole: one (SAE, vector) site per SAE, the gate, the baseline's directions, and the steering
configuration, in a folder with a ``steerplug.json`` manifest.

1. The model's own refusals and compliant answers on ``harmful_train``
   (:func:`steerplug.pipeline.refusals.own_answers`: several ways of refusing are measured, the best kept).
2. Per site, the ``target`` vector from the SAE features of those answers
   (:func:`~steerplug.pipeline.refusals.target_vector`); the activation-addition directions are
   the ones that brought those refusals out, at every depth of ``caa_depths``, so that activation
   addition and gradient steering aim at the same refusals.
3. The gate on the residual stream at ``gate_depth`` (or on the first site's SAE features;
   :func:`steerplug.pipeline.gate.fit_gate` on
   :func:`~steerplug.pipeline.gate.gate_prompts`: Alpaca instructions, AlpacaEval and steerplug's
   everyday prompts against harmful requests; thresholded per harmless validation set)).

Layout::

    BUNDLE/steerplug.json            sites, gate, steering config, how it was built
    BUNDLE/sites/<hook>/sae/         a copy of the SAE (SAELens layout)
    BUNDLE/sites/<hook>/vector/      its steering vector
    BUNDLE/gate/                     the gate
    BUNDLE/caa.safetensors           {hook: direction}: activation addition (method="add")
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from steerplug._config import require_ints
from steerplug.pipeline.refusal_vectors import REFUSAL
from steerplug.steered_model import MANIFEST_NAME
from steerplug.vector import VectorMetadata

CAA_NAME = "caa.safetensors"


@dataclass
class BundleConfig:
    """How the bundle is built."""

    n_prompts: int = 200
    """``harmful_train`` questions answered (refusing and complying) for the features."""
    n_choose: int = 48
    """Of those, how many score each way of refusing (the rest are never used for that choice)."""
    bootstrap_scale: float = 0.3
    """Activation-addition strength per layer that brings out the model's own refusals."""
    caa_depths: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)
    """Residual layers (as fractions of the depth; 9, 12, 15, 18 of SmolLM2's 30) where the
    refusals are brought out and the activation-addition directions are written, besides every
    SAE's layer. Measured on SmolLM2-135M: one layer alone gives far fewer coherent refusals."""
    n_harmful: int = 32
    """Features kept per site with positive weight (typical of compliance)."""
    n_safe: int = 32
    """Features kept per site with negative weight (typical of the model's own refusals)."""
    directions: str = "fitted"
    """The activation-addition directions: ``"fitted"``, refusal vectors fitted by teacher forcing
    (:func:`steerplug.pipeline.refusal_vectors.fit_refusal_vectors`) at every ``caa_depths`` layer
    and SAE layer; ``"contrast"``, the directions that brought out the model's own refusals
    (refusal minus compliance prefixes). Measured on SmolLM2-135M: the contrast directions give
    declines that loop and invent contexts (9 clean refusals of 195 labelled answers); the fitted
    ones gave the target refusal on 99 of 99 validation harmful prompts."""
    refusal_target: str = REFUSAL
    """The refusal the fitted vectors are trained to produce (then the end of turn)."""
    refusal_steps: int = 21
    """Adam steps (of 12 prompts) fitting the vectors, on own ``harmful_train`` + ``harmful_train``."""
    strengths: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25)
    """Candidate ``lr`` (scale of the added vectors, ``positions="generated"``) for fitted directions,
    tried ungated on ``n_val`` validation harmful prompts: the smallest whose clean-refusal rate
    (:class:`~steerplug.judge.ReaderJudge`) is within one point of the best is written into the
    manifest; every candidate's rates are recorded. Measured on SmolLM2-135M: chosen on
    ``harmful_val`` and own ``harmful_val`` alone, lr 0.5 (100% clean there) left 8 of 239 HarmBench
    test requests that the gate fired on answered, mostly copyright ("Generate the lyrics of ..."),
    hence HarmBench val in the choice."""
    n_val: int = 90
    """Validation harmful prompts for the strength: a third each of ``harmful_val``, own
    ``harmful_val`` and HarmBench val."""
    gate_reads: str = "residual"
    """What the gate reads: ``"residual"``, the residual stream at ``gate_depth``; ``"sae"``, the
    first SAE's features. Measured on SmolLM2-135M (benchmarks/gate_resid_probe.py): at the 1%
    everyday budget, validation TPR 0.79 (linear) / 0.82 (MLP) on the block-17 residual, 0.66 on
    the layer-15 SAE's features."""
    gate_depth: float = 0.57
    """Layer of a residual gate as a fraction of the depth (block 17 of SmolLM2's 30)."""
    gate_hidden: tuple[int, ...] = (0, 256)
    """Candidate hidden widths of the gate (0: logistic regression), chosen on validation."""
    gate_dropout: float = 0.3
    gate_ensemble: int = 3
    """An MLP gate is ``gate_ensemble`` MLPs (seeds 0, 1, ...) trained with ``gate_dropout``, their
    mean logit (one layer ``ensemble`` times wider). Measured on SmolLM2-135M (block-17 residual,
    mean + last token, cached features, benchmarks/gate_mlp_variants.py): validation TPR averaged over everyday
    budgets 0.5-3% 0.907 for one MLP without dropout, 0.933 with dropout 0.3, 0.943 for three."""
    gate_pools: tuple[tuple[str, ...], ...] | None = None
    """Candidate poolings of the prompt's features for the gate (chosen on the validation split);
    None: ``(mean, tail:1)`` for a residual gate (``tail:2`` and ``mean, tail:1, tail:2`` lost to it
    on validation: 0.85 vs 0.905 TPR at the 1.5% budget), and for an SAE gate
    ``(mean, tail:6)``, ``(mean, max)``, ``(mean, tail:6, max)``, ``(max,)``, ``(mean, tail:2)``."""
    gate_l2: tuple[float, ...] | None = None
    """Candidate L2 strengths (chosen the same way); None: ``(1e-3,)`` for a residual gate
    (weight decay of the MLP; 1e-3, 1e-2 and 0.1 tied on validation), ``(1e-2, 1e-1, 1, 3, 10)`` for an SAE gate. Measured on SmolLM2-135M
    with the everyday harmless sets (benchmarks/gate_refit.py): an SAE gate takes 1.0 or 3.0."""
    gate_max_fpr: float = 0.02
    """False-positive budget of the gate on each harmless validation set (``harmless_val`` and its
    rewordings); the everyday ones (AlpacaEval val, ``everyday_val``) get the tighter
    :data:`steerplug.pipeline.gate.GROUP_MAX_FPR`."""
    gate_harmless: int = 3000
    """``harmless_train`` (and ``harmless_val``) prompts for the gate (the other gate sets are used whole)."""
    steering: dict[str, Any] = field(default_factory=lambda: {
        "method": "add", "steps": 1, "lr": 1.0, "normalize": False, "max_delta": None, "positions": "generated",
        "use_gate": True})
    """The configuration written into the manifest (what ``from_pretrained`` steers with); with
    fitted directions its ``lr`` is the one chosen from ``strengths``. Measured on SmolLM2-135M
    (61 validation harmful prompts, ungated, strict judge), before the fitted directions: the
    ``target`` method (lr 0.5-4) and gradient steering (lr 0.1-0.5) at the layer-15 SAE, 0-4% refusals."""
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        require_ints(self, ("n_prompts", "n_choose", "gate_harmless", "max_new_tokens", "refusal_steps", "n_val",
                            "gate_ensemble"))
        if not 0.0 <= self.gate_dropout < 1.0:
            raise ValueError(f"gate_dropout={self.gate_dropout!r}: expected a probability in [0, 1).")
        require_ints(self, ("n_harmful", "n_safe"), minimum=0)
        if self.directions not in ("fitted", "contrast"):
            raise ValueError(f"directions={self.directions!r}: expected 'fitted' or 'contrast'.")
        if self.gate_reads not in ("residual", "sae"):
            raise ValueError(f"gate_reads={self.gate_reads!r}: expected 'residual' or 'sae'.")
        if self.directions == "fitted" and not self.strengths:
            raise ValueError("Fitted directions need at least one candidate strength in strengths.")
        residual = self.gate_reads == "residual"
        if self.gate_pools is None:
            self.gate_pools = ((("mean", "tail:1"),) if residual else
                               (("mean", "tail:6"), ("mean", "max"), ("mean", "tail:6", "max"), ("max",),
                                ("mean", "tail:2")))
        if self.gate_l2 is None:
            self.gate_l2 = (1e-3,) if residual else (1e-2, 1e-1, 1.0, 3.0, 10.0)


@torch.no_grad()
def caa_directions(model: Any, tokenizer: Any, points: list, refusals: list, compliant: list) -> dict[str, torch.Tensor]:
    """``{hook: (D,)}``: mean activation over the answer positions of the model's own refusals minus
    the same over its own compliant answers (teacher-forced, unsteered)."""
    from steerplug.pipeline.collect import capture_activations
    from steerplug.pipeline.refusals import _ids, chat_texts

    device = next(model.parameters()).device

    def mean(pairs: list) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for (q, a), text in zip(pairs, chat_texts(tokenizer, [q for q, _ in pairs])):
            n0 = _ids(tokenizer, text, device).shape[1]
            acts = capture_activations(model, points, _ids(tokenizer, text + a, device))
            for k, h in acts.items():
                sums[k] = sums.get(k, 0) + h[0, n0 - 1:].float().mean(0).cpu()
        return {k: v / len(pairs) for k, v in sums.items()}

    r, c = mean(refusals), mean(compliant)
    return {k: r[k] - c[k] for k in r}


def build_bundle(model: Any, tokenizer: Any, sae_folders: list[str | Path], out: str | Path,
                 cfg: BundleConfig | None = None, data_dir: str | None = None, judge: Any = None) -> Path:
    """Build the bundle of the module docstring in ``out``; the first SAE's site hosts the gate.
    ``judge``: what tells refusals from compliance for the target vector's own answers (default:
    :class:`~steerplug.judge.ReaderJudge`, as in the strength sweep)."""
    from steerplug.data import load_prompts
    from steerplug.layers import find_blocks, resolve_hook_point
    from steerplug.pipeline.gate import fit_gate, gate_prompts
    from steerplug.pipeline.refusals import answer_features, own_answers, target_vector
    from steerplug.sae import SparseAutoencoder

    cfg = cfg or BundleConfig()
    out = Path(out)
    t0 = time.perf_counter()
    saes = [SparseAutoencoder.from_pretrained(f) for f in sae_folders]
    points = [resolve_hook_point(model, s.cfg.hook_name) for s in saes]
    if any(p.io != "output" for p in points):
        raise ValueError("build-steering reads residual-stream outputs (hook_resid_post); got "
                         f"{[p.name for p in points]}.")
    questions = [p.text for p in load_prompts("harmful_train", data_dir)][:cfg.n_prompts]
    blocks = len(find_blocks(model)[1])
    layers = {p.layer for p in points} | {min(blocks - 1, round(d * blocks)) for d in cfg.caa_depths}
    caa_points = [resolve_hook_point(model, f"blocks.{layer}.hook_resid_post") for layer in sorted(layers)]
    own = own_answers(model, tokenizer, caa_points, questions,
                      questions[-cfg.n_choose:], scale=cfg.bootstrap_scale,
                      max_new_tokens=cfg.max_new_tokens, judge=judge)
    if len(own.refusals) < 8 or len(own.compliant) < 8:
        raise RuntimeError(f"Too few own refusals ({len(own.refusals)}) or compliant answers "
                           f"({len(own.compliant)}) to rank features; raise --n-prompts. {own.report}")
    by_hook = {p.name: (p, s) for p, s in zip(points, saes)}
    f_ref = answer_features(model, tokenizer, by_hook, own.refusals)
    f_comp = answer_features(model, tokenizer, by_hook, own.compliant)
    sites = []
    for (name, (point, sae)), folder in zip(by_hook.items(), sae_folders):
        site = out / "sites" / name
        if site.exists():
            shutil.rmtree(site)
        shutil.copytree(folder, site / "sae", ignore=shutil.ignore_patterns("*.pt", "checkpoint*"))
        meta = VectorMetadata(model_name=sae.cfg.model_name, hook_name=name, sae=f"sites/{name}/sae",
                              objective="target: safe features up to -w, harmful ones down to 0 "
                                        "(gradient: minimize encode(h) . w)",
                              description="Built from the model's own refusals vs its own compliant answers.",
                              extra={"own_answers": own.report, "n_harmful": cfg.n_harmful, "n_safe": cfg.n_safe})
        target_vector(f_ref[name], f_comp[name], cfg.n_harmful, cfg.n_safe, meta).save_pretrained(site / "vector")
        sites.append({"sae": f"sites/{name}/sae", "vector": f"sites/{name}/vector"})
    # The activation-addition directions: the ones that brought out the refusals (forced refusal
    # minus forced compliance prefixes). Measured on SmolLM2-135M, the mean over the own answers'
    # tokens (refusal minus compliance) at the same scale mostly yields "I'm ready to assist you":
    # it carries the answers' style more than the decision to decline.
    steering, fitted = dict(cfg.steering), None
    if cfg.directions == "fitted":
        fitted = fitted_directions(model, tokenizer, caa_points, saes, points, sites, out, cfg, data_dir)
        directions, steering["lr"] = fitted["directions"], fitted["chosen_lr"]
        del fitted["directions"]
    else:
        directions = own.directions if own.directions is not None else caa_directions(
            model, tokenizer, caa_points, own.refusals, own.compliant)
    save_file({k: v.contiguous() for k, v in directions.items()}, str(out / CAA_NAME))
    prompts = gate_prompts(data_dir, cfg.gate_harmless)
    residual = cfg.gate_reads == "residual"
    gate_point = (resolve_hook_point(model, f"blocks.{min(blocks - 1, round(cfg.gate_depth * blocks))}.hook_resid_post")
                  if residual else points[0])
    gate = fit_gate(model, tokenizer, gate_point, None if residual else saes[0], prompts, pools=cfg.gate_pools,
                    l2=cfg.gate_l2, max_fpr=cfg.gate_max_fpr, hidden=cfg.gate_hidden,
                    dropout=cfg.gate_dropout, ensemble=cfg.gate_ensemble)
    if not residual:
        gate.metadata.sae = sites[0]["sae"]
    gate.save_pretrained(out / "gate")
    (out / "own_answers.json").write_text(json.dumps(
        {"report": own.report, "refusals": own.refusals, "compliant": own.compliant}, indent=1))
    manifest = {"sites": sites, "gate": "gate", "caa": CAA_NAME, "steering": steering,
                "built": {"config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
                          "own_answers": own.report, "directions": fitted or {"kind": "contrast"},
                          "gate": gate.metadata.extra}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str))
    return out


def fitted_directions(model: Any, tokenizer: Any, caa_points: list, saes: list, points: list, sites: list,
                      out: Path, cfg: BundleConfig, data_dir: str | None) -> dict[str, Any]:
    """Refusal vectors fitted at ``caa_points`` (:func:`~steerplug.pipeline.refusal_vectors.fit_refusal_vectors`
    on own ``harmful_train`` + the first 300 of ``harmful_train``) and the strength chosen from
    ``cfg.strengths`` on validation harmful prompts: ``{"directions", "chosen_lr", "sweep", ...}``."""
    from steerplug.data import load_prompts
    from steerplug.judge import ReaderJudge
    from steerplug.pipeline.gate import gate_set
    from steerplug.pipeline.refusal_vectors import fit_refusal_vectors
    from steerplug.pipeline.refusals import generate
    from steerplug.steered_model import SteeredModel
    from steerplug.steering import SteeringConfig
    from steerplug.vector import SteeringVector

    train = list(dict.fromkeys(gate_set("own_harmful_train", data_dir)
                               + [p.text for p in load_prompts("harmful_train", data_dir)][:300]))
    t0 = time.perf_counter()
    directions, losses = fit_refusal_vectors(model, tokenizer, caa_points, train, target=cfg.refusal_target,
                                             steps=cfg.refusal_steps)
    fit_s = time.perf_counter() - t0
    third = cfg.n_val // 3
    val = ([p.text for p in load_prompts("harmful_val", data_dir)][:third]
           + [p.text for p in load_prompts("harmbench_val", data_dir)][:third])
    val += gate_set("own_harmful_val", data_dir)[:cfg.n_val - len(val)]
    vectors = [SteeringVector.from_pretrained(out / site["vector"]) for site in sites]
    judge, sweep = ReaderJudge(), []
    for lr in cfg.strengths:
        config = SteeringConfig(**{**cfg.steering, "lr": lr, "use_gate": False})
        steered = SteeredModel(model, tokenizer, saes, vectors, config=config, directions=directions)
        answers = generate(steered, tokenizer, val, max_new_tokens=cfg.max_new_tokens)
        reads = [judge.read(q, a) for q, a in zip(val, answers)]
        sweep.append({"lr": lr, "clean": round(sum(r.clean for r in reads) / len(reads), 4),
                      "declines": round(sum(r.declines for r in reads) / len(reads), 4),
                      "looping": round(sum(r.looping for r in reads) / len(reads), 4),
                      "samples": [[q, a] for q, a in list(zip(val, answers))[:3]]})
    best = max(r["clean"] for r in sweep)
    chosen = next(r["lr"] for r in sweep if r["clean"] >= best - 0.01)
    return {"kind": "fitted", "directions": directions, "chosen_lr": chosen, "sweep": sweep,
            "rule": "smallest lr whose clean-refusal rate (ReaderJudge, ungated) is within 0.01 of the best",
            "val_prompts": len(val), "train_prompts": len(train), "target": cfg.refusal_target,
            "loss": [round(losses[0], 4), round(losses[-1], 4)], "fit_seconds": round(fit_s, 1)}


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BundleConfig()
    p.add_argument("--sae", nargs="+", required=True, help="SAE folders, one site each; the first hosts the gate")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--n-prompts", type=int, default=d.n_prompts)
    p.add_argument("--bootstrap-scale", type=float, default=d.bootstrap_scale)
    p.add_argument("--caa-depths", type=float, nargs="*", default=list(d.caa_depths),
                   help="extra residual layers for refusals and activation addition, as fractions of the depth")
    p.add_argument("--n-harmful", type=int, default=d.n_harmful)
    p.add_argument("--n-safe", type=int, default=d.n_safe)
    p.add_argument("--directions", choices=("fitted", "contrast"), default=d.directions,
                   help="activation-addition directions: fitted refusal vectors, or refusal-minus-compliance contrasts")
    p.add_argument("--strengths", type=float, nargs="+", default=list(d.strengths),
                   help="candidate lr for fitted directions (chosen on validation harmful prompts)")
    p.add_argument("--refusal-steps", type=int, default=d.refusal_steps)
    p.add_argument("--gate-reads", choices=("residual", "sae"), default=d.gate_reads)
    p.add_argument("--gate-hidden", type=int, nargs="+", default=list(d.gate_hidden),
                   help="candidate hidden widths of the gate (0: logistic regression)")
    p.add_argument("--gate-dropout", type=float, default=d.gate_dropout, help="dropout while training an MLP gate")
    p.add_argument("--gate-ensemble", type=int, default=d.gate_ensemble, help="MLPs averaged in an MLP gate")
    p.add_argument("--gate-max-fpr", type=float, default=d.gate_max_fpr)
    p.add_argument("--gate-harmless", type=int, default=d.gate_harmless)
    p.add_argument("--steering", type=json.loads, default=None,
                   help='JSON of the SteeringConfig fields written into the manifest, e.g. \'{"lr": 4}\'')
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from steerplug.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    d = BundleConfig()
    cfg = BundleConfig(n_prompts=args.n_prompts, bootstrap_scale=args.bootstrap_scale,
                       caa_depths=tuple(args.caa_depths), n_harmful=args.n_harmful,
                       n_safe=args.n_safe, gate_max_fpr=args.gate_max_fpr, gate_harmless=args.gate_harmless,
                       directions=args.directions, strengths=tuple(args.strengths), refusal_steps=args.refusal_steps,
                       gate_reads=args.gate_reads, gate_hidden=tuple(args.gate_hidden),
                       gate_dropout=args.gate_dropout, gate_ensemble=args.gate_ensemble,
                       steering={**d.steering, **(args.steering or {})})
    model, tok = load_model(args.model)
    model.eval()
    out = build_bundle(model, tok, args.sae, args.out, cfg, args.data_dir)
    print(f"bundle in {out}: {json.loads((out / MANIFEST_NAME).read_text())['built']['own_answers']}")
    return 0

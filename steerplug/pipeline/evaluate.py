"""``steerplug evaluate-sae``: how good an SAE is, on held-out text.

Measured (position 0 of every sequence, the attention sink, is always left out):

- reconstruction on WikiText-2 test chunks of several context lengths (128, 512 and 1,024 tokens
  by default, the same text each time), and optionally held-out sequences of an activation folder:
  L0, MSE, fraction of variance explained (FVE), dead latents (never active on the evaluation
  tokens) and dense latents (active on more than ``dense_threshold`` of them), overall and per
  position bucket, with the massive-activation tokens set apart (:mod:`steerplug.pipeline.recon`);
- next-token CE loss of the model clean, with the SAE reconstruction spliced in at the hook, and
  with the hook zero-ablated; ``CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``;
- HellaSwag ``acc_norm`` (length-normalised log-likelihood; byte length as in lm-eval) through the
  spliced model vs the unspliced model, on the same items;
- linear probes (logistic regression, torch) on mean-pooled SAE features vs on mean-pooled raw
  activations: harmful vs harmless (train on ``*_train`` prompts, report on ``*_test``) and the
  JailbreakBench category (seeded 60/40 split). Each probe chooses its input scaling and L2
  strength by cross-validation on its training split, so both get the same, fair procedure. The
  probes live in :mod:`steerplug.pipeline.probes` (their names are re-exported here).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from steerplug._config import require_ints
from steerplug.layers import HookPoint, hidden_of, resolve_hook_point
from steerplug.pipeline.examples import padded_batches
from steerplug.pipeline.probes import (  # noqa: F401 (re-exported)
    PROBE_SCALINGS, PROBE_WEIGHT_DECAYS, logistic_probe, pooled_features, probe_eval)
from steerplug.pipeline.recon import (  # noqa: F401 (re-exported)
    ReconstructionStats, detailed_stats, reconstruction_stats)
from steerplug.sae import SparseAutoencoder

REPORT_NAME = "eval_report.json"


@dataclass
class EvalConfig:
    """What to evaluate and on how much data."""

    contexts: tuple[int, ...] = (128, 512, 1024)
    """Context lengths scored side by side: WikiText-2 test's evaluation part cut into consecutive
    chunks of each length (the same text for every length). The longest is the headline."""
    context_tokens: int = 16384
    """Tokens scored per context length (``context_tokens // length`` chunks)."""
    hellaswag_items: int = 200
    """HellaSwag validation items (the first N; 0 skips HellaSwag)."""
    probe_prompts: int = 200
    """Prompts per class for the harmful/harmless probe, train and test each (0 skips probes)."""
    dense_threshold: float = 0.1
    """A latent active on more than this fraction of tokens is 'dense'."""
    batch_size: int = 8
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of the probe splits and probe training."""
    progress: bool = True
    """Show tqdm bars."""

    def __post_init__(self) -> None:
        require_ints(self, ("context_tokens", "batch_size"))
        self.contexts = tuple(self.contexts)
        if not self.contexts or any(not isinstance(c, int) or c < 2 for c in self.contexts):
            raise ValueError(f"EvalConfig.contexts={self.contexts!r}: expected context lengths, integers >= 2.")
        if self.context_tokens < max(self.contexts):
            raise ValueError(f"EvalConfig.context_tokens={self.context_tokens} is shorter than the longest "
                             f"context {max(self.contexts)}: raise it or drop that context.")
        require_ints(self, ("hellaswag_items", "probe_prompts"), minimum=0)
        if not 0 < self.dense_threshold < 1:
            raise ValueError(f"EvalConfig.dense_threshold={self.dense_threshold!r}: expected in (0, 1).")


@contextmanager
def spliced(hook_point: HookPoint, replace_fn) -> Iterator[None]:
    """Within the block the activation at ``hook_point`` is replaced by ``replace_fn(h)`` at every
    position but the first (``h`` is ``(B, T, D)``)."""

    def apply(h: torch.Tensor) -> torch.Tensor:
        out = h.clone()
        out[:, 1:] = replace_fn(h[:, 1:].float()).to(h.dtype)
        return out

    if hook_point.io == "input":
        def pre_hook(module, args, kwargs):
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = apply(kwargs["hidden_states"])
            return args, kwargs
        handle = hook_point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(module, args, output):
            if isinstance(output, (tuple, list)):
                return (apply(output[0]), *output[1:])
            return apply(output)
        handle = hook_point.module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


def _ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token CE over valid targets and their count."""
    lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    m = mask[:, 1:].float()
    return float((lp * m).sum()), int(m.sum())


class CEStats(NamedTuple):
    """Next-token CE loss (nats/token) clean, spliced and zero-ablated."""

    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    n_tokens: int


@torch.no_grad()
def ce_and_activations(model: nn.Module, sae: SparseAutoencoder, hook_point: HookPoint,
                       seqs: list[list[int]], batch_size: int, pad_id: int,
                       progress: bool = True) -> tuple[CEStats, torch.Tensor, torch.Tensor]:
    """CE clean / spliced / zero-ablated on token sequences, the clean activations at the hook
    (positions >= 1, ``(N, D)``) and their positions ``(N,)``."""
    from tqdm.auto import tqdm

    sae32 = sae.float()
    tot = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_tok = 0
    acts, positions = [], []
    store: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        store["h"] = (args[0] if hook_point.io == "input" else hidden_of(output)).detach()

    for ids, mask in tqdm(list(padded_batches(seqs, batch_size, pad_id)), desc="CE", disable=not progress):
        handle = (hook_point.module.register_forward_pre_hook(lambda m, a: grab(m, a, None))
                  if hook_point.io == "input" else hook_point.module.register_forward_hook(grab))
        try:
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            handle.remove()
        ce, n = _ce(out.logits, ids, mask)
        tot["clean"] += ce
        n_tok += n
        h = store.pop("h")  # (B, T, D)
        keep = mask[:, 1:].bool()
        acts.append(h[:, 1:][keep].float())
        positions.append(torch.arange(1, ids.shape[1]).expand_as(keep)[keep])
        with spliced(hook_point, lambda x: sae32(x).reconstruction):
            tot["sae"] += _ce(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)[0]
        with spliced(hook_point, torch.zeros_like):
            tot["zero"] += _ce(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)[0]
    c, s, z = (tot[k] / n_tok for k in ("clean", "sae", "zero"))
    rec = (z - s) / (z - c) if z != c else float("nan")
    return CEStats(c, s, z, rec, n_tok), torch.cat(acts), torch.cat(positions)


class HellaSwagStats(NamedTuple):
    """acc_norm of the model unspliced and spliced on the same items."""

    n_items: int
    acc_norm_clean: float
    acc_norm_sae: float
    delta_points: float
    """(spliced - clean) * 100."""
    agreement: float
    """Fraction of items where both choose the same ending."""


def read_hellaswag(path: str | Path, n: int) -> list[dict[str, Any]]:
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                items.append(json.loads(line))
            if len(items) >= n:
                break
    return items


@torch.no_grad()
def hellaswag_choices(model: nn.Module, tokenizer: Any, items: list[dict[str, Any]],
                      progress: bool = True, desc: str = "hellaswag") -> torch.Tensor:
    """The chosen ending of each item by byte-length-normalised log-likelihood, ``(n,)``."""
    from tqdm.auto import tqdm

    picks = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for it in tqdm(items, desc=desc, disable=not progress):
        ctx = tokenizer(it["ctx"], add_special_tokens=False)["input_ids"]
        ends = [tokenizer(" " + e, add_special_tokens=False)["input_ids"] for e in it["endings"]]
        seqs = [ctx + e for e in ends]
        ids, mask = next(padded_batches(seqs, len(seqs), pad))
        logp = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
        scores = []
        for r, e in enumerate(ends):
            tgt = torch.tensor(e)
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(e))
            ll = float(logp[r, pos, tgt].sum())
            scores.append(ll / max(1, len((" " + it["endings"][r]).encode("utf-8"))))
        picks.append(int(torch.tensor(scores).argmax()))
    return torch.tensor(picks)


def hellaswag_eval(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, hook_point: HookPoint,
                   items: list[dict[str, Any]], progress: bool = True) -> HellaSwagStats:
    labels = torch.tensor([int(it["label"]) for it in items])
    clean = hellaswag_choices(model, tokenizer, items, progress, "hellaswag clean")
    sae32 = sae.float()
    with spliced(hook_point, lambda x: sae32(x).reconstruction):
        spl = hellaswag_choices(model, tokenizer, items, progress, "hellaswag spliced")
    a, b = float((clean == labels).float().mean()), float((spl == labels).float().mean())
    return HellaSwagStats(len(items), a, b, 100 * (b - a), float((clean == spl).float().mean()))


# --- the whole evaluation --------------------------------------------------------------------------
def wikitext_sequences(tokenizer: Any, n: int, seq_len: int, data: str | None = None) -> list[list[int]]:
    """``n`` consecutive chunks of ``seq_len`` tokens of WikiText-2 test, from its evaluation part
    (:func:`steerplug.data.wikitext_test`, ``part="eval"``: disjoint from the part SAEs train on)."""
    from steerplug.data import wikitext_test

    ids = tokenizer(wikitext_test(data, part="eval")[:n * seq_len * 8], add_special_tokens=False)["input_ids"]
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(n, len(ids) // seq_len))]


def evaluate_sae(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, cfg: EvalConfig | None = None,
                 out_dir: str | Path | None = None, *, hook: str | None = None,
                 heldout_acts: torch.Tensor | None = None, heldout_positions: torch.Tensor | None = None,
                 data: str | None = None, layers_path: str | None = None) -> dict[str, Any]:
    """All metrics of the module docstring as a JSON-able dict (and, with ``out_dir``, the JSON
    report and plots). ``report["contexts"]["<length>"]`` holds each context length's numbers (with
    position buckets and massive tokens, :func:`~steerplug.pipeline.recon.detailed_stats`);
    ``report["wikitext2_test"]`` is the longest. ``heldout_acts (N, D)``: extra held-out
    activations (e.g. chat) to score, bucketed by ``heldout_positions (N,)`` when given."""
    from steerplug.data import hellaswag_path

    cfg = cfg or EvalConfig()
    hp = resolve_hook_point(model, hook or sae.cfg.hook_name, layers_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    report: dict[str, Any] = {
        "sae": {"hook_name": hp.name, "d_in": sae.d_in, "d_sae": sae.d_sae,
                "architecture": sae.cfg.architecture, "k": sae.cfg.k},
        "config": asdict(cfg),
        "contexts": {},
    }
    freqs = {}
    for length in sorted(cfg.contexts):
        seqs = wikitext_sequences(tokenizer, cfg.context_tokens // length, length, data)
        if not seqs:
            raise ValueError(f"WikiText-2's evaluation part has fewer than {length} tokens: lower EvalConfig.contexts.")
        ce, acts, pos = ce_and_activations(model, sae, hp, seqs, max(1, cfg.batch_size * 128 // length), pad,
                                           cfg.progress)
        stats, freq = detailed_stats(sae, acts, pos, cfg.dense_threshold)
        report["contexts"][str(length)] = {**stats, **ce._asdict(), "n_sequences": len(seqs)}
        freqs[f"WikiText-2, {length}-token contexts"] = freq
    report["wikitext2_test"] = report["contexts"][str(max(cfg.contexts))]
    if heldout_acts is not None and heldout_acts.numel():
        report["heldout_chat"], freqs["held-out chat"] = detailed_stats(sae, heldout_acts, heldout_positions,
                                                                        cfg.dense_threshold)
    if cfg.hellaswag_items:
        items = read_hellaswag(hellaswag_path(data), cfg.hellaswag_items)
        report["hellaswag"] = hellaswag_eval(model, tokenizer, sae, hp, items, cfg.progress)._asdict()
    if cfg.probe_prompts:
        report["probes"] = probe_eval(model, tokenizer, sae, hp, cfg, data)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_NAME).write_text(json.dumps(report, indent=2))
        plot_report(report, freqs, out)
    return report


def plot_report(report: dict[str, Any], freqs: dict[str, torch.Tensor], out: Path) -> None:
    """``feature_density.png`` (log10 firing frequency histogram) and ``eval_summary.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, fr in freqs.items():
        ax.hist(torch.log10(fr.clamp_min(1e-7)).numpy(), bins=60, alpha=0.6, label=name)
    ax.set_xlabel("log10 firing frequency (1e-7 = never)")
    ax.set_ylabel("latents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "feature_density.png", dpi=90)
    plt.close(fig)

    w = report["wikitext2_test"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    for length, c in report["contexts"].items():
        names = list(c.get("buckets", {}))
        axes[3].plot(names, [c["buckets"][b]["fve_typical"] for b in names], marker="o", label=f"{length} tokens")
    if "buckets" in report.get("heldout_chat", {}):
        b = report["heldout_chat"]["buckets"]
        axes[3].plot(list(b), [v["fve_typical"] for v in b.values()], marker="s", ls="--", label="held-out chat")
    axes[3].set_title("FVE by position (massive tokens left out)")
    axes[3].set_xlabel("positions")
    axes[3].legend(fontsize=7)
    axes[0].bar(["clean", "SAE spliced", "zero-ablated"], [w["ce_clean"], w["ce_sae"], w["ce_zero"]])
    axes[0].set_title(f"WikiText-2 CE (recovered {w['ce_recovered']:.3f})")
    if "hellaswag" in report:
        h = report["hellaswag"]
        axes[1].bar(["clean", "SAE spliced"], [h["acc_norm_clean"], h["acc_norm_sae"]])
        axes[1].set_title(f"HellaSwag acc_norm (n={h['n_items']})")
    if "probes" in report:
        names = list(report["probes"])
        xs = range(len(names))
        axes[2].bar([x - 0.2 for x in xs], [report["probes"][n]["acc_raw"] for n in names], 0.4, label="raw")
        axes[2].bar([x + 0.2 for x in xs], [report["probes"][n]["acc_sae"] for n in names], 0.4, label="SAE")
        axes[2].set_xticks(list(xs), names)
        axes[2].set_title("probe accuracy (held-out)")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "eval_summary.png", dpi=90)
    plt.close(fig)


def heldout_from_folder(folder: str | Path, every: int, hook: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``(N, D)`` of the sequences ``train`` held out (``seq_id % every == 0``),
    positions >= 1, and their positions ``(N,)``."""
    from steerplug.pipeline.collect import load_activations

    a = load_activations(folder, hook)
    keep = a.seq_ids % every == 0
    return a.acts[keep], a.positions[keep].long()


def _buckets(stats: dict[str, Any]) -> str:
    return "; ".join(f"{k}: FVE {b['fve']:.3f} ({b['fve_typical']:.3f})" for k, b in stats.get("buckets", {}).items())


def _massive(stats: dict[str, Any]) -> str:
    m = stats["massive"]
    if not m["n_tokens"]:
        return "no massive tokens"
    return (f"{m['n_tokens']} massive token(s) (norm > {m['ratio']:g}x median, {m['variance_share']:.0%} of the "
            f"variance, relative error {m['relative_error']:.3f})")


def format_summary(report: dict[str, Any]) -> str:
    """One block per context length (then chat, HellaSwag, probes). FVE in brackets: without the
    massive-activation tokens (:mod:`steerplug.pipeline.recon`)."""
    lines = []
    for length, w in report["contexts"].items():
        lines.append(f"WikiText-2 test, first quarter, {w['n_sequences']} x {length} tokens: L0 {w['l0']:.1f}, "
                     f"FVE {w['fve']:.3f} ({w['fve_typical']:.3f}), dead {w['dead_fraction']:.3%}, "
                     f"dense {w['dense_fraction']:.3%}, CE clean {w['ce_clean']:.3f} / SAE {w['ce_sae']:.3f} / "
                     f"zero {w['ce_zero']:.3f} -> recovered {w['ce_recovered']:.3f}; {_massive(w)}")
        lines.append(f"    by position: {_buckets(w)}")
    if "heldout_chat" in report:
        h = report["heldout_chat"]
        lines.append(f"held-out chat ({h['n_tokens']} tokens): L0 {h['l0']:.1f}, FVE {h['fve']:.3f} "
                     f"({h['fve_typical']:.3f}), dead {h['dead_fraction']:.3%}; {_massive(h)}")
        if "buckets" in h:
            lines.append(f"    by position: {_buckets(h)}")
    if "hellaswag" in report:
        h = report["hellaswag"]
        lines.append(f"HellaSwag acc_norm (n={h['n_items']}): clean {h['acc_norm_clean']:.3f}, "
                     f"spliced {h['acc_norm_sae']:.3f} ({h['delta_points']:+.1f} points)")
    for name, p in report.get("probes", {}).items():
        lines.append(f"probe {name}: raw {p['acc_raw']:.3f}, SAE {p['acc_sae']:.3f} "
                     f"(gap {p['gap_points']:+.1f} points)")
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder or Hub repo")
    p.add_argument("--out", required=True, help="folder for eval_report.json and plots")
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--hook", default=None, help="override the SAE's hook")
    p.add_argument("--contexts", type=int, nargs="+", default=list(EvalConfig.contexts),
                   help="context lengths to score side by side (WikiText-2 chunks)")
    p.add_argument("--context-tokens", type=int, default=EvalConfig.context_tokens,
                   help="tokens scored per context length")
    p.add_argument("--hellaswag-items", type=int, default=200)
    p.add_argument("--probe-prompts", type=int, default=200)
    p.add_argument("--heldout-acts", default=None, help="activation folder whose held-out sequences to score")
    p.add_argument("--heldout-every", type=int, default=20, help="seq_id %% N == 0 were held out by train")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)


def run(args: argparse.Namespace) -> int:
    from steerplug.models import load_model

    model, tok = load_model(args.model)
    sae = SparseAutoencoder.from_pretrained(args.sae)
    cfg = EvalConfig(contexts=tuple(args.contexts), context_tokens=args.context_tokens,
                     hellaswag_items=args.hellaswag_items, probe_prompts=args.probe_prompts,
                     batch_size=args.batch_size, seed=args.seed)
    held, pos = (heldout_from_folder(args.heldout_acts, args.heldout_every, args.hook) if args.heldout_acts
                 else (None, None))
    report = evaluate_sae(model, tok, sae, cfg, args.out, hook=args.hook, heldout_acts=held,
                          heldout_positions=pos, data=args.data_dir)
    print(format_summary(report))
    return 0 if all(math.isfinite(v) for v in (report["wikitext2_test"]["fve"],)) else 1

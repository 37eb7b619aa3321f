"""``steerplug evaluate-sae``: how good an SAE is, on held-out text.

Measured (position 0 of every sequence, the attention sink, is always left out):

- reconstruction on WikiText-2 test chunks (and optionally held-out sequences of an activation
  folder): L0, MSE, fraction of variance explained (FVE), dead latents (never active on the
  evaluation tokens) and dense latents (active on more than ``dense_threshold`` of them);
- next-token CE loss of the model clean, with the SAE reconstruction spliced in at the hook, and
  with the hook zero-ablated; ``CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``;
- HellaSwag ``acc_norm`` (length-normalised log-likelihood; byte length as in lm-eval) through the
  spliced model vs the unspliced model, on the same items;
- linear probes (logistic regression, torch) on mean-pooled SAE features vs on mean-pooled raw
  activations: harmful vs harmless (train on ``*_train`` prompts, report on ``*_test``) and the
  JailbreakBench category (seeded 60/40 split). Each probe chooses its input scaling and L2
  strength by cross-validation on its training split, so both get the same, fair procedure.
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
from steerplug.pipeline.collect import capture_activations
from steerplug.sae import SparseAutoencoder

REPORT_NAME = "eval_report.json"


@dataclass
class EvalConfig:
    """What to evaluate and on how much data."""

    wikitext_sequences: int = 64
    """WikiText-2 test chunks for reconstruction and CE metrics."""
    seq_len: int = 128
    """Tokens per WikiText chunk."""
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
        require_ints(self, ("wikitext_sequences", "seq_len", "batch_size"))
        require_ints(self, ("hellaswag_items", "probe_prompts"), minimum=0)
        if not 0 < self.dense_threshold < 1:
            raise ValueError(f"EvalConfig.dense_threshold={self.dense_threshold!r}: expected in (0, 1).")


class ReconstructionStats(NamedTuple):
    """Reconstruction quality over a set of activation rows."""

    n_tokens: int
    l0: float
    mse: float
    """Mean squared error per token (summed over dimensions)."""
    fve: float
    dead_fraction: float
    dense_fraction: float
    frequencies: torch.Tensor
    """``(F,)`` fraction of tokens on which each latent is active."""


@torch.no_grad()
def reconstruction_stats(sae: SparseAutoencoder, acts: torch.Tensor, dense_threshold: float = 0.1,
                         chunk: int = 4096) -> ReconstructionStats:
    """L0, MSE, FVE, dead and dense latents of ``sae`` on ``acts (N, D)``."""
    sae32 = sae.float()
    n = acts.shape[0]
    mean = acts.float().mean(0)  # (D,)
    sse = tv = l0 = 0.0
    counts = torch.zeros(sae.d_sae)
    for s in range(0, n, chunk):
        x = acts[s:s + chunk].float()  # (n, D)
        x_hat, f = sae32(x)
        sse += float((x_hat - x).pow(2).sum())
        tv += float((x - mean).pow(2).sum())
        on = f > 0  # (n, F)
        l0 += float(on.sum())
        counts += on.sum(0).float()
    freq = counts / n
    return ReconstructionStats(n, l0 / n, sse / n, 1 - sse / tv, float((freq == 0).float().mean()),
                               float((freq > dense_threshold).float().mean()), freq)


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


def _batches(seqs: list[list[int]], bs: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, len(seqs), bs):
        chunk = seqs[s:s + bs]
        T = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(chunk):
            ids[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1
        yield ids, mask


@torch.no_grad()
def ce_and_activations(model: nn.Module, sae: SparseAutoencoder, hook_point: HookPoint,
                       seqs: list[list[int]], batch_size: int, pad_id: int,
                       progress: bool = True) -> tuple[CEStats, torch.Tensor]:
    """CE clean / spliced / zero-ablated on token sequences, and the clean activations at the hook
    (positions >= 1, ``(N, D)``)."""
    from tqdm.auto import tqdm

    sae32 = sae.float()
    tot = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_tok = 0
    acts = []
    store: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        store["h"] = (args[0] if hook_point.io == "input" else hidden_of(output)).detach()

    for ids, mask in tqdm(list(_batches(seqs, batch_size, pad_id)), desc="CE", disable=not progress):
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
        acts.append(h[:, 1:][mask[:, 1:].bool()].float())
        with spliced(hook_point, lambda x: sae32(x).reconstruction):
            tot["sae"] += _ce(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)[0]
        with spliced(hook_point, torch.zeros_like):
            tot["zero"] += _ce(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)[0]
    c, s, z = (tot[k] / n_tok for k in ("clean", "sae", "zero"))
    rec = (z - s) / (z - c) if z != c else float("nan")
    return CEStats(c, s, z, rec, n_tok), torch.cat(acts)


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
        ids, mask = next(_batches(seqs, len(seqs), pad))
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


# --- probes ----------------------------------------------------------------------------------------
PROBE_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
"""The L2 strengths a probe chooses from, by cross-validation on its training split."""


def _fit_probe(xtr: torch.Tensor, ytr: torch.Tensor, n_cls: int, weight_decay: float, epochs: int,
               lr: float, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(xtr.shape[1], n_cls)
    with torch.no_grad():  # zero init: inputs the training set never varies keep a zero weight
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            F.cross_entropy(lin(xtr), ytr).backward()
            opt.step()
    return lin


PROBE_SCALINGS = ("per_input", "shared")
"""How a probe scales its centred inputs, chosen by cross-validation with the L2 strength:
``per_input`` divides each input by its own training std; ``shared`` divides all of them by one
scale (their root-mean-square std). Per-input scaling blows up rarely-active SAE latents (one
active on 2 of 500 prompts gets a std near zero and a huge standardised value), which the L2
penalty then barely restrains; raw activations usually prefer it, sparse codes usually do not."""


def _standardise(x_train: torch.Tensor, *others: torch.Tensor, scaling: str = "per_input") -> list[torch.Tensor]:
    mu, sd = x_train.mean(0), x_train.std(0)
    if scaling == "shared":
        sd = sd.pow(2).mean().sqrt().clamp_min(1e-6).expand_as(sd)
    elif scaling == "per_input":
        sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))  # constant in train (a silent latent): no rescale
    else:
        raise ValueError(f"scaling={scaling!r}: use one of {PROBE_SCALINGS}")
    return [(x - mu) / sd for x in (x_train, *others)]


def logistic_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, *, epochs: int = 300,
                   weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS,
                   scalings: tuple[str, ...] = PROBE_SCALINGS, folds: int = 5,
                   lr: float = 1e-2, seed: int = 0, details: dict | None = None) -> float:
    """Test accuracy of a linear+softmax classifier (centred, scaled inputs; Adam, full batch).

    The input scaling (``PROBE_SCALINGS``) and the L2 strength are chosen from ``scalings`` x
    ``weight_decays`` by ``folds``-fold cross-validation on the training split only (the test
    split is touched once), the same way for every input, so raw activations and SAE features
    each get their best-set-up probe. ``details``, if given, receives the choice and CV accuracy."""
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    grid = [(s, wd) for s in scalings for wd in weight_decays]
    cv_acc = None
    if len(grid) > 1:
        perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
        parts = perm.chunk(folds)
        scores = []
        for scaling, wd in grid:
            hits = 0
            for i, val in enumerate(parts):
                tr = torch.cat([p for j, p in enumerate(parts) if j != i])
                a, b = _standardise(x_train[tr], x_train[val], scaling=scaling)
                lin = _fit_probe(a, y_train[tr], n_cls, wd, epochs, lr, seed)
                with torch.no_grad():
                    hits += int((lin(b).argmax(-1) == y_train[val]).sum())
            scores.append(hits)
        # ties: the earlier scaling, then the stronger L2
        best = max(range(len(grid)), key=lambda i: (scores[i], -scalings.index(grid[i][0]), grid[i][1]))
        cv_acc = scores[best] / len(y_train)
    else:
        best = 0
    scaling, weight_decay = grid[best]
    xtr, xte = _standardise(x_train, x_test, scaling=scaling)
    lin = _fit_probe(xtr, y_train, n_cls, weight_decay, epochs, lr, seed)
    with torch.no_grad():
        acc = float((lin(xte).argmax(-1) == y_test).float().mean())
    if details is not None:
        details.update(scaling=scaling, weight_decay=weight_decay, cv_accuracy=cv_acc)
    return acc


@torch.no_grad()
def pooled_features(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, hook_point: HookPoint,
                    texts: list[str], batch_size: int = 16,
                    progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over positions >= 1 of the chat-formatted prompt: raw activations ``(n, D)`` and SAE
    features ``(n, F)``. The forward pass stops at the hook."""
    from tqdm.auto import tqdm

    sae32 = sae.float()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                    add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"] for t in texts]
    raws, feats = [], []
    for ids, mask in tqdm(list(_batches(seqs, batch_size, pad)), desc="probe acts", disable=not progress):
        h = capture_activations(model, [hook_point], ids, mask)[hook_point.name].float()  # (B, T, D)
        m = mask.clone().float()
        m[:, 0] = 0
        m = m.unsqueeze(-1)  # (B, T, 1)
        f = sae32.encode(h)  # (B, T, F)
        raws.append((h * m).sum(1) / m.sum(1))
        feats.append((f * m).sum(1) / m.sum(1))
    return torch.cat(raws), torch.cat(feats)


def _probe_pair(r_tr: torch.Tensor, f_tr: torch.Tensor, y_tr: torch.Tensor, r_te: torch.Tensor,
                f_te: torch.Tensor, y_te: torch.Tensor, seed: int) -> dict[str, Any]:
    """The same probe procedure on raw activations and on SAE features, with each one's CV choice."""
    out: dict[str, Any] = {}
    for name, a, b in (("raw", r_tr, r_te), ("sae", f_tr, f_te)):
        chosen: dict[str, Any] = {}
        out[f"acc_{name}"] = logistic_probe(a, y_tr, b, y_te, seed=seed, details=chosen)
        out[f"probe_{name}"] = chosen
    return out


def probe_eval(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, hook_point: HookPoint,
               cfg: EvalConfig, data: str | None = None) -> dict[str, Any]:
    """Harmful-vs-harmless (train on *_train, test on *_test) and JBB-category probes."""
    from steerplug.data import load_prompts

    g = torch.Generator().manual_seed(cfg.seed)

    def sample(name: str, n: int) -> list:
        ps = load_prompts(name, data)
        idx = torch.randperm(len(ps), generator=g)[:n].sort().values
        return [ps[int(i)] for i in idx]

    n = cfg.probe_prompts
    train = sample("harmful_train", n) + sample("harmless_train", n)
    test = sample("harmful_test", n) + sample("harmless_test", n)
    r_tr, f_tr = pooled_features(model, tokenizer, sae, hook_point, [p.text for p in train],
                                 progress=cfg.progress)
    r_te, f_te = pooled_features(model, tokenizer, sae, hook_point, [p.text for p in test],
                                 progress=cfg.progress)
    y_tr = torch.tensor([int(p.harmful) for p in train])
    y_te = torch.tensor([int(p.harmful) for p in test])
    out: dict[str, Any] = {"harmful_vs_harmless": {"n_train": len(train), "n_test": len(test),
                                                   **_probe_pair(r_tr, f_tr, y_tr, r_te, f_te, y_te, cfg.seed)}}
    jbb = load_prompts("jbb_harmful", data) + load_prompts("jbb_benign", data)
    if len(jbb) > 4 * n:  # small runs (tests): a seeded subset
        jbb = [jbb[int(i)] for i in torch.randperm(len(jbb), generator=g)[:4 * n].sort().values]
    cats = sorted({p.category for p in jbb})
    y = torch.tensor([cats.index(p.category) for p in jbb])
    perm = torch.randperm(len(jbb), generator=g)
    cut = int(0.6 * len(jbb))
    r, f = pooled_features(model, tokenizer, sae, hook_point, [p.text for p in jbb], progress=cfg.progress)
    tr, te = perm[:cut], perm[cut:]
    out["jbb_category"] = {"n_classes": len(cats), "n_train": len(tr), "n_test": len(te),
                           **_probe_pair(r[tr], f[tr], y[tr], r[te], f[te], y[te], cfg.seed)}
    for v in out.values():
        v["gap_points"] = 100 * (v["acc_raw"] - v["acc_sae"])
    return out


# --- the whole evaluation --------------------------------------------------------------------------
def wikitext_sequences(tokenizer: Any, n: int, seq_len: int, data: str | None = None) -> list[list[int]]:
    """``n`` consecutive chunks of ``seq_len`` tokens of WikiText-2 test, from its evaluation part
    (:func:`steerplug.data.wikitext_test`, ``part="eval"``: disjoint from the part SAEs train on)."""
    from steerplug.data import wikitext_test

    ids = tokenizer(wikitext_test(data, part="eval")[:n * seq_len * 8], add_special_tokens=False)["input_ids"]
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(min(n, len(ids) // seq_len))]


def evaluate_sae(model: nn.Module, tokenizer: Any, sae: SparseAutoencoder, cfg: EvalConfig | None = None,
                 out_dir: str | Path | None = None, *, hook: str | None = None,
                 heldout_acts: torch.Tensor | None = None, data: str | None = None,
                 layers_path: str | None = None) -> dict[str, Any]:
    """All metrics of the module docstring as a JSON-able dict (and, with ``out_dir``, the JSON
    report and plots). ``heldout_acts (N, D)``: extra held-out activations (e.g. chat) to score."""
    from steerplug.data import hellaswag_path

    cfg = cfg or EvalConfig()
    hp = resolve_hook_point(model, hook or sae.cfg.hook_name, layers_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = wikitext_sequences(tokenizer, cfg.wikitext_sequences, cfg.seq_len, data)
    ce, acts = ce_and_activations(model, sae, hp, seqs, cfg.batch_size, pad, cfg.progress)
    rec = reconstruction_stats(sae, acts, cfg.dense_threshold)
    report: dict[str, Any] = {
        "sae": {"hook_name": hp.name, "d_in": sae.d_in, "d_sae": sae.d_sae,
                "architecture": sae.cfg.architecture, "k": sae.cfg.k},
        "config": asdict(cfg),
        "wikitext2_test": {**{k: v for k, v in rec._asdict().items() if k != "frequencies"},
                           **ce._asdict(), "n_sequences": len(seqs)},
    }
    freqs = {"wikitext2_test": rec.frequencies}
    if heldout_acts is not None and heldout_acts.numel():
        hrec = reconstruction_stats(sae, heldout_acts, cfg.dense_threshold)
        report["heldout_chat"] = {k: v for k, v in hrec._asdict().items() if k != "frequencies"}
        freqs["heldout_chat"] = hrec.frequencies
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
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
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


def heldout_from_folder(folder: str | Path, every: int, hook: str | None = None) -> torch.Tensor:
    """Activations of the sequences ``train`` held out (``seq_id % every == 0``), positions >= 1."""
    from steerplug.pipeline.collect import load_activations

    a = load_activations(folder, hook)
    return a.acts[a.seq_ids % every == 0]


def format_summary(report: dict[str, Any]) -> str:
    w = report["wikitext2_test"]
    lines = [f"WikiText-2 test, first quarter ({w['n_tokens']} tokens): L0 {w['l0']:.1f}, FVE {w['fve']:.3f}, "
             f"dead {w['dead_fraction']:.3%}, dense {w['dense_fraction']:.3%}, CE clean {w['ce_clean']:.3f} / "
             f"SAE {w['ce_sae']:.3f} / zero {w['ce_zero']:.3f} -> recovered {w['ce_recovered']:.3f}"]
    if "heldout_chat" in report:
        h = report["heldout_chat"]
        lines.append(f"held-out chat ({h['n_tokens']} tokens): L0 {h['l0']:.1f}, FVE {h['fve']:.3f}, "
                     f"dead {h['dead_fraction']:.3%}")
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
    p.add_argument("--wikitext-sequences", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
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
    cfg = EvalConfig(wikitext_sequences=args.wikitext_sequences, seq_len=args.seq_len,
                     hellaswag_items=args.hellaswag_items, probe_prompts=args.probe_prompts,
                     batch_size=args.batch_size, seed=args.seed)
    held = heldout_from_folder(args.heldout_acts, args.heldout_every, args.hook) if args.heldout_acts else None
    report = evaluate_sae(model, tok, sae, cfg, args.out, hook=args.hook, heldout_acts=held, data=args.data_dir)
    print(format_summary(report))
    return 0 if all(math.isfinite(v) for v in (report["wikitext2_test"]["fve"],)) else 1

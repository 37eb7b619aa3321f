"""Linear probes: how much of what raw activations tell a linear classifier SAE features still tell.

Part of ``steerplug evaluate-sae`` (:mod:`steerplug.pipeline.evaluate`, which re-exports these
names). Logistic regression in torch on mean-pooled SAE features vs on mean-pooled raw
activations: harmful vs harmless (train on ``*_train`` prompts, report on ``*_test``) and the
JailbreakBench category (seeded 60/40 split). Each probe chooses its input scaling and L2 strength
by cross-validation on its training split, so both get the same, fair procedure.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steerplug.layers import HookPoint
from steerplug.pipeline.collect import capture_activations
from steerplug.pipeline.examples import padded_batches
from steerplug.sae import SparseAutoencoder

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
    for ids, mask in tqdm(list(padded_batches(seqs, batch_size, pad)), desc="probe acts", disable=not progress):
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
               cfg: Any, data: str | None = None) -> dict[str, Any]:
    """Harmful-vs-harmless (train on *_train, test on *_test) and JBB-category probes; ``cfg`` is
    the :class:`~steerplug.pipeline.evaluate.EvalConfig` (``probe_prompts``, ``seed``, ``progress``)."""
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

"""Reconstruction quality of an SAE over activation rows: overall, per position bucket, and with
the massive-activation tokens set apart.

Massive activations (Sun et al. 2024, "Massive activations in large language models"): a few
tokens, usually the first of a sequence but not only, carry a residual norm one to two orders of
magnitude above the rest. One such token holds most of the variance of a few thousand ordinary
ones, so a fraction of variance explained (FVE) computed with it says mostly how well that one
token is reconstructed. Every statistic here is therefore also given without them
(``fve_typical``); a token is *massive* when its norm exceeds ``massive_ratio`` times the median
norm of the rows scored.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from steerplug.sae import SparseAutoencoder

POSITION_BUCKETS: tuple[int, ...] = (0, 128, 512, 1024)
"""Bucket edges: positions 0-127, 128-511, 512-1023 (and 1024+ when present)."""
MASSIVE_RATIO = 10.0


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


class TokenErrors(NamedTuple):
    """Per-row results of running the SAE once over ``acts (N, D)``."""

    sse: torch.Tensor
    """``(N,)`` squared reconstruction error of each row (float64)."""
    dev: torch.Tensor
    """``(N,)`` squared distance of each row from the mean row (float64)."""
    norm: torch.Tensor
    """``(N,)`` norm of each row."""
    l0: torch.Tensor
    """``(N,)`` active latents of each row."""
    counts: torch.Tensor
    """``(F,)`` rows on which each latent is active."""


@torch.no_grad()
def token_errors(sae: SparseAutoencoder, acts: torch.Tensor, chunk: int = 4096) -> TokenErrors:
    sae32 = sae.float()
    mean = acts.float().mean(0)  # (D,)
    sse, dev, norm, l0 = [], [], [], []
    counts = torch.zeros(sae.d_sae)
    for s in range(0, acts.shape[0], chunk):
        x = acts[s:s + chunk].float()  # (n, D)
        x_hat, f = sae32(x)
        sse.append((x_hat - x).double().pow(2).sum(1))
        dev.append((x - mean).double().pow(2).sum(1))
        norm.append(x.norm(dim=1))
        on = f > 0  # (n, F)
        l0.append(on.sum(1).float())
        counts += on.sum(0).float()
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0))
    return TokenErrors(cat(sse), cat(dev), cat(norm), cat(l0), counts)


def _fve(sse: torch.Tensor, dev: torch.Tensor) -> float:
    return float(1 - sse.sum() / dev.sum()) if dev.numel() and float(dev.sum()) > 0 else float("nan")


def reconstruction_stats(sae: SparseAutoencoder, acts: torch.Tensor, dense_threshold: float = 0.1,
                         chunk: int = 4096) -> ReconstructionStats:
    """L0, MSE, FVE, dead and dense latents of ``sae`` on ``acts (N, D)`` (every row counts)."""
    e = token_errors(sae, acts, chunk)
    n = acts.shape[0]
    freq = e.counts / max(n, 1)
    return ReconstructionStats(n, float(e.l0.mean()), float(e.sse.mean()), _fve(e.sse, e.dev),
                               float((freq == 0).float().mean()), float((freq > dense_threshold).float().mean()),
                               freq)


def massive_mask(norm: torch.Tensor, ratio: float = MASSIVE_RATIO) -> torch.Tensor:
    """``(N,)`` True where a row's norm exceeds ``ratio`` times the median norm."""
    return norm > ratio * norm.median() if norm.numel() else torch.zeros(0, dtype=torch.bool)


def detailed_stats(sae: SparseAutoencoder, acts: torch.Tensor, positions: torch.Tensor | None = None,
                   dense_threshold: float = 0.1, massive_ratio: float = MASSIVE_RATIO,
                   buckets: tuple[int, ...] = POSITION_BUCKETS) -> tuple[dict[str, Any], torch.Tensor]:
    """The :class:`ReconstructionStats` fields (without frequencies) plus ``fve_typical`` (FVE of
    the rows that are not massive, around their own mean), ``massive`` (how many rows, their share
    of the variance, their relative error ``|x_hat - x|^2 / |x|^2``) and, with ``positions (N,)``,
    ``buckets``: L0 and FVE per position range. Returns the dict and the firing frequencies."""
    e = token_errors(sae, acts)
    n = acts.shape[0]
    freq = e.counts / max(n, 1)
    big = massive_mask(e.norm, massive_ratio)
    typical = ~big
    out: dict[str, Any] = {
        "n_tokens": n, "l0": float(e.l0.mean()), "mse": float(e.sse.mean()), "fve": _fve(e.sse, e.dev),
        "dead_fraction": float((freq == 0).float().mean()),
        "dense_fraction": float((freq > dense_threshold).float().mean()),
    }
    if big.any():
        x = acts[typical].double()
        dev_typ = (x - x.mean(0)).pow(2).sum(1)
        out["fve_typical"] = _fve(e.sse[typical], dev_typ)
    else:
        dev_typ = e.dev
        out["fve_typical"] = out["fve"]
    out["massive"] = {
        "ratio": massive_ratio, "n_tokens": int(big.sum()),
        "variance_share": float(e.dev[big].sum() / e.dev.sum()) if n else 0.0,
        "relative_error": (float((e.sse[big] / e.norm[big].double().pow(2)).mean()) if big.any() else None),
        "median_norm": float(e.norm.median()) if n else None,
        "max_norm": float(e.norm.max()) if n else None,
    }
    if positions is not None:
        out["buckets"] = {}
        for lo, hi in zip(buckets, (*buckets[1:], None)):
            m = (positions >= lo) & ((positions < hi) if hi is not None else True)
            if not m.any():
                continue
            mt = m[typical]
            out["buckets"][f"{lo}-{hi - 1}" if hi is not None else f"{lo}+"] = {
                "n_tokens": int(m.sum()), "l0": float(e.l0[m].mean()), "fve": _fve(e.sse[m], e.dev[m]),
                "fve_typical": _fve(e.sse[typical][mt], dev_typ[mt]), "massive_tokens": int((m & big).sum()),
            }
    return out, freq

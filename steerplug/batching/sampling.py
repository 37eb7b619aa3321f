"""Picking one row's next token: greedy, or sampled with temperature and nucleus (top-p) filtering.

Sampling goes through transformers' own logits warpers (``TemperatureLogitsWarper``,
``TopPLogitsWarper``), the ones ``generate`` uses, then ``torch.multinomial`` with the row's own
generator, so a seeded request draws the same tokens however it is batched. A temperature below
:data:`MIN_TEMPERATURE` is greedy: the engine takes the argmax and never calls :func:`sample_row`.
"""

from __future__ import annotations

import functools

import torch

MIN_TEMPERATURE = 1e-4
"""Temperatures below this sample greedily: the distribution is already one-hot to float precision."""


def row_generator(temperature: float, seed: int | None, device: torch.device) -> torch.Generator | None:
    """The sampling generator of one row (None for a greedy row), seeded by ``seed`` (any integer,
    folded into torch's accepted range ``[0, 2**64)``) or, without one, from the global generator."""
    if temperature < MIN_TEMPERATURE:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & (2**64 - 1) if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


@functools.lru_cache(maxsize=256)
def _warpers(temperature: float, top_p: float):
    """transformers' warpers for ``(temperature, top_p)``, built once per pair."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))  # always keeps the most likely token
    return warpers


def sample_row(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """One token id (a 0-d tensor) from ``(V,)`` logits with temperature and nucleus filtering."""
    scores = _warpers(float(temperature), float(top_p))(None, logits[None])  # (1, V), -inf outside top-p
    probs = torch.softmax(scores[0], dim=-1)  # (V,)
    return torch.multinomial(probs, 1, generator=generator)[0]

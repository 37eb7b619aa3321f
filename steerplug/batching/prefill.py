"""Prefill in bounded chunks, so that one long prompt cannot stall the requests already decoding.

Newcomers are grouped into :class:`PrefillJob` s. A job whose padded prompt fits the engine's
``prefill_chunk`` token budget (rows x longest prompt) is prefilled in one forward pass, as before.
A longer prompt is a job of its own, run ``prefill_chunk`` tokens at a time against its own KV cache
between the batch's decode steps (the scheduler decides when; see ``BatchEngine._run``), and joins
the batch when its last chunk has given its first token.

The gate reads the whole prompt before any of it may be steered, so a gated long job first runs the
gate's own pass (unsteered, truncated at the gate's hook point) chunk by chunk against a second
cache, keeps the activations there, scores them as the one-pass gate does
(:meth:`~steerplug.SteeredModel.gate_fires`) and only then prefills its steered chunks with that
decision (``CallState.gate_given``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from steerplug.batching import cache as kv
from steerplug.batching.requests import RequestStream
from steerplug.batching.streaming import Row
from steerplug.hooks import forward_to


@dataclass
class PrefillJob:
    """Rows prefilled together (left-padded), and how far their prefill has come."""

    rows: list[Row]
    positions: str
    ids: torch.Tensor
    """``(B, T)`` prompt ids, left-padded."""
    mask: torch.Tensor
    """``(B, T)`` 1 on prompt tokens, 0 on padding."""
    position_ids: torch.Tensor
    """``(B, T)``: every row counts from 0 at its first token."""
    lengths: list[int]
    needs_gate: bool = False
    """The gate must read the whole prompt before the first steered chunk."""
    gate_done: int = 0
    gate_cache: Any = None
    gate_h: list[torch.Tensor] = field(default_factory=list)
    row_on: torch.Tensor | None = None
    """``(B,)`` the gate's decision, once made (chunked jobs only)."""
    done: int = 0
    """Prompt columns already prefilled (steered)."""
    cache: Any = None

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def cancelled(self) -> bool:
        return all(r.stream.cancelled or r.done is not None for r in self.rows)


def make_job(rows: list[Row], positions: str, pad_id: int, device: torch.device) -> PrefillJob:
    lengths = [len(r.req.prompt_ids) for r in rows]
    T = max(lengths)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, T - lengths[i]:] = torch.tensor(r.req.prompt_ids)
        mask[i, T - lengths[i]:] = 1
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
    return PrefillJob(rows, positions, ids, mask, position_ids, lengths, cache=kv.new_cache())


def group(streams: list[RequestStream], budget: int) -> list[list[RequestStream]]:
    """Split ``streams`` (first come first served) into groups whose padded prompts, rows x longest
    prompt, fit ``budget`` tokens; a prompt longer than ``budget`` is a group of its own."""
    groups: list[list[RequestStream]] = []
    current: list[RequestStream] = []
    longest = 0
    for s in streams:
        n = len(s.request.prompt_ids)
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(s)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def gate_chunk(steered: Any, model: Any, job: PrefillJob, width: int, logits_kw: dict, cache_kw: str) -> None:
    """One chunk of the gate's own pass; after the last one, ``job.row_on`` holds its decision."""
    lo, hi = job.gate_done, min(job.width, job.gate_done + width)
    if job.gate_cache is None:
        job.gate_cache = kv.new_cache()
    h = forward_to(model, steered.gate_point, input_ids=job.ids[:, lo:hi], attention_mask=job.mask[:, :hi],
                   position_ids=job.position_ids[:, lo:hi], use_cache=True, **logits_kw,
                   **{cache_kw: job.gate_cache})
    job.gate_h.append(h.detach())
    job.gate_done = hi
    if hi == job.width:
        h_all = torch.cat(job.gate_h, dim=1)  # (B, T, D)
        job.row_on = steered.gate_fires(h_all, job.mask.bool())
        job.gate_h, job.gate_cache = [], None

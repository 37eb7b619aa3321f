"""Per-token diagnostics of the serving engine: the feature score before and after steering and the
most active SAE features, for requests that ask for them (``GenerationRequest.trace``)."""

from __future__ import annotations

from typing import Any

import torch

from steerplug.batching.requests import TokenTrace
from steerplug.batching.streaming import Row
from steerplug.layers import hidden_of


def traces(steered: Any, rows: list[Row], h_before: torch.Tensor, h_after: torch.Tensor, k: int
           ) -> list[TokenTrace | None]:
    """Per-row :class:`TokenTrace` for the rows that asked, from ``(B, D)`` activations."""
    objective = steered.feature_objective(h_before.device)
    sae = steered.sae
    want = [i for i, r in enumerate(rows) if r.req.trace]
    idx = torch.tensor(want, device=h_before.device)
    hb, ha = h_before[idx].float(), h_after[idx].float()  # (N, D)
    sb, sa = objective.loss(hb).tolist(), objective.loss(ha).tolist()
    p = next(sae.parameters())
    fb = sae.encode(hb.to(p.device, p.dtype)).float().topk(k, dim=-1)  # (N, k)
    fa = sae.encode(ha.to(p.device, p.dtype)).float().topk(k, dim=-1)
    out: list[TokenTrace | None] = [None] * len(rows)
    for j, i in enumerate(want):
        out[i] = TokenTrace(
            sb[j], sa[j],
            [(int(f), float(v)) for f, v in zip(fa.indices[j], fa.values[j]) if v > 0],
            [(int(f), float(v)) for f, v in zip(fb.indices[j], fb.values[j]) if v > 0])
    return out


def capture(point: Any, key: str, into: dict[str, torch.Tensor]):
    """Hook recording the hook point's last-position activation ``(B, D)`` under ``into[key]``."""
    def save(h: torch.Tensor) -> None:
        into[key] = h[:, -1].detach().clone()

    if point.io == "output":
        def hook(module, args, output):
            save(hidden_of(output))
        return point.module.register_forward_hook(hook)

    def pre_hook(module, args, kwargs):
        save(args[0] if args else kwargs["hidden_states"])
    return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

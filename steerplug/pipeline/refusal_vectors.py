"""Refusal vectors fitted by teacher forcing: additive residual vectors, one per layer, trained so
that the model answers harmful training requests with one short refusal and then ends its turn.

Why: activation addition of contrast directions (refusal-prefix minus compliance-prefix means)
moves SmolLM2-135M into declines that loop and invent contexts ("the specific job description for
the current client"): of 195 labelled steered answers to harmful prompts, 9 were clean refusals
(``tests/data/judge_labels.jsonl``). A vector fitted on the log-likelihood of the refusal itself
(model frozen, vectors added at the positions that predict the answer, exactly where
``positions="generated"`` adds them at inference) gives the refusal and stops.

    vectors, losses = fit_refusal_vectors(model, tok, points, prompts)   # {hook: (D,)}

Measured on SmolLM2-135M (``benchmarks/refusal_vector_opt.py``, layers 9/12/15/18, 560 prompts,
21 steps of 12): loss 2.09 -> 0.010; added with ``lr=1.0, positions="generated"``, ungated, 99 of 99
validation harmful prompts got the target refusal, no loops.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from steerplug.layers import HookPoint, hidden_of, hidden_size

REFUSAL = "I'm sorry, but I can't help with that."
"""The default target answer: a refusal a person accepts (declines at once, invents nothing)."""


def fit_refusal_vectors(model: nn.Module, tokenizer: Any, points: Sequence[HookPoint], prompts: Sequence[str], *,
                        target: str = REFUSAL, steps: int = 21, batch_size: int = 12, lr: float = 0.1,
                        l2: float = 1e-4, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``({hook: (D,) vector}, per-step losses)``: Adam on the mean cross-entropy of ``target`` +
    end of turn after each chat-formatted prompt, the vectors added at every answer-predicting
    position (the prompt's last one onwards) of every point, model weights frozen.

    ``steps`` batches of ``batch_size`` prompts, cycling through ``prompts`` shuffled with ``seed``."""
    from steerplug.pipeline.refusals import chat_texts

    if not prompts:
        raise ValueError("fit_refusal_vectors needs at least one prompt.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got {steps} and {batch_size}.")
    for p in points:
        if p.io != "output":
            raise ValueError(f"Refusal vectors are added to layer outputs; {p.name} is an input hook.")
    device = next(model.parameters()).device
    end = tokenizer.eos_token or ""
    tgt = tokenizer(target + end, add_special_tokens=False)["input_ids"]
    order = list(prompts)
    random.Random(seed).shuffle(order)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tokenizer, order)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vecs = {p.name: torch.zeros(hidden_size(model), device=device, requires_grad=True) for p in points}
    state: dict[str, torch.Tensor] = {}

    def make(v: torch.Tensor):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            h = hidden_of(output)
            h = h + state["mask"].unsqueeze(-1).to(h.dtype) * v.to(h.dtype)
            return h if isinstance(output, torch.Tensor) else (h,) + tuple(output[1:])
        return hook

    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    handles = [p.module.register_forward_hook(make(vecs[p.name])) for p in points]
    opt = torch.optim.Adam(list(vecs.values()), lr=lr)
    losses = []
    model.eval()
    try:
        with torch.enable_grad():
            for step in range(steps):
                batch = [rows[(step * batch_size + i) % len(rows)] for i in range(batch_size)]
                width = max(len(r) for r in batch) + len(tgt)
                ids = torch.full((batch_size, width), pad, device=device)
                labels = torch.full((batch_size, width), -100, device=device)
                att = torch.zeros(batch_size, width, dtype=torch.long, device=device)
                mask = torch.zeros(batch_size, width, device=device)
                for i, r in enumerate(batch):
                    n = len(r)
                    ids[i, :n + len(tgt)] = torch.tensor(r + tgt, device=device)
                    att[i, :n + len(tgt)] = 1
                    labels[i, n:n + len(tgt)] = torch.tensor(tgt, device=device)
                    mask[i, n - 1:n + len(tgt)] = 1
                state["mask"] = mask
                logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
                reg = sum(v.pow(2).sum() for v in vecs.values())
                opt.zero_grad()
                (loss + l2 * reg).backward()
                opt.step()
                losses.append(loss.item())
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return {name: v.detach().cpu().clone() for name, v in vecs.items()}, losses


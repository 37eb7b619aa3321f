"""Installing steering as forward hooks: a context manager, and a handle for use outside ``with``.

One installation holds:

* a pre-hook on the top-level model that records, for each forward call, how many positions the
  KV cache already holds and the attention mask, so the layer hooks know the absolute position of
  every row they see (this is what makes steered generation identical with and without the cache).
  With a gate, on every call that starts a sequence (the prompt of ``generate``, each
  loglikelihood batch) it first runs the model *unsteered and truncated* at the gate's hook point
  (:func:`make_gate_pass`) and records which rows the gate fires on (``CallState.row_on``);
* a hook per steering site (a layer's output, or input for ``hook_resid_pre``) that selects the
  positions to steer (and only rows the gate let through) and replaces them with
  :func:`steerplug.steering.gradient_steer`'s result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from steerplug.layers import HookPoint, hidden_of
from steerplug.steering import SteeringConfig, SteeringError, gradient_steer


@dataclass
class CallState:
    """Per-call facts, written by the top-level pre-hook and read by the layer hook."""

    past_len: int = 0
    """Positions already in the KV cache before this forward call."""
    attention_mask: torch.Tensor | None = None
    """``(B, past_len + T)`` mask of the whole sequence so far, if the caller gave one."""
    gen_start: int | torch.Tensor | None = None
    """First position that predicts a new token: ``prompt_len - 1`` in ``generate``; an int or a
    per-row ``(B,)`` tensor for plain forward calls; None = every position is prompt."""
    prompt_end: int | torch.Tensor | None = None
    """End of the prompt (exclusive), for ``positions='prompt'``; None = the whole input."""
    row_lr: torch.Tensor | None = None
    """Optional per-row step size ``(B,)`` (0 switches a row off); overrides ``config.lr``."""
    row_steps: torch.Tensor | None = None
    """Optional per-row step count ``(B,)``; ``config.steps`` is then the maximum."""
    row_on: torch.Tensor | None = None
    """``(B,)`` bool: the rows steering may touch (written by the gate's pass; None = every row).
    Other rows run exactly as the unsteered model."""
    gating: bool = False
    """True while the gate's own truncated forward runs: every steering hook stands aside."""
    gate_given: bool = False
    """:attr:`row_on` was decided before this call (a prompt prefilled in chunks, whose gate read
    the whole prompt first): the call's own gate pass is skipped."""
    steered_positions: int = 0
    """Running count of positions that were steered (for diagnostics and tests)."""
    isolate_rows: bool = False
    """Instead of raising on NaN/inf, leave a row's bad positions unsteered and mark the row in
    :attr:`bad_rows` (the serving engine fails that request alone)."""
    bad_rows: torch.Tensor | None = None
    """``(B,)`` bool, with ``isolate_rows``: rows whose steered activations were NaN or inf."""
    nonfinite: dict[str, torch.Tensor] = field(default_factory=dict)
    """``{site: 0-d bool tensor}``: whether a steered activation there was NaN or inf in this
    forward call, kept on the device (no host sync per layer) and checked once after the call."""


def _past_length(args: tuple, kwargs: dict) -> int:
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.numel():
        return int(cache_position[0])
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple-of-tuples


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the activation it needs is seen."""


GatePass = Callable[[nn.Module, tuple, dict, CallState], torch.Tensor]


def _make_call_hook(state: CallState, gate_pass: GatePass | None = None) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if state.gating:  # the gate's own pass re-enters the model
            return
        state.past_len = _past_length(args, kwargs)
        state.attention_mask = kwargs.get("attention_mask")
        if gate_pass is not None and state.past_len == 0 and not state.gate_given:
            state.gating = True
            try:
                state.row_on = gate_pass(module, args, kwargs, state)
            finally:
                state.gating = False
    return hook


def _prompt_mask(state: CallState, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """``(B, T)`` bool: the prompt positions of a call that starts at position 0."""
    cols = torch.arange(seq, device=device)
    end = state.prompt_end if state.prompt_end is not None else seq
    keep = (cols < torch.as_tensor(end, device=device).reshape(-1, 1)).expand(batch, seq)
    mask = state.attention_mask
    if mask is not None and mask.dim() == 2 and mask.shape[-1] >= seq:
        keep = keep & mask[:, :seq].to(device=device, dtype=torch.bool)
    return keep


def forward_to(model: nn.Module, point: HookPoint, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run ``model(*args, **kwargs)`` only as far as ``point`` and return the activation there ``(B, T, D)``
    (the layers after it never run; a KV cache in ``kwargs`` is filled up to it)."""
    captured: list[torch.Tensor] = []

    def grab(h: torch.Tensor) -> None:
        captured.append(h)
        raise _StopForward

    if point.io == "output":
        handle = point.module.register_forward_hook(lambda m, a, o: grab(hidden_of(o)))
    else:
        handle = point.module.register_forward_pre_hook(
            lambda m, a, k: grab(a[0] if a else k["hidden_states"]), with_kwargs=True)
    try:
        model(*args, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"The forward pass never reached {point.name}.")
    return captured[0]


def make_gate_pass(point: HookPoint, rows_fired: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> GatePass:
    """A gate pass: run the model on the call's own inputs, without cache and unsteered, up to
    ``point``; return ``rows_fired(h (B, T, D), prompt_mask (B, T)) -> (B,) bool``."""

    def gate_pass(model: nn.Module, args: tuple, kwargs: dict, state: CallState) -> torch.Tensor:
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
        kw["use_cache"] = False
        h = forward_to(model, point, *args, **kw)
        return rows_fired(h, _prompt_mask(state, h.shape[0], h.shape[1], h.device))

    return gate_pass


def _select(state: CallState, config: SteeringConfig, batch: int, seq: int,
            device: torch.device) -> torch.Tensor | None:
    """``(B, T)`` bool mask of positions to steer, or None for "all of them" (the lean path)."""
    sel = _select_positions(state, config, batch, seq, device)
    if state.row_on is None:
        return sel
    on = state.row_on.to(device=device, dtype=torch.bool).reshape(-1, 1)  # (B, 1)
    return on.expand(batch, seq) if sel is None else sel & on


def _select_positions(state: CallState, config: SteeringConfig, batch: int, seq: int,
                      device: torch.device) -> torch.Tensor | None:
    """``positions``' span (:func:`_select_span`), cut by ``answer_tokens``: only absolute columns
    ``< gen_start + answer_tokens`` stay, i.e. those predicting answer tokens ``1 .. answer_tokens``
    (``gen_start`` predicts token 1) and, for ``positions="all"``, the prompt before them."""
    sel = _select_span(state, config, batch, seq, device)
    n, start = config.answer_tokens, state.gen_start
    if n is None or start is None or config.positions == "prompt":
        return sel
    if isinstance(start, int) and state.past_len >= start + n:
        return torch.zeros(batch, seq, dtype=torch.bool, device=device)  # past the steered span
    if isinstance(start, int) and state.past_len + seq <= start + n:
        return sel  # wholly inside it (a decode step early in the answer): keep the lean path
    cols = torch.arange(state.past_len, state.past_len + seq, device=device)  # (T,)
    early = (cols < torch.as_tensor(start, device=device).reshape(-1, 1) + n).expand(batch, seq)
    return early if sel is None else sel & early


def _select_span(state: CallState, config: SteeringConfig, batch: int, seq: int,
                 device: torch.device) -> torch.Tensor | None:
    """``(B, T)`` bool mask (or None: all) of the positions ``config.positions`` names."""
    past = state.past_len
    mask = state.attention_mask
    if config.positions == "generated":
        start = state.gen_start
        if start is None:
            return torch.zeros(batch, seq, dtype=torch.bool, device=device)
        if isinstance(start, int) and past >= start:
            return None  # a decode step: every row's new position predicts a new token
        cols = torch.arange(past, past + seq, device=device)  # (T,)
        start_t = torch.as_tensor(start, device=device).reshape(-1, 1)  # (B or 1, 1)
        sel = (cols >= start_t).expand(batch, seq)
    elif config.positions == "prompt":
        end = state.prompt_end
        cols = torch.arange(past, past + seq, device=device)
        if end is None:
            sel = torch.ones(batch, seq, dtype=torch.bool, device=device)
        else:
            sel = (cols < torch.as_tensor(end, device=device).reshape(-1, 1)).expand(batch, seq)
    else:
        if mask is None:
            return None
        sel = torch.ones(batch, seq, dtype=torch.bool, device=device)
    if mask is not None and mask.dim() == 2 and mask.shape[-1] >= past + seq:
        sel = sel & mask[:, past:past + seq].to(device=device, dtype=torch.bool)
    return sel


def make_steer_fn(grad_fn_for: Callable[[torch.device], Callable[[torch.Tensor], torch.Tensor]],
                  config: SteeringConfig, state: CallState, point_name: str
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(B, T, D) -> (B, T, D)``: steer the selected positions of one layer activation."""

    def steer(h: torch.Tensor) -> torch.Tensor:
        if state.gating or (state.row_on is not None and not bool(state.row_on.any())):
            return h
        B, T, D = h.shape
        sel = _select(state, config, B, T, h.device)
        rows = None if sel is None else sel.nonzero(as_tuple=True)  # (N,), (N,)
        x = h.reshape(B * T, D) if rows is None else h[rows]  # (N, D)
        if x.shape[0] == 0:
            return h
        lr, steps = config.lr, None
        row_of = None  # (N,) batch row of each selected position, when needed
        if state.row_lr is not None or state.row_steps is not None or state.isolate_rows:
            row_of = (torch.arange(B, device=h.device).repeat_interleave(T) if rows is None else rows[0])
        if state.row_lr is not None:
            lr = state.row_lr.to(h.device, torch.float32)[row_of].unsqueeze(-1)  # (N, 1)
        if state.row_steps is not None:
            steps = state.row_steps.to(h.device)[row_of].unsqueeze(-1)  # (N, 1)
        new = gradient_steer(x.float(), grad_fn_for(h.device), config.steps, lr,
                             normalize=config.normalize, max_delta=config.max_delta,
                             row_steps=steps).to(h.dtype)  # checked after the cast: fp16 overflow counts
        if config.check_finite and state.isolate_rows:
            ok = torch.isfinite(new).all(dim=-1)  # (N,)
            bad = torch.zeros(B, dtype=torch.long, device=h.device).index_add_(0, row_of, (~ok).long()) > 0
            state.bad_rows = bad if state.bad_rows is None else state.bad_rows | bad
            new = torch.where(ok.unsqueeze(-1), new, x)
        elif config.check_finite:
            bad = ~torch.isfinite(new).all()
            state.nonfinite[point_name] = bad | state.nonfinite.get(point_name, False)
        state.steered_positions += x.shape[0]
        if rows is None:
            return new.reshape(B, T, D)
        out = h.clone()
        out[rows] = new
        return out

    return steer


def _output_hook(steer: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor):  # transformers >= 5
            return steer(output)
        return (steer(output[0]),) + tuple(output[1:])  # transformers 4: (hidden, ...)
    return hook


def _input_hook(steer: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if args:
            return (steer(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = steer(kwargs["hidden_states"])
        return args, kwargs
    return hook


class HookHandle:
    """Installed steering hooks; :meth:`remove` takes every one of them off (idempotent)."""

    def __init__(self, handles: list[RemovableHandle]):
        self._handles = handles

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


Steer = Callable[[torch.Tensor], torch.Tensor]


def _make_finite_check(state: CallState) -> Callable:
    """A post-hook on the whole model: raise :class:`SteeringError` if a steering hook produced NaN
    or inf in this call. One host sync per forward call, however many sites and layers steer."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        flags, state.nonfinite = state.nonfinite, {}
        if not flags:
            return
        device = next(iter(flags.values())).device
        if bool(torch.stack([f.to(device) for f in flags.values()]).any()):  # the one host sync
            where = [name for name, f in flags.items() if bool(f)]
            raise SteeringError(
                f"Steering at {', '.join(where)} produced NaN or inf activations (after the cast to the "
                "model's dtype). Lower lr or steps, set max_delta, use float32 or bfloat16 instead of "
                "float16, or check the SAE and vector for extreme values.")
    return hook


def install_hooks(model: nn.Module, point: HookPoint | list[tuple[HookPoint, Steer]],
                  steer: Steer | None, state: CallState, gate_pass: GatePass | None = None) -> HookHandle:
    """Register the call-state pre-hook (running ``gate_pass`` if given) and one steering hook per
    site; returns their handle. ``point, steer``: one site, or ``point=[(point, steer), ...]`` and
    ``steer=None`` for several.

    If registering fails half-way, whatever was registered is removed before the error propagates.
    """
    sites = point if isinstance(point, list) else [(point, steer)]
    handles: list[RemovableHandle] = []
    try:
        handles.append(model.register_forward_pre_hook(_make_call_hook(state, gate_pass), with_kwargs=True))
        handles.append(model.register_forward_hook(_make_finite_check(state)))
        for p, fn in sites:
            if p.io == "output":
                handles.append(p.module.register_forward_hook(_output_hook(fn)))
            else:
                handles.append(p.module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
    except BaseException:
        HookHandle(handles).remove()
        raise
    return HookHandle(handles)


@contextmanager
def hooks_installed(model: nn.Module, point: HookPoint | list[tuple[HookPoint, Steer]],
                    steer: Steer | None, state: CallState,
                    gate_pass: GatePass | None = None) -> Iterator[HookHandle]:
    """``with hooks_installed(...):`` steering is on; every hook is removed on exit, exceptions included."""
    handle = install_hooks(model, point, steer, state, gate_pass)
    try:
        yield handle
    finally:
        handle.remove()

"""Interventions to compare gradient steering against, and a harmful-feature gate.

All of them reuse :func:`steerplug.hooks.make_steer_fn` (position selection, per-row step sizes,
finite checks) with a one-step, un-normalised "gradient" whose negative is the edit to apply:

* ``gradient``: steerplug's own gradient steering on ``SAE.encode(h) . w`` (the default);
* ``add``: contrastive activation addition, ``h + scale * v`` with ``v`` a difference of means
  (:func:`difference_of_means`), usually at every position;
* ``clamp``: SAE feature clamping on the steering vector's support: features with ``w > 0``
  (harmful) are set to 0 and, if ``clamp_value`` is given, features with ``w < 0`` (safe) to
  ``clamp_value``; the edit ``(f_target - f) @ W_dec`` keeps the SAE's reconstruction error.

A *gate* (``gate_threshold``) makes any of them conditional: at every full forward pass (the
prompt of ``generate``, each loglikelihood batch) it scores each row by ``encode(h) . w_gate``
pooled (mean, or max) over its prompt positions, before any edit, and switches the intervention
off for rows scoring at or below the threshold (``CallState.row_lr = 0``). ``w_gate`` is a
detector over SAE features (:func:`prompt_detector`: harmful vs harmless prompts), or the
steering vector itself. Each row's first real token is left out: its activation is the
attention sink's, far larger than any other, and says nothing about the prompt.

No lm_eval import here: :mod:`steerplug.lm_eval_plugin` and :mod:`steerplug.report` build on it.
"""

from __future__ import annotations

import copy

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from steerplug.hooks import CallState, hooks_installed, make_steer_fn
from steerplug.layers import HookPoint, hidden_of, module_device
from steerplug.steered_model import SteeredModel
from steerplug.steering import FeatureObjective, SteeringConfig
from steerplug.vector import SteeringVector

INTERVENTIONS = ("gradient", "add", "clamp")
GATE_POOLS = ("mean", "max")


@dataclass
class Intervention:
    """Which edit to apply at the hook point, and whether a gate makes it conditional."""

    kind: str = "gradient"
    """``gradient`` (steerplug), ``add`` (activation addition) or ``clamp`` (SAE feature clamping)."""
    add_vector: torch.Tensor | None = None
    """``(d_model,)`` direction for ``add`` (e.g. harmful-minus-harmless means, negated)."""
    add_scale: float = 1.0
    """Multiplier of ``add_vector``."""
    clamp_value: float | None = None
    """For ``clamp``: the value safe features (``w < 0``) are set to; None leaves them alone."""
    gate_threshold: float | None = None
    """Intervene only on rows whose prompt scores above this (see ``gate_pool``); None: always."""
    gate_vector: SteeringVector | None = None
    """Feature weights the gate scores with (e.g. :func:`prompt_detector`); None: the steering vector."""
    gate_pool: str = "mean"
    """How a row's per-token scores ``encode(h_t) . w_gate`` over its prompt become one: ``mean`` or ``max``."""

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTIONS:
            raise ValueError(f"Intervention.kind={self.kind!r}: expected one of {INTERVENTIONS}.")
        if self.kind == "add" and self.add_vector is None:
            raise ValueError("Intervention.kind='add' needs add_vector= (a (d_model,) tensor).")
        if self.gate_pool not in GATE_POOLS:
            raise ValueError(f"Intervention.gate_pool={self.gate_pool!r}: expected one of {GATE_POOLS}.")

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (the vector by its norm and a checksum, not its values)."""
        out: dict[str, Any] = {"kind": self.kind, "gate_threshold": self.gate_threshold}
        if self.gate_threshold is not None:
            out["gate_pool"] = self.gate_pool
            if self.gate_vector is not None:
                out.update(gate_vector_nnz=self.gate_vector.nnz,
                           gate_vector_sum=round(float(self.gate_vector.dense().sum()), 6))
        if self.kind == "add":
            v = self.add_vector.float()
            out.update(add_scale=self.add_scale, add_vector_norm=round(float(v.norm()), 6),
                       add_vector_sum=round(float(v.sum()), 6))
        if self.kind == "clamp":
            out["clamp_value"] = self.clamp_value
        return out


def _fixed_step(config: SteeringConfig) -> SteeringConfig:
    """One step of length 1 along the given "gradient", no normalisation, no bound: the edit as is."""
    return replace(config, steps=1, lr=1.0, normalize=False, max_delta=None)


def _add_grad_fn_for(vector: torch.Tensor, scale: float):
    cache: dict[torch.device, torch.Tensor] = {}

    def grad_fn_for(device: torch.device):
        if device not in cache:
            cache[device] = (-scale * vector.detach().to(device=device, dtype=torch.float32))  # (D,)
        edit = cache[device]
        return lambda h: edit.expand_as(h)  # (N, D)
    return grad_fn_for


def _clamp_grad_fn_for(steered: SteeredModel, clamp_value: float | None):
    idx, w = steered.vector.support()
    harmful = idx[w > 0]
    safe = idx[w < 0] if clamp_value is not None else idx[:0]
    feats = torch.cat([harmful, safe])  # (S,)
    target_vals = torch.cat([torch.zeros(len(harmful)),
                             torch.full((len(safe),), float(clamp_value or 0.0))])  # (S,)
    cache: dict[torch.device, Any] = {}

    def grad_fn_for(device: torch.device):
        if device not in cache:
            sae = steered.sae
            if sae.W_dec.device != device or sae.W_dec.dtype != torch.float32:
                sae = copy.deepcopy(sae).to(device=device, dtype=torch.float32)  # the user's SAE stays as it is
            W_dec = sae.W_dec.detach()[feats.to(device)]  # (S, D)
            target = target_vals.to(device)
            f_idx = feats.to(device)

            def grad(h: torch.Tensor) -> torch.Tensor:
                f = sae.encode(h)[:, f_idx]  # (N, S)
                return -((target - f) @ W_dec)  # (N, D): h - grad = h + (target - f) @ W_dec
            cache[device] = grad
        return cache[device]
    return grad_fn_for


def pool_prompt_scores(scores: torch.Tensor, keep: torch.Tensor, pool: str) -> torch.Tensor:
    """``(B, T)`` per-token scores -> ``(B,)`` over the positions ``keep (B, T)`` marks, leaving out
    each row's first kept position (the attention sink) unless it is the only one."""
    first = keep.int().argmax(dim=1, keepdim=True)  # (B, 1): each row's first real token
    rest = keep.clone()
    rest.scatter_(1, first, False)
    keep = torch.where(rest.any(1, keepdim=True), rest, keep)
    if pool == "max":
        return scores.masked_fill(~keep, float("-inf")).amax(dim=1)
    n = keep.sum(1)  # (B,)
    mean = (scores * keep).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, mean, torch.full_like(mean, float("-inf")))


def _gate_hook(point: HookPoint, objective_for, state: CallState, threshold: float, lr: float, pool: str):
    """A hook that scores each row's prompt (unsteered) and writes ``state.row_lr``."""

    def gate(h: torch.Tensor) -> None:
        if state.past_len:  # a decode step: keep the decision taken on the prompt
            return
        B, T, _ = h.shape
        scores = objective_for(h.device).loss(h.reshape(B * T, -1).float()).reshape(B, T)  # (B, T)
        cols = torch.arange(T, device=h.device)
        end = state.prompt_end if state.prompt_end is not None else T
        keep = (cols < torch.as_tensor(end, device=h.device).reshape(-1, 1)).expand(B, T)
        mask = state.attention_mask
        if mask is not None and mask.dim() == 2 and mask.shape[-1] >= T:
            keep = keep & mask[:, :T].to(device=h.device, dtype=torch.bool)
        state.row_lr = (pool_prompt_scores(scores, keep, pool) > threshold).float() * lr  # (B,)

    if point.io == "output":
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            gate(hidden_of(output))
        return point.module.register_forward_hook(hook)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        gate(args[0] if args else kwargs["hidden_states"])
    return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def is_active(steered: SteeredModel, config: SteeringConfig, spec: Intervention) -> bool:
    """Whether ``intervene`` would change anything (``False``: the model runs exactly as unwrapped)."""
    if steered.hook_point is None:
        return False
    if spec.kind == "gradient":
        return config.steps > 0 and steered.sae is not None
    if spec.kind == "add":
        return spec.add_scale != 0
    return steered.sae is not None and steered.vector is not None


@contextmanager
def intervene(steered: SteeredModel, state: CallState, config: SteeringConfig | None = None,
              spec: Intervention | None = None) -> Iterator[CallState]:
    """``with intervene(steered, state, config, spec): model(...)`` applies ``spec`` at the hook point.

    ``config.positions`` picks the positions (``generated`` / ``prompt`` / ``all``, read from
    ``state`` as for gradient steering); the other config fields matter for ``gradient`` only.
    """
    config = config or steered.config
    spec = spec or Intervention()
    if not is_active(steered, config, spec):
        yield state
        return
    point = steered.hook_point
    with ExitStack() as stack:
        if spec.gate_threshold is not None:
            if steered.sae is None or steered.vector is None:
                raise ValueError("A gate (gate_threshold=) needs the SAE and steering vector.")
            lr = config.lr if spec.kind == "gradient" else 1.0
            objectives: dict[torch.device, FeatureObjective] = {}

            def objective_for(device: torch.device) -> FeatureObjective:
                if device not in objectives:
                    objectives[device] = (steered.feature_objective(device) if spec.gate_vector is None
                                          else FeatureObjective(steered.sae, spec.gate_vector, device))
                return objectives[device]
            handle = _gate_hook(point, objective_for, state, float(spec.gate_threshold), lr, spec.gate_pool)
            stack.callback(handle.remove)  # registered first, so it runs before the edit
        if spec.kind == "gradient":
            stack.enter_context(steered.steering(state, config))
        else:
            grad_fn_for = (_add_grad_fn_for(spec.add_vector, spec.add_scale) if spec.kind == "add"
                           else _clamp_grad_fn_for(steered, spec.clamp_value))
            steer = make_steer_fn(grad_fn_for, _fixed_step(config), state, point.name)
            stack.enter_context(hooks_installed(steered.model, point, steer, state))
        yield state


# --- building the baselines' ingredients --------------------------------------------------------
def chat_prompts(tokenizer: Any, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """User messages rendered through the chat template, ready for the assistant's answer."""
    out = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


def _hook_activations(model: nn.Module, tokenizer: Any, point: HookPoint, texts: Sequence[str],
                      batch_size: int = 16, padding_side: str | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``texts`` in batches (no special tokens added) and yield each batch's activation at
    ``point``, ``(B, T, D)``, with its attention mask ``(B, T)`` on the same device."""
    captured: list[torch.Tensor] = []
    if point.io == "output":
        handle = point.module.register_forward_hook(lambda m, a, o: captured.append(hidden_of(o)))
    else:
        handle = point.module.register_forward_pre_hook(
            lambda m, a, k: captured.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
    side = tokenizer.padding_side
    tokenizer.padding_side = padding_side or side
    try:
        device = module_device(model)
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=False)
            model(**{k: v.to(device) for k, v in enc.items()})
            h = captured.pop()
            yield h, enc["attention_mask"].to(h.device)
    finally:
        handle.remove()
        tokenizer.padding_side = side


@torch.no_grad()
def last_token_activations(model: nn.Module, tokenizer: Any, point: HookPoint, texts: Sequence[str],
                           batch_size: int = 16) -> torch.Tensor:
    """``(N, D)`` float32 activations at ``point`` at each text's last token (right padding)."""
    rows: list[torch.Tensor] = []
    for h, mask in _hook_activations(model, tokenizer, point, texts, batch_size, padding_side="right"):
        last = mask.sum(1) - 1  # (B,)
        rows.append(h[torch.arange(h.shape[0], device=h.device), last].float().cpu())  # (B, D)
    return torch.cat(rows)


def difference_of_means(model: nn.Module, tokenizer: Any, point: HookPoint, harmful: Sequence[str],
                        harmless: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """``mean(harmful) - mean(harmless)`` of the last-prompt-token activation at ``point``, ``(D,)``.

    Adding it (positive scale) pushes towards the model's harmful-request representation, which
    in chat models is where refusals start; CAA adds it at every position.
    """
    a = last_token_activations(model, tokenizer, point, chat_prompts(tokenizer, harmful), batch_size)
    b = last_token_activations(model, tokenizer, point, chat_prompts(tokenizer, harmless), batch_size)
    return a.mean(0) - b.mean(0)


@torch.no_grad()
def prefix_direction(model: nn.Module, tokenizer: Any, point: HookPoint, prompts: Sequence[str],
                     refuse_prefix: str, comply_prefix: str) -> torch.Tensor:
    """``(D,)``: the mean activation at ``point`` over the last prompt position and the answer prefix
    tokens when the answer is forced to start with ``refuse_prefix``, minus the same with
    ``comply_prefix`` (``prompts`` chat-formatted). Adding it pushes towards starting a refusal."""

    def mean_over_prefix(prefix: str) -> torch.Tensor:
        n = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        texts = [t + prefix for t in chat_prompts(tokenizer, prompts)]
        rows = [h[0, -n - 1:].float().mean(0).cpu()  # (D,)
                for h, _ in _hook_activations(model, tokenizer, point, texts, batch_size=1)]
        return torch.stack(rows).mean(0)

    return mean_over_prefix(refuse_prefix) - mean_over_prefix(comply_prefix)


@torch.no_grad()
def prompt_scores(steered: SteeredModel, texts: Sequence[str], vector: SteeringVector | None = None,
                  pool: str = "mean", batch_size: int = 16) -> torch.Tensor:
    """``(N,)``: each text's ``encode(h_t) . w`` pooled over its tokens but the first, as the gate
    scores it (``vector``: the weights, default the steering vector)."""
    objective = (steered.feature_objective() if vector is None
                 else FeatureObjective(steered.sae, vector, steered.device))
    scores: list[torch.Tensor] = []
    for h, mask in _hook_activations(steered.model, steered.tokenizer, steered.hook_point, texts, batch_size):
        B, T, D = h.shape
        s = objective.loss(h.reshape(B * T, D).float()).reshape(B, T)
        scores.append(pool_prompt_scores(s, mask.bool(), pool).cpu())
    return torch.cat(scores)


@torch.no_grad()
def pooled_sae_features(steered: SteeredModel, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """``(N, F)``: SAE features of each text, averaged over its tokens but the first."""
    sae = steered.sae
    rows: list[torch.Tensor] = []
    for h, mask in _hook_activations(steered.model, steered.tokenizer, steered.hook_point, texts, batch_size):
        keep = mask.bool()
        keep.scatter_(1, keep.int().argmax(dim=1, keepdim=True), False)  # not the first real token
        f = sae.encode(h.to(sae.W_enc.dtype)).float()  # (B, T, F)
        m = keep.unsqueeze(-1).float()
        rows.append(((f * m).sum(1) / m.sum(1).clamp_min(1)).cpu())
    return torch.cat(rows)


def prompt_detector(steered: SteeredModel, harmful: Sequence[str], harmless: Sequence[str],
                    n_features: int = 32, batch_size: int = 16) -> SteeringVector:
    """A sparse detector over SAE features for the gate: the ``n_features`` features whose mean
    activation over the (chat-formatted) prompt best separates ``harmful`` from ``harmless``
    (Cohen's d, either sign), weighted by ``d / max|d|``."""
    a = pooled_sae_features(steered, harmful, batch_size)  # (Nh, F)
    b = pooled_sae_features(steered, harmless, batch_size)  # (Nb, F)
    d = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / 2 + 1e-6).sqrt()  # (F,)
    top = d.abs().topk(min(n_features, d.numel())).indices.sort().values
    return SteeringVector(d.numel(), indices=top, values=d[top] / d[top].abs().max())


def choose_threshold(harmful_scores: torch.Tensor, harmless_scores: torch.Tensor,
                     max_fpr: float | None = None) -> float:
    """The threshold maximising TPR - FPR (Youden's J) between two score sets (ties: the lowest).
    With ``max_fpr``: the lowest threshold whose false-positive rate on ``harmless_scores`` is at
    most that (the highest TPR within the budget)."""
    if max_fpr is not None:
        for thr in [float(harmless_scores.min()) - 1.0] + harmless_scores.sort().values.tolist():
            if float((harmless_scores > thr).float().mean()) <= max_fpr:
                return thr
    cands = torch.cat([harmful_scores, harmless_scores]).unique().sort().values  # (K,)
    best, best_thr = -2.0, float(cands[0]) - 1.0
    for thr in [float(cands[0]) - 1.0] + cands.tolist():
        j = float((harmful_scores > thr).float().mean() - (harmless_scores > thr).float().mean())
        if j > best:
            best, best_thr = j, thr
    return best_thr

"""The steering maths as pure tensor functions; no model, no hooks.

Gradient steering minimises ``L(h) = SAE.encode(h) . w`` by a few steps ``h <- h - lr * dL/dh``.
For the SAEs we support the gradient has a closed form: with ``pre = (h - a*b_dec) @ W_enc + b_enc``
and ``A(h)`` the set of active features (``pre > 0``; and ``pre > threshold`` for JumpReLU; and among
the top k for TopK),

    dL/dh = W_enc[:, S] @ (w_S * 1[S in A(h)])        # (D,)

where ``S`` is the support of ``w``. For ReLU and JumpReLU only the ``|S|`` columns of ``W_enc`` are
ever touched: a 64-feature vector costs ``O(d_model * 64)`` per token and step, whatever ``d_sae``.
TopK needs the full pre-activations to know which features made the top k.

The closed form needs no autograd, so it runs under ``torch.no_grad`` and ``torch.inference_mode``
as ``generate`` and lm-eval do. User-supplied losses take the autograd path
(:func:`autograd_grad`), which leaves inference mode for a cloned tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from steerplug.sae import SparseAutoencoder
from steerplug.vector import SteeringVector

POSITIONS = ("generated", "prompt", "all")
METHODS = ("gradient", "target", "add")

# A user loss: (h (N, D) float32, sae) -> per-row loss (N,). Steering decreases it.
Objective = Callable[[torch.Tensor, SparseAutoencoder], torch.Tensor]


class SteeringError(RuntimeError):
    """Steering produced an unusable activation (NaN or inf)."""


@dataclass
class SteeringConfig:
    """How hard, where and how often to steer."""

    steps: int = 3
    """Gradient steps per token; 0 leaves the model untouched."""
    lr: float = 0.25
    """Step size. With ``normalize=True``: the length of each step as a fraction of ``||h||``."""
    normalize: bool = True
    """Normalise each step to ``lr * ||h||`` along the gradient direction, so one ``lr`` works
    across layers and models whatever the scale of ``W_enc`` and ``w``."""
    max_delta: float | None = 0.5
    """Upper bound on ``||h_steered - h|| / ||h||`` per token; None for no bound."""
    positions: str = "generated"
    """``generated``: positions that predict new tokens (the last prompt position and every
    generated one); ``prompt``: the prompt only; ``all``: every position."""
    check_finite: bool = True
    """Raise :class:`SteeringError` if a steered activation is NaN or inf."""
    method: str = "gradient"
    """``gradient``: descend ``encode(h) . w`` along its gradient (``W_enc`` columns, the seed's
    method). ``target``: move the vector's features towards target values along the SAE's decoder
    directions: safe features (``w < 0``) up to ``-w`` (their mean value in the model's own
    refusals), harmful ones (``w > 0``) down to 0, each by what it lacks or has, so a token where
    no harmful feature fires and every safe one already sits at its target gets no step
    (:meth:`FeatureObjective.target_step`). Use it with ``normalize=False``: ``lr`` then scales
    the decoder-space step itself (``lr=1``: one exact step to the targets). ``add``: activation
    addition, ``h + lr * d`` with the site's fixed direction ``d`` (a baseline; needs
    ``SteeredModel(..., directions=)``; use ``normalize=False``, ``steps=1``)."""
    use_gate: bool = True
    """Steer only the rows the :class:`~steerplug.SteeredModel`'s gate fires on, if it has one;
    False steers every row."""
    answer_tokens: int | None = None
    """Steer only the positions that predict the first ``answer_tokens`` tokens of the answer, then
    stop: steering sets the answer's course and lets the model write on unsteered. None: the whole
    answer.

    The position that predicts answer token 1 is the last prompt position; answer token ``k + 1``
    is predicted by the position of generated token ``k``. So with a prompt of ``P`` tokens,
    ``answer_tokens=N`` keeps positions ``P - 1 .. P + N - 2`` (the last prompt position and the
    first ``N - 1`` generated ones) of what ``positions`` selects: with ``"generated"`` exactly
    those ``N`` positions, with ``"all"`` the whole prompt and the first ``N - 1`` generated
    positions. With ``"prompt"`` it changes nothing (the prompt ends at the position predicting
    answer token 1). For lm-eval loglikelihoods the answer is the continuation."""
    push_inactive: bool = False
    """Also push up the safe features (``w < 0``) that are off. Their exact gradient is zero, so by
    default steering can only strengthen a safe feature that already fires; with this, their
    gradient is taken through the pre-activation (straight-through), so steering can switch one
    on. Harmful features (``w > 0``) still count only where they fire. Best behind a gate."""

    def __post_init__(self) -> None:
        check_steering("SteeringConfig", steps=self.steps, lr=self.lr, max_delta=self.max_delta,
                       positions=self.positions, method=self.method, answer_tokens=self.answer_tokens)


class SteeringValueError(ValueError):
    """A steering setting given a value it cannot take; :attr:`field` names the setting."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# What each checked SteeringConfig field accepts: (test, what the message says is expected).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "lr": (lambda v: v >= 0, "a number >= 0"),
    "max_delta": (lambda v: v is None or v > 0, "> 0 or None"),
    "positions": (lambda v: v in POSITIONS, f"one of {POSITIONS}"),
    "method": (lambda v: v in METHODS, f"one of {METHODS}"),
    "answer_tokens": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                      "an integer >= 1 or None"),
}


def check_steering(owner: str, **values: Any) -> None:
    """Check ``values`` (:class:`SteeringConfig` fields) by SteeringConfig's own rules, in order.

    Everything that takes a steering setting (the config, a batched request, a server request)
    checks it here, so each rule is written once. Raises :class:`SteeringValueError`
    ``"{owner}.{name}={value!r}: expected ..."`` for the first value refused.
    """
    for name, value in values.items():
        test, expected = _RULES[name]
        if not test(value):
            raise SteeringValueError(name, f"{owner}.{name}={value!r}: expected {expected}.")


class FeatureObjective:
    """``L(h) = encode(h) . w``, with ``W_enc`` cut down to ``w``'s support, on one device, in float32.

    Build once per (SAE, vector, device); :meth:`loss` and :meth:`grad` are then cheap.
    """

    def __init__(self, sae: SparseAutoencoder, vector: SteeringVector,
                 device: torch.device | str | None = None):
        if vector.d_sae != sae.d_sae:
            raise ValueError(
                f"Steering vector has d_sae={vector.d_sae} but the SAE has d_sae={sae.d_sae}: "
                "they were not built for the same SAE."
            )
        device = torch.device(device) if device is not None else sae.W_enc.device
        idx, vals = vector.support()
        # Prepared outside inference mode so the tensors can also serve autograd.
        with torch.inference_mode(False), torch.no_grad():
            f32 = {"device": device, "dtype": torch.float32}
            self.arch = sae.cfg.architecture
            self.k = sae.cfg.k
            self.support = idx.to(device)  # (S,)
            self.w = vals.to(**f32)  # (S,)
            b_in = (sae.b_dec.detach().to(**f32) if sae.cfg.apply_b_dec_to_input
                    else torch.zeros(sae.d_in, **f32))  # (D,)
            # pre = (h - b_in) @ W + b = h @ W + (b - b_in @ W): the input shift goes into the bias.
            if self.arch == "topk":
                # TopK needs every pre-activation to know which features made the top k.
                self.W_full = sae.W_enc.detach().to(**f32)  # (D, F)
                self.b_full = sae.b_enc.detach().to(**f32) - b_in @ self.W_full  # (F,)
            cols = idx.to(sae.W_enc.device)
            self.W = sae.W_enc.detach()[:, cols].to(**f32).contiguous()  # (D, S)
            self.W_T = self.W.T.contiguous()  # (S, D)
            self.b = sae.b_enc.detach()[cols].to(**f32) - b_in @ self.W  # (S,)
            self.thr = (sae.threshold.detach()[cols].to(**f32)
                        if self.arch == "jumprelu" else None)  # (S,)
            self.D = sae.W_dec.detach()[cols].to(**f32).contiguous()  # (S, D) decoder rows
            self.target = (-self.w).clamp_min(0)  # (S,) safe features' targets; 0 for harmful ones

    def _pre_and_active(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activations on the support and whether each is active, both ``(N, S)``."""
        if self.arch == "topk":
            pre_full = torch.addmm(self.b_full, h, self.W_full)  # (N, F)
            top = pre_full.topk(self.k, dim=-1, sorted=False).indices  # (N, k)
            in_top = torch.zeros_like(pre_full, dtype=torch.bool).scatter_(-1, top, True)
            pre = pre_full[:, self.support]  # (N, S)
            return pre, in_top[:, self.support] & (pre > 0)
        pre = torch.addmm(self.b, h, self.W)  # (N, S)
        active = pre > 0
        if self.thr is not None:
            active &= pre > self.thr
        return pre, active

    def loss(self, h: torch.Tensor) -> torch.Tensor:
        """``encode(h) . w`` per row, ``(N, D) -> (N,)``."""
        pre, active = self._pre_and_active(h)
        return (pre * active) @ self.w

    def grad(self, h: torch.Tensor, push_inactive: bool = False) -> torch.Tensor:
        """Closed-form ``dL/dh``, ``(N, D) -> (N, D)``. ``push_inactive``: safe features (``w < 0``)
        count as active whatever their value (see :attr:`SteeringConfig.push_inactive`)."""
        _, active = self._pre_and_active(h)
        if push_inactive:
            active = active | (self.w < 0)
        return (active * self.w) @ self.W_T


    def target_step(self, h: torch.Tensor) -> torch.Tensor:
        """The ``target`` method's "gradient", ``(N, D) -> (N, D)``: ``-(f* - f) @ W_dec[S]`` where
        ``f`` are the support's feature values and ``f*`` their targets (``-w`` for safe features,
        0 for harmful ones); a safe feature above its target is left alone. It is the gradient of
        ``1/2 ||f* - f||^2`` (safe part one-sided) taken in feature space and mapped to the residual
        through the decoder, so ``h - lr * step`` with ``lr=1`` moves the SAE's reconstruction
        exactly to the targets and keeps its error term."""
        pre, active = self._pre_and_active(h)
        f = pre * active  # (N, S)
        gap = torch.where(self.w < 0, (self.target - f).clamp_min(0), -f)  # (N, S)
        return -(gap @ self.D)


def add_step(direction: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``add`` method's "gradient": ``-d`` at every row, so ``h - lr * step = h + lr * d``."""
    neg = -direction.float()  # (D,)
    return lambda h: neg.to(h.device).expand_as(h)  # (N, D)


def autograd_grad(h: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``d sum(loss_fn(h)) / dh`` by autograd, callable under ``no_grad`` and ``inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        x = h.detach().clone().requires_grad_(True)  # a normal tensor, even from an inference one
        (g,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return g


def gradient_steer(h: torch.Tensor, grad_fn: Callable[[torch.Tensor], torch.Tensor],
                   steps: int, lr: float | torch.Tensor, normalize: bool = True,
                   max_delta: float | None = None,
                   row_steps: torch.Tensor | None = None) -> torch.Tensor:
    """Take ``steps`` descent steps on ``h`` ``(N, D)`` float32 and return the new ``(N, D)``.

    ``lr`` may be a float or a per-row ``(N, 1)`` tensor; ``row_steps`` ``(N, 1)`` lets rows stop
    early (a row with ``row_steps=1`` only takes the first step). Rows whose gradient is zero
    (no steered feature active) are left exactly as they were.
    """
    h0 = h
    norm0 = h0.norm(dim=-1, keepdim=True) if (normalize or max_delta is not None) else None  # (N, 1)
    for i in range(steps):
        g = grad_fn(h)  # (N, D)
        if normalize:
            g = g * (norm0 / g.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        step_lr = lr if row_steps is None else lr * (row_steps > i)
        h = h - step_lr * g
    if max_delta is not None and steps > 0:
        delta = h - h0  # (N, D)
        scale = (max_delta * norm0 / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        h = h0 + delta * scale
    return h

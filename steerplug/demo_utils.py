"""The logic behind the Gradio demo (``demo/app.py``), kept here so it is testable without a browser.

* :func:`load_steered` loads a model with its SAE and vector, falling back to a clearly labelled
  random placeholder for the default model while its trained artifacts are not available;
* :func:`compare_stream` answers one prompt twice in the same batch, unsteered and steered, and
  yields snapshots of both answers as tokens arrive, each token with its feature-score trace;
* :func:`score_figure` and :func:`feature_table` turn the traces into the per-token plot of
  ``encode(h) . w`` (before and after steering) and the table of the most active SAE features;
* :func:`message_gate` says whether the prompt gate fires on a message, with its score against its
  threshold (:class:`~steerplug.compare.GateDecision`), and :func:`gate_log` lists that per message.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from steerplug.batching import (BatchEngine, ErrorEvent, FinishEvent, GenerationRequest, RequestStream,
                                TokenEvent, TokenTrace)
from steerplug.compare import GateDecision, gate_decision

logger = logging.getLogger(__name__)

EXAMPLE_PROMPTS = (
    "How do I pick a lock to get into my neighbour's house?",
    "Write a convincing phishing email that asks for a bank password.",
    "What household chemicals should never be mixed, and why?",
    "How do I make a cup of tea?",
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
)


def load_steered(model: str | None = None, sae: str | None = "default", vector: str | None = "default",
                 *, layer: int | None = None, placeholder_if_missing: bool = True,
                 **kwargs: Any) -> tuple[Any, str | None]:
    """``SteeredModel.from_pretrained(model, sae, vector, layer=...)`` plus a note for the UI.

    If the model has no SAE and vector (the default model before ``hub_artifacts/`` is built) and
    ``placeholder_if_missing``, a random SAE at the middle layer (blocks.15 on SmolLM2-135M) and a random 64-feature vector
    stand in, so the demo still shows the mechanics; the note says so. Other keyword arguments go
    to :meth:`SteeredModel.from_pretrained` (``sae_subfolder``, steering options, ...).
    """
    from steerplug import SparseAutoencoder, SteeredModel, SteeringVector
    from steerplug.layers import hidden_size

    steered = SteeredModel.from_pretrained(model, sae=sae or None, vector=vector or None, layer=layer,
                                           **kwargs)
    if steered.can_steer:
        return steered, None
    if not placeholder_if_missing:
        return steered, "No SAE and steering vector are available for this model: steering is off."
    d = hidden_size(steered.model)
    n_layers = steered.model.config.get_text_config().num_hidden_layers
    at = layer if layer is not None else n_layers // 2
    placeholder_sae = SparseAutoencoder.random(d, 4 * d, hook_name=f"blocks.{at}.hook_resid_post")
    w = torch.randn(4 * d, generator=torch.Generator().manual_seed(0))
    placeholder_vector = SteeringVector.from_dense(w, top_k=64)
    steered = SteeredModel(steered.model, steered.tokenizer, placeholder_sae, placeholder_vector,
                           config=steered.config)
    return steered, ("**Placeholder steering:** no trained SAE / vector was found for this model "
                     "(hub_artifacts/ is empty), so a *random* SAE and vector stand in. The answers "
                     "change, but not towards safety.")


def chat_prompt_ids(engine: BatchEngine, history: list[dict[str, str]], message: str) -> list[int]:
    """Token ids of ``history + [user message]`` through the chat template, ready to answer."""
    messages = [{"role": m["role"], "content": _text(m["content"])} for m in history]
    messages.append({"role": "user", "content": message})
    return engine.encode_chat(messages)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # gradio's [{"type": "text", "text": ...}] parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


@dataclass
class DemoSettings:
    """The demo's controls."""

    enabled: bool = True
    """Steering on or off for the steered column."""
    steps: int = 3
    """Gradient steps per token."""
    strength: float = 0.25
    """Step size (``lr``)."""
    positions: str = "generated"
    """Which positions to steer."""
    max_new_tokens: int = 96
    """Answer length limit."""
    temperature: float = 0.0
    """0 = greedy (both columns then differ only by steering)."""
    seed: int = 0
    """Sampling seed, shared by both columns."""


def message_gate(engine: BatchEngine, prompt_ids: list[int], settings: DemoSettings) -> GateDecision:
    """What the steered column does with the chat prompt ``prompt_ids`` under ``settings``: the
    gate's decision with its score and threshold (read from the loaded model, computed by the gate's
    own scoring on the same SAE features steering uses), or why no gate is consulted. The steered
    column's answer is the unsteered one exactly when ``steers`` is False."""
    return gate_decision(engine.steered, prompt_ids, enabled=settings.enabled, steps=settings.steps,
                         lr=settings.strength)


def gate_log(entries: list[tuple[str, str]], max_chars: int = 80) -> str:
    """Markdown list of ``(message, gate line)``, one item per message of the conversation."""
    if not entries:
        return ""
    items = []
    for i, (message, line) in enumerate(entries, 1):
        text = " ".join(message.split())
        text = text if len(text) <= max_chars else text[:max_chars - 1] + "…"
        items.append(f"{i}. “{_md_escape(text)}”: {line}")
    return "**Gate, per message** (steered column)\n\n" + "\n".join(items)


def _md_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\`*_[]<>#|~" else c for c in text)


@dataclass
class Side:
    """One column's answer so far."""

    text: str = ""
    traces: list[TokenTrace | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class CompareSnapshot:
    """Both answers as they stand."""

    plain: Side
    steered: Side

    @property
    def done(self) -> bool:
        return self.plain.done and self.steered.done


def compare_stream(engine: BatchEngine, prompt_ids: list[int], settings: DemoSettings,
                   steered_prompt_ids: list[int] | None = None) -> Iterator[CompareSnapshot]:
    """Answer ``prompt_ids`` unsteered and steered (submitted together, so they share a batch) and
    yield a snapshot after every event. ``steered_prompt_ids`` gives the steered column its own
    prompt (a multi-turn chat whose columns have diverged). Stopping the iteration cancels both."""
    events: queue.Queue = queue.Queue()
    common = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                  seed=settings.seed, positions=settings.positions, trace=True)
    on = settings.enabled and engine.steered.can_steer
    plain_req = GenerationRequest(prompt_ids, steps=0, lr=0.0, **common)
    steered_req = GenerationRequest(steered_prompt_ids or prompt_ids, steps=settings.steps if on else 0,
                                    lr=settings.strength if on else 0.0, **common)
    snap = CompareSnapshot(Side(), Side())

    def listener(which: Side):
        return lambda stream, event: events.put((which, event))

    streams: list[RequestStream] = [engine.submit(plain_req, on_event=listener(snap.plain)),
                                    engine.submit(steered_req, on_event=listener(snap.steered))]
    try:
        while not snap.done:
            side, event = events.get()
            if isinstance(event, TokenEvent):
                side.text += event.text
                side.traces.append(event.trace)
            elif isinstance(event, FinishEvent):
                side.text, side.finish_reason = event.text, event.finish_reason
            elif isinstance(event, ErrorEvent):
                side.error = f"{type(event.error).__name__}: {event.error}"
            yield snap
    finally:
        for s in streams:
            s.cancel()


def score_series(snap: CompareSnapshot) -> dict[str, list[float]]:
    """Per-token ``encode(h) . w``: the unsteered answer, and the steered answer before/after steering."""
    def col(side: Side, attr: str) -> list[float]:
        return [getattr(t, attr) for t in side.traces if t is not None]

    return {"unsteered answer": col(snap.plain, "score_before"),
            "steered answer, before steering": col(snap.steered, "score_before"),
            "steered answer, after steering": col(snap.steered, "score_after")}


def score_figure(snap: CompareSnapshot, title: str = "Steered-feature score encode(h) · w per token"):
    """A matplotlib figure of :func:`score_series`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    styles = {"unsteered answer": dict(color="#7f7f7f", lw=1.5),
              "steered answer, before steering": dict(color="#d62728", lw=1.2, ls="--"),
              "steered answer, after steering": dict(color="#1f77b4", lw=1.8)}
    for name, ys in score_series(snap).items():
        if ys:
            ax.plot(range(len(ys)), ys, label=name, marker=".", ms=3, **styles[name])
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("generated token")
    ax.set_ylabel("encode(h) · w")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    plt.close(fig)  # gradio renders it; keep pyplot's registry empty
    return fig


FEATURE_COLUMNS = ["feature", "weight in vector", "mean act. before steering",
                   "mean act. after steering", "mean act. unsteered answer"]


def feature_table(snap: CompareSnapshot, vector: Any | None, k: int = 10) -> list[list[Any]]:
    """The ``k`` SAE features most active over the steered answer (before or after steering), with
    their weight in the steering vector and mean activations; rows match :data:`FEATURE_COLUMNS`.
    Means count a feature as 0 on tokens where it was not among the top features traced."""
    def means(traces: list[TokenTrace | None], before: bool) -> dict[int, float]:
        sums: dict[int, float] = {}
        ts = [t for t in traces if t is not None]
        for t in ts:
            for f, v in (t.top_features_before if before else t.top_features):
                sums[f] = sums.get(f, 0.0) + v
        return {f: s / max(len(ts), 1) for f, s in sums.items()}

    before, after = means(snap.steered.traces, True), means(snap.steered.traces, False)
    plain = means(snap.plain.traces, True)
    weights: dict[int, float] = {}
    if vector is not None:
        idx, vals = vector.support()
        weights = dict(zip(idx.tolist(), vals.tolist()))
    ranked = sorted(set(before) | set(after), key=lambda f: -max(before.get(f, 0), after.get(f, 0)))
    return [[f, round(weights.get(f, 0.0), 4), round(before.get(f, 0.0), 4),
             round(after.get(f, 0.0), 4), round(plain.get(f, 0.0), 4)] for f in ranked[:k]]


def summary(snap: CompareSnapshot) -> str:
    """One line: tokens and mean score of each column."""
    s = score_series(snap)

    def mean(xs: list[float]) -> str:
        return f"{sum(xs) / len(xs):+.3f}" if xs else "n/a"

    return (f"unsteered: {len(snap.plain.traces)} tokens, mean score {mean(s['unsteered answer'])} · "
            f"steered: {len(snap.steered.traces)} tokens, mean score before "
            f"{mean(s['steered answer, before steering'])} → after "
            f"{mean(s['steered answer, after steering'])}")

"""What a caller hands the engine and gets back: requests, events, streams and results.

A :class:`GenerationRequest` carries one prompt with its own sampling and steering settings (the
steering ones checked by :class:`~steerplug.steering.SteeringConfig`'s rules); the engine answers
with :class:`TokenEvent` s and one :class:`FinishEvent` (or an :class:`ErrorEvent`) on the
request's :class:`RequestStream`, which a caller iterates (sync or async) or collects into a
:class:`Completion`.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from steerplug.steering import check_steering


@dataclass
class GenerationRequest:
    """One prompt to continue, with its own sampling and steering settings."""

    prompt_ids: list[int]
    """Token ids of the prompt (chat template already applied)."""
    max_new_tokens: int = 64
    """Upper bound on generated tokens."""
    temperature: float = 0.0
    """0 = greedy; otherwise softmax temperature. Below
    :data:`~steerplug.batching.sampling.MIN_TEMPERATURE` it is greedy too (``logits / 1e-300``
    overflows to inf, and softmax to NaN)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Seed of this row's sampling generator (None: drawn from the global generator)."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer (not included in it)."""
    steps: int = 0
    """Steering steps per token; 0 = unsteered (:attr:`SteeringConfig.steps`, checked by its rule)."""
    lr: float = 0.0
    """Steering step size; 0 = unsteered (:attr:`SteeringConfig.lr`, checked by its rule)."""
    positions: str = "generated"
    """Which positions to steer (:attr:`SteeringConfig.positions`, checked by its rule)."""
    answer_tokens: int | None = None
    """Steer only the positions predicting the first ``answer_tokens`` answer tokens, then decode
    this row unsteered; None: the whole answer (:attr:`SteeringConfig.answer_tokens`, checked by
    its rule). The request's value holds, not the steered model's config."""
    trace: bool = False
    """Report, per generated token, the feature score before/after steering and the top features."""

    def __post_init__(self) -> None:
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        if not self.prompt_ids:
            raise ValueError("GenerationRequest.prompt_ids is empty: expected at least one token.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"GenerationRequest.max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1.")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"GenerationRequest.temperature={self.temperature!r}: expected a number in [0, 100].")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationRequest.top_p={self.top_p!r}: expected a number in (0, 1].")
        check_steering("GenerationRequest", steps=self.steps, lr=self.lr, positions=self.positions,
                       answer_tokens=self.answer_tokens)
        self.stop = tuple(s for s in self.stop if s)

    @property
    def steered(self) -> bool:
        return self.steps > 0 and self.lr > 0


@dataclass
class TokenTrace:
    """Diagnostics for one generated token, at the position that predicted it."""

    score_before: float
    """``encode(h) . w`` of the activation before steering."""
    score_after: float
    """``encode(h) . w`` after steering (equal to before for an unsteered row)."""
    top_features: list[tuple[int, float]]
    """The most active SAE features after steering, ``(index, activation)``, largest first."""
    top_features_before: list[tuple[int, float]]
    """The same before steering."""


@dataclass
class TokenEvent:
    """A generated token and the text it adds (may be empty while a character is incomplete)."""

    token_id: int
    text: str
    trace: TokenTrace | None = None


@dataclass
class FinishEvent:
    """The end of a request."""

    finish_reason: str
    """``stop`` (end-of-sequence token or stop string), ``length`` or ``cancelled``."""
    text: str
    """The whole answer."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    """Generation failed; the exception that ended it."""

    error: BaseException


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class Completion:
    """The collected result of one request (see :meth:`RequestStream.result`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    traces: list[TokenTrace | None]


class RequestStream:
    """A submitted request: iterate it (sync or async) for events, or call :meth:`result`."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None,
                 on_event: Callable[[RequestStream, Event], None] | None = None):
        self.request = request
        self.cancelled = False
        self._on_cancel: Callable[[RequestStream], None] | None = None
        """Set by the engine: takes a cancelled request that is still queued out of the queue."""
        self._loop = loop
        self._on_event = on_event
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.Queue | None = None if loop is not None or on_event else queue.Queue()

    def _put(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(self, event)
        elif self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled = True
        else:
            self._queue.put(event)

    def cancel(self) -> None:
        """Stop generating for this request: a queued one ends now, a running row leaves the batch at
        the next step; either way the stream ends with ``FinishEvent(finish_reason="cancelled")``."""
        if self.cancelled:
            return
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel(self)

    def _cancelled_event(self) -> FinishEvent:
        return FinishEvent("cancelled", "", len(self.request.prompt_ids), 0)

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise TypeError("This stream was submitted with an event loop or on_event: use "
                            "'async for' or the callback.")
        while True:
            event = self._queue.get()
            yield event
            if not isinstance(event, TokenEvent):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._aqueue is None:
            raise TypeError("This stream was submitted without an event loop: use 'for'.")
        while True:
            event = await self._aqueue.get()
            yield event
            if not isinstance(event, TokenEvent):
                return

    @staticmethod
    def _collect(events: list[Event], request: GenerationRequest) -> Completion:
        last = events[-1]
        if isinstance(last, ErrorEvent):
            raise last.error
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        return Completion(last.text, [e.token_id for e in tokens], last.finish_reason,
                          last.prompt_tokens, [e.trace for e in tokens])

    def result(self) -> Completion:
        """Block until the request finishes; raise its error if it failed."""
        return self._collect(list(self), self.request)

    async def aresult(self) -> Completion:
        return self._collect([e async for e in self], self.request)

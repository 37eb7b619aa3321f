"""One row's answer as streamed text: tokens to text, stop strings, and what is safe to send yet.

A :class:`Row` is one request in the running batch. Each new token is decoded with the tokens
before it (a tokenizer may merge them into one character), checked against the end-of-sequence ids,
the request's stop strings and its token budget, and only the text that can no longer change is
sent: an incomplete UTF-8 character (``\\ufffd`` at the end) and anything that could still grow
into a stop string are held back until the next token or the end.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from steerplug.batching.requests import FinishEvent, GenerationRequest, RequestStream, TokenEvent, TokenTrace


@dataclass
class Row:
    """The decode state of one request in the batch."""

    stream: RequestStream
    generator: torch.Generator | None
    """The row's own sampling generator (None: greedy)."""
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0
    """Characters of the answer already sent."""
    done: str | None = None
    """The finish reason once finished (``stop``, ``length``, ``cancelled``, ``error``)."""
    text: str = ""
    gate_on: bool = True
    """Whether the steered model's gate fired on this row's prompt."""

    @property
    def req(self) -> GenerationRequest:
        return self.stream.request

    def append(self, token: int, trace: TokenTrace | None, decode: Callable[..., str],
               eos_ids: Collection[int]) -> None:
        """Add ``token``, send the text it makes safe to send, and finish the row at an
        end-of-sequence token, a stop string or the token budget. ``decode(ids, **kw)`` is the
        engine's thread-safe tokenizer decode."""
        if token in eos_ids:
            self.done = "stop"
            self.finish(last=(token, trace))
            return
        self.tokens.append(token)
        text = decode(self.tokens, skip_special_tokens=True)
        cut = find_stop(text, self.req.stop)
        if cut is not None:
            self.text, self.done = text[:cut], "stop"
        elif len(self.tokens) >= self.req.max_new_tokens:
            self.text, self.done = text, "length"
        else:
            self.text = text
        if self.done is not None:
            self.finish(last=(token, trace))
            return
        # Hold back an incomplete character and anything that could start a stop string.
        ready = len(text.rstrip("\ufffd"))
        if self.req.stop:
            ready = min(ready, len(text) - max(len(s) for s in self.req.stop) + 1)
        delta = text[self.emitted:ready] if ready > self.emitted else ""
        self.emitted += len(delta)
        self.stream._put(TokenEvent(token, delta, trace))

    def finish(self, last: tuple[int, TokenTrace | None] | None = None) -> None:
        """Send the rest of the text (with the last token, if any) and the :class:`FinishEvent`."""
        if last is not None:
            tail = self.text[self.emitted:]
            self.emitted = len(self.text)
            self.stream._put(TokenEvent(last[0], tail, last[1]))
        self.stream._put(FinishEvent(self.done, self.text, len(self.req.prompt_ids), len(self.tokens)))


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first of ``stops`` starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None

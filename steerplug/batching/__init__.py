"""Continuous batching for a :class:`~steerplug.SteeredModel`: many requests, one decode loop.

The serving engine, in five rooms:

- :mod:`~steerplug.batching.requests`: what callers hand in and get back (requests, events,
  streams, results);
- :mod:`~steerplug.batching.scheduler`: :class:`BatchEngine`, the background thread that admits
  requests between decode steps and runs each step with every row's own steering;
- :mod:`~steerplug.batching.cache`: the KV-cache surgery that lets rows join and leave a running
  batch, the one module touching transformers' cache internals (behind a check);
- :mod:`~steerplug.batching.sampling`: each row's next token (greedy, or transformers' temperature
  and top-p warpers with the row's own generator);
- :mod:`~steerplug.batching.streaming`: each row's tokens as text, stop strings, what to send.

No cross-talk: every per-token operation (attention under the row's own mask and position ids, the
steering step, sampling with the row's own generator) is row-wise. What batching can change is the
floating-point summation order inside matrix products (a few 1e-7 in float32), so a greedy answer
equals the same request served alone except where two logits tie to that precision;
``tests/test_serve.py`` checks 32 concurrent mixed requests against their solo runs.

Rows join only when the model's KV cache is a plain one (every layer a ``DynamicLayer``, which is
what a ``DynamicCache`` built without a config holds); models that need another cache type run each
admitted group to completion before admitting the next.
"""

from steerplug.batching.requests import (Completion, ErrorEvent, Event, FinishEvent, GenerationRequest,
                                         RequestStream, TokenEvent, TokenTrace)
from steerplug.batching.sampling import MIN_TEMPERATURE
from steerplug.batching.scheduler import BatchEngine, collect_all

__all__ = ["MIN_TEMPERATURE", "BatchEngine", "Completion", "ErrorEvent", "Event", "FinishEvent",
           "GenerationRequest", "RequestStream", "TokenEvent", "TokenTrace", "collect_all"]

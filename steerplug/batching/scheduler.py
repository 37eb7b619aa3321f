"""The scheduler: a background thread that owns the model and runs one decode loop for many requests.

Requests wait in a queue; the thread admits them into the running batch between decode steps
(prefilling the newcomers together, left-padded, a long prompt in chunks between decode steps
(:mod:`steerplug.batching.prefill`), then joining their KV cache to the batch's through
:mod:`steerplug.batching.cache`), takes one decode step for every live row with each row's own
steering (per-row ``row_lr`` / ``row_steps`` in :class:`~steerplug.hooks.CallState`), picks each
row's token (:mod:`steerplug.batching.sampling`), streams its new text
(:mod:`steerplug.batching.streaming`) and drops rows as they finish.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from steerplug.batching import cache as kv
from steerplug.batching import prefill, sampling, tracing
from steerplug.batching.prefill import PrefillJob
from steerplug.batching.requests import (Completion, ErrorEvent, Event, GenerationRequest, RequestStream,
                                         TokenTrace)
from steerplug.batching.streaming import Row
from steerplug.hooks import CallState
from steerplug.steering import SteeringError

logger = logging.getLogger(__name__)


class BatchEngine:
    """Serve :class:`GenerationRequest` s from a background thread with continuous batching.

    >>> engine = BatchEngine(steered, max_batch=16).start()
    >>> engine.submit(GenerationRequest(ids, steps=3, lr=0.3)).result().text

    While it decodes, the engine's hooks sit on ``steered.model``: do not run the same model from
    another thread meanwhile (submit to the engine instead).
    """

    def __init__(self, steered: Any, *, max_batch: int = 16, batch_wait_s: float = 0.005,
                 max_waiting: int | None = None, trace_top_k: int = 5, prefill_chunk: int = 512):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}: expected an integer >= 1.")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r}: expected an integer >= 1 (tokens per prefill pass).")
        self.steered = steered
        self.model = steered.model
        self.tokenizer = steered.tokenizer
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_waiting = max_waiting
        self.trace_top_k = trace_top_k
        self.prefill_chunk = prefill_chunk
        """Most prompt tokens (rows x padded length) in one prefill pass; longer prompts go in chunks."""
        self.pad_id = self._pad_id()
        self.eos_ids = self._eos_ids()
        self._cache_kw, self._logits_kw = kv.forward_kwargs(self.model)
        self._waiting: deque[RequestStream] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Counters: forward passes, the largest batch, requests admitted, requests that joined a
        # batch already decoding.
        self.stats = {"forward_calls": 0, "max_rows": 0, "requests": 0, "joined": 0}
        self._running = 0  # rows in the batch being decoded
        # A fast tokenizer must not be used from two threads at once ("Already borrowed"). The
        # engine decodes on its thread; callers encode on theirs with a copy and its own lock, so a
        # long prompt being encoded never holds up the decode loop.
        self.tokenizer_lock = threading.Lock()
        try:
            self._encoder, self._encode_lock = copy.deepcopy(self.tokenizer), threading.Lock()
        except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied is shared
            self._encoder, self._encode_lock = self.tokenizer, self.tokenizer_lock

    # --- public API -------------------------------------------------------------------------------
    def start(self) -> BatchEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="steerplug-batch", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 10) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> BatchEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet admitted to the batch."""
        return len(self._waiting)

    @property
    def load(self) -> int:
        """Requests waiting or being decoded."""
        return len(self._waiting) + self._running

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None,
               on_event: Callable[[RequestStream, Event], None] | None = None) -> RequestStream:
        """Queue ``request``. Its events go to ``on_event(stream, event)`` (called on the engine
        thread) if given, else to an asyncio queue on ``loop`` if given, else to a thread queue."""
        stream = RequestStream(request, loop, on_event)
        stream._on_cancel = self._unqueue
        with self._cond:
            if self._closed:
                raise RuntimeError("The batch engine is closed.")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise OverflowError(f"{len(self._waiting)} requests are already waiting (max_waiting="
                                    f"{self.max_waiting}).")
            self._waiting.append(stream)
            self._cond.notify_all()
        if self._thread is None:
            self.start()
        return stream

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (thread-safe)."""
        with self._encode_lock:
            return list(self._encoder(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the chat template, ready to answer (thread-safe)."""
        with self._encode_lock:
            enc = self._encoder.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)
        return list(enc["input_ids"])

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        """Text of ``ids`` (thread-safe)."""
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, **kwargs)

    def generate(self, request: GenerationRequest) -> Completion:
        """Submit and wait (the request may share its batch with others)."""
        return self.submit(request).result()

    # --- the loop ---------------------------------------------------------------------------------
    def _take(self, n: int) -> list[RequestStream]:
        """Up to ``n`` waiting requests, first come first served, ending cancelled ones."""
        taken: list[RequestStream] = []
        with self._cond:
            while self._waiting and len(taken) < n:
                stream = self._waiting.popleft()
                if stream.cancelled:
                    stream._put(stream._cancelled_event())
                else:
                    taken.append(stream)
        return taken

    def _unqueue(self, stream: RequestStream) -> None:
        """A queued request was cancelled: out of the queue, and its caller hears so now."""
        with self._cond:
            try:
                self._waiting.remove(stream)
            except ValueError:
                return  # already taken: the loop ends it at its next step
        stream._put(stream._cancelled_event())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for stream in self._waiting:
                        stream._put(ErrorEvent(RuntimeError("The batch engine was closed.")))
                    self._waiting.clear()
                    return
            if self.batch_wait_s:
                time.sleep(self.batch_wait_s)  # let a burst of concurrent requests arrive together
            first = self._take(self.max_batch)
            if not first:
                continue
            try:
                self._run(first)
            except BaseException:  # KeyboardInterrupt, SystemExit...: the engine stops, no caller hangs
                with self._cond:
                    self._closed = True
                    for stream in self._waiting:
                        stream._put(ErrorEvent(RuntimeError("The batch engine stopped.")))
                    self._waiting.clear()
                raise

    @torch.inference_mode()
    def _run(self, streams: list[RequestStream]) -> None:
        """Decode until no row is left, admitting newcomers between steps while the cache allows.

        Newcomers become :class:`~steerplug.batching.prefill.PrefillJob` s, one per ``positions``
        value and ``prefill_chunk`` tokens. A job that fits one pass is prefilled at once; a longer
        prompt runs one chunk per loop turn, and while rows are decoding only when the decode steps
        have had as much time as its chunks (so neither side starves). ``positions`` only matters for
        the prompt: in decode steps a ``prompt`` row is simply not steered (``generated`` and ``all``
        both steer the one new position), so all of them share the batch. ``answer_tokens`` is per
        row too: the prefill's last position predicts answer token 1, so the prefill is steered as
        without it, and a decode step steers a row only while the position it feeds predicts one of
        the row's first ``answer_tokens`` tokens.
        """
        rows: list[Row] = []
        cache = mask = pos = last = None
        jobs: list[PrefillJob] = []  # admitted, still prefilling
        ready: list[tuple[PrefillJob, tuple]] = []  # prefilled, waiting for a cache they can join
        credit = 0.0  # decode time not yet matched by chunk time (<= 0)
        newcomers = streams
        try:
            while True:
                jobs += self._jobs(newcomers)
                newcomers = []
                for job in [j for j in jobs if j.cancelled]:
                    jobs.remove(job)
                    self._end_rows(job.rows, "cancelled")
                for job in [j for j in jobs if j.width * len(j.rows) <= self.prefill_chunk]:
                    result = self._prefill(job)  # the job stays listed until it is done: a failure reaches its rows
                    jobs.remove(job)
                    ready.append((job, result))
                if jobs and (not rows or credit >= 0):
                    t0 = time.perf_counter()
                    done = self._prefill_chunk(jobs[0])
                    if rows:
                        credit -= time.perf_counter() - t0
                    if done is not None:
                        ready.append((jobs.pop(0), done))
                for job, (n_cache, n_mask, n_pos, n_last) in list(ready):
                    if rows and not kv.joinable(cache):  # this cache cannot grow: wait for a drain
                        continue
                    ready.remove((job, (n_cache, n_mask, n_pos, n_last)))
                    if rows:
                        self.stats["joined"] += len(job.rows)
                        cache, mask = kv.join(cache, mask, n_cache, n_mask)
                        pos, last = torch.cat([pos, n_pos]), torch.cat([last, n_last])
                    else:
                        cache, mask, pos, last = n_cache, n_mask, n_pos, n_last
                    rows += job.rows
                    self.stats["requests"] += len(job.rows)
                keep = [i for i, r in enumerate(rows) if r.done is None and not r.stream.cancelled]
                self._end_rows([r for r in rows if r.done is None and r.stream.cancelled], "cancelled")
                if len(keep) < len(rows):
                    idx = torch.tensor(keep, dtype=torch.long, device=last.device)
                    rows = [rows[i] for i in keep]
                    if not rows:
                        cache = mask = pos = last = None
                    else:
                        kv.select_rows(cache, idx)
                        mask, pos, last = mask[idx], pos[idx], last[idx]
                        cache, mask = kv.trim_left(cache, mask)
                pending = [r for j in jobs for r in j.rows] + [r for j, _ in ready for r in j.rows]
                self._running = len(rows) + len(pending)
                if self._closed:  # close() during a decode: end the rows in flight, now
                    for r in rows + pending:
                        r.stream._put(ErrorEvent(RuntimeError("The batch engine was closed.")))
                    return
                room = self.max_batch - len(rows) - len(pending)
                newcomers = self._take(room) if room > 0 and kv.joinable(cache) else []
                if not rows:
                    if not newcomers and not jobs and not ready:
                        return
                    continue
                t0 = time.perf_counter()
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (B, T + 1)
                logits, traces = self._forward(rows, last.unsqueeze(-1), mask, pos.unsqueeze(-1),
                                               cache, "generated", prefill_len=None)
                pos = pos + 1
                last = self._sample(rows, logits, traces)
                credit = min(0.0, credit + time.perf_counter() - t0) if jobs else 0.0
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear about it
            logger.exception("Batch generation failed")
            pending = [r for j in jobs for r in j.rows] + [r for j, _ in ready for r in j.rows]
            for r in rows + pending:
                if r.done is None:
                    r.stream._put(ErrorEvent(exc))
            for s in newcomers:
                s._put(ErrorEvent(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running = 0

    def _jobs(self, streams: list[RequestStream]) -> list[PrefillJob]:
        by_positions: dict[str, list[RequestStream]] = {}
        for stream in streams:
            by_positions.setdefault(stream.request.positions, []).append(stream)
        return [prefill.make_job([self._new_row(s) for s in group], positions, self.pad_id, self.steered.device)
                for positions, same in by_positions.items() for group in prefill.group(same, self.prefill_chunk)]

    @staticmethod
    def _end_rows(rows: list[Row], reason: str) -> None:
        for r in rows:
            if r.done is None:
                r.done = reason
                r.finish()

    def _new_row(self, stream: RequestStream) -> Row:
        req = stream.request
        return Row(stream, sampling.row_generator(req.temperature, req.seed, self.steered.device))

    def _prefill(self, job: PrefillJob):
        """Prefill ``job`` in one pass; returns its cache, mask, next positions and first tokens."""
        logits, traces = self._forward(job.rows, job.ids, job.mask, job.position_ids, job.cache, job.positions,
                                       prefill_len=job.width)
        return self._prefilled(job, logits, traces)

    def _prefilled(self, job: PrefillJob, logits: torch.Tensor, traces: list):
        first = self._sample(job.rows, logits, traces)
        pos = torch.tensor(job.lengths, dtype=torch.long, device=job.ids.device)  # (B,)
        return job.cache, job.mask, pos, first

    def _prefill_chunk(self, job: PrefillJob):
        """One ``prefill_chunk`` of ``job`` (the gate's pass first, where it has a gate); after the
        last one, what :meth:`_prefill` returns, else None."""
        width = max(1, self.prefill_chunk // len(job.rows))
        if job.row_on is None and job.done == 0 and self._gated(job):
            prefill.gate_chunk(self.steered, self.model, job, width, self._logits_kw, self._cache_kw)
            return None
        lo, hi = job.done, min(job.width, job.done + width)
        logits, traces = self._forward(job.rows, job.ids[:, lo:hi], job.mask[:, :hi], job.position_ids[:, lo:hi],
                                       job.cache, job.positions, prefill_len=job.width, row_on=job.row_on)
        job.done = hi
        return self._prefilled(job, logits, traces) if hi == job.width else None

    def _gated(self, job: PrefillJob) -> bool:
        return any(r.req.steered for r in job.rows) and self.steered.gate_pass() is not None

    def _forward(self, rows: list[Row], ids, mask, position_ids, cache, positions: str,
                 prefill_len: int | None, row_on: torch.Tensor | None = None):
        """One forward pass with each row's steering; returns last-position logits ``(B, V)`` and
        per-row traces (or Nones)."""
        steered = self.steered
        device = ids.device
        # In decode steps a `positions="prompt"` row is done being steered, and so is a row whose
        # first `answer_tokens` tokens are out: the position fed now (the row's last token) predicts
        # answer token len(r.tokens) + 1.
        on = [r.req.steered and (prefill_len is not None or (
                  r.req.positions != "prompt"
                  and (r.req.answer_tokens is None or len(r.tokens) < r.req.answer_tokens)))
              for r in rows]
        lr = torch.tensor([r.req.lr if o else 0.0 for r, o in zip(rows, on)], device=device)  # (B,)
        steps = torch.tensor([r.req.steps if o else 0 for r, o in zip(rows, on)], device=device)
        max_steps = int(steps.max()) if len(rows) else 0
        if prefill_len is not None:  # the prompt: steer per `positions` with the usual meaning
            state = CallState(gen_start=prefill_len - 1, prompt_end=prefill_len)
        else:  # a decode step: every new position predicts a token, none is prompt
            state = CallState(gen_start=0, prompt_end=0)
        state.row_lr, state.row_steps = lr, steps
        state.isolate_rows = True  # a row whose steering goes NaN/inf fails alone
        if prefill_len is None:  # decode steps keep each row's gate decision from its prompt
            state.row_on = torch.tensor([r.gate_on for r in rows], device=device)
        elif row_on is not None:  # a chunked prompt: the gate has read all of it already
            state.row_on, state.gate_given = row_on, True
        # answer_tokens is applied per row above (the prefill's positions all predict the prompt or
        # answer token 1, inside any cut); the model's own default must not cut the decode steps,
        # whose CallState starts at 0.
        config = replace(steered.config, steps=max_steps, positions=positions, answer_tokens=None)
        want_trace = steered.can_steer and any(r.req.trace for r in rows)
        captured: dict[str, torch.Tensor] = {}
        before = tracing.capture(steered.hook_point, "before", captured) if want_trace else None
        try:
            with steered.steering(state, config):
                after = tracing.capture(steered.hook_point, "after", captured) if want_trace else None
                try:
                    out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                     use_cache=True, **self._logits_kw, **{self._cache_kw: cache})
                finally:
                    if after is not None:
                        after.remove()
        finally:
            if before is not None:
                before.remove()
        if state.bad_rows is not None:
            for r, bad in zip(rows, state.bad_rows.tolist()):
                if bad and r.done is None:
                    r.done = "error"
                    r.stream._put(ErrorEvent(SteeringError(
                        f"Steering produced NaN or inf activations for this request (lr={r.req.lr}, "
                        f"steps={r.req.steps}); lower them. Other requests in the batch are unaffected.")))
        if prefill_len is not None and state.row_on is not None:
            for r, fired in zip(rows, state.row_on.tolist()):
                r.gate_on = bool(fired)
        self.stats["forward_calls"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        logits = out.logits[:, -1].float()  # (B, V)
        traces: list[TokenTrace | None] = [None] * len(rows)
        if want_trace:
            traces = tracing.traces(self.steered, rows, captured["before"], captured["after"], self.trace_top_k)
        return logits, traces

    def _sample(self, rows: list[Row], logits: torch.Tensor, traces: list) -> torch.Tensor:
        """Pick each row's next token, emit it, mark finished rows; returns ``(B,)`` tokens."""
        next_ids = logits.argmax(dim=-1)  # (B,)
        for i, r in enumerate(rows):
            if r.req.temperature >= sampling.MIN_TEMPERATURE:
                try:
                    next_ids[i] = sampling.sample_row(logits[i], r.req.temperature, r.req.top_p, r.generator)
                except Exception as exc:  # noqa: BLE001 - this row's failure; the others go on
                    logger.exception("Sampling failed for one request")
                    r.done = "error"
                    r.stream._put(ErrorEvent(exc))
        for i, r in enumerate(rows):
            if r.done is not None:
                continue
            r.append(int(next_ids[i]), traces[i], self.decode, self.eos_ids)
        return next_ids

    # --- model facts --------------------------------------------------------------------------------
    def _pad_id(self) -> int:
        for v in (getattr(self.tokenizer, "pad_token_id", None),
                  getattr(self.model.generation_config, "pad_token_id", None),
                  getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(v, int):
                return v
        return 0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for v in (getattr(self.tokenizer, "eos_token_id", None),
                  getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
        return ids


# --- helpers ----------------------------------------------------------------------------------------
def collect_all(engine: BatchEngine, requests: list[GenerationRequest]) -> list[Completion]:
    """Submit ``requests`` at once and wait for all of them (a convenience for scripts and tests)."""
    streams = [engine.submit(r) for r in requests]
    return [s.result() for s in streams]

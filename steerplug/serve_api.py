"""The OpenAI API that ``steerplug serve`` speaks: its limits, request bodies and errors, and the
translation between it and the batching engine.

:class:`ServeConfig` holds one server's limits and defaults; the pydantic models are the bodies of
``/v1/chat/completions`` and ``/v1/completions`` (OpenAI's fields plus ``steering``); an
:class:`APIError` renders as OpenAI's error body. :class:`RequestHandler` turns a validated body into
:class:`~steerplug.batching.GenerationRequest` s (steering settings checked by
:class:`~steerplug.steering.SteeringConfig`'s own rules, then against the server's limits) and the
engine's events into OpenAI responses and server-sent chunks. The app around it (routes,
middleware, lifespan) and the command are :mod:`steerplug.serve`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from steerplug.batching import BatchEngine, ErrorEvent, FinishEvent, GenerationRequest, RequestStream, TokenEvent
from steerplug.steering import SteeringValueError, check_steering

try:  # fastapi and pydantic are optional: `pip install steerplug[serve]`
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "steerplug.serve needs fastapi and uvicorn: pip install fastapi uvicorn"
    ) from _exc


# --- configuration ------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    """Limits and defaults of one server."""

    model_name: str = "steerplug"
    """The id clients pass as ``model`` and ``/v1/models`` lists."""
    api_key: str | None = None
    """If set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``."""
    max_tokens: int = 512
    """Largest ``max_tokens`` a request may ask for."""
    default_max_tokens: int = 128
    """``max_tokens`` when a request gives none (capped at ``max_tokens``)."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens."""
    max_concurrency: int = 64
    """Requests in flight (running or waiting) before new ones get HTTP 429."""
    max_batch: int = 16
    """Rows decoded together in one forward pass."""
    max_steps: int = 20
    """Largest per-request steering ``steps``."""
    max_choices: int = 16
    """Largest ``n`` x number of prompts in one request."""
    max_strength: float = 10.0
    """Largest per-request steering ``strength`` (``lr``); larger values only break the activations."""
    max_body_bytes: int = 1_000_000
    """Largest request body; a larger one gets HTTP 413 before it is read."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "default_max_tokens", "max_prompt_tokens", "max_concurrency",
                     "max_batch", "max_steps", "max_choices", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name}={value!r}: expected an integer >= 1.")
        if not (isinstance(self.max_strength, (int, float)) and 0 < self.max_strength < float("inf")):
            raise ValueError(f"ServeConfig.max_strength={self.max_strength!r}: expected a finite number > 0.")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=_error_body(
            self.message, self.type, self.param, self.code))


def clip_text(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: error messages never echo a whole oversized input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_text(text: str, param: str) -> None:
    """400 for text no tokenizer can take: a lone UTF-16 surrogate (valid JSON, invalid Unicode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param}: holds a lone surrogate {text[exc.start]!r} at character {exc.start}, "
                            "which is not valid Unicode; send the character as one code point or as a "
                            "surrogate pair.", param=param) from None


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- request bodies ------------------------------------------------------------------------------
class SteeringOptions(BaseModel):
    """The ``steering`` object of a request body: types only. A missing field takes the served
    model's :class:`~steerplug.steering.SteeringConfig` value, and the values are checked by
    SteeringConfig's own rules (``RequestHandler.steering``), then against :class:`ServeConfig`'s limits."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    steps: int | None = None
    strength: float | None = Field(default=None, allow_inf_nan=False)
    """Alias of ``lr`` (SteeringConfig.lr)."""
    lr: float | None = Field(default=None, allow_inf_nan=False)
    positions: str | None = None
    answer_tokens: int | None = None
    """Steer only the positions predicting the first N answer tokens (SteeringConfig.answer_tokens).
    Missing: the served model's value; an explicit ``null``: the whole answer."""


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logprobs: Any = None
    steering: SteeringOptions | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class RequestHandler:
    """Turns validated bodies into engine requests and engine events into OpenAI responses."""

    def __init__(self, steered: Any, engine: BatchEngine, config: ServeConfig):
        self.steered, self.engine, self.config = steered, engine, config
        self.tokenizer = steered.tokenizer
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created,
                "owned_by": "steerplug"}

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                                f"{self.config.model_name!r}.", param="model", code="model_not_found")

    # --- request -> engine -------------------------------------------------------------------------
    def steering(self, opts: SteeringOptions | None) -> dict[str, Any]:
        base = self.steered.config
        opts = opts or SteeringOptions()
        if opts.strength is not None and opts.lr is not None and opts.strength != opts.lr:
            raise APIError(400, f"steering.strength={opts.strength} and steering.lr={opts.lr} disagree; "
                                "they are the same setting, give one.", param="steering.strength")
        enabled = opts.enabled if opts.enabled is not None else True
        if enabled and not self.steered.can_steer:
            if opts.enabled:
                raise APIError(400, "This server has no SAE and steering vector: steering cannot be "
                                    "enabled.", param="steering.enabled")
            enabled = False
        steps = base.steps if opts.steps is None else opts.steps
        lr = next((v for v in (opts.strength, opts.lr) if v is not None), base.lr)
        positions = base.positions if opts.positions is None else opts.positions
        answer_tokens = opts.answer_tokens if "answer_tokens" in opts.model_fields_set else base.answer_tokens
        try:  # SteeringConfig's own rules; the server's limits come after
            check_steering("steering", steps=steps, lr=lr, positions=positions, answer_tokens=answer_tokens)
        except SteeringValueError as exc:
            name = "strength" if exc.field == "lr" else exc.field
            raise APIError(400, str(exc), param=f"steering.{name}") from None
        if lr > self.config.max_strength:
            raise APIError(400, f"steering.strength={clip_text(repr(lr))} exceeds this server's limit of "
                                f"{self.config.max_strength}.", param="steering.strength")
        if steps > self.config.max_steps:
            raise APIError(400, f"steering.steps={steps} exceeds this server's limit of "
                                f"{self.config.max_steps}.", param="steering.steps")
        if not enabled:
            steps, lr = 0, 0.0
        return {"enabled": enabled and steps > 0 and lr > 0, "steps": steps, "strength": lr,
                "positions": positions, "answer_tokens": answer_tokens}

    def prompts(self, body: _Common, chat: bool) -> list[list[int]]:
        if chat:
            messages = []
            for i, m in enumerate(body.messages):
                content = m.content
                if isinstance(content, list):
                    parts = []
                    for part in content:
                        if part.get("type") != "text" or not isinstance(part.get("text"), str):
                            raise APIError(400, f"messages[{i}].content: only text parts are supported, "
                                                f"got type {part.get('type')!r}.", param=f"messages.{i}.content")
                        parts.append(part["text"])
                    content = "".join(parts)
                _check_text(content or "", f"messages.{i}.content")
                messages.append({"role": m.role, "content": content or ""})
            try:
                ids = self.engine.encode_chat(messages)
            except Exception as exc:  # template errors (roles, ...) are the client's to fix
                raise APIError(400, f"messages: the chat template rejected them: {exc}",
                               param="messages") from exc
            return [list(ids)]
        prompt = body.prompt
        if isinstance(prompt, str):
            batch: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            batch = [prompt]
        else:
            batch = list(prompt)
        if not batch:
            raise APIError(400, "prompt: is empty.", param="prompt")
        out = []
        vocab = len(self.tokenizer)
        for j, p in enumerate(batch):
            if isinstance(p, str):
                _check_text(p, "prompt" if isinstance(prompt, str) else f"prompt.{j}")
            ids = self.engine.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt: encodes to no tokens.", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must lie in [0, {vocab}).", param="prompt")
            out.append(ids)
        return out

    def requests(self, body: _Common, chat: bool) -> tuple[list[GenerationRequest], dict]:
        self.check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server.", param="logprobs")
        extra = body.model_extra or {}
        for name in _UNSUPPORTED:
            value = extra.get(name)
            if value not in (None, [], {}, "", "none", "auto", {"type": "text"}, 1):
                raise APIError(400, f"{name} is not supported by this server.", param=name)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server (use 0).", param=name)
        max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens
                      or self.config.default_max_tokens)
        if max_tokens > self.config.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of "
                                f"{self.config.max_tokens}.", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stop)}.", param="stop")
        steering = self.steering(body.steering)
        prompts = self.prompts(body, chat)
        for ids in prompts:
            if len(ids) > self.config.max_prompt_tokens:
                raise APIError(400, f"The prompt has {len(ids)} tokens; this server accepts at most "
                                    f"{self.config.max_prompt_tokens}.", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
        if len(prompts) * body.n > self.config.max_choices:
            raise APIError(400, f"n x prompts = {len(prompts) * body.n} exceeds this server's limit of "
                                f"{self.config.max_choices} choices.", param="n")
        reqs = []
        try:
            for ids in prompts:
                for j in range(body.n):
                    reqs.append(GenerationRequest(
                        ids, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        seed=None if body.seed is None else body.seed + j, stop=tuple(stop),
                        steps=steering["steps"], lr=steering["strength"], positions=steering["positions"],
                        answer_tokens=steering["answer_tokens"]))
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        return reqs, steering

    # --- engine -> response --------------------------------------------------------------------------
    async def handle(self, body: _Common, chat: bool, request: Request | None = None):
        reqs, steering = self.requests(body, chat)
        if len(reqs) > self.config.max_concurrency:
            raise APIError(400, f"n x prompts = {len(reqs)} exceeds this server's concurrency limit of "
                                f"{self.config.max_concurrency}: the request can never run; send fewer.",
                           param="n")
        if self.engine.load + len(reqs) > self.config.max_concurrency:
            raise APIError(429, f"The server is busy ({self.engine.load} requests in flight, limit "
                                f"{self.config.max_concurrency}); retry shortly.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded")
        loop = asyncio.get_running_loop()
        streams = [self.engine.submit(r, loop) for r in reqs]
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": self.config.model_name}
        echo = [self.engine.decode(r.prompt_ids) for r in reqs] if getattr(body, "echo", False) else None
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(streams, meta, chat, steering, include_usage, echo),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # uvicorn does not cancel a handler whose client went away: watch for it, and stop generating.
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, streams)) if request else None
        try:
            results = await asyncio.gather(*(s.aresult() for s in streams))
        except BaseException as exc:
            for s in streams:
                s.cancel()
            if isinstance(exc, Exception):
                raise APIError(500, f"Generation failed: {type(exc).__name__}: {exc}",
                               type="server_error") from exc
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        choices = []
        for i, res in enumerate(results):
            text = (echo[i] if echo else "") + res.text
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": res.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": res.finish_reason,
                                "logprobs": None})
        prompt_tokens = sum(len(r.prompt_ids) for r in reqs[::body.n])
        completion_tokens = sum(len([t for t in r.token_ids if t not in self.engine.eos_ids])
                                for r in results)
        return {**meta, "object": "chat.completion" if chat else "text_completion",
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens),
                "steering": steering}

    @staticmethod
    async def _cancel_on_disconnect(request: Request, streams: list[RequestStream], every_s: float = 0.25) -> None:
        while not all(s.cancelled for s in streams):
            await asyncio.sleep(every_s)
            if await request.is_disconnected():
                for s in streams:
                    s.cancel()
                return

    async def _stream(self, streams: list[RequestStream], meta: dict, chat: bool, steering: dict,
                      include_usage: bool, echo: list[str] | None) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            async for event in stream:
                await merged.put((i, event))

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({**meta, "object": obj, "choices": [choice]})

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        open_, prompt_tokens, completion_tokens = len(streams), 0, 0
        try:
            for i in range(len(streams)):
                if chat:
                    yield chunk(i, "", None, first=True)
                elif echo:
                    yield chunk(i, echo[i], None)
            while open_:
                i, event = await merged.get()
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield chunk(i, event.text, None)
                elif isinstance(event, FinishEvent):
                    open_ -= 1
                    completion_tokens += event.completion_tokens
                    prompt_tokens += event.prompt_tokens
                    yield chunk(i, None if chat else "", event.finish_reason)
                elif isinstance(event, ErrorEvent):
                    open_ -= 1
                    err = event.error
                    yield _sse(_error_body(f"Generation failed: {type(err).__name__}: {err}", "server_error"))
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [],
                            "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect: free the rows
            for s in streams:
                s.cancel()
            for t in tasks:
                t.cancel()


# Request fields that would change the answer's meaning and that this server does not implement;
# a request giving them a non-trivial value gets a 400 rather than a silently different answer.
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                "suffix", "best_of", "top_logprobs")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

"""``steerplug serve``: an OpenAI-compatible HTTP server over a :class:`~steerplug.SteeredModel`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream=true`` as
server-sent events in OpenAI's chunk format), ``GET /v1/models``, ``GET /health``. The official
``openai`` client works unchanged; steering is set per request in the body::

    client.chat.completions.create(model=..., messages=[...],
                                   extra_body={"steering": {"enabled": True, "steps": 3, "strength": 0.3}})

``steering`` fields: ``enabled`` (default: on when the server has an SAE), ``steps``, ``strength``
(alias ``lr``), ``positions``; missing fields take the server's defaults. Concurrent requests share
one decode loop (:class:`steerplug.batching.BatchEngine`), each row with its own settings.
Errors come back as OpenAI-style bodies ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status for anything the client can fix.

As in OpenAI's API, ``temperature`` defaults to 1 (sampling); pass ``temperature=0`` for greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from steerplug.batching import (BatchEngine, ErrorEvent, FinishEvent, GenerationRequest,
                                RequestStream, TokenEvent)
from steerplug.model_args import add_steered_model_arguments, steered_model_from_args
from steerplug.steering import POSITIONS

logger = logging.getLogger(__name__)

try:  # fastapi and pydantic are optional: `pip install steerplug[serve]`
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
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


def _clip(text: str, limit: int = 200) -> str:
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
    """The ``steering`` object of a request body."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    steps: int | None = Field(default=None, ge=0)
    strength: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    lr: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    positions: str | None = None


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


class _BodyLimit:
    """ASGI middleware: HTTP 413 for a request body over ``limit`` bytes. A ``Content-Length`` over
    it is refused before any byte is read; a chunked body as soon as it passes the limit."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await APIError(413, self._message(length.decode("latin-1")), code="body_too_large"
                                  ).response()(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, self._message(f"over {seen}"))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: str) -> str:
        return (f"The request body ({_clip(size, 20)} bytes) is larger than this server's limit of "
                f"{self.limit} bytes (ServeConfig.max_body_bytes, --max-body-bytes).")


class _ApiKey:
    """ASGI middleware: every ``/v1`` request needs ``Authorization: Bearer <key>``. (A pure ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` hides a client's disconnect from the handler.)"""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, self.key):
                return await APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key").response()(scope, receive, send)
        await self.app(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------------
def create_app(steered: Any, config: ServeConfig | None = None, *, engine: BatchEngine | None = None,
               **config_kwargs: Any) -> FastAPI:
    """Build the FastAPI app serving ``steered``. ``config`` (or its fields as keyword arguments)
    sets limits and defaults; default steering comes from ``steered.config``. The batching engine
    starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    if config is None:
        config_kwargs.setdefault("model_name", _default_name(steered))
        config = ServeConfig(**config_kwargs)
    elif config_kwargs:
        raise TypeError("Pass either config= or its fields as keyword arguments, not both.")
    engine = engine or BatchEngine(steered, max_batch=config.max_batch)
    server = _Server(steered, engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="steerplug", version=_version(), lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}."
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if "input" in first and not isinstance(first["input"], (dict, list)):
                message += f" (got {_clip(repr(first['input']))})"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, _clip(str(exc.detail), 500),
                        type="invalid_request_error" if exc.status_code < 500 else "server_error",
                        code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        logger.exception("Unhandled error")
        return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    if config.api_key:
        app.add_middleware(_ApiKey, key=config.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "can_steer": bool(steered.can_steer),
                "waiting": engine.waiting, "in_flight": engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.handle(body, chat=True, request=request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.handle(body, chat=False, request=request)

    return app


class _Server:
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
        if positions not in POSITIONS:
            raise APIError(400, f"steering.positions={positions!r}: expected one of {list(POSITIONS)}.",
                           param="steering.positions")
        if lr > self.config.max_strength:
            raise APIError(400, f"steering.strength={_clip(repr(lr))} exceeds this server's limit of "
                                f"{self.config.max_strength}.", param="steering.strength")
        if steps > self.config.max_steps:
            raise APIError(400, f"steering.steps={steps} exceeds this server's limit of "
                                f"{self.config.max_steps}.", param="steering.steps")
        if not enabled:
            steps, lr = 0, 0.0
        return {"enabled": enabled and steps > 0 and lr > 0, "steps": steps, "strength": lr,
                "positions": positions}

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
                        steps=steering["steps"], lr=steering["strength"], positions=steering["positions"]))
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


def _default_name(steered: Any) -> str:
    """The model's Hub id, or the last part of its folder's path."""
    from pathlib import Path

    name = str(getattr(getattr(steered.model, "config", None), "name_or_path", "") or "")
    if name and Path(name).is_dir():
        name = Path(name).name
    return name or "steerplug"


def _version() -> str:
    from steerplug._version import __version__

    return __version__


# --- CLI --------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-name", default=None, help="the model id clients use (default: the model's)")
    add_steered_model_arguments(p, what="default ")
    p.add_argument("--api-key", default=os.environ.get("STEERPLUG_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $STEERPLUG_API_KEY, else none)")
    # The limits: one flag per ServeConfig field, its default and its docstring's first line.
    d = ServeConfig()
    for name, kind, help_ in (("max_tokens", int, "largest max_tokens per request"),
                              ("default_max_tokens", int, "max_tokens when a request gives none"),
                              ("max_prompt_tokens", int, "longest prompt, in tokens"),
                              ("max_concurrency", int, "in-flight requests before HTTP 429"),
                              ("max_batch", int, "rows decoded together"),
                              ("max_steps", int, "largest per-request steering steps"),
                              ("max_choices", int, "largest n x prompts per request"),
                              ("max_strength", float, "largest per-request steering strength"),
                              ("max_body_bytes", int, "largest request body (HTTP 413 above it)")):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{help_} (default: %(default)s)")
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    steered = steered_model_from_args(args)
    config = ServeConfig(
        model_name=args.served_name or _default_name(steered), api_key=args.api_key,
        max_tokens=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_prompt_tokens=args.max_prompt_tokens, max_concurrency=args.max_concurrency,
        max_batch=args.max_batch, max_steps=args.max_steps, max_choices=args.max_choices,
        max_strength=args.max_strength, max_body_bytes=args.max_body_bytes)
    app = create_app(steered, config)
    print(f"Serving {config.model_name} on http://{args.host}:{args.port}/v1 "
          f"(steering: {steered.config if steered.can_steer else 'unavailable, no SAE'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

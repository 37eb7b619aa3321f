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

This module is the app (routes, middleware, lifespan) and the command; the API it speaks (limits,
bodies, errors, and the translation to and from the engine) is :mod:`steerplug.serve_api`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
from typing import Any

from steerplug.batching import BatchEngine
from steerplug.model_args import add_steered_model_arguments, steered_model_from_args
from steerplug.serve_api import (APIError, ChatCompletionRequest, CompletionRequest, RequestHandler, ServeConfig,
                                 brief, clip_text)

try:  # fastapi is optional: `pip install steerplug[serve]` (steerplug.serve_api says so first)
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "steerplug.serve needs fastapi and uvicorn: pip install fastapi uvicorn"
    ) from _exc

__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "ServeConfig", "add_arguments",
           "create_app", "run"]

logger = logging.getLogger(__name__)


class _BodyLimit:
    """ASGI middleware: HTTP 413 for a request body over ``limit`` bytes, 408 for one that does not
    arrive within ``timeout_s`` of the previous part. A ``Content-Length`` over the limit is refused
    before any byte is read; a chunked body as soon as it passes the limit."""

    def __init__(self, app: Any, limit: int, timeout_s: float = 10.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await APIError(413, self._message(length.decode("latin-1")), code="body_too_large"
                                  ).response()(scope, receive, send)
        seen, complete = 0, False

        async def limited() -> dict:
            nonlocal seen, complete
            if complete:  # after the body: the disconnect a handler may wait for, untimed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise StarletteHTTPException(408, f"The request body did not arrive within {self.timeout_s:g} s "
                                                  "(--body-timeout-s).") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise StarletteHTTPException(413, self._message(f"over {seen}"))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: str) -> str:
        return (f"The request body ({clip_text(size, 20)} bytes) is larger than this server's limit of "
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
    engine = engine or BatchEngine(steered, max_batch=config.max_batch, prefill_chunk=config.prefill_chunk)
    server = RequestHandler(steered, engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="steerplug", version=_version(), lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes, timeout_s=config.body_timeout_s)

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
                message += f" (got {brief(first['input'])})"
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, clip_text(str(exc.detail), 500),
                        type="invalid_request_error" if exc.status_code < 500 else "server_error",
                        code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        logger.exception("Unhandled error")
        return _internal(exc).response()

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

    # The bodies are parsed by the handler, off the event loop (RequestHandler.parse); the schema
    # still shows in /docs.
    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await _guarded(server.handle(await server.parse(request, ChatCompletionRequest), chat=True,
                                            request=request))

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        return await _guarded(server.handle(await server.parse(request, CompletionRequest), chat=False,
                                            request=request))

    return app


def _internal(exc: BaseException) -> APIError:
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error")


async def _guarded(call: Any) -> Any:
    """``await call``, an unexpected error becoming an ordinary 500 response: one that reaches
    Starlette's last-resort handler also closes the client's keep-alive connection."""
    try:
        return await call
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as a 500 and logged
        logger.exception("Unhandled error")
        raise _internal(exc) from exc


def _body_schema(model: Any) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


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
                              ("max_body_bytes", int, "largest request body (HTTP 413 above it)"),
                              ("body_timeout_s", float, "seconds a request body may pause (HTTP 408)"),
                              ("prefill_chunk", int, "prompt tokens per prefill pass; longer prompts go in chunks")):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{help_} (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to let requests in flight finish on SIGTERM (default: %(default)s)")
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    steered = steered_model_from_args(args)
    config = ServeConfig(
        model_name=args.served_name or _default_name(steered), api_key=args.api_key,
        max_tokens=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_prompt_tokens=args.max_prompt_tokens, max_concurrency=args.max_concurrency,
        max_batch=args.max_batch, max_steps=args.max_steps, max_choices=args.max_choices,
        max_strength=args.max_strength, max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout_s,
        prefill_chunk=args.prefill_chunk)
    app = create_app(steered, config)
    print(f"Serving {config.model_name} on http://{args.host}:{args.port}/v1 "
          f"(steering: {steered.config if steered.can_steer else 'unavailable, no SAE'})", flush=True)
    # Handlers end when their client goes away, so shutdown only waits for requests in flight, and
    # at most --shutdown-timeout seconds.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0

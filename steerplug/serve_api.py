"""The translation between the OpenAI API that ``steerplug serve`` speaks and the batching engine.

:class:`RequestHandler` turns a validated body (:mod:`steerplug.serve_schema`: limits, bodies,
errors) into :class:`~steerplug.batching.GenerationRequest` s (steering settings checked by
:class:`~steerplug.steering.SteeringConfig`'s own rules, then against the server's limits) and the
engine's events into OpenAI responses and server-sent chunks. Parsing, templating and tokenizing run
off the event loop. The app around it (routes, middleware, lifespan) and the command are
:mod:`steerplug.serve`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from steerplug.batching import BatchEngine, ErrorEvent, FinishEvent, GenerationRequest, RequestStream, TokenEvent
from steerplug.serve_schema import (_UNSUPPORTED, APIError, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                    ServeConfig, SteeringOptions, _check_text, _Common, _error_body, brief,
                                    clip_text, parse_body, safe_text)
from steerplug.steering import SteeringValueError, check_steering

try:  # fastapi is optional: `pip install steerplug[serve]` (steerplug.serve_schema says so first)
    from fastapi import Request
    from fastapi.responses import StreamingResponse
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "steerplug.serve needs fastapi and uvicorn: pip install fastapi uvicorn"
    ) from _exc

__all__ = ["APIError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "RequestHandler",
           "ServeConfig", "SteeringOptions", "brief", "clip_text", "parse_body", "safe_text"]


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
        if len(batch) * body.n > self.config.max_choices:  # before any prompt is encoded
            raise APIError(400, f"n x prompts = {len(batch) * body.n} exceeds this server's limit of "
                                f"{self.config.max_choices} choices.", param="n")
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
        for name, trivial in _UNSUPPORTED.items():
            value = getattr(body, name, None)
            if value is not None and value not in trivial:
                raise APIError(400, f"{name}={brief(value)} is not supported by this server; leave it out.",
                               param=name)
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

    async def parse(self, request: Request, model: type[_Common]) -> _Common:
        """The request's body as ``model``, parsed and validated off the event loop."""
        raw = await request.body()
        return await asyncio.to_thread(parse_body, raw, model)

    def _prepare(self, body: _Common, chat: bool) -> tuple[list[GenerationRequest], dict, list[str] | None]:
        reqs, steering = self.requests(body, chat)
        echo = [self.engine.decode(r.prompt_ids) for r in reqs] if getattr(body, "echo", False) else None
        return reqs, steering, echo

    # --- engine -> response --------------------------------------------------------------------------
    async def handle(self, body: _Common, chat: bool, request: Request | None = None):
        # Templating and tokenizing run off the event loop: /health and the streams stay live.
        reqs, steering, echo = await asyncio.to_thread(self._prepare, body, chat)
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



def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

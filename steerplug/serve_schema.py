"""What a request to ``steerplug serve`` may hold: the server's limits (:class:`ServeConfig`), the
OpenAI bodies it takes (plus ``steering``), how a body is parsed and checked, and its errors.

Bodies are parsed with strict types and unknown fields refused (:func:`parse_body`, run off the
event loop by the handler); an :class:`APIError` renders as OpenAI's error body, its message cut to a
bounded length with control and bidi characters escaped. The handler that turns bodies into engine
requests is :mod:`steerplug.serve_api`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

try:  # fastapi and pydantic are optional: `pip install steerplug[serve]`
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
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
    body_timeout_s: float = 10.0
    """Longest wait for the next part of a request body; then HTTP 408."""
    prefill_chunk: int = 512
    """Most prompt tokens in one prefill pass (:class:`~steerplug.batching.BatchEngine`); a longer
    prompt is prefilled in chunks between decode steps, so it delays the others by one chunk."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "default_max_tokens", "max_prompt_tokens", "max_concurrency",
                     "max_batch", "max_steps", "max_choices", "max_body_bytes", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name}={value!r}: expected an integer >= 1.")
        for name in ("max_strength", "body_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"ServeConfig.{name}={value!r}: expected a finite number > 0.")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's error body. The message and ``param`` are
    cut to a bounded length and their control and bidi characters escaped (:func:`safe_text`), so no
    error body echoes an oversized or deceptive input."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        message = safe_text(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        param = None if param is None else safe_text(param, MAX_PARAM_CHARS)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=_error_body(
            self.message, self.type, self.param, self.code))


MAX_MESSAGE_CHARS = 600
"""Longest error message (an error body stays well under 2 KB)."""
MAX_PARAM_CHARS = 80


def clip_text(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: error messages never echo a whole oversized input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def safe_text(text: str, limit: int) -> str:
    """``text`` with control, format (bidi), separator and surrogate characters written as
    ``\\uXXXX`` escapes, then cut to about ``limit`` characters."""
    text = clip_text(text, 4 * limit)  # bound the work before escaping
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c == " " else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF
                       else f"\\U{ord(c):08x}" for c in text)
    return clip_text(text, limit)


def brief(value: Any, limit: int = 80) -> str:
    """A short, safe ``repr`` of a client's value for an error message (huge integers included:
    ``repr`` of one with over 4,300 digits raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'} of {len(value)} items"
    return safe_text(repr(value), limit)


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

    model_config = ConfigDict(extra="forbid", strict=True)
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
    """Fields both endpoints take. Types are strict (``"8"`` or ``true`` is no integer), and a field
    that is not OpenAI's (or a chat field sent to completions) is a 400 naming it, as OpenAI answers."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    """Any integer (folded into torch's range by :func:`~steerplug.batching.sampling.row_generator`)."""
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    """Taken and ignored, as fields that do not change the answer are."""
    steering: SteeringOptions | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


# Request fields that would change the answer's meaning and that this server does not implement,
# with the values that ask for nothing; any other value gets a 400 rather than a silently different answer.
_UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (False, 0), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"),
    "functions": ([],), "function_call": ("none", "auto"), "response_format": ({"type": "text"},),
    "logit_bias": ({},), "suffix": ("",), "best_of": (1,)}


def parse_body(raw: bytes, model: type[_Common]) -> _Common:
    """``raw`` JSON as ``model``, or an :class:`APIError` 400 that names the first wrong field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also: too deep, a too long integer, bad UTF-8
        raise APIError(400, f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {brief(data)}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.") from None


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|.*\[.*\])$")


def validation_error(exc: ValidationError) -> APIError:
    """pydantic's first error as OpenAI's 400: the field's path, what is wrong, a brief of the value."""
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}.", param=param)
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    if "input" in first and not isinstance(first["input"], (dict, list)):
        message += f" (got {brief(first['input'])})"
    return APIError(400, message, param=param)

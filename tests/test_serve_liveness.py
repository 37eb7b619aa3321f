"""Issue #27: no request can freeze, stall or hang the server for the others. Strict field types,
bounded error bodies, unknown fields refused, a body read timeout, heavy bodies kept off the event
loop, and handlers of clients that gave up while queued ending (so shutdown does not hang)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from test_serve import MODEL, LiveServer, _slow_engine, make_steered  # noqa: E402

from steerplug.serve import create_app  # noqa: E402

MAX_ERROR_BYTES = 2048


@pytest.fixture(scope="module")
def live():
    app = create_app(make_steered(), model_name=MODEL, max_batch=2, max_concurrency=16, max_tokens=64,
                     body_timeout_s=0.5)
    with LiveServer(app) as srv:
        yield srv


def _post(client, path, body):
    return client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path,body,param", [
    ("completions", {**COMPLETION, "max_completion_tokens": "8"}, "max_completion_tokens"),  # a chat field
    ("chat/completions", {**CHAT, "max_completion_tokens": "8"}, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("chat/completions", {**CHAT, "max_completion_tokens": [8]}, "max_completion_tokens"),
    ("chat/completions", {**CHAT, "echo": True}, "echo"),  # no such chat field in the OpenAI API
    ("chat/completions", {**CHAT, "tools": 1}, "tools"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {**CHAT, "response_format": True}, "response_format"),
    ("chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {**CHAT, "junk": 1}, "junk"),
    ("completions", {**COMPLETION, "n": True}, "n"),
])
def test_wrong_types_and_unknown_fields_are_400_naming_the_field(live, path, body, param):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        r = _post(client, path, body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
        assert _post(client, path, CHAT if path.startswith("chat") else COMPLETION).status_code == 200


def test_a_huge_integer_is_a_400_and_the_keep_alive_connection_serves_on(live):
    raw = b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "n": %s}' % (MODEL.encode(), b"9" * 4300)
    with httpx.Client(base_url=live.url, timeout=30) as client:
        r = client.post("completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and len(r.content) < MAX_ERROR_BYTES, r.text
        ok = _post(client, "completions", COMPLETION)  # the same connection
        assert ok.status_code == 200, ok.text


def test_trivial_values_of_unsupported_fields_are_accepted(live):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        r = _post(client, "chat/completions", {**CHAT, "top_logprobs": 0, "tools": [], "tool_choice": "none",
                                               "response_format": {"type": "text"}, "user": "u", "logprobs": False})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("how", ["model", "path", "steering key", "bidi key"])
def test_no_error_echoes_more_than_2kb_or_raw_control_characters(live, how):
    big = "x" * 5000
    with httpx.Client(base_url=live.url, timeout=30) as client:
        if how == "model":
            r = _post(client, "chat/completions", {**CHAT, "model": big})
        elif how == "path":
            r = client.get(f"models/{big}")
        elif how == "steering key":
            r = _post(client, "chat/completions", {**CHAT, "steering": {big * 100: 1}})
        else:
            r = _post(client, "chat/completions", {**CHAT, "steering": {"a\u202eb\x00c": 1}})
        assert 400 <= r.status_code < 500, r.text
        assert len(r.content) < MAX_ERROR_BYTES, len(r.content)
        text = r.json()["error"]["message"] + (r.json()["error"]["param"] or "")
        assert "\u202e" not in text and "\x00" not in text


def test_a_body_that_stops_arriving_is_408_within_the_timeout(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{}")
        t0 = time.perf_counter()
        reply = s.recv(4096)
        assert b" 408 " in reply.split(b"\r\n")[0], reply[:200]
        assert time.perf_counter() - t0 < 5


def test_health_stays_live_while_a_heavy_body_is_checked(live):
    body = json.dumps({"model": MODEL, "prompt": ["a"] * 190_000, "max_tokens": 1}).encode()  # ~950 KB
    result: dict = {}

    def heavy():
        with httpx.Client(base_url=live.url, timeout=60) as c:
            result["r"] = c.post("completions", content=body, headers={"content-type": "application/json"})

    base = live.url.removesuffix("/v1")
    with httpx.Client(timeout=30) as c:
        c.get(f"{base}/health")
        t = threading.Thread(target=heavy)
        t.start()
        worst = 0.0
        while t.is_alive():
            t0 = time.perf_counter()
            assert c.get(f"{base}/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
        t.join()
    assert result["r"].status_code == 400 and result["r"].json()["error"]["param"] == "n"
    assert worst < 1.0, worst


def test_clients_that_give_up_while_queued_leave_no_handler_behind_and_shutdown_is_prompt(monkeypatch):
    app = create_app(make_steered(), model_name=MODEL, max_batch=1, max_concurrency=16, max_tokens=64)
    srv = LiveServer(app).__enter__()
    _slow_engine(app.state.server.engine, monkeypatch, delay=0.05)  # the busy request runs >= 3 s
    try:
        busy = threading.Thread(target=lambda: httpx.post(f"{srv.url}/chat/completions", timeout=120, json={
            **CHAT, "max_tokens": 64}), daemon=True)
        busy.start()
        time.sleep(0.3)
        for _ in range(3):  # queued behind it; the client gives up
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{srv.url}/chat/completions", json={**CHAT, "max_tokens": 64}, timeout=0.3)
        engine = app.state.server.engine
        deadline = time.time() + 10
        while engine.waiting and time.time() < deadline:
            time.sleep(0.05)
        assert engine.waiting == 0  # the abandoned requests left the queue without being run
        assert busy.is_alive()  # ... while the busy one still runs
    finally:
        t0 = time.perf_counter()
        srv.__exit__(None, None, None)
    assert not srv.thread.is_alive() and time.perf_counter() - t0 < 10

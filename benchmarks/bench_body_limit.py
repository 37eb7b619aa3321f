"""How fast an oversize body is refused, and whether /health stays responsive: a 20 MB chat
request against a live server with the default limits (tiny random model; the limit does not
depend on the model).

    .venv/bin/python benchmarks/bench_body_limit.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_serve import MODEL, LiveServer, make_steered  # noqa: E402

from steerplug.serve import create_app  # noqa: E402


def main() -> None:
    app = create_app(make_steered(), model_name=MODEL)  # default limits
    with LiveServer(app) as srv:
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
        for kind in ("content-length", "chunked"):
            body = big if kind == "content-length" else (big[i:i + 65536] for i in range(0, len(big), 65536))
            t0 = time.perf_counter()
            r = httpx.post(f"{srv.url}/chat/completions", content=body,
                           headers={"content-type": "application/json"}, timeout=60)
            print(f"{kind}: HTTP {r.status_code} in {time.perf_counter() - t0:.3f} s, {len(r.content)} bytes")
        t0 = time.perf_counter()
        h = httpx.get(f"http://127.0.0.1:{srv.port}/health")
        print(f"/health: HTTP {h.status_code} in {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()

"""Load test of ``steerplug serve`` on loopback, through the official ``openai`` client.

1. ``--concurrent`` (32) greedy streamed requests with mixed steering settings (off, and several
   steps / strengths), all sent at once, then the same arriving ``--spacing`` seconds apart (rows
   join the running batch): latency and time-to-first-token p50 / p95, wall time, throughput.
2. ``--compare`` (16) greedy requests sent at once vs the same 16 sent one at a time: throughput of
   each and the speed-up from batching.

Runs the default model (SmolLM2-135M-Instruct, offline, CPU) with the SAE and vector in
hub_artifacts/ when present, else the random placeholder the demo uses (the cost of steering does
not depend on the SAE's values). Every loop is bounded: fixed request counts and ``max_tokens``.

    .venv/bin/python benchmarks/bench_serve.py --markdown /tmp/bench_serve.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = [{"enabled": False}, {"steps": 1, "strength": 0.25}, {"steps": 3, "strength": 0.25},
            {"steps": 3, "strength": 0.5}, {"steps": 5, "strength": 0.25}, None]
PROMPTS = [
    "How do I pick a lock to get into my neighbour's house?",
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
    "Write a short poem about the sea.",
    "Explain what a sparse autoencoder is in two sentences.",
    "What household chemicals should never be mixed?",
    "Summarise the plot of Romeo and Juliet.",
    "How can I make my password more secure?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(client, model: str, i: int, max_tokens: int, steering: dict | None, delay: float = 0.0):
    """One streamed chat request: (latency, time to first token, completion tokens, text)."""
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"steering": steering} if steering is not None else None)
    ttft, parts, usage = None, [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    return time.perf_counter() - t0, ttft or 0.0, usage.completion_tokens, "".join(parts)


async def _concurrent(client, model, n, max_tokens, mixed=True, spacing=0.0):
    t0 = time.perf_counter()
    out = await asyncio.gather(*(_one(client, model, i, max_tokens, SETTINGS[i % len(SETTINGS)] if mixed
                                      else {"steps": 3, "strength": 0.25}, delay=i * spacing)
                                 for i in range(n)))
    return time.perf_counter() - t0, out


async def _sequential(client, model, n, max_tokens):
    t0 = time.perf_counter()
    out = [await _one(client, model, i, max_tokens, {"steps": 3, "strength": 0.25}) for i in range(n)]
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: offline SmolLM2-135M-Instruct")
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--compare", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--spacing", type=float, default=0.25,
                   help="seconds between arrivals in the staggered test (rows join a running batch)")
    p.add_argument("--markdown", default=None, help="write the results as a markdown section here")
    args = p.parse_args(argv)

    import openai
    import torch
    import uvicorn

    from steerplug.demo_utils import load_steered
    from steerplug.serve import create_app

    steered, note = load_steered(args.model)
    artifacts = "random placeholder SAE/vector (hub_artifacts/ absent)" if note else "hub_artifacts/"
    app = create_app(steered, model_name="bench", max_batch=args.max_batch, max_concurrency=256,
                     max_tokens=max(args.max_tokens, 16))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    engine = app.state.server.engine

    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                    max_retries=0, timeout=1800)
        await _one(client, "bench", 0, 4, None)  # warm-up
        results = {}
        results["load"] = await _concurrent(client, "bench", args.concurrent, args.max_tokens)
        engine.stats["max_rows"] = engine.stats["joined"] = 0
        results["staggered"] = await _concurrent(client, "bench", args.concurrent, args.max_tokens,
                                                 spacing=args.spacing)
        results["staggered_rows"] = engine.stats["max_rows"]
        results["staggered_joined"] = engine.stats["joined"]
        engine.stats["max_rows"] = 0
        results["batched"] = await _concurrent(client, "bench", args.compare, args.max_tokens, mixed=False)
        results["batched_rows"] = engine.stats["max_rows"]
        results["serial"] = await _sequential(client, "bench", args.compare, args.max_tokens)
        await client.close()
        return results

    load_avg = os.getloadavg()
    r = asyncio.run(run_all())
    server.should_exit = True
    thread.join(30)

    def row(name: str, wall: float, out: list) -> str:
        lat, ttft, toks = [o[0] for o in out], [o[1] for o in out], sum(o[2] for o in out)
        return (f"| {name} | {len(out)} | {wall:.1f} | {toks} | {toks / wall:.1f} | {len(out) / wall:.2f} | "
                f"{_percentile(lat, .5):.1f} | {_percentile(lat, .95):.1f} | {_percentile(ttft, .5):.2f} | "
                f"{_percentile(ttft, .95):.2f} |")

    bw, bout = r["batched"]
    sw, sout = r["serial"]
    speedup = (sum(o[2] for o in bout) / bw) / (sum(o[2] for o in sout) / sw)
    same = sum(a[3] == b[3] for a, b in zip(bout, sout))
    cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serve.py " + " ".join(argv or sys.argv[1:])
    lines = [
        "## Issue #5: `steerplug serve` under load (loopback, openai client)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Setup: {args.model or 'SmolLM2-135M-Instruct (offline default)'}, float32 CPU, steering at "
        f"`{steered.hook_point.name}` with {artifacts}; greedy, streamed, max_tokens={args.max_tokens}, "
        f"max_batch={args.max_batch}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average before the run "
        f"{load_avg[0]:.1f} (the machine is shared: absolute numbers are noisy). Mixed steering = "
        f"off / steps 1, 3, 5 / strength 0.25, 0.5 / server default, in rotation.",
        "",
        "| test | requests | wall s | completion tokens | tokens/s | requests/s | latency p50 s | "
        "latency p95 s | first token p50 s | first token p95 s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row(f"{args.concurrent} concurrent, mixed steering", *r["load"]),
        row(f"{args.concurrent} mixed, arriving {args.spacing} s apart", *r["staggered"]),
        row(f"{args.compare} concurrent (steps 3, strength 0.25)", bw, bout),
        row(f"the same {args.compare}, one at a time", sw, sout),
        "",
        f"Batching speed-up ({args.compare} concurrent vs one at a time, tokens/s): **{speedup:.2f}x** "
        f"(largest batch: {r['batched_rows']} rows; in the staggered test {r['staggered_joined']} of "
        f"{args.concurrent} requests joined a batch already decoding, largest {r['staggered_rows']} rows). Answers identical between the batched and the "
        f"one-at-a-time run: {same}/{args.compare}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

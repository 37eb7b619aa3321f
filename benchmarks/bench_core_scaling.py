"""The ceiling for issue #14's "2 processes >= 1.6x one process": how well do this machine's cores scale?

Runs the SAE step's four big matmuls (encoder forward ``(B, 576) @ (576, 2048)``, decoder forward,
decoder-input gradient, encoder-weight gradient; float32, 1 thread) for ``--seconds`` in one
process at batch ``2B`` and ``B``, then in two processes at batch ``B`` side by side, and prints the
rows per second of each and the two processes' sum against one. No communication, no optimiser:
what is left of the ratio is what two ranks could reach at best.

    .venv/bin/python benchmarks/bench_core_scaling.py --batch 512 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _work(batch: int, seconds: float) -> None:
    import torch

    torch.set_num_threads(1)
    x, w_enc, w_dec = torch.randn(batch, 576), torch.randn(576, 2048), torch.randn(2048, 576)
    for _ in range(5):
        (x @ w_enc) @ w_dec
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        z = x @ w_enc
        y = z @ w_dec
        _ = y @ w_dec.T
        _ = x.T @ z
        n += 1
    print(n * batch / (time.perf_counter() - start))


def _run(n_procs: int, batch: int, seconds: float) -> list[float]:
    cmd = [sys.executable, __file__, "--worker", str(batch), "--seconds", str(seconds)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n_procs)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=512, help="rows per process in the 2-process run")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        _work(args.worker, args.seconds)
        return
    one_full, one_half, two = [], [], []
    for _ in range(args.rounds):  # alternating
        one_full.append(_run(1, 2 * args.batch, args.seconds)[0])
        two.append(sum(_run(2, args.batch, args.seconds)))
        one_half.append(_run(1, args.batch, args.seconds)[0])
    full, half, both = (statistics.median(v) for v in (one_full, one_half, two))
    print(f"1 process, batch {2 * args.batch}: {full:,.0f} rows/s")
    print(f"1 process, batch {args.batch}: {half:,.0f} rows/s")
    print(f"2 processes, batch {args.batch} each: {both:,.0f} rows/s together "
          f"= {both / full:.2f}x one process at batch {2 * args.batch}")


if __name__ == "__main__":
    main()

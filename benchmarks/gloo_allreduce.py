"""Issue #14: what the gradient all-reduce of a 2048 x 576 TopK SAE costs between 2 CPU processes
(gloo over loopback), sent as the trainer sends it (one all-reduce per parameter, all in flight),
as one flat float32 buffer, as one flat bfloat16 buffer (half the bytes, what DDP's
``bf16_compress_hook`` sends), and the per-parameter float32 all-reduce overlapped with a GEMM of
the size of half the step's encoder (does gloo's transfer hide behind compute on these cores?).
Medians over ``--repeats``, after a barrier each; rank 0 prints ms.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 benchmarks/gloo_allreduce.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--repeats", type=int, default=23)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    F_, D = args.d_sae, args.d_in
    grads = [torch.randn(D, F_), torch.randn(F_, D), torch.randn(F_), torch.randn(D)]  # W_enc, W_dec, b_enc, b_dec
    flat32 = torch.cat([g.reshape(-1) for g in grads])
    flat16 = flat32.bfloat16()
    x, W = torch.randn(512, D), torch.randn(D, F_)

    def each_in_flight() -> None:
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()

    def overlapped() -> None:
        works = [dist.all_reduce(g, async_op=True) for g in grads]
        x @ W
        for work in works:
            work.wait()

    cases = {"per parameter, float32 (shipped)": each_in_flight,
             "one flat float32 buffer": lambda: dist.all_reduce(flat32),
             "one flat bfloat16 buffer": lambda: dist.all_reduce(flat16),
             "GEMM 512 x D x F alone": lambda: x @ W,
             "per parameter float32 + that GEMM, overlapped": overlapped}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so that drifts of the machine hit every case alike
        for name, fn in cases.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    if dist.get_rank() == 0:
        print(f"{flat32.numel() * 4 / 1e6:.1f} MB of float32 gradients, 2 processes, medians of {args.repeats - 3}:")
        for name, ts in times.items():
            print(f"  {name}: {statistics.median(ts[3:]):.1f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

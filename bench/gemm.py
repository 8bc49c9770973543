"""What bf16 costs on this CPU: a GEMM's throughput in fp32 and in bf16, the number `--dtype auto` rests on.

One (M, K) x (K, N) product of SmolLM2-135M's MLP shape (576 -> 1536, M tokens), the median of repeated runs
after warm-up, in each dtype; prints the CPU, GFLOP/s of each and the bf16 / fp32 ratio, and one JSON line.
A CPU without AVX512_BF16/AMX emulates bf16 (ratio far below 1); one with them computes it natively.

    .venv/bin/python bench/gemm.py [--m 256] [--k 576] [--n 1536] [--reps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def gflops(m: int, k: int, n: int, dtype, reps: int) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    for _ in range(3):  # warm-up: kernels chosen, caches filled
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    import torch

    from leantune.precision import cpu_info, resolve_precision

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    res = {d: gflops(args.m, args.k, args.n, getattr(torch, d), args.reps) for d in ("float32", "bfloat16")}
    ratio = res["bfloat16"] / res["float32"]
    print(f"cpu: {cpu_info().describe()}")
    print(f"GEMM ({args.m}, {args.k}) x ({args.k}, {args.n}), median of {args.reps}: fp32 {res['float32']:.1f} "
          f"GFLOP/s, bf16 {res['bfloat16']:.1f} GFLOP/s, bf16 / fp32 {ratio:.3f}; "
          f"--dtype auto picks {resolve_precision('auto', 'cpu').name}")
    print(json.dumps({"bench": "gemm", "cpu": cpu_info().as_dict(), "shape": [args.m, args.k, args.n],
                      "gflops": res, "bf16_over_fp32": ratio}))


if __name__ == "__main__":
    main()

"""Measured GEMM limits of this machine through PyTorch (JSON out): the denominators of MFU.

    .venv/bin/python bench/gemm_peak.py --out bench/results/gemm_peak.json

Kernels, each an n x n x n product (default n = 2048, 2 n^3 FLOPs), median of `--repeats`:
- `fp32_mkl_matmul`: `torch.matmul` in fp32, the MKL sgemm that eager `nn.Linear` runs.
- `fp32_onednn_linear`: `torch.ops.mkldnn._linear_pointwise` with a weight prepacked by
  `torch.ops.mkldnn._reorder_linear_weight`, the path inductor's CPU backend takes.
- `bf16_matmul`, `bf16_onednn_linear`: the same in bfloat16 (oneDNN; AMX where the chip has it).

`fp32_peak` / `bf16_peak` are the best of each precision: "model FLOPs utilisation" in the
benchmarks is measured against them, so it says how far a step is from what the chip reaches
through PyTorch, not from a datasheet number. The other bench scripts import `gemm_peaks`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import emit, machine_info  # bench/ is on sys.path when a script runs


def gflops(fn: Callable[[], object], flops: float, repeats: int, warmup: int = 2) -> float:
    """GFLOP/s of `fn` from the median of `repeats` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> Callable[[], object] | None:
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
        torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without this op
        return None
    return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def gemm_peaks(n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of each kernel and the best per precision (`fp32_peak`, `bf16_peak`)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    flops = 2.0 * n**3
    kernels: dict[str, float] = {}
    with torch.no_grad():
        kernels["fp32_mkl_matmul"] = gflops(lambda: torch.matmul(a, b), flops, repeats)
        fn = _onednn_linear(a, b)
        if fn is not None:
            kernels["fp32_onednn_linear"] = gflops(fn, flops, repeats)
        ab, bb = a.bfloat16(), b.bfloat16()
        kernels["bf16_matmul"] = gflops(lambda: torch.matmul(ab, bb), flops, repeats)
        fn = _onednn_linear(ab, bb)
        if fn is not None:
            kernels["bf16_onednn_linear"] = gflops(fn, flops, repeats)
    rounded = {k: round(v, 1) for k, v in kernels.items()}
    return {
        "n": n,
        "gflops": rounded,
        "fp32_peak": max(v for k, v in rounded.items() if k.startswith("fp32")),
        "bf16_peak": max(v for k, v in rounded.items() if k.startswith("bf16")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"machine": machine_info(), **gemm_peaks(args.n, args.repeats)}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

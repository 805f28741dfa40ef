"""Attention kernels on the CPU: forward + backward time of each form (JSON out). Run by hand.

    .venv/bin/python bench/attention_kernels.py --out bench/results/attention_kernels_xeon.json

Forms, for (B, heads, N, d) inputs in float32 and bfloat16:
- `sdpa`: `F.scaled_dot_product_attention` (PyTorch's CPU flash kernel);
- `matmul`: softmax(q k^T / sqrt(d)) v as two batched matmuls, softmax in float32;
- `broadcast`: the same as broadcast products and sums (meant for compiled graphs of a few tokens);
- `attend`: what `dinokit.models.layers.attend.attend` picks (eager, so never `broadcast`).
Lengths: 2 and 5 (the tiny preset's 14 px and 28 px crops), 50 and 257 (ViT-S/14 at 98 and
224 px). Medians of `--repeats` timed calls after warm-up; compare ratios within one report.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dinokit.models.layers.attend import attend, broadcast_attention, matmul_attention
from _report import emit, machine_info  # bench/ is on sys.path when a script runs


FORMS = {"sdpa": F.scaled_dot_product_attention, "matmul": matmul_attention, "broadcast": broadcast_attention,
         "attend": attend}
# (batch of sequences, heads, tokens, head dim): the shapes the two training presets produce.
SHAPES = [(128, 4, 2, 32), (128, 4, 5, 32), (64, 6, 50, 64), (16, 6, 257, 64)]


def time_form(fn, shape: tuple[int, int, int, int], dtype: torch.dtype, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        fn(q, k, v).float().sum().backward()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            # The broadcast form materialises (B, heads, N, N, d): only for the short sequences.
            forms = [f for f in FORMS if f != "broadcast" or shape[2] <= 8]
            ms = {f: round(time_form(FORMS[f], shape, dtype, args.repeats) * 1e3, 3) for f in forms}
            rows.append({"dtype": str(dtype).removeprefix("torch."), "shape_b_h_n_d": list(shape),
                         "forward_backward_ms": ms, "sdpa_over_attend": round(ms["sdpa"] / ms["attend"], 2)})
    emit({"machine": machine_info(), "threads": torch.get_num_threads(), "repeats": args.repeats,
          "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

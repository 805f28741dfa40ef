"""Model FLOPs of a piece of work, counted by `torch.utils.flop_counter.FlopCounterMode`.

    from flops import count_flops
    total, by_op = count_flops(lambda: model(batch, 0.04)[0]["total"].backward())

Counted: matmuls (`mm`, `addmm`, `bmm`, ...), convolutions and scaled-dot-product attention,
forward and backward, each multiply-add as 2 FLOPs; element-wise work (norms, GELU, softmax,
AdamW, EMA) is not, as usual for "model FLOPs". PyTorch's table misses the CPU flash-attention
kernels (`_scaled_dot_product_flash_attention_for_cpu` and its backward), so they are added
here with PyTorch's own SDPA formulas; without them the attention of a CPU run would count 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

aten = torch.ops.aten


def _sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                   out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# Formulas get shapes, not tensors (FlopCounterMode wraps custom entries that way).
CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run `fn` once; return its total FLOPs and the FLOPs per operator (e.g. `mm`, `bmm`)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA)
    with counter:
        fn()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op

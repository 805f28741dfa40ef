"""Scaled-dot-product attention through the fastest kernel for the device, dtype and length."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Longest sequence for which the CPU path below materialises the (N x N) attention weights; beyond
# it their memory (B * heads * N^2, kept for backward) outgrows what the faster kernel saves.
EXPLICIT_MAX_TOKENS = 512
# Longest sequence for which a compiled CPU graph computes attention by broadcasting (no matmul).
BROADCAST_MAX_TOKENS = 8


def matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention as two batched matmuls, the softmax in float32 as the fused kernels accumulate it."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v


def broadcast_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention as broadcast products and sums: materialises (B, heads, N, N, d), so only for
    a few tokens, where inductor fuses it into one loop."""
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5
    return (scores.softmax(-1, dtype=torch.float32).to(v.dtype).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) tensors, through the fastest CPU/GPU kernel.

    On GPUs, and on the CPU in float32, `F.scaled_dot_product_attention` (flash / memory-efficient
    kernels). On the CPU two cases are faster written out (`bench/attention_kernels.py` measures
    them): in bfloat16 / float16, PyTorch's CPU flash kernel is slower than two batched matmuls
    (which reach AMX / oneDNN) at every length up to ViT-S/14's 257 tokens, for forward plus
    backward; and inside a compiled graph, sequences of a few tokens (the 2-5 of a 28 px crop
    at patch 14) are cheapest as broadcast products that inductor fuses into a single loop, where
    a matmul call per (sequence, head) costs more than its arithmetic.
    """
    n = q.shape[-2]
    if q.device.type != "cpu" or attn_mask is not None or n > EXPLICIT_MAX_TOKENS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if n <= BROADCAST_MAX_TOKENS and torch.compiler.is_compiling():
        return broadcast_attention(q, k, v)
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    return matmul_attention(q, k, v)

"""Sequence packing: crops of several sizes as one token matrix (DINOv2's "sequence packing").

The student sees 2 global crops of 1 + R + N_g tokens and n local crops of 1 + R + N_l tokens.
Packed, every crop's tokens are rows of one (rows, D) matrix, so the per-token work of a block
(LayerNorm, the qkv / proj / FFN Linears, LayerScale, residual adds) runs once on one large
matrix instead of once per crop size. Attention must not mix crops: it is block-diagonal, computed
here as one batched attention call (`attend`) per group of equal-length crops. That is
exact (the same kernels as separate forwards, no padding, no mask) and keeps SDPA's fused
kernels where they are the fastest; `bench/packing.py` measures it against nested jagged tensors and flex_attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from dinokit.models.layers.attend import attend


@dataclass(frozen=True)
class PackedLayout:
    """Where each group of equal-length sequences lies in a packed (rows, D) token matrix.

    `groups[i] = (sequences, tokens)`: group i holds `sequences` crops of `tokens` tokens each,
    stored sequence-major after the rows of groups 0 .. i-1. Hashable, so `torch.compile` can
    guard on it.
    """

    groups: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> PackedLayout:
        """The layout of `tensors`, each (B_i, T_i, D)."""
        return cls(tuple((int(t.shape[0]), int(t.shape[1])) for t in tensors))

    @property
    def sizes(self) -> list[int]:
        """Rows of each group."""
        return [b * t for b, t in self.groups]

    def pack(self, tensors: Sequence[Tensor]) -> Tensor:
        """(B_i, T_i, D) tensors -> one (sum B_i * T_i, D) matrix."""
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])

    def unpack(self, x: Tensor) -> list[Tensor]:
        """(rows, D) -> views (B_i, T_i, D), one per group."""
        return [part.view(b, t, -1) for part, (b, t) in zip(x.split(self.sizes), self.groups)]

    def select(self, keep: Sequence[Tensor]) -> tuple[PackedLayout, Tensor]:
        """The layout of a subset of sequences (`keep[i]`: indices within group i) and the packed
        row indices of their tokens, in the same order."""
        rows, groups, start = [], [], 0
        for idx, (b, t) in zip(keep, self.groups):
            token = torch.arange(t, device=idx.device)
            rows.append((start + idx[:, None] * t + token).flatten())
            groups.append((int(idx.shape[0]), t))
            start += b * t
        return PackedLayout(tuple(groups)), torch.cat(rows)

    def per_row(self, values: Sequence[Tensor]) -> Tensor:
        """Per-sequence values (`values[i]`: (B_i,)) repeated for each token: (rows, 1)."""
        return torch.cat([v.repeat_interleave(t) for v, (_, t) in zip(values, self.groups)]).unsqueeze(-1)


def packed_attention(qkv: Tensor, layout: PackedLayout, num_heads: int) -> Tensor:
    """Block-diagonal multi-head attention of packed sequences.

    Args:
        qkv: (rows, 3 * D) output of the packed `qkv` projection, per row laid out (3, H, D/H).
        layout: the packing of the rows.
        num_heads: H.

    Returns: (rows, D), each sequence attending to its own tokens only.
    """
    dim = qkv.shape[-1] // 3
    outs = []
    for part, (b, t) in zip(qkv.split(layout.sizes), layout.groups):
        q, k, v = part.view(b, t, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        outs.append(attend(q, k, v).transpose(1, 2).reshape(b * t, dim))
    return torch.cat(outs)

"""Multi-head self-attention (official DINOv2 layout) over `attend`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinokit.models.layers.attend import attend
from dinokit.models.layers.packing import PackedLayout, packed_attention

class Attention(nn.Module):
    """Multi-head self-attention with one packed `qkv` projection (official DINOv2 key names).

    `attend` picks the flash / memory-efficient kernel where the device has one (no xFormers is
    needed), or the faster explicit form on the CPU. `attn_mask` is broadcastable to (B, heads, N, N), bool = keep.

    Args:
        dim: token width D.
        num_heads: number of heads; D must be divisible by it.
        qkv_bias: bias on the qkv projection.
        proj_bias: bias on the output projection.

    Shapes: x (B, N, D) -> (B, N, D); with `layout`, packed sequences x (rows, D) -> (rows, D)
    (block-diagonal attention, see `dinokit.models.layers.packing`).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        # (B, N, 3, H, C/H): the official layout of the packed projection's output features.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = torch.unbind(qkv, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, layout: PackedLayout | None = None) -> Tensor:
        if layout is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask and a packed layout cannot be combined")
            return self.proj(packed_attention(self.qkv(x), layout, self.num_heads))
        B, N, C = x.shape
        q, k, v = self._split_heads(x)
        x = attend(q, k, v, attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def attention_probs(self, x: Tensor) -> Tensor:
        """Softmax attention weights (B, heads, N, N), computed explicitly for pictures.

        Kept out of `forward` so that the normal path never materialises the N x N matrix.
        """
        q, k, _ = self._split_heads(x)
        scale = q.shape[-1] ** -0.5
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)

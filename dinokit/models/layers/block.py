"""Pre-norm transformer block with LayerScale and stochastic depth."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from dinokit.models.layers.attention import Attention
from dinokit.models.layers.drop_path import (
    drop_add_residual_packed,
    drop_add_residual_stochastic_depth,
    drop_path,
    drop_path_packed,
)
from dinokit.models.layers.layer_scale import LayerScale
from dinokit.models.layers.mlp import Mlp, SwiGLUFFN, swiglu_hidden_features
from dinokit.models.layers.packing import PackedLayout

FfnLayer = Literal["mlp", "swiglu", "swiglufused"]

# Above this rate DINOv2 switches from per-sample DropPath to computing branches on a batch
# subset, which skips the dropped samples' compute (official threshold).
SUBSET_DROP_THRESHOLD = 0.1


class Block(nn.Module):
    """`x + ls1(attn(norm1(x)))`, then `x + ls2(ffn(norm2(x)))`.

    Args:
        dim: token width D.
        num_heads: attention heads.
        mlp_ratio: FFN hidden width = int(D * mlp_ratio) (2/3 of it, rounded, for SwiGLU).
        qkv_bias, proj_bias, ffn_bias: biases of the three kinds of Linear.
        drop_path: stochastic-depth rate of both branches (training only).
        init_values: LayerScale init; None or 0 means no LayerScale (and no `gamma` keys).
        ffn_layer: "mlp" or "swiglu" / "swiglufused" (the same network without xFormers).

    Shapes: x (B, N, D) -> (B, N, D). `attn_mask` is passed to attention (see `Attention`).
    With `layout`, x is packed sequences (rows, D) of several crop sizes (see
    `dinokit.models.layers.packing`); stochastic depth then draws per crop, as separate forwards do.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: FfnLayer = "mlp",
    ) -> None:
        super().__init__()
        # Construction order matches the official block so seeded initialisation is identical.
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden, dim, bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_features(hidden), dim, bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected 'mlp', 'swiglu' or 'swiglufused'")
        self.ls2: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def attn_residual(self, x: Tensor, attn_mask: Tensor | None = None, layout: PackedLayout | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, layout=layout))

    def ffn_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, layout: PackedLayout | None = None) -> Tensor:
        if layout is not None:
            return self._forward_packed(x, layout)
        rate = self.sample_drop_ratio
        if self.training and rate > SUBSET_DROP_THRESHOLD and attn_mask is None:
            x = drop_add_residual_stochastic_depth(x, self.attn_residual, rate)
            x = drop_add_residual_stochastic_depth(x, self.ffn_residual, rate)
        elif self.training and rate > 0.0:
            x = x + drop_path(self.attn_residual(x, attn_mask), rate, True)
            x = x + drop_path(self.ffn_residual(x), rate, True)
        else:
            x = x + self.attn_residual(x, attn_mask)
            x = x + self.ffn_residual(x)
        return x

    def _forward_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        rate = self.sample_drop_ratio
        if self.training and rate > SUBSET_DROP_THRESHOLD:
            x = drop_add_residual_packed(x, layout, lambda y, sub: self.attn_residual(y, layout=sub), rate)
            x = drop_add_residual_packed(x, layout, lambda y, sub: self.ffn_residual(y), rate)
        elif self.training and rate > 0.0:
            x = x + drop_path_packed(self.attn_residual(x, layout=layout), layout, rate, True)
            x = x + drop_path_packed(self.ffn_residual(x), layout, rate, True)
        else:
            x = x + self.attn_residual(x, layout=layout)
            x = x + self.ffn_residual(x)
        return x

"""Feed-forward networks of the transformer block: GELU MLP and SwiGLU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """`fc1 -> GELU (exact erf) -> fc2`. Shapes: (..., D) -> (..., D_out)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(hidden_features: int) -> int:
    """Hidden width of DINOv2's "swiglufused" FFN: 2/3 of the MLP width, rounded up to a multiple of 8.

    The 2/3 keeps the parameter count of a 4x MLP (SwiGLU has three matrices instead of two);
    e.g. ViT-g: 1536 * 4 = 6144 -> 4096.
    """
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020).

    `w12` produces both halves in one matmul: `w3(silu(a) * b)` with `a, b = w12(x).chunk(2)`.
    `hidden_features` is used as given; DINOv2 builders pass `swiglu_hidden_features(D * ratio)`.
    Shapes: (..., D) -> (..., D_out).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)

"""Patch embedding: non-overlapping patches projected to tokens."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Image to patch tokens: `Conv2d(kernel = stride = patch_size)`, computed as one matmul.

    The parameters are the official convolution's (`proj.weight` (D, C, p, p), `proj.bias`), but
    the forward cuts the image into (C * p * p)-long patch rows and multiplies them by the flattened
    kernel: the same sums, and on the CPU far cheaper than the convolution kernels for this
    stride == kernel case, above all its backward in bfloat16.

    Shapes: x (B, C, H, W) with H and W multiples of the patch size -> (B, H/p * W/p, D),
    patches in row-major order.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        B, C = x.shape[:2]
        rows = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
        return F.linear(rows, self.proj.weight.flatten(1), self.proj.bias)

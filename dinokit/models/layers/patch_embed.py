"""Patch embedding: non-overlapping patches projected by a strided convolution."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Image to patch tokens with `Conv2d(kernel = stride = patch_size)`.

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
        return self.proj(x).flatten(2).transpose(1, 2)

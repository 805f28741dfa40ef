"""Bicubic resampling of the positional grid as two small matrices, for any grid size at run time.

`F.interpolate(grid, mode="bicubic")` is linear in the grid and separable, so resizing an M x M
grid to h x w is `R_h @ grid @ R_w.T` with R_h (h x M) depending only on h. Building R from the
output size with plain tensor arithmetic (arange, floor, where, comparisons) gives a function of
the input's shape that exporters trace without data-dependent Python: an ONNX graph then resizes
the grid for whatever height and width it is fed, with PyTorch's exact rule, including the
official `+offset` on the target size and the antialiased kernel, which ONNX's `Resize` cannot
express (its cubic kernel, coordinate mapping and antialias differ from PyTorch's).

The rules reproduced (PyTorch's CPU kernels, `align_corners=False`):
- plain bicubic: source coordinate `s = scale * (i + 0.5) - 0.5` with `scale = M / (h + offset)`;
  four taps around `floor(s)` with the cubic convolution kernel (a = -0.75), indices clamped to
  the grid (so border taps add up on the edge row);
- antialiased bicubic (PIL's rule): `scale = M / h` (the offset only chose the output size),
  centre `c = scale * (i + 0.5)`, the kernel (a = -0.5) stretched by `max(scale, 1)`, evaluated
  at every grid row and normalised to sum to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["resample_grid", "resample_matrix"]



def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel, zero outside |x| < 2."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrix(out_len: Tensor, in_len: int, offset: float, antialias: bool) -> Tensor:
    """R (out_len, in_len) with `R @ v` = bicubic resize of v (length in_len) to out_len.

    Args:
        out_len: the output length as a 0-d int64 tensor (a traced shape when exporting).
        in_len: the stored grid side M.
        offset: added to out_len in the scale, as DINOv2's `scale_factor=(h + 0.1) / M`.
        antialias: PyTorch's `antialias=True` kernel.
    """
    out_f = out_len.to(torch.float32)
    dst = torch.arange(out_len, dtype=torch.float32, device=out_len.device) + 0.5
    grid = torch.arange(in_len, dtype=torch.float32, device=out_len.device)
    scale = in_len / (out_f + offset)
    if antialias:
        stretch = torch.clamp(scale, min=1.0)
        centre = scale * dst
        weights = _cubic((grid[None, :] - centre[:, None] + 0.5) / stretch, a=-0.5)
        weights = weights / weights.sum(dim=1, keepdim=True)
        # PyTorch copies an axis whose length does not change, whatever the scale said.
        same = (dst[:, None] - 0.5 == grid[None, :]).to(torch.float32)
        return torch.where(out_len == in_len, same, weights)
    src = scale * dst - 0.5
    floor = torch.floor(src)
    taps = floor[:, None] + torch.arange(-1, 3, dtype=torch.float32, device=out_len.device)[None, :]
    weights = _cubic(src[:, None] - taps, a=-0.75)  # (out, 4)
    index = taps.clamp(0, in_len - 1)
    hits = (index[:, :, None] == grid[None, None, :]).to(torch.float32)  # (out, 4, in)
    return (hits * weights[:, :, None]).sum(dim=1)


def resample_grid(grid: Tensor, height: Tensor, width: Tensor, offset: float, antialias: bool,
                  keep: Tensor | None = None) -> Tensor:
    """Resize `grid` (D, M, M) to (D, height, width) as `F.interpolate(..., mode="bicubic")`.

    `keep` (0-d bool): return the grid unchanged where it is true (then height = width = M), a
    branch taken inside the graph, as the official code keeps the stored grid for a square input.
    """
    side = grid.shape[-1]
    rows = resample_matrix(height, side, offset, antialias)
    cols = resample_matrix(width, side, offset, antialias)
    if keep is not None:
        rows = torch.where(keep, _identity(height, side), rows)
        cols = torch.where(keep, _identity(width, side), cols)
    return torch.einsum("hm,dmn,wn->dhw", rows, grid.float(), cols)


def _identity(out_len: Tensor, in_len: int) -> Tensor:
    out = torch.arange(out_len, device=out_len.device)
    return (out[:, None] == torch.arange(in_len, device=out_len.device)[None, :]).to(torch.float32)

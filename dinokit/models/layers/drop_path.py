"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", 2016), two forms.

- `DropPath`: zero a residual branch for a random subset of samples and rescale the rest; the
  branch is still computed for every sample.
- `drop_add_residual_stochastic_depth`: compute the branch only on a random subset of the batch
  and add it back rescaled. Same expectation, but the dropped samples cost nothing; DINOv2 uses it
  for rates above 0.1 (ViT-L/g train with 0.4).

Both have a packed form (`..._packed`) for sequences packed by `dinokit.models.layers.packing`:
the draws are per crop, as in separate forwards, and a dropped crop's tokens skip the branch.
The random draws go through `_keep_mask` / `_keep_subset`, one call per group of crops.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from dinokit.models.layers.packing import PackedLayout


def _keep_mask(n: int, keep_prob: float, like: Tensor) -> Tensor:
    """(n,) Bernoulli(keep_prob) draws: which samples keep their branch."""
    return like.new_empty(n).bernoulli_(keep_prob)


def _keep_subset(n: int, size: int, device: torch.device) -> Tensor:
    """`size` random sample indices out of n (one `torch.randperm(n)`, as the official code)."""
    return torch.randperm(n, device=device)[:size]


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Per-sample branch dropout: x * Bernoulli(keep) / keep, one draw per sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = _keep_mask(x.shape[0], keep_prob, x).view(shape)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of `drop_path`. Shapes: (B, ...) -> (B, ...)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


def drop_add_residual_stochastic_depth(
    x: Tensor, residual_func: Callable[[Tensor], Tensor], sample_drop_ratio: float
) -> Tensor:
    """`x + branch(x)` where the branch runs on a random `1 - ratio` share of the samples only.

    The kept samples' residual is scaled by B / kept so the expectation equals `x + branch(x)`.
    Consumes one `torch.randperm(B)` per call, as the official code does (RNG-exact).

    Shapes: x (B, N, D) -> (B, N, D).
    """
    b = x.shape[0]
    subset_size = max(int(b * (1 - sample_drop_ratio)), 1)
    keep = _keep_subset(b, subset_size, x.device)
    residual = residual_func(x[keep])
    out = torch.index_add(x.flatten(1), 0, keep, residual.flatten(1).to(dtype=x.dtype), alpha=b / subset_size)
    return out.view_as(x)


def drop_path_packed(x: Tensor, layout: PackedLayout, drop_prob: float, training: bool) -> Tensor:
    """`drop_path` of packed sequences: one draw per sequence, applied to all of its rows.

    Shapes: x (rows, D) -> (rows, D).
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = layout.per_row([_keep_mask(b, keep_prob, x) for b, _ in layout.groups])
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


def drop_add_residual_packed(
    x: Tensor,
    layout: PackedLayout,
    residual_func: Callable[[Tensor, PackedLayout], Tensor],
    sample_drop_ratio: float,
) -> Tensor:
    """`drop_add_residual_stochastic_depth` of packed sequences: in each group of crops the
    branch runs on a random `1 - ratio` share of the crops only (gathered into a smaller packed
    matrix), rescaled by that group's B / kept.

    Shapes: x (rows, D) -> (rows, D).
    """
    keep = [_keep_subset(b, max(int(b * (1 - sample_drop_ratio)), 1), x.device) for b, _ in layout.groups]
    subset, rows = layout.select(keep)
    residual = residual_func(x[rows], subset)
    scale = subset.per_row([x.new_full((k.shape[0],), b / k.shape[0]) for k, (b, _) in zip(keep, layout.groups)])
    return torch.index_add(x, 0, rows, (residual * scale).to(dtype=x.dtype))

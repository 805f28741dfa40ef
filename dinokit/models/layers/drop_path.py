"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", 2016), two forms.

- `DropPath`: zero a residual branch for a random subset of samples and rescale the rest; the
  branch is still computed for every sample.
- `drop_add_residual_stochastic_depth`: compute the branch only on a random subset of the batch
  and add it back rescaled. Same expectation, but the dropped samples cost nothing; DINOv2 uses it
  for rates above 0.1 (ViT-L/g train with 0.4).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Per-sample branch dropout: x * Bernoulli(keep) / keep, one draw per sample."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
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
    keep = torch.randperm(b, device=x.device)[:subset_size]
    residual = residual_func(x[keep])
    out = torch.index_add(x.flatten(1), 0, keep, residual.flatten(1).to(dtype=x.dtype), alpha=b / subset_size)
    return out.view_as(x)

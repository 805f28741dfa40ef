"""LayerScale (Touvron et al., "Going deeper with Image Transformers", 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch; the parameter is named `gamma` as in DINOv2.

    Shapes: x (..., D) -> (..., D).
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

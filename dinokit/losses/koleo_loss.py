"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; used on
the student CLS tokens by DINOv2, Oquab et al. 2023, weight 0.1).

The Kozachenko-Leonenko differential-entropy estimator: pushing every L2-normalised feature away
from its nearest neighbour in the batch spreads the features uniformly over the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss", "pairwise_nearest_neighbours"]


@torch.no_grad()
def pairwise_nearest_neighbours(x: Tensor) -> Tensor:
    """Index of each row's nearest other row by inner product (for unit rows: by L2 distance).

    Args:
        x: (B, D) rows, normally L2-normalised.

    Returns:
        (B,) int64 indices; row i never picks itself (its dot is set to -1, the minimum possible
        for unit vectors), ties go to the lowest index as in `torch.max`.
    """
    dots = torch.mm(x, x.t())
    dots.fill_diagonal_(-1)
    return torch.max(dots, dim=1).indices


class KoLeoLoss(nn.Module):
    """`-(1/B) sum_i log(min_{j != i} ||x_i - x_j|| + eps)` on L2-normalised rows.

    Computed in float32 with autocast disabled (the log of tiny distances is meaningless in fp16).
    Guards, unlike the official code:
      - a batch of 1 (or 0) has no neighbour; the official code then pairs the row with itself and
        returns a huge value (about -log(eps)). Here the loss is an exact 0 that stays connected to
        the graph (`student_output.sum() * 0`), so backward and DDP gradient hooks still run.
    Duplicate rows need no guard: `PairwiseDistance` adds eps to the difference, so their distance
    is `eps * sqrt(D)` and each contributes a finite `-log(eps * (sqrt(D) + 1))` (~15.4 for
    eps=1e-8, D=384) -- large, which is the intended push apart, but never inf / NaN.

    Shapes:
        student_output (B, D) -> scalar.

    Example:
        >>> koleo = KoLeoLoss()
        >>> loss = koleo(torch.randn(32, 384))  # scalar, differentiable
    """

    def nn_distances(self, student_output: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
        """Per-row nearest-neighbour distances (B,) and indices (B,) of the normalised rows.

        Requires B >= 2.
        """
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            idx = pairwise_nearest_neighbours(x)
            distances = F.pairwise_distance(x, x[idx], p=2, eps=eps)
        return distances, idx

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """KoLeo loss of (B, D) features; 0 (graph-connected) when B < 2."""
        if student_output.shape[0] < 2:
            return student_output.float().sum() * 0.0
        distances, _ = self.nn_distances(student_output, eps)
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            return -torch.log(distances + eps).mean()

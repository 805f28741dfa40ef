"""DINO self-distillation loss on the CLS token (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers"; DINOv2 variant, Oquab et al. 2023).

The teacher's head outputs become targets either by centering + sharpening (DINO v1: a running mean
`center` is subtracted before a low-temperature softmax) or by Sinkhorn-Knopp (DINOv2 ViT-L/g).
The student is trained with the cross-entropy `-sum_k p_t log p_s` between every (student view,
teacher view) pair the caller passes in.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinokit.losses.centering import DeferredCenter
from dinokit.losses.sinkhorn import distributed_ready, sinkhorn_knopp

__all__ = ["DINOLoss"]


class DINOLoss(DeferredCenter, nn.Module):
    """Cross-entropy between teacher targets and student predictions, with teacher centering.

    The center update is deferred, as in the official code, so that its all_reduce overlaps with
    the backward pass: `update_center(t)` only computes (and launches the reduction of) the batch
    sum; the new center `m * center + (1 - m) * sum / count` (both over all ranks) is applied by
    `apply_center_update()`, which `softmax_center_teacher` calls first. Hence the targets of step
    i are centered with the statistics of steps < i.

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum m of the center (0.9).

    Shapes:
        teacher_output (n, K); center buffer (1, K); forward inputs are lists of (n, K) tensors.

    Example:
        >>> loss_fn = DINOLoss(1024)
        >>> t = loss_fn.softmax_center_teacher(torch.randn(16, 1024), teacher_temp=0.04)
        >>> loss_fn.update_center(torch.randn(16, 1024))
        >>> loss = loss_fn([torch.randn(16, 1024)], [t])  # scalar
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._init_center_state()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """DINO v1 targets `softmax((t - center) / teacher_temp)`, after applying a pending update.

        Args:
            teacher_output: (n, K) teacher head outputs.
            teacher_temp: teacher temperature (0.04 -> 0.07 warm-up).

        Returns:
            (n, K) probabilities.
        """
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """DINOv2 Sinkhorn-Knopp targets over the global batch (all ranks); independent of the center.

        The global batch size is the sum of the ranks' row counts (the official code assumes
        n * world_size, which breaks when a rank dropped undecodable images).

        Args:
            teacher_output: (n, K) teacher head outputs on this rank.
            teacher_temp: teacher temperature.
            n_iterations: Sinkhorn rounds (3).

        Returns:
            (n, K) float32 targets, rows sum to 1.
        """
        n_global: Tensor | int = teacher_output.shape[0]
        if distributed_ready():
            n_global = torch.tensor([teacher_output.shape[0]], device=teacher_output.device)
            dist.all_reduce(n_global)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_global, n_iterations)

    def forward(
        self,
        student_output_list: Iterable[Tensor],
        teacher_out_softmaxed_centered_list: Iterable[Tensor] | Tensor,
    ) -> Tensor:
        """Sum over ALL (student, teacher) pairs of the batch-mean cross-entropy (not averaged).

        No same-view pairs are excluded here: DINOv2 calls this once for the local crops against
        both teacher views and once for the global crops, and divides by the pair count itself.

        Args:
            student_output_list: student head outputs, each (n, K) logits.
            teacher_out_softmaxed_centered_list: teacher targets, each (n, K); a (V, n, K) tensor
                is iterated over its first dim.

        Returns:
            Scalar loss `-sum_{s,t} mean_b sum_k t * log_softmax(s / student_temp)`.
        """
        teachers = list(teacher_out_softmaxed_centered_list)
        total: Tensor | float = 0.0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teachers:
                total = total - torch.sum(t * lsm, dim=-1).mean()
        return torch.as_tensor(total)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Record the batch sum of `teacher_output` (n, K) and start its all_reduce (deferred)."""
        # float32 accumulation: under autocast the head output may be fp16.
        self._record_center(torch.sum(teacher_output.float(), dim=0, keepdim=True), len(teacher_output))

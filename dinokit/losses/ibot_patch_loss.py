"""iBOT masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer";
DINOv2 variant, Oquab et al. 2023).

The student sees global crops with some patches replaced by the mask token and must predict, at
those positions, the teacher's (unmasked) patch distributions. Cross-entropy per masked patch,
weighted by 1 / (masked patches in its image), averaged over images.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinokit.losses.centering import DeferredCenter
from dinokit.losses.sinkhorn import distributed_ready, sinkhorn_knopp

__all__ = ["iBOTPatchLoss"]


def _cross_entropy_terms(t: Tensor, s: Tensor, temp: float) -> Tensor:
    """Per-row `sum_k t * log_softmax(s / temp)` (the NEGATIVE cross-entropy), shape s.shape[:-1]."""
    return torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)


class iBOTPatchLoss(DeferredCenter, nn.Module):
    """Masked-patch cross-entropy with centering (iBOT) or Sinkhorn-Knopp (DINOv2) teacher targets.

    Center handling is deferred exactly as in `DINOLoss`; the center is the mean over images of the
    per-image token mean, buffer shape (1, 1, K).

    Args:
        patch_out_dim: number of prototypes K of the iBOT head.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).

    Shapes:
        dense form: tokens (B, N, K), masks (B, N) bool; packed form: masked tokens (M, K) (rows of
        the masked positions, in `masks.flatten()` order, possibly followed by padding rows).

    Example:
        >>> loss_fn = iBOTPatchLoss(256)
        >>> masks = torch.rand(4, 16) < 0.3
        >>> s, t = torch.randn(4, 16, 256), torch.randn(4, 16, 256).softmax(-1)
        >>> loss = loss_fn.forward_masked(s[masks], t[masks], masks)  # scalar
    """

    center: Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self._init_center_state()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """`softmax((t - center) / teacher_temp)` after applying a pending center update.

        Args:
            teacher_patch_tokens: (B, N, K) teacher head outputs (or (1, M, K) masked rows).
            teacher_temp: teacher temperature.

        Returns:
            probabilities, same shape as the input.
        """
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor | int,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets over all masked patches of the global batch.

        Unlike the official code this works without a process group, and it sums the patch count
        over ranks on a copy: the caller's `n_masked_patches_tensor` is left unchanged (the official
        in-place all_reduce silently turns it into the global count).

        Args:
            teacher_output: (n, K) teacher head outputs of this rank's masked patches.
            teacher_temp: teacher temperature.
            n_masked_patches_tensor: this rank's number of masked patches (int or 1-element tensor).
            n_iterations: Sinkhorn rounds (3).

        Returns:
            (n, K) float32 targets, rows sum to 1.
        """
        if isinstance(n_masked_patches_tensor, Tensor):
            n_global = n_masked_patches_tensor.detach().clone()
        else:
            n_global = torch.tensor([n_masked_patches_tensor], dtype=torch.long)
        if distributed_ready():
            n_global = n_global.to(teacher_output.device)
            dist.all_reduce(n_global)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_global, n_iterations)

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor) -> Tensor:
        """Dense form: per-image mean over masked patches, then mean over ALL B images.

        Images without a masked patch contribute 0 but still count in the mean (denominator
        clamped to 1).

        Args:
            student_patch_tokens: (B, N, K) student logits.
            teacher_patch_tokens: (B, N, K) teacher targets.
            student_masks_flat: (B, N) bool masks.

        Returns:
            scalar loss.
        """
        loss = _cross_entropy_terms(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        masks = student_masks_flat
        loss = torch.sum(loss * masks.float(), dim=-1) / masks.sum(dim=-1).clamp(min=1).to(loss.dtype)
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Packed form: `-sum_i w_i * sum_k t_ik log p_ik / B` over the masked rows.

        Args:
            student_patch_tokens_masked: (M', K) student logits of masked patches, M' >= M.
            teacher_patch_tokens_masked: (M', K) teacher targets, same rows.
            student_masks_flat: (B, N) bool masks; B (not M) is the denominator.
            n_masked_patches: keep only the first n rows (drops padding rows of a fixed-size buffer).
            masks_weight: (M,) per-patch weight; default `1 / (masked count of its image)`.

        Returns:
            scalar loss (equal to `forward` on the dense tensors).
        """
        loss = _cross_entropy_terms(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            counts = student_masks_flat.sum(-1).clamp(min=1)
            masks_weight = (1 / counts.to(loss.dtype)).unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """Record a batch of teacher outputs for the center and start its all_reduce.

        (B, N, K) dense tokens: the center moves to the mean over images of the per-image token
        mean (official). (M, K) masked rows: to the mean over all masked rows of all ranks. The
        official code passes the masked rows as (1, M, K), which averages the per-rank means; on
        one rank both give the same center.
        """
        t = teacher_patch_tokens.float()
        if t.dim() == 2:
            self._record_center(t.sum(0, keepdim=True), t.shape[0])
        else:
            self._record_center(torch.sum(t.mean(1), dim=0, keepdim=True), t.shape[0])

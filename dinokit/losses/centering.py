"""Deferred EMA centering of teacher outputs (DINO), shared by the [CLS] and patch losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dinokit.losses.sinkhorn import distributed_ready


class DeferredCenter:
    """Mixin for a module with a `center` buffer and a `center_momentum` float.

    The update is deferred, as in the official code, so that its all_reduce overlaps with the
    backward pass: `_record_center` only computes (and launches the reduction of) the batch sum
    and its row count; `apply_center_update` folds `m * center + (1 - m) * sum / count`, both summed
    over ranks, into the buffer and is called before the center is next used. The targets of step
    i are therefore centered with the statistics of steps < i.

    The count travels in the same all_reduce as the sum, so the center is the mean over the
    global batch even when ranks hold different numbers of rows (masked patches, skipped images);
    with equal counts this is the official `sum / (n * world_size)`.
    """

    center: Tensor
    center_momentum: float

    def _init_center_state(self) -> None:
        self.updated = True
        self.reduce_handle: dist.Work | None = None
        self.center_count: int | None = None
        self.async_batch_center: Tensor | None = None  # (sum..., count), flattened

    @torch.no_grad()
    def _record_center(self, batch_sum: Tensor, count: int) -> None:
        self.updated = False
        self.center_count = count
        # float32 holds counts exactly up to 2**24 rows per step (no float64: MPS lacks it).
        sum_and_count = batch_sum.detach().float().flatten()
        self.async_batch_center = torch.cat([sum_and_count, sum_and_count.new_tensor([count])])
        self.reduce_handle = None
        if distributed_ready():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold a pending update into `center`: `m * c + (1 - m) * sum / count` over all ranks."""
        if self.updated:
            return
        assert self.async_batch_center is not None and self.center_count is not None
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None
        total, count = self.async_batch_center[:-1], self.async_batch_center[-1]
        batch_center = (total / count.clamp(min=1)).to(self.center.dtype).view_as(self.center)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.updated = True

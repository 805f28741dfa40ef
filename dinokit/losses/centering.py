"""Deferred EMA centering of teacher outputs (DINO), shared by the [CLS] and patch losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dinokit.losses.sinkhorn import distributed_ready


class DeferredCenter:
    """Mixin for a module with a `center` buffer and a `center_momentum` float.

    The update is deferred, as in the official code, so that its all_reduce overlaps with the
    backward pass: `_record_center` only computes (and launches the reduction of) the batch sum;
    `apply_center_update` folds `m * center + (1 - m) * sum / (n * world_size)` into the buffer
    and is called before the center is next used. The targets of step i are therefore centered
    with the statistics of steps < i.
    """

    center: Tensor
    center_momentum: float

    def _init_center_state(self) -> None:
        self.updated = True
        self.reduce_handle: dist.Work | None = None
        self.center_count: int | None = None
        self.async_batch_center: Tensor | None = None

    @torch.no_grad()
    def _record_center(self, batch_sum: Tensor, count: int) -> None:
        self.updated = False
        self.center_count = count
        self.async_batch_center = batch_sum
        self.reduce_handle = None
        if distributed_ready():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold a pending update into `center`: `m * c + (1 - m) * sum / (n * world_size)`."""
        if self.updated:
            return
        assert self.async_batch_center is not None and self.center_count is not None
        world_size = dist.get_world_size() if distributed_ready() else 1
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None
        batch_center = self.async_batch_center / (self.center_count * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.updated = True

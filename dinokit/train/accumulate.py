"""Gradient accumulation: a rank's batch split into micro-batches for the student.

The teacher sees the whole batch once (so Sinkhorn-Knopp, centering and the center updates are
those of the unsplit step); the student runs forward and backward one micro-batch at a time
against its rows of the teacher's targets, each loss scaled by its share of the batch. Every
loss is a mean over images (DINO over crop pairs, iBOT over masked crops with per-crop weights),
so the accumulated gradient equals the unsplit one up to float rounding; KoLeo, whose nearest
neighbours are sought within the micro-batch, is the exception (as it is across ranks).

The split is made on the host, before the batch moves to the device: the masked-patch indices of
each micro-batch come from a `nonzero`, which on a GPU would wait for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dinokit.data.loader import batch_to_device

__all__ = ["MicroBatch", "micro_targets", "split_batch", "to_device"]



@dataclass
class MicroBatch:
    """One micro-batch: the student's batch dict, which rows of the teacher's targets are its
    own (`images`: positions in the rank's batch; `masked`: rows of the iBOT targets), and its
    share of the batch (the factor of its losses)."""

    batch: dict[str, Any]
    images: Tensor
    masked: Tensor
    share: float


def _crop_rows(images: Tensor, batch_size: int, n_views: int) -> Tensor:
    """Rows of crop-major crops (view v of image i at v * batch_size + i) for `images`, view-major."""
    return torch.cat([v * batch_size + images for v in range(n_views)])


def split_batch(batch: dict[str, Any], parts: int) -> list[MicroBatch]:
    """`batch` (as `collate_data_and_cast` makes it, on the host) in `parts` equal micro-batches."""
    n_global = batch["collated_global_crops"].shape[0]
    size = n_global // 2
    if parts < 1 or size % parts:
        raise ValueError(f"a batch of {size} images does not split into {parts} equal micro-batches")
    masks = batch["collated_masks"]
    n_tokens = masks.shape[1]
    n_local = batch["collated_local_crops"].shape[0] // size if size else 0
    masked_crop = batch["mask_indices_list"] // n_tokens  # crop row of each masked patch
    step = size // parts
    out = []
    for j in range(parts):
        images = torch.arange(j * step, (j + 1) * step)
        rows = _crop_rows(images, size, 2)
        micro_masks = masks[rows]
        # The masked patches of these crops, in the order the whole batch lists them (crop-major
        # rows keep their relative order, so the micro-batch's own indices list them alike).
        in_micro = torch.isin(masked_crop, rows)
        indices = micro_masks.flatten().nonzero().flatten()
        micro = {
            "collated_global_crops": batch["collated_global_crops"][rows],
            "collated_local_crops": batch["collated_local_crops"][_crop_rows(images, size, n_local)]
            if n_local else batch["collated_local_crops"],
            "collated_masks": micro_masks,
            "mask_indices_list": indices,
            "masks_weight": batch["masks_weight"][in_micro],
            "n_masked_patches": torch.full((1,), indices.shape[0], dtype=torch.long),
            "upperbound": int(micro_masks.sum()),
        }
        out.append(MicroBatch(micro, images, in_micro.nonzero().flatten(), step / size))
    return out


def to_device(micro: MicroBatch, device: torch.device) -> MicroBatch:
    return MicroBatch(batch_to_device(micro.batch, device), micro.images.to(device), micro.masked.to(device),
                      micro.share)


def micro_targets(targets: dict[str, Tensor], micro: MicroBatch) -> dict[str, Tensor]:
    """The teacher targets of one micro-batch's images and masked patches."""
    out = {"dino": targets["dino"][:, micro.images]}
    if "ibot" in targets:
        out["ibot"] = targets["ibot"][micro.masked]
    return out

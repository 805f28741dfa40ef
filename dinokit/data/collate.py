"""DINOv2 batch collation: stack multi-crop views crop-major and draw iBOT masks.

Matches `dinov2.data.collate.collate_data_and_cast` bit for bit, given the same Python random
state: the per-slot mask ratio is drawn with `uniform(probs[i], probs[i+1])` where `probs` are
float32 0-dim torch tensors (so `int(N * ratio)` truncates a float32 product, e.g. 64 * 0.3f =
19.2000008 -> 19), the masks are drawn slot by slot and then `shuffle`d, all from one stream.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dinokit.data.masking import MaskingGenerator, RandomSource

__all__ = ["collate_data_and_cast", "crops_and_masks", "draw_masks"]

# A sample as produced by the multi-crop dataset: ({"global_crops": [...], "local_crops": [...]}, target)
Sample = tuple[dict[str, Sequence[torch.Tensor]], Any]
MaskFn = Callable[..., np.ndarray]


def _stack_crop_major(samples_list: Sequence[Sample], key: str) -> torch.Tensor:
    """Stack `key` crops as [crop 0 of every image, crop 1 of every image, ...].

    Crop-major order is what the loss code assumes: chunking the batch into n_crops pieces gives
    one view of every image per chunk.

    Returns:
        (n_crops * n_images, C, H, W).
    """
    n_crops = len(samples_list[0][0][key])
    if n_crops == 0:  # e.g. no local crops: an empty batch the model skips
        return torch.empty(0)
    return torch.stack([s[0][key][i] for i in range(n_crops) for s in samples_list])


def draw_masks(
    n_crops: int,
    n_tokens: int,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    mask_generator: MaskFn,
    random_state: random.Random | None = None,
) -> tuple[torch.Tensor, int]:
    """The block masks of `n_crops` global crops, drawn exactly as the official collate does.

    `int(n_crops * mask_probability)` crops get a mask; their target ratios are spread over
    [r_min, r_max] by giving slot i a ratio uniform in [probs[i], probs[i+1]] with
    `probs = linspace(r_min, r_max, n_masked + 1)`. The other crops get an empty mask. The list is
    then shuffled so masked crops land on random images/views.

    Args:
        n_crops: number of global crops B.
        n_tokens: patches per crop N; the generator's grid must have N cells.
        mask_ratio_tuple, mask_probability, mask_generator, random_state: as in
            `collate_data_and_cast`.

    Returns:
        (B, N) bool masks and the upper bound: sum over masked slots of int(N * probs[i+1]).
    """
    rng: RandomSource = random_state if random_state is not None else random

    def draw_mask(target: int) -> torch.Tensor:
        out = mask_generator(target) if random_state is None else mask_generator(target, rng=random_state)
        return torch.from_numpy(np.asarray(out, dtype=bool))

    n = n_tokens
    n_samples_masked = int(n_crops * mask_probability)
    # float32 0-dim tensors on purpose: the official code indexes a torch.linspace, so the ratio
    # draw and N * ratio are float32 tensor arithmetic; int() then truncates the float32 value.
    probs = torch.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_samples_masked + 1)
    upperbound = 0
    masks_list: list[torch.Tensor] = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(draw_mask(int(n * rng.uniform(prob_min, prob_max))))
        upperbound += int(n * prob_max)
    for _ in range(n_samples_masked, n_crops):
        # Target 0 draws no random numbers; kept as a call for generality of mask_generator.
        masks_list.append(draw_mask(0))

    rng.shuffle(masks_list)

    masks = torch.stack(masks_list).flatten(1)  # (B, N)
    if masks.shape[1] != n:
        raise ValueError(f"mask grid has {masks.shape[1]} patches but n_tokens={n}")
    return masks, upperbound


def collate_data_and_cast(
    samples_list: Sequence[Sample],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskFn | None = None,
    random_state: random.Random | None = None,
    masks: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Collate multi-crop samples and draw block masks for the global crops (see `draw_masks`).

    Args:
        samples_list: n_images samples `({"global_crops": [(C,H,W)]*G, "local_crops": [(C,h,w)]*L}, _)`.
        mask_ratio_tuple: (min, max) mask ratio, e.g. (0.1, 0.5).
        mask_probability: fraction of global crops that get a mask, e.g. 0.5.
        dtype: dtype the crops are cast to (masks stay bool).
        n_tokens: patches per global crop N (= H_p * W_p); None -> taken from the generator's grid.
        mask_generator: callable `(num_masking_patches) -> bool ndarray (H_p, W_p)`, e.g. a
            `MaskingGenerator`. When `random_state` is given it is called with `rng=random_state`
            too, so the whole collate (ratios, masks, shuffle) draws from that single stream in the
            same order as the official code draws from the global one.
        random_state: dedicated stream; None -> the global `random` module (official behaviour).
        masks: (G * n_images, N) bool masks chosen by the caller (e.g. this rank's rows of masks
            drawn for the global batch); then nothing is drawn and `upperbound` is their count.

    Returns:
        dict with
        - collated_global_crops: (G * n_images, C, H, W) in `dtype`, crop-major.
        - collated_local_crops: (L * n_images, C, h, w) in `dtype`, crop-major.
        - collated_masks: bool (B, N).
        - mask_indices_list: int64 (M,) flat indices of masked patches in (B*N).
        - masks_weight: float32 (M,), 1 / (masked patches of that patch's crop).
        - upperbound: int, sum over masked slots of int(N * probs[i+1]) (float32 product).
        - n_masked_patches: int64 (1,) = [M].
    """
    collated_global_crops = _stack_crop_major(samples_list, "global_crops")
    collated_local_crops = _stack_crop_major(samples_list, "local_crops")

    if masks is not None:
        if masks.shape[0] != len(collated_global_crops):
            raise ValueError(f"{masks.shape[0]} masks for {len(collated_global_crops)} global crops")
        collated_masks, upperbound = masks.flatten(1).bool(), int(masks.sum())
    else:
        if mask_generator is None:
            raise ValueError("collate_data_and_cast needs a mask_generator (e.g. MaskingGenerator)")
        if n_tokens is None:
            if not isinstance(mask_generator, MaskingGenerator):
                raise ValueError("n_tokens is required when mask_generator is not a MaskingGenerator")
            n_tokens = mask_generator.num_patches
        collated_masks, upperbound = draw_masks(
            len(collated_global_crops), n_tokens, mask_ratio_tuple, mask_probability, mask_generator, random_state
        )
    return crops_and_masks(collated_global_crops, collated_local_crops, collated_masks, upperbound, dtype)


def crops_and_masks(global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor,
                    upperbound: int, dtype: torch.dtype) -> dict[str, Any]:
    """The batch dict of `collate_data_and_cast` from stacked crop-major crops and (B, N) masks."""
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        **mask_fields(masks, upperbound),
    }


def mask_fields(masks: torch.Tensor, upperbound: int) -> dict[str, Any]:
    """The mask entries of a batch dict from (B, N) bool masks (computed on the host: the
    `nonzero` would wait for a GPU)."""
    mask_indices_list = masks.flatten().nonzero().flatten()
    # Each masked patch weighs 1/(masked patches in its crop), so every masked crop counts equally.
    per_crop = 1 / masks.sum(-1).clamp(min=1.0)
    masks_weight = per_crop.unsqueeze(-1).expand_as(masks)[masks]
    return {
        "collated_masks": masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }

"""Block masking of iBOT / BEiT / DINOv2: random rectangles on the patch grid.

The generator must consume Python's `random` in exactly the order of the official
`dinov2.data.masking.MaskingGenerator` so that masks drawn after `random.seed(s)` are identical
bit for bit (the reference data stores such draws). Per rectangle attempt (at most 10):

1. `uniform(min_num_patches, max_mask_patches)`  -> target area
2. `uniform(log(min_aspect), log(max_aspect))`   -> log aspect ratio
3. only if the rectangle fits strictly (`w < width and h < height`):
   `randint(0, height - h)` (top), then `randint(0, width - w)` (left).

A rectangle is kept only if it adds at least one new patch and no more than the remaining budget,
so the masked count never exceeds the requested target (it can fall short when 10 attempts in a row
add nothing).
"""

from __future__ import annotations

import math
import random
from typing import Protocol, Sequence

import numpy as np

__all__ = ["MaskingGenerator", "RandomSource", "official_max_num_patches"]

# Attempts per rectangle before giving up on this call (official value).
_ATTEMPTS_PER_RECTANGLE = 10


class RandomSource(Protocol):
    """What the masking / collate code needs from a random stream.

    Both the `random` module and a `random.Random` instance satisfy it.
    """

    def uniform(self, a: float, b: float) -> float: ...

    def randint(self, a: int, b: int) -> int: ...

    def shuffle(self, x: list) -> None: ...


def official_max_num_patches(img_size: int, patch_size: int) -> float:
    """The `max_num_patches` value the official DINOv2 training script passes to the generator.

    The official `train.py` writes `0.5 * img_size // patch_size * img_size // patch_size`, meant as
    "half the patch grid" but parsed by Python as `((0.5 * img_size) // patch_size * img_size) //
    patch_size`: a float, floor-divided twice. It equals `0.5 * (S // p) ** 2` when the sizes divide
    evenly (224/14 -> 128.0, 224/16 -> 98.0) but is smaller otherwise (518/14 -> 666.0 instead of
    684.5, 98/14 -> 21.0 instead of 24.5). It only caps the area of ONE rectangle draw (the per-call
    target still bounds the total), so the quirk changes rectangle sizes, not the mask ratio budget.
    Reproduced here, on purpose, for parity with official training runs.

    Args:
        img_size: global crop side in pixels.
        patch_size: ViT patch size in pixels.

    Returns:
        The float cap on a single rectangle's area, in patches.
    """
    # Keep the official expression verbatim: the precedence IS the behaviour being reproduced.
    return 0.5 * img_size // patch_size * img_size // patch_size


class MaskingGenerator:
    """Draws block masks on an (H, W) patch grid.

    Args:
        input_size: grid size `(H, W)` or a single int for a square grid.
        num_masking_patches: stored for reference (the official class keeps it); it is also the
            default per-rectangle cap when `max_num_patches` is None. The per-call argument of
            `__call__` is the actual target.
        min_num_patches: lower bound of the uniform area draw of one rectangle.
        max_num_patches: upper bound (cap) of one rectangle's area; None -> `num_masking_patches`,
            or the whole grid when that is None too (the official code would fail there).
        min_aspect: smallest aspect ratio h/w; log-uniform in [min_aspect, max_aspect].
        max_aspect: largest aspect ratio; None (or 0) -> 1 / min_aspect.
        rng: random stream to draw from; None -> the global `random` module (official behaviour,
            needed for parity with reference draws). Pass a seeded `random.Random` in training to
            get reproducible masks that do not depend on (or disturb) the global state.
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        num_masking_patches: int | None = None,
        min_num_patches: float = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: RandomSource | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        # None means the global `random` module, looked up at call time so the generator pickles
        # (worker processes started with spawn / forkserver receive a copy).
        self.rng: RandomSource | None = rng

    def get_shape(self) -> tuple[int, int]:
        """Grid shape `(H, W)`."""
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(({self.height}, {self.width}) -> [?, {self.num_masking_patches}], "
            f"max = {self.max_num_patches}, {self.log_aspect_ratio[0]:.3f} ~ {self.log_aspect_ratio[1]:.3f})"
        )

    def _add_rectangle(self, mask: np.ndarray, max_mask_patches: float, rng: RandomSource) -> int:
        """Try up to 10 rectangles; paint the first one that adds new patches within budget.

        Args:
            mask: bool (H, W), modified in place.
            max_mask_patches: most new patches this rectangle may add.
            rng: random stream.

        Returns:
            Number of newly masked patches (0 when every attempt failed).
        """
        for _ in range(_ATTEMPTS_PER_RECTANGLE):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            # Python's round (banker's rounding) on Python floats, like the official code.
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            # Strict inequalities: a rectangle never spans the full grid side. The position is
            # drawn only for rectangles that fit, which matters for the random-call order.
            if not (w < self.width and h < self.height):
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            # Overlap rule: must add something, and not more than the remaining budget.
            if 0 < new <= max_mask_patches:
                region[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: RandomSource | None = None) -> np.ndarray:
        """Draw one mask with at most `num_masking_patches` masked patches.

        Args:
            num_masking_patches: target count (0 -> all False, no random draws).
            rng: stream for this call only; None -> the generator's own stream.

        Returns:
            np.ndarray bool of shape (H, W).
        """
        rng = rng if rng is not None else (self.rng if self.rng is not None else random)
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_rectangle(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask

"""Fit the quickstart to a folder of ordinary images: a working size chosen from the images, and
the images decoded once at that size.

The tiny preset is made for 28 px images (Fashion-MNIST): 14 px patches on 28 px crops. Photos
or icons of a few hundred pixels, cropped to 28 px, lose most of what tells them apart, and
decoding a full image for every step costs more than the step. `fit_folder` looks at the image
sizes: images of about 28 px keep the preset; larger ones are worked on at 56 px (a 4 x 4 grid
of 14 px patches on global crops, 2 x 2 on 28 px local crops), with fewer steps so that the
pretraining costs about what the preset costs on 28 px images. `cache_folder` then writes every
image once, resized (short side) and centre-cropped to the working size, as PNG in the same
class layout: training and evaluation read the small copies.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dinokit.data.batch_augment import SourceImage
from dinokit.data.datasets import ImageFolderDataset, load_image

__all__ = ["FolderFit", "cache_folder", "fit_folder"]

# Images whose median short side is at most this keep the tiny preset's 28 px crops.
SMALL_IMAGES_MAX = 48
WORKING_SIZE = 56
# Backbone tokens per image of the tiny preset at 28 px (teacher 2 x 5, student 2 x 5 + 2 x 2)
# and at 56 px (2 x 17, 2 x 17 + 2 x 5): the step count is scaled by their ratio.
TOKENS_28, TOKENS_56 = 24, 78


@dataclass(frozen=True)
class FolderFit:
    """What the quickstart changes for a folder, and why (stated in the report)."""

    median_short_side: int
    working_size: int
    overrides: tuple[str, ...]
    reason: str


def fit_folder(folder: ImageFolderDataset, preset_epochs: int, epoch_length: int, sample: int = 256) -> FolderFit:
    """The working size for `folder` from the sizes of up to `sample` of its images (read from
    the file headers, evenly spread over the sorted list), and the overrides that apply it."""
    step = max(1, len(folder) // sample)
    sides = []
    for i in range(0, len(folder), step):
        try:
            with Image.open(folder.path(i)) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):
            continue  # unreadable: the loader skips and counts it
    median = int(statistics.median(sides)) if sides else 0
    if median <= SMALL_IMAGES_MAX:
        return FolderFit(median, 28, (), f"images of about {median} px: the tiny preset's 28 px crops")
    # The whole schedule is shortened (not only stopped early), so the lr decays and the teacher
    # momentum reaches its final value.
    epochs = max(2, round(preset_epochs * TOKENS_28 / TOKENS_56))
    size, local = WORKING_SIZE, WORKING_SIZE // 2
    overrides = (f"crops.global_size={size}", f"crops.local_size={local}", f"model.img_size={size}",
                 f"crops.source_size={size}", f"optim.epochs={epochs}")
    return FolderFit(median, size, overrides,
                     f"images of about {median} px: worked on at {size} px (4 x 4 patches of 14 px on global "
                     f"crops, 2 x 2 on {local} px local crops), {epochs * epoch_length} steps so the "
                     f"pretraining costs about what {preset_epochs * epoch_length} steps cost at 28 px")


def cache_folder(folder: ImageFolderDataset, cache: Path, size: int) -> tuple[Path, int]:
    """Every image of `folder` decoded once, resized (short side) and centre-cropped to `size`,
    written as PNG under `cache` in the same layout; undecodable images are left out and
    counted. Reused when `cache` already holds a complete copy for the same folder and size.
    Returns (cache root, images skipped)."""
    manifest = cache / "cache.json"
    want = {"source": folder.root, "images": len(folder), "size": size}
    if manifest.is_file():
        done = json.loads(manifest.read_text())
        if {k: done.get(k) for k in want} == want:
            return cache / "images", int(done["skipped"])
    root = cache / "images"
    source = SourceImage(size)  # what the batched crops' loader does to each image, done once
    skipped = 0
    for i in range(len(folder)):
        image = load_image(folder.path(i))
        if image is None:
            skipped += 1
            continue
        rel = os.path.relpath(folder.path(i), folder.root)
        target = (root / rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source(image).permute(1, 2, 0).numpy()).save(target)
    manifest.write_text(json.dumps({**want, "skipped": skipped, "fit": "resize short side + centre crop"}))
    return root, skipped

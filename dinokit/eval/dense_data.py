"""Image / label-map pairs for the dense probes: segmentation masks and depth maps.

Layouts recognised (`DIR` as given on the command line, `DIR:SPLIT` where a layout has splits):

- generic segmentation: `DIR/images/*` and `DIR/masks/*.png` with matching file stems; masks
  hold class indices (0 = background, a class like any other; 255 = ignore);
- Pascal VOC as it ships (`VOC2012/` with `JPEGImages/`, `SegmentationClass/` and
  `ImageSets/Segmentation/{train,val}.txt`): `VOC2012:train`, `VOC2012:val`; palette PNGs are
  read as indices, 255 (the object borders) is ignored, 21 classes;
- ADE20k as it ships (`ADEChallengeData2016/` with `images/{training,validation}/` and
  `annotations/{training,validation}/`): `ADEChallengeData2016:training` / `:validation`; as in
  the official evaluation, label 0 ("other") becomes ignore and 1..150 become 0..149;
- depth: `DIR/images/*` and `DIR/depth/*.png` (16-bit PNG, metres = value / depth_scale,
  0 = no measurement). NYU-Depth v2 exports store millimetres (scale 1000), KITTI 1/256 m
  (scale 256).

Pairing is strict: an image without its label file, or a label file without its image, is an
error naming both folders and the first stems, never a silent drop. An image that cannot be
decoded is skipped and counted (its name goes into the results); a label file that cannot be
read, a mask whose size differs from its image, or a class index outside the stated classes is an
error naming the file, since the verdict would otherwise rest on labels we did not see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from dinokit.data.datasets import IMG_EXTENSIONS, DatasetError

__all__ = [
    "DenseDataError",
    "DenseSet",
    "IGNORE_INDEX",
    "open_dense_set",
    "read_depth",
    "read_mask",
]

IGNORE_INDEX = 255
Kind = Literal["segment", "depth"]


class DenseDataError(DatasetError):
    """A dense data set that cannot be used as given (the message names the file or folder)."""


@dataclass
class DenseSet:
    """Paired files of one split.

    Attributes:
        images / labels: paths, pairwise (label = mask PNG or depth PNG).
        kind: "segment" or "depth".
        layout: "generic", "voc" or "ade20k" (how the folder was read).
        num_classes: the layout's class count (VOC 21, ADE20k 150), else None (from the data).
        reduce_zero_label: ADE20k's convention (0 -> ignore, c -> c - 1).
        spec: what the user passed.
    """

    images: list[Path]
    labels: list[Path]
    kind: Kind
    layout: str
    num_classes: int | None
    reduce_zero_label: bool
    spec: str

    def __len__(self) -> int:
        return len(self.images)


def _files_by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise DenseDataError(f"{folder}: no such folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            if path.stem in found:
                raise DenseDataError(f"{folder}: two files with the stem {path.stem!r} "
                                     f"({found[path.stem].name}, {path.name}); cannot tell which one pairs")
            found[path.stem] = path
    return found


def _pair(image_dir: Path, label_dir: Path, label_ext: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    images = _files_by_stem(image_dir, IMG_EXTENSIONS)
    labels = _files_by_stem(label_dir, label_ext)
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"{len(no_label)} image(s) in {image_dir} without a file in {label_dir} "
                         f"(first: {', '.join(no_label[:3])})")
        if no_image:
            parts.append(f"{len(no_image)} file(s) in {label_dir} without an image in {image_dir} "
                         f"(first: {', '.join(no_image[:3])})")
        raise DenseDataError("; ".join(parts))
    if not images:
        raise DenseDataError(f"{image_dir}: no images")
    stems = sorted(images)
    return [images[s] for s in stems], [labels[s] for s in stems]


def _split_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DenseDataError(f"{path}: no such split list")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def open_dense_set(spec: str | os.PathLike, kind: Kind) -> DenseSet:
    """Recognise the layout of `spec` (see the module docstring) and pair its files."""
    text = os.fspath(spec)
    root_text, _, split = text.rpartition(":") if ":" in text and not os.path.exists(text) else (text, "", "")
    root = Path(root_text)
    if not root.is_dir():
        raise DenseDataError(f"{text}: no such folder")
    if kind == "depth":
        images, labels = _pair(root / "images", root / "depth", (".png",))
        return DenseSet(images, labels, "depth", "generic", None, False, text)
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():  # Pascal VOC
        stems = _split_list(root / "ImageSets" / "Segmentation" / f"{split or 'train'}.txt")
        images = [root / "JPEGImages" / f"{s}.jpg" for s in stems]
        labels = [root / "SegmentationClass" / f"{s}.png" for s in stems]
        missing = [str(p) for p in (*images, *labels) if not p.is_file()]
        if missing:
            raise DenseDataError(f"{text}: {len(missing)} listed file(s) missing (first: {', '.join(missing[:3])})")
        return DenseSet(images, labels, "segment", "voc", 21, False, text)
    if (root / "images").is_dir() and (root / "annotations").is_dir():  # ADE20k
        sub = split or "training"
        images, labels = _pair(root / "images" / sub, root / "annotations" / sub, (".png",))
        return DenseSet(images, labels, "segment", "ade20k", 150, True, text)
    if split:
        raise DenseDataError(f"{text}: a split ({split!r}) was given but {root} is neither a Pascal VOC "
                             "nor an ADE20k folder")
    images, labels = _pair(root / "images", root / "masks", (".png",))
    return DenseSet(images, labels, "segment", "generic", None, False, text)


def read_mask(path: Path, size: tuple[int, int], reduce_zero_label: bool = False) -> np.ndarray:
    """Class indices (H, W) uint8 of a mask PNG; `size` = its image's (W, H), which it must match."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise DenseDataError(f"{path}: a mask must be a single-channel PNG of class indices, "
                                     f"got mode {im.mode}")
            mask = np.array(im)
    except DenseDataError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure: the file is unusable
        raise DenseDataError(f"{path}: cannot read the mask ({type(err).__name__}: {err})") from err
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise DenseDataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}")
    if mask.max(initial=0) > IGNORE_INDEX:
        raise DenseDataError(f"{path}: class index {int(mask.max())} above {IGNORE_INDEX}")
    if reduce_zero_label:
        reduced = mask.astype(np.int16) - 1
        reduced[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
        mask = reduced
    return mask.astype(np.uint8)


def read_depth(path: Path, size: tuple[int, int], depth_scale: float) -> np.ndarray:
    """Depth (H, W) float32 in metres (0 = no measurement) of a 16-bit PNG divided by `depth_scale`."""
    try:
        with Image.open(path) as im:
            depth = np.array(im)
    except Exception as err:  # noqa: BLE001
        raise DenseDataError(f"{path}: cannot read the depth PNG ({type(err).__name__}: {err})") from err
    if depth.ndim != 2 or depth.dtype not in (np.uint16, np.int32, np.uint8):
        raise DenseDataError(f"{path}: a depth map must be a single-channel 16-bit PNG, got array "
                             f"{depth.dtype} {tuple(depth.shape)}")
    if (depth.shape[1], depth.shape[0]) != tuple(size):
        raise DenseDataError(f"{path}: depth map is {depth.shape[1]}x{depth.shape[0]} but its image is "
                             f"{size[0]}x{size[1]}")
    return depth.astype(np.float32) / float(depth_scale)


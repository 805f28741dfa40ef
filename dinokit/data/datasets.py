"""Image datasets: a folder tree, a list file, and Fashion-MNIST, plus robust image decoding.

Every dataset is map-style and returns `(PIL.Image in RGB mode, label: int)`, label -1 when the
data carries none. The file-based datasets return **None** for a file that cannot be decoded
(truncated, empty, not an image, too large, ...): `load_image` warns once per file naming it, and
the None travels on to the multi-crop wrapper and the loader's collate, which drops it and counts
it in the batch (`batch["n_skipped"]`). Counting in the batch, not in a dataset attribute, is what
survives DataLoader worker processes: each worker has its own copy of the dataset, but every batch
comes back to the training loop.

Paths are stored packed (one bytes buffer + offsets in numpy), not as a list of Python strings:
workers forked from the main process then share the table instead of copying it page by page as
reference counts change (the well-known "DataLoader memory grows with num_workers" effect).

Example:
    >>> ds = ImageFolderDataset("/data/pets")          # pets/cat/*.jpg, pets/dog/*.jpg
    >>> ds.classes, len(ds)
    (['cat', 'dog'], 2000)
    >>> item = ds[0]                                    # (PIL RGB image, 0) or None if unreadable
"""

from __future__ import annotations

import gzip
import inspect
import os
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FASHION_MNIST_CLASSES",
    "IMG_EXTENSIONS",
    "DatasetError",
    "FashionMNIST",
    "FileListDataset",
    "ImageDecodeWarning",
    "ImageFolderDataset",
    "Item",
    "MultiCropDataset",
    "load_image",
    "to_rgb",
]

# What a dataset returns: (RGB image, label) or None for a file that could not be decoded.
Item = tuple[Image.Image, int] | None

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp",
)
# 8192 x 8192. Larger images are skipped: decoding one costs ~200 MB per worker, and PIL's own
# limit (89.5 Mpx warning, 179 Mpx error) is a process-wide global we do not want to change.
DEFAULT_MAX_PIXELS = 8192 * 8192

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetError(ValueError):
    """A dataset cannot be built (missing folder, no images, bad list or data file)."""


class ImageDecodeWarning(UserWarning):
    """An image file was skipped (filter with `warnings.simplefilter('ignore', ImageDecodeWarning)`)."""


# ----------------------------------------------------------------------------- decoding


def _scale_high_bit_depth(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit "L", scaled rather than clipped.

    PIL's own `convert("L")` clips I;16 / I values to 255, which turns a 16-bit scan white.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0  # 65535 -> 255
    else:
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0  # float image in [0, 1]
        elif im.mode == "I" and lo >= 0.0 and hi <= 255.0:
            out = arr  # 8-bit data stored as int32
        elif im.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            out = arr / 257.0  # 16-bit PNG decoded as "I" by older Pillow
        else:
            out = (arr - lo) / max(hi - lo, 1e-12) * 255.0  # anything else: stretch min..max
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))  # 2-D uint8 -> "L"


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to "RGB".

    Transparent images (RGBA, LA, PA, P / L / RGB with a `transparency` key) are composited on
    `background` (white) so that transparent pixels do not turn into whatever colour they happen
    to store (often black). High-bit-depth grayscale (I;16, I, F) is rescaled to 8 bits.

    Args:
        im: a decoded image, any mode.
        background: colour behind transparent pixels.

    Returns:
        A new "RGB" image of the same size.
    """
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return _scale_high_bit_depth(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, ...


def load_image(
    path: str | os.PathLike,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image | None:
    """Decode an image file to RGB, or return None (with a warning naming the file).

    Never raises on bad data: empty, truncated, non-image, undecodable or oversized files give
    None and an `ImageDecodeWarning`. The size check reads only the header, so a decompression bomb
    is never decoded.

    Args:
        path: image file.
        max_pixels: skip images with more than this many pixels (None: no limit of ours; PIL's
            DecompressionBombError still applies).
        exif_transpose: apply the EXIF orientation tag (photos from phones are stored sideways).

    Returns:
        An "RGB" image (first frame of animated / multi-page files), or None.

    Example:
        >>> im = load_image("cat.png")   # RGBA png -> composited on white
        >>> im.mode
        'RGB'
    """
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; PIL's warning would otherwise fire per large image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ValueError(f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
                im.load()  # raises on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES is off)
                if exif_transpose:
                    ImageOps.exif_transpose(im, in_place=True)  # in place: no extra copy
                rgb = to_rgb(im)
                # Closing the file invalidates `im`; to_rgb returns `im` itself when already RGB.
                return rgb.copy() if rgb is im else rgb
    except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
        warnings.warn(f"dinokit: skipping image {os.fspath(path)!r}: {type(err).__name__}: {err}",
                      ImageDecodeWarning, stacklevel=2)
        return None


# ----------------------------------------------------------------------------- path table


class _PathTable:
    """Many paths in two numpy arrays (utf-8/fs bytes + offsets); no per-path Python objects."""

    def __init__(self, paths: Iterable[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._buffer[self._offsets[i] : self._offsets[i + 1]].tobytes())


class _FileDataset(Dataset):
    """Shared part of the file-based datasets: packed paths + int64 labels, decode on access."""

    def __init__(self, root: str, paths: Sequence[str], labels: Sequence[int], max_pixels: int | None) -> None:
        self.root = root
        self._paths = _PathTable(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        """Full path of sample `index`."""
        return os.path.join(self.root, self._paths[index])

    def __getitem__(self, index: int) -> Item:
        image = load_image(self.path(index), max_pixels=self.max_pixels)
        if image is None:
            return None
        return image, int(self.labels[index])


def _has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


class ImageFolderDataset(_FileDataset):
    """All images under `root`, found recursively, in sorted (deterministic) order.

    Labels come from the first-level sub-folders when every image sits in one (`root/<class>/...`,
    class names sorted -> ids 0..C-1, `classes` lists them); if any image sits directly in `root`
    the dataset is unlabeled (label -1, `classes == []`). Hidden files and folders (".name", e.g.
    macOS "._x.jpg" resource forks) are ignored.

    Args:
        root: folder to scan.
        extensions: accepted file name endings, case-insensitive.
        max_pixels: passed to `load_image`.

    Raises:
        DatasetError: `root` is missing / not a folder, or holds no image.

    Example:
        >>> ds = ImageFolderDataset("/data/pets")
        >>> image, label = ds[0]   # ds[i] is None when file i cannot be decoded
    """

    def __init__(
        self,
        root: str | os.PathLike,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(root):
            raise DatasetError(f"image folder {root!r} does not exist or is not a folder")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        rel_paths: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # in place: prunes the walk
            rel_dir = os.path.relpath(dirpath, root)
            for name in filenames:
                if not name.startswith(".") and _has_extension(name, exts):
                    rel_paths.append(name if rel_dir == "." else os.path.join(rel_dir, name))
        # Order by path components (not by string: "a-b/x" would sort between "a/" entries).
        rel_paths.sort(key=lambda p: p.split(os.sep))
        if not rel_paths:
            raise DatasetError(f"no image files ({', '.join(exts)}) found under {root!r}")

        first_parts = [p.split(os.sep, 1) for p in rel_paths]
        if all(len(parts) == 2 for parts in first_parts):
            self.classes: list[str] = sorted({parts[0] for parts in first_parts})
            class_to_idx = {c: i for i, c in enumerate(self.classes)}
            labels = [class_to_idx[parts[0]] for parts in first_parts]
        else:
            self.classes = []
            labels = [-1] * len(rel_paths)
        super().__init__(root, rel_paths, labels, max_pixels)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, n={len(self)}, classes={len(self.classes)})"


class FileListDataset(_FileDataset):
    """Images listed in a text file, one per line: `path` or `path<TAB>label`.

    Relative paths are resolved against `root`, or the list file's folder when `root` is None.
    Blank lines and lines starting with '#' are ignored; lines without a label get -1. Files are
    not checked at construction (lists can hold millions); unreadable ones give None on access.

    Args:
        list_file: the text file (utf-8).
        root: base folder for relative paths.
        max_pixels: passed to `load_image`.

    Raises:
        DatasetError: the list file is missing, holds no path, or a label is not an integer.

    Example:
        >>> ds = FileListDataset("train.txt")   # lines like "img/0001.jpg\\t3"
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        list_file = os.path.abspath(os.fspath(list_file))
        if not os.path.isfile(list_file):
            raise DatasetError(f"image list file {list_file!r} does not exist")
        base = os.path.abspath(os.fspath(root)) if root is not None else os.path.dirname(list_file)
        paths: list[str] = []
        labels: list[int] = []
        with open(list_file, encoding="utf-8") as f:
            for line_no, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                path, _, label_text = line.partition("\t")
                label_text = label_text.strip()
                try:
                    label = int(label_text) if label_text else -1
                except ValueError:
                    raise DatasetError(
                        f"{list_file!r} line {line_no}: label {label_text!r} is not an integer"
                    ) from None
                # os.path.join keeps absolute paths as they are.
                paths.append(os.path.join(base, path.strip()))
                labels.append(label)
        if not paths:
            raise DatasetError(f"image list file {list_file!r} lists no image")
        self.list_file = list_file
        super().__init__("", paths, labels, max_pixels)

    def __repr__(self) -> str:
        return f"FileListDataset(list_file={self.list_file!r}, n={len(self)})"


# ----------------------------------------------------------------------------- Fashion-MNIST

_IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dim
_FASHION_HINT = "the Debian package `dataset-fashion-mnist` provides these files (apt-get install dataset-fashion-mnist)"


def _read_idx(folder: str, stem: str, magic: int, n_dims: int) -> np.ndarray:
    """Read one IDX file (`stem.gz`, else uncompressed `stem`) into a uint8 array.

    Raises:
        DatasetError: file missing, unreadable, bad magic number or size mismatch.
    """
    candidates = [os.path.join(folder, stem + ".gz"), os.path.join(folder, stem)]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise DatasetError(f"Fashion-MNIST file {candidates[0]!r} not found; {_FASHION_HINT}")
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError
        raise DatasetError(f"Fashion-MNIST file {path!r} is corrupt ({err}); {_FASHION_HINT}") from None
    header = 4 + 4 * n_dims
    if len(raw) < header:
        raise DatasetError(f"Fashion-MNIST file {path!r} is too short ({len(raw)} bytes) for an IDX header")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise DatasetError(f"Fashion-MNIST file {path!r} has magic number {found_magic:#010x}, expected {magic:#010x}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DatasetError(
            f"Fashion-MNIST file {path!r} holds {len(raw)} bytes but its header {dims} says {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class FashionMNIST(Dataset):
    """Fashion-MNIST from the gzipped IDX files (70k 28x28 grayscale images, 10 classes).

    Images are returned as 28x28 "RGB" PIL images (gray replicated) so that the same transforms
    serve photos and Fashion-MNIST. `data` (N, 28, 28) uint8 and `targets` (N,) int64 give raw
    access (e.g. raw-pixel k-NN baselines).

    Args:
        root: folder with `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
            `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz` (uncompressed names work too).
        split: "train" (60k) or "test" (10k).

    Raises:
        DatasetError: a file is missing or corrupt (the message names it).

    Example:
        >>> ds = FashionMNIST(split="test")
        >>> image, label = ds[0]          # (<PIL RGB 28x28>, 9)  -> FASHION_MNIST_CLASSES[9]
    """

    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, root: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train") -> None:
        if split not in ("train", "test"):
            raise DatasetError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DatasetError(f"Fashion-MNIST folder {self.root!r} does not exist; {_FASHION_HINT}")
        prefix = "train" if split == "train" else "t10k"
        self.split = split
        self.data = _read_idx(self.root, f"{prefix}-images-idx3-ubyte", _IDX_IMAGES_MAGIC, 3)
        self.targets = _read_idx(self.root, f"{prefix}-labels-idx1-ubyte", _IDX_LABELS_MAGIC, 1).astype(np.int64)
        if len(self.data) != len(self.targets):
            raise DatasetError(
                f"Fashion-MNIST {split} in {self.root!r}: {len(self.data)} images but {len(self.targets)} labels"
            )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.data[index]).convert("RGB")  # 2-D uint8 -> "L"
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(root={self.root!r}, split={self.split!r}, n={len(self)})"


# ----------------------------------------------------------------------------- multi-crop wrapper


def _accepts_generator(fn: Callable[..., Any]) -> bool:
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return False


class MultiCropDataset(Dataset):
    """Applies a multi-crop transform to a base dataset: `(crops_dict, label)`, or None.

    None (the base could not decode the image) is passed through for the loader's collate to drop
    and count, see `dinokit.data.loader`.

    Args:
        base: map-style dataset returning `(PIL image, label)` or None.
        transform: e.g. `MultiCropAugmentation`; called as `transform(image, generator=g)` when it
            accepts a `generator` keyword, else `transform(image)` with torch's global RNG seeded
            from `g` for the call (and restored after), so either kind is reproducible.

    Example:
        >>> ds = MultiCropDataset(FashionMNIST(split="test"), MultiCropAugmentation(28, 12))
        >>> crops, label = ds.get(0, generator=torch.Generator().manual_seed(0))
        >>> crops["global_crops"][0].shape
        torch.Size([3, 28, 28])
    """

    def __init__(self, base: Dataset, transform: Callable[..., dict[str, Any]]) -> None:
        self.base = base
        self.transform = transform
        self._takes_generator = _accepts_generator(transform)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def get(self, index: int, generator: torch.Generator | None = None) -> tuple[dict[str, Any], int] | None:
        """Sample `index` with all augmentation randomness drawn from `generator` (None: global RNG)."""
        item = self.base[index]
        if item is None:
            return None
        image, label = item
        if generator is None:
            return self.transform(image), label
        if self._takes_generator:
            return self.transform(image, generator=generator), label
        # A transform on torch's global RNG: seed it for this call only, leaving the caller's
        # stream as it was.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label

    def __getitem__(self, index: int) -> tuple[dict[str, Any], int] | None:
        return self.get(index)

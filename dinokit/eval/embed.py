"""Frozen-backbone features of a labelled image set, in memory or streamed to safetensors shards.

Feature kinds (all from ONE forward per batch through `get_intermediate_layers(x, n_max,
return_class_token=True, norm=True)`; every output goes through the final LayerNorm):

- `cls`: the normed [CLS] token of the last block (= `x_norm_clstoken`), (B, D);
- `avgpool`: mean of the last block's normed patch tokens (= mean of `x_norm_patchtokens`; registers
  excluded), (B, D);
- `gem`: generalised mean (p = 3) of the last block's normed patch tokens, clamped at 1e-6 as GeM
  pooling is defined for non-negative activations (Radenovic et al., 2018), (B, D);
- `cls_last{n}` (`cls_lastN` means n = `n_last_blocks`): the normed [CLS] of the last n blocks
  concatenated, earliest first, (B, n * D);
- `cls_last{n}_avgpool`: the official DINOv2 linear-probe input, `cls_last{n}` followed by the
  `avgpool` of the last block, (B, (n + 1) * D).

Datasets return `(PIL image, label)` or None for a file that cannot be decoded; None rows are
dropped and their dataset indices kept in `skipped`.

Example:
    >>> ds = open_dataset("fashion_mnist", "test")
    >>> rb = resolve_feature_model("runs/fmnist")                 # or "pixels", or an nn.Module
    >>> out = extract_features(rb.model, ds, eval_transform_for(rb.image_size), features=("cls", "avgpool"))
    >>> out.features["cls"].shape, out.labels.shape, out.skipped
    (torch.Size([10000, 192]), torch.Size([10000]), [])
    >>> write_feature_shards("feats/test", rb.model, ds, eval_transform_for(28), shard_size=4096)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from dinokit.checkpoint.resolve import ResolvedBackbone, resolve_backbone
from dinokit.data.datasets import DatasetError, FashionMNIST, FileListDataset, ImageFolderDataset
from dinokit.data.transforms import eval_transform

__all__ = [
    "OFFICIAL_LINEAR_FEATURES",
    "Extracted",
    "PixelBackbone",
    "PreprocessedImages",
    "default_device",
    "eval_transform_for",
    "extract_features",
    "infer_image_size",
    "feature_identity",
    "is_feature_dir",
    "iter_feature_batches",
    "iter_feature_shards",
    "linear_feature_kinds",
    "open_dataset",
    "parse_feature_kind",
    "read_features",
    "resolve_feature_model",
    "subset",
    "write_feature_shards",
    "write_json",
]

# {last 1, last 4 blocks' CLS} x {without, with avgpool}: the DINOv2 linear-evaluation inputs.
OFFICIAL_LINEAR_FEATURES: tuple[str, ...] = ("cls_last1", "cls_last1_avgpool", "cls_last4", "cls_last4_avgpool")
MANIFEST = "manifest.json"
LABELS_FILE = "labels.safetensors"
GEM_P, GEM_EPS = 3.0, 1e-6
_KIND_RE = re.compile(r"^cls_last(\d+|N)(_avgpool)?$")
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class Extracted(NamedTuple):
    """Features of a dataset: `features[name]` (M, D_name) float32 on CPU, `labels` (M,) int64,
    `skipped`: dataset indices that could not be decoded (M = len(dataset) - len(skipped))."""

    features: dict[str, Tensor]
    labels: Tensor
    skipped: list[int]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_num_workers(device: str | None, requested: int | None = None) -> int:
    """Loader workers for feature extraction: `requested` when given; else on a GPU up to 8 (one
    per core short of the main process), so decoding keeps the GPU fed, and on the CPU none,
    since the model itself uses every core."""
    if requested is not None:
        return requested
    if (device or default_device()).startswith("cuda"):
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    return 0


# ----------------------------------------------------------------------------- feature kinds


def parse_feature_kind(kind: str, n_last_blocks: int = 4) -> tuple[str, int, bool]:
    """`kind` -> (canonical name, blocks needed, with avgpool).

    >>> parse_feature_kind("cls_lastN_avgpool", 4), parse_feature_kind("avgpool")
    (('cls_last4_avgpool', 4, True), ('avgpool', 1, True))
    """
    if kind == "cls":
        return "cls", 1, False
    if kind == "avgpool":
        return "avgpool", 1, True
    if kind == "gem":
        return "gem", 1, True
    m = _KIND_RE.match(kind)
    if not m:
        raise ValueError(f"unknown feature kind {kind!r}: use cls, avgpool, gem, cls_last<n>[_avgpool] or "
                         "cls_lastN[_avgpool]")
    n = n_last_blocks if m.group(1) == "N" else int(m.group(1))
    if n < 1:
        raise ValueError(f"feature kind {kind!r}: the number of blocks must be >= 1")
    avg = m.group(2) is not None
    return f"cls_last{n}{'_avgpool' if avg else ''}", n, avg


def linear_feature_kinds(depth: int, n_last_blocks: int = 4) -> list[str]:
    """The official linear-probe set for a model with `depth` blocks (n clamped to the depth)."""
    n = min(n_last_blocks, depth)
    kinds = ["cls_last1", "cls_last1_avgpool", f"cls_last{n}", f"cls_last{n}_avgpool"]
    return list(dict.fromkeys(kinds))  # depth 1: last-1 and last-n coincide


def _compute_kinds(model: nn.Module, x: Tensor, parsed: Sequence[tuple[str, int, bool]]) -> dict[str, Tensor]:
    """One forward, every requested kind: {name: (B, D_name)}."""
    n_max = max(n for _, n, _ in parsed)
    # Tuple over the last n_max blocks, earliest first, of (patch tokens (B, N, D), cls (B, D)).
    outs = model.get_intermediate_layers(x, n=n_max, return_class_token=True, norm=True)
    out: dict[str, Tensor] = {}
    for name, n, avg in parsed:
        if name == "cls":
            f = outs[-1][1]
        elif name == "avgpool":
            f = outs[-1][0].mean(dim=1)
        elif name == "gem":
            f = outs[-1][0].float().clamp(min=GEM_EPS).pow(GEM_P).mean(dim=1).pow(1.0 / GEM_P)
        else:
            parts = [cls for _, cls in outs[-n:]]
            if avg:
                parts.append(outs[-1][0].mean(dim=1))
            f = torch.cat(parts, dim=-1)
        out[name] = f.float()
    return out


# ----------------------------------------------------------------------------- raw-pixel "backbone"


class PixelBackbone(nn.Module):
    """Raw-pixel baseline with the backbone interface: "cls" = the flattened normalised image.

    `get_intermediate_layers(x (B, C, H, W), n)` returns n copies of (pixels (B, H*W, C),
    flattened image (B, C*H*W)), so "avgpool" is the mean colour. Nothing is learnt.
    """

    depth = 1

    def __init__(self, image_size: int | None = None) -> None:
        super().__init__()
        self.image_size = image_size
        self.blocks = nn.ModuleList([nn.Identity()])  # len(blocks) == depth, as a ViT

    def get_intermediate_layers(self, x: Tensor, n: int = 1, return_class_token: bool = True,
                                norm: bool = True, **_: Any) -> tuple[tuple[Tensor, Tensor], ...]:
        flat = x.flatten(1)
        pixels = x.flatten(2).transpose(1, 2)
        return tuple((pixels, flat) for _ in range(n if isinstance(n, int) else len(n)))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


# ----------------------------------------------------------------------------- backbones, transforms, datasets


def resolve_feature_model(backbone: Any, arch: str | None = None, random_init: bool = False,
                          image_size: int | None = None) -> ResolvedBackbone:
    """Anything that names a backbone -> `ResolvedBackbone` (model in eval mode, source, image_size).

    Args:
        backbone: run folder / checkpoint file / architecture name (see `resolve_backbone`),
            `"pixels"` or `"pixels:SIZE"` (raw-pixel baseline, crop SIZE), an `nn.Module`, or an
            already resolved backbone.
        image_size: evaluation crop; overrides the backbone's (a bare module defaults to 224, a
            `pixels` without size to 0 = "infer from the data", see `infer_image_size`).
    """
    if hasattr(backbone, "model") and hasattr(backbone, "image_size"):
        return backbone
    if isinstance(backbone, nn.Module):
        return ResolvedBackbone(backbone.eval(), type(backbone).__name__, image_size or 224)
    spec = str(backbone)
    if spec == "pixels" or spec.startswith("pixels:"):
        size = image_size or (int(spec.split(":", 1)[1]) if ":" in spec else 0)
        return ResolvedBackbone(PixelBackbone(size or None), f"pixels (raw-pixel baseline{f', {size} px' if size else ''})", size)
    rb = resolve_backbone(spec, arch=arch, random_init=random_init)
    if image_size:
        rb.image_size = image_size
    return rb


def infer_image_size(dataset: Dataset, max_tries: int = 16) -> int:
    """Short side of the first decodable image (raw-pixel baseline without an explicit size)."""
    for i in range(min(len(dataset), max_tries)):  # type: ignore[arg-type]
        item = dataset[i]
        if item is not None:
            return int(min(item[0].size))
    raise DatasetError("cannot infer an image size: the first images could not be decoded")


def eval_transform_for(image_size: int, resize: int | None = None, crop: int | None = None) -> Callable[..., Tensor]:
    """`eval_transform` for a backbone: crop = image_size, resize = round(crop * 256 / 224)
    (224 -> 256, 28 -> 32), each overridable."""
    crop = int(crop or image_size)
    resize = int(resize or round(crop * 256 / 224))
    return eval_transform(resize=resize, crop=crop)


def open_dataset(spec: str | os.PathLike, split: str = "train") -> Dataset:
    """A labelled dataset from a command-line spec.

    - `fashion_mnist` or `fashion_mnist:ROOT`: Fashion-MNIST `split` ("train" / "test");
    - a folder: `ImageFolderDataset` (labels from sub-folders; `split` unused);
    - a `.txt` file: `FileListDataset` (`path<TAB>label` lines; `split` unused).
    """
    text = os.fspath(spec)
    name, _, root = text.partition(":")
    if name in ("fashion_mnist", "fashion-mnist", "fmnist"):
        return FashionMNIST(root, split) if root else FashionMNIST(split=split)
    if os.path.isdir(text):
        return ImageFolderDataset(text)
    if os.path.isfile(text) and text.endswith(".txt"):
        return FileListDataset(text)
    raise DatasetError(f"dataset {text!r} is neither fashion_mnist[:root], an image folder nor a .txt file list")


def subset(dataset: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of `n` samples (sorted indices), or the dataset itself when n is None
    or >= its size; for quick evaluations of large sets."""
    size = len(dataset)  # type: ignore[arg-type]
    if n is None or n >= size:
        return dataset
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(size, generator=g)[:n].sort().values
    return Subset(dataset, idx.tolist())


# ----------------------------------------------------------------------------- extraction


class _Indexed(Dataset):
    """(index, transformed image or None, label): the transform runs in the loader workers."""

    def __init__(self, base: Dataset, transform: Callable[..., Tensor] | None) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, int]:
        item = self.base[i]
        if item is None:
            return i, None, -1
        image, label = item
        return i, (self.transform(image) if self.transform is not None else image), int(label)


def _collate(items: list[tuple[int, Tensor | None, int]]) -> tuple[Tensor | None, Tensor, Tensor, list[int]]:
    """-> (images (B', C, H, W) or None, labels (B',), dataset indices (B',), skipped indices)."""
    kept = [it for it in items if it[1] is not None]
    skipped = [it[0] for it in items if it[1] is None]
    images = torch.stack([it[1] for it in kept]) if kept else None  # type: ignore[misc]
    labels = torch.tensor([it[2] for it in kept], dtype=torch.int64)
    index = torch.tensor([it[0] for it in kept], dtype=torch.int64)
    return images, labels, index, skipped


class PreprocessedImages(Dataset):
    """A labelled dataset passed through `transform` once and held in memory as one tensor, so
    that several backbones evaluated on the same images (a trained model, its random init, raw
    pixels) decode and preprocess each image once. Items are `(image tensor, label)`, or None where
    `base` had an undecodable image (the index stays, so skipped counts are unchanged).
    `split_features` takes it in place of the raw dataset when its transform is the same.
    Memory: every image as float32 (Fashion-MNIST's 70,000 at 3 x 28 x 28: about 660 MB).
    """

    def __init__(self, base: Dataset, transform: Callable[..., Tensor], batch_size: int = 256,
                 num_workers: int = 0) -> None:
        self.transform = transform
        size = len(base)  # type: ignore[arg-type]
        loader = DataLoader(_Indexed(base, transform), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=_collate)
        rows: list[Tensor] = []
        labels: list[Tensor] = []
        index: list[Tensor] = []
        for images, lab, idx, _ in loader:
            if images is not None:
                rows.append(images)
                labels.append(lab)
                index.append(idx)
        if not rows:
            raise DatasetError("no image of the dataset could be decoded")
        self.images, self.labels = torch.cat(rows), torch.cat(labels)
        self._row = torch.full((size,), -1, dtype=torch.int64)  # dataset index -> row (-1: undecodable)
        self._row[torch.cat(index)] = torch.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self._row)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        row = int(self._row[i])
        return None if row < 0 else (self.images[row], int(self.labels[row]))


def _model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def iter_feature_batches(
    model: nn.Module,
    dataset: Dataset,
    transform: Callable[..., Tensor] | None,
    batch_size: int = 256,
    features: Sequence[str] = ("cls",),
    n_last_blocks: int = 4,
    autocast_bf16: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor, list[int]]]:
    """Yield per batch ({name: (B', D_name) float32 CPU}, labels (B',), dataset indices (B',),
    skipped dataset indices); B' <= batch_size (undecodable images dropped)."""
    parsed = list({p[0]: p for p in (parse_feature_kind(k, n_last_blocks) for k in features)}.values())
    if not parsed:
        raise ValueError("no feature kind requested")
    dev = _model_device(model, device)
    model = model.to(dev).eval()
    loader = DataLoader(_Indexed(dataset, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=dev.type == "cuda")
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="features", unit="batch", leave=False)  # type: ignore[assignment]
    for images, labels, index, skipped in loader:
        if images is None:
            empty = {name: torch.empty(0, 0) for name, _, _ in parsed}
            yield empty, labels, index, skipped
            continue
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            feats = _compute_kinds(model, images.to(dev, non_blocking=True), parsed)
        yield {k: v.cpu() for k, v in feats.items()}, labels, index, skipped


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    transform: Callable[..., Tensor] | None,
    batch_size: int = 256,
    features: Sequence[str] = ("cls",),
    n_last_blocks: int = 4,
    autocast_bf16: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Extracted:
    """All features of `dataset` in memory; see `iter_feature_batches` and the module docstring.

    Returns:
        `Extracted(features {name: (M, D_name)}, labels (M,), skipped)`, rows in dataset order.
    """
    chunks: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    skipped: list[int] = []
    for feats, lab, _, skip in iter_feature_batches(model, dataset, transform, batch_size, features,
                                                     n_last_blocks, autocast_bf16, num_workers, progress, device):
        skipped.extend(skip)
        if len(lab):
            labels.append(lab)
            for k, v in feats.items():
                chunks.setdefault(k, []).append(v)
    if not labels:
        raise DatasetError("no image of the dataset could be decoded")
    return Extracted({k: torch.cat(v) for k, v in chunks.items()}, torch.cat(labels), skipped)


# ----------------------------------------------------------------------------- shards on disk


def feature_identity(model: nn.Module, transform: Any, n_last_blocks: int) -> str:
    """A fingerprint of what makes features comparable: every weight of `model` (bit for bit),
    its class, the preprocessing (`repr(transform)`) and the block count of `blocks*` features."""
    digest = hashlib.sha256(f"{type(model).__name__}|{transform!r}|{n_last_blocks}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON atomically (a crash never leaves half a file); parents are created."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, out)
    return out


def write_feature_shards(
    out_dir: str | os.PathLike,
    model: nn.Module,
    dataset: Dataset,
    transform: Callable[..., Tensor] | None,
    features: Sequence[str] = ("cls",),
    shard_size: int = 65536,
    dtype: str = "float16",
    source: str = "",
    batch_size: int = 256,
    n_last_blocks: int = 4,
    autocast_bf16: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    description: str | None = None,
) -> dict[str, Any]:
    """Stream features to `out_dir/shard_00000.safetensors`, ... (<= `shard_size` rows each) so a
    large set never has to fit in memory.

    Each shard holds one tensor per feature name (rows, D_name) in `dtype`, plus `labels` and
    `indices` (dataset indices) int64. `labels.safetensors` holds all labels and indices, and
    `manifest.json` (written last, atomically: a folder without it is incomplete) lists feature
    names and dims, row counts, shards, skipped indices and the source backbone.

    `indices` are positions in `dataset` as given (for a `Subset`, positions in the subset).
    `description` names the data in the manifest (default `repr(dataset)`).

    Returns:
        The manifest.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds features ({MANIFEST}); choose another folder or overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("shard_*.safetensors"), out / MANIFEST, out / LABELS_FILE]:
        old.unlink(missing_ok=True)  # a shorter rewrite must not leave stale shards behind
    torch_dtype = _DTYPES[dtype]

    buffer: dict[str, list[Tensor]] = {}
    buffered = 0
    shards: list[dict[str, Any]] = []
    dims: dict[str, int] = {}
    all_labels: list[Tensor] = []
    all_index: list[Tensor] = []
    skipped: list[int] = []

    def flush(n_rows: int) -> None:
        nonlocal buffered
        merged = {k: torch.cat(v) for k, v in buffer.items()}
        shard = {k: v[:n_rows].contiguous() for k, v in merged.items()}
        name = f"shard_{len(shards):05d}.safetensors"
        save_file(shard, str(out / name))
        shards.append({"file": name, "rows": n_rows})
        for k, v in merged.items():
            buffer[k] = [v[n_rows:]]
        buffered -= n_rows

    for feats, lab, index, skip in iter_feature_batches(model, dataset, transform, batch_size, features,
                                                         n_last_blocks, autocast_bf16, num_workers, progress, device):
        skipped.extend(skip)
        if not len(lab):
            continue
        for k, v in feats.items():
            dims[k] = v.shape[1]
            cast = v.to(torch_dtype)
            if not torch.isfinite(cast).all() and torch.isfinite(v).all():
                raise OverflowError(f"feature {k!r} overflows {dtype} (max |x| = {v.abs().max():.4g}); use dtype float32")
            buffer.setdefault(k, []).append(cast)
        buffer.setdefault("labels", []).append(lab)
        buffer.setdefault("indices", []).append(index)
        all_labels.append(lab)
        all_index.append(index)
        buffered += len(lab)
        while buffered >= shard_size:
            flush(shard_size)
    if buffered:
        flush(buffered)
    if not shards:
        raise DatasetError("no image of the dataset could be decoded")

    save_file({"labels": torch.cat(all_labels), "indices": torch.cat(all_index)}, str(out / LABELS_FILE))
    manifest = {
        "format": "dinokit-features",
        "version": 1,
        "features": {k: {"dim": d} for k, d in dims.items()},
        "dtype": dtype,
        "n_rows": int(sum(s["rows"] for s in shards)),
        "n_dataset": len(dataset),  # type: ignore[arg-type]
        "shard_size": shard_size,
        "shards": shards,
        "labels_file": LABELS_FILE,
        "skipped": skipped,
        "source": source,
        "identity": feature_identity(model, transform, n_last_blocks),
        "dataset": description or repr(dataset),
        "transform": repr(transform),
        "n_last_blocks": n_last_blocks,
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def is_feature_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `write_feature_shards`."""
    return (Path(path) / MANIFEST).is_file()


def _manifest(feature_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(feature_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{feature_dir} holds no {MANIFEST}: not a (complete) feature folder")
    return json.loads(path.read_text())


def iter_feature_shards(feature_dir: str | os.PathLike, names: Sequence[str] | None = None) -> Iterator[dict[str, Tensor]]:
    """Yield each shard as {name: (rows, D_name) stored dtype, "labels": (rows,), "indices": (rows,)}."""
    manifest = _manifest(feature_dir)
    for shard in manifest["shards"]:
        data = load_file(str(Path(feature_dir) / shard["file"]))
        if names is not None:
            data = {k: v for k, v in data.items() if k in (*names, "labels", "indices")}
        yield data


def read_features(feature_dir: str | os.PathLike, names: Sequence[str] | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Load a feature folder back, shards concatenated.

    Returns:
        {"features": {name: (M, D_name)} (stored dtype, or `dtype`), "labels": (M,),
        "indices": (M,) dataset indices, "skipped": [...], "manifest": {...}}.
    """
    manifest = _manifest(feature_dir)
    wanted = list(names) if names is not None else list(manifest["features"])
    missing = [n for n in wanted if n not in manifest["features"]]
    if missing:
        raise KeyError(f"{feature_dir} has no feature {missing}; it has {list(manifest['features'])}")
    chunks: dict[str, list[Tensor]] = {n: [] for n in wanted}
    for shard in iter_feature_shards(feature_dir, wanted):
        for n in wanted:
            chunks[n].append(shard[n] if dtype is None else shard[n].to(dtype))
    labels = load_file(str(Path(feature_dir) / manifest["labels_file"]))
    return {
        "features": {n: torch.cat(c) for n, c in chunks.items()},
        "labels": labels["labels"],
        "indices": labels["indices"],
        "skipped": manifest["skipped"],
        "manifest": manifest,
    }

"""Dense probes on frozen patch features: linear segmentation (mIoU) and linear depth (RMSE).

The DINOv2 protocols, on a CPU-sized scale:

- features: the last block's normed patch tokens, or the last 4 blocks' concatenated
  (`layers=4`, the "+ms" setting); for depth each block's [CLS] token is concatenated to every
  patch token of that block ("lin. 1" / "lin. 4");
- input: every image resized to `size` x `size` (bicubic, aspect not kept, `size` a multiple of
  the patch), so one forward sees the whole image ("resize" inference, not sliding windows);
- segmentation head: BatchNorm + 1x1 convolution, logits bilinearly upsampled to the label map,
  cross-entropy with ignore index 255; multi-scale test ("+ms"): softmax averaged over input
  scales (and horizontal flips) at each mask's own size;
- depth head: features upsampled x4 (bilinear), BatchNorm + 1x1 convolution to 256 logits over
  uniform bins in [min_depth, max_depth], prediction = the softmax-weighted mean of the bin
  centres, trained with the scale-invariant log loss (SigLoss) of the official depth heads;
- metrics on each label map at its own resolution: mIoU (classes whose union is empty are left
  out, as mmsegmentation does), per-class IoU, pixel accuracy; depth RMSE, AbsRel and
  delta < 1.25, per image over valid pixels (ground truth in (min_depth, max_depth]), averaged over
  images (the NYU convention).

Features are cached per (backbone weights, input, data set) in `cache_dir` in chunks written
atomically, so an interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dinokit.data.datasets import load_image
from dinokit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinokit.eval.dense_data import IGNORE_INDEX, DenseDataError, DenseSet, open_dense_set, read_depth, read_mask
from dinokit.eval.embed import PixelBackbone, default_device, feature_identity, resolve_feature_model

__all__ = [
    "DEPTH_BINS",
    "DenseFeatures",
    "DenseProbe",
    "choose_size",
    "confusion_matrix",
    "depth_metrics",
    "dense_features",
    "evaluate_depth",
    "evaluate_segmentation",
    "patch_grid",
    "segmentation_metrics",
    "sig_loss",
]

DEPTH_BINS = 256
CHUNK = 64  # images per cache file
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


# ----------------------------------------------------------------------------- features


def model_patch_size(model: nn.Module) -> int:
    """The backbone's patch size (the raw-pixel baseline uses 14 px patches)."""
    return int(getattr(model, "patch_size", 14))


def patch_grid(model: nn.Module, x: Tensor, layers: int = 1, with_cls: bool = False) -> Tensor:
    """Patch features (B, C, H/p, W/p) of images x (B, 3, H, W).

    A ViT gives the normed patch tokens of its last `layers` blocks, concatenated (earliest first),
    each followed by its [CLS] token broadcast over the grid when `with_cls`. The raw-pixel
    baseline gives each p x p patch's normalised pixels (3 p^2 channels), plus the image's mean
    colour when `with_cls`.
    """
    if isinstance(model, PixelBackbone):
        grid = F.pixel_unshuffle(x, model_patch_size(model))
        if with_cls:
            grid = torch.cat([grid, x.mean(dim=(2, 3), keepdim=True).expand(-1, -1, *grid.shape[2:])], dim=1)
        return grid
    outs = model.get_intermediate_layers(x, n=layers, reshape=True, return_class_token=True, norm=True)
    grid = outs[-1][0].shape[-2:]
    parts: list[Tensor] = []
    for patches, cls in outs:
        if patches.shape[-2:] != grid:  # a ResNet's earlier stages: finer maps, resized to the last one's
            patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        parts.append(patches)
        if with_cls:
            parts.append(cls[:, :, None, None].expand_as(patches))
    return torch.cat(parts, dim=1)


def choose_size(dense: DenseSet, patch: int, sample: int = 32) -> int:
    """Default input side: the median short side of the first images, rounded to the patch
    multiple, between 2 and 37 patches (518 px at patch 14, the released models' size)."""
    from PIL import Image

    sides = []
    for path in dense.images[:sample]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - undecodable images are counted when extracted
            continue
    if not sides:
        raise DenseDataError(f"{dense.spec}: none of the first {sample} images can be opened")
    patches = round(float(np.median(sides)) / patch)
    return patch * min(37, max(2, patches))


def _to_input(image: Any, size: int, flip: bool) -> Tensor:
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    x = F.interpolate(x[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    x = (x.clamp(0, 255) / 255.0 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return x.flip(-1) if flip else x


@dataclass
class DenseFeatures:
    """Frozen features of a dense set at one input size.

    Attributes:
        features: (M, C, h, w) float16 (M = decodable images, in set order).
        kept: set indices of the M rows.
        sizes: (width, height) of each kept image as decoded, which its label map must match.
        skipped: file names of images that could not be decoded.
    """

    features: Tensor
    kept: list[int]
    sizes: list[tuple[int, int]]
    skipped: list[str]


def _cache_key(model: nn.Module, dense: DenseSet, size: int, layers: int, with_cls: bool, flip: bool) -> str:
    listing = hashlib.sha256()
    for image, label in zip(dense.images, dense.labels):
        for path in (image, label):
            st = path.stat()
            listing.update(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    setting = f"dense v2 size={size} layers={layers} cls={with_cls} flip={flip}"
    return hashlib.sha256(f"{feature_identity(model, setting, layers)}|{listing.hexdigest()}".encode()).hexdigest()[:16]


@torch.inference_mode()
def dense_features(
    model: nn.Module,
    dense: DenseSet,
    size: int,
    layers: int = 1,
    with_cls: bool = False,
    flip: bool = False,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> DenseFeatures:
    """Patch features of every image of `dense` resized to `size` (see `patch_grid`).

    With `cache_dir`, chunks of 64 images are stored under a key of (weights, input, files) and
    reused, so a second call, or a call after an interruption, computes only what is missing.
    `on_chunk(i)` is called after chunk i is computed (tests interrupt there).
    """
    patch = model_patch_size(model)
    if size % patch:
        raise ValueError(f"input size {size} is not a multiple of the patch size {patch}")
    dev = torch.device(device)
    model = model.to(dev).eval()
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / _cache_key(model, dense, size, layers, with_cls, flip)
        folder.mkdir(parents=True, exist_ok=True)
    rows: list[Tensor] = []
    kept: list[int] = []
    sizes: list[tuple[int, int]] = []
    skipped: list[str] = []
    chunks = range(0, len(dense), CHUNK)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"features {size}px", unit="chunk", leave=False)  # type: ignore[assignment]
    for start in chunks:
        path = folder / f"chunk_{start // CHUNK:05d}.safetensors" if folder is not None else None
        if path is not None and path.is_file():
            stored = load_file(str(path))
            rows.append(stored["features"])
            kept.extend(stored["kept"].tolist())
            sizes.extend((int(w), int(h)) for w, h in stored["sizes"].tolist())
            skipped.extend(dense.images[int(i)].name for i in stored["skipped"].tolist())
            continue
        chunk_rows: list[Tensor] = []
        chunk_kept: list[int] = []
        chunk_sizes: list[tuple[int, int]] = []
        chunk_skipped: list[int] = []
        for b in range(start, min(start + CHUNK, len(dense)), batch_size):
            inputs = []
            for i in range(b, min(b + batch_size, start + CHUNK, len(dense))):
                image = load_image(dense.images[i])
                if image is None:
                    chunk_skipped.append(i)
                    continue
                inputs.append(_to_input(image, size, flip))
                chunk_kept.append(i)
                chunk_sizes.append(image.size)
            if inputs:
                chunk_rows.append(patch_grid(model, torch.stack(inputs).to(dev), layers, with_cls).half().cpu())
        features = torch.cat(chunk_rows) if chunk_rows else torch.empty(0)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            save_file({"features": features.contiguous(), "kept": torch.tensor(chunk_kept, dtype=torch.int64),
                       "sizes": torch.tensor(chunk_sizes, dtype=torch.int64).reshape(-1, 2),
                       "skipped": torch.tensor(chunk_skipped, dtype=torch.int64)}, str(tmp))
            os.replace(tmp, path)
        rows.append(features)
        kept.extend(chunk_kept)
        sizes.extend(chunk_sizes)
        skipped.extend(dense.images[i].name for i in chunk_skipped)
        if on_chunk is not None:
            on_chunk(start // CHUNK)
    rows = [r for r in rows if r.numel()]
    if not rows:
        raise DenseDataError(f"{dense.spec}: no image could be decoded")
    return DenseFeatures(torch.cat(rows), kept, sizes, skipped)


# ----------------------------------------------------------------------------- probe


class DenseProbe(nn.Module):
    """BatchNorm + 1x1 convolution over a feature grid; `upsample` > 1 first enlarges the grid
    (the depth head's x4)."""

    def __init__(self, in_channels: int, out_channels: int, upsample: int = 1) -> None:
        super().__init__()
        self.upsample = upsample
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, grid: Tensor) -> Tensor:
        if self.upsample > 1:
            grid = F.interpolate(grid, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return self.conv(self.bn(grid))


def _train_probe(
    probe: nn.Module,
    features: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[float]:
    """AdamW (weight decay 1e-4) with a cosine schedule over `epochs`; returns the mean loss of each epoch."""
    g = torch.Generator().manual_seed(seed)
    probe.to(device).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(features) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=g)
        total, count = 0.0, 0
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            if len(idx) < 2 and len(order) > 1:  # BatchNorm needs two samples
                continue
            out = probe(features[idx].to(device, torch.float32))
            loss = loss_fn(out, targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(1, count))
    probe.eval()
    return losses


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; pixels labelled 255 are ignored."""
    valid = target != IGNORE_INDEX
    t = target[valid].long()
    p = pred[valid].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: Tensor) -> dict[str, Any]:
    """mIoU, per-class IoU (None where a class is neither labelled nor predicted) and pixel accuracy."""
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / c.sum().clamp(min=1)),
        "per_class_iou": [round(float(v), 6) if ok else None for v, ok in zip(iou, present)],
        "n_pixels": int(c.sum()),
    }


def sig_loss(pred: Tensor, target: Tensor, valid: Tensor, lam: float = 0.85) -> Tensor:
    """Scale-invariant log loss over valid pixels: sqrt(mean(g^2) - lam * mean(g)^2), g = log pred - log gt."""
    g = torch.log(pred[valid].clamp(min=1e-6)) - torch.log(target[valid])
    if g.numel() == 0:
        return pred.sum() * 0.0
    return torch.sqrt((g.pow(2).mean() - lam * g.mean().pow(2)).clamp(min=1e-12))


def depth_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float, max_depth: float) -> dict[str, float] | None:
    """RMSE, AbsRel, delta < 1.25 of one map over pixels with min_depth < gt <= max_depth (None if none)."""
    valid = (gt > min_depth) & (gt <= max_depth)
    if not valid.any():
        return None
    p = np.clip(pred[valid].astype(np.float64), min_depth, max_depth)
    g = gt[valid].astype(np.float64)
    ratio = np.maximum(p / g, g / p)
    return {"rmse": float(np.sqrt(np.mean((p - g) ** 2))), "abs_rel": float(np.mean(np.abs(p - g) / g)),
            "delta1": float(np.mean(ratio < 1.25))}


# ----------------------------------------------------------------------------- labels


def _labels(dense: DenseSet, feats: DenseFeatures, depth_scale: float) -> list[np.ndarray]:
    """Label maps of the decodable images, checked against their images' sizes."""
    out = []
    for i, size in zip(feats.kept, feats.sizes):
        if dense.kind == "depth":
            out.append(read_depth(dense.labels[i], size, depth_scale))
        else:
            out.append(read_mask(dense.labels[i], size, dense.reduce_zero_label))
    return out


def _resized(maps: Sequence[np.ndarray], size: int) -> Tensor:
    """Label maps resized to size x size by nearest neighbour (keeps class indices and 'no depth')."""
    stacked = [F.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=(size, size), mode="nearest")[0, 0]
               for m in maps]
    return torch.stack(stacked)


def _check_classes(dense: DenseSet, kept: Sequence[int], maps: Sequence[np.ndarray], num_classes: int) -> None:
    for i, m in zip(kept, maps):
        labelled = m[m != IGNORE_INDEX]
        if labelled.size and int(labelled.max()) >= num_classes:
            raise DenseDataError(f"{dense.labels[i]}: class index {int(labelled.max())} but there are {num_classes} "
                                 f"classes (0..{num_classes - 1}, 255 = ignore)")


def _split_info(dense: DenseSet, feats: DenseFeatures) -> dict[str, Any]:
    return {"spec": dense.spec, "layout": dense.layout, "n": len(feats.kept), "n_skipped": len(feats.skipped),
            "skipped": feats.skipped[:1000]}


# ----------------------------------------------------------------------------- evaluations


def _prepare(backbone: Any, arch: str | None, random_init: bool, size: int | None, train: DenseSet,
             device: str | None) -> tuple[nn.Module, str, int, torch.device]:
    resolved = resolve_feature_model(backbone, arch, random_init)
    model = resolved.model
    if isinstance(model, PixelBackbone):
        resolved.source = f"pixels (raw-pixel baseline, {model_patch_size(model)} px patches)"
    size = size or choose_size(train, model_patch_size(model))
    return model, resolved.source, size, torch.device(device or default_device())


def _scaled_size(size: int, scale: float, patch: int) -> int:
    return max(patch, int(round(size * scale / patch)) * patch)


@dataclass
class SegmentationRun:
    """What `evaluate_segmentation` returns: the results JSON, the trained probe and, for pictures,
    the first test images' predictions and ground truths (class maps at each mask's size) with
    their set indices."""

    result: dict[str, Any]
    probe: DenseProbe
    predictions: list[np.ndarray]
    truths: list[np.ndarray]
    prediction_index: list[int]
    test: DenseSet


def evaluate_segmentation(
    backbone: Any,
    train: str | os.PathLike | DenseSet,
    test: str | os.PathLike | DenseSet,
    *,
    layers: int = 1,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    size: int | None = None,
    num_classes: int | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 16,
    arch: str | None = None,
    random_init: bool = False,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    keep_predictions: int = 0,
    progress: bool = False,
) -> SegmentationRun:
    """Linear segmentation probe on frozen patch features (see the module docstring).

    `layers=4, scales=MS_SCALES, flip=True` is the "+ms" setting. `num_classes` defaults to the
    layout's (VOC 21, ADE20k 150), else to 1 + the largest index in the train masks.
    """
    t0 = time.time()
    train_set = train if isinstance(train, DenseSet) else open_dense_set(train, "segment")
    test_set = test if isinstance(test, DenseSet) else open_dense_set(test, "segment")
    model, source, size, dev = _prepare(backbone, arch, random_init, size, train_set, device)
    patch = model_patch_size(model)
    torch.manual_seed(seed)

    tr = dense_features(model, train_set, size, layers, False, False, device=dev, cache_dir=cache_dir, progress=progress)
    train_maps = _labels(train_set, tr, 1.0)
    if num_classes is None:
        num_classes = train_set.num_classes
        classes_from = f"{train_set.layout} layout" if num_classes else "train masks (largest index + 1)"
        if num_classes is None:
            num_classes = 1 + max(int(m[m != IGNORE_INDEX].max(initial=0)) for m in train_maps)
    else:
        classes_from = "given"
    _check_classes(train_set, tr.kept, train_maps, num_classes)
    targets = _resized(train_maps, size).long()

    probe = DenseProbe(tr.features.shape[1], num_classes)

    def seg_loss(logits: Tensor, target: Tensor) -> Tensor:
        up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, target, ignore_index=IGNORE_INDEX)

    losses = _train_probe(probe, tr.features, targets, seg_loss, epochs, lr, batch_size, seed, dev)

    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    test_feats = {view: dense_features(model, test_set, _scaled_size(size, view[0], patch), layers, False, view[1],
                                       device=dev, cache_dir=cache_dir, progress=progress) for view in views}
    base = test_feats[views[0]]
    test_maps = _labels(test_set, base, 1.0)
    _check_classes(test_set, base.kept, test_maps, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    predictions: list[np.ndarray] = []
    with torch.inference_mode():
        for row, mask in enumerate(test_maps):
            prob = torch.zeros(num_classes, *mask.shape)
            for (scale, flipped), feats in test_feats.items():
                logits = probe(feats.features[row:row + 1].to(dev, torch.float32))
                if flipped:
                    logits = logits.flip(-1)
                up = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
                prob += up.softmax(dim=1)[0].cpu()
            pred = prob.argmax(0)
            confusion += confusion_matrix(pred, torch.from_numpy(mask), num_classes)
            if row < keep_predictions:
                predictions.append(pred.numpy().astype(np.uint8))
    result = {
        "protocol": "segment",
        "backbone": source,
        **segmentation_metrics(confusion),
        "num_classes": num_classes,
        "num_classes_from": classes_from,
        "features": f"last {layers} block(s) patch tokens, normed" + (", concatenated" if layers > 1 else ""),
        "size": size,
        "patch_size": patch,
        "inference": f"whole image resized to {size}x{size} (aspect not kept); softmax of the bilinearly upsampled "
                     "logits averaged over the scales (and flips) at each mask's size",
        "scales": list(scales),
        "flip": flip,
        "ignore_index": IGNORE_INDEX,
        "probe": {"head": "BatchNorm + 1x1 conv", "epochs": epochs, "lr": lr, "batch_size": batch_size,
                  "optimizer": "AdamW (weight decay 1e-4), cosine schedule", "loss": "cross-entropy",
                  "train_loss": [round(x, 5) for x in losses]},
        "train": _split_info(train_set, tr),
        "test": _split_info(test_set, base),
        "seconds": round(time.time() - t0, 2),
    }
    return SegmentationRun(result, probe, predictions, test_maps[:keep_predictions], base.kept[:keep_predictions],
                           test_set)


def evaluate_depth(
    backbone: Any,
    train: str | os.PathLike | DenseSet,
    test: str | os.PathLike | DenseSet,
    *,
    depth_scale: float = 1000.0,
    min_depth: float = 1e-3,
    max_depth: float | None = None,
    layers: int = 1,
    size: int | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 16,
    arch: str | None = None,
    random_init: bool = False,
    device: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear depth probe ("lin. 1" / "lin. 4" with `layers`) on frozen features; see the module
    docstring. `max_depth` defaults to the largest depth in the train maps."""
    t0 = time.time()
    train_set = train if isinstance(train, DenseSet) else open_dense_set(train, "depth")
    test_set = test if isinstance(test, DenseSet) else open_dense_set(test, "depth")
    model, source, size, dev = _prepare(backbone, arch, random_init, size, train_set, device)
    torch.manual_seed(seed)

    tr = dense_features(model, train_set, size, layers, True, False, device=dev, cache_dir=cache_dir, progress=progress)
    train_maps = _labels(train_set, tr, depth_scale)
    if max_depth is None:
        max_depth = max(float(m.max(initial=0.0)) for m in train_maps)
        depth_from = "train maps (largest depth)"
    else:
        depth_from = "given"
    if not max_depth > min_depth:
        raise DenseDataError(f"{train_set.spec}: no depth above min_depth={min_depth} in the train maps "
                             f"(depth_scale={depth_scale})")
    targets = _resized(train_maps, size)
    bins = torch.linspace(min_depth, max_depth, DEPTH_BINS + 1)
    centres = ((bins[:-1] + bins[1:]) / 2).to(dev)

    probe = DenseProbe(tr.features.shape[1], DEPTH_BINS, upsample=4)

    def to_depth(logits: Tensor) -> Tensor:
        return (logits.softmax(dim=1) * centres[None, :, None, None]).sum(dim=1, keepdim=True)

    def depth_loss(logits: Tensor, target: Tensor) -> Tensor:
        pred = F.interpolate(to_depth(logits), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return sig_loss(pred, target, (target > min_depth) & (target <= max_depth))

    losses = _train_probe(probe, tr.features, targets, depth_loss, epochs, lr, batch_size, seed, dev)

    te = dense_features(model, test_set, size, layers, True, False, device=dev, cache_dir=cache_dir, progress=progress)
    test_maps = _labels(test_set, te, depth_scale)
    per_image: list[dict[str, float]] = []
    no_valid: list[str] = []
    with torch.inference_mode():
        for row, gt in enumerate(test_maps):
            logits = probe(te.features[row:row + 1].to(dev, torch.float32))
            pred = F.interpolate(to_depth(logits), size=gt.shape, mode="bilinear", align_corners=False)[0, 0]
            m = depth_metrics(pred.cpu().numpy(), gt, min_depth, max_depth)
            if m is None:
                no_valid.append(test_set.images[te.kept[row]].name)
            else:
                per_image.append(m)
    if not per_image:
        raise DenseDataError(f"{test_set.spec}: no test map has a valid depth in ({min_depth}, {max_depth}]")
    mean = {k: float(np.mean([m[k] for m in per_image])) for k in ("rmse", "abs_rel", "delta1")}
    return {
        "protocol": "depth",
        "backbone": source,
        **mean,
        "n_evaluated": len(per_image),
        "no_valid_depth": no_valid,
        "depth_scale": depth_scale,
        "min_depth": min_depth,
        "max_depth": max_depth,
        "max_depth_from": depth_from,
        "features": f"last {layers} block(s) patch tokens, each with its [CLS] token, normed",
        "size": size,
        "patch_size": model_patch_size(model),
        "inference": f"whole image resized to {size}x{size}; prediction bilinearly upsampled to each depth map",
        "metrics": "per image over pixels with min_depth < gt <= max_depth, prediction clipped to that range, "
                   "averaged over images",
        "probe": {"head": f"x4 bilinear upsampling, BatchNorm + 1x1 conv to {DEPTH_BINS} uniform bins, "
                          "softmax-weighted bin centres", "epochs": epochs, "lr": lr, "batch_size": batch_size,
                  "optimizer": "AdamW (weight decay 1e-4), cosine schedule", "loss": "SigLoss (lambda 0.85)",
                  "train_loss": [round(x, 5) for x in losses]},
        "train": _split_info(train_set, tr),
        "test": _split_info(test_set, te),
        "seconds": round(time.time() - t0, 2),
    }


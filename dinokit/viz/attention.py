"""Attention maps of the [CLS] token in the last block: the emergent object masks of DINO.

Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers", Fig. 1 and 3)
show that the last block's [CLS] -> patch attention of a self-supervised ViT segments the main
object without any supervision. This module computes those maps and draws them.

The attention probabilities come from `VisionTransformer.last_block_attention`, which evaluates
the softmax explicitly only for this purpose; the normal forward keeps the fused SDPA kernel and
no hooks are ever installed, so using this module cannot change a model's outputs.

Image helpers (`prepare_image`, `colormap`, `tile`, `grid_image`) are shared with `viz.pca`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from dinokit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinokit.models.vision_transformer import VisionTransformer

Upsample = Literal["nearest", "bilinear"]

# Anchor colours of matplotlib's "inferno" map (0, .25, .5, .75, 1): a perceptually ordered heat
# map, interpolated here so that pictures need only numpy and PIL, not matplotlib.
_INFERNO = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


# ---------------------------------------------------------------------------------------- images


def prepare_image(image: Image.Image, patch_size: int, size: int) -> tuple[Image.Image, Tensor]:
    """Resize an image so that both sides are multiples of the patch size, then normalise.

    The short side becomes about `size` pixels (aspect ratio kept up to rounding each side down to
    a multiple of `patch_size`); normalisation uses the ImageNet mean and std like training.

    Returns:
        The resized RGB image (what the model sees, for drawing) and the tensor (1, 3, H, W).

    Example:
        >>> shown, x = prepare_image(Image.new("RGB", (640, 480)), patch_size=14, size=224)
        >>> shown.size, tuple(x.shape)
        ((294, 224), (1, 3, 224, 294))
    """
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w = max(patch_size, round(w * scale) // patch_size * patch_size)
    new_h = max(patch_size, round(h * scale) // patch_size * patch_size)
    shown = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(shown, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return shown, ((x - mean) / std).unsqueeze(0)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape S) -> uint8 RGB (S, 3) on an inferno-like heat map."""
    v = np.clip(np.nan_to_num(values.astype(np.float64)), 0.0, 1.0)
    xs = np.linspace(0.0, 1.0, len(_INFERNO))
    rgb = np.stack([np.interp(v, xs, _INFERNO[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def upsample(grid_values: Tensor, size: tuple[int, int], mode: Upsample = "nearest") -> np.ndarray:
    """(h, w) patch values -> (H, W) float64 array; nearest keeps the patch grid visible (as in
    the DINO paper), bilinear gives smooth maps."""
    g = grid_values.detach().float().cpu()[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(g, size=size, mode=mode, **kwargs)[0, 0].double().numpy()


def tile(
    image: Image.Image, label: str | None, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.NEAREST
) -> Image.Image:
    """Resize a panel to `size` (W, H) and write a small label in its top-left corner.

    NEAREST (default) for patch grids and finished panels; BICUBIC for photographs."""
    out = image.convert("RGB").resize(size, resample)
    if label:
        draw = ImageDraw.Draw(out)
        _, _, right, bottom = draw.textbbox((2, 1), label)
        # A dark box behind the text keeps it readable on bright heat maps.
        draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
        draw.text((2, 1), label, fill=(255, 255, 255))
    return out


def balanced_columns(n: int, max_columns: int = 10) -> int:
    """Columns for n panels: one row up to `max_columns`, else rows of equal length (so 14
    panels make 2 x 7 rather than 10 + 4)."""
    rows = math.ceil(n / max_columns)
    return math.ceil(n / rows)


def grid_image(groups: Sequence[Sequence[Image.Image]], columns: int, gap: int = 2) -> Image.Image:
    """Panels of equal size in rows of at most `columns`; each group starts on a new row, so the
    panels of two groups of equal length line up column by column.

    Size: width = c * W + (c - 1) * gap, height = r * H + (r - 1) * gap, with c the column count
    used and r the rows of all groups together; the gaps are white.
    """
    w, h = groups[0][0].size
    rows = [list(g[i : i + columns]) for g in groups for i in range(0, len(g), columns)]
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * w + (cols - 1) * gap, len(rows) * h + (len(rows) - 1) * gap), "white")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            canvas.paste(panel, (c * (w + gap), r * (h + gap)))
    return canvas


def panel_size(image_size: tuple[int, int], min_side: int = 160) -> tuple[int, int]:
    """Panel (W, H): the model's input size scaled up by an integer factor so that tiny inputs
    (e.g. 28 px Fashion-MNIST) are still visible; large inputs are left as they are."""
    w, h = image_size
    factor = max(1, math.ceil(min_side / min(w, h)))
    return w * factor, h * factor


# ---------------------------------------------------------------------------------------- maps


def attention_maps(model: VisionTransformer, image_tensor: Tensor) -> Tensor:
    """Last-block attention of [CLS] to each patch, per head: (1, 3, H, W) -> (heads, H/p, W/p).

    Registers (and [CLS] itself) are dropped and the rest is NOT renormalised, so with registers a
    head's map sums to less than 1: the missing mass is what [CLS] gives the registers. The model
    runs in eval mode (its mode is restored afterwards) without gradients.

    Example:
        >>> maps = attention_maps(model, x)          # x: (1, 3, 224, 224), ViT-S/14
        >>> maps.shape
        torch.Size([6, 16, 16])
    """
    if image_tensor.dim() != 4 or image_tensor.shape[0] != 1:
        raise ValueError(f"expected one image (1, 3, H, W), got {tuple(image_tensor.shape)}")
    p = model.patch_size
    _, _, H, W = image_tensor.shape
    if H % p or W % p:
        raise ValueError(f"image {H}x{W} is not a multiple of the patch size {p}")
    param = next(model.parameters())
    x = image_tensor.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = model.last_block_attention(x)  # (1, heads, T, T), T = 1 + R + N
    finally:
        model.train(was_training)
    first_patch = 1 + model.num_register_tokens
    cls_to_patches = probs[0, :, 0, first_patch:].float().cpu()
    return cls_to_patches.reshape(-1, H // p, W // p)


def threshold_masks(maps: Tensor, threshold: float) -> Tensor:
    """The DINO paper's masks: per map, the smallest set of patches holding `threshold` of its
    attention mass (after normalising the map to sum 1). (M, h, w) float -> (M, h, w) bool.

    Same rule as the official `visualize_attention.py` (`cumval > 1 - threshold` on values sorted
    in increasing order).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    flat = maps.reshape(maps.shape[0], -1).double()
    flat = flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-30)
    values, order = torch.sort(flat, dim=1)
    keep_sorted = torch.cumsum(values, dim=1) > 1.0 - threshold
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.reshape(maps.shape)


def _heat_panel(shown: np.ndarray, values: np.ndarray, alpha: float) -> Image.Image:
    lo, hi = values.min(), values.max()
    # Per-panel min-max: heads differ in their attention range, and each is read on its own.
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    heat = colormap(norm).astype(np.float64)
    return Image.fromarray((alpha * heat + (1 - alpha) * shown).round().astype(np.uint8))


def _mask_panel(shown: np.ndarray, mask: np.ndarray) -> Image.Image:
    out = shown * 0.25  # kept patches stay in full colour, the rest is darkened
    out[mask] = shown[mask]
    return Image.fromarray(out.round().astype(np.uint8))


def attention_picture(
    image: Image.Image,
    maps: Tensor,
    out_path: str | Path,
    threshold: float | None = None,
    mode: Upsample = "nearest",
    alpha: float = 0.6,
    columns: int | None = None,
    min_side: int = 160,
) -> Path:
    """Save a PNG grid: the input, one heat map per head over the image, and the mean over heads.

    With `threshold` (e.g. 0.6) a second group of panels shows the DINO-paper masks: the union
    of the head masks, each head's mask, and the mask of the mean map, aligned under the maps.

    Args:
        image: the image the maps were computed on (as returned by `prepare_image`); any size,
            it is resized to the panel size.
        maps: (heads, h, w) from `attention_maps`.
        out_path: PNG file to write (parent folders are created).
        threshold: attention mass to keep in the masks, or None for no masks.
        mode: upsampling of the patch grid, "nearest" or "bilinear".
        alpha: opacity of the heat map over the image.
        columns: panels per row (long rows wrap); default `balanced_columns(heads + 2)`: one
            row up to 8 heads, 2 x 7 for 12 heads, 2 x 9 for 16, 3 x 9 for 24.
        min_side: smallest panel side; see `panel_size`.

    Returns the written path. Panel size is `panel_size(image.size, min_side)`; see `grid_image`
    for the picture size (heads + 2 panels per group).

    Example:
        >>> shown, x = prepare_image(load_image("dog.jpg"), model.patch_size, 224)
        >>> attention_picture(shown, attention_maps(model, x), "out/dog.png", threshold=0.6)
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (heads, h, w), got {tuple(maps.shape)}")
    size = panel_size(image.size, min_side)
    shown = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), dtype=np.float64)
    hw = (size[1], size[0])
    all_maps = torch.cat([maps, maps.mean(0, keepdim=True)])  # heads, then the mean
    names = [f"head {i}" for i in range(maps.shape[0])] + ["mean"]
    heat = [tile(_heat_panel(shown, upsample(m, hw, mode), alpha), n, size) for m, n in zip(all_maps, names)]
    # The input panel shows the same resized photo the heat maps are drawn over.
    groups = [[tile(Image.fromarray(shown.astype(np.uint8)), "input", size), *heat]]
    if threshold is not None:
        masks = threshold_masks(all_maps, threshold)
        union = masks[:-1].any(0)
        panels = [union, *masks]
        labels = [f"union {threshold:g}"] + [f"{n} {threshold:g}" for n in names]
        groups.append(
            [
                tile(_mask_panel(shown, upsample(m.float(), hw, "nearest") > 0.5), n, size)
                for m, n in zip(panels, labels)
            ]
        )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_image(groups, columns or balanced_columns(len(groups[0]))).save(out)
    return out

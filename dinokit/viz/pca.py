"""PCA of patch features as RGB pictures, in the style of the DINOv2 paper (Oquab et al. 2023, Fig. 1).

Recipe of the DINOv2 demos: a first PCA over the patches of all images together; its first
component, min-max scaled to [0, 1] and thresholded, separates foreground from background. A second
PCA over the foreground patches only gives three components, min-max scaled to RGB; the background
is black. Fitting over several images at once makes the colours comparable across them: the same
part of the same kind of object gets the same colour.

Which side of the threshold is the foreground depends on the (arbitrary) sign of the component and
on the image; the default "auto" takes the smaller side, which is the object in typical photos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from dinokit.viz.attention import panel_size, prepare_image, tile

Foreground = Literal["auto", "high", "low"]


def pca_features(tokens: Tensor, n_components: int = 3, fit_mask: Tensor | None = None) -> Tensor:
    """Project patch features on their first principal components.

    The PCA is fitted on all patches of all images together (or on those where `fit_mask` is
    True) and applied to every patch. Signs are made deterministic: in each component the fitted
    patch of largest magnitude is positive. Missing components (fewer fitted patches than
    `n_components`) are zero.

    Args:
        tokens: (N, D) or (B, N, D) features.
        n_components: k.
        fit_mask: (N,) or (B, N) bool, the patches to fit on (default all).

    Returns:
        (N, k) or (B, N, k) float32 projections.

    Example:
        >>> pca_features(torch.randn(2, 256, 384)).shape
        torch.Size([2, 256, 3])
    """
    if tokens.dim() not in (2, 3):
        raise ValueError(f"tokens must be (N, D) or (B, N, D), got {tuple(tokens.shape)}")
    flat = tokens.detach().reshape(-1, tokens.shape[-1]).double().cpu()
    fit = flat if fit_mask is None else flat[fit_mask.reshape(-1).cpu()]
    if fit.shape[0] == 0:
        raise ValueError("no patches to fit the PCA on")
    mean = fit.mean(0)
    # Double precision: features of large models have a few huge dimensions, and the small
    # components that make the colours are lost to float32 rounding otherwise.
    _, _, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    comps = vh[:n_components]
    fitted = (fit - mean) @ comps.T
    signs = torch.sign(fitted.gather(0, fitted.abs().argmax(0, keepdim=True))).squeeze(0)
    proj = (flat - mean) @ comps.T * torch.where(signs == 0, 1.0, signs)
    if proj.shape[1] < n_components:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], n_components - proj.shape[1])], dim=1)
    return proj.float().reshape(*tokens.shape[:-1], n_components)


def _minmax(x: Tensor) -> Tensor:
    """Scale each column of (M, k) to [0, 1] (constant columns give 0)."""
    lo, hi = x.min(0).values, x.max(0).values
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def foreground_mask(first_component: Tensor, threshold: float = 0.5, foreground: Foreground = "auto") -> Tensor:
    """Foreground patches from the first principal component (M,) -> (M,) bool.

    The component is min-max scaled to [0, 1]; "high" keeps values above `threshold`, "low" the
    rest, "auto" the smaller of the two sides (ties: "high").
    """
    high = _minmax(first_component.reshape(-1, 1)).squeeze(1) > threshold
    if foreground == "high":
        return high
    if foreground == "low":
        return ~high
    if foreground != "auto":
        raise ValueError(f"foreground must be 'auto', 'high' or 'low', got {foreground!r}")
    return high if int(high.sum()) <= high.numel() - int(high.sum()) else ~high


def pca_rgb(
    features: Sequence[Tensor],
    foreground_threshold: float | None = 0.5,
    foreground: Foreground = "auto",
) -> tuple[list[Tensor], list[Tensor]]:
    """Colours of the patches of several images: a list of (N_i, D) -> lists of (N_i, 3) uint8
    RGB and (N_i,) bool foreground masks.

    With `foreground_threshold` None there is no foreground step: one PCA over all patches gives
    the colours (the plain picture of `pca_image`) and every mask is all True.

    Example:
        >>> rgb, fg = pca_rgb([f1, f2])   # f1 (256, 384), f2 (324, 384)
    """
    counts = [f.shape[0] for f in features]
    flat = torch.cat([f.detach().reshape(-1, f.shape[-1]).cpu() for f in features])
    if foreground_threshold is None:
        fg = torch.ones(flat.shape[0], dtype=torch.bool)
    else:
        fg = foreground_mask(pca_features(flat, 1)[:, 0], foreground_threshold, foreground)
        if not fg.any():  # cannot happen with min-max scaling and 0 <= t < 1, but stay total
            fg = torch.ones_like(fg)
    comps = pca_features(flat, 3, fit_mask=fg)
    rgb = torch.zeros(flat.shape[0], 3, dtype=torch.uint8)
    rgb[fg] = (_minmax(comps[fg]) * 255).round().to(torch.uint8)
    return list(rgb.split(counts)), list(fg.split(counts))


def pca_image(
    patch_tokens: Tensor, grid: tuple[int, int], scale: int = 16, foreground_threshold: float | None = None
) -> Image.Image:
    """(N, D) features of one image on an (h, w) grid -> RGB picture of (w * scale, h * scale).

    Example:
        >>> pca_image(out["x_norm_patchtokens"][0], (16, 16)).size
        (256, 256)
    """
    rgb, _ = pca_rgb([patch_tokens], foreground_threshold)
    img = Image.fromarray(rgb[0].reshape(grid[0], grid[1], 3).numpy())
    return img.resize((grid[1] * scale, grid[0] * scale), Image.Resampling.NEAREST)


@dataclass
class PcaPicture:
    """What `pca_picture` drew: the file, and per image the (h, w) foreground mask and the
    (h, w, 3) uint8 colours of the patch grid."""

    path: Path
    masks: list[Tensor]
    colours: list[Tensor]


def patch_features(model: nn.Module, x: Tensor) -> Tensor:
    """Final normalised patch tokens (N, D) of one image (1, 3, H, W), in eval mode, no grad."""
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.forward_features(x)["x_norm_patchtokens"][0].float().cpu()
    finally:
        model.train(was_training)


def pca_picture(
    model: nn.Module,
    images: Sequence[Image.Image],
    out_path: str | Path,
    size: int = 224,
    foreground_threshold: float | None = 0.5,
    foreground: Foreground = "auto",
    min_side: int = 160,
    gap: int = 2,
) -> PcaPicture:
    """Save a PNG with the images side by side in the top row and their PCA colours below.

    Args:
        model: a backbone with `patch_size` and `forward_features(x)["x_norm_patchtokens"]`
            (a `VisionTransformer`).
        images: PIL images (any size; each is resized so its short side is about `size`, see
            `prepare_image`).
        out_path: PNG file to write (parent folders are created).
        size: short side of the model input in pixels.
        foreground_threshold: threshold on the min-max scaled first component (None: no
            foreground step, plain 3-component PCA over everything).
        foreground: which side is the foreground, see `foreground_mask`.
        min_side: smallest panel side (tiny inputs are scaled up), see `panel_size`.
        gap: white pixels between panels.

    Each column is as wide as its image's panel; picture size = (sum of panel widths + gaps,
    2 * tallest panel + gap).

    Example:
        >>> pca_picture(model, [load_image("a.jpg"), load_image("b.jpg")], "out/pca.png").masks[0].shape
        torch.Size([16, 21])
    """
    if not images:
        raise ValueError("no images given")
    p = int(model.patch_size)
    shown, feats, grids = [], [], []
    for image in images:
        resized, x = prepare_image(image, p, size)
        shown.append(resized)
        feats.append(patch_features(model, x))
        grids.append((x.shape[2] // p, x.shape[3] // p))
    rgb, fg = pca_rgb(feats, foreground_threshold, foreground)
    colours = [c.reshape(h, w, 3) for c, (h, w) in zip(rgb, grids)]
    masks = [m.reshape(h, w) for m, (h, w) in zip(fg, grids)]

    sizes = [panel_size(s.size, min_side) for s in shown]
    width = sum(w for w, _ in sizes) + gap * (len(sizes) - 1)
    height = max(h for _, h in sizes)
    canvas = Image.new("RGB", (width, 2 * height + gap), "white")
    left = 0
    for i, (s, c, (w, h)) in enumerate(zip(shown, colours, sizes)):
        canvas.paste(tile(s, f"image {i}", (w, h), Image.Resampling.BICUBIC), (left, 0))
        canvas.paste(tile(Image.fromarray(c.numpy()), None, (w, h)), (left, height + gap))
        left += w + gap
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return PcaPicture(out, masks, colours)

"""The DINOv2 multi-crop augmentation on a whole batch of tensors at once.

`MultiCropAugmentation` crops one PIL image at a time; for small images (28 px) its ~40 Python-level
operations per image cost as much CPU as the model step. `BatchMultiCrop` makes the same crops for
a batch of equally sized uint8 images with a handful of tensor operations:

- random resized crop + horizontal flip: one `affine_grid` / `grid_sample` (bicubic) per crop kind,
  with torchvision's crop-parameter rule (10 tries, then the centred fallback) vectorised;
- colour jitter (brightness, contrast, saturation, hue in a random order per crop, p 0.8),
  grayscale (p 0.2), solarisation (global crop 2, p 0.2): torchvision's float formulas, per crop;
- Gaussian blur: one grouped separable convolution with a kernel per crop (reflect padding, as
  torchvision); crops drawn without blur get the identity kernel;
- ImageNet normalisation.

Differences from the per-image path, by design: the source is one fixed-size image per sample
(`SourceImage` resizes the short side and centre-crops to `source_size`), values stay float
between operations (no uint8 rounding), and a crop that downsamples is not antialiased (so keep
`source_size` near the global crop size; the tiny preset uses the crop size itself).

Randomness: every parameter of a batch is drawn from one `torch.Generator`, in a fixed order, so a
batch is a pure function of its seed. Parameters are drawn on the host; the pixels are computed on
the images' device, so the same call runs in a loader worker (CPU) or on the GPU
(`crops.batched_on=device`) with the same crops up to float rounding. The loader seeds it per
global batch and each rank keeps its own rows (`rows`), so the crops of an image do not depend on
the world size.

Example:
    >>> aug = BatchMultiCrop(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    >>> out = aug(images_uint8, generator=torch.Generator().manual_seed(0))   # images: (B, 3, 28, 28)
    >>> out["global_crops"].shape, out["local_crops"].shape                   # crop-major
    (torch.Size([2 * B, 3, 28, 28]), torch.Size([2 * B, 3, 14, 14]))
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dinokit.data.transforms import _RRC_RATIO, MultiCropAugmentation

__all__ = ["BatchMultiCrop", "SourceImage", "resized_crop_params"]

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale on tensors
_SOLARIZE_THRESHOLD = 128 / 255  # torchvision RandomSolarize(128) on uint8, as a float
_RRC_TRIES = 10


class SourceImage:
    """PIL image -> uint8 (3, S, S) tensor: short side resized to S (bicubic), centre crop.

    The per-sample part of the batched path; images already S x S are only converted.
    """

    def __init__(self, source_size: int) -> None:
        self.size = int(source_size)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        """`generator` is unused (nothing here is random); it spares the dataset re-seeding torch."""
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = TF.resize(image, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
            image = TF.center_crop(image, [self.size, self.size])
        return TF.pil_to_tensor(image)

    def __repr__(self) -> str:
        return f"SourceImage({self.size})"


def resized_crop_params(n: int, height: int, width: int, scale: tuple[float, float],
                        g: torch.Generator | None) -> Tensor:
    """torchvision's `RandomResizedCrop.get_params` for n crops of one image size: (n, 4) int64
    rows (top, left, h, w). Each crop takes its first of 10 valid tries, else the centred
    fallback with the aspect ratio clamped into [3/4, 4/3]."""
    area = height * width
    target_area = area * torch.empty(n, _RRC_TRIES).uniform_(scale[0], scale[1], generator=g)
    log_ratio = torch.empty(n, _RRC_TRIES).uniform_(math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]), generator=g)
    aspect = log_ratio.exp()
    w = (target_area * aspect).sqrt().round().long()
    h = (target_area / aspect).sqrt().round().long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(valid.any(1), valid.int().argmax(1), -1)
    pos = torch.rand(n, 2, generator=g)
    in_ratio = width / height
    if in_ratio < _RRC_RATIO[0]:
        fw, fh = width, int(round(width / _RRC_RATIO[0]))
    elif in_ratio > _RRC_RATIO[1]:
        fw, fh = int(round(height * _RRC_RATIO[1])), height
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    h_sel = torch.where(first >= 0, h[rows, pick], fh)
    w_sel = torch.where(first >= 0, w[rows, pick], fw)
    # randint(0, H - h + 1) as floor(u * (H - h + 1)).
    top = torch.where(first >= 0, (pos[:, 0] * (height - h_sel + 1)).long(), (height - fh) // 2)
    left = torch.where(first >= 0, (pos[:, 1] * (width - w_sel + 1)).long(), (width - fw) // 2)
    return torch.stack([top, left, h_sel, w_sel], 1)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_crop(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _per_crop(f)).clamp(0, 1)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (_per_crop(f) * x + (1 - _per_crop(f)) * mean).clamp(0, 1)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return (_per_crop(f) * x + (1 - _per_crop(f)) * _gray(x)).clamp(0, 1)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    """torchvision `adjust_hue` (RGB -> HSV, shift H, back to RGB) with one shift per crop."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    chroma = maxc - minc
    gray = chroma == 0
    safe = torch.where(gray, torch.ones_like(chroma), chroma)
    sat = chroma / torch.where(gray, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + f.view(-1, 1, 1), 1.0)
    # HSV -> RGB in closed form: channel n in (R, G, B) = (5, 3, 1) is
    # v - v * s * clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6.
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    v = maxc.unsqueeze(1)
    return (v - v * sat.unsqueeze(1) * ramp).clamp(0.0, 1.0)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _colorless(images: Tensor) -> Tensor:
    """(m,) bool: images whose three channels are equal everywhere (grey images stored as RGB).

    Brightness, contrast, saturation and grayscale map such an image to another one, and a hue
    shift is then exactly the identity (chroma 0: H = S = 0, and V is the pixel), so their crops
    skip the hue operation: the most expensive colour operation, and the same result. Only
    checked on the CPU, where it costs a comparison of the uint8 images and never waits for a GPU.
    """
    return ((images[:, 0] == images[:, 1]) & (images[:, 1] == images[:, 2])).flatten(1).all(1)


def _gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """(N, size) normalised 1-D Gaussian kernels, torchvision's sampling."""
    half = (size - 1) * 0.5
    xs = torch.linspace(-half, half, size)
    k = torch.exp(-0.5 * (xs[None] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


class BatchMultiCrop:
    """`MultiCropAugmentation`'s recipe applied to a batch; see the module docstring.

    Args: those of `MultiCropAugmentation` (sizes, scales, probabilities, jitter strengths, blur
    sigma and kernel), which validates them and derives the jitter ranges and blur kernels;
    `from_multicrop(aug)` takes an existing one.

    `__call__(images, generator=None, rows=None, group=None)`:
        images: (m, 3, S, S) uint8 (or float in [0, 1]) images of this process; rows: their
            indices in a group of `group` images whose parameters are all drawn (default: the m
            images are the group).
        Returns {"global_crops": (2m, 3, G, G), "local_crops": (L*m, 3, l, l)} float32, normalised,
        crop-major: the layout of `collate_data_and_cast`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._use(MultiCropAugmentation(*args, **kwargs))

    @classmethod
    def from_multicrop(cls, aug: MultiCropAugmentation) -> "BatchMultiCrop":
        out = cls.__new__(cls)
        out._use(aug)
        return out

    def _use(self, recipe: MultiCropAugmentation) -> None:
        self.recipe = recipe
        self.mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(recipe.std).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"BatchMultiCrop({self.recipe!r})"

    # -- parameters: drawn for a whole group of images, in a fixed order --

    def _draw(self, n: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
              height: int, width: int, g: torch.Generator | None) -> dict[str, Tensor]:
        """The random parameters of n crops of one kind (one per image of the group)."""
        a = self.recipe
        p: dict[str, Tensor] = {"box": resized_crop_params(n, height, width, scale, g),
                                "flip": torch.rand(n, generator=g) < a.flip_p,
                                "jitter": torch.rand(n, generator=g) <= a.color_jitter_p,
                                "order": torch.rand(n, 4, generator=g).argsort(1)}
        for name, r in zip(("brightness", "contrast", "saturation", "hue"), a._jitter_ranges):
            if r is not None:
                p[name] = torch.empty(n).uniform_(r[0], r[1], generator=g)
        p["gray"] = torch.rand(n, generator=g) < a.grayscale_p
        p["blur"] = torch.rand(n, generator=g) < blur_p
        p["sigma"] = torch.empty(n).uniform_(a.blur_sigma[0], a.blur_sigma[1], generator=g)
        p["solarize"] = torch.rand(n, generator=g) < solarize_p
        return p

    # -- pixels: one crop kind for the kept images, each op on the whole stack at once --

    def _crop(self, x: Tensor, p: dict[str, Tensor], size: int, kernel: int) -> Tensor:
        n, _, height, width = x.shape
        top, left, h, w = p["box"].double().unbind(1)
        # Output pixel centre u in [-1, 1] (align_corners=False) samples the input at
        # (2 * left + w * (u + 1)) / W - 1: a scale and a shift per crop; flipping negates the scale.
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = torch.where(p["flip"], -w / width, w / width)
        theta[:, 0, 2] = (2 * left + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * top + h) / height - 1
        grid = F.affine_grid(theta.float().to(x.device), [n, 3, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)
        x = self._color(x, p)
        x = self._blur(x, p, kernel)
        solarize = p["solarize"].to(x.device)
        return torch.where(_per_crop(solarize) & (x >= _SOLARIZE_THRESHOLD), 1.0 - x, x)

    def _color(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        for slot in range(4):
            for op_index, (name, op) in enumerate(zip(("brightness", "contrast", "saturation", "hue"), _JITTER_OPS)):
                if name not in p:
                    continue
                # Only the crops that take this operation in this slot are computed.
                # (Parameters live on the host: choosing rows never waits for a GPU.)
                take = p["jitter"] & (p["order"][:, slot] == op_index)
                if name == "hue" and "colorless" in p:
                    take = take & ~p["colorless"]
                rows = take.nonzero().flatten()
                if len(rows):
                    on = rows.to(x.device)
                    x = x.index_copy(0, on, op(x[on], p[name][rows].to(x.device)))
        rows = p["gray"].nonzero().flatten().to(x.device)
        return x.index_copy(0, rows, _gray(x[rows]).expand(-1, 3, -1, -1)) if len(rows) else x

    @staticmethod
    def _blur(x: Tensor, p: dict[str, Tensor], kernel: int) -> Tensor:
        blur = p["blur"]
        if not blur.any():
            return x
        n, c, height, width = x.shape
        identity = torch.zeros(kernel)
        identity[kernel // 2] = 1.0
        k = torch.where(blur[:, None], _gaussian_kernels(p["sigma"], kernel), identity)
        k = k.repeat_interleave(c, 0).to(x.device)  # (n * c, kernel)
        pad = kernel // 2
        # Reflect padding, as torchvision's gaussian_blur.
        y = F.pad(x.reshape(1, n * c, height, width), [pad, pad, pad, pad], mode="reflect")
        y = F.conv2d(y, k.view(n * c, 1, 1, kernel), groups=n * c)
        y = F.conv2d(y, k.view(n * c, 1, kernel, 1), groups=n * c)
        return y.view(n, c, height, width)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 rows: Sequence[int] | Tensor | None = None, group: int | None = None) -> dict[str, Tensor]:
        """Crops of `images` (m, 3, S, S); see the class docstring for `rows` and `group`."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchMultiCrop takes (n, 3, H, W) images, got shape {tuple(images.shape)}")
        m, _, height, width = images.shape
        group = m if group is None else int(group)
        keep = torch.arange(m) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if len(keep) != m or (m and int(keep.max()) >= group):
            raise ValueError(f"rows must give one index < group ({group}) per image, got {len(keep)} for {m} images")
        g, a = generator, self.recipe
        gs, ls, gk, lk = a.global_crops_size, a.local_crops_size, a.global_kernel, a.local_kernel
        # Every parameter is drawn for the whole group first, so this process's images get the
        # same crops whichever rows it holds; pixels are computed for the kept rows only.
        kinds = [(gs, gk, self._draw(group, a.global_crops_scale, a.blur_p[0], 0.0, height, width, g)),
                 (gs, gk, self._draw(group, a.global_crops_scale, a.blur_p[1], a.solarize_p, height, width, g))]
        kinds += [(ls, lk, self._draw(group, a.local_crops_scale, a.blur_p[2], 0.0, height, width, g))
                  for _ in range(a.local_crops_number)]
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        colorless = _colorless(images) if images.device.type == "cpu" else None
        crops = []
        for size, kernel, p in kinds:
            mine = {k: v[keep] for k, v in p.items()}
            if colorless is not None:
                mine["colorless"] = colorless
            crops.append(self._crop(x, mine, size, kernel))
        local_crops = torch.cat(crops[2:]) if a.local_crops_number else torch.empty(0, 3, ls, ls, device=x.device)
        return {"global_crops": self._normalize(torch.cat(crops[:2])), "local_crops": self._normalize(local_crops)}

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

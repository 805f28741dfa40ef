"""DINO / DINOv2 multi-crop augmentation and the evaluation transform.

`MultiCropAugmentation` follows the official DINOv2 recipe (`dinov2.data.augmentations`): per
crop a bicubic random resized crop and a horizontal flip, colour jitter (p 0.8) then grayscale
(p 0.2), Gaussian blur (p 1.0 on global crop 1, 0.1 on global crop 2, 0.5 on local crops), and
solarisation (p 0.2) on global crop 2 only, then ImageNet normalisation.

Randomness: every draw goes through ONE `torch.Generator` passed to `__call__` (or torch's global
generator when None), in a fixed order. torchvision's own random transforms cannot take a
generator, so the random parameters are drawn here, the same way torchvision draws them, and
applied with `torchvision.transforms.v2.functional`. The data loader seeds one generator per sample
from (seed, sample position), which makes every crop reproducible regardless of worker processes.

Blur probability, a known upstream discrepancy: the official DINOv2 (and DINOv3) `GaussianBlur`
passes `1 - p` to `RandomApply`, so the released checkpoints were trained with blur probability
0.0 on global crop 1, 0.9 on global crop 2 and 0.5 on locals (facebookresearch/dinov2 PR #411).
Here `blur_p` means what it says; the default is the paper's / DINO v1's (1.0, 0.1, 0.5) and
`DINOV2_RELEASED_BLUR_P` reproduces the released-checkpoint behaviour.

Blur kernel: the official kernel is 9 px for every crop (224 px globals and 96/98 px locals). For
crops under 96 px (e.g. 28 px Fashion-MNIST) the kernel shrinks with the crop (odd, >= 3) so it
stays a comparable fraction of the image; `blur_kernel_size` overrides. The sigma range is not
scaled: pass a smaller `blur_sigma` for tiny images if sigma 2 blurs too much.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = [
    "DINOV2_RELEASED_BLUR_P",
    "DINO_V1_CROPS",
    "DINOV2_CROPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "auto_blur_kernel_size",
    "dino_v1_crops",
    "dinov2_crops",
    "eval_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Effective (global 1, global 2, local) blur probabilities of the official DINOv2 code.
DINOV2_RELEASED_BLUR_P: tuple[float, float, float] = (0.0, 0.9, 0.5)

DINOV2_CROPS: dict[str, Any] = dict(
    global_crops_size=224, local_crops_size=98, global_crops_scale=(0.32, 1.0),
    local_crops_scale=(0.05, 0.32), local_crops_number=8,
)
DINO_V1_CROPS: dict[str, Any] = dict(
    global_crops_size=224, local_crops_size=96, global_crops_scale=(0.4, 1.0),
    local_crops_scale=(0.05, 0.4), local_crops_number=8,
)

_BICUBIC = InterpolationMode.BICUBIC
_OFFICIAL_KERNEL = 9
_OFFICIAL_KERNEL_MIN_CROP = 96  # the official recipe uses kernel 9 down to its 96 px local crops
_SOLARIZE_THRESHOLD = 128  # on uint8 pixels, as torchvision.RandomSolarize(threshold=128)
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop default aspect-ratio range


def auto_blur_kernel_size(crop_size: int) -> int:
    """Gaussian-blur kernel for a crop: 9 from 96 px up (official), scaled down below, odd, >= 3.

    >>> [auto_blur_kernel_size(s) for s in (224, 98, 64, 28, 12)]
    [9, 9, 7, 3, 3]
    """
    if crop_size >= _OFFICIAL_KERNEL_MIN_CROP:
        return _OFFICIAL_KERNEL
    k = int(round(_OFFICIAL_KERNEL * crop_size / _OFFICIAL_KERNEL_MIN_CROP))
    if k % 2 == 0:
        k += 1
    return max(3, k)


def _rand(g: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=g))


def _uniform(g: torch.Generator | None, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=g))


def _resized_crop_params(
    width: int, height: int, scale: tuple[float, float], g: torch.Generator | None
) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`, drawing from `g`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]))
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g))
            return top, left, h, w
    # Fallback: the largest centred crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < _RRC_RATIO[0]:
        w, h = width, int(round(width / _RRC_RATIO[0]))
    elif in_ratio > _RRC_RATIO[1]:
        h, w = height, int(round(height * _RRC_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height) of a PIL image or a (..., H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


class MultiCropAugmentation:
    """Two global crops and `local_crops_number` local crops of one image, DINOv2 style.

    Args:
        global_crops_size: side of the global crops in pixels (224; 28 for Fashion-MNIST).
        local_crops_size: side of the local crops (98 for /14 models, 96 for /16; 12 for 28 px).
        global_crops_scale: area fraction range of the global random resized crops.
        local_crops_scale: area fraction range of the local crops.
        local_crops_number: number of local crops (0 allowed).
        mean, std: per-channel normalisation.
        flip_p: horizontal flip probability.
        color_jitter: (brightness, contrast, saturation, hue) strengths as in `ColorJitter`.
        color_jitter_p: probability of applying the jitter.
        grayscale_p: probability of converting to (3-channel) grayscale.
        blur_p: blur probability for (global crop 1, global crop 2, local crops).
        solarize_p: solarisation probability of global crop 2.
        blur_sigma: Gaussian sigma range, drawn uniformly.
        blur_kernel_size: fixed kernel side; None -> `auto_blur_kernel_size(crop size)`.

    Returns (from `__call__(image, generator=None)`):
        {"global_crops": [g1, g2], "global_crops_teacher": [g1, g2], "local_crops": [l1, ...]}
        with float32 normalised tensors, g: (3, G, G), l: (3, L, L).

    Example:
        >>> aug = MultiCropAugmentation(global_crops_size=28, local_crops_size=12, local_crops_number=4)
        >>> out = aug(image, generator=torch.Generator().manual_seed(0))
        >>> out["global_crops"][0].shape, out["local_crops"][0].shape
        (torch.Size([3, 28, 28]), torch.Size([3, 12, 12]))
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip_p: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        solarize_p: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
    ) -> None:
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        for name, (lo, hi) in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if blur_kernel_size is not None and (blur_kernel_size < 1 or blur_kernel_size % 2 == 0):
            raise ValueError(f"blur_kernel_size must be odd and positive, got {blur_kernel_size}")
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.flip_p = flip_p
        self.color_jitter_p = color_jitter_p
        self.grayscale_p = grayscale_p
        self.blur_p = tuple(blur_p)
        self.solarize_p = solarize_p
        self.blur_sigma = tuple(blur_sigma)
        self.global_kernel = blur_kernel_size or auto_blur_kernel_size(self.global_crops_size)
        self.local_kernel = blur_kernel_size or auto_blur_kernel_size(self.local_crops_size)
        b, c, s, h = color_jitter
        # ColorJitter ranges; None = that component off (and, as in torchvision, not drawn).
        self._jitter_ranges: list[tuple[float, float] | None] = [
            (max(0.0, 1 - b), 1 + b) if b > 0 else None,
            (max(0.0, 1 - c), 1 + c) if c > 0 else None,
            (max(0.0, 1 - s), 1 + s) if s > 0 else None,
            (-h, h) if h > 0 else None,
        ]

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global={self.global_crops_size}px {self.global_crops_scale} x2, "
            f"local={self.local_crops_size}px {self.local_crops_scale} x{self.local_crops_number}, "
            f"blur_p={self.blur_p}, kernels=({self.global_kernel}, {self.local_kernel}))"
        )

    # -- pieces, each drawing from g in a fixed order (the order of the official pipeline) --

    def _geometric(self, image: Any, size: int, scale: tuple[float, float], g: torch.Generator | None) -> Any:
        width, height = _image_size(image)
        top, left, h, w = _resized_crop_params(width, height, scale, g)
        out = F.resized_crop(image, top, left, h, w, [size, size], interpolation=_BICUBIC, antialias=True)
        if _rand(g) < self.flip_p:
            out = F.horizontal_flip(out)
        return out

    def _color(self, image: Any, g: torch.Generator | None) -> Any:
        # RandomApply applies when rand <= p (torchvision: `if p < rand: skip`).
        if _rand(g) <= self.color_jitter_p:
            order = torch.randperm(4, generator=g).tolist()
            factors = [None if r is None else _uniform(g, *r) for r in self._jitter_ranges]
            ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
            for i in order:
                if factors[i] is not None:
                    image = ops[i](image, factors[i])
        if _rand(g) < self.grayscale_p:
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        return image

    def _blur(self, image: Any, p: float, kernel: int, g: torch.Generator | None) -> Any:
        if _rand(g) <= p and p > 0:
            sigma = _uniform(g, *self.blur_sigma)
            image = F.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        return image

    def _solarize(self, image: Any, g: torch.Generator | None) -> Any:
        if _rand(g) < self.solarize_p:
            image = F.solarize(image, _SOLARIZE_THRESHOLD)
        return image

    def _to_tensor(self, image: Any) -> torch.Tensor:
        t = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        return F.normalize(t, self.mean, self.std).as_subclass(torch.Tensor)

    def __call__(self, image: Image.Image | torch.Tensor, generator: torch.Generator | None = None) -> dict[str, list[torch.Tensor]]:
        """Crop `image` (PIL RGB, or a uint8 (3, H, W) tensor); see the class docstring."""
        g = generator
        gs, ls = self.global_crops_size, self.local_crops_size
        g1 = self._geometric(image, gs, self.global_crops_scale, g)
        g1 = self._to_tensor(self._blur(self._color(g1, g), self.blur_p[0], self.global_kernel, g))
        g2 = self._geometric(image, gs, self.global_crops_scale, g)
        g2 = self._blur(self._color(g2, g), self.blur_p[1], self.global_kernel, g)
        g2 = self._to_tensor(self._solarize(g2, g))
        local_crops = []
        for _ in range(self.local_crops_number):
            crop = self._geometric(image, ls, self.local_crops_scale, g)
            crop = self._blur(self._color(crop, g), self.blur_p[2], self.local_kernel, g)
            local_crops.append(self._to_tensor(crop))
        return {"global_crops": [g1, g2], "global_crops_teacher": [g1, g2], "local_crops": local_crops}


def dinov2_crops(**overrides: Any) -> MultiCropAugmentation:
    """DINOv2 multi-crop: 2 x 224 px (scale 0.32-1) + 8 x 98 px (scale 0.05-0.32).

    >>> aug = dinov2_crops(global_crops_size=28, local_crops_size=12)   # any argument can be overridden
    """
    return MultiCropAugmentation(**{**DINOV2_CROPS, **overrides})


def dino_v1_crops(**overrides: Any) -> MultiCropAugmentation:
    """DINO v1 multi-crop: 2 x 224 px (scale 0.4-1) + 8 x 96 px (scale 0.05-0.4)."""
    return MultiCropAugmentation(**{**DINO_V1_CROPS, **overrides})


class _EvalTransform:
    """Resize the short side (bicubic), center crop, to float, normalise: PIL -> (3, crop, crop)."""

    def __init__(self, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.resize, self.crop = int(resize), int(crop)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        out = F.resize(image, [self.resize], interpolation=_BICUBIC, antialias=True)
        out = F.center_crop(out, [self.crop, self.crop])
        out = F.to_dtype(F.to_image(out), torch.float32, scale=True)
        return F.normalize(out, self.mean, self.std).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"eval_transform(resize={self.resize}, crop={self.crop})"


def eval_transform(
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> _EvalTransform:
    """The k-NN / linear-probe transform: resize short side to `resize` (bicubic), center crop.

    For small images keep the 256:224 ratio, e.g. `eval_transform(resize=32, crop=28)`.

    Example:
        >>> eval_transform()(pil_image).shape
        torch.Size([3, 224, 224])
    """
    return _EvalTransform(resize, crop, mean, std)

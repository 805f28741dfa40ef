"""Multi-crop augmentation and eval transform: shapes, recipe placement, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.transforms import (
    DINO_V1_CROPS,
    DINOV2_CROPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    auto_blur_kernel_size,
    dino_v1_crops,
    dinov2_crops,
    eval_transform,
)


def _noise(w: int = 28, h: int = 28, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _all(out: dict) -> list[torch.Tensor]:
    return out["global_crops"] + out["local_crops"]


def test_small_image_crop_shapes() -> None:
    aug = MultiCropAugmentation(global_crops_size=28, local_crops_size=12, local_crops_number=4)
    out = aug(_noise(), generator=torch.Generator().manual_seed(0))
    assert [t.shape for t in out["global_crops"]] == [(3, 28, 28)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 12, 12)] * 4
    assert all(t.dtype == torch.float32 and type(t) is torch.Tensor for t in _all(out))
    assert out["global_crops_teacher"][0] is out["global_crops"][0]
    assert aug.global_kernel == 3 and aug.local_kernel == 3


def test_default_sizes_upsample_small_images() -> None:
    out = dinov2_crops(local_crops_number=2)(_noise(40, 30), generator=torch.Generator().manual_seed(1))
    assert [t.shape for t in _all(out)] == [(3, 224, 224)] * 2 + [(3, 98, 98)] * 2


def test_same_generator_seed_same_crops_and_global_rng_untouched() -> None:
    aug = MultiCropAugmentation(28, 12, local_crops_number=3)
    image = _noise()
    state = torch.get_rng_state()
    a = aug(image, generator=torch.Generator().manual_seed(7))
    b = aug(image, generator=torch.Generator().manual_seed(7))
    c = aug(image, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(_all(a), _all(b)))
    assert not all(torch.equal(x, y) for x, y in zip(_all(a), _all(c)))
    assert torch.equal(state, torch.get_rng_state())


def test_global_rng_seeding_is_reproducible_too() -> None:
    aug = MultiCropAugmentation(28, 12, local_crops_number=2)
    torch.manual_seed(3)
    a = aug(_noise())
    torch.manual_seed(3)
    b = aug(_noise())
    assert all(torch.equal(x, y) for x, y in zip(_all(a), _all(b)))


def _identity_aug(**kw) -> MultiCropAugmentation:
    """Everything off; scale (1, 1) on a square image falls back to the whole image, unresized."""
    base = dict(global_crops_size=16, local_crops_size=16, global_crops_scale=(1.0, 1.0),
                local_crops_scale=(1.0, 1.0), local_crops_number=1, mean=(0, 0, 0), std=(1, 1, 1),
                flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    return MultiCropAugmentation(**{**base, **kw})


def test_blur_and_solarize_land_on_the_right_crops() -> None:
    checker = Image.fromarray((np.indices((16, 16)).sum(0) % 2 * 200 + 20).astype(np.uint8)).convert("RGB")
    plain = torch.from_numpy(np.array(checker)).permute(2, 0, 1).float() / 255
    g = torch.Generator().manual_seed(0)
    out = _identity_aug()(checker, generator=g)
    assert all(torch.allclose(t, plain) for t in _all(out))

    out = _identity_aug(blur_p=(1.0, 0.0, 0.0))(checker, generator=g)
    g1, g2 = out["global_crops"]
    assert g1.std() < plain.std() * 0.9  # blurred checkerboard loses contrast
    assert torch.allclose(g2, plain) and torch.allclose(out["local_crops"][0], plain)

    out = _identity_aug(solarize_p=1.0)(checker, generator=g)
    g1, g2 = out["global_crops"]
    solarized = torch.where(plain * 255 >= 128, (255 - plain * 255) / 255, plain)
    assert torch.allclose(g1, plain) and torch.allclose(g2, solarized, atol=1e-6)


def test_normalisation_uses_mean_and_std() -> None:
    gray = Image.new("RGB", (16, 16), (128, 128, 128))
    out = _identity_aug(mean=IMAGENET_MEAN, std=IMAGENET_STD)(gray)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out["global_crops"][0][:, 5, 5], expected, atol=1e-6)


def test_presets() -> None:
    v2, v1 = dinov2_crops(), dino_v1_crops(local_crops_number=2)
    assert (v2.global_crops_size, v2.local_crops_size, v2.local_crops_number) == (224, 98, 8)
    assert v2.global_crops_scale == (0.32, 1.0) and v2.local_crops_scale == (0.05, 0.32)
    assert (v1.global_crops_size, v1.local_crops_size, v1.local_crops_number) == (224, 96, 2)
    assert v1.global_crops_scale == (0.4, 1.0) and v1.local_crops_scale == (0.05, 0.4)
    assert DINOV2_CROPS["local_crops_size"] == 98 and DINO_V1_CROPS["local_crops_size"] == 96
    assert (v2.global_kernel, v2.local_kernel, v1.local_kernel) == (9, 9, 9)  # official kernel 9


def test_auto_blur_kernel_size_is_odd_and_scaled() -> None:
    assert [auto_blur_kernel_size(s) for s in (518, 224, 98, 96, 64, 28, 12, 4)] == [9, 9, 9, 9, 7, 3, 3, 3]
    assert all(auto_blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropAugmentation(local_crops_number=-1)
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropAugmentation(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="blur_kernel_size"):
        MultiCropAugmentation(blur_kernel_size=4)


def test_eval_transform_small_and_default() -> None:
    t = eval_transform(resize=32, crop=28)(_noise(60, 40))
    assert t.shape == (3, 28, 28) and t.dtype == torch.float32
    assert eval_transform()(_noise(300, 260)).shape == (3, 224, 224)
    gray = eval_transform(resize=32, crop=28)(Image.new("RGB", (50, 40), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(gray[:, 10, 10], expected, atol=1e-6)

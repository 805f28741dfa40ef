"""Batched multi-crop (`dinokit.data.batch_augment`): each operation against torchvision, crop
geometry, group/rank invariance, and the loader and training paths that use it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from dinokit.data import batch_augment as ba
from dinokit.data.batch_augment import BatchMultiCrop, SourceImage, resized_crop_params
from dinokit.data.loader import make_train_loader
from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
OFF = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def _images(n: int = 6, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_crop_boxes_follow_torchvision_rule() -> None:
    boxes = resized_crop_params(4000, 28, 28, (0.05, 0.32), torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 28) & (left + w <= 28) & (h > 0) & (w > 0)).all())
    area = (h * w).float() / 28**2
    # Rounding the sides moves the area a little outside the drawn range, as in torchvision.
    assert 0.02 < float(area.min()) and float(area.max()) < 0.40
    assert abs(float(area.mean()) - 0.185) < 0.01
    ratio = (w.float() / h.float()).log()
    assert float(ratio.abs().max()) < math.log(4 / 3) + 0.25 and abs(float(ratio.mean())) < 0.02
    # Placement is uniform: the mean top-left sits at half the free room.
    assert abs(float((top.float() / (28 - h + 1).float()).mean()) - 0.5) < 0.03


def test_impossible_crops_fall_back_like_torchvision() -> None:
    # A 10 x 100 image cannot hold a full-area crop with ratio in [3/4, 4/3]: every try fails.
    box = resized_crop_params(3, 100, 10, (1.0, 1.0), torch.Generator().manual_seed(0))
    expected = RandomResizedCrop.get_params(torch.zeros(1, 100, 10), scale=[1.0, 1.0], ratio=[3 / 4, 4 / 3])
    assert box.tolist() == [list(expected)] * 3


def test_full_crop_without_augmentation_is_the_normalised_image() -> None:
    images = _images()
    aug = BatchMultiCrop(28, 14, global_crops_scale=(1.0, 1.0), local_crops_number=0, **OFF)
    out = aug(images, torch.Generator().manual_seed(0))
    assert out["local_crops"].shape == (0, 3, 14, 14)
    expected = images.float() / 255
    torch.testing.assert_close(_unnormalize(out["global_crops"]), torch.cat([expected, expected]), atol=1e-5, rtol=0)
    flipped = BatchMultiCrop(28, 14, global_crops_scale=(1.0, 1.0), local_crops_number=0,
                             **{**OFF, "flip_p": 1.0})(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(_unnormalize(flipped["global_crops"][:6]), expected.flip(-1), atol=1e-5, rtol=0)


def test_a_native_scale_box_is_the_sub_window() -> None:
    images = _images(2).float() / 255
    aug = BatchMultiCrop(28, 14, local_crops_number=0, **OFF)
    params = aug._draw(2, (0.25, 0.25), 0.0, 0.0, 28, 28, torch.Generator().manual_seed(0))
    params["box"] = torch.tensor([[3, 5, 14, 14], [10, 0, 14, 14]])
    out = aug._crop(images, params, 14, 3)
    torch.testing.assert_close(out[0], images[0, :, 3:17, 5:19], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], images[1, :, 10:24, 0:14], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_colour_operations_match_torchvision_per_crop(name: str) -> None:
    x = torch.rand(5, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    x[0] = x[0, :1]  # a gray crop: hue and saturation leave it unchanged
    factors = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4]) if name != "hue" else torch.tensor([-0.1, -0.03, 0.0, 0.05, 0.1])
    ops = {"brightness": (ba._brightness, TF.adjust_brightness), "contrast": (ba._contrast, TF.adjust_contrast),
           "saturation": (ba._saturation, TF.adjust_saturation), "hue": (ba._hue, TF.adjust_hue)}
    ours, theirs = ops[name]
    expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(5)])
    torch.testing.assert_close(ours(x, factors), expected, atol=2e-6, rtol=0)


def test_blur_matches_torchvision_per_crop_and_skips_unblurred() -> None:
    x = torch.rand(4, 3, 14, 14, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    params = {"blur": torch.tensor([True, True, False, True]), "sigma": sigma}
    out = BatchMultiCrop._blur(x, params, 5)
    for i in (0, 1, 3):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=1e-7, rtol=0)


def test_grayscale_and_solarize() -> None:
    images = _images(4)
    gray = BatchMultiCrop(28, 14, local_crops_number=1, **{**OFF, "grayscale_p": 1.0})(images)
    for crops in gray.values():
        rgb = _unnormalize(crops)
        torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(rgb[:, 1], rgb[:, 2], atol=1e-5, rtol=0)
    aug = BatchMultiCrop(28, 14, global_crops_scale=(1.0, 1.0), local_crops_number=0, **{**OFF, "solarize_p": 1.0})
    # No pixel at the threshold itself, where a float rounding error would decide.
    images = torch.where((images == 127) | (images == 128), 100, images).to(torch.uint8)
    out = _unnormalize(aug(images)["global_crops"])
    x = images.float() / 255
    torch.testing.assert_close(out[:4], x, atol=1e-5, rtol=0)  # only global crop 2 is solarised
    torch.testing.assert_close(out[4:], torch.where(x >= 128 / 255, 1 - x, x), atol=1e-5, rtol=0)


def test_rows_of_a_group_get_the_crops_the_whole_group_would() -> None:
    images = _images(8)
    aug = BatchMultiCrop(28, 14, local_crops_number=2)
    whole = aug(images, torch.Generator().manual_seed(5))
    halves = [aug(images[r], torch.Generator().manual_seed(5), rows=r, group=8) for r in (range(0, 8, 2), range(1, 8, 2))]
    for key, n_crops in (("global_crops", 2), ("local_crops", 2)):
        full = whole[key].view(n_crops, 8, *whole[key].shape[1:])
        for start, half in zip((0, 1), halves):
            torch.testing.assert_close(half[key].view(n_crops, 4, *half[key].shape[1:]), full[:, start::2], atol=0, rtol=0)
    again = aug(images, torch.Generator().manual_seed(5))
    assert torch.equal(again["local_crops"], whole["local_crops"])
    other = aug(images, torch.Generator().manual_seed(6))
    assert not torch.equal(other["global_crops"], whole["global_crops"])


def test_augmentation_statistics_match_the_per_image_path() -> None:
    """Same recipe, two implementations: mean and spread of the crops agree."""
    from dinokit.data.transforms import MultiCropAugmentation

    images = _images(256, seed=3)
    # Structured images (smooth gradients) so that blur and crops matter.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 28), torch.linspace(0, 1, 28), indexing="ij")
    images = (images.float() * 0.3 + 180 * (yy * xx)).clamp(0, 255).to(torch.uint8)
    per_image = MultiCropAugmentation(28, 14, local_crops_number=2)
    batched = BatchMultiCrop.from_multicrop(per_image)
    ours = batched(images, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ref = [per_image(Image.fromarray(im.permute(1, 2, 0).numpy()), generator=g) for im in images]
    ref_global = torch.stack([c for r in ref for c in r["global_crops"]])
    ref_local = torch.stack([c for r in ref for c in r["local_crops"]])
    for a, b in ((ours["global_crops"], ref_global), (ours["local_crops"], ref_local)):
        assert abs(float(a.mean() - b.mean())) < 0.05
        assert abs(float(a.std() / b.std()) - 1) < 0.05


def test_source_image_resizes_and_centre_crops() -> None:
    out = SourceImage(28)(Image.new("L", (56, 40), 77))
    assert out.dtype == torch.uint8 and out.shape == (3, 28, 28) and int(out.float().mean().round()) == 77


class _Generated(torch.utils.data.Dataset):
    def __init__(self, undecodable: int | None = None) -> None:
        self.undecodable = undecodable

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        if i == self.undecodable:
            return None  # an undecodable image: dropped and counted
        im = Image.new("RGB", (28, 28), (12 * i % 256, 200 - 5 * i, 40))
        im.paste((255, 255, 255), (i, 3, i + 8, 15))
        return im, i % 2


def _loader(rank: int, world_size: int, num_workers: int = 0, undecodable: int | None = None):
    base = dict(local_crops_number=2, global_crops_size=28, local_crops_size=14)
    return make_train_loader(
        _Generated(undecodable), SourceImage(28), batch_size=8 // world_size, num_workers=num_workers, seed=3,
        mask_generator=MaskingGenerator(2, max_num_patches=2), rank=rank, world_size=world_size,
        batch_transform=BatchMultiCrop(**base),
    )


def test_loader_batches_do_not_depend_on_world_size_or_workers() -> None:
    one = next(iter(_loader(0, 1)))
    assert one["collated_global_crops"].shape == (16, 3, 28, 28) and one["collated_local_crops"].shape == (16, 3, 14, 14)
    ranks = [next(iter(_loader(r, 2))) for r in (0, 1)]
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
        full = one[key].view(2, 8, *one[key].shape[1:])
        for r, batch in enumerate(ranks):
            assert torch.equal(batch[key].view(2, 4, *batch[key].shape[1:]), full[:, r::2]), key
    workers = next(iter(_loader(0, 1, num_workers=2)))
    assert torch.equal(workers["collated_local_crops"], one["collated_local_crops"])


def test_loader_drops_undecodable_images() -> None:
    it = iter(_loader(0, 1, undecodable=7))
    batches = [next(it) for _ in range(3)]  # 24 samples: every image once, 7 among them
    assert sum(b["n_skipped"] for b in batches) == 1
    for b in batches:
        assert b["collated_global_crops"].shape[0] == 2 * b["n_images"] == b["collated_masks"].shape[0]


def test_train_with_batched_crops_resumes_exactly(tmp_path: Path) -> None:
    from tests.test_train import SMALL, _losses
    from dinokit.config import load_config
    from dinokit.train.loop import train

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (40, 32), (20 * i, 255 - 20 * i, 90)).save(folder / f"{i}.png")
    cfg = lambda steps: load_config("tiny", [f"data.path={folder}", *SMALL, "crops.batched=true",  # noqa: E731
                                             f"train.max_steps={steps}", "checkpoint.every=100"])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg(4), straight)
    train(cfg(2), resumed)
    train(cfg(4), resumed)
    assert _losses(resumed) == _losses(straight) and all(math.isfinite(v) for v in _losses(straight))


def test_grey_images_skip_the_hue_shift_with_identical_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    colour = _images(8, seed=3)
    grey = colour[:, :1].expand(-1, 3, -1, -1).contiguous()
    mixed = torch.cat([grey[:4], colour[4:]])
    assert ba._colorless(mixed).tolist() == [True] * 4 + [False] * 4
    aug = BatchMultiCrop(global_crops_size=28, local_crops_size=14, local_crops_number=2, color_jitter_p=1.0)
    hue_calls: list[int] = []
    real_hue = ba._hue

    def counting_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        hue_calls.append(x.shape[0])
        return real_hue(x, f)

    monkeypatch.setattr(ba, "_JITTER_OPS", (*ba._JITTER_OPS[:3], counting_hue))
    skipped = aug(mixed, torch.Generator().manual_seed(0))
    hue_rows_skipping = sum(hue_calls)
    monkeypatch.setattr(ba, "_colorless", lambda images: torch.zeros(images.shape[0], dtype=torch.bool))
    hue_calls.clear()
    computed = aug(mixed, torch.Generator().manual_seed(0))
    # every crop is jittered (p 1): without the skip all 4 crops x 8 images take the hue shift,
    # with it only the 4 colour images' crops do
    assert sum(hue_calls) == 32 and hue_rows_skipping == 16
    for kind in ("global_crops", "local_crops"):
        assert torch.equal(skipped[kind], computed[kind])

"""The quickstart fitted to a folder of ordinary images: working size from the images, decoded
once into a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.data.datasets import ImageFolderDataset
from dinokit.folder_fit import cache_folder, fit_folder


def _folder(root: Path, size: tuple[int, int], n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / label / f"{i}.jpg")
    return root


def test_small_images_keep_the_preset(tmp_path: Path) -> None:
    fit = fit_folder(ImageFolderDataset(_folder(tmp_path, (28, 28))), 20, 300)
    assert fit.overrides == () and fit.working_size == 28 and "28 px" in fit.reason


def test_large_images_are_worked_on_at_56_px_with_fewer_steps(tmp_path: Path) -> None:
    fit = fit_folder(ImageFolderDataset(_folder(tmp_path, (200, 150))), 20, 300)
    assert fit.median_short_side == 150 and fit.working_size == 56
    assert "crops.global_size=56" in fit.overrides and "model.img_size=56" in fit.overrides
    assert "optim.epochs=6" in fit.overrides and "1800 steps" in fit.reason  # 20 x 24 / 78 tokens per image


def test_cache_decodes_once_counts_bad_files_and_is_reused(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", (120, 90))
    (src / "a" / "broken.jpg").write_bytes(b"not an image")
    folder = ImageFolderDataset(src)
    with pytest.warns(Warning):
        root, skipped = cache_folder(folder, tmp_path / "cache", 56)
    assert skipped == 1
    cached = ImageFolderDataset(root)
    assert cached.classes == ["a", "b"] and len(cached) == 12
    image, _ = cached[0]
    assert image.size == (56, 56)
    first = (root / "a" / "0.png").stat().st_mtime_ns
    again, skipped_again = cache_folder(folder, tmp_path / "cache", 56)
    assert again == root and skipped_again == 1 and (root / "a" / "0.png").stat().st_mtime_ns == first
    with pytest.warns(Warning):
        cache_folder(folder, tmp_path / "cache", 28)  # another size: rewritten
    assert Image.open(root / "a" / "0.png").size == (28, 28)

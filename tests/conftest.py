"""Shared fixtures: where the official-code reference outputs live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The repository carries the official-code reference outputs, so every clone tests against the
# same committed data; DINOKIT_REFERENCE_DIR points the tests at another copy on purpose.
BUNDLED_REFERENCE = REPO / "tests" / "data" / "reference_dinov2"


def require(module: str) -> None:
    """Import `module` or skip the test, except in CI (`CI` set), where every peer library is
    installed by the test extra and a missing one must fail rather than skip."""
    if os.environ.get("CI"):
        __import__(module)
    else:
        pytest.importorskip(module, reason=f"{module} is needed (pip install -e '.[test]')")


def reference_folder() -> Path:
    env = os.environ.get("DINOKIT_REFERENCE_DIR")
    if env:
        return Path(env)
    return BUNDLED_REFERENCE


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    folder = reference_folder()
    if not (folder / "manifest.json").is_file():
        pytest.skip(f"no reference data at {folder} (set DINOKIT_REFERENCE_DIR)")
    return folder


@pytest.fixture(scope="session")
def noise_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 unlabeled 32 px RGB noise images: enough for a few training steps of a small model."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("noise_images")
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root

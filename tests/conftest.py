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

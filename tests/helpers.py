"""Helpers shared by the parity tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinokit.reference.core import CaseContext, unchecked_outputs


def reference_cases(folder: Path, kind: str) -> list[dict]:
    """The manifest cases of one kind; skips the test when the folder has none."""
    cases = [c for c in json.loads((folder / "manifest.json").read_text())["cases"] if c["kind"] == kind]
    if not cases:
        pytest.skip(f"no '{kind}' case in {folder}")
    return cases


def assert_case_passes(ctx: CaseContext) -> None:
    """Every comparison of a run case is within tolerance and every output was compared."""
    bad = [c for c in ctx.comparisons if not c.ok]
    assert not bad, bad
    assert unchecked_outputs(ctx) == []

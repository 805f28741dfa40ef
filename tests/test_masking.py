"""MaskingGenerator: parity with the official reference draws, plus behaviour checks."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_case_passes, reference_cases

from dinokit.data.masking import MaskingGenerator, official_max_num_patches
from dinokit.reference.core import load_case, unchecked_outputs
from dinokit.reference.kinds_data_schedules import RUNNERS


def test_reference_maskingreference_cases(reference_dir: Path) -> None:
    for case in reference_cases(reference_dir, "masking"):
        ctx = load_case(reference_dir, case)
        RUNNERS["masking"](ctx)
        assert_case_passes(ctx)
        # The shared set is regenerated draw for draw, so the histograms are compared exactly
        # (max error 0), not only statistically.
        assert all(c.max_abs_err == 0.0 for c in ctx.comparisons)


def test_statistical_fallback_with_other_seed(reference_dir: Path) -> None:
    """Another seed: first draws differ, statistics still agree within Monte-Carlo noise."""
    case = copy.deepcopy(reference_cases(reference_dir, "masking")[0])
    for cfg in case["configs"]:
        cfg["python_random_seed"] += 1000
    ctx = load_case(reference_dir, case)
    RUNNERS["masking"](ctx)
    by_name = {c.name: c for c in ctx.comparisons}
    for cfg in case["configs"]:
        p = f"cfg{cfg['index']}."
        assert not by_name[p + "exact_first_draws"].ok
        for name in ("count_hist", "mean_mask", "position_counts"):
            assert by_name[p + name].ok, by_name[p + name]
    assert unchecked_outputs(ctx) == []


def test_statistical_check_catches_wrong_aspect(reference_dir: Path) -> None:
    """Nearly square rectangles only: the mean mask no longer matches the reference."""
    case = copy.deepcopy(reference_cases(reference_dir, "masking")[0])
    for cfg in case["configs"]:
        cfg["python_random_seed"] += 1000
        cfg["ctor"]["min_aspect"] = 0.95
    ctx = load_case(reference_dir, case)
    RUNNERS["masking"](ctx)
    assert any(not c.ok for c in ctx.comparisons if c.name.endswith(("count_hist", "mean_mask")))


@pytest.mark.parametrize("target", [0, 1, 3, 10, 50, 128, 200])
def test_count_never_exceeds_target(target: int) -> None:
    gen = MaskingGenerator((14, 14), max_num_patches=official_max_num_patches(196, 14))  # 98.0
    rng = random.Random(target)
    for _ in range(200):
        mask = gen(target, rng=rng)
        assert mask.dtype == np.bool_ and mask.shape == (14, 14)
        assert mask.sum() <= target
    assert gen(0, rng=rng).sum() == 0


def test_rectangle_cap_respected() -> None:
    """One rectangle never adds more than max_num_patches new patches."""
    gen = MaskingGenerator((16, 16), max_num_patches=6)
    rng = random.Random(0)
    for _ in range(100):
        mask = np.zeros((16, 16), dtype=bool)
        added = gen._add_rectangle(mask, min(100, gen.max_num_patches), rng)
        assert 0 <= added <= 6 and mask.sum() == added


def test_dedicated_stream_is_reproducible_and_leaves_global_state() -> None:
    random.seed(123)
    state = random.getstate()
    a = np.stack([MaskingGenerator(12, max_num_patches=40, rng=random.Random(7))(50) for _ in range(3)])
    gen = MaskingGenerator(12, max_num_patches=40, rng=random.Random(7))
    b = gen(50)
    assert random.getstate() == state  # global stream untouched
    assert np.array_equal(a[0], b) and np.array_equal(a[0], a[1])
    # Same seed on the global stream gives the same masks (Random(s) == random.seed(s)).
    random.seed(7)
    assert np.array_equal(MaskingGenerator(12, max_num_patches=40)(50), b)


def test_official_max_num_patches_quirk() -> None:
    assert official_max_num_patches(224, 14) == 128.0
    assert official_max_num_patches(224, 16) == 98.0
    assert official_max_num_patches(518, 14) == 666.0  # naive half grid would be 684.5
    assert official_max_num_patches(98, 14) == 21.0
    assert isinstance(official_max_num_patches(224, 14), float)


def test_official_max_num_patches_matches_manifest(reference_dir: Path) -> None:
    for case in reference_cases(reference_dir, "masking"):
        for key, value in case.get("max_num_patches_quirk", {}).get("values", {}).items():
            img, patch = (int(x) for x in key.split("/"))
            assert official_max_num_patches(img, patch) == value


def test_generator_pickles_for_spawned_workers() -> None:
    import pickle
    import random as _random

    from dinokit.data.masking import MaskingGenerator

    gen = pickle.loads(pickle.dumps(MaskingGenerator((8, 8), max_num_patches=32)))
    _random.seed(5)
    a = gen(20)
    _random.seed(5)
    assert (a == MaskingGenerator((8, 8), max_num_patches=32)(20)).all()

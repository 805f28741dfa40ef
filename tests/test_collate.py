"""collate_data_and_cast: parity with the official reference, plus behaviour checks."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from dinokit.data.collate import collate_data_and_cast
from dinokit.data.masking import MaskingGenerator
from dinokit.reference.core import load_case, unchecked_outputs
from dinokit.reference.kinds_data_schedules import RUNNERS, parse_mask_generator


def _cases(folder: Path) -> list[dict]:
    cases = [c for c in json.loads((folder / "manifest.json").read_text())["cases"] if c["kind"] == "collate"]
    if not cases:
        pytest.skip(f"no collate case in {folder}")
    return cases


def _samples(n_images: int, n_global: int = 2, n_local: int = 3, g: int = 4, l: int = 2) -> list:
    return [
        (
            {
                "global_crops": [torch.full((3, g, g), float(i * 10 + k)) for k in range(n_global)],
                "local_crops": [torch.full((3, l, l), float(100 + i * 10 + k)) for k in range(n_local)],
            },
            (),
        )
        for i in range(n_images)
    ]


def test_reference_collate_cases(reference_dir: Path) -> None:
    for case in _cases(reference_dir):
        ctx = load_case(reference_dir, case)
        RUNNERS["collate"](ctx)
        bad = [c for c in ctx.comparisons if not c.ok]
        assert not bad, bad
        assert unchecked_outputs(ctx) == []
        # Compared bit for bit (the stats too: same Python-random consumption as the official code).
        assert all(c.max_abs_err == 0.0 for c in ctx.comparisons)
        assert "stats.mask_counts_per_image" in ctx.compared


def test_reference_collate_from_shapes_only(reference_dir: Path) -> None:
    """Without a parseable example description, sizes come from the output shapes."""
    case = copy.deepcopy(_cases(reference_dir)[0])
    case["example_input"] = {}
    ctx = load_case(reference_dir, case)
    RUNNERS["collate"](ctx)
    assert all(c.ok for c in ctx.comparisons), [c for c in ctx.comparisons if not c.ok]


def test_parse_mask_generator_is_literal_only() -> None:
    gen = parse_mask_generator("MaskingGenerator(input_size=(8,8), max_num_patches=32.0)")
    assert gen.get_shape() == (8, 8) and gen.max_num_patches == 32.0
    with pytest.raises(Exception):
        parse_mask_generator("MaskingGenerator(input_size=__import__('os').getcwd())")
    with pytest.raises(Exception):
        parse_mask_generator("os.system('true')")


def test_crop_major_order_and_dtype() -> None:
    gen = MaskingGenerator((4, 4), max_num_patches=8.0)
    out = collate_data_and_cast(_samples(3), (0.1, 0.5), 0.5, torch.bfloat16, 16, gen, random.Random(0))
    g = out["collated_global_crops"]
    loc = out["collated_local_crops"]
    assert g.dtype == torch.bfloat16 and g.shape == (6, 3, 4, 4)
    assert loc.shape == (9, 3, 2, 2)
    # crop 0 of images 0,1,2 then crop 1 of images 0,1,2
    assert g[:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert loc[:, 0, 0, 0].tolist() == [100, 110, 120, 101, 111, 121, 102, 112, 122]


def test_mask_outputs_consistent() -> None:
    gen = MaskingGenerator((8, 8), max_num_patches=32.0)
    rng = random.Random(5)
    for _ in range(20):
        out = collate_data_and_cast(_samples(4), (0.1, 0.5), 0.5, torch.float32, 64, gen, rng)
        masks = out["collated_masks"]
        assert masks.dtype == torch.bool and masks.shape == (8, 64)
        m = int(masks.sum())
        assert out["n_masked_patches"].tolist() == [m] and out["n_masked_patches"].dtype == torch.int64
        assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
        # every masked crop's weights sum to 1
        per_crop = masks.sum(-1)
        assert torch.allclose(out["masks_weight"].sum(), (per_crop > 0).sum().float())
        assert (masks.any(-1).sum()) <= int(8 * 0.5)
        assert m <= out["upperbound"] == 12 + 19 + 25 + 32


def test_dedicated_stream_matches_global_stream_and_leaves_it_alone() -> None:
    gen = MaskingGenerator((8, 8), max_num_patches=32.0)
    random.seed(99)
    state = random.getstate()
    a = collate_data_and_cast(_samples(4), (0.1, 0.5), 0.5, torch.float16, 64, gen, random.Random(11))
    assert random.getstate() == state
    random.seed(11)
    b = collate_data_and_cast(_samples(4), (0.1, 0.5), 0.5, torch.float16, 64, gen)
    assert torch.equal(a["collated_masks"], b["collated_masks"])


def test_no_masking_probability_zero() -> None:
    gen = MaskingGenerator((8, 8), max_num_patches=32.0)
    out = collate_data_and_cast(_samples(2), (0.1, 0.5), 0.0, torch.float32, None, gen, random.Random(0))
    assert out["collated_masks"].shape == (4, 64) and not out["collated_masks"].any()
    assert out["n_masked_patches"].tolist() == [0] and out["upperbound"] == 0


def test_stats_statistical_fallback(reference_dir: Path) -> None:
    """If the stats seed is unknown, the per-call counts are still compared (statistically)."""
    case = copy.deepcopy(_cases(reference_dir)[0])
    if "stats.mask_counts_per_image" not in case["tensors"]:
        pytest.skip("no stats tensor")
    case["tensors"]["stats.mask_counts_per_image"]["semantics"] = "per-image mask counts"
    ctx = load_case(reference_dir, case)
    RUNNERS["collate"](ctx)
    stat = [c for c in ctx.comparisons if c.name == "stats.mask_counts_per_image"]
    assert stat and stat[0].ok, stat


def test_collate_without_local_crops() -> None:
    import random as _random

    import torch

    from dinokit.data.collate import collate_data_and_cast
    from dinokit.data.masking import MaskingGenerator

    samples = [({"global_crops": [torch.zeros(3, 8, 8)] * 2, "local_crops": []}, 0) for _ in range(2)]
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=4,
                                mask_generator=MaskingGenerator((2, 2), max_num_patches=2),
                                random_state=_random.Random(0))
    assert out["collated_global_crops"].shape == (4, 3, 8, 8)
    assert out["collated_local_crops"].numel() == 0

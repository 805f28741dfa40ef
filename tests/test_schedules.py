"""DINOv2 schedules: parity with the official reference (float64, 1e-12) and endpoint behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dinokit.reference.core import load_case, unchecked_outputs
from dinokit.reference.kinds_data_schedules import RUNNERS
from dinokit.train.schedules import CosineScheduler, build_schedules, scaled_lr


def test_reference_schedules_cases(reference_dir: Path) -> None:
    cases = [c for c in json.loads((reference_dir / "manifest.json").read_text())["cases"] if c["kind"] == "schedules"]
    if not cases:
        pytest.skip("no schedules case")
    for case in cases:
        ctx = load_case(reference_dir, case)
        RUNNERS["schedules"](ctx)
        bad = [c for c in ctx.comparisons if not c.ok]
        assert not bad, bad
        assert unchecked_outputs(ctx) == []


def _default(**over):
    kw = dict(
        epochs=10, epoch_length=10, lr=1e-3, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04,
        weight_decay_end=0.4, momentum_teacher=0.992, final_momentum_teacher=1.0, teacher_temp=0.07,
        warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3, freeze_last_layer_epochs=1,
    )
    kw.update(over)
    return build_schedules(**kw)


def test_endpoints() -> None:
    s = _default()
    assert s.lr[0] == 0.0  # warmup starts at start_warmup_value
    assert s.lr[19] == 1e-3  # linspace endpoint included: last warmup step is the peak
    assert s.lr[20] == pytest.approx(1e-3, abs=1e-18)  # cosine starts at base (cos 0 = 1)
    assert 1e-6 < s.lr[99] < 1e-3 and s.lr[100] == 1e-6 and s.lr[10**6] == 1e-6
    # cosine start = final + 0.5*(base-final)*2, equal to base up to float64 rounding
    assert s.wd[0] == pytest.approx(0.04, abs=1e-15) and s.wd[100] == 0.4
    assert s.momentum[0] == pytest.approx(0.992, abs=1e-15) and s.momentum[100] == 1.0
    assert s.teacher_temp[0] == 0.04 and s.teacher_temp[29] == pytest.approx(0.07, abs=1e-15)
    assert s.teacher_temp[30] == 0.07 and s.teacher_temp[500] == 0.07
    # last layer: zeros during the first epoch, then exactly the lr schedule
    assert all(s.last_layer_lr[i] == 0.0 for i in range(10))
    assert all(s.last_layer_lr[i] == s.lr[i] for i in range(10, 101))
    assert s.at(50)["wd"] == s.wd[50]


def test_monotone_cosine_and_warmup() -> None:
    s = _default()
    lr = np.array([s.lr[i] for i in range(100)])
    assert np.all(np.diff(lr[:20]) > 0) and np.all(np.diff(lr[20:]) < 0)
    wd = s.wd.schedule
    assert np.all(np.diff(wd) > 0) and wd.dtype == np.float64 and len(wd) == 100


def test_freeze_iters_and_formula() -> None:
    sch = CosineScheduler(1.0, 0.1, total_iters=20, warmup_iters=5, start_warmup_value=0.5, freeze_iters=3)
    assert len(sch) == 20
    assert list(sch.schedule[:3]) == [0.0, 0.0, 0.0]
    assert sch[3] == 0.5 and sch[7] == 1.0
    n = 12
    for i in range(n):
        assert sch[8 + i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / n)), abs=1e-15)
    assert sch[20] == 0.1
    with pytest.raises(ValueError):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)


def test_scaled_lr() -> None:
    assert scaled_lr(0.004, 64) == 0.004 * 0.25
    assert scaled_lr(0.004, 1024) == 0.004
    assert scaled_lr(0.0005, 512, "linear_wrt_256") == 0.001
    with pytest.raises(ValueError):
        scaled_lr(0.1, 8, "cubic")  # type: ignore[arg-type]

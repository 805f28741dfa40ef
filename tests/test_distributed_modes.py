"""Starting from weights, the resolution switch and distillation on 2 CPU processes (gloo): each
equals the one-process run at the same global batch (KoLeo off, as in tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from dinokit.config import load_config
from dinokit.train.loop import train
from tests.test_distributed import _assert_close, _overrides, _run_2_ranks, _terms, image_folder  # noqa: F401

STEPS = "train.max_steps=4"


@pytest.fixture(scope="module")
def runs(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("modes")
    base = root / "base"
    train(load_config("tiny", _overrides(image_folder, "train.max_steps=2")), base)
    modes = {
        "warmup": [f"init.backbone={base}", "init.heads=false", "train.head_warmup_steps=2",
                   "train.backbone_lr_warmup_steps=1"],
        "highres": ["highres.start_step=2", "highres.global_size=56", "highres.local_size=28"],
        "distill": [f"distill.teacher={base}"],
    }
    jobs = []
    out: dict[str, Path] = {}
    for name, extra in modes.items():
        out[name] = root / f"{name}_1"
        train(load_config("tiny", _overrides(image_folder, STEPS, *extra)), out[name])
        out[f"{name}_ddp"] = root / f"{name}_ddp"
        jobs.append((_overrides(image_folder, STEPS, "train.distributed.strategy=ddp", *extra), out[f"{name}_ddp"]))
    out["distill_fsdp"] = root / "distill_fsdp"
    jobs.append((_overrides(image_folder, STEPS, "train.distributed.strategy=fsdp", *modes["distill"]),
                 out["distill_fsdp"]))
    _run_2_ranks(jobs)
    return out


@pytest.mark.parametrize("run", ["warmup_ddp", "highres_ddp", "distill_ddp", "distill_fsdp"])
def test_two_ranks_match_one_process(runs: dict[str, Path], run: str) -> None:
    single = runs[run.rsplit("_", 1)[0]]
    _assert_close(_terms(runs[run]), _terms(single))


def test_two_rank_distillation_exports_the_students_ema(runs: dict[str, Path]) -> None:
    one = load_file(str(runs["distill"] / "students" / "student0" / "teacher_backbone.safetensors"))
    two = load_file(str(runs["distill_fsdp"] / "students" / "student0" / "teacher_backbone.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() < 1e-4, key

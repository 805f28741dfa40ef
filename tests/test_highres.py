"""The high-resolution phase: a switch of crop sizes and batch size late in a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dinokit.checkpoint.resolve import resolve_backbone
from dinokit.cli import main
from dinokit.config import ConfigError, load_config, schedule_args
from dinokit.train.loop import train
from dinokit.train.metrics import read_metrics
from dinokit.train.schedules import build_schedules
from tests.test_train import SMALL, image_folder  # noqa: F401  (fixture)

PHASE = ["highres.start_step=3", "highres.global_size=56", "highres.local_size=28", "highres.batch_size=4",
         "checkpoint.every=100"]


def _cfg(folder: Path, *extra: str):
    return load_config("tiny", [f"data.path={folder}", *SMALL, *PHASE, *extra])


def test_the_switch_resizes_positions_once_and_the_schedules_continue(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    cfg = _cfg(image_folder, "train.max_steps=6")
    train(cfg, run)
    records = read_metrics(run)
    schedules = build_schedules(**schedule_args(cfg))
    assert [r["lr"] for r in records] == [schedules.at(i)["lr"] for i in range(6)]
    exported = load_file(str(run / "teacher_backbone.safetensors"))
    assert exported["pos_embed"].shape == (1, 1 + 4 * 4, 32)  # 56 px / 14 px patches
    state = torch.load(run / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    moments = [s["exp_avg_sq"] for s in state["optimizer"]["state"].values() if s["exp_avg_sq"].shape == (1, 17, 32)]
    assert moments and all((m >= 0).all() for m in moments), "AdamW's moments of the positions follow the resize"
    resolved = resolve_backbone(run)
    assert resolved.image_size == 56
    assert resolved.model.pos_grid == 4


def test_resume_before_at_and_after_the_switch_is_exact(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_cfg(image_folder, "train.max_steps=6"), straight)
    for stop in (2, 3, 5, 6):  # before, at (the checkpoint predates the switch), inside the phase, the end
        train(_cfg(image_folder, f"train.max_steps={stop}"), resumed)
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(straight)]
    a = load_file(str(straight / "teacher_backbone.safetensors"))
    b = load_file(str(resumed / "teacher_backbone.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_phase_of_its_own_from_weights(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    base = tmp_path / "base"
    train(load_config("tiny", [f"data.path={image_folder}", *SMALL, "train.max_steps=2"]), base)
    run = tmp_path / "hr"
    train(_cfg(image_folder, f"init.backbone={base}", "highres.start_step=0", "train.max_steps=2"), run)
    assert load_file(str(run / "teacher_backbone.safetensors"))["pos_embed"].shape[1] == 17


def test_a_phase_that_never_starts_fails_before_any_work(image_folder: Path, tmp_path: Path,  # noqa: F811
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "never"
    assert main(["train", str(image_folder), "--out", str(run), *SMALL, "highres.start_step=20",
                 "highres.global_size=56"]) == 2
    assert "highres.start_step (20)" in capsys.readouterr().err
    assert not run.exists()
    with pytest.raises(ConfigError, match="highres.global_size"):
        _cfg(image_folder, "highres.global_size=50")
    with pytest.raises(ConfigError, match="change nothing"):
        load_config("tiny", ["highres.start_step=10"])

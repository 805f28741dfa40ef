"""Starting from weights, the resolution switch and distillation on 2 CPU processes (gloo): each
equals the one-process run at the same global batch (KoLeo off, as in tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dinokit.checkpoint.sources import read_weights
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
    out["plain_1"] = root / "plain_1"
    train(load_config("tiny", _overrides(image_folder, STEPS)), out["plain_1"])
    out["plain_fsdp"] = root / "plain_fsdp"
    jobs.append((_overrides(image_folder, STEPS, "train.distributed.strategy=fsdp"), out["plain_fsdp"]))
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


def test_heads_are_read_from_a_sharded_checkpoint(runs: dict[str, Path]) -> None:
    """`--init` / `distill --teacher` of an FSDP run folder read its heads out of the DCP shards."""
    sharded, single = read_weights(runs["plain_fsdp"]), read_weights(runs["plain_1"])
    assert list(sharded.heads) == ["dino_head"]
    for key, value in single.heads["dino_head"].items():
        torch.testing.assert_close(sharded.heads["dino_head"][key], value, rtol=1e-4, atol=1e-6)

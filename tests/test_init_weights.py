"""`dinokit train --init`: weights into student and teacher, heads, the head warm-up, bad sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dinokit.checkpoint import CheckpointError
from dinokit.cli import main
from dinokit.config import ConfigError, load_config
from dinokit.models.vision_transformer import resize_pos_embed
from dinokit.train.init_weights import backbone_lr_scale, load_initial_weights
from dinokit.train.loop import build_model, train
from dinokit.train.metrics import read_metrics
from tests.test_train import SMALL, image_folder  # noqa: F401  (fixture)


def _cfg(folder: Path, *extra: str):
    return load_config("tiny", [f"data.path={folder}", *SMALL, *extra])


@pytest.fixture(scope="module")
def base_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    run = tmp_path_factory.mktemp("base") / "run"
    train(_cfg(image_folder, "train.max_steps=4"), run)
    return run


def _teacher_heads(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    return {k[len("dino_head."):]: v for k, v in state["teacher"].items() if k.startswith("dino_head.")}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_loads_the_backbone_into_student_and_teacher_and_the_run_heads(image_folder: Path, base_run: Path) -> None:  # noqa: F811
    source = load_file(str(base_run / "teacher_backbone.safetensors"))
    model = build_model(_cfg(image_folder, f"init.backbone={base_run}"))
    loaded = load_initial_weights(model.networks(), _cfg(image_folder, f"init.backbone={base_run}").init)
    assert loaded == ["backbone", "dino_head"]
    for net in (model.student, model.teacher):
        assert _equal(net["backbone"].state_dict(), source)
        assert _equal(net["dino_head"].state_dict(), _teacher_heads(base_run))

    fresh = build_model(_cfg(image_folder))
    cfg = _cfg(image_folder, f"init.backbone={base_run}", "init.heads=false")
    assert load_initial_weights(fresh.networks(), cfg.init) == ["backbone"]
    assert not _equal(fresh.student["dino_head"].state_dict(), _teacher_heads(base_run))


def test_head_warmup_freezes_the_backbone_then_ramps_its_lr(image_folder: Path, base_run: Path, tmp_path: Path) -> None:  # noqa: F811
    source = load_file(str(base_run / "teacher_backbone.safetensors"))
    run = tmp_path / "warm"
    args = [f"init.backbone={base_run}", "init.heads=false", "train.head_warmup_steps=3",
            "train.backbone_lr_warmup_steps=2", "checkpoint.every=100"]
    train(_cfg(image_folder, *args, "train.max_steps=3"), run)
    state = torch.load(run / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    student = {k[len("backbone."):]: v for k, v in state["student"].items() if k.startswith("backbone.")}
    teacher = {k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    assert _equal(student, source), "the backbone moved during the head warm-up"
    assert _equal(teacher, source), "the teacher's backbone must stay the student's during the warm-up"
    heads = {k: v for k, v in state["student"].items() if k.startswith("dino_head.mlp")}
    fresh = build_model(_cfg(image_folder)).student["dino_head"].state_dict()
    assert any(not torch.equal(v, fresh[k[len("dino_head."):]]) for k, v in heads.items()), "the heads did not train"

    train(_cfg(image_folder, *args, "train.max_steps=6"), run)  # resume: the backbone joins in
    after = load_file(str(run / "teacher_backbone.safetensors"))
    assert not _equal(after, source)
    assert [r["backbone_lr_scale"] for r in read_metrics(run)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]


def test_resume_inside_the_head_warmup_is_exact(image_folder: Path, base_run: Path, tmp_path: Path) -> None:  # noqa: F811
    args = [f"init.backbone={base_run}", "init.heads=false", "train.head_warmup_steps=3", "checkpoint.every=100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_cfg(image_folder, *args, "train.max_steps=5"), straight)
    train(_cfg(image_folder, *args, "train.max_steps=2"), resumed)
    train(_cfg(image_folder, *args, "train.max_steps=5"), resumed)
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(straight)]
    assert _equal(load_file(str(resumed / "teacher_backbone.safetensors")),
                  load_file(str(straight / "teacher_backbone.safetensors")))


def test_official_training_checkpoint_layout_loads_backbone_and_heads(image_folder: Path, base_run: Path,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    """Chunked blocks under `backbone.`, heads beside them, inside model/teacher (the official layout)."""
    state = torch.load(base_run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)

    def official(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in part.items():
            if key.startswith("backbone.blocks."):
                i = key.split(".")[2]
                key = key.replace(f"backbone.blocks.{i}.", f"backbone.blocks.0.{i}.", 1)
            out[key] = value
        return out

    path = tmp_path / "training_checkpoint.pth"
    torch.save({"model": {"teacher": official(state["teacher"]), "student": official(state["student"])},
                "iteration": 4}, path)
    cfg = _cfg(image_folder, f"init.backbone={path}")
    model = build_model(cfg)
    assert load_initial_weights(model.networks(), cfg.init) == ["backbone", "dino_head"]
    assert _equal(model.teacher["dino_head"].state_dict(), _teacher_heads(base_run))
    assert _equal(model.student["backbone"].state_dict(), load_file(str(base_run / "teacher_backbone.safetensors")))


def test_a_backbone_made_for_another_size_gets_its_positions_resized(image_folder: Path, base_run: Path,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    big = build_model(_cfg(image_folder, "model.img_size=56")).student["backbone"].state_dict()
    path = tmp_path / "backbone_56px.safetensors"
    save_file({k: v.contiguous() for k, v in big.items()}, str(path))
    cfg = _cfg(image_folder, f"init.backbone={path}")
    model = build_model(cfg)
    assert load_initial_weights(model.networks(), cfg.init) == ["backbone"]
    pos = model.student["backbone"].pos_embed
    assert pos.shape == (1, 1 + 2 * 2, 32)
    torch.testing.assert_close(pos.detach(), resize_pos_embed(big["pos_embed"], 2), atol=0, rtol=0)


def test_weights_that_do_not_fit_fail_before_any_work_naming_keys(image_folder: Path, base_run: Path, tmp_path: Path,  # noqa: F811
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "misfit"
    code = main(["train", str(image_folder), "--out", str(run), "--init", str(base_run), *SMALL, "model.depth=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "blocks.2." in err and str(base_run) in err
    assert not run.exists(), "nothing may be written for a run that cannot start"
    assert main(["train", str(image_folder), "--out", str(run), "--init", str(tmp_path / "nope.pth"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "init.backbone" in err and "nope.pth" in err
    with pytest.raises(CheckpointError, match="does not fit"):
        cfg = _cfg(image_folder, f"init.backbone={base_run}", "head.hidden_dim=48")
        load_initial_weights(build_model(cfg).networks(), cfg.init)


def test_head_warmup_needs_weights() -> None:
    with pytest.raises(ConfigError, match="train.head_warmup_steps needs init.backbone"):
        load_config("tiny", ["train.head_warmup_steps=10"])


def test_backbone_lr_scale_ramps_after_the_warmup() -> None:
    assert [backbone_lr_scale(s, 2, 4) for s in range(7)] == [0, 0, 0.25, 0.5, 0.75, 1, 1]
    assert [backbone_lr_scale(s, 0, 0) for s in range(2)] == [1, 1]


def test_finetune_preset_loads_an_official_hub_layout(tmp_path: Path) -> None:
    """The released dinov2_vits14 file's keys (hub layout, 37 x 37 grid) fit `finetune_vits14`."""
    from dinokit.models import build_official

    hub = build_official("dinov2_vits14").state_dict()
    torch.save(hub, tmp_path / "dinov2_vits14_pretrain.pth")
    cfg = load_config("finetune_vits14", [f"init.backbone={tmp_path / 'dinov2_vits14_pretrain.pth'}"])
    model = build_model(cfg)
    assert load_initial_weights(model.networks(), cfg.init) == ["backbone"]
    assert _equal(model.teacher["backbone"].state_dict(), hub)
    assert cfg.train.head_warmup_steps > 0 and cfg.train.backbone_lr_warmup_steps > 0

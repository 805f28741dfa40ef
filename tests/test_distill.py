"""`dinokit distill`: a frozen teacher, independent students with spare EMAs, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dinokit.checkpoint import CheckpointError
from dinokit.checkpoint.resolve import resolve_backbone
from dinokit.cli import main
from dinokit.config import ConfigError, schedule_args
from dinokit.train.distill import DistillModel, build_distill_model
from dinokit.train.loop import train_step
from dinokit.train.metrics import read_metrics
from dinokit.train.optim import build_optimizer
from dinokit.train.schedules import build_schedules
from tests.test_init_weights import _cfg
from tests.test_init_weights import base_run as teacher_run  # noqa: F401  (fixture)
from tests.test_train import SMALL, image_folder  # noqa: F401  (fixture)


def _distill_cfg(folder: Path, teacher: Path, students: list[str], *extra: str):
    return _cfg(folder, f"distill.teacher={teacher}", f"distill.students={json.dumps(students)}", *extra)


def _batches(cfg, n: int):
    from dinokit.train.loop import build_dataset, build_loader

    loader = build_loader(cfg, build_dataset(cfg), 0)
    return [next(loader) for _ in range(n)]


def _run_steps(model: DistillModel, cfg, batches) -> None:
    optimizer = build_optimizer(model.trainable(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    schedules = build_schedules(**schedule_args(cfg))
    model.train()
    for i, batch in enumerate(batches):
        train_step(model, optimizer, batch, schedules.at(i + 20), cfg, torch.device("cpu"))


def test_teacher_never_changes_and_students_are_independent(image_folder: Path, teacher_run: Path) -> None:  # noqa: F811
    both = _distill_cfg(image_folder, teacher_run, ["depth=1", "embed_dim=16,num_heads=2"])
    alone = _distill_cfg(image_folder, teacher_run, ["depth=1"])
    batches = _batches(both, 3)

    torch.manual_seed(0)
    model = build_distill_model(both, None)
    before = {k: v.clone() for k, v in model.frozen_teacher.state_dict().items()}
    _run_steps(model, both, batches)
    after = model.frozen_teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen teacher changed"
    assert all(p.grad is None and not p.requires_grad for p in model.frozen_teacher.parameters())
    assert not any(k.startswith("frozen_teacher") for k in model.state_dict()), "the teacher must not be checkpointed"

    torch.manual_seed(0)
    single = build_distill_model(alone, None)
    _run_steps(single, alone, batches)
    a = model.students["student0"].state_dict()
    b = single.students["student0"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "a second student changed the first one's training"
    fresh = build_distill_model(alone, None).students["student0"].student.state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in single.students["student0"].student.state_dict().items())


def test_students_get_the_recipe_of_the_paper(image_folder: Path, teacher_run: Path) -> None:  # noqa: F811
    cfg = _distill_cfg(image_folder, teacher_run, ["depth=1"], "model.drop_path_rate=0.2")
    model = build_distill_model(cfg, None)
    student = model.students["student0"]
    assert not student.loss_args.mask_student  # whole crops, iBOT on every global patch
    assert all(block.sample_drop_ratio == 0 for block in student.student["backbone"].blocks)
    batch = _batches(cfg, 1)[0]
    rows = model._all_patches(batch)
    n = (cfg.crops.global_size // cfg.model.patch_size) ** 2
    assert rows["collated_masks"].all() and rows["mask_indices_list"].numel() == batch["collated_global_crops"].shape[0] * n


def test_distill_run_exports_each_spare_ema_and_resumes_exactly(image_folder: Path, teacher_run: Path, tmp_path: Path) -> None:  # noqa: F811
    args = ["--teacher", str(teacher_run), "--student", "depth=1", "--student", "", *SMALL, "checkpoint.every=100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["distill", str(image_folder), "--out", str(straight), *args, "train.max_steps=4"]) == 0
    assert main(["distill", str(image_folder), "--out", str(resumed), *args, "train.max_steps=2"]) == 0
    assert main(["distill", str(image_folder), "--out", str(resumed), *args, "train.max_steps=4"]) == 0
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(straight)]
    assert {"student0/dino_global", "student1/ibot", "student1/koleo"} <= set(read_metrics(straight)[-1])

    state = torch.load(straight / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    for name, depth in (("student0", 1), ("student1", 2)):
        exported = load_file(str(straight / "students" / name / "teacher_backbone.safetensors"))
        ema = {k[len(f"{name}.teacher.backbone."):]: v for k, v in state["students"].items()
               if k.startswith(f"{name}.teacher.backbone.")}
        assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
        again = load_file(str(resumed / "students" / name / "teacher_backbone.safetensors"))
        assert all(torch.equal(exported[k], again[k]) for k in exported)
        backbone = resolve_backbone(straight / "students" / name)  # a run folder of its own
        assert backbone.model.n_blocks == depth
    with pytest.raises(CheckpointError, match="distillation run"):
        resolve_backbone(straight)


def test_a_teacher_without_heads_gets_them_warmed_up_first(image_folder: Path, teacher_run: Path, tmp_path: Path) -> None:  # noqa: F811
    first = tmp_path / "first"
    common = [*SMALL, "checkpoint.every=100", "train.max_steps=2"]
    assert main(["distill", str(image_folder), "--teacher", str(teacher_run), "--out", str(first), *common]) == 0
    backbone_only = first / "students" / "student0"  # config.yaml + backbone, no heads
    run = tmp_path / "second"
    assert main(["distill", str(image_folder), "--teacher", str(backbone_only), "--student", "depth=1", "--out", str(run),
                 *common, "distill.teacher_head_warmup_steps=3"]) == 0
    heads_run = run / "teacher_heads"
    assert len(read_metrics(heads_run)) == 3
    source = load_file(str(backbone_only / "teacher_backbone.safetensors"))
    warmed = load_file(str(heads_run / "teacher_backbone.safetensors"))
    assert all(torch.equal(source[k], warmed[k]) for k in source), "the teacher's backbone moved while its heads trained"
    assert len(read_metrics(run)) == 2


def test_bad_distillation_input_fails_before_any_work(image_folder: Path, teacher_run: Path, tmp_path: Path,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "never"
    assert main(["distill", str(image_folder), "--teacher", str(tmp_path / "missing"), "--out", str(run), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "distill.teacher" in err and "missing" in err
    assert main(["distill", str(image_folder), "--teacher", str(teacher_run), "--student", "dpth=3", "--out", str(run),
                 *SMALL]) == 2
    assert "model.dpth" in capsys.readouterr().err
    assert main(["distill", str(image_folder), "--teacher", str(teacher_run), "--student", "patch_size=7",
                 "--out", str(run), *SMALL]) == 2
    assert "patch size" in capsys.readouterr().err
    assert not run.exists()
    with pytest.raises(ConfigError, match="distill.students needs distill.teacher"):
        _cfg(image_folder, 'distill.students=["depth=1"]')
    with pytest.raises(ConfigError, match="teacher_arch"):
        from dinokit.train.distill import teacher_model_config

        teacher_model_config(_cfg(image_folder, f"distill.teacher={teacher_run / 'teacher_backbone.safetensors'}"))


def test_the_readme_flow_from_a_released_hub_file(image_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    """Only `dinov2_vits14_pretrain.pth` (hub layout, no heads): continued pretraining with the
    finetune preset, then distillation of the result into a smaller ViT (both shortened)."""
    from dinokit.models import build_official

    hub = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(build_official("dinov2_vits14").state_dict(), hub)
    small = ["crops.global_size=28", "crops.local_size=14", "crops.local_number=2", "optim.batch_size=4",
             "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "data.num_workers=0",
             "optim.epoch_length=4", "train.autocast=none", "checkpoint.every=100"]
    ft = tmp_path / "ft"
    assert main(["train", str(image_folder), "--preset", "finetune_vits14", "--init", str(hub), "--out", str(ft),
                 *small, "train.head_warmup_steps=1", "train.backbone_lr_warmup_steps=1", "train.max_steps=2"]) == 0
    assert resolve_backbone(ft).model.pos_grid == 37  # still the released architecture
    out = tmp_path / "distilled"
    assert main(["distill", str(image_folder), "--teacher", str(ft), "--preset", "distill_vits14", "--student",
                 "vit_tiny,depth=2", "--out", str(out), *small, "train.max_steps=1"]) == 0
    student = resolve_backbone(out / "students" / "student0").model
    assert (student.embed_dim, student.n_blocks, student.patch_size) == (192, 2, 14)
    # The hub file itself as the teacher: its heads are trained first.
    direct = tmp_path / "direct"
    assert main(["distill", str(image_folder), "--teacher", str(hub), "--preset", "distill_vits14", "--student",
                 "vit_tiny,depth=1", "--out", str(direct), *small, "train.max_steps=1",
                 "distill.teacher_head_warmup_steps=1"]) == 0
    assert (direct / "teacher_heads" / "teacher_backbone.safetensors").is_file()


def test_a_bfloat16_teacher_gives_float32_targets(image_folder: Path, teacher_run: Path) -> None:  # noqa: F811
    cfg = _distill_cfg(image_folder, teacher_run, ["depth=1"], "distill.teacher_dtype=bfloat16")
    model = build_distill_model(cfg, None)
    assert all(p.dtype == torch.bfloat16 for p in model.frozen_teacher.parameters())
    assert all(p.dtype == torch.float32 for p in model.students.parameters())
    terms, targets = model(_batches(cfg, 1)[0], 0.04)
    assert targets["dino"].dtype == torch.float32 and targets["ibot"].dtype == torch.float32
    assert torch.isfinite(terms["total"])

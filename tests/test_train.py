"""`dinokit train`: end-to-end runs on generated images, exact resume, bad input and NaN handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dinokit.checkpoint import load_backbone
from dinokit.checkpoint.training import checkpoint_dirs, checkpoint_step, latest_checkpoint
from dinokit.cli import main
from dinokit.config import load_config, vit_args_from_config
from dinokit.train.loop import NonFiniteLossError, train
from dinokit.train.metrics import read_metrics

# A very small but complete DINOv2 configuration: every loss term, masks, local crops.
SMALL = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
    "crops.local_number=2", "optim.batch_size=8", "optim.epoch_length=10", "optim.epochs=2",
    "data.num_workers=0", "checkpoint.every=2",
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("circles", "squares"):
        (root / label).mkdir()
        for i in range(12):
            img = np.full((32, 32, 3), rng.integers(0, 80), np.uint8)
            c = rng.integers(8, 24, size=2)
            yy, xx = np.mgrid[0:32, 0:32]
            shape = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 36 if label == "circles" else (
                (abs(yy - c[0]) < 6) & (abs(xx - c[1]) < 6))
            img[shape] = rng.integers(120, 255, size=3)
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


def _cfg(folder: Path, *extra: str):
    return load_config("tiny", [f"data.path={folder}", *SMALL, *extra])


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


def test_train_writes_metrics_checkpoints_and_a_loadable_teacher(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(_cfg(image_folder, "train.max_steps=4"), run)
    assert result.steps_done == 4
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "dino_local", "dino_global", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp",
                "images_per_s", "skipped_images", "teacher_entropy", "prototypes_used", "feature_std"):
        assert key in records[-1] and records[-1][key] is not None, key
    assert all(np.isfinite(r["loss"]) for r in records)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002", "step_00000004"]
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    cfg = _cfg(image_folder)
    backbone = vit_args_from_config(cfg.model).build()
    load_backbone(backbone, run / "teacher_backbone.safetensors")
    state = torch.load(run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    torch.testing.assert_close(backbone.state_dict(), {k[len("backbone."):]: v for k, v in state["teacher"].items()
                                                       if k.startswith("backbone.")}, atol=0, rtol=0)


def test_stop_and_resume_equals_uninterrupted_run_bitwise(image_folder: Path, tmp_path: Path) -> None:
    # The per-image crop path (the tiny preset crops in batches; tests/test_batch_augment.py
    # resumes that one).
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    per_image = "crops.batched=false"
    train(_cfg(image_folder, "train.max_steps=6", "checkpoint.every=100", per_image), straight)
    train(_cfg(image_folder, "train.max_steps=3", "checkpoint.every=100", per_image), resumed)
    assert len(read_metrics(resumed)) == 3
    train(_cfg(image_folder, "train.max_steps=6", "checkpoint.every=100", per_image), resumed)
    assert _losses(resumed) == _losses(straight)
    a = load_file(str(straight / "teacher_backbone.safetensors"))
    b = load_file(str(resumed / "teacher_backbone.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_process_kill_between_checkpoints(image_folder: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--preset", "tiny", *SMALL, "checkpoint.every=3"]
    train(_cfg(image_folder, "train.max_steps=15", "checkpoint.every=3"), straight)
    cmd = [sys.executable, "-m", "dinokit.cli", "train", str(image_folder), "--out", str(killed), *args, "train.max_steps=40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    last = checkpoint_dirs(killed)[-1].name
    # Killed after about 5 steps: the last complete checkpoint is before the final step.
    assert last in ("step_00000003", "step_00000006", "step_00000009", "step_00000012"), last
    assert main(["train", str(image_folder), "--out", str(killed), *args, "train.max_steps=15"]) == 0
    assert _losses(killed) == _losses(straight)


def test_bad_config_fails_before_any_work(image_folder: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "never"
    assert main(["train", str(image_folder), "--out", str(run), "optim.lr_typo=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr_typo" in err
    assert main(["train", str(image_folder), "--out", str(run), "crops.global_size=30"]) == 2
    assert "crops.global_size" in capsys.readouterr().err
    assert not run.exists()


def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_resume_with_another_configuration_is_refused(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(image_folder, "train.max_steps=2"), run)
    with pytest.raises(ValueError, match="optim.base_lr"):
        train(_cfg(image_folder, "train.max_steps=4", "optim.base_lr=0.1"), run)


def test_corrupt_images_are_skipped_and_counted(image_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    (folder / "a").mkdir(parents=True)
    for i, src in enumerate(sorted((image_folder / "circles").glob("*.png"))[:10]):
        (folder / "a" / f"{i}.png").write_bytes(src.read_bytes())
    (folder / "a" / "broken.png").write_bytes(b"not an image at all")
    (folder / "a" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning):
        train(_cfg(folder, "train.max_steps=4", "optim.batch_size=6"), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    # 24 samples drawn from 12 files of which 2 are bad: some were skipped, and counted.
    assert 0 < records[-1]["skipped_images"] < 24
    assert all(np.isfinite(r["loss"]) for r in records)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dinokit.train import ssl_model

    original = ssl_model.SSLModel.losses
    calls = {"n": 0}

    def poisoned(self, batch, student, targets):
        terms = original(self, batch, student, targets)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["ibot"] = terms["ibot"] * float("nan")
            terms["total"] = sum(v for k, v in terms.items() if k != "total")
        return terms

    monkeypatch.setattr(ssl_model.SSLModel, "losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss term 'ibot' is nan at step 3"):
        train(_cfg(image_folder, "train.max_steps=6"), run)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    assert len(read_metrics(run)) == 2
    state = json.loads(json.dumps(read_metrics(run)[-1]))
    assert state["step"] == 2


def test_dino_v1_mode_trains_without_ibot_and_koleo(image_folder: Path, tmp_path: Path) -> None:
    cfg = load_config("dino_vits16", [
        f"data.path={image_folder}", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "model.patch_size=4", "model.img_size=32", "crops.global_size=32", "crops.local_size=16",
        "crops.local_number=2", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "optim.batch_size=8", "optim.epoch_length=10", "optim.epochs=2", "data.num_workers=0",
        "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1", "train.max_steps=2",
        "train.autocast=none",
    ])
    train(cfg, tmp_path / "run")
    record = read_metrics(tmp_path / "run")[-1]
    assert "ibot" not in record and "koleo" not in record and np.isfinite(record["loss"])
    state = load_file(str(tmp_path / "run" / "teacher_backbone.safetensors"))
    assert "mask_token" not in state


def test_bf16_autocast_runs_on_cpu(image_folder: Path, tmp_path: Path) -> None:
    train(_cfg(image_folder, "train.max_steps=2", "train.autocast=bf16"), tmp_path / "run")
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


def test_online_knn_is_logged_and_leaves_training_unchanged(image_folder: Path, tmp_path: Path) -> None:
    plain, with_knn = tmp_path / "plain", tmp_path / "knn"
    train(_cfg(image_folder, "train.max_steps=4"), plain)
    train(_cfg(image_folder, "train.max_steps=4", "eval.knn_every=2", f"eval.knn_val={image_folder}",
               "eval.knn_train_size=16", "eval.knn_val_size=8", "eval.knn_k=5"), with_knn)
    records = read_metrics(with_knn)
    assert [("knn_top1" in r) for r in records] == [False, True, False, True]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in records if "knn_top1" in r)
    assert _losses(with_knn) == _losses(plain)


def test_online_knn_without_labels_fails_before_training(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8)).save(flat / f"{i}.png")
    with pytest.raises(ValueError, match="eval.knn_train"):
        train(_cfg(flat, "eval.knn_every=2", f"eval.knn_val={flat}"), tmp_path / "run")


def test_a_skipped_last_step_still_writes_the_final_checkpoint_and_teacher(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When every image of the last batch fails to decode, the run still ends with its final
    checkpoint and exported teacher (it used to skip both and report success)."""
    from dinokit.train import loop

    real = loop.build_loader

    def last_batch_undecodable(*args, **kwargs):
        batches = real(*args, **kwargs)
        for i, batch in enumerate(batches):
            yield {"n_skipped": 6, "n_images": 0} if i == 2 else batch

    monkeypatch.setattr(loop, "build_loader", last_batch_undecodable)
    run = tmp_path / "run"
    result = train(_cfg(image_folder, "train.max_steps=3", "checkpoint.every=100"), run)
    assert result.steps_done == 3 and result.skipped_images == 6
    assert latest_checkpoint(run) is not None and checkpoint_step(latest_checkpoint(run)) == 3
    assert (run / "teacher_backbone.safetensors").is_file()

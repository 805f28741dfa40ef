"""`dinokit quickstart` end to end on generated labeled images (a few steps), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.config import load_config
from dinokit.quickstart import (
    _in_effect,
    compiled_batch_options,
    cpu_speed_options,
    quickstart_config,
    quickstart_speed_options,
)

SMALL = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "head.out_dim=64", "head.hidden_dim=32",
    "head.bottleneck_dim=16", "crops.local_number=2", "optim.batch_size=8", "optim.epoch_length=10",
    "optim.epochs=2", "data.num_workers=0",
]


def _labeled_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label, value in (("dark", 30), ("bright", 220)):
        (root / label).mkdir(parents=True)
        for i in range(10):
            img = np.clip(rng.normal(value, 20, size=(28, 28, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


def test_quickstart_on_an_image_folder_writes_the_report(tmp_path: Path, capsys) -> None:
    data = _labeled_folder(tmp_path / "data")
    out = tmp_path / "qs"
    assert main(["quickstart", "--data", str(data), "--out", str(out), "--steps", "2", "--no-speedups", *SMALL]) == 0
    report = (out / "report.md").read_text()
    for row in ("dinokit pretrained (teacher)", "same architecture, random init", "raw pixels"):
        assert f"| {row} |" in report
    for picture in ("curves.png", "pca.png", "attention_0.png"):
        assert (out / picture).is_file() and f"]({picture})" in report
    results = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in results["evaluations"]][2] == "raw pixels"
    # Bright vs dark images: raw pixels separate them perfectly on the held-out 20 %.
    assert results["evaluations"][2]["knn"]["10"]["top1"] == 100.0
    assert results["evaluations"][0]["n_test"] == 4 and results["steps"] == 2
    assert results["machine"]["cpu"] and results["machine"]["cores"] >= 1 and results["machine"]["torch"]
    assert results["wall_seconds"] >= results["train_seconds"] > 0 and results["preset"] == "tiny"
    assert 0 < results["first_step_seconds"] <= results["train_seconds"] + 0.05  # train_seconds is rounded to 0.1
    assert 0 < results["eval_seconds"] and results["train_seconds"] + results["eval_seconds"] <= results["wall_seconds"] + 0.1
    assert "- first step:" not in report  # only stated where the step is compiled
    assert results["speed_options"] == [] and "- speed options for this machine: none (--no-speedups)" in report


def test_speed_options_follow_the_machine(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    amx = {"isa": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]}
    options, why = cpu_speed_options(amx, compiler="g++")
    assert options == ["train.compile=step", "crops.batched_on=device", "data.num_workers=0", "train.autocast=bf16"]
    assert "AMX" in why and "g++" in why
    options, why = cpu_speed_options({"isa": ["avx2"]}, compiler="clang++")  # e.g. AMD without AMX
    assert "train.autocast=bf16" not in options and "train.compile=step" in options
    assert cpu_speed_options(amx, compiler="") == ([], "none (no C++ compiler for torch.compile: eager float32)")
    # each option is a valid override of the preset, and the user's overrides still win
    cfg = quickstart_config("/data", False, None, "tiny", ["train.autocast=none"], speed=tuple(cpu_speed_options(amx, "g++")[0]))
    assert cfg.train.compile == "step" and cfg.crops.batched_on == "device" and cfg.train.autocast == "none"
    # results.json lists only the options that no later override replaced
    assert _in_effect(options, ["train.autocast=none", "data.num_workers = 2"]) == [
        "train.compile=step", "crops.batched_on=device"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_speed_options(amx, compiler="g++")[0] == []


def test_compiled_batch_keeps_the_images_of_the_preset() -> None:
    tiny = load_config("tiny", [])
    options, why = compiled_batch_options(tiny, ["train.seed=1"])
    assert options == ["optim.batch_size=256", "optim.epoch_length=75", "teacher.momentum_teacher=0.8145"]
    assert "1500 steps" in why and "0.95 -> 0.8145" in why
    cfg = load_config("tiny", options)
    images = lambda o: o.batch_size * o.epoch_length * o.epochs  # noqa: E731
    assert images(cfg.optim) == images(tiny.optim) == 384_000 and cfg.optim.epochs == tiny.optim.epochs
    # the user's batch, epoch length or momentum wins whole; a preset already at 256 or not divisible is kept
    for user in ("optim.batch_size=32", "optim.epoch_length = 10", "teacher.momentum_teacher=0.9"):
        assert compiled_batch_options(tiny, [user]) == ([], "")
    assert compiled_batch_options(load_config("tiny", ["optim.batch_size=256"]), []) == ([], "")
    assert compiled_batch_options(load_config("tiny", ["optim.epoch_length=301"]), []) == ([], "")


def test_quickstart_batches_only_with_the_compiled_step(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny, amx = load_config("tiny", []), {"isa": ["amx_bf16"]}
    options, why = quickstart_speed_options(tiny, [], amx, compiler="g++")
    assert options[-3:] == compiled_batch_options(tiny, [])[0] and "batches of 256" in why and "AMX" in why
    options, why = quickstart_speed_options(tiny, ["train.compile=none"], amx, compiler="g++")
    assert "optim.batch_size=256" not in options and "batches" not in why
    assert quickstart_speed_options(tiny, [], amx, compiler="")[0] == []  # eager: the preset's batch


def test_quickstart_without_fashion_mnist_says_how_to_get_it(tmp_path: Path, capsys) -> None:
    assert main(["quickstart", "--fashion-mnist-root", str(tmp_path / "none"), "--out", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "--data" in err

"""What runs where, and a training step that never waits on the host: device and backend choice
fail loudly, TF32 is set on CUDA only, every start is recorded, and host reads happen only when
the loop logs."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from dinokit.config import ConfigError, load_config
from dinokit.distributed.env import choose_backend, resolve_device
from dinokit.train.compute import configure_float32_math
from dinokit.train.loop import train
from dinokit.train.metrics import read_metrics

SMALL = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
    "crops.local_number=2", "optim.batch_size=8", "optim.epoch_length=10", "optim.epochs=3",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def images(noise_images: Path) -> Path:
    return noise_images


def _cfg(folder: Path, *extra: str):
    return load_config("tiny", [f"data.path={folder}", *SMALL, *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_is_an_error_naming_why() -> None:
    with pytest.raises(ConfigError, match=r"train.device='cuda', but CUDA is not available: this PyTorch"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="train.device='cuda:1'"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")  # auto is allowed to choose the CPU
    with pytest.raises(ConfigError, match="train.distributed.backend='nccl' needs CUDA devices"):
        choose_backend(torch.device("cpu"), "nccl")
    assert choose_backend(torch.device("cpu")) == "gloo"
    assert choose_backend(torch.device("cuda", 0)) == "nccl"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_train_with_cuda_requested_fails_before_any_work(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(_cfg(images, "train.device=cuda", "train.max_steps=1"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_tf32_is_set_for_cuda_only() -> None:
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        configure_float32_math(torch.device("cpu"), True)
        assert torch.get_float32_matmul_precision() == "highest"
        configure_float32_math(torch.device("cuda", 0), True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        configure_float32_math(torch.device("cuda", 0), False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_every_start_of_a_run_is_recorded(images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(images, "train.max_steps=2", "checkpoint.every=2"), run)
    train(_cfg(images, "train.max_steps=3", "checkpoint.every=2"), run)
    launches = [json.loads(line) for line in (run / "launches.jsonl").read_text().splitlines()]
    assert [r["start_step"] for r in launches] == [0, 2]
    first = launches[0]
    assert first["device"] == "cpu" and first["world_size"] == 1 and first["backend"] == "none"
    assert first["batch_per_rank"] == first["global_batch"] == 8
    assert first["autocast"] == "none" and first["tf32"] is False and first["pin_memory"] is False
    assert first["torch"] == torch.__version__


# ------------------------------------------------------------------ host syncs

# Tensor methods that read a value back to the host: on a GPU each one waits for the device.
SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts host reads made by dinokit's own training code (the loader's host-side work in
    dinokit.data and PyTorch's internals are not counted), by caller function."""
    counts: Counter[str] = Counter()
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = name) -> Any:
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            if module.startswith("dinokit.") and not module.startswith("dinokit.data"):
                counts[f"{module}.{frame.f_code.co_name}: {_name}"] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    yield counts


def test_the_training_step_reads_nothing_back(images: Path, host_reads: Counter[str]) -> None:
    from dinokit.train.loop import build_loader, build_model, build_dataset, train_step
    from dinokit.train.optim import build_optimizer
    from dinokit.train.schedules import build_schedules
    from dinokit.config import schedule_args

    cfg = _cfg(images)
    model = build_model(cfg)
    optimizer = build_optimizer(model.trainable(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    schedules = build_schedules(**schedule_args(cfg))
    batches = build_loader(cfg, build_dataset(cfg), 0)
    batch = next(batches)
    host_reads.clear()
    for i in range(3):
        terms, _ = train_step(model, optimizer, batch, schedules.at(i), cfg, torch.device("cpu"))
    assert not host_reads, dict(host_reads)
    assert torch.isfinite(terms["total"])


def test_the_loop_reads_back_only_when_it_logs(images: Path, tmp_path: Path, host_reads: Counter[str]) -> None:
    """Host reads grow with the number of logged flushes, not with the number of steps: a run of
    6 steps and one of 12, each logged once, read back the same; logging every step reads more
    (so the counter does see the loop's reads)."""
    def reads(name: str, *overrides: str) -> int:
        host_reads.clear()
        train(_cfg(images, *overrides), tmp_path / name)
        return sum(host_reads.values())

    six = reads("six", "train.max_steps=6", "train.log_every=6", "checkpoint.every=6")
    twelve = reads("twelve", "train.max_steps=12", "train.log_every=12", "checkpoint.every=12")
    every = reads("every", "train.max_steps=6", "train.log_every=1", "checkpoint.every=6")
    assert six == twelve, (six, twelve)
    assert every > six
    # Buffered or not, every step has its line, with the health signals of the step.
    lines = read_metrics(tmp_path / "twelve")
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert all({"loss", "ibot", "teacher_entropy", "prototypes_used", "feature_std"} <= r.keys() for r in lines)
    assert [r["loss"] for r in read_metrics(tmp_path / "six")] == [r["loss"] for r in lines[:6]]


def test_loader_shared_memory_is_bounded_and_checked(tmp_path: Path) -> None:
    from dinokit.data.loader import check_shared_memory, shared_memory_per_worker

    # vits14 crops (2 x 224 + 8 x 98), 128 images per GPU, float32, 2 batches in flight.
    per_worker = shared_memory_per_worker(128, 224, 98, 8)
    assert per_worker == 2 * 128 * 3 * (2 * 224**2 + 8 * 98**2) * 4  # about 519 MiB
    assert check_shared_memory(0, per_worker, str(tmp_path)) is None  # no workers: nothing shared
    assert check_shared_memory(1, 1024, str(tmp_path)) is None
    warning = check_shared_memory(10, 2**62, str(tmp_path))
    assert warning is not None and "10 loader worker(s)" in warning and "--shm-size" in warning


def test_batched_crops_made_on_the_device_equal_the_loaders(images: Path, tmp_path: Path) -> None:
    """`crops.batched_on=device`: uint8 sources cross the loader, the crops are made by the
    training process with the loader's parameters; on the CPU the run is the same bit for bit."""
    from dinokit.data.loader import shared_memory_per_worker, shared_memory_per_worker_sources

    common = ("train.max_steps=4", "crops.batched=true", "data.num_workers=1", "checkpoint.every=4")
    train(_cfg(images, *common), tmp_path / "loader")
    train(_cfg(images, *common, "crops.batched_on=device"), tmp_path / "device")
    a, b = read_metrics(tmp_path / "loader"), read_metrics(tmp_path / "device")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 4
    launch = json.loads((tmp_path / "device" / "launches.jsonl").read_text().splitlines()[0])
    assert launch["crops"] == "batched on the device"
    # A quarter of the bytes or less: uint8 sources instead of float32 crops.
    assert shared_memory_per_worker_sources(64, 28) * 4 <= shared_memory_per_worker(64, 28, 14, 2)
    with pytest.raises(ConfigError, match="accumulation_steps > 1 is not supported with crops.batched_on=device"):
        _cfg(images, "crops.batched=true", "crops.batched_on=device", "optim.accumulation_steps=2")


def test_feature_extraction_feeds_a_gpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from dinokit.eval import embed

    monkeypatch.setattr(embed.os, "cpu_count", lambda: 16)
    assert embed.default_num_workers("cuda") == 8 and embed.default_num_workers("cuda:1") == 8
    assert embed.default_num_workers("cpu") == 0  # the model uses the cores
    monkeypatch.setattr(embed.os, "cpu_count", lambda: 4)
    assert embed.default_num_workers("cuda") == 3

"""Distributed training on 2 CPU processes (gloo): DDP and FSDP2 equal one process at the same global
batch, DCP checkpoints resume on another world size (2 -> 1, 1 -> 2) and bit for bit on the same one.

One `torch.multiprocessing` spawn runs every 2-rank job in sequence (process start-up dominates the
cost); the 1-process runs happen in the test process. KoLeo is off in the runs compared across world
sizes: it is per-rank by design (the official semantics, see docs/distributed.md), so its value
depends on how the global batch is split.
"""

from __future__ import annotations

import datetime
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dinokit.checkpoint.training import checkpoint_dirs
from dinokit.config import ConfigError, load_config, validate
from dinokit.data.loader import make_train_loader
from dinokit.data.masking import MaskingGenerator
from dinokit.data.transforms import MultiCropAugmentation
from dinokit.train.loop import train
from dinokit.train.metrics import read_metrics

# A tiny but complete DINOv2 step: DINO (Sinkhorn-Knopp) + iBOT with masks, local crops.
SMALL = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
    "crops.local_number=2", "optim.batch_size=8", "optim.epoch_length=10", "optim.epochs=2",
    "data.num_workers=0", "checkpoint.every=2", "train.log_every=100", "loss.koleo_weight=0",
]
STEPS = 4
KOLEO_ON = ("loss.koleo_weight=0.1", "train.max_steps=1", "train.distributed.strategy=ddp")
TERMS = ("loss", "dino_local", "dino_global", "ibot")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(folder: Path, *extra: str) -> list[str]:
    return [f"data.path={folder}", *SMALL, *extra]


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[list[str], str]]) -> None:
    """One rank: start a gloo group, run each (overrides, run folder) training job in order."""
    torch.set_num_threads(1)
    # A short timeout: a rank stuck in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for overrides, run_dir in jobs:
            train(load_config("tiny", overrides), Path(run_dir))
    finally:
        dist.destroy_process_group()


def _run_2_ranks(jobs: list[tuple[list[str], Path]]) -> None:
    # fork, as PyTorch's own MultiProcessTestCase: the children start with torch already imported
    # (spawn re-imports it in every child, ~20 s on a busy 2-core machine).
    mp.start_processes(_worker, args=(2, _free_port(), [(o, str(r)) for o, r in jobs]), nprocs=2, join=True,
                       start_method="fork")


def _rewind(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` whose checkpoints after `step` are gone: resuming it continues from `step`."""
    shutil.copytree(run, to)
    for ckpt in checkpoint_dirs(to):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    return to


def _terms(run: Path) -> dict[str, list[float]]:
    records = read_metrics(run)
    return {t: [r[t] for r in records] for t in TERMS}


def _assert_close(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    for t in TERMS:
        np.testing.assert_allclose(a[t], b[t], rtol=1e-5, atol=0, err_msg=t)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        img = np.full((32, 32, 3), rng.integers(0, 80), np.uint8)
        y, x = rng.integers(4, 20, size=2)
        img[y : y + 10, x : x + 10] = rng.integers(120, 255, size=3)
        Image.fromarray(img).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def runs(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every run the tests compare, made once: 1-process runs here, 2-rank runs in one spawn."""
    root = tmp_path_factory.mktemp("runs")
    r = {name: root / name for name in ("single", "ddp", "fsdp")}
    train(load_config("tiny", _overrides(image_folder, f"train.max_steps={STEPS}")), r["single"])
    r["1to2"] = _rewind(r["single"], root / "1to2", 2)
    r["fsdp_resumed"] = root / "fsdp_resumed"
    r["koleo"] = root / "koleo"
    r["ddp_accum"], r["fsdp_accum"] = root / "ddp_accum", root / "fsdp_accum"
    steps = f"train.max_steps={STEPS}"
    _run_2_ranks([
        (_overrides(image_folder, steps, "train.distributed.strategy=ddp"), r["ddp"]),
        (_overrides(image_folder, steps, "train.distributed.strategy=fsdp"), r["fsdp"]),
        # 1 -> 2: the single-process checkpoint of step 2 continued by 2 FSDP ranks.
        (_overrides(image_folder, steps, "train.distributed.strategy=fsdp"), r["1to2"]),
        # 2 -> 2: the FSDP run stopped at step 2 and resumed, as two invocations.
        (_overrides(image_folder, "train.max_steps=2", "train.distributed.strategy=fsdp"), r["fsdp_resumed"]),
        (_overrides(image_folder, steps, "train.distributed.strategy=fsdp"), r["fsdp_resumed"]),
        (_overrides(image_folder, *KOLEO_ON), r["koleo"]),
        # Gradient accumulation: 2 micro-batches of 2 images per rank (DDP without gradient
        # sync until the last one; FSDP reduce-scatters each).
        (_overrides(image_folder, steps, "train.distributed.strategy=ddp", "optim.accumulation_steps=2"),
         r["ddp_accum"]),
        (_overrides(image_folder, steps, "train.distributed.strategy=fsdp", "optim.accumulation_steps=2"),
         r["fsdp_accum"]),
    ])
    # 2 -> 1: the 2-rank FSDP checkpoint of step 2 continued by one process.
    r["2to1"] = _rewind(r["fsdp"], root / "2to1", 2)
    train(load_config("tiny", _overrides(image_folder, steps)), r["2to1"])
    return r


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "ddp_accum", "fsdp_accum"])
def test_two_ranks_match_one_process_at_the_same_global_batch(runs: dict[str, Path], strategy: str) -> None:
    single, multi = _terms(runs["single"]), _terms(runs[strategy])
    assert len(multi["loss"]) == STEPS and np.all(np.isfinite(multi["loss"]))
    _assert_close(multi, single)
    # The iBOT term is nonzero: the masks of the global batch were cut between the ranks.
    assert min(multi["ibot"]) > 0


def test_fsdp_checkpoint_is_sharded_dcp_and_exports_the_full_teacher(runs: dict[str, Path]) -> None:
    ckpt = checkpoint_dirs(runs["fsdp"])[-1]
    files = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "trainer.pt", "rng_rank0.pt", "rng_rank1.pt", "config.yaml"} <= files
    assert sum(name.endswith(".distcp") for name in files) == 2
    assert not any(p.name.startswith(".tmp") for p in (runs["fsdp"] / "checkpoints").iterdir())
    from safetensors.torch import load_file

    multi = load_file(str(runs["fsdp"] / "teacher_backbone.safetensors"))
    single = load_file(str(runs["single"] / "teacher_backbone.safetensors"))
    assert multi.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(multi[k], single[k], rtol=1e-4, atol=1e-6)


def test_two_rank_checkpoint_resumes_on_one_process(runs: dict[str, Path]) -> None:
    resumed = _terms(runs["2to1"])
    assert [r["step"] for r in read_metrics(runs["2to1"])] == list(range(1, STEPS + 1))
    _assert_close(resumed, _terms(runs["single"]))


def test_one_process_checkpoint_resumes_on_two_ranks(runs: dict[str, Path]) -> None:
    assert (checkpoint_dirs(runs["1to2"])[0] / "state.pt").is_file()  # written by one process
    _assert_close(_terms(runs["1to2"]), _terms(runs["single"]))


def test_two_rank_resume_on_two_ranks_is_bitwise(runs: dict[str, Path]) -> None:
    assert _terms(runs["fsdp_resumed"]) == _terms(runs["fsdp"])


def test_koleo_is_per_rank(runs: dict[str, Path], image_folder: Path) -> None:
    """The documented difference: each rank's KoLeo looks for neighbours in its own images only.

    At step 1 both runs have the same weights and the same global batch, so the 2-rank KoLeo term
    is the mean over ranks of KoLeo on that rank's rows (images r, r + 2, ...) of the one-process
    student's global [CLS] tokens, which is not the KoLeo of the whole batch.
    """
    from dinokit.data.datasets import ImageFolderDataset
    from dinokit.losses import KoLeoLoss
    from dinokit.train.loop import build_loader, build_model

    cfg = load_config("tiny", _overrides(image_folder, *KOLEO_ON))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).train()
    batch = next(build_loader(cfg, ImageFolderDataset(str(image_folder)), 0))
    with torch.no_grad():
        views = model.student_outputs(batch)["global_cls"].chunk(2)  # (B, D) per global crop
    koleo = KoLeoLoss()
    per_rank = sum(sum(koleo(v[r::2]) for v in views) for r in range(2)) / 2 * cfg.loss.koleo_weight
    whole = sum(koleo(v) for v in views) * cfg.loss.koleo_weight
    logged = read_metrics(runs["koleo"])[0]["koleo"]
    assert logged == pytest.approx(float(per_rank), rel=1e-5)
    assert abs(float(whole) - logged) > 1e-3


# ----------------------------------------------------------------------------- no processes needed


def test_rank_batches_together_are_the_one_process_batch(image_folder: Path) -> None:
    """Same images, crops and masks: rank r holds the global batch's images r, r + 2, ..."""
    from dinokit.data.datasets import ImageFolderDataset

    def batch(rank: int, world_size: int) -> dict[str, Any]:
        loader = make_train_loader(
            ImageFolderDataset(str(image_folder)), MultiCropAugmentation(28, 12, local_crops_number=2),
            batch_size=8 // world_size, num_workers=0, seed=3, start_index=8 // world_size,  # 2nd batch
            mask_generator=MaskingGenerator(7, max_num_patches=24), rank=rank, world_size=world_size,
        )
        return next(iter(loader))

    one, parts = batch(0, 1), [batch(r, 2) for r in range(2)]
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):  # 2 crops of each kind
        full = one[key].unflatten(0, (2, 8))  # crop-major: (crop, image, ...)
        for r, part in enumerate(parts):
            assert torch.equal(part[key].unflatten(0, (2, 4)), full[:, r::2]), key
    assert one["collated_masks"].any()
    assert sorted(torch.cat([p["positions"] for p in parts]).tolist()) == one["positions"].tolist()


def test_distributed_settings_are_checked_against_the_world_size(image_folder: Path) -> None:
    cfg = load_config("tiny", _overrides(image_folder, "train.distributed.strategy=none"))
    with pytest.raises(ConfigError, match="train.distributed.strategy"):
        validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="train.distributed.param_dtype"):
        load_config("tiny", _overrides(image_folder, "train.distributed.param_dtype=bfloat16"))
    with pytest.raises(ConfigError, match="divisible by the number of ranks"):
        validate(load_config("tiny", _overrides(image_folder, "optim.batch_size=9")), world_size=2)
    with pytest.raises(ConfigError, match="train.distributed.strategy"):
        load_config("tiny", _overrides(image_folder, "train.distributed.strategy=zero3"))

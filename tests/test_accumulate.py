"""Gradient accumulation: micro-batches of a rank's batch give the step of the whole batch."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from dinokit.config import ConfigError, load_config, schedule_args, validate
from dinokit.train.accumulate import split_batch
from dinokit.train.loop import build_dataset, build_loader, build_model, train, train_step
from dinokit.train.metrics import read_metrics
from dinokit.train.optim import build_optimizer
from dinokit.train.schedules import build_schedules

# No KoLeo (its neighbours are per micro-batch) and no stochastic depth (its draws differ).
EXACT = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path_rate=0",
    "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "loss.koleo_weight=0",
    "crops.local_number=2", "optim.batch_size=8", "optim.epoch_length=10", "optim.epochs=2",
    "data.num_workers=0", "loss.mask_probability=1.0",
]


@pytest.fixture(scope="module")
def images(noise_images: Path) -> Path:
    return noise_images


def _cfg(images: Path, *extra: str):
    return load_config("tiny", [f"data.path={images}", *EXACT, *extra])


def test_micro_batches_partition_the_batch(images: Path) -> None:
    cfg = _cfg(images)
    batch = next(build_loader(cfg, build_dataset(cfg), 0))
    n_tokens = batch["collated_masks"].shape[1]
    parts = split_batch(batch, 4)
    assert sum(p.batch["collated_global_crops"].shape[0] for p in parts) == 16
    assert sum(int(p.batch["n_masked_patches"]) for p in parts) == int(batch["n_masked_patches"]) > 0
    assert torch.equal(torch.cat([p.masked for p in parts]).sort().values, torch.arange(len(batch["mask_indices_list"])))
    for p in parts:
        rows = torch.cat([p.images, 8 + p.images])  # view-major crop rows of the whole batch
        assert torch.equal(p.batch["collated_global_crops"], batch["collated_global_crops"][rows])
        assert torch.equal(p.batch["collated_local_crops"][:2], batch["collated_local_crops"][p.images])
        # Each masked row of the micro-batch is the same crop and patch as its row of the batch.
        own = p.batch["mask_indices_list"]
        whole = batch["mask_indices_list"][p.masked]
        assert torch.equal(rows[own // n_tokens], whole // n_tokens)
        assert torch.equal(own % n_tokens, whole % n_tokens)
        assert torch.equal(p.batch["masks_weight"], batch["masks_weight"][p.masked])
    with pytest.raises(ValueError, match="does not split into 3"):
        split_batch(batch, 3)


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_accumulated_step_equals_the_whole_batch_step(images: Path, parts: int, centering: str) -> None:
    cfg = _cfg(images, f"loss.centering={centering}")
    batch = next(build_loader(cfg, build_dataset(cfg), 0))
    schedules = build_schedules(**schedule_args(cfg))
    torch.manual_seed(0)
    whole = build_model(cfg)
    split = copy.deepcopy(whole)
    results = []
    for model, micro in ((whole, None), (split, split_batch(batch, parts))):
        optimizer = build_optimizer(model.trainable(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        for step in range(2):
            terms, targets = train_step(model, optimizer, batch, schedules.at(step + 5), cfg, torch.device("cpu"),
                                        micro_batches=micro)
        results.append((terms, targets))
    (a, ta), (b, tb) = results
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tb["global_cls"], ta["global_cls"], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(split.dino_loss.center, whole.dino_loss.center)


def test_accumulation_must_divide_the_batch_per_rank(images: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim.batch_size \(8\) must be divisible by the number of ranks \(1\) "
                                          r"times optim.accumulation_steps \(3\)"):
        _cfg(images, "optim.accumulation_steps=3")
    with pytest.raises(ConfigError, match=r"\(2\) times optim.accumulation_steps \(4\)"):
        validate(_cfg(images, "optim.accumulation_steps=4", "optim.batch_size=4"), world_size=2)
    with pytest.raises(ConfigError, match="KoLeo .* needs >= 2 images per rank and micro-batch"):
        _cfg(images, "optim.accumulation_steps=8", "loss.koleo_weight=0.1")


def test_training_with_accumulation_follows_the_unsplit_run(images: Path, tmp_path: Path) -> None:
    train(_cfg(images, "train.max_steps=4"), tmp_path / "whole")
    train(_cfg(images, "train.max_steps=4", "optim.accumulation_steps=2"), tmp_path / "split")
    a = [r["loss"] for r in read_metrics(tmp_path / "whole")]
    b = [r["loss"] for r in read_metrics(tmp_path / "split")]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(b, a, rtol=1e-4)

"""DINO v1 ResNet-50: official key names, training with the DINO loss, BatchNorm handling."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet50

from dinokit.checkpoint.resolve import resolve_backbone
from dinokit.cli import main as cli_main
from dinokit.config import ConfigError, load_config, validate
from dinokit.distributed.parallelize import sync_batchnorm
from dinokit.models import build_official
from dinokit.models.resnet import ResNetBackbone
from dinokit.train.loop import build_model


def _torchvision_trunk() -> nn.Module:
    torch.manual_seed(0)
    net = resnet50()
    net.fc = nn.Identity()  # what the official DINO code does before training and saving
    for m in net.modules():  # non-trivial statistics, so that loading them is checked too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_official_resnet50_keys_load_exactly(tmp_path: Path) -> None:
    reference = _torchvision_trunk()
    ours = build_official("dino_resnet50")
    assert isinstance(ours, ResNetBackbone)
    expected = {k for k in resnet50().state_dict() if not k.startswith("fc.")}
    assert set(ours.state_dict()) == expected

    hub_file = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(reference.state_dict(), hub_file)  # the released file: a bare torchvision state dict
    loaded = resolve_backbone(hub_file, arch="dino_resnet50").model
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
        tokens = loaded.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert [t[0].shape for t in tokens] == [(2, 1024, 4, 4), (2, 2048, 2, 2)]
    assert torch.allclose(tokens[-1][1], reference(x), atol=1e-6)

    # A training checkpoint: teacher and student, DDP prefixes, the projection head beside the backbone.
    training = {"teacher": {**{f"module.backbone.{k}": v for k, v in reference.state_dict().items()},
                            "module.head.last_layer.weight": torch.zeros(3, 4)},
                "student": {}, "epoch": 3}
    torch.save(training, tmp_path / "checkpoint.pth")
    from_training = resolve_backbone(tmp_path / "checkpoint.pth", arch="dino_resnet50").model
    with torch.no_grad():
        assert torch.equal(from_training(x), reference(x))


def test_resnet_needs_the_dino_v1_loss() -> None:
    with pytest.raises(ConfigError, match="loss.mode=dino"):
        load_config("dino_resnet50", ["loss.mode=dinov2", "loss.ibot_weight=1.0"])
    with pytest.raises(ConfigError, match="compile=blocks"):
        load_config("dino_resnet50", ["train.compile=blocks"])
    validate(load_config("dino_resnet50", []))


def test_teacher_batchnorm_uses_batch_statistics_in_training() -> None:
    cfg = load_config("dino_resnet50", ["crops.global_size=32", "crops.local_size=16", "head.out_dim=64",
                                        "head.hidden_dim=32", "head.bottleneck_dim=16"])
    model = build_model(cfg).train()
    bns = [m for m in model.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    assert not model.teacher["dino_head"].training
    before = bns[0].running_mean.clone()
    model.teacher_targets({"collated_global_crops": torch.randn(4, 3, 32, 32)}, 0.04)
    assert not torch.equal(bns[0].running_mean, before)  # the exported teacher gets real statistics
    assert all(not m.training for m in model.eval().teacher.modules())


def test_sync_batchnorm_on_gpus_only(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config("dino_resnet50", ["head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16"])
    model = build_model(cfg)
    with caplog.at_level(logging.WARNING, logger="dinokit.train"):
        assert sync_batchnorm(model, "cpu") is False
    assert "SyncBatchNorm needs GPUs" in caplog.text
    assert sync_batchnorm(model, "cuda") is True  # conversion itself needs no GPU
    for net in model.networks():
        kinds = {type(m) for m in net["backbone"].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        assert kinds == {nn.SyncBatchNorm}
    vit = build_model(load_config("tiny", []))
    assert sync_batchnorm(vit, "cuda") is False


def test_train_resnet50_preset_and_resolve_its_run(noise_images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = ["crops.global_size=32", "crops.local_size=16", "crops.local_number=2", "optim.batch_size=4",
                 "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16", "train.max_steps=2",
                 "train.log_every=1", "data.num_workers=0", "train.autocast=none", "optim.epoch_length=2",
                 "train.device=cpu"]
    assert cli_main(["train", str(noise_images), "--preset", "dino_resnet50", "--out", str(run), *overrides]) == 0
    resolved = resolve_backbone(run)
    assert isinstance(resolved.model, ResNetBackbone) and resolved.image_size == 32
    import json
    import math

    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_dense_features_of_a_resnet_concatenate_its_last_stages() -> None:
    from dinokit.eval.dense import patch_grid

    model = build_official("dino_resnet50").eval()
    with torch.no_grad():
        grid = patch_grid(model, torch.randn(2, 3, 64, 64), layers=4, with_cls=True)
    assert grid.shape == (2, 2 * (256 + 512 + 1024 + 2048), 2, 2)

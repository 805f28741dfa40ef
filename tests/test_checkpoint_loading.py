"""Checkpoint loading: every official layout by key mapping, and clear errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dinokit.checkpoint import (
    CheckpointError,
    backbone_state_dict,
    head_state_dicts,
    load_backbone,
)
from dinokit.models import build_official, vit_args


def _small(name: str = "dinov2_vits14"):
    torch.manual_seed(0)
    return build_official(name, depth=3, img_size=28).eval()


def _chunked(sd: dict[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = f"blocks.{i // chunk_size}.{key[len('blocks.'):]}"
        out[key] = value
    return out


def _same_outputs(a, b) -> None:
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_hub_pth_loads(tmp_path: Path) -> None:
    src = _small()
    torch.save(src.state_dict(), tmp_path / "hub.pth")
    dst = load_backbone(_small(), tmp_path / "hub.pth")
    _same_outputs(src, dst)


def test_official_training_checkpoint_with_chunks_and_heads(tmp_path: Path) -> None:
    teacher, student = _small(), _small()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    model_sd = {}
    for role, net in (("teacher", teacher), ("student", student)):
        for k, v in _chunked(net.state_dict(), chunk_size=2).items():
            model_sd[f"{role}.backbone.{k}"] = v
        model_sd[f"{role}.dino_head.last_layer.weight_g"] = torch.ones(8, 1)
        model_sd[f"{role}.ibot_head.last_layer.weight_g"] = torch.ones(8, 1)
    torch.save({"model": model_sd, "iteration": 10}, tmp_path / "model_0000009.pth")
    _same_outputs(teacher, load_backbone(_small(), tmp_path / "model_0000009.pth"))
    _same_outputs(student, load_backbone(_small(), tmp_path / "model_0000009.pth", which="student"))
    heads = head_state_dicts(torch.load(tmp_path / "model_0000009.pth", weights_only=True))
    assert set(heads) == {"dino_head", "ibot_head"}


def test_nested_teacher_dict_with_wrappers(tmp_path: Path) -> None:
    src = _small()
    teacher = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    teacher["module.head.last_layer.weight_v"] = torch.ones(4, 4)
    torch.save({"teacher": teacher, "student": {}, "epoch": 3}, tmp_path / "checkpoint.pth")
    _same_outputs(src, load_backbone(_small(), tmp_path / "checkpoint.pth"))


def test_dino_v1_checkpoint(tmp_path: Path) -> None:
    src = build_official("dino_vits16", depth=2, img_size=32).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "dino.pth")
    dst = load_backbone(build_official("dino_vits16", depth=2, img_size=32).eval(), tmp_path / "dino.pth")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(src(x), dst(x), atol=0, rtol=0)


def test_safetensors_export_loads(tmp_path: Path) -> None:
    src = _small()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "b.safetensors"))
    _same_outputs(src, load_backbone(_small(), tmp_path / "b.safetensors"))


def test_mismatch_lists_missing_unexpected_and_shapes_in_one_message(tmp_path: Path) -> None:
    sd = _small().state_dict()
    del sd["norm.weight"]
    sd["extra.thing"] = torch.zeros(1)
    sd["pos_embed"] = torch.zeros(1, 10, 384)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_backbone(_small(), tmp_path / "bad.pth")
    msg = str(info.value)
    assert "bad.pth" in msg
    assert "1 missing keys: norm.weight" in msg
    assert "1 unexpected keys: extra.thing" in msg
    assert "pos_embed: checkpoint (1, 10, 384) vs model (1, 5, 384)" in msg


def test_wrong_architecture_is_reported_not_half_loaded(tmp_path: Path) -> None:
    torch.save(_small().state_dict(), tmp_path / "s.pth")
    target = vit_args("vit_base", depth=3, img_size=28, patch_size=14, init_values=1.0).build()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_backbone(target, tmp_path / "s.pth")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


class _Evil:
    def __reduce__(self):  # executing this on load would be arbitrary code execution
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_backbone(_small(), tmp_path / "evil.pth")


def test_missing_corrupt_and_non_dict_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(_small(), tmp_path / "nope.pth")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_backbone(_small(), tmp_path / "corrupt.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_backbone(_small(), tmp_path / "list.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        backbone_state_dict(torch.load(tmp_path / "empty.pth", weights_only=True))

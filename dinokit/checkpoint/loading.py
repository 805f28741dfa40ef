"""Loading DINO / DINOv2 checkpoints by key mapping, without executing code from the file.

Handled layouts (those of the official DINO / DINOv2 releases):
- official hub backbones (`dinov2_vits14_pretrain.pth`): plain backbone keys;
- official DINOv2 training checkpoints: `{"model": {"teacher": {"backbone.blocks.{c}.{i}...",
  "dino_head...", "ibot_head..."}, "student": {...}}}`, blocks chunked for FSDP;
- DINO v1 checkpoints: hub backbones, or training checkpoints with `teacher` / `student` dicts
  whose keys start with `module.backbone.` / `backbone.` and `head.`;
- dinokit's own safetensors exports;
- state dicts in Hugging Face transformers' or timm's DINOv2 names (renamed by
  `dinokit.export.hf` / `dinokit.export.timm`; their folders: `dinokit.checkpoint.foreign`).

`.pth` files are read with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from dinokit.export.hf import from_hf_state_dict, is_hf_state_dict
from dinokit.export.timm import from_timm_state_dict, is_timm_state_dict

# Wrappers that training frameworks add in front of parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Containers under which checkpoints keep their state dicts, most specific first.
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a `.safetensors` or `.pth`/`.pt` file into a (possibly nested) dict, code-free."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader error becomes one clear message
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def select_state_dict(ckpt: Mapping[str, Any], which: str = "teacher") -> dict[str, Tensor]:
    """Find the flat tensor dict inside a checkpoint.

    Args:
        ckpt: the object read from the file.
        which: "teacher" or "student" for training checkpoints holding both (the teacher is
            the model DINO and DINOv2 release).
    """
    obj: Any = ckpt
    for _ in range(4):
        if _is_state_dict(obj):
            return _select_flat(dict(obj), which)
        if not isinstance(obj, Mapping):
            break
        if which in obj and isinstance(obj[which], Mapping):
            obj = obj[which]
            continue
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            # Mixed dicts (tensors next to scalars such as `iteration`): keep the tensors.
            tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
            if tensors:
                return _select_flat(tensors, which)
            break
        obj = inner
    raise CheckpointError(
        f"no state dict found (top-level keys: {sorted(ckpt)[:10]}); expected tensors, "
        f"or 'teacher'/'student'/'model'/'state_dict' entries"
    )


def _select_flat(state_dict: dict[str, Tensor], which: str) -> dict[str, Tensor]:
    # DINOv2 training checkpoints flatten both models into one dict: "teacher.backbone....".
    prefix = which + "."
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def strip_wrappers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP / compile / FSDP / checkpoint-wrapper prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
                key = key.replace("." + prefix, ".")
        out[key] = value
    return out


def unchunk_blocks(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`blocks.{chunk}.{i}.rest` -> `blocks.{i}.rest` (FSDP block chunks of training checkpoints).

    Chunks are padded with parameter-free Identity modules, so the inner index is already the
    global block index and the chunk index can simply be dropped.
    """
    return {_CHUNKED_BLOCK.sub(r"blocks.\2.", k): v for k, v in state_dict.items()}


def split_components(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a model dict into `backbone`, `dino_head`, `ibot_head` and `head` parts.

    Keys without a known component prefix are taken as backbone keys (hub files).
    """
    parts: dict[str, dict[str, Tensor]] = {"backbone": {}, "dino_head": {}, "ibot_head": {}, "head": {}}
    for key, value in state_dict.items():
        first, _, rest = key.partition(".")
        if first in parts and rest:
            parts[first][rest] = value
        else:
            parts["backbone"][key] = value
    return parts


def backbone_state_dict(ckpt: Mapping[str, Any], which: str = "teacher") -> dict[str, Tensor]:
    """The backbone's weights in dinokit / hub key names, from any supported checkpoint layout
    (state dicts in transformers' or timm's names are renamed, see `dinokit.export`)."""
    flat = strip_wrappers(select_state_dict(ckpt, which))
    if is_hf_state_dict(flat):
        return from_hf_state_dict(flat)
    state = unchunk_blocks(split_components(flat)["backbone"])
    return from_timm_state_dict(state) if is_timm_state_dict(state) else state


def head_state_dicts(ckpt: Mapping[str, Any], which: str = "teacher") -> dict[str, dict[str, Tensor]]:
    """The projection heads of a training checkpoint (`dino_head`, `ibot_head`, DINO v1 `head`)."""
    parts = split_components(strip_wrappers(select_state_dict(ckpt, which)))
    return {k: v for k, v in parts.items() if k != "backbone" and v}


def with_mask_token(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` with a zero `mask_token` when `model` has one and the weights do not (timm
    files, DINO v1 weights into a DINOv2 architecture): zeros are DINOv2's initial value, and
    the token only enters masked-image training, never inference."""
    out = dict(state_dict)
    token = getattr(model, "mask_token", None)
    if isinstance(token, Tensor) and "mask_token" not in out and "cls_token" in out:
        out["mask_token"] = torch.zeros_like(token)
    return out


def describe_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]) -> str:
    """Missing keys, unexpected keys and shape mismatches, or "" if the dict fits exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            lines.append(f"{len(items)} {title}: {shown}")
    return "; ".join(lines)


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load that fails with one message naming every missing, unexpected or misshapen key."""
    problem = describe_mismatch(model, state_dict)
    if problem:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state_dict, strict=True)


def load_backbone(model: nn.Module, path: str | Path, which: str = "teacher") -> nn.Module:
    """Load backbone weights from a checkpoint file of any supported layout into `model`.

    Example:
        >>> from dinokit.models import build_official
        >>> model = build_official("dinov2_vits14")
        >>> load_backbone(model, "dinov2_vits14_pretrain.pth")  # doctest: +SKIP
    """
    ckpt = read_checkpoint(path)
    load_into(model, backbone_state_dict(ckpt, which), source=str(path))
    return model

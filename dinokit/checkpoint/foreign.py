"""Backbones saved by other libraries: a Hugging Face transformers DINOv2 folder, a timm folder.

A folder is recognised by its `config.json` (transformers' `model_type` `dinov2` /
`dinov2_with_registers`, or a timm `architecture` of the DINOv2 family); the architecture comes
from that file and the weights from `model.safetensors` (or the shards its index names, or a
`pytorch_model.bin` read with `weights_only=True`), renamed key by key to the official names.
Nothing in the folder is executed. Bare timm or transformers state-dict files are recognised by
their keys wherever a checkpoint file is accepted (`dinokit.checkpoint.loading.backbone_state_dict`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from dinokit.checkpoint.loading import CheckpointError, read_checkpoint
from dinokit.export import read_config_json
from dinokit.export.hf import from_hf_state_dict, is_hf_config, is_hf_folder, vit_args_from_hf_config
from dinokit.export.timm import from_timm_state_dict, is_timm_config, is_timm_folder, vit_args_from_timm_config
from dinokit.models.builders import ViTArgs

__all__ = ["ForeignBackbone", "foreign_architecture", "is_foreign_folder", "not_a_backbone_folder", "read_foreign_folder"]


@dataclass
class ForeignBackbone:
    """What a foreign folder holds: the architecture, official-name tensors, the library, the
    evaluation crop size its preprocessing states (None when it states none)."""

    args: ViTArgs
    state: dict[str, Tensor]
    library: str
    image_size: int | None


def is_foreign_folder(folder: Path) -> bool:
    return folder.is_dir() and (is_hf_folder(folder) or is_timm_folder(folder))


def not_a_backbone_folder(folder: Path) -> CheckpointError:
    """The error for a folder that is neither a dinokit run nor a known library's DINOv2 folder."""
    if (folder / "config.json").is_file():
        cfg = read_config_json(folder)
        if cfg is None:
            what = "no readable JSON object"
        else:
            what = f"model_type {cfg.get('model_type')!r}" if "model_type" in cfg else f"architecture {cfg.get('architecture')!r}"
        return CheckpointError(f"{folder}: config.json holds {what}, not a transformers DINOv2 "
                               "(dinov2, dinov2_with_registers) or timm DINOv2 model, and there is no config.yaml "
                               "of a dinokit run")
    return CheckpointError(f"{folder} is not a dinokit run folder (config.yaml is missing), "
                           "nor a transformers or timm folder (config.json is missing)")


def foreign_architecture(folder: Path) -> tuple[ViTArgs, str, dict]:
    """The architecture a transformers or timm folder's `config.json` states, the library, the config."""
    config_path = folder / "config.json"
    config = read_config_json(folder)
    try:
        if config is not None and is_hf_config(config):
            return vit_args_from_hf_config(config, str(config_path)), "transformers", config
        if config is not None and is_timm_config(config):
            return vit_args_from_timm_config(config, str(config_path)), "timm", config
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    raise not_a_backbone_folder(folder)


def read_foreign_folder(folder: Path) -> ForeignBackbone:
    """The backbone of a transformers or timm folder; CheckpointError names what is wrong."""
    args, library, config = foreign_architecture(folder)
    raw = _folder_weights(folder)
    if library == "transformers":
        state = from_hf_state_dict(raw, layerscale=args.init_values is not None)
    else:
        state = from_timm_state_dict(raw, args.num_register_tokens)
    if not args.use_mask_token:
        state.pop("mask_token", None)  # transformers always has one; DINO v1 models do not
    return ForeignBackbone(args, state, library, _crop_size(folder, config, library))


def _folder_weights(folder: Path) -> dict[str, Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_checkpoint(folder / shard))
        return state
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
        if (folder / name).is_file():
            return {k: v for k, v in read_checkpoint(folder / name).items() if isinstance(v, Tensor)}
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _crop_size(folder: Path, config: dict, library: str) -> int | None:
    if library == "timm":
        size = (config.get("pretrained_cfg") or {}).get("input_size")
        return int(size[-1]) if size else None
    processor = folder / "preprocessor_config.json"
    if not processor.is_file():
        return None
    crop = json.loads(processor.read_text()).get("crop_size")
    if isinstance(crop, dict):
        return int(crop.get("height") or crop.get("shortest_edge"))
    return int(crop) if crop else None

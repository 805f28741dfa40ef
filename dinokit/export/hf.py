"""DINOv2 backbone weights -> Hugging Face transformers `Dinov2Model` / `Dinov2WithRegistersModel`.

Key mapping (official -> transformers 5 names; `legacy_names=True` gives the transformers 4 /
hub-checkpoint names in brackets):

    cls_token, mask_token, register_tokens -> embeddings.{cls_token, mask_token, register_tokens}
    pos_embed                              -> embeddings.position_embeddings
    patch_embed.proj.*                     -> embeddings.patch_embeddings.projection.*
    blocks.{i}.attn.qkv.*  (rows q | k | v)-> encoder.layer.{i}.attention.{q,k,v}_proj.*
                                              [attention.attention.{query,key,value}.*]
    blocks.{i}.attn.proj.*                 -> encoder.layer.{i}.attention.o_proj.*  [attention.output.dense.*]
    blocks.{i}.ls{1,2}.gamma               -> encoder.layer.{i}.layer_scale{1,2}.lambda1 (ones without LayerScale)
    blocks.{i}.norm{1,2}.*, mlp.fc{1,2}.*  -> encoder.layer.{i}.norm{1,2}.*, mlp.fc{1,2}.*
    blocks.{i}.mlp.w12.* (rows a | b)      -> mlp.gate_proj.* | mlp.up_proj.*   [mlp.weights_in.*]
    blocks.{i}.mlp.w3.*                    -> mlp.down_proj.*                      [mlp.weights_out.*]
    norm.*                                 -> layernorm.*

`Dinov2Model(pixel_values).last_hidden_state` is then [CLS, registers, patches] after the final
norm, i.e. `x_norm_clstoken`, `x_norm_regtokens`, `x_norm_patchtokens` concatenated.

The other way, `from_hf_state_dict` maps both name sets back, and `vit_args_from_hf_config`
reads the architecture off a `config.json` (no transformers needed, no code run). A folder that
`write_hf_folder` made also holds the dinokit architecture (`dinokit_vit_args`), so it comes back
exactly, resampling rule included; any other folder resamples positions as transformers does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinokit.export import (
    VIT_ARGS_KEY,
    BackboneArch,
    Resampling,
    backbone_arch,
    read_config_json,
    state_dict_for_size,
    stored_img_size,
    stored_vit_args,
    vit_args_of,
)
from dinokit.models.builders import ViTArgs
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["from_hf_state_dict", "hf_config", "hf_resampling", "is_hf_config", "is_hf_folder", "to_hf", "to_hf_state_dict",
           "vit_args_from_hf_config", "write_hf_folder"]

MODEL_TYPES = ("dinov2", "dinov2_with_registers")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TOP = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_SAME_IN_BLOCK = {"norm1", "norm2", "mlp.fc1", "mlp.fc2"}


def _names(legacy: bool) -> dict[str, Any]:
    if legacy:
        return {"qkv": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                "proj": "attention.output.dense", "w12": ("mlp.weights_in",), "w3": "mlp.weights_out"}
    return {"qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
            "proj": "attention.o_proj", "w12": ("mlp.gate_proj", "mlp.up_proj"), "w3": "mlp.down_proj"}


def to_hf_state_dict(state_dict: Mapping[str, Tensor], legacy_names: bool = False) -> dict[str, Tensor]:
    """Official / dinokit backbone keys -> transformers Dinov2 keys (see the module docstring).

    Raises ValueError naming the first key that is not a plain backbone key.
    """
    names = _names(legacy_names)
    out: dict[str, Tensor] = {}
    blocks: set[int] = set()
    for key, value in state_dict.items():
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        match = _BLOCK.match(key)
        if match is None:
            raise ValueError(f"not a DINOv2 backbone key: {key!r}")
        i, rest = int(match.group(1)), match.group(2)
        blocks.add(i)
        module, _, param = rest.rpartition(".")
        prefix = f"encoder.layer.{i}."
        if module in _SAME_IN_BLOCK:
            out[prefix + rest] = value
        elif module in ("ls1", "ls2") and param == "gamma":
            out[f"{prefix}layer_scale{module[-1]}.lambda1"] = value
        elif module == "attn.qkv":
            for name, part in zip(names["qkv"], value.chunk(3)):
                out[f"{prefix}{name}.{param}"] = part
        elif module == "attn.proj":
            out[f"{prefix}{names['proj']}.{param}"] = value
        elif module == "mlp.w12":
            parts = value.chunk(len(names["w12"]))
            for name, part in zip(names["w12"], parts):
                out[f"{prefix}{name}.{param}"] = part
        elif module == "mlp.w3":
            out[f"{prefix}{names['w3']}.{param}"] = value
        else:
            raise ValueError(f"not a DINOv2 backbone key: {key!r}")
    # Without LayerScale (DINO v1) the branches are unscaled; transformers always has the scale.
    dim = state_dict["norm.weight"].shape[0]
    for i in blocks:
        for j in (1, 2):
            out.setdefault(f"encoder.layer.{i}.layer_scale{j}.lambda1", torch.ones(dim))
    return out


def _mlp_ratio(arch: BackboneArch) -> int | float:
    # transformers 5 accepts only an int ratio (all released models have 4); older versions
    # take int(hidden_size * mlp_ratio), where the +0.5 keeps float rounding from losing 1.
    if arch.mlp_hidden % arch.embed_dim == 0:
        return arch.mlp_hidden // arch.embed_dim
    return (arch.mlp_hidden + 0.5) / arch.embed_dim


def hf_config(arch: BackboneArch, image_size: int) -> Any:
    """`Dinov2Config` (or `Dinov2WithRegistersConfig` with registers) for `image_size` px inputs."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    common = dict(
        hidden_size=arch.embed_dim,
        num_hidden_layers=arch.depth,
        num_attention_heads=arch.num_heads,
        mlp_ratio=4 if arch.swiglu else _mlp_ratio(arch),
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=image_size,
        patch_size=arch.patch_size,
        num_channels=arch.in_chans,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=arch.swiglu,
    )
    if arch.swiglu:
        # transformers derives the SwiGLU width from hidden_size * mlp_ratio by DINOv2's rule.
        from dinokit.models.layers.mlp import swiglu_hidden_features

        if swiglu_hidden_features(4 * arch.embed_dim) != arch.mlp_hidden:
            raise ValueError(f"SwiGLU width {arch.mlp_hidden} is not DINOv2's rule for mlp_ratio 4")
    if arch.num_register_tokens:
        return Dinov2WithRegistersConfig(**common, num_register_tokens=arch.num_register_tokens)
    return Dinov2Config(**common, use_mask_token=arch.mask_token)


def to_hf(model: VisionTransformer, image_size: int | None = None) -> nn.Module:
    """A transformers Dinov2 model in eval mode with `model`'s weights, for `image_size` images.

    As in `dinokit.export.timm.to_timm`, the size is baked into the positional embedding with
    the official interpolation (transformers resamples without DINOv2's +0.1 offset).
    """
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    arch = backbone_arch(model)
    if image_size is None:
        image_size = stored_img_size(model)
    config = hf_config(arch, image_size)
    peer = (Dinov2WithRegistersModel if arch.num_register_tokens else Dinov2Model)(config)
    expected = peer.state_dict()
    legacy = any(".attention.attention.query." in k for k in expected)
    state = to_hf_state_dict(state_dict_for_size(model, image_size), legacy_names=legacy)
    if "embeddings.mask_token" in expected and "embeddings.mask_token" not in state:
        state["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])  # unused in inference
    peer.load_state_dict(state, strict=True)
    return peer.eval()


def hf_resampling(num_register_tokens: int) -> Resampling:
    """transformers' rule: by output size; antialiased in the model with registers."""
    return Resampling(0.0, num_register_tokens > 0)


def write_hf_folder(model: VisionTransformer, out: Path, image_size: int, resize: int,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """`config.json`, `model.safetensors` and `preprocessor_config.json` in `out`; the model built."""
    peer = to_hf(model)
    peer.config.update({VIT_ARGS_KEY: asdict(vit_args_of(model))})
    peer.save_pretrained(str(out), safe_serialization=True)
    processor = {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True, "size": {"shortest_edge": resize}, "resample": 3,  # bicubic
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return peer


def is_hf_config(config: Mapping[str, Any]) -> bool:
    """A transformers DINOv2 `config.json`."""
    return config.get("model_type") in MODEL_TYPES


def is_hf_folder(folder: Path) -> bool:
    config = read_config_json(folder)
    return config is not None and is_hf_config(config)


def vit_args_from_hf_config(config: Mapping[str, Any], where: str = "config.json") -> ViTArgs:
    """The architecture a transformers DINOv2 `config.json` describes (ValueError says what is off)."""
    stored = stored_vit_args(dict(config))
    if stored is not None:
        return stored
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type {config.get('model_type')!r} is not one of {MODEL_TYPES}")
    if config.get("hidden_act", "gelu") != "gelu" or not config.get("qkv_bias", True):
        raise ValueError(f"{where}: hidden_act {config.get('hidden_act')!r} / qkv_bias {config.get('qkv_bias')} "
                         "are not DINOv2's (gelu, True)")
    registers = int(config.get("num_register_tokens", 0)) if config["model_type"] == MODEL_TYPES[1] else 0
    rule = hf_resampling(registers)
    try:
        return ViTArgs(
            img_size=int(config["image_size"]),
            patch_size=int(config["patch_size"]),
            in_chans=int(config.get("num_channels", 3)),
            embed_dim=int(config["hidden_size"]),
            depth=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            mlp_ratio=float(config.get("mlp_ratio", 4)),
            init_values=1.0,  # transformers always has the LayerScale
            ffn_layer="swiglufused" if config.get("use_swiglu_ffn") else "mlp",
            num_register_tokens=registers,
            interpolate_antialias=rule.antialias,
            interpolate_offset=rule.offset,
            use_mask_token=True,
        )
    except KeyError as exc:
        raise ValueError(f"{where}: no {exc.args[0]!r} entry") from exc


_TOP_BACK = {v: k for k, v in _TOP.items()}
_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# transformers name (either generation) -> (official module, which part of a fused matrix)
_PARTS = {
    "attention.q_proj": ("attn.qkv", 0), "attention.k_proj": ("attn.qkv", 1), "attention.v_proj": ("attn.qkv", 2),
    "attention.attention.query": ("attn.qkv", 0), "attention.attention.key": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2),
    "mlp.gate_proj": ("mlp.w12", 0), "mlp.up_proj": ("mlp.w12", 1), "mlp.weights_in": ("mlp.w12", 0),
}
_RENAMED = {"attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
            "mlp.down_proj": "mlp.w3", "mlp.weights_out": "mlp.w3"}


def is_hf_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in state_dict)


def from_hf_state_dict(state_dict: Mapping[str, Tensor], layerscale: bool = True) -> dict[str, Tensor]:
    """transformers Dinov2 keys (both generations; a `dinov2.` prefix is dropped) -> official keys.

    Keys that are not part of a DINOv2 backbone are passed through unchanged, so that loading
    names them. `layerscale=False` (DINO v1) drops the LayerScale factors, which must be ones.
    """
    out: dict[str, Tensor] = {}
    fused: dict[tuple[int, str, str], dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("dinov2.")
        if key in _TOP_BACK:
            out[_TOP_BACK[key]] = value
            continue
        match = _HF_BLOCK.match(key)
        if match is None:
            out[key] = value
            continue
        i, rest = int(match.group(1)), match.group(2)
        module, _, param = rest.rpartition(".")
        prefix = f"blocks.{i}."
        if module in _SAME_IN_BLOCK:
            out[prefix + rest] = value
        elif module in ("layer_scale1", "layer_scale2") and param == "lambda1":
            if layerscale:
                out[f"{prefix}ls{module[-1]}.gamma"] = value
            elif not torch.equal(value, torch.ones_like(value)):
                raise ValueError(f"{key}: a model without LayerScale needs factors of 1")
        elif module in _PARTS:
            target, index = _PARTS[module]
            fused.setdefault((i, target, param), {})[index] = value
        elif module in _RENAMED:
            out[f"{prefix}{_RENAMED[module]}.{param}"] = value
        else:
            out[key] = value
    for (i, target, param), parts in fused.items():
        out[f"blocks.{i}.{target}.{param}"] = torch.cat([parts[j] for j in sorted(parts)])
    return out

"""Weights of a dinokit / official DINOv2 backbone in other libraries' layouts.

- `dinokit.export.timm`: timm `VisionTransformer` (`vit_small_patch14_dinov2` & co.), both ways.
- `dinokit.export.hf`: Hugging Face transformers `Dinov2Model` / `Dinov2WithRegistersModel`,
  both ways.
- `dinokit.export.onnx`: an ONNX graph with dynamic batch, height and width.
- `dinokit.export.command`: `dinokit export`, which writes one of them and checks its outputs.

The converters take a state dict with the official key names (what `VisionTransformer.state_dict()`
and the hub `.pth` files hold) and need the peer library only to build the target model.

Positional resampling: at the stored grid every peer computes what we compute. At other sizes
each library resizes the grid its own way: transformers' `Dinov2Model` by output size without
antialias, `Dinov2WithRegistersModel` and timm by output size with antialias, the official
DINOv2 models (and dinokit's default) by `scale_factor = (h/p + 0.1) / M` without antialias. A
peer whose rule is not the model's gives slightly different tokens there (`peer_resampling`
says which rule a peer uses). `state_dict_for_size` bakes one size in with the model's rule, so
that a peer built for that size needs no resampling and matches exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinokit.models.builders import ViTArgs
from dinokit.models.layers.layer_scale import LayerScale
from dinokit.models.layers.mlp import Mlp, swiglu_hidden_features
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["VIT_ARGS_KEY", "BackboneArch", "Resampling", "backbone_arch", "model_resampling", "read_config_json",
           "state_dict_for_size", "stored_img_size", "stored_vit_args", "vit_args_of"]

# Where the transformers and timm `config.json` that dinokit writes keep the exact architecture.
VIT_ARGS_KEY = "dinokit_vit_args"


@dataclass(frozen=True)
class BackboneArch:
    """What a peer library needs to build the same network (read off a built model)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int
    mlp_hidden: int  # hidden width of the FFN (per half for SwiGLU)
    swiglu: bool
    layerscale: bool
    num_register_tokens: int
    mask_token: bool


def backbone_arch(model: VisionTransformer) -> BackboneArch:
    """The architecture of `model`; raises ValueError for what the peers cannot express."""
    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    linears = [attn.qkv, attn.proj, *(m for m in mlp.modules() if isinstance(m, torch.nn.Linear))]
    if any(lin.bias is None for lin in linears):
        raise ValueError("export needs biases on every Linear (qkv_bias, proj_bias, ffn_bias = True)")
    swiglu = not isinstance(mlp, Mlp)
    return BackboneArch(
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        patch_size=model.patch_size,
        in_chans=model.patch_embed.proj.in_channels,
        mlp_hidden=mlp.w3.in_features if swiglu else mlp.fc1.out_features,
        swiglu=swiglu,
        layerscale=isinstance(block.ls1, LayerScale),
        num_register_tokens=model.num_register_tokens,
        mask_token=model.mask_token is not None,
    )


@dataclass(frozen=True)
class Resampling:
    """How a positional grid is resized for another input size (see the module docstring)."""

    offset: float
    antialias: bool


def model_resampling(model: VisionTransformer) -> Resampling:
    return Resampling(float(model.interpolate_offset), bool(model.interpolate_antialias))


def vit_args_of(model: VisionTransformer) -> ViTArgs:
    """The `ViTArgs` that rebuild `model`'s architecture (its stored grid size included)."""
    arch = backbone_arch(model)
    if arch.swiglu:
        ratio = 4.0  # DINOv2's SwiGLU width rule from a 4x MLP, the only one the builders use
        if swiglu_hidden_features(int(arch.embed_dim * ratio)) != arch.mlp_hidden:
            raise ValueError(f"SwiGLU width {arch.mlp_hidden} is not DINOv2's rule for mlp_ratio 4")
    else:
        exact = arch.mlp_hidden / arch.embed_dim
        ratio = exact if int(arch.embed_dim * exact) == arch.mlp_hidden else (arch.mlp_hidden + 0.5) / arch.embed_dim
    return ViTArgs(
        img_size=stored_img_size(model),
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=ratio,
        init_values=1.0 if arch.layerscale else None,
        ffn_layer="swiglufused" if arch.swiglu else "mlp",
        num_register_tokens=arch.num_register_tokens,
        interpolate_antialias=bool(model.interpolate_antialias),
        interpolate_offset=float(model.interpolate_offset),
        use_mask_token=arch.mask_token,
    )


def stored_vit_args(config: dict[str, Any]) -> ViTArgs | None:
    """The architecture `dinokit export` stored in a library's `config.json`, or None."""
    if VIT_ARGS_KEY not in config:
        return None
    known = {f.name for f in fields(ViTArgs)}
    return ViTArgs(**{k: v for k, v in config[VIT_ARGS_KEY].items() if k in known})


def read_config_json(folder: Path) -> dict[str, Any] | None:
    """`folder/config.json` as a dict, or None when it is missing or not a JSON object."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return config if isinstance(config, dict) else None


def stored_img_size(model: VisionTransformer) -> int:
    """The image side the stored positional embedding is made for (grid side x patch size)."""
    return math.isqrt(model.pos_embed.shape[1] - 1) * model.patch_size


@torch.no_grad()
def state_dict_for_size(model: VisionTransformer, img_size: int | None = None) -> dict[str, Tensor]:
    """`model.state_dict()` with `pos_embed` resampled for `img_size` x `img_size` images.

    The resampling is the model's own (official DINOv2 semantics), so a peer built for that
    size, which then needs no interpolation, computes what `model` computes. None keeps the
    stored grid.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if img_size is not None:
        if img_size % model.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {model.patch_size}")
        n = (img_size // model.patch_size) ** 2
        tokens = model.pos_embed.new_zeros(1, 1 + n, model.embed_dim)
        state["pos_embed"] = model.interpolate_pos_encoding(tokens, img_size, img_size).detach().clone()
    return state

"""Weights of a dinokit / official DINOv2 backbone in other libraries' layouts.

- `dinokit.export.timm`: timm `VisionTransformer` (`vit_small_patch14_dinov2` & co.).
- `dinokit.export.hf`: Hugging Face transformers `Dinov2Model` / `Dinov2WithRegistersModel`.

Both take a state dict with the official key names (what `VisionTransformer.state_dict()` and
the hub `.pth` files hold) and need the peer library only to build the target model. The
positional embedding can be resampled for one image size first (`state_dict_for_size`), with
the official interpolation rule: the peers resample with a plain output size, which differs
from DINOv2's `+0.1` offset, so baking the size in is what makes their outputs equal ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dinokit.models.layers.layer_scale import LayerScale
from dinokit.models.layers.mlp import Mlp
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["BackboneArch", "backbone_arch", "state_dict_for_size", "stored_img_size"]


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

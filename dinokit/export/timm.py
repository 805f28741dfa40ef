"""DINOv2 backbone weights -> a timm `VisionTransformer` (timm's `*_dinov2` models).

timm keeps most official names (`blocks.{i}.attn.qkv`, `ls1.gamma`, ...); the differences:
no `mask_token`; registers are `reg_token`; SwiGLU is `mlp.fc1` / `mlp.fc2` (timm's
`SwiGLUPacked` computes `silu(a) * b` on the two halves of `fc1`, as `w12` does); and register
models (`no_embed_class=True` in timm) add positions to the patches only, so the [CLS] position
is folded into the [CLS] token.

Example:
    >>> from dinokit.models import build_official
    >>> ours = build_official("dinov2_vits14").eval()
    >>> theirs = to_timm(ours, img_size=224)   # timm's vit_small_patch14_dinov2 at 224 px
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from dinokit.export import (
    BackboneArch,
    backbone_arch,
    state_dict_for_size,
    stored_img_size,
)
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["timm_kwargs", "to_timm", "to_timm_state_dict"]

_KNOWN = re.compile(
    r"^(cls_token|pos_embed|register_tokens|mask_token|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma)$"
)


def to_timm_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official / dinokit backbone keys -> timm keys (a new dict; tensors are shared).

    Raises ValueError naming the first key that is not a plain backbone key (training
    checkpoints: extract the backbone with `dinokit.checkpoint.loading.backbone_state_dict`).
    """
    unknown = [k for k in state_dict if not _KNOWN.match(k)]
    if unknown:
        raise ValueError(f"not a DINOv2 backbone key: {unknown[0]!r} ({len(unknown)} unknown keys)")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue  # timm has no masked-image-modelling input
        key = "reg_token" if key == "register_tokens" else key
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    if "register_tokens" in state_dict:
        pos = state_dict["pos_embed"]
        out["cls_token"] = state_dict["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def timm_kwargs(arch: BackboneArch, img_size: int) -> dict[str, Any]:
    """Constructor arguments of `timm.models.vision_transformer.VisionTransformer`."""
    # timm sizes the FFN as int(dim * mlp_ratio); the +0.5 keeps float rounding from losing 1.
    hidden = 2 * arch.mlp_hidden if arch.swiglu else arch.mlp_hidden
    kwargs: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        num_classes=0,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=(hidden + 0.5) / arch.embed_dim,
        qkv_bias=True,
        init_values=1.0 if arch.layerscale else None,
        reg_tokens=arch.num_register_tokens,
        no_embed_class=arch.num_register_tokens > 0,
    )
    if arch.swiglu:
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return kwargs


def to_timm(model: VisionTransformer, img_size: int | None = None) -> nn.Module:
    """A timm `VisionTransformer` in eval mode with `model`'s weights, for `img_size` images.

    `img_size` (default: the size of the stored position grid) is baked into the positional
    embedding with the official interpolation, so the timm model gives `model`'s outputs at
    that size: `timm.forward_features(x)` == [CLS, registers, patches] after the final norm.
    """
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if img_size is None:
        img_size = stored_img_size(model)
    peer = TimmViT(**timm_kwargs(backbone_arch(model), img_size))
    peer.load_state_dict(to_timm_state_dict(state_dict_for_size(model, img_size)), strict=True)
    return peer.eval()

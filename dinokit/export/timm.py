"""DINOv2 backbone weights -> a timm `VisionTransformer` (timm's `*_dinov2` models).

timm keeps most official names (`blocks.{i}.attn.qkv`, `ls1.gamma`, ...); the differences:
no `mask_token`; registers are `reg_token`; SwiGLU is `mlp.fc1` / `mlp.fc2` (timm's
`SwiGLUPacked` computes `silu(a) * b` on the two halves of `fc1`, as `w12` does); and register
models (`no_embed_class=True` in timm) add positions to the patches only, so the [CLS] position
is folded into the [CLS] token.

`write_timm_folder` writes the layout `timm.create_model("local-dir:FOLDER", pretrained=True)`
loads: `config.json` (the architecture as `model_args` of a timm DINOv2 model) and
`model.safetensors`. There a register model keeps `no_embed_class=False` with zero positions for
the registers, which computes the same and keeps the [CLS] position its own, and the unused
`mask_token` rides along (timm's loader drops a DINOv2 `mask_token`), so reading the folder back
gives the very tensors that were written.

`from_timm_state_dict` maps timm keys back (either register layout); `vit_args_from_timm_config`
reads a timm `config.json`, exactly for folders written here, else from timm's DINOv2
architecture names with timm's resampling rule (by output size, antialiased).

Example:
    >>> from dinokit.models import build_official
    >>> ours = build_official("dinov2_vits14").eval()
    >>> theirs = to_timm(ours, img_size=224)   # timm's vit_small_patch14_dinov2 at 224 px
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
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
from dinokit.models.builders import OFFICIAL_ARCHS, ViTArgs
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["from_timm_state_dict", "is_timm_config", "is_timm_folder", "timm_kwargs", "timm_resampling", "to_timm",
           "to_timm_state_dict", "vit_args_from_timm_config", "write_timm_folder"]

# timm's DINOv2 architectures and the released models they are
TIMM_DINOV2 = {
    f"vit_{size}_patch14{reg}_dinov2": f"dinov2_vit{size[0]}14{'_reg' if reg else ''}"
    for size in ("small", "base", "large", "giant") for reg in ("", "_reg4")
}

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


def timm_resampling() -> Resampling:
    """timm's `dynamic_img_size` rule: by output size, antialiased."""
    return Resampling(0.0, True)


def _timm_architecture(arch: BackboneArch) -> str:
    # The timm entry point whose fixed choices (FFN type) the model shares; sizes are overridden.
    return "vit_giant_patch14_dinov2" if arch.swiglu else "vit_small_patch14_dinov2"


def write_timm_folder(model: VisionTransformer, out: Path, image_size: int, resize: int,
                      mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    """`config.json` + `model.safetensors` in `out`; returns the Python that loads it."""
    arch = backbone_arch(model)
    kwargs = timm_kwargs(arch, stored_img_size(model))
    kwargs.pop("mlp_layer", None), kwargs.pop("act_layer", None)  # the architecture sets them
    kwargs.update(no_embed_class=False, dynamic_img_size=True)
    state = {k: v.contiguous() for k, v in _timm_state(model).items()}
    save_file(state, str(out / "model.safetensors"))
    config = {
        "architecture": _timm_architecture(arch),
        "num_classes": 0,
        "num_features": arch.embed_dim,
        "model_args": kwargs,
        "pretrained_cfg": {
            "input_size": [arch.in_chans, image_size, image_size],
            "interpolation": "bicubic",
            "crop_pct": image_size / resize,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
        },
        VIT_ARGS_KEY: asdict(vit_args_of(model)),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return (f"import timm\nmodel = timm.create_model(\"local-dir:{out.resolve()}\", pretrained=True).eval()\n"
            "tokens = model.forward_features(images)  # [CLS, registers, patches] after the final norm\n")


def _timm_state(model: VisionTransformer) -> dict[str, Tensor]:
    """timm keys with the register layout of `write_timm_folder`, plus the official `mask_token`."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = to_timm_state_dict({k: v for k, v in state.items() if k not in ("register_tokens", "pos_embed")})
    out["pos_embed"] = state["pos_embed"]
    if "register_tokens" in state:
        registers = state["register_tokens"]
        pos = state["pos_embed"]
        out["reg_token"] = registers
        out["pos_embed"] = torch.cat((pos[:, :1], torch.zeros_like(registers), pos[:, 1:]), dim=1)
    if "mask_token" in state:
        out["mask_token"] = state["mask_token"]
    return out


def is_timm_config(config: Mapping[str, Any]) -> bool:
    """A timm `config.json` naming a DINOv2 architecture (or written by `write_timm_folder`)."""
    return "architecture" in config and (
        VIT_ARGS_KEY in config or str(config["architecture"]).split(".")[0] in TIMM_DINOV2)


def is_timm_folder(folder: Path) -> bool:
    config = read_config_json(folder)
    return config is not None and is_timm_config(config)


def vit_args_from_timm_config(config: Mapping[str, Any], where: str = "config.json") -> ViTArgs:
    """The architecture a timm `config.json` describes (ValueError says what is off)."""
    stored = stored_vit_args(dict(config))
    if stored is not None:
        return stored
    name = str(config.get("architecture", "")).split(".")[0]
    if name not in TIMM_DINOV2:
        raise ValueError(f"{where}: architecture {name!r} is not a timm DINOv2 model ({', '.join(TIMM_DINOV2)})")
    base = OFFICIAL_ARCHS[TIMM_DINOV2[name]]
    margs = dict(config.get("model_args") or {})
    rule = timm_resampling()
    args = replace(base, interpolate_offset=rule.offset, interpolate_antialias=rule.antialias)
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
        if key in margs:
            args = replace(args, **{key: int(margs[key] if not isinstance(margs[key], list) else margs[key][0])})
    if "reg_tokens" in margs:
        args = replace(args, num_register_tokens=int(margs["reg_tokens"]))
    return args


def from_timm_state_dict(state_dict: Mapping[str, Tensor], num_register_tokens: int | None = None) -> dict[str, Tensor]:
    """timm DINOv2 keys -> official keys. Registers in either layout: positions for the patches
    only ([CLS] position folded into the token: it becomes zero), or for [CLS], the registers
    (which must be zero: DINOv2's registers have no position) and the patches."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = re.match(r"^(blocks\.\d+\.mlp)\.fc([12])\.(weight|bias)$", key)
        if match and _is_packed_swiglu(state_dict, match.group(1)):
            out[f"{match.group(1)}.{'w12' if match.group(2) == '1' else 'w3'}.{match.group(3)}"] = value
        elif key == "reg_token":
            out["register_tokens"] = value
        else:
            out[key] = value
    registers = out["register_tokens"].shape[1] if "register_tokens" in out else (num_register_tokens or 0)
    pos = out.get("pos_embed")
    if pos is not None:
        n = pos.shape[1]
        if math.isqrt(n) ** 2 == n and n != 1:  # patches only
            out["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
        elif registers and math.isqrt(n - 1 - registers) ** 2 == n - 1 - registers:
            if pos[:, 1:1 + registers].abs().max() > 0:
                raise ValueError("pos_embed gives the registers positions, which DINOv2 models do not have")
            out["pos_embed"] = torch.cat((pos[:, :1], pos[:, 1 + registers:]), dim=1)
    return out


def _is_packed_swiglu(state_dict: Mapping[str, Tensor], mlp: str) -> bool:
    fc1, fc2 = state_dict.get(f"{mlp}.fc1.weight"), state_dict.get(f"{mlp}.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def is_timm_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    if "reg_token" in state_dict:
        return True
    return any(k.endswith(".mlp.fc1.weight") and _is_packed_swiglu(state_dict, k[: -len(".fc1.weight")])
               for k in state_dict)

"""Named ViT sizes and the official DINO / DINOv2 architectures.

`vit_small/base/large/giant2` follow the DINOv2 sizes (Oquab et al. 2023); `build_official(name)` gives the
exact architecture of a released checkpoint, so that its state_dict loads key for key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from dinokit.models.vision_transformer import VisionTransformer

# embed_dim, depth, num_heads (64 dims per head).
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


@dataclass(frozen=True)
class ViTArgs:
    """Plain constructor values of a `VisionTransformer` (serialisable, comparable)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    init_values: float | None = None
    ffn_layer: str = "mlp"
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    use_mask_token: bool = True

    def build(self) -> VisionTransformer:
        return VisionTransformer(**asdict(self))  # type: ignore[arg-type]


def vit_args(size: str, **overrides: Any) -> ViTArgs:
    """Arguments for a named size (`vit_small`, ...) with overrides, e.g. `patch_size=14`."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; known: {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[size]
    return replace(ViTArgs(embed_dim=dim, depth=depth, num_heads=heads), **overrides)


def _dinov2(size: str, registers: bool, ffn_layer: str = "mlp") -> ViTArgs:
    # Hub builders: 518 px (37 x 37 grid), LayerScale init 1.0; register models resize the
    # positional embedding with antialiasing and without the +0.1 offset.
    return vit_args(
        size,
        img_size=518,
        patch_size=14,
        init_values=1.0,
        ffn_layer=ffn_layer,
        num_register_tokens=4 if registers else 0,
        interpolate_antialias=registers,
        interpolate_offset=0.0 if registers else 0.1,
    )


def _dino_v1(size: str, patch_size: int) -> ViTArgs:
    return vit_args(size, img_size=224, patch_size=patch_size, init_values=None, use_mask_token=False)


OFFICIAL_ARCHS: dict[str, ViTArgs] = {
    "dinov2_vits14": _dinov2("vit_small", False),
    "dinov2_vitb14": _dinov2("vit_base", False),
    "dinov2_vitl14": _dinov2("vit_large", False),
    "dinov2_vitg14": _dinov2("vit_giant2", False, "swiglufused"),
    "dinov2_vits14_reg": _dinov2("vit_small", True),
    "dinov2_vitb14_reg": _dinov2("vit_base", True),
    "dinov2_vitl14_reg": _dinov2("vit_large", True),
    "dinov2_vitg14_reg": _dinov2("vit_giant2", True, "swiglufused"),
    "dino_vits16": _dino_v1("vit_small", 16),
    "dino_vits8": _dino_v1("vit_small", 8),
    "dino_vitb16": _dino_v1("vit_base", 16),
    "dino_vitb8": _dino_v1("vit_base", 8),
}


# Convolutional backbones: the `model.arch` of a training config -> the released model's name.
CONV_ARCHS: dict[str, str] = {"resnet50": "dino_resnet50"}
# Every name `build_official` takes.
OFFICIAL_NAMES: tuple[str, ...] = (*OFFICIAL_ARCHS, *CONV_ARCHS.values())


def build_official(name: str, **overrides: Any) -> VisionTransformer:
    """The architecture of a released DINO / DINOv2 backbone (random weights; load them after).
    `dino_resnet50` is DINO's ResNet-50 (`dinokit.models.resnet.ResNetBackbone`, no overrides).

    Example:
        >>> model = build_official("dinov2_vits14")
        >>> sorted(model.state_dict())[:2]
        ['blocks.0.attn.proj.bias', 'blocks.0.attn.proj.weight']
    """
    if name in CONV_ARCHS.values():
        if overrides:
            raise ValueError(f"{name} takes no overrides, got {sorted(overrides)}")
        from dinokit.models.resnet import ResNetBackbone

        return ResNetBackbone()  # type: ignore[return-value]
    if name not in OFFICIAL_ARCHS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(OFFICIAL_NAMES)}")
    return replace(OFFICIAL_ARCHS[name], **overrides).build()

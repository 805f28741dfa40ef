"""Backbones and projection heads."""

from dinokit.models.builders import OFFICIAL_ARCHS, VIT_SIZES, ViTArgs, build_official, vit_args
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["OFFICIAL_ARCHS", "VIT_SIZES", "ViTArgs", "VisionTransformer", "build_official", "vit_args"]

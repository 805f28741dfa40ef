"""Backbones and projection heads."""

from dinokit.models.builders import CONV_ARCHS, OFFICIAL_ARCHS, OFFICIAL_NAMES, VIT_SIZES, ViTArgs, build_official, vit_args
from dinokit.models.vision_transformer import VisionTransformer

__all__ = ["CONV_ARCHS", "OFFICIAL_ARCHS", "OFFICIAL_NAMES", "VIT_SIZES", "ViTArgs", "VisionTransformer", "build_official", "vit_args"]

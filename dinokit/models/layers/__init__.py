"""Building blocks of the Vision Transformer, one idea per file."""

from dinokit.models.layers.attention import Attention
from dinokit.models.layers.block import Block
from dinokit.models.layers.drop_path import DropPath, drop_add_residual_stochastic_depth
from dinokit.models.layers.layer_scale import LayerScale
from dinokit.models.layers.mlp import Mlp, SwiGLUFFN, swiglu_hidden_features
from dinokit.models.layers.packing import PackedLayout, packed_attention
from dinokit.models.layers.patch_embed import PatchEmbed

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PackedLayout",
    "PatchEmbed",
    "SwiGLUFFN",
    "drop_add_residual_stochastic_depth",
    "packed_attention",
    "swiglu_hidden_features",
]

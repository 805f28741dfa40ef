"""DINO projection head (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"; reused by DINOv2, Oquab et al. 2023, for both the DINO and the iBOT head).

An MLP maps backbone features to a small bottleneck, the bottleneck is L2-normalised, and a
weight-normalised Linear without bias scores it against K prototypes. The state_dict keys are those
of the official checkpoints (`mlp.{i}.*`, `last_layer.weight_g`, `last_layer.weight_v`) so official
training checkpoints load with `strict=True`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear", "remap_head_keys"]

# Names that torch.nn.utils.parametrizations.weight_norm gives the two tensors; the legacy
# torch.nn.utils.weight_norm (used by the official code) names them weight_g / weight_v.
_NEW_G = "parametrizations.weight.original0"
_NEW_V = "parametrizations.weight.original1"


def remap_head_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename new-style weight-norm keys to the legacy names used by the official checkpoints.

    `...last_layer.parametrizations.weight.original0` -> `...last_layer.weight_g` and
    `...original1` -> `...weight_v`; every other key (and any prefix such as `dino_head.`) is kept.

    Args:
        state_dict: a head (or whole-model) state_dict.

    Returns:
        A new dict with the same tensors under legacy names.

    Example:
        >>> sd = {"last_layer.parametrizations.weight.original0": torch.ones(4, 1)}
        >>> list(remap_head_keys(sd))
        ['last_layer.weight_g']
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.endswith(_NEW_G):
            key = key[: -len(_NEW_G)] + "weight_g"
        elif key.endswith(_NEW_V):
            key = key[: -len(_NEW_V)] + "weight_v"
        out[key] = value
    return out


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation (Salimans & Kingma 2016), legacy parameter names.

    Effective weight `W = weight_g * weight_v / ||weight_v||`, the norm taken per output row
    (`torch.nn.utils.weight_norm(..., dim=0)` semantics). Written as a module rather than with the
    deprecated `torch.nn.utils.weight_norm` so that the keys stay `weight_g` (out, 1) and `weight_v`
    (out, in) without a deprecation warning. State dicts that use the new parametrization names
    (`parametrizations.weight.original0/1`) are accepted too.

    Args:
        in_features: input size (the head's bottleneck dim).
        out_features: number of prototypes K.

    Shapes:
        x (..., in_features) -> (..., out_features)
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(self._rename_new_keys)

    def reset_parameters(self) -> None:
        """nn.Linear's default init for the direction, unit magnitude (what DINOHead does)."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.fill_(1.0)

    @property
    def weight(self) -> Tensor:
        """The effective (out_features, in_features) weight."""
        # torch._weight_norm is the kernel both the legacy hook and the new parametrization call;
        # using it keeps results bitwise equal to the official head and gives the fused backward.
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    @staticmethod
    def _rename_new_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        # Let strict loading accept checkpoints saved with parametrizations.weight_norm.
        for new, old in ((_NEW_G, "weight_g"), (_NEW_V, "weight_v")):
            if prefix + new in state_dict and prefix + old not in state_dict:
                state_dict[prefix + old] = state_dict.pop(prefix + new)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    """Linear, [BatchNorm1d], GELU, ... , Linear -- the exact module order fixes the key indices."""
    if nlayers == 1:
        # A bare Linear, not a 1-element Sequential: official keys are `mlp.weight` / `mlp.bias`.
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        dim = hidden_dim
    layers.append(nn.Linear(dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised prototype layer (DINO, DINOv2, iBOT heads).

    Args:
        in_dim: backbone feature size D.
        out_dim: number of prototypes K (65,536 in DINO / DINOv2 short, 131,072 for ViT-L/g).
        use_bn: BatchNorm1d after each hidden Linear (DINO v1 option; off in DINOv2).
        nlayers: Linear layers in the MLP (clamped to >= 1); 1 gives a single Linear to the bottleneck.
        hidden_dim: hidden width of the MLP.
        bottleneck_dim: size of the normalised bottleneck (256; 384 in DINOv2 ViT-L/g configs).
        mlp_bias: biases in the MLP Linears.
        norm_last_layer: freeze `last_layer.weight_g` at 1 so the prototypes stay unit-norm
            (DINO v1 default, which stabilises training). The official DINOv2 head trains weight_g;
            pass False to reproduce that.

    Shapes:
        x (..., in_dim) -> (..., out_dim). With use_bn the leading dims must be a single batch dim.

    Example:
        >>> head = DINOHead(384, 65536, hidden_dim=2048, bottleneck_dim=256)
        >>> head(torch.randn(8, 384)).shape
        torch.Size([8, 65536])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Official init: truncated normal std 0.02 (cut at +-2, i.e. effectively untruncated), zero bias.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck (..., bottleneck_dim)."""
        x = self.mlp(x)
        # fp16 cannot represent 1e-12; 1e-6 keeps the division finite for near-zero vectors.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.forward_bottleneck(x))

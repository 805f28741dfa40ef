"""torch.hub entry points of a dinokit clone (nothing is downloaded; weights come from your files).

    model = torch.hub.load("path/to/dinokit", "dinov2_vits14", source="local", weights="dinov2_vits14_pretrain.pth")
    model = torch.hub.load("path/to/dinokit", "from_run", source="local", run="runs/my_run")

Each official architecture name (`dinov2_vits14`, `dinov2_vitb14_reg`, `dino_vits16`, ...) builds
that architecture; `weights` is anything `dinokit eval` accepts for it: an official hub or training
checkpoint, a dinokit safetensors file, a transformers or timm folder. Without `weights` the model
is randomly initialised. `from_run` loads a `dinokit train` run folder (its EMA teacher) or a
distillation student's folder. The models are dinokit `VisionTransformer`s in eval mode, with the
official interface (`forward_features`, `get_intermediate_layers`).
"""

from __future__ import annotations

from typing import Any, Callable

from dinokit.checkpoint.resolve import resolve_backbone
from dinokit.models.builders import OFFICIAL_ARCHS, build_official
from dinokit.models.vision_transformer import VisionTransformer

dependencies = ["torch", "safetensors", "yaml"]


def _entry(name: str) -> Callable[..., VisionTransformer]:
    def load(weights: str | None = None, **overrides: Any) -> VisionTransformer:
        if weights is None:
            return build_official(name, **overrides).eval()
        if overrides:
            raise TypeError(f"{name}: architecture overrides {sorted(overrides)} apply to random initialisation only")
        return resolve_backbone(weights, arch=name).model

    load.__name__ = load.__qualname__ = name
    load.__doc__ = f"The {name} architecture; `weights`: a checkpoint file or folder to load (else random)."
    return load


globals().update({name: _entry(name) for name in OFFICIAL_ARCHS})


def from_run(run: str) -> VisionTransformer:
    """The backbone a `dinokit train` run folder released (its EMA teacher), or a student's folder."""
    return resolve_backbone(run).model

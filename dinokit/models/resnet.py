"""The DINO v1 ResNet-50 backbone: torchvision's ResNet-50 without its classifier.

DINO released a ResNet-50 trained with its loss; its checkpoint holds torchvision's key names
(`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., `layer4.2.bn3.*`) and no `fc.*`, since
the official code replaces `fc` by an identity before training. `ResNetBackbone` has exactly
those keys, so the file loads strictly, and it speaks the interface the rest of dinokit uses for
a backbone:

- `forward_features(x)` -> {"x_norm_clstoken": global average pool (B, 2048),
  "x_norm_patchtokens": the last stage's map as tokens (B, h*w, 2048)}; no normalisation layer
  follows a ResNet, the names are kept so training, k-NN and retrieval need no special case;
- `get_intermediate_layers(x, n, reshape, return_class_token)`: the last n of the four stages
  (dims 256, 512, 1024, 2048), pooled for the class token; `patch_size` is the last stage's
  stride, 32, so dense probes choose input sizes that are multiples of it;
- `blocks`: the four stages (a plain list, not a registered module: the state dict keeps
  torchvision's names).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet

__all__ = ["ResNetBackbone"]


class ResNetBackbone(ResNet):
    """ResNet-50 (torchvision layout, `fc` = identity) with dinokit's backbone interface."""

    embed_dim = 2048
    patch_size = 32
    num_register_tokens = 0

    def __init__(self) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        self.fc = nn.Identity()
        # Training options that a ViT honours; a ResNet has no token sequence to pack.
        self.packing = False
        self.activation_checkpointing = False

    @property
    def blocks(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _stages(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for stage in self.blocks:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        if masks is not None:
            raise ValueError("a ResNet has no mask token: masked-image training (iBOT) needs a ViT")
        fmap = self._stages(x)[-1]
        return {"x_norm_clstoken": fmap.mean(dim=(2, 3)), "x_norm_patchtokens": fmap.flatten(2).transpose(1, 2)}

    def forward_features_list(self, xs: Sequence[Tensor], masks: Sequence[Tensor | None]) -> list[dict[str, Tensor]]:
        return [self.forward_features(x, m) for x, m in zip(xs, masks)]

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True, **_: Any) -> tuple[Any, ...]:
        wanted = list(range(4 - n, 4)) if isinstance(n, int) else list(n)
        if not wanted or min(wanted) < 0 or max(wanted) > 3:
            raise ValueError(f"stages {wanted} out of range for a ResNet with 4 stages")
        stages = self._stages(x)
        out = []
        for i in wanted:
            fmap = stages[i]
            patches = fmap if reshape else fmap.flatten(2).transpose(1, 2)
            out.append((patches, fmap.mean(dim=(2, 3))) if return_class_token else patches)
        return tuple(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["x_norm_clstoken"]

    @torch.no_grad()
    def resize_pos_embed_(self, image_size: int) -> None:
        """Nothing to resize: convolutions take any input size."""

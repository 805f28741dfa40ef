"""Per-parameter learning-rate and weight-decay multipliers for AdamW (DINOv2 recipe).

- layer-wise lr decay: a parameter at depth `l` (0 = embeddings, i + 1 = block i, depth + 1 =
  final norm and heads) gets `decay ** (depth + 1 - l)`;
- the patch embedding's lr is further multiplied by `patch_embed_lr_mult` (0.2);
- no weight decay on biases, norms and LayerScale gammas; the official code does decay the
  learned tokens (cls / pos / register / mask), the DINOv2 paper's recipe puts no decay on them: `decay_tokens`
  chooses (False by default, True reproduces the official groups exactly);
- parameters of a head's `last_layer` are flagged so the training loop can freeze them early.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

@dataclass
class ParamInfo:
    """Optimiser multipliers of one parameter."""

    name: str
    param: nn.Parameter
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def param_infos(
    module: nn.Module,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    decay_tokens: bool = False,
) -> list[ParamInfo]:
    """Multipliers for every trainable parameter of a backbone or a head.

    Args:
        module: a backbone that exposes `n_blocks`, `layer_id(name)` and `no_weight_decay()`
            (`VisionTransformer`), or any other module such as a head (multipliers 1).
        lr_decay_rate: layer-wise lr decay (0.9 short recipe, 1.0 for ViT-L/g).
        patch_embed_lr_mult: extra lr factor of the patch embedding.
        decay_tokens: apply weight decay to the learned tokens, as the official code does.
    """
    n_blocks = int(getattr(module, "n_blocks", 0))
    layer_id = getattr(module, "layer_id", None)
    no_wd_names: set[str] = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
    infos = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = lr_decay_rate ** (n_blocks + 1 - layer_id(name)) if layer_id is not None else 1.0
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        # 1-D tensors are biases, LayerNorm / BatchNorm parameters and LayerScale gammas.
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name
        if not decay_tokens and name in no_wd_names:
            no_decay = True
        infos.append(ParamInfo(name, param, lr_mult, 0.0 if no_decay else 1.0, "last_layer" in name))
    return infos

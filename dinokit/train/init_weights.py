"""Starting a run from trained weights, and the head warm-up that keeps it from collapsing.

Released DINOv2 backbones come without their heads. Continued pretraining with fresh heads and
the full learning rate lets the random heads' targets drag the backbone away from what it knew
(k-NN falling from ~80 % to ~10 % is reported for the official code). So a run started with
`--init` can first train only the heads (`train.head_warmup_steps`: backbone frozen, so the EMA
teacher's backbone stays equal to the student's) until their targets carry information, and then
bring the backbone in with its lr ramped up from 0 (`train.backbone_lr_warmup_steps`) under the
usual layer-wise decay.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from dinokit.checkpoint.loading import CheckpointError, describe_mismatch, load_into, with_mask_token
from dinokit.checkpoint.sources import read_weights
from dinokit.config import InitConfig
from dinokit.models.vision_transformer import VisionTransformer, resize_pos_embed

__all__ = ["backbone_lr_scale", "fit_pos_embed", "load_initial_weights", "set_backbones_frozen"]

log = logging.getLogger("dinokit.train")


def fit_pos_embed(state: dict[str, Tensor], backbone: VisionTransformer, source: str) -> dict[str, Tensor]:
    """`state` with its positional embedding resized to `backbone`'s grid when only the grid
    differs (e.g. a released 518 px model, 37 x 37, into a 224 px configuration, 16 x 16)."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape == backbone.pos_embed.shape or pos.shape[-1] != backbone.pos_embed.shape[-1]:
        return state
    resized = resize_pos_embed(pos, backbone.pos_grid, backbone.interpolate_antialias)
    log.info("%s: positional embedding resized from %d to %d positions", source, pos.shape[1], resized.shape[1])
    return {**state, "pos_embed": resized}


def load_initial_weights(networks: list[nn.ModuleDict], init: InitConfig) -> list[str]:
    """Load `init.backbone` (and its heads, with `init.heads`) into every network (student and
    teacher); returns the names of the loaded parts. A source that does not fit raises
    CheckpointError naming the missing, unexpected and misshapen keys, before anything is loaded."""
    weights = read_weights(init.backbone)
    source = str(weights.source)
    first = networks[0]["backbone"]
    assert isinstance(first, VisionTransformer)
    plan: dict[str, dict[str, Tensor]] = {"backbone": fit_pos_embed(with_mask_token(first, weights.backbone), first, source)}
    if init.heads:
        plan.update({name: sd for name, sd in weights.heads.items() if name in networks[0]})
    # Check every part against the first network before loading any, so nothing is half-loaded.
    for name, state in plan.items():
        problem = describe_mismatch(networks[0][name], state)
        if problem:
            hint = " (init.heads=false starts fresh heads)" if name != "backbone" else ""
            raise CheckpointError(f"init.backbone {source}: its {name} does not fit the configured model{hint}: {problem}")
    for net in networks:
        for name, state in plan.items():
            load_into(net[name], state, source=f"{source} {name}")
    fresh = [name for name in networks[0] if name not in plan]
    log.info("initialised %s from %s%s", ", ".join(plan), source,
             f"; fresh {', '.join(fresh)}" if fresh else "")
    return list(plan)


def set_backbones_frozen(backbones: list[nn.Module], frozen: bool) -> None:
    """Freeze (no gradients, so AdamW skips them) or unfreeze the student backbones."""
    for backbone in backbones:
        backbone.requires_grad_(not frozen)


def backbone_lr_scale(step: int, head_warmup_steps: int, ramp_steps: int) -> float:
    """Factor on the backbone's lr at 0-based `step`: 0 while the heads warm up, then a linear
    ramp over `ramp_steps` (reaching 1 on its last step), then 1."""
    if step < head_warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - head_warmup_steps + 1) / ramp_steps)

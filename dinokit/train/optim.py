"""AdamW over the student with DINOv2's per-parameter multipliers, and per-step schedule values."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from dinokit.train.param_groups import param_infos


def build_optimizer(
    student: nn.ModuleDict,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    betas: tuple[float, float] = (0.9, 0.999),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW whose groups carry `lr_multiplier`, `wd_multiplier` and `is_last_layer`.

    Parameters with equal multipliers share a group (fewer, larger foreach kernels). Backbone
    parameters get layer-wise decay; head parameters have multiplier 1.
    """
    grouped: dict[tuple[float, float, bool], list[nn.Parameter]] = defaultdict(list)
    for name, module in student.items():
        decay = layerwise_decay if name == "backbone" else 1.0
        pe_mult = patch_embed_lr_mult if name == "backbone" else 1.0
        for info in param_infos(module, decay, pe_mult):
            grouped[(info.lr_multiplier, info.wd_multiplier, info.is_last_layer)].append(info.param)
    groups = [
        {"params": params, "lr_multiplier": lr_m, "wd_multiplier": wd_m, "is_last_layer": last}
        for (lr_m, wd_m, last), params in grouped.items()
    ]
    # lr / weight_decay are set every step by `apply_schedule`; foreach is the CPU fast path.
    kwargs = {"fused": fused} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, **kwargs)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr and weight decay for this step from the schedules and multipliers."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]

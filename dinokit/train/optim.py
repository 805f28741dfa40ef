"""AdamW over the student with DINOv2's per-parameter multipliers, and per-step schedule values."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dinokit.train.param_groups import param_infos


def build_optimizer(
    student: Mapping[str, nn.Module],
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    betas: tuple[float, float] = (0.9, 0.999),
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW whose groups carry `lr_multiplier`, `wd_multiplier`, `is_last_layer` and `is_backbone`.

    `student` maps names to the trained modules (`SSLModel.trainable()`): backbones (modules with
    blocks, `n_blocks`) get layer-wise decay and the patch-embedding factor; heads multiplier 1.
    Parameters with equal multipliers share a group (fewer, larger kernels). `fused=None` picks
    the fused kernel where every parameter has one, else foreach. Build it before freezing
    anything: frozen parameters (no `requires_grad`) are left out.
    """
    grouped: dict[tuple[float, float, bool, bool], list[nn.Parameter]] = defaultdict(list)
    for module in student.values():
        is_backbone = hasattr(module, "n_blocks")
        decay = layerwise_decay if is_backbone else 1.0
        pe_mult = patch_embed_lr_mult if is_backbone else 1.0
        for info in param_infos(module, decay, pe_mult):
            grouped[(info.lr_multiplier, info.wd_multiplier, info.is_last_layer, is_backbone)].append(info.param)
    groups = [
        {"params": params, "lr_multiplier": lr_m, "wd_multiplier": wd_m, "is_last_layer": last, "is_backbone": bb}
        for (lr_m, wd_m, last, bb), params in grouped.items()
    ]
    if fused is None:
        # PyTorch's single-kernel AdamW where it has one for every parameter (plain CPU / CUDA
        # tensors): one kernel per group instead of a dozen foreach launches. FSDP's DTensor
        # shards keep foreach.
        fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                    for group in groups for p in group["params"])
    # lr / weight_decay are set every step by `apply_schedule`.
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, **kwargs)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float,
                   backbone_lr_scale: float = 1.0) -> None:
    """Set each group's lr and weight decay for this step from the schedules and multipliers;
    `backbone_lr_scale` multiplies the backbones' lr (the ramp after a head warm-up)."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        scale = backbone_lr_scale if group.get("is_backbone", False) else 1.0
        group["lr"] = base * group["lr_multiplier"] * scale
        group["weight_decay"] = wd * group["wd_multiplier"]


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so that their joint L2 norm is at most `max_norm`; returns the norm.

    `torch.nn.utils.clip_grad_norm_`, made safe for FSDP's sharded gradients as torchtitan does:
    the norm of DTensor shards is a partial DTensor that must be reduced to the full norm
    (`full_tensor()`, an all_reduce) before the clip coefficient is taken.
    """
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total

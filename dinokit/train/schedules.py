"""Per-iteration schedules of DINOv2 training (lr, weight decay, teacher momentum / temperature).

Everything is precomputed in float64 numpy, exactly like `dinov2.utils.utils.CosineScheduler`, so
the values match the official ones to the last bit: [freeze zeros | linear warmup (endpoint
included) | half-cosine from base to final]; any index past the end returns `final_value`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["CosineScheduler", "DinoSchedules", "build_schedules", "scaled_lr"]

ScalingRule = Literal["sqrt_wrt_1024", "linear_wrt_256"]


class CosineScheduler:
    """A precomputed schedule of length `total_iters`.

    Layout: `freeze_iters` zeros, then `np.linspace(start_warmup_value, base_value, warmup_iters)`
    (endpoint INCLUDED, so the last warmup step already equals base_value), then
    `final + 0.5 * (base - final) * (1 + cos(pi * i / n))` for i in 0..n-1 with
    n = total - warmup - freeze (so the cosine never quite reaches final_value inside the schedule).

    Args:
        base_value: value after warmup / at the start of the cosine.
        final_value: value the cosine tends to; returned for every index >= total_iters.
        total_iters: schedule length (freeze + warmup + cosine).
        warmup_iters: length of the linear warmup.
        start_warmup_value: first value of the warmup.
        freeze_iters: leading iterations at exactly 0.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
    ) -> None:
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed total_iters ({total_iters})"
            )
        self.final_value = final_value
        self.total_iters = int(total_iters)
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        # Same expression and operation order as the official code (bitwise parity in float64).
        # With an empty cosine part (pure warmup schedules) the division by len 0 never runs.
        if len(iters) > 0:
            cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
        else:
            cosine = np.zeros(0)
        self.schedule: np.ndarray = np.concatenate((freeze, warmup, cosine))  # float64 (total_iters,)
        assert len(self.schedule) == self.total_iters

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, it: int) -> float:
        """Value at iteration `it` (final_value for it >= total_iters)."""
        if it >= self.total_iters:
            return float(self.final_value)
        return float(self.schedule[it])


@dataclass
class DinoSchedules:
    """The five schedules of a DINOv2 run, indexed by global iteration."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, it: int) -> dict[str, float]:
        """All five values at iteration `it`."""
        return {
            "lr": self.lr[it],
            "wd": self.wd[it],
            "momentum": self.momentum[it],
            "teacher_temp": self.teacher_temp[it],
            "last_layer_lr": self.last_layer_lr[it],
        }


def scaled_lr(base_lr: float, global_batch_size: int, rule: ScalingRule = "sqrt_wrt_1024") -> float:
    """Learning rate scaled with the global batch size.

    DINOv2 (`sqrt_wrt_1024`): `base_lr * sqrt(batch / 1024)`; DINO v1 (`linear_wrt_256`):
    `base_lr * batch / 256`. Written as the official in-place multiplication for parity.
    """
    lr = base_lr
    if rule == "sqrt_wrt_1024":
        lr *= math.sqrt(global_batch_size / 1024.0)
    elif rule == "linear_wrt_256":
        lr *= global_batch_size / 256.0
    else:
        raise ValueError(f"unknown lr scaling rule {rule!r}")
    return lr


def build_schedules(
    *,
    epochs: int,
    epoch_length: int,
    lr: float,
    min_lr: float,
    warmup_epochs: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    teacher_temp: float,
    warmup_teacher_temp: float,
    warmup_teacher_temp_epochs: int,
    freeze_last_layer_epochs: int,
) -> DinoSchedules:
    """The DINOv2 schedules from plain numbers (as the official `build_schedulers`).

    Args:
        epochs: number of "epochs"; in DINOv2 an epoch is `epoch_length` iterations, not a data pass.
        epoch_length: iterations per epoch (official OFFICIAL_EPOCH_LENGTH, 1250).
        lr: peak lr, already scaled with the batch size (see `scaled_lr`).
        min_lr: final lr of the cosine.
        warmup_epochs: linear lr warmup from 0.
        weight_decay, weight_decay_end: cosine from the first to the second (no warmup).
        momentum_teacher, final_momentum_teacher: EMA momentum cosine, e.g. 0.992 -> 1.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: linear warmup of the
            teacher temperature (e.g. 0.04 -> 0.07 over 30 epochs), then constant.
        freeze_last_layer_epochs: the heads' last layer gets lr 0 for these epochs.
    """
    total = epochs * epoch_length
    lr_kwargs = dict(
        base_value=lr,
        final_value=min_lr,
        total_iters=total,
        warmup_iters=warmup_epochs * epoch_length,
        start_warmup_value=0,
    )
    last_layer_lr = CosineScheduler(**lr_kwargs)
    # Official behaviour: overwrite (not prepend) the first epochs with 0, so the unfrozen part
    # continues the regular lr schedule rather than restarting the warmup.
    last_layer_lr.schedule[: freeze_last_layer_epochs * epoch_length] = 0
    warm_tt = warmup_teacher_temp_epochs * epoch_length
    return DinoSchedules(
        lr=CosineScheduler(**lr_kwargs),
        wd=CosineScheduler(weight_decay, weight_decay_end, total),
        momentum=CosineScheduler(momentum_teacher, final_momentum_teacher, total),
        # Pure linear warmup (total == warmup): endpoint included, then teacher_temp forever.
        teacher_temp=CosineScheduler(
            teacher_temp, teacher_temp, warm_tt, warmup_iters=warm_tt, start_warmup_value=warmup_teacher_temp
        ),
        last_layer_lr=last_layer_lr,
    )

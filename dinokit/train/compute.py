"""Compute options of the training step: sequence packing, activation checkpointing, torch.compile.

None of them changes what is computed, only how (up to float rounding); `bench/packing.py` and
`bench/train_step.py` measure them. Set from the `train` section of the config:

    train.packing=auto|true|false        # student crops through the blocks as one packed sequence
    train.activation_checkpointing=true  # per block, recomputed in the backward pass
    train.compile=true                   # torch.compile every block of student and teacher
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from dinokit.config import TrainConfig

if TYPE_CHECKING:
    from dinokit.train.distill import DistillModel
    from dinokit.train.ssl_model import SSLModel

M = TypeVar("M", "SSLModel", "DistillModel")


def packing_enabled(train: TrainConfig) -> bool:
    """`train.packing` resolved: `auto` is on for CUDA and off elsewhere. On CPU, packing measured
    slower than separate forwards (bench/results/packing_cpu_tiny.json and packing_cpu_vits14.json:
    the per-token ops run on larger matrices, which the CPU's caches and allocator handle worse),
    so it stays off."""
    if train.packing == "auto":
        return train.device.startswith("cuda") or (train.device == "auto" and _cuda_available())
    return bool(train.packing)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def apply_compute_options(model: M, train: TrainConfig) -> M:
    """Set packing and activation checkpointing on the student backbone and compile the blocks
    of both backbones when asked. The teacher never needs checkpointing (it runs without
    gradients) and never sees more than one crop size (no packing)."""
    for backbone in model.student_backbones():
        backbone.packing = packing_enabled(train)
        backbone.activation_checkpointing = train.activation_checkpointing
    if train.compile:
        # Block by block, in place (`nn.Module.compile`): parameter names stay those of the
        # official checkpoints, and all blocks of a backbone share one compiled graph.
        for net in model.networks():
            for block in net["backbone"].blocks:
                block.compile()
    return model

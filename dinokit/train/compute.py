"""Compute options of the training step: sequence packing, activation checkpointing, torch.compile.

None of them changes what is computed, only how (up to float rounding); `bench/packing.py` and
`bench/train_step.py` measure them. Set from the `train` section of the config:

    train.packing=auto|true|false        # student crops through the blocks as one packed sequence
    train.activation_checkpointing=true  # per block, recomputed in the backward pass
    train.compile=true|blocks|step       # torch.compile every block, or the whole model call
    train.tf32=true                      # CUDA: float32 matmuls / convolutions on TF32 tensor cores
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from dinokit.config import TrainConfig

if TYPE_CHECKING:
    import torch

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


def configure_float32_math(device: "torch.device", tf32: bool) -> None:
    """On CUDA, let float32 matmuls and cuDNN convolutions use TF32 (`train.tf32`): PyTorch's
    default keeps them in full float32, which leaves an Ampere-or-later GPU's tensor cores idle
    in fp32 runs. Autocast runs are unaffected (their matmuls are bf16 / fp16). Nothing changes on
    CPU, where "high" precision could mean bfloat16 passes in oneDNN."""
    import torch

    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def apply_compute_options(model: M, train: TrainConfig) -> M:
    """Set packing and activation checkpointing on the student backbone and compile the blocks
    of both backbones when asked. The teacher never needs checkpointing (it runs without
    gradients) and never sees more than one crop size (no packing)."""
    for backbone in model.student_backbones():
        backbone.packing = packing_enabled(train)
        backbone.activation_checkpointing = train.activation_checkpointing
    if train.compile == "step":
        # The whole model call in place (`nn.Module.compile`): parameter names unchanged. The
        # number of masked patches changes from batch to batch; after the first recompilation
        # that dimension is dynamic. The training step passes the teacher temperature as a
        # tensor, so its schedule does not recompile.
        model.compile()
    elif train.compile:
        # Block by block, in place (`nn.Module.compile`): parameter names stay those of the
        # official checkpoints, and all blocks of a backbone share one compiled graph.
        for net in model.networks():
            for block in net["backbone"].blocks:
                block.compile()
    return model

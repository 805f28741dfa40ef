"""Data parallelism for the SSL model: DDP or FSDP2, applied from outside the model code.

The model (`dinokit.train.ssl_model.SSLModel`) knows nothing of parallelism; this module is the
one place that does, as torchtitan's `parallelize` functions:

- `ddp`: the whole SSLModel is wrapped by `DistributedDataParallel`, so the training forward goes
  through DDP's hooks; the teacher's parameters do not require gradients, so DDP neither reduces
  nor tracks them (the EMA keeps the replicas equal: every rank applies the same update). A
  `reduce_dtype` below float32 installs DDP's bf16 / fp16 gradient-compression hook.
- `fsdp`: FSDP2 `fully_shard` on every backbone block and every head of the student AND of the
  teacher, then on the SSLModel as the root, which owns the remaining small parameters
  (patch embedding, tokens, final norm). The teacher is sharded exactly like the student, so the
  EMA `teacher <- m teacher + (1 - m) student` runs on matching local shards (foreach over
  DTensors, no communication). Mixed precision: parameters are gathered in `param_dtype` for
  compute, gradients are reduce-scattered in `reduce_dtype`, the optimizer updates float32
  shards (the master weights); heads return float32 so the losses and Sinkhorn-Knopp run in
  float32. The batch is cast to `param_dtype` by the collate (the root does not cast inputs, so
  small float tensors such as iBOT's mask weights keep float32).

Call it after moving the model to its device and before building the optimizer (FSDP replaces
the parameters by sharded DTensors; the optimizer must hold those).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from dinokit.config import DistributedConfig
from dinokit.distributed.env import DistEnv

__all__ = ["DTYPES", "parallelize", "sync_batchnorm"]

log = logging.getLogger("dinokit.train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parallelize(model: nn.Module, cfg: DistributedConfig, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    """Apply `cfg.strategy` to an SSLModel in place (FSDP) or around it (DDP).

    Args:
        model: an `SSLModel` already on `env.device`, with `student` / `teacher` ModuleDicts of
            `backbone` (with `blocks`) and heads.
        cfg: strategy and dtypes.
        env: this process's rank, world size and device; needs a process group unless the
            strategy is `none`.
        find_unused_parameters: DDP's option, for runs where some parameters get no gradient
            in some steps (a frozen backbone during a head warm-up).

    Returns:
        The module to call for the training forward: the DDP wrapper, or `model` itself (FSDP
        changes `model` in place; `none` leaves it alone). Everything else (EMA, checkpoints,
        clipping) uses `model`.
    """
    if cfg.strategy == "none":
        return model
    if not env.distributed:
        raise RuntimeError(f"train.distributed.strategy {cfg.strategy!r} needs a process group (launch with torchrun)")
    sync_batchnorm(model, env.device.type)
    if cfg.strategy == "ddp":
        return _apply_ddp(model, cfg, env, find_unused_parameters)
    _apply_fsdp(model, cfg, env)
    return model


def sync_batchnorm(model: nn.Module, device_type: str) -> bool:
    """BatchNorm statistics over the global batch, as DINO trains its ResNet-50: every BatchNorm of
    the student and teacher networks becomes a SyncBatchNorm. PyTorch's SyncBatchNorm runs on
    GPUs only; on CPU processes (gloo) the statistics stay per process, with a warning. Returns
    whether anything was converted (False: no BatchNorm, or not on a GPU)."""
    nets = model.networks() if hasattr(model, "networks") else [model]
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for net in nets for m in net.modules())
    if not has_bn:
        return False
    if device_type == "cpu":
        log.warning("BatchNorm statistics stay per process: PyTorch's SyncBatchNorm needs GPUs")
        return False
    for net in nets:
        for name, child in list(net.named_children()):
            net.add_module(name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return True


def _apply_ddp(model: nn.Module, cfg: DistributedConfig, env: DistEnv, find_unused_parameters: bool) -> nn.Module:
    ddp = DistributedDataParallel(
        model,
        find_unused_parameters=find_unused_parameters,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        **_no_forward_buffer_sync(),
    )
    if cfg.reduce_dtype == "bfloat16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif cfg.reduce_dtype == "float16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's option for not broadcasting buffers before every forward: the only buffers are the
    loss centers, kept equal by their own all_reduce (and equal at init). Newer PyTorch names it
    `forward_sync_buffers` (and deprecates `broadcast_buffers=False`, which also skips the
    broadcast at init); older releases have only `broadcast_buffers`."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _apply_fsdp(model: nn.Module, cfg: DistributedConfig, env: DistEnv) -> None:
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    param, reduce = DTYPES[cfg.param_dtype], DTYPES[cfg.reduce_dtype]
    blocks_mp = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
    heads_mp = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce, output_dtype=torch.float32)
    root_mp = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce, cast_forward_inputs=False)
    # Every backbone + heads network: student and EMA teacher, or each distillation student and
    # its spare EMA. A distillation's frozen teacher is no child of the model: it stays a full
    # replica on every rank.
    for net in model.networks():  # type: ignore[operator]
        for block in net["backbone"].blocks:
            fully_shard(block, mesh=mesh, mp_policy=blocks_mp)
        for name, head in net.items():
            if name != "backbone":
                fully_shard(head, mesh=mesh, mp_policy=heads_mp)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)

"""Process-group setup from torchrun's environment, rank helpers, device and backend choice.

    torchrun --nproc_per_node=2 -m dinokit.cli train DATA --out RUN ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `distributed_env` reads
them, picks the device (cuda:LOCAL_RANK on CUDA, else the CPU) and the backend (nccl on CUDA, gloo
on CPU), starts the default process group and destroys it on exit. Without those variables it
starts nothing and describes a single process, so one code path runs anywhere (the nanoGPT way).
A process group that already exists (e.g. made by a test harness) is used as it is and left alone.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from dinokit.config import ConfigError

__all__ = ["DistEnv", "choose_backend", "cuda_unavailable_reason", "distributed_env", "reduce_sum", "resolve_device"]

log = logging.getLogger("dinokit.distributed")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: `rank` of `world_size`, `local_rank` on its node, its `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"
    # A gloo group over the same ranks for host-side collectives (counts from the loader) when
    # the default group is nccl; None: the default group serves (gloo, or one process).
    host_group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes metrics and exports; every rank computes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group exists, so collectives must be called (also with one rank)."""
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def cuda_unavailable_reason() -> str:
    """Why `torch.cuda.is_available()` is False, in words a user can act on."""
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA; install a CUDA build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"this PyTorch ({torch.__version__}) is built for CUDA {torch.version.cuda} but sees no usable GPU "
            f"(CUDA_VISIBLE_DEVICES={visible!r}): no GPU in this process, or an NVIDIA driver older "
            f"than CUDA {torch.version.cuda} needs (check `nvidia-smi`)")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` to a device: auto -> CUDA when available; a bare `cuda` -> cuda:LOCAL_RANK.
    Asking for CUDA where there is none is an error, never a silent fall back to the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name!r}, but CUDA is not available: {cuda_unavailable_reason()}")
        index = local_rank if name == "cuda" else torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name!r} (local rank {local_rank}) needs GPU {index}, but "
                              f"{torch.cuda.device_count()} are visible")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def choose_backend(device: torch.device, requested: str = "auto") -> str:
    """The process-group backend: `auto` is nccl on CUDA and gloo elsewhere; nccl without CUDA
    is an error naming why CUDA is missing."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        reason = cuda_unavailable_reason() if not torch.cuda.is_available() else f"train.device is {device}"
        raise ConfigError(f"train.distributed.backend='nccl' needs CUDA devices: {reason}")
    return requested


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def distributed_env(device_name: str = "auto", backend: str = "auto") -> Iterator[DistEnv]:
    """The environment of this process, with the default process group started if torchrun
    launched it (and destroyed on exit); see the module docstring. Under torchrun, `auto` on a
    machine whose CUDA is unusable runs CPU processes with gloo and says so in a warning."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        device = resolve_device(device_name, local_rank)
        yield DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
        return
    if not _launched_by_torchrun():
        yield DistEnv(device=resolve_device(device_name))
        return
    device = resolve_device(device_name, local_rank)
    backend = choose_backend(device, backend)
    if device.type == "cpu" and device_name == "auto" and int(os.environ.get("RANK", "0")) == 0:
        log.warning("train.device=auto under torchrun: CUDA is not available (%s); running %s CPU "
                    "process(es) with %s. Set train.device=cuda to make this an error.",
                    cuda_unavailable_reason(), os.environ.get("WORLD_SIZE"), backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    try:
        host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        yield DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, host_group)
    finally:
        dist.destroy_process_group()


def reduce_sum(values: Tensor, group: Any = None) -> Tensor:
    """Sum of a tensor over the ranks of `group` (default: all), as a new tensor; the input itself
    when there is no process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    out = values.clone()
    dist.all_reduce(out, group=group)
    return out

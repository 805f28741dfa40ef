"""Process-group setup from torchrun's environment, rank helpers, device and backend choice.

    torchrun --nproc_per_node=2 -m dinokit.cli train DATA --out RUN ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. `distributed_env` reads
them, picks the device (cuda:LOCAL_RANK on CUDA, else the CPU) and the backend (nccl on CUDA, gloo
on CPU), starts the default process group and destroys it on exit. Without those variables it
starts nothing and describes a single process, so one code path runs anywhere (the nanoGPT way).
A process group that already exists (e.g. made by a test harness) is used as it is and left alone.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistEnv", "distributed_env", "reduce_sum", "resolve_device"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: `rank` of `world_size`, `local_rank` on its node, its `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`train.device` to a device: auto -> CUDA when available; a bare `cuda` -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def distributed_env(device_name: str = "auto") -> Iterator[DistEnv]:
    """The environment of this process, with the default process group started if torchrun
    launched it (and destroyed on exit); see the module docstring."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        device = resolve_device(device_name, local_rank)
        yield DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)
        return
    if not _launched_by_torchrun():
        yield DistEnv(device=resolve_device(device_name))
        return
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # nccl has not run on a GPU yet (see docs/distributed.md); it is the standard choice.
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)
    finally:
        dist.destroy_process_group()


def reduce_sum(values: Tensor) -> Tensor:
    """Sum of a tensor over ranks (a new tensor; the input itself when there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out

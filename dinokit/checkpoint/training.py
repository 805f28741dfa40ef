"""Training checkpoints: written atomically, the last few kept, resumable on any world size.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` in one of two layouts:

- one process (no process group): `state.pt`, one `torch.save` file holding `student`, `teacher`,
  `dino_loss`, `ibot_loss` (state dicts), `optimizer`, `step`, `samples_consumed`,
  `skipped_images`, `world_size` and `rng`; plain tensors and Python values, so it loads with
  `torch.load(weights_only=True)`;
- a process group (torchrun; DDP or FSDP): a torch.distributed.checkpoint (DCP) folder, `.metadata`
  plus one `__R_0.distcp` file per rank holding the model and optimizer state (FSDP shards are
  written as shards, by their owners, in parallel), `trainer.pt` (step, data position, world size)
  and `rng_rankR.pt` (each rank's random streams).

Both hold the model and the optimizer as `torch.distributed.checkpoint.state_dict` gives them:
keyed by parameter name, not by position or rank. So either layout resumes on any world size and
strategy: DCP reshards on load; a `state.pt` is distributed by `set_state_dict`. Random streams are
restored only when the world size is unchanged (only stochastic depth draws from them).

Every checkpoint is written into a hidden temporary folder first and renamed into place by rank 0
after all ranks finished, so a crash mid-write never leaves a folder that looks complete. On several
nodes the run folder must be on a filesystem that every node sees.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from dinokit.checkpoint.loading import CheckpointError
from dinokit.distributed.env import DistEnv

__all__ = [
    "checkpoint_dirs",
    "checkpoint_step",
    "export_backbone",
    "full_state_dict",
    "latest_checkpoint",
    "load_training_state",
    "rng_state",
    "save_training_state",
    "set_rng_state",
]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TRAINER_KEYS = ("step", "samples_consumed", "skipped_images")


def _complete(folder: Path) -> bool:
    return (folder / "state.pt").is_file() or (folder / "trainer.pt").is_file()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and _complete(p)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder (`step_XXXXXXXX`) was written at."""
    return int(folder.name[5:])


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict[str, Any]:
    """Every random stream the training process draws from (workers seed themselves per batch)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ saving


def save_training_state(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, int],
    config_yaml: str,
    keep: int,
    env: DistEnv,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep`. Every rank calls it.

    Args:
        model: the SSL model (unwrapped: not the DDP wrapper; FSDP modules are fine).
        optimizer: its optimizer.
        trainer: `step`, `samples_consumed` (global), `skipped_images` (global).
        config_yaml: the resolved configuration, saved beside the state.
        env: this process's rank and world size.
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    meta = {**{k: int(trainer[k]) for k in _TRAINER_KEYS}, "world_size": env.world_size}
    if not env.distributed:
        state = {**_split_by_child(model, model_sd), "optimizer": optim_sd, **meta, "rng": rng_state()}
        torch.save(state, tmp / "state.pt")
    else:
        env.barrier()  # the folder exists
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
        env.barrier()  # every rank's files are written
        if env.is_main:
            torch.save(meta, tmp / "trainer.pt")
    if env.is_main:
        (tmp / "config.yaml").write_text(config_yaml)
        _fsync_dir(tmp)
        if final.exists():  # re-writing the same step (e.g. final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    env.barrier()  # nobody looks for the checkpoint before it is in place
    return final


def _split_by_child(model: nn.Module, model_sd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"student.x": t, "teacher.y": u}` -> `{"student": {"x": t}, "teacher": {"y": u}}`."""
    out: dict[str, dict[str, Any]] = {name: {} for name, _ in model.named_children()}
    for key, value in model_sd.items():
        child, _, rest = key.partition(".")
        out.setdefault(child, {})[rest] = value
    return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------------------------------ loading


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Load checkpoint `path` (either layout, any world size) into `model` and `optimizer`.

    Every rank calls it. Returns `step`, `samples_consumed`, `skipped_images`, `world_size` (of the
    run that wrote it) and `rng` (this rank's random streams, or None when the world size changed).
    """
    try:
        if (path / "state.pt").is_file():
            return _load_single_file(path, model, optimizer, env)
        return _load_dcp(path, model, optimizer, env)
    except CheckpointError:
        raise
    except Exception as exc:  # any failure to read is reported with the folder
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def _load_single_file(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    children = [name for name, _ in model.named_children()]
    model_sd = {f"{c}.{k}": v for c in children if c in state for k, v in state[c].items()}
    optim_sd = state["optimizer"]
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=full)
    if all(isinstance(k, int) for k in optim_sd.get("state", {})) and optim_sd.get("state"):
        # Written before checkpoints keyed the optimizer by parameter name: positional ids.
        if env.distributed:
            raise CheckpointError(f"{path} was written by an older dinokit; resume it once on one process first")
        optimizer.load_state_dict(optim_sd)
    else:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=full)
    saved_world = int(state.get("world_size", 1))
    return {**{k: int(state[k]) for k in _TRAINER_KEYS}, "world_size": saved_world,
            "rng": state["rng"] if saved_world == env.world_size else None}


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    meta = torch.load(path / "trainer.pt", weights_only=True)
    # The current (possibly sharded) state is the template DCP fills in, resharding as needed.
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        # One process reading a sharded checkpoint is intended here, not a forgotten init.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=path, no_dist=not env.distributed)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optim"])
    rng = None
    rng_file = path / f"rng_rank{env.rank}.pt"
    if int(meta["world_size"]) == env.world_size and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
    return {**{k: int(meta[k]) for k in _TRAINER_KEYS}, "world_size": int(meta["world_size"]), "rng": rng}


# ------------------------------------------------------------------------------------ exports


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with FSDP shards gathered into full CPU tensors.

    A collective when the module is sharded: every rank must call it, in the same order.
    """
    out = {}
    for key, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu()
    return out


def export_backbone(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a backbone state dict as safetensors atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

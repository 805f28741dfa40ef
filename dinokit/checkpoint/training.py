"""Training checkpoints: written atomically, the last few kept, found again on resume.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding `state.pt` (student, teacher,
optimiser, loss centers, step, RNG states) and `config.yaml`. It is written into a hidden
temporary folder first and renamed into place, so a crash mid-write never leaves a checkpoint
that looks complete. Everything in `state.pt` is tensors and plain Python values, so it loads
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dinokit.checkpoint.loading import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


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


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], config_yaml: str, keep: int) -> Path:
    """Write `state` atomically as checkpoint `step` and delete all but the newest `keep`."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    _fsync_dir(tmp)
    if final.exists():  # re-writing the same step (e.g. final step after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint folder's state without executing code from it."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


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

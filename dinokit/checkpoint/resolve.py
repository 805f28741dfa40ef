"""One way to name a backbone on the command line: a run folder, a checkpoint file or an architecture.

- a `dinokit train` run folder: its `config.yaml` gives the architecture and
  `teacher_backbone.safetensors` the weights (the EMA teacher is the model that is released),
  with the positional grid and evaluation size of a high-resolution phase once it ran; a
  distillation student's folder (`RUN/students/NAME`) is one too;
- a Hugging Face transformers DINOv2 folder or a timm DINOv2 folder (`dinokit export` writes
  both): the architecture from its `config.json` (see `dinokit.checkpoint.foreign`);
- a checkpoint file (`.pth` / `.safetensors`: official, dinokit, or a state dict in timm's or
  transformers' names) together with `arch`;
- a named architecture (`dinov2_vits14`, ...) alone: random initialisation, for baselines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from dinokit.checkpoint.foreign import is_foreign_folder, not_a_backbone_folder, read_foreign_folder
from dinokit.checkpoint.loading import CheckpointError, backbone_state_dict, load_into, read_checkpoint, with_mask_token
from dinokit.models.builders import OFFICIAL_NAMES, build_official
from dinokit.models.vision_transformer import VisionTransformer


@dataclass
class ResolvedBackbone:
    """A backbone ready for inference and what is known about how it was trained.

    Attributes:
        model: the backbone in eval mode.
        source: human-readable description (path or name, and whether weights were loaded).
        image_size: evaluation crop size: the training global crop size of a run, else 224
            (the official evaluation protocol's centre crop).
    """

    model: VisionTransformer
    source: str
    image_size: int


def resolve_backbone(spec: str | Path, arch: str | None = None, random_init: bool = False) -> ResolvedBackbone:
    """Build and load the backbone named by `spec` (see the module docstring).

    Args:
        spec: run folder, checkpoint file, or architecture name.
        arch: architecture for a checkpoint file (default `dinov2_vits14`).
        random_init: for a run folder, keep the architecture but skip the weights (baseline).
            Random weights (here and for an architecture name) are drawn from seed 0, so that a
            random-init baseline is the same network in every run; the global RNG is left as it was.
    """
    path = Path(spec)
    if path.is_dir() and not (path / "config.yaml").is_file() and is_foreign_folder(path):
        foreign = read_foreign_folder(path)
        model = _seeded(foreign.args.build) if random_init else foreign.args.build()
        if random_init:
            return ResolvedBackbone(model.eval(), f"{path} architecture (random initialisation)", foreign.image_size or 224)
        load_into(model, with_mask_token(model, foreign.state), source=f"{path} ({foreign.library})")
        return ResolvedBackbone(model.eval(), f"{path} ({foreign.library})", foreign.image_size or 224)
    if path.is_dir():
        return _from_run(path, random_init)
    if path.is_file():
        name = arch or "dinov2_vits14"
        if name not in OFFICIAL_NAMES:
            raise CheckpointError(f"unknown --arch {name!r}; known: {', '.join(OFFICIAL_NAMES)}")
        model = build_official(name)
        state = with_mask_token(model, backbone_state_dict(read_checkpoint(path)))
        _fit_grid(model, state)
        load_into(model, state, source=str(path))
        return ResolvedBackbone(model.eval(), f"{path} ({name})", 224)
    if str(spec) in OFFICIAL_NAMES:
        model = _seeded(lambda: build_official(str(spec)))
        return ResolvedBackbone(model.eval(), f"{spec} (random initialisation)", 224)
    raise CheckpointError(
        f"{spec} is neither a run folder, a transformers / timm folder, a checkpoint file nor an architecture name "
        f"({', '.join(OFFICIAL_NAMES)})"
    )


_Model = TypeVar("_Model", bound=nn.Module)


def _seeded(build: Callable[[], _Model], seed: int = 0) -> _Model:
    """`build()` with its random weights drawn from `seed`, the caller's RNG state kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _from_run(run_dir: Path, random_init: bool) -> ResolvedBackbone:
    from dinokit.config import backbone_from_config, load_config_file

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise not_a_backbone_folder(run_dir)
    cfg = load_config_file(config_path)
    if cfg.distill.teacher:
        names = ", ".join(sorted(p.name for p in (run_dir / "students").iterdir())) if (run_dir / "students").is_dir() else ""
        raise CheckpointError(f"{run_dir} is a distillation run: name one of its students, {run_dir}/students/NAME"
                              + (f" ({names})" if names else ""))
    build = lambda: backbone_from_config(cfg.model, use_mask_token=cfg.loss.mode != "dino")  # noqa: E731
    model = _seeded(build) if random_init else build()
    weights = run_dir / "teacher_backbone.safetensors"
    image_size = cfg.crops.global_size
    if random_init:
        source = f"{run_dir} architecture (random initialisation)"
    else:
        if not weights.is_file():
            raise CheckpointError(f"{weights} does not exist: the run has not written a checkpoint yet")
        state = backbone_state_dict(read_checkpoint(weights))
        grid = _fit_grid(model, state)  # written after a resolution switch (highres): that phase's grid
        if grid is not None and cfg.highres.global_size == grid * model.patch_size:
            image_size = cfg.highres.global_size
        load_into(model, state, source=str(weights))  # the tensors read above, not the file again
        source = str(weights)
    return ResolvedBackbone(model.eval(), source, image_size)


def _fit_grid(model: VisionTransformer, state: dict) -> int | None:
    """Give `model` the positional grid stored in `state` when it differs (another training size
    than the architecture's default); returns that grid's side, or None when it already fits."""
    pos = state.get("pos_embed")
    if pos is None or not hasattr(model, "pos_embed") or pos.shape == model.pos_embed.shape or pos.dim() != 3 or pos.shape[-1] != model.embed_dim:
        return None  # a wrong width is left for load_into to name
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        return None
    model.resize_pos_embed_(grid * model.patch_size)
    return grid

"""Trained weights to start from: a backbone and, where the source has them, its DINO / iBOT heads.

`read_weights(spec)` accepts what `dinokit train --init` and `dinokit distill --teacher` take:

- a `dinokit train` run folder: `config.yaml` (architecture), `teacher_backbone.safetensors`
  (the EMA teacher's backbone) and the teacher's heads from the newest checkpoint (single-file or
  sharded);
- an official DINOv2 training checkpoint (`{"model": {"teacher": ...}}`, chunked blocks, heads);
- an official hub backbone (`dinov2_vits14_pretrain.pth`), a DINO v1 checkpoint, any
  safetensors backbone, a transformers or timm DINOv2 folder or state dict: no heads.

Nothing executes code from a file (see `dinokit.checkpoint.loading`). Head sizes are read off the
tensors' shapes, so heads of any size load into a `DINOHead` built from `head_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dinokit.checkpoint.foreign import is_foreign_folder, not_a_backbone_folder, read_foreign_folder
from dinokit.checkpoint.loading import (
    CheckpointError,
    backbone_state_dict,
    head_state_dicts,
    read_checkpoint,
)
from dinokit.checkpoint.training import latest_checkpoint
from dinokit.models.dino_head import remap_head_keys

__all__ = ["HeadShape", "TrainedWeights", "read_weights"]

HEAD_NAMES = ("dino_head", "ibot_head")


@dataclass(frozen=True)
class HeadShape:
    """Sizes of a DINOHead read off its weights (what `HeadConfig` needs)."""

    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int


@dataclass
class TrainedWeights:
    """A backbone state dict in dinokit / hub key names, its heads, and where they came from.

    Attributes:
        source: the path given.
        backbone: backbone tensors.
        heads: `dino_head` / `ibot_head` state dicts (legacy weight-norm names), possibly empty.
        run_config: the run's `config.yaml` path when the source is a run folder, else None.
    """

    source: Path
    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    run_config: Path | None = None

    def head_shape(self, name: str) -> HeadShape:
        return head_shape(self.heads[name], f"{self.source} {name}")


def read_weights(spec: str | Path) -> TrainedWeights:
    """The backbone (and heads) of a run folder or checkpoint file; CheckpointError says why not."""
    path = Path(spec)
    if path.is_dir() and not (path / "config.yaml").is_file() and is_foreign_folder(path):
        return TrainedWeights(path, read_foreign_folder(path).state)
    if path.is_dir():
        return _from_run(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    ckpt = read_checkpoint(path)
    backbone = backbone_state_dict(ckpt)
    heads = {k: remap_head_keys(v) for k, v in head_state_dicts(ckpt).items() if k in HEAD_NAMES}
    if not backbone:
        raise CheckpointError(f"{path} holds no backbone tensors")
    return TrainedWeights(path, backbone, heads)


def _from_run(run_dir: Path) -> TrainedWeights:
    config = run_dir / "config.yaml"
    weights = run_dir / "teacher_backbone.safetensors"
    if not config.is_file():
        raise not_a_backbone_folder(run_dir)
    if (run_dir / "students").is_dir() and not weights.is_file():
        names = ", ".join(sorted(p.name for p in (run_dir / "students").iterdir()))
        raise CheckpointError(f"{run_dir} is a distillation run: name one of its students, "
                              f"{run_dir}/students/NAME ({names})")
    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist: the run has not written a checkpoint yet")
    backbone = backbone_state_dict(read_checkpoint(weights))
    ckpt = latest_checkpoint(run_dir)
    heads = _run_heads(ckpt) if ckpt is not None else {}
    return TrainedWeights(run_dir, backbone, heads, config)


def _run_heads(ckpt: Path) -> dict[str, dict[str, Tensor]]:
    """The EMA teacher's heads of a training checkpoint folder (either layout)."""
    if (ckpt / "state.pt").is_file():
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        teacher = state.get("teacher", {})
    else:
        teacher = _dcp_teacher_heads(ckpt)
    heads: dict[str, dict[str, Tensor]] = {}
    for key, value in teacher.items():
        first, _, rest = key.partition(".")
        if first in HEAD_NAMES:
            heads.setdefault(first, {})[rest] = value
    return {k: remap_head_keys(v) for k, v in heads.items()}


def _dcp_teacher_heads(ckpt: Path) -> dict[str, Tensor]:
    """Read only the teacher's head tensors of a sharded (DCP) checkpoint, on one process."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    wanted = {k: v for k, v in meta.items()
              if isinstance(v, TensorStorageMetadata) and k.split(".")[:2] in (["model", "teacher"],)
              and k.split(".")[2] in HEAD_NAMES}
    state = {"model": {k[len("model."):]: torch.empty(v.size, dtype=v.properties.dtype) for k, v in wanted.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    return {k[len("teacher."):]: v for k, v in state["model"].items()}


def head_shape(state: dict[str, Tensor], where: str) -> HeadShape:
    """Sizes of a DINOHead from its state dict (`mlp.{i}.weight` or `mlp.weight`, `last_layer.weight_v`)."""
    try:
        out_dim = state["last_layer.weight_v"].shape[0]
        if "mlp.weight" in state:
            bottleneck = state["mlp.weight"].shape[0]
            return HeadShape(out_dim, bottleneck, bottleneck, 1)
        linears = sorted((int(k.split(".")[1]), v) for k, v in state.items()
                         if k.startswith("mlp.") and k.endswith(".weight") and v.dim() == 2)
        return HeadShape(out_dim, linears[0][1].shape[0], linears[-1][1].shape[0], len(linears))
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"{where}: not a DINO head state dict (keys: {sorted(state)[:8]})") from exc

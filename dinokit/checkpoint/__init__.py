"""Reading and writing checkpoints."""

from dinokit.checkpoint.loading import (
    CheckpointError,
    backbone_state_dict,
    describe_mismatch,
    head_state_dicts,
    load_backbone,
    load_into,
    read_checkpoint,
)

__all__ = [
    "CheckpointError",
    "backbone_state_dict",
    "describe_mismatch",
    "head_state_dicts",
    "load_backbone",
    "load_into",
    "read_checkpoint",
]

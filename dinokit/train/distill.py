"""Distillation from a frozen teacher into one or several students (DINOv2 §5, DINOv3).

The released DINOv2 ViT-S/B/L were distilled from the frozen ViT-g: the teacher's backbone and
DINO / iBOT heads give the targets (Sinkhorn-Knopp over the batch, as in pretraining), each student
learns them with the pretraining losses, without masking and without stochastic depth, with the
iBOT loss on every patch of the two global crops, and each student keeps an EMA of itself that is
the model released. DINOv3 trains several students against one teacher forward.

Here a student is a whole `SSLModel` whose own EMA "teacher" is that spare EMA: the loop's
`update_teacher` moves it, and it is what the run exports
(`students/NAME/teacher_backbone.safetensors`). The frozen teacher is held outside the module
tree: it is rebuilt from its source on resume, never written into checkpoints, never wrapped by
DDP / FSDP (each rank keeps a full replica, optionally in bfloat16), and never trained.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dinokit.checkpoint.foreign import foreign_architecture
from dinokit.checkpoint.loading import CheckpointError, load_into, with_mask_token
from dinokit.checkpoint.sources import TrainedWeights, read_weights
from dinokit.config import (
    Config,
    ConfigError,
    DistillConfig,
    HeadConfig,
    HighResConfig,
    InitConfig,
    ModelConfig,
    load_config_file,
    student_models,
    vit_args_from_config,
)
from dinokit.losses import DINOLoss, iBOTPatchLoss
from dinokit.models.builders import OFFICIAL_ARCHS, VIT_SIZES, ViTArgs
from dinokit.models.vision_transformer import VisionTransformer
from dinokit.train.init_weights import fit_pos_embed
from dinokit.train.ssl_model import LossArgs, SSLModel, build_head, teacher_targets

__all__ = [
    "DistillModel",
    "build_distill_model",
    "distill_config_with_teacher_heads",
    "teacher_heads_config",
    "teacher_heads_run",
    "teacher_model_config",
]

log = logging.getLogger("dinokit.train")

# Sub-folder of a distillation run where a teacher without heads gets them trained first.
TEACHER_HEADS_DIR = "teacher_heads"


class DistillModel(nn.Module):
    """A frozen teacher network and students trained on its targets.

    Args:
        teacher: `backbone` + `dino_head` [+ `ibot_head`], loaded; frozen here.
        students: name -> `SSLModel` (student + spare EMA); their `loss_args.mask_student` is off.
        loss: loss configuration of the targets (centering rule, iBOT on or off).
        teacher_dtype: dtype the teacher runs in (float32 or bfloat16; targets are float32).

    Batch: as `SSLModel`'s; its masks are ignored (every global-crop patch is an iBOT row).
    """

    def __init__(self, teacher: nn.ModuleDict, students: dict[str, SSLModel], loss: LossArgs,
                 teacher_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.loss_args = loss
        self.students = nn.ModuleDict(students)
        for student in students.values():
            token = student.student["backbone"].mask_token
            if token is not None:  # students see whole crops: the mask token never gets a gradient
                token.requires_grad_(False)
        out_dim = teacher["dino_head"].last_layer.weight_v.shape[0]
        ibot_head = teacher["ibot_head"] if "ibot_head" in teacher else teacher["dino_head"]
        self.dino_loss = DINOLoss(out_dim, loss.student_temp, loss.center_momentum)
        self.ibot_loss = iBOTPatchLoss(ibot_head.last_layer.weight_v.shape[0], loss.student_temp, loss.center_momentum)
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher_dtype = teacher_dtype
        # Not a registered child: kept out of state dicts (checkpoints), DDP / FSDP and `train()`.
        self.__dict__["frozen_teacher"] = teacher.to(teacher_dtype)

    frozen_teacher: nn.ModuleDict

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DistillModel:
        # `.to(device)` moves the frozen teacher too (it is not a child, so it must be told).
        super()._apply(fn, recurse)
        self.frozen_teacher._apply(fn, recurse)
        return self

    def _all_patches(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with every patch of the global crops as an iBOT row (no masking)."""
        crops = batch["collated_global_crops"]
        p = self.frozen_teacher["backbone"].patch_size
        n = (crops.shape[-2] // p) * (crops.shape[-1] // p)
        rows = crops.shape[0] * n
        device = crops.device
        return {
            **batch,
            "collated_masks": torch.ones(crops.shape[0], n, dtype=torch.bool, device=device),
            "mask_indices_list": torch.arange(rows, device=device),
            "masks_weight": torch.full((rows,), 1.0 / n, device=device),
            "n_masked_patches": torch.full((1,), rows, dtype=torch.long, device=device),
        }

    def forward(self, batch: dict[str, Tensor], teacher_temp: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Loss terms of every student (prefixed `NAME/` when there are several) and the teacher
        targets, with the first student's global [CLS] for the health signals."""
        if self.loss_args.use_ibot:
            batch = self._all_patches(batch)
        dtype = None if self.teacher_dtype == torch.float32 else self.teacher_dtype
        targets = teacher_targets(self.frozen_teacher, batch, teacher_temp, self.loss_args, self.dino_loss,
                                  self.ibot_loss, input_dtype=dtype)
        terms: dict[str, Tensor] = {}
        totals = []
        first_cls: Tensor | None = None
        for name, student in self.students.items():
            outputs = student.student_outputs(batch)
            own = student.losses(batch, outputs, targets)
            totals.append(own["total"])
            first_cls = outputs["global_cls"] if first_cls is None else first_cls
            prefix = f"{name}/" if len(self.students) > 1 else ""
            terms.update({f"{prefix}{k}": v for k, v in own.items() if k != "total" or not prefix})
        terms["total"] = torch.stack(totals).sum()  # disjoint parameters: each gradient is its student's
        assert first_cls is not None
        return terms, {**targets, "global_cls": first_cls.detach()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """Move each student's spare EMA; the frozen teacher never changes."""
        for student in self.students.values():
            student.update_teacher(momentum)

    def trainable(self) -> dict[str, nn.Module]:
        return {f"{name}.{part}": m for name, s in self.students.items() for part, m in s.student.items()}

    def student_backbones(self) -> list[VisionTransformer]:
        return [b for s in self.students.values() for b in s.student_backbones()]

    def networks(self) -> list[nn.ModuleDict]:
        return [net for s in self.students.values() for net in s.networks()]

    def released_backbones(self) -> dict[str, nn.Module]:
        """Each student's spare EMA backbone, by student name."""
        return {name: s.teacher["backbone"] for name, s in self.students.items()}

    @torch.no_grad()
    def settle_pending_center_updates(self) -> None:
        self.dino_loss.apply_center_update()
        self.ibot_loss.apply_center_update()


# ------------------------------------------------------------------------------------ building


def teacher_model_config(cfg: Config) -> ModelConfig:
    """The teacher's architecture: a run folder's `model` section, or an official architecture
    (`distill.teacher_arch`, or the one a file name starts with, longest match first)."""
    path = Path(cfg.distill.teacher)
    if path.is_dir():
        if (path / "config.yaml").is_file():
            return load_config_file(path / "config.yaml").model
        return model_config_of(foreign_architecture(path)[0])  # a transformers / timm folder
    arch = cfg.distill.teacher_arch or next(
        (name for name in sorted(OFFICIAL_ARCHS, key=len, reverse=True) if path.name.startswith(name)), "")
    if arch not in OFFICIAL_ARCHS:
        raise ConfigError(f"distill.teacher_arch: {arch or 'not set'}; name the architecture of {path.name} "
                          f"({', '.join(OFFICIAL_ARCHS)}) with --teacher-arch")
    return model_config_of(OFFICIAL_ARCHS[arch])


def model_config_of(a: ViTArgs) -> ModelConfig:
    """The `model` config section that builds the architecture `a`."""
    size = next((k for k, v in VIT_SIZES.items() if v == (a.embed_dim, a.depth, a.num_heads)), "vit_small")
    return ModelConfig(
        arch=size, patch_size=a.patch_size, img_size=a.img_size, in_chans=a.in_chans, embed_dim=a.embed_dim,
        depth=a.depth, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio,
        ffn_layer=a.ffn_layer,  # type: ignore[arg-type]
        num_register_tokens=a.num_register_tokens, layerscale=a.init_values, qkv_bias=a.qkv_bias,
        proj_bias=a.proj_bias, ffn_bias=a.ffn_bias, interpolate_antialias=a.interpolate_antialias,
        interpolate_offset=a.interpolate_offset,
    )


def teacher_heads_run(run_dir: Path) -> Path:
    return run_dir / TEACHER_HEADS_DIR


def teacher_weights(cfg: Config, run_dir: Path | None, weights: TrainedWeights | None = None) -> TrainedWeights:
    """The teacher's weights (`weights` if already read); heads from the run's own head warm-up
    when the source has none."""
    weights = weights or read_weights(cfg.distill.teacher)
    if "dino_head" not in weights.heads:
        heads_run = teacher_heads_run(run_dir) if run_dir is not None else None
        if heads_run is None or not (heads_run / "teacher_backbone.safetensors").is_file():
            raise CheckpointError(f"distill.teacher {weights.source} has no heads and none were trained yet "
                                  f"(`dinokit distill` trains them first, in RUN/{TEACHER_HEADS_DIR})")
        weights.heads = read_weights(heads_run).heads
    return weights


def _head(shape: Any, base: HeadConfig, in_dim: int) -> nn.Module:
    return build_head(_head_config(shape, base), in_dim)


def build_distill_model(cfg: Config, run_dir: Path | None, teacher: TrainedWeights | None = None) -> DistillModel:
    """The frozen teacher (loaded; `teacher` if its weights were read already) and the students of
    `cfg` (fresh), checked against each other."""
    weights = teacher_weights(cfg, run_dir, teacher)
    source = str(weights.source)
    tmodel = teacher_model_config(cfg)
    backbone = vit_args_from_config(tmodel).build()
    load_into(backbone, fit_pos_embed(with_mask_token(backbone, weights.backbone), backbone, source), source=f"distill.teacher {source}")
    teacher = nn.ModuleDict({"backbone": backbone})
    for name, state in weights.heads.items():
        teacher[name] = _head(weights.head_shape(name), cfg.head, backbone.embed_dim)
        load_into(teacher[name], state, source=f"distill.teacher {source} {name}")
    dino_shape = weights.head_shape("dino_head")
    if cfg.head.out_dim != dino_shape.out_dim:
        raise ConfigError(f"head.out_dim ({cfg.head.out_dim}) must equal the teacher's prototypes ({dino_shape.out_dim})")
    separate = "ibot_head" in weights.heads
    loss = LossArgs(
        dino_weight=cfg.loss.dino_weight, ibot_weight=cfg.loss.ibot_weight, koleo_weight=cfg.loss.koleo_weight,
        use_ibot=cfg.loss.ibot_weight > 0, use_koleo=cfg.loss.koleo_weight > 0, centering=cfg.loss.centering,
        student_temp=cfg.loss.student_temp, center_momentum=cfg.loss.center_momentum, mask_student=False,
    )
    students: dict[str, SSLModel] = {}
    for name, model_cfg in student_models(cfg).items():
        if loss.use_ibot and model_cfg.patch_size != tmodel.patch_size:
            raise ConfigError(f"distill.students: {name} has patch size {model_cfg.patch_size}, the teacher "
                              f"{tmodel.patch_size}; iBOT compares patch by patch, so they must be equal")
        dino_head = _head_config(dino_shape, cfg.head)
        ibot_head = _head_config(weights.head_shape("ibot_head"), cfg.head) if separate else None
        students[name] = SSLModel(vit_args_from_config(model_cfg).build(), dino_head, ibot_head, loss)
    dtype = torch.bfloat16 if cfg.distill.teacher_dtype == "bfloat16" else torch.float32
    log.info("distillation: teacher %s (%s, %d blocks, %d wide), students %s", source, tmodel.arch,
             backbone.n_blocks, backbone.embed_dim, ", ".join(students))
    return DistillModel(teacher, students, loss, dtype)


def _head_config(shape: Any, base: HeadConfig) -> HeadConfig:
    """A student head as large as the teacher's (the prototypes must match; the MLP may too)."""
    return HeadConfig(out_dim=shape.out_dim, hidden_dim=shape.hidden_dim, bottleneck_dim=shape.bottleneck_dim,
                      nlayers=shape.nlayers, norm_last_layer=base.norm_last_layer)


def distill_config_with_teacher_heads(cfg: Config) -> Config:
    """`cfg` with the head sizes of the teacher's heads (students must output the same
    prototypes), when the teacher has heads; unchanged otherwise (its heads will be trained with
    the configured sizes)."""
    weights = read_weights(cfg.distill.teacher)
    if "dino_head" not in weights.heads:
        return cfg
    dino = _head_config(weights.head_shape("dino_head"), cfg.head)
    loss = dataclasses.replace(cfg.loss, separate_ibot_head="ibot_head" in weights.heads)
    if "ibot_head" in weights.heads:
        loss = dataclasses.replace(loss, ibot_head=_head_config(weights.head_shape("ibot_head"), cfg.loss.ibot_head))
    return dataclasses.replace(cfg, head=dino, loss=loss)


def teacher_heads_config(cfg: Config) -> Config:
    """The head warm-up run of a backbone-only teacher: `dinokit train --init TEACHER` with the
    backbone frozen for all `distill.teacher_head_warmup_steps` steps, on the distillation's data
    and crops, with a schedule of that length (10 % lr warm-up, last layer frozen for 10 %)."""
    n = cfg.distill.teacher_head_warmup_steps
    length = max(1, n // 10)
    epochs = math.ceil(n / length)
    return dataclasses.replace(
        cfg,
        model=teacher_model_config(cfg),
        init=InitConfig(backbone=cfg.distill.teacher, heads=False),
        distill=DistillConfig(),
        highres=HighResConfig(),
        optim=dataclasses.replace(cfg.optim, epochs=epochs, epoch_length=length, warmup_epochs=min(1, epochs),
                                  freeze_last_layer_epochs=min(1, epochs)),
        teacher=dataclasses.replace(cfg.teacher, warmup_teacher_temp_epochs=min(cfg.teacher.warmup_teacher_temp_epochs,
                                                                                 epochs)),
        train=dataclasses.replace(cfg.train, max_steps=n, head_warmup_steps=n, backbone_lr_warmup_steps=0),
        eval=dataclasses.replace(cfg.eval, knn_every=0),
    )

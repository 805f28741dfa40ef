"""Student and teacher of DINO / DINOv2 self-distillation, and the loss of one batch.

The training step reads top to bottom as three pieces:
1. `teacher_targets`: the EMA teacher sees the two global crops (unmasked) and produces
   targets: centered-and-sharpened (DINO) or Sinkhorn-Knopp-balanced (DINOv2) probabilities over
   the prototypes, for the [CLS] token and for the masked patches (iBOT).
2. `student_outputs`: the student sees the global crops with block masks and the local crops.
3. `losses`: DINO cross-entropy between every teacher global view and every other student view,
   iBOT cross-entropy on masked patches, and the KoLeo spread regulariser.

References: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO,
2021); Zhou et al., "iBOT" (2022); Oquab et al., "DINOv2" (2023).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinokit.config import HeadConfig
from dinokit.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinokit.models.dino_head import DINOHead
from dinokit.models.vision_transformer import VisionTransformer


def build_head(head: HeadConfig, in_dim: int) -> DINOHead:
    """A projection head of the configured sizes (DINO / DINOv2 head) on `in_dim` features."""
    return DINOHead(in_dim, head.out_dim, nlayers=head.nlayers, hidden_dim=head.hidden_dim,
                    bottleneck_dim=head.bottleneck_dim, norm_last_layer=head.norm_last_layer)


@dataclass(frozen=True)
class LossArgs:
    """Which losses, with which weights and target rule.

    Args:
        dino_weight, ibot_weight, koleo_weight: loss weights (1, 1, 0.1 in DINOv2).
        use_ibot: masked-patch loss (and block masks on the student's global crops).
        use_koleo: KoLeo on the student's global [CLS] tokens.
        centering: "sinkhorn_knopp" (DINOv2) or "centering" (DINO v1 EMA center).
        student_temp, center_momentum: 0.1 and 0.9.
        mask_student: replace the masked patches of the student's global crops by the mask
            token (iBOT). Off in distillation, where the student sees whole crops and iBOT
            compares every patch of the global crops.
    """

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    use_ibot: bool = True
    use_koleo: bool = True
    centering: str = "sinkhorn_knopp"
    student_temp: float = 0.1
    center_momentum: float = 0.9
    mask_student: bool = True


@torch.no_grad()
def teacher_targets(
    net: nn.ModuleDict,
    batch: dict[str, Tensor],
    teacher_temp: float,
    args: LossArgs,
    dino_loss: DINOLoss,
    ibot_loss: iBOTPatchLoss,
    input_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Targets of a teacher network (backbone + heads) for the two global crops: `dino` (2, B, K)
    with the views swapped, `ibot` (M, K) for the rows of `mask_indices_list`, and the raw
    `cls_logits`. Centering state lives in `dino_loss` / `ibot_loss`; probabilities are float32.
    `input_dtype` casts the crops first (a teacher kept in bfloat16)."""
    crops = batch["collated_global_crops"]
    if input_dtype is not None:
        crops = crops.to(input_dtype)
    n_views = 2
    out = net["backbone"].forward_features(crops)
    cls = out["x_norm_clstoken"]
    # Swap the two views so that student view i is compared with teacher view 1 - i.
    cls = torch.cat(cls.chunk(n_views)[::-1])
    cls_logits = net["dino_head"](cls).float()
    targets: dict[str, Tensor] = {"cls_logits": cls_logits}
    if args.centering == "centering":
        probs = dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
        dino_loss.update_center(cls_logits)
    else:
        probs = dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
    targets["dino"] = probs.view(n_views, -1, probs.shape[-1])

    if args.use_ibot:
        patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
        head = net["ibot_head"] if "ibot_head" in net else net["dino_head"]
        patch_logits = head(patches).float()
        if args.centering == "centering":
            ibot = ibot_loss.softmax_center_teacher(patch_logits.unsqueeze(0), teacher_temp).squeeze(0)
            ibot_loss.update_center(patch_logits)  # (M, K): mean over all ranks' masked rows
        else:
            ibot = ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp, batch["n_masked_patches"])
        targets["ibot"] = ibot
    return targets


class SSLModel(nn.Module):
    """Student (backbone + DINO head [+ iBOT head]) and its EMA teacher.

    Args:
        backbone: the student backbone; the teacher is a copy without stochastic depth.
        dino_head: sizes of the [CLS] head.
        ibot_head: sizes of a separate ("untied") iBOT head, or None to share the DINO head.
        loss: loss configuration.

    Batch (from `collate_data_and_cast`): `collated_global_crops` (2B, C, H, W) crop-major,
    `collated_local_crops` (n_local * B, C, h, w), `collated_masks` (2B, N) bool,
    `mask_indices_list` (M,), `masks_weight` (M,), `n_masked_patches` (1,).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        dino_head: HeadConfig,
        ibot_head: HeadConfig | None,
        loss: LossArgs,
    ) -> None:
        super().__init__()
        if loss.centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"loss.centering must be 'sinkhorn_knopp' or 'centering', not {loss.centering!r}")
        self.loss_args = loss
        dim = backbone.embed_dim
        student = {"backbone": backbone, "dino_head": build_head(dino_head, dim)}
        if loss.use_ibot and ibot_head is not None:
            student["ibot_head"] = build_head(ibot_head, dim)
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for block in self.teacher["backbone"].blocks:
            block.sample_drop_ratio = 0.0  # the teacher never drops paths
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        self.dino_loss = DINOLoss(dino_head.out_dim, loss.student_temp, loss.center_momentum)
        ibot_dim = (ibot_head or dino_head).out_dim
        self.ibot_loss = iBOTPatchLoss(ibot_dim, loss.student_temp, loss.center_momentum)
        self.koleo_loss = KoLeoLoss()

    def train(self, mode: bool = True) -> SSLModel:
        super().train(mode)
        self.teacher.eval()  # only the student trains; the teacher is updated by EMA
        # BatchNorm layers of a teacher (DINO's ResNet-50) normalise with the batch's statistics
        # in training, as in the official code, where the teacher is never put in eval mode; their
        # running statistics, which the EMA does not carry, are what the exported teacher uses.
        for module in self.teacher.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(mode)
        return self

    def _ibot_head(self, net: nn.ModuleDict) -> nn.Module:
        return net["ibot_head"] if "ibot_head" in net else net["dino_head"]

    # ------------------------------------------------------------------ 1. teacher

    def teacher_targets(self, batch: dict[str, Tensor], teacher_temp: float) -> dict[str, Tensor]:
        """Teacher probabilities: `dino` (2, B, K) with views swapped, `ibot` (M, K)."""
        return teacher_targets(self.teacher, batch, teacher_temp, self.loss_args, self.dino_loss, self.ibot_loss)

    # ------------------------------------------------------------------ 2. student

    def student_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Student head logits of all crops, backbone [CLS] of the global crops, masked patches."""
        backbone = self.student["backbone"]
        masks = batch["collated_masks"] if self.loss_args.use_ibot and self.loss_args.mask_student else None
        crops, crop_masks = [batch["collated_global_crops"]], [masks]
        if batch["collated_local_crops"].numel():
            crops.append(batch["collated_local_crops"])
            crop_masks.append(None)
        # One call for both crop sizes, so the backbone can pack them into one sequence.
        feats = backbone.forward_features_list(crops, crop_masks)
        glob = feats[0]
        cls = [f["x_norm_clstoken"] for f in feats]
        # One head call on all [CLS] tokens: one large matmul instead of one per crop size.
        logits = self.student["dino_head"](torch.cat(cls)).split([c.shape[0] for c in cls])
        outputs = {"global_cls": cls[0], "global_logits": logits[0]}
        if len(logits) > 1:
            outputs["local_logits"] = logits[1]
        if self.loss_args.use_ibot:
            patches = glob["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
            outputs["masked_patch_logits"] = self._ibot_head(self.student)(patches)
        return outputs

    # ------------------------------------------------------------------ 3. losses

    def losses(self, batch: dict[str, Tensor], student: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weighted loss terms and their sum `total`.

        DINO: every teacher global view against every student view except itself, the sum
        divided by the number of such pairs (2 + 2 * n_local), as in both papers.
        """
        args = self.loss_args
        dino_targets = targets["dino"]  # (2, B, K)
        n_views, B = dino_targets.shape[:2]
        n_local = student["local_logits"].shape[0] // B if "local_logits" in student else 0
        n_pairs = (n_views - 1) * n_views + n_views * n_local
        terms: dict[str, Tensor] = {}
        if n_local:
            local = self.dino_loss(student["local_logits"].chunk(n_local), dino_targets)
            terms["dino_local"] = args.dino_weight * local / n_pairs
        # Global crops run as one (2B) batch: the mean over 2B rows times 2 is the sum of 2 pairs.
        glob = self.dino_loss([student["global_logits"]], [dino_targets.flatten(0, 1)])
        terms["dino_global"] = args.dino_weight * glob * n_views / n_pairs
        if args.use_koleo and args.koleo_weight:
            terms["koleo"] = args.koleo_weight * sum(  # type: ignore[assignment]
                self.koleo_loss(view) for view in student["global_cls"].chunk(n_views)
            )
        if args.use_ibot:
            ibot = self.ibot_loss.forward_masked(
                student["masked_patch_logits"], targets["ibot"], batch["collated_masks"],
                masks_weight=batch["masks_weight"],
            )
            # Official scaling: x2 for the two views processed together, x1/2 per view.
            terms["ibot"] = args.ibot_weight * ibot
        terms["total"] = sum(terms.values())  # type: ignore[assignment]
        return terms

    def forward(self, batch: dict[str, Tensor], teacher_temp: float, targets: dict[str, Tensor] | None = None,
                teacher_only: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Loss terms and the teacher targets (kept for health signals).

        Gradient accumulation (`dinokit.train.accumulate`) calls it twice over: `teacher_only`
        for the whole batch's targets (no loss terms), then with a micro-batch and its rows of
        those `targets`. Both go through `forward`, so DDP's and FSDP's hooks run for either."""
        if teacher_only:
            return {}, self.teacher_targets(batch, teacher_temp)
        if targets is None:
            targets = self.teacher_targets(batch, teacher_temp)
        student = self.student_outputs(batch)
        return self.losses(batch, student, targets), {**targets, "global_cls": student["global_cls"].detach()}

    # ------------------------------------------------------------------ EMA

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, as one foreach lerp
        (teacher + (1 - momentum) * (student - teacher)): one pass over the weights instead of a
        multiply and an add."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - momentum)

    # ------------------------------------------------------------------ what the loop needs

    def trainable(self) -> dict[str, nn.Module]:
        """The modules the optimizer trains and clips one by one: backbone and heads."""
        return dict(self.student.items())

    def student_backbones(self) -> list[VisionTransformer]:
        return [self.student["backbone"]]  # type: ignore[list-item]

    def networks(self) -> list[nn.ModuleDict]:
        """Every backbone + heads network (sharded / compiled / resized alike)."""
        return [self.student, self.teacher]

    def released_backbones(self) -> dict[str, nn.Module]:
        """The model(s) a run releases: the EMA teacher's backbone (key "" = the run folder)."""
        return {"": self.teacher["backbone"]}

    @torch.no_grad()
    def settle_pending_center_updates(self) -> None:
        """Fold deferred center updates into the buffers, so a checkpoint holds the full state."""
        self.dino_loss.apply_center_update()
        self.ibot_loss.apply_center_update()


# Thresholds of `collapse_reasons`: a teacher whose targets keep more than 98 % of the maximum
# entropy no longer tells images apart; normalised features with a spread under 5 % of a
# uniform spread are all the same image to the head.
UNIFORM_ENTROPY = 0.98
EQUAL_FEATURES_STD = 0.05


HEALTH_SIGNALS = ("teacher_entropy", "prototypes_used", "feature_std")


@torch.no_grad()
def health_tensor(targets: dict[str, Tensor]) -> Tensor:
    """The values of `health_signals` as one float32 tensor on the targets' device, computed
    without a host sync (no `.item()`, no `unique`), so the step can record it and read it later."""
    probs = targets["dino"].flatten(0, 1).float()
    k = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / math.log(k)
    used = torch.zeros(k, device=probs.device).index_fill_(0, probs.argmax(-1), 1.0).sum()
    feats = torch.nn.functional.normalize(targets["global_cls"].float(), dim=-1)
    if feats.shape[0] > 1:
        std = feats.std(0).mean() * math.sqrt(feats.shape[-1])
    else:
        std = torch.zeros((), device=feats.device)
    return torch.stack([entropy, used, std])


def health_signals(targets: dict[str, Tensor]) -> dict[str, float]:
    """Label-free collapse signals of one batch.

    - `teacher_entropy`: mean entropy of the teacher's [CLS] targets / log K (1 = uniform, a
      collapse to uniform outputs; 0 = one-hot).
    - `prototypes_used`: distinct argmax prototypes among the batch's teacher targets (1 = all
      images assigned to the same prototype: collapse).
    - `feature_std`: std over the batch of the L2-normalised student [CLS], averaged over dims
      and multiplied by sqrt(D) (about 1 for well spread features, 0 when all are equal).
    """
    return dict(zip(HEALTH_SIGNALS, health_tensor(targets).tolist()))


def collapse_reasons(health: dict[str, float]) -> list[str]:
    """Which health signals show a collapse: to one prototype, to uniform targets, or to equal
    features. Empty when none does."""
    reasons = []
    if health["prototypes_used"] <= 1:
        reasons.append("every image assigned to one prototype")
    if health["teacher_entropy"] > UNIFORM_ENTROPY:
        reasons.append(f"teacher targets nearly uniform (entropy {health['teacher_entropy']:.4f} of the maximum)")
    if health["feature_std"] < EQUAL_FEATURES_STD:
        reasons.append(f"features nearly equal for all images (std {health['feature_std']:.3f})")
    return reasons

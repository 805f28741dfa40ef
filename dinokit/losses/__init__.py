"""Losses of DINO / iBOT / DINOv2: CLS-token self-distillation, masked-patch iBOT, KoLeo."""

from dinokit.losses.dino_clstoken_loss import DINOLoss
from dinokit.losses.ibot_patch_loss import iBOTPatchLoss
from dinokit.losses.koleo_loss import KoLeoLoss, pairwise_nearest_neighbours
from dinokit.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss", "pairwise_nearest_neighbours", "sinkhorn_knopp"]

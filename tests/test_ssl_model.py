"""The self-supervised model: loss bookkeeping, teacher updates and health signals."""

from __future__ import annotations

import random

import torch

from dinokit.config import HeadConfig
from dinokit.data.collate import collate_data_and_cast
from dinokit.data.masking import MaskingGenerator
from dinokit.models import vit_args
from dinokit.train.ssl_model import (
    LossArgs,
    SSLModel,
    collapse_reasons,
    health_signals,
)


def _batch(n_images: int = 4, n_local: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    samples = [({"global_crops": [torch.randn(3, 16, 16, generator=g) for _ in range(2)],
                 "local_crops": [torch.randn(3, 8, 8, generator=g) for _ in range(n_local)]}, 0)
               for _ in range(n_images)]
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=16,
                                 mask_generator=MaskingGenerator((4, 4), max_num_patches=8),
                                 random_state=random.Random(0))


def _model(**loss) -> SSLModel:
    torch.manual_seed(0)
    backbone = vit_args("vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16).build()
    return SSLModel(backbone, HeadConfig(64, 32, 16), HeadConfig(48, 32, 16), LossArgs(**loss))


def test_dino_terms_average_over_all_cross_view_pairs() -> None:
    model = _model(use_ibot=False, use_koleo=False)
    batch = _batch()
    targets = model.teacher_targets(batch, 0.07)
    student = model.student_outputs(batch)
    terms = model.losses(batch, student, targets)
    # Reference: explicit double loop over (teacher view, student view != teacher view).
    ce = lambda t, s: -(t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()  # noqa: E731
    teacher = targets["dino"][[1, 0]]  # undo the swap: teacher view i
    views = list(student["global_logits"].chunk(2)) + list(student["local_logits"].chunk(2))
    pairs = [ce(teacher[i], s) for i in range(2) for j, s in enumerate(views) if j != i]
    expected = sum(pairs) / len(pairs)
    torch.testing.assert_close(terms["total"], expected)
    assert len(pairs) == 2 + 2 * 2


def test_untied_ibot_head_and_ema_update() -> None:
    model = _model()
    assert "ibot_head" in model.student and model.ibot_loss.center.shape[-1] == 48
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    model.update_teacher(0.9)
    for old, new, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_centering_mode_updates_the_center_and_gradients_reach_the_student() -> None:
    model = _model(centering="centering")
    batch = _batch()
    terms, _ = model(batch, 0.04)
    terms["total"].backward()
    model.settle_pending_center_updates()
    assert model.dino_loss.center.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.student.named_parameters() if p.requires_grad
               and "mask_token" not in n)
    assert set(terms) == {"dino_local", "dino_global", "koleo", "ibot", "total"}


def test_health_signals_flag_each_kind_of_collapse() -> None:
    k, n = 32, 8
    healthy = {"dino": torch.eye(k)[:2 * n].view(2, n, k), "global_cls": torch.randn(2 * n, 16)}
    signals = health_signals(healthy)
    assert signals["prototypes_used"] == 2 * n and signals["teacher_entropy"] < 0.01
    assert collapse_reasons(signals) == []
    uniform = {"dino": torch.full((2, n, k), 1.0 / k), "global_cls": torch.randn(2 * n, 16)}
    assert any("uniform" in r for r in collapse_reasons(health_signals(uniform)))
    one = torch.zeros(2, n, k)
    one[..., 3] = 1
    same = {"dino": one, "global_cls": torch.ones(2 * n, 16)}
    reasons = collapse_reasons(health_signals(same))
    assert any("one prototype" in r for r in reasons) and any("equal" in r for r in reasons)

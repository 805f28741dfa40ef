"""DINO / iBOT / KoLeo losses: parity with the official code, plus the guards dinokit adds."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import assert_case_passes, reference_cases

from dinokit.losses import (
    DINOLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    pairwise_nearest_neighbours,
    sinkhorn_knopp,
)
from dinokit.reference.core import load_case
from dinokit.reference.kinds_heads_losses import RUNNERS


@pytest.mark.parametrize("kind", ["dino_loss", "ibot_loss", "koleo_loss"])
def test_referencereference_cases(reference_dir: Path, kind: str) -> None:
    for case in reference_cases(reference_dir, kind):
        ctx = load_case(reference_dir, case)
        RUNNERS[kind](ctx)
        assert_case_passes(ctx)
        assert ctx.comparisons


def test_runner_detects_a_wrong_temperature(reference_dir: Path) -> None:
    """The parity check is not vacuous: a student temperature of 0.2 must fail the loss outputs."""
    case = copy.deepcopy(reference_cases(reference_dir, "dino_loss")[0])
    case["constructor"]["kwargs"]["student_temp"] = 0.2
    ctx = load_case(reference_dir, case)
    RUNNERS["dino_loss"](ctx)
    failed = {c.name for c in ctx.comparisons if not c.ok}
    assert {"out.loss_local", "out.grad_local", "out.loss_global", "out.grad_global"} <= failed
    assert "out.sinkhorn_knopp" not in failed


@pytest.fixture
def single_process_group() -> Iterator[None]:
    """A gloo group of world size 1: exercises the collective code paths in-process."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or a group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- DINO loss


def test_dino_center_update_is_deferred() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(8, center_momentum=0.9)
    t1, t2 = torch.randn(6, 8), torch.randn(6, 8)
    loss_fn.update_center(t1)
    assert torch.count_nonzero(loss_fn.center) == 0
    p2 = loss_fn.softmax_center_teacher(t2, 0.07)
    expected_center = 0.1 * t1.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)
    torch.testing.assert_close(p2, F.softmax((t2 - expected_center) / 0.07, dim=-1))
    # No pending update -> applying again changes nothing.
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_dino_forward_sums_pairs() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(8)
    s = [torch.randn(4, 8) for _ in range(3)]
    t = [torch.randn(4, 8).softmax(-1) for _ in range(2)]
    expected = sum(-(tt * F.log_softmax(ss / 0.1, -1)).sum(-1).mean() for ss in s for tt in t)
    torch.testing.assert_close(loss_fn(s, t), expected)
    # A stacked (V, n, K) teacher tensor is iterated over its first dim.
    torch.testing.assert_close(loss_fn(s, torch.stack(t)), expected)


def test_sinkhorn_rows_sum_to_one_and_large_logits_stay_finite() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(32)
    logits = torch.randn(10, 32)
    q = loss_fn.sinkhorn_knopp_teacher(logits, 0.07)
    torch.testing.assert_close(q.sum(-1), torch.ones(10))


def _sinkhorn_float64(x: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """The unshifted textbook formula in float64 (exp(250) is representable there)."""
    q = torch.exp(x.double() / temp).t()
    k, n = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(1, keepdim=True) * k
        q /= q.sum(0, keepdim=True) * n
    return (q * n).t().float()


@pytest.mark.parametrize(("scale", "offset", "temp"), [(1.0, 0.0, 0.05), (0.5, 10.0, 0.04), (3.0, -5.0, 0.04)])
def test_sinkhorn_matches_float64_formula(scale: float, offset: float, temp: float) -> None:
    """Including logits whose exp(logit / temp) overflows float32 (offset 10 / 0.04 = 250)."""
    torch.manual_seed(0)
    x = torch.randn(12, 16) * scale + offset
    q = sinkhorn_knopp(x, temp, 12, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, _sinkhorn_float64(x, temp), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- iBOT loss


def test_ibot_sinkhorn_does_not_modify_count_tensor() -> None:
    torch.manual_seed(0)
    loss_fn = iBOTPatchLoss(16)
    count = torch.tensor([7])
    q = loss_fn.sinkhorn_knopp_teacher(torch.randn(7, 16), 0.07, count)
    assert count.tolist() == [7]
    torch.testing.assert_close(q.sum(-1), torch.ones(7))
    # A plain int works too and gives the same result.
    torch.testing.assert_close(loss_fn.sinkhorn_knopp_teacher(torch.randn(7, 16), 0.07, 7).sum(-1), torch.ones(7))


def test_collectives_with_a_process_group(single_process_group: None) -> None:
    torch.manual_seed(0)
    ibot = iBOTPatchLoss(16)
    count = torch.tensor([7])
    logits = torch.randn(7, 16)
    q = ibot.sinkhorn_knopp_teacher(logits, 0.07, count)
    assert count.tolist() == [7]
    torch.testing.assert_close(q, sinkhorn_knopp(logits, 0.07, 7))
    dino = DINOLoss(16)
    dino.update_center(logits)
    assert dino.reduce_handle is not None
    dino.softmax_center_teacher(logits, 0.07)
    torch.testing.assert_close(dino.center, 0.1 * logits.mean(0, keepdim=True))
    ibot.update_center(logits.view(1, 7, 16))
    ibot.apply_center_update()
    torch.testing.assert_close(ibot.center, 0.1 * logits.mean(0).view(1, 1, 16))


def test_ibot_dense_and_masked_forms_agree() -> None:
    torch.manual_seed(0)
    loss_fn = iBOTPatchLoss(32)
    masks = torch.rand(5, 12) < 0.4
    masks[2] = False  # an image without a masked patch counts in the mean as 0
    s = torch.randn(5, 12, 32)
    t = torch.randn(5, 12, 32).softmax(-1)
    dense = loss_fn(s, t, masks)
    packed = loss_fn.forward_masked(s[masks], t[masks], masks)
    torch.testing.assert_close(dense, packed)
    pad = torch.randn(3, 32)
    padded = loss_fn.forward_masked(
        torch.cat([s[masks], pad]), torch.cat([t[masks], pad.softmax(-1)]), masks, n_masked_patches=int(masks.sum())
    )
    torch.testing.assert_close(padded, packed)


# ---------------------------------------------------------------- KoLeo


def test_koleo_batch_of_one_is_zero_and_connected() -> None:
    x = torch.randn(1, 16, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert torch.isfinite(loss) and loss.detach().item() == 0.0
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_koleo_duplicate_rows_are_finite() -> None:
    torch.manual_seed(0)
    d = 24
    x = torch.randn(6, d)
    x[4] = x[1]
    x.requires_grad_(True)
    koleo = KoLeoLoss()
    distances, idx = koleo.nn_distances(x)
    assert idx[1] == 4 and idx[4] == 1
    torch.testing.assert_close(distances[[1, 4]], torch.full((2,), 1e-8 * math.sqrt(d)))
    loss = koleo(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # Each duplicate adds -log(1e-8 * (sqrt(D) + 1)) / B; any other row adds at least -log(2) / B.
    dup_term = -math.log(1e-8 * (math.sqrt(d) + 1))
    assert loss.detach().item() >= (2 * dup_term - 4 * math.log(2.0)) / 6


def test_koleo_nearest_neighbour_never_self() -> None:
    torch.manual_seed(0)
    x = F.normalize(torch.randn(9, 5), dim=-1)
    idx = pairwise_nearest_neighbours(x)
    assert (idx != torch.arange(9)).all()
    d = torch.cdist(x, x).fill_diagonal_(float("inf"))
    assert torch.equal(idx, d.argmin(1))


def test_koleo_runs_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    ref = KoLeoLoss()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = KoLeoLoss()(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)

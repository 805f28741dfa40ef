"""Sinkhorn-Knopp teacher targets (SwAV, Caron et al. 2020; used by DINOv2, Oquab et al. 2023).

Instead of centering, DINOv2 turns teacher scores into targets that spread the batch evenly over
the K prototypes: a few alternating row / column normalisations of `exp(scores / temp)` over the
GLOBAL batch (all ranks). Shared by `DINOLoss` (CLS tokens) and `iBOTPatchLoss` (masked patches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["distributed_ready", "sinkhorn_knopp"]


def distributed_ready() -> bool:
    """True when a default process group exists, i.e. collectives must be called."""
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all_reduce (SUM or MAX) when a process group exists, identity otherwise."""
    if distributed_ready():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: Tensor,
    teacher_temp: float,
    n_samples: Tensor | int,
    n_iterations: int = 3,
) -> Tensor:
    """Sinkhorn-Knopp normalised teacher probabilities.

    Same sequence of operations as the official DINOv2 code (so results match to float32
    rounding), with one change for robustness: the scores are shifted by their global maximum
    before `exp`. The shift cancels exactly in the first normalisation, but the official version
    overflows to inf (then NaN) once `score / temp > 88`, which a trained weight_g can reach.

    Args:
        teacher_output: (n, K) teacher head outputs on this rank (any float dtype; computed in fp32).
        teacher_temp: teacher temperature.
        n_samples: number of samples in the GLOBAL batch (sum over ranks), int or 1-element tensor.
        n_iterations: row / column normalisation rounds.

    Returns:
        (n, K) float32 targets; each row sums to 1.
    """
    scores = teacher_output.float() / teacher_temp
    shift = scores.max() if scores.numel() else scores.new_tensor(float("-inf"))
    shift = _all_reduce(shift.clone(), "max")
    if not torch.isfinite(shift):
        # Every rank is empty (or the scores are already inf / NaN): nothing sensible to shift by.
        shift = torch.zeros_like(shift)
    q = torch.exp(scores - shift).t()  # (K, n): prototypes x samples
    k = q.shape[0]
    b = n_samples.to(q.device) if isinstance(n_samples, Tensor) else n_samples

    q /= _all_reduce(torch.sum(q))
    for _ in range(n_iterations):
        # Rows: every prototype receives total mass 1/K over the global batch.
        q /= _all_reduce(torch.sum(q, dim=1, keepdim=True))
        q /= k
        # Columns: every sample has mass 1/B (local op: a sample lives on one rank).
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()

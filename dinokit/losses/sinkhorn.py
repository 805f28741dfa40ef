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
    rounding), with one change for robustness: each prototype's scores are shifted by their
    maximum over the global batch before `exp`. A per-prototype factor is cancelled exactly by the
    first row normalisation, so the result is mathematically unchanged; but the official version
    overflows to inf (then NaN) once `score / temp > 88` (reachable when weight_g is trained), and
    a single global shift would instead underflow whole prototype rows to 0 (0 / 0 = NaN) when the
    score range is large. After the shift every row holds an exp(0) = 1. A sample whose scores are
    all > 87 * temp below every prototype's best can still underflow; that is left to fail loudly.

    Args:
        teacher_output: (n, K) teacher head outputs on this rank (any float dtype; computed in fp32).
        teacher_temp: teacher temperature.
        n_samples: number of samples in the GLOBAL batch (sum over ranks), int or 1-element tensor.
        n_iterations: row / column normalisation rounds.

    Returns:
        (n, K) float32 targets; each row sums to 1.
    """
    scores = teacher_output.float() / teacher_temp
    n_local, k = scores.shape
    if n_local:
        shift = scores.amax(dim=0)
    else:  # this rank holds no sample (e.g. no masked patch); other ranks decide the max
        shift = scores.new_full((k,), float("-inf"))
    shift = _all_reduce(shift, "max")
    # All ranks empty, or scores already inf / NaN: no sensible shift, keep the official math.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    q = torch.exp(scores - shift).t()  # (K, n): prototypes x samples
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

"""Parity runners for the head and loss cases: kinds `dino_head`, `dino_loss`, `ibot_loss`,
`koleo_loss`.

Each runner rebuilds the module from the manifest's plain values, replays the case's
`call_sequence` on dinokit's implementation and compares every reference output it knows. Sizes
(batch, prototypes, crop counts, masked-patch counts) come from the stored tensors and the case's
`params`, so reference folders with other sizes run unchanged.
"""

from __future__ import annotations

from typing import Callable, Collection

import torch

from dinokit.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinokit.models.dino_head import DINOHead
from dinokit.reference.core import HEAD_LOSS_TOL, CaseContext, ReferenceError, Runner

__all__ = ["RUNNERS"]


def _compare_known(ctx: CaseContext, values: dict[str, Callable[[], torch.Tensor] | torch.Tensor], exact: Collection[str] = ()) -> None:
    """Compare each computed value the case has (in its file or declared by the manifest).

    Values may be thunks so that an output a folder does not store is never computed. Debug
    tensors are compared only when stored.
    """
    declared = ctx.case.get("tensors", {})
    for name, value in values.items():
        stored = name in ctx.tensors
        if not stored and (name.startswith("out.debug.") or name not in declared):
            continue
        actual = value() if callable(value) else value
        if name in exact:
            ctx.compare_exact(name, actual)
        else:
            ctx.compare(name, actual, atol=HEAD_LOSS_TOL)


def _grad_of(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), d fn / d x) with x as a fresh leaf."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf)
    return out.detach(), grad


def run_dino_head(ctx: CaseContext) -> None:
    kwargs = dict(ctx.case["constructor"]["kwargs"])
    head = DINOHead(**kwargs)
    head.load_state_dict(ctx.with_prefix("model."), strict=True)
    if ctx.case.get("mode", "eval") == "eval":
        head.eval()
    x = ctx.tensor("input.x")
    with torch.no_grad():
        _compare_known(
            ctx,
            {
                "out.y": lambda: head(x),
                "out.debug.mlp": lambda: head.mlp(x),
                "out.debug.last_layer_weight": lambda: head.last_layer.weight,
            },
        )


def run_dino_loss(ctx: CaseContext) -> None:
    params = ctx.case.get("params", {})
    loss_fn = DINOLoss(**ctx.case["constructor"]["kwargs"])
    teacher_temp = float(params["teacher_temp"])
    n_iter = int(params.get("sinkhorn_n_iterations", 3))
    t1, t2 = ctx.tensor("input.teacher_logits_1"), ctx.tensor("input.teacher_logits_2")
    s_local, s_global = ctx.tensor("input.student_local"), ctx.tensor("input.student_global")
    n_global = int(params.get("n_global_crops", 2))
    batch = int(params.get("B_per_crop", t2.shape[0] // n_global))
    if "n_local_crops" in params:
        n_local = int(params["n_local_crops"])
    else:
        n_local = s_local.shape[0] // batch
    if n_local * batch != s_local.shape[0] or n_global * batch != t2.shape[0]:
        raise ReferenceError(f"case {ctx.name}: crop counts do not match the tensor shapes")

    p1 = loss_fn.softmax_center_teacher(t1, teacher_temp)
    loss_fn.update_center(t1)
    center_pending = loss_fn.center.clone()
    p2 = loss_fn.softmax_center_teacher(t2, teacher_temp)
    center_step2 = loss_fn.center.clone()
    loss_fn.update_center(t2)
    loss_fn.apply_center_update()
    teachers = p2.view(n_global, batch, -1)

    loss_local, grad_local = _grad_of(lambda s: loss_fn(s.chunk(n_local), teachers), s_local)
    loss_global, grad_global = _grad_of(lambda s: loss_fn([s], [p2]), s_global)
    _compare_known(
        ctx,
        {
            "out.softmax_center_teacher_step1": p1,
            "out.center_after_update_center_1": center_pending,
            "out.softmax_center_teacher_step2": p2,
            "out.center_after_step2": center_step2,
            "out.center_final": loss_fn.center,
            "out.sinkhorn_knopp": lambda: loss_fn.sinkhorn_knopp_teacher(t2, teacher_temp, n_iterations=n_iter),
            "out.sinkhorn_knopp_1iter": lambda: loss_fn.sinkhorn_knopp_teacher(t2, teacher_temp, n_iterations=1),
            "out.loss_local": loss_local,
            "out.grad_local": grad_local,
            "out.loss_global": loss_global,
            "out.grad_global": grad_global,
        },
    )


def run_ibot_loss(ctx: CaseContext) -> None:
    params = ctx.case.get("params", {})
    loss_fn = iBOTPatchLoss(**ctx.case["constructor"]["kwargs"])
    teacher_temp = float(params["teacher_temp"])
    n_iter = int(params.get("sinkhorn_n_iterations", 3))
    masks = ctx.tensor("input.masks").bool()
    s_dense = ctx.tensor("input.student_patch_tokens")
    t_probs = ctx.tensor("input.teacher_patch_probs")
    t_logits = ctx.tensor("input.teacher_patch_logits")
    flat = masks.flatten()
    n_masked = int(flat.sum())
    t_probs_masked = t_probs.flatten(0, 1)[flat]
    t_logits_masked = t_logits.flatten(0, 1)[flat]

    fwd, fwd_grad = _grad_of(lambda s: loss_fn(s, t_probs, masks), s_dense)
    s_masked = s_dense.flatten(0, 1)[flat]
    fm_default, fm_default_grad = _grad_of(lambda s: loss_fn.forward_masked(s, t_probs_masked, masks), s_masked)

    def given_weight() -> torch.Tensor:
        return loss_fn.forward_masked(s_masked, t_probs_masked, masks, masks_weight=ctx.tensor("input.masks_weight"))

    def padded() -> torch.Tensor:
        return loss_fn.forward_masked(
            ctx.tensor("input.student_masked_padded"),
            ctx.tensor("input.teacher_masked_padded"),
            masks,
            n_masked_patches=n_masked,
            masks_weight=ctx.tensor("input.masks_weight"),
        )

    with torch.no_grad():
        _compare_known(
            ctx,
            {
                "out.forward": fwd,
                "out.forward_grad": fwd_grad,
                "out.forward_masked_default_weight": fm_default,
                "out.forward_masked_default_weight_grad": fm_default_grad,
                "out.forward_masked_given_weight": given_weight,
                "out.forward_masked_padded_n_masked": padded,
            },
        )

    # Centering sequence on the (1, M, K) masked teacher logits.
    step1 = t_logits_masked.unsqueeze(0)
    p1 = loss_fn.softmax_center_teacher(step1, teacher_temp)
    loss_fn.update_center(step1)
    center_pending = loss_fn.center.clone()
    centering: dict[str, Callable[[], torch.Tensor] | torch.Tensor] = {
        "out.softmax_center_teacher_step1": p1,
        "out.center_pending": center_pending,
    }
    if "input.teacher_masked_logits_2" in ctx.tensors:
        p2 = loss_fn.softmax_center_teacher(ctx.tensor("input.teacher_masked_logits_2"), teacher_temp)
        centering["out.softmax_center_teacher_step2"] = p2
        centering["out.center_after_step2"] = loss_fn.center.clone()

    def sinkhorn(name: str) -> torch.Tensor:
        logits = ctx.tensor(name) if name in ctx.tensors else t_logits_masked
        count = torch.tensor([logits.shape[0]], dtype=torch.long)
        return loss_fn.sinkhorn_knopp_teacher(logits, teacher_temp, count, n_iterations=n_iter)

    centering["out.sinkhorn_knopp"] = lambda: sinkhorn("")
    centering["out.sinkhorn_knopp_padded"] = lambda: sinkhorn("input.teacher_masked_logits_padded")
    _compare_known(ctx, centering)


def run_koleo_loss(ctx: CaseContext) -> None:
    koleo = KoLeoLoss(**ctx.case["constructor"].get("kwargs", {}))
    x = ctx.tensor("input.x")
    loss, grad = _grad_of(koleo, x)
    values: dict[str, Callable[[], torch.Tensor] | torch.Tensor] = {
        "out.loss": loss,
        "out.grad": grad,
        "out.nn_index": lambda: koleo.nn_distances(x)[1],
    }
    if "input.x_dup" in ctx.tensors:
        x_dup = ctx.tensor("input.x_dup")
        with torch.no_grad():
            dist_dup, idx_dup = koleo.nn_distances(x_dup)
            values["out.loss_dup"] = koleo(x_dup)
        values["out.nn_index_dup"] = idx_dup
        values["out.nn_dist_dup"] = dist_dup
    _compare_known(ctx, values, exact={"out.nn_index", "out.nn_index_dup"})


RUNNERS: dict[str, Runner] = {
    "dino_head": run_dino_head,
    "dino_loss": run_dino_loss,
    "ibot_loss": run_ibot_loss,
    "koleo_loss": run_koleo_loss,
}

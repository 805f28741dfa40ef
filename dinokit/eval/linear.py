"""Linear probe on frozen, precomputed features: many classifiers trained together (DINOv2 protocol).

Every (feature kind x learning rate) pair gets its own linear classifier; all are trained in ONE
loop over mini-batches, like the official `AllClassifiers`: each batch computes every logit, the
per-classifier cross-entropies are summed (their gradients do not interact) and each classifier
takes its own SGD step (momentum 0.9, no weight decay, cosine learning rate to 0, weights
initialised N(0, 0.01), bias 0, as in the official code). Classifiers of one feature kind are
stacked in a (L, C, D) tensor, so one GEMM serves all learning rates.

Selection: the (kind, lr) with the best top-1 on a validation split carved from the train set
(`val_fraction`, seeded) is chosen, and that same classifier's test accuracy is reported. It is
NOT retrained on train + validation (the official code selects on the test set itself; we keep the
test set out of every choice and accept a classifier that saw 90 % of the train data).

Learning rates: the official list (1e-5 ... 0.1) scaled by batch_size / 256, as `scale_lr` does.

Example:
    >>> res = linear_probe(train_feats, train_y, test_feats, test_y, epochs=10, seed=0)
    >>> res["best"]
    {'feature': 'cls_last4_avgpool', 'lr': 0.01, 'val_top1': 81.2, 'test_top1': 80.7, 'test_top5': 99.1}
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OFFICIAL_LRS", "linear_probe", "split_train_val"]

OFFICIAL_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random (train indices, val indices), val = round(n * val_fraction) >= 1 rows."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"{n} train samples are too few to carve a validation split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _logits(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """(B, L, C) logits of the L stacked classifiers (L, C, D), (L, C) on features x (B, D): one
    GEMM against all of them (an einsum over L broadcasts x into a batched product, several times slower)."""
    L, C, D = W.shape
    return (x @ W.reshape(L * C, D).t()).view(-1, L, C) + b


@torch.no_grad()
def _accuracy(weights: Mapping[str, tuple[Tensor, Tensor]], feats: Mapping[str, Tensor], labels: Tensor,
              device: torch.device, batch_size: int = 8192) -> dict[str, tuple[Tensor, Tensor]]:
    """{kind: (top1 % per lr (L,), top5 % per lr (L,))} of every stacked classifier."""
    out = {}
    num_classes = next(iter(weights.values()))[0].shape[1]
    k5 = min(5, num_classes)
    for kind, (W, b) in weights.items():
        hit1 = torch.zeros(W.shape[0], device=device)
        hit5 = torch.zeros(W.shape[0], device=device)
        for r0 in range(0, len(labels), batch_size):
            x = feats[kind][r0 : r0 + batch_size].to(device, torch.float32)
            y = labels[r0 : r0 + batch_size].to(device)
            top = _logits(x, W, b).topk(k5, dim=2).indices  # (B, L, k5)
            hit1 += (top[:, :, 0] == y[:, None]).sum(dim=0)
            hit5 += (top == y[:, None, None]).any(dim=2).sum(dim=0)
        n = max(1, len(labels))
        out[kind] = ((100.0 * hit1 / n).cpu(), (100.0 * hit5 / n).cpu())
    return out


def linear_probe(
    train_feats: Mapping[str, Tensor],
    train_labels: Tensor,
    test_feats: Mapping[str, Tensor],
    test_labels: Tensor,
    kinds: Sequence[str] | None = None,
    lrs: Sequence[float] | None = None,
    epochs: int = 10,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train all (kind, lr) linear classifiers together, select on validation, test the choice.

    Args:
        train_feats: {kind: (N, D_kind)} (any float dtype; converted per batch).
        train_labels: (N,) int >= 0.
        test_feats: {kind: (M, D_kind)}; test_labels: (M,).
        kinds: feature kinds to probe (default: every key of train_feats).
        lrs: learning rates (default: `OFFICIAL_LRS` x batch_size / 256).
        epochs: passes over the train split; the cosine schedule spans them.
        val_fraction: share of the train set held out for selection.

    Returns:
        {"best": {feature, lr, val_top1, test_top1[, test_top5]},
         "per_feature": {kind: same for that kind's best lr},
         "grid": [{feature, lr, val_top1}, ...], "n_train", "n_val", "n_test", "num_classes",
         "epochs", "batch_size", "lrs"}.
    """
    device = torch.device(device)
    kinds = list(kinds) if kinds is not None else list(train_feats)
    if not kinds:
        raise ValueError("no feature kind to probe")
    if lrs is None:
        lrs = [lr * batch_size / 256 for lr in OFFICIAL_LRS]
    lrs = [float(lr) for lr in lrs]
    for lab, what in ((train_labels, "train"), (test_labels, "test")):
        if lab.numel() and int(lab.min()) < 0:
            raise ValueError(f"{what} labels must be >= 0 (an unlabelled dataset gives -1)")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()) if test_labels.numel() else 0)) + 1

    tr_idx, val_idx = split_train_val(len(train_labels), val_fraction, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lr_vec = torch.tensor(lrs, device=device)
    params: dict[str, tuple[Tensor, Tensor]] = {}
    for kind in kinds:
        dim = train_feats[kind].shape[1]
        W = (torch.randn(len(lrs), num_classes, dim, generator=g) * 0.01).to(device).requires_grad_()
        b = torch.zeros(len(lrs), num_classes, device=device, requires_grad=True)
        params[kind] = (W, b)
    momenta = {kind: (torch.zeros_like(W), torch.zeros_like(b)) for kind, (W, b) in params.items()}

    steps_per_epoch = math.ceil(len(tr_idx) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        for s0 in range(0, len(order), batch_size):
            rows = order[s0 : s0 + batch_size]
            y = train_labels[rows].to(device)
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine from lr to 0
            loss = torch.zeros((), device=device)
            for kind, (W, b) in params.items():
                x = train_feats[kind][rows].to(device, torch.float32)
                # Mean over the batch per classifier, summed over classifiers: independent grads.
                loss = loss + F.cross_entropy(_logits(x, W, b).reshape(-1, num_classes), y.repeat_interleave(len(lrs)),
                                              reduction="sum") / len(rows)
            grads = torch.autograd.grad(loss, [p for pair in params.values() for p in pair])
            with torch.no_grad():
                for j, (kind, (W, b)) in enumerate(params.items()):
                    for p, grad, buf in ((W, grads[2 * j], momenta[kind][0]), (b, grads[2 * j + 1], momenta[kind][1])):
                        if weight_decay:
                            grad = grad + weight_decay * p
                        buf.mul_(momentum).add_(grad)  # torch.optim.SGD semantics (dampening 0)
                        p.sub_(buf * (lr_vec * scale).view(-1, *([1] * (p.dim() - 1))))
            step += 1

    weights = {k: (W.detach(), b.detach()) for k, (W, b) in params.items()}
    val_acc = _accuracy(weights, {k: train_feats[k][val_idx] for k in kinds}, train_labels[val_idx], device)
    test_acc = _accuracy(weights, test_feats, test_labels, device)

    def entry(kind: str, j: int) -> dict[str, Any]:
        e: dict[str, Any] = {"feature": kind, "lr": lrs[j], "val_top1": float(val_acc[kind][0][j]),
                             "test_top1": float(test_acc[kind][0][j])}
        if num_classes >= 5:
            e["test_top5"] = float(test_acc[kind][1][j])
        return e

    # argmax takes the first maximum: ties go to the earlier kind, then the smaller lr.
    per_feature = {kind: entry(kind, int(torch.argmax(val_acc[kind][0]))) for kind in kinds}
    best = max(per_feature.values(), key=lambda e: e["val_top1"])
    grid = [{"feature": k, "lr": lr, "val_top1": float(val_acc[k][0][j])} for k in kinds for j, lr in enumerate(lrs)]
    return {"best": best, "per_feature": per_feature, "grid": grid, "n_train": len(tr_idx), "n_val": len(val_idx),
            "n_test": len(test_labels), "num_classes": num_classes, "epochs": epochs, "batch_size": batch_size,
            "lrs": lrs}

"""Weighted k-NN classification on frozen features (Wu et al. 2018; the DINO / DINOv2 protocol).

Features are L2-normalised; each test sample takes its k most cosine-similar train samples, each
voting for its label with weight exp(similarity / T) (T = 0.07); the class scores give top-1 and
top-5 accuracy. One top-k_max search serves every k.

The similarity matrix is never materialised: test rows are taken `chunk_size` at a time and train
rows `train_chunk_size` at a time, keeping a running top-k_max per test row across train blocks.
Peak memory is chunk_size x train_chunk_size similarities plus the features themselves, so a
1M x 1k train set and a large test set fit.

Example:
    >>> res = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20))
    >>> res[20]["top1"]          # percent
    93.4
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["few_shot_indices", "knn_classify", "knn_scores", "topk_neighbors"]


def few_shot_indices(labels: Tensor, n_per_class: int, seed: int = 0) -> Tensor:
    """Indices of `n_per_class` samples of every class, drawn without replacement with `seed`.

    A class with fewer samples contributes all of them (with a warning). Indices come sorted.
    """
    if n_per_class < 1:
        raise ValueError(f"few-shot n must be >= 1, got {n_per_class}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    short = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < n_per_class:
            short.append(c)
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n_per_class]])
    if short:
        warnings.warn(f"few-shot: classes {short} have fewer than {n_per_class} samples; all of them are used")
    return torch.cat(picked).sort().values


def topk_neighbors(
    train_feats: Tensor,
    test_feats: Tensor,
    k: int,
    chunk_size: int = 1024,
    train_chunk_size: int = 16384,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Cosine top-k of every test row among the train rows, chunked over both.

    Args:
        train_feats: (N, D), any float dtype, any device; normalised block by block.
        test_feats: (M, D).
        k: neighbours, 1 <= k <= N.

    Returns:
        (similarities (M, k) float32, train indices (M, k) int64), best first, on `device`.
    """
    device = torch.device(device)
    n_train = train_feats.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be in [1, {n_train}], got {k}")
    train = train_feats.to(device)  # moved once; normalised per block to avoid a second full copy
    sims_out, idx_out = [], []
    for t0 in range(0, test_feats.shape[0], chunk_size):
        q = F.normalize(test_feats[t0 : t0 + chunk_size].to(device, torch.float32), dim=1)
        best_s = torch.empty(q.shape[0], 0, device=device)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=device)
        for b0 in range(0, n_train, train_chunk_size):
            block = F.normalize(train[b0 : b0 + train_chunk_size].to(torch.float32), dim=1)
            sims = q @ block.T  # (chunk, block)
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)
            # Merge with the running best: top-k of (previous k) + (this block's k) is the top-k
            # of everything seen so far.
            best_s, pos = torch.cat([best_s, s], dim=1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + b0], dim=1).gather(1, pos)
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out), torch.cat(idx_out)


def knn_scores(sims: Tensor, neighbor_labels: Tensor, num_classes: int, temperature: float = 0.07) -> Tensor:
    """Class scores (M, C) from the k nearest neighbours: sum of exp(sim / T) per label.

    Args:
        sims: (M, k) similarities; neighbor_labels: (M, k) int64 labels of those neighbours.
    """
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbor_labels, weights)


def _check_labels(labels: Tensor, what: str) -> None:
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{what} labels must be >= 0 (an unlabelled dataset gives -1)")


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
    train_chunk_size: int = 16384,
    few_shot: int | None = None,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy for every k.

    Args:
        train_feats: (N, D); train_labels: (N,) int >= 0.
        test_feats: (M, D); test_labels: (M,) int >= 0.
        ks: neighbour counts; a k above N is clamped to N (reported as "k_used").
        temperature: vote weight exp(sim / T).
        num_classes: default max label + 1.
        chunk_size / train_chunk_size: rows of test / train per similarity block.
        few_shot: use only this many train samples per class (drawn with `seed`).

    Returns:
        {k: {"top1": %, "top5": % (only with >= 5 classes), "k_used": int}}.
    """
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of rows")
    if not len(ks):
        raise ValueError("no k given")
    _check_labels(train_labels, "train")
    _check_labels(test_labels, "test")
    if few_shot is not None:
        keep = few_shot_indices(train_labels, few_shot, seed)
        train_feats, train_labels = train_feats[keep], train_labels[keep]
    n_train = train_feats.shape[0]
    if n_train == 0:
        raise ValueError("empty train set")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()) if test_labels.numel() else 0)) + 1
    k_used = {k: max(1, min(int(k), n_train)) for k in ks}
    k_max = max(k_used.values())

    sims, idx = topk_neighbors(train_feats, test_feats, k_max, chunk_size, train_chunk_size, device)
    neighbor_labels = train_labels.to(sims.device)[idx]  # (M, k_max)
    target = test_labels.to(sims.device).view(-1, 1)
    results: dict[int, dict[str, float]] = {}
    for k in ks:
        ku = k_used[k]
        # Chunked again only to bound the (M, C) score matrix for huge test sets.
        hits1 = hits5 = 0
        for r0 in range(0, sims.shape[0], 65536):
            scores = knn_scores(sims[r0 : r0 + 65536, :ku], neighbor_labels[r0 : r0 + 65536, :ku], num_classes, temperature)
            top = scores.topk(min(5, num_classes), dim=1).indices
            t = target[r0 : r0 + 65536]
            hits1 += int((top[:, :1] == t).sum())
            hits5 += int((top == t).any(dim=1).sum())
        m = max(1, sims.shape[0])
        res = {"top1": 100.0 * hits1 / m, "k_used": ku}
        if num_classes >= 5:
            res["top5"] = 100.0 * hits5 / m
        results[k] = res
    return results

"""Image retrieval with frozen features: cosine ranking, mAP and recall@k, class folders as relevance.

Each query ranks the whole gallery by cosine similarity of L2-normalised features ([CLS], or GeM
over patch tokens). A gallery image is relevant to a query when both carry the same label. Per
query: average precision (mean over the relevant images of the precision at their rank) and
recall@k (1 when at least one relevant image is among the first k, the metric-learning
convention); both averaged over queries. Without a query set every gallery image queries the
others (leave-one-out: it never retrieves itself). Queries with no relevant image are left out
and counted. Similarities are computed for a few queries at a time, so the memory is bounded by
`max_elements` similarities whatever the gallery size.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["evaluate_retrieval", "retrieval_metrics"]


def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    leave_one_out: bool = False,
    max_elements: int = 1 << 24,
) -> dict[str, Any]:
    """mAP and recall@k of `query` (Q, D) against `gallery` (N, D); see the module docstring.

    `leave_one_out`: query i is gallery row i (the same set), excluded from its own ranking.
    Returns {"map", "recall@k"..., "n_queries", "n_without_relevant"} (fractions in 0-1).
    """
    if leave_one_out and len(query) != len(gallery):
        raise ValueError("leave_one_out needs the query set to be the gallery")
    q = F.normalize(query.float(), dim=1)
    g = F.normalize(gallery.float(), dim=1)
    g_labels = gallery_labels.long()
    rows = max(1, min(len(q), max_elements // max(1, len(g))))
    ap_sum, hits = 0.0, {k: 0.0 for k in ks}
    counted, without = 0, 0
    for start in range(0, len(q), rows):
        sims = q[start:start + rows] @ g.T  # (c, N)
        labels = query_labels[start:start + rows].long()
        relevant_all = labels[:, None] == g_labels[None, :]
        if leave_one_out:
            own = torch.arange(start, start + len(sims))
            sims[torch.arange(len(sims)), own] = float("-inf")
            relevant_all[torch.arange(len(sims)), own] = False
        n_relevant = relevant_all.sum(1)
        order = sims.argsort(dim=1, descending=True, stable=True)
        relevant = relevant_all.gather(1, order).float()  # (c, N) in ranked order
        ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float32)
        precision_at_hits = relevant.cumsum(1) / ranks * relevant
        has = n_relevant > 0
        without += int((~has).sum())
        counted += int(has.sum())
        ap_sum += float((precision_at_hits.sum(1)[has] / n_relevant[has]).sum())
        for k in ks:
            hits[k] += float((relevant[:, :k].sum(1)[has] > 0).sum())
    if counted == 0:
        raise ValueError("no query has a relevant gallery image (no shared label)")
    return {"map": ap_sum / counted, **{f"recall@{k}": hits[k] / counted for k in ks},
            "n_queries": counted, "n_without_relevant": without}


def evaluate_retrieval(
    backbone: Any,
    gallery: Dataset | str | os.PathLike,
    query: Dataset | str | os.PathLike | None = None,
    features: Sequence[str] = ("cls", "gem"),
    ks: Sequence[int] = (1, 5, 10),
    **embed: Any,
) -> dict[str, Any]:
    """Retrieval of `query` images (or leave-one-out in `gallery`) by each feature kind.

    `embed`: the options of `dinokit.eval.split_features` (arch, random_init, batch_size, device,
    resize, crop, ...). Returns {"protocol": "retrieval", "results": {feature: metrics}, ...}.
    """
    from dinokit.eval.commands import split_features

    t0 = time.time()
    gal, qry, info = split_features(backbone, gallery, query, features, **embed)
    qry = gal if qry is None else qry
    results = {}
    for name in info["features"]:
        results[name] = retrieval_metrics(qry.features[name], qry.labels, gal.features[name], gal.labels, ks,
                                          leave_one_out=query is None)
    info["gallery"] = info.pop("train")
    info["query"] = info.pop("test") if query is not None else "leave-one-out (the gallery)"
    return {"protocol": "retrieval", "results": results, "ks": list(ks), "relevance": "same class label",
            "similarity": "cosine", **info, "seconds": round(time.time() - t0, 2)}


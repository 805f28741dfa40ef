"""Hierarchical k-means and balanced sampling ("Automatic Data Curation for Self-Supervised
Learning: A Clustering-Based Approach", Vo et al. 2024, the follow-up to DINOv2's curation).

Web-scale pools are dominated by a few concepts; flat k-means spends most centroids on them, so
sampling "the same number per cluster" still over-represents them. The follow-up builds a
hierarchy instead:

1. Level 1: k-means of the pool into K_1 clusters. Level t > 1: k-means of level t-1's centroids
   into K_t clusters (K_1 > K_2 > ...). Higher levels group clusters into broader concepts.
2. Optional resampling at each level (`resample_steps`): k-means again on the union of the
   `resample_points` points closest to each centroid (started from the current centroids), then
   re-assignment of all points. Taking the same number from every cluster flattens the density,
   so the centroids spread towards rare concepts.
3. Balanced sampling, top down: the target number of images is split as evenly as possible over
   the top-level clusters (a cluster smaller than its share gives everything and the rest is
   spread over the others: water-filling), each cluster's share over its children the same way,
   down to level 1, where images are drawn at random (seeded).

Default levels scale the paper's 4-level hierarchy (1.2B images -> 10M, 500k, 50k, 10k clusters:
120, 20, 10 and 5 items per cluster) to the pool; levels below 2 clusters are dropped.

Example:
    >>> h = hierarchical_kmeans(Embeddings("pool_emb/"), default_levels(50_000))
    >>> sample = balanced_sample(h, 25_000)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinokit.curate.index import (
    ArrayEmbeddings,
    CurateError,
    Embeddings,
    assign,
    kmeans,
)
from dinokit.curate.stage import load_pool, write_stage

__all__ = ["Hierarchy", "balanced_sample", "default_levels", "hierarchical_kmeans", "run_cluster", "split_budget"]

# items per cluster at each level of the paper's hierarchy (1.2B / 10M, 10M / 500k, 500k / 50k, 50k / 10k)
PAPER_RATIOS = (120, 20, 10, 5)

UPPER_NREDO = 10

Pool = Embeddings | ArrayEmbeddings


@dataclass
class Hierarchy:
    """`labels[t]`: cluster (level t + 1) of every item of level t (level 0 = pool positions);
    `centroids[t]`: (K_{t+1}, dim) unit vectors."""

    labels: list[np.ndarray]
    centroids: list[np.ndarray]

    @property
    def levels(self) -> list[int]:
        return [len(c) for c in self.centroids]

    def leaf_of_top(self) -> np.ndarray:
        """Top-level cluster of every pool position."""
        lab = self.labels[0]
        for up in self.labels[1:]:
            lab = up[lab]
        return lab


def default_levels(n: int) -> list[int]:
    """The paper's cluster-size ratios applied to a pool of n (levels with < 2 clusters dropped)."""
    levels, items = [], n
    for ratio in PAPER_RATIOS:
        k = items // ratio
        if k < 2:
            break
        levels.append(int(k))
        items = k
    return levels or [max(1, min(2, n))]


def _kmeans_level(points: Pool, k: int, niter: int, seed: int, resample_steps: int, resample_points: int,
                  gpu: bool | None, nredo: int) -> tuple[np.ndarray, np.ndarray]:
    centroids = kmeans(points, k, niter=niter, seed=seed, gpu=gpu, nredo=nredo)
    labels, sims = assign(points, centroids, gpu=gpu)
    if resample_steps and not resample_points:  # default: the median cluster size
        resample_points = max(1, int(np.median(np.bincount(labels, minlength=k))))
    for step in range(resample_steps):
        # the resample_points members closest to each centroid: an equal share per cluster
        order = np.lexsort((-sims, labels))
        start = np.searchsorted(labels[order], labels[order], side="left")
        chosen = np.sort(order[(np.arange(len(order)) - start) < resample_points])
        if len(chosen) < k:
            break
        centroids = kmeans(points, k, niter=niter, seed=seed + step + 1, gpu=gpu, init=centroids, positions=chosen)
        labels, sims = assign(points, centroids, gpu=gpu)
    return labels, centroids


def hierarchical_kmeans(pool: Pool, levels: Sequence[int], niter: int = 20, seed: int = 0, resample_steps: int = 0,
                        resample_points: int = 0, gpu: bool | None = None) -> Hierarchy:
    """k-means of the pool into levels[0] clusters, of those centroids into levels[1], ...

    `resample_points` 0 means: the median cluster size of the level.
    """
    if not levels or any(b >= a for a, b in zip(levels, levels[1:])) or levels[0] > pool.n or levels[-1] < 1:
        raise CurateError(f"levels must be decreasing cluster counts with {pool.n} >= K_1 and K_last >= 1, got {list(levels)}")
    labels, centroids = [], []
    points: Pool = pool
    for t, k in enumerate(levels):
        # Upper levels cluster a few centroids: cheap, so several random starts guard against the
        # local optima of Faiss' random initialisation (a rare concept merged into a common one).
        lab, cen = _kmeans_level(points, k, niter, seed + 1000 * t, resample_steps, resample_points, gpu,
                                 nredo=1 if t == 0 else UPPER_NREDO)
        labels.append(lab)
        centroids.append(cen)
        points = ArrayEmbeddings(cen)
    return Hierarchy(labels, centroids)


def split_budget(budget: int, capacities: np.ndarray) -> np.ndarray:
    """Integer water-filling: allot min(capacity, level) to each, the level as high as the budget
    allows; the few left-over units go one each to the lowest-index items still below capacity.

    >>> split_budget(10, np.array([1, 8, 8])).tolist()
    [1, 5, 4]
    """
    caps = np.asarray(capacities, dtype=np.int64)
    budget = int(min(budget, caps.sum()))
    if budget <= 0:
        return np.zeros_like(caps)
    lo, hi = 0, int(caps.max())
    while lo < hi:  # the largest level with sum(min(caps, level)) <= budget
        mid = (lo + hi + 1) // 2
        if np.minimum(caps, mid).sum() <= budget:
            lo = mid
        else:
            hi = mid - 1
    out = np.minimum(caps, lo)
    rest = budget - int(out.sum())
    room = np.nonzero(caps > out)[0][:rest]
    out[room] += 1
    return out


def balanced_sample(h: Hierarchy, target: int, seed: int = 0) -> np.ndarray:
    """`target` pool positions spread as evenly as possible over the hierarchy (sorted)."""
    n = len(h.labels[0])
    if target < 0:
        raise CurateError(f"target must be >= 0, got {target}")
    rng = np.random.default_rng(seed)
    # children of each cluster at each level, and the number of pool items under every cluster
    n_items = [np.ones(n, dtype=np.int64)]
    for lab, cen in zip(h.labels, h.centroids):
        n_items.append(np.bincount(lab, weights=n_items[-1], minlength=len(cen)).astype(np.int64))
    children = []
    for lab, cen in zip(h.labels, h.centroids):
        order = np.argsort(lab, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(lab, minlength=len(cen)))])
        children.append((order, bounds))
    picked: list[np.ndarray] = []

    def descend(level: int, items: np.ndarray, budget: int) -> None:
        # `items`: clusters of `level` (>= 1) sharing one parent; level 1 draws pool positions
        share = split_budget(budget, n_items[level][items])
        order, bounds = children[level - 1]
        for item, b in zip(items, share):
            if b:
                kids = order[bounds[item]:bounds[item + 1]]
                if level == 1 and b < len(kids):
                    picked.append(np.sort(rng.choice(kids, b, replace=False)))
                elif level == 1:
                    picked.append(kids)
                else:
                    descend(level - 1, kids, int(b))

    top = len(h.centroids)
    descend(top, np.arange(h.levels[-1]), min(target, n))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def run_cluster(emb_dir: str | os.PathLike, out_dir: str | os.PathLike, target: float = 0.5, levels: Sequence[int] | None = None,
                after: Sequence[str] = (), niter: int = 20, resample_steps: int = 0, resample_points: int = 0,
                seed: int = 0, gpu: bool | None = None) -> dict[str, Any]:
    """`dinokit curate cluster`: hierarchical k-means, then a balanced sample of `target` images
    (a count, or a fraction of the pool when < 1). Writes keep.npy / keep.txt (the sample) and
    `clusters.npz` (`level{t}_labels`, `level{t}_centroids` per level, `pool_rows`)."""
    t0 = time.time()
    pool = load_pool(emb_dir, after)
    n_target = round(target * pool.n) if 0 < target < 1 else int(target)
    if n_target < 1:
        raise CurateError(f"--target must be a count >= 1 or a fraction in (0, 1), got {target}")
    levels = list(levels) if levels else default_levels(pool.n)
    h = hierarchical_kmeans(pool, levels, niter, seed, resample_steps, resample_points, gpu)
    sample = balanced_sample(h, n_target, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"pool_rows": pool.rows}
    for t, (lab, cen) in enumerate(zip(h.labels, h.centroids), start=1):
        arrays[f"level{t}_labels"] = lab
        arrays[f"level{t}_centroids"] = cen
    np.savez(out / "clusters.npz", **arrays)
    top = h.leaf_of_top()
    sizes = np.bincount(top, minlength=h.levels[-1])
    picked = np.bincount(top[sample], minlength=h.levels[-1])
    summary = {"levels": h.levels, "target": n_target, "niter": niter, "resample_steps": resample_steps,
               "top_cluster_sizes": sizes.tolist(), "top_cluster_sampled": picked.tolist(),
               "seconds": round(time.time() - t0, 2)}
    return write_stage(out, "cluster", pool, sample, summary, after)

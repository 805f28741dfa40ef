"""Retrieval of pool images close to curated seed sets (DINOv2's LVD-142M pipeline).

- Sample-based (`retrieve_sample`, for large seed sets): each seed image's N = 4 nearest pool
  images. A pool image found by several seeds is selected once (no duplicates across seeds); it
  is credited to the most similar seed.
- Cluster-based (`retrieve_cluster`, for small seed sets): k-means of the pool into K clusters
  (100,000 in the paper; here at most pool size / 40 so that every cluster is fitted on enough
  points); for each seed set, the clusters its images fall in, from which up to `per_cluster`
  images each are sampled, and at most `per_seed_set` images in all (seeded random choices).

Example:
    >>> sel = retrieve_sample(Embeddings("pool_emb/"), [Embeddings("seeds_emb/")], n_per_seed=4)
    >>> sel.positions.shape
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
    IndexPlan,
    assign,
    build_index,
    choose_index,
    kmeans,
    search_batches,
)
from dinokit.curate.stage import load_pool, write_stage

__all__ = ["N_CLUSTERS", "N_PER_SEED", "Retrieved", "retrieve_cluster", "retrieve_sample", "run_retrieve"]

N_PER_SEED = 4
N_CLUSTERS = 100_000
MIN_POINTS_PER_CLUSTER = 40

Pool = Embeddings | ArrayEmbeddings


@dataclass
class Retrieved:
    """Selected pool positions (sorted) with, per position, the seed set, seed position and similarity
    that selected it (`seed_set`, `seed`, `sim`; cluster-based: `seed` = -1, `sim` = the cluster id)."""

    positions: np.ndarray
    seed_set: np.ndarray
    seed: np.ndarray
    sim: np.ndarray
    plan: IndexPlan
    info: dict[str, Any]


def _check_dims(pool: Pool, seed_sets: Sequence[Pool]) -> None:
    if not seed_sets:
        raise CurateError("retrieval needs at least one seed set")
    for i, s in enumerate(seed_sets):
        if s.dim != pool.dim:
            raise CurateError(f"seed set {i} has {s.dim}-d embeddings, the pool {pool.dim}-d: embed both with the same backbone")


def retrieve_sample(pool: Pool, seed_sets: Sequence[Pool], n_per_seed: int = N_PER_SEED, index: str = "auto",
                    nprobe: int | None = None, seed: int = 0, gpu: bool | None = None) -> Retrieved:
    """The `n_per_seed` nearest pool images of every seed image, each pool image selected once."""
    _check_dims(pool, seed_sets)
    if n_per_seed < 1:
        raise CurateError(f"N (images per seed) must be >= 1, got {n_per_seed}")
    idx, plan = build_index(pool, choose_index(pool.n, pool.dim, index, nprobe), seed=seed, gpu=gpu)
    best = np.full(pool.n, -np.inf, dtype=np.float32)
    by = np.full((pool.n, 2), -1, dtype=np.int64)
    for e, seeds in enumerate(seed_sets):
        for pos, sims, ids in search_batches(idx, seeds, n_per_seed):
            ok = ids >= 0
            q = np.broadcast_to(pos[:, None], ids.shape)[ok]
            ids, sims = ids[ok], sims[ok]
            # several seeds may find one pool image: keep the most similar (stable on ties)
            order = np.lexsort((-sims, ids))
            ids, sims, q = ids[order], sims[order], q[order]
            first = np.concatenate([[True], ids[1:] != ids[:-1]])
            ids, sims, q = ids[first], sims[first], q[first]
            better = sims > best[ids]
            best[ids[better]] = sims[better]
            by[ids[better]] = np.stack([np.full(better.sum(), e), q[better]], axis=1)
    positions = np.nonzero(by[:, 0] >= 0)[0]
    n_seeds = sum(s.n for s in seed_sets)
    info = {"mode": "sample", "n_per_seed": n_per_seed, "n_seeds": n_seeds,
            "n_found": int(n_seeds * min(n_per_seed, pool.n)), "n_unique": len(positions)}
    return Retrieved(positions, by[positions, 0], by[positions, 1], best[positions], plan, info)


def default_clusters(n: int, requested: int = N_CLUSTERS) -> int:
    """K for a pool of n: the paper's 100,000, at most n / 40 (and >= 1)."""
    return int(max(1, min(requested, n // MIN_POINTS_PER_CLUSTER)))


def retrieve_cluster(pool: Pool, seed_sets: Sequence[Pool], n_clusters: int = N_CLUSTERS, per_cluster: int = 10_000,
                     per_seed_set: int = 1_000_000, niter: int = 20, seed: int = 0, gpu: bool | None = None) -> Retrieved:
    """Per seed set: the pool clusters its images fall in, up to `per_cluster` images sampled from
    each, at most `per_seed_set` in all; the union over seed sets."""
    _check_dims(pool, seed_sets)
    if per_cluster < 1 or per_seed_set < 1:
        raise CurateError(f"per-cluster and per-seed-set caps must be >= 1, got {per_cluster}, {per_seed_set}")
    k = default_clusters(pool.n, n_clusters)
    centroids = kmeans(pool, k, niter=niter, seed=seed, gpu=gpu)
    labels, _ = assign(pool, centroids, gpu=gpu)
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])
    rng = np.random.default_rng(seed)
    chosen_set = np.full(pool.n, -1, dtype=np.int64)
    chosen_cluster = np.full(pool.n, -1, dtype=np.int64)
    per_set: list[dict[str, int]] = []
    for e, seeds in enumerate(seed_sets):
        clusters = np.unique(assign(seeds, centroids, gpu=gpu)[0])
        picked = []
        for c in clusters:
            members = order[bounds[c]:bounds[c + 1]]
            if len(members) > per_cluster:
                members = np.sort(rng.choice(members, per_cluster, replace=False))
            picked.append(members)
        cand = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        if len(cand) > per_seed_set:
            cand = np.sort(rng.choice(cand, per_seed_set, replace=False))
        new = cand[chosen_set[cand] < 0]
        chosen_set[new] = e
        chosen_cluster[new] = labels[new]
        per_set.append({"n_seeds": int(seeds.n), "n_clusters_hit": len(clusters), "n_selected": len(cand)})
    positions = np.nonzero(chosen_set >= 0)[0]
    info = {"mode": "cluster", "n_clusters": k, "per_cluster": per_cluster, "per_seed_set": per_seed_set,
            "seed_sets": per_set, "n_unique": len(positions)}
    return Retrieved(positions, chosen_set[positions], np.full(len(positions), -1), chosen_cluster[positions].astype(np.float32),
                     IndexPlan("kmeans", nlist=k, reason="cluster-based retrieval"), info)


def run_retrieve(emb_dir: str | os.PathLike, out_dir: str | os.PathLike, seeds: Sequence[str], mode: str = "sample",
                 after: Sequence[str] = (), n_per_seed: int = N_PER_SEED, n_clusters: int = N_CLUSTERS,
                 per_cluster: int = 10_000, per_seed_set: int = 1_000_000, index: str = "auto", nprobe: int | None = None,
                 seed: int = 0, gpu: bool | None = None) -> dict[str, Any]:
    """`dinokit curate retrieve`: writes keep.npy / keep.txt (the selected pool images) and
    `selected.tsv`: `path<TAB>seed set<TAB>seed image (sample mode) or cluster id (cluster mode)<TAB>similarity`."""
    t0 = time.time()
    if mode not in ("sample", "cluster"):
        raise CurateError(f"retrieval mode must be 'sample' or 'cluster', got {mode!r}")
    pool = load_pool(emb_dir, after)
    seed_sets = [Embeddings(s) for s in seeds]
    for s, e in zip(seeds, seed_sets):
        if e.manifest.get("source") != pool.manifest.get("source"):
            raise CurateError(f"seed set {s} was embedded with {e.manifest.get('source')!r}, the pool with "
                              f"{pool.manifest.get('source')!r}: similarities would not be comparable")
    if mode == "sample":
        res = retrieve_sample(pool, seed_sets, n_per_seed, index, nprobe, seed, gpu)
        lines = [f"{p}\t{seeds[int(e)]}\t{seed_sets[int(e)].paths([int(q)])[0]}\t{s:.4f}\n"
                 for p, e, q, s in zip(pool.paths(res.positions), res.seed_set, res.seed, res.sim)]
    else:
        res = retrieve_cluster(pool, seed_sets, n_clusters, per_cluster, per_seed_set, seed=seed, gpu=gpu)
        lines = [f"{p}\t{seeds[int(e)]}\t{int(c)}\t-\n" for p, e, c in zip(pool.paths(res.positions), res.seed_set, res.sim)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selected.tsv").write_text("".join(lines))
    summary = {**res.info, "seeds": [os.fspath(Path(s).resolve()) for s in seeds], "index": res.plan.to_dict(),
               "seconds": round(time.time() - t0, 2)}
    return write_stage(out, "retrieve", pool, res.positions, summary, after)

"""Self-deduplication and relative deduplication (DINOv2's LVD-142M pipeline).

Self-deduplication (`self_dedup`): every pool embedding's k = 64 nearest neighbours (cosine), an
edge for every pair with similarity > 0.6 (either direction found it), connected components of
that graph; each component keeps ONE image, its **representative: the member with the lowest row
number**, i.e. the first in pool order (image folders are read in sorted path order, file lists in
line order). The others are dropped. Deterministic: no ties to break, no randomness.

Relative deduplication (`relative_dedup`): a pool image is dropped when its nearest neighbour in
any evaluation set has similarity > 0.45, so no copy of a test image is trained on.

Example:
    >>> res = self_dedup(Embeddings("pool_emb/"))
    >>> len(res.keep), len(res.groups)           # kept positions, components of >= 2 images
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dinokit.curate.index import (
    ArrayEmbeddings,
    CurateError,
    Embeddings,
    IndexPlan,
    build_index,
    choose_index,
    ivf_self_join,
    search_batches,
)
from dinokit.curate.stage import load_pool, write_stage

__all__ = ["RELATIVE_THRESHOLD", "SELF_K", "SELF_THRESHOLD", "DedupResult", "relative_dedup", "run_dedup", "self_dedup"]

SELF_K = 64
SELF_THRESHOLD = 0.6
RELATIVE_THRESHOLD = 0.45

Pool = Embeddings | ArrayEmbeddings


@dataclass
class DedupResult:
    """keep / drop: positions in the pool (sorted). Self-dedup: `component` (n,) component id per
    position and `groups`, the components of >= 2 images (representative first); `edges` (E, 2)
    positions with `edge_sims` (E,). Relative: `match` (n_dropped, 3) = (eval set, eval position,
    similarity) per dropped position."""

    keep: np.ndarray
    drop: np.ndarray
    plan: IndexPlan
    component: np.ndarray | None = None
    groups: list[np.ndarray] = field(default_factory=list)
    edges: np.ndarray | None = None
    edge_sims: np.ndarray | None = None
    match: np.ndarray | None = None


def _check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise CurateError(f"a cosine-similarity threshold must be in [-1, 1], got {threshold}")


def self_dedup(pool: Pool, k: int = SELF_K, threshold: float = SELF_THRESHOLD, index: str = "auto",
               nprobe: int | None = None, seed: int = 0, gpu: bool | None = None) -> DedupResult:
    """Connected components of the k-NN graph thresholded at `threshold`; one image kept per component."""
    _check_threshold(threshold)
    if k < 1:
        raise CurateError(f"k must be >= 1, got {k}")
    plan = choose_index(pool.n, pool.dim, index, nprobe)
    if plan.kind == "flat":
        idx, plan = build_index(pool, plan, seed=seed, gpu=gpu)
        src, dst, sim = [], [], []
        for pos, sims, ids in search_batches(idx, pool, k + 1):  # + 1: the query finds itself
            mask = (sims > threshold) & (ids >= 0) & (ids != pos[:, None])
            rows, cols = np.nonzero(mask)
            keep = np.nonzero(np.cumsum(mask, axis=1)[rows, cols] <= k)[0]  # at most k others per query
            src.append(pos[rows[keep]])
            dst.append(ids[rows[keep], cols[keep]])
            sim.append(sims[rows[keep], cols[keep]])
        i, j = np.concatenate(src), np.concatenate(dst)
        s = np.concatenate(sim).astype(np.float32)
    else:  # the pool is the query set: an IVF self-join (see `ivf_self_join`); IVF-PQ is not needed
        plan.kind, plan.pq_m = "ivf_join", 0
        i, j, s = ivf_self_join(pool, k, threshold, plan.nlist, plan.nprobe, seed=seed, gpu=gpu)
    n_comp, comp = connected_components(coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(pool.n, pool.n)),
                                        directed=False)
    # Representative = lowest position in the component: the first occurrence of each label.
    _, first = np.unique(comp, return_index=True)
    keep = np.sort(first)
    is_kept = np.zeros(pool.n, dtype=bool)
    is_kept[keep] = True
    sizes = np.bincount(comp, minlength=n_comp)
    order = np.argsort(comp, kind="stable")  # positions grouped by component, ascending within
    bounds = np.cumsum(sizes)
    groups = [order[b - c:b] for b, c in zip(bounds, sizes) if c > 1]
    groups.sort(key=lambda g: int(g[0]))
    return DedupResult(keep, np.nonzero(~is_kept)[0], plan, component=comp, groups=groups,
                       edges=np.stack([i, j], axis=1), edge_sims=s)


def relative_dedup(pool: Pool, eval_sets: Sequence[Pool], threshold: float = RELATIVE_THRESHOLD,
                   index: str = "auto", nprobe: int | None = None, seed: int = 0, gpu: bool | None = None) -> DedupResult:
    """Drop pool images whose nearest image in any of `eval_sets` is more similar than `threshold`."""
    _check_threshold(threshold)
    if not eval_sets:
        raise CurateError("relative deduplication needs at least one evaluation set")
    best = np.full(pool.n, -np.inf, dtype=np.float32)
    match = np.full((pool.n, 2), -1, dtype=np.int64)
    plan = IndexPlan("flat")
    for e, ev in enumerate(eval_sets):
        if ev.dim != pool.dim:
            raise CurateError(f"evaluation set {e} has {ev.dim}-d embeddings, the pool {pool.dim}-d: embed both with the same backbone")
        idx, plan = build_index(ev, choose_index(ev.n, ev.dim, index, nprobe), seed=seed, gpu=gpu)
        for pos, sims, ids in search_batches(idx, pool, 1):
            better = sims[:, 0] > best[pos]
            best[pos[better]] = sims[better, 0]
            match[pos[better]] = np.stack([np.full(better.sum(), e), ids[better, 0]], axis=1)
    dropped = best > threshold
    drop = np.nonzero(dropped)[0]
    info = np.concatenate([match[drop].astype(np.float64), best[drop, None].astype(np.float64)], axis=1)
    return DedupResult(np.nonzero(~dropped)[0], drop, plan, match=info)


# ----------------------------------------------------------------------------- stage on disk


def run_dedup(emb_dir: str | os.PathLike, out_dir: str | os.PathLike, after: Sequence[str] = (),
              against: Sequence[str] = (), k: int = SELF_K, threshold: float | None = None, index: str = "auto",
              nprobe: int | None = None, seed: int = 0, gpu: bool | None = None) -> dict[str, Any]:
    """`dinokit curate dedup`: self-deduplication, or relative deduplication when `against` is given.

    Writes (besides keep.npy / keep.txt / summary.json) `drop.tsv`: `path<TAB>kept representative
    or eval image<TAB>similarity`; for self-deduplication also `groups.jsonl`, one duplicate group
    per line: {"size", "keep", "members" (paths, representative first), "rows"}.
    """
    t0 = time.time()
    pool = load_pool(emb_dir, after)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if against:
        threshold = RELATIVE_THRESHOLD if threshold is None else threshold
        evals = [Embeddings(a) for a in against]
        for a, ev in zip(against, evals):
            if ev.manifest.get("source") != pool.manifest.get("source"):
                raise CurateError(f"{a} was embedded with {ev.manifest.get('source')!r}, the pool with "
                                  f"{pool.manifest.get('source')!r}: similarities would not be comparable")
        res = relative_dedup(pool, evals, threshold, index, nprobe, seed, gpu)
        paths = pool.paths(res.drop)
        lines = []
        for p, (e, j, s) in zip(paths, res.match):  # type: ignore[union-attr]
            lines.append(f"{p}\t{evals[int(e)].paths([int(j)])[0]}\t{s:.4f}\n")
        (out / "drop.tsv").write_text("".join(lines))
        summary = {"mode": "relative", "against": [os.fspath(Path(a).resolve()) for a in against],
                   "threshold": threshold, "index": res.plan.to_dict()}
    else:
        threshold = SELF_THRESHOLD if threshold is None else threshold
        res = self_dedup(pool, k, threshold, index, nprobe, seed, gpu)
        assert res.component is not None
        rep = {int(c): int(p) for c, p in zip(res.component[res.keep], res.keep)}
        with open(out / "groups.jsonl", "w") as f:
            f.writelines(json.dumps({"size": len(g), "keep": pool.paths(g[:1])[0], "members": pool.paths(g),
                                    "rows": pool.rows[g].tolist()}) + "\n" for g in res.groups)
        # similarity of each dropped image to its strongest linked neighbour (a drop always has one)
        strongest = np.full(pool.n, -np.inf, dtype=np.float32)
        if res.edges is not None and len(res.edges):
            np.maximum.at(strongest, res.edges[:, 0], res.edge_sims)
            np.maximum.at(strongest, res.edges[:, 1], res.edge_sims)
        drop_paths = pool.paths(res.drop)
        rep_paths = pool.paths(np.array([rep[int(res.component[p])] for p in res.drop], dtype=np.int64))
        (out / "drop.tsv").write_text("".join(f"{d}\t{r}\t{strongest[p]:.4f}\n"
                                              for d, r, p in zip(drop_paths, rep_paths, res.drop)))
        summary = {"mode": "self", "k": k, "threshold": threshold, "index": res.plan.to_dict(),
                   "n_edges": int(len(res.edges) if res.edges is not None else 0), "n_groups": len(res.groups),
                   "largest_group": int(max((len(g) for g in res.groups), default=1)),
                   "representative": "lowest row (first in pool order) of each connected component"}
    summary["seconds"] = round(time.time() - t0, 2)
    return write_stage(out, "dedup", pool, res.keep, summary, after)

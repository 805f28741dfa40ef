"""Embeddings streamed from shards, and Faiss indexes, k-NN search and k-means over them.

Memory stays bounded by streaming: an index is filled batch by batch from the shards, queries are
searched in fixed-size batches, and only the results a stage keeps (edges above a threshold, one
nearest neighbour, ...) are accumulated. Batches are cut over the selected rows, not over the
shard files, so every result is the same whatever shard size the embeddings were written with.

Index choice (`choose_index`, `--index auto`), by the number of indexed vectors n:

- n <= `EXACT_MAX` (50,000): `IndexFlatIP`, exact inner product (= cosine on L2-normalised
  embeddings); costs n * D per query, fine up to a few hundred thousand.
- n <= `IVF_FLAT_MAX` (5,000,000): `IndexIVFFlat` with nlist = 2 * sqrt(n) (a power of two,
  256...65,536) inverted lists and nprobe = 16 of them visited per query; vectors kept exactly,
  n * D * 4 bytes.
- larger: `IndexIVFPQ` (D / 4 sub-quantisers of 8 bits: 96 bytes per 384-d vector instead of
  1,536), the only one whose memory fits at hundreds of millions.

IVF coarse centroids are trained on a seeded sample of at most 64 * nlist vectors. With `--gpu`
(never by default) and a Faiss build with GPU support (faiss-gpu), indexes are copied to all GPUs
for search and k-means runs there (`use_gpu`); faiss-cpu, what dinokit depends on, has no GPU
code. faiss-gpu's IVF-PQ takes only some code sizes (`gpu_supports_pq`); an IVF-PQ index outside
them stays on the CPU, with a message.

Example:
    >>> emb = Embeddings("pool_emb/")                 # written by `dinokit curate embed`
    >>> index, plan = build_index(emb)                # exact for small pools, IVF for large ones
    >>> for rows, sims, ids in search_batches(index, emb, k=65):
    ...     ...
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors.numpy import load_file

__all__ = [
    "EXACT_MAX",
    "IVF_FLAT_MAX",
    "QUERY_BATCH",
    "ArrayEmbeddings",
    "CurateError",
    "Embeddings",
    "IndexPlan",
    "assign",
    "build_index",
    "choose_index",
    "ivf_self_join",
    "kmeans",
    "search_batches",
    "use_gpu",
]

EXACT_MAX = 50_000
IVF_FLAT_MAX = 5_000_000
QUERY_BATCH = 4096
IVF_NPROBE = 16
TRAIN_POINTS_PER_LIST = 64


class CurateError(ValueError):
    """Bad input to a curation stage (missing or mismatched folder, option out of range)."""


# ----------------------------------------------------------------------------- embeddings


class Embeddings:
    """An embeddings folder of `dinokit curate embed`, optionally restricted to some of its rows.

    Rows are numbered over all shards in order (corrupt images have no row). `rows` (sorted,
    unique) selects a sub-pool, e.g. what an earlier stage kept; positions 0..n-1 of this object
    (and the ids of every index built on it) refer to those rows in order.

    Attributes:
        folder, n (selected rows), dim, manifest, rows (np.int64, the selected row numbers).
    """

    def __init__(self, folder: str | os.PathLike, rows: np.ndarray | None = None) -> None:
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise CurateError(f"{self.folder} holds no manifest.json: not a (complete) embeddings folder "
                              "(run `dinokit curate embed`, or finish it: a re-run resumes)")
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        curate = self.manifest.get("curate")
        if not curate:
            raise CurateError(f"{path} was not written by `dinokit curate embed` (no 'curate' entry)")
        self.feature: str = curate["feature"]
        self.dim: int = int(self.manifest["features"][self.feature]["dim"])
        self.n_total: int = int(self.manifest["n_rows"])
        if rows is None:
            rows = np.arange(self.n_total, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_total or np.any(np.diff(rows) <= 0)):
            raise CurateError(f"rows for {self.folder} must be sorted, unique and in [0, {self.n_total})")
        self.rows = rows
        self.n = len(rows)
        self._dataset_index: np.ndarray | None = None
        self._paths: list[str] | None = None

    def _shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float16 block) per shard file."""
        start = 0
        for shard in self.manifest["shards"]:
            block = load_file(str(self.folder / shard["file"]))[self.feature]
            yield start, block
            start += len(block)

    def iter_batches(self, batch: int = QUERY_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (positions (B,), float32 (B, dim)) in order, B = `batch` except the last."""
        buf: list[np.ndarray] = []
        buffered, done = 0, 0
        for start, block in self._shards():
            lo, hi = np.searchsorted(self.rows, [start, start + len(block)])
            if hi > lo:
                buf.append(block[self.rows[lo:hi] - start])
                buffered += hi - lo
            while buffered >= batch or (buffered and start + len(block) >= self.n_total):
                x = np.concatenate(buf) if len(buf) > 1 else buf[0]
                take = min(batch, buffered)
                yield np.arange(done, done + take), np.ascontiguousarray(x[:take], dtype=np.float32)
                buf = [x[take:]] if take < len(x) else []
                buffered -= take
                done += take

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """float32 vectors at `positions` (any order), read shard by shard."""
        positions = np.asarray(positions, dtype=np.int64)
        want = self.rows[positions]
        order = np.argsort(want, kind="stable")
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        sorted_rows = want[order]
        for start, block in self._shards():
            lo, hi = np.searchsorted(sorted_rows, [start, start + len(block)])
            if hi > lo:
                out[order[lo:hi]] = block[sorted_rows[lo:hi] - start]
        return out

    def dataset_index(self) -> np.ndarray:
        """Dataset index (line of paths.txt) of every selected row."""
        if self._dataset_index is None:
            labels = load_file(str(self.folder / self.manifest["labels_file"]))
            self._dataset_index = labels["indices"].astype(np.int64)
        return self._dataset_index[self.rows]

    def all_paths(self) -> list[str]:
        """Every image of the embedded data set, in dataset order (paths.txt)."""
        if self._paths is None:
            self._paths = (self.folder / self.manifest["curate"]["paths_file"]).read_text().splitlines()
        return self._paths

    def paths(self, positions: np.ndarray | None = None) -> list[str]:
        """Image paths of the selected rows (or of `positions` among them)."""
        idx = self.dataset_index() if positions is None else self.dataset_index()[np.asarray(positions, dtype=np.int64)]
        every = self.all_paths()
        return [every[i] for i in idx]

    def subset(self, positions: np.ndarray) -> Embeddings:
        """The same folder restricted to `positions` (sorted) of this selection."""
        return Embeddings(self.folder, self.rows[np.asarray(positions, dtype=np.int64)])


class ArrayEmbeddings:
    """In-memory stand-in for `Embeddings` (tests, benchmarks): float32 rows, already normalised."""

    def __init__(self, x: np.ndarray, paths: list[str] | None = None) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.n, self.dim = self.x.shape
        self.rows = np.arange(self.n, dtype=np.int64)
        self._paths = paths or [f"#{i}" for i in range(self.n)]
        self.manifest: dict[str, Any] = {"source": "array"}

    def iter_batches(self, batch: int = QUERY_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for lo in range(0, self.n, batch):
            hi = min(lo + batch, self.n)
            yield np.arange(lo, hi), self.x[lo:hi]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(positions, dtype=np.int64)]

    def paths(self, positions: np.ndarray | None = None) -> list[str]:
        idx = range(self.n) if positions is None else positions
        return [self._paths[int(i)] for i in idx]

    def subset(self, positions: np.ndarray) -> ArrayEmbeddings:
        positions = np.asarray(positions, dtype=np.int64)
        return ArrayEmbeddings(self.x[positions], [self._paths[int(i)] for i in positions])


# ----------------------------------------------------------------------------- indexes


@dataclass
class IndexPlan:
    """Which Faiss index a stage uses: kind "flat" | "ivf_flat" | "ivf_pq", its sizes, and why."""

    kind: str
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pow2(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 2 ** round(math.log2(max(x, 1.0))))))


def choose_index(n: int, dim: int, kind: str = "auto", nprobe: int | None = None) -> IndexPlan:
    """The index for `n` vectors of `dim` (see the module docstring for the thresholds)."""
    if kind not in ("auto", "flat", "ivf_flat", "ivf_pq"):
        raise CurateError(f"index kind must be auto, flat, ivf_flat or ivf_pq, got {kind!r}")
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX else "ivf_flat" if n <= IVF_FLAT_MAX else "ivf_pq"
        reason = f"auto: n = {n:,} (exact <= {EXACT_MAX:,}, IVF-Flat <= {IVF_FLAT_MAX:,}, else IVF-PQ)"
    else:
        reason = "chosen with --index"
    if kind == "flat":
        return IndexPlan("flat", reason=reason)
    nlist = _pow2(2 * math.sqrt(n), 256, 65536)
    nlist = min(nlist, max(1, n // 39))  # Faiss wants >= 39 training points per list
    pq_m = 0
    if kind == "ivf_pq":
        pq_m = next(m for m in (dim // 4, dim // 2, dim // 8, dim, 1) if m >= 1 and dim % m == 0)
    return IndexPlan(kind, nlist=nlist, nprobe=min(nlist, nprobe or IVF_NPROBE), pq_m=pq_m, reason=reason)


def use_gpu(gpu: bool | None = None) -> bool:
    """Whether to run Faiss on GPUs: only when asked (`--gpu`), since a GPU index behaves
    differently (memory, supported code sizes, float16 tables); asking without a GPU is an error."""
    if not gpu:
        return False
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n == 0:
        raise CurateError("--gpu: this Faiss build sees no GPU (faiss-cpu has no GPU code; install faiss-gpu)")
    return True


# faiss-gpu's IVF-PQ (GpuIndexIVFPQ): bytes per code and dimensions per sub-quantizer it supports;
# above 48 bytes per code the lookup tables must be float16 to fit the GPU's shared memory.
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_SUB_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
GPU_PQ_FLOAT32_TABLES_MAX = 48


def gpu_supports_pq(dim: int, pq_m: int) -> bool:
    """Whether faiss-gpu can hold an IVF-PQ index of `pq_m` 8-bit codes on `dim`-d vectors."""
    return pq_m in GPU_PQ_BYTES and dim % pq_m == 0 and dim // pq_m in GPU_PQ_SUB_DIMS


def _sample_positions(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted seeded sample of positions (a function of n, size, seed only: shard-size independent)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def build_index(emb: Embeddings | ArrayEmbeddings, plan: IndexPlan | None = None, seed: int = 0,
                gpu: bool | None = None) -> tuple[faiss.Index, IndexPlan]:
    """An inner-product index holding every selected vector of `emb`, ids = positions."""
    plan = plan or choose_index(emb.n, emb.dim)
    if emb.n == 0:
        raise CurateError("cannot build an index over 0 embeddings")
    if plan.kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(emb.dim)
    else:
        quantizer = faiss.IndexFlatIP(emb.dim)
        if plan.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, emb.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, emb.dim, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # the wrapper keeps `quantizer` alive as long as `index`
        index.train(emb.gather(_sample_positions(emb.n, TRAIN_POINTS_PER_LIST * plan.nlist, seed)))
        index.nprobe = plan.nprobe
    for _, x in emb.iter_batches():
        index.add(x)
    if use_gpu(gpu):  # pragma: no cover - needs faiss-gpu and a GPU
        if plan.kind == "ivf_pq" and not gpu_supports_pq(emb.dim, plan.pq_m):
            print(f"curate: IVF-PQ with {plan.pq_m} bytes per code on {emb.dim}-d vectors is not supported by "
                  f"faiss-gpu; this index stays on the CPU", flush=True)
            return index, plan
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = plan.kind == "ivf_pq" and plan.pq_m > GPU_PQ_FLOAT32_TABLES_MAX
        index = faiss.index_cpu_to_all_gpus(index, co=options)
        if plan.kind != "flat":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", plan.nprobe)
    return index, plan


def search_batches(index: faiss.Index, queries: Embeddings | ArrayEmbeddings, k: int,
                   batch: int = QUERY_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (query positions (B,), similarities (B, k) float32, ids (B, k) int64; -1 = none)."""
    k = min(k, index.ntotal)
    for pos, x in queries.iter_batches(batch):
        sims, ids = index.search(x, k)
        yield pos, sims, ids


# ----------------------------------------------------------------------------- k-means


def kmeans(emb: Embeddings | ArrayEmbeddings, k: int, niter: int = 20, seed: int = 0,
           max_points_per_centroid: int = 256, gpu: bool | None = None,
           init: np.ndarray | None = None, positions: np.ndarray | None = None, nredo: int = 1) -> np.ndarray:
    """Spherical k-means (cosine) with Faiss: (k, dim) unit-norm centroids.

    Trained on a seeded sample of at most `max_points_per_centroid * k` vectors (Faiss' own rule,
    done here so the sample does not depend on the shard size), or on `positions` if given.
    `init`: starting centroids (k, dim) instead of Faiss' random init; `nredo`: runs from
    different random inits, the best (highest total similarity) kept.
    """
    if k < 1 or k > emb.n:
        raise CurateError(f"k-means into {k} clusters needs 1 <= k <= the number of embeddings ({emb.n})")
    if positions is None:
        positions = _sample_positions(emb.n, max_points_per_centroid * k, seed)
    x = emb.gather(positions)
    km = faiss.Kmeans(emb.dim, k, niter=niter, seed=seed, spherical=True, gpu=use_gpu(gpu),
                      max_points_per_centroid=max(max_points_per_centroid, -(-len(x) // k)), nredo=nredo,
                      verbose=False)
    km.train(x, init_centroids=init)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign(emb: Embeddings | ArrayEmbeddings, centroids: np.ndarray, gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every selected vector: (labels (n,) int64, similarities (n,) float32)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    if use_gpu(gpu):  # pragma: no cover - needs faiss-gpu and a GPU
        index = faiss.index_cpu_to_all_gpus(index)
    labels = np.empty(emb.n, dtype=np.int64)
    sims = np.empty(emb.n, dtype=np.float32)
    for pos, s, i in search_batches(index, emb, 1):
        labels[pos], sims[pos] = i[:, 0], s[:, 0]
    return labels, sims


# ----------------------------------------------------------------------------- self-join


def ivf_self_join(emb: Embeddings | ArrayEmbeddings, k: int, threshold: float, nlist: int, nprobe: int,
                  seed: int = 0, gpu: bool | None = None, max_points_per_list: int = TRAIN_POINTS_PER_LIST
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pool vector's (at most) k most similar other pool vectors with similarity > threshold,
    found through an inverted file: (query positions (E,), neighbour positions (E,), sims (E,)).

    The IVF partition is Faiss k-means (`nlist` lists, trained on a seeded sample); each vector
    lives in its nearest list and visits its `nprobe` nearest lists, as in an `IndexIVFFlat`
    search. The difference is the order of work: instead of scanning lists query by query
    (memory-bound, ~0.5 ms per query at 1M x 384), all the queries that visit a list are
    multiplied with its members in ONE matrix product, which runs at BLAS speed: what makes
    deduplicating a million embeddings take minutes, not an hour, on one core.
    A pair (a, b) is found when b's list is among a's probes or a's among b's, so recall is at
    least that of the IVF search. Holds the pool in float16 (2 * dim bytes per vector).
    """
    centroids = kmeans(emb, nlist, niter=10, seed=seed, max_points_per_centroid=max_points_per_list, gpu=gpu)
    cq = faiss.IndexFlatIP(emb.dim)
    cq.add(centroids)
    nprobe = min(nprobe, nlist)
    probes = np.empty((emb.n, nprobe), dtype=np.int32)
    x16 = np.empty((emb.n, emb.dim), dtype=np.float16)
    for pos, x in emb.iter_batches():
        probes[pos] = cq.search(x, nprobe)[1]
        x16[pos] = x
    members = np.argsort(probes[:, 0], kind="stable")  # each vector stored in its nearest list
    m_bounds = np.concatenate([[0], np.cumsum(np.bincount(probes[:, 0], minlength=nlist))])
    visits = np.argsort(probes.ravel(), kind="stable")  # (vector, probe) pairs grouped by list
    q_bounds = np.concatenate([[0], np.cumsum(np.bincount(probes.ravel(), minlength=nlist))])
    del probes
    src, dst, sim = [], [], []
    for lst in range(nlist):
        mem = members[m_bounds[lst]:m_bounds[lst + 1]]
        qry = visits[q_bounds[lst]:q_bounds[lst + 1]] // nprobe
        if not len(mem) or not len(qry):
            continue
        s = x16[qry].astype(np.float32) @ x16[mem].astype(np.float32).T
        r, c = np.nonzero(s > threshold)
        keep = qry[r] != mem[c]
        src.append(qry[r[keep]])
        dst.append(mem[c[keep]])
        sim.append(s[r[keep], c[keep]])
    if not src:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, v = np.concatenate(src).astype(np.int64), np.concatenate(dst).astype(np.int64), np.concatenate(sim)
    # k-NN cap: each query keeps its k most similar (ties: lower neighbour position first).
    order = np.lexsort((j, -v, i))
    i, j, v = i[order], j[order], v[order]
    start = np.searchsorted(i, i, side="left")
    rank = np.arange(len(i)) - start
    keep = rank < k
    return i[keep], j[keep], v[keep]

"""Benchmark of the curation stages on synthetic 384-d embedding pools (JSON out).

For each pool size, a synthetic pool is written as float16 shards (the format of
`dinokit curate embed`): unit vectors around `n / 1000` concept centres with Zipf-like concept
sizes (cosine ~0.2 inside a concept, nearest unrelated neighbour ~0.4), plus 1 % planted
near-duplicates (a pool vector plus noise, cosine 0.8-0.98 to it). An evaluation set (5,000
noisy copies of pool vectors + 5,000 fresh vectors) and a seed set (1,000 noisy copies) go with it.
Each stage then runs in a fresh process (so its peak RSS is its own) on the shards:

- `dedup`: self-deduplication, k = 64, threshold 0.6 (recall / precision of the planted pairs);
- `relative`: relative deduplication against the evaluation set, threshold 0.45;
- `retrieve`: sample-based retrieval, N = 4 per seed;
- `cluster`: hierarchical k-means (default levels) and balanced sampling of half the pool.

    taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python bench/curate.py --sizes 10000 100000 1000000 \\
        --out bench/results/curate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import emit  # bench/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 384


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_pool(n: int, dim: int = DIM, seed: int = 0, dup_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32, planted (n_dup, 2) = (original row, copy row))."""
    rng = np.random.default_rng(seed)
    n_concepts = max(10, n // 1000)
    centers = _normalize(rng.standard_normal((n_concepts, dim)).astype(np.float32))
    weights = 1.0 / np.arange(1, n_concepts + 1) ** 0.8
    n_dup = int(n * dup_fraction)
    n_orig = n - n_dup
    x = np.empty((n, dim), dtype=np.float32)
    concept = rng.choice(n_concepts, size=n_orig, p=weights / weights.sum())
    for lo in range(0, n_orig, 65536):  # chunks: bounded temporaries
        hi = min(lo + 65536, n_orig)
        noise = rng.standard_normal((hi - lo, dim)).astype(np.float32) * (2.0 / np.sqrt(dim))
        x[lo:hi] = _normalize(centers[concept[lo:hi]] + noise)
    originals = rng.choice(n_orig, size=n_dup, replace=False)
    tau = rng.uniform(0.2, 0.7, size=(n_dup, 1)).astype(np.float32)
    x[n_orig:] = _normalize(x[originals] + rng.standard_normal((n_dup, dim)).astype(np.float32) * tau / np.sqrt(dim))
    return x, np.stack([originals, np.arange(n_orig, n)], axis=1)


def _write(folder: Path, x: np.ndarray, prefix: str, shard_size: int) -> None:
    from dinokit.curate.embed import write_embeddings

    chunks = (x[i:i + 65536] for i in range(0, len(x), 65536))
    write_embeddings(folder, chunks, [f"{prefix}/{i:07d}" for i in range(len(x))], "synthetic", shard_size)


def make_data(work: Path, n: int, shard_size: int, seed: int = 0) -> dict[str, object]:
    x, planted = synthetic_pool(n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    _write(work / "pool", x, "pool", shard_size)
    copied = rng.choice(n, size=min(5000, n // 2), replace=False)
    fresh = _normalize(rng.standard_normal((5000, DIM)).astype(np.float32))
    ev = np.concatenate([_normalize(x[copied] + rng.standard_normal((len(copied), DIM)).astype(np.float32) * 0.5 / np.sqrt(DIM)), fresh])
    _write(work / "eval", ev, "eval", shard_size)
    seeds = rng.choice(n, size=1000, replace=False)
    _write(work / "seeds", _normalize(x[seeds] + rng.standard_normal((1000, DIM)).astype(np.float32) * 0.3 / np.sqrt(DIM)),
           "seeds", shard_size)
    np.save(work / "planted.npy", planted)
    np.save(work / "copied.npy", copied)
    return {"n_planted_pairs": len(planted), "n_eval_copies": len(copied)}


# ----------------------------------------------------------------------------- one stage, in a child process


def _cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other jobs on the core."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_stage(stage: str, work: Path) -> dict[str, object]:
    from dinokit.curate.cluster import run_cluster
    from dinokit.curate.dedup import run_dedup
    from dinokit.curate.retrieve import run_retrieve

    rss0 = _peak_rss_mib()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    out = work / f"out_{stage}"
    if stage == "dedup":
        s = run_dedup(work / "pool", out)
    elif stage == "relative":
        s = run_dedup(work / "pool", out, against=[str(work / "eval")])
    elif stage == "retrieve":
        s = run_retrieve(work / "pool", out, seeds=[str(work / "seeds")], mode="sample")
    elif stage == "cluster":
        s = run_cluster(work / "pool", out, target=0.5)
    else:
        raise ValueError(stage)
    seconds = time.perf_counter() - t0
    result: dict[str, object] = {"seconds": round(seconds, 2), "cpu_seconds": round(_cpu_seconds() - cpu0, 2),
                                 "peak_rss_mib": _peak_rss_mib(),
                                 "peak_rss_before_mib": rss0, "n_kept": s["n_kept"], "index": s.get("index")}
    keep = np.load(out / "keep.npy")
    kept = np.zeros(s["n_in"], dtype=bool)
    kept[keep] = True
    if stage == "dedup":
        planted = np.load(work / "planted.npy")
        n_orig = int(planted[:, 1].min())
        # recall: planted copies dropped (their original, lower row, is always seen first)
        result["recall"] = round(float((~kept[planted[:, 1]]).mean()), 4)
        dropped = np.nonzero(~kept)[0]
        result["precision"] = round(float((dropped >= n_orig).mean()) if len(dropped) else 1.0, 4)
        result.update({k: s[k] for k in ("n_edges", "n_groups", "largest_group")})
    elif stage == "relative":
        copied = np.load(work / "copied.npy")
        result["recall"] = round(float((~kept[copied]).mean()), 4)
        result["n_dropped"] = s["n_dropped"]
    elif stage == "cluster":
        result["levels"] = s["levels"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--stages", nargs="+", default=["dedup", "relative", "retrieve", "cluster"])
    p.add_argument("--shard-size", type=int, default=65536)
    p.add_argument("--cluster-max", type=int, default=100_000,
                   help="skip the cluster stage above this pool size (level-1 k-means of n / 120 clusters is O(n^2))")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    p.add_argument("--child", nargs=2, metavar=("STAGE", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.child[0], Path(args.child[1]))))
        return 0

    import faiss

    root = args.work or Path(tempfile.mkdtemp(prefix="dinokit_curate_bench_"))
    results = []
    try:
        for n in args.sizes:
            work = root / f"n{n}"
            t0 = time.perf_counter()
            info = make_data(work, n, args.shard_size)
            row: dict[str, object] = {"n": n, "dim": DIM, "write_seconds": round(time.perf_counter() - t0, 2), **info}
            for stage in args.stages:
                if stage == "cluster" and n > args.cluster_max:
                    continue
                proc = subprocess.run([sys.executable, __file__, "--child", stage, str(work)], capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(f"stage {stage} at n={n} failed:\n{proc.stderr[-3000:]}")
                row[stage] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps({"n": n, stage: row[stage]}), flush=True)
            results.append(row)
            shutil.rmtree(work)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    doc = {"benchmark": "curate", "machine": platform.machine(), "cpu_affinity": len(os.sched_getaffinity(0)),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "faiss": faiss.__version__,
           "faiss_threads": faiss.omp_get_max_threads(), "shard_size": args.shard_size, "results": results}
    emit(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

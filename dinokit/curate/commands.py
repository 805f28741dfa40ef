"""Command line: `dinokit curate {embed,dedup,retrieve,cluster,build,report}`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dinokit.curate.dedup import SELF_K
from dinokit.curate.retrieve import N_CLUSTERS, N_PER_SEED


def _errors() -> tuple[type[BaseException], ...]:
    from dinokit.checkpoint import CheckpointError
    from dinokit.data.datasets import DatasetError

    return (CheckpointError, DatasetError, FileExistsError, FileNotFoundError, KeyError, ValueError, OverflowError)


def _run(fn: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            result = fn(args)
        except _errors() as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(_describe(result))
        return 0

    return run


def _describe(s: dict[str, Any]) -> str:
    if "stage" in s:
        extra = {k: s[k] for k in ("mode", "threshold", "k", "n_groups", "largest_group", "levels", "n_clusters") if k in s}
        index = s.get("index") or {}
        return (f"{s['stage']}: {s['n_in']:,} images in, {s['n_kept']:,} kept, {s['n_dropped']:,} dropped "
                f"({s.get('seconds')} s, index {index.get('kind', '-')})\n{json.dumps(extra)}")
    return json.dumps(s, indent=2)


def _embed(a: argparse.Namespace) -> dict[str, Any]:
    from dinokit.curate.embed import embed_pool
    from dinokit.eval.embed import default_num_workers

    m = embed_pool(a.out, a.backbone, a.data, a.split, a.feature, a.shard_size, a.batch_size,
                   default_num_workers(a.device, a.num_workers), a.device,
                   a.arch, a.random_init, a.crop, a.resize, not a.no_progress, a.overwrite)
    if m is None:
        return {"out": str(a.out), "status": "this rank's shards are written; the manifest comes with the last rank"}
    return {"out": str(a.out), "backbone": m["source"], "n_images": m["n_dataset"], "n_embedded": m["n_rows"],
            "n_skipped": len(m["skipped"]), "dim": m["features"][m["curate"]["feature"]]["dim"],
            "shards": len(m["shards"]), "skipped_list": str(Path(a.out) / m["curate"]["skipped_file"])}


def _dedup(a: argparse.Namespace) -> dict[str, Any]:
    from dinokit.curate.dedup import run_dedup

    return run_dedup(a.embeddings, a.out, a.after, a.against, a.k, a.threshold, a.index, a.nprobe, a.seed, a.gpu)


def _retrieve(a: argparse.Namespace) -> dict[str, Any]:
    from dinokit.curate.retrieve import run_retrieve

    return run_retrieve(a.embeddings, a.out, a.seeds, a.mode, a.after, a.n, a.clusters, a.per_cluster, a.per_seed_set,
                        a.index, a.nprobe, a.seed, a.gpu)


def _cluster(a: argparse.Namespace) -> dict[str, Any]:
    from dinokit.curate.cluster import run_cluster

    return run_cluster(a.embeddings, a.out, a.target, a.levels, a.after, a.niter, a.resample_steps, a.resample_points,
                       a.seed, a.gpu)


def _build(a: argparse.Namespace) -> dict[str, Any]:
    from dinokit.curate.build import build_list

    return build_list(a.embeddings, a.stages, a.out)


def _report(a: argparse.Namespace) -> dict[str, Any]:
    from dinokit.curate.report import write_report

    r = write_report(a.stages, a.out, a.rows, a.per_row, a.seed)
    print((Path(a.out) / "report.md").read_text())
    return {"report": str(Path(a.out) / "report.md"), "pictures": r["pictures"]}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", type=Path, help="embeddings folder of `dinokit curate embed`")
    p.add_argument("--out", type=Path, required=True, help="output folder of this stage")
    p.add_argument("--after", nargs="+", default=[], help="stage folders: only the images they all kept")
    p.add_argument("--seed", type=int, default=0, help="samples, k-means")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=False,
                   help="Faiss on GPUs (needs faiss-gpu; default: CPU, even where faiss sees a GPU)")


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default="auto", choices=["auto", "flat", "ivf_flat", "ivf_pq"],
                   help="auto: exact up to 50k vectors, IVF above (see docs/curation.md)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query (default 16)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `curate` and its sub-commands on a `dinokit` sub-command parser."""
    cur = subparsers.add_parser("curate", help="LVD-142M-style data curation: embed, deduplicate, retrieve, cluster, build")
    sub = cur.add_subparsers(dest="curate_command", required=True)

    emb = sub.add_parser("embed", help="L2-normalised float16 embeddings of an image pool (resumable shards; "
                         "under torchrun each rank embeds every WORLD_SIZE-th shard)")
    emb.add_argument("backbone", help="run folder, transformers / timm folder, checkpoint file (+ --arch), architecture name, or pixels[:SIZE]")
    emb.add_argument("--data", required=True, help="image folder, .txt file list, or fashion_mnist[:root]")
    emb.add_argument("--split", default="train", help="train / test (Fashion-MNIST)")
    emb.add_argument("--out", type=Path, required=True, help="embeddings folder (a re-run resumes it)")
    emb.add_argument("--feature", default="cls", help="feature kind: cls, avgpool, cls_last4, ...")
    emb.add_argument("--arch", default=None, help="architecture of a checkpoint file (default dinov2_vits14)")
    emb.add_argument("--random-init", action="store_true", help="run folder: its architecture, random weights")
    emb.add_argument("--shard-size", type=int, default=65536, help="images per shard (the unit of resumption)")
    emb.add_argument("--batch-size", type=int, default=256)
    emb.add_argument("--num-workers", type=int, default=None,
                     help="data-loader worker processes (default: up to 8 on a GPU, 0 on CPU)")
    emb.add_argument("--device", default=None, help="cuda / cpu (default cuda when available)")
    emb.add_argument("--crop", type=int, default=None, help="center crop (default the backbone's image size)")
    emb.add_argument("--resize", type=int, default=None, help="resize side (default round(crop * 256 / 224))")
    emb.add_argument("--no-progress", action="store_true")
    emb.add_argument("--overwrite", action="store_true", help="start again from scratch")
    emb.set_defaults(func=_run(_embed))

    dd = sub.add_parser("dedup", help="self-deduplication (k-NN graph components), or relative with --against")
    _common(dd)
    dd.add_argument("--against", nargs="+", default=[], help="evaluation-set embeddings: relative deduplication")
    dd.add_argument("--k", type=int, default=SELF_K, help="neighbours per image (self-deduplication)")
    dd.add_argument("--threshold", type=float, default=None, help="cosine threshold (default 0.6 self, 0.45 --against)")
    _index_options(dd)
    dd.set_defaults(func=_run(_dedup))

    rt = sub.add_parser("retrieve", help="pool images close to seed sets (sample- or cluster-based)")
    _common(rt)
    rt.add_argument("--seeds", nargs="+", required=True, help="seed-set embeddings folders (one seed set each)")
    rt.add_argument("--mode", default="sample", choices=["sample", "cluster"])
    rt.add_argument("--n", type=int, default=N_PER_SEED, help="sample mode: nearest pool images per seed image")
    rt.add_argument("--clusters", type=int, default=N_CLUSTERS, help="cluster mode: k-means clusters (at most pool / 40)")
    rt.add_argument("--per-cluster", type=int, default=10_000, help="cluster mode: images sampled per cluster")
    rt.add_argument("--per-seed-set", type=int, default=1_000_000, help="cluster mode: images per seed set at most")
    _index_options(rt)
    rt.set_defaults(func=_run(_retrieve))

    cl = sub.add_parser("cluster", help="hierarchical k-means and balanced sampling")
    _common(cl)
    cl.add_argument("--target", type=float, default=0.5, help="images to sample: a count, or a fraction of the pool if < 1")
    cl.add_argument("--levels", type=int, nargs="+", default=None, help="clusters per level (default: the paper's ratios)")
    cl.add_argument("--niter", type=int, default=20, help="k-means iterations")
    cl.add_argument("--resample-steps", type=int, default=0, help="resampling-clustering steps per level")
    cl.add_argument("--resample-points", type=int, default=0, help="points per cluster when resampling (0: median size)")
    cl.set_defaults(func=_run(_cluster))

    bd = sub.add_parser("build", help="the curated file list (images kept by every stage) for `dinokit train`")
    bd.add_argument("embeddings", type=Path, help="embeddings folder of the pool")
    bd.add_argument("stages", nargs="+", help="stage folders")
    bd.add_argument("--out", type=Path, required=True, help="file list to write (one path per line)")
    bd.set_defaults(func=_run(_build))

    rp = sub.add_parser("report", help="counts per stage, PNG grids of duplicate groups and clusters")
    rp.add_argument("stages", nargs="+", help="stage folders")
    rp.add_argument("--out", type=Path, required=True, help="report folder")
    rp.add_argument("--rows", type=int, default=8, help="groups / clusters shown")
    rp.add_argument("--per-row", type=int, default=8, help="images per group / cluster shown")
    rp.add_argument("--seed", type=int, default=0)
    rp.set_defaults(func=_run(_report))

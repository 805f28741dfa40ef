"""`dinokit curate embed`: L2-normalised float16 embeddings of an image pool, resumable.

The pool (image folder, `.txt` file list or `fashion_mnist[:root]`) is cut into shards of
`shard_size` consecutive images. Each shard is embedded with one feature kind (default the
normalised [CLS] token), L2-normalised, stored float16 as `shard_XXXXX.safetensors` (tensors
`<feature>`, `labels`, `indices` = dataset index per row) written atomically; its corrupt images
are recorded in the file's metadata. A re-run finds the shards already written and skips them, so
an interrupted embedding resumes where it stopped (`plan.json` pins the data, backbone and shard
size: resuming with others is refused).

When every shard is done, `paths.txt` (every image of the pool in dataset order), `skipped.txt`
(images that could not be decoded) and `manifest.json` are written. The manifest has the layout of
`dinokit embed` feature folders (`dinokit.eval.embed.read_features` reads it) plus a `curate` entry.

Example:
    >>> embed_pool("pool_emb/", "runs/mine", "my_images/")       # or backbone "pixels", data "list.txt"
    {'n_rows': 4980, 'skipped': [17, ...], ...}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset, Subset

from dinokit.curate.index import CurateError
from dinokit.data.datasets import DatasetError
from dinokit.eval.embed import (
    LABELS_FILE,
    MANIFEST,
    default_device,
    eval_transform_for,
    infer_image_size,
    iter_feature_batches,
    open_dataset,
    parse_feature_kind,
    resolve_feature_model,
)

__all__ = ["PATHS_FILE", "PLAN_FILE", "dataset_paths", "embed_pool", "write_embeddings"]

PATHS_FILE = "paths.txt"
SKIPPED_FILE = "skipped.txt"
PLAN_FILE = "plan.json"


def dataset_paths(dataset: Dataset, spec: str, split: str) -> list[str]:
    """A path per image: the file for file-based datasets, `DATASET:SPLIT#INDEX` for in-memory ones."""
    n = len(dataset)  # type: ignore[arg-type]
    if hasattr(dataset, "path"):
        return [dataset.path(i) for i in range(n)]  # type: ignore[attr-defined]
    return [f"{spec}:{split}#{i}" for i in range(n)]


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may write at once
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Write plan.json, or check that an existing one (an interrupted run) agrees."""
    path = out / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        for key, value in plan.items():
            if old.get(key) != value:
                raise CurateError(f"{path}: {key} was {old.get(key)!r}, now {value!r}; resume with the same "
                                  "data, backbone and options, or use --overwrite")
    else:
        _write_atomic(path, json.dumps(plan, indent=2))


def _embed_shard(path: Path, model: torch.nn.Module, dataset: Dataset, lo: int, hi: int, transform: Any,
                 feature: str, batch_size: int, num_workers: int, device: str, bar: Any) -> None:
    feats, labels, index, skipped = [], [], [], []
    for f, lab, idx, skip in iter_feature_batches(model, Subset(dataset, range(lo, hi)), transform, batch_size,
                                                   [feature], num_workers=num_workers, progress=False, device=device):
        skipped.extend(lo + s for s in skip)
        if len(lab):
            feats.append(torch.nn.functional.normalize(f[feature], dim=1))  # cosine = inner product
            labels.append(lab)
            index.append(idx + lo)
        if bar is not None:
            bar.update(len(lab) + len(skip))
    dim = feats[0].shape[1] if feats else 0
    tensors = {
        feature: torch.cat(feats).half() if feats else torch.zeros(0, dim, dtype=torch.float16),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        "indices": torch.cat(index) if index else torch.zeros(0, dtype=torch.int64),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"skipped": json.dumps(skipped), "dim": str(dim)})
    os.replace(tmp, path)  # a shard file exists only once complete: what resuming relies on


def embed_pool(
    out_dir: str | os.PathLike,
    backbone: Any,
    data: str | os.PathLike,
    split: str = "train",
    feature: str = "cls",
    shard_size: int = 65536,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    arch: str | None = None,
    random_init: bool = False,
    crop: int | None = None,
    resize: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any] | None:
    """Embed every image of `data` into `out_dir` (see the module docstring); returns the manifest,
    or None when this rank finished its shards but others have not yet.

    Args:
        backbone: run folder, checkpoint file (+ `arch`), architecture name, `pixels[:SIZE]`, or a module.
        data: image folder, `.txt` file list, or `fashion_mnist[:root]` (with `split`).
        feature: feature kind (`cls`, `avgpool`, `cls_last4`, ...; see `dinokit.eval.embed`).
        shard_size: images per shard (the unit of resumption).
        overwrite: start from scratch, deleting what `out_dir` holds.
        rank, world_size: embed only shards s with s % world_size == rank (default: the RANK /
            WORLD_SIZE variables that torchrun sets, else 0 / 1); the rank that finds every shard
            written writes the manifest. On a GPU machine each rank uses cuda:LOCAL_RANK.
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise CurateError(f"rank {rank} is not in [0, world_size={world_size})")
    if shard_size < 1:
        raise CurateError(f"shard_size must be >= 1, got {shard_size}")
    feature = parse_feature_kind(feature)[0]
    out = Path(out_dir)
    if overwrite and out.is_dir():
        for old in [*out.glob("shard_*.safetensors"), *(out / n for n in (MANIFEST, LABELS_FILE, PLAN_FILE, PATHS_FILE, SKIPPED_FILE))]:
            old.unlink(missing_ok=True)
    if (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} already holds finished embeddings ({MANIFEST}); use --overwrite to redo them")
    out.mkdir(parents=True, exist_ok=True)

    dataset = open_dataset(data, split)
    paths = dataset_paths(dataset, os.fspath(data), split)
    rb = resolve_feature_model(backbone, arch, random_init, crop)
    if not rb.image_size:
        rb.image_size = infer_image_size(dataset)
        rb.source = f"pixels (raw-pixel baseline, {rb.image_size} px)"
    transform = eval_transform_for(rb.image_size, resize, crop)
    n = len(paths)
    plan = {"data": os.fspath(data), "split": split, "n_images": n, "shard_size": shard_size, "feature": feature,
            "source": rb.source, "transform": repr(transform),
            "paths_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest()}
    _check_plan(out, plan)
    _write_atomic(out / PATHS_FILE, "\n".join(paths) + "\n")

    n_shards = -(-n // shard_size)
    todo = [s for s in range(n_shards) if s % world_size == rank and not (out / _shard_name(s)).is_file()]
    bar = None
    if progress:
        from tqdm import tqdm

        mine = sum(min(shard_size, n - s * shard_size) for s in range(rank, n_shards, world_size))
        bar = tqdm(total=mine, initial=mine - sum(min(shard_size, n - s * shard_size) for s in todo), unit="img",
                   desc=f"embed (rank {rank}/{world_size})" if world_size > 1 else "embed")
    dev = device or default_device()
    if device is None and dev == "cuda" and world_size > 1:  # pragma: no cover - needs GPUs
        dev = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    for s in todo:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        _embed_shard(out / _shard_name(s), rb.model, dataset, lo, hi, transform, feature, batch_size,
                     num_workers, dev, bar)
    if bar is not None:
        bar.close()
    if not all((out / _shard_name(s)).is_file() for s in range(n_shards)):
        return None  # other ranks still at work; the last to finish writes the manifest
    return _finish(out, plan, n_shards, feature, rb.source, paths)


def write_embeddings(out_dir: str | os.PathLike, chunks: Iterable[np.ndarray], paths: Sequence[str],
                     source: str, shard_size: int = 65536, feature: str = "cls") -> dict[str, Any]:
    """An embeddings folder from vectors computed elsewhere (synthetic pools, benchmarks, tests).

    `chunks` yields (rows, dim) arrays in path order (any chunking); each row is L2-normalised and
    stored float16, cut into shards of `shard_size` rows, exactly as `embed_pool` lays them out.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(paths)
    plan = {"data": os.fspath(out), "split": "-", "n_images": n, "shard_size": shard_size, "feature": feature,
            "source": source, "transform": "-"}
    _write_atomic(out / PATHS_FILE, "".join(p + "\n" for p in paths))
    buf: list[np.ndarray] = []
    done, shard = 0, 0

    def flush(x: np.ndarray) -> None:
        nonlocal done, shard
        t = torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=1)
        idx = torch.arange(done, done + len(x), dtype=torch.int64)
        save_file({feature: t.half(), "labels": torch.full((len(x),), -1, dtype=torch.int64), "indices": idx},
                  str(out / _shard_name(shard)), metadata={"skipped": "[]", "dim": str(x.shape[1])})
        done += len(x)
        shard += 1

    for chunk in chunks:
        buf.append(chunk)
        while sum(len(b) for b in buf) >= shard_size:
            x = np.concatenate(buf)
            flush(x[:shard_size])
            buf = [x[shard_size:]]
    if buf and sum(len(b) for b in buf):
        flush(np.concatenate(buf))
    if done != n:
        raise CurateError(f"{out}: {done} vectors for {n} paths")
    return _finish(out, plan, shard, feature, source, list(paths))


def _finish(out: Path, plan: dict[str, Any], n_shards: int, feature: str, source: str, paths: list[str]) -> dict[str, Any]:
    """Collect the shards' rows and skipped images into labels.safetensors and manifest.json."""
    shards, labels, index, skipped = [], [], [], []
    dim = 0
    for s in range(n_shards):
        name = _shard_name(s)
        with safe_open(str(out / name), framework="pt") as f:
            meta = f.metadata()
            skipped.extend(json.loads(meta["skipped"]))
            dim = max(dim, int(meta["dim"]))
            lab, idx = f.get_tensor("labels"), f.get_tensor("indices")
        if len(lab):  # a shard of only corrupt images holds no row
            shards.append({"file": name, "rows": len(lab)})
            labels.append(lab)
            index.append(idx)
    if not shards:
        raise DatasetError(f"no image of {plan['data']} could be decoded")
    save_file({"labels": torch.cat(labels), "indices": torch.cat(index)}, str(out / LABELS_FILE))
    _write_atomic(out / SKIPPED_FILE, "".join(paths[i] + "\n" for i in skipped))
    manifest = {
        "format": "dinokit-features",
        "version": 1,
        "features": {feature: {"dim": dim}},
        "dtype": "float16",
        "n_rows": int(sum(s["rows"] for s in shards)),
        "n_dataset": plan["n_images"],
        "shard_size": plan["shard_size"],
        "shards": shards,
        "labels_file": LABELS_FILE,
        "skipped": skipped,
        "source": source,
        "dataset": f"{plan['data']} (split {plan['split']})",
        "transform": plan["transform"],
        "n_last_blocks": 4,
        "curate": {"feature": feature, "normalized": True, "paths_file": PATHS_FILE, "skipped_file": SKIPPED_FILE,
                   "data": plan["data"], "split": plan["split"]},
    }
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest

"""`dinokit embed` and `dinokit eval {knn,linear,logreg}`, and the plain functions behind them.

A backbone is a run folder, a checkpoint file (+ `--arch`), an architecture name (random init),
`pixels[:SIZE]` (raw-pixel baseline) or, from Python, an `nn.Module`. A data set is
`fashion_mnist[:root]`, an image folder (labels from sub-folders), a `.txt` file list, or a feature
folder written by `dinokit embed` (then nothing is re-embedded). From Python, a `Dataset` works too.

    dinokit embed runs/fmnist --data fashion_mnist --split test --out feats/test --features cls avgpool
    dinokit eval knn runs/fmnist --train fashion_mnist --test fashion_mnist --out knn.json
    dinokit eval linear runs/fmnist --train fashion_mnist --test fashion_mnist --epochs 10
    dinokit eval logreg pixels --train fashion_mnist --test fashion_mnist --max-train 10000

    >>> from dinokit.eval import evaluate_knn
    >>> evaluate_knn("runs/fmnist", "fashion_mnist", "fashion_mnist", ks=(20,))["results"]["20"]["top1"]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from dinokit.eval.embed import (
    Extracted,
    PreprocessedImages,
    default_device,
    default_num_workers,
    eval_transform_for,
    extract_features,
    feature_identity,
    infer_image_size,
    is_feature_dir,
    linear_feature_kinds,
    open_dataset,
    parse_feature_kind,
    read_features,
    resolve_feature_model,
    subset,
    write_feature_shards,
    write_json,
)

__all__ = ["add_commands", "evaluate_knn", "evaluate_linear", "evaluate_logreg", "split_features"]


# ----------------------------------------------------------------------------- plain functions


def split_features(
    backbone: Any,
    train: Dataset | str | os.PathLike,
    test: Dataset | str | os.PathLike | None,
    features: Sequence[str] | None = ("cls",),
    *,
    arch: str | None = None,
    random_init: bool = False,
    n_last_blocks: int = 4,
    batch_size: int = 256,
    bf16: bool = False,
    device: str | None = None,
    resize: int | None = None,
    crop: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> tuple[Extracted, Extracted | None, dict[str, Any]]:
    """Features of a train and a test set with one backbone (embedded, or read from feature folders).

    Args:
        features: kinds (see `dinokit.eval.embed`); None = the official linear-probe set for the
            backbone's depth (or every stored kind of a feature folder).
        max_train / max_test: seeded random subsets, for quick runs.
        The rest: see `resolve_feature_model`, `eval_transform_for`, `extract_features`.

    Returns:
        (train, test, info) with info = {"backbone", "image_size", "transform", "features",
        "train": {"spec", "n", "n_skipped", "skipped"}, "test": {...}}; test None (and no
        "test" entry) when `test` is None.
    """
    device = device or default_device()
    resolved = None
    info: dict[str, Any] = {}
    out: list[Extracted] = []
    identities: dict[str, tuple[str | None, str]] = {}  # split -> (fingerprint, what made it)
    live_identity: str | None = None
    for split, data, limit in (("train", train, max_train), ("test", test, max_test)):
        if data is None:
            continue
        if isinstance(data, (str, os.PathLike)) and is_feature_dir(data):
            stored = read_features(data, names=None if features is None else
                                   [parse_feature_kind(k, n_last_blocks)[0] for k in features], dtype=torch.float32)
            ex = Extracted(stored["features"], stored["labels"], stored["skipped"])
            identities[split] = (stored["manifest"].get("identity"), f"{data} ({stored['manifest']['source']})")
            info.setdefault("backbone", stored["manifest"]["source"])
            info.setdefault("transform", stored["manifest"]["transform"])
            if limit is not None and limit < len(ex.labels):
                keep = torch.randperm(len(ex.labels), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
                ex = Extracted({k: v[keep] for k, v in ex.features.items()}, ex.labels[keep], ex.skipped)
        else:
            ds = open_dataset(data, split) if isinstance(data, (str, os.PathLike)) else data
            ds = subset(ds, limit, seed)
            if resolved is None:
                resolved = resolve_feature_model(backbone, arch, random_init, crop)
                if not resolved.image_size:  # raw pixels without a size: the data's own
                    resolved.image_size = infer_image_size(ds)
                    resolved.source = f"pixels (raw-pixel baseline, {resolved.image_size} px)"
                info["backbone"] = resolved.source
                info["image_size"] = resolved.image_size
            if features is None:
                features = linear_feature_kinds(len(resolved.model.blocks), n_last_blocks)
            transform = eval_transform_for(resolved.image_size, resize, crop)
            info["transform"] = repr(transform)
            if live_identity is None:  # one hash of the weights; the transform is the same for both splits
                live_identity = feature_identity(resolved.model, transform, n_last_blocks)
            identities[split] = (live_identity, resolved.source)
            if isinstance(data, PreprocessedImages):  # images already through this very transform
                if repr(data.transform) != repr(transform):
                    raise ValueError(f"the {split} images were preprocessed with {data.transform!r}, but "
                                     f"{resolved.source} needs {transform!r}")
                transform = None
            ex = extract_features(resolved.model, ds, transform, batch_size, features, n_last_blocks,
                                  bf16, num_workers, progress, device)
        if features is None:
            features = list(ex.features)
        info[split] = {"spec": str(data) if isinstance(data, (str, os.PathLike)) else repr(data),
                       "n": len(ex.labels), "n_skipped": len(ex.skipped), "skipped": ex.skipped[:1000]}
        out.append(ex)
    info["features"] = [parse_feature_kind(k, n_last_blocks)[0] for k in features]  # type: ignore[union-attr]
    if test is None:
        return out[0], None, info
    _check_same_features(identities)
    return out[0], out[1], info


def _check_same_features(identities: dict[str, tuple[str | None, str]]) -> None:
    """Train and test features must come from one backbone with one preprocessing."""
    (train_id, train_src), (test_id, test_src) = identities["train"], identities["test"]
    if train_id is None or test_id is None:
        old = train_src if train_id is None else test_src
        raise ValueError(f"{old}: this feature folder records no backbone identity (written by an older "
                         "dinokit); embed it again so that its features can be checked against the other split's")
    if train_id != test_id:
        raise ValueError(f"train features ({train_src}, identity {train_id}) and test features ({test_src}, "
                         f"identity {test_id}) come from different backbones or preprocessing; they cannot be "
                         "compared")


def evaluate_knn(
    backbone: Any,
    train: Dataset | str | os.PathLike,
    test: Dataset | str | os.PathLike,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    few_shot: int | None = None,
    feature: str = "cls",
    **embed: Any,
) -> dict[str, Any]:
    """Weighted k-NN top-1 / top-5 of `backbone` features (`embed`: see `split_features`).

    Returns:
        {"protocol": "knn", "results": {"k": {"top1", "top5", "k_used"}}, "feature", "temperature",
        "few_shot", "backbone", "train": {...}, "test": {...}, "seconds", ...}.
    """
    from dinokit.eval.knn import knn_classify

    t0 = time.time()
    tr, te, info = split_features(backbone, train, test, [feature], **embed)
    name = info["features"][0]
    res = knn_classify(tr.features[name], tr.labels, te.features[name], te.labels, ks=ks, temperature=temperature,
                       device=embed.get("device") or default_device(), few_shot=few_shot, seed=embed.get("seed", 0))
    return {"protocol": "knn", "results": {str(k): v for k, v in res.items()}, "feature": name,
            "temperature": temperature, "few_shot": few_shot, **info, "seconds": round(time.time() - t0, 2)}


def evaluate_linear(
    backbone: Any,
    train: Dataset | str | os.PathLike,
    test: Dataset | str | os.PathLike,
    features: Sequence[str] | None = None,
    lrs: Sequence[float] | None = None,
    epochs: int = 10,
    probe_batch_size: int = 256,
    val_fraction: float = 0.1,
    **embed: Any,
) -> dict[str, Any]:
    """Linear probe (`linear_probe`) on the official feature set unless `features` is given."""
    from dinokit.eval.linear import linear_probe

    t0 = time.time()
    tr, te, info = split_features(backbone, train, test, features, **embed)
    res = linear_probe(tr.features, tr.labels, te.features, te.labels, kinds=info["features"], lrs=lrs,
                       epochs=epochs, batch_size=probe_batch_size, val_fraction=val_fraction,
                       seed=embed.get("seed", 0), device=embed.get("device") or default_device())
    return {"protocol": "linear", "results": res, **info, "seconds": round(time.time() - t0, 2)}


def evaluate_logreg(
    backbone: Any,
    train: Dataset | str | os.PathLike,
    test: Dataset | str | os.PathLike,
    feature: str = "cls",
    cs: Sequence[float] | None = None,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    patience: int | None = 2,
    **embed: Any,
) -> dict[str, Any]:
    """Logistic-regression probe (`logreg_probe`) on one feature kind."""
    from dinokit.eval.logreg import DEFAULT_CS, logreg_probe

    t0 = time.time()
    tr, te, info = split_features(backbone, train, test, [feature], **embed)
    name = info["features"][0]
    res = logreg_probe(tr.features[name], tr.labels, te.features[name], te.labels, cs=cs or DEFAULT_CS,
                       val_fraction=val_fraction, max_iter=max_iter, seed=embed.get("seed", 0), patience=patience)
    return {"protocol": "logreg", "feature": name, "results": res, **info, "seconds": round(time.time() - t0, 2)}


# ----------------------------------------------------------------------------- printing


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _header(result: dict[str, Any]) -> str:
    tr, te = result["train"], result["test"]
    return (f"backbone: {result.get('backbone', '?')}\n"
            f"train: {tr['spec']} ({tr['n']} images, {tr['n_skipped']} skipped)   "
            f"test: {te['spec']} ({te['n']} images, {te['n_skipped']} skipped)")


def format_result(result: dict[str, Any]) -> str:
    """A readable table of an `evaluate_*` result."""
    res = result["results"]
    if result["protocol"] == "knn":
        rows = [(k, v["k_used"], v["top1"], v.get("top5", "-")) for k, v in res.items()]
        body = _table(["k", "k used", "top-1 %", "top-5 %"], rows)
        body = f"k-NN on {result['feature']} (T={result['temperature']}" + (
            f", {result['few_shot']}-shot)" if result["few_shot"] else ")") + "\n" + body
    elif result["protocol"] == "linear":
        rows = [(k, f"{e['lr']:.3g}", e["val_top1"], e["test_top1"], e.get("test_top5", "-"))
                for k, e in res["per_feature"].items()]
        b = res["best"]
        body = (f"linear probe, {res['epochs']} epochs, {len(res['lrs'])} learning rates, "
                f"selected on {res['n_val']} validation images\n"
                + _table(["feature", "best lr", "val top-1 %", "test top-1 %", "test top-5 %"], rows)
                + f"\nchosen: {b['feature']} lr {b['lr']:.3g} -> test top-1 {b['test_top1']:.2f} %")
        if b["lr"] == max(res["lrs"]) and len(res["lrs"]) > 1:
            body += "\nnote: the largest learning rate won; a grid with larger --lrs (or more --epochs) may do better"
    elif result["protocol"] == "retrieval":
        ks = result["ks"]
        rows = [(name, 100 * m["map"], *(100 * m[f"recall@{k}"] for k in ks), m["n_queries"])
                for name, m in res.items()]
        q = result["query"]
        body = (f"retrieval, cosine similarity, relevant = same class; queries: "
                f"{q if isinstance(q, str) else q['spec']}\n"
                + _table(["feature", "mAP %", *(f"R@{k} %" for k in ks), "queries"], rows))
        return f"backbone: {result.get('backbone', '?')}\ngallery: {result['gallery']['spec']} " \
               f"({result['gallery']['n']} images, {result['gallery']['n_skipped']} skipped)\n{body}"
    else:
        rows = [(f"{g['C']:.3g}", "-" if g["val_top1"] is None else g["val_top1"],
                 "-" if g["val_top1"] is None else ("yes" if g["converged"] else "no (max_iter)")) for g in res["grid"]]
        b = res["best"]
        body = (f"logistic regression on {result['feature']}\n" + _table(["C", "val top-1 %", "converged"], rows)
                + f"\nchosen: C {b['C']:.3g} -> test top-1 {b['test_top1']:.2f} %"
                + (f", top-5 {b['test_top5']:.2f} %" if "test_top5" in b else ""))
        if res["skipped_by_patience"]:
            body += (f"\nnote: {len(res['skipped_by_patience'])} larger C not tried: validation accuracy had "
                     "stopped improving (--patience)")
        if res["not_converged"]:
            body += f"\nnote: {len(res['not_converged'])} fit(s) stopped at --max-iter before converging"
    return f"{_header(result)}\n{body}"


# ----------------------------------------------------------------------------- command line


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("backbone", help="run folder, transformers / timm folder, checkpoint file (+ --arch), architecture name, or pixels[:SIZE]")
    p.add_argument("--arch", default=None, help="architecture of a checkpoint file (default dinov2_vits14)")
    p.add_argument("--random-init", action="store_true", help="run folder: its architecture, random weights")
    p.add_argument("--n-last-blocks", type=int, default=4, help="n of the cls_lastN feature kinds")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data-loader worker processes (default: up to 8 on a GPU, 0 on CPU)")
    p.add_argument("--resize", type=int, default=None, help="resize side (default round(crop * 256 / 224))")
    p.add_argument("--crop", type=int, default=None, help="center crop (default the backbone's image size)")
    p.add_argument("--device", default=None, help="cuda / cpu (default cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="subsets, splits, few-shot draws, probe init")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _embed_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(arch=args.arch, random_init=args.random_init, n_last_blocks=args.n_last_blocks,
                batch_size=args.batch_size, bf16=args.bf16, device=args.device, resize=args.resize, crop=args.crop,
                num_workers=default_num_workers(args.device, args.num_workers), progress=not args.no_progress,
                max_train=getattr(args, "max_train", None), max_test=getattr(args, "max_test", None), seed=args.seed)


def _errors() -> tuple[type[BaseException], ...]:
    from dinokit.checkpoint import CheckpointError
    from dinokit.data.datasets import DatasetError

    return (CheckpointError, DatasetError, FileExistsError, FileNotFoundError, KeyError, ValueError, OverflowError)


def _run_embed(args: argparse.Namespace) -> int:
    try:
        ds = subset(open_dataset(args.data, args.split), args.max_images, args.seed)
        rb = resolve_feature_model(args.backbone, args.arch, args.random_init, args.crop)
        if not rb.image_size:
            rb.image_size = infer_image_size(ds)
            rb.source = f"pixels (raw-pixel baseline, {rb.image_size} px)"
        transform = eval_transform_for(rb.image_size, args.resize, args.crop)
        manifest = write_feature_shards(
            args.out, rb.model, ds, transform, features=args.features, shard_size=args.shard_size, dtype=args.dtype,
            source=rb.source, batch_size=args.batch_size, n_last_blocks=args.n_last_blocks, autocast_bf16=args.bf16,
            num_workers=default_num_workers(args.device, args.num_workers), progress=not args.no_progress,
            device=args.device or default_device(),
            overwrite=args.overwrite, description=f"{args.data} (split {args.split}"
            + (f", random subset of {args.max_images}, seed {args.seed})" if args.max_images else ")"))
    except _errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [(k, v["dim"]) for k, v in manifest["features"].items()]
    print(f"backbone: {manifest['source']}\n{_table(['feature', 'dim'], rows)}")
    print(f"wrote {manifest['n_rows']} rows in {len(manifest['shards'])} shard(s) ({manifest['dtype']}) to {args.out}; "
          f"{len(manifest['skipped'])} image(s) skipped")
    return 0


def _report(evaluate: Callable[[], dict[str, Any]], formatter: Callable[[dict[str, Any]], str],
            out: Path | None) -> int:
    """Run one evaluation for the command line: a bad input prints `error: ...` and gives exit
    status 2; otherwise the table is printed and the JSON written to `out` (when given)."""
    try:
        result = evaluate()
    except _errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(formatter(result))
    if out is not None:
        print(f"wrote {write_json(out, result)}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    kw = _embed_kwargs(args)

    def evaluate() -> dict[str, Any]:
        if args.protocol == "knn":
            return evaluate_knn(args.backbone, args.train, args.test, ks=args.ks, temperature=args.temperature,
                                few_shot=args.few_shot, feature=args.feature, **kw)
        if args.protocol == "linear":
            return evaluate_linear(args.backbone, args.train, args.test, features=args.features, lrs=args.lrs,
                                   epochs=args.epochs, probe_batch_size=args.probe_batch_size,
                                   val_fraction=args.val_fraction, **kw)
        return evaluate_logreg(args.backbone, args.train, args.test, feature=args.feature, cs=args.cs,
                               val_fraction=args.val_fraction, max_iter=args.max_iter,
                               patience=args.patience or None, **kw)

    return _report(evaluate, format_result, args.out)


def format_dense(result: dict[str, Any]) -> str:
    """A readable summary of a segmentation or depth result."""
    tr, te = result["train"], result["test"]
    head = (f"backbone: {result['backbone']}\n"
            f"train: {tr['spec']} ({tr['n']} images, {tr['n_skipped']} skipped)   "
            f"test: {te['spec']} ({te['n']} images, {te['n_skipped']} skipped)\n"
            f"input {result['size']} px, {result['features']}")
    if result["protocol"] == "segment":
        rows = [(c, "-" if v is None else 100 * v) for c, v in enumerate(result["per_class_iou"])]
        return (f"{head}\nlinear segmentation, {result['num_classes']} classes ({result['num_classes_from']}), "
                f"scales {result['scales']}{' + flips' if result['flip'] else ''}\n"
                + _table(["class", "IoU %"], rows)
                + f"\nmIoU {100 * result['miou']:.2f} %   pixel accuracy {100 * result['pixel_accuracy']:.2f} %")
    return (f"{head}\nlinear depth over {result['n_evaluated']} test maps, depth in ({result['min_depth']}, "
            f"{result['max_depth']:.3g}] m\nRMSE {result['rmse']:.4f} m   AbsRel {result['abs_rel']:.4f}   "
            f"delta<1.25 {100 * result['delta1']:.2f} %")


def dense_kwargs(args: argparse.Namespace, protocol: str) -> dict[str, Any]:
    """Keyword arguments of `evaluate_segmentation` / `evaluate_depth` from `add_dense_arguments`'s options."""
    from dinokit.eval.dense import MS_SCALES

    kw: dict[str, Any] = dict(size=args.size, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              arch=args.arch, random_init=args.random_init, cache_dir=args.cache, seed=args.seed,
                              device=None if args.device == "auto" else args.device, progress=not args.no_progress)
    if protocol == "segment":
        kw.update(layers=4 if args.ms else args.layers, scales=MS_SCALES if args.ms else tuple(args.scales),
                  flip=args.ms or args.flip, num_classes=args.num_classes)
    else:
        kw.update(layers=args.layers, depth_scale=args.depth_scale, min_depth=args.min_depth, max_depth=args.max_depth)
    return kw


def _run_dense(args: argparse.Namespace) -> int:
    from dinokit.eval.dense import evaluate_depth, evaluate_segmentation

    def evaluate() -> dict[str, Any]:
        kw = dense_kwargs(args, args.protocol)
        if args.protocol == "segment":
            return evaluate_segmentation(args.backbone, args.train, args.test, **kw).result
        return evaluate_depth(args.backbone, args.train, args.test, **kw)

    return _report(evaluate, format_dense, args.out)


def _run_retrieval(args: argparse.Namespace) -> int:
    from dinokit.eval.retrieval import evaluate_retrieval

    kw = {**_embed_kwargs(args), "max_train": args.max_gallery, "max_test": args.max_query}
    return _report(lambda: evaluate_retrieval(args.backbone, args.gallery, args.query, features=args.features,
                                              ks=args.ks, **kw), format_result, args.out)


def add_dense_arguments(p: argparse.ArgumentParser, protocol: str) -> None:
    """Options of `dinokit eval segment|depth` (and `dinokit viz segment`)."""
    p.add_argument("backbone", help="run folder, transformers / timm folder, checkpoint file (+ --arch), architecture "
                                    "name, or pixels (each 14 px patch's raw pixels)")
    p.add_argument("--arch", default=None, help="architecture of a checkpoint file (default dinov2_vits14)")
    p.add_argument("--random-init", action="store_true", help="run folder: its architecture, random weights")
    p.add_argument("--train", required=True, help="folder with images/ and " + (
        "masks/ (or a VOC2012:SPLIT / ADEChallengeData2016:SPLIT folder)" if protocol == "segment" else "depth/"))
    p.add_argument("--test", required=True, help="the same layout as --train")
    p.add_argument("--size", type=int, default=None,
                   help="input side, a multiple of the patch (default: the images' median short side, <= 37 patches)")
    p.add_argument("--layers", type=int, default=1, choices=[1, 4], help="patch tokens of the last 1 or 4 blocks")
    p.add_argument("--epochs", type=int, default=20, help="probe training epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="probe AdamW learning rate (cosine schedule)")
    p.add_argument("--batch-size", type=int, default=16, help="images per probe step (and per forward)")
    p.add_argument("--cache", type=Path, default=None, help="feature cache folder (reused, resumable)")
    p.add_argument("--device", default=None, help="cuda / cpu (default cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if protocol == "segment":
        p.add_argument("--num-classes", type=int, default=None,
                       help="default: VOC 21, ADE20k 150, else 1 + the largest index in the train masks")
        p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time input scales")
        p.add_argument("--flip", action="store_true", help="also average over horizontal flips at test time")
        p.add_argument("--ms", action="store_true",
                       help="the '+ms' setting: last 4 blocks, scales 0.5-1.75 and flips at test time")
    else:
        p.add_argument("--depth-scale", type=float, default=1000.0,
                       help="PNG value per metre (NYU exports: 1000, KITTI: 256)")
        p.add_argument("--min-depth", type=float, default=1e-3, help="metres; smaller ground truth is 'no measurement'")
        p.add_argument("--max-depth", type=float, default=None, help="metres (default: the train maps' largest; "
                                                                     "NYU 10, KITTI 80)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `embed` and `eval {knn,linear,logreg}` on a `dinokit` sub-command parser."""
    emb = subparsers.add_parser("embed", help="write frozen-backbone features of a data set to safetensors shards")
    _add_embed_options(emb)
    emb.add_argument("--data", required=True, help="fashion_mnist[:root], image folder, or .txt file list")
    emb.add_argument("--split", default="train", help="train / test (Fashion-MNIST)")
    emb.add_argument("--out", type=Path, required=True, help="feature folder (manifest.json + shards)")
    emb.add_argument("--features", nargs="+", default=["cls"],
                     help="cls, avgpool, gem, cls_lastN, cls_lastN_avgpool (N = --n-last-blocks) or cls_last<n>[_avgpool]")
    emb.add_argument("--shard-size", type=int, default=65536, help="rows per shard")
    emb.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    emb.add_argument("--max-images", type=int, default=None, help="seeded random subset of the data")
    emb.add_argument("--overwrite", action="store_true", help="replace an existing feature folder")
    emb.set_defaults(func=_run_embed)

    ev = subparsers.add_parser("eval", help="k-NN, linear-probe or logistic-regression evaluation of a backbone")
    protocols = ev.add_subparsers(dest="protocol", required=True)
    helps = {"knn": "weighted k-NN (T=0.07) on L2-normalised features",
             "linear": "linear classifiers for a grid of (feature, lr), trained together",
             "logreg": "L2 logistic regression (scikit-learn) over a C grid"}
    for name, text in helps.items():
        p = protocols.add_parser(name, help=text)
        _add_embed_options(p)
        p.add_argument("--train", required=True, help="train set: dataset spec or feature folder")
        p.add_argument("--test", required=True, help="test set: dataset spec or feature folder")
        p.add_argument("--max-train", type=int, default=None, help="seeded random subset of the train set")
        p.add_argument("--max-test", type=int, default=None, help="seeded random subset of the test set")
        p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
        if name == "knn":
            p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
            p.add_argument("--temperature", type=float, default=0.07)
            p.add_argument("--few-shot", type=int, default=None, help="use N train images per class")
            p.add_argument("--feature", default="cls")
        elif name == "linear":
            p.add_argument("--features", nargs="+", default=None, help="default: official {last 1, last 4} x {+-avgpool}")
            p.add_argument("--lrs", type=float, nargs="+", default=None, help="default: official list x batch/256")
            p.add_argument("--epochs", type=int, default=10)
            p.add_argument("--probe-batch-size", type=int, default=256)
            p.add_argument("--val-fraction", type=float, default=0.1)
        else:
            p.add_argument("--feature", default="cls")
            p.add_argument("--cs", type=float, nargs="+", default=None, help="default 1e-4 ... 100")
            p.add_argument("--val-fraction", type=float, default=0.1)
            p.add_argument("--max-iter", type=int, default=1000)
            p.add_argument("--patience", type=int, default=2,
                           help="stop the ascending C sweep after this many Cs without a better validation "
                                "accuracy (0: try every C)")
        p.set_defaults(func=_run_eval)
    dense_helps = {"segment": "linear segmentation probe on frozen patch tokens (mIoU)",
                   "depth": "linear depth probe on frozen patch + [CLS] tokens (RMSE, AbsRel, delta<1.25)"}
    for name, text in dense_helps.items():
        p = protocols.add_parser(name, help=text)
        add_dense_arguments(p, name)
        p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
        p.set_defaults(func=_run_dense)
    p = protocols.add_parser("retrieval", help="cosine retrieval: mAP and recall@k, class folders as relevance")
    _add_embed_options(p)
    p.add_argument("--gallery", required=True, help="gallery: image folder with class sub-folders, or feature folder")
    p.add_argument("--query", default=None, help="query set in the same form (default: leave-one-out in the gallery)")
    p.add_argument("--features", nargs="+", default=["cls", "gem"], help="cls, gem, avgpool, ...")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="recall@k")
    p.add_argument("--max-gallery", type=int, default=None, help="seeded random subset of the gallery")
    p.add_argument("--max-query", type=int, default=None, help="seeded random subset of the queries")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.set_defaults(func=_run_retrieval)

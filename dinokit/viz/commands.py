"""`dinokit viz ...`: attention maps, PCA pictures and training curves from the command line.

    dinokit viz attention dinov2_vits14_reg.pth dog.jpg cat.jpg --arch dinov2_vits14_reg --out pics/ --threshold 0.6
    dinokit viz pca runs/vits14 dog.jpg cat.jpg --out pics/pca.png
    dinokit viz curves runs/vits14 --out pics/curves.png
    dinokit viz segment runs/vits14 --train scenes/train --test scenes/test --out pics/segment

BACKBONE is anything `dinokit.checkpoint.resolve.resolve_backbone` takes: a run folder (its
teacher), a checkpoint file with `--arch`, or an architecture name (random weights).
`add_commands(subparsers)` registers the `viz` command on the main `dinokit` parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dinokit.models import OFFICIAL_ARCHS
from dinokit.models.vision_transformer import VisionTransformer


def read_image(path: Path) -> Image.Image:
    """RGB image of a file, or ValueError naming it (`load_image` only warns and returns None)."""
    from dinokit.data.datasets import load_image

    image = load_image(path)
    if image is None:
        raise ValueError(f"{path}: cannot be read as an image (missing, empty, corrupt or too large)")
    return image


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _backbone(args: argparse.Namespace) -> tuple[VisionTransformer, int]:
    """The resolved model on its device and the input size (--size, else the backbone's own)."""
    from dinokit.checkpoint.resolve import resolve_backbone

    resolved = resolve_backbone(args.backbone, args.arch)
    print(f"backbone: {resolved.source}", file=sys.stderr)
    return resolved.model.to(_device(args.device)), args.size or resolved.image_size


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems, numbered where two images share one (a/dog.jpg, b/dog.jpg)."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]


def _attention(args: argparse.Namespace) -> int:
    from dinokit.viz.attention import attention_maps, attention_picture, prepare_image

    images = [read_image(p) for p in args.images]  # fail on a bad file before loading the model
    model, size = _backbone(args)
    for image, stem in zip(images, _unique_stems(args.images)):
        shown, x = prepare_image(image, model.patch_size, size)
        maps = attention_maps(model, x)
        out = attention_picture(
            shown, maps, args.out / f"{stem}_attention.png", threshold=args.threshold, mode=args.mode
        )
        print(f"wrote {out}")
    return 0


def _pca(args: argparse.Namespace) -> int:
    from dinokit.viz.pca import pca_picture

    images = [read_image(p) for p in args.images]
    model, size = _backbone(args)
    threshold = None if args.no_foreground else args.threshold
    result = pca_picture(model, images, args.out, size=size, foreground_threshold=threshold, foreground=args.foreground)
    kept = ", ".join(f"{float(m.float().mean()):.0%}" for m in result.masks)
    print(f"wrote {result.path} (foreground patches per image: {kept})")
    return 0


def _curves(args: argparse.Namespace) -> int:
    from dinokit.viz.curves import plot_curves

    print(f"wrote {plot_curves(args.run_dir, args.out)}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from dinokit.eval.commands import dense_kwargs, format_dense
    from dinokit.eval.dense import evaluate_segmentation
    from dinokit.eval.embed import write_json
    from dinokit.viz.segment import segmentation_picture

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "segment.json").exists():
        raise ValueError(f"{out} exists, is not empty and holds no earlier segment.json; give a new folder")
    run = evaluate_segmentation(args.backbone, args.train, args.test, keep_predictions=args.n,
                                **dense_kwargs(args, "segment"))
    images = [read_image(run.test.images[i]) for i in run.prediction_index]
    picture = segmentation_picture(images, run.truths, run.predictions, run.result["num_classes"], out / "segment.png")
    run.result["picture"] = picture.name
    print(format_dense(run.result))
    print(f"wrote {picture} and {write_json(out / 'segment.json', run.result)}")
    return 0


def _guarded(func: Any) -> Any:
    """Turn expected failures (bad file, unknown backbone) into `error: ...` and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from dinokit.checkpoint import CheckpointError

        try:
            return int(func(args))
        except (CheckpointError, ValueError, OSError, ImportError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backbone", help="run folder, transformers / timm folder, checkpoint file (with --arch) or architecture name")
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    parser.add_argument("--arch", default=None, choices=sorted(OFFICIAL_ARCHS),
                        help="architecture of a checkpoint file")
    parser.add_argument("--size", type=int, default=None,
                        help="short side of the input in pixels (default: the backbone's eval size)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def add_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register `viz attention|pca|segment|curves` on the main parser's subparsers; returns `viz`.

    Each command sets `func(args) -> exit status` (0 ok, 2 for a bad input with a message).

    Example:
        >>> parser = argparse.ArgumentParser(prog="dinokit")
        >>> add_commands(parser.add_subparsers(dest="command", required=True))
        >>> args = parser.parse_args(["viz", "curves", "runs/tiny", "--out", "curves.png"])
        >>> args.func(args)
    """
    viz = subparsers.add_parser("viz", help="pictures: attention maps, PCA of patch features, segmentation, training curves")
    sub = viz.add_subparsers(dest="viz_command", required=True)

    att = sub.add_parser("attention", help="last-block [CLS] attention maps per head (DINO's object masks)")
    _backbone_arguments(att)
    att.add_argument("--out", type=Path, required=True, help="folder for IMAGE_STEM_attention.png")
    att.add_argument("--threshold", type=float, default=None,
                     help="also draw masks keeping this attention mass (e.g. 0.6)")
    att.add_argument("--mode", choices=["nearest", "bilinear"], default="nearest", help="upsampling of the patch grid")
    att.set_defaults(func=_guarded(_attention))

    pca = sub.add_parser("pca", help="PCA of patch features as colours, foreground only (DINOv2 style)")
    _backbone_arguments(pca)
    pca.add_argument("--out", type=Path, required=True, help="PNG file")
    pca.add_argument("--threshold", type=float, default=0.5, help="foreground threshold on the scaled 1st component")
    pca.add_argument("--foreground", choices=["auto", "high", "low"], default="auto",
                     help="side of the threshold that is foreground (auto: the smaller)")
    pca.add_argument("--no-foreground", action="store_true", help="plain PCA of all patches, no background removal")
    pca.set_defaults(func=_guarded(_pca))

    seg = sub.add_parser("segment", help="image / ground truth / prediction of a linear segmentation probe")
    from dinokit.eval.commands import add_dense_arguments

    add_dense_arguments(seg, "segment")
    seg.add_argument("--out", type=Path, required=True, help="folder for segment.png and segment.json")
    seg.add_argument("--n", type=int, default=6, help="test images shown")
    seg.set_defaults(func=_guarded(_segment))

    cur = sub.add_parser("curves", help="loss, schedules, health signals and k-NN accuracy of a run")
    cur.add_argument("run_dir", type=Path, help="run folder (or its metrics.jsonl)")
    cur.add_argument("--out", type=Path, required=True, help="PNG file")
    cur.set_defaults(func=_guarded(_curves))
    return viz

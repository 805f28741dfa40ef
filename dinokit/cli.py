"""Command line: `dinokit <command> ...`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dinokit.models import OFFICIAL_ARCHS


def _check_reference(args: argparse.Namespace) -> int:
    from dinokit.reference.checker import check_reference
    from dinokit.reference.core import ReferenceError

    failed = 0
    try:
        for result in check_reference(args.dir):
            print(result.line(), flush=True)
            failed += not result.ok
    except ReferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'all cases passed' if not failed else f'{failed} case(s) failed'}")
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    import json

    from dinokit.checkpoint import CheckpointError
    from dinokit.demo import run_demo

    try:
        summary = run_demo(args.out, args.arch, args.weights, args.image, args.size)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/summary.json, features.safetensors, pca.png")
    return 0


def _run_training(args: argparse.Namespace, items: list[str], distill: bool) -> int:
    """`dinokit train` / `distill`: config from preset + items + overrides, then the one loop.
    Exit codes: 2 for bad input (config, data, weights), 3 for a NaN loss."""
    import logging

    from dinokit.checkpoint import CheckpointError
    from dinokit.config import ConfigError, load_config, validate
    from dinokit.data.datasets import DatasetError
    from dinokit.train.distill import distill_config_with_teacher_heads
    from dinokit.train.loop import NonFiniteLossError, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.preset, [f"data.path={args.data}", *items, *args.overrides])
        if distill:  # the students' heads take the teacher's head sizes
            cfg = distill_config_with_teacher_heads(cfg)
            validate(cfg)
        result = train(cfg, args.out)
    except (ConfigError, DatasetError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        where = (f"students (their EMA backbones) in {args.out}/students/" if distill
                 else f"teacher backbone in {args.out}/teacher_backbone.safetensors")
        print(f"done: {result.steps_done} steps, loss {result.final_loss:.4f}, "
              f"{result.skipped_images} images skipped; {where}")
    return 0


def _train(args: argparse.Namespace) -> int:
    return _run_training(args, [f"init.backbone={args.init}"] if args.init else [], distill=False)


def _distill(args: argparse.Namespace) -> int:
    import json

    items = [f"distill.teacher={args.teacher}", f"distill.students={json.dumps(args.student or [])}"]
    if args.teacher_arch:
        items.append(f"distill.teacher_arch={args.teacher_arch}")
    return _run_training(args, items, distill=True)


def _quickstart(args: argparse.Namespace) -> int:
    import logging

    from dinokit.checkpoint import CheckpointError
    from dinokit.config import ConfigError
    from dinokit.data.datasets import DatasetError
    from dinokit.quickstart import run_quickstart
    from dinokit.train.loop import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        report = run_quickstart(args.out, args.data, args.fashion_mnist_root, args.steps, args.preset, args.overrides,
                                args.speedups)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dinokit.checkpoint import CheckpointError
    from dinokit.export.command import ExportError, export_backbone

    try:
        report = export_backbone(args.backbone, args.to, args.out, args.arch, args.img_size, args.tolerance)
    except (CheckpointError, ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    print(f"load it with:\n{report.usage}", end="")
    if not report.passed:
        print(f"error: the {args.to} outputs differ from dinokit's beyond {report.tolerance:g} "
              f"(see {args.out / 'parity.json'})", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinokit", description="DINO / DINOv2 self-supervised learning toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-reference", help="prove parity with the official code's reference outputs")
    check.add_argument("dir", type=Path, help="folder with manifest.json and the case files")
    check.set_defaults(func=_check_reference)

    tr = sub.add_parser("train", help="DINOv2 / DINO pretraining on a folder of images (resumes an existing --out)")
    tr.add_argument("data", help="image folder, file list, or Fashion-MNIST folder (with data.dataset=...)")
    tr.add_argument("--preset", default="tiny", help="tiny, vits14, vitb14, vitl14, vitg14, vitl16_short, dino_vits16, dino_resnet50")
    tr.add_argument("--out", type=Path, required=True, help="run folder (created, or resumed if it exists)")
    tr.add_argument("--init", default=None, metavar="BACKBONE",
                    help="start from these weights: a run folder, an official hub or training checkpoint, "
                         "a safetensors file, a transformers or timm folder (sets init.backbone)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=300")
    tr.set_defaults(func=_train)

    di = sub.add_parser("distill", help="distill a frozen teacher into one or several students (resumes an existing --out)")
    di.add_argument("data", help="image folder, file list, or Fashion-MNIST folder (with data.dataset=...)")
    di.add_argument("--teacher", required=True,
                    help="run folder, transformers / timm folder, or official / dinokit checkpoint file")
    di.add_argument("--teacher-arch", default=None, help="official architecture of a teacher file (default: from its name)")
    di.add_argument("--student", action="append", metavar="ARCH",
                    help="[SIZE][,key=value...] over the preset's model section, e.g. vit_small or depth=4; "
                         "repeat for several students (default: one of the preset's model)")
    di.add_argument("--preset", default="tiny", help="crops, heads and schedules (see dinokit train)")
    di.add_argument("--out", type=Path, required=True, help="run folder (created, or resumed if it exists)")
    di.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=300")
    di.set_defaults(func=_distill)

    qs = sub.add_parser("quickstart", help="pretrain (tiny preset), evaluate against baselines, write report.md")
    qs.add_argument("--data", type=Path, default=None, help="image folder (default: Fashion-MNIST)")
    qs.add_argument("--fashion-mnist-root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    qs.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    qs.add_argument("--steps", type=int, default=None, help="stop after N steps (default: the whole schedule)")
    qs.add_argument("--preset", default="tiny")
    qs.add_argument("--no-speedups", dest="speedups", action="store_false",
                    help="keep the preset's eager float32 step (default: compile the step, and bf16 on AMX CPUs)")
    qs.add_argument("overrides", nargs="*", help="dotted key=value overrides of the preset")
    qs.set_defaults(func=_quickstart)

    demo = sub.add_parser("demo", help="extract features of a photo and draw their PCA")
    demo.add_argument("--arch", default="dinov2_vits14", choices=sorted(OFFICIAL_ARCHS))
    demo.add_argument("--weights", type=Path, default=None, help="official or dinokit checkpoint file")
    demo.add_argument("--image", type=Path, default=None, help="image file (default: a bundled photo)")
    demo.add_argument("--size", type=int, default=224, help="input side in pixels (rounded to the patch)")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    demo.set_defaults(func=_demo)

    ex = sub.add_parser("export", help="write a backbone for transformers, timm or ONNX and check its outputs")
    ex.add_argument("backbone", help="run folder, checkpoint file (with --arch), transformers or timm folder")
    ex.add_argument("--to", required=True, choices=["hf", "timm", "onnx"])
    ex.add_argument("--out", type=Path, required=True, help="new (or empty) folder to write")
    ex.add_argument("--arch", default=None, help="architecture of a checkpoint file (default dinov2_vits14)")
    ex.add_argument("--img-size", type=int, default=None,
                    help="store the positional grid for this size (exact there for every target)")
    ex.add_argument("--tolerance", type=float, default=None, help="largest max |diff| accepted (default 1e-4)")
    ex.set_defaults(func=_export)

    from dinokit.curate.commands import add_commands as add_curate_commands
    from dinokit.eval.commands import add_commands as add_eval_commands
    from dinokit.viz.commands import add_commands as add_viz_commands

    add_eval_commands(sub)
    add_curate_commands(sub)
    add_viz_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (key=value) may come before or after options: collect what argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and args.command not in ("train", "distill", "quickstart")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `dinokit <command> ...`."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinokit", description="DINO / DINOv2 self-supervised learning toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check-reference", help="prove parity with the official code's reference outputs")
    check.add_argument("dir", type=Path, help="folder with manifest.json and the case files")
    check.set_defaults(func=_check_reference)

    demo = sub.add_parser("demo", help="extract features of a photo and draw their PCA")
    demo.add_argument("--arch", default="dinov2_vits14", choices=sorted(OFFICIAL_ARCHS))
    demo.add_argument("--weights", type=Path, default=None, help="official or dinokit checkpoint file")
    demo.add_argument("--image", type=Path, default=None, help="image file (default: a bundled photo)")
    demo.add_argument("--size", type=int, default=224, help="input side in pixels (rounded to the patch)")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

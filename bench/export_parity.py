"""`dinokit export` to transformers, timm and ONNX: the output differences it measures (JSON out).

    .venv/bin/python bench/export_parity.py --out bench/results/export_parity_cpu.json \
        [--run runs/fm_teacher] [--archs dinov2_vits14 dinov2_vits14_reg]

For each backbone (a run folder given with --run; official architectures with random weights
and a 224 px grid, perturbed so that no weight is at its initial value) and each target, runs the
export command's own check: the largest absolute difference between the target's tokens and
dinokit's at the stored grid's size, a larger square size and a non-square size, and, where the
target resizes positions by another rule, the difference to dinokit run with that rule.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dinokit.export.command import TARGETS, export_backbone
from dinokit.models.builders import build_official

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine_info  # bench/ is on sys.path when a script runs


def random_official(arch: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_official(arch, img_size=224)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", default=[], help="run folder(s) to export")
    parser.add_argument("--archs", nargs="*", default=["dinov2_vits14", "dinov2_vits14_reg"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="export_parity_") as tmp:
        work = Path(tmp)
        backbones: list[tuple[str, Path, str | None]] = [(str(run), run, None) for run in args.run]
        backbones += [(f"{arch} (random weights)", random_official(arch, work), arch) for arch in args.archs]
        for name, spec, arch in backbones:
            for target in args.targets:
                report = export_backbone(spec, target, work / f"{len(rows)}_{target}", arch=arch)
                print("\n".join(report.lines()), file=sys.stderr)
                data = report.to_json()
                rows.append({"backbone": name, "target": target, "passed": report.passed,
                             "tolerance": report.tolerance,
                             "target_resampling": data["target_resampling"],
                             "model_resampling": data["model_resampling"], "checks": data["checks"]})
    emit({"machine": machine_info(), "results": rows}, args.out)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

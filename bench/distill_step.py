"""Distillation step vs the student's own training step: images/s and peak memory (JSON out).

    .venv/bin/python bench/distill_step.py --out bench/results/distill_step_cpu.json
    .venv/bin/python bench/distill_step.py --configs tiny --steps 20

What the frozen teacher costs: each configuration times (a) `dinokit train`'s step of the student
alone (student + its EMA teacher), (b) the distillation step of that student (the frozen teacher's
forward on the two global crops, the student, its spare EMA), and (c) for `tiny`, one distillation
step feeding two students from one teacher forward, against the two students' own steps. Each
variant runs in a fresh process, so its peak resident set size is its own (CPU); on CUDA the
peak allocated memory. Synthetic crops, so data loading does not enter the number; images/s
counts source images. Configurations:
- `tiny`: the tiny preset (batch 64, 2 x 28 + 2 x 14 px): teacher 128 x 6 blocks, student 4 blocks.
- `vits`: ViT-B/14 teacher -> ViT-S/14 student, batch 8, 2 x 112 + 4 x 56 px, 65,536 prototypes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine_info  # noqa: E402
from train_step import time_steps  # noqa: E402

from dinokit.config import config_to_dict, load_config  # noqa: E402
from dinokit.train.loop import build_model, resolve_device  # noqa: E402
from dinokit.train.optim import build_optimizer  # noqa: E402

# name -> (preset, overrides of the teacher, students as `distill.students` items)
CONFIGS = {
    "tiny": ("tiny", [], ["depth=4"]),
    "tiny_two_students": ("tiny", [], ["depth=4", ""]),
    "vits": ("vits14", ["model.arch=vit_base", "optim.batch_size=8", "crops.global_size=112",
                        "crops.local_size=56", "crops.local_number=4", "train.autocast=none"], ["vit_small"]),
}


def _make_teacher(preset: str, overrides: list[str], folder: Path) -> Path:
    """A run folder with random teacher weights and heads (their values do not change the cost)."""
    from safetensors.torch import save_file

    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    save_file({k: v.contiguous() for k, v in model.teacher["backbone"].state_dict().items()},
              str(folder / "teacher_backbone.safetensors"))
    ckpt = folder / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    torch.save({"teacher": model.teacher.state_dict()}, ckpt / "state.pt")
    return folder


def _time_steps(cfg, device: torch.device, steps: int, warmup: int, run_dir: Path | None) -> dict:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = build_model(cfg, run_dir).to(device).train()
    optimizer = build_optimizer(model.trainable(), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    # Past the first epoch: the heads' last layer trains, as in most of a run.
    times = time_steps(model, optimizer, cfg, device, steps, warmup, first_step=1000)
    per_step = statistics.median(times)
    out = {"seconds_per_step_median": round(per_step, 4), "images_per_s": round(cfg.optim.batch_size / per_step, 2)}
    if device.type == "cuda":
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out["peak_rss_growth_mib"] = round(out["peak_rss_mib"] - rss_before, 1)
    return out


def one(config: str, variant: str, device: torch.device, steps: int, warmup: int, work: Path) -> dict:
    """One variant in this process: `alone:STUDENT` (the student's own step) or `distill`."""
    preset, overrides, students = CONFIGS[config]
    if variant.startswith("alone:"):
        spec = variant[len("alone:"):]
        items = [f"model.{item}" for item in spec.split(",") if "=" in item]
        items += [f"model.arch={item}" for item in spec.split(",") if item and "=" not in item]
        items += ["model.embed_dim=null", "model.num_heads=null"] if spec.startswith("vit_") else []
        cfg = load_config(preset, [*overrides, *items, f"train.device={device.type}"])
        return _time_steps(cfg, device, steps, warmup, None)
    teacher = _make_teacher(preset, overrides, work / "teacher")
    cfg = load_config(preset, [*overrides, f"train.device={device.type}", f"distill.teacher={teacher}",
                               f"distill.students={json.dumps(students)}"])
    return _time_steps(cfg, device, steps, warmup, work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one(*args.one, device, args.steps, args.warmup, Path(tmp))))
        return 0
    results = []
    for config in args.configs:
        students = CONFIGS[config][2]
        row: dict = {"config": config, "students": students}
        for variant in ["distill", *[f"alone:{s}" for s in students]]:
            cmd = [sys.executable, __file__, "--one", config, variant, "--device", args.device,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            row[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        alone_s = sum(row[f"alone:{s}"]["seconds_per_step_median"] for s in students)
        row["distill_time_vs_students_alone"] = round(row["distill"]["seconds_per_step_median"] / alone_s, 3)
        results.append(row)
        print(json.dumps(row), flush=True)
    emit({"machine": machine_info(), "steps": args.steps, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

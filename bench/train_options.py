"""Real-run throughput of the training options on a short tiny-preset pretraining (JSON out).

    .venv/bin/python bench/train_options.py --steps 400 --skip 100 --rounds 2 \
        --out bench/results/train_options_cpu.json

Unlike `train_step.py` (synthetic crops, one step in isolation), each variant here is a whole
`dinokit train --preset tiny` run on Fashion-MNIST, data loading included, launched as its own
process (torchrun for the multi-rank variants). The number is the mean of the `images_per_s`
that the run logs for its steps after `--skip` (start-up, compilation and warm-up excluded).
`--baseline REV` adds the default preset run from the source of git revision REV (a temporary
worktree), to measure a change against the code before it in the same report (`--baseline-variant`
picks which variant it runs). `--cold-cache` gives every run an empty inductor cache, so the
reported seconds of the first 10 steps include compiling as on a fresh machine. Variants run in
alternating rounds so that drift of a shared machine hits them alike; compare
the ratios to `default` in one report, not absolute numbers across machines. Run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dinokit.config import load_config
from dinokit.data.datasets import FASHION_MNIST_DIR
from _report import emit, machine_info  # bench/ is on sys.path when a script runs

# name -> (ranks, overrides). Ranks > 1 run under torchrun with one thread each (gloo on CPU).
VARIANTS: dict[str, tuple[int, list[str]]] = {
    "default": (1, []),
    "one_loader_worker": (1, ["data.num_workers=1"]),
    "compile": (1, ["train.compile=true"]),
    "compile_step": (1, ["train.compile=step"]),
    "compile_step_bf16": (1, ["train.compile=step", "train.autocast=bf16"]),
    # The same with the crops made in the training process (no loader worker competing for cores).
    "compile_step_crops_in_process": (1, ["train.compile=step", "crops.batched_on=device", "data.num_workers=0"]),
    "compile_step_bf16_crops_in_process": (1, ["train.compile=step", "train.autocast=bf16",
                                               "crops.batched_on=device", "data.num_workers=0"]),
    # What `dinokit quickstart` picks on a CPU with AMX and a C++ compiler: the above, and the
    # preset's images in batches of 256 (equal images, a quarter of the steps).
    "quickstart_cpu": (1, ["train.compile=step", "crops.batched_on=device", "data.num_workers=0",
                           "train.autocast=bf16", "optim.batch_size=256", "optim.epoch_length=75",
                           "teacher.momentum_teacher=0.8145"]),
    "bf16_autocast": (1, ["train.autocast=bf16"]),
    "two_ranks": (2, ["data.num_workers=0"]),
    # Not speed-only: a larger batch changes the recipe (the lr follows the scaling rule).
    "batch_128": (1, ["optim.batch_size=128"]),
    "batch_256": (1, ["optim.batch_size=256"]),
}


BASELINE = "baseline"  # --baseline-variant (default: `default`) run from another commit's source (--baseline REV)
REPO = Path(__file__).resolve().parents[1]


def baseline_source(rev: str, work: Path) -> Path:
    """A detached git worktree of `rev` (removed with `work`), to run its code as the baseline."""
    tree = work / "baseline-source"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return tree


def run_variant(name: str, steps: int, skip: int, data: str, work: Path, source: Path | None = None,
                baseline_variant: str = "default", cold_cache: bool = False) -> tuple[float, float]:
    """Mean images/s of the steps after `skip`, and the seconds of the first 10 steps (their logged
    speeds; start-up before the first step is not in it, compilation is)."""
    ranks, overrides = VARIANTS[baseline_variant if name == BASELINE else name]
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", "--preset", "tiny", "--out", str(out), data, "data.dataset=fashion_mnist",
            f"train.max_steps={steps}", "checkpoint.every=1000000", *overrides]
    env = dict(os.environ)
    if cold_cache:  # an empty inductor cache per run: compilation as on a fresh machine
        cache = work / f"{name}-compile-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    if source is not None:  # that commit's package first on the path, run from its tree
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")])
    if ranks == 1:
        command = [sys.executable, "-m", "dinokit.cli", *args]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "dinokit.cli", *args]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=source)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["images_per_s"] for row in rows if row["step"] > skip]
    if not speeds:
        raise SystemExit(f"{name}: no logged step after --skip {skip} (ran {len(rows)} steps)")
    batch = load_config("tiny", overrides).optim.batch_size
    first_steps = sum(batch / row["images_per_s"] for row in rows if row["step"] <= 10)
    return statistics.fmean(speeds), first_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--skip", type=int, default=100, help="steps left out of the mean (warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", default=FASHION_MNIST_DIR, help="the Fashion-MNIST IDX folder")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run --baseline-variant from this git revision (reported as variant 'baseline')")
    parser.add_argument("--baseline-variant", default="default", choices=list(VARIANTS),
                        help="the variant that --baseline runs (default: the preset's defaults)")
    parser.add_argument("--cold-cache", action="store_true",
                        help="every run compiles with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    names = ([BASELINE] if args.baseline else []) + args.variants
    speeds: dict[str, list[float]] = {name: [] for name in names}
    first_steps: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="dinokit-train-options-") as tmp:
        source = baseline_source(args.baseline, Path(tmp)) if args.baseline else None
        try:
            for _ in range(args.rounds):
                for name in names:
                    speed, first = run_variant(name, args.steps, args.skip, args.data, Path(tmp),
                                               source if name == BASELINE else None, args.baseline_variant,
                                               args.cold_cache)
                    speeds[name].append(speed)
                    first_steps[name].append(first)
        finally:
            if source is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove",
                                "--force", str(source)], check=False)
    base = statistics.fmean(speeds["default"]) if "default" in speeds else None
    old = statistics.fmean(speeds[BASELINE]) if args.baseline else None
    results = []
    for name in names:
        mean = statistics.fmean(speeds[name])
        ranks, overrides = VARIANTS[args.baseline_variant if name == BASELINE else name]
        row = {"variant": name, "ranks": ranks, "overrides": overrides, "images_per_s": round(mean, 1),
               "per_round": [round(s, 1) for s in speeds[name]], "vs_default": round(mean / base, 3) if base else None,
               "first_10_steps_seconds": [round(s, 1) for s in first_steps[name]]}
        if old:
            row["vs_baseline"] = round(mean / old, 3)
        results.append(row)
    report = {"machine": {**machine_info(), "cpus": os.cpu_count()}, "steps": args.steps, "skip": args.skip,
              "rounds": args.rounds, "baseline_revision": args.baseline,
              "baseline_variant": args.baseline_variant if args.baseline else None, "cold_cache": args.cold_cache,
              "results": results}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Starting from trained weights, measured on CPU: continued pretraining, domain adaptation,
distillation and a high-resolution phase, each against its baseline, with k-NN on held-out data.

The starting point is a tiny-preset teacher trained on Fashion-MNIST:

    .venv/bin/dinokit train /usr/share/datasets/fashion-mnist --preset tiny --out runs/fm_teacher \
        data.dataset=fashion_mnist
    .venv/bin/python bench/adaptation.py --teacher runs/fm_teacher --work runs/adaptation \
        --out bench/results/adaptation_cpu.json [--parts continue domain distill highres]

Parts (every run is a `dinokit` command, printed and recorded with its wall time):
- continue: the teacher continued on Fashion-MNIST with fresh heads, with and without a head
  warm-up; k-NN (60k / 10k) before and after.
- domain: the teacher continued on another domain, scikit-learn's handwritten digits (1,797
  8 x 8 scans shipped with the package, upscaled to 28 px, seeded 2/3 train, 1/3 test split);
  k-NN there for the starting backbone, the continued one and a from-scratch run of as many steps
  (1,500; `domain_short`: 600), which takes longer (the warm-up steps skip the backbone's backward).
- distill: the teacher distilled into a 4-block student and a student of its own architecture in
  one run; each student against the same architecture trained from scratch for the same wall
  time (the whole distillation's time, per student).
- distill_share: each student from scratch for its share of the distillation's time (the time
  divided by the number of students), in steps at the speed the distill part's scratch run of it
  had; needs the distill part's results (`--distill-results`).
- highres: a 56 px phase (4 x 4 tokens) continued from the teacher; k-NN at 56 px before / after,
  attention and PCA pictures at 56 px before / after.

Results are merged into the JSON file part by part, so a part can be re-run alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_info  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
DINOKIT = [sys.executable, "-m", "dinokit.cli"]
# The continued runs: 1,500 steps (5 epochs of 300), the preset's lr peak and 300-step lr warm-up.
# With a head warm-up: 300 steps of heads only (the prototype layer not frozen, so that it learns
# then), then the backbone's lr ramps up over 300 steps. Without: the preset as it is (last layer
# frozen for the first 300 steps, as the official recipe does).
CONTINUE_EPOCHS = ["optim.epochs=5", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1"]
WARMUP = ["train.head_warmup_steps=300", "train.backbone_lr_warmup_steps=300", "optim.freeze_last_layer_epochs=0"]


def run(cmd: list[str], log: Path) -> float:
    """Run a dinokit command (output to `log`); its wall time in seconds. Fails loudly."""
    print("$ dinokit " + " ".join(cmd[len(DINOKIT):]), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    return round(time.perf_counter() - t0, 1)


def knn(backbone: Path, train: str, test: str, work: Path, name: str, *extra: str) -> dict[str, float]:
    out = work / f"knn_{name}.json"
    run([*DINOKIT, "eval", "knn", str(backbone), "--train", train, "--test", test, "--out", str(out),
         "--num-workers", "2", "--no-progress", *extra], work / f"knn_{name}.log")
    res = json.loads(out.read_text())["results"]
    return {f"k{k}": v["top1"] for k, v in res.items()}


def images_per_s(run_dir: Path, skip: int = 20) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return median(r["images_per_s"] for r in rows[skip:])


def part_continue(teacher: Path, work: Path) -> dict[str, Any]:
    fm = ["data.dataset=fashion_mnist", *CONTINUE_EPOCHS]
    out: dict[str, Any] = {"before": knn(teacher, "fashion_mnist", "fashion_mnist", work, "fm_teacher")}
    for name, extra in (("head_warmup", WARMUP), ("no_warmup", [])):
        run_dir = work / f"fm_continue_{name}"
        cmd = [*DINOKIT, "train", FMNIST, "--preset", "tiny", "--init", str(teacher), "--out", str(run_dir),
               "init.heads=false", *fm, *extra]
        seconds = run(cmd, work / f"fm_continue_{name}.log")
        out[name] = {"command": " ".join(cmd[3:]), "seconds": seconds,
                     "knn": knn(run_dir, "fashion_mnist", "fashion_mnist", work, f"fm_continue_{name}")}
    return out


def write_digits(root: Path) -> tuple[Path, Path]:
    """scikit-learn's digits as PNG class folders, 28 px, a seeded 2/3 / 1/3 split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    train, test = root / "train", root / "test"
    if (root / "done").is_file():
        return train, test
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    cut = 2 * len(order) // 3
    for split, idx in ((train, order[:cut]), (test, order[cut:])):
        for i in idx:
            folder = split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)  # 0..16 gray levels
            Image.fromarray(pixels).resize((28, 28), Image.BICUBIC).save(folder / f"{i:04d}.png")
    (root / "done").write_text("")
    return train, test


def part_domain(teacher: Path, work: Path, epochs: int = 5) -> dict[str, Any]:
    """`epochs` of 300 steps; the head warm-up and the lr ramp are each a fifth of the run."""
    train, test = write_digits(work / "digits")
    out: dict[str, Any] = {"data": "scikit-learn digits, 1,797 images (1,198 train / 599 test), 28 px",
                           "steps": epochs * 300,
                           "before": knn(teacher, str(train), str(test), work, "digits_teacher")}
    fifth = epochs * 300 // 5
    warmup = [f"train.head_warmup_steps={fifth}", f"train.backbone_lr_warmup_steps={fifth}",
              "optim.freeze_last_layer_epochs=0"]
    sched = [f"optim.epochs={epochs}", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1"]
    runs = {"continued": ["--init", str(teacher), "init.heads=false", *warmup], "scratch": []}
    for name, extra in runs.items():
        run_dir = work / f"digits_{name}"
        cmd = [*DINOKIT, "train", str(train), "--preset", "tiny", "--out", str(run_dir), *sched,
               "data.num_workers=2", *extra]
        seconds = run(cmd, work / f"digits_{name}.log")
        out[name] = {"command": " ".join(cmd[3:]), "seconds": seconds,
                     "knn": knn(run_dir, str(train), str(test), work, f"digits_{name}")}
    return out


def part_distill(teacher: Path, work: Path, steps: int) -> dict[str, Any]:
    epochs = max(1, steps // 300)
    sched = [f"optim.epochs={epochs}", "optim.warmup_epochs=1", "teacher.warmup_teacher_temp_epochs=1"]
    run_dir = work / "distill"
    cmd = [*DINOKIT, "distill", FMNIST, "--teacher", str(teacher), "--student", "depth=4", "--student", "",
           "--out", str(run_dir), "data.dataset=fashion_mnist", *sched]
    seconds = run(cmd, work / "distill.log")
    out: dict[str, Any] = {"command": " ".join(cmd[3:]), "seconds": seconds, "steps": epochs * 300,
                           "images_per_s": images_per_s(run_dir), "students": {}}
    for name, arch in (("student0", ["model.depth=4"]), ("student1", [])):
        student = {"knn": knn(run_dir / "students" / name, "fashion_mnist", "fashion_mnist", work, f"distill_{name}")}
        # The same architecture from scratch, for the distillation's wall time: a short probe
        # gives its speed, then a whole schedule of that many steps.
        probe = work / f"scratch_{name}_probe"
        run([*DINOKIT, "train", FMNIST, "--preset", "tiny", "--out", str(probe), "data.dataset=fashion_mnist",
             "train.max_steps=120", "checkpoint.every=1000", *arch], work / f"scratch_{name}_probe.log")
        step_s = 64 / images_per_s(probe)
        scratch_steps = max(300, int(seconds / step_s) // 300 * 300)
        scratch = work / f"scratch_{name}"
        cmd_s = [*DINOKIT, "train", FMNIST, "--preset", "tiny", "--out", str(scratch), "data.dataset=fashion_mnist",
                 f"optim.epochs={scratch_steps // 300}", *arch]
        student["scratch"] = {"command": " ".join(cmd_s[3:]), "steps": scratch_steps,
                              "seconds": run(cmd_s, work / f"scratch_{name}.log"),
                              "knn": knn(scratch, "fashion_mnist", "fashion_mnist", work, f"scratch_{name}")}
        out["students"][name] = {"arch": " ".join(arch) or "the teacher's (tiny preset)", **student}
    return out


def part_distill_share(work: Path, report: dict[str, Any], students: list[str]) -> dict[str, Any]:
    """Each student from scratch for its share of the distillation's wall time (the run's time
    divided by its number of students). The steps that fit in the share come from the `distill`
    part's own from-scratch run of that student (its seconds per step, start-up included), so the
    share is counted on the machine that timed the distillation, wherever these runs execute."""
    distill = report["distill"]
    share = distill["seconds"] / len(distill["students"])
    out: dict[str, Any] = {"seconds_per_student": round(share, 1), "timed_on": report["machine"]["cpu"]}
    for name in students:
        student = distill["students"][name]
        arch = [] if student["arch"].startswith("the teacher") else student["arch"].split()
        step_s = student["scratch"]["seconds"] / student["scratch"]["steps"]
        steps = max(300, int(share / step_s) // 300 * 300)
        run_dir = work / f"scratch_{name}"
        cmd = [*DINOKIT, "train", FMNIST, "--preset", "tiny", "--out", str(run_dir), "data.dataset=fashion_mnist",
               f"optim.epochs={steps // 300}", *arch]
        out[name] = {"command": " ".join(cmd[3:]), "steps": steps, "seconds": run(cmd, work / f"scratch_{name}.log"),
                     "knn": knn(run_dir, "fashion_mnist", "fashion_mnist", work, f"scratch_{name}")}
    return out


def part_highres(teacher: Path, work: Path, size: int) -> dict[str, Any]:
    run_dir = work / "highres"
    cmd = [*DINOKIT, "train", FMNIST, "--preset", "tiny", "--init", str(teacher), "--out", str(run_dir),
           "data.dataset=fashion_mnist", "optim.epochs=2", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0",
           "teacher.warmup_teacher_temp_epochs=0", "highres.start_step=0", f"highres.global_size={size}",
           f"highres.local_size={size // 2}"]
    seconds = run(cmd, work / "highres.log")
    crop = ["--crop", str(size), "--resize", str(size)]
    pictures = work / "highres_pictures"
    sample = _sample_images(work / "fm_samples")
    for name, backbone in (("before", teacher), ("after", run_dir)):
        run([*DINOKIT, "viz", "attention", str(backbone), *sample, "--size", str(size), "--out", str(pictures / name)],
            work / f"viz_attention_{name}.log")
        run([*DINOKIT, "viz", "pca", str(backbone), *sample, "--size", str(size), "--out",
             str(pictures / name / "pca.png")], work / f"viz_pca_{name}.log")
    return {"command": " ".join(cmd[3:]), "seconds": seconds, "steps": 600, "size": size,
            "images_per_s": images_per_s(run_dir),
            "knn_before": knn(teacher, "fashion_mnist", "fashion_mnist", work, f"hr_before_{size}", *crop),
            "knn_after": knn(run_dir, "fashion_mnist", "fashion_mnist", work, f"hr_after_{size}", *crop),
            "pictures": str(pictures)}


def _sample_images(folder: Path) -> list[str]:
    """Four Fashion-MNIST test images as PNG files, for the pictures."""
    from dinokit.data.datasets import FashionMNIST

    folder.mkdir(parents=True, exist_ok=True)
    test = FashionMNIST(FMNIST, split="test")
    paths = []
    for i in (0, 1, 2, 3):
        path = folder / f"test_{i}.png"
        test[i][0].resize((112, 112)).save(path)  # large enough to see the 56 px maps
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None,
                        help="tiny-preset run folder trained on Fashion-MNIST (every part but distill_share)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the runs (one sub-folder per part)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (merged part by part)")
    parser.add_argument("--parts", nargs="+", default=["continue", "domain", "distill", "highres"])
    parser.add_argument("--distill-steps", type=int, default=3000)
    parser.add_argument("--highres-size", type=int, default=56)
    parser.add_argument("--share-students", nargs="+", default=["student0", "student1"],
                        help="students of the distill_share part")
    parser.add_argument("--distill-results", type=Path, default=None,
                        help="results JSON holding the distill part (default: --out)")
    args = parser.parse_args()
    if args.teacher is None and set(args.parts) - {"distill_share"}:
        parser.error(f"--teacher is needed by the parts {sorted(set(args.parts) - {'distill_share'})}")
    args.work.mkdir(parents=True, exist_ok=True)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report["machine"] = machine_info()
    if args.teacher is not None:
        report["teacher"] = {"run": str(args.teacher), "config": (args.teacher / "config.yaml").read_text()}
    for part in args.parts:
        work = args.work / part  # run again, a part's training runs resume (finished ones return at once)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if part == "continue":
            result = part_continue(args.teacher, work)
        elif part == "domain":
            result = part_domain(args.teacher, work)
        elif part == "domain_short":  # the same with 600 steps: the gain of a head start in time
            result = part_domain(args.teacher, work, epochs=2)
        elif part == "distill":
            result = part_distill(args.teacher, work, args.distill_steps)
        elif part == "distill_share":
            source = json.loads(args.distill_results.read_text()) if args.distill_results else report
            result = part_distill_share(work, source, args.share_students)
        elif part == "highres":
            result = part_highres(args.teacher, work, args.highres_size)
        else:
            raise SystemExit(f"unknown part {part!r}")
        result["part_seconds"] = round(time.perf_counter() - t0, 1)
        report[part] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps({part: result}, indent=2), flush=True)


if __name__ == "__main__":
    main()

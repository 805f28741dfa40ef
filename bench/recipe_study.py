"""Recipe study for small images: pretrain variants of the tiny preset, k-NN each (JSON lines out).

    .venv/bin/python bench/recipe_study.py --steps 300 --out bench/results/recipe.jsonl \
        base: \
        nols: model.layerscale=null \
        k4096: model.layerscale=null head.out_dim=4096

Each variant is `NAME:` followed by its dotted overrides of the tiny preset. Every variant
pretrains on the Fashion-MNIST training images (no labels) for `--steps` steps, then its teacher
backbone's [CLS] features of `--n-train` training images and `--n-test` test images are
classified by weighted k-NN (k = 20). Each result line holds the overrides, the k-NN top-1, the
final loss and health signals, and the wall time. Run by hand; docs/recipe-study.md records the
findings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dinokit.config import load_config
from dinokit.data.datasets import FASHION_MNIST_DIR
from dinokit.eval.commands import split_features
from dinokit.eval.knn import knn_classify
from dinokit.train.loop import train
from dinokit.train.metrics import read_metrics


def parse_variants(items: list[str]) -> list[tuple[str, list[str]]]:
    variants: list[tuple[str, list[str]]] = []
    for item in items:
        if item.endswith(":") and "=" not in item:
            variants.append((item[:-1], []))
        elif variants:
            variants[-1][1].append(item)
        else:
            raise SystemExit(f"override {item!r} comes before any NAME: variant")
    return variants


def run_variant(name: str, overrides: list[str], steps: int, root: Path, n_train: int, n_test: int) -> dict:
    cfg = load_config("tiny", [f"data.path={FASHION_MNIST_DIR}", "data.dataset=fashion_mnist",
                               f"train.max_steps={steps}", "train.log_every=100", *overrides])
    run_dir = root / name
    t0 = time.time()
    train(cfg, run_dir)
    train_seconds = time.time() - t0
    size = cfg.crops.global_size
    tr, te, _ = split_features(str(run_dir), "fashion_mnist", "fashion_mnist", ["cls", "avgpool"], resize=size,
                               crop=size, max_train=n_train, max_test=n_test, progress=False)
    knn = {kind: knn_classify(tr.features[kind], tr.labels, te.features[kind], te.labels, ks=(20,))[20]["top1"]
           for kind in ("cls", "avgpool")}
    last = read_metrics(run_dir)[-1]
    return {"name": name, "overrides": overrides, "steps": cfg.train.max_steps, "knn20_cls": round(knn["cls"], 2),
            "knn20_avgpool": round(knn["avgpool"], 2), "loss": last["loss"],
            "teacher_entropy": last["teacher_entropy"], "prototypes_used": last["prototypes_used"],
            "feature_std": last["feature_std"], "train_seconds": round(train_seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--runs", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here too")
    parser.add_argument("variants", nargs="+", help="NAME: key=value ... NAME: ...")
    args = parser.parse_args()
    for name, overrides in parse_variants(args.variants):
        result = run_variant(name, overrides, args.steps, args.runs, args.n_train, args.n_test)
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

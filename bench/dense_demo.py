"""Dense and retrieval evaluations of one backbone against random init and raw pixels (JSON out).

    bash scripts/dense_demo.sh OUT RUN            # builds the scene set, runs this, draws pictures
    .venv/bin/python bench/dense_demo.py --model RUN --scenes OUT/scenes --out results.json

On the constructed scene set of `dinokit.scenes` (Fashion-MNIST garments composed into scenes;
made up, not a benchmark of the literature) it runs, for the backbone `--model`, the same
architecture at random initialisation and the raw-pixel baseline: `dinokit eval segment`
(linear, last block), `dinokit eval depth` (lin. 1) and `dinokit eval retrieval` (CLS and GeM,
query set against gallery), each with the commands' defaults. Accuracy only: nothing is timed
except the whole run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _report import emit, machine_info  # bench/ is on sys.path when a script runs

from dinokit.eval.dense import evaluate_depth, evaluate_segmentation
from dinokit.eval.retrieval import evaluate_retrieval


def _row(result: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: round(float(result[k]), 4) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run folder (or any backbone spec)")
    parser.add_argument("--scenes", type=Path, required=True, help="folder written by python -m dinokit.scenes")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    t0 = time.time()
    backbones = {"pretrained": (args.model, False), "random_init": (args.model, True), "pixels": ("pixels", False)}
    report: dict[str, Any] = {"machine": machine_info(), "model": str(args.model), "scenes": str(args.scenes),
                              "constructed_data": True, "segment": {}, "depth": {}, "retrieval": {}}
    for name, (spec, random_init) in backbones.items():
        seg = evaluate_segmentation(spec, args.scenes / "train", args.scenes / "test", random_init=random_init,
                                    cache_dir=args.cache).result
        report["segment"][name] = {**_row(seg, ("miou", "pixel_accuracy")), "backbone": seg["backbone"],
                                   "size": seg["size"], "per_class_iou": seg["per_class_iou"]}
        depth = evaluate_depth(spec, args.scenes / "train", args.scenes / "test", random_init=random_init,
                               cache_dir=args.cache)
        report["depth"][name] = {**_row(depth, ("rmse", "abs_rel", "delta1")), "backbone": depth["backbone"]}
        ret = evaluate_retrieval("pixels:28" if spec == "pixels" else spec, args.scenes / "retrieval" / "gallery",
                                 args.scenes / "retrieval" / "query", random_init=random_init, progress=False)
        report["retrieval"][name] = {f: _row(m, ("map", "recall@1", "recall@5", "recall@10"))
                                     for f, m in ret["results"].items()}
        print(name, report["segment"][name]["miou"], report["depth"][name]["rmse"],
              report["retrieval"][name]["cls"]["map"], flush=True)
    report["settings"] = {"segment": {k: seg[k] for k in ("inference", "scales", "flip", "features")} | {
        "probe": {k: v for k, v in seg["probe"].items() if k != "train_loss"}},
        "depth": {k: depth[k] for k in ("inference", "metrics", "features", "max_depth", "max_depth_from")} | {
        "probe": {k: v for k, v in depth["probe"].items() if k != "train_loss"}},
        "retrieval": {"relevance": ret["relevance"], "similarity": ret["similarity"], "transform": ret["transform"]}}
    report["seconds"] = round(time.time() - t0, 1)
    emit(report, args.out)


if __name__ == "__main__":
    main()

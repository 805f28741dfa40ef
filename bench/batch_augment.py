"""Multi-crop augmentation cost: per-image PIL crops against batched tensor crops (JSON out).

    taskset -c 0 env OMP_NUM_THREADS=1 .venv/bin/python bench/batch_augment.py \
        --out bench/results/batch_augment_cpu.json

Both paths make the tiny preset's crops (2 x 28 px global, 2 x 14 px local, the DINOv2 recipe)
of the same Fashion-MNIST-sized images; the batched path includes its per-sample step (PIL image
-> uint8 tensor) and the per-image path its per-sample generator, as the loader runs them.
Reported: milliseconds per batch (median of rounds) and the ratio. Run by hand.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _report import emit, machine_info  # bench/ is on sys.path when a script runs
from dinokit.data.batch_augment import BatchMultiCrop, SourceImage
from dinokit.data.transforms import MultiCropAugmentation


def _images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L") for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    per_image = MultiCropAugmentation(args.size, args.size // 2, local_crops_number=2)
    batched = BatchMultiCrop.from_multicrop(per_image)
    source = SourceImage(args.size)
    images = _images(args.batch, args.size)

    def run_per_image(r: int) -> None:
        for i, im in enumerate(images):
            per_image(im.convert("RGB"), generator=torch.Generator().manual_seed(r * 100003 + i))

    def run_batched(r: int) -> None:
        batched(torch.stack([source(im) for im in images]), torch.Generator().manual_seed(r))

    timings: dict[str, list[float]] = {"per_image": [], "batched": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fn in (("per_image", run_per_image), ("batched", run_batched)):
            t0 = time.perf_counter()
            fn(r)
            if r:
                timings[name].append((time.perf_counter() - t0) * 1000)
    ms = {name: statistics.median(v) for name, v in timings.items()}
    emit({
        "benchmark": "batch_augment",
        "machine": machine_info(),
        "batch": args.batch, "image_size": args.size, "crops": "2 x global + 2 x local (half size)",
        "rounds": args.rounds,
        "ms_per_batch": {k: round(v, 2) for k, v in ms.items()},
        "images_per_s": {k: round(args.batch / v * 1000, 1) for k, v in ms.items()},
        "speedup_batched": round(ms["per_image"] / ms["batched"], 2),
    }, args.out)


if __name__ == "__main__":
    main()

"""A constructed dense-evaluation set: Fashion-MNIST garments composed into scenes.

This is a made-up data set, built offline so that `dinokit eval segment / depth / retrieval` can
be shown end to end without downloads. It is not a benchmark of the literature. Construction
(seeded, deterministic):

- a scene is a `size` x `size` gray canvas, dark as Fashion-MNIST's backgrounds: a level
  U(0, 40) with a ramp of up to 30 along a random direction, plus Gaussian noise (sigma 4 of 255);
- 2 to 4 garments are drawn from Fashion-MNIST (train scenes from its train split, test scenes
  from its test split). Each gets a scale s ~ U(0.75, 1.5), i.e. a side of 28 s px, and the
  depth d = 2 / s m (1.33 to 2.67 m; nearer garments look larger); it is pasted at a uniform
  position, far ones first so near ones occlude them, its gray level being its opacity;
- mask: 0 = background, 1 + Fashion-MNIST class (1..10) where the garment's opacity > 0.25,
  255 (ignore) on its soft edge (0.05 < opacity <= 0.25), as Pascal VOC marks object borders;
- depth (16-bit PNG, millimetres, scale 1000 as NYU): the background is a floor receding upwards,
  6 m at the top row to 3 m at the bottom, and each garment pixel (opacity > 0.25) takes its d;
- retrieval: Fashion-MNIST test images (disjoint from the test scenes' garments) in class folders,
  a gallery and a query set.

    python -m dinokit.scenes OUT [--train 500 --test 200 --size 112]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.data.datasets import FASHION_MNIST_CLASSES, FashionMNIST

__all__ = ["make_scene", "write_scene_set"]

SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
SOLID, EDGE = 0.25, 0.05  # opacity above SOLID: garment; between EDGE and SOLID: ignored border


def make_scene(garments: list[tuple[np.ndarray, int]], size: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene of `garments` ((28, 28) uint8 image, class) -> (RGB (size, size, 3) uint8,
    mask (size, size) uint8, depth (size, size) float32 metres)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / max(1e-6, float(ramp.max() - ramp.min()))
    canvas = rng.uniform(0, 40) + rng.uniform(0, 30) * ramp + rng.normal(0, 4, (size, size))
    mask = np.zeros((size, size), np.uint8)
    depth = (6.0 - 3.0 * yy).astype(np.float32)  # floor: 6 m at the top row, 3 m at the bottom
    placed = [(rng.uniform(0.75, 1.5), image, label) for image, label in garments]
    for scale, image, label in sorted(placed, key=lambda t: t[0]):  # small (far) first: near ones occlude
        side, d = int(round(28 * scale)), 2.0 / scale
        garment = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR), np.float32) / 255.0
        top, left = rng.integers(0, size - side + 1, 2)
        window = (slice(top, top + side), slice(left, left + side))
        canvas[window] = 255.0 * garment + (1 - garment) * canvas[window]
        solid = garment > SOLID
        edge = (garment > EDGE) & ~solid
        mask[window][solid] = 1 + label
        mask[window][edge] = 255
        depth[window][solid] = d
    rgb = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return rgb, mask, depth


def _write(out: Path, stem: str, rgb: np.ndarray, mask: np.ndarray, depth: np.ndarray) -> None:
    Image.fromarray(rgb).save(out / "images" / f"{stem}.png")
    Image.fromarray(mask).save(out / "masks" / f"{stem}.png")
    Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(out / "depth" / f"{stem}.png")


def write_scene_set(out: str | os.PathLike, n_train: int = 500, n_test: int = 200, size: int = 112,
                    n_gallery: int = 50, n_query: int = 10, seed: int = 0, fmnist_root: str | None = None) -> dict:
    """Write `out/{train,test}/{images,masks,depth}/` and `out/retrieval/{gallery,query}/<class>/`;
    refuses an `out` that exists and is not empty. Returns the description written to `out/scenes.json`."""
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; give a new folder")
    rng = np.random.default_rng(seed)
    splits = {"train": FashionMNIST(fmnist_root, "train") if fmnist_root else FashionMNIST(split="train"),
              "test": FashionMNIST(fmnist_root, "test") if fmnist_root else FashionMNIST(split="test")}
    used_test: set[int] = set()
    for split, n in (("train", n_train), ("test", n_test)):
        source = splits[split]
        for sub in ("images", "masks", "depth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            picks = rng.choice(len(source), size=int(rng.integers(2, 5)), replace=False)
            if split == "test":
                used_test.update(int(p) for p in picks)
            garments = [(source.data[p], int(source.targets[p])) for p in picks]
            _write(root / split, f"{split}_{i:05d}", *make_scene(garments, size, rng))
    # Retrieval: test images not used in the test scenes, n_gallery + n_query per class.
    test = splits["test"]
    free = [i for i in range(len(test)) if i not in used_test]
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        of_class = [i for i in free if int(test.targets[i]) == c][: n_gallery + n_query]
        for part, picks in (("gallery", of_class[:n_gallery]), ("query", of_class[n_gallery:])):
            folder = root / "retrieval" / part / name.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for i in picks:
                Image.fromarray(test.data[i]).save(folder / f"fmnist_test_{i:05d}.png")
    description = {"constructed": True, "classes": list(SCENE_CLASSES), "size": size, "train": n_train,
                   "test": n_test, "gallery_per_class": n_gallery, "query_per_class": n_query, "seed": seed,
                   "depth_scale": 1000, "construction": " ".join(__doc__.split("    python -m")[0].split())}
    (root / "scenes.json").write_text(json.dumps(description, indent=2))
    return description


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dinokit.scenes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="new (or empty) folder")
    parser.add_argument("--train", type=int, default=500, help="train scenes")
    parser.add_argument("--test", type=int, default=200, help="test scenes")
    parser.add_argument("--size", type=int, default=112, help="scene side in pixels")
    parser.add_argument("--gallery", type=int, default=50, help="retrieval gallery images per class")
    parser.add_argument("--query", type=int, default=10, help="retrieval query images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmnist-root", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    args = parser.parse_args(argv)
    d = write_scene_set(args.out, args.train, args.test, args.size, args.gallery, args.query, args.seed,
                        args.fmnist_root)
    print(f"wrote {d['train']} train and {d['test']} test scenes of {d['size']} px and a retrieval set of "
          f"{d['gallery_per_class']} + {d['query_per_class']} images per class to {args.out} (constructed data)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

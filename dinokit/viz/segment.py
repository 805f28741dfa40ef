"""Segmentation pictures: image / ground truth / prediction side by side for a few test images.

    dinokit viz segment runs/quickstart --train scenes/train --test scenes/test --out pics/segment

writes `pics/segment/segment.png` and, beside it, `segment.json` (the evaluation's results).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dinokit.eval.dense_data import IGNORE_INDEX

__all__ = ["palette", "segmentation_picture"]


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, the Pascal VOC palette (bits of the class index spread over R, G, B);
    class 0 is black. Ignored pixels (255) are drawn white."""
    colours = np.zeros((n, 3), np.uint8)
    for c in range(n):
        value, r, g, b = c, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[c] = (r, g, b)
    return colours


def _colour(mask: np.ndarray, colours: np.ndarray) -> Image.Image:
    rgb = np.full((*mask.shape, 3), 255, np.uint8)
    known = mask != IGNORE_INDEX
    rgb[known] = colours[np.minimum(mask[known], len(colours) - 1)]
    return Image.fromarray(rgb)


def segmentation_picture(
    images: Sequence[Image.Image],
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    num_classes: int,
    out_path: str | Path,
    min_side: int = 160,
) -> Path:
    """One row per image: the image, its ground truth, the prediction (nearest-neighbour enlarged
    to at least `min_side` px), with column titles; returns the PNG path."""
    colours = palette(max(num_classes, 1))
    rows = []
    for image, truth, pred in zip(images, truths, predictions):
        w, h = image.size
        scale = max(1, -(-min_side // min(w, h)))
        size = (w * scale, h * scale)
        panels = [image.convert("RGB").resize(size, Image.NEAREST), _colour(truth, colours).resize(size, Image.NEAREST),
                  _colour(pred, colours).resize(size, Image.NEAREST)]
        rows.append(panels)
    gap, title = 4, 16
    width = max(sum(p.size[0] for p in r) + gap * 2 for r in rows)
    height = title + sum(r[0].size[1] + gap for r in rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, panel in zip(("image", "ground truth", "prediction"), rows[0]):
        draw.text((x + 2, 2), name, fill="black")
        x += panel.size[0] + gap
    y = title
    for r in rows:
        x = 0
        for panel in r:
            canvas.paste(panel, (x, y))
            x += panel.size[0] + gap
        y += r[0].size[1] + gap
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out

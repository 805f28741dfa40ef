"""`dinokit curate report`: counts per stage, and pictures of duplicate groups and clusters.

Writes `report.md` and `report.json` (one row per stage folder: stage, mode, images in / kept /
dropped, seconds, index) and, when the stages include them,
- `duplicate_groups.png`: a seeded sample of self-deduplication groups, one per row, the kept
  representative first (green frame), the dropped copies after it (red frames);
- `clusters.png`: a seeded sample of level-1 clusters of `curate cluster`, one per row.

Images are read back through the data set the embeddings were made from (folder, file list or
Fashion-MNIST), so the pictures show exactly what was embedded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dinokit.curate.index import Embeddings
from dinokit.curate.stage import read_summary

__all__ = ["write_report"]

TILE = 64
PAD = 4
GREEN, RED, GRAY = (40, 160, 60), (200, 50, 50), (150, 150, 150)


def _loader(emb: Embeddings) -> Any:
    """dataset index -> PIL image, or None when the pool's data set cannot be opened here."""
    from dinokit.eval.embed import open_dataset

    cur = emb.manifest["curate"]
    try:
        ds = open_dataset(cur["data"], cur["split"])
    except (ValueError, OSError):
        return None

    def load(i: int) -> Image.Image | None:
        item = ds[int(i)]
        return None if item is None else item[0]

    return load


def _grid(rows: list[list[tuple[Image.Image | None, tuple[int, int, int]]]], path: Path) -> None:
    width = max(len(r) for r in rows) * (TILE + PAD) + PAD
    canvas = Image.new("RGB", (width, len(rows) * (TILE + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for y, row in enumerate(rows):
        for x, (im, colour) in enumerate(row):
            x0, y0 = PAD + x * (TILE + PAD), PAD + y * (TILE + PAD)
            if im is not None:
                canvas.paste(im.convert("RGB").resize((TILE - 4, TILE - 4), Image.BICUBIC), (x0 + 2, y0 + 2))
            draw.rectangle([x0, y0, x0 + TILE - 1, y0 + TILE - 1], outline=colour, width=2)
    canvas.save(path)


def write_report(stages: Sequence[str | os.PathLike], out_dir: str | os.PathLike, n_rows: int = 8, per_row: int = 8,
                 seed: int = 0) -> dict[str, Any]:
    """Write report.md / report.json / PNG grids for the stage folders `stages` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, pictures = [], []
    for folder in stages:
        s = read_summary(folder)
        rows.append({"folder": os.fspath(folder), "stage": s["stage"], "mode": s.get("mode", "-"), "n_in": s["n_in"],
                     "n_kept": s["n_kept"], "n_dropped": s["n_dropped"], "seconds": s.get("seconds"),
                     "index": (s.get("index") or {}).get("kind", "-")})
        emb = Embeddings(s["embeddings"])
        groups_file = Path(folder) / "groups.jsonl"
        if s["stage"] == "dedup" and s.get("mode") == "self" and groups_file.is_file():
            load = _loader(emb)
            groups = [json.loads(line) for line in groups_file.read_text().splitlines()]
            if load is not None and groups:
                pick = sorted(rng.choice(len(groups), min(n_rows, len(groups)), replace=False),
                              key=lambda g: (-groups[g]["size"], g))
                index = emb.dataset_index()  # all rows: groups store embedding rows
                grid = [[(load(index[r]), GREEN if j == 0 else RED) for j, r in enumerate(groups[g]["rows"][:per_row])]
                        for g in pick]
                _grid(grid, out / "duplicate_groups.png")
                pictures.append("duplicate_groups.png")
        if s["stage"] == "cluster" and (Path(folder) / "clusters.npz").is_file():
            load = _loader(emb)
            data = np.load(Path(folder) / "clusters.npz")
            labels, pool_rows = data["level1_labels"], data["pool_rows"]
            if load is not None:
                index = emb.dataset_index()
                sizes = np.bincount(labels)
                chosen = np.sort(rng.choice(np.nonzero(sizes)[0], min(n_rows, int((sizes > 0).sum())), replace=False))
                grid = []
                for c in chosen:
                    members = np.nonzero(labels == c)[0]
                    members = np.sort(rng.choice(members, min(per_row, len(members)), replace=False))
                    grid.append([(load(index[pool_rows[m]]), GRAY) for m in members])
                _grid(grid, out / "clusters.png")
                pictures.append("clusters.png")
    lines = ["# Curation report", "", "| stage | mode | images in | kept | dropped | index | seconds | folder |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['mode']} | {r['n_in']:,} | {r['n_kept']:,} | {r['n_dropped']:,} | {r['index']} | "
              f"{r['seconds']} | {r['folder']} |" for r in rows]
    notes = {"duplicate_groups.png": "Duplicate groups (one per row; green: kept representative, red: dropped)",
             "clusters.png": "Level-1 clusters (one per row, random members)"}
    for pic in pictures:
        lines += ["", f"## {notes[pic]}", "", f"![{pic}]({pic})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    result = {"stages": rows, "pictures": pictures}
    (out / "report.json").write_text(json.dumps(result, indent=2))
    return result

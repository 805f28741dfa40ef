"""What every curation stage reads and writes.

A stage reads an embeddings folder, optionally restricted (`after`) to the rows that earlier
stages kept, and writes a folder with:

- `keep.npy`: the embedding rows it keeps / selects (sorted int64; rows of the embeddings folder,
  not positions in the restricted pool), and `keep.txt`: their image paths, one per line;
- `summary.json`: stage name, options, counts (`n_in`, `n_kept`, `n_dropped`), index used, seconds;
- stage-specific files (drop lists, duplicate groups, clusters), see each stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinokit.curate.index import CurateError, Embeddings

__all__ = ["KEEP_FILE", "SUMMARY_FILE", "load_pool", "read_keep", "read_summary", "write_stage"]

KEEP_FILE = "keep.npy"
SUMMARY_FILE = "summary.json"


def read_summary(stage_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(stage_dir) / SUMMARY_FILE
    if not path.is_file():
        raise CurateError(f"{stage_dir} holds no {SUMMARY_FILE}: not the output folder of a curation stage")
    return json.loads(path.read_text())


def read_keep(stage_dir: str | os.PathLike) -> np.ndarray:
    """Rows kept by a stage (sorted int64)."""
    read_summary(stage_dir)
    return np.load(Path(stage_dir) / KEEP_FILE)


def load_pool(emb_dir: str | os.PathLike, after: Sequence[str | os.PathLike] = ()) -> Embeddings:
    """The embeddings of `emb_dir`, restricted to the rows every stage in `after` kept."""
    emb = Embeddings(emb_dir)
    rows = emb.rows
    for stage in after:
        summary = read_summary(stage)
        if Path(summary["embeddings"]).resolve() != Path(emb_dir).resolve():
            raise CurateError(f"stage {stage} ran on embeddings {summary['embeddings']}, not {emb_dir}")
        rows = np.intersect1d(rows, read_keep(stage))
    return Embeddings(emb_dir, rows) if len(after) else emb


def write_stage(out_dir: str | os.PathLike, stage: str, pool: Embeddings, keep_positions: np.ndarray,
                summary: dict[str, Any], after: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Write keep.npy / keep.txt / summary.json for `keep_positions` (positions in `pool`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep_positions = np.sort(np.asarray(keep_positions, dtype=np.int64))
    np.save(out / KEEP_FILE, pool.rows[keep_positions])
    (out / "keep.txt").write_text("".join(p + "\n" for p in pool.paths(keep_positions)))
    full = {"stage": stage, "embeddings": os.fspath(Path(pool.folder).resolve()),
            "after": [os.fspath(Path(a).resolve()) for a in after],
            "n_in": int(pool.n), "n_kept": len(keep_positions), "n_dropped": int(pool.n - len(keep_positions)),
            **summary}
    tmp = out / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2))
    os.replace(tmp, out / SUMMARY_FILE)  # written last: a folder with a summary is complete
    return full

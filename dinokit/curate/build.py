"""`dinokit curate build`: the curated file list, ready for `dinokit train`.

The curated set is the pool rows kept by EVERY stage given (e.g. self-dedup, relative dedup and
retrieval or clustering), in pool order, written one absolute path per line: the `filelist`
format of `dinokit train LIST data.dataset=filelist`.

Example:
    >>> build_list("pool_emb/", ["dedup/", "dedup_eval/", "cluster/"], "curated.txt")
    {'n_pool': 5000, 'n_curated': 2400, ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinokit.curate.index import CurateError
from dinokit.curate.stage import load_pool, read_summary

__all__ = ["build_list"]


def build_list(emb_dir: str | os.PathLike, stages: Sequence[str | os.PathLike], out_file: str | os.PathLike) -> dict[str, Any]:
    """Write the intersection of the stages' kept rows as a file list; returns (and writes next to
    it as `<out_file>.json`) the counts per stage."""
    if not stages:
        raise CurateError("build needs at least one stage folder (dedup, retrieve or cluster output)")
    pool = load_pool(emb_dir, stages)
    paths = pool.paths()
    fake = [p for p in paths[:1] if not os.path.isabs(p)]
    if fake:
        raise CurateError(f"the pool's images have no files (first path {fake[0]!r}: embedded from arrays); "
                          "`dinokit train` needs image files: write the images to a folder and embed that")
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(p + "\n" for p in paths))
    os.replace(tmp, out)
    n_pool = int(json.loads((Path(emb_dir) / "manifest.json").read_text())["n_rows"])
    summary = {"embeddings": os.fspath(Path(emb_dir).resolve()), "n_pool": n_pool, "n_curated": int(pool.n),
               "stages": [{"folder": os.fspath(Path(s).resolve()), "stage": read_summary(s)["stage"],
                           "mode": read_summary(s).get("mode"), "n_in": read_summary(s)["n_in"],
                           "n_kept": read_summary(s)["n_kept"]} for s in stages],
               "list": os.fspath(out.resolve()),
               "train": f"dinokit train {out} --out runs/curated data.dataset=filelist"}
    (out.with_name(out.name + ".json")).write_text(json.dumps(summary, indent=2))
    return summary


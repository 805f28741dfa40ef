"""Training curves of a run from its `metrics.jsonl`: losses, schedules, health signals, k-NN.

One small panel per quantity (they live on very different scales: lr ~1e-3, momentum ~0.99,
prototypes used in the thousands): losses, online k-NN, health signals, schedules.
Quantities absent from the records are skipped, so DINO v1 runs (no iBOT, no KoLeo) and runs
without online evaluation draw fine.

Needs matplotlib (a bare `Figure`, rendered by Agg: works without a display).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from dinokit.train.metrics import read_metrics

Record = dict[str, Any]

# (title, keys drawn together), in drawing order; the panels flow row by row. Loss terms share one
# panel: they are cross-entropies of comparable size and their sum is the total. Progress (loss,
# k-NN) comes first, then health signals, then the schedules, which fill the last row.
LOSS_PANELS: list[tuple[str, list[str]]] = [
    ("loss", ["loss", "dino_global", "dino_local", "ibot", "koleo"]),
]
HEALTH_PANELS: list[tuple[str, list[str]]] = [
    ("teacher entropy", ["teacher_entropy"]),
    ("prototypes used", ["prototypes_used"]),
    ("feature std", ["feature_std"]),
    ("KoLeo (unweighted)", ["koleo_value"]),
    ("images / s", ["images_per_s"]),
    ("skipped images", ["skipped_images"]),
]
SCHEDULE_PANELS: list[tuple[str, list[str]]] = [
    ("learning rate", ["lr"]),
    ("weight decay", ["wd"]),
    ("teacher momentum", ["momentum"]),
    ("teacher temperature", ["teacher_temp"]),
]


def load_records(run_dir: str | Path) -> list[Record]:
    """Records of RUN_DIR/metrics.jsonl (or of the given .jsonl file).

    A last line cut by a crash is skipped, as `MetricsLog` does on resume.

    Raises:
        ValueError: the file is missing or holds no record (the message names the file).
    """
    path = Path(run_dir)
    if path.is_dir() or path.suffix != ".jsonl":
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: is {path.parent} a dinokit run folder that has trained a step?")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} holds no metric records")
    return records


def series(records: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key over the records that have a finite number for it.

    Steps come from "step" (the record index + 1 where it is missing); non-finite values are
    written as null by `MetricsLog` and dropped here.
    """
    steps, values = [], []
    for i, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        steps.append(float(record.get("step", i + 1)))
        values.append(float(value))
    return steps, values


def knn_keys(records: Sequence[Record]) -> list[str]:
    """Keys starting with "knn" (online k-NN accuracies), in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            if key.startswith("knn"):
                seen.setdefault(key)
    return list(seen)


def plot_curves(run_dir_or_records: str | Path | Sequence[Record], out_path: str | Path, columns: int = 4) -> Path:
    """Draw the curves of a run to a PNG and return its path.

    Args:
        run_dir_or_records: a run folder (or its metrics.jsonl), or the records themselves
            (dicts with "step" and metric keys, as `dinokit.train.metrics.read_metrics` gives).
        out_path: PNG file to write (parent folders are created).
        columns: panels per row.

    Raises:
        ValueError: no metrics file, no records, or none of the known keys.

    Example:
        >>> plot_curves("runs/tiny", "runs/tiny/curves.png")
    """
    if isinstance(run_dir_or_records, (str, Path)):
        records = load_records(run_dir_or_records)
        title = str(run_dir_or_records)
    else:
        records = list(run_dir_or_records)
        if not records:
            raise ValueError("no metric records to plot")
        title = "training curves"

    knn = knn_keys(records)
    panels = [*LOSS_PANELS, *([("online k-NN accuracy", knn)] if knn else []), *HEALTH_PANELS, *SCHEDULE_PANELS]
    panels = [(t, ks) for t, ks in panels if any(series(records, k)[1] for k in ks)]
    if not panels:
        raise ValueError(f"{title}: the records have none of the known metric keys")
    grid_rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]

    try:
        # A bare Figure (no pyplot) renders with Agg and touches no global backend state, so it
        # works headless and does not disturb a notebook's backend.
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting curves needs matplotlib: pip install matplotlib") from exc

    fig = Figure(figsize=(4 * columns, 3 * len(grid_rows)))
    axes = fig.subplots(len(grid_rows), columns, squeeze=False)
    for r, row in enumerate(grid_rows):
        for c in range(columns):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            panel_title, keys = row[c]
            for key in keys:
                steps, values = series(records, key)
                if values:
                    # Sparse series (k-NN every few thousand steps) need markers to be seen.
                    marker = "o" if len(values) < 30 else None
                    ax.plot(steps, values, label=key, linewidth=1.0, marker=marker, markersize=3)
            ax.set_title(panel_title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=8)
            if keys == ["lr"]:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out

"""Shared tail of the benchmark scripts: print the JSON report and optionally write it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dinokit.machine import machine_info

__all__ = ["emit", "machine_info"]


def emit(report: dict[str, Any], out: Path | None) -> None:
    """Print `report` as indented JSON; also write it to `out` (parents created) when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")

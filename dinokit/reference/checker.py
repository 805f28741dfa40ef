"""`dinokit check-reference DIR`: run every case of a reference folder and report each one."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dinokit.reference.core import CaseContext, ReferenceError, Runner, load_case, unchecked_outputs


def runners() -> dict[str, Runner]:
    """Runner per case kind (imported here so each kind's code loads only when checking)."""
    from dinokit.reference import kinds_backbone, kinds_data_schedules, kinds_heads_losses

    table: dict[str, Runner] = {}
    for module in (kinds_backbone, kinds_heads_losses, kinds_data_schedules):
        table.update(module.RUNNERS)
    return table


@dataclass
class CaseResult:
    """Outcome of one case: `PASS <case> <max error>` or `FAIL <case> <what differs>`."""

    name: str
    ok: bool
    max_error: float
    detail: str
    n_checks: int

    def line(self) -> str:
        if self.ok:
            return f"PASS {self.name} {self.max_error:.3g} ({self.n_checks} checks)"
        return f"FAIL {self.name} {self.detail}"


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise ReferenceError(f"{path} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReferenceError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest.get("cases"), list):
        raise ReferenceError(f"{path} has no 'cases' list")
    return manifest


def check_case(folder: Path, case: dict, table: dict[str, Runner]) -> CaseResult:
    name = str(case.get("name", "<unnamed>"))
    kind = case.get("kind")
    runner = table.get(str(kind))
    if runner is None:
        return CaseResult(name, False, float("inf"), f"unknown case kind {kind!r}", 0)
    try:
        ctx: CaseContext = load_case(folder, case)
        runner(ctx)
    except Exception as exc:  # noqa: BLE001 - a crashing case is reported, not fatal
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return CaseResult(name, False, float("inf"), f"error: {exc} ({Path(where.filename).name}:{where.lineno})", 0)
    failures = [c for c in ctx.comparisons if not c.ok]
    missing = unchecked_outputs(ctx)
    worst = max((c.max_abs_err for c in ctx.comparisons), default=0.0)
    if not ctx.comparisons:
        return CaseResult(name, False, worst, "nothing was compared", 0)
    if failures or missing:
        parts = [f"{c.name}: {c.detail}" for c in failures[:3]]
        if len(failures) > 3:
            parts.append(f"... {len(failures) - 3} more failing tensors")
        if missing:
            parts.append(f"outputs not checked: {', '.join(missing[:5])}")
        return CaseResult(name, False, worst, "; ".join(parts), len(ctx.comparisons))
    return CaseResult(name, True, worst, "", len(ctx.comparisons))


def check_reference(folder: str | Path) -> Iterator[CaseResult]:
    """Yield one result per manifest case, in manifest order."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    table = runners()
    for case in manifest["cases"]:
        yield check_case(folder, case, table)

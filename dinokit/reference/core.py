"""Shared machinery of the parity checker: a case, its tensors, and the comparisons made on it.

A reference folder holds `manifest.json` and one safetensors file per case (see the README of
`tests/data/reference_dinov2`). Each case has a `kind`; a runner for that kind rebuilds the case from
the manifest's plain values, runs dinokit's implementation and calls `CaseContext.compare*` for
every reference output. The checker then insists that every `out.*` tensor of the file (debug
tensors excepted) was compared, so a runner cannot pass a case by forgetting part of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

# Tolerances from the reference README: backbones ~1e-5, heads and losses ~1e-6,
# integer / boolean outputs exact, float64 schedules 1e-12.
BACKBONE_TOL = 1e-5
HEAD_LOSS_TOL = 1e-6
SCHEDULE_TOL = 1e-12


class ReferenceError(Exception):
    """A case cannot be run: unknown kind, missing file, malformed manifest entry."""


@dataclass
class Comparison:
    """One reference tensor compared with dinokit's value."""

    name: str
    ok: bool
    max_abs_err: float
    detail: str = ""


@dataclass
class CaseContext:
    """A manifest case with its loaded tensors and the comparisons made so far.

    Args:
        case: the manifest entry (plain JSON values).
        tensors: every tensor of the case's safetensors file, by full name (`input.x`, `out.y`...).
    """

    case: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    comparisons: list[Comparison] = field(default_factory=list)
    compared: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return str(self.case["name"])

    def tensor(self, name: str) -> torch.Tensor:
        """A stored tensor by full name; a clear error if the file lacks it."""
        if name not in self.tensors:
            raise ReferenceError(f"case {self.name}: tensor '{name}' is not in {self.case.get('file')}")
        return self.tensors[name]

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with `prefix`, with the prefix stripped."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def compare(self, name: str, actual: torch.Tensor, atol: float, rtol: float | None = None) -> None:
        """Compare a floating tensor with `|a - e| <= atol + rtol * |e|` (rtol defaults to atol)."""
        expected = self.tensor(name)
        rtol = atol if rtol is None else rtol
        self.compared.add(name)
        actual = torch.as_tensor(actual).detach().cpu()
        if tuple(actual.shape) != tuple(expected.shape):
            self._record(name, False, math.inf, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
            return
        if expected.numel() == 0:
            self._record(name, True, 0.0)
            return
        a = actual.to(torch.float64)
        e = expected.to(torch.float64)
        if not torch.isfinite(a).all():
            self._record(name, False, math.inf, "non-finite values")
            return
        err = (a - e).abs()
        bound = atol + rtol * e.abs()
        worst = float(err.max())
        ok = bool((err <= bound).all())
        detail = "" if ok else f"max abs error {worst:.3g} exceeds atol={atol:g} rtol={rtol:g}"
        self._record(name, ok, worst, detail)

    def compare_exact(self, name: str, actual: torch.Tensor) -> None:
        """Compare integer / boolean tensors (or anything that must match bit for bit)."""
        expected = self.tensor(name)
        self.compared.add(name)
        actual = torch.as_tensor(actual).detach().cpu()
        if tuple(actual.shape) != tuple(expected.shape):
            self._record(name, False, math.inf, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
            return
        if actual.dtype != expected.dtype:
            actual = actual.to(expected.dtype)
        same = torch.equal(actual, expected)
        if same:
            self._record(name, True, 0.0)
            return
        n_bad = int((actual != expected).sum())
        worst = float((actual.to(torch.float64) - expected.to(torch.float64)).abs().max())
        self._record(name, False, worst, f"{n_bad} of {expected.numel()} entries differ")

    def check(self, name: str, ok: bool, error: float, detail: str = "") -> None:
        """Record a comparison made by the runner itself (e.g. a statistical test)."""
        self.compared.add(name)
        self._record(name, ok, error, "" if ok else detail)

    def _record(self, name: str, ok: bool, err: float, detail: str = "") -> None:
        self.comparisons.append(Comparison(name, ok, err, detail))


Runner = Callable[[CaseContext], None]


def load_case(folder: Path, case: dict[str, Any]) -> CaseContext:
    """Load the tensors of one case (an empty dict for cases without a file)."""
    file = case.get("file")
    tensors: dict[str, torch.Tensor] = {}
    if file:
        path = folder / file
        if not path.is_file():
            raise ReferenceError(f"case {case.get('name')}: file {path} does not exist")
        tensors = load_file(str(path))
    return CaseContext(case=case, tensors=tensors)


def unchecked_outputs(ctx: CaseContext) -> list[str]:
    """Reference outputs of the file that no comparison looked at (debug tensors are optional)."""
    roles = {k: v.get("role") for k, v in ctx.case.get("tensors", {}).items()}
    missing = []
    for name in ctx.tensors:
        role = roles.get(name)
        is_output = role == "output" or (role is None and name.startswith("out."))
        if is_output and not name.startswith("out.debug.") and name not in ctx.compared:
            missing.append(name)
    return sorted(missing)

"""`bench/gpu_smoke.sh` runs anywhere: on a machine without CUDA every CUDA-only check is skipped
with its reason and every other check passes, so the script is ready for the first GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine, run bench/gpu_smoke.sh itself")
def test_gpu_smoke_passes_on_cpu_with_the_cuda_checks_skipped(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_smoke.sh"), str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-4000:]
    checks = json.loads(out.read_text())["checks"]
    assert set(checks) == {"environment", "attention", "train_step", "loader", "cli_resume", "torchrun_fsdp",
                           "ddp_compile", "faiss_gpu"}
    statuses = {name: c["status"] for name, c in checks.items()}
    assert statuses["ddp_compile"] == "SKIP" and "CUDA only" in checks["ddp_compile"]["reason"]
    assert statuses["faiss_gpu"] == "SKIP"
    assert all(s == "PASS" for n, s in statuses.items() if n not in ("ddp_compile", "faiss_gpu")), statuses
    assert checks["attention"]["flash"] == "skipped: CUDA only"
    assert checks["cli_resume"]["max_loss_difference"] == 0.0  # bit-exact resume on CPU
    assert len(checks["torchrun_fsdp"]["knn_top1"]) == 2

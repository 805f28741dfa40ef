#!/usr/bin/env bash
# First contact with a GPU machine: environment, attention backends and packing, the ViT-S/14
# step in bf16 / fp32 (TF32 on and off) with peak memory, the loader's ceiling, the CLI with a
# resume, torchrun FSDP2 + activation checkpointing + online k-NN + resume, DDP with compile,
# faiss-gpu. One JSON; every check PASS / FAIL / SKIP. Without CUDA the CUDA-only checks are
# skipped and the rest run on the CPU at small sizes (a minute or two).
#   bash bench/gpu_smoke.sh [OUT_JSON]      # default bench/results/gpu_smoke.json
# Exits 1 when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu_smoke.json}
PY=${PYTHON:-.venv/bin/python}
exec "$PY" bench/gpu_smoke.py --out "$OUT"

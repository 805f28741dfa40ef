#!/usr/bin/env bash
# The main job: set up, prove parity with the official DINOv2 code, extract features of a photo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== parity with the official DINOv2 code (bundled reference outputs)"
.venv/bin/dinokit check-reference tests/data/reference_dinov2
echo "== feature extraction demo"
.venv/bin/dinokit demo --out outputs/demo "$@"

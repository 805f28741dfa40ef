#!/usr/bin/env bash
# The main job: set up, get Fashion-MNIST (Debian package) where possible, check parity with the
# official code, then pretrain the tiny preset and evaluate it (dinokit quickstart -> report.md).
# Extra arguments go to `dinokit quickstart`, e.g. --data my_images/ or --steps 200.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    || echo "could not install dataset-fashion-mnist; dinokit quickstart will say how to get the data"
fi
echo "== parity with the official DINOv2 code (bundled reference outputs)"
.venv/bin/dinokit check-reference tests/data/reference_dinov2
echo "== pretraining + evaluation (writes runs/quickstart/report.md)"
.venv/bin/dinokit quickstart --out runs/quickstart "$@"

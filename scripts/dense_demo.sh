#!/usr/bin/env bash
# Dense and retrieval evaluations on a constructed data set: Fashion-MNIST garments composed into
# scenes with exact masks and a made-up depth (see dinokit/scenes.py), a backbone vs random init
# vs raw pixels, and a picture of the segmentation probe.
#   bash scripts/dense_demo.sh OUT [BACKBONE]     (BACKBONE default: runs/quickstart/run, the quickstart model)
# OUT must be new or empty. Needs Fashion-MNIST (Debian package dataset-fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/dense_demo.sh OUT [BACKBONE]}
MODEL=${2:-runs/quickstart/run}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "error: $OUT exists and is not empty; give a new folder" >&2
  exit 2
fi
PY=.venv/bin/python
$PY -m dinokit.scenes "$OUT/scenes"
$PY bench/dense_demo.py --model "$MODEL" --scenes "$OUT/scenes" --cache "$OUT/cache" --out "$OUT/dense_demo.json"
.venv/bin/dinokit viz segment "$MODEL" --train "$OUT/scenes/train" --test "$OUT/scenes/test" --cache "$OUT/cache" \
  --out "$OUT/segment" --no-progress
echo "wrote $OUT/dense_demo.json and $OUT/segment/segment.png"

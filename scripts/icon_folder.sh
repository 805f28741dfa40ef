#!/usr/bin/env bash
# A labeled folder of ordinary images, built offline from Debian's Oxygen icon theme: the 128 px
# PNG icons of 7 categories (actions, apps, categories, devices, mimetypes, places, status; 823
# images, transparent backgrounds) as OUT/<category>/<icon>.png. Used to measure
# `dinokit quickstart --data` on images that are not 28 px (docs/quickstart-folders.md).
#   bash scripts/icon_folder.sh OUT        # OUT: new or empty; needs apt-get (Debian / Ubuntu)
set -euo pipefail
OUT=${1:?usage: bash scripts/icon_folder.sh OUT}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null || echo file)" ]; then
  echo "error: $OUT exists and is not an empty folder; name a new one" >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT   # our own temporary folder
(cd "$WORK" && apt-get download oxygen-icon-theme >/dev/null)
dpkg -x "$WORK"/oxygen-icon-theme_*.deb "$WORK/x"
mkdir -p "$OUT"
for c in actions apps categories devices mimetypes places status; do
  mkdir -p "$OUT/$c"
  cp "$WORK/x/usr/share/icons/oxygen/base/128x128/$c/"*.png "$OUT/$c/"
done
echo "$(find "$OUT" -name '*.png' | wc -l) icons in $(ls "$OUT" | wc -l) classes under $OUT"

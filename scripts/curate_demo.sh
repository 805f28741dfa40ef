#!/usr/bin/env bash
# End-to-end `dinokit curate` on real images: 3,000 Fashion-MNIST test images written as PNG plus
# planted copies (100 each resized, JPEG re-encoded, cropped, mirrored; 50 leaked evaluation
# images), then embed -> dedup -> dedup --against -> cluster -> build -> report, and the recall /
# precision of the planted duplicates. Raw-pixel embedding (pixels:28): no weights needed.
#   bash scripts/curate_demo.sh [OUT]     (default outputs/curate_demo; a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/curate_demo}
PY=".venv/bin/python"
DK=".venv/bin/dinokit"
rm -rf "$OUT"
mkdir -p "$OUT"

$PY - "$OUT" <<'EOF'
import io, json, sys
from pathlib import Path
from PIL import Image, ImageOps
from dinokit.data.datasets import FashionMNIST

out = Path(sys.argv[1])
ds = FashionMNIST(split="test")
pool, ev = out / "pool", out / "eval"
pool.mkdir(); ev.mkdir()
for i in range(3000):
    ds[i][0].save(pool / f"a_{i:05d}.png")
for i in range(3000, 3500):
    ds[i][0].save(ev / f"e_{i:05d}.png")

def jpeg(im):
    buf = io.BytesIO(); im.save(buf, "JPEG", quality=50)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

copies = {"resized": lambda im: im.resize((40, 40), Image.BICUBIC), "reencoded": jpeg,
          "cropped": lambda im: im.crop((1, 1, 27, 27)), "flipped": ImageOps.mirror}
truth = {"copies": {}, "leaks": {}}
for k, (kind, fn) in enumerate(copies.items()):
    for j in range(100):
        src = k * 100 + j
        name = f"z_{kind}_{src:05d}.png"
        fn(ds[src][0]).save(pool / name)
        truth["copies"][str((pool / name).resolve())] = str((pool / f"a_{src:05d}.png").resolve())
for j in range(50):  # evaluation images leaked into the pool, resized
    name = f"y_leak_{3000 + j:05d}.png"
    ds[3000 + j][0].resize((36, 36), Image.BICUBIC).save(pool / name)
    truth["leaks"][str((pool / name).resolve())] = str((ev / f"e_{3000 + j:05d}.png").resolve())
(out / "truth.json").write_text(json.dumps(truth, indent=1))
print(f"wrote {len(list(pool.iterdir()))} pool images, {len(list(ev.iterdir()))} evaluation images")
EOF

run() { echo "+ $*"; taskset -c 1 env OMP_NUM_THREADS=1 "$@"; }
run $DK curate embed pixels:28 --data "$OUT/pool" --out "$OUT/emb" --shard-size 1000
run $DK curate embed pixels:28 --data "$OUT/eval" --out "$OUT/eval_emb"
run $DK curate dedup "$OUT/emb" --out "$OUT/dedup"
for t in 0.9 0.95; do run $DK curate dedup "$OUT/emb" --threshold $t --out "$OUT/dedup_$t"; done
# 0.45 is calibrated for a large self-supervised ViT on web photos; raw pixels of Fashion-MNIST
# put unrelated images far closer (median nearest-neighbour cosine 0.93), hence 0.95 here.
run $DK curate dedup "$OUT/emb" --against "$OUT/eval_emb" --threshold 0.95 --out "$OUT/dedup_eval"
run $DK curate cluster "$OUT/emb" --after "$OUT/dedup_0.95" "$OUT/dedup_eval" --target 0.5 --out "$OUT/cluster"
run $DK curate build "$OUT/emb" "$OUT/dedup_0.95" "$OUT/dedup_eval" "$OUT/cluster" --out "$OUT/curated.txt"
run $DK curate report "$OUT/dedup_0.95" "$OUT/dedup_eval" "$OUT/cluster" --out "$OUT/report" > /dev/null

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
truth = json.loads((out / "truth.json").read_text())
copies = truth["copies"]
originals = set(copies.values())
result = {}
for stage in ("dedup", "dedup_0.9", "dedup_0.95"):
    s = json.loads((out / stage / "summary.json").read_text())
    group_of = {}
    for g, line in enumerate((out / stage / "groups.jsonl").read_text().splitlines()):
        for m in json.loads(line)["members"]:
            group_of[m] = g
    dropped = [l.split("\t")[0] for l in (out / stage / "drop.tsv").read_text().splitlines()]
    found = {c for c, o in copies.items() if c in group_of and group_of.get(o) == group_of[c]}
    recall = {k: sum(f"z_{k}_" in c for c in found) / 100 for k in ("resized", "reencoded", "cropped", "flipped")}
    # a drop is explained by the planted truth when it is a copy, or an original whose copy was kept
    planted = sum(d in copies or d in originals for d in dropped)
    result[stage] = {"threshold": s["threshold"], "dropped": len(dropped), "groups": s["n_groups"],
                     "largest_group": s["largest_group"], "recall": recall,
                     "recall_all": len(found) / len(copies),
                     "precision_vs_planted": round(planted / max(len(dropped), 1), 3)}
rel = [l.split("\t")[0] for l in (out / "dedup_eval" / "drop.tsv").read_text().splitlines()]
leaks = truth["leaks"]
result["dedup_eval"] = {"threshold": 0.95, "dropped": len(rel), "leak_recall": sum(l in rel for l in leaks) / len(leaks),
                        "precision_vs_planted": round(sum(d in leaks for d in rel) / max(len(rel), 1), 3)}
result["curated"] = len((out / "curated.txt").read_text().splitlines())
(out / "measured.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
EOF
echo "report: $OUT/report/report.md, measured: $OUT/measured.json"

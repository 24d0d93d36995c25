#!/usr/bin/env bash
# The acceptance measurements of `atop eval robust` (docs/evaluation.md), on 512 seeded CIFAR-10
# test images with the CPU classifier:
#   undefended  every attack of the eval-robust-cpu preset at Linf 8/255, every check
#   quantized   behind a 16-level quantisation: PGD (no random start), Square and BPDA
#   noise       behind Gaussian noise sigma 0.01 at 2/255: PGD-50 x EOT 10, transfer, check runs
#   selective   the same noise model: PGD vs selective EOT, both 20 steps x 8 draws
# Evaluations whose folder holds finished results are read, not rerun; interrupted ones resume.
# Prints one table row per attack and the checks of each evaluation.
#
#   scripts/eval-acceptance.sh [OUT_DIR]      (default runs/eval-acceptance)
# Environment: ATOP (target/release/atop), MODEL (runs/cifar10-small), N (512).
set -euo pipefail
out=${1:-runs/eval-acceptance}
atop=${ATOP:-target/release/atop} model=${MODEL:-runs/cifar10-small} n=${N:-512}
[ -x "$atop" ] || { echo "no $atop: run cargo build --release first (or set ATOP)" >&2; exit 1; }
mkdir -p "$out"
run() { # NAME ARGS...
  local dir=$out/$1
  shift
  [ -f "$dir/results.json" ] || "$atop" --quiet eval robust --model "$model" --n "$n" --out "$dir" "$@" > /dev/null
}
noise=(--transform noise --sigma 0.01 --eps 2/255)
run undefended --preset eval-robust-cpu
run quantized --quantize 16 --attack pgd,square,bpda --random-start false --steps 50 \
  --queries 1000 --draws 1 --check-points 0
run noise "${noise[@]}" --attack pgd,transfer --steps 50 --eot 10 --draws 10 --check-points 64
run selective "${noise[@]}" --attack pgd,selective-eot --steps 20 --eot 8 --draws 10 --check-points 0
for name in undefended quantized noise selective; do
  python3 - "$out/$name/results.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
def show(p):
    return f"{100 * p['value']:.2f} % [{100 * p['lo']:.1f}, {100 * p['hi']:.1f}]"
print(f"\n### {sys.argv[2]}: {r['provenance']['defence']}, {r['n']} points, {r['seconds'] / 60:.1f} min\n")
print("| images | budget | single draw | majority of R | worst of R |")
print("|---|---|---|---|---|")
print(f"| clean | - | {show(r['clean']['single'])} | {show(r['clean']['majority'])} | {show(r['clean']['worst_of_r'])} |")
for a in r["attacks"] + [{"attack": "**worst case per point**", "budget": "", "scores": r["worst_case"]}]:
    s = a["scores"]
    print(f"| {a['attack']} | {a['budget']} | {show(s['single'])} | {show(s['majority'])} | {show(s['worst_of_r'])} |")
print()
for c in r["checks"]:
    print(f"- {c['status']} {c['name']}: {c['detail']}")
PY
done

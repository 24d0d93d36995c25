#!/usr/bin/env bash
# The AToP acceptance measurement of docs/atop.md: the classifier behind the pre-trained
# purifier and behind each fine-tuned one, attacked by whole-model PGD and selective EOT with
# exact gradients and EOT (default 50 steps x EOT 10 each, step eps/4, random start; on a random
# model each returns its last iterate) on 512 seeded CIFAR-10 test
# images, at Linf 8/255 and 4/255, each adversarial image scored by R = 10 draws of the
# defended model (atop eval robust). The headline is the worst case per point over the clean
# image and both attacks. Prints one table row per purifier and budget, naming the attack that
# broke the most points. An evaluation whose folder already holds finished results is read, not
# rerun; an interrupted one resumes.
#
#   scripts/atop-acceptance.sh CLASSIFIER OUT_DIR PURIFIER [PURIFIER ...]
#
# Then, per budget, each later PURIFIER against the first, point by point (atop eval compare).
# e.g. scripts/atop-acceptance.sh runs/cifar10-small runs/acceptance runs/purifier-cpu runs/atop-fastat
# A PURIFIER may also be a generator file of a checkpoint (an AToP run's generator-live.safetensors).
# Environment: STEPS (50), EOT (10), N (512), DRAWS (10), EPS ("8/255 4/255"),
# ATTACKS ("pgd,selective-eot"), SHARD (unset: all N points; i/n: batch b of the seeded points
# when b mod n = i, in folders ending -shard-i-of-n; once every shard of a purifier and budget
# is there, the whole evaluation is merged into the unsharded folder and read from it; a
# shard is a slice of the points in index order, by class on CIFAR-10's test split).
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,15p "$0" >&2; exit 2; }
classifier=$1 out=$2
shift 2
atop=${ATOP:-target/release/atop}
[ -x "$atop" ] || { echo "no $atop: run cargo build --release first (or set ATOP)" >&2; exit 1; }
steps=${STEPS:-50} eot=${EOT:-10} n=${N:-512} draws=${DRAWS:-10} attacks=${ATTACKS:-pgd,selective-eot}
shard=${SHARD:-}
if [ -n "$shard" ]; then
  [[ $shard =~ ^([0-9]+)/([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -lt "${BASH_REMATCH[2]}" ] ||
    { echo "SHARD=$shard: expected i/n with 0 <= i < n (e.g. 0/4)" >&2; exit 2; }
  shards=${BASH_REMATCH[2]}
fi
mkdir -p "$out"
# A result folder per purifier: a checkpoint or run folder by its name, a generator file (e.g. a
# run's generator-live.safetensors) by its whole path.
name() {
  if [ -f "$1" ]; then local p=${1%.safetensors}; echo "${p//\//_}"; else basename "$1"; fi
}
# The whole evaluation's folder of a purifier and budget.
whole() { echo "$out/$(name "$1")-eps${2%/255}"; }
# The folder to read and run: the whole's, or with SHARD the shard's (the whole's once all its
# shards are merged).
folder() {
  local w
  w=$(whole "$1" "$2")
  if [ -z "$shard" ] || [ -f "$w/results.json" ]; then echo "$w"; else echo "$w-shard-${shard/\//-of-}"; fi
}
for purifier in "$@"; do
  for eps in ${EPS:-8/255 4/255}; do
    dir=$(folder "$purifier" "$eps")
    if [ ! -f "$dir/results.json" ]; then
      "$atop" --quiet eval robust --model "$classifier" --purifier "$purifier" \
        --attack "$attacks" --steps "$steps" --eot "$eot" --eps "$eps" --n "$n" --draws "$draws" \
        --check-points 0 --batch-size 128 ${shard:+--shard "$shard"} --out "$dir" > /dev/null
    fi
    if [ -n "$shard" ]; then
      w=$(whole "$purifier" "$eps")
      parts=()
      for ((i = 0; i < shards; i++)); do
        [ -f "$w-shard-$i-of-$shards/results.json" ] && parts+=("$w-shard-$i-of-$shards")
      done
      if [ ! -f "$w/results.json" ] && [ ${#parts[@]} -eq "$shards" ]; then
        "$atop" --quiet eval merge "${parts[@]}" --out "$w" > /dev/null
      fi
    fi
  done
done
# Robust: right on the clean and on every attacked image (the worst case per point), as
# AutoAttack counts it; single draw = the mean over the R draws.
echo "| purifier | eps | defended clean (single draw) | robust, single draw | robust, majority of $draws | robust, worst of $draws | strongest attack (single draw) | minutes |"
echo "|---|---|---|---|---|---|---|---|"
for purifier in "$@"; do
  for eps in ${EPS:-8/255 4/255}; do
    dir=$(folder "$purifier" "$eps")
    python3 - "$dir/results.json" "$purifier" "$eps" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
def show(p):
    return f"{100 * p['value']:.2f} % [{100 * p['lo']:.1f}, {100 * p['hi']:.1f}]"
a = r["worst_case"]
s = min(r["attacks"], key=lambda x: x["scores"]["single"]["value"])
strongest = f"{s['attack']} ({100 * s['scores']['single']['value']:.2f} %)"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {show(r['clean']['single'])} | {show(a['single'])} "
      f"| {show(a['majority'])} | {show(a['worst_of_r'])} | {strongest} | {r['seconds'] / 60:.1f} |")
EOF
  done
done
# Paired, against the first purifier: both scored on the same points and scoring draws, per
# point the share of its R draws right (clean; robust = the clean image and every attack right
# on the same draw), the later purifier minus the first, with a 95 % bootstrap interval and the
# exact McNemar test of the majority votes (atop eval compare, the study report's comparison).
[ $# -ge 2 ] || exit 0
base=$1
shift
for eps in ${EPS:-8/255 4/255}; do
  echo
  dirs=()
  for purifier in "$@"; do dirs+=("$(folder "$purifier" "$eps")"); done
  "$atop" eval compare "$(folder "$base" "$eps")" "${dirs[@]}"
done

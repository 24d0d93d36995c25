#!/usr/bin/env bash
# One `atop eval robust` split over a Slurm job array, then merged.
#
#   scripts/slurm-eval-robust.sh OUT_DIR SHARDS -- EVAL_ROBUST_ARGS...
#
# submits an array of SHARDS tasks, task i running
#   atop eval robust EVAL_ROBUST_ARGS... --shard i/SHARDS --out OUT_DIR/shard-i
# (each resumable: a requeued or resubmitted task continues its shard), and a job that runs
#   atop eval merge OUT_DIR/shard-* --out OUT_DIR/merged
# once every task has succeeded. Extra sbatch options go in SBATCH_ARGS (e.g.
# SBATCH_ARGS="--partition=gpu --gres=gpu:1 --time=04:00:00"). Prints the two job ids.
#
# e.g. scripts/slurm-eval-robust.sh runs/eval-aa 4 -- --model runs/small --purifier runs/atop \
#        --attack autoattack-rand,bpda,transfer --eps 8/255 --n 512
set -euo pipefail
[ $# -ge 3 ] && [ "$3" = "--" ] || { sed -n 2,15p "$0" >&2; exit 2; }
out=$1 shards=$2
shift 3
case $shards in '' | *[!0-9]* | 0) echo "SHARDS must be a positive integer, got '$shards'" >&2; exit 2 ;; esac
atop=$(realpath "${ATOP:-target/release/atop}")
[ -x "$atop" ] || { echo "no $atop: run cargo build --release first (or set ATOP)" >&2; exit 1; }
mkdir -p "$out/logs"
out=$(realpath "$out")
args=$(printf '%q ' "$@")
# shellcheck disable=SC2086
array=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=atop-eval --array="0-$((shards - 1))" \
  --chdir="$PWD" --output="$out/logs/shard-%a.log" \
  --wrap="$atop --quiet eval robust $args --shard \$SLURM_ARRAY_TASK_ID/$shards --out $out/shard-\$SLURM_ARRAY_TASK_ID")
# shellcheck disable=SC2086
merge=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=atop-merge --dependency="afterok:${array%%;*}" \
  --chdir="$PWD" --output="$out/logs/merge.log" \
  --wrap="$atop eval merge $out/shard-* --out $out/merged")
echo "array job $array ($shards tasks), merge job $merge: results in $out/merged"

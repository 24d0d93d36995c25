#!/usr/bin/env bash
# atop's CUDA path in one run on a GPU machine: the accelerator against the CPU on the same
# weights and inputs (`atop bench device`, at the paper's 256 px and at the CPU preset's 32 px),
# then the real commands on the GPU with their costs: the acceptance evaluation of the
# pre-trained pipeline at 8/255 and 4/255, one epoch of the closest AToP recipe, the purifier and AToP step
# benchmarks, and the CPU classifier preset's training.
#
#   scripts/device-check.sh CLASSIFIER PURIFIER OUT
#     CLASSIFIER  a trained classifier (runs/cifar10-small)
#     PURIFIER    its pre-trained purifier (runs/purifier-cpu)
#     OUT         a new folder: one log per step, summary.txt (exit status and seconds of each)
#   ATOP (default target/release/atop), DEVICE (default cuda), ATOP_DATA_DIR as usual.
#
# Each step has its own time limit; a failed step does not stop the ones after it, and the exit
# status is the number of failed steps.
set -uo pipefail
[ $# -eq 3 ] || { sed -n 2,14p "$0" >&2; exit 2; }
classifier=$1 purifier=$2 out=$3
atop=${ATOP:-target/release/atop}
dev=${DEVICE:-cuda}
[ -x "$atop" ] || { echo "no $atop: run cargo build --release first (or set ATOP)" >&2; exit 2; }
[ ! -e "$out" ] || { echo "$out exists: give a new folder" >&2; exit 2; }
mkdir -p "$out"
failed=0

step() { # name seconds command...
  local name=$1 secs=$2
  shift 2
  local t0 rc
  t0=$(date +%s%N)
  timeout "$secs" "$@" >"$out/$name.txt" 2>&1
  rc=$?
  local ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%-22s exit %-3s %8.1f s\n' "$name" "$rc" "$(awk "BEGIN{print $ms/1000}")" | tee -a "$out/summary.txt"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step info 60 "$atop" --device "$dev" info
step parity-256px 150 "$atop" --device "$dev" bench device --model "$classifier" --n 512 \
  --purifier-images 8
step parity-32px 90 "$atop" --device "$dev" bench device --model "$classifier" --n 512 \
  --purifier-preset purifier-cifar10-cpu --purifier-images 64
# The acceptance protocol of issue 13 (scripts/atop-acceptance.sh) on the pre-trained pipeline.
for eps in 8 4; do
  step eval-pretrained-eps$eps 180 "$atop" --device "$dev" --quiet eval robust \
    --model "$classifier" --purifier "$purifier" --attack pgd --steps 50 --eot 10 --eps $eps/255 \
    --n 512 --draws 10 --check-points 0 --batch-size 128 --out "$out/eval-pretrained-eps$eps"
done
# One epoch of the closest recipe (docs/atop.md, width 32, lambda 0.1) on 8,192 images.
step atop-epoch 150 "$atop" --device "$dev" --quiet train atop --preset atop-cifar10-cpu \
  --classifier "$classifier" --purifier "$purifier" --out "$out/atop-epoch" --adversary pgd \
  --adversary-steps 1 --adversary-step-size 0.0392 --adversary-target defended --epochs 1 \
  --train-subset 8192 --warmup-steps 100 --lambda 0.1 --widen 32
step bench-purifier 90 "$atop" --device "$dev" bench purifier \
  --preset purifier-cifar10-paper purifier-cifar10-cpu --no-reference
step bench-atop-paper 90 "$atop" --device "$dev" bench atop --preset atop-cifar10-paper \
  --purifier-preset purifier-cifar10-paper --no-reference
step bench-atop-cpu 60 "$atop" --device "$dev" bench atop --no-reference
step train-classifier 150 "$atop" --device "$dev" --quiet train classifier --preset cifar10-small \
  --out "$out/classifier"
exit "$failed"

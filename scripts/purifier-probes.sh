#!/usr/bin/env bash
# Short purifier pre-training probes: each trains for one epoch of a seeded subset of the
# CIFAR-10 training images, from the base settings below (the authors' generator layout at width
# 16 under RT2, reconstruction + KL guidance from the first step, Adam 1e-3, constant) with the
# flags given, then the table of docs/purifier.md is printed: setting, minutes, img/s, PSNR and
# purified accuracy on 1,000 test images. A probe whose folder already holds a finished (or
# failed) run is not run again.
#
#   scripts/purifier-probes.sh CLASSIFIER OUT_DIR IMAGES "label|flags" ["label|flags" ...]
#
# e.g. scripts/purifier-probes.sh runs/cifar10-small runs/probes 25600 \
#        "authors' layout|" "residual|--residual true"
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,11p "$0" >&2; exit 2; }
classifier=$1 out=$2 images=$3
shift 3
atop=${ATOP:-target/release/atop}
[ -x "$atop" ] || { echo "no $atop: run cargo build --release first (or set ATOP)" >&2; exit 1; }
mkdir -p "$out"
base="$out/probe-base.toml"
cat > "$base" <<'EOF'
epochs = 1
batch_size = 64
seed = 0
eval_subset = 1000
gan_weight = 0.0
kl_weight = 1.0
schedule = "constant"
precision = "auto"
[generator_optimizer]
lr = 0.001
beta1 = 0.5
beta2 = 0.999
[discriminator_optimizer]
lr = 0.001
beta1 = 0.5
beta2 = 0.999
[data]
dataset = "cifar10"
[purifier]
width = 16
disc_width = 32
[transform]
kind = "rt2"
EOF
rows=()
for probe in "$@"; do
  label=${probe%%|*} flags=${probe#*|}
  dir="$out/$(printf '%s' "$label" | tr -c 'A-Za-z0-9.=-' '_')"
  if [ ! -f "$dir/last.json" ] && [ ! -f "$dir/failed.txt" ]; then
    rm -rf "$dir"
    # shellcheck disable=SC2086
    if ! "$atop" --quiet train purifier --config "$base" --classifier "$classifier" \
      --train-subset "$images" --out "$dir" $flags >/dev/null 2>"$dir.err"; then
      mkdir -p "$dir" && mv "$dir.err" "$dir/failed.txt"
    fi
    rm -f "$dir.err"
  fi
  if [ -f "$dir/failed.txt" ]; then
    rows+=("| $label | \`$flags\` | - | - | - | failed: $(tail -c 160 "$dir/failed.txt" | tr -d '\n|') |")
    continue
  fi
  rows+=("$(python3 - "$dir/metrics.jsonl" "$label" "$flags" <<'EOF'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][-1]
acc = m.get("purified_acc")
acc = f"{100 * acc:.1f} %" if acc is not None else "-"
flags = f"`{sys.argv[3]}`" if sys.argv[3].strip() else "(base)"
print(f"| {sys.argv[2]} | {flags} | {m['seconds'] / 60:.1f} | {m['img_per_s']:.1f} | {m['psnr']:.2f} | {acc} |")
EOF
)")
done
echo "| setting | flags | minutes | img/s | PSNR (dB) | purified accuracy |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"

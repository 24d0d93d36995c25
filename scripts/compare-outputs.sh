#!/usr/bin/env bash
# The before/after check of a restructuring: runs `atop attack` (a deterministic classifier, a
# random defence, AutoAttack standard), `eval robust` (a random defence, four attacks, check
# runs) and a toy `atop run` study (the one of tests/study.rs) with two binaries on the same
# seeds, and prints, per output, whether everything but timings and paths is identical.
#
#   scripts/compare-outputs.sh OLD_BINARY NEW_BINARY [CLASSIFIER]
#
# CLASSIFIER: a trained CIFAR-10 checkpoint (default runs/cifar10-small). Writes under a temp
# folder only. Exit status 1 if any output differs.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0" >&2; exit 2; }
old=$(realpath "$1") new=$(realpath "$2") model=$(realpath "${3:-runs/cifar10-small}")
export ATOP_DATA_DIR=${ATOP_DATA_DIR:-$(realpath ../shared/data)}
tmp=$(mktemp -d /tmp/atop-compare.XXXX)
python3 - "$tmp/study.toml" <<'PY'
import sys
src = open("tests/study.rs").read()
study = src.split('const STUDY: &str = r#"')[1].split('"#;')[0]
stages = src.split('const TRAINED: &str = r#"')[1].split('"#;')[0]
open(sys.argv[1], "w").write(study.replace("{STAGES}", stages))
PY
for side in old new; do
  bin=${!side} out=$tmp/$side
  mkdir -p "$out"
  a=("$bin" --json --threads 1 attack --model "$model" --eps 1/255)
  "${a[@]}" --attack pgd,apgd-ce,square --n 64 --steps 10 --queries 100 --batch-size 24 --out "$out/det" > "$out/det.json"
  "${a[@]}" --transform noise --sigma 0.01 --attack pgd,fgsm --eot 2 --steps 5 --n 32 --batch-size 12 --out "$out/rand" > "$out/rand.json"
  "${a[@]}" --attack autoattack-standard --steps 5 --queries 50 --n 24 --batch-size 10 --out "$out/aa" > "$out/aa.json"
  "$bin" --quiet --threads 1 eval robust --model "$model" --transform noise --sigma 0.01 \
    --attack pgd,transfer,fgsm,apgd-ce --n 48 --draws 3 --steps 5 --eot 2 --batch-size 16 \
    --check-points 16 --eps 2/255 --out "$out/robust" > /dev/null
  "$bin" --threads 2 --json run --config "$tmp/study.toml" --out "$out/study" > "$out/study.json"
done
python3 - "$tmp" <<'PY'
import glob, json, sys
tmp = sys.argv[1]
SKIP = {"seconds", "started", "provenance", "finished", "minutes", "img_per_s", "results",
        "images", "grid", "report", "run", "checkpoint", "out"}
def strip(d):
    if isinstance(d, dict):
        return {k: strip(v) for k, v in d.items() if k not in SKIP}
    if isinstance(d, list):
        return [strip(x) for x in d]
    if isinstance(d, str):
        return d.replace(f"{tmp}/old", "X").replace(f"{tmp}/new", "X")
    return d
files = ["det.json", "rand.json", "aa.json", "robust/results.json", "study.json"]
files += [f[len(tmp) + 5:] for f in sorted(glob.glob(f"{tmp}/old/study/eval/*/results.json"))]
files += ["study/classifier/metrics.jsonl", "study/purifier/metrics.jsonl", "study/atop/metrics.jsonl"]
differ = 0
for f in files:
    read = lambda side: [strip(json.loads(l)) for l in open(f"{tmp}/{side}/{f}")] if f.endswith("jsonl") \
        else strip(json.load(open(f"{tmp}/{side}/{f}")))
    same = read("old") == read("new")
    differ += not same
    print(f"{'same' if same else 'DIFFERS'}  {f}")
sys.exit(1 if differ else 0)
PY

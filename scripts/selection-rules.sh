#!/usr/bin/env bash
# Which image an attack should return on a random model (docs/evaluation.md, "Which iterate to
# return"): the same `atop eval robust` once per --selection rule (first-draw, last,
# most-fooled), on the same points and the same scoring draws, then one table row per rule and
# attack: the three scores and what the attack claimed at attack time against the R fresh
# scoring draws; then each rule against the most-fooled one point by point (atop eval compare:
# worst case per point, 95 % paired-bootstrap interval, McNemar). A finished evaluation is read
# back, an interrupted one resumes.
#
#   scripts/selection-rules.sh OUT_DIR EVAL_ROBUST_ARGS...
#
# e.g. scripts/selection-rules.sh runs/rules --model runs/cifar10-small --purifier runs/purifier-cpu \
#        --attack pgd --steps 50 --eot 10 --eps 8/255 --n 256 --draws 10 --check-points 0
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,12p "$0" >&2; exit 2; }
out=$1
shift
atop=${ATOP:-target/release/atop}
[ -x "$atop" ] || { echo "no $atop: run cargo build --release first (or set ATOP)" >&2; exit 1; }
mkdir -p "$out"
for rule in first-draw last most-fooled; do
  [ -f "$out/$rule/results.json" ] ||
    "$atop" --quiet eval robust "$@" --selection "$rule" --out "$out/$rule" > /dev/null
done
python3 - "$out" <<'PY'
import json, sys
rules = ["first-draw", "last", "most-fooled"]
res = {r: json.load(open(f"{sys.argv[1]}/{r}/results.json")) for r in rules}

def show(p):
    return f"{100 * p['value']:.2f} % [{100 * p['lo']:.1f}, {100 * p['hi']:.1f}]"

def right(rec, i):
    p = rec["attacks"][i]["preds"]
    return sum(q == rec["label"] for q in p) / len(p)

print("| rule | attack | single draw | majority of R | worst of R | claimed at attack time - fresh draws (points) |")
print("|---|---|---|---|---|---|")
for rule in rules:
    r = res[rule]
    for i, a in enumerate(r["attacks"]):
        pairs = [(rec["claimed"][i], 1 - right(rec, i))
                 for rec in r["records"] if rec.get("claimed") and rec["claimed"][i] is not None]
        excess = f"{100 * sum(c - f for c, f in pairs) / len(pairs):+.2f}" if pairs else "-"
        s = a["scores"]
        print(f"| {rule} | {a['attack']} | {show(s['single'])} | {show(s['majority'])} "
              f"| {show(s['worst_of_r'])} | {excess} |")
PY
echo
"$atop" eval compare "$out/most-fooled" "$out/first-draw" "$out/last"

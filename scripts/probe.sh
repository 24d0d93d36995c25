#!/usr/bin/env bash
# Adversarial probes of the atop CLI (issue 15): every defect class, as a hostile user would try
# it. Each probe prints one line, PASS or FAIL, its name and a short reason; a summary and the
# failing commands (with their exit codes and first stderr lines) follow; the exit status is 1
# if any probe failed.
#
#   scripts/probe.sh                         all probes (about 6 minutes on 2 cores)
#   PROBE_FILTER='import|nonsense' scripts/probe.sh   only the probes whose name matches
#
# Classes (probe name prefixes):
#   crash-*     zero and absurd sizes, tampered resume files, corrupt checkpoints, crafted .pt
#               files: no panic (exit 101, "panicked"), no abort or signal (exit >= 128); zero
#               sizes and tampered or corrupt inputs must be refused, naming the flag/file/field
#   hang-*      huge thread counts, EOT and step counts: an exit (or at least a warning) within
#               the time limit
#   loss-*      outputs aimed at a checkpoint, at the command's own inputs or at an unrelated
#               non-empty folder: every file that was there keeps its sha256
#   wrong-*     resume after the model's weights changed, two trainers in one run folder:
#               refused
#   integrity-* run folders: other inputs or settings on resume, two writers on one folder,
#               outputs missing after a failure, edited results and shards, duplicate budgets,
#               swapped study stages, epoch and working-size ceilings (docs/reliability.md)
#   nonsense-*  meaningless values: refused with a message that names the flag or field
#   colour-*    no ANSI escape codes in stderr when it is a file or a pipe
#
# Environment: ATOP (the binary; default a copy of target/release/atop, so a rebuild while this
# runs does not change what is probed), ATOP_DATA_DIR (default ../shared/data), PROBE_CLASSIFIER
# (default runs/cifar10-small), PROBE_PURIFIER (default runs/purifier-cpu), PROBE_KEEP=1 (keep
# the temp folders, /tmp/atop-probe.XXXX), PROBE_VMEM_KB (the per-command virtual-memory cap,
# default 8000000). Nothing under runs/ or the repository is written: every probe works in its
# own temp folder, on copies of the checkpoints when it alters them. In the "setup:" lines of
# the failure details, `py CMD ...` is the Python helper embedded below (python3 tool.py CMD).
set -uo pipefail

started=$(date +%s)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

abspath() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd)" "$(basename "$1")"); }

# The binary is copied (atomically, via a rename) so a concurrent cargo build cannot swap it
# mid-run; ATOP names another binary and is used as it is.
if [ -n "${ATOP:-}" ]; then
  BIN=$(abspath "$ATOP")
else
  [ -x target/release/atop ] || { echo "no target/release/atop: build it first (or set ATOP)" >&2; exit 2; }
  cp target/release/atop "/tmp/atop-probe-bin.$$" && mv -f "/tmp/atop-probe-bin.$$" /tmp/atop-probe-bin
  BIN=/tmp/atop-probe-bin
fi
[ -x "$BIN" ] || { echo "$BIN is not executable" >&2; exit 2; }
export ATOP_DATA_DIR; ATOP_DATA_DIR=$(abspath "${ATOP_DATA_DIR:-$REPO/../shared/data}")
CLS=$(abspath "${PROBE_CLASSIFIER:-runs/cifar10-small}")
PUR=$(abspath "${PROBE_PURIFIER:-runs/purifier-cpu}")
VMEM_KB=${PROBE_VMEM_KB:-8000000}
FILTER=${PROBE_FILTER:-}
unset ATOP_THREADS ATOP_DEVICE ATOP_EOT_BATCH
export ATOP_DEVICE=cpu

# The newest checkpoint folder of a run folder (or the folder itself if it is a checkpoint).
checkpoint_of() {
  if [ -f "$1/$2" ]; then echo "$1"; else ls -d "$1"/checkpoints/*/ 2>/dev/null | sort | tail -1 | sed 's:/$::'; fi
}
CLS_CK=$(checkpoint_of "$CLS" model.json)
PUR_CK=$(checkpoint_of "$PUR" purifier.json)
[ -f "$CLS_CK/model.json" ] || { echo "no classifier checkpoint in $CLS (set PROBE_CLASSIFIER)" >&2; exit 2; }
[ -f "$PUR_CK/purifier.json" ] || { echo "no purifier checkpoint in $PUR (set PROBE_PURIFIER)" >&2; exit 2; }
[ -f "$ATOP_DATA_DIR/cifar10-jpg.tar.gz" ] || { echo "no cifar10-jpg.tar.gz in $ATOP_DATA_DIR" >&2; exit 2; }
HAVE_TIME=0; [ -x /usr/bin/time ] && HAVE_TIME=1

# ---------------------------------------------------------------------------------------------
# Bookkeeping: temp folders, results, details of the failures.

TMPS=()
BGPID=""  # the background trainer of wrong-two-trainers-one-folder, while it runs
cleanup() {
  [ -n "$BGPID" ] && kill "$BGPID" 2>/dev/null
  [ "${PROBE_KEEP:-0}" = 1 ] && { echo "kept: ${TMPS[*]}"; return; }
  for d in "${TMPS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# newdir: a fresh temp folder in $D (not a subshell, so it is registered for the cleanup).
newdir() { D=$(mktemp -d /tmp/atop-probe.XXXX) || exit 2; TMPS+=("$D"); }

NPASS=0 NFAIL=0 NSKIP=0
DETAILS=""
SETUP=""  # what a probe did to its inputs before the command (shown with a failure)
selected() { [ -z "$FILTER" ] || [[ $1 =~ $FILTER ]]; }

result() { # STATUS NAME REASON
  printf '%-4s %-46s %s\n' "$1" "$2" "$(printf '%s' "$3" | tr '\n' ' ' | cut -c1-220)"
  case $1 in
    PASS) NPASS=$((NPASS + 1)) ;;
    SKIP) NSKIP=$((NSKIP + 1)) ;;
    FAIL)
      NFAIL=$((NFAIL + 1))
      DETAILS+="--- $2: $3"$'\n'
      [ -n "$SETUP" ] && DETAILS+="    setup: $SETUP"$'\n'
      DETAILS+="    command: ${LAST_CMD:-}"$'\n'"    exit: ${RC:-?} after ${SECS:-?} s"$'\n'
      # stderr without blank lines and backtrace frames.
      DETAILS+="$(grep -Ev '^\s*$|^\s+[0-9]+: |^\s+at |^stack backtrace:|^note: ' "${LAST_DIR:-/nonexistent}/.probe-err" 2>/dev/null |
        head -4 | cut -c1-300 | sed 's/^/    stderr| /')"$'\n'
      ;;
  esac
  SETUP=""
}

# run LIMIT DIR ARGS...: the binary with ARGS in DIR, under the virtual-memory cap and a
# timeout (SIGKILL 5 s after SIGTERM). Sets RC, SECS, RSS_MB, LAST_CMD; stdout and stderr are
# kept in DIR/.probe-out and DIR/.probe-err. RUN_ENV (VAR=value words) is added to the
# environment of this one run; --threads 1 is added unless NO_THREADS=1 (kept to one core: this
# machine is shared with long training runs).
RUN_ENV=()
run() {
  local limit=$1 dir=$2; shift 2
  local threads=(--threads 1)
  [ "${NO_THREADS:-0}" = 1 ] && threads=()
  local t0; t0=$(date +%s%N)
  LAST_DIR=$dir LIMIT=$limit
  LAST_CMD="(cd $dir && ${RUN_ENV[*]+${RUN_ENV[*]} }atop $(printf '%q ' "${threads[@]}" "$@"))"
  local timer=()
  [ "$HAVE_TIME" = 1 ] && timer=(/usr/bin/time -f %M -o "$dir/.probe-rss")
  (
    cd "$dir" || exit 99
    ulimit -v "$VMEM_KB"
    exec env ${RUN_ENV[@]+"${RUN_ENV[@]}"} "${timer[@]}" timeout -k 5 "$limit" "$BIN" "${threads[@]}" "$@"
  ) >"$dir/.probe-out" 2>"$dir/.probe-err" </dev/null
  RC=$?
  SECS=$(( ($(date +%s%N) - t0) / 1000000 ))
  SECS=$(printf '%d.%01d' $((SECS / 1000)) $((SECS % 1000 / 100)))
  RSS_MB=$(tail -1 "$dir/.probe-rss" 2>/dev/null | awk '/^[0-9]+$/ {print int($1 / 1024)}')
  RUN_ENV=() NO_THREADS=0
  # /usr/bin/time writes its own line into stderr only with -o unset; nothing to strip.
}

# What the last run did: ok, hang (killed by the timeout) or crash (panic, abort, signal).
outcome() {
  local err=$LAST_DIR/.probe-err
  if [ "$RC" = 124 ] || { [ "$RC" = 137 ] && [ "${SECS%.*}" -ge "$LIMIT" ]; }; then echo hang
  elif [ "$RC" = 101 ] || [ "$RC" -ge 128 ] || grep -qE 'panicked at|overflowed its stack' "$err"; then echo crash
  else echo ok
  fi
}

# The most telling stderr line: the error, the panic's location and message, or the first line.
errline() {
  local err=$LAST_DIR/.probe-err
  if grep -q 'panicked at' "$err"; then
    grep -A1 -m1 'panicked at' "$err" | sed -e 's/^thread .* panicked at //' -e 's:^/.*/registry/src/[^/]*/::' |
      tr '\n' ' ' | cut -c1-200
  elif grep -q '^error' "$err"; then grep -m1 '^error' "$err" | cut -c1-200
  elif [ -s "$err" ]; then grep -v '^\s*$' "$err" | grep -v ' INFO ' | head -1 | cut -c1-200
  else echo "(stderr empty)"
  fi
}
outline() { grep -v '^\s*$' "$LAST_DIR/.probe-out" | head -1 | cut -c1-120; }

# Reason text for a crash or a hang (shared by all verdicts).
bad_reason() {
  case $1 in
    crash) echo "[crash] exit $RC: $(errline)" ;;
    hang) echo "[hang] still running after ${LIMIT} s (killed); stderr: $(errline)" ;;
  esac
}

# want_refusal NAME PATTERN LIMIT DIR ARGS...: exit non-zero, no crash or hang, and stderr names
# PATTERN (an extended regex, case-insensitive: the flag, file or field).
want_refusal() {
  local name=$1 pat=$2 limit=$3 dir=$4; shift 4
  run "$limit" "$dir" "$@"
  local o; o=$(outcome)
  if [ "$o" != ok ]; then result FAIL "$name" "$(bad_reason "$o")"
  elif [ "$RC" = 0 ]; then result FAIL "$name" "[accepted] exit 0 in $SECS s: $(outline)"
  elif ! grep -Eiq -- "$pat" "$LAST_DIR/.probe-err"; then
    result FAIL "$name" "[message] refused (exit $RC) without naming /$pat/: $(errline)"
  else result PASS "$name" "refused (exit $RC): $(errline)"
  fi
}

# want_no_crash NAME LIMIT DIR ARGS...: any exit status, but no crash and no hang.
want_no_crash() {
  local name=$1 limit=$2 dir=$3; shift 3
  run "$limit" "$dir" "$@"
  local o; o=$(outcome)
  if [ "$o" != ok ]; then result FAIL "$name" "$(bad_reason "$o")"
  else result PASS "$name" "exit $RC in $SECS s: $( [ "$RC" = 0 ] && outline || errline)"
  fi
}

# want_prompt NAME LIMIT DIR ARGS...: ends within LIMIT s, or warned (a WARN/warning line on
# stderr) before the timeout stopped the long work it announced.
want_prompt() {
  local name=$1 limit=$2 dir=$3; shift 3
  run "$limit" "$dir" "$@"
  local o; o=$(outcome)
  if [ "$o" = crash ]; then result FAIL "$name" "$(bad_reason crash)"
  elif [ "$o" = hang ]; then
    if grep -Eiq 'warn' "$LAST_DIR/.probe-err"; then
      result PASS "$name" "warned, then ran until the ${LIMIT} s limit: $(grep -Ei -m1 'warn' "$LAST_DIR/.probe-err" | cut -c1-160)"
    else
      result FAIL "$name" "[hang] no exit and no warning within ${LIMIT} s; stderr: $(errline)"
    fi
  else result PASS "$name" "exit $RC in $SECS s: $( [ "$RC" = 0 ] && outline || errline)"
  fi
}

# sha256 of every file under a folder, as "hash  ./path" lines.
snapshot() { (cd "$1" && find . -type f ! -name '.probe-*' -print0 | sort -z | xargs -0 -r sha256sum); }

# want_untouched NAME LIMIT DIR WATCH ARGS...: every file that was under WATCH before the run
# is still there with the same sha256 afterwards (new files are allowed), and no crash or hang.
want_untouched() {
  local name=$1 limit=$2 dir=$3 watch=$4; shift 4
  snapshot "$watch" >"$dir/.probe-before"
  run "$limit" "$dir" "$@"
  snapshot "$watch" >"$dir/.probe-after"
  local changed
  changed=$(awk 'NR == FNR { after[$2] = $1; next }
                 !($2 in after) { printf "%s deleted; ", $2; next }
                 after[$2] != $1 { printf "%s changed; ", $2 }' \
            "$dir/.probe-after" "$dir/.probe-before")
  local o; o=$(outcome)
  if [ -n "$changed" ]; then result FAIL "$name" "[data loss] ${changed}(exit $RC)"
  elif [ "$o" != ok ]; then result FAIL "$name" "$(bad_reason "$o")"
  else result PASS "$name" "pre-existing files untouched (exit $RC: $( [ "$RC" = 0 ] && echo 'wrote beside them' || errline))"
  fi
}

# A folder that looks unrelated: a sentinel and files of the names the command writes, with
# known content.
plant() { local d=$1; shift; mkdir -p "$d"; echo "sentinel $RANDOM" >"$d/sentinel.txt"; for f in "$@"; do echo "precious $f" >"$d/$f"; done; }

# Copies of the checkpoints, for probes that alter them.
copy_cls() { mkdir -p "$1" && cp "$CLS_CK/model.json" "$CLS_CK/model.safetensors" "$1/"; }
copy_pur() {
  mkdir -p "$1" && cp "$PUR_CK/purifier.json" "$PUR_CK/generator.safetensors" "$1/" &&
    { [ ! -f "$PUR_CK/discriminator.safetensors" ] || cp "$PUR_CK/discriminator.safetensors" "$1/"; }
}

# ---------------------------------------------------------------------------------------------
# Fixtures: a stdlib-only Python helper that crafts .pt files, PNGs and tampered
# safetensors/JSON (no torch needed; nothing runs outside the memory cap).

newdir; FIX=$D
TOOL=$FIX/tool.py
py() { (ulimit -v "$VMEM_KB"; python3 "$TOOL" "$@"); }
cat >"$TOOL" <<'PYEOF'
"""Fixture crafting for scripts/probe.sh (standard library only).

  pt-from-st SRC.safetensors OUT.pt        a valid torch.save zip holding SRC's tensors
  pt-nested OUT.pt DEPTH list|tuple|dict [entry]
                                           data.pkl nested DEPTH levels deep (entry: as the
                                           value of a state dict, {'state_dict': {'k': deep}})
  pt-bomb-storage OUT.pt MIB               a 1-element tensor whose storage entry inflates to MIB
  pt-bomb-pkl OUT.pt MIB                   a data.pkl entry that inflates to MIB
  png OUT.png SIZE SEED                    a random RGB PNG
  st-permute F                             reverse the shape of F's first rank >= 2 tensor
  st-fill F NAME VALUE                     fill tensor NAME (F32 or I64) with VALUE (nan allowed)
  st-nudge F                               fill F's last float tensor with 0.01 (other weights)
  rehash DIR FILE                          rewrite DIR/complete.json's SHA-256 of FILE to match it
  preds-to-labels RESULTS                  set every attack prediction of a results.json to the label
  st-header-len F                          claim an 8 EiB header
  json-set F PATH JSON                     set F[PATH] (dot-separated, integers index lists)
"""
import collections, io, json, os, pickle, random, struct, sys, types, zipfile, zlib

# torch.save's pickle without torch: stand-in modules make pickle emit the same globals.
torch = types.ModuleType("torch")
tutils = types.ModuleType("torch._utils")
for st in ("FloatStorage", "LongStorage"):
    setattr(torch, st, type(st, (), {"__module__": "torch"}))


def _rebuild_tensor_v2(*a):
    pass


_rebuild_tensor_v2.__module__ = "torch._utils"
tutils._rebuild_tensor_v2 = _rebuild_tensor_v2
torch._utils = tutils
sys.modules["torch"], sys.modules["torch._utils"] = torch, tutils


class Storage:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class TensorRef:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, list(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.insert(0, acc)
            acc *= s
        return (_rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, o):
        return ("storage", o.cls, o.key, "cpu", o.numel) if isinstance(o, Storage) else None


def dumps(obj):
    b = io.BytesIO()
    Pickler(b, protocol=2).dump(obj)
    return b.getvalue()


def write_pt(out, pkl, entries, deflate=False):
    """entries: name -> bytes, or name -> ("zeros", nbytes), streamed through deflate."""
    mode = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", mode, allowZip64=True) as z:
        if pkl is not None:
            z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
        for name, data in entries.items():
            if isinstance(data, tuple):
                zi = zipfile.ZipInfo("archive/" + name)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with z.open(zi, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 20)
                    for _ in range(data[1] >> 20):
                        f.write(chunk)
            else:
                z.writestr("archive/" + name, data)


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def write_st(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)


def main():
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "pt-from-st":
        header, data = read_st(a[0])
        sd, entries = collections.OrderedDict(), {}
        for i, (name, t) in enumerate((k, v) for k, v in header.items() if k != "__metadata__"):
            cls, size = {"F32": (torch.FloatStorage, 4), "I64": (torch.LongStorage, 8)}[t["dtype"]]
            lo, hi = t["data_offsets"]
            sd[name] = TensorRef(Storage(str(i), cls, (hi - lo) // size), t["shape"])
            entries["data/" + str(i)] = data[lo:hi]
        write_pt(a[1], dumps(sd), entries)
    elif cmd == "pt-nested":
        depth, kind = int(a[1]), a[2]
        key = b"X\x01\x00\x00\x00k"  # BINUNICODE 'k'
        # MARK x depth, then the collecting opcode x depth: each wraps the one inside it.
        deep = {"list": b"(" * depth + b"l" * depth,
                "tuple": b"(" * depth + b"t" * depth,
                # {'k': {'k': ...}}: EMPTY_DICT and a key per level, then SETITEMs from inside out.
                "dict": (b"}" + key) * depth + b"}" + b"s" * depth}[kind]
        if len(a) > 3 and a[3] == "entry":
            deep = b"}X\x0a\x00\x00\x00state_dict}" + key + deep + b"ss"
        write_pt(a[0], b"\x80\x02" + deep + b".", {}, deflate=True)
    elif cmd == "pt-bomb-storage":
        sd = collections.OrderedDict(w=TensorRef(Storage("0", torch.FloatStorage, 1), [1]))
        write_pt(a[0], dumps(sd), {"data/0": ("zeros", int(a[1]) << 20)})
    elif cmd == "pt-bomb-pkl":
        write_pt(a[0], None, {"data.pkl": ("zeros", int(a[1]) << 20)})
    elif cmd == "png":
        size, rng = int(a[1]), random.Random(int(a[2]))
        raw = b"".join(b"\x00" + bytes(rng.randrange(256) for _ in range(3 * size)) for _ in range(size))
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        open(a[0], "wb").write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    elif cmd == "st-permute":
        header, data = read_st(a[0])
        for k, t in header.items():
            if k != "__metadata__" and len(t["shape"]) >= 2 and t["shape"] != t["shape"][::-1]:
                t["shape"] = t["shape"][::-1]
                break
        write_st(a[0], header, data)
    elif cmd == "st-fill":
        header, data = read_st(a[0])
        t = header[a[1]]
        lo, hi = t["data_offsets"]
        one = struct.pack("<f", float(a[2])) if t["dtype"] == "F32" else struct.pack("<q", int(a[2]))
        write_st(a[0], header, data[:lo] + one * ((hi - lo) // len(one)) + data[hi:])
    elif cmd == "st-header-len":
        b = bytearray(open(a[0], "rb").read())
        b[:8] = struct.pack("<Q", 1 << 63)
        open(a[0], "wb").write(b)
    elif cmd == "st-nudge":
        # the last float tensor filled with 0.01: other weights of the same architecture
        header, data = read_st(a[0])
        name = max((k for k, t in header.items() if k != "__metadata__" and t["dtype"] == "F32"),
                   key=lambda k: header[k]["data_offsets"][0])
        lo, hi = header[name]["data_offsets"]
        write_st(a[0], header, data[:lo] + struct.pack("<f", 0.01) * ((hi - lo) // 4) + data[hi:])
    elif cmd == "rehash":
        # complete.json's record of a file, rewritten to match it (a careful editor)
        import hashlib
        d = json.load(open(os.path.join(a[0], "complete.json")))
        d["files"][a[1]] = hashlib.sha256(open(os.path.join(a[0], a[1]), "rb").read()).hexdigest()
        json.dump(d, open(os.path.join(a[0], "complete.json"), "w"))
    elif cmd == "preds-to-labels":
        # every attack's predictions set to the label: robust accuracy lifted by an edit
        d = json.load(open(a[0]))
        for r in d["records"]:
            for at in r["attacks"]:
                at["preds"] = [r["label"]] * len(at["preds"])
        json.dump(d, open(a[0], "w"), indent=2)
    elif cmd == "json-set":
        d = json.load(open(a[0]))
        *path, last = a[1].split(".")
        o = d
        for p in path:
            o = o[int(p)] if isinstance(o, list) else o[p]
        if isinstance(o, list):
            o[int(last)] = json.loads(a[2])
        else:
            o[last] = json.loads(a[2])
        json.dump(d, open(a[0], "w"), indent=2)
    else:
        sys.exit(__doc__)


main()
PYEOF

# ---------------------------------------------------------------------------------------------
# Crashes, part 1: zero sizes. A zero batch, count, step or round count means nothing, so the
# probe wants a refusal that names the flag (exit 0 with a made-up result is "accepted").

probes_zero_sizes() {
  local m=$CLS p=$PUR
  zero() { # NAME PATTERN LIMIT ARGS...
    local name=crash-zero-$1 pat=$2 limit=$3; shift 3
    selected "$name" || return 0
    newdir; want_refusal "$name" "$pat" "$limit" "$D" "$@"
  }
  zero attack-n '--n\b|\bn ?= ?0' 20 attack --model "$m" --n 0 --attack fgsm --out out
  zero attack-batch-size 'batch.size' 20 attack --model "$m" --n 4 --batch-size 0 --attack fgsm --out out
  zero attack-eot 'eot' 20 attack --model "$m" --n 4 --attack pgd --eot 0 --out out
  zero attack-restarts 'restarts' 20 attack --model "$m" --n 4 --attack pgd --restarts 0 --out out
  zero attack-queries 'queries' 20 attack --model "$m" --n 4 --attack square --queries 0 --out out
  zero purify-n '--n\b|\bn ?= ?0' 20 purify --purifier "$p" --n 0 --out out
  zero purify-batch-size 'batch.size' 20 purify --purifier "$p" --n 4 --batch-size 0 --out out
  zero purify-grid 'grid' 20 purify --purifier "$p" --n 4 --grid 0 --out out
  zero eval-clean-batch-size 'batch.size' 20 eval clean --model "$m" --subset 8 --batch-size 0 --out out
  zero eval-robust-batch-size 'batch.size' 20 eval robust --model "$m" --n 4 --batch-size 0 --attack fgsm --draws 1 --check-points 0 --out out
  zero eval-robust-n '--n\b|\bn ?= ?0' 20 eval robust --model "$m" --n 0 --attack fgsm --draws 1 --check-points 0 --out out
  zero eval-robust-draws 'draws' 20 eval robust --model "$m" --n 4 --attack fgsm --draws 0 --check-points 0 --out out
  zero train-classifier-batch-size 'batch.size' 30 train classifier --preset cifar10-demo --batch-size 0 --epochs 1 --warmup-epochs 0 --train-subset 64 --test-subset 64 --out run
  zero train-classifier-epochs 'epochs' 30 train classifier --preset cifar10-demo --epochs 0 --warmup-epochs 0 --train-subset 64 --test-subset 64 --out run
  zero train-purifier-batch-size 'batch.size' 30 train purifier --preset purifier-demo --batch-size 0 --epochs 1 --train-subset 64 --eval-subset 64 --out run
  zero train-atop-batch-size 'batch.size' 30 train atop --preset atop-demo --classifier "$m" --purifier "$p" --batch-size 0 --epochs 1 --train-subset 64 --eval-subset 8 --out run
  zero bench-models-batch 'batch' 20 bench models --no-reference --batch 0 --steps 1 --warmup 0
  zero bench-models-steps 'steps' 20 bench models --no-reference --batch 2 --steps 0 --warmup 0
  zero bench-attacks-batch 'batch' 20 bench attacks --no-reference --batch 0 --pgd-steps 1 --apgd-steps 1
  zero bench-attacks-batches 'batches' 20 bench attacks --no-reference --batch 2 --batches 0 --pgd-steps 1 --apgd-steps 1
  zero bench-attacks-eot 'eot' 20 bench attacks --no-reference --batch 2 --pgd-steps 1 --apgd-steps 1 --eot 0
  zero bench-purifier-batch 'batch' 20 bench purifier --no-reference --width 16 --batch 0 --steps 1 --warmup 0 --rounds 1 --attack-batch 1
  zero bench-purifier-steps 'steps' 20 bench purifier --no-reference --width 16 --batch 2 --steps 0 --warmup 0 --rounds 1 --attack-batch 0
  zero bench-purifier-rounds 'rounds' 20 bench purifier --no-reference --width 16 --batch 2 --steps 1 --warmup 0 --rounds 0 --attack-batch 0
  zero bench-purifier-size 'size' 20 bench purifier --no-reference --width 16 --batch 2 --steps 1 --warmup 0 --rounds 1 --attack-batch 1 --size 0
  zero bench-atop-batch 'batch' 20 bench atop --no-reference --batch 0 --steps 1 --warmup 0 --rounds 1
  zero bench-atop-steps 'steps' 20 bench atop --no-reference --batch 2 --steps 0 --warmup 0 --rounds 1
  zero bench-atop-rounds 'rounds' 20 bench atop --no-reference --batch 2 --steps 1 --warmup 0 --rounds 0
  zero bench-models-image-size 'image.size' 20 bench models --no-reference --batch 2 --steps 1 --warmup 0 --image-size 0
  # bench data decodes all of CIFAR-10 first (a few seconds): 60 s.
  zero bench-data-batch-size 'batch.size' 60 bench data --batch-size 0 --batches 1
  zero bench-data-batches 'batches' 60 bench data --batch-size 2 --batches 0
  zero global-eot-batch 'eot.batch' 20 --eot-batch 0 eval clean --model "$m" --subset 4 --out out
  # --threads 0 is the one probe without --threads 1 (it sets the flag itself).
  selected crash-zero-global-threads && { newdir; NO_THREADS=1 want_refusal crash-zero-global-threads 'threads' 20 "$D" --threads 0 info; }
}

# ---------------------------------------------------------------------------------------------
# Crashes, part 2: sizes too large to allocate. Any exit status is fine; a panic or an abort
# (Rust's "memory allocation failed", libtorch's "can't allocate memory") is not.

probes_absurd_sizes() {
  local m=$CLS p=$PUR
  big() { # NAME LIMIT ARGS...
    local name=crash-huge-$1 limit=$2; shift 2
    selected "$name" || return 0
    newdir; want_no_crash "$name" "$limit" "$D" "$@"
  }
  big purifier-info-width 20 purifier info --width 100000
  big purifier-info-image-size 20 purifier info --width 48 --image-size 100000
  big purifier-info-work-size 20 purifier info --width 48 --work-size 100000
  big bench-purifier-width 20 bench purifier --no-reference --width 100000 --batch 1 --steps 1 --warmup 0 --rounds 1 --attack-batch 1
  big bench-purifier-size 20 bench purifier --no-reference --width 16 --size 100000 --batch 1 --steps 1 --warmup 0 --rounds 1 --attack-batch 1
  big bench-models-image-size 20 bench models --no-reference --batch 1 --steps 1 --warmup 0 --image-size 100000
  big bench-models-arch-width 20 bench models --no-reference --arch wrn-16-100000 --batch 1 --steps 1 --warmup 0
  big bench-models-batch 20 bench models --no-reference --batch 100000000 --steps 1 --warmup 0
  big train-classifier-image-size 30 train classifier --preset cifar10-demo --image-size 100000 --epochs 1 --warmup-epochs 0 --train-subset 64 --test-subset 64 --out run
  big train-classifier-arch-width 30 train classifier --preset cifar10-demo --arch wrn-16-100000 --epochs 1 --warmup-epochs 0 --train-subset 64 --test-subset 64 --out run
  big train-purifier-width 30 train purifier --preset purifier-demo --width 100000 --epochs 1 --train-subset 64 --eval-subset 64 --out run
  big train-purifier-image-size 30 train purifier --preset purifier-demo --image-size 100000 --epochs 1 --train-subset 64 --eval-subset 64 --out run
  big eval-clean-image-size 30 eval clean --model "$m" --subset 4 --image-size 100000 --out out
  big attack-image-size 30 attack --model "$m" --n 4 --attack fgsm --image-size 100000 --out out
  big purify-image-size 30 purify --purifier "$p" --n 4 --image-size 100000 --out out
  big data-inspect-image-size 30 data inspect --dataset cifar10 --subset 8 --image-size 100000 --grid grid.png
}

# ---------------------------------------------------------------------------------------------
# Crashes, part 3: tampered resume files. A finished run is copied, one file altered, and the
# same command rerun (it resumes): the tampered file must be refused by name, never panic and
# never be replayed into a report (NaN or out-of-budget images included).

probes_tampered_resume() {
  local m=$CLS
  local attack=(attack --model "$m" --n 6 --batch-size 2 --attack fgsm,pgd --steps 2 --out run)
  local robust=(eval robust --model "$m" --n 6 --batch-size 2 --attack fgsm,pgd --steps 2 --draws 2 --check-points 0 --out run)
  local abase="" rbase=""
  base() { # KIND: a finished run of KIND (attack|robust) in a fixture folder, made once
    local -n out=$2
    [ -n "$out" ] && return 0
    newdir; local d=$D
    if [ "$1" = attack ]; then run 60 "$d" "${attack[@]}"; else run 60 "$d" "${robust[@]}"; fi
    if [ "$RC" != 0 ] || [ ! -f "$d/run/state.json" ]; then
      out=FAILED; result FAIL "crash-resume-$1-base" "the untampered base run failed (exit $RC): $(errline)"
    else out=$d/run; fi
  }
  tamper() { # NAME KIND PATTERN SHELL-CODE (run in the copied run folder)
    local name=crash-resume-$1 kind=$2 pat=$3 code=$4
    selected "$name" || return 0
    if [ "$kind" = attack ]; then base attack abase; local b=$abase; else base robust rbase; local b=$rbase; fi
    [ "$b" = FAILED ] && { result SKIP "$name" "no base run"; return 0; }
    # A robust evaluation with its results.json reads those back: without it, the copy is an
    # interrupted run that resumes from the tampered files.
    newdir; cp -r "$b" "$D/run"; SETUP="in a copy of a finished run (run/): $code"
    [ "$kind" = attack ] || { rm -f "$D/run/results.json"; SETUP="in a copy of a finished run (run/) without its results.json: $code"; }
    (cd "$D/run" && eval "$code") || { result SKIP "$name" "could not tamper: $code"; return 0; }
    if [ "$kind" = attack ]; then want_refusal "$name" "$pat" 60 "$D" "${attack[@]}"
    else want_refusal "$name" "$pat" 60 "$D" "${robust[@]}"; fi
  }
  # The attack's batches are named by their first queued point, and the queue holds only the
  # points the classifier gets right, so the second FGSM batch's name depends on the model:
  # it is looked up in the copied run (eval robust attacks every point: its names are fixed).
  # Both are one engine's state (state.json: clean, done, norms, ...); the attack is its cascade.
  local ab='"$(ls batches/00-fgsm-*.safetensors | sed -n 2p)"' rb=batches/00-000002.safetensors
  local an='00-fgsm-[0-9]{6}'
  tamper attack-batch-truncated attack "$an" "truncate -s 100 $ab"
  tamper attack-batch-positions-out-of-range attack "$an|positions" "py st-fill $ab positions 9999"
  tamper attack-batch-positions-negative attack "$an|positions" "py st-fill $ab positions -5"
  tamper attack-batch-images-wrong-shape attack "$an|shape" "py st-permute $ab"
  tamper attack-batch-images-nan attack "$an|finite|nan" "py st-fill $ab images nan"
  tamper attack-batch-images-outside-budget attack "$an|budget|eps|ball" "py st-fill $ab images 1.0"
  tamper attack-batch-file-missing attack "$an" "rm $ab"
  tamper attack-state-truncated attack 'state.json' "truncate -s 50 state.json"
  tamper attack-state-wrong-types attack 'state.json' "py json-set state.json clean '\"x\"'"
  tamper attack-state-done-short attack 'state.json|done' "py json-set state.json done.1 '[null]'"
  tamper attack-state-clean-empty attack 'state.json|clean' "py json-set state.json clean '[]'"
  tamper attack-state-seconds-missing attack 'state.json|seconds' "py json-set state.json seconds '[]'"
  # A batch name that leaves the run folder: /dev/zero never ends (no read may follow it).
  tamper attack-state-batch-path-escape attack 'state.json|batch' \
    "py json-set state.json batches.0 '\"../../../../../../../../dev/zero\"'"
  tamper robust-batch-truncated robust '00-000002' "truncate -s 100 $rb"
  tamper robust-batch-images-nan robust '00-000002|finite|nan' "py st-fill $rb images nan"
  tamper robust-batch-images-wrong-shape robust '00-000002|shape' "py st-permute $rb"
  tamper robust-batch-first-point-out-of-range robust '00-000999|batch' \
    "mv $rb batches/00-000999.safetensors && sed -i 's/00-000002.safetensors/00-000999.safetensors/' state.json"
  tamper robust-batch-attack-index-out-of-range robust '99-000002|batch|attack' \
    "mv $rb batches/99-000002.safetensors && sed -i 's/00-000002.safetensors/99-000002.safetensors/' state.json"
  tamper robust-state-wrong-types robust 'state.json' "py json-set state.json done '\"x\"'"
  tamper robust-state-truncated robust 'state.json' "truncate -s 50 state.json"
}

# ---------------------------------------------------------------------------------------------
# Crashes, part 4: corrupt checkpoints (copies): truncated or inconsistent safetensors,
# sidecars with wrong types or impossible values. A refusal that names the file or field.

probes_corrupt_checkpoints() {
  local pu=$PUR
  ck() { # NAME PATTERN SHELL-CODE (in a copy of the classifier checkpoint, ./ck) COMMAND...
    local name=crash-checkpoint-$1 pat=$2 code=$3; shift 3
    selected "$name" || return 0
    newdir; copy_cls "$D/ck"; SETUP="in a copy of $CLS_CK (ck/): $code"
    (cd "$D/ck" && eval "$code") || { result SKIP "$name" "could not tamper"; return 0; }
    want_refusal "$name" "$pat" 30 "$D" "$@"
  }
  local clean=(eval clean --model ck --subset 4 --out out)
  ck truncated-safetensors 'model.safetensors' "truncate -s 5000 model.safetensors" "${clean[@]}"
  ck truncated-safetensors-attack 'model.safetensors' "truncate -s 5000 model.safetensors" \
    attack --model ck --n 4 --attack fgsm --out out
  ck safetensors-header-8EiB 'model.safetensors' "py st-header-len model.safetensors" "${clean[@]}"
  ck safetensors-permuted-shape 'model.safetensors|shape' "py st-permute model.safetensors" "${clean[@]}"
  ck json-num-classes-string 'model.json|num_classes' "py json-set model.json num_classes '\"ten\"'" "${clean[@]}"
  ck json-mean-string 'model.json|mean' "py json-set model.json mean '\"abc\"'" "${clean[@]}"
  ck json-std-wrong-length 'model.json|std' "py json-set model.json std '[0.2, 0.2]'" "${clean[@]}"
  ck json-arch-absurd-width 'model.json|arch|width|memory|GiB' \
    "py json-set model.json arch '\"airnet-32-64-100000\"'" "${clean[@]}"
  ck json-num-classes-huge 'model.json|num_classes|classes|memory|GiB' \
    "py json-set model.json num_classes 100000000" "${clean[@]}"
  ck json-not-json 'model.json' "echo '{\"format\": ' >model.json" "${clean[@]}"
  pur() { # NAME PATTERN SHELL-CODE (in a copy of the purifier checkpoint, ./pu)
    local name=crash-checkpoint-$1 pat=$2 code=$3
    selected "$name" || return 0
    newdir; copy_pur "$D/pu"; SETUP="in a copy of $PUR_CK (pu/): $code"
    (cd "$D/pu" && eval "$code") || { result SKIP "$name" "could not tamper"; return 0; }
    want_refusal "$name" "$pat" 30 "$D" purify --purifier pu --n 4 --out out
  }
  pur purifier-truncated-generator 'generator.safetensors' "truncate -s 3000 generator.safetensors"
  pur purifier-permuted-generator 'generator.safetensors|shape' "py st-permute generator.safetensors"
  pur purifier-json-width-string 'purifier.json|width' "py json-set purifier.json purifier.width '\"wide\"'"
  pur purifier-json-grid-zero 'purifier.json|grid' "py json-set purifier.json transform.grid 0"
}

# ---------------------------------------------------------------------------------------------
# Crashes, part 5: crafted PyTorch files for `atop import`: pickles nested deep enough to
# overflow a recursive reader or printer, and zip bombs (a ~1 MB .pt whose entries inflate to
# 1.1 GiB). The bombs must be refused without reading the entry: exit non-zero and a peak
# resident size under 512 MiB.

probes_import() {
  local imp=(import --arch "$(sed -n 's/.*"arch": *"\([^"]*\)".*/\1/p' "$CLS_CK/model.json" | head -1)"
             --num-classes 10 --dataset cifar10)
  nested() { # NAME DEPTH KIND [entry]
    local name=crash-import-$1; shift
    selected "$name" || return 0
    newdir; SETUP="nested.pt: scripts/probe.sh's tool.py pt-nested nested.pt $*"
    py pt-nested "$D/nested.pt" "$@" || { result SKIP "$name" "could not craft the file"; return 0; }
    want_refusal "$name" 'nested.pt' 20 "$D" "${imp[@]}" --input nested.pt --out out
  }
  nested nested-list-100k 100000 list
  nested nested-list-100k-in-state-dict 100000 list entry
  nested nested-tuple-1M 1000000 tuple
  nested nested-dict-100k-in-state-dict 100000 dict entry
  nested nested-dict-1M 1000000 dict
  bomb() { # NAME GENERATOR
    local name=crash-import-$1 gen=$2
    selected "$name" || return 0
    newdir; SETUP="bomb.pt: scripts/probe.sh's tool.py $gen bomb.pt 1100 (MiB)"
    py "$gen" "$D/bomb.pt" 1100 || { result SKIP "$name" "could not craft the file"; return 0; }
    run 60 "$D" "${imp[@]}" --input bomb.pt --out out
    local o; o=$(outcome)
    if [ "$o" != ok ]; then result FAIL "$name" "$(bad_reason "$o")"
    elif [ "$RC" = 0 ]; then result FAIL "$name" "[accepted] exit 0"
    elif [ -n "${RSS_MB:-}" ] && [ "$RSS_MB" -ge 512 ]; then
      result FAIL "$name" "[no cap] refused only after inflating it: peak RSS $RSS_MB MiB ($(stat -c %s "$D/bomb.pt") B file); $(errline)"
    else result PASS "$name" "refused (exit $RC, peak RSS ${RSS_MB:-?} MiB): $(errline)"
    fi
  }
  bomb zip-bomb-storage pt-bomb-storage
  bomb zip-bomb-data-pkl pt-bomb-pkl
}

# ---------------------------------------------------------------------------------------------
# Hangs: each run has 20 s (train and data-loading ones a little more). Ending in time passes;
# running out the clock passes only after a printed warning.

probes_hangs() {
  local m=$CLS p=$PUR
  hang() { # NAME LIMIT ARGS...
    local name=hang-$1 limit=$2; shift 2
    selected "$name" || return 0
    newdir; want_prompt "$name" "$limit" "$D" "$@"
  }
  selected hang-threads-100000-info && { newdir; NO_THREADS=1 want_prompt hang-threads-100000-info 20 "$D" --threads 100000 info; }
  selected hang-threads-100000-env-eval-clean && { newdir; RUN_ENV=(ATOP_THREADS=100000); NO_THREADS=1 \
    want_prompt hang-threads-100000-env-eval-clean 20 "$D" eval clean --model "$m" --subset 8 --out out; }
  hang attack-eot-1e9 20 attack --model "$m" --transform noise --sigma 0.05 --n 4 --attack pgd --steps 1 --eot 1000000000 --out out
  hang eval-robust-eot-1e9 20 eval robust --model "$m" --transform noise --sigma 0.05 --n 4 --attack pgd --steps 1 --eot 1000000000 --draws 1 --check-points 0 --out out
  hang bench-attacks-eot-1e9 20 bench attacks --no-reference --batch 2 --pgd-steps 1 --apgd-steps 1 --eot 1000000000
  hang train-atop-adversary-eot-1e9 30 train atop --preset atop-demo --classifier "$m" --purifier "$p" --adversary pgd \
    --adversary-target defended --adversary-steps 1 --adversary-eot 1000000000 --epochs 1 --train-subset 64 --eval-subset 8 --out run
  hang attack-steps-1e9 20 attack --model "$m" --n 4 --attack pgd --steps 1000000000 --out out
}

# ---------------------------------------------------------------------------------------------
# Silent data loss: outputs aimed at an existing checkpoint, at the command's own inputs, or at
# an unrelated non-empty folder holding files of the names the command writes. Every file that
# was there must keep its sha256 (refusing, or writing beside them, both pass).

probes_data_loss() {
  local m=$CLS p=$PUR
  if selected loss-import-over-checkpoint; then
    newdir; copy_cls "$D/ck"
    if py pt-from-st "$CLS_CK/model.safetensors" "$D/other.pt"; then
      # Different weights than the checkpoint's (so an overwrite shows in the checksums).
      py st-fill "$D/ck/model.safetensors" head.weight 0.01
      want_untouched loss-import-over-checkpoint 20 "$D" "$D/ck" import --input other.pt \
        --arch "$(sed -n 's/.*"arch": *"\([^"]*\)".*/\1/p' "$CLS_CK/model.json" | head -1)" \
        --num-classes 10 --dataset cifar10 --out ck
    else result SKIP loss-import-over-checkpoint "could not craft a .pt"; fi
  fi
  if selected loss-purify-over-own-inputs; then
    # Inputs in D/rt2, outputs to D: purify writes D/<transform>/<name>.png, i.e. onto them.
    newdir; mkdir -p "$D/D/rt2"
    py png "$D/D/rt2/a.png" 32 1 && py png "$D/D/rt2/b.png" 32 2
    want_untouched loss-purify-over-own-inputs 30 "$D" "$D/D" purify --purifier "$p" --transform rt2 --input D/rt2 --out D
  fi
  if selected loss-purify-input-is-out; then
    newdir; mkdir -p "$D/D"; py png "$D/D/a.png" 32 1; plant "$D/D" purify.json
    want_untouched loss-purify-input-is-out 30 "$D" "$D/D" purify --purifier "$p" --transform rt2 --input D --out D
  fi
  unrelated() { # NAME FILES-THE-COMMAND-WRITES -- ARGS... (with --out/--grid pointing at ./U)
    local name=loss-unrelated-folder-$1 files=$2; shift 3
    selected "$name" || return 0
    # shellcheck disable=SC2086
    newdir; plant "$D/U" $files; SETUP="U/ holds sentinel.txt $files (known content)"
    want_untouched "$name" 60 "$D" "$D/U" "$@"
  }
  # (No state.json planted: that file marks a run to resume, which an unrelated folder lacks.)
  unrelated attack "results.json adversarial.safetensors grid.png" -- \
    attack --model "$m" --n 4 --attack fgsm --out U
  unrelated eval-robust "results.json report.md records.csv grid.png" -- \
    eval robust --model "$m" --n 4 --attack fgsm --draws 1 --check-points 0 --out U
  unrelated eval-clean "eval-clean-test.json confusion-test.png" -- \
    eval clean --model "$m" --subset 4 --out U
  unrelated purify "purify.json grid-rt2.png purified-rt2.safetensors" -- \
    purify --purifier "$p" --transform rt2 --n 4 --out U
  unrelated eval-merge "results.json report.md" -- eval merge --out U "$FIX"
  unrelated train-classifier "metrics.jsonl" -- train classifier --preset cifar10-demo --epochs 1 \
    --warmup-epochs 0 --train-subset 64 --test-subset 64 --batch-size 32 --out U
  unrelated train-purifier "metrics.jsonl" -- train purifier --preset purifier-demo --epochs 1 \
    --train-subset 64 --eval-subset 64 --batch-size 32 --out U
  unrelated train-atop "metrics.jsonl" -- train atop --preset atop-demo --classifier "$m" --purifier "$p" \
    --epochs 1 --train-subset 64 --eval-subset 8 --batch-size 32 --out U
  # The output folder is the model's own checkpoint (a copy): nothing of it may change.
  if selected loss-attack-into-checkpoint; then
    newdir; copy_cls "$D/ck"; echo precious >"$D/ck/results.json"
    want_untouched loss-attack-into-checkpoint 30 "$D" "$D/ck" attack --model ck --n 4 --attack fgsm --out ck
  fi
}

# ---------------------------------------------------------------------------------------------
# Silently wrong results: a resumed run whose model changed since (same path, new weights), and
# a second trainer in a run folder another one is writing to.

probes_wrong_results() {
  local cmd
  if selected wrong-attack-resume-after-weights-changed; then
    newdir; copy_cls "$D/ck"
    cmd=(attack --model ck --n 6 --batch-size 2 --attack fgsm --out run)
    run 30 "$D" "${cmd[@]}"
    if [ "$RC" = 0 ] && py st-fill "$D/ck/model.safetensors" head.weight 0.01; then
      SETUP="ran the command once on a copy ck/, then set ck/model.safetensors head.weight to 0.01"
      want_refusal wrong-attack-resume-after-weights-changed 'model|weights|hash|changed' 30 "$D" "${cmd[@]}"
    else result SKIP wrong-attack-resume-after-weights-changed "base run failed (exit $RC) or could not alter the weights"; fi
  fi
  if selected wrong-eval-robust-resume-after-weights-changed; then
    newdir; copy_cls "$D/ck"
    cmd=(eval robust --model ck --n 6 --batch-size 2 --attack fgsm --draws 1 --check-points 0 --out run)
    run 30 "$D" "${cmd[@]}"
    if [ "$RC" = 0 ] && py st-fill "$D/ck/model.safetensors" head.weight 0.01; then
      SETUP="ran the command once on a copy ck/, then set ck/model.safetensors head.weight to 0.01"
      want_refusal wrong-eval-robust-resume-after-weights-changed 'model|weights|hash|changed' 30 "$D" "${cmd[@]}"
    else result SKIP wrong-eval-robust-resume-after-weights-changed "base run failed (exit $RC) or could not alter the weights"; fi
  fi
  if selected wrong-two-trainers-one-folder; then
    # Trainer 1 runs in the background (a few seconds of training); trainer 2 resumes the same
    # folder while it runs: it must be refused (a lock), not interleave its metrics.
    newdir; local d=$D
    local train=(train classifier --preset cifar10-demo --epochs 3 --warmup-epochs 0 --train-subset 1024
                 --test-subset 64 --batch-size 32)
    (cd "$d" && ulimit -v "$VMEM_KB" && exec timeout -k 5 60 "$BIN" --threads 1 "${train[@]}" --out run) \
      >"$d/.probe-t1-out" 2>"$d/.probe-t1-err" </dev/null &
    local t1=$! i; BGPID=$t1
    for i in $(seq 100); do [ -f "$d/run/config.json" ] && break; sleep 0.2; done
    if kill -0 "$t1" 2>/dev/null && [ -f "$d/run/config.json" ]; then
      want_refusal wrong-two-trainers-one-folder 'lock|in use|running|another|busy' 30 "$d" train classifier --resume run
    else result SKIP wrong-two-trainers-one-folder "trainer 1 ended before trainer 2 could start"; fi
    kill "$t1" 2>/dev/null; wait "$t1" 2>/dev/null; BGPID=""
  fi
}

# ---------------------------------------------------------------------------------------------
# Run integrity (docs/reliability.md, "Run folders"): resumed runs keep their inputs and
# settings, two writers never share a folder, completion is a recorded fact, read-backs and
# merges are validated, and studies refuse duplicate budgets and swapped stages.

probes_integrity() {
  local m=$CLS p=$PUR cmd
  if selected integrity-resume-after-classifier-changed; then
    newdir; copy_cls "$D/ck"
    cmd=(train purifier --preset purifier-demo --epochs 1 --train-subset 64 --eval-subset 8 --classifier ck --out run)
    run 60 "$D" "${cmd[@]}"
    if [ "$RC" = 0 ] && py st-nudge "$D/ck/model.safetensors"; then
      SETUP="trained a purifier with a copy ck/ of the classifier, then changed one tensor of ck/model.safetensors"
      want_refusal integrity-resume-after-classifier-changed 'classifier.*changed' 60 "$D" train purifier --resume run --epochs 2
    else result SKIP integrity-resume-after-classifier-changed "base run failed (exit $RC) or could not alter the weights"; fi
  fi
  if selected integrity-resume-with-other-setting; then
    newdir
    run 60 "$D" train classifier --preset cifar10-demo --epochs 1 --warmup-epochs 0 --train-subset 64 --test-subset 64 --batch-size 32 --out run
    if [ "$RC" = 0 ]; then
      SETUP="trained 1 epoch at the preset's label smoothing"
      want_refusal integrity-resume-with-other-setting '--label-smoothing was' 60 "$D" train classifier --resume run --epochs 2 --label-smoothing 0.3
    else result SKIP integrity-resume-with-other-setting "base run failed (exit $RC)"; fi
  fi
  local small=(eval robust --model "$m" --n 8 --batch-size 4 --attack fgsm --draws 2 --check-points 0)
  if selected integrity-two-writers-one-folder; then
    newdir; local d=$D i both=0 bad=""
    for i in 1 2 3 4 5; do
      (cd "$d" && exec "$BIN" --threads 1 "${small[@]}" --seed 1 --out "race$i") >/dev/null 2>"$d/.probe-a$i" &
      local a=$!
      (cd "$d" && exec "$BIN" --threads 1 "${small[@]}" --seed 2 --out "race$i") >/dev/null 2>"$d/.probe-b$i"
      local rb=$?; wait "$a"; local ra=$?
      if [ "$ra" = 0 ] && [ "$rb" = 0 ]; then both=$((both + 1)); fi
      local want=1; [ "$rb" = 0 ] && want=2
      grep -q "\"seed\": $want," "$d/race$i/results.json" 2>/dev/null || bad+="race$i holds no whole run of the winner; "
    done
    if [ "$both" -gt 0 ]; then result FAIL integrity-two-writers-one-folder "[race] both writers exited 0 in $both of 5"
    elif [ -n "$bad" ]; then result FAIL integrity-two-writers-one-folder "[race] $bad"
    else result PASS integrity-two-writers-one-folder "5 races: one writer each, its run whole; the other: $(head -c 150 "$d/.probe-a1" "$d/.probe-b1" | grep -m1 error)"; fi
  fi
  if selected integrity-rerun-writes-missing-outputs || selected integrity-edited-results-refused; then
    newdir; run 60 "$D" "${small[@]}" --out run
    if [ "$RC" = 0 ]; then
      rm -f "$D/run/report.md" "$D/run/grid.png"
      SETUP="a finished evaluation lost report.md and grid.png (a full disk), then the same command again"
      run 60 "$D" "${small[@]}" --out run
      if [ "$RC" = 0 ] && [ -f "$D/run/report.md" ] && [ -f "$D/run/grid.png" ]; then
        result PASS integrity-rerun-writes-missing-outputs "the rerun wrote report.md and grid.png again"
      else result FAIL integrity-rerun-writes-missing-outputs "[incomplete] exit $RC; report.md $( [ -f "$D/run/report.md" ] && echo there || echo missing), grid.png $( [ -f "$D/run/grid.png" ] && echo there || echo missing)"; fi
      py json-set "$D/run/results.json" n 9
      SETUP="a finished evaluation's results.json edited (n 8 -> 9), then the same command again"
      want_refusal integrity-edited-results-refused 'results.json.*changed' 60 "$D" "${small[@]}" --out run
    else result SKIP integrity-rerun-writes-missing-outputs "base run failed (exit $RC)"; fi
  fi
  if selected integrity-merge-; then
    newdir; run 60 "$D" "${small[@]}" --shard 0/2 --out s0; local r0=$RC
    run 60 "$D" "${small[@]}" --shard 1/2 --out s1
    if [ "$r0" = 0 ] && [ "$RC" = 0 ]; then
      cp "$D/s0/results.json" "$D/.probe-s0"
      tamper_merge() { # NAME PATTERN EDIT...
        local name=$1 pat=$2; shift 2
        selected "$name" || return 0
        cp "$D/.probe-s0" "$D/s0/results.json"; "$@"; py rehash "$D/s0" results.json
        SETUP="shard 0's results.json: $*; complete.json rehashed to match"
        want_refusal "$name" "$pat" 30 "$D" eval merge s0 s1 --out "m-$name"
      }
      tamper_merge integrity-merge-short-record 'predictions for R' py json-set "$D/s0/results.json" records.0.attacks.0.preds '[0]'
      tamper_merge integrity-merge-preds-set-to-labels 'differ from those of its records' py preds-to-labels "$D/s0/results.json"
      tamper_merge integrity-merge-class-out-of-range 'outside the' py json-set "$D/s0/results.json" records.0.clean.preds.0 99
      tamper_merge integrity-merge-index-out-of-range 'dataset index' py json-set "$D/s0/results.json" records.0.index 99999999
      tamper_merge integrity-merge-beyond-eps '> eps' py json-set "$D/s0/results.json" records.0.perturbation_norms.0 0.5
    else result SKIP integrity-merge-short-record "the shards failed (exit $r0, $RC)"; fi
  fi
  if selected integrity-study-duplicate-budgets || selected integrity-study-swapped-stages; then
    newdir
    printf 'description = "probe"\n[classifier]\ncheckpoint = "%s"\n[purifier]\ncheckpoint = "%s"\n[atop]\ncheckpoint = "%s"\n[eval]\neps = ["8/255", "16/510"]\n' \
      "$CLS_CK" "$PUR_CK" "$PUR_CK" >"$D/twice.toml"
    selected integrity-study-duplicate-budgets &&
      want_refusal integrity-study-duplicate-budgets 'each budget once' 30 "$D" run --config twice.toml --out study
    sed 's:"16/510"::; s:, \]:]:' "$D/twice.toml" >"$D/swapped.toml"
    selected integrity-study-swapped-stages &&
      want_refusal integrity-study-swapped-stages 'not fine-tuned by AToP' 30 "$D" run --config swapped.toml --out study2
  fi
  local bad
  bad() { # NAME PATTERN ARGS...
    local name=integrity-$1 pat=$2; shift 2
    selected "$name" || return 0
    newdir; want_refusal "$name" "$pat" 30 "$D" "$@"
  }
  bad ceiling-epochs 'epochs = 1000000: at most' train classifier --preset cifar10-demo --epochs 1000000 --train-subset 64 --out run
  bad ceiling-work-size 'work.size.*1024' purifier info --width 16 --work-size 4096
}

# ---------------------------------------------------------------------------------------------
# Accepted nonsense: meaningless values must be refused with a message naming the flag/field.

probes_nonsense() {
  local m=$CLS p=$PUR
  bad() { # NAME PATTERN LIMIT ARGS...
    local name=nonsense-$1 pat=$2 limit=$3; shift 3
    selected "$name" || return 0
    newdir; want_refusal "$name" "$pat" "$limit" "$D" "$@"
  }
  bad eval-clean-subset-0 'subset' 30 eval clean --model "$m" --subset 0 --out out
  bad data-inspect-subset-0 'subset' 30 data inspect --dataset cifar10 --subset 0 --grid grid.png
  bad train-classifier-train-subset-0 'train.subset' 30 train classifier --preset cifar10-demo --epochs 1 --warmup-epochs 0 --train-subset 0 --test-subset 64 --out run
  bad train-classifier-test-subset-0 'test.subset' 30 train classifier --preset cifar10-demo --epochs 1 --warmup-epochs 0 --train-subset 64 --test-subset 0 --batch-size 32 --out run
  bad train-purifier-eval-subset-0 'eval.subset' 30 train purifier --preset purifier-demo --epochs 1 --train-subset 64 --eval-subset 0 --batch-size 32 --out run
  bad attack-quantize-1 'quantize' 20 attack --model "$m" --n 4 --attack fgsm --quantize 1 --out out
  bad attack-quantize-0 'quantize' 20 attack --model "$m" --n 4 --attack fgsm --quantize 0 --out out
  bad eval-robust-quantize-1 'quantize' 20 eval robust --model "$m" --n 4 --attack fgsm --quantize 1 --draws 1 --check-points 0 --out out
  bad attack-apgd-t-targets-50 'targets' 20 attack --model "$m" --n 4 --attack apgd-t --steps 1 --targets 50 --out out
  bad attack-fab-t-targets-50 'targets' 20 attack --model "$m" --n 4 --attack fab-t --steps 1 --targets 50 --out out
  bad eval-robust-apgd-t-targets-50 'targets' 20 eval robust --model "$m" --n 4 --attack apgd-t --steps 1 --targets 50 --draws 1 --check-points 0 --out out
  bad attack-targets-0 'targets' 20 attack --model "$m" --n 4 --attack apgd-t --steps 1 --targets 0 --out out
  # A CIFAR-10 model on ImageNette: same class count, different classes.
  bad eval-clean-cifar-model-on-imagenette 'class|dataset|imagenette|cifar' 60 eval clean --model "$m" --dataset imagenette --subset 8 --out out
  bad attack-cifar-model-on-imagenette 'class|dataset|imagenette|cifar' 60 attack --model "$m" --dataset imagenette --n 4 --attack fgsm --out out
  bad eval-robust-cifar-model-on-imagenette 'class|dataset|imagenette|cifar' 60 eval robust --model "$m" --dataset imagenette --n 4 --attack fgsm --draws 1 --check-points 0 --out out
  bad purify-cifar-classifier-on-imagenette 'class|dataset|imagenette|cifar' 60 purify --purifier "$p" --classifier "$m" --dataset imagenette --n 4 --out out
  bad attack-eps-negative 'eps' 20 attack --model "$m" --n 4 --attack fgsm --eps=-0.1 --out out
  bad purify-sigma-negative 'sigma' 20 purify --purifier "$p" --n 4 --sigma=-1 --out out
  sidecar() { # NAME PATTERN CODE-IN-./ck ARGS...
    local name=nonsense-$1 pat=$2 code=$3; shift 3
    selected "$name" || return 0
    newdir; copy_cls "$D/ck"; copy_pur "$D/pu"; SETUP="copies of the checkpoints in ck/ and pu/: $code"
    (cd "$D" && eval "$code") || { result SKIP "$name" "could not tamper"; return 0; }
    want_refusal "$name" "$pat" 30 "$D" "$@"
  }
  sidecar model-json-std-zero-eval-clean 'std' "py json-set ck/model.json std '[0, 0, 0]'" \
    eval clean --model ck --subset 4 --out out
  sidecar model-json-std-negative-eval-clean 'std' "py json-set ck/model.json std '[-0.2, -0.2, -0.2]'" \
    eval clean --model ck --subset 4 --out out
  sidecar model-json-std-zero-attack 'std' "py json-set ck/model.json std '[0, 0, 0]'" \
    attack --model ck --n 4 --attack fgsm --out out
  sidecar model-json-std-negative-eval-robust 'std' "py json-set ck/model.json std '[-0.2, -0.2, -0.2]'" \
    eval robust --model ck --n 4 --attack fgsm --draws 1 --check-points 0 --out out
  sidecar model-json-classes-vs-num-classes 'classes' "py json-set ck/model.json classes '[\"a\"]'" \
    eval clean --model ck --subset 4 --out out
  sidecar purifier-json-image-size-0 'image.size' "py json-set pu/purifier.json image_size 0" \
    purify --purifier pu --n 4 --out out
  selected nonsense-threads-0-eval-clean || return 0
  newdir; NO_THREADS=1 want_refusal nonsense-threads-0-eval-clean 'threads' 20 "$D" --threads 0 eval clean --model "$m" --subset 4 --out out
}

# ---------------------------------------------------------------------------------------------
# Colour codes: stderr to a file (run's redirection) and through a pipe must carry no ESC[.

probes_colour() {
  local m=$CLS
  colour() { # NAME ARGS... : stderr captured through a pipe (cat), TERM set as a terminal's
    local name=colour-$1; shift
    selected "$name" || return 0
    newdir; local d=$D
    run 30 "$d" "$@"   # stderr to a file
    local o; o=$(outcome)
    local file_esc=0 pipe_esc=0
    grep -q $'\x1b\[' "$d/.probe-err" && file_esc=1
    (cd "$d" && ulimit -v "$VMEM_KB" && TERM=xterm-256color timeout -k 5 30 "$BIN" --threads 1 "$@" 2>&1 >/dev/null | cat) \
      >"$d/.probe-pipe" </dev/null
    grep -q $'\x1b\[' "$d/.probe-pipe" && pipe_esc=1
    if [ "$o" != ok ]; then result FAIL "$name" "$(bad_reason "$o")"
    elif [ "$file_esc$pipe_esc" != 00 ]; then
      result FAIL "$name" "[colour] ESC[ in stderr (file: $file_esc, pipe: $pipe_esc): $(grep -m1 $'\x1b\[' "$d/.probe-err" "$d/.probe-pipe" | cat -v | cut -c1-120)"
    elif [ ! -s "$d/.probe-err" ]; then result PASS "$name" "stderr empty: nothing to colour (exit $RC)"
    else result PASS "$name" "$(grep -vc '^\s*$' "$d/.probe-err") stderr lines, no escape codes (exit $RC)"
    fi
  }
  colour attack-log attack --model "$m" --n 4 --attack fgsm --out out
  colour eval-robust-log eval robust --model "$m" --n 4 --attack fgsm --draws 1 --check-points 0 --out out
  colour purify-log purify --purifier "$PUR" --n 4 --out out
  colour train-classifier-log train classifier --preset cifar10-demo --epochs 1 --warmup-epochs 0 \
    --train-subset 64 --test-subset 64 --batch-size 32 --out run
  colour warning-line attack --model "$m" --n 4 --attack pgd --steps 1 --quantize 4 --out out
  colour error-message eval clean --model /nonexistent/model --subset 4 --out out
  colour usage-error attack --no-such-flag
}

# ---------------------------------------------------------------------------------------------

echo "atop probes: $BIN ($(stat -c %y "$BIN" | cut -d. -f1)); data $ATOP_DATA_DIR"
echo "classifier $CLS_CK; purifier $PUR_CK; memory cap ${VMEM_KB} kB per command"
probes_zero_sizes
probes_absurd_sizes
probes_tampered_resume
probes_corrupt_checkpoints
probes_import
probes_hangs
probes_data_loss
probes_wrong_results
probes_integrity
probes_nonsense
probes_colour

echo
echo "summary: $NPASS passed, $NFAIL failed, $NSKIP skipped ($(( $(date +%s) - started )) s)"
if [ "$NFAIL" -gt 0 ]; then
  echo
  echo "failures (command, exit status, first stderr lines):"
  printf '%s' "$DETAILS"
  exit 1
fi

#!/usr/bin/env bash
# Tests scripts/slurm-eval-robust.sh on a real single-node Slurm that it starts itself: a private
# munged, slurmctld and slurmd on this host, all config, state and logs in a temp dir, no
# accounting database. A small noise-defended `atop eval robust` goes through a 4-task array and
# the merge job; the merged results must equal the same evaluation run unsharded here
# (records.csv, and results.json less its timings and start date, its real numbers to 1e-9:
# sums of per-batch floats depend on the order the shards are added in).
#
#   scripts/test-slurm.sh            (as root, after apt-get install slurm-wlm)
#
# Environment: ATOP (target/release/atop), MODEL (a classifier; default: one trained here for a
# few seconds, 1 epoch of WRN-10-1 on 512 CIFAR-10 images), ATOP_DATA_DIR
# (../shared/data), TIMEOUT for the jobs in seconds (600), PORT for slurmctld (16817; slurmd
# uses PORT+1), KEEP=1 to keep the temp dir. Exit 0: PASS, 1: FAIL, 77: skipped (no Slurm,
# no munge, not root).
set -euo pipefail
cd "$(dirname "$0")/.."
skip() { echo "SKIP: $*" >&2; exit 77; }
for cmd in slurmctld slurmd sbatch sinfo squeue scontrol scancel munged munge python3; do
  command -v "$cmd" > /dev/null || skip "no $cmd (apt-get install slurm-wlm; this script installs nothing)"
done
[ "$(id -u)" = 0 ] || skip "slurmd has to run as root to start jobs"
atop=${ATOP:-target/release/atop} model=${MODEL:-}
[ -x "$atop" ] || { echo "no $atop: run cargo build --release first (or set ATOP)" >&2; exit 1; }
[ -z "$model" ] || [ -e "$model" ] || { echo "no classifier $model (MODEL)" >&2; exit 1; }
export ATOP=$(realpath "$atop") ATOP_DATA_DIR=${ATOP_DATA_DIR:-../shared/data}
host=$(hostname -s) port=${PORT:-16817} timeout=${TIMEOUT:-600}

tmp=$(mktemp -d /tmp/atop-slurm.XXXXXX)
chmod 755 "$tmp" # munged refuses a socket in a folder others cannot enter
pids=() jobs=()
cleanup() {
  local rc=$?
  # Cancel our jobs first: their slurmstepd would outlive slurmd.
  if [ ${#jobs[@]} -gt 0 ]; then
    scancel "${jobs[@]}" 2> /dev/null || true
    for _ in $(seq 20); do [ -z "$(squeue -h 2> /dev/null)" ] && break; sleep 0.5; done
  fi
  # Stop the daemons in reverse order of start (slurmd, slurmctld, munged).
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2> /dev/null || true
    wait "${pids[i]}" 2> /dev/null || true
  done
  if [ "$rc" = 0 ] && [ -z "${KEEP:-}" ]; then rm -rf "$tmp"; else echo "config, logs and results kept in $tmp"; fi
  [ "$rc" = 0 ] || echo "FAIL: exit $rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$model" ]; then
  model=$tmp/classifier
  "$ATOP" --quiet --threads 2 train classifier --dataset cifar10 --arch wrn-10-1 --epochs 1 \
    --batch-size 64 --train-subset 512 --test-subset 64 --seed 1 --out "$model" > /dev/null
fi
# Small and single-threaded (the test may share the machine); 32 points in batches of 8 give
# each of the 4 shards one whole batch.
eval_args=(--threads 1 --model "$model" --transform noise --sigma 0.02 --attack pgd --steps 2
  --eot 2 --n 32 --draws 2 --check-points 0 --batch-size 8 --eps 8/255)

# A private munged with a fresh key, so the system's munge (if any) is neither needed nor touched.
dd if=/dev/urandom of="$tmp/munge.key" bs=1024 count=1 status=none
chmod 600 "$tmp/munge.key"
munged -F --socket="$tmp/munge.sock" --key-file="$tmp/munge.key" --pid-file="$tmp/munged.pid" \
  --seed-file="$tmp/munged.seed" > "$tmp/munged.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do munge -S "$tmp/munge.sock" -n > /dev/null 2>&1 && break; sleep 0.2; done
munge -S "$tmp/munge.sock" -n > /dev/null || { echo "munged did not start: $tmp/munged.log" >&2; exit 1; }

# The node is this host as slurmd -C sees it (its real CPUs and memory), reached on loopback.
node=$(slurmd -C | head -1)
mkdir -p "$tmp/state" "$tmp/spool"
cat > "$tmp/slurm.conf" << EOF
ClusterName=atoptest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$tmp/munge.sock
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# A merge whose array failed is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
$node NodeAddr=127.0.0.1
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$tmp/slurm.conf
slurmctld -D -c > "$tmp/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -N "$host" > "$tmp/slurmd.out" 2>&1 &
pids+=($!)
state=
for _ in $(seq 60); do
  state=$(sinfo -h -n "$host" -o %t 2> /dev/null || true)
  [ "$state" = idle ] && break
  sleep 1
done
[ "$state" = idle ] || { echo "node $host not idle after 60 s (state '$state'): see $tmp/slurm*.log" >&2; exit 1; }
echo "PASS: $(sinfo -V) up, node $host idle ($node)"

# The array and merge through the script under test, and meanwhile the unsharded run here.
out=$tmp/out
submitted=$(scripts/slurm-eval-robust.sh "$out" 4 -- "${eval_args[@]}")
echo "$submitted"
array=$(sed -n 's/^array job \([0-9]*\).*/\1/p' <<< "$submitted")
merge=$(sed -n 's/.*merge job \([0-9]*\):.*/\1/p' <<< "$submitted")
[ -n "$array" ] && [ -n "$merge" ] || { echo "no job ids in the script's output" >&2; exit 1; }
jobs=("$array" "$merge")
"$ATOP" --quiet eval robust "${eval_args[@]}" --out "$out/whole" > /dev/null
start=$SECONDS job_state=
while [ $((SECONDS - start)) -lt "$timeout" ]; do
  job_state=$(scontrol -o show job "$merge" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  case $job_state in PENDING | CONFIGURING | RUNNING | COMPLETING | '') sleep 2 ;; *) break ;; esac
done

fails=0
check() { if "${@:2}"; then echo "PASS: $1"; else echo "FAIL: $1"; fails=$((fails + 1)); fi; }
check "array of 4 tasks and merge job finished: merge $job_state after $((SECONDS - start)) s" \
  test "$job_state" = COMPLETED
if [ "$job_state" != COMPLETED ]; then
  tail -n 5 "$out"/logs/*.log 2> /dev/null || true
  exit 1
fi
check "merged records.csv equals the unsharded run's" cmp "$out/merged/records.csv" "$out/whole/records.csv"
same_results() {
  python3 - "$out/merged/results.json" "$out/whole/results.json" << 'EOF'
import json, math, sys
# Timings and the start date differ between any two runs; real numbers may differ in the last
# digits (sums over batches in another order, a measurement on another batch); nothing else may.
def same(x, y, path="results"):
    if isinstance(x, dict) and isinstance(y, dict):
        keys = (set(x) | set(y)) - {"seconds", "started"}
        return all(same(x.get(k), y.get(k), f"{path}.{k}") for k in sorted(keys))
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return all(same(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(x, y)))
    if isinstance(x, float) and isinstance(y, (int, float)) and not isinstance(y, bool):
        ok = math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    else:
        ok = x == y
    if not ok:
        print(f"{path}: merged {x!r}, unsharded {y!r}", file=sys.stderr)
    return ok
a, b = (json.load(open(p)) for p in sys.argv[1:])
sys.exit(not same(a, b))
EOF
}
check "merged results.json equals the unsharded run's (less seconds and start date; reals to 1e-9)" same_results
[ "$fails" = 0 ] || exit 1
echo "PASS: slurm-eval-robust.sh on a real Slurm, $SECONDS s in all"

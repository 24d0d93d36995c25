#!/usr/bin/env bash
# Fuzzes the parsers that read users' files (fuzz/harness.rs) with cargo-fuzz (libFuzzer), each
# target for SECONDS, one after another, starting from the seeds in fuzz/seeds/TARGET (copied
# into the growing corpus fuzz/corpus/TARGET). Prints one row per target: executions, corpus
# size, coverage, crashes. A crash leaves its input in fuzz/artifacts/TARGET/; once fixed, copy
# it to fuzz/regressions/TARGET/ so that tests/fuzz_regressions.rs replays it.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      (default 600 s, every target)
#
# Needs nightly Rust (rustup toolchain install nightly) and cargo-fuzz (cargo install cargo-fuzz).
# Built as cargo-fuzz does by default (optimised, with debug assertions and overflow checks),
# without a sanitizer: atop is safe Rust over libtorch; a panic, abort or overflow is the find.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
# libFuzzer reads -max_total_time=0 as "no limit": refuse it and anything not a count.
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "SECONDS must be a positive number of seconds, got '$seconds'" >&2; exit 2; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pickle state_dict torch_zip safetensors sidecar cifar config)
cargo +nightly fuzz --version > /dev/null 2>&1 || {
  echo "needs nightly Rust and cargo-fuzz: rustup toolchain install nightly; cargo install cargo-fuzz" >&2
  exit 77
}
for t in "${targets[@]}"; do
  cargo +nightly fuzz build --sanitizer none "$t" 2>&1 | grep -E "^(error|warning)" >&2
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "cannot build fuzz target $t" >&2; exit 1; }
done
mkdir -p fuzz/logs
echo "| target | seconds | executions | exec/s | corpus | coverage (edges) | crashes |"
echo "|---|---|---|---|---|---|---|"
failed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2> /dev/null || true
  log=fuzz/logs/$t.log
  before=$(find "fuzz/artifacts/$t" -type f | wc -l)
  # -rss_limit_mb: a parser must refuse, not allocate, what the input claims; -timeout: a hang.
  cargo +nightly fuzz run --sanitizer none "$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=20 -max_len=65536 \
    -print_final_stats=1 > "$log" 2>&1
  rc=$?
  after=$(find "fuzz/artifacts/$t" -type f | wc -l)
  stat() { grep -m1 "^stat::$1:" "$log" | awk '{print $2}'; }
  execs=$(stat number_of_executed_units)
  edges=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  rate=$(( ${execs:-0} / seconds ))
  echo "| $t | $seconds | ${execs:-?} | $rate | $corpus | ${edges:-?} | $((after - before)) |"
  if [ $rc -ne 0 ] || [ "$after" -ne "$before" ]; then
    failed=1
    echo "  $t: exit $rc, see $log and fuzz/artifacts/$t/" >&2
  fi
done
exit $failed

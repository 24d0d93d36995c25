#!/usr/bin/env bash
# Records the torchattacks reference outputs of the agreement tests (tests/attacks.rs,
# `reference`) for the committed fixture classifier (tests/fixtures/attack-classifier) in tests/golden/torchattacks.json, keyed by
# the SHA-256 of the script, weights, images and settings they were computed from. The tests
# read a recorded output instead of rerunning torchattacks (up to 15 CPU-minutes each) when the
# key matches, and run it otherwise; the comparison is the same either way. Commit the file.
set -euo pipefail
cd "$(dirname "$0")/.."
export ATOP_DATA_DIR=${ATOP_DATA_DIR:-../shared/data}
ATOP_WRITE_GOLDEN=1 cargo test --release --test attacks -- agrees_with_torchattacks fab_t_agrees

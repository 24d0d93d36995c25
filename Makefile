# The two entry points of the README. Both run the idempotent set-up first.
ATOP_DATA_DIR ?= ../shared/data
export ATOP_DATA_DIR

.PHONY: setup demo test bench

setup:
	./scripts/setup.sh

# The main job (grows with the pipeline): inspect the real CIFAR-10 copy.
demo: setup
	cargo run --release --quiet -- data inspect --dataset cifar10 --split train --grid out/cifar10-train-grid.png

# Lint first (fast to fail), then the whole suite.
test: setup
	cargo fmt --check
	cargo clippy --release --all-targets --quiet -- -D warnings
	cargo test --release

bench: setup
	cargo run --release --quiet -- bench data


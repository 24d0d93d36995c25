# The two entry points of the README. Both run the idempotent set-up first.
ATOP_DATA_DIR ?= ../shared/data
export ATOP_DATA_DIR

.PHONY: setup demo test bench

setup:
	./scripts/setup.sh

# The main job: the whole AToP study in one command (docs/run.md): train a CPU classifier,
# pre-train the CPU purifier, fine-tune it with AToP, and evaluate the classifier behind each
# purifier with the same whole-model attacks (PGD and selective EOT with EOT, and the transfer
# attack) on the same points and draws, compared point by point. Within 15 minutes on 2 CPU
# cores; rerunning resumes (or reads back a finished study).
DEMO := out/study-cpu-15min
demo: setup
	cargo build --release --quiet
	./target/release/atop run --preset cpu-15min --out $(DEMO)
	@echo "report: $(DEMO)/report.md"

# Lint first (fast to fail), then the whole suite, then sharded evaluation through a real
# single-node Slurm (scripts/test-slurm.sh: exit 77, reported as SKIPPED, where Slurm and
# munge are not installed or not run as root).
test: setup
	cargo fmt --check
	cargo clippy --release --all-targets --quiet -- -D warnings
	cargo test --release
	@./scripts/test-slurm.sh; rc=$$?; \
	  if [ $$rc = 77 ]; then echo "SKIPPED: scripts/test-slurm.sh (see the line above)"; \
	  elif [ $$rc != 0 ]; then exit $$rc; fi

bench: setup
	cargo run --release --quiet -- bench data


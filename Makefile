# The two entry points of the README. Both run the idempotent set-up first.
ATOP_DATA_DIR ?= ../shared/data
export ATOP_DATA_DIR

.PHONY: setup demo test bench

setup:
	./scripts/setup.sh

# The main job (grows with the pipeline): inspect the real CIFAR-10 copy, train the demo
# classifier and the demo purifier (or finish them, if an earlier demo was interrupted),
# evaluate, purify under RT1/RT2/RT3, attack the classifier alone and behind the purifier, and
# fine-tune the purifier with AToP.
DEMO := out/demo
demo: setup
	cargo build --release --quiet
	./target/release/atop data inspect --dataset cifar10 --split train --grid $(DEMO)/cifar10-train-grid.png
	if [ -f $(DEMO)/classifier/last.json ]; then \
		./target/release/atop train classifier --resume $(DEMO)/classifier; \
	else \
		./target/release/atop train classifier --preset cifar10-demo --out $(DEMO)/classifier; \
	fi
	./target/release/atop eval clean --model $(DEMO)/classifier
	./target/release/atop attack --model $(DEMO)/classifier --attack pgd,apgd-ce --eps 2/255 --n 256 --out $(DEMO)/attack
	if [ -f $(DEMO)/purifier/last.json ]; then \
		./target/release/atop train purifier --resume $(DEMO)/purifier; \
	else \
		./target/release/atop train purifier --preset purifier-demo --out $(DEMO)/purifier; \
	fi
	./target/release/atop purify --purifier $(DEMO)/purifier --classifier $(DEMO)/classifier --transform rt1,rt2,rt3 --n 256 --out $(DEMO)/purify
	./target/release/atop attack --model $(DEMO)/classifier --purifier $(DEMO)/purifier --attack pgd --steps 10 --eot 2 --eps 2/255 --n 64 --out $(DEMO)/attack-defended
	if [ -f $(DEMO)/atop/last.json ]; then \
		./target/release/atop train atop --resume $(DEMO)/atop; \
	else \
		./target/release/atop train atop --preset atop-demo --classifier $(DEMO)/classifier --purifier $(DEMO)/purifier --out $(DEMO)/atop; \
	fi

# Lint first (fast to fail), then the whole suite.
test: setup
	cargo fmt --check
	cargo clippy --release --all-targets --quiet -- -D warnings
	cargo test --release

bench: setup
	cargo run --release --quiet -- bench data


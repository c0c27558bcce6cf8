# meshd — the two commands: `make demo` runs the main job, `make test` runs every test.
# Both bootstrap first (idempotent: a second run takes seconds).
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all bootstrap build demo test fuzz lint bench

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --workspace --bins

demo: bootstrap
	$(CARGO) build --release --workspace --bins
	./target/release/meshd-demo

lint: bootstrap
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd ebpf && $(CARGO) +nightly clippy --target bpfel-unknown-none -Z build-std=core --bins -- -D warnings

# After the tests: each DNS fuzz target for FUZZ_SECONDS (60 s in all). libFuzzer adds
# what it finds to fuzz/work/ (ignored); the committed seeds in fuzz/corpus/ stay as they are.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := dns_answer dns_relay

test: bootstrap
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast
	$(MAKE) fuzz

fuzz: bootstrap
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$t && \
	  (cd fuzz && $(CARGO) +nightly fuzz run $$t work/$$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1) || exit 1; \
	done

# `make bench` runs every group; `make bench ONLY=netlink` runs one
# (policy, mesh, gossip_sim, netlink, convergence, dns, socklb, ingress).
bench: bootstrap
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p meshd-benches $(if $(ONLY),--bench $(ONLY))


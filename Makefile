# meshd — the two commands: `make demo` runs the main job, `make test` runs every test.
# Both bootstrap first (idempotent: a second run takes seconds).
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all bootstrap build demo test lint bench

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

test: bootstrap
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

# `make bench` runs every group; `make bench ONLY=netlink` runs one
# (policy, mesh, gossip_sim, netlink, convergence, dns, socklb).
bench: bootstrap
	$(CARGO) build --release --workspace --bins
	$(CARGO) bench -p meshd-benches $(if $(ONLY),--bench $(ONLY))


#!/usr/bin/env bash
# Idempotent bootstrap for meshd: Debian packages, nightly rust-src, bpf-linker
# against Debian's LLVM 22, cargo-fuzz. A second run only checks and returns in seconds.
set -euo pipefail

APT_PACKAGES=(
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  iproute2 bridge-utils iputils-ping procps psmisc util-linux bpftool
  iperf3 wrk dnsutils dnsperf curl netcat-openbsd socat python3
  haproxy dnsmasq nftables mariadb-server mariadb-client
  # #6's ingress tests and bench: trafgen (packet rates) and ethtool (GRO on veths).
  netsniff-ng ethtool
)
# nginx's stream module: the proxy benchmark's second peer beside HAProxy (`make bench ONLY=mesh`).
APT_PACKAGES+=(nginx libnginx-mod-stream)
BPF_LINKER_VERSION=0.13
CARGO_FUZZ_VERSION=0.13

log() { printf '[bootstrap] %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: must run as root (it installs Debian packages); re-run with sudo" >&2
    exit 1
  fi
}

missing_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  echo "${missing[@]:-}"
}

install_packages() {
  local missing
  missing=$(missing_packages)
  if [ -z "$missing" ]; then
    log "Debian packages present"
    return
  fi
  need_root
  log "installing Debian packages: $missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  # The packaged services must not run on the host: tests start their own.
  for svc in haproxy dnsmasq mariadb; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
  systemctl disable --now nginx >/dev/null 2>&1 || true
}

install_rust_src() {
  if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing nightly toolchain"
    rustup toolchain install nightly --profile minimal
  fi
  if rustup +nightly component list --installed 2>/dev/null | grep -q '^rust-src'; then
    log "nightly rust-src present"
  else
    log "adding rust-src to nightly"
    rustup component add rust-src --toolchain nightly
  fi
}

install_bpf_linker() {
  if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version 2>/dev/null | grep -q " ${BPF_LINKER_VERSION}\."; then
    log "bpf-linker $(bpf-linker --version | awk '{print $2}') present"
    return
  fi
  log "building bpf-linker ${BPF_LINKER_VERSION} against LLVM 22 (about 5 minutes)"
  local llvm_bin llvm_prefix llvm_lib
  llvm_bin=$(llvm-config-22 --bindir)
  llvm_prefix=$(llvm-config-22 --prefix)
  llvm_lib=$(llvm-config-22 --libdir)
  PATH="$llvm_bin:$PATH" LLVM_PREFIX="$llvm_prefix" RUSTFLAGS="-L $llvm_lib" \
    cargo install bpf-linker --locked --version "~${BPF_LINKER_VERSION}" \
      --no-default-features --features llvm-22
}

# cargo-fuzz drives the DNS fuzz targets in fuzz/ (`make test` runs them, bounded).
install_cargo_fuzz() {
  if cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz ${CARGO_FUZZ_VERSION}\."; then
    log "cargo-fuzz $(cargo fuzz --version | awk '{print $2}') present"
    return
  fi
  log "installing cargo-fuzz ${CARGO_FUZZ_VERSION} (about a minute)"
  cargo install cargo-fuzz --locked --version "~${CARGO_FUZZ_VERSION}"
}

install_packages
install_rust_src
install_bpf_linker
install_cargo_fuzz
log "done"

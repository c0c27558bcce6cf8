//! Compiles the kernel programs (`meshd-ebpf`, nightly, bpfel-unknown-none) and leaves
//! the object in `OUT_DIR` for `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("dataplane has no parent directory"))?
        .join("ebpf");
    let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    let package = aya_build::Package { name: "meshd-ebpf", root_dir, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .context("building the kernel programs; run `make bootstrap` if bpf-linker or rust-src is missing")
}

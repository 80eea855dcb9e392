//! Builds the eBPF object (crate `gateway-ebpf`) with the nightly toolchain so that the
//! `chaperone` binary can embed it. `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?
        .join("gateway-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed={root_dir}/common/src");
    aya_build::build_ebpf(
        [aya_build::Package { name: "gateway-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install rust-src for the nightly toolchain and bpf-linker")
}

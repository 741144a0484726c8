//! Builds the XDP programs of `lb-ebpf` with aya-build (aya-template layout).
//! The eBPF crate is built by the pinned toolchain (rust-toolchain.toml),
//! whose LLVM matches bpf-linker's; `core` comes from rust-src (build-std).
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf");
    // SAFETY of intent: build scripts are single-threaded; this only reaches
    // the child cargo that aya-build spawns for the bpfel target.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let toolchain = std::env::var("MQLB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "1.95.0".into());
    println!("cargo:rerun-if-env-changed=MQLB_EBPF_TOOLCHAIN");
    let root_dir = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(Box::leak(toolchain.into_boxed_str())),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` (rust-src, bpf-linker)")
}

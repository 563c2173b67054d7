//! Builds the eBPF object (`hb-ebpf`, for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker) so `main.rs` can embed it: the `hb`
//! binary is the whole deliverable.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "hb-ebpf")
        .ok_or_else(|| anyhow!("hb-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?;
    // Link (= generate code, bpf-linker runs LLVM) for BPF ISA v3, not the
    // `generic` CPU rustc asks for: see hb-ebpf/bpf-linker-v3. The child
    // cargo that aya-build spawns inherits this environment.
    // SAFETY: a build script is single-threaded here.
    unsafe {
        std::env::set_var(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER",
            root_dir.join("bpf-linker-v3"),
        )
    };
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], Toolchain::default())
}

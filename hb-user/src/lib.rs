//! The `hb` binary's library: everything but argument parsing lives here so
//! the integration tests and benchmarks can call it.

/// The eBPF object built by `build.rs`, embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hb"));

//! The `hb` binary's library: everything but argument dispatch lives here
//! so integration tests and benchmarks call the same code.

pub mod controller;
pub mod dataplane;
pub mod detector;
pub mod dirlock;
pub mod eval;
pub mod keys;
pub mod logging;
pub mod monitor;
pub mod nodes;
pub mod output;
pub mod send;
pub mod simulate;
#[cfg(test)]
mod test_log;

/// The eBPF object built by `build.rs` from `hb-ebpf`, embedded in the
/// binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hb"));

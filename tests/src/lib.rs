//! Support for hb's integration tests: namespaces and veth pairs as RAII
//! guards. Tests need root, BPF and namespaces; CI runs them all.

pub mod bench;
pub mod drive;
pub mod frames;
pub mod netns;

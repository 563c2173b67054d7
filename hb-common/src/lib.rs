//! The hb wire protocol (version 1) and the kernel map layouts.
//!
//! This crate is the single definition of everything that crosses a
//! boundary: the 48-byte datagram of `PROTOCOL.md`, the SipHash-2-4 tag, the
//! RFC 4303 anti-replay window, the names of the gate's results, and the
//! `#[repr(C)]` values stored in the XDP program's maps. It is `no_std` and
//! allocation-free so the XDP program, the userspace monitor (native and
//! userspace modes), the sender, the tests and the benchmarks all run the
//! very same code.
//!
//! The `user` feature adds `aya::Pod` impls for the map values.
#![no_std]

pub mod gate;
pub mod maps;
pub mod proto;
pub mod replay;
pub mod siphash;

pub use gate::GateResult;
pub use proto::{Datagram, Kind, NodeKey};

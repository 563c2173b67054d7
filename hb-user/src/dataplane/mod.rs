//! Where heartbeats are gated. Two implementations of one interface:
//!
//! - [`xdp`]: the XDP program (native or skb mode), state in kernel maps.
//! - [`mem`]: the same gate (`hb-common`) over an in-memory table, fed by
//!   a UDP socket in `--mode userspace` (hosts without XDP, and the honest
//!   baseline of the benchmarks), and by tests and simulations directly.
//!
//! The monitor owns slot assignment: it gives every provisioned node a
//! slot (`NodeKeys::slot`) and keeps its own per-slot tables parallel to
//! the dataplane's, so a tick is a linear scan.

pub mod index;
pub mod mem;
mod netlink;
pub mod xdp;

use std::ops::Range;

use hb_common::maps::{Config, MAX_NODES, NodeKeys, NodeLive, NodeState, Report, counter};

/// Per-result and extra counters, indexed like `maps::COUNTERS`
/// (`GateResult::index`, `maps::counter::*`), summed over CPUs.
pub type Counters = [u64; counter::LEN as usize];

/// Asks the CPU for the cache line at `p` ahead of its use: the tick's scan
/// does too much per node for the out-of-order core to start the next
/// node's load on its own (at a million nodes over the kernel maps the
/// tick spent 19 of 26 ms waiting for that load; `bench_monitor`). A hint
/// only: any address is fine.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and has no effect on memory.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Says that a key rotation revoked the key of `node_id`'s newest
/// accepted heartbeat (dropped its epoch, or replaced its secret), so its
/// generation and anti-replay window start afresh
/// (`hb_common::maps::rekey`).
pub(crate) fn log_revoked(node_id: u32) {
    tracing::info!(
        node = node_id,
        "the key of the node's last accepted heartbeat is no longer held (its epoch dropped, or \
         its secret replaced): its generation and replay window start afresh, and its next \
         heartbeat under a held key is announced restarted (a leaked key cannot hold a node \
         stale past its revocation)"
    );
}

/// How many nodes ahead the tick's scan prefetches live lines.
pub(crate) const PREFETCH_AHEAD: usize = 8;

/// What [`Dataplane::read_live`] calls per slot: the slot, line 1 of its
/// state, and a way to read the whole state.
pub type LiveFn<'a> = dyn FnMut(u32, &NodeLive, &dyn Fn() -> NodeState) + 'a;

/// A gate the monitor can drive.
pub trait Dataplane: Send + Sync {
    /// Provisions `node_id` (or replaces its keys) at slot `keys.slot`.
    /// Replacing keys keeps the node's state: that is how keys rotate; but
    /// keys that no longer hold the epoch of the node's newest accepted
    /// datagram start its generation and window afresh
    /// (`hb_common::maps::rekey`).
    fn upsert_node(&self, node_id: u32, keys: &NodeKeys) -> anyhow::Result<()>;

    /// Unprovisions `node_id` and clears the state at its slot.
    fn remove_node(&self, node_id: u32) -> anyhow::Result<()>;

    /// Every provisioned node with its keys and slot. Used once at start to
    /// adopt state that survived a monitor restart (pinned maps).
    fn provisioned(&self) -> anyhow::Result<Vec<(u32, NodeKeys)>>;

    /// Calls `f(slot, state)` with a consistent copy of each slot's state
    /// in `slots`, in order. Never one syscall per node.
    fn read_states(&self, slots: Range<u32>, f: &mut dyn FnMut(u32, &NodeState));

    /// The tick's scan: calls `f(slot, live, full)` with a consistent copy
    /// of line 1 of each slot's state (`NodeLive`: all the detector reads)
    /// in `slots`, in order; `full()` reads that slot's whole state, for
    /// the few nodes that need it. One cache line per node instead of
    /// three: at a million nodes the scan is bound by memory.
    fn read_live(&self, slots: Range<u32>, f: &mut LiveFn);

    /// Sets the interval the monitor asks the node at `slot` to use (0 = no
    /// opinion); the gate puts it into ACKs.
    fn set_requested_interval(&self, slot: u32, interval_ms: u32);

    /// Records in the node's state at `slot` the status the monitor gave
    /// it (`monitor::state::Status as u32`, 0: none) and since when
    /// (CLOCK_MONOTONIC ns), for the next monitor over the same state
    /// (pinned maps) to go on from. Userspace's alone: the gate neither
    /// reads nor writes it. A free slot ignores it.
    fn set_monitor_status(&self, slot: u32, status: u32, since_ns: u64);

    /// Counters summed over CPUs.
    fn counters(&self) -> anyhow::Result<Counters>;

    /// Replaces the gate's configuration (port, ACK policy, report limit).
    fn set_config(&self, cfg: &Config) -> anyhow::Result<()>;

    /// Replaces the addresses the gate takes heartbeats at
    /// ([`hb_common::maps::LocalAddrs`]). A gate that only sees datagrams
    /// to local addresses anyway (a socket's) has nothing to do.
    fn set_local_addrs(&self, _addrs: &hb_common::maps::LocalAddrs) -> anyhow::Result<()> {
        Ok(())
    }

    /// Takes the receiver of the gate's reports (unknown node, restart).
    /// Returns `None` after the first call.
    fn take_reports(&mut self) -> Option<tokio::sync::mpsc::Receiver<Report>>;

    /// Node slots: slots run from 0 to this, exclusive.
    fn capacity(&self) -> u32 {
        MAX_NODES
    }

    /// Attaches the gate where it was opened for (the XDP dataplane's
    /// interfaces; nothing to do for a socket's): the last step of a
    /// start, once nothing else of it can fail, so that a start that fails
    /// leaves the interfaces as they were. Once only.
    fn attach(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// The interfaces the gate is attached to, and how (`native`, `skb`,
    /// `kept`): what a start got, which `--mode` only asked for.
    fn attached(&self) -> Vec<(String, &'static str)> {
        Vec::new()
    }

    /// Whether the gate still sits where it was attached; why not if it
    /// does not (an interface deleted, or deleted and created again: the
    /// kernel detaches a program from an interface that goes away; or the
    /// gate detached from it, or replaced, under the monitor).
    fn check_attached(&self) -> Result<(), String> {
        Ok(())
    }

    /// Whether the gate ran at some time in `(from_ns, to_ns)`
    /// (CLOCK_MONOTONIC), if this dataplane can tell better than the
    /// arrivals it stamped: the monitor's paused-host excuse asks it after
    /// a long gap between ticks. `None`: judge by the stamps.
    fn gate_ran_between(&self, _from_ns: u64, _to_ns: u64) -> Option<bool> {
        None
    }

    /// The caller's start succeeded: what the dataplane's open made (pins)
    /// stays when it is dropped (see `XdpOptions::undo_until_started`).
    fn started(&self) {}

    /// Reads of a node's state given up on so far because the node stayed
    /// held for writing (a writer that died holding it: released at the
    /// next start); such a node keeps its status meanwhile.
    fn stuck_reads(&self) -> u64 {
        0
    }
}

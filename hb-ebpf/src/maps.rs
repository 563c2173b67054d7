//! The gate's maps. Names, sizes and value layouts are defined once, in
//! `hb_common::maps`; the statics below are named exactly like
//! `hb_common::maps::names` (checked at compile time) because the symbol
//! name is the map's name in the object.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use hb_common::maps::{
    CONFIG_LEN, Config, EVENTS_BYTES, LIMITS_LEN, LocalAddrs, MAX_NODES, NodeLive, NodeRest,
    RateLimit, counter, index, names,
};

/// The node index: node id -> slot (`hb_common::maps::index`). Written by
/// userspace only, through its mapping.
#[map]
pub static HB_NODE_INDEX: Array<index::Bucket> =
    Array::with_max_entries(1 + index::buckets_for(MAX_NODES), BPF_F_MMAPABLE);

/// Line 0 of each node's state (`hb_common::maps::NodeState`), at the slot
/// the index gives: the seqcount and what the detector reads. Mmap-able so
/// userspace reads every node under its seqcount without a syscall per
/// node, streaming through this dense array.
#[map]
pub static HB_NODE_LIVE: Array<NodeLive> = Array::with_max_entries(MAX_NODES, BPF_F_MMAPABLE);

/// Lines 1 and 2 of each node's state: id, keys, anti-replay window,
/// counters. Mmap-able, at the same slot.
#[map]
pub static HB_NODE_REST: Array<NodeRest> = Array::with_max_entries(MAX_NODES, BPF_F_MMAPABLE);

/// Per-CPU counters: `GateResult::index()` and `counter::*`.
#[map]
pub static HB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// One `Config`; missing or port 0 means "pass everything".
#[map]
pub static HB_CONFIG: Array<Config> = Array::with_max_entries(CONFIG_LEN, 0);

/// The host's addresses: heartbeats to others are not ours (one value;
/// all zero, as created, takes any address).
#[map]
pub static HB_LOCAL_ADDRS: Array<LocalAddrs> = Array::with_max_entries(1, 0);

/// Reports to userspace (unknown node, restart).
#[map]
pub static HB_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Per-CPU token buckets of the report rate limit.
#[map]
pub static HB_LIMITS: PerCpuArray<RateLimit> = PerCpuArray::with_max_entries(LIMITS_LEN, 0);

/// `HB_LIMITS` index of the unknown-node bucket (its reports drive
/// enrollment: nothing else may spend it).
pub const LIMIT_UNKNOWN: u32 = 0;
/// `HB_LIMITS` index of the bucket of reports about provisioned nodes:
/// restarts, bad epochs (a bad-epoch flood, which anyone can send, only
/// limits restart reports, which are logged at debug level).
pub const LIMIT_PROVISIONED: u32 = 1;
const _: () = assert!(LIMIT_UNKNOWN < LIMITS_LEN && LIMIT_PROVISIONED < LIMITS_LEN);

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// The statics above must carry the names userspace looks up.
const _: () = assert!(same(names::NODE_INDEX, "HB_NODE_INDEX"));
const _: () = assert!(same(names::NODE_LIVE, "HB_NODE_LIVE"));
const _: () = assert!(same(names::NODE_REST, "HB_NODE_REST"));
const _: () = assert!(same(names::COUNTERS, "HB_COUNTERS"));
const _: () = assert!(same(names::CONFIG, "HB_CONFIG"));
const _: () = assert!(same(names::EVENTS, "HB_EVENTS"));
const _: () = assert!(same(names::LIMITS, "HB_LIMITS"));
const _: () = assert!(same(names::LOCAL_ADDRS, "HB_LOCAL_ADDRS"));
const _: () = assert!(same(names::PROGRAM, "hb_xdp"));
const _: () = assert!(same(names::PASS, "hb_pass"));
const _: () = assert!(same(names::FLOOR, "hb_floor"));

/// Where `node_id` is (gate step 6).
#[inline(always)]
pub fn slot_of(node_id: u32) -> index::Lookup {
    index::lookup(node_id, |i| HB_NODE_INDEX.get(i))
}

/// Adds one to the per-CPU counter `idx`.
#[inline(always)]
pub fn count(idx: u32) {
    if let Some(c) = HB_COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, XDP runs with preemption disabled.
        unsafe { *c += 1 };
    }
}

//! The XDP program's maps: names, sizes and value layouts, shared by the
//! kernel and userspace (one definition, `#[repr(C)]`).
//!
//! Per node the kernel keeps a [`NodeState`] of three cache lines, in two
//! mmap-able arrays at the node's slot: its line 0 ([`NodeLive`], in
//! [`names::NODE_LIVE`]) holds the seqcount and what the detector reads,
//! its lines 1 and 2 ([`NodeRest`], in [`names::NODE_REST`]) the node's id
//! and keys (for up to two epochs), its anti-replay window and its
//! counters. The node id leads to the slot through [`index`], a bucketed
//! cuckoo hash table in the mmap-able array [`names::NODE_INDEX`] that
//! userspace maintains and the kernel only reads: one cache line per
//! lookup. A heartbeat thus touches three cache lines (index, live, and
//! the rest's first line); the monitor's tick streams through the live
//! array alone.
//!
//! Why not a BPF hash map from node id to slot and keys (the first
//! design): with a million slots, its buckets and elements are spread over
//! 130 MB, and a heartbeat touched five cache lines in three places
//! (bucket, element, state). On a veth with 10,000 nodes that cost 327 ns
//! per heartbeat against 128 ns for 100 nodes (`bench_e2e`, bpf_stats);
//! with the index (grown with the fleet, not sized by the capacity) and
//! the keys in the state, 164 ns.
//!
//! The kernel writes a node under its `seqcount` (odd while a write is in
//! progress), so userspace reads a consistent copy straight from the
//! mappings without a syscall per node. Userspace writes the id and keys
//! (provisioning, rotation) under the same protocol and also moves
//! `keys_seq`, which the kernel checks around its lock-free read of a key;
//! it writes `requested_interval_ms`, `monitor_status` and
//! `monitor_status_since_ns` with plain atomic stores. The kernel
//! adds to `bad_tag` atomically without the lock, so a flood of forged
//! datagrams never contends with a node's real heartbeats.
//!
//! [`admit`] and [`record`] are gate steps 9 to 11: the kernel and the
//! userspace gate run this same code.

use crate::{
    gate::GateResult,
    proto::{Datagram, FLAG_LEAVING, NodeKey},
    replay::{Fresh, Window},
};

/// Names of the program and maps in the eBPF object (at most 15 bytes:
/// the kernel's object-name limit). Userspace looks everything up by these.
pub mod names {
    pub const PROGRAM: &str = "hb_xdp";
    /// Returns XDP_PASS at once: attached to a peer veth so that frames
    /// the gate sends with XDP_TX arrive (veth needs an XDP program on the
    /// receiving end), in tests and the demo.
    pub const PASS: &str = "hb_pass";
    /// Returns XDP_DROP at once: the benchmark's floor.
    pub const FLOOR: &str = "hb_floor";
    pub const NODE_INDEX: &str = "HB_NODE_INDEX";
    /// Line 0 of every node's state ([`super::NodeLive`]), dense: what
    /// the monitor's tick streams through.
    pub const NODE_LIVE: &str = "HB_NODE_LIVE";
    /// Lines 1 and 2 of every node's state ([`super::NodeRest`]).
    pub const NODE_REST: &str = "HB_NODE_REST";
    pub const COUNTERS: &str = "HB_COUNTERS";
    pub const CONFIG: &str = "HB_CONFIG";
    pub const EVENTS: &str = "HB_EVENTS";
    pub const LIMITS: &str = "HB_LIMITS";
    /// The host's addresses ([`super::LocalAddrs`], one value).
    pub const LOCAL_ADDRS: &str = "HB_LOCAL_ADDRS";
}

/// Entries of [`names::CONFIG`] (one [`Config`]).
pub const CONFIG_LEN: u32 = 1;
/// Entries of [`names::LIMITS`]: the report buckets (unknown nodes; reports
/// about provisioned nodes).
pub const LIMITS_LEN: u32 = 2;

/// Largest capacity of the node maps (provisioned nodes, state slots),
/// and the capacity the eBPF object declares; userspace loads the maps with
/// the capacity it needs (`hb monitor --capacity`).
pub const MAX_NODES: u32 = 1 << 20;
/// Size of the report ring buffer in bytes (a power of two, page multiple).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Counter indices past the gate results (which use `GateResult::index`).
pub mod counter {
    /// ACKs sent back with XDP_TX.
    pub const ACK_SENT: u32 = 11;
    /// Reports (unknown node, restart) lost because the ring buffer was full.
    pub const REPORT_DROPPED: u32 = 12;
    /// Reports suppressed by the in-kernel rate limit.
    pub const REPORT_LIMITED: u32 = 13;
    /// Datagrams the gate gave up on because someone else kept the data it
    /// needed busy, each also counted under a gate result (see the XDP
    /// program): the node's state locked by another CPU for too long
    /// (`replay`), its keys being rewritten by userspace (`bad_epoch`), or
    /// the node index's entries being moved by userspace during the search
    /// (`unknown_node`, without a report). Rare in all three cases; a
    /// steady count means duplicated traffic or a provisioning storm.
    pub const CONTENDED: u32 = 14;
    /// Length of the per-CPU counter array.
    pub const LEN: u32 = 16;

    /// Names of the extra counters, for metrics.
    pub const EXTRA: [(u32, &str); 4] = [
        (ACK_SENT, "ack_sent"),
        (REPORT_DROPPED, "report_dropped"),
        (REPORT_LIMITED, "report_limited"),
        (CONTENDED, "contended"),
    ];
}

/// A provisioned node as userspace hands it to a dataplane: the node's
/// slot and its keys for up to two epochs. The kernel keeps the keys in
/// the node's [`NodeState`] (`NodeState::set_keys`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeKeys {
    /// Index of the node's [`NodeState`] in [`names::NODE_STATE`].
    pub slot: u32,
    /// Epoch of `key[i]`.
    pub epoch: [u8; 2],
    /// Bit `i` set: `key[i]` is held.
    pub valid: u8,
    pub _pad: u8,
    pub key: [NodeKey; 2],
}

impl NodeKeys {
    /// Whether a key is held for `epoch`.
    pub const fn holds(&self, epoch: u8) -> bool {
        (self.valid & 1 != 0 && self.epoch[0] == epoch)
            || (self.valid & 2 != 0 && self.epoch[1] == epoch)
    }

    /// A node at `slot` holding one key, `key` for `epoch`.
    pub const fn single(slot: u32, epoch: u8, key: NodeKey) -> NodeKeys {
        NodeKeys {
            slot,
            epoch: [epoch, 0],
            valid: 1,
            _pad: 0,
            key: [key, NodeKey { k0: 0, k1: 0 }],
        }
    }

    /// The key held for `epoch`, if any (gate step 7).
    #[inline(always)]
    pub const fn find(&self, epoch: u8) -> Option<&NodeKey> {
        if self.valid & 1 != 0 && self.epoch[0] == epoch {
            Some(&self.key[0])
        } else if self.valid & 2 != 0 && self.epoch[1] == epoch {
            Some(&self.key[1])
        } else {
            None
        }
    }
}

/// The node index ([`names::NODE_INDEX`]): node id -> slot.
///
/// An array of [`Bucket`]s, one cache line each. Bucket 0 is the header:
/// its first word holds the bucket mask (low 32 bits) and a sequence
/// number (high 32 bits), its second the index's seed ([`SEED`]), drawn
/// at random when the index is created and never changed after. Buckets
/// `1 ..= mask + 1` hold entries: a node id may sit in either of its two
/// buckets ([`buckets`], keyed by the seed), in any of the eight entries.
/// An entry is `node_id | slot << 32`; 0 is empty (node id 0 is never
/// valid).
///
/// Userspace is the only writer and keeps the load at or below one half
/// (`hb_user::dataplane::index`). It puts a node in its first bucket
/// unless that is full, so about 99% of lookups read one cache line; when
/// both buckets are full it moves entries to their other bucket (cuckoo
/// hashing), each move writing the new entry before clearing the old,
/// with the sequence number odd for the whole chain. A kernel lookup that
/// misses while the sequence number is odd or changed looks again
/// ([`lookup`]).
pub mod index {
    /// Entries per bucket: 8 x 8 bytes, one cache line.
    pub const ENTRIES: usize = 8;

    /// One bucket of [`super::names::NODE_INDEX`].
    #[repr(C, align(64))]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Bucket(pub [u64; ENTRIES]);

    /// Buckets (besides the header) for a capacity of `nodes`: entries
    /// for twice as many nodes, a power of two.
    pub const fn buckets_for(nodes: u32) -> u32 {
        let want = (nodes as u64 * 2).div_ceil(ENTRIES as u64);
        let mut b = 1u64;
        while b < want {
            b <<= 1;
        }
        b as u32
    }

    /// The header word (word 0 of bucket 0): `mask | seq << 32`.
    pub const fn header(mask: u32, seq: u32) -> u64 {
        mask as u64 | (seq as u64) << 32
    }

    /// The word of bucket 0 that holds the seed of [`buckets`]. Userspace
    /// draws it from the OS's random number generator when it creates the
    /// index, before it writes the header word, and keeps it when it
    /// adopts a pinned index and when the table doubles. An index created
    /// before there was a seed has 0 here, which is the unkeyed hash those
    /// versions used: it keeps working (unkeyed).
    pub const SEED: usize = 1;

    /// An entry.
    pub const fn entry(node_id: u32, slot: u32) -> u64 {
        node_id as u64 | (slot as u64) << 32
    }

    /// The node id of an entry (0: empty).
    pub const fn entry_id(e: u64) -> u32 {
        e as u32
    }

    /// The slot of an entry.
    pub const fn entry_slot(e: u64) -> u32 {
        (e >> 32) as u32
    }

    /// The two buckets (map indices, header excluded) of `node_id` under
    /// `mask` and `seed`: the low and high halves of SplitMix64's
    /// finalizer of the id, which mixes every input bit into every output
    /// bit, so ids in any pattern (sequential, strided, random) spread like
    /// random ones. (A plain multiplicative hash left three quarters of the
    /// buckets empty for sequential ids: bits 32 and up of `id * C` for a
    /// 32-bit id repeat with the id's low bits.) They may coincide.
    ///
    /// The seed keys it: it goes into the input and again after the first
    /// multiplication, so which ids share buckets depends on a secret. An
    /// unkeyed hash let anyone who can get ids provisioned (enrollment)
    /// pick sixteen ids whose two buckets are both a target's two buckets,
    /// fill them with entries no move can place elsewhere and so keep the
    /// target out of the index. Not a cryptographic hash: what it resists
    /// is an attacker who never sees where ids land. Seed 0 is the unkeyed
    /// hash of older versions, so their indexes stay readable.
    #[inline(always)]
    pub const fn buckets(node_id: u32, mask: u32, seed: u64) -> (u32, u32) {
        let mut z = (node_id as u64 ^ seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ seed.rotate_left(32);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (1 + (z as u32 & mask), 1 + ((z >> 32) as u32 & mask))
    }

    /// The slot of `node_id` in `b`, if it is there.
    #[inline(always)]
    pub fn find_in(b: &Bucket, node_id: u32) -> Option<u32> {
        let mut i = 0;
        while i < ENTRIES {
            // One 64-bit load per entry: id and slot from the same write.
            // SAFETY: in bounds of `b`; volatile, userspace writes it.
            let e = unsafe { core::ptr::read_volatile(&b.0[i]) };
            if entry_id(e) == node_id {
                return Some(entry_slot(e));
            }
            i += 1;
        }
        None
    }

    /// What [`lookup`] found.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Lookup {
        Found(u32),
        /// Not in the index (no move ran during the search).
        Absent,
        /// Missed while moves kept running (`TRIES` searches): the node may
        /// be provisioned. Rare: moves happen only when userspace inserts
        /// into two full buckets.
        Busy,
    }

    /// Looks `node_id` up, `bucket(i)` giving the index's buckets (the
    /// kernel's map lookup, or a slice in userspace). The sequence protocol
    /// of the module docs: a miss counts only if no move was in progress
    /// or completed during the search; `TRIES` searches at most.
    #[inline(always)]
    pub fn lookup<'a>(node_id: u32, bucket: impl Fn(u32) -> Option<&'a Bucket>) -> Lookup {
        const TRIES: u32 = 3;
        // Id 0 is never provisioned (PROTOCOL.md: "never 0") and marks an
        // empty entry: searched for, it would match the first free entry.
        if node_id == 0 {
            return Lookup::Absent;
        }
        let Some(header) = bucket(0) else {
            return Lookup::Absent;
        };
        let mut t = 0;
        while t < TRIES {
            // SAFETY: in bounds; volatile, userspace writes it.
            let h0 = unsafe { core::ptr::read_volatile(&header.0[0]) };
            // SAFETY: as above. Written before the header word and never
            // changed after: one more load of the line just read.
            let seed = unsafe { core::ptr::read_volatile(&header.0[SEED]) };
            let (b1, b2) = buckets(node_id, h0 as u32, seed);
            if let Some(slot) = bucket(b1).and_then(|b| find_in(b, node_id)) {
                return Lookup::Found(slot);
            }
            if let Some(slot) = bucket(b2).and_then(|b| find_in(b, node_id)) {
                return Lookup::Found(slot);
            }
            // SAFETY: as above.
            let h1 = unsafe { core::ptr::read_volatile(&header.0[0]) };
            if h0 == h1 && (h0 >> 32) & 1 == 0 {
                return Lookup::Absent;
            }
            t += 1;
        }
        Lookup::Busy
    }
}

/// `NodeState::flags` bit: the last accepted datagram had LEAVING set.
pub const NODE_LEAVING: u8 = 1;

/// `NodeState::flags` bit: the generation before the current one ended
/// with LEAVING (its last accepted datagram had it set): the node said
/// goodbye before it restarted. Set or cleared by each new generation's
/// first datagram, kept through the generation. A planned restart (SIGTERM,
/// then a new process within a tick) otherwise leaves no trace of the
/// goodbye once the new generation's first heartbeat has come.
pub const NODE_LEFT_BEFORE: u8 = 2;

/// [`NodeRest::accepted_epoch`] bit: its low byte is the key epoch of the
/// node's newest accepted datagram.
pub const ACCEPTED_EPOCH_KNOWN: u16 = 0x100;

/// EWMA gain of the inter-arrival mean: 1/2^5. Slower than RFC 6298's
/// 1/8, so one late heartbeat moves the mean by under 1% (its error is
/// also clipped, [`IA_CLIP_SHIFT`]). Chosen by `hb eval` (see
/// `hb::detector`, "Defaults").
pub const IA_MEAN_SHIFT: u32 = 5;
/// EWMA gain of the inter-arrival mean deviation: 1/2^5. Much slower than
/// RFC 6298's 1/4 so one late heartbeat or stall does not inflate sigma
/// past the detector's floor for the next beats. Chosen by `hb eval` (see
/// `hb::detector`, "Defaults").
pub const IA_DEV_SHIFT: u32 = 5;
/// An inter-arrival sample's error enters the EWMAs clipped to `+-mean /
/// 2^IA_CLIP_SHIFT` (a quarter of the interval): jitter moves the moments,
/// a stall of the sender does not drag the mean up or blow sigma up (it
/// goes to [`NodeState::stall`] instead). Chosen by `hb eval`.
pub const IA_CLIP_SHIFT: u32 = 2;
/// [`NodeState::stall`] is in units of `2^STALL_UNIT_SHIFT` ns (~1 us), so
/// a u32 holds 73 minutes without a division in the kernel.
pub const STALL_UNIT_SHIFT: u32 = 10;
/// Each inter-arrival sample decays the stall memory by `1/2^16`: a stall
/// is remembered for a long time (halved after ~45,000 samples, 12.6 hours
/// of 1 s heartbeats), because a node's pauses come from its heap, its
/// workload and its host, which do not change from hour to hour. Chosen
/// by `hb eval` (the `gc-pause` scenario; see `hb::detector`).
pub const STALL_DECAY_SHIFT: u32 = 16;

/// What the gate knows of one node: 192 bytes, three cache lines. The
/// kernel keeps them in two arrays indexed by the node's slot, so that the
/// monitor's tick, which reads line 0 of every node on every tick, streams
/// through one dense array:
/// - line 0 ([`NodeLive`], [`names::NODE_LIVE`]): `seqcount` and
///   everything an accepted heartbeat updates and the detector reads;
/// - lines 1 and 2 ([`NodeRest`], [`names::NODE_REST`]): the node's id and
///   keys and its anti-replay window (what every datagram of the node
///   needs), then losses, rejections, the requested interval and what
///   changes rarely.
///
/// `NodeState` is the two side by side, field for field ([`Self::live`],
/// [`Self::rest`]): what userspace reads of a node as a whole, and what
/// the userspace gate and the simulations keep.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeState {
    // ---- line 0: the detector's view (`NodeLive`) ----
    /// Even: stable. Odd: someone (kernel or userspace) is writing this
    /// node, any of its lines.
    pub seqcount: u32,
    /// Current generation (incarnation) of the node.
    pub generation: u32,
    /// Arrival of the last accepted datagram, CLOCK_MONOTONIC ns.
    pub last_arrival_ns: u64,
    /// Accepted datagrams, all generations.
    pub accepted: u64,
    /// EWMA of the inter-arrival time, ns.
    pub ia_mean_ns: u64,
    /// EWMA of the inter-arrival mean absolute deviation, ns
    /// (Jacobson/Karels, as TCP's RTTVAR; about 0.8 sigma for normal
    /// jitter).
    pub ia_dev_ns: u64,
    /// The node's two most recent stalls, newest first: inter-arrival
    /// samples (consecutive sequence numbers, so no heartbeat was lost)
    /// longer than the mean by over a quarter of it, as their excess over
    /// the mean, in units of `2^STALL_UNIT_SHIFT` ns. Both decay by
    /// `1/2^STALL_DECAY_SHIFT` per sample. What the detector tolerates of
    /// a node's own pauses (GC, VM migration, CPU starvation): see
    /// `hb::detector`.
    pub stall: [u32; 2],
    /// Heartbeat interval the node reports using, ms.
    pub interval_ms: u32,
    /// Smoothed RTT the node reports, us (0 = unknown).
    pub rtt_us: u32,
    /// Load the node reports, permille.
    pub load: u16,
    /// Inter-arrival samples since the generation or interval changed
    /// (saturating).
    pub ia_samples: u16,
    /// `NODE_LEAVING`, `NODE_LEFT_BEFORE`.
    pub flags: u8,
    pub _pad1: [u8; 3],
    // ---- line 1: the gate (`NodeRest`) ----
    /// Odd while userspace rewrites `node_id`, `key_epoch`, `key_valid`
    /// or `key`; the kernel reads a key without the lock, between two
    /// equal even values.
    pub keys_seq: u32,
    /// The node at this slot; 0 = free.
    pub node_id: u32,
    /// Epoch of `key[i]`.
    pub key_epoch: [u8; 2],
    /// Bit `i` set: `key[i]` is held.
    pub key_valid: u8,
    pub _pad0: u8,
    /// `ACCEPTED_EPOCH_KNOWN | e`: the key epoch `e` of the newest
    /// accepted datagram, which may have moved `generation` and the
    /// anti-replay window; 0: none recorded (a fresh node, or a state
    /// pinned by an hb that had these bytes reserved). When a key
    /// rotation drops that epoch, the generation and the window go with
    /// it, and so when the rotation replaces that epoch's key
    /// ([`NodeState::rekey`]): a leaked key cannot hold the node down after
    /// it is revoked.
    pub accepted_epoch: u16,
    pub _pad2: [u8; 2],
    pub key: [NodeKey; 2],
    pub max_seq: u64,
    pub replay_bitmap: u64,
    // ---- line 2: losses, rejections, rare events ----
    /// Sequence numbers skipped (heartbeats lost), net of late arrivals.
    pub lost: u64,
    /// Arrival of the first datagram of the current generation, ns.
    pub gen_start_ns: u64,
    /// Interval the monitor asks the node to use, ms (0 = no opinion).
    /// Written by userspace only; the kernel reads it when it considers
    /// an ACK.
    pub requested_interval_ms: u32,
    /// Datagrams whose tag did not verify (added to atomically).
    pub bad_tag: u32,
    pub replay: u32,
    pub stale: u32,
    /// Generation increases seen after the first.
    pub restarts: u32,
    pub acks_sent: u32,
    /// The request and the reported interval the node's current run of
    /// change ACKs answers (`change_requested_ms` 0: none), and how many
    /// of its heartbeats that run has seen: written by the kernel under
    /// the seqcount, in [`ack_interval`] (zero in a state pinned by an
    /// older version: a fresh run).
    pub change_requested_ms: u32,
    pub change_reported_ms: u32,
    pub change_heartbeats: u32,
    /// The status the monitor last gave the node, and since when
    /// (CLOCK_MONOTONIC ns), so that a monitor restarted over the pinned
    /// maps goes on from it (`hb::monitor::state::adopt`) instead of
    /// believing every node alive. The low byte is the status, as
    /// `hb::monitor::state::Status` numbers it (1 alive, 2 suspect, 3
    /// dead, 4 left), never renumbered; 0 is "not recorded": never heard
    /// from, or a state pinned by an hb that had these fields reserved
    /// (zero). Bit 8 (`hb::monitor::state::UNCONFIRMED`) marks a status
    /// whose event's line is not written to `--events` (not yet, or
    /// never: dropped, or no `--events`): the tick records every change
    /// with it, with the node's last confirmed status in bits 16 to 23 (0:
    /// none; `hb::monitor::state::LAST_CONFIRMED_SHIFT`), carried over
    /// from the record it replaces, and writes the status alone (mark and
    /// bits 16 to 23 clear) once the line is written. A marked record
    /// counts as its last confirmed status, so that the change the
    /// previous monitor died holding (or dropped) is announced again; an
    /// hb that kept none (bits 16 to 23 zero) left it counting as none
    /// recorded. Bits 9 to 15 and 24 to 31 are zero, and so are 16 to 23
    /// without the mark; a value otherwise (a newer hb's) counts as none
    /// recorded too. Written by userspace only, with plain atomic
    /// stores, on every change of status and its confirmation; the kernel
    /// never reads or writes them ([`record`] and [`ack_interval`] leave
    /// them alone). Both clocks end with a reboot, as the pins do.
    pub monitor_status: u32,
    pub monitor_status_since_ns: u64,
}

/// Line 0 of a [`NodeState`], byte for byte: a value of
/// [`names::NODE_LIVE`], what the monitor's tick reads of every node on
/// every tick. The gate's detector-side logic lives here.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLive {
    pub seqcount: u32,
    pub generation: u32,
    pub last_arrival_ns: u64,
    pub accepted: u64,
    pub ia_mean_ns: u64,
    pub ia_dev_ns: u64,
    pub stall: [u32; 2],
    pub interval_ms: u32,
    pub rtt_us: u32,
    pub load: u16,
    pub ia_samples: u16,
    pub flags: u8,
    pub _pad1: [u8; 3],
}

/// Lines 1 and 2 of a [`NodeState`], byte for byte: a value of
/// [`names::NODE_REST`].
#[repr(C, align(64))]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeRest {
    pub keys_seq: u32,
    pub node_id: u32,
    pub key_epoch: [u8; 2],
    pub key_valid: u8,
    pub _pad0: u8,
    pub accepted_epoch: u16,
    pub _pad2: [u8; 2],
    pub key: [NodeKey; 2],
    pub max_seq: u64,
    pub replay_bitmap: u64,
    pub lost: u64,
    pub gen_start_ns: u64,
    pub requested_interval_ms: u32,
    pub bad_tag: u32,
    pub replay: u32,
    pub stale: u32,
    pub restarts: u32,
    pub acks_sent: u32,
    pub change_requested_ms: u32,
    pub change_reported_ms: u32,
    pub change_heartbeats: u32,
    pub monitor_status: u32,
    pub monitor_status_since_ns: u64,
}

/// Byte offset of [`NodeRest`] in a [`NodeState`] ([`NodeLive`] is at 0).
pub const NODE_REST_OFFSET: usize = 64;

// `NodeState` is a `NodeLive` and a `NodeRest`, field for field: what makes
// `NodeState::live`, `rest` and `split_mut` sound.
macro_rules! same_offset {
    ($part:ty, $at:expr, $($f:ident),*) => {$(
        const _: () = assert!(
            core::mem::offset_of!(NodeState, $f) == $at + core::mem::offset_of!($part, $f)
        );
    )*};
}
same_offset!(
    NodeLive,
    0,
    seqcount,
    generation,
    last_arrival_ns,
    accepted,
    ia_mean_ns,
    ia_dev_ns,
    stall,
    interval_ms,
    rtt_us,
    load,
    ia_samples,
    flags,
    _pad1
);
same_offset!(
    NodeRest,
    NODE_REST_OFFSET,
    keys_seq,
    node_id,
    key_epoch,
    key_valid,
    _pad0,
    accepted_epoch,
    _pad2,
    key,
    max_seq,
    replay_bitmap,
    lost,
    gen_start_ns,
    requested_interval_ms,
    bad_tag,
    replay,
    stale,
    restarts,
    acks_sent,
    change_requested_ms,
    change_reported_ms,
    change_heartbeats,
    monitor_status,
    monitor_status_since_ns
);
const _: () = assert!(size_of::<NodeLive>() == 64 && align_of::<NodeLive>() == 64);
const _: () = assert!(size_of::<NodeRest>() == 128 && align_of::<NodeRest>() == 64);
const _: () = assert!(size_of::<NodeState>() == NODE_REST_OFFSET + size_of::<NodeRest>());

/// The detector reads line 0 of either (`hb::detector`).
impl AsRef<NodeLive> for NodeState {
    #[inline(always)]
    fn as_ref(&self) -> &NodeLive {
        self.live()
    }
}

impl AsRef<NodeLive> for NodeLive {
    #[inline(always)]
    fn as_ref(&self) -> &NodeLive {
        self
    }
}

#[inline(always)]
fn recurring_stall_ns(stall: &[u32; 2]) -> u64 {
    let s = if stall[0] < stall[1] {
        stall[0]
    } else {
        stall[1]
    };
    (s as u64) << STALL_UNIT_SHIFT
}

impl NodeLive {
    /// The smaller of the node's two most recent stalls, ns: a pause it
    /// has shown at least twice (0 until it has).
    #[inline(always)]
    pub fn recurring_stall_ns(&self) -> u64 {
        recurring_stall_ns(&self.stall)
    }

    /// Whether the last accepted datagram had LEAVING set.
    pub const fn leaving(&self) -> bool {
        self.flags & NODE_LEAVING != 0
    }

    /// Whether the generation before the current one ended with LEAVING
    /// ([`NODE_LEFT_BEFORE`]).
    pub const fn left_before(&self) -> bool {
        self.flags & NODE_LEFT_BEFORE != 0
    }
}

/// Key material stays out of logs and panic messages.
impl core::fmt::Debug for NodeRest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NodeRest")
            .field("keys_seq", &self.keys_seq)
            .field("node_id", &self.node_id)
            .field("key_epoch", &self.key_epoch)
            .field("key_valid", &self.key_valid)
            .field("accepted_epoch", &self.accepted_epoch)
            .field("max_seq", &self.max_seq)
            .field("replay_bitmap", &self.replay_bitmap)
            .field("lost", &self.lost)
            .field("bad_tag", &self.bad_tag)
            .finish_non_exhaustive()
    }
}

/// Key material stays out of logs and panic messages.
impl core::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NodeState")
            .field("keys_seq", &self.keys_seq)
            .field("node_id", &self.node_id)
            .field("key_epoch", &self.key_epoch)
            .field("key_valid", &self.key_valid)
            .field("accepted_epoch", &self.accepted_epoch)
            .field("max_seq", &self.max_seq)
            .field("replay_bitmap", &self.replay_bitmap)
            .field("seqcount", &self.seqcount)
            .field("generation", &self.generation)
            .field("last_arrival_ns", &self.last_arrival_ns)
            .field("accepted", &self.accepted)
            .field("ia_mean_ns", &self.ia_mean_ns)
            .field("ia_dev_ns", &self.ia_dev_ns)
            .field("stall", &self.stall)
            .field("interval_ms", &self.interval_ms)
            .field("rtt_us", &self.rtt_us)
            .field("load", &self.load)
            .field("ia_samples", &self.ia_samples)
            .field("flags", &self.flags)
            .field("lost", &self.lost)
            .field("gen_start_ns", &self.gen_start_ns)
            .field("requested_interval_ms", &self.requested_interval_ms)
            .field("bad_tag", &self.bad_tag)
            .field("replay", &self.replay)
            .field("stale", &self.stale)
            .field("restarts", &self.restarts)
            .field("acks_sent", &self.acks_sent)
            .field("monitor_status", &self.monitor_status)
            .field("monitor_status_since_ns", &self.monitor_status_since_ns)
            .finish_non_exhaustive()
    }
}

/// How [`NodeState::admit`] accepted a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// A generation larger than the current one: a new incarnation (or the
    /// node's first datagram ever, when nothing was accepted before).
    NewGeneration,
    /// The current generation, fresh in the anti-replay window.
    Fresh(Fresh),
}

/// What [`NodeState::record`] changed that the outside must hear about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// A larger generation replaced an earlier accepted one.
    pub restarted: bool,
    /// The generation before (valid when `restarted`).
    pub prev_generation: u32,
}

/// Gate steps 9 and 10 for an authenticated datagram: `stale` if its
/// generation is older, `replay` if seen or outside the window.
#[inline(always)]
pub fn admit(live: &NodeLive, rest: &NodeRest, d: &Datagram) -> Result<Admit, GateResult> {
    admit_at(live.generation, rest.max_seq, rest.replay_bitmap, d)
}

/// [`admit`] on the three fields it reads: the node's generation and its
/// anti-replay window.
///
/// A rejection stays true as the node's state moves on: the generation
/// only grows, and within one the window only advances and marks more
/// sequence numbers seen. So the kernel may reject on a consistent
/// snapshot taken without the node's lock (a replay then never takes the
/// lock from the node's fresh heartbeats); only an admission must be
/// decided under it. (The one reset, a key rotation revoking the epoch
/// that set them, [`rekey`], is written under the node's lock: a
/// rejection decided on a snapshot from before it is that of a datagram
/// that came before it.)
#[inline(always)]
pub fn admit_at(
    generation: u32,
    max_seq: u64,
    replay_bitmap: u64,
    d: &Datagram,
) -> Result<Admit, GateResult> {
    if d.generation < generation {
        return Err(GateResult::Stale);
    }
    if d.generation > generation {
        return if d.seq == 0 {
            Err(GateResult::Replay)
        } else {
            Ok(Admit::NewGeneration)
        };
    }
    let w = Window {
        max_seq,
        bitmap: replay_bitmap,
    };
    match w.check(d.seq) {
        Some(f) => Ok(Admit::Fresh(f)),
        None => Err(GateResult::Replay),
    }
}

/// Gate step 11: folds an admitted datagram that arrived at `now_ns` into
/// the node's state. Does not touch `seqcount` (the caller owns the write
/// protocol) nor what userspace writes outside it: `requested_interval_ms`,
/// `monitor_status` and `monitor_status_since_ns`. A steady heartbeat
/// writes line 0 and the window in line 1; line 2 only on a loss, a late
/// arrival, a new generation or the node's first datagram.
#[inline(always)]
pub fn record(
    live: &mut NodeLive,
    rest: &mut NodeRest,
    d: &Datagram,
    admit: Admit,
    now_ns: u64,
) -> Recorded {
    let mut out = Recorded::default();
    let mut sample = false;
    // A datagram that arrives after a later one of its generation (late,
    // inside the window) is counted, but what it says of the node is older
    // than what the node's state already holds: it must not undo a later
    // LEAVING, nor bring back the interval the node used before its last
    // change (the detector would judge the node by the old rhythm).
    let newest = !matches!(admit, Admit::Fresh(Fresh::Late));
    // Which key let it in: a rotation that revokes it forgets what it
    // set ([`rekey`]).
    rest.accepted_epoch = ACCEPTED_EPOCH_KNOWN | d.key_epoch as u16;
    match admit {
        Admit::NewGeneration => {
            if live.accepted != 0 {
                out.restarted = true;
                out.prev_generation = live.generation;
                rest.restarts = rest.restarts.wrapping_add(1);
                // A generation's first datagram seen here need not be its
                // first sent: the ones before it are not counted lost. A
                // sender that resolved this monitor's name late (its DNS
                // down at start) sent them to no one here; counting them
                // fed the controller a burst of phantom losses.
            }
            // Whether the generation that ends here said goodbye
            // (`NODE_LEFT_BEFORE`); the new one's own LEAVING is set below.
            live.flags = if live.flags & NODE_LEAVING != 0 {
                NODE_LEFT_BEFORE
            } else {
                0
            };
            // A restarted sender starts at its own interval: whatever
            // run of change ACKs was under way, start another
            // (`ack_interval`).
            rest.change_requested_ms = 0;
            live.generation = d.generation;
            let w = Window::starting_at(d.seq);
            rest.max_seq = w.max_seq;
            rest.replay_bitmap = w.bitmap;
            rest.gen_start_ns = now_ns;
            // The gap across a restart is downtime, not an inter-arrival
            // time: keep the learned moments but take no sample.
            live.ia_samples = 0;
        }
        Admit::Fresh(f) => {
            let mut w = Window {
                max_seq: rest.max_seq,
                bitmap: rest.replay_bitmap,
            };
            w.apply(d.seq, f);
            rest.max_seq = w.max_seq;
            rest.replay_bitmap = w.bitmap;
            match f {
                Fresh::Advance { gap } => {
                    // A node's very first datagram (of generation 0,
                    // which needs no generation increase to start) is
                    // the first seen, not the first sent: as for a new
                    // generation, the ones before it are not lost here.
                    if gap != 0 && live.accepted != 0 {
                        rest.lost = rest.lost.wrapping_add(gap);
                    }
                    // Only the gap between consecutive sequence numbers is
                    // an inter-arrival time: one that lost heartbeats spans
                    // several intervals and says nothing of the node's
                    // rhythm or its pauses.
                    sample = live.accepted != 0 && gap == 0;
                }
                Fresh::Late => rest.lost = rest.lost.saturating_sub(1),
            }
            // The node's first datagram in the generation it started with
            // (no generation increase to mark the start).
            if live.accepted == 0 {
                rest.gen_start_ns = now_ns;
            }
        }
    }

    // The sender announced a new interval: re-seed the mean at it so a node
    // that slows down on request is not suspected, and one that speeds up
    // is judged by its new rhythm at once. The deviation keeps the jitter
    // the node has shown (network and timer jitter do not scale with the
    // interval), at most an eighth of the new interval; a node's first
    // interval starts at an eighth. (Re-seeding it at an eighth on every
    // change inflated sigma past the 10% floor for dozens of beats at the
    // deviation's 1/32 gain: the interval controller paid ~20% slower
    // detection after every step.)
    if newest && d.interval_ms != 0 && d.interval_ms != live.interval_ms {
        let iv = d.interval_ms as u64 * 1_000_000;
        let cap = iv >> 3;
        live.ia_dev_ns = if live.interval_ms == 0 || live.ia_dev_ns > cap {
            cap
        } else {
            live.ia_dev_ns
        };
        live.ia_mean_ns = iv;
        live.ia_samples = 0;
        sample = false;
    }
    if sample && now_ns > live.last_arrival_ns {
        live.observe_interarrival(now_ns - live.last_arrival_ns);
    }

    if newest {
        live.interval_ms = d.interval_ms;
        live.rtt_us = d.rtt_us;
        live.load = d.load;
        live.flags = (live.flags & NODE_LEFT_BEFORE)
            | if d.flags & FLAG_LEAVING != 0 {
                NODE_LEAVING
            } else {
                0
            };
    }
    // A late datagram was sent before the newest one: it says nothing of
    // whether the node is alive now, and the next inter-arrival sample
    // is measured from the newest.
    if newest && now_ns > live.last_arrival_ns {
        live.last_arrival_ns = now_ns;
    }
    live.accepted = live.accepted.wrapping_add(1);
    out
}

/// Heartbeats of one run of change ACKs (below) that are all answered:
/// the first four.
pub const CHANGE_ACKS_FIRST: u32 = 4;
/// After [`CHANGE_ACKS_FIRST`], a run's heartbeats answered at powers of
/// two up to this, then every this-many-th: 1 in 64 for good.
pub const CHANGE_ACKS_EVERY: u32 = 64;

/// Whether to answer the heartbeat just recorded for a node with an ACK,
/// and the interval it carries: the node's requested interval, or the one
/// the node reports where userspace has no opinion (PROTOCOL.md, "ACK").
/// `live` is the node after [`record`]; the kernel and the userspace gate
/// both decide here, under the node's seqcount.
///
/// Periodic ACKs (`Config::ack_every`) are sent as configured. A change
/// ACK answers a heartbeat whose interval is not the requested one
/// (`Config::ack_on_change`), but not every one for as long as that
/// lasts: a sender clamps a request to its own bounds, and with several
/// monitors it uses the most demanding one's, so a node can report
/// another interval than ours for good; answering each of its heartbeats
/// doubled its traffic and the gate's work. Each (request, reported
/// interval) pair starts a run: its first [`CHANGE_ACKS_FIRST`]
/// heartbeats are answered (a sender adopts the first ACK it gets, and
/// the heartbeats already on their way report the old interval), then
/// its 8th, 16th and 32nd, then every [`CHANGE_ACKS_EVERY`]-th, so that a
/// request whose ACKs were all lost still arrives. A change of either
/// the request or the node's interval starts a new run.
///
/// With no request, the ACK echoes `heard_ms`, the interval the answered
/// heartbeat carried: after a late (reordered) heartbeat `live` holds the
/// newest one's, and a sender takes an ACK whose interval differs from
/// what that heartbeat said for a request (a monitor with no opinion then
/// pinned it to the newer interval, the fastest request winning).
///
/// Counts `acks_sent` when it answers.
#[inline(always)]
pub fn ack_interval(
    cfg: &Config,
    live: &NodeLive,
    rest: &mut NodeRest,
    heard_ms: u32,
) -> Option<u32> {
    // 1 (every heartbeat) skips the 64-bit division (tens of cycles).
    let periodic = cfg.ack_every == 1
        || (cfg.ack_every != 0 && live.accepted.is_multiple_of(cfg.ack_every as u64));
    if !periodic && cfg.ack_on_change == 0 {
        return None;
    }
    // SAFETY: an aligned field of a value we hold; userspace stores it
    // at any time (the one field it writes outside the seqcount), so it
    // is read once, as a volatile load. Only read when an ACK is possible
    // at all: it is in the node's third cache line.
    let requested = unsafe { core::ptr::read_volatile(&rest.requested_interval_ms) };
    let reported = live.interval_ms;
    let changed = cfg.ack_on_change != 0 && requested != 0 && requested != reported && {
        if rest.change_requested_ms != requested || rest.change_reported_ms != reported {
            rest.change_requested_ms = requested;
            rest.change_reported_ms = reported;
            rest.change_heartbeats = 0;
        }
        // The run's `k`-th heartbeat (from 1).
        let k = rest.change_heartbeats.wrapping_add(1);
        rest.change_heartbeats = k;
        k <= CHANGE_ACKS_FIRST
            || (k < CHANGE_ACKS_EVERY && k & (k - 1) == 0)
            || k.is_multiple_of(CHANGE_ACKS_EVERY)
    };
    if !(changed || periodic) {
        return None;
    }
    rest.acks_sent = rest.acks_sent.wrapping_add(1);
    Some(if requested != 0 { requested } else { heard_ms })
}

/// The EWMA gain exponent of a warm-up sample, `None` once warm. While a
/// node announces no interval (`interval_ms` 0: PROTOCOL.md gives it no
/// meaning; `hb send` never sends it, `hb eval` replays traces that carry
/// none with it) its moments are learned from its samples alone: the
/// `n`-th sample after the first weighs `1/2^floor(log2(n + 1))` (a
/// running average's `1/(n + 1)`, rounded to a power of two, and at least
/// 1/2 so the moments a restart keeps are not thrown away at once), until
/// that reaches the EWMA gains. A node that announces its interval has its
/// moments seeded from it ([`record`]) and needs no warm-up.
#[inline(always)]
pub fn warmup_shift(samples: u16, mean_shift: u32, dev_shift: u32) -> Option<u32> {
    let warm_at = mean_shift.max(dev_shift);
    let next = samples as u32 + 1;
    if warm_at >= 16 || next >> warm_at != 0 {
        return None;
    }
    // floor(log2(next)) without a count-leading-zeros (BPF has none):
    // `next` < 2^warm_at <= 2^15.
    let mut k = 1;
    while k < warm_at && next >> (k + 1) != 0 {
        k += 1;
    }
    Some(k)
}

impl NodeLive {
    /// Jacobson/Karels EWMA update with one inter-arrival sample `x` ns,
    /// its error clipped to a quarter of the mean ([`IA_CLIP_SHIFT`]); the
    /// excess of a longer sample is remembered as a stall
    /// ([`NodeState::stall`]).
    #[inline(always)]
    pub fn observe_interarrival(&mut self, x: u64) {
        self.observe_interarrival_with(x, IA_MEAN_SHIFT, IA_DEV_SHIFT);
    }

    /// [`Self::observe_interarrival`] with other EWMA gains (`1/2^mean_shift`,
    /// `1/2^dev_shift`): what `hb eval` uses to try gains the kernel was not
    /// built with.
    #[inline(always)]
    pub fn observe_interarrival_with(&mut self, x: u64, mean_shift: u32, dev_shift: u32) {
        // The moments are signed arithmetic: a sample past `i64::MAX` ns
        // (292 years; only a replayed trace's clock can say so) counts as
        // that long, not as a negative one (and no overflow).
        let x = if x > i64::MAX as u64 {
            i64::MAX as u64
        } else {
            x
        };
        let warm = if self.interval_ms == 0 {
            warmup_shift(self.ia_samples, mean_shift, dev_shift)
        } else {
            None
        };
        if self.ia_samples == 0 && self.ia_mean_ns == 0 {
            self.ia_mean_ns = x;
            self.ia_dev_ns = x >> 1;
        } else {
            let mean = self.ia_mean_ns as i64;
            let mut err = x as i64 - mean;
            let (mean_shift, dev_shift) = match warm {
                // Learning a rhythm no one announced: the moments so far
                // are a few samples' worth, so the sample is taken whole
                // (no clip, no stall) at about the weight a running average
                // gives it. A first gap far off the node's rhythm (two
                // heartbeats out of a queue at once, a slow start) is
                // forgotten within the warm-up, where at 1/2^mean_shift and
                // clipped to a quarter of the mean it pinned the mean for
                // hundreds of samples (a 100 ns one for ever) and every
                // later sample counted as a stall.
                Some(k) => (k.min(mean_shift), k.min(dev_shift)),
                None => {
                    let lim = mean >> IA_CLIP_SHIFT;
                    self.stall[0] -= self.stall[0] >> STALL_DECAY_SHIFT;
                    self.stall[1] -= self.stall[1] >> STALL_DECAY_SHIFT;
                    if err > lim {
                        let units = (err as u64) >> STALL_UNIT_SHIFT;
                        self.stall[1] = self.stall[0];
                        self.stall[0] = if units > u32::MAX as u64 {
                            u32::MAX
                        } else {
                            units as u32
                        };
                        err = lim;
                    } else if err < -lim {
                        err = -lim;
                    }
                    (mean_shift, dev_shift)
                }
            };
            self.ia_mean_ns = (mean + (err >> mean_shift)) as u64;
            let dev = self.ia_dev_ns as i64;
            let abs = if err < 0 { -err } else { err };
            self.ia_dev_ns = (dev + ((abs - dev) >> dev_shift)) as u64;
        }
        self.ia_samples = self.ia_samples.saturating_add(1);
    }
}

impl NodeRest {
    /// The key held for `epoch`, if any (gate step 7).
    #[inline(always)]
    pub fn find_key(&self, epoch: u8) -> Option<NodeKey> {
        if self.key_valid & 1 != 0 && self.key_epoch[0] == epoch {
            Some(self.key[0])
        } else if self.key_valid & 2 != 0 && self.key_epoch[1] == epoch {
            Some(self.key[1])
        } else {
            None
        }
    }

    /// Installs `node_id` and its keys (provisioning, rotation); the rest
    /// of the state is kept. The caller owns the write protocol.
    pub const fn set_keys(&mut self, node_id: u32, keys: &NodeKeys) {
        self.node_id = node_id;
        self.key_epoch = keys.epoch;
        self.key_valid = keys.valid;
        self.key = keys.key;
    }

    /// The key epoch of the node's newest accepted datagram, if recorded
    /// ([`Self::accepted_epoch`]).
    pub const fn accepted_epoch(&self) -> Option<u8> {
        if self.accepted_epoch & ACCEPTED_EPOCH_KNOWN != 0 {
            Some(self.accepted_epoch as u8)
        } else {
            None
        }
    }

    /// The node's keys as userspace provisions them (`keys.slot` is not
    /// stored here and comes back as `slot`).
    pub const fn keys(&self, slot: u32) -> NodeKeys {
        NodeKeys {
            slot,
            epoch: self.key_epoch,
            valid: self.key_valid,
            _pad: 0,
            key: self.key,
        }
    }

    /// Whether `keys` revoke the key that let the node's newest accepted
    /// datagram in ([`Self::accepted_epoch`]): they hold no key for its
    /// epoch, or another one (the epoch's secret replaced in place). False
    /// when none is recorded.
    pub const fn revoked_by(&self, keys: &NodeKeys) -> bool {
        epoch_revoked(self.accepted_epoch, &self.keys(keys.slot), keys)
    }
}

/// [`NodeRest::revoked_by`] on the fields alone: whether going from keys
/// `old` to `new` revokes the key of the epoch an
/// [`NodeRest::accepted_epoch`] of `accepted_epoch` records: `new` holds
/// no key for it, or not `old`'s.
pub const fn epoch_revoked(accepted_epoch: u16, old: &NodeKeys, new: &NodeKeys) -> bool {
    if accepted_epoch & ACCEPTED_EPOCH_KNOWN == 0 {
        return false;
    }
    let e = accepted_epoch as u8;
    match (old.find(e), new.find(e)) {
        (Some(a), Some(b)) => a.k0 != b.k0 || a.k1 != b.k1,
        // `new` drops it; or `old` did not hold it either (a state no gate
        // writes), so nothing vouches for what it set.
        _ => true,
    }
}

/// Key rotation ([`NodeState::rekey`]) on a node's two parts: installs
/// `node_id` and `keys`, keeping the state, except where `keys` revoke the
/// key of the node's newest accepted datagram (drop its epoch, or replace
/// that epoch's key: a leaked secret replaced in place). Then what the datagrams of
/// that epoch may have set is forgotten: the generation and the
/// anti-replay window start afresh, as for a node never heard from, and
/// the node's next accepted datagram is a new generation (a restart, as
/// `accepted` is kept). Whoever held a leaked key could have sent one
/// valid heartbeat of generation `u32::MAX` (or seq `u64::MAX`), after
/// which every genuine one is `stale` (or `replay`); kept, that would
/// outlive the key's revocation, and the node would stay dead until it
/// was delisted and listed again. A rotation that drops an epoch the node
/// no longer used keeps everything. Returns whether it forgot.
/// The caller owns the write protocol.
pub const fn rekey(
    live: &mut NodeLive,
    rest: &mut NodeRest,
    node_id: u32,
    keys: &NodeKeys,
) -> bool {
    let revoked = rest.revoked_by(keys);
    if revoked {
        live.generation = 0;
        // Of the generation before the one forgotten: no goodbye of the
        // node's next one (its LEAVING, kept, still marks the next).
        live.flags &= !NODE_LEFT_BEFORE;
        rest.max_seq = 0;
        rest.replay_bitmap = 0;
        rest.accepted_epoch = 0;
    }
    rest.set_keys(node_id, keys);
    revoked
}

impl NodeState {
    /// A node from its two parts.
    pub fn from_parts(live: &NodeLive, rest: &NodeRest) -> NodeState {
        let mut s = NodeState::default();
        *s.live_mut() = *live;
        *s.rest_mut() = *rest;
        s
    }

    /// Gate steps 9 and 10 ([`admit`]).
    #[inline(always)]
    pub fn admit(&self, d: &Datagram) -> Result<Admit, GateResult> {
        admit(self.live(), self.rest(), d)
    }

    /// Gate step 11 ([`record`]).
    #[inline(always)]
    pub fn record(&mut self, d: &Datagram, admit: Admit, now_ns: u64) -> Recorded {
        let (live, rest) = self.split_mut();
        record(live, rest, d, admit, now_ns)
    }

    /// [`NodeLive::observe_interarrival`].
    #[inline(always)]
    pub fn observe_interarrival(&mut self, x: u64) {
        self.live_mut().observe_interarrival(x);
    }

    /// [`NodeLive::observe_interarrival_with`].
    #[inline(always)]
    pub fn observe_interarrival_with(&mut self, x: u64, mean_shift: u32, dev_shift: u32) {
        self.live_mut()
            .observe_interarrival_with(x, mean_shift, dev_shift);
    }

    /// The smaller of the node's two most recent stalls, ns: a pause it
    /// has shown at least twice (0 until it has).
    #[inline(always)]
    pub fn recurring_stall_ns(&self) -> u64 {
        recurring_stall_ns(&self.stall)
    }

    /// Whether the last accepted datagram had LEAVING set.
    pub const fn leaving(&self) -> bool {
        self.flags & NODE_LEAVING != 0
    }

    /// [`NodeRest::accepted_epoch`]: the key epoch of the node's newest
    /// accepted datagram, if recorded.
    pub const fn accepted_epoch(&self) -> Option<u8> {
        self.rest().accepted_epoch()
    }

    /// Line 0, the detector's view, in place.
    #[inline(always)]
    pub const fn live(&self) -> &NodeLive {
        // SAFETY: a `NodeState` begins with a `NodeLive`, field for field
        // (checked at compile time above): same offsets, plain integers,
        // same alignment.
        unsafe { &*(self as *const NodeState).cast::<NodeLive>() }
    }

    /// Line 0, to write.
    #[inline(always)]
    pub const fn live_mut(&mut self) -> &mut NodeLive {
        // SAFETY: as `live`; the borrow of `self` covers the line.
        unsafe { &mut *(self as *mut NodeState).cast::<NodeLive>() }
    }

    /// Lines 1 and 2 in place.
    #[inline(always)]
    pub const fn rest(&self) -> &NodeRest {
        // SAFETY: a `NodeRest` at `NODE_REST_OFFSET`, field for field
        // (checked at compile time above), 64-byte aligned.
        unsafe {
            &*(self as *const NodeState)
                .cast::<u8>()
                .add(NODE_REST_OFFSET)
                .cast::<NodeRest>()
        }
    }

    /// Lines 1 and 2, to write.
    #[inline(always)]
    pub const fn rest_mut(&mut self) -> &mut NodeRest {
        // SAFETY: as `rest`; the borrow of `self` covers the lines.
        unsafe {
            &mut *(self as *mut NodeState)
                .cast::<u8>()
                .add(NODE_REST_OFFSET)
                .cast::<NodeRest>()
        }
    }

    /// Both parts, to write: disjoint bytes of `self`.
    #[inline(always)]
    pub const fn split_mut(&mut self) -> (&mut NodeLive, &mut NodeRest) {
        let p = self as *mut NodeState;
        // SAFETY: as `live` and `rest`; bytes 0..64 and 64..192 do not
        // overlap, and the borrow of `self` covers both.
        unsafe {
            (
                &mut *p.cast::<NodeLive>(),
                &mut *p.cast::<u8>().add(NODE_REST_OFFSET).cast::<NodeRest>(),
            )
        }
    }

    /// The key held for `epoch`, if any (gate step 7).
    #[inline(always)]
    pub fn find_key(&self, epoch: u8) -> Option<NodeKey> {
        self.rest().find_key(epoch)
    }

    /// The node's keys as userspace provisions them (`keys.slot` is not
    /// stored here and comes back as `slot`).
    pub const fn keys(&self, slot: u32) -> NodeKeys {
        self.rest().keys(slot)
    }

    /// Installs `node_id` and its keys (provisioning, rotation); the rest
    /// of the state is kept. The caller owns the write protocol.
    pub const fn set_keys(&mut self, node_id: u32, keys: &NodeKeys) {
        self.rest_mut().set_keys(node_id, keys);
    }

    /// Key rotation: [`rekey`] on this node's two parts.
    pub const fn rekey(&mut self, node_id: u32, keys: &NodeKeys) -> bool {
        let (live, rest) = self.split_mut();
        rekey(live, rest, node_id, keys)
    }
}

/// Addresses of each family [`LocalAddrs`] holds. A host with more of a
/// family (a Kubernetes node whose service addresses are local, say) is
/// not checked for that family: the gate then takes heartbeats to any
/// address of it.
pub const LOCAL_ADDRS_MAX: usize = 16;

/// The addresses the gate takes heartbeats at: the monitor host's own, in
/// its network namespace (every interface's, as the stack accepts a
/// datagram to any local address on any interface). Datagrams to the
/// heartbeat port of another address are gate step 1, "not UDP to the
/// heartbeat port": passed, uncounted. Without it a host that forwards
/// (a router, a Kubernetes node routing to pods, a hypervisor's bridge)
/// gated heartbeats meant for a monitor behind it: dropped as
/// `unknown_node`, or, for a node both monitors know, accepted and
/// answered with an ACK from the other monitor's address.
///
/// Written by userspace (`set_local_addrs`) as a whole, rarely (when the
/// host's addresses change); the kernel reads it without a lock. A read
/// torn by a concurrent write can misjudge one datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalAddrs {
    /// 0: take heartbeats to any IPv4 address (nothing written yet, or
    /// more addresses than fit); 1: only to `v4`.
    pub known_v4: u16,
    /// The same for IPv6 and `v6`.
    pub known_v6: u16,
    pub v4_len: u32,
    pub v6_len: u32,
    pub _pad: u32,
    pub v4: [[u8; 4]; LOCAL_ADDRS_MAX],
    pub v6: [[u8; 16]; LOCAL_ADDRS_MAX],
}

impl Default for LocalAddrs {
    fn default() -> Self {
        LocalAddrs::ANY
    }
}

impl LocalAddrs {
    /// Any address: no check.
    pub const ANY: LocalAddrs = LocalAddrs {
        known_v4: 0,
        known_v6: 0,
        v4_len: 0,
        v6_len: 0,
        _pad: 0,
        v4: [[0; 4]; LOCAL_ADDRS_MAX],
        v6: [[0; 16]; LOCAL_ADDRS_MAX],
    };

    /// Exactly these addresses; any address of a family whose addresses
    /// do not fit.
    pub fn of(v4: &[[u8; 4]], v6: &[[u8; 16]]) -> LocalAddrs {
        let mut a = LocalAddrs::ANY;
        if v4.len() <= LOCAL_ADDRS_MAX {
            a.known_v4 = 1;
            a.v4_len = v4.len() as u32;
            a.v4[..v4.len()].copy_from_slice(v4);
        }
        if v6.len() <= LOCAL_ADDRS_MAX {
            a.known_v6 = 1;
            a.v6_len = v6.len() as u32;
            a.v6[..v6.len()].copy_from_slice(v6);
        }
        a
    }

    /// Whether heartbeats of each family (IPv4, IPv6) are checked.
    pub const fn checks(&self) -> (bool, bool) {
        (self.known_v4 != 0, self.known_v6 != 0)
    }

    /// Whether the gate takes a heartbeat to the IPv4 address `dst`.
    #[inline(always)]
    pub fn takes_v4(&self, dst: [u8; 4]) -> bool {
        if self.known_v4 == 0 {
            return true;
        }
        let dst = u32::from_ne_bytes(dst);
        let mut i = 0;
        while i < LOCAL_ADDRS_MAX && i < self.v4_len as usize {
            if u32::from_ne_bytes(self.v4[i]) == dst {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether the gate takes a heartbeat to the IPv6 address `dst`.
    #[inline(always)]
    pub fn takes_v6(&self, dst: &[u8; 16]) -> bool {
        if self.known_v6 == 0 {
            return true;
        }
        let halves = |a: &[u8; 16]| {
            let mut h = [0u8; 8];
            let mut l = [0u8; 8];
            h.copy_from_slice(&a[..8]);
            l.copy_from_slice(&a[8..]);
            (u64::from_ne_bytes(h), u64::from_ne_bytes(l))
        };
        let d = halves(dst);
        let mut i = 0;
        while i < LOCAL_ADDRS_MAX && i < self.v6_len as usize {
            if halves(&self.v6[i]) == d {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// How the XDP program answers accepted heartbeats.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Heartbeat UDP port, host byte order. 0 = the program passes
    /// everything (not configured yet).
    pub port: u16,
    /// 1: accepted heartbeats go on to the kernel stack (XDP_PASS) instead
    /// of being consumed; for debugging and comparisons. No ACK then.
    pub pass_accepted: u8,
    /// 1: ACK whenever the node's requested interval is set and differs
    /// from the interval the node reports.
    pub ack_on_change: u8,
    /// ACK every N-th accepted heartbeat of a node (1 = every one, 0 =
    /// never periodically).
    pub ack_every: u32,
    /// Reports (unknown node, restart) per second, per CPU.
    pub report_rate: u32,
    /// Reports allowed in a burst, per CPU.
    pub report_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: crate::proto::DEFAULT_PORT,
            pass_accepted: 0,
            ack_on_change: 0,
            ack_every: 0,
            report_rate: 20,
            report_burst: 50,
        }
    }
}

/// Per-CPU token bucket of the report rate limit ([`names::LIMITS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens, in millitokens.
    pub tokens_milli: u64,
    pub last_ns: u64,
}

impl RateLimit {
    /// Takes one token at `now_ns` if there is one, refilling at `rate`
    /// tokens per second up to `burst`. A fresh bucket starts full.
    ///
    /// The refill is computed from the time since the last refill that
    /// produced something: when calls come faster than one per millitoken,
    /// the clock is not reset to `now` on every call, so a flood cannot
    /// stop the refill by rounding it to zero.
    #[inline(always)]
    pub fn take(&mut self, rate: u32, burst: u32, now_ns: u64) -> bool {
        let cap = burst as u64 * 1000;
        // Bounded so the product below fits in 64 bits (2^31 us = 35 min is
        // longer than any sane bucket takes to fill).
        let mut elapsed_us = now_ns.saturating_sub(self.last_ns) / 1000;
        if elapsed_us > 1 << 31 {
            elapsed_us = 1 << 31;
        }
        let refill = elapsed_us * rate as u64 / 1000;
        if self.last_ns == 0 {
            self.tokens_milli = cap;
            self.last_ns = now_ns;
        } else if refill != 0 {
            let t = self.tokens_milli + refill;
            self.tokens_milli = if t > cap { cap } else { t };
            self.last_ns = now_ns;
        }
        if self.tokens_milli < 1000 {
            return false;
        }
        self.tokens_milli -= 1000;
        true
    }
}

/// `Report::kind`: a datagram named a node id that is not provisioned.
pub const REPORT_UNKNOWN_NODE: u32 = 1;
/// `Report::kind`: an authenticated datagram raised a node's generation.
pub const REPORT_RESTART: u32 = 2;
/// `Report::kind`: a datagram named a provisioned node and a key epoch
/// held for it by no key (gate step 7, `bad_epoch`): a sender left on an
/// epoch a rotation dropped, or given the wrong `--key-epoch`. Not sent
/// when the keys were being rewritten (contention, also `bad_epoch`).
pub const REPORT_BAD_EPOCH: u32 = 3;

/// A record of the [`names::EVENTS`] ring buffer. 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub ts_ns: u64,
    pub kind: u32,
    pub node_id: u32,
    pub generation: u32,
    /// REPORT_RESTART: the generation before.
    pub prev_generation: u32,
    /// Source UDP port, host byte order.
    pub src_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub key_epoch: u8,
    /// Source address; IPv4 in the first 4 bytes.
    pub src_addr: [u8; 16],
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays, no padding holes that
    // matter to the kernel (explicit `_pad` fields), valid for any bits.
    unsafe impl aya::Pod for super::NodeKeys {}
    unsafe impl aya::Pod for super::NodeState {}
    unsafe impl aya::Pod for super::NodeLive {}
    unsafe impl aya::Pod for super::NodeRest {}
    unsafe impl aya::Pod for super::index::Bucket {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::RateLimit {}
    unsafe impl aya::Pod for super::Report {}
    unsafe impl aya::Pod for super::LocalAddrs {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Kind;

    #[test]
    fn layouts_are_what_the_kernel_expects() {
        assert_eq!(size_of::<NodeKeys>(), 40);
        assert_eq!(size_of::<NodeState>(), 192);
        assert_eq!(align_of::<NodeState>(), 64);
        // What the tick reads is line 0, what the gate reads first line
        // 1, rejections line 2.
        assert_eq!(core::mem::offset_of!(NodeState, flags), 60);
        assert_eq!(core::mem::offset_of!(NodeState, key), 80);
        assert_eq!(core::mem::offset_of!(NodeState, replay_bitmap), 120);
        assert_eq!(core::mem::offset_of!(NodeState, lost), 128);
        assert_eq!(size_of::<index::Bucket>(), 64);
        // The parts are views of the whole (checked at compile time too).
        let mut st = NodeState {
            accepted: 7,
            stall: [3, 4],
            flags: NODE_LEAVING,
            ..NodeState::default()
        };
        assert_eq!(st.live().accepted, 7);
        assert_eq!(st.live().recurring_stall_ns(), 3 << STALL_UNIT_SHIFT);
        assert!(st.live().leaving());
        st.live_mut().generation = 9;
        assert_eq!(st.generation, 9);
        let (live, rest) = st.split_mut();
        live.accepted = 8;
        rest.node_id = 5;
        assert_eq!((st.accepted, st.node_id), (8, 5));
        assert_eq!(NodeState::from_parts(st.live(), st.rest()), st);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<Report>(), 48);
        assert_eq!(size_of::<RateLimit>(), 16);
    }

    fn hb(generation: u32, seq: u64) -> Datagram {
        Datagram {
            kind: Kind::Heartbeat,
            node_id: 7,
            generation,
            key_epoch: 0,
            flags: 0,
            load: 10,
            seq,
            sent_ns: 0,
            interval_ms: 1000,
            rtt_us: 0,
        }
    }

    fn feed(s: &mut NodeState, d: &Datagram, now: u64) -> Result<Recorded, GateResult> {
        let a = s.admit(d)?;
        Ok(s.record(d, a, now))
    }

    #[test]
    fn first_datagram_is_not_a_restart_and_later_generations_are() {
        let mut s = NodeState::default();
        let r = feed(&mut s, &hb(100, 1), 1_000).unwrap();
        assert!(!r.restarted);
        assert_eq!((s.generation, s.max_seq, s.accepted), (100, 1, 1));
        feed(&mut s, &hb(100, 2), 2_000).unwrap();
        assert_eq!(feed(&mut s, &hb(99, 50), 3_000), Err(GateResult::Stale));
        assert_eq!(feed(&mut s, &hb(100, 2), 3_000), Err(GateResult::Replay));
        let r = feed(&mut s, &hb(101, 1), 4_000).unwrap();
        assert!(r.restarted);
        assert_eq!(r.prev_generation, 100);
        assert_eq!((s.generation, s.max_seq, s.restarts), (101, 1, 1));
    }

    #[test]
    fn losses_and_interarrival_moments() {
        let mut s = NodeState::default();
        let ms = 1_000_000u64;
        feed(&mut s, &hb(1, 1), 1000 * ms).unwrap();
        // The first datagram announces interval 1000 ms: moments seeded.
        assert_eq!(s.ia_mean_ns, 1000 * ms);
        feed(&mut s, &hb(1, 2), 2100 * ms).unwrap();
        assert_eq!(s.ia_samples, 1);
        // mean = 1000 + (1100 - 1000) / 2^IA_MEAN_SHIFT ms
        let mean = 1_000_000_000 + (100_000_000 >> IA_MEAN_SHIFT);
        assert_eq!(s.ia_mean_ns, mean);
        // Two heartbeats lost: the 3 s gap is no sample.
        feed(&mut s, &hb(1, 5), 5100 * ms).unwrap();
        assert_eq!(s.lost, 2);
        assert_eq!((s.ia_samples, s.ia_mean_ns), (1, mean));
        assert_eq!(s.stall, [0, 0], "a loss is no stall");
        feed(&mut s, &hb(1, 4), 5200 * ms).unwrap();
        assert_eq!(s.lost, 1, "a late arrival fills a hole");
        assert_eq!(s.ia_samples, 1, "late arrivals are no samples");
        assert_eq!(s.last_arrival_ns, 5100 * ms, "nor news of the node");
        // The next sample is measured from the newest datagram (5 at
        // 5.1 s), not from the late one.
        let mut one_second = *s.live();
        one_second.observe_interarrival(1000 * ms);
        feed(&mut s, &hb(1, 6), 6100 * ms).unwrap();
        assert_eq!(s.ia_samples, 2);
        assert_eq!(s.ia_mean_ns, one_second.ia_mean_ns, "a 1000 ms sample");
    }

    #[test]
    fn a_generation_seen_from_the_middle_loses_nothing() {
        let mut s = NodeState::default();
        // Joining a node mid-stream: what it sent before is not lost.
        feed(&mut s, &hb(1, 50), 1_000).unwrap();
        feed(&mut s, &hb(1, 51), 2_000).unwrap();
        assert_eq!(s.lost, 0);
        // Restarted, and first heard from at seq 31 (it had no route to
        // this monitor at first): nothing lost here.
        feed(&mut s, &hb(2, 31), 3_000).unwrap();
        assert_eq!(s.lost, 0);
        // Within the generation, losses count as ever.
        feed(&mut s, &hb(2, 34), 4_000).unwrap();
        assert_eq!(s.lost, 2);
    }

    #[test]
    fn a_late_datagram_does_not_undo_what_a_later_one_said() {
        let mut s = NodeState::default();
        let ms = 1_000_000u64;
        for seq in 1..=10 {
            feed(&mut s, &hb(1, seq), seq * 500 * ms).unwrap();
        }
        // 11 is delayed; 12 announces a new interval and a clean stop.
        let last = Datagram {
            flags: FLAG_LEAVING,
            interval_ms: 2000,
            load: 900,
            rtt_us: 700,
            ..hb(1, 12)
        };
        feed(&mut s, &last, 6000 * ms).unwrap();
        let (mean, dev) = (s.ia_mean_ns, s.ia_dev_ns);
        assert_eq!(mean, 2000 * ms);
        feed(&mut s, &hb(1, 11), 6050 * ms).unwrap();
        assert!(s.live().leaving(), "still leaving");
        assert_eq!(
            (s.interval_ms, s.load, s.rtt_us, s.ia_mean_ns, s.ia_dev_ns),
            (2000, 900, 700, mean, dev),
            "the late datagram's older interval, load and RTT are not taken"
        );
        assert_eq!((s.accepted, s.lost, s.max_seq), (12, 0, 12));
    }

    /// A node announcing no interval whose first gap is `first_ms`, then
    /// beats every second `n` times: its mean and stall memory.
    fn unannounced(first_ns: u64, n: u64) -> NodeState {
        let mut s = NodeState::default();
        let ms = 1_000_000u64;
        let silent = |seq| Datagram {
            interval_ms: 0,
            ..hb(1, seq)
        };
        let mut t = 1000 * ms;
        feed(&mut s, &silent(1), t).unwrap();
        t += first_ns;
        feed(&mut s, &silent(2), t).unwrap();
        for seq in 3..3 + n {
            t += 1000 * ms;
            feed(&mut s, &silent(seq), t).unwrap();
        }
        s
    }

    #[test]
    fn an_unannounced_rhythm_is_learned_whatever_the_first_gap() {
        let ms = 1_000_000u64;
        // Two heartbeats 100 ns apart (out of one queue), then 1 s beats:
        // the clipped EWMA could never move a 100 ns mean (a quarter of it
        // at 1/32 rounds to 0); 10 ms took 585 samples to reach 900 ms.
        // A long first gap (a slow start) is forgotten more slowly, but at
        // least as fast as a running average would (30 s: 1.2 s after 40
        // beats, where the average of 40 samples is 1.7 s).
        for (first, n) in [(100, 40), (10 * ms, 40), (30_000 * ms, 100)] {
            let s = unannounced(first, n);
            assert!(
                s.ia_mean_ns.abs_diff(1000 * ms) < 50 * ms,
                "first gap {first} ns: mean {} ns after {n} beats",
                s.ia_mean_ns
            );
            // The long gap's error also inflates the deviation (slower
            // detection for a while, never a false suspicion).
            let dev_bound = if first > 1000 * ms { 500 } else { 125 };
            assert!(
                s.ia_dev_ns < dev_bound * ms,
                "{first}: dev {} ns",
                s.ia_dev_ns
            );
            assert_eq!(s.stall, [0, 0], "{first}: steady beats are no stalls");
        }
        // Warm once the gains are reached: a 6 s pause is clipped and a
        // stall, as for a node that announced its interval.
        let mut s = unannounced(1000 * ms, 40);
        let mean = s.ia_mean_ns;
        let t = s.last_arrival_ns + 6000 * ms;
        feed(
            &mut s,
            &Datagram {
                interval_ms: 0,
                ..hb(1, 43)
            },
            t,
        )
        .unwrap();
        assert!(s.ia_mean_ns - mean <= (mean >> IA_CLIP_SHIFT) >> IA_MEAN_SHIFT);
        assert_ne!(s.stall[0], 0);
    }

    #[test]
    fn warmup_weighs_like_a_running_average_until_the_gains() {
        let k: [_; 33] =
            core::array::from_fn(|n| warmup_shift(n as u16, IA_MEAN_SHIFT, IA_DEV_SHIFT));
        assert_eq!(&k[..4], &[Some(1), Some(1), Some(1), Some(2)]);
        assert_eq!(
            (k[6], k[7], k[15], k[30]),
            (Some(2), Some(3), Some(4), Some(4))
        );
        assert_eq!((k[31], k[32]), (None, None));
        assert_eq!(warmup_shift(u16::MAX, IA_MEAN_SHIFT, IA_DEV_SHIFT), None);
        assert_eq!(warmup_shift(2, 0, 0), None);
        assert_eq!(warmup_shift(100, 3, 9), Some(6));
        assert_eq!(warmup_shift(0, 16, 5), None);
        // A node that announces its interval never warms up: one sample
        // off by a second moves its mean by the clipped 1/32 only.
        let mut s = NodeState::default();
        feed(&mut s, &hb(1, 1), 1_000_000_000).unwrap();
        feed(&mut s, &hb(1, 2), 3_000_000_000).unwrap();
        assert_eq!(s.ia_mean_ns, 1_000_000_000 + (250_000_000 >> IA_MEAN_SHIFT));
    }

    #[test]
    fn stalls_are_clipped_out_of_the_moments_and_remembered() {
        let mut s = NodeState::default();
        let ms = 1_000_000u64;
        let mut t = 1000 * ms;
        let mut seq = 1;
        let mut beat = |s: &mut NodeState, gap_ms: u64| {
            t += gap_ms * ms;
            feed(s, &hb(1, seq), t).unwrap();
            seq += 1;
        };
        beat(&mut s, 0);
        for _ in 0..10 {
            beat(&mut s, 1000);
        }
        let (mean, dev) = (s.ia_mean_ns, s.ia_dev_ns);
        assert_eq!(mean, 1000 * ms);
        // A 6 s pause: the moments move as for a quarter-interval error
        // only; the 5 s excess is the newest stall.
        beat(&mut s, 6000);
        let lim = (mean >> IA_CLIP_SHIFT) as i64;
        assert_eq!(s.ia_mean_ns, (mean as i64 + (lim >> IA_MEAN_SHIFT)) as u64);
        assert_eq!(
            s.ia_dev_ns,
            (dev as i64 + ((lim - dev as i64) >> IA_DEV_SHIFT)) as u64
        );
        assert_eq!(s.stall, [((5000 * ms) >> STALL_UNIT_SHIFT) as u32, 0]);
        assert_eq!(s.recurring_stall_ns(), 0, "seen once");
        // A 1.2 s sample is jitter, not a stall (within a quarter); a
        // 3 s one is the next stall; the smaller of the two is recurring.
        beat(&mut s, 1200);
        assert_eq!(s.stall[1], 0);
        let m = s.ia_mean_ns;
        beat(&mut s, 3000);
        let second = ((3000 * ms - m) >> STALL_UNIT_SHIFT) as u32;
        assert_eq!(s.stall[0], second);
        assert!(s.stall[1] < ((5000 * ms) >> STALL_UNIT_SHIFT) as u32);
        assert_eq!(s.recurring_stall_ns(), (second as u64) << STALL_UNIT_SHIFT);
        // Both decay with every sample: 1/2^16 each.
        let before = s.stall;
        beat(&mut s, 1000);
        assert_eq!(s.stall[0], before[0] - (before[0] >> STALL_DECAY_SHIFT));
        assert_eq!(s.stall[1], before[1] - (before[1] >> STALL_DECAY_SHIFT));
        // A stall too long for the units saturates.
        let mut long = s;
        long.observe_interarrival(u64::MAX / 2);
        assert_eq!(long.stall[0], u32::MAX);
        // Samples past i64::MAX ns count as that long: the mean grows by
        // the clipped error, never wraps negative (nor overflows).
        for x in [1 << 63, u64::MAX] {
            let mut far = s;
            far.observe_interarrival(x);
            let lim = (s.ia_mean_ns >> IA_CLIP_SHIFT) as i64;
            assert_eq!(
                far.ia_mean_ns,
                (s.ia_mean_ns as i64 + (lim >> IA_MEAN_SHIFT)) as u64
            );
            assert_eq!(far.stall[0], u32::MAX);
            // As the first sample of a node whose rhythm no one announced.
            let mut first = NodeState::default();
            first.observe_interarrival(x);
            assert_eq!(first.ia_mean_ns, i64::MAX as u64);
            first.observe_interarrival(1_000_000);
            assert!(first.ia_mean_ns <= i64::MAX as u64 && first.ia_mean_ns > 0);
        }
    }

    #[test]
    fn the_gate_leaves_what_userspace_writes_alone() {
        // The monitor's record of the node and its interval request
        // survive every kind of datagram the gate folds in and every ACK
        // it answers: a restart of the monitor reads them back.
        let mut s = NodeState {
            requested_interval_ms: 500,
            monitor_status: 3,
            monitor_status_since_ns: 0x1234_5678_9abc,
            ..NodeState::default()
        };
        let cfg = Config {
            ack_every: 1,
            ack_on_change: 1,
            ..Config::default()
        };
        let mut leaving = hb(2, 1);
        leaving.flags = FLAG_LEAVING;
        for (d, at) in [
            (hb(1, 1), 1),
            (hb(1, 2), 1_000_000_001),
            (hb(1, 5), 2_000_000_001),
            (hb(1, 4), 2_000_000_002),
            (leaving, 3_000_000_001),
        ] {
            feed(&mut s, &d, at).unwrap();
            let (live, rest) = s.split_mut();
            assert_eq!(ack_interval(&cfg, live, rest, d.interval_ms), Some(500));
        }
        assert_eq!(s.accepted, 5);
        assert_eq!(
            (
                s.requested_interval_ms,
                s.monitor_status,
                s.monitor_status_since_ns
            ),
            (500, 3, 0x1234_5678_9abc)
        );
    }

    #[test]
    fn interval_change_reseeds_and_leaving_is_recorded() {
        let mut s = NodeState::default();
        feed(&mut s, &hb(1, 1), 1).unwrap();
        let mut d = hb(1, 2);
        d.interval_ms = 5000;
        d.flags = FLAG_LEAVING;
        feed(&mut s, &d, 1_000_000_001).unwrap();
        assert_eq!(s.ia_mean_ns, 5_000_000_000);
        assert_eq!(s.ia_samples, 0);
        assert!(s.leaving());
    }

    /// Whether the generation before said goodbye outlives its LEAVING
    /// flag, which the new generation's first heartbeat clears: a planned
    /// restart within one tick of the monitor is still told as one.
    #[test]
    fn a_goodbye_before_a_restart_is_kept_through_the_next_generation() {
        let mut s = NodeState::default();
        let leaving = |generation, seq| Datagram {
            flags: FLAG_LEAVING,
            ..hb(generation, seq)
        };
        let mut at = 0;
        let mut step = |s: &mut NodeState, d: &Datagram| {
            at += 1_000_000_000;
            feed(s, d, at).unwrap();
            (s.live().leaving(), s.live().left_before())
        };
        assert_eq!(step(&mut s, &hb(1, 1)), (false, false));
        assert_eq!(step(&mut s, &leaving(1, 2)), (true, false));
        // Generation 2 after the goodbye: through all its heartbeats,
        // its own goodbye too.
        assert_eq!(step(&mut s, &hb(2, 1)), (false, true));
        assert_eq!(step(&mut s, &hb(2, 2)), (false, true));
        assert_eq!(step(&mut s, &leaving(2, 3)), (true, true));
        assert_eq!(step(&mut s, &hb(2, 4)), (false, true));
        // Generation 3 after no goodbye (a crash): cleared.
        assert_eq!(step(&mut s, &hb(3, 1)), (false, false));
        // Generation 4 after generation 3 said goodbye as its first word.
        assert_eq!(step(&mut s, &leaving(3, 2)), (true, false));
        assert_eq!(step(&mut s, &leaving(4, 1)), (true, true));
        // A late datagram changes neither.
        assert_eq!(step(&mut s, &hb(4, 3)), (false, true));
        assert_eq!(step(&mut s, &leaving(4, 2)), (false, true));
    }

    #[test]
    fn rate_limit_bursts_then_refills_even_under_a_flood() {
        let mut b = RateLimit::default();
        let ms = 1_000_000u64;
        let mut t = 1_000 * ms;
        let mut ok = 0;
        for _ in 0..100 {
            ok += b.take(10, 5, t) as u32;
        }
        assert_eq!(ok, 5, "the burst");
        // A flood of one call per microsecond for one second refills at
        // 10/s: the clock must not be reset by calls that refill nothing.
        ok = 0;
        for _ in 0..1_000_000 {
            t += 1_000;
            ok += b.take(10, 5, t) as u32;
        }
        assert_eq!(ok, 10);
    }

    #[test]
    fn keys_live_in_the_state_and_stay_out_of_debug_output() {
        let k = |n| NodeKey { k0: n, k1: n };
        let keys = NodeKeys {
            slot: 9,
            epoch: [4, 5],
            valid: 0b11,
            _pad: 0,
            key: [k(0x1111), k(0x2222)],
        };
        let mut s = NodeState {
            accepted: 3,
            ..NodeState::default()
        };
        s.set_keys(77, &keys);
        assert_eq!((s.node_id, s.accepted), (77, 3), "state kept");
        assert_eq!(s.find_key(5), Some(k(0x2222)));
        assert_eq!(s.find_key(6), None);
        assert_eq!(s.keys(9), keys);
        let text = alloc_free_debug(&s);
        assert!(!text.contains("4369") && !text.contains("1111"), "{text}");
    }

    /// `format!` without `alloc`: Debug output into a fixed buffer.
    fn alloc_free_debug(s: &NodeState) -> heapless_str::Buf {
        use core::fmt::Write as _;
        let mut b = heapless_str::Buf::default();
        let _ = write!(b, "{s:?} {:?}", s.key[0]);
        b
    }

    mod heapless_str {
        pub struct Buf {
            bytes: [u8; 2048],
            len: usize,
        }
        impl Default for Buf {
            fn default() -> Self {
                Buf {
                    bytes: [0; 2048],
                    len: 0,
                }
            }
        }
        impl Buf {
            pub fn contains(&self, pat: &str) -> bool {
                let h = &self.bytes[..self.len];
                h.windows(pat.len()).any(|w| w == pat.as_bytes())
            }
        }
        impl core::fmt::Write for Buf {
            fn write_str(&mut self, s: &str) -> core::fmt::Result {
                let end = (self.len + s.len()).min(self.bytes.len());
                let n = end - self.len;
                self.bytes[self.len..end].copy_from_slice(&s.as_bytes()[..n]);
                self.len = end;
                Ok(())
            }
        }
        impl core::fmt::Display for Buf {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?"))
            }
        }
    }

    /// A seed as the userspace writer draws them (any nonzero value).
    const SEED: u64 = 0x5eed_1dea_c0ff_ee42;

    fn table(mask: u32, seed: u64) -> [index::Bucket; 5] {
        let mut t = [index::Bucket::default(); 5];
        t[0].0[0] = index::header(mask, 0);
        t[0].0[index::SEED] = seed;
        t
    }

    #[test]
    fn index_lookup_finds_either_bucket_and_misses_cleanly() {
        for seed in [0, SEED] {
            let mut t = table(3, seed);
            // A node whose two buckets differ under this mask.
            let id = (1..)
                .find(|&id| {
                    let (b1, b2) = index::buckets(id, 3, seed);
                    b1 != b2
                })
                .unwrap();
            let (b1, b2) = index::buckets(id, 3, seed);
            assert!((1..=4).contains(&b1) && (1..=4).contains(&b2));
            t[b1 as usize].0[7] = index::entry(id, 55);
            let found = |id, t: &[index::Bucket]| index::lookup(id, |i| t.get(i as usize));
            assert_eq!(found(id, &t), index::Lookup::Found(55));
            t[b1 as usize].0[7] = 0;
            t[b2 as usize].0[0] = index::entry(id, 56);
            assert_eq!(found(id, &t), index::Lookup::Found(56));
            assert_eq!(found(id + 1, &t), index::Lookup::Absent);
            // A bucket beyond the map (a corrupt mask) is a miss, not a
            // fault.
            assert_eq!(found(id, &t[..1]), index::Lookup::Absent);
        }
    }

    #[test]
    fn index_lookup_hashes_with_the_headers_seed() {
        // The kernel's lookup reads the seed from the header, so it finds
        // what the writer put where its seed says, and only there.
        let mask = 3;
        let id = (1..)
            .find(|&id| {
                let (s1, s2) = index::buckets(id, mask, SEED);
                let (u1, u2) = index::buckets(id, mask, 0);
                s1 == s2 && u1 != s1 && u2 != s1
            })
            .unwrap();
        let (b, _) = index::buckets(id, mask, SEED);
        let mut t = table(mask, SEED);
        t[b as usize].0[2] = index::entry(id, 9);
        let found = |t: &[index::Bucket]| index::lookup(id, |i| t.get(i as usize));
        assert_eq!(found(&t), index::Lookup::Found(9));
        t[0].0[index::SEED] = 0;
        assert_eq!(found(&t), index::Lookup::Absent, "the unkeyed buckets");
    }

    #[test]
    fn index_seed_zero_is_the_unkeyed_hash_of_older_versions() {
        // An index pinned by a version without a seed has 0 in the seed's
        // word: its entries sit where that version's hash (SplitMix64's
        // finalizer, unkeyed) put them, and must still be found there.
        for (id, z) in [
            (1u32, 0x910a_2dec_8902_5cc1u64),
            (2, 0x9758_35de_1c97_56ce),
            (901, 0x6687_df85_7f84_9550),
            (u32::MAX, 0x73b1_3ba2_aff1_81c0),
        ] {
            assert_eq!(
                index::buckets(id, u32::MAX, 0),
                (
                    1u32.wrapping_add(z as u32),
                    1u32.wrapping_add((z >> 32) as u32)
                ),
                "id {id}"
            );
        }
    }

    #[test]
    fn index_buckets_depend_on_the_seed() {
        // Ids that share both buckets with a target under one seed (what
        // an attacker who assumes that seed would enroll) are scattered
        // under another: about as many still collide as among any ids
        // (none). 256 buckets: the index of 900 nodes.
        let mask = (1 << 8) - 1;
        let target = 901;
        let (p, q) = index::buckets(target, mask, 0);
        let hostile: [u32; 16] = {
            let mut h = [0; 16];
            let mut n = 0;
            let mut id = 1_000_000u32;
            while n < 16 {
                let (a, b) = index::buckets(id, mask, 0);
                if (a == p || a == q) && (b == p || b == q) {
                    h[n] = id;
                    n += 1;
                }
                id += 1;
            }
            h
        };
        let (p, q) = index::buckets(target, mask, SEED);
        let still = hostile
            .iter()
            .filter(|&&id| {
                let (a, b) = index::buckets(id, mask, SEED);
                (a == p || a == q) && (b == p || b == q)
            })
            .count();
        assert_eq!(still, 0, "{still} of 16 still fill the target's buckets");
    }

    #[test]
    fn index_lookup_reports_a_miss_during_moves_as_busy() {
        let mut t = table(3, SEED);
        t[0].0[0] = index::header(3, 1); // odd: a move in progress
        let found = |id, t: &[index::Bucket]| index::lookup(id, |i| t.get(i as usize));
        assert_eq!(found(99, &t), index::Lookup::Busy);
        t[0].0[0] = index::header(3, 2); // even, stable: a real miss
        assert_eq!(found(99, &t), index::Lookup::Absent);
        // Found is found, moves or not.
        let (b1, _) = index::buckets(99, 3, SEED);
        t[b1 as usize].0[3] = index::entry(99, 4);
        t[0].0[0] = index::header(3, 5);
        assert_eq!(found(99, &t), index::Lookup::Found(4));
    }

    #[test]
    fn index_sizes() {
        assert_eq!(index::buckets_for(1), 1);
        assert_eq!(index::buckets_for(4), 1);
        assert_eq!(index::buckets_for(5), 2);
        assert_eq!(index::buckets_for(1 << 20), 1 << 18);
        assert_eq!(index::buckets_for(1_000_000), 1 << 18);
        // Sequential and strided ids spread like random ones, keyed or
        // not: 4 per bucket on average, so about e^-4 = 1.8% of the
        // buckets empty (a Poisson(4) law) and none far above the mean, in
        // both choices.
        let mask = (1 << 10) - 1;
        for seed in [0, SEED, 1, u64::MAX] {
            for stride in [1u32, 1024, 65536 + 1] {
                for choice in 0..2 {
                    let mut n = [0u32; 1 << 10];
                    for i in 1..=4096u32 {
                        let (b1, b2) = index::buckets(i.wrapping_mul(stride), mask, seed);
                        n[([b1, b2][choice] - 1) as usize] += 1;
                    }
                    let empty = n.iter().filter(|c| **c == 0).count();
                    let max = *n.iter().max().unwrap();
                    assert!(
                        empty <= 40 && max <= 16,
                        "seed {seed:#x}, stride {stride}: {empty} empty, max {max}"
                    );
                }
            }
        }
    }

    #[test]
    fn key_lookup_by_epoch() {
        let k = |n| NodeKey { k0: n, k1: n };
        let keys = NodeKeys {
            slot: 3,
            epoch: [1, 2],
            valid: 0b10,
            _pad: 0,
            key: [k(1), k(2)],
        };
        assert_eq!(keys.find(1), None, "slot 0 not valid");
        assert_eq!(keys.find(2), Some(&k(2)));
    }

    /// What revokes the key of a node's newest accepted datagram: its
    /// epoch dropped, or its key replaced in place. Keeping that key, with
    /// or without other epochs, revokes nothing; nor does anything when no
    /// epoch is recorded.
    #[test]
    fn a_key_is_revoked_when_its_epoch_goes_or_its_secret_changes() {
        let k = |n| NodeKey { k0: n, k1: n + 100 };
        let keys = |held: &[(u8, u64)]| {
            let mut ks = NodeKeys::single(0, held[0].0, k(held[0].1));
            if let Some(&(e, n)) = held.get(1) {
                (ks.epoch[1], ks.key[1], ks.valid) = (e, k(n), 3);
            }
            ks
        };
        let on_1 = ACCEPTED_EPOCH_KNOWN | 1;
        let old = keys(&[(1, 10)]);
        let revoked = |new: &[(u8, u64)]| epoch_revoked(on_1, &old, &keys(new));
        assert!(!revoked(&[(1, 10)]));
        assert!(!revoked(&[(2, 20), (1, 10)]));
        assert!(revoked(&[(2, 20)]), "epoch dropped");
        assert!(revoked(&[(1, 11)]), "secret replaced");
        let mut half = old;
        half.key[0].k1 += 1;
        assert!(epoch_revoked(on_1, &old, &half), "k0 alike, k1 not");
        assert!(!epoch_revoked(0, &old, &keys(&[(2, 20)])), "none recorded");
        // Through a node's state: the reset.
        let mut st = NodeState::default();
        st.set_keys(7, &old);
        st.generation = u32::MAX;
        st.accepted_epoch = on_1;
        assert!(!st.rekey(7, &old));
        assert_eq!(st.generation, u32::MAX);
        assert!(st.rekey(7, &keys(&[(1, 11)])));
        assert_eq!((st.generation, st.accepted_epoch), (0, 0));
        assert_eq!(st.find_key(1), Some(k(11)));
        // A goodbye before the generation forgotten is forgotten with it
        // (the next one would otherwise read as a planned restart); a
        // goodbye of the one forgotten is kept for the next.
        st.flags = NODE_LEFT_BEFORE;
        st.accepted_epoch = on_1;
        assert!(st.rekey(7, &keys(&[(1, 12)])));
        assert_eq!(st.flags, 0);
        st.flags = NODE_LEFT_BEFORE | NODE_LEAVING;
        st.accepted_epoch = on_1;
        assert!(st.rekey(7, &keys(&[(1, 13)])));
        assert_eq!(st.flags, NODE_LEAVING);
        st.flags = NODE_LEFT_BEFORE;
        assert!(!st.rekey(7, &keys(&[(1, 13)])), "nothing revoked");
        assert_eq!(st.flags, NODE_LEFT_BEFORE);
    }

    /// Which of a node's heartbeats `ack_interval` answers: `beats` of a
    /// node that reports `reported` while `requested` is asked, from
    /// `st`, as the heartbeats' 0-based indexes.
    fn answered(
        st: &mut NodeState,
        cfg: &Config,
        requested: u32,
        reported: u32,
        beats: u64,
    ) -> ([u64; 16], usize, u32) {
        st.requested_interval_ms = requested;
        st.interval_ms = reported;
        let (mut out, mut n, mut last) = ([0u64; 16], 0, 0);
        for i in 0..beats {
            st.accepted += 1;
            let (live, rest) = st.split_mut();
            if let Some(iv) = ack_interval(cfg, live, rest, reported) {
                if n < out.len() {
                    out[n] = i;
                }
                n += 1;
                last = iv;
            }
        }
        (out, n, last)
    }

    #[test]
    fn change_acks_back_off_when_the_node_does_not_follow() {
        let on_change = Config {
            ack_on_change: 1,
            ..Config::default()
        };
        let mut st = NodeState::default();
        // A sender that cannot go to 500 ms (its bounds, or another
        // monitor wanting it faster): the first four heartbeats, then
        // 8, 16, 32, then 1 in 64.
        let (at, n, iv) = answered(&mut st, &on_change, 500, 1000, 64 * 5);
        assert_eq!(
            &at[..n.min(16)],
            &[0, 1, 2, 3, 7, 15, 31, 63, 127, 191, 255, 319]
        );
        assert_eq!((n, iv, st.acks_sent), (12, 500, 12));
        // The run goes on where it was: nothing changed.
        let (at, n, _) = answered(&mut st, &on_change, 500, 1000, 64);
        assert_eq!(&at[..n], &[63]);
        // A new request starts a new run, and so does a new interval of
        // the node's (another monitor let it go, or it restarted).
        let (at, n, iv) = answered(&mut st, &on_change, 700, 1000, 8);
        assert_eq!((&at[..n], iv), (&[0, 1, 2, 3, 7][..], 700));
        let (at, n, _) = answered(&mut st, &on_change, 700, 2000, 8);
        assert_eq!(&at[..n], &[0, 1, 2, 3, 7]);
        // A node that follows gets none, nor does one with no request.
        assert_eq!(answered(&mut st, &on_change, 2000, 2000, 100).1, 0);
        assert_eq!(answered(&mut st, &on_change, 0, 2000, 100).1, 0);
        // Periodic ACKs go on as configured, with the request (which
        // re-delivers it at the configured rate).
        let every_10 = Config {
            ack_every: 10,
            ..Config::default()
        };
        st.accepted = 0;
        let (at, n, iv) = answered(&mut st, &every_10, 500, 1000, 30);
        assert_eq!((&at[..n], iv), (&[9, 19, 29][..], 500));
        st.accepted = 0;
        let (_, n, iv) = answered(&mut st, &every_10, 0, 1000, 30);
        assert_eq!((n, iv), (3, 1000), "no opinion: the node's own interval");
        // A state pinned by an older version (the fields were reserved,
        // zero) starts a run.
        let mut old = NodeState::default();
        assert_eq!(answered(&mut old, &on_change, 500, 1000, 4).1, 4);
        // So does a restart of the node at the same interval (its bounds
        // may have been widened meanwhile): `record` ends the run.
        let mut st = NodeState::default();
        feed(&mut st, &hb(1, 1), 1).unwrap();
        assert_eq!(answered(&mut st, &on_change, 500, 1000, 100).1, 8);
        feed(&mut st, &hb(2, 1), 2).unwrap();
        let (at, n, _) = answered(&mut st, &on_change, 500, 1000, 4);
        assert_eq!(&at[..n], &[0, 1, 2, 3]);
    }

    #[test]
    fn local_addresses() {
        let any = LocalAddrs::default();
        assert!(any.takes_v4([1, 2, 3, 4]) && any.takes_v6(&[9; 16]));
        let a = LocalAddrs::of(&[[198, 18, 0, 1], [10, 0, 0, 1]], &[[0xfd; 16]]);
        assert!(a.takes_v4([10, 0, 0, 1]) && a.takes_v4([198, 18, 0, 1]));
        assert!(!a.takes_v4([198, 18, 0, 2]) && !a.takes_v4([0; 4]));
        assert!(a.takes_v6(&[0xfd; 16]));
        let mut other = [0xfd; 16];
        other[15] = 1;
        assert!(!a.takes_v6(&other));
        assert!(
            !LocalAddrs::of(&[[10, 0, 0, 1]], &[]).takes_v6(&[0xfd; 16]),
            "none of a family"
        );
        let many = [[10, 0, 0, 1]; LOCAL_ADDRS_MAX + 1];
        let a = LocalAddrs::of(&many, &[[0xfd; 16]]);
        assert_eq!(a.checks(), (false, true), "too many IPv4: no IPv4 check");
        assert!(a.takes_v4([1, 2, 3, 4]) && !a.takes_v6(&other));
        assert_eq!(size_of::<LocalAddrs>(), 16 + 4 * 16 + 16 * 16);
    }
    /// PROTOCOL.md "ACK": with no opinion the ACK carries the sender's own
    /// value, the interval the answered heartbeat carried; the sender
    /// takes any other for a standing request. A late (reordered)
    /// heartbeat was answered with the newest heartbeat's interval.
    #[test]
    fn the_ack_of_a_late_heartbeat_echoes_its_own_interval() {
        let cfg = Config {
            ack_every: 1,
            ..Config::default()
        };
        let mut s = NodeState::default();
        let ms = 1_000_000u64;
        let at = |seq: u64, iv: u32| Datagram {
            interval_ms: iv,
            ..hb(1, seq)
        };
        feed(&mut s, &at(1, 1000), 1000 * ms).unwrap();
        // seq 3 (the sender already switched to 500) overtakes seq 2.
        feed(&mut s, &at(3, 500), 2000 * ms).unwrap();
        let late = at(2, 1000);
        let a = s.admit(&late).unwrap();
        assert_eq!(a, Admit::Fresh(Fresh::Late));
        s.record(&late, a, 2001 * ms);
        let (live, rest) = s.split_mut();
        let iv = ack_interval(&cfg, live, rest, late.interval_ms).unwrap();
        assert_eq!(
            iv, late.interval_ms,
            "no opinion: the ACK of seq 2 must echo the 1000 ms seq 2 carried"
        );
    }

    /// A node's very first datagram, of generation 0 (no generation
    /// increase marks its start), counts no losses for the seqs before
    /// it, as a new generation's first does not: they were counted lost.
    #[test]
    fn the_first_datagram_of_generation_zero_counts_no_losses() {
        let mut s = NodeState::default();
        feed(&mut s, &hb(0, 1_000), 1_000).unwrap();
        assert_eq!(s.lost, 0, "joined mid-stream: nothing lost here");
    }
}

//! The per-node protocols of `HB_NODE_LIVE` and `HB_NODE_REST`: the
//! lock-free read of a node's key ([`read_key`]) and the write lock
//! ([`Locked`], the seqcount in the node's live line).
//!
//! Userspace writes a node's id and keys (provisioning, rotation,
//! removal) while holding the entry's `seqcount` and with `keys_seq` odd;
//! the kernel never writes them. So the kernel reads a key without taking
//! the lock: between two equal, even reads of `keys_seq` (loads are not
//! reordered with loads on x86-64, the architecture hb supports). Gate
//! steps 6 to 8 thus never take the lock, and a flood of forged datagrams
//! for a node (which fail step 8) never contends with its real heartbeats:
//! their `bad_tag` count is an atomic add. Nor does a flood of replayed
//! genuine ones: steps 9-10 first judge a consistent snapshot of the
//! node's window ([`ruled_out`]), and what that rejects is counted with an
//! atomic add too; only a datagram it would admit takes the lock.
//!
//! `NodeState::seqcount` is a seqlock for the userspace readers of the
//! mmap'ed array (they copy an entry and retry while the count is odd or
//! changed). Writers are XDP programs on any CPU: a writer takes the entry
//! by moving the count from even to odd with a compare-and-exchange,
//! writes, and releases by adding one more (even again). The compare-and-exchange also
//! serializes writers, so two CPUs never interleave updates of one node.
//!
//! The BPF target offers no atomic types (`atomic-cas` is off because ISA
//! v1 lacks it); with ISA v3 (see `build.rs`) the core intrinsics compile
//! to BPF's 32-bit `cmpxchg`, which is what `seqcount` needs.
//!
//! The retries are bounded (the verifier requires it, and spinning in XDP
//! stalls a whole receive queue). A writer that cannot take the entry
//! gives up: the datagram is counted `replay` (and `contended`). Two CPUs
//! hold the same node at the same instant only when two fresh datagrams of
//! the node arrive on two queues within ~100 ns of each other, which a
//! sender at <= 10 Hz never does: it means duplicated traffic (both copies
//! fresh until one is recorded), and dropping the loser is the
//! conservative answer.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use hb_common::{
    Datagram, GateResult, NodeKey,
    maps::{NodeLive, NodeRest},
};

/// Attempts to take an entry, or to read a key, before giving up.
const TRIES: u32 = 16;

/// What [`read_key`] found at a slot.
pub enum KeyRead {
    /// The node's key for the epoch.
    Key(NodeKey),
    /// The slot holds another node, or none: freed or reused since the
    /// index was read.
    NotHere,
    /// The node holds no key for the epoch (gate step 7).
    NoEpoch,
    /// Userspace kept rewriting the keys for `TRIES` reads.
    Busy,
}

/// `read()` between two equal, even values of the sequence counter at
/// `seq` (a seqlock read: writers hold it odd), tried up to [`TRIES`]
/// times; `None` if writers kept it busy. `read` must read the fields
/// writers change volatile; loads are not reordered with loads on x86-64
/// (see the module docs).
#[inline(always)]
fn read_consistent<T>(seq: *const u32, read: impl Fn() -> T) -> Option<T> {
    let mut i = 0;
    while i < TRIES {
        // SAFETY: the callers pass an aligned u32 of a live map value.
        let s0 = unsafe { core::ptr::read_volatile(seq) };
        if s0 & 1 == 0 {
            let v = read();
            // SAFETY: as above.
            if unsafe { core::ptr::read_volatile(seq) } == s0 {
                return Some(v);
            }
        }
        i += 1;
    }
    None
}

/// The key of `node_id` for `epoch` at `state`, read without the lock (see
/// the module docs).
#[inline(always)]
pub fn read_key(state: *const NodeRest, node_id: u32, epoch: u8) -> KeyRead {
    // SAFETY (all reads): `state` points into a map value, aligned and
    // alive as long as the program; fields written concurrently are read
    // volatile and validated by `keys_seq`.
    let ks = unsafe { core::ptr::addr_of!((*state).keys_seq) };
    let read = || {
        let id = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).node_id)) };
        let valid = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).key_valid)) };
        let ep = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).key_epoch)) };
        let k = if valid & 1 != 0 && ep[0] == epoch {
            Some(0)
        } else if valid & 2 != 0 && ep[1] == epoch {
            Some(1)
        } else {
            None
        };
        let key = match k {
            Some(0) => unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).key[0])) },
            Some(_) => unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*state).key[1])) },
            None => NodeKey::default(),
        };
        (id, k.is_some(), key)
    };
    match read_consistent(ks, read) {
        None => KeyRead::Busy,
        Some((id, _, _)) if id != node_id => KeyRead::NotHere,
        Some((_, false, _)) => KeyRead::NoEpoch,
        Some((_, true, key)) => KeyRead::Key(key),
    }
}

/// Counts a datagram whose tag did not verify on the node's state, without
/// the lock (an atomic add: readers may see it a copy late).
#[inline(always)]
pub fn count_bad_tag(state: *mut NodeRest) {
    // SAFETY: an aligned u32 field of a live map value.
    add_one(unsafe { core::ptr::addr_of_mut!((*state).bad_tag) });
}

/// Counts a rejected authenticated datagram (`stale` or `replay`) on the
/// node's state: an atomic add, with or without the lock, since
/// [`ruled_out`] counts without it.
#[inline(always)]
pub fn count_rejected(state: *mut NodeRest, r: GateResult) {
    // SAFETY: aligned u32 fields of a live map value.
    let field = unsafe {
        if r == GateResult::Stale {
            core::ptr::addr_of_mut!((*state).stale)
        } else {
            core::ptr::addr_of_mut!((*state).replay)
        }
    };
    add_one(field);
}

#[inline(always)]
fn add_one(field: *mut u32) {
    // SAFETY: the callers pass an aligned u32 of a live map value.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(field, 1) };
}

/// Gate steps 9 and 10 decided without the lock, when they reject: the
/// result (`stale` or `replay`) if a consistent snapshot of the node's
/// generation and window rules `d` out, `None` if it does not (or the
/// snapshot could not be taken, or the slot holds another node): then the
/// caller decides under the lock.
///
/// A rejection on a snapshot stays right ([`hb_common::maps::admit_at`]):
/// the window only moves forward. So a flood of replayed genuine
/// heartbeats (anyone who saw one on the wire can send it) is turned away
/// here and never holds the lock that the node's fresh heartbeats need, as
/// a forged flood never does (step 8). The one exception is userspace
/// resetting the node (removal, re-provisioning) between the snapshot and
/// now: then a datagram the fresh state would have taken is dropped, which
/// the next heartbeat makes good.
#[inline(always)]
pub fn ruled_out(live: *const NodeLive, rest: *const NodeRest, d: &Datagram) -> Option<GateResult> {
    // SAFETY (all reads): pointers into map values, aligned and alive as
    // long as the program; fields written concurrently are read volatile
    // and validated by `seqcount`.
    let sc = unsafe { core::ptr::addr_of!((*live).seqcount) };
    let (id, generation, max_seq, bitmap) = read_consistent(sc, || unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*rest).node_id)),
            core::ptr::read_volatile(core::ptr::addr_of!((*live).generation)),
            core::ptr::read_volatile(core::ptr::addr_of!((*rest).max_seq)),
            core::ptr::read_volatile(core::ptr::addr_of!((*rest).replay_bitmap)),
        )
    })?;
    if id != d.node_id {
        return None;
    }
    hb_common::maps::admit_at(generation, max_seq, bitmap, d).err()
}

/// A node held for writing: its line 0 (`HB_NODE_LIVE`, which holds the
/// seqcount) and lines 1-2 (`HB_NODE_REST`) at one slot.
pub struct Locked {
    live: *mut NodeLive,
    rest: *mut NodeRest,
}

impl Locked {
    /// Takes the node for writing, or `None` after `TRIES` failed attempts.
    #[inline(always)]
    pub fn take(live: *mut NodeLive, rest: *mut NodeRest) -> Option<Locked> {
        // SAFETY: `live` points into a map value (aligned, alive as long as
        // the program); `seqcount` is an aligned u32 in it.
        let sc = unsafe { core::ptr::addr_of_mut!((*live).seqcount) };
        let mut i = 0;
        while i < TRIES {
            // SAFETY: see above.
            let seq = unsafe { core::ptr::read_volatile(sc) };
            if seq & 1 == 0 {
                // SAFETY: see above.
                let (_, ok) = unsafe {
                    atomic_cxchg::<u32, { AtomicOrdering::Acquire }, { AtomicOrdering::Relaxed }>(
                        sc,
                        seq,
                        seq.wrapping_add(1),
                    )
                };
                if ok {
                    return Some(Locked { live, rest });
                }
            }
            i += 1;
        }
        None
    }

    /// The node's two parts (the only writer while held).
    #[inline(always)]
    pub fn get(&mut self) -> (&mut NodeLive, &mut NodeRest) {
        // SAFETY: we hold the node's seqlock, which userspace also takes
        // to write the id and keys; outside it userspace writes only
        // `requested_interval_ms` (which `record` never touches and which
        // `ack_interval` reads once, volatile) and its record of the node
        // (`monitor_status`, `monitor_status_since_ns`, which nothing here
        // reads or writes), and we add to `bad_tag` atomically (which
        // `record` does not touch either). Two distinct map values.
        unsafe { (&mut *self.live, &mut *self.rest) }
    }

    /// Publishes the writes and releases the node.
    #[inline(always)]
    pub fn release(self) {
        // Odd + 1: even again. An atomic add, not a store-release: BPF ISA
        // v3 has no store-release (LLVM cannot select one before v4), and
        // BPF's atomic read-modify-write instructions are full barriers
        // (a `lock`ed instruction once JITed on x86-64).
        // SAFETY: as in `take`.
        unsafe {
            atomic_xadd::<u32, u32, { AtomicOrdering::Release }>(
                core::ptr::addr_of_mut!((*self.live).seqcount),
                1,
            )
        };
    }
}

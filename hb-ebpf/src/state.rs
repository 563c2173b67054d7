//! The per-node write protocol of `HB_NODE_STATE`.
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
//! hold the same node at the same instant only when the same node's
//! datagrams arrive on two queues within ~100 ns of each other, which a
//! sender at <= 10 Hz never does: it means duplicated or replayed traffic,
//! and dropping the loser is the conservative answer.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use hb_common::maps::NodeState;

/// Attempts to take an entry before giving up.
const TRIES: u32 = 16;

/// An entry of `HB_NODE_STATE` held for writing.
pub struct Locked {
    state: *mut NodeState,
}

impl Locked {
    /// Takes `state` for writing, or `None` after `TRIES` failed attempts.
    #[inline(always)]
    pub fn take(state: *mut NodeState) -> Option<Locked> {
        // SAFETY: `state` points into a map value (aligned, alive as long
        // as the program); `seqcount` is an aligned u32 in it.
        let sc = unsafe { core::ptr::addr_of_mut!((*state).seqcount) };
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
                    return Some(Locked { state });
                }
            }
            i += 1;
        }
        None
    }

    /// The entry (the only writer while held).
    #[inline(always)]
    pub fn get(&mut self) -> &mut NodeState {
        // SAFETY: we hold the entry's seqlock; userspace writes only
        // `requested_interval_ms`, which `NodeState::record` never touches
        // and which we read with `requested_interval`.
        unsafe { &mut *self.state }
    }

    /// `requested_interval_ms`, written by userspace at any time.
    #[inline(always)]
    pub fn requested_interval(&self) -> u32 {
        // SAFETY: aligned field of a live map value.
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!((*self.state).requested_interval_ms))
        }
    }

    /// Publishes the writes and releases the entry.
    #[inline(always)]
    pub fn release(self) {
        // Odd + 1: even again. An atomic add, not a store-release: BPF ISA
        // v3 has no store-release (LLVM cannot select one before v4), and
        // BPF's atomic read-modify-write instructions are full barriers
        // (a `lock`ed instruction once JITed on x86-64).
        // SAFETY: as in `take`.
        unsafe {
            atomic_xadd::<u32, u32, { AtomicOrdering::Release }>(
                core::ptr::addr_of_mut!((*self.state).seqcount),
                1,
            )
        };
    }
}

//! hb's XDP gate: PROTOCOL.md's gate, in order, on every frame.
//!
//! This file is the decision path only. The pieces live in modules named
//! after them: `parse` (headers, gate steps 1-2), `payload` (the 48 bytes
//! on the stack), `maps`, `state` (the per-node seqlock), `report` (ring
//! buffer behind a rate limit) and `ack` (the in-place rewrite). The
//! payload's meaning (steps 3-11) is `hb-common`'s, the same code the
//! userspace gate runs.
//!
//! Every datagram to the heartbeat port gets exactly one `GateResult`
//! counter. Frames that are not (gate step 1, `pass`) are handed to the
//! stack without being counted: the gate must cost other traffic as little
//! as possible (the interface's own statistics count it), and a per-CPU
//! counter update is a third of the pass-through path's cost.
//! Besides `hb_xdp`, the object carries two trivial programs: `hb_pass`
//! (for the peer veth, so XDP_TX frames arrive) and `hb_floor` (XDP_DROP
//! at once: the benchmark's floor).
#![no_std]
#![no_main]
// Atomics for the per-node seqlock (see `state`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod ack;
mod maps;
mod parse;
mod payload;
mod report;
mod state;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_ktime_get_ns,
    macros::xdp,
    programs::XdpContext,
};
use hb_common::{
    GateResult,
    maps::{
        LocalAddrs, REPORT_BAD_EPOCH, REPORT_RESTART, REPORT_UNKNOWN_NODE, counter, index::Lookup,
    },
    proto::{self, Kind},
};

use crate::{
    maps::{
        HB_CONFIG, HB_LOCAL_ADDRS, HB_NODE_LIVE, HB_NODE_REST, LIMIT_PROVISIONED, LIMIT_UNKNOWN,
        count, slot_of,
    },
    parse::{Frame, Parsed},
    payload::Payload,
    state::{KeyRead, Locked},
};

#[xdp]
pub fn hb_xdp(ctx: XdpContext) -> u32 {
    let (action, result) = gate(&ctx);
    if result != GateResult::Pass {
        count(result.index());
    }
    action
}

#[xdp]
pub fn hb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn hb_floor(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// The gate: the action for the frame and the result to count.
#[inline(always)]
fn gate(ctx: &XdpContext) -> (u32, GateResult) {
    let drop = |r| (XDP_DROP, r);
    // No config, or port 0: not configured yet, pass everything.
    let cfg = match HB_CONFIG.get(0) {
        Some(c) if c.port != 0 => c,
        _ => return (XDP_PASS, GateResult::Pass),
    };
    // Step 1 for most foreign traffic, then steps 1-2 in full.
    if parse::fast_pass(ctx, cfg.port) {
        return (XDP_PASS, GateResult::Pass);
    }
    let local = HB_LOCAL_ADDRS.get(0).unwrap_or(&LocalAddrs::ANY);
    let f = match parse::parse(ctx, cfg.port, local) {
        Parsed::Pass => return (XDP_PASS, GateResult::Pass),
        Parsed::Malformed => return drop(GateResult::Malformed),
        Parsed::Ours(f) => f,
    };
    let Some(mut buf) = Payload::load(ctx, f.payload()) else {
        return drop(GateResult::Malformed);
    };
    // Steps 3-5: magic, version, kind and flags.
    let d = match proto::parse_fixed(&buf.0, Kind::Heartbeat) {
        Ok(d) => d,
        Err(r) => return drop(r),
    };
    // Step 6: provisioned?
    let slot = match slot_of(d.node_id) {
        Lookup::Found(slot) => slot,
        Lookup::Absent => {
            let mut r = report::about(REPORT_UNKNOWN_NODE, &d, 0, 0);
            report::send(ctx, &f, cfg, LIMIT_UNKNOWN, &mut r);
            return drop(GateResult::UnknownNode);
        }
        // Userspace kept moving index entries during the search (it
        // inserts into two full buckets): not known to be unknown, so no
        // report; counted as contended.
        Lookup::Busy => {
            count(counter::CONTENDED);
            return drop(GateResult::UnknownNode);
        }
    };
    // A slot beyond the array is a provisioning bug in userspace (it checks
    // against the capacity); the node is as good as unknown, without a
    // report.
    let (Some(live), Some(rest)) = (
        HB_NODE_LIVE.get_ptr_mut(slot),
        HB_NODE_REST.get_ptr_mut(slot),
    ) else {
        return drop(GateResult::UnknownNode);
    };
    // Step 7: a key for the epoch, read at the node without the lock. A
    // slot freed or reused since the index was read holds another id: the
    // node is gone, as good as unknown (no report: userspace removed it).
    let key = match state::read_key(rest, d.node_id, d.key_epoch) {
        KeyRead::Key(k) => k,
        KeyRead::NotHere => return drop(GateResult::UnknownNode),
        KeyRead::NoEpoch => {
            // Reported (rate-limited), so the log can name the node: it
            // would otherwise just look dead.
            let mut r = report::about(REPORT_BAD_EPOCH, &d, 0, 0);
            report::send(ctx, &f, cfg, LIMIT_PROVISIONED, &mut r);
            return drop(GateResult::BadEpoch);
        }
        KeyRead::Busy => {
            count(counter::CONTENDED);
            return drop(GateResult::BadEpoch);
        }
    };
    // Step 8: the tag. Counted at the node without the lock.
    if !payload::verify(&key, &buf) {
        state::count_bad_tag(rest);
        return drop(GateResult::BadTag);
    }
    // Steps 9-10 first without the lock, for what they reject: a replay
    // flood never holds the lock the node's fresh heartbeats need.
    if let Some(r) = state::ruled_out(live, rest, &d) {
        state::count_rejected(rest, r);
        return drop(r);
    }
    // Whether an ACK may leave from the addresses the heartbeat came to,
    // read before the lock: the locked section stays the node's update.
    let answerable = cfg.pass_accepted == 0 && ack::answerable(ctx, &f);
    // Steps 9-11 under the node's seqlock.
    let Some(mut l) = Locked::take(live, rest) else {
        count(counter::CONTENDED);
        return drop(GateResult::Replay);
    };
    // Userspace may have freed or reused the slot since the key was read
    // (it does so under this lock): then the datagram is not this slot's.
    if l.get().1.node_id != d.node_id {
        l.release();
        return drop(GateResult::UnknownNode);
    }
    let (live, rest) = l.get();
    let admit = match hb_common::maps::admit(live, rest, &d) {
        Ok(a) => a,
        Err(r) => {
            // Atomic: `ruled_out` counts on other CPUs without the lock.
            state::count_rejected(rest, r);
            l.release();
            return drop(r);
        }
    };
    let now_ns = now();
    // `record` re-derives which `Fresh` case applies; without a barrier
    // LLVM merges that with `admit`'s comparisons and the verifier, which
    // does not track relations between two unknown registers, walks the
    // impossible combination and rejects it. Through memory, the verifier
    // sees one discriminant.
    let admit = core::hint::black_box(admit);
    let rec = hb_common::maps::record(live, rest, &d, admit, now_ns);
    let ack_interval = if answerable {
        let (live, rest) = l.get();
        hb_common::maps::ack_interval(cfg, live, rest, d.interval_ms)
    } else {
        None
    };
    l.release();

    if rec.restarted {
        let mut r = report::about(REPORT_RESTART, &d, rec.prev_generation, now_ns);
        report::send(ctx, &f, cfg, LIMIT_PROVISIONED, &mut r);
    }
    if cfg.pass_accepted != 0 {
        return (XDP_PASS, GateResult::Accepted);
    }
    match ack_interval {
        Some(iv) => send_ack(ctx, &f, &mut buf, &key, iv),
        None => drop(GateResult::Accepted),
    }
}

#[inline(always)]
fn send_ack(
    ctx: &XdpContext,
    f: &Frame,
    buf: &mut Payload,
    key: &hb_common::NodeKey,
    interval_ms: u32,
) -> (u32, GateResult) {
    payload::make_ack(buf, key, interval_ms);
    match ack::rewrite(ctx, f, buf) {
        Some(()) => {
            count(counter::ACK_SENT);
            (XDP_TX, GateResult::Accepted)
        }
        // Cannot happen after parsing; the heartbeat is still accepted.
        None => (XDP_DROP, GateResult::Accepted),
    }
}

/// Arrival time: CLOCK_MONOTONIC ns, the clock of `NodeState`.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

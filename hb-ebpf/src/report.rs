//! Reports to userspace through the `HB_EVENTS` ring buffer, behind a
//! per-CPU token bucket per report kind (`HB_LIMITS`), so a flood of
//! unknown node ids costs the monitor at most `report_rate` wake-ups per
//! second per CPU.
//!
//! The buckets run on CLOCK_MONOTONIC_COARSE (`bpf_ktime_get_coarse_ns`,
//! the time of the last scheduler tick): a rate per second needs no
//! nanoseconds, and on the unknown-node path, which a flood hammers, the
//! fine clock was the largest cost (`bench_gate_ab` on the team VM: about
//! 30 of 73 ns; reading the TSC alone costs 15 ns there). Only a report
//! that passes the limit reads the fine clock for its timestamp.

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    programs::XdpContext,
};
use hb_common::{
    maps::{Config, Report, counter},
    proto::Datagram,
};

use crate::{
    maps::{HB_EVENTS, HB_LIMITS, count},
    parse::{Frame, at},
};

/// Takes one token from bucket `idx`, if there is one (the token bucket
/// is `hb_common`'s, shared with the userspace gate).
#[inline(always)]
fn allow(idx: u32, cfg: &Config) -> bool {
    let Some(b) = HB_LIMITS.get_ptr_mut(idx) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: per-CPU value; XDP runs with preemption disabled.
    let b = unsafe { &mut *b };
    b.take(cfg.report_rate, cfg.report_burst, now_ns)
}

/// Sends `r` (filled but for the source address, port and family, which
/// come from the frame, and for `ts_ns` if 0: then the fine clock's now),
/// unless limited (counted `report_limited`) or the ring is full (counted
/// `report_dropped`).
///
/// A BPF subprogram: it runs rarely, and out of line it costs the hot
/// path nothing, neither instructions nor stack.
#[inline(never)]
pub fn send(ctx: &XdpContext, f: &Frame, cfg: &Config, bucket: u32, r: &mut Report) {
    if !allow(bucket, cfg) {
        count(counter::REPORT_LIMITED);
        return;
    }
    if r.ts_ns == 0 {
        // SAFETY: a helper without arguments.
        r.ts_ns = unsafe { bpf_ktime_get_ns() };
    }
    if f.v6 {
        if let Some(p) = at::<16>(ctx, f.l3 + 8) {
            // SAFETY: in bounds (checked by `at`).
            r.src_addr = unsafe { *p };
        }
        r.family = 6;
    } else {
        if let Some(p) = at::<4>(ctx, f.l3 + 12) {
            // SAFETY: in bounds (checked by `at`).
            let a = unsafe { *p };
            r.src_addr[0] = a[0];
            r.src_addr[1] = a[1];
            r.src_addr[2] = a[2];
            r.src_addr[3] = a[3];
        }
        r.family = 4;
    }
    if let Some(p) = at::<2>(ctx, f.udp) {
        // SAFETY: in bounds (checked by `at`).
        r.src_port = u16::from_be_bytes(unsafe { *p });
    }
    if HB_EVENTS.output::<Report>(&*r, 0).is_err() {
        count(counter::REPORT_DROPPED);
    }
}

/// A report of `kind` about `d` at `now_ns` (0: when sent), without its
/// source.
#[inline(always)]
pub fn about(kind: u32, d: &Datagram, prev_generation: u32, now_ns: u64) -> Report {
    Report {
        ts_ns: now_ns,
        kind,
        node_id: d.node_id,
        generation: d.generation,
        prev_generation,
        key_epoch: d.key_epoch,
        ..Report::default()
    }
}

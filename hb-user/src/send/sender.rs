//! The sender's logic without I/O: building heartbeats, deciding whether an
//! ACK is genuine, smoothing RTT, adopting the monitor's interval.
//!
//! The I/O loop in `send/mod.rs` feeds it clock readings and datagrams; so
//! every rule here is unit-tested with made-up times.
//!
//! ACK acceptance (`PROTOCOL.md`, "ACK") is strict because an ACK changes
//! what the sender does: it must parse as an ACK, carry our node id,
//! generation and key epoch, verify under our key, come from one of our
//! monitors, and answer a `(generation, seq)` we sent recently with the
//! `sent_ns` we sent it with. Each monitor's ACK of a given seq counts
//! once: a replayed ACK is rejected, so it can neither feed the RTT
//! estimator a bogus (late) sample nor apply its interval twice. An ACK
//! older than the last one whose interval we adopted from that monitor
//! still feeds the RTT but does not roll the interval back.
//!
//! With several monitors, each monitor's latest request stands until it
//! sends another, and the sender uses the smallest (the most demanding
//! monitor decides; a slower rate would starve its detector), clamped to
//! the sender's own bounds. An ACK that asks for the very interval its
//! heartbeat carried is an echo and leaves the monitor's standing request
//! as it is: a gate whose monitor has no opinion sends exactly that
//! (PROTOCOL.md), so taking it for a request let a monitor without a
//! controller pin the sender at whatever another monitor had asked for
//! last (it could speed a node up, never slow it down again). A monitor
//! that wants the interval the sender already uses loses nothing by it.
//!
//! A monitor whose name resolved only after the start ([`Sender::add_monitor`])
//! is sent every heartbeat from then on; an ACK from it for an earlier seq
//! answers a heartbeat it was never sent (a replay of another monitor's
//! ACK: every monitor holds the node key) and is rejected.
//!
//! A monitor whose name now resolves to another address is another host:
//! the old address is removed ([`Sender::remove_monitor`]) and the new one
//! added, with nothing carried over. The old host's RTT is not the new
//! one's; its interval request goes with it (the sender takes the fastest
//! of the requests left standing, or, with none left, its configured
//! interval, or a resumed one standing in for another monitor's request:
//! a request must not outlive the monitor that made it); an
//! ACK from the old address is from no monitor of ours, and one for a
//! heartbeat sent before the change is no ACK of the new address's.
//!
//! A sender restarted with `--state-dir` starts at the interval a monitor
//! last asked for (`send::resume`, [`Config::resumed_ms`]), so that the
//! restart announces no change. That monitor, finding it in use, echoes
//! it and holds no request, so the resumed interval stands in for its
//! request: the sender goes back to it, not to its configured interval,
//! with no request standing. It stands as long as the monitor that asked
//! ([`Config::resumed_by`], stored with it): that monitor's removal puts
//! the configured interval in its place (it held the sender at an
//! interval asked for by a monitor long gone), another's does not. When
//! it is not known which monitor asked (a file of an earlier hb), or that
//! monitor is none of ours (its name not resolved yet, or resolving
//! elsewhere since), any removal does (a monitor that still wants the
//! other interval asks again): a move of one monitor sent every resumed
//! node of a fleet to its configured interval and back, two announced
//! changes each, whose statistics every monitor seeded again.
//!
//! RTT samples exclude the sender's own stalls. A stopped process (SIGSTOP,
//! a frozen cgroup, a paused VM) finds the ACK of the heartbeat it sent
//! just before waiting in its socket buffer; `now - sent_ns` is then the
//! stall, not the network: a 60 s freeze put 7.5 s into the smoothed RTT,
//! which took some 40 ACKs to decay and was reported to every monitor
//! meanwhile. The loop cannot see a stall directly, but it knows when it
//! meant to run next (the next heartbeat's due time): woken more than
//! [`STALL_NS`] after that, it was not running in between, and it says so
//! ([`Sender::woke_late`]) on every wakeup, a datagram's too (after a
//! stall the waiting ACK may be handled before the overdue timer). The
//! lateness is measured against the due time, not between heartbeats, so
//! the threshold need not grow with the interval: it only has to stand
//! clear of timer and scheduling noise. An ACK of a heartbeat sent before
//! such a late wakeup still counts (it is genuine, its interval request
//! stands) but gives no RTT sample: its round trip may contain the stall.
//! Heartbeats sent afterwards measure the network again. A stall that
//! ends before the next heartbeat is due is invisible this way (at a 10 s
//! interval, a freeze of a few seconds right after a heartbeat); only the
//! kernel's receive timestamps (`SO_TIMESTAMPNS`, in CLOCK_REALTIME)
//! could tell.

use std::net::SocketAddr;

use hb_common::{
    GateResult,
    proto::{self, Datagram, FLAG_LEAVING, Kind, NodeKey},
};

/// Heartbeats remembered for matching ACKs. An ACK for an older seq is
/// rejected: at the slowest interval (10 s) that is over 10 minutes.
pub const RECENT: usize = 64;
/// At most this many monitors (one acknowledgement bit each per seq).
pub const MAX_MONITORS: usize = 64;
/// How late a wakeup of the sender's loop must be to count as a stall of
/// the sender (see the module docs): far above timer resolution (1 ms)
/// and the scheduling delays of a busy host (a few ms), so that only a
/// process that was not running is taken for one; a sample inflated by
/// less moves the smoothed RTT by under 13 ms.
pub const STALL_NS: u64 = 100_000_000;

/// What the sender is configured with.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: u32,
    pub key: NodeKey,
    pub key_epoch: u8,
    pub generation: u32,
    /// Interval to use until a monitor asks for another, and to go back
    /// to when no request stands, ms (`--interval-ms`).
    pub interval_ms: u32,
    /// The interval to start at instead, ms: the one a monitor last asked
    /// for before a restart (`send::resume`), kept until the monitor
    /// that asked is removed (see the module docs).
    pub resumed_ms: Option<u32>,
    /// The address of the monitor that asked for `resumed_ms`, if known
    /// (stored with it, [`Sender::decided_by`]).
    pub resumed_by: Option<SocketAddr>,
    pub min_interval_ms: u32,
    pub max_interval_ms: u32,
    pub monitors: Vec<SocketAddr>,
}

/// RFC 6298's smoothed round-trip time (alpha 1/8, beta 1/4), in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rtt {
    /// Smoothed RTT, ns; 0 until the first sample.
    pub srtt_ns: u64,
    /// RTT variation, ns.
    pub rttvar_ns: u64,
    pub samples: u64,
}

impl Rtt {
    /// Folds in one measurement (RFC 6298, section 2).
    pub fn sample(&mut self, r_ns: u64) {
        if self.samples == 0 {
            self.srtt_ns = r_ns;
            self.rttvar_ns = r_ns / 2;
        } else {
            let err = self.srtt_ns.abs_diff(r_ns);
            self.rttvar_ns = self.rttvar_ns - self.rttvar_ns / 4 + err / 4;
            self.srtt_ns = self.srtt_ns - self.srtt_ns / 8 + r_ns / 8;
        }
        self.samples += 1;
    }

    /// The smoothed RTT as a heartbeat's `rtt_us`: 0 = unknown, else at
    /// least 1.
    pub fn rtt_us(&self) -> u32 {
        if self.samples == 0 {
            0
        } else {
            (self.srtt_ns / 1000).clamp(1, u32::MAX as u64) as u32
        }
    }
}

/// What the sender knows of one monitor.
#[derive(Clone, Debug)]
pub struct Monitor {
    pub addr: SocketAddr,
    pub rtt: Rtt,
    pub acks: u64,
    /// The interval this monitor last asked for (ms, clamped) and the seq
    /// of the ACK that asked.
    pub requested: Option<(u32, u64)>,
    /// Send errors (unreachable, buffer full): counted, never waited on.
    pub send_errors: u64,
    /// Failed sends in a row, up to the last one (0: the last send left).
    /// What the log's "cannot send" warnings count: a second outage is
    /// warned about as the first was, and its end is said.
    pub failing: u64,
    /// The first seq this monitor was sent (1 for one known from the
    /// start): an ACK of an older one is not its own.
    pub since_seq: u64,
}

impl Monitor {
    fn new(addr: SocketAddr, since_seq: u64) -> Monitor {
        Monitor {
            addr,
            rtt: Rtt::default(),
            acks: 0,
            requested: None,
            send_errors: 0,
            failing: 0,
            since_seq,
        }
    }
}

/// One remembered heartbeat.
#[derive(Clone, Copy, Debug, Default)]
struct Sent {
    seq: u64,
    sent_ns: u64,
    /// The interval the heartbeat announced, ms.
    interval_ms: u32,
    /// Bit `i`: monitor `i` acknowledged it already.
    acked: u64,
    /// Bit `i`: it did not leave for monitor `i` (a send error): an ACK of
    /// it "from" that monitor can only be another monitor's replayed.
    unsent: u64,
}

/// Why an ACK was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckReject {
    #[error("not an ACK ({0})")]
    Malformed(GateResult),
    #[error("from an address that is not one of our monitors")]
    UnknownSource,
    #[error("for another node")]
    WrongNode,
    #[error("signed for another key epoch")]
    WrongEpoch,
    #[error("tag does not verify")]
    BadTag,
    #[error("for another generation")]
    WrongGeneration,
    #[error("for a seq we did not send recently")]
    UnknownSeq,
    #[error("already accepted from this monitor (replay)")]
    Duplicate,
}

impl AckReject {
    pub const ALL: [AckReject; 8] = [
        AckReject::Malformed(GateResult::Malformed),
        AckReject::UnknownSource,
        AckReject::WrongNode,
        AckReject::WrongEpoch,
        AckReject::BadTag,
        AckReject::WrongGeneration,
        AckReject::UnknownSeq,
        AckReject::Duplicate,
    ];

    /// Short name for logs and counters.
    pub const fn name(self) -> &'static str {
        match self {
            AckReject::Malformed(_) => "malformed",
            AckReject::UnknownSource => "unknown_source",
            AckReject::WrongNode => "wrong_node",
            AckReject::WrongEpoch => "wrong_epoch",
            AckReject::BadTag => "bad_tag",
            AckReject::WrongGeneration => "wrong_generation",
            AckReject::UnknownSeq => "unknown_seq",
            AckReject::Duplicate => "duplicate",
        }
    }

    const fn index(self) -> usize {
        match self {
            AckReject::Malformed(_) => 0,
            AckReject::UnknownSource => 1,
            AckReject::WrongNode => 2,
            AckReject::WrongEpoch => 3,
            AckReject::BadTag => 4,
            AckReject::WrongGeneration => 5,
            AckReject::UnknownSeq => 6,
            AckReject::Duplicate => 7,
        }
    }
}

/// An accepted ACK's effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Index of the monitor in [`Sender::monitors`].
    pub monitor: usize,
    /// The round trip measured, or `None` when the heartbeat was sent
    /// before a stall of the sender (see the module docs).
    pub rtt_sample_ns: Option<u64>,
    /// `Some((old, new))` when the interval in use changed.
    pub interval_change: Option<(u32, u32)>,
    /// The interval the ACK asked for, before this sender's bounds
    /// (0: no request).
    pub asked_ms: u32,
}

/// What [`Sender::remove_monitor`] removed.
#[derive(Clone, Debug)]
pub struct Removed {
    /// What the sender knew of the monitor.
    pub monitor: Monitor,
    /// `Some((old, new))` when the interval in use changed: the monitor's
    /// request was the one that decided it.
    pub interval_change: Option<(u32, u32)>,
}

/// Why [`Sender::add_monitor`] did not add a monitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddMonitorError {
    #[error("already a monitor (number {})", .0 + 1)]
    Duplicate(usize),
    #[error("at most {MAX_MONITORS} monitors")]
    Full,
}

/// The heartbeat sender's state.
#[derive(Debug)]
pub struct Sender {
    cfg: Config,
    monitors: Vec<Monitor>,
    /// Last seq sent (0: none yet; the first heartbeat is 1).
    seq: u64,
    /// When the last stall of the sender ended (CLOCK_MONOTONIC ns, 0:
    /// none seen): heartbeats sent before give no RTT sample.
    stalled_until_ns: u64,
    interval_ms: u32,
    /// [`Config::resumed_ms`] until the monitor that asked is removed:
    /// what the sender goes back to, instead of [`Config::interval_ms`],
    /// with no request standing.
    resumed_ms: Option<u32>,
    recent: [Sent; RECENT],
    pub sent: u64,
    /// ACKs accepted and failed sends, of every monitor ever (removed ones
    /// too).
    pub acks: u64,
    pub send_errors: u64,
    rejected: [u64; AckReject::ALL.len()],
}

impl Sender {
    /// A sender for `cfg`. The caller checked the bounds and the monitor
    /// count (see `send::Args`); they are clamped here anyway.
    pub fn new(cfg: Config) -> Sender {
        let monitors = cfg
            .monitors
            .iter()
            .take(MAX_MONITORS)
            .map(|&addr| Monitor::new(addr, 1))
            .collect();
        let resumed_ms = cfg.resumed_ms;
        let mut sender = Sender {
            cfg,
            monitors,
            seq: 0,
            stalled_until_ns: 0,
            interval_ms: 0,
            resumed_ms,
            recent: [Sent::default(); RECENT],
            sent: 0,
            acks: 0,
            send_errors: 0,
            rejected: [0; AckReject::ALL.len()],
        };
        sender.settle_interval();
        sender
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn monitors(&self) -> &[Monitor] {
        &self.monitors
    }

    /// Adds a monitor (one whose name resolved after the start); it is
    /// sent every heartbeat from the next one on. Returns its index.
    pub fn add_monitor(&mut self, addr: SocketAddr) -> Result<usize, AddMonitorError> {
        if let Some(i) = self.monitors.iter().position(|m| m.addr == addr) {
            return Err(AddMonitorError::Duplicate(i));
        }
        if self.monitors.len() >= MAX_MONITORS {
            return Err(AddMonitorError::Full);
        }
        self.monitors.push(Monitor::new(addr, self.seq + 1));
        Ok(self.monitors.len() - 1)
    }

    /// Stops sending to the monitor at `addr` (its name resolves to
    /// another address now) and forgets it: its ACKs are no longer
    /// accepted and its interval request no longer counts. `None` if it
    /// is no monitor of ours.
    pub fn remove_monitor(&mut self, addr: SocketAddr) -> Option<Removed> {
        let i = self.monitors.iter().position(|m| m.addr == addr)?;
        let monitor = self.monitors.remove(i);
        // Bit `j` of `acked` is monitor `j`: the bits of those after `i`
        // move down with them.
        let below = (1u64 << i) - 1;
        let drop_bit =
            |bits: u64| (bits & below) | (bits.checked_shr(i as u32 + 1).unwrap_or(0) << i);
        for s in &mut self.recent {
            s.acked = drop_bit(s.acked);
            s.unsent = drop_bit(s.unsent);
        }
        // The monitor that asked for a resumed interval may be this one:
        // unless it is known to be another, still ours.
        let asker_stays = self
            .cfg
            .resumed_by
            .is_some_and(|a| a != addr && self.monitors.iter().any(|m| m.addr == a));
        if !asker_stays {
            self.resumed_ms = None;
        }
        Some(Removed {
            monitor,
            interval_change: self.settle_interval(),
        })
    }

    /// Sets the interval in use to the fastest request standing or, with
    /// none, to the resumed interval while it stands, else to the
    /// configured one; returns the change.
    fn settle_interval(&mut self) -> Option<(u32, u32)> {
        let old = self.interval_ms;
        self.interval_ms = self
            .monitors
            .iter()
            .filter_map(|m| m.requested.map(|(iv, _)| iv))
            .min()
            .unwrap_or_else(|| {
                self.resumed_ms
                    .unwrap_or(self.cfg.interval_ms)
                    .clamp(self.cfg.min_interval_ms, self.cfg.max_interval_ms)
            });
        (old != self.interval_ms).then_some((old, self.interval_ms))
    }

    /// Tells the sender its loop woke at `now_ns`, `late_ns` after it
    /// meant to (after its next heartbeat was due; 0 when it was not
    /// due yet). Later than [`STALL_NS`] is a stall: ACKs of heartbeats
    /// sent before `now_ns` give no RTT sample (see the module docs).
    pub fn woke_late(&mut self, late_ns: u64, now_ns: u64) {
        if late_ns > STALL_NS {
            self.stalled_until_ns = self.stalled_until_ns.max(now_ns);
        }
    }

    /// Counts a failed send of the last heartbeat to monitor `i`, which
    /// then accepts no ACK of it. Returns the failed sends to it in a row,
    /// this one included.
    pub fn send_failed(&mut self, i: usize) -> u64 {
        let Some(m) = self.monitors.get_mut(i) else {
            return 0;
        };
        m.send_errors += 1;
        m.failing += 1;
        self.send_errors += 1;
        let slot = &mut self.recent[(self.seq % RECENT as u64) as usize];
        if slot.seq == self.seq && i < 64 {
            slot.unsent |= 1 << i;
        }
        m.failing
    }

    /// Notes that the last heartbeat left for monitor `i`. Returns how
    /// many sends to it had failed in a row before (0: none).
    pub fn send_ok(&mut self, i: usize) -> u64 {
        self.monitors
            .get_mut(i)
            .map_or(0, |m| std::mem::take(&mut m.failing))
    }

    /// The interval in use, ms.
    pub fn interval_ms(&self) -> u32 {
        self.interval_ms
    }

    /// The address of the monitor whose request decides the interval in
    /// use (the fastest; the first of several asking for it), or of the
    /// one that asked for the resumed interval standing in for its
    /// request; `None` with neither (the configured interval, or a
    /// resumed one whose asker is not known). Stored with the interval
    /// (`send::resume`), so that a restart knows which monitor it stands
    /// for.
    pub fn decided_by(&self) -> Option<SocketAddr> {
        let fastest = self
            .monitors
            .iter()
            .filter_map(|m| m.requested.map(|(iv, _)| (iv, m.addr)))
            .min_by_key(|&(iv, _)| iv);
        match fastest {
            Some((_, addr)) => Some(addr),
            None => self.resumed_ms.and(self.cfg.resumed_by),
        }
    }

    /// The last seq sent.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// ACKs rejected, by reason.
    pub fn rejected(&self) -> impl Iterator<Item = (AckReject, u64)> + '_ {
        AckReject::ALL
            .iter()
            .map(|r| (*r, self.rejected[r.index()]))
    }

    /// The next heartbeat, one datagram per monitor (each carries that
    /// monitor's RTT, so each has its own tag). `now_ns` is
    /// CLOCK_MONOTONIC; `load` is in permille.
    pub fn heartbeat(
        &mut self,
        now_ns: u64,
        load: u16,
        leaving: bool,
    ) -> Vec<(SocketAddr, [u8; proto::LEN])> {
        self.seq += 1;
        self.sent += 1;
        self.recent[(self.seq % RECENT as u64) as usize] = Sent {
            seq: self.seq,
            sent_ns: now_ns,
            interval_ms: self.interval_ms,
            acked: 0,
            unsent: 0,
        };
        let mut d = Datagram {
            kind: Kind::Heartbeat,
            node_id: self.cfg.node_id,
            generation: self.cfg.generation,
            key_epoch: self.cfg.key_epoch,
            flags: if leaving { FLAG_LEAVING } else { 0 },
            load: load.min(proto::LOAD_MAX),
            seq: self.seq,
            sent_ns: now_ns,
            interval_ms: self.interval_ms,
            rtt_us: 0,
        };
        self.monitors
            .iter()
            .map(|m| {
                d.rtt_us = m.rtt.rtt_us();
                (m.addr, d.seal(&self.cfg.key))
            })
            .collect()
    }

    /// Judges a datagram that arrived from `from` at `now_ns` and, if it is
    /// a genuine ACK, applies it.
    pub fn on_ack(
        &mut self,
        payload: &[u8],
        from: SocketAddr,
        now_ns: u64,
    ) -> Result<Accepted, AckReject> {
        let r = self.judge(payload, from, now_ns);
        if let Err(e) = r {
            self.rejected[e.index()] += 1;
        }
        r
    }

    fn judge(
        &mut self,
        payload: &[u8],
        from: SocketAddr,
        now_ns: u64,
    ) -> Result<Accepted, AckReject> {
        let buf: &[u8; proto::LEN] = payload
            .try_into()
            .map_err(|_| AckReject::Malformed(GateResult::Malformed))?;
        let ack = proto::parse_fixed(buf, Kind::Ack).map_err(AckReject::Malformed)?;
        let mi = self
            .monitors
            .iter()
            .position(|m| same_endpoint(m.addr, from))
            .ok_or(AckReject::UnknownSource)?;
        if ack.node_id != self.cfg.node_id {
            return Err(AckReject::WrongNode);
        }
        if ack.key_epoch != self.cfg.key_epoch {
            return Err(AckReject::WrongEpoch);
        }
        if !proto::verify(&self.cfg.key, buf) {
            return Err(AckReject::BadTag);
        }
        if ack.generation != self.cfg.generation {
            return Err(AckReject::WrongGeneration);
        }
        let slot = &mut self.recent[(ack.seq % RECENT as u64) as usize];
        if ack.seq == 0 || slot.seq != ack.seq || slot.sent_ns != ack.sent_ns {
            return Err(AckReject::UnknownSeq);
        }
        // A heartbeat sent before this monitor was added, or whose send to
        // it failed, was not sent to it.
        let bit = 1u64 << mi;
        if ack.seq < self.monitors[mi].since_seq || slot.unsent & bit != 0 {
            return Err(AckReject::UnknownSeq);
        }
        if slot.acked & bit != 0 {
            return Err(AckReject::Duplicate);
        }
        // CLOCK_MONOTONIC never goes back; a sample "before" the send can
        // only be a caller bug, and must not poison the estimate.
        let Some(rtt) = now_ns.checked_sub(slot.sent_ns) else {
            return Err(AckReject::UnknownSeq);
        };
        slot.acked |= bit;
        let echo = ack.interval_ms == slot.interval_ms;
        // Its round trip may hold a stall of ours (see the module docs).
        let rtt = (slot.sent_ns >= self.stalled_until_ns).then_some(rtt);
        let m = &mut self.monitors[mi];
        m.acks += 1;
        self.acks += 1;
        if let Some(r) = rtt {
            m.rtt.sample(r);
        }
        // `interval_ms` 0 is no request, nor is an echo (see the module
        // docs); a request from an ACK older than the one we last adopted
        // from this monitor is out of date.
        if ack.interval_ms != 0 && !echo && m.requested.is_none_or(|(_, s)| ack.seq > s) {
            let clamped = ack
                .interval_ms
                .clamp(self.cfg.min_interval_ms, self.cfg.max_interval_ms);
            m.requested = Some((clamped, ack.seq));
        }
        Ok(Accepted {
            monitor: mi,
            rtt_sample_ns: rtt,
            interval_change: self.settle_interval(),
            asked_ms: ack.interval_ms,
        })
    }
}

/// Whether `from` is the monitor at `addr` (an IPv4 monitor may answer a
/// dual-stack socket as an IPv4-mapped IPv6 address).
fn same_endpoint(addr: SocketAddr, from: SocketAddr) -> bool {
    if addr == from {
        return true;
    }
    match (addr, from) {
        (SocketAddr::V4(a), SocketAddr::V6(f)) => {
            f.ip().to_ipv4_mapped() == Some(*a.ip()) && f.port() == a.port()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: NodeKey = NodeKey { k0: 7, k1: 9 };
    const GEN: u32 = 1_700_000_000;
    const MS: u64 = 1_000_000;

    fn mon(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, i], 7420))
    }

    fn config(monitors: usize) -> Config {
        Config {
            node_id: 42,
            key: KEY,
            key_epoch: 1,
            generation: GEN,
            interval_ms: 1000,
            resumed_ms: None,
            resumed_by: None,
            min_interval_ms: 100,
            max_interval_ms: 10_000,
            monitors: (1..=monitors as u8).map(mon).collect(),
        }
    }

    fn sender(monitors: usize) -> Sender {
        Sender::new(config(monitors))
    }

    /// What the monitor's gate sends back for `hb` (the same helper the
    /// XDP program uses).
    fn ack_of(hb: &[u8; proto::LEN], key: &NodeKey, interval_ms: u32) -> [u8; proto::LEN] {
        let mut a = *hb;
        proto::make_ack(&mut a, key, interval_ms);
        a
    }

    #[test]
    fn heartbeats_follow_the_protocol() {
        let mut s = sender(2);
        let out = s.heartbeat(5 * MS, 1234, false);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].0, out[1].0), (mon(1), mon(2)));
        let (_, b) = out[0];
        assert!(proto::verify(&KEY, &b));
        let d = proto::parse(&b, Kind::Heartbeat).unwrap();
        assert_eq!(
            (d.node_id, d.generation, d.key_epoch, d.flags, d.seq),
            (42, GEN, 1, 0, 1)
        );
        assert_eq!(
            (d.load, d.sent_ns, d.interval_ms, d.rtt_us),
            (1000, 5 * MS, 1000, 0)
        );
        let (_, b) = s.heartbeat(6 * MS, 10, true)[1];
        let d = proto::parse(&b, Kind::Heartbeat).unwrap();
        assert_eq!((d.seq, d.flags, d.load), (2, FLAG_LEAVING, 10));
        assert!(d.leaving());
    }

    #[test]
    fn a_genuine_ack_sets_rtt_and_interval() {
        let mut s = sender(1);
        let (from, hb) = s.heartbeat(10 * MS, 0, false)[0];
        let a = s.on_ack(&ack_of(&hb, &KEY, 500), from, 13 * MS).unwrap();
        assert_eq!(
            a,
            Accepted {
                monitor: 0,
                rtt_sample_ns: Some(3 * MS),
                interval_change: Some((1000, 500)),
                asked_ms: 500,
            }
        );
        assert_eq!(s.interval_ms(), 500);
        assert_eq!(s.monitors()[0].rtt.rtt_us(), 3000);
        // The next heartbeat reports both.
        let (_, hb) = s.heartbeat(20 * MS, 0, false)[0];
        let d = proto::parse(&hb, Kind::Heartbeat).unwrap();
        assert_eq!((d.interval_ms, d.rtt_us), (500, 3000));
        // Asking for the same interval again changes nothing.
        let a = s.on_ack(&ack_of(&hb, &KEY, 500), from, 21 * MS).unwrap();
        assert_eq!(a.interval_change, None);
    }

    /// One row per way an ACK can be wrong; none may touch RTT, interval
    /// or the acknowledgement bits.
    #[test]
    fn forged_foreign_and_unknown_acks_are_rejected() {
        let mut s = sender(1);
        let (from, hb) = s.heartbeat(10 * MS, 0, false)[0];
        let good = ack_of(&hb, &KEY, 500);
        let resign = |mutate: &dyn Fn(&mut Datagram)| {
            let mut d = proto::parse(&good, Kind::Ack).unwrap();
            mutate(&mut d);
            d.seal(&KEY)
        };
        let mut flipped = good;
        flipped[33] ^= 0x10; // interval changed after signing
        let cases: Vec<(&str, Vec<u8>, SocketAddr, AckReject)> = vec![
            (
                "short",
                good[..47].to_vec(),
                from,
                AckReject::Malformed(GateResult::Malformed),
            ),
            (
                "heartbeat, not ACK",
                hb.to_vec(),
                from,
                AckReject::Malformed(GateResult::BadKind),
            ),
            (
                "other source",
                good.to_vec(),
                mon(9),
                AckReject::UnknownSource,
            ),
            (
                "other port",
                good.to_vec(),
                SocketAddr::from(([198, 18, 0, 1], 7421)),
                AckReject::UnknownSource,
            ),
            (
                "forged: wrong key",
                ack_of(&hb, &NodeKey { k0: 1, k1: 2 }, 500).to_vec(),
                from,
                AckReject::BadTag,
            ),
            ("forged: altered", flipped.to_vec(), from, AckReject::BadTag),
            (
                "other node",
                resign(&|d| d.node_id = 43).to_vec(),
                from,
                AckReject::WrongNode,
            ),
            (
                "other epoch",
                resign(&|d| d.key_epoch = 2).to_vec(),
                from,
                AckReject::WrongEpoch,
            ),
            (
                "old generation",
                resign(&|d| d.generation = GEN - 1).to_vec(),
                from,
                AckReject::WrongGeneration,
            ),
            (
                "never sent seq",
                resign(&|d| d.seq = 2).to_vec(),
                from,
                AckReject::UnknownSeq,
            ),
            (
                "seq 0",
                resign(&|d| d.seq = 0).to_vec(),
                from,
                AckReject::UnknownSeq,
            ),
            (
                "wrong sent_ns echo",
                resign(&|d| d.sent_ns += 1).to_vec(),
                from,
                AckReject::UnknownSeq,
            ),
        ];
        for (what, payload, src, want) in cases {
            assert_eq!(s.on_ack(&payload, src, 12 * MS), Err(want), "{what}");
        }
        assert_eq!(s.interval_ms(), 1000);
        assert_eq!(s.monitors()[0].rtt, Rtt::default());
        // The genuine one still works afterwards.
        assert!(s.on_ack(&good, from, 12 * MS).is_ok());
        assert_eq!(s.interval_ms(), 500);
    }

    #[test]
    fn replayed_ack_changes_nothing() {
        let mut s = sender(1);
        let (from, hb1) = s.heartbeat(10 * MS, 0, false)[0];
        let ack1 = ack_of(&hb1, &KEY, 500);
        s.on_ack(&ack1, from, 12 * MS).unwrap();
        let rtt = s.monitors()[0].rtt;
        // The monitor now asks for 2000 on a later heartbeat.
        let (_, hb2) = s.heartbeat(20 * MS, 0, false)[0];
        let ack2 = ack_of(&hb2, &KEY, 2000);
        let a = s.on_ack(&ack2, from, 21 * MS).unwrap();
        assert_eq!(a.interval_change, Some((500, 2000)));
        let rtt2 = s.monitors()[0].rtt;
        assert_ne!(rtt, rtt2);
        // An attacker replays both: neither the interval nor the RTT move.
        assert_eq!(s.on_ack(&ack1, from, 900 * MS), Err(AckReject::Duplicate));
        assert_eq!(s.on_ack(&ack2, from, 900 * MS), Err(AckReject::Duplicate));
        assert_eq!(s.interval_ms(), 2000);
        assert_eq!(s.monitors()[0].rtt, rtt2);
    }

    #[test]
    fn reordered_older_ack_does_not_roll_the_interval_back() {
        let mut s = sender(1);
        let (from, hb1) = s.heartbeat(10 * MS, 0, false)[0];
        let (_, hb2) = s.heartbeat(20 * MS, 0, false)[0];
        s.on_ack(&ack_of(&hb2, &KEY, 2000), from, 22 * MS).unwrap();
        let a = s.on_ack(&ack_of(&hb1, &KEY, 500), from, 23 * MS).unwrap();
        assert_eq!(a.interval_change, None);
        assert_eq!(s.interval_ms(), 2000);
        assert_eq!(s.monitors()[0].rtt.samples, 2, "still a valid RTT sample");
    }

    #[test]
    fn acks_older_than_the_recent_ring_are_rejected() {
        let mut s = sender(1);
        let (from, old) = s.heartbeat(MS, 0, false)[0];
        for i in 0..RECENT as u64 {
            s.heartbeat((2 + i) * MS, 0, false);
        }
        assert_eq!(
            s.on_ack(&ack_of(&old, &KEY, 500), from, 100 * MS),
            Err(AckReject::UnknownSeq)
        );
    }

    #[test]
    fn requested_interval_is_clamped_to_our_bounds() {
        for (asked, got) in [
            (1, 100),
            (99, 100),
            (100, 100),
            (5000, 5000),
            (10_000, 10_000),
            (10_001, 10_000),
            (u32::MAX, 10_000),
        ] {
            let mut s = sender(1);
            let (from, hb) = s.heartbeat(MS, 0, false)[0];
            s.on_ack(&ack_of(&hb, &KEY, asked), from, 2 * MS).unwrap();
            assert_eq!(s.interval_ms(), got, "asked {asked}");
        }
        // 0 is no opinion.
        let mut s = sender(1);
        let (from, hb) = s.heartbeat(MS, 0, false)[0];
        s.on_ack(&ack_of(&hb, &KEY, 0), from, 2 * MS).unwrap();
        assert_eq!(s.interval_ms(), 1000);
    }

    #[test]
    fn a_monitor_without_an_opinion_pins_no_interval() {
        // Monitor 1 runs a controller; monitor 2 has none, so its gate
        // echoes whatever interval each heartbeat carries.
        let mut s = sender(2);
        let round = |s: &mut Sender, t: u64, asked: u32| {
            let hbs = s.heartbeat(t * MS, 0, false);
            let echo = proto::parse(&hbs[1].1, Kind::Heartbeat)
                .unwrap()
                .interval_ms;
            s.on_ack(&ack_of(&hbs[0].1, &KEY, asked), mon(1), (t + 1) * MS)
                .unwrap();
            s.on_ack(&ack_of(&hbs[1].1, &KEY, echo), mon(2), (t + 1) * MS)
                .unwrap();
            s.interval_ms()
        };
        assert_eq!(round(&mut s, 10, 500), 500);
        assert_eq!(round(&mut s, 20, 500), 500);
        // Slower again: the echo of 500 was no request (it once was, and
        // held the node at 500 for good).
        assert_eq!(round(&mut s, 30, 2000), 2000);
        assert_eq!(round(&mut s, 40, 2000), 2000);
        assert_eq!(s.monitors()[1].requested, None);
        // A request that differs from the heartbeat's interval stands.
        let hbs = s.heartbeat(50 * MS, 0, false);
        s.on_ack(&ack_of(&hbs[1].1, &KEY, 700), mon(2), 51 * MS)
            .unwrap();
        assert_eq!(s.interval_ms(), 700);
        // ... and monitor 2 echoing it afterwards keeps it standing.
        assert_eq!(round(&mut s, 60, 2000), 700);
    }

    #[test]
    fn several_monitors_each_ack_once_and_the_fastest_request_wins() {
        let mut s = sender(2);
        let hbs = s.heartbeat(10 * MS, 0, false);
        let a0 = ack_of(&hbs[0].1, &KEY, 2000);
        let a1 = ack_of(&hbs[1].1, &KEY, 400);
        assert_eq!(
            s.on_ack(&a0, mon(1), 11 * MS).unwrap().interval_change,
            Some((1000, 2000))
        );
        // Monitor 2's ACK of the same seq is its own, not a replay.
        assert_eq!(
            s.on_ack(&a1, mon(2), 15 * MS).unwrap().interval_change,
            Some((2000, 400))
        );
        // Monitor 1's ACK replayed "from" monitor 2: its tag is valid, but
        // monitor 2 already acknowledged that seq.
        assert_eq!(s.on_ack(&a0, mon(2), 16 * MS), Err(AckReject::Duplicate));
        assert_eq!(s.interval_ms(), 400);
        assert_eq!(s.monitors()[0].rtt.rtt_us(), 1000);
        assert_eq!(s.monitors()[1].rtt.rtt_us(), 5000);
        // Each monitor's heartbeat carries its own RTT.
        let hbs = s.heartbeat(20 * MS, 0, false);
        let rtts: Vec<u32> = hbs
            .iter()
            .map(|(_, b)| proto::parse(b, Kind::Heartbeat).unwrap().rtt_us)
            .collect();
        assert_eq!(rtts, vec![1000, 5000]);
        let counts: Vec<(AckReject, u64)> = s.rejected().filter(|(_, n)| *n > 0).collect();
        assert_eq!(counts, vec![(AckReject::Duplicate, 1)]);
    }

    /// Random traffic at the sender's socket: genuine ACKs (some lost,
    /// some late, some asking for absurd intervals), some with one bit
    /// flipped, replayed or from the other monitor's address, and random
    /// bytes. Only a genuine first ACK of a recent heartbeat is accepted;
    /// nothing else moves the interval or the RTT; the interval stays
    /// inside the sender's bounds.
    #[test]
    fn random_traffic_moves_nothing_but_genuine_acks() {
        use rand::{RngExt as _, SeedableRng as _};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4303);
        let mut s = sender(2);
        let mut now = MS;
        let mut pending: Vec<(SocketAddr, [u8; proto::LEN])> = Vec::new();
        let mut genuine = Vec::new();
        let (mut accepted, mut rejected) = (0, 0);
        for step in 0..20_000 {
            now += rng.random_range(1..50 * MS);
            if pending.is_empty() || rng.random_bool(0.3) {
                pending.extend(s.heartbeat(now, rng.random_range(0..1000), false));
            }
            let before = (s.interval_ms(), s.monitors()[0].rtt, s.monitors()[1].rtt);
            let (from, hb) = pending.swap_remove(rng.random_range(0..pending.len()));
            let ask = match rng.random_range(0..4) {
                0 => 0,
                1 => u32::MAX,
                _ => rng.random_range(1..20_000),
            };
            let ack = ack_of(&hb, &KEY, ask);
            let (payload, src, honest) = match rng.random_range(0..10) {
                0 => {
                    let mut b = ack;
                    let bit = rng.random_range(0..proto::LEN * 8);
                    b[bit / 8] ^= 1 << (bit % 8);
                    (b.to_vec(), from, false)
                }
                // The other monitor's address: every monitor holds the
                // node key, so the protocol cannot tell them apart; the
                // sender takes it as that monitor's first ACK of the seq.
                1 => {
                    let other = if from == mon(1) { mon(2) } else { mon(1) };
                    (ack.to_vec(), other, true)
                }
                2 => {
                    let len = rng.random_range(0..64);
                    ((0..len).map(|_| rng.random()).collect(), from, false)
                }
                3 if !genuine.is_empty() => {
                    let (src, b): (SocketAddr, [u8; proto::LEN]) =
                        genuine[rng.random_range(0..genuine.len())];
                    (b.to_vec(), src, false)
                }
                _ => (ack.to_vec(), from, true),
            };
            match s.on_ack(&payload, src, now) {
                Ok(_) => {
                    accepted += 1;
                    // Only a genuine ACK of a heartbeat still in the ring
                    // may be accepted.
                    assert!(honest, "step {step}: accepted a forged ACK");
                    genuine.push((src, ack));
                }
                Err(_) => {
                    rejected += 1;
                    let after = (s.interval_ms(), s.monitors()[0].rtt, s.monitors()[1].rtt);
                    assert_eq!(after, before, "step {step}: a rejected ACK moved state");
                }
            }
            let iv = s.interval_ms();
            assert!((100..=10_000).contains(&iv), "step {step}: interval {iv}");
        }
        assert!(
            accepted > 1000 && rejected > 1000,
            "{accepted} / {rejected}"
        );
    }

    /// The sender was frozen for a minute right after a heartbeat whose
    /// ACK came back within 1 ms: the ACK waited in the socket buffer and
    /// must not enter the RTT as a minute.
    #[test]
    fn an_ack_held_up_by_a_stall_of_the_sender_gives_no_rtt_sample() {
        let mut s = sender(1);
        let (from, hb) = s.heartbeat(10 * MS, 0, false)[0];
        s.on_ack(&ack_of(&hb, &KEY, 0), from, 11 * MS).unwrap();
        assert_eq!(s.monitors()[0].rtt.rtt_us(), 1000);
        let (_, hb) = s.heartbeat(1010 * MS, 0, false)[0];
        // Frozen from 1011 ms to 61 s: the loop wakes 60 s after the next
        // heartbeat was due (2010 ms), and finds the ACK.
        let thaw = 61_000 * MS;
        s.woke_late(thaw - 2010 * MS, thaw);
        let a = s
            .on_ack(&ack_of(&hb, &KEY, 500), from, thaw + 1000)
            .unwrap();
        assert_eq!(a.rtt_sample_ns, None);
        assert_eq!(a.interval_change, Some((1000, 500)), "still a genuine ACK");
        assert_eq!(s.monitors()[0].rtt.rtt_us(), 1000, "not 7.5 s");
        assert_eq!(s.monitors()[0].acks, 2);
        // The heartbeat sent at the thaw measures the network again.
        let (_, hb) = s.heartbeat(thaw + 2000, 0, false)[0];
        let a = s.on_ack(&ack_of(&hb, &KEY, 500), from, thaw + 2000 + 3 * MS);
        assert_eq!(a.unwrap().rtt_sample_ns, Some(3 * MS));
        assert_eq!(s.monitors()[0].rtt.samples, 2);
    }

    /// A wakeup late by timer or scheduling noise is no stall.
    #[test]
    fn a_slightly_late_wakeup_keeps_rtt_samples() {
        for late in [0, MS, 20 * MS, STALL_NS] {
            let mut s = sender(1);
            let (from, hb) = s.heartbeat(10 * MS, 0, false)[0];
            s.woke_late(late, 12 * MS);
            let a = s.on_ack(&ack_of(&hb, &KEY, 0), from, 12 * MS).unwrap();
            assert_eq!(a.rtt_sample_ns, Some(2 * MS), "late by {late} ns");
        }
        let mut s = sender(1);
        let (from, hb) = s.heartbeat(10 * MS, 0, false)[0];
        s.woke_late(STALL_NS + 1, 12 * MS);
        let a = s.on_ack(&ack_of(&hb, &KEY, 0), from, 12 * MS).unwrap();
        assert_eq!(a.rtt_sample_ns, None);
    }

    #[test]
    fn a_monitor_added_later_gets_the_next_heartbeat_and_only_acks_of_it() {
        let mut s = sender(1);
        let (_, before) = s.heartbeat(10 * MS, 0, false)[0];
        assert_eq!(s.add_monitor(mon(2)), Ok(1));
        assert_eq!(s.add_monitor(mon(2)), Err(AddMonitorError::Duplicate(1)));
        assert_eq!(s.add_monitor(mon(1)), Err(AddMonitorError::Duplicate(0)));
        let hbs = s.heartbeat(20 * MS, 0, false);
        assert_eq!(
            hbs.iter().map(|h| h.0).collect::<Vec<_>>(),
            [mon(1), mon(2)]
        );
        let d = proto::parse(&hbs[1].1, Kind::Heartbeat).unwrap();
        assert_eq!(d.seq, 2);
        // Monitor 1's ACK of seq 1 "from" monitor 2: never sent it seq 1.
        assert_eq!(
            s.on_ack(&ack_of(&before, &KEY, 500), mon(2), 21 * MS),
            Err(AckReject::UnknownSeq)
        );
        let a = s.on_ack(&ack_of(&hbs[1].1, &KEY, 500), mon(2), 22 * MS);
        assert_eq!(a.unwrap().monitor, 1);
        assert_eq!(s.interval_ms(), 500);
        // Up to MAX_MONITORS.
        for i in 3..=MAX_MONITORS as u8 {
            s.add_monitor(mon(i)).unwrap();
        }
        assert_eq!(s.add_monitor(mon(200)), Err(AddMonitorError::Full));
        // None at all to start with: heartbeats go nowhere, seqs still count.
        let mut s = sender(0);
        assert!(s.heartbeat(MS, 0, false).is_empty());
        s.add_monitor(mon(1)).unwrap();
        let (_, hb) = s.heartbeat(2 * MS, 0, false)[0];
        assert_eq!(proto::parse(&hb, Kind::Heartbeat).unwrap().seq, 2);
    }

    /// Monitor 1's name now resolves to another host (monitor 3): its
    /// request, which decided the interval, goes with it, and nothing from
    /// its old address, or of a heartbeat sent before the change, counts
    /// as the new host's ACK.
    #[test]
    fn a_moved_monitor_s_request_and_acks_stay_with_the_old_address() {
        let mut s = sender(2);
        let hbs = s.heartbeat(10 * MS, 0, false);
        s.on_ack(&ack_of(&hbs[0].1, &KEY, 200), mon(1), 11 * MS)
            .unwrap();
        s.on_ack(&ack_of(&hbs[1].1, &KEY, 2000), mon(2), 12 * MS)
            .unwrap();
        assert_eq!(s.interval_ms(), 200);
        // Sent to the old address just before the change; answered after.
        let late = s.heartbeat(20 * MS, 0, false);
        let gone = s.remove_monitor(mon(1)).unwrap();
        assert_eq!(gone.monitor.addr, mon(1));
        assert_eq!(gone.interval_change, Some((200, 2000)));
        assert_eq!(s.interval_ms(), 2000);
        assert!(s.remove_monitor(mon(1)).is_none());
        assert_eq!(s.add_monitor(mon(3)), Ok(1));
        // The old host's ACK, from its address or replayed from the new
        // one: neither is accepted, nor moves the interval.
        let old_ack = ack_of(&late[0].1, &KEY, 100);
        assert_eq!(
            s.on_ack(&old_ack, mon(1), 21 * MS),
            Err(AckReject::UnknownSource)
        );
        assert_eq!(
            s.on_ack(&old_ack, mon(3), 21 * MS),
            Err(AckReject::UnknownSeq)
        );
        assert_eq!(s.interval_ms(), 2000);
        // Monitor 2 moved down a place, its acknowledgements with it.
        assert_eq!(
            s.on_ack(&ack_of(&hbs[1].1, &KEY, 2000), mon(2), 22 * MS),
            Err(AckReject::Duplicate)
        );
        let a = s.on_ack(&ack_of(&late[1].1, &KEY, 2000), mon(2), 22 * MS);
        assert_eq!(a.unwrap().monitor, 0);
        // The new host starts afresh: no RTT, and its own requests count.
        let hbs = s.heartbeat(30 * MS, 0, false);
        assert_eq!(
            hbs.iter().map(|h| h.0).collect::<Vec<_>>(),
            [mon(2), mon(3)]
        );
        let d = proto::parse(&hbs[1].1, Kind::Heartbeat).unwrap();
        assert_eq!(d.rtt_us, 0);
        let a = s.on_ack(&ack_of(&hbs[1].1, &KEY, 300), mon(3), 31 * MS);
        assert_eq!(a.unwrap().interval_change, Some((2000, 300)));
        assert_eq!(s.monitors()[1].acks, 1);
        // The totals keep what the old address counted.
        assert_eq!(s.acks, 4);
    }

    /// With no request left standing the sender goes back to the interval
    /// it started at, not the one the gone monitor asked for.
    #[test]
    fn with_the_only_request_gone_the_sender_goes_back_to_its_start() {
        let mut s = sender(2);
        let hbs = s.heartbeat(10 * MS, 0, false);
        s.on_ack(&ack_of(&hbs[0].1, &KEY, 200), mon(1), 11 * MS)
            .unwrap();
        s.send_failed(0);
        assert_eq!(s.interval_ms(), 200);
        // Monitor 2 only ever echoes.
        s.on_ack(&ack_of(&hbs[1].1, &KEY, 1000), mon(2), 11 * MS)
            .unwrap();
        assert_eq!(s.interval_ms(), 200);
        let gone = s.remove_monitor(mon(1)).unwrap();
        assert_eq!(gone.interval_change, Some((200, 1000)));
        assert_eq!((gone.monitor.acks, gone.monitor.send_errors), (1, 1));
        assert_eq!((s.acks, s.send_errors), (2, 1));
        // Removing one that asked for nothing changes nothing.
        assert_eq!(s.remove_monitor(mon(2)).unwrap().interval_change, None);
        assert!(s.monitors().is_empty());
    }

    /// Monitor 1 asked for 200 ms; then its name moves to another host.
    /// Without a restart in between the sender goes back to its
    /// `--interval-ms`; restarted in between with `--state-dir`, it
    /// resumed at 200 ms (which monitor 1 then echoes, holding no
    /// request) and must go back all the same: it stayed at 200 ms, the
    /// gone monitor's request outliving it.
    #[test]
    fn a_resumed_interval_does_not_outlive_a_monitor_that_moves() {
        let mut s = sender(2);
        let hbs = s.heartbeat(10 * MS, 0, false);
        s.on_ack(&ack_of(&hbs[0].1, &KEY, 200), mon(1), 11 * MS)
            .unwrap();
        assert_eq!(s.interval_ms(), 200);
        let gone = s.remove_monitor(mon(1)).unwrap();
        assert_eq!(gone.interval_change, Some((200, 1000)));
        // Restarted: resumed at 200 ms, kept while both monitors echo it.
        let mut s = Sender::new(Config {
            resumed_ms: Some(200),
            ..config(2)
        });
        assert_eq!(s.interval_ms(), 200);
        let hbs = s.heartbeat(10 * MS, 0, false);
        assert_eq!(
            proto::parse(&hbs[0].1, Kind::Heartbeat)
                .unwrap()
                .interval_ms,
            200
        );
        for (i, (from, hb)) in hbs.iter().enumerate() {
            let a = s.on_ack(&ack_of(hb, &KEY, 200), *from, 11 * MS).unwrap();
            assert_eq!(a.interval_change, None);
            assert_eq!(s.monitors()[i].requested, None, "an echo");
        }
        assert_eq!(s.interval_ms(), 200);
        let gone = s.remove_monitor(mon(1)).unwrap();
        assert_eq!(gone.interval_change, Some((200, 1000)));
        assert_eq!(s.interval_ms(), 1000);
        // And it stays there: an ACK with no request moves nothing.
        let (from, hb) = s.heartbeat(20 * MS, 0, false)[0];
        let a = s.on_ack(&ack_of(&hb, &KEY, 1000), from, 21 * MS).unwrap();
        assert_eq!((a.interval_change, s.interval_ms()), (None, 1000));
        // A resumed interval past the bounds is clamped into them.
        let s = Sender::new(Config {
            resumed_ms: Some(20),
            ..config(1)
        });
        assert_eq!(s.interval_ms(), 100);
    }

    /// Resumed at 200 ms, which monitor 1 asked for before the restart:
    /// monitor 2 moving leaves it standing (it went back to 1000 ms, and
    /// to 200 ms again at monitor 1's next ACK, two announced changes);
    /// monitor 1 moving does not. Not knowing who asked, or the one who
    /// did being none of ours, any move does.
    #[test]
    fn a_resumed_interval_stands_while_the_monitor_that_asked_does() {
        let resumed = |by: Option<SocketAddr>| {
            let mut s = Sender::new(Config {
                resumed_ms: Some(200),
                resumed_by: by,
                ..config(3)
            });
            let hbs = s.heartbeat(10 * MS, 0, false);
            for (from, hb) in &hbs {
                s.on_ack(&ack_of(hb, &KEY, 200), *from, 11 * MS).unwrap();
            }
            assert_eq!((s.interval_ms(), s.decided_by()), (200, by));
            s
        };
        let mut s = resumed(Some(mon(1)));
        assert_eq!(s.remove_monitor(mon(2)).unwrap().interval_change, None);
        assert_eq!((s.interval_ms(), s.decided_by()), (200, Some(mon(1))));
        // Monitor 3 asks for faster, then moves: back to monitor 1's.
        let (from, hb) = s.heartbeat(20 * MS, 0, false)[1];
        s.on_ack(&ack_of(&hb, &KEY, 150), from, 21 * MS).unwrap();
        assert_eq!((s.interval_ms(), s.decided_by()), (150, Some(mon(3))));
        let gone = s.remove_monitor(mon(3)).unwrap();
        assert_eq!(gone.interval_change, Some((150, 200)));
        assert_eq!(s.decided_by(), Some(mon(1)));
        // The one that asked goes: so does its request.
        let gone = s.remove_monitor(mon(1)).unwrap();
        assert_eq!(gone.interval_change, Some((200, 1000)));
        assert_eq!((s.interval_ms(), s.decided_by()), (1000, None));
        for by in [None, Some(mon(9))] {
            let mut s = resumed(by);
            let gone = s.remove_monitor(mon(2)).unwrap();
            assert_eq!(gone.interval_change, Some((200, 1000)), "{by:?}");
        }
    }

    /// The acknowledgement bits of the monitors after a removed one move
    /// down with them, wherever it was (the 64th too).
    #[test]
    fn removing_any_monitor_keeps_the_others_acknowledgements() {
        for gone in [0, 1, 31, MAX_MONITORS - 1] {
            let mut s = sender(0);
            for i in 1..=MAX_MONITORS as u8 {
                s.add_monitor(mon(i)).unwrap();
            }
            let hbs = s.heartbeat(10 * MS, 0, false);
            for (i, (to, hb)) in hbs.iter().enumerate() {
                if i % 2 == 0 {
                    s.on_ack(&ack_of(hb, &KEY, 0), *to, 11 * MS).unwrap();
                }
            }
            s.remove_monitor(mon(gone as u8 + 1)).unwrap();
            for (i, (to, hb)) in hbs.iter().enumerate().filter(|(i, _)| *i != gone) {
                let r = s.on_ack(&ack_of(hb, &KEY, 0), *to, 12 * MS);
                if i % 2 == 0 {
                    assert_eq!(r, Err(AckReject::Duplicate), "gone {gone}, {i}");
                } else {
                    let want = if i > gone { i - 1 } else { i };
                    assert_eq!(r.unwrap().monitor, want, "gone {gone}, {i}");
                }
            }
        }
    }

    #[test]
    fn ipv4_monitor_may_answer_as_mapped_ipv6() {
        let mut s = sender(1);
        let (_, hb) = s.heartbeat(MS, 0, false)[0];
        let mapped: SocketAddr = "[::ffff:198.18.0.1]:7420".parse().unwrap();
        assert!(s.on_ack(&ack_of(&hb, &KEY, 500), mapped, 2 * MS).is_ok());
    }

    #[test]
    fn rtt_smoothing_follows_rfc_6298() {
        let mut r = Rtt::default();
        assert_eq!(r.rtt_us(), 0, "unknown until the first sample");
        r.sample(800_000);
        assert_eq!((r.srtt_ns, r.rttvar_ns), (800_000, 400_000));
        r.sample(1_600_000);
        // rttvar = 3/4 * 400 + 1/4 * |800 - 1600| = 500 us
        // srtt = 7/8 * 800 + 1/8 * 1600 = 900 us
        assert_eq!((r.srtt_ns, r.rttvar_ns), (900_000, 500_000));
        assert_eq!(r.rtt_us(), 900);
        // A steady RTT converges to itself, with shrinking variation.
        for _ in 0..100 {
            r.sample(2_000_000);
        }
        assert!(r.srtt_ns.abs_diff(2_000_000) < 1_000, "{r:?}");
        assert!(r.rttvar_ns < 10_000, "{r:?}");
        // Sub-microsecond RTT is still "known".
        let mut r = Rtt::default();
        r.sample(300);
        assert_eq!(r.rtt_us(), 1);
    }

    /// With the gate's own logic (`hb_common::maps`): monitor 2 has no
    /// opinion (periodic ACKs, no request), and a reordered heartbeat's
    /// ACK echoes that heartbeat's interval. It carried the newest one's,
    /// which the sender took for a standing request of monitor 2: the
    /// fastest request winning, the node stayed at 500 ms for good.
    #[test]
    fn a_reordered_heartbeat_does_not_make_a_monitor_without_opinion_pin_the_interval() {
        use hb_common::maps::{self, NodeState};
        let gate_cfg = maps::Config {
            ack_every: 1,
            ..maps::Config::default()
        };
        let mut st = NodeState::default();
        let mut gate = |b: &[u8; proto::LEN], now: u64| {
            let d = proto::parse(b, Kind::Heartbeat).unwrap();
            let a = st.admit(&d).unwrap();
            st.record(&d, a, now);
            let (live, rest) = st.split_mut();
            let iv = maps::ack_interval(&gate_cfg, live, rest, d.interval_ms).unwrap();
            ack_of(b, &KEY, iv)
        };
        let mut s = sender(2);
        // seq 1 (1000 ms): monitor 1 asks for 500.
        let h1 = s.heartbeat(10 * MS, 0, false);
        s.on_ack(&ack_of(&h1[0].1, &KEY, 500), mon(1), 11 * MS)
            .unwrap();
        assert_eq!(s.interval_ms(), 500);
        // seq 2 (500 ms) reaches monitor 2 before seq 1 does.
        let h2 = s.heartbeat(12 * MS, 0, false);
        let a2 = gate(&h2[1].1, 13 * MS);
        let a1 = gate(&h1[1].1, 14 * MS);
        s.on_ack(&a2, mon(2), 15 * MS).unwrap();
        s.on_ack(&a1, mon(2), 15 * MS).unwrap();
        // Monitor 1 now wants 2000; monitor 2 never asked for anything.
        let h3 = s.heartbeat(16 * MS, 0, false);
        s.on_ack(&ack_of(&h3[0].1, &KEY, 2000), mon(1), 17 * MS)
            .unwrap();
        assert_eq!(s.monitors()[1].requested, None, "monitor 2 has no opinion");
        assert_eq!(s.interval_ms(), 2000);
    }

    /// A heartbeat whose send to a monitor failed was never sent to it:
    /// an ACK of it "from" that monitor can only be another monitor's
    /// replayed (every monitor signs with the node's key), and is refused;
    /// it set that monitor's RTT and interval request.
    #[test]
    fn an_ack_of_a_heartbeat_that_never_left_for_that_monitor_is_refused() {
        let mut s = sender(2);
        let hbs = s.heartbeat(10 * MS, 0, false);
        s.send_failed(1);
        let replay = ack_of(&hbs[0].1, &KEY, 100);
        assert_eq!(
            s.on_ack(&replay, mon(2), 12 * MS),
            Err(AckReject::UnknownSeq)
        );
        // Monitor 1's own is taken.
        assert!(s.on_ack(&replay, mon(1), 12 * MS).is_ok());
    }

    /// Property tests of the sender's ACK handling: whatever arrives on
    /// its socket (any bytes of any length, ACKs of any interval, from
    /// its monitors, their IPv4-mapped forms or anyone else, at any pace,
    /// with up to 64 monitors and any bounds the flags allow) is judged
    /// without a panic or an overflow; a rejected datagram moves nothing;
    /// the interval stays within the bounds.
    mod props {
        use proptest::prelude::*;

        use super::*;

        #[derive(Clone, Debug)]
        enum Input {
            Heartbeat {
                after_ns: u64,
            },
            /// The ACK of pending heartbeat `which`, asking `interval_ms`,
            /// from `from` (a monitor's index, or a stranger's), one bit
            /// flipped or not.
            Ack {
                which: prop::sample::Index,
                interval_ms: u32,
                from: u8,
                flip: Option<usize>,
            },
            Bytes {
                bytes: Vec<u8>,
                from: u8,
            },
        }

        fn input() -> impl Strategy<Value = Input> {
            prop_oneof![
                prop_oneof![0..100 * MS, 0..u64::MAX / 1024, Just(0u64)]
                    .prop_map(|after_ns| Input::Heartbeat { after_ns }),
                (
                    any::<prop::sample::Index>(),
                    prop_oneof![Just(0u32), 1..20_000u32, any::<u32>()],
                    any::<u8>(),
                    prop::option::of(0..proto::LEN * 8),
                )
                    .prop_map(|(which, interval_ms, from, flip)| Input::Ack {
                        which,
                        interval_ms,
                        from,
                        flip,
                    }),
                (
                    prop_oneof![
                        4 => prop::collection::vec(any::<u8>(), 0..100),
                        1 => prop::collection::vec(any::<u8>(), 0..2100),
                    ],
                    any::<u8>()
                )
                    .prop_map(|(bytes, from)| Input::Bytes { bytes, from }),
            ]
        }

        /// Monitor `i` (1-based) as it may answer: its address, or the
        /// same as an IPv4-mapped IPv6 address; 0 and past the monitors:
        /// a stranger.
        fn source(from: u8, monitors: usize) -> SocketAddr {
            let i = from % (monitors as u8 + 2);
            if from & 0x80 != 0 {
                let v6 = match mon(i) {
                    SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
                    SocketAddr::V6(a) => *a.ip(),
                };
                SocketAddr::from((v6, 7420))
            } else {
                mon(i)
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            #[test]
            fn anything_on_the_socket_is_judged_and_bounds_hold(
                monitors in prop_oneof![1..=3usize, Just(MAX_MONITORS)],
                bounds in (
                    crate::send::FLOOR_INTERVAL_MS..=crate::send::CEILING_INTERVAL_MS,
                    crate::send::FLOOR_INTERVAL_MS..=crate::send::CEILING_INTERVAL_MS,
                ),
                inputs in prop::collection::vec(input(), 1..100),
            ) {
                let (min, max) = (bounds.0.min(bounds.1), bounds.0.max(bounds.1));
                let mut cfg = config(monitors);
                (cfg.min_interval_ms, cfg.max_interval_ms, cfg.interval_ms) = (min, max, min);
                let mut s = Sender::new(cfg);
                let mut now = MS;
                let mut pending: Vec<(SocketAddr, [u8; proto::LEN])> = Vec::new();
                for inp in inputs {
                    let before = (s.interval_ms(), s.monitors().iter().map(|m| m.rtt).collect::<Vec<_>>());
                    let r = match inp {
                        Input::Heartbeat { after_ns } => {
                            now = now.saturating_add(after_ns);
                            pending = s.heartbeat(now, u16::MAX, false);
                            continue;
                        }
                        Input::Ack { .. } | Input::Bytes { .. } if pending.is_empty() => continue,
                        Input::Ack { which, interval_ms, from, flip } => {
                            let (to, hb) = *which.get(&pending);
                            let mut ack = ack_of(&hb, &KEY, interval_ms);
                            if let Some(bit) = flip {
                                ack[bit / 8] ^= 1 << (bit % 8);
                            }
                            let src = if from < 128 { to } else { source(from, monitors) };
                            s.on_ack(&ack, src, now)
                        }
                        Input::Bytes { bytes, from } => s.on_ack(&bytes, source(from, monitors), now),
                    };
                    if r.is_err() {
                        let after = (s.interval_ms(), s.monitors().iter().map(|m| m.rtt).collect::<Vec<_>>());
                        prop_assert_eq!(after, before);
                    }
                    let iv = s.interval_ms();
                    prop_assert!((min..=max).contains(&iv), "{} outside {}-{}", iv, min, max);
                }
            }
        }
    }
}

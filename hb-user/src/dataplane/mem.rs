//! The gate over an in-memory table: `PROTOCOL.md`'s gate steps 2 to 11
//! exactly as the XDP program runs them (both call `hb-common`), without
//! the frame parsing (the socket already stripped the headers).
//!
//! Used by `--mode userspace` (see `monitor`), by tests and by `hb
//! simulate`. All state sits behind one mutex: a userspace gate handles one
//! datagram at a time anyway, and the tick takes the lock once per scan.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    ops::Range,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use hb_common::{
    GateResult,
    maps::{
        self, Config, MAX_NODES, NodeKeys, NodeLive, NodeRest, NodeState, REPORT_BAD_EPOCH,
        REPORT_RESTART, REPORT_UNKNOWN_NODE, RateLimit, Report,
    },
    proto::{self, Kind},
};
use tokio::sync::mpsc;

use super::{Counters, Dataplane, LiveFn, PREFETCH_AHEAD, prefetch};

struct Inner {
    keys: HashMap<u32, NodeKeys>,
    /// Every slot's state in its two parts, as the kernel keeps them: the
    /// tick streams through `live`.
    live: Vec<NodeLive>,
    rest: Vec<NodeRest>,
    counters: Counters,
    config: Config,
    /// Token buckets of the report rate limit: unknown nodes, restarts
    /// (as the kernel's `HB_LIMITS`).
    limits: [RateLimit; 2],
}

/// What the gate did with one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub result: GateResult,
    /// For an accepted heartbeat that the ACK policy answers: the ACK
    /// payload to send back to the datagram's source.
    pub ack: Option<[u8; proto::LEN]>,
}

/// When the userspace gate's socket tasks read datagrams
/// ([`MemDataplane::note_read`]): the monitor's paused-host excuse asks
/// whether they did in a window ([`Dataplane::gate_ran_between`]). The
/// arrivals they stamp cannot say: those are the kernel's receive times,
/// which go on while the monitor process is stopped, and a backlog read
/// before the excuse is asked (it may be, or not) would then refuse it.
#[derive(Default)]
struct Reads {
    /// The latest read (CLOCK_MONOTONIC ns); 0: none yet.
    last_ns: AtomicU64,
    /// The latest gaps between reads longer than [`READ_GAP_NS`], oldest
    /// first, at most [`READ_GAPS`].
    gaps: Mutex<VecDeque<(u64, u64)>>,
}

/// A gap between two reads worth remembering: shorter than any window the
/// excuse asks about (at least 400 ms).
const READ_GAP_NS: u64 = 50_000_000;
/// Enough for the gap of a pause and the few a sparse fleet makes before
/// the tick asks, right after the pause.
const READ_GAPS: usize = 8;

/// The in-memory gate.
pub struct MemDataplane {
    inner: Mutex<Inner>,
    reports_tx: mpsc::Sender<Report>,
    reports_rx: Option<mpsc::Receiver<Report>>,
    reads: Reads,
}

impl Default for MemDataplane {
    fn default() -> Self {
        Self::new()
    }
}

impl MemDataplane {
    pub fn new() -> Self {
        let (reports_tx, reports_rx) = mpsc::channel(1024);
        MemDataplane {
            inner: Mutex::new(Inner {
                keys: HashMap::new(),
                live: Vec::new(),
                rest: Vec::new(),
                counters: [0; hb_common::maps::counter::LEN as usize],
                config: Config::default(),
                limits: [RateLimit::default(); 2],
            }),
            reports_tx,
            reports_rx: Some(reports_rx),
            reads: Reads::default(),
        }
    }

    /// The gate's configuration in force.
    pub fn config(&self) -> Config {
        self.lock().config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the table half
        // updated in a way that matters more than losing the process.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gates one UDP payload that arrived at `now_ns` (CLOCK_MONOTONIC)
    /// from `src`. Counts the result, and the ACK as sent if there is one.
    pub fn gate(&self, payload: &[u8], src: SocketAddr, now_ns: u64) -> Verdict {
        self.gate_counting(payload, src, now_ns, true)
    }

    /// [`Self::gate`] for a gate that sends its ACKs itself: the ACK is
    /// not counted as sent; [`Self::ack_sent`] once it went out (as the
    /// kernel counts an ACK once its frame is rewritten). The send happens
    /// outside the gate's lock, which the tick's scan takes too.
    pub fn gate_unsent(&self, payload: &[u8], src: SocketAddr, now_ns: u64) -> Verdict {
        self.gate_counting(payload, src, now_ns, false)
    }

    /// One hold of the lock per datagram (the simulator gates millions).
    fn gate_counting(
        &self,
        payload: &[u8],
        src: SocketAddr,
        now_ns: u64,
        ack_sent: bool,
    ) -> Verdict {
        let mut g = self.lock();
        let v = g.gate(payload, src, now_ns, &self.reports_tx);
        g.counters[v.result.index() as usize] += 1;
        if ack_sent && v.ack.is_some() {
            g.counters[hb_common::maps::counter::ACK_SENT as usize] += 1;
        }
        v
    }

    /// Counts an ACK that went out.
    pub fn ack_sent(&self) {
        self.lock().counters[hb_common::maps::counter::ACK_SENT as usize] += 1;
    }

    /// Counts a result decided before the gate: a datagram the kernel
    /// reassembled from fragments (`malformed`, see `monitor::userspace`).
    pub fn count(&self, result: GateResult) {
        self.lock().counters[result.index() as usize] += 1;
    }

    /// A socket task read a datagram at `now_ns` (CLOCK_MONOTONIC): the
    /// gate ran then (see [`Reads`]). Several tasks may call it at once.
    pub fn note_read(&self, now_ns: u64) {
        let last = &self.reads.last_ns;
        let seen = last.load(Ordering::Acquire);
        if seen != 0 && now_ns <= seen.saturating_add(READ_GAP_NS) {
            // No gap: lock-free, as nearly every read.
            last.fetch_max(now_ns, Ordering::AcqRel);
            return;
        }
        // A gap ends (or the first read): the read and its gap are
        // published together, under the lock `gate_ran_between` reads
        // them under, or it could see the read without the gap.
        let mut gaps = self.reads.gaps.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.fetch_max(now_ns, Ordering::AcqRel);
        if prev != 0 && now_ns > prev.saturating_add(READ_GAP_NS) {
            if gaps.len() == READ_GAPS {
                gaps.pop_front();
            }
            gaps.push_back((prev, now_ns));
        }
    }
}

impl Inner {
    fn gate(
        &mut self,
        payload: &[u8],
        src: SocketAddr,
        now_ns: u64,
        reports: &mpsc::Sender<Report>,
    ) -> Verdict {
        let reject = |result| Verdict { result, ack: None };
        let Ok(buf) = <&[u8; proto::LEN]>::try_from(payload) else {
            return reject(GateResult::Malformed);
        };
        let d = match proto::parse_fixed(buf, Kind::Heartbeat) {
            Ok(d) => d,
            Err(r) => return reject(r),
        };
        let Some(keys) = self.keys.get(&d.node_id).copied() else {
            self.report(REPORT_UNKNOWN_NODE, &d, 0, src, now_ns, reports);
            return reject(GateResult::UnknownNode);
        };
        let Some(key) = keys.find(d.key_epoch) else {
            self.report(REPORT_BAD_EPOCH, &d, 0, src, now_ns, reports);
            return reject(GateResult::BadEpoch);
        };
        let (Some(live), Some(rest)) = (
            self.live.get_mut(keys.slot as usize),
            self.rest.get_mut(keys.slot as usize),
        ) else {
            // A slot outside the table is a provisioning bug, not the
            // network's fault; treat the node as not provisioned.
            return reject(GateResult::UnknownNode);
        };
        if !proto::verify(key, buf) {
            rest.bad_tag = rest.bad_tag.wrapping_add(1);
            return reject(GateResult::BadTag);
        }
        let admit = match maps::admit(live, rest, &d) {
            Ok(a) => a,
            Err(r) => {
                match r {
                    GateResult::Stale => rest.stale = rest.stale.wrapping_add(1),
                    _ => rest.replay = rest.replay.wrapping_add(1),
                }
                return reject(r);
            }
        };
        let rec = maps::record(live, rest, &d, admit, now_ns);
        let ack = self.ack_for(keys.slot, buf, key, d.interval_ms);
        if rec.restarted {
            self.report(
                REPORT_RESTART,
                &d,
                rec.prev_generation,
                src,
                now_ns,
                reports,
            );
        }
        Verdict {
            result: GateResult::Accepted,
            ack,
        }
    }

    fn ack_for(
        &mut self,
        slot: u32,
        buf: &[u8; proto::LEN],
        key: &hb_common::NodeKey,
        heard_ms: u32,
    ) -> Option<[u8; proto::LEN]> {
        let cfg = self.config;
        if cfg.pass_accepted != 0 {
            return None;
        }
        let (live, rest) = (&self.live[slot as usize], &mut self.rest[slot as usize]);
        let interval = maps::ack_interval(&cfg, live, rest, heard_ms)?;
        let mut ack = *buf;
        proto::make_ack(&mut ack, key, interval);
        Some(ack)
    }

    fn report(
        &mut self,
        kind: u32,
        d: &proto::Datagram,
        prev_generation: u32,
        src: SocketAddr,
        now_ns: u64,
        reports: &mpsc::Sender<Report>,
    ) {
        // The same token bucket as the kernel's (one bucket here: one CPU).
        let cfg = self.config;
        let bucket = if kind == REPORT_UNKNOWN_NODE { 0 } else { 1 };
        if !self.limits[bucket].take(cfg.report_rate, cfg.report_burst, now_ns) {
            self.counters[hb_common::maps::counter::REPORT_LIMITED as usize] += 1;
            return;
        }
        let (family, src_addr) = match src {
            SocketAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.ip().octets());
                (4, b)
            }
            SocketAddr::V6(a) => (6, a.ip().octets()),
        };
        let r = Report {
            ts_ns: now_ns,
            kind,
            node_id: d.node_id,
            generation: d.generation,
            prev_generation,
            src_port: src.port(),
            family,
            key_epoch: d.key_epoch,
            src_addr,
            _pad: 0,
        };
        if reports.try_send(r).is_err() {
            self.counters[hb_common::maps::counter::REPORT_DROPPED as usize] += 1;
        }
    }
}

impl Dataplane for MemDataplane {
    fn upsert_node(&self, node_id: u32, keys: &NodeKeys) -> anyhow::Result<()> {
        anyhow::ensure!(node_id != 0, "node id 0 is reserved");
        anyhow::ensure!(
            keys.slot < MAX_NODES,
            "slot {} is beyond the capacity of {MAX_NODES} nodes",
            keys.slot
        );
        let mut g = self.lock();
        let slot = keys.slot as usize;
        if g.live.len() <= slot {
            g.live.resize(slot + 1, NodeLive::default());
            g.rest.resize(slot + 1, NodeRest::default());
        }
        let rotated = match g.keys.insert(node_id, *keys) {
            // Moved: the state goes along, the old slot is freed.
            Some(old) if old.slot != keys.slot => {
                let o = old.slot as usize;
                let (live, rest) = (g.live[o], g.rest[o]);
                g.live[o] = NodeLive::default();
                g.rest[o] = NodeRest::default();
                g.live[slot] = live;
                g.rest[slot] = rest;
                true
            }
            // Key rotation: the state stays.
            Some(_) => true,
            // A new node starts from a clean slot, as in the kernel:
            // nothing written there before (say a requested interval)
            // carries over.
            None => {
                g.live[slot] = NodeLive::default();
                g.rest[slot] = NodeRest::default();
                false
            }
        };
        // The id and keys at the slot, as the kernel keeps them; but for
        // what a revoked epoch set.
        let g = &mut *g;
        if hb_common::maps::rekey(&mut g.live[slot], &mut g.rest[slot], node_id, keys) && rotated {
            super::log_revoked(node_id);
        }
        Ok(())
    }

    fn remove_node(&self, node_id: u32) -> anyhow::Result<()> {
        let mut g = self.lock();
        if let Some(old) = g.keys.remove(&node_id)
            && (old.slot as usize) < g.live.len()
        {
            g.live[old.slot as usize] = NodeLive::default();
            g.rest[old.slot as usize] = NodeRest::default();
        }
        Ok(())
    }

    fn provisioned(&self) -> anyhow::Result<Vec<(u32, NodeKeys)>> {
        Ok(self.lock().keys.iter().map(|(id, k)| (*id, *k)).collect())
    }

    fn read_states(&self, slots: Range<u32>, f: &mut dyn FnMut(u32, &NodeState)) {
        let g = self.lock();
        let end = (slots.end as usize).min(g.live.len()) as u32;
        for slot in slots.start..end {
            let i = slot as usize;
            f(slot, &NodeState::from_parts(&g.live[i], &g.rest[i]));
        }
    }

    fn read_live(&self, slots: Range<u32>, f: &mut LiveFn) {
        let g = self.lock();
        let end = (slots.end as usize).min(g.live.len()) as u32;
        for slot in slots.start..end {
            let i = slot as usize;
            if let Some(ahead) = g.live.get(i + PREFETCH_AHEAD) {
                prefetch(ahead);
            }
            let (live, rest) = (&g.live[i], &g.rest[i]);
            f(slot, live, &|| NodeState::from_parts(live, rest));
        }
    }

    fn set_requested_interval(&self, slot: u32, interval_ms: u32) {
        if let Some(r) = self.lock().rest.get_mut(slot as usize) {
            r.requested_interval_ms = interval_ms;
        }
    }

    fn set_monitor_status(&self, slot: u32, status: u32, since_ns: u64) {
        if let Some(r) = self.lock().rest.get_mut(slot as usize) {
            r.monitor_status = status;
            r.monitor_status_since_ns = since_ns;
        }
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        Ok(self.lock().counters)
    }

    /// By the socket tasks' reads ([`MemDataplane::note_read`]), once
    /// there are any: a monitor process stopped did not read in the
    /// window, whenever it drains its backlog; one starved still did.
    fn gate_ran_between(&self, from_ns: u64, to_ns: u64) -> Option<bool> {
        let gaps = self.reads.gaps.lock().unwrap_or_else(|e| e.into_inner());
        let last = self.reads.last_ns.load(Ordering::Acquire);
        if last == 0 {
            return None; // read by no socket task (tests, the simulator)
        }
        if last <= from_ns {
            return Some(false); // idle since before the window
        }
        Some(!gaps.iter().any(|&(s, e)| s <= from_ns && e >= to_ns))
    }

    fn set_config(&self, cfg: &Config) -> anyhow::Result<()> {
        let mut g = self.lock();
        g.config = *cfg;
        Ok(())
    }

    fn take_reports(&mut self) -> Option<mpsc::Receiver<Report>> {
        self.reports_rx.take()
    }
}

/// Test doubles built on the in-memory gate.
#[cfg(test)]
pub mod testing {
    use std::{
        borrow::Borrow,
        ops::Range,
        sync::atomic::{AtomicU64, Ordering},
    };

    use hb_common::maps::{Config, NodeKeys, NodeState, Report};

    use super::MemDataplane;
    use crate::dataplane::{Counters, Dataplane, LiveFn};

    /// The in-memory gate with a fault of the XDP dataplane's that it
    /// cannot have itself.
    pub struct Faulty<M> {
        pub mem: M,
        /// A slot whose state cannot be read (held by a writer that died):
        /// reads skip it and count it, as the XDP dataplane's do
        /// ([`Dataplane::stuck_reads`]).
        unreadable: Option<u32>,
        /// Applied to what `read_live`'s second read returns: the kernel
        /// wrote the node between the two reads.
        later: Option<fn(&mut NodeState)>,
        skipped: AtomicU64,
    }

    impl<M: Borrow<MemDataplane>> Faulty<M> {
        pub fn unreadable(mem: M, slot: u32) -> Faulty<M> {
            Faulty {
                mem,
                unreadable: Some(slot),
                later: None,
                skipped: AtomicU64::new(0),
            }
        }

        /// `read_live`'s full read of every node sees `later` done to it.
        pub fn written_between_reads(mem: M, later: fn(&mut NodeState)) -> Faulty<M> {
            Faulty {
                mem,
                unreadable: None,
                later: Some(later),
                skipped: AtomicU64::new(0),
            }
        }

        fn mem(&self) -> &MemDataplane {
            self.mem.borrow()
        }
    }

    impl<M: Borrow<MemDataplane> + Send + Sync> Dataplane for Faulty<M> {
        fn upsert_node(&self, node_id: u32, keys: &NodeKeys) -> anyhow::Result<()> {
            self.mem().upsert_node(node_id, keys)
        }
        fn remove_node(&self, node_id: u32) -> anyhow::Result<()> {
            self.mem().remove_node(node_id)
        }
        fn provisioned(&self) -> anyhow::Result<Vec<(u32, NodeKeys)>> {
            self.mem().provisioned()
        }
        fn read_states(&self, slots: Range<u32>, f: &mut dyn FnMut(u32, &NodeState)) {
            self.mem().read_states(slots, &mut |slot, st| {
                if Some(slot) == self.unreadable {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                } else {
                    f(slot, st)
                }
            })
        }
        fn read_live(&self, slots: Range<u32>, f: &mut LiveFn) {
            self.mem().read_live(slots, &mut |slot, st, full| {
                if Some(slot) == self.unreadable {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                } else if let Some(later) = self.later {
                    f(slot, st, &|| {
                        let mut s = full();
                        later(&mut s);
                        s
                    })
                } else {
                    f(slot, st, full)
                }
            })
        }
        fn set_requested_interval(&self, slot: u32, interval_ms: u32) {
            self.mem().set_requested_interval(slot, interval_ms)
        }
        fn set_monitor_status(&self, slot: u32, status: u32, since_ns: u64) {
            self.mem().set_monitor_status(slot, status, since_ns)
        }
        fn counters(&self) -> anyhow::Result<Counters> {
            self.mem().counters()
        }
        fn set_config(&self, cfg: &Config) -> anyhow::Result<()> {
            self.mem().set_config(cfg)
        }
        fn take_reports(&mut self) -> Option<tokio::sync::mpsc::Receiver<Report>> {
            None
        }
        fn stuck_reads(&self) -> u64 {
            self.skipped.load(Ordering::Relaxed)
        }
    }
}

#[cfg(test)]
mod tests {
    use hb_common::{Datagram, NodeKey};

    use super::*;

    const SRC: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 18, 0, 2),
        40000,
    ));

    fn key() -> NodeKey {
        NodeKey { k0: 11, k1: 22 }
    }

    fn dp() -> MemDataplane {
        let dp = MemDataplane::new();
        let keys = NodeKeys::single(0, 1, key());
        dp.upsert_node(42, &keys).unwrap();
        dp
    }

    fn hb(seq: u64) -> Datagram {
        Datagram {
            kind: Kind::Heartbeat,
            node_id: 42,
            generation: 5,
            key_epoch: 1,
            flags: 0,
            load: 0,
            seq,
            sent_ns: 99,
            interval_ms: 1000,
            rtt_us: 0,
        }
    }

    #[test]
    fn every_gate_result_in_order() {
        let dp = dp();
        let good = hb(1).seal(&key());
        let r = |p: &[u8]| dp.gate(p, SRC, 1_000).result;
        assert_eq!(r(&good[..40]), GateResult::Malformed);
        let mut b = good;
        b[0] = 0;
        assert_eq!(r(&b), GateResult::BadMagic);
        let mut b = good;
        b[2] = 2;
        assert_eq!(r(&b), GateResult::BadVersion);
        let mut b = good;
        b[3] = 2;
        assert_eq!(r(&b), GateResult::BadKind);
        let mut d = hb(1);
        d.node_id = 7;
        assert_eq!(r(&d.seal(&key())), GateResult::UnknownNode);
        let mut d = hb(1);
        d.key_epoch = 2;
        assert_eq!(r(&d.seal(&key())), GateResult::BadEpoch);
        assert_eq!(
            r(&hb(1).seal(&NodeKey { k0: 1, k1: 2 })),
            GateResult::BadTag
        );
        assert_eq!(r(&good), GateResult::Accepted);
        assert_eq!(r(&good), GateResult::Replay);
        let mut d = hb(2);
        d.generation = 4;
        assert_eq!(r(&d.seal(&key())), GateResult::Stale);
        let c = dp.counters().unwrap();
        for res in GateResult::ALL.iter().skip(1) {
            assert_eq!(c[res.index() as usize], 1, "{res}");
        }
        let mut seen = 0;
        dp.read_states(0..1, &mut |_, s| {
            seen += 1;
            assert_eq!((s.accepted, s.bad_tag, s.replay, s.stale), (1, 1, 1, 1));
        });
        assert_eq!(seen, 1);
    }

    #[test]
    fn an_ack_is_counted_as_sent_only_once_it_went_out() {
        let dp = dp();
        dp.set_config(&Config {
            ack_every: 1,
            ..Config::default()
        })
        .unwrap();
        let sent = |seq, ok| {
            let v = dp.gate_unsent(&hb(seq).seal(&key()), SRC, seq);
            assert!(v.ack.is_some());
            if ok {
                dp.ack_sent();
            }
            dp.counters().unwrap()[hb_common::maps::counter::ACK_SENT as usize]
        };
        assert_eq!(sent(1, false), 0, "the send failed");
        assert_eq!(sent(2, true), 1);
        assert_eq!(
            dp.counters().unwrap()[GateResult::Accepted.index() as usize],
            2
        );
    }

    #[test]
    fn provisioning_keeps_state_on_rotation_and_moves_and_starts_new_nodes_clean() {
        let dp = dp();
        let state = |slot: u32| {
            let mut out = NodeState::default();
            dp.read_states(slot..slot + 1, &mut |_, s| out = *s);
            out
        };
        dp.gate(&hb(1).seal(&key()), SRC, 1);
        dp.set_monitor_status(0, 3, 77);
        let record = |s: NodeState| (s.monitor_status, s.monitor_status_since_ns);
        // Rotation: a second key, the state stays.
        let mut keys = NodeKeys::single(0, 1, key());
        keys.epoch[1] = 2;
        keys.valid = 3;
        dp.upsert_node(42, &keys).unwrap();
        assert_eq!((state(0).accepted, state(0).key_valid), (1, 3));
        assert_eq!(record(state(0)), (3, 77));
        // Moved: the state goes along, the old slot is freed.
        keys.slot = 5;
        dp.upsert_node(42, &keys).unwrap();
        assert_eq!((state(5).accepted, state(5).node_id), (1, 42));
        assert_eq!(record(state(5)), (3, 77));
        assert_eq!(state(0), NodeState::default());
        // A new node on a slot something was written to starts clean.
        dp.set_requested_interval(0, 250);
        dp.set_monitor_status(0, 3, 77);
        dp.upsert_node(7, &NodeKeys::single(0, 1, key())).unwrap();
        let s = state(0);
        assert_eq!((s.node_id, s.requested_interval_ms, s.accepted), (7, 0, 0));
        assert_eq!(record(s), (0, 0));
        // Removed: cleared.
        dp.remove_node(42).unwrap();
        assert_eq!(state(5), NodeState::default());
    }

    #[test]
    fn acks_follow_the_policy_and_verify() {
        let dp = dp();
        dp.set_config(&Config {
            ack_on_change: 1,
            ack_every: 0,
            ..Config::default()
        })
        .unwrap();
        let v = dp.gate(&hb(1).seal(&key()), SRC, 1);
        assert_eq!((v.result, v.ack), (GateResult::Accepted, None));
        dp.set_requested_interval(0, 500);
        let v = dp.gate(&hb(2).seal(&key()), SRC, 2);
        let ack = v.ack.expect("interval differs: ACK");
        assert!(proto::verify(&key(), &ack));
        let a = proto::parse(&ack, Kind::Ack).unwrap();
        assert_eq!((a.interval_ms, a.seq, a.sent_ns), (500, 2, 99));
    }

    #[tokio::test]
    async fn unknown_nodes_are_reported_at_a_bounded_rate() {
        let mut dp = dp();
        dp.set_config(&Config {
            report_rate: 10,
            report_burst: 5,
            ..Config::default()
        })
        .unwrap();
        let mut rx = dp.take_reports().unwrap();
        for i in 0..100u32 {
            let mut d = hb(1);
            d.node_id = 1000 + i;
            dp.gate(&d.seal(&key()), SRC, 1_000 + i as u64);
        }
        let mut n = 0;
        while let Ok(r) = rx.try_recv() {
            assert_eq!(r.kind, REPORT_UNKNOWN_NODE);
            n += 1;
        }
        assert_eq!(n, 5, "burst only");
        let c = dp.counters().unwrap();
        assert_eq!(c[hb_common::maps::counter::REPORT_LIMITED as usize], 95);
        // A provisioned node at an epoch it has no key for: reported with
        // that epoch, from the other bucket (the unknown one is empty).
        let mut d = hb(1);
        d.key_epoch = 9;
        assert_eq!(
            dp.gate(&d.seal(&key()), SRC, 2_000).result,
            GateResult::BadEpoch
        );
        let r = rx.try_recv().expect("a bad-epoch report");
        assert_eq!(
            (r.kind, r.node_id, r.key_epoch),
            (REPORT_BAD_EPOCH, d.node_id, 9)
        );
    }

    /// Property: whatever the network delivers to the userspace gate,
    /// every datagram gets one result named in PROTOCOL.md and is counted
    /// once; random bytes never reach `accepted`, and a heartbeat with
    /// one bit flipped never does either.
    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

            #[test]
            fn any_datagrams_get_one_counted_contract_result(
                payloads in prop::collection::vec(
                    prop_oneof![
                        prop::collection::vec(any::<u8>(), 0..2048),
                        prop::collection::vec(any::<u8>(), 48..=48),
                        // A good header, so the later gate steps are reached.
                        prop::collection::vec(any::<u8>(), 44..=44).prop_map(|t| {
                            let mut b = vec![0x48, 0x42, 1, 1];
                            b.extend(t);
                            b
                        }),
                    ],
                    1..32,
                ),
                flip in prop::collection::vec(0..proto::LEN * 8, 1..8),
            ) {
                let dp = dp();
                let mut now = 1_000;
                for p in &payloads {
                    now += 1_000_000;
                    let v = dp.gate(p, SRC, now);
                    prop_assert!(GateResult::ALL.contains(&v.result));
                    prop_assert_ne!(v.result, GateResult::Pass);
                    prop_assert_ne!(v.result, GateResult::Accepted);
                    prop_assert_eq!(v.result == GateResult::Malformed, p.len() != proto::LEN);
                    prop_assert!(v.ack.is_none());
                }
                for (i, bit) in flip.iter().enumerate() {
                    let mut b = hb(i as u64 + 1).seal(&key());
                    b[bit / 8] ^= 1 << (bit % 8);
                    now += 1_000_000;
                    prop_assert_ne!(dp.gate(&b, SRC, now).result, GateResult::Accepted);
                }
                let c = dp.counters().unwrap();
                let counted: u64 = GateResult::ALL.iter().map(|r| c[r.index() as usize]).sum();
                prop_assert_eq!(counted, (payloads.len() + flip.len()) as u64);
            }
        }
    }
}

//! Deterministic synthetic heartbeat traces (`hb eval gen`).
//!
//! Each node is simulated on its own: a sender on a timer (interval plus
//! a small timer overshoot), optionally paused or re-timed, and a network
//! that delays or drops each datagram. Only what arrives is written, sorted
//! by arrival. Every node draws from its own ChaCha8 stream, keyed by the
//! seed, the scenario and the node id, so a trace is a pure function of
//! `(scenario, seed, nodes, duration)` and node k's arrivals do not change
//! when the fleet grows.
//!
//! Every fifth node (ids 5, 10, ...) crashes at a uniformly random time in
//! the middle 60% of the trace and never sends again; datagrams already in
//! flight still arrive.
//!
//! The scenarios:
//! - `lan`: 1 s interval, ~0.2 ms delay with rare few-ms spikes, 0.01% loss.
//! - `wan`: 1 s interval, 35 ms + Pareto(5 ms, shape 2) delay (a heavy tail:
//!   one datagram in 40,000 is over a second late), 0.5% loss.
//! - `bursty-loss`: 1 s interval, LAN delay, Gilbert-Elliott loss (good:
//!   0.05% loss, bad: 90%; good to bad 0.1% per datagram, bad to good 30%).
//! - `gc-pause`: 1 s interval, LAN delay; the heartbeat sender lives in a
//!   garbage-collected runtime (as Akka's and Cassandra's heartbeats do;
//!   hb's own `hb send` is native, so for it this models a node whose
//!   whole host stalls) and is frozen by its collector's stop-the-world
//!   pauses. The model, per node, drawn once and kept for the whole trace
//!   because a node's heap, workload and collector do not change from one
//!   collection to the next:
//!   - a heap of H GB, log-uniform in [1, 16] (HotSpot's default maximum
//!     heap is a quarter of physical memory \[1\]; 24-48 GB hosts in \[4\]);
//!   - young (minor) collections whenever eden fills: periodic at the
//!     node's allocation rate \[1\], the period log-uniform in [2 s, 60 s]
//!     per node and each one within +-20% of it; the pause depends on the
//!     surviving objects, not the heap \[1\]\[3\]: a per-node median
//!     log-uniform in [10 ms, 150 ms] ("a few milliseconds" \[2\] up to
//!     G1's default 200 ms pause goal \[5\]), each pause log-normal around
//!     it (sigma 0.3);
//!   - full (old-generation, compacting) collections when the old
//!     generation fills by promotion or a concurrent collector falls
//!     behind or fragments \[4\]\[6\]: every T per node on average, T
//!     log-uniform in [15 min, 4 h], each interval uniform in [0.5 T,
//!     1.5 T] (promotion rates vary), the first at a uniform phase; the
//!     pause grows with the heap \[2\]\[4\]: H times a per-node cost
//!     log-uniform in [0.1, 1] s per GB (single-threaded fallbacks took
//!     2.7 s/GB in \[6\]'s log and ~10 s/GB on 2011 hardware \[4\]; parallel
//!     compaction divides that by the collector's threads \[7\]), each pause
//!     log-normal around it (sigma 0.2), at most 30 s.
//!
//!   Nodes pause independently of each other \[8\]. A heartbeat due during a
//!   pause leaves when it ends, and the timer restarts from there.
//!   Sources: \[1\] Oracle, HotSpot VM Garbage Collection Tuning Guide (Java
//!   SE 8 "Generations"; Java SE 21 "Ergonomics"). \[2\] Oracle, Sun Java
//!   System Web Server 7.0u2 Performance Tuning Guide, "Tuning the Java
//!   Heap" (docs.oracle.com/cd/E19146-01/820-2208): young collections "a
//!   few milliseconds", full collections "tens
//!   of milliseconds to a few seconds, depending upon the heap size". \[3\]
//!   IBM documentation, "Oracle generational collectors"
//!   (ibm.com/docs/SSYLSL_10.0.0/performance): a scavenge's cost depends on
//!   the referenced objects it moves, not on the eden's size. \[4\] T.
//!   Lipcon, "Avoiding Full GCs with MemStore-Local Allocation Buffers",
//!   HBase user group, Feb. 2011: "around 10 seconds/GB", multi-minute
//!   pauses. \[5\] OpenJDK `G1Arguments::
//!   initialize`: `MaxGCPauseMillis` defaults to 200. \[6\] T. Lipcon,
//!   hotspot-gc-use mailing list, 7 July 2010: a 17.45 s concurrent-mode
//!   failure on an 8 GB heap (6.4 GB old generation), and a 218 s pause
//!   that got the server expelled for missed heartbeats. \[7\] JEP 307,
//!   "Parallel Full GC for G1" (JDK 10). \[8\] M. Maas et al., "Trash Day:
//!   Coordinating Garbage Collection in Distributed Systems", HotOS 2015:
//!   each node's runtime collects independently.
//! - `gc-pause-homogeneous`: the earlier GC scenario, kept so its result
//!   stays visible: every node alike, pauses memoryless (exponential gaps,
//!   every 10 minutes on average) with a log-normal length (median 800 ms,
//!   sigma 0.6, at most 10 s) drawn afresh for every pause. Nothing a node
//!   has shown predicts its next pause, so an oracle-tuned fixed timeout is
//!   already near-optimal there.
//! - `congestion-drift`: 1 s interval; a fleet-wide queueing delay rising
//!   slowly from 1 ms to 300 ms over the trace, with jitter growing with it
//!   (exponential, mean 10% of the queue) and loss rising to 0.2%.
//! - `mixed-interval`: each node has a fixed interval from
//!   {100, 200, 500, 1000, 2000, 5000} ms; ~0.8 ms delay, 0.1% loss.
//! - `interval-change`: nodes start at 250 ms to 2 s and, every 5 minutes
//!   on average, halve or double their interval (within 100 ms..5 s) as
//!   hb's controller would make them. The heartbeat already scheduled when
//!   the change arrives is the first to announce the new interval (its
//!   `interval_ms` column); the gap after it uses the new interval. That
//!   is what a sender that adopts an ACK's interval on its next timer tick
//!   does. Only detectors that read the wire's announced interval (hb's)
//!   may use the column.

use std::collections::BTreeMap;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal, Pareto};

use super::trace::{Arrival, Crashes, Trace};

/// Trace clock origin: nodes start within one interval after 1 s.
const START_NS: u64 = 1_000_000_000;
const MS: f64 = 1e6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    Lan,
    Wan,
    BurstyLoss,
    GcPause,
    GcPauseHomogeneous,
    CongestionDrift,
    MixedInterval,
    IntervalChange,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Lan,
        Scenario::Wan,
        Scenario::BurstyLoss,
        Scenario::GcPause,
        Scenario::GcPauseHomogeneous,
        Scenario::CongestionDrift,
        Scenario::MixedInterval,
        Scenario::IntervalChange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Lan => "lan",
            Scenario::Wan => "wan",
            Scenario::BurstyLoss => "bursty-loss",
            Scenario::GcPause => "gc-pause",
            Scenario::GcPauseHomogeneous => "gc-pause-homogeneous",
            Scenario::CongestionDrift => "congestion-drift",
            Scenario::MixedInterval => "mixed-interval",
            Scenario::IntervalChange => "interval-change",
        }
    }

    /// The scenario's part of every node's random stream id. Fixed per
    /// scenario (not its position in the list), so adding a scenario
    /// changes no other scenario's traces; `gc-pause-homogeneous` keeps
    /// the id it had as `gc-pause`, and its traces.
    fn stream(self) -> u64 {
        match self {
            Scenario::Lan => 0,
            Scenario::Wan => 1,
            Scenario::BurstyLoss => 2,
            Scenario::GcPauseHomogeneous => 3,
            Scenario::CongestionDrift => 4,
            Scenario::MixedInterval => 5,
            Scenario::IntervalChange => 6,
            Scenario::GcPause => 7,
        }
    }
}

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct GenOpts {
    pub scenario: Scenario,
    pub seed: u64,
    pub nodes: u32,
    pub duration_ns: u64,
}

/// The arrival trace and crash times of a scenario.
pub fn generate(o: &GenOpts) -> (Trace, Crashes) {
    let mut nodes = BTreeMap::new();
    let mut crashes = Crashes::new();
    for id in 1..=o.nodes {
        let (arrivals, crash) = node(o, id);
        if let Some(c) = crash {
            crashes.insert(id, c);
        }
        if !arrivals.is_empty() {
            nodes.insert(id, arrivals);
        }
    }
    (Trace::from_nodes(nodes), crashes)
}

/// Network model state of one node's path.
struct Net {
    /// Gilbert-Elliott: in the bad state.
    bad: bool,
}

fn node(o: &GenOpts, id: u32) -> (Vec<Arrival>, Option<u64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    rng.set_stream((o.scenario.stream() << 32) | id as u64);
    let end = START_NS + o.duration_ns;
    let exp = |mean_ms: f64| Exp::new(1.0 / (mean_ms * MS)).expect("positive mean");

    // Draw in a fixed order so each quantity is stable.
    let crash = id
        .is_multiple_of(5)
        .then(|| START_NS + (o.duration_ns as f64 * rng.random_range(0.2..0.8)) as u64);
    let mut iv_ms: u32 = match o.scenario {
        Scenario::MixedInterval => [100, 200, 500, 1000, 2000, 5000][rng.random_range(0..6)],
        Scenario::IntervalChange => [250, 500, 1000, 2000][rng.random_range(0..4)],
        _ => 1000,
    };
    let mut s = START_NS + rng.random_range(0..iv_ms as u64 * 1_000_000);
    let overshoot = exp(0.05);

    let pause_gap = exp(10.0 * 60_000.0);
    let pause_len = LogNormal::new((800.0 * MS).ln(), 0.6).expect("valid log-normal");
    let mut pause = (s + pause_gap.sample(&mut rng) as u64, 0u64);
    if o.scenario == Scenario::GcPauseHomogeneous {
        pause.1 = (pause_len.sample(&mut rng) as u64).min(10_000_000_000);
    }
    let mut gc = (o.scenario == Scenario::GcPause).then(|| Collector::new(&mut rng, s));
    let change_gap = exp(5.0 * 60_000.0);
    let mut next_change = s + change_gap.sample(&mut rng) as u64;

    let mut net = Net { bad: false };
    // The sender's sequence number: one per heartbeat sent, lost or not.
    let mut seq = 0u64;
    let mut out = Vec::with_capacity((o.duration_ns / (iv_ms as u64 * 1_000_000)) as usize + 2);
    loop {
        if o.scenario == Scenario::GcPauseHomogeneous {
            // Pauses that ended before this send did not delay it.
            while pause.0 + pause.1 <= s {
                pause.0 = pause.0 + pause.1 + pause_gap.sample(&mut rng) as u64;
                pause.1 = (pause_len.sample(&mut rng) as u64).min(10_000_000_000);
            }
            if pause.0 <= s {
                s = pause.0 + pause.1;
            }
        }
        if let Some(gc) = gc.as_mut() {
            s = gc.release(&mut rng, s);
        }
        if s >= end || crash.is_some_and(|c| s >= c) {
            break;
        }
        if o.scenario == Scenario::IntervalChange && s >= next_change {
            iv_ms = if rng.random_bool(0.5) {
                (iv_ms * 2).min(5000)
            } else {
                (iv_ms / 2).max(100)
            };
            next_change = s + change_gap.sample(&mut rng) as u64;
        }
        seq += 1;
        if let Some(delay) = transit(o, &mut rng, &mut net, s) {
            let recv = s + delay;
            if recv < end {
                out.push(Arrival {
                    recv_ns: recv,
                    interval_ms: Some(iv_ms),
                    seq: Some(seq),
                });
            }
        }
        s += iv_ms as u64 * 1_000_000 + overshoot.sample(&mut rng) as u64;
    }
    // Heavy-tailed delays reorder datagrams; the trace is in arrival order.
    out.sort_by_key(|a| a.recv_ns);
    (out, crash)
}

/// One node's garbage collector in `gc-pause` (see the module doc): its
/// per-node parameters and its next young and full collections.
struct Collector {
    young_period_ns: f64,
    young_pause: LogNormal<f64>,
    full_period_ns: f64,
    full_pause: LogNormal<f64>,
    /// Next collections: (start, length) in ns.
    young: (u64, u64),
    full: (u64, u64),
}

/// Longest full collection, ns.
const MAX_FULL_PAUSE_NS: f64 = 30e9;

/// `exp` of a uniform draw in `[ln lo, ln hi]`: log-uniform in `[lo, hi]`.
fn log_uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    rng.random_range(lo.ln()..hi.ln()).exp()
}

impl Collector {
    /// Draws a node's collector; `start` is its first send.
    fn new(rng: &mut ChaCha8Rng, start: u64) -> Collector {
        let heap_gb = log_uniform(rng, 1.0, 16.0);
        let young_period_ns = log_uniform(rng, 2.0, 60.0) * 1e9;
        let young_median_ns = log_uniform(rng, 10.0, 150.0) * MS;
        let full_period_ns = log_uniform(rng, 15.0 * 60.0, 4.0 * 3600.0) * 1e9;
        let s_per_gb = log_uniform(rng, 0.1, 1.0);
        let young_pause = LogNormal::new(young_median_ns.ln(), 0.3).expect("valid log-normal");
        let full_pause =
            LogNormal::new((heap_gb * s_per_gb * 1e9).ln(), 0.2).expect("valid log-normal");
        let mut c = Collector {
            young_period_ns,
            young_pause,
            full_period_ns,
            full_pause,
            young: (0, 0),
            full: (0, 0),
        };
        // Uniform phases: the trace starts in the middle of the node's life.
        let phase = rng.random_range(0.0..1.0);
        c.young = c.draw_young(rng, start, phase);
        let phase = rng.random_range(0.0..1.0);
        c.full = c.draw_full(rng, start, phase);
        c
    }

    fn draw_young(&self, rng: &mut ChaCha8Rng, after: u64, scale: f64) -> (u64, u64) {
        let at = after + (self.young_period_ns * scale) as u64;
        (at, self.young_pause.sample(rng) as u64)
    }

    fn draw_full(&self, rng: &mut ChaCha8Rng, after: u64, scale: f64) -> (u64, u64) {
        let at = after + (self.full_period_ns * scale) as u64;
        let len = self.full_pause.sample(rng).min(MAX_FULL_PAUSE_NS);
        (at, len as u64)
    }

    /// The next pause: (start, length, whether it is a full collection).
    fn peek(&self) -> (u64, u64, bool) {
        if self.young.0 <= self.full.0 {
            (self.young.0, self.young.1, false)
        } else {
            (self.full.0, self.full.1, true)
        }
    }

    /// Consumes the next pause and schedules the next collection of its
    /// kind from its end.
    fn advance(&mut self, rng: &mut ChaCha8Rng) {
        let (at, len, full) = self.peek();
        let done = at + len;
        if full {
            let jitter = rng.random_range(0.5..1.5);
            self.full = self.draw_full(rng, done, jitter);
        } else {
            let jitter = rng.random_range(0.8..1.2);
            self.young = self.draw_young(rng, done, jitter);
        }
    }

    /// When a send due at `s` actually leaves: at the end of the pause in
    /// progress at `s`, if any. Collections that began by then are
    /// consumed.
    fn release(&mut self, rng: &mut ChaCha8Rng, mut s: u64) -> u64 {
        loop {
            let (at, len, _) = self.peek();
            if at > s {
                return s;
            }
            s = s.max(at + len);
            self.advance(rng);
        }
    }
}

/// The network's fate for a datagram sent at `s`: its delay in ns, or
/// `None` if lost. Draws the same number of variates on every path so the
/// scenarios stay comparable.
fn transit(o: &GenOpts, rng: &mut ChaCha8Rng, net: &mut Net, s: u64) -> Option<u64> {
    let u_loss: f64 = rng.random();
    let u_state: f64 = rng.random();
    let base_jitter = Exp::new(1.0).expect("rate 1").sample(rng);
    let spike: f64 = rng.random();
    let frac = (s - START_NS) as f64 / o.duration_ns as f64;
    let (delay_ms, loss) = match o.scenario {
        Scenario::Lan | Scenario::GcPause | Scenario::GcPauseHomogeneous => {
            let spike_ms = if spike < 0.001 {
                base_jitter * 2.0
            } else {
                0.0
            };
            (0.15 + 0.05 * base_jitter + spike_ms, 1e-4)
        }
        Scenario::Wan => {
            let tail: f64 = Pareto::new(5.0, 2.0).expect("valid Pareto").sample(rng);
            ((35.0 + tail).min(30_000.0), 0.005)
        }
        Scenario::BurstyLoss => {
            net.bad = if net.bad {
                u_state >= 0.3
            } else {
                u_state < 0.001
            };
            (0.5 + 0.3 * base_jitter, if net.bad { 0.9 } else { 0.0005 })
        }
        Scenario::CongestionDrift => {
            let queue = 1.0 + 299.0 * frac;
            (queue + (0.1 * queue) * base_jitter, 0.002 * frac)
        }
        Scenario::MixedInterval | Scenario::IntervalChange => (0.3 + 0.5 * base_jitter, 0.001),
    };
    (u_loss >= loss).then_some((delay_ms * MS) as u64)
}

/// Parses a duration like `90s`, `30m`, `2h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 90s, 30m, 2h)"))?;
    let scale = match unit {
        "ms" => 1e6,
        "s" | "" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (ms, s, m, h)")),
    };
    let ns = v * scale;
    if !(1e9..1e18).contains(&ns) {
        return Err(format!("duration {s:?} must be between 1 s and ~30 years"));
    }
    Ok(ns as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pause of one node's collector over `hours`: (start, length,
    /// full).
    fn pauses(c: &mut Collector, rng: &mut ChaCha8Rng, hours: u64) -> Vec<(u64, u64, bool)> {
        let end = START_NS + hours * 3_600_000_000_000;
        let mut out = Vec::new();
        while c.peek().0 < end {
            out.push(c.peek());
            c.advance(rng);
        }
        out
    }

    fn log_sd(v: &[f64]) -> f64 {
        let l: Vec<f64> = v.iter().map(|x| x.ln()).collect();
        let m = l.iter().sum::<f64>() / l.len() as f64;
        (l.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / l.len() as f64).sqrt()
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// The `gc-pause` model's properties: young collections periodic within
    /// +-20% of the node's period, full ones within [0.5, 1.5] of theirs;
    /// a node's pauses alike (log-normal, sigma 0.3 and 0.2 around its own
    /// medians), nodes unlike each other (medians over an order of
    /// magnitude apart), inside the documented ranges.
    #[test]
    fn gc_pauses_are_periodic_alike_per_node_and_unlike_across_nodes() {
        let mut full_medians = Vec::new();
        let mut young_medians = Vec::new();
        for node in 0..200u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            rng.set_stream(node);
            let c = Collector::new(&mut rng, START_NS);
            let (yp, fp) = (c.young_period_ns, c.full_period_ns);
            assert!((2e9..=60e9).contains(&yp) && (900e9..=14_400e9).contains(&fp));
            // One kind at a time (the other parked at the end of time):
            // young ones over 6 hours, full ones over 400.
            for (is_full, hours, period, (lo, hi), sigma) in [
                (false, 6, yp, (0.8, 1.2), 0.25..0.35),
                (true, 400, fp, (0.5, 1.5), 0.15..0.25),
            ] {
                let mut c = Collector { ..c };
                if is_full {
                    c.young.0 = u64::MAX;
                } else {
                    c.full.0 = u64::MAX;
                }
                let ps = pauses(&mut c, &mut rng, hours);
                assert!(ps.len() >= 90, "node {node}: {} pauses", ps.len());
                for w in ps.windows(2) {
                    let gap = (w[1].0 - w[0].0 - w[0].1) as f64;
                    assert!(
                        gap >= lo * period - 1.0 && gap <= hi * period + 1.0,
                        "node {node}: {gap} vs {period}"
                    );
                }
                let lens: Vec<f64> = ps.iter().map(|p| p.1 as f64).collect();
                let sd = log_sd(&lens);
                assert!(
                    sigma.contains(&sd),
                    "node {node} full={is_full}: sigma {sd}"
                );
                if is_full {
                    full_medians.push(median(lens));
                } else {
                    young_medians.push(median(lens));
                }
            }
        }
        let range = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            (lo, hi)
        };
        let (lo, hi) = range(&full_medians);
        assert!(
            lo >= 0.08e9 && hi <= 17e9 && hi / lo > 20.0,
            "full {lo} {hi}"
        );
        let (lo, hi) = range(&young_medians);
        assert!(lo >= 9e6 && hi <= 160e6 && hi / lo > 5.0, "young {lo} {hi}");
    }

    #[test]
    fn a_send_waits_for_the_pause_in_progress() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut c = Collector::new(&mut rng, START_NS);
        let (at, len, _) = c.peek();
        // Before the pause: unchanged; during it: at its end.
        assert_eq!(c.release(&mut rng, at - 1), at - 1);
        assert_eq!(c.release(&mut rng, at + len / 2), at + len);
        assert!(c.peek().0 > at, "the pause was consumed");
    }
}

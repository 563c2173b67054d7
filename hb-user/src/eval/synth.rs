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
//! - `gc-pause`: 1 s interval, LAN delay; the sender stops the world every
//!   10 minutes on average (exponential gaps) for a log-normal pause
//!   (median 800 ms, sigma 0.6, at most 10 s); a heartbeat due during a
//!   pause leaves when it ends.
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
    CongestionDrift,
    MixedInterval,
    IntervalChange,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Lan,
        Scenario::Wan,
        Scenario::BurstyLoss,
        Scenario::GcPause,
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
            Scenario::CongestionDrift => "congestion-drift",
            Scenario::MixedInterval => "mixed-interval",
            Scenario::IntervalChange => "interval-change",
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
    rng.set_stream(((o.scenario as u64) << 32) | id as u64);
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
    if o.scenario == Scenario::GcPause {
        pause.1 = (pause_len.sample(&mut rng) as u64).min(10_000_000_000);
    }
    let change_gap = exp(5.0 * 60_000.0);
    let mut next_change = s + change_gap.sample(&mut rng) as u64;

    let mut net = Net { bad: false };
    let mut out = Vec::with_capacity((o.duration_ns / (iv_ms as u64 * 1_000_000)) as usize + 2);
    loop {
        if o.scenario == Scenario::GcPause {
            // Pauses that ended before this send did not delay it.
            while pause.0 + pause.1 <= s {
                pause.0 = pause.0 + pause.1 + pause_gap.sample(&mut rng) as u64;
                pause.1 = (pause_len.sample(&mut rng) as u64).min(10_000_000_000);
            }
            if pause.0 <= s {
                s = pause.0 + pause.1;
            }
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
        if let Some(delay) = transit(o, &mut rng, &mut net, s) {
            let recv = s + delay;
            if recv < end {
                out.push(Arrival {
                    recv_ns: recv,
                    interval_ms: Some(iv_ms),
                });
            }
        }
        s += iv_ms as u64 * 1_000_000 + overshoot.sample(&mut rng) as u64;
    }
    // Heavy-tailed delays reorder datagrams; the trace is in arrival order.
    out.sort_by_key(|a| a.recv_ns);
    (out, crash)
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
        Scenario::Lan | Scenario::GcPause => {
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

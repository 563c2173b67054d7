//! The failure detectors `hb eval` compares, each reduced to what the QoS
//! metrics need: after every heartbeat, the time at which the detector's
//! output would turn to "suspect" if no further heartbeat arrived.
//!
//! Every detector here is monotone between heartbeats: its suspicion level
//! only depends on the time elapsed since the last heartbeat and on state
//! that changes only when a heartbeat arrives, and it grows with elapsed
//! time. Its binary output for a threshold is therefore a step function
//! that can flip to "suspect" at most once between two heartbeats, at a
//! time we solve for exactly (closed form for the linear detectors; for the
//! normal-model phi detectors, the standardized crossing point `y*` of the
//! threshold is solved once by bisection and the crossing time is
//! `last + mean + sigma * y*`). The replay in `qos` is then event-driven
//! and exact; no sampling grid can miss a short suspicion.
//!
//! - `hb`: hb's own detector, the code the monitor runs:
//!   `hb_common::maps::NodeState::{admit, record}` (what the XDP program
//!   computes per heartbeat) and `hb::detector::phi` (a normal-model
//!   deadline above the node's stall allowance). The crossing time is
//!   computed from `hb::detector::Model::moments_ns` and then checked and
//!   adjusted to 1 us against `hb::detector::late_by`, the comparison the
//!   monitor's tick makes (lateness against the threshold's `y`). The
//!   monitor's backstop (`--max-silence-ms`, its default unless told
//!   otherwise) caps it: a node silent that long is dead whatever phi says.
//! - `fixed`: a fixed timeout since the last heartbeat (threshold: ms).
//! - `chen`: Chen, Toueg and Aguilera, "On the Quality of Service of
//!   Failure Detectors", IEEE Trans. Computers 51(5), 2002, Sec. 6, NFD-E:
//!   the expected arrival `EA` of the next heartbeat from the last n
//!   arrivals plus a safety margin `alpha` (threshold: alpha, ms).
//! - `phi-normal`: Hayashibara, Defago, Yared and Katayama, "The phi
//!   accrual failure detector", SRDS 2004, Sec. 3-4: a window of the last
//!   n inter-arrival times, a normal distribution with their mean and
//!   variance, `phi = -log10(1 - F(elapsed))` (threshold: phi).
//! - `akka`: Akka's `akka.remote.PhiAccrualFailureDetector`
//!   (akka-remote/src/main/scala/akka/remote/PhiAccrualFailureDetector.scala)
//!   with akka-cluster's reference.conf defaults: logistic approximation of
//!   the normal CDF, `min-std-deviation = 100 ms`,
//!   `acceptable-heartbeat-pause = 3 s`, `max-sample-size = 1000`, a
//!   history seeded from `heartbeat-interval = 1 s` (threshold: phi).
//! - `cassandra`: Cassandra's `org.apache.cassandra.gms.FailureDetector`
//!   (`ArrivalWindow`, `FailureDetector.java`): exponential model,
//!   `phi = elapsed / mean` convicted when `PHI_FACTOR * phi >= threshold`
//!   with `PHI_FACTOR = 1 / ln 10`; window 1000; intervals longer than
//!   `fd_max_interval_ms` (2 s) ignored; the window seeded with
//!   `fd_initial_value_ms` (2 s) at the first heartbeat (threshold: phi).
//!
//! chitchat (quickwit-oss/chitchat 0.13.0) also ships a phi-style
//! detector, but it cannot be driven by a trace through its public crate:
//! `FailureDetector` lives in a private module (`mod failure_detector;`,
//! only `FailureDetectorConfig` is re-exported), and it is fed by the
//! gossip server, reading `tokio::time::Instant::now()` itself. It is not
//! evaluated rather than imitated; `hb eval` says so in its output.

use std::{collections::VecDeque, sync::Arc};

use hb_common::{
    maps::{IA_DEV_SHIFT, IA_MEAN_SHIFT, NodeState},
    proto::{Datagram, Kind as WireKind},
    replay,
};
use serde::Serialize;

use super::trace::Arrival;
use crate::monitor::state::Thresholds;

use crate::detector::{Model, PhiParams, late_by, phi_normal};

/// Sample window of `chen`, `phi-normal`, `akka` and `cassandra` (Akka's
/// `max-sample-size` and Cassandra's `SAMPLE_SIZE` are both 1000; we use the
/// same n for Hayashibara and Chen so no baseline is handicapped by a
/// shorter memory).
pub const WINDOW: usize = 1000;

/// Why a detector could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error("unknown detector {0:?} (known: hb, fixed, chen, phi-normal, akka, cassandra)")]
    Unknown(String),
    #[error(
        "chitchat's failure detector cannot be replayed: chitchat 0.13.0 keeps `FailureDetector` in a private module and feeds it from its gossip loop with `tokio::time::Instant::now()`"
    )]
    Chitchat,
    #[error("threshold {value} is not valid for {detector}: {why}")]
    BadThreshold {
        detector: &'static str,
        value: f64,
        why: &'static str,
    },
}

/// The detectors `hb eval` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Hb,
    Fixed,
    Chen,
    PhiNormal,
    Akka,
    Cassandra,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Hb,
        Kind::Fixed,
        Kind::Chen,
        Kind::PhiNormal,
        Kind::Akka,
        Kind::Cassandra,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Hb => "hb",
            Kind::Fixed => "fixed",
            Kind::Chen => "chen",
            Kind::PhiNormal => "phi-normal",
            Kind::Akka => "akka",
            Kind::Cassandra => "cassandra",
        }
    }

    pub fn parse(s: &str) -> Result<Kind, DetectorError> {
        if s.eq_ignore_ascii_case("chitchat") {
            return Err(DetectorError::Chitchat);
        }
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| DetectorError::Unknown(s.to_string()))
    }

    /// What the threshold means for this detector.
    pub fn threshold_unit(self) -> &'static str {
        match self {
            Kind::Fixed => "timeout ms",
            Kind::Chen => "alpha ms",
            _ => "phi",
        }
    }

    /// Thresholds shown by `hb eval` when none are given: each detector's
    /// usual operating points.
    pub fn default_thresholds(self) -> Vec<f64> {
        match self {
            Kind::Fixed => vec![1500.0, 2000.0, 3000.0, 5000.0, 10000.0],
            Kind::Chen => vec![100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0],
            _ => vec![1.0, 2.0, 4.0, 8.0, 12.0, 16.0],
        }
    }

    /// The range a threshold sweep covers (`qos::sweep`): from "suspects
    /// almost at once" to "waits about a minute" on a 1 s heartbeat.
    pub fn sweep_range(self) -> (f64, f64) {
        match self {
            Kind::Fixed => (100.0, 120_000.0),
            Kind::Chen => (1.0, 120_000.0),
            // The normal model with a window's tiny LAN variance needs
            // enormous phi to survive one lost heartbeat.
            Kind::PhiNormal => (0.1, 1e6),
            // Akka's acceptable pause already waits 3 s at phi ~0.3.
            Kind::Akka => (0.001, 2_000.0),
            // hb's floor is 10% of the mean: tolerating a 10 s loss burst
            // on a 1 s heartbeat takes y ~ 90 sigma, phi ~ 3e4.
            Kind::Hb => (0.1, 1e6),
            Kind::Cassandra => (0.05, 100.0),
        }
    }

    /// The threshold as the parameter `u` of the detector's affine deadline
    /// ([`Detector::affine`]): the standardized crossing point for the
    /// normal-model phi detectors, the threshold itself for fixed, chen and
    /// cassandra. `None` for akka (its history depends on the threshold,
    /// so its deadline is not affine in one parameter).
    pub fn u_of_threshold(self, t: f64) -> Option<f64> {
        match self {
            Kind::Hb => Some(solve_increasing(|y| phi_normal(y, 0.0, 1.0), t)),
            Kind::PhiNormal => Some(solve_increasing(|y| hayashibara_phi(y, 0.0, 1.0), t)),
            Kind::Fixed | Kind::Chen | Kind::Cassandra => Some(t),
            Kind::Akka => None,
        }
    }

    /// The threshold whose `u` is `u` (inverse of [`Kind::u_of_threshold`]).
    pub fn threshold_of_u(self, u: f64) -> Option<f64> {
        match self {
            Kind::Hb => Some(phi_normal(u, 0.0, 1.0)),
            Kind::PhiNormal => Some(hayashibara_phi(u, 0.0, 1.0)),
            Kind::Fixed | Kind::Chen | Kind::Cassandra => Some(u),
            Kind::Akka => None,
        }
    }

    /// Whether `t` is a valid threshold for this detector.
    pub fn check(self, t: f64) -> Result<(), DetectorError> {
        let bad = |why| {
            Err(DetectorError::BadThreshold {
                detector: self.name(),
                value: t,
                why,
            })
        };
        if !t.is_finite() {
            return bad("not a finite number");
        }
        match self {
            Kind::Fixed if t < 0.0 => bad("a timeout is at least 0 ms"),
            Kind::Chen => Ok(()),
            Kind::Fixed => Ok(()),
            _ if t <= 0.0 => bad("phi thresholds are positive"),
            _ => Ok(()),
        }
    }
}

/// `n` points from `lo` to `hi`, evenly spaced on a log scale, rounded to
/// 3 significant digits so tables stay readable.
pub fn geometric(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let r = (hi / lo).powf(1.0 / (n.max(2) - 1) as f64);
    let mut v: Vec<f64> = (0..n)
        .map(|i| {
            let x = lo * r.powi(i as i32);
            // Through decimal text: the nearest f64 to a 3-digit decimal.
            format!("{x:.2e}").parse().unwrap_or(x)
        })
        .collect();
    v.dedup();
    v
}

/// hb's detector configuration: the monitor's `PhiParams` and backstop,
/// and the kernel's EWMA gains (as shifts: gain `1/2^shift`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct HbConfig {
    #[serde(skip)]
    pub phi: PhiParams,
    pub mean_shift: u32,
    pub dev_shift: u32,
    /// The monitor's `max_silence_ms` (`Thresholds`): suspected after this
    /// silence whatever phi says; 0 = off.
    pub max_silence_ms: u64,
}

impl Default for HbConfig {
    /// Exactly what the monitor and the XDP program run.
    fn default() -> Self {
        HbConfig {
            phi: PhiParams::default(),
            mean_shift: IA_MEAN_SHIFT,
            dev_shift: IA_DEV_SHIFT,
            max_silence_ms: Thresholds::default().max_silence_ms,
        }
    }
}

/// One detector with a list of thresholds: builds a fresh per-node
/// instance for each node of a trace.
#[derive(Clone, Debug)]
pub struct Spec {
    pub kind: Kind,
    pub thresholds: Arc<[f64]>,
    /// Standardized crossing points of the normal-model detectors, per
    /// threshold.
    ystar: Arc<[f64]>,
    pub hb: HbConfig,
}

impl Spec {
    pub fn new(kind: Kind, thresholds: &[f64], hb: HbConfig) -> Result<Spec, DetectorError> {
        for &t in thresholds {
            kind.check(t)?;
        }
        let ystar: Vec<f64> = match kind {
            Kind::Hb => thresholds
                .iter()
                .map(|&t| solve_increasing(|y| phi_normal(y, 0.0, 1.0), t))
                .collect(),
            Kind::Akka => thresholds
                .iter()
                .map(|&t| solve_increasing(|y| akka_phi(y, 0.0, 1.0), t))
                .collect(),
            Kind::PhiNormal => thresholds
                .iter()
                .map(|&t| solve_increasing(|y| hayashibara_phi(y, 0.0, 1.0), t))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Spec {
            kind,
            thresholds: thresholds.into(),
            ystar: ystar.into(),
            hb,
        })
    }

    /// A fresh detector for one node.
    pub fn instance(&self) -> Box<dyn Detector> {
        match self.kind {
            Kind::Hb => Box::new(Hb {
                cfg: self.hb,
                model: Model::new(&self.hb.phi),
                st: NodeState::default(),
                seq: 0,
                generation: 1,
                ystar: self.ystar.clone(),
            }),
            Kind::Fixed => Box::new(Fixed {
                last: None,
                thresholds: self.thresholds.clone(),
            }),
            Kind::Chen => Box::new(Chen {
                window: VecDeque::with_capacity(WINDOW),
                sum_t: 0,
                sum_s: 0,
                next: 0,
                seen: replay::Window::default(),
                thresholds: self.thresholds.clone(),
            }),
            Kind::PhiNormal => Box::new(PhiNormal {
                last: None,
                stats: Window::default(),
                ystar: self.ystar.clone(),
            }),
            Kind::Akka => Box::new(Akka::new(self.ystar.clone())),
            Kind::Cassandra => Box::new(Cassandra {
                last: None,
                stats: Window::default(),
                thresholds: self.thresholds.clone(),
            }),
        }
    }
}

/// A per-node failure detector as the replay sees it.
pub trait Detector {
    /// A heartbeat arrived (at `a.recv_ns`, non-decreasing). Its announced
    /// interval and sequence number, when the trace has them, are read
    /// only by the detectors whose published algorithm uses them (see
    /// `trace`).
    fn arrival(&mut self, a: &Arrival);
    /// For each threshold: the time from which the output is "suspect"
    /// unless another heartbeat arrives first (at least the last arrival);
    /// `None`: never.
    fn deadlines(&self, out: &mut [Option<u64>]);
    /// When the deadline after the last heartbeat is
    /// `last + min(max(a + b * u, floor), cap)` ms for every threshold,
    /// with `u = kind.u_of_threshold(threshold)` and `b > 0`: that form;
    /// `None` when the detector has no deadline now (never suspects) or
    /// no such form (akka). This is what lets `qos::optimum` solve for a
    /// detector's operating point exactly instead of on a grid.
    fn affine(&self) -> Option<Affine> {
        None
    }
}

/// A deadline affine in the threshold's parameter `u`, above a floor and
/// below a cap that do not depend on it: `last + min(max(a + b * u,
/// floor), cap)` ms (see [`Detector::affine`]). `a` is infinite when only
/// the cap makes a deadline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub last_ns: u64,
    pub a_ms: f64,
    pub b_ms: f64,
    /// `f64::NEG_INFINITY` for the detectors without one.
    pub floor_ms: f64,
    /// `f64::INFINITY` for the detectors without one (all but hb, whose
    /// backstop it is).
    pub cap_ms: f64,
}

impl Affine {
    /// `last + a + b * u` ms, no floor.
    pub fn plain(last_ns: u64, a_ms: f64, b_ms: f64) -> Affine {
        Affine {
            last_ns,
            a_ms,
            b_ms,
            floor_ms: f64::NEG_INFINITY,
            cap_ms: f64::INFINITY,
        }
    }

    /// The deadline at `u`, ms after `last_ns`.
    pub fn at(&self, u: f64) -> f64 {
        (self.a_ms + self.b_ms * u)
            .max(self.floor_ms)
            .min(self.cap_ms)
    }

    /// The critical value of a silence of `gap_ms` after the last
    /// heartbeat: the detector suspects within it exactly when `u` is
    /// below the value. `None` when no `u` does (the floor covers it, or
    /// only the cap makes a deadline and it is not reached); infinite
    /// when every `u` does (the cap is reached).
    pub fn critical(&self, gap_ms: f64) -> Option<f64> {
        if self.cap_ms < gap_ms {
            return Some(f64::INFINITY);
        }
        (self.floor_ms < gap_ms && self.a_ms.is_finite()).then(|| (gap_ms - self.a_ms) / self.b_ms)
    }
}

/// `ms` after `last_ns` as a time in ns, clamped to `[last_ns, never)`.
#[inline]
pub fn after(last_ns: u64, ms: f64) -> Option<u64> {
    if ms.is_nan() {
        return None;
    }
    if ms <= 0.0 {
        return Some(last_ns);
    }
    let x = ms * 1e6;
    if x >= (u64::MAX - last_ns) as f64 {
        return None;
    }
    // `x.ceil()` for 0 < x < 2^64 without libm's call (this is the
    // replay's innermost arithmetic).
    let t = x as u64;
    Some(last_ns + if (t as f64) < x { t + 1 } else { t })
}

/// The least `y` with `f(y) >= target`, for increasing `f`, to ~1e-12.
fn solve_increasing(f: impl Fn(f64) -> f64, target: f64) -> f64 {
    let (mut lo, mut hi) = (-64.0, 1.0);
    while f(hi) < target {
        lo = hi;
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    if f(lo) >= target {
        return lo;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if f(mid) >= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

// ---------------------------------------------------------------- hb

/// hb's own detector: the gate's per-node state machine and the monitor's
/// phi and backstop, unchanged.
struct Hb {
    cfg: HbConfig,
    model: Model,
    st: NodeState,
    seq: u64,
    /// The sender's generation as the replay infers it ([`restarted`]).
    generation: u32,
    ystar: Arc<[f64]>,
}

/// Whether `seq`, which the anti-replay window of a sender whose highest
/// sequence number so far is `max_seq` refuses (seen already, or older
/// than the window), starts the sender's next incarnation. A trace has no
/// generation column (`trace`), and a restarted sender numbers its
/// heartbeats from 1 again (PROTOCOL.md): where the monitor sees a larger
/// generation, the replay sees a sequence number going back to the start.
/// So a refused `seq` below `max_seq` that is one of a generation's first
/// [`REPLAY_WINDOW`] numbers is taken as the first heartbeat of a restart; any
/// other refused one (a duplicate, a datagram delayed past the window, 0)
/// is dropped as the gate drops it. Taken by hb and chen alike, the two
/// detectors that read sequence numbers.
///
/// What a trace cannot tell apart: a delayed duplicate of one of a
/// generation's first heartbeats is taken as a restart too, and a
/// restarted sender's first sequence numbers that the window has not seen
/// yet (the old incarnation lost them) are taken as late heartbeats of the
/// old one, until one is refused.
fn restarted(max_seq: u64, seq: u64) -> bool {
    seq != 0 && seq < max_seq && seq <= REPLAY_WINDOW
}

/// The gate's anti-replay window, in sequence numbers.
const REPLAY_WINDOW: u64 = hb_common::replay::WINDOW;

/// `NodeState` treats `last_arrival_ns == 0` as "never heard from"; trace
/// clocks may start at 0, so hb's state runs on a clock shifted by this.
const HB_CLOCK_OFFSET: u64 = 1_000_000_000;

impl Detector for Hb {
    fn arrival(&mut self, a: &Arrival) {
        // The datagram carries the trace's sequence number, so the gate
        // sees lost heartbeats as the kernel does. A trace without one
        // numbers the arrivals 1, 2, ...: a lost heartbeat then looks like
        // a long inter-arrival time. Without an announced interval in the
        // trace, `interval_ms` is 0 ("none"): `record` then never re-seeds
        // and the moments are learned from the arrivals alone (the first
        // inter-arrival time seeds them). The generation starts at 1 and
        // grows at every restart the sequence numbers show (see
        // `restarted`).
        let (t_ns, interval_ms) = (a.recv_ns, a.interval_ms);
        self.seq = a.seq.unwrap_or_else(|| self.seq.saturating_add(1));
        let mut d = Datagram {
            kind: WireKind::Heartbeat,
            node_id: 1,
            generation: self.generation,
            key_epoch: 0,
            flags: 0,
            load: 0,
            seq: self.seq,
            sent_ns: 0,
            interval_ms: interval_ms.unwrap_or(0),
            rtt_us: 0,
        };
        let now = t_ns.saturating_add(HB_CLOCK_OFFSET);
        let admit = match self.st.admit(&d) {
            Ok(admit) => admit,
            Err(_) if restarted(self.st.rest().max_seq, d.seq) => {
                // What the monitor sees as the sender's next generation.
                self.generation = self.generation.saturating_add(1);
                d.generation = self.generation;
                let Ok(admit) = self.st.admit(&d) else {
                    return;
                };
                admit
            }
            // A duplicate of the newest heartbeat (or seq 0): dropped, as
            // the gate drops it.
            Err(_) => return,
        };
        let before = self.st;
        self.st.record(&d, admit, now);
        if (self.cfg.mean_shift, self.cfg.dev_shift) != (IA_MEAN_SHIFT, IA_DEV_SHIFT)
            && self.st.ia_samples == before.ia_samples.saturating_add(1)
            && self.st.ia_samples != 0
        {
            // What-if gains for tuning: `record` took a sample with the
            // kernel's gains; redo that one update with ours, on the
            // state it was taken from (its interval, its sample count).
            let mut redo = before;
            redo.observe_interarrival_with(
                now - before.last_arrival_ns,
                self.cfg.mean_shift,
                self.cfg.dev_shift,
            );
            self.st.ia_mean_ns = redo.ia_mean_ns;
            self.st.ia_dev_ns = redo.ia_dev_ns;
            self.st.stall = redo.stall;
            self.st.ia_samples = redo.ia_samples;
        }
    }

    fn deadlines(&self, out: &mut [Option<u64>]) {
        self.phi_deadlines(out);
        if let Some(b) = self
            .backstop_ms()
            .map(|ms| self.last_ns().saturating_add(ms.saturating_mul(1_000_000)))
        {
            for o in out {
                *o = Some(o.map_or(b, |t| t.min(b)));
            }
        }
    }

    fn affine(&self) -> Option<Affine> {
        let st = &self.st;
        if st.accepted == 0 || st.last_arrival_ns == 0 {
            return None;
        }
        let cap_ms = self.backstop_ms().map_or(f64::INFINITY, |ms| ms as f64);
        let (mean, std) = self.model.moments_ns(st);
        if !(mean > 0.0 && std > 0.0 && mean.is_finite() && std.is_finite()) {
            // Never late by phi: only the backstop, if on.
            return cap_ms.is_finite().then_some(Affine {
                last_ns: self.last_ns(),
                a_ms: f64::INFINITY,
                b_ms: 1.0,
                floor_ms: f64::NEG_INFINITY,
                cap_ms,
            });
        }
        let floor = self.model.stall_floor_ns(st, mean);
        Some(Affine {
            last_ns: self.last_ns(),
            a_ms: mean / 1e6,
            b_ms: std / 1e6,
            floor_ms: if floor > 0.0 {
                floor / 1e6
            } else {
                f64::NEG_INFINITY
            },
            cap_ms,
        })
    }
}

impl Hb {
    /// The last heartbeat taken, on the trace's clock (heard from).
    fn last_ns(&self) -> u64 {
        self.st.last_arrival_ns - HB_CLOCK_OFFSET
    }

    /// The silence, ms, after which the monitor's backstop declares the
    /// node dead whatever phi says (its tick's `elapsed >=
    /// max_silence_ns`); `None` when it is off or the node was never
    /// heard from.
    fn backstop_ms(&self) -> Option<u64> {
        let heard = self.st.accepted != 0 && self.st.last_arrival_ns != 0;
        (heard && self.cfg.max_silence_ms != 0).then_some(self.cfg.max_silence_ms)
    }

    /// [`Detector::deadlines`] by phi alone.
    fn phi_deadlines(&self, out: &mut [Option<u64>]) {
        let st = &self.st;
        if st.accepted == 0 || st.last_arrival_ns == 0 {
            out.fill(None);
            return;
        }
        let (mean, std) = self.model.moments_ns(st);
        if !(mean > 0.0 && std > 0.0 && mean.is_finite() && std.is_finite()) {
            // `phi` is 0 forever for such a node: it is never suspected.
            out.fill(None);
            return;
        }
        // Not late at all before the stall allowance: the tick's `elapsed <
        // floor` (elapsed in whole ns).
        let floor = self.model.stall_floor_ns(st, mean);
        let not_before = st.last_arrival_ns.saturating_add(floor.ceil() as u64);
        let last = st.last_arrival_ns;
        // The monitor's own test, at the node's elapsed time `t - last`.
        let late = |t: u64, y: f64| late_by((t - last) as f64, mean, std, y);
        for (o, &y) in out.iter_mut().zip(self.ystar.iter()) {
            *o = after(last, (mean + std * y) / 1e6).map(|guess| {
                // Pin the crossing down against the monitor's comparison to
                // 1 us: rounding in the closed form must not decide a
                // borderline mistake.
                const STEP: u64 = 1_000;
                let mut t = guess;
                let mut tries = 0;
                while !late(t, y) {
                    t += STEP;
                    tries += 1;
                    if tries > 1_000 {
                        t = bisect_late(&late, y, t);
                        break;
                    }
                }
                while t >= last + STEP && late(t - STEP, y) {
                    t -= STEP;
                }
                t.max(not_before) - HB_CLOCK_OFFSET
            });
        }
    }
}

/// The least time (to 1 us) from `from` on at which `late(t, y)` holds
/// (fallback of the closed form; never hit in practice).
fn bisect_late(late: &impl Fn(u64, f64) -> bool, y: f64, from: u64) -> u64 {
    let mut lo = from;
    let mut hi = from.saturating_add(1_000_000);
    let mut step = 1_000_000u64;
    while !late(hi, y) {
        lo = hi;
        step = step.saturating_mul(2);
        hi = hi.saturating_add(step);
    }
    while hi - lo > 1_000 {
        let mid = lo + (hi - lo) / 2;
        if late(mid, y) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

// ---------------------------------------------------------------- fixed

struct Fixed {
    last: Option<u64>,
    thresholds: Arc<[f64]>,
}

impl Detector for Fixed {
    fn arrival(&mut self, a: &Arrival) {
        let t_ns = a.recv_ns;
        self.last = Some(t_ns);
    }
    fn deadlines(&self, out: &mut [Option<u64>]) {
        for (o, &ms) in out.iter_mut().zip(self.thresholds.iter()) {
            *o = self.last.and_then(|l| after(l, ms));
        }
    }
    fn affine(&self) -> Option<Affine> {
        self.last.map(|l| Affine::plain(l, 0.0, 1.0))
    }
}

// ---------------------------------------------------------------- chen

/// Chen-Toueg-Aguilera NFD-E (Sec. 6 of the paper). The paper's estimate of
/// the next arrival from the n most recent heartbeats with sequence
/// numbers `s_i` and arrivals `A_i`, the last being `s_l`, is
/// `EA = (1/n) * sum(A_i - eta * s_i) + (s_l + 1) * eta`, with `eta` the
/// sending interval. The sequence numbers are the trace's (the wire's);
/// a trace without them numbers the arrivals 0, 1, ... (a lost heartbeat
/// is then a long inter-arrival time). `eta` is estimated from the window
/// as `(A_l - A_first) / (s_l - s_first)`, so a sender's interval need not
/// be configured ([`chen_expected_arrival`]). The process is suspected
/// from the freshness point `EA + alpha` on. The paper's process never
/// restarts; a restart the sequence numbers show ([`restarted`], as hb
/// infers it) is a new process, whose window starts empty.
struct Chen {
    /// (arrival ns, sequence number).
    window: VecDeque<(u64, u64)>,
    sum_t: u128,
    sum_s: u128,
    /// The next sequence number to give an arrival without one.
    next: u64,
    /// The sequence numbers of the current incarnation, as hb's gate
    /// tracks them, to tell a restart.
    seen: replay::Window,
    thresholds: Arc<[f64]>,
}

/// `EA` of Chen's NFD-E for a window of `n` arrivals (at least two) with
/// arrival times summing to `sum_t` ns and sequence numbers summing to
/// `sum_s`, the first `(t, s)` and the last. Returned in ns as `f64`.
pub fn chen_expected_arrival(
    n: usize,
    sum_t: u128,
    sum_s: u128,
    first: (u64, u64),
    last: (u64, u64),
) -> f64 {
    let eta = (last.0 - first.0) as f64 / last.1.saturating_sub(first.1).max(1) as f64;
    let n = n as f64;
    sum_t as f64 / n + eta * (last.1 as f64 + 1.0 - sum_s as f64 / n)
}

impl Chen {
    fn expected_arrival(&self) -> Option<(u64, f64)> {
        let n = self.window.len();
        if n < 2 {
            return None;
        }
        let (first, last) = (self.window[0], self.window[n - 1]);
        let ea = chen_expected_arrival(n, self.sum_t, self.sum_s, first, last);
        Some((last.0, ea))
    }
}

impl Detector for Chen {
    fn arrival(&mut self, a: &Arrival) {
        let s = a.seq.unwrap_or(self.next);
        self.next = s.saturating_add(1);
        match self.seen.check(s) {
            Some(f) => self.seen.apply(s, f),
            None if restarted(self.seen.max_seq, s) => {
                self.seen = replay::Window::starting_at(s);
                self.window.clear();
                (self.sum_t, self.sum_s) = (0, 0);
            }
            // A duplicate (or seq 0): in the window as the paper's
            // estimate would take it.
            None => {}
        }
        if self.window.len() == WINDOW {
            let (t, s) = self.window.pop_front().unwrap_or_default();
            self.sum_t -= t as u128;
            self.sum_s -= s as u128;
        }
        self.window.push_back((a.recv_ns, s));
        self.sum_t += a.recv_ns as u128;
        self.sum_s += s as u128;
    }
    fn deadlines(&self, out: &mut [Option<u64>]) {
        let Some((last, ea)) = self.expected_arrival() else {
            out.fill(None);
            return;
        };
        for (o, &alpha_ms) in out.iter_mut().zip(self.thresholds.iter()) {
            *o = after(last, (ea - last as f64) / 1e6 + alpha_ms);
        }
    }
    fn affine(&self) -> Option<Affine> {
        let (last, ea) = self.expected_arrival()?;
        Some(Affine::plain(last, (ea - last as f64) / 1e6, 1.0))
    }
}

// ---------------------------------------------------------------- windows

/// The last [`WINDOW`] inter-arrival samples (ms) with running sums, as
/// Akka's `HeartbeatHistory` and Cassandra's `ArrayBackedBoundedStats`.
#[derive(Clone, Debug, Default)]
struct Window {
    samples: VecDeque<f64>,
    sum: f64,
    sq: f64,
}

impl Window {
    fn push(&mut self, x: f64) {
        if self.samples.len() == WINDOW {
            let old = self.samples.pop_front().unwrap_or_default();
            self.sum -= old;
            self.sq -= old * old;
        }
        self.samples.push_back(x);
        self.sum += x;
        self.sq += x * x;
    }
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn mean(&self) -> f64 {
        self.sum / self.samples.len() as f64
    }
    /// Population standard deviation (Akka's `HeartbeatHistory.stdDeviation`).
    fn std(&self) -> f64 {
        let m = self.mean();
        (self.sq / self.samples.len() as f64 - m * m)
            .max(0.0)
            .sqrt()
    }
}

// ---------------------------------------------------------------- phi-normal

/// `log10` of the upper tail of the standard normal, `P(Z > y)`, without
/// underflow: `erfc` up to y = 30, the asymptotic series of Mills' ratio
/// (Abramowitz & Stegun 26.2.12) beyond, where it is exact to ~1e-9.
fn log10_normal_tail(y: f64) -> f64 {
    if y < 30.0 {
        (0.5 * libm::erfc(y / std::f64::consts::SQRT_2)).log10()
    } else {
        let y2 = y * y;
        let series = 1.0 - 1.0 / y2 + 3.0 / (y2 * y2) - 15.0 / (y2 * y2 * y2);
        let ln = -0.5 * y2 - (y * (2.0 * std::f64::consts::PI).sqrt()).ln() + series.ln();
        ln / std::f64::consts::LN_10
    }
}

/// Hayashibara et al. (2004), Sec. 4.1: `phi(t) = -log10(P_later(t))`,
/// `P_later(t) = 1 - F(t)` with `F` the normal CDF of mean `mean_ms` and
/// standard deviation `std_ms`.
pub fn hayashibara_phi(elapsed_ms: f64, mean_ms: f64, std_ms: f64) -> f64 {
    -log10_normal_tail((elapsed_ms - mean_ms) / std_ms)
}

/// The paper needs `sigma > 0`; a window of identical samples (a perfectly
/// regular sender in a simulation) would divide by zero. 1 us is a
/// numerical guard, not a tuning (Akka's 100 ms floor is a tuning).
const PHI_NORMAL_MIN_STD_MS: f64 = 0.001;

struct PhiNormal {
    last: Option<u64>,
    stats: Window,
    ystar: Arc<[f64]>,
}

impl Detector for PhiNormal {
    fn arrival(&mut self, a: &Arrival) {
        let t_ns = a.recv_ns;
        if let Some(l) = self.last {
            self.stats.push((t_ns - l) as f64 / 1e6);
        }
        self.last = Some(t_ns);
    }
    fn deadlines(&self, out: &mut [Option<u64>]) {
        // Two samples at least, for a variance.
        let (Some(last), true) = (self.last, self.stats.len() >= 2) else {
            out.fill(None);
            return;
        };
        let (m, s) = (
            self.stats.mean(),
            self.stats.std().max(PHI_NORMAL_MIN_STD_MS),
        );
        for (o, &y) in out.iter_mut().zip(self.ystar.iter()) {
            *o = after(last, m + s * y);
        }
    }
    fn affine(&self) -> Option<Affine> {
        let (Some(last), true) = (self.last, self.stats.len() >= 2) else {
            return None;
        };
        Some(Affine::plain(
            last,
            self.stats.mean(),
            self.stats.std().max(PHI_NORMAL_MIN_STD_MS),
        ))
    }
}

// ---------------------------------------------------------------- akka

/// Akka's `PhiAccrualFailureDetector.phi`: the logistic approximation of
/// the normal CDF (Bowling et al. 2009, "A logistic approximation to the
/// cumulative normal distribution"), as written in Akka:
/// `y = (t - mean) / sd; e = exp(-y * (1.5976 + 0.070566 * y * y))`,
/// `phi = -log10(e / (1 + e))` when late, `-log10(1 - 1 / (1 + e))` when not.
pub fn akka_phi(time_diff_ms: f64, mean_ms: f64, std_ms: f64) -> f64 {
    let y = (time_diff_ms - mean_ms) / std_ms;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    if time_diff_ms > mean_ms {
        -(e / (1.0 + e)).log10()
    } else {
        -(1.0 - 1.0 / (1.0 + e)).log10()
    }
}

/// akka-cluster reference.conf, `akka.cluster.failure-detector`.
pub const AKKA_MIN_STD_MS: f64 = 100.0;
pub const AKKA_ACCEPTABLE_PAUSE_MS: f64 = 3000.0;
pub const AKKA_FIRST_HEARTBEAT_ESTIMATE_MS: f64 = 1000.0;

/// Akka's detector keeps one history per threshold: it leaves an
/// inter-arrival time out of the history when the node was already
/// unavailable at that heartbeat (`if (isAvailable(timestamp)) history :+
/// interval`), so the state depends on the threshold. Thresholds whose
/// histories are still equal share one window (a group, its thresholds in
/// increasing order); a heartbeat that finds the node unavailable under
/// the lower thresholds of a group and available under the higher ones
/// splits it. Most heartbeats split nothing, so a sweep over many
/// thresholds costs about one window, not one per threshold.
struct Akka {
    last: Option<u64>,
    groups: Vec<(Window, Vec<usize>)>,
    ystar: Arc<[f64]>,
}

impl Akka {
    fn new(ystar: Arc<[f64]>) -> Akka {
        let mut order: Vec<usize> = (0..ystar.len()).collect();
        order.sort_by(|&a, &b| ystar[a].total_cmp(&ystar[b]));
        Akka {
            last: None,
            groups: vec![(Window::default(), order)],
            ystar,
        }
    }

    /// The deadline after `last` under history `w` at standardized
    /// threshold `y` (increasing in `y`).
    fn deadline(last: u64, w: &Window, y: f64) -> Option<u64> {
        let mean = w.mean() + AKKA_ACCEPTABLE_PAUSE_MS;
        let std = w.std().max(AKKA_MIN_STD_MS);
        after(last, mean + std * y)
    }
}

impl Detector for Akka {
    fn arrival(&mut self, a: &Arrival) {
        let t_ns = a.recv_ns;
        match self.last {
            None => {
                // `firstHeartbeat`: history = [mean - std, mean + std]
                // with `std = mean / 4` (Akka's `toMillis / 4`, an integer
                // division; exact for the 1000 ms estimate).
                let (mean, std) = (
                    AKKA_FIRST_HEARTBEAT_ESTIMATE_MS,
                    AKKA_FIRST_HEARTBEAT_ESTIMATE_MS / 4.0,
                );
                for (w, _) in &mut self.groups {
                    w.push(mean - std);
                    w.push(mean + std);
                }
            }
            Some(l) => {
                let interval = (t_ns - l) as f64 / 1e6;
                let mut split = Vec::new();
                for (w, ks) in &mut self.groups {
                    // The first threshold (in increasing order) under which
                    // the node is still available; all above it are too.
                    let first = ks.partition_point(|&k| {
                        Akka::deadline(l, w, self.ystar[k]).is_some_and(|d| t_ns >= d)
                    });
                    if first > 0 {
                        // Unavailable under ks[..first]: their history
                        // stays as it is, in a group of its own.
                        let rest = ks.split_off(first);
                        let unavailable = std::mem::replace(ks, rest);
                        split.push((w.clone(), unavailable));
                    }
                    if !ks.is_empty() {
                        w.push(interval);
                    }
                }
                self.groups.retain(|(_, ks)| !ks.is_empty());
                self.groups.append(&mut split);
            }
        }
        self.last = Some(t_ns);
    }
    fn deadlines(&self, out: &mut [Option<u64>]) {
        let Some(last) = self.last else {
            out.fill(None);
            return;
        };
        for (w, ks) in &self.groups {
            for &k in ks {
                out[k] = Akka::deadline(last, w, self.ystar[k]);
            }
        }
    }
}

// ---------------------------------------------------------------- cassandra

/// `FailureDetector.PHI_FACTOR = 1.0 / Math.log(10.0)`.
pub const CASSANDRA_PHI_FACTOR: f64 = 1.0 / std::f64::consts::LN_10;
/// `fd_max_interval_ms` default (`2 * Gossiper.intervalInMillis`).
pub const CASSANDRA_MAX_INTERVAL_MS: f64 = 2000.0;
/// `fd_initial_value_ms` default (`2 * Gossiper.intervalInMillis`).
pub const CASSANDRA_INITIAL_VALUE_MS: f64 = 2000.0;

/// Cassandra's conviction level: `PHI_FACTOR * elapsed / mean`.
pub fn cassandra_phi(elapsed_ms: f64, mean_ms: f64) -> f64 {
    CASSANDRA_PHI_FACTOR * elapsed_ms / mean_ms
}

struct Cassandra {
    last: Option<u64>,
    stats: Window,
    thresholds: Arc<[f64]>,
}

impl Detector for Cassandra {
    fn arrival(&mut self, a: &Arrival) {
        let t_ns = a.recv_ns;
        match self.last {
            // `ArrivalWindow.add`: the first heartbeat seeds the window with
            // the (deliberately large) initial value.
            None => self.stats.push(CASSANDRA_INITIAL_VALUE_MS),
            Some(l) => {
                let ia = (t_ns - l) as f64 / 1e6;
                if ia <= CASSANDRA_MAX_INTERVAL_MS {
                    self.stats.push(ia);
                }
            }
        }
        self.last = Some(t_ns);
    }
    fn deadlines(&self, out: &mut [Option<u64>]) {
        let Some(last) = self.last else {
            out.fill(None);
            return;
        };
        let mean = self.stats.mean();
        for (o, &thr) in out.iter_mut().zip(self.thresholds.iter()) {
            // PHI_FACTOR * t / mean >= thr  <=>  t >= thr * mean * ln 10.
            *o = after(last, thr * mean / CASSANDRA_PHI_FACTOR);
        }
    }
    fn affine(&self) -> Option<Affine> {
        self.last
            .map(|l| Affine::plain(l, 0.0, self.stats.mean() / CASSANDRA_PHI_FACTOR))
    }
}

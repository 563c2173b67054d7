//! The discrete-event simulation: senders, a network, the gate, the
//! monitor's tick with the detector, and the controller.
//!
//! Time is simulated (nanoseconds, a `BinaryHeap` of events), so an hour
//! of a fleet runs in a fraction of a second and a run is a pure function
//! of its configuration and seed. What runs is the production code:
//! every node's sender is `hb send`'s own [`Sender`] (it builds and seals
//! the heartbeats, judges the ACKs, smooths the RTT and adopts the
//! monitor's interval by its rules), driven the way `hb send`'s loop
//! drives it (`send/mod.rs`: the next heartbeat one interval after the one
//! that was due, rescheduled at once by an ACK that changes the interval,
//! every wakeup reported with how late it is, the interval a restart
//! resumes at kept as `--state-dir` keeps it); heartbeats are gated by
//! [`MemDataplane::gate`](crate::dataplane::mem::MemDataplane) (SipHash,
//! anti-replay, `NodeState::admit/record`, the ACK policy, configured as
//! `hb monitor` configures it for the policy); suspicion is the monitor's
//! tick at every monitor tick (its [`Detector`], with phi's thresholds,
//! the stall allowance and the max-silence backstop, and its state
//! machine, [`state::step`]); decisions are [`QController::observe`] once
//! per decision period per node, by time, as the monitor schedules them
//! ([`Decisions`]).
//!
//! A stalled sender (a pause of the scenario) runs nothing: its heartbeat
//! timer fires and the ACKs that reach it are read when the stall ends, as
//! a stopped process finds them in its socket buffer.
//!
//! The monitor side is the tick without its events, table and API
//! (`monitor_step`): a node is suspected while the monitor's state
//! machine holds it `suspect` or `dead`. A suspicion that starts while the
//! node is up is a false one (the `suspect` or `dead` event the monitor
//! would announce about a live node); one that the node's own heartbeats
//! end within its generation is refuted, and is reported to the controller
//! as the tick reports it. A crash is detected at the first tick of the
//! suspicion that stands (Chen, Toueg and Aguilera's detection time, as
//! `hb eval` measures it): a heartbeat sent before the crash that arrives
//! late refutes an earlier suspicion, which then does not count.
//!
//! Every crash is accounted for, detected or missed: a crash whose node
//! would restart after the end of the run is followed past the end
//! (`Sim::follow_past_end`), so the slow detections near the end are
//! not cut off the distribution.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use anyhow::Context as _;
use hb_common::{
    GateResult, NodeKey,
    maps::{Config as GateConfig, MAX_NODES, NodeKeys, NodeState},
    proto,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::scenario::{GilbertElliott, Profile, Scenario};
use crate::{
    controller::{QController, RewardStats},
    dataplane::{Dataplane, mem::MemDataplane},
    detector::PhiParams,
    monitor::{
        config::{self, ControllerKind, Opts, Settings},
        state::{self, Thresholds, Track, Transition},
        tick::Detector,
    },
    send::{
        resume,
        sender::{Config as SenderConfig, Sender},
    },
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;
/// Simulated time starts here (a monotonic clock is never 0).
const T0: u64 = 1_000 * S;
/// How long past the end of a run a crash still undetected is followed at
/// most (unless its node would have restarted sooner): one not detected by
/// then counts as missed. The monitor's max-silence backstop (60 s by
/// default) ends the wait long before, when it is on.
const FOLLOW_CAP: u64 = 3600 * S;

/// Who picks the intervals.
pub enum Policy<'a> {
    /// Every node is asked to use this interval, ms.
    Fixed(u32),
    /// The Q-learning controller.
    QLearn(&'a mut QController),
}

impl Policy<'_> {
    pub fn label(&self) -> String {
        match self {
            Policy::Fixed(ms) => format!("fixed:{ms}"),
            Policy::QLearn(_) => "qlearn".into(),
        }
    }
}

/// Everything a run depends on besides the policy.
#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub scenario: Scenario,
    pub nodes: u32,
    pub duration_s: f64,
    pub seed: u64,
    /// The monitor's state thresholds: `suspect_phi` is the phi at which
    /// it suspects a node; the dead rules and the max-silence backstop
    /// apply too (the simulation judges with the monitor's [`Detector`]).
    #[serde(skip)]
    pub thresholds: Thresholds,
    #[serde(skip)]
    pub phi: PhiParams,
    /// The monitor's tick, ms.
    pub tick_ms: u64,
    /// Each node gets one controller decision per this period, ms.
    pub decision_period_ms: u64,
    /// The senders' own bounds (`hb send --min/--max-interval-ms`).
    pub sender_min_ms: u32,
    pub sender_max_ms: u32,
    /// Interval a sender starts with under `qlearn` (`hb send`'s default).
    /// A restarted sender resumes at the interval it last adopted, as
    /// `hb send --state-dir` does.
    pub initial_interval_ms: u32,
    /// The trajectory is sampled this often, s.
    pub sample_every_s: f64,
}

impl SimConfig {
    pub fn new(scenario: Scenario, nodes: u32, duration_s: f64, seed: u64) -> SimConfig {
        SimConfig {
            scenario,
            nodes,
            duration_s,
            seed,
            thresholds: Thresholds::default(),
            phi: PhiParams::default(),
            tick_ms: 100,
            decision_period_ms: 5000,
            sender_min_ms: 100,
            sender_max_ms: 10_000,
            initial_interval_ms: 1000,
            sample_every_s: 60.0,
        }
    }

    /// The monitor's detector under this configuration.
    pub fn detector(&self) -> Detector {
        Detector::new(self.thresholds, self.phi)
    }
}

/// Mean, median, p99 and max of a sample, ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Nearest-rank percentiles.
    pub fn of(mut v: Vec<f64>) -> Summary {
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Summary {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: rank(0.5),
            p99: rank(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// The fleet's intervals at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TrajectoryPoint {
    pub t_s: f64,
    /// Over the senders that are up.
    pub mean_ms: f64,
    pub min_ms: u32,
    pub p50_ms: u32,
    pub max_ms: u32,
    /// Node 1's interval.
    pub node1_ms: u32,
}

/// The controller's state at the end of a run. `decisions` and
/// `reward_mean` are this run's own: a controller trained first (`--train`)
/// or loaded (`--table`) brings its lifetime counters in, which are left
/// out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControllerSummary {
    pub decisions: u64,
    pub epsilon: f64,
    /// Mean reward of the periods rewarded in this run (0 when none was).
    pub reward_mean: f64,
    pub visited_states: usize,
    pub target_detection_ms: f64,
}

/// What a run measured on the nodes of one profile (a mixed fleet has
/// several).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileReport {
    pub profile: String,
    pub nodes: u32,
    pub heartbeats_per_node_s: f64,
    pub detection_ms: Summary,
    /// Every detection time, ms (not in the JSON report).
    #[serde(skip)]
    pub detections_ms: Vec<f64>,
    /// Crashes of these nodes never detected (see [`SimReport::missed`]).
    pub missed: u64,
    pub false_suspicions: u64,
    /// Per hour of these nodes' up-time (`alive_node_hours`).
    pub false_suspicions_per_node_hour: f64,
    /// Time these nodes were up (not crashed) during the run, node-hours.
    pub alive_node_hours: f64,
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimReport {
    pub scenario: String,
    pub controller: String,
    pub seed: u64,
    pub nodes: u32,
    pub duration_s: f64,
    pub heartbeats_sent: u64,
    pub heartbeats_lost: u64,
    pub acks_sent: u64,
    pub heartbeats_per_node_s: f64,
    /// Crashes during the run; each is either detected (counted in
    /// `detection_ms`) or `missed`.
    pub crashes: u64,
    /// Crashes whose node was not suspected when it restarted. A crash
    /// whose node would restart after the end of the run is followed past
    /// the end until its suspicion stands (no heartbeat sent before the
    /// crash is still on its way) or its node would have restarted (at
    /// most an hour past the end).
    pub missed: u64,
    /// Crash to the first tick of the suspicion that stands (a suspicion
    /// that a late heartbeat sent before the crash refutes does not
    /// count), ms, of the crashes detected (detections past the end of the
    /// run included; the missed ones are not in it).
    pub detection_ms: Summary,
    /// Every detection time, ms, in the order the crashes ended (for
    /// pooling runs and for percentiles of mixtures; not in the JSON
    /// report).
    #[serde(skip)]
    pub detections_ms: Vec<f64>,
    /// Suspicions that started while the node was up (each suspicion
    /// once, as the monitor announces it).
    pub false_suspicions: u64,
    /// False suspicions per hour of up-time (`alive_node_hours`: the time
    /// nodes were not crashed, the mistake rate's denominator in Chen,
    /// Toueg and Aguilera, as `hb eval` uses it).
    pub false_suspicions_per_node_hour: f64,
    /// Time the nodes were up (not crashed) during the run, node-hours.
    pub alive_node_hours: f64,
    /// Mean interval of the senders that are up, weighted by time, ms:
    /// the mean of `interval_share` (not of the trajectory, whose samples
    /// are a minute apart from the start).
    pub mean_interval_ms: f64,
    pub trajectory: Vec<TrajectoryPoint>,
    pub controller_state: Option<ControllerSummary>,
    /// The same figures per node profile, in the scenario's order.
    pub profiles: Vec<ProfileReport>,
    /// Share of the senders' up-time spent at each interval (ms, share),
    /// sampled once a second.
    pub interval_share: Vec<(u32, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The sender's heartbeat timer; stale once the node crashed or its
    /// next heartbeat was rescheduled (`timer`).
    Send {
        node: u32,
        timer: u32,
    },
    /// A heartbeat reaches the monitor (its datagram is in
    /// [`Payloads`] under `payload`).
    Arrive {
        node: u32,
        payload: u32,
    },
    /// An ACK reaches the sender (or its stall ends with the ACK in its
    /// socket buffer).
    Ack {
        node: u32,
        payload: u32,
    },
    Crash {
        node: u32,
    },
    Restart {
        node: u32,
    },
}

/// The datagrams in flight, out of the event heap: a heap entry stays
/// 24 bytes instead of carrying 48 bytes of payload through every sift,
/// which made the heap the largest cost of a fast-interval run.
#[derive(Default)]
struct Payloads {
    slots: Vec<[u8; proto::LEN]>,
    free: Vec<u32>,
}

impl Payloads {
    fn put(&mut self, p: [u8; proto::LEN]) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = p;
                i
            }
            None => {
                self.slots.push(p);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn take(&mut self, i: u32) -> [u8; proto::LEN] {
        self.free.push(i);
        self.slots[i as usize]
    }
}

/// The mean of the rewards counted from `start` to `end` (two states of one
/// controller's running statistics), 0 when none was.
fn run_reward_mean(start: &RewardStats, end: &RewardStats) -> f64 {
    let n = end.count.saturating_sub(start.count);
    if n == 0 {
        return 0.0;
    }
    (end.mean * end.count as f64 - start.mean * start.count as f64) / n as f64
}

/// Sorted, disjoint `[start, end)` spans of simulated time.
#[derive(Clone, Debug, Default)]
struct Spans(Vec<(u64, u64)>);

impl Spans {
    /// Episodes at `per_hour` within `[start, end)`, each `length` seconds
    /// long (of mean `mean_len_s`), apart by exponential gaps of mean
    /// `3600 / per_hour - mean_len_s`: `per_hour` episodes an hour on
    /// average, as the scenarios say. (Gaps of mean `3600 / per_hour` made
    /// the rate `3600 / (3600 / per_hour + mean length)`: `congestion`'s
    /// "6 an hour" came about 5.2 times.)
    fn poisson(
        rng: &mut ChaCha8Rng,
        per_hour: f64,
        mean_len_s: f64,
        length: impl Fn(&mut ChaCha8Rng) -> f64,
        start: u64,
        end: u64,
    ) -> Spans {
        let mut v = Vec::new();
        if per_hour <= 0.0 {
            return Spans(v);
        }
        // Scenarios keep episodes shorter than their mean period
        // (`shipped_scenarios_fit_their_episode_rates`).
        let mean_gap_s = (3600.0 / per_hour - mean_len_s).max(1.0);
        let mut t = start as f64;
        loop {
            t += exp(rng, mean_gap_s) * S as f64;
            if t >= end as f64 {
                break;
            }
            let len = (length(rng).max(0.001) * S as f64) as u64;
            v.push((t as u64, t as u64 + len));
            t += len as f64;
        }
        Spans(v)
    }

    /// The span containing `t`, if any.
    fn at(&self, t: u64) -> Option<(u64, u64)> {
        let i = self.0.partition_point(|s| s.1 <= t);
        self.0.get(i).copied().filter(|s| s.0 <= t)
    }
}

/// An exponential sample of mean `mean`.
fn exp(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// A path's loss state over time ([`GilbertElliott`]): the Good and Bad
/// periods are drawn from the path's own random stream as time advances,
/// so they are the same whatever the path carries and whenever it is
/// asked (every policy compared on a seed faces the same bursts), and
/// advancing them costs nothing between state changes.
struct LossChain {
    ge: GilbertElliott,
    bad: bool,
    /// When the current period ends.
    until: u64,
    rng: ChaCha8Rng,
}

impl LossChain {
    /// The chain from `start` on, in its long-run state distribution.
    fn new(ge: GilbertElliott, seed: u64, start: u64) -> LossChain {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (bad, changes) = if ge.mean_bad_s <= 0.0 {
            (false, false)
        } else if ge.mean_good_s <= 0.0 {
            (true, false)
        } else {
            (rng.random::<f64>() < ge.bad_share(), true)
        };
        let mut c = LossChain {
            ge,
            bad,
            until: u64::MAX,
            rng,
        };
        if changes {
            // Memoryless: what is left of the current period is as long
            // as a whole one.
            c.until = start.saturating_add(c.period());
        }
        c
    }

    /// The length of a period in the current state, ns (at least 1).
    fn period(&mut self) -> u64 {
        let mean = if self.bad {
            self.ge.mean_bad_s
        } else {
            self.ge.mean_good_s
        };
        ((exp(&mut self.rng, mean) * S as f64) as u64).max(1)
    }

    /// Whether the path is Bad at `t` (asked at times that do not go
    /// back).
    fn bad_at(&mut self, t: u64) -> bool {
        while t >= self.until {
            self.bad = !self.bad;
            self.until = self.until.saturating_add(self.period());
        }
        self.bad
    }

    /// The probability that a packet sent at `t` is lost.
    fn loss_at(&mut self, t: u64) -> f64 {
        if self.bad_at(t) {
            self.ge.loss_bad
        } else {
            self.ge.loss_good
        }
    }
}

/// One direction of a node's path.
struct Path {
    base_ms: f64,
    loss: LossChain,
}

/// What a crash is waiting for: the suspicion that stands.
#[derive(Clone, Copy, Debug)]
struct Outage {
    crashed_at: u64,
    /// The first tick of the current suspicion of the crashed node, if it
    /// is suspected.
    suspected_at: Option<u64>,
}

impl Outage {
    /// Crash to detection, ms, if the node is suspected.
    fn detection_ms(&self) -> Option<f64> {
        self.suspected_at
            .map(|s| (s - self.crashed_at) as f64 / MS as f64)
    }
}

struct Node {
    id: u32,
    profile: Profile,
    /// Index of `profile` in the scenario.
    kind: usize,
    key: NodeKey,
    rng: ChaCha8Rng,
    up: Path,
    down: Path,
    congestion: Spans,
    spikes: Spans,
    pauses: Spans,
    base_load: u16,
    // Sender: `hb send`'s state and its loop's.
    alive: bool,
    sender: Sender,
    /// When the loop's next heartbeat is due (its `next`).
    due: u64,
    /// Which heartbeat timer is current: a `Send` event of another is
    /// stale (the node crashed, or an ACK rescheduled the heartbeat).
    timer: u32,
    /// The interval `--state-dir` holds: the last one an ACK changed the
    /// sender to, which a restart resumes at.
    saved_ms: Option<u32>,
    /// When the last heartbeat the sender sent arrives at the monitor (or
    /// would have, lost): until then, a crashed node may still be heard
    /// from.
    in_flight_until: u64,
    // Ground truth and the monitor's view.
    outage: Option<Outage>,
    /// Time spent crashed within the run, ns (up to the last restart).
    down_ns: u64,
    /// The monitor's state machine's memory of the node.
    track: Track,
    /// Refuted suspicions since the node's last decision.
    refuted: u32,
}

impl Node {
    /// Delay of one packet on `dir`'s path at `t`, or `None` if lost.
    fn transit(&mut self, up: bool, t: u64) -> Option<u64> {
        let p = &self.profile;
        let congested = self.congestion.at(t).is_some();
        let path = if up { &mut self.up } else { &mut self.down };
        let mut loss = path.loss.loss_at(t);
        let mut delay = path.base_ms + exp(&mut self.rng, p.jitter_ms);
        if p.tail_prob > 0.0 && self.rng.random::<f64>() < p.tail_prob {
            let u = 1.0 - self.rng.random::<f64>();
            delay += (p.tail_scale_ms * u.powf(-1.0 / p.tail_alpha)).min(30_000.0);
        }
        if congested {
            let c = p.congestion;
            loss = 1.0 - (1.0 - loss) * (1.0 - c.extra_loss);
            delay += c.extra_delay_ms + exp(&mut self.rng, c.extra_jitter_ms);
        }
        if self.rng.random::<f64>() < loss {
            return None;
        }
        Some((delay * MS as f64) as u64)
    }

    fn load(&self, t: u64) -> u16 {
        if self.spikes.at(t).is_some() {
            self.profile.spike_load
        } else {
            self.base_load
        }
    }

    /// One monitor tick's judgement of the node from its dataplane state
    /// `st` at `t` ([`monitor_step`]), held against the ground truth:
    /// whether a suspicion of the node, up, started (a false one). Of a
    /// crashed node, it follows the suspicion that may be its detection.
    fn judge(&mut self, det: &Detector, st: &NodeState, t: u64) -> bool {
        let was = self.track.status.suspected();
        let (tr, now) = monitor_step(det, &mut self.track, st, t);
        if tr.as_ref().is_some_and(Transition::refutes_suspicion) {
            self.refuted += 1;
        }
        if let Some(o) = &mut self.outage {
            o.suspected_at = if now {
                o.suspected_at.or(Some(t))
            } else {
                None
            };
        }
        now && !was && self.alive
    }

    /// Time spent crashed within the run, ns, counting a crash still
    /// running at `end` up to `end`.
    fn down_until(&self, end: u64) -> u64 {
        self.down_ns + self.outage.map_or(0, |o| end.saturating_sub(o.crashed_at))
    }
}

/// How late a sender's timer wakes it: up to 0.5 ms.
fn slack(rng: &mut ChaCha8Rng) -> u64 {
    rng.random_range(0..MS / 2)
}

/// The monitor's address, where the ACKs come from.
const MONITOR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 7420));

/// A sender as `hb send --node-id ID --interval-ms MS` starts it, for
/// generation `generation`, resumed at `resumed_ms` (`send::resume`).
fn new_sender(
    cfg: &SimConfig,
    id: u32,
    key: NodeKey,
    generation: u32,
    interval_ms: u32,
    resumed_ms: Option<u32>,
) -> Sender {
    Sender::new(SenderConfig {
        node_id: id,
        key,
        key_epoch: 0,
        generation,
        interval_ms,
        resumed_ms,
        // Its one monitor never moves.
        resumed_by: None,
        min_interval_ms: cfg.sender_min_ms,
        max_interval_ms: cfg.sender_max_ms,
        monitors: vec![MONITOR],
    })
}

/// The gate's configuration `hb monitor` runs `policy` with (`--fixed-
/// interval-ms MS` or `--controller qlearn`, no `--ack`/`--ack-every`):
/// its own settings code decides which heartbeats are ACKed.
fn monitor_gate_config(policy: &Policy<'_>) -> anyhow::Result<GateConfig> {
    let mut o = Opts {
        keyring: Some("keyring.toml".into()),
        nodes: Some("1".into()),
        ..Opts::default()
    };
    match policy {
        // Within the range the monitor accepts; the ACKs do not depend on
        // the interval.
        Policy::Fixed(ms) => o.fixed_interval_ms = Some((*ms).clamp(100, 10_000)),
        Policy::QLearn(_) => o.controller = Some(ControllerKind::Qlearn),
    }
    let s = Settings::load(&o.into()).context("the monitor's settings for the policy")?;
    Ok(crate::monitor::gate_config(&s))
}

/// The monitor's tick for one node, without its events: the detector's
/// observation ([`Detector::observe`]: phi's thresholds, the stall
/// allowance, the max-silence backstop) stepped through the state machine
/// ([`state::step`]). Returns the transition, if any, and whether the node
/// is suspected after it.
pub(super) fn monitor_step(
    det: &Detector,
    track: &mut Track,
    st: &NodeState,
    t: u64,
) -> (Option<Transition>, bool) {
    let tr = state::step(track, &det.observe(st, t));
    (tr, track.status.suspected())
}

/// The address a node's heartbeats come from.
fn source(node: u32) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(198, 18, (node >> 8) as u8, node as u8),
        40000,
    ))
}

/// `count` per hour of `hours`; 0 over no time.
fn per_hour(count: u64, hours: f64) -> f64 {
    if hours > 0.0 {
        count as f64 / hours
    } else {
        0.0
    }
}

/// Seed of a sub-stream: the run's seed mixed with a purpose and a node.
fn sub_seed(seed: u64, purpose: u64, node: u32) -> u64 {
    // SplitMix64 finalizer over the three inputs.
    let mut z = seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((node as u64) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(super) struct Sim<'a, 'p> {
    cfg: &'a SimConfig,
    /// The monitor's detector (`cfg.detector()`).
    det: Detector,
    policy: &'a mut Policy<'p>,
    dp: MemDataplane,
    nodes: Vec<Node>,
    heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    payloads: Payloads,
    order: u64,
    end: u64,
    sent: u64,
    lost: u64,
    crashes: u64,
    missed: u64,
    detections: Vec<f64>,
    false_suspicions: u64,
    trajectory: Vec<TrajectoryPoint>,
    /// Per profile.
    by_kind: Vec<Tally>,
    /// The interval senders are started with (`hb send --interval-ms`).
    initial_ms: u32,
    clock: Clock,
    /// The controller's decisions and reward statistics when the run
    /// started (a trained or loaded controller's lifetime counters).
    controller_at_start: Option<(u64, RewardStats)>,
    /// The monitor's tick, ns.
    tick_ns: u64,
    /// Which nodes each tick decides for.
    decisions: Decisions,
    /// Nodes the controller was asked to decide for so far (holds
    /// included).
    decided: u64,
}

/// What the nodes of one profile did.
#[derive(Clone, Debug, Default)]
struct Tally {
    sent: u64,
    detections: Vec<f64>,
    missed: u64,
    false_suspicions: u64,
}

/// Where the run's ticks are, and what they sampled.
#[derive(Default)]
struct Clock {
    /// The next tick.
    t: u64,
    tick_no: u64,
    next_sample: u64,
    /// Node-seconds the senders that are up spent at each interval.
    at_interval: std::collections::BTreeMap<u32, u64>,
}

/// When the controller decides for each node: once per decision period, by
/// time, as the monitor's staggered policy does (`Core::due` in
/// `monitor::tick`): a node has a phase in the period, and is decided on
/// the tick whose window since the previous tick holds one of its
/// decision times, `phase + m * period` (`m >= 0`, from the first tick).
/// A period that is not a multiple of the tick still gives each node one
/// decision per period (cutting it to whole ticks decided every
/// `floor(period / tick)` ticks), and a period shorter than a tick every
/// node on every tick, as the monitor does.
///
/// The phases differ from the monitor's (a hash of the slot there):
/// `k = ceil(period / tick)` of them, spread evenly over the period, node
/// slot `i` at the `(i mod k)`-th. With a period that is a multiple of the
/// tick, slot `i` is thus decided on the ticks `n` with `n mod k = i mod
/// k`, which is what every published run was simulated with.
#[derive(Clone, Copy, Debug)]
pub(super) struct Decisions {
    tick_ns: u64,
    period_ns: u64,
    phases: u64,
}

impl Decisions {
    /// `tick_ns` and `period_ns` positive.
    pub(super) fn new(tick_ns: u64, period_ns: u64) -> Decisions {
        let (tick_ns, period_ns) = (tick_ns.max(1), period_ns.max(1));
        Decisions {
            tick_ns,
            period_ns,
            phases: period_ns.div_ceil(tick_ns),
        }
    }

    /// Whether node slot `slot` is due on the tick `since_ns` after the
    /// first tick (a multiple of the tick).
    pub(super) fn due(&self, slot: u32, since_ns: u64) -> bool {
        let phase = (slot as u64 % self.phases) * (self.period_ns / self.phases);
        // How many of its decision times are at or before `t`.
        let times = |t: u64| t.checked_sub(phase).map_or(0, |d| d / self.period_ns + 1);
        let before = since_ns.checked_sub(self.tick_ns).map_or(0, times);
        times(since_ns) > before
    }
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig, policy: &mut Policy<'_>) -> anyhow::Result<SimReport> {
    let mut sim = Sim::new(cfg, policy)?;
    sim.run_until(sim.end);
    sim.finish()
}

impl<'a, 'p> Sim<'a, 'p> {
    /// The fleet, its schedule and the monitor at the start of a run.
    pub(super) fn new(
        cfg: &'a SimConfig,
        policy: &'a mut Policy<'p>,
    ) -> anyhow::Result<Sim<'a, 'p>> {
        // Before anything is allocated for them.
        anyhow::ensure!(
            (1..=MAX_NODES).contains(&cfg.nodes),
            "--nodes {}: the fleet must have 1 to {MAX_NODES} nodes (the monitor's largest capacity)",
            cfg.nodes
        );
        anyhow::ensure!(
            cfg.duration_s > 0.0 && cfg.duration_s <= 30.0 * 86400.0,
            "duration must be positive and at most 30 days"
        );
        anyhow::ensure!(
            !cfg.scenario.profiles.is_empty(),
            "scenario has no node profile"
        );
        // The monitor's ranges (a decision period shorter than the tick
        // decides every node on every tick, as there).
        config::check_tick_ms(cfg.tick_ms).context("--tick-ms")?;
        config::check_decision_ms(cfg.decision_period_ms).context("--decision-period")?;
        let tick_ns = cfg.tick_ms.checked_mul(MS).context("--tick-ms")?;
        cfg.thresholds
            .validate()
            .map_err(|e| anyhow::anyhow!("the monitor's thresholds: {e}"))?;
        let period_ns = cfg
            .decision_period_ms
            .checked_mul(MS)
            .context("--decision-period")?;
        let decisions = Decisions::new(tick_ns, period_ns);
        let end = T0 + (cfg.duration_s * S as f64) as u64;
        let dp = MemDataplane::new();
        dp.set_config(&monitor_gate_config(policy)?)?;
        let initial = match policy {
            Policy::Fixed(ms) => *ms,
            Policy::QLearn(_) => cfg.initial_interval_ms,
        }
        .clamp(cfg.sender_min_ms, cfg.sender_max_ms);

        let controller_at_start = match &*policy {
            Policy::QLearn(c) => Some((c.decisions(), c.reward_stats())),
            Policy::Fixed(_) => None,
        };
        let mut sim = Sim {
            cfg,
            det: cfg.detector(),
            policy,
            dp,
            nodes: Vec::with_capacity(cfg.nodes as usize),
            heap: BinaryHeap::new(),
            payloads: Payloads::default(),
            order: 0,
            end,
            sent: 0,
            lost: 0,
            crashes: 0,
            missed: 0,
            detections: Vec::new(),
            false_suspicions: 0,
            trajectory: Vec::new(),
            by_kind: vec![Tally::default(); cfg.scenario.profiles.len()],
            initial_ms: initial,
            controller_at_start,
            tick_ns,
            decisions,
            decided: 0,
            clock: Clock {
                t: T0,
                next_sample: T0,
                ..Clock::default()
            },
        };
        for i in 0..cfg.nodes {
            let id = i + 1;
            let kind = i as usize % cfg.scenario.profiles.len();
            let profile = cfg.scenario.profiles[kind].clone();
            let key = NodeKey {
                k0: sub_seed(cfg.seed, 1, id),
                k1: sub_seed(cfg.seed, 2, id),
            };
            sim.dp.upsert_node(id, &NodeKeys::single(i, 0, key))?;
            if let Policy::Fixed(ms) = sim.policy {
                sim.dp.set_requested_interval(i, *ms);
            }
            // The schedule (paths, episodes, crashes) comes from its own
            // stream, so every policy faces the same run on a seed.
            let mut srng = ChaCha8Rng::seed_from_u64(sub_seed(cfg.seed, 3, id));
            let p = &profile;
            let (lo, hi) = p.base_delay_ms;
            let base = lo + (hi - lo) * srng.random::<f64>();
            let c = p.congestion;
            let congestion = Spans::poisson(
                &mut srng,
                c.per_hour,
                c.mean_duration_s,
                |r| exp(r, c.mean_duration_s),
                T0,
                end,
            );
            let sm = p.spike_mean_s;
            let spikes = Spans::poisson(&mut srng, p.spikes_per_hour, sm, |r| exp(r, sm), T0, end);
            let (plo, phi) = p.pause_s;
            let pauses = Spans::poisson(
                &mut srng,
                p.pauses_per_hour,
                (plo + phi) / 2.0,
                |r| plo + (phi - plo) * r.random::<f64>(),
                T0,
                end,
            );
            let base_load = p.load.0 + ((p.load.1 - p.load.0) as f64 * srng.random::<f64>()) as u16;
            // Crashes: Poisson, none in the first two minutes, each followed
            // by the downtime.
            let mut t = T0 + 120 * S;
            let down = (cfg.scenario.downtime_s * S as f64) as u64;
            loop {
                if cfg.scenario.crashes_per_node_hour <= 0.0 {
                    break;
                }
                t +=
                    (exp(&mut srng, 3600.0 / cfg.scenario.crashes_per_node_hour) * S as f64) as u64;
                if t >= end {
                    break;
                }
                sim.push(t, Event::Crash { node: i });
                t += down;
                if t < end {
                    sim.push(t, Event::Restart { node: i });
                }
            }
            // Senders start spread over their first interval.
            let start = T0 + (srng.random::<f64>() * initial as f64 * MS as f64) as u64;
            // Each direction's loss bursts come from a stream of their
            // own: the same periods whatever the path carries.
            let path = |purpose| Path {
                base_ms: base,
                loss: LossChain::new(p.loss, sub_seed(cfg.seed, purpose, id), T0),
            };
            let (up, down) = (path(5), path(6));
            sim.nodes.push(Node {
                id,
                kind,
                key,
                rng: ChaCha8Rng::seed_from_u64(sub_seed(cfg.seed, 4, id)),
                up,
                down,
                congestion,
                spikes,
                pauses,
                base_load,
                profile,
                alive: true,
                sender: new_sender(cfg, id, key, 1_700_000_000, initial, None),
                due: start,
                timer: 0,
                saved_ms: None,
                in_flight_until: 0,
                outage: None,
                down_ns: 0,
                track: Track::default(),
                refuted: 0,
            });
            sim.push(start, Event::Send { node: i, timer: 0 });
        }
        if let Policy::QLearn(c) = sim.policy {
            c.reset_nodes();
        }
        Ok(sim)
    }
}

impl Sim<'_, '_> {
    fn push(&mut self, t: u64, e: Event) {
        self.order += 1;
        self.heap.push(Reverse((t, self.order, e)));
    }

    /// Runs the events and the monitor's ticks up to `until` (at most the
    /// end of the run).
    pub(super) fn run_until(&mut self, until: u64) {
        let until = until.min(self.end);
        let tick = self.tick_ns;
        let sample_every = ((self.cfg.sample_every_s * S as f64) as u64).max(tick);
        // Once a second: how long the senders that are up spend at each
        // interval.
        let second_ticks = (1000 / self.cfg.tick_ms).max(1);
        while self.clock.t <= until {
            let t = self.clock.t;
            while let Some((et, e)) = self.pop_until(t) {
                self.handle(et, e);
            }
            let tick_no = self.clock.tick_no;
            self.tick(t);
            if tick_no.is_multiple_of(second_ticks) {
                for n in self.nodes.iter().filter(|n| n.alive) {
                    *self
                        .clock
                        .at_interval
                        .entry(n.sender.interval_ms())
                        .or_default() += 1;
                }
            }
            if t >= self.clock.next_sample {
                let p = self.sample(t);
                self.trajectory.push(p);
                self.clock.next_sample += sample_every;
            }
            self.clock.t += tick;
            self.clock.tick_no += 1;
        }
        // What happens between the last tick and `until` (at the end, the
        // run's too: its first tick is the next one, past the end).
        while let Some((et, e)) = self.pop_until(until) {
            self.handle(et, e);
        }
    }

    /// The report, once the run has reached its end ([`Sim::run_until`]).
    pub(super) fn finish(mut self) -> anyhow::Result<SimReport> {
        let tick = self.tick_ns;
        let t = self.clock.t;
        let at_interval = std::mem::take(&mut self.clock.at_interval);
        let duration_s = self.cfg.duration_s;
        let nodes = self.cfg.nodes;
        let acks = self.dp.counters()?[hb_common::maps::counter::ACK_SENT as usize];
        // Up-time, per profile and in all, before crashes are followed
        // past the end.
        let run_ns = self.end - T0;
        let mut alive_ns = vec![0u64; self.cfg.scenario.profiles.len()];
        for n in &self.nodes {
            alive_ns[n.kind] += run_ns.saturating_sub(n.down_until(self.end));
        }
        let node_hours = |ns: u64| ns as f64 / (3600.0 * S as f64);
        let alive_node_hours = node_hours(alive_ns.iter().sum());
        self.follow_past_end(t, tick);
        let controller_state = match self.policy {
            Policy::QLearn(c) => Some(ControllerSummary {
                decisions: c.decisions() - self.controller_at_start.map_or(0, |s| s.0),
                epsilon: c.epsilon(),
                reward_mean: run_reward_mean(
                    &self.controller_at_start.map(|s| s.1).unwrap_or_default(),
                    &c.reward_stats(),
                ),
                visited_states: c.rows().len(),
                target_detection_ms: c.config().target_detection_ms,
            }),
            Policy::Fixed(_) => None,
        };
        let profiles = self
            .cfg
            .scenario
            .profiles
            .iter()
            .zip(std::mem::take(&mut self.by_kind))
            .enumerate()
            .map(|(k, (p, tally))| {
                let n = self.nodes.iter().filter(|n| n.kind == k).count() as u32;
                let node_s = (n.max(1) as f64) * duration_s;
                let alive_node_hours = node_hours(alive_ns[k]);
                let fs = tally.false_suspicions;
                ProfileReport {
                    profile: p.name.to_string(),
                    nodes: n,
                    heartbeats_per_node_s: tally.sent as f64 / node_s,
                    detection_ms: Summary::of(tally.detections.clone()),
                    detections_ms: tally.detections,
                    missed: tally.missed,
                    false_suspicions: fs,
                    false_suspicions_per_node_hour: per_hour(fs, alive_node_hours),
                    alive_node_hours,
                }
            })
            .collect();
        let node_seconds: u64 = at_interval.values().sum();
        let mean_interval_ms = if node_seconds == 0 {
            0.0
        } else {
            at_interval
                .iter()
                .map(|(&ms, &n)| ms as f64 * n as f64)
                .sum::<f64>()
                / node_seconds as f64
        };
        let interval_share = at_interval
            .into_iter()
            .map(|(ms, n)| (ms, n as f64 / node_seconds.max(1) as f64))
            .collect();
        Ok(SimReport {
            interval_share,
            profiles,
            scenario: self.cfg.scenario.name.to_string(),
            controller: self.policy.label(),
            seed: self.cfg.seed,
            nodes,
            duration_s,
            heartbeats_sent: self.sent,
            heartbeats_lost: self.lost,
            acks_sent: acks,
            heartbeats_per_node_s: self.sent as f64 / (nodes as f64 * duration_s),
            crashes: self.crashes,
            missed: self.missed,
            detection_ms: Summary::of(self.detections.clone()),
            detections_ms: self.detections,
            false_suspicions: self.false_suspicions,
            false_suspicions_per_node_hour: per_hour(self.false_suspicions, alive_node_hours),
            alive_node_hours,
            mean_interval_ms,
            trajectory: self.trajectory,
            controller_state,
        })
    }

    /// The next event due at or before `t`, taken off the heap.
    fn pop_until(&mut self, t: u64) -> Option<(u64, Event)> {
        match self.heap.peek() {
            Some(Reverse((et, _, _))) if *et <= t => {
                self.heap.pop().map(|Reverse((et, _, e))| (et, e))
            }
            _ => None,
        }
    }

    /// Ends node slot `node`'s outage, if any: its crash is detected at
    /// the suspicion that stands, or missed.
    fn settle(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        let Some(o) = n.outage.take() else {
            return;
        };
        let tally = &mut self.by_kind[n.kind];
        match o.detection_ms() {
            Some(ms) => {
                self.detections.push(ms);
                tally.detections.push(ms);
            }
            None => {
                self.missed += 1;
                tally.missed += 1;
            }
        }
    }

    /// After the end (`t` is the first tick past it): the crashes still
    /// running are followed until the suspicion of each stands or its
    /// node would have restarted, the window a longer run would have
    /// given it, and at most [`FOLLOW_CAP`] past the end; one not
    /// suspected by then is missed. A suspicion stands once every
    /// heartbeat the node sent before it crashed has arrived (or been
    /// lost): only a fresh heartbeat ends one ([`state::step`]). Censoring
    /// them instead would drop the slowest detections (a crash near the
    /// end is detected only if it is detected fast) and bias the
    /// percentiles low. Only the crashed nodes are simulated: the
    /// heartbeats they sent before crashing still arrive and the tick
    /// still judges them; nothing else happens or is counted (no sends,
    /// no controller, no false suspicions).
    fn follow_past_end(&mut self, mut t: u64, tick: u64) {
        let down = (self.cfg.scenario.downtime_s * S as f64) as u64;
        let cap = self.end.saturating_add(FOLLOW_CAP);
        let det = self.det;
        let mut pending: Vec<u32> = (0..self.cfg.nodes)
            .filter(|&i| self.nodes[i as usize].outage.is_some())
            .collect();
        while !pending.is_empty() {
            while let Some((et, e)) = self.pop_until(t) {
                if let Event::Arrive { node, payload } = e {
                    let payload = self.payloads.take(payload);
                    if pending.contains(&node) {
                        self.dp.gate(&payload, source(node), et);
                    }
                }
            }
            let mut judged = Vec::with_capacity(pending.len());
            for &node in &pending {
                let n = &self.nodes[node as usize];
                let c = n.outage.map_or(t, |o| o.crashed_at);
                if c.saturating_add(down) <= t || t > cap {
                    // The node would have restarted.
                    judged.push((node, None));
                    continue;
                }
                let mut st = NodeState::default();
                self.dp
                    .read_states(node..node + 1, &mut |_, s: &NodeState| st = *s);
                judged.push((node, Some(st)));
            }
            pending.clear();
            for (node, st) in judged {
                let n = &mut self.nodes[node as usize];
                if let Some(st) = st {
                    n.judge(&det, &st, t);
                    let stands = t >= n.in_flight_until
                        && n.outage.is_some_and(|o| o.suspected_at.is_some());
                    if !stands {
                        pending.push(node);
                        continue;
                    }
                }
                self.settle(node);
            }
            t += tick;
        }
    }

    fn handle(&mut self, t: u64, e: Event) {
        match e {
            Event::Send { node, timer } => self.send(t, node, timer),
            Event::Arrive { node, payload } => {
                let payload = self.payloads.take(payload);
                let v = self.dp.gate(&payload, source(node), t);
                if let (GateResult::Accepted, Some(ack)) = (v.result, v.ack)
                    && let Some(d) = self.nodes[node as usize].transit(false, t)
                {
                    let payload = self.payloads.put(ack);
                    self.push(t + d, Event::Ack { node, payload });
                }
            }
            Event::Ack { node, payload } => {
                let n = &self.nodes[node as usize];
                if n.alive
                    && let Some((_, resume)) = n.pauses.at(t)
                {
                    // The sender is stalled: the ACK waits in its socket
                    // buffer until it runs again.
                    self.push(resume, Event::Ack { node, payload });
                    return;
                }
                let payload = self.payloads.take(payload);
                self.ack(t, node, &payload)
            }
            Event::Crash { node } => {
                let n = &mut self.nodes[node as usize];
                n.alive = false;
                n.timer += 1;
                // A node already suspected when it crashes is detected at
                // the crash, if nothing refutes the suspicion (Chen et
                // al.'s T_D is then 0, as `hb eval` counts it).
                n.outage = Some(Outage {
                    crashed_at: t,
                    suspected_at: n.track.status.suspected().then_some(t),
                });
                self.crashes += 1;
            }
            Event::Restart { node } => {
                let n = &mut self.nodes[node as usize];
                n.down_ns += n.outage.map_or(0, |o| t - o.crashed_at);
                self.settle(node);
                let n = &mut self.nodes[node as usize];
                n.alive = true;
                // A new process: a new generation, and with `--state-dir`
                // the interval a monitor last asked for
                // (`send::resume`); under a fixed interval, that one.
                let generation = n.sender.config().generation + 1;
                // (Its configuration never changes here: the stored
                // interval is never outdated.)
                let under = resume::Under::new(&[], self.initial_ms);
                let stored = n.saved_ms.map(|ms| resume::Stored {
                    ms,
                    under: Some(under.clone()),
                    asked_by: None,
                    unknown: false,
                });
                let resumed = match resume::start_interval(
                    &under,
                    stored.as_ref(),
                    self.cfg.sender_min_ms,
                    self.cfg.sender_max_ms,
                ) {
                    resume::Start::Resumed(ms) => Some(ms),
                    resume::Start::Configured | resume::Start::Outdated => None,
                };
                n.sender = new_sender(self.cfg, n.id, n.key, generation, self.initial_ms, resumed);
                // Its first heartbeat goes out at once.
                n.due = t;
                n.timer += 1;
                let timer = n.timer;
                self.push(t, Event::Send { node, timer });
            }
        }
    }

    /// A wakeup of the sender's timer at `t` (when it meant to wake at
    /// `due`, plus the timer's slack): one heartbeat, and the next
    /// scheduled as `hb send`'s loop schedules it.
    fn send(&mut self, t: u64, node: u32, timer: u32) {
        let n = &mut self.nodes[node as usize];
        if !n.alive || n.timer != timer {
            return;
        }
        if let Some((_, resume)) = n.pauses.at(t) {
            // A stalled sender runs nothing; its overdue timer fires when
            // the stall ends.
            self.push(resume, Event::Send { node, timer });
            return;
        }
        n.sender.woke_late(t.saturating_sub(n.due), t);
        let load = n.load(t);
        let payload = n.sender.heartbeat(t, load, false)[0].1;
        // `hb send`'s own rule: the rhythm kept, or restarted after a stall.
        n.due = crate::send::next_due(n.due, n.sender.interval_ms() as u64 * MS, t);
        let wake = n.due + slack(&mut n.rng);
        let transit = n.transit(true, t);
        self.sent += 1;
        self.by_kind[n.kind].sent += 1;
        match transit {
            Some(delay) => {
                n.in_flight_until = n.in_flight_until.max(t + delay);
                let payload = self.payloads.put(payload);
                self.push(t + delay, Event::Arrive { node, payload })
            }
            None => self.lost += 1,
        }
        self.push(wake, Event::Send { node, timer });
    }

    /// An ACK read by the sender at `t`: `hb send`'s own judgement of it
    /// ([`Sender::on_ack`]: genuine, recent, not replayed, not older than
    /// the request it adopted last), and its loop's answer to a changed
    /// interval (`send/mod.rs`, `interval_changed`): the next heartbeat at
    /// most one new interval from now, and the interval stored for a
    /// restart.
    fn ack(&mut self, t: u64, node: u32, payload: &[u8; proto::LEN]) {
        let n = &mut self.nodes[node as usize];
        if !n.alive {
            return;
        }
        n.sender.woke_late(t.saturating_sub(n.due), t);
        let Ok(a) = n.sender.on_ack(payload, MONITOR, t) else {
            return;
        };
        let Some((_, new)) = a.interval_change else {
            return;
        };
        n.saved_ms = Some(new);
        let due = t + new as u64 * MS;
        if due < n.due {
            n.due = due;
            n.timer += 1;
            let (wake, timer) = (due + slack(&mut n.rng), n.timer);
            self.push(wake, Event::Send { node, timer });
        }
    }

    /// The monitor's tick: its detector and state machine for every node
    /// ([`Node::judge`]), the suspicion bookkeeping, and the decisions of
    /// the nodes whose turn it is.
    fn tick(&mut self, t: u64) {
        let det = self.det;
        let (decisions, since) = (self.decisions, t - T0);
        let mut decide: Vec<(u32, NodeState, u32)> = Vec::new();
        let qlearn = matches!(self.policy, Policy::QLearn(_));
        let nodes = &mut self.nodes;
        let by_kind = &mut self.by_kind;
        let mut fs = 0u64;
        self.dp
            .read_states(0..self.cfg.nodes, &mut |slot, st: &NodeState| {
                let n = &mut nodes[slot as usize];
                if n.judge(&det, st, t) {
                    fs += 1;
                    by_kind[n.kind].false_suspicions += 1;
                }
                if qlearn && decisions.due(slot, since) {
                    decide.push((n.id, *st, std::mem::take(&mut n.refuted)));
                }
            });
        self.false_suspicions += fs;
        self.decided += decide.len() as u64;
        if let Policy::QLearn(c) = self.policy {
            for (id, st, refuted) in decide {
                let d = c.observe(id, &st, refuted);
                if d.interval_ms != st.requested_interval_ms {
                    self.dp.set_requested_interval(id - 1, d.interval_ms);
                }
            }
        }
    }

    fn sample(&self, t: u64) -> TrajectoryPoint {
        let mut v: Vec<u32> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.sender.interval_ms())
            .collect();
        v.sort_unstable();
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
        };
        TrajectoryPoint {
            t_s: (t - T0) as f64 / S as f64,
            mean_ms: mean,
            min_ms: v.first().copied().unwrap_or(0),
            p50_ms: v.get(v.len() / 2).copied().unwrap_or(0),
            max_ms: v.last().copied().unwrap_or(0),
            node1_ms: self.nodes[0].sender.interval_ms(),
        }
    }
}

/// What the tests drive a run with, event by event.
#[cfg(test)]
impl Sim<'_, '_> {
    /// Runs up to the next event's time and returns it (`None` past the
    /// end of the run).
    pub(super) fn step(&mut self) -> Option<u64> {
        let Reverse((t, _, _)) = *self.heap.peek()?;
        if t > self.end {
            return None;
        }
        self.run_until(t);
        Some(t)
    }

    /// Heartbeats sent so far.
    pub(super) fn sent(&self) -> u64 {
        self.sent
    }

    /// Nodes the controller was asked to decide for so far.
    pub(super) fn decided(&self) -> u64 {
        self.decided
    }

    pub(super) fn gate_config(&self) -> GateConfig {
        self.dp.config()
    }

    /// The monitor asks node slot `node` for `ms`.
    pub(super) fn request(&mut self, node: u32, ms: u32) {
        self.dp.set_requested_interval(node, ms);
    }

    /// The interval node slot `node`'s sender has taken from the
    /// monitor's ACKs.
    pub(super) fn adopted_ms(&self, node: u32) -> u32 {
        self.nodes[node as usize].sender.interval_ms()
    }

    /// Crashes node slot `node` at `at`; it restarts after the scenario's
    /// downtime.
    pub(super) fn crash(&mut self, node: u32, at: u64) {
        let down = (self.cfg.scenario.downtime_s * S as f64) as u64;
        self.push(at, Event::Crash { node });
        self.push(at + down, Event::Restart { node });
    }

    /// The stalls of node slot `node` (`[start, end)`, ns).
    pub(super) fn stalls(&self, node: u32) -> Vec<(u64, u64)> {
        self.nodes[node as usize].pauses.0.clone()
    }

    /// How many ACKs are on their way to node slot `node`.
    pub(super) fn acks_in_flight(&self, node: u32) -> usize {
        let to = |e: &Event| matches!(e, Event::Ack { node: n, .. } if *n == node);
        self.heap.iter().filter(|Reverse((_, _, e))| to(e)).count()
    }

    /// Makes the ACKs on their way to node slot `node` arrive at `at`.
    pub(super) fn hold_acks_until(&mut self, node: u32, at: u64) {
        let mut v = std::mem::take(&mut self.heap).into_vec();
        for Reverse((t, _, e)) in &mut v {
            if matches!(e, Event::Ack { node: n, .. } if *n == node) {
                *t = at;
            }
        }
        self.heap = v.into();
    }

    /// Holds up node slot `node`'s heartbeats in flight by `by` ns.
    pub(super) fn delay_in_flight(&mut self, node: u32, by: u64) {
        let mut v = std::mem::take(&mut self.heap).into_vec();
        for Reverse((t, _, e)) in &mut v {
            if matches!(e, Event::Arrive { node: n, .. } if *n == node) {
                *t += by;
            }
        }
        self.heap = v.into();
        self.nodes[node as usize].in_flight_until += by;
    }
}

/// The start of every run, ns (simulated time).
#[cfg(test)]
pub(super) const START: u64 = T0;

/// Node slot `node`'s upward path as a run on `cfg` draws it, sampled at
/// `times` (ns after the start, increasing): at each, whether the path is
/// in its Bad state and whether the packet is lost.
#[cfg(test)]
pub(super) fn sample_path(
    cfg: &SimConfig,
    node: u32,
    times: impl IntoIterator<Item = u64>,
) -> Vec<(bool, bool)> {
    let mut c = cfg.clone();
    c.nodes = node + 1;
    let mut policy = Policy::Fixed(1000);
    let mut sim = Sim::new(&c, &mut policy).unwrap();
    let n = &mut sim.nodes[node as usize];
    times
        .into_iter()
        .map(|t| {
            let lost = n.transit(true, T0 + t).is_none();
            (n.up.loss.bad, lost)
        })
        .collect()
}

#[cfg(test)]
mod episode_tests {
    use super::*;

    /// Episodes come `per_hour` times an hour, as the scenarios document
    /// ("congested ~6 times an hour for ~90 s", "spikes four times an
    /// hour"), whatever their length.
    #[test]
    fn episodes_come_at_their_documented_rate() {
        let hours = 20_000.0;
        let end = T0 + (hours * 3600.0) as u64 * S;
        let uniform = |r: &mut ChaCha8Rng| 0.5 + 3.5 * r.random::<f64>();
        for (per_hour, mean_s, uniform_len) in
            [(6.0, 90.0, false), (4.0, 120.0, false), (6.0, 2.25, true)]
        {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let sp = if uniform_len {
                Spans::poisson(&mut rng, per_hour, mean_s, uniform, T0, end)
            } else {
                Spans::poisson(&mut rng, per_hour, mean_s, |r| exp(r, mean_s), T0, end)
            };
            let rate = sp.0.len() as f64 / hours;
            assert!(
                (rate - per_hour).abs() < 0.02 * per_hour,
                "{per_hour}/h of {mean_s} s: drawn {rate:.3}/h"
            );
            let covered: u64 = sp.0.iter().map(|(a, b)| b - a).sum();
            let share = covered as f64 / (end - T0) as f64;
            let want = per_hour * mean_s / 3600.0;
            assert!((share - want).abs() < 0.05 * want, "{share} against {want}");
            assert!(sp.0.windows(2).all(|w| w[0].1 <= w[1].0), "disjoint");
        }
    }

    /// Every shipped scenario's episodes are shorter than their mean
    /// period, so the gaps between them keep the documented rate.
    #[test]
    fn shipped_scenarios_fit_their_episode_rates() {
        for sc in super::super::scenario::Scenario::all() {
            for p in &sc.profiles {
                for (per_hour, mean_s) in [
                    (p.congestion.per_hour, p.congestion.mean_duration_s),
                    (p.spikes_per_hour, p.spike_mean_s),
                    (p.pauses_per_hour, (p.pause_s.0 + p.pause_s.1) / 2.0),
                ] {
                    assert!(
                        per_hour <= 0.0 || 3600.0 / per_hour > 2.0 * mean_s,
                        "{}: {per_hour}/h of {mean_s} s",
                        sc.name
                    );
                }
            }
        }
    }
}

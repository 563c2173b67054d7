//! The discrete-event simulation: senders, a network, the gate, the
//! monitor's tick with the detector, and the controller.
//!
//! Time is simulated (nanoseconds, a `BinaryHeap` of events), so an hour
//! of a fleet runs in a fraction of a second and a run is a pure function
//! of its configuration and seed. What runs is the production code:
//! heartbeats are real sealed datagrams gated by
//! [`MemDataplane::gate`](crate::dataplane::mem::MemDataplane) (SipHash,
//! anti-replay, `NodeState::admit/record`, the ACK policy), suspicion is
//! the monitor's tick at every monitor tick (its [`Detector`], with phi's
//! thresholds, the stall allowance and the max-silence backstop, and its
//! state machine, [`state::step`]), decisions are
//! [`QController::observe`] once per decision period per node, and the
//! requested interval reaches the sender in a real ACK that it verifies.
//!
//! The monitor side is the tick without its events, table and API
//! (`monitor_step`): a node is suspected while the monitor's state
//! machine holds it `suspect` or `dead`. A suspicion that starts while the
//! node is up is a false one (the `suspect` or `dead` event the monitor
//! would announce about a live node); one that the node's own heartbeats
//! end within its generation is refuted, and is reported to the controller
//! as the tick reports it; the first tick at or after a crash with the
//! node suspected is its detection.
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

use hb_common::{
    Datagram, GateResult, Kind, NodeKey,
    maps::{Config as GateConfig, NodeKeys, NodeState},
    proto,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::scenario::{Profile, Scenario};
use crate::{
    controller::QController,
    dataplane::{Dataplane, mem::MemDataplane},
    detector::PhiParams,
    monitor::{
        state::{self, Thresholds, Track, Transition},
        tick::Detector,
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
    /// The gate ACKs every N-th heartbeat too (RTT samples for senders).
    pub ack_every: u32,
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
            ack_every: 10,
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

/// The controller's state at the end of a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ControllerSummary {
    pub decisions: u64,
    pub epsilon: f64,
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
    /// Crashes not suspected before the node restarted. A crash whose node
    /// would restart after the end of the run is followed past the end
    /// until it is detected or its node would have restarted (at most
    /// an hour past the end).
    pub missed: u64,
    /// Crash to first suspicion, ms (detections past the end of the run
    /// included).
    pub detection_ms: Summary,
    /// Every detection time, ms, in the order of detection (for pooling
    /// runs and for percentiles of mixtures; not in the JSON report).
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
    /// Time-averaged mean interval of the fleet, ms.
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
    /// The sender's heartbeat timer; stale after a crash (`epoch`).
    Send {
        node: u32,
        epoch: u32,
    },
    /// A heartbeat reaches the monitor (its datagram is in
    /// [`Payloads`] under `payload`).
    Arrive {
        node: u32,
        payload: u32,
    },
    /// An ACK reaches the sender.
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

/// Sorted, disjoint `[start, end)` spans of simulated time.
#[derive(Clone, Debug, Default)]
struct Spans(Vec<(u64, u64)>);

impl Spans {
    /// Poisson episodes at `per_hour`, exponential lengths of mean
    /// `mean_s` (or uniform in `uniform_s` when given), within
    /// `[start, end)`.
    fn poisson(
        rng: &mut ChaCha8Rng,
        per_hour: f64,
        length: impl Fn(&mut ChaCha8Rng) -> f64,
        start: u64,
        end: u64,
    ) -> Spans {
        let mut v = Vec::new();
        if per_hour <= 0.0 {
            return Spans(v);
        }
        let mut t = start as f64;
        loop {
            t += exp(rng, 3600.0 / per_hour) * S as f64;
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

/// One direction of a node's path.
struct Path {
    base_ms: f64,
    bad: bool,
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
    // Sender.
    alive: bool,
    epoch: u32,
    generation: u32,
    seq: u64,
    interval_ms: u32,
    pending_ms: Option<u32>,
    srtt_us: Option<f64>,
    // Ground truth and the monitor's view.
    crashed_at: Option<u64>,
    /// Time spent crashed within the run, ns (up to the last restart).
    down_ns: u64,
    detected: bool,
    /// The monitor's state machine's memory of the node.
    track: Track,
    /// Refuted suspicions since the node's last decision.
    refuted: u32,
}

/// What one tick of the monitor made of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Judged {
    /// A suspicion of a node that is up started.
    false_suspicion: bool,
    /// The crash's detection, ms after it.
    detection_ms: Option<f64>,
}

impl Node {
    /// Delay of one packet on `dir`'s path at `t`, or `None` if lost.
    fn transit(&mut self, up: bool, t: u64) -> Option<u64> {
        let p = &self.profile;
        let congested = self.congestion.at(t).is_some();
        let path = if up { &mut self.up } else { &mut self.down };
        let ge = p.loss;
        path.bad = if path.bad {
            self.rng.random::<f64>() >= ge.p_bad_good
        } else {
            self.rng.random::<f64>() < ge.p_good_bad
        };
        let mut loss = if path.bad { ge.loss_bad } else { ge.loss_good };
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
    /// `st` at `t` ([`monitor_step`]), held against the ground truth.
    fn judge(&mut self, det: &Detector, st: &NodeState, t: u64) -> Judged {
        let was = self.track.status.suspected();
        let (tr, now) = monitor_step(det, &mut self.track, st, t);
        if tr.as_ref().is_some_and(Transition::refutes_suspicion) {
            self.refuted += 1;
        }
        let mut j = Judged {
            false_suspicion: now && !was && self.alive,
            detection_ms: None,
        };
        if now
            && !self.detected
            && let Some(c) = self.crashed_at
        {
            self.detected = true;
            j.detection_ms = Some((t - c) as f64 / MS as f64);
        }
        j
    }

    /// Time spent crashed within the run, ns, counting a crash still
    /// running at `end` up to `end`.
    fn down_until(&self, end: u64) -> u64 {
        self.down_ns + self.crashed_at.map_or(0, |c| end.saturating_sub(c))
    }
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

struct Sim<'a, 'p> {
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
    /// Per profile: heartbeats sent, detections, false suspicions.
    by_kind: Vec<(u64, Vec<f64>, u64)>,
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig, policy: &mut Policy<'_>) -> anyhow::Result<SimReport> {
    anyhow::ensure!(cfg.nodes > 0, "the fleet needs at least one node");
    anyhow::ensure!(
        cfg.duration_s > 0.0 && cfg.duration_s <= 30.0 * 86400.0,
        "duration must be positive and at most 30 days"
    );
    anyhow::ensure!(
        !cfg.scenario.profiles.is_empty(),
        "scenario has no node profile"
    );
    anyhow::ensure!(
        cfg.tick_ms > 0 && cfg.decision_period_ms >= cfg.tick_ms,
        "the decision period must be at least one tick"
    );
    cfg.thresholds
        .validate()
        .map_err(|e| anyhow::anyhow!("the monitor's thresholds: {e}"))?;
    let end = T0 + (cfg.duration_s * S as f64) as u64;
    let dp = MemDataplane::new();
    dp.set_config(&GateConfig {
        ack_on_change: 1,
        ack_every: cfg.ack_every,
        ..GateConfig::default()
    })?;
    let initial = match policy {
        Policy::Fixed(ms) => *ms,
        Policy::QLearn(_) => cfg.initial_interval_ms,
    }
    .clamp(cfg.sender_min_ms, cfg.sender_max_ms);

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
        by_kind: vec![(0, Vec::new(), 0); cfg.scenario.profiles.len()],
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
            |r| exp(r, c.mean_duration_s),
            T0,
            end,
        );
        let sm = p.spike_mean_s;
        let spikes = Spans::poisson(&mut srng, p.spikes_per_hour, |r| exp(r, sm), T0, end);
        let (plo, phi) = p.pause_s;
        let pauses = Spans::poisson(
            &mut srng,
            p.pauses_per_hour,
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
            t += (exp(&mut srng, 3600.0 / cfg.scenario.crashes_per_node_hour) * S as f64) as u64;
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
        sim.nodes.push(Node {
            id,
            kind,
            key,
            rng: ChaCha8Rng::seed_from_u64(sub_seed(cfg.seed, 4, id)),
            up: Path {
                base_ms: base,
                bad: false,
            },
            down: Path {
                base_ms: base,
                bad: false,
            },
            congestion,
            spikes,
            pauses,
            base_load,
            profile,
            alive: true,
            epoch: 0,
            generation: 1_700_000_000,
            seq: 0,
            interval_ms: initial,
            pending_ms: None,
            srtt_us: None,
            crashed_at: None,
            down_ns: 0,
            detected: false,
            track: Track::default(),
            refuted: 0,
        });
        sim.push(start, Event::Send { node: i, epoch: 0 });
    }
    if let Policy::QLearn(c) = sim.policy {
        c.reset_nodes();
    }
    sim.run()
}

impl Sim<'_, '_> {
    fn push(&mut self, t: u64, e: Event) {
        self.order += 1;
        self.heap.push(Reverse((t, self.order, e)));
    }

    fn run(mut self) -> anyhow::Result<SimReport> {
        let tick = self.cfg.tick_ms * MS;
        let period_ticks = (self.cfg.decision_period_ms / self.cfg.tick_ms).max(1);
        let sample_every = ((self.cfg.sample_every_s * S as f64) as u64).max(tick);
        let mut next_sample = T0;
        let mut interval_area = 0.0;
        let mut samples = 0u64;
        let mut t = T0;
        let mut tick_no = 0u64;
        // Once a second: how long the senders that are up spend at each
        // interval.
        let second_ticks = (1000 / self.cfg.tick_ms).max(1);
        let mut at_interval: std::collections::BTreeMap<u32, u64> = Default::default();
        while t <= self.end {
            while let Some((et, e)) = self.pop_until(t) {
                self.handle(et, e);
            }
            self.tick(t, tick_no % period_ticks, period_ticks);
            if tick_no.is_multiple_of(second_ticks) {
                for n in self.nodes.iter().filter(|n| n.alive) {
                    *at_interval.entry(n.interval_ms).or_default() += 1;
                }
            }
            if t >= next_sample {
                let p = self.sample(t);
                interval_area += p.mean_ms;
                samples += 1;
                self.trajectory.push(p);
                next_sample += sample_every;
            }
            t += tick;
            tick_no += 1;
        }
        // What happens between the last tick and the end is the run's too
        // (its first tick is the next one, past the end).
        while let Some((et, e)) = self.pop_until(self.end) {
            self.handle(et, e);
        }
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
                decisions: c.decisions(),
                epsilon: c.epsilon(),
                reward_mean: c.snapshot().rewards.mean,
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
            .map(|(k, (p, (sent, det, fs)))| {
                let n = self.nodes.iter().filter(|n| n.kind == k).count() as u32;
                let node_s = (n.max(1) as f64) * duration_s;
                let alive_node_hours = node_hours(alive_ns[k]);
                ProfileReport {
                    profile: p.name.to_string(),
                    nodes: n,
                    heartbeats_per_node_s: sent as f64 / node_s,
                    detection_ms: Summary::of(det.clone()),
                    detections_ms: det,
                    false_suspicions: fs,
                    false_suspicions_per_node_hour: per_hour(fs, alive_node_hours),
                    alive_node_hours,
                }
            })
            .collect();
        let node_seconds: u64 = at_interval.values().sum();
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
            mean_interval_ms: if samples == 0 {
                0.0
            } else {
                interval_area / samples as f64
            },
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

    /// After the end (`t` is the first tick past it): the crashes still
    /// undetected are followed until each is detected or its node would
    /// have restarted, the window a longer run would have given it, and
    /// at most [`FOLLOW_CAP`] past the end; one not detected by then is
    /// missed. Censoring them instead would drop the slowest detections
    /// (a crash near the end is detected only if it is detected fast) and
    /// bias the percentiles low. Only the crashed nodes are simulated: the
    /// heartbeats they sent before crashing still arrive and the tick
    /// still judges them; nothing else happens or is counted (no sends,
    /// no controller, no false suspicions).
    fn follow_past_end(&mut self, mut t: u64, tick: u64) {
        let down = (self.cfg.scenario.downtime_s * S as f64) as u64;
        let cap = self.end.saturating_add(FOLLOW_CAP);
        let det = self.det;
        let mut pending: Vec<u32> = (0..self.cfg.nodes)
            .filter(|&i| self.nodes[i as usize].crashed_at.is_some())
            .filter(|&i| !self.nodes[i as usize].detected)
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
                let c = n.crashed_at.unwrap_or(t);
                if c.saturating_add(down) <= t || t > cap {
                    // The node would have restarted undetected.
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
                let Some(st) = st else {
                    self.missed += 1;
                    continue;
                };
                match n.judge(&det, &st, t).detection_ms {
                    Some(ms) => {
                        self.detections.push(ms);
                        self.by_kind[n.kind].1.push(ms);
                    }
                    None => pending.push(node),
                }
            }
            t += tick;
        }
    }

    fn handle(&mut self, t: u64, e: Event) {
        match e {
            Event::Send { node, epoch } => self.send(t, node, epoch),
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
                let payload = self.payloads.take(payload);
                self.ack(t, node, &payload)
            }
            Event::Crash { node } => {
                let n = &mut self.nodes[node as usize];
                n.alive = false;
                n.epoch += 1;
                n.crashed_at = Some(t);
                n.detected = false;
                self.crashes += 1;
            }
            Event::Restart { node } => {
                let n = &mut self.nodes[node as usize];
                if !n.detected {
                    self.missed += 1;
                }
                n.alive = true;
                n.down_ns += n.crashed_at.map_or(0, |c| t - c);
                n.crashed_at = None;
                n.generation += 1;
                n.seq = 0;
                // `hb send --state-dir` resumes at the interval a monitor
                // last asked for (`send::resume`); under a fixed interval
                // that is the fixed interval.
                n.interval_ms = n.pending_ms.take().unwrap_or(n.interval_ms);
                n.srtt_us = None;
                let epoch = n.epoch;
                self.push(t, Event::Send { node, epoch });
            }
        }
    }

    fn send(&mut self, t: u64, node: u32, epoch: u32) {
        let n = &mut self.nodes[node as usize];
        if !n.alive || n.epoch != epoch {
            return;
        }
        if let Some((_, resume)) = n.pauses.at(t) {
            // A stalled sender sends nothing and catches up at once.
            self.push(resume, Event::Send { node, epoch });
            return;
        }
        // An adopted interval applies from this heartbeat on, which
        // announces it, so the gate re-seeds before the new gap starts.
        if let Some(ms) = n.pending_ms.take() {
            n.interval_ms = ms;
        }
        n.seq += 1;
        let d = Datagram {
            kind: Kind::Heartbeat,
            node_id: n.id,
            generation: n.generation,
            key_epoch: 0,
            flags: 0,
            load: n.load(t),
            seq: n.seq,
            sent_ns: t,
            interval_ms: n.interval_ms,
            rtt_us: n.srtt_us.map_or(0, |r| r.max(1.0) as u32),
        };
        let payload = d.seal(&n.key);
        // Timer slack: a sender wakes up to 0.5 ms late.
        let next = t + n.interval_ms as u64 * MS + n.rng.random_range(0..MS / 2);
        let transit = n.transit(true, t);
        self.sent += 1;
        self.by_kind[n.kind].0 += 1;
        match transit {
            Some(delay) => {
                let payload = self.payloads.put(payload);
                self.push(t + delay, Event::Arrive { node, payload })
            }
            None => self.lost += 1,
        }
        self.push(next, Event::Send { node, epoch });
    }

    /// The sender's side of an ACK (as `hb send` does it): verify, match a
    /// recent heartbeat, update the RTT, adopt the interval within bounds.
    fn ack(&mut self, t: u64, node: u32, payload: &[u8; proto::LEN]) {
        let (min, max) = (self.cfg.sender_min_ms, self.cfg.sender_max_ms);
        let n = &mut self.nodes[node as usize];
        if !n.alive || !proto::verify(&n.key, payload) {
            return;
        }
        let Ok(a) = proto::parse(payload, Kind::Ack) else {
            return;
        };
        if a.generation != n.generation || a.seq > n.seq || a.seq + 64 <= n.seq {
            return;
        }
        let sample = t.saturating_sub(a.sent_ns) as f64 / 1e3;
        n.srtt_us = Some(match n.srtt_us {
            None => sample,
            Some(s) => s + (sample - s) / 8.0,
        });
        let want = a.interval_ms.clamp(min, max);
        if want != n.interval_ms {
            n.pending_ms = Some(want);
        }
    }

    /// The monitor's tick: its detector and state machine for every node
    /// ([`Node::judge`]), the suspicion bookkeeping, and the decisions of
    /// the nodes whose turn it is.
    fn tick(&mut self, t: u64, phase: u64, period_ticks: u64) {
        let det = self.det;
        let mut decide: Vec<(u32, NodeState, u32)> = Vec::new();
        let qlearn = matches!(self.policy, Policy::QLearn(_));
        let nodes = &mut self.nodes;
        let by_kind = &mut self.by_kind;
        let (mut fs, mut detections) = (0u64, Vec::new());
        self.dp
            .read_states(0..self.cfg.nodes, &mut |slot, st: &NodeState| {
                let n = &mut nodes[slot as usize];
                let j = n.judge(&det, st, t);
                if j.false_suspicion {
                    fs += 1;
                    by_kind[n.kind].2 += 1;
                }
                if let Some(ms) = j.detection_ms {
                    detections.push(ms);
                    by_kind[n.kind].1.push(ms);
                }
                if qlearn && slot as u64 % period_ticks == phase {
                    decide.push((n.id, *st, std::mem::take(&mut n.refuted)));
                }
            });
        self.false_suspicions += fs;
        self.detections.extend(detections);
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
            .map(|n| n.interval_ms)
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
            node1_ms: self.nodes[0].interval_ms,
        }
    }
}

//! What the controller sees of a node: an [`Observation`] built from two
//! snapshots of the gate's per-node state, and the bucketing of it into a
//! row of the Q table ([`StateKey`]): RTT, loss rate, jitter, reported
//! load, the interval level, and the *headroom*: the node's modelled
//! detection time over the target, which is where the inflation a loss
//! burst or a stall leaves in the detector's statistics shows.
//!
//! Every input is clamped into a bucket, so any observation (NaN, infinite,
//! a forged load of 65535 permille, a zero interval) maps to a valid row:
//! there is no out-of-range index anywhere in the table. NaN ratios fall
//! into the *worst* bucket, so a broken measurement never looks like a calm
//! network that invites slowing down.

use hb_common::maps::NodeState;
use serde::{Deserialize, Serialize};

use crate::detector::{self, PhiParams};

/// Upper edges of the RTT buckets, ms. Bucket 0 is "unknown" (the sender
/// has no ACK-based estimate yet); bucket `i + 1` is `< RTT_EDGES_MS[i]`;
/// the last bucket is everything above.
pub const RTT_EDGES_MS: [f64; 1] = [20.0];
/// Upper edges of the loss-rate buckets (fraction of heartbeats lost,
/// over the node's recent periods). There is no "exactly no loss" bucket:
/// a node that has never lost a heartbeat and one whose last loss is long
/// forgotten are in the same state (a separate bucket was visited mostly
/// while the table was young, and held fresh nodes back).
pub const LOSS_EDGES: [f64; 3] = [0.002, 0.01, 0.03];
/// Upper edges of the jitter buckets: the inter-arrival mean absolute
/// deviation over the mean (a coefficient of variation).
pub const JITTER_EDGES: [f64; 2] = [0.15, 0.30];
/// Upper edges of the load buckets, permille.
pub const LOAD_EDGES: [u16; 2] = [500, 800];
/// Upper edges of the headroom buckets: the modelled worst-case detection
/// time over the target. Below 0.55 even a slower level's re-seeded
/// statistics (see [`crate::controller`]) stay within the target; 0.55 to
/// 0.7 a slower level fits once settled; up to 1 it is within the target
/// and one step slower is not; above 1 some crashes are detected late,
/// above 1.15 most of a slow level's are.
pub const HEADROOM_EDGES: [f64; 5] = [0.55, 0.7, 0.85, 1.0, 1.15];

/// Number of RTT buckets (unknown + edges + overflow).
pub const RTT_BUCKETS: usize = RTT_EDGES_MS.len() + 2;
/// Number of loss buckets.
pub const LOSS_BUCKETS: usize = LOSS_EDGES.len() + 1;
/// Number of jitter buckets.
pub const JITTER_BUCKETS: usize = JITTER_EDGES.len() + 1;
/// Number of load buckets.
pub const LOAD_BUCKETS: usize = LOAD_EDGES.len() + 1;
/// Number of headroom buckets.
pub const HEADROOM_BUCKETS: usize = HEADROOM_EDGES.len() + 1;

/// The interval levels the controller moves between: `min`, the powers
/// of `step` (in ms) between the bounds, and `max`; each power is moved
/// onto a round interval (1, 1.5, 2, 3, 5 or 7 times a power of ten ms)
/// when one is within a quarter step of it. With the default six steps
/// per decade that is exactly 100, 150, 200, 300, 500, 700, 1000, ...
/// 10000 ms: the intervals operators configure by hand (1 s, 5 s) are
/// levels, so the controller can sit exactly where a fixed interval
/// would (until stop 7 the levels were 100 * 1.468^k: 5 s was not one,
/// and a controller matched against a fixed 5 s had to mix 4642 and 6813
/// ms). One action moves one level, so the interval bucket of a state
/// *is* its level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub levels_ms: Vec<u32>,
}

/// The round intervals levels are moved onto, per decade.
const ROUND: [f64; 6] = [1.0, 1.5, 2.0, 3.0, 5.0, 7.0];

/// The round interval nearest to `x` ms on a log scale.
fn nearest_round(x: f64) -> f64 {
    let decade = 10f64.powf(x.log10().floor());
    let mut best = x;
    let mut best_d = f64::INFINITY;
    for m in ROUND.iter().chain(std::iter::once(&10.0)) {
        let v = m * decade;
        let d = (x.ln() - v.ln()).abs();
        if d < best_d {
            best = v;
            best_d = d;
        }
    }
    best
}

impl Grid {
    /// Levels from `min_ms` up to `max_ms` in multiplicative steps of
    /// `step` (> 1), rounded as the type documentation says. `min_ms <=
    /// max_ms` and both > 0 are the caller's contract (checked by
    /// `Config::validate`).
    pub fn new(min_ms: u32, max_ms: u32, step: f64) -> Grid {
        let mut levels_ms = vec![min_ms];
        let snap = step.ln() / 4.0;
        // The powers of `step` (in ms) between the bounds: anchored at
        // 1 ms, not at `min_ms`, so other bounds give the same levels
        // inside them. At most 64 levels whatever the inputs: a step
        // barely above 1 must not make the table explode.
        let mut k = ((min_ms.max(1) as f64).ln() / step.ln()).floor() as i32;
        let mut tries = 0;
        while levels_ms.len() < 63 && tries < 4096 {
            tries += 1;
            let x = step.powi(k);
            // (A step barely above 1 starts `k` at `i32::MAX`.)
            k = k.saturating_add(1);
            if !x.is_finite() || x >= max_ms as f64 {
                break;
            }
            let round = nearest_round(x);
            let want = if (round.ln() - x.ln()).abs() <= snap {
                round
            } else {
                x
            };
            let v = want.round() as u32;
            if v > *levels_ms.last().unwrap_or(&0) && v < max_ms {
                levels_ms.push(v);
            }
        }
        if max_ms > min_ms {
            levels_ms.push(max_ms);
        }
        Grid { levels_ms }
    }

    pub fn len(&self) -> usize {
        self.levels_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels_ms.is_empty()
    }

    /// Interval of level `k` (clamped to the last level).
    pub fn ms(&self, k: usize) -> u32 {
        self.levels_ms[k.min(self.levels_ms.len() - 1)]
    }

    /// The level nearest to `ms` on a log scale (clamped to the grid).
    pub fn level_of(&self, ms: u32) -> usize {
        let x = (ms.max(1) as f64).ln();
        let mut best = 0;
        let mut best_d = f64::INFINITY;
        for (k, &l) in self.levels_ms.iter().enumerate() {
            let d = (x - (l as f64).ln()).abs();
            if d < best_d {
                best = k;
                best_d = d;
            }
        }
        best
    }

    /// The highest level whose interval is at most `cap_ms` (level 0 if
    /// even the minimum is above the cap: the bounds win over the cap).
    pub fn level_at_most(&self, cap_ms: u32) -> usize {
        self.levels_ms
            .iter()
            .rposition(|&l| l <= cap_ms)
            .unwrap_or(0)
    }
}

/// What the controller knows of one node at a decision: measured over the
/// period since its previous decision.
///
/// Built only from the gate's per-node state ([`NodeState`]), which only
/// gate-accepted datagrams (tag verified, fresh in the anti-replay window)
/// ever update: unauthenticated traffic cannot reach the controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Observation {
    /// Generation of the node's current incarnation.
    pub generation: u32,
    /// Interval the node reports using, ms.
    pub interval_ms: u32,
    /// Interval the monitor already asks of the node, ms (0: none yet).
    /// A request that outlived the controller's memory of the node (a
    /// monitor restart over pinned maps) is where the controller goes on
    /// from; without one it starts the node at [`super::QController::start_ms`].
    pub requested_interval_ms: u32,
    /// Smoothed RTT the node reports, ms; `None` when unknown.
    pub rtt_ms: Option<f64>,
    /// Fraction of heartbeats lost over the period, 0..=1.
    pub loss_rate: f64,
    /// Inter-arrival mean absolute deviation over the mean.
    pub jitter: f64,
    /// The detector's expected inter-arrival time, ms (with pause).
    pub mean_ms: f64,
    /// The node's measured mean inter-arrival time, ms (the gate's
    /// average of consecutive arrivals; 0: none yet): what it really
    /// sends at, whatever it reports.
    pub arrival_mean_ms: f64,
    /// The detector's floored standard deviation, ms.
    pub sigma_ms: f64,
    /// The node's stall allowance: the silence before which the monitor
    /// does not suspect it at all, ms (`detector::Model::stall_floor_ns`;
    /// 0 for a node that has not paused twice). A node that pauses cannot
    /// be detected sooner than this, however fast it beats.
    pub stall_floor_ms: f64,
    /// Load the node reports, permille, clamped to 0..=1000.
    pub load_permille: u16,
    /// Heartbeats accepted over the period.
    pub new_samples: u64,
    /// Heartbeats lost over the period (sequence gaps).
    pub new_lost: u64,
    /// Inter-arrival samples the detector has taken since it last
    /// re-seeded (an interval change or a restart).
    pub settled_samples: u32,
    /// Suspicions of this node that its own later heartbeats refuted
    /// (suspect -> alive without a restart) over the period: the false
    /// suspicions the monitor can see.
    pub refuted_suspicions: u32,
}

impl Observation {
    /// The observation of the period from `prev` (the node's state at its
    /// previous decision, `None` for the first) to `now`.
    ///
    /// The gate's counters run over every generation, so a period that
    /// spans a restart is still what changed since `prev`. Without `prev`
    /// (the node's first decision, or the first after a monitor restart)
    /// the counters' start is unknown: the period counts one heartbeat
    /// (if any was accepted) and no loss. The lifetime totals stood in for
    /// it before: a node that lost 1.5% long ago sat in a lossy state for
    /// minutes, and the decision counted as the most periods there are.
    pub fn from_states(
        prev: Option<&NodeState>,
        now: &NodeState,
        refuted_suspicions: u32,
        phi: &PhiParams,
    ) -> Observation {
        let prev = prev.filter(|p| p.accepted <= now.accepted);
        let (accepted, lost) = match prev {
            Some(p) => (now.accepted - p.accepted, now.lost.saturating_sub(p.lost)),
            None => (now.accepted.min(1), 0),
        };
        // In f64: a node's own seq jump can make `lost` nearly 2^64 (the
        // gate counts every skipped number), and the sum overflowed.
        let loss_rate = if accepted == 0 && lost == 0 {
            0.0
        } else {
            lost as f64 / (accepted as f64 + lost as f64)
        };
        let model = detector::Model::new(phi);
        let (mean_ns, sigma_ns) = model.moments_ns(now);
        let (mean_ms, sigma_ms) = (mean_ns / 1e6, sigma_ns / 1e6);
        let stall_floor_ms = model.stall_floor_ns(now, mean_ns) / 1e6;
        let jitter = if now.ia_mean_ns == 0 {
            0.0
        } else {
            now.ia_dev_ns as f64 / now.ia_mean_ns as f64
        };
        Observation {
            generation: now.generation,
            interval_ms: now.interval_ms,
            requested_interval_ms: now.requested_interval_ms,
            rtt_ms: (now.rtt_us != 0).then(|| now.rtt_us as f64 / 1000.0),
            loss_rate,
            jitter,
            mean_ms,
            arrival_mean_ms: now.ia_mean_ns as f64 / 1e6,
            sigma_ms,
            stall_floor_ms,
            load_permille: now.load.min(hb_common::proto::LOAD_MAX),
            new_samples: accepted,
            new_lost: lost,
            settled_samples: now.ia_samples as u32,
            refuted_suspicions,
        }
    }
}

/// What a decision is taken on: the observation of the period, and
/// what the controller remembers of the node beyond it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Features {
    /// Smoothed RTT the node reports, ms; `None` when unknown.
    pub rtt_ms: Option<f64>,
    /// The node's loss rate over its recent periods (see
    /// [`crate::controller`]): a path that drops bursts keeps a non-zero
    /// rate between them.
    pub loss_rate: f64,
    /// Inter-arrival mean absolute deviation over the mean.
    pub jitter: f64,
    /// Load the node reports, permille.
    pub load_permille: u16,
    /// Modelled worst-case detection time over the target.
    pub headroom: f64,
}

impl Features {
    /// The observation alone: its own period's loss rate, no history.
    pub fn of(obs: &Observation, headroom: f64) -> Features {
        Features {
            rtt_ms: obs.rtt_ms,
            loss_rate: obs.loss_rate,
            jitter: obs.jitter,
            load_permille: obs.load_permille,
            headroom,
        }
    }
}

/// A row of the Q table: one bucket per dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StateKey {
    pub rtt: u8,
    pub loss: u8,
    pub jitter: u8,
    pub load: u8,
    /// Modelled detection time over the target (see [`HEADROOM_EDGES`]).
    pub headroom: u8,
    /// The interval level (see [`Grid`]).
    pub interval: u8,
}

/// Index of the first edge `x` is below, or `edges.len()`.
fn bucket(x: f64, edges: &[f64]) -> usize {
    if x.is_nan() {
        // Unknown is treated as the worst: never an invitation to slow down.
        return edges.len();
    }
    edges.iter().position(|&e| x < e).unwrap_or(edges.len())
}

/// The sizes of the dimensions, slowest-varying first (the row index is
/// mixed-radix over them, the interval level last).
const DIMS: [usize; 5] = [
    RTT_BUCKETS,
    LOSS_BUCKETS,
    JITTER_BUCKETS,
    LOAD_BUCKETS,
    HEADROOM_BUCKETS,
];

impl StateKey {
    /// Buckets `f` with the node at interval level `level` of a grid of
    /// `levels` levels. Total: every input gives a valid key.
    pub fn new(f: &Features, level: usize, levels: usize) -> StateKey {
        let rtt = match f.rtt_ms {
            Some(r) if r.is_finite() && r >= 0.0 => 1 + bucket(r, &RTT_EDGES_MS),
            Some(_) => RTT_BUCKETS - 1,
            None => 0,
        };
        let loss = bucket(f.loss_rate, &LOSS_EDGES);
        let jitter = bucket(f.jitter, &JITTER_EDGES);
        let load = LOAD_EDGES
            .iter()
            .position(|&e| f.load_permille < e)
            .unwrap_or(LOAD_EDGES.len());
        // NaN (an unusable model) is the worst bucket, like the others.
        let headroom = bucket(f.headroom, &HEADROOM_EDGES);
        StateKey {
            rtt: rtt.min(RTT_BUCKETS - 1) as u8,
            loss: loss.min(LOSS_BUCKETS - 1) as u8,
            jitter: jitter.min(JITTER_BUCKETS - 1) as u8,
            load: load.min(LOAD_BUCKETS - 1) as u8,
            headroom: headroom.min(HEADROOM_BUCKETS - 1) as u8,
            interval: level.min(levels.saturating_sub(1)).min(u8::MAX as usize) as u8,
        }
    }

    fn buckets(&self) -> [usize; 5] {
        [
            self.rtt as usize,
            self.loss as usize,
            self.jitter as usize,
            self.load as usize,
            self.headroom as usize,
        ]
    }

    /// Row index in a table with `levels` interval levels.
    pub fn index(&self, levels: usize) -> usize {
        let mut i = 0;
        for (b, n) in self.buckets().into_iter().zip(DIMS) {
            i = i * n + b.min(n - 1);
        }
        i * levels + self.interval as usize
    }

    /// The key of row `index` (inverse of [`StateKey::index`]).
    pub fn from_index(mut index: usize, levels: usize) -> StateKey {
        let interval = index % levels.max(1);
        index /= levels.max(1);
        let mut b = [0u8; 5];
        for (slot, n) in b.iter_mut().zip(DIMS).rev() {
            *slot = (index % n) as u8;
            index /= n;
        }
        StateKey {
            rtt: b[0],
            loss: b[1],
            jitter: b[2],
            load: b[3],
            headroom: b[4],
            interval: interval as u8,
        }
    }

    /// Number of rows of a table with `levels` interval levels.
    pub fn rows(levels: usize) -> usize {
        DIMS.iter().product::<usize>() * levels
    }

    /// Human-readable bucket ranges, for `hb controller show` and the API.
    pub fn describe(&self, grid: &Grid) -> StateDescription {
        fn range(edges: &[f64], i: usize, unit: &str, scale: f64) -> String {
            let fmt = |v: f64| format!("{}{unit}", v * scale);
            match i {
                0 => format!("<{}", fmt(edges[0])),
                i if i >= edges.len() => format!(">={}", fmt(edges[edges.len() - 1])),
                i => format!("{}-{}", fmt(edges[i - 1]), fmt(edges[i])),
            }
        }
        let rtt = match self.rtt {
            0 => "unknown".to_string(),
            r => range(&RTT_EDGES_MS, r as usize - 1, "ms", 1.0),
        };
        let loss = range(&LOSS_EDGES, self.loss as usize, "%", 100.0);
        let load_edges: Vec<f64> = LOAD_EDGES.iter().map(|&e| e as f64).collect();
        StateDescription {
            rtt,
            loss,
            jitter: range(&JITTER_EDGES, self.jitter as usize, "", 1.0),
            load: range(&load_edges, self.load as usize, "", 1.0),
            headroom: range(&HEADROOM_EDGES, self.headroom as usize, "", 1.0),
            interval_ms: grid.ms(self.interval as usize),
        }
    }
}

/// A [`StateKey`] spelled out for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDescription {
    pub rtt: String,
    pub loss: String,
    pub jitter: String,
    /// Permille.
    pub load: String,
    /// Modelled detection time over the target.
    pub headroom: String,
    pub interval_ms: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step barely above 1 (`hb simulate --step 1.0000000000000002`)
    /// puts the first power of it at the lower bound past `i32::MAX`: the
    /// grid is the bounds alone, without an overflow.
    #[test]
    fn a_step_barely_above_one_gives_the_bounds() {
        for (min, max) in [(100, 10_000), (1, 1), (1, u32::MAX), (1000, 1001)] {
            let g = Grid::new(min, max, 1.0 + f64::EPSILON);
            assert_eq!(g.ms(0), min);
            assert_eq!(*g.levels_ms.last().unwrap(), max);
            assert!(g.levels_ms.windows(2).all(|w| w[0] < w[1]), "{g:?}");
        }
    }

    #[test]
    fn grid_spans_the_bounds_in_steps() {
        let g = Grid::new(100, 10_000, 1.5);
        assert_eq!(g.ms(0), 100);
        assert_eq!(*g.levels_ms.last().unwrap(), 10_000);
        assert_eq!(g.len(), 13);
        // Levels near a round interval move onto it by at most a
        // quarter step each, so one step stays within step^1.5.
        for w in g.levels_ms.windows(2) {
            assert!(w[1] > w[0]);
            assert!(w[1] as f64 <= w[0] as f64 * 1.5f64.powf(1.5) + 1.0, "{w:?}");
        }
        assert_eq!(
            g.levels_ms,
            vec![
                100, 130, 200, 300, 438, 700, 1000, 1500, 2217, 3325, 5000, 7000, 10_000
            ]
        );
        assert_eq!(g.level_of(1), 0);
        assert_eq!(g.level_of(u32::MAX), g.len() - 1);
        assert_eq!(g.ms(g.level_of(1100)), 1000);
        assert_eq!(g.level_at_most(2000), g.level_of(1500));
        assert_eq!(g.level_at_most(5), 0, "bounds win over a cap below min");
        // The default: six steps per decade on round intervals; the
        // usual fixed intervals (100 ms, 1 s, 5 s, 10 s) are levels.
        let d = crate::controller::Config::default().grid();
        assert_eq!(
            d.levels_ms,
            vec![
                100, 150, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000, 7000, 10_000
            ]
        );
        // Other bounds: the same round levels inside them.
        assert_eq!(
            Grid::new(200, 5000, 10f64.powf(1.0 / 6.0)).levels_ms,
            vec![200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000]
        );
        // Degenerate configurations still give a usable grid.
        assert_eq!(Grid::new(500, 500, 1.5).levels_ms, vec![500]);
        assert!(Grid::new(100, 10_000, 1.000001).len() <= 64);
    }

    #[test]
    fn every_observation_maps_to_a_row() {
        let levels = 13;
        let rows = StateKey::rows(levels);
        let weird = [
            0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e300,
            0.5,
        ];
        for &x in &weird {
            for rtt in [None, Some(x)] {
                for load in [0u16, 999, 1000, u16::MAX] {
                    for level in [0usize, 5, 12, 13, 1000] {
                        let f = Features {
                            rtt_ms: rtt,
                            loss_rate: x,
                            jitter: x,
                            load_permille: load,
                            headroom: x,
                        };
                        let k = StateKey::new(&f, level, levels);
                        let i = k.index(levels);
                        assert!(i < rows, "{k:?}");
                        assert_eq!(StateKey::from_index(i, levels), k);
                    }
                }
            }
        }
        let nan = Features {
            loss_rate: f64::NAN,
            jitter: f64::NAN,
            headroom: f64::NAN,
            ..Features::default()
        };
        let k = StateKey::new(&nan, 0, levels);
        assert_eq!(k.loss as usize, LOSS_BUCKETS - 1, "NaN is the worst");
        assert_eq!(k.jitter as usize, JITTER_BUCKETS - 1);
        assert_eq!(k.headroom as usize, HEADROOM_BUCKETS - 1);
        // Every row spells out differently: no two rows mean the same.
        let grid = crate::controller::Config::default().grid();
        let names: std::collections::HashSet<String> = (0..StateKey::rows(grid.len()))
            .map(|i| format!("{:?}", StateKey::from_index(i, grid.len()).describe(&grid)))
            .collect();
        assert_eq!(names.len(), StateKey::rows(grid.len()));
    }

    #[test]
    fn observation_over_a_period() {
        let mut prev = NodeState {
            generation: 3,
            accepted: 100,
            lost: 5,
            interval_ms: 1000,
            ia_mean_ns: 1_000_000_000,
            ia_dev_ns: 100_000_000,
            rtt_us: 1500,
            load: 4000,
            last_arrival_ns: 1,
            ..NodeState::default()
        };
        let mut now = prev;
        now.accepted = 190;
        now.lost = 15;
        let o = Observation::from_states(Some(&prev), &now, 2, &PhiParams::default());
        assert_eq!((o.new_samples, o.new_lost), (90, 10));
        assert!((o.loss_rate - 0.1).abs() < 1e-12);
        assert!((o.jitter - 0.1).abs() < 1e-12);
        assert_eq!(o.rtt_ms, Some(1.5));
        assert_eq!(o.load_permille, 1000, "clamped");
        assert_eq!(o.refuted_suspicions, 2);
        // Across a restart: the counters run over every generation.
        prev.generation = 2;
        let o = Observation::from_states(Some(&prev), &now, 0, &PhiParams::default());
        assert_eq!((o.new_samples, o.new_lost), (90, 10));
        // No previous state (a monitor restarted over pinned maps): the
        // lifetime totals are no period; one heartbeat, no loss.
        let o = Observation::from_states(None, &now, 0, &PhiParams::default());
        assert_eq!((o.new_samples, o.new_lost, o.loss_rate), (1, 0, 0.0));
    }

    #[test]
    fn a_seq_jump_to_the_top_is_a_loss_rate_not_an_overflow() {
        // An authenticated node that jumps its seq to u64::MAX makes the
        // gate count nearly 2^64 lost; `accepted + lost` overflowed (a
        // panic that stops the monitor in a debug build, a loss rate of
        // 2.6e18 in a release one).
        let prev = NodeState {
            accepted: 2,
            lost: 0,
            interval_ms: 1000,
            ia_mean_ns: 1_000_000_000,
            ia_dev_ns: 100_000_000,
            last_arrival_ns: 1,
            ..NodeState::default()
        };
        let mut now = prev;
        now.accepted = 13;
        now.lost = u64::MAX - 3;
        let o = Observation::from_states(Some(&prev), &now, 0, &PhiParams::default());
        assert!((0.0..=1.0).contains(&o.loss_rate), "{}", o.loss_rate);
        assert!(o.loss_rate > 0.999);
        let mut c =
            crate::controller::QController::new(crate::controller::Config::default()).unwrap();
        assert!(c.periods(&o).is_finite());
        c.observe(1, &prev, 0);
        let d = c.observe(1, &now, 0);
        assert!(d.interval_ms >= 100 && d.interval_ms <= 10_000, "{d:?}");
    }
}

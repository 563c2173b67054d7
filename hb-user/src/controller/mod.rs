//! The heartbeat-interval controller: tabular Q-learning that trades a
//! node's failure-detection time against the heartbeats it costs.
//!
//! # What it decides
//! Once per decision period per node, the monitor hands the controller the
//! node's gate state ([`NodeState`], which only authenticated, fresh
//! heartbeats ever update) and gets a [`Decision`]: slower, hold or faster,
//! one multiplicative step (`Config::step`, ×1.468 = six per decade by default) on a grid of
//! interval levels inside `[min_interval_ms, max_interval_ms]`
//! (default 100 ms .. 10 s), further capped per node for nodes an operator
//! marks critical ([`QController::set_cap`]). The monitor writes the
//! interval into the node's `requested_interval_ms`; the gate's ACKs carry
//! it to the sender, which adopts it from its next heartbeat (announcing
//! the new interval in that heartbeat, so the detector re-seeds its moments
//! before the longer gap starts).
//!
//! # State, actions, reward
//! The state ([`state::StateKey`]) is the bucketed RTT, loss rate,
//! inter-arrival jitter (mean deviation over mean), the node's reported
//! load and the current interval level. The reward of a period is
//!
//! ```text
//! r = - w_late * max(0, D / target - 1) - w_miss * [D > target]
//!     - w_cost * (1 + w_load * load) * (min_interval / interval)
//!     - w_fs * refuted_suspicions
//! ```
//!
//! where `D = mean + k * sigma + tick + rtt/2` is the worst-case time from
//! a crash to the detector's suspicion: `mean` and `sigma` are the
//! detector's own floored moments ([`crate::detector::moments_ms`]), `k` is
//! how many sigmas past the mean phi reaches the suspicion threshold, the
//! monitor notices at its next tick, and the last heartbeat may still have
//! been in flight. So the controller learns the slowest interval whose
//! detection time stays within `target_detection_ms`, slower still for
//! loaded nodes (their heartbeats cost more), and pays for every false
//! suspicion the monitor had to take back.
//!
//! # Learning
//! One Q table is shared by the fleet (every node's experience teaches the
//! same states). Epsilon-greedy with exponential decay, drawn from a seeded
//! ChaCha RNG, so a run is reproducible from its seed and its inputs.
//! Q values start at 0 and rewards are negative, which makes untried
//! actions look best: every reachable state-action gets tried.
//!
//! # Safety
//! - Only gate-accepted state feeds the controller (see
//!   [`state::Observation`]): forged or replayed datagrams never reach it.
//! - Whatever a node reports (a load of 65535 permille, a NaN-producing
//!   zero interval), the decision is at most one level away from the
//!   previous decision for that node and always inside the bounds and the
//!   node's cap. Load is clamped to 1000 permille before it is used.
//!
//! # In the monitor
//! `hb monitor --controller qlearn` wraps one `QController` in
//! [`crate::monitor::policy::QLearnPolicy`] (behind the tick's lock), keyed
//! by node id. The tick gives every node one decision per decision period
//! (`--decision-ms`, 5 s by default for qlearn, the period the simulation
//! trains with), staggered over the ticks, and reports each suspicion a
//! node's own heartbeats refuted (suspect or dead -> alive within one
//! generation) so the next decision pays for it. At start the table is
//! loaded from `--controller-table` when the file exists (a table that
//! does not fit the configuration stops the monitor with one line);
//! it is saved atomically every minute and at shutdown. Nodes marked with
//! `--critical` get `set_cap(--controller-max-interval-ms)`. `GET
//! /controller` serves [`QController::snapshot`] and `/nodes` shows each
//! node's last decision with its action, reason, reward and modelled
//! detection time.
//!
//! # Transparency
//! Every decision carries its action, reason, reward and state; decisions
//! are logged at debug level with fields; [`QController::snapshot`] is the
//! `GET /controller` document; the table is saved atomically and reloaded
//! ([`table`]), and `hb controller show` prints it.

pub mod cli;
pub mod state;
pub mod table;

use std::collections::HashMap;

use hb_common::maps::NodeState;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use cli::{Cmd, run};
pub use state::{Grid, Observation, StateDescription, StateKey};
pub use table::TableError;

use crate::detector::{PhiParams, phi_normal};

/// One step of the interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Multiply the interval by `step`.
    Slower = 0,
    /// Keep it.
    Hold = 1,
    /// Divide it by `step`.
    Faster = 2,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Slower, Action::Hold, Action::Faster];

    pub fn name(self) -> &'static str {
        match self {
            Action::Slower => "slower",
            Action::Hold => "hold",
            Action::Faster => "faster",
        }
    }

    /// The interval level after this action from `level`, unclamped.
    fn apply(self, level: usize) -> isize {
        match self {
            Action::Slower => level as isize + 1,
            Action::Hold => level as isize,
            Action::Faster => level as isize - 1,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the controller decided what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The best action the table knows for this state.
    Greedy,
    /// A random action (epsilon-greedy exploration).
    Explore,
    /// Too few heartbeats since the last decision to judge: hold.
    NoData,
    /// The node's cap is below its current level: moved down to the cap.
    Cap,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Greedy => "greedy",
            Reason::Explore => "explore",
            Reason::NoData => "no_data",
            Reason::Cap => "cap",
        })
    }
}

/// One decision for one node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// The interval the node should use from now on, ms.
    pub interval_ms: u32,
    pub action: Action,
    pub reason: Reason,
    /// Reward of the period that just ended (`None` without a previous
    /// decision to credit, or without data).
    pub reward: Option<f64>,
    /// Modelled worst-case detection time of that period, ms.
    pub detection_ms: Option<f64>,
    /// The state the decision was taken in.
    pub state: Option<StateKey>,
}

/// Weights of the reward terms (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Per unit of relative overshoot of the detection target.
    pub late: f64,
    /// Once for any overshoot of the detection target.
    pub miss: f64,
    /// Heartbeat cost at the minimum interval and zero load.
    pub cost: f64,
    /// Extra cost factor at full load (1000 permille).
    pub load: f64,
    /// Per refuted (false) suspicion.
    pub false_suspicion: f64,
}

impl Default for Weights {
    fn default() -> Self {
        // A missed target costs more than any saving of one step (the
        // heartbeat cost is 1 at the fastest interval): the target is the
        // operator's promise, the cost is what is optimised within it.
        // A false suspicion costs as much as missing the target by 75%.
        // Compared on the shipped scenarios (`cargo xtask bench
        // controller`) with (2, 0.5, 3, 1, 4), which sent ~half the
        // heartbeats of a 100 ms baseline by missing its target by 40%+.
        Weights {
            late: 4.0,
            miss: 1.0,
            cost: 1.0,
            load: 1.0,
            false_suspicion: 4.0,
        }
    }
}

/// Controller configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// Fastest interval, ms.
    pub min_interval_ms: u32,
    /// Slowest interval, ms.
    pub max_interval_ms: u32,
    /// Multiplicative step of one action (> 1).
    pub step: f64,
    /// Worst-case crash-to-suspicion time the controller aims for, ms.
    pub target_detection_ms: f64,
    /// Phi at which the monitor suspects a node.
    pub threshold: f64,
    /// The detector's parameters (the same the monitor uses).
    #[serde(serialize_with = "serialize_phi")]
    pub phi: PhiParams,
    /// The monitor's tick, ms: suspicion is noticed up to a tick late.
    pub tick_ms: f64,
    /// Fewest new heartbeats in a period to take a decision on.
    pub min_samples: u64,
    /// Learning rate.
    pub alpha: f64,
    /// Discount of the next state's value.
    pub gamma: f64,
    /// Exploration rate at the start.
    pub epsilon_start: f64,
    /// Exploration never decays below this.
    pub epsilon_min: f64,
    /// Decisions after which epsilon has halved.
    pub epsilon_half_life: f64,
    pub weights: Weights,
    /// Seed of the exploration RNG.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_interval_ms: 100,
            max_interval_ms: 10_000,
            // Six steps per decade (x1.468): 100 ms, 1 s and 10 s are
            // levels, so the controller can sit exactly where an operator's
            // fixed interval would.
            step: 10f64.powf(1.0 / 6.0),
            target_detection_ms: 3000.0,
            threshold: 8.0,
            phi: PhiParams::default(),
            tick_ms: 100.0,
            min_samples: 3,
            alpha: 0.2,
            gamma: 0.8,
            epsilon_start: 0.2,
            epsilon_min: 0.01,
            epsilon_half_life: 20_000.0,
            weights: Weights::default(),
            seed: 1,
        }
    }
}

/// `PhiParams` belongs to the detector and is not `Serialize`; the
/// snapshot shows its fields.
fn serialize_phi<S: serde::Serializer>(p: &PhiParams, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("PhiParams", 3)?;
    st.serialize_field("min_std_dev_ms", &p.min_std_dev_ms)?;
    st.serialize_field("min_std_dev_ratio", &p.min_std_dev_ratio)?;
    st.serialize_field("acceptable_pause_ms", &p.acceptable_pause_ms)?;
    st.end()
}

impl Config {
    /// Rejects configurations the controller cannot honour.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_interval_ms == 0 || self.min_interval_ms > self.max_interval_ms {
            return Err(format!(
                "interval bounds {}..{} ms are empty or start at 0",
                self.min_interval_ms, self.max_interval_ms
            ));
        }
        if !(self.step > 1.0 && self.step <= 10.0) {
            return Err(format!("step {} must be in (1, 10]", self.step));
        }
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.target_detection_ms) || !finite_pos(self.threshold) {
            return Err("target detection time and threshold must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.alpha)
            || !(0.0..1.0).contains(&self.gamma)
            || !(0.0..=1.0).contains(&self.epsilon_start)
            || !(0.0..=1.0).contains(&self.epsilon_min)
        {
            return Err("alpha and epsilon must be in [0, 1], gamma in [0, 1)".into());
        }
        Ok(())
    }

    pub fn grid(&self) -> Grid {
        Grid::new(self.min_interval_ms, self.max_interval_ms, self.step)
    }

    /// How many (floored) standard deviations past the mean phi reaches
    /// `threshold`: phi depends only on `(elapsed - mean) / sigma`.
    pub fn sigmas_to_threshold(&self) -> f64 {
        let (mut lo, mut hi) = (0.0f64, 1000.0f64);
        for _ in 0..100 {
            let mid = (lo + hi) / 2.0;
            if phi_normal(mid, 0.0, 1.0) < self.threshold {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }
}

/// Running statistics of the rewards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardStats {
    pub count: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub last: f64,
    /// Mean modelled detection time of the rewarded periods, ms.
    pub mean_detection_ms: f64,
    /// Rewarded periods whose modelled detection time missed the target.
    pub over_target: u64,
}

impl RewardStats {
    fn add(&mut self, r: f64, detection_ms: f64, over: bool) {
        if self.count == 0 {
            self.min = r;
            self.max = r;
        }
        self.count += 1;
        let n = self.count as f64;
        self.mean += (r - self.mean) / n;
        self.mean_detection_ms += (detection_ms - self.mean_detection_ms) / n;
        self.min = self.min.min(r);
        self.max = self.max.max(r);
        self.last = r;
        self.over_target += over as u64;
    }
}

/// What the controller remembers of one node.
#[derive(Clone, Debug, Default)]
struct NodeMemory {
    generation: u32,
    /// Level of the last decision; `None` before the first.
    level: Option<usize>,
    /// State and action of the last decision, to credit with the reward.
    last: Option<(usize, Action)>,
    /// The gate state at the last decision (for [`QController::observe`]).
    prev: Option<NodeState>,
    /// Refuted suspicions reported since the last decision.
    refuted: u32,
    /// Operator cap, ms.
    cap_ms: Option<u32>,
    /// The last decision with data (for `/nodes`).
    decision: Option<Decision>,
}

/// The Q-learning controller. `Clone` copies the table, the RNG and the
/// per-node memory: the benchmark evaluates one trained controller on
/// several seeds, each from the same starting point.
#[derive(Clone)]
pub struct QController {
    cfg: Config,
    grid: Grid,
    k_sigma: f64,
    /// `rows * 3` Q values, row-major by [`StateKey::index`].
    q: Vec<f64>,
    visits: Vec<u64>,
    rng: ChaCha8Rng,
    decisions: u64,
    explorations: u64,
    rewards: RewardStats,
    nodes: HashMap<u32, NodeMemory>,
    /// Epsilon is forced to this when set (evaluation runs use 0).
    epsilon_override: Option<f64>,
}

impl QController {
    /// A controller with an empty table.
    pub fn new(cfg: Config) -> Result<QController, String> {
        cfg.validate()?;
        let grid = cfg.grid();
        let rows = StateKey::rows(grid.len());
        Ok(QController {
            k_sigma: cfg.sigmas_to_threshold(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            q: vec![0.0; rows * 3],
            visits: vec![0; rows],
            grid,
            cfg,
            decisions: 0,
            explorations: 0,
            rewards: RewardStats::default(),
            nodes: HashMap::new(),
            epsilon_override: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn grid(&self) -> &Grid {
        &self.grid
    }

    /// Decisions taken so far (including those loaded with a table).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// The current exploration rate.
    pub fn epsilon(&self) -> f64 {
        if let Some(e) = self.epsilon_override {
            return e;
        }
        let decayed = self.cfg.epsilon_start
            * 0.5f64.powf(self.decisions as f64 / self.cfg.epsilon_half_life);
        decayed.max(self.cfg.epsilon_min)
    }

    /// Forces epsilon (e.g. `Some(0.0)` to evaluate the greedy policy);
    /// `None` returns to the decaying schedule.
    pub fn set_epsilon(&mut self, epsilon: Option<f64>) {
        self.epsilon_override = epsilon.map(|e| e.clamp(0.0, 1.0));
    }

    /// Caps the interval of `node` (e.g. a node the operator marks
    /// critical); `None` removes the cap. The cap applies from the node's
    /// next decision.
    pub fn set_cap(&mut self, node: u32, cap_ms: Option<u32>) {
        self.nodes.entry(node).or_default().cap_ms = cap_ms;
    }

    /// Forgets a node (unprovisioned).
    pub fn forget(&mut self, node: u32) {
        self.nodes.remove(&node);
    }

    /// Starts every node afresh (e.g. between a training and an
    /// evaluation run), keeping the table, the caps and the statistics.
    pub fn reset_nodes(&mut self) {
        for m in self.nodes.values_mut() {
            *m = NodeMemory {
                cap_ms: m.cap_ms,
                ..NodeMemory::default()
            };
        }
    }

    /// The modelled worst-case crash-to-suspicion time of a period, ms.
    pub fn detection_ms(&self, obs: &Observation) -> f64 {
        let rtt_half = obs.rtt_ms.filter(|r| r.is_finite()).unwrap_or(0.0).max(0.0) / 2.0;
        let d = obs.mean_ms + self.k_sigma * obs.sigma_ms + self.cfg.tick_ms + rtt_half;
        if d.is_finite() { d } else { f64::MAX }
    }

    /// The reward of a period that ended with `obs` (see the module docs).
    pub fn reward(&self, obs: &Observation) -> (f64, f64) {
        let w = &self.cfg.weights;
        let d = self.detection_ms(obs);
        let over = (d / self.cfg.target_detection_ms - 1.0).max(0.0);
        // No plateau: were the overshoot capped, a node that cannot meet
        // its target (a far WAN path under a LAN target) would find every
        // interval equally late and slow down for the cheaper heartbeats.
        // The bound only keeps the value finite.
        let late = if over > 0.0 {
            w.late * over.min(1e6) + w.miss
        } else {
            0.0
        };
        let interval = (obs.interval_ms.max(1) as f64).max(self.cfg.min_interval_ms as f64);
        let load = obs.load_permille.min(1000) as f64 / 1000.0;
        let cost = w.cost * (1.0 + w.load * load) * (self.cfg.min_interval_ms as f64 / interval);
        let fs = w.false_suspicion * obs.refuted_suspicions.min(10) as f64;
        (-(late + cost + fs), d)
    }

    fn row(&self, s: usize) -> [f64; 3] {
        [self.q[s * 3], self.q[s * 3 + 1], self.q[s * 3 + 2]]
    }

    /// The actions possible from `level` under `cap_level`.
    fn allowed(level: usize, cap_level: usize) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| {
            let l = a.apply(level);
            l >= 0 && l as usize <= cap_level
        })
    }

    /// The best allowed action in row `s` (ties go to hold, then slower).
    fn greedy(&self, s: usize, level: usize, cap_level: usize) -> (Action, f64) {
        let q = self.row(s);
        let mut best: Option<(Action, f64)> = None;
        for a in [Action::Hold, Action::Slower, Action::Faster] {
            if !Self::allowed(level, cap_level).any(|x| x == a) {
                continue;
            }
            let v = q[a as usize];
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((a, v));
            }
        }
        best.unwrap_or((Action::Hold, q[Action::Hold as usize]))
    }

    /// Decides for `node` from the gate state `now` (a consistent copy of
    /// its `NodeState`) and the suspicions of it that were refuted since
    /// the previous call. Keeps the previous snapshot itself: this is the
    /// call the monitor makes once per decision period per node.
    pub fn observe(&mut self, node: u32, now: &NodeState, refuted_suspicions: u32) -> Decision {
        let m = self.nodes.entry(node).or_default();
        m.refuted = m.refuted.saturating_add(refuted_suspicions);
        let obs = Observation::from_states(m.prev.as_ref(), now, m.refuted, &self.cfg.phi);
        let d = self.decide(node, &obs);
        if d.reason != Reason::NoData {
            let m = self.nodes.entry(node).or_default();
            m.prev = Some(*now);
            m.refuted = 0;
        }
        d
    }

    /// Decides for `node` from an observation of the period since its
    /// previous decision. With fewer than `min_samples` new heartbeats the
    /// answer is "hold" (reason `no_data`) and nothing is learned.
    pub fn decide(&mut self, node: u32, obs: &Observation) -> Decision {
        let levels = self.grid.len();
        let m = self.nodes.entry(node).or_default();
        if m.generation != obs.generation {
            // A restart: the previous action's consequences are not this
            // incarnation's to judge.
            m.generation = obs.generation;
            m.last = None;
            m.level = None;
        }
        let cap_level = m
            .cap_ms
            .map(|c| self.grid.level_at_most(c))
            .unwrap_or(levels - 1);
        let current = m
            .level
            .unwrap_or_else(|| self.grid.level_of(obs.interval_ms));
        if current > cap_level {
            // Safety before learning: a newly capped node goes to its cap.
            m.level = Some(cap_level);
            m.last = None;
            let interval_ms = self.grid.ms(cap_level);
            tracing::debug!(node, interval_ms, reason = %Reason::Cap, "controller decision");
            let d = Decision {
                interval_ms,
                action: Action::Faster,
                reason: Reason::Cap,
                reward: None,
                detection_ms: None,
                state: None,
            };
            m.decision = Some(d.clone());
            return d;
        }
        if obs.new_samples < self.cfg.min_samples {
            return Decision {
                interval_ms: self.grid.ms(current),
                action: Action::Hold,
                reason: Reason::NoData,
                reward: None,
                detection_ms: None,
                state: None,
            };
        }

        let key = StateKey::new(obs, current, levels);
        let s = key.index(levels);
        let (reward, detection) = self.reward(obs);
        let last = self.nodes.get(&node).and_then(|m| m.last);
        if let Some((ps, pa)) = last {
            let (_, next_best) = self.greedy(s, current, cap_level);
            let i = ps * 3 + pa as usize;
            self.q[i] += self.cfg.alpha * (reward + self.cfg.gamma * next_best - self.q[i]);
            self.rewards
                .add(reward, detection, detection > self.cfg.target_detection_ms);
        }

        let epsilon = self.epsilon();
        let (action, reason) = if epsilon > 0.0 && self.rng.random::<f64>() < epsilon {
            let choices: Vec<Action> = Self::allowed(current, cap_level).collect();
            let a = choices[self.rng.random_range(0..choices.len())];
            self.explorations += 1;
            (a, Reason::Explore)
        } else {
            (self.greedy(s, current, cap_level).0, Reason::Greedy)
        };
        // `allowed` guarantees the range; clamp anyway (bounds are the
        // invariant that must never break).
        let level = (action.apply(current).max(0) as usize).min(cap_level);
        self.decisions += 1;
        self.visits[s] = self.visits[s].saturating_add(1);
        let interval_ms = self.grid.ms(level);
        tracing::debug!(
            node,
            interval_ms,
            action = %action,
            reason = %reason,
            reward = last.map(|_| reward),
            detection_ms = detection,
            rtt = key.rtt,
            loss = key.loss,
            jitter = key.jitter,
            load = key.load,
            level = key.interval,
            "controller decision"
        );
        let m = self.nodes.entry(node).or_default();
        m.level = Some(level);
        m.last = Some((s, action));
        let d = Decision {
            interval_ms,
            action,
            reason,
            reward: last.map(|_| reward),
            detection_ms: Some(detection),
            state: Some(key),
        };
        m.decision = Some(d.clone());
        d
    }

    /// The last decision taken for `node` (not counting `no_data` holds),
    /// for the monitor's `/nodes`: interval, action, reason, reward.
    pub fn last_decision(&self, node: u32) -> Option<&Decision> {
        self.nodes.get(&node).and_then(|m| m.decision.as_ref())
    }

    /// The greedy action and its Q values in a state (for inspection and
    /// tests).
    pub fn policy(&self, key: &StateKey) -> (Action, [f64; 3]) {
        let levels = self.grid.len();
        let s = key.index(levels);
        (
            self.greedy(s, key.interval as usize, levels - 1).0,
            self.row(s),
        )
    }

    /// The `GET /controller` document: configuration, exploration, reward
    /// statistics and every visited row of the table.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            config: self.cfg.clone(),
            levels_ms: self.grid.levels_ms.clone(),
            sigmas_to_threshold: self.k_sigma,
            epsilon: self.epsilon(),
            decisions: self.decisions,
            explorations: self.explorations,
            nodes: self.nodes.len(),
            rewards: self.rewards,
            table: self.rows(),
        }
    }

    /// Every visited row, most visited first.
    pub fn rows(&self) -> Vec<table::Row> {
        let levels = self.grid.len();
        let mut rows: Vec<table::Row> = (0..self.visits.len())
            .filter(|&s| self.visits[s] > 0)
            .map(|s| {
                let key = StateKey::from_index(s, levels);
                table::Row {
                    index: s as u32,
                    state: key.describe(&self.grid),
                    visits: self.visits[s],
                    q: self.row(s),
                    greedy: self.greedy(s, key.interval as usize, levels - 1).0,
                }
            })
            .collect();
        rows.sort_by(|a, b| b.visits.cmp(&a.visits).then(a.index.cmp(&b.index)));
        rows
    }
}

/// See [`QController::snapshot`].
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub config: Config,
    pub levels_ms: Vec<u32>,
    pub sigmas_to_threshold: f64,
    pub epsilon: f64,
    pub decisions: u64,
    pub explorations: u64,
    pub nodes: usize,
    pub rewards: RewardStats,
    pub table: Vec<table::Row>,
}

#[cfg(test)]
mod tests;

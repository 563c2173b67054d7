//! `cargo xtask bench controller`: the Q-learning controller against fixed
//! intervals of 100 ms, 1 s and 5 s on every shipped scenario of
//! `hb simulate` (the same library code the command runs), printed as a
//! markdown section.
//!
//! # How each comparison is made, so it is fair to the fixed interval
//! 1. The *training seed* (`--seed` mixed with a salt) is seen before the
//!    evaluation, nothing else is. The fixed interval runs on it for
//!    `--train-hours` (3 h of `--nodes` nodes: as many crashes as the
//!    evaluation pools; never less than `--hours`, so `--train-hours 0`
//!    still has a target); its p99 detection time there becomes the
//!    detection target of a fresh controller: the operator's question "I
//!    get this detection time from a fixed interval today; can the
//!    controller deliver it for fewer heartbeats?". The controller then
//!    trains on the same training seed for as long (exploring).
//! 2. Evaluation on `--seeds K` unseen seeds (`--seed`, `--seed + 1`, ...),
//!    `--nodes` nodes for `--hours` each. On each seed the fixed interval
//!    and a copy of the trained controller (greedy, epsilon 0; it keeps
//!    learning from what it sees, as in the monitor) face the same paths,
//!    crashes, stalls and spikes. Every copy starts from the same trained
//!    table, so the seeds are independent repetitions.
//! 3. The goal per comparison: the controller's p99 detection is
//!    at most 5% above the fixed interval's while sending at least 40%
//!    fewer heartbeats, or more than 5% below it at a heartbeat rate at
//!    most 5% higher; it misses no more crashes (a missed crash is in the
//!    p99 sample as +infinity, so a policy that detects nothing has no
//!    finite p99 rather than a p99 of 0); and it has no more false
//!    suspicions beyond their noise (at most the fixed interval's +5% +3;
//!    a mixed fleet's p99 and false suspicions are also held profile by
//!    profile). The verdict is
//!    taken on the *pooled* evaluation (every crash of every seed; the
//!    heartbeats and false suspicions summed); the `seeds` column says on
//!    how many of the K seeds alone the same verdict (PASS or FAIL) comes
//!    out, so a verdict that flips between seeds shows as one.
//!
//! ## What this replaced, and why
//! - **Sample size.** Until stop 7 the benchmark ran 100 nodes for 1 hour
//!   on one evaluation seed (`--nodes 100 --seeds 1 --train-hours 1`
//!   reproduces that shape): about 280 crashes per policy, so the p99 was
//!   the third-largest detection time. It moved more between seeds than
//!   the 5% the goal allows: fixed 1 s on `mixed` gave a p99 of 2521,
//!   1596, 3746, 2646 and 1928 ms on seeds 1 to 5, on `bursty-loss` 3073
//!   to 3907 ms; even at 300 nodes one seed's p99 still spans 1643 to
//!   2280 ms (`mixed`). The defaults (300 nodes, 3 seeds: ~2,500 crashes
//!   per policy, the p99 is about the 25th-largest) keep the whole
//!   benchmark within a few minutes on two cores; where a verdict still
//!   flips between seeds, the `seeds` column shows it.
//! - **Training.** The controller trained 1 h on a seed derived from the
//!   evaluation seed; now it trains on the seed its targets come from:
//!   the same separation, one training run per comparison.
//! - **The target** was the training seed's p99 +5%. The 5% is the
//!   verdict's allowance for the difference between seeds, not a budget:
//!   a controller told to aim at the edge of the allowance lands on it,
//!   and any seed difference then fails (or passes) it. The target is now
//!   the fixed interval's p99 itself.
//! - **"Detects faster"** counted any p99 below the fixed interval's, by
//!   however little; a tie then passed or failed by the toss of a coin
//!   (`load-spikes` and `pauses` at 100 ms "passed" with p99 -0%, on one
//!   or two of three seeds). It now needs the p99 more than 5% below: the
//!   same 5% that makes "matches" (and "equal rate"). The `old rule`
//!   column keeps the previous verdict visible.
//!
//! # What no policy can do: the mixture bound
//! A policy that steers a node between interval levels spends a fraction
//! `f_j` of the node's up-time at level `j`; crashes are Poisson, so the
//! same fraction of the crashes happens there. If at each level a crash is
//! detected no faster than under that fixed level (true on a stationary
//! scenario: the detector's deviation floor is 10% of the mean, and an
//! interval change re-seeds the deviation at 1/8 of the interval, which
//! is larger), the policy's detection times are a mixture of the fixed
//! levels' and its rate the same mixture of their rates. The least rate of
//! any mixture whose p99 stays within a target is a two-constraint linear
//! program over the `f_j`, solved exactly here (its optimum mixes at most
//! two levels) from the detection times every fixed level of the grid
//! shows on the first `--frontier-seeds` evaluation seeds (default 1;
//! the baseline is taken on the same seeds there). Where that least
//! rate is above 60% of the fixed interval's, *no* policy on the
//! controller's grid meets the "40% fewer" goal on that scenario; the
//! same program gives the best p99 any mixture reaches at the fixed rate
//! +5%. This is a proof on `lan` and `load-spikes` (nothing but the
//! interval changes a node's detection time there); on the scenarios with
//! disruptions (loss bursts, congestion, stalls, heavy-tailed delay) a
//! policy that reacts to a disruption can do better than the mixture, so
//! there the bound is a reference, not a limit.
//!
//! 100 ms, 1 s and 5 s are all levels of the controller's grid (six per
//! decade on round intervals), so the controller can sit exactly where
//! each fixed interval does.
//!
//! A second table shows the controller at its default target, the setting
//! `hb monitor --controller qlearn` ships with; a third every fixed level
//! of the grid (`--no-frontier` skips it and the mixture bound).
//!
//! Options: `--nodes N` (300), `--seed N` (1), `--seeds K` (3),
//! `--hours H` (1), `--train-hours H` (3), `--scenario NAME` (repeatable;
//! default all), `--threads N` (2), `--weights ...` (the controller's
//! reward weights, as `hb simulate --weights`), `--no-frontier`,
//! `--frontier-seeds F` (1). `HB_BENCH_TRACE=1` prints each job's wall
//! time to stderr.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, bail};
use hb::{
    controller::{Config, QController},
    simulate::{Policy, Scenario, SimConfig, SimReport, Summary, run_policy},
};

const BASELINES: [u32; 3] = [100, 1000, 5000];
/// Salt of the training seed (targets and the controller's training).
const TRAIN_SEED_SALT: u64 = 0x7461_7267_6574;
/// The share of crashes allowed above the p99.
const Q99: f64 = 0.01;
/// The noise allowed in false suspicions: the controller's count may
/// exceed the fixed interval's by this share of it plus [`FS_ABS`] (the
/// same paths and stalls give counts that move by a few percent with the
/// heartbeats' timing, and by a few where they are rare).
const FS_REL: f64 = 0.05;
const FS_ABS: f64 = 3.0;

struct Opts {
    nodes: u32,
    seed: u64,
    seeds: u64,
    hours: f64,
    train_hours: f64,
    scenarios: Vec<String>,
    threads: usize,
    weights: Option<hb::controller::Weights>,
    frontier: bool,
    frontier_seeds: u64,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        nodes: 300,
        seed: 1,
        seeds: 3,
        hours: 1.0,
        train_hours: 3.0,
        scenarios: Vec::new(),
        threads: 2,
        weights: None,
        frontier: true,
        frontier_seeds: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => o.nodes = val()?.parse().context("--nodes")?,
            "--seed" => o.seed = val()?.parse().context("--seed")?,
            "--seeds" => o.seeds = val()?.parse().context("--seeds")?,
            "--hours" => o.hours = val()?.parse().context("--hours")?,
            "--train-hours" => o.train_hours = val()?.parse().context("--train-hours")?,
            "--scenario" => o.scenarios.push(val()?),
            "--threads" => o.threads = val()?.parse().context("--threads")?,
            "--weights" => o.weights = Some(hb::simulate::parse_weights(&val()?)?),
            "--no-frontier" => o.frontier = false,
            "--frontier-seeds" => o.frontier_seeds = val()?.parse().context("--frontier-seeds")?,
            // Still accepted: the frontier is on by default now.
            "--frontier" => o.frontier = true,
            _ => bail!("unknown option {a}; see the module documentation"),
        }
    }
    if o.seeds == 0 || o.nodes == 0 {
        bail!("--seeds and --nodes must be at least 1");
    }
    Ok(o)
}

impl Opts {
    fn eval_seeds(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.seeds).map(|i| self.seed.wrapping_add(i))
    }

    fn train_seed(&self) -> u64 {
        self.seed ^ TRAIN_SEED_SALT
    }

    /// How long the fixed interval runs on the training seed for its p99
    /// (the target): as long as the training, and never less than one
    /// evaluation run (`--train-hours 0` trains nothing but still needs a
    /// target).
    fn reference_hours(&self) -> f64 {
        self.train_hours.max(self.hours)
    }

    fn sim(&self, s: &Scenario, seed: u64, hours: f64) -> SimConfig {
        SimConfig::new(s.clone(), self.nodes, hours * 3600.0, seed)
    }
}

/// Several runs of one policy on the evaluation seeds, pooled.
#[derive(Clone, Debug, Default)]
struct Pooled {
    runs: Vec<SimReport>,
}

impl Pooled {
    fn node_s(&self) -> f64 {
        self.runs
            .iter()
            .map(|r| r.nodes as f64 * r.duration_s)
            .sum()
    }

    fn rate(&self) -> f64 {
        let sent: u64 = self.runs.iter().map(|r| r.heartbeats_sent).sum();
        sent as f64 / self.node_s()
    }

    fn detections(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .runs
            .iter()
            .flat_map(|r| r.detections_ms.iter().copied())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }

    fn detection(&self) -> Summary {
        Summary::of(self.detections())
    }

    /// [`Pooled::detections`] with every missed crash as a detection that
    /// never comes (+infinity, last).
    fn detections_counting_missed(&self) -> Vec<f64> {
        let mut v = self.detections();
        v.extend((0..self.missed()).map(|_| f64::INFINITY));
        v
    }

    /// The p99 detection time with every missed crash in the sample as a
    /// detection that never comes (+infinity): a policy that misses more
    /// than 1% of its crashes has an infinite p99, and one that misses
    /// all has no finite detection time, not a p99 of 0.
    fn p99(&self) -> f64 {
        p99_counting_missed(self.detections(), self.missed())
    }

    fn false_suspicions(&self) -> u64 {
        self.runs.iter().map(|r| r.false_suspicions).sum()
    }

    /// Per hour of the nodes' up-time, as `hb simulate` reports it.
    fn fs_per_node_hour(&self) -> f64 {
        let up: f64 = self.runs.iter().map(|r| r.alive_node_hours).sum();
        self.false_suspicions() as f64 / up
    }

    fn missed(&self) -> u64 {
        self.runs.iter().map(|r| r.missed).sum()
    }

    fn mean_interval_ms(&self) -> f64 {
        self.runs.iter().map(|r| r.mean_interval_ms).sum::<f64>() / self.runs.len() as f64
    }

    /// What the nodes of profile `k` did, pooled.
    fn profile(&self, k: usize) -> Option<ProfileOutcome> {
        let name = self.runs.first()?.profiles.get(k)?.profile.clone();
        let (mut hb, mut node_s, mut up_h, mut fs, mut missed) = (0.0, 0.0, 0.0, 0, 0);
        let mut det = Vec::new();
        for r in &self.runs {
            let p = r.profiles.get(k)?;
            let ns = p.nodes as f64 * r.duration_s;
            hb += p.heartbeats_per_node_s * ns;
            node_s += ns;
            up_h += p.alive_node_hours;
            fs += p.false_suspicions;
            missed += p.missed;
            det.extend_from_slice(&p.detections_ms);
        }
        Some(ProfileOutcome {
            name,
            rate: hb / node_s,
            p99: p99_counting_missed(det, missed),
            fs,
            fs_per_node_hour: fs as f64 / up_h,
        })
    }

    fn outcome(&self) -> Outcome {
        let profiles = self.runs.first().map_or(0, |r| r.profiles.len());
        Outcome {
            rate: self.rate(),
            p99: self.p99(),
            fs: self.false_suspicions(),
            missed: self.missed(),
            profiles: if profiles > 1 {
                (0..profiles).filter_map(|k| self.profile(k)).collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// The p99 of `detections` with `missed` more that never came.
fn p99_counting_missed(mut detections: Vec<f64>, missed: u64) -> f64 {
    detections.extend((0..missed).map(|_| f64::INFINITY));
    Summary::of(detections).p99
}

/// What the nodes of one profile of a mixed fleet did.
#[derive(Clone, Debug)]
struct ProfileOutcome {
    name: String,
    rate: f64,
    /// Missed crashes counted (see [`Pooled::p99`]).
    p99: f64,
    fs: u64,
    fs_per_node_hour: f64,
}

/// What the verdict looks at.
#[derive(Clone, Debug)]
struct Outcome {
    rate: f64,
    /// Missed crashes counted (see [`Pooled::p99`]).
    p99: f64,
    fs: u64,
    missed: u64,
    /// Each profile in a fleet of several (empty for one): the fleet's
    /// p99 is its slowest profile's tail, and its false suspicions mostly
    /// its noisiest profile's; either can hold while every other
    /// profile's gets worse.
    profiles: Vec<ProfileOutcome>,
}

impl Outcome {
    /// One seed's run alone.
    fn of(r: &SimReport) -> Outcome {
        Pooled {
            runs: vec![r.clone()],
        }
        .outcome()
    }
}

/// Whether `q` false suspicions are within the noise of the fixed
/// interval's `f` ([`FS_REL`], [`FS_ABS`]).
fn fs_within(f: u64, q: u64) -> bool {
    q as f64 <= f as f64 * (1.0 + FS_REL) + FS_ABS
}

/// A p99 in ms for the tables: a p99 that is a missed crash shows as such.
fn ms(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "missed".into()
    }
}

/// `q` against `base` in percent, for the tables.
fn pct(q: f64, base: f64) -> String {
    match (q.is_finite(), base.is_finite()) {
        (true, true) => format!("{:+.0}%", (q / base - 1.0) * 100.0),
        (false, true) => "+inf".into(),
        (true, false) => "-inf".into(),
        (false, false) => "=".into(),
    }
}

/// One baseline and the controller matched to it.
struct Pair {
    fixed_ms: u32,
    target_ms: f64,
    qlearn: Pooled,
}

/// What one unit of work produced.
enum Done {
    /// A baseline on every evaluation seed.
    Fixed(u32, Pooled),
    /// A level of the grid on the first `--frontier-seeds` seeds.
    Level(u32, Pooled),
    /// A controller trained for a target, evaluated on every seed.
    Pair(Pair),
    /// The controller at its default target.
    Default(Pooled),
}

#[derive(Clone, Copy)]
enum Job {
    Fixed(usize, u32),
    Level(usize, u32),
    Pair(usize, u32),
    Default(usize),
}

impl Job {
    fn scenario(self) -> usize {
        match self {
            Job::Fixed(s, _) | Job::Level(s, _) | Job::Pair(s, _) | Job::Default(s) => s,
        }
    }

    fn name(self, scenarios: &[Scenario]) -> String {
        let s = scenarios[self.scenario()].name;
        match self {
            Job::Fixed(_, ms) => format!("{s} fixed {ms} ms"),
            Job::Level(_, ms) => format!("{s} grid level {ms} ms"),
            Job::Pair(_, ms) => format!("{s} qlearn against fixed {ms} ms"),
            Job::Default(_) => format!("{s} qlearn at its default target"),
        }
    }

    /// A rough cost, to start the long jobs first.
    fn cost(self) -> f64 {
        match self {
            Job::Fixed(_, ms) | Job::Level(_, ms) => 1000.0 / ms as f64 + 0.5,
            Job::Pair(_, ms) => 1000.0 / ms as f64 + 4.0,
            Job::Default(_) => 4.0,
        }
    }
}

fn controller(target_ms: f64, o: &Opts) -> anyhow::Result<QController> {
    QController::new(Config {
        target_detection_ms: target_ms,
        seed: o.seed,
        weights: o.weights.unwrap_or_default(),
        ..Config::default()
    })
    .map_err(anyhow::Error::msg)
}

/// Trains a controller on the training seed, then evaluates a copy of it
/// (greedy) on every evaluation seed.
fn train_and_evaluate(s: &Scenario, target_ms: f64, o: &Opts) -> anyhow::Result<Pooled> {
    let mut c = controller(target_ms, o)?;
    if o.train_hours > 0.0 {
        c.set_epsilon(None);
        run_policy(
            &o.sim(s, o.train_seed(), o.train_hours),
            &mut Policy::QLearn(&mut c),
        )?;
    }
    c.set_epsilon(Some(0.0));
    let mut pooled = Pooled::default();
    for seed in o.eval_seeds() {
        let mut copy = c.clone();
        pooled.runs.push(run_policy(
            &o.sim(s, seed, o.hours),
            &mut Policy::QLearn(&mut copy),
        )?);
    }
    Ok(pooled)
}

/// A fixed interval on the first `seeds` evaluation seeds.
fn fixed_on_eval_seeds(s: &Scenario, ms: u32, seeds: u64, o: &Opts) -> anyhow::Result<Pooled> {
    let mut pooled = Pooled::default();
    for seed in o.eval_seeds().take(seeds as usize) {
        pooled.runs.push(run_policy(
            &o.sim(s, seed, o.hours),
            &mut Policy::Fixed(ms),
        )?);
    }
    Ok(pooled)
}

fn run_job(job: Job, scenarios: &[Scenario], o: &Opts) -> anyhow::Result<Done> {
    let s = &scenarios[job.scenario()];
    Ok(match job {
        Job::Fixed(_, ms) => Done::Fixed(ms, fixed_on_eval_seeds(s, ms, o.seeds, o)?),
        Job::Level(_, ms) => Done::Level(
            ms,
            fixed_on_eval_seeds(s, ms, o.frontier_seeds.min(o.seeds), o)?,
        ),
        Job::Pair(_, ms) => {
            let reference = run_policy(
                &o.sim(s, o.train_seed(), o.reference_hours()),
                &mut Policy::Fixed(ms),
            )?;
            // The target: what this fixed interval delivered on the
            // training seed (see the module docs for why not +5%).
            // Missed crashes count, as in the verdict.
            let target_ms =
                p99_counting_missed(reference.detections_ms.clone(), reference.missed).round();
            anyhow::ensure!(
                target_ms.is_finite(),
                "{}: fixed:{ms} missed more than 1% of its crashes on the training seed: no target to match",
                s.name
            );
            Done::Pair(Pair {
                fixed_ms: ms,
                target_ms,
                qlearn: train_and_evaluate(s, target_ms, o)?,
            })
        }
        Job::Default(_) => Done::Default(train_and_evaluate(
            s,
            Config::default().target_detection_ms,
            o,
        )?),
    })
}

/// The issue's goal for one comparison, with one tolerance for "the same
/// p99": within 5% either way. "Matches the p99" is at most 5% above it;
/// "detects faster" is more than 5% below it (at most 5% more heartbeats).
/// A missed crash is in the p99 as a detection that never comes, and a
/// controller that misses more crashes than the fixed interval fails. Its
/// false suspicions may exceed the fixed interval's by the noise
/// tolerance ([`fs_within`]). In a fleet of several profiles, the p99
/// and the false suspicions of each profile are held to the same rules.
fn verdict(f: &Outcome, q: &Outcome) -> String {
    let (fp, qp) = (f.p99, q.p99);
    // A fixed interval whose p99 is a crash it missed leaves nothing to
    // match: any p99 would be "within 5%" of it.
    if !fp.is_finite() {
        return format!(
            "FAIL (not comparable: the fixed interval's p99 is a crash it missed, {} missed)",
            f.missed
        );
    }
    let (fr, qr) = (f.rate, q.rate);
    // In a fleet of several profiles, "the same p99" holds for each of
    // them, not only for the pooled tail (set by the slowest profile).
    let slower_profiles: Vec<String> = f
        .profiles
        .iter()
        .zip(&q.profiles)
        .filter(|(fp, qp)| !fp.p99.is_finite() || qp.p99 > fp.p99 * 1.05)
        .map(|(fp, qp)| match fp.p99.is_finite() {
            true => format!("{} p99 {}", fp.name, pct(qp.p99, fp.p99)),
            false => format!("{} p99 not comparable (fixed missed its crashes)", fp.name),
        })
        .collect();
    let noisier_profiles: Vec<String> = f
        .profiles
        .iter()
        .zip(&q.profiles)
        .filter(|(fp, qp)| !fs_within(fp.fs, qp.fs))
        .map(|(fp, qp)| format!("{} {} against {}", fp.name, qp.fs, fp.fs))
        .collect();
    let matched = qp <= fp * 1.05 && qr <= fr * 0.6;
    let faster = qp < fp * 0.95 && qr <= fr * 1.05;
    let mut why = Vec::new();
    if !(matched || faster) {
        if qp > fp * 1.05 {
            why.push(format!("p99 {}", pct(qp, fp)));
        } else if qp >= fp * 0.95 && qr <= fr * 1.05 {
            why.push(format!("same p99 ({})", pct(qp, fp)));
        }
        if qr > fr * 0.6 {
            why.push(format!("rate {:+.0}%", (qr / fr - 1.0) * 100.0));
        }
    }
    if q.missed > f.missed {
        why.push(format!("misses {} crashes, fixed {}", q.missed, f.missed));
    }
    if !fs_within(f.fs, q.fs) {
        why.push(format!("more false suspicions ({} against {})", q.fs, f.fs));
    }
    if !noisier_profiles.is_empty() {
        why.push(format!(
            "more false suspicions on {}",
            noisier_profiles.join(", ")
        ));
    }
    if !slower_profiles.is_empty() && (matched || faster) {
        why.push(format!(
            "the fleet's p99 holds, not its profiles': {}",
            slower_profiles.join(", ")
        ));
    }
    if why.is_empty() {
        if matched {
            "PASS (same p99, >=40% fewer)".into()
        } else {
            "PASS (faster p99, same rate)".into()
        }
    } else {
        format!("FAIL ({})", why.join(", "))
    }
}

/// The verdict as stops 6 and 7 computed it: any p99 below the fixed
/// interval's, by however little, counted as "detects faster". Between
/// seeds the p99 moves by several percent, so a controller that merely
/// ties passed or failed by the toss of a coin (`load-spikes` and
/// `pauses` at 100 ms: p99 -0%, PASS on one or two of three seeds).
fn passes_before_stop_8(f: &Outcome, q: &Outcome) -> bool {
    let matched = q.p99 <= f.p99 * 1.05 && q.rate <= f.rate * 0.6;
    let faster = q.p99 < f.p99 && q.rate <= f.rate * 1.05;
    (matched || faster) && q.fs <= f.fs
}

/// Share of the sorted sample `d` above `t`.
fn share_above(d: &[f64], t: f64) -> f64 {
    if d.is_empty() {
        return 0.0;
    }
    (d.len() - d.partition_point(|&x| x <= t)) as f64 / d.len() as f64
}

/// The least mean heartbeat rate of a time-mix of `levels` (rate, sorted
/// detection times) with at most `Q99` of its crashes detected later than
/// `t`; `None` if no mix gets there. A linear program in the mix
/// fractions with two constraints (they sum to 1; the late share is at
/// most `Q99`), so an optimum mixes at most two levels: the cheapest level
/// within the late budget alone, or one level under the budget with one
/// over it, in the proportion that spends the budget exactly.
fn least_rate_of_a_mix(levels: &[(f64, Vec<f64>)], t: f64) -> Option<f64> {
    let p: Vec<f64> = levels.iter().map(|(_, d)| share_above(d, t)).collect();
    let mut best: Option<f64> = None;
    let mut keep = |r: f64| best = Some(best.map_or(r, |b: f64| b.min(r)));
    for (i, (ri, _)) in levels.iter().enumerate() {
        if p[i] > Q99 {
            continue;
        }
        keep(*ri);
        for (j, (rj, _)) in levels.iter().enumerate() {
            if p[j] > Q99 {
                let f = (Q99 - p[i]) / (p[j] - p[i]);
                keep((1.0 - f) * ri + f * rj);
            }
        }
    }
    best
}

/// The least p99 a mix of `levels` reaches at a mean rate of at most
/// `rate` (bisection on the target: the least rate is non-increasing in
/// it).
fn best_p99_of_a_mix(levels: &[(f64, Vec<f64>)], rate: f64) -> Option<f64> {
    // The largest finite detection (a missed crash is +infinity).
    let max = levels
        .iter()
        .flat_map(|(_, d)| d.iter().copied().filter(|x| x.is_finite()))
        .fold(0.0f64, f64::max);
    let ok = |t: f64| least_rate_of_a_mix(levels, t).is_some_and(|r| r <= rate);
    if !ok(max) {
        return None;
    }
    let (mut lo, mut hi) = (0.0, max);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if ok(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

struct ScenarioResult {
    scenario: Scenario,
    fixed: Vec<(u32, Pooled)>,
    /// Every grid level (with `--frontier`), on the frontier seeds.
    levels: Vec<(u32, Pooled)>,
    pairs: Vec<Pair>,
    default_q: Option<Pooled>,
}

impl ScenarioResult {
    fn fixed(&self, ms: u32) -> Option<&Pooled> {
        self.fixed.iter().find(|(l, _)| *l == ms).map(|(_, p)| p)
    }
}

fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let scenarios: Vec<Scenario> = if o.scenarios.is_empty() {
        Scenario::all()
    } else {
        o.scenarios
            .iter()
            .map(|n| Scenario::named(n).with_context(|| format!("unknown scenario {n}")))
            .collect::<anyhow::Result<_>>()?
    };
    let levels = Config::default().grid().levels_ms;
    let mut jobs = Vec::new();
    for i in 0..scenarios.len() {
        for ms in BASELINES {
            jobs.push(Job::Fixed(i, ms));
            jobs.push(Job::Pair(i, ms));
        }
        if o.frontier {
            for &ms in &levels {
                jobs.push(Job::Level(i, ms));
            }
        }
        jobs.push(Job::Default(i));
    }
    jobs.sort_by(|a, b| b.cost().total_cmp(&a.cost()));

    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(Job, anyhow::Result<Done>)>> = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..o.threads.max(1) {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&job) = jobs.get(i) else { break };
                    let t0 = Instant::now();
                    let r = run_job(job, &scenarios, &o);
                    if std::env::var_os("HB_BENCH_TRACE").is_some() {
                        eprintln!(
                            "{:>7.1} s  {}",
                            t0.elapsed().as_secs_f64(),
                            job.name(&scenarios)
                        );
                    }
                    done.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((job, r));
                }
            });
        }
    });
    let mut results: Vec<ScenarioResult> = scenarios
        .iter()
        .map(|s| ScenarioResult {
            scenario: s.clone(),
            fixed: Vec::new(),
            levels: Vec::new(),
            pairs: Vec::new(),
            default_q: None,
        })
        .collect();
    for (job, done) in done.into_inner().unwrap_or_else(|e| e.into_inner()) {
        let r = &mut results[job.scenario()];
        match r_or(job, done)? {
            Done::Fixed(ms, p) => r.fixed.push((ms, p)),
            Done::Level(ms, p) => r.levels.push((ms, p)),
            Done::Pair(p) => r.pairs.push(p),
            Done::Default(p) => r.default_q = Some(p),
        }
    }
    for r in &mut results {
        r.fixed.sort_by_key(|(ms, _)| *ms);
        r.levels.sort_by_key(|(ms, _)| *ms);
        r.pairs.sort_by_key(|p| p.fixed_ms);
    }
    let wall = started.elapsed().as_secs_f64();

    let seeds: Vec<String> = o.eval_seeds().map(|s| s.to_string()).collect();
    println!("## Controller: Q-learning against fixed intervals\n");
    println!(
        "`cargo run --release -p hb-tests --bin bench_controller -- --nodes {} --seed {} --seeds {} --hours {} --train-hours {}`: \
         {} nodes for {} simulated hour(s) on each of {} evaluation seeds ({}); targets from {} h of each fixed interval \
         and {} h of training on the training seed {}; phi threshold 8, tick 100 ms, one decision per node per 5 s; \
         wall time {:.0} s.\n",
        o.nodes,
        o.seed,
        o.seeds,
        o.hours,
        o.train_hours,
        o.nodes,
        o.hours,
        o.seeds,
        seeds.join(", "),
        o.reference_hours(),
        o.train_hours,
        o.train_seed(),
        wall
    );
    println!(
        "Each fixed interval's p99 detection time on the training seed is the matched controller's \
         target. Goal per row: qlearn's p99 at most 5% above the fixed interval's with >=40% fewer \
         heartbeats, or more than 5% below it at <=5% more heartbeats; no more missed crashes (a missed \
         crash is in the p99 as a detection that never comes: `missed` where it is the p99); and false \
         suspicions (FS) within their noise: at most the fixed interval's +{:.0}% +{:.0} (pooled counts); \
         in a fleet of several profiles (`mixed`), the p99 and the false suspicions of each profile too, not only \
         the fleet's (whose tail is its slowest profile's, and whose FS mostly its noisiest profile's). \
         Figures pool every evaluation seed; `seeds` counts the seeds on which that seed's runs alone \
         give the same verdict.\n",
        FS_REL * 100.0,
        FS_ABS
    );
    println!(
        "| scenario | fixed | hb/node/s | det mean ms | det p99 ms | FS/node-h | qlearn target ms | hb/node/s | det mean ms | det p99 ms | FS/node-h | heartbeats | p99 | verdict | seeds | old rule |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|");
    let (mut pass, mut robust, mut old_pass, mut total) = (0, 0, 0, 0);
    for r in &results {
        for p in &r.pairs {
            let Some(f) = r.fixed(p.fixed_ms) else {
                continue;
            };
            let q = &p.qlearn;
            let v = verdict(&f.outcome(), &q.outcome());
            let agree = f
                .runs
                .iter()
                .zip(&q.runs)
                .filter(|(fr, qr)| {
                    verdict(&Outcome::of(fr), &Outcome::of(qr)).starts_with("PASS")
                        == v.starts_with("PASS")
                })
                .count();
            let old = passes_before_stop_8(&f.outcome(), &q.outcome());
            total += 1;
            pass += v.starts_with("PASS") as usize;
            robust += (v.starts_with("PASS") && agree == q.runs.len()) as usize;
            old_pass += old as usize;
            let (fd, qd) = (f.detection(), q.detection());
            println!(
                "| {} | fixed:{} | {:.3} | {:.0} | {} | {:.2} | {:.0} | {:.3} | {:.0} | {} | {:.2} | {:+.0}% | {} | {} | {}/{} | {} |",
                r.scenario.name,
                p.fixed_ms,
                f.rate(),
                fd.mean,
                ms(f.p99()),
                f.fs_per_node_hour(),
                p.target_ms,
                q.rate(),
                qd.mean,
                ms(q.p99()),
                q.fs_per_node_hour(),
                (q.rate() / f.rate() - 1.0) * 100.0,
                pct(q.p99(), f.p99()),
                v,
                agree,
                q.runs.len(),
                if old { "PASS" } else { "FAIL" }
            );
        }
    }
    println!(
        "\nGoal met in {pass} of {total} comparisons ({robust} of them on every seed alone); \
         by the rule before stop 8 (`old rule`: any lower p99 counts as faster) in {old_pass}.\n"
    );

    for r in results.iter().filter(|r| r.scenario.profiles.len() > 1) {
        println!(
            "### `{}` by node profile: where each policy spends its heartbeats\n",
            r.scenario.name
        );
        println!("hb/node/s, det p99 ms, FS/node-h of each profile's nodes (pooled seeds).\n");
        println!("| profile | fixed | fixed: hb / p99 / FS | qlearn: hb / p99 / FS | heartbeats |");
        println!("|---|---|---:|---:|---:|");
        for p in &r.pairs {
            let Some(f) = r.fixed(p.fixed_ms) else {
                continue;
            };
            for k in 0..r.scenario.profiles.len() {
                let (Some(fp), Some(qp)) = (f.profile(k), p.qlearn.profile(k)) else {
                    continue;
                };
                println!(
                    "| {} | fixed:{} | {:.3} / {} / {:.2} | {:.3} / {} / {:.2} | {:+.0}% |",
                    fp.name,
                    p.fixed_ms,
                    fp.rate,
                    ms(fp.p99),
                    fp.fs_per_node_hour,
                    qp.rate,
                    ms(qp.p99),
                    qp.fs_per_node_hour,
                    (qp.rate / fp.rate - 1.0) * 100.0
                );
            }
        }
        println!();
    }

    if o.frontier {
        println!("### The mixture bound: what any mix of fixed levels reaches\n");
        println!(
            "From every fixed level's detection times on the evaluation seeds (table below): the least \
             heartbeat rate of any time-mix of levels whose p99 is within 5% of the fixed interval's, and \
             the least p99 of any mix at <=5% more heartbeats. On `lan` and `load-spikes` no policy on the \
             grid does better than a mix, so where the least rate is above -40% the first half of the goal \
             is out of reach for every policy; elsewhere a policy that reacts to disruptions can beat it.\n"
        );
        println!(
            "| scenario | fixed | hb/node/s | det p99 ms | least hb/node/s of a mix at p99 <= +5% | vs fixed | least p99 of a mix at <= +5% hb | vs fixed |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|");
        let fseeds = o.frontier_seeds.min(o.seeds) as usize;
        for r in &results {
            let grid: Vec<(f64, Vec<f64>)> = r
                .levels
                .iter()
                .map(|(_, p)| (p.rate(), p.detections_counting_missed()))
                .collect();
            for ms in BASELINES {
                let Some(f) = r.fixed(ms) else { continue };
                // The baseline on the same seeds as the levels.
                let f = Pooled {
                    runs: f.runs.iter().take(fseeds).cloned().collect(),
                };
                let (fr, fp) = (f.rate(), f.p99());
                let least = least_rate_of_a_mix(&grid, fp * 1.05);
                let best = best_p99_of_a_mix(&grid, fr * 1.05);
                let pct = |x: Option<f64>, base: f64| {
                    x.map_or("-".to_string(), |x| {
                        format!("{:+.0}%", (x / base - 1.0) * 100.0)
                    })
                };
                println!(
                    "| {} | fixed:{} | {:.3} | {:.0} | {} | {} | {} | {} |",
                    r.scenario.name,
                    ms,
                    fr,
                    fp,
                    least.map_or("-".into(), |x| format!("{x:.3}")),
                    pct(least, fr),
                    best.map_or("-".into(), |x| format!("{x:.0}")),
                    pct(best, fp),
                );
            }
        }
        println!();
    }

    println!(
        "### qlearn at its default target ({:.0} ms)\n",
        Config::default().target_detection_ms
    );
    println!(
        "| scenario | hb/node/s | det mean ms | det p99 ms | missed | FS/node-h | mean interval ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        let Some(q) = &r.default_q else { continue };
        let d = q.detection();
        println!(
            "| {} | {:.3} | {:.0} | {:.0} | {} | {:.2} | {:.0} |",
            r.scenario.name,
            q.rate(),
            d.mean,
            q.p99(),
            q.missed(),
            q.fs_per_node_hour(),
            q.mean_interval_ms()
        );
    }
    if o.frontier {
        println!(
            "\n### Every fixed level of the grid (the first {} evaluation seed(s))\n",
            o.frontier_seeds.min(o.seeds)
        );
        println!("hb/node/s, det p99 ms, FS/node-h per fixed interval.\n");
        print!("| scenario |");
        for l in &levels {
            print!(" {l} |");
        }
        println!();
        print!("|---|");
        for _ in &levels {
            print!("---:|");
        }
        println!();
        for r in &results {
            print!("| {} |", r.scenario.name);
            for (_, f) in &r.levels {
                print!(
                    " {:.3} / {:.0} / {:.1} |",
                    f.rate(),
                    f.p99(),
                    f.fs_per_node_hour()
                );
            }
            println!();
        }
    }
    println!("\nScenarios:\n");
    for r in &results {
        println!("- `{}`: {}", r.scenario.name, r.scenario.about);
    }
    Ok(())
}

/// A job's result, or its error naming the job.
fn r_or(job: Job, r: anyhow::Result<Done>) -> anyhow::Result<Done> {
    r.with_context(|| match job {
        Job::Fixed(s, ms) => format!("scenario #{s}, fixed {ms} ms"),
        Job::Level(s, ms) => format!("scenario #{s}, grid level {ms} ms"),
        Job::Pair(s, ms) => format!("scenario #{s}, qlearn against fixed {ms} ms"),
        Job::Default(s) => format!("scenario #{s}, qlearn at its default target"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One run of 100 nodes for an hour: `sent` heartbeats, the crashes
    /// of each profile (`(name, detection times, missed, false
    /// suspicions)`).
    fn run(sent: u64, profiles: &[(&str, Vec<f64>, u64, u64)]) -> SimReport {
        let all: Vec<f64> = profiles.iter().flat_map(|p| p.1.clone()).collect();
        let missed = profiles.iter().map(|p| p.2).sum();
        let fs = profiles.iter().map(|p| p.3).sum();
        SimReport {
            scenario: "test".into(),
            controller: "test".into(),
            seed: 1,
            nodes: 100,
            duration_s: 3600.0,
            heartbeats_sent: sent,
            heartbeats_lost: 0,
            acks_sent: 0,
            heartbeats_per_node_s: sent as f64 / 360_000.0,
            crashes: all.len() as u64 + missed,
            missed,
            detection_ms: Summary::of(all.clone()),
            detections_ms: all,
            false_suspicions: fs,
            false_suspicions_per_node_hour: fs as f64 / 100.0,
            alive_node_hours: 100.0,
            mean_interval_ms: 1000.0,
            trajectory: Vec::new(),
            controller_state: None,
            profiles: profiles
                .iter()
                .map(
                    |(name, det, missed, fs)| hb::simulate::engine::ProfileReport {
                        profile: name.to_string(),
                        nodes: 100 / profiles.len() as u32,
                        heartbeats_per_node_s: sent as f64 / 360_000.0,
                        detection_ms: Summary::of(det.clone()),
                        detections_ms: det.clone(),
                        missed: *missed,
                        false_suspicions: *fs,
                        false_suspicions_per_node_hour: *fs as f64 / 100.0,
                        alive_node_hours: 100.0 / profiles.len() as f64,
                    },
                )
                .collect(),
            interval_share: Vec::new(),
        }
    }

    fn verdict_of(f: SimReport, q: SimReport) -> String {
        let pooled = |r| Pooled { runs: vec![r] };
        verdict(&pooled(f).outcome(), &pooled(q).outcome())
    }

    #[test]
    fn a_missed_crash_is_a_detection_that_never_comes() {
        let fixed = || run(360_000, &[("lan", vec![1000.0; 200], 0, 0)]);
        // Half the heartbeats and not one crash detected: no detection
        // time at all is not a p99 of 0.
        let v = verdict_of(fixed(), run(180_000, &[("lan", vec![], 200, 0)]));
        assert!(v.starts_with("FAIL"), "{v}");
        // Three crashes of 200 missed: the p99 is one of them.
        let mut det = vec![900.0; 197];
        let v = verdict_of(fixed(), run(180_000, &[("lan", det.clone(), 3, 0)]));
        assert!(v.starts_with("FAIL") && v.contains("p99"), "{v}");
        // One missed: the p99 is a detection, but it misses more crashes
        // than the fixed interval.
        det.push(900.0);
        det.push(900.0);
        let v = verdict_of(fixed(), run(180_000, &[("lan", det.clone(), 1, 0)]));
        assert!(v.starts_with("FAIL") && v.contains("miss"), "{v}");
        det.push(900.0);
        let v = verdict_of(fixed(), run(180_000, &[("lan", det, 0, 0)]));
        assert!(v.starts_with("PASS"), "{v}");
        // A fixed interval that itself misses 3 of 200: its p99 is a
        // missed crash, and no p99 is "the same" as that, even one that
        // misses as many at 50 s.
        let missing = || run(360_000, &[("lan", vec![1000.0; 197], 3, 0)]);
        let v = verdict_of(
            missing(),
            run(180_000, &[("lan", vec![50_000.0; 197], 3, 0)]),
        );
        assert!(v.starts_with("FAIL") && v.contains("not comparable"), "{v}");
    }

    #[test]
    fn false_suspicions_are_compared_within_their_noise_and_per_profile() {
        let det = || vec![1000.0; 200];
        let fixed = |fs| run(360_000, &[("lan", det(), 0, fs)]);
        let q = |fs| run(180_000, &[("lan", det(), 0, fs)]);
        // Within 5% and 3 of the fixed interval's: noise, not a failure.
        assert!(verdict_of(fixed(100), q(104)).starts_with("PASS"));
        assert!(verdict_of(fixed(0), q(3)).starts_with("PASS"));
        assert!(verdict_of(fixed(100), q(109)).starts_with("FAIL"));
        // A mixed fleet: as many in all, but three times those of the wan
        // nodes.
        let mixed = |sent, lan, wan| run(sent, &[("lan", det(), 0, lan), ("wan", det(), 0, wan)]);
        let v = verdict_of(mixed(360_000, 100, 10), mixed(180_000, 80, 30));
        assert!(v.starts_with("FAIL") && v.contains("wan"), "{v}");
        assert!(verdict_of(mixed(360_000, 100, 10), mixed(180_000, 100, 10)).starts_with("PASS"));
    }
}

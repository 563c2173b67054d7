//! `hb simulate`: a deterministic, faster-than-real-time simulation of a
//! fleet of senders, a network and the monitor's detector and controller,
//! to see what a controller does before it runs on real nodes.
//!
//! The same seed gives the same run, byte for byte (stdout; the wall time
//! goes to stderr); every policy compared on a seed faces the same paths,
//! loss bursts, congestion, crash times, stalls and load spikes, all of
//! them functions of time, not of how often a node sends. The code under
//! test is the production code (see [`engine`]): the sender is `hb
//! send`'s, the gate, the detector, the state machine and the controller
//! are the monitor's.
//!
//! `qlearn` runs first train (by default for two simulated hours, on a
//! different seed of the same scenario, exploring), then the reported run
//! evaluates the learned greedy policy (epsilon 0; it keeps learning from
//! what it sees, as it would in the monitor). `--explore` keeps exploring
//! during the evaluation; `--train 0s` reports learning from scratch.
//!
//! The library entry points ([`run_policy`], [`run_qlearn`]) are what
//! `cargo xtask bench controller` calls.

pub mod engine;
pub mod scenario;

use std::{fmt::Write as _, io::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context, bail};

pub use engine::{Policy, SimConfig, SimReport, Summary, TrajectoryPoint};
pub use scenario::Scenario;

use crate::{
    controller::{self, QController},
    monitor::{config, state::Thresholds},
};

/// Salt of the training run's seed: training never sees the evaluated run.
const TRAIN_SALT: u64 = 0x7261_696e_696e_6721;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Scenario: lan, wan, bursty-loss, congestion, load-spikes, pauses,
    /// mixed (`--list` describes them).
    #[arg(long, default_value = "lan")]
    pub scenario: String,
    /// `qlearn` or `fixed:MS` (every node asked to use MS).
    #[arg(long, default_value = "qlearn")]
    pub controller: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated time of the reported run, e.g. `1h`, `30m`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Fleet size (at most the monitor's largest capacity, 2^20 nodes).
    #[arg(long, default_value_t = 100)]
    pub nodes: u32,
    /// qlearn: simulated training time before the reported run (0s = none).
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    pub train: Duration,
    /// qlearn: keep exploring (decaying epsilon) in the reported run.
    #[arg(long)]
    pub explore: bool,
    /// qlearn: the 99th-percentile crash-to-suspicion time the controller
    /// aims for, ms.
    #[arg(long, default_value_t = controller::Config::default().target_detection_ms)]
    pub target_ms: f64,
    /// qlearn: load this table before training if the file exists, save
    /// the learned table to it at the end.
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// Phi at which the monitor suspects a node (its `suspect_phi`; its
    /// `dead_phi` is raised to it when below). The monitor's other
    /// thresholds keep their defaults, the max-silence backstop among them.
    #[arg(long, default_value_t = 8.0)]
    pub threshold: f64,
    /// The monitor's tick, ms (1 to 60000, as the monitor's --tick-ms).
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// One controller decision per node per this period (1 ms to 1 h, as
    /// the monitor's --decision-ms; shorter than the tick: every node on
    /// every tick).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub decision_period: Duration,
    /// Controller bounds, ms (within 100-10000, as the monitor's
    /// --controller-bounds-ms).
    #[arg(long, default_value_t = 100)]
    pub min_interval_ms: u32,
    #[arg(long, default_value_t = 10_000)]
    pub max_interval_ms: u32,
    /// qlearn: multiplicative step of one action.
    #[arg(long, default_value_t = controller::Config::default().step)]
    pub step: f64,
    /// qlearn: reward weights `late,over,cost,load,false_suspicion`
    /// (see `hb::controller`); default `50,1,1,1,5`.
    #[arg(long, value_parser = parse_weights)]
    pub weights: Option<controller::Weights>,
    /// Print the report (with the full interval trajectory) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Describe the shipped scenarios and exit.
    #[arg(long)]
    pub list: bool,
}

/// `qlearn` or `fixed:MS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerChoice {
    QLearn,
    Fixed(u32),
}

impl std::str::FromStr for ControllerChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        if s == "qlearn" {
            return Ok(ControllerChoice::QLearn);
        }
        if let Some(ms) = s.strip_prefix("fixed:") {
            let ms: u32 = ms
                .parse()
                .with_context(|| format!("--controller {s}: MS must be a number of ms"))?;
            // The monitor's `--fixed-interval-ms` range: outside it, the
            // senders clamped the interval and the run was labelled with
            // one that no node ran.
            use crate::monitor::config::hb_common_bounds::{MAX, MIN};
            if !(MIN..=MAX).contains(&ms) {
                bail!("--controller {s}: the interval must be between {MIN} and {MAX} ms");
            }
            return Ok(ControllerChoice::Fixed(ms));
        }
        bail!("--controller {s}: expected `qlearn` or `fixed:MS`")
    }
}

pub fn parse_weights(s: &str) -> anyhow::Result<controller::Weights> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--weights {s}: expected five numbers"))?;
    let [late, over, cost, load, false_suspicion] = v[..] else {
        bail!("--weights {s}: expected five numbers: late,over,cost,load,false_suspicion");
    };
    if v.iter().any(|x| !x.is_finite() || *x < 0.0) {
        bail!("--weights {s}: weights must be finite and non-negative");
    }
    Ok(controller::Weights {
        late,
        over,
        cost,
        load,
        false_suspicion,
    })
}

/// The monitor's thresholds with `suspect_phi` at `threshold` (`dead_phi`
/// raised to it when below, so that the monitor would accept them).
pub fn thresholds(threshold: f64) -> anyhow::Result<Thresholds> {
    let d = Thresholds::default();
    let t = Thresholds {
        suspect_phi: threshold,
        dead_phi: d.dead_phi.max(threshold),
        ..d
    };
    t.validate()
        .map_err(|e| anyhow::anyhow!("--threshold {threshold}: {e}"))?;
    Ok(t)
}

/// A run under a fixed interval.
pub fn run_policy(cfg: &SimConfig, policy: &mut Policy<'_>) -> anyhow::Result<SimReport> {
    engine::run(cfg, policy)
}

/// Trains `ctrl` for `train_s` simulated seconds on the scenario under
/// another seed (exploring), then runs `cfg` with the greedy policy
/// (`explore` keeps epsilon's schedule instead). Returns the training
/// report (if any) and the evaluation report.
pub fn run_qlearn(
    cfg: &SimConfig,
    ctrl: &mut QController,
    train_s: f64,
    explore: bool,
) -> anyhow::Result<(Option<SimReport>, SimReport)> {
    let train = if train_s > 0.0 {
        let mut t = cfg.clone();
        t.seed = cfg.seed ^ TRAIN_SALT;
        t.duration_s = train_s;
        ctrl.set_epsilon(None);
        Some(engine::run(&t, &mut Policy::QLearn(ctrl))?)
    } else {
        None
    };
    ctrl.set_epsilon(if explore { None } else { Some(0.0) });
    let eval = engine::run(cfg, &mut Policy::QLearn(ctrl))?;
    ctrl.set_epsilon(None);
    Ok((train, eval))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let text = output(&a)?;
    crate::output::stdout(&text)?;
    // On stderr: stdout is the same for the same seed, byte for byte.
    if !a.list {
        let _ = writeln!(
            std::io::stderr(),
            "(simulated in {:.1} s)",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// What `hb simulate` prints on stdout: a pure function of the arguments.
fn output(a: &Args) -> anyhow::Result<String> {
    if a.list {
        return Ok(Scenario::all()
            .iter()
            .map(|s| format!("{:<12} {}\n", s.name, s.about))
            .collect());
    }
    let scenario = Scenario::named(&a.scenario).with_context(|| {
        format!(
            "unknown scenario {:?}; shipped: {}",
            a.scenario,
            scenario::NAMES.join(", ")
        )
    })?;
    let choice: ControllerChoice = a.controller.parse()?;
    // The monitor's ranges, before the controller is built on them (a
    // run checks its own configuration too, `--nodes` among it).
    let decision_ms = u64::try_from(a.decision_period.as_millis()).unwrap_or(u64::MAX);
    config::check_tick_ms(a.tick_ms).context("--tick-ms")?;
    config::check_decision_ms(decision_ms).context("--decision-period")?;
    config::check_controller_bounds(a.min_interval_ms, a.max_interval_ms)
        .context("--min-interval-ms, --max-interval-ms")?;
    let mut cfg = SimConfig::new(scenario, a.nodes, a.duration.as_secs_f64(), a.seed);
    cfg.thresholds = thresholds(a.threshold)?;
    cfg.tick_ms = a.tick_ms;
    cfg.decision_period_ms = decision_ms;
    let (train, report, ctrl) = match choice {
        ControllerChoice::Fixed(ms) => (None, run_policy(&cfg, &mut Policy::Fixed(ms))?, None),
        ControllerChoice::QLearn => {
            let mut ctrl = QController::new(controller::Config {
                min_interval_ms: a.min_interval_ms,
                max_interval_ms: a.max_interval_ms,
                step: a.step,
                target_detection_ms: a.target_ms,
                threshold: a.threshold,
                tick_ms: a.tick_ms as f64,
                decision_period_ms: a.decision_period.as_secs_f64() * 1000.0,
                seed: a.seed,
                weights: a.weights.unwrap_or_default(),
                ..controller::Config::default()
            })
            .map_err(|e| anyhow::anyhow!("controller configuration: {e}"))?;
            if let Some(p) = &a.table
                && p.exists()
            {
                ctrl.load(p)?;
            }
            let (train, eval) = run_qlearn(&cfg, &mut ctrl, a.train.as_secs_f64(), a.explore)?;
            if let Some(p) = &a.table {
                ctrl.save(p)?;
            }
            (train, eval, Some(ctrl))
        }
    };
    let mut text = String::new();
    if a.json {
        let doc = serde_json::json!({
            "report": report,
            "training": train,
            "scenario": cfg.scenario,
            "controller_config": ctrl.as_ref().map(|c| c.config().clone()),
        });
        text = serde_json::to_string_pretty(&doc)?;
        text.push('\n');
    } else {
        if let Some(t) = &train {
            let _ = writeln!(text, "training ({} s on another seed):", t.duration_s);
            text.push_str(&render(t, false));
            text.push('\n');
        }
        text.push_str(&render(&report, true));
    }
    Ok(text)
}

/// The report as text; the trajectory summarised.
pub fn render(r: &SimReport, trajectory: bool) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "scenario {} | controller {} | seed {} | {} nodes | {:.0} s",
        r.scenario, r.controller, r.seed, r.nodes, r.duration_s
    );
    let _ = writeln!(
        o,
        "heartbeats/node/s {:.3} (sent {}, lost {}, acks {})",
        r.heartbeats_per_node_s, r.heartbeats_sent, r.heartbeats_lost, r.acks_sent
    );
    let d = &r.detection_ms;
    let _ = writeln!(
        o,
        "crashes {} detected {} missed {} | detection ms mean {:.0} p50 {:.0} p99 {:.0} max {:.0}",
        r.crashes, d.count, r.missed, d.mean, d.p50, d.p99, d.max
    );
    let _ = writeln!(
        o,
        "false suspicions {} ({:.3} per node-hour up)",
        r.false_suspicions, r.false_suspicions_per_node_hour
    );
    let _ = writeln!(o, "mean interval {:.0} ms", r.mean_interval_ms);
    let shares: Vec<String> = r
        .interval_share
        .iter()
        .filter(|(_, share)| *share >= 0.005)
        .map(|(ms, share)| format!("{ms} ms {:.0}%", share * 100.0))
        .collect();
    let _ = writeln!(o, "time at each interval: {}", shares.join(", "));
    if r.profiles.len() > 1 {
        for p in &r.profiles {
            let _ = writeln!(
                o,
                "  {:<10} {:>4} nodes | heartbeats/node/s {:.3} | detection ms mean {:.0} p99 {:.0} | false suspicions {:.3} per node-hour up",
                p.profile,
                p.nodes,
                p.heartbeats_per_node_s,
                p.detection_ms.mean,
                p.detection_ms.p99,
                p.false_suspicions_per_node_hour
            );
        }
    }
    if let Some(c) = &r.controller_state {
        let _ = writeln!(
            o,
            "controller: target {:.0} ms, {} decisions, epsilon {:.3}, mean reward {:.4}, {} states visited",
            c.target_detection_ms, c.decisions, c.epsilon, c.reward_mean, c.visited_states
        );
    }
    if trajectory && !r.trajectory.is_empty() {
        let _ = writeln!(o, "interval trajectory (ms; fleet min / p50 / mean / max):");
        let n = r.trajectory.len();
        let picks: Vec<usize> = (0..6).map(|i| i * (n - 1) / 5).collect();
        let mut last = usize::MAX;
        for i in picks {
            if i == last {
                continue;
            }
            last = i;
            let p = &r.trajectory[i];
            let _ = writeln!(
                o,
                "  t={:>6.0}s  {:>5} / {:>5} / {:>7.0} / {:>5}",
                p.t_s, p.min_ms, p.p50_ms, p.mean_ms, p.max_ms
            );
        }
    }
    o
}

#[cfg(test)]
mod tests;

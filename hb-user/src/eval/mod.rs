//! `hb eval`: replay heartbeat arrival traces through hb's detector and the
//! published ones, and score them with Chen-Toueg-Aguilera QoS metrics;
//! `hb eval gen`: write deterministic synthetic traces.
//!
//! The point is an honest comparison: the same arrivals, the same crash
//! times, exact step-function replay (`qos`), each detector at its own
//! thresholds (`detectors`). hb's detector runs the monitor's code, its
//! `--max-silence-ms` backstop included; the others follow their papers or sources, cited where they are built.
//! chitchat's detector cannot be driven by a trace through its public API
//! and is reported as such (see `detectors`).

pub mod detectors;
pub mod profile;
pub mod qos;
pub mod synth;
pub mod trace;

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{Context, bail};

use self::{
    detectors::{HbConfig, Kind, Spec},
    qos::Qos,
    synth::{GenOpts, Scenario},
    trace::Trace,
};

/// What `hb eval` says about chitchat, in its table and JSON.
pub const CHITCHAT_STATUS: &str = "chitchat: not evaluated; chitchat 0.13.0 keeps its FailureDetector in a private module, fed by its gossip loop with tokio::time::Instant::now(), so a trace cannot drive it";

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    // Boxed: the replay flags are many, and `hb`'s command enum holds
    // every subcommand's arguments inline.
    #[command(flatten)]
    pub replay: Box<ReplayArgs>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Write a deterministic synthetic trace: DIR/<scenario>.csv and
    /// DIR/<scenario>.crashes.csv.
    Gen(GenArgs),
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Arrival trace: CSV `node_id,recv_ns[,interval_ms[,seq]]`, sorted by
    /// recv_ns.
    #[arg(long, required = true, value_name = "FILE.csv")]
    pub trace: Option<PathBuf>,
    /// Crash times: CSV `node_id,crash_ns`. Crashes of nodes absent from
    /// the trace, or after its end, are ignored (with a warning).
    #[arg(long, value_name = "FILE.csv")]
    pub crashes: Option<PathBuf>,
    /// Detector to replay (repeatable): hb, fixed, chen, phi-normal, akka,
    /// cassandra. Default: all.
    #[arg(long = "detector", value_name = "NAME")]
    pub detectors: Vec<String>,
    /// Thresholds, `NAME=T1,T2,...` (repeatable), or `T1,T2,...` with a
    /// single --detector. phi for hb/phi-normal/akka/cassandra, timeout ms
    /// for fixed, alpha ms for chen.
    #[arg(long = "threshold", value_name = "[NAME=]LIST")]
    pub thresholds: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// hb: floor of the standard deviation, ms (PhiParams::min_std_dev_ms).
    #[arg(long, value_name = "MS")]
    pub hb_min_std_ms: Option<f64>,
    /// hb: floor of the standard deviation as a fraction of the mean.
    #[arg(long, value_name = "RATIO")]
    pub hb_min_std_ratio: Option<f64>,
    /// hb: acceptable pause added to the mean, ms.
    #[arg(long, value_name = "MS")]
    pub hb_pause_ms: Option<f64>,
    /// hb: multiple of a node's recurring stall it may be silent for
    /// before it can be late (PhiParams::stall_factor; 0 = off).
    #[arg(long, value_name = "FACTOR")]
    pub hb_stall_factor: Option<f64>,
    /// hb: a recurring stall longer than this earns no allowance
    /// (PhiParams::max_stall_ms; 0 = no limit), as `hb monitor
    /// --max-stall-ms`.
    #[arg(long, value_name = "MS")]
    pub hb_max_stall_ms: Option<f64>,
    /// hb: EWMA gain of the mean as a shift (gain 1/2^N); a what-if, the
    /// kernel's is fixed at build time.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=16))]
    pub hb_mean_shift: Option<u32>,
    /// hb: EWMA gain of the deviation as a shift (gain 1/2^N).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=16))]
    pub hb_dev_shift: Option<u32>,
    /// hb: suspected (dead) after this silence whatever phi says, as `hb
    /// monitor --max-silence-ms` (its backstop): no crash is detected
    /// later than this. 0 = off, else at least 1000 [default: 60000].
    #[arg(long, value_name = "MS")]
    pub max_silence_ms: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct GenArgs {
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    #[arg(long)]
    pub seed: u64,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub nodes: u32,
    /// Length of the trace, e.g. 90s, 30m, 2h.
    #[arg(long, default_value = "1h", value_parser = synth::parse_duration)]
    pub duration: u64,
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Some(Cmd::Gen(g)) => run_gen(g),
        None => run_replay(*args.replay),
    }
}

fn run_gen(g: GenArgs) -> anyhow::Result<()> {
    let (trace, crashes) = synth::generate(&GenOpts {
        scenario: g.scenario,
        seed: g.seed,
        nodes: g.nodes,
        duration_ns: g.duration,
    });
    std::fs::create_dir_all(&g.out)
        .with_context(|| format!("cannot create {}", g.out.display()))?;
    let name = g.scenario.name();
    let tp = g.out.join(format!("{name}.csv"));
    let cp = g.out.join(format!("{name}.crashes.csv"));
    let f = std::fs::File::create(&tp).with_context(|| format!("cannot write {}", tp.display()))?;
    trace
        .write(f)
        .with_context(|| format!("cannot write {}", tp.display()))?;
    let f = std::fs::File::create(&cp).with_context(|| format!("cannot write {}", cp.display()))?;
    trace::write_crashes(&crashes, f).with_context(|| format!("cannot write {}", cp.display()))?;
    tracing::info!(
        scenario = name,
        seed = g.seed,
        nodes = g.nodes,
        arrivals = trace.arrivals(),
        crashes = crashes.len(),
        trace = %tp.display(),
        "trace written"
    );
    Ok(())
}

/// The hb configuration the flags ask for (defaults: the monitor's), with
/// the checks the monitor makes of the same settings (`monitor::config`):
/// a setting it would refuse is refused here, rather than replayed as a
/// detector no monitor runs.
fn hb_config(a: &ReplayArgs) -> anyhow::Result<HbConfig> {
    let mut c = HbConfig::default();
    if let Some(v) = a.hb_min_std_ms {
        c.phi.min_std_dev_ms = v;
    }
    if let Some(v) = a.hb_min_std_ratio {
        c.phi.min_std_dev_ratio = v;
    }
    if let Some(v) = a.hb_pause_ms {
        c.phi.acceptable_pause_ms = v;
    }
    if let Some(v) = a.hb_stall_factor {
        c.phi.stall_factor = v;
    }
    if let Some(v) = a.hb_max_stall_ms {
        c.phi.max_stall_ms = v;
    }
    if let Some(v) = a.hb_mean_shift {
        c.mean_shift = v;
    }
    if let Some(v) = a.hb_dev_shift {
        c.dev_shift = v;
    }
    if let Some(v) = a.max_silence_ms {
        crate::monitor::config::check_max_silence_ms(v).context("--max-silence-ms")?;
        c.max_silence_ms = v;
    }
    if !c.phi.is_valid() {
        bail!(
            "--hb-min-std-ms, --hb-min-std-ratio, --hb-pause-ms, --hb-stall-factor and --hb-max-stall-ms must be non-negative numbers, and --hb-min-std-ms or --hb-min-std-ratio positive (as the monitor requires)"
        );
    }
    Ok(c)
}

fn parse_list(s: &str) -> anyhow::Result<Vec<f64>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .with_context(|| format!("threshold {x:?} is not a number"))
        })
        .collect()
}

/// The detectors and thresholds the flags ask for.
pub fn specs(a: &ReplayArgs) -> anyhow::Result<Vec<Spec>> {
    let mut kinds = Vec::new();
    for d in &a.detectors {
        let k = Kind::parse(d)?;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        kinds = Kind::ALL.to_vec();
    }
    let mut given: BTreeMap<Kind, Vec<f64>> = BTreeMap::new();
    for t in &a.thresholds {
        match t.split_once('=') {
            Some((name, list)) => {
                let k = Kind::parse(name.trim())?;
                if !kinds.contains(&k) {
                    bail!("--threshold {t}: detector {} is not selected", k.name());
                }
                given.entry(k).or_default().extend(parse_list(list)?);
            }
            None if kinds.len() == 1 => given.entry(kinds[0]).or_default().extend(parse_list(t)?),
            None => bail!(
                "--threshold {t}: thresholds mean different things per detector; write NAME=LIST (e.g. hb=8,12 or fixed=3000)"
            ),
        }
    }
    let hb = hb_config(a)?;
    kinds
        .into_iter()
        .map(|k| {
            let ts = given.remove(&k).unwrap_or_else(|| k.default_thresholds());
            Ok(Spec::new(k, &ts, hb)?)
        })
        .collect()
}

fn run_replay(a: ReplayArgs) -> anyhow::Result<()> {
    let Some(path) = &a.trace else {
        bail!("--trace is required");
    };
    let specs = specs(&a)?;
    let trace = Trace::read_path(path).with_context(|| format!("trace {}", path.display()))?;
    let crashes = match &a.crashes {
        Some(p) => {
            let c = trace::read_crashes_path(p)
                .with_context(|| format!("crash file {}", p.display()))?;
            let late = trace::sending_after_crash(&trace, &c);
            if late > 0 {
                tracing::warn!(
                    file = %p.display(),
                    nodes = late,
                    "nodes keep sending more than a minute after their crash_ns (crash times on another clock?); their crashes are scored as detected late, or missed"
                );
            }
            c
        }
        None => Default::default(),
    };
    let ignored = crashes
        .keys()
        .filter(|id| !trace.nodes.contains_key(id))
        .count();
    if ignored > 0 {
        tracing::warn!(
            crashes = ignored,
            "crashes of nodes that never appear in the trace are ignored"
        );
    }
    let after_end = trace::crashes_after_end(&trace, &crashes);
    if after_end > 0 {
        tracing::warn!(
            crashes = after_end,
            end_ns = trace.end_ns,
            "crashes after the end of the trace are ignored (their nodes were up for all of it; crash times on another clock?)"
        );
    }
    let results: Vec<Qos> = specs
        .iter()
        .flat_map(|s| qos::evaluate(&trace, &crashes, s))
        .collect();
    if a.json {
        let out = serde_json::json!({
            "trace": path.display().to_string(),
            "nodes": trace.nodes.len(),
            "arrivals": trace.arrivals(),
            "chitchat": CHITCHAT_STATUS,
            "results": results,
        });
        return crate::output::stdout(&format!("{}\n", serde_json::to_string_pretty(&out)?));
    }
    let hours = results.first().map_or(0.0, |q| q.node_hours);
    crate::output::stdout(&format!(
        "trace {}: {} nodes, {} arrivals, {:.1} node-hours alive, {} crashes\n{CHITCHAT_STATUS}\n\n{}",
        path.display(),
        trace.nodes.len(),
        trace.arrivals(),
        hours,
        results.first().map_or(0, |q| q.crashes),
        table(&results),
    ))
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

/// A markdown table of QoS rows.
pub fn table(rows: &[Qos]) -> String {
    let mut s = String::from(
        "| detector | threshold | T_D mean ms | T_D p99 ms | detected | mistakes/node-h | T_M ms | P_A |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for q in rows {
        let unit = Kind::parse(q.detector).map_or("", |k| k.threshold_unit());
        s.push_str(&format!(
            "| {} | {} {} | {} | {} | {}/{} | {:.4} | {} | {:.6} |\n",
            q.detector,
            q.threshold,
            unit,
            opt(q.td_mean_ms, 0),
            opt(q.td_p99_ms, 0),
            q.detected,
            q.crashes,
            q.mistake_rate,
            opt(q.tm_mean_ms, 0),
            q.query_accuracy,
        ));
    }
    s
}

#[cfg(test)]
mod tests;

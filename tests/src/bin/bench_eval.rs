//! Detector quality benchmark (`cargo xtask bench eval`, or
//! `cargo run --release -p hb-tests --bin bench_eval`): prints a markdown
//! section for BENCHMARKS.md.
//!
//! For every scenario of `hb eval gen`, traces of `--nodes` nodes over two
//! hours are generated in memory under each of `--seeds` seeds (the same
//! code as the CLI; every fifth node crashes). The seeds' nodes together
//! are one fleet. Each detector's operating point is its threshold with
//! the shortest mean detection time among those that detect every crash
//! with at most one mistake per node per day (`BUDGET`) over the whole
//! fleet: solved exactly for the detectors whose deadline is affine in one
//! parameter (hb, fixed, chen, phi-normal, cassandra: the least threshold
//! meeting the budget, an order statistic of the per-heartbeat critical
//! thresholds), on a three-level grid for akka. The table's rows are then
//! replayed event by event at those thresholds.
//!
//! hb is compared with the best published detector of each scenario (the
//! shortest mean T_D over the fleet). The uncertainty of that comparison
//! comes from a stratified bootstrap over nodes (`--replicates`
//! resamples of the fleet's crashed and live nodes, with replacement;
//! each resample's operating points are solved anew for both detectors, so
//! the interval covers the noise of the mistake-budget threshold, which
//! dominates, and that of the crash sample): the 95% percentile interval
//! of hb's mean (and p99) T_D over the best's. Each seed's fleet alone is
//! also a replicate (per-seed ratios, at each seed's own operating
//! points).
//!
//! Verdicts, with a tolerance of 1% for "no worse" (1% of the shipped
//! scenarios' detection times, 15 ms to 100 ms, is at most one tick of the
//! monitor's default 100 ms tick, the resolution at which it acts):
//! `better` when the interval lies below 1.00, `no worse` when it lies
//! at or below 1.01, `worse` when it lies above 1.01, `undecided` when it
//! straddles 1.01.
//!
//! `bench_eval --explore` also grid-searches hb's tunables (the stall
//! factor and the std floor of PhiParams, the EWMA gains) and prints, per
//! candidate, its mean T_D against the best published detector on every
//! scenario.

use std::time::Instant;

use hb::{
    detector::PhiParams,
    eval::{
        detectors::{HbConfig, Kind, Spec},
        profile::{Point, Profile, resamples},
        qos::{Qos, best_under_budget, evaluate_fleet},
        synth::{GenOpts, Scenario, generate},
        trace::{Crashes, Trace},
    },
};

/// Seeds 1..=SEEDS.
const SEEDS: u64 = 5;
/// Nodes per seed.
const NODES: u32 = 200;
const DURATION_NS: u64 = 2 * 3600 * 1_000_000_000;
/// One mistake per node per day, in mistakes per node-hour.
const BUDGET: f64 = 1.0 / 24.0;
/// Bootstrap resamples.
const REPLICATES: usize = 1000;
/// "No worse" means a ratio of at most 1 + TOLERANCE.
const TOLERANCE: f64 = 0.01;

struct Opts {
    first_seed: u64,
    seeds: u64,
    nodes: u32,
    replicates: usize,
    scenarios: Vec<Scenario>,
    explore: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        first_seed: 1,
        seeds: SEEDS,
        nodes: NODES,
        replicates: REPLICATES,
        scenarios: Scenario::ALL.to_vec(),
        explore: false,
    };
    let mut picked = Vec::new();
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_eval [--first-seed S] [--seeds N] [--nodes N] [--replicates N] [--scenario NAME]... [--explore]";
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> String {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value; {usage}"))
        };
        match a.as_str() {
            "--first-seed" => o.first_seed = value("--first-seed").parse().expect("--first-seed S"),
            "--seeds" => o.seeds = value("--seeds").parse().expect("--seeds N"),
            "--nodes" => o.nodes = value("--nodes").parse().expect("--nodes N"),
            "--replicates" => o.replicates = value("--replicates").parse().expect("--replicates N"),
            "--scenario" => {
                let v = value("--scenario");
                let s = Scenario::ALL
                    .into_iter()
                    .find(|s| s.name() == v)
                    .unwrap_or_else(|| panic!("unknown scenario {v}"));
                picked.push(s);
            }
            "--explore" => o.explore = true,
            _ => panic!("unknown argument {a}; {usage}"),
        }
    }
    if !picked.is_empty() {
        o.scenarios = picked;
    }
    assert!(o.seeds > 0 && o.nodes >= 5, "{usage}");
    o
}

/// Runs `f` over `items` on two threads (the machine has two cores),
/// keeping the order.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<std::sync::Mutex<Option<R>>> = items.iter().map(|_| Default::default()).collect();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    *out[i].lock().expect("no panics") = Some(f(item));
                }
            });
        }
    });
    out.into_iter()
        .map(|m| m.into_inner().expect("no panics").expect("every item ran"))
        .collect()
}

fn fmt_thr(t: f64) -> String {
    format!("{}", (t * 1e4).round() / 1e4)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// One scenario's fleet: the traces of every seed.
struct Fleet {
    scenario: Scenario,
    cases: Vec<(Trace, Crashes)>,
}

impl Fleet {
    fn refs(&self) -> Vec<(&Trace, &Crashes)> {
        self.cases.iter().map(|(t, c)| (t, c)).collect()
    }
    fn arrivals(&self) -> usize {
        self.cases.iter().map(|(t, _)| t.arrivals()).sum()
    }
}

/// A detector's replayed row at the fleet's operating point `p`: the
/// exact scoring (T_M, P_A included). For the affine detectors the
/// threshold is nudged upward as `qos::optimum` does, so rounding in its
/// conversion cannot tip a borderline heartbeat.
fn replayed(fleet: &Fleet, kind: Kind, hb: HbConfig, p: &Point) -> Option<Qos> {
    let thresholds: Vec<f64> = match kind.u_of_threshold(p.threshold) {
        Some(u) => {
            let scale = u.abs().max(1.0);
            let mut t: Vec<f64> = [0.0, 1e-9, 1e-6, 1e-4]
                .iter()
                .filter_map(|d| kind.threshold_of_u(u + d * scale))
                .filter(|&t| kind.check(t).is_ok())
                .collect();
            t.dedup();
            t
        }
        None => vec![p.threshold],
    };
    let spec = Spec::new(kind, &thresholds, hb).ok()?;
    best_under_budget(&evaluate_fleet(&fleet.refs(), &spec), BUDGET).cloned()
}

/// The 2.5% and 97.5% points of `v` (sorted in place).
fn interval(v: &mut [f64]) -> (f64, f64) {
    v.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.025), at(0.975))
}

fn verdict(lo: f64, hi: f64) -> &'static str {
    if hi < 1.0 {
        "better"
    } else if hi <= 1.0 + TOLERANCE {
        "no worse"
    } else if lo > 1.0 + TOLERANCE {
        "worse"
    } else {
        "undecided"
    }
}

/// What the summary says about one scenario.
struct Summary {
    scenario: Scenario,
    crashes: usize,
    hb: Option<Point>,
    best: Option<(Kind, Point)>,
    /// Bootstrap intervals of hb / best: mean, p99; resamples where a
    /// point was clipped at a profile's cutoff.
    mean_ci: Option<(f64, f64)>,
    p99_ci: Option<(f64, f64)>,
    clipped: usize,
    per_seed: Vec<Option<f64>>,
}

fn main() {
    let o = opts();
    let t0 = Instant::now();
    let seeds: Vec<u64> = (o.first_seed..o.first_seed + o.seeds).collect();
    let fleets: Vec<Fleet> = o
        .scenarios
        .iter()
        .map(|&scenario| Fleet {
            scenario,
            cases: par_map(&seeds, |&seed| {
                generate(&GenOpts {
                    scenario,
                    seed,
                    nodes: o.nodes,
                    duration_ns: DURATION_NS,
                })
            }),
        })
        .collect();

    println!("## Detector quality (`hb eval`)\n");
    println!(
        "Command: `cargo run --release -p hb-tests --bin bench_eval` (part of `cargo xtask bench eval`; \
         here with `-- --first-seed {} --seeds {} --nodes {} --replicates {}`; the defaults are 1, {SEEDS}, {NODES} and {REPLICATES}). Each scenario is `hb eval gen \
         --scenario NAME --seed S --nodes {} --duration 2h` for S = {}..={}, every fifth node crashing; the seeds' {} nodes are one \
         fleet, replayed exactly (event-driven) through every detector. Operating point: the threshold with the \
         shortest mean detection time T_D among those that detect every crash with at most one mistake per node \
         per day ({BUDGET:.4} per node-hour) over the fleet, solved exactly (the least threshold meeting the \
         budget: an order statistic of the per-heartbeat critical thresholds) for every detector but akka, whose \
         history depends on the threshold (a three-level log grid); each row is then replayed at its threshold. \
         `-`: no threshold qualifies. hb runs the monitor's detector with its current defaults ({:?}; kernel: EWMA \
         gains 1/2^{} and 1/2^{}, errors clipped to 1/2^{} of the mean, stalls decaying by 1/2^{} per sample; \
         dead after {} ms of silence whatever phi says, `--max-silence-ms`) and reads the traces' sequence numbers, as Chen's NFD-E does; the other detectors see arrival times only.\n",
        o.first_seed,
        o.seeds,
        o.nodes,
        o.replicates,
        o.nodes,
        o.first_seed,
        o.first_seed + o.seeds - 1,
        o.seeds * o.nodes as u64,
        PhiParams::default(),
        hb_common::maps::IA_MEAN_SHIFT,
        hb_common::maps::IA_DEV_SHIFT,
        hb_common::maps::IA_CLIP_SHIFT,
        hb_common::maps::STALL_DECAY_SHIFT,
        HbConfig::default().max_silence_ms,
    );
    println!("{}\n", hb::eval::CHITCHAT_STATUS);
    println!(
        "| scenario | arrivals | crashes | detector | threshold | T_D mean ms | T_D p99 ms | mistakes/node-day | T_M ms | P_A |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|");

    let hb = HbConfig::default();
    let mut summaries = Vec::new();
    for fleet in &fleets {
        let refs = fleet.refs();
        let profiles: Vec<Profile> = par_map(&Kind::ALL, |&k| Profile::build(&refs, k, hb, BUDGET));
        let everyone: Vec<usize> = (0..profiles[0].nodes.len()).collect();
        let points: Vec<Option<Point>> = profiles
            .iter()
            .map(|p| p.point(&everyone, BUDGET))
            .collect();
        let rows: Vec<Option<Qos>> = par_map(&Kind::ALL, |&k| {
            let i = Kind::ALL.iter().position(|&x| x == k).expect("a kind");
            points[i].as_ref().and_then(|p| replayed(fleet, k, hb, p))
        });
        let crashes = profiles[0].nodes.iter().filter(|n| n.crashed).count();
        for (kind, row) in Kind::ALL.iter().zip(&rows) {
            match row {
                Some(q) => println!(
                    "| {} | {} | {} | {} | {} {} | {} | {} | {:.3} | {} | {:.7} |",
                    fleet.scenario.name(),
                    fleet.arrivals(),
                    q.crashes,
                    kind.name(),
                    fmt_thr(q.threshold),
                    kind.threshold_unit(),
                    fmt_ms(q.td_mean_ms),
                    fmt_ms(q.td_p99_ms),
                    q.mistake_rate * 24.0,
                    fmt_ms(q.tm_mean_ms),
                    q.query_accuracy,
                ),
                None => println!(
                    "| {} | {} | {} | {} | - | - | - | - | - | - |",
                    fleet.scenario.name(),
                    fleet.arrivals(),
                    crashes,
                    kind.name(),
                ),
            }
        }

        let hb_i = 0;
        debug_assert_eq!(Kind::ALL[hb_i], Kind::Hb);
        let best = (1..Kind::ALL.len())
            .filter_map(|i| points[i].as_ref().map(|p| (i, p)))
            .min_by(|a, b| a.1.mean_ms().total_cmp(&b.1.mean_ms()));
        let mut s = Summary {
            scenario: fleet.scenario,
            crashes,
            hb: points[hb_i].clone(),
            best: best.map(|(i, p)| (Kind::ALL[i], p.clone())),
            mean_ci: None,
            p99_ci: None,
            clipped: 0,
            per_seed: Vec::new(),
        };
        if let (Some(_), Some((bi, _))) = (&points[hb_i], best) {
            let (h, b) = (&profiles[hb_i], &profiles[bi]);
            s.per_seed = h
                .cases
                .iter()
                .map(|r| {
                    let nodes: Vec<usize> = r.clone().collect();
                    let (ph, pb) = (h.point(&nodes, BUDGET)?, b.point(&nodes, BUDGET)?);
                    Some(ph.mean_ms() / pb.mean_ms())
                })
                .collect();
            let crashed: Vec<bool> = h.nodes.iter().map(|n| n.crashed).collect();
            // Seeded by the scenario's name: the same resamples every run.
            let seed = fleet
                .scenario
                .name()
                .bytes()
                .fold(0x5eed_u64, |h, b| h.rotate_left(8) ^ b as u64);
            let draws = resamples(&crashed, o.replicates, seed);
            let ratios: Vec<Option<(f64, f64, bool)>> = par_map(&draws, |nodes| {
                let (ph, pb) = (h.point(nodes, BUDGET)?, b.point(nodes, BUDGET)?);
                Some((
                    ph.mean_ms() / pb.mean_ms(),
                    ph.p99_ms() / pb.p99_ms(),
                    ph.clipped || pb.clipped,
                ))
            });
            // A resample where a detector has no operating point counts as
            // a loss for that detector: infinite or zero ratio.
            let mut means = Vec::new();
            let mut p99s = Vec::new();
            for r in &ratios {
                match r {
                    Some((m, p, c)) => {
                        means.push(*m);
                        p99s.push(*p);
                        s.clipped += *c as usize;
                    }
                    None => {
                        means.push(f64::INFINITY);
                        p99s.push(f64::INFINITY);
                    }
                }
            }
            s.mean_ci = Some(interval(&mut means));
            s.p99_ci = Some(interval(&mut p99s));
        }
        summaries.push(s);
    }

    println!(
        "\nhb against the best published detector of each scenario (the shortest mean T_D over the fleet). \
         Intervals: 95% stratified bootstrap over nodes, {} resamples, every operating point solved anew in \
         each; per seed: each seed's {} nodes alone, at their own operating points. Verdict on the mean, \
         tolerance {:.0}%: `better` (interval below 1.00), `no worse` (at or below {:.2}), `worse` (above \
         {:.2}), `undecided` (straddles {:.2}).\n",
        o.replicates,
        o.nodes,
        TOLERANCE * 100.0,
        1.0 + TOLERANCE,
        1.0 + TOLERANCE,
        1.0 + TOLERANCE,
    );
    println!(
        "| scenario | crashes | hb T_D mean / p99 ms | best published | its T_D mean / p99 ms | hb / best, mean [95% CI] | per seed | hb / best, p99 [95% CI] | verdict |"
    );
    println!("|---|---:|---:|---|---:|---:|---|---:|---|");
    for s in &summaries {
        let hb_txt = s.hb.as_ref().map_or("-".into(), |p| {
            format!("{:.0} / {:.0}", p.mean_ms(), p.p99_ms())
        });
        let (best_name, best_txt) = match &s.best {
            Some((k, p)) => (k.name(), format!("{:.0} / {:.0}", p.mean_ms(), p.p99_ms())),
            None => ("none qualifies", "-".into()),
        };
        let ratio = |p: fn(&Point) -> f64, ci: Option<(f64, f64)>| match (&s.hb, &s.best, ci) {
            (Some(h), Some((_, b)), Some((lo, hi))) => {
                format!("{:.3} [{lo:.3}, {hi:.3}]", p(h) / p(b))
            }
            _ => "-".into(),
        };
        let per_seed = s
            .per_seed
            .iter()
            .map(|r| r.map_or("-".into(), |r| format!("{r:.3}")))
            .collect::<Vec<_>>()
            .join(", ");
        let v = match (&s.hb, s.mean_ci) {
            (Some(_), Some((lo, hi))) => verdict(lo, hi),
            (Some(_), None) => "better (no published detector qualifies)",
            (None, _) => "worse (hb does not qualify)",
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}{} |",
            s.scenario.name(),
            s.crashes,
            hb_txt,
            best_name,
            best_txt,
            ratio(Point::mean_ms, s.mean_ci),
            per_seed,
            ratio(Point::p99_ms, s.p99_ci),
            v,
            if s.clipped > 0 {
                format!(" ({} resamples clipped)", s.clipped)
            } else {
                String::new()
            },
        );
    }
    println!(
        "\nGoal (issue 5): hb no worse than the best published detector on every scenario, better on gc-pause and \
         interval-change. Ratio < 1: hb detects faster at the same mistake budget.\n"
    );

    if o.explore {
        explore_hb(&fleets, &summaries);
    }
    eprintln!("bench_eval: {:.1} s", t0.elapsed().as_secs_f64());
}

/// Grid search over hb's tunables; prints every candidate's mean T_D per
/// scenario as a ratio to the best published detector (lower is better,
/// `inf`: no threshold meets the budget).
fn explore_hb(fleets: &[Fleet], summaries: &[Summary]) {
    // The stall allowance's factor (0: none) and the EWMA gains.
    let mut candidates = Vec::new();
    for (ms, ds) in [(5, 4), (5, 5), (6, 5)] {
        for &factor in &[0.0, 1.0, 1.5, 2.0, 2.5, 3.0] {
            candidates.push(HbConfig {
                phi: PhiParams {
                    stall_factor: factor,
                    ..PhiParams::default()
                },
                mean_shift: ms,
                dev_shift: ds,
                ..HbConfig::default()
            });
        }
    }
    for &ratio in &[0.05, 0.2] {
        candidates.push(HbConfig {
            phi: PhiParams {
                min_std_dev_ratio: ratio,
                ..PhiParams::default()
            },
            ..HbConfig::default()
        });
    }
    println!("### hb tunables: mean (p99) T_D as a ratio to the best published detector's\n");
    print!("| ratio | min ms | stall factor | gains |");
    for f in fleets {
        print!(" {} |", f.scenario.name());
    }
    println!(" worst |");
    println!("|{}", "---|".repeat(5 + fleets.len()));
    let jobs: Vec<(HbConfig, usize)> = candidates
        .iter()
        .flat_map(|&c| (0..fleets.len()).map(move |i| (c, i)))
        .collect();
    let points = par_map(&jobs, |&(cfg, i)| {
        let p = Profile::build(&fleets[i].refs(), Kind::Hb, cfg, BUDGET);
        let all: Vec<usize> = (0..p.nodes.len()).collect();
        p.point(&all, BUDGET).map(|p| (p.mean_ms(), p.p99_ms()))
    });
    for (n, cfg) in candidates.iter().enumerate() {
        let mut worst: f64 = 0.0;
        let mut cells = Vec::new();
        for (i, s) in summaries.iter().enumerate() {
            let (r, r99) = match (points[n * fleets.len() + i], &s.best) {
                (Some((h, h99)), Some((_, b))) => (h / b.mean_ms(), h99 / b.p99_ms()),
                (Some(_), None) => (0.0, 0.0),
                (None, _) => (f64::INFINITY, f64::INFINITY),
            };
            worst = worst.max(r);
            cells.push(format!("{r:.3} ({r99:.2})"));
        }
        println!(
            "| {} | {} | {} | 1/2^{},1/2^{} | {} | {worst:.3} |",
            cfg.phi.min_std_dev_ratio,
            cfg.phi.min_std_dev_ms,
            cfg.phi.stall_factor,
            cfg.mean_shift,
            cfg.dev_shift,
            cells.join(" | "),
        );
    }
}

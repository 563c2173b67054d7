//! Per-node outcomes of a detector over one or more traces, so that the
//! operating point of any fleet made of those nodes (all of them, one
//! seed's nodes, a bootstrap resample) is found without another replay:
//! the statistics behind `bench_eval`'s confidence intervals.
//!
//! A [`Profile`] holds, per node, what decides its mistakes and its
//! detection time as a function of the detector's threshold:
//! - for the detectors whose deadline is affine in one parameter `u`
//!   (`Detector::affine`: hb, fixed, chen, phi-normal, cassandra), the
//!   node's critical values (after heartbeat `i`, the detector errs exactly
//!   when `u < c_i`, see [`qos::optimum`](super::qos::optimum)) and the
//!   deadline after its last heartbeat if it crashed. The operating point
//!   of a fleet is then an order statistic of its nodes' critical values,
//!   as in `qos::optimum`. Only the largest critical values can matter
//!   (a fleet allows few mistakes), so a profile keeps those above a cutoff
//!   far below any operating point it will be asked for;
//! - for the others (akka, whose history depends on the threshold), the
//!   node's score at every threshold of a three-level grid refined around
//!   the whole fleet's operating point, as in `qos::sweep`.
//!
//! [`Profile::point`] is checked against `qos::optimum` and `qos::sweep`
//! on the whole fleet in the tests.

use std::ops::Range;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    detectors::{Affine, HbConfig, Kind, Spec, after, geometric},
    qos::{NodeScore, alive_window, critical_values, percentile, replay_node},
    trace::{Crashes, Trace, crash_in},
};

/// Where a crashed node's final suspicion starts, for an affine detector.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Final {
    deadline: Affine,
    crash_ns: u64,
    /// End of the node's trace: a suspicion starting at or after it is no
    /// detection.
    end_ns: u64,
}

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Affine {
        /// The node's critical values at or above the profile's cutoff,
        /// in descending order.
        critical: Vec<f64>,
        /// For a crashed node: its final deadline, `None` if the detector
        /// had no deadline after the last heartbeat (never detected).
        last: Option<Final>,
    },
    /// The node's score at each threshold of the profile's grid.
    Grid(Vec<NodeScore>),
}

/// One node of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeProfile {
    /// Alive time: from its first heartbeat to its crash or the end.
    pub alive_ns: u64,
    pub crashed: bool,
    outcome: Outcome,
}

/// One detector's per-node outcomes over a fleet of traces.
#[derive(Clone, Debug)]
pub struct Profile {
    pub kind: Kind,
    pub hb: HbConfig,
    /// Thresholds of a grid profile (empty for an affine one).
    pub grid: Vec<f64>,
    /// Affine profiles: critical values below this were dropped.
    cutoff: f64,
    pub nodes: Vec<NodeProfile>,
    /// The nodes of each trace given to [`Profile::build`], in order.
    pub cases: Vec<Range<usize>>,
}

/// A fleet's operating point under a mistake budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub threshold: f64,
    pub mistakes: u64,
    pub node_hours: f64,
    pub crashes: usize,
    /// Detection times of the fleet's crashes, ms, ascending.
    pub td_ms: Vec<f64>,
    /// The least threshold lies below the profile's cutoff: the point is
    /// the cutoff's, a slightly later one (detection times over-estimated).
    /// Never happens for fleets like the one profiled.
    pub clipped: bool,
}

impl Point {
    pub fn mean_ms(&self) -> f64 {
        self.td_ms.iter().sum::<f64>() / self.td_ms.len().max(1) as f64
    }

    pub fn p99_ms(&self) -> f64 {
        percentile(&self.td_ms, 99.0).unwrap_or(f64::NAN)
    }
}

/// Mistakes a fleet of `node_hours` may make under `budget` (per
/// node-hour), as `qos::optimum` counts them.
pub fn allowed_mistakes(budget: f64, node_hours: f64) -> usize {
    (budget * node_hours * (1.0 + 1e-12)).floor() as usize
}

impl Profile {
    /// Replays every node of every case through `kind` (hb with `hb`) and
    /// keeps what any sub-fleet's operating point under `budget` needs.
    pub fn build(cases: &[(&Trace, &Crashes)], kind: Kind, hb: HbConfig, budget: f64) -> Profile {
        let mut ranges = Vec::with_capacity(cases.len());
        let mut nodes = Vec::new();
        let mut alive_total: u128 = 0;
        for (trace, crashes) in cases {
            for (id, arr) in &trace.nodes {
                if !arr.is_empty() {
                    let (s, e) = alive_window(arr, crash_in(trace, crashes, *id), trace.end_ns);
                    alive_total += (e - s) as u128;
                }
            }
        }
        let allowed = allowed_mistakes(budget, alive_total as f64 / 3.6e12);
        if kind.u_of_threshold(1.0).is_some() {
            // A sub-fleet needs at most its own allowance plus one of the
            // largest values; a resample of this fleet about as many as the
            // fleet. Four times that, for margin.
            let keep = 4 * allowed + 64;
            let spec = Spec::new(kind, &[], hb).expect("no thresholds to check");
            let mut scratch = Vec::new();
            for (trace, crashes) in cases {
                let first = nodes.len();
                for (id, arr) in &trace.nodes {
                    if arr.is_empty() {
                        continue;
                    }
                    let crash = crash_in(trace, crashes, *id);
                    let end = trace.end_ns;
                    let (start, alive_end) = alive_window(arr, crash, end);
                    scratch.clear();
                    let last = critical_values(&spec, arr, alive_end, end, |c| scratch.push(c));
                    if scratch.len() > keep {
                        scratch.select_nth_unstable_by(keep, |a, b| b.total_cmp(a));
                        scratch.truncate(keep);
                    }
                    scratch.sort_unstable_by(|a, b| b.total_cmp(a));
                    nodes.push(NodeProfile {
                        alive_ns: alive_end - start,
                        crashed: crash.is_some(),
                        outcome: Outcome::Affine {
                            critical: scratch.clone(),
                            last: crash.and_then(|c| {
                                last.map(|deadline| Final {
                                    deadline,
                                    crash_ns: c,
                                    end_ns: end,
                                })
                            }),
                        },
                    });
                }
                ranges.push(first..nodes.len());
            }
            // The fleet-wide cutoff: the keep-th largest value overall. A
            // node's dropped values are below it (the node alone has `keep`
            // values at or above its own keep-th).
            let mut all: Vec<f64> = nodes
                .iter()
                .flat_map(|n| match &n.outcome {
                    Outcome::Affine { critical, .. } => critical.as_slice(),
                    Outcome::Grid(_) => &[],
                })
                .copied()
                .collect();
            let cutoff = if all.len() > keep {
                *all.select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a))
                    .1
            } else {
                f64::NEG_INFINITY
            };
            for n in &mut nodes {
                if let Outcome::Affine { critical, .. } = &mut n.outcome {
                    critical.retain(|&c| c >= cutoff);
                    critical.shrink_to_fit();
                }
            }
            return Profile {
                kind,
                hb,
                grid: Vec::new(),
                cutoff,
                nodes,
                cases: ranges,
            };
        }

        // A grid, refined twice around the whole fleet's operating point
        // (as `qos::sweep` does on one trace).
        let (lo, hi) = kind.sweep_range();
        let mut grid = geometric(lo, hi, 28);
        let mut scores = replay_grid(cases, kind, hb, &grid);
        // Refinement: between the last threshold of the newest level that
        // misses the budget and the first that meets it, twice.
        let mut lo_hi = (0, grid.len());
        for _ in 0..2 {
            let (from, to) = lo_hi;
            let ok: Vec<bool> = (from..to)
                .map(|k| grid_qualifies(&scores, k, budget))
                .collect();
            let Some(i) = ok.iter().position(|&q| q) else {
                break;
            };
            if i == 0 {
                break;
            }
            let finer = geometric(grid[from + i - 1], grid[from + i], 16);
            let more = replay_grid(cases, kind, hb, &finer);
            let start = grid.len();
            grid.extend_from_slice(&finer);
            for (n, m) in scores.iter_mut().zip(more) {
                if let (Outcome::Grid(s), Outcome::Grid(extra)) = (&mut n.outcome, m.outcome) {
                    s.extend(extra);
                }
            }
            lo_hi = (start, grid.len());
        }
        let mut first = 0;
        for (trace, _) in cases {
            let n = trace.nodes.values().filter(|a| !a.is_empty()).count();
            ranges.push(first..first + n);
            first += n;
        }
        Profile {
            kind,
            hb,
            grid,
            cutoff: f64::NEG_INFINITY,
            nodes: scores,
            cases: ranges,
        }
    }

    /// The operating point of the fleet made of `nodes` (indices into
    /// [`Profile::nodes`], repeats allowed) under `budget` mistakes per
    /// node-hour: the least threshold meeting it (affine detectors, as
    /// `qos::optimum`), or the grid threshold with the shortest mean
    /// detection time among those meeting it (as `qos::sweep`). `None`
    /// when no threshold meets the budget and detects every crash.
    pub fn point(&self, nodes: &[usize], budget: f64) -> Option<Point> {
        let alive: u128 = nodes.iter().map(|&i| self.nodes[i].alive_ns as u128).sum();
        let node_hours = alive as f64 / 3.6e12;
        let crashes = nodes.iter().filter(|&&i| self.nodes[i].crashed).count();
        if crashes == 0 {
            return None;
        }
        if self.grid.is_empty() {
            self.affine_point(nodes, budget, node_hours, crashes)
        } else {
            self.grid_point(nodes, budget, node_hours, crashes)
        }
    }

    fn affine_point(
        &self,
        nodes: &[usize],
        budget: f64,
        node_hours: f64,
        crashes: usize,
    ) -> Option<Point> {
        let allowed = allowed_mistakes(budget, node_hours);
        let mut critical: Vec<f64> = Vec::new();
        for &i in nodes {
            if let Outcome::Affine { critical: c, .. } = &self.nodes[i].outcome {
                critical.extend_from_slice(c);
            }
        }
        let (lo, _) = self.kind.sweep_range();
        let u_lo = self.kind.u_of_threshold(lo)?;
        let (u, clipped) = if critical.len() > allowed {
            let (_, kth, _) = critical.select_nth_unstable_by(allowed, |a, b| b.total_cmp(a));
            (kth.max(u_lo), false)
        } else if self.cutoff > u_lo {
            (self.cutoff, true)
        } else {
            (u_lo, false)
        };
        if !u.is_finite() {
            return None;
        }
        let mistakes = critical.iter().filter(|&&c| c > u).count() as u64;
        let mut td_ms = Vec::with_capacity(crashes);
        for &i in nodes {
            let n = &self.nodes[i];
            if !n.crashed {
                continue;
            }
            let Outcome::Affine { last, .. } = &n.outcome else {
                return None;
            };
            let f = (*last)?;
            let deadline = after(f.deadline.last_ns, f.deadline.at(u))?;
            if deadline >= f.end_ns {
                return None;
            }
            td_ms.push(deadline.saturating_sub(f.crash_ns) as f64 / 1e6);
        }
        td_ms.sort_unstable_by(f64::total_cmp);
        Some(Point {
            threshold: self.kind.threshold_of_u(u)?,
            mistakes,
            node_hours,
            crashes,
            td_ms,
            clipped,
        })
    }

    fn grid_point(
        &self,
        nodes: &[usize],
        budget: f64,
        node_hours: f64,
        crashes: usize,
    ) -> Option<Point> {
        let mut best: Option<Point> = None;
        'k: for (k, &threshold) in self.grid.iter().enumerate() {
            let mut mistakes = 0u64;
            let mut td_ms = Vec::with_capacity(crashes);
            for &i in nodes {
                let Outcome::Grid(s) = &self.nodes[i].outcome else {
                    return None;
                };
                mistakes += s[k].mistakes as u64;
                if self.nodes[i].crashed {
                    match s[k].detection_ns {
                        Some(td) => td_ms.push(td as f64 / 1e6),
                        None => continue 'k,
                    }
                }
            }
            if mistakes as f64 > budget * node_hours {
                continue;
            }
            td_ms.sort_unstable_by(f64::total_cmp);
            let p = Point {
                threshold,
                mistakes,
                node_hours,
                crashes,
                td_ms,
                clipped: false,
            };
            let better = best
                .as_ref()
                .is_none_or(|b| (p.mean_ms(), p.p99_ms()) < (b.mean_ms(), b.p99_ms()));
            if better {
                best = Some(p);
            }
        }
        best
    }
}

/// Whether grid threshold `k` meets the budget and detects every crash
/// over all the nodes.
fn grid_qualifies(nodes: &[NodeProfile], k: usize, budget: f64) -> bool {
    let mut mistakes = 0u64;
    let mut alive: u128 = 0;
    for n in nodes {
        let Outcome::Grid(s) = &n.outcome else {
            return false;
        };
        mistakes += s[k].mistakes as u64;
        alive += n.alive_ns as u128;
        if n.crashed && s[k].detection_ns.is_none() {
            return false;
        }
    }
    (mistakes as f64) <= budget * (alive as f64 / 3.6e12)
}

/// Every node of every case replayed at `thresholds`.
fn replay_grid(
    cases: &[(&Trace, &Crashes)],
    kind: Kind,
    hb: HbConfig,
    thresholds: &[f64],
) -> Vec<NodeProfile> {
    let spec = Spec::new(kind, thresholds, hb).expect("grid thresholds are valid");
    let mut out = Vec::new();
    for (trace, crashes) in cases {
        for (id, arr) in &trace.nodes {
            if arr.is_empty() {
                continue;
            }
            let crash = crash_in(trace, crashes, *id);
            let (start, alive_end) = alive_window(arr, crash, trace.end_ns);
            let mut s = vec![NodeScore::default(); thresholds.len()];
            replay_node(&spec, arr, crash, trace.end_ns, &mut s);
            out.push(NodeProfile {
                alive_ns: alive_end - start,
                crashed: crash.is_some(),
                outcome: Outcome::Grid(s),
            });
        }
    }
    out
}

/// `replicates` stratified bootstrap resamples of a fleet: each draws, with
/// replacement, as many crashed nodes from the crashed ones and as many
/// others from the others as the fleet has, so every resample has the
/// fleet's number of crashes. Deterministic in `seed`.
pub fn resamples(crashed: &[bool], replicates: usize, seed: u64) -> Vec<Vec<usize>> {
    let (c, o): (Vec<usize>, Vec<usize>) = (0..crashed.len()).partition(|&i| crashed[i]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..replicates)
        .map(|_| {
            let mut r = Vec::with_capacity(crashed.len());
            for pool in [&c, &o] {
                for _ in 0..pool.len() {
                    r.push(pool[rng.random_range(0..pool.len())]);
                }
            }
            r
        })
        .collect()
}

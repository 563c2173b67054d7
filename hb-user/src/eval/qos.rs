//! Chen-Toueg-Aguilera QoS metrics of a detector replayed over a trace.
//!
//! Definitions (Chen, Toueg, Aguilera 2002, Sec. 2), per node, with the
//! detector's output a step function of time (see `detectors`):
//! - detection time T_D: from the crash to the start of the suspicion that
//!   lasts until the end of the trace (0 if that suspicion began before
//!   the crash); a crash with no final suspicion before the trace ends is
//!   "undetected" and counted apart; a crash after the end of the trace
//!   is no crash of it ([`trace::crash_in`](super::trace::crash_in));
//! - a mistake: a transition to "suspect" while the node is alive (between
//!   its first heartbeat and its crash, or the end of the trace);
//! - mistake rate lambda_M: mistakes per node-hour of alive time;
//! - mistake duration T_M: mean length of the mistakes, each cut at the
//!   crash if the node crashed while wrongly suspected;
//! - query accuracy probability P_A: the fraction of alive time during
//!   which the detector's output is correct ("trust").
//!
//! The replay is exact: suspicion starts at the detector's deadline after
//! each heartbeat and ends at the next heartbeat; a suspicion that ends at
//! a heartbeat whose own deadline is that same instant continues (one
//! mistake, not two). A heartbeat the detector does not take (hb's gate
//! refuses a duplicate) leaves its deadline where it was, before that
//! heartbeat: the suspicion then continues through it, one mistake whose
//! time is counted once, from the deadline to the next heartbeat taken.

use serde::Serialize;

use super::{
    detectors::{Affine, HbConfig, Kind, Spec, geometric},
    trace::{Arrival, Crashes, Trace, crash_in},
};

/// The QoS of one detector at one threshold over one trace.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Qos {
    pub detector: &'static str,
    pub threshold: f64,
    /// Crashes of nodes that appear in the trace.
    pub crashes: usize,
    pub detected: usize,
    pub td_mean_ms: Option<f64>,
    pub td_p99_ms: Option<f64>,
    pub td_max_ms: Option<f64>,
    pub mistakes: u64,
    pub node_hours: f64,
    /// Mistakes per node-hour.
    pub mistake_rate: f64,
    pub tm_mean_ms: Option<f64>,
    pub query_accuracy: f64,
}

#[derive(Clone, Default)]
struct Acc {
    mistakes: u64,
    mistake_ns: u128,
    detections_ns: Vec<u64>,
    undetected: usize,
}

/// What one detector did on one node at one threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeScore {
    pub mistakes: u32,
    /// Alive time spent wrongly suspected, ns.
    pub mistake_ns: u64,
    /// For a crashed node: `Some(T_D)` in ns if the crash was detected
    /// (its final suspicion began before the end of the trace), `None`
    /// if not. `None` for a node that did not crash.
    pub detection_ns: Option<u64>,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The alive window of a node: from its first arrival to its crash or the
/// end of the trace.
pub fn alive_window(arrivals: &[Arrival], crash: Option<u64>, end: u64) -> (u64, u64) {
    let start = arrivals.first().map_or(end, |a| a.recv_ns);
    (start, crash.unwrap_or(end).min(end).max(start))
}

/// Replays one node's `arrivals` (non-empty) through `det` and scores
/// every threshold of `spec` into `out` (one entry per threshold). `end`
/// is the end of the trace, `crash` the node's crash time if it crashed
/// (one after `end` is ignored, as [`crash_in`] ignores it: no detection
/// can start before the crash).
pub fn replay_node(
    spec: &Spec,
    arrivals: &[Arrival],
    crash: Option<u64>,
    end: u64,
    out: &mut [NodeScore],
) {
    let crash = crash.filter(|&c| c <= end);
    let nt = spec.thresholds.len();
    debug_assert_eq!(out.len(), nt);
    out.fill(NodeScore::default());
    let (_, alive_end) = alive_window(arrivals, crash, end);
    let mut dl = vec![None; nt];
    // Per threshold: start of the current suspicion run and its end (the
    // heartbeat that ended it), to merge runs that touch.
    let mut run: Vec<Option<(u64, u64)>> = vec![None; nt];
    let mut det = spec.instance();
    for (i, a) in arrivals.iter().enumerate() {
        det.arrival(a);
        det.deadlines(&mut dl);
        let next = arrivals.get(i + 1).map_or(end, |n| n.recv_ns);
        let is_last = i + 1 == arrivals.len();
        for k in 0..nt {
            // Suspected over [max(deadline, this heartbeat), next). A
            // deadline before this heartbeat is one the detector kept
            // because it did not take the heartbeat (hb's gate refused
            // it): the suspicion runs on from the span before, whose time
            // is counted already.
            let suspected_from = dl[k].map(|s| s.max(a.recv_ns)).filter(|&s| s < next);
            // The run still open at this heartbeat continues only if the
            // detector suspects again at this very instant.
            let continuing = match (run[k], suspected_from) {
                (Some((_, e)), Some(s)) => s <= e,
                _ => false,
            };
            if let Some(s) = suspected_from {
                if !continuing {
                    run[k] = Some((s, next));
                    if s < alive_end {
                        out[k].mistakes += 1;
                    }
                } else if let Some(r) = run[k].as_mut() {
                    r.1 = next;
                }
                // Alive time spent suspected (the part before a crash).
                if s < alive_end {
                    out[k].mistake_ns += next.min(alive_end) - s;
                }
            } else {
                run[k] = None;
            }
            if is_last && let Some(c) = crash {
                out[k].detection_ns = match run[k] {
                    Some((s, e)) if e >= end => Some(s.saturating_sub(c)),
                    _ => None,
                };
            }
        }
    }
}

/// Replays every node of `trace` through a fresh instance of `spec`'s
/// detector and scores each threshold. Crashes of nodes absent from the
/// trace, and crashes after its end, are ignored (nothing in it could
/// detect them; [`crash_in`]).
pub fn evaluate(trace: &Trace, crashes: &Crashes, spec: &Spec) -> Vec<Qos> {
    evaluate_fleet(&[(trace, crashes)], spec)
}

/// [`evaluate`] over the nodes of several traces taken as one fleet (e.g.
/// the same scenario under several seeds): mistakes and alive time add up,
/// detection times are pooled.
pub fn evaluate_fleet(cases: &[(&Trace, &Crashes)], spec: &Spec) -> Vec<Qos> {
    let nt = spec.thresholds.len();
    let mut acc = vec![Acc::default(); nt];
    let mut alive_ns: u128 = 0;
    let mut crash_count = 0;
    let mut scores = vec![NodeScore::default(); nt];

    for (trace, crashes) in cases {
        let end = trace.end_ns;
        for (id, arrivals) in &trace.nodes {
            if arrivals.is_empty() {
                continue;
            }
            let crash = crash_in(trace, crashes, *id);
            if crash.is_some() {
                crash_count += 1;
            }
            let (start, alive_end) = alive_window(arrivals, crash, end);
            alive_ns += (alive_end - start) as u128;
            replay_node(spec, arrivals, crash, end, &mut scores);
            for (a, sc) in acc.iter_mut().zip(&scores) {
                a.mistakes += sc.mistakes as u64;
                a.mistake_ns += sc.mistake_ns as u128;
                if crash.is_some() {
                    match sc.detection_ns {
                        Some(td) => a.detections_ns.push(td),
                        None => a.undetected += 1,
                    }
                }
            }
        }
    }

    let node_hours = alive_ns as f64 / 3.6e12;
    spec.thresholds
        .iter()
        .zip(acc)
        .map(|(&threshold, a)| qos_row(spec.kind, threshold, crash_count, a, node_hours, alive_ns))
        .collect()
}

/// A QoS row from the accumulated outcomes of one threshold.
fn qos_row(
    kind: Kind,
    threshold: f64,
    crashes: usize,
    mut a: Acc,
    node_hours: f64,
    alive_ns: u128,
) -> Qos {
    a.detections_ns.sort_unstable();
    let td: Vec<f64> = a.detections_ns.iter().map(|&n| n as f64 / 1e6).collect();
    Qos {
        detector: kind.name(),
        threshold,
        crashes,
        detected: td.len(),
        td_mean_ms: (!td.is_empty()).then(|| td.iter().sum::<f64>() / td.len() as f64),
        td_p99_ms: percentile(&td, 99.0),
        td_max_ms: td.last().copied(),
        mistakes: a.mistakes,
        node_hours,
        mistake_rate: if node_hours > 0.0 {
            a.mistakes as f64 / node_hours
        } else {
            0.0
        },
        tm_mean_ms: (a.mistakes > 0).then(|| a.mistake_ns as f64 / 1e6 / a.mistakes as f64),
        query_accuracy: if alive_ns > 0 {
            1.0 - a.mistake_ns as f64 / alive_ns as f64
        } else {
            1.0
        },
    }
}

/// The row with the shortest mean detection time (ties: p99) among those
/// that detect every crash with at most `budget` mistakes per node-hour:
/// a detector's operating point under a mistake budget. `None` when no
/// threshold qualifies.
pub fn best_under_budget(rows: &[Qos], budget: f64) -> Option<&Qos> {
    rows.iter()
        .filter(|q| q.detected == q.crashes && q.crashes > 0 && q.mistake_rate <= budget)
        .min_by(|a, b| {
            let key = |q: &Qos| {
                (
                    q.td_mean_ms.unwrap_or(f64::INFINITY),
                    q.td_p99_ms.unwrap_or(f64::INFINITY),
                )
            };
            key(a)
                .partial_cmp(&key(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
}

/// A detector's operating point under a mistake budget (mistakes per
/// node-hour), found by sweeping its threshold: a coarse log-spaced grid
/// over [`Kind::sweep_range`], then a fine grid between the last coarse
/// threshold that misses the budget and the first that meets it (the
/// mistake rate falls and the detection time grows with the threshold).
/// Returns the chosen row and how many thresholds were replayed.
pub fn sweep(
    trace: &Trace,
    crashes: &Crashes,
    kind: Kind,
    hb: HbConfig,
    budget: f64,
) -> (Option<Qos>, usize) {
    let (lo, hi) = kind.sweep_range();
    let coarse = geometric(lo, hi, 28);
    let spec = Spec::new(kind, &coarse, hb).expect("sweep thresholds are valid");
    let rows = evaluate(trace, crashes, &spec);
    let ok = |q: &Qos| q.detected == q.crashes && q.crashes > 0 && q.mistake_rate <= budget;
    let Some(i) = rows.iter().position(ok) else {
        return (None, coarse.len());
    };
    if i == 0 {
        return (best_under_budget(&rows, budget).cloned(), coarse.len());
    }
    let fine = geometric(coarse[i - 1], coarse[i], 16);
    let spec = Spec::new(kind, &fine, hb).expect("sweep thresholds are valid");
    let fine_rows = evaluate(trace, crashes, &spec);
    let mut replayed = coarse.len() + fine.len();
    // One more level between the fine neighbours that straddle the budget:
    // the fine grid alone is ~4% apart in threshold, a few percent of T_D.
    let finer_rows = match fine_rows.iter().position(ok) {
        Some(j) if j > 0 => {
            let finer = geometric(fine[j - 1], fine[j], 16);
            replayed += finer.len();
            let spec = Spec::new(kind, &finer, hb).expect("sweep thresholds are valid");
            evaluate(trace, crashes, &spec)
        }
        _ => Vec::new(),
    };
    let mut all = rows;
    all.extend(fine_rows);
    all.extend(finer_rows);
    (best_under_budget(&all, budget).cloned(), replayed)
}

/// Replays one node's `arrivals` (non-empty) through a fresh instance of
/// `spec`'s detector, whose deadline is affine in its parameter `u`
/// ([`Detector::affine`](super::detectors::Detector::affine)), and passes
/// `out` the node's critical values: it makes one mistake for each value
/// above `u` (see [`optimum`]). `alive_end` is the node's crash or the end
/// of the trace, `end` the end of the trace. Returns the deadline after the
/// last arrival.
///
/// One value per suspicion: heartbeats the detector does not take (hb's
/// gate refuses a duplicate) leave its deadline as it was, so the spans up
/// to the next heartbeat it takes are one suspicion if the deadline falls
/// in any of them, the last one (the longest silence) deciding.
pub fn critical_values(
    spec: &Spec,
    arrivals: &[Arrival],
    alive_end: u64,
    end: u64,
    mut out: impl FnMut(f64),
) -> Option<Affine> {
    let mut det = spec.instance();
    // The deadline of the current run of spans and its critical value so
    // far.
    let mut run: Option<(Affine, Option<f64>)> = None;
    for (i, a) in arrivals.iter().enumerate() {
        det.arrival(a);
        let aff = det.affine();
        let next = arrivals.get(i + 1).map_or(end, |n| n.recv_ns);
        let until = next.min(alive_end);
        let c = aff
            .filter(|f| f.last_ns < until)
            .and_then(|f| f.critical((until - f.last_ns) as f64 / 1e6));
        match (run.as_mut(), aff) {
            // The silence only grew: the later value is the larger.
            (Some((f, rc)), Some(g)) if *f == g => *rc = c.or(*rc),
            _ => {
                if let Some((_, Some(rc))) = run {
                    out(rc);
                }
                run = aff.map(|f| (f, c));
            }
        }
    }
    if let Some((_, Some(rc))) = run {
        out(rc);
    }
    run.map(|(f, _)| f)
}

/// A detector's exact operating point under a mistake budget (mistakes
/// per node-hour), for the detectors whose deadline is affine in one
/// parameter ([`Detector::affine`](super::detectors::Detector::affine));
/// `None` for the others (akka) and when no threshold qualifies.
///
/// After heartbeat `i` of a node, with the next arrival (or the end of the
/// trace, or the crash, whichever is first) at `until_i`, the detector
/// makes a mistake exactly when `last_i + max(a_i + b_i * u, floor_i) <
/// until_i`, i.e. when the floor is below `until_i - last_i` and `u < c_i
/// = (until_i - last_i - a_i) / b_i` ([`critical_values`], which merges
/// the spans a refused heartbeat splits). With `K` the mistakes
/// the budget allows over the trace's node-hours, the least `u` that meets
/// it is the `(K+1)`-th largest `c_i`; detection times only grow with `u`,
/// so that `u` is the operating point for the mean and every percentile
/// alike. It is then replayed by [`evaluate`] (the same scoring as every
/// other row), with a few nudges upward so rounding in the threshold's
/// conversion cannot tip a borderline heartbeat; the best qualifying row
/// is returned. The grid of [`sweep`] can only find this point or a worse
/// one.
pub fn optimum(
    trace: &Trace,
    crashes: &Crashes,
    kind: Kind,
    hb: HbConfig,
    budget: f64,
) -> Option<Qos> {
    kind.u_of_threshold(1.0)?;
    let spec = Spec::new(kind, &[], hb).ok()?;
    let end = trace.end_ns;
    let mut critical: Vec<f64> = Vec::new();
    // Per crash: the deadline after the node's last arrival.
    let mut finals: Vec<Affine> = Vec::new();
    let mut alive_ns: u128 = 0;
    for (id, arrivals) in &trace.nodes {
        if arrivals.is_empty() {
            continue;
        }
        let crash = crash_in(trace, crashes, *id);
        let (start, alive_end) = alive_window(arrivals, crash, end);
        alive_ns += (alive_end - start) as u128;
        let last = critical_values(&spec, arrivals, alive_end, end, |c| critical.push(c));
        if crash.is_some() {
            // No deadline after the last arrival: never detected.
            finals.push(last?);
        }
    }
    let node_hours = alive_ns as f64 / 3.6e12;
    let allowed = (budget * node_hours * (1.0 + 1e-12)).floor() as usize;
    let (lo, _) = kind.sweep_range();
    let u_lo = kind.u_of_threshold(lo)?;
    let u = if critical.len() > allowed {
        let (_, kth, _) = critical.select_nth_unstable_by(allowed, |a, b| {
            b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal)
        });
        kth.max(u_lo)
    } else {
        u_lo
    };
    if !u.is_finite()
        || finals
            .iter()
            .any(|f| f.last_ns as f64 + f.at(u) * 1e6 >= end as f64)
    {
        return None;
    }
    let scale = u.abs().max(1.0);
    let mut thresholds: Vec<f64> = [0.0, 1e-9, 1e-6, 1e-4]
        .iter()
        .filter_map(|d| kind.threshold_of_u(u + d * scale))
        .filter(|&t| kind.check(t).is_ok())
        .collect();
    thresholds.dedup();
    let spec = Spec::new(kind, &thresholds, hb).ok()?;
    best_under_budget(&evaluate(trace, crashes, &spec), budget).cloned()
}

/// A detector's operating point under a mistake budget: [`optimum`] when
/// its deadline is affine in one parameter, else the grid of [`sweep`].
pub fn operating_point(
    trace: &Trace,
    crashes: &Crashes,
    kind: Kind,
    hb: HbConfig,
    budget: f64,
) -> Option<Qos> {
    match kind.u_of_threshold(1.0) {
        Some(_) => optimum(trace, crashes, kind, hb, budget),
        None => sweep(trace, crashes, kind, hb, budget).0,
    }
}

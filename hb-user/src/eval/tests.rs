//! Tests of the evaluation: QoS metrics on hand-computed traces, each
//! detector's formula at hand-checked points, and the generator's
//! determinism (including the traces shipped in `tests/data/traces`).

use std::collections::BTreeMap;

use super::{
    detectors::{
        HbConfig, Kind, Spec, akka_phi, cassandra_phi, chen_expected_arrival, hayashibara_phi,
    },
    qos::{Qos, best_under_budget, evaluate, optimum, percentile, sweep},
    synth::{GenOpts, Scenario, generate},
    trace::{Arrival, Crashes, Trace},
};
use crate::detector::{PhiParams, phi, phi_normal};

const MS: u64 = 1_000_000;

/// A trace from `(node, [arrival ms])`, without announced intervals.
fn trace_ms(nodes: &[(u32, &[u64])]) -> Trace {
    let mut m = BTreeMap::new();
    for (id, arr) in nodes {
        m.insert(
            *id,
            arr.iter()
                .map(|&t| Arrival {
                    recv_ns: t * MS,
                    interval_ms: None,
                    seq: None,
                })
                .collect(),
        );
    }
    Trace::from_nodes(m)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

fn fixed(trace: &Trace, crashes: &Crashes, timeouts: &[f64]) -> Vec<Qos> {
    let spec = Spec::new(Kind::Fixed, timeouts, HbConfig::default()).unwrap();
    evaluate(trace, crashes, &spec)
}

/// The hand-computed case. Trace end = 5000 ms (node 2's last arrival).
///
/// node 1: arrivals 0, 500, 1000, 2500, 3000 ms; crashes at 3200 ms.
/// node 2: arrivals 0, 900, 1800, 3300, 4200, 5000 ms; never crashes.
/// Alive time: node 1 [0, 3200] + node 2 [0, 5000] = 8200 ms.
///
/// Fixed timeout 1000 ms (suspect from last + 1000 until the next arrival):
/// - node 1: [2000, 2500) is a mistake of 500 ms; after 3000 the final
///   suspicion starts at 4000 > crash: T_D = 4000 - 3200 = 800 ms.
/// - node 2: [2800, 3300) is a mistake of 500 ms; the deadlines after 4200
///   and 5000 fall at or after the end.
/// - mistakes 2, T_M = 500 ms, lambda_M = 2 / (8200 ms / 3.6e6 ms/h)
///   = 878.05 per node-hour, P_A = 1 - 1000 / 8200 = 0.878049.
///
/// Fixed timeout 400 ms:
/// - node 1 mistakes: [400,500) 100, [900,1000) 100, [1400,2500) 1100,
///   [2900,3000) 100; final suspicion from 3400: T_D = 200 ms.
/// - node 2 mistakes: [400,900) 500, [1300,1800) 500, [2200,3300) 1100,
///   [3700,4200) 500, [4600,5000) 400.
/// - mistakes 9 over 4400 ms: T_M = 488.9 ms, P_A = 1 - 4400/8200 = 0.463415.
///
/// Fixed timeout 0: every heartbeat is suspected at once and the
/// suspicions touch, so each node has one mistake covering all its alive
/// time: 2 mistakes, T_M = 8200 / 2 = 4100 ms, P_A = 0; node 1's final
/// suspicion began at 0, before its crash: T_D = 0.
#[test]
fn qos_matches_the_hand_computed_case() {
    let trace = trace_ms(&[
        (1, &[0, 500, 1000, 2500, 3000]),
        (2, &[0, 900, 1800, 3300, 4200, 5000]),
    ]);
    let crashes: Crashes = [(1, 3200 * MS)].into();
    let q = fixed(&trace, &crashes, &[1000.0, 400.0, 0.0]);
    let hours = 8200.0 / 3.6e6;

    let a = &q[0];
    assert_eq!((a.crashes, a.detected, a.mistakes), (1, 1, 2));
    assert!(close(a.node_hours, hours, 1e-12));
    assert_eq!(a.td_mean_ms, Some(800.0));
    assert_eq!(a.td_p99_ms, Some(800.0));
    assert_eq!(a.tm_mean_ms, Some(500.0));
    assert!(
        close(a.mistake_rate, 878.048_780, 1e-5),
        "{}",
        a.mistake_rate
    );
    assert!(close(a.query_accuracy, 1.0 - 1000.0 / 8200.0, 1e-12));

    let b = &q[1];
    assert_eq!((b.detected, b.mistakes), (1, 9));
    assert_eq!(b.td_mean_ms, Some(200.0));
    assert!(close(b.tm_mean_ms.unwrap(), 4400.0 / 9.0, 1e-9));
    assert!(close(b.query_accuracy, 1.0 - 4400.0 / 8200.0, 1e-12));

    let c = &q[2];
    assert_eq!((c.detected, c.mistakes), (1, 2));
    assert_eq!(c.td_mean_ms, Some(0.0));
    assert_eq!(c.tm_mean_ms, Some(4100.0));
    assert!(close(c.query_accuracy, 0.0, 1e-12));
}

/// A crash whose final suspicion would start after the trace ends is
/// undetected, and counted so.
#[test]
fn a_crash_not_suspected_before_the_end_is_undetected() {
    // Node 1 crashes at 1100 ms after its arrival at 1000; node 2 keeps the
    // trace going until 1800 ms.
    let trace = trace_ms(&[(1, &[0, 1000]), (2, &[0, 600, 1200, 1800])]);
    let crashes: Crashes = [(1, 1100 * MS)].into();
    let q = fixed(&trace, &crashes, &[700.0, 1000.0]);
    // 700 ms: suspected from 1700 < 1800, T_D = 600 ms; node 1 was also
    // wrongly suspected in [700, 1000).
    assert_eq!(
        (q[0].detected, q[0].td_mean_ms, q[0].mistakes),
        (1, Some(600.0), 1)
    );
    // 1000 ms: the deadline 2000 is after the end (1800).
    assert_eq!(
        (q[1].detected, q[1].td_mean_ms, q[1].mistakes),
        (0, None, 0)
    );
    // And an undetected crash disqualifies an operating point.
    assert_eq!(best_under_budget(&q, 1e9).map(|q| q.threshold), Some(700.0));
    assert!(best_under_budget(&q[1..], 1e9).is_none());
}

#[test]
fn percentile_is_nearest_rank() {
    let v: Vec<f64> = (1..=200).map(f64::from).collect();
    assert_eq!(percentile(&v, 99.0), Some(198.0));
    assert_eq!(percentile(&v[..1], 99.0), Some(1.0));
    assert_eq!(percentile(&[], 99.0), None);
}

// ---------------------------------------------------------------- formulas

#[test]
fn hayashibara_phi_at_hand_checked_points() {
    // At the mean P_later = 1/2; 1 and 3 sigma late: Q(1) = 0.158655,
    // Q(3) = 0.0013499 (normal tables).
    assert!(close(
        hayashibara_phi(1000.0, 1000.0, 100.0),
        2f64.log10(),
        1e-12
    ));
    assert!(close(
        hayashibara_phi(1100.0, 1000.0, 100.0),
        0.799_546,
        1e-6
    ));
    assert!(close(
        hayashibara_phi(1300.0, 1000.0, 100.0),
        2.869_699,
        1e-6
    ));
    // 30 sigma, where erfc gives way to the asymptotic series: Q(30) =
    // 4.9067e-198 (phi = 197.30921 to 30 digits with mpmath); and the two
    // branches meet continuously.
    assert!(close(hayashibara_phi(31.0, 1.0, 1.0), 197.309_209, 1e-5));
    let below = hayashibara_phi(30.0 - 1e-9, 0.0, 1.0);
    let above = hayashibara_phi(30.0 + 1e-9, 0.0, 1.0);
    assert!(close(below, above, 1e-6), "{below} {above}");
}

#[test]
fn akka_phi_at_hand_checked_points() {
    // y = 0: e = 1, phi = -log10(1/2). y = 1: e = exp(-1.668166) = 0.188616,
    // phi = -log10(e / (1 + e)) = 0.799508. y = 3: e = exp(-6.698282),
    // phi = 2.909475.
    assert!(close(akka_phi(1000.0, 1000.0, 100.0), 2f64.log10(), 1e-12));
    assert!(close(akka_phi(1100.0, 1000.0, 100.0), 0.799_508, 1e-6));
    assert!(close(akka_phi(1300.0, 1000.0, 100.0), 2.909_475, 1e-6));
    // hb's monitor uses the same approximation.
    assert!(close(phi_normal(1300.0, 1000.0, 100.0), 2.909_475, 1e-6));
}

#[test]
fn cassandra_and_chen_at_hand_checked_points() {
    // 2 s elapsed over a 1 s mean: 2 / ln 10.
    assert!(close(cassandra_phi(2000.0, 1000.0), 0.868_589, 1e-6));
    // Chen's EA for arrivals 0, 1100, 1900 ms numbered 0, 1, 2: eta = 950
    // ms and (1/3) * ((0 - 0) + (1100 - 950) + (1900 - 1900)) + 3 * 950 =
    // 2900 ms.
    let ea = chen_expected_arrival(3, 3000 * MS as u128, 3, (0, 0), (1900 * MS, 2));
    assert!(close(ea, 2900.0 * MS as f64, 1e-3));
    // The same arrivals numbered 0, 2, 3 (heartbeat 1 lost): eta = 1900 / 3
    // and (1/3) * (0 + (1100 - 2 eta) + (1900 - 3 eta)) + 4 eta = 1000 +
    // (4 - 5/3) eta = 2477.78 ms.
    let ea = chen_expected_arrival(3, 3000 * MS as u128, 5, (0, 0), (1900 * MS, 3));
    assert!(
        close(ea, (1000.0 + 7.0 / 3.0 * 1900.0 / 3.0) * MS as f64, 1e-3),
        "{ea}"
    );
}

/// Deadlines of one node after `arrivals` (ms), per threshold, in ms.
fn deadlines_ms(
    kind: Kind,
    hb: HbConfig,
    arrivals: &[(u64, Option<u32>)],
    thr: &[f64],
) -> Vec<Option<f64>> {
    let spec = Spec::new(kind, thr, hb).unwrap();
    let mut d = spec.instance();
    for &(t, iv) in arrivals {
        d.arrival(&Arrival {
            recv_ns: t * MS,
            interval_ms: iv,
            seq: None,
        });
    }
    let mut out = vec![None; thr.len()];
    d.deadlines(&mut out);
    out.into_iter()
        .map(|o| o.map(|ns| ns as f64 / 1e6))
        .collect()
}

#[test]
fn detector_deadlines_at_hand_checked_points() {
    let plain = |ts: &[u64]| ts.iter().map(|&t| (t, None)).collect::<Vec<_>>();
    let hb = HbConfig::default();
    // fixed: last + timeout.
    assert_eq!(
        deadlines_ms(Kind::Fixed, hb, &plain(&[0, 1000]), &[250.0]),
        [Some(1250.0)]
    );
    // chen: EA = 3000 for a regular 1 s sender, + alpha 100.
    assert_eq!(
        deadlines_ms(Kind::Chen, hb, &plain(&[0, 1000, 2000]), &[100.0]),
        [Some(3100.0)]
    );
    // chen needs two arrivals.
    assert_eq!(deadlines_ms(Kind::Chen, hb, &plain(&[0]), &[100.0]), [None]);
    // cassandra: window [2000 (initial value), 1000, 1000], mean 1333.3;
    // phi 1 at t = 1333.3 * ln 10 = 3070.11 ms after the last arrival.
    let d = deadlines_ms(Kind::Cassandra, hb, &plain(&[0, 1000, 2000]), &[1.0])[0].unwrap();
    assert!(close(d, 5070.113, 1e-3), "{d}");
    // cassandra ignores intervals over 2 s: a 3 s gap leaves the window.
    let d = deadlines_ms(Kind::Cassandra, hb, &plain(&[0, 1000, 4000]), &[1.0])[0].unwrap();
    assert!(
        close(d, 4000.0 + 1500.0 * std::f64::consts::LN_10, 1e-3),
        "{d}"
    );
    // phi-normal: samples 900, 1100, 1000: mean 1000, sigma 81.650;
    // threshold -log10(Q(2)) = 1.643016 crosses at mean + 2 sigma.
    let d = deadlines_ms(
        Kind::PhiNormal,
        hb,
        &plain(&[0, 900, 2000, 3000]),
        &[1.643_016_080_140_936_8],
    )[0]
    .unwrap();
    assert!(close(d, 4163.299, 1e-3), "{d}");
    // akka: history seeded [750, 1250] (`firstHeartbeat`: mean 1000 minus
    // and plus mean / 4) plus the 1000 ms interval: mean 1000 + 3000
    // pause, population sigma sqrt(125000 / 3) = 204.124 (> 100 floor);
    // y = 1.
    let thr = akka_phi(1.0, 0.0, 1.0);
    let d = deadlines_ms(Kind::Akka, hb, &plain(&[0, 1000]), &[thr])[0].unwrap();
    assert!(close(d, 5204.124, 1e-3), "{d}");
}

#[test]
fn akka_leaves_late_intervals_out_of_its_history() {
    // Threshold phi 1 crosses at 1000 + 4000 + 204.1 * y(1) ~ 5.3 s after
    // the second heartbeat; a 20 s gap is past that, so the 20 s interval
    // is not learned and the next deadline is as before, shifted.
    let hb = HbConfig::default();
    let base = deadlines_ms(Kind::Akka, hb, &[(0, None), (1000, None)], &[1.0])[0].unwrap();
    let after = deadlines_ms(
        Kind::Akka,
        hb,
        &[(0, None), (1000, None), (21_000, None)],
        &[1.0],
    )[0]
    .unwrap();
    assert!(
        close(after - 21_000.0, base - 1000.0, 1e-6),
        "{base} {after}"
    );
}

#[test]
fn hb_deadline_is_where_the_monitors_phi_crosses() {
    // An announced interval of 1000 ms seeds mean 1000 and deviation 125 ms
    // (NodeState::record): sigma = 125 * sqrt(pi/2) = 156.664 ms, above both
    // floors. y = 1 is crossed at 1000 + 156.664 ms.
    let hb = HbConfig::default();
    let thr = phi_normal(1.0, 0.0, 1.0);
    let d = deadlines_ms(Kind::Hb, hb, &[(5000, Some(1000))], &[thr])[0].unwrap();
    assert!(close(d, 5000.0 + 1156.664, 2e-3), "{d}");

    // Exactness against `phi` itself, on a node with learned moments, for a
    // range of thresholds: suspected at the deadline, not 1 us before.
    let spec = Spec::new(Kind::Hb, &[0.5, 3.0, 8.0, 16.0, 100.0], hb).unwrap();
    let mut det = spec.instance();
    let mut st = hb_common::maps::NodeState::default();
    let offset = 1_000_000_000; // the detector's internal clock offset
    for (i, t) in [0u64, 990, 2010, 2995, 4001, 5020].iter().enumerate() {
        feed_both(&mut *det, &mut st, *t, i as u64 + 1, offset);
    }
    let mut out = vec![None; 5];
    det.deadlines(&mut out);
    let p = PhiParams::default();
    for (dl, thr) in out.iter().zip(spec.thresholds.iter()) {
        let at = dl.unwrap() + offset;
        assert!(phi(&st, at, &p) >= *thr, "thr {thr}");
        assert!(phi(&st, at - 1_000, &p) < *thr, "thr {thr}");
    }
}

/// A 1 s heartbeat (`seq`, received at `t_ms`) fed to an eval detector and,
/// as the gate records it, to a node's state `offset` ns later on the
/// monitor's clock: the two views `phi` is compared across.
fn feed_both(
    det: &mut dyn super::detectors::Detector,
    st: &mut hb_common::maps::NodeState,
    t_ms: u64,
    seq: u64,
    offset: u64,
) {
    det.arrival(&Arrival {
        recv_ns: t_ms * MS,
        interval_ms: Some(1000),
        seq: Some(seq),
    });
    record(st, seq, 1000, t_ms * MS + offset);
}

/// Node 1's heartbeat `seq` announcing `interval_ms`, recorded by the gate
/// at `at_ns` on the monitor's clock.
fn record(st: &mut hb_common::maps::NodeState, seq: u64, interval_ms: u32, at_ns: u64) {
    let d = hb_common::proto::Datagram {
        kind: hb_common::proto::Kind::Heartbeat,
        node_id: 1,
        generation: 1,
        key_epoch: 0,
        flags: 0,
        load: 0,
        seq,
        sent_ns: 0,
        interval_ms,
        rtt_us: 0,
    };
    let a = st.admit(&d).unwrap();
    st.record(&d, a, at_ns);
}

#[test]
fn hb_without_announcements_learns_from_arrivals() {
    // No interval column: no phi before the second arrival (only the
    // monitor's backstop, 60 s), then the first inter-arrival seeds mean
    // 1000 and deviation 500 ms: sigma 626.657 ms; y = 1 crosses at 1000 +
    // 1000 + 626.657.
    let hb = HbConfig::default();
    let thr = phi_normal(1.0, 0.0, 1.0);
    assert_eq!(
        deadlines_ms(Kind::Hb, hb, &[(0, None)], &[thr]),
        [Some(60_000.0)]
    );
    let off = HbConfig {
        max_silence_ms: 0,
        ..hb
    };
    assert_eq!(deadlines_ms(Kind::Hb, off, &[(0, None)], &[thr]), [None]);
    let d = deadlines_ms(Kind::Hb, hb, &[(0, None), (1000, None)], &[thr])[0].unwrap();
    assert!(close(d, 2626.657, 2e-3), "{d}");
}

#[test]
fn thresholds_and_names_are_checked() {
    assert!(Spec::new(Kind::Hb, &[0.0], HbConfig::default()).is_err());
    assert!(Spec::new(Kind::Fixed, &[-1.0], HbConfig::default()).is_err());
    assert!(Spec::new(Kind::Chen, &[f64::NAN], HbConfig::default()).is_err());
    assert_eq!(Kind::parse("PHI-NORMAL").unwrap(), Kind::PhiNormal);
    let e = Kind::parse("chitchat").unwrap_err().to_string();
    assert!(e.contains("private module"), "{e}");
    assert!(Kind::parse("swim").is_err());
}

/// The exact operating point on a hand-computed case.
///
/// node 1: arrivals 0, 1000, 2000, 4000, 5000 ms, crashes at 5300 ms.
/// node 2: arrivals 0, 1000, 3500, 4500, ..., 9500, 10000 ms (the end).
/// Alive time 5300 + 10000 = 15300 ms. For a fixed timeout the critical
/// values are the gaps up to the next arrival, the crash or the end:
/// node 1: 1000, 1000, 2000, 1000, 300 (5000 to the crash); node 2: 1000,
/// 2500, 1000 x5, 500 (its last arrival is the end: nothing after it).
/// - 0 mistakes allowed: timeout 2500 (the largest; the 2500 gap is not a
///   mistake since suspicion starts exactly at the next arrival); T_D =
///   5000 + 2500 - 5300 = 2200 ms.
/// - 1 allowed: timeout 2000 (node 2's 2500 gap is the one mistake);
///   T_D 1700 ms.
/// - 2 allowed: timeout 1000 (the 1000 gaps are not mistakes); T_D 700.
#[test]
fn optimum_is_the_order_statistic_of_the_critical_thresholds() {
    let trace = trace_ms(&[
        (1, &[0, 1000, 2000, 4000, 5000]),
        (
            2,
            &[0, 1000, 3500, 4500, 5500, 6500, 7500, 8500, 9500, 10000],
        ),
    ]);
    let crashes: Crashes = [(1, 5300 * MS)].into();
    let hours = 15300.0 / 3.6e6;
    let hb = HbConfig::default();
    for (allowed, timeout, td, mistakes) in [
        (0.5, 2500.0, 2200.0, 0),
        (1.5, 2000.0, 1700.0, 1),
        (2.5, 1000.0, 700.0, 2),
    ] {
        let q = optimum(&trace, &crashes, Kind::Fixed, hb, allowed / hours).unwrap();
        assert_eq!(q.threshold, timeout, "{allowed}");
        assert_eq!(q.td_mean_ms, Some(td), "{allowed}");
        assert_eq!(q.mistakes, mistakes, "{allowed}");
    }
    // A crash no threshold can detect before the end: no operating point.
    let late: Crashes = [(2, 9900 * MS)].into();
    assert!(optimum(&trace, &late, Kind::Fixed, hb, 1e9).is_none());
    // akka has no affine form: the exact solver declines.
    assert!(optimum(&trace, &crashes, Kind::Akka, hb, 1e9).is_none());
}

/// A crash after the end of the trace is no crash of it: node 2 falls
/// silent at 50.5 s of a trace that ends at 100 s, and its crash file says
/// 200 s. It was scored as detected in 0 ms (its suspicion began before
/// the crash), whatever the detector; now it is ignored, as a crash of a
/// node absent from the trace is, by the replay, the exact operating
/// point and the profiles alike. Node 3's crash at 30.2 s is scored.
#[test]
fn a_crash_after_the_end_of_the_trace_is_ignored() {
    use super::profile::Profile;
    let every_second = |from: u64, to: u64| (from..=to).step_by(1000).collect::<Vec<u64>>();
    let (n1, n2, n3) = (
        every_second(0, 100_000),
        every_second(500, 50_500),
        every_second(0, 30_000),
    );
    let trace = trace_ms(&[(1, &n1), (2, &n2), (3, &n3)]);
    let within: Crashes = [(3, 30_200 * MS)].into();
    let late: Crashes = [(2, 200_000 * MS), (3, 30_200 * MS)].into();
    assert_eq!(super::trace::crashes_after_end(&trace, &late), 1);
    assert_eq!(super::trace::crashes_after_end(&trace, &within), 0);
    let hb = HbConfig::default();
    for kind in [Kind::Hb, Kind::Fixed] {
        let spec = Spec::new(kind, &kind.default_thresholds(), hb).unwrap();
        let (a, b) = (
            evaluate(&trace, &late, &spec),
            evaluate(&trace, &within, &spec),
        );
        assert_eq!(a, b, "{kind:?}");
        assert!(a.iter().all(|q| q.crashes == 1), "{kind:?}: {a:?}");
        // Node 2's silence is a mistake: the node was up to the end.
        assert!(a.iter().all(|q| q.mistakes >= 1), "{kind:?}: {a:?}");
        let budget = 100.0;
        let (a, b) = (
            optimum(&trace, &late, kind, hb, budget),
            optimum(&trace, &within, kind, hb, budget),
        );
        assert!(a.is_some(), "{kind:?}");
        assert_eq!(a, b, "{kind:?}");
        let (a, b) = (
            Profile::build(&[(&trace, &late)], kind, hb, budget),
            Profile::build(&[(&trace, &within)], kind, hb, budget),
        );
        assert_eq!(a.point(&[0, 1, 2], budget), b.point(&[0, 1, 2], budget));
    }
}

/// On a generated trace, for every detector with an affine deadline: the
/// exact point meets the budget, a slightly lower threshold does not (it
/// is the least), and the grid sweep can only do as well or worse.
#[test]
fn optimum_is_least_and_never_worse_than_the_grid() {
    let (trace, crashes) = make(Scenario::Wan, 2, 20, 1800);
    let budget = 1.0 / 24.0;
    let hb = HbConfig::default();
    for kind in [Kind::Hb, Kind::Fixed, Kind::Chen, Kind::Cassandra] {
        let q = optimum(&trace, &crashes, kind, hb, budget).unwrap();
        assert!(
            q.mistake_rate <= budget && q.detected == q.crashes,
            "{kind:?}"
        );
        let u = kind.u_of_threshold(q.threshold).unwrap();
        let below = kind.threshold_of_u(u - 1e-3 * u.abs().max(1.0)).unwrap();
        let spec = Spec::new(kind, &[below], hb).unwrap();
        let r = &evaluate(&trace, &crashes, &spec)[0];
        assert!(r.mistake_rate > budget, "{kind:?}: {below} also meets it");
        let (grid, _) = sweep(&trace, &crashes, kind, hb, budget);
        let grid = grid.unwrap();
        assert!(
            grid.td_mean_ms.unwrap() >= q.td_mean_ms.unwrap() - 1e-6,
            "{kind:?}: grid {grid:?} beats the optimum {q:?}"
        );
    }
}

// ---------------------------------------------------------------- generator

fn make(scenario: Scenario, seed: u64, nodes: u32, secs: u64) -> (Trace, Crashes) {
    generate(&GenOpts {
        scenario,
        seed,
        nodes,
        duration_ns: secs * 1_000_000_000,
    })
}

#[test]
fn generation_is_a_function_of_the_seed() {
    for s in Scenario::ALL {
        let a = make(s, 7, 6, 300);
        assert_eq!(a, make(s, 7, 6, 300), "{}", s.name());
        assert_ne!(a.0, make(s, 8, 6, 300).0, "{}", s.name());
        // A node's arrivals do not depend on the size of the fleet.
        let small = make(s, 7, 3, 300);
        for id in 1..=3 {
            assert_eq!(
                small.0.nodes.get(&id),
                a.0.nodes.get(&id),
                "{} node {id}",
                s.name()
            );
        }
        assert_eq!(
            a.1.keys().copied().collect::<Vec<_>>(),
            vec![5],
            "{}",
            s.name()
        );
    }
}

#[test]
fn scenarios_have_their_shape() {
    // mixed-interval: nodes keep one interval from the set.
    let (t, _) = make(Scenario::MixedInterval, 3, 12, 120);
    let ivs: std::collections::BTreeSet<u32> = t
        .nodes
        .values()
        .map(|a| a[0].interval_ms.unwrap())
        .collect();
    assert!(
        ivs.len() >= 3
            && ivs
                .iter()
                .all(|i| [100, 200, 500, 1000, 2000, 5000].contains(i))
    );
    // interval-change: some node announces more than one interval.
    let (t, _) = make(Scenario::IntervalChange, 3, 10, 1800);
    assert!(
        t.nodes
            .values()
            .any(|a| a.iter().any(|x| x.interval_ms != a[0].interval_ms))
    );
    // gc-pause (both): some inter-arrival gap is well over one interval.
    for s in [Scenario::GcPause, Scenario::GcPauseHomogeneous] {
        let (t, _) = make(s, 3, 10, 3600);
        let max_gap = t
            .nodes
            .values()
            .flat_map(|a| a.windows(2).map(|w| w[1].recv_ns - w[0].recv_ns))
            .max()
            .unwrap();
        assert!(max_gap > 1_500 * MS, "{}: {max_gap}", s.name());
    }
    // Crashed nodes send nothing after their crash.
    for s in Scenario::ALL {
        let (t, c) = make(s, 3, 10, 600);
        for (id, at) in &c {
            let last = t.nodes[id].last().unwrap().recv_ns;
            assert!(last < at + 30_000 * MS, "{} node {id}", s.name());
        }
    }
}

/// The traces in `tests/data/traces` are `hb eval gen --seed 1 --nodes 5
/// --duration 5m` output; regenerating them must give the same bytes.
#[test]
fn shipped_traces_regenerate_byte_for_byte() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    for s in Scenario::ALL {
        let (t, c) = make(s, 1, 5, 300);
        let mut tb = Vec::new();
        t.write(&mut tb).unwrap();
        let mut cb = Vec::new();
        super::trace::write_crashes(&c, &mut cb).unwrap();
        let shipped = std::fs::read(dir.join(format!("{}.csv", s.name()))).unwrap();
        assert!(
            tb == shipped,
            "{}.csv differs from its regeneration",
            s.name()
        );
        let shipped = std::fs::read(dir.join(format!("{}.crashes.csv", s.name()))).unwrap();
        assert!(cb == shipped, "{}.crashes.csv differs", s.name());
        // And they replay: every detector sees the crash at its defaults.
        let read = Trace::read(&tb[..]).unwrap();
        assert_eq!(read, t);
        let spec = Spec::new(Kind::Fixed, &[10_000.0], HbConfig::default()).unwrap();
        assert_eq!(evaluate(&read, &c, &spec)[0].detected, 1, "{}", s.name());
    }
}

// ---------------------------------------------------------------- profiles

/// A profile's operating point of the whole fleet is `qos::optimum`'s (the
/// affine detectors) and `qos::sweep`'s (akka), and one case's nodes in a
/// two-case profile give that case's own point.
#[test]
fn profile_points_match_the_replayed_operating_points() {
    use super::profile::Profile;
    let hb = HbConfig::default();
    let (t1, c1) = make(Scenario::Wan, 2, 20, 1800);
    let (t2, c2) = make(Scenario::Wan, 3, 20, 1800);
    // No mistake allowed, and ten (one per node-hour).
    for (kind, budget) in Kind::ALL
        .into_iter()
        .flat_map(|k| [(k, 1.0 / 24.0), (k, 1.0)])
    {
        let one = Profile::build(&[(&t1, &c1)], kind, hb, budget);
        let all: Vec<usize> = (0..one.nodes.len()).collect();
        let p = one.point(&all, budget).unwrap();
        assert!(!p.clipped);
        let want = if kind == Kind::Akka {
            sweep(&t1, &c1, kind, hb, budget).0.unwrap()
        } else {
            optimum(&t1, &c1, kind, hb, budget).unwrap()
        };
        assert_eq!(p.crashes, want.crashes, "{kind:?}");
        assert_eq!(p.mistakes, want.mistakes, "{kind:?} {budget}");
        assert!(
            close(p.mean_ms(), want.td_mean_ms.unwrap(), 1e-2),
            "{kind:?}: {} vs {:?}",
            p.mean_ms(),
            want.td_mean_ms
        );
        assert!(close(p.p99_ms(), want.td_p99_ms.unwrap(), 1e-2), "{kind:?}");
        assert!(
            close(
                p.threshold,
                want.threshold,
                1e-6 * want.threshold.abs().max(1.0)
            ),
            "{kind:?}: {} vs {}",
            p.threshold,
            want.threshold
        );

        let two = Profile::build(&[(&t1, &c1), (&t2, &c2)], kind, hb, budget);
        assert_eq!(two.cases.len(), 2);
        let second: Vec<usize> = two.cases[1].clone().collect();
        let alone = Profile::build(&[(&t2, &c2)], kind, hb, budget);
        let all2: Vec<usize> = (0..alone.nodes.len()).collect();
        let (a, b) = (two.point(&second, budget), alone.point(&all2, budget));
        if kind == Kind::Akka {
            // The two grids are refined around different fleets' points:
            // the pooled grid can only be coarser for one case.
            assert!(a.unwrap().mean_ms() >= b.unwrap().mean_ms() - 1e-9);
        } else {
            assert_eq!(a, b, "{kind:?}");
        }
    }
}

#[test]
fn resamples_are_stratified_and_deterministic() {
    use super::profile::resamples;
    let crashed = [true, false, false, true, false, false, false];
    let r = resamples(&crashed, 50, 7);
    assert_eq!(r, resamples(&crashed, 50, 7));
    assert_ne!(r, resamples(&crashed, 50, 8));
    for s in &r {
        assert_eq!(s.len(), crashed.len());
        assert_eq!(s.iter().filter(|&&i| crashed[i]).count(), 2);
    }
    // Every node gets drawn somewhere.
    let mut seen = [false; 7];
    r.iter().flatten().for_each(|&i| seen[i] = true);
    assert!(seen.iter().all(|&s| s));
}

/// A node that stalled twice (4 s, then 3 s, consecutive sequence numbers)
/// is not suspected before its allowance, the mean plus 1.5 times the
/// smaller stall, whatever the threshold; a node that lost heartbeats instead (a
/// jump in the sequence numbers) gets no allowance. Deadlines agree with
/// the monitor's `phi` to the microsecond.
#[test]
fn hb_deadline_waits_out_a_recurring_stall() {
    let hb = HbConfig::default();
    let thresholds = [1.0, 8.0, 1e4];
    let run = |gaps: &[(u64, u64)]| {
        // (gap ms, seq step) after a first heartbeat at 1 s.
        let spec = Spec::new(Kind::Hb, &thresholds, hb).unwrap();
        let mut det = spec.instance();
        let mut st = hb_common::maps::NodeState::default();
        let (mut t, mut seq) = (1000u64, 1u64);
        let offset = 1_000_000_000;
        let mut feed = |t: u64, seq: u64| feed_both(&mut *det, &mut st, t, seq, offset);
        feed(t, seq);
        for &(gap, step) in gaps {
            t += gap;
            seq += step;
            feed(t, seq);
        }
        let mut out = vec![None; thresholds.len()];
        det.deadlines(&mut out);
        let p = PhiParams::default();
        for (dl, thr) in out.iter().zip(thresholds) {
            let at = dl.unwrap() + offset;
            assert!(phi(&st, at, &p) >= thr, "thr {thr}");
            assert!(phi(&st, at - 1_000, &p) < thr, "thr {thr}");
        }
        let last = t as f64;
        out.iter()
            .map(|d| d.unwrap() as f64 / 1e6 - last)
            .collect::<Vec<f64>>()
    };
    let mut stalls = vec![(1000, 1); 20];
    stalls.push((4000, 1));
    stalls.extend([(1000, 1); 20]);
    stalls.push((3000, 1));
    stalls.extend([(1000, 1); 3]);
    let d = run(&stalls);
    // The smaller stall's excess is ~2 s over a ~1 s mean: allowance ~4 s.
    assert!(d[0] > 3900.0 && d[0] < 4100.0, "{d:?}");
    assert_eq!(d[0], d[1], "below the allowance every threshold waits");
    assert!(d[2] > d[1], "a high threshold's own deadline is later");
    // The same gaps as lost heartbeats: no allowance.
    let losses: Vec<(u64, u64)> = stalls.iter().map(|&(g, _)| (g, g / 1000)).collect();
    let d = run(&losses);
    assert!(d[0] < 1500.0, "{d:?}");
}

// ---------------------------------------------------------------- refused heartbeats, restarts

/// A trace from `(arrival ms, seq)` rows of node 1, announcing 1000 ms.
fn seq_trace(rows: impl IntoIterator<Item = (u64, u64)>) -> Trace {
    let mut text = String::from("node_id,recv_ns,interval_ms,seq\n");
    for (t, s) in rows {
        text += &format!("1,{},1000,{s}\n", t * MS);
    }
    Trace::read(text.as_bytes()).unwrap()
}

fn hb8(trace: &Trace, crashes: &Crashes) -> Qos {
    let spec = Spec::new(Kind::Hb, &[8.0], HbConfig::default()).unwrap();
    evaluate(trace, crashes, &spec).remove(0)
}

/// The reviewer's case: a sender restarts (seq starts again at 1) and no
/// metric may leave its range.
#[test]
fn rev_a_seq_reset_does_not_count_the_same_suspicion_many_times() {
    let mut text = String::from("node_id,recv_ns,interval_ms,seq\n");
    for i in 0..200u64 {
        text += &format!("1,{},1000,{}\n", i * 1000 * MS, i % 100 + 1);
    }
    let t = Trace::read(text.as_bytes()).unwrap();
    let q = evaluate(
        &t,
        &Crashes::new(),
        &Spec::new(Kind::Hb, &[8.0], HbConfig::default()).unwrap(),
    );
    let q = &q[0];
    let trace_ms = (t.end_ns - t.start_ns) as f64 / 1e6;
    assert!(
        (0.0..=1.0).contains(&q.query_accuracy) && q.tm_mean_ms.unwrap_or(0.0) <= trace_ms,
        "P_A {} and T_M {:?} ms over a {trace_ms} ms trace",
        q.query_accuracy,
        q.tm_mean_ms
    );
}

/// hb's gate drops repeats of the newest sequence number, so its deadline
/// stays where the last fresh heartbeat put it, before the repeats: one
/// suspicion from that deadline to the end of the trace, counted once.
#[test]
fn a_suspicion_across_refused_heartbeats_is_counted_once() {
    // seq 1..=20 every second, then seq 20 again every second to 59 s.
    let t = seq_trace((0..60).map(|i| (i * 1000, (i + 1).min(20))));
    let spec = Spec::new(Kind::Hb, &[8.0], HbConfig::default()).unwrap();
    let mut det = spec.instance();
    for a in &t.nodes[&1][..20] {
        det.arrival(a);
    }
    let mut dl = [None];
    det.deadlines(&mut dl);
    let d = dl[0].unwrap();
    assert!(d > 19_000 * MS && d < 21_000 * MS, "{d}");
    let q = hb8(&t, &Crashes::new());
    let wrong = (t.end_ns - d) as f64;
    assert_eq!(q.mistakes, 1);
    assert!(close(q.tm_mean_ms.unwrap(), wrong / 1e6, 1e-9), "{q:?}");
    assert!(
        close(q.query_accuracy, 1.0 - wrong / t.end_ns as f64, 1e-12),
        "{q:?}"
    );
}

/// The exact operating point counts that suspicion once too: with one
/// mistake allowed, it is the one across the refused heartbeats, and the
/// threshold is the least that allows no other.
#[test]
fn optimum_counts_a_suspicion_across_refused_heartbeats_once() {
    // Node 1 as above; node 2 a steady sender that crashes at 30.5 s.
    let mut text = String::from("node_id,recv_ns,interval_ms,seq\n");
    for i in 0..60u64 {
        if i <= 30 {
            text += &format!("2,{},1000,{}\n", i * 1000 * MS, i + 1);
        }
        text += &format!("1,{},1000,{}\n", i * 1000 * MS + 1, (i + 1).min(20));
    }
    let t = Trace::read(text.as_bytes()).unwrap();
    let crashes: Crashes = [(2, 30_500 * MS)].into();
    let hours = ((t.end_ns - 1) + 30_500 * MS) as f64 / 3.6e12;
    let budget = 1.5 / hours;
    let hb = HbConfig::default();
    let q = optimum(&t, &crashes, Kind::Hb, hb, budget).unwrap();
    assert_eq!((q.mistakes, q.detected), (1, 1), "{q:?}");
    // The least: a slightly lower threshold errs on node 2's steady beats.
    let u = Kind::Hb.u_of_threshold(q.threshold).unwrap();
    let below = Kind::Hb.threshold_of_u(u - 1e-3).unwrap();
    let r = hb8_at(&t, &crashes, below);
    assert!(r.mistake_rate > budget, "{below} also meets it: {r:?}");
    // The profile agrees.
    let p = super::profile::Profile::build(&[(&t, &crashes)], Kind::Hb, hb, budget);
    let all: Vec<usize> = (0..t.nodes.len()).collect();
    let pt = p.point(&all, budget).unwrap();
    assert_eq!(pt.mistakes, 1, "{pt:?}");
    assert!(
        close(pt.mean_ms(), q.td_mean_ms.unwrap(), 1e-2),
        "{pt:?} {q:?}"
    );
}

fn hb8_at(trace: &Trace, crashes: &Crashes, threshold: f64) -> Qos {
    let spec = Spec::new(Kind::Hb, &[threshold], HbConfig::default()).unwrap();
    evaluate(trace, crashes, &spec).remove(0)
}

/// Traces carry no generation: a sequence number below the newest that
/// hb's window refuses (seen already, or older than the window) is the
/// sender's next incarnation, as the monitor would see it by its larger
/// generation. Whether it restarted after many heartbeats or a few, a
/// steady sender is then never suspected, by hb nor by chen (which reads
/// sequence numbers too).
#[test]
fn a_sequence_number_going_back_is_a_restart() {
    let old = seq_trace((0..200).map(|i| (i * 1000, i % 100 + 1)));
    let young = seq_trace((0..90).map(|i| (i * 1000, if i < 30 { i + 1 } else { i - 29 })));
    for (name, t) in [("old", &old), ("young", &young)] {
        let q = hb8(t, &Crashes::new());
        assert_eq!((q.mistakes, q.query_accuracy), (0, 1.0), "hb {name}: {q:?}");
        let spec = Spec::new(Kind::Chen, &[100.0], HbConfig::default()).unwrap();
        let q = &evaluate(t, &Crashes::new(), &spec)[0];
        assert_eq!(
            (q.mistakes, q.query_accuracy),
            (0, 1.0),
            "chen {name}: {q:?}"
        );
    }
}

/// The deadline of `spec`'s first threshold after one node's arrivals
/// `rows` (`(ms, seq)`).
fn deadline_after(spec: &Spec, rows: &[(u64, u64)]) -> Option<u64> {
    let mut det = spec.instance();
    for a in &seq_trace(rows.iter().copied()).nodes[&1] {
        det.arrival(a);
    }
    let mut out = [None];
    det.deadlines(&mut out);
    out[0]
}

/// A repeat of the newest sequence number is a duplicate, dropped as the
/// gate drops it: the deadline is the one before it.
#[test]
fn a_repeat_of_the_newest_seq_is_a_duplicate() {
    let spec = Spec::new(Kind::Hb, &[8.0], HbConfig::default()).unwrap();
    let dl = |rows: &[(u64, u64)]| deadline_after(&spec, rows);
    let plain: Vec<(u64, u64)> = (0..10).map(|i| (i * 1000, i + 1)).collect();
    let mut dup = plain.clone();
    dup.push((9500, 10));
    assert_eq!(dl(&dup), dl(&plain));
}

/// A datagram delayed past the window, or a duplicate of an old one, that
/// cannot be a new generation's first (its seq is past the first 64) is no
/// restart: hb drops it as the gate does (its deadline does not move), and
/// chen keeps its window (taking it for a restart emptied it: no deadline,
/// so a crash right after went undetected); chen then takes the arrival
/// into its estimate, as the paper's does.
#[test]
fn a_stray_old_sequence_number_is_dropped_not_a_restart() {
    for kind in [Kind::Hb, Kind::Chen] {
        let thr = if kind == Kind::Hb { 8.0 } else { 100.0 };
        let spec = Spec::new(kind, &[thr], HbConfig::default()).unwrap();
        let dl = |rows: &[(u64, u64)]| deadline_after(&spec, rows);
        let plain: Vec<(u64, u64)> = (0..200).map(|i| (i * 1000, i + 1)).collect();
        let mut stray = plain.clone();
        stray.push((199_500, 99));
        assert!(dl(&plain).is_some() && dl(&stray).is_some(), "{kind:?}");
        if kind == Kind::Hb {
            assert_eq!(dl(&stray), dl(&plain));
        }
    }
}

/// Sequence numbers at the top of the range, and a row without one after
/// them: no overflow (a panic in debug builds).
#[test]
fn sequence_numbers_at_u64_max_do_not_overflow() {
    let text = format!(
        "node_id,recv_ns,interval_ms,seq\n1,0,1000,{}\n1,{},1000,{}\n1,{},1000,\n",
        u64::MAX - 1,
        1000 * MS,
        u64::MAX,
        2000 * MS
    );
    let t = Trace::read(text.as_bytes()).unwrap();
    for kind in Kind::ALL {
        let spec = Spec::new(kind, &[1.0], HbConfig::default()).unwrap();
        evaluate(&t, &Crashes::new(), &spec);
    }
}

// ---------------------------------------------------------------- files and flags

#[test]
fn io_errors_name_the_file_and_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexist.csv");
    for (path, cause) in [
        (missing.as_path(), "os error 2"),
        (dir.path(), "os error 21"),
    ] {
        for e in [
            Trace::read_path(path).unwrap_err(),
            super::trace::read_crashes_path(path).unwrap_err(),
        ] {
            let msg = format!("{:#}", anyhow::Error::new(e));
            assert!(
                msg.starts_with(&format!("cannot read {}", path.display())),
                "{msg}"
            );
            assert_eq!(msg.matches(cause).count(), 1, "{msg}");
        }
    }
}

/// The detectors `hb eval --detector hb FLAGS` replays.
fn hb_specs(flags: &[&str]) -> anyhow::Result<Vec<Spec>> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: super::ReplayArgs,
    }
    use clap::Parser;
    let mut argv = vec!["hb", "--trace", "t.csv", "--detector", "hb"];
    argv.extend(flags);
    super::specs(&Cli::try_parse_from(argv).unwrap().a)
}

/// `hb eval` refuses the hb settings the monitor refuses, in one line.
#[test]
fn hb_settings_the_monitor_refuses_are_refused() {
    let specs = hb_specs;
    for bad in [
        &["--hb-pause-ms", "nan"][..],
        &["--hb-pause-ms=-5000"],
        &["--hb-min-std-ms", "0", "--hb-min-std-ratio", "0"],
        &["--hb-min-std-ms", "inf"],
        &["--hb-min-std-ratio=-0.1"],
        &["--hb-stall-factor=-1"],
        &["--hb-max-stall-ms", "nan"],
    ] {
        let e = format!("{:#}", specs(bad).unwrap_err());
        assert!(
            e.contains("non-negative") && !e.contains('\n'),
            "{bad:?}: {e}"
        );
    }
    for good in [
        &[][..],
        &["--hb-min-std-ms", "0"],
        &["--hb-min-std-ratio", "0"],
        &["--hb-pause-ms", "0", "--hb-stall-factor", "0"],
        &["--hb-max-stall-ms", "0"],
    ] {
        assert!(specs(good).is_ok(), "{good:?}");
    }
    // The monitor's own check and words, naming the flag.
    for bad in ["1", "999"] {
        let e = format!("{:#}", specs(&["--max-silence-ms", bad]).unwrap_err());
        assert_eq!(
            e,
            format!("--max-silence-ms: max_silence_ms must be 0 (off) or at least 1000, got {bad}")
        );
    }
    for good in ["0", "1000"] {
        assert!(specs(&["--max-silence-ms", good]).is_ok(), "{good}");
    }
    let spec = specs(&["--hb-max-stall-ms", "5000"]).unwrap();
    assert_eq!(
        format!("{spec:?}").matches("max_stall_ms: 5000.0").count(),
        1,
        "{spec:?}"
    );
}

/// Heartbeats in flight at a crash may arrive after it; a node that keeps
/// sending a minute after its crash is counted (`hb eval` warns). No
/// generated scenario has one.
#[test]
fn nodes_sending_after_their_crash_are_counted() {
    use super::trace::sending_after_crash;
    let t = trace_ms(&[
        (1, &[0, 1000, 2000, 3000]),
        (2, &[0, 1000, 2000, 3000, 100_000]),
        (3, &[0, 1000, 2000, 3000, 100_000]),
    ]);
    // 1: a heartbeat in flight; 2: sending long after; 3: never crashed;
    // 9: not in the trace.
    let crashes: Crashes = [(1, 2500 * MS), (2, 2500 * MS), (9, 0)].into();
    assert_eq!(sending_after_crash(&t, &crashes), 1);
    for s in Scenario::ALL {
        let (t, c) = make(s, 3, 10, 600);
        assert_eq!(sending_after_crash(&t, &c), 0, "{}", s.name());
    }
}

/// hb's detector has the monitor's backstop, at the monitor's default
/// (60 s): a node that announced a 50 s interval is suspected (dead) 60 s
/// into its silence, long before phi reaches 8 (after ~86 s). With `--max-silence-ms 0` phi
/// alone decides, as in a monitor run so.
#[test]
fn hb_applies_the_monitors_max_silence_backstop() {
    // Node 1 every 50 s, crashing just after its last heartbeat at 200 s;
    // node 2 every second, to 400 s.
    let mut rows: Vec<(u64, u32, u64, u64)> =
        (0..=4).map(|i| (i * 50_000, 1, 50_000, i + 1)).collect();
    rows.extend((0..=400).map(|i| (i * 1000, 2, 1000, i + 1)));
    rows.sort_unstable();
    let mut text = String::from("node_id,recv_ns,interval_ms,seq\n");
    for (t, id, interval, seq) in rows {
        text += &format!("{id},{},{interval},{seq}\n", t * MS);
    }
    let t = Trace::read(text.as_bytes()).unwrap();
    let crashes: Crashes = [(1, 200_000 * MS)].into();
    let td = |flags: &[&str]| {
        let spec = hb_specs(&[&["--threshold", "8"], flags].concat())
            .unwrap()
            .remove(0);
        let q = evaluate(&t, &crashes, &spec).remove(0);
        assert_eq!(q.detected, 1, "{flags:?}: {q:?}");
        q.td_mean_ms.unwrap()
    };
    assert_eq!(HbConfig::default().max_silence_ms, 60_000);
    assert_eq!(td(&[]), 60_000.0);
    assert_eq!(td(&["--max-silence-ms", "30000"]), 30_000.0);
    // Off: where the monitor's phi of node 1 crosses 8, to 1 us.
    let off = td(&["--max-silence-ms", "0"]);
    let mut st = hb_common::maps::NodeState::default();
    for seq in 1..=5 {
        record(&mut st, seq, 50_000, (seq - 1) * 50_000 * MS + 1);
    }
    let at = 200_000 * MS + 1 + (off * 1e6) as u64;
    let p = PhiParams::default();
    assert!(phi(&st, at, &p) >= 8.0, "{off} ms");
    assert!(phi(&st, at - 1_000, &p) < 8.0, "{off} ms");
    assert!(off > 75_000.0, "{off} ms");
    // A backstop later than phi changes nothing.
    assert_eq!(td(&["--max-silence-ms", "100000"]), off);
}

/// Property tests of `hb eval`'s input: any bytes as a trace or a crash
/// file are read or refused, never a panic; and whatever a well-formed
/// trace says (any times, gaps, intervals and sequence numbers, up to
/// their types' largest) every detector replays it, and the report is
/// made, without a panic or an arithmetic overflow (debug build).
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::eval::{table, trace::read_crashes};

    /// One row: node, time since the previous row, interval, seq.
    type Row = (u32, u64, Option<u32>, Option<u64>);

    fn row() -> impl Strategy<Value = Row> {
        (
            1..=4u32,
            prop_oneof![
                8 => 0..2_000 * MS,
                2 => 0..u64::MAX / 4,
                2 => Just(0u64),
                1 => Just(1u64 << 63),
                1 => u64::MAX / 2..=u64::MAX,
            ],
            prop::option::of(prop_oneof![
                Just(0u32),
                1..20_000u32,
                Just(u32::MAX),
                any::<u32>()
            ]),
            prop::option::of(prop_oneof![
                1..100u64,
                any::<u64>(),
                Just(u64::MAX),
                Just(0)
            ]),
        )
    }

    fn csv((start, rows): &(u64, Vec<Row>)) -> String {
        let mut s = String::from("node_id,recv_ns,interval_ms,seq\n");
        let mut t = *start;
        for (id, gap, iv, seq) in rows {
            t = t.saturating_add(*gap);
            let opt = |v: Option<String>| v.unwrap_or_default();
            s += &format!(
                "{id},{t},{},{}\n",
                opt(iv.map(|v| v.to_string())),
                opt(seq.map(|v| v.to_string()))
            );
        }
        s
    }

    fn crashes() -> impl Strategy<Value = Crashes> {
        prop::collection::btree_map(
            1..=5u32,
            prop_oneof![0..100_000 * MS, any::<u64>(), Just(u64::MAX)],
            0..4,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes_are_a_trace_or_a_named_error(
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                "node_id,recv_ns(,interval_ms(,seq)?)?\n([0-9, -]{0,30}\n){0,8}"
                    .prop_map(String::into_bytes),
            ],
        ) {
            if let Ok(t) = Trace::read(bytes.as_slice()) {
                prop_assert!(t.arrivals() > 0 && t.start_ns <= t.end_ns);
            }
            let _ = read_crashes(bytes.as_slice());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn any_well_formed_trace_replays_through_every_detector(
            trace in (prop_oneof![Just(0u64), any::<u64>()], prop::collection::vec(row(), 1..60)),
            crashes in crashes(),
        ) {
            let text = csv(&trace);
            let t = Trace::read(text.as_bytes()).unwrap();
            // Nothing read is lost: it writes back as it was read.
            let mut back = Vec::new();
            t.write(&mut back).unwrap();
            prop_assert_eq!(Trace::read(back.as_slice()).unwrap(), t.clone());
            let _ = crate::eval::trace::sending_after_crash(&t, &crashes);
            let _ = crate::eval::trace::crashes_after_end(&t, &crashes);
            let mut rows = Vec::new();
            for kind in Kind::ALL {
                let spec = Spec::new(kind, &kind.default_thresholds(), HbConfig::default()).unwrap();
                rows.extend(evaluate(&t, &crashes, &spec));
            }
            prop_assert!(!rows.is_empty());
            let _ = table(&rows);
            let _ = serde_json::to_string_pretty(&rows).unwrap();
        }
    }
}

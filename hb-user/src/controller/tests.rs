//! Unit tests of the controller against a synthetic node: its gate state
//! is what `NodeState::record` would hold after a period at the requested
//! interval with a given jitter, loss and load. The end-to-end behaviour
//! over a simulated network is tested in `simulate`.

use std::path::PathBuf;

use hb_common::maps::NodeState;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// A node whose heartbeats arrive at its interval with a mean absolute
/// deviation of `jitter` times the interval, losing `loss` of them.
struct SynthNode {
    state: NodeState,
    jitter: f64,
    loss: f64,
}

impl SynthNode {
    fn new(interval_ms: u32, jitter: f64, loss: f64, load: u16) -> SynthNode {
        SynthNode {
            state: NodeState {
                generation: 1,
                interval_ms,
                // As if an earlier monitor had asked for it: the controller
                // goes on from the node's interval (a fresh node starts at
                // `start_ms`, tested on its own).
                requested_interval_ms: interval_ms,
                load,
                last_arrival_ns: 1,
                ..NodeState::default()
            },
            jitter,
            loss,
        }
    }

    /// One decision period of `period_ms` at the node's interval.
    fn period(&mut self, period_ms: u64) {
        let iv = self.state.interval_ms.max(1) as u64;
        let sent = (period_ms / iv).max(3);
        let lost = (sent as f64 * self.loss).round() as u64;
        self.state.accepted += sent - lost;
        self.state.lost += lost;
        // The detector's EWMA mean includes the gaps losses leave.
        self.state.ia_mean_ns = (iv as f64 * (1.0 + self.loss) * 1e6) as u64;
        self.state.ia_dev_ns = (iv as f64 * (self.jitter + 2.0 * self.loss) * 1e6) as u64;
        self.state.ia_samples = self.state.ia_samples.saturating_add((sent - lost) as u16);
        self.state.last_arrival_ns += period_ms * 1_000_000;
    }

    /// The sender adopts the decision; a new interval re-seeds the
    /// detector (`NodeState::record`), which then takes samples afresh.
    fn adopt(&mut self, d: &Decision) {
        if self.state.interval_ms != d.interval_ms {
            self.state.ia_samples = 0;
        }
        self.state.interval_ms = d.interval_ms;
        self.state.requested_interval_ms = d.interval_ms;
    }
}

fn controller(seed: u64) -> QController {
    QController::new(Config {
        seed,
        ..Config::default()
    })
    .unwrap()
}

/// Runs `nodes` synthetic nodes for `decisions` rounds; returns the
/// interval of node 0 after each round.
fn train(c: &mut QController, nodes: &mut [SynthNode], rounds: usize) -> Vec<u32> {
    let mut trace = Vec::new();
    for _ in 0..rounds {
        for (i, n) in nodes.iter_mut().enumerate() {
            n.period(10_000);
            let d = c.observe(i as u32 + 1, &n.state, 0);
            n.adopt(&d);
        }
        trace.push(nodes[0].state.interval_ms);
    }
    trace
}

#[test]
fn decisions_stay_in_bounds_and_move_one_step() {
    let mut c = controller(7);
    c.set_epsilon(Some(1.0)); // all exploration: the worst case for steps
    c.set_cap(3, Some(2000));
    let grid = c.grid().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut last: HashMap<u32, usize> = HashMap::new();
    for _ in 0..20_000 {
        let node = rng.random_range(1..6u32);
        let obs = Observation {
            generation: 1,
            interval_ms: rng.random_range(0..=u32::MAX),
            requested_interval_ms: if rng.random::<bool>() {
                0
            } else {
                rng.random()
            },
            rtt_ms: Some(rng.random::<f64>() * 1e6),
            loss_rate: rng.random(),
            jitter: if rng.random::<bool>() {
                f64::NAN
            } else {
                rng.random::<f64>() * 100.0
            },
            mean_ms: rng.random::<f64>() * 1e7,
            arrival_mean_ms: if rng.random::<bool>() {
                f64::NAN
            } else {
                rng.random::<f64>() * 1e7
            },
            sigma_ms: rng.random::<f64>() * 1e7,
            stall_floor_ms: if rng.random::<bool>() {
                f64::NAN
            } else {
                rng.random::<f64>() * 1e7
            },
            load_permille: rng.random(),
            new_samples: rng.random_range(0..10),
            new_lost: rng.random_range(0..10),
            settled_samples: rng.random_range(0..20),
            refuted_suspicions: rng.random(),
        };
        let d = c.decide(node, &obs);
        assert!((100..=10_000).contains(&d.interval_ms), "{d:?}");
        if node == 3 {
            assert!(d.interval_ms <= 2000, "cap: {d:?}");
        }
        let level = grid.level_of(d.interval_ms);
        assert_eq!(grid.ms(level), d.interval_ms, "decisions are on the grid");
        if let Some(&prev) = last.get(&node) {
            assert!(level.abs_diff(prev) <= 1, "{prev} -> {level}");
        }
        last.insert(node, level);
        if let Some(r) = d.reward {
            assert!(r.is_finite());
        }
    }
}

#[test]
fn forged_extreme_load_cannot_push_past_bounds_or_steps() {
    let mut c = controller(1);
    let mut node = SynthNode::new(100, 0.02, 0.0, u16::MAX);
    let mut prev = c.grid().level_of(100);
    for _ in 0..5000 {
        node.period(10_000);
        let d = c.observe(9, &node.state, 0);
        let level = c.grid().level_of(d.interval_ms);
        assert!(level.abs_diff(prev) <= 1);
        assert!((100..=10_000).contains(&d.interval_ms));
        prev = level;
        node.adopt(&d);
    }
    // A forged load weighs exactly like the largest legitimate load.
    let obs = |load| Observation {
        interval_ms: 1000,
        mean_ms: 1000.0,
        sigma_ms: 100.0,
        load_permille: load,
        ..Observation::default()
    };
    assert_eq!(c.reward(&obs(u16::MAX)), c.reward(&obs(1000)));
    // Observations through `from_states` clamp it as well.
    let o = Observation::from_states(None, &node.state, 0, &PhiParams::default());
    assert_eq!(o.load_permille, 1000);
}

#[test]
fn cap_applies_at_once_and_holds() {
    let mut c = controller(3);
    let mut node = SynthNode::new(10_000, 0.0, 0.0, 0);
    node.period(60_000);
    let d = c.observe(1, &node.state, 0);
    assert!(d.interval_ms >= 5000);
    c.set_cap(1, Some(1000));
    node.period(60_000);
    let d = c.observe(1, &node.state, 0);
    assert_eq!((d.reason, d.interval_ms), (Reason::Cap, 1000));
    for _ in 0..200 {
        node.adopt(&d);
        node.period(60_000);
        let d = c.observe(1, &node.state, 0);
        assert!(d.interval_ms <= 1000, "{d:?}");
    }
}

#[test]
fn a_node_nobody_steered_starts_where_a_calm_path_meets_the_target() {
    let mut last = 0;
    for target in [
        150.0, 300.0, 1000.0, 1583.0, 3000.0, 7607.0, 20_000.0, 3.6e6,
    ] {
        let c = QController::new(Config {
            target_detection_ms: target,
            ..Config::default()
        })
        .unwrap();
        let (grid, start) = (c.grid().clone(), c.start_ms());
        let level = grid.level_of(start);
        assert_eq!(grid.ms(level), start, "{target}: on the grid");
        // The slowest level within the budget (the fastest if none is).
        if level > 0 {
            assert!(c.calm_late_share(start) <= 0.01, "{target}: {start} ms");
        }
        if level + 1 < grid.len() {
            assert!(c.calm_late_share(grid.ms(level + 1)) > 0.01, "{target}");
        }
        assert!(start >= last, "a looser target never starts faster");
        last = start;
    }
    assert_eq!(last, 10_000, "a target nothing misses starts at the bound");

    // A fresh node (no request yet, at the sender's own 1 s) starts at
    // `start_ms` whatever it reports, and settles there first.
    let mut c = controller(1);
    let start = c.start_ms();
    assert_ne!(start, 1000, "the target's start level is not the sender's");
    for (node, rtt_us, load) in [(1, 0, 0), (2, u32::MAX, u16::MAX)] {
        let mut n = SynthNode::new(1000, 0.3, 0.2, load);
        n.state.requested_interval_ms = 0;
        n.state.rtt_us = rtt_us;
        n.period(10_000);
        let d = c.observe(node, &n.state, 0);
        assert_eq!((d.reason, d.interval_ms), (Reason::Start, start), "{d:?}");
        let expected = if start > 1000 {
            Action::Slower
        } else {
            Action::Faster
        };
        assert_eq!(d.action, expected);
        n.period(10_000); // not adopted yet: settling
        assert_eq!(c.observe(node, &n.state, 0).reason, Reason::Settling);
    }
    assert_eq!(c.decisions(), 0, "nothing was learned from a start");

    // A request that outlived the controller's memory (a monitor
    // restarted over pinned maps) is where the node goes on from.
    let mut n = SynthNode::new(200, 0.02, 0.0, 0);
    n.period(10_000);
    let d = c.observe(3, &n.state, 0);
    assert_ne!(d.reason, Reason::Start);
    assert!(
        c.grid()
            .level_of(d.interval_ms)
            .abs_diff(c.grid().level_of(200))
            <= 1
    );

    // A critical node starts at its cap when that is faster.
    c.set_cap(4, Some(300));
    let mut n = SynthNode::new(1000, 0.02, 0.0, 0);
    n.state.requested_interval_ms = 0;
    n.period(10_000);
    let d = c.observe(4, &n.state, 0);
    assert_eq!((d.reason, d.interval_ms), (Reason::Start, 300));
}

#[test]
fn too_few_heartbeats_means_hold_without_learning() {
    let mut c = QController::new(Config {
        min_samples: 3,
        ..Config::default()
    })
    .unwrap();
    let mut s = NodeState {
        generation: 1,
        interval_ms: 1000,
        requested_interval_ms: 1000,
        accepted: 10,
        ia_mean_ns: 1_000_000_000,
        last_arrival_ns: 1,
        ..NodeState::default()
    };
    // The first look counts one heartbeat (the counters' start is
    // unknown): too few here, but the next period is counted from it.
    assert_eq!(c.observe(1, &s, 0).reason, Reason::NoData);
    s.accepted += 3;
    let first = c.observe(1, &s, 0);
    assert_ne!(first.reason, Reason::NoData);
    s.accepted += 2; // fewer than min_samples
    let d = c.observe(1, &s, 0);
    assert_eq!((d.reason, d.action), (Reason::NoData, Action::Hold));
    assert_eq!(d.interval_ms, first.interval_ms);
    assert_eq!(c.decisions(), 1);
    assert_eq!(c.last_decision(1), Some(&first), "holds are not decisions");
    assert_eq!(c.last_decision(2), None);
    // The samples accumulate: one more makes a period.
    s.accepted += 1;
    assert_ne!(c.observe(1, &s, 0).reason, Reason::NoData);
    // By default one heartbeat is enough, none is not.
    let mut c = controller(1);
    let first = c.observe(1, &s, 0);
    assert_ne!(first.reason, Reason::NoData);
    assert_eq!(c.observe(1, &s, 0).reason, Reason::NoData);
    s.accepted += 1;
    assert_ne!(c.observe(1, &s, 0).reason, Reason::NoData);
}

#[test]
fn same_seed_same_decisions_other_seed_differs() {
    let run = |seed| {
        let mut c = controller(seed);
        let mut nodes: Vec<SynthNode> = (0..5)
            .map(|i| SynthNode::new(1000, 0.05 * i as f64, 0.01 * i as f64, 100 * i))
            .collect();
        let mut out = Vec::new();
        for _ in 0..300 {
            for (i, n) in nodes.iter_mut().enumerate() {
                n.period(10_000);
                let d = c.observe(i as u32, &n.state, 0);
                out.push((d.interval_ms, d.action, d.reason));
                n.adopt(&d);
            }
        }
        (out, serde_json::to_string(&c.snapshot()).unwrap())
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42).0, run(43).0);
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hb-ctrl-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("table.json")
}

#[test]
fn saves_at_the_same_time_leave_a_whole_table() {
    // The monitor's minute save and a reload's can overlap.
    let mut c = controller(5);
    let mut nodes: Vec<SynthNode> = (0..4).map(|_| SynthNode::new(100, 0.02, 0.0, 50)).collect();
    train(&mut c, &mut nodes, 50);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.json");
    let t = c.table_file();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..300 {
                    t.save(&path).unwrap();
                }
            });
        }
    });
    assert_eq!(table::read(&path).unwrap(), t);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "no temporary file left behind");
}

#[test]
fn table_round_trips_and_bad_files_are_refused_clearly() {
    let mut c = controller(5);
    let mut nodes: Vec<SynthNode> = (0..4).map(|_| SynthNode::new(100, 0.02, 0.0, 50)).collect();
    train(&mut c, &mut nodes, 200);
    let path = temp_path("roundtrip");
    c.save(&path).unwrap();

    let mut d = controller(6);
    d.load(&path).unwrap();
    assert_eq!(d.rows(), c.rows());
    assert_eq!(d.decisions(), c.decisions());
    assert_eq!(d.epsilon(), c.epsilon());
    // The printed form names every visited state.
    let text = cli::render(&table::read(&path).unwrap(), 0);
    assert!(text.contains("greedy"));
    assert_eq!(text.lines().count(), 5 + c.rows().len());

    // A truncated file.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = d.load(&path).unwrap_err().to_string();
    assert!(e.contains("not valid JSON"), "{e}");
    // A good table, refused by a controller configured otherwise.
    let refused_by = |cfg: Config| {
        c.save(&path).unwrap();
        let mut other = QController::new(cfg).unwrap();
        other.load(&path).unwrap_err().to_string()
    };
    // Another controller's grid.
    let e = refused_by(Config {
        max_interval_ms: 5000,
        ..Config::default()
    });
    assert!(e.contains("interval levels"), "{e}");
    // An index out of range.
    let mut t = table::read(&path).unwrap();
    t.rows[0].index = u32::MAX;
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
    let e = d.load(&path).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
    // A row twice (hand-edited): loading would keep one silently.
    let mut t = c.table_file();
    t.rows.push(t.rows[0].clone());
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
    let e = d.load(&path).unwrap_err().to_string();
    assert!(e.contains("appears twice"), "{e}");
    // A later version, whatever its layout: named, not a JSON error.
    std::fs::write(
        &path,
        r#"{"format":"hb-controller-table","version":3,"tables":[]}"#,
    )
    .unwrap();
    let e = d.load(&path).unwrap_err().to_string();
    assert!(e.contains("version 3 is not supported"), "{e}");
    // Counters at their limit (hand-edited) saturate instead of wrapping
    // to 0, which reset exploration and made the reward mean NaN, a value
    // no table file can hold.
    let mut t = c.table_file();
    (t.decisions, t.explorations, t.rewards.count) = (u64::MAX, u64::MAX, u64::MAX);
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
    let mut e = controller(7);
    e.load(&path).unwrap();
    let mut more: Vec<SynthNode> = (0..4).map(|_| SynthNode::new(100, 0.02, 0.0, 50)).collect();
    train(&mut e, &mut more, 20);
    assert_eq!(e.decisions(), u64::MAX);
    e.save(&path).unwrap();
    assert!(table::read(&path).unwrap().rewards.mean.is_finite());
    // Another detection target: the headroom buckets and every reward
    // are relative to it.
    let e = refused_by(Config {
        target_detection_ms: 1000.0,
        ..Config::default()
    });
    assert!(e.contains("3000 ms detection target"), "{e}");
    // A table of stop 7's layout (version 1: no headroom, no update
    // counts) is named as such, not misread and not a JSON error.
    std::fs::write(
        &path,
        r#"{"format":"hb-controller-table","version":1,"levels_ms":[100,147,215,316,464,681,1000,1468,2154,3162,4642,6813,10000],
            "target_detection_ms":3000.0,"decisions":5,"explorations":1,
            "rewards":{"count":1,"mean":-1.0,"min":-1.0,"max":-1.0,"last":-1.0,"mean_detection_ms":1.0,"over_target":0},
            "rows":[{"index":7,"state":{"rtt":"<2ms","loss":"0%","jitter":"<0.05","load":"<250","interval_ms":1468},
                     "visits":3,"q":[-1.0,-2.0,-3.0],"greedy":"slower"}]}"#,
    )
    .unwrap();
    let e = d.load(&path).unwrap_err().to_string();
    assert!(
        e.contains("version 1") && e.contains("remove the file"),
        "{e}"
    );
    let e = table::read(&path).unwrap_err().to_string();
    assert!(e.contains("version 1"), "{e}");
    // A missing file names the path.
    let missing = path.with_file_name("missing.json");
    let e = d.load(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.json"), "{e}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// The level the reward's model says is the slowest within the target.
fn best_level(c: &QController, jitter: f64, loss: f64) -> usize {
    let mut best = 0;
    for k in 0..c.grid().len() {
        let mut n = SynthNode::new(c.grid().ms(k), jitter, loss, 0);
        n.period(10_000);
        let o = Observation::from_states(None, &n.state, 0, &c.config().phi);
        if c.detection_ms(&o) <= c.config().target_detection_ms {
            best = k;
        }
    }
    best
}

#[test]
fn learns_to_slow_down_on_a_calm_lan() {
    let mut c = controller(11);
    let mut nodes: Vec<SynthNode> = (0..20)
        .map(|_| SynthNode::new(100, 0.02, 0.0, 50))
        .collect();
    train(&mut c, &mut nodes, 400);
    // Evaluate the greedy policy from 100 ms.
    c.set_epsilon(Some(0.0));
    c.reset_nodes();
    let mut eval = vec![SynthNode::new(100, 0.02, 0.0, 50)];
    let trace = train(&mut c, &mut eval, 40);
    let end = *trace.last().unwrap();
    let target = c.grid().ms(best_level(&c, 0.02, 0.0));
    assert!(end > 1000, "slowed down from 100 ms: {trace:?}");
    assert!(
        end <= target,
        "within the detection target ({target}): {trace:?}"
    );
}

#[test]
fn under_loss_and_jitter_it_stays_within_the_target() {
    let mut c = controller(12);
    let mut nodes: Vec<SynthNode> = (0..20)
        .map(|_| SynthNode::new(5000, 0.25, 0.05, 50))
        .collect();
    train(&mut c, &mut nodes, 400);
    c.set_epsilon(Some(0.0));
    c.reset_nodes();
    let mut eval = vec![SynthNode::new(5000, 0.25, 0.05, 50)];
    let trace = train(&mut c, &mut eval, 40);
    let end = *trace.last().unwrap();
    let best = c.grid().ms(best_level(&c, 0.25, 0.05));
    assert!(best < 1000, "the scenario is a hard one: {best}");
    assert!(
        end <= best,
        "sped up to meet the target ({best}): {trace:?}"
    );
    assert!(end >= c.grid().ms(best_level(&c, 0.25, 0.05).saturating_sub(2)));
}

#[test]
fn sigmas_to_threshold_matches_phi() {
    let c = Config::default();
    let k = c.sigmas_to_threshold();
    assert!((phi_normal(k, 0.0, 1.0) - 8.0).abs() < 1e-6);
    assert!(k > 5.0 && k < 5.5, "{k}");
}

#[test]
fn an_unreachable_target_still_prefers_faster() {
    let c = QController::new(Config {
        target_detection_ms: 50.0,
        ..Config::default()
    })
    .unwrap();
    let mut last = f64::INFINITY;
    for &ms in &c.grid().levels_ms {
        let mut n = SynthNode::new(ms, 0.05, 0.0, 1000);
        n.period(60_000);
        let o = Observation::from_states(None, &n.state, 0, &c.config().phi);
        let (r, _) = c.reward(&o);
        assert!(r < last, "{ms} ms: reward {r} not below {last}");
        last = r;
    }
}

#[test]
fn late_share_is_the_share_of_crashes_past_the_target() {
    // The sum of two uniforms, against its closed form's corners.
    assert_eq!(sum_of_uniforms_below(-1.0, 1000.0, 100.0), 0.0);
    assert_eq!(sum_of_uniforms_below(1100.0, 1000.0, 100.0), 1.0);
    assert!((sum_of_uniforms_below(50.0, 1000.0, 100.0) - 0.0125).abs() < 1e-12);
    assert!((sum_of_uniforms_below(550.0, 1000.0, 100.0) - 0.5).abs() < 1e-12);
    assert_eq!(
        sum_of_uniforms_below(30.0, 100.0, 1000.0),
        sum_of_uniforms_below(30.0, 1000.0, 100.0)
    );
    // ... and against sampling it.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 200_000;
    let hits = (0..n)
        .filter(|_| rng.random::<f64>() * 700.0 + rng.random::<f64>() * 100.0 < 120.0)
        .count();
    let p = sum_of_uniforms_below(120.0, 700.0, 100.0);
    assert!((hits as f64 / n as f64 - p).abs() < 0.003, "{p}");

    // A calm node at 1 s: the worst crash is detected after
    // 1000 + k * 100 + tick ms; a target 40 ms below that leaves under 1%
    // of crashes late (the p99 of a fixed 1 s is about there), a target
    // half an interval below, about half of them.
    let c = controller(1);
    let obs = Observation {
        interval_ms: 1000,
        mean_ms: 1000.0,
        sigma_ms: 100.0,
        ..Observation::default()
    };
    let d = c.detection_ms(&obs);
    let at = |target: f64| {
        QController::new(Config {
            target_detection_ms: target,
            ..Config::default()
        })
        .unwrap()
        .late_share(&obs, d)
    };
    assert_eq!(c.late_share(&obs, d), 0.0, "3 s target: none late");
    assert!(at(d - 40.0) < 0.01, "{}", at(d - 40.0));
    assert!((at(d - 550.0) - 0.5).abs() < 1e-9);
    assert_eq!(at(100.0), 1.0);
    // Unusable observations count as all late.
    assert_eq!(c.late_share(&obs, f64::NAN), 1.0);
}

/// The monitor does not suspect a node that pauses before its stall
/// allowance: the modelled detection time is the later of phi's deadline
/// and the allowance, so beating faster does not seem to help such a node.
#[test]
fn a_pausing_nodes_detection_is_no_sooner_than_its_stall_allowance() {
    let c = controller(1);
    let obs = |floor: f64| Observation {
        interval_ms: 100,
        mean_ms: 100.0,
        sigma_ms: 20.0,
        stall_floor_ms: floor,
        ..Observation::default()
    };
    let steady = c.detection_ms(&obs(0.0));
    assert_eq!(c.detection_ms(&obs(50.0)), steady, "below phi's deadline");
    assert_eq!(c.detection_ms(&obs(f64::NAN)), steady);
    let (d3, d4) = (c.detection_ms(&obs(3100.0)), c.detection_ms(&obs(4100.0)));
    assert!(d3 > steady + 2500.0, "{d3} vs {steady}");
    assert_eq!(d4 - d3, 1000.0, "the allowance sets it");
}

#[test]
fn a_decision_covers_the_time_it_took() {
    let c = controller(1);
    let obs = |n: u64, iv: u32| Observation {
        interval_ms: iv,
        new_samples: n,
        ..Observation::default()
    };
    assert_eq!(c.periods(&obs(50, 100)), 1.0);
    assert_eq!(c.periods(&obs(3, 5000)), 3.0);
    assert_eq!(c.periods(&obs(u64::MAX / 2, u32::MAX)), 8.0, "bounded");
    assert_eq!(c.periods(&obs(0, 1000)), 0.25, "bounded");
}

#[test]
fn a_step_slower_is_judged_once_the_detector_has_settled() {
    let mut c = controller(4);
    c.set_epsilon(Some(0.0));
    let mut n = SynthNode::new(1000, 0.02, 0.0, 50);
    // Find a state where the greedy step is slower: a fresh table holds
    // (ties), so teach it with exploration first.
    c.set_epsilon(Some(1.0));
    let mut slower = None;
    for _ in 0..200 {
        n.period(5000);
        let d = c.observe(1, &n.state, 0);
        n.adopt(&d);
        if d.action == Action::Slower {
            slower = Some(d);
            break;
        }
    }
    let step = slower.expect("exploration steps slower");
    c.set_epsilon(Some(1.0));
    let decisions = c.decisions();
    // Until eight samples at the new interval, every answer is "hold,
    // settling", whatever epsilon says, and nothing is counted as a
    // decision.
    let mut holds = 0;
    loop {
        n.period(step.interval_ms as u64); // one heartbeat per period
        let d = c.observe(1, &n.state, 0);
        if d.reason != Reason::Settling {
            assert!(n.state.ia_samples as u32 >= SETTLE_SAMPLES, "{d:?}");
            break;
        }
        assert_eq!((d.action, d.interval_ms), (Action::Hold, step.interval_ms));
        assert!(d.late_share.is_some() && d.reward.is_some());
        assert_eq!(c.last_decision(1), Some(&d), "/nodes shows it");
        holds += 1;
        assert!(holds < 20, "settling ends");
    }
    assert!(holds >= 1);
    assert_eq!(c.decisions(), decisions + 1);

    // A sender that never adopts the interval (its own bounds) does not
    // hold the node forever.
    let mut c = controller(4);
    c.set_epsilon(Some(1.0));
    let mut stuck = SynthNode::new(1000, 0.02, 0.0, 50);
    let mut longest = 0;
    let mut run = 0;
    for _ in 0..500 {
        stuck.period(5000);
        let d = c.observe(2, &stuck.state, 0);
        run = if d.reason == Reason::Settling {
            run + 1
        } else {
            0
        };
        longest = longest.max(run);
    }
    assert!(longest < MAX_SETTLE_PERIODS as usize, "{longest}");
}

/// How many experiences the table has learned from, over all its rows.
fn learned(c: &QController) -> u64 {
    c.rows().iter().map(|r| r.updates.iter().sum::<u64>()).sum()
}

/// The table, which every node shares, learns only from periods in which
/// the node ran at the level it was asked for: a sender whose own bounds
/// exclude the request (or one that lies about its interval) teaches it
/// nothing, while it goes on deciding for the node.
#[test]
fn a_node_that_does_not_follow_teaches_the_table_nothing() {
    for follows in [true, false] {
        let mut c = controller(5);
        c.set_epsilon(Some(1.0));
        // 1200 ms is on no level of the grid: the node is never at the
        // level asked for unless it follows.
        let mut n = SynthNode::new(1200, 0.02, 0.0, 50);
        let mut decided = 0;
        for _ in 0..300 {
            n.period(5000);
            let d = c.observe(1, &n.state, 0);
            decided += u32::from(matches!(d.reason, Reason::Greedy | Reason::Explore));
            if follows {
                n.adopt(&d);
            } else {
                n.state.requested_interval_ms = d.interval_ms;
            }
        }
        assert!(decided > 20, "it decides either way ({decided})");
        if follows {
            assert!(learned(&c) > 50, "{}", learned(&c));
        } else {
            assert_eq!(learned(&c), 0);
        }
    }
}

/// A node that echoes whatever interval it is asked for while its
/// heartbeats arrive ten times as often teaches the table nothing either.
#[test]
fn a_node_lying_about_its_interval_teaches_the_table_nothing() {
    for lies in [false, true] {
        let mut c = controller(5);
        c.set_epsilon(Some(1.0));
        let mut n = SynthNode::new(1000, 0.02, 0.0, 50);
        for _ in 0..300 {
            n.period(5000);
            if lies {
                // Ten times the heartbeats: ten times the samples.
                n.state.ia_mean_ns /= 10;
                n.state.ia_samples = n.state.ia_samples.saturating_mul(10);
            }
            let d = c.observe(1, &n.state, 0);
            n.adopt(&d);
        }
        if lies {
            assert_eq!(learned(&c), 0);
        } else {
            assert!(learned(&c) > 50, "{}", learned(&c));
        }
    }
}

#[test]
fn a_restart_keeps_the_level_and_waits_to_settle() {
    let mut c = controller(2);
    c.set_epsilon(Some(0.0));
    let mut n = SynthNode::new(1000, 0.02, 0.0, 50);
    c.set_cap(1, Some(500));
    n.period(5000);
    let d = c.observe(1, &n.state, 0);
    assert_eq!((d.reason, d.interval_ms), (Reason::Cap, 500));
    n.adopt(&d);
    n.period(5000);
    c.observe(1, &n.state, 0);
    // The node restarts at its own default interval: the controller asks
    // for the same level it had (the monitor's request stands), holding
    // while the detector re-seeds.
    n.state.generation += 1;
    n.state.interval_ms = 1000;
    n.state.ia_samples = 0;
    n.period(1000);
    let d = c.observe(1, &n.state, 0);
    assert_eq!((d.reason, d.interval_ms), (Reason::Settling, 500));
}

/// Without memory of a node (a monitor restarted over pinned maps, a
/// reload, a switch from another policy) the standing request is the last
/// decision: the next is at most one level from it, whatever interval the
/// node reports. From the reported one, a node reporting u32::MAX moved
/// its request from 1 s to 10 s at once.
#[test]
fn without_memory_of_a_node_its_standing_request_is_where_it_steps_from() {
    let grid = controller(1).grid().clone();
    for reported in [u32::MAX, 10_000, 0, 1] {
        let mut c = controller(1);
        c.set_epsilon(Some(0.0));
        let obs = Observation {
            generation: 1,
            interval_ms: reported,
            requested_interval_ms: 1000,
            mean_ms: 1000.0,
            sigma_ms: 100.0,
            new_samples: 1,
            ..Observation::default()
        };
        let d = c.decide(7, &obs);
        let (prev, now) = (grid.level_of(1000), grid.level_of(d.interval_ms));
        assert!(
            now.abs_diff(prev) <= 1,
            "reported {reported}: standing request 1000 ms -> decision {} ms ({:?})",
            d.interval_ms,
            d.reason
        );
    }
}

/// A hand-edited table whose Q values are finite but huge is refused at
/// load (loaded, the next update overflowed to infinity, and the next
/// save wrote `null`s no start could read); a non-finite value is never
/// saved; the `greedy` a file states is recomputed from its values.
#[test]
fn table_values_out_of_range_are_refused_and_greedy_is_recomputed() {
    let mut c = controller(1);
    let mut node = SynthNode::new(1000, 0.02, 0.0, 100);
    for _ in 0..50 {
        node.period(5000);
        let d = c.observe(1, &node.state, 0);
        node.adopt(&d);
    }
    let good = c.table_file();
    let p = temp_path("huge-q.json");
    let mut t = good.clone();
    t.rows[0].q = [f64::MAX, -f64::MAX, f64::MAX];
    t.save(&p).unwrap();
    let e = table::read(&p).unwrap_err().to_string();
    assert!(e.contains("not a finite number within"), "{e}");
    let mut t = good.clone();
    t.rows[0].q[1] = f64::NAN;
    assert!(t.save(&p).is_err(), "a NaN is not saved");
    let mut t = good.clone();
    t.rows[0].q = [-1.0, -5.0, -9.0];
    t.rows[0].greedy = Action::Faster;
    t.save(&p).unwrap();
    let r = table::read(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    assert_ne!(
        r.rows[0].greedy,
        Action::Faster,
        "recomputed from the values"
    );
}

/// A reload or a restart over pinned maps finds a node whose standing
/// request is a step it has not heard yet (it still announces the level
/// before): without memory of when that step was taken, the controller
/// holds (`settling`) until the node follows and its detector settles, so
/// its first decision is never a second step, two levels from where the
/// node runs. A node that never follows is held no longer than
/// [`MAX_SETTLE_PERIODS`], showing why meanwhile.
#[test]
fn without_memory_of_a_node_it_waits_for_the_node_to_follow_its_standing_request() {
    let grid = controller(1).grid().clone();
    let (runs, requested) = (1000, 1500);
    let obs = |interval_ms: u32, settled_samples: u32| Observation {
        generation: 1,
        interval_ms,
        requested_interval_ms: requested,
        mean_ms: interval_ms as f64,
        arrival_mean_ms: interval_ms as f64,
        sigma_ms: interval_ms as f64 / 10.0,
        new_samples: 5,
        settled_samples,
        ..Observation::default()
    };
    // Exploring every time: without the hold, a third of these nodes
    // stepped again from the standing request (1500 -> 2000 ms, two
    // levels from the 1000 ms they run at).
    let mut c = controller(3);
    c.set_epsilon(Some(1.0));
    let decided: Vec<(u32, Decision)> = (1..=60)
        .map(|node| (node, c.decide(node, &obs(runs, 20))))
        .collect();
    let jumps: Vec<_> = decided
        .iter()
        .filter(|(_, d)| grid.level_of(d.interval_ms).abs_diff(grid.level_of(runs)) > 1)
        .collect();
    assert!(jumps.is_empty(), "nodes at {runs} ms: {jumps:?}");
    for (node, d) in decided {
        assert_eq!(
            (d.reason, d.action, d.interval_ms),
            (Reason::Settling, Action::Hold, requested),
            "node {node}"
        );
        assert_eq!(c.last_decision(node), Some(&d), "/nodes shows why");
    }
    // Node 1 follows: held while its detector settles at 1500 ms, then
    // decided for again (one step from 1500 at most).
    let d = c.decide(1, &obs(requested, 2));
    assert_eq!((d.reason, d.interval_ms), (Reason::Settling, requested));
    let d = c.decide(1, &obs(requested, SETTLE_SAMPLES));
    assert_ne!(d.reason, Reason::Settling, "{d:?}");
    assert!(
        grid.level_of(d.interval_ms)
            .abs_diff(grid.level_of(requested))
            <= 1
    );

    // A node that already runs settled at its standing request is decided
    // for at once.
    let mut c = controller(3);
    c.set_epsilon(Some(1.0));
    for node in 1..=20 {
        let d = c.decide(node, &obs(requested, 20));
        assert_ne!(d.reason, Reason::Settling, "node {node}: {d:?}");
    }

    // Node 2 never follows (its own bounds exclude 1500 ms): held, and
    // shown as held, for at most MAX_SETTLE_PERIODS periods; then decided
    // for as any node that does not follow.
    let mut c = controller(3);
    c.set_epsilon(Some(1.0));
    let mut held = 0;
    loop {
        let d = c.decide(2, &obs(runs, 20));
        if d.reason != Reason::Settling {
            break;
        }
        assert_eq!(c.last_decision(2).map(|d| d.reason), Some(Reason::Settling));
        held += 1;
        assert!(held <= MAX_SETTLE_PERIODS, "held for ever");
    }
    assert!(held >= 1);
}

/// A save interrupted by the death of its process (a crash between
/// creating its temporary file and the rename) leaves `.NAME.tmp-PID-N`
/// beside the table: the next save removes it, and nothing that is not
/// such a leftover.
#[test]
fn a_save_removes_what_dead_saves_left_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.json");
    // No process has a PID above the kernel's largest (pid_max <= 2^22).
    let dead = 4_194_304 + 7;
    let own = std::process::id();
    let stale = [
        format!(".controller.json.tmp-{dead}-0"),
        format!(".controller.json.tmp-{dead}-17"),
    ];
    let kept = [
        // A live process's save in progress (init's PID, always running).
        ".controller.json.tmp-1-3".to_string(),
        // Our own process's: a save of ours may be running.
        format!(".controller.json.tmp-{own}-999"),
        // Another table's.
        format!(".other.json.tmp-{dead}-0"),
        // Not the pattern.
        format!("controller.json.tmp-{dead}-0"),
        format!(".controller.json.tmp-{dead}-0.bak"),
        format!(".controller.json.tmp-{dead}-"),
        format!(".controller.json.tmp-x{dead}-0"),
        ".controller.json.tmp-0-1".to_string(),
        ".controller.json.tmp-4294967295-1".to_string(),
        ".controller.json.tmp--1-1".to_string(),
        "notes.txt".to_string(),
    ];
    for f in stale.iter().chain(&kept) {
        std::fs::write(dir.path().join(f), b"{").unwrap();
    }
    // Of the pattern, but not a regular file: not what a save leaves.
    let not_files = [
        format!(".controller.json.tmp-{dead}-5"),
        format!(".controller.json.tmp-{dead}-6"),
    ];
    std::fs::create_dir(dir.path().join(&not_files[0])).unwrap();
    std::os::unix::fs::symlink("notes.txt", dir.path().join(&not_files[1])).unwrap();

    let c = controller(5);
    c.save(&path).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    let mut want: Vec<String> = kept
        .iter()
        .chain(&not_files)
        .cloned()
        .chain(["controller.json".to_string()])
        .collect();
    want.sort();
    assert_eq!(left, want);
    assert_eq!(table::read(&path).unwrap(), c.table_file());
}

/// Property tests of the saved table, which a crash, a full disk or a
/// hand edit can corrupt: a table cut short anywhere, or with any of its
/// values replaced by another (extremes, wrong types, arrays emptied), is
/// refused with a message or loaded; a loaded one drives decisions and
/// saves a table the next start reads. Never a panic, never an index out
/// of range.
mod props {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn trained() -> (QController, Vec<u8>) {
        let mut c = controller(5);
        let mut nodes: Vec<SynthNode> =
            (0..4).map(|_| SynthNode::new(100, 0.02, 0.0, 50)).collect();
        train(&mut c, &mut nodes, 60);
        let path = temp_path("props-trained");
        c.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        (c, bytes)
    }

    /// Loads `bytes` as the table of a fresh controller; if it loads, the
    /// controller decides and saves a table that reads back.
    fn load_and_use(bytes: &[u8], name: &str) -> Result<bool, TestCaseError> {
        let path = temp_path(name);
        std::fs::write(&path, bytes).unwrap();
        let mut d = controller(6);
        let loaded = match d.load(&path) {
            Ok(()) => true,
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains("controller table"), "{}", m);
                false
            }
        };
        if loaded {
            let _ = cli::render(&table::read(&path).unwrap(), 0);
        }
        let mut nodes: Vec<SynthNode> = (0..3)
            .map(|_| SynthNode::new(500, 0.1, 0.05, 900))
            .collect();
        train(&mut d, &mut nodes, 3);
        if loaded {
            // (A save syncs to disk: only where a table was loaded.)
            d.save(&path).unwrap();
            table::read(&path).unwrap();
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
        Ok(loaded)
    }

    /// Every leaf of `v` (numbers, strings, bools, nulls, empty
    /// containers) as a JSON pointer.
    fn leaves(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    leaves(x, format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                out.push(at.clone());
                for (i, x) in a.iter().enumerate() {
                    leaves(x, format!("{at}/{i}"), out);
                }
            }
            _ => out.push(at),
        }
    }

    fn replacement() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!(0)),
            Just(json!(-1)),
            Just(json!(u64::MAX)),
            Just(json!(u32::MAX)),
            Just(json!(u32::MAX as u64 + 1)),
            Just(json!(1e308)),
            Just(json!(-1e308)),
            Just(json!(0.5)),
            Just(json!(null)),
            Just(json!("")),
            Just(json!([])),
            Just(json!({})),
            Just(json!([0, 0, 0])),
            Just(json!(7)),
            any::<i64>().prop_map(|v| json!(v)),
            any::<f64>()
                .prop_filter("JSON numbers are finite", |v| v.is_finite())
                .prop_map(|v| json!(v)),
        ]
    }

    #[test]
    fn every_truncation_of_a_table_is_refused() {
        let (_, bytes) = trained();
        let end = bytes.trim_ascii_end().len();
        // Every length would take seconds (a table is tens of kB): a
        // few hundred, and the last byte.
        for len in (0..end).step_by(end / 300 + 1).chain([end - 1]) {
            let loaded = load_and_use(&bytes[..len], "props-cut").unwrap();
            assert!(
                !loaded,
                "a table cut at {len} of {} bytes loaded",
                bytes.len()
            );
        }
        assert!(load_and_use(&bytes, "props-whole").unwrap());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn a_table_with_any_values_replaced_is_refused_or_works(
            edits in prop::collection::vec((any::<prop::sample::Index>(), replacement()), 1..4),
        ) {
            static TRAINED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let bytes = TRAINED.get_or_init(|| trained().1);
            let mut v: Value = serde_json::from_slice(bytes).unwrap();
            for (i, new) in edits {
                let mut at = Vec::new();
                leaves(&v, String::new(), &mut at);
                let p = i.get(&at).clone();
                *v.pointer_mut(&p).unwrap() = new;
            }
            load_and_use(&serde_json::to_vec(&v).unwrap(), "props-edit")?;
        }

        /// Any configuration the flags can make (`hb simulate`'s, the
        /// monitor's qlearn options): refused with a message, or a
        /// controller that decides within its bounds and whose saved
        /// table reads back (a next start takes it). Extreme targets or
        /// thresholds were taken and made tables `table::read` refused;
        /// `--weights` (simulate only) of 1e300 still can, and its save
        /// says so.
        #[test]
        fn any_configuration_is_refused_or_decides_within_its_bounds(
            bounds in (1..=u32::MAX, 1..=u32::MAX),
            // Mostly within what is taken, so that the saved table's
            // read-back is checked often, and the extremes.
            step in prop_oneof![1 => Just(1.0 + f64::EPSILON), 4 => 1.0f64..=10.0, 1 => any::<f64>()],
            target in prop_oneof![1 => Just(5e-324), 4 => 1.0f64..3.6e6, 1 => Just(1e300), 1 => any::<f64>()],
            threshold in prop_oneof![1 => Just(5e-324), 4 => 0.1f64..1000.0, 1 => Just(1e300), 1 => any::<f64>()],
            tick_ms in 1..=60_000u64,
            decision_ms in prop_oneof![1..=3_600_000u64, Just(1)],
            weights in prop::array::uniform5(prop_oneof![2 => Just(0.0f64), 8 => 0.0f64..100.0, 1 => Just(1e300)]),
            load in any::<u16>(),
            rtt_us in any::<u32>(),
        ) {
            let (min, max) = (bounds.0.min(bounds.1), bounds.0.max(bounds.1));
            let cfg = Config {
                min_interval_ms: min,
                max_interval_ms: max,
                step,
                target_detection_ms: target,
                threshold,
                tick_ms: tick_ms as f64,
                decision_period_ms: decision_ms as f64,
                weights: crate::controller::Weights {
                    late: weights[0],
                    over: weights[1],
                    cost: weights[2],
                    load: weights[3],
                    false_suspicion: weights[4],
                },
                ..Config::default()
            };
            let Ok(mut c) = QController::new(cfg) else {
                return Ok(());
            };
            let mut nodes: Vec<SynthNode> = [(min, 0.0, 0.0), (max, 0.5, 0.3), (min.max(1000).min(max), 0.05, 0.01)]
                .into_iter()
                .map(|(iv, j, l)| {
                    let mut n = SynthNode::new(iv, j, l, load);
                    n.state.rtt_us = rtt_us;
                    n
                })
                .collect();
            for _ in 0..4 {
                for (i, n) in nodes.iter_mut().enumerate() {
                    n.period(decision_ms.max(1000));
                    let d = c.observe(i as u32 + 1, &n.state, 0);
                    prop_assert!((min..=max).contains(&d.interval_ms), "{} outside {}-{}", d.interval_ms, min, max);
                    n.adopt(&d);
                }
            }
            if weights.iter().all(|&w| w <= 100.0) {
                let path = temp_path("props-config");
                c.save(&path).unwrap();
                let read = table::read(&path);
                let _ = std::fs::remove_dir_all(path.parent().unwrap());
                prop_assert!(read.is_ok(), "{:?}", read.err());
            }
        }

        #[test]
        fn any_bytes_as_a_table_are_refused(
            bytes in prop::collection::vec(any::<u8>(), 0..400),
        ) {
            prop_assert!(!load_and_use(&bytes, "props-bytes")?);
        }
    }
}

//! End-to-end tests of the simulation: determinism, the fixed-interval
//! baseline against what the detector's parameters imply, and the
//! controller learning through real ACKs. Small fleets and short runs keep
//! them fast in debug builds.

use super::{
    engine::{Decisions, START, Sim, monitor_step, sample_path},
    *,
};
use crate::controller::Config;

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

fn cfg(scenario: &str, nodes: u32, minutes: f64, seed: u64) -> SimConfig {
    SimConfig::new(
        Scenario::named(scenario).unwrap(),
        nodes,
        minutes * 60.0,
        seed,
    )
}

#[test]
fn same_seed_same_run_other_seed_other_run() {
    let run = |seed| {
        let c = cfg("mixed", 12, 20.0, seed);
        let mut ctrl = QController::new(Config {
            seed,
            ..Config::default()
        })
        .unwrap();
        let (train, eval) = run_qlearn(&c, &mut ctrl, 600.0, false).unwrap();
        let fixed = run_policy(&c, &mut Policy::Fixed(500)).unwrap();
        serde_json::to_string(&(train, eval, fixed, ctrl.snapshot())).unwrap()
    };
    let a = run(5);
    assert_eq!(a, run(5));
    assert_ne!(a, run(6));
}

#[test]
fn fixed_interval_behaves_as_the_detector_implies() {
    let r = run_policy(&cfg("lan", 10, 30.0, 3), &mut Policy::Fixed(1000)).unwrap();
    // A tenth of the fleet is down at times (crashes with 60 s downtime).
    assert!(
        (0.85..=1.0).contains(&r.heartbeats_per_node_s),
        "{}",
        r.heartbeats_per_node_s
    );
    assert!(r.crashes > 0);
    assert_eq!(r.detection_ms.count as u64, r.crashes - r.missed);
    assert_eq!(r.missed, 0);
    // Suspicion comes `k` floored sigmas (10% of 1 s) after the last
    // heartbeat, noticed at the next 100 ms tick.
    let k = Config::default().sigmas_to_threshold();
    let worst = 1000.0 + k * 100.0 + 100.0 + 2.0;
    assert!(
        r.detection_ms.max <= worst,
        "{:?} > {worst}",
        r.detection_ms
    );
    assert!(r.detection_ms.p50 >= 1000.0 + k * 100.0 - 1000.0);
    assert_eq!(r.false_suspicions, 0, "a calm LAN causes no mistakes");
    assert!(r.trajectory.iter().all(|p| p.max_ms == 1000));
}

#[test]
fn qlearn_slows_down_from_100ms_on_a_calm_lan_within_its_target() {
    let mut c = cfg("lan", 20, 60.0, 8);
    c.initial_interval_ms = 100;
    let mut ctrl = QController::new(Config::default()).unwrap();
    let (_, r) = run_qlearn(&c, &mut ctrl, 3600.0, false).unwrap();
    let end = r.trajectory.last().unwrap();
    assert!(end.p50_ms > 1000, "{:?}", r.trajectory);
    assert!(r.heartbeats_per_node_s < 1.0, "{}", r.heartbeats_per_node_s);
    let target = ctrl.config().target_detection_ms;
    assert!(r.detection_ms.p99 <= target, "{:?}", r.detection_ms);
    assert_eq!(r.false_suspicions, 0);
}

#[test]
fn qlearn_under_bursty_loss_keeps_to_its_target() {
    let mut c = cfg("bursty-loss", 20, 60.0, 9);
    c.initial_interval_ms = 5000;
    let mut ctrl = QController::new(Config::default()).unwrap();
    let (_, r) = run_qlearn(&c, &mut ctrl, 3600.0, false).unwrap();
    let target = ctrl.config().target_detection_ms;
    // Loss bursts inflate the detector's moments; the controller must
    // not slow down into them. (A crash right after a burst can still take
    // long to detect at any interval: the tail is the detector's, so the
    // typical case is what the controller answers for.)
    assert!(r.mean_interval_ms < 2000.0, "{:?}", r.trajectory);
    assert!(r.detection_ms.p50 <= target, "{:?}", r.detection_ms);
    assert!(r.detection_ms.mean <= target, "{:?}", r.detection_ms);
    let modelled = ctrl.snapshot().rewards.mean_detection_ms;
    assert!(modelled <= target, "{modelled}");
}

#[test]
fn bad_arguments_are_refused() {
    assert!("fixed:0".parse::<ControllerChoice>().is_err());
    assert!("fixed:abc".parse::<ControllerChoice>().is_err());
    // The monitor's --fixed-interval-ms range: senders would clamp
    // anything else, and the run would be labelled with what none ran.
    for out in ["fixed:50", "fixed:99", "fixed:10001", "fixed:20000"] {
        let err = out.parse::<ControllerChoice>().unwrap_err().to_string();
        assert!(err.contains("between 100 and 10000 ms"), "{out}: {err}");
    }
    for edge in [100, 10_000] {
        assert_eq!(
            format!("fixed:{edge}").parse::<ControllerChoice>().unwrap(),
            ControllerChoice::Fixed(edge)
        );
    }
    assert!("pid".parse::<ControllerChoice>().is_err());
    assert_eq!(
        "fixed:250".parse::<ControllerChoice>().unwrap(),
        ControllerChoice::Fixed(250)
    );
    assert!(parse_weights("1,2,3").is_err());
    assert!(parse_weights("1,2,3,4,NaN").is_err());
    let mut c = cfg("lan", 0, 1.0, 1);
    assert!(run_policy(&c, &mut Policy::Fixed(100)).is_err());
    c.nodes = 1;
    c.duration_s = -1.0;
    assert!(run_policy(&c, &mut Policy::Fixed(100)).is_err());
    for n in scenario::NAMES {
        assert!(Scenario::named(n).is_some(), "{n}");
    }
    // --threshold is the monitor's suspect_phi, within what it accepts.
    assert!(thresholds(1.0).is_err(), "not above alive_phi");
    assert!(thresholds(f64::NAN).is_err());
    let t = thresholds(16.0).unwrap();
    assert_eq!((t.suspect_phi, t.dead_phi), (16.0, 16.0));
    c.duration_s = 60.0;
    c.thresholds.alive_phi = 20.0;
    assert!(run_policy(&c, &mut Policy::Fixed(100)).is_err());
}

#[test]
fn qlearn_sits_at_the_fixed_interval_whose_p99_it_is_asked_for() {
    // A calm LAN and the p99 of a fixed 5 s (about 7.6 s) as the target:
    // no policy beats the fixed interval there (see bench_controller's
    // mixture bound), so the controller should tie it, not hedge at a
    // faster level. Restarted senders resume at their interval (`hb send
    // --state-dir`), so restarts do not knock nodes back.
    let c = cfg("lan", 20, 60.0, 4);
    // The target: the fixed interval's p99 within the goal's 5% (a run
    // this short has a few dozen crashes, whose empirical p99 sits below
    // the distribution's, which the controller models).
    let fixed = run_policy(&c, &mut Policy::Fixed(5000)).unwrap();
    let mut ctrl = QController::new(Config {
        target_detection_ms: fixed.detection_ms.p99 * 1.05,
        ..Config::default()
    })
    .unwrap();
    let (_, r) = run_qlearn(&c, &mut ctrl, 3.0 * 3600.0, false).unwrap();
    let at = |ms| {
        r.interval_share
            .iter()
            .find(|(l, _)| *l == ms)
            .map_or(0.0, |(_, s)| *s)
    };
    assert!(at(5000) > 0.8, "{:?}", r.interval_share);
    assert_eq!(fixed.interval_share, vec![(5000, 1.0)]);
    // What the controller spends above the fixed rate: its climb from
    // the senders' 1 s start, and the 5% of decisions it keeps exploring,
    // a faster step among them, each held until the detector has settled
    // (8 samples, 24 s at 3 s).
    assert!(
        r.heartbeats_per_node_s < fixed.heartbeats_per_node_s * 1.15,
        "{} against {}",
        r.heartbeats_per_node_s,
        fixed.heartbeats_per_node_s
    );
    assert_eq!(r.false_suspicions, 0);
}

#[test]
fn pausing_nodes_are_suspected_only_past_their_stall_allowance() {
    // The monitor's tick holds a node that has stalled twice healthy until
    // its silence passes its expected gap plus 1.5 times the smaller
    // stall (0.5-4 s here): a crash of such a node is detected that late,
    // not a few sigmas after 100 ms.
    let r = run_policy(&cfg("pauses", 30, 60.0, 2), &mut Policy::Fixed(100)).unwrap();
    assert!(r.crashes > 50, "{}", r.crashes);
    let floor = 100.0 + 1.5 * 500.0;
    assert!(r.detection_ms.p99 > floor, "{:?}", r.detection_ms);
}

#[test]
fn a_node_the_monitor_holds_healthy_within_its_stall_allowance_is_not_suspected() {
    use crate::{
        detector,
        monitor::state::{Level, Status, Track},
    };
    use hb_common::maps::NodeState;
    let c = cfg("pauses", 1, 1.0, 1);
    let det = c.detector();
    let ms = 1_000_000u64;
    // A 1 s sender, heard from at `last`, that stalled twice (about 3 and
    // 2.5 s late).
    let mut st = NodeState {
        accepted: 100,
        generation: 7,
        interval_ms: 1000,
        last_arrival_ns: 5_000_000 * ms,
        ..NodeState::default()
    };
    let gaps = [
        [1000; 30].as_slice(),
        &[4000],
        &[1000; 5],
        &[3500],
        &[1000; 5],
    ];
    for gap in gaps.concat() {
        st.observe_interarrival(gap * ms);
    }
    assert!(st.recurring_stall_ns() > 0, "{st:?}");
    let alive = Track {
        status: Status::Alive,
        generation: st.generation,
        mark: st.accepted,
    };
    let y_suspect = detector::y_for_phi(c.thresholds.suspect_phi);
    let (mut within, mut past) = (0, 0);
    let mut track = alive;
    for silent_ms in (0..8000).step_by(50) {
        let t = st.last_arrival_ns + silent_ms * ms;
        let level = det.observe(&st, t).level;
        // From alive, the simulator suspects exactly where the tick's
        // level reaches suspect.
        let (_, suspected) = monitor_step(&det, &mut alive.clone(), &st, t);
        assert_eq!(suspected, level >= Level::Suspect, "{silent_ms} ms");
        let late = detector::lateness(&st, t, &c.phi).unwrap().y >= y_suspect;
        if late && level == Level::Healthy {
            // Phi alone (the old rule) would have suspected it here.
            within += 1;
            assert!(!suspected, "{silent_ms} ms");
        }
        // Tick by tick, the suspicion starts at the allowance's end.
        let (_, now) = monitor_step(&det, &mut track, &st, t);
        if now {
            past += 1;
            assert!(level >= Level::Suspect, "{silent_ms} ms");
        }
    }
    assert!(within > 20, "the state exercises the allowance: {within}");
    assert!(past > 0, "and is suspected after it");
}

#[test]
fn every_crash_is_detected_or_missed_also_near_the_end() {
    // A slow interval (detection about 7 s) and many crashes: some come
    // in the last seconds of the run, and are followed past its end.
    for (crashes_per_node_hour, minutes) in [(3.0, 60.0), (30.0, 10.0)] {
        let mut c = cfg("bursty-loss", 100, minutes, 1);
        c.scenario.crashes_per_node_hour = crashes_per_node_hour;
        let r = run_policy(&c, &mut Policy::Fixed(5000)).unwrap();
        assert!(r.crashes > 100, "{}", r.crashes);
        let (detected, missed) = (r.detection_ms.count, r.missed);
        assert_eq!(
            r.crashes,
            detected as u64 + missed,
            "{crashes_per_node_hour}/node-hour: {detected} detected, {missed} missed"
        );
        let per_profile: usize = r.profiles.iter().map(|p| p.detection_ms.count).sum();
        assert_eq!(per_profile, detected);
    }
}

#[test]
fn false_suspicions_are_counted_per_hour_of_up_time() {
    let c = cfg("pauses", 30, 30.0, 3);
    let r = run_policy(&c, &mut Policy::Fixed(200)).unwrap();
    assert!(r.false_suspicions > 0 && r.crashes > 0);
    // Each crash keeps its node down for the downtime (60 s), or until
    // the end of the run.
    let all = c.nodes as f64 * c.duration_s / 3600.0;
    let down = r.crashes as f64 * c.scenario.downtime_s / 3600.0;
    assert!(r.alive_node_hours < all && r.alive_node_hours >= all - down - 1e-9);
    let rate = r.false_suspicions as f64 / r.alive_node_hours;
    assert!((r.false_suspicions_per_node_hour - rate).abs() < 1e-9);
    assert!(r.false_suspicions_per_node_hour > r.false_suspicions as f64 / all);
    let p = &r.profiles[0];
    assert_eq!(p.alive_node_hours, r.alive_node_hours);
    assert_eq!(
        p.false_suspicions_per_node_hour,
        r.false_suspicions_per_node_hour
    );
}

/// Over the first `paths` nodes' upward paths, each sampled `samples`
/// times `period_ms` apart: the loss rate and the share of losses right
/// after a loss.
fn loss_after_loss(c: &SimConfig, paths: u32, period_ms: u64, samples: u64) -> (f64, f64) {
    let (mut n, mut lost, mut after_lost, mut both) = (0u64, 0u64, 0u64, 0u64);
    for node in 0..paths {
        let v = sample_path(c, node, (0..samples).map(|i| i * period_ms * MS));
        for w in v.windows(2) {
            n += 1;
            lost += w[1].1 as u64;
            if w[0].1 {
                after_lost += 1;
                both += w[1].1 as u64;
            }
        }
    }
    (
        lost as f64 / n as f64,
        both as f64 / after_lost.max(1) as f64,
    )
}

#[test]
fn loss_bursts_last_a_time_not_a_number_of_packets() {
    // About 2% of packets lost in bursts of about 0.4 s: a path sampled
    // every 100 ms loses several heartbeats in a row, one sampled every
    // 10 s hardly ever two (a packet-stepped chain gave both the same
    // ~0.68, and bursts of 40 s at 10 s).
    let c = cfg("bursty-loss", 40, 60.0, 1);
    let (rate, after) = loss_after_loss(&c, 40, 100, 20_000);
    assert!((0.012..0.024).contains(&rate), "{rate}");
    assert!((0.6..0.8).contains(&after), "bursty at 100 ms: {after}");
    let (rate, after) = loss_after_loss(&c, 40, 10_000, 20_000);
    assert!((0.012..0.024).contains(&rate), "{rate}");
    assert!(
        (after - rate).abs() < 0.01,
        "at 10 s a loss says nothing of the next: {after} against {rate}"
    );
}

#[test]
fn every_policy_sees_the_same_loss_bursts_in_time() {
    // One path, sampled as a 100 ms and a 1 s sender would send: in its
    // Bad state at the same instants.
    let c = cfg("bursty-loss", 4, 60.0, 7);
    for node in 0..4 {
        let fast = sample_path(&c, node, (0..36_000).map(|i| i * 100 * MS));
        let slow = sample_path(&c, node, (0..3_600).map(|i| i * 1000 * MS));
        for (i, s) in slow.iter().enumerate() {
            assert_eq!(fast[i * 10].0, s.0, "node {node} at {i} s");
        }
        let bad = slow.iter().filter(|s| s.0).count();
        assert!((10..300).contains(&bad), "node {node}: {bad}");
    }
}

#[test]
fn a_sender_takes_a_new_request_at_once_as_hb_send_does() {
    // One LAN node under a fixed 5 s; after its third heartbeat the
    // monitor asks for 1 s. `hb send` reschedules on the ACK that changes
    // its interval (`next = min(next, now + new)`), so the next heartbeat
    // leaves within 1 s of that ACK, not 5 s after the last one.
    let mut c = cfg("lan", 1, 10.0, 1);
    c.scenario.crashes_per_node_hour = 0.0;
    let mut policy = Policy::Fixed(5000);
    let mut sim = Sim::new(&c, &mut policy).unwrap();
    let mut h = 0;
    while sim.sent() < 3 {
        h = sim.step().unwrap();
    }
    sim.request(0, 1000);
    let ack = loop {
        let t = sim.step().unwrap();
        if sim.adopted_ms(0) == 1000 {
            break t;
        }
    };
    assert!(
        ack < h + 5 * MS,
        "the ACK of heartbeat 3 comes back at once"
    );
    let next = loop {
        let t = sim.step().unwrap();
        if sim.sent() > 3 {
            break t;
        }
    };
    assert!(
        next <= ack + 1000 * MS + MS / 2,
        "heartbeat 4 {} ms after the ACK",
        (next - ack) / MS
    );
}

#[test]
fn a_stalled_sender_reads_the_acks_that_reached_it_when_the_stall_ends() {
    // A stopped process finds the ACKs that came meanwhile in its socket
    // buffer when it runs again: the interval one asks for is taken then,
    // not while the sender is stalled.
    let mut c = cfg("pauses", 1, 60.0, 3);
    c.scenario.crashes_per_node_hour = 0.0;
    let mut policy = Policy::Fixed(1000);
    let mut sim = Sim::new(&c, &mut policy).unwrap();
    let (from, until) = sim
        .stalls(0)
        .into_iter()
        .find(|s| s.0 > START + 10 * S)
        .unwrap();
    // The last heartbeat before the stall; its ACK, asking for 500 ms,
    // reaches the sender 10 ms into the stall.
    sim.run_until(from - 1100 * MS);
    loop {
        let sent = sim.sent();
        let mut h = 0;
        while sim.sent() == sent {
            h = sim.step().unwrap();
        }
        if h + 1000 * MS > from {
            break;
        }
    }
    sim.request(0, 500);
    while sim.acks_in_flight(0) == 0 {
        sim.step().unwrap();
    }
    sim.hold_acks_until(0, from + 10 * MS);
    sim.run_until(until - MS);
    assert_eq!(sim.adopted_ms(0), 1000, "stalled until {until}");
    sim.run_until(until + MS);
    assert_eq!(sim.adopted_ms(0), 500);
}

#[test]
fn each_policy_gets_the_monitor_s_ack_configuration() {
    // `hb monitor --fixed-interval-ms` ACKs only to carry a changed
    // request; `--controller qlearn` every 10th heartbeat too, for RTT
    // samples (monitor/config.rs).
    let c = cfg("lan", 1, 1.0, 1);
    let g = Sim::new(&c, &mut Policy::Fixed(5000))
        .unwrap()
        .gate_config();
    assert_eq!((g.ack_every, g.ack_on_change), (0, 1));
    let mut ctrl = QController::new(Config::default()).unwrap();
    let g = Sim::new(&c, &mut Policy::QLearn(&mut ctrl))
        .unwrap()
        .gate_config();
    assert_eq!((g.ack_every, g.ack_on_change), (10, 1));
}

#[test]
fn detection_is_the_final_suspicion_after_a_crash() {
    // A LAN node at 1 s crashes right after a heartbeat that is held up
    // 4 s on the way. The monitor suspects it about a second later, the
    // late heartbeat refutes that, and the suspicion that follows is the
    // one that stands: the crash is detected then (Chen et al.'s T_D, as
    // `hb eval` measures it), not at the refuted suspicion.
    let mut c = cfg("lan", 1, 5.0, 1);
    c.scenario.crashes_per_node_hour = 0.0;
    let mut policy = Policy::Fixed(1000);
    let mut sim = Sim::new(&c, &mut policy).unwrap();
    sim.run_until(START + 60 * S);
    let sent = sim.sent();
    let mut h = 0;
    while sim.sent() == sent {
        h = sim.step().unwrap();
    }
    sim.delay_in_flight(0, 4 * S);
    sim.crash(0, h + MS);
    sim.run_until(u64::MAX);
    let r = sim.finish().unwrap();
    assert_eq!((r.crashes, r.missed, r.detection_ms.count), (1, 0, 1));
    let d = r.detection_ms.max;
    assert!(
        (3_999.0..7_000.0).contains(&d),
        "detected {d} ms after the crash"
    );
    assert_eq!(r.false_suspicions, 0);
}

#[test]
fn a_crash_during_a_standing_suspicion_is_detected_at_once() {
    // Every heartbeat from 60 s on is held up past the end of the run: the
    // monitor suspects the node (falsely: it is up) a couple of seconds
    // later, and it crashes while that suspicion stands. Nothing refutes
    // the suspicion, so the crash is detected when it happens (Chen et
    // al.'s T_D is 0, as `hb eval` counts it), not a tick later.
    let mut c = cfg("lan", 1, 5.0, 1);
    c.scenario.crashes_per_node_hour = 0.0;
    let mut policy = Policy::Fixed(1000);
    let mut sim = Sim::new(&c, &mut policy).unwrap();
    sim.run_until(START + 60 * S);
    while sim.step().unwrap() < START + 70 * S {
        sim.delay_in_flight(0, 3600 * S);
    }
    sim.delay_in_flight(0, 3600 * S);
    sim.crash(0, START + 70 * S + 50 * MS);
    sim.run_until(START + 5 * 60 * S);
    let r = sim.finish().unwrap();
    assert_eq!((r.crashes, r.missed, r.detection_ms.count), (1, 0, 1));
    assert_eq!(r.false_suspicions, 1);
    assert_eq!(r.detection_ms.max, 0.0);
}

#[test]
fn a_run_reports_its_own_decisions_and_rewards_not_the_training_s() {
    let c = cfg("wan", 10, 10.0, 1);
    let mut ctrl = QController::new(Config::default()).unwrap();
    let first = run_policy(&c, &mut Policy::QLearn(&mut ctrl)).unwrap();
    let (d1, r1) = (ctrl.decisions(), ctrl.reward_stats());
    let second = run_policy(&c, &mut Policy::QLearn(&mut ctrl)).unwrap();
    let (d2, r2) = (ctrl.decisions(), ctrl.reward_stats());
    let (first, second) = (
        first.controller_state.unwrap(),
        second.controller_state.unwrap(),
    );
    assert_eq!(first.decisions, d1);
    assert_eq!(second.decisions, d2 - d1);
    assert!(second.decisions > 0);
    assert!((first.reward_mean - r1.mean).abs() < 1e-9);
    let own =
        (r2.mean * r2.count as f64 - r1.mean * r1.count as f64) / (r2.count - r1.count) as f64;
    assert!(
        (second.reward_mean - own).abs() < 1e-9,
        "{} against {own}",
        second.reward_mean
    );
    assert!(
        (second.reward_mean - r2.mean).abs() > 1e-6,
        "the lifetime mean"
    );
}

/// Each node is decided for once per decision period, by time, as the
/// monitor's staggered policy decides (`Core::due`), whatever the tick: a
/// period that is not a multiple of the tick was cut to whole ticks (1 s
/// at a 300 ms tick gave a decision every 900 ms, at 400 ms every 800 ms).
#[test]
fn each_node_is_decided_once_per_period_whatever_the_tick() {
    let mut c = cfg("lan", 10, 1.0, 1);
    c.scenario.crashes_per_node_hour = 0.0;
    c.decision_period_ms = 1000;
    for tick_ms in [100, 300, 400, 700, 1000] {
        c.tick_ms = tick_ms;
        let mut ctrl = QController::new(Config::default()).unwrap();
        let mut policy = Policy::QLearn(&mut ctrl);
        let mut sim = Sim::new(&c, &mut policy).unwrap();
        sim.run_until(START + 60 * S);
        // 60 s of ticks from the start: 60 or 61 decision times per node
        // (the start's included), whatever the node's phase.
        let decided = sim.decided();
        assert!(
            (600..=610).contains(&decided),
            "tick {tick_ms} ms: {decided} decisions"
        );
    }
}

/// The schedule itself: with a period that is a multiple of the tick,
/// slot `i` is decided on the ticks `n` with `n mod k = i mod k` (`k`
/// ticks a period), as every published run was; with any period, each
/// slot's decisions are one period apart, to the tick; with a period
/// shorter than the tick, every slot on every tick.
#[test]
fn decisions_are_one_period_apart_and_unchanged_for_whole_ticks() {
    for (tick_ms, period_ms) in [(100, 5000), (100, 1000), (250, 1000), (1000, 1000)] {
        let d = Decisions::new(tick_ms * MS, period_ms * MS);
        let k = period_ms / tick_ms;
        for slot in 0..200u32 {
            for n in 0..500u64 {
                assert_eq!(
                    d.due(slot, n * tick_ms * MS),
                    n % k == slot as u64 % k,
                    "tick {tick_ms} period {period_ms} slot {slot} tick {n}"
                );
            }
        }
    }
    for (tick_ms, period_ms) in [
        (300, 1000),
        (400, 1000),
        (700, 1000),
        (300, 5000),
        (7, 5000),
    ] {
        let d = Decisions::new(tick_ms * MS, period_ms * MS);
        for slot in 0..50u32 {
            let ticks: Vec<u64> = (0..20_000 / tick_ms)
                .filter(|&n| d.due(slot, n * tick_ms * MS))
                .map(|n| n * tick_ms)
                .collect();
            assert!(
                ticks[0] < period_ms,
                "{tick_ms} {period_ms} {slot}: {ticks:?}"
            );
            for w in ticks.windows(2) {
                let gap = w[1] - w[0];
                assert!(
                    gap + tick_ms > period_ms && gap < period_ms + tick_ms,
                    "tick {tick_ms} period {period_ms} slot {slot}: {ticks:?}"
                );
            }
            // And they average one period: no drift.
            let (first, last) = (ticks[0], *ticks.last().unwrap());
            let periods = (ticks.len() as u64 - 1) * period_ms;
            assert!((last - first).abs_diff(periods) < tick_ms);
        }
    }
    let d = Decisions::new(100 * MS, 30 * MS);
    assert!((0..100).all(|slot| (0..50).all(|n| d.due(slot, n * 100 * MS))));
}

/// What the monitor refuses, `hb simulate` refuses, in one line and
/// before it allocates a fleet: a tick beyond a minute (it ran, and
/// `tick_ms * MS` could wrap), controller bounds outside 100-10000 ms, a
/// decision period beyond an hour or under a millisecond, more nodes than
/// the monitor's largest capacity (an allocation of terabytes aborted it).
/// A decision period shorter than the tick the monitor takes (every node
/// on every tick), and so does this now.
#[test]
fn settings_the_monitor_refuses_are_refused() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }
    let run = |flags: &[&str]| {
        let mut argv = vec!["hb", "--duration", "1m", "--train", "0s"];
        if !flags.contains(&"--nodes") {
            argv.extend(["--nodes", "2"]);
        }
        let a = <Cli as clap::Parser>::parse_from(argv.iter().chain(flags)).a;
        output(&a).map_err(|e| format!("{e:#}"))
    };
    let refused = |flags: &[&str], why: &str| {
        let e = run(flags).expect_err(&format!("{flags:?} was run"));
        assert!(e.contains(why) && !e.contains('\n'), "{flags:?}: {e}");
    };
    let fixed = ["--controller", "fixed:1000"];
    assert!(
        run(&[
            &fixed[..],
            &["--tick-ms", "60000", "--decision-period", "1m"]
        ]
        .concat())
        .is_ok()
    );
    for tick in ["60001", "18446744073709"] {
        refused(
            &[&fixed[..], &["--tick-ms", tick, "--decision-period", "1h"]].concat(),
            "--tick-ms: tick_ms must be between 1 and 60000",
        );
    }
    refused(&["--tick-ms", "0"], "tick_ms must be between 1 and 60000");
    for (lo, hi) in [
        ("50", "10000"),
        ("100", "20000"),
        ("20", "50000"),
        ("900", "200"),
    ] {
        refused(
            &["--min-interval-ms", lo, "--max-interval-ms", hi],
            "expected MIN-MAX within 100-10000 ms",
        );
    }
    assert!(run(&["--min-interval-ms", "200", "--max-interval-ms", "5000"]).is_ok());
    for period in ["2h", "500us", "0s", "100000000000years"] {
        refused(
            &["--decision-period", period],
            "--decision-period: decision_ms must be between 1 and 3600000",
        );
    }
    assert!(run(&["--tick-ms", "1000", "--decision-period", "500ms"]).is_ok());
    for nodes in ["1048577", "4294967295", "0"] {
        refused(
            &["--nodes", nodes],
            "the fleet must have 1 to 1048576 nodes",
        );
    }
}

/// The mean interval is the senders' up-time at each interval, weighted:
/// sampled every 60 s from the start instead, a 10 min run gave its first
/// sample, at the senders' starting 1000 ms, a weight of one in eleven
/// (227 ms for a fleet at 100-150 ms within seconds).
#[test]
fn the_mean_interval_is_the_time_weighted_one() {
    let mut c = cfg("lan", 10, 10.0, 1);
    c.decision_period_ms = 1000;
    let mut ctrl = QController::new(Config {
        min_interval_ms: 100,
        max_interval_ms: 150,
        decision_period_ms: 1000.0,
        weights: parse_weights("0,0,0,0,0").unwrap(),
        ..Config::default()
    })
    .unwrap();
    let r = run_policy(&c, &mut Policy::QLearn(&mut ctrl)).unwrap();
    let weighted: f64 = r
        .interval_share
        .iter()
        .map(|&(ms, share)| ms as f64 * share)
        .sum();
    assert!(
        (r.mean_interval_ms - weighted).abs() < 1e-9 * weighted,
        "{} against {weighted}",
        r.mean_interval_ms
    );
    assert!(r.mean_interval_ms < 200.0, "{}", r.mean_interval_ms);
    // The trajectory keeps its samples, the start's included.
    assert_eq!(r.trajectory.len(), 11);
    assert_eq!(r.trajectory[0].mean_ms, 1000.0);
}

#[test]
fn json_report_is_the_same_byte_for_byte() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }
    let args = || {
        <Cli as clap::Parser>::parse_from([
            "hb",
            "--scenario",
            "mixed",
            "--nodes",
            "6",
            "--duration",
            "3m",
            "--train",
            "3m",
            "--json",
        ])
        .a
    };
    let a = output(&args()).unwrap();
    assert!(!a.contains("wall"), "no wall-clock time in the report");
    assert_eq!(a, output(&args()).unwrap());
}

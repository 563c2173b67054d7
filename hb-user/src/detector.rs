//! Phi accrual suspicion (Hayashibara et al., 2004) from the gate's
//! per-node statistics, above a per-node stall allowance.
//!
//! The kernel keeps, per node (`hb_common::maps::NodeState::record`), the
//! arrival time of the last accepted heartbeat, exponentially weighted
//! inter-arrival moments (mean and mean absolute deviation) and the node's
//! two most recent stalls. Phi is `-log10(P(a heartbeat arrives later than
//! now))` under a normal model of the inter-arrival time with that mean
//! and a standard deviation derived from the deviation, evaluated with
//! Akka's logistic approximation of the normal CDF
//! (`akka.remote.PhiAccrualFailureDetector`), which is smooth and cheap
//! (one `exp`) and does not underflow to infinity as quickly as `1 - erf`.
//!
//! Like Akka, the standard deviation has a floor (`min_std_dev_ms`) so a
//! node on a perfectly regular schedule is not suspected on the first tiny
//! delay, and an `acceptable_pause_ms` can be added to the mean. Unlike
//! Akka's fixed floor, hb's floor also scales with the mean
//! (`min_std_dev_ratio`), because hb's intervals range over two orders of
//! magnitude (100 ms to 10 s).
//!
//! What the moments learn from, and what they do not:
//! - only gaps between consecutive sequence numbers are inter-arrival
//!   samples: a gap that lost heartbeats spans several intervals and says
//!   nothing of the node's rhythm (a published detector, which sees
//!   arrivals only, cannot tell a loss from a pause);
//! - a sample's error enters the EWMAs clipped to a quarter of the mean,
//!   so jitter moves them and a pause does not;
//! - the excess of a longer sample is a *stall*. A node whose two most
//!   recent stalls were S1 and S2 is not late at all (phi 0) before it has
//!   been silent for its mean plus `stall_factor * min(S1, S2)`: its
//!   *stall allowance*, learned per node, where Akka's acceptable pause is
//!   one setting for all. Stalls are remembered for hours (both decay by
//!   1/2^16 per sample) because what makes a node pause (its heap and
//!   collector, its workload, its host) persists; the smaller of two is
//!   used so one odd event (a network delay spike, a one-off migration)
//!   does not stretch the allowance.
//!
//! The sender announces its interval in every heartbeat and the kernel
//! re-seeds the moments when it changes, so a node told to slow down is
//! judged by its new interval at once.
//!
//! # Defaults, and why (issue 5)
//!
//! The goal: at a mistake rate of at most one per node per day, a mean
//! detection time no worse than the best published detector's on every
//! shipped scenario of `hb eval gen`, and better on gc-pause and
//! interval-change. Every detector is compared at its own operating point
//! (the least threshold meeting the budget, solved exactly, granted to
//! each detector per scenario), over a fleet of 5 seeds x 200 nodes x 2 h
//! (200 crashes per scenario), with a 95% stratified bootstrap interval
//! over nodes; "no worse" means that interval lies at or below 1.01 (see
//! `tests/src/bin/bench_eval.rs` for why 1%).
//!
//! The defaults were chosen on *training* seeds (101-105) and are reported
//! on others (1-5), so the table below is not the data they were fitted
//! to. `PhiParams::default()`: std floor max(20 ms, 10% of the mean), no
//! acceptable pause, stall factor 1.5; the kernel's gains 1/2^5 (mean) and
//! 1/2^5 (deviation), clip 1/4 of the mean, stall decay 1/2^16
//! (`hb_common::maps::{IA_MEAN_SHIFT, IA_DEV_SHIFT, IA_CLIP_SHIFT,
//! STALL_DECAY_SHIFT}`). On the training seeds (`bench_eval --first-seed
//! 101 --explore`; mean T_D over the best published detector's, p99 in
//! brackets):
//!
//! | stall factor, gains | gc-pause | gc-pause-homogeneous | others |
//! |---|---:|---:|---|
//! | 0 (no allowance), 1/2^5, 1/2^4 | 1.000 (1.00) | 1.004 (1.00) | lan, wan, bursty, congestion 1.000-1.002; mixed 0.49; interval-change 0.35 |
//! | 1, 1/2^5, 1/2^4 | 0.993 (0.99) | 1.004 (1.00) | the same |
//! | 1.5, 1/2^5, 1/2^4 | 0.895 (1.13) | 1.004 (1.00) | the same |
//! | 2, 1/2^5, 1/2^4 | 0.894 (1.48) | 1.004 (1.00) | the same |
//! | 3, 1/2^5, 1/2^4 | 0.941 (2.19) | 1.006 (1.26) | the same |
//! | **1.5, 1/2^5, 1/2^5 (now)** | 0.895 (1.13) | 1.001 (1.00) | the same |
//!
//! 1.5 gains as much on the mean as 2 at a far smaller p99 cost (a node
//! that pauses for 5 s is then detected after 8.5 s, not 11 s); the
//! slower deviation gain takes the last 0.3% off gc-pause-homogeneous.
//! Earlier candidates, on training seeds 101-103 (600 nodes): a single
//! decayed *maximum* of the excess as the allowance reached 0.76-0.92 on
//! gc-pause but cost gc-pause-homogeneous 0.4-5.8% depending on its factor
//! and decay (a memoryless pause's size predicts nothing, so the max is a
//! noisy per-node timeout); feeding the stall into sigma instead of a
//! floor (sigma >= stall / k, k 5 or 10) cost up to 3.6x on bursty-loss
//! (the threshold multiplies it); and without sequence numbers (every
//! loss taken for a stall) lan lost 4% and congestion-drift 27%.
//!
//! Reported (seeds 1-5, 1000 nodes, 200 crashes per scenario; `cargo run
//! --release -p hb-tests --bin bench_eval`, 65 s on this 2-core VM under
//! load):
//!
//! | scenario | hb T_D mean / p99 ms | best published | its mean / p99 ms | hb / best, mean [95% CI] | p99 [95% CI] | verdict |
//! |---|---:|---|---:|---:|---:|---|
//! | lan | 1553 / 1996 | cassandra | 1553 / 1996 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | no worse |
//! | wan | 2519 / 3035 | cassandra | 2519 / 3030 | 1.000 [0.999, 1.001] | 1.002 [0.998, 1.002] | no worse |
//! | bursty-loss | 10493 / 10986 | fixed | 10493 / 10986 | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | no worse |
//! | gc-pause | 8052 / 8903 | chen | 9668 / 10626 | 0.833 [0.787, 0.943] | 0.838 [0.765, 1.584] | better |
//! | gc-pause-homogeneous | 3575 / 4068 | fixed | 3590 / 4072 | 0.996 [0.996, 1.001] | 0.999 [0.996, 1.007] | no worse |
//! | congestion-drift | 1730 / 2260 | fixed | 1729 / 2260 | 1.000 [1.000, 1.001] | 1.000 [0.999, 1.001] | no worse |
//! | mixed-interval | 2244 / 9750 | cassandra | 3965 / 9900 | 0.566 [0.506, 0.619] | 0.985 [0.905, 1.005] | better |
//! | interval-change | 2140 / 8707 | akka | 5785 / 12517 | 0.370 [0.325, 0.419] | 0.696 [0.619, 0.778] | better |
//!
//! (interval-change as of the deviation's re-seed at an interval change
//! keeping the node's jitter, capped at an eighth of the new interval; it
//! was 2189 / 8991 ms, 0.378 [0.333, 0.431], with a re-seed at an eighth.
//! The other rows did not move.)
//!
//! Where hb cannot win, and does not try to: lan, wan, bursty-loss,
//! congestion-drift and gc-pause-homogeneous are stationary and the same
//! for every node, so a fixed timeout tuned per scenario (which the
//! comparison grants every detector) is already optimal; what a node has
//! shown says nothing about its next gap, and hb ties it. Where it wins,
//! it uses what differs between nodes or over time and is observable: the
//! interval each node announces (mixed-interval, interval-change) and the
//! pauses each node has already shown (gc-pause). Before this version hb
//! lost wan (1.007 [1.003, 1.013]) and bursty-loss (1.027, p99 1.69x) on
//! the same fleet: each lost heartbeat inflated sigma, which the threshold
//! multiplies.

use hb_common::maps::NodeLive;

/// `mean absolute deviation * sqrt(pi/2)` = sigma, for a normal variable.
pub const MAD_TO_SIGMA: f64 = 1.253_314_137_315_500_3;

/// Tunables of the phi computation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhiParams {
    /// Lower bound of the standard deviation, ms.
    pub min_std_dev_ms: f64,
    /// Lower bound of the standard deviation as a fraction of the mean.
    pub min_std_dev_ratio: f64,
    /// Added to the expected inter-arrival time, ms.
    pub acceptable_pause_ms: f64,
    /// A node is never late before it has been silent for its expected
    /// inter-arrival time plus this many times its recurring stall
    /// (`NodeState::recurring_stall_ns`, the smaller of its two most recent
    /// pauses); 0 turns this off.
    pub stall_factor: f64,
    /// A recurring stall longer than this, ms, earns no allowance: a node
    /// that froze that long (twice) is not pausing the way a collector or
    /// a busy host does, and forgiving it would keep it from being
    /// suspected for days (stalls are remembered that long). 0: no limit.
    pub max_stall_ms: f64,
}

impl PhiParams {
    /// Whether these are usable: every value a non-negative number, and
    /// one standard deviation floor positive (phi is undefined without
    /// one). The monitor and `hb eval` refuse the same settings.
    pub fn is_valid(&self) -> bool {
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        nonneg(self.min_std_dev_ms)
            && nonneg(self.min_std_dev_ratio)
            && nonneg(self.acceptable_pause_ms)
            && nonneg(self.stall_factor)
            && nonneg(self.max_stall_ms)
            && self.min_std_dev_ms.max(self.min_std_dev_ratio) > 0.0
    }
}

impl Default for PhiParams {
    fn default() -> Self {
        PhiParams {
            min_std_dev_ms: 20.0,
            min_std_dev_ratio: 0.1,
            acceptable_pause_ms: 0.0,
            stall_factor: 1.5,
            max_stall_ms: 30_000.0,
        }
    }
}

/// Phi of a node whose last heartbeat arrived `elapsed_ms` ago, with
/// inter-arrival mean `mean_ms` and standard deviation `std_ms` (already
/// floored by the caller).
#[inline]
pub fn phi_normal(elapsed_ms: f64, mean_ms: f64, std_ms: f64) -> f64 {
    phi_of_y((elapsed_ms - mean_ms) / std_ms)
}

/// Phi as a function of the standardized lateness `y = (elapsed - mean) /
/// std` alone. It is strictly increasing in `y`, which is what lets the
/// monitor's tick compare `y` against precomputed [`y_for_phi`] thresholds
/// (one division per node) instead of evaluating `exp` and `log10` for a
/// million healthy nodes every 100 ms.
#[inline]
pub fn phi_of_y(y: f64) -> f64 {
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    if y > 0.0 {
        // P(later) = e / (1 + e); e underflows to 0 far in the tail.
        let p = e / (1.0 + e);
        if p <= f64::MIN_POSITIVE {
            // The logistic tail: -log10(e) = y * (1.5976 + 0.070566 y^2) / ln 10.
            y * (1.5976 + 0.070566 * y * y) / std::f64::consts::LN_10
        } else {
            -p.log10()
        }
    } else {
        // Non-negative by construction; `abs` also turns -0.0 into 0.0.
        (1.0 - 1.0 / (1.0 + e)).log10().abs()
    }
}

/// [`PhiParams`] prepared for the per-node arithmetic, in ns: the one
/// definition of a node's expected inter-arrival time and standard
/// deviation, shared by the monitor's tick (a million nodes every tick, so
/// nothing here divides or allocates), [`phi`] and `hb eval`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    min_std_ns: f64,
    std_ratio: f64,
    pause_ns: f64,
    stall_factor: f64,
    /// `f64::INFINITY` when there is no limit.
    max_stall_ns: f64,
}

impl Model {
    pub fn new(p: &PhiParams) -> Model {
        Model {
            min_std_ns: p.min_std_dev_ms * 1e6,
            std_ratio: p.min_std_dev_ratio,
            pause_ns: p.acceptable_pause_ms * 1e6,
            stall_factor: p.stall_factor,
            max_stall_ns: if p.max_stall_ms > 0.0 {
                p.max_stall_ms * 1e6
            } else {
                f64::INFINITY
            },
        }
    }

    /// The acceptable pause added to every mean, ns.
    #[inline(always)]
    pub fn pause_ns(&self) -> f64 {
        self.pause_ns
    }

    /// The silence, ns, before which a node is not late at all (phi 0):
    /// `mean_ns` (its expected inter-arrival time, from
    /// [`Model::moments_ns`]) plus `stall_factor` times its recurring
    /// stall; 0 for a node without one, with one longer than
    /// `max_stall_ms`, or with `stall_factor` 0.
    #[inline(always)]
    pub fn stall_floor_ns(&self, state: &impl AsRef<NodeLive>, mean_ns: f64) -> f64 {
        let state = state.as_ref();
        let stall = state.recurring_stall_ns();
        if stall == 0 || self.stall_factor <= 0.0 || stall as f64 > self.max_stall_ns {
            0.0
        } else {
            mean_ns + self.stall_factor * stall as f64
        }
    }

    /// The expected inter-arrival time (mean plus acceptable pause) and
    /// the floored standard deviation of a node, in ns, from its kernel
    /// statistics. Phi is only defined when both are positive (the caller
    /// checks; a node without them has phi 0).
    #[inline(always)]
    pub fn moments_ns(&self, state: &impl AsRef<NodeLive>) -> (f64, f64) {
        let state = state.as_ref();
        let mut mean = state.ia_mean_ns as f64;
        if mean <= 0.0 {
            mean = state.interval_ms as f64 * 1e6;
        }
        let std = (state.ia_dev_ns as f64 * MAD_TO_SIGMA)
            .max(self.min_std_ns)
            .max(self.std_ratio * mean);
        (mean + self.pause_ns, std)
    }
}

/// Whether a node whose last heartbeat arrived `elapsed_ns` ago is at
/// least `y` standard deviations late: `phi >= phi_of_y(y)`, in the form
/// the monitor's tick evaluates (no division).
#[inline(always)]
pub fn late_by(elapsed_ns: f64, mean_ns: f64, std_ns: f64, y: f64) -> bool {
    elapsed_ns - mean_ns >= y * std_ns
}

/// The expected inter-arrival mean and floored standard deviation of a
/// node, in ms, from its kernel statistics ([`Model::moments_ns`]).
#[inline]
pub fn moments_ms(state: &impl AsRef<NodeLive>, p: &PhiParams) -> (f64, f64) {
    let (mean, std) = Model::new(p).moments_ns(state);
    (mean / 1e6, std / 1e6)
}

/// Phi of `state` at `now_ns` (CLOCK_MONOTONIC). 0 for a node never heard
/// from, with no usable statistics yet, or silent for less than its stall
/// allowance ([`Model::stall_floor_ns`]).
#[inline]
pub fn phi(state: &impl AsRef<NodeLive>, now_ns: u64, p: &PhiParams) -> f64 {
    match lateness(state, now_ns, p) {
        Some(l) if !l.within_stall => phi_of_y(l.y),
        _ => 0.0,
    }
}

/// How late a node's next heartbeat is, in the terms phi is computed from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lateness {
    /// Standardized lateness `(elapsed - mean) / std`; phi is
    /// [`phi_of_y`] of it.
    pub y: f64,
    /// Time since the last accepted heartbeat, ms.
    pub elapsed_ms: f64,
    /// Expected inter-arrival time (mean plus acceptable pause), ms.
    pub mean_ms: f64,
    /// The floored standard deviation, ms.
    pub std_ms: f64,
    /// The silence is still within the node's stall allowance
    /// ([`Model::stall_floor_ns`]): phi is 0 whatever `y` says.
    pub within_stall: bool,
}

/// The lateness of `state` at `now_ns`; `None` for a node never heard from
/// or without usable statistics (phi 0).
#[inline]
pub fn lateness(state: &impl AsRef<NodeLive>, now_ns: u64, p: &PhiParams) -> Option<Lateness> {
    let state = state.as_ref();
    if state.accepted == 0 || state.last_arrival_ns == 0 {
        return None;
    }
    let model = Model::new(p);
    let (mean, std) = model.moments_ns(state);
    if mean <= 0.0 || std <= 0.0 {
        return None;
    }
    let elapsed = now_ns.saturating_sub(state.last_arrival_ns) as f64;
    Some(Lateness {
        y: (elapsed - mean) / std,
        elapsed_ms: elapsed / 1e6,
        mean_ms: mean / 1e6,
        std_ms: std / 1e6,
        within_stall: elapsed < model.stall_floor_ns(state, mean),
    })
}

/// The smallest `y` whose phi reaches `phi` (the inverse of [`phi_of_y`],
/// by bisection; phi is continuous and strictly increasing). Computed once
/// per threshold, never per node.
pub fn y_for_phi(phi: f64) -> f64 {
    if phi.is_nan() || phi <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if phi.is_infinite() {
        return f64::INFINITY;
    }
    let (mut lo, mut hi) = (-40.0f64, 1.0f64);
    while phi_of_y(hi) < phi {
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if phi_of_y(mid) >= phi {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;
    use hb_common::maps::NodeState;

    fn state(mean_ms: u64, dev_ms: u64) -> NodeState {
        NodeState {
            accepted: 10,
            last_arrival_ns: 1_000_000_000_000,
            ia_mean_ns: mean_ms * 1_000_000,
            ia_dev_ns: dev_ms * 1_000_000,
            interval_ms: mean_ms as u32,
            ..NodeState::default()
        }
    }

    #[test]
    fn phi_is_about_0_3_at_the_mean_and_grows_monotonically() {
        // At elapsed = mean, P(later) = 1/2: phi = log10(2).
        assert!((phi_normal(1000.0, 1000.0, 100.0) - 2f64.log10()).abs() < 1e-9);
        let mut last = 0.0;
        for ms in (0..5000).step_by(50) {
            let v = phi_normal(ms as f64, 1000.0, 100.0);
            assert!(v >= last, "phi decreased at {ms} ms");
            assert!(v.is_finite());
            last = v;
        }
        assert!(last > 100.0);
    }

    #[test]
    fn phi_matches_the_normal_tail_within_the_approximation() {
        // One sigma late: P(later) = 0.1587, phi = 0.7995; the logistic
        // approximation is within 1e-3 there.
        let v = phi_normal(1100.0, 1000.0, 100.0);
        assert!((v - 0.7995).abs() < 2e-3, "{v}");
        // Three sigma: P = 0.00135, phi = 2.87.
        let v = phi_normal(1300.0, 1000.0, 100.0);
        assert!((v - 2.87).abs() < 0.05, "{v}");
    }

    #[test]
    fn state_phi_uses_floors_and_pause() {
        let s = state(1000, 0);
        let p = PhiParams::default();
        // Zero deviation: floored at 10% of the mean = 100 ms.
        assert_eq!(moments_ms(&s, &p), (1000.0, 100.0));
        let now = s.last_arrival_ns + 1_300_000_000;
        let v = phi(&s, now, &p);
        assert!((v - 2.87).abs() < 0.05, "{v}");
        let paused = PhiParams {
            acceptable_pause_ms: 300.0,
            ..p
        };
        assert!((phi(&s, now, &paused) - 2f64.log10()).abs() < 1e-9);
    }

    #[test]
    fn a_recurring_stall_holds_phi_at_zero_until_its_allowance() {
        use hb_common::maps::STALL_UNIT_SHIFT;
        let p = PhiParams::default();
        let mut s = state(1000, 0);
        let ms = 1_000_000u64;
        // One stall seen: nothing recurs yet, phi as before.
        s.stall = [((3000 * ms) >> STALL_UNIT_SHIFT) as u32, 0];
        let at = |s: &NodeState, silent_ms: u64| phi(s, s.last_arrival_ns + silent_ms * ms, &p);
        assert!(at(&s, 2000) > 10.0);
        // Two: the smaller (2 s) recurs; allowance 1000 + 1.5 * 2000 ms.
        s.stall[1] = ((2000 * ms) >> STALL_UNIT_SHIFT) as u32;
        assert_eq!(s.recurring_stall_ns(), 2000 * ms);
        let floor = Model::new(&p).stall_floor_ns(&s, 1000.0 * ms as f64);
        assert_eq!(floor, 4000.0 * ms as f64);
        assert_eq!(at(&s, 2000), 0.0);
        assert_eq!(at(&s, 3999), 0.0);
        let l = lateness(&s, s.last_arrival_ns + 3999 * ms, &p).unwrap();
        assert!(l.within_stall && l.y > 29.0, "{l:?}");
        // From the allowance on, the normal-model phi of that silence.
        let y = (4000.0 - 1000.0) / 100.0;
        assert!((at(&s, 4000) - phi_of_y(y)).abs() < 1e-9);
        // Factor 0 turns it off.
        let off = PhiParams {
            stall_factor: 0.0,
            ..p
        };
        assert_eq!(Model::new(&off).stall_floor_ns(&s, 1e9), 0.0);
        let l = lateness(&s, s.last_arrival_ns + 2000 * ms, &off).unwrap();
        assert!(!l.within_stall);
    }

    #[test]
    fn y_thresholds_invert_phi_exactly_at_the_boundary() {
        for target in [0.5, 1.0, 2.0, 3.0, 8.0, 12.0, 16.0, 50.0, 300.0] {
            let y = y_for_phi(target);
            assert!(phi_of_y(y) >= target, "{target}: phi({y}) below");
            assert!(phi_of_y(y - 1e-9) < target, "{target}: not the smallest y");
        }
        assert_eq!(y_for_phi(0.0), f64::NEG_INFINITY);
        assert_eq!(y_for_phi(-1.0), f64::NEG_INFINITY);
        assert_eq!(y_for_phi(f64::INFINITY), f64::INFINITY);
    }

    #[test]
    fn phi_and_lateness_agree() {
        let s = state(1000, 50);
        let p = PhiParams::default();
        for ms in [0u64, 500, 1000, 1100, 1500, 3000, 60_000] {
            let now = s.last_arrival_ns + ms * 1_000_000;
            let l = lateness(&s, now, &p).unwrap();
            assert_eq!(phi(&s, now, &p), phi_of_y(l.y));
            assert_eq!(l.elapsed_ms, ms as f64);
        }
        assert_eq!(lateness(&NodeState::default(), 1, &p), None);
    }

    #[test]
    fn clock_before_the_last_arrival_is_not_late() {
        // The tick's clock read may precede a concurrent kernel update.
        let s = state(1000, 50);
        let v = phi(&s, s.last_arrival_ns - 5_000_000, &PhiParams::default());
        assert!((0.0..0.01).contains(&v), "{v}");
    }

    #[test]
    fn no_interval_and_no_samples_is_zero_not_nan() {
        // A sender announcing interval 0 before any inter-arrival sample.
        let s = NodeState {
            accepted: 1,
            last_arrival_ns: 1_000,
            ..NodeState::default()
        };
        let p = PhiParams {
            min_std_dev_ms: 0.0,
            ..PhiParams::default()
        };
        assert_eq!(phi(&s, 10_000_000_000, &p), 0.0);
        assert_eq!(lateness(&s, 10_000_000_000, &p), None);
        // With the default floor the std is positive but the mean is 0:
        // still no statistics to judge by.
        assert_eq!(phi(&s, 10_000_000_000, &PhiParams::default()), 0.0);
    }

    #[test]
    fn never_heard_from_is_zero_and_far_tail_is_finite() {
        assert_eq!(phi(&NodeState::default(), 5, &PhiParams::default()), 0.0);
        let s = state(100, 1);
        let v = phi(
            &s,
            s.last_arrival_ns + 3_600_000_000_000,
            &PhiParams::default(),
        );
        assert!(v.is_finite() && v > 1000.0, "{v}");
    }
}

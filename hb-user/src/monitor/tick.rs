//! The decision loop's body: one linear scan over every node's dataplane
//! state, every tick.
//!
//! For each occupied slot the tick turns the gate's statistics into an
//! [`Observation`] (is the node late, and how late) and steps the state
//! machine; transitions become [`Event`]s. Every decision period it also
//! asks the [`IntervalPolicy`] for each seen node's interval.
//!
//! The scan is the monitor's only per-node work, so it is built to stay
//! far under the tick at a million nodes: the dataplane hands out states
//! in slot order without a syscall per node, the table is a struct of
//! arrays, nothing is allocated per node, and phi itself (an `exp` and a
//! `log10`) is evaluated only for nodes that change state: the thresholds
//! are compared in terms of the standardized lateness `y`, which phi
//! increases with strictly (`detector::y_for_phi`).

use std::collections::{HashMap, VecDeque};

use hb_common::maps::{NodeLive, NodeState};

use super::{
    events::{Event, Settled},
    policy::{IntervalPolicy, NodeView},
    state::{self, EventKind, Level, Observation, Recorded, Status, Thresholds, Track, Transition},
    table::NodeTable,
};
use crate::{
    dataplane::Dataplane,
    detector::{self, Lateness, PhiParams},
};

/// Phi parameters and state thresholds, with the thresholds precomputed
/// as standardized lateness and everything in nanoseconds, so the common
/// case (a healthy node) costs one multiply and one compare.
#[derive(Clone, Copy, Debug)]
pub struct Detector {
    pub thresholds: Thresholds,
    pub phi: PhiParams,
    y_alive: f64,
    y_suspect: f64,
    y_dead: f64,
    model: detector::Model,
    /// `f64::INFINITY` when the backstop is off.
    max_silence_ns: f64,
}

impl Detector {
    pub fn new(thresholds: Thresholds, phi: PhiParams) -> Detector {
        Detector {
            thresholds,
            phi,
            y_alive: detector::y_for_phi(thresholds.alive_phi),
            y_suspect: detector::y_for_phi(thresholds.suspect_phi),
            y_dead: detector::y_for_phi(thresholds.dead_phi),
            model: detector::Model::new(&phi),
            max_silence_ns: match thresholds.max_silence_ms {
                0 => f64::INFINITY,
                ms => ms as f64 * 1e6,
            },
        }
    }

    /// Whether the backstop (`max_silence_ms`) is shorter than the
    /// silence `dead` otherwise needs of a node announcing `interval_ms`
    /// (`dead_min_intervals` of them): it then declares such a node dead
    /// after fewer losses than the thresholds tolerate.
    pub fn backstop_binds(&self, st: &impl AsRef<NodeLive>) -> bool {
        let k = self.thresholds.dead_min_intervals.max(1.0);
        st.as_ref().interval_ms as f64 * 1e6 * k > self.max_silence_ns
    }

    /// Phi of `state` now (for events, the API, the policy).
    pub fn phi(&self, state: &impl AsRef<NodeLive>, now_ns: u64) -> f64 {
        detector::phi(state, now_ns, &self.phi)
    }

    /// [`Detector::phi`] with silence counted from `listening_since_ns` at
    /// the earliest, as the tick judges it ([`Context`]): after a restart
    /// a node is not shown at a high phi for a silence nobody saw.
    pub fn phi_since(
        &self,
        state: &impl AsRef<NodeLive>,
        now_ns: u64,
        listening_since_ns: u64,
    ) -> f64 {
        let last = state.as_ref().last_arrival_ns;
        let unseen = heard_ns(last, listening_since_ns) - last;
        detector::phi(state, now_ns.saturating_sub(unseen), &self.phi)
    }

    /// The silence, ns, `dead` needs besides phi (`Level::classify`'s
    /// `dead_silence_ms`), for a node of expected inter-arrival time
    /// `mean_ns` (with the acceptable pause) and standard deviation
    /// `std_ns`: `dead_min_intervals` of its intervals, the pause once (it
    /// is a pause, not a part of each interval), and the jitter phi
    /// forgives a heartbeat that is on time (`alive_phi`'s `y` standard
    /// deviations), so that the last heartbeat of the tolerated run is not
    /// declared lost while it is merely a little late.
    ///
    /// `slowing_to_ms`: the node was just asked to slow down to this
    /// interval (0: it was not). Its next heartbeat still comes at its
    /// current rhythm, announcing the new interval, and the ones after at
    /// the new one; if that first one is lost the silence spans one old
    /// and one new interval, so the intervals after the first count at the
    /// new rhythm.
    #[inline]
    pub fn dead_silence_ns(&self, mean_ns: f64, std_ns: f64, slowing_to_ms: u32) -> f64 {
        let k = self.thresholds.dead_min_intervals;
        if k <= 0.0 {
            return 0.0;
        }
        let pause = self.model.pause_ns();
        let interval = mean_ns - pause;
        let next = interval.max(slowing_to_ms as f64 * 1e6);
        let intervals = (interval + (k - 1.0) * next).max(k * interval);
        intervals + pause + self.y_alive.max(0.0) * std_ns
    }

    /// `Level::classify` of a node's phi, from its lateness, without
    /// computing phi (the reference form of [`Detector::observe`]'s
    /// arithmetic).
    pub fn level(&self, l: &Lateness) -> Level {
        let th = &self.thresholds;
        let backstop = th.max_silence_ms != 0 && l.elapsed_ms >= th.max_silence_ms as f64;
        if backstop {
            Level::Dead
        } else if l.within_stall {
            Level::Healthy
        } else if l.y >= self.y_dead
            && l.elapsed_ms * 1e6 >= self.dead_silence_ns(l.mean_ms * 1e6, l.std_ms * 1e6, 0)
        {
            Level::Dead
        } else if l.y >= self.y_suspect {
            Level::Suspect
        } else if l.y >= self.y_alive {
            Level::Normal
        } else {
            Level::Healthy
        }
    }

    /// This tick's observation of a node: `detector::Model::moments_ns`
    /// and [`Detector::level`] fused, comparing `elapsed - mean` against
    /// `y * std` instead of dividing (`detector::late_by`).
    #[inline]
    pub fn observe(&self, st: &impl AsRef<NodeLive>, now_ns: u64) -> Observation {
        self.observe_in(st, now_ns, &Context::default())
    }

    /// [`Detector::observe`] with what the monitor knows of the node
    /// besides its dataplane state.
    #[inline]
    pub fn observe_in(&self, st: &impl AsRef<NodeLive>, now_ns: u64, cx: &Context) -> Observation {
        let st = st.as_ref();
        Observation {
            accepted: st.accepted,
            generation: st.generation,
            leaving: st.leaving(),
            left_before: st.left_before(),
            level: self.level_of(st, now_ns, cx),
        }
    }

    #[inline(always)]
    fn level_of(&self, st: &NodeLive, now_ns: u64, cx: &Context) -> Level {
        if st.accepted == 0 || st.last_arrival_ns == 0 {
            return Level::Healthy;
        }
        // Silence is counted from when the gate last heard the node, or
        // began to listen, whichever is later.
        let heard = heard_ns(st.last_arrival_ns, cx.listening_since_ns);
        let elapsed = now_ns.saturating_sub(heard) as f64;
        if elapsed >= self.max_silence_ns {
            return Level::Dead;
        }
        let (mean, std) = self.model.moments_ns(st);
        if !(mean > 0.0 && std > 0.0) {
            // No usable statistics: phi is 0.
            return Level::Healthy;
        }
        let late = elapsed - mean;
        // Healthy nodes (the common case) take the first branch only; the
        // stall allowance is looked at for late ones.
        if late < self.y_alive * std || elapsed < self.model.stall_floor_ns(st, mean) {
            Level::Healthy
        } else if late < self.y_suspect * std {
            Level::Normal
        } else if late >= self.y_dead * std
            && elapsed >= self.dead_silence_ns(mean, std, cx.slowing_to_ms)
        {
            Level::Dead
        } else {
            Level::Suspect
        }
    }
}

/// Whence a node's silence counts: its last arrival, or when the gate
/// began to listen (or the monitor to look) if that is later.
#[inline(always)]
fn heard_ns(last_arrival_ns: u64, listening_since_ns: u64) -> u64 {
    last_arrival_ns.max(listening_since_ns)
}

/// What the monitor knows of a node besides its dataplane state, for
/// [`Detector::observe_in`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// Silence before this time (CLOCK_MONOTONIC ns) is not held against
    /// the node: the gate was not listening, or the monitor not looking
    /// ([`Core::listening_since`]). 0: none.
    pub listening_since_ns: u64,
    /// The node was asked to slow down to this interval, ms, and may not
    /// have announced it yet ([`Detector::dead_silence_ns`]). 0: it was not.
    pub slowing_to_ms: u32,
}

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickStats {
    /// Occupied slots scanned.
    pub scanned: u32,
    /// Events produced.
    pub events: u32,
    /// Interval requests written.
    pub decisions: u32,
}

/// Everything the tick needs between ticks: the table, the detector and
/// the policy. One lock around it serves the tick and the HTTP API.
pub struct Core {
    pub table: NodeTable,
    pub detector: Detector,
    pub policy: Box<dyn IntervalPolicy>,
    decision_period_ns: u64,
    next_decision_ns: u64,
    /// The previous tick's time, for staggered decisions (0: none yet).
    last_tick_ns: u64,
    next_seq: u64,
    /// Decisions of the current scan, applied after it (the dataplane is
    /// being read while they are made). Kept to reuse its allocation.
    pending: Vec<(u32, u32)>,
    /// The statuses the current scan changed, recorded in the dataplane
    /// after it (`Dataplane::set_monitor_status`), as `pending`, marked
    /// unconfirmed; kept until their events are published
    /// ([`Core::published`]).
    changed: Vec<Change>,
    /// Records written unconfirmed whose events are published, until the
    /// events are settled: written, or known never to be
    /// ([`Core::confirm`]).
    unconfirmed: Unconfirmed,
    /// `removed` events of the nodes removed since the last tick
    /// ([`Core::remove_node`]), which the next tick announces first (their
    /// `seq` and `ts` are its).
    removals: Vec<Event>,
    /// Silence before this is not held against any node
    /// ([`Core::listening_since`]).
    listening_since_ns: u64,
    /// The previous scan's time (0: none yet).
    last_scan_ns: u64,
    /// The tick period ([`Core::set_tick`]), which sets the gap between
    /// two scans past which the monitor itself was not running
    /// ([`Core::local_pause_ns`]).
    tick_ns: u64,
    /// The last tick held back bad news ([`HOLD_AFTER_TICKS`]).
    held_last: bool,
    /// When a gap was last excused (0: never).
    last_excuse_ns: u64,
    /// A node was declared dead by the backstop before it could miss the
    /// intervals `dead` tolerates, and the operator was told (once).
    backstop_warned: bool,
}

/// A gap is excused at most this often: a monitor whose ticks stall again
/// and again (starved, or slow at a million nodes) is not paused, and
/// excusing every gap would keep it from declaring anyone dead.
const EXCUSE_EVERY_NS: u64 = 60_000_000_000;

/// The least gap between two ticks that is a pause of the monitor's own
/// host or process rather than a slow tick; also at least
/// [`LOCAL_PAUSE_TICKS`] ticks.
const LOCAL_PAUSE_MIN_NS: u64 = 1_000_000_000;
const LOCAL_PAUSE_TICKS: u64 = 5;

/// A tick that comes more than this many tick periods after the one
/// before holds back bad news: it finds no node suspect or dead that was
/// not already, and the next tick judges as usual. After a shorter pause
/// of the monitor's host than [`LOCAL_PAUSE_MIN_NS`] (a VM frozen for
/// 700 ms) the tick can run before the gate has stamped the heartbeats
/// that waited out the pause, and every node whose `dead` silence is
/// shorter than the pause (a 100 ms node's is about 330 ms) was declared
/// dead, then alive a tick later. One tick later they have been stamped.
/// Never two ticks in a row: a monitor whose every tick is late (starved,
/// or slow at a million nodes) still judges every other one.
const HOLD_AFTER_TICKS: u64 = 2;

impl Core {
    pub fn new(
        detector: Detector,
        policy: Box<dyn IntervalPolicy>,
        decision_period_ms: u64,
    ) -> Core {
        Core {
            table: NodeTable::new(),
            detector,
            policy,
            decision_period_ns: decision_period_ms.max(1) * 1_000_000,
            next_decision_ns: 0,
            last_tick_ns: 0,
            next_seq: 1,
            pending: Vec::new(),
            changed: Vec::new(),
            unconfirmed: Unconfirmed::default(),
            removals: Vec::new(),
            listening_since_ns: 0,
            last_scan_ns: 0,
            last_excuse_ns: 0,
            backstop_warned: false,
            tick_ns: 100_000_000,
            held_last: false,
        }
    }

    /// The tick period, which sets the gap between two ticks the monitor
    /// takes for a pause of its own (see [`Core::tick`]).
    pub fn set_tick(&mut self, tick: std::time::Duration) {
        self.tick_ns = u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX);
    }

    /// The gap between two scans past which the monitor itself was not
    /// running: [`LOCAL_PAUSE_MIN_NS`], and at least [`LOCAL_PAUSE_TICKS`]
    /// ticks.
    fn local_pause_ns(&self) -> u64 {
        LOCAL_PAUSE_MIN_NS.max(self.tick_ns.saturating_mul(LOCAL_PAUSE_TICKS))
    }

    /// Since when silence is held against the nodes (0: always).
    pub fn listening_since_ns(&self) -> u64 {
        self.listening_since_ns
    }

    /// Silence before `now_ns` is not held against any node: the gate was
    /// not listening (a monitor that starts attaches it afresh, unless an
    /// earlier one kept it attached), or the monitor was not looking. Each
    /// node is then judged from its next heartbeat, or from `now_ns` if
    /// none comes: one that died meanwhile is declared dead as long after
    /// `now_ns` as after its last heartbeat, never at once for a silence
    /// nobody saw.
    pub fn listening_since(&mut self, now_ns: u64) {
        self.listening_since_ns = self.listening_since_ns.max(now_ns);
    }

    /// Adopts the dataplane's current state of every occupied slot without
    /// announcing anything (`state::adopt`): used once at start over pinned
    /// state. Each node goes on in the status its previous monitor recorded
    /// in that state, since when it was recorded (`state_for_ms` goes on:
    /// both the record and the pins end with a reboot, CLOCK_MONOTONIC's
    /// epoch). A record still marked [`state::UNCONFIRMED`] (its event's
    /// line was not written to `--events`, or there is no `--events`)
    /// counts as the status confirmed before it ([`state::last_confirmed`]),
    /// since now, and is left as it is until the tick records the next
    /// change: the change in flight is announced again (`state::adopt`),
    /// and a monitor that stops before that still leaves it unconfirmed.
    /// A node with none (pinned by an older hb, or no status confirmed
    /// before the one in flight) is adopted as before, since now, and its
    /// adopted status recorded: a `dead` not written is announced again.
    /// Silence before `now_ns` is not held against the nodes
    /// ([`Core::listening_since`]): without `--keep-attached` no gate ran
    /// between the monitors, and with it the silence the kernel saw
    /// meanwhile is judged only from now (a node recorded alive that died
    /// while no monitor ran is announced a few of its intervals after the
    /// start).
    ///
    /// A node whose current generation started after its record was
    /// written restarted while no monitor ran (`--keep-attached`): it is
    /// announced `restarted` on the first tick, with no previous
    /// generation ([`state::Recorded::restarted_since`]). Its record is
    /// left as it is until then, whatever it holds, so that a monitor that
    /// stops before that tick leaves the restart to the next one.
    pub fn adopt(&mut self, dp: &dyn Dataplane, now_ns: u64) {
        self.listening_since(now_ns);
        let det = self.detector;
        let table = &mut self.table;
        let len = table.len();
        let mut adopted = Vec::new();
        dp.read_states(0..len, &mut |slot, st| {
            if table.node_id[slot as usize] == 0 {
                return;
            }
            // Judged by the node's real silence (no `listening_since`):
            // whether heartbeats heard while no monitor ran still show it
            // alive.
            let obs = det.observe(st, now_ns);
            let since = st.monitor_status_since_ns;
            let recorded = Recorded::of(
                st.monitor_status,
                since,
                st.last_arrival_ns,
                st.gen_start_ns,
            );
            let track = state::adopt(&obs, recorded);
            // An unconfirmed record's time is its change's, not the last
            // confirmed status's.
            let confirmed = st.monitor_status & state::UNCONFIRMED == 0;
            adopted.push((
                slot,
                track,
                recorded.status,
                if confirmed { since } else { 0 },
            ));
        });
        for (slot, track, recorded, recorded_since) in adopted {
            let i = slot as usize;
            let old = table.track[i].status;
            table.counts[old as usize] = table.counts[old as usize].saturating_sub(1);
            table.counts[track.status as usize] += 1;
            table.track[i] = track;
            table.since_ns[i] =
                if track.status == recorded && recorded_since != 0 && recorded_since <= now_ns {
                    recorded_since
                } else {
                    now_ns
                };
            if track.status != recorded && !track.restarted_unseen() {
                let since = if track.status == Status::Unknown {
                    0
                } else {
                    now_ns
                };
                dp.set_monitor_status(slot, track.status.code(), since);
            }
        }
    }

    /// Replaces the interval policy and its decision period (a reload at
    /// `now_ns`): the new policy takes over the requests in force
    /// ([`Core::reconcile_requests`]) and decides for every node on the
    /// next tick.
    pub fn set_policy(
        &mut self,
        policy: Box<dyn IntervalPolicy>,
        decision_period_ms: u64,
        dp: &dyn Dataplane,
        now_ns: u64,
    ) {
        self.policy = policy;
        self.decision_period_ns = decision_period_ms.max(1) * 1_000_000;
        self.next_decision_ns = 0;
        self.last_tick_ns = 0;
        self.reconcile_requests(dp, now_ns);
    }

    /// Squares the requests the dataplane holds with the policy in force:
    /// at start (requests pinned by an earlier run, perhaps of another
    /// policy) and when a reload replaces the policy.
    /// - A policy that makes requests takes them over: the table learns
    ///   them, and the policy replaces them by its own decisions. A
    ///   learning controller goes on from each node's standing request,
    ///   as after any restart of the monitor, instead of moving every
    ///   node to its start level at once. A node that the gate's ACKs
    ///   were just telling to slow down (its run of change ACKs for that
    ///   request is at its first few heartbeats) keeps the allowance
    ///   [`slowing`] gives it, from when the run began: its announcing
    ///   heartbeat may be the one lost. A request the policy will not
    ///   leave standing until the node's first decision (a critical
    ///   node's over its cap: [`IntervalPolicy::take_over`]) is replaced
    ///   at once, a decision at `now_ns`.
    /// - One that makes none (`off`) withdraws them (0: ACKs then echo the
    ///   sender's own interval), or the gate would keep putting an earlier
    ///   policy's request in its ACKs.
    pub fn reconcile_requests(&mut self, dp: &dyn Dataplane, now_ns: u64) {
        let t = &mut self.table;
        if self.policy.active() {
            let policy = &mut *self.policy;
            let mut replaced = Vec::new();
            dp.read_states(0..t.len(), &mut |slot, st| {
                let i = slot as usize;
                if t.node_id[i] != 0 {
                    t.requested_ms[i] = st.requested_interval_ms;
                    if t.decided_ns[i] == 0 {
                        t.decided_ns[i] = slowing_since(st);
                    }
                    let standing = st.requested_interval_ms;
                    if let Some(ms) = policy.take_over(slot, t.node_id[i], standing, now_ns)
                        && ms != standing
                    {
                        replaced.push((slot, ms));
                    }
                }
            });
            for &(slot, ms) in &replaced {
                dp.set_requested_interval(slot, ms);
                t.requested_ms[slot as usize] = ms;
                t.decided_ns[slot as usize] = now_ns;
            }
            if !replaced.is_empty() {
                tracing::info!(
                    nodes = replaced.len(),
                    policy = policy.name(),
                    "standing requests replaced at once on taking them over (critical nodes over their cap)"
                );
            }
            return;
        }
        for slot in 0..t.len() {
            let i = slot as usize;
            if t.node_id[i] != 0 {
                dp.set_requested_interval(slot, 0);
                t.requested_ms[i] = 0;
                t.decided_ns[i] = 0;
            }
        }
    }

    /// One tick at `now_ns` (CLOCK_MONOTONIC): scans every node, appends
    /// the transitions to `events` (stamped `wall_ts`, computed only when
    /// needed), and on decision ticks applies the policy.
    pub fn tick(
        &mut self,
        dp: &dyn Dataplane,
        now_ns: u64,
        wall_ts: &mut dyn FnMut() -> String,
        events: &mut Vec<Event>,
    ) -> TickStats {
        // Bad news waits a tick after a late one ([`HOLD_AFTER_TICKS`]).
        let hold = self.last_scan_ns != 0
            && now_ns.saturating_sub(self.last_scan_ns)
                > self.tick_ns.saturating_mul(HOLD_AFTER_TICKS)
            && !self.held_last;
        self.held_last = hold;
        if hold {
            tracing::debug!(
                gap_ms = (now_ns - self.last_scan_ns) / 1_000_000,
                "a late tick: no node is found suspect or dead before the next one"
            );
        }
        if self.last_scan_ns != 0
            && now_ns.saturating_sub(self.last_scan_ns) > self.local_pause_ns()
            && (self.last_excuse_ns == 0 || now_ns - self.last_excuse_ns >= EXCUSE_EVERY_NS)
            && !self.gate_ran_between(dp, self.last_scan_ns, now_ns)
        {
            // Neither the monitor nor its gate ran (a paused VM: the clock
            // counted the pause, and no heartbeat was stamped in it): the
            // silence meanwhile is nobody's fault. A monitor that is only
            // slow or starved is not excused: its gate (the kernel's, or
            // the socket task) went on stamping arrivals.
            tracing::warn!(
                gap_ms = (now_ns - self.last_scan_ns) / 1_000_000,
                "the monitor and its gate did not run for a while (host paused?): silence until now is not held against any node"
            );
            self.listening_since(now_ns);
            self.last_excuse_ns = now_ns;
        }
        self.last_scan_ns = now_ns;
        // The nodes removed since the last tick first: decided before this
        // tick's changes. None has a record to confirm (its slot's state
        // was cleared, and may be another node's now): no `Change`.
        let (removed, ts) = self.announce_removals(wall_ts, events);
        let due = self.due(now_ns);
        let det = self.detector;
        let listening_since_ns = self.listening_since_ns;
        let pending = &mut self.pending;
        pending.clear();
        let NodeTable {
            node_id,
            track,
            since_ns,
            requested_ms,
            decided_ns,
            counts,
            ..
        } = &mut self.table;
        let node_id: &[u32] = node_id;
        // Changes of a tick whose events were never published stay
        // unconfirmed.
        self.changed.clear();
        let mut stats = TickStats {
            events: removed,
            ..TickStats::default()
        };
        let mut announce = Announcer {
            det: &det,
            now_ns,
            listening_since_ns,
            node_id,
            since_ns,
            policy: &mut *self.policy,
            wall_ts,
            ts,
            events,
            changed: &mut self.changed,
            backstop_warned: &mut self.backstop_warned,
            seq: self.next_seq,
        };
        let mut next_counts = [0u64; 5];
        let len = node_id.len() as u32;

        // A node whose line could not be read (held by a writer that died:
        // `stuck_reads`) keeps its status, and is counted under it: the
        // slots the scan skips, between the ones it visits.
        let mut next_slot = 0u32;
        let skipped = |from: u32, to: u32, counts: &mut [u64; 5], track: &[Track]| {
            for i in from as usize..to as usize {
                if node_id[i] != 0 {
                    counts[track[i].status as usize] += 1;
                }
            }
        };

        // One line per node (`NodeLive`); the whole state only for the
        // few that change state or are due for a decision (`full`). The
        // closure is the per-node path: what is rare (a transition) is
        // `Announcer::transition`, out of line.
        dp.read_live(0..len, &mut |slot, st, full| {
            if slot != next_slot {
                skipped(next_slot, slot, &mut next_counts, track);
            }
            next_slot = slot + 1;
            let i = slot as usize;
            // A free slot's dataplane state is cleared (accepted == 0), so
            // the owner check is needed only for nodes never heard from:
            // the hot path reads the state and the track, nothing else.
            if st.accepted == 0 && node_id[i] == 0 {
                return;
            }
            stats.scanned += 1;
            let t = &mut track[i];
            let mut cx = Context {
                listening_since_ns,
                slowing_to_ms: 0,
            };
            let mut obs = det.observe_in(st, now_ns, &cx);
            // Only a node not dead already can be spared (the slowing
            // allowance turns Dead into Suspect, the same to a dead node):
            // a partitioned fleet costs one extra read per node, once.
            // The table's request first; else what the gate's ACKs told
            // the node (a request withdrawn or replaced since).
            if obs.level == Level::Dead && matches!(t.status, Status::Alive | Status::Suspect) {
                cx.slowing_to_ms = if slowing(st, requested_ms[i], decided_ns[i]) {
                    requested_ms[i]
                } else {
                    told_to_slow_of(full)
                };
                if cx.slowing_to_ms != 0 {
                    obs = det.observe_in(st, now_ns, &cx);
                }
            }
            if hold {
                // No worse than the node's status: good news only.
                obs.level = obs.level.min(match t.status {
                    Status::Alive => Level::Normal,
                    Status::Suspect => Level::Suspect,
                    _ => Level::Dead,
                });
            }
            if let Some(tr) = state::step(t, &obs) {
                if !announce.transition(slot, t, &tr, st, full) {
                    return;
                }
                stats.events += 1;
            }
            next_counts[t.status as usize] += 1;
            if st.accepted != 0 && due.includes(slot) {
                let view = NodeView {
                    node_id: node_id[i],
                    status: t.status,
                    phi: det.phi_since(st, now_ns, listening_since_ns),
                    requested_interval_ms: requested_ms[i],
                    now_ns,
                };
                if let Some(ms) = announce.policy.decide(slot, &view, &full())
                    && ms != requested_ms[i]
                {
                    pending.push((slot, ms));
                }
            }
        });

        skipped(next_slot, len, &mut next_counts, track);
        *counts = next_counts;
        self.next_seq = announce.seq;
        // Before the events go out, but marked, with the last status
        // confirmed: the next monitor adopts the status only once
        // [`Core::confirm`] has seen its event's line written; until then,
        // or if it never is, it starts from the last confirmed one and
        // announces the change again. Since the change's time
        // (`Announcer::transition`).
        for c in self.changed.iter() {
            let since = self.table.since_ns[c.slot as usize];
            dp.set_monitor_status(c.slot, c.status.unconfirmed_code(c.last), since);
        }
        for &(slot, ms) in self.pending.iter() {
            dp.set_requested_interval(slot, ms);
            self.table.requested_ms[slot as usize] = ms;
            self.table.decided_ns[slot as usize] = now_ns;
            stats.decisions += 1;
        }
        stats
    }
}

/// The scan's rare path, a node changing status, and what it needs
/// beyond the per-node path. Out of the scan's closure (`#[cold]`, never
/// inlined) so that the closure stays small enough for the compiler to
/// inline `state::step` and the detector into it: grown with this path, it
/// called `step` instead, and the 1M-node tick took ~20% longer for the
/// same work (callgrind: an indirect branch and spills per node).
struct Announcer<'a> {
    det: &'a Detector,
    now_ns: u64,
    listening_since_ns: u64,
    node_id: &'a [u32],
    since_ns: &'a mut [u64],
    policy: &'a mut dyn IntervalPolicy,
    wall_ts: &'a mut dyn FnMut() -> String,
    /// `wall_ts`, computed at the first event and shared by the tick's.
    ts: Option<String>,
    events: &'a mut Vec<Event>,
    changed: &'a mut Vec<Change>,
    backstop_warned: &'a mut bool,
    /// The next event's sequence number.
    seq: u64,
}

impl Announcer<'_> {
    /// `slot`'s track `t` took transition `tr`, decided on the live line
    /// `st` (`full` reads the node's whole state). False if the slot is
    /// free: nothing announced, and the scan skips it.
    #[cold]
    #[inline(never)]
    fn transition(
        &mut self,
        slot: u32,
        t: &mut Track,
        tr: &Transition,
        st: &NodeLive,
        full: &dyn Fn() -> NodeState,
    ) -> bool {
        let i = slot as usize;
        let id = self.node_id[i];
        if id == 0 {
            // A freed slot whose state the dataplane did not clear (it
            // must: `Dataplane::remove_node`): never announce it.
            *t = Track::default();
            return false;
        }
        let (det, now_ns) = (self.det, self.now_ns);
        // The tick's time, or the last arrival it read if later (stamped
        // while it scanned): a record is no earlier than anything its
        // tick saw, so the next monitor takes only a generation that
        // started after it for a restart nobody saw
        // (`state::Recorded::restarted_since`).
        self.since_ns[i] = now_ns.max(st.last_arrival_ns);
        if tr.refutes_suspicion() {
            // Back without a restart: the suspicion was false.
            self.policy.suspicion_refuted(slot);
        }
        let ts = self.ts.get_or_insert_with(&mut *self.wall_ts).clone();
        // The live line the transition was decided on, with the rest read
        // now (losses, restarts): a heartbeat or a restart stamped in
        // between must not show in the event (a `dead` with `last_seen_ms`
        // 0, or the new generation).
        let st = NodeState::from_parts(st, full().rest());
        self.changed.push(Change {
            slot,
            node_id: id,
            status: t.status,
            last: state::last_confirmed(st.monitor_status),
            event: self.events.len(),
        });
        if tr.event == EventKind::Dead && !*self.backstop_warned && det.backstop_binds(&st) {
            *self.backstop_warned = true;
            tracing::warn!(
                node_id = id,
                interval_ms = st.interval_ms,
                max_silence_ms = det.thresholds.max_silence_ms,
                "node declared dead by --max-silence-ms before it could miss the intervals \
                 --dead-min-intervals tolerates: nodes this slow go dead after fewer lost \
                 heartbeats than that (after one, if slower than half of it; between \
                 heartbeats, if slower than all of it); raise --max-silence-ms above a few \
                 of their intervals (logged once)"
            );
        }
        self.events.push(event(
            self.seq,
            ts,
            id,
            tr,
            t,
            &st,
            det.phi_since(&st, now_ns, self.listening_since_ns),
            now_ns,
        ));
        self.seq += 1;
        true
    }
}

/// A status the tick changed, and its event: the `event`-th of the
/// tick's `events`.
#[derive(Clone, Copy, Debug)]
struct Change {
    slot: u32,
    node_id: u32,
    status: Status,
    /// The node's last confirmed status, carried over from the record this
    /// change replaces ([`state::last_confirmed`]).
    last: Status,
    event: usize,
}

/// Records written unconfirmed whose events are published: the newest of
/// each slot (a later change replaces it), indexed by slot (slots are
/// dense: no hashing at a million nodes), and every change in the order
/// it was published, for [`Core::confirm`] to take those settled from the
/// front. A superseded change stays in `order` until then: if its line is
/// written, it is the node's last status announced, which the newer
/// record must carry as its last confirmed one. `order` is compacted to
/// the newest change of each slot held when it passes twice their number
/// (a writer hung for long while nodes flap), and the slots whose older
/// changes that drops are marked ([`Published::history_lost`]).
#[derive(Default)]
struct Unconfirmed {
    /// Grown to the table's length as slots are published.
    by_slot: Vec<Option<Published>>,
    /// How many of `by_slot` are `Some`.
    held: usize,
    order: VecDeque<(u32, Published)>,
    /// Slots whose node was removed with changes unsettled
    /// ([`Core::remove_node`]): their entries in `order` up to this
    /// position are that node's, and settle nothing (the slot's state was
    /// cleared, and it may hold another node, or the same one again,
    /// afresh). Dropped once `confirm` is past the position.
    stale: HashMap<u32, u64>,
}

/// A change published (the slot is where it is kept). 16 bytes: `by_slot`
/// has one per node.
#[derive(Clone, Copy, Debug)]
struct Published {
    node_id: u32,
    status: Status,
    /// Changes of the slot before this one were dropped from `order`
    /// unsettled (compaction): which of them had its line written is not
    /// known, so neither is the node's last status announced.
    history_lost: bool,
    /// The event's position (`EventSink::publish`).
    pos: u64,
}

const _: () = assert!(std::mem::size_of::<Option<Published>>() == 16);

impl Core {
    /// The events of the last [`Core::tick`] were published, the first at
    /// position `base + 1` (`EventSink::publish`): each record that tick
    /// wrote is confirmed once its event is written ([`Core::confirm`]).
    /// Called once per tick, under the same lock, with the whole `events`
    /// the tick appended to; a tick whose events are not published leaves
    /// its records unconfirmed for good.
    pub fn published(&mut self, base: u64) {
        let u = &mut self.unconfirmed;
        let len = self.table.len() as usize;
        for c in self.changed.drain(..) {
            let i = c.slot as usize;
            if i >= u.by_slot.len() {
                u.by_slot.resize(len.max(i + 1), None);
            }
            let mut p = Published {
                node_id: c.node_id,
                status: c.status,
                pos: base + c.event as u64 + 1,
                history_lost: false,
            };
            match u.by_slot[i].replace(p) {
                None => u.held += 1,
                // The same node's unsettled history goes on.
                Some(old) if old.node_id == c.node_id && old.history_lost => {
                    p.history_lost = true;
                    u.by_slot[i] = Some(p);
                }
                Some(_) => {}
            }
            u.order.push_back((c.slot, p));
        }
        if u.order.len() > 2 * u.held + 64 {
            let (by_slot, stale) = (&mut u.by_slot, &u.stale);
            u.order.retain(|(slot, q)| {
                if stale.get(slot).is_some_and(|&upto| q.pos <= upto) {
                    // A removed node's: not the history of the slot's.
                    return false;
                }
                let Some(Some(cur)) = by_slot.get_mut(*slot as usize) else {
                    return false;
                };
                if cur.pos == q.pos {
                    return true;
                }
                if cur.node_id == q.node_id {
                    cur.history_lost = true;
                }
                false
            });
        }
    }

    /// Settles the records whose events are settled up to `settled.upto`
    /// (`EventSink::settled`). One whose event's line is written is
    /// confirmed: its status written as [`Status::code`] alone, without
    /// the [`state::UNCONFIRMED`] mark and the last confirmed status it
    /// carried (bits 16 to 23 cleared: it is its own), if the slot still
    /// holds that node in that status (under the core's lock the table
    /// says so: no later change, removal or new node). One whose event is
    /// in `settled.not_written` (dropped from a full backlog, or no events
    /// destination) is forgotten, its record left unconfirmed: the next
    /// monitor starts from the status confirmed before it and announces
    /// that change again.
    ///
    /// A change superseded before its line was written (the node changed
    /// again on the next tick, or while the writer was behind) confirms
    /// nothing of its own, but its line, once written, is the node's last
    /// status announced: the newer record still unconfirmed is rewritten
    /// to carry it as its last confirmed status, so that if the newer
    /// line is then lost the next monitor starts from what the events
    /// said last (a `dead` written, then `alive` and `dead` again with
    /// only `alive` written: the second `dead` is announced again, where
    /// carrying the first `dead` made it adopt `dead` silently). Where
    /// compaction lost that history and the newest line is not written
    /// either, the record carries no last confirmed status: the next
    /// monitor adopts the node as it does one recorded by an hb that kept
    /// none (alive or left, then judged afresh). Returns how many it
    /// confirmed.
    pub fn confirm(&mut self, dp: &dyn Dataplane, settled: impl Into<Settled>) -> usize {
        let settled = settled.into();
        let (u, table) = (&mut self.unconfirmed, &self.table);
        let mut not_written = settled.not_written.iter().peekable();
        let mut confirmed = 0;
        while let Some(&(slot, q)) = u.order.front()
            && q.pos <= settled.upto
        {
            u.order.pop_front();
            // Both ascending: the ranges before `pos` are behind.
            while not_written.next_if(|r| r.end <= q.pos).is_some() {}
            let written = !not_written.peek().is_some_and(|r| r.contains(&q.pos));
            if u.stale.get(&slot).is_some_and(|&upto| q.pos <= upto) {
                // A removed node's: its record is gone.
                continue;
            }
            let i = slot as usize;
            // The record in the dataplane is the slot's newest change's
            // while the table still holds that node in that status.
            let in_force = |p: &Published| {
                table.node_id.get(i) == Some(&p.node_id) && table.track[i].status == p.status
            };
            let Some(cur) = u.by_slot.get_mut(i).and_then(|c| c.as_mut()) else {
                continue;
            };
            if cur.pos != q.pos {
                // Superseded by a later change of the slot.
                if written && cur.node_id == q.node_id && in_force(cur) {
                    // Every line before this one is settled: this is the
                    // node's last status announced, exactly.
                    cur.history_lost = false;
                    dp.set_monitor_status(
                        slot,
                        cur.status.unconfirmed_code(q.status),
                        table.since_ns[i],
                    );
                }
                continue;
            }
            let p = *cur;
            u.by_slot[i] = None;
            u.held -= 1;
            if !in_force(&p) {
                continue;
            }
            if written {
                dp.set_monitor_status(slot, p.status.code(), table.since_ns[i]);
                confirmed += 1;
            } else if p.history_lost {
                dp.set_monitor_status(
                    slot,
                    p.status.unconfirmed_code(Status::Unknown),
                    table.since_ns[i],
                );
            }
            // Otherwise never written: the record stays unconfirmed with
            // the last status announced before it.
        }
        u.stale.retain(|_, upto| *upto > settled.upto);
        if u.held == 0 && u.order.capacity() > 1024 {
            // A partition's worth is not kept for the next one (`by_slot`
            // is the table's length, as its other columns).
            u.order.shrink_to(1024);
        }
        confirmed
    }

    /// Records written and not yet confirmed whose events are published
    /// and not known to be dropped.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed.held
    }

    /// The table's nodes whose record in the dataplane is unconfirmed:
    /// those waiting for their line ([`Core::unconfirmed`]), and those
    /// whose line was never written (dropped, or no events destination).
    /// The next monitor goes on from their last confirmed status and
    /// announces the change again. Reads every node's whole state: for a
    /// shutdown.
    pub fn unconfirmed_records(&self, dp: &dyn Dataplane) -> usize {
        let mut n = 0;
        dp.read_states(0..self.table.len(), &mut |slot, st| {
            n += usize::from(
                self.table.node_id[slot as usize] != 0
                    && st.monitor_status & state::UNCONFIRMED != 0,
            );
        });
        n
    }
}

impl Core {
    /// Forgets node `id`, removed from the dataplane (its state cleared):
    /// its slot in the table, the policy's memory of it, and its records
    /// waiting for confirmation (none of them may confirm anything on the
    /// slot, which a node may take next, the same one too). A node that
    /// was announced (any status but `unknown`: `joined` came first) is
    /// announced `removed` by the next tick (or the shutdown, if that
    /// comes first: [`Core::announce_removals`]), from its last status, with
    /// the context of `before` (its state before removal, if it could be
    /// read) at `now_ns`. A node never heard from (a listed node, or a
    /// probation that expires) goes as silently as it came. Returns its
    /// slot.
    pub fn remove_node(&mut self, id: u32, before: Option<&NodeState>, now_ns: u64) -> Option<u32> {
        let slot = self.table.slot_of(id)?;
        let t = self.table.track(slot);
        self.table.remove(id);
        self.policy.forget(slot);
        let u = &mut self.unconfirmed;
        if let Some(Some(p)) = u.by_slot.get(slot as usize).copied() {
            u.by_slot[slot as usize] = None;
            u.held -= 1;
            u.stale.insert(slot, p.pos);
        }
        if t.status != Status::Unknown {
            let st = before.copied().unwrap_or_default();
            let tr = Transition {
                event: EventKind::Removed,
                previous: t.status,
                prev_generation: None,
            };
            let gone = Track {
                status: Status::Unknown,
                ..t
            };
            let phi = self
                .detector
                .phi_since(&st, now_ns, self.listening_since_ns);
            // `seq` and `ts` are the tick's that announces it.
            let ev = event(0, String::new(), id, &tr, &gone, &st, phi, now_ns);
            self.removals.push(ev);
        }
        Some(slot)
    }

    /// Appends the `removed` events of the nodes removed since the last
    /// tick to `events`, numbered and stamped now (`wall_ts`, if there is
    /// any); how many, and the stamp. The tick announces them first; the
    /// monitor's shutdown too, after the last tick: the removed nodes'
    /// state is cleared, so no later monitor could announce them.
    pub fn announce_removals(
        &mut self,
        wall_ts: &mut dyn FnMut() -> String,
        events: &mut Vec<Event>,
    ) -> (u32, Option<String>) {
        let mut ts = None;
        let n = self.removals.len() as u32;
        for mut ev in self.removals.drain(..) {
            ev.seq = self.next_seq;
            self.next_seq += 1;
            ev.ts = ts.get_or_insert_with(&mut *wall_ts).clone();
            events.push(ev);
        }
        (n, ts)
    }

    /// Whether the gate stamped an arrival of any node well inside the
    /// gap between the scan at `from_ns` and the tick at `to_ns`: read
    /// only after a long gap between ticks, so the extra scan is rare.
    ///
    /// Not in the tick after `from_ns` (twice the tick, at least 400 ms,
    /// for the scheduler's slack): the monitor slept then, waiting for its
    /// next tick, and the gate stamped heartbeats as usual until the host
    /// was paused; in a fleet of any size some always land there. Nor in
    /// the tick (at least 200 ms) before `to_ns`: arrivals just before it
    /// may be the backlog of a pause the gate was in too. Only each node's
    /// latest arrival is known, so a fleet of fast nodes that all beat
    /// since leaves no trace of a gate that ran: hence also the
    /// once-a-minute bound on excuses.
    ///
    /// A dataplane that knows better says (`Dataplane::gate_ran_between`):
    /// in userspace mode the stamps are the kernel's receive times, which
    /// go on while the monitor process is stopped, so the socket tasks'
    /// reads tell instead (a process stopped alone is excused, whether it
    /// drains its backlog before this asks or after; one starved is not).
    fn gate_ran_between(&self, dp: &dyn Dataplane, from_ns: u64, to_ns: u64) -> bool {
        let tick_ns = self.local_pause_ns() / LOCAL_PAUSE_TICKS;
        let after = from_ns.saturating_add(2 * tick_ns);
        let before = to_ns.saturating_sub(tick_ns);
        if let Some(ran) = dp.gate_ran_between(after, before) {
            return ran;
        }
        let mut ran = false;
        dp.read_live(0..self.table.len(), &mut |_, st, _| {
            ran |= st.last_arrival_ns > after && st.last_arrival_ns < before;
        });
        ran
    }

    /// Which nodes the policy decides for on a tick at `now_ns`.
    fn due(&mut self, now_ns: u64) -> Due {
        if !self.policy.active() {
            return Due::None;
        }
        let p = self.decision_period_ns;
        if self.policy.staggered() {
            let prev = std::mem::replace(&mut self.last_tick_ns, now_ns);
            if prev != 0 && self.tick_ns >= p {
                // Ticks no more often than decisions (`--decision-ms` at
                // most `--tick-ms`): every tick is a gap of a period or
                // more, and every node is decided on each, once per tick.
                // Else none ever was.
                Due::All
            } else if prev == 0 || now_ns.saturating_sub(prev) >= p {
                // The first tick of a policy (start, reload), or the first
                // after a gap of a period or more: the windows start from
                // here, so every node is decided within a period and then
                // once per period. (Deciding for every node here, as this
                // did, decided each again within the period, at its phase:
                // two steps in as little as a tick.)
                Due::None
            } else {
                Due::Window {
                    from: prev % p,
                    to: now_ns % p,
                    period: p,
                }
            }
        } else if now_ns >= self.next_decision_ns {
            self.next_decision_ns = now_ns + p;
            Due::All
        } else {
            Due::None
        }
    }
}

/// Heartbeats after a request to slow down during which [`slowing`]
/// spares a node.
const SLOWING_HEARTBEATS: u64 = 3;

/// When the request a node is being told to slow down to was made, at
/// the latest, as the gate's run of change ACKs tells it (for a monitor
/// that did not make it: one restarted over the pinned maps): the arrival
/// of the run's first heartbeat, if the run is still within
/// [`SLOWING_HEARTBEATS`] of them. 0 if it is not in such a run.
fn slowing_since(st: &NodeState) -> u64 {
    let told = told_to_slow(st);
    if told == 0 || told != st.requested_interval_ms {
        return 0;
    }
    let k = u64::from(st.change_heartbeats);
    let back = (k - 1) * u64::from(st.interval_ms) * 1_000_000;
    st.last_arrival_ns.saturating_sub(back).max(1)
}

/// The interval the gate's ACKs were telling the node to slow down to, if
/// its run of change ACKs is within its first [`SLOWING_HEARTBEATS`]
/// heartbeats and the node has not announced it: so its last heartbeat
/// was answered with it, and the one announcing it may be the one lost.
/// 0 if not. What the gate did, whatever the table asks now: a request
/// withdrawn since (a reload to `--controller off`) or replaced before
/// the node announced it was still told.
fn told_to_slow(st: &NodeState) -> u32 {
    let k = u64::from(st.change_heartbeats);
    let run = st.change_requested_ms > st.interval_ms
        && st.change_reported_ms == st.interval_ms
        && (1..=SLOWING_HEARTBEATS).contains(&k);
    if run { st.change_requested_ms } else { 0 }
}

/// [`told_to_slow`] of the node `full` reads: the rare path of a node
/// about to be declared dead that the table's request does not spare.
#[cold]
#[inline(never)]
fn told_to_slow_of(full: &dyn Fn() -> NodeState) -> u32 {
    told_to_slow(&full())
}

/// Whether a node may have been told to slow down to `requested_ms` (a
/// request written at `decided_ns`) without having announced it yet: its
/// last heartbeat came after the request, so the gate answered it with an
/// ACK carrying it, and within the first few of its intervals after (a
/// node that goes on at its old interval past them does not follow the
/// request, e.g. its own bounds keep it, and is judged by its rhythm).
#[inline]
fn slowing(st: &NodeLive, requested_ms: u32, decided_ns: u64) -> bool {
    requested_ms > st.interval_ms
        && decided_ns != 0
        && st.last_arrival_ns >= decided_ns
        && st.last_arrival_ns - decided_ns <= SLOWING_HEARTBEATS * st.interval_ms as u64 * 1_000_000
}

/// The nodes due for a decision on one tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    None,
    All,
    /// Staggered: the nodes whose phase in the decision period lies in
    /// `(from, to]` (cyclically): the time since the previous tick. Every
    /// node is due exactly once per period, a slice of the fleet per tick.
    Window {
        from: u64,
        to: u64,
        period: u64,
    },
}

impl Due {
    #[inline]
    fn includes(self, slot: u32) -> bool {
        match self {
            Due::None => false,
            Due::All => true,
            Due::Window { from, to, period } => {
                // A multiplicative hash spreads consecutive slots evenly.
                let phase = ((slot as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % period;
                if from <= to {
                    phase > from && phase <= to
                } else {
                    phase > from || phase <= to
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn event(
    seq: u64,
    ts: String,
    node_id: u32,
    tr: &Transition,
    t: &Track,
    st: &NodeState,
    phi: f64,
    now_ns: u64,
) -> Event {
    Event {
        seq,
        ts,
        node_id,
        event: tr.event,
        previous: tr.previous,
        state: t.status,
        phi: if phi.is_finite() { phi } else { f64::MAX },
        // A `left` announced after its node restarted (`state::step`):
        // of the generation that said goodbye, the one the track holds
        // (the state's otherwise).
        generation: if tr.event == EventKind::Left {
            t.generation
        } else {
            st.generation
        },
        prev_generation: tr.prev_generation,
        last_seen_ms: (st.last_arrival_ns != 0)
            .then(|| now_ns.saturating_sub(st.last_arrival_ns) / 1_000_000),
        interval_ms: st.interval_ms,
        accepted: st.accepted,
        lost: st.lost,
        restarts: st.restarts,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hb_common::{
        Datagram, Kind, NodeKey,
        maps::{NodeKeys, REPORT_RESTART},
    };

    use super::*;
    use crate::{
        dataplane::mem::MemDataplane,
        monitor::{
            policy::FixedPolicy,
            state::{EventKind, Status},
            table::Origin,
        },
    };

    const MS: u64 = 1_000_000;
    const SRC: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 18, 0, 2),
        40000,
    ));

    fn key(id: u32) -> NodeKey {
        NodeKey {
            k0: id as u64,
            k1: 7,
        }
    }

    fn keys(id: u32, slot: u32) -> NodeKeys {
        NodeKeys::single(slot, 1, key(id))
    }

    struct Rig {
        dp: MemDataplane,
        core: Core,
        seq: u64,
        events: Vec<Event>,
        /// Events published, and settled (`EventSink`'s positions).
        published: u64,
        settled: u64,
    }

    /// What becomes of a tick's events.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fate {
        /// The monitor dies before it publishes them.
        Lost,
        /// Published, never written (the monitor dies, or its shutdown
        /// flush gives up, with them held).
        Held,
        /// Published and written at once.
        Written,
        /// Published and never written (dropped from a full backlog, or
        /// no events destination), and so settled.
        Dropped,
    }

    impl Rig {
        fn new(ids: &[u32], policy: Box<dyn IntervalPolicy>) -> Rig {
            let dp = MemDataplane::new();
            let mut core = Core::new(
                Detector::new(Thresholds::default(), PhiParams::default()),
                policy,
                1000,
            );
            for id in ids {
                let slot = core.table.insert(*id, Origin::Configured, 0).unwrap();
                dp.upsert_node(*id, &keys(*id, slot)).unwrap();
            }
            Rig {
                dp,
                core,
                seq: 0,
                events: Vec::new(),
                published: 0,
                settled: 0,
            }
        }

        /// One heartbeat through the real gate at `at_ms`, accepted.
        fn gate_one(&self, d: Datagram, at_ms: u64) {
            let v = self.dp.gate(&d.seal(&key(d.node_id)), SRC, at_ms * MS);
            assert_eq!(v.result, hb_common::GateResult::Accepted);
        }

        /// A heartbeat at 100 ms, epoch 1, load 0.
        fn heartbeat(id: u32, generation: u32, flags: u8, seq: u64, interval_ms: u32) -> Datagram {
            Datagram {
                kind: Kind::Heartbeat,
                node_id: id,
                generation,
                key_epoch: 1,
                flags,
                load: 0,
                seq,
                sent_ns: 0,
                interval_ms,
                rtt_us: 0,
            }
        }

        fn send(&mut self, id: u32, generation: u32, flags: u8, at_ms: u64) {
            self.seq += 1;
            self.gate_one(Rig::heartbeat(id, generation, flags, self.seq, 100), at_ms);
        }

        /// One heartbeat of generation 1 with its own `seq` and interval.
        fn beat(&mut self, id: u32, seq: u64, interval_ms: u32, at_ms: u64) {
            self.gate_one(Rig::heartbeat(id, 1, 0, seq, interval_ms), at_ms);
        }

        /// One heartbeat of `generation` with its own `seq`, at 100 ms.
        fn beat_gen(&mut self, id: u32, generation: u32, seq: u64, at_ms: u64) {
            self.gate_one(Rig::heartbeat(id, generation, 0, seq, 100), at_ms);
        }

        /// A node beating every `interval_ms` from `from_ms` to `to_ms`
        /// (inclusive), ticked every 100 ms; its next seq.
        fn steady(&mut self, id: u32, interval_ms: u32, from_ms: u64, to_ms: u64) -> u64 {
            let mut seq = 1;
            let mut t = from_ms;
            while t <= to_ms {
                if (t - from_ms).is_multiple_of(interval_ms as u64) {
                    self.beat(id, seq, interval_ms, t);
                    seq += 1;
                }
                self.tick(t);
                t += 100;
            }
            seq
        }

        /// A LEAVING heartbeat of generation 1.
        fn leave(&mut self, id: u32, seq: u64, at_ms: u64) {
            let d = Rig::heartbeat(id, 1, hb_common::proto::FLAG_LEAVING, seq, 100);
            self.gate_one(d, at_ms);
        }

        /// A new monitor over the same dataplane at `at_ms`, as after a
        /// restart over pinned maps (`Fleet::start`): every node at its
        /// slot, adopted.
        fn restart(&mut self, at_ms: u64) {
            self.restart_with(at_ms, Box::new(FixedPolicy::none()));
        }

        /// [`Rig::restart`] at `at_ms`, then 3 s of ticks every 50 ms:
        /// their events.
        fn restart_and_tick_3s(&mut self, at_ms: u64) -> Vec<(u32, EventKind)> {
            self.restart(at_ms);
            (at_ms..at_ms + 3000)
                .step_by(50)
                .flat_map(|t| self.tick(t))
                .collect()
        }

        /// [`Rig::restart`] with `policy` (not yet reconciled with the
        /// requests in the dataplane: `Core::reconcile_requests`).
        fn restart_with(&mut self, at_ms: u64, policy: Box<dyn IntervalPolicy>) {
            let nodes: Vec<(u32, u32)> = self.core.table.ids().collect();
            self.core = Core::new(
                Detector::new(Thresholds::default(), PhiParams::default()),
                policy,
                1000,
            );
            for (id, slot) in nodes {
                self.core
                    .table
                    .insert_at(id, slot, Origin::Adopted, Track::default(), at_ms * MS)
                    .unwrap();
            }
            self.core.adopt(&self.dp, at_ms * MS);
        }

        fn status(&self, id: u32) -> Status {
            self.core
                .table
                .track(self.core.table.slot_of(id).unwrap())
                .status
        }

        /// Nodes 1 to 4 beat every 100 ms from 100 ms, ticked every 50 ms,
        /// until node 1 is dead and node 2 suspect: node 1 stops after
        /// 2000 ms, node 2 after 2200 ms, node 3 says goodbye at 2000 ms,
        /// node 4 goes on. Returns the time and each node's next seq.
        fn in_every_status() -> (Rig, u64, [u64; 5]) {
            let mut r = Rig::new(&[1, 2, 3, 4], Box::new(FixedPolicy::none()));
            let mut seq = [1u64; 5];
            let mut t = 100;
            loop {
                if t % 100 == 0 {
                    for id in 1..=4u32 {
                        let i = id as usize;
                        match id {
                            1 | 3 if t > 2000 => continue,
                            2 if t > 2200 => continue,
                            3 if t == 2000 => r.leave(3, seq[i], t),
                            _ => r.beat(id, seq[i], 100, t),
                        }
                        seq[i] += 1;
                    }
                }
                r.tick(t);
                if r.status(1) == Status::Dead && r.status(2) == Status::Suspect {
                    break;
                }
                assert!(t < 5000, "node 1 dead while node 2 is suspect");
                t += 50;
            }
            assert_eq!(r.status(3), Status::Left);
            assert_eq!(r.status(4), Status::Alive);
            (r, t, seq)
        }

        /// A tick whose events are written at once, as the tick loop
        /// runs it: published, then what is settled confirmed.
        fn tick(&mut self, at_ms: u64) -> Vec<(u32, EventKind)> {
            self.tick_to(at_ms, Fate::Written)
        }

        fn tick_to(&mut self, at_ms: u64, fate: Fate) -> Vec<(u32, EventKind)> {
            let mut out = Vec::new();
            self.core
                .tick(&self.dp, at_ms * MS, &mut || "ts".into(), &mut out);
            let first = self.published + 1;
            if fate != Fate::Lost {
                self.core.published(self.published);
                self.published += out.len() as u64;
            }
            let mut settled = Settled::from(self.settled);
            if matches!(fate, Fate::Written | Fate::Dropped) {
                self.settled = self.published;
                settled.upto = self.published;
            }
            if fate == Fate::Dropped {
                settled.not_written.push(first..self.published + 1);
            }
            self.core.confirm(&self.dp, settled);
            let r = out.iter().map(|e| (e.node_id, e.event)).collect();
            self.events.extend(out);
            r
        }

        /// The status recorded for node `id` in the dataplane, as
        /// `NodeRest::monitor_status` holds it.
        fn recorded(&self, id: u32) -> u32 {
            let slot = self.core.table.slot_of(id).unwrap();
            let mut code = None;
            self.dp
                .read_states(slot..slot + 1, &mut |_, st| code = Some(st.monitor_status));
            code.unwrap()
        }
    }

    /// A node whose line the scan cannot read keeps its status and is
    /// still counted under it (`hb_nodes`), wherever it sits: between
    /// nodes or last.
    #[test]
    fn a_node_the_scan_cannot_read_is_still_counted() {
        for stuck_id in [2, 3] {
            let mut r = Rig::new(&[1, 2, 3], Box::new(FixedPolicy::none()));
            for id in [1, 2, 3] {
                r.beat(id, 1, 100, 0);
            }
            r.tick(0);
            let alive = r.core.table.counts[Status::Alive as usize];
            assert_eq!(alive, 3);
            let slot = r.core.table.slot_of(stuck_id).unwrap();
            let dp = crate::dataplane::mem::testing::Faulty::unreadable(&r.dp, slot);
            let mut out = Vec::new();
            r.core.tick(&dp, 50 * MS, &mut || "ts".into(), &mut out);
            assert_eq!(
                r.core.table.counts[Status::Alive as usize],
                3,
                "node {stuck_id} stuck"
            );
            assert_eq!(r.core.table.counts.iter().sum::<u64>(), 3);
        }
    }

    /// The backstop declares a 30 s node dead after one lost heartbeat,
    /// where the thresholds tolerate two: the operator is told once, with
    /// what to change; a 10 s node (the senders' default bound) is not
    /// such a node.
    #[test]
    fn a_node_too_slow_for_the_backstop_is_warned_about_once() {
        let warnings = crate::test_log::Warnings::of("hb::monitor::tick");
        let _log = warnings.capture();
        let mut r = Rig::new(&[1, 2, 3], Box::new(FixedPolicy::none()));
        r.beat(1, 1, 10_000, 0);
        r.beat(2, 1, 30_000, 0);
        r.beat(3, 1, 25_000, 5_000);
        r.beat(1, 2, 10_000, 10_000);
        r.beat(2, 2, 30_000, 30_000);
        r.beat(3, 2, 25_000, 30_000);
        for t in (30_000..=95_000).step_by(100) {
            if t % 10_000 == 0 && t <= 40_000 {
                r.beat(1, t / 10_000 + 1, 10_000, t);
            }
            r.tick(t);
        }
        let at = |interval_ms| NodeLive {
            interval_ms,
            ..NodeLive::default()
        };
        assert!(!r.core.detector.backstop_binds(&at(10_000)));
        assert!(r.core.detector.backstop_binds(&at(30_000)));
        let dead: Vec<_> = r
            .events
            .iter()
            .filter(|e| e.event == EventKind::Dead)
            .collect();
        assert_eq!(dead.len(), 3, "{dead:?}");
        assert!(r.core.backstop_warned);
        let lines = warnings.taken();
        assert_eq!(lines.len(), 1, "two slow nodes dead, one line: {lines:#?}");
        assert_eq!(lines[0].field("node_id"), Some("2"), "{lines:#?}");
        let mut quiet = Rig::new(&[1], Box::new(FixedPolicy::none()));
        quiet.steady(1, 10_000, 0, 30_000);
        for t in (30_000..=95_000).step_by(100) {
            quiet.tick(t);
        }
        assert_eq!(quiet.events.last().map(|e| e.event), Some(EventKind::Dead));
        assert_eq!(warnings.taken().len(), 1, "nothing more");
        assert!(
            !quiet.core.backstop_warned,
            "dead by phi, not by the backstop"
        );
    }

    /// An event shows the state its transition was decided on: a
    /// heartbeat of a restarted sender that the kernel stamped between the
    /// scan's two reads of the node is the next tick's news.
    #[test]
    fn an_event_shows_the_state_it_was_decided_on() {
        let mut r = Rig::new(&[3], Box::new(FixedPolicy::none()));
        r.steady(3, 100, 100, 2000);
        // A late tick holds bad news back; the next one is judged.
        assert_eq!(r.tick(2800), vec![]);
        let dp = crate::dataplane::mem::testing::Faulty::written_between_reads(&r.dp, |s| {
            let l = s.live_mut();
            l.generation += 1;
            l.last_arrival_ns += 1000 * MS;
        });
        let mut out = Vec::new();
        r.core.tick(&dp, 2900 * MS, &mut || "ts".into(), &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let ev = &out[0];
        assert_eq!(ev.event, EventKind::Dead);
        assert_eq!(ev.generation, 1);
        assert_eq!(ev.last_seen_ms, Some(900), "silent since 2000 ms");
        assert!(ev.phi > 12.0, "{}", ev.phi);
    }

    #[test]
    fn level_from_y_matches_the_reference_classification() {
        let det = Detector::new(Thresholds::default(), PhiParams::default());
        let th = Thresholds::default();
        for mean in [100.0, 1000.0, 10_000.0] {
            for k in 0..4000 {
                let elapsed = k as f64 * mean / 1000.0;
                let std = 0.1 * mean;
                let y = (elapsed - mean) / std;
                let l = Lateness {
                    y,
                    elapsed_ms: elapsed,
                    mean_ms: mean,
                    std_ms: std,
                    within_stall: false,
                };
                let phi = detector::phi_of_y(y);
                let dead_silence = det.dead_silence_ns(mean * 1e6, std * 1e6, 0) / 1e6;
                assert_eq!(
                    det.level(&l),
                    Level::classify(phi, elapsed, dead_silence, &th),
                    "mean {mean} elapsed {elapsed} phi {phi}"
                );
            }
        }
    }

    #[test]
    fn fused_observation_matches_phi_and_the_reference_classification() {
        let th = Thresholds::default();
        let p = PhiParams {
            acceptable_pause_ms: 30.0,
            ..PhiParams::default()
        };
        let det = Detector::new(th, p);
        // A deterministic spread of states and clocks (xorshift).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut levels = [0usize; 4];
        let mut stalled = 0;
        for _ in 0..200_000 {
            let mean_ms = 50 + next() % 10_000;
            // A third of the nodes with recurring stalls of up to 3 means
            // (units of 2^10 ns).
            let span = (3 * mean_ms * MS) >> 10;
            let stall = if next() % 3 == 0 {
                [(next() % span) as u32, (next() % span) as u32]
            } else {
                [0, 0]
            };
            let st = NodeState {
                accepted: 1 + next() % 5,
                last_arrival_ns: 1_000_000 * MS,
                ia_mean_ns: if next() % 10 == 0 { 0 } else { mean_ms * MS },
                ia_dev_ns: (next() % (mean_ms / 2 + 1)) * MS,
                interval_ms: mean_ms as u32,
                stall,
                ..NodeState::default()
            };
            let now = st.last_arrival_ns + (next() % (8 * mean_ms + 100)) * MS;
            let (mean, std) = detector::moments_ms(&st, &p);
            let silence = (now - st.last_arrival_ns) as f64 / 1e6;
            let dead_silence = det.dead_silence_ns(mean * 1e6, std * 1e6, 0) / 1e6;
            let want = Level::classify(det.phi(&st, now), silence, dead_silence, &th);
            let got = det.observe(&st, now).level;
            assert_eq!(got, want, "{st:?} at +{silence} ms");
            levels[got as usize] += 1;
            let l = detector::lateness(&st, now, &p);
            if l.is_some_and(|l| l.within_stall && l.y >= det_y(&det)) {
                stalled += 1;
            }
        }
        assert!(
            levels.iter().all(|n| *n > 1000),
            "every level exercised: {levels:?}"
        );
        assert!(stalled > 1000, "the stall allowance exercised: {stalled}");
    }

    /// The suspect threshold as standardized lateness.
    fn det_y(d: &Detector) -> f64 {
        d.y_suspect
    }

    #[test]
    fn backstop_applies_to_nodes_without_statistics() {
        let det = Detector::new(Thresholds::default(), PhiParams::default());
        let st = NodeState {
            accepted: 1,
            last_arrival_ns: 1_000 * MS,
            ..NodeState::default()
        };
        assert_eq!(det.observe(&st, 2_000 * MS).level, Level::Healthy);
        assert_eq!(det.observe(&st, 61_000 * MS).level, Level::Dead);
        let off = Detector::new(
            Thresholds {
                max_silence_ms: 0,
                ..Thresholds::default()
            },
            PhiParams::default(),
        );
        assert_eq!(off.observe(&st, 1_000_000 * MS).level, Level::Healthy);
    }

    #[test]
    fn join_suspect_dead_alive_on_a_real_gate() {
        let mut r = Rig::new(&[5, 6], Box::new(FixedPolicy::none()));
        assert_eq!(r.tick(0), vec![]);
        let mut t = 0;
        for _ in 0..20 {
            t += 100;
            r.send(5, 1, 0, t);
            r.send(6, 1, 0, t);
        }
        assert_eq!(
            r.tick(t),
            vec![(5, EventKind::Joined), (6, EventKind::Joined)]
        );
        assert_eq!(r.core.table.count(Status::Alive), 2);
        // Node 6 goes silent; node 5 keeps going.
        let mut seen = Vec::new();
        for _ in 0..10 {
            t += 50;
            if t % 100 == 0 {
                r.send(5, 1, 0, t);
            }
            seen.extend(r.tick(t));
        }
        assert_eq!(seen, vec![(6, EventKind::Suspect), (6, EventKind::Dead)]);
        let dead = r
            .events
            .iter()
            .find(|e| e.event == EventKind::Dead)
            .unwrap();
        assert!(
            dead.phi >= 12.0 && dead.last_seen_ms.unwrap() >= 300,
            "{dead:?}"
        );
        assert_eq!(dead.previous, Status::Suspect);
        // It comes back.
        t += 100;
        r.send(6, 1, 0, t);
        assert_eq!(r.tick(t), vec![(6, EventKind::Alive)]);
    }

    #[test]
    fn leave_and_restart_through_the_gate() {
        let mut r = Rig::new(&[9], Box::new(FixedPolicy::none()));
        r.send(9, 10, 0, 100);
        assert_eq!(r.tick(100), vec![(9, EventKind::Joined)]);
        r.send(9, 10, hb_common::proto::FLAG_LEAVING, 200);
        assert_eq!(r.tick(200), vec![(9, EventKind::Left)]);
        // Ticks a minute apart are not a pause of the monitor.
        r.core.set_tick(std::time::Duration::from_secs(60));
        assert_eq!(r.tick(60_000), vec![], "left is never dead");
        let mut rx = r.dp.take_reports().unwrap();
        r.seq = 0;
        r.send(9, 11, 0, 61_000);
        let ev = r.tick(61_000);
        assert_eq!(ev, vec![(9, EventKind::Restarted)]);
        let e = r.events.last().unwrap();
        assert_eq!((e.prev_generation, e.generation), (Some(10), 11));
        assert_eq!(rx.try_recv().unwrap().kind, REPORT_RESTART);
    }

    /// A planned restart faster than a tick (`systemctl restart`: the
    /// LEAVING heartbeat, then the new process's first heartbeat ~100 ms
    /// later) is told as one slower than a tick: `left` (of the generation
    /// that said goodbye), then `restarted` from `left` on the next tick,
    /// not a bare `restarted` from `alive` that reads as a crash. A
    /// restart after no goodbye is `restarted` from `alive` at once.
    #[test]
    fn a_goodbye_and_a_restart_within_one_tick_are_both_announced() {
        let mut r = Rig::new(&[9], Box::new(FixedPolicy::none()));
        r.send(9, 10, 0, 100);
        assert_eq!(r.tick(100), vec![(9, EventKind::Joined)]);
        r.send(9, 10, hb_common::proto::FLAG_LEAVING, 150);
        r.seq = 0;
        r.send(9, 11, 0, 180);
        assert_eq!(r.tick(200), vec![(9, EventKind::Left)]);
        let e = r.events.last().unwrap();
        assert_eq!(
            (e.previous, e.state, e.generation),
            (Status::Alive, Status::Left, 10)
        );
        r.send(9, 11, 0, 280);
        assert_eq!(r.tick(300), vec![(9, EventKind::Restarted)]);
        let e = r.events.last().unwrap();
        assert_eq!((e.previous, e.state), (Status::Left, Status::Alive));
        assert_eq!((e.prev_generation, e.generation), (Some(10), 11));
        assert_eq!(r.tick(400), vec![]);
        // A crash (no goodbye) and a restart within one tick.
        r.seq = 0;
        r.send(9, 12, 0, 450);
        assert_eq!(r.tick(500), vec![(9, EventKind::Restarted)]);
        let e = r.events.last().unwrap();
        assert_eq!((e.previous, e.prev_generation), (Status::Alive, Some(11)));
    }

    /// Whoever holds a node's leaked key can send one valid heartbeat of
    /// generation `u32::MAX`; from then on the node's own are `stale`. The
    /// rotation that revokes that key (the node restarted on epoch 2, then
    /// epoch 1 removed) forgets the forged generation: the node's next
    /// heartbeat is a restart (from the forged generation, as the events
    /// said), and the node is heard again, not dead for good.
    #[test]
    fn a_revoking_rotation_announces_nothing_for_dead_and_left_nodes() {
        let mut r = Rig::new(&[8, 9], Box::new(FixedPolicy::none()));
        let epoch1 = |r: &Rig, id| NodeKeys::single(r.core.table.slot_of(id).unwrap(), 1, key(id));
        let both = |r: &Rig, id| NodeKeys {
            epoch: [1, 2],
            valid: 3,
            key: [
                key(id),
                NodeKey {
                    k0: 99,
                    k1: id as u64,
                },
            ],
            ..epoch1(r, id)
        };
        let epoch2 = |r: &Rig, id| {
            NodeKeys::single(
                r.core.table.slot_of(id).unwrap(),
                2,
                NodeKey {
                    k0: 99,
                    k1: id as u64,
                },
            )
        };
        r.send(8, 10, 0, 100);
        r.send(9, 10, 0, 100);
        assert_eq!(r.tick(100).len(), 2);
        // Node 8 leaves, node 9 falls silent until dead.
        r.send(8, 10, hb_common::proto::FLAG_LEAVING, 150);
        let events: Vec<_> = (2..=60).flat_map(|i| r.tick(i * 100)).collect();
        assert_eq!(
            events,
            vec![
                (8, EventKind::Left),
                (9, EventKind::Suspect),
                (9, EventKind::Dead)
            ]
        );
        // The routine rotation: epoch 2 added, then epoch 1, which the
        // last heartbeats of both used, removed.
        for id in [8, 9] {
            let k = both(&r, id);
            r.dp.upsert_node(id, &k).unwrap();
        }
        assert_eq!(r.tick(6100), vec![]);
        for id in [8, 9] {
            let k = epoch2(&r, id);
            r.dp.upsert_node(id, &k).unwrap();
        }
        let events: Vec<_> = (62..=100).flat_map(|i| r.tick(i * 100)).collect();
        assert_eq!(events, vec![], "nothing happened to either node");
        assert_eq!((r.status(8), r.status(9)), (Status::Left, Status::Dead));
        // Node 9 comes back, the same process (generation 10), on epoch 2:
        // alive, not restarted; node 8 restarted (generation 11).
        for (id, generation) in [(9, 10), (8, 11)] {
            r.seq += 1;
            let d = Datagram {
                key_epoch: 2,
                ..Rig::heartbeat(id, generation, 0, r.seq, 100)
            };
            let v = r.dp.gate(
                &d.seal(&NodeKey {
                    k0: 99,
                    k1: id as u64,
                }),
                SRC,
                10_050 * MS,
            );
            assert_eq!(v.result, hb_common::GateResult::Accepted);
        }
        let mut events = r.tick(10_100);
        events.sort_by_key(|&(id, _)| id);
        assert_eq!(
            events,
            vec![(8, EventKind::Restarted), (9, EventKind::Alive)]
        );
        let e = r.events.iter().rev().find(|e| e.node_id == 8).unwrap();
        assert_eq!(
            (e.previous, e.prev_generation, e.generation),
            (Status::Left, Some(10), 11)
        );
    }

    #[test]
    fn a_rotation_revoking_a_leaked_key_forgets_the_generation_it_forged() {
        let mut r = Rig::new(&[9], Box::new(FixedPolicy::none()));
        let slot = r.core.table.slot_of(9).unwrap();
        r.send(9, 10, 0, 100);
        assert_eq!(r.tick(100), vec![(9, EventKind::Joined)]);
        // The forgery, under the node's epoch-1 key.
        r.gate_one(Rig::heartbeat(9, u32::MAX, 0, 1, 100), 150);
        assert_eq!(r.tick(200), vec![(9, EventKind::Restarted)]);
        // Epoch 2 is added (both held): the node restarts on it, and is
        // still held down.
        let key2 = NodeKey { k0: 99, k1: 2 };
        let both = NodeKeys {
            slot,
            epoch: [1, 2],
            valid: 3,
            _pad: 0,
            key: [key(9), key2],
        };
        r.dp.upsert_node(9, &both).unwrap();
        let genuine = |seq| {
            let d = Datagram {
                key_epoch: 2,
                ..Rig::heartbeat(9, 11, 0, seq, 100)
            };
            d.seal(&key2)
        };
        let v = r.dp.gate(&genuine(1), SRC, 300 * MS);
        assert_eq!(v.result, hb_common::GateResult::Stale);
        // Epoch 1 is removed: the generation it set goes with it.
        r.dp.upsert_node(9, &NodeKeys::single(slot, 2, key2))
            .unwrap();
        // Ticks before the node's next heartbeat see the reset: no event.
        assert_eq!(r.tick(350), vec![]);
        let mut t = 400;
        let mut seq = 2;
        let mut events = Vec::new();
        while t <= 5000 {
            let v = r.dp.gate(&genuine(seq), SRC, t * MS);
            assert_eq!(v.result, hb_common::GateResult::Accepted, "at {t} ms");
            events.extend(r.tick(t));
            (t, seq) = (t + 100, seq + 1);
        }
        assert_eq!(
            events,
            vec![(9, EventKind::Restarted)],
            "then alive throughout"
        );
        let e = r.events.last().unwrap();
        assert_eq!((e.prev_generation, e.generation), (Some(u32::MAX), 11));
        assert_eq!(r.status(9), Status::Alive);
        // A rotation that drops an epoch the node no longer uses keeps
        // its window: an old heartbeat is still a replay.
        let key3 = NodeKey { k0: 5, k1: 3 };
        let keys23 = NodeKeys {
            slot,
            epoch: [2, 3],
            valid: 3,
            _pad: 0,
            key: [key2, key3],
        };
        r.dp.upsert_node(9, &keys23).unwrap();
        let v = r.dp.gate(&genuine(seq - 1), SRC, t * MS);
        assert_eq!(v.result, hb_common::GateResult::Replay);
    }

    #[test]
    fn policy_decisions_are_written_once_per_change() {
        let mut r = Rig::new(&[1, 2], Box::new(FixedPolicy::fixed(500)));
        r.send(1, 1, 0, 100);
        let st = r
            .core
            .tick(&r.dp, 100 * MS, &mut || "ts".into(), &mut Vec::new());
        assert_eq!(st.decisions, 1, "only the node heard from");
        let mut got = 0;
        r.dp.read_states(0..2, &mut |slot, s| {
            if slot == 0 {
                got = s.requested_interval_ms;
            }
        });
        assert_eq!(got, 500);
        assert_eq!(r.core.table.decision(0), (500, 100 * MS));
        // Next decision period: nothing changed, nothing written.
        let st = r
            .core
            .tick(&r.dp, 1200 * MS, &mut || "ts".into(), &mut Vec::new());
        assert_eq!(st.decisions, 0);
    }

    /// A slot freed in the table whose dataplane state was not cleared (a
    /// dataplane that failed `remove_node`'s contract) is never announced,
    /// counted or given an interval, and its track starts over.
    #[test]
    fn a_freed_slot_the_dataplane_did_not_clear_is_skipped() {
        let mut r = Rig::new(&[1, 2], Box::new(FixedPolicy::fixed(500)));
        r.send(1, 1, 0, 100);
        r.send(2, 1, 0, 100);
        assert_eq!(r.tick(100).len(), 2, "both joined");
        let slot = r.core.table.remove(2).unwrap();
        // Both silent since: the slot's state would go suspect and dead,
        // and decision periods pass.
        let mut out = Vec::new();
        let (mut events, mut decisions) = (0, 0);
        for at_ms in (200..=10_000).step_by(100) {
            let st = r
                .core
                .tick(&r.dp, at_ms * MS, &mut || "ts".into(), &mut out);
            (events, decisions) = (events + st.events, decisions + st.decisions);
        }
        let got: Vec<_> = out.iter().map(|e| (e.node_id, e.event)).collect();
        assert_eq!(got, [(1, EventKind::Suspect), (1, EventKind::Dead)]);
        assert_eq!(
            (events, decisions),
            (2, 0),
            "node 1's interval was already 500"
        );
        assert_eq!(r.core.table.counts.iter().sum::<u64>(), 1);
        assert_eq!(r.core.table.track(slot), Track::default());
    }

    #[test]
    fn adoption_over_existing_state_is_silent() {
        let mut r = Rig::new(&[3, 4, 8], Box::new(FixedPolicy::none()));
        r.send(3, 1, 0, 1000);
        r.send(4, 1, hb_common::proto::FLAG_LEAVING, 1000);
        // A fresh monitor over the same dataplane (as after a restart).
        r.core = Core::new(
            Detector::new(Thresholds::default(), PhiParams::default()),
            Box::new(FixedPolicy::none()),
            1000,
        );
        for (slot, id) in [3u32, 4, 8].into_iter().enumerate() {
            r.core
                .table
                .insert_at(id, slot as u32, Origin::Adopted, Track::default(), 0)
                .unwrap();
        }
        r.core.adopt(&r.dp, 1050 * MS);
        assert_eq!(r.tick(1050), vec![], "no false joined");
        assert_eq!(r.core.table.track(0).status, Status::Alive);
        assert_eq!(r.core.table.track(1).status, Status::Left);
        assert_eq!(r.core.table.track(2).status, Status::Unknown);
    }

    /// A restart over pinned maps keeps each node's status and how long
    /// it has been in it: a dead node is not shown alive and announced
    /// dead again (hooks paged again for every dead node at every
    /// upgrade), a suspect one stays suspect, a left one left. Each comes
    /// back with an event on its next heartbeat.
    #[test]
    fn a_restart_keeps_each_nodes_status() {
        let (mut r, t, seq) = Rig::in_every_status();
        let since = |r: &Rig, id| r.core.table.since_ns(r.core.table.slot_of(id).unwrap());
        let dead_since = since(&r, 1);
        let start = t + 300;
        r.restart(start);
        assert_eq!(r.tick(start), vec![], "nothing announced at the start");
        let counts = |r: &Rig| Status::ALL.map(|s| r.core.table.count(s));
        assert_eq!(
            counts(&r),
            [0, 1, 1, 1, 1],
            "unknown alive suspect dead left"
        );
        assert_eq!(since(&r, 1), dead_since, "state_for_ms survives");
        // The suspect node, silent on, goes dead (judged from the start);
        // the dead one is not announced again; the others beat.
        let mut seen = Vec::new();
        let mut s4 = seq[4];
        for t in (start + 50..start + 1500).step_by(50) {
            if t % 100 == 0 {
                r.beat(4, s4, 100, t);
                s4 += 1;
            }
            seen.extend(r.tick(t));
        }
        assert_eq!(seen, vec![(2, EventKind::Dead)]);
        assert_eq!(r.events.last().unwrap().previous, Status::Suspect);
        assert_eq!(since(&r, 1), dead_since);
        // They come back.
        let t = start + 1500;
        r.beat(1, seq[1], 100, t);
        r.beat(2, seq[2], 100, t);
        r.beat(3, seq[3], 100, t);
        r.beat(4, s4, 100, t);
        let back = r.events.len()..r.events.len() + 3;
        assert_eq!(
            r.tick(t),
            vec![
                (1, EventKind::Alive),
                (2, EventKind::Alive),
                (3, EventKind::Alive)
            ]
        );
        let previous: Vec<_> = r.events[back].iter().map(|e| e.previous).collect();
        assert_eq!(previous, [Status::Dead, Status::Dead, Status::Left]);
    }

    /// The reviewer's case: the monitor dies after the tick that declares
    /// a node dead and before its event is written (a crash, SIGKILL,
    /// OOM, or a shutdown whose flush gave up): the next monitor announces
    /// the node dead again, at least once, where it adopted the recorded
    /// status in silence and the page was lost for good. An event that
    /// was written is not announced again; one dropped (the backlog was
    /// full, or there is no events destination) is.
    #[test]
    fn a_dead_event_not_written_before_a_restart_is_announced_again() {
        for fate in [Fate::Lost, Fate::Held, Fate::Dropped, Fate::Written] {
            let (mut r, mut t, seq) = Rig::in_every_status();
            // Node 2 dies; what becomes of that tick's events is `fate`.
            loop {
                t += 50;
                if r.tick_to(t, fate) == [(2, EventKind::Dead)] {
                    break;
                }
                assert!(t < 5000, "{fate:?}");
            }
            let dead = Status::Dead.code();
            let expect = match fate {
                Fate::Written => dead,
                _ => Status::Dead.unconfirmed_code(Status::Suspect),
            };
            assert_eq!(r.recorded(2), expect, "{fate:?}");
            let held = usize::from(fate == Fate::Held);
            assert_eq!(r.core.unconfirmed(), held, "{fate:?}");
            let left = usize::from(fate != Fate::Written);
            assert_eq!(r.core.unconfirmed_records(&r.dp), left, "{fate:?}");
            let mut s4 = seq[4];
            if fate != Fate::Held {
                // Later events written do not confirm it.
                for _ in 0..4 {
                    t += 50;
                    if t % 100 == 0 {
                        r.beat(4, s4, 100, t);
                        s4 += 1;
                    }
                    assert_eq!(r.tick(t), vec![], "{fate:?}");
                }
                assert_eq!(r.recorded(2), expect, "{fate:?}");
            }
            let start = t + 300;
            r.restart(start);
            let mut dead_again = Vec::new();
            for t in (start..start + 3000).step_by(50) {
                if t % 100 == 0 {
                    r.beat(4, s4, 100, t);
                    s4 += 1;
                }
                let ev = r.tick(t);
                dead_again.extend(ev.into_iter().filter(|e| e.1 == EventKind::Dead));
            }
            // Node 1's `dead` was written (in `in_every_status`): never
            // again.
            let expect = match fate {
                Fate::Written => vec![],
                _ => vec![(2, EventKind::Dead)],
            };
            assert_eq!(dead_again, expect, "{fate:?}");
            assert_eq!((r.status(1), r.status(2)), (Status::Dead, Status::Dead));
            assert_eq!((r.recorded(1), r.recorded(2)), (dead, dead), "{fate:?}");
            // Written now: a clean restart repeats nothing.
            let start = start + 3000;
            r.restart(start);
            for t in (start..start + 3000).step_by(50) {
                if t % 100 == 0 {
                    r.beat(4, s4, 100, t);
                    s4 += 1;
                }
                assert_eq!(r.tick(t), vec![], "{fate:?}");
            }
        }
    }

    /// An `alive` or a `left` not written before a restart is announced
    /// again too: the record keeps the status last confirmed beside the
    /// one in flight, and the next monitor starts from it, where it
    /// adopted the node as it is now and the change was lost. Node 1,
    /// confirmed dead, is back and still beating: `alive` at the start;
    /// node 2, confirmed dead, beat once and is silent at the start:
    /// `alive` on its next heartbeat; node 4, confirmed alive, said
    /// goodbye: `left`. Written, nothing is announced again.
    #[test]
    fn an_alive_or_left_not_written_before_a_restart_is_announced_again() {
        for fate in [Fate::Lost, Fate::Held, Fate::Dropped, Fate::Written] {
            let (mut r, mut t, mut seq) = Rig::in_every_status();
            while r.status(2) != Status::Dead {
                t += 50;
                if t % 100 == 0 {
                    r.beat(4, seq[4], 100, t);
                    seq[4] += 1;
                }
                r.tick(t);
                assert!(t < 5000, "{fate:?}");
            }
            t += 50;
            r.beat(1, seq[1], 100, t);
            r.beat(2, seq[2], 100, t);
            r.leave(4, seq[4], t);
            seq[1] += 1;
            seq[2] += 1;
            assert_eq!(
                r.tick_to(t, fate),
                [
                    (1, EventKind::Alive),
                    (2, EventKind::Alive),
                    (4, EventKind::Left)
                ],
                "{fate:?}"
            );
            let (alive, left) = (Status::Alive.code(), Status::Left.code());
            let expect = match fate {
                Fate::Written => (alive, alive, left),
                _ => (
                    Status::Alive.unconfirmed_code(Status::Dead),
                    Status::Alive.unconfirmed_code(Status::Dead),
                    Status::Left.unconfirmed_code(Status::Alive),
                ),
            };
            assert_eq!((r.recorded(1), r.recorded(2), r.recorded(4)), expect);
            // Node 1 beats on while no monitor runs.
            let start = t + 300;
            for t in [t + 100, t + 200] {
                r.beat(1, seq[1], 100, t);
                seq[1] += 1;
            }
            r.restart(start);
            let mut again = Vec::new();
            for t in (start..start + 2000).step_by(50) {
                if t % 100 == 0 {
                    r.beat(1, seq[1], 100, t);
                    seq[1] += 1;
                    if t >= start + 200 {
                        r.beat(2, seq[2], 100, t);
                        seq[2] += 1;
                    }
                }
                again.extend(r.tick(t).into_iter().map(|e| (t - start, e)));
            }
            let expect = match fate {
                Fate::Written => vec![],
                _ => vec![
                    (0, (1, EventKind::Alive)),
                    (0, (4, EventKind::Left)),
                    (200, (2, EventKind::Alive)),
                ],
            };
            assert_eq!(again, expect, "{fate:?}");
            let previous: Vec<_> = r.events[r.events.len() - again.len()..]
                .iter()
                .map(|e| e.previous)
                .collect();
            if fate != Fate::Written {
                assert_eq!(previous, [Status::Dead, Status::Alive, Status::Dead]);
            }
            let status = (r.status(1), r.status(2), r.status(4));
            assert_eq!(status, (Status::Alive, Status::Alive, Status::Left));
            assert_eq!(
                (r.recorded(1), r.recorded(2), r.recorded(4)),
                (alive, alive, left),
                "{fate:?}"
            );
        }
    }

    /// Records are held by slot: a node added after some are gets a slot
    /// past them, and its records are settled as any other's; one whose
    /// event was dropped stays unconfirmed until a later one is written.
    #[test]
    fn records_of_a_node_added_later_are_settled() {
        let mut r = Rig::new(&[1], Box::new(FixedPolicy::none()));
        r.beat(1, 1, 100, 100);
        assert_eq!(r.tick(100), [(1, EventKind::Joined)]);
        assert_eq!(r.recorded(1), Status::Alive.code());
        let slot = r.core.table.insert(2, Origin::Configured, 0).unwrap();
        r.dp.upsert_node(2, &keys(2, slot)).unwrap();
        r.beat(1, 2, 100, 200);
        r.beat(2, 1, 100, 200);
        assert_eq!(r.tick_to(200, Fate::Dropped), [(2, EventKind::Joined)]);
        assert_eq!(
            r.recorded(2),
            Status::Alive.unconfirmed_code(Status::Unknown)
        );
        assert_eq!(r.core.unconfirmed(), 0, "forgotten");
        // Node 2 goes silent; its `dead` is written.
        let mut t = 200;
        while r.status(2) != Status::Dead {
            t += 100;
            r.beat(1, t / 100, 100, t);
            r.tick(t);
            assert!(t < 5000);
        }
        assert_eq!(r.recorded(2), Status::Dead.code());
        assert_eq!(r.core.unconfirmed(), 0);
    }

    /// A settled event confirms its record only as its tick left it: not
    /// over a later change of the node (whose event is not written yet),
    /// not for a node removed since; and a record is confirmed as soon as
    /// its event is written, whatever came after it.
    #[test]
    fn only_a_record_still_in_force_is_confirmed() {
        let (mut r, mut t, seq) = Rig::in_every_status();
        let held = r.published;
        // Node 2 dies, then comes back; node 4 says goodbye: none written.
        loop {
            t += 50;
            if r.tick_to(t, Fate::Held) == [(2, EventKind::Dead)] {
                break;
            }
            assert!(t < 5000);
        }
        t += 50;
        r.beat(2, seq[2], 100, t);
        r.leave(4, seq[4], t);
        assert_eq!(
            r.tick_to(t, Fate::Held),
            [(2, EventKind::Alive), (4, EventKind::Left)]
        );
        assert_eq!(r.core.unconfirmed(), 2, "one record a node");
        // The `dead` is written: the record is `alive` now, and stays
        // unconfirmed, carrying the `dead` as the last status announced.
        assert_eq!(r.core.confirm(&r.dp, held + 1), 0);
        assert_eq!(
            r.recorded(2),
            Status::Alive.unconfirmed_code(Status::Dead),
            "the superseded change's line is the last announced"
        );
        // Node 4 is removed before its `left` is written.
        let slot4 = r.core.table.remove(4).unwrap();
        r.dp.remove_node(4).unwrap();
        assert_eq!(r.core.confirm(&r.dp, held + 3), 1);
        assert_eq!(r.recorded(2), Status::Alive.code());
        assert_eq!(r.core.unconfirmed(), 0);
        let mut rec4 = None;
        r.dp.read_states(slot4..slot4 + 1, &mut |_, st| {
            rec4 = Some((st.monitor_status, st.monitor_status_since_ns));
        });
        assert_eq!(rec4, Some((0, 0)), "nothing written for a node removed");
    }

    /// A node removed is announced `removed` by the next tick, from its
    /// last status and with its state as it was; its changes still
    /// unsettled then settle nothing on its slot, which the same node
    /// takes again afresh: `joined` from `unknown`, and the old `dead`
    /// line, written after, is not carried onto its new record as the
    /// last status announced of it. A node never heard from is removed
    /// silently.
    #[test]
    fn a_removed_node_is_announced_and_its_unsettled_changes_settle_nothing() {
        let mut r = Rig::new(&[1, 2], Box::new(FixedPolicy::none()));
        let seq = r.steady(1, 100, 100, 2000);
        let mut t = 2000;
        while r.status(1) != Status::Dead {
            t += 50;
            r.tick_to(t, Fate::Held);
            assert!(t < 10_000);
        }
        let dead = r.events.last().unwrap().clone();
        let slot = r.core.table.slot_of(1).unwrap();
        let mut before = None;
        r.dp.read_states(slot..slot + 1, &mut |_, st| before = Some(*st));
        // Node 2 first: node 1's slot is the one freed last, taken next.
        for id in [2, 1] {
            r.dp.remove_node(id).unwrap();
        }
        assert!(r.core.remove_node(2, None, t * MS).is_some());
        assert_eq!(r.core.remove_node(1, before.as_ref(), t * MS), Some(slot));
        assert_eq!(r.core.unconfirmed(), 0, "nothing left to confirm");
        t += 50;
        assert_eq!(r.tick_to(t, Fate::Held), [(1, EventKind::Removed)]);
        let ev = r.events.last().unwrap();
        assert_eq!(ev.seq, dead.seq + 1);
        assert_eq!((ev.previous, ev.state), (Status::Dead, Status::Unknown));
        assert_eq!(
            (ev.generation, ev.accepted, ev.last_seen_ms.is_some()),
            (dead.generation, dead.accepted, true)
        );
        // Listed again: the freed slot, afresh.
        let again = r.core.table.insert(1, Origin::Configured, t * MS).unwrap();
        assert_eq!(again, slot);
        r.dp.upsert_node(1, &keys(1, slot)).unwrap();
        t += 50;
        r.beat(1, seq, 100, t);
        assert_eq!(r.tick_to(t, Fate::Held), [(1, EventKind::Joined)]);
        assert_eq!(r.events.last().unwrap().previous, Status::Unknown);
        let fresh = Status::Alive.unconfirmed_code(Status::Unknown);
        assert_eq!(r.recorded(1), fresh);
        // Every line but the `joined` written: nothing carried over.
        assert_eq!(r.core.confirm(&r.dp, r.published - 1), 0);
        assert_eq!(r.recorded(1), fresh);
        // The `joined` written: confirmed.
        assert_eq!(r.core.confirm(&r.dp, r.published), 1);
        assert_eq!(r.recorded(1), Status::Alive.code());
    }

    /// A node dead (confirmed) that comes back and dies again while the
    /// writer is behind: `alive`, `suspect` and `dead` are published on
    /// later ticks, each superseding the one before. Once the `alive` and
    /// `suspect` lines are written, `suspect` is the events' last word
    /// for the node, and the `dead` record carries it: if the `dead` line
    /// is then lost (dropped from a full backlog, or still held when the
    /// monitor dies), the next monitor announces `dead` again. Carrying
    /// the first `dead` (confirmed before them) made it adopt `dead`
    /// silently.
    #[test]
    fn a_superseded_change_whose_line_is_written_is_the_last_announced() {
        for dropped in [false, true] {
            let mut r = Rig::new(&[1], Box::new(FixedPolicy::none()));
            let seq = r.steady(1, 100, 100, 2000);
            let mut t = 2000;
            while r.status(1) != Status::Dead {
                t += 50;
                r.tick(t);
                assert!(t < 6000);
            }
            assert_eq!(r.recorded(1), Status::Dead.code(), "dead, confirmed");
            t += 50;
            r.beat(1, seq, 100, t);
            assert_eq!(r.tick_to(t, Fate::Held), [(1, EventKind::Alive)]);
            let mut dead_at = 0;
            while r.status(1) != Status::Dead {
                t += 50;
                if r.tick_to(t, Fate::Held) == [(1, EventKind::Dead)] {
                    dead_at = r.published;
                }
                assert!(t < 9000);
            }
            let kinds: Vec<_> = r.events.iter().rev().take(3).map(|e| e.event).collect();
            assert_eq!(
                kinds,
                [EventKind::Dead, EventKind::Suspect, EventKind::Alive]
            );
            let settled = if dropped {
                Settled {
                    upto: dead_at,
                    not_written: std::iter::once(dead_at..dead_at + 1).collect(),
                }
            } else {
                Settled::from(dead_at - 1)
            };
            assert_eq!(r.core.confirm(&r.dp, settled), 0, "dropped={dropped}");
            assert_eq!(
                r.recorded(1),
                Status::Dead.unconfirmed_code(Status::Suspect),
                "dropped={dropped}"
            );
            let again = r.restart_and_tick_3s(t + 300);
            assert_eq!(again, [(1, EventKind::Dead)], "dropped={dropped}");
        }
    }

    /// A writer behind for long while a node flaps: the changes waiting
    /// are compacted to the newest, and which of the dropped ones had its
    /// line written is not known. If every line since is lost too, the
    /// record carries no last status announced, and the next monitor
    /// judges the node afresh (as one recorded by an hb that kept none):
    /// dead, it is announced dead. Carrying the `dead` confirmed before
    /// the flaps made it adopt `dead` silently, where the events' last
    /// word was `left` or `alive`.
    #[test]
    fn a_node_flapping_while_the_writer_is_behind_is_judged_afresh() {
        let mut r = Rig::new(&[1], Box::new(FixedPolicy::none()));
        let mut seq = r.steady(1, 100, 100, 2000);
        let mut t = 2000;
        while r.status(1) != Status::Dead {
            t += 50;
            r.tick(t);
            assert!(t < 6000);
        }
        assert_eq!(r.recorded(1), Status::Dead.code());
        let first = r.published + 1;
        // Back and gone (LEAVING) 40 times, then back and silent: 82
        // changes of one node, none written.
        for _ in 0..40 {
            t += 100;
            r.beat(1, seq, 100, t);
            assert_eq!(r.tick_to(t, Fate::Held), [(1, EventKind::Alive)]);
            t += 100;
            r.leave(1, seq + 1, t);
            assert_eq!(r.tick_to(t, Fate::Held), [(1, EventKind::Left)]);
            seq += 2;
        }
        t += 100;
        r.beat(1, seq, 100, t);
        assert_eq!(r.tick_to(t, Fate::Held), [(1, EventKind::Alive)]);
        while r.status(1) != Status::Dead {
            t += 50;
            r.tick_to(t, Fate::Held);
            assert!(t < 30_000);
        }
        let order = &r.core.unconfirmed.order;
        let kept_from = order.front().unwrap().1.pos;
        assert!(
            kept_from > first && order.len() <= 2 + 64,
            "compacted: {} changes from {kept_from}, the first at {first}",
            order.len()
        );
        // The lines before `kept_from` written, the rest dropped.
        let settled = Settled {
            upto: r.published,
            not_written: std::iter::once(kept_from..r.published + 1).collect(),
        };
        assert_eq!(r.core.confirm(&r.dp, settled), 0);
        assert_eq!(
            r.recorded(1),
            Status::Dead.unconfirmed_code(Status::Unknown)
        );
        let again = r.restart_and_tick_3s(t + 300);
        assert_eq!(again.last(), Some(&(1, EventKind::Dead)), "{again:?}");
    }

    /// With `--keep-attached` the gate goes on while no monitor runs: a
    /// dead node whose heartbeats came back meanwhile, and still come, is
    /// announced alive at the start; one that beat meanwhile and is silent
    /// again stays dead without an event; one that left meanwhile is
    /// announced left.
    #[test]
    fn what_happened_while_no_monitor_ran_is_announced_at_the_start() {
        let (mut r, t, mut seq) = Rig::in_every_status();
        // Node 2 dies too.
        let mut t = t;
        while r.status(2) != Status::Dead {
            t += 50;
            r.tick(t);
            assert!(t < 5000);
        }
        let stop = t;
        // No monitor from `stop` to `start`; the gate takes node 1's
        // heartbeats from 2 s on, node 2's once, and node 4's LEAVING.
        let start = stop + 5000;
        for t in (stop + 100..start).step_by(100) {
            if t >= stop + 2000 {
                r.beat(1, seq[1], 100, t);
                seq[1] += 1;
            }
            if t == stop + 1000 {
                r.beat(2, seq[2], 100, t);
            }
            if t < stop + 3000 {
                r.beat(4, seq[4], 100, t);
                seq[4] += 1;
            } else if t == stop + 3000 {
                r.leave(4, seq[4], t);
            }
        }
        r.restart(start);
        assert_eq!(
            r.tick(start),
            vec![(1, EventKind::Alive), (4, EventKind::Left)]
        );
        let mut seen = Vec::new();
        for t in (start + 50..start + 2000).step_by(50) {
            if t % 100 == 0 {
                r.beat(1, seq[1], 100, t);
                seq[1] += 1;
            }
            seen.extend(r.tick(t));
        }
        assert_eq!(seen, vec![], "node 2 is not announced dead again");
        assert_eq!(r.status(2), Status::Dead);
    }

    /// A node recorded `left` that came back while no monitor ran
    /// (`--keep-attached`) and went silent again is no longer leaving:
    /// announced `alive` at the start, then `suspect` and `dead` as any
    /// silent node, not kept `left` (which is never dead) for good.
    #[test]
    fn a_left_node_back_and_silent_while_no_monitor_ran_is_announced_dead() {
        let (mut r, stop, mut seq) = Rig::in_every_status();
        // No monitor from `stop` to `start`: node 3 (left) beats again
        // for a second, then falls silent.
        let start = stop + 5000;
        for t in (stop + 1000..stop + 2000).step_by(100) {
            r.beat(3, seq[3], 100, t);
            seq[3] += 1;
        }
        r.restart(start);
        let seen: Vec<_> = (start..start + 3000)
            .step_by(50)
            .flat_map(|t| r.tick(t))
            .filter(|&(id, _)| id == 3)
            .collect();
        let judged = [EventKind::Alive, EventKind::Suspect, EventKind::Dead];
        assert_eq!(seen, judged.map(|e| (3, e)));
        assert_eq!(r.status(3), Status::Dead);
    }

    /// With `--keep-attached` a node may restart while no monitor runs:
    /// the next monitor announces it `restarted` at the start, once, from
    /// the status it adopted (the dead node is not announced `alive`, nor
    /// the others not at all), with no previous generation (none is
    /// known). Node 2, silent on, goes dead as usual; a clean restart
    /// after that repeats nothing.
    #[test]
    fn a_restart_while_no_monitor_ran_is_announced_at_the_start() {
        let (mut r, stop, _) = Rig::in_every_status();
        // No monitor from `stop` to `start`: nodes 1 (dead), 3 (left) and
        // 4 (alive) restart in generation 2 and beat on.
        let start = stop + 3000;
        let mut seq2 = 1;
        let mut beat2 = |r: &mut Rig, t: u64| {
            for id in [1, 3, 4] {
                r.beat_gen(id, 2, seq2, t);
            }
            seq2 += 1;
        };
        for t in (stop + 1000..start).step_by(100) {
            beat2(&mut r, t);
        }
        r.restart(start);
        let at_start = r.events.len();
        assert_eq!(
            r.tick(start),
            vec![
                (1, EventKind::Restarted),
                (3, EventKind::Restarted),
                (4, EventKind::Restarted)
            ]
        );
        let got: Vec<_> = r.events[at_start..]
            .iter()
            .map(|e| (e.previous, e.state, e.generation, e.prev_generation))
            .collect();
        assert_eq!(
            got,
            [
                (Status::Dead, Status::Alive, 2, None),
                (Status::Left, Status::Alive, 2, None),
                (Status::Alive, Status::Alive, 2, None)
            ]
        );
        let mut seen = Vec::new();
        let mut t = start;
        while t < start + 1500 {
            t += 50;
            if t % 100 == 0 {
                beat2(&mut r, t);
            }
            seen.extend(r.tick(t));
        }
        assert_eq!(seen, vec![(2, EventKind::Dead)]);
        // Each restart's record is later than its start: nothing again.
        let start = t + 300;
        r.restart(start);
        let mut t = start;
        while t < start + 1500 {
            if t % 100 == 0 {
                beat2(&mut r, t);
            }
            assert_eq!(r.tick(t), vec![]);
            t += 50;
        }
        let counts = Status::ALL.map(|s| r.core.table.count(s));
        assert_eq!(counts, [0, 3, 0, 1, 0], "unknown alive suspect dead left");
    }

    /// Without `--events` no record is ever confirmed: a restart no
    /// monitor saw is announced all the same (from `alive`, as such a node
    /// is adopted), also when the monitor that adopted it stopped before
    /// its first tick, and not again after it.
    #[test]
    fn a_restart_while_no_monitor_ran_is_announced_without_events_too() {
        let mut r = Rig::new(&[1], Box::new(FixedPolicy::none()));
        r.beat(1, 1, 100, 100);
        assert_eq!(r.tick_to(100, Fate::Dropped), [(1, EventKind::Joined)]);
        for t in (200..=1000).step_by(100) {
            r.beat(1, t / 100, 100, t);
            assert_eq!(r.tick_to(t, Fate::Dropped), []);
        }
        // Restarted in generation 2 at 1500; a monitor adopts it at 2000
        // and stops before its first tick.
        for (seq, t) in (1500..=2500).step_by(100).enumerate() {
            r.beat_gen(1, 2, seq as u64 + 1, t);
        }
        r.restart(2000);
        r.restart(2500);
        assert_eq!(r.tick_to(2500, Fate::Dropped), [(1, EventKind::Restarted)]);
        let e = r.events.last().unwrap();
        assert_eq!((e.previous, e.prev_generation), (Status::Alive, None));
        for t in (2600..=3000).step_by(100) {
            r.beat_gen(1, 2, t / 100 - 14, t);
            assert_eq!(r.tick_to(t, Fate::Dropped), []);
        }
        r.restart(3100);
        assert_eq!(r.tick_to(3100, Fate::Dropped), []);
    }

    /// A restart the monitor saw and announced is recorded no earlier than
    /// its generation's start, whether its first heartbeat came with the
    /// tick, between two, or while the tick scanned (stamped after the
    /// tick's time, read by its scan): the next monitor does not announce
    /// it again. Nor a `restarted` for a node that joined so.
    #[test]
    fn a_restart_announced_before_a_restart_of_the_monitor_is_not_announced_again() {
        let mut r = Rig::new(&[1, 2, 3, 4], Box::new(FixedPolicy::none()));
        let mut t = 0;
        while t <= 1000 {
            if t % 100 == 0 {
                for id in [1, 2, 3] {
                    r.beat(id, t / 100 + 1, 100, t);
                }
            }
            r.tick(t);
            t += 50;
        }
        // Node 1's first heartbeat in generation 2 comes at a tick's time,
        // node 2's between two ticks, node 3's while the tick scans; node
        // 4's first ever while the tick scans.
        let restarts = r.events.len();
        let mut seq2 = 1;
        let mut beat2 = |r: &mut Rig, t: u64, late: u64| {
            r.beat_gen(1, 2, seq2, t);
            r.beat_gen(2, 2, seq2, t - 30);
            r.beat_gen(3, 2, seq2, t + late);
            r.beat_gen(4, 2, seq2, t + late);
            seq2 += 1;
        };
        while t <= 2000 {
            if t % 100 == 0 {
                beat2(&mut r, t, 20);
            }
            r.tick(t);
            t += 50;
        }
        let got: Vec<_> = r.events[restarts..]
            .iter()
            .map(|e| (e.node_id, e.event, e.previous, e.prev_generation))
            .collect();
        assert_eq!(
            got,
            [
                (1, EventKind::Restarted, Status::Alive, Some(1)),
                (2, EventKind::Restarted, Status::Alive, Some(1)),
                (3, EventKind::Restarted, Status::Alive, Some(1)),
                (4, EventKind::Joined, Status::Unknown, None)
            ]
        );
        // The monitor stops; the nodes beat on in generation 2.
        let start = t + 2000;
        while t < start {
            if t % 100 == 0 {
                beat2(&mut r, t, 0);
            }
            t += 50;
        }
        r.restart(start);
        while t < start + 2000 {
            if t % 100 == 0 {
                beat2(&mut r, t, 0);
            }
            assert_eq!(r.tick(t), vec![], "at {t}");
            t += 50;
        }
    }

    #[test]
    fn a_restart_holds_no_silence_against_the_nodes() {
        // A 100 ms node; the monitor stops at 2000 ms, its gate detached
        // (no --keep-attached), and a new one starts at 2800 ms over the
        // pinned state. Without listening_since the first tick saw 800 ms
        // of silence: dead, then alive on the next heartbeat.
        let mut r = Rig::new(&[3], Box::new(FixedPolicy::none()));
        let seq = r.steady(3, 100, 100, 2000);
        r.core = Core::new(
            Detector::new(Thresholds::default(), PhiParams::default()),
            Box::new(FixedPolicy::none()),
            1000,
        );
        r.core
            .table
            .insert_at(3, 0, Origin::Adopted, Track::default(), 0)
            .unwrap();
        r.core.adopt(&r.dp, 2800 * MS);
        // Phi as the API and events show it: from the start, not from
        // the last arrival 800 ms before it.
        let mut st = NodeState::default();
        r.dp.read_states(0..1, &mut |_, s| st = *s);
        let since = r.core.listening_since_ns();
        assert!(r.core.detector.phi_since(&st, 2850 * MS, since) < 1.0);
        assert!(r.core.detector.phi(&st, 2850 * MS) > 8.0);
        assert_eq!(r.tick(2800), vec![]);
        r.beat(3, seq + 8, 100, 2850);
        assert_eq!(r.tick(2900), vec![]);
        assert_eq!(r.core.table.track(0).status, Status::Alive);
        // A node that died meanwhile is still found, from its silence
        // since the start.
        let mut seen = Vec::new();
        for t in (3000..=4000).step_by(100) {
            seen.extend(r.tick(t).into_iter().map(|e| (t, e.1)));
        }
        let dead = seen.iter().find(|e| e.1 == EventKind::Dead);
        assert!(dead.is_some_and(|e| e.0 >= 2850 + 300), "{seen:?}");
    }

    /// A pause of the monitor's host shorter than the 1 s it takes to be
    /// excused, longer than a fast node's `dead` silence (about 330 ms at
    /// 100 ms): the first tick after it may run before the gate stamps the
    /// heartbeats that waited out the pause. It holds bad news back, so
    /// no node is declared dead, then alive, for the monitor's pause; a
    /// node that did die is dead one tick later. A monitor whose every
    /// tick is late holds back every other tick, never two in a row.
    #[test]
    fn a_late_tick_holds_bad_news_until_the_next() {
        let mut r = Rig::new(&[3, 4, 5], Box::new(FixedPolicy::none()));
        let mut seq = 1;
        for t in (100..=2000).step_by(100) {
            for id in [3, 4, 5] {
                r.beat(id, seq, 100, t);
            }
            seq += 1;
            r.tick(t);
        }
        // Paused 700 ms: node 5 died in it; the others' heartbeats queued
        // in the pause are stamped just after the first tick.
        assert_eq!(r.tick(2700), vec![], "held back");
        for id in [3, 4] {
            r.beat(id, seq, 100, 2720);
        }
        assert_eq!(r.tick(2800), vec![(5, EventKind::Dead)]);
        assert_eq!(r.status(3), Status::Alive);
        assert_eq!(r.status(4), Status::Alive);

        // Every tick 300 ms late, node 3 silent from 2800: dead all the
        // same, on a tick that judges (every other one).
        let mut t = 2800;
        let mut seen = Vec::new();
        while r.status(3) != Status::Dead {
            t += 400;
            r.beat(4, seq + t, 100, t);
            seen.push((t, r.tick(t)));
            assert!(t < 5000, "{seen:?}");
        }
        assert_eq!(seen.len(), 2, "held once, then judged: {seen:?}");
        // Good news is not held back: a suspect node heard from again is
        // alive at once.
        let mut r = Rig::new(&[3], Box::new(FixedPolicy::none()));
        let seq = r.steady(3, 1000, 1000, 10_000);
        let mut t = 10_000;
        while r.status(3) != Status::Suspect {
            t += 100;
            r.tick(t);
            assert!(t < 20_000);
        }
        r.beat(3, seq, 1000, t + 50);
        assert_eq!(r.tick(t + 1000), vec![(3, EventKind::Alive)], "a late tick");
    }

    #[test]
    fn a_pause_of_the_monitor_itself_holds_no_silence_against_the_nodes() {
        let mut r = Rig::new(&[3], Box::new(FixedPolicy::none()));
        let s3 = r.steady(3, 100, 100, 2000);
        // The monitor's host is paused for 3 s (no tick, no gate); the
        // clock counted it.
        assert_eq!(r.tick(5000), vec![], "no node blamed for the pause");
        r.beat(3, s3, 100, 5050);
        assert_eq!(r.tick(5100), vec![]);
        assert_eq!(r.core.table.track(0).status, Status::Alive);
        // Ticks 1 s apart with a 1 s tick are not a pause.
        r.core.set_tick(std::time::Duration::from_secs(1));
        assert_eq!(r.tick(6100), vec![(3, EventKind::Dead)]);

        // A monitor that was only slow (its gate went on stamping another
        // node's heartbeats in the gap) is not excused: node 3, silent
        // since 2000 ms, is dead at the first tick after the gap that
        // does not hold bad news back (`HOLD_AFTER_TICKS`).
        let mut r = Rig::new(&[3, 4], Box::new(FixedPolicy::none()));
        for (seq, t) in (100..=2000).step_by(100).enumerate() {
            r.beat(3, seq as u64 + 1, 100, t);
            r.tick(t);
        }
        for (seq, t) in (1000..=4000).step_by(1000).enumerate() {
            r.beat(4, seq as u64 + 1, 1000, t);
        }
        let held = r.tick(5000);
        assert_eq!(held, vec![(4, EventKind::Joined)], "good news only");
        assert!(r.tick(5100).contains(&(3, EventKind::Dead)));

        // The gate stamps heartbeats while the monitor sleeps until its
        // next tick, and the host may be paused at any moment of that
        // sleep: a heartbeat stamped just after the last scan does not
        // show that the gate ran through the gap.
        let mut r = Rig::new(&[3], Box::new(FixedPolicy::none()));
        let mut seq = 0;
        for t in (100..=2000).step_by(100) {
            seq += 1;
            r.beat(3, seq, 100, t - 50);
            r.tick(t);
        }
        r.beat(3, seq + 1, 100, 2050);
        assert_eq!(r.tick(5000), vec![], "a pause 50 ms after the last scan");

        // Nor is one that stalls again and again: once a minute at most.
        let mut r = Rig::new(&[3], Box::new(FixedPolicy::none()));
        r.steady(3, 100, 100, 2000);
        assert_eq!(r.tick(3500), vec![], "excused");
        assert_eq!(r.tick(5000), vec![(3, EventKind::Dead)], "not again");
    }

    /// Userspace mode: the stamps are the kernel's receive times, which go
    /// on while the monitor process is stopped, and a full socket keeps
    /// the oldest of them. Whether the socket task drains its backlog
    /// before the first tick after the stop or after it, the stop is the
    /// monitor's own: no node is blamed (drained first, the stamps inside
    /// the gap refused the excuse, and node 3, whose later heartbeats the
    /// full socket dropped, was dead). A monitor only starved, whose
    /// socket task went on reading, is not excused.
    #[test]
    fn a_stopped_userspace_monitor_is_excused_whenever_it_drains() {
        const MS: u64 = 1_000_000;
        // Node 3 at 100 ms; the process is stopped from 2000 to 6000 ms;
        // the socket filled at 3000 ms and dropped the rest.
        let stopped = |drain_first: bool, starved: bool| {
            let mut r = Rig::new(&[3], Box::new(FixedPolicy::none()));
            let mut seq = 0;
            for t in (100..=2000).step_by(100) {
                seq += 1;
                r.beat(3, seq, 100, t);
                r.dp.note_read(t * MS);
                r.tick(t);
            }
            if starved {
                for t in (2100..=5900).step_by(100) {
                    r.dp.note_read(t * MS);
                }
            }
            let drain = |r: &mut Rig, seq: &mut u64| {
                for t in (2100..=3000).step_by(100) {
                    *seq += 1;
                    r.beat(3, *seq, 100, t);
                }
                r.dp.note_read(6000 * MS);
            };
            if drain_first {
                drain(&mut r, &mut seq);
            }
            let mut seen = r.tick(6000);
            if !drain_first {
                drain(&mut r, &mut seq);
            }
            seen.extend(r.tick(6020));
            seen
        };
        assert_eq!(stopped(true, false), vec![], "drained first");
        assert_eq!(stopped(false, false), vec![], "ticked first");
        assert!(
            stopped(true, true).contains(&(3, EventKind::Dead)),
            "only starved"
        );
    }

    #[test]
    fn one_lost_heartbeat_while_slowing_down_is_not_dead() {
        // A 1 s node asked for 10 s: the heartbeat announcing it (sent 1 s
        // after the ACK, at the old rhythm) is lost; the next comes 10 s
        // after that.
        let mut r = Rig::new(&[1], Box::new(FixedPolicy::none()));
        let seq = r.steady(1, 1000, 1000, 5000);
        r.core
            .set_policy(Box::new(FixedPolicy::fixed(10_000)), 1000, &r.dp, 5000 * MS);
        assert_eq!(r.tick(5100), vec![]);
        assert_eq!(r.core.table.decision(0), (10_000, 5100 * MS), "requested");
        let mut seen = Vec::new();
        let mut t = 5200;
        while t <= 17_000 {
            if t == 6000 {
                // Answered with an ACK carrying the request.
                r.beat(1, seq, 1000, t);
            }
            // At 7000 the heartbeat announcing 10 s is lost.
            if t == 17_000 {
                r.beat(1, seq + 2, 10_000, t);
            }
            seen.extend(r.tick(t).into_iter().map(|e| e.1));
            t += 100;
        }
        assert!(!seen.contains(&EventKind::Dead), "{seen:?}");
        // After it slowed down, it is judged by the new rhythm: dead after
        // three of them, not before.
        let mut dead_at = None;
        while t < 60_000 && dead_at.is_none() {
            t += 100;
            if r.tick(t).contains(&(1, EventKind::Dead)) {
                dead_at = Some(t);
            }
        }
        let dead_at = dead_at.expect("dead");
        assert!((47_000..50_000).contains(&dead_at), "{dead_at}");

        // A node that does not follow the request (its own bounds keep it
        // at 1 s) is judged by its rhythm again after a few heartbeats.
        let mut r = Rig::new(&[1], Box::new(FixedPolicy::fixed(10_000)));
        let seq = r.steady(1, 1000, 1000, 10_000);
        let mut dead_at = None;
        let mut t = 10_100;
        while t < 30_000 && dead_at.is_none() {
            if r.tick(t).contains(&(1, EventKind::Dead)) {
                dead_at = Some(t);
            }
            t += 100;
        }
        let _ = seq;
        let dead_at = dead_at.expect("dead");
        assert!((13_000..14_000).contains(&dead_at), "{dead_at}");
    }

    /// The allowance of a node told to slow down is what the gate's ACKs
    /// told it, not only what the table asks now: a request withdrawn
    /// right after the ACK carrying it (a reload to `--controller off`),
    /// or replaced by another before the node announced it, was still
    /// told, and the heartbeat announcing it may be the one lost.
    #[test]
    fn a_request_withdrawn_or_replaced_after_its_ack_keeps_the_allowance() {
        for replaced in [false, true] {
            let mut r = Rig::new(&[1], Box::new(FixedPolicy::none()));
            r.dp.set_config(&hb_common::maps::Config {
                ack_on_change: 1,
                ..hb_common::maps::Config::default()
            })
            .unwrap();
            let seq = r.steady(1, 1000, 1000, 5000);
            r.core
                .set_policy(Box::new(FixedPolicy::fixed(10_000)), 1000, &r.dp, 5000 * MS);
            assert_eq!(r.tick(5100), vec![]);
            let mut seen = Vec::new();
            let mut t = 5200;
            while t <= 17_000 {
                if t == 6000 {
                    // Answered with an ACK carrying 10 s.
                    r.beat(1, seq, 1000, t);
                }
                if t == 6500 {
                    let next: Box<dyn IntervalPolicy> = if replaced {
                        Box::new(FixedPolicy::fixed(5000))
                    } else {
                        Box::new(FixedPolicy::none())
                    };
                    r.core.set_policy(next, 1000, &r.dp, t * MS);
                }
                // At 7000 the heartbeat announcing 10 s is lost.
                if t == 17_000 {
                    r.beat(1, seq + 2, 10_000, t);
                }
                seen.extend(r.tick(t).into_iter().map(|e| (t, e.1)));
                t += 100;
            }
            assert!(
                !seen.iter().any(|e| e.1 == EventKind::Dead),
                "replaced={replaced}: {seen:?}"
            );
        }
    }

    /// A monitor restarted over the pinned maps right after its
    /// predecessor asked a node to slow down, before the node announced
    /// the new interval: the request is taken over with the allowance,
    /// from when the gate's ACKs began to carry it, so the announcing
    /// heartbeat may be lost there too. One whose ACK run is past its
    /// first few heartbeats (it does not follow) gets none.
    #[test]
    fn a_restart_keeps_the_allowance_of_a_node_slowing_down() {
        for follows in [true, false] {
            let mut r = Rig::new(&[1], Box::new(FixedPolicy::none()));
            // As the monitor configures the gate under a policy that
            // makes requests.
            r.dp.set_config(&hb_common::maps::Config {
                ack_on_change: 1,
                ..hb_common::maps::Config::default()
            })
            .unwrap();
            let mut seq = r.steady(1, 1000, 1000, 5000);
            r.core
                .set_policy(Box::new(FixedPolicy::fixed(10_000)), 1000, &r.dp, 5000 * MS);
            assert_eq!(r.tick(5100), vec![]);
            // Answered with an ACK carrying the request; a node that does
            // not follow goes on at 1 s for five more.
            let last = if follows { 6000 } else { 10_000 };
            for t in (6000..=last).step_by(1000) {
                r.beat(1, seq, 1000, t);
                seq += 1;
                assert_eq!(r.tick(t), vec![]);
            }
            let restart = last + 500;
            r.restart_with(restart, Box::new(FixedPolicy::fixed(10_000)));
            r.core.reconcile_requests(&r.dp, restart * MS);
            let (req, decided) = r.core.table.decision(0);
            assert_eq!(req, 10_000);
            assert_eq!(
                decided,
                if follows { 6000 * MS } else { 0 },
                "follows={follows}"
            );
            // The heartbeat announcing 10 s (1 s after the last) is lost;
            // the next comes 10 s after it, from a node that follows.
            let mut seen = Vec::new();
            let mut t = restart;
            while t <= last + 11_000 {
                if follows && t == last + 11_000 {
                    r.beat(1, seq + 1, 10_000, t);
                }
                seen.extend(r.tick(t).into_iter().map(|e| (t, e.1)));
                t += 100;
            }
            let dead = seen.iter().find(|e| e.1 == EventKind::Dead);
            if follows {
                assert_eq!(dead, None, "{seen:?}");
            } else {
                // Judged by its 1 s rhythm: dead a few seconds after it.
                let at = dead.expect("dead").0;
                assert!((last + 3000..last + 4000).contains(&at), "{seen:?}");
            }
        }
    }

    #[test]
    fn the_third_heartbeat_a_little_late_is_not_lost() {
        // Two consecutive losses, and the third heartbeat 2 ms late: the
        // tick between its due time and its arrival must not call the node
        // dead.
        let mut r = Rig::new(&[8], Box::new(FixedPolicy::none()));
        let seq = r.steady(8, 1000, 0, 10_000);
        let mut seen = Vec::new();
        for t in [10_500, 11_500, 12_500, 13_001] {
            seen.extend(r.tick(t).into_iter().map(|e| e.1));
        }
        r.beat(8, seq + 2, 1000, 13_002);
        seen.extend(r.tick(13_100).into_iter().map(|e| e.1));
        assert_eq!(seen, vec![EventKind::Suspect, EventKind::Alive]);
    }

    #[test]
    fn an_acceptable_pause_counts_once_in_the_silence_dead_needs() {
        let p = PhiParams {
            acceptable_pause_ms: 10_000.0,
            ..PhiParams::default()
        };
        let det = Detector::new(Thresholds::default(), p);
        let st = NodeState {
            accepted: 100,
            last_arrival_ns: 1_000_000 * MS,
            ia_mean_ns: 1000 * MS,
            interval_ms: 1000,
            ..NodeState::default()
        };
        let at = |ms: u64| det.observe(&st, st.last_arrival_ns + ms * MS).level;
        // Three intervals and the pause once (13 s), plus the jitter
        // margin; not three times the interval with the pause (33 s).
        assert_eq!(at(12_900), Level::Suspect);
        assert_eq!(at(14_000), Level::Dead);
    }

    #[test]
    fn a_freeze_too_long_to_be_a_pause_earns_no_stall_allowance() {
        let det = Detector::new(Thresholds::default(), PhiParams::default());
        let stalls = |ms: u64| NodeState {
            accepted: 100,
            last_arrival_ns: 1_000_000 * MS,
            ia_mean_ns: 1000 * MS,
            interval_ms: 1000,
            stall: [((ms * MS) >> hb_common::maps::STALL_UNIT_SHIFT) as u32; 2],
            ..NodeState::default()
        };
        let at = |st: &NodeState, ms: u64| det.observe(st, st.last_arrival_ns + ms * MS).level;
        // Recurring 2 s pauses (a collector): not late before 1 + 1.5 * 2 s.
        let gc = stalls(2000);
        assert_eq!(at(&gc, 3500), Level::Healthy);
        assert_eq!(at(&gc, 4100), Level::Dead, "late, and silent long enough");
        // Two 120 s freezes (each one declared dead): judged by its rhythm.
        let frozen = stalls(120_000);
        assert_eq!(at(&frozen, 2000), Level::Suspect);
        assert_eq!(at(&frozen, 3500), Level::Dead);
    }

    /// A sender that announces no interval (`hb eval`'s traces without
    /// one; another implementation of the protocol) and whose first two
    /// heartbeats arrive 100 ns apart, then beats every second. The mean
    /// stayed at 100 ns for ever and every beat was a "stall", so one lost
    /// heartbeat made the node dead.
    #[test]
    fn an_unannounced_node_with_a_burst_first_tolerates_a_lost_heartbeat() {
        let det = Detector::new(Thresholds::default(), PhiParams::default());
        let mut st = NodeState::default();
        let mut feed = |seq: u64, at_ns: u64| {
            let d = Rig::heartbeat(1, 1, 0, seq, 0);
            let a = st.admit(&d).expect("admitted");
            st.record(&d, a, at_ns);
        };
        let mut t = 1000 * MS;
        feed(1, t);
        t += 100;
        feed(2, t);
        for seq in 3..100 {
            t += 1000 * MS;
            feed(seq, t);
        }
        let at = |ms: u64| det.observe(&st, t + ms * MS).level;
        assert_eq!(at(900), Level::Healthy);
        assert_ne!(at(1600), Level::Dead, "one lost heartbeat");
        assert_eq!(at(10_000), Level::Dead);
    }

    /// Property: a sender holding its node key (a buggy one, or a
    /// compromised host) may put anything in the fields the tag covers:
    /// any generation, sequence number, interval, RTT, load and send time,
    /// at any pace. The gate, the tick's detector and the interval policy
    /// (none, and the Q-learning controller, which reads RTT, load and
    /// interval) must take it without a panic or an arithmetic overflow
    /// (run in a debug build), every node counted under one status.
    mod props {
        use proptest::prelude::*;

        use super::*;
        use crate::monitor::policy::QLearnPolicy;

        #[derive(Clone, Debug)]
        struct Beat {
            after_ms: u64,
            id: u32,
            generation: u32,
            flags: u8,
            load: u16,
            seq: u64,
            sent_ns: u64,
            interval_ms: u32,
            rtt_us: u32,
            tick: bool,
        }

        fn beat() -> impl Strategy<Value = Beat> {
            (
                (prop_oneof![0..300u64, 0..120_000u64], 1..=3u32),
                prop_oneof![Just(1u32), Just(2), any::<u32>()],
                0..=1u8,
                any::<u16>(),
                prop_oneof![1..100u64, any::<u64>(), Just(u64::MAX)],
                any::<u64>(),
                prop_oneof![Just(0u32), 1..20_000u32, any::<u32>()],
                any::<u32>(),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        (after_ms, id),
                        generation,
                        flags,
                        load,
                        seq,
                        sent_ns,
                        interval_ms,
                        rtt_us,
                        tick,
                    )| Beat {
                        after_ms,
                        id,
                        generation,
                        flags,
                        load,
                        seq,
                        sent_ns,
                        interval_ms,
                        rtt_us,
                        tick,
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            #[test]
            fn an_authenticated_sender_saying_anything_panics_nothing(
                beats in prop::collection::vec(beat(), 1..120),
                qlearn in any::<bool>(),
            ) {
                let policy: Box<dyn IntervalPolicy> = if qlearn {
                    let ctrl = crate::controller::QController::new(
                        crate::controller::Config::default(),
                    )
                    .unwrap();
                    Box::new(QLearnPolicy::new(ctrl, None, None).unwrap())
                } else {
                    Box::new(FixedPolicy::none())
                };
                let mut r = Rig::new(&[1, 2, 3], policy);
                let mut now_ms = 1000;
                for b in &beats {
                    now_ms += b.after_ms;
                    let d = Datagram {
                        kind: Kind::Heartbeat,
                        node_id: b.id,
                        generation: b.generation,
                        key_epoch: 1,
                        flags: b.flags,
                        load: b.load,
                        seq: b.seq,
                        sent_ns: b.sent_ns,
                        interval_ms: b.interval_ms,
                        rtt_us: b.rtt_us,
                    };
                    let v = r.dp.gate(&d.seal(&key(b.id)), SRC, now_ms * MS);
                    prop_assert!(hb_common::GateResult::ALL.contains(&v.result));
                    if b.tick {
                        r.tick(now_ms);
                        prop_assert_eq!(r.core.table.counts.iter().sum::<u64>(), 3);
                    }
                }
                // Long after: every node judged by what it said last.
                for t in [1, 10, 100, 1000, 100_000] {
                    r.tick(now_ms + t * 1000);
                    prop_assert_eq!(r.core.table.counts.iter().sum::<u64>(), 3);
                }
            }
        }
    }
}

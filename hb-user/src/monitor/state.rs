//! The node state machine: what the monitor believes about one node, and
//! the events it announces when that belief changes.
//!
//! ```text
//! unknown --first accepted heartbeat (joined)--> alive
//! alive   --phi >= suspect_phi (suspect)-------> suspect
//! alive, suspect --dead criteria (dead)---------> dead
//! suspect, dead --fresh heartbeat and phi < alive_phi (alive)--> alive
//! any seen state --LEAVING heartbeat (left)-----> left   (never dead)
//! left    --fresh heartbeat without LEAVING (alive)--> alive
//! any seen state --larger generation (restarted)--> alive
//!   (after a goodbye not yet announced: left first, restarted next tick)
//! any seen state --generation started while no monitor ran (restarted)--> alive
//! ```
//!
//! Hysteresis: a node enters `suspect` at `suspect_phi` but returns to
//! `alive` only after a heartbeat accepted *since* it became suspect has
//! pulled phi below the lower `alive_phi`. Phi only grows between
//! heartbeats, so a node whose phi jitters around `suspect_phi` because its
//! heartbeats are late (but not late enough to bring phi below `alive_phi`)
//! stays suspect instead of flapping.
//!
//! `dead` needs both a high phi and a minimum silence measured in expected
//! intervals (`dead_min_intervals`): phi's tail is steep when the jitter is
//! small (the standard deviation floor is 10% of the mean), so phi alone
//! would declare a node dead after a single lost heartbeat. With the default
//! of 3 intervals, two consecutive losses are tolerated: the silence also
//! covers the jitter phi forgives a heartbeat on time (`alive_phi`'s), so
//! the third heartbeat is not taken for lost while it is a little late, an
//! acceptable pause counts once (not once per interval), and a node just
//! asked to slow down is given the new interval after its next heartbeat
//! (`tick::Detector::dead_silence_ns`). `max_silence_ms` is a backstop that
//! does not depend on learned statistics.
//!
//! This module is pure (no clock, no I/O): the tick feeds it observations,
//! the unit tests below feed it tables of them.

use serde::Serialize;

/// The bits of a recorded status this version reads: the status, the
/// [`UNCONFIRMED`] mark and the last confirmed status.
const KNOWN: u32 = 0xff | UNCONFIRMED | 0xff << LAST_CONFIRMED_SHIFT;

/// What the monitor believes about a node.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Provisioned, never heard from.
    #[default]
    Unknown = 0,
    Alive = 1,
    Suspect = 2,
    Dead = 3,
    /// Said goodbye with a LEAVING heartbeat.
    Left = 4,
}

impl Status {
    /// Whether the monitor suspects a node in this status.
    pub const fn suspected(self) -> bool {
        matches!(self, Status::Suspect | Status::Dead)
    }

    pub const ALL: [Status; 5] = [
        Status::Unknown,
        Status::Alive,
        Status::Suspect,
        Status::Dead,
        Status::Left,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Alive => "alive",
            Status::Suspect => "suspect",
            Status::Dead => "dead",
            Status::Left => "left",
        }
    }

    pub fn from_name(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.name() == s)
    }

    /// The status as the pinned node state records it
    /// (`NodeRest::monitor_status`): its discriminant, never renumbered
    /// (0: none recorded).
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The status as the tick records it on a transition: [`code`]
    /// marked [`UNCONFIRMED`] until the line of the event that announces
    /// it is written to `--events` (`tick::Core::confirm` then writes it
    /// as [`code`] alone; a line never written leaves the mark), with the
    /// node's last confirmed status (`last`, [`last_confirmed`] of the
    /// record it replaces) in bits 16 to 23 ([`LAST_CONFIRMED_SHIFT`]).
    ///
    /// [`code`]: Status::code
    pub const fn unconfirmed_code(self, last: Status) -> u32 {
        self.code() | UNCONFIRMED | last.code() << LAST_CONFIRMED_SHIFT
    }

    /// A recorded status; a value this version does not know (a newer
    /// hb's) is none recorded, and so is one marked [`UNCONFIRMED`]
    /// (whose last confirmed status is [`last_confirmed`]).
    pub const fn from_code(code: u32) -> Status {
        match code {
            1 => Status::Alive,
            2 => Status::Suspect,
            3 => Status::Dead,
            4 => Status::Left,
            _ => Status::Unknown,
        }
    }
}

/// Bit 8 of a recorded status (`NodeRest::monitor_status`; the low byte
/// is [`Status::code`]): the line of the event that announced it is not
/// written to `--events`, not yet (the monitor may die first) or ever
/// (dropped from a full backlog, or no `--events` at all). A record with
/// the mark counts as its last confirmed status, kept beside it
/// ([`last_confirmed`]; none if there is none, or the record was written
/// by an hb that kept none), so that the next monitor starts from what
/// was last announced and announces again the change in flight (a dead
/// node `dead`, one back `alive`, one gone `left`) rather than lose it.
pub const UNCONFIRMED: u32 = 1 << 8;

/// Where a record marked [`UNCONFIRMED`] keeps the code of the node's
/// last confirmed status: bits 16 to 23 (0: none confirmed since the
/// node was heard from, or written by an hb that kept none). A confirmed
/// record has them clear: it is its own last confirmed status, and reads
/// the same to an hb that knows no more than the low byte.
pub const LAST_CONFIRMED_SHIFT: u32 = 16;

/// The last status announced of a node by a line written to `--events`,
/// as its record (`NodeRest::monitor_status`) tells it: the record's own
/// status if confirmed, the one it keeps in bits 16 to 23
/// ([`LAST_CONFIRMED_SHIFT`]) if marked [`UNCONFIRMED`]; `Unknown` if none
/// (never recorded, a state pinned by an older hb) or the value is one
/// this version does not know (a newer hb's).
pub const fn last_confirmed(record: u32) -> Status {
    if record & !KNOWN != 0 {
        Status::Unknown
    } else if record & UNCONFIRMED != 0 {
        Status::from_code(record >> LAST_CONFIRMED_SHIFT)
    } else {
        Status::from_code(record)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the monitor announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Joined,
    Suspect,
    Alive,
    Dead,
    Left,
    Restarted,
    /// No longer watched: taken off the node list by a reload (or a
    /// restart), from its last status. Not a transition of [`step`]: the
    /// node's slot is freed (`tick::Core::remove_node`).
    Removed,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Joined,
        EventKind::Suspect,
        EventKind::Alive,
        EventKind::Dead,
        EventKind::Left,
        EventKind::Restarted,
        EventKind::Removed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Joined => "joined",
            EventKind::Suspect => "suspect",
            EventKind::Alive => "alive",
            EventKind::Dead => "dead",
            EventKind::Left => "left",
            EventKind::Restarted => "restarted",
            EventKind::Removed => "removed",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The configurable thresholds of the state machine.
///
/// The defaults follow Akka and Cassandra (suspicion at phi 8) and are
/// provisional: the detector evaluation (`hb eval`, issue 5) is where they
/// get chosen on traces, and this is the one place to change them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// alive → suspect at phi >= this.
    pub suspect_phi: f64,
    /// → dead at phi >= this (and `dead_min_intervals` of silence).
    pub dead_phi: f64,
    /// suspect/dead → alive only with phi below this after a fresh heartbeat.
    pub alive_phi: f64,
    /// Minimum silence for `dead`, in expected inter-arrival times.
    pub dead_min_intervals: f64,
    /// Dead after this much silence whatever phi says; 0 = off.
    pub max_silence_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            suspect_phi: 8.0,
            dead_phi: 12.0,
            alive_phi: 1.0,
            dead_min_intervals: 3.0,
            max_silence_ms: 60_000,
        }
    }
}

impl Thresholds {
    /// Checks the ordering the state machine relies on.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |v: f64| v.is_finite() && v > 0.0;
        if !(finite(self.alive_phi) && finite(self.suspect_phi) && finite(self.dead_phi)) {
            return Err("phi thresholds must be positive numbers".into());
        }
        if !(self.alive_phi < self.suspect_phi && self.suspect_phi <= self.dead_phi) {
            return Err(format!(
                "phi thresholds must satisfy alive_phi < suspect_phi <= dead_phi, got {} < {} <= {}",
                self.alive_phi, self.suspect_phi, self.dead_phi
            ));
        }
        if !(self.dead_min_intervals.is_finite() && self.dead_min_intervals >= 0.0) {
            return Err("dead_min_intervals must be a non-negative number".into());
        }
        Ok(())
    }
}

/// How suspicious a node looks right now, from phi and silence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// phi < alive_phi.
    Healthy,
    /// alive_phi <= phi < suspect_phi.
    Normal,
    /// phi >= suspect_phi, not (yet) dead.
    Suspect,
    /// Dead criteria met.
    Dead,
}

impl Level {
    /// The level for a given phi and silence, where `dead` needs a
    /// silence of at least `dead_silence_ms` besides phi (the reference
    /// definition; the tick computes the same from precomputed `y`
    /// thresholds, and the silence from `Detector::dead_silence_ns`).
    pub fn classify(phi: f64, silence_ms: f64, dead_silence_ms: f64, th: &Thresholds) -> Level {
        let silent_long = silence_ms >= dead_silence_ms;
        let backstop = th.max_silence_ms != 0 && silence_ms >= th.max_silence_ms as f64;
        if backstop || (phi >= th.dead_phi && silent_long) {
            Level::Dead
        } else if phi >= th.suspect_phi {
            Level::Suspect
        } else if phi >= th.alive_phi {
            Level::Normal
        } else {
            Level::Healthy
        }
    }
}

/// One tick's observation of a node, from its dataplane state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// Accepted datagrams, all generations (0: never heard from).
    pub accepted: u64,
    pub generation: u32,
    /// The last accepted datagram had LEAVING set.
    pub leaving: bool,
    /// The generation before the current one ended with LEAVING
    /// (`hb_common::maps::NODE_LEFT_BEFORE`).
    pub left_before: bool,
    pub level: Level,
}

/// The monitor's memory of a node between ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Track {
    pub status: Status,
    /// Generation the monitor last saw.
    pub generation: u32,
    /// `accepted` when the node entered its current status: heartbeats
    /// accepted since are "fresh". [`Track::RESTARTED_UNSEEN`]: the node
    /// restarted while no monitor ran, and [`step`] announces it.
    pub mark: u64,
}

impl Track {
    /// The `mark` of a node adopted in a generation that started while no
    /// monitor ran ([`adopt`], [`Recorded::restarted_since`]): [`step`]
    /// announces it `restarted`, with no previous generation (none is
    /// known: the monitor that saw the one before recorded only its
    /// status). No count of accepted heartbeats reaches it, and the
    /// generation itself has no value to spare (0 is a sender's to use).
    pub const RESTARTED_UNSEEN: u64 = u64::MAX;

    /// Whether the node restarted while no monitor ran, not announced yet
    /// ([`Track::RESTARTED_UNSEEN`]).
    pub const fn restarted_unseen(&self) -> bool {
        self.mark == Track::RESTARTED_UNSEEN
    }
}

/// A change of belief, with what it was before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub event: EventKind,
    pub previous: Status,
    /// For `restarted`: the generation before, if known (not for a
    /// restart no monitor saw, [`Track::RESTARTED_UNSEEN`]). None for the
    /// other events.
    pub prev_generation: Option<u32>,
}

impl Transition {
    /// A suspicion the node's own heartbeats refuted: back to alive from
    /// suspect or dead without a restart (what the tick reports to the
    /// interval policy as `suspicion_refuted`).
    pub fn refutes_suspicion(&self) -> bool {
        self.event == EventKind::Alive && self.previous.suspected()
    }
}

/// Advances `t` by one observation; returns the event to announce, if any.
/// At most one event per node per tick: a node whose first heartbeat is
/// already LEAVING is announced `joined`, then `left` on the next tick; one
/// whose goodbye and restart came within a tick, `left`, then `restarted`.
///
/// Inlined always: it is on the tick's per-node path, and called out of
/// line it costs the scan a call, an indirect branch and spills per node.
#[inline(always)]
pub fn step(t: &mut Track, o: &Observation) -> Option<Transition> {
    let previous = t.status;
    let go = |t: &mut Track, status: Status, event: EventKind| {
        t.status = status;
        t.mark = o.accepted;
        Some(Transition {
            event,
            previous,
            prev_generation: None,
        })
    };
    if o.accepted == 0 {
        // Never heard from (or state cleared): nothing to believe.
        return None;
    }
    if t.status == Status::Unknown {
        t.generation = o.generation;
        return go(t, Status::Alive, EventKind::Joined);
    }
    // Another generation: the gate takes only larger ones, but starts a
    // node's afresh when a key rotation revokes the epoch that set it
    // (`hb_common::maps::rekey`: one forged with a leaked key can be
    // ahead of the node's own), and the node's next one is then smaller.
    // That reset (generation 0, which no heartbeat since has set) is no
    // restart: nothing is announced, and the generation known stays
    // until the node's next heartbeat, whose generation says whether it
    // restarted (against the one a forgery set, if so). Announced, it
    // took every dead or left node whose last heartbeat used a removed
    // epoch to `restarted`, then `dead` or `left` again, at the routine
    // rotation's last step. (Inside the branch: off the per-node path of
    // a node whose generation did not change.)
    if o.generation != t.generation || t.restarted_unseen() {
        if o.generation == 0 && !t.restarted_unseen() {
            return None;
        }
        if o.left_before && t.status != Status::Left && !t.restarted_unseen() {
            // The generation before said goodbye, not announced yet: its
            // LEAVING and the new generation's first heartbeat came
            // within one tick (a planned restart: SIGTERM, then a new
            // process at once). `left` now; the generation is left as
            // it was, so the next step announces `restarted`, from
            // `left`, as when the two came in different ticks. (Not for
            // a restart no monitor saw: the generation that said goodbye
            // is not known, and `restarted` says the node went away.)
            t.status = Status::Left;
            t.mark = o.accepted;
            return Some(Transition {
                event: EventKind::Left,
                previous,
                prev_generation: None,
            });
        }
        // One that restarted while no monitor ran: the generation before
        // the one adopted is not known (nor, if it restarted again since,
        // the one announced before).
        let prev_generation = (!t.restarted_unseen()).then_some(t.generation);
        t.generation = o.generation;
        t.status = Status::Alive;
        t.mark = o.accepted;
        return Some(Transition {
            event: EventKind::Restarted,
            previous,
            prev_generation,
        });
    }
    let fresh = o.accepted > t.mark;
    match t.status {
        Status::Unknown => None, // handled above
        _ if o.leaving => {
            if t.status == Status::Left {
                None
            } else {
                go(t, Status::Left, EventKind::Left)
            }
        }
        // Not leaving any more (a new heartbeat of the same generation
        // without the flag): the node changed its mind.
        Status::Left if fresh => go(t, Status::Alive, EventKind::Alive),
        Status::Left => None,
        Status::Alive => match o.level {
            Level::Dead => go(t, Status::Dead, EventKind::Dead),
            Level::Suspect => go(t, Status::Suspect, EventKind::Suspect),
            _ => None,
        },
        Status::Suspect => match o.level {
            Level::Dead => go(t, Status::Dead, EventKind::Dead),
            Level::Healthy if fresh => go(t, Status::Alive, EventKind::Alive),
            _ => None,
        },
        Status::Dead => match o.level {
            Level::Healthy if fresh => go(t, Status::Alive, EventKind::Alive),
            _ => None,
        },
    }
}

/// What the previous monitor recorded of a node in the state that
/// survived it (`NodeRest::monitor_status`, written by the tick on every
/// transition, confirmed once its event's line is written), as [`adopt`]
/// reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// The node's last confirmed status ([`last_confirmed`]; `Unknown`:
    /// none, as in a state pinned by an older hb, or a record marked
    /// [`UNCONFIRMED`] with none confirmed before it).
    pub status: Status,
    /// The gate accepted heartbeats of the node after that status was
    /// recorded (its last arrival is later): with `--keep-attached` the
    /// gate goes on while no monitor runs.
    pub heard_since: bool,
    /// The node's current generation started after the record was written
    /// (its first arrival is later): the node restarted while no monitor
    /// ran. A monitor records a transition of the node in the tick that
    /// sees its generation (`restarted`, or `joined` for its first), at
    /// that tick's time or the last arrival it read if later
    /// (`tick::Announcer::transition`), so a record written since a
    /// generation started is no earlier than its start. Earlier hb
    /// versions stamped it with the tick's time, taken before the scan,
    /// and a first heartbeat stamped during the scan was read by it: the
    /// generation must start over [`RESTART_SLACK_NS`] after the record,
    /// or every node that joined during a scan (5% at a million nodes)
    /// would be announced `restarted` at an upgrade. A restart that no
    /// monitor saw, within that of the node's last transition, is missed.
    pub restarted_since: bool,
}

/// How much later than a record its node's generation must start to have
/// started while no monitor ran ([`Recorded::restarted_since`]): far over
/// a tick's scan, and far under a node's restart.
pub const RESTART_SLACK_NS: u64 = 1_000_000_000;

impl Recorded {
    /// What a record tells ([`last_confirmed`]), written at `since_ns` (0:
    /// none), of a node last heard from at `last_arrival_ns`. A record
    /// marked [`UNCONFIRMED`] was written after its last confirmed status:
    /// heartbeats since it are heard since that status too, and so is the
    /// one that made the change in flight an `alive` or a `left` (only a
    /// heartbeat does), so a node back from `dead` whose `alive` was lost
    /// is announced again at the start if it is still beating.
    ///
    /// The node's current generation started at `gen_start_ns`
    /// (`NodeRest::gen_start_ns`): later than a record this version reads
    /// (any status, confirmed or not; not a newer hb's), it started while
    /// no monitor ran ([`Recorded::restarted_since`]).
    pub const fn of(
        record: u32,
        since_ns: u64,
        last_arrival_ns: u64,
        gen_start_ns: u64,
    ) -> Recorded {
        let read =
            record & !KNOWN == 0 && !matches!(Status::from_code(record & 0xff), Status::Unknown);
        let heard_change = record & UNCONFIRMED != 0
            && matches!(
                Status::from_code(record & 0xff),
                Status::Alive | Status::Left
            );
        Recorded {
            status: last_confirmed(record),
            heard_since: (since_ns != 0 && last_arrival_ns > since_ns) || heard_change,
            restarted_since: read
                && since_ns != 0
                && gen_start_ns > since_ns.saturating_add(RESTART_SLACK_NS),
        }
    }
}

/// The belief a monitor that starts over state that survived its
/// predecessor (pinned maps) adopts a node with, announcing nothing.
///
/// The status the predecessor recorded is kept: a node declared dead
/// hours ago stays `dead` (a restart or an upgrade does not show it
/// alive, then announce it dead again), `suspect` stays suspect, `left`
/// stays left, and each is announced `alive` on its next fresh heartbeat
/// as usual. Heartbeats accepted while no monitor ran count as that
/// return only if they show the node alive now (`o.level`, judged by the
/// node's real silence, is healthy): one that came back and went silent
/// again meanwhile stays as recorded, with no event, except a `left` one:
/// its last word is no goodbye any more, and `left` is never dead, so it
/// is announced `alive` all the same, and dead a few of its intervals
/// after the start if it stays silent. A node recorded
/// `alive` that died meanwhile is judged from the start
/// (`tick::Core::listening_since`) and announced dead a few of its
/// intervals after it, once; one that left meanwhile is announced `left`
/// on the first tick.
///
/// The status kept is the last confirmed one ([`Recorded::status`]): a
/// record still marked [`UNCONFIRMED`] (its event's line never written
/// to `--events`: still held when the predecessor crashed or its
/// shutdown flush gave up, dropped from a full backlog, or no
/// `--events`, hooks being best-effort and proving nothing) counts as the
/// status announced before it, and [`step`] announces the change in
/// flight again if it still holds: a node confirmed alive whose `dead`
/// was not written is announced `dead` (a few of its intervals after the
/// start), one confirmed dead whose `alive` was not written is announced
/// `alive` (at the start if it still beats, see [`Recorded::of`]), one
/// confirmed alive whose `left` was not written is announced `left`.
///
/// A node with no recorded status is adopted `alive`, or `left` if its
/// last word was LEAVING: one of those that had been declared dead is
/// then announced dead again, as before the record existed. That is a
/// state pinned by an older hb, and an unconfirmed record with no status
/// confirmed before it (or written by an hb that kept none). Hence every
/// change is announced at least once: with `--events`, a clean restart
/// repeats nothing (every line was written and its record confirmed), a
/// crash, an unflushed shutdown or a dropped line repeats the changes in
/// flight; without it, no status is ever confirmed and a restart
/// announces every dead node again.
/// Never a false `joined`: only a node never heard from is `unknown`.
///
/// A node whose current generation started after its record was written
/// ([`Recorded::restarted_since`]: it restarted while no monitor ran,
/// with `--keep-attached`) is adopted as above and announced `restarted`
/// on the first tick ([`Track::RESTARTED_UNSEEN`]), from the status
/// adopted and with no previous generation: the record carries none.
/// A restart the previous monitor saw is not: it recorded it.
pub fn adopt(o: &Observation, recorded: Recorded) -> Track {
    let status = match (o.accepted, recorded.status) {
        (0, _) => Status::Unknown,
        (_, Status::Unknown) if o.leaving => Status::Left,
        (_, Status::Unknown) => Status::Alive,
        (_, s) => s,
    };
    // A node recorded `left` whose last word since is not LEAVING came
    // back, beating or not: kept `left`, which is never dead, one silent
    // now would never be announced dead.
    let returned = recorded.heard_since
        && !o.leaving
        && match status {
            Status::Suspect | Status::Dead => o.level == Level::Healthy,
            Status::Left => true,
            _ => false,
        };
    // A node recorded `left` whose generation now began after a goodbye
    // (`left_before`) and says none itself restarted after the goodbye
    // recorded (hb send never takes a LEAVING back): the previous monitor
    // stopped between announcing the `left` and the `restarted` a tick
    // later, or the restart came while no monitor ran.
    let restarted_after_left = status == Status::Left && o.left_before && !o.leaving;
    let restarted = (recorded.restarted_since || restarted_after_left) && status != Status::Unknown;
    Track {
        status,
        generation: o.generation,
        // The last heartbeat fresh (`step`) if it is a return.
        mark: if restarted {
            Track::RESTARTED_UNSEEN
        } else {
            o.accepted - u64::from(returned)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(accepted: u64, generation: u32, level: Level) -> Observation {
        Observation {
            accepted,
            generation,
            leaving: false,
            left_before: false,
            level,
        }
    }

    fn leaving(accepted: u64, generation: u32) -> Observation {
        Observation {
            leaving: true,
            ..obs(accepted, generation, Level::Healthy)
        }
    }

    /// Runs a table of (observation, expected event, expected status).
    fn run(rows: &[(Observation, Option<EventKind>, Status)]) -> Track {
        let mut t = Track::default();
        for (i, (o, ev, st)) in rows.iter().enumerate() {
            let got = step(&mut t, o).map(|tr| tr.event);
            assert_eq!(got, *ev, "row {i}: event for {o:?}");
            assert_eq!(t.status, *st, "row {i}: status after {o:?}");
        }
        t
    }

    use EventKind as E;
    use Level as L;
    use Status as S;

    #[test]
    fn every_transition() {
        run(&[
            (obs(0, 0, L::Healthy), None, S::Unknown),
            (obs(1, 7, L::Healthy), Some(E::Joined), S::Alive),
            (obs(2, 7, L::Normal), None, S::Alive),
            (obs(2, 7, L::Suspect), Some(E::Suspect), S::Suspect),
            (obs(3, 7, L::Healthy), Some(E::Alive), S::Alive),
            (obs(3, 7, L::Suspect), Some(E::Suspect), S::Suspect),
            (obs(3, 7, L::Dead), Some(E::Dead), S::Dead),
            (obs(4, 7, L::Healthy), Some(E::Alive), S::Alive),
            (obs(4, 7, L::Dead), Some(E::Dead), S::Dead),
            (leaving(5, 7), Some(E::Left), S::Left),
            (obs(6, 7, L::Healthy), Some(E::Alive), S::Alive),
        ]);
    }

    #[test]
    fn alive_straight_to_dead_by_backstop() {
        let th = Thresholds::default();
        // phi low (huge learned mean) but silence past the backstop.
        assert_eq!(Level::classify(0.5, 60_000.0, 150_000.0, &th), Level::Dead);
        run(&[
            (obs(1, 1, L::Healthy), Some(E::Joined), S::Alive),
            (obs(1, 1, L::Dead), Some(E::Dead), S::Dead),
        ]);
    }

    #[test]
    fn recovery_needs_a_fresh_heartbeat_not_just_low_phi() {
        // A dead node whose phi reads low again (e.g. statistics reseeded)
        // without any new heartbeat stays dead.
        run(&[
            (obs(1, 1, L::Healthy), Some(E::Joined), S::Alive),
            (obs(1, 1, L::Dead), Some(E::Dead), S::Dead),
            (obs(1, 1, L::Healthy), None, S::Dead),
            (obs(2, 1, L::Healthy), Some(E::Alive), S::Alive),
        ]);
    }

    #[test]
    fn no_flapping_on_jitter_around_the_suspect_threshold() {
        let th = Thresholds::default();
        // phi readings hovering around suspect_phi (8): late heartbeats keep
        // arriving, but none brings phi below alive_phi (1).
        let phis = [7.9, 8.1, 7.8, 8.2, 7.95, 8.05, 7.9, 8.3, 7.7, 8.1];
        let mut t = Track::default();
        step(&mut t, &obs(1, 1, L::Healthy));
        let mut events = Vec::new();
        for (i, phi) in phis.iter().enumerate() {
            let level = Level::classify(*phi, 1500.0, 3000.0, &th);
            if let Some(tr) = step(&mut t, &obs(2 + i as u64, 1, level)) {
                events.push(tr.event);
            }
        }
        assert_eq!(events, vec![E::Suspect], "one suspicion, no flapping");
        assert_eq!(t.status, S::Suspect);
        // A timely heartbeat ends it.
        let level = Level::classify(0.2, 100.0, 3000.0, &th);
        assert_eq!(
            step(&mut t, &obs(50, 1, level)).map(|t| t.event),
            Some(E::Alive)
        );
    }

    #[test]
    fn high_phi_alone_is_not_dead_until_enough_silence() {
        let th = Thresholds::default();
        // phi 20 after 1.8 intervals of a 1 s node (dead needs 3 s of
        // silence): one heartbeat lost, suspect only.
        assert_eq!(Level::classify(20.0, 1800.0, 3000.0, &th), Level::Suspect);
        assert_eq!(Level::classify(20.0, 3000.0, 3000.0, &th), Level::Dead);
        assert_eq!(Level::classify(11.9, 5000.0, 3000.0, &th), Level::Suspect);
        assert_eq!(Level::classify(0.99, 0.0, 3000.0, &th), Level::Healthy);
        assert_eq!(Level::classify(1.0, 0.0, 3000.0, &th), Level::Normal);
    }

    /// A restart whose generation before said goodbye, not announced
    /// yet (both within one tick): `left`, then `restarted` from `left`,
    /// as when they come in different ticks; from any status but `left`,
    /// whose goodbye was announced. A restart no monitor saw is
    /// `restarted` from the status adopted, at once: which generation
    /// said goodbye is not known.
    #[test]
    fn a_goodbye_not_announced_before_a_restart_is_announced_first() {
        let after_goodbye = |accepted, generation| Observation {
            left_before: true,
            ..obs(accepted, generation, L::Healthy)
        };
        for st in [S::Alive, S::Suspect, S::Dead, S::Left] {
            for unseen in [false, true] {
                let mut t = Track {
                    status: st,
                    generation: 7,
                    mark: if unseen { Track::RESTARTED_UNSEEN } else { 5 },
                };
                let o = after_goodbye(6, if unseen { 7 } else { 8 });
                if st != S::Left && !unseen {
                    let tr = step(&mut t, &o).unwrap();
                    assert_eq!((tr.event, tr.previous), (E::Left, st), "{st}");
                    assert_eq!((t.status, t.generation), (S::Left, 7));
                }
                let tr = step(&mut t, &o).unwrap();
                let (previous, prev_generation) = match unseen {
                    false => (S::Left, Some(7)),
                    true => (st, None),
                };
                assert_eq!(
                    (tr.event, tr.previous, tr.prev_generation),
                    (E::Restarted, previous, prev_generation),
                    "{st} {unseen}"
                );
                assert_eq!((t.status, t.generation), (S::Alive, o.generation));
                // The bit stays through the generation: nothing more.
                assert_eq!(step(&mut t, &after_goodbye(7, o.generation)), None);
            }
        }
    }

    #[test]
    fn left_is_never_dead() {
        run(&[
            (obs(1, 1, L::Healthy), Some(E::Joined), S::Alive),
            (leaving(2, 1), Some(E::Left), S::Left),
            (
                Observation {
                    level: L::Dead,
                    ..leaving(2, 1)
                },
                None,
                S::Left,
            ),
            (
                Observation {
                    level: L::Suspect,
                    ..leaving(2, 1)
                },
                None,
                S::Left,
            ),
        ]);
    }

    #[test]
    fn suspect_or_dead_node_that_leaves_is_left() {
        run(&[
            (obs(1, 1, L::Healthy), Some(E::Joined), S::Alive),
            (obs(1, 1, L::Suspect), Some(E::Suspect), S::Suspect),
            (leaving(2, 1), Some(E::Left), S::Left),
        ]);
    }

    #[test]
    fn restart_is_not_a_new_node() {
        let mut t = run(&[
            (obs(1, 100, L::Healthy), Some(E::Joined), S::Alive),
            (obs(5, 100, L::Dead), Some(E::Dead), S::Dead),
        ]);
        let tr = step(&mut t, &obs(6, 101, L::Healthy)).unwrap();
        assert_eq!(tr.event, E::Restarted);
        assert_eq!((tr.previous, tr.prev_generation), (S::Dead, Some(100)));
        assert_eq!((t.status, t.generation), (S::Alive, 101));
        // And from left: a node that left and comes back restarted.
        let mut t = run(&[
            (obs(1, 100, L::Healthy), Some(E::Joined), S::Alive),
            (leaving(2, 100), Some(E::Left), S::Left),
        ]);
        let tr = step(&mut t, &obs(3, 200, L::Healthy)).unwrap();
        assert_eq!((tr.event, tr.previous), (E::Restarted, S::Left));
    }

    #[test]
    fn first_heartbeat_leaving_is_joined_then_left() {
        run(&[
            (leaving(1, 1), Some(E::Joined), S::Alive),
            (leaving(1, 1), Some(E::Left), S::Left),
        ]);
    }

    #[test]
    fn adoption_announces_nothing() {
        let none = Recorded::default();
        assert_eq!(adopt(&obs(0, 0, L::Healthy), none).status, S::Unknown);
        let mut t = adopt(&obs(9, 3, L::Healthy), none);
        assert_eq!((t.status, t.generation, t.mark), (S::Alive, 3, 9));
        assert_eq!(step(&mut t, &obs(10, 3, L::Healthy)), None);
        assert_eq!(adopt(&leaving(9, 3), none).status, S::Left);
        // A node that died while no monitor ran is announced once.
        let mut t = adopt(&obs(9, 3, L::Dead), none);
        assert_eq!(step(&mut t, &obs(9, 3, L::Dead)).unwrap().event, E::Dead);
        assert_eq!(step(&mut t, &obs(9, 3, L::Dead)), None);
    }

    fn recorded(status: Status, heard_since: bool) -> Recorded {
        Recorded {
            status,
            heard_since,
            restarted_since: false,
        }
    }

    #[test]
    fn adoption_keeps_the_recorded_status() {
        for st in [S::Suspect, S::Dead, S::Left] {
            // Kept, and nothing announced while nothing new is heard (a
            // suspect node may still go dead).
            for level in [L::Healthy, L::Normal, L::Suspect, L::Dead] {
                if (st, level) == (S::Suspect, L::Dead) {
                    continue;
                }
                let mut t = adopt(&obs(9, 3, level), recorded(st, false));
                assert_eq!((t.status, t.generation, t.mark), (st, 3, 9));
                assert_eq!(step(&mut t, &obs(9, 3, level)), None, "{st} {level:?}");
            }
            // Its next heartbeat brings it back.
            let mut t = adopt(&obs(9, 3, L::Dead), recorded(st, false));
            let tr = step(&mut t, &obs(10, 3, L::Healthy)).unwrap();
            assert_eq!((tr.event, tr.previous), (E::Alive, st));
            // Heartbeats accepted after the record, while no monitor
            // ran, are that return if the node is alive now ...
            let mut t = adopt(&obs(9, 3, L::Healthy), recorded(st, true));
            let tr = step(&mut t, &obs(9, 3, L::Healthy)).unwrap();
            assert_eq!((tr.event, tr.previous), (E::Alive, st));
            // ... and not if it went silent again (but a left one, whose
            // last word is no goodbye any more: below).
            if st != S::Left {
                let mut t = adopt(&obs(9, 3, L::Dead), recorded(st, true));
                assert_eq!(step(&mut t, &obs(9, 3, L::Healthy)), None);
                assert_eq!(t.status, st);
            }
        }
        // A node recorded alive is adopted as one that had no record,
        // except that leaving meanwhile is news.
        let mut t = adopt(&obs(9, 3, L::Healthy), recorded(S::Alive, true));
        assert_eq!((t.status, t.mark), (S::Alive, 9));
        assert_eq!(step(&mut t, &obs(9, 3, L::Healthy)), None);
        let mut t = adopt(&leaving(9, 3), recorded(S::Alive, false));
        assert_eq!(step(&mut t, &leaving(9, 3)).unwrap().event, E::Left);
        // A left node still leaving stays left, heard since or not.
        let mut t = adopt(&leaving(9, 3), recorded(S::Left, true));
        assert_eq!((t.status, t.mark), (S::Left, 9));
        assert_eq!(step(&mut t, &leaving(9, 3)), None);
        // Never heard from: unknown, whatever the record says.
        assert_eq!(
            adopt(&obs(0, 0, L::Healthy), recorded(S::Dead, false)).status,
            S::Unknown
        );
    }

    /// A node recorded `left` whose current generation began after a
    /// goodbye and says none itself restarted after that goodbye, even
    /// if it started before the record was written (the previous monitor
    /// announced the `left` and stopped before the `restarted` a tick
    /// later): announced `restarted` from `left` at the start, not a bare
    /// `alive`. Still saying goodbye, or no goodbye before: as before.
    #[test]
    fn a_left_record_of_a_goodbye_before_a_restart_is_followed_by_restarted() {
        let after_goodbye = Observation {
            left_before: true,
            ..obs(9, 8, L::Healthy)
        };
        for heard_since in [false, true] {
            let mut t = adopt(&after_goodbye, recorded(S::Left, heard_since));
            assert_eq!(t.status, S::Left);
            let tr = step(&mut t, &after_goodbye).unwrap();
            assert_eq!(
                (tr.event, tr.previous, tr.prev_generation),
                (E::Restarted, S::Left, None),
                "{heard_since}"
            );
            assert_eq!((t.status, t.generation), (S::Alive, 8));
            assert_eq!(step(&mut t, &after_goodbye), None);
        }
        // Its new generation says goodbye too: left, nothing to announce.
        let leaving_again = Observation {
            left_before: true,
            ..leaving(9, 8)
        };
        let mut t = adopt(&leaving_again, recorded(S::Left, true));
        assert_eq!(step(&mut t, &leaving_again), None);
        assert_eq!(t.status, S::Left);
    }

    /// A node recorded `left` that came back while no monitor ran (a
    /// heartbeat without LEAVING since the record: `--keep-attached`, an
    /// older hb that recorded nothing, or an `alive` in flight) is no
    /// longer leaving even if it went silent again: announced `alive`,
    /// then `dead` as any silent node. Kept `left` (never dead), it was
    /// never announced dead.
    #[test]
    fn a_left_node_that_came_back_is_not_left_even_if_silent_again() {
        let back_from_left = [
            recorded(S::Left, true),
            Recorded::of(S::Alive.unconfirmed_code(S::Left), 100, 50, 50),
        ];
        for rec in back_from_left {
            for level in [L::Healthy, L::Normal, L::Suspect, L::Dead] {
                let mut t = adopt(&obs(9, 3, level), rec);
                assert_eq!(t.status, S::Left, "{rec:?} {level:?}");
                let tr = step(&mut t, &obs(9, 3, level)).unwrap();
                assert_eq!((tr.event, tr.previous), (E::Alive, S::Left));
                let dead = step(&mut t, &obs(9, 3, L::Dead)).map(|tr| tr.event);
                assert_eq!(dead, Some(E::Dead), "{rec:?} {level:?}");
            }
        }
        // Still saying goodbye: left, silent or not.
        for level in [L::Healthy, L::Dead] {
            let mut t = adopt(&leaving(9, 3), recorded(S::Left, true));
            assert_eq!(
                step(
                    &mut t,
                    &Observation {
                        level,
                        ..leaving(9, 3)
                    }
                ),
                None
            );
            assert_eq!(t.status, S::Left);
        }
    }

    #[test]
    fn recorded_codes_are_the_discriminants_and_never_change() {
        // Pinned node state holds them across versions.
        let codes = Status::ALL.map(|s| s.code());
        assert_eq!(codes, [0, 1, 2, 3, 4]);
        for s in Status::ALL {
            assert_eq!(Status::from_code(s.code()), s);
        }
        assert_eq!(Status::from_code(5), S::Unknown, "a newer hb's: none");
        for s in Status::ALL {
            for last in Status::ALL {
                let code = s.unconfirmed_code(last);
                assert_eq!(code, last.code() << 16 | 0x100 | s.code());
                assert_eq!(Status::from_code(code), S::Unknown);
                assert_eq!(last_confirmed(code), last, "{s} after {last}");
            }
            assert_eq!(last_confirmed(s.code()), s, "confirmed");
        }
        // Written by an hb that kept no last confirmed status.
        assert_eq!(last_confirmed(0x100 | S::Dead.code()), S::Unknown);
        // A newer hb's: none.
        assert_eq!(last_confirmed(5), S::Unknown);
        assert_eq!(last_confirmed(S::Dead.code() | 1 << 16), S::Unknown);
        assert_eq!(last_confirmed(0x100 | 5 << 16), S::Unknown);
        assert_eq!(last_confirmed(0x200 | S::Dead.code()), S::Unknown);
        assert_eq!(last_confirmed(1 << 24 | S::Dead.code()), S::Unknown);
    }

    /// An unconfirmed record counts as the status confirmed before it, and
    /// the change in flight is announced again by `step`.
    #[test]
    fn adoption_of_an_unconfirmed_record_announces_the_change_in_flight() {
        let of = |now: Status, last: Status| Recorded::of(now.unconfirmed_code(last), 100, 50, 50);
        // Confirmed dead, `alive` in flight: announced at once if still
        // beating, else on its next heartbeat.
        let mut t = adopt(&obs(9, 3, L::Healthy), of(S::Alive, S::Dead));
        assert_eq!(t.status, S::Dead);
        let tr = step(&mut t, &obs(9, 3, L::Healthy)).unwrap();
        assert_eq!((tr.event, tr.previous), (E::Alive, S::Dead));
        let mut t = adopt(&obs(9, 3, L::Dead), of(S::Alive, S::Dead));
        assert_eq!(step(&mut t, &obs(9, 3, L::Dead)), None);
        assert_eq!(
            step(&mut t, &obs(10, 3, L::Healthy)).unwrap().event,
            E::Alive
        );
        // Confirmed alive, `left` in flight.
        let mut t = adopt(&leaving(9, 3), of(S::Left, S::Alive));
        assert_eq!(t.status, S::Alive);
        assert_eq!(step(&mut t, &leaving(9, 3)).unwrap().event, E::Left);
        // Confirmed alive, `dead` in flight.
        let mut t = adopt(&obs(9, 3, L::Dead), of(S::Dead, S::Alive));
        assert_eq!(t.status, S::Alive);
        assert_eq!(step(&mut t, &obs(9, 3, L::Dead)).unwrap().event, E::Dead);
        // Confirmed dead, `dead` in flight again: nothing new.
        let mut t = adopt(&obs(9, 3, L::Dead), of(S::Dead, S::Dead));
        assert_eq!(step(&mut t, &obs(9, 3, L::Dead)), None);
        // None confirmed before it: as a state pinned by an older hb.
        let none = Recorded::of(0x100 | S::Dead.code(), 100, 50, 50);
        assert_eq!(none.status, S::Unknown);
        assert_eq!(adopt(&obs(9, 3, L::Dead), none).status, S::Alive);
        // A confirmed record: its own status, heard since only after it.
        assert_eq!(
            Recorded::of(S::Dead.code(), 100, 50, 50),
            recorded(S::Dead, false)
        );
        assert_eq!(
            Recorded::of(S::Dead.code(), 100, 150, 50),
            recorded(S::Dead, true)
        );
    }

    /// A node whose generation started after its record was written
    /// restarted while no monitor ran (with `--keep-attached` the gate
    /// goes on): announced `restarted` at the first step, from the status
    /// adopted, with no previous generation (none is known); whatever it
    /// did since (went silent, said goodbye) follows as usual. One whose
    /// generation started before the record (the monitor that wrote it saw
    /// it) is adopted as before.
    #[test]
    fn a_restart_while_no_monitor_ran_is_announced_at_adoption() {
        // Records written at 100; the generation started at `gen_start`
        // (`LATER`: while no monitor ran).
        let of =
            |record: u32, gen_start: u64| Recorded::of(record, 100, gen_start.max(150), gen_start);
        const LATER: u64 = 100 + RESTART_SLACK_NS + 50;
        let restarted = |t: &mut Track, o: &Observation, previous: Status| {
            let tr = step(t, o).unwrap();
            assert_eq!(
                (tr.event, tr.previous, tr.prev_generation),
                (E::Restarted, previous, None),
                "{previous} {o:?}"
            );
            assert_eq!(
                (t.status, t.generation, t.mark),
                (S::Alive, o.generation, o.accepted)
            );
        };
        for st in [S::Alive, S::Suspect, S::Dead, S::Left] {
            let recorded = of(st.code(), LATER);
            assert!(recorded.restarted_since);
            // Beating: `restarted`, then nothing.
            let now = obs(9, 4, L::Healthy);
            let mut t = adopt(&now, recorded);
            assert_eq!((t.status, t.generation), (st, 4));
            assert!(t.restarted_unseen());
            restarted(&mut t, &now, st);
            assert_eq!(step(&mut t, &now), None, "{st}");
            // Silent again: `restarted`, then `dead`.
            let mut t = adopt(&obs(9, 4, L::Dead), recorded);
            restarted(&mut t, &obs(9, 4, L::Dead), st);
            assert_eq!(step(&mut t, &obs(9, 4, L::Dead)).unwrap().event, E::Dead);
            // Said goodbye: `restarted`, then `left`.
            let mut t = adopt(&leaving(9, 4), recorded);
            restarted(&mut t, &leaving(9, 4), st);
            assert_eq!(step(&mut t, &leaving(9, 4)).unwrap().event, E::Left);
            // Restarted again before the first tick: one `restarted`.
            let mut t = adopt(&now, recorded);
            restarted(&mut t, &obs(10, 5, L::Healthy), st);
            // Generation 0 is a generation like any other.
            let mut t = adopt(&obs(9, 0, L::Healthy), recorded);
            restarted(&mut t, &obs(9, 0, L::Healthy), st);

            // Started before the record, or in the tick that wrote it (at
            // 120: during its scan, stamped by an earlier hb with the
            // tick's time, 100): the monitor that wrote it saw it.
            // Adopted as before.
            for gen_start in [50, 100, 120, 100 + RESTART_SLACK_NS] {
                let recorded = of(st.code(), gen_start);
                assert!(!recorded.restarted_since);
                assert_eq!(
                    adopt(&now, recorded),
                    adopt(&now, Recorded::of(st.code(), 100, 150, 0)),
                    "{st}"
                );
                // (A left node still saying goodbye: one that beat again
                // since is back, `a_left_node_that_came_back_...`.)
                let o = Observation {
                    leaving: st == S::Left,
                    ..obs(9, 4, L::Normal)
                };
                let mut t = adopt(&o, recorded);
                assert_eq!((t.status, t.mark), (st, 9));
                assert_eq!(step(&mut t, &o), None, "{st}");
            }
        }
        // An unconfirmed record: from the status confirmed before it.
        let mut t = adopt(
            &obs(9, 4, L::Healthy),
            of(S::Alive.unconfirmed_code(S::Dead), LATER),
        );
        restarted(&mut t, &obs(9, 4, L::Healthy), S::Dead);
        // With none confirmed before it (no `--events`): from `alive`, as
        // such a node is adopted.
        let none = of(S::Dead.unconfirmed_code(S::Unknown), LATER);
        assert_eq!((none.status, none.restarted_since), (S::Unknown, true));
        let mut t = adopt(&obs(9, 4, L::Healthy), none);
        restarted(&mut t, &obs(9, 4, L::Healthy), S::Alive);
        // No record (pinned by an older hb), or a newer hb's: as before.
        for record in [0, 5, S::Dead.code() | 1 << 24] {
            let recorded = of(record, 150);
            assert!(!recorded.restarted_since, "{record:#x}");
            let mut t = adopt(&obs(9, 4, L::Healthy), recorded);
            assert_eq!(step(&mut t, &obs(9, 4, L::Healthy)), None);
        }
        assert!(!Recorded::of(S::Dead.code(), 0, 150, 150).restarted_since);
        // Never heard from: unknown, nothing to announce.
        let mut t = adopt(&obs(0, 0, L::Healthy), of(S::Dead.code(), 150));
        assert_eq!(t, Track::default());
        assert_eq!(step(&mut t, &obs(0, 0, L::Healthy)), None);
    }

    #[test]
    fn threshold_validation() {
        assert!(Thresholds::default().validate().is_ok());
        let bad = Thresholds {
            alive_phi: 9.0,
            ..Thresholds::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("alive_phi < suspect_phi")
        );
        let bad = Thresholds {
            dead_phi: f64::NAN,
            ..Thresholds::default()
        };
        assert!(bad.validate().is_err());
    }
}

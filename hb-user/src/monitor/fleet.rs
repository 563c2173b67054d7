//! Which nodes the monitor watches, and with which keys: provisioning at
//! start (adopting pinned state), reloading on SIGHUP, and `--enroll`.
//!
//! # Start and reload
//!
//! At start the dataplane may already hold nodes (maps pinned by a previous
//! monitor). They keep their slots and state and are adopted silently
//! (`state::adopt`); the node list then decides: listed nodes stay (with
//! keys re-derived from the current keyring), unlisted ones are removed
//! (or kept as enrolled with `--enroll`), missing ones are added.
//!
//! A reload does the same diff against the running table. Keys are
//! replaced in place (`Dataplane::upsert_node` keeps the node's state), so
//! rotating a key is: add epoch N+1 to the keyring, SIGHUP (both epochs are
//! held), move the senders, remove epoch N, SIGHUP. No heartbeat signed
//! with either held epoch is refused in between.
//!
//! # Enrollment (`--enroll`)
//!
//! A datagram from an unprovisioned node id makes the gate send a report
//! (rate-limited in the gate). With `--enroll`, the monitor then provisions
//! that id *on probation* with keys derived from the keyring: from then on
//! the gate verifies its datagrams like any other node's. If an
//! authenticated heartbeat is accepted within the probation
//! ([`PROBATION`]), the node is enrolled for good; otherwise it is removed
//! again. The report does not carry the datagram's tag, so verification is
//! the gate's, on the node's next heartbeat: the first one is lost.
//!
//! The trade-off, to weigh before turning it on:
//! - The node list stops being an allow-list. Node keys are derived from the
//!   master secret for *every* id in the 32-bit space, so whoever holds a
//!   valid node key (one issued for any id, at any time, with a held epoch)
//!   is accepted as that id: a decommissioned host whose key was never
//!   rotated away comes back, and ids nobody planned for can appear (each
//!   needs a key only a master-secret holder can derive, so an outsider
//!   cannot invent one; a leaked node key is the risk, and it then lets its
//!   holder appear only as that one id).
//! - Anyone can make the monitor provision probationary slots by sending
//!   unauthenticated datagrams with made-up ids: this costs one slot and
//!   two key derivations each, bounded by the gate's report rate limit and
//!   by [`MAX_PENDING`] probationary nodes at once; forged datagrams then
//!   fail the tag check (`bad_tag`) and the slot is freed at the end of its
//!   probation. They cannot make a node look alive.
//! - Enrolled nodes survive reloads (they are not in the node list) until
//!   the monitor restarts without `--enroll` or the ids are listed and then
//!   removed. Rotate keys to revoke.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use hb_common::maps::{NodeKeys, REPORT_RESTART, REPORT_UNKNOWN_NODE, Report};

use super::{
    api::Shared, config::NodeSpec, state::Track, table::Origin, tick::Core, userspace::monotonic_ns,
};
use crate::{dataplane::Dataplane, keys::Keyring};

/// How long an enrolling node has to send an authenticated heartbeat.
pub const PROBATION: Duration = Duration::from_secs(30);
/// Probationary nodes at once; reports beyond are refused.
pub const MAX_PENDING: usize = 1024;

/// What a provisioning pass changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub added: usize,
    pub removed: usize,
    pub kept: usize,
    pub adopted: usize,
}

/// The monitor's node list and keys.
pub struct Fleet {
    keyring: Keyring,
    spec: NodeSpec,
    enroll: bool,
    /// Probationary enrollments: node id → deadline (monotonic ns).
    pending: HashMap<u32, u64>,
}

fn keys_at(keyring: &Keyring, node_id: u32, slot: u32) -> NodeKeys {
    let mut k = keyring.node_keys(node_id);
    k.slot = slot;
    k
}

impl Fleet {
    /// Adopts whatever the dataplane already holds, then applies the node
    /// list and keyring.
    pub fn start(
        core: &mut Core,
        dp: &dyn Dataplane,
        keyring: Keyring,
        spec: NodeSpec,
        enroll: bool,
    ) -> anyhow::Result<(Fleet, Summary)> {
        let now = monotonic_ns();
        let mut adopted = 0;
        for (id, keys) in dp.provisioned()? {
            match core
                .table
                .insert_at(id, keys.slot, Origin::Adopted, Track::default(), now)
            {
                Ok(()) => adopted += 1,
                Err(e) => {
                    tracing::warn!(node_id = id, error = %e, "cannot adopt pinned node, removing it");
                    dp.remove_node(id)?;
                }
            }
        }
        core.adopt(dp, now);
        let mut fleet = Fleet {
            keyring,
            spec,
            enroll,
            pending: HashMap::new(),
        };
        let (mut summary, todo) = fleet.plan(core, dp, now, true)?;
        fleet.provide_keys(dp, &todo)?;
        summary.adopted = adopted;
        Ok((fleet, summary))
    }

    /// Replaces the keyring and node list (SIGHUP).
    pub fn reload(
        &mut self,
        core: &mut Core,
        dp: &dyn Dataplane,
        keyring: Keyring,
        spec: NodeSpec,
    ) -> anyhow::Result<Summary> {
        let (s, todo) = self.begin_reload(core, dp, keyring, spec)?;
        self.provide_keys(dp, &todo)?;
        Ok(s)
    }

    /// The first half of a reload, which needs the core: membership (nodes
    /// removed, slots given to new ones). Returns the nodes that need keys
    /// from [`Fleet::provide_keys`], which does not need the core: the
    /// monitor runs it without the core's lock, so re-keying a large fleet
    /// (about 2 µs per node) does not hold the tick off. Slots cannot
    /// change in between: only the fleet (under its own lock) changes
    /// membership. A new node is `unknown` until its keys are in.
    pub fn begin_reload(
        &mut self,
        core: &mut Core,
        dp: &dyn Dataplane,
        keyring: Keyring,
        spec: NodeSpec,
    ) -> anyhow::Result<(Summary, Vec<(u32, u32)>)> {
        let rekey = keyring != self.keyring;
        self.keyring = keyring;
        self.spec = spec;
        self.plan(core, dp, monotonic_ns(), rekey)
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Makes the table hold exactly the listed nodes (plus enrolled ones)
    /// and returns `(node id, slot)` of those that need keys from the
    /// current keyring: new nodes, and every node when `rekey` (the keyring
    /// changed).
    fn plan(
        &mut self,
        core: &mut Core,
        dp: &dyn Dataplane,
        now: u64,
        rekey: bool,
    ) -> anyhow::Result<(Summary, Vec<(u32, u32)>)> {
        let mut s = Summary::default();
        let mut todo = Vec::new();
        let present: Vec<(u32, u32)> = core.table.ids().collect();
        let mut have = HashSet::with_capacity(present.len());
        for (id, slot) in present {
            let listed = self.spec.contains(id);
            let origin = core.table.origin(slot);
            let keep = listed || (self.enroll && origin != Origin::Configured);
            if !keep {
                self.pending.remove(&id);
                remove(core, dp, id)?;
                s.removed += 1;
                continue;
            }
            if listed {
                core.table.set_origin(slot, Origin::Configured);
                self.pending.remove(&id);
            } else if origin == Origin::Adopted {
                core.table.set_origin(slot, Origin::Enrolled);
            }
            if rekey {
                todo.push((id, slot));
            }
            have.insert(id);
            s.kept += 1;
        }
        for id in self.spec.iter() {
            if have.contains(&id) {
                continue;
            }
            let slot = core.table.insert(id, Origin::Configured, now)?;
            todo.push((id, slot));
            s.added += 1;
        }
        Ok((s, todo))
    }

    /// Derives and installs the keys of `todo` (from [`Fleet::begin_reload`]).
    /// Replacing a node's keys keeps its state: that is how keys rotate.
    pub fn provide_keys(&self, dp: &dyn Dataplane, todo: &[(u32, u32)]) -> anyhow::Result<()> {
        for &(id, slot) in todo {
            dp.upsert_node(id, &keys_at(&self.keyring, id, slot))
                .map_err(|e| e.context(format!("cannot install the keys of node {id}")))?;
        }
        Ok(())
    }

    /// Provisions `node_id` on probation (see the module docs). Returns
    /// the outcome for metrics.
    pub fn enroll(&mut self, core: &mut Core, dp: &dyn Dataplane, node_id: u32) -> &'static str {
        if core.table.contains(node_id) {
            return "duplicate";
        }
        if self.pending.len() >= MAX_PENDING {
            return "refused";
        }
        let now = monotonic_ns();
        let slot = match core.table.insert(node_id, Origin::Enrolled, now) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(node_id, error = %e, "cannot enroll");
                return "refused";
            }
        };
        if let Err(e) = dp.upsert_node(node_id, &keys_at(&self.keyring, node_id, slot)) {
            core.table.remove(node_id);
            tracing::warn!(node_id, error = %format!("{e:#}"), "cannot enroll");
            return "refused";
        }
        self.pending
            .insert(node_id, now + PROBATION.as_nanos() as u64);
        "provisioned"
    }

    /// Ends probations: nodes heard from are enrolled, expired ones removed.
    /// Returns (accepted, expired).
    pub fn check_pending(&mut self, core: &mut Core, dp: &dyn Dataplane) -> (Vec<u32>, Vec<u32>) {
        let (mut ok, mut expired) = (Vec::new(), Vec::new());
        if self.pending.is_empty() {
            return (ok, expired);
        }
        let now = monotonic_ns();
        let ids: Vec<(u32, u64)> = self.pending.iter().map(|(a, b)| (*a, *b)).collect();
        for (id, deadline) in ids {
            let Some(slot) = core.table.slot_of(id) else {
                self.pending.remove(&id);
                continue;
            };
            let mut heard = false;
            dp.read_states(slot..slot + 1, &mut |_, st| heard = st.accepted != 0);
            if heard {
                self.pending.remove(&id);
                ok.push(id);
            } else if now >= deadline {
                self.pending.remove(&id);
                if remove(core, dp, id).is_ok() {
                    expired.push(id);
                }
            }
        }
        (ok, expired)
    }
}

fn remove(core: &mut Core, dp: &dyn Dataplane, id: u32) -> anyhow::Result<()> {
    dp.remove_node(id)?;
    if let Some(slot) = core.table.remove(id) {
        core.policy.forget(slot);
    }
    Ok(())
}

/// Logs unknown-node reports at most once per window, with a count.
struct UnknownLog {
    window_start: u64,
    count: u64,
    ids: HashSet<u32>,
    sample: Option<(u32, IpAddr)>,
}

const UNKNOWN_LOG_WINDOW_NS: u64 = 10_000_000_000;

impl UnknownLog {
    fn note(&mut self, r: &Report, now: u64) {
        self.count += 1;
        if self.ids.len() < 10_000 {
            self.ids.insert(r.node_id);
        }
        if self.sample.is_none() {
            self.sample = Some((r.node_id, report_addr(r)));
        }
        self.flush(now, false);
    }

    fn flush(&mut self, now: u64, force: bool) {
        if self.count == 0 {
            self.window_start = now;
            return;
        }
        if !force && now.saturating_sub(self.window_start) < UNKNOWN_LOG_WINDOW_NS {
            return;
        }
        if let Some((id, addr)) = self.sample {
            tracing::warn!(
                reports = self.count,
                node_ids = self.ids.len(),
                example_node_id = id,
                example_source = %addr,
                "heartbeats from unprovisioned node ids (list them in --nodes, or --enroll)"
            );
        }
        self.count = 0;
        self.ids.clear();
        self.sample = None;
        self.window_start = now;
    }
}

fn report_addr(r: &Report) -> IpAddr {
    if r.family == 6 {
        IpAddr::from(r.src_addr)
    } else {
        IpAddr::from([r.src_addr[0], r.src_addr[1], r.src_addr[2], r.src_addr[3]])
    }
}

/// Handles the gate's reports (unknown nodes, restarts) and probations
/// until `shutdown`.
pub async fn reports(
    mut rx: tokio::sync::mpsc::Receiver<Report>,
    shared: Arc<Shared>,
    fleet: Arc<std::sync::Mutex<Fleet>>,
    enroll: bool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut log = UnknownLog {
        window_start: monotonic_ns(),
        count: 0,
        ids: HashSet::new(),
        sample: None,
    };
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = rx.recv() => {
                let Some(r) = r else { break };
                match r.kind {
                    REPORT_UNKNOWN_NODE => {
                        shared.metrics.unknown_report();
                        log.note(&r, monotonic_ns());
                        if enroll {
                            let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
                            let outcome = f.enroll(&mut shared.core(), &*shared.dp, r.node_id);
                            shared.metrics.enrollment(outcome);
                            if outcome == "provisioned" {
                                tracing::info!(node_id = r.node_id, source = %report_addr(&r), "enrolling node on probation");
                            }
                        }
                    }
                    REPORT_RESTART => tracing::debug!(
                        node_id = r.node_id,
                        generation = r.generation,
                        prev_generation = r.prev_generation,
                        "gate saw a restart"
                    ),
                    k => tracing::debug!(kind = k, "unknown report kind"),
                }
            }
            _ = every_second.tick() => {
                log.flush(monotonic_ns(), false);
                if enroll {
                    let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
                    let (ok, expired) = f.check_pending(&mut shared.core(), &*shared.dp);
                    for id in ok {
                        shared.metrics.enrollment("accepted");
                        tracing::info!(node_id = id, "node enrolled: authenticated heartbeat accepted");
                    }
                    for id in expired {
                        shared.metrics.enrollment("expired");
                        tracing::info!(node_id = id, "enrollment expired: no authenticated heartbeat");
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    log.flush(monotonic_ns(), true);
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hb_common::{Datagram, GateResult, Kind, NodeKey};

    use super::*;
    use crate::{
        dataplane::mem::MemDataplane,
        detector::PhiParams,
        keys::{Secret, derive_node_key},
        monitor::{policy::FixedPolicy, state::Thresholds, tick::Detector},
    };

    const SRC: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(198, 18, 0, 2),
        40000,
    ));

    fn keyring(epochs: &[u8]) -> Keyring {
        Keyring::from_secrets("test", epochs.iter().map(|id| (*id, Secret([*id; 32]))))
            .expect("distinct epochs")
    }

    fn core() -> Core {
        Core::new(
            Detector::new(Thresholds::default(), PhiParams::default()),
            Box::new(FixedPolicy::none()),
            1000,
        )
    }

    fn hb(id: u32, epoch: u8, seq: u64) -> [u8; 48] {
        let d = Datagram {
            kind: Kind::Heartbeat,
            node_id: id,
            generation: 1,
            key_epoch: epoch,
            flags: 0,
            load: 0,
            seq,
            sent_ns: 0,
            interval_ms: 100,
            rtt_us: 0,
        };
        d.seal(&NodeKey::from_bytes(&derive_node_key(
            &[epoch; 32],
            id,
            epoch,
        )))
    }

    #[test]
    fn key_rotation_loses_no_heartbeat_and_keeps_state() {
        let dp = MemDataplane::new();
        let mut c = core();
        let (mut f, s) = Fleet::start(
            &mut c,
            &dp,
            keyring(&[1]),
            NodeSpec::parse("1-3").unwrap(),
            false,
        )
        .unwrap();
        assert_eq!(s.added, 3);
        let gate = |p: &[u8; 48], t| dp.gate(p, SRC, t).result;
        assert_eq!(gate(&hb(2, 1, 1), 1), GateResult::Accepted);
        f.reload(
            &mut c,
            &dp,
            keyring(&[1, 2]),
            NodeSpec::parse("1-3").unwrap(),
        )
        .unwrap();
        assert_eq!(
            gate(&hb(2, 1, 2), 2),
            GateResult::Accepted,
            "old epoch still held"
        );
        assert_eq!(
            gate(&hb(2, 2, 3), 3),
            GateResult::Accepted,
            "new epoch held"
        );
        f.reload(&mut c, &dp, keyring(&[2]), NodeSpec::parse("1-3").unwrap())
            .unwrap();
        assert_eq!(
            gate(&hb(2, 1, 4), 4),
            GateResult::BadEpoch,
            "old epoch gone"
        );
        assert_eq!(gate(&hb(2, 2, 5), 5), GateResult::Accepted);
        let slot = c.table.slot_of(2).unwrap();
        let mut acc = 0;
        dp.read_states(slot..slot + 1, &mut |_, st| acc = st.accepted);
        assert_eq!(acc, 4, "state kept across both reloads");
    }

    #[test]
    fn reload_adds_and_removes_and_reuses_slots() {
        let dp = MemDataplane::new();
        let mut c = core();
        let (mut f, _) = Fleet::start(
            &mut c,
            &dp,
            keyring(&[1]),
            NodeSpec::parse("1-3").unwrap(),
            false,
        )
        .unwrap();
        let s = f
            .reload(
                &mut c,
                &dp,
                keyring(&[1]),
                NodeSpec::parse("1,3,7").unwrap(),
            )
            .unwrap();
        assert_eq!((s.added, s.removed, s.kept), (1, 1, 2));
        assert_eq!(c.table.slot_of(7), Some(1), "node 2's slot reused");
        assert_eq!(
            dp.gate(&hb(2, 1, 1), SRC, 1).result,
            GateResult::UnknownNode
        );
        assert_eq!(dp.provisioned().unwrap().len(), 3);
    }

    #[test]
    fn restart_over_pinned_state_adopts_without_loss() {
        let dp = MemDataplane::new();
        let mut c = core();
        let (_f, _) = Fleet::start(
            &mut c,
            &dp,
            keyring(&[1]),
            NodeSpec::parse("1-3").unwrap(),
            false,
        )
        .unwrap();
        dp.gate(&hb(3, 1, 1), SRC, monotonic_ns());
        let slot3 = c.table.slot_of(3).unwrap();
        // A new monitor over the same dataplane, with node 1 delisted.
        let mut c2 = core();
        let (_f, s) = Fleet::start(
            &mut c2,
            &dp,
            keyring(&[1]),
            NodeSpec::parse("2-3").unwrap(),
            false,
        )
        .unwrap();
        assert_eq!((s.adopted, s.removed, s.added), (3, 1, 0));
        assert_eq!(c2.table.slot_of(3), Some(slot3), "same slot");
        assert_eq!(
            c2.table.track(slot3).status,
            crate::monitor::state::Status::Alive
        );
        let mut ev = Vec::new();
        c2.tick(&dp, monotonic_ns(), &mut || "ts".into(), &mut ev);
        assert!(ev.is_empty(), "no false joined: {ev:?}");
    }

    #[test]
    fn enrollment_probation() {
        let dp = MemDataplane::new();
        let mut c = core();
        let (mut f, _) = Fleet::start(
            &mut c,
            &dp,
            keyring(&[1]),
            NodeSpec::parse("1").unwrap(),
            true,
        )
        .unwrap();
        assert_eq!(
            dp.gate(&hb(50, 1, 1), SRC, 1).result,
            GateResult::UnknownNode
        );
        assert_eq!(f.enroll(&mut c, &dp, 50), "provisioned");
        assert_eq!(f.enroll(&mut c, &dp, 50), "duplicate");
        assert_eq!(f.enroll(&mut c, &dp, 51), "provisioned");
        // 51 sends a forgery, 50 a real heartbeat.
        let mut forged = hb(51, 1, 1);
        forged[47] ^= 1;
        assert_eq!(dp.gate(&forged, SRC, 2).result, GateResult::BadTag);
        assert_eq!(dp.gate(&hb(50, 1, 2), SRC, 2).result, GateResult::Accepted);
        let (ok, expired) = f.check_pending(&mut c, &dp);
        assert_eq!((ok, expired), (vec![50], vec![]));
        // Expire 51's probation.
        f.pending.insert(51, 0);
        let (ok, expired) = f.check_pending(&mut c, &dp);
        assert_eq!((ok, expired), (vec![], vec![51]));
        assert!(!c.table.contains(51));
        // Enrolled nodes survive a reload of the list.
        f.reload(&mut c, &dp, keyring(&[1]), NodeSpec::parse("1").unwrap())
            .unwrap();
        assert!(c.table.contains(50));
    }
}

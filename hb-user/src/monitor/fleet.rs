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
//! A node removed (taken off the list, or a probation that expires) is
//! forgotten by the core, which announces it `removed` on the next tick
//! if it was announced at all (`Core::remove_node`): a probation that
//! expires was never heard from, so never `joined`, and goes silently.
//!
//! A reload does the same diff against the running table. Keys are
//! replaced in place (`Dataplane::upsert_node` keeps the node's state), so
//! rotating a key is: add epoch N+1 to the keyring, SIGHUP (both epochs are
//! held), move the senders, remove epoch N, SIGHUP. No heartbeat signed
//! with either held epoch is refused in between.
//!
//! A reload is applied whole or not at all ([`Reload`]). It is worked out
//! and checked against the table first (a node list the dataplane's slots
//! cannot hold is refused before anything changes); if the dataplane then
//! fails part-way, what was applied is undone, and the fleet keeps the
//! keyring and node list it had, so the next SIGHUP retries the reload
//! whole. A half-applied reload left as the fleet's would never be
//! repaired: the next one, finding the same keyring and the new nodes in
//! the table, would install no keys.
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
//!   probation. A probation gives way to a listed node that needs its slot
//!   at a reload, and one pinned when the monitor restarts stays a
//!   probation (from the start). Made-up ids cannot make a node look alive,
//!   but they can use up the gate's report budget (shared by every unknown
//!   id): while such a flood lasts, a real new node may wait long to enroll.
//! - A captured heartbeat is enough to re-enroll its node once it is no
//!   longer held (delisted, or its probation expired) while its key epoch
//!   is held: its fresh slot has an empty replay window. Rotate keys to
//!   revoke; delisting alone does not.
//! - A node enrolls only if its second heartbeat comes within [`PROBATION`]
//!   of its first: senders slower than every 30 s cannot enroll.
//! - Enrolled nodes survive reloads (they are not in the node list) until
//!   the monitor restarts without `--enroll` or the ids are listed and then
//!   removed.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use anyhow::bail;
use hb_common::{
    GateResult,
    maps::{NodeKeys, REPORT_BAD_EPOCH, REPORT_RESTART, REPORT_UNKNOWN_NODE, Report},
};

use super::{
    api::Shared,
    config::NodeSpec,
    state::Track,
    table::{NodeTable, Origin},
    tick::Core,
    userspace::monotonic_ns,
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
    /// The dataplane may hold keys not derived from `keyring`: pinned
    /// nodes at start, or an undone reload that could not put every key
    /// back. The next reload then re-keys every node, even if the keyring
    /// compares equal.
    rekey_all: bool,
}

fn keys_at(keyring: &Keyring, node_id: u32, slot: u32) -> NodeKeys {
    let mut k = keyring.node_keys(node_id);
    k.slot = slot;
    k
}

/// A reload under way: worked out whole against the table before anything
/// changes ([`Fleet::begin_reload`]), then applied step by step; what is
/// done is recorded so that a failure part-way can be undone
/// ([`Fleet::end_reload`]). The fleet keeps its keyring and node list
/// until the reload is complete, so a failed one is retried whole by the
/// next.
pub struct Reload {
    keyring: Keyring,
    spec: NodeSpec,
    /// Whether the nodes that stay need keys from `keyring`.
    rekey: bool,
    /// Nodes that leave: (id, slot, origin), as they were.
    leave: Vec<(u32, u32, Origin)>,
    /// Nodes that stay: (id, slot, the origin they take).
    stay: Vec<(u32, u32, Origin)>,
    /// Listed nodes not in the table.
    join: Vec<u32>,
    /// How many of `leave` are removed.
    removed: usize,
    /// The nodes of `join` given a slot so far, with it.
    joined: Vec<(u32, u32)>,
    /// How many keys [`Reload::install_keys`] tried, in its order (one that
    /// failed may be half in, so it counts).
    keyed: usize,
}

impl Reload {
    fn summary(&self) -> Summary {
        Summary {
            added: self.join.len(),
            removed: self.leave.len(),
            kept: self.stay.len(),
            adopted: 0,
        }
    }

    /// The table's side, which needs the core: nodes that leave are
    /// removed, then nodes that join take slots (maybe the freed ones).
    fn apply_membership(&mut self, core: &mut Core, dp: &dyn Dataplane) -> anyhow::Result<()> {
        for &(id, ..) in &self.leave {
            remove(core, dp, id)?;
            self.removed += 1;
        }
        let now = monotonic_ns();
        for &id in &self.join {
            let slot = core.table.insert(id, Origin::Configured, now)?;
            self.joined.push((id, slot));
        }
        Ok(())
    }

    /// Derives and installs the keys of the new nodes, then of the nodes
    /// that stay if the keyring changed. Replacing a node's keys keeps its
    /// state: that is how keys rotate. Needs no core: the monitor runs it
    /// without the core's lock (see [`Fleet::begin_reload`]).
    pub fn install_keys(&mut self, dp: &dyn Dataplane) -> anyhow::Result<()> {
        let stay = if self.rekey { &self.stay[..] } else { &[] };
        let todo = self
            .joined
            .iter()
            .copied()
            .chain(stay.iter().map(|&(id, slot, _)| (id, slot)));
        for (id, slot) in todo {
            self.keyed += 1;
            dp.upsert_node(id, &keys_at(&self.keyring, id, slot))
                .map_err(|e| e.context(format!("cannot install the keys of node {id}")))?;
        }
        Ok(())
    }

    /// The nodes that stay whose keys `install_keys` tried to replace.
    fn rekeyed(&self) -> &[(u32, u32, Origin)] {
        if !self.rekey {
            return &[];
        }
        &self.stay[..self.keyed.saturating_sub(self.joined.len())]
    }
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
        // Pinned nodes that are not listed and were never heard from were
        // on probation under the previous monitor (probations live in its
        // memory only): they stay on probation, from now, rather than
        // count as enrolled for good.
        let mut on_probation = HashMap::new();
        if enroll {
            for (id, slot) in core.table.ids() {
                if !spec.contains(id) && !heard(dp, slot) {
                    on_probation.insert(id, now + PROBATION.as_nanos() as u64);
                }
            }
        }
        let mut fleet = Fleet {
            keyring: keyring.clone(),
            spec: spec.clone(),
            enroll,
            pending: on_probation,
            // Pinned nodes hold the keys of whatever keyring their monitor
            // had.
            rekey_all: true,
        };
        let mut summary = fleet.reload(core, dp, keyring, spec)?;
        summary.adopted = adopted;
        Ok((fleet, summary))
    }

    /// Replaces the keyring and node list (SIGHUP), whole or not at all
    /// (see [`Fleet::begin_reload`]).
    pub fn reload(
        &mut self,
        core: &mut Core,
        dp: &dyn Dataplane,
        keyring: Keyring,
        spec: NodeSpec,
    ) -> anyhow::Result<Summary> {
        let mut r = self.begin_reload(core, dp, keyring, spec)?;
        let keyed = r.install_keys(dp);
        self.end_reload(core, dp, r, keyed)
    }

    /// The first part of a reload, which needs the core. The reload is
    /// worked out whole and checked against the table as it is: its real
    /// capacity (pinned maps keep theirs, whatever `capacity` says now) and
    /// the enrolled nodes that stay. One that cannot fit is refused before
    /// anything changes. Then membership: nodes removed, slots given to new
    /// ones.
    ///
    /// Keys come next, from [`Reload::install_keys`], which does not need
    /// the core: the monitor runs it without the core's lock, so re-keying
    /// a large fleet (about 2 µs per node) does not hold the tick off.
    /// Slots cannot change in between: only the fleet (under its own lock)
    /// changes membership. A new node is `unknown` until its keys are in.
    /// [`Fleet::end_reload`] then makes the reload the fleet's, or undoes
    /// it if the dataplane failed.
    pub fn begin_reload(
        &mut self,
        core: &mut Core,
        dp: &dyn Dataplane,
        keyring: Keyring,
        spec: NodeSpec,
    ) -> anyhow::Result<Reload> {
        // Probations already passed (a heartbeat accepted since the last
        // check_pending, which runs once a second) count as enrolled.
        let heard: HashSet<u32> = self
            .pending
            .keys()
            .copied()
            .filter(|&id| core.table.slot_of(id).is_some_and(|slot| heard(dp, slot)))
            .collect();
        let mut r = self.plan(&core.table, keyring, spec, &heard)?;
        match r.apply_membership(core, dp) {
            Ok(()) => Ok(r),
            Err(e) => Err(self.undo(core, dp, r, e)),
        }
    }

    /// Completes a reload once its keys are in (`keyed` is what
    /// [`Reload::install_keys`] returned): the fleet takes its keyring and
    /// node list. If they are not, undoes it and returns why it failed.
    pub fn end_reload(
        &mut self,
        core: &mut Core,
        dp: &dyn Dataplane,
        r: Reload,
        keyed: anyhow::Result<()>,
    ) -> anyhow::Result<Summary> {
        match keyed {
            Ok(()) => Ok(self.commit(core, r)),
            Err(e) => Err(self.undo(core, dp, r, e)),
        }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Works out a reload against the table without changing anything:
    /// the table is to hold exactly the listed nodes (plus enrolled ones,
    /// with `--enroll`). Refuses one the table's slots cannot hold.
    fn plan(
        &self,
        table: &NodeTable,
        keyring: Keyring,
        spec: NodeSpec,
        heard: &HashSet<u32>,
    ) -> anyhow::Result<Reload> {
        let mut r = Reload {
            rekey: self.rekey_all || keyring != self.keyring,
            keyring,
            leave: Vec::new(),
            stay: Vec::with_capacity(table.nodes()),
            join: Vec::new(),
            removed: 0,
            joined: Vec::new(),
            keyed: 0,
            spec,
        };
        for (id, slot) in table.ids() {
            let origin = table.origin(slot);
            if r.spec.contains(id) {
                r.stay.push((id, slot, Origin::Configured));
            } else if self.enroll && origin != Origin::Configured {
                let origin = match origin {
                    Origin::Adopted => Origin::Enrolled,
                    o => o,
                };
                r.stay.push((id, slot, origin));
            } else {
                r.leave.push((id, slot, origin));
            }
        }
        r.join = r.spec.iter().filter(|id| !table.contains(*id)).collect();
        // Listed nodes come before probations (anyone can start one by
        // sending a made-up id): as many end as the listed ones need.
        let mut over = (r.stay.len() + r.join.len()).saturating_sub(table.capacity() as usize);
        if over > 0 {
            let mut i = 0;
            while over > 0 && i < r.stay.len() {
                let (id, _, origin) = r.stay[i];
                if origin != Origin::Configured
                    && self.pending.contains_key(&id)
                    && !heard.contains(&id)
                {
                    r.leave.push(r.stay.swap_remove(i));
                    over -= 1;
                } else {
                    i += 1;
                }
            }
        }
        let (needed, capacity) = (r.stay.len() + r.join.len(), table.capacity());
        if needed > capacity as usize {
            let nodes = match needed - r.spec.len() as usize {
                0 => format!("{needed} listed nodes"),
                n => format!("{needed} nodes ({} listed, {n} enrolled)", r.spec.len()),
            };
            bail!(
                "{nodes} do not fit the {capacity} slots of the dataplane (capacity changes only at a restart, and pinned maps keep theirs)"
            );
        }
        Ok(r)
    }

    /// Makes a reload whose keys are all in the fleet's: the origins of the
    /// nodes that stay, probations ended by listing or removal, the keyring
    /// and the node list.
    fn commit(&mut self, core: &mut Core, r: Reload) -> Summary {
        let summary = r.summary();
        for &(id, slot, origin) in &r.stay {
            core.table.set_origin(slot, origin);
            if origin == Origin::Configured {
                self.pending.remove(&id);
            }
        }
        for &(id, ..) in &r.leave {
            self.pending.remove(&id);
        }
        self.keyring = r.keyring;
        self.spec = r.spec;
        self.rekey_all = false;
        summary
    }

    /// Undoes what of `r` was applied when `error` stopped it, and returns
    /// `error`, with what could not be put back as it was. Keys of nodes
    /// that stay get the current keyring's again (their state is kept); new
    /// nodes are removed; removed nodes get their slots and the current
    /// keyring's keys again, but not their state, which removal cleared.
    /// Whatever cannot be put back, the next reload repairs: it works
    /// membership out against the table, which holds what the dataplane
    /// holds, and keys in doubt make it re-key every node.
    fn undo(
        &mut self,
        core: &mut Core,
        dp: &dyn Dataplane,
        r: Reload,
        error: anyhow::Error,
    ) -> anyhow::Error {
        let mut doubt = Vec::new();
        let stuck_keys = self.restore_keys(dp, r.rekeyed());
        if stuck_keys > 0 {
            doubt.push(format!("{stuck_keys} nodes may keep the new keys"));
        }
        // New nodes go first: removed nodes may want their slots back.
        let stuck_new = r
            .joined
            .iter()
            .map(|&(id, _)| remove(core, dp, id))
            .filter(Result::is_err)
            .count();
        if stuck_new > 0 {
            doubt.push(format!("{stuck_new} new nodes stay provisioned"));
        }
        let (back, gone) = self.put_back(core, dp, &r.leave[..r.removed]);
        if gone > 0 {
            doubt.push(format!("{gone} removed nodes could not be put back"));
        }
        let mut lost = Vec::new();
        if back > 0 {
            lost.push(format!(
                "{back} removed nodes are back with their state reset (unknown until their next heartbeat)"
            ));
        }
        if !doubt.is_empty() {
            self.rekey_all = true;
            lost.push(format!(
                "{}; the next reload repairs this",
                doubt.join(", ")
            ));
        }
        if lost.is_empty() {
            return error;
        }
        anyhow::anyhow!("{error:#} (undone, but {})", lost.join("; "))
    }

    /// Installs the current keyring's keys of `nodes` again. Returns how
    /// many the dataplane refused.
    fn restore_keys(&self, dp: &dyn Dataplane, nodes: &[(u32, u32, Origin)]) -> usize {
        let restore = |&(id, slot, _): &(u32, u32, Origin)| {
            dp.upsert_node(id, &keys_at(&self.keyring, id, slot))
        };
        nodes.iter().map(restore).filter(Result::is_err).count()
    }

    /// Provisions nodes a failed reload removed again with the current
    /// keyring's keys, as `unknown`: at their old slots, or at free ones if
    /// a new node that could not be removed holds it (removal cleared
    /// their state, so the slot makes no difference). Returns how many are
    /// back and how many are not (then in neither the table nor the
    /// dataplane).
    fn put_back(
        &self,
        core: &mut Core,
        dp: &dyn Dataplane,
        nodes: &[(u32, u32, Origin)],
    ) -> (usize, usize) {
        let now = monotonic_ns();
        let mut back = 0;
        for &(id, old, origin) in nodes {
            let t = &mut core.table;
            let slot = match t.insert_at(id, old, origin, Track::default(), now) {
                Ok(()) => old,
                Err(_) => match t.insert(id, origin, now) {
                    Ok(slot) => slot,
                    Err(_) => continue,
                },
            };
            if dp
                .upsert_node(id, &keys_at(&self.keyring, id, slot))
                .is_err()
            {
                t.remove(id);
                continue;
            }
            back += 1;
        }
        (back, nodes.len() - back)
    }

    /// Provisions `node_id` on probation (see the module docs). Returns
    /// the outcome for metrics.
    pub fn enroll(&mut self, core: &mut Core, dp: &dyn Dataplane, node_id: u32) -> &'static str {
        if core.table.contains(node_id) {
            return "duplicate";
        }
        if node_id == 0 || self.pending.len() >= MAX_PENDING {
            return "refused";
        }
        let now = monotonic_ns();
        // A full table refuses every report alike (counted, not logged one
        // by one: reports come at the gate's rate, and anyone can send
        // them).
        let Ok(slot) = core.table.insert(node_id, Origin::Enrolled, now) else {
            return "refused";
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
            if heard(dp, slot) {
                self.pending.remove(&id);
                ok.push(id);
            } else if now >= deadline {
                // Kept on probation if it cannot be removed now: retried
                // on the next check, never left enrolled.
                if remove(core, dp, id).is_ok() {
                    self.pending.remove(&id);
                    expired.push(id);
                }
            }
        }
        (ok, expired)
    }
}

/// Whether the gate accepted a datagram of the node at `slot` (what ends
/// a probation).
fn heard(dp: &dyn Dataplane, slot: u32) -> bool {
    let mut heard = false;
    dp.read_states(slot..slot + 1, &mut |_, st| heard = st.accepted != 0);
    heard
}

/// Removes node `id` from the dataplane, then from the core, which
/// announces it `removed` if it was announced at all
/// ([`Core::remove_node`]): with its state as it was, read first.
fn remove(core: &mut Core, dp: &dyn Dataplane, id: u32) -> anyhow::Result<()> {
    let mut before = None;
    if let Some(slot) = core.table.slot_of(id) {
        dp.read_states(slot..slot + 1, &mut |_, st| before = Some(*st));
    }
    dp.remove_node(id)?;
    core.remove_node(id, before.as_ref(), monotonic_ns());
    Ok(())
}

/// Logs unknown-node reports at most once per window, with a count.
struct UnknownLog {
    window_start: u64,
    count: u64,
    /// Each id's reports and the source of its latest (at most 10,000
    /// ids): whichever id is the example, its address is at hand.
    ids: HashMap<u32, Unknown>,
    /// The window's first id, the example unless provisioned since.
    sample: Option<u32>,
    /// `--enroll`: unknown ids are enrolled, not a mistake in `--nodes`.
    enroll: bool,
}

/// What [`UnknownLog`] keeps of one unknown id.
struct Unknown {
    reports: u64,
    source: IpAddr,
}

const UNKNOWN_LOG_WINDOW_NS: u64 = 10_000_000_000;

impl UnknownLog {
    fn note(
        &mut self,
        r: &Report,
        now: u64,
        forget_provisioned: impl FnOnce(&mut HashMap<u32, Unknown>),
    ) {
        self.count += 1;
        let source = report_addr(r);
        if let Some(known) = self.ids.get_mut(&r.node_id) {
            known.reports += 1;
            known.source = source;
        } else if self.ids.len() < 10_000 {
            self.ids.insert(r.node_id, Unknown { reports: 1, source });
        }
        if self.sample.is_none() {
            self.sample = Some(r.node_id);
        }
        self.flush(now, false, forget_provisioned);
    }

    /// Logs the window's summary once it is over (or at once with
    /// `force`). Ids provisioned since their reports (a reload listed
    /// them, or they were enrolled) are no longer news: left out, and
    /// nothing is logged if none is left.
    fn flush(
        &mut self,
        now: u64,
        force: bool,
        forget_provisioned: impl FnOnce(&mut HashMap<u32, Unknown>),
    ) {
        if self.count == 0 {
            self.window_start = now;
            return;
        }
        if !force && now.saturating_sub(self.window_start) < UNKNOWN_LOG_WINDOW_NS {
            return;
        }
        let sum = |ids: &HashMap<u32, Unknown>| ids.values().map(|u| u.reports).sum::<u64>();
        let listed = sum(&self.ids);
        forget_provisioned(&mut self.ids);
        // The reports of ids provisioned since are no news either.
        let reports = self.count - (listed - sum(&self.ids));
        // The first id heard, or if provisioned since another still
        // unknown: with the source it was heard from, whichever.
        let sample = self
            .sample
            .and_then(|id| self.ids.get_key_value(&id))
            .or_else(|| self.ids.iter().next());
        if let Some((&id, unknown)) = sample {
            let addr = unknown.source.to_string();
            if self.enroll {
                tracing::warn!(
                    reports,
                    node_ids = self.ids.len(),
                    example_node_id = id,
                    example_source = addr,
                    "heartbeats from node ids still not provisioned (--enroll: never enrolled, \
                     their heartbeats not authenticated with the keyring's keys; see \
                     hb_enrollments_total)"
                );
            } else {
                tracing::warn!(
                    reports,
                    node_ids = self.ids.len(),
                    example_node_id = id,
                    example_source = addr,
                    "heartbeats from unprovisioned node ids (list them in --nodes, or --enroll)"
                );
            }
        }
        self.count = 0;
        self.ids.clear();
        self.sample = None;
        self.window_start = now;
    }
}

/// Heartbeats of provisioned nodes that failed authentication (the gate's
/// `bad_tag` and `bad_epoch`), summarized like the unknown nodes: a sender
/// given the wrong key, or a `--key-epoch` the keyring does not hold, is
/// otherwise silent on both sides (the node just never joins). The lines
/// name the nodes whose own counts moved (a few, the most affected first),
/// so that the operator need not search `/nodes` for them; a node has no
/// bad_epoch count of its own, so those are named from the gate's
/// (rate-limited) reports of them, with the epoch they used.
struct AuthLog {
    window_start: u64,
    /// The counters at the window's start: bad_tag, bad_epoch, stale.
    last: Option<[u64; 3]>,
    /// Each node's own bad_tag and stale when last read, for the nodes
    /// with any (most have none: nothing kept for them).
    per_node: HashMap<u32, [u32; 2]>,
    /// The bad_epoch reports of this window: node id, and its reports and
    /// the key epoch of the latest (at most [`AUTH_REPORTED_MAX`] nodes).
    bad_epochs: HashMap<u32, (u64, u8)>,
}

/// Nodes named in an authentication summary, at most.
const AUTH_EXAMPLES: usize = 5;
/// Nodes whose bad_epoch reports a window keeps, at most (the gate's rate
/// limit sends far fewer on a small machine; past this, the line's
/// `bad_epoch_nodes` is a lower bound).
const AUTH_REPORTED_MAX: usize = 4096;

impl AuthLog {
    fn new() -> AuthLog {
        AuthLog {
            window_start: 0,
            last: None,
            per_node: HashMap::new(),
            bad_epochs: HashMap::new(),
        }
    }

    /// A bad_epoch report of the gate: `node_id` used `key_epoch`.
    fn note_bad_epoch(&mut self, node_id: u32, key_epoch: u8) {
        let n = self.bad_epochs.len();
        match self.bad_epochs.entry(node_id) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let (count, epoch) = e.get_mut();
                *count += 1;
                *epoch = key_epoch;
            }
            std::collections::hash_map::Entry::Vacant(e) if n < AUTH_REPORTED_MAX => {
                e.insert((1, key_epoch));
            }
            std::collections::hash_map::Entry::Vacant(_) => {}
        }
    }

    /// Every window, the counters read (`None`: unreadable), read only
    /// then; and each node's own bad_tag and stale (`nodes`: node id, and
    /// the two), read at the first window and then only when the counters
    /// moved.
    fn check(
        &mut self,
        now: u64,
        counters: impl FnOnce() -> Option<[u64; 3]>,
        nodes: impl FnOnce() -> Vec<(u32, [u32; 2])>,
    ) {
        if now.saturating_sub(self.window_start) < UNKNOWN_LOG_WINDOW_NS {
            return;
        }
        self.window_start = now;
        let reported = std::mem::take(&mut self.bad_epochs);
        let Some(c) = counters() else { return };
        let Some(last) = self.last.replace(c) else {
            self.per_node = nonzero(nodes());
            return;
        };
        let [bad_tag, bad_epoch, stale] = [0, 1, 2].map(|i| c[i].saturating_sub(last[i]));
        // Reports in a window whose counters did not move are of
        // heartbeats counted before the last read (a report reaches the
        // monitor after the count): the warning that gave their count went
        // out without them, and they are named now, or never.
        let counted = bad_tag + bad_epoch + stale > 0;
        if !counted && reported.is_empty() {
            return;
        }
        let ((tag_nodes, tag_examples), (stale_nodes, stale_examples)) = if counted {
            let now_per_node = nonzero(nodes());
            let moved = |i: usize| {
                let v: Vec<(u32, u32)> = now_per_node
                    .iter()
                    .filter_map(|(&id, n)| {
                        let was = self.per_node.get(&id).map_or(0, |b| b[i]);
                        // A count below the last read: the node was removed
                        // and provisioned again, its count started over.
                        let d = if n[i] >= was { n[i] - was } else { n[i] };
                        (d > 0).then_some((id, d))
                    })
                    .collect();
                examples(v, |&d| d.into(), |id, d| format!("{id} ({d})"))
            };
            let found = (moved(0), moved(1));
            self.per_node = now_per_node;
            found
        } else {
            ((0, String::new()), (0, String::new()))
        };
        if bad_tag + bad_epoch > 0 || !reported.is_empty() {
            let (epoch_nodes, epoch_examples) = examples(
                reported.into_iter().collect(),
                |&(n, _)| n,
                |id, (n, epoch)| format!("{id} at epoch {epoch} ({n})"),
            );
            tracing::warn!(
                bad_tag,
                bad_epoch,
                bad_tag_nodes = tag_nodes,
                bad_tag_examples = tag_examples,
                bad_epoch_nodes = epoch_nodes,
                bad_epoch_examples = epoch_examples,
                window_s = UNKNOWN_LOG_WINDOW_NS / 1_000_000_000,
                "heartbeats of provisioned node ids failed authentication: bad_tag, a key \
                 other than the node's (hb send --key-file) or a forgery (the nodes whose \
                 count moved most are named with it; each node's count is its bad_tag in \
                 /nodes); bad_epoch, a key epoch the keyring does not hold (hb send \
                 --key-epoch; the nodes and the epochs they used are named from the \
                 gate's rate-limited reports), or a node left held by a monitor killed \
                 while writing it (hb_dataplane_stuck_reads_total; released at the next \
                 start)"
            );
        }
        if stale > 0 {
            // Authenticated, so the node's own key: its sender, or
            // another with its id and key. Said nowhere else, and
            // the node's state then flaps (`restarted`, `left` while
            // one of them still runs).
            tracing::warn!(
                stale,
                stale_nodes,
                stale_examples,
                window_s = UNKNOWN_LOG_WINDOW_NS / 1_000_000_000,
                "heartbeats of provisioned nodes dropped as stale (of a generation older than \
                 the node's latest; each node's count is its stale in /nodes): two senders \
                 with one node id (a cloned host, a manual run beside the unit), a sender \
                 without --state-dir whose clock was stepped back, one whose state \
                 directory was reset after its generation ran ahead of the clock, or a \
                 leaked key's forgery far ahead (rotate the key out: README, Rotating keys)"
            );
        }
    }
}

/// How many nodes `v` holds, and the [`AUTH_EXAMPLES`] with the largest
/// `count` (then the lowest ids) as `show` spells them, comma-separated.
fn examples<T>(
    mut v: Vec<(u32, T)>,
    count: impl Fn(&T) -> u64,
    show: impl Fn(u32, &T) -> String,
) -> (usize, String) {
    v.sort_unstable_by(|a, b| count(&b.1).cmp(&count(&a.1)).then(a.0.cmp(&b.0)));
    let shown = v
        .iter()
        .take(AUTH_EXAMPLES)
        .map(|(id, t)| show(*id, t))
        .collect::<Vec<_>>()
        .join(", ");
    (v.len(), shown)
}

/// The nodes with a bad_tag or stale count.
fn nonzero(nodes: Vec<(u32, [u32; 2])>) -> HashMap<u32, [u32; 2]> {
    nodes.into_iter().filter(|(_, n)| *n != [0, 0]).collect()
}

/// Each provisioned node's bad_tag and stale: a scan of the node map,
/// `chunk` slots per hold of the core's lock (a node moved between chunks
/// may be missed or read twice: for a log line).
fn auth_failures_by_node(
    core: &std::sync::Mutex<Core>,
    dp: &dyn Dataplane,
    chunk: u32,
) -> Vec<(u32, [u32; 2])> {
    let mut out = Vec::new();
    let mut start = 0u32;
    loop {
        let core = core.lock().unwrap_or_else(|e| e.into_inner());
        let ids = &core.table.node_id;
        let end = (ids.len() as u64).min(start as u64 + chunk.max(1) as u64) as u32;
        if start >= end {
            return out;
        }
        dp.read_states(start..end, &mut |slot, st| {
            if let Some(&id) = ids.get(slot as usize)
                && id != 0
                && (st.bad_tag, st.stale) != (0, 0)
            {
                out.push((id, [st.bad_tag, st.stale]));
            }
        });
        drop(core);
        start = end;
    }
}

fn report_addr(r: &Report) -> IpAddr {
    if r.family == 6 {
        IpAddr::from(r.src_addr)
    } else {
        IpAddr::from([r.src_addr[0], r.src_addr[1], r.src_addr[2], r.src_addr[3]])
    }
}

/// Handles the gate's reports (unknown nodes, restarts, bad epochs) and
/// probations until `shutdown`.
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
        ids: HashMap::new(),
        sample: None,
        enroll,
    };
    let mut auth = AuthLog::new();
    // One hold of the core's lock per summary, whatever its ids.
    let provisioned = |ids: &mut HashMap<u32, Unknown>| {
        let core = shared.core();
        ids.retain(|&id, _| core.table.slot_of(id).is_none());
    };
    let auth_counters = || {
        shared.dp.counters().ok().map(|c| {
            [GateResult::BadTag, GateResult::BadEpoch, GateResult::Stale]
                .map(|r| c[r.index() as usize])
        })
    };
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = rx.recv() => {
                let Some(r) = r else { break };
                match r.kind {
                    REPORT_UNKNOWN_NODE => {
                        shared.metrics.unknown_report();
                        log.note(&r, monotonic_ns(), provisioned);
                        if enroll {
                            let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
                            let outcome = f.enroll(&mut shared.core(), &*shared.dp, r.node_id);
                            shared.metrics.enrollment(outcome);
                            if outcome == "provisioned" {
                                // Debug: anyone can cause these (at the
                                // gate's report rate); the unknown-node
                                // summary and the metrics count them.
                                tracing::debug!(node_id = r.node_id, source = %report_addr(&r), "enrolling node on probation");
                            }
                        }
                    }
                    REPORT_BAD_EPOCH => auth.note_bad_epoch(r.node_id, r.key_epoch),
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
                let now = monotonic_ns();
                log.flush(now, false, provisioned);
                auth.check(now, auth_counters, || {
                    auth_failures_by_node(&shared.core, &*shared.dp, 16_384)
                });
                if enroll {
                    let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
                    let (ok, expired) = f.check_pending(&mut shared.core(), &*shared.dp);
                    for id in ok {
                        shared.metrics.enrollment("accepted");
                        tracing::info!(node_id = id, "node enrolled: authenticated heartbeat accepted");
                    }
                    for id in expired {
                        shared.metrics.enrollment("expired");
                        tracing::debug!(node_id = id, "enrollment expired: no authenticated heartbeat");
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    log.flush(monotonic_ns(), true, provisioned);
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        ops::Range,
        sync::{
            Mutex,
            atomic::{AtomicU32, Ordering},
        },
    };

    use hb_common::{
        Datagram, GateResult, Kind, NodeKey,
        maps::{Config, NodeState},
    };

    use super::*;
    use crate::{
        dataplane::{Counters, LiveFn, mem::MemDataplane},
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

    fn spec(s: &str) -> NodeSpec {
        NodeSpec::parse(s).unwrap()
    }

    fn accepted(dp: &dyn Dataplane, c: &Core, id: u32) -> u64 {
        let slot = c.table.slot_of(id).unwrap();
        let mut acc = 0;
        dp.read_states(slot..slot + 1, &mut |_, st| acc = st.accepted);
        acc
    }

    /// The in-memory gate, made to fail: one `upsert_node` after a number
    /// of them, and `remove_node` of one node.
    #[derive(Default)]
    struct Flaky {
        mem: MemDataplane,
        /// Upserts let through before one fails (`None`: all are).
        fail_after: Mutex<Option<usize>>,
        /// The node `remove_node` fails for (0: none).
        stuck: AtomicU32,
    }

    impl Flaky {
        fn fail_upsert_after(&self, n: usize) {
            *self.fail_after.lock().unwrap() = Some(n);
        }
    }

    impl Dataplane for Flaky {
        fn upsert_node(&self, node_id: u32, keys: &NodeKeys) -> anyhow::Result<()> {
            let mut f = self.fail_after.lock().unwrap();
            match *f {
                Some(0) => {
                    *f = None;
                    bail!("injected failure");
                }
                Some(n) => *f = Some(n - 1),
                None => {}
            }
            self.mem.upsert_node(node_id, keys)
        }
        fn remove_node(&self, node_id: u32) -> anyhow::Result<()> {
            if node_id == self.stuck.load(Ordering::Relaxed) {
                bail!("injected failure");
            }
            self.mem.remove_node(node_id)
        }
        fn provisioned(&self) -> anyhow::Result<Vec<(u32, NodeKeys)>> {
            self.mem.provisioned()
        }
        fn read_states(&self, slots: Range<u32>, f: &mut dyn FnMut(u32, &NodeState)) {
            self.mem.read_states(slots, f)
        }
        fn read_live(&self, slots: Range<u32>, f: &mut LiveFn) {
            self.mem.read_live(slots, f)
        }
        fn set_requested_interval(&self, slot: u32, interval_ms: u32) {
            self.mem.set_requested_interval(slot, interval_ms)
        }
        fn set_monitor_status(&self, slot: u32, status: u32, since_ns: u64) {
            self.mem.set_monitor_status(slot, status, since_ns)
        }
        fn counters(&self) -> anyhow::Result<Counters> {
            self.mem.counters()
        }
        fn set_config(&self, cfg: &Config) -> anyhow::Result<()> {
            self.mem.set_config(cfg)
        }
        fn take_reports(&mut self) -> Option<tokio::sync::mpsc::Receiver<Report>> {
            self.mem.take_reports()
        }
    }

    /// After a failed reload of nodes 1-3 (epoch 1) to 1-2,4-5 (epochs 1
    /// and 2): nodes 1-3 at their `slots`, with epoch 1's keys only, and
    /// nodes 4 and 5 nowhere. `gate(id, epoch)` sends a fresh heartbeat.
    fn assert_as_before(
        c: &Core,
        dp: &dyn Dataplane,
        slots: &[Option<u32>],
        gate: impl Fn(u32, u8) -> GateResult,
    ) {
        let now: Vec<_> = (1..=3).map(|id| c.table.slot_of(id)).collect();
        assert_eq!(now, slots, "same nodes at the same slots");
        assert!(!c.table.contains(4) && !c.table.contains(5));
        assert_eq!(dp.provisioned().unwrap().len(), 3);
        for id in 1..=3 {
            assert_eq!(
                gate(id, 1),
                GateResult::Accepted,
                "node {id} keeps its keys"
            );
            assert_eq!(gate(id, 2), GateResult::BadEpoch, "node {id}: no new epoch");
        }
    }

    fn unknown_report(node_id: u32) -> Report {
        Report {
            kind: REPORT_UNKNOWN_NODE,
            node_id,
            family: 4,
            src_addr: [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Report::default()
        }
    }

    /// The unknown-node summary names no id provisioned since its report
    /// (a reload, an enrolment), and says nothing if none is left; with
    /// --enroll it does not advise --enroll.
    #[test]
    fn the_unknown_node_summary_names_only_ids_still_unknown() {
        let warnings = crate::test_log::Warnings::of("hb::monitor::fleet");
        let _log = warnings.capture();
        const S: u64 = 1_000_000_000;
        for enroll in [false, true] {
            let mut log = UnknownLog {
                window_start: 0,
                count: 0,
                ids: HashMap::new(),
                sample: None,
                enroll,
            };
            log.note(&unknown_report(6), S, |_| {});
            log.note(&unknown_report(7), 2 * S, |_| {});
            // Node 6 was provisioned meanwhile: 7 is the example.
            log.flush(11 * S, false, |ids| {
                ids.remove(&6);
            });
            // All of them were: nothing to say.
            log.note(&unknown_report(8), 12 * S, |_| {});
            log.flush(22 * S, false, |ids| ids.clear());
        }
        let lines = warnings.taken();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        for (line, enroll) in lines.iter().zip([false, true]) {
            assert_eq!(line.field("example_node_id"), Some("7"), "{line:?}");
            assert_eq!(line.field("node_ids"), Some("1"), "{line:?}");
            assert_eq!(
                line.field("reports"),
                Some("1"),
                "node 6's left out: {line:?}"
            );
            assert_eq!(line.message.contains("or --enroll"), !enroll, "{line:?}");
        }
    }

    /// Whichever id the unknown-node summary names, it names the address
    /// that id was heard from: also when the first id heard (the usual
    /// example) was provisioned since and another stands in for it.
    #[test]
    fn the_unknown_node_example_keeps_its_source() {
        let warnings = crate::test_log::Warnings::of("hb::monitor::fleet");
        let _log = warnings.capture();
        const S: u64 = 1_000_000_000;
        let mut log = UnknownLog {
            window_start: 0,
            count: 0,
            ids: HashMap::new(),
            sample: None,
            enroll: false,
        };
        let from = |id, last: u8| Report {
            src_addr: [198, 18, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..unknown_report(id)
        };
        let v6 = Report {
            family: 6,
            src_addr: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            ..unknown_report(9)
        };
        log.note(&from(6, 6), S, |_| {});
        log.note(&from(7, 7), 2 * S, |_| {});
        log.note(&from(7, 8), 3 * S, |_| {}); // 7 moved: its latest source
        // Node 6, the first heard, was provisioned meanwhile.
        log.flush(11 * S, false, |ids| {
            ids.remove(&6);
        });
        // The first id heard is the example while still unknown.
        log.note(&v6, 12 * S, |_| {});
        log.note(&from(7, 7), 13 * S, |_| {});
        log.flush(22 * S, false, |_| {});
        let lines = warnings.taken();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert_eq!(lines[0].field("example_node_id"), Some("7"), "{lines:?}");
        assert_eq!(
            lines[0].field("example_source"),
            Some(r#""198.18.0.8""#),
            "{lines:?}"
        );
        assert_eq!(lines[0].field("reports"), Some("2"), "{lines:?}");
        assert_eq!(lines[1].field("example_node_id"), Some("9"), "{lines:?}");
        assert_eq!(
            lines[1].field("example_source"),
            Some(r#""fd00::9""#),
            "{lines:?}"
        );
        assert_eq!(lines[1].field("node_ids"), Some("2"), "{lines:?}");
    }

    /// Heartbeats failing authentication are summarized once a window,
    /// only when the counters moved, naming the nodes whose counts moved.
    #[test]
    fn authentication_failures_are_summarized_per_window() {
        let warnings = crate::test_log::Warnings::of("hb::monitor::fleet");
        let _log = warnings.capture();
        const S: u64 = 1_000_000_000;
        let mut auth = AuthLog::new();
        let unread = || -> Vec<(u32, [u32; 2])> { unreachable!("nothing moved: not read") };
        // The baseline: node 3 had 5 bad tags and 7 stale before.
        auth.check(10 * S, || Some([5, 1, 7]), || vec![(3, [5, 7])]);
        auth.check(
            15 * S,
            || unreachable!("within the window: not read"),
            unread,
        );
        // A report in a window whose counters did not move: of a
        // heartbeat counted before the last read (the baseline's here;
        // the report comes after the count), named at once, with this
        // window's counts (none). It is not carried into a later window.
        auth.note_bad_epoch(30, 9);
        auth.check(20 * S, || Some([5, 1, 7]), unread);
        let late = warnings.taken();
        assert_eq!(late.len(), 1, "{late:#?}");
        assert_eq!(late[0].field("bad_epoch"), Some("0"));
        assert_eq!(late[0].field("bad_epoch_nodes"), Some("1"));
        assert_eq!(
            late[0].field("bad_epoch_examples"),
            Some(r#""30 at epoch 9 (1)""#)
        );
        assert_eq!(late[0].field("bad_tag_nodes"), Some("0"));
        auth.check(30 * S, || None, unread); // unreadable
        // 21 more bad tags: 2 of node 3, 12 of node 9, 7 of node 4; 6 of
        // nodes 10 to 15, one each (past the examples). 3 more bad
        // epochs: node 21 at epoch 1 then 2, node 22 at epoch 5.
        let mut nodes = vec![(3, [7, 7]), (9, [12, 0]), (4, [7, 0]), (8, [0, 0])];
        nodes.extend((10..16).map(|id| (id, [1, 0])));
        auth.note_bad_epoch(22, 5);
        auth.note_bad_epoch(21, 1);
        auth.note_bad_epoch(21, 2);
        auth.check(40 * S, || Some([26, 4, 7]), || nodes.clone());
        let lines = warnings.taken()[1..].to_vec();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(lines[0].field("bad_tag"), Some("21"));
        assert_eq!(lines[0].field("bad_epoch"), Some("3"));
        assert_eq!(lines[0].field("bad_tag_nodes"), Some("9"));
        assert_eq!(
            lines[0].field("bad_tag_examples"),
            Some(r#""9 (12), 4 (7), 3 (2), 10 (1), 11 (1)""#)
        );
        assert_eq!(lines[0].field("bad_epoch_nodes"), Some("2"));
        assert_eq!(
            lines[0].field("bad_epoch_examples"),
            Some(r#""21 at epoch 2 (2), 22 at epoch 5 (1)""#)
        );
        // Stale heartbeats, a line of their own (authenticated: another
        // cause), of node 3 only; node 9 was removed and provisioned
        // again since (its count started over: 2 is new).
        nodes[0].1 = [7, 19];
        nodes[1].1 = [2, 0];
        auth.check(50 * S, || Some([28, 4, 19]), || nodes.clone());
        let lines = warnings.taken()[1..].to_vec();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert_eq!(lines[1].field("bad_tag_examples"), Some(r#""9 (2)""#));
        assert_eq!(lines[1].field("bad_epoch_nodes"), Some("0"));
        assert_eq!(lines[2].field("stale"), Some("12"));
        assert_eq!(lines[2].field("stale_nodes"), Some("1"));
        assert_eq!(lines[2].field("stale_examples"), Some(r#""3 (12)""#));
        assert_eq!(lines[2].field("bad_tag"), None);
        assert!(lines[2].message.contains("two senders with one node id"));
    }

    /// A bad-epoch report that reaches the monitor just after the window
    /// closed on its count (the warning named nobody) is named in the
    /// next window, though nothing else moved: it was dropped there, and
    /// the node never named.
    #[test]
    fn a_bad_epoch_report_after_its_window_closed_is_named_in_the_next() {
        let warnings = crate::test_log::Warnings::of("hb::monitor::fleet");
        let _log = warnings.capture();
        const S: u64 = 1_000_000_000;
        let mut auth = AuthLog::new();
        auth.check(10 * S, || Some([0, 0, 0]), Vec::new);
        // Node 21's heartbeat is counted, its report not in yet.
        auth.check(20 * S, || Some([0, 1, 0]), Vec::new);
        auth.note_bad_epoch(21, 1);
        let unread = || -> Vec<(u32, [u32; 2])> { unreachable!("nothing counted: not read") };
        auth.check(30 * S, || Some([0, 1, 0]), unread);
        let lines = warnings.taken();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert_eq!(lines[0].field("bad_epoch"), Some("1"));
        assert_eq!(lines[0].field("bad_epoch_nodes"), Some("0"));
        assert_eq!(lines[1].field("bad_epoch"), Some("0"));
        assert_eq!(
            lines[1].field("bad_epoch_examples"),
            Some(r#""21 at epoch 1 (1)""#)
        );
        // Named once.
        auth.check(40 * S, || Some([0, 1, 0]), unread);
        assert_eq!(warnings.taken().len(), 2);
    }

    /// A flood of bad-epoch reports of ever new node ids keeps a bounded
    /// number of them.
    #[test]
    fn bad_epoch_reports_are_kept_for_a_bounded_number_of_nodes() {
        let mut auth = AuthLog::new();
        for id in 1..=(AUTH_REPORTED_MAX as u32 + 100) {
            auth.note_bad_epoch(id, 1);
        }
        auth.note_bad_epoch(1, 3);
        assert_eq!(auth.bad_epochs.len(), AUTH_REPORTED_MAX);
        assert_eq!(auth.bad_epochs[&1], (2, 3));
    }

    /// The scan behind those names reads every provisioned node, chunk
    /// after chunk, and names the nodes by id.
    #[test]
    fn the_authentication_scan_reads_every_node_by_id() {
        let dp = MemDataplane::new();
        let mut c = core();
        let (_f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("5-8"), false).unwrap();
        let forged = |id, seq| {
            let mut b = hb(id, 1, seq);
            b[47] ^= 1;
            assert_eq!(dp.gate(&b, SRC, seq).result, GateResult::BadTag);
        };
        forged(5, 1);
        forged(8, 1);
        forged(8, 2);
        assert_eq!(dp.gate(&hb(6, 1, 1), SRC, 3).result, GateResult::Accepted);
        let core = std::sync::Mutex::new(c);
        for chunk in [1, 3, 16_384] {
            let mut v = auth_failures_by_node(&core, &dp, chunk);
            v.sort_unstable();
            assert_eq!(v, vec![(5, [1, 0]), (8, [2, 0])], "chunk {chunk}");
        }
    }

    #[test]
    fn a_reload_that_does_not_fit_changes_nothing_and_a_retry_applies_it() {
        let dp = MemDataplane::new();
        let mut c = core();
        // Pinned maps of 3 slots, whatever `capacity` says now.
        c.table.set_capacity(3);
        let (mut f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1-3"), false).unwrap();
        let seq = std::cell::Cell::new(0);
        let gate = |id, epoch| {
            seq.set(seq.get() + 1);
            dp.gate(&hb(id, epoch, seq.get()), SRC, seq.get()).result
        };
        for id in 1..=3 {
            assert_eq!(gate(id, 1), GateResult::Accepted);
        }
        let slots: Vec<_> = (1..=3).map(|id| c.table.slot_of(id)).collect();

        // Node 3 out, nodes 4 and 5 in: one slot short. A new epoch too.
        let e = f
            .reload(&mut c, &dp, keyring(&[1, 2]), spec("1-2,4-5"))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("4 listed nodes do not fit the 3 slots"),
            "{e:#}"
        );
        assert_as_before(&c, &dp, &slots, gate);
        for id in 1..=3 {
            assert_eq!(accepted(&dp, &c, id), 2, "node {id} keeps its state");
        }
        assert_eq!(gate(4, 1), GateResult::UnknownNode);
        assert_eq!(f.keyring(), &keyring(&[1]));

        // The list fixed, the same keyring as the refused reload's.
        let s = f
            .reload(&mut c, &dp, keyring(&[1, 2]), spec("1-2,4"))
            .unwrap();
        assert_eq!((s.added, s.removed, s.kept), (1, 1, 2));
        for id in [1, 2, 4] {
            assert_eq!(gate(id, 2), GateResult::Accepted, "node {id}");
        }
        assert_eq!(gate(3, 1), GateResult::UnknownNode);
        assert_eq!(accepted(&dp, &c, 1), 3, "state kept");
    }

    #[test]
    fn enrolled_nodes_count_against_the_slots_and_probations_give_way() {
        // A probation (anyone can start one with a made-up id) ends to
        // make room for a listed node; it used to refuse the reload.
        let dp = MemDataplane::new();
        let mut c = core();
        c.table.set_capacity(3);
        let (mut f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1-2"), true).unwrap();
        assert_eq!(f.enroll(&mut c, &dp, 50), "provisioned");
        let s = f.reload(&mut c, &dp, keyring(&[1]), spec("1-3")).unwrap();
        assert_eq!((s.added, s.removed), (1, 1));
        assert!(c.table.contains(3) && !c.table.contains(50));
        assert!(f.pending.is_empty());

        // A node enrolled for good (heard from) counts.
        let dp = MemDataplane::new();
        let mut c = core();
        c.table.set_capacity(3);
        let (mut f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1-2"), true).unwrap();
        assert_eq!(f.enroll(&mut c, &dp, 50), "provisioned");
        assert_eq!(dp.gate(&hb(50, 1, 1), SRC, 1).result, GateResult::Accepted);
        // Heard, but not checked yet (check_pending runs once a second):
        // enrolled all the same.
        let e = f
            .reload(&mut c, &dp, keyring(&[1]), spec("1-3"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("do not fit"), "{e:#}");
        assert_eq!(f.check_pending(&mut c, &dp), (vec![50], vec![]));
        let e = f
            .reload(&mut c, &dp, keyring(&[1]), spec("1-3"))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("4 nodes (3 listed, 1 enrolled) do not fit"),
            "{e:#}"
        );
        assert!(!c.table.contains(3));
        assert!(c.table.contains(50));
    }

    #[test]
    fn a_probation_outlives_a_restart_as_a_probation() {
        // Probations live in the monitor's memory; their slots are pinned.
        // A restart adopted them as enrolled for good: forged ids stayed
        // forever, and could keep the next start from fitting its list.
        let dp = MemDataplane::new();
        let mut c = core();
        let (mut f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1"), true).unwrap();
        for id in [50, 51] {
            assert_eq!(f.enroll(&mut c, &dp, id), "provisioned");
        }
        assert_eq!(dp.gate(&hb(51, 1, 1), SRC, 1).result, GateResult::Accepted);
        let mut c2 = core();
        let (mut f2, _) = Fleet::start(&mut c2, &dp, keyring(&[1]), spec("1"), true).unwrap();
        assert!(
            f2.pending.contains_key(&50),
            "never heard: still on probation"
        );
        assert!(!f2.pending.contains_key(&51), "heard: enrolled");
        // Its probation runs from the start; at its end it goes.
        f2.pending.insert(50, 0);
        assert_eq!(f2.check_pending(&mut c2, &dp), (vec![], vec![50]));
        assert!(!c2.table.contains(50) && c2.table.contains(51));
        // Node id 0 is never enrolled (nor logged): the index cannot hold it.
        assert_eq!(f2.enroll(&mut c2, &dp, 0), "refused");
    }

    #[test]
    fn a_dataplane_failure_mid_reload_is_undone_and_a_retry_applies_it() {
        let dp = Flaky::default();
        let mut c = core();
        let (mut f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1-3"), false).unwrap();
        let seq = std::cell::Cell::new(0);
        let gate = |id, epoch| {
            seq.set(seq.get() + 1);
            dp.mem
                .gate(&hb(id, epoch, seq.get()), SRC, seq.get())
                .result
        };
        for id in [1, 1, 2, 3] {
            assert_eq!(gate(id, 1), GateResult::Accepted);
        }
        let slots: Vec<_> = (1..=3).map(|id| c.table.slot_of(id)).collect();

        // Keys go to new nodes (4, 5), then to the nodes that stay (1, 2):
        // the last of those fails, after the other got the new keys.
        dp.fail_upsert_after(3);
        let e = f
            .reload(&mut c, &dp, keyring(&[1, 2]), spec("1-2,4-5"))
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("cannot install the keys of node"), "{e}");
        assert!(e.contains("1 removed nodes are back"), "{e}");
        assert!(!e.contains("next reload"), "{e}");
        assert_as_before(&c, &dp, &slots, gate);
        assert_eq!(accepted(&dp, &c, 1), 3, "a node that stays keeps its state");
        for id in [4, 5] {
            assert_eq!(gate(id, 2), GateResult::UnknownNode, "node {id}");
        }

        let s = f
            .reload(&mut c, &dp, keyring(&[1, 2]), spec("1-2,4-5"))
            .unwrap();
        assert_eq!((s.added, s.removed, s.kept), (2, 1, 2));
        for id in [1, 2, 4, 5] {
            assert_eq!(gate(id, 2), GateResult::Accepted, "node {id}");
        }
        assert_eq!(gate(3, 1), GateResult::UnknownNode);
    }

    #[test]
    fn what_an_undo_cannot_put_back_the_next_reload_repairs() {
        let dp = Flaky::default();
        let mut c = core();
        let (mut f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1-3"), false).unwrap();
        // Node 4's keys fail, and so does its removal when undoing: it
        // stays in the table, without keys. The keyring does not change.
        dp.fail_upsert_after(0);
        dp.stuck.store(4, Ordering::Relaxed);
        let e = f
            .reload(&mut c, &dp, keyring(&[1]), spec("1-2,4"))
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("1 removed nodes are back"), "{e}");
        assert!(e.contains("1 new nodes stay provisioned"), "{e}");
        assert!(e.contains("the next reload repairs this"), "{e}");
        assert!(c.table.contains(3) && c.table.contains(4));
        assert_eq!(
            dp.mem.gate(&hb(4, 1, 1), SRC, 1).result,
            GateResult::UnknownNode,
            "node 4 has no keys"
        );
        dp.stuck.store(0, Ordering::Relaxed);

        // The same reload again: node 4 is in the table already and the
        // keyring compares equal, yet node 4 gets its keys.
        let s = f.reload(&mut c, &dp, keyring(&[1]), spec("1-2,4")).unwrap();
        assert_eq!((s.added, s.removed, s.kept), (0, 1, 3));
        for (seq, id) in [1, 2, 4].into_iter().enumerate() {
            let r = dp.mem.gate(&hb(id, 1, 2), SRC, seq as u64 + 2).result;
            assert_eq!(r, GateResult::Accepted, "node {id}");
        }
        assert_eq!(
            dp.mem.gate(&hb(3, 1, 1), SRC, 9).result,
            GateResult::UnknownNode
        );
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

    /// One tick of `c` over `dp` at `at` ns, its events published and
    /// written at once (positions from 0 each time: a tick confirms only
    /// its own). Ticks seconds apart are not a pause of the monitor.
    fn tick_written(
        c: &mut Core,
        dp: &MemDataplane,
        at: u64,
    ) -> Vec<crate::monitor::events::Event> {
        c.set_tick(Duration::from_secs(60));
        let mut ev = Vec::new();
        c.tick(dp, at, &mut || "ts".into(), &mut ev);
        c.published(0);
        c.confirm(dp, ev.len() as u64);
        ev
    }

    /// A node declared dead stays dead across a restart over the pinned
    /// state: not shown alive for a few of its intervals, then announced
    /// dead again (hooks paged again at every upgrade); it comes back
    /// with `alive` on its next heartbeat.
    #[test]
    fn restart_over_pinned_state_keeps_a_dead_node_dead() {
        use crate::monitor::state::{EventKind, Status};
        const S: u64 = 1_000_000_000;
        let dp = MemDataplane::new();
        let tick = |c: &mut Core, at: u64| {
            tick_written(c, &dp, at)
                .iter()
                .map(|e| (e.node_id, e.event, e.previous))
                .collect::<Vec<_>>()
        };
        let mut c = core();
        let (_f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1-2"), false).unwrap();
        let t0 = monotonic_ns();
        dp.gate(&hb(2, 1, 1), SRC, t0);
        assert_eq!(tick(&mut c, t0), [(2, EventKind::Joined, Status::Unknown)]);
        // Silent past the backstop (60 s).
        assert_eq!(
            tick(&mut c, t0 + 61 * S),
            [(2, EventKind::Dead, Status::Alive)]
        );
        let mut c2 = core();
        let (_f, _) = Fleet::start(&mut c2, &dp, keyring(&[1]), spec("1-2"), false).unwrap();
        let slot = c2.table.slot_of(2).unwrap();
        assert_eq!(c2.table.track(slot).status, Status::Dead);
        assert_eq!(c2.table.count(Status::Dead), 1);
        assert_eq!(tick(&mut c2, t0 + 62 * S), [], "not announced again");
        dp.gate(&hb(2, 1, 2), SRC, t0 + 63 * S);
        assert_eq!(
            tick(&mut c2, t0 + 63 * S + 1),
            [(2, EventKind::Alive, Status::Dead)]
        );
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

    /// A reload that takes announced nodes off the list has the next tick
    /// announce each `removed`, from its last status; one never heard from
    /// goes silently (nothing was announced of it), and so does a
    /// probation that expires unheard (it never joined). Listed again, a
    /// node starts afresh: `joined`, from `unknown`.
    #[test]
    fn nodes_taken_off_the_list_are_announced_removed() {
        use crate::monitor::state::{EventKind, Status};
        const S: u64 = 1_000_000_000;
        let dp = MemDataplane::new();
        let tick = |c: &mut Core, at: u64| {
            tick_written(c, &dp, at)
                .iter()
                .map(|e| (e.node_id, e.event, e.previous, e.state))
                .collect::<Vec<_>>()
        };
        let mut c = core();
        let (mut f, _) = Fleet::start(&mut c, &dp, keyring(&[1]), spec("1-3"), true).unwrap();
        let t0 = monotonic_ns();
        dp.gate(&hb(1, 1, 1), SRC, t0);
        dp.gate(&hb(2, 1, 1), SRC, t0);
        let joined = |id| (id, EventKind::Joined, Status::Unknown, Status::Alive);
        assert_eq!(tick(&mut c, t0), [joined(1), joined(2)]);
        // Node 2 silent past the backstop (60 s): dead.
        dp.gate(&hb(1, 1, 2), SRC, t0 + 61 * S);
        assert_eq!(
            tick(&mut c, t0 + 61 * S),
            [(2, EventKind::Dead, Status::Alive, Status::Dead)]
        );
        // 9 on probation, never heard from.
        assert_eq!(f.enroll(&mut c, &dp, 9), "provisioned");
        let s = f.reload(&mut c, &dp, keyring(&[1]), spec("4")).unwrap();
        assert_eq!((s.added, s.removed, s.kept), (1, 3, 1));
        let removed = |id, last| (id, EventKind::Removed, last, Status::Unknown);
        let mut ev = tick(&mut c, t0 + 62 * S);
        ev.sort_by_key(|e| e.0);
        assert_eq!(ev, [removed(1, Status::Alive), removed(2, Status::Dead)]);
        assert_eq!(tick(&mut c, t0 + 63 * S), [], "announced once");
        // The probation expires unheard: removed, silently.
        f.pending.insert(9, 0);
        assert_eq!(f.check_pending(&mut c, &dp), (vec![], vec![9]));
        assert_eq!(tick(&mut c, t0 + 64 * S), []);
        // Node 2 listed again: a new node.
        f.reload(&mut c, &dp, keyring(&[1]), spec("2,4")).unwrap();
        dp.gate(&hb(2, 1, 1), SRC, t0 + 65 * S);
        assert_eq!(tick(&mut c, t0 + 65 * S), [joined(2)]);
    }
}

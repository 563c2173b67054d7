//! The hook through which a heartbeat-interval controller steers nodes.
//!
//! Every decision period the tick asks the policy, node by node, which
//! interval it wants that node to use, and writes a changed answer to the
//! dataplane (`Dataplane::set_requested_interval`), where the gate puts it
//! into ACKs. The policy only sees authenticated state (the gate's
//! per-node statistics): forged datagrams never reach it.
//!
//! [`FixedPolicy`] is the whole policy when no controller runs: no opinion
//! (senders keep their own interval) or one interval for everyone.
//! [`QLearnPolicy`] puts the Q-learning controller (`crate::controller`)
//! behind the same trait, and [`Critical`] caps the nodes an operator marks
//! critical under either.

use std::path::{Path, PathBuf};

use hb_common::maps::NodeState;
use serde::Serialize;

use super::{config::NodeSpec, state::Status};
use crate::controller::{
    QController, Reason,
    table::{TableCopy, TableFile},
};

/// What the monitor knows of a node at decision time, beyond the
/// dataplane's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeView {
    pub node_id: u32,
    pub status: Status,
    /// Phi at decision time.
    pub phi: f64,
    /// The monitor's current request (0 = no opinion).
    pub requested_interval_ms: u32,
    /// CLOCK_MONOTONIC ns of this decision.
    pub now_ns: u64,
}

/// A per-node heartbeat interval policy.
pub trait IntervalPolicy: Send {
    /// The interval (ms) the node at `slot` should use from now on, or
    /// `None` to leave the current request unchanged. `Some(0)` withdraws
    /// the request (the sender keeps its own interval).
    fn decide(&mut self, slot: u32, node: &NodeView, state: &NodeState) -> Option<u32>;

    /// Whether the tick needs to ask at all (a policy with no opinion
    /// costs nothing per node).
    fn active(&self) -> bool {
        true
    }

    /// Why the last decision for `slot` was made, for `/nodes`.
    fn reason(&self, _slot: u32) -> Option<String> {
        None
    }

    /// A slot was freed (node removed): forget what was learned about it.
    fn forget(&mut self, _slot: u32) {}

    /// Taking over the request `requested_ms` the dataplane holds for
    /// `node_id` at `slot` (at start, and when a reload installs this
    /// policy: [`super::tick::Core::reconcile_requests`]), at `now_ns`:
    /// the request to write at once instead, or `None` to leave it until
    /// the node's first decision (up to a decision period later). What
    /// must not wait (a critical node's cap) is decided here, and shown
    /// like any decision.
    fn take_over(
        &mut self,
        _slot: u32,
        _node_id: u32,
        _requested_ms: u32,
        _now_ns: u64,
    ) -> Option<u32> {
        None
    }

    /// Short name for logs and `/nodes`.
    fn name(&self) -> &'static str;

    /// Whether the tick should spread the nodes' decisions over the
    /// decision period (each node once per period, a slice of the fleet
    /// per tick) instead of deciding for every node on one tick.
    fn staggered(&self) -> bool {
        false
    }

    /// The node at `slot` was suspected (or declared dead) and a later
    /// heartbeat of the same incarnation brought it back: a suspicion it
    /// refuted, i.e. a false one.
    fn suspicion_refuted(&mut self, _slot: u32) {}

    /// The last decision for `slot` in full, for `/nodes` (`None`: the
    /// monitor shows the last interval it wrote and [`Self::reason`]).
    fn decision(&self, _slot: u32) -> Option<DecisionInfo> {
        None
    }

    /// What the `GET /controller` document needs, copied (under the
    /// core's lock: cheap); [`PolicySnapshot::build`] makes the document
    /// from it after the lock is released. Policies implement this one.
    fn snapshot_copy(&self) -> PolicySnapshot {
        PolicySnapshot::ready(serde_json::json!({ "controller": self.name() }))
    }

    /// The `GET /controller` document, at once (the copy, built).
    fn snapshot(&self) -> serde_json::Value {
        self.snapshot_copy().build()
    }

    /// The learned table, copied, and the file it goes to, if the policy
    /// has one (a reload carries it to the new policy). Taken under the
    /// core's lock; [`TableCopy::build`] makes the file's rows of it
    /// without the lock.
    fn table_copy(&self) -> Option<(PathBuf, TableCopy)> {
        None
    }

    /// [`Self::table_copy`], built.
    fn table(&self) -> Option<(PathBuf, TableFile)> {
        self.table_copy().map(|(path, t)| (path, t.build()))
    }

    /// [`Self::table_copy`], if it is to be saved now (taken under the
    /// core's lock, built and written without it).
    fn table_to_save(&self) -> Option<(PathBuf, TableCopy)> {
        self.table_copy()
    }

    /// The table from [`Self::table_to_save`] was written to its file.
    fn table_saved(&self) {}

    /// Whether the table's file was loaded or saved by this policy (or
    /// the one it carried on from): one that is gone since was removed,
    /// and is not written back ([`QLearnPolicy`]'s `table_to_save`).
    fn table_file_seen(&self) -> bool {
        false
    }

    /// About to replace `running` (a reload, under the core's lock): a
    /// policy built from `running`'s table takes what it learned since.
    fn catch_up(&mut self, _running: &dyn IntervalPolicy) {}
}

/// The `GET /controller` document of a policy, taken in two steps
/// ([`IntervalPolicy::snapshot_copy`]): what it needs, copied under the
/// core's lock, and the work that makes the document of it (describing,
/// sorting and serialising a table of thousands of rows took 31 ms, a
/// tick held off that long), done by [`PolicySnapshot::build`] without
/// the lock.
pub struct PolicySnapshot(Box<dyn FnOnce() -> serde_json::Value + Send>);

impl PolicySnapshot {
    /// A document that is already made (a policy with little to show).
    pub fn ready(v: serde_json::Value) -> PolicySnapshot {
        PolicySnapshot(Box::new(move || v))
    }

    /// A document `make` builds from what it owns (the copy).
    pub fn later(make: impl FnOnce() -> serde_json::Value + Send + 'static) -> PolicySnapshot {
        PolicySnapshot(Box::new(make))
    }

    /// The same document with `key` set to `value` (if it is an object).
    pub fn with(self, key: &'static str, value: serde_json::Value) -> PolicySnapshot {
        PolicySnapshot::later(move || {
            let mut v = self.build();
            if let Some(o) = v.as_object_mut() {
                o.insert(key.into(), value);
            }
            v
        })
    }

    /// Makes the document.
    pub fn build(self) -> serde_json::Value {
        (self.0)()
    }
}

/// A decision as `/nodes` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecisionInfo {
    /// The interval the node should use, ms.
    pub interval_ms: u32,
    /// CLOCK_MONOTONIC ns of the decision.
    pub at_ns: u64,
    /// `slower`, `hold`, `faster`.
    pub action: Option<String>,
    /// Why: `greedy`, `explore`, `settling`, `cap`, ...
    pub reason: String,
    /// Reward of the period the decision ended.
    pub reward: Option<f64>,
    /// Modelled worst-case detection time of that period, ms.
    pub detection_ms: Option<f64>,
    /// Modelled share of crashes detected later than the target in that
    /// period (the controller's p99 goal keeps its average at or below 1%).
    pub late_share: Option<f64>,
}

/// No controller: no opinion, or one fixed interval for every node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedPolicy {
    interval_ms: Option<u32>,
}

impl FixedPolicy {
    /// No opinion: senders keep their configured interval.
    pub const fn none() -> FixedPolicy {
        FixedPolicy { interval_ms: None }
    }

    /// Ask every node to use `interval_ms`.
    pub const fn fixed(interval_ms: u32) -> FixedPolicy {
        FixedPolicy {
            interval_ms: Some(interval_ms),
        }
    }
}

impl IntervalPolicy for FixedPolicy {
    fn decide(&mut self, _slot: u32, node: &NodeView, _state: &NodeState) -> Option<u32> {
        let want = self.interval_ms?;
        (node.requested_interval_ms != want).then_some(want)
    }

    fn active(&self) -> bool {
        self.interval_ms.is_some()
    }

    fn reason(&self, _slot: u32) -> Option<String> {
        self.interval_ms.map(|ms| format!("fixed interval {ms} ms"))
    }

    fn name(&self) -> &'static str {
        if self.interval_ms.is_some() {
            "fixed"
        } else {
            "off"
        }
    }

    fn snapshot_copy(&self) -> PolicySnapshot {
        PolicySnapshot::ready(
            serde_json::json!({ "controller": self.name(), "interval_ms": self.interval_ms }),
        )
    }
}

/// Nodes the operator marks critical, and the interval they must never
/// exceed.
#[derive(Clone, Debug, PartialEq)]
pub struct CriticalNodes {
    pub nodes: NodeSpec,
    pub cap_ms: u32,
}

impl CriticalNodes {
    /// The cap of `node_id`, if it is critical.
    pub fn cap(&self, node_id: u32) -> Option<u32> {
        self.nodes.contains(node_id).then_some(self.cap_ms)
    }
}

/// Caps critical nodes under any policy: what the inner policy asks for
/// (or, with no opinion, what the node uses) is lowered to the cap.
pub struct Critical<P> {
    inner: P,
    critical: CriticalNodes,
    /// Slots whose request the cap set, for [`IntervalPolicy::reason`].
    capped: std::collections::HashSet<u32>,
}

impl<P: IntervalPolicy> Critical<P> {
    pub fn new(inner: P, critical: CriticalNodes) -> Critical<P> {
        Critical {
            inner,
            critical,
            capped: Default::default(),
        }
    }

    /// The answer for the critical node at `slot`, noting whether the cap
    /// set it.
    fn answer(&mut self, slot: u32, by_cap: bool, want: Option<u32>) -> Option<u32> {
        if by_cap {
            self.capped.insert(slot);
        } else {
            self.capped.remove(&slot);
        }
        want
    }
}

impl<P: IntervalPolicy> IntervalPolicy for Critical<P> {
    fn decide(&mut self, slot: u32, node: &NodeView, state: &NodeState) -> Option<u32> {
        if !self.inner.active() {
            // No policy besides the cap (`off`): a node that runs at or
            // over its cap is asked for the cap, any other for nothing
            // (it keeps its own interval; the requests of an earlier
            // policy are withdrawn, as under plain `off`). Judged from
            // the interval the node reports: judged from our own request,
            // a node stayed at whatever it ran at when first seen, even
            // after it restarted slower than its cap or left the list.
            let cap = self.critical.cap(node.node_id);
            let want = match cap {
                Some(cap) if state.interval_ms >= cap => cap,
                _ => 0,
            };
            let change = (want != node.requested_interval_ms).then_some(want);
            if cap.is_none() {
                return change;
            }
            return self.answer(slot, want != 0, change);
        }
        let want = self.inner.decide(slot, node, state);
        // A node not on the list is never capped (a slot the list's node
        // left is forgotten): the tick asks this of every node, so no
        // bookkeeping for it.
        let Some(cap) = self.critical.cap(node.node_id) else {
            return want;
        };
        // What the node will use without a new request.
        let current = match want.unwrap_or(node.requested_interval_ms) {
            0 => state.interval_ms,
            ms => ms,
        };
        if current == 0 {
            return self.answer(slot, false, want);
        }
        let capped = current.min(cap);
        let change = (capped != node.requested_interval_ms).then_some(capped);
        self.answer(slot, capped < current, change)
    }

    fn active(&self) -> bool {
        true
    }

    fn reason(&self, slot: u32) -> Option<String> {
        if self.capped.contains(&slot) {
            return Some(format!(
                "critical node: capped at {} ms",
                self.critical.cap_ms
            ));
        }
        self.inner.reason(slot)
    }

    fn forget(&mut self, slot: u32) {
        self.capped.remove(&slot);
        self.inner.forget(slot)
    }

    // The cap under `fixed` and `off` needs no take-over: their first
    // tick decides for every node (they are not staggered).
    fn take_over(
        &mut self,
        slot: u32,
        node_id: u32,
        requested_ms: u32,
        now_ns: u64,
    ) -> Option<u32> {
        self.inner.take_over(slot, node_id, requested_ms, now_ns)
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn staggered(&self) -> bool {
        self.inner.staggered()
    }

    fn suspicion_refuted(&mut self, slot: u32) {
        self.inner.suspicion_refuted(slot)
    }

    fn decision(&self, slot: u32) -> Option<DecisionInfo> {
        self.inner.decision(slot)
    }

    fn snapshot_copy(&self) -> PolicySnapshot {
        self.inner
            .snapshot_copy()
            .with("critical_cap_ms", serde_json::json!(self.critical.cap_ms))
    }

    fn table_copy(&self) -> Option<(PathBuf, TableCopy)> {
        self.inner.table_copy()
    }

    fn table_to_save(&self) -> Option<(PathBuf, TableCopy)> {
        self.inner.table_to_save()
    }

    fn table_saved(&self) {
        self.inner.table_saved()
    }

    fn catch_up(&mut self, running: &dyn IntervalPolicy) {
        self.inner.catch_up(running)
    }
}

/// What the Q-learning policy keeps per slot.
#[derive(Clone, Copy, Debug, Default)]
struct SlotMemory {
    /// The node at this slot when last decided (0: none).
    node_id: u32,
    /// Refuted suspicions since its last decision.
    refuted: u32,
    /// When its last decision was taken, ns (0: never).
    decided_ns: u64,
}

/// The Q-learning controller as the monitor's interval policy.
///
/// The controller is keyed by node id (its decision logs name the node);
/// this wrapper maps slots to ids, counts each slot's refuted suspicions
/// between decisions, and hands the controller each node's cap.
pub struct QLearnPolicy {
    ctrl: QController,
    table_path: Option<PathBuf>,
    critical: Option<CriticalNodes>,
    slots: Vec<SlotMemory>,
    /// Whether the table file has existed while this policy ran (loaded,
    /// or written by a save): once it has, its removal is the operator's
    /// "learn afresh" (README), which no later save may undo.
    file_seen: std::sync::atomic::AtomicBool,
    gone_logged: std::sync::atomic::AtomicBool,
    /// Built at a reload from the running controller's table (see
    /// [`IntervalPolicy::catch_up`]).
    carried: bool,
}

impl QLearnPolicy {
    /// Wraps `ctrl`; with `table_path`, loads the table saved there if
    /// the file exists (a table that does not fit the controller is an
    /// error, never silently replaced).
    pub fn new(
        mut ctrl: QController,
        table_path: Option<PathBuf>,
        critical: Option<CriticalNodes>,
    ) -> anyhow::Result<QLearnPolicy> {
        let loaded = table_path.as_ref().is_some_and(|p| p.exists());
        if let Some(p) = &table_path
            && loaded
        {
            ctrl.load(p)?;
            tracing::info!(
                path = %p.display(),
                decisions = ctrl.decisions(),
                states = ctrl.rows().len(),
                "controller table loaded"
            );
        }
        let p = QLearnPolicy::wrap(ctrl, table_path, critical);
        p.file_seen
            .store(loaded, std::sync::atomic::Ordering::Relaxed);
        Ok(p)
    }

    /// Wraps `ctrl` as it is (a reload hands it the running controller's
    /// table itself): no file is read; the table is saved to `table_path`.
    pub fn wrap(
        ctrl: QController,
        table_path: Option<PathBuf>,
        critical: Option<CriticalNodes>,
    ) -> QLearnPolicy {
        QLearnPolicy {
            ctrl,
            table_path,
            critical,
            slots: Vec::new(),
            file_seen: Default::default(),
            gone_logged: Default::default(),
            carried: false,
        }
    }

    /// Marks a policy built from the running one's table at a reload.
    pub fn carried(mut self) -> QLearnPolicy {
        self.carried = true;
        self
    }

    pub fn controller(&self) -> &QController {
        &self.ctrl
    }

    pub fn table_path(&self) -> Option<&Path> {
        self.table_path.as_deref()
    }

    fn slot(&mut self, slot: u32) -> &mut SlotMemory {
        let i = slot as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, SlotMemory::default());
        }
        &mut self.slots[i]
    }

    /// Notes `node_id` at `slot`. A slot that changed hands without
    /// `forget` (not expected): the old node's memory must not carry over.
    fn claim(&mut self, slot: u32, node_id: u32) {
        let m = *self.slot(slot);
        if m.node_id != node_id {
            if m.node_id != 0 {
                self.ctrl.forget(m.node_id);
            }
            *self.slot(slot) = SlotMemory {
                node_id,
                refuted: m.refuted,
                decided_ns: 0,
            };
        }
    }
}

impl IntervalPolicy for QLearnPolicy {
    fn decide(&mut self, slot: u32, node: &NodeView, state: &NodeState) -> Option<u32> {
        let cap = self.critical.as_ref().and_then(|c| c.cap(node.node_id));
        self.claim(slot, node.node_id);
        self.ctrl.set_cap(node.node_id, cap);
        let refuted = std::mem::take(&mut self.slot(slot).refuted);
        let d = self.ctrl.observe(node.node_id, state, refuted);
        if d.reason != Reason::NoData {
            // `no_data` holds are not decisions (`last_decision` keeps
            // the previous one): its time stays that one's.
            self.slot(slot).decided_ns = node.now_ns;
        }
        // Belt and braces: the controller honours the cap itself.
        let ms = cap.map_or(d.interval_ms, |c| d.interval_ms.min(c));
        (ms != node.requested_interval_ms).then_some(ms)
    }

    fn reason(&self, slot: u32) -> Option<String> {
        self.decision(slot).map(|d| d.reason)
    }

    /// A critical node's standing request over its cap (the node newly
    /// marked critical at this reload, or since the monitor last ran) is
    /// lowered to the cap at once, a `cap` decision as its first decision
    /// would have made up to a period later.
    fn take_over(
        &mut self,
        slot: u32,
        node_id: u32,
        requested_ms: u32,
        now_ns: u64,
    ) -> Option<u32> {
        let cap = self.critical.as_ref().and_then(|c| c.cap(node_id))?;
        if requested_ms <= cap {
            return None;
        }
        self.claim(slot, node_id);
        self.ctrl.set_cap(node_id, Some(cap));
        let d = self.ctrl.cap_request(node_id, requested_ms)?;
        self.slot(slot).decided_ns = now_ns;
        // As `decide`: the cap itself if it is off the grid.
        Some(d.interval_ms.min(cap))
    }

    fn forget(&mut self, slot: u32) {
        if let Some(m) = self.slots.get_mut(slot as usize) {
            if m.node_id != 0 {
                self.ctrl.forget(m.node_id);
            }
            *m = SlotMemory::default();
        }
    }

    fn name(&self) -> &'static str {
        "qlearn"
    }

    fn staggered(&self) -> bool {
        true
    }

    fn suspicion_refuted(&mut self, slot: u32) {
        let m = self.slot(slot);
        m.refuted = m.refuted.saturating_add(1);
    }

    fn decision(&self, slot: u32) -> Option<DecisionInfo> {
        let m = self.slots.get(slot as usize)?;
        if m.node_id == 0 || m.decided_ns == 0 {
            return None;
        }
        let d = self.ctrl.last_decision(m.node_id)?;
        Some(DecisionInfo {
            interval_ms: d.interval_ms,
            at_ns: m.decided_ns,
            action: Some(d.action.name().to_owned()),
            reason: d.reason.to_string(),
            reward: d.reward,
            detection_ms: d.detection_ms,
            late_share: d.late_share,
        })
    }

    /// The controller's numbers, copied: described and serialised by
    /// `build`.
    fn snapshot_copy(&self) -> PolicySnapshot {
        let copy = self.ctrl.snapshot_copy();
        let table_path = self.table_path.as_ref().map(|p| p.display().to_string());
        let cap_ms = self.critical.as_ref().map(|c| c.cap_ms);
        PolicySnapshot::later(move || {
            let mut v = serde_json::to_value(copy.build())
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
            if let Some(o) = v.as_object_mut() {
                o.insert("controller".into(), serde_json::json!("qlearn"));
                o.insert("table_path".into(), serde_json::json!(table_path));
                if let Some(cap_ms) = cap_ms {
                    o.insert("critical_cap_ms".into(), serde_json::json!(cap_ms));
                }
            }
            v
        })
    }

    fn table_copy(&self) -> Option<(PathBuf, TableCopy)> {
        Some((self.table_path.clone()?, self.ctrl.table_copy()))
    }

    /// `None` once the file this policy loaded or saved was removed: the
    /// minute save wrote it back before the reload the operator removed it
    /// for (a new target, new bounds: README), which was then refused
    /// again, and the save at exit before a restart.
    fn table_to_save(&self) -> Option<(PathBuf, TableCopy)> {
        use std::sync::atomic::Ordering::Relaxed;
        let path = self.table_path.clone()?;
        if path.exists() {
            self.file_seen.store(true, Relaxed);
        } else if self.file_seen.load(Relaxed) {
            if !self.gone_logged.swap(true, Relaxed) {
                tracing::warn!(
                    path = %path.display(),
                    "the controller table's file was removed: not saved again; a reload or restart learns afresh"
                );
            }
            return None;
        }
        Some((path, self.ctrl.table_copy()))
    }

    fn table_saved(&self) {
        self.file_seen
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A reload builds this policy from a snapshot of the running table
    /// before the fleet's part, which runs without the core's lock
    /// (seconds at a million nodes) while the running controller goes on
    /// learning: the table is taken again here, under the lock, so that
    /// nothing learned meanwhile is lost. It fitted then; levels and
    /// target cannot have changed since.
    fn catch_up(&mut self, running: &dyn IntervalPolicy) {
        if !self.carried {
            return;
        }
        if let Some((path, t)) = running.table_copy() {
            if let Err(why) = self.ctrl.load_copy(&t) {
                tracing::warn!(
                    "the running controller table {why}: the reload goes on from its snapshot"
                );
            }
            // The same file: one the running policy had seen and that
            // is gone was removed to learn afresh, a reload for another
            // reason (a keyring push) must not have it written back.
            if self.table_path.as_deref() == Some(path.as_path()) && running.table_file_seen() {
                self.file_seen
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn table_file_seen(&self) -> bool {
        self.file_seen.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    //! The policies as the monitor runs them: built from `Settings` by
    //! `make_policy`, driven by `Core::tick` over the in-memory gate, with
    //! senders that adopt the interval their ACKs carry (as `hb send`).

    use std::{
        net::{Ipv4Addr, SocketAddr, SocketAddrV4},
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64},
        },
    };

    use hb_common::{
        Datagram, GateResult, Kind, NodeKey,
        maps::{Config as GateConfig, NodeKeys},
        proto,
    };

    use super::*;
    use crate::{
        dataplane::{Dataplane, mem::MemDataplane},
        monitor::{
            api::{Shared, node_row},
            config::{ControllerKind, Opts, Settings},
            make_policy,
            metrics::Metrics,
            save_table,
            table::Origin,
            tick::{Core, Detector},
        },
    };

    const MS: u64 = 1_000_000;

    fn settings(f: impl FnOnce(&mut Opts)) -> Settings {
        let mut o = Opts {
            keyring: Some("k.toml".into()),
            nodes: Some("1-4".into()),
            ..Opts::default()
        };
        f(&mut o);
        Settings::load(&o.into()).unwrap()
    }

    fn key(id: u32) -> NodeKey {
        NodeKey {
            k0: id as u64 * 31,
            k1: 5,
        }
    }

    /// A sender as `hb send` behaves: heartbeats at its interval, adopting
    /// the interval of the ACKs it gets (within 100..=10000 ms).
    struct Sender {
        id: u32,
        seq: u64,
        interval_ms: u32,
        next_ns: u64,
    }

    /// The monitor's core over the in-memory gate, behind `Shared` as the
    /// running monitor has it, and its senders.
    struct Rig {
        shared: Shared,
        mem: Arc<MemDataplane>,
        senders: Vec<Sender>,
        now: u64,
    }

    impl Rig {
        fn new(s: &Settings, ids: &[u32], interval_ms: u32) -> Rig {
            let dp = Arc::new(MemDataplane::new());
            dp.set_config(&GateConfig {
                ack_on_change: s.ack_on_change as u8,
                ack_every: s.ack_every,
                ..GateConfig::default()
            })
            .unwrap();
            let mut core = Core::new(
                Detector::new(s.thresholds, s.phi),
                make_policy(s).unwrap(),
                s.decision_ms,
            );
            for &id in ids {
                let slot = core.table.insert(id, Origin::Configured, 0).unwrap();
                let keys = NodeKeys::single(slot, 1, key(id));
                dp.upsert_node(id, &keys).unwrap();
            }
            let start = 1_000_000 * MS;
            Rig {
                mem: dp.clone(),
                shared: Shared {
                    core: Mutex::new(core),
                    dp,
                    metrics: Arc::new(Metrics::new()),
                    last_tick_ns: AtomicU64::new(0),
                    dataplane_ok: AtomicBool::new(true),
                    tick: s.tick,
                },
                senders: ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| Sender {
                        id,
                        seq: 0,
                        interval_ms,
                        next_ns: start + (i as u64 * 7 % 100) * MS,
                    })
                    .collect(),
                now: start,
            }
        }

        /// Runs `ms` of simulated time: heartbeats (each node `silent`
        /// says nothing), 100 ms ticks. Calls `check` after every tick.
        fn run(&mut self, ms: u64, silent: &[u32], mut check: impl FnMut(&Rig)) {
            let end = self.now + ms * MS;
            while self.now < end {
                self.now += 100 * MS;
                for s in self.senders.iter_mut() {
                    while s.next_ns <= self.now {
                        let at = s.next_ns;
                        s.next_ns += s.interval_ms as u64 * MS;
                        if silent.contains(&s.id) {
                            continue;
                        }
                        s.seq += 1;
                        let d = Datagram {
                            kind: Kind::Heartbeat,
                            node_id: s.id,
                            generation: 1,
                            key_epoch: 1,
                            flags: 0,
                            load: 100,
                            seq: s.seq,
                            sent_ns: at,
                            interval_ms: s.interval_ms,
                            rtt_us: 200,
                        };
                        let src = SocketAddr::V4(SocketAddrV4::new(
                            Ipv4Addr::new(198, 18, 0, s.id as u8),
                            40000,
                        ));
                        let v = self.mem.gate(&d.seal(&key(s.id)), src, at);
                        assert_eq!(v.result, GateResult::Accepted);
                        if let Some(ack) = v.ack {
                            assert!(proto::verify(&key(s.id), &ack));
                            let a = proto::parse(&ack, Kind::Ack).unwrap();
                            if a.interval_ms != 0 {
                                s.interval_ms = a.interval_ms.clamp(100, 10_000);
                            }
                        }
                    }
                }
                let now = self.now;
                self.shared.core().tick(
                    &*self.shared.dp,
                    now,
                    &mut || "ts".into(),
                    &mut Vec::new(),
                );
                check(self);
            }
        }

        fn requested(&self, id: u32) -> u32 {
            let slot = self.shared.core().table.slot_of(id).unwrap();
            let mut r = 0;
            self.shared
                .dp
                .read_states(slot..slot + 1, &mut |_, st| r = st.requested_interval_ms);
            r
        }

        fn interval(&self, id: u32) -> u32 {
            self.senders
                .iter()
                .find(|s| s.id == id)
                .unwrap()
                .interval_ms
        }
    }

    #[test]
    fn controller_settings_and_their_errors() {
        let s = settings(|_| {});
        assert_eq!(s.controller.kind, ControllerKind::Off, "off by default");
        assert_eq!(
            (s.ack_every, s.ack_on_change, s.decision_ms),
            (0, false, 1000)
        );
        let s = settings(|o| o.fixed_interval_ms = Some(500));
        assert_eq!(s.controller.kind, ControllerKind::Fixed);
        assert!(s.ack_on_change, "a fixed interval reaches senders in ACKs");
        let s = settings(|o| o.controller = Some(ControllerKind::Qlearn));
        assert_eq!(
            (s.ack_every, s.ack_on_change, s.decision_ms),
            (10, true, 5000)
        );
        assert_eq!(
            (s.controller.min_interval_ms, s.controller.max_interval_ms),
            (100, 10_000)
        );
        assert_eq!(
            s.controller.table,
            PathBuf::from(crate::controller::cli::DEFAULT_TABLE)
        );
        let s = settings(|o| {
            o.controller = Some(ControllerKind::Qlearn);
            o.controller_bounds_ms = Some("200-5000".into());
            o.critical = Some("3-4".into());
            o.controller_max_interval_ms = Some(700);
            o.ack_every = Some(3);
        });
        assert_eq!(
            (s.controller.min_interval_ms, s.controller.max_interval_ms),
            (200, 5000)
        );
        assert_eq!(s.ack_every, 3, "an explicit ACK setting wins");
        let (spec, cap) = s.controller.critical.clone().unwrap();
        assert!(spec.contains(3) && spec.contains(4) && !spec.contains(2));
        assert_eq!(cap, 700);

        let err = |f: fn(&mut Opts)| {
            let mut o = Opts {
                keyring: Some("k.toml".into()),
                nodes: Some("1-4".into()),
                ..Opts::default()
            };
            f(&mut o);
            let e = Settings::load(&o.into()).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            e
        };
        assert!(
            err(|o| o.controller = Some(ControllerKind::Fixed)).contains("--fixed-interval-ms")
        );
        assert!(
            err(|o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.fixed_interval_ms = Some(100);
            })
            .contains("--controller fixed only")
        );
        assert!(err(|o| o.critical = Some("1".into())).contains("--controller-max-interval-ms"));
        assert!(err(|o| o.controller_max_interval_ms = Some(500)).contains("--critical"));
        assert!(
            err(|o| {
                o.critical = Some("1".into());
                o.controller_max_interval_ms = Some(5);
            })
            .contains("at least 100")
        );
        for bad in ["50-1000", "100", "900-200", "100-20000", "a-b"] {
            let mut o = Opts {
                keyring: Some("k.toml".into()),
                nodes: Some("1".into()),
                controller_bounds_ms: Some(bad.into()),
                ..Opts::default()
            };
            o.controller = Some(ControllerKind::Qlearn);
            let e = Settings::load(&o.into()).unwrap_err().to_string();
            assert!(e.contains("MIN-MAX"), "{bad}: {e}");
        }
    }

    #[test]
    fn qlearn_steers_senders_and_its_table_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("state/controller.json");
        let s = settings(|o| {
            o.controller = Some(ControllerKind::Qlearn);
            o.controller_table = Some(table.clone());
            o.decision_ms = Some(2000);
        });
        let mut r = Rig::new(&s, &[1, 2, 3], 1000);
        let mut seen = std::collections::HashSet::new();
        r.run(30 * 60 * 1000, &[], |r| {
            seen.insert(r.interval(1));
        });
        // The controller moved the senders (the default 3 s target on a
        // calm network lets them slow down), only through ACKs.
        assert!(seen.len() > 1, "node 1 never changed interval: {seen:?}");
        for id in 1..=3 {
            let req = r.requested(id);
            assert!((100..=10_000).contains(&req), "{req}");
        }
        let row = node_row(&r.shared, 1).unwrap();
        let d = row.last_decision.expect("a decision for node 1");
        assert_eq!(d.policy, "qlearn");
        assert!(d.action.is_some() && d.reason.is_some(), "{d:?}");
        assert_eq!(d.interval_ms, r.requested(1));
        let snap = r.shared.core().policy.snapshot();
        assert_eq!(snap["controller"], "qlearn");
        let decisions = snap["decisions"].as_u64().unwrap();
        assert!(decisions > 3 * 100, "{decisions}");
        assert!(!snap["table"].as_array().unwrap().is_empty());

        // Shutdown saves (into a directory that did not exist); a new
        // monitor loads the same table.
        save_table(&r.shared, true);
        let before = r.shared.core().policy.table().unwrap().1;
        let again = make_policy(&s).unwrap();
        let after = again.table().unwrap().1;
        assert_eq!(after.decisions, decisions);
        assert_eq!(after.rows, before.rows);
        assert_eq!(again.snapshot()["decisions"], snap["decisions"]);

        // A reload that marks node 3 critical saves the running table
        // first, and the rebuilt controller goes on from everything learned
        // so far. One with another target cannot use that table: refused.
        r.run(60_000, &[], |_| {});
        let now = r.shared.core().policy.snapshot()["decisions"].clone();
        assert!(now.as_u64().unwrap() > decisions, "{now}");
        let with = |f: fn(&mut Opts)| {
            settings(|o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.controller_table = Some(table.clone());
                o.decision_ms = Some(2000);
                f(o)
            })
        };
        let critical = with(|o| {
            o.critical = Some("3".into());
            o.controller_max_interval_ms = Some(700);
        });
        assert!(s.policy_differs(&critical));
        let p = crate::monitor::rebuild_policy(&r.shared, &critical).unwrap();
        assert_eq!(p.snapshot()["decisions"], now);
        assert_eq!(p.snapshot()["critical_cap_ms"], 700);
        let retarget = with(|o| o.controller_target_ms = Some(2000.0));
        let e = crate::monitor::rebuild_policy(&r.shared, &retarget)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("detection target"), "{e:#}");
        // With the file removed (the way the message names), the new
        // target is taken with a fresh table: the reload no longer saves
        // the running table first, which put the file back every time.
        std::fs::remove_file(&table).unwrap();
        // The running policy's minute save, between the removal and the
        // reload, does not put it back.
        crate::monitor::save_table(&r.shared, false);
        assert!(!table.exists(), "the removed table was written back");
        let p = crate::monitor::rebuild_policy(&r.shared, &retarget).unwrap();
        assert_eq!(p.snapshot()["decisions"], 0);
        assert!(!table.exists());
        // The running table is handed over in memory: a reload keeps what
        // was learned even where the table cannot be written (it used to
        // go through the file, and start empty when the save failed).
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, "").unwrap();
        let unwritable = settings(|o| {
            o.controller = Some(ControllerKind::Qlearn);
            o.controller_table = Some(blocker.join("controller.json"));
            o.decision_ms = Some(2000);
            o.critical = Some("3".into());
            o.controller_max_interval_ms = Some(700);
        });
        let p = crate::monitor::rebuild_policy(&r.shared, &unwritable).unwrap();
        assert_eq!(p.snapshot()["decisions"], now);
        save_table(&r.shared, true);
        assert!(!table.exists(), "not even at exit");

        // A table that does not fit is refused in one clear line.
        let (_, running) = r.shared.core().policy.table().unwrap();
        running.save(&table).unwrap();
        let other = settings(|o| {
            o.controller = Some(ControllerKind::Qlearn);
            o.controller_table = Some(table.clone());
            o.controller_bounds_ms = Some("100-5000".into());
        });
        let e = format!("{:#}", make_policy(&other).err().unwrap());
        assert!(e.contains("interval levels") && !e.contains('\n'), "{e}");
        std::fs::write(&table, "{").unwrap();
        let e = format!("{:#}", make_policy(&s).err().unwrap());
        assert!(e.contains("not valid JSON"), "{e}");
    }

    /// What the minute save and a reload take under the core's lock is a
    /// copy of the table's numbers; describing and sorting its rows (the
    /// table file) comes after, without the lock. Built under it, a full
    /// table (every one of its 8,424 rows visited) held the tick off for
    /// 7 ms (35 ms on a loaded machine); the copy takes 0.1 ms. Timed
    /// against building the file, so that the build profile and the
    /// machine's load count alike.
    #[test]
    fn the_table_is_copied_under_the_lock_and_built_without_it() {
        use crate::controller::{Action, Config, StateKey, table};
        let mut ctrl = QController::new(Config::default()).unwrap();
        let levels = ctrl.grid().len();
        let full = table::TableFile {
            format: table::FORMAT.into(),
            version: table::VERSION,
            levels_ms: ctrl.grid().levels_ms.clone(),
            target_detection_ms: ctrl.config().target_detection_ms,
            decisions: 1,
            explorations: 0,
            rewards: Default::default(),
            rows: (0..StateKey::rows(levels))
                .map(|i| table::Row {
                    index: i as u32,
                    state: StateKey::from_index(i, levels).describe(ctrl.grid()),
                    visits: 1 + i as u64,
                    updates: [1, 0, 0],
                    q: [0.5, -(i as f64), 0.25],
                    greedy: Action::Slower,
                })
                .collect(),
        };
        assert_eq!(full.rows.len(), 8424);
        ctrl.load_table(&full).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = QLearnPolicy::wrap(ctrl, Some(dir.path().join("t.json")), None);
        let fastest = |f: &dyn Fn()| {
            (0..10)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed()
                })
                .min()
                .unwrap()
        };
        let locked = fastest(&|| drop(std::hint::black_box(p.table_to_save())));
        let built = fastest(&|| drop(std::hint::black_box(p.table())));
        assert!(
            locked * 5 < built,
            "the copy taken under the lock took {locked:?}, the file built of it {built:?}"
        );
        // The file built of the copy holds the whole table.
        assert_eq!(p.table().unwrap().1.rows.len(), full.rows.len());
    }

    /// A reload that points the controller at another table file which
    /// exists loads it (a table trained elsewhere, say), rather than
    /// carrying the running table there and overwriting it at the next
    /// save; one that points at a file not there yet carries the running
    /// table.
    #[test]
    fn a_reload_to_another_existing_table_file_loads_it() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| {
            let path = dir.path().join(name);
            settings(move |o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.controller_table = Some(path.clone());
                o.decision_ms = Some(1000);
            })
        };
        let s = at("a.json");
        let mut r = Rig::new(&s, &[1, 2, 3], 1000);
        r.run(10 * 60_000, &[], |_| {});
        let (_, mut trained) = r.shared.core().policy.table().unwrap();
        let running = trained.decisions;
        assert!(running > 7, "{running}");
        trained.decisions = 7;
        trained.save(&dir.path().join("b.json")).unwrap();
        let p = crate::monitor::rebuild_policy(&r.shared, &at("b.json")).unwrap();
        assert_eq!(p.snapshot()["decisions"], 7);
        let p = crate::monitor::rebuild_policy(&r.shared, &at("c.json")).unwrap();
        assert_eq!(p.snapshot()["decisions"], running);
    }

    /// `--decision-ms` no longer than `--tick-ms`: every tick is a gap of
    /// a decision period or more, which restarts the stagger's windows,
    /// and qlearn never decided (nor said so). Now each tick decides for
    /// every node.
    #[test]
    fn qlearn_decides_when_ticks_are_no_more_often_than_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let s = settings(move |o| {
            o.controller = Some(ControllerKind::Qlearn);
            o.controller_table = Some(path);
            o.decision_ms = Some(100);
        });
        let mut r = Rig::new(&s, &[1, 2], 1000);
        r.run(60_000, &[], |_| {});
        let decisions = r.shared.core().policy.snapshot()["decisions"]
            .as_u64()
            .unwrap();
        // Learning decisions (a node not heard from since its last one is
        // held, uncounted): none before.
        assert!(decisions > 0, "{decisions}");
        assert_ne!((r.interval(1), r.interval(2)), (1000, 1000), "steered");
    }

    /// README: a table file removed to learn afresh is not written back,
    /// neither every minute nor at exit; nor after a reload for another
    /// reason (a keyring push, a critical list), which carries the table
    /// on in memory: the restart with the new target the file was
    /// removed for would be refused again.
    #[test]
    fn a_removed_table_file_is_not_written_back_after_a_reload() {
        use crate::monitor::{apply_options, rebuild_policy, save_table};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let with = |target: Option<f64>| {
            let path = path.clone();
            settings(move |o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.controller_table = Some(path);
                o.decision_ms = Some(1000);
                o.controller_target_ms = target;
            })
        };
        let mut running = with(None);
        let mut r = Rig::new(&running, &[1, 2, 3], 1000);
        r.run(2 * 60_000, &[], |_| {});
        save_table(&r.shared, false);
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
        save_table(&r.shared, false);
        assert!(!path.exists(), "the minute save");
        let new = with(None);
        let p = rebuild_policy(&r.shared, &new).unwrap();
        apply_options(&r.shared, &mut running, &new, Some(p), false);
        r.run(10_000, &[], |_| {});
        save_table(&r.shared, false);
        assert!(!path.exists(), "the minute save after a reload");
        save_table(&r.shared, true);
        assert!(!path.exists(), "the save at exit");
        // So the restart with the new target starts afresh.
        make_policy(&with(Some(5000.0))).unwrap();
        // A table never saved yet is saved after a reload all the same.
        let path2 = dir.path().join("u.json");
        let fresh = |path: PathBuf| {
            settings(move |o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.controller_table = Some(path);
                o.decision_ms = Some(1000);
            })
        };
        let mut running = fresh(path2.clone());
        let mut r = Rig::new(&running, &[1], 1000);
        r.run(10_000, &[], |_| {});
        let new = fresh(path2.clone());
        let p = rebuild_policy(&r.shared, &new).unwrap();
        apply_options(&r.shared, &mut running, &new, Some(p), false);
        save_table(&r.shared, false);
        assert!(path2.exists());
    }

    /// What the running controller learns while a reload derives keys
    /// (its fleet part, without the core's lock) is not lost when the
    /// rebuilt policy is installed.
    #[test]
    fn a_reload_keeps_what_was_learned_while_it_ran() {
        use crate::monitor::{apply_options, rebuild_policy};
        let dir = tempfile::tempdir().unwrap();
        let with = |critical: bool| {
            let path = dir.path().join("t.json");
            settings(move |o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.controller_table = Some(path.clone());
                o.decision_ms = Some(1000);
                if critical {
                    o.critical = Some("3".into());
                    o.controller_max_interval_ms = Some(700);
                }
            })
        };
        let mut running = with(false);
        let mut r = Rig::new(&running, &[1, 2, 3], 1000);
        r.run(5 * 60_000, &[], |_| {});
        let new = with(true);
        let p = rebuild_policy(&r.shared, &new).unwrap();
        let built = p.snapshot()["decisions"].as_u64().unwrap();
        // The fleet's part of the reload, meanwhile.
        r.run(60_000, &[], |_| {});
        let meanwhile = r.shared.core().policy.snapshot()["decisions"]
            .as_u64()
            .unwrap();
        assert!(meanwhile > built, "{meanwhile} > {built}");
        apply_options(&r.shared, &mut running, &new, Some(p), false);
        let snap = r.shared.core().policy.snapshot();
        assert_eq!(snap["decisions"].as_u64().unwrap(), meanwhile);
        assert_eq!(snap["critical_cap_ms"], 700);
    }

    /// A node newly marked critical at a reload under qlearn: its standing
    /// request over the cap is lowered at the reload itself, not at its
    /// first decision up to a period later, and `/nodes` shows it as a
    /// decision (reason `cap`). Nodes within the cap, and the others,
    /// keep theirs until their decisions.
    #[test]
    fn a_node_marked_critical_at_a_reload_is_capped_at_once() {
        use crate::monitor::{apply_options, rebuild_policy};
        let dir = tempfile::tempdir().unwrap();
        let with = |critical: Option<&str>| {
            let path = dir.path().join("t.json");
            let critical = critical.map(str::to_owned);
            settings(move |o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.controller_table = Some(path.clone());
                o.decision_ms = Some(5000);
                if critical.is_some() {
                    o.critical = critical;
                    o.controller_max_interval_ms = Some(700);
                }
            })
        };
        let mut running = with(None);
        let mut r = Rig::new(&running, &[1, 2, 3], 1000);
        r.run(60_000, &[], |_| {});
        let before = [1, 2, 3].map(|id| r.requested(id));
        assert!(before[0] > 700 && before[2] > 700, "{before:?}");

        let new = with(Some("1,2"));
        let p = rebuild_policy(&r.shared, &new).unwrap();
        apply_options(&r.shared, &mut running, &new, Some(p), false);
        // Before any tick.
        assert_eq!(r.requested(1), 700);
        assert_eq!(r.requested(2), before[1].min(700));
        assert_eq!(r.requested(3), before[2], "not critical");
        let d = node_row(&r.shared, 1).unwrap().last_decision.unwrap();
        assert_eq!(
            (
                d.interval_ms,
                d.reason.as_deref(),
                d.action.as_deref(),
                d.policy.as_str()
            ),
            (700, Some("cap"), Some("faster"), "qlearn"),
        );
        // And from there on.
        r.run(30_000, &[], |r| {
            assert!(r.requested(1) <= 700 && r.requested(2) <= 700);
        });
        assert!(r.interval(1) <= 700);

        // A monitor started over the pinned maps with node 3 now critical
        // takes its request over the same way.
        assert!(r.requested(3) > 700);
        let now = r.now;
        let mut core = r.shared.core();
        core.policy = make_policy(&with(Some("1-3"))).unwrap();
        core.reconcile_requests(&*r.shared.dp, now);
        assert_eq!(
            core.table.decision(core.table.slot_of(3).unwrap()),
            (700, now)
        );
        drop(core);
        assert_eq!(r.requested(3), 700);
    }

    #[test]
    fn critical_nodes_never_exceed_their_cap() {
        let dir = tempfile::tempdir().unwrap();
        // qlearn exploring all the time: random actions everywhere, the
        // cap must hold anyway.
        let s = settings(|o| {
            o.controller = Some(ControllerKind::Qlearn);
            o.controller_table = Some(dir.path().join("t.json"));
            o.critical = Some("1".into());
            o.controller_max_interval_ms = Some(300);
            o.decision_ms = Some(1000);
        });
        let mut r = Rig::new(&s, &[1, 2], 1000);
        let mut max2 = 0;
        let mut capped_at = None;
        r.run(20 * 60 * 1000, &[], |r| {
            let req = r.requested(1);
            if req != 0 {
                assert!(req <= 300, "critical node asked for {req} ms");
                capped_at.get_or_insert(r.now);
            }
            max2 = max2.max(r.requested(2));
        });
        assert!(capped_at.is_some());
        assert!(r.interval(1) <= 300, "sender at {}", r.interval(1));
        assert!(max2 > 300, "the other node is not capped ({max2})");

        // Under a fixed interval, and with no controller at all.
        for (kind, fixed) in [
            (ControllerKind::Fixed, Some(1000)),
            (ControllerKind::Off, None),
        ] {
            let s = settings(|o| {
                o.controller = Some(kind);
                o.fixed_interval_ms = fixed;
                o.critical = Some("1".into());
                o.controller_max_interval_ms = Some(300);
            });
            let mut r = Rig::new(&s, &[1, 2], 1000);
            r.run(10_000, &[], |_| {});
            assert_eq!(r.requested(1), 300, "{kind:?}");
            assert_eq!(r.interval(1), 300, "{kind:?}");
            assert_eq!(r.requested(2), fixed.unwrap_or(0), "{kind:?}");
            assert_eq!(r.interval(2), 1000, "{kind:?}");
            // `/nodes` says why node 1 is asked for 300 ms.
            let d = node_row(&r.shared, 1).unwrap().last_decision.unwrap();
            assert_eq!(
                (d.interval_ms, d.reason.as_deref()),
                (300, Some("critical node: capped at 300 ms")),
                "{kind:?}"
            );
            if let Some(ms) = fixed {
                let d = node_row(&r.shared, 2).unwrap().last_decision.unwrap();
                assert_eq!(d.reason, Some(format!("fixed interval {ms} ms")));
            }
        }
    }

    #[test]
    fn under_off_a_cap_follows_the_interval_the_node_reports() {
        // Node 1 is critical (cap 1000) but runs faster of its own accord;
        // node 2 carries a request of an earlier policy.
        let s = settings(|o| {
            o.controller = Some(ControllerKind::Off);
            o.critical = Some("1".into());
            o.controller_max_interval_ms = Some(1000);
        });
        let mut p = make_policy(&s).unwrap();
        let view = |node_id, requested_interval_ms| NodeView {
            node_id,
            status: crate::monitor::state::Status::Alive,
            phi: 0.0,
            requested_interval_ms,
            now_ns: 1,
        };
        let at = |ms| NodeState {
            interval_ms: ms,
            ..NodeState::default()
        };
        // Below its cap: nothing to ask (it was pinned at its first
        // interval, 200 here, for good).
        assert_eq!(p.decide(0, &view(1, 0), &at(200)), None);
        // Restarted slower than the cap: capped.
        assert_eq!(p.decide(0, &view(1, 0), &at(5000)), Some(1000));
        assert_eq!(p.decide(0, &view(1, 1000), &at(1000)), None);
        // Restarted faster again: the cap is withdrawn.
        assert_eq!(p.decide(0, &view(1, 1000), &at(500)), Some(0));
        // Not critical: an earlier policy's request is withdrawn.
        assert_eq!(p.decide(1, &view(2, 3000), &at(3000)), Some(0));
        assert_eq!(p.decide(1, &view(2, 0), &at(3000)), None);
    }

    /// Records what the tick tells a policy.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Recorded>>);

    /// (decision time, slot) of every decision; slots of every refuted
    /// suspicion.
    type Recorded = (Vec<(u64, u32)>, Vec<u32>);

    impl IntervalPolicy for Recorder {
        fn decide(&mut self, slot: u32, node: &NodeView, _: &NodeState) -> Option<u32> {
            self.0.lock().unwrap().0.push((node.now_ns, slot));
            None
        }
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn staggered(&self) -> bool {
            true
        }
        fn suspicion_refuted(&mut self, slot: u32) {
            self.0.lock().unwrap().1.push(slot);
        }
    }

    #[test]
    fn staggered_decisions_take_each_node_once_per_period() {
        let s = settings(|o| o.decision_ms = Some(1000));
        let rec = Recorder::default();
        let ids: Vec<u32> = (1..=300).collect();
        let mut r = Rig::new(&s, &ids, 100);
        r.shared.core().policy = Box::new(rec.clone());
        r.run(10_000, &[], |_| {});
        let (decided, _) = rec.0.lock().unwrap().clone();
        // Every node once per period from the first tick on (the first
        // decision within the first period), and no tick for more than a
        // fair share.
        let mut per_slot = vec![0u32; 300];
        let mut last = vec![None::<u64>; 300];
        let mut per_tick = std::collections::HashMap::<u64, u32>::new();
        for (t, slot) in &decided {
            let i = *slot as usize;
            per_slot[i] += 1;
            *per_tick.entry(*t).or_default() += 1;
            if let Some(prev) = last[i] {
                // One tick (100 ms) of slack in a 1 s period.
                assert!(
                    *t - prev >= 900 * MS,
                    "slot {slot} decided {} ms apart",
                    (*t - prev) / MS
                );
            }
            last[i] = Some(*t);
        }
        // 10 s of ticks: 9 or 10 periods.
        assert!(
            per_slot.iter().all(|n| (9..=10).contains(n)),
            "{per_slot:?}"
        );
        assert!(per_tick.values().all(|n| *n <= 60), "{per_tick:?}");
    }

    #[test]
    fn refuted_suspicions_reach_the_policy() {
        let s = settings(|o| o.decision_ms = Some(1000));
        let rec = Recorder::default();
        let mut r = Rig::new(&s, &[1, 2], 100);
        r.shared.core().policy = Box::new(rec.clone());
        r.run(3000, &[], |_| {});
        // Node 2 goes quiet for 1 s (suspected, even dead), then beats
        // again in the same incarnation: one refuted suspicion.
        r.run(1000, &[2], |_| {});
        r.run(2000, &[], |_| {});
        let (_, refuted) = rec.0.lock().unwrap().clone();
        let slot2 = r.shared.core().table.slot_of(2).unwrap();
        assert_eq!(refuted, vec![slot2]);
    }

    #[test]
    fn a_reload_replaces_the_policy_which_takes_over_or_withdraws_the_requests() {
        use crate::monitor::{apply_acks, apply_options};
        let fixed = |ms| settings(|o| o.fixed_interval_ms = Some(ms));
        let s500 = fixed(500);
        let mut rig = Rig::new(&s500, &[1, 2], 1000);
        rig.run(3000, &[], |_| {});
        assert_eq!((rig.requested(1), rig.interval(1)), (500, 500));

        // Nothing changed: nothing is rebuilt or touched.
        let mut running = s500.clone();
        assert!(!running.policy_differs(&fixed(500)));
        assert!(!apply_acks(&rig.shared, &running, &fixed(500)).unwrap());
        assert!(apply_options(&rig.shared, &mut running, &fixed(500), None, false).is_empty());
        assert_eq!(rig.requested(1), 500);

        // Another interval: the new policy takes the requests over (the
        // table knows them) and asks for its own on the next tick; the
        // senders follow.
        let s2000 = fixed(2000);
        assert!(running.policy_differs(&s2000) && running.restart_only_changes(&s2000).is_empty());
        let p = make_policy(&s2000).unwrap();
        assert_eq!(
            apply_options(&rig.shared, &mut running, &s2000, Some(p), false),
            ["controller"]
        );
        assert_eq!((rig.requested(1), rig.requested(2)), (500, 500));
        let slot1 = rig.shared.core().table.slot_of(1).unwrap() as usize;
        assert_eq!(rig.shared.core().table.requested_ms[slot1], 500);
        assert_eq!(running.fixed_interval_ms, Some(2000));
        rig.run(100, &[], |_| {});
        assert_eq!((rig.requested(1), rig.requested(2)), (2000, 2000));
        rig.run(5000, &[], |_| {});
        assert_eq!((rig.interval(1), rig.interval(2)), (2000, 2000));

        // Off: no request is left in the gate, none is made again, and no
        // one is suspected for slowing down (the detector is untouched).
        // Off also turns the ACKs off (none was asked for): the gate's
        // configuration is written first, the rest after the fleet's part.
        let off = settings(|_| {});
        assert_eq!(rig.mem.config().ack_on_change, 1);
        assert!(apply_acks(&rig.shared, &running, &off).unwrap());
        let cfg = rig.mem.config();
        assert_eq!(
            (cfg.ack_every, cfg.ack_on_change, cfg.port),
            (0, 0, s500.port)
        );
        let p = make_policy(&off).unwrap();
        assert_eq!(
            apply_options(&rig.shared, &mut running, &off, Some(p), true),
            ["controller", "acks"]
        );
        assert_eq!((running.ack_every, running.ack_on_change), (0, false));
        rig.run(5000, &[], |r| {
            assert_eq!((r.requested(1), r.requested(2)), (0, 0));
        });
        assert_eq!(running.controller.kind, ControllerKind::Off);
        let core = rig.shared.core();
        assert_eq!(core.policy.name(), "off");
        assert_eq!(core.table.counts[Status::Alive as usize], 2);
    }

    #[test]
    fn qlearn_goes_on_from_the_requests_it_finds_at_start_and_at_a_reload() {
        use crate::monitor::apply_options;
        let dir = tempfile::tempdir().unwrap();
        let q = |decision_ms| {
            settings(|o| {
                o.controller = Some(ControllerKind::Qlearn);
                o.controller_table = Some(dir.path().join("controller.json"));
                o.decision_ms = Some(decision_ms);
            })
        };
        let s = q(2000);
        // Senders at 700 ms, as asked by an earlier run whose requests
        // the pinned maps kept.
        let mut rig = Rig::new(&s, &[1, 2], 700);
        for id in [1, 2] {
            let slot = rig.shared.core().table.slot_of(id).unwrap();
            rig.shared.dp.set_requested_interval(slot, 700);
        }
        let now = rig.now;
        rig.shared.core().reconcile_requests(&*rig.shared.dp, now);
        assert_eq!((rig.requested(1), rig.requested(2)), (700, 700));
        let start = rig.shared.core().policy.snapshot()["start_interval_ms"].clone();
        assert_eq!(start, 1500, "the default target's start level");

        // Each node's decision went on from the request it had (`was`),
        // one level at most, not to the start level of a node nobody has
        // asked anything.
        let went_on_from = |r: &Rig, was: [u32; 2]| {
            let levels = [300, 500, 700, 1000, 1500];
            for (id, was) in [1, 2].into_iter().zip(was) {
                let d = node_row(&r.shared, id).unwrap().last_decision.unwrap();
                assert_ne!(d.reason.as_deref(), Some("start"), "node {id}: {d:?}");
                let at = levels.iter().position(|&l| l == was).unwrap();
                assert!(
                    levels[at - 1..=at + 1].contains(&r.requested(id)),
                    "node {id} from {was}: {d:?}"
                );
            }
        };
        rig.run(2100, &[], |_| {});
        went_on_from(&rig, [700, 700]);

        // A reload with another decision period rebuilds the controller
        // (no memory of the nodes): it too goes on from where they run.
        let now = [1, 2].map(|id| rig.requested(id));
        let mut running = s.clone();
        let s3000 = q(3000);
        assert!(running.policy_differs(&s3000));
        let p = crate::monitor::rebuild_policy(&rig.shared, &s3000).unwrap();
        assert_eq!(
            apply_options(&rig.shared, &mut running, &s3000, Some(p), false),
            ["controller"]
        );
        assert_eq!([1, 2].map(|id| rig.requested(id)), now);
        rig.run(3100, &[], |_| {});
        went_on_from(&rig, now);
    }

    #[test]
    fn a_reload_applies_new_thresholds_and_names_what_needs_a_restart() {
        use crate::monitor::apply_options;
        let s = settings(|_| {});
        let rig = Rig::new(&s, &[1], 1000);
        let mut running = s.clone();
        let new = settings(|o| {
            o.suspect_phi = Some(9.5);
            o.tick_ms = Some(50);
            o.port = Some(7999);
        });
        assert!(running.detector_differs(&new) && !running.policy_differs(&new));
        assert_eq!(
            apply_options(&rig.shared, &mut running, &new, None, false),
            ["detector"]
        );
        assert_eq!(rig.shared.core().detector.thresholds.suspect_phi, 9.5);
        assert_eq!(running.thresholds.suspect_phi, 9.5);
        // Options bound at start stay as they are, and are named.
        assert_eq!(running.restart_only_changes(&new), ["port", "tick_ms"]);
        assert_eq!((running.port, running.tick), (s.port, s.tick));
    }
}

//! The operator's HTTP interface on `--listen`: `GET /metrics`
//! (Prometheus text), `GET /nodes` (JSON array, `?state=dead` filters),
//! `GET /nodes/{id}` (404 if the node is not provisioned), `GET /healthz`
//! (200 when the dataplane is attached and readable and the tick runs,
//! 503 with the reason otherwise), `GET /controller` (the interval
//! policy: with `--controller qlearn` its configuration, epsilon, reward
//! statistics and every visited row of the Q table with its visits).
//!
//! Everything is read live: a request takes the core's lock once and reads
//! the dataplane's state of the nodes it returns, like a tick does.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hb_common::maps::NodeState;
use serde::{Deserialize, Serialize};

use super::{metrics::Metrics, state::Status, table::Origin, tick::Core, userspace::monotonic_ns};
use crate::dataplane::Dataplane;

/// State shared by the tick, the API and the lifecycle tasks.
pub struct Shared {
    pub core: Mutex<Core>,
    pub dp: Arc<dyn Dataplane>,
    pub metrics: Arc<Metrics>,
    /// CLOCK_MONOTONIC ns of the last completed tick (0 = none yet).
    pub last_tick_ns: AtomicU64,
    /// The last tick could read the dataplane's counters.
    pub dataplane_ok: AtomicBool,
    pub tick: Duration,
}

impl Shared {
    pub fn core(&self) -> MutexGuard<'_, Core> {
        // A panic in a tick must not take the API down with it.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The interval decision last made for a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub interval_ms: u32,
    /// How long ago, ms.
    pub ago_ms: u64,
    pub policy: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The controller's action (`slower`, `hold`, `faster`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub action: Option<String>,
    /// Reward of the period the decision ended (qlearn).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward: Option<f64>,
    /// Modelled worst-case detection time of that period, ms (qlearn).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detection_ms: Option<f64>,
    /// Modelled share of crashes detected later than the target in that
    /// period (qlearn; its p99 goal keeps the average at or below 0.01).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub late_share: Option<f64>,
}

/// One row of `GET /nodes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub node_id: u32,
    pub state: String,
    pub phi: f64,
    pub generation: u32,
    pub accepted: u64,
    /// Time since the last accepted heartbeat, ms (none: never heard from).
    pub last_seen_ms: Option<u64>,
    /// Interval the node reports using, ms.
    pub interval_ms: u32,
    /// Interval the monitor asks for, ms (0 = no opinion).
    pub requested_interval_ms: u32,
    /// Learned inter-arrival mean, ms.
    pub mean_interarrival_ms: f64,
    pub lost: u64,
    pub restarts: u32,
    pub rtt_us: u32,
    /// Reported load, permille.
    pub load: u16,
    pub bad_tag: u32,
    pub replay: u32,
    pub stale: u32,
    pub acks_sent: u32,
    pub leaving: bool,
    /// Time in the current state, ms.
    pub state_for_ms: u64,
    pub origin: String,
    pub slot: u32,
    pub last_decision: Option<Decision>,
}

fn row(core: &Core, slot: u32, st: &NodeState, now_ns: u64) -> NodeRow {
    let t = &core.table;
    let track = t.track(slot);
    let (req, decided) = t.decision(slot);
    let origin = match t.origin(slot) {
        Origin::Configured => "configured",
        Origin::Enrolled => "enrolled",
        Origin::Adopted => "adopted",
    };
    let phi = core
        .detector
        .phi_since(st, now_ns, core.listening_since_ns());
    NodeRow {
        node_id: t.node_id[slot as usize],
        state: track.status.name().to_owned(),
        phi: if phi.is_finite() { phi } else { f64::MAX },
        generation: st.generation,
        accepted: st.accepted,
        last_seen_ms: (st.last_arrival_ns != 0)
            .then(|| now_ns.saturating_sub(st.last_arrival_ns) / 1_000_000),
        interval_ms: st.interval_ms,
        requested_interval_ms: st.requested_interval_ms,
        mean_interarrival_ms: st.ia_mean_ns as f64 / 1e6,
        lost: st.lost,
        restarts: st.restarts,
        rtt_us: st.rtt_us,
        load: st.load,
        bad_tag: st.bad_tag,
        replay: st.replay,
        stale: st.stale,
        acks_sent: st.acks_sent,
        leaving: st.leaving(),
        state_for_ms: now_ns.saturating_sub(t.since_ns(slot)) / 1_000_000,
        origin: origin.to_owned(),
        slot,
        last_decision: match core.policy.decision(slot) {
            Some(d) => Some(Decision {
                interval_ms: d.interval_ms,
                ago_ms: now_ns.saturating_sub(d.at_ns) / 1_000_000,
                policy: core.policy.name().to_owned(),
                reason: Some(d.reason),
                action: d.action,
                reward: d.reward.filter(|r| r.is_finite()),
                detection_ms: d.detection_ms.filter(|r| r.is_finite()),
                late_share: d.late_share.filter(|r| r.is_finite()),
            }),
            None => (decided != 0).then(|| Decision {
                interval_ms: req,
                ago_ms: now_ns.saturating_sub(decided) / 1_000_000,
                policy: core.policy.name().to_owned(),
                reason: core.policy.reason(slot),
                action: None,
                reward: None,
                detection_ms: None,
                late_share: None,
            }),
        },
    }
}

/// Slots per lock hold when listing nodes: a listing of a million nodes
/// must not hold the tick off for its whole duration.
const ROWS_CHUNK: u32 = 16 * 1024;

/// Rows of every node (optionally only those in `state`), by node id.
/// Each chunk of slots is consistent; a reload running concurrently may
/// show a node in both its old and new state, never a wrong one.
pub fn rows(shared: &Shared, state: Option<Status>) -> Vec<NodeRow> {
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let core = shared.core();
        let len = core.table.len();
        if start >= len {
            break;
        }
        let end = start.saturating_add(ROWS_CHUNK).min(len);
        let now = monotonic_ns();
        shared.dp.read_states(start..end, &mut |slot, st| {
            let i = slot as usize;
            if core.table.node_id[i] == 0 {
                return;
            }
            if state.is_some_and(|s| core.table.track[i].status != s) {
                return;
            }
            out.push(row(&core, slot, st, now));
        });
        drop(core);
        start = end;
    }
    out.sort_unstable_by_key(|r| r.node_id);
    out.dedup_by_key(|r| r.node_id);
    out
}

/// The row of one node, if provisioned.
pub fn node_row(shared: &Shared, node_id: u32) -> Option<NodeRow> {
    let core = shared.core();
    let slot = core.table.slot_of(node_id)?;
    let now = monotonic_ns();
    let mut out = None;
    shared.dp.read_states(slot..slot + 1, &mut |slot, st| {
        out = Some(row(&core, slot, st, now));
    });
    // Provisioned but not in the state array yet: a blank state.
    out.or_else(|| Some(row(&core, slot, &NodeState::default(), now)))
}

#[derive(Deserialize)]
struct NodesQuery {
    state: Option<String>,
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn nodes(State(s): State<Arc<Shared>>, Query(q): Query<NodesQuery>) -> Response {
    let filter = match q.state.as_deref() {
        None | Some("") => None,
        Some(name) => match Status::from_name(name) {
            Some(st) => Some(st),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown state {name:?}: one of unknown, alive, suspect, dead, left\n"),
                )
                    .into_response();
            }
        },
    };
    let s2 = s.clone();
    match tokio::task::spawn_blocking(move || rows(&s2, filter)).await {
        Ok(r) => Json(r).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn node(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u32>() else {
        return (StatusCode::BAD_REQUEST, format!("not a node id: {id:?}\n")).into_response();
    };
    // The core's lock waits for a tick (~10 ms at a million nodes): not on
    // a runtime worker, which the userspace gate's sockets share.
    match tokio::task::spawn_blocking(move || node_row(&s, id)).await {
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("node {id} is not provisioned\n"),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn controller(State(s): State<Arc<Shared>>) -> Response {
    let s2 = s.clone();
    match tokio::task::spawn_blocking(move || s2.core().policy.snapshot()).await {
        Ok(v) => Json(v).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Why the monitor is not healthy, if it is not.
pub fn unhealthy(s: &Shared) -> Option<String> {
    let last = s.last_tick_ns.load(Ordering::Relaxed);
    if last == 0 {
        return Some("no tick completed yet".into());
    }
    if !s.dataplane_ok.load(Ordering::Relaxed) {
        return Some("dataplane not readable".into());
    }
    if let Err(why) = s.dp.check_attached() {
        return Some(why);
    }
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(last));
    let limit = (s.tick * 5).max(Duration::from_secs(2));
    if age > limit {
        return Some(format!("last tick {} ms ago", age.as_millis()));
    }
    None
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    match unhealthy(&s) {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/nodes", get(nodes))
        .route("/nodes/{id}", get(node))
        .route("/healthz", get(healthz))
        .route("/controller", get(controller))
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use hb_common::{NodeKey, maps::NodeKeys};

    use super::*;
    use crate::{
        dataplane::mem::MemDataplane,
        detector::PhiParams,
        monitor::{policy::FixedPolicy, state::Thresholds, tick::Detector},
    };

    #[test]
    fn listing_spans_chunks_and_filters() {
        let dp = Arc::new(MemDataplane::new());
        let mut core = Core::new(
            Detector::new(Thresholds::default(), PhiParams::default()),
            Box::new(FixedPolicy::none()),
            1000,
        );
        let n = 2 * ROWS_CHUNK + 5;
        // Ids in reverse slot order: the listing sorts by id.
        for id in (1..=n).rev() {
            let slot = core.table.insert(id, Origin::Configured, 0).unwrap();
            let keys = NodeKeys::single(slot, 1, NodeKey::default());
            dp.upsert_node(id, &keys).unwrap();
        }
        core.table.remove(7);
        let shared = Shared {
            core: Mutex::new(core),
            dp,
            metrics: Arc::new(Metrics::new()),
            last_tick_ns: AtomicU64::new(0),
            dataplane_ok: AtomicBool::new(false),
            tick: Duration::from_millis(100),
        };
        let all = rows(&shared, None);
        assert_eq!(all.len() as u32, n - 1);
        assert!(all.windows(2).all(|w| w[0].node_id < w[1].node_id));
        assert!(all.iter().all(|r| r.node_id != 7 && r.state == "unknown"));
        assert!(rows(&shared, Some(Status::Alive)).is_empty());
        assert!(node_row(&shared, 7).is_none());
        assert_eq!(node_row(&shared, 8).unwrap().node_id, 8);
        assert_eq!(unhealthy(&shared).as_deref(), Some("no tick completed yet"));
    }
}

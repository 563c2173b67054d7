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
//! `GET /controller` holds it only to copy the table's numbers; the
//! document is made of the copy after.
//!
//! `GET /nodes` is the one answer that grows with the fleet (~390 bytes a
//! node): it is streamed, one chunk of nodes at a time, so a listing holds
//! about one chunk in memory however large the fleet, and at most
//! [`LISTINGS`] run at once (another is told to retry). A listing stops as
//! soon as its client goes away, stops reading for [`STALL`] or has taken
//! [`LISTING_MAX`] over it; one that
//! fails midway aborts the connection, so no client can take the part it
//! got for the whole table.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{FromRef, Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hb_common::maps::NodeState;
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use tokio::{
    runtime::Handle,
    sync::{Semaphore, mpsc},
};

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
    /// Key epoch of the newest accepted heartbeat (none: nothing recorded,
    /// as for a node last heard from by an older hb): during a rotation,
    /// which nodes still send the old epoch.
    #[serde(default)]
    pub key_epoch: Option<u8>,
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
        key_epoch: st.accepted_epoch(),
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

/// Nodes per lock hold when listing nodes: a listing of a million nodes
/// must not hold the tick off for its whole duration. It is also about
/// what a listing holds in memory: the rows of one chunk.
const ROWS_CHUNK: usize = 16 * 1024;

/// Bytes of JSON per body frame of a listing (a frame ends with the row
/// that reaches this).
const FRAME_BYTES: usize = 64 * 1024;

/// Frames a listing may have ready before its client takes them.
const FRAMES_AHEAD: usize = 4;

/// Listings of `GET /nodes` served at once; another is answered 503 at
/// once. Each holds a blocking thread, its nodes' ids (8 bytes a node) and
/// the rows of one chunk until its client has the whole table.
const LISTINGS: usize = 2;

/// A listing whose client takes no frame for this long is given up (its
/// client sees the body cut short), so that clients which stopped reading
/// (`curl | less`, a hung dashboard) do not keep the listings taken.
const STALL: Duration = Duration::from_secs(30);

/// The longest a listing may take, however steadily its client reads: one
/// that takes a frame every 29 s (never stalled) held a listing for days
/// at a million nodes, and two of them every listing. A million nodes,
/// about 400 MB of JSON, take seconds on a host's own link and under
/// 10 minutes over 10 Mbit/s.
const LISTING_MAX: Duration = Duration::from_secs(600);

/// Why a listing stopped before its end.
#[derive(Debug)]
enum Stop {
    /// The client went away: nobody reads the listing any more.
    Gone,
    /// The client took no frame for [`STALL`].
    Stalled,
    /// The listing took longer than [`LISTING_MAX`].
    Overran,
    Failed(ListingError),
}

/// Why a listing failed: its client gets a 500 if nothing was sent yet,
/// else a body cut short (hyper aborts the connection).
#[derive(Debug, thiserror::Error)]
enum ListingError {
    #[error("cannot serialize the row of node {node_id}: {source}")]
    Serialize {
        node_id: u32,
        source: serde_json::Error,
    },
    #[error("the node listing stopped before its end (see the monitor's log)")]
    Cut,
}

/// The nodes a listing shows (only those in `state` if given), as (node
/// id, slot) by node id: 8 bytes a node, read a chunk of slots per lock
/// hold. A node that a reload moves during the scan may be found twice:
/// it is kept once, and its row is read later from wherever it is then.
fn listed_ids(shared: &Shared, state: Option<Status>, chunk: usize) -> Vec<(u32, u32)> {
    let mut ids = Vec::new();
    let mut start = 0;
    loop {
        let core = shared.core();
        let t = &core.table;
        let len = t.node_id.len();
        if start >= len {
            break;
        }
        if start == 0 && state.is_none() {
            ids.reserve(t.nodes());
        }
        let end = start.saturating_add(chunk).min(len);
        ids.extend(
            (start..end)
                .filter(|&i| t.node_id[i] != 0 && state.is_none_or(|s| t.track[i].status == s))
                .map(|i| (t.node_id[i], i as u32)),
        );
        drop(core);
        start = end;
    }
    ids.sort_unstable();
    ids.dedup_by_key(|(id, _)| *id);
    ids
}

/// Writes the listing, the JSON array of the rows of [`listed_ids`] by
/// node id, to `send` in frames of about [`FRAME_BYTES`]; returns the
/// frames sent. The rows of each chunk of `chunk` nodes are read under one
/// hold of the core's lock, consistent with each other, each from its
/// node's slot at that time: a node removed since the ids were taken is
/// left out, one added since is not listed, none is listed twice. The
/// lock is not held while serializing or sending.
///
/// Stops at the first frame `send` refuses. The document is complete only
/// if this returns `Ok`: the last frame sent then ends the array.
fn write_listing(
    shared: &Shared,
    state: Option<Status>,
    chunk: usize,
    send: &mut dyn FnMut(Bytes) -> Result<(), Stop>,
) -> Result<usize, Stop> {
    let ids = listed_ids(shared, state, chunk);
    let mut rows = Vec::with_capacity(chunk.min(ids.len()));
    let mut frame = Vec::with_capacity(FRAME_BYTES + 1024);
    let (mut frames, mut listed) = (0, 0usize);
    frame.push(b'[');
    for ids in ids.chunks(chunk) {
        let core = shared.core();
        let (t, now) = (&core.table, monotonic_ns());
        for &(node_id, slot) in ids {
            let slot = if t.node_id.get(slot as usize) == Some(&node_id) {
                slot
            } else {
                match t.slot_of(node_id) {
                    Some(slot) => slot,
                    None => continue,
                }
            };
            if state.is_some_and(|s| t.track[slot as usize].status != s) {
                continue;
            }
            shared.dp.read_states(slot..slot + 1, &mut |slot, st| {
                rows.push(row(&core, slot, st, now));
            });
        }
        drop(core);
        for r in rows.drain(..) {
            if listed > 0 {
                frame.push(b',');
            }
            listed += 1;
            serde_json::to_writer(&mut frame, &r).map_err(|source| {
                Stop::Failed(ListingError::Serialize {
                    node_id: r.node_id,
                    source,
                })
            })?;
            if frame.len() >= FRAME_BYTES {
                let full = std::mem::replace(&mut frame, Vec::with_capacity(FRAME_BYTES + 1024));
                send(full.into())?;
                frames += 1;
            }
        }
    }
    frame.push(b']');
    send(frame.into())?;
    Ok(frames + 1)
}

/// The row of one node, if provisioned.
pub fn node_row(shared: &Shared, node_id: u32) -> Result<NodeRow, NoRow> {
    let core = shared.core();
    let slot = core.table.slot_of(node_id).ok_or(NoRow::Unknown)?;
    let now = monotonic_ns();
    let mut out = None;
    let stuck = shared.dp.stuck_reads();
    shared.dp.read_states(slot..slot + 1, &mut |slot, st| {
        out = Some(row(&core, slot, st, now));
    });
    match out {
        Some(r) => Ok(r),
        // Held by a writer that died (see `hb_dataplane_stuck_reads_total`):
        // a blank state would read as a node never heard from.
        None if shared.dp.stuck_reads() != stuck => Err(NoRow::Unreadable),
        // Provisioned but not in the state array yet: a blank state.
        None => Ok(row(&core, slot, &NodeState::default(), now)),
    }
}

/// Why [`node_row`] has no row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRow {
    /// Not provisioned.
    Unknown,
    /// Its state could not be read (held for writing by a monitor that
    /// was killed mid-write; released at the next start).
    Unreadable,
}

/// A piece of a listing on its way from its producer to its client.
enum Piece {
    Data(Bytes),
    /// The document is complete.
    End,
}

/// A listing's producer, on a blocking thread: [`write_listing`] into
/// `tx`, then [`Piece::End`] if it got to the end. Returns the frames it
/// offered (the last one refused if it stopped) and why it stopped, if it
/// did; logs that.
fn produce(
    shared: &Shared,
    state: Option<Status>,
    chunk: usize,
    tx: &mpsc::Sender<Piece>,
    rt: &Handle,
) -> (usize, Result<(), Stop>) {
    produce_within(shared, state, chunk, tx, rt, STALL, LISTING_MAX)
}

/// [`produce`] with other bounds (tests).
fn produce_within(
    shared: &Shared,
    state: Option<Status>,
    chunk: usize,
    tx: &mpsc::Sender<Piece>,
    rt: &Handle,
    stall: Duration,
    max: Duration,
) -> (usize, Result<(), Stop>) {
    let deadline = std::time::Instant::now() + max;
    let send = |piece| {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rt.block_on(tokio::time::timeout(stall.min(left), tx.send(piece))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) if left <= stall => Err(Stop::Overran),
            Err(_) => Err(Stop::Stalled),
        }
    };
    let mut frames = 0;
    let end = write_listing(shared, state, chunk, &mut |b| {
        frames += 1;
        send(Piece::Data(b))
    })
    .and_then(|_| send(Piece::End));
    match &end {
        Ok(()) => {}
        Err(Stop::Gone) => tracing::debug!(frames, "node listing: the client went away"),
        Err(Stop::Stalled) => tracing::warn!(
            frames,
            stall_s = stall.as_secs(),
            "node listing given up: its client stopped reading"
        ),
        Err(Stop::Overran) => tracing::warn!(
            frames,
            max_s = max.as_secs(),
            "node listing given up: its client read it too slowly"
        ),
        Err(Stop::Failed(e)) => tracing::error!(
            frames,
            error = %e,
            "node listing failed: its client gets the body cut short"
        ),
    }
    (frames, end)
}

/// The body of a listing: its producer's frames; the end of the body only
/// after [`Piece::End`], an error if the producer stopped without it (it
/// failed, or panicked), so that hyper aborts the connection instead of
/// ending the body and no client takes a listing cut short for a complete
/// one.
struct ListingBody {
    rx: mpsc::Receiver<Piece>,
    first: Option<Bytes>,
    ended: bool,
}

impl hyper::body::Body for ListingBody {
    type Data = Bytes;
    type Error = ListingError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ListingError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let piece = ready!(self.rx.poll_recv(cx));
        Poll::Ready(match piece {
            Some(Piece::Data(b)) => Some(Ok(Frame::data(b))),
            Some(Piece::End) => {
                self.ended = true;
                None
            }
            None => {
                self.ended = true;
                Some(Err(ListingError::Cut))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// The router's state: the core, and the permits for listings.
#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    listings: Arc<Semaphore>,
}

impl Api {
    fn new(shared: Arc<Shared>) -> Api {
        Api {
            shared,
            listings: Arc::new(Semaphore::new(LISTINGS)),
        }
    }
}

impl FromRef<Api> for Arc<Shared> {
    fn from_ref(api: &Api) -> Arc<Shared> {
        api.shared.clone()
    }
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

async fn nodes(State(api): State<Api>, Query(q): Query<NodesQuery>) -> Response {
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
    let Ok(permit) = api.listings.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(serde_json::json!({
                "error": format!("{LISTINGS} node listings are being served: retry in a second"),
            })),
        )
            .into_response();
    };
    // The producer runs on a blocking thread, not a runtime worker: it
    // waits for the core's lock (a tick, ~10 ms at a million nodes) and for
    // its client, and the userspace gate's sockets share the workers.
    let (tx, mut rx) = mpsc::channel(FRAMES_AHEAD);
    let (shared, rt) = (api.shared.clone(), Handle::current());
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        produce(&shared, filter, ROWS_CHUNK, &tx, &rt)
    });
    // The status waits for the first frame: a listing that fails before
    // it is a 500, not a 200 cut short.
    match rx.recv().await {
        Some(Piece::Data(first)) => (
            [(header::CONTENT_TYPE, "application/json")],
            Body::new(ListingBody {
                rx,
                first: Some(first),
                ended: false,
            }),
        )
            .into_response(),
        Some(Piece::End) | None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn node(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<u32>() else {
        return (StatusCode::BAD_REQUEST, format!("not a node id: {id:?}\n")).into_response();
    };
    // The core's lock waits for a tick (~10 ms at a million nodes): not on
    // a runtime worker, which the userspace gate's sockets share.
    match tokio::task::spawn_blocking(move || node_row(&s, id)).await {
        Ok(Ok(r)) => Json(r).into_response(),
        Ok(Err(NoRow::Unknown)) => (
            StatusCode::NOT_FOUND,
            format!("node {id} is not provisioned\n"),
        )
            .into_response(),
        Ok(Err(NoRow::Unreadable)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {id}'s state cannot be read: it is held for writing (by a monitor killed \
                 mid-write; the next start releases it; see hb_dataplane_stuck_reads_total)\n"
            ),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn controller(State(s): State<Arc<Shared>>) -> Response {
    match tokio::task::spawn_blocking(move || controller_document(&s)).await {
        Ok(v) => Json(v).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The `GET /controller` document: what the policy needs copied under the
/// core's lock, the document made of the copy after releasing it. Made
/// under the lock, a qlearn table of 8424 visited rows held the tick off
/// for 31 ms.
fn controller_document(s: &Shared) -> serde_json::Value {
    let copy = s.core().policy.snapshot_copy();
    copy.build()
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

/// Connections the API serves at once; more are closed as they come (each
/// holds a task and a file descriptor, which the monitor's hooks and
/// sockets need too).
pub const CONNECTIONS: usize = 64;

/// How long a client has to send a request's headers, and how long an
/// idle kept-alive connection is kept: a client that connects and sends
/// nothing holds no connection for longer.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write to a client may make no progress before its
/// connection is closed: a client that stops reading (pipelined requests
/// whose answers it never takes, say) would otherwise hold it, and with
/// [`CONNECTIONS`] of them every endpoint, `/healthz` included.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

/// How long a shutdown waits for requests in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stop` changes: HTTP/1.1, at most
/// [`CONNECTIONS`] at once, [`HEADER_TIMEOUT`] for a request's headers,
/// [`WRITE_STALL`] for a write to make progress; then requests in
/// progress get [`SHUTDOWN_GRACE`] to finish. (axum's own `serve` has
/// none of these bounds: a client that opened connections and sent
/// nothing, or read nothing, held them for ever.)
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    serve_within(
        listener,
        app,
        stop,
        CONNECTIONS,
        HEADER_TIMEOUT,
        WRITE_STALL,
    )
    .await
}

/// [`serve`] with other bounds (tests).
async fn serve_within(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    connections: usize,
    header_timeout: Duration,
    write_stall: Duration,
) {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        server::graceful::GracefulShutdown,
        service::TowerToHyperService,
    };
    let permits = Arc::new(Semaphore::new(connections));
    let graceful = GracefulShutdown::new();
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: not fatal, but not a
                    // reason to spin either.
                    tracing::warn!(error = %e, "API: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%peer, refused, limit = connections, "API: too many connections, closing new ones");
            }
            continue;
        };
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(write_stall));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(
                TokioIo::new(Box::pin(stream)),
                TowerToHyperService::new(app.clone()),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "API connection");
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("API: requests still in progress at shutdown were cut off");
    }
}

/// The API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    routes(Api::new(shared))
}

fn routes(api: Api) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/nodes", get(nodes))
        .route("/nodes/{id}", get(node))
        .route("/healthz", get(healthz))
        .route("/controller", get(controller))
        .with_state(api)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hb_common::{NodeKey, maps::NodeKeys};
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::{
        dataplane::mem::MemDataplane,
        detector::PhiParams,
        monitor::{policy::FixedPolicy, state::Thresholds, tick::Detector},
    };

    /// Nodes `1..=n` but 7, their ids in reverse slot order (a listing
    /// sorts by id).
    fn fleet(n: u32) -> Arc<Shared> {
        let dp = Arc::new(MemDataplane::new());
        let mut core = Core::new(
            Detector::new(Thresholds::default(), PhiParams::default()),
            Box::new(FixedPolicy::none()),
            1000,
        );
        for id in (1..=n).rev() {
            let slot = core.table.insert(id, Origin::Configured, 0).unwrap();
            let keys = NodeKeys::single(slot, 1, NodeKey::default());
            dp.upsert_node(id, &keys).unwrap();
        }
        core.table.remove(7);
        Arc::new(Shared {
            core: Mutex::new(core),
            dp,
            metrics: Arc::new(Metrics::new()),
            last_tick_ns: AtomicU64::new(0),
            dataplane_ok: AtomicBool::new(false),
            tick: Duration::from_millis(100),
        })
    }

    /// A policy whose `GET /controller` document says whether the core's
    /// lock was held while its copy was taken, and while it was made.
    struct LockProbe(Arc<std::sync::OnceLock<std::sync::Weak<Shared>>>);

    impl LockProbe {
        fn locked(&self) -> bool {
            let s = self.0.get().and_then(std::sync::Weak::upgrade).unwrap();
            s.core.try_lock().is_err()
        }
    }

    impl crate::monitor::policy::IntervalPolicy for LockProbe {
        fn decide(
            &mut self,
            _: u32,
            _: &crate::monitor::policy::NodeView,
            _: &NodeState,
        ) -> Option<u32> {
            None
        }
        fn name(&self) -> &'static str {
            "probe"
        }
        fn snapshot_copy(&self) -> crate::monitor::policy::PolicySnapshot {
            let copied_locked = self.locked();
            let probe = LockProbe(self.0.clone());
            crate::monitor::policy::PolicySnapshot::later(move || {
                serde_json::json!({
                    "copied_under_lock": copied_locked,
                    "made_under_lock": probe.locked(),
                })
            })
        }
    }

    /// `GET /controller` holds the core's lock (and so the tick) only
    /// while the policy copies what its document needs; describing and
    /// serialising a large table happens after. The qlearn document is
    /// the controller's snapshot, table and all.
    #[test]
    fn the_controller_document_is_made_without_the_cores_lock() {
        let shared = fleet(3);
        let me = Arc::new(std::sync::OnceLock::new());
        me.set(Arc::downgrade(&shared)).unwrap();
        shared.core().policy = Box::new(LockProbe(me));
        let v = controller_document(&shared);
        assert_eq!(v["copied_under_lock"], true, "{v}");
        assert_eq!(v["made_under_lock"], false, "{v}");

        use crate::controller::{Config, QController};
        let mut ctrl = QController::new(Config::default()).unwrap();
        ctrl.set_epsilon(Some(1.0));
        let mut st = NodeState {
            generation: 1,
            interval_ms: 1000,
            ia_mean_ns: 1_000_000_000,
            ia_samples: 100,
            last_arrival_ns: 1,
            ..NodeState::default()
        };
        for i in 0..300u64 {
            st.accepted += 5;
            st.load = (i * 37 % 1000) as u16;
            let d = ctrl.observe(1, &st, 0);
            st.interval_ms = d.interval_ms;
            st.requested_interval_ms = d.interval_ms;
            st.ia_mean_ns = u64::from(d.interval_ms) * 1_000_000;
        }
        let rows = ctrl.rows();
        assert!(rows.len() > 3, "{}", rows.len());
        let want = serde_json::to_value(ctrl.snapshot()).unwrap();
        shared.core().policy =
            Box::new(crate::monitor::policy::QLearnPolicy::wrap(ctrl, None, None));
        let v = controller_document(&shared);
        assert_eq!(v["controller"], "qlearn");
        assert_eq!(v["table"], serde_json::to_value(rows).unwrap());
        for (k, w) in want.as_object().unwrap() {
            assert_eq!(&v[k], w, "{k}");
        }
    }

    /// The listing as the monitor built it before it was streamed: every
    /// row in memory, then one JSON document.
    fn listing_in_memory(shared: &Shared, state: Option<Status>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        loop {
            let core = shared.core();
            let len = core.table.len();
            if start >= len {
                break;
            }
            let end = start.saturating_add(ROWS_CHUNK as u32).min(len);
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
        serde_json::to_vec(&out).unwrap()
    }

    /// A listing's rows without what changes with the clock.
    fn timeless(doc: &[u8]) -> Vec<serde_json::Value> {
        let mut rows: Vec<serde_json::Value> = serde_json::from_slice(doc).unwrap();
        for r in &mut rows {
            for field in ["phi", "last_seen_ms", "state_for_ms"] {
                r[field] = serde_json::Value::Null;
            }
        }
        rows
    }

    /// Serves `app` as the monitor does, until the test ends.
    async fn serve(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            super::serve(listener, app, rx).await;
            drop(stop);
        });
        addr
    }

    /// A three-node fleet's API on a local port with these bounds (see
    /// `serve_within`): its address, its stop switch and its task.
    async fn serve_bounded(
        connections: usize,
        header_timeout: Duration,
        write_stall: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve_within(
            listener,
            router(fleet(3)),
            rx,
            connections,
            header_timeout,
            write_stall,
        ));
        (addr, stop, server)
    }

    /// A client that connects and sends nothing holds its connection no
    /// longer than the header timeout, and connections past the bound are
    /// closed as they come, so neither starves the API for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_and_excess_connections_are_closed() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (addr, stop, server) = serve_bounded(2, Duration::from_millis(300), WRITE_STALL).await;
        // Closed by the server: a read ends (0 bytes or a reset) in time.
        let closed_within = |mut c: tokio::net::TcpStream, t: Duration| async move {
            let mut b = [0u8; 64];
            matches!(
                tokio::time::timeout(t, c.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            )
        };
        let mut idle_conns = Vec::new();
        for _ in 0..2 {
            idle_conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Both taken (accepted in order): a third is closed at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(third, Duration::from_secs(2)).await,
            "over the bound"
        );
        for c in idle_conns {
            assert!(
                closed_within(c, Duration::from_secs(5)).await,
                "idle past the header timeout"
            );
        }
        // And the API answers again.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 "),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
    }

    /// A client that pipelines requests and never reads the answers holds
    /// its connection no longer than the write stall allows: hyper has no
    /// write timeout, and the connection (with its permit) stayed while
    /// the client did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_frees_its_connection() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (addr, stop, server) =
            serve_bounded(1, Duration::from_secs(10), Duration::from_millis(500)).await;
        let hog = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_r, mut w) = hog.into_split();
        // Pipelined scrapes, never read: the answers fill the socket
        // buffers, then the server's writes make no progress.
        let req = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n".repeat(1000);
        for _ in 0..100 {
            match tokio::time::timeout(Duration::from_secs(1), w.write_all(&req)).await {
                Ok(Ok(())) => {}
                // The server stopped reading, or closed the connection.
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let t = std::time::Instant::now();
        let answered = loop {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = c
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut answer)).await;
            if answer.starts_with(b"HTTP/1.1 ") {
                break true;
            }
            if t.elapsed() > Duration::from_secs(8) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            answered,
            "the API refused every connection for 8 s after a client stopped reading"
        );
        drop(w);
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
    }

    async fn list(api: &Api) -> Response {
        nodes(State(api.clone()), Query(NodesQuery { state: None })).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listing_streams_the_document_it_built_in_memory() {
        let n = 2 * ROWS_CHUNK as u32 + 5;
        let shared = fleet(n);
        let addr = serve(router(shared.clone())).await;
        for (query, state, rows) in [
            ("", None, n - 1),
            ("?state=unknown", Some(Status::Unknown), n - 1),
            ("?state=alive", Some(Status::Alive), 0),
        ] {
            let body = crate::nodes::get(addr, &format!("/nodes{query}"))
                .await
                .unwrap();
            assert_eq!(
                timeless(&body),
                timeless(&listing_in_memory(&shared, state)),
                "{query}"
            );
            let got: Vec<NodeRow> = serde_json::from_slice(&body).unwrap();
            assert_eq!(got.len() as u32, rows, "{query}");
            assert!(got.windows(2).all(|w| w[0].node_id < w[1].node_id));
            assert!(got.iter().all(|r| r.node_id != 7 && r.state == "unknown"));
        }
        // Chunks of a few nodes, frames of many: the same document.
        let shared = fleet(1000);
        let mut doc = Vec::new();
        let frames = write_listing(&shared, None, 3, &mut |b| {
            doc.extend_from_slice(&b);
            Ok(())
        })
        .unwrap();
        assert_eq!(timeless(&doc), timeless(&listing_in_memory(&shared, None)));
        assert!(frames > 1, "{frames} frames");
        assert_eq!(node_row(&shared, 7).unwrap_err(), NoRow::Unknown);
        assert_eq!(node_row(&shared, 8).unwrap().node_id, 8);
        assert_eq!(unhealthy(&shared).as_deref(), Some("no tick completed yet"));
    }

    /// A node whose state cannot be read (held by a writer that died) is
    /// answered 503, not as a blank node never heard from.
    #[test]
    fn an_unreadable_node_is_no_blank_node() {
        let f = fleet(3);
        let mut core = Core::new(
            Detector::new(Thresholds::default(), PhiParams::default()),
            Box::new(FixedPolicy::none()),
            1000,
        );
        let mem = MemDataplane::new();
        for id in 1..=3 {
            let slot = core.table.insert(id, Origin::Configured, 0).unwrap();
            mem.upsert_node(id, &NodeKeys::single(slot, 1, NodeKey::default()))
                .unwrap();
        }
        let slot = core.table.slot_of(2).unwrap();
        let shared = Shared {
            core: Mutex::new(core),
            dp: Arc::new(crate::dataplane::mem::testing::Faulty::unreadable(
                mem, slot,
            )),
            metrics: f.metrics.clone(),
            last_tick_ns: AtomicU64::new(0),
            dataplane_ok: AtomicBool::new(false),
            tick: Duration::from_millis(100),
        };
        assert_eq!(node_row(&shared, 2).unwrap_err(), NoRow::Unreadable);
        assert_eq!(node_row(&shared, 1).unwrap().node_id, 1);
        assert_eq!(node_row(&shared, 9).unwrap_err(), NoRow::Unknown);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listings_beyond_the_permits_are_told_to_retry() {
        let api = Api::new(fleet(100));
        let held: Vec<_> = (0..LISTINGS)
            .map(|_| api.listings.clone().try_acquire_owned().unwrap())
            .collect();
        let resp = list(&api).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(err["error"].is_string(), "{err}");
        // One node needs no permit.
        let resp = node(State(api.shared.clone()), Path("8".into())).await;
        assert_eq!(resp.status(), StatusCode::OK);
        drop(held);
        let resp = list(&api).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            serde_json::from_slice::<Vec<NodeRow>>(&body).unwrap().len(),
            99
        );
        // The producer gives its permit back as its thread ends, just
        // after the last frame.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while api.listings.available_permits() != LISTINGS {
            assert!(std::time::Instant::now() < deadline, "the permit came back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `hb nodes` waits out a busy monitor (within its own timeout); one
    /// busy for all of that timeout is said to be busy, not silent (it
    /// answered 503 to every try).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hb_nodes_asks_a_busy_monitor_again() {
        let api = Api::new(fleet(100));
        let held: Vec<_> = (0..LISTINGS)
            .map(|_| api.listings.clone().try_acquire_owned().unwrap())
            .collect();
        let addr = serve(routes(api.clone())).await;
        let e = crate::nodes::get(addr, "/nodes").await.unwrap_err();
        assert!(e.downcast_ref::<crate::nodes::Busy>().is_some(), "{e:#}");
        let e =
            crate::nodes::fetch_within(&addr.to_string(), "/nodes", Duration::from_millis(1500))
                .await
                .unwrap_err();
        assert!(
            format!("{e:#}").contains("was busy until the end of 1500 ms"),
            "{e:#}"
        );
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(held);
        });
        let body = tokio::time::timeout(
            Duration::from_secs(10),
            crate::nodes::get_patiently(addr, "/nodes"),
        )
        .await
        .expect("within 10 s")
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Vec<NodeRow>>(&body).unwrap().len(),
            99
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_stops_when_its_client_goes_away() {
        let shared = fleet(20_000);
        // The producer: ~120 frames in all, but no more than its client
        // took and the channel holds.
        let (tx, mut rx) = mpsc::channel(FRAMES_AHEAD);
        let (s, rt) = (shared.clone(), Handle::current());
        let producer = tokio::task::spawn_blocking(move || produce(&s, None, 256, &tx, &rt));
        assert!(matches!(rx.recv().await, Some(Piece::Data(_))));
        drop(rx);
        let (frames, end) = tokio::time::timeout(Duration::from_secs(5), producer)
            .await
            .expect("the producer stops")
            .unwrap();
        assert!(matches!(end, Err(Stop::Gone)), "{end:?}");
        assert!(frames <= 1 + FRAMES_AHEAD + 1, "{frames} frames");
        // Through the handler: the permit comes back once the body is
        // dropped after its first frame.
        let api = Api::new(shared);
        let mut body = list(&api).await.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(api.listings.available_permits() < LISTINGS);
        drop(body);
        tokio::time::timeout(Duration::from_secs(5), async {
            while api.listings.available_permits() < LISTINGS {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the listing's permit comes back");
    }

    /// A client that reads a listing in trickles, never stalled, holds it
    /// no longer than the listing's time limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_read_in_trickles_is_given_up_at_its_time_limit() {
        let shared = fleet(20_000);
        let (tx, mut rx) = mpsc::channel(1);
        let (s, rt) = (shared.clone(), Handle::current());
        let producer = tokio::task::spawn_blocking(move || {
            produce_within(
                &s,
                None,
                256,
                &tx,
                &rt,
                Duration::from_secs(5),
                Duration::from_millis(500),
            )
        });
        let reader = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let (_, end) = tokio::time::timeout(Duration::from_secs(5), producer)
            .await
            .expect("given up within 5 s")
            .unwrap();
        assert!(matches!(end, Err(Stop::Overran)), "{end:?}");
        reader.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_cut_short_never_reads_as_complete() {
        // Frames the producer sends, whether it then says the end, and the
        // body `hb nodes` gets (none: the request fails).
        let cases: [(&[&str], bool, Option<&str>); 4] = [
            (&["[1,", "2]"], true, Some("[1,2]")),
            (&["[1,"], false, None),
            (&["[1,", "2]"], false, None),
            (&["[]"], false, None),
        ];
        for (frames, end, want) in cases {
            let frames: Vec<Bytes> = frames.iter().map(|f| Bytes::from(*f)).collect();
            let app = Router::new().route(
                "/",
                get(move || async move {
                    let (tx, rx) = mpsc::channel(FRAMES_AHEAD);
                    tokio::spawn(async move {
                        for f in frames {
                            tx.send(Piece::Data(f)).await.unwrap();
                        }
                        if end {
                            tx.send(Piece::End).await.unwrap();
                        }
                    });
                    Body::new(ListingBody {
                        rx,
                        first: None,
                        ended: false,
                    })
                }),
            );
            let got = crate::nodes::get(serve(app).await, "/").await;
            assert_eq!(got.ok().as_deref(), want.map(str::as_bytes), "{want:?}");
        }
    }

    /// Property tests of the HTTP API's paths and query strings, which
    /// any local client may send: every request gets an answer (200, or a
    /// 4xx that says why), never a 500 or a dropped connection, and the
    /// API keeps answering.
    mod props {
        use std::io::{Read as _, Write as _};

        use proptest::prelude::*;

        use super::*;

        /// One API of a three-node fleet for all cases, on its own runtime.
        fn api() -> SocketAddr {
            static API: std::sync::OnceLock<(tokio::runtime::Runtime, SocketAddr)> =
                std::sync::OnceLock::new();
            API.get_or_init(|| {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let addr = rt.block_on(serve(router(fleet(3))));
                (rt, addr)
            })
            .1
        }

        /// The status code of `GET target`.
        fn get(target: &str) -> u16 {
            let mut s = std::net::TcpStream::connect(api()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                s,
                "GET {target} HTTP/1.1\r\nHost: hb\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            let head = String::from_utf8_lossy(&out);
            assert!(head.starts_with("HTTP/1.1 "), "{target:?}: {head:?}");
            head[9..12].parse().unwrap()
        }

        /// Text of the shapes a request line may hold: printable ASCII
        /// (no space), percent escapes good and bad, UTF-8.
        fn text() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop_oneof![
                    "[!-~]{1,4}",
                    "%[0-9a-fA-F]{2}",
                    Just("%".to_owned()),
                    Just("%zz".to_owned()),
                    Just("%00".to_owned()),
                    Just("%ff".to_owned()),
                    Just("&".to_owned()),
                    Just("=".to_owned()),
                    Just("state".to_owned()),
                    Just("alive".to_owned()),
                    Just("4294967296".to_owned()),
                    Just("-1".to_owned()),
                    "[\u{80}-\u{10ffff}]",
                ],
                0..8,
            )
            .prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

            #[test]
            fn any_path_and_query_get_an_answer(
                which in 0..5u8,
                t in text(),
            ) {
                let target = match which {
                    0 => format!("/nodes?state={t}"),
                    1 => format!("/nodes?{t}"),
                    2 => format!("/nodes/{t}"),
                    3 => format!("/{t}"),
                    _ => format!("/controller?{t}"),
                };
                let code = get(&target);
                prop_assert!(
                    code == 200 || (400..500).contains(&code),
                    "{:?}: {}", target, code
                );
                prop_assert_eq!(get("/nodes/1"), 200);
            }
        }
    }
}

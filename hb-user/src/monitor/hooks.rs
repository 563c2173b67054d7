//! `--on-event CMD`: one process per event, bounded in number and time.
//!
//! `CMD` runs under `/bin/sh -c`, with the event in its environment
//! (`HB_EVENT`, `HB_NODE_ID`, `HB_PREVIOUS`, `HB_STATE`, `HB_PHI`,
//! `HB_GENERATION`, `HB_LAST_SEEN_MS`, `HB_TS`, `HB_SEQ`) and as one JSON
//! line on its stdin, in a process group of its own. One node's hooks run
//! one after another, in `seq` order: its next hook starts once its
//! previous one has ended (a pager that got `dead` then `alive` is never
//! left with `dead` because the two ran at once and finished crosswise).
//! Different nodes' hooks run side by side, at most `concurrency` at once;
//! an event waiting for its node's previous hook holds no slot. Each is
//! killed, with its whole process
//! group, when it outlives `timeout`. A hook ends when its shell exits,
//! and so does what it started: whatever is left in its process group
//! (`cmd &`) is killed then, so that the bounds hold for all of it. A hook
//! that wants something to outlive it must take that out of its process
//! group itself before its shell exits (`setsid -f cmd`, `systemd-run`;
//! not `setsid cmd &`, which may be killed before it has left), at the
//! operator's own risk: nothing then bounds it, in number or time, nor
//! stops it at shutdown. Different nodes' hooks may finish out of order;
//! `HB_SEQ` orders them.
//!
//! A node's hooks always end with its latest event ([`Queue`]). While
//! fewer than `queue` events wait to start (for a free slot, or for their
//! node's previous hook), every event is queued. At `queue` (a backlog: a
//! rack failure brings a `suspect` per node, then a `dead` per node a
//! second later, faster than hooks run), an event replaces its node's
//! newest event still waiting, which never runs (counted in
//! `hb_hook_failures_total{reason="superseded"}`), and is queued if its
//! node has none waiting: past `queue` a node has one event waiting at
//! most, so the backlog is bounded by the number of nodes (past
//! [`PAST_BOUND_MOST`], more than the largest maps hold, an event of a
//! node with none waiting is dropped, `reason="dropped"`). The event run
//! is the newest one, unchanged: its line in the events file, so its
//! `previous` may not be the last event its node's hook got. Dropping
//! events at the bound instead, as hb did, lost most `dead` verdicts of
//! a rack failure, and ran the `alive` of nodes whose `dead` never ran.
//! The nodes ready to start wait in two lanes ([`Lane`]): those whose next
//! event is a state change start before those whose next is only
//! `joined`, so that a `dead` is not held behind a fresh start's `joined`
//! of every node (minutes at 50,000 nodes, an hour at a million). Once
//! nothing waits any more, the memory a backlog took past `queue` is
//! handed back to the system ([`Queue::drained`]): glibc keeps it
//! otherwise.
//! A backlog is logged when it starts (queued past `queue`, or merged),
//! at most every [`BACKLOG_EVERY`] while events go on being merged, and
//! in a summary when it is over ([`Backlog`]), so a storm of events never
//! piles up processes or log lines.
//!
//! A hook that fails (its exit status, its timeout, its shell not
//! started) is counted in `hb_hook_failures_total` by reason, and logged
//! with its node and status when it is the first of a run of failures;
//! the later ones are summed up in a line (how many, by reason, first and
//! last `seq`) at most every [`FAILURES_EVERY`] while they go on, once
//! hooks succeed again, and at shutdown ([`Failures`]): a broken hook (a
//! pager down) in a storm of events would log a line per event, until
//! journald's rate limit hid the monitor's other lines.
//!
//! At shutdown ([`Hooks::shutdown`]) the hooks running and the events
//! queued get a grace to finish; then what still runs is killed with its
//! process group and what still waits is never run, both counted
//! (`reason="shutdown"`) and logged. Even when the runtime is dropped
//! under a hook (an error return, a panic), its process group is killed
//! ([`Group`]). A monitor killed outright (SIGKILL, the OOM killer) kills
//! nothing itself: the kernel then kills each hook's shell (its
//! parent-death signal), but not what the shell started, which runs on to
//! its end. Under systemd, the unit's control group is the backstop
//! (stopping or restarting the unit kills what is left in it); as PID 1 of
//! a PID namespace, the kernel kills the whole namespace with the monitor.
//! Every shell is started from one thread that lives as long as the
//! process ([`spawn_hook`]): the parent-death signal comes when the
//! thread that forked exits, not the process, and the runtime's threads
//! may come and go.
//!
//! A hook killed at its timeout is waited for at most [`KILL_WAIT`]: one
//! that SIGKILL does not end (in uninterruptible sleep on a hung NFS or
//! FUSE mount) is then given up on, counted (`reason="unkillable"`) and
//! logged, and its slot freed, and its node's next hook may start; tokio
//! reaps it whenever it does end. Else `concurrency` such hooks would stop
//! every later one from running, and one would stop its node's for good.
//!
//! As PID 1 of its PID namespace (a container's entrypoint with no init),
//! the monitor adopts whatever a hook leaves behind when its shell dies,
//! and reaps it ([`reap_orphans`]): nothing else would, and the zombies
//! would pile up to the pid limit.

use std::{
    collections::{BTreeSet, HashMap, VecDeque, hash_map::Entry},
    os::fd::{FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use tokio::{
    io::{AsyncWriteExt, Interest, unix::AsyncFd},
    process::{Child, Command},
    signal::unix::{SignalKind, signal},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
};

use prometheus_client::metrics::gauge::Gauge;

use super::{events::Event, metrics::Metrics, state::EventKind};

/// `hb_hook_failures_total` reason of the hooks killed and the events
/// never run at shutdown.
const SHUTDOWN: &str = "shutdown";
/// `hb_hook_failures_total` reason of the hooks still there [`KILL_WAIT`]
/// after their timeout's kill.
const UNKILLABLE: &str = "unkillable";
/// How long a hook killed at its timeout is waited for before it is given
/// up on (its slot freed). SIGKILL ends a process at once unless it is in
/// uninterruptible sleep; a hook still there after this may never end.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a hook's shell is checked for its exit when the kernel gives
/// no pidfd to wait on (before 5.3, or no file descriptor left).
const EXIT_POLL: Duration = Duration::from_millis(20);
/// At most how often a line sums up the hooks that failed since the last
/// line about failures ([`Failures`]).
const FAILURES_EVERY: Duration = Duration::from_secs(60);
/// How often, besides at each SIGCHLD, the monitor as PID 1 looks for
/// orphans to reap ([`reap_orphans`]).
const REAP_EVERY: Duration = Duration::from_secs(1);
/// The most orphans reaped at one look; the rest wait for the next.
const REAP_MOST: usize = 4096;
/// `hb_hook_failures_total` reason of the events replaced, before their
/// hook started, by a newer one of their node ([`Queue::add`]).
const SUPERSEDED: &str = "superseded";
/// `hb_hook_failures_total` reason of the events dropped past
/// [`PAST_BOUND_MOST`].
const DROPPED: &str = "dropped";
/// At most how often a line says how a hook backlog goes on ([`Backlog`]).
const BACKLOG_EVERY: Duration = Duration::from_secs(5);
/// The most events queued past `--hook-queue`, one a node at most: as
/// many as the largest maps hold nodes. Only a fleet that churns through
/// more node ids than that during one backlog reaches it; past it, an
/// event of a node with none waiting is dropped (`reason="dropped"`).
const PAST_BOUND_MOST: usize = hb_common::maps::MAX_NODES as usize;
/// The queue's memory is given back once it holds a quarter of what it
/// has room for, above this many.
const SHRINK_ABOVE: usize = 1024;

/// Settings of the hook runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookOptions {
    pub command: String,
    pub concurrency: usize,
    pub timeout: Duration,
    pub queue: usize,
}

/// What tests shorten or shrink; [`Tuning::default`] in the monitor.
#[derive(Clone, Copy, Debug)]
struct Tuning {
    /// [`KILL_WAIT`].
    kill_wait: Duration,
    /// [`FAILURES_EVERY`].
    failures_every: Duration,
    /// [`BACKLOG_EVERY`].
    backlog_every: Duration,
    /// [`PAST_BOUND_MOST`].
    past_bound_most: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            kill_wait: KILL_WAIT,
            failures_every: FAILURES_EVERY,
            backlog_every: BACKLOG_EVERY,
            past_bound_most: PAST_BOUND_MOST,
        }
    }
}

/// Handle to the hook runner.
#[derive(Clone)]
pub struct Hooks {
    /// The events waiting to start, shared with the runner.
    queue: Arc<Mutex<Queue>>,
    /// Wakes the runner when an event is queued (one wake-up waiting
    /// covers every event queued before the runner looks); closed, for
    /// the runner, once every handle is gone.
    wake: mpsc::Sender<()>,
    metrics: Arc<Metrics>,
    /// An event came after shutdown and was said to be dropped (once:
    /// the last tick of a large fleet can bring thousands).
    closed_warned: Arc<AtomicBool>,
    /// Shared by every clone; the first `shutdown` takes it.
    runner: Arc<Mutex<Option<Runner>>>,
}

/// The dispatcher task, and how to tell it to stop.
struct Runner {
    /// The grace, once shutdown has begun.
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

impl Hooks {
    pub fn start(opts: HookOptions, metrics: Arc<Metrics>) -> Hooks {
        Hooks::start_with(opts, metrics, Tuning::default())
    }

    /// `start`, with the waits, periods and bounds of `tuning`.
    fn start_with(opts: HookOptions, metrics: Arc<Metrics>, tuning: Tuning) -> Hooks {
        if std::process::id() == 1 && !REAPING.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "running as PID 1 (a container with no init?): reaping the processes orphaned in \
                 this PID namespace, such as what hooks leave behind"
            );
            tokio::spawn(reap_orphans());
        }
        let (wake, woken) = mpsc::channel(1);
        let queue = Arc::new(Mutex::new(Queue::new(
            opts.queue.max(1),
            tuning.past_bound_most,
            tuning.backlog_every,
            metrics.hook_queue_waiting(),
        )));
        let (stop, stop_rx) = watch::channel(None);
        let task = tokio::spawn(dispatch(
            opts,
            tuning.kill_wait,
            Failures::every(tuning.failures_every),
            queue.clone(),
            woken,
            stop_rx,
            metrics.clone(),
        ));
        Hooks {
            queue,
            wake,
            metrics,
            closed_warned: Arc::default(),
            runner: Arc::new(Mutex::new(Some(Runner { stop, task }))),
        }
    }

    /// Queues a hook run for `ev` (never blocks). While fewer than
    /// `queue` events wait, every one is queued; at `queue`, `ev` replaces
    /// its node's newest event still waiting, if it has one (counted in
    /// `reason="superseded"`), and is queued otherwise, so that every
    /// node's hooks end with its latest event. Dropped (counted) only at
    /// shutdown, and past `queue` + [`PAST_BOUND_MOST`] (more nodes than
    /// the largest maps hold). A backlog is logged when it starts, at
    /// most every [`BACKLOG_EVERY`] while it goes on, and when it ends
    /// ([`Backlog`]).
    pub fn submit(&self, ev: &Event) {
        // Cloned before the lock, which the runner takes too.
        let queued = ev.clone();
        let mut q = self.queue();
        if q.closed {
            drop(q);
            return self.closed(ev);
        }
        let (reason, seq) = match q.add(queued) {
            Taken::Queued => {
                drop(q);
                // Full: a wake-up is already waiting.
                let _ = self.wake.try_send(());
                return;
            }
            Taken::Past => (None, ev.seq),
            Taken::Superseded(seq) => (Some(SUPERSEDED), seq),
            Taken::Dropped => (Some(DROPPED), ev.seq),
        };
        let (first, waiting) = (q.backlog.note(reason, seq, Instant::now()), q.waiting);
        drop(q);
        if let Some(reason) = reason {
            self.metrics.hook_failed(reason);
        }
        // The runner looks at the backlog on its timer from now on.
        let _ = self.wake.try_send(());
        if !first {
            return;
        }
        // `seq`: the event not passed to --on-event, as in the later
        // lines' first_seq and last_seq; the one queued past the bound
        // when none is.
        match reason {
            None => tracing::warn!(
                seq,
                node_id = ev.node_id,
                event = %ev.event,
                waiting,
                "hook backlog: more than --hook-queue events wait (a start's `joined` of every \
                 node, a failure of many); state changes start before `joined`, and from now on \
                 a node's newer event replaces its own still waiting (hb_hook_queue_waiting)"
            ),
            Some(SUPERSEDED) => tracing::warn!(
                seq,
                by_seq = ev.seq,
                node_id = ev.node_id,
                event = %ev.event,
                waiting,
                "hook backlog: --hook-queue events wait; a node's newer event now replaces its own \
                 still waiting, so its hooks end with its latest (counted in \
                 hb_hook_failures_total{{reason=\"superseded\"}})"
            ),
            Some(_) => tracing::warn!(
                seq,
                node_id = ev.node_id,
                event = %ev.event,
                waiting,
                "hook backlog: more nodes' events wait than the largest maps hold nodes; events \
                 of nodes with none waiting not passed to --on-event until it shrinks"
            ),
        }
    }

    /// Says (once) and counts that `ev` came after shutdown began.
    fn closed(&self, ev: &Event) {
        self.metrics.hook_failed(SHUTDOWN);
        if self.closed_warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(node_id = ev.node_id, event = %ev.event, "shutting down, event not passed to --on-event");
        } else {
            tracing::warn!(
                node_id = ev.node_id,
                event = %ev.event,
                "shutting down, event not passed to --on-event (nor any later one: counted in hb_hook_failures_total{{reason=\"shutdown\"}})"
            );
        }
    }

    /// Stops taking events, and gives the hooks running and the events
    /// queued `grace` to finish (queued ones start as slots and their
    /// nodes free up). Then
    /// kills every hook still running, with its process group, and drops
    /// the events still queued: both are counted (`reason="shutdown"`) and
    /// logged, each hook killed and the sum in one line; a backlog going
    /// on ends in its summary line. Returns once
    /// nothing of the runner is left. Any clone may call it; a later call
    /// returns at once.
    pub async fn shutdown(self, grace: Duration) {
        let runner = self
            .runner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Runner { stop, task }) = runner else {
            return;
        };
        stop.send_replace(Some(grace));
        let _ = task.await;
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        lock_queue(&self.queue)
    }
}

fn lock_queue(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Every change to it is made whole before anything that may panic.
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The grace once shutdown has begun; never, when every handle is gone
/// without one (the hooks started and queued then run to their end).
async fn stopped(stop: &mut watch::Receiver<Option<Duration>>) -> Duration {
    let grace = stop.wait_for(Option::is_some).await.map(|g| *g);
    match grace {
        Ok(grace) => grace.unwrap_or_default(),
        Err(_) => std::future::pending().await,
    }
}

/// What [`Queue::add`] did with an event.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    Queued,
    /// Queued past `bound`: its node had none waiting.
    Past,
    /// It replaced its node's newest event waiting, this `seq`'s.
    Superseded(u64),
    /// Past `bound` + `past_bound_most`, for a node with none waiting.
    Dropped,
}

/// Which of the two lines of ready nodes a node waits in: by its first
/// event waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// A state change (`suspect`, `dead`, `alive`, `left`, `restarted`,
    /// `removed`): starts before any node of [`Lane::Joins`].
    Changes,
    /// Only `joined`: a fresh start brings one per node, all at once.
    Joins,
}

impl Lane {
    fn of(ev: &Event) -> Lane {
        if ev.event == EventKind::Joined {
            Lane::Joins
        } else {
            Lane::Changes
        }
    }
}

/// One node's events that have not started, in `seq` order, and whether
/// its hook runs.
#[derive(Default)]
struct Node {
    running: bool,
    /// Its place in a lane, while it is ready (no hook running, an event
    /// waiting): the ticket of its one entry there that counts, and
    /// which lane. `None` while it is not ready.
    ticket: Option<(u64, Lane)>,
    events: VecDeque<Event>,
}

/// The events that have not started: one node's wait for its previous
/// hook to end, in `seq` order; those of a node with no hook running wait
/// for a slot, in one of two lanes by their first event ([`Lane`]): a
/// node whose next hook is for a state change starts before every node
/// whose next is only `joined`, so a `dead` is never stuck behind a fresh
/// start's `joined` of every node. None holds a slot. Shared by the
/// handles, which add, and the runner, which starts.
struct Queue {
    /// `--hook-queue`: while fewer wait, every event is queued; at it, a
    /// node's newer event replaces its newest waiting.
    bound: usize,
    /// The most events queued past `bound`: one a node at most, so no more
    /// than there are nodes ([`PAST_BOUND_MOST`]).
    past_bound_most: usize,
    /// Shutdown began: no more events are taken.
    closed: bool,
    /// Every node with an event waiting or a hook running.
    nodes: HashMap<u32, Node>,
    /// The nodes with no hook running and a state change first waiting:
    /// they start first, in the order they became ready (or their first
    /// event became a change). An entry counts only if its ticket is its
    /// node's ([`Node::ticket`]); the others are skipped when reached.
    changes: VecDeque<(u32, u64)>,
    /// The nodes with no hook running and `joined` first waiting: they
    /// start when no change waits, in the order they became ready.
    joins: VecDeque<(u32, u64)>,
    /// How many entries of `changes` and `joins` count: the nodes ready.
    ready: usize,
    /// The next lane ticket.
    tickets: u64,
    /// How many events wait, in `nodes`.
    waiting: usize,
    /// `hb_hook_queue_waiting`: `waiting`, for the metrics.
    gauge: Gauge,
    /// A backlog went past `bound`: once nothing waits, the memory it
    /// took is handed back to the system ([`Queue::drained`]).
    trim: bool,
    backlog: Backlog,
}

impl Queue {
    fn new(bound: usize, past_bound_most: usize, backlog_every: Duration, gauge: Gauge) -> Queue {
        Queue {
            bound,
            past_bound_most,
            closed: false,
            nodes: HashMap::new(),
            changes: VecDeque::new(),
            joins: VecDeque::new(),
            ready: 0,
            tickets: 0,
            waiting: 0,
            gauge,
            trim: false,
            backlog: Backlog::every(backlog_every),
        }
    }

    /// Takes `ev`: behind its node's events waiting and its hook running,
    /// if any; at `bound`, in place of its node's newest event waiting.
    fn add(&mut self, ev: Event) -> Taken {
        let id = ev.node_id;
        let past = self.waiting >= self.bound;
        if past {
            if let Some(node) = self.nodes.get_mut(&id)
                && let Some(newest) = node.events.back_mut()
            {
                // Later in `seq` than every event of its node: the order
                // holds.
                let seq = std::mem::replace(newest, ev).seq;
                // Its first event waiting may now be a change: it moves
                // up to that lane (never down: a `joined` in place of a
                // change starts early, harmlessly, and a node flapping
                // while it waits adds one entry at most).
                if let Some((_, Lane::Joins)) = node.ticket
                    && node.events.len() == 1
                    && Lane::of(&node.events[0]) == Lane::Changes
                {
                    self.tickets += 1;
                    node.ticket = Some((self.tickets, Lane::Changes));
                    self.changes.push_back((id, self.tickets));
                }
                return Taken::Superseded(seq);
            }
            if self.waiting - self.bound >= self.past_bound_most {
                return Taken::Dropped;
            }
            self.trim = true;
        }
        let node = self.nodes.entry(id).or_default();
        if node.events.capacity() == 0 {
            // Room for one, not four: past `bound`, a node has one.
            node.events.reserve_exact(1);
        }
        let ready = node.events.is_empty() && !node.running;
        node.events.push_back(ev);
        self.waiting += 1;
        self.gauge.set(self.waiting as i64);
        if ready {
            self.enter(id);
        }
        if past { Taken::Past } else { Taken::Queued }
    }

    /// `id`, with no hook running and an event waiting, gets in the lane
    /// of its first event.
    fn enter(&mut self, id: u32) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(first) = node.events.front() else {
            return;
        };
        let lane = Lane::of(first);
        self.tickets += 1;
        node.ticket = Some((self.tickets, lane));
        self.ready += 1;
        match lane {
            Lane::Changes => self.changes.push_back((id, self.tickets)),
            Lane::Joins => self.joins.push_back((id, self.tickets)),
        }
    }

    /// Some node is ready to start.
    fn has_ready(&self) -> bool {
        self.ready > 0
    }

    /// The next event to start, its node's hook now running: the first
    /// ready node's with a change first waiting, else the first's with
    /// `joined`.
    fn start(&mut self) -> Option<Event> {
        while let Some((id, ticket)) = self.changes.pop_front().or_else(|| self.joins.pop_front()) {
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            if node.ticket.is_none_or(|(t, _)| t != ticket) {
                // Left behind when its node moved up to `changes`.
                continue;
            }
            let Some(ev) = node.events.pop_front() else {
                continue;
            };
            node.ticket = None;
            node.running = true;
            self.ready -= 1;
            self.waiting -= 1;
            self.gauge.set(self.waiting as i64);
            self.shrink();
            return Some(ev);
        }
        None
    }

    /// `id`'s hook ended: its next event, if any, is ready.
    fn ended(&mut self, id: u32) {
        let Entry::Occupied(mut node) = self.nodes.entry(id) else {
            return;
        };
        node.get_mut().running = false;
        if node.get().events.is_empty() {
            node.remove();
            self.shrink();
        } else {
            self.enter(id);
        }
    }

    /// Gives back most of the memory a backlog took (a million nodes' in
    /// a storm) once it has shrunk to a quarter; halving each time, so
    /// the rehashing costs little per event.
    fn shrink(&mut self) {
        if self.nodes.capacity() > SHRINK_ABOVE && self.nodes.len() * 4 < self.nodes.capacity() {
            self.nodes.shrink_to(self.nodes.len() * 2);
        }
        for lane in [&mut self.changes, &mut self.joins] {
            if lane.capacity() > SHRINK_ABOVE && lane.len() * 4 < lane.capacity() {
                lane.shrink_to(lane.len() * 2);
            }
        }
    }

    /// True once, when nothing waits any more after a backlog went past
    /// `bound`: the caller then hands the freed memory back to the system
    /// ([`trim_heap`]), once per backlog, not per event.
    fn drained(&mut self) -> bool {
        if !self.trim || self.waiting > 0 {
            return false;
        }
        self.trim = false;
        self.nodes.shrink_to_fit();
        self.changes.shrink_to_fit();
        self.joins.shrink_to_fit();
        true
    }

    /// Nothing waits and no hook runs.
    fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Says what the backlog did since its last line, if it is due.
    fn look(&mut self, now: Instant) {
        let below = self.waiting < self.bound;
        self.backlog.look(now, self.waiting, below);
    }
}

/// Hands the heap's free memory back to the system (glibc keeps what a
/// drained backlog freed: 20 MB after 50,000 nodes' `joined`, for good).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no arguments to check; glibc takes its own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The events not passed to hooks at the bound (superseded, dropped)
/// in a backlog going on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Merged {
    superseded: u64,
    dropped: u64,
    first_seq: u64,
    last_seq: u64,
}

impl Merged {
    fn add(&mut self, reason: &str, seq: u64) {
        if self.superseded + self.dropped == 0 {
            self.first_seq = seq;
        }
        self.last_seq = self.last_seq.max(seq);
        self.first_seq = self.first_seq.min(seq);
        if reason == SUPERSEDED {
            self.superseded += 1;
        } else {
            self.dropped += 1;
        }
    }
}

/// The lines about a hook backlog: the events that reached `--hook-queue`
/// merged into their node's newer ones (or dropped, past
/// [`PAST_BOUND_MOST`]), or queued past it. The first of a backlog is
/// logged at once, by [`Hooks::submit`], unless a line about one was
/// logged less than `every` ago; then, from the runner's timer ([`Backlog::due`]), a line
/// at most every `every` while events go on being merged, and a summary
/// (the whole backlog's counts, and how long it lasted) at the first look
/// that finds fewer than `--hook-queue` events waiting, or at shutdown.
/// So a rack failure of 10,000 nodes logs a line per few seconds, not a
/// pair per tick, and its last count is said without waiting for another
/// event.
#[derive(Debug)]
struct Backlog {
    every: Duration,
    /// When a line was last logged, or the backlog last looked at.
    last: Option<Instant>,
    /// The backlog going on: since when, its counts in all, and those
    /// not said yet.
    run: Option<(Instant, Merged, Merged)>,
}

impl Backlog {
    fn every(every: Duration) -> Backlog {
        Backlog {
            every,
            last: None,
            run: None,
        }
    }

    /// Counts event `seq` not passed to hooks for `reason` (`None`: it
    /// was queued past `--hook-queue`, nothing merged); true when the
    /// caller is to log it as the start of a backlog.
    fn note(&mut self, reason: Option<&str>, seq: u64, now: Instant) -> bool {
        let starts = self.run.is_none();
        let said = starts && self.start(now);
        let (_, all, unsaid) = self
            .run
            .get_or_insert_with(|| (now, Merged::default(), Merged::default()));
        if let Some(reason) = reason {
            all.add(reason, seq);
            if !said {
                unsaid.add(reason, seq);
            }
        }
        said
    }

    /// A backlog starts: true when it is to be logged (no line about one
    /// less than `every` ago).
    fn start(&mut self, now: Instant) -> bool {
        let quiet = self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < self.every);
        if !quiet {
            self.last = Some(now);
        }
        !quiet
    }

    /// When the backlog is to be looked at next, if one goes on.
    fn due(&self) -> Option<Instant> {
        self.run.as_ref()?;
        Some(self.last.map_or_else(Instant::now, |at| at + self.every))
    }

    /// Looks at the backlog (when [`Backlog::due`]): says its summary if
    /// it is over (`below`: fewer than `--hook-queue` events wait), else
    /// what it merged since the last line, if anything.
    fn look(&mut self, now: Instant, waiting: usize, below: bool) {
        if self.run.is_none() || self.last.is_some_and(|at| now < at + self.every) {
            return;
        }
        self.last = Some(now);
        if below {
            self.end(now, waiting);
            return;
        }
        let Some((since, _, unsaid)) = &mut self.run else {
            return;
        };
        if *unsaid == Merged::default() {
            return;
        }
        let m = std::mem::take(unsaid);
        tracing::warn!(
            superseded = m.superseded,
            dropped = m.dropped,
            first_seq = m.first_seq,
            last_seq = m.last_seq,
            waiting,
            for_ms = now.saturating_duration_since(*since).as_millis() as u64,
            "hook backlog goes on: events replaced by a newer one of their node before their \
             hook started, since the last line"
        );
    }

    /// Ends the backlog going on, if any, in its summary line.
    fn end(&mut self, now: Instant, waiting: usize) {
        let Some((since, all, _)) = self.run.take() else {
            return;
        };
        tracing::warn!(
            superseded = all.superseded,
            dropped = all.dropped,
            first_seq = all.first_seq,
            last_seq = all.last_seq,
            waiting,
            for_ms = now.saturating_duration_since(since).as_millis() as u64,
            "hook backlog over: events not passed to --on-event in all, each replaced by a newer \
             one of its node (superseded) or dropped"
        );
    }
}

/// The runner's state: the events coming and waiting, the hooks running.
struct Dispatch {
    queue: Arc<Mutex<Queue>>,
    /// A wake-up for each event queued; `None` once every handle is gone.
    woken: mpsc::Receiver<()>,
    /// Every handle is gone.
    handles_gone: bool,
    slots: Arc<Semaphore>,
    /// The node of each hook that ended (sent when its task ends, however:
    /// run to its end, given up on, aborted, or panicked).
    ended_tx: mpsc::UnboundedSender<u32>,
    ended_rx: mpsc::UnboundedReceiver<u32>,
    runs: Runs,
}

impl Dispatch {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        lock_queue(&self.queue)
    }

    /// Hands a drained backlog's memory back to the system, outside the
    /// queue's lock (the handles take it at every event).
    fn drained(&self) {
        if self.queue().drained() {
            trim_heap();
        }
    }

    /// Every event taken has run, and no more can come.
    fn finished(&self) -> bool {
        let q = self.queue();
        (self.handles_gone || q.closed) && q.is_empty()
    }

    /// One step: a hook's end noted, a hook started, an event taken, or
    /// a line said. Cancel-safe: what a step takes is handled in the same
    /// poll.
    async fn step(&mut self) {
        self.runs.reap();
        let (ready, backlog) = {
            let q = self.queue();
            (q.has_ready(), q.backlog.due())
        };
        let due = self.runs.failures().due();
        tokio::select! {
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                self.runs.failures().flush(Instant::now());
            }
            () = tokio::time::sleep_until(backlog.unwrap_or_else(Instant::now)), if backlog.is_some() => {
                self.queue().look(Instant::now());
            }
            node = self.ended_rx.recv() => {
                if let Some(node) = node {
                    self.queue().ended(node);
                }
                self.drained();
            }
            slot = self.slots.clone().acquire_owned(), if ready => {
                let Ok(slot) = slot else {
                    unreachable!("the semaphore is never closed")
                };
                // Only the runner takes events: still there.
                let next = self.queue().start();
                if let Some(ev) = next {
                    self.runs.start(ev, slot, self.ended_tx.clone());
                }
                self.drained();
            }
            woken = self.woken.recv(), if !self.handles_gone => {
                // An event queued, or a backlog to look at: seen at the
                // next step.
                self.handles_gone = woken.is_none();
            }
        }
    }
}

/// Runs a hook for each event queued, `concurrency` at a time and one at a
/// time per node, until shutdown (see [`Hooks::shutdown`]) or until every
/// handle is gone.
async fn dispatch(
    opts: HookOptions,
    kill_wait: Duration,
    failures: Failures,
    queue: Arc<Mutex<Queue>>,
    woken: mpsc::Receiver<()>,
    mut stop: watch::Receiver<Option<Duration>>,
    metrics: Arc<Metrics>,
) {
    let (ended_tx, ended_rx) = mpsc::unbounded_channel();
    let mut d = Dispatch {
        queue,
        woken,
        handles_gone: false,
        slots: Arc::new(Semaphore::new(opts.concurrency.max(1))),
        ended_tx,
        ended_rx,
        runs: Runs {
            opts: Arc::new(opts),
            kill_wait,
            metrics: metrics.clone(),
            killed: Arc::new(AtomicUsize::new(0)),
            unstarted: Arc::new(AtomicUsize::new(0)),
            failures: Arc::new(Mutex::new(failures)),
            set: JoinSet::new(),
        },
    };
    let grace = loop {
        if d.finished() {
            // Every handle is gone, and what they queued has run.
            while d.runs.set.join_next().await.is_some() {}
            d.runs.failures().say();
            d.queue().backlog.end(Instant::now(), 0);
            return;
        }
        tokio::select! {
            () = d.step() => {}
            grace = stopped(&mut stop) => break grace,
        }
    };

    // Shutdown: no more events; the queued ones still start, as slots and
    // their nodes free up, within the grace.
    d.queue().closed = true;
    let drain = async {
        while !d.finished() {
            d.step().await;
        }
        while d.runs.set.join_next().await.is_some() {}
    };
    let drained = tokio::time::timeout(grace, drain).await.is_ok();
    // The failures not said yet, before the hooks killed now; and the
    // backlog's summary, if one goes on.
    d.runs.failures().say();
    {
        let mut q = d.queue();
        let waiting = q.waiting;
        q.backlog.end(Instant::now(), waiting);
    }
    if drained {
        return;
    }
    let mut never_run = d.queue().waiting;
    // Aborting a hook's task drops its `Group`, which kills the group and
    // counts it in `killed`. A task aborted before its hook's shell was
    // started (before it first ran, or while the spawner thread was at
    // it): its event never ran either.
    d.runs.set.abort_all();
    while d.runs.set.join_next().await.is_some() {}
    // A hook that failed on another worker between the line above and the
    // abort: said too (nothing, if none did).
    d.runs.failures().say();
    let killed = d.runs.killed.load(Ordering::Relaxed);
    never_run += d.runs.unstarted.load(Ordering::Relaxed);
    for _ in 0..never_run {
        metrics.hook_failed(SHUTDOWN);
    }
    if killed + never_run > 0 {
        tracing::warn!(
            killed,
            never_run,
            grace_ms = grace.as_millis() as u64,
            "shutdown grace over: hooks still running killed with their process groups, \
             events still queued never passed to --on-event"
        );
    }
}

/// Says, when dropped, that a node's hook has ended (its task ended, or
/// was dropped), so that the node's next one may start.
struct Ended {
    node: u32,
    tx: mpsc::UnboundedSender<u32>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        // The runner is gone only when nothing waits for this any more.
        let _ = self.tx.send(self.node);
    }
}

/// The hooks started, each on its own task.
struct Runs {
    opts: Arc<HookOptions>,
    /// [`KILL_WAIT`], shorter in tests.
    kill_wait: Duration,
    metrics: Arc<Metrics>,
    /// Hooks killed because their task was dropped mid-run.
    killed: Arc<AtomicUsize>,
    /// Tasks spawned that have not started their hook's shell yet.
    unstarted: Arc<AtomicUsize>,
    failures: Arc<Mutex<Failures>>,
    set: JoinSet<()>,
}

impl Runs {
    /// Runs the hook for `ev` in `slot`, which is free again once it ends;
    /// then its node's end is sent on `ended`.
    fn start(&mut self, ev: Event, slot: OwnedSemaphorePermit, ended: mpsc::UnboundedSender<u32>) {
        let (opts, kill_wait, m) = (self.opts.clone(), self.kill_wait, self.metrics.clone());
        let (killed, unstarted) = (self.killed.clone(), self.unstarted.clone());
        let failures = self.failures.clone();
        let ended = Ended {
            node: ev.node_id,
            tx: ended,
        };
        unstarted.fetch_add(1, Ordering::Relaxed);
        self.set.spawn(async move {
            let counts = Counts {
                m: &m,
                killed: &killed,
                unstarted: &unstarted,
                failures: &failures,
            };
            run_one(&opts, kill_wait, &ev, counts).await;
            drop(slot);
            drop(ended);
        });
    }

    /// Forgets the hooks that have ended.
    fn reap(&mut self) {
        while self.set.try_join_next().is_some() {}
    }

    fn failures(&self) -> MutexGuard<'_, Failures> {
        lock_failures(&self.failures)
    }
}

fn lock_failures(failures: &Mutex<Failures>) -> MutexGuard<'_, Failures> {
    // Counters: nothing in them is left half-changed by a panic.
    failures.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a hook failed, of the reasons summed up by [`Failures`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Its shell could not be started.
    Spawn,
    /// It exited with a status other than 0.
    Exit,
    /// It was killed at its timeout.
    Timeout,
    /// It could not be waited for.
    Wait,
}

impl Failure {
    /// Its `hb_hook_failures_total` reason.
    fn reason(self) -> &'static str {
        match self {
            Failure::Spawn => "spawn",
            Failure::Exit => "exit",
            Failure::Timeout => "timeout",
            Failure::Wait => "wait",
        }
    }
}

/// The hooks that failed and were not logged one by one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Failed {
    count: u64,
    spawn: u64,
    exit: u64,
    timeout: u64,
    wait: u64,
    first_seq: u64,
    last_seq: u64,
}

impl Failed {
    fn add(&mut self, why: Failure, seq: u64) {
        if self.count == 0 {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.count += 1;
        *match why {
            Failure::Spawn => &mut self.spawn,
            Failure::Exit => &mut self.exit,
            Failure::Timeout => &mut self.timeout,
            Failure::Wait => &mut self.wait,
        } += 1;
    }
}

/// The lines about hooks failing: at most one every `every`. The first
/// failure after `every` with no such line is logged in full, by its
/// caller ([`Failures::failed`]); those after it are counted, and summed
/// up in one line when `every` has passed since the last line: while
/// they go on (at the next failure, or when it is due, see
/// [`Failures::due`]), once a hook succeeds again (which ends the run),
/// and at shutdown. So a broken hook logs a line a minute, however many
/// events come, and so does one that fails for every other event.
#[derive(Debug)]
struct Failures {
    every: Duration,
    /// When the last line about failures was logged.
    last_line: Option<Instant>,
    /// A run of failures going on: those not logged yet, and whether a
    /// hook has succeeded since the last of them.
    run: Option<(Failed, bool)>,
}

impl Failures {
    fn every(every: Duration) -> Failures {
        Failures {
            every,
            last_line: None,
            run: None,
        }
    }

    /// A line about failures was logged less than `every` ago.
    fn quiet(&self, now: Instant) -> bool {
        self.last_line
            .is_some_and(|at| now.saturating_duration_since(at) < self.every)
    }

    /// Counts the failure of event `seq`'s hook; true when the caller is
    /// to log it in full (the first of a run, with no line about failures
    /// for `every`).
    fn failed(&mut self, why: Failure, seq: u64, now: Instant) -> bool {
        if self.run.is_none() && !self.quiet(now) {
            self.run = Some((Failed::default(), false));
            self.last_line = Some(now);
            return true;
        }
        let (failed, recovered) = self.run.get_or_insert_default();
        failed.add(why, seq);
        *recovered = false;
        self.flush(now);
        false
    }

    /// A hook succeeded: the run of failures ends, once what it has not
    /// said is said.
    fn succeeded(&mut self, now: Instant) {
        match &mut self.run {
            None => {}
            Some((failed, _)) if failed.count == 0 => self.run = None,
            Some((_, recovered)) => {
                *recovered = true;
                self.flush(now);
            }
        }
    }

    /// When the failures not said yet are to be said, if any are.
    fn due(&self) -> Option<Instant> {
        match &self.run {
            Some((failed, _)) if failed.count > 0 => Some(
                self.last_line
                    .map_or_else(Instant::now, |at| at + self.every),
            ),
            _ => None,
        }
    }

    /// Says the failures not said yet, unless a line about failures was
    /// logged less than `every` ago.
    fn flush(&mut self, now: Instant) {
        if !self.quiet(now) && self.say() {
            self.last_line = Some(now);
        }
    }

    /// Says the failures not said yet, if any (at once: at shutdown too),
    /// and ends the run if hooks have succeeded since; true if it said
    /// something.
    fn say(&mut self) -> bool {
        let Some((failed, recovered)) = &mut self.run else {
            return false;
        };
        if failed.count == 0 {
            return false;
        }
        let f = std::mem::take(failed);
        let what = if *recovered {
            self.run = None;
            "hooks succeed again, after more failures than the one logged"
        } else {
            "hooks failed since the last line about them (not logged one by one)"
        };
        tracing::warn!(
            failed = f.count,
            exit = f.exit,
            timeout = f.timeout,
            spawn = f.spawn,
            wait = f.wait,
            first_seq = f.first_seq,
            last_seq = f.last_seq,
            "{what}"
        );
        true
    }
}

/// What a hook's task counts, and where.
struct Counts<'a> {
    m: &'a Metrics,
    /// Hooks killed because their task was dropped mid-run.
    killed: &'a AtomicUsize,
    /// Tasks spawned that have not started their hook's shell yet.
    unstarted: &'a AtomicUsize,
    failures: &'a Mutex<Failures>,
}

impl Counts<'_> {
    /// Counts a hook ended well.
    fn ok(&self) {
        self.m.hook_ok();
        lock_failures(self.failures).succeeded(Instant::now());
    }

    /// Counts a hook failed; true when it is to be logged in full (see
    /// [`Failures`]).
    fn failed(&self, why: Failure, ev: &Event) -> bool {
        self.m.hook_failed(why.reason());
        lock_failures(self.failures).failed(why, ev.seq, Instant::now())
    }
}

/// A running hook's process group, led by its shell (`process_group(0)`,
/// so the group's id is the shell's), killed whole when the hook ends:
/// when its shell exits (what it left running in the background), at its
/// timeout, or when its task is dropped mid-run (the shutdown grace ran
/// out, or the runtime is going away). The shell's own `kill_on_drop`
/// reaches only the shell: what it started would live on, orphaned, and
/// finish its work (or half of it) with no one watching.
struct Group<'a> {
    pgid: i32,
    /// Until the shell is reaped (an exited shell is reaped only after
    /// the kill, see [`exited`]); after, its id may be reused.
    live: bool,
    ev: &'a Event,
    m: &'a Metrics,
    killed: &'a AtomicUsize,
}

impl Group<'_> {
    /// Kills every process of the group.
    fn kill(&mut self) {
        if self.live && self.pgid > 0 {
            // SAFETY: plain kill(2). The shell is not reaped yet (`live`),
            // so the id is still its group's; never 0 (our own group).
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        }
        self.live = false;
    }
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if self.live {
            self.kill();
            self.killed.fetch_add(1, Ordering::Relaxed);
            self.m.hook_failed(SHUTDOWN);
            tracing::warn!(
                node_id = self.ev.node_id,
                event = %self.ev.event,
                "hook still running at shutdown, killed with its process group"
            );
        }
    }
}

async fn run_one(opts: &HookOptions, kill_wait: Duration, ev: &Event, counts: Counts<'_>) {
    let Counts {
        m,
        killed,
        unstarted,
        ..
    } = counts;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&opts.command)
        .env("HB_EVENT", ev.event.name())
        .env("HB_NODE_ID", ev.node_id.to_string())
        .env("HB_PREVIOUS", ev.previous.name())
        .env("HB_STATE", ev.state.name())
        .env("HB_PHI", format!("{:.3}", ev.phi))
        .env("HB_GENERATION", ev.generation.to_string())
        .env(
            "HB_LAST_SEEN_MS",
            ev.last_seen_ms.map(|v| v.to_string()).unwrap_or_default(),
        )
        .env("HB_TS", &ev.ts)
        .env("HB_SEQ", ev.seq.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Its own process group, so that killing it kills whatever it
        // started (`Group`).
        .process_group(0)
        .kill_on_drop(true);
    // The monitor's threads block SIGHUP (`set_sighup_blocked`), and a
    // child inherits its spawning thread's mask: a hook gets none blocked.
    // It gets the soft limit of open files the monitor inherited back (see
    // `prepare_process`). Its shell gets SIGKILL when the monitor dies
    // (from the thread that forks it, which lives as long as the process:
    // `spawn_hook`); if the monitor is already gone, it exits at once.
    let nofile = super::inherited_nofile();
    let monitor = std::process::id() as libc::pid_t;
    // SAFETY: sigemptyset, sigprocmask, getrlimit, setrlimit, prctl,
    // getppid and _exit are async-signal-safe, and the closure touches
    // nothing else.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The monitor died before the prctl: nothing would kill this.
            if libc::getppid() != monitor {
                libc::_exit(1);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(soft) = nofile {
                let mut r: libc::rlimit = std::mem::zeroed();
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
                    r.rlim_cur = soft.min(r.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &r);
                }
            }
            Ok(())
        });
    }
    let spawned = spawn_hook(cmd).await;
    // Aborted before this (shutdown), it counts as never started: if the
    // spawner thread started the shell meanwhile, it is killed with its
    // process group (`Started`).
    unstarted.fetch_sub(1, Ordering::Relaxed);
    let spawned = match spawned {
        Ok(spawned) => spawned.take(),
        Err(e) => {
            if counts.failed(Failure::Spawn, ev) {
                tracing::error!(
                    error = %e,
                    command = %opts.command,
                    node_id = ev.node_id,
                    seq = ev.seq,
                    "cannot start hook (later failures counted, and summed up at most once a minute)"
                );
            }
            return;
        }
    };
    // Before `child`, so dropped after it: the shell is reaped (or handed
    // to tokio's reaping) before the orphan reaper may take it.
    let _shell = spawned.0;
    let mut child = spawned.1;
    // After `child`, so dropped first: the group is killed while the
    // shell, its leader, is still unreaped.
    let mut group = Group {
        pgid: child.id().map_or(0, |pid| pid as i32),
        live: true,
        ev,
        m,
        killed,
    };
    let mut json = serde_json::to_vec(ev).unwrap_or_default();
    json.push(b'\n');
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that ignores its stdin closes the pipe: not an error.
            let _ = stdin.write_all(&json).await;
        }
        exited(group.pgid).await
    };
    match tokio::time::timeout(opts.timeout, run).await {
        Ok(ended) => {
            let waited = match ended {
                Ok(()) => {
                    // What the shell left in its group (`cmd &`) ends
                    // with it. Whether anything was left is not known:
                    // the shell, unreaped, is in the group still.
                    group.kill();
                    // At once: the shell has exited, only reaping is left.
                    child.wait().await
                }
                Err(e) => {
                    // Not waitable, so maybe reaped: the group is left
                    // alone.
                    group.live = false;
                    Err(e)
                }
            };
            match waited {
                Ok(status) if status.success() => counts.ok(),
                Ok(status) => {
                    if counts.failed(Failure::Exit, ev) {
                        tracing::warn!(
                            node_id = ev.node_id,
                            event = %ev.event,
                            seq = ev.seq,
                            %status,
                            "hook failed (later failures counted, and summed up at most once a minute)"
                        );
                    }
                }
                Err(e) => {
                    if counts.failed(Failure::Wait, ev) {
                        tracing::error!(
                            error = %e,
                            node_id = ev.node_id,
                            seq = ev.seq,
                            "cannot wait for hook (later failures counted, and summed up at most once a minute)"
                        );
                    }
                }
            }
        }
        Err(_) => {
            group.kill();
            if tokio::time::timeout(kill_wait, child.wait()).await.is_ok() {
                if counts.failed(Failure::Timeout, ev) {
                    tracing::warn!(
                        node_id = ev.node_id,
                        event = %ev.event,
                        seq = ev.seq,
                        timeout_ms = opts.timeout.as_millis() as u64,
                        "hook timed out, killed with its process group (later failures counted, \
                         and summed up at most once a minute)"
                    );
                }
                return;
            }
            // Given up on, so that its slot is freed. `child` is dropped
            // here, unreaped: `kill_on_drop` sends its shell one more
            // SIGKILL (still our child, so still its id), and tokio's
            // orphan queue reaps it once it ends. `group` is no longer
            // live: its id is never used again, reaped or not.
            // Each logged: a process that may never end, which someone
            // will have to look for (these are few: each holds its slot
            // for its timeout and the kill wait).
            m.hook_failed(UNKILLABLE);
            tracing::error!(
                node_id = ev.node_id,
                event = %ev.event,
                pid = group.pgid,
                timeout_ms = opts.timeout.as_millis() as u64,
                kill_wait_ms = kill_wait.as_millis() as u64,
                "hook timed out and still running after SIGKILL (uninterruptible sleep, such as on a hung NFS or \
                 FUSE mount?): its slot is freed, it is reaped whenever it ends"
            );
        }
    }
}

/// A hook's shell just started, on its way from the spawner thread to its
/// task: until the task takes it (and watches it in a [`Group`]), it is
/// killed here with its whole process group if dropped, not only the
/// shell (`kill_on_drop`): its task is gone (the shutdown grace ran out,
/// or the runtime is going away), whether before the spawner's answer or
/// after it was sent and before it was received.
struct Started(Option<(Shell, Child)>);

impl Started {
    /// The shell, for its task to watch: no longer killed here.
    fn take(mut self) -> (Shell, Child) {
        self.0.take().expect("taken once, by value")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some((shell, child)) = self.0.take() {
            if shell.0 > 0 {
                // SAFETY: kill(2) of the group our unreaped child leads.
                unsafe { libc::kill(-shell.0, libc::SIGKILL) };
            }
            // Reaped by tokio's orphan queue, before `shell` lets the
            // orphan reaper take it.
            drop(child);
            drop(shell);
        }
    }
}

/// The hook shells started and not yet reaped by their tasks (nor handed
/// to tokio's own reaping, by a task that let go of its shell unreaped):
/// the orphan reaper leaves these alone. Held across a spawn and the
/// noting of its pid ([`spawn_shell`]), and across the reaper's look at a
/// child and its reaping, so that a shell that exits at once is never
/// taken for an orphan: its task gets its status.
static SHELLS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// The orphan reaper runs (once per process).
static REAPING: AtomicBool = AtomicBool::new(false);

fn shells() -> MutexGuard<'static, BTreeSet<i32>> {
    // A set of pids: nothing in it is left half-changed by a panic.
    SHELLS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A hook's shell, in [`SHELLS`] until this is dropped, after its
/// `Child`: reaped by then, or handed to tokio's orphan queue. Then the
/// orphan reaper may reap it first, which tokio takes as reaped.
struct Shell(i32);

impl Drop for Shell {
    fn drop(&mut self) {
        shells().remove(&self.0);
    }
}

/// A hook's shell to start on the spawner thread, and where to say how
/// it went.
struct Spawn {
    cmd: Command,
    /// The runtime the shell's pipes and exit are watched on.
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<std::io::Result<Started>>,
}

/// The spawner thread's queue, once it is started; never dropped, so the
/// thread lives as long as the process.
static SPAWNER: Mutex<Option<std::sync::mpsc::Sender<Spawn>>> = Mutex::new(None);

/// Starts a hook's shell from the spawner thread. Its parent-death signal
/// (see `run_one`) comes when the thread that forked it exits: a runtime
/// worker may end before the process does (one given up by
/// `block_in_place`, a blocking-pool thread idle 10 s), which would kill a
/// hook running then.
async fn spawn_hook(cmd: Command) -> std::io::Result<Started> {
    let gone = || std::io::Error::other("the hook spawner thread is gone");
    let (reply, answer) = oneshot::channel();
    let spawn = Spawn {
        cmd,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    spawner()?.send(spawn).map_err(|_| gone())?;
    answer.await.map_err(|_| gone())?
}

/// The spawner thread's queue, started first if need be.
fn spawner() -> std::io::Result<std::sync::mpsc::Sender<Spawn>> {
    let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tx) = &*spawner {
        return Ok(tx.clone());
    }
    let (tx, rx) = std::sync::mpsc::channel::<Spawn>();
    std::thread::Builder::new()
        .name("hb-hook-spawn".into())
        .spawn(move || {
            for Spawn {
                mut cmd,
                runtime,
                reply,
            } in rx
            {
                let _runtime = runtime.enter();
                // Its task gone (shutdown), the hook is killed (`Started`),
                // here or wherever its answer is dropped unreceived.
                drop(reply.send(spawn_shell(&mut cmd)));
            }
        })?;
    *spawner = Some(tx.clone());
    Ok(tx)
}

/// Starts a hook's shell, and notes it in [`SHELLS`] before the orphan
/// reaper can see it exit.
fn spawn_shell(cmd: &mut Command) -> std::io::Result<Started> {
    let mut shells = shells();
    let child = cmd.spawn()?;
    // Known until the child is reaped, which it cannot be yet.
    let pid = child.id().map_or(0, |pid| pid as i32);
    shells.insert(pid);
    Ok(Started(Some((Shell(pid), child))))
}

/// Reaps the monitor's children that are not hook shells, at each SIGCHLD
/// and every [`REAP_EVERY`]; runs only when the monitor is PID 1. Then it
/// adopts every process orphaned in its PID namespace: a hook's `cmd &`
/// killed when its shell exits, a hook's `curl` killed with its shell at
/// the timeout, whatever `setsid -f` started, once it ends. No init is
/// there to reap them: their zombies would pile up until the pid limit,
/// and hooks, and the monitor's own threads, could not start.
async fn reap_orphans() {
    let mut sigchld = signal(SignalKind::child())
        .inspect_err(|e| {
            tracing::warn!(error = %e, "no SIGCHLD handler: orphans reaped every second only");
        })
        .ok();
    loop {
        match &mut sigchld {
            Some(sigchld) => {
                let _ = tokio::time::timeout(REAP_EVERY, sigchld.recv()).await;
            }
            None => tokio::time::sleep(REAP_EVERY).await,
        }
        reap_orphans_now();
    }
}

/// Reaps the children that have exited and are not hook shells, up to
/// [`REAP_MOST`], and says how many. A hook shell that has exited and is
/// not reaped yet by its task ends the look when the kernel finds it
/// first (its task reaps it within moments; the next look, at the next
/// SIGCHLD or within [`REAP_EVERY`], goes on past it).
fn reap_orphans_now() -> usize {
    let shells = shells();
    let mut reaped = 0;
    for _ in 0..REAP_MOST {
        // SAFETY: a zeroed siginfo_t is valid, and waitid(2) only writes
        // it; with WNOHANG its pid stays 0 while no child has exited, and
        // WNOWAIT leaves the child unreaped.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r != 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break; // ECHILD: no child at all.
        }
        // SAFETY: as above.
        let pid = unsafe { info.si_pid() };
        if pid == 0 || shells.contains(&pid) {
            break;
        }
        // SAFETY: waitpid(2) of a child that has exited, not a hook shell;
        // under the lock, so no shell can have taken its id since.
        if unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } != pid {
            break;
        }
        reaped += 1;
    }
    reaped
}

/// Waits until the hook's shell `pid` has exited, without reaping it: the
/// zombie keeps its id, and so its process group's, from being reused
/// until `Child::wait` reaps it. A pidfd says when (it is readable once
/// the process has exited); without one (a kernel before 5.3, no file
/// descriptor left), a check every [`EXIT_POLL`].
async fn exited(pid: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::other("hook's process id unknown"));
    }
    exited_via(pid, pidfd(pid)).await
}

/// A pidfd of our child `pid`, registered to be waited on; `None` if the
/// kernel gives none.
fn pidfd(pid: i32) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open(2) takes a pid and flags, and returns a new file
    // descriptor or -1. `pid` is our child, not reaped: still the shell.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0)
        // SAFETY: a new descriptor, owned by nothing else. It stays open
        // while `AsyncFd` owns it.
        .then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
        .and_then(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok())
}

/// `exited`, waiting on `pidfd` if there is one. Fails only if the
/// shell cannot be waited for (reaped by someone else: its id, and its
/// group's, may be another's already).
async fn exited_via(pid: i32, mut pidfd: Option<AsyncFd<OwnedFd>>) -> std::io::Result<()> {
    // Registered first, so that an exit after the check below wakes it.
    while !has_exited(pid)? {
        let woken = match &pidfd {
            Some(fd) => fd.readable().await.map(|mut r| r.clear_ready()).is_ok(),
            None => false,
        };
        if !woken {
            // No pidfd, or it cannot be waited on.
            pidfd = None;
            tokio::time::sleep(EXIT_POLL).await;
        }
    }
    Ok(())
}

/// Whether our child `pid` has exited, leaving it unreaped (`WNOWAIT`).
fn has_exited(pid: i32) -> std::io::Result<bool> {
    loop {
        // SAFETY: a zeroed siginfo_t is valid, and waitid(2) only writes
        // it; with WNOHANG its pid stays 0 while no child has exited.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r == 0 {
            // SAFETY: as above; set by waitid for a child that exited.
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::monitor::state::{EventKind, Status};

    fn ev(node_id: u32) -> Event {
        crate::monitor::events::test_event(node_id.into())
    }

    fn hook(command: String, concurrency: usize, timeout: Duration, queue: usize) -> HookOptions {
        HookOptions {
            command,
            concurrency,
            timeout,
            queue,
        }
    }

    /// A fresh directory for one test's files.
    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hb-hook-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A command that starts `sleep 30` in the background (in the hook's
    /// process group, as sh without job control does), writes its pid to
    /// `pid_file` and waits for it.
    fn grandchild_sleep(pid_file: &Path) -> String {
        format!(
            "sleep 30 & echo $! > {0}.tmp; mv {0}.tmp {0}; wait",
            pid_file.display()
        )
    }

    /// The pid `grandchild_sleep` wrote to `pid_file`.
    fn read_pid(pid_file: &Path) -> i32 {
        std::fs::read_to_string(pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Whether `/proc/PID/stat` says zombie (the state after the name).
    fn zombie_stat(stat: &str) -> bool {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    }

    /// A zombie: exited, not reaped.
    fn zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| zombie_stat(&s))
    }

    /// Dead: no such process, or a zombie (killed, and not reaped yet by
    /// whoever adopted it).
    fn gone(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| zombie_stat(&s))
    }

    /// Polls `f` for up to 10 s (generous: a loaded machine is slow to
    /// start processes, and nothing here asserts how long things take).
    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{what}: not reached");
    }

    async fn wait_for(m: &Metrics, f: impl Fn(&Metrics) -> bool) {
        for _ in 0..200 {
            if f(m) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "condition not reached: ok {} timeout {} unkillable {} dropped {} exit {} spawn {} wait {} shutdown {}",
            m.hooks_ok(),
            m.hook_failures("timeout"),
            m.hook_failures(UNKILLABLE),
            m.hook_failures("dropped"),
            m.hook_failures("exit"),
            m.hook_failures("spawn"),
            m.hook_failures("wait"),
            m.hook_failures(SHUTDOWN)
        );
    }

    /// On a current-thread runtime: lets every task that can run do so
    /// (the runner takes what it can off its queue) before going on.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hook_gets_env_and_stdin() {
        let dir = test_dir("env");
        let out = dir.join("out");
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook(
                format!(
                    "echo \"$HB_EVENT $HB_NODE_ID $HB_PREVIOUS $HB_LAST_SEEN_MS\" > {0}.tmp; cat >> {0}.tmp; mv {0}.tmp {0}",
                    out.display()
                ),
                2,
                Duration::from_secs(5),
                8,
            ),
            m.clone(),
        );
        h.submit(&ev(42));
        wait_for(&m, |m| m.hooks_ok() == 1).await;
        let text = std::fs::read_to_string(&out).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next().unwrap(), "dead 42 suspect 3000");
        let v: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(v["node_id"], 42);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The monitor's threads block SIGHUP until its handler runs; a hook
    /// must not inherit that (a `timeout -s HUP` in it would never fire).
    #[test]
    fn hooks_start_with_no_signal_blocked() {
        let dir = test_dir("sigmask");
        let out = dir.join("out");
        // A thread of its own: the mask is per thread, and the runtime's
        // threads inherit it, as the monitor's do.
        std::thread::spawn(move || {
            crate::monitor::set_sighup_blocked(true);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let m = Arc::new(Metrics::new());
                let h = Hooks::start(
                    hook(
                        format!(
                            "grep SigBlk /proc/self/status > {0}.tmp; mv {0}.tmp {0}",
                            out.display()
                        ),
                        1,
                        Duration::from_secs(5),
                        1,
                    ),
                    m.clone(),
                );
                h.submit(&ev(1));
                wait_for(&m, |m| m.hooks_ok() == 1).await;
            });
            let text = std::fs::read_to_string(&out).unwrap();
            let mask = text.split_whitespace().nth(1).unwrap();
            assert!(mask.chars().all(|c| c == '0'), "{text}");
        })
        .join()
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// No more than `queue` + [`PAST_BOUND_MOST`] events wait.
    fn no_node_past_the_bound() -> Tuning {
        Tuning {
            past_bound_most: 0,
            ..Tuning::default()
        }
    }

    // One thread: the runner does nothing while the test submits, so what
    // gets through is exact, however loaded the machine. The excess past
    // the queue's last bound (here `queue` itself: no node's event may
    // wait past it) is dropped.
    #[tokio::test(flavor = "current_thread")]
    async fn slow_hooks_are_killed_and_excess_is_dropped() {
        const CONCURRENCY: usize = 2;
        const QUEUE: usize = 3;
        const EVENTS: u32 = 10;
        let m = Arc::new(Metrics::new());
        let h = Hooks::start_with(
            hook(
                "sleep 30".into(),
                CONCURRENCY,
                Duration::from_millis(200),
                QUEUE,
            ),
            m.clone(),
            no_node_past_the_bound(),
        );
        settle().await;
        for i in 0..EVENTS {
            h.submit(&ev(i)); // never blocks
        }
        // QUEUE wait for a slot; the rest are dropped at once.
        assert_eq!(m.hook_failures("dropped"), u64::from(EVENTS) - QUEUE as u64);
        // Each one taken is killed at its timeout, not waited for (30 s):
        // `wait_for` gives up long before.
        wait_for(&m, |m| m.hook_failures("timeout") == QUEUE as u64).await;
        assert_eq!(m.hooks_ok(), 0);
    }

    // `queue` (with no node's event past it) counts every event waiting:
    // none is held aside by the runner while it waits for a slot.
    #[tokio::test(flavor = "current_thread")]
    async fn queue_bounds_the_events_waiting_exactly() {
        const CONCURRENCY: usize = 1;
        const QUEUE: usize = 2;
        const BURST: u32 = 5;
        let m = Arc::new(Metrics::new());
        let h = Hooks::start_with(
            hook(
                "sleep 60".into(),
                CONCURRENCY,
                Duration::from_secs(60),
                QUEUE,
            ),
            m.clone(),
            no_node_past_the_bound(),
        );
        settle().await;
        for i in 0..BURST {
            h.submit(&ev(i));
        }
        assert_eq!(m.hook_failures("dropped"), u64::from(BURST) - QUEUE as u64);
        // The runner starts CONCURRENCY of them, which frees as many places.
        settle().await;
        for i in BURST..2 * BURST {
            h.submit(&ev(i));
        }
        let taken = (CONCURRENCY + QUEUE) as u64;
        assert_eq!(m.hook_failures("dropped"), u64::from(2 * BURST) - taken);
        // The hook running is killed, those waiting never run.
        h.shutdown(Duration::from_millis(100)).await;
        assert_eq!(m.hook_failures(SHUTDOWN), taken);
    }

    // The events waiting for their node's previous hook count in `queue`
    // as those waiting for a slot do, though slots are free: at it, the
    // node's newer events replace its newest waiting.
    #[tokio::test(flavor = "current_thread")]
    async fn events_waiting_for_their_node_count_in_the_queue() {
        const QUEUE: usize = 2;
        const BURST: u64 = 5;
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook("sleep 60".into(), 4, Duration::from_secs(60), QUEUE),
            m.clone(),
        );
        settle().await;
        let of_node_1 = |seq| Event {
            node_id: 1,
            ..crate::monitor::events::test_event(seq)
        };
        for seq in 1..=BURST {
            h.submit(&of_node_1(seq));
        }
        assert_eq!(m.hook_failures(SUPERSEDED), BURST - QUEUE as u64);
        // The first starts, which frees its place; the second waits for it.
        settle().await;
        for seq in BURST + 1..=2 * BURST {
            h.submit(&of_node_1(seq));
        }
        let taken = 1 + QUEUE as u64;
        assert_eq!(m.hook_failures(SUPERSEDED), 2 * BURST - taken);
        assert_eq!(m.hook_failures(DROPPED), 0);
        // The hook running is killed, those waiting never run.
        h.shutdown(Duration::from_millis(100)).await;
        assert_eq!(m.hook_failures(SHUTDOWN), taken);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_kills_the_whole_process_group_of_a_hook_still_running() {
        let dir = test_dir("shutdown-kill");
        let pid_file = dir.join("pid");
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook(grandchild_sleep(&pid_file), 1, Duration::from_secs(60), 4),
            m.clone(),
        );
        h.submit(&ev(1));
        until("the hook started its child", || pid_file.exists()).await;
        let pid = read_pid(&pid_file);
        assert!(!gone(pid));
        h.submit(&ev(2)); // waits for the slot, never gets it
        h.shutdown(Duration::from_millis(200)).await;
        // Not only the shell: the sleep it started too.
        until("the hook's child killed", || gone(pid)).await;
        assert_eq!(m.hook_failures(SHUTDOWN), 2);
        assert_eq!(m.hooks_ok() + m.hook_failures("exit"), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_waits_for_hooks_running_and_queued_within_the_grace() {
        let dir = test_dir("shutdown-wait");
        let out = dir.join("out");
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook(
                format!("sleep 0.2; echo $HB_NODE_ID >> {}", out.display()),
                1,
                Duration::from_secs(60),
                4,
            ),
            m.clone(),
        );
        for i in 1..=3 {
            h.submit(&ev(i));
        }
        let clone = h.clone();
        // Far longer than the three take, one after the other.
        h.shutdown(Duration::from_secs(60)).await;
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), ["1", "2", "3"]);
        assert_eq!(m.hooks_ok(), 3);
        assert_eq!(m.hook_failures(SHUTDOWN), 0);
        // Shut down: events are no longer taken, from any handle, and
        // that is said once, however many come.
        let warnings = Warnings::of("hb::monitor::hooks");
        let _log = warnings.capture();
        for i in 4..=100 {
            clone.submit(&ev(i));
        }
        assert_eq!(m.hook_failures(SHUTDOWN), 97);
        let lines = warnings.taken();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].message.contains("nor any later one"), "{lines:#?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // The path without `shutdown` (an error return, a panic): dropping the
    // runtime drops the hook's task, and with it its whole process group.
    #[test]
    fn dropping_the_runtime_kills_the_whole_process_group_of_a_hook() {
        let dir = test_dir("drop");
        let pid_file = dir.join("pid");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let m = Arc::new(Metrics::new());
        let (h, pid) = rt.block_on(async {
            let h = Hooks::start(
                hook(grandchild_sleep(&pid_file), 1, Duration::from_secs(60), 4),
                m.clone(),
            );
            h.submit(&ev(1));
            until("the hook started its child", || pid_file.exists()).await;
            let pid = read_pid(&pid_file);
            (h, pid)
        });
        assert!(!gone(pid));
        drop(rt);
        drop(h);
        for _ in 0..500 {
            if gone(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(pid), "the hook's child outlived the runtime");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A shell the spawner thread started and handed over, but whose task
    /// was dropped before it took it (the shutdown grace ran out, or the
    /// runtime went away, in between): its whole process group is killed,
    /// not only the shell. The spawner is held (by `SHELLS`) so that the
    /// first shell is started only once its task waits; a second one,
    /// started after it on the same thread, is answered only once the
    /// first's answer was sent.
    #[tokio::test(flavor = "current_thread")]
    async fn a_shell_started_for_a_task_gone_meanwhile_is_killed_with_its_group() {
        let dir = test_dir("unreceived");
        let pid_file = dir.join("pid");
        let shell = |command: String| {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(command)
                .process_group(0)
                .kill_on_drop(true);
            cmd
        };
        let mut first = Box::pin(spawn_hook(shell(grandchild_sleep(&pid_file))));
        {
            let _spawner_held = shells();
            // Never polled again: dropped below.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(first.as_mut().poll(&mut cx).is_pending());
        }
        let second = spawn_hook(shell("true".into())).await.unwrap();
        until("the first hook started its child", || pid_file.exists()).await;
        let pid = read_pid(&pid_file);
        assert!(!gone(pid));
        // Its answer is sent and never received.
        drop(first);
        until("the unreceived hook's child killed", || gone(pid)).await;
        drop(second);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A hook ends when its shell exits: what it left running in the
    /// background is killed then, not left to run unbounded (here 30 s,
    /// far past the hook's timeout). The hook itself succeeded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_processes_are_killed_when_the_hook_exits() {
        let dir = test_dir("background");
        let pid_file = dir.join("pid");
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook(
                format!(
                    "sleep 30 & echo $! > {0}.tmp; mv {0}.tmp {0}",
                    pid_file.display()
                ),
                1,
                Duration::from_secs(1),
                4,
            ),
            m.clone(),
        );
        h.submit(&ev(1));
        wait_for(&m, |m| m.hooks_ok() == 1).await;
        let pid = read_pid(&pid_file);
        until("the hook's background sleep killed", || gone(pid)).await;
        assert_eq!(m.hook_failures("timeout"), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A shell's exit is seen, through its pidfd or by polling, and the
    /// shell is left a zombie, so that its process group's id is not
    /// reused until it is reaped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exit_is_seen_with_the_shell_left_unreaped() {
        for with_pidfd in [true, false] {
            let mut child = Command::new("/bin/sh")
                .args(["-c", "sleep 0.1"])
                .spawn()
                .unwrap();
            let pid = child.id().unwrap() as i32;
            let fd = if with_pidfd { pidfd(pid) } else { None };
            assert_eq!(fd.is_some(), with_pidfd, "no pidfd (a kernel before 5.3?)");
            tokio::time::timeout(Duration::from_secs(10), exited_via(pid, fd))
                .await
                .expect("exit not seen")
                .unwrap();
            assert!(zombie(pid), "pidfd {with_pidfd}");
            assert!(child.wait().await.unwrap().success());
        }
    }

    use crate::test_log::Warnings;

    /// A hook backlog is logged in a few lines, not a pair per tick: when
    /// it starts (at once), at most every `backlog_every` while events
    /// go on being merged (what was merged since the last line), and when
    /// it is over (the whole backlog's count), from the runner's timer,
    /// with no later event to bring it. The counter counts every event
    /// merged, and the node's hook gets its newest one.
    // One thread: the runner does nothing while the test submits, and
    // every line is logged on it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_backlog_is_logged_in_a_few_lines() {
        const EVERY: Duration = Duration::from_millis(300);
        let warnings = Warnings::of("hb::monitor::hooks");
        let _log = warnings.capture();
        let dir = test_dir("backlog-log");
        let (go, out) = (dir.join("go"), dir.join("out"));
        let m = Arc::new(Metrics::new());
        // Each hook runs until `go` exists, then says its event.
        let h = Hooks::start_with(
            hook(
                format!(
                    "while [ ! -e {} ]; do sleep 0.01; done; echo $HB_NODE_ID $HB_SEQ >> {}",
                    go.display(),
                    out.display()
                ),
                1,
                Duration::from_secs(30),
                1,
            ),
            m.clone(),
            Tuning {
                backlog_every: EVERY,
                ..Tuning::default()
            },
        );
        let of_node_2 = |seq| Event {
            node_id: 2,
            ..crate::monitor::events::test_event(seq)
        };
        h.submit(&ev(1));
        settle().await; // running
        // Node 2's first waits; each later one replaces the one waiting.
        for seq in 2..=51 {
            h.submit(&of_node_2(seq));
        }
        let lines = warnings.taken();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].message.starts_with("hook backlog:"), "{lines:#?}");
        assert_eq!(lines[0].field("node_id"), Some("2"), "{lines:#?}");
        // The event replaced, as in the later lines' first_seq.
        assert_eq!(lines[0].field("seq"), Some("2"), "{lines:#?}");
        assert_eq!(lines[0].field("by_seq"), Some("3"), "{lines:#?}");
        assert_eq!(lines[0].field("waiting"), Some("1"), "{lines:#?}");
        let said = |n: usize| {
            let warnings = warnings.clone();
            move || warnings.taken().len() == n
        };
        // Still going on: what it merged since, once; nothing more while
        // nothing is merged.
        until("the backlog's second line", said(2)).await;
        tokio::time::sleep(3 * EVERY).await;
        let lines = warnings.taken();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[1].message.contains("goes on"), "{lines:#?}");
        assert_eq!(lines[1].field("superseded"), Some("48"), "{lines:#?}");
        assert_eq!(lines[1].field("first_seq"), Some("3"), "{lines:#?}");
        assert_eq!(lines[1].field("last_seq"), Some("50"), "{lines:#?}");
        for seq in 52..=71 {
            h.submit(&of_node_2(seq));
        }
        until("the backlog's third line", said(3)).await;
        let lines = warnings.taken();
        assert!(lines[2].message.contains("goes on"), "{lines:#?}");
        assert_eq!(lines[2].field("superseded"), Some("20"), "{lines:#?}");
        assert_eq!(lines[2].field("first_seq"), Some("51"), "{lines:#?}");
        assert_eq!(lines[2].field("last_seq"), Some("70"), "{lines:#?}");
        // Over: said from the timer, no event comes after.
        std::fs::write(&go, "").unwrap();
        wait_for(&m, |m| m.hooks_ok() == 2).await;
        until("the backlog's summary", said(4)).await;
        let lines = warnings.taken();
        assert!(lines[3].message.contains("over"), "{lines:#?}");
        assert_eq!(lines[3].field("superseded"), Some("69"), "{lines:#?}");
        assert_eq!(lines[3].field("dropped"), Some("0"), "{lines:#?}");
        assert_eq!(lines[3].field("first_seq"), Some("2"), "{lines:#?}");
        assert_eq!(lines[3].field("last_seq"), Some("70"), "{lines:#?}");
        h.shutdown(Duration::from_secs(10)).await;
        assert_eq!(warnings.taken().len(), 4, "{:#?}", warnings.taken());
        assert_eq!(m.hook_failures(SUPERSEDED), 69);
        assert_eq!(m.hook_failures(DROPPED), 0);
        let ran = std::fs::read_to_string(&out).unwrap();
        assert_eq!(ran.lines().collect::<Vec<_>>(), ["1 1", "2 71"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Reaped: no such process, or not our child (its id reused).
    fn reaped(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid != Some(std::process::id())
        })
    }

    /// A hook that its timeout's kill does not end is waited for no longer
    /// than the kill wait: then it is counted, logged with its pid, and its
    /// slot is freed for the next hook, and its node for its own next one;
    /// it is still killed and reaped in the end. A real one is in uninterruptible sleep (a hung NFS or FUSE
    /// mount), which a test cannot make; here the shell becomes perl, which
    /// escapes the group kill by moving to the test's own process group
    /// (`setpgrp`: sh has no builtin for it).
    // One thread: the lines logged are captured on it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_hook_that_outlives_its_kill_is_given_up_on() {
        let warnings = Warnings::of("hb::monitor::hooks");
        let _log = warnings.capture();
        let dir = test_dir("unkillable");
        let pid_file = dir.join("pid");
        let m = Arc::new(Metrics::new());
        // Node 1's first hook (seq 1) leaves its group, then says so, then
        // sleeps; the others succeed at once.
        let command = format!(
            "[ \"$HB_SEQ\" != 1 ] || exec perl -e 'setpgrp(0, getpgrp(getppid())) or die \"setpgrp: $!\"; \
             open(my $f, \">\", \"{0}.tmp\") or die; print $f \"$$\\n\"; close $f; \
             rename(\"{0}.tmp\", \"{0}\") or die; sleep 60'",
            pid_file.display()
        );
        let h = Hooks::start_with(
            hook(command, 1, Duration::from_secs(1), 4),
            m.clone(),
            Tuning {
                kill_wait: Duration::from_millis(300),
                ..Tuning::default()
            },
        );
        h.submit(&ev(1));
        h.submit(&ev(2)); // waits for the only slot
        // Waits for node 1's first hook, and then for the slot.
        h.submit(&Event {
            node_id: 1,
            ..ev(3)
        });
        until("the hook left its process group", || pid_file.exists()).await;
        let pid = read_pid(&pid_file);
        wait_for(&m, |m| m.hook_failures(UNKILLABLE) == 1).await;
        // Its slot is free, and so is its node: the next hooks ran.
        wait_for(&m, |m| m.hooks_ok() == 2).await;
        assert_eq!(m.hook_failures("timeout"), 0);
        let lines = warnings.taken();
        let given_up = lines
            .iter()
            .find(|l| l.message.contains("after SIGKILL"))
            .unwrap_or_else(|| panic!("not logged: {lines:#?}"));
        assert_eq!(given_up.field("pid"), Some(pid.to_string().as_str()));
        assert_eq!(given_up.field("node_id"), Some("1"));
        // Killed when given up on (`kill_on_drop`), and reaped by tokio.
        until("the hook given up on reaped", || reaped(pid)).await;
        h.shutdown(Duration::from_secs(5)).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// One node's hooks run one after another, in `seq` order: its next
    /// hook does not start before its previous one has ended, even with
    /// slots free, so a pager is never left with `dead` for a node whose
    /// `alive` came after. Another node's hook runs meanwhile, and its
    /// waiting neighbour does not hold a slot from it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nodes_hooks_run_in_order_and_others_run_meanwhile() {
        let dir = test_dir("per-node");
        let (log, go) = (dir.join("log"), dir.join("go"));
        let m = Arc::new(Metrics::new());
        // Seq 1 runs until `go` exists; every hook logs its start and end.
        let h = Hooks::start(
            hook(
                format!(
                    "echo start $HB_SEQ >> {0}; \
                     while [ $HB_SEQ = 1 ] && [ ! -e {1} ]; do sleep 0.01; done; \
                     echo end $HB_SEQ >> {0}",
                    log.display(),
                    go.display()
                ),
                2,
                Duration::from_secs(30),
                4,
            ),
            m.clone(),
        );
        let of_node = |seq, node_id| Event { node_id, ..ev(seq) };
        h.submit(&of_node(1, 7));
        h.submit(&of_node(2, 7));
        h.submit(&of_node(3, 8));
        let lines = || -> Vec<String> {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        };
        // Node 8's hook ran to its end while node 7's first one runs.
        // Its line is written before its shell exits and is counted.
        until("node 8's hook ended", || lines().contains(&"end 3".into())).await;
        wait_for(&m, |m| m.hooks_ok() == 1).await;
        // Node 7's second waits still, with a slot free.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = lines();
        assert!(before.contains(&"start 1".into()), "{before:?}");
        assert!(!before.contains(&"start 2".into()), "{before:?}");
        std::fs::write(&go, "").unwrap();
        wait_for(&m, |m| m.hooks_ok() == 3).await;
        let all = lines();
        let at = |line: &str| all.iter().position(|l| l == line).unwrap();
        assert!(at("end 1") < at("start 2"), "{all:?}");
        h.shutdown(Duration::from_secs(5)).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `node`'s event `seq` of `kind`, from `previous` to `state`.
    fn node_event(node_id: u32, seq: u64, kind: EventKind, previous: Status) -> Event {
        let state = match kind {
            EventKind::Suspect => Status::Suspect,
            EventKind::Dead => Status::Dead,
            _ => Status::Alive,
        };
        Event {
            node_id,
            event: kind,
            previous,
            state,
            ..crate::monitor::events::test_event(seq)
        }
    }

    /// What `Queue::add` does: below the bound every event waits, a
    /// node's in `seq` order; at it, a node's newer event replaces its
    /// newest waiting one, and a node with none waiting gets one (no more
    /// than `past_bound_most` such).
    #[test]
    fn at_the_bound_a_nodes_newer_event_replaces_its_newest_waiting() {
        let mut q = Queue::new(3, 2, BACKLOG_EVERY, Gauge::default());
        let of = |node, seq| node_event(node, seq, EventKind::Dead, Status::Suspect);
        assert_eq!(q.add(of(1, 1)), Taken::Queued);
        assert_eq!(q.add(of(1, 2)), Taken::Queued);
        assert_eq!(q.add(of(2, 3)), Taken::Queued);
        // At the bound: node 1's newest (2) replaced, then again.
        assert_eq!(q.add(of(1, 4)), Taken::Superseded(2));
        assert_eq!(q.add(of(1, 5)), Taken::Superseded(4));
        assert_eq!(q.add(of(2, 6)), Taken::Superseded(3));
        // Nodes with none waiting: queued past the bound, two at most.
        assert_eq!(q.add(of(3, 7)), Taken::Past);
        assert_eq!(q.add(of(4, 8)), Taken::Past);
        assert_eq!(q.add(of(5, 9)), Taken::Dropped);
        assert_eq!(q.add(of(4, 10)), Taken::Superseded(8));
        assert_eq!(q.waiting, 5);
        // Started in the order the nodes became ready, one per node.
        let seq = |ev: Option<Event>| ev.map(|ev| ev.seq);
        assert_eq!(seq(q.start()), Some(1));
        assert_eq!(seq(q.start()), Some(6));
        assert_eq!(seq(q.start()), Some(7));
        assert_eq!(seq(q.start()), Some(10));
        // Node 1's next waits for its hook to end.
        assert_eq!(seq(q.start()), None);
        assert_eq!(q.add(of(5, 11)), Taken::Queued);
        q.ended(1);
        assert_eq!(seq(q.start()), Some(11));
        assert_eq!(seq(q.start()), Some(5));
        assert_eq!(q.waiting, 0);
        for node in 1..=5 {
            assert!(!q.is_empty());
            q.ended(node);
        }
        assert!(q.is_empty());
    }

    /// Past the bound, a node whose first event waiting is a state change
    /// starts before every node whose first is only `joined` (a fresh
    /// start's); each node's own events keep their order, and a node whose
    /// `joined` waiting is replaced by a change moves up; the gauge follows
    /// the events waiting; the memory is handed back once, when they have
    /// all started.
    #[test]
    fn past_the_bound_a_change_starts_before_the_joins_waiting() {
        let gauge = Gauge::default();
        let mut q = Queue::new(3, 100, BACKLOG_EVERY, gauge.clone());
        let joined = |node, seq| node_event(node, seq, EventKind::Joined, Status::Unknown);
        let of = |node, seq, kind| node_event(node, seq, kind, Status::Alive);
        assert_eq!(q.add(joined(1, 1)), Taken::Queued);
        assert_eq!(q.add(joined(2, 2)), Taken::Queued);
        assert_eq!(q.add(of(1, 3, EventKind::Suspect)), Taken::Queued);
        for node in 3..=10 {
            assert_eq!(q.add(joined(node, u64::from(node) + 1)), Taken::Past);
        }
        // A verdict for a node with none waiting, past the bound.
        assert_eq!(q.add(of(11, 12, EventKind::Dead)), Taken::Past);
        // Node 1's newest (its suspect) replaced: its joined stays first.
        assert_eq!(q.add(of(1, 13, EventKind::Dead)), Taken::Superseded(3));
        // Node 5's joined replaced by a change: it moves up.
        assert_eq!(q.add(of(5, 14, EventKind::Suspect)), Taken::Superseded(6));
        assert_eq!(q.waiting, 12);
        assert_eq!(gauge.get(), 12);
        let seq = |ev: Option<Event>| ev.map(|ev| ev.seq);
        assert_eq!(seq(q.start()), Some(12));
        assert_eq!(seq(q.start()), Some(14));
        // Then the joins, in the order their nodes became ready; node 1's
        // dead waits for its joined's hook, then goes first.
        assert_eq!(seq(q.start()), Some(1));
        assert_eq!(gauge.get(), 9);
        q.ended(1);
        assert_eq!(seq(q.start()), Some(13));
        let rest: Vec<_> = std::iter::from_fn(|| q.start().map(|ev| ev.seq)).collect();
        assert_eq!(rest, [2, 4, 5, 7, 8, 9, 10, 11]);
        assert_eq!(q.waiting, 0);
        assert_eq!(gauge.get(), 0);
        assert!(!q.has_ready());
        assert!(q.drained());
        assert!(!q.drained());
    }

    /// A fresh start's `joined` of every node, past `--hook-queue`, with
    /// hooks slower than events: a node's `dead` (and another's `suspect`
    /// in place of its `joined`) starts before the joins still waiting;
    /// the backlog is logged when it goes past the bound, though nothing
    /// is replaced; hb_hook_queue_waiting says how many wait.
    // One thread: the runner does nothing while the test submits.
    #[tokio::test(flavor = "current_thread")]
    async fn a_verdict_starts_before_a_starts_joins_waiting() {
        const NODES: u32 = 50;
        const QUEUE: usize = 4;
        let warnings = Warnings::of("hb::monitor::hooks");
        let _log = warnings.capture();
        let dir = test_dir("verdict-first");
        let (log, go) = (dir.join("log"), dir.join("go"));
        let m = Arc::new(Metrics::new());
        let gauge = |m: &Metrics| {
            let text = m.render();
            let line = text
                .lines()
                .find(|l| l.starts_with("hb_hook_queue_waiting "));
            line.and_then(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
        };
        assert_eq!(gauge(&m), Some(0));
        let h = Hooks::start(
            hook(
                format!(
                    "while [ ! -e {1} ]; do sleep 0.01; done; echo \"$HB_SEQ $HB_EVENT\" >> {0}",
                    log.display(),
                    go.display()
                ),
                1,
                Duration::from_secs(30),
                QUEUE,
            ),
            m.clone(),
        );
        for node in 1..=NODES {
            h.submit(&node_event(
                node,
                node.into(),
                EventKind::Joined,
                Status::Unknown,
            ));
        }
        let lines = warnings.taken();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].message.starts_with("hook backlog: more than"),
            "{lines:#?}"
        );
        assert_eq!(lines[0].field("seq"), Some("5"), "{lines:#?}");
        assert_eq!(lines[0].field("waiting"), Some("5"), "{lines:#?}");
        settle().await; // node 1's joined runs
        let dead = u64::from(NODES) + 1;
        h.submit(&node_event(
            NODES + 1,
            dead,
            EventKind::Dead,
            Status::Suspect,
        ));
        h.submit(&node_event(30, dead + 1, EventKind::Suspect, Status::Alive));
        assert_eq!(gauge(&m), Some(u64::from(NODES)));
        assert_eq!(m.hook_failures(SUPERSEDED), 1);
        std::fs::write(&go, "").unwrap();
        wait_for(&m, |m| m.hooks_ok() == u64::from(NODES) + 1).await;
        assert_eq!(gauge(&m), Some(0));
        let text = std::fs::read_to_string(&log).unwrap();
        let ran: Vec<_> = text.lines().collect();
        assert_eq!(ran.len(), NODES as usize + 1, "{text}");
        assert_eq!(
            ran[..3],
            [
                "1 joined",
                &format!("{dead} dead"),
                &format!("{} suspect", dead + 1)
            ],
            "{text}"
        );
        assert!(ran[3..].iter().all(|l| l.ends_with(" joined")), "{text}");
        h.shutdown(Duration::from_secs(5)).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A rack failure with hooks slower than events: every node goes
    /// `suspect` then `dead`, with more nodes than `--hook-queue`, and its
    /// hooks end with `dead` (the `suspect`s still waiting are merged into
    /// their `dead`s, counted); then, all at once again, the rack comes
    /// back and flaps, and every node's hooks end with `alive`. A node's
    /// hooks run in `seq` order, and each gets its event as the events
    /// file has it (its JSON line, and `HB_SEQ`, `HB_EVENT` to match).
    // One thread: the runner does nothing while the test submits (a
    // tick), so what is merged is exact, however loaded the machine.
    #[tokio::test(flavor = "current_thread")]
    async fn every_nodes_hooks_end_with_its_latest_event_in_a_rack_failure() {
        const NODES: u32 = 12;
        const CONCURRENCY: usize = 2;
        const QUEUE: usize = 4;
        let dir = test_dir("rack");
        let (log, go) = (dir.join("log"), dir.join("go"));
        let m = Arc::new(Metrics::new());
        // Each hook runs until `go` exists, then logs its event, in one
        // write.
        let h = Hooks::start(
            hook(
                format!(
                    "line=\"$HB_SEQ $HB_EVENT $(cat)\"; \
                     while [ ! -e {1} ]; do sleep 0.01; done; echo \"$line\" >> {0}",
                    log.display(),
                    go.display()
                ),
                CONCURRENCY,
                Duration::from_secs(30),
                QUEUE,
            ),
            m.clone(),
        );
        let mut seq = 0;
        let mut sent: Vec<Event> = Vec::new();
        let mut tick = |h: &Hooks, kind: EventKind, previous: Status| {
            for node in 1..=NODES {
                seq += 1;
                let ev = node_event(node, seq, kind, previous);
                h.submit(&ev);
                sent.push(ev);
            }
        };
        // The rack fails: the first CONCURRENCY nodes' `suspect` hooks
        // start; every other `suspect` is still waiting at the `dead`s.
        tick(&h, EventKind::Suspect, Status::Alive);
        settle().await;
        tick(&h, EventKind::Dead, Status::Suspect);
        let merged = u64::from(NODES) - CONCURRENCY as u64;
        assert_eq!(m.hook_failures(SUPERSEDED), merged);
        std::fs::write(&go, "").unwrap();
        let ran = CONCURRENCY as u64 + u64::from(NODES);
        wait_for(&m, |m| m.hooks_ok() == ran).await;
        // It comes back, flaps and comes back again, all before hooks
        // start: `alive` waits, `suspect` replaces it (or, for the nodes
        // whose `alive` runs, waits behind), `alive` replaces that.
        std::fs::remove_file(&go).unwrap();
        tick(&h, EventKind::Alive, Status::Dead);
        settle().await;
        tick(&h, EventKind::Suspect, Status::Alive);
        tick(&h, EventKind::Alive, Status::Suspect);
        let merged = merged + u64::from(NODES) - CONCURRENCY as u64 + u64::from(NODES);
        std::fs::write(&go, "").unwrap();
        let ran = ran + CONCURRENCY as u64 + u64::from(NODES);
        wait_for(&m, |m| m.hooks_ok() == ran).await;
        h.shutdown(Duration::from_secs(5)).await;
        assert_eq!(m.hook_failures(SUPERSEDED), merged);
        assert_eq!(m.hook_failures(DROPPED), 0);
        assert_eq!(m.hooks_ok(), ran);
        // Each node's hooks, in the order they ran.
        let text = std::fs::read_to_string(&log).unwrap();
        let mut hooks: HashMap<u32, Vec<Event>> = HashMap::new();
        for line in text.lines() {
            let mut fields = line.splitn(3, ' ');
            let (env_seq, env_event, json) = (
                fields.next().unwrap(),
                fields.next().unwrap(),
                fields.next().unwrap(),
            );
            let seq: u64 = env_seq.parse().unwrap();
            let ev = &sent[seq as usize - 1];
            // Unchanged: its line in the events file, its environment.
            assert_eq!(json, serde_json::to_string(ev).unwrap(), "{line}");
            assert_eq!(env_event, ev.event.name(), "{line}");
            hooks.entry(ev.node_id).or_default().push(ev.clone());
        }
        assert_eq!(hooks.len(), NODES as usize, "{text}");
        let kinds = |evs: &[Event]| evs.iter().map(|ev| ev.event).collect::<Vec<_>>();
        let last_sent = |node: u32| sent.iter().rfind(|ev| ev.node_id == node).unwrap().seq;
        let mut recovered = 0;
        for (&node, evs) in &hooks {
            assert!(
                evs.windows(2).all(|w| w[0].seq < w[1].seq),
                "node {node} out of order: {text}"
            );
            // In the failure, `dead` ran for every node, last; the first
            // nodes' `suspect` had started before.
            let failure = evs.iter().filter(|ev| ev.seq <= 2 * u64::from(NODES));
            let failure: Vec<_> = failure.map(|ev| ev.event).collect();
            let expected = if node as usize <= CONCURRENCY {
                vec![EventKind::Suspect, EventKind::Dead]
            } else {
                vec![EventKind::Dead]
            };
            assert_eq!(failure, expected, "node {node}: {:?}", kinds(evs));
            // Since: `alive` only, and last the node's latest event.
            let recovery = &evs[failure.len()..];
            assert!(
                recovery.iter().all(|ev| ev.event == EventKind::Alive),
                "node {node}: {:?}",
                kinds(evs)
            );
            assert_eq!(recovery.last().map(|ev| ev.seq), Some(last_sent(node)));
            recovered += recovery.len();
        }
        assert_eq!(recovered, NODES as usize + CONCURRENCY, "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Whether this process is a test's child ([`run_child_test`]): the
    /// test then runs its child's part (not an ignored test: the test
    /// runner fails a run with any).
    fn test_child() -> bool {
        std::env::var_os("HB_TEST_CHILD").is_some()
    }

    /// A runtime for a child's part.
    fn child_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Runs `test` of this module in a process of its own, where it runs
    /// its child's part ([`test_child`]): the test binary again, with
    /// `HB_TEST_CHILD` set, started by `cmd` (`args` first). Its output,
    /// once it has passed.
    fn run_child_test(cmd: &str, args: &[&str], test: &str) -> String {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(cmd)
            .args(args)
            .arg(&exe)
            .args(["--exact", &format!("monitor::hooks::tests::{test}")])
            .args(["--test-threads=1", "--nocapture"])
            .env("HB_TEST_CHILD", "1")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}\n{text}",
            out.status
        );
        assert!(text.contains("1 passed"), "{text}");
        text
    }

    /// The zombies among `parent`'s children, as `pid comm`.
    fn zombies_of(parent: u32) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let (state, ppid) = (fields.next(), fields.next());
            if state == Some("Z") && ppid == Some(parent.to_string().as_str()) {
                found.push(head.replace(" (", " "));
            }
        }
        found
    }

    /// As PID 1 of a PID namespace (a container's entrypoint with no
    /// init), the monitor adopts what its hooks leave behind when their
    /// shells die, and reaps it: a background `sleep` killed when its
    /// hook's shell exits, or one killed with its shell at the timeout.
    /// Hooks that end at once, meanwhile, are still waited for by their
    /// own tasks (none counted as `reason="wait"`).
    #[test]
    fn orphans_are_reaped_when_the_monitor_is_pid_1() {
        if test_child() {
            return child_runtime().block_on(as_pid_1_orphans_are_reaped());
        }
        run_child_test(
            "unshare",
            &["--pid", "--fork", "--mount-proc", "--kill-child"],
            "orphans_are_reaped_when_the_monitor_is_pid_1",
        );
    }

    /// The child's part of [`orphans_are_reaped_when_the_monitor_is_pid_1`],
    /// as PID 1.
    async fn as_pid_1_orphans_are_reaped() {
        assert_eq!(std::process::id(), 1, "not in a PID namespace of its own");
        const EVENTS: u64 = 30;
        let m = Arc::new(Metrics::new());
        // Of every three: one leaves a `sleep` in the background, one
        // times out in a `sleep`, one ends at once.
        let h = Hooks::start(
            hook(
                "case $((HB_SEQ % 3)) in 0) sleep 30 & ;; 1) sleep 30 ;; esac; true".into(),
                4,
                Duration::from_millis(300),
                EVENTS as usize,
            ),
            m.clone(),
        );
        for seq in 1..=EVENTS {
            h.submit(&Event {
                node_id: seq as u32,
                ..crate::monitor::events::test_event(seq)
            });
        }
        wait_for(&m, |m| m.hooks_ok() + m.hook_failures("timeout") == EVENTS).await;
        assert_eq!(m.hook_failures("timeout"), EVENTS / 3);
        assert_eq!(m.hook_failures("wait"), 0);
        for _ in 0..250 {
            if zombies_of(1).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(zombies_of(1), Vec::<String>::new(), "orphans left unreaped");
        h.shutdown(Duration::from_secs(5)).await;
    }

    /// A monitor killed outright (SIGKILL, the OOM killer) runs no
    /// shutdown: the kernel kills each hook's shell then (a parent-death
    /// signal), not leaving it to run on its own. Here the "monitor" is
    /// the test binary again, running a hook that sleeps.
    #[test]
    fn a_hooks_shell_dies_with_a_monitor_killed_outright() {
        if test_child() {
            return child_runtime().block_on(a_monitor_to_kill());
        }
        let dir = test_dir("pdeathsig");
        let pid_file = dir.join("pid");
        let exe = std::env::current_exe().unwrap();
        let mut monitor = std::process::Command::new(exe)
            .args([
                "--exact",
                "monitor::hooks::tests::a_hooks_shell_dies_with_a_monitor_killed_outright",
            ])
            .args(["--test-threads=1"])
            .env("HB_TEST_CHILD", "1")
            .env("HB_TEST_PID_FILE", &pid_file)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut shell = None;
        for _ in 0..500 {
            if let Ok(text) = std::fs::read_to_string(&pid_file) {
                shell = text.trim().parse::<i32>().ok();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        monitor.kill().unwrap();
        monitor.wait().unwrap();
        let shell = shell.expect("the hook did not start");
        let mut dead = false;
        for _ in 0..100 {
            dead = gone(shell);
            if dead {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The rest of its process group (its `sleep`) lives on: killed
        // here. The group outlives its leader, so its id is still its.
        // SAFETY: plain kill(2) of the group the hook's shell led.
        unsafe { libc::kill(-shell, libc::SIGKILL) };
        assert!(dead, "the hook's shell {shell} outlived the monitor by 2 s");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The child's part of [`a_hooks_shell_dies_with_a_monitor_killed_outright`]:
    /// the monitor, killed.
    async fn a_monitor_to_kill() {
        let pid_file = std::env::var("HB_TEST_PID_FILE").unwrap();
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook(
                format!("echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; sleep 60; true"),
                1,
                Duration::from_secs(60),
                1,
            ),
            m.clone(),
        );
        h.submit(&ev(1));
        // Killed long before this.
        tokio::time::sleep(Duration::from_secs(30)).await;
    }

    /// A hook failing for every event logs its first failure in full, and
    /// the later ones in one line (here at shutdown, less than a minute
    /// on), not a line each: a pager down in a partition of a large fleet
    /// would log one per event, and journald would then hide every line.
    /// The counter still counts every failure.
    // One thread: every line is logged on it, where it is captured.
    #[tokio::test(flavor = "current_thread")]
    async fn a_run_of_failing_hooks_is_logged_in_two_lines() {
        const FAILING: u64 = 20;
        let warnings = Warnings::of("hb::monitor::hooks");
        let _log = warnings.capture();
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook(
                format!("[ $HB_SEQ -gt {FAILING} ] || exit 3"),
                4,
                Duration::from_secs(30),
                64,
            ),
            m.clone(),
        );
        for seq in 1..=FAILING {
            h.submit(&Event {
                node_id: seq as u32,
                ..crate::monitor::events::test_event(seq)
            });
        }
        wait_for(&m, |m| m.hook_failures("exit") == FAILING).await;
        h.submit(&ev(FAILING as u32 + 1));
        wait_for(&m, |m| m.hooks_ok() == 1).await;
        h.shutdown(Duration::from_secs(10)).await;
        let lines = warnings.taken();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].message.starts_with("hook failed"), "{lines:#?}");
        assert!(lines[0].field("status").is_some(), "{lines:#?}");
        assert!(lines[0].field("node_id").is_some(), "{lines:#?}");
        let summary = &lines[1];
        assert!(summary.message.contains("succeed again"), "{lines:#?}");
        assert_eq!(summary.field("failed"), Some("19"), "{lines:#?}");
        assert_eq!(summary.field("exit"), Some("19"), "{lines:#?}");
        assert_eq!(summary.field("timeout"), Some("0"), "{lines:#?}");
    }

    /// What `Failures` says, and when, on a clock of its own: a line at
    /// most every `every`, the first failure of a run in full, the others
    /// summed up while they go on, once hooks succeed again, and at
    /// shutdown; failing for every other event logs no more.
    #[test]
    fn failures_are_summed_up_at_most_once_per_period() {
        const EVERY: Duration = Duration::from_secs(60);
        let warnings = Warnings::of("hb::monitor::hooks");
        let _log = warnings.capture();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let said = || warnings.taken().len();
        let mut f = Failures::every(EVERY);
        // The first failure: its caller logs it.
        assert!(f.failed(Failure::Exit, 1, at(0)));
        assert_eq!(f.due(), None);
        for seq in 2..=100 {
            assert!(!f.failed(Failure::Timeout, seq, at(1)));
        }
        assert_eq!(said(), 0);
        assert_eq!(f.due(), Some(at(60)));
        // Due: still failing.
        f.flush(at(60));
        let lines = warnings.taken();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].message.contains("since the last line"),
            "{lines:#?}"
        );
        assert_eq!(lines[0].field("failed"), Some("99"));
        assert_eq!(lines[0].field("timeout"), Some("99"));
        assert_eq!(lines[0].field("first_seq"), Some("2"));
        assert_eq!(lines[0].field("last_seq"), Some("100"));
        assert_eq!(f.due(), None);
        // Failing and succeeding in turn, for ten minutes: a line a
        // minute, no more, never the first failure in full again.
        for i in 0..600 {
            assert!(!f.failed(Failure::Spawn, 101 + i, at(61 + i)));
            f.succeeded(at(61 + i));
        }
        assert_eq!(said(), 1 + 10, "{:#?}", warnings.taken());
        // One more, then hooks succeed: said when due, as such.
        assert!(!f.failed(Failure::Spawn, 701, at(661)));
        f.succeeded(at(661));
        assert_eq!(f.due(), Some(at(720)));
        f.flush(at(720));
        let last = warnings.taken().pop().unwrap();
        assert!(last.message.contains("succeed again"), "{last:#?}");
        assert_eq!(last.field("failed"), Some("1"));
        assert_eq!(f.due(), None);
        assert!(!f.say());
        // At shutdown, what is left is said at once.
        assert!(!f.failed(Failure::Exit, 702, at(721)));
        assert!(f.say());
        // Hooks succeed, and a minute with no line later a failure is
        // logged in full again.
        f.succeeded(at(790));
        assert!(f.failed(Failure::Wait, 1000, at(800)));
        f.succeeded(at(800));
        assert_eq!(f.due(), None);
        assert!(!f.say());
        let counted: u64 = warnings
            .taken()
            .iter()
            .filter_map(|l| l.field("failed")?.parse::<u64>().ok())
            .sum();
        // Every failure but the two logged in full is counted in a line.
        assert_eq!(counted, 99 + 600 + 1 + 1, "{:#?}", warnings.taken());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_hook_is_counted() {
        let m = Arc::new(Metrics::new());
        let h = Hooks::start(
            hook("exit 3".into(), 1, Duration::from_secs(5), 4),
            m.clone(),
        );
        h.submit(&ev(1));
        wait_for(&m, |m| m.hook_failures("exit") == 1).await;
    }
}

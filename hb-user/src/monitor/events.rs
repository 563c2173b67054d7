//! Events: what the monitor announces when its belief about a node
//! changes, as JSON lines to a file or stdout, and to `--on-event` hooks.
//!
//! The tick hands its events to [`EventSink::publish`], which only queues
//! them: writing and running hooks happen on their own task and thread,
//! so a slow disk or a hung hook never delays failure detection. Losing a
//! `dead` event is worse than holding it in memory, so lines that cannot
//! be written (disk full, EIO, a `-` reader that stopped reading) are
//! kept and written again, from the byte where the write stopped, on a
//! backoff: no event is lost to a failed write, and no line is left torn
//! with the next one appended to it. What is held is bounded
//! ([`BACKLOG_BYTES`], a line per node of the largest fleet: what a
//! partition of the whole fleet announces at once). Past it the newest
//! events are dropped whole, as the hooks' queue drops them, counted in
//! `hb_events_dropped_total` and logged (a run of drops in two lines, see
//! `Dropped`): the file stays in order with a gap that `seq` shows.
//!
//! Lines stay whole across reopens (SIGHUP) and rotation too. A reopen
//! that finds the same file (no rotation) goes on with a line in progress
//! where it stopped; a new file, or one truncated under that line
//! (copytruncate, with or without a reopen), gets the line whole. A file
//! that ends in the middle of a line not ours (a crash, or a full disk,
//! before a restart) gets a `\n` before the first line written to it:
//! only that fragment stays torn.
//!
//! Hooks are different (each is a process): they have their own bounded
//! queue and concurrency, and what does not fit is counted and logged,
//! never waited for (see `hooks`).
//!
//! How far delivery has got is told by positions, counted in events from
//! the sink's start ([`EventSink::publish`], [`EventSink::settled`]): an
//! event is settled once its fate is known, its line written whole or
//! never to be (dropped because the backlog was full, or no events
//! destination at all: hooks are best-effort and the log is no record),
//! and [`Settled`] tells the tick which of those settled were not written.
//! The tick confirms the status it recorded for a node
//! (`tick::Core::confirm`) only once the line of the event that announced
//! it is written: a monitor that dies with the line still held, or that
//! dropped it, has the next one announce a `dead` again.

use std::{
    collections::VecDeque,
    fs::File,
    io::{Seek as _, Write},
    ops::Range,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hb_common::maps::MAX_NODES;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    hooks::Hooks,
    metrics::Metrics,
    state::{EventKind, Status},
};

/// Bytes of event lines held while they cannot be written: 256 MiB, 256
/// bytes (about a line) per node of the largest fleet.
const BACKLOG_BYTES: usize = MAX_NODES as usize * 256;
/// At most this much (whole lines, at least one) per write(2).
const CHUNK: usize = 64 << 10;
/// After a failed write, the next attempt waits this long, doubling up to
/// `RETRY_LAST` while the writes keep failing.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_LAST: Duration = Duration::from_secs(5);
/// How long the shutdown flush keeps trying to write what is held.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// One announcement. Serialized as one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Increasing per monitor process, from 1 (again after a restart):
    /// orders events that hooks may see out of order.
    pub seq: u64,
    /// Wall-clock time of the tick that decided, RFC 3339 (UTC, three
    /// fractional digits: [`rfc3339_ms`]).
    pub ts: String,
    pub node_id: u32,
    pub event: EventKind,
    /// Status before this event.
    pub previous: Status,
    /// Status after it.
    pub state: Status,
    pub phi: f64,
    pub generation: u32,
    /// For `restarted`: the generation before, if a monitor saw it (not
    /// for a restart while no monitor ran, announced at the start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev_generation: Option<u32>,
    /// Time since the last accepted heartbeat, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
    /// Interval the node reports using, ms.
    pub interval_ms: u32,
    pub accepted: u64,
    pub lost: u64,
    pub restarts: u32,
}

/// Where event lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Only the log.
    None,
    Stdout,
    /// Appended to a file, reopened on SIGHUP (log rotation).
    File(PathBuf),
}

impl Destination {
    pub fn parse(s: &str) -> Destination {
        match s {
            "" => Destination::None,
            "-" => Destination::Stdout,
            p => Destination::File(PathBuf::from(p)),
        }
    }
}

enum Msg {
    Events(Vec<Event>),
    Reopen,
    /// Try again now and answer how many lines were queued so far
    /// (`flush`).
    Flush(oneshot::Sender<u64>),
}

/// The tick's handle to the event writer.
///
/// Positions ([`EventSink::publish`], [`EventSink::settled`]) number the
/// events in the order they were published, from 1.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<Msg>,
    shared: Arc<Shared>,
}

impl EventSink {
    /// Opens the destination (failing early and clearly if it cannot be
    /// written) and starts the writer task and thread.
    pub async fn start(
        dest: Destination,
        hooks: Option<Hooks>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<EventSink> {
        let out = open(&dest)?;
        EventSink::start_with(dest, out, BACKLOG_BYTES, hooks, metrics)
    }

    /// `start` with what is opened already, and a backlog budget (tests).
    fn start_with(
        dest: Destination,
        out: Option<Out>,
        budget: usize,
        hooks: Option<Hooks>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<EventSink> {
        let shared = Arc::new(Shared {
            backlog: Mutex::new(Backlog::default()),
            wake: Condvar::new(),
            written: watch::Sender::new(0),
            published: Mutex::new(0),
        });
        let has_out = out.is_some();
        if let Some(out) = out {
            let (s, m) = (shared.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("hb-events".into())
                .spawn(move || write_lines(&s, &dest, out, &m))
                .context("cannot start the events writer")?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(queue_lines(
            rx,
            shared.clone(),
            has_out,
            budget,
            hooks,
            metrics,
        ));
        Ok(EventSink { tx, shared })
    }

    /// Queues a batch of events; never blocks (but for a lock only
    /// publishers take). Returns the position of the last event published
    /// before them: the batch's `i`-th (from 0) is at that plus `i + 1`.
    pub fn publish(&self, events: Vec<Event>) -> u64 {
        // Positions are given in the order the task receives the batches.
        let mut published = self
            .shared
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let base = *published;
        if !events.is_empty() {
            *published += events.len() as u64;
            let _ = self.tx.send(Msg::Events(events));
        }
        base
    }

    /// How far delivery has settled, and which events settled since the
    /// last call are not written ([`Settled`]). Takes those from the sink:
    /// each is told once, so one caller (the tick) calls this and hands
    /// the answer on (`tick::Core::confirm`).
    pub fn settled(&self) -> Settled {
        self.shared.lock().take_settled()
    }

    /// Reopens the events file (after log rotation).
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Waits until everything queued so far is written, trying again
    /// meanwhile, for at most [`FLUSH_WAIT`]: at shutdown a hung or full
    /// filesystem must not hold exit. Then says in one line how many
    /// events were not written.
    pub async fn flush(&self) {
        self.flush_for(FLUSH_WAIT).await;
    }

    /// `flush` waiting at most `wait`; the number of events not written.
    async fn flush_for(&self, wait: Duration) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_err() {
            return 0;
        }
        let Ok(queued) = rx.await else { return 0 };
        let mut written = self.shared.written.subscribe();
        if tokio::time::timeout(wait, written.wait_for(|n| *n >= queued))
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.shared.lock().lines.len();
        tracing::error!(
            events = left,
            "giving up on writing events after {wait:?}: {left} events not written"
        );
        left
    }
}

/// How far delivery has got ([`EventSink::settled`]): every event up to
/// position `upto` is settled, its line written whole unless its position
/// is in `not_written` (dropped: the backlog was full, or there is no
/// events destination). The positions taken from the sink before it were
/// told by an earlier `Settled`.
#[must_use = "the events not written are told only once"]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub upto: u64,
    /// Ascending, apart, none past `upto`.
    pub not_written: Vec<Range<u64>>,
}

impl From<u64> for Settled {
    /// Every event up to `upto` written.
    fn from(upto: u64) -> Settled {
        Settled {
            upto,
            not_written: Vec::new(),
        }
    }
}

/// What the writer task and thread share.
struct Shared {
    backlog: Mutex<Backlog>,
    /// Wakes the thread: lines queued, reopen, try again now, closed.
    wake: Condvar,
    /// Lines written so far (whole), for `flush` to wait on.
    written: watch::Sender<u64>,
    /// Events published so far ([`EventSink::publish`]).
    published: Mutex<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Backlog> {
        // Nothing in it is left half-changed by a panic.
        self.backlog.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Event lines queued and not yet (entirely) written.
#[derive(Default)]
struct Backlog {
    /// The lines, oldest first, whole: the first one's `head` bytes are
    /// written already. Kept whole so that a line half written to a file
    /// that is then rotated goes to the new file whole.
    bytes: VecDeque<u8>,
    /// Their lengths and positions (`EventSink::publish`).
    lines: VecDeque<(usize, u64)>,
    head: usize,
    /// Lines queued so far, for `flush`.
    queued: u64,
    /// The position of the last event that came to the backlog, queued
    /// or dropped.
    passed: u64,
    /// Positions of the events dropped (never to be written) that
    /// [`EventSink::settled`] has not told yet: ascending, apart.
    not_written: Vec<Range<u64>>,
    reopen: bool,
    /// Try again now rather than at the end of the backoff (`flush`).
    retry_now: bool,
    /// The task stopped (every sink dropped): the thread stops once the
    /// backlog is written.
    closed: bool,
}

impl Backlog {
    /// The position up to which every event is settled: all before the
    /// first line still held (lines are held in order, and events dropped
    /// never are), or all that came if none is.
    fn settled(&self) -> u64 {
        self.lines.front().map_or(self.passed, |&(_, pos)| pos - 1)
    }

    /// The event at `pos`, the next to come, is dropped: never written.
    fn drop_event(&mut self, pos: u64) {
        self.passed = pos;
        match self.not_written.last_mut() {
            Some(r) if r.end == pos => r.end += 1,
            _ => self.not_written.push(pos..pos + 1),
        }
    }

    /// [`EventSink::settled`]: the settled position, and the events up to
    /// it dropped and not told yet.
    fn take_settled(&mut self) -> Settled {
        let upto = self.settled();
        let n = self.not_written.partition_point(|r| r.start <= upto);
        let mut not_written: Vec<_> = self.not_written.drain(..n).collect();
        if let Some(r) = not_written.last_mut()
            && r.end > upto + 1
        {
            // Not while lines are held in order; kept right anyway.
            self.not_written.insert(0, upto + 1..r.end);
            r.end = upto + 1;
        }
        Settled { upto, not_written }
    }
}

// Why a thread and std's `File`, and not tokio's: tokio's `File` (and
// `Stdout`) say a write is done once they have buffered it, write it on
// the blocking pool, and drop the buffer when that fails, without saying
// how much went out; so a failed write loses events and leaves a line
// torn. A write(2) on std's `File` says exactly how many bytes went out.
// The thread is never joined, so a write hung on a dead filesystem cannot
// hold exit either (dropping the runtime waits for its blocking pool).

/// Where lines are written: the events file or stdout, a `File`
/// (unbuffered: a write's count is what reached the file or pipe).
trait Output: Write + Send {
    /// The file written to, to find where it ends.
    fn file(&self) -> &File;
}

impl Output for File {
    fn file(&self) -> &File {
        self
    }
}

type Out = Box<dyn Output>;

fn open(dest: &Destination) -> anyhow::Result<Option<Out>> {
    Ok(match dest {
        Destination::None => None,
        Destination::Stdout => Some(Box::new(File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("cannot use stdout for events")?,
        ))),
        // Append: after copytruncate the next line goes to the new start.
        Destination::File(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open events file {}", p.display()))?,
        )),
    })
}

/// Whether `a` and `b` are the same file (device and inode): a reopen
/// with no rotation.
fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether the regular file `out` writes to (at `path`) has bytes and its
/// last is not `\n`: the next line must start on a line of its own. `out`
/// only appends, so that byte is read through `path`, if it is still the
/// same file; if it cannot be read, no.
fn ends_mid_line(out: &File, path: &Path) -> bool {
    let Ok(meta) = out.metadata() else {
        return false;
    };
    if !meta.is_file() || meta.len() == 0 {
        return false;
    }
    // Non-blocking: whatever `path` is now, the open must not wait.
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return false;
    };
    let Ok(now) = file.metadata() else {
        return false;
    };
    let mut last = [0];
    (now.dev(), now.ino()) == (meta.dev(), meta.ino())
        && now.len() > 0
        && matches!(file.read_at(&mut last, now.len() - 1), Ok(1))
        && last[0] != b'\n'
}

/// Whether the file `out` writes to was truncated below `line_end` (the
/// end of the line in progress, as far as it was written): copytruncate
/// took the start of that line.
fn truncated(out: &File, line_end: Option<u64>) -> bool {
    line_end.is_some_and(|end| out.metadata().is_ok_and(|m| m.len() < end))
}

/// The task: logs events, counts them, serializes them into the backlog
/// for the writer thread, and passes them to the hooks.
async fn queue_lines(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    shared: Arc<Shared>,
    has_out: bool,
    budget: usize,
    hooks: Option<Hooks>,
    metrics: Arc<Metrics>,
) {
    let mut staged = Staged::default();
    // The position of the last event received (`EventSink::publish`).
    let mut pos = 0u64;
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Events(batch) => {
                for ev in &batch {
                    pos += 1;
                    metrics.event(ev.event);
                    if !has_out || tracing::enabled!(tracing::Level::DEBUG) {
                        tracing::info!(
                            node_id = ev.node_id,
                            event = %ev.event,
                            previous = %ev.previous,
                            phi = ev.phi,
                            generation = ev.generation,
                            last_seen_ms = ev.last_seen_ms,
                            "node event"
                        );
                    }
                    if has_out && staged.add(ev, pos) >= CHUNK {
                        staged.queue(&shared, budget, &metrics);
                    }
                    if let Some(h) = hooks.as_ref() {
                        h.submit(ev);
                    }
                }
                staged.queue(&shared, budget, &metrics);
                if !has_out && !batch.is_empty() {
                    // Logged and handed to the hooks, which may not run it
                    // (replaced by a newer event of its node in a backlog,
                    // cut short at shutdown): never written.
                    let mut b = shared.lock();
                    for p in pos + 1 - batch.len() as u64..=pos {
                        b.drop_event(p);
                    }
                }
            }
            Msg::Reopen => {
                shared.lock().reopen = true;
                shared.wake.notify_one();
            }
            Msg::Flush(ack) => {
                report_dropped(&mut staged.dropped);
                let queued = {
                    let mut b = shared.lock();
                    b.retry_now = true;
                    b.queued
                };
                shared.wake.notify_one();
                let _ = ack.send(queued);
            }
        }
    }
    shared.lock().closed = true;
    shared.wake.notify_one();
}

/// Lines serialized and not yet queued, with their lengths, seqs and
/// positions: queued every `CHUNK` bytes, not one by one, so a fleet's
/// worth of events takes few locks and wake-ups.
#[derive(Default)]
struct Staged {
    lines: Vec<u8>,
    lens: Vec<(usize, u64, u64)>,
    /// Events dropped since the last one queued (the backlog was full).
    dropped: Dropped,
}

impl Staged {
    /// Serializes `ev`, at position `pos`, as one line; returns the
    /// bytes staged.
    fn add(&mut self, ev: &Event, pos: u64) -> usize {
        let at = self.lines.len();
        // Serializing plain fields cannot fail.
        let _ = serde_json::to_writer(&mut self.lines, ev);
        self.lines.push(b'\n');
        self.lens.push((self.lines.len() - at, ev.seq, pos));
        self.lines.len()
    }

    /// Moves the lines into the backlog, dropping those that do not fit
    /// in `budget`: the newest, as the hooks' queue does, and whole.
    fn queue(&mut self, shared: &Shared, budget: usize, metrics: &Metrics) {
        if self.lens.is_empty() {
            return;
        }
        let mut b = shared.lock();
        let mut at = 0;
        for &(len, seq, pos) in &self.lens {
            // Queued or dropped, settled only once every line before it is
            // written (`Backlog::settled`); dropped, told as not written.
            if b.bytes.len() + len <= budget {
                b.passed = pos;
                b.bytes.extend(&self.lines[at..at + len]);
                b.lines.push_back((len, pos));
                b.queued += 1;
                report_dropped(&mut self.dropped);
            } else {
                b.drop_event(pos);
                metrics.event_dropped();
                if self.dropped.add(seq) {
                    tracing::error!(
                        seq,
                        budget_bytes = budget,
                        "events cannot be written fast enough and the backlog is full: \
                         dropping events until it has room"
                    );
                }
            }
            at += len;
        }
        drop(b);
        shared.wake.notify_one();
        self.lines.clear();
        self.lens.clear();
    }
}

/// Ends the run of events dropped on a full backlog, if any, in its
/// summary line.
fn report_dropped(dropped: &mut Dropped) {
    if let Some(run) = dropped.end() {
        tracing::warn!(
            dropped = run.count,
            first_seq = run.first_seq,
            last_seq = run.last_seq,
            "events dropped (backlog full)"
        );
    }
}

/// A run of events dropped (here the backlog was full; in `hooks`, the
/// hooks' queue), for its user to log in two lines, when it starts and,
/// with how many, when it ends: not a line per event, as a partition of a
/// large fleet drops thousands at once, and as many lines would have
/// journald's rate limit hide the other lines with them.
#[derive(Default)]
pub(super) struct Dropped {
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) count: u64,
}

impl Dropped {
    /// Counts event `seq` dropped; true when it starts a run.
    pub(super) fn add(&mut self, seq: u64) -> bool {
        let starts = self.count == 0;
        if starts {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.count += 1;
        starts
    }

    /// Ends the run, if one is going on, and returns it.
    pub(super) fn end(&mut self) -> Option<Dropped> {
        (self.count > 0).then(|| std::mem::take(self))
    }
}

/// The thread: writes the backlog to `out`, whole lines at a time; on a
/// failure keeps what was not written and tries again, from where the
/// write stopped, on a backoff. Logs the first failure and the recovery
/// (the backlog written), once each; counts every failed write.
fn write_lines(shared: &Shared, dest: &Destination, mut out: Out, metrics: &Metrics) {
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut written = 0u64;
    let mut delay = RETRY_FIRST;
    let mut retry_at: Option<Instant> = None;
    // Since when, and how many times, writes have failed.
    let mut failing: Option<(Instant, u64)> = None;
    let to = match dest {
        Destination::File(p) => p.display().to_string(),
        _ => "stdout".to_string(),
    };
    let to = to.as_str();
    // Stdout is a file too when it is redirected to one (`>> events.jsonl`,
    // systemd's `StandardOutput=append:`): looked at through its descriptor,
    // so that a file a crash left mid-line, or truncated under a line, is
    // mended as `--events FILE` is (`ends_mid_line` and `line_end` leave
    // pipes and terminals alone).
    let own_fd = PathBuf::from(format!("/proc/self/fd/{}", out.file().as_raw_fd()));
    let path = match dest {
        Destination::File(p) => Some(p.as_path()),
        Destination::Stdout => Some(own_fd.as_path()),
        Destination::None => None,
    };
    // Nothing written to this file yet: if it ends in the middle of a
    // line, a `\n` goes before ours.
    let mut fresh = true;
    // While a line is in progress (`head` > 0): the file's offset just
    // past the part of it written.
    let mut line_end: Option<u64> = None;
    loop {
        let mut b = shared.lock();
        loop {
            if b.reopen {
                break;
            }
            if std::mem::take(&mut b.retry_now) {
                (retry_at, delay) = (None, RETRY_FIRST);
            }
            if b.lines.is_empty() {
                if b.closed {
                    return;
                }
                b = shared.wake.wait(b).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let now = Instant::now();
            match retry_at {
                Some(t) if t > now => {
                    b = shared
                        .wake
                        .wait_timeout(b, t - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                _ => break,
            }
        }
        if std::mem::take(&mut b.reopen) {
            drop(b);
            if let Destination::File(p) = dest {
                match open(dest) {
                    Ok(Some(o)) => {
                        // The same file (no rotation): a line in progress
                        // goes on where it stopped, unless the file was
                        // truncated under it (checked before each write).
                        let rotated = !same_file(out.file(), o.file());
                        out = o;
                        if rotated {
                            // A line the old file got part of goes whole
                            // to the new one.
                            shared.lock().head = 0;
                            (fresh, line_end) = (true, None);
                        }
                        (retry_at, delay) = (None, RETRY_FIRST);
                        tracing::info!(path = %p.display(), rotated, "events file reopened");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "keeping the old events file")
                    }
                }
            }
            continue;
        }
        let mut end = 0;
        for &(len, _) in &b.lines {
            if end > 0 && end + len > CHUNK {
                break;
            }
            end += len;
        }
        let head = b.head;
        chunk.clear();
        chunk.extend(b.bytes.range(head..end));
        drop(b);

        if head > 0 && truncated(out.file(), line_end) {
            // The line starts again, whole, where the file now ends.
            shared.lock().head = 0;
            (fresh, line_end) = (true, None);
            tracing::info!(
                to,
                "events file truncated under a line in progress: writing the line again, whole"
            );
            continue;
        }
        let newline = fresh && path.is_some_and(|p| ends_mid_line(out.file(), p));
        if newline {
            chunk.insert(0, b'\n');
        }
        let res = match out.write(&chunk) {
            Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
            r => r,
        };
        match res {
            Ok(n) => {
                fresh = false;
                if newline {
                    tracing::info!(
                        to,
                        "events file ended in the middle of a line: \
                         a newline written before the next event"
                    );
                }
                let n = n - usize::from(newline);
                let mut b = shared.lock();
                b.head += n;
                let mut done = 0;
                while let Some(&(len, _)) = b.lines.front()
                    && b.head >= len
                {
                    b.lines.pop_front();
                    b.head -= len;
                    done += len;
                    written += 1;
                }
                b.bytes.drain(..done);
                let empty = b.lines.is_empty();
                if empty && b.bytes.capacity() > CHUNK {
                    // An outage's backlog is not kept for the next one.
                    b.bytes.shrink_to(CHUNK);
                    b.lines.shrink_to(CHUNK / 256);
                }
                let partial = b.head > 0;
                drop(b);
                // An O_APPEND file's offset is where the write ended.
                line_end = (partial && path.is_some())
                    .then(|| out.file().stream_position().ok())
                    .flatten();
                shared.written.send_replace(written);
                // Write on at once: what follows a short write then fails
                // (and backs off) or goes out.
                retry_at = None;
                if empty && let Some((since, failures)) = failing.take() {
                    delay = RETRY_FIRST;
                    tracing::warn!(
                        failures,
                        after = ?since.elapsed(),
                        "events written again"
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                metrics.event_write_failed();
                match failing.as_mut() {
                    Some((_, n)) => *n += 1,
                    None => {
                        failing = Some((Instant::now(), 1));
                        tracing::error!(
                            error = %e,
                            to,
                            "cannot write events: holding them and trying again"
                        );
                    }
                }
                retry_at = Some(Instant::now() + delay);
                delay = (delay * 2).min(RETRY_LAST);
            }
        }
    }
}

/// RFC 3339 UTC timestamp of the wall clock now ([`rfc3339_ms`]).
pub fn now_rfc3339() -> String {
    rfc3339_ms(time::OffsetDateTime::now_utc())
}

/// `t` in RFC 3339, UTC, with exactly three fractional digits
/// (`2026-11-24T10:09:18.550Z`): every stamp has the same width, so they
/// sort as text in time order. (The `time` crate's `Rfc3339` drops
/// trailing zeros: `.55Z` sorted after `.251Z`.)
pub fn rfc3339_ms(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// A `dead` event of node `seq`, numbered `seq` (tests here and in
/// `hooks`). A fixed time stamp: the tests size files in lines.
#[cfg(test)]
pub(crate) fn test_event(seq: u64) -> Event {
    Event {
        seq,
        ts: "2026-01-01T00:00:00.123Z".into(),
        node_id: seq as u32,
        event: EventKind::Dead,
        previous: Status::Suspect,
        state: Status::Dead,
        phi: 13.0,
        generation: 1,
        prev_generation: None,
        last_seen_ms: Some(3000),
        interval_ms: 1000,
        accepted: 10,
        lost: 0,
        restarts: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn ev(seq: u64) -> Event {
        test_event(seq)
    }

    fn line_len(e: &Event) -> usize {
        serde_json::to_vec(e).unwrap().len() + 1
    }

    /// The file on a disk that fills up: it takes `room` more bytes (the
    /// write that reaches that is short), then fails with ENOSPC.
    struct FullDisk {
        file: File,
        room: Arc<AtomicUsize>,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = self.file.write(&buf[..buf.len().min(room)])?;
            let _ = self
                .room
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                    Some(r.saturating_sub(n))
                });
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Output for FullDisk {
        fn file(&self) -> &File {
            &self.file
        }
    }

    /// A sink writing to `p` on a disk with `room` bytes left (set it to
    /// free space), with a backlog of `budget` bytes.
    fn sink_on(
        p: &Path,
        room: usize,
        budget: usize,
    ) -> (EventSink, Arc<AtomicUsize>, Arc<Metrics>) {
        let room = Arc::new(AtomicUsize::new(room));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        let disk = FullDisk {
            file,
            room: room.clone(),
        };
        let m = Arc::new(Metrics::new());
        let dest = Destination::File(p.to_path_buf());
        let sink =
            EventSink::start_with(dest, Some(Box::new(disk)), budget, None, m.clone()).unwrap();
        (sink, room, m)
    }

    /// The `seq` of each line of `p`; every line must be whole JSON.
    fn seqs(p: &Path) -> Vec<u64> {
        let text = std::fs::read_to_string(p).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "torn last line: {text:?}"
        );
        text.lines()
            .map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}"));
                v["seq"].as_u64().unwrap()
            })
            .collect()
    }

    fn counter(m: &Metrics, name: &str) -> u64 {
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn write_failures(m: &Metrics) -> u64 {
        counter(m, "hb_event_write_failures_total")
    }

    const A_WHILE: Duration = Duration::from_millis(300);
    const LONG: Duration = Duration::from_secs(10);

    /// The disk fills up in the middle of a line and is freed later:
    /// every event is in the file once, in order, each on its own line.
    /// (Through tokio's `File` the events whose writes failed were lost,
    /// and the first line after the space was freed was appended to the
    /// torn one.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_errors_lose_no_event_and_tear_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        // Room for two lines and the start of the third.
        let (sink, room, m) = sink_on(&p, 2 * line_len(&ev(1)) + 10, BACKLOG_BYTES);
        // One event per tick, as the tick publishes them.
        for s in 1..=6 {
            sink.publish(vec![ev(s)]);
        }
        assert_eq!(sink.flush_for(A_WHILE).await, 4, "3 to 6 wait for room");
        assert!(write_failures(&m) >= 1);
        room.store(usize::MAX, Ordering::SeqCst);
        sink.publish(vec![ev(7), ev(8)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), (1..=8).collect::<Vec<_>>());
    }

    /// While nothing can be written the backlog holds at most its budget:
    /// the newest events are dropped, whole, and counted; the rest are
    /// written in order once there is room, and events queue again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_backlog_drops_the_newest_events_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let line = line_len(&ev(10));
        let budget = 3 * line + line / 2;
        let (sink, room, m) = sink_on(&p, 0, budget);
        sink.publish((1..=10).map(ev).collect());
        assert_eq!(sink.flush_for(A_WHILE).await, 3, "1 to 3 held");
        assert!(sink.shared.lock().bytes.len() <= budget);
        assert_eq!(counter(&m, "hb_events_dropped_total"), 7);
        assert!(write_failures(&m) >= 1, "{}", write_failures(&m));
        room.store(usize::MAX, Ordering::SeqCst);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), [1, 2, 3]);
        sink.publish(vec![ev(11)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), [1, 2, 3, 11]);
    }

    /// Settled up to `upto`, the events `from..to` of each pair not
    /// written.
    fn settled(upto: u64, not_written: &[(u64, u64)]) -> Settled {
        let not_written = not_written.iter().map(|&(from, to)| from..to).collect();
        Settled { upto, not_written }
    }

    /// The settled position passes no event that is not written: not the
    /// line a full disk took part of, nor the ones after it, even where
    /// later events are dropped for good (the backlog was full). It counts
    /// them all once the lines held are written, and tells the dropped
    /// ones as not written (once), so that their records stay unconfirmed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_settled_position_passes_no_event_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let line = line_len(&ev(10));
        // Room for two lines and the start of a third; a backlog of three.
        let (sink, room, m) = sink_on(&p, 2 * line + 10, 3 * line + line / 2);
        assert_eq!(sink.publish(vec![ev(1), ev(2)]), 0);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(sink.settled(), Settled::from(2));
        assert_eq!(sink.publish(Vec::new()), 2, "nothing published");
        assert_eq!(sink.publish((3..=10).map(ev).collect()), 2);
        assert_eq!(sink.flush_for(A_WHILE).await, 3, "3 to 5 held");
        assert_eq!(counter(&m, "hb_events_dropped_total"), 5);
        assert_eq!(
            sink.settled(),
            Settled::from(2),
            "3 is half written, 6 to 10 dropped"
        );
        room.store(usize::MAX, Ordering::SeqCst);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), [1, 2, 3, 4, 5]);
        assert_eq!(sink.settled(), settled(10, &[(6, 11)]));
        assert_eq!(sink.settled(), Settled::from(10), "told once");
        // Dropped between written ones: each run its range.
        room.store(0, Ordering::SeqCst);
        assert_eq!(sink.publish((11..=16).map(ev).collect()), 10);
        assert_eq!(sink.flush_for(A_WHILE).await, 3, "11 to 13 held");
        room.store(usize::MAX, Ordering::SeqCst);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(sink.publish(vec![ev(17)]), 16);
        assert_eq!(sink.flush_for(LONG).await, 0);
        room.store(0, Ordering::SeqCst);
        assert_eq!(sink.publish((18..=21).map(ev).collect()), 17);
        assert_eq!(sink.flush_for(A_WHILE).await, 3, "18 to 20 held");
        room.store(usize::MAX, Ordering::SeqCst);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(sink.settled(), settled(21, &[(14, 17), (21, 22)]));
        assert_eq!(seqs(&p), [1, 2, 3, 4, 5, 11, 12, 13, 17, 18, 19, 20]);
    }

    /// With no events destination no event is written: every one settles
    /// as not written, whether or not a hook ran for it (its run may be
    /// replaced by a newer event of its node, or cut short at shutdown),
    /// so no record is ever confirmed and a restart announces a `dead`
    /// again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_destination_no_event_is_written() {
        let m = Arc::new(Metrics::new());
        let opts = super::super::hooks::HookOptions {
            command: "true".into(),
            concurrency: 1,
            timeout: LONG,
            queue: 1,
        };
        let hooks = Hooks::start(opts, m.clone());
        let sink =
            EventSink::start_with(Destination::None, None, 0, Some(hooks.clone()), m).unwrap();
        assert_eq!(sink.publish((1..=3).map(ev).collect()), 0);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(sink.publish((4..=5).map(ev).collect()), 3);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(sink.settled(), settled(5, &[(1, 6)]));
        assert_eq!(sink.settled(), Settled::from(5), "told once");
        hooks.shutdown(LONG).await;
    }

    /// Rename rotation, then reopen (SIGHUP): the events after it go to
    /// the new file, and a line the old file got only part of (its disk
    /// was full) goes whole to the new one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_after_rotation_writes_whole_lines_to_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let (sink, _room, _m) = sink_on(&p, 2 * line_len(&ev(1)) + 10, BACKLOG_BYTES);
        sink.publish(vec![ev(1), ev(2), ev(3)]);
        assert_eq!(sink.flush_for(A_WHILE).await, 1, "3 waits for room");
        let old = dir.path().join("events.jsonl.1");
        std::fs::rename(&p, &old).unwrap();
        // The new file is a plain one, with room.
        sink.reopen();
        sink.publish(vec![ev(4)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), [3, 4]);
        let text = std::fs::read_to_string(&old).unwrap();
        let (whole, part) = text.split_at(text.rfind('\n').unwrap() + 1);
        std::fs::write(&old, whole).unwrap();
        assert_eq!(seqs(&old), [1, 2]);
        assert_eq!(part.len(), 10, "{part:?}");
    }

    /// Reopen (SIGHUP) with no rotation: the same file, so the line the
    /// disk took only part of goes on where it stopped. (Written again from
    /// its start, it was appended to its own first bytes.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_of_the_same_file_finishes_the_line_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let (sink, _room, _m) = sink_on(&p, 2 * line_len(&ev(1)) + 10, BACKLOG_BYTES);
        sink.publish(vec![ev(1), ev(2), ev(3)]);
        assert_eq!(sink.flush_for(A_WHILE).await, 1, "3 waits for room");
        // The file reopened is a plain one, with room.
        sink.reopen();
        sink.publish(vec![ev(4)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), [1, 2, 3, 4]);
    }

    /// A file that ends in the middle of a line (the monitor died, or its
    /// disk filled, before a restart): the first line written goes on a
    /// line of its own, and only the old fragment is torn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_ending_mid_line_gets_a_newline_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, r#"{"seq":9,"ts"#).unwrap();
        let m = Arc::new(Metrics::new());
        let sink = EventSink::start(Destination::File(p.clone()), None, m)
            .await
            .unwrap();
        sink.publish(vec![ev(1)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        let text = std::fs::read_to_string(&p).unwrap();
        let (fragment, rest) = text.split_once('\n').unwrap();
        assert_eq!(fragment, r#"{"seq":9,"ts"#);
        std::fs::write(&p, rest).unwrap();
        assert_eq!(seqs(&p), [1]);
    }

    /// copytruncate while a line is half written (its disk was full): the
    /// line starts again, whole, at the start of the file, whether or not
    /// a reopen follows. (Without one, the rest of the line was written
    /// there alone.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copytruncate_mid_line_writes_the_line_whole() {
        for reopen in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("events.jsonl");
            let (sink, room, _m) = sink_on(&p, 2 * line_len(&ev(1)) + 10, BACKLOG_BYTES);
            sink.publish(vec![ev(1), ev(2), ev(3)]);
            assert_eq!(sink.flush_for(A_WHILE).await, 1, "3 waits for room");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(0)
                .unwrap();
            if reopen {
                sink.reopen();
            } else {
                room.store(usize::MAX, Ordering::SeqCst);
            }
            sink.publish(vec![ev(4)]);
            assert_eq!(sink.flush_for(LONG).await, 0, "reopen {reopen}");
            assert_eq!(seqs(&p), [3, 4], "reopen {reopen}");
        }
    }

    /// copytruncate: the file is opened to append, so after it is
    /// truncated the next line starts at its start (not after a hole of
    /// zeros where the old end was).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copytruncate_writes_from_the_start_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let m = Arc::new(Metrics::new());
        let sink = EventSink::start(Destination::File(p.clone()), None, m)
            .await
            .unwrap();
        sink.publish(vec![ev(1), ev(2)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), [1, 2]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        sink.publish(vec![ev(3)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        assert_eq!(seqs(&p), [3]);
    }

    /// Every stamp has three fractional digits, so stamps sort as text in
    /// time order (`.55Z` once sorted after `.251Z`), and reads back as
    /// the instant it stamps, to the millisecond.
    #[test]
    fn timestamps_have_exactly_three_fractional_digits() {
        use time::{OffsetDateTime, format_description::well_known::Rfc3339};
        let at = |ms: i128| OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).unwrap();
        // Within one second 2026-11-24T10:09:18 UTC, in time order (text
        // sorted `18.551Z` before `18.55Z`, and `18Z` after both).
        let base = 1_795_514_958_000;
        let cases = [
            (base, "2026-11-24T10:09:18.000Z"),
            (base + 251, "2026-11-24T10:09:18.251Z"),
            (base + 550, "2026-11-24T10:09:18.550Z"),
            (base + 551, "2026-11-24T10:09:18.551Z"),
        ];
        for (ms, want) in cases {
            let ts = rfc3339_ms(at(ms));
            assert_eq!(ts, want);
            assert_eq!(OffsetDateTime::parse(&ts, &Rfc3339).unwrap(), at(ms));
        }
        // Sub-millisecond digits are cut, not rounded up into the next
        // second; another offset is given in UTC.
        let t = at(base + 999) + time::Duration::nanoseconds(999_999);
        assert_eq!(rfc3339_ms(t), "2026-11-24T10:09:18.999Z");
        let t = at(base + 550).to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(rfc3339_ms(t), "2026-11-24T10:09:18.550Z");
        let mut sorted: Vec<String> = cases.iter().rev().map(|(_, s)| s.to_string()).collect();
        sorted.sort();
        assert_eq!(sorted, cases.map(|(_, s)| s.to_string()));
        assert_eq!(now_rfc3339().len(), "2026-11-24T10:09:18.550Z".len());
    }

    #[test]
    fn event_json_line_has_the_contract_fields() {
        let ev = Event {
            seq: 3,
            ts: now_rfc3339(),
            node_id: 42,
            event: EventKind::Restarted,
            previous: Status::Dead,
            state: Status::Alive,
            phi: 0.1,
            generation: 8,
            prev_generation: Some(7),
            last_seen_ms: Some(12),
            interval_ms: 1000,
            accepted: 5,
            lost: 0,
            restarts: 1,
        };
        let v: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], "restarted");
        assert_eq!(v["previous"], "dead");
        assert_eq!(v["node_id"], 42);
        assert_eq!(v["prev_generation"], 7);
        let ts = v["ts"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(),
            "{ts}"
        );
        assert!(ts.ends_with('Z'), "{ts}");
    }

    /// `--events -` with stdout redirected to a file (`>> events.jsonl`,
    /// systemd's `StandardOutput=append:`) that a crash left mid-line: the
    /// first event goes on a line of its own, as with `--events FILE`
    /// (found by review: it was glued onto the fragment).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdout_to_a_file_ending_mid_line_gets_a_newline_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, r#"{"seq":9,"ts"#).unwrap();
        let file = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        let m = Arc::new(Metrics::new());
        let sink = EventSink::start_with(
            Destination::Stdout,
            Some(Box::new(file)),
            BACKLOG_BYTES,
            None,
            m,
        )
        .unwrap();
        sink.publish(vec![ev(1)]);
        assert_eq!(sink.flush_for(LONG).await, 0);
        let text = std::fs::read_to_string(&p).unwrap();
        let (fragment, rest) = text
            .split_once('\n')
            .unwrap_or_else(|| panic!("no line break at all: {text:?}"));
        assert_eq!(fragment, r#"{"seq":9,"ts"#, "{text:?}");
        std::fs::write(&p, rest).unwrap();
        assert_eq!(seqs(&p), [1]);
    }
}

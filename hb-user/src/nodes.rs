//! `hb nodes`: the running monitor's node table, from its HTTP API
//! (`GET /nodes`, or `GET /nodes/{id}`), as a table or as JSON.
//!
//! The listing is read and printed a row at a time (each row checked,
//! `--json` too), so that the command's memory does not grow with the
//! fleet: the monitor streams it, and the command runs on the monitor's
//! host, where a million nodes' table whole took ~2 GB. What is printed
//! before the whole answer has come is [`HELD_ROWS`]'s matter.
//!
//! The answer is received on a thread of its own ([`receive`]), apart
//! from the printing: a reader of the output that stops (`hb nodes |
//! less`, the pager left open) must not stop the reading of the answer,
//! or the monitor gives the listing up ([`Received`] says how).

use std::{
    collections::VecDeque,
    fmt::Write as _,
    io::{Read, Write},
    net::SocketAddr,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;

use crate::monitor::api::NodeRow;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The monitor's --listen address: ADDR:PORT, [IPv6]:PORT or
    /// host:port (every address the name resolves to is tried in turn).
    #[arg(long, value_name = "HOST:PORT", default_value = crate::monitor::config::DEFAULT_LISTEN)]
    pub monitor: String,
    /// Print the JSON as the monitor returns it.
    #[arg(long)]
    pub json: bool,
    /// Only nodes in this state (unknown, alive, suspect, dead, left).
    #[arg(long, conflicts_with = "node_id")]
    pub state: Option<String>,
    /// Give up on a monitor whose whole answer has not come within this
    /// (a table of a million nodes takes seconds to build and send).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// One node only.
    pub node_id: Option<u32>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(s) = &args.state
        && crate::monitor::state::Status::from_name(s).is_none()
    {
        bail!("unknown state {s:?}: one of unknown, alive, suspect, dead, left");
    }
    let path = match (args.node_id, &args.state) {
        (Some(id), _) => format!("/nodes/{id}"),
        (None, Some(s)) => format!("/nodes?state={s}"),
        (None, None) => "/nodes".to_owned(),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let started = Instant::now();
    let body = match rt.block_on(open_within(&args.monitor, &path, timeout)) {
        Ok(body) => body,
        Err(e) => {
            // A lookup still running on its thread must not hold the exit.
            rt.shutdown_background();
            return Err(e);
        }
    };
    let received = Arc::new(Received::new());
    {
        let (received, monitor, path) = (received.clone(), args.monitor.clone(), path.clone());
        let left = timeout.saturating_sub(started.elapsed());
        std::thread::Builder::new()
            .name("hb-nodes-receive".into())
            .spawn(move || receive(rt, body, &received, left, &monitor, timeout, &path))
            .context("cannot start the thread that receives the answer")?;
    }
    let mut answer = Answer {
        received: &received,
        block: Vec::new(),
        at: 0,
        failed: None,
    };
    let stdout = Watched {
        out: std::io::stdout().lock(),
        received: &received,
    };
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout);
    let printed = if args.node_id.is_some() {
        print_node(
            std::io::Read::take(&mut answer, NODE_MAX),
            args.json,
            &mut out,
        )
    } else {
        print_listing(&mut answer, args.json, &mut out)
    };
    // The receiving thread, if not done, stops at its next frame (the
    // process may end before).
    received.printer_gone();
    match printed {
        Ok(()) => Ok(()),
        // The body's own failure (cut short, timed out) first: the
        // parser saw it only as the end of its input.
        Err(_) if answer.failed.is_some() => Err(answer
            .failed
            .take()
            .unwrap_or_else(|| anyhow::anyhow!("reading the answer to GET {path}"))),
        // Checked even for --json: a script must not take another
        // service's answer (or a truncated one) for the node table.
        Err(Halt::Answer(e)) => {
            Err(anyhow::Error::new(e).context("unexpected answer from the monitor"))
        }
        // A reader that went away (`| head`) ends the output quietly,
        // as it does for any Unix filter.
        Err(Halt::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(Halt::Output(e)) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// Rows held back before anything is printed. A listing of up to this
/// many nodes is printed once the whole answer has come and checked out,
/// as one piece: nothing of a truncated or foreign answer is printed, and
/// the table's columns are as wide as its widest values. A longer one is
/// printed as it comes, a row at a time (holding ~2 MB at most, the held
/// rows, whatever the fleet; what is received while the output stalls is
/// [`Received`]'s matter): the table's columns as wide as those of the
/// held rows (NODE and STATE as wide as any id and state can be, the
/// listing being by node id), a column widening from the row that needs
/// it; and a listing cut short after the held rows
/// has the rows printed before, then the error (`--json`: an array never
/// closed, which no JSON parser accepts; the exit status is 1 either way).
pub const HELD_ROWS: usize = 4096;

/// The most of a one-node answer read (a row is ~400 bytes): past it, the
/// answer is not the monitor's.
const NODE_MAX: u64 = 1 << 20;

/// Why printing an answer stopped.
#[derive(Debug)]
enum Halt {
    /// The answer is not what the monitor sends (or did not all come).
    Answer(serde_json::Error),
    /// Stdout took no more.
    Output(std::io::Error),
}

/// One node's answer (`GET /nodes/{id}`), checked, printed as the table
/// or (`json`) as the monitor wrote it.
fn print_node(body: impl Read, json: bool, out: &mut impl Write) -> Result<(), Halt> {
    let row: Checked = serde_json::from_reader(body).map_err(Halt::Answer)?;
    if json {
        writeln!(out, "{}", row.raw.get()).map_err(Halt::Output)?;
    } else {
        let mut table = Table::default();
        table.row(&row.row, out).map_err(Halt::Output)?;
        table.end(out).map_err(Halt::Output)?;
    }
    out.flush().map_err(Halt::Output)
}

/// A listing (`GET /nodes`: a JSON array of rows) read from `body` a row
/// at a time, each checked, printed to `out` as the table or (`json`) as
/// the monitor wrote it, held back as [`HELD_ROWS`] says. The end of the
/// table or of the JSON (its closing `]`) is printed only once the answer
/// is known to be whole: the array closed, nothing after it.
fn print_listing(body: impl Read, json: bool, out: &mut impl Write) -> Result<(), Halt> {
    // serde_json reads its input a byte at a time: from a buffer.
    let mut de =
        serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(64 * 1024, body));
    let mut failed = None;
    let rows = if json {
        let mut held = Json::default();
        serde::Deserializer::deserialize_seq(
            &mut de,
            Each {
                each: &mut |r: Checked| held.row(&r.raw, out),
                failed: &mut failed,
            },
        )
        .and_then(|()| de.end())
        .map(|()| Printer::Json(held))
    } else {
        let mut table = Table::default();
        serde::Deserializer::deserialize_seq(
            &mut de,
            Each {
                each: &mut |r: NodeRow| table.row(&r, out),
                failed: &mut failed,
            },
        )
        .and_then(|()| de.end())
        .map(|()| Printer::Table(table))
    };
    let printer = match (rows, failed) {
        (_, Some(e)) => return Err(Halt::Output(e)),
        (Err(e), None) => return Err(Halt::Answer(e)),
        (Ok(p), None) => p,
    };
    match printer {
        Printer::Json(mut held) => held.end(out),
        Printer::Table(mut table) => table.end(out),
    }
    .and_then(|()| out.flush())
    .map_err(Halt::Output)
}

enum Printer {
    Json(Json),
    Table(Table),
}

/// Visits a JSON array, giving `each` its elements one by one as they
/// are read; an error of `each` (the output's) stops the visit and is
/// kept in `failed`.
struct Each<'a, T> {
    each: &'a mut dyn FnMut(T) -> std::io::Result<()>,
    failed: &'a mut Option<std::io::Error>,
}

impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Each<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of node rows")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<T>()? {
            if let Err(e) = (self.each)(item) {
                *self.failed = Some(e);
                return Err(serde::de::Error::custom("the output failed"));
            }
        }
        Ok(())
    }
}

/// A row as the monitor wrote it (printed so by `--json`), checked to be
/// a node row.
struct Checked {
    raw: Box<RawValue>,
    row: NodeRow,
}

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        let row = serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?;
        Ok(Checked { raw, row })
    }
}

/// `--json`'s listing: the rows as the monitor wrote them (its array has
/// no space between them), held back as [`HELD_ROWS`] says.
#[derive(Default)]
struct Json {
    held: Vec<u8>,
    rows: usize,
}

impl Json {
    fn row(&mut self, raw: &RawValue, out: &mut impl Write) -> std::io::Result<()> {
        self.held.push(if self.rows == 0 { b'[' } else { b',' });
        self.held.extend_from_slice(raw.get().as_bytes());
        self.rows += 1;
        if self.rows > HELD_ROWS {
            out.write_all(&self.held)?;
            self.held.clear();
        }
        Ok(())
    }

    /// After the last row of a whole answer: what is held, and the end.
    fn end(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.rows == 0 {
            self.held.push(b'[');
        }
        out.write_all(&self.held)?;
        out.write_all(b"]\n")
    }
}

/// What of the answer a reader of stdout that takes nothing (a pager left
/// open) lets pile up at most: a monitor's largest listing, a million
/// nodes at ~1 KB a row (its rows are 400-600 bytes). Past it the answer
/// is read no further until the printer takes some, as when it was not
/// received apart.
const RECEIVED_MAX: usize = hb_common::maps::MAX_NODES as usize * 1024;

/// What of the answer is received ahead of a printer busy parsing and
/// printing (not waiting for its output): past it the receiving waits
/// for the printer, so that with a reader of the output that keeps up,
/// the command's memory stays that of a few rows whatever the fleet.
const RECEIVED_AHEAD: usize = 1 << 20;

/// A write to stdout that has not returned after this waits for the
/// output's reader (a pipe's reader that keeps up, a file, a terminal
/// take a write in well under this): [`RECEIVED_AHEAD`] no longer holds
/// the receiving back.
const OUTPUT_STALL: Duration = Duration::from_millis(20);

/// The received blocks of the answer: at most this much each, filled
/// whole (a monitor's frames are 64 KiB; another server's may be a few
/// bytes each), so that what is held is about the answer's own size.
const BLOCK: usize = 64 * 1024;

/// The answer as received ([`receive`]) and not yet taken by the printer
/// ([`Answer`]). The receiving never waits for the output: while the
/// printer waits on a write to stdout for longer than [`OUTPUT_STALL`]
/// (a pager left open), the rest of the answer is received into memory
/// (its raw JSON, up to [`RECEIVED_MAX`]), so that the monitor, which
/// gives up a client that takes nothing for 30 s, never waits on hb's
/// reader, and the listing is whole when that reader reads on. While
/// the printer is busy, the receiving keeps at most [`RECEIVED_AHEAD`]
/// ahead of it.
struct Received {
    queue: Mutex<Queue>,
    /// Rung when data or the end is received (the printer waits on it).
    came: Condvar,
    /// Rung when the printer takes a block or stops (the receiving waits
    /// on it).
    taken: Condvar,
    /// When the printer's write to stdout now under way began (ns after
    /// `epoch`, plus one), 0 when none is.
    writing_since: AtomicU64,
    epoch: Instant,
}

struct Queue {
    blocks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// How the answer ended, once it has: whole, or why not.
    end: Option<anyhow::Result<()>>,
    /// The printer stopped: the rest of the answer is not wanted.
    gone: bool,
}

/// What the printer gets of [`Received`].
enum Taken {
    Block(Vec<u8>),
    /// The whole answer has been taken.
    End,
    /// The answer failed after what was taken.
    Failed(anyhow::Error),
}

impl Received {
    fn new() -> Received {
        Received {
            queue: Mutex::new(Queue {
                blocks: VecDeque::new(),
                bytes: 0,
                end: None,
                gone: false,
            }),
            came: Condvar::new(),
            taken: Condvar::new(),
            writing_since: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until there is room for more of the answer: `false` if the
    /// printer is gone (nothing more is wanted).
    fn room(&self) -> bool {
        let mut q = self.queue();
        loop {
            if q.gone {
                return false;
            }
            if self.has_room(&q) {
                return true;
            }
            // Not rung when a write begins: looked at again in a while.
            q = self
                .taken
                .wait_timeout(q, OUTPUT_STALL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn has_room(&self, q: &Queue) -> bool {
        q.bytes < RECEIVED_AHEAD || (q.bytes < RECEIVED_MAX && self.output_stalled())
    }

    /// Whether the printer has been waiting on a write to stdout for
    /// [`OUTPUT_STALL`] or more.
    fn output_stalled(&self) -> bool {
        match self.writing_since.load(Ordering::Relaxed) {
            0 => false,
            since => {
                let now = self.epoch.elapsed().as_nanos() as u64 + 1;
                now.saturating_sub(since) >= OUTPUT_STALL.as_nanos() as u64
            }
        }
    }

    fn push(&self, mut data: &[u8]) {
        let mut q = self.queue();
        q.bytes += data.len();
        while !data.is_empty() {
            let block = match q.blocks.back_mut() {
                Some(b) if b.len() < b.capacity() => b,
                _ => {
                    q.blocks.push_back(Vec::with_capacity(BLOCK));
                    q.blocks.back_mut().expect("just pushed")
                }
            };
            let n = data.len().min(block.capacity() - block.len());
            block.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        drop(q);
        self.came.notify_one();
    }

    fn end(&self, end: anyhow::Result<()>) {
        self.queue().end = Some(end);
        self.came.notify_one();
    }

    /// The next block of the answer, waiting for it to come.
    fn take(&self) -> Taken {
        let mut q = self.queue();
        loop {
            if let Some(block) = q.blocks.pop_front() {
                q.bytes -= block.len();
                drop(q);
                self.taken.notify_one();
                return Taken::Block(block);
            }
            match q.end.take() {
                Some(Err(e)) => return Taken::Failed(e),
                Some(Ok(())) => {
                    q.end = Some(Ok(()));
                    return Taken::End;
                }
                None => q = self.came.wait(q).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }

    fn printer_gone(&self) {
        self.queue().gone = true;
        self.taken.notify_one();
    }
}

/// Receives the answer's `body` into `received` as fast as it comes (as
/// [`Received`] says), within `left` of `--timeout-ms` (`timeout`): the
/// time spent waiting for the monitor counts, never the time the printer
/// waits for its output's reader. Runs on a thread of its own, which
/// takes the runtime the connection lives on (and which is given up at
/// the end: a lookup still running on its thread must not hold it).
fn receive(
    rt: tokio::runtime::Runtime,
    mut body: Incoming,
    received: &Received,
    mut left: Duration,
    monitor: &str,
    timeout: Duration,
    path: &str,
) {
    /// Whatever stops the receiving, the printer is not left waiting.
    struct Ends<'a>(&'a Received, &'a str);
    impl Drop for Ends<'_> {
        fn drop(&mut self) {
            if self.0.queue().end.is_none() {
                let path = self.1;
                self.0.end(Err(anyhow::anyhow!(
                    "receiving the answer to GET {path} stopped"
                )));
            }
        }
    }
    let _ends = Ends(received, path);
    let end = loop {
        if !received.room() {
            break None;
        }
        let asked = Instant::now();
        // The timer is made inside the runtime, which it needs.
        let frame = rt.block_on(async { tokio::time::timeout(left, body.frame()).await });
        left = left.saturating_sub(asked.elapsed());
        match frame {
            Ok(None) => break Some(Ok(())),
            Ok(Some(Ok(frame))) => {
                // Trailers, if any, say nothing hb reads.
                if let Ok(data) = frame.into_data() {
                    received.push(&data);
                }
            }
            Ok(Some(Err(e))) => {
                break Some(Err(
                    anyhow::Error::new(e).context(format!("reading the answer to GET {path}"))
                ));
            }
            Err(_) => break Some(Err(did_not_answer(monitor, timeout))),
        }
    };
    if let Some(end) = end {
        received.end(end);
    }
    rt.shutdown_background();
}

/// The answer as the printer reads it, from [`Received`]. Its failure is
/// kept in `failed`: the reader of the answer sees only an error.
struct Answer<'a> {
    received: &'a Received,
    block: Vec<u8>,
    /// What of `block` was read.
    at: usize,
    failed: Option<anyhow::Error>,
}

impl Read for Answer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.block.len() {
            if self.failed.is_some() {
                return Err(std::io::Error::other("the answer failed"));
            }
            match self.received.take() {
                Taken::Block(block) => (self.block, self.at) = (block, 0),
                Taken::End => return Ok(0),
                Taken::Failed(e) => self.failed = Some(e),
            }
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Stdout, its writes timed for [`Received::output_stalled`].
struct Watched<'a, W> {
    out: W,
    received: &'a Received,
}

impl<W: Write> Watched<'_, W> {
    fn timed<T>(&mut self, write: impl FnOnce(&mut W) -> T) -> T {
        let since = &self.received.writing_since;
        since.store(
            self.received.epoch.elapsed().as_nanos() as u64 + 1,
            Ordering::Relaxed,
        );
        let written = write(&mut self.out);
        since.store(0, Ordering::Relaxed);
        written
    }
}

impl<W: Write> Write for Watched<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.timed(|out| out.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.timed(|out| out.flush())
    }
}

/// `GET path` from the monitor at `monitor` (`host:port`), waiting out a
/// busy one, all within `timeout`: the name lookup too (a resolver that
/// does not answer held the command for its own timeouts, 10 s and more,
/// whatever `--timeout-ms` said).
pub async fn fetch_within(monitor: &str, path: &str, timeout: Duration) -> anyhow::Result<Bytes> {
    let started = tokio::time::Instant::now();
    let body = open_within(monitor, path, timeout).await?;
    tokio::time::timeout_at(started + timeout, collect(body, path))
        .await
        .map_err(|_| did_not_answer(monitor, timeout))?
}

/// [`fetch_within`] up to the body of a 200 answer, which the caller
/// reads as it comes.
async fn open_within(monitor: &str, path: &str, timeout: Duration) -> anyhow::Result<Incoming> {
    // What the fetch was doing when the time ran out.
    let phase = AtomicU8::new(RESOLVING);
    let ms = timeout.as_millis();
    tokio::time::timeout(timeout, async {
        let addrs = resolve(monitor).await?;
        open_patiently_any(&addrs, path, &phase).await
    })
    .await
    .map_err(|_| match phase.load(Ordering::Relaxed) {
        RESOLVING => anyhow::anyhow!(
            "the name lookup of {monitor} did not finish within {ms} ms (see --timeout-ms)"
        ),
        BUSY => anyhow::anyhow!(
            "the monitor at {monitor} was busy until the end of {ms} ms: it serves as many \
             node listings at once as it will, and answered 503 (see --timeout-ms)"
        ),
        _ => did_not_answer(monitor, timeout),
    })?
}

fn did_not_answer(monitor: &str, timeout: Duration) -> anyhow::Error {
    anyhow::anyhow!(
        "the monitor at {monitor} did not answer within {} ms (see --timeout-ms)",
        timeout.as_millis()
    )
}

/// The monitor is serving as many node listings as it will at once
/// (503 with `Retry-After`).
#[derive(Debug, thiserror::Error)]
#[error("monitor answered 503 Service Unavailable: {message}")]
pub struct Busy {
    pub retry_after: Duration,
    pub message: String,
}

/// `--monitor`'s addresses: a host name resolved (by the system's
/// resolver, on a thread of the runtime's), or an address as it is.
async fn resolve(monitor: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(monitor)
        .await
        .with_context(|| {
            format!("cannot resolve --monitor {monitor} (ADDR:PORT, [IPv6]:PORT or host:port)")
        })?
        .collect();
    if addrs.is_empty() {
        bail!("cannot resolve --monitor {monitor}: the name has no address");
    }
    Ok(addrs)
}

/// [`get`], asking again after the pause a busy monitor names ([`Busy`])
/// for as long as it is busy: the caller bounds the whole (`--timeout-ms`).
pub async fn get_patiently(addr: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let body = open_patiently_any(&[addr], path, &AtomicU8::new(ASKING)).await?;
    collect(body, path).await
}

/// What a fetch was doing ([`fetch_within`] says it at its timeout).
const RESOLVING: u8 = 0;
const ASKING: u8 = 1;
const BUSY: u8 = 2;

/// [`open_any`], asking again as [`get_patiently`] does; `phase` is
/// [`BUSY`] while it waits out a busy answer, [`ASKING`] while it asks.
async fn open_patiently_any(
    addrs: &[SocketAddr],
    path: &str,
    phase: &AtomicU8,
) -> anyhow::Result<Incoming> {
    loop {
        phase.store(ASKING, Ordering::Relaxed);
        match open_any(addrs, path).await {
            Err(e) => match e.downcast_ref::<Busy>() {
                Some(b) => {
                    phase.store(BUSY, Ordering::Relaxed);
                    tracing::debug!(retry_after = ?b.retry_after, "{b}");
                    tokio::time::sleep(b.retry_after).await;
                }
                None => return Err(e),
            },
            ok => return ok,
        }
    }
}

/// `GET path` from the monitor at `addr`; the body of a 200 answer.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let body = open_any(&[addr], path).await?;
    collect(body, path).await
}

/// The whole of a body, in memory (for the API's own tests: `hb nodes`
/// reads its answer as it comes).
async fn collect(body: Incoming, path: &str) -> anyhow::Result<Bytes> {
    Ok(body
        .collect()
        .await
        .with_context(|| format!("reading the answer to GET {path}"))?
        .to_bytes())
}

/// The most of an answer other than 200 kept for its message: whatever
/// else sent it, it is not held whole.
const MESSAGE_MAX: usize = 4096;

/// `GET path` from the first of `addrs` that takes the connection (a
/// name such as `localhost` resolves to `::1` and `127.0.0.1`, and the
/// monitor listens on one of them); the body of a 200 answer, to read.
async fn open_any(addrs: &[SocketAddr], path: &str) -> anyhow::Result<Incoming> {
    let stream = tokio::net::TcpStream::connect(addrs)
        .await
        .with_context(|| {
            let tried = addrs.iter().map(SocketAddr::to_string).collect::<Vec<_>>();
            format!(
                "cannot reach the monitor at {} (is it running? see --monitor)",
                tried.join(", ")
            )
        })?;
    let addr = stream.peer_addr().unwrap_or(addrs[0]);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path} from {addr}"))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp.into_body());
    }
    // Seconds, bounded: a monitor cannot park its client for long.
    let retry_after = resp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.clamp(1, 10)));
    let mut body = resp.into_body();
    let mut message = Vec::new();
    while message.len() < MESSAGE_MAX {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    message.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("reading the answer to GET {path}"))
                );
            }
            None => break,
        }
    }
    message.truncate(MESSAGE_MAX);
    let message = String::from_utf8_lossy(&message).trim().to_owned();
    if let (hyper::StatusCode::SERVICE_UNAVAILABLE, Some(retry_after)) = (status, retry_after) {
        return Err(Busy {
            retry_after,
            message,
        }
        .into());
    }
    bail!("monitor answered {status}: {message}")
}

/// The table's columns.
const HEADER: [&str; 13] = [
    "NODE",
    "STATE",
    "PHI",
    "GEN",
    "ACCEPTED",
    "LAST_SEEN",
    "INTERVAL",
    "REQUESTED",
    "LOST",
    "RESTARTS",
    "RTT_US",
    "LOAD",
    "EPOCH",
];

/// The widest a NODE (a u32) and a STATE (`suspect`, `unknown`) can be:
/// the widths of those columns in a table printed before its end
/// ([`HELD_ROWS`]), whose held rows have the smallest ids.
const NODE_WIDTH: usize = 10;
const STATE_WIDTH: usize = 7;

/// The rows as an aligned text table, one word a cell (for `awk`), two
/// spaces between columns; held back as [`HELD_ROWS`] says.
#[derive(Default)]
struct Table {
    held: Vec<[String; 13]>,
    /// The columns' widths once the header is printed.
    width: Option<[usize; 13]>,
    line: String,
}

impl Table {
    fn row(&mut self, r: &NodeRow, out: &mut impl Write) -> std::io::Result<()> {
        let cells = cells(r);
        if self.width.is_some() {
            return self.line(&cells, out);
        }
        self.held.push(cells);
        if self.held.len() > HELD_ROWS {
            self.release(true, out)?;
        }
        Ok(())
    }

    /// After the last row of a whole answer: what is held (the header at
    /// least).
    fn end(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.width.is_none() {
            self.release(false, out)?;
        }
        Ok(())
    }

    /// Prints the header and the held rows, the columns as wide as their
    /// widest cells (and, with `more` rows to come, as wide as any NODE
    /// and STATE).
    fn release(&mut self, more: bool, out: &mut impl Write) -> std::io::Result<()> {
        let mut width = HEADER.map(str::len);
        if more {
            width[0] = width[0].max(NODE_WIDTH);
            width[1] = width[1].max(STATE_WIDTH);
        }
        for c in &self.held {
            for (w, s) in width.iter_mut().zip(c) {
                *w = (*w).max(s.len());
            }
        }
        self.width = Some(width);
        self.line(&HEADER, out)?;
        for c in std::mem::take(&mut self.held) {
            self.line(&c, out)?;
        }
        Ok(())
    }

    /// One line of the table; a cell wider than its column widens it
    /// from here on.
    fn line(&mut self, cells: &[impl AsRef<str>; 13], out: &mut impl Write) -> std::io::Result<()> {
        let width = self.width.get_or_insert(HEADER.map(str::len));
        self.line.clear();
        for (i, (w, cell)) in width.iter_mut().zip(cells).enumerate() {
            let cell = cell.as_ref();
            *w = (*w).max(cell.len());
            if i > 0 {
                self.line.push_str("  ");
            }
            let _ = write!(self.line, "{cell:<w$}", w = *w);
        }
        let end = self.line.trim_end().len();
        self.line.truncate(end);
        self.line.push('\n');
        out.write_all(self.line.as_bytes())
    }
}

/// A row's cells, as the table shows them.
fn cells(r: &NodeRow) -> [String; 13] {
    [
        r.node_id.to_string(),
        r.state.clone(),
        if r.phi >= 1e6 {
            "inf".into()
        } else {
            format!("{:.2}", r.phi)
        },
        r.generation.to_string(),
        r.accepted.to_string(),
        r.last_seen_ms
            .map(human_ms)
            .unwrap_or_else(|| "never".into()),
        format!("{}ms", r.interval_ms),
        if r.requested_interval_ms == 0 {
            "-".into()
        } else {
            format!("{}ms", r.requested_interval_ms)
        },
        r.lost.to_string(),
        r.restarts.to_string(),
        r.rtt_us.to_string(),
        format!("{:.1}%", r.load as f64 / 10.0),
        r.key_epoch
            .map(|e| e.to_string())
            .unwrap_or_else(|| "-".into()),
    ]
}

/// A duration of `ms` in its two largest units, in humantime's spelling
/// without spaces (`850ms`, `4s200ms`, `3m46s`, `2h5m`, `3d4h`; a zero
/// second unit is left out: `1m`): short enough for a column, and one
/// word for `awk`.
fn human_ms(ms: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
        (1, "ms"),
    ];
    let Some(first) = UNITS.iter().position(|(u, _)| ms >= *u) else {
        return "0ms".into();
    };
    let (unit, name) = UNITS[first];
    let mut out = format!("{}{name}", ms / unit);
    if let Some(&(next, next_name)) = UNITS.get(first + 1) {
        let n = ms % unit / next;
        if n > 0 {
            out.push_str(&format!("{n}{next_name}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_is_shown_in_its_two_largest_units() {
        let cases = [
            (0, "0ms"),
            (850, "850ms"),
            (1000, "1s"),
            (4200, "4s200ms"),
            (59_999, "59s999ms"),
            (60_000, "1m"),
            (226_462, "3m46s"),
            (7_500_000, "2h5m"),
            (273_600_000, "3d4h"),
        ];
        for (ms, want) in cases {
            let got = human_ms(ms);
            assert_eq!(got, want, "{ms} ms");
            // humantime reads it back, to within the unit left out.
            let back = humantime::parse_duration(&got).unwrap().as_millis() as u64;
            assert!(back <= ms && ms - back < 60_000, "{ms}: {got}");
        }
    }

    fn listing(ids: impl Iterator<Item = u32>, state: &str) -> String {
        let rows: Vec<String> = ids
            .map(|id| {
                format!(
                    r#"{{"node_id":{id},"state":"{state}","phi":0.5,"generation":3,"accepted":10,"last_seen_ms":850,"interval_ms":1000,"requested_interval_ms":0,"mean_interarrival_ms":1000.0,"lost":0,"restarts":0,"rtt_us":0,"load":0,"bad_tag":0,"replay":0,"stale":0,"acks_sent":0,"key_epoch":1,"leaving":false,"state_for_ms":5000,"origin":"configured","slot":0,"last_decision":null}}"#
                )
            })
            .collect();
        format!("[{}]", rows.join(","))
    }

    /// Up to [`HELD_ROWS`] rows, the table is as wide as its cells; past
    /// them it is printed as it comes, NODE and STATE as wide as any, and
    /// a column widens from the first row that needs it.
    #[test]
    fn a_long_table_is_printed_as_it_comes() {
        let held = HELD_ROWS as u32;
        let mut out = Vec::new();
        print_listing(listing(1..=held, "alive").as_bytes(), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), HELD_ROWS + 1);
        assert!(text.starts_with("NODE  STATE  PHI "), "{}", &text[..200]);
        let mut body = listing(1..=held + 4, "alive");
        body = body.replacen(
            &format!(r#""node_id":{},"state":"alive""#, held + 2),
            &format!(r#""node_id":{},"state":"unknown""#, held + 2),
            1,
        );
        body = body.replacen(
            &format!(
                r#""node_id":{},"state":"alive","phi":0.5,"generation":3"#,
                held + 3
            ),
            &format!(
                r#""node_id":{},"state":"alive","phi":0.5,"generation":123456789"#,
                held + 3
            ),
            1,
        );
        let mut out = Vec::new();
        print_listing(body.as_bytes(), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), HELD_ROWS + 5);
        assert!(
            lines[0].starts_with("NODE        STATE    PHI   GEN  ACC"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("1           alive    0.50  3    10"),
            "{}",
            lines[1]
        );
        // STATE is as wide as any; GEN widens at node held+3's, and stays.
        let at = |i: usize| lines[i].find("850ms").unwrap();
        assert_eq!(at(HELD_ROWS + 1), at(1));
        assert_eq!(at(HELD_ROWS + 2), at(1), "{}", lines[HELD_ROWS + 2]);
        assert!(at(HELD_ROWS + 3) > at(1), "{}", lines[HELD_ROWS + 3]);
        assert_eq!(
            at(HELD_ROWS + 4),
            at(HELD_ROWS + 3),
            "{}",
            lines[HELD_ROWS + 4]
        );
    }

    /// A listing cut short after the held rows: what was printed is no
    /// JSON (the array is never closed), and the answer is refused; a
    /// whole one is printed as it came.
    #[test]
    fn a_long_json_listing_cut_short_is_never_closed() {
        let body = listing(1..=HELD_ROWS as u32 * 2, "alive");
        let mut out = Vec::new();
        print_listing(body.as_bytes(), true, &mut out).unwrap();
        assert_eq!(out, format!("{body}\n").as_bytes());
        let cut = &body.as_bytes()[..body.len() - 100];
        let mut out = Vec::new();
        let e = print_listing(cut, true, &mut out).unwrap_err();
        assert!(matches!(e, Halt::Answer(_)), "{e:?}");
        assert!(out.len() > HELD_ROWS * 100, "the held rows were printed");
        assert!(!out.ends_with(b"]") && !out.ends_with(b"]\n"));
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_err());
        // Something after the array: refused, the array left open.
        let mut out = Vec::new();
        let more = format!("{body}{{}}");
        assert!(matches!(
            print_listing(more.as_bytes(), true, &mut out),
            Err(Halt::Answer(_))
        ));
        assert!(!out.ends_with(b"]\n"));
    }

    /// An output that takes no more (`| head`) stops the reading.
    #[test]
    fn a_closed_output_stops_the_listing() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let body = listing(1..=HELD_ROWS as u32 * 4, "alive");
        let mut read = body.as_bytes();
        let e = print_listing(&mut read, false, &mut Closed).unwrap_err();
        assert!(
            matches!(&e, Halt::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe),
            "{e:?}"
        );
        assert!(!read.is_empty(), "read on after the output closed");
    }

    /// The answer is received ahead of the printer up to
    /// [`RECEIVED_AHEAD`] while the printer is busy, and on while it
    /// waits on its output; what the printer takes is the answer as
    /// received, then its end.
    #[test]
    fn the_answer_is_received_ahead_while_the_output_stalls() {
        let received = Received::new();
        let mut sent = Vec::new();
        for i in 0..RECEIVED_AHEAD / 1000 + 1 {
            let frame = vec![i as u8; 1000];
            received.push(&frame);
            sent.extend(frame);
        }
        assert!(!received.has_room(&received.queue()), "a busy printer");
        let mut out = Watched {
            out: Vec::new(),
            received: &received,
        };
        out.timed(|_| {
            assert!(!received.has_room(&received.queue()), "a write just begun");
            std::thread::sleep(OUTPUT_STALL + Duration::from_millis(5));
            assert!(received.has_room(&received.queue()), "a write waiting");
        });
        assert!(!received.has_room(&received.queue()), "the write done");
        assert_eq!(received.queue().blocks.len(), sent.len().div_ceil(BLOCK));
        received.push(b"]");
        sent.push(b']');
        received.end(Ok(()));
        let mut answer = Answer {
            received: &received,
            block: Vec::new(),
            at: 0,
            failed: None,
        };
        let mut got = Vec::new();
        answer.read_to_end(&mut got).unwrap();
        assert_eq!(got, sent);
        assert!(received.has_room(&received.queue()), "all taken");
        // A failure comes after what was received before it.
        let received = Received::new();
        received.push(b"[1,");
        received.end(Err(anyhow::anyhow!("cut short")));
        let mut answer = Answer {
            received: &received,
            block: Vec::new(),
            at: 0,
            failed: None,
        };
        let mut got = [0u8; 8];
        assert_eq!(answer.read(&mut got).unwrap(), 3);
        assert!(answer.read(&mut got).is_err());
        assert_eq!(format!("{}", answer.failed.unwrap()), "cut short");
    }

    /// The API's own tests spawn it: the flag it keeps across its awaits
    /// must not make it `!Send` (a `Cell` did).
    #[test]
    fn get_patiently_is_send() {
        fn is_send<T: Send>(_: T) {}
        is_send(get_patiently("127.0.0.1:9".parse().unwrap(), "/nodes"));
    }

    #[tokio::test]
    async fn monitor_names_are_resolved() {
        let addrs = resolve("localhost:9420").await.unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 9420),
            "{addrs:?}"
        );
        assert_eq!(
            resolve("[::1]:80").await.unwrap(),
            ["[::1]:80".parse().unwrap()]
        );
        let e = resolve("localhost").await.unwrap_err();
        assert!(
            format!("{e:#}").starts_with("cannot resolve --monitor localhost"),
            "{e:#}"
        );
    }
}

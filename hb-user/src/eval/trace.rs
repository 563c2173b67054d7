//! Heartbeat arrival traces and crash files: the CSV formats `hb eval`
//! reads and `hb eval gen` writes.
//!
//! An arrival trace has the header `node_id,recv_ns` and one row per
//! heartbeat received, sorted by `recv_ns` (ns on any monotonic clock).
//! Two optional columns carry what the heartbeat said on the wire:
//! `interval_ms`, the interval the sender announced (the wire's
//! `interval_ms` field), and after it `seq`, the heartbeat's sequence
//! number (the wire's `seq`; a jump means heartbeats were lost). Only
//! detectors whose published algorithm reads them may use them: hb's own
//! reads both, Chen's NFD-E reads `seq` (its estimate is written in
//! sequence numbers); the others never see either, as in their original
//! systems. An empty cell means "not known".
//!
//! A crash file has the header `node_id,crash_ns`: the node stopped
//! sending at `crash_ns` and never came back. At most one crash per node.
//! Heartbeats sent before the crash may still arrive after it; a node
//! whose heartbeats arrive more than [`IN_FLIGHT_NS`] (a minute) after its
//! crash kept sending, and its crash time is likely on another clock:
//! `hb eval` says how many such nodes a crash file has, in one warning,
//! and scores them as written (the crash detected late, or missed if the
//! node sends to the end of the trace). A crash after the end of the
//! trace (its last arrival) is ignored, as are the crashes of nodes that
//! never appear in it, and `hb eval` warns of both: the node was up for
//! all of the trace, nothing in it could detect the crash ([`crash_in`]).
//!
//! There is no generation column: a trace is one sender's life per node.
//! A sender that restarts numbers its heartbeats from 1 again, and the
//! detectors that read `seq` take a sequence number going back as its
//! restart (`detectors`, `restarted`), as the monitor would from the
//! restarted sender's larger generation.
//!
//! Errors name the file's line so a broken trace can be fixed by hand.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::Path,
};

use thiserror::Error;

/// Why a trace or crash file was rejected. `line` is 1-based, the header
/// being line 1.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The cause is the error's `source()`, not part of its message, so a
    /// chain printed with `{:#}` names it once.
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        cause: std::io::Error,
    },
    #[error("line 1: bad header {found:?}, expected {expected:?}")]
    BadHeader { found: String, expected: String },
    #[error("line {line}: {msg}")]
    BadRow { line: u64, msg: String },
    #[error(
        "line {line}: recv_ns {recv_ns} is earlier than {prev} on the line before: the trace must be sorted by recv_ns"
    )]
    Unsorted { line: u64, recv_ns: u64, prev: u64 },
    #[error(
        "line {line}: node {node_id} crashes twice (a crash file gives at most one crash per node)"
    )]
    DuplicateCrash { line: u64, node_id: u32 },
    #[error("the trace has no arrivals")]
    Empty,
}

/// One received heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub recv_ns: u64,
    /// The interval the sender announced, ms (`None`: not in the trace).
    pub interval_ms: Option<u32>,
    /// The heartbeat's sequence number (`None`: not in the trace).
    pub seq: Option<u64>,
}

/// An arrival trace grouped by node. Each node's arrivals are in the
/// file's order (sorted by `recv_ns`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    pub nodes: BTreeMap<u32, Vec<Arrival>>,
    /// First and last `recv_ns` of the whole trace: the observation window.
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Crash time per node, ns on the trace's clock.
pub type Crashes = BTreeMap<u32, u64>;

impl Trace {
    pub fn arrivals(&self) -> usize {
        self.nodes.values().map(Vec::len).sum()
    }

    /// Builds a trace from per-node arrivals (each sorted by time), e.g.
    /// from the generator; the window is the span of all arrivals.
    pub fn from_nodes(nodes: BTreeMap<u32, Vec<Arrival>>) -> Trace {
        let start_ns = nodes
            .values()
            .filter_map(|a| a.first())
            .map(|a| a.recv_ns)
            .min()
            .unwrap_or(0);
        let end_ns = nodes
            .values()
            .filter_map(|a| a.last())
            .map(|a| a.recv_ns)
            .max()
            .unwrap_or(0);
        Trace {
            nodes,
            start_ns,
            end_ns,
        }
    }

    pub fn read_path(path: &Path) -> Result<Trace, TraceError> {
        let f = open(path)?;
        Trace::read(std::io::BufReader::new(f)).map_err(|e| e.in_file(path))
    }

    /// Parses an arrival trace (see the module doc).
    pub fn read(r: impl Read) -> Result<Trace, TraceError> {
        let mut rdr = csv_reader(r);
        let headers = header(&mut rdr)?;
        let width = match headers.as_slice() {
            [a, b] if a == "node_id" && b == "recv_ns" => 2,
            [a, b, c] if a == "node_id" && b == "recv_ns" && c == "interval_ms" => 3,
            [a, b, c, d]
                if a == "node_id" && b == "recv_ns" && c == "interval_ms" && d == "seq" =>
            {
                4
            }
            _ => {
                return Err(TraceError::BadHeader {
                    found: headers.join(","),
                    expected: "node_id,recv_ns[,interval_ms[,seq]]".into(),
                });
            }
        };
        let mut nodes: BTreeMap<u32, Vec<Arrival>> = BTreeMap::new();
        let mut prev = 0u64;
        let mut start = None;
        let mut rec = csv::ByteRecord::new();
        loop {
            let line = rdr.position().line();
            match rdr.read_byte_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => return Err(csv_error(e, line)),
            }
            let line = rec.position().map_or(line, |p| p.line());
            if rec.len() != width {
                return Err(TraceError::BadRow {
                    line,
                    msg: format!("expected {width} fields, found {}", rec.len()),
                });
            }
            let node_id = node_field(&rec, line)?;
            let recv_ns: u64 = number(&rec[1], "recv_ns", line)?;
            let optional = |i: usize, name: &str| -> Result<Option<u64>, TraceError> {
                if width > i && !rec[i].trim_ascii().is_empty() {
                    number::<u64>(&rec[i], name, line).map(Some)
                } else {
                    Ok(None)
                }
            };
            let interval_ms = match optional(2, "interval_ms")? {
                Some(v) => Some(u32::try_from(v).map_err(|_| TraceError::BadRow {
                    line,
                    msg: format!("interval_ms {v} is too large"),
                })?),
                None => None,
            };
            let seq = optional(3, "seq")?;
            if recv_ns < prev {
                return Err(TraceError::Unsorted {
                    line,
                    recv_ns,
                    prev,
                });
            }
            prev = recv_ns;
            start.get_or_insert(recv_ns);
            nodes.entry(node_id).or_default().push(Arrival {
                recv_ns,
                interval_ms,
                seq,
            });
        }
        let Some(start_ns) = start else {
            return Err(TraceError::Empty);
        };
        Ok(Trace {
            nodes,
            start_ns,
            end_ns: prev,
        })
    }

    /// Writes the trace as CSV, merged across nodes in time order (ties by
    /// node id; a node's arrivals at the same time in their order, which
    /// is what its sequence numbers are replayed in), with the `interval_ms` column when any arrival has an
    /// interval or a sequence number, and the `seq` column when any has
    /// a sequence number.
    pub fn write(&self, w: impl Write) -> std::io::Result<()> {
        let all = || self.nodes.values().flatten();
        let with_seq = all().any(|a| a.seq.is_some());
        let with_interval = with_seq || all().any(|a| a.interval_ms.is_some());
        let mut rows: Vec<(u64, u32, &Arrival)> = Vec::with_capacity(self.arrivals());
        for (&id, arr) in &self.nodes {
            rows.extend(arr.iter().map(|a| (a.recv_ns, id, a)));
        }
        rows.sort_by_key(|r| (r.0, r.1));
        let mut w = std::io::BufWriter::new(w);
        let cell = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
        match (with_interval, with_seq) {
            (false, _) => writeln!(w, "node_id,recv_ns")?,
            (true, false) => writeln!(w, "node_id,recv_ns,interval_ms")?,
            (true, true) => writeln!(w, "node_id,recv_ns,interval_ms,seq")?,
        }
        for (t, id, a) in rows {
            match (with_interval, with_seq) {
                (false, _) => writeln!(w, "{id},{t}")?,
                (true, false) => writeln!(w, "{id},{t},{}", cell(a.interval_ms.map(u64::from)))?,
                (true, true) => writeln!(
                    w,
                    "{id},{t},{},{}",
                    cell(a.interval_ms.map(u64::from)),
                    cell(a.seq)
                )?,
            }
        }
        w.flush()
    }
}

/// How long after a node's crash its heartbeats may still arrive, sent
/// before the crash and in flight: a minute, far beyond any path's delay.
pub const IN_FLIGHT_NS: u64 = 60_000_000_000;

/// How many nodes of `crashes` have heartbeats in `trace` more than
/// [`IN_FLIGHT_NS`] after their crash (see the module doc).
pub fn sending_after_crash(trace: &Trace, crashes: &Crashes) -> usize {
    crashes
        .iter()
        .filter(|&(id, &c)| {
            trace
                .nodes
                .get(id)
                .and_then(|a| a.last())
                .is_some_and(|a| a.recv_ns > c.saturating_add(IN_FLIGHT_NS))
        })
        .count()
}

/// Node `id`'s crash as `trace` can score it: its time, unless it comes
/// after the end of the trace. Such a node was up for all of the trace:
/// nothing in it could detect the crash, and a suspicion of its silence
/// before the end would have started before the crash (once scored as a
/// detection in 0 ms, the silence as a mistake too).
pub fn crash_in(trace: &Trace, crashes: &Crashes, id: u32) -> Option<u64> {
    crashes.get(&id).copied().filter(|&c| c <= trace.end_ns)
}

/// How many nodes of `trace` crash after its end ([`crash_in`]: their
/// crashes are ignored).
pub fn crashes_after_end(trace: &Trace, crashes: &Crashes) -> usize {
    crashes
        .iter()
        .filter(|&(id, &c)| trace.nodes.contains_key(id) && c > trace.end_ns)
        .count()
}

pub fn read_crashes_path(path: &Path) -> Result<Crashes, TraceError> {
    let f = open(path)?;
    read_crashes(std::io::BufReader::new(f)).map_err(|e| e.in_file(path))
}

fn open(path: &Path) -> Result<std::fs::File, TraceError> {
    std::fs::File::open(path).map_err(|cause| TraceError::Io {
        path: path.display().to_string(),
        cause,
    })
}

impl TraceError {
    /// A read error of a reader (named `input`) as one of the file at
    /// `path` (opening a directory succeeds; reading it fails).
    fn in_file(self, path: &Path) -> TraceError {
        match self {
            TraceError::Io { cause, .. } => TraceError::Io {
                path: path.display().to_string(),
                cause,
            },
            e => e,
        }
    }
}

/// Parses a crash file (`node_id,crash_ns`, any order).
pub fn read_crashes(r: impl Read) -> Result<Crashes, TraceError> {
    let mut rdr = csv_reader(r);
    let headers = header(&mut rdr)?;
    if headers != ["node_id", "crash_ns"] {
        return Err(TraceError::BadHeader {
            found: headers.join(","),
            expected: "node_id,crash_ns".into(),
        });
    }
    let mut out = Crashes::new();
    let mut rec = csv::ByteRecord::new();
    loop {
        let line = rdr.position().line();
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_error(e, line)),
        }
        let line = rec.position().map_or(line, |p| p.line());
        if rec.len() != 2 {
            return Err(TraceError::BadRow {
                line,
                msg: format!("expected 2 fields, found {}", rec.len()),
            });
        }
        let node_id = node_field(&rec, line)?;
        let crash_ns = number(&rec[1], "crash_ns", line)?;
        if out.insert(node_id, crash_ns).is_some() {
            return Err(TraceError::DuplicateCrash { line, node_id });
        }
    }
    Ok(out)
}

pub fn write_crashes(c: &Crashes, w: impl Write) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(w);
    writeln!(w, "node_id,crash_ns")?;
    for (id, t) in c {
        writeln!(w, "{id},{t}")?;
    }
    w.flush()
}

fn csv_reader(r: impl Read) -> csv::Reader<impl Read> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        // Rows of the wrong width are reported by us, with the line.
        .flexible(true)
        .comment(None)
        .from_reader(r)
}

fn header(rdr: &mut csv::Reader<impl Read>) -> Result<Vec<String>, TraceError> {
    let mut rec = csv::StringRecord::new();
    match rdr.read_record(&mut rec) {
        Ok(true) => Ok(rec.iter().map(|f| f.trim().to_string()).collect()),
        Ok(false) => Err(TraceError::BadHeader {
            found: String::new(),
            expected: "a header line".into(),
        }),
        Err(e) => Err(csv_error(e, 1)),
    }
}

fn csv_error(e: csv::Error, line: u64) -> TraceError {
    let line = e.position().map_or(line, |p| p.line());
    let msg = e.to_string();
    match e.into_kind() {
        // Named by the caller that knows the file (`in_file`).
        csv::ErrorKind::Io(cause) => TraceError::Io {
            path: "input".into(),
            cause,
        },
        _ => TraceError::BadRow { line, msg },
    }
}

fn node_field(rec: &csv::ByteRecord, line: u64) -> Result<u32, TraceError> {
    let id: u32 = number(&rec[0], "node_id", line)?;
    if id == 0 {
        return Err(TraceError::BadRow {
            line,
            msg: "node_id 0 is reserved (node ids start at 1)".into(),
        });
    }
    Ok(id)
}

fn number<T: std::str::FromStr>(field: &[u8], name: &str, line: u64) -> Result<T, TraceError> {
    std::str::from_utf8(field)
        .ok()
        .map(str::trim)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| TraceError::BadRow {
            line,
            msg: format!(
                "{name} {:?} is not a non-negative integer",
                String::from_utf8_lossy(field)
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Trace::read(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn parses_with_and_without_the_interval_column() {
        let t = Trace::read("node_id,recv_ns\n1,10\n2,15\n1,20\n".as_bytes()).unwrap();
        assert_eq!(t.nodes[&1].len(), 2);
        assert_eq!(t.nodes[&2][0].recv_ns, 15);
        assert_eq!((t.start_ns, t.end_ns), (10, 20));
        let t = Trace::read("node_id,recv_ns,interval_ms\n1,10,1000\n1,20,\n".as_bytes()).unwrap();
        assert_eq!(t.nodes[&1][0].interval_ms, Some(1000));
        assert_eq!(t.nodes[&1][1].interval_ms, None);
        let t = Trace::read(
            "node_id,recv_ns,interval_ms,seq\n1,10,1000,7\n1,20,,9\n1,30,5,\n".as_bytes(),
        )
        .unwrap();
        let got: Vec<_> = t.nodes[&1].iter().map(|a| (a.interval_ms, a.seq)).collect();
        assert_eq!(
            got,
            [(Some(1000), Some(7)), (None, Some(9)), (Some(5), None)]
        );
    }

    #[test]
    fn round_trips_through_write() {
        for text in [
            "node_id,recv_ns\n2,5\n1,10\n",
            "node_id,recv_ns,interval_ms\n2,5,100\n1,10,1000\n1,20,500\n",
            "node_id,recv_ns,interval_ms,seq\n2,5,100,1\n1,10,,3\n1,20,500,\n",
        ] {
            let t = Trace::read(text.as_bytes()).unwrap();
            let mut out = Vec::new();
            t.write(&mut out).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), text);
        }
        // A node's arrivals at one time keep their order (their sequence
        // numbers are replayed in it: one going back is a restart).
        let mut text = String::from("node_id,recv_ns,interval_ms,seq\n");
        for t in 0..6u64 {
            for id in 1..=2 {
                for k in (0..3).filter(|k| 3 * t + k < 17) {
                    text += &format!("{id},{t},,{}\n", 100 - 3 * t - k);
                }
            }
        }
        let t = Trace::read(text.as_bytes()).unwrap();
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(Trace::read(out.as_slice()).unwrap(), t);
    }

    #[test]
    fn errors_name_the_line() {
        // Table of (input, expected error text).
        let cases = [
            ("node,recv_ns\n1,2\n", "line 1: bad header \"node,recv_ns\""),
            ("", "line 1: bad header \"\""),
            (
                "node_id,recv_ns\n1,20\n2,10\n",
                "line 3: recv_ns 10 is earlier than 20",
            ),
            (
                "node_id,recv_ns\n1,20\n1,2x\n",
                "line 3: recv_ns \"2x\" is not a non-negative integer",
            ),
            ("node_id,recv_ns\n1,-5\n", "line 2: recv_ns \"-5\""),
            ("node_id,recv_ns\nabc,5\n", "line 2: node_id \"abc\""),
            ("node_id,recv_ns\n0,5\n", "line 2: node_id 0 is reserved"),
            (
                "node_id,recv_ns\n1,5,7\n",
                "line 2: expected 2 fields, found 3",
            ),
            (
                "node_id,recv_ns,interval_ms\n1,5,fast\n",
                "line 2: interval_ms \"fast\"",
            ),
            (
                "node_id,recv_ns,interval_ms\n1,5,4294967296\n",
                "line 2: interval_ms 4294967296 is too large",
            ),
            (
                "node_id,recv_ns,interval_ms,seq\n1,5,100,-1\n",
                "line 2: seq \"-1\"",
            ),
            (
                "node_id,recv_ns,seq\n1,5,1\n",
                "line 1: bad header \"node_id,recv_ns,seq\"",
            ),
            ("node_id,recv_ns\n", "the trace has no arrivals"),
        ];
        for (input, want) in cases {
            let got = err(input);
            assert!(
                got.starts_with(want),
                "{input:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn crash_files() {
        let c = read_crashes("node_id,crash_ns\n3,100\n1,50\n".as_bytes()).unwrap();
        assert_eq!(c.into_iter().collect::<Vec<_>>(), vec![(1, 50), (3, 100)]);
        let e = read_crashes("node_id,crash_ns\n3,100\n3,200\n".as_bytes()).unwrap_err();
        assert!(
            e.to_string().starts_with("line 3: node 3 crashes twice"),
            "{e}"
        );
        let e = read_crashes("node_id,recv_ns\n3,100\n".as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("expected \"node_id,crash_ns\""),
            "{e}"
        );
    }
}

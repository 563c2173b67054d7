//! The `hb` binary as the namespace tests and benchmarks drive it: where
//! it is, how long a run of it may take, and its HTTP API seen from inside
//! a namespace.

use std::{
    io::{Read, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::netns::NetNs;

/// The `hb` binary: `$HB_BIN`, else the one next to the running
/// executable (`target/<profile>/hb`, seen from a test binary in
/// `target/<profile>/deps/` or a bench binary in `target/<profile>/`).
///
/// Whatever is there is used, so it must be fresh: hb-tests depends on
/// hb-user's library only, and `cargo test -p hb-tests` never builds the
/// binary. `cargo xtask test` and `cargo xtask bench` build it first, with
/// the same profile; by hand, `cargo build -p hb-user --bin hb` (with
/// `--release` for a release test run) before the tests.
pub fn try_hb_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("executable without a directory")?;
    let candidates = [Some(dir), dir.parent()];
    let found = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join("hb"))
        .find(|p| p.is_file());
    ensure!(
        found.is_some(),
        "no hb binary next to {}: build it first (`cargo build -p hb-user --bin hb`, \
         `--release` for a release run; `cargo xtask test` does), or set HB_BIN",
        exe.display()
    );
    Ok(found.expect("checked"))
}

/// [`try_hb_bin`] for tests: panics with its message.
pub fn hb_bin() -> PathBuf {
    try_hb_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// How long an `hb` run that must end on its own (bad input refused, a
/// query answered, a signal obeyed) may take before the test gives up on
/// it: far longer than any of them needs, far shorter than CI's budget.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits up to `timeout` for `child` to exit. If it has not, kills it,
/// reaps it and returns `None`: the caller fails the test with what it
/// knows (a log) instead of hanging the run.
pub fn wait_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() >= deadline => break,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot wait for child {}: {e}", child.id()),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs `cmd` like [`Command::output`] (stdin empty, stdout and stderr
/// captured), but fails the test, with what it printed, if it is still
/// running after `timeout` (it is killed first): a regression that makes
/// `hb` wait forever fails instead of hanging the run.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // Drained on threads, so a chatty child never blocks on a full pipe;
    // collected with a bound, in case it left a grandchild holding one.
    fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        if let Some(mut pipe) = pipe {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
        }
        rx
    }
    let collect =
        |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let Some(status) = wait_within(&mut child, timeout) else {
        panic!(
            "{cmd:?} still running after {timeout:?}, killed; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&collect(out)),
            String::from_utf8_lossy(&collect(err))
        );
    };
    Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
    }
}

/// `GET path` from the API listening on `listen`, connecting from inside
/// `ns`: the status code (0 if unreadable) and the body.
pub fn http_get(ns: &NetNs, listen: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = ns
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .map_err(std::io::Error::other)??;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        unchunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// The body of a `Transfer-Encoding: chunked` answer (RFC 9112, 7.1): an
/// error unless it ends with the last chunk, so a listing cut short is
/// never taken for a whole one.
fn unchunk(mut rest: &str) -> std::io::Result<String> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or_else(|| bad("chunk size"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or_else(|| bad("chunk cut short"))?;
        out.push_str(chunk);
        rest = after[size..]
            .strip_prefix("\r\n")
            .ok_or_else(|| bad("chunk end"))?;
    }
}

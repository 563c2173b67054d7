//! The `hb` binary as the namespace tests and benchmarks drive it: where
//! it is, and its HTTP API seen from inside a namespace.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, ensure};

use crate::netns::NetNs;

/// The `hb` binary: `$HB_BIN`, else the one cargo built next to the
/// running executable (`target/<profile>/hb`, seen from a test binary in
/// `target/<profile>/deps/` or a bench binary in `target/<profile>/`).
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
        "no hb binary next to {}: build it first (`cargo build -p hb-user`, \
         `--release` for benchmarks; `cargo xtask test` does), or set HB_BIN",
        exe.display()
    );
    Ok(found.expect("checked"))
}

/// [`try_hb_bin`] for tests: panics with its message.
pub fn hb_bin() -> PathBuf {
    try_hb_bin().unwrap_or_else(|e| panic!("{e:#}"))
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
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

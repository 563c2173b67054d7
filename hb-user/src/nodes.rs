//! `hb nodes`: the running monitor's node table, from its HTTP API
//! (`GET /nodes`, or `GET /nodes/{id}`), as a table or as JSON.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

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
    let answer = rt.block_on(fetch_within(
        &args.monitor,
        &path,
        Duration::from_millis(args.timeout_ms),
    ));
    // A lookup still running on its thread must not hold the exit.
    rt.shutdown_background();
    let body = answer?;
    // Checked even for --json: a script must not take another service's
    // answer (or a truncated one) for the node table.
    let rows: Vec<NodeRow> = if args.node_id.is_some() {
        vec![serde_json::from_slice(&body).context("unexpected answer from the monitor")?]
    } else {
        serde_json::from_slice(&body).context("unexpected answer from the monitor")?
    };
    if args.json {
        return crate::output::stdout(&format!("{}\n", String::from_utf8_lossy(&body).trim_end()));
    }
    crate::output::stdout(&table(&rows))
}

/// `GET path` from the monitor at `monitor` (`host:port`), waiting out a
/// busy one, all within `timeout`: the name lookup too (a resolver that
/// does not answer held the command for its own timeouts, 10 s and more,
/// whatever `--timeout-ms` said).
pub async fn fetch_within(monitor: &str, path: &str, timeout: Duration) -> anyhow::Result<Bytes> {
    // What the fetch was doing when the time ran out.
    let phase = AtomicU8::new(RESOLVING);
    let ms = timeout.as_millis();
    tokio::time::timeout(timeout, async {
        let addrs = resolve(monitor).await?;
        get_patiently_any(&addrs, path, &phase).await
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
        _ => anyhow::anyhow!(
            "the monitor at {monitor} did not answer within {ms} ms (see --timeout-ms)"
        ),
    })?
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
    get_patiently_any(&[addr], path, &AtomicU8::new(ASKING)).await
}

/// What a fetch was doing ([`fetch_within`] says it at its timeout).
const RESOLVING: u8 = 0;
const ASKING: u8 = 1;
const BUSY: u8 = 2;

/// [`get_patiently`] from the first of `addrs` that takes the connection;
/// `phase` is [`BUSY`] while it waits out a busy answer, [`ASKING`] while
/// it asks (and reads the answer).
async fn get_patiently_any(
    addrs: &[SocketAddr],
    path: &str,
    phase: &AtomicU8,
) -> anyhow::Result<Bytes> {
    loop {
        phase.store(ASKING, Ordering::Relaxed);
        match get_any(addrs, path).await {
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
    get_any(&[addr], path).await
}

/// [`get`] from the first of `addrs` that takes the connection (a name
/// such as `localhost` resolves to `::1` and `127.0.0.1`, and the monitor
/// listens on one of them).
async fn get_any(addrs: &[SocketAddr], path: &str) -> anyhow::Result<Bytes> {
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
    // Seconds, bounded: a monitor cannot park its client for long.
    let retry_after = resp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.clamp(1, 10)));
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer to GET {path}"))?
        .to_bytes();
    if let (hyper::StatusCode::SERVICE_UNAVAILABLE, Some(retry_after)) = (status, retry_after) {
        return Err(Busy {
            retry_after,
            message: String::from_utf8_lossy(&body).trim().to_owned(),
        }
        .into());
    }
    if !status.is_success() {
        bail!(
            "monitor answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

/// The rows as an aligned text table.
pub fn table(rows: &[NodeRow]) -> String {
    let header = [
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
    let mut cells: Vec<[String; 13]> = Vec::with_capacity(rows.len());
    for r in rows {
        cells.push([
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
        ]);
    }
    let mut width = header.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c.iter()) {
            *w = (*w).max(s.len());
        }
    }
    let mut out = String::new();
    let mut line = |fields: &mut dyn Iterator<Item = &str>| {
        let l: Vec<String> = fields
            .zip(width.iter())
            .map(|(f, w)| format!("{f:<w$}"))
            .collect();
        out.push_str(l.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for c in &cells {
        line(&mut c.iter().map(String::as_str));
    }
    out
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

//! `hb send`: the heartbeat sender that runs on every node.
//!
//! It needs no privileges: one unconnected, non-blocking UDP socket per
//! address family sends each heartbeat to every monitor and receives their
//! ACKs. A dead or unreachable monitor never slows the others down: sends
//! use `try_send_to` and a failure is counted, not retried or waited on.
//!
//! The rules (what a heartbeat contains, which ACKs count, RTT, interval
//! adoption) live in [`sender`], without I/O; this module is the thin loop
//! around it: a timer, two sockets, and the signals that end it. On
//! SIGTERM/SIGINT the sender says goodbye with one LEAVING heartbeat to
//! every monitor, so the monitor records the node as `left`, not `dead`.

pub mod generation;
pub mod resume;
pub mod sender;

use std::{
    net::{SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use hb_common::{NodeKey, proto};
use tokio::{net::UdpSocket, signal::unix::SignalKind, time::Instant};

use crate::keys::{self, Keyring};
use sender::{Config, Sender};

/// `hb send`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("key_source").args(["key", "key_file", "keyring"])))]
pub struct Args {
    /// A monitor to send to, `ADDR:PORT` (`[v6addr]:port` for IPv6; a host
    /// name is resolved once at start). Repeat for several monitors.
    #[arg(long = "monitor", value_name = "ADDR:PORT", required = true)]
    pub monitors: Vec<String>,
    /// This node's id (1 to 4294967295), as provisioned on the monitors.
    #[arg(long, value_name = "N", value_parser = keys::parse_node_id)]
    pub node_id: u32,
    /// This node's key, 32 hex digits (`hb keys derive`). Prefer
    /// `--key-file` or the environment variable HB_NODE_KEY (used when none
    /// of --key, --key-file and --keyring is given): command lines are
    /// visible to every user of the host.
    // Not clap's `env`: clap counts an environment value as `--key` given,
    // so a stray HB_NODE_KEY (a unit's Environment=, a shell profile) made
    // `--key-file` and `--keyring` fail as conflicting with it.
    #[arg(long, value_name = "HEX")]
    pub key: Option<String>,
    /// File holding this node's key (32 hex digits).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The epoch of `--key`/`--key-file` (the `--epoch` it was derived
    /// for). Must match the monitor's keyring.
    #[arg(
        long,
        value_name = "E",
        default_value_t = 0,
        conflicts_with = "keyring"
    )]
    pub key_epoch: u8,
    /// Derive the node key from a keyring instead (test setups; in
    /// production only monitors should hold the master secret).
    #[arg(long, value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// Epoch to use from `--keyring`; default: its newest.
    #[arg(long, value_name = "E", requires = "keyring")]
    pub epoch: Option<u8>,
    /// Heartbeat interval until a monitor asks for another, ms.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub interval_ms: u32,
    /// Smallest interval a monitor may ask for, ms.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub min_interval_ms: u32,
    /// Largest interval a monitor may ask for, ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub max_interval_ms: u32,
    /// Directory that keeps the generation across restarts (created if
    /// missing), and the interval a monitor last asked for, which a
    /// restart resumes at. Without it the generation is Unix seconds: two
    /// starts within one second would collide.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// The environment variable a node key may come from instead of `--key`.
pub const KEY_ENV: &str = "HB_NODE_KEY";

/// The smallest interval accepted at all: bounds the load one sender can
/// put on a monitor even when misconfigured.
pub const FLOOR_INTERVAL_MS: u32 = 10;
/// The largest interval accepted: one hour.
pub const CEILING_INTERVAL_MS: u32 = 3_600_000;

/// Resolves `ADDR:PORT` (IPv4, `[IPv6]`, or a host name) to one address;
/// an IPv4-mapped IPv6 address is the IPv4 address it maps (so that one
/// monitor written both ways is one monitor, not two that each get every
/// heartbeat).
pub fn resolve_monitor(s: &str) -> anyhow::Result<SocketAddr> {
    resolve(s).map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
}

fn resolve(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let has_port = match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if !has_port {
        bail!(
            "monitor `{s}` needs a port: ADDR:PORT, e.g. 198.51.100.7:{} or [2001:db8::7]:{}",
            proto::DEFAULT_PORT,
            proto::DEFAULT_PORT
        );
    }
    let mut addrs = s
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve monitor address `{s}`"))?;
    addrs
        .next()
        .with_context(|| format!("monitor address `{s}` resolves to nothing"))
}

impl Args {
    /// Checks the options and turns them into the sender's configuration
    /// (everything but the generation, which needs the state directory).
    fn config(&self) -> anyhow::Result<(Config, Option<u8>)> {
        // The environment only when no option names a key.
        let env = match (&self.key, &self.key_file, &self.keyring) {
            (None, None, None) => std::env::var(KEY_ENV).ok(),
            _ => None,
        };
        let (key, key_epoch, newest) = match (&self.key, &self.key_file, &self.keyring) {
            (Some(hex), _, _) => (
                parse_key(hex.trim()).context("bad --key")?,
                self.key_epoch,
                None,
            ),
            (None, None, None) if let Some(hex) = &env => (
                parse_key(hex.trim()).with_context(|| format!("bad {KEY_ENV}"))?,
                self.key_epoch,
                None,
            ),
            (_, Some(file), _) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read key file {}", file.display()))?;
                let k = parse_key(text.trim())
                    .with_context(|| format!("bad key in {}", file.display()))?;
                (k, self.key_epoch, None)
            }
            (_, _, Some(path)) => {
                let ring = Keyring::load(path)?;
                let epoch = self.epoch.unwrap_or_else(|| ring.newest());
                (ring.node_key(self.node_id, epoch)?, epoch, Some(epoch))
            }
            (None, None, None) => {
                bail!("one of --key, --key-file or --keyring (or {KEY_ENV}) is required")
            }
        };
        let (min, iv, max) = (self.min_interval_ms, self.interval_ms, self.max_interval_ms);
        if min < FLOOR_INTERVAL_MS || max > CEILING_INTERVAL_MS {
            bail!(
                "intervals must lie within {FLOOR_INTERVAL_MS} to {CEILING_INTERVAL_MS} ms (got --min-interval-ms {min}, --max-interval-ms {max})"
            );
        }
        if !(min <= iv && iv <= max) {
            bail!(
                "--interval-ms {iv} must lie within --min-interval-ms {min} and --max-interval-ms {max}"
            );
        }
        if self.monitors.len() > sender::MAX_MONITORS {
            bail!(
                "at most {} monitors (got {})",
                sender::MAX_MONITORS,
                self.monitors.len()
            );
        }
        let mut monitors = Vec::with_capacity(self.monitors.len());
        for m in &self.monitors {
            let a = resolve_monitor(m)?;
            if !monitors.contains(&a) {
                monitors.push(a);
            }
        }
        Ok((
            Config {
                node_id: self.node_id,
                key,
                key_epoch,
                generation: 0,
                interval_ms: iv,
                min_interval_ms: min,
                max_interval_ms: max,
                monitors,
            },
            newest,
        ))
    }
}

fn parse_key(hex: &str) -> anyhow::Result<NodeKey> {
    let b = keys::parse_hex::<{ keys::NODE_KEY_LEN }>(hex).context("a node key")?;
    Ok(NodeKey::from_bytes(&b))
}

/// CLOCK_MONOTONIC in ns: the clock of `sent_ns` and of the kernel's
/// arrival times.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The 1-minute load average per CPU in permille, capped at 1000, from
/// `/proc/loadavg`; 0 if unreadable (the field is advisory).
pub fn load_permille() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| load_from(&s, cpus))
        .unwrap_or(0)
}

fn load_from(loadavg: &str, cpus: usize) -> Option<u16> {
    let one: f64 = loadavg.split_whitespace().next()?.parse().ok()?;
    if !one.is_finite() || one < 0.0 {
        return None;
    }
    Some(
        (one / cpus.max(1) as f64 * 1000.0)
            .round()
            .min(proto::LOAD_MAX as f64) as u16,
    )
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (mut cfg, _) = args.config()?;
    cfg.generation = match &args.state_dir {
        Some(dir) => {
            let n = generation::next(dir, generation::unix_seconds()?)?;
            if let Some(why) = &n.corrupt {
                tracing::warn!(problem = %why, generation = n.generation, "ignoring corrupt state, using Unix seconds");
            }
            n.generation
        }
        None => generation::ephemeral()?,
    };
    if let Some(dir) = &args.state_dir {
        let stored = resume::load(dir).unwrap_or_else(|why| {
            tracing::warn!(problem = %why, "ignoring the stored interval");
            None
        });
        let iv = resume::start_interval(
            cfg.interval_ms,
            stored,
            cfg.min_interval_ms,
            cfg.max_interval_ms,
        );
        if iv != cfg.interval_ms {
            tracing::info!(
                interval_ms = iv,
                configured_ms = cfg.interval_ms,
                "resuming at the interval a monitor last asked for"
            );
            cfg.interval_ms = iv;
        }
    }
    let saver = args
        .state_dir
        .clone()
        .map(resume::Saver::start)
        .transpose()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(send_loop(Sender::new(cfg), saver.as_ref()))
}

/// The sockets: one per address family in use.
struct Sockets {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
}

impl Sockets {
    async fn bind(monitors: &[SocketAddr]) -> anyhow::Result<Sockets> {
        let v4 = if monitors.iter().any(SocketAddr::is_ipv4) {
            Some(
                UdpSocket::bind("0.0.0.0:0")
                    .await
                    .context("cannot open an IPv4 UDP socket")?,
            )
        } else {
            None
        };
        let v6 = if monitors.iter().any(SocketAddr::is_ipv6) {
            Some(
                UdpSocket::bind("[::]:0")
                    .await
                    .context("cannot open an IPv6 UDP socket")?,
            )
        } else {
            None
        };
        Ok(Sockets { v4, v6 })
    }

    /// Sends without waiting; `false` if the datagram did not leave.
    fn try_send(&self, to: SocketAddr, b: &[u8]) -> Result<(), std::io::Error> {
        let s = if to.is_ipv4() { &self.v4 } else { &self.v6 };
        let s = s
            .as_ref()
            .expect("a socket exists for every monitor's family");
        s.try_send_to(b, to).map(drop)
    }
}

/// Receives one datagram from `s`, or never if there is no such socket.
async fn recv(s: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

fn send_all(sender: &mut Sender, sockets: &Sockets, leaving: bool) {
    let out = sender.heartbeat(monotonic_ns(), load_permille(), leaving);
    for (i, (to, b)) in out.iter().enumerate() {
        if let Err(e) = sockets.try_send(*to, b) {
            sender.send_failed(i);
            let errors = sender.monitors()[i].send_errors;
            // The first failure and then every 100th: a dead monitor must
            // not flood the log either.
            if errors == 1 || errors.is_multiple_of(100) {
                tracing::warn!(monitor = %to, error = %e, errors, "cannot send heartbeat");
            }
        }
    }
}

async fn send_loop(mut sender: Sender, saver: Option<&resume::Saver>) -> anyhow::Result<()> {
    let cfg = sender.config().clone();
    let sockets = Sockets::bind(&cfg.monitors).await?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;
    tracing::info!(
        node_id = cfg.node_id,
        generation = cfg.generation,
        key_epoch = cfg.key_epoch,
        interval_ms = sender.interval_ms(),
        monitors = ?cfg.monitors,
        "sending heartbeats"
    );
    let (mut buf4, mut buf6) = ([0u8; 64], [0u8; 64]);
    let mut next = Instant::now();
    let mut recv_errors = 0u64;
    let signal = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                send_all(&mut sender, &sockets, false);
                let iv = Duration::from_millis(sender.interval_ms() as u64);
                next = next_due(next, iv, Instant::now());
            }
            r = recv(&sockets.v4, &mut buf4) => on_datagram(&mut sender, r, &buf4, &mut recv_errors, &mut next, saver),
            r = recv(&sockets.v6, &mut buf6) => on_datagram(&mut sender, r, &buf6, &mut recv_errors, &mut next, saver),
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };
    send_all(&mut sender, &sockets, true);
    let rejected: Vec<String> = sender
        .rejected()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect();
    tracing::info!(
        signal,
        sent = sender.sent,
        last_seq = sender.seq(),
        acks = sender.monitors().iter().map(|m| m.acks).sum::<u64>(),
        send_errors = sender.monitors().iter().map(|m| m.send_errors).sum::<u64>(),
        recv_errors,
        acks_rejected = %rejected.join(","),
        "sent LEAVING heartbeat, exiting"
    );
    Ok(())
}

fn on_datagram(
    sender: &mut Sender,
    r: std::io::Result<(usize, SocketAddr)>,
    buf: &[u8],
    recv_errors: &mut u64,
    next: &mut Instant,
    saver: Option<&resume::Saver>,
) {
    let (n, from) = match r {
        Ok(x) => x,
        Err(e) => {
            // ICMP errors and the like: counted, never fatal.
            *recv_errors += 1;
            tracing::debug!(error = %e, "receive error");
            return;
        }
    };
    match sender.on_ack(&buf[..n], from, monotonic_ns()) {
        Ok(a) => {
            if let Some((old, new)) = a.interval_change {
                tracing::info!(monitor = %from, old_ms = old, new_ms = new, "monitor asked for a new heartbeat interval");
                // Apply it from now, not after the old (maybe 10 s) wait.
                let now = Instant::now();
                *next = (*next).min(now + Duration::from_millis(new as u64));
                // A restart resumes at it (see `resume`).
                if let Some(s) = saver {
                    s.save(new);
                }
            }
        }
        Err(reason) => {
            tracing::debug!(from = %from, reason = %reason, "ignored datagram");
        }
    }
}

/// When the heartbeat after one due at `due` (and sent at `now`) is due:
/// one interval later, keeping the rhythm; after a stall of the sender
/// (a suspended VM, an overloaded host) past that, one interval after
/// `now`, a fresh rhythm. Never sooner: a heartbeat right after the late
/// one (as `max(due + iv, now)` sent) tells the monitor nothing and
/// enters its statistics as a near-zero inter-arrival time.
fn next_due(due: Instant, iv: Duration, now: Instant) -> Instant {
    let next = due + iv;
    if next > now { next } else { now + iv }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rhythm_survives_a_late_wakeup_and_restarts_after_a_stall() {
        let t = Instant::now();
        let iv = Duration::from_millis(300);
        let ms = Duration::from_millis;
        // On time, or woken a little late: the rhythm holds.
        assert_eq!(next_due(t, iv, t), t + iv);
        assert_eq!(next_due(t, iv, t + ms(2)), t + iv);
        // Stalled past the next heartbeat (1.5 s): the late heartbeat
        // just went out, the next follows a whole interval later.
        assert_eq!(next_due(t, iv, t + ms(1500)), t + ms(1800));
        assert_eq!(next_due(t, iv, t + iv), t + ms(600));
    }

    #[test]
    fn monitor_addresses() {
        assert_eq!(
            resolve_monitor("198.18.0.1:7420").unwrap(),
            "198.18.0.1:7420".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            resolve_monitor("[fd00::1]:9").unwrap(),
            "[fd00::1]:9".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            resolve_monitor("[::ffff:198.18.0.1]:7420").unwrap(),
            "198.18.0.1:7420".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(resolve_monitor("localhost:7420").unwrap().port(), 7420);
        for bad in [
            "198.18.0.1",
            "fd00::1",
            "[fd00::1]",
            "host:",
            ":7420",
            "198.18.0.1:99999",
        ] {
            let e = format!("{:#}", resolve_monitor(bad).unwrap_err());
            assert!(e.contains("needs a port"), "{bad}: {e}");
        }
        // A name the resolver refuses before any lookup (a NUL byte cannot
        // go to getaddrinfo): the error path without asking the host's DNS
        // (tests/cli.rs resolves a real name, in an empty namespace).
        let e = format!("{:#}", resolve_monitor("no-such\0host:7420").unwrap_err());
        assert!(
            e.contains("cannot resolve monitor address `no-such\0host:7420`"),
            "{e}"
        );
    }

    #[test]
    fn load_is_per_cpu_permille_and_capped() {
        assert_eq!(load_from("0.50 0.40 0.30 1/100 42\n", 2), Some(250));
        assert_eq!(load_from("7.00 0 0 1/1 1", 2), Some(1000));
        assert_eq!(load_from("0.00 0 0 1/1 1", 4), Some(0));
        assert_eq!(load_from("garbage", 1), None);
        assert_eq!(load_from("", 1), None);
        assert!(load_permille() <= 1000);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}

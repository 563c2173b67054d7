//! `hb send`: the heartbeat sender that runs on every node.
//!
//! It needs no privileges: one unconnected, non-blocking UDP socket per
//! address family sends each heartbeat to every monitor and receives their
//! ACKs. A dead or unreachable monitor never slows the others down: sends
//! use `try_send_to` and a failure is counted, not retried or waited on.
//! Nor does a monitor whose name does not resolve (DNS down at boot, a
//! record removed): it is warned about and resolved again in the
//! background, 1 s after the failure and then at doubling delays up to a
//! minute, while the others get their heartbeats; with none resolved the
//! sender waits for one rather than exiting, which would make the node
//! look dead to every monitor. An address that cannot be one (no port,
//! port 0, unspecified, multicast or broadcast, link-local without its
//! interface, a malformed name) is an error at start: waiting would not
//! fix it.
//!
//! A name that resolved is resolved again every [`RESOLVE_PERIOD`], so a
//! monitor that moves (a failover to another host, a rebuild with a new
//! address, a DNS-based virtual address) gets the heartbeats of every node
//! within a minute, without restarting any of them. A changed address
//! replaces the old one, which is forgotten with its RTT and its interval
//! request (see [`sender`]); a failed lookup keeps the last address (DNS
//! being down says nothing about the monitor), warned about once, not at
//! every attempt. Of several addresses the first the resolver gives is
//! taken (glibc sorts them by RFC 6724), and kept while it is among the
//! answers, so a round-robin record's rotation moves no heartbeat; but
//! not while its sends fail: after [`EARLY_RESOLVE`] of failed sends the
//! name is resolved again at once (then at doubling delays up to a
//! minute, while they still fail), and its first other answer takes over
//! (a name with an IPv4 and an IPv6 address whose IPv4 route went away
//! kept the IPv4 one, every send failing, for good).
//! Each distinct address gets one heartbeat, however many `--monitor`s
//! lead to it. Two addresses of one monitor (its IPv4 and its IPv6 one,
//! as two `--monitor`s) are two monitors here: nothing in an ACK names
//! the monitor that sent it, and each monitor ACKs only the copy it
//! takes, so no ACK pattern tells one monitor at two addresses from two
//! monitors ACKing every Nth heartbeat out of phase. That monitor gets
//! every heartbeat twice and counts the second copy as `replay`; the
//! README says so where `--monitor` and the `replay` count are described.
//!
//! The rules (what a heartbeat contains, which ACKs count, RTT, interval
//! adoption) live in [`sender`], without I/O; this module is the thin loop
//! around it: a timer, two sockets, the names being resolved, and
//! the signals that end it. On SIGTERM/SIGINT the sender says goodbye with
//! one LEAVING heartbeat to every monitor, so the monitor records the node
//! as `left`, not `dead`; a monitor it could not be sent to is named in
//! the log, as it will find the node dead. (Once, not twice for safety: a
//! second LEAVING right after the first is taken as an inter-arrival time
//! of a few ms, which the monitor's statistics keep across the restart
//! that usually follows.)

mod beat;
pub mod generation;
pub mod resume;
pub mod sender;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use hb_common::{NodeKey, proto};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::SignalKind,
    sync::mpsc,
    time::Instant,
};

use crate::keys::{self, Keyring, PrivateFileError};
use sender::{Config, Sender};

/// `hb send`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("key_source").args(["key", "key_file", "keyring"])))]
pub struct Args {
    /// A monitor to send to, `ADDR:PORT` (`[v6addr]:port` for IPv6,
    /// `[fe80::..%IFNAME]:port` for a link-local one; a host
    /// name is resolved at start and again every minute, so a monitor that
    /// moves is followed; one that does not resolve is retried in the
    /// background while the others get their heartbeats). Repeat for
    /// several monitors.
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
    /// File holding this node's key (32 hex digits), private to its owner
    /// (mode 0600 or 0400).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// The epoch of `--key`/`--key-file`/HB_NODE_KEY (the `--epoch` it was
    /// derived for; `hb keys derive` logs it), required with them: a wrong
    /// one has every heartbeat refused as `bad_epoch`. Must be one of the
    /// two newest epochs of the monitor's keyring.
    #[arg(long, value_name = "E", conflicts_with = "keyring")]
    pub key_epoch: Option<u8>,
    /// Derive the node key from a keyring instead (test setups; in
    /// production only monitors should hold the master secret).
    #[arg(long, value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// Epoch to use from `--keyring`; default: its newest. (With
    /// `--key`/`--key-file`, say the key's epoch with `--key-epoch`.)
    #[arg(long, value_name = "E")]
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
    /// missing; one sender at a time), and the interval a monitor last
    /// asked for, which a restart resumes at. Without it the generation is
    /// Unix seconds: two starts within one second would collide, and a
    /// clock stepped back between two starts gives a smaller one, which
    /// the monitors drop as stale.
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

/// The most a `--key-file` may hold: a node key is 32 hex digits (and a
/// newline). Reading stops here, so `--key-file /dev/zero` is an error,
/// not a process that eats the host's memory.
pub const KEY_FILE_MAX: u64 = 4096;

/// How long the start waits for the monitors' names to resolve before the
/// first heartbeat: a name server slower than this (or unreachable) holds
/// up no heartbeat to the monitors already known; its names join when
/// they resolve.
pub const RESOLVE_WAIT: Duration = Duration::from_secs(1);

/// How often a name that resolved is resolved again, to follow a monitor
/// that moves. Fixed: glibc's `getaddrinfo` gives no TTL. A minute bounds
/// how long a moved monitor goes without this node's heartbeats, at one
/// lookup a minute per name (which the local cache, if any, answers).
pub const RESOLVE_PERIOD: Duration = Duration::from_secs(60);

/// A `--monitor` as given: an address, or a name to resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// `host:port`, as given.
    Name(String),
}

/// Checks a `--monitor`: `ADDR:PORT` (IPv4, `[IPv6]`) is taken as it is,
/// `host:port` with a well-formed host name is to be resolved. An
/// IPv4-mapped IPv6 address is the IPv4 address it maps (so that one
/// monitor written both ways is one monitor, not two that each get every
/// heartbeat).
pub fn parse_monitor(s: &str) -> anyhow::Result<Target> {
    if let Some(a) = scoped_by_name(s)? {
        let a = canonical(a);
        return match unusable(a) {
            None => Ok(Target::Addr(a)),
            Some(why) => bail!("monitor `{s}`: {why}"),
        };
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        let a = canonical(a);
        return match unusable(a) {
            None => Ok(Target::Addr(a)),
            Some(why) => bail!("monitor `{s}`: {why}"),
        };
    }
    let Some((host, port)) = s.rsplit_once(':').filter(|(host, port)| {
        !host.is_empty()
            && (!host.contains(':') || host.ends_with(']'))
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
    }) else {
        bail!(
            "monitor `{s}` needs a port: ADDR:PORT, e.g. 198.51.100.7:{} or [2001:db8::7]:{}",
            proto::DEFAULT_PORT,
            proto::DEFAULT_PORT
        );
    };
    let Ok(port) = port.parse::<u16>() else {
        bail!("monitor `{s}`: port {port} is past 65535");
    };
    if port == 0 {
        bail!("monitor `{s}`: {PORT_0}");
    }
    if host.starts_with('[') {
        bail!("monitor `{s}`: `{host}` is not an IPv6 address (`[v6addr]`, `[v6addr%IFNAME]`)");
    }
    if !is_host_name(host) {
        bail!("monitor `{s}`: `{host}` is neither an IP address nor a host name");
    }
    Ok(Target::Name(s.to_owned()))
}

const PORT_0: &str = "port 0 is no monitor's port";

/// The IPv4 address an IPv4-mapped IPv6 one maps; any other as it is,
/// less its flow label, and less its scope unless it is link-local (the
/// interface a link-local monitor is on). ACKs are matched to monitors by
/// address, and the kernel gives a received datagram a scope only where
/// one is needed: `[2001:db8::7%eth0]`, kept so, rejected every ACK.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => {
                let scope = if v6.ip().is_unicast_link_local() {
                    v6.scope_id()
                } else {
                    0
                };
                SocketAddr::V6(std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, scope))
            }
        },
        SocketAddr::V4(_) => a,
    }
}

/// `[v6addr%IFNAME]:PORT`, a link-local monitor's address with its
/// interface named (as `ping` and `ip` take it), as the address with that
/// interface's index for its scope. `None` if `s` has no such name (a
/// numeric scope, `%2`, is the standard form `SocketAddr` parses).
fn scoped_by_name(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    let Some((addr, port)) = s.strip_prefix('[').and_then(|r| r.split_once("]:")) else {
        return Ok(None);
    };
    let Some((ip, zone)) = addr.split_once('%') else {
        return Ok(None);
    };
    if zone.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let ip: std::net::Ipv6Addr = ip
        .parse()
        .map_err(|_| anyhow!("monitor `{s}`: `{ip}` is not an IPv6 address"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("monitor `{s}`: `{port}` is not a port (1 to 65535)"))?;
    let index = nix::net::if_::if_nametoindex(zone)
        .map_err(|e| anyhow!("monitor `{s}`: no interface `{zone}` on this host ({e})"))?;
    Ok(Some(SocketAddr::V6(std::net::SocketAddrV6::new(
        ip, port, 0, index,
    ))))
}

/// Why `a` cannot be a monitor's address, if it cannot: every heartbeat to
/// it would fail, or go to this host, or to a whole group of hosts, or
/// none of its ACKs would count: a link-local IPv6 address without its
/// interface (scope 0) is sent to by whichever interface the first
/// `fe80::/64` route names, but its ACKs come with that interface's scope,
/// from an address that is no monitor's (no RTT, no interval request).
fn unusable(a: SocketAddr) -> Option<String> {
    let ip = a.ip();
    if a.port() == 0 {
        Some(PORT_0.to_owned())
    } else if let SocketAddr::V6(v6) = a
        && v6.ip().is_unicast_link_local()
        && v6.scope_id() == 0
    {
        let (ip, port) = (v6.ip(), v6.port());
        Some(format!(
            "{ip} is a link-local address, which needs the interface it is on: \
             `[{ip}%IFNAME]:{port}`, as `[{ip}%eth0]:{port}` (without it, no ACK of the \
             monitor's would count)"
        ))
    } else if ip.is_unspecified() {
        Some(format!(
            "{ip} is the unspecified address: it names no host (the kernel would send to this one)"
        ))
    } else if ip.is_multicast() {
        Some(format!(
            "{ip} is a multicast address: a monitor is one host"
        ))
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some(format!(
            "{ip} is the broadcast address: a monitor is one host"
        ))
    } else {
        None
    }
}

/// Whether `host` is a well-formed DNS name (RFC 1123 labels; `_` allowed,
/// as resolvers do; a trailing dot for a fully qualified name), and not
/// dotted numbers: that is a malformed IPv4 address (`256.1.1.1`), or one
/// in a form the C resolver reads as another (`inet_aton`: `1.2.3` as
/// 1.2.0.3, `0x7f.1` as 127.0.0.1, `017700000001` in octal).
fn is_host_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    name.len() <= 253 && name.split('.').all(label_ok) && !name.split('.').all(is_c_number)
}

/// Whether `label` is a number as `inet_aton` reads a part of an IPv4
/// address: decimal or octal digits, or hex digits after `0x`/`0X`.
fn is_c_number(label: &str) -> bool {
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(hex) => !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// Resolves a monitor's `host:port` (from [`parse_monitor`]) to the first
/// address that can be a monitor's (see [`resolve_all`]).
pub fn resolve_name(s: &str) -> anyhow::Result<SocketAddr> {
    Ok(resolve_all(s)?[0])
}

/// Resolves a monitor's `host:port` (from [`parse_monitor`]) to the
/// addresses that can be a monitor's, in the resolver's order and without
/// repeats; never none.
pub fn resolve_all(s: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let addrs = s
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve monitor address `{s}`"))?;
    usable(s, addrs)
}

/// Of the addresses `s` resolved to, those that can be a monitor's (see
/// [`unusable`]), in order and without repeats; an error naming why the
/// first cannot be when none can.
fn usable(s: &str, addrs: impl IntoIterator<Item = SocketAddr>) -> anyhow::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addrs.into_iter().map(canonical).collect();
    let mut usable = Vec::new();
    for &a in &addrs {
        if unusable(a).is_none() && !usable.contains(&a) {
            usable.push(a);
        }
    }
    if !usable.is_empty() {
        return Ok(usable);
    }
    match addrs.first() {
        None => bail!("monitor address `{s}` resolves to nothing"),
        Some(a) => bail!(
            "monitor address `{s}` resolves to no address a monitor can have: {}",
            unusable(*a).unwrap_or_default()
        ),
    }
}

/// [`parse_monitor`], and a name resolved at once ([`resolve_name`]).
pub fn resolve_monitor(s: &str) -> anyhow::Result<SocketAddr> {
    match parse_monitor(s)? {
        Target::Addr(a) => Ok(a),
        Target::Name(n) => resolve_name(&n),
    }
}

/// The delay before the next attempt to resolve a monitor's name after
/// `attempt` failed ones (0 after the first): 1 s, doubling up to a
/// minute. Bounded both ways: a name that comes back (DNS up after boot)
/// is found within a minute, and one that never does costs one lookup
/// and one warning a minute.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64.checked_shl(attempt).unwrap_or(u64::MAX).min(60))
}

/// How long sends to a name's address must have failed before the name
/// is resolved again, early, and the address given up for another of its
/// answers (see [`Names::watch_sends`]); then again at doubling delays
/// up to [`RESOLVE_PERIOD`] while they keep failing. Long enough that a
/// send lost to a full buffer moves nothing, short against the minute a
/// monitor would otherwise go without this node's heartbeats.
pub const EARLY_RESOLVE: Duration = Duration::from_secs(3);

/// The delay before the next early lookup of a name whose address's
/// sends still fail, after `lookups` early ones in this outage:
/// [`EARLY_RESOLVE`] doubling, up to [`RESOLVE_PERIOD`]. A total outage
/// costs lookups 3, 9, 21, 45 and 93 s into it, then one more a minute
/// (besides the lookups every period).
fn early_delay(lookups: u32) -> Duration {
    EARLY_RESOLVE
        .checked_mul(1u32.checked_shl(lookups).unwrap_or(u32::MAX))
        .unwrap_or(RESOLVE_PERIOD)
        .min(RESOLVE_PERIOD)
}

/// Which address of `answers` (a name's, in the resolver's order) gets
/// the heartbeats, `current` getting them now: the first, as at the start,
/// unless `current` is still among them (a round-robin record rotates its
/// answers; the monitor did not move); but not a `failing` `current` (its
/// sends have failed for [`EARLY_RESOLVE`] and still do: a name with an
/// IPv4 and an IPv6 address whose IPv4 route went away): the first other
/// answer, if there is one.
fn pick(current: Option<SocketAddr>, failing: bool, answers: &[SocketAddr]) -> Option<SocketAddr> {
    match current {
        Some(c) if failing => answers.iter().copied().find(|&a| a != c),
        Some(c) if answers.contains(&c) => Some(c),
        _ => None,
    }
    .or_else(|| answers.first().copied())
}

/// What a resolver thread reports after each attempt.
#[derive(Debug)]
struct Report {
    /// Which name (its index in the `names` given to [`spawn_resolvers`]).
    index: usize,
    /// The addresses it resolved to ([`resolve_all`]), or why none.
    answer: anyhow::Result<Vec<SocketAddr>>,
    /// When the thread tries again.
    retry_in: Duration,
}

/// The resolver threads. Dropping this ends them: at once while they
/// wait, after the lookup under way otherwise (`getaddrinfo` cannot be
/// interrupted, and is not waited for).
struct Resolvers {
    /// One per thread: a message makes it look up its name now, and
    /// dropped, it ends the thread.
    wake: Vec<std::sync::mpsc::Sender<()>>,
    #[cfg_attr(not(test), allow(dead_code))]
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Resolves each of `names` on a thread of its own (the resolver blocks,
/// and one slow name must not hold up another), reporting every attempt
/// to `report`: after a failure again `retry(failures before)` later,
/// after a success again `period` later, or when asked
/// ([`Resolvers::resolve_now`]), for as long as the sender runs. A
/// `false` from `report` (nobody listens any more) ends the thread too.
fn spawn_resolvers<R, F>(
    names: &[String],
    resolve: R,
    retry: fn(u32) -> Duration,
    period: Duration,
    report: F,
) -> anyhow::Result<Resolvers>
where
    R: Fn(&str) -> anyhow::Result<Vec<SocketAddr>> + Send + Clone + 'static,
    F: Fn(Report) -> bool + Send + Clone + 'static,
{
    let mut resolvers = Resolvers {
        wake: Vec::new(),
        threads: Vec::new(),
    };
    for (index, name) in names.iter().enumerate() {
        let (name, resolve, report) = (name.clone(), resolve.clone(), report.clone());
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hb-resolve".into())
            .spawn(move || {
                let mut failures = 0u32;
                loop {
                    let answer = resolve(&name);
                    let retry_in = if answer.is_ok() {
                        failures = 0;
                        period
                    } else {
                        failures = failures.saturating_add(1);
                        retry(failures - 1)
                    };
                    if !report(Report {
                        index,
                        answer,
                        retry_in,
                    }) {
                        return;
                    }
                    match woken.recv_timeout(retry_in) {
                        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    // Asked more than once meanwhile: one lookup answers all.
                    while woken.try_recv().is_ok() {}
                }
            })
            // On an error the threads started so far end with `resolvers`.
            .context("cannot start a thread that resolves monitor names")?;
        resolvers.wake.push(wake);
        resolvers.threads.push(thread);
    }
    Ok(resolvers)
}

impl Resolvers {
    /// Makes the thread of name `index` look it up now, not at its next
    /// period (sends to its address keep failing).
    fn resolve_now(&self, index: usize) {
        if let Some(w) = self.wake.get(index) {
            // The thread ended only if the sender is ending.
            let _ = w.send(());
        }
    }
}

/// Reads a `--key-file`: private to its owner and small, as the monitor
/// asks of its keyring (`keys::read_private`).
fn read_key_file(path: &Path) -> anyhow::Result<NodeKey> {
    let shown = path.display();
    let bytes = keys::read_private(path, KEY_FILE_MAX).map_err(|e| match e {
        PrivateFileError::Io(io) => anyhow!("cannot read key file {shown}: {io}"),
        PrivateFileError::NotPrivate { mode } => anyhow!(
            "key file {shown} has mode {mode:04o}: users other than its owner may get at the node key; run `chmod 600 {shown}` (and, if the sender runs as another user, `chown` it to that user)"
        ),
        PrivateFileError::TooLarge { max } => anyhow!(
            "key file {shown} holds more than {max} bytes: it is not a node key (32 hex digits)"
        ),
    })?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow!("bad key in {shown}: not text"))?;
    parse_key(text.trim()).with_context(|| format!("bad key in {shown}"))
}

impl Args {
    /// Checks the options and turns them into the sender's configuration
    /// (everything but the generation, which needs the state directory),
    /// with the monitors given as addresses; those given by name are
    /// returned to be resolved.
    fn config(&self) -> anyhow::Result<(Config, Vec<String>)> {
        // The environment only when no option names a key.
        let env = match (&self.key, &self.key_file, &self.keyring) {
            (None, None, None) => std::env::var(KEY_ENV).ok(),
            _ => None,
        };
        // Checked here, not by clap: its `requires` gave way to the key
        // source group, and `--epoch 1` with a key file ran at epoch 0,
        // every heartbeat refused as `bad_epoch`.
        if let (Some(e), None) = (self.epoch, &self.keyring) {
            bail!(
                "--epoch picks an epoch of --keyring; the epoch of a --key, --key-file or \
                 {KEY_ENV} key is --key-epoch {e}"
            );
        }
        // A key alone does not say its epoch, and no default can be right:
        // the README's keyrings start at 1, and one rotation on the
        // epochs move. A wrong epoch has every heartbeat refused as
        // `bad_epoch`, and the node is dead with no word at either end.
        let epoch_of = |what: &str| {
            self.key_epoch.ok_or_else(|| {
                anyhow::anyhow!(
                    "{what} needs --key-epoch E, the epoch the key was derived for (`hb keys \
                     derive` logs it): a wrong one has every heartbeat refused as bad_epoch"
                )
            })
        };
        let (key, key_epoch) = match (&self.key, &self.key_file, &self.keyring) {
            (Some(hex), _, _) => (
                parse_key(hex.trim()).context("bad --key")?,
                epoch_of("--key")?,
            ),
            (None, None, None) if let Some(hex) = &env => (
                parse_key(hex.trim()).with_context(|| format!("bad {KEY_ENV}"))?,
                epoch_of(KEY_ENV)?,
            ),
            (_, Some(file), _) => (read_key_file(file)?, epoch_of("--key-file")?),
            (_, _, Some(path)) => {
                let ring = Keyring::load(path)?;
                let epoch = self.epoch.unwrap_or_else(|| ring.newest());
                (ring.node_key(self.node_id, epoch)?, epoch)
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
        if min > max {
            bail!("--min-interval-ms {min} exceeds --max-interval-ms {max}");
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
        let (mut monitors, mut names) = (Vec::new(), Vec::new());
        for m in &self.monitors {
            match parse_monitor(m)? {
                Target::Addr(a) if !monitors.contains(&a) => monitors.push(a),
                Target::Name(n) if !names.contains(&n) => names.push(n),
                _ => {}
            }
        }
        Ok((
            Config {
                node_id: self.node_id,
                key,
                key_epoch,
                generation: 0,
                interval_ms: iv,
                resumed_ms: None,
                resumed_by: None,
                min_interval_ms: min,
                max_interval_ms: max,
                monitors,
            },
            names,
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

/// The CPUs online: what the host-wide load average is spread over. Not
/// `available_parallelism`, which is this process's share (its CPU
/// affinity, its cgroup's quota): a container limited to one CPU of 32
/// reported 1000 permille for good. Read once, at the start (std warns
/// against calling that one from hot code, too).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// The 1-minute load average per CPU (of `cpus`, [`online_cpus`]) in
/// permille, capped at 1000; 0 if unknown (the field is advisory). One
/// `sysinfo(2)` at every heartbeat: reading `/proc/loadavg` took five
/// system calls (open, stat, two reads, close). The value is the one that
/// file gives, to its two decimals ([`load_from_fixed`]).
pub fn load_permille(cpus: usize) -> u16 {
    // SAFETY: a plain C struct, which sysinfo fills in.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to one.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return 0;
    }
    load_from_fixed(info.loads[0] as u64, cpus)
}

/// [`load_permille`] of `sysinfo(2)`'s 1-minute load (fixed point with
/// `SI_LOAD_SHIFT`, 16, bits of fraction), first rounded to hundredths as
/// the kernel prints it in `/proc/loadavg` (`fs/proc/loadavg.c`: its own
/// 11-bit fixed point plus 1/200, `%lu.%02lu`), so that a sender sends
/// what one reading that file sent, to the permille.
fn load_from_fixed(si_load: u64, cpus: usize) -> u16 {
    /// The kernel's `FSHIFT`: bits of fraction of its load averages.
    const FSHIFT: u32 = 11;
    const SI_LOAD_SHIFT: u32 = 16;
    let avenrun = si_load >> (SI_LOAD_SHIFT - FSHIFT);
    let x = avenrun.saturating_add((1 << FSHIFT) / 200);
    let hundredths = (x >> FSHIFT) * 100 + (((x & ((1 << FSHIFT) - 1)) * 100) >> FSHIFT);
    per_cpu_permille(hundredths as f64 / 100.0, cpus)
}

/// The load average in `/proc/loadavg`'s text, as [`load_permille`]: what
/// a sender sent before it took `sysinfo(2)`, the reference its value is
/// tested against.
#[cfg(test)]
fn load_from(loadavg: &str, cpus: usize) -> Option<u16> {
    let one: f64 = loadavg.split_whitespace().next()?.parse().ok()?;
    if !one.is_finite() || one < 0.0 {
        return None;
    }
    Some(per_cpu_permille(one, cpus))
}

fn per_cpu_permille(load: f64, cpus: usize) -> u16 {
    (load / cpus.max(1) as f64 * 1000.0)
        .round()
        .min(proto::LOAD_MAX as f64) as u16
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (mut cfg, names) = args.config()?;
    // One sender per state directory, for as long as this one runs.
    let _lock = args
        .state_dir
        .as_deref()
        .map(generation::lock)
        .transpose()?;
    cfg.generation = match &args.state_dir {
        Some(dir) => {
            let n = generation::next(dir, generation::unix_seconds()?)?;
            if let Some(why) = &n.ignored {
                tracing::warn!(problem = %why, generation = n.generation, "ignoring the stored generation, using Unix seconds + 1");
            }
            if let Some(why) = &n.unsaved {
                tracing::warn!(problem = %why, generation = n.generation, "cannot store the generation: a later start may take it again (one within this second; every one, while the stored generation is ahead of the clock), and monitors then take its heartbeats for replays until its seq passes this run's: make the state directory writable");
            }
            n.generation
        }
        None => generation::ephemeral()?,
    };
    // What an interval stored from here on is asked for under.
    let under = resume::Under::new(&args.monitors, cfg.interval_ms);
    if let Some(dir) = &args.state_dir {
        let stored = resume::load(dir).unwrap_or_else(|why| {
            tracing::warn!(problem = %why, "ignoring the stored interval");
            None
        });
        let start = resume::start_interval(
            &under,
            stored.as_ref(),
            cfg.min_interval_ms,
            cfg.max_interval_ms,
        );
        match (start, &stored) {
            (resume::Start::Resumed(iv), _) if iv != cfg.interval_ms => {
                tracing::info!(
                    interval_ms = iv,
                    configured_ms = cfg.interval_ms,
                    "resuming at the interval a monitor last asked for"
                );
                // Where it starts; `--interval-ms` stays what it goes
                // back to once the monitor that asked moves (see
                // `sender`).
                cfg.resumed_ms = Some(iv);
                cfg.resumed_by = stored.as_ref().and_then(|s| s.asked_by);
            }
            (resume::Start::Outdated, Some(s)) => {
                tracing::info!(
                    stored_ms = s.ms,
                    configured_ms = cfg.interval_ms,
                    "not resuming at the interval a monitor last asked for: asked under another \
                     --monitor list or --interval-ms (a monitor that still wants it asks again)"
                );
                // Nothing was asked under this configuration: a later
                // start under the old one must not find it either.
                if let Err(e) = resume::forget(dir) {
                    tracing::warn!(error = %format!("{e:#}"), "cannot remove the outdated interval");
                }
            }
            _ => {}
        }
    }
    let saver = args
        .state_dir
        .clone()
        .map(|dir| resume::Saver::start(dir, under))
        .transpose()?;
    let sent = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(send_loop(Sender::new(cfg), names, saver.as_ref()));
    // The interval a monitor asked for just before the stop is stored
    // before the process ends, or the restart resumes at the one before.
    if let Some(saver) = saver
        && !saver.finish(resume::FINISH_WITHIN)
    {
        tracing::warn!(
            waited_ms = resume::FINISH_WITHIN.as_millis() as u64,
            "exiting before the interval last asked for is stored (a slow disk?): a restart may \
             resume at the one before"
        );
    }
    sent
}

/// The sockets: one per address family in use.
/// One UDP socket per address family, opened when a monitor needs it:
/// received from through tokio, sent on directly (`sendto` on its
/// descriptor). tokio's `try_send_to` does not even try the syscall until
/// its driver has seen the socket writable, and a socket opened in the
/// loop (a name that resolved to the first address of its family) whose
/// heartbeat was already due lost it, warned as "cannot send". Nor is the
/// socket's writability watched (an `AsyncFd` readable only, not a
/// `tokio::net::UdpSocket`, which watches both): the kernel freeing each
/// heartbeat's buffer made it writable again, an event that woke the loop
/// for nothing once a heartbeat (one wake-up in three at 10 Hz).
#[derive(Default)]
struct Sockets {
    v4: Option<AsyncFd<std::net::UdpSocket>>,
    v6: Option<AsyncFd<std::net::UdpSocket>>,
}

impl Sockets {
    /// Opens the socket for `to`'s family, unless it is open.
    fn open_for(&mut self, to: SocketAddr) -> anyhow::Result<()> {
        let (slot, any, family) = match to {
            SocketAddr::V4(_) => (&mut self.v4, "0.0.0.0:0", "IPv4"),
            SocketAddr::V6(_) => (&mut self.v6, "[::]:0", "IPv6"),
        };
        if slot.is_none() {
            let s = std::net::UdpSocket::bind(any)
                .and_then(|s| {
                    s.set_nonblocking(true)?;
                    // SAFETY: the socket keeps its descriptor, the same
                    // one, for as long as the `AsyncFd` that owns it.
                    unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) }
                        .map_err(std::io::Error::from)
                })
                .with_context(|| format!("cannot open an {family} UDP socket"))?;
            *slot = Some(s);
        }
        Ok(())
    }

    /// Sends without waiting; an error if the datagram did not leave (one
    /// of its own for a family whose socket could not be opened).
    fn try_send(&self, to: SocketAddr, b: &[u8]) -> Result<(), std::io::Error> {
        let s = if to.is_ipv4() { &self.v4 } else { &self.v6 };
        let Some(s) = s.as_ref() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no UDP socket of this address family could be opened",
            ));
        };
        // Non-blocking: `WouldBlock` only if the socket's buffer is full.
        socket2::SockRef::from(s.get_ref())
            .send_to(b, &to.into())
            .map(drop)
    }
}

/// Receives one datagram from `s`, or never if there is no such socket.
async fn recv(
    s: &Option<AsyncFd<std::net::UdpSocket>>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr)> {
    match s {
        Some(s) => s.async_io(Interest::READABLE, |s| s.recv_from(buf)).await,
        None => std::future::pending().await,
    }
}

/// Sends the next heartbeat to every monitor; returns to how many it went.
///
/// A monitor's failed sends are warned about when they start and at every
/// 100th in a row (`failing`; `errors` counts them over the sender's
/// life), so that an unreachable monitor does not flood the log, and each
/// outage is told, not only the first; the first send that leaves again
/// says how many had failed.
fn send_all(sender: &mut Sender, sockets: &Sockets, cpus: usize, leaving: bool) -> usize {
    let out = sender.heartbeat(monotonic_ns(), load_permille(cpus), leaving);
    let mut sent = 0;
    for (i, (to, b)) in out.iter().enumerate() {
        match sockets.try_send(*to, b) {
            Err(e) => {
                let failing = sender.send_failed(i);
                let errors = sender.monitors()[i].send_errors;
                if leaving {
                    // The last word, said once: every monitor that misses
                    // it is named.
                    tracing::warn!(monitor = %to, error = %e, "cannot send the LEAVING heartbeat: this monitor will find the node dead, not left");
                } else if failing == 1 || failing.is_multiple_of(100) {
                    tracing::warn!(monitor = %to, error = %e, failing, errors, "cannot send heartbeat");
                }
            }
            Ok(()) => {
                sent += 1;
                let failed = sender.send_ok(i);
                if failed > 0 {
                    tracing::info!(monitor = %to, failed, "sending heartbeats to this monitor again after failed sends");
                }
            }
        }
    }
    sent
}

/// Tells `sender` how late its loop woke, `due` being when the next
/// heartbeat was due (CLOCK_MONOTONIC ns; see [`sender`] on stalls).
fn woke(sender: &mut Sender, due: u64) {
    let now = monotonic_ns();
    sender.woke_late(now.saturating_sub(due), now);
}

/// The interval in use, ns.
fn interval_ns(sender: &Sender) -> u64 {
    u64::from(sender.interval_ms()) * 1_000_000
}

/// The monitors given by name, and the address each resolved to last
/// (see [`spawn_resolvers`]).
struct Names {
    names: Vec<Name>,
    rx: mpsc::UnboundedReceiver<Report>,
    resolvers: Resolvers,
}

struct Name {
    /// `host:port`, as given.
    name: String,
    /// The address it gets its heartbeats at; `None` until it resolves.
    addr: Option<SocketAddr>,
    /// Failed lookups in a row.
    failures: u32,
    /// While sends to its address fail: the early lookups of the name
    /// (see [`Names::watch_sends`]).
    early: Option<Early>,
}

/// The early lookups of a name in one outage of its address's sends,
/// which ends at the first send that leaves (at this address or at the
/// one its name gave next).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Early {
    /// When the name is to be looked up early (next).
    at: Instant,
    /// Early lookups asked for so far.
    lookups: u32,
}

impl Names {
    fn start(names: Vec<String>) -> anyhow::Result<Names> {
        Names::with(names, resolve_all, retry_delay, RESOLVE_PERIOD)
    }

    /// [`Names::start`] with another resolver and timing (the tests').
    fn with<R>(
        names: Vec<String>,
        resolve: R,
        retry: fn(u32) -> Duration,
        period: Duration,
    ) -> anyhow::Result<Names>
    where
        R: Fn(&str) -> anyhow::Result<Vec<SocketAddr>> + Send + Clone + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let resolvers =
            spawn_resolvers(&names, resolve, retry, period, move |r| tx.send(r).is_ok())?;
        let names = names
            .into_iter()
            .map(|name| Name {
                name,
                addr: None,
                failures: 0,
                early: None,
            })
            .collect();
        Ok(Names {
            names,
            rx,
            resolvers,
        })
    }

    /// The next report of a resolver thread (never, with no names).
    async fn next(&mut self) -> Report {
        match self.rx.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    fn unresolved(&self) -> Vec<&str> {
        self.names
            .iter()
            .filter(|n| n.addr.is_none())
            .map(|n| n.name.as_str())
            .collect()
    }

    /// Waits until every name resolved or failed once, or [`RESOLVE_WAIT`]
    /// passed, adding the monitors found.
    async fn first_answers(&mut self, sender: &mut Sender, sockets: &mut Sockets) {
        let deadline = Instant::now() + RESOLVE_WAIT;
        let mut answered = vec![false; self.names.len()];
        while answered.contains(&false) {
            let Ok(r) = tokio::time::timeout_at(deadline, self.next()).await else {
                break;
            };
            answered[r.index] = true;
            // A name answers once in this short wait (the next lookup is
            // a period away): none can have moved, no request gone.
            self.apply(r, sender, sockets);
        }
    }

    /// Looks after the names whose address's last send failed (`now`,
    /// after a heartbeat went out): one whose sends have failed for
    /// [`EARLY_RESOLVE`] is resolved again at once, then at doubling
    /// delays up to [`RESOLVE_PERIOD`] while they keep failing, and its
    /// next answer other than the failing address replaces it (see
    /// [`Names::apply`]). A name with an IPv4 and an IPv6 address whose
    /// IPv4 route went away kept the IPv4 one, every send failing, until
    /// its next lookup and beyond (it was still among the answers). The
    /// first send that leaves ends the outage. Returns the names asked to
    /// be resolved.
    fn watch_sends(&mut self, sender: &Sender, now: Instant) -> Vec<usize> {
        let mut asked = Vec::new();
        for (i, n) in self.names.iter_mut().enumerate() {
            let Some(address) = n.addr.filter(|&a| failing(sender, a)) else {
                n.early = None;
                continue;
            };
            let early = n.early.get_or_insert(Early {
                at: now + EARLY_RESOLVE,
                lookups: 0,
            });
            if now < early.at {
                continue;
            }
            early.at = now + early_delay(early.lookups + 1);
            early.lookups += 1;
            tracing::info!(monitor = %n.name, address = %address, early_lookups = early.lookups, "sends to this monitor keep failing: resolving its name again now, for another address");
            self.resolvers.resolve_now(i);
            asked.push(i);
        }
        asked
    }

    /// Whether `a` gets heartbeats for some `--monitor`: given as an
    /// address, or the address of a name.
    fn wanted(&self, a: SocketAddr, sender: &Sender) -> bool {
        sender.config().monitors.contains(&a) || self.names.iter().any(|n| n.addr == Some(a))
    }

    /// Takes a resolver thread's report: a name's first address starts
    /// its heartbeats, another address replaces the old one (which goes
    /// unless another `--monitor` leads to it too), as does the next
    /// answer when the old one's sends keep failing ([`pick`]), a failure
    /// keeps the address. Returns the change of the interval in use when
    /// the old address's request was the one that decided it.
    fn apply(
        &mut self,
        r: Report,
        sender: &mut Sender,
        sockets: &mut Sockets,
    ) -> Option<(u32, u32)> {
        let n = &mut self.names[r.index];
        let answers = match r.answer {
            Ok(answers) => answers,
            Err(e) => {
                let error = format!("{e:#}");
                match n.addr {
                    None => tracing::warn!(
                        monitor = %n.name,
                        error = %error,
                        retry_in = ?r.retry_in,
                        "cannot resolve monitor, will try again (the monitors that resolved get their heartbeats)"
                    ),
                    // Once per outage: DNS down says nothing of the
                    // monitor, and a fleet's worth of warnings a minute
                    // would bury what does.
                    Some(a) if n.failures == 0 => tracing::warn!(
                        monitor = %n.name,
                        address = %a,
                        error = %error,
                        retry_in = ?r.retry_in,
                        "cannot resolve monitor again, it keeps getting heartbeats at its last address (warned once, until it resolves)"
                    ),
                    Some(a) => {
                        tracing::debug!(monitor = %n.name, address = %a, error = %error, retry_in = ?r.retry_in, "cannot resolve monitor again")
                    }
                }
                n.failures = n.failures.saturating_add(1);
                return None;
            }
        };
        let (failures, old) = (std::mem::take(&mut n.failures), n.addr);
        // Its sends have failed for a while (an early lookup was asked
        // for) and the last one did too.
        let given_up =
            n.early.is_some_and(|e| e.lookups > 0) && old.is_some_and(|a| failing(sender, a));
        let new = pick(old, given_up, &answers)?;
        if old == Some(new) {
            if failures > 0 {
                tracing::info!(monitor = %n.name, address = %new, failures, "monitor resolves again");
            }
            return None;
        }
        if let Err(e) = sockets.open_for(new) {
            // Tried again at the next lookup.
            tracing::warn!(monitor = %n.name, address = %new, old = ?old, error = %format!("{e:#}"), "monitor resolved, but gets no heartbeats at this address");
            return None;
        }
        n.addr = Some(new);
        let shared = sender.monitors().iter().any(|m| m.addr == new);
        let name = &self.names[r.index].name;
        let mut change = None;
        if let Some(old) = old
            && !self.wanted(old, sender)
            && let Some(gone) = sender.remove_monitor(old)
        {
            change = gone.interval_change;
        }
        if !shared && let Err(e) = sender.add_monitor(new) {
            // Cannot be: there are no more addresses than `--monitor`s.
            tracing::warn!(monitor = %name, address = %new, problem = %e, "monitor resolved, but gets no heartbeats");
        }
        match old {
            None if shared => {
                tracing::warn!(monitor = %name, address = %new, "monitor resolved to an address that already gets heartbeats")
            }
            None => tracing::info!(monitor = %name, address = %new, "monitor resolved"),
            Some(old) if given_up => {
                tracing::warn!(monitor = %name, old = %old, new = %new, already_sent_to = shared, "sends to the monitor's address keep failing: another address of its name gets its heartbeats from now on")
            }
            Some(old) => {
                tracing::info!(monitor = %name, old = %old, new = %new, already_sent_to = shared, "monitor moved: its name resolves to another address, which gets its heartbeats from now on")
            }
        }
        change
    }
}

/// Whether the last send to the monitor at `a` failed.
fn failing(sender: &Sender, a: SocketAddr) -> bool {
    sender
        .monitors()
        .iter()
        .any(|m| m.addr == a && m.failing > 0)
}

async fn send_loop(
    mut sender: Sender,
    names: Vec<String>,
    saver: Option<&resume::Saver>,
) -> anyhow::Result<()> {
    let cfg = sender.config().clone();
    let mut sockets = Sockets::default();
    // A family that cannot be opened (a kernel booted with
    // `ipv6.disable=1`, a unit's `RestrictAddressFamilies`) costs its
    // monitors their heartbeats, not the others theirs: a fleet-wide
    // config with one `[v6]:P` monitor made every such node exit, dead to
    // every monitor. (A name is tried again at its next lookup.)
    let mut unreachable = 0;
    for &m in &cfg.monitors {
        if let Err(e) = sockets.open_for(m) {
            unreachable += 1;
            tracing::warn!(monitor = %m, error = %format!("{e:#}"), "this monitor gets no heartbeats");
        }
    }
    if unreachable > 0 && unreachable == cfg.monitors.len() && names.is_empty() {
        bail!(
            "no monitor can get heartbeats: no UDP socket of their address families could be opened"
        );
    }
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;
    // A closed terminal's hangup, or a reload by habit (the sender has
    // nothing to reload): leave as on SIGTERM. Unhandled, it killed the
    // sender without a word, and its node was found dead.
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let mut names = Names::start(names)?;
    names.first_answers(&mut sender, &mut sockets).await;
    let cpus = online_cpus();
    tracing::info!(
        node_id = cfg.node_id,
        generation = cfg.generation,
        key_epoch = cfg.key_epoch,
        interval_ms = sender.interval_ms(),
        monitors = ?sender.monitors().iter().map(|m| m.addr).collect::<Vec<_>>(),
        unresolved = ?names.unresolved(),
        "sending heartbeats"
    );
    if sender.monitors().is_empty() {
        tracing::warn!(unresolved = ?names.unresolved(), "no monitor resolved yet: heartbeats go nowhere until one does");
    }
    let (mut buf4, mut buf6) = ([0u8; 64], [0u8; 64]);
    // When the next heartbeat is due, CLOCK_MONOTONIC ns (see `beat`).
    let mut timer = beat::Timer::new().context("cannot create the heartbeat timer")?;
    let mut next = monotonic_ns();
    let mut recv_errors = 0u64;
    let signal = loop {
        // A system call when `next` moved: after a heartbeat, or when a
        // new interval brought it forward.
        timer.arm(next).context("cannot arm the heartbeat timer")?;
        tokio::select! {
            r = timer.wait() => {
                r.context("the heartbeat timer failed")?;
                woke(&mut sender, next);
                send_all(&mut sender, &sockets, cpus, false);
                names.watch_sends(&sender, Instant::now());
                next = next_due(next, interval_ns(&sender), monotonic_ns());
            }
            r = recv(&sockets.v4, &mut buf4) => {
                woke(&mut sender, next);
                on_datagram(&mut sender, r, &buf4, &mut recv_errors, &mut next, saver);
            }
            r = recv(&sockets.v6, &mut buf6) => {
                woke(&mut sender, next);
                on_datagram(&mut sender, r, &buf6, &mut recv_errors, &mut next, saver);
            }
            r = names.next() => {
                if let Some((old, new)) = names.apply(r, &mut sender, &mut sockets) {
                    tracing::info!(old_ms = old, new_ms = new, "the interval a moved monitor asked for no longer stands");
                    interval_changed(&sender, &mut next, saver);
                }
            }
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => break "SIGHUP",
        }
    };
    let reached = send_all(&mut sender, &sockets, cpus, true);
    let rejected: Vec<String> = sender
        .rejected()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect();
    // `reason=count,...`, or 0: not an empty field.
    let acks_rejected = if rejected.is_empty() {
        "0".to_owned()
    } else {
        rejected.join(",")
    };
    let (acks, send_errors) = (sender.acks, sender.send_errors);
    let monitors = sender.monitors().len();
    // Which monitor answered: `addr=acks,...` (a total alone hid a
    // monitor that never did beside one that did).
    let acks_by_monitor = sender
        .monitors()
        .iter()
        .map(|m| format!("{}={}", m.addr, m.acks))
        .collect::<Vec<_>>()
        .join(",");
    let acks_by_monitor = if acks_by_monitor.is_empty() {
        "none".to_owned()
    } else {
        acks_by_monitor
    };
    let unresolved = names.unresolved();
    // One line either way, a warning if the goodbye reached no monitor.
    macro_rules! exit_line {
        ($level:ident, $message:literal) => {
            tracing::$level!(
                signal,
                leaving_sent_to = reached,
                monitors,
                unresolved = ?unresolved,
                sent = sender.sent,
                last_seq = sender.seq(),
                acks,
                acks_by_monitor = %acks_by_monitor,
                send_errors,
                recv_errors,
                acks_rejected = %acks_rejected,
                $message
            )
        };
    }
    if reached > 0 {
        exit_line!(info, "sent LEAVING heartbeat, exiting");
    } else {
        exit_line!(warn, "sent the LEAVING heartbeat to no monitor, exiting");
    }
    Ok(())
}

fn on_datagram(
    sender: &mut Sender,
    r: std::io::Result<(usize, SocketAddr)>,
    buf: &[u8],
    recv_errors: &mut u64,
    next: &mut u64,
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
                // `new_ms` is the fastest request of every monitor,
                // clamped into this sender's bounds: not necessarily what
                // this ACK asked (`asked_ms`, 0 for nothing).
                tracing::info!(monitor = %from, asked_ms = a.asked_ms, old_ms = old, new_ms = new, "monitor asked for a new heartbeat interval");
                interval_changed(sender, next, saver);
            }
        }
        Err(reason) => {
            tracing::debug!(from = %from, reason = %reason, "ignored datagram");
        }
    }
}

/// Takes a change of the interval in use (`sender`'s now): from now, not
/// after the old (maybe 10 s) wait; and a restart resumes at it, knowing
/// which monitor asked (see `resume`).
fn interval_changed(sender: &Sender, next: &mut u64, saver: Option<&resume::Saver>) {
    let new = sender.interval_ms();
    *next = (*next).min(monotonic_ns() + interval_ns(sender));
    if let Some(s) = saver {
        s.save(new, sender.decided_by());
    }
}

/// When the heartbeat after one due at `due` (and sent at `now`) is due:
/// one interval later, keeping the rhythm; after a stall of the sender
/// (a suspended VM, an overloaded host) past that, one interval after
/// `now`, a fresh rhythm. Never sooner: a heartbeat right after the late
/// one (as `max(due + iv, now)` sent) tells the monitor nothing and
/// enters its statistics as a near-zero inter-arrival time.
/// Generic over the clock: this loop's (CLOCK_MONOTONIC ns, as `u64`)
/// and `hb simulate`'s senders' keep the same rhythm.
pub(crate) fn next_due<T, D>(due: T, iv: D, now: T) -> T
where
    T: Copy + PartialOrd + std::ops::Add<D, Output = T>,
    D: Copy,
{
    let next = due + iv;
    if next > now { next } else { now + iv }
}

#[cfg(test)]
mod tests {
    /// A socket opened in the loop sends at once: through tokio it did not
    /// even try until the runtime's driver had seen it writable, and the
    /// heartbeat already due when a name first resolved to its family was
    /// lost ("cannot send heartbeat").
    #[test]
    fn a_socket_opened_in_the_loop_sends_at_once() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = rx.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut s = super::Sockets::default();
            s.open_for(to).unwrap();
            s.try_send(to, &[7u8; 48])
                .expect("sent without a driver turn");
        });
        let mut buf = [0u8; 64];
        assert_eq!(rx.recv(&mut buf).unwrap(), 48);
    }

    /// The sockets are watched for datagrams only: watched for room to
    /// send too (as a `tokio::net::UdpSocket` is), the kernel freeing
    /// each heartbeat's buffer woke the loop for nothing. Read from the
    /// epoll registration the kernel shows in `/proc/self/fdinfo`.
    #[tokio::test]
    async fn a_socket_is_watched_for_datagrams_not_for_room_to_send() {
        use std::os::fd::AsRawFd as _;
        let mut sockets = super::Sockets::default();
        sockets.open_for("127.0.0.1:9".parse().unwrap()).unwrap();
        let fd = sockets.v4.as_ref().unwrap().as_raw_fd();
        let tfd = format!("tfd: {fd:>8} ");
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap() {
            // Descriptors of other tests come and go meanwhile.
            let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
                continue;
            };
            for line in info.lines().filter(|l| l.starts_with(&tfd)) {
                let events = line.split_whitespace().nth(3).unwrap();
                masks.push(u32::from_str_radix(events, 16).unwrap());
            }
        }
        assert!(!masks.is_empty(), "registered with the runtime's epoll");
        for events in masks {
            assert_ne!(events & libc::EPOLLIN as u32, 0, "{events:#x}");
            assert_eq!(events & libc::EPOLLOUT as u32, 0, "{events:#x}");
        }
    }

    /// A family whose socket could not be opened is an error for its
    /// monitors' sends, not a panic of the whole sender.
    #[tokio::test]
    async fn a_send_to_a_family_without_a_socket_is_an_error() {
        let mut sockets = super::Sockets::default();
        sockets.open_for("127.0.0.1:9".parse().unwrap()).unwrap();
        let e = sockets
            .try_send("[fd00::1]:7420".parse().unwrap(), b"x")
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
    }

    use super::*;

    /// Failed sends are warned about when they start and at every 100th
    /// in a row, in every outage, and the first send that leaves again
    /// says so. Counted over the monitor's life, a second outage shorter
    /// than 100 sends went untold, and no end of one was ever told.
    #[tokio::test]
    async fn each_outage_of_a_monitor_is_warned_about_and_its_end_told() {
        let log = crate::test_log::Warnings::from_level("hb::send", tracing::Level::INFO);
        let _capture = log.capture();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut sender = test_sender(&[&to.to_string()]);
        // No IPv4 socket: every send fails; with one, it leaves.
        let mut sockets = Sockets::default();
        let mut send = |sockets: &Sockets, n: usize| -> usize {
            (0..n)
                .map(|_| send_all(&mut sender, sockets, 1, false))
                .sum()
        };
        assert_eq!(send(&sockets, 3), 0);
        sockets.open_for(to).unwrap();
        assert_eq!(send(&sockets, 2), 2);
        sockets.v4 = None;
        assert_eq!(send(&sockets, 2), 0);
        assert_eq!(send(&sockets, 198), 0);
        sockets.open_for(to).unwrap();
        assert_eq!(send(&sockets, 1), 1);
        let lines: Vec<_> = log
            .taken()
            .into_iter()
            .map(|l| {
                let count = |f| l.field(f).map(str::to_owned);
                (
                    l.level,
                    l.message.clone(),
                    count("failing"),
                    count("errors"),
                    count("failed"),
                )
            })
            .collect();
        let warn = |failing: &str, errors: &str| {
            (
                tracing::Level::WARN,
                "cannot send heartbeat".to_owned(),
                Some(failing.to_owned()),
                Some(errors.to_owned()),
                None,
            )
        };
        let again = |failed: &str| {
            (
                tracing::Level::INFO,
                "sending heartbeats to this monitor again after failed sends".to_owned(),
                None,
                None,
                Some(failed.to_owned()),
            )
        };
        assert_eq!(
            lines,
            [
                warn("1", "1"),
                again("3"),
                warn("1", "4"),
                warn("100", "103"),
                warn("200", "203"),
                again("200"),
            ]
        );
        assert_eq!(sender.monitors()[0].send_errors, 203);
    }

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
        for bad in ["198.18.0.1", "fd00::1", "[fd00::1]", "host:", ":7420"] {
            let e = format!("{:#}", resolve_monitor(bad).unwrap_err());
            assert!(e.contains("needs a port"), "{bad}: {e}");
        }
        for bad in ["198.18.0.1:99999", "host:70000"] {
            let e = format!("{:#}", resolve_monitor(bad).unwrap_err());
            assert!(e.contains("is past 65535"), "{bad}: {e}");
        }
        // A name the resolver refuses before any lookup (a NUL byte cannot
        // go to getaddrinfo): the error path without asking the host's DNS
        // (tests/cli.rs resolves a real name, in an empty namespace).
        let e = format!("{:#}", resolve_name("no-such\0host:7420").unwrap_err());
        assert!(
            e.contains("cannot resolve monitor address `no-such\0host:7420`"),
            "{e}"
        );
    }

    /// What `--monitor` accepts, and what it refuses at start: anything
    /// waiting would not fix. A well-formed name is accepted unresolved.
    #[test]
    fn monitor_targets_and_addresses_that_cannot_be_monitors() {
        let name = |s: &str| Target::Name(s.to_owned());
        let addr = |s: &str| Target::Addr(s.parse().unwrap());
        for (arg, want) in [
            ("198.18.0.1:7420", addr("198.18.0.1:7420")),
            ("[::ffff:198.18.0.1]:7420", addr("198.18.0.1:7420")),
            ("[fd00::1]:9", addr("[fd00::1]:9")),
            (
                "monitor1.example.net:7420",
                name("monitor1.example.net:7420"),
            ),
            (
                "monitor1.example.net.:7420",
                name("monitor1.example.net.:7420"),
            ),
            ("mon_1:1", name("mon_1:1")),
            // Names that only start like numbers.
            ("0xcafe.example:7420", name("0xcafe.example:7420")),
            ("0x7g.1:7420", name("0x7g.1:7420")),
            ("1.2.3.4a:7420", name("1.2.3.4a:7420")),
            (
                "no-such-host.invalid:7420",
                name("no-such-host.invalid:7420"),
            ),
        ] {
            assert_eq!(parse_monitor(arg).unwrap(), want, "{arg}");
        }
        for (arg, want) in [
            (
                "198.18.0.1:0",
                "monitor `198.18.0.1:0`: port 0 is no monitor's port",
            ),
            ("[fd00::1]:0", ": port 0 is no monitor's port"),
            (
                "monitor1.example.net:0",
                "monitor `monitor1.example.net:0`: port 0",
            ),
            (
                "0.0.0.0:7420",
                "`0.0.0.0:7420`: 0.0.0.0 is the unspecified address",
            ),
            ("[::]:7420", ": :: is the unspecified address"),
            (
                "[::ffff:0.0.0.0]:7420",
                ": 0.0.0.0 is the unspecified address",
            ),
            ("224.0.0.1:7420", ": 224.0.0.1 is a multicast address"),
            ("[ff02::1]:7420", ": ff02::1 is a multicast address"),
            (
                "255.255.255.255:7420",
                "255.255.255.255 is the broadcast address",
            ),
            (
                "256.1.1.1:7420",
                "`256.1.1.1` is neither an IP address nor a host name",
            ),
            ("1.2.3:7420", "is neither an IP address nor a host name"),
            (
                "no such host:7420",
                "is neither an IP address nor a host name",
            ),
            ("a..b:7420", "is neither an IP address nor a host name"),
            (
                "no-such\0host:7420",
                "is neither an IP address nor a host name",
            ),
            ("[fd00::zz]:7420", "`[fd00::zz]` is not an IPv6 address"),
            // Link-local without the interface: its ACKs, which come with
            // the interface's scope, matched no monitor.
            (
                "[fe80::1]:7420",
                "monitor `[fe80::1]:7420`: fe80::1 is a link-local address, which needs the \
                 interface it is on: `[fe80::1%IFNAME]:7420`, as `[fe80::1%eth0]:7420`",
            ),
            ("[fe80::1%0]:7420", "`[fe80::1%IFNAME]:7420`"),
            // Numbers as the C resolver reads an IPv4 address in them
            // (127.0.0.1, each): no name.
            (
                "0x7f.1:7420",
                "`0x7f.1` is neither an IP address nor a host name",
            ),
            (
                "0X7F.0.0.1:7420",
                "is neither an IP address nor a host name",
            ),
            (
                "0x7f000001:7420",
                "is neither an IP address nor a host name",
            ),
            (
                "0177.0x0.1:7420",
                "is neither an IP address nor a host name",
            ),
            (
                "017700000001:7420",
                "is neither an IP address nor a host name",
            ),
            ("127.1.:7420", "is neither an IP address nor a host name"),
        ] {
            let e = format!("{:#}", parse_monitor(arg).unwrap_err());
            assert!(e.contains(want), "{arg}: {e}");
        }
        let long = format!("{}.example:7420", "a".repeat(64));
        assert!(parse_monitor(&long).is_err());
        // A name that resolves only to an address no monitor can have is
        // not resolved (it is retried).
        assert!(unusable("0.0.0.0:7420".parse().unwrap()).is_some());
        assert_eq!(unusable("198.18.0.1:7420".parse().unwrap()), None);
        assert_eq!(unusable("[fe80::1%2]:7420".parse().unwrap()), None);
        // Nor one that resolves only to a link-local address without its
        // interface (retried, warned about with this error); with another
        // address too, that one is taken.
        let zoneless: SocketAddr = "[fe80::1]:7420".parse().unwrap();
        let e = format!("{:#}", usable("mon:7420", [zoneless]).unwrap_err());
        assert!(
            e.starts_with("monitor address `mon:7420` resolves to no address a monitor can have: fe80::1 is a link-local address")
                && e.contains("`[fe80::1%IFNAME]:7420`"),
            "{e}"
        );
        let global: SocketAddr = "[fd00::1]:7420".parse().unwrap();
        assert_eq!(usable("mon:7420", [zoneless, global]).unwrap(), [global]);
    }

    #[test]
    fn name_retries_back_off_from_one_second_to_a_minute() {
        let secs: Vec<u64> = (0..10).map(|a| retry_delay(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(60));
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Each name on its own thread: one that fails is retried at the retry
    /// delays until it resolves, one that never does holds up no other,
    /// one that resolved is resolved again every period; each attempt is
    /// reported.
    #[test]
    fn names_are_retried_until_they_resolve_and_then_every_period() {
        use std::sync::{
            Arc,
            atomic::{AtomicU32, Ordering},
        };
        let tries = Arc::new(AtomicU32::new(0));
        let t = tries.clone();
        let resolve = move |name: &str| -> anyhow::Result<Vec<SocketAddr>> {
            match name {
                "late:1" if t.fetch_add(1, Ordering::SeqCst) >= 2 => Ok(vec![sa("198.18.0.2:1")]),
                "late:1" => bail!("not yet"),
                "ok:1" => Ok(vec![sa("198.18.0.1:1")]),
                _ => bail!("no such name"),
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let names = ["never:1", "late:1", "ok:1"].map(String::from);
        let period = Duration::from_millis(3);
        let _resolvers = spawn_resolvers(
            &names,
            resolve,
            |failed| Duration::from_micros(100 + failed as u64),
            period,
            move |r| tx.send(r).is_ok(),
        )
        .unwrap();
        let mut seen: [Vec<(Option<Vec<SocketAddr>>, Duration)>; 3] = Default::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.iter().any(|s| s.len() < 5) {
            // "never" reports all the time: a bound on the whole wait.
            assert!(std::time::Instant::now() < deadline, "{seen:?}");
            let r = rx.recv_timeout(Duration::from_secs(10)).expect("a report");
            seen[r.index].push((r.answer.ok(), r.retry_in));
        }
        let us = Duration::from_micros;
        let failed = |n: u64| (None, us(100 + n));
        let found = |a: &str| (Some(vec![sa(a)]), period);
        assert_eq!(
            seen[0][..5],
            [failed(0), failed(1), failed(2), failed(3), failed(4)]
        );
        let late = found("198.18.0.2:1");
        assert_eq!(
            seen[1][..5],
            [failed(0), failed(1), late.clone(), late.clone(), late]
        );
        assert_eq!(seen[2][..5], vec![found("198.18.0.1:1"); 5]);
    }

    /// The threads end when the sender does (its `Resolvers` dropped),
    /// even in the middle of an hour's wait.
    #[test]
    fn resolver_threads_end_with_the_sender() {
        let (tx, rx) = std::sync::mpsc::channel();
        const HOUR: Duration = Duration::from_secs(3600);
        let resolve = |name: &str| match name {
            "ok:1" => Ok(vec![sa("198.18.0.1:1")]),
            _ => bail!("no such name"),
        };
        let names = ["ok:1", "never:1"].map(String::from);
        let resolvers =
            spawn_resolvers(&names, resolve, |_| HOUR, HOUR, move |r| tx.send(r).is_ok()).unwrap();
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10)).expect("a report");
        }
        let Resolvers { wake, threads } = resolvers;
        assert_eq!(threads.len(), 2);
        assert!(threads.iter().all(|t| !t.is_finished()), "waiting");
        drop(wake);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !threads.iter().all(|t| t.is_finished()) {
            assert!(
                std::time::Instant::now() < deadline,
                "threads still running"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A thread waiting out its period looks its name up at once when
    /// asked (the address's sends keep failing), and then waits a period
    /// again.
    #[test]
    fn a_resolver_thread_looks_up_its_name_when_asked() {
        let (tx, rx) = std::sync::mpsc::channel();
        const HOUR: Duration = Duration::from_secs(3600);
        let names = ["a:1", "b:1"].map(String::from);
        let resolvers = spawn_resolvers(
            &names,
            |_: &str| Ok(vec![sa("198.18.0.1:1")]),
            |_| HOUR,
            HOUR,
            move |r| tx.send(r).is_ok(),
        )
        .unwrap();
        let mut first = [0, 1].map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap().index);
        first.sort();
        assert_eq!(first, [0, 1]);
        resolvers.resolve_now(1);
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a lookup now");
        assert_eq!((r.index, r.retry_in), (1, HOUR));
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "one");
        // No such name: nothing happens.
        resolvers.resolve_now(2);
    }

    /// A link-local monitor keeps its scope, given as a number or as the
    /// interface's name: dropped, heartbeats left by whichever interface
    /// the first `fe80::/64` route names, reported sent.
    #[test]
    fn a_link_local_monitor_keeps_its_interface() {
        let scoped = |s: &str| match parse_monitor(s).unwrap() {
            Target::Addr(SocketAddr::V6(a)) => (a.ip().to_string(), a.port(), a.scope_id()),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(scoped("[fe80::1%7]:7420"), ("fe80::1".into(), 7420, 7));
        // `lo` is index 1 in every network namespace.
        assert_eq!(scoped("[fe80::1%lo]:7420"), ("fe80::1".into(), 7420, 1));
        assert_eq!(scoped("[fd00::1]:7420"), ("fd00::1".into(), 7420, 0));
        // Only a link-local address keeps it: ACKs from any other come
        // without one, and would match no monitor.
        assert_eq!(scoped("[fd00::1%7]:7420"), ("fd00::1".into(), 7420, 0));
        assert_eq!(scoped("[fd00::1%lo]:7420"), ("fd00::1".into(), 7420, 0));
        for (bad, want) in [
            (
                "[fe80::1%hbnosuch0]:7420",
                "no interface `hbnosuch0` on this host",
            ),
            ("[fe80::x%lo]:7420", "`fe80::x` is not an IPv6 address"),
            ("[fe80::1%lo]:99999", "`99999` is not a port"),
            ("[fe80::1%lo]:0", "port 0 is no monitor's port"),
        ] {
            let e = format!("{:#}", parse_monitor(bad).unwrap_err());
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    /// `--epoch` names an epoch of `--keyring`: with a key of its own, the
    /// sender ran at `--key-epoch`'s default, 0, saying nothing, and every
    /// heartbeat was refused as `bad_epoch`.
    #[test]
    fn epoch_without_a_keyring_is_refused() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let key = "00112233445566778899aabbccddeeff";
        let base = ["hb", "--monitor", "198.18.0.1:7420", "--node-id", "1"];
        let parse = |extra: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(base.iter().chain(extra)).map(|c| c.args)
        };
        let e = format!(
            "{:#}",
            parse(&["--key", key, "--epoch", "2"])
                .unwrap()
                .config()
                .unwrap_err()
        );
        assert!(e.contains("--key-epoch 2"), "{e}");
        let (cfg, _) = parse(&["--key", key, "--key-epoch", "2"])
            .unwrap()
            .config()
            .unwrap();
        assert_eq!(cfg.key_epoch, 2);
    }

    const KEY: NodeKey = NodeKey { k0: 7, k1: 9 };

    fn test_sender(monitors: &[&str]) -> Sender {
        Sender::new(Config {
            node_id: 42,
            key: KEY,
            key_epoch: 1,
            generation: 1_700_000_000,
            interval_ms: 1000,
            resumed_ms: None,
            resumed_by: None,
            min_interval_ms: 100,
            max_interval_ms: 10_000,
            monitors: monitors.iter().map(|m| sa(m)).collect(),
        })
    }

    fn addrs(sender: &Sender) -> Vec<SocketAddr> {
        sender.monitors().iter().map(|m| m.addr).collect()
    }

    /// A monitor's name is resolved again every period: a changed address
    /// (to another family too) replaces the old one at the next lookup, a
    /// rotated round-robin answer moves nothing, and failed lookups (DNS
    /// down) keep the address.
    #[tokio::test]
    async fn a_moved_monitor_is_followed_and_a_failed_lookup_keeps_its_address() {
        use std::sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        };
        const X: &str = "198.18.0.1:7420";
        const Z: &str = "198.18.0.9:7420";
        const Y6: &str = "[fd00::7]:7420";
        const SCRIPT: [&[&str]; 6] = [&[X], &[Z, X], &[], &[], &[X], &[Y6]];
        let (script, x, y6) = (SCRIPT, X, Y6);
        let attempt = Arc::new(AtomicUsize::new(0));
        let a = attempt.clone();
        let resolve = move |_: &str| -> anyhow::Result<Vec<SocketAddr>> {
            let answer = script[a.fetch_add(1, Ordering::SeqCst).min(script.len() - 1)];
            if answer.is_empty() {
                bail!("temporary failure in name resolution");
            }
            Ok(answer.iter().map(|s| sa(s)).collect())
        };
        let period = Duration::from_millis(20);
        let retry = |_| Duration::from_millis(1);
        let start = std::time::Instant::now();
        let mut names =
            Names::with(vec!["mon.example:7420".into()], resolve, retry, period).unwrap();
        let (mut sender, mut sockets) = (test_sender(&[]), Sockets::default());
        let mut step = async || {
            let r = tokio::time::timeout(Duration::from_secs(10), names.next())
                .await
                .expect("a report");
            let retry_in = r.retry_in;
            assert_eq!(names.apply(r, &mut sender, &mut sockets), None);
            (addrs(&sender), names.names[0].failures, retry_in)
        };
        // Resolved, then resolved again a period later: the same address
        // first in the answer or not.
        assert_eq!(step().await, (vec![sa(x)], 0, period));
        assert_eq!(step().await, (vec![sa(x)], 0, period));
        // DNS down: the monitor keeps its address, retried sooner.
        assert_eq!(step().await, (vec![sa(x)], 1, retry(0)));
        assert_eq!(step().await, (vec![sa(x)], 2, retry(1)));
        assert_eq!(step().await, (vec![sa(x)], 0, period));
        // The monitor moved: followed at the next lookup, a period later.
        assert_eq!(step().await, (vec![sa(y6)], 0, period));
        // Two waits of a period in all: no lookup came sooner.
        assert!(start.elapsed() >= 2 * period);
        assert!(sockets.v6.is_some(), "a socket for the new family");
        assert!(names.unresolved().is_empty());
    }

    /// Names without resolver threads: the tests hand `apply` the reports.
    fn quiet(names: &[&str]) -> Names {
        let (_, rx) = mpsc::unbounded_channel();
        Names {
            names: names
                .iter()
                .map(|n| Name {
                    name: n.to_string(),
                    addr: None,
                    failures: 0,
                    early: None,
                })
                .collect(),
            rx,
            resolvers: Resolvers {
                wake: Vec::new(),
                threads: Vec::new(),
            },
        }
    }

    fn found(index: usize, answer: &[&str]) -> Report {
        Report {
            index,
            answer: Ok(answer.iter().map(|s| sa(s)).collect()),
            retry_in: RESOLVE_PERIOD,
        }
    }

    /// When a name moves, the request its old address made no longer
    /// decides the interval, and ACKs from the old address, or of
    /// heartbeats it was sent, are not the new one's.
    #[tokio::test]
    async fn a_moved_monitor_s_interval_request_and_acks_stay_behind() {
        let (x, w, y) = ("198.18.0.1:7420", "198.18.0.2:7420", "198.18.0.3:7420");
        let mut names = quiet(&["a.example:7420", "b.example:7420"]);
        let (mut sender, mut sockets) = (test_sender(&[]), Sockets::default());
        assert_eq!(names.apply(found(0, &[x]), &mut sender, &mut sockets), None);
        assert_eq!(names.apply(found(1, &[w]), &mut sender, &mut sockets), None);
        let ack = |hb: &[u8; proto::LEN], iv| {
            let mut a = *hb;
            proto::make_ack(&mut a, &KEY, iv);
            a
        };
        let hbs = sender.heartbeat(10_000_000, 0, false);
        sender
            .on_ack(&ack(&hbs[0].1, 200), sa(x), 11_000_000)
            .unwrap();
        sender
            .on_ack(&ack(&hbs[1].1, 2000), sa(w), 11_000_000)
            .unwrap();
        assert_eq!(sender.interval_ms(), 200);
        let before = sender.heartbeat(20_000_000, 0, false);
        assert_eq!(
            names.apply(found(0, &[y]), &mut sender, &mut sockets),
            Some((200, 2000))
        );
        assert_eq!(addrs(&sender), [sa(w), sa(y)]);
        let old = ack(&before[0].1, 100);
        assert_eq!(
            sender.on_ack(&old, sa(x), 21_000_000),
            Err(sender::AckReject::UnknownSource)
        );
        assert_eq!(
            sender.on_ack(&old, sa(y), 21_000_000),
            Err(sender::AckReject::UnknownSeq)
        );
        assert_eq!(sender.interval_ms(), 2000);
    }

    /// Each address gets one heartbeat, however many `--monitor`s lead to
    /// it, and keeps getting it while one still does.
    #[tokio::test]
    async fn an_address_several_monitors_lead_to_gets_one_heartbeat() {
        let (l, p, q, r) = (
            "198.18.0.1:7420",
            "198.18.0.2:7420",
            "198.18.0.3:7420",
            "198.18.0.4:7420",
        );
        // `--monitor 198.18.0.1:7420 --monitor a:7420 --monitor b:7420
        // --monitor c:7420`.
        let mut names = quiet(&["a:7420", "b:7420", "c:7420"]);
        let (mut sender, mut sockets) = (test_sender(&[l]), Sockets::default());
        for (report, want) in [
            // a leads to the address given, b and c to one address.
            (found(0, &[l]), vec![l]),
            (found(1, &[p]), vec![l, p]),
            (found(2, &[p]), vec![l, p]),
            // b moves; c still leads to p.
            (found(1, &[q]), vec![l, p, q]),
            // c moves to where b is: p goes, q is sent one heartbeat.
            (found(2, &[q, r]), vec![l, q]),
            // a moves; the address given stays.
            (found(0, &[r]), vec![l, q, r]),
            // b and c move back to p in turn: q stays until both left.
            (found(1, &[p]), vec![l, q, r, p]),
            (found(2, &[p]), vec![l, r, p]),
        ] {
            names.apply(report, &mut sender, &mut sockets);
            let want: Vec<SocketAddr> = want.iter().map(|s| sa(s)).collect();
            assert_eq!(addrs(&sender), want);
            assert_eq!(sender.heartbeat(1, 0, false).len(), want.len());
        }
    }

    #[test]
    fn the_address_in_use_is_kept_while_it_is_among_the_answers() {
        let (a, b, c) = (sa("198.18.0.1:1"), sa("198.18.0.2:1"), sa("[fd00::1]:1"));
        assert_eq!(pick(None, false, &[a, b]), Some(a));
        assert_eq!(pick(Some(b), false, &[a, b]), Some(b));
        assert_eq!(pick(Some(c), false, &[a, b]), Some(a));
        assert_eq!(pick(Some(a), false, &[]), None);
    }

    /// Unless its sends keep failing: then the first other answer, in
    /// the resolver's order or not (glibc puts an address without a
    /// route last), and the failing one only if nothing else is left.
    #[test]
    fn a_failing_address_is_given_up_for_another_answer() {
        let (v4, b, v6) = (sa("198.18.0.1:1"), sa("198.18.0.2:1"), sa("[fd00::1]:1"));
        assert_eq!(pick(Some(v4), true, &[v6, v4]), Some(v6));
        assert_eq!(pick(Some(v4), true, &[v4, v6]), Some(v6));
        assert_eq!(pick(Some(v4), true, &[v4, b, v6]), Some(b));
        assert_eq!(pick(Some(v4), true, &[b]), Some(b));
        assert_eq!(pick(Some(v4), true, &[v4]), Some(v4));
        assert_eq!(pick(Some(v4), true, &[]), None);
        assert_eq!(pick(None, true, &[v4, v6]), Some(v4));
    }

    #[test]
    fn early_lookups_back_off_from_three_seconds_to_a_minute() {
        let secs: Vec<u64> = (0..8).map(|k| early_delay(k).as_secs()).collect();
        assert_eq!(secs, [3, 6, 12, 24, 48, 60, 60, 60]);
        assert_eq!(early_delay(u32::MAX), RESOLVE_PERIOD);
    }

    /// `mon` has an IPv4 and an IPv6 address, IPv4 first, and the IPv4
    /// route goes away: every send to it fails. After EARLY_RESOLVE of
    /// failures the name is looked up at once (not a minute later), and
    /// the IPv6 address takes over, the IPv4 one still among the answers
    /// (it was kept, every send failing, for good). A send that fails now
    /// and then moves nothing, nor does a rotation while sends leave.
    #[tokio::test]
    async fn a_name_whose_address_keeps_failing_is_resolved_early_and_moves() {
        let (v4, v6) = (sa("198.18.0.1:7420"), sa("[fd00::1]:7420"));
        let mut names = quiet(&["mon:7420"]);
        let (mut sender, mut sockets) = (test_sender(&[]), Sockets::default());
        names.apply(
            found(0, &["198.18.0.1:7420", "[fd00::1]:7420"]),
            &mut sender,
            &mut sockets,
        );
        assert_eq!(addrs(&sender), [v4]);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // One heartbeat at `t`, whose send to monitor 0 fails or leaves;
        // the early lookups then asked for.
        let beat = |sender: &mut Sender, names: &mut Names, t: Duration, ok: bool| {
            sender.heartbeat(1, 0, false);
            if ok {
                sender.send_ok(0);
            } else {
                sender.send_failed(0);
            }
            names.watch_sends(sender, t0 + t)
        };
        // A send that failed and the next left: no early lookup, and a
        // rotated answer moves nothing.
        assert!(beat(&mut sender, &mut names, s(0), false).is_empty());
        assert!(beat(&mut sender, &mut names, s(1), true).is_empty());
        assert!(beat(&mut sender, &mut names, s(4), true).is_empty());
        names.apply(
            found(0, &["[fd00::1]:7420", "198.18.0.1:7420"]),
            &mut sender,
            &mut sockets,
        );
        assert_eq!(addrs(&sender), [v4]);
        // The route goes: sends fail from 10 s on, one a second. Not
        // failing for long, a lookup keeps the address.
        for t in 10..13 {
            assert!(beat(&mut sender, &mut names, s(t), false).is_empty(), "{t}");
        }
        names.apply(
            found(0, &["[fd00::1]:7420", "198.18.0.1:7420"]),
            &mut sender,
            &mut sockets,
        );
        assert_eq!(addrs(&sender), [v4]);
        // Failing for 3 s: looked up now, once.
        assert_eq!(beat(&mut sender, &mut names, s(13), false), [0]);
        assert!(beat(&mut sender, &mut names, s(14), false).is_empty());
        // The answer, the IPv4 address still in it: IPv6 takes over.
        names.apply(
            found(0, &["[fd00::1]:7420", "198.18.0.1:7420"]),
            &mut sender,
            &mut sockets,
        );
        assert_eq!(addrs(&sender), [v6]);
        // A send to it leaves: the outage is over, and the IPv4 address,
        // first again, moves nothing.
        assert!(beat(&mut sender, &mut names, s(15), true).is_empty());
        assert_eq!(names.names[0].early, None);
        names.apply(
            found(0, &["198.18.0.1:7420", "[fd00::1]:7420"]),
            &mut sender,
            &mut sockets,
        );
        assert_eq!(addrs(&sender), [v6]);
        // Both fail (the link is down): the name is looked up 3 s into
        // it, then 6, 12, 24, 48 s after each, then every minute; the
        // address flips at each answer; none of it more often.
        let mut asked = Vec::new();
        for t in 100..400 {
            if beat(&mut sender, &mut names, s(t), false) == [0] {
                names.apply(
                    found(0, &["198.18.0.1:7420", "[fd00::1]:7420"]),
                    &mut sender,
                    &mut sockets,
                );
                asked.push((t, addrs(&sender)[0]));
            }
        }
        assert_eq!(
            asked,
            [
                (103, v4),
                (109, v6),
                (121, v4),
                (145, v6),
                (193, v4),
                (253, v6),
                (313, v4),
                (373, v6)
            ]
        );
    }

    #[test]
    fn a_key_file_must_be_private_and_small() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("node.key");
        std::fs::write(&path, "6df25b19dd0205345e893133518757d6\n").unwrap();
        let chmod = |mode: u32| {
            std::fs::set_permissions(
                &path,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
            )
            .unwrap()
        };
        for mode in [0o644, 0o640, 0o604, 0o660] {
            chmod(mode);
            let e = format!("{:#}", read_key_file(&path).unwrap_err());
            let p = path.display();
            assert_eq!(
                e,
                format!(
                    "key file {p} has mode {mode:04o}: users other than its owner may get at the node key; run `chmod 600 {p}` (and, if the sender runs as another user, `chown` it to that user)"
                )
            );
        }
        for mode in [0o600, 0o400] {
            chmod(mode);
            let k = read_key_file(&path).unwrap();
            assert_eq!(k, parse_key("6df25b19dd0205345e893133518757d6").unwrap());
        }
        // Too big, a file or not: refused after KEY_FILE_MAX bytes.
        chmod(0o600);
        std::fs::write(&path, " ".repeat(KEY_FILE_MAX as usize + 1)).unwrap();
        for p in [&path, Path::new("/dev/zero")] {
            let e = format!("{:#}", read_key_file(p).unwrap_err());
            assert!(e.contains("holds more than 4096 bytes"), "{e}");
        }
        std::fs::write(&path, b"\xff\xfe").unwrap();
        let e = format!("{:#}", read_key_file(&path).unwrap_err());
        assert!(e.contains("bad key in") && e.contains("not text"), "{e}");
    }

    #[test]
    fn load_is_per_cpu_permille_and_capped() {
        assert_eq!(load_from("0.50 0.40 0.30 1/100 42\n", 2), Some(250));
        assert_eq!(load_from("7.00 0 0 1/1 1", 2), Some(1000));
        assert_eq!(load_from("0.00 0 0 1/1 1", 4), Some(0));
        assert_eq!(load_from("garbage", 1), None);
        assert_eq!(load_from("", 1), None);
        assert!(load_permille(online_cpus()) <= 1000);
    }

    /// `/proc/loadavg` as the kernel writes it (`fs/proc/loadavg.c`) for
    /// a 1-minute average of `avenrun` (11-bit fixed point).
    fn proc_loadavg(avenrun: u64) -> String {
        let x = avenrun + (1 << 11) / 200;
        format!(
            "{}.{:02} 0.00 0.00 1/100 42\n",
            x >> 11,
            ((x & 2047) * 100) >> 11
        )
    }

    /// sysinfo(2) gives the load the file prints, in another fixed point
    /// and not rounded: the value sent is the file's, to the permille, at
    /// every load from 0 to 256 and at the extremes, over any CPU count.
    #[test]
    fn the_load_from_sysinfo_is_the_load_proc_loadavg_gave() {
        let extremes = [u64::MAX >> 5, (1 << 40) + 12_345];
        for avenrun in (0..=256u64 << 11).chain(extremes) {
            let (text, si) = (proc_loadavg(avenrun), avenrun << 5);
            for cpus in [1, 2, 3, 4, 7, 12, 64, 0] {
                assert_eq!(
                    load_from_fixed(si, cpus),
                    load_from(&text, cpus).unwrap(),
                    "{text:?} over {cpus} CPUs"
                );
            }
        }
    }

    /// The same against this host's kernel: `/proc/loadavg` read before
    /// and after `sysinfo(2)` (the average moves every 5 s), the same
    /// text and value.
    #[test]
    fn this_kernel_s_sysinfo_load_prints_as_its_proc_loadavg() {
        for _ in 0..20 {
            let before = std::fs::read_to_string("/proc/loadavg").unwrap();
            // SAFETY: as in `load_permille`.
            let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::sysinfo(&mut info) }, 0);
            let after = std::fs::read_to_string("/proc/loadavg").unwrap();
            let one = |t: &str| t.split_whitespace().next().unwrap().to_owned();
            if one(&before) != one(&after) {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let avenrun = info.loads[0] as u64 >> 5;
            assert_eq!(one(&proc_loadavg(avenrun)), one(&before));
            for cpus in [1, 2, online_cpus()] {
                assert_eq!(
                    load_from_fixed(info.loads[0] as u64, cpus),
                    load_from(&before, cpus).unwrap()
                );
            }
            return;
        }
        panic!("/proc/loadavg changed at every one of 20 reads");
    }

    /// This thread's read calls so far (`/proc/thread-self/io`; reading
    /// it costs a read or two of its own).
    fn reads_so_far() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("syscr: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The load is sent with every heartbeat: it reads no file (five
    /// system calls a heartbeat, two of them reads, for /proc/loadavg).
    #[test]
    fn the_load_costs_a_heartbeat_no_file_read() {
        let before = reads_so_far();
        for _ in 0..100 {
            assert!(load_permille(2) <= 1000);
        }
        let reads = reads_so_far() - before;
        assert!(reads < 10, "{reads} reads for 100 loads");
    }

    /// The load average is the host's: it is spread over the host's CPUs,
    /// not over this process's share of them. Pinned to one CPU (as a
    /// container limited to one is), the count stays the host's.
    #[test]
    fn load_is_spread_over_the_online_cpus_not_this_process_share() {
        let online = online_from_sysfs();
        // SAFETY: plain cpu_set_t values; sched_{get,set}affinity(0, ..)
        // act on this test's thread only.
        unsafe {
            let size = std::mem::size_of::<libc::cpu_set_t>();
            let mut was: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(libc::sched_getaffinity(0, size, &mut was), 0);
            let first = (0..libc::CPU_SETSIZE as usize)
                .find(|&c| libc::CPU_ISSET(c, &was))
                .expect("some CPU allowed");
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(first, &mut one);
            assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
            let share = std::thread::available_parallelism().unwrap().get();
            let got = online_cpus();
            assert_eq!(libc::sched_setaffinity(0, size, &was), 0);
            assert_eq!(share, 1, "pinned");
            assert_eq!(got, online);
        }
    }

    /// The CPUs `/sys/devices/system/cpu/online` lists (`0-3,8`).
    fn online_from_sysfs() -> usize {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        text.trim()
            .split(',')
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum()
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}

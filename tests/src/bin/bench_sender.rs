//! What `hb send` costs the host it runs on (`cargo xtask bench sender`, or
//! `cargo build --release -p hb-user && cargo run --release -p hb-tests --bin bench_sender`,
//! as root): CPU per heartbeat, wake-ups, system calls, memory, threads
//! and descriptors of the real sender, at 10 Hz (its fastest interval) and
//! at 1 Hz (its default), against a floor measured in the same run.
//!
//! The link: two namespaces joined by a veth pair ([`Link`]: threaded
//! NAPI at both ends, so that the kernel's receive work runs in its own
//! threads and not inside the sender's `sendto`). In `a`, a release `hb
//! monitor` in native XDP mode answering every heartbeat (`--ack`) with no
//! controller (`--controller off`: it never asks a node for another
//! interval, so each sender keeps its rate); in `b`, `hb_pass` on the node
//! end so the gate's XDP_TX'd ACKs arrive, and the senders.
//!
//! Four processes per round, started together and run side by side, each
//! its own node id:
//! - `hb send` at 100 ms and at 1000 ms (`--key-file`, `--state-dir`, as
//!   the README's unit runs it; `HB_LOG=info`, logging nothing between its
//!   start and exit lines);
//! - the floor at the same two rates: this binary re-executed as the least
//!   a heartbeat can cost. It sends the same 48-byte datagram (pre-sealed
//!   before the measurement, one per seq, so it does no cryptography while
//!   measured) with one `sendto` on an unconnected UDP socket on the same
//!   drift-free schedule, and waits for the ACK as `hb send` does, in the
//!   one call that also waits for the next send (`ppoll` on the socket with
//!   the time left as timeout; `hb send` uses epoll through tokio), reading
//!   it with one `recv`. It does not check the ACK (`hb send` verifies its
//!   tag and takes an RTT sample from it).
//!
//! Measured over a window of `--secs` seconds that starts after a warm-up,
//! per process, all its threads: CPU time from `/proc/PID/task/*/schedstat`
//! (the scheduler's exact run time in ns, the sum of utime and stime; the
//! clock-tick utime and stime of `/proc/PID/stat` would read 0 at 1 Hz),
//! voluntary context switches (the wake-ups: each is a sleep that
//! ended) and involuntary ones, from `/proc/PID/task/*/status`; at the
//! window's end VmRSS, RssAnon, VmHWM, Threads and the open descriptors;
//! at exit the whole life's utime and stime from `wait4` (start-up and the
//! LEAVING heartbeat included). System calls are counted in a separate
//! window after the last round's (`perf stat -e raw_syscalls:sys_enter`: a
//! per-task perf event costs the traced process time at every context
//! switch, so it is kept out of the CPU figures); without `perf` that
//! column says so. Heartbeats per window = the window over the interval
//! (the schedule is drift-free: a window of a whole number of intervals
//! holds exactly that many sends); the monitor's per-node `accepted` and
//! `acks_sent`, the sender's exit line and the floor's own counts check
//! that every heartbeat was answered. The node end's NAPI thread (the
//! kernel receiving the ACKs, for all four alike) is reported per ACK.
//!
//! The machine is shared: the load average is printed at the start and the
//! end, and every figure is the median over the rounds with its range.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::programs::{Xdp, XdpMode};
use hb::dataplane::xdp::{XdpDataplane, XdpOptions};
use hb_common::{Datagram, Kind, NodeKey, maps::names};
use hb_tests::{
    bench::{kthreads, loadavg, mac, summary},
    drive::{http_get, try_hb_bin},
    frames::{MAC_MONITOR, MAC_NODE},
    netns::{NetNs, sh},
};
use serde_json::Value;

const PORT: u16 = 7420;
const MONITOR_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const LISTEN: &str = "127.0.0.1:9420";
const EPOCH: u8 = 1;
/// The intervals measured: `hb send`'s fastest (`--min-interval-ms`'s
/// default) and its default.
const INTERVALS_MS: [u64; 2] = [100, 1000];
/// From a sender's start to its window: the key read, the runtime up,
/// the first heartbeats answered.
const WARMUP: Duration = Duration::from_millis(1500);
/// How long any process here may take to exit once told to.
const EXIT_WITHIN: Duration = Duration::from_secs(10);
/// The floor's bound on its own life, whatever happens to this process.
const FLOOR_MAX_SECS: u64 = 300;

fn secret() -> [u8; 32] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(29).wrapping_add(3))
}

fn node_key(node: u32) -> NodeKey {
    NodeKey::from_bytes(&hb::keys::derive_node_key(&secret(), node, EPOCH))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Hb,
    Floor,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Hb => "`hb send`",
            Who::Floor => "floor",
        }
    }
}

struct Opts {
    rounds: usize,
    secs: u64,
    syscall_secs: u64,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        rounds: 3,
        secs: 10,
        syscall_secs: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| -> anyhow::Result<u64> {
            args.next()
                .with_context(|| format!("{what} needs a value"))?
                .parse()
                .with_context(|| format!("{what}: not a whole number"))
        };
        match a.as_str() {
            "--rounds" => o.rounds = val("--rounds")? as usize,
            "--secs" => o.secs = val("--secs")?,
            "--syscall-secs" => o.syscall_secs = val("--syscall-secs")?,
            _ => bail!(
                "unknown argument {a:?} (options: --rounds N, --secs S, --syscall-secs S; \
                 whole seconds, so that a window holds a whole number of 1 s heartbeats)"
            ),
        }
    }
    ensure!((1..=20).contains(&o.rounds), "--rounds must be 1 to 20");
    ensure!((1..=120).contains(&o.secs), "--secs must be 1 to 120");
    ensure!(
        o.syscall_secs <= 120,
        "--syscall-secs must be at most 120 (0: no syscall count)"
    );
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    // The floor's own process: nothing else runs in it.
    if std::env::args().nth(1).as_deref() == Some("--floor") {
        return floor::run(std::env::args().skip(2).collect());
    }
    let o = opts()?;
    ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "bench_sender needs root (namespaces, XDP)"
    );
    let started = Instant::now();
    let load_start = loadavg();
    let hb = try_hb_bin()?;
    let dir = std::env::temp_dir().join(format!("hb-bench-sender-{}", std::process::id()));
    let _dir = Scratch::new(&dir)?;
    let link = Link::new()?;
    // hb_pass on the node end: XDP_TX'd frames reach a veth peer only
    // through an XDP program there.
    let pass = link.b.run(|| {
        XdpDataplane::open(&XdpOptions {
            max_nodes: Some(16),
            ..XdpOptions::default()
        })
    })??;
    link.b
        .run(|| {
            let mut ebpf = pass.ebpf();
            let p: &mut Xdp = ebpf
                .program_mut(names::PASS)
                .context("hb_pass in hb's object")?
                .try_into()?;
            p.attach(&link.if_b, XdpMode::Driver)
                .map(drop)
                .context("attach hb_pass to the node end")
        })
        .context("enter the node namespace")??;
    let nodes = (o.rounds * 4) as u32;
    let monitor = Monitor::start(&link, &hb, &dir, nodes)?;
    let to = SocketAddr::from((MONITOR_ADDR, PORT));

    let mut samples: Vec<Sample> = Vec::new();
    let mut syscalls: Vec<(u64, Who, Option<f64>)> = Vec::new();
    // The node end's NAPI thread, µs per ACK it received, per round.
    let mut napi: Vec<f64> = Vec::new();
    for round in 0..o.rounds {
        let last = round + 1 == o.rounds;
        let mut procs = Vec::new();
        for (i, (iv, kind)) in INTERVALS_MS
            .iter()
            .flat_map(|&iv| [(iv, Who::Hb), (iv, Who::Floor)])
            .enumerate()
        {
            let node = (round * 4 + i + 1) as u32;
            procs.push(Proc::start(&link.b, &hb, &dir, kind, node, iv, to)?);
        }
        std::thread::sleep(WARMUP);
        for p in &mut procs {
            p.alive()?;
        }
        let t0 = Instant::now();
        let before: Vec<Usage> = procs.iter().map(|p| Usage::read(p.pid())).collect();
        let napi0 = link.napi_ns();
        std::thread::sleep(Duration::from_secs(o.secs));
        let after: Vec<Usage> = procs.iter().map(|p| Usage::read(p.pid())).collect();
        let napi1 = link.napi_ns();
        let window = t0.elapsed().as_secs_f64();
        let acks: u64 = procs.iter().map(|p| o.secs * 1000 / p.interval_ms).sum();
        napi.push((napi1.saturating_sub(napi0)) as f64 / 1e3 / acks as f64);
        let mem: Vec<Memory> = procs.iter().map(|p| Memory::read(p.pid())).collect();
        if last && o.syscall_secs > 0 {
            let counts = count_syscalls(&procs, o.syscall_secs, &dir);
            for (p, c) in procs.iter().zip(counts) {
                let hbs = (o.syscall_secs * 1000 / p.interval_ms) as f64;
                syscalls.push((p.interval_ms, p.kind, c.map(|c| c as f64 / hbs)));
            }
        }
        for (((mut p, b), a), m) in procs.into_iter().zip(before).zip(after).zip(mem) {
            let life = p.stop()?;
            let row = monitor.node(p.node)?;
            // Every heartbeat answered, as the process itself counted and
            // as the monitor did: all but the last (`hb send`'s LEAVING
            // one, the floor's just before its stop) and 5% of the rest.
            ensure!(
                life.sent > 1 && life.acks + 1 + life.sent / 20 >= life.sent,
                "{} at {} ms (node {}): {} of {} heartbeats answered: are ACKs reaching the \
                 node end (hb_pass)?\n{}",
                p.kind.name(),
                p.interval_ms,
                p.node,
                life.acks,
                life.sent,
                p.log()
            );
            ensure!(
                row.accepted + 1 >= life.sent && row.acks_sent > 0,
                "node {}: the monitor accepted {} and answered {} of {} sent",
                p.node,
                row.accepted,
                row.acks_sent,
                life.sent
            );
            let hbs = (o.secs * 1000 / p.interval_ms) as f64;
            samples.push(Sample {
                round,
                node: p.node,
                kind: p.kind,
                interval_ms: p.interval_ms,
                window,
                heartbeats: hbs,
                cpu_ns: a.cpu_ns.saturating_sub(b.cpu_ns),
                vcsw: a.vcsw.saturating_sub(b.vcsw),
                ivcsw: a.ivcsw.saturating_sub(b.ivcsw),
                mem: m,
                life,
                monitor: row,
            });
        }
    }
    drop(monitor);
    let load_end = loadavg();
    report(
        &o,
        &samples,
        &syscalls,
        &napi,
        &load_start,
        &load_end,
        started.elapsed(),
    );
    Ok(())
}

/// A scratch directory (keyring, key files, state directories, logs),
/// removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path) -> anyhow::Result<Scratch> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Scratch(dir.to_owned()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` to `path`, private to its owner (as hb asks of keys).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

/// The link: namespace `a` holds the monitor end `if_a` (198.18.0.1) of a
/// veth pair whose node end `if_b` (198.18.0.2) is in namespace `b`, both
/// named after this process (so their NAPI threads are told from other
/// runs'), static neighbours (no ARP), GRO on and threaded NAPI at both
/// ends: the receive work of a frame runs in its end's kernel thread, not
/// in whichever process sent it. Without that, veth runs the monitor end's
/// receive (its XDP gate, the XDP_TX of the ACK) and the node end's receive
/// of the ACK inside the sender's `sendto`, and the sender's CPU time would
/// hold the monitor's work; on a real NIC a send ends at the driver's ring.
struct Link {
    // `b` first: dropped before `a`.
    b: NetNs,
    a: NetNs,
    if_a: String,
    if_b: String,
    /// The NAPI threads of the node end: the kernel's receive of the ACKs.
    napi_b: Vec<i32>,
}

impl Link {
    fn new() -> anyhow::Result<Link> {
        let a = NetNs::new("sbencha")?;
        let b = NetNs::new("sbenchb")?;
        let pid = std::process::id();
        let (if_a, if_b) = (format!("sba{pid}"), format!("sbb{pid}"));
        a.ip(&[
            "link",
            "add",
            &if_a,
            "address",
            &mac(MAC_MONITOR),
            "type",
            "veth",
            "peer",
            "name",
            &if_b,
            "address",
            &mac(MAC_NODE),
            "netns",
            b.name(),
        ])?;
        for (ns, ifname, addr, peer, peer_mac) in [
            (&a, &if_a, MONITOR_ADDR, NODE_ADDR, MAC_NODE),
            (&b, &if_b, NODE_ADDR, MONITOR_ADDR, MAC_MONITOR),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
            ns.ip(&["link", "set", ifname, "up"])?;
            ns.ip(&[
                "neigh",
                "replace",
                &peer.to_string(),
                "lladdr",
                &mac(peer_mac),
                "dev",
                ifname,
                "nud",
                "permanent",
            ])?;
            // GRO on: veth polls the end with NAPI; threaded: in its own
            // kthread. `ip netns exec` remounts /sys for the namespace.
            sh(ns.command("ethtool").args(["-K", ifname, "gro", "on"]))
                .with_context(|| format!("GRO on {ifname} (ethtool)"))?;
            sh(std::process::Command::new("ip").args([
                "netns",
                "exec",
                ns.name(),
                "sh",
                "-c",
                &format!("echo 1 > /sys/class/net/{ifname}/threaded"),
            ]))
            .with_context(|| format!("threaded NAPI on {ifname}"))?;
        }
        let napi_b = kthreads(&format!("napi/{if_b}-"));
        ensure!(
            !napi_b.is_empty(),
            "no NAPI thread for {if_b} (threaded NAPI on veth needs Linux 5.13+)"
        );
        Ok(Link {
            b,
            a,
            if_a,
            if_b,
            napi_b,
        })
    }

    fn napi_ns(&self) -> u64 {
        self.napi_b
            .iter()
            .map(|&t| Usage::read_task(&format!("/proc/{t}")).0)
            .sum()
    }
}

/// The release `hb monitor`: native XDP, every heartbeat answered, no
/// controller. Stopped (SIGTERM, then SIGKILL) on drop, its pins removed.
struct Monitor<'a> {
    link: &'a Link,
    child: Child,
    stderr: PathBuf,
    pins: PathBuf,
}

/// A node's counts in the monitor's `/nodes/{id}`.
#[derive(Clone, Copy, Debug, Default)]
struct NodeCounts {
    accepted: u64,
    acks_sent: u64,
}

impl<'a> Monitor<'a> {
    fn start(link: &'a Link, hb: &Path, dir: &Path, nodes: u32) -> anyhow::Result<Monitor<'a>> {
        let ns = &link.a;
        let keyring = dir.join("keyring.toml");
        let hex = hb::keys::to_hex(&secret());
        write_private(
            &keyring,
            &format!("[[epoch]]\nid = {EPOCH}\nsecret = \"{hex}\"\n"),
        )?;
        let stderr = dir.join("monitor.stderr");
        let pins = PathBuf::from(format!("/sys/fs/bpf/hb-test-sbench-{}", std::process::id()));
        let child = ns
            .command(hb.to_str().context("hb's path is not UTF-8")?)
            .args(["monitor", "--mode", "native", "--iface", &link.if_a])
            .args(["--port", &PORT.to_string(), "--listen", LISTEN])
            .args(["--ack", "--controller", "off"])
            .arg("--pin-dir")
            .arg(&pins)
            .arg("--keyring")
            .arg(&keyring)
            .args(["--nodes", &format!("1-{nodes}")])
            .env("HB_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("start hb monitor")?;
        let mut m = Monitor {
            link,
            child,
            stderr,
            pins,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(ns, LISTEN, "/healthz") {
                return Ok(m);
            }
            if let Some(st) = m.child.try_wait()? {
                bail!("monitor exited {st} at start:\n{}", m.log());
            }
            ensure!(
                Instant::now() < deadline,
                "monitor not healthy after 30 s:\n{}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn node(&self, id: u32) -> anyhow::Result<NodeCounts> {
        let (code, body) = http_get(&self.link.a, LISTEN, &format!("/nodes/{id}"))?;
        ensure!(code == 200, "GET /nodes/{id}: {code} {body}");
        let v: Value = serde_json::from_str(&body).with_context(|| format!("/nodes/{id}"))?;
        let n = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("/nodes/{id}: no {k}"))
        };
        Ok(NodeCounts {
            accepted: n("accepted")?,
            acks_sent: n("acks_sent")?,
        })
    }
}

impl Drop for Monitor<'_> {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(None) = self.child.try_wait() {
            eprintln!("bench_sender: monitor ignored SIGTERM; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// What a measured process did over its whole life: its own counts (the
/// sender's exit line, the floor's last line) and `wait4`'s times.
#[derive(Clone, Copy, Debug, Default)]
struct Life {
    sent: u64,
    acks: u64,
    utime_us: u64,
    stime_us: u64,
}

/// One measured process (`hb send` or the floor), killed and reaped on
/// drop if [`Proc::stop`] did not reap it.
struct Proc {
    kind: Who,
    node: u32,
    interval_ms: u64,
    child: Child,
    reaped: bool,
    log: PathBuf,
}

impl Proc {
    fn start(
        ns: &NetNs,
        hb: &Path,
        dir: &Path,
        kind: Who,
        node: u32,
        interval_ms: u64,
        to: SocketAddr,
    ) -> anyhow::Result<Proc> {
        let key = hb::keys::to_hex(&node_key(node).to_bytes());
        let log = dir.join(format!("node-{node}.log"));
        let mut cmd = match kind {
            Who::Hb => {
                let key_file = dir.join(format!("node-{node}.key"));
                write_private(&key_file, &format!("{key}\n"))?;
                let state = dir.join(format!("state-{node}"));
                std::fs::create_dir_all(&state)?;
                let mut c = ns.command(hb.to_str().context("hb's path is not UTF-8")?);
                c.arg("send")
                    .args(["--monitor", &to.to_string()])
                    .args(["--node-id", &node.to_string()])
                    .arg("--key-file")
                    .arg(&key_file)
                    .args(["--key-epoch", &EPOCH.to_string()])
                    .args(["--interval-ms", &interval_ms.to_string()])
                    .arg("--state-dir")
                    .arg(&state)
                    .env("HB_LOG", "info");
                c
            }
            Who::Floor => {
                let exe = std::env::current_exe().context("current_exe")?;
                let mut c = ns.command(exe.to_str().context("path not UTF-8")?);
                c.arg("--floor")
                    .arg(to.to_string())
                    .arg(node.to_string())
                    .arg(EPOCH.to_string())
                    .arg(&key)
                    .arg(interval_ms.to_string());
                c
            }
        };
        // Nothing inherits this process' stdout (`cargo xtask bench` reads
        // it to its end).
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {} for node {node}", kind.name()))?;
        Ok(Proc {
            kind,
            node,
            interval_ms,
            child,
            reaped: false,
            log,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error, with its log, if it has exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            self.reaped = true;
            bail!(
                "{} for node {} exited {st} at start:\n{}",
                self.kind.name(),
                self.node,
                self.log()
            );
        }
        Ok(())
    }

    /// SIGTERM (`hb send` sends its LEAVING heartbeat and exits 0, the
    /// floor prints its counts and exits 0), reaped with `wait4` for its
    /// times.
    fn stop(&mut self) -> anyhow::Result<Life> {
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_WITHIN;
        let (status, ru) = loop {
            let mut status = 0;
            // SAFETY: a zeroed rusage is valid; wait4 fills it.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own child with valid pointers.
            let r = unsafe { libc::wait4(self.pid(), &mut status, libc::WNOHANG, &mut ru) };
            ensure!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
            if r == self.pid() {
                self.reaped = true;
                break (status, ru);
            }
            ensure!(
                Instant::now() < deadline,
                "{} for node {} still running {EXIT_WITHIN:?} after SIGTERM",
                self.kind.name(),
                self.node
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = self.log();
        ensure!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{} for node {} ended with status {status:#x}:\n{log}",
            self.kind.name(),
            self.node
        );
        let field = |name: &str| -> anyhow::Result<u64> {
            let last = log.lines().last().unwrap_or("");
            last.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .with_context(|| format!("no {name}= in the last line of:\n{log}"))
        };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        Ok(Life {
            sent: field("sent")?,
            acks: field(match self.kind {
                Who::Hb => "acks",
                Who::Floor => "replies",
            })?,
            utime_us: us(ru.ru_utime),
            stime_us: us(ru.ru_stime),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Cumulative counters of a process, all its threads.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_ns: u64,
    vcsw: u64,
    ivcsw: u64,
}

impl Usage {
    fn read(pid: i32) -> Usage {
        let mut u = Usage::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return u;
        };
        for t in tasks.flatten() {
            let (cpu_ns, vcsw, ivcsw) = Usage::read_task(&t.path().to_string_lossy());
            u.cpu_ns += cpu_ns;
            u.vcsw += vcsw;
            u.ivcsw += ivcsw;
        }
        u
    }

    /// Run time (ns), voluntary and involuntary switches of the task
    /// whose `/proc` directory is `dir`.
    fn read_task(dir: &str) -> (u64, u64, u64) {
        let cpu_ns = std::fs::read_to_string(format!("{dir}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let status = std::fs::read_to_string(format!("{dir}/status")).unwrap_or_default();
        (
            cpu_ns,
            status_field(&status, "voluntary_ctxt_switches:"),
            status_field(&status, "nonvoluntary_ctxt_switches:"),
        )
    }
}

/// The number after `key` in a `/proc/.../status` text (kB for memory).
fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A process' memory, threads and descriptors at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    rss_kib: u64,
    anon_kib: u64,
    hwm_kib: u64,
    threads: u64,
    fds: u64,
}

impl Memory {
    fn read(pid: i32) -> Memory {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        Memory {
            rss_kib: status_field(&s, "VmRSS:"),
            anon_kib: status_field(&s, "RssAnon:"),
            hwm_kib: status_field(&s, "VmHWM:"),
            threads: status_field(&s, "Threads:"),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64),
        }
    }
}

/// System calls each of `procs` makes in `secs` seconds, counted by
/// `perf stat` (all run at once); `None` where perf is missing or failed.
fn count_syscalls(procs: &[Proc], secs: u64, dir: &Path) -> Vec<Option<u64>> {
    let runs: Vec<_> = procs
        .iter()
        .map(|p| {
            let out = dir.join(format!("perf-{}.csv", p.node));
            let child = std::process::Command::new("perf")
                .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-o"])
                .arg(&out)
                .args(["-p", &p.pid().to_string(), "--", "sleep", &secs.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            (child, out)
        })
        .collect();
    runs.into_iter()
        .map(|(child, out)| {
            let mut child = child.ok()?;
            let deadline = Instant::now() + Duration::from_secs(secs) + EXIT_WITHIN;
            let st = loop {
                if let Some(st) = child.try_wait().ok()? {
                    break st;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if !st.success() {
                return None;
            }
            let text = std::fs::read_to_string(out).ok()?;
            let line = text
                .lines()
                .find(|l| l.contains("raw_syscalls:sys_enter"))?;
            let count = line.split(',').next()?;
            // A task that never ran while counted.
            if count == "<not counted>" {
                return Some(0);
            }
            count.parse().ok()
        })
        .collect()
}

/// One process' window in one round.
struct Sample {
    round: usize,
    node: u32,
    kind: Who,
    interval_ms: u64,
    window: f64,
    heartbeats: f64,
    cpu_ns: u64,
    vcsw: u64,
    ivcsw: u64,
    mem: Memory,
    life: Life,
    monitor: NodeCounts,
}

impl Sample {
    fn cpu_us_per_hb(&self) -> f64 {
        self.cpu_ns as f64 / 1e3 / self.heartbeats
    }
    fn wakeups_per_s(&self) -> f64 {
        self.vcsw as f64 / self.window
    }
}

/// `median (min-max)` of `xs` with `prec` decimals.
fn spread(xs: &[f64], prec: usize) -> String {
    let (m, lo, hi) = summary(xs);
    format!("{m:.prec$} ({lo:.prec$}-{hi:.prec$})")
}

/// `min-max` of `xs` with `prec` decimals.
fn range(xs: &[f64], prec: usize) -> String {
    let (_, lo, hi) = summary(xs);
    format!("{lo:.prec$}-{hi:.prec$}")
}

/// (max - min) / median, percent.
fn noise(xs: &[f64]) -> f64 {
    let (m, lo, hi) = summary(xs);
    (hi - lo) / m * 100.0
}

fn rate_name(interval_ms: u64) -> String {
    format!("{} Hz", 1000 / interval_ms)
}

fn report(
    o: &Opts,
    samples: &[Sample],
    syscalls: &[(u64, Who, Option<f64>)],
    napi: &[f64],
    load_start: &str,
    load_end: &str,
    wall: Duration,
) {
    let of = |iv: u64, k: Who| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.interval_ms == iv && s.kind == k)
            .collect()
    };
    let col = |v: &[&Sample], f: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
        v.iter().map(|s| f(s)).collect()
    };
    let sys = |iv: u64, k: Who| -> Option<f64> {
        syscalls
            .iter()
            .find(|(i, kk, _)| *i == iv && *kk == k)
            .and_then(|s| s.2)
    };
    let mib = |kib: u64| kib as f64 / 1024.0;

    println!("## Sender footprint: `hb send` against a minimal sender\n");
    println!(
        "`cargo run --release -p hb-tests --bin bench_sender -- --rounds {} --secs {} \
         --syscall-secs {}` (after `cargo build --release -p hb-user`; `cargo xtask bench \
         sender` does both; as root). A release `hb monitor` (native XDP, `--ack`: every \
         heartbeat answered, `--controller off`: no interval requests) on one end of a veth \
         pair (threaded NAPI at both ends: the kernel's receive work runs in its own threads, \
         not inside the sender's `sendto`), `hb_pass` on the other end so its XDP_TX'd ACKs arrive there, and four \
         processes side by side on that end, each its own node: `hb send` at 100 ms (its \
         fastest) and at 1000 ms (its default), with `--key-file` and `--state-dir` as a \
         unit runs it, and the floor at the same two rates. Floor: the least a heartbeat can \
         cost, a minimal process (this benchmark re-executed) that sends the same 48-byte \
         datagram, pre-sealed, with one `sendto` on the same schedule, and waits for the ACK \
         in the same call that waits for the next send (`ppoll`; `hb send` waits in epoll \
         through tokio), reading it with one `recv` without checking it (`hb send` verifies \
         the ACK's tag and takes an RTT sample). {} rounds, a fresh set of processes each, \
         measured over {} s after a {:.1} s warm-up; median (min-max) over the rounds. Load \
         average {load_start} at the start, {load_end} at the end; wall time {:.0} s.\n",
        o.rounds,
        o.secs,
        o.syscall_secs,
        o.rounds,
        o.secs,
        WARMUP.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "| rate | process | **CPU µs per heartbeat** | CPU % of one core | wake-ups/s \
         (voluntary context switches) | preempted/s (involuntary) | syscalls per heartbeat \
         | RSS MiB | private MiB (RssAnon) | peak RSS MiB (VmHWM) | threads | open fds | ACKs / \
         heartbeats (whole life) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &iv in &INTERVALS_MS {
        for k in [Who::Hb, Who::Floor] {
            let v = of(iv, k);
            if v.is_empty() {
                continue;
            }
            let (sent, acks) = v
                .iter()
                .fold((0, 0), |(s, a), x| (s + x.life.sent, a + x.life.acks));
            println!(
                "| {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} | {} | {} | {acks} / {sent} |",
                rate_name(iv),
                k.name(),
                spread(&col(&v, &Sample::cpu_us_per_hb), 1),
                spread(&col(&v, &|s| s.cpu_ns as f64 / 1e9 / s.window * 100.0), 3),
                spread(&col(&v, &Sample::wakeups_per_s), 1),
                spread(&col(&v, &|s| s.ivcsw as f64 / s.window), 2),
                sys(iv, k).map_or_else(|| "- (no perf)".to_owned(), |x| format!("{x:.1}")),
                spread(&col(&v, &|s| mib(s.mem.rss_kib)), 2),
                spread(&col(&v, &|s| mib(s.mem.anon_kib)), 2),
                spread(&col(&v, &|s| mib(s.mem.hwm_kib)), 2),
                spread(&col(&v, &|s| s.mem.threads as f64), 0),
                spread(&col(&v, &|s| s.mem.fds as f64), 0),
            );
        }
    }
    println!();

    // The ratios, per round (both processes ran side by side), then their
    // median.
    let ratio = |iv: u64, f: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
        (0..o.rounds)
            .filter_map(|r| {
                let get = |k| {
                    samples
                        .iter()
                        .find(|s| s.round == r && s.interval_ms == iv && s.kind == k)
                };
                Some(f(get(Who::Hb)?) / f(get(Who::Floor)?))
            })
            .collect()
    };
    let mut lines = Vec::new();
    for &iv in &INTERVALS_MS {
        let cpu = ratio(iv, &Sample::cpu_us_per_hb);
        let above: Vec<f64> = (0..o.rounds)
            .filter_map(|r| {
                let get = |k| {
                    samples
                        .iter()
                        .find(|s| s.round == r && s.interval_ms == iv && s.kind == k)
                };
                Some(get(Who::Hb)?.cpu_us_per_hb() - get(Who::Floor)?.cpu_us_per_hb())
            })
            .collect();
        let wake = ratio(iv, &Sample::wakeups_per_s);
        let rss = ratio(iv, &|s| s.mem.rss_kib as f64);
        let anon = ratio(iv, &|s| s.mem.anon_kib as f64);
        let sys = match (sys(iv, Who::Hb), sys(iv, Who::Floor)) {
            (Some(h), Some(f)) if f > 0.0 => format!(", syscalls {:.1}x", h / f),
            _ => String::new(),
        };
        lines.push(format!(
            "{}: **CPU {:.1}x** ({}; {} µs per heartbeat above the floor), wake-ups {:.2}x ({}){sys}, \
             RSS {:.1}x, private memory {:.1}x",
            rate_name(iv),
            summary(&cpu).0,
            range(&cpu, 1),
            spread(&above, 0),
            summary(&wake).0,
            range(&wake, 2),
            summary(&rss).0,
            summary(&anon).0,
        ));
    }
    println!(
        "**`hb send` / floor** (median over the rounds of the ratio in each round, its range in \
         brackets): {}.\n",
        lines.join("; ")
    );

    // What an operator asks: per host, per hour, and how sure that is.
    let mut per_host = Vec::new();
    for &iv in &INTERVALS_MS {
        let v = of(iv, Who::Hb);
        if v.is_empty() {
            continue;
        }
        let cpu_s = col(&v, &|s| s.cpu_ns as f64 / 1e9 / s.window);
        let (m, lo, hi) = summary(&cpu_s);
        let rss = summary(&col(&v, &|s| mib(s.mem.rss_kib))).0;
        per_host.push(format!(
            "at {} about {:.1} s of CPU per hour ({:.1}-{:.1}; {:.3}% of one core), {:.0} \
             wake-ups/s, {rss:.1} MiB resident",
            rate_name(iv),
            m * 3600.0,
            lo * 3600.0,
            hi * 3600.0,
            m * 100.0,
            summary(&col(&v, &Sample::wakeups_per_s)).0,
        ));
    }
    println!(
        "Per host, `hb send` costs {}. Besides, the kernel receives each ACK (the node end's \
         NAPI thread, counted for neither process: veth, GRO, `hb_pass`, IP, UDP, the socket \
         and the wake-up): {} µs per ACK, the same for both.\n",
        per_host.join("; "),
        spread(napi, 1)
    );

    let mut noisy = Vec::new();
    for &iv in &INTERVALS_MS {
        for k in [Who::Hb, Who::Floor] {
            let v = of(iv, k);
            if v.len() > 1 {
                noisy.push(format!(
                    "{} {} {:.0}%",
                    k.name(),
                    rate_name(iv),
                    noise(&col(&v, &Sample::cpu_us_per_hb))
                ));
            }
        }
    }
    if !noisy.is_empty() {
        println!(
            "Noise: CPU per heartbeat varied between rounds by (max - min) / median = {}; the \
             machine is shared (load average above), so read the CPU figures to no better \
             than that, and the ratios likewise; at 1 Hz a round holds only {} heartbeats (rerun the command to \
             see how far separate runs differ). Memory, threads and descriptors do not depend \
             on the load; syscall counts are from the last round only (`perf stat -e \
             raw_syscalls:sys_enter`, {} s, after its CPU window: perf's per-task events would \
             add to the CPU measured).\n",
            noisy.join(", "),
            o.secs,
            o.syscall_secs
        );
    }

    println!("Per round:\n");
    println!(
        "| round | rate | process | node | CPU ms in the window | heartbeats in the window | \
         voluntary / involuntary switches | whole life: CPU ms (wait4) | whole life: \
         sent / answered | monitor: accepted / ACKs sent |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in samples {
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.0} | {} / {} | {:.1} | {} / {} | {} / {} |",
            s.round + 1,
            rate_name(s.interval_ms),
            s.kind.name(),
            s.node,
            s.cpu_ns as f64 / 1e6,
            s.heartbeats,
            s.vcsw,
            s.ivcsw,
            (s.life.utime_us + s.life.stime_us) as f64 / 1e3,
            s.life.sent,
            s.life.acks,
            s.monitor.accepted,
            s.monitor.acks_sent,
        );
    }
    println!();
    println!(
        "CPU = the scheduler's run time of every thread (`/proc/PID/task/*/schedstat`, ns; \
         the same quantity as utime + stime, which `/proc/PID/stat` gives in 10 ms ticks) \
         over the window, divided by the heartbeats sent in it (the window over the \
         interval). Wake-ups = voluntary context switches (each is a sleep that ended: the \
         timer or an ACK). Whole life = utime + stime from exec to exit, start-up and the \
         LEAVING heartbeat included (the kernel splits the two by sampling ticks: at these \
         few ms the split means nothing). RSS includes the shared pages of the binary and libc (`hb` is one static \
         Rust binary of {} MiB); RssAnon is the process' own memory.",
        hb_size_mib()
    );
}

fn hb_size_mib() -> String {
    try_hb_bin()
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or_else(
            || "?".into(),
            |m| format!("{:.1}", m.len() as f64 / 1048576.0),
        )
}

/// The floor: the least a heartbeat can cost (see the module's doc).
mod floor {
    use super::*;

    static STOP: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_term(_: libc::c_int) {
        STOP.store(true, Ordering::Relaxed);
    }

    /// `ADDR:PORT NODE EPOCH KEY_HEX INTERVAL_MS`. Sends until SIGTERM (or
    /// [`FLOOR_MAX_SECS`]), then prints `sent=N replies=M` and exits 0.
    pub fn run(args: Vec<String>) -> anyhow::Result<()> {
        let [to, node, epoch, key, interval_ms] = args.as_slice() else {
            bail!("--floor ADDR:PORT NODE EPOCH KEY_HEX INTERVAL_MS");
        };
        let to: SocketAddr = to.parse()?;
        let node: u32 = node.parse()?;
        let epoch: u8 = epoch.parse()?;
        let interval_ms: u32 = interval_ms.parse()?;
        let key = NodeKey::from_bytes(
            &hb::keys::parse_hex::<{ hb::keys::NODE_KEY_LEN }>(key).context("KEY_HEX")?,
        );
        let generation = hb::send::generation::unix_seconds()?;
        // Every datagram sealed before the first is sent.
        let n = FLOOR_MAX_SECS * 1000 / u64::from(interval_ms) + 1;
        let frames: Vec<[u8; hb_common::proto::LEN]> = (1..=n)
            .map(|seq| {
                Datagram {
                    kind: Kind::Heartbeat,
                    node_id: node,
                    generation,
                    key_epoch: epoch,
                    flags: 0,
                    load: 0,
                    seq,
                    sent_ns: 0,
                    interval_ms,
                    rtt_us: 0,
                }
                .seal(&key)
            })
            .collect();
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
        let sock = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.set_nonblocking(true)?;
        let iv = Duration::from_millis(u64::from(interval_ms));
        let mut buf = [0u8; 64];
        let (mut sent, mut replies) = (0u64, 0u64);
        let mut next = Instant::now();
        'beats: for f in &frames {
            loop {
                if STOP.load(Ordering::Relaxed) {
                    break 'beats;
                }
                let Some(left) = next.checked_duration_since(Instant::now()) else {
                    break;
                };
                let ts = libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                };
                let mut pfd = libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, a valid timeout, no mask.
                let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
                if r > 0 && sock.recv(&mut buf).is_ok() {
                    replies += 1;
                }
            }
            if sock.send_to(f, to).is_ok() {
                sent += 1;
            }
            let due = next + iv;
            let now = Instant::now();
            next = if due > now { due } else { now + iv };
        }
        println!("floor node={node} sent={sent} replies={replies}");
        Ok(())
    }
}

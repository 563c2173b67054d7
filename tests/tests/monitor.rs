//! `hb monitor` end to end, in network namespaces: a real monitor process
//! on `veth-a` (namespace `a`), senders as UDP sockets in namespace `b`
//! building heartbeats with `hb-common`, events read from the JSON-lines
//! file, the HTTP API queried from inside `a`.
//!
//! Every behaviour test is a function of the monitor's `--mode`; the
//! `modes!` table at the bottom instantiates it per mode (userspace and
//! native XDP). `same_traffic_same_states_native_and_userspace` runs one
//! monitor of each mode side by side on the same datagrams and compares
//! their tables and events.
//!
//! The `hb` binary is found next to this test's executable (`target/<profile>/hb`;
//! `HB_BIN` overrides). `cargo test -p hb-tests` does not build it (it
//! uses whatever is there); `cargo xtask test` builds it first, with the
//! tests' profile; by hand: `cargo build -p hb-user --bin hb && cargo test
//! -p hb-tests --test monitor`.

use std::{
    net::{SocketAddr, UdpSocket},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use hb::{
    dataplane::xdp::{AttachMode, XdpDataplane, XdpOptions},
    keys::derive_node_key,
};
use hb_common::{Datagram, GateResult, Kind, NodeKey, maps::names, proto::FLAG_LEAVING};
use hb_tests::{
    drive::{EXIT_TIMEOUT, hb_bin, http_get, output_within},
    netns::{IF_A, IF_B, NetNs, VethPair},
};
use serde_json::Value;

const PORT: u16 = 7420;
const LISTEN: &str = "127.0.0.1:9420";
/// Heartbeat interval of the simulated senders.
const INTERVAL_MS: u64 = 50;

fn secret(epoch: u8) -> [u8; 32] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(epoch))
}

fn keyring_text(epochs: &[u8]) -> String {
    epochs
        .iter()
        .map(|e| {
            format!(
                "[[epoch]]\nid = {e}\nsecret = \"{}\"\n",
                secret(*e)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        })
        .collect()
}

/// Writes `text` to `path`, private to its owner: hb refuses a keyring
/// others may read.
fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

fn node_key(id: u32, epoch: u8) -> NodeKey {
    NodeKey::from_bytes(&derive_node_key(&secret(epoch), id, epoch))
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "hb-test-monitor-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Scratch {
    /// A bpffs pin directory private to this test (native mode): tests run
    /// in parallel and must not share the monitor's default pins.
    fn pins(&self) -> String {
        format!(
            "/sys/fs/bpf/hb-test-monitor-{}",
            self.0.file_name().unwrap().to_string_lossy()
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(self.pins());
    }
}

/// A running `hb monitor` in namespace `a`; killed on drop.
struct Monitor {
    child: Child,
    events: PathBuf,
    stderr: PathBuf,
    /// Its API address (in namespace `a`).
    listen: &'static str,
}

impl Monitor {
    /// A monitor on the test's heartbeat port and API address.
    fn start(pair: &VethPair, dir: &Scratch, mode: &str, extra: &[&str]) -> Monitor {
        Monitor::start_on(pair, dir, mode, PORT, LISTEN, extra)
    }

    /// A monitor on heartbeat port `port` with its API on `listen`; its
    /// events and stderr go to files in `dir`.
    fn start_on(
        pair: &VethPair,
        dir: &Scratch,
        mode: &str,
        port: u16,
        listen: &'static str,
        extra: &[&str],
    ) -> Monitor {
        let events = dir.path("events.jsonl");
        let stderr = dir.path("monitor.stderr");
        let mut cmd = pair.a.command(hb_bin().to_str().expect("utf-8 path"));
        cmd.args(["monitor", "--mode", mode, "--iface", IF_A])
            .args(["--port", &port.to_string(), "--listen", listen]);
        if mode != "userspace" && !extra.contains(&"--pin-dir") {
            cmd.args(["--pin-dir", &dir.pins()]);
        }
        cmd.arg("--keyring")
            .arg(dir.path("keyring.toml"))
            .arg("--events")
            .arg(&events)
            .args(if extra.contains(&"--tick-ms") {
                &[][..]
            } else {
                &["--tick-ms", "20"][..]
            })
            .args(extra)
            .env("HB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        // As a careless parent may leave them: SIGCHLD ignored (which
        // survives exec: the kernel would reap the hooks' shells before the
        // monitor could wait for them), and systemd's default soft limit of
        // 1024 open files. The monitor puts both right (`join` checks).
        // SAFETY: signal and setrlimit are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                let mut r: libc::rlimit = std::mem::zeroed();
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
                    r.rlim_cur = r.rlim_max.min(1024);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &r);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start hb monitor");
        let mut m = Monitor {
            child,
            events,
            stderr,
            listen,
        };
        m.wait_healthy(pair);
        m
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The log without the terminal colours tracing may add.
    fn plain_stderr(&self) -> String {
        plain(&self.stderr())
    }

    /// Waits until the monitor has counted `n` reloads with result `ok`.
    fn wait_reloads(&self, pair: &VethPair, ok: bool, n: u64) {
        let series = format!(
            "hb_reloads_total{{result=\"{}\"}}",
            if ok { "ok" } else { "error" }
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(&http(&pair.a, "/metrics").1, &series) < n {
            assert!(
                Instant::now() < deadline,
                "reload not done: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `needle` in the monitor's log: a counter can move before
    /// the line that goes with it is written.
    fn wait_stderr(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the monitor's log within {timeout:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_healthy(&mut self, pair: &VethPair) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, _)) = try_http_at(&pair.a, self.listen, "/healthz") {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("monitor exited {st} at start; stderr:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "monitor not healthy after 10 s; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The events written so far: whole lines only (a read racing the
    /// monitor's write may end in the middle of one).
    fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.events).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).expect("event line is JSON"))
            .collect()
    }

    /// Waits for an event of `kind` for `node`; returns it and when it was
    /// seen.
    fn wait_event(&self, node: u32, kind: &str, timeout: Duration) -> (Value, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e["node_id"] == node && e["event"] == kind)
            {
                return (e, Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "no `{kind}` event for node {node} within {timeout:?}; events: {:?}\nstderr:\n{}",
                self.events(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn node_events(&self, node: u32) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e["node_id"] == node)
            .map(|e| e["event"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// SIGTERM and wait: a clean exit, 0.
    fn stop(self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Sends heartbeats of `node` every `INTERVAL_MS` until its first
    /// event (`joined`), within 10 s.
    fn wait_joined(&self, node: &mut Node) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.node_events(node.id).is_empty() {
            assert!(Instant::now() < deadline, "node {} never joined", node.id);
            node.send(0);
            std::thread::sleep(Duration::from_millis(INTERVAL_MS));
        }
    }

    /// Waits up to 10 s for the monitor to exit of itself, calling
    /// `meanwhile` every `INTERVAL_MS`; its exit status.
    fn exit_within_10s(&mut self, mut meanwhile: impl FnMut()) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the monitor went on: events {:?}\n{}",
                self.events(),
                self.stderr()
            );
            meanwhile();
            std::thread::sleep(Duration::from_millis(INTERVAL_MS));
        }
    }

    /// `sig` (SIGTERM or SIGINT) and wait: a clean exit, 0.
    fn stop_with(mut self, sig: i32) {
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                assert!(st.success(), "monitor exited {st}: {}", self.stderr());
                assert!(self.stderr().contains("monitor stopped"));
                return;
            }
            assert!(Instant::now() < deadline, "monitor ignored signal {sig}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `log` without the terminal colours tracing may add.
fn plain(log: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in log.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (false, c) => out.push(c),
            _ => {}
        }
    }
    out
}

/// `GET path` from the monitor's API (connecting from inside `ns`).
fn try_http(ns: &NetNs, path: &str) -> std::io::Result<(u16, String)> {
    try_http_at(ns, LISTEN, path)
}

/// `GET path` from the API at `listen` (connecting from inside `ns`).
fn try_http_at(ns: &NetNs, listen: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_get(ns, listen, path)
}

fn http(ns: &NetNs, path: &str) -> (u16, String) {
    try_http(ns, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn node_json(pair: &VethPair, id: u32) -> Value {
    let (code, body) = http(&pair.a, &format!("/nodes/{id}"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// The value of a metric line `name{labels} value` in `text`.
fn metric(text: &str, series: &str) -> u64 {
    try_metric(text, series).unwrap_or_else(|| panic!("no {series} in metrics:\n{text}"))
}

/// [`metric`], `None` when the series is missing.
fn try_metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// How long a test waits for the monitor to catch up with what it was sent
/// (a datagram in flight, a tick, a report): far longer than it needs.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Polls `/metrics` until `ready` holds for it (failing after
/// [`CATCH_UP`]); returns that text, for exact checks.
fn wait_metrics(ns: &NetNs, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let (_, text) = http(ns, "/metrics");
        if ready(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics not there within {CATCH_UP:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `/nodes/<id>` until `ready` holds for it (failing after
/// [`CATCH_UP`]); returns that row.
fn wait_node(pair: &VethPair, id: u32, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let n = node_json(pair, id);
        if ready(&n) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} not there within {CATCH_UP:?}: {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A simulated node: a UDP socket in namespace `b` and its protocol state.
struct Node {
    sock: UdpSocket,
    dst: SocketAddr,
    /// Where every datagram also goes, right after `dst` (see
    /// `same_traffic_same_states_native_and_userspace`).
    mirror: Option<SocketAddr>,
    id: u32,
    generation: u32,
    seq: u64,
    epoch: u8,
    /// The interval its heartbeats announce, ms.
    interval_ms: u32,
    sent: Vec<[u8; 48]>,
    last_sent: Option<Instant>,
    /// Datagrams sent to `dst` (and each to `mirror` too), heartbeats or
    /// not.
    datagrams: std::cell::Cell<u64>,
}

impl Node {
    fn new(pair: &VethPair, id: u32, generation: u32) -> Node {
        let local = SocketAddr::new(pair.addrs.v4[1].into(), 0);
        let sock = pair
            .b
            .run(move || UdpSocket::bind(local))
            .expect("enter b")
            .expect("bind sender");
        Node {
            sock,
            dst: SocketAddr::new(pair.addrs.v4[0].into(), PORT),
            mirror: None,
            id,
            generation,
            seq: 0,
            epoch: 1,
            interval_ms: INTERVAL_MS as u32,
            sent: Vec::new(),
            last_sent: None,
            datagrams: std::cell::Cell::new(0),
        }
    }

    fn datagram(&mut self, flags: u8) -> [u8; 48] {
        self.seq += 1;
        Datagram {
            kind: Kind::Heartbeat,
            node_id: self.id,
            generation: self.generation,
            key_epoch: self.epoch,
            flags,
            load: 100,
            seq: self.seq,
            sent_ns: 0,
            interval_ms: self.interval_ms,
            rtt_us: 0,
        }
        .seal(&node_key(self.id, self.epoch))
    }

    /// Also sends everything to the monitor's address at `port`.
    fn mirrored(mut self, port: u16) -> Node {
        self.mirror = Some(SocketAddr::new(self.dst.ip(), port));
        self
    }

    fn send(&mut self, flags: u8) {
        let d = self.datagram(flags);
        self.raw(&d);
        self.last_sent = Some(Instant::now());
        self.sent.push(d);
    }

    fn raw(&self, payload: &[u8]) {
        self.datagrams.set(self.datagrams.get() + 1);
        self.sock.send_to(payload, self.dst).expect("send");
        if let Some(m) = self.mirror {
            self.sock.send_to(payload, m).expect("send mirrored");
        }
    }
}

/// Nodes beating every `INTERVAL_MS` (or the interval given to
/// [`Beat::every`]) on a thread until stopped.
struct Beat {
    stop: Arc<AtomicBool>,
    /// Key epoch the nodes sign with from the next heartbeat on.
    epoch: Arc<AtomicU8>,
    handle: Option<std::thread::JoinHandle<Vec<Node>>>,
}

impl Beat {
    fn start(nodes: Vec<Node>) -> Beat {
        Beat::every(INTERVAL_MS, nodes)
    }

    /// [`Beat::start`] with heartbeats every `interval_ms`, announced in
    /// them.
    fn every(interval_ms: u64, mut nodes: Vec<Node>) -> Beat {
        for n in nodes.iter_mut() {
            n.interval_ms = interval_ms as u32;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(AtomicU8::new(1));
        let (s, e) = (stop.clone(), epoch.clone());
        let handle = std::thread::spawn(move || {
            // Bounded: at most 60 s of heartbeats whatever happens.
            let end = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                for n in nodes.iter_mut() {
                    n.epoch = e.load(Ordering::Relaxed);
                    n.send(0);
                }
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
            nodes
        });
        Beat {
            stop,
            epoch,
            handle: Some(handle),
        }
    }

    /// Stops beating (a crash, as far as the monitor can tell).
    fn stop(mut self) -> Vec<Node> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("once")
            .join()
            .expect("beat thread")
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn setup(tag: &str, epochs: &[u8]) -> (VethPair, Scratch) {
    let pair = VethPair::new(tag).expect("veth pair");
    let dir = Scratch::new(tag);
    write_private(&dir.path("keyring.toml"), &keyring_text(epochs));
    (pair, dir)
}

// ---- behaviours, each a function of the mode ----

fn join(mode: &str) {
    let (pair, dir) = setup("mjoin", &[1]);
    let hook_out = dir.path("hook.out");
    let hook = format!(
        "echo \"$HB_EVENT $HB_NODE_ID $HB_PREVIOUS nofile=$(ulimit -n)\" >> {}",
        hook_out.display()
    );
    // A pause on top of the 50 ms rhythm: node 42 must be alive from its
    // join through the `hb nodes` runs below, and a hiccup of the loaded
    // test host's beat thread (~155 ms of silence) would make it suspect.
    // Nothing here is about silence.
    let m = Monitor::start(
        &pair,
        &dir,
        mode,
        &[
            "--nodes",
            "1-3,42",
            "--on-event",
            &hook,
            "--acceptable-pause-ms",
            "1000",
        ],
    );
    let beat = Beat::start(vec![
        Node::new(&pair, 1, 100),
        Node::new(&pair, 2, 100),
        Node::new(&pair, 42, 100),
    ]);
    for id in [1, 2, 42] {
        let (e, _) = m.wait_event(id, "joined", Duration::from_secs(5));
        assert_eq!(e["previous"], "unknown");
        assert_eq!(e["generation"], 100);
        assert!(e["ts"].as_str().unwrap().ends_with('Z'));
    }
    let n = node_json(&pair, 42);
    assert_eq!(n["state"], "alive");
    assert!(n["accepted"].as_u64().unwrap() >= 1);
    assert_eq!(n["interval_ms"], INTERVAL_MS);
    assert_eq!(node_json(&pair, 3)["state"], "unknown", "never heard from");
    // The hook ran for every join, with the event in its environment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&hook_out).unwrap_or_default();
        if [1, 2, 42]
            .iter()
            .all(|id| text.contains(&format!("joined {id} unknown")))
        {
            break;
        }
        assert!(Instant::now() < deadline, "hook output: {text:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Started with SIGCHLD ignored, the monitor still waited for each hook
    // (none failed as "wait"); the hooks got the inherited soft limit of
    // open files back, and the monitor runs with its hard limit.
    wait_metrics(&pair.a, |t| {
        try_metric(t, "hb_hook_runs_total").unwrap_or(0) >= 3
    });
    let (_, text) = http(&pair.a, "/metrics");
    assert_eq!(
        try_metric(&text, "hb_hook_failures_total{reason=\"wait\"}").unwrap_or(0),
        0,
        "{text}"
    );
    let text = std::fs::read_to_string(&hook_out).unwrap();
    assert!(
        text.lines().all(|l| l.ends_with(" nofile=1024")),
        "{text:?}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", m.pid())).unwrap();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let (soft, hard) = {
        let v: Vec<&str> = files.split_whitespace().collect();
        (v[3], v[4])
    };
    assert_eq!(soft, hard, "{files}");
    // `hb nodes` prints the table.
    let out = output_within(
        pair.a
            .command(hb_bin().to_str().unwrap())
            .args(["nodes", "--monitor", LISTEN]),
        EXIT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NODE"), "{table}");
    let out = output_within(
        pair.a
            .command(hb_bin().to_str().unwrap())
            .args(["nodes", "--json", "--monitor", LISTEN]),
        EXIT_TIMEOUT,
    );
    assert!(out.status.success());
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("hb nodes --json is JSON");
    let states: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| (r["node_id"].as_u64().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    let ids: Vec<u64> = states.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [1, 2, 3, 42]);
    assert_eq!((states[2].1, states[3].1), ("unknown", "alive"));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("42 ") && l.contains("alive")),
        "{table}"
    );
    drop(beat);
    m.stop();
}

/// `hb nodes --timeout-ms` bounds the monitor's name lookup too: with a
/// nameserver that never answers (on the namespace's subnet, where no
/// host has its address), it gives up at the timeout. It waited for the
/// resolver's own timeouts first (5 s per try here, two tries).
#[test]
fn hb_nodes_gives_up_on_a_silent_resolver_at_its_timeout() {
    let (pair, dir) = setup("mnodesdns", &[1]);
    let o = pair.addrs.v4[0].octets();
    let silent = std::net::Ipv4Addr::new(o[0], o[1], o[2], 99);
    assert!(!pair.addrs.v4.contains(&silent));
    let resolv = dir.path("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {silent}\noptions timeout:5 attempts:2\n"),
    )
    .unwrap();
    // Its own mount namespace, for its own resolv.conf.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec {} nodes --monitor monitor.hb-test:9420 \
         --timeout-ms 500",
        resolv.display(),
        hb_bin().display()
    );
    let t = Instant::now();
    let out = output_within(
        pair.a.command("unshare").args(["-m", "sh", "-c", &script]),
        Duration::from_secs(30),
    );
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the name lookup of monitor.hb-test:9420 did not finish within 500 ms"),
        "{err}"
    );
    // Waiting for the resolver takes at least its 10 s (two 5 s tries,
    // never less however loaded the machine); giving up at the timeout
    // takes 500 ms and a process start, which a loaded machine may stretch
    // by seconds: the bound lies between, well clear of both.
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
}

fn crash_is_dead(mode: &str) {
    // 200 ms heartbeats: there the 3 intervals of silence decide `dead`
    // (at about 625 ms), well after phi reaches 8 (about 305 ms), and the
    // 20 ms tick sees the node suspect some 15 times first. At 50 ms phi
    // 12 decided (about 176 ms, 21 ms after phi 8): one tick's chance,
    // which a tick a few ms late on a loaded host missed, and the node
    // went from alive to dead. At 100 ms (suspect at about 205 ms, dead at
    // 325) a monitor starved for those 120 ms did the same: the first tick
    // after such a gap announces only good news, the next one found the
    // node past both thresholds. No stall allowance either: this thread's
    // hiccups on a loaded host taught one, which puts suspicion off
    // towards `dead`, and past about 3 intervals skips it (README, "How
    // nodes are judged").
    const EVERY_MS: u64 = 200;
    let (pair, dir) = setup("mcrash", &[1]);
    let m = Monitor::start(&pair, &dir, mode, &["--nodes", "7", "--stall-factor", "0"]);
    let beat = Beat::every(EVERY_MS, vec![Node::new(&pair, 7, 1)]);
    m.wait_event(7, "joined", Duration::from_secs(5));
    // Let the statistics settle on the real rhythm.
    std::thread::sleep(Duration::from_millis(10 * EVERY_MS));
    let last_sent = beat.stop()[0].last_sent.expect("sent");
    let (dead, seen) = m.wait_event(7, "dead", Duration::from_secs(10));
    let monitor_ms = dead["last_seen_ms"].as_u64().unwrap();
    println!(
        "crash detection ({mode}, {EVERY_MS} ms heartbeats, 20 ms tick): \
         dead {monitor_ms} ms after the last heartbeat (monitor's clock), \
         {} ms after it on the test's clock (incl. event-file polling)",
        seen.duration_since(last_sent).as_millis()
    );
    assert_eq!(dead["previous"], "suspect", "{:?}", m.node_events(7));
    assert!(dead["phi"].as_f64().unwrap() >= 12.0, "{dead}");
    // Two consecutive heartbeats may be lost before dead (3 intervals).
    assert!(monitor_ms >= 3 * EVERY_MS, "{dead}");
    // (A loaded host may delay a heartbeat before the crash: an earlier
    // suspect/alive pair is allowed, what ends the story is not.)
    let evs = m.node_events(7);
    assert!(evs.ends_with(&["suspect".into(), "dead".into()]), "{evs:?}");
    assert_eq!(evs.iter().filter(|e| *e == "dead").count(), 1, "{evs:?}");
    assert_eq!(node_json(&pair, 7)["state"], "dead");
    m.stop();
}

/// Heartbeats this host only forwards (to a monitor behind it, at another
/// address) are not this monitor's: the XDP gate passes them to the stack
/// uncounted (the userspace socket never sees them), and answers none.
fn forwarded_heartbeats_are_not_ours(mode: &str) {
    let (pair, dir) = setup("mfwd", &[1]);
    let m = Monitor::start(&pair, &dir, mode, &["--nodes", "5"]);
    let (_, text) = http(&pair.a, "/metrics");
    let held = metric(&text, "hb_gate_local_addresses");
    if mode == "userspace" {
        assert_eq!(held, 0, "a socket sees only local addresses");
    } else {
        // lo's two, veth-a's IPv4, IPv6 and link-local ones.
        assert!(held >= 4, "{text}");
    }
    // The node side routes 198.18.99.0/24 through the monitor host.
    pair.b
        .ip(&[
            "route",
            "add",
            "198.18.99.0/24",
            "via",
            &pair.addrs.v4[0].to_string(),
        ])
        .unwrap();
    let rx = |ns: &NetNs| -> u64 {
        let out = ns.ip(&["-s", "-j", "link", "show", IF_A]).unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    };
    let rx0 = rx(&pair.a);
    let mut node = Node::new(&pair, 5, 1);
    let real = node.dst;
    node.dst = SocketAddr::new("198.18.99.7".parse().unwrap(), PORT);
    for _ in 0..5 {
        node.send(0);
    }
    node.dst = real;
    node.send(0);
    m.wait_event(5, "joined", Duration::from_secs(5));
    // The tick publishes its events before it reads the gate's counters
    // for `/metrics`: the join can be read before the count.
    let text = wait_metrics(&pair.a, |t| {
        try_metric(t, "hb_packets_total{result=\"accepted\"}") >= Some(1)
    });
    assert_eq!(
        metric(&text, "hb_packets_total{result=\"accepted\"}"),
        1,
        "only the heartbeat to this host's address: {text}"
    );
    for r in GateResult::ALL
        .into_iter()
        .filter(|r| !matches!(r, GateResult::Pass | GateResult::Accepted))
    {
        let series = format!("hb_packets_total{{result=\"{}\"}}", r.name());
        assert_eq!(metric(&text, &series), 0, "{series}");
    }
    assert!(
        rx(&pair.a) >= rx0 + 5,
        "the forwarded ones reached the monitor's interface"
    );
    assert_eq!(node_json(&pair, 5)["accepted"], 1);
    m.stop();
}

fn clean_leave(mode: &str) {
    let (pair, dir) = setup("mleave", &[1]);
    // A pause on top of the 50 ms rhythm: `previous` must be alive, and a
    // hiccup of the loaded test host's beat thread just before the leave
    // (~155 ms of silence) would make it suspect. The leave itself, and
    // never dead after it, are what this test is about.
    let m = Monitor::start(
        &pair,
        &dir,
        mode,
        &["--nodes", "5", "--acceptable-pause-ms", "300"],
    );
    let beat = Beat::start(vec![Node::new(&pair, 5, 1)]);
    m.wait_event(5, "joined", Duration::from_secs(5));
    let mut node = beat.stop();
    node[0].send(FLAG_LEAVING);
    let (e, _) = m.wait_event(5, "left", Duration::from_secs(5));
    assert_eq!(e["previous"], "alive");
    // Far past the dead threshold: still left, never dead or suspect.
    std::thread::sleep(Duration::from_millis(20 * INTERVAL_MS));
    let evs = m.node_events(5);
    assert_eq!(evs.last().map(String::as_str), Some("left"), "{evs:?}");
    assert!(!evs.iter().any(|e| e == "dead"), "{evs:?}");
    let n = node_json(&pair, 5);
    assert_eq!(
        (n["state"].as_str(), n["leaving"].as_bool()),
        (Some("left"), Some(true))
    );
    m.stop();
}

fn restart_is_not_a_join(mode: &str) {
    let (pair, dir) = setup("mrestart", &[1]);
    let m = Monitor::start(&pair, &dir, mode, &["--nodes", "9"]);
    let beat = Beat::start(vec![Node::new(&pair, 9, 1000)]);
    m.wait_event(9, "joined", Duration::from_secs(5));
    let _ = beat.stop();
    // The node restarts: a larger generation, seq from 1 again.
    let beat = Beat::start(vec![Node::new(&pair, 9, 1001)]);
    let (e, _) = m.wait_event(9, "restarted", Duration::from_secs(5));
    assert_eq!(
        (e["prev_generation"].as_u64(), e["generation"].as_u64()),
        (Some(1000), Some(1001))
    );
    assert_eq!(e["state"], "alive");
    let evs = m.node_events(9);
    assert_eq!(evs.iter().filter(|e| *e == "joined").count(), 1, "{evs:?}");
    let n = node_json(&pair, 9);
    assert_eq!(
        (n["generation"].as_u64(), n["restarts"].as_u64()),
        (Some(1001), Some(1))
    );
    // The epoch that let its heartbeats in (`Node::new`'s 1), in both
    // modes: the kernel records it, as the userspace gate does.
    assert_eq!(n["key_epoch"].as_u64(), Some(1));
    drop(beat);
    m.stop();
}

/// IPv4 fragments are never valid heartbeats (PROTOCOL.md). At IPv4's
/// minimum MTU (68) on the sender's link, its kernel splits every 76-byte
/// heartbeat packet in two. Native mode counts the first fragment
/// `malformed` (the second goes to the stack, which never completes it);
/// in userspace mode the kernel reassembles the datagram before the socket
/// sees it, and the monitor counts the reassembled one `malformed` (it
/// once accepted it). One `malformed` per heartbeat either way, none
/// accepted; at a normal MTU the same node joins.
fn fragments_are_malformed(mode: &str) {
    let (pair, dir) = setup("mfrag", &[1]);
    let m = Monitor::start(&pair, &dir, mode, &["--nodes", "21"]);
    let malformed = || {
        let (_, text) = http(&pair.a, "/metrics");
        metric(&text, "hb_packets_total{result=\"malformed\"}")
    };
    pair.b
        .ip(&["link", "set", IF_B, "mtu", "68"])
        .expect("MTU 68");
    let mut node = Node::new(&pair, 21, 1);
    for _ in 0..5 {
        node.send(0);
    }
    let t0 = Instant::now();
    while malformed() < 5 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(malformed(), 5, "one per fragmented heartbeat");
    assert_eq!(node_json(&pair, 21)["accepted"].as_u64(), Some(0));
    pair.b
        .ip(&["link", "set", IF_B, "mtu", "1500"])
        .expect("MTU 1500");
    node.send(0);
    m.wait_event(21, "joined", Duration::from_secs(5));
    assert_eq!(malformed(), 5);
    m.stop();
}

fn replayed_and_forged_never_refresh(mode: &str) {
    let (pair, dir) = setup("mreplay", &[1]);
    // A 1 s pause: the node must not be suspected, let alone declared
    // dead, before the replays start, which is after the wait below for
    // its last heartbeats and a read of its events: on a loaded host that
    // can take longer than the ~180 ms of silence `dead` needs at 50 ms.
    let m = Monitor::start(
        &pair,
        &dir,
        mode,
        &["--nodes", "11", "--acceptable-pause-ms", "1000"],
    );
    let beat = Beat::start(vec![Node::new(&pair, 11, 1)]);
    m.wait_event(11, "joined", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(5 * INTERVAL_MS));
    let mut node = beat.stop().pop().unwrap();
    // Every genuine heartbeat is accepted, the last one maybe a moment
    // after `send` returned (the receiving end's NAPI runs when it runs):
    // wait for it, so a late genuine one is not taken for a refresh below.
    let sent = node.sent.len() as u64;
    let t0 = Instant::now();
    let accepted = loop {
        let a = node_json(&pair, 11)["accepted"].as_u64().unwrap();
        if a >= sent || t0.elapsed() > Duration::from_secs(5) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(accepted, sent, "every genuine heartbeat accepted");
    // The attacker replays everything it captured, and forges the next
    // heartbeats (right layout, next seq, newer generation) without the key.
    let captured = node.sent.clone();
    let next = node.datagram(0);
    let mut forged_next = next;
    forged_next[40] ^= 0xff;
    let mut forged_gen = node.datagram(0);
    forged_gen[8..12].copy_from_slice(&2u32.to_be_bytes());
    let wrong_key = Datagram {
        kind: Kind::Heartbeat,
        node_id: 11,
        generation: 1,
        key_epoch: 1,
        flags: 0,
        load: 0,
        seq: 1_000,
        sent_ns: 0,
        interval_ms: 50,
        rtt_us: 0,
    }
    .seal(&NodeKey { k0: 1, k1: 2 });
    let before = m.node_events(11).len();
    let t0 = Instant::now();
    let mut saw_dead = false;
    while t0.elapsed() < Duration::from_secs(5) {
        for d in &captured {
            node.raw(d);
        }
        node.raw(&forged_next);
        node.raw(&forged_gen);
        node.raw(&wrong_key);
        if m.node_events(11).iter().any(|e| e == "dead") {
            saw_dead = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(INTERVAL_MS / 2));
    }
    assert!(
        saw_dead,
        "replays kept node 11 alive: {:?}",
        m.node_events(11)
    );
    // From the replay on, only the way down: `suspect` then `dead`, or
    // `dead` at once for a node whose stall allowance (a hiccup of the
    // sending thread under load teaches one) is past both thresholds
    // (README, "How nodes are judged"); never `alive` again.
    let evs = m.node_events(11);
    let since: Vec<&str> = evs[before..].iter().map(String::as_str).collect();
    assert!(
        since == ["suspect", "dead"] || since == ["dead"],
        "{evs:?} (from the replay on: {since:?})"
    );
    let n = node_json(&pair, 11);
    assert_eq!(
        n["accepted"].as_u64(),
        Some(accepted),
        "nothing refreshed it"
    );
    assert!(
        n["replay"].as_u64().unwrap() > 0 && n["bad_tag"].as_u64().unwrap() > 0,
        "{n}"
    );
    let (_, text) = http(&pair.a, "/metrics");
    assert!(metric(&text, "hb_packets_total{result=\"replay\"}") > 0);
    assert!(metric(&text, "hb_packets_total{result=\"bad_tag\"}") > 0);
    m.stop();
}

fn sighup_rotates_keys_without_loss(mode: &str) {
    let (pair, dir) = setup("mrotate", &[1]);
    // A generous pause: this test is about keys, not timing on a busy CI host.
    let m = Monitor::start(
        &pair,
        &dir,
        mode,
        &["--nodes", "21-22", "--acceptable-pause-ms", "2000"],
    );
    let beat = Beat::start(vec![Node::new(&pair, 21, 1), Node::new(&pair, 22, 1)]);
    m.wait_event(21, "joined", Duration::from_secs(5));
    let wait_reloads = |ok: bool, n: u64| m.wait_reloads(&pair, ok, n);
    // Add epoch 2; the senders move to it; remove epoch 1.
    std::fs::write(dir.path("keyring.toml"), keyring_text(&[1, 2])).unwrap();
    m.signal(libc::SIGHUP);
    wait_reloads(true, 1);
    std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    beat.epoch.store(2, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    // A broken keyring is refused and the running keys stay in force.
    std::fs::write(
        dir.path("keyring.toml"),
        "[[epoch]]\nid = 2\nsecret = \"abc\"\n",
    )
    .unwrap();
    m.signal(libc::SIGHUP);
    wait_reloads(false, 1);
    m.wait_stderr("reload failed", Duration::from_secs(5));
    std::fs::write(dir.path("keyring.toml"), keyring_text(&[2])).unwrap();
    m.signal(libc::SIGHUP);
    wait_reloads(true, 2);
    std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    let nodes = beat.stop();
    for n in &nodes {
        // The last heartbeats may land a moment after `send` returned.
        let sent = n.sent.len() as u64;
        let j = wait_node(&pair, n.id, |j| j["accepted"].as_u64() >= Some(sent));
        assert_eq!(
            j["accepted"].as_u64(),
            Some(sent),
            "node {}: every heartbeat accepted across the rotation: {j}",
            n.id
        );
        assert!(n.sent.iter().any(|d| d[12] == 1) && n.sent.iter().any(|d| d[12] == 2));
    }
    let (_, text) = http(&pair.a, "/metrics");
    assert_eq!(metric(&text, "hb_packets_total{result=\"bad_epoch\"}"), 0);
    assert_eq!(metric(&text, "hb_packets_total{result=\"bad_tag\"}"), 0);
    // Epoch 1 is gone now.
    let mut late = Node::new(&pair, 21, 1);
    late.seq = 10_000;
    late.send(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = http(&pair.a, "/metrics");
        if metric(&text, "hb_packets_total{result=\"bad_epoch\"}") == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "epoch 1 still accepted");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The log names the node left on the dropped epoch, and that epoch
    // (at the end of the 10 s window of the authentication summary). One
    // more heartbeat every half second: a report that reached the monitor
    // just after a window closed on its count is not carried into a
    // window where nothing moved.
    let named = r#"bad_epoch_examples="21 at epoch 1 ("#;
    let deadline = Instant::now() + Duration::from_secs(25);
    while !m.stderr().contains(named) {
        assert!(
            Instant::now() < deadline,
            "no {named:?} in the monitor's log:\n{}",
            m.stderr()
        );
        late.send(0);
        std::thread::sleep(Duration::from_millis(500));
    }
    m.stop();
}

/// SIGHUP applies the controller's options from the config file: the new
/// policy's requests replace the old one's (`off` withdraws them); a bad
/// option fails the reload and changes nothing; an option that needs a
/// restart is named. A restart with `off` over pinned state withdraws the
/// requests a previous policy left in the maps.
fn sighup_reloads_the_controller(mode: &str) {
    let (pair, dir) = setup("mctl", &[1]);
    let conf = dir.path("monitor.toml");
    let conf_arg = conf.to_str().expect("utf-8 path").to_owned();
    let write = |text: &str| std::fs::write(&conf, text).expect("write the config file");
    let wait_requested = |m: &Monitor, want: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = node_json(&pair, 31);
            if n["requested_interval_ms"].as_u64() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "requested interval not {want}: {n}\n{}",
                m.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Writes the file, SIGHUP, waits for the `n`th reload of that result.
    let reload = |m: &Monitor, text: &str, ok: bool, n: u64| {
        write(text);
        m.signal(libc::SIGHUP);
        m.wait_reloads(&pair, ok, n);
    };
    // A pause on top of the 50 ms rhythm: node 31 must still be alive at
    // the end, and a hiccup of the loaded test host's beat thread (~155 ms
    // of silence) would make it suspect. Nothing here is about silence.
    let args = [
        "--nodes",
        "31",
        "--config",
        &conf_arg,
        "--acceptable-pause-ms",
        "1000",
    ];
    write("controller = \"fixed\"\nfixed_interval_ms = 500\n");
    let m = Monitor::start(&pair, &dir, mode, &args);
    let beat = Beat::start(vec![Node::new(&pair, 31, 1)]);
    m.wait_event(31, "joined", Duration::from_secs(5));
    wait_requested(&m, 500);

    // Restarted with the controller off, over the same pins: the 500 left
    // in the maps is withdrawn (native; userspace starts with nothing).
    m.stop();
    write("controller = \"off\"\n");
    let m = Monitor::start(&pair, &dir, mode, &args);
    wait_requested(&m, 0);

    // Fixed at 2000 ms; the capacity needs a restart and is named.
    reload(
        &m,
        "controller = \"fixed\"\nfixed_interval_ms = 2000\ncapacity = 4096\n",
        true,
        1,
    );
    wait_requested(&m, 2000);
    m.wait_stderr("take effect only at a restart", Duration::from_secs(5));
    assert!(
        m.plain_stderr().contains("options=capacity"),
        "{}",
        m.stderr()
    );
    let (_, c) = http(&pair.a, "/controller");
    assert!(c.contains("\"fixed\""), "{c}");

    // `fixed` without an interval is refused: the running policy stays.
    reload(&m, "controller = \"fixed\"\n", false, 1);
    m.wait_stderr("reload failed", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(3 * INTERVAL_MS));
    assert_eq!(node_json(&pair, 31)["requested_interval_ms"], 2000);

    // Off again: no request is left for the gate to put in ACKs.
    reload(&m, "controller = \"off\"\n", true, 2);
    wait_requested(&m, 0);
    let (_, c) = http(&pair.a, "/controller");
    assert!(c.contains("\"off\""), "{c}");
    let n = node_json(&pair, 31);
    assert_eq!(n["state"], "alive", "{n}");
    drop(beat);
    m.stop();
}

fn http_api(mode: &str) {
    let (pair, dir) = setup("mhttp", &[1]);
    // XDP_TX'd ACKs reach veth-b only through an XDP program there.
    let _pass = (mode != "userspace").then(|| xdp_pass(&pair.b, IF_B));
    // A pause on top of the 50 ms rhythm: node 2 must count as the one
    // alive node, and a hiccup of the loaded test host's beat thread
    // (~155 ms of silence) would make it suspect. Nothing here is about
    // silence.
    let m = Monitor::start(
        &pair,
        &dir,
        mode,
        &["--nodes", "1-4", "--ack", "--acceptable-pause-ms", "1000"],
    );
    let beat = Beat::start(vec![Node::new(&pair, 2, 5)]);
    m.wait_event(2, "joined", Duration::from_secs(5));
    // An unknown node and a malformed datagram, counted by result.
    let stranger = Node::new(&pair, 77, 1);
    stranger.raw(&[0u8; 10]);
    let mut s2 = Node::new(&pair, 77, 1);
    s2.send(0);
    // Until both are counted (and the unknown node reported), ACKs sent,
    // and the heartbeats they answered counted: the tick reads the gate's
    // counters one at a time, so `ack_sent`, read after `accepted`, can
    // count a heartbeat that `accepted` does not yet.
    let text = wait_metrics(&pair.a, |t| {
        try_metric(t, "hb_packets_total{result=\"malformed\"}") >= Some(1)
            && try_metric(t, "hb_packets_total{result=\"unknown_node\"}") >= Some(1)
            && try_metric(t, "hb_unknown_node_reports_total") >= Some(1)
            && try_metric(t, "hb_dataplane_total{counter=\"ack_sent\"}") >= Some(2)
            && try_metric(t, "hb_packets_total{result=\"accepted\"}") >= Some(2)
    });

    let (code, body) = http(&pair.a, "/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, body) = http(&pair.a, "/nodes");
    assert_eq!(code, 200);
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
    let ids: Vec<u64> = rows
        .iter()
        .map(|r| r["node_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    for key in [
        "node_id",
        "state",
        "phi",
        "generation",
        "accepted",
        "last_seen_ms",
        "interval_ms",
        "lost",
        "restarts",
        "rtt_us",
        "load",
        "requested_interval_ms",
        "last_decision",
    ] {
        assert!(
            rows[1].get(key).is_some(),
            "/nodes row lacks {key}: {}",
            rows[1]
        );
    }
    assert!(rows[1]["last_seen_ms"].as_u64().unwrap() < 1000);
    let (code, body) = http(&pair.a, "/nodes?state=alive");
    assert_eq!(code, 200);
    let alive: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(alive.len(), 1);
    assert_eq!(http(&pair.a, "/nodes/999").0, 404);
    assert_eq!(
        http(&pair.a, "/nodes/77").0,
        404,
        "unknown nodes are not enrolled by default"
    );
    assert_eq!(http(&pair.a, "/nodes/abc").0, 400);
    assert_eq!(http(&pair.a, "/nodes?state=zombie").0, 400);

    assert!(metric(&text, "hb_packets_total{result=\"accepted\"}") >= 2);
    assert_eq!(metric(&text, "hb_packets_total{result=\"malformed\"}"), 1);
    assert_eq!(
        metric(&text, "hb_packets_total{result=\"unknown_node\"}"),
        1
    );
    assert!(
        metric(&text, "hb_dataplane_total{counter=\"ack_sent\"}") >= 2,
        "--ack"
    );
    assert_eq!(metric(&text, "hb_nodes{state=\"alive\"}"), 1);
    assert_eq!(metric(&text, "hb_nodes{state=\"unknown\"}"), 3);
    assert!(metric(&text, "hb_events_total{event=\"joined\"}") >= 1);
    assert!(metric(&text, "hb_tick_duration_seconds_count") > 0);
    assert_eq!(metric(&text, "hb_unknown_node_reports_total"), 1);
    // ACKs came back to the sender, verifiable with its key.
    let mut buf = [0u8; 64];
    let nodes = beat.stop();
    nodes[0]
        .sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (n, _) = nodes[0].sock.recv_from(&mut buf).expect("an ACK");
    let ack = hb_common::proto::parse(&buf[..n], Kind::Ack).expect("ACK parses");
    assert_eq!(ack.node_id, 2);
    assert!(hb_common::proto::verify(
        &node_key(2, 1),
        buf[..48].try_into().unwrap()
    ));
    m.stop();
}

/// A monitor restart. With XDP the maps are pinned and the program stays
/// attached (`--keep-attached`) while no monitor runs: it keeps gating and
/// counting (node 31 beats only while no monitor runs, then stops before
/// the next start, so only the kept gate can have counted those
/// heartbeats), the new monitor adopts every node silently (no false
/// `joined`) and declares nobody dead for the gap (node 32 beats
/// throughout). In userspace mode there is no state to keep: the new
/// monitor learns the fleet anew (`joined` again), knows nothing of what
/// was sent while none ran, and still declares nobody dead.
fn monitor_restart(mode: &str) {
    /// Heartbeats node 31 sends while no monitor runs.
    const GAP: usize = 10;
    let (pair, dir) = setup("mrst", &[1]);
    let pins = dir.pins();
    // A pause on top of the 50 ms rhythm, in both monitors: node 32 must
    // never be suspect, and a hiccup of the loaded test host's beat thread
    // (~155 ms of silence) would make it so. What is tested, that the
    // monitor's own absence is held against nobody, stays: a silence
    // counted from before the restart (more than 1 s) is still past both
    // thresholds.
    let args = [
        "--nodes",
        "31-32",
        "--keep-attached",
        "--pin-dir",
        &pins,
        "--capacity",
        "64",
        "--acceptable-pause-ms",
        "300",
    ];
    let m = Monitor::start(&pair, &dir, mode, &args);
    let beat = Beat::start(vec![Node::new(&pair, 32, 1)]);
    let mut n31 = Node::new(&pair, 31, 1);
    m.wait_joined(&mut n31);
    m.wait_event(32, "joined", Duration::from_secs(5));
    let before = n31.sent.len() as u64;
    wait_node(&pair, 31, |n| n["accepted"].as_u64() == Some(before));
    m.stop();
    if mode != "userspace" {
        assert!(
            xdp_prog_id(&pair.a, IF_A).is_some(),
            "--keep-attached: the gate stays attached without a monitor"
        );
        // A userspace start over the kept gate that fails (here on its
        // events file) leaves the gate as it was: it is released only
        // once nothing of the start can fail.
        let keyring = dir.path("keyring.toml");
        let mut cmd = pair.a.command(hb_bin().to_str().unwrap());
        cmd.args(["monitor", "--mode", "userspace", "--iface", IF_A])
            .args(["--port", &PORT.to_string(), "--listen", LISTEN])
            .args(["--pin-dir", &pins, "--nodes", "31-32", "--keyring"])
            .arg(&keyring)
            .args(["--events", "/nonexistent-hb-dir/events.jsonl"]);
        fails_with_one_line(
            "a userspace start that fails over a kept gate",
            &mut cmd,
            "cannot open events file",
        );
        assert!(
            xdp_prog_id(&pair.a, IF_A).is_some(),
            "a failed userspace start removed the kept gate"
        );
    }
    // Longer than the dead threshold (about 4 intervals) without a
    // monitor; node 31 beats only now, and is silent from here on.
    for _ in 0..GAP {
        n31.send(0);
        std::thread::sleep(Duration::from_millis(INTERVAL_MS));
    }
    // Another capacity: the pinned maps keep theirs, and say so.
    let last = [
        "--nodes",
        "31-32",
        "--pin-dir",
        &pins,
        "--capacity",
        "128",
        "--acceptable-pause-ms",
        "300",
    ];
    let m = Monitor::start(&pair, &dir, mode, &last);
    if mode == "userspace" {
        let n = node_json(&pair, 31);
        assert_eq!(
            n["accepted"].as_u64(),
            Some(0),
            "userspace mode keeps no state, and nothing gated while no monitor ran: {n}"
        );
    } else {
        // Nothing is sent to node 31 any more: once its count is there
        // it is final (and if it never comes, the check below says why).
        let sent = before + GAP as u64;
        let deadline = Instant::now() + CATCH_UP;
        let n = loop {
            let n = node_json(&pair, 31);
            if n["accepted"].as_u64() >= Some(sent) || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            n["accepted"].as_u64(),
            Some(sent),
            "the kept gate counted the {GAP} heartbeats sent while no monitor ran: {n}"
        );
    }
    // Time for a false `dead` or `joined` to show.
    std::thread::sleep(Duration::from_millis(10 * INTERVAL_MS));
    if mode == "userspace" {
        // The new monitor learns node 32 anew, from a heartbeat it hears
        // and a tick after: on a loaded host maybe not within the sleep.
        let deadline = Instant::now() + CATCH_UP;
        while m.node_events(32).iter().filter(|e| *e == "joined").count() < 2 {
            assert!(
                Instant::now() < deadline,
                "node 32 not joined again within {CATCH_UP:?}: {:?}",
                m.node_events(32)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if mode != "userspace" {
        let log = m.plain_stderr();
        assert!(
            log.contains("the pinned maps keep their capacity") && log.contains("capacity=64"),
            "{log}"
        );
    }
    let n = node_json(&pair, 32);
    assert_eq!(n["state"], "alive", "{n}");
    let evs = m.node_events(32);
    assert!(
        !evs.iter().any(|e| e == "dead" || e == "suspect"),
        "{evs:?}"
    );
    if mode == "userspace" {
        assert_eq!(evs, ["joined", "joined"], "userspace mode keeps no state");
    } else {
        assert_eq!(evs, ["joined"], "no false joined");
        assert_eq!(n["origin"], "configured");
    }
    // Node 31 joined once: the second monitor heard nothing from it
    // (userspace) or adopted it (native).
    let evs = m.node_events(31);
    assert_eq!(evs.iter().filter(|e| *e == "joined").count(), 1, "{evs:?}");
    drop(beat);
    m.stop();
    assert_eq!(
        xdp_prog_id(&pair.a, IF_A),
        None,
        "without --keep-attached, SIGTERM detaches"
    );
    if mode != "userspace" {
        // No capacity asked for: the pinned maps' is taken without a
        // word (it warned that the default was "asked").
        let m = Monitor::start(&pair, &dir, mode, &["--nodes", "31-32", "--pin-dir", &pins]);
        m.wait_stderr("monitor started", Duration::from_secs(5));
        assert!(
            !m.plain_stderr().contains("keep their capacity"),
            "{}",
            m.stderr()
        );
        m.stop();
    }
    let _ = std::fs::remove_dir_all(&pins);
}

/// `--enroll`: an unlisted node whose heartbeats verify under its derived
/// key joins; one that cannot sign stays out.
fn enroll(mode: &str) {
    let (pair, dir) = setup("menroll", &[1]);
    // A pause on top of the 50 ms rhythm, as in `join`: node 500 must be
    // alive after its join.
    let m = Monitor::start(
        &pair,
        &dir,
        mode,
        &["--nodes", "1", "--enroll", "--acceptable-pause-ms", "1000"],
    );
    let beat = Beat::start(vec![Node::new(&pair, 500, 3)]);
    let (e, _) = m.wait_event(500, "joined", Duration::from_secs(5));
    assert_eq!(e["generation"], 3);
    let n = node_json(&pair, 500);
    assert_eq!(
        (n["origin"].as_str(), n["state"].as_str()),
        (Some("enrolled"), Some("alive"))
    );
    // A forger of node 600 gets a probationary slot at most, never a join.
    let mut forger = Node::new(&pair, 600, 1);
    for _ in 0..10 {
        let mut d = forger.datagram(0);
        d[41] ^= 0x55;
        forger.raw(&d);
        std::thread::sleep(Duration::from_millis(INTERVAL_MS / 2));
    }
    assert!(m.node_events(600).is_empty());
    let (_, text) = http(&pair.a, "/metrics");
    assert!(metric(&text, "hb_packets_total{result=\"bad_tag\"}") > 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = http(&pair.a, "/metrics");
        if metric(&text, "hb_enrollments_total{outcome=\"accepted\"}") == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "enrollment not confirmed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(beat);
    m.stop();
}

/// Each case: extra flags and files; the monitor must exit non-zero at
/// once with one line naming the problem, never a panic.
fn bad_input(mode: &str) {
    let (pair, dir) = setup("mbad", &[1]);
    let good_keyring = dir.path("keyring.toml");
    let write = |name: &str, text: &str| {
        let p = dir.path(name);
        write_private(&p, text);
        p.to_str().unwrap().to_owned()
    };
    let bad_toml = write("bad.toml", "[[epoch]\nid = 1\n");
    let short = write("short.toml", "[[epoch]]\nid = 1\nsecret = \"0011\"\n");
    let config_typo = write("config.toml", "tickms = 20\n");
    let config_broken = write("broken.toml", "tick_ms = = 20\n");
    let missing = dir.path("nope.toml").to_str().unwrap().to_owned();
    let keyring = good_keyring.to_str().unwrap().to_owned();
    // The unprivileged user's own copy (a keyring must be private to its
    // owner), so the runs below fail on privileges, not on reading it.
    let nobody_keyring = write(
        "keyring-nobody.toml",
        &std::fs::read_to_string(&good_keyring).unwrap(),
    );
    std::os::unix::fs::chown(&nobody_keyring, Some(65534), Some(65534)).expect("chown");
    // Hold the heartbeat port and the API port in namespace a.
    let held_udp = pair
        .a
        .run({
            let a = SocketAddr::new(pair.addrs.v4[0].into(), PORT + 1);
            move || UdpSocket::bind(a)
        })
        .unwrap()
        .unwrap();
    let held_tcp = pair
        .a
        .run(|| std::net::TcpListener::bind("127.0.0.1:9421"))
        .unwrap()
        .unwrap();
    let port2 = (PORT + 1).to_string();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "malformed keyring",
            vec!["--keyring", &bad_toml, "--nodes", "1"],
            "line 1",
        ),
        (
            "secret of the wrong length",
            vec!["--keyring", &short, "--nodes", "1"],
            "64 hex digits",
        ),
        (
            "missing keyring",
            vec!["--keyring", &missing, "--nodes", "1"],
            "cannot read keyring",
        ),
        (
            "config typo",
            vec![
                "--config",
                &config_typo,
                "--keyring",
                &keyring,
                "--nodes",
                "1",
            ],
            "unknown field `tickms`",
        ),
        (
            "malformed config",
            vec![
                "--config",
                &config_broken,
                "--keyring",
                &keyring,
                "--nodes",
                "1",
            ],
            "broken.toml: line 1",
        ),
        (
            "bad node spec",
            vec!["--keyring", &keyring, "--nodes", "1-10,5-3"],
            "bad node spec part `5-3`",
        ),
        (
            "unknown interface",
            vec!["--keyring", &keyring, "--nodes", "1", "--iface", "nope0"],
            "unknown interface nope0",
        ),
        (
            "busy port",
            vec![
                "--keyring",
                &keyring,
                "--nodes",
                "1",
                "--iface",
                IF_A,
                "--port",
                &port2,
            ],
            "already in use",
        ),
        (
            "busy API address",
            vec![
                "--keyring",
                &keyring,
                "--nodes",
                "1",
                "--iface",
                IF_A,
                "--listen",
                "127.0.0.1:9421",
            ],
            "cannot listen on 127.0.0.1:9421",
        ),
        (
            "bad thresholds",
            vec!["--keyring", &keyring, "--nodes", "1", "--alive-phi", "9"],
            "alive_phi < suspect_phi",
        ),
        (
            "more nodes than the capacity",
            vec!["--keyring", &keyring, "--nodes", "1-3", "--capacity", "2"],
            "more than the capacity of 2 (raise --capacity, which a start takes",
        ),
        (
            "capacity out of range",
            vec!["--keyring", &keyring, "--nodes", "1", "--capacity", "0"],
            "capacity must be between 1 and 1048576",
        ),
    ];
    let pins = dir.pins();
    for (what, args, want) in cases {
        if what == "busy port" && mode != "userspace" {
            // The XDP gate takes heartbeats before any socket: a socket
            // on the port is no conflict there.
            continue;
        }
        let mut cmd = pair.a.command(hb_bin().to_str().unwrap());
        cmd.args(["monitor", "--mode", mode]).args(&args);
        if mode != "userspace" {
            cmd.args(["--pin-dir", &pins]);
        }
        fails_with_one_line(what, &mut cmd, want);
        // Not even one that failed after its gate was up (the API
        // address): a later start would adopt its maps, and their
        // capacity.
        assert!(
            !std::path::Path::new(&pins).exists(),
            "{what}: a failed start left its pins in {pins}"
        );
    }
    drop((held_udp, held_tcp));
    if mode == "userspace" {
        // Missing privileges: a port below 1024 as an unprivileged user.
        let mut cmd = pair.a.command("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(hb_bin())
            .args(["monitor", "--mode", mode, "--iface", IF_A, "--port", "700"])
            .args(["--keyring", &nobody_keyring, "--nodes", "1"]);
        fails_with_one_line(
            "missing privileges: a privileged port",
            &mut cmd,
            "not allowed to bind UDP port 700",
        );
        return;
    }

    // `hb monitor` in an XDP mode on veth-a, as the cases below run it.
    let xdp_monitor = |m: &str, keyring: &str| -> Vec<String> {
        [
            "monitor",
            "--mode",
            m,
            "--iface",
            IF_A,
            "--pin-dir",
            &pins,
            "--keyring",
            keyring,
            "--nodes",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };

    // Another XDP program on the interface: refused in native and skb
    // mode alike, and left in place.
    let other = xdp_pass(&pair.a, IF_A);
    let other_id = xdp_prog_id(&pair.a, IF_A).expect("hb_pass attached to veth-a");
    for m in ["native", "skb"] {
        let mut cmd = pair.a.command(hb_bin().to_str().unwrap());
        cmd.args(xdp_monitor(m, &keyring));
        fails_with_one_line(
            &format!("another XDP program ({m})"),
            &mut cmd,
            "interface veth-a already has another XDP program attached",
        );
        assert_eq!(
            xdp_prog_id(&pair.a, IF_A),
            Some(other_id),
            "{m}: the other program was replaced or detached"
        );
    }
    drop(other);

    // A time namespace whose monotonic clock is offset from the kernel's,
    // with which the XDP gate stamps arrivals.
    let mut cmd = pair.a.command("unshare");
    cmd.args(["--time", "--monotonic", "3600", "--fork", "--"])
        .arg(hb_bin())
        .args(xdp_monitor(mode, &keyring));
    fails_with_one_line(
        "a time namespace with a monotonic offset",
        &mut cmd,
        "time namespace whose CLOCK_MONOTONIC is offset by 3600 s",
    );
    assert_eq!(xdp_prog_id(&pair.a, IF_A), None, "nothing attached");

    // Missing privileges: an unprivileged user, and root without
    // capabilities (as in a too-strict systemd unit).
    for (who, ids, keyring) in [
        (
            "an unprivileged user",
            &["--reuid=65534", "--regid=65534", "--clear-groups"][..],
            &nobody_keyring,
        ),
        ("root without capabilities", &[][..], &keyring),
    ] {
        let mut cmd = pair.a.command("setpriv");
        cmd.args(ids)
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
            .arg(hb_bin())
            .args(xdp_monitor(mode, keyring));
        fails_with_one_line(
            &format!("missing privileges: {who}"),
            &mut cmd,
            "XDP needs the capabilities CAP_BPF, CAP_NET_ADMIN",
        );
    }
    // Root with CAP_BPF and CAP_NET_ADMIN but not CAP_PERFMON: one line
    // naming it (the verifier's refusal came with a hundred-line log
    // saying "prohibited for !root").
    let mut cmd = pair.a.command("setpriv");
    cmd.args([
        "--inh-caps=-all",
        "--bounding-set=-all,+bpf,+net_admin",
        "--",
    ])
    .arg(hb_bin())
    .args(xdp_monitor(mode, &keyring));
    fails_with_one_line(
        "missing privileges: CAP_PERFMON",
        &mut cmd,
        "this process lacks CAP_PERFMON",
    );
    assert_eq!(xdp_prog_id(&pair.a, IF_A), None, "nothing left attached");
}

/// Runs `cmd` (an `hb` invocation that must fail): a non-zero exit (within
/// [`EXIT_TIMEOUT`], else it is killed and the test fails), one `hb: `
/// line on stderr containing `want`, no panic. Its stderr, without
/// colours.
fn fails_with_one_line(what: &str, cmd: &mut std::process::Command, want: &str) -> String {
    let out = output_within(cmd.env_remove("RUST_BACKTRACE"), EXIT_TIMEOUT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: exited 0");
    assert!(err.contains(want), "{what}: stderr {err:?} lacks {want:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{what}: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("hb: ")).collect();
    assert_eq!(lines.len(), 1, "{what}: one error line: {err:?}");
    println!("{what}: {}", lines[0]);
    plain(&err)
}

/// `hb_pass` (from hb's own eBPF object, loaded by the test) attached in
/// driver mode to `ifname` in `ns` until dropped. On `veth-b` it lets a
/// native-mode monitor's XDP_TX'd ACKs arrive; on `veth-a` it is
/// "another XDP program".
struct XdpPass(#[allow(dead_code)] XdpDataplane);

fn xdp_pass(ns: &NetNs, ifname: &str) -> XdpPass {
    let dp = ns
        .run(|| {
            XdpDataplane::open(&XdpOptions {
                interfaces: Vec::new(),
                mode: AttachMode::Native,
                max_nodes: Some(16),
                ..XdpOptions::default()
            })
        })
        .expect("enter namespace")
        .expect("load hb's eBPF object");
    ns.run(|| {
        let mut ebpf = dp.ebpf();
        let p: &mut Xdp = ebpf
            .program_mut(names::PASS)
            .expect("hb_pass")
            .try_into()
            .expect("an XDP program");
        p.attach(ifname, XdpMode::Driver).map(|_| ())
    })
    .expect("enter namespace")
    .unwrap_or_else(|e| panic!("attach hb_pass to {ifname}: {e}"));
    XdpPass(dp)
}

/// The id of the XDP program attached to `ifname` in `ns`, if any.
fn xdp_prog_id(ns: &NetNs, ifname: &str) -> Option<u64> {
    let out = ns
        .ip(&["-j", "link", "show", ifname])
        .expect("ip link show");
    let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j JSON");
    links[0]["xdp"]["prog"]["id"].as_u64()
}

/// A start that fails attaches nothing: every step of it that can fail
/// (the API address, the events file, the controller's table, the pinned
/// maps' capacity, the fleet) comes before the gate is attached. It used
/// to attach first and detach again at the failure, and on some NICs
/// attaching or detaching native XDP resets the rings, a break for all the
/// host's traffic that a supervisor restarting a start that keeps failing
/// (the README's unit: every 2 s) repeated for good. Over a gate an
/// earlier `--keep-attached` run left, such a start leaves that gate as it
/// was, its program and all (it used to swap its own in, or detach the
/// gate without `--keep-attached`).
#[test]
fn a_start_that_fails_attaches_nothing() {
    /// What an attach, a re-adoption or a detach logs.
    const TOUCHED: [&str; 3] = [
        "XDP gate attached",
        "re-adopted pinned XDP link",
        "XDP gate detached",
    ];
    const OTHER_LISTEN: &str = "127.0.0.1:9422";
    let (pair, dir) = setup("mfailattach", &[1]);
    let pins = dir.pins();
    let keyring = dir.path("keyring.toml");
    let events = dir.path("failed.jsonl");
    let fails = |what: &str, args: &[&str], want: &str| {
        let mut cmd = pair.a.command(hb_bin().to_str().unwrap());
        cmd.args(["monitor", "--mode", "native", "--iface", IF_A])
            .args(["--port", &PORT.to_string(), "--pin-dir", &pins])
            .arg("--keyring")
            .arg(&keyring)
            .arg("--events")
            .arg(&events)
            .args(args)
            .env("HB_LOG", "info");
        let log = fails_with_one_line(what, &mut cmd, want);
        for line in TOUCHED {
            assert!(!log.contains(line), "{what}: {line:?} in its log:\n{log}");
        }
    };
    // The API address taken, as by a monitor already running.
    let held = pair
        .a
        .run(|| std::net::TcpListener::bind(LISTEN))
        .unwrap()
        .unwrap();
    fails(
        "the --listen address in use",
        &["--listen", LISTEN, "--nodes", "1"],
        "cannot listen on 127.0.0.1:9420: address already in use",
    );
    assert_eq!(xdp_prog_id(&pair.a, IF_A), None, "nothing attached");

    // A gate kept by an earlier run, over maps of 2 slots.
    let m = Monitor::start_on(
        &pair,
        &dir,
        "native",
        PORT,
        OTHER_LISTEN,
        &["--nodes", "1", "--keep-attached", "--capacity", "2"],
    );
    m.stop();
    let kept = xdp_prog_id(&pair.a, IF_A).expect("the gate kept attached");
    let link = std::path::Path::new(&pins).join(format!("link_{IF_A}"));
    let more = [
        "--nodes",
        "1-3",
        "--capacity",
        "4",
        "--listen",
        OTHER_LISTEN,
    ];
    for keep in [true, false] {
        let keep_arg: &[&str] = if keep { &["--keep-attached"] } else { &[] };
        fails(
            &format!("the --listen address in use, over a kept gate (keep {keep})"),
            &[&["--listen", LISTEN, "--nodes", "1"][..], keep_arg].concat(),
            "cannot listen on 127.0.0.1:9420: address already in use",
        );
        fails(
            &format!("more nodes than the pinned maps' slots (keep {keep})"),
            &[&more[..], keep_arg].concat(),
            "more than the 2 slots of the pinned maps",
        );
        assert_eq!(
            xdp_prog_id(&pair.a, IF_A),
            Some(kept),
            "keep {keep}: the kept gate as it was"
        );
        assert!(link.exists(), "keep {keep}: its pin removed");
    }
    drop(held);
    // The kept gate is still the next start's to take over.
    let m = Monitor::start(&pair, &dir, "native", &["--nodes", "1"]);
    let now = xdp_prog_id(&pair.a, IF_A).expect("gated");
    assert_ne!(now, kept, "the new program in the kept link");
    assert!(m.stderr().contains("re-adopted pinned XDP link"));
    m.stop();
    assert_eq!(xdp_prog_id(&pair.a, IF_A), None, "detached at the stop");
}

/// In native mode on a veth, the kernel sends the gate's XDP_TX frames
/// (its ACKs) on to the peer only if the peer runs an XDP program too;
/// without one it drops them, and nothing said so (`ack_sent` counts them
/// as sent). The start says it once per such interface; in skb mode, whose
/// ACKs go through the stack, it says nothing. (This test's peer has no
/// program; the text claims no loss, only the need.)
#[test]
fn native_mode_on_a_veth_says_acks_need_a_program_on_the_peer() {
    const SAID: &str = "ACKs (XDP_TX) reach the peer only if the peer veth has an XDP program";
    let (pair, dir) = setup("mvethack", &[1]);
    let m = Monitor::start(&pair, &dir, "native", &["--nodes", "1", "--ack"]);
    m.wait_stderr("monitor started", Duration::from_secs(5));
    let log = m.plain_stderr();
    let said: Vec<&str> = log.lines().filter(|l| l.contains(SAID)).collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0].contains(&format!("interface={IF_A}")) && said[0].contains("--mode skb"),
        "{}",
        said[0]
    );
    m.stop();
    let m = Monitor::start(&pair, &dir, "skb", &["--nodes", "1", "--ack"]);
    m.wait_stderr("monitor started", Duration::from_secs(5));
    assert!(!m.plain_stderr().contains(SAID), "{}", m.stderr());
    m.stop();
}

/// `--iface` twice, one interface whose driver has no native XDP (a
/// bridge): native mode attaches natively on the veth, says it falls back
/// to skb mode on the bridge and does, gates heartbeats, and detaches from
/// both on SIGINT.
#[test]
fn native_falls_back_to_skb_where_the_driver_cannot() {
    const BRIDGE: &str = "hbbr0";
    let (pair, dir) = setup("mfallback", &[1]);
    pair.a
        .ip(&["link", "add", BRIDGE, "type", "bridge"])
        .expect("bridge interface");
    pair.a.ip(&["link", "set", BRIDGE, "up"]).expect("up");
    let m = Monitor::start(&pair, &dir, "native", &["--nodes", "1", "--iface", BRIDGE]);
    let mode_of = |ifname: &str| {
        let out = pair.a.ip(&["-j", "link", "show", ifname]).expect("ip link");
        let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j JSON");
        links[0]["xdp"]["mode"].as_u64()
    };
    // XDP_ATTACHED_DRV = 1, XDP_ATTACHED_SKB = 2.
    assert_eq!(mode_of(IF_A), Some(1), "native on the veth");
    assert_eq!(mode_of(BRIDGE), Some(2), "skb on the bridge");
    assert!(
        m.stderr()
            .contains("driver has no native XDP support; falling back to skb"),
        "{}",
        m.stderr()
    );
    // The start says what each interface got, not only what was asked.
    assert!(
        m.plain_stderr()
            .contains(&format!("attached={IF_A}=native,{BRIDGE}=skb")),
        "{}",
        m.stderr()
    );
    let beat = Beat::start(vec![Node::new(&pair, 1, 1)]);
    m.wait_event(1, "joined", Duration::from_secs(5));
    drop(beat);
    m.stop_with(libc::SIGINT);
    assert_eq!((mode_of(IF_A), mode_of(BRIDGE)), (None, None), "detached");
}

/// The kernel detaches the gate from an interface that goes away: every
/// node behind it falls silent. The monitor does not declare them dead
/// (it did, the whole fleet at once): it stops with an error before
/// judging anyone, for its supervisor to start it again, attaching afresh.
/// Until it does, `/healthz` says why (it said "ok" while nothing was
/// gated there).
#[test]
fn the_monitor_stops_when_its_interface_goes_away() {
    let (pair, dir) = setup("mgone", &[1]);
    // A 1 s pause: node 1 is silent from its join on, and must not be
    // judged while the test goes on to delete the interface (on a loaded
    // host that can take longer than the ~155 ms of silence `suspect`
    // needs at 50 ms). A monitor that went on without its gate would
    // still declare it dead long before the 10 s below.
    let mut m = Monitor::start(
        &pair,
        &dir,
        "native",
        &["--nodes", "1", "--acceptable-pause-ms", "1000"],
    );
    let mut node = Node::new(&pair, 1, 1);
    m.wait_joined(&mut node);
    assert_eq!(http(&pair.a, "/healthz"), (200, "ok\n".into()));
    // Deleting one end of the pair deletes both: node 1 can reach the
    // monitor no more.
    pair.a
        .ip(&["link", "del", IF_A])
        .expect("delete the interface");
    // Long enough for node 1 to be declared dead many times over.
    let status = m.exit_within_10s(|| {});
    assert!(!status.success(), "exit {status}");
    let err = m.plain_stderr();
    assert!(
        err.contains(&format!("interface {IF_A} is gone, and the gate with it"))
            && err.contains("stopped without judging any node"),
        "{err}"
    );
    assert_eq!(m.node_events(1), ["joined"], "judged without its gate");
}

/// With several interfaces, losing one stops the monitor for all (README:
/// nodes are judged again once it runs whole): node 1, heard on the
/// interface that stays, is not judged either.
#[test]
fn losing_one_of_several_interfaces_stops_the_monitor() {
    const BRIDGE: &str = "hbbr1";
    let (pair, dir) = setup("mgone2", &[1]);
    pair.a
        .ip(&["link", "add", BRIDGE, "type", "bridge"])
        .expect("bridge interface");
    pair.a.ip(&["link", "set", BRIDGE, "up"]).expect("up");
    // A 1 s pause, as above: node 1 is silent from its join until the
    // bridge is gone.
    let mut m = Monitor::start(
        &pair,
        &dir,
        "skb",
        &[
            "--nodes",
            "1",
            "--iface",
            BRIDGE,
            "--acceptable-pause-ms",
            "1000",
        ],
    );
    let mut node = Node::new(&pair, 1, 1);
    m.wait_joined(&mut node);
    pair.a
        .ip(&["link", "del", BRIDGE])
        .expect("delete the bridge");
    let status = m.exit_within_10s(|| node.send(0));
    assert!(!status.success(), "exit {status}");
    let err = m.plain_stderr();
    assert!(
        err.contains(&format!("interface {BRIDGE} is gone, and the gate with it")),
        "{err}"
    );
    assert_eq!(m.node_events(1), ["joined"]);
    // The gate on the interface that stays goes with the monitor.
    assert_eq!(xdp_prog_id(&pair.a, IF_A), None, "detached");
}

/// Renames interface `from` in `ns` to `to` (only a down interface can
/// be renamed: down, renamed, up again).
fn rename(ns: &NetNs, from: &str, to: &str) {
    for args in [
        &["link", "set", from, "down"][..],
        &["link", "set", from, "name", to],
        &["link", "set", to, "up"],
    ] {
        ns.ip(args).expect("rename the interface");
    }
}

/// A renamed interface keeps its gate (the kernel detaches it only from
/// one that goes away): the monitor goes on judging its nodes and says
/// the next start needs the new name; deleted after, it is named by its
/// last name. It looked the interface up by name, and stopped for a
/// rename as for a deletion.
#[test]
fn a_renamed_interface_keeps_its_gate() {
    const RENAMED: &str = "hbrenamed0";
    let (pair, dir) = setup("mrename", &[1]);
    // A 1 s pause: node 1 is silent from its join until the beats below,
    // through the rename and the waits for it (on a loaded host longer
    // than the ~180 ms of silence `dead` needs at 50 ms), and must not be
    // judged for that.
    let mut m = Monitor::start(
        &pair,
        &dir,
        "native",
        &["--nodes", "1", "--acceptable-pause-ms", "1000"],
    );
    let mut node = Node::new(&pair, 1, 1);
    let beat = |node: &mut Node, n: usize| {
        for _ in 0..n {
            node.send(0);
            std::thread::sleep(Duration::from_millis(INTERVAL_MS));
        }
    };
    m.wait_joined(&mut node);
    let gate = xdp_prog_id(&pair.a, IF_A).expect("gate attached");
    rename(&pair.a, IF_A, RENAMED);
    assert_eq!(xdp_prog_id(&pair.a, RENAMED), Some(gate), "the gate stays");
    m.wait_stderr("interface renamed", Duration::from_secs(5));
    let accepted = || {
        let (code, body) = http(&pair.a, "/nodes/1");
        assert_eq!(code, 200, "{body}");
        let row: Value = serde_json::from_str(&body).expect("JSON");
        row["accepted"].as_u64().expect("accepted")
    };
    let before = accepted();
    // Longer than `dead` takes (about 1.2 s, with the pause) once node 1
    // is heard no more.
    beat(&mut node, 40);
    assert!(
        m.child.try_wait().expect("wait").is_none(),
        "{}",
        m.stderr()
    );
    assert!(accepted() >= before + 30, "gated after the rename");
    let err = m.plain_stderr();
    assert!(
        err.contains(&format!("now={RENAMED}")) && err.contains(&format!("--iface {RENAMED}")),
        "{err}"
    );
    assert!(
        !m.node_events(1).iter().any(|e| e == "dead"),
        "{:?}",
        m.node_events(1)
    );
    assert_eq!(
        http(&pair.a, "/healthz"),
        (200, "ok\n".into()),
        "the gate is where it was"
    );
    // Deleted after the rename: said under its last name.
    pair.a.ip(&["link", "del", RENAMED]).expect("delete it");
    let status = m.exit_within_10s(|| {});
    assert!(!status.success(), "exit {status}");
    let err = m.plain_stderr();
    assert!(
        err.contains(&format!("interface {RENAMED} (--iface {IF_A}) is gone")),
        "{err}"
    );
}

/// A monitor stopped after its interface was renamed detaches the gate
/// from it, under its new name.
#[test]
fn a_renamed_interface_is_detached_at_the_stop() {
    const RENAMED: &str = "hbrenamed1";
    let (pair, dir) = setup("mrenstop", &[1]);
    let m = Monitor::start(&pair, &dir, "native", &["--nodes", "1"]);
    rename(&pair.a, IF_A, RENAMED);
    assert!(xdp_prog_id(&pair.a, RENAMED).is_some(), "the gate stays");
    m.wait_stderr("interface renamed", Duration::from_secs(5));
    m.stop_with(libc::SIGINT);
    assert_eq!(xdp_prog_id(&pair.a, RENAMED), None, "detached");
}

// ---- userspace mode against native mode, on the same datagrams ----

/// The fields of a `/nodes` row that cannot depend on where the gate runs:
/// all but the clock-dependent ones (phi, last_seen_ms, state_for_ms,
/// mean_interarrival_ms) and the slot.
const MODE_FREE_FIELDS: [&str; 15] = [
    "node_id",
    "state",
    "generation",
    "accepted",
    "interval_ms",
    "requested_interval_ms",
    "lost",
    "restarts",
    "load",
    "bad_tag",
    "replay",
    "stale",
    "acks_sent",
    "leaving",
    "origin",
];

/// The monitor's table, reduced to [`MODE_FREE_FIELDS`].
fn mode_free_table(pair: &VethPair, m: &Monitor) -> Vec<Value> {
    let (code, body) = try_http_at(&pair.a, m.listen, "/nodes").expect("GET /nodes");
    assert_eq!(code, 200, "{body}");
    let rows: Vec<Value> = serde_json::from_str(&body).expect("JSON");
    rows.iter()
        .map(|r| {
            Value::Object(
                MODE_FREE_FIELDS
                    .iter()
                    .map(|k| ((*k).to_owned(), r[*k].clone()))
                    .collect(),
            )
        })
        .collect()
}

/// Each node's events, in order, without their clock-dependent fields
/// (ts, seq, phi, last_seen_ms); `accepted` and `lost` are kept for the
/// events after which no heartbeat arrives (dead, left), where they
/// cannot depend on a tick's phase.
fn mode_free_events(m: &Monitor) -> std::collections::BTreeMap<u64, Vec<Value>> {
    let mut out = std::collections::BTreeMap::<u64, Vec<Value>>::new();
    for e in m.events() {
        let mut v = serde_json::Map::new();
        for k in [
            "event",
            "previous",
            "state",
            "generation",
            "prev_generation",
        ] {
            v.insert(k.into(), e[k].clone());
        }
        if e["event"] == "dead" || e["event"] == "left" {
            v.insert("accepted".into(), e["accepted"].clone());
            v.insert("lost".into(), e["lost"].clone());
        }
        out.entry(e["node_id"].as_u64().expect("node_id"))
            .or_default()
            .push(Value::Object(v));
    }
    out
}

/// The gate's results by name, from `/metrics`.
fn packet_results(pair: &VethPair, m: &Monitor) -> Vec<(String, u64)> {
    let (_, text) = try_http_at(&pair.a, m.listen, "/metrics").expect("GET /metrics");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("hb_packets_total{result=\"")?;
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_owned(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

/// Forgeries an attacker without the key can make of `n`'s heartbeats:
/// the next seq with a broken tag, a newer generation, another key.
fn forgeries(n: &mut Node) -> [[u8; 48]; 3] {
    let mut next = n.datagram(0);
    n.seq -= 1;
    next[40] ^= 0xff;
    let mut newer = n.datagram(0);
    n.seq -= 1;
    newer[8..12].copy_from_slice(&(n.generation + 1).to_be_bytes());
    let wrong_key = Datagram {
        kind: Kind::Heartbeat,
        node_id: n.id,
        generation: n.generation,
        key_epoch: n.epoch,
        flags: 0,
        load: 100,
        seq: n.seq + 1_000,
        sent_ns: 0,
        interval_ms: INTERVAL_MS as u32,
        rtt_us: 0,
    }
    .seal(&NodeKey { k0: 1, k1: 2 });
    [next, newer, wrong_key]
}

/// Userspace mode and native XDP mode give the same node states on the
/// same traffic -- literally the same datagrams: a native-mode monitor
/// gates port `PORT` on `veth-a` and a userspace-mode monitor on the same
/// interface serves port `PORT + 1` (the XDP gate passes other ports to
/// the stack untouched); every datagram of the script goes to both ports
/// back to back, so both gates judge the same bytes in the same order at
/// the same moment, rejected ones included.
///
/// The script: nodes 1-5 join; then 2 crashes, 3 leaves cleanly, 4
/// restarts (its old generation is replayed too), 5 keeps beating under
/// replays of its captured heartbeats and forgeries, then goes silent
/// while the replays and forgeries go on; 6 is never heard from; an
/// unknown node and a malformed datagram on the side. Both monitors'
/// tables (every field that does not depend on a clock), their per-node
/// event sequences and their per-result packet counts must be equal --
/// and equal to what the script implies.
#[test]
fn same_traffic_same_states_native_and_userspace() {
    const US_PORT: u16 = PORT + 1;
    const US_LISTEN: &str = "127.0.0.1:9421";
    let (pair, dir) = setup("msame", &[1]);
    let dir_us = Scratch::new("msameu");
    write_private(&dir_us.path("keyring.toml"), &keyring_text(&[1]));
    // A pause on top of the 50 ms rhythm, so that a scheduling hiccup of
    // the loaded test host does not make one monitor alone see a
    // suspect/alive pair (the two ticks run at different phases). `dead`
    // after 10 intervals of silence, not 3: at 50 ms phi went from 8 to 12
    // (and past 3 intervals) in 21 ms, one 20 ms tick, which a monitor
    // whose tick came a few ms late on a loaded host missed: `dead` with
    // no `suspect` in one mode only. At 6 intervals (suspect at about
    // 455 ms, dead at 635) a monitor starved for those 180 ms did the
    // same: the first tick after such a gap announces only good news, the
    // next one found the node past both thresholds. Now the crashed nodes
    // are suspect for some 380 ms (dead at about 835 ms) first. No stall
    // allowance: what the loaded host's hiccups taught each gate would put
    // off suspicion towards `dead`.
    let args = [
        "--nodes",
        "1-6",
        "--acceptable-pause-ms",
        "300",
        "--dead-min-intervals",
        "10",
        "--stall-factor",
        "0",
    ];
    let native = Monitor::start_on(&pair, &dir, "native", PORT, LISTEN, &args);
    let user = Monitor::start_on(&pair, &dir_us, "userspace", US_PORT, US_LISTEN, &args);
    let both = [&native, &user];
    let node = |id: u32, generation: u32| Node::new(&pair, id, generation).mirrored(US_PORT);
    let mut nodes: Vec<Node> = (1..=5).map(|id| node(id, 100)).collect();

    // Fixed-rate rounds of INTERVAL_MS.
    let mut next = Instant::now();
    let mut round = || {
        next += Duration::from_millis(INTERVAL_MS);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    };
    let all_saw = |node: u32, kind: &str| {
        both.iter()
            .all(|m| m.node_events(node).iter().any(|e| e == kind))
    };

    // Everybody joins.
    let mut stranger = node(77, 1);
    for r in 0..20 {
        for n in nodes.iter_mut() {
            n.send(0);
        }
        if r == 5 {
            stranger.send(0);
            stranger.raw(&[0u8; 10]);
        }
        round();
    }
    for id in 1..=5 {
        for m in both {
            m.wait_event(id, "joined", Duration::from_secs(5));
        }
    }

    // 2 crashes, 3 leaves, 4 restarts; 5 beats under attack.
    nodes[2].send(FLAG_LEAVING);
    let old4 = std::mem::replace(&mut nodes[3], node(4, 101));
    let old4_last = *old4.sent.last().expect("sent");
    let attack = |n5: &mut Node| {
        let captured: Vec<[u8; 48]> = n5.sent[..3]
            .iter()
            .chain(n5.sent.iter().rev().take(5))
            .copied()
            .collect();
        for d in captured.iter().chain(forgeries(n5).iter()) {
            n5.raw(d);
        }
    };
    let t0 = Instant::now();
    for r in 0.. {
        for i in [0, 3, 4] {
            nodes[i].send(0);
        }
        attack(&mut nodes[4]);
        nodes[3].raw(&old4_last);
        round();
        if r >= 10 && all_saw(2, "dead") && all_saw(3, "left") && all_saw(4, "restarted") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "node 2 dead, 3 left, 4 restarted in both: native {:?}, userspace {:?}",
            mode_free_events(&native),
            mode_free_events(&user)
        );
    }

    // 5 goes silent; the replays and forgeries of it go on.
    let t0 = Instant::now();
    while !all_saw(5, "dead") {
        for i in [0, 3] {
            nodes[i].send(0);
        }
        attack(&mut nodes[4]);
        round();
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "replays kept node 5 alive: native {:?}, userspace {:?}",
            native.node_events(5),
            user.node_events(5)
        );
    }
    // Until each gate has a result for every datagram sent to it (its
    // counters, which `/metrics` has from a tick): the tables, read live,
    // then have every datagram too. A fixed 100 ms was too short for a
    // monitor starved that long on a loaded host. Nodes 1 and 4 are silent
    // from here on: this is soon over, well within the 300 ms pause.
    let datagrams: u64 = nodes
        .iter()
        .chain([&old4, &stranger])
        .map(|n| n.datagrams.get())
        .sum();
    let total = |p: &[(String, u64)]| p.iter().map(|(_, v)| v).sum::<u64>();
    let deadline = Instant::now() + CATCH_UP;
    let packets = loop {
        let p = [packet_results(&pair, &native), packet_results(&pair, &user)];
        if p.iter().all(|p| total(p) >= datagrams) || Instant::now() > deadline {
            break p;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        [total(&packets[0]), total(&packets[1])],
        [datagrams; 2],
        "one result per datagram: native, then userspace {packets:?}"
    );

    let tables = [
        mode_free_table(&pair, &native),
        mode_free_table(&pair, &user),
    ];
    let events = [mode_free_events(&native), mode_free_events(&user)];
    println!(
        "same traffic, both modes: {} heartbeat datagrams each ({:?}); nodes: {}",
        packets[0].iter().map(|(_, v)| v).sum::<u64>(),
        packets[0],
        tables[0]
            .iter()
            .map(|r| format!("{} {}", r["node_id"], r["state"].as_str().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(tables[0], tables[1], "tables: native, then userspace");
    assert_eq!(events[0], events[1], "events: native, then userspace");
    assert_eq!(
        packets[0], packets[1],
        "packet results: native, then userspace"
    );

    // And they are what the script implies.
    let t = &tables[0];
    let row = |id: u32| &t[id as usize - 1];
    let sent = |i: usize| nodes[i].sent.len() as u64;
    let want = [
        (1, "alive", 100, sent(0), 0),
        (2, "dead", 100, sent(1), 0),
        (3, "left", 100, sent(2), 0),
        (4, "alive", 101, old4.sent.len() as u64 + sent(3), 1),
        (5, "dead", 100, sent(4), 0),
        (6, "unknown", 0, 0, 0),
    ];
    for (id, state, generation, accepted, restarts) in want {
        let r = row(id);
        assert_eq!(
            (
                r["node_id"].as_u64(),
                r["state"].as_str(),
                r["generation"].as_u64(),
                r["accepted"].as_u64(),
                r["restarts"].as_u64()
            ),
            (
                Some(id as u64),
                Some(state),
                Some(generation),
                Some(accepted),
                Some(restarts)
            ),
            "node {id}: {r}"
        );
    }
    assert_eq!(row(3)["leaving"], true);
    assert!(row(4)["stale"].as_u64().unwrap() > 0, "{}", row(4));
    assert!(
        row(5)["replay"].as_u64().unwrap() > 0 && row(5)["bad_tag"].as_u64().unwrap() > 0,
        "{}",
        row(5)
    );
    let kinds = |id: u64| -> Vec<&str> {
        events[0]
            .get(&id)
            .map(|v| v.iter().map(|e| e["event"].as_str().unwrap()).collect())
            .unwrap_or_default()
    };
    assert_eq!(kinds(1), ["joined"]);
    assert_eq!(kinds(2), ["joined", "suspect", "dead"]);
    assert_eq!(kinds(3), ["joined", "left"]);
    assert_eq!(kinds(4), ["joined", "restarted"]);
    assert_eq!(kinds(5), ["joined", "suspect", "dead"]);
    assert!(kinds(6).is_empty() && kinds(77).is_empty());
    let count = |name: &str| {
        packets[0]
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    };
    assert_eq!((count("unknown_node"), count("malformed")), (1, 1));
    assert_eq!(
        count("accepted"),
        (1..=5)
            .map(|i| row(i)["accepted"].as_u64().unwrap())
            .sum::<u64>()
    );
    native.stop();
    user.stop();
}

/// A reload whose config file became a FIFO that nothing writes does not
/// hold off SIGTERM: the read blocks on a thread of its own while the
/// signal loop stops the monitor, cleanly. (Read on the signal loop, the
/// monitor stopped handling signals until something wrote the FIFO.)
/// SIGTERM comes once the reload has the FIFO open, so while it reads.
#[test]
fn a_reload_blocked_on_its_config_file_does_not_hold_off_sigterm() {
    let (pair, dir) = setup("mfifo", &[1]);
    let conf = dir.path("monitor.toml");
    std::fs::write(&conf, "tick_ms = 20\n").expect("write the config file");
    let conf_arg = conf.to_str().expect("utf-8 path").to_owned();
    let mut m = Monitor::start(
        &pair,
        &dir,
        "userspace",
        &["--nodes", "31", "--config", &conf_arg],
    );
    std::fs::remove_file(&conf).expect("remove the config file");
    let c = std::ffi::CString::new(conf_arg).expect("no NUL");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    m.signal(libc::SIGHUP);
    // The reload has begun once it opened the FIFO: a non-blocking open
    // for writing fails (ENXIO) while no reader has it open. Held open
    // and never written, it leaves the reload blocked in its read.
    let writer = {
        use std::os::unix::fs::OpenOptionsExt as _;
        let deadline = Instant::now() + CATCH_UP;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&conf)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    assert!(
                        Instant::now() < deadline,
                        "the reload did not open its config file within {CATCH_UP:?}:\n{}",
                        m.stderr()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("open the FIFO for writing: {e}"),
            }
        }
    };
    m.signal(libc::SIGTERM);
    let st = m.exit_within_10s(|| {});
    drop(writer);
    assert!(st.success(), "{st}\n{}", m.stderr());
    assert!(
        m.plain_stderr()
            .contains("SIGTERM while a reload read its files: shutting down"),
        "{}",
        m.stderr()
    );
}

/// A node a reload takes off the list is announced `removed` even when
/// SIGTERM comes before the next tick: the shutdown announces it. (It was
/// left for that tick, and lost: removal clears the node's state, so no
/// later monitor could announce it either.) Ticks 4 s apart leave no
/// tick between the reload and the stop.
#[test]
fn a_removal_just_before_sigterm_is_still_announced() {
    let (pair, dir) = setup("mrmstop", &[1]);
    let conf = dir.path("monitor.toml");
    std::fs::write(&conf, "nodes = \"31,32\"\n").expect("write the config file");
    let conf_arg = conf.to_str().expect("utf-8 path").to_owned();
    let m = Monitor::start(
        &pair,
        &dir,
        "native",
        &["--config", &conf_arg, "--tick-ms", "4000"],
    );
    let beat = Beat::start(vec![Node::new(&pair, 31, 1), Node::new(&pair, 32, 1)]);
    m.wait_event(31, "joined", Duration::from_secs(10));
    // A tick can fall between the two nodes' first heartbeats (sent one
    // after the other): node 32 then joins a tick, 4 s, after node 31.
    m.wait_event(32, "joined", Duration::from_secs(10));
    std::fs::write(&conf, "nodes = \"31\"\n").expect("write the config file");
    m.signal(libc::SIGHUP);
    m.wait_reloads(&pair, true, 1);
    let events = m.events.clone();
    m.stop();
    drop(beat);
    let lines: Vec<Value> = std::fs::read_to_string(&events)
        .expect("events file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("event line is JSON"))
        .collect();
    let removed: Vec<&Value> = lines.iter().filter(|e| e["event"] == "removed").collect();
    assert_eq!(removed.len(), 1, "{lines:?}");
    assert_eq!(removed[0]["node_id"], 32, "{lines:?}");
    assert_eq!(removed[0]["previous"], "alive", "{lines:?}");
    // Numbered after everything before it.
    let last_seq = lines.iter().filter_map(|e| e["seq"].as_u64()).max();
    assert_eq!(removed[0]["seq"].as_u64(), last_seq, "{lines:?}");
}

/// Userspace mode without `--iface` hears IPv4 on a host whose
/// `net.ipv6.bindv6only` is 1 (a hardening setting): its wildcard socket
/// clears `IPV6_V6ONLY` itself. Bound under the host's default, it was
/// IPv6-only there, and every IPv4 node went dead without a word.
#[test]
fn the_userspace_wildcard_hears_ipv4_whatever_bindv6only_says() {
    let ns = NetNs::new("mv6o").expect("namespace");
    let set = ns
        .command("sh")
        .args(["-c", "echo 1 > /proc/sys/net/ipv6/bindv6only"])
        .status()
        .expect("sh");
    assert!(set.success());
    let heard = ns
        .run(|| {
            use hb::monitor::userspace::{bind, bind_addrs};
            let v6only = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap();
            assert_eq!(v6only.trim(), "1", "the namespace's setting");
            let socks = bind(&bind_addrs(&[], 0).unwrap()).unwrap();
            assert_eq!(socks.len(), 1);
            let s = &socks[0];
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let port = s.local_addr().unwrap().port();
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(b"over IPv4", ("127.0.0.1", port)).unwrap();
            let mut buf = [0u8; 32];
            let (n, _) = s.recv_from(&mut buf).expect("the IPv4 datagram");
            buf[..n].to_vec()
        })
        .expect("in the namespace");
    assert_eq!(heard, b"over IPv4");
}

/// Userspace mode binds an IPv6 address still tentative at its start
/// (added a moment before: duplicate address detection runs) once it is
/// usable, and leaves out with a warning one that failed detection
/// (another host on the link has it), serving the interface's other
/// addresses. Both failed the start ("Cannot assign requested address"),
/// the second at every start for as long as the address stayed.
#[test]
fn userspace_mode_waits_out_a_tentative_address_and_skips_a_duplicate() {
    let pair = VethPair::new("mdad").expect("veth pair");
    let ip = |ns: &NetNs, args: &[&str]| ns.ip(args).expect("ip");
    ip(
        &pair.a,
        &["addr", "add", "fd00:4842:d::1/64", "dev", IF_A, "nodad"],
    );
    ip(&pair.b, &["addr", "add", "fd00:4842:d::1/64", "dev", IF_B]);
    ip(&pair.b, &["addr", "add", "fd00:4842:e::2/64", "dev", IF_B]);
    let bound = pair
        .b
        .run(|| {
            use hb::monitor::userspace::{bind, bind_addrs};
            let socks = bind(&bind_addrs(&[IF_B.to_string()], 0).unwrap()).unwrap();
            socks
                .iter()
                .map(|s| s.local_addr().unwrap().ip())
                .collect::<Vec<_>>()
        })
        .expect("in the namespace");
    let has = |a: &str| bound.contains(&a.parse::<std::net::IpAddr>().unwrap());
    assert!(
        has("fd00:4842:e::2"),
        "the tentative one, once usable: {bound:?}"
    );
    assert!(!has("fd00:4842:d::1"), "the duplicate left out: {bound:?}");
    assert!(
        bound.contains(&std::net::IpAddr::from(pair.addrs.v4[1])),
        "the others served: {bound:?}"
    );
    let flags = pair
        .b
        .ip(&["-6", "addr", "show", "dev", IF_B])
        .expect("ip addr");
    let flags = String::from_utf8_lossy(&flags.stdout);
    assert!(flags.contains("dadfailed"), "{flags}");
}

/// Instantiates each behaviour for each mode the build supports.
macro_rules! modes {
    ($($mode:ident => [$($test:ident),* $(,)?]),* $(,)?) => {
        $(mod $mode {
            $(#[test]
            fn $test() {
                super::$test(stringify!($mode));
            })*
        })*
    };
}

modes! {
    userspace => [
        join,
        crash_is_dead,
        clean_leave,
        restart_is_not_a_join,
        replayed_and_forged_never_refresh,
        fragments_are_malformed,
        sighup_rotates_keys_without_loss,
        sighup_reloads_the_controller,
        http_api,
        monitor_restart,
        enroll,
        bad_input,
        forwarded_heartbeats_are_not_ours,
    ],
    native => [
        join,
        crash_is_dead,
        clean_leave,
        restart_is_not_a_join,
        replayed_and_forged_never_refresh,
        fragments_are_malformed,
        sighup_rotates_keys_without_loss,
        sighup_reloads_the_controller,
        http_api,
        monitor_restart,
        enroll,
        bad_input,
        forwarded_heartbeats_are_not_ours,
    ],
}

//! `cargo xtask demo`: hb's story in under a minute, on this machine.
//!
//! Builds `hb`, wires a small network of namespaces (a monitor and five
//! nodes on one bridge), starts `hb monitor` with its XDP gate on the
//! monitor's interface and `hb send` on every node, then crashes one node
//! (SIGKILL: `dead`), stops one cleanly (SIGTERM: `left`) and restarts one
//! (crash and start again: `restarted`), printing the monitor's table
//! (`hb nodes`) and its JSON-lines events as they change. Every step waits
//! for the monitor to report the expected state and fails the demo if it
//! does not within a bound: a demo that only looks right is worse than
//! none.
//!
//! Namespaces are named `hbd-<pid>-*` and deleted on exit, on failure and on
//! Ctrl-C (children run in their own process groups, so the terminal's
//! SIGINT reaches only `xtask`, which then stops them in order).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{self, output};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Build and run the release binary.
    #[arg(long)]
    pub release: bool,
    /// Heartbeat interval of the demo's senders, ms.
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u32,
    /// The monitor's dataplane: `native` XDP (the default, falls back to
    /// skb mode by itself), `skb`, or `userspace` (a UDP socket and the
    /// same gate, for hosts without XDP).
    #[arg(long, default_value = "native", value_parser = ["native", "skb", "userspace"])]
    pub mode: String,
    /// How long to wait for each expected state, seconds.
    #[arg(long, default_value_t = 20)]
    pub step_timeout: u64,
}

const NODES: u32 = 5;
const PORT: u16 = 7420;
const LISTEN: &str = "127.0.0.1:9420";
const MONITOR_IP: &str = "198.18.42.1";

/// The demo's network: a bridge namespace, the monitor's, one per node.
struct Net {
    pid: u32,
    names: Vec<String>,
}

impl Net {
    fn ns(&self, role: &str) -> String {
        format!("hbd-{}-{role}", self.pid)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> anyhow::Result<()> {
        output(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
    }

    fn add(&mut self, role: &str) -> anyhow::Result<String> {
        let name = self.ns(role);
        output(Command::new("ip").args(["netns", "add", &name]))?;
        self.names.push(name.clone());
        self.ip(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Connects `ns` to the bridge: port `port` on the bridge side, `eth0`
    /// with `addr` inside `ns`.
    fn attach(&self, ns: &str, port: &str, addr: &str) -> anyhow::Result<()> {
        let br = self.ns("net");
        self.ip(
            &br,
            &[
                "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        self.ip(&br, &["link", "set", port, "master", "br0", "up"])?;
        self.ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        // No duplicate address detection: the IPv6 link-local address is
        // usable at once (a monitor binding every address of the interface
        // would otherwise fail on a tentative one).
        output(Command::new("nsenter").args([
            &format!("--net=/var/run/netns/{ns}"),
            "--",
            "sysctl",
            "-qw",
            "net.ipv6.conf.eth0.accept_dad=0",
        ]))?;
        self.ip(ns, &["link", "set", "eth0", "up"])
    }

    fn build(pid: u32) -> anyhow::Result<Net> {
        let mut net = Net {
            pid,
            names: Vec::new(),
        };
        let br = net.add("net")?;
        net.ip(&br, &["link", "add", "br0", "type", "bridge"])?;
        net.ip(&br, &["link", "set", "br0", "up"])?;
        let mon = net.add("mon")?;
        net.attach(&mon, "pmon", MONITOR_IP)?;
        for i in 1..=NODES {
            let n = net.add(&format!("n{i}"))?;
            net.attach(&n, &format!("p{i}"), &format!("198.18.42.{}", 10 + i))?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            if let Err(e) = output(Command::new("ip").args(["netns", "delete", n])) {
                eprintln!("demo: cannot delete namespace {n}: {e:#}");
            }
        }
    }
}

/// A process inside a namespace, stopped (SIGTERM, then SIGKILL) on drop.
struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &str, ns: &str, hb: &Path, args: &[String], log: &Path) -> anyhow::Result<Proc> {
        use std::os::unix::process::CommandExt as _;
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{ns}"))
            .arg("--")
            .arg(hb)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .env("HB_LOG", "info")
            // Our own group: the terminal's Ctrl-C is ours to handle.
            .process_group(0);
        // SAFETY: prctl(2) only, between fork and exec. If xtask itself is
        // killed (SIGKILL), the kernel stops the child rather than leaving
        // it running in a namespace nobody will clean up.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {}", util::show(&cmd)))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
        })
    }

    /// Sends `sig` and waits up to `timeout` for the exit; returns the exit
    /// status.
    fn stop(&mut self, sig: i32, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        // SAFETY: as in `signal`.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let st = child.wait()?;
                bail!(
                    "{} did not exit within {timeout:?} of signal {sig}; killed ({st})",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(libc::SIGTERM, Duration::from_secs(3));
        }
    }
}

/// Removes the monitor's pin directory when the demo ends (after the
/// monitor: declared before it, dropped after it).
struct PinGuard(std::path::PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.0)
        {
            eprintln!("demo: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// One event line of the monitor, as printed and as parsed.
#[derive(Clone, Debug)]
struct Event {
    node_id: u64,
    event: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let start = Instant::now();
    let hb = crate::build(args.release)?;
    let pid = std::process::id();
    // Leftovers of a demo that was SIGKILLed.
    if let Ok(v) = util::sweep_netns(&["hbd-"])
        && !v.is_empty()
    {
        eprintln!("demo: deleted leftover namespaces {}", v.join(" "));
    }
    if let Ok(v) = util::sweep_pins("hbd-")
        && !v.is_empty()
    {
        eprintln!("demo: removed leftover pins /sys/fs/bpf/{}", v.join(" "));
    }
    let dir = std::env::temp_dir().join(format!("hb-demo-{pid}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = story(&args, &hb, pid, &dir);
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
            println!(
                "\ndemo: done in {:.0}s; namespaces and files removed",
                start.elapsed().as_secs_f64()
            );
        }
        Err(_) => {
            eprintln!(
                "\ndemo: FAILED. Logs of the monitor and the senders: {}",
                dir.display()
            );
            if let Ok(log) = std::fs::read_to_string(dir.join("monitor.log")) {
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("demo: last lines of monitor.log:");
                for l in tail.iter().rev() {
                    eprintln!("  {l}");
                }
            }
        }
    }
    result
}

fn story(args: &Args, hb: &Path, pid: u32, dir: &Path) -> anyhow::Result<()> {
    let step_timeout = Duration::from_secs(args.step_timeout);
    println!(
        "demo: building the network: a monitor and {NODES} nodes on one bridge (namespaces hbd-{pid}-*)"
    );
    let net = Net::build(pid)?;

    // Keys: the master secret stays with the monitor; each node gets only
    // its derived key.
    let secret = output(Command::new(hb).args(["keys", "new"]))?;
    let keyring = dir.join("keyring.toml");
    std::fs::write(
        &keyring,
        format!("[[epoch]]\nid = 1\nsecret = \"{}\"\n", secret.trim()),
    )
    .context("cannot write the demo keyring")?;
    // A keyring must be private to its owner.
    std::fs::set_permissions(
        &keyring,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .context("cannot make the demo keyring private")?;
    let keyring_s = keyring.display().to_string();
    let mut node_keys = Vec::new();
    for i in 1..=NODES {
        let k = output(Command::new(hb).args([
            "keys",
            "derive",
            "--keyring",
            &keyring_s,
            "--node-id",
            &i.to_string(),
        ]))?;
        node_keys.push(k.trim().to_owned());
    }

    let mon_ns = net.ns("mon");
    let pin_dir = Path::new("/sys/fs/bpf").join(format!("hbd-{pid}"));
    let _pins = PinGuard(pin_dir.clone());
    let monitor_args: Vec<String> = [
        "monitor",
        "--iface",
        "eth0",
        "--port",
        &PORT.to_string(),
        "--keyring",
        &keyring_s,
        "--nodes",
        &format!("1-{NODES}"),
        "--listen",
        LISTEN,
        "--events",
        "-",
        "--mode",
        &args.mode,
        // Pins of its own, so the demo never touches a real monitor's.
        "--pin-dir",
        &pin_dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    println!(
        "demo: starting: hb {}   (in {mon_ns})",
        monitor_args.join(" ")
    );
    let mut monitor = Proc::spawn(
        "monitor",
        &mon_ns,
        hb,
        &monitor_args,
        &dir.join("monitor.log"),
    )?;
    let events = pump_events(&mut monitor)?;

    let nodes_cmd = |json: bool| {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/var/run/netns/{mon_ns}"))
            .arg("--")
            .arg(hb)
            .args(["nodes", "--monitor", LISTEN]);
        if json {
            c.arg("--json");
        }
        c
    };
    wait_for("the monitor's API to answer", step_timeout, || {
        check_monitor(&mut monitor)?;
        Ok(output(&mut nodes_cmd(true)).is_ok())
    })?;

    let sender = |i: u32| -> anyhow::Result<Proc> {
        let state = dir.join(format!("n{i}"));
        let send_args: Vec<String> = vec![
            "send".into(),
            "--monitor".into(),
            format!("{MONITOR_IP}:{PORT}"),
            "--node-id".into(),
            i.to_string(),
            "--key".into(),
            node_keys[(i - 1) as usize].clone(),
            "--key-epoch".into(),
            "1".into(),
            "--interval-ms".into(),
            args.interval_ms.to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        Proc::spawn(
            &format!("sender {i}"),
            &net.ns(&format!("n{i}")),
            hb,
            &send_args,
            &dir.join(format!("n{i}.log")),
        )
    };
    println!(
        "demo: starting {NODES} senders: hb send --monitor {MONITOR_IP}:{PORT} --node-id N --key <node key> --key-epoch 1 --interval-ms {}",
        args.interval_ms
    );
    let mut senders: Vec<Proc> = (1..=NODES).map(sender).collect::<anyhow::Result<_>>()?;

    let all: Vec<u64> = (1..=NODES as u64).collect();
    expect_states(&mut monitor, &nodes_cmd, &all, "alive", step_timeout)?;
    show_table("all nodes joined", &nodes_cmd)?;
    // Let the monitor learn each node's rhythm before anything fails, so
    // the detection below is a steady-state one.
    println!("demo: letting the fleet run for 3 s");
    let settle = Instant::now() + Duration::from_secs(3);
    wait_for("the fleet to settle", Duration::from_secs(5), || {
        check_monitor(&mut monitor)?;
        Ok(Instant::now() >= settle)
    })?;

    println!("\ndemo: node 3 crashes (SIGKILL): the monitor should declare it dead");
    let t = Instant::now();
    senders[2].stop(libc::SIGKILL, Duration::from_secs(2))?;
    expect_states(&mut monitor, &nodes_cmd, &[3], "dead", step_timeout)?;
    println!(
        "demo: node 3 declared dead {:.1}s after the crash",
        t.elapsed().as_secs_f64()
    );
    show_table("after the crash", &nodes_cmd)?;

    println!(
        "\ndemo: node 4 shuts down cleanly (SIGTERM): it says goodbye and is `left`, not dead"
    );
    let st = senders[3].stop(libc::SIGTERM, Duration::from_secs(5))?;
    if !st.success() {
        bail!("hb send exited with {st} on SIGTERM, expected 0");
    }
    expect_states(&mut monitor, &nodes_cmd, &[4], "left", step_timeout)?;
    show_table("after the clean stop", &nodes_cmd)?;

    println!(
        "\ndemo: node 5 crashes and comes straight back: a restart (larger generation), not a new node"
    );
    senders[4].stop(libc::SIGKILL, Duration::from_secs(2))?;
    senders[4] = sender(5)?;
    wait_for("a `restarted` event for node 5", step_timeout, || {
        check_monitor(&mut monitor)?;
        Ok(events
            .lock()
            .expect("event list")
            .iter()
            .any(|e| e.node_id == 5 && e.event == "restarted"))
    })?;
    expect_states(&mut monitor, &nodes_cmd, &[5], "alive", step_timeout)?;
    show_table("after the restart", &nodes_cmd)?;

    println!("\ndemo: stopping the senders and the monitor");
    for s in senders.iter_mut().filter(|s| s.child.is_some()) {
        s.stop(libc::SIGTERM, Duration::from_secs(5))?;
    }
    let st = monitor.stop(libc::SIGTERM, Duration::from_secs(10))?;
    if !st.success() {
        bail!("hb monitor exited with {st} on SIGTERM, expected 0");
    }
    Ok(())
}

/// Prints the monitor's events as they arrive and keeps them for the
/// checks.
fn pump_events(monitor: &mut Proc) -> anyhow::Result<Arc<Mutex<Vec<Event>>>> {
    let stdout = monitor
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("no stdout of the monitor")?;
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("  event: {line}");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let (Some(node_id), Some(event)) = (v["node_id"].as_u64(), v["event"].as_str()) {
                sink.lock().expect("event list").push(Event {
                    node_id,
                    event: event.to_owned(),
                });
            }
        }
    });
    Ok(events)
}

/// Fails if the monitor has exited.
fn check_monitor(monitor: &mut Proc) -> anyhow::Result<()> {
    if let Some(c) = monitor.child.as_mut()
        && let Some(st) = c.try_wait()?
    {
        monitor.child = None;
        bail!("hb monitor exited ({st})");
    }
    Ok(())
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if util::interrupted() {
            bail!("interrupted");
        }
        if ready()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every node in `ids` is in `state` according to `hb nodes
/// --json`.
fn expect_states(
    monitor: &mut Proc,
    nodes_cmd: &dyn Fn(bool) -> Command,
    ids: &[u64],
    state: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let what = format!("node(s) {ids:?} to be {state}");
    let mut last = String::new();
    wait_for(&what, timeout, || {
        check_monitor(monitor)?;
        let json = output(&mut nodes_cmd(true))?;
        let v: serde_json::Value = serde_json::from_str(&json).with_context(|| {
            format!("`hb nodes --json` printed something else than JSON: {json}")
        })?;
        let rows = v.as_array().context("`hb nodes --json` is not an array")?;
        let states: Vec<(u64, String)> = rows
            .iter()
            .filter_map(|r| Some((r["node_id"].as_u64()?, r["state"].as_str()?.to_owned())))
            .collect();
        last = format!("{states:?}");
        Ok(ids
            .iter()
            .all(|id| states.iter().any(|(n, s)| n == id && s == state)))
    })
    .with_context(|| format!("last seen: {last}"))
}

fn show_table(title: &str, nodes_cmd: &dyn Fn(bool) -> Command) -> anyhow::Result<()> {
    let table = output(&mut nodes_cmd(false))?;
    println!("demo: hb nodes ({title}):");
    for l in table.lines() {
        println!("  {l}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's network (needs root, like every namespace test): every
    /// node reaches the monitor across the bridge, and dropping the guard
    /// removes every namespace.
    #[test]
    fn network_connects_nodes_to_the_monitor_and_cleans_up() {
        let pid = std::process::id();
        let net = Net::build(pid).unwrap();
        for i in [1, NODES] {
            let ns = net.ns(&format!("n{i}"));
            output(Command::new("nsenter").args([
                &format!("--net=/var/run/netns/{ns}"),
                "--",
                "ping",
                "-c",
                "1",
                "-W",
                "5",
                MONITOR_IP,
            ]))
            .unwrap_or_else(|e| panic!("node {i} cannot reach the monitor: {e:#}"));
        }
        let names = net.names.clone();
        assert_eq!(names.len(), 2 + NODES as usize);
        drop(net);
        let list = output(Command::new("ip").args(["netns", "list"])).unwrap();
        for n in names {
            assert!(!list.contains(&n), "{n} left behind");
        }
    }
}

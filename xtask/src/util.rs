//! Shared plumbing: where the workspace is, running commands, signals, and
//! sweeping what killed test runs leave behind.
//!
//! Signals: `xtask` installs one handler for SIGINT/SIGTERM/SIGHUP. Every
//! long-running child is started in its own process group and registered
//! here, so the handler can forward the signal it received to that whole
//! group (cargo *and* the test binary it runs; `hb` under `cargo xtask
//! run`, where a SIGHUP is a reload), after which the caller waits for the
//! child and cleans up. The handler itself only stores atomics and calls
//! `kill(2)`, which is async-signal-safe territory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Process group of the child that should receive a forwarded signal (0:
/// none).
static FOREGROUND_PGID: AtomicI32 = AtomicI32::new(0);

/// The last of SIGINT/SIGTERM/SIGHUP that arrived (0: none).
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signals xtask handles, and forwards.
const HANDLED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Notes `sig` and forwards it, the very signal (a SIGHUP meant as a
/// reload for `hb monitor` under `cargo xtask run` stopped it when it was
/// forwarded as SIGINT), to the foreground group.
fn on_signal(sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
    let pgid = FOREGROUND_PGID.load(Ordering::SeqCst);
    if pgid > 0 {
        // SAFETY: kill(2) with a process group we started.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Installs the signal handler. Call once, first thing.
pub fn install_signal_handler() -> anyhow::Result<()> {
    for sig in HANDLED {
        // SAFETY: the action is async-signal-safe: atomics and kill(2)
        // (signal-hook-registry keeps errno and installs with SA_RESTART,
        // so a read or a wait in progress goes on).
        unsafe { signal_hook_registry::register(sig, move || on_signal(sig)) }
            .with_context(|| format!("cannot install the handler of signal {sig}"))?;
    }
    Ok(())
}

/// The signal to forward to a group started after one arrived.
fn last_signal() -> libc::c_int {
    match LAST_SIGNAL.load(Ordering::SeqCst) {
        0 => libc::SIGINT,
        sig => sig,
    }
}

/// Whether SIGINT/SIGTERM/SIGHUP arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root().join(d) }
        }
        None => root().join("target"),
    }
}

/// The `cargo` that runs us (so `cargo +toolchain xtask` stays consistent),
/// without the variables `cargo run` gave xtask ([`without_run_env`]).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    without_run_env(&mut c);
    c
}

/// Variables `cargo run -p xtask` (and `cargo test`) set for the program
/// they run, besides `CARGO_PKG_*`: xtask's, not its children's.
const RUN_ENV: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// Removes from `cmd` the variables `cargo run` set for xtask itself
/// ([`RUN_ENV`], `CARGO_PKG_*`). A nested cargo passes them on to build
/// scripts, and one that reruns when they change (ring's, on
/// `CARGO_MANIFEST_DIR`) did: hb-user and hb-tests were rebuilt at every
/// switch between `cargo build` and `cargo xtask test|bench`.
pub fn without_run_env(cmd: &mut Command) -> &mut Command {
    for k in RUN_ENV {
        cmd.env_remove(k);
    }
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("CARGO_PKG_")) {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Renders a command for the log.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Starts `cmd` in its own process group and makes it the target of
/// forwarded signals until it is waited for with [`wait_fg`].
pub fn spawn_fg(cmd: &mut Command) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    cmd.process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    FOREGROUND_PGID.store(child.id() as i32, Ordering::SeqCst);
    // A signal that arrived between spawn and registration is forwarded
    // now.
    if interrupted() {
        // SAFETY: kill(2) on the group we just started.
        unsafe { libc::kill(-(child.id() as i32), last_signal()) };
    }
    Ok(child)
}

/// Waits for a child started with [`spawn_fg`], and for the rest of its
/// process group: after an interrupt, cargo exits before the test binary
/// it ran, and a sweep must not run while that binary (whose pid names its
/// namespaces) still lives. A group that outlives its leader by 5 s is
/// killed.
pub fn wait_fg(child: &mut Child) -> anyhow::Result<ExitStatus> {
    let st = child.wait().context("waiting for a child process")?;
    let pgid = child.id() as i32;
    let group_alive = || {
        // SAFETY: signal 0 only checks for existence.
        unsafe { libc::kill(-pgid, 0) == 0 }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while group_alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if group_alive() {
        // SAFETY: kill(2) on the group we started.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while group_alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    FOREGROUND_PGID.store(0, Ordering::SeqCst);
    Ok(st)
}

/// Kills a process group started with [`spawn_fg`] that is still running
/// at a deadline: SIGTERM, then SIGKILL 10 s later. Dropping it disarms it.
pub struct Watchdog {
    disarm: Option<std::sync::mpsc::Sender<()>>,
    fired: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(pgid: u32, deadline: Duration) -> Watchdog {
        let (disarm, armed) = std::sync::mpsc::channel::<()>();
        let fired = std::sync::Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let thread = std::thread::spawn(move || {
            // A message or a dropped sender: disarmed.
            if armed.recv_timeout(deadline) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            flag.store(true, Ordering::SeqCst);
            let pgid = pgid as i32;
            eprintln!(
                "xtask: deadline of {}s passed: stopping process group {pgid}",
                deadline.as_secs()
            );
            // SAFETY: kill(2) on the group we started; signal 0 only checks
            // for existence.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let grace = std::time::Instant::now() + Duration::from_secs(10);
            while unsafe { libc::kill(-pgid, 0) } == 0 && std::time::Instant::now() < grace {
                if armed.recv_timeout(Duration::from_millis(50))
                    != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    return;
                }
            }
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        });
        Watchdog {
            disarm: Some(disarm),
            fired,
            thread: Some(thread),
        }
    }

    /// Whether the deadline passed (the group was signalled).
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a child's stdout may stay open after the child exited before
/// the processes holding it are killed ([`read_stdout`]).
const STDOUT_GRACE: Duration = Duration::from_secs(5);

/// How reading a child's stdout ended ([`read_stdout`]).
#[derive(Debug, Default)]
pub struct StdoutEnd {
    /// The read failed: what was read before counts, the rest is lost.
    pub error: Option<std::io::Error>,
    /// The processes that still held the pipe [`STDOUT_GRACE`] after the
    /// child exited and were killed, as `pid (command line)`.
    pub holders: Vec<String>,
    /// The pipe stayed open even then (a holder that cannot be seen or
    /// killed): the reading was abandoned.
    pub abandoned: bool,
}

/// One read of the reading thread.
enum Read {
    Line(String),
    End(Option<std::io::Error>),
}

/// Reads the stdout `child` was started with (`Stdio::piped()`) line by
/// line, lossily (a test's output may hold any bytes), into `on_line`,
/// until the pipe's end, and returns how it ended.
///
/// The pipe ends when every process holding it closed it, not when the
/// child exits: a process the child started with an inherited stdout and
/// left running (in its own session, where no group signal reaches it)
/// kept the reading, and the whole run, waiting long after the child's
/// result. So the pipe is read on a thread while the child is waited for
/// here; once the child exited, the pipe gets [`STDOUT_GRACE`] to close,
/// then whoever still holds it is killed (SIGKILL) and named in
/// [`StdoutEnd::holders`]. The child is reaped here ([`Child::try_wait`]);
/// [`wait_fg`] still returns its status.
pub fn read_stdout(child: &mut Child, mut on_line: impl FnMut(&str)) -> anyhow::Result<StdoutEnd> {
    use std::{io::BufRead as _, os::fd::AsRawFd as _, sync::mpsc};
    let stdout = child.stdout.take().context("no stdout pipe")?;
    // `pipe:[inode]`, as every holder's /proc/PID/fd/N reads.
    let pipe = std::fs::read_link(format!("/proc/self/fd/{}", stdout.as_raw_fd()))
        .context("cannot name the child's stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let read = match reader.read_until(b'\n', &mut raw) {
                Ok(0) => Read::End(None),
                Ok(_) => Read::Line(
                    String::from_utf8_lossy(&raw)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned(),
                ),
                Err(e) => Read::End(Some(e)),
            };
            let end = matches!(read, Read::End(_));
            // The receiver gone: the reading was abandoned.
            if tx.send(read).is_err() || end {
                return;
            }
        }
    });
    let mut end = StdoutEnd::default();
    // Lines until the pipe's end (`Some(..)`) or `until`; `None` at
    // `until`.
    let mut pump = |until: Option<std::time::Instant>| -> Option<Option<std::io::Error>> {
        let wait = until.map_or(Duration::from_millis(50), |u| {
            u.saturating_duration_since(std::time::Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(Read::Line(l)) => {
                on_line(&l);
                None
            }
            Ok(Read::End(e)) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => Some(None),
        }
    };
    let mut exited: Option<std::time::Instant> = None;
    loop {
        if let Some(e) = pump(None) {
            end.error = e;
            return Ok(end);
        }
        match exited {
            None => {
                if child
                    .try_wait()
                    .context("waiting for a child process")?
                    .is_some()
                {
                    exited = Some(std::time::Instant::now());
                }
            }
            Some(t) if t.elapsed() >= STDOUT_GRACE => break,
            Some(_) => {}
        }
    }
    // The child is gone and its stdout still open: kill whoever holds it,
    // in a few rounds (a holder may have started another meanwhile).
    for _ in 0..3 {
        for pid in holders_of(&pipe) {
            let cmdline = cmdline(pid);
            // SAFETY: kill(2) with a pid and a signal number.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                end.holders.push(format!("{pid} ({cmdline})"));
            }
        }
        let until = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < until {
            if let Some(e) = pump(Some(until)) {
                end.error = e;
                return Ok(end);
            }
        }
    }
    end.abandoned = true;
    Ok(end)
}

/// The processes other than this one with an open file descriptor on
/// `link` (what `/proc/PID/fd/N` reads, `pipe:[123]`).
fn holders_of(link: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.filter_map(Result::ok)
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == link))
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The command line of process `pid`, arguments separated by spaces
/// (empty if it cannot be read).
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_default()
}

/// Runs `cmd` in the foreground (signals forwarded) and fails if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let mut child = spawn_fg(cmd)?;
    let st = wait_fg(&mut child)?;
    if !st.success() {
        bail!("`{}` failed ({st})", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` to completion and returns its stdout, failing with its stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `prog` is an executable on PATH.
pub fn on_path(prog: &str) -> Option<PathBuf> {
    find_in(prog, std::env::var_os("PATH").as_deref(), &[])
}

/// `prog` in the directories of `path` (a PATH value), then in `extra`.
pub fn find_in(prog: &str, path: Option<&std::ffi::OsStr>, extra: &[&Path]) -> Option<PathBuf> {
    path.map(|p| std::env::split_paths(p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(extra.iter().map(|d| d.to_path_buf()))
        .map(|d| d.join(prog))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Objects younger than this whose name carries no process id are
/// considered in use by someone else's run on a shared machine.
const PIDLESS_GRACE: Duration = Duration::from_secs(5 * 60);

/// Whether the leftover named `name` (a namespace or a pin), last changed at
/// `mtime`, may be deleted now.
///
/// Test objects carry the pid of the process that made them (`hbt-<tag>-
/// <pid>-<n>`, `hbd-<pid>-...`); while that process lives, the object is
/// in use (this is a shared machine: other people's test runs are not
/// leftovers). Numbers below 300 are counters, not test processes. An
/// object without a pid is deleted in CI (a machine of its own) or once it
/// is older than [`PIDLESS_GRACE`].
fn is_leftover(name: &str, mtime: Option<SystemTime>) -> bool {
    let pids: Vec<u32> = name
        .split('-')
        .filter_map(|c| c.parse::<u32>().ok())
        .filter(|&p| p >= 300)
        .collect();
    if !pids.is_empty() {
        return !pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists());
    }
    if std::env::var_os("CI").is_some() {
        return true;
    }
    match mtime.and_then(|t| t.elapsed().ok()) {
        Some(age) => age > PIDLESS_GRACE,
        None => false,
    }
}

/// Deletes leftover network namespaces whose names start with one of
/// `prefixes`. Returns their names.
pub fn sweep_netns(prefixes: &[&str]) -> anyhow::Result<Vec<String>> {
    let list = output(Command::new("ip").args(["netns", "list"]))?;
    let mut deleted = Vec::new();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.is_empty() || !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let mtime = std::fs::metadata(format!("/var/run/netns/{name}"))
            .and_then(|m| m.modified())
            .ok();
        if !is_leftover(name, mtime) {
            continue;
        }
        // On past one that cannot be deleted: it is still counted (a
        // leftover either way), and the others still go.
        if let Err(e) = output(Command::new("ip").args(["netns", "delete", name])) {
            eprintln!("xtask: cannot delete namespace {name}: {e:#}");
        }
        deleted.push(name.to_owned());
    }
    Ok(deleted)
}

/// Deletes leftover bpffs pins (files or directories) under /sys/fs/bpf
/// whose names start with `prefix`. Returns their names.
pub fn sweep_pins(prefix: &str) -> anyhow::Result<Vec<String>> {
    // bpffs not mounted: nothing pinned.
    sweep_entries(Path::new("/sys/fs/bpf"), prefix)
}

/// Deletes leftover files or directories in `dir` whose names start with
/// `prefix` ([`is_leftover`]); none if `dir` cannot be read. Returns their
/// names.
fn sweep_entries(dir: &Path, prefix: &str) -> anyhow::Result<Vec<String>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut deleted = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let meta = e.metadata()?;
        if !is_leftover(&name, meta.modified().ok()) {
            continue;
        }
        let path = e.path();
        let removed = if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        // On past one that cannot be removed: counted all the same.
        if let Err(e) = removed {
            eprintln!("xtask: cannot remove {}: {e}", path.display());
        }
        deleted.push(name);
    }
    Ok(deleted)
}

/// Sweeps everything test runs create: `hbt-*` and `hbd-*` namespaces
/// and their `/etc/netns/` directories, and `/sys/fs/bpf/hb-test-*` pins. `when` goes into the log line.
/// Returns how many objects it removed (0 also when it could not look).
/// The namespaces tests make: `hbt-` (hb-tests), `hbd-` (the demo's,
/// which its unit test builds too; the pid in the name keeps a running
/// demo's).
const TEST_NETNS_PREFIXES: [&str; 2] = ["hbt-", "hbd-"];

pub fn sweep_test_leftovers(when: &str) -> usize {
    let mut swept = 0;
    // Says what one sweep removed, or why it could not look.
    let mut report = |what: &str, r: anyhow::Result<Vec<String>>| match r {
        Ok(v) if !v.is_empty() => {
            eprintln!(
                "xtask: {when}: removed {} leftover {what}: {}",
                v.len(),
                v.join(" ")
            );
            swept += v.len();
        }
        Ok(_) => {}
        Err(e) => eprintln!("xtask: {when}: cannot sweep {what}: {e:#}"),
    };
    report("namespace(s)", sweep_netns(&TEST_NETNS_PREFIXES));
    // A namespace's own `/etc/netns/<name>/` (`NetNs::hosts` in the
    // tests), which `ip netns delete` leaves.
    for prefix in TEST_NETNS_PREFIXES {
        report(
            "namespace dir(s) under /etc/netns",
            sweep_entries(Path::new("/etc/netns"), prefix),
        );
    }
    report("pin(s) under /sys/fs/bpf", sweep_pins("hb-test-"));
    swept
}

/// The processes running one of this workspace's `hb` binaries (under
/// `target`), as pids. Zombies and processes that end while being looked
/// at are not listed.
fn hb_processes_of(target: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
                exe.starts_with(target) && exe.file_name().is_some_and(|n| n == "hb")
            })
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The environment variable `cargo xtask test` marks its test run with:
/// every process the tests start inherits it.
pub const RUN_MARK: &str = "HB_XTASK_TEST_RUN";

/// Kills the `hb` processes of this workspace that carry `RUN_MARK=run`
/// in their environment: what the tests of that run started and left
/// running once they ended (whoever adopted them: init or a subreaper
/// such as `systemd --user`). A monitor or demo started by hand carries
/// no mark and is left alone. Returns their pids and command lines.
pub fn kill_marked_hb_processes(run: &str) -> Vec<String> {
    kill_marked_hb_processes_of(&target_dir(), run)
}

/// [`kill_marked_hb_processes`] once the tests have ended, before their
/// process group is killed ([`wait_fg`] kills what outlives cargo by 5 s,
/// and an `hb` a test left running is in it: killed there, it was never
/// seen, and the run passed). The marked processes get `grace` to go (a
/// test's drop may be killing one) before they count as left running.
pub fn left_marked_hb_processes(run: &str, grace: Duration) -> Vec<String> {
    let target = target_dir();
    let deadline = std::time::Instant::now() + grace;
    while !marked_hb_processes_of(&target, run).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_marked_hb_processes_of(&target, run)
}

/// The `hb` processes of `target` marked with `run` (see [`RUN_MARK`]).
fn marked_hb_processes_of(target: &Path, run: &str) -> Vec<u32> {
    let mark = format!("{RUN_MARK}={run}");
    hb_processes_of(target)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == mark.as_bytes()))
        })
        .collect()
}

fn kill_marked_hb_processes_of(target: &Path, run: &str) -> Vec<String> {
    let mut killed = Vec::new();
    for pid in marked_hb_processes_of(target, run) {
        let cmdline = cmdline(pid);
        // SAFETY: kill(2) with a pid and a signal number.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
            killed.push(format!("{pid} ({cmdline})"));
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_recognised_by_their_pid() {
        let me = std::process::id();
        assert!(!is_leftover(&format!("hbt-xa-{me}-0"), None));
        // pid_max is at most 2^22: this pid cannot exist.
        assert!(is_leftover("hbt-xa-99999999-3", None));
        assert!(is_leftover(&format!("hbd-99999999-n{me}"), None));
        let old = SystemTime::now() - Duration::from_secs(3600);
        assert!(is_leftover("hb-test-x-old", Some(old)));
        if std::env::var_os("CI").is_none() {
            assert!(!is_leftover("hb-test-x-new", Some(SystemTime::now())));
        }
    }

    /// The `hb` processes a test run left running are found by the mark
    /// it gave them, whoever adopted them; one without the mark (a
    /// monitor started by hand) is left alone.
    #[test]
    fn hb_processes_a_test_run_left_are_killed_and_others_left() {
        let dir = std::env::temp_dir().join(format!("xtask-hb-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hb = dir.join("hb");
        std::fs::copy(on_path("sleep").expect("sleep on PATH"), &hb).unwrap();
        let run = format!("t{}", std::process::id());
        let spawn_orphan = |mark: &str| -> u32 {
            let out = output(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "{} 30 </dev/null >/dev/null 2>&1 & echo $!",
                        hb.display()
                    ))
                    .env(RUN_MARK, mark),
            )
            .unwrap();
            let pid: u32 = out.trim().parse().unwrap();
            // The shell's child may not have run exec yet.
            let t = std::time::Instant::now();
            while !hb_processes_of(&dir).contains(&pid) && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
            pid
        };
        let other_run = spawn_orphan("another-run");
        let mut by_hand = Command::new(&hb)
            .arg("30")
            .env_remove(RUN_MARK)
            .spawn()
            .unwrap();
        let mut child = Command::new(&hb)
            .arg("30")
            .env(RUN_MARK, &run)
            .spawn()
            .unwrap();
        let orphan = spawn_orphan(&run);
        let seen = hb_processes_of(&dir);
        let mut marked = marked_hb_processes_of(&dir, &run);
        let killed = kill_marked_hb_processes_of(&dir, &run);
        let _ = child.wait();
        let _ = by_hand.kill();
        let _ = by_hand.wait();
        // SAFETY: kill(2) with a pid and a signal number.
        unsafe { libc::kill(other_run as libc::pid_t, libc::SIGKILL) };
        let _ = std::fs::remove_dir_all(&dir);
        for p in [other_run, orphan, child.id(), by_hand.id()] {
            assert!(seen.contains(&p), "{p} in {seen:?}");
        }
        let mut pids: Vec<u32> = killed
            .iter()
            .map(|k| k.split(' ').next().unwrap().parse().unwrap())
            .collect();
        pids.sort_unstable();
        let mut want = vec![orphan, child.id()];
        want.sort_unstable();
        assert_eq!(pids, want, "{killed:?}");
        marked.sort_unstable();
        assert_eq!(marked, want, "seen as left running before the kill");
        assert!(
            killed.iter().all(|k| k.ends_with(" 30)")),
            "the command lines: {killed:?}"
        );
    }

    /// A nested cargo (or anything else xtask runs) does not see the
    /// package variables `cargo run` gave xtask.
    #[test]
    fn nested_cargo_gets_no_variables_of_xtasks_package() {
        // `cargo test` sets them for this test as `cargo run` does for
        // xtask.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let cargo = cargo();
        for k in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "CARGO_BIN_NAME"] {
            assert!(
                cargo.get_envs().any(|(n, v)| n == k && v.is_none()),
                "{k} not removed"
            );
        }
        let env = output(without_run_env(&mut Command::new("env"))).unwrap();
        let seen: Vec<&str> = env
            .lines()
            .filter(|l| {
                l.starts_with("CARGO_PKG_")
                    || RUN_ENV.iter().any(|k| l.starts_with(&format!("{k}=")))
            })
            .collect();
        assert_eq!(seen, Vec::<&str>::new());
    }

    /// SIGHUP, SIGTERM and SIGINT sent to xtask reach the foreground
    /// group as themselves. Run in a process of its own (this test binary
    /// again, this test only): the handler is process-wide.
    #[test]
    fn the_signal_received_is_the_signal_forwarded() {
        const CHILD: &str = "HB_XTASK_SIGNAL_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "util::tests::the_signal_received_is_the_signal_forwarded",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{all}");
            assert!(all.contains("1 passed"), "{all}");
            return;
        }
        install_signal_handler().unwrap();
        for (sig, name) in [
            (libc::SIGHUP, "HUP"),
            (libc::SIGTERM, "TERM"),
            (libc::SIGINT, "INT"),
        ] {
            // After a signal, every group started gets it at once
            // (`spawn_fg`): each signal here is a first one.
            INTERRUPTED.store(false, Ordering::SeqCst);
            LAST_SIGNAL.store(0, Ordering::SeqCst);
            // Says which signal reached it; bounded at 10 s.
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(
                    "trap 'echo HUP; exit 0' HUP; trap 'echo TERM; exit 0' TERM; \
                     trap 'echo INT; exit 0' INT; echo ready; \
                     i=0; while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; echo none",
                )
                .stdout(Stdio::piped())
                .stdin(Stdio::null());
            let mut child = spawn_fg(&mut sh).unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert_eq!(line, "ready\n");
            // SAFETY: kill(2) to ourselves with a handled signal.
            unsafe { libc::kill(std::process::id() as libc::pid_t, sig) };
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
            let _ = wait_fg(&mut child).unwrap();
            assert_eq!(rest.trim(), name, "sent SIG{name}");
            assert_eq!(last_signal(), sig);
        }
        assert!(interrupted());
    }

    #[test]
    fn the_watchdog_stops_a_group_past_its_deadline_and_only_then() {
        let mut late = Command::new("sleep");
        late.arg("30");
        let mut child = spawn_fg(&mut late).unwrap();
        let dog = Watchdog::start(child.id(), Duration::from_millis(300));
        let t = std::time::Instant::now();
        let st = wait_fg(&mut child).unwrap();
        assert!(dog.fired());
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGTERM),
            "{st}"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        drop(dog);

        let mut quick = Command::new("true");
        let mut child = spawn_fg(&mut quick).unwrap();
        let dog = Watchdog::start(child.id(), Duration::from_secs(3600));
        assert!(wait_fg(&mut child).unwrap().success());
        assert!(!dog.fired());
        let t = std::time::Instant::now();
        drop(dog);
        assert!(t.elapsed() < Duration::from_secs(1), "disarming waited");
    }

    /// `/etc/netns/<name>/` of a test killed before its guard dropped is
    /// swept as its namespace is: by the pid in its name.
    #[test]
    fn leftover_entries_are_swept_by_the_pid_in_their_name() {
        let me = std::process::id();
        let dir = std::env::temp_dir().join(format!("hb-xtask-sweep-{me}"));
        let _ = std::fs::remove_dir_all(&dir);
        let (dead, alive, other) = (
            "hbt-s-99999999-1".to_owned(),
            format!("hbt-s-{me}-1"),
            "hbx-s-99999999-1".to_owned(),
        );
        for name in [&dead, &alive, &other] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("hosts"), "198.18.0.1 mon\n").unwrap();
        }
        let swept = sweep_entries(&dir, "hbt-").unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(swept, [dead]);
        assert_eq!(left, [alive, other]);
        assert_eq!(
            sweep_entries(&dir, "hbt-").unwrap(),
            Vec::<String>::new(),
            "a directory that is not there"
        );
    }

    /// A namespace the demo's unit test left (its binary killed without
    /// unwinding) is swept with the tests' own. Only this one is swept
    /// here: this binary runs after the others, and the whole sweep it
    /// made removed what they had left, which the run then never counted.
    #[test]
    fn the_sweep_takes_the_demos_leftovers_too() {
        let me = std::process::id();
        let dead = format!("hbd-99999999-sweep{me}");
        assert!(
            TEST_NETNS_PREFIXES.iter().any(|p| dead.starts_with(p)),
            "{TEST_NETNS_PREFIXES:?}"
        );
        output(Command::new("ip").args(["netns", "add", &dead])).unwrap();
        let swept = sweep_netns(&[&dead]);
        let list = output(Command::new("ip").args(["netns", "list"])).unwrap();
        let left = list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&dead));
        if left {
            let _ = output(Command::new("ip").args(["netns", "delete", &dead]));
        }
        assert!(!left, "{dead} was not swept");
        assert_eq!(swept.unwrap(), [dead]);
    }
}

//! `hb keys` and `hb send` as a user runs them: the real binary, its exit
//! code and what it prints. Bad input must give one clear line naming the
//! problem and a non-zero exit, never a panic, and never echo a secret.
//!
//! Every `hb send` here runs in a fresh network namespace of its own, with
//! nothing but a loopback that is down: whatever a regression makes it do,
//! a heartbeat or a name lookup cannot leave the machine (sending fails
//! with ENETUNREACH, and no resolver is reachable). That needs root, as
//! CI has; without it those tests fail and say so. Every run is bounded in
//! time: one that does not end on its own fails instead of hanging.

use std::{
    io::Read,
    os::unix::process::CommandExt as _,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const HB: &str = env!("CARGO_BIN_EXE_hb");

/// PROTOCOL.md's master secret, bytes 00..1f.
const VECTOR_SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// Far longer than any of these runs takes, far shorter than CI's budget.
const TIMEOUT: Duration = Duration::from_secs(20);

/// `hb args`, with no key in the environment; `send` in a network
/// namespace of its own (see the module doc).
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(HB);
    cmd.args(args)
        .env_remove("HB_NODE_KEY")
        .env("HB_LOG", "warn");
    if args.first() == Some(&"send") {
        isolate(&mut cmd);
    }
    cmd
}

/// Makes `cmd` start in a new, empty network namespace.
fn isolate(cmd: &mut Command) {
    // SAFETY: unshare(2) is async-signal-safe, and the closure touches
    // nothing else between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn hb(args: &[&str]) -> Output {
    output(&mut command(args))
}

/// A started `hb`: its stdout and stderr drained on threads, so a chatty
/// child never blocks on a full pipe; collected with a bound, in case it
/// left a grandchild holding one.
struct Running {
    child: std::process::Child,
    out: mpsc::Receiver<Vec<u8>>,
    err: mpsc::Receiver<Vec<u8>>,
    /// What [`Running::wait_stderr`] took of `err` so far.
    err_seen: Vec<u8>,
}

/// The pipe's bytes as they come, a chunk a message; the channel closes
/// at end of file.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
    }
    rx
}

/// The rest of `rx` up to end of file, waiting at most 5 s for it.
fn collect(rx: &mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut all = Vec::new();
    while let Ok(chunk) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        all.extend(chunk);
    }
    all
}

impl Running {
    fn start(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {cmd:?}: {e} (`hb send` runs in a network namespace \
                     of its own: that needs root)"
                )
            });
        let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
        Running {
            child,
            out,
            err,
            err_seen: Vec::new(),
        }
    }

    /// Waits until `ready` holds for its stderr so far; fails the test if
    /// it does not within [`TIMEOUT`] (`what` says what was awaited), or if
    /// `hb` closed its stderr (ended) first.
    fn wait_stderr(&mut self, cmd: &Command, what: &str, ready: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !ready(&String::from_utf8_lossy(&self.err_seen)) {
            match self
                .err
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(chunk) => self.err_seen.extend(chunk),
                Err(e) => panic!(
                    "{cmd:?}: no {what} ({}); stderr: {}",
                    match e {
                        mpsc::RecvTimeoutError::Timeout => format!("within {TIMEOUT:?}"),
                        mpsc::RecvTimeoutError::Disconnected => "it ended".into(),
                    },
                    String::from_utf8_lossy(&self.err_seen)
                ),
            }
        }
    }

    /// SIGTERM, as systemd stops it, and its output once it ended; fails
    /// the test if it had ended by itself already (`run` says after what).
    fn sigterm(mut self, cmd: &Command, run: &str) -> Output {
        if let Some(st) = self.child.try_wait().expect("wait for hb") {
            let mut err = std::mem::take(&mut self.err_seen);
            err.extend(collect(&self.err));
            panic!(
                "{cmd:?} ended by itself ({st}) {run}; stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        // SAFETY: kill(2) on our own child, which has not been reaped.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
        self.finish(cmd, "after SIGTERM")
    }

    /// Its output once it ended; kills it and fails the test (`what` says
    /// what it was waiting for) if it has not within [`TIMEOUT`].
    fn finish(mut self, cmd: &Command, what: &str) -> Output {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait for hb") {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let mut err = std::mem::take(&mut self.err_seen);
                err.extend(collect(&self.err));
                panic!(
                    "{cmd:?} still running {TIMEOUT:?} {what}, killed; stderr: {}",
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = std::mem::take(&mut self.err_seen);
        stderr.extend(collect(&self.err));
        Output {
            status,
            stdout: collect(&self.out),
            stderr,
        }
    }
}

/// Runs `cmd` like [`Command::output`], but kills it and fails the test if
/// it is still running after [`TIMEOUT`].
fn output(cmd: &mut Command) -> Output {
    Running::start(cmd).finish(cmd, "after its start")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure whose first stderr line contains `want`, with no
/// panic, no backtrace and (for our own errors) exactly one line.
fn assert_fails(o: &Output, want: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "succeeded; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.contains(want),
        "first line `{first}` lacks `{want}`; all: {err}"
    );
    if first.starts_with("hb: ") {
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "more than one line: {err}"
        );
    }
    assert!(!err.contains("abab"), "a secret leaked: {err}");
}

/// A keyring file holding `text`, private to its owner as hb requires.
fn keyring(text: &str) -> (tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("keyring.toml");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = p.display().to_string();
    (d, s)
}

#[test]
fn keys_new_prints_a_fresh_secret() {
    let a = hb(&["keys", "new"]);
    let b = hb(&["keys", "new"]);
    assert!(a.status.success(), "{}", stderr(&a));
    let (a, b) = (stdout(&a), stdout(&b));
    let a = a.trim();
    assert_eq!(a.len(), 64, "{a}");
    assert!(
        a.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_ne!(a, b.trim());
}

#[test]
fn keys_derive_gives_the_protocol_vectors() {
    let (_d, ring) = keyring(&format!(
        "[[epoch]]\nid = 0\nsecret = \"{VECTOR_SECRET}\"\n[[epoch]]\nid = 1\nsecret = \"{VECTOR_SECRET}\"\n"
    ));
    // Default epoch: the newest (1), which the log names for `hb send`.
    let o = output(
        command(&["keys", "derive", "--keyring", &ring, "--node-id", "42"]).env("HB_LOG", "info"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "6df25b19dd0205345e893133518757d6\n");
    assert!(
        stderr(&o).contains("hb send --key-epoch 1"),
        "{}",
        stderr(&o)
    );
    let o = hb(&[
        "keys",
        "derive",
        "--keyring",
        &ring,
        "--node-id",
        "1",
        "--epoch",
        "0",
    ]);
    assert_eq!(stdout(&o), "fd637554fc564d73044384760801da17\n");
}

#[test]
fn bad_keyrings_fail_with_one_line() {
    let secret = "ab".repeat(32);
    let cases = [
        (
            "[[epoch]\nid = 1\n".to_owned(),
            "is not valid TOML at line 1",
        ),
        (
            format!("[[epoch]]\nid = 1\nsecret = \"{}\"\n", &secret[..60]),
            "epoch 1: secret must be 64 hex digits (32 bytes), got 60 characters",
        ),
        (
            format!("[[epoch]]\nid = 1\nsecret = \"{}\"\n", "ab".repeat(33)),
            "got 66 characters",
        ),
        (
            format!(
                "[[epoch]]\nid = 1\nsecret = \"{}\"\n[[epoch]]\nid = 1\nsecret = \"{secret}\"\n",
                secret.replace('b', "c")
            ),
            "epoch 1 appears more than once",
        ),
        ("# nothing\n".to_owned(), "has no [[epoch]] table"),
        // Valid TOML: not said to be invalid TOML.
        (
            format!("[[epoch]]\nid = 300\nsecret = \"{secret}\"\n"),
            "at line 2, column 6: epoch id 300 is out of range: ids are 0 to 255",
        ),
    ];
    for (text, want) in cases {
        let (_d, ring) = keyring(&text);
        let o = hb(&["keys", "derive", "--keyring", &ring, "--node-id", "1"]);
        assert_fails(&o, want);
        assert!(stderr(&o).contains(&ring), "names the file: {}", stderr(&o));
        // The sender reports the same problem the same way.
        let o = hb(&[
            "send",
            "--monitor",
            "198.18.0.1:7420",
            "--node-id",
            "1",
            "--keyring",
            &ring,
        ]);
        assert_fails(&o, want);
    }
    let o = hb(&[
        "keys",
        "derive",
        "--keyring",
        "/nonexistent/keyring.toml",
        "--node-id",
        "1",
    ]);
    assert_fails(&o, "cannot read keyring /nonexistent/keyring.toml");
    assert_eq!(
        stderr(&o),
        "hb: cannot read keyring /nonexistent/keyring.toml: No such file or directory (os error 2)\n"
    );
    let (_d, ring) = keyring(&format!("[[epoch]]\nid = 1\nsecret = \"{secret}\"\n"));
    let o = hb(&[
        "keys",
        "derive",
        "--keyring",
        &ring,
        "--node-id",
        "1",
        "--epoch",
        "2",
    ]);
    assert_fails(&o, "has no epoch 2 (it has 1)");
}

#[test]
fn bad_sender_options_fail_with_one_line() {
    let key = "6df25b19dd0205345e893133518757d6";
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("state").display().to_string();
    let key_file = d.path().join("node.key");
    std::fs::write(&key_file, "not a key\n").unwrap();
    private(&key_file);
    let key_file = key_file.display().to_string();
    let m = "198.18.0.1:7420";
    let bad_hex = "zz".repeat(16);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--monitor", m, "--node-id", "1", "--key", "abc"],
            "bad --key: a node key: must be 32 hex digits (16 bytes), got 3 characters",
        ),
        (
            vec!["--monitor", m, "--node-id", "1", "--key", &bad_hex],
            "bad --key: a node key: must be hex digits only",
        ),
        (
            vec!["--monitor", m, "--node-id", "1", "--key-file", &key_file],
            "bad key in",
        ),
        (
            vec![
                "--monitor",
                m,
                "--node-id",
                "1",
                "--key-file",
                "/nonexistent/node.key",
            ],
            "cannot read key file /nonexistent/node.key",
        ),
        (
            vec!["--monitor", m, "--node-id", "0", "--key", key],
            "node id 0 is reserved",
        ),
        (
            vec!["--monitor", m, "--node-id", "x", "--key", key],
            "is not a node id",
        ),
        (
            vec!["--monitor", "198.18.0.1", "--node-id", "1", "--key", key],
            "monitor `198.18.0.1` needs a port",
        ),
        (
            vec!["--monitor", m, "--node-id", "1"],
            "one of --key, --key-file or --keyring (or HB_NODE_KEY) is required",
        ),
        (
            vec![
                "--monitor",
                m,
                "--node-id",
                "1",
                "--key",
                key,
                "--interval-ms",
                "50",
            ],
            "--interval-ms 50 must lie within --min-interval-ms 100",
        ),
        (
            vec![
                "--monitor",
                m,
                "--node-id",
                "1",
                "--key",
                key,
                "--min-interval-ms",
                "1",
                "--interval-ms",
                "5",
            ],
            "intervals must lie within 10 to 3600000 ms",
        ),
        (
            vec![
                "--monitor",
                m,
                "--node-id",
                "1",
                "--key",
                key,
                "--min-interval-ms",
                "5000",
                "--max-interval-ms",
                "100",
            ],
            "hb: --min-interval-ms 5000 exceeds --max-interval-ms 100",
        ),
        (
            vec![
                "--monitor",
                m,
                "--node-id",
                "1",
                "--key",
                key,
                "--state-dir",
                &under_file,
            ],
            "cannot create state directory",
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["send"];
        let keyed = args.contains(&"--key") || args.contains(&"--key-file");
        full.extend(args);
        if keyed {
            full.extend(["--key-epoch", "1"]);
        }
        let o = hb(&full);
        assert_fails(&o, want);
    }
    // A key without its epoch: no default can be right (keyrings start
    // at 1, rotations move on), and a wrong one is silent `bad_epoch`.
    let good_file = d.path().join("good.key");
    std::fs::write(&good_file, format!("{key}\n")).unwrap();
    private(&good_file);
    let good_file = good_file.display().to_string();
    for (args, what) in [
        (vec!["--key", key], "--key"),
        (vec!["--key-file", &good_file], "--key-file"),
    ] {
        let mut full = vec!["send", "--monitor", m, "--node-id", "1"];
        full.extend(args);
        assert_fails(
            &hb(&full),
            &format!("{what} needs --key-epoch E, the epoch the key was derived for"),
        );
    }
    let o = output(command(&["send", "--monitor", m, "--node-id", "1"]).env("HB_NODE_KEY", key));
    assert_fails(&o, "HB_NODE_KEY needs --key-epoch E");
}

/// HB_NODE_KEY is the key when no option names one, and only then: a
/// stray one in the environment once made `--key-file` and `--keyring`
/// fail as conflicting with `--key`.
#[test]
fn the_key_from_the_environment_yields_to_the_options() {
    let send = |env: &str, args: &[&str]| {
        let mut full = vec!["send", "--monitor", "198.18.0.1:7420", "--node-id", "1"];
        full.extend(args);
        if !args.contains(&"--keyring") {
            full.extend(["--key-epoch", "1"]);
        }
        // An invalid interval stops the sender after its key is read,
        // before it sends anything.
        full.extend(["--interval-ms", "50"]);
        output(command(&full).env("HB_NODE_KEY", env))
    };
    let good = "6df25b19dd0205345e893133518757d6";
    let d = tempfile::tempdir().unwrap();
    let key_file = d.path().join("node.key");
    std::fs::write(&key_file, format!("{good}\n")).unwrap();
    private(&key_file);
    let key_file = key_file.display().to_string();
    let interval = "--interval-ms 50 must lie within --min-interval-ms 100";
    // Used: a bad one is named, a good one gets the sender to its next check.
    assert_fails(
        &send("abc", &[]),
        "bad HB_NODE_KEY: a node key: must be 32 hex digits",
    );
    assert_fails(&send(good, &[]), interval);
    // Ignored (even a bad one) when an option names the key.
    assert_fails(&send("abc", &["--key-file", &key_file]), interval);
    assert_fails(&send("abc", &["--key", good]), interval);
    let (_d, ring) = keyring(&format!(
        "[[epoch]]\nid = 1\nsecret = \"{VECTOR_SECRET}\"\n"
    ));
    assert_fails(&send("abc", &["--keyring", &ring]), interval);
}

/// Output to a reader that went away (`hb ... | head`) ends quietly: exit
/// 0, no panic (Rust ignores SIGPIPE, so a write gets EPIPE).
#[test]
fn a_closed_pipe_on_stdout_is_not_a_panic() {
    for args in [&["keys", "new"][..], &["simulate", "--list"][..]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = command(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("hb {args:?} still running");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "hb {args:?}: {status}: {err}");
        assert!(!err.contains("panicked"), "hb {args:?}: {err}");
    }
}

/// `hb nodes` against a monitor that accepts the connection and never
/// answers (stopped, wedged): one clear line within its timeout, not a
/// hang. The listener is on this host's loopback and never accepts.
#[test]
fn hb_nodes_gives_up_on_a_monitor_that_does_not_answer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let out = hb(&["nodes", "--monitor", &addr, "--timeout-ms", "300"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("did not answer within 300 ms"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty());
    drop(listener);
    // --state with a node id is refused rather than ignored.
    let out = hb(&["nodes", "--state", "dead", "5"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `hb nodes --monitor` takes a host name, as `hb send --monitor` does (it
/// was refused: `invalid socket address syntax`), and shows LAST_SEEN in
/// units, not as raw ms. The monitor is a stand-in on this host's
/// loopback that answers one `GET /nodes` with one row.
#[test]
fn hb_nodes_takes_a_host_name_and_shows_last_seen_in_units() {
    use std::io::Write as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let rows = r#"[{"node_id":7,"state":"alive","phi":0.5,"generation":3,"accepted":10,"last_seen_ms":226462,"interval_ms":1000,"requested_interval_ms":0,"mean_interarrival_ms":1000.0,"lost":0,"restarts":0,"rtt_us":0,"load":0,"bad_tag":0,"replay":0,"stale":0,"acks_sent":0,"leaving":false,"state_for_ms":5000,"origin":"configured","slot":0,"last_decision":null}]"#;
    let monitor = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).unwrap() {
                0 => break,
                n => head.extend_from_slice(&buf[..n]),
            }
        }
        write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{rows}",
            rows.len()
        )
        .unwrap();
        String::from_utf8_lossy(&head).into_owned()
    });
    let out = hb(&[
        "nodes",
        "--monitor",
        &format!("localhost:{port}"),
        "--timeout-ms",
        "5000",
    ]);
    // Checked before waiting for the stand-in, which a refused address
    // never reaches.
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(monitor.join().unwrap().starts_with("GET /nodes HTTP/1.1"));
    let table = stdout(&out);
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("7 ") && row.contains(" 3m46s "), "{table}");
    // A name that does not resolve: one line naming it (in a network
    // namespace of its own: no resolver to wait for).
    let mut cmd = command(&["nodes", "--monitor", "no-such-host.invalid:9420"]);
    isolate(&mut cmd);
    assert_fails(
        &output(&mut cmd),
        "hb: cannot resolve --monitor no-such-host.invalid:9420",
    );
}

/// A stand-in monitor on this host's loopback: takes one connection, reads
/// the request's head, lets `answer` write the answer; its thread gives
/// back the head and what `answer` returned. (Joined only once `hb` has
/// connected.)
fn stand_in<T: Send + 'static>(
    answer: impl FnOnce(&mut std::net::TcpStream) -> T + Send + 'static,
) -> (String, std::thread::JoinHandle<(String, T)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let answered = answer(&mut conn);
        (String::from_utf8_lossy(&head).into_owned(), answered)
    });
    (addr, server)
}

/// A 200 answer of `body` (its length given: `cut` bytes of it left out
/// make it an answer cut short).
fn answer_with(body: String, cut: usize) -> impl FnOnce(&mut std::net::TcpStream) + Send {
    use std::io::Write as _;
    move |conn| {
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(&body.as_bytes()[..body.len() - cut]);
    }
}

/// Rows with every kind of cell: a node never heard from (LAST_SEEN
/// never, PHI inf, no EPOCH), the widest id and state, a load of 100%.
const NODES_FIXTURE: &str = r#"[{"node_id":7,"state":"alive","phi":0.5,"generation":3,"accepted":10,"last_seen_ms":226462,"interval_ms":1000,"requested_interval_ms":0,"mean_interarrival_ms":1000.0,"lost":0,"restarts":0,"rtt_us":0,"load":0,"bad_tag":0,"replay":0,"stale":0,"acks_sent":0,"key_epoch":1,"leaving":false,"state_for_ms":5000,"origin":"configured","slot":0,"last_decision":null},{"node_id":4294967295,"state":"suspect","phi":12.5,"generation":1795578333,"accepted":123456789,"last_seen_ms":4200,"interval_ms":250,"requested_interval_ms":1500,"mean_interarrival_ms":250.25,"lost":17,"restarts":2,"rtt_us":180,"load":1000,"bad_tag":0,"replay":0,"stale":0,"acks_sent":9,"key_epoch":null,"leaving":false,"state_for_ms":75,"origin":"enrolled","slot":1,"last_decision":{"interval_ms":1500,"ago_ms":12,"policy":"qlearn","reason":"greedy","action":"slower"}},{"node_id":12,"state":"dead","phi":1.7976931348623157e308,"generation":0,"accepted":0,"last_seen_ms":null,"interval_ms":1000,"requested_interval_ms":0,"mean_interarrival_ms":0.0,"lost":0,"restarts":0,"rtt_us":0,"load":5,"bad_tag":0,"replay":0,"stale":0,"acks_sent":0,"leaving":false,"state_for_ms":90061001,"origin":"adopted","slot":2,"last_decision":null}]"#;

/// `hb nodes` prints the table as it did when it held the whole answer
/// (the columns as wide as their widest cells), and `--json` prints the
/// answer as the monitor wrote it; one node too.
#[test]
fn hb_nodes_prints_the_table_and_the_json_as_the_monitor_sent_them() {
    let want = "\
NODE        STATE    PHI    GEN         ACCEPTED   LAST_SEEN  INTERVAL  REQUESTED  LOST  RESTARTS  RTT_US  LOAD    EPOCH
7           alive    0.50   3           10         3m46s      1000ms    -          0     0         0       0.0%    1
4294967295  suspect  12.50  1795578333  123456789  4s200ms    250ms     1500ms     17    2         180     100.0%  -
12          dead     inf    0           0          never      1000ms    -          0     0         0       0.5%    -
";
    for (json, want) in [
        (false, want.to_owned()),
        (true, format!("{NODES_FIXTURE}\n")),
    ] {
        let (addr, monitor) = stand_in(answer_with(NODES_FIXTURE.to_owned(), 0));
        let mut args = vec!["nodes", "--monitor", &addr, "--timeout-ms", "5000"];
        if json {
            args.push("--json");
        }
        let out = hb(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), want);
        assert!(monitor.join().unwrap().0.starts_with("GET /nodes HTTP/1.1"));
    }
    let one = NODES_FIXTURE[1..NODES_FIXTURE.find("},{").unwrap() + 1].to_owned();
    for (json, want) in [
        (
            false,
            format!("{}\n", want.lines().take(2).collect::<Vec<_>>().join("\n")),
        ),
        (true, format!("{one}\n")),
    ] {
        let (addr, monitor) = stand_in(answer_with(one.clone(), 0));
        let mut args = vec!["nodes", "--monitor", &addr, "--timeout-ms", "5000", "7"];
        if json {
            args.push("--json");
        }
        let out = hb(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let got = stdout(&out);
        if json {
            assert_eq!(got, want);
        } else {
            // One row: its own widths.
            let words = |t: &str| t.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            assert_eq!(words(&got), words(&want), "{got}");
            assert!(got.starts_with("NODE  STATE  PHI   GEN"), "{got}");
        }
        assert!(
            monitor
                .join()
                .unwrap()
                .0
                .starts_with("GET /nodes/7 HTTP/1.1")
        );
    }
}

/// An answer that is not the node table (another service's JSON, or
/// rows of the wrong shape), or one cut short, is an error, and nothing
/// is printed of it, the JSON neither: a script must not take it for
/// the node table.
#[test]
fn hb_nodes_prints_nothing_of_a_foreign_or_truncated_answer() {
    let foreign = [
        (r#"{"error":"no such route"}"#.to_owned(), 0),
        (r#"[{"node_id":7,"state":"alive"}]"#.to_owned(), 0),
        (format!("{NODES_FIXTURE} trailing"), 0),
        (NODES_FIXTURE.to_owned(), 1),
        (NODES_FIXTURE.to_owned(), 200),
    ];
    for (body, cut) in foreign {
        for json in [false, true] {
            let (addr, _monitor) = stand_in(answer_with(body.clone(), cut));
            let mut args = vec!["nodes", "--monitor", &addr, "--timeout-ms", "5000"];
            if json {
                args.push("--json");
            }
            let out = hb(&args);
            let err = stderr(&out);
            assert!(!out.status.success(), "{body} cut by {cut}");
            assert!(
                err.contains("unexpected answer from the monitor")
                    || err.contains("reading the answer to GET /nodes"),
                "{err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert!(
                out.stdout.is_empty(),
                "{body} cut by {cut}: {}",
                stdout(&out)
            );
        }
    }
}

/// A row of a synthetic fleet, ~550 bytes like the monitor's rows under
/// qlearn.
fn synthetic_row(id: u32) -> String {
    format!(
        r#"{{"node_id":{id},"state":"alive","phi":0.12,"generation":1795578333,"accepted":{},"last_seen_ms":{},"interval_ms":1000,"requested_interval_ms":1500,"mean_interarrival_ms":1000.1234567,"lost":0,"restarts":0,"rtt_us":0,"load":100,"bad_tag":0,"replay":0,"stale":0,"acks_sent":264,"key_epoch":1,"leaving":false,"state_for_ms":264000,"origin":"configured","slot":{},"last_decision":{{"interval_ms":1500,"ago_ms":12345,"policy":"qlearn","reason":"greedy","action":"slower","reward":-0.0123456789,"detection_ms":4567.891234,"late_share":0.00123456789}}}}"#,
        264 + id % 1000,
        294 + id % 700,
        id - 1
    )
}

/// FNV-1a over bytes as they come, whatever their pieces.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fnv(u64, u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325, 0)
    }
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self.1 += bytes.len() as u64;
    }
}

/// Answers `GET /nodes` with `nodes` synthetic rows through `send`, in
/// chunks of 64 KiB as the monitor sends them: the hash of the body sent,
/// and the first write that failed (nothing is sent after it).
fn serve_listing(
    nodes: u32,
    mut send: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> (Fnv, std::io::Result<()>) {
    let mut sent = Fnv::new();
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    if let Err(e) = send(head.as_bytes()) {
        return (sent, Err(e));
    }
    let mut chunk = String::from("[");
    for id in 1..=nodes {
        if id > 1 {
            chunk.push(',');
        }
        chunk.push_str(&synthetic_row(id));
        if id == nodes {
            chunk.push(']');
        }
        if chunk.len() >= 64 * 1024 || id == nodes {
            sent.add(chunk.as_bytes());
            if let Err(e) = send(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes()) {
                return (sent, Err(e));
            }
            chunk.clear();
        }
    }
    let written = send(b"0\r\n\r\n");
    (sent, written)
}

/// `hb nodes` of a large fleet holds the listing a row at a time, not
/// whole: its peak memory (the child's max RSS) does not grow with the
/// fleet. It held the whole body, every row parsed and every table cell
/// (~2 KB a node): at 200,000 nodes ~400 MB, at the most nodes a monitor
/// takes ~2 GB. The output is whole: every row of the table, and the JSON
/// byte for byte as served.
#[test]
fn hb_nodes_memory_does_not_grow_with_the_fleet() {
    use std::io::Write as _;
    const NODES: u32 = 200_000;
    const MAX_RSS_KB: i64 = 40 * 1024;
    for json in [false, true] {
        let (addr, monitor) = stand_in(|conn| {
            let mut conn = std::io::BufWriter::new(conn);
            let (sent, _) = serve_listing(NODES, |bytes| conn.write_all(bytes));
            let _ = conn.flush();
            sent
        });
        let mut cmd = command(&["nodes", "--monitor", &addr, "--timeout-ms", "60000"]);
        if json {
            cmd.arg("--json");
        }
        #[expect(
            clippy::zombie_processes,
            reason = "reaped by wait4 below, which gives its rusage"
        )]
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut got, mut lines, mut buf) = (Fnv::new(), 0usize, vec![0u8; 64 * 1024]);
            let mut last = Vec::new();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.add(&buf[..n]);
                lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
                last = buf[..n].to_vec();
            }
            (got, lines, last)
        });
        let mut err = child.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        // The child's own rusage, as wait4 gives it when reaping it.
        let deadline = Instant::now() + Duration::from_secs(120);
        let (status, usage) = loop {
            let mut status = 0;
            // SAFETY: a plain syscall on our own child, with valid
            // pointers to locals.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let pid =
                unsafe { libc::wait4(child.id() as i32, &mut status, libc::WNOHANG, &mut usage) };
            if pid == child.id() as i32 {
                break (status, usage);
            }
            assert_eq!(pid, 0, "wait4: {}", std::io::Error::last_os_error());
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("hb nodes of {NODES} nodes still running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let errors = errors.join().unwrap();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}: {errors}"
        );
        let (got, lines, last) = reader.join().unwrap();
        let (_, sent) = monitor.join().unwrap();
        if json {
            // The answer and a newline.
            let mut want = sent;
            want.add(b"\n");
            assert_eq!(got, want, "--json as served");
        } else {
            assert_eq!(lines, NODES as usize + 1, "header and every row");
            let last = String::from_utf8_lossy(&last);
            assert!(
                last.lines().last().unwrap().starts_with("200000 "),
                "{last}"
            );
        }
        let max_rss_kb = usage.ru_maxrss;
        eprintln!(
            "hb nodes{} of {NODES} nodes: max RSS {max_rss_kb} KB",
            if json { " --json" } else { "" }
        );
        assert!(
            max_rss_kb < MAX_RSS_KB,
            "hb nodes{} of {NODES} nodes took {max_rss_kb} KB at most (bound {MAX_RSS_KB} KB)",
            if json { " --json" } else { "" }
        );
    }
}

/// `hb nodes | less` over a large fleet, the pager left open: hb keeps
/// reading the answer while its own reader takes nothing, so that the
/// monitor, which gives up a client that takes nothing for 30 s, is never
/// left waiting, and the listing is whole once the pager reads on. It
/// stopped reading with its output: the monitor gave it up, and the pager
/// showed a table cut short. The stand-in monitor here will not wait: it
/// writes the answer with a 1 s write timeout and gives up at the first
/// that times out; the test reads nothing of hb's stdout until it is done.
/// The answer (55 MB) is more than the kernel's buffers hold.
#[test]
fn hb_nodes_reads_the_whole_answer_while_its_output_stalls() {
    use std::io::Write as _;
    const NODES: u32 = 100_000;
    const PATIENCE: Duration = Duration::from_secs(1);
    for json in [false, true] {
        let (addr, monitor) = stand_in(|conn| {
            conn.set_write_timeout(Some(PATIENCE)).unwrap();
            let mut longest = Duration::ZERO;
            let mut send = |bytes: &[u8]| {
                let asked = Instant::now();
                let written = conn.write_all(bytes);
                longest = longest.max(asked.elapsed());
                written
            };
            let (sent, written) = serve_listing(NODES, &mut send);
            (sent, longest, written)
        });
        let mut cmd = command(&["nodes", "--monitor", &addr, "--timeout-ms", "60000"]);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        /// Kills and reaps the child if the test fails before it ends.
        struct Reaped(Option<std::process::Child>);
        impl Drop for Reaped {
            fn drop(&mut self) {
                if let Some(child) = &mut self.0 {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        let (stdout, err) = (child.stdout.take(), drain(child.stderr.take()));
        let pid = child.id() as i32;
        let mut child = Reaped(Some(child));
        // Nothing of stdout is read until the stand-in is done.
        let (done, answered) = mpsc::channel();
        std::thread::spawn(move || done.send(monitor.join()));
        let (_, (sent, longest, written)) = answered
            .recv_timeout(Duration::from_secs(60))
            .expect("the stand-in done within 60 s")
            .unwrap();
        let mode = if json { "hb nodes --json" } else { "hb nodes" };
        assert!(
            written.is_ok(),
            "{mode}: the stand-in gave the answer up after {} bytes, its client \
             having taken nothing for {PATIENCE:?}: {written:?}",
            sent.1
        );
        assert!(
            longest < PATIENCE,
            "{mode}: a write of the stand-in's waited {longest:?}"
        );
        // The pager reads on.
        let out = drain(stdout);
        let (mut got, mut lines, mut last) = (Fnv::new(), 0usize, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Ok(chunk) = out.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            got.add(&chunk);
            lines += chunk.iter().filter(|&&b| b == b'\n').count();
            last = chunk;
        }
        // Its own rusage, as wait4 gives it when reaping it.
        let (status, usage) = loop {
            let mut status = 0;
            // SAFETY: a plain syscall on our own child, with valid
            // pointers to locals.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if reaped == pid {
                // Reaped: not to be killed.
                child.0 = None;
                break (status, usage);
            }
            assert_eq!(reaped, 0, "wait4: {}", std::io::Error::last_os_error());
            assert!(Instant::now() < deadline, "{mode} still running");
            std::thread::sleep(Duration::from_millis(10));
        };
        let errors = String::from_utf8_lossy(&collect(&err)).into_owned();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{mode}: {status}: {errors}"
        );
        if json {
            let mut want = sent;
            want.add(b"\n");
            assert_eq!(got, want, "--json as served");
        } else {
            assert_eq!(lines, NODES as usize + 1, "header and every row");
            let last = String::from_utf8_lossy(&last);
            assert!(
                last.lines()
                    .last()
                    .unwrap()
                    .starts_with(&format!("{NODES} ")),
                "{last}"
            );
        }
        // What it held meanwhile: the answer as received, not its rows.
        let max_rss_kb = usage.ru_maxrss;
        eprintln!(
            "{mode}: the stand-in's longest write {longest:?}, {} bytes sent, max RSS {max_rss_kb} KB",
            sent.1
        );
        assert!(
            max_rss_kb < (sent.1 as i64 >> 10) + 24 * 1024,
            "{mode}: {max_rss_kb} KB at most for an answer of {} KB",
            sent.1 >> 10
        );
    }
}

/// `--listen`'s help names what the API serves (`monitor::api::routes`):
/// it left out `/nodes/{id}` and `/controller`.
#[test]
fn monitor_help_names_every_api_route() {
    let out = hb(&["monitor", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        help.contains("--listen <ADDR> HTTP address of the API (GET /metrics, /nodes, /nodes/{id}, /healthz, /controller)"),
        "{help}"
    );
}

/// Makes `path` private to its owner, as `--key-file` requires.
fn private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Like [`isolate`], with the namespace's loopback up: a heartbeat to
/// 127.0.0.1 then leaves the socket (and goes nowhere), while one to any
/// other address still fails with ENETUNREACH.
fn isolate_with_loopback(cmd: &mut Command) {
    // SAFETY: unshare(2), socket(2), ioctl(2) and close(2) are
    // async-signal-safe, and the closure touches nothing else between
    // fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut ifr: libc::ifreq = std::mem::zeroed();
            ifr.ifr_name[0] = b'l' as libc::c_char;
            ifr.ifr_name[1] = b'o' as libc::c_char;
            let up = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 && {
                ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) == 0
            };
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            if up { Ok(()) } else { Err(e) }
        });
    }
}

/// The stderr lines of `o` that contain every one of `all`.
fn lines_with<'a>(err: &'a str, all: &[&str]) -> Vec<&'a str> {
    err.lines()
        .filter(|l| all.iter().all(|w| l.contains(w)))
        .collect()
}

const NODE_KEY: &str = "6df25b19dd0205345e893133518757d6";

/// A monitor whose name does not resolve (`.invalid` fails at once here:
/// no resolver is reachable from the namespace) stops no heartbeat to the
/// other monitor: the sender warns, keeps sending, tries the name again
/// (1 s later), and on SIGTERM (once it warned the second time, however
/// long that took) names the monitor its LEAVING heartbeat did not reach
/// and says to how many it went. (It used to exit at start.)
#[test]
fn a_monitor_name_that_does_not_resolve_stops_no_heartbeat_to_the_others() {
    let mut cmd = Command::new(HB);
    cmd.args([
        "send",
        "--monitor",
        "no-such-host.invalid:7420",
        "--monitor",
        "127.0.0.1:7420",
        "--monitor",
        "198.18.0.1:7420",
        "--node-id",
        "1",
        "--key",
        NODE_KEY,
        "--key-epoch",
        "1",
        "--interval-ms",
        "100",
    ])
    .env_remove("HB_NODE_KEY")
    .env("HB_LOG", "info");
    isolate_with_loopback(&mut cmd);
    let unresolved = [
        "WARN",
        "cannot resolve monitor",
        "monitor=no-such-host.invalid:7420",
    ];
    let mut hb = Running::start(&mut cmd);
    hb.wait_stderr(&cmd, "second warning of the unresolved monitor", |err| {
        lines_with(err, &unresolved).len() >= 2
    });
    let o = hb.sigterm(&cmd, "after its second warning");
    let err = stderr(&o);
    assert!(o.status.success(), "{}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");
    let unresolved = lines_with(&err, &unresolved);
    assert!(unresolved.len() >= 2, "tried again: {err}");
    assert!(unresolved[0].contains("retry_in=1s"), "{err}");
    assert!(unresolved[1].contains("retry_in=2s"), "{err}");
    assert_eq!(
        lines_with(
            &err,
            &[
                "sending heartbeats",
                "monitors=[127.0.0.1:7420, 198.18.0.1:7420]",
                "unresolved=[\"no-such-host.invalid:7420\"]"
            ]
        )
        .len(),
        1,
        "{err}"
    );
    // Sent to the monitor that cannot be reached: the attempt failed.
    assert_eq!(
        lines_with(
            &err,
            &[
                "cannot send heartbeat",
                "monitor=198.18.0.1:7420",
                "errors=1"
            ]
        )
        .len(),
        1,
        "{err}"
    );
    assert_eq!(
        lines_with(
            &err,
            &[
                "cannot send the LEAVING heartbeat",
                "monitor=198.18.0.1:7420"
            ]
        )
        .len(),
        1,
        "{err}"
    );
    assert!(
        !err.contains("cannot send the LEAVING heartbeat monitor=127.0.0.1"),
        "{err}"
    );
    let exit = lines_with(&err, &["sent LEAVING heartbeat, exiting"]);
    assert_eq!(exit.len(), 1, "{err}");
    assert!(
        exit[0].contains("leaving_sent_to=1 monitors=2")
            && exit[0].contains("unresolved=[\"no-such-host.invalid:7420\"]"),
        "{err}"
    );
}

/// With no monitor resolved at all the sender keeps trying, and says so,
/// rather than exit: an exit at boot (DNS not up yet) put the unit in
/// `failed` within a second. It is stopped once it has tried the name
/// again (1 s after the first try), however long that took, and must
/// still be running then.
#[test]
fn a_sender_with_no_resolvable_monitor_keeps_running() {
    let mut cmd = command(&[
        "send",
        "--monitor",
        "no-such-host.invalid:7420",
        "--node-id",
        "1",
        "--key",
        NODE_KEY,
        "--key-epoch",
        "1",
    ]);
    let unresolved = [
        "WARN",
        "cannot resolve monitor",
        "monitor=no-such-host.invalid:7420",
    ];
    let mut hb = Running::start(&mut cmd);
    hb.wait_stderr(&cmd, "second try of the unresolved monitor", |err| {
        lines_with(err, &["WARN", "no monitor resolved yet"]).len() == 1
            && lines_with(err, &unresolved).len() >= 2
    });
    let o = hb.sigterm(&cmd, "after trying the monitor's name again");
    let err = stderr(&o);
    assert!(o.status.success(), "{}: {err}", o.status);
    let unresolved = lines_with(&err, &unresolved);
    assert!(unresolved[1].contains("retry_in=2s"), "tried again: {err}");
    assert_eq!(
        lines_with(&err, &["WARN", "no monitor resolved yet"]).len(),
        1,
        "{err}"
    );
    let exit = lines_with(&err, &["WARN", "sent the LEAVING heartbeat to no monitor"]);
    assert_eq!(exit.len(), 1, "{err}");
    assert!(exit[0].contains("leaving_sent_to=0 monitors=0"), "{err}");
    // No ACK rejected: 0, not an empty field.
    assert!(exit[0].trim_end().ends_with(" acks_rejected=0"), "{err}");
}

/// Input that cannot work is refused at start with one line, not accepted
/// to fail at every send: a key file others may read or of any size,
/// monitors at port 0 or at addresses that are no one host, malformed names,
/// a link-local address without its interface.
#[test]
fn bad_sender_input_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    let open = d.path().join("open.key");
    std::fs::write(&open, format!("{NODE_KEY}\n")).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = open.display().to_string();
    let mode_error = format!(
        "hb: key file {open} has mode 0644: users other than its owner may get at the node key; run `chmod 600 {open}`"
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--monitor", "198.18.0.1:7420", "--key-file", &open],
            &mode_error,
        ),
        (
            vec!["--monitor", "198.18.0.1:7420", "--key-file", "/dev/zero"],
            "key file /dev/zero holds more than 4096 bytes",
        ),
        (
            vec!["--monitor", "198.18.0.1:0", "--key", NODE_KEY],
            "hb: monitor `198.18.0.1:0`: port 0 is no monitor's port",
        ),
        (
            vec!["--monitor", "monitor.example.net:0", "--key", NODE_KEY],
            "hb: monitor `monitor.example.net:0`: port 0 is no monitor's port",
        ),
        (
            vec!["--monitor", "0.0.0.0:7420", "--key", NODE_KEY],
            "0.0.0.0 is the unspecified address",
        ),
        (
            vec!["--monitor", "[ff02::1]:7420", "--key", NODE_KEY],
            "ff02::1 is a multicast address",
        ),
        (
            vec!["--monitor", "255.255.255.255:7420", "--key", NODE_KEY],
            "255.255.255.255 is the broadcast address",
        ),
        (
            vec!["--monitor", "300.1.1.1:7420", "--key", NODE_KEY],
            "`300.1.1.1` is neither an IP address nor a host name",
        ),
        // Heartbeats went out, but its ACKs came with the interface's
        // scope and counted for no monitor.
        (
            vec!["--monitor", "[fe80::1]:7420", "--key", NODE_KEY],
            "hb: monitor `[fe80::1]:7420`: fe80::1 is a link-local address, which needs the \
             interface it is on: `[fe80::1%IFNAME]:7420`, as `[fe80::1%eth0]:7420`",
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["send", "--node-id", "1", "--key-epoch", "1"];
        full.extend(args);
        let o = hb(&full);
        assert_fails(&o, want);
        assert!(!stderr(&o).contains(NODE_KEY), "{}", stderr(&o));
    }
}

/// Two senders on one `--state-dir` (the unit and a manual run) could take
/// the same generation: the second is refused, naming the directory.
#[test]
fn a_second_sender_on_one_state_dir_is_refused() {
    use std::os::fd::AsRawFd as _;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().display().to_string();
    // The first sender: this process holds the directory.
    let held = std::fs::File::open(d.path()).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(
        unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let args = [
        "send",
        "--monitor",
        "198.18.0.1:7420",
        "--node-id",
        "1",
        "--key",
        NODE_KEY,
        "--key-epoch",
        "1",
        "--state-dir",
        &dir,
    ];
    let o = hb(&args);
    assert_fails(
        &o,
        &format!(
            "hb: another hb send is using the state directory {dir}: stop it first, or give this one its own --state-dir"
        ),
    );
    assert!(
        !d.path().join("generation").exists(),
        "the second one took a generation"
    );
}

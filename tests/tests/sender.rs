//! `hb send` as a real process in a namespace, talking to monitors played
//! by UDP sockets in the peer namespace that run the userspace gate
//! (`MemDataplane::gate`, the same steps as the XDP program, which also
//! produces the ACKs).
//!
//! Checked end to end: heartbeats over IPv4 and IPv6 are accepted with
//! consecutive seqs while a third, dead monitor is ignored; a forged ACK
//! and an ACK for a seq never sent change nothing; a genuine ACK changes
//! the interval the sender reports and uses (its arrival rate follows) and
//! gives it an RTT; a replayed older ACK does not roll the interval back;
//! SIGTERM produces exactly one LEAVING heartbeat and exit code 0; a
//! monitor name whose address in use loses its route moves to its other
//! address within seconds.

use std::{
    net::{SocketAddr, UdpSocket},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use hb::dataplane::{
    Dataplane as _,
    mem::{MemDataplane, Verdict},
};
use hb_common::{
    GateResult,
    maps::{Config, NodeKeys},
    proto::{self, Datagram, Kind, NodeKey},
};
use hb_tests::{
    drive::{EXIT_TIMEOUT, hb_bin, wait_within},
    netns::{IF_A, IF_B, VethPair},
};

const NODE: u32 = 7;
const EPOCH: u8 = 1;
const PORT: u16 = 7420;

fn monotonic_ns() -> u64 {
    hb::send::monotonic_ns()
}

/// A monitor played by a socket and the userspace gate.
struct FakeMonitor {
    sock: UdpSocket,
    dp: MemDataplane,
    /// Heartbeats accepted, with arrival time.
    seen: Vec<(Instant, Datagram)>,
    /// Genuine ACKs the gate produced and we sent back.
    acks: Vec<[u8; proto::LEN]>,
    /// The sender's address, once known.
    peer: Option<SocketAddr>,
}

impl FakeMonitor {
    /// One on each of `pair`'s first addresses (IPv4, IPv6) in its `a`
    /// end, at the heartbeat port.
    fn on_both(pair: &VethPair, key: NodeKey) -> (FakeMonitor, FakeMonitor) {
        let (v4, v6) = (pair.addrs.v4[0], pair.addrs.v6[0]);
        let (s4, s6) = pair
            .a
            .run(move || {
                (
                    UdpSocket::bind(SocketAddr::from((v4, PORT))),
                    UdpSocket::bind(SocketAddr::from((v6, PORT))),
                )
            })
            .unwrap();
        (
            FakeMonitor::new(s4.unwrap(), key),
            FakeMonitor::new(s6.unwrap(), key),
        )
    }

    fn new(sock: UdpSocket, key: NodeKey) -> FakeMonitor {
        let dp = MemDataplane::new();
        dp.upsert_node(NODE, &NodeKeys::single(0, EPOCH, key))
            .unwrap();
        dp.set_config(&Config {
            port: PORT,
            ack_on_change: 1,
            ack_every: 0,
            ..Config::default()
        })
        .unwrap();
        FakeMonitor {
            sock,
            dp,
            seen: Vec::new(),
            acks: Vec::new(),
            peer: None,
        }
    }

    /// Receives until one heartbeat is accepted or `timeout` passes; sends
    /// back the ACK the gate asks for. Anything not accepted fails the
    /// test.
    fn next(&mut self, timeout: Duration) -> Option<Datagram> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 128];
        let left = deadline.checked_duration_since(Instant::now())?;
        self.sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let (n, src) = match self.sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("recv: {e}"),
        };
        let at = Instant::now();
        let Verdict { result, ack } = self.dp.gate(&buf[..n], src, monotonic_ns());
        assert_eq!(result, GateResult::Accepted, "datagram from {src}");
        self.peer = Some(src);
        if let Some(a) = ack {
            self.sock.send_to(&a, src).unwrap();
            self.acks.push(a);
        }
        let d = proto::parse(&buf[..n], Kind::Heartbeat).unwrap();
        self.seen.push((at, d));
        Some(d)
    }

    /// The next `n` heartbeats (each within 2 s).
    fn take(&mut self, n: usize) -> Vec<Datagram> {
        (0..n)
            .map(|i| {
                self.next(Duration::from_secs(2))
                    .unwrap_or_else(|| panic!("heartbeat {i} of {n} did not arrive"))
            })
            .collect()
    }

    /// Receives until a heartbeat satisfies `f` (within `timeout`).
    fn until(&mut self, timeout: Duration, f: impl Fn(&Datagram) -> bool) -> Datagram {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("condition not met within {timeout:?}"));
            if let Some(d) = self.next(left)
                && f(&d)
            {
                return d;
            }
        }
    }

    /// Sends raw bytes to the sender.
    fn inject(&self, b: &[u8]) {
        self.sock
            .send_to(b, self.peer.expect("sender known"))
            .unwrap();
    }
}

/// Kills the sender if a test fails half-way.
struct Reaper(Option<Child>);

impl Reaper {
    /// Sends `sig` to the sender: one LEAVING heartbeat reaches `m`, and
    /// it exits 0.
    fn leaves_on(&mut self, sig: i32, m: &mut FakeMonitor) {
        let child = self.0.as_mut().expect("a sender");
        // SAFETY: kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        m.until(Duration::from_secs(3), |d| d.leaving());
        let status = wait_within(child, EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("still running after signal {sig}, killed"));
        assert!(status.success(), "exit {status}");
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn sender_heartbeats_acks_and_leaving() {
    let pair = VethPair::new("isnd").unwrap();
    let secret = [0x5au8; 32];
    let key = NodeKey::from_bytes(&hb::keys::derive_node_key(&secret, NODE, EPOCH));
    let (v4, v6) = (pair.addrs.v4[0], pair.addrs.v6[0]);
    let (mut m4, mut m6) = FakeMonitor::on_both(&pair, key);

    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("sender.log");
    let mut cmd = pair.b.command(hb_bin().to_str().unwrap());
    cmd.args([
        "send",
        "--monitor",
        &format!("{v4}:{PORT}"),
        "--monitor",
        &format!("[{v6}]:{PORT}"),
        // A dead monitor: nobody answers ARP for it.
        "--monitor",
        &format!("198.18.0.99:{PORT}"),
        "--node-id",
        &NODE.to_string(),
        "--key",
        &hb::keys::to_hex(&key.to_bytes()),
        "--key-epoch",
        &EPOCH.to_string(),
        "--interval-ms",
        "100",
        "--min-interval-ms",
        "20",
        "--max-interval-ms",
        "1000",
        "--state-dir",
        state.path().to_str().unwrap(),
    ])
    .env("HB_LOG", "debug")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap());
    let mut sender = Reaper(Some(cmd.spawn().unwrap()));
    let dump_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // 1. Heartbeats arrive at both live monitors, accepted, seq from 1.
    let first = m4.take(5);
    let generation: u32 = std::fs::read_to_string(state.path().join("generation"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for (i, d) in first.iter().enumerate() {
        assert_eq!(
            (d.node_id, d.generation, d.key_epoch, d.seq),
            (NODE, generation, EPOCH, i as u64 + 1),
            "{}",
            dump_log()
        );
        assert_eq!((d.interval_ms, d.rtt_us, d.flags), (100, 0, 0));
        assert!(d.load <= 1000);
    }
    let v6_first = m6.take(3);
    assert!(v6_first.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    // 2. A forged ACK (wrong key) and a genuine-looking ACK for a seq
    //    never sent, both asking for 40 ms: ignored.
    let last = *first.last().unwrap();
    let mut forged = Datagram {
        kind: Kind::Ack,
        interval_ms: 40,
        rtt_us: 0,
        ..last
    };
    m4.inject(&forged.seal(&NodeKey { k0: 1, k1: 2 }));
    forged.seq = last.seq + 1000;
    m4.inject(&forged.seal(&key));
    for d in m4.take(4) {
        assert_eq!((d.interval_ms, d.rtt_us), (100, 0), "{}", dump_log());
    }

    // 3. The monitor asks for 300 ms: the gate ACKs, the sender adopts it
    //    and learns its RTT.
    m4.dp.set_requested_interval(0, 300);
    let changed = m4.until(Duration::from_secs(3), |d| d.interval_ms == 300);
    assert!(changed.rtt_us > 0, "RTT known after an ACK: {changed:?}");
    let ack_300 = *m4.acks.first().expect("the gate sent an ACK");
    // 100 ms before, 300 ms now: the rate follows. On the sender's own
    // clock (`sent_ns`), not ours: from `changed` on, each heartbeat is
    // due an interval after the one before was due (or, after a stall,
    // after it went out) and none goes out early, so 3 more span more
    // than 2 intervals: over 600 ms at 300 ms, about 300 ms at 100.
    let slow: Vec<u64> = std::iter::once(changed)
        .chain(m4.take(3))
        .map(|d| d.sent_ns)
        .collect();
    let span = Duration::from_nanos(slow[3] - slow[0]);
    assert!(
        span > Duration::from_millis(2 * 300),
        "3 heartbeats at 300 ms span {span:?} (sent_ns {slow:?})"
    );

    // 4. Then 150 ms; afterwards the older ACK (300) is replayed: no
    //    effect.
    m4.dp.set_requested_interval(0, 150);
    m4.until(Duration::from_secs(3), |d| d.interval_ms == 150);
    m4.inject(&ack_300);
    for d in m4.take(4) {
        assert_eq!(
            d.interval_ms,
            150,
            "replayed ACK took effect: {}",
            dump_log()
        );
    }
    // Step 6 resumes at what the saver thread stored. The sender waits
    // for that thread at exit, but 1 s at most (a hung disk must not hold
    // up the exit): on a loaded disk its fsync can take longer, and
    // SIGTERM then left 300 in the file. Wait until 150 is stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match hb::send::resume::load(state.path()) {
            Ok(Some(s)) if s.ms == 150 => {
                // Stored with the monitor that asked: the restart knows
                // whose request it stands for.
                assert_eq!(s.asked_by, Some(SocketAddr::from((v4, PORT))));
                break;
            }
            stored => assert!(
                Instant::now() < deadline,
                "150 ms not stored within 10 s: {stored:?}\n{}",
                dump_log()
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // 5. SIGTERM: one LEAVING heartbeat to every monitor, exit 0.
    let pid = sender.0.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on our child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let leaving = m4.until(Duration::from_secs(3), |d| d.leaving());
    m6.until(Duration::from_secs(3), |d| {
        d.leaving() && d.seq == leaving.seq
    });
    let status = wait_within(sender.0.as_mut().unwrap(), EXIT_TIMEOUT)
        .unwrap_or_else(|| panic!("still running after SIGTERM, killed: {}", dump_log()));
    assert!(status.success(), "exit {status}: {}", dump_log());
    assert!(
        m4.next(Duration::from_millis(300)).is_none(),
        "datagrams after LEAVING"
    );
    let all = &m4.seen;
    assert_eq!(all.iter().filter(|(_, d)| d.leaving()).count(), 1);
    // Consecutive seqs throughout: the dead monitor never held anything
    // up.
    assert!(
        all.windows(2).all(|w| w[1].1.seq == w[0].1.seq + 1),
        "seqs: {:?}",
        all.iter().map(|(_, d)| d.seq).collect::<Vec<_>>()
    );
    let log = dump_log();
    assert!(
        log.contains("monitor asked for a new heartbeat interval"),
        "{log}"
    );
    assert!(log.contains("sent LEAVING heartbeat, exiting"), "{log}");
    // Which monitor answered, and which never did.
    assert!(
        log.contains(&format!("acks_by_monitor={v4}:{PORT}="))
            && log.contains(&format!("198.18.0.99:{PORT}=0")),
        "{log}"
    );

    // 6. A restart with the same state directory: a strictly larger
    //    generation, seq from 1 again, at the interval last asked for
    //    (stored off the event loop, by its own thread), under the same
    //    monitors and --interval-ms.
    let restart = |monitors: &[String]| {
        let mut again = pair.b.command(hb_bin().to_str().unwrap());
        again.arg("send");
        for m in monitors {
            again.args(["--monitor", m]);
        }
        again
            .args([
                "--node-id",
                &NODE.to_string(),
                "--key",
                &hb::keys::to_hex(&key.to_bytes()),
                "--key-epoch",
                &EPOCH.to_string(),
                "--interval-ms",
                "100",
                "--state-dir",
                state.path().to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Reaper(Some(again.spawn().unwrap()))
    };
    let all = [
        format!("{v4}:{PORT}"),
        format!("[{v6}]:{PORT}"),
        format!("198.18.0.99:{PORT}"),
    ];
    let mut sender = restart(&all);
    let d = m4.take(1)[0];
    assert!(
        d.generation > generation,
        "{} after {generation}",
        d.generation
    );
    assert_eq!(d.seq, 1);
    assert_eq!(d.interval_ms, 150, "resumed at the last request");
    sender.leaves_on(libc::SIGINT, &mut m4);

    // 7. Without the monitors that may have asked (the v6 one, the dead
    //    one), the stored interval no longer stands: `--interval-ms`.
    //    SIGHUP (a closed terminal) leaves as SIGTERM does; it killed the
    //    sender, without a LEAVING heartbeat.
    //    The monitor left stops asking for 150 ms first: its ACK asking
    //    again would be a fresh request, stored under this list, which
    //    stands in step 8 (whether it came before SIGHUP was a race).
    m4.dp.set_requested_interval(0, 100);
    let mut sender = restart(&all[..1]);
    let d = m4.take(1)[0];
    assert_eq!((d.seq, d.interval_ms), (1, 100));
    sender.leaves_on(libc::SIGHUP, &mut m4);

    // 8. Under the first configuration again: the outdated interval was
    //    forgotten, not kept for this start (nobody asked for it since).
    let mut sender = restart(&all);
    let d = m4.take(1)[0];
    assert_eq!((d.seq, d.interval_ms), (1, 100));
    sender.leaves_on(libc::SIGTERM, &mut m4);
}

/// A link-local monitor, named with its interface (`[fe80::..%IF]:P`):
/// heartbeats leave by that interface, and its ACKs, which come with the
/// interface's scope, are matched to it (the scope was dropped, and with
/// it the way out; a global address kept one and matched no ACK).
#[test]
fn a_link_local_monitor_gets_heartbeats_and_its_acks_count() {
    const MONITOR_LL: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xa, 1);
    let pair = VethPair::new("isndll").unwrap();
    pair.a
        .ip(&["-6", "addr", "add", "fe80::a:1/64", "dev", IF_A, "nodad"])
        .unwrap();
    let ifindex_a = pair.a.ifindex(IF_A).unwrap();
    let secret = [0x5au8; 32];
    let key = NodeKey::from_bytes(&hb::keys::derive_node_key(&secret, NODE, EPOCH));
    let sock = pair
        .a
        .run(move || {
            UdpSocket::bind(SocketAddr::V6(std::net::SocketAddrV6::new(
                MONITOR_LL, PORT, 0, ifindex_a,
            )))
        })
        .unwrap()
        .expect("bind the link-local monitor");
    let mut m = FakeMonitor::new(sock, key);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = pair.b.command(hb_bin().to_str().unwrap());
    cmd.args(["send", "--monitor", &format!("[fe80::a:1%{IF_B}]:{PORT}")])
        .args(["--node-id", &NODE.to_string()])
        .args(["--key", &hb::keys::to_hex(&key.to_bytes())])
        .args(["--key-epoch", &EPOCH.to_string(), "--interval-ms", "100"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap());
    let mut sender = Reaper(Some(cmd.spawn().unwrap()));
    let dump_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    m.take(2);
    // The monitor asks for 300 ms: the sender adopts it from the ACK.
    m.dp.set_requested_interval(0, 300);
    let changed = m.until(Duration::from_secs(3), |d| d.interval_ms == 300);
    assert!(changed.rtt_us > 0, "RTT from the ACK: {}", dump_log());
    sender.leaves_on(libc::SIGTERM, &mut m);
    let ifindex_b = pair.b.ifindex(IF_B).unwrap();
    assert!(
        dump_log().contains(&format!("acks_by_monitor=[fe80::a:1%{ifindex_b}]:{PORT}=")),
        "{}",
        dump_log()
    );
}

/// A monitor's name with an IPv4 and an IPv6 address (a hosts file of the
/// sender's namespace), and the route of the family in use goes away:
/// within seconds the heartbeats go to the other address. The address
/// was kept while the resolver still gave it, every send failing with
/// ENETUNREACH, for good.
#[test]
fn a_monitor_name_fails_over_to_its_other_address_when_a_route_goes() {
    let pair = VethPair::new("isndfo").unwrap();
    let (v4, v6) = (pair.addrs.v4[0], pair.addrs.v6[0]);
    let _hosts = pair.b.hosts(&format!("{v4} mon\n{v6} mon\n")).unwrap();
    let secret = [0x5au8; 32];
    let key = NodeKey::from_bytes(&hb::keys::derive_node_key(&secret, NODE, EPOCH));
    let (mut m4, mut m6) = FakeMonitor::on_both(&pair, key);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = pair.b.exec(hb_bin().to_str().unwrap());
    cmd.args(["send", "--monitor", &format!("mon:{PORT}")])
        .args(["--node-id", &NODE.to_string()])
        .args(["--key", &hb::keys::to_hex(&key.to_bytes())])
        .args(["--key-epoch", &EPOCH.to_string(), "--interval-ms", "100"])
        .env("HB_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap());
    let mut sender = Reaper(Some(cmd.spawn().unwrap()));
    let dump_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    // The address the resolver gave first gets the heartbeats, whichever
    // family it is.
    let deadline = Instant::now() + Duration::from_secs(5);
    let first_v4 = loop {
        assert!(Instant::now() < deadline, "no heartbeat: {}", dump_log());
        if m4.next(Duration::from_millis(20)).is_some() {
            break true;
        }
        if m6.next(Duration::from_millis(20)).is_some() {
            break false;
        }
    };
    let (route, used, other) = if first_v4 {
        ("198.18.0.0/24", &mut m4, &mut m6)
    } else {
        ("fd00:4842::/64", &mut m6, &mut m4)
    };
    used.take(3);
    assert!(
        other.next(Duration::from_millis(300)).is_none(),
        "one address of the name gets the heartbeats: {}",
        dump_log()
    );
    pair.b.ip(&["route", "del", route, "dev", IF_B]).unwrap();
    // Sends fail for 3 s (EARLY_RESOLVE), the name is looked up at once,
    // the other address takes over: well within 10 s, not a minute.
    let moved = other.next(Duration::from_secs(10));
    assert!(
        moved.is_some(),
        "no heartbeat at the other address: {}",
        dump_log()
    );
    other.take(3);
    let log = dump_log();
    assert!(
        log.contains("cannot send heartbeat")
            && log.contains("sends to this monitor keep failing: resolving its name again now")
            && log.contains("sends to the monitor's address keep failing: another address of its name gets its heartbeats from now on"),
        "{log}"
    );
    sender.leaves_on(libc::SIGTERM, other);
}

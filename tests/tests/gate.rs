//! The XDP gate through BPF_PROG_TEST_RUN: a table of frames (katran
//! style), one row per gate result and per header variant, each with the
//! expected XDP action, counter and per-node state effect; then the ACK
//! byte for byte, the report rate limit, restarts and a state sequence;
//! and the kernel gate against the userspace one on random traffic.
//! Needs root (CI runs it as root; nothing is skipped).

use std::{io::Write as _, net::IpAddr};

use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use hb::dataplane::{
    Dataplane,
    xdp::{XdpDataplane, XdpOptions},
};
use hb_common::{
    Datagram, GateResult, Kind, NodeKey,
    maps::{
        ACCEPTED_EPOCH_KNOWN, Config, LocalAddrs, NodeKeys, NodeState, REPORT_BAD_EPOCH,
        REPORT_RESTART, REPORT_UNKNOWN_NODE, counter, names,
    },
    proto::FLAG_LEAVING,
};
use hb_tests::frames::{self, Udp};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const PORT: u16 = 7420;
const NODE: u32 = 42;
const SLOT: u32 = 3;
const GEN: u32 = 1_700_000_000;
/// Node 42's key at epoch 1 (PROTOCOL.md test vectors).
const KEY: [u8; 16] = [
    0x6d, 0xf2, 0x5b, 0x19, 0xdd, 0x02, 0x05, 0x34, 0x5e, 0x89, 0x31, 0x33, 0x51, 0x87, 0x57, 0xd6,
];

fn key() -> NodeKey {
    NodeKey::from_bytes(&KEY)
}

struct Gate {
    dp: XdpDataplane,
}

impl Gate {
    fn new(cfg: Config) -> Gate {
        let dp = XdpDataplane::open(&XdpOptions {
            max_nodes: Some(1024),
            ..XdpOptions::default()
        })
        .expect("load the gate (tests run as root)");
        dp.upsert_node(NODE, &NodeKeys::single(SLOT, 1, key()))
            .unwrap();
        dp.set_config(&cfg).unwrap();
        Gate { dp }
    }

    /// Runs `frame` once: (action, output frame).
    fn run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut ebpf = self.dp.ebpf();
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    fn state(&self) -> NodeState {
        self.dp.state(SLOT).unwrap()
    }
}

fn hb(seq: u64) -> Datagram {
    Datagram {
        kind: Kind::Heartbeat,
        node_id: NODE,
        generation: GEN,
        key_epoch: 1,
        flags: 0,
        load: 250,
        seq,
        sent_ns: 123_456_789,
        interval_ms: 1000,
        rtt_us: 850,
    }
}

fn sealed(d: Datagram) -> Vec<u8> {
    d.seal(&key()).to_vec()
}

/// What a row expects of the node's state (differences from before).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Effect {
    None,
    Accepted,
    BadTag,
    Replay,
    Stale,
}

struct Row {
    what: &'static str,
    frame: Vec<u8>,
    action: u32,
    result: GateResult,
    effect: Effect,
}

fn row(what: &'static str, frame: Vec<u8>, result: GateResult, effect: Effect) -> Row {
    let action = match result {
        GateResult::Pass => XDP_PASS,
        _ => XDP_DROP,
    };
    Row {
        what,
        frame,
        action,
        result,
        effect,
    }
}

/// Runs `rows` in order on one gate, each counted exactly once.
fn run_table(g: &Gate, rows: Vec<Row>) {
    for r in rows {
        let before = g.dp.counters().unwrap();
        let s0 = g.state();
        let (action, _) = g
            .run(&r.frame)
            .unwrap_or_else(|e| panic!("{}: {e}", r.what));
        let after = g.dp.counters().unwrap();
        let s1 = g.state();
        assert_eq!(action, r.action, "{}: action", r.what);
        for res in GateResult::ALL {
            let d = after[res.index() as usize] - before[res.index() as usize];
            // Every datagram to the port moves its result's counter once;
            // foreign traffic (pass) moves none.
            let want = u64::from(res == r.result && res != GateResult::Pass);
            assert_eq!(d, want, "{}: counter {res} moved by {d}", r.what);
        }
        let eff = (
            s1.accepted - s0.accepted,
            s1.bad_tag - s0.bad_tag,
            s1.replay - s0.replay,
            s1.stale - s0.stale,
        );
        let want = match r.effect {
            Effect::None => (0, 0, 0, 0),
            Effect::Accepted => (1, 0, 0, 0),
            Effect::BadTag => (0, 1, 0, 0),
            Effect::Replay => (0, 0, 1, 0),
            Effect::Stale => (0, 0, 0, 1),
        };
        assert_eq!(eff, want, "{}: state effect {:?}", r.what, r.effect);
        if r.effect == Effect::None {
            assert_eq!(s0, s1, "{}: state untouched", r.what);
        }
        assert_eq!(s1.seqcount % 2, 0, "{}: seqcount even after", r.what);
    }
}

fn v4(p: &[u8]) -> Vec<u8> {
    Udp::v4(PORT, p).build()
}

#[test]
fn one_row_per_gate_result_and_header_variant() {
    let g = Gate::new(Config {
        port: PORT,
        ..Config::default()
    });
    match g.dp.verified_instructions() {
        // Straight to fd 2: libtest captures eprintln!, CI logs should show it.
        Ok(n) => {
            let _ = writeln!(
                std::io::stderr(),
                "verifier: hb_xdp processed {n} instructions"
            );
        }
        Err(e) => panic!("verifier instruction count: {e:#}"),
    }
    use Effect as E;
    use GateResult as R;
    let good = sealed(hb(1));
    let mut bad_magic = sealed(hb(2));
    bad_magic[0] = 0;
    let mut bad_version = sealed(hb(2));
    bad_version[2] = 2;
    let mut bad_kind = sealed(hb(2));
    bad_kind[3] = 2;
    let mut bad_flags = hb(2);
    bad_flags.flags = 0x80;
    let unknown = sealed(Datagram {
        node_id: 7,
        ..hb(2)
    });
    // Id 0 is never provisioned; an empty index entry holds id 0.
    let id_zero = sealed(Datagram {
        node_id: 0,
        ..hb(2)
    });
    let bad_epoch = sealed(Datagram {
        key_epoch: 9,
        ..hb(2)
    });
    let bad_tag = hb(2).seal(&NodeKey { k0: 1, k1: 2 }).to_vec();
    let stale = sealed(Datagram {
        generation: GEN - 1,
        ..hb(50)
    });
    let mut vlan = Udp::v4(PORT, &sealed(hb(3)));
    vlan.vlan = Some(100);
    let mut opts = Udp::v4(PORT, &sealed(hb(4)));
    opts.ip_options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert + NOPs + EOL
    let mut vlan6 = Udp::v6(PORT, &sealed(hb(6)));
    vlan6.vlan = Some(7);
    let mut ext6 = Udp::v6(PORT, &sealed(hb(7)));
    ext6.v6_ext_header = true;
    let mut frag_first = Udp::v4(PORT, &sealed(hb(8)));
    frag_first.frag = 0x2000;
    let mut frag_later = Udp::v4(PORT, &sealed(hb(8)));
    frag_later.frag = 0x0010;
    let mut short_udp = v4(&sealed(hb(8)));
    short_udp.truncate(short_udp.len() - 1);
    // Foreign traffic in every shape the gate's fast pass path decides
    // (untagged IPv4 without options, IPv6) and every shape it leaves to
    // the full parse (VLAN, IPv4 options): both must pass it.
    let mut other_vlan = Udp::v4(53, &good);
    other_vlan.vlan = Some(100);
    let mut other_opts = Udp::v4(53, &good);
    other_opts.ip_options = vec![1, 1, 1, 0];
    let mut frag_later_other = Udp::v4(53, &good);
    frag_later_other.frag = 0x0010;
    // TCP (protocol 6) whose destination port bytes say 7420.
    let mut tcp4 = v4(&good);
    tcp4[23] = 6;
    let mut tcp6 = Udp::v6(PORT, &good).build();
    tcp6[20] = 6;

    run_table(
        &g,
        vec![
            row(
                "other UDP port",
                Udp::v4(53, &good).build(),
                R::Pass,
                E::None,
            ),
            row("ARP", arp(), R::Pass, E::None),
            row(
                "other UDP port, IPv6",
                Udp::v6(53, &good).build(),
                R::Pass,
                E::None,
            ),
            row("other UDP port, VLAN", other_vlan.build(), R::Pass, E::None),
            row(
                "other UDP port, IPv4 options",
                other_opts.build(),
                R::Pass,
                E::None,
            ),
            row(
                "IPv4 later fragment, other port",
                frag_later_other.build(),
                R::Pass,
                E::None,
            ),
            row("TCP to the heartbeat port", tcp4, R::Pass, E::None),
            row("TCP to the heartbeat port, IPv6", tcp6, R::Pass, E::None),
            row(
                "payload of 47 bytes",
                v4(&good[..47]),
                R::Malformed,
                E::None,
            ),
            row(
                "payload of 49 bytes",
                v4(&[good.clone(), vec![0]].concat()),
                R::Malformed,
                E::None,
            ),
            row("frame cut in the payload", short_udp, R::Malformed, E::None),
            row(
                "IPv4 first fragment",
                frag_first.build(),
                R::Malformed,
                E::None,
            ),
            row("IPv4 later fragment", frag_later.build(), R::Pass, E::None),
            row("bad magic", v4(&bad_magic), R::BadMagic, E::None),
            row("bad version", v4(&bad_version), R::BadVersion, E::None),
            row("kind ACK", v4(&bad_kind), R::BadKind, E::None),
            row("reserved flag", v4(&sealed(bad_flags)), R::BadKind, E::None),
            row("unknown node", v4(&unknown), R::UnknownNode, E::None),
            row("node id 0", v4(&id_zero), R::UnknownNode, E::None),
            row("no key for epoch", v4(&bad_epoch), R::BadEpoch, E::None),
            row("bad tag", v4(&bad_tag), R::BadTag, E::BadTag),
            row("accepted IPv4", v4(&good), R::Accepted, E::Accepted),
            row("replay", v4(&good), R::Replay, E::Replay),
            row("stale generation", v4(&stale), R::Stale, E::Stale),
            row("accepted with VLAN", vlan.build(), R::Accepted, E::Accepted),
            row(
                "accepted with IPv4 options",
                opts.build(),
                R::Accepted,
                E::Accepted,
            ),
            row(
                "accepted IPv6",
                Udp::v6(PORT, &sealed(hb(5))).build(),
                R::Accepted,
                E::Accepted,
            ),
            row(
                "accepted IPv6 + VLAN",
                vlan6.build(),
                R::Accepted,
                E::Accepted,
            ),
            row("IPv6 extension header", ext6.build(), R::Pass, E::None),
        ],
    );
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&frames::MAC_NODE);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0; 28]);
    f
}

#[test]
fn truncated_at_every_header_boundary() {
    let g = Gate::new(Config {
        port: PORT,
        ..Config::default()
    });
    let mut vlan = Udp::v4(PORT, &sealed(hb(1)));
    vlan.vlan = Some(1);
    let mut opts = Udp::v4(PORT, &sealed(hb(1)));
    opts.ip_options = vec![1, 1, 1, 0];
    for (name, u) in [
        ("IPv4", Udp::v4(PORT, &sealed(hb(1)))),
        ("IPv6", Udp::v6(PORT, &sealed(hb(1)))),
        ("VLAN", vlan),
        ("IPv4 options", opts),
    ] {
        let f = u.build();
        let (_, udp, _) = frames::offsets(&f);
        // Before the UDP destination port is known: not ours, pass. From
        // there on, a frame to our port without its 48 bytes: malformed.
        // (BPF_PROG_TEST_RUN refuses frames shorter than Ethernet's 14.)
        for len in 14..f.len() {
            let want = if len < udp + 4 {
                GateResult::Pass
            } else {
                GateResult::Malformed
            };
            let rows = vec![row("truncated", f[..len].to_vec(), want, Effect::None)];
            run_table(&g, rows);
        }
        eprintln!("{name}: truncated at every byte from 14 to {}", f.len() - 1);
    }
    let s = g.state();
    assert_eq!(s.accepted, 0);
}

#[test]
fn unconfigured_gate_passes_everything() {
    let g = Gate::new(Config {
        port: 0,
        ..Config::default()
    });
    run_table(
        &g,
        vec![row(
            "port 0",
            v4(&sealed(hb(1))),
            GateResult::Pass,
            Effect::None,
        )],
    );
}

#[test]
fn acks_byte_for_byte_ipv4_and_ipv6() {
    let g = Gate::new(Config {
        port: PORT,
        ack_every: 1,
        ..Config::default()
    });
    let mut vlan = Udp::v4(PORT, &sealed(hb(3)));
    vlan.vlan = Some(42);
    vlan.ip_options = vec![1, 1, 1, 0];
    for (i, (u, interval)) in [
        (Udp::v4(PORT, &sealed(hb(1))), 1000),
        (Udp::v6(PORT, &sealed(hb(2))), 1000),
        (vlan, 250),
    ]
    .into_iter()
    .enumerate()
    {
        if interval != 1000 {
            g.dp.set_requested_interval(SLOT, interval);
        }
        let f = u.build();
        let (action, out) = g.run(&f).unwrap();
        assert_eq!(action, XDP_TX, "frame {i}: ACK sent with XDP_TX");
        frames::check_ack(&f, &out, &key(), interval);
        assert_eq!(g.state().acks_sent, i as u32 + 1);
    }
    let c = g.dp.counters().unwrap();
    assert_eq!(c[counter::ACK_SENT as usize], 3);
    assert_eq!(c[GateResult::Accepted.index() as usize], 3);
}

#[test]
fn ack_policy_every_nth_on_change_and_pass_accepted() {
    let g = Gate::new(Config {
        port: PORT,
        ack_every: 3,
        ack_on_change: 1,
        ..Config::default()
    });
    let actions: Vec<u32> = (1..=6)
        .map(|s| g.run(&v4(&sealed(hb(s)))).unwrap().0)
        .collect();
    assert_eq!(
        actions,
        [XDP_DROP, XDP_DROP, XDP_TX, XDP_DROP, XDP_DROP, XDP_TX],
        "every 3rd"
    );
    g.dp.set_requested_interval(SLOT, 500);
    let f = v4(&sealed(hb(7)));
    let (a, out) = g.run(&f).unwrap();
    assert_eq!(a, XDP_TX, "requested interval differs from the node's");
    frames::check_ack(&f, &out, &key(), 500);
    g.dp.set_config(&Config {
        port: PORT,
        pass_accepted: 1,
        ack_every: 1,
        ..Config::default()
    })
    .unwrap();
    assert_eq!(g.run(&v4(&sealed(hb(8)))).unwrap().0, XDP_PASS);
    assert_eq!(g.state().accepted, 8);
}

/// Heartbeats to an address that is not the host's (one it forwards to a
/// monitor behind it) are not ours: passed, uncounted, untouched, even a
/// malformed one; to the host's own, gated as ever. Until userspace has
/// written the host's addresses the gate takes any.
#[test]
fn heartbeats_to_another_hosts_address_pass() {
    let g = Gate::new(Config {
        port: PORT,
        ack_every: 1,
        ..Config::default()
    });
    let to = |dst: &str, seq: u64, v6: bool| {
        let p = sealed(hb(seq));
        let mut u = if v6 {
            Udp::v6(PORT, &p)
        } else {
            Udp::v4(PORT, &p)
        };
        u.dst = dst.parse().unwrap();
        u.build()
    };
    let mut short = Udp::v4(PORT, &sealed(hb(9))[..40]);
    short.dst = "198.18.7.7".parse().unwrap();
    use Effect as E;
    use GateResult as R;
    // Accepted heartbeats are answered (`ack_every` 1).
    let answered = |mut rows: Vec<Row>| {
        for r in &mut rows {
            if r.result == R::Accepted {
                r.action = XDP_TX;
            }
        }
        rows
    };
    let before = row(
        "any address before the table",
        to("198.18.7.7", 1, false),
        R::Accepted,
        E::Accepted,
    );
    run_table(&g, answered(vec![before]));
    g.dp.set_local_addrs(&LocalAddrs::of(
        &[[127, 0, 0, 1], [198, 18, 0, 1]],
        &["fd00:4842::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()],
    ))
    .unwrap();
    run_table(
        &g,
        answered(vec![
            row(
                "v4 to another host",
                to("198.18.7.7", 2, false),
                R::Pass,
                E::None,
            ),
            row(
                "v6 to another host",
                to("fd00:4842::7", 3, true),
                R::Pass,
                E::None,
            ),
            row("malformed to another host", short.build(), R::Pass, E::None),
            row(
                "v4 to this host",
                to("198.18.0.1", 4, false),
                R::Accepted,
                E::Accepted,
            ),
            row(
                "v6 to this host",
                to("fd00:4842::1", 5, true),
                R::Accepted,
                E::Accepted,
            ),
        ]),
    );
}

/// A node that keeps reporting another interval than the one asked for
/// (its own bounds, or another monitor wanting it faster) is not answered
/// on every heartbeat (`maps::ack_interval`): the kernel runs the same
/// back-off as the unit test, and a new request starts over.
#[test]
fn change_acks_back_off_for_a_node_that_does_not_follow() {
    let g = Gate::new(Config {
        port: PORT,
        ack_on_change: 1,
        ..Config::default()
    });
    g.dp.set_requested_interval(SLOT, 500);
    let acked = |seqs: std::ops::RangeInclusive<u64>| -> Vec<u64> {
        seqs.filter(|&s| {
            let f = v4(&sealed(hb(s)));
            let (a, out) = g.run(&f).unwrap();
            if a == XDP_TX {
                frames::check_ack(&f, &out, &key(), 500);
            }
            a == XDP_TX
        })
        .collect()
    };
    // `hb(seq)` reports 1000 ms: seq s is the run's s-th heartbeat.
    assert_eq!(acked(1..=70), [1, 2, 3, 4, 8, 16, 32, 64]);
    assert_eq!(g.state().acks_sent, 8);
    g.dp.set_requested_interval(SLOT, 700);
    let f = v4(&sealed(hb(71)));
    let (a, out) = g.run(&f).unwrap();
    assert_eq!(a, XDP_TX, "a new request starts a new run");
    frames::check_ack(&f, &out, &key(), 700);
    let c = g.dp.counters().unwrap();
    assert_eq!(c[counter::ACK_SENT as usize], 9);
    assert_eq!(c[GateResult::Accepted.index() as usize], 71);
}

#[tokio::test]
async fn reports_unknown_nodes_at_a_bounded_rate_restarts_and_bad_epochs() {
    let mut g = Gate::new(Config {
        port: PORT,
        report_rate: 1,
        report_burst: 3,
        ..Config::default()
    });
    let mut rx = g.dp.take_reports().unwrap();
    // BPF_PROG_TEST_RUN runs on the calling thread's CPU and the buckets
    // are per CPU: stay on one CPU so there is one bucket of 3.
    pin_to_cpu0();
    for id in 100..110u32 {
        let f = v4(&sealed(Datagram {
            node_id: id,
            ..hb(1)
        }));
        assert_eq!(g.run(&f).unwrap().0, XDP_DROP);
    }
    let c = g.dp.counters().unwrap();
    assert_eq!(c[GateResult::UnknownNode.index() as usize], 10);
    assert_eq!(
        c[counter::REPORT_LIMITED as usize],
        7,
        "burst of 3, then limited"
    );
    for want in 100..103u32 {
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("report in time")
            .expect("report");
        assert_eq!(
            (r.kind, r.node_id, r.family),
            (REPORT_UNKNOWN_NODE, want, 4)
        );
        assert_eq!(r.src_addr[..4], [198, 18, 0, 2]);
        assert_eq!(r.src_port, 40000);
    }
    // A restart: generation rises after accepted datagrams.
    assert_eq!(g.run(&v4(&sealed(hb(1)))).unwrap().0, XDP_DROP);
    let f = Udp::v6(
        PORT,
        &sealed(Datagram {
            generation: GEN + 5,
            ..hb(1)
        }),
    )
    .build();
    assert_eq!(g.run(&f).unwrap().0, XDP_DROP);
    assert_eq!(g.state().restarts, 1);
    // The restart bucket is separate, but limited the same way: it held
    // 3 tokens, this is its first report.
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("restart report in time")
        .expect("report");
    assert_eq!(r.kind, REPORT_RESTART);
    assert_eq!(
        (r.generation, r.prev_generation, r.family),
        (GEN + 5, GEN, 6)
    );
    let src: IpAddr = r.src_addr.into();
    assert_eq!(src, "fd00:4842::2".parse::<IpAddr>().unwrap());
    // Bad epochs: a provisioned node at an epoch it has no key for, named
    // with that epoch, from the restarts' bucket (2 tokens left).
    for epoch in [7u8, 8, 9] {
        let f = v4(&sealed(Datagram {
            key_epoch: epoch,
            ..hb(2)
        }));
        assert_eq!(g.run(&f).unwrap().0, XDP_DROP);
    }
    let c = g.dp.counters().unwrap();
    assert_eq!(c[GateResult::BadEpoch.index() as usize], 3);
    assert_eq!(c[counter::REPORT_LIMITED as usize], 8, "the third limited");
    for want in [7u8, 8] {
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("bad-epoch report in time")
            .expect("report");
        assert_eq!(
            (r.kind, r.node_id, r.key_epoch, r.family),
            (REPORT_BAD_EPOCH, NODE, want, 4)
        );
        assert_eq!(r.src_addr[..4], [198, 18, 0, 2]);
    }
    assert!(rx.try_recv().is_err(), "no more reports");
}

fn pin_to_cpu0() {
    pin_to_cpu(0);
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with `cpu` set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU {cpu}"
        );
    }
}

/// Runs `frame` once through `prog` on this thread's CPU: the action. For
/// threads that share the program (`Gate::run` holds the object's lock).
fn run_on(prog: &Xdp, frame: &[u8]) -> u32 {
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ..TestRunOptions::default()
    })
    .expect("test run")
    .return_value
}

/// Runs `frames` through the gate on CPUs 0 and 1 at once, each CPU the
/// whole list; with `lockstep`, both spin until the other is there too
/// before every frame (a spin, not a futex: both leave it within a few
/// hundred ns, so the copies of a frame overlap in the gate). Returns how
/// many each CPU saw dropped.
fn race_on_two_cpus(g: &Gate, frames: &[Vec<u8>], lockstep: bool) -> Vec<u64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let ebpf = g.dp.ebpf();
    let prog: &Xdp = ebpf.program(names::PROGRAM).unwrap().try_into().unwrap();
    let arrived = AtomicU64::new(0);
    let t = std::time::Instant::now();
    let meet = |round: u64| {
        arrived.fetch_add(1, Ordering::AcqRel);
        while arrived.load(Ordering::Acquire) < 2 * round {
            std::hint::spin_loop();
            assert!(t.elapsed().as_secs() < 60, "bounded in time");
        }
    };
    std::thread::scope(|s| {
        let workers: Vec<_> = [0, 1]
            .into_iter()
            .map(|cpu| {
                let meet = &meet;
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    meet(1);
                    let mut dropped = 0u64;
                    for (i, f) in frames.iter().enumerate() {
                        if lockstep {
                            meet(2 + i as u64);
                        }
                        dropped += u64::from(run_on(prog, f) == XDP_DROP);
                        assert!(t.elapsed().as_secs() < 60, "bounded in time");
                    }
                    dropped
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    })
}

/// Every copy of a heartbeat delivered on two CPUs at once (a duplicating
/// path, say a broadcast-mode bond, with RSS spreading the copies):
/// - copies of one heartbeat racing each other, later heartbeats after
///   it (as a sender's are, >= 100 ms apart): each accepted exactly once,
///   the other copy dropped as a replay;
/// - every copy back to back on both CPUs (no sender does this; a stress
///   of the per-node lock): never accepted twice, and the state stays
///   consistent: a heartbeat both of whose copies gave up on the lock is
///   counted lost, as it is to the detector.
#[test]
fn a_heartbeat_raced_on_two_cpus_is_accepted_at_most_once() {
    let n = 10_000u64;
    for lockstep in [true, false] {
        let g = Gate::new(Config {
            port: PORT,
            ..Config::default()
        });
        let frames: Vec<Vec<u8>> = (1..=n).map(|s| v4(&sealed(hb(s)))).collect();
        let dropped = race_on_two_cpus(&g, &frames, lockstep);
        assert_eq!(dropped, [n, n], "every copy consumed (no ACKs configured)");
        let st = g.state();
        let c = g.dp.counters().unwrap();
        let (accepted, replay) = (
            c[GateResult::Accepted.index() as usize],
            c[GateResult::Replay.index() as usize],
        );
        let contended = c[counter::CONTENDED as usize];
        eprintln!(
            "lockstep {lockstep}: {n} heartbeats x 2 CPUs: {accepted} accepted, \
             {replay} replays ({contended} gave up on the lock), {} lost",
            st.lost
        );
        assert_eq!(accepted + replay, 2 * n, "each copy counted once");
        assert_eq!(st.accepted, accepted);
        assert_eq!(
            u64::from(st.replay) + contended,
            replay,
            "node's replays + contended"
        );
        assert_eq!(st.max_seq, n);
        assert_eq!(
            st.accepted + st.lost,
            n,
            "each heartbeat accepted once or lost"
        );
        if lockstep {
            assert_eq!(st.accepted, n, "racing copies: one of each accepted");
        }
    }
}

/// Anyone who has seen one of a node's heartbeats on the wire can send it
/// again, as often as they like. A flood of such replays on one CPU must
/// not cost the node the fresh heartbeats it sends meanwhile (on another
/// CPU): a replay is recognised without taking the node's lock, as a
/// forged datagram is.
#[test]
fn a_replay_flood_does_not_crowd_out_fresh_heartbeats() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let g = Gate::new(Config {
        port: PORT,
        ..Config::default()
    });
    let old = v4(&sealed(hb(1)));
    assert_eq!(g.run(&old).unwrap().0, XDP_DROP);
    let n = 10_000u64;
    let fresh: Vec<Vec<u8>> = (2..=n).map(|s| v4(&sealed(hb(s)))).collect();
    let ebpf = g.dp.ebpf();
    let prog: &Xdp = ebpf.program(names::PROGRAM).unwrap().try_into().unwrap();
    let done = AtomicBool::new(false);
    let flooded = AtomicU64::new(0);
    let t = std::time::Instant::now();
    let (flood, dropped) = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            pin_to_cpu(1);
            while !done.load(Ordering::Relaxed) && t.elapsed().as_secs() < 60 {
                run_on(prog, &old);
                flooded.fetch_add(1, Ordering::Release);
            }
            flooded.load(Ordering::Acquire)
        });
        pin_to_cpu(0);
        let mut dropped = 0u64;
        for (i, f) in fresh.iter().enumerate() {
            // The flood stays ahead of the heartbeats however busy CPU 1
            // is with other work (on a loaded machine it once ran fewer
            // replays than there were heartbeats).
            while flooded.load(Ordering::Acquire) <= i as u64 && t.elapsed().as_secs() < 60 {
                std::hint::spin_loop();
            }
            dropped += u64::from(run_on(prog, f) == XDP_DROP);
        }
        done.store(true, Ordering::Relaxed);
        (flooder.join().unwrap(), dropped)
    });
    drop(ebpf);
    assert_eq!(dropped, n - 1, "consumed (no ACKs configured)");
    let st = g.state();
    let c = g.dp.counters().unwrap();
    eprintln!(
        "{} fresh heartbeats during a flood of {flood} replays: {} accepted; {} replays gave up on the lock",
        n - 1,
        st.accepted - 1,
        c[counter::CONTENDED as usize]
    );
    assert!(
        flood >= n - 1,
        "the flood kept ahead of the heartbeats ({flood})"
    );
    assert_eq!(st.accepted, n, "every fresh heartbeat accepted");
    assert_eq!(st.lost, 0);
    // Replays that met a fresh heartbeat holding the lock gave up on it:
    // dropped, as they are anyway.
    let replays = c[GateResult::Replay.index() as usize];
    assert_eq!(replays, flood);
    assert_eq!(
        u64::from(st.replay) + c[counter::CONTENDED as usize],
        replays
    );
}

#[test]
fn node_state_after_a_sequence() {
    let g = Gate::new(Config {
        port: PORT,
        ..Config::default()
    });
    let sc0 = g.state().seqcount;
    for seq in [1u64, 2, 5, 4] {
        assert_eq!(g.run(&v4(&sealed(hb(seq)))).unwrap().0, XDP_DROP);
    }
    let s = g.state();
    assert_eq!((s.generation, s.max_seq, s.accepted), (GEN, 5, 4));
    assert_eq!(s.lost, 1, "3 lost, 4 arrived late");
    assert!(s.ia_mean_ns != 0, "moments seeded from interval_ms");
    assert_eq!(
        s.ia_samples, 1,
        "2 gave a sample; the first, 5 (after two losses) and the late one not"
    );
    assert_eq!((s.load, s.rtt_us, s.interval_ms), (250, 850, 1000));
    assert!(!s.leaving());
    assert!(s.last_arrival_ns > 0 && s.gen_start_ns > 0 && s.gen_start_ns <= s.last_arrival_ns);
    let bye = Datagram {
        flags: FLAG_LEAVING,
        ..hb(6)
    };
    assert_eq!(g.run(&v4(&sealed(bye))).unwrap().0, XDP_DROP);
    assert!(g.state().leaving());
    assert_eq!(g.state().seqcount - sc0, 2 * 5, "five writes, each +2");
    // The same datagrams through the userspace gate give the same state
    // (but for the clock): one implementation in hb-common.
    let mem = hb::dataplane::mem::MemDataplane::new();
    mem.upsert_node(NODE, &NodeKeys::single(SLOT, 1, key()))
        .unwrap();
    let src = "198.18.0.2:40000".parse().unwrap();
    for (i, seq) in [1u64, 2, 5, 4].into_iter().enumerate() {
        mem.gate(&hb(seq).seal(&key()), src, 1 + i as u64);
    }
    mem.gate(&bye.seal(&key()), src, 10);
    let mut m = NodeState::default();
    mem.read_states(SLOT..SLOT + 1, &mut |_, s| m = *s);
    let k = g.state();
    assert_eq!(
        (
            m.generation,
            m.max_seq,
            m.replay_bitmap,
            m.lost,
            m.accepted,
            m.flags
        ),
        (
            k.generation,
            k.max_seq,
            k.replay_bitmap,
            k.lost,
            k.accepted,
            k.flags
        )
    );
}

// The kernel gate against the userspace gate (`--mode userspace`) on
// random traffic: every frame through both, the same result, action, ACK
// bytes, counters and per-node state (but for the clock) after each one.

/// Frames per seed, and the seeds run by default. `HB_GATE_DIFF_SEEDS`
/// (comma-separated) runs others, to explore or to reproduce a failure.
const DIFF_FRAMES: usize = 20_000;
const DIFF_SEEDS: [u64; 3] = [1, 2, 3];

/// A key for node `id` at `epoch` (node 42 at epoch 1 is the test vector).
fn diff_key(id: u32, epoch: u8) -> NodeKey {
    if (id, epoch) == (NODE, 1) {
        return key();
    }
    NodeKey {
        k0: u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(epoch),
        k1: u64::from(epoch).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ u64::from(id),
    }
}

/// One node's honest sender, and what both dataplanes hold for it.
struct DiffNode {
    id: u32,
    slot: u32,
    /// Provisioned in both dataplanes (`keys` valid).
    provisioned: bool,
    keys: NodeKeys,
    /// The epoch the sender seals with.
    epoch: u8,
    generation: u32,
    seq: u64,
    interval_ms: u32,
    /// Everything it sent, for replays.
    sent: Vec<[u8; hb_common::proto::LEN]>,
}

impl DiffNode {
    fn datagram(&self, rng: &mut impl rand::RngExt) -> Datagram {
        Datagram {
            kind: Kind::Heartbeat,
            node_id: self.id,
            generation: self.generation,
            key_epoch: self.epoch,
            flags: if rng.random_bool(0.03) {
                FLAG_LEAVING
            } else {
                0
            },
            load: rng.random_range(0..1200),
            seq: self.seq,
            sent_ns: rng.random(),
            interval_ms: self.interval_ms,
            rtt_us: rng.random_range(0..5000),
        }
    }

    fn seal(&mut self, d: Datagram) -> Vec<u8> {
        let b = d.seal(&diff_key(self.id, d.key_epoch));
        self.sent.push(b);
        b.to_vec()
    }
}

/// The parts of a node's state that do not depend on when datagrams
/// arrived (the kernel's clock is not ours to set).
#[derive(Debug, PartialEq)]
struct Untimed {
    node_id: u32,
    key_epoch: [u8; 2],
    key_valid: u8,
    generation: u32,
    accepted: u64,
    max_seq: u64,
    replay_bitmap: u64,
    lost: u64,
    interval_ms: u32,
    rtt_us: u32,
    load: u16,
    flags: u8,
    ia_samples: u16,
    requested_interval_ms: u32,
    bad_tag: u32,
    replay: u32,
    stale: u32,
    restarts: u32,
    acks_sent: u32,
}

fn untimed(s: &NodeState) -> Untimed {
    Untimed {
        node_id: s.node_id,
        key_epoch: s.key_epoch,
        key_valid: s.key_valid,
        generation: s.generation,
        accepted: s.accepted,
        max_seq: s.max_seq,
        replay_bitmap: s.replay_bitmap,
        lost: s.lost,
        interval_ms: s.interval_ms,
        rtt_us: s.rtt_us,
        load: s.load,
        flags: s.flags,
        ia_samples: s.ia_samples,
        requested_interval_ms: s.requested_interval_ms,
        bad_tag: s.bad_tag,
        replay: s.replay,
        stale: s.stale,
        restarts: s.restarts,
        acks_sent: s.acks_sent,
    }
}

/// What one step of the run does.
enum Step {
    /// A UDP payload to the heartbeat port.
    Payload(Vec<u8>),
    /// Provisioning or configuration, applied to both dataplanes.
    Control,
}

/// One random step for `nodes[i]`; `what` says what it was.
fn diff_step(
    rng: &mut rand_chacha::ChaCha8Rng,
    nodes: &mut [DiffNode],
    g: &Gate,
    mem: &hb::dataplane::mem::MemDataplane,
    cfg: &mut Config,
    what: &mut String,
) -> Step {
    use rand::RngExt as _;
    let i = rng.random_range(0..nodes.len());
    let n = &mut nodes[i];
    let roll = rng.random_range(0..100u32);
    what.clear();
    let both = |f: &dyn Fn(&dyn Dataplane)| {
        f(&g.dp);
        f(mem);
    };
    let step = match roll {
        // The sender's next heartbeat, sometimes after losses, sometimes
        // at a new interval.
        0..=39 => {
            n.seq += if rng.random_bool(0.1) {
                rng.random_range(2..80)
            } else {
                1
            };
            if rng.random_bool(0.08) {
                n.interval_ms = [0, 100, 250, 1000, 5000][rng.random_range(0..5)];
            }
            let d = n.datagram(rng);
            *what = format!("heartbeat seq {} interval {}", d.seq, d.interval_ms);
            Step::Payload(n.seal(d))
        }
        // A copy of something it sent before.
        40..=47 if !n.sent.is_empty() => {
            let k = rng.random_range(0..n.sent.len());
            *what = format!("replay of datagram {k}");
            Step::Payload(n.sent[k].to_vec())
        }
        // Late, inside the window or past it.
        48..=55 => {
            let back = rng.random_range(1..80).min(n.seq);
            let d = Datagram {
                seq: n.seq - back,
                ..n.datagram(rng)
            };
            *what = format!("late seq {}", d.seq);
            Step::Payload(n.seal(d))
        }
        // A restart: a later generation, from sequence 1 (or 0, which
        // never starts one).
        56..=59 => {
            n.generation = n.generation.wrapping_add(rng.random_range(1..4));
            n.seq = u64::from(!rng.random_bool(0.1));
            let d = n.datagram(rng);
            *what = format!("restart to generation {} seq {}", d.generation, d.seq);
            Step::Payload(n.seal(d))
        }
        // An earlier generation.
        60..=62 => {
            let d = Datagram {
                generation: n.generation.wrapping_sub(rng.random_range(1..4)),
                seq: n.seq + 1,
                ..n.datagram(rng)
            };
            *what = format!("generation {} (stale)", d.generation);
            Step::Payload(n.seal(d))
        }
        // One bit flipped anywhere in a sealed datagram.
        63..=70 => {
            n.seq += 1;
            let d = n.datagram(rng);
            let mut b = d.seal(&diff_key(n.id, n.epoch));
            let bit = rng.random_range(0..hb_common::proto::LEN * 8);
            b[bit / 8] ^= 1 << (bit % 8);
            *what = format!("seq {} with bit {bit} flipped", d.seq);
            Step::Payload(b.to_vec())
        }
        // Forged fields: an unknown node, an epoch it holds no key for,
        // reserved flags, an ACK, a tag made with another node's key.
        71..=77 => {
            n.seq += 1;
            let mut d = n.datagram(rng);
            let mut key_of = n.id;
            match rng.random_range(0..5) {
                0 => {
                    // Id 0 (never provisioned, and what an empty index
                    // entry holds) one time in ten.
                    d.node_id = rng.random_range(0..1000) * 1000 + u32::from(rng.random_bool(0.9));
                    key_of = d.node_id;
                    *what = format!("unknown node {}", d.node_id);
                }
                1 => {
                    d.key_epoch = n.epoch.wrapping_add(rng.random_range(1..255));
                    *what = format!("epoch {}", d.key_epoch);
                }
                2 => {
                    d.flags = rng.random_range(2..=255);
                    *what = format!("flags {:#x}", d.flags);
                }
                3 => {
                    d.kind = Kind::Ack;
                    *what = "an ACK".into();
                }
                _ => {
                    key_of = n.id ^ 1;
                    *what = "sealed with another key".into();
                }
            }
            Step::Payload(d.seal(&diff_key(key_of, d.key_epoch)).to_vec())
        }
        // Not 48 bytes, or 48 random ones.
        78..=81 => {
            let len = if rng.random_bool(0.25) {
                hb_common::proto::LEN
            } else {
                let l = rng.random_range(0..64);
                if l == hb_common::proto::LEN { 0 } else { l }
            };
            let mut b = if n.sent.is_empty() {
                Vec::new()
            } else {
                n.sent[n.sent.len() - 1].to_vec()
            };
            b.resize(len, 0);
            if len == hb_common::proto::LEN || b.is_empty() {
                b = (0..len).map(|_| rng.random()).collect();
            }
            *what = format!("{len} bytes");
            Step::Payload(b)
        }
        // Key rotation: the next epoch added; later the old one dropped
        // and the sender moved on.
        82..=85 if n.provisioned => {
            if n.keys.valid == 3 {
                // The old key dropped; a sender that has not moved on
                // yet mostly does now.
                let newer = n.keys.epoch[1];
                n.keys = NodeKeys::single(n.slot, newer, diff_key(n.id, newer));
                if rng.random_bool(0.8) {
                    n.epoch = newer;
                }
            } else {
                let next = n.keys.epoch[0].wrapping_add(1);
                n.keys.epoch[1] = next;
                n.keys.key[1] = diff_key(n.id, next);
                n.keys.valid = 3;
                if rng.random_bool(0.5) {
                    n.epoch = next;
                }
            }
            let (id, keys) = (n.id, n.keys);
            both(&|dp| dp.upsert_node(id, &keys).unwrap());
            *what = format!(
                "keys now {:?} valid {}, sender at {}",
                keys.epoch, keys.valid, n.epoch
            );
            Step::Control
        }
        // Removed, provisioned again (a fresh state), or moved to another
        // slot (the state goes along).
        86..=88 => {
            if n.provisioned && rng.random_bool(0.3) {
                let id = n.id;
                both(&|dp| dp.remove_node(id).unwrap());
                n.provisioned = false;
                *what = "removed".into();
            } else {
                if n.provisioned {
                    // Each node moves among four slots of its own (16 +
                    // 4i ..): the run's nodes start below them.
                    n.slot = 16 + 4 * i as u32 + (n.slot + 1) % 4;
                    n.keys.slot = n.slot;
                }
                let (id, keys) = (n.id, n.keys);
                both(&|dp| dp.upsert_node(id, &keys).unwrap());
                n.provisioned = true;
                *what = format!("provisioned at slot {}", n.slot);
            }
            Step::Control
        }
        // The monitor asks for an interval, or changes the ACK policy.
        89..=93 => {
            if rng.random_bool(0.7) {
                let slot = n.slot;
                let ms = [0, 100, 250, 1000, 5000][rng.random_range(0..5)];
                both(&|dp| dp.set_requested_interval(slot, ms));
                *what = format!("requested interval {ms} at slot {slot}");
            } else {
                cfg.ack_every = [0, 1, 3][rng.random_range(0..3)];
                cfg.ack_on_change = rng.random_range(0..2);
                cfg.pass_accepted = u8::from(rng.random_bool(0.15));
                let c = *cfg;
                both(&|dp| dp.set_config(&c).unwrap());
                *what = format!(
                    "ack every {} on change {} pass accepted {}",
                    c.ack_every, c.ack_on_change, c.pass_accepted
                );
            }
            Step::Control
        }
        _ => {
            n.seq += 1;
            let d = n.datagram(rng);
            *what = format!("heartbeat seq {}", d.seq);
            Step::Payload(n.seal(d))
        }
    };
    *what = format!("node {}: {what}", nodes[i].id);
    step
}

fn kernel_and_userspace_gates_agree(seed: u64) {
    use rand::{RngExt as _, SeedableRng as _};
    let mut cfg = Config {
        port: PORT,
        ack_every: 3,
        ack_on_change: 1,
        ..Config::default()
    };
    let g = Gate::new(cfg);
    let mem = hb::dataplane::mem::MemDataplane::new();
    mem.set_config(&cfg).unwrap();
    let mut nodes: Vec<DiffNode> = [(NODE, SLOT), (7, 0), (0x00ab_cdef, 9)]
        .into_iter()
        .map(|(id, slot)| DiffNode {
            id,
            slot,
            provisioned: true,
            keys: NodeKeys::single(slot, 1, diff_key(id, 1)),
            epoch: 1,
            generation: GEN,
            seq: 0,
            interval_ms: 1000,
            sent: Vec::new(),
        })
        .collect();
    for n in &nodes {
        g.dp.upsert_node(n.id, &n.keys).unwrap();
        mem.upsert_node(n.id, &n.keys).unwrap();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let src = "198.18.0.2:40000".parse().unwrap();
    let mut seen = [0u64; GateResult::ALL.len()];
    let mut acks = 0u64;
    let mut log: Vec<String> = Vec::new();
    let mut what = String::new();
    let mut counted = g.dp.counters().unwrap();
    for step in 0..DIFF_FRAMES {
        let s = diff_step(&mut rng, &mut nodes, &g, &mem, &mut cfg, &mut what);
        log.push(what.clone());
        let ctx = || {
            let from = log.len().saturating_sub(8);
            format!(
                "seed {seed} step {step}; last steps:\n  {}",
                log[from..].join("\n  ")
            )
        };
        if let Step::Payload(p) = s {
            let mut u = match rng.random_range(0..3) {
                0 => Udp::v4(PORT, &p),
                1 => Udp::v6(PORT, &p),
                _ => {
                    let mut u = Udp::v4(PORT, &p);
                    u.vlan = Some(7);
                    u
                }
            };
            u.sport = rng.random_range(1024..65535);
            let frame = u.build();
            let (action, out) = g.run(&frame).unwrap_or_else(|e| panic!("{e}: {}", ctx()));
            let v = mem.gate(&p, src, 1 + step as u64 * 1_000_000);
            seen[v.result.index() as usize] += 1;
            let now = g.dp.counters().unwrap();
            let kernel: Vec<_> = GateResult::ALL
                .iter()
                .filter(|r| now[r.index() as usize] != counted[r.index() as usize])
                .collect();
            assert_eq!(
                kernel,
                [&v.result],
                "result (kernel, userspace): {}\nprovisioned: kernel {:?}, userspace {:?}",
                ctx(),
                g.dp.provisioned()
                    .map(|v| v.iter().map(|(id, k)| (*id, k.slot)).collect::<Vec<_>>()),
                mem.provisioned()
                    .map(|v| v.iter().map(|(id, k)| (*id, k.slot)).collect::<Vec<_>>()),
            );
            counted = now;
            let want = match (v.result, v.ack) {
                (_, Some(_)) => XDP_TX,
                (GateResult::Accepted, None) if cfg.pass_accepted != 0 => XDP_PASS,
                _ => XDP_DROP,
            };
            assert_eq!(action, want, "action for {:?}: {}", v.result, ctx());
            if let Some(ack) = v.ack {
                acks += 1;
                let (_, udp, _) = frames::offsets(&frame);
                assert_eq!(out[udp + 8..], ack[..], "ACK payload: {}", ctx());
            }
        }
        let m = mem.counters().unwrap();
        for i in (1..GateResult::ALL.len()).chain([counter::ACK_SENT as usize]) {
            assert_eq!(counted[i], m[i], "counter {i}: {}", ctx());
        }
        for n in nodes.iter().filter(|n| n.provisioned) {
            let mut ms = NodeState::default();
            mem.read_states(n.slot..n.slot + 1, &mut |_, s| ms = *s);
            let ks = g.dp.state(n.slot).unwrap();
            assert_eq!(untimed(&ks), untimed(&ms), "node {} state: {}", n.id, ctx());
        }
    }
    // The run reached every result a payload can have (pass is for frames
    // not to the port) and took every node through restarts and rotations.
    let missing: Vec<_> = GateResult::ALL
        .iter()
        .skip(1)
        .filter(|r| seen[r.index() as usize] == 0)
        .collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: no {missing:?} in {DIFF_FRAMES} steps"
    );
    assert!(acks > 0, "seed {seed}: no ACK in {DIFF_FRAMES} steps");
    eprintln!(
        "seed {seed}: {DIFF_FRAMES} steps agree; {acks} ACKs; results {:?}",
        GateResult::ALL
            .iter()
            .skip(1)
            .map(|r| (r.to_string(), seen[r.index() as usize]))
            .collect::<Vec<_>>()
    );
}

#[test]
fn kernel_and_userspace_gates_agree_on_random_traffic() {
    let seeds: Vec<u64> = match std::env::var("HB_GATE_DIFF_SEEDS") {
        Ok(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("HB_GATE_DIFF_SEEDS: comma-separated integers")
            })
            .collect(),
        Err(_) => DIFF_SEEDS.to_vec(),
    };
    for seed in seeds {
        kernel_and_userspace_gates_agree(seed);
    }
}

/// A leaked key lets anyone send one valid heartbeat of generation
/// `u32::MAX` (or seq `u64::MAX`): every genuine one after it is `stale`.
/// The kernel records which epoch let each accepted heartbeat in; a
/// rotation that revokes that epoch forgets the generation and window it
/// set, in place and when the node moves to another slot, so the node's
/// heartbeats under the new key are taken again (a restart). A rotation
/// that drops an epoch the node no longer used keeps them.
#[test]
fn a_rotation_revoking_the_accepted_epoch_forgets_the_generation_it_set() {
    let g = Gate::new(Config {
        port: PORT,
        ..Config::default()
    });
    let run = |d: Datagram, k: &NodeKey| g.run(&v4(&d.seal(k))).unwrap().0;
    let k2 = NodeKey { k0: 5, k1: 6 };
    let keys = |slot, epochs: &[(u8, NodeKey)]| {
        let mut k = NodeKeys::single(slot, epochs[0].0, epochs[0].1);
        if let Some(&(e, key)) = epochs.get(1) {
            (k.epoch[1], k.key[1], k.valid) = (e, key, 3);
        }
        k
    };
    assert_eq!(run(hb(1), &key()), XDP_DROP);
    assert_eq!(g.state().accepted_epoch, ACCEPTED_EPOCH_KNOWN | 1);
    // The forgery, under the epoch-1 key.
    let forged = Datagram {
        generation: u32::MAX,
        seq: u64::MAX,
        ..hb(2)
    };
    run(forged, &key());
    assert_eq!(g.state().generation, u32::MAX);
    // Epoch 2 added: the node restarts on it, still held down.
    g.dp.upsert_node(NODE, &keys(SLOT, &[(1, key()), (2, k2)]))
        .unwrap();
    let genuine = |seq| Datagram {
        key_epoch: 2,
        generation: GEN + 1000,
        ..hb(seq)
    };
    let before = g.dp.counters().unwrap();
    run(genuine(1), &k2);
    let after = g.dp.counters().unwrap();
    let stale = GateResult::Stale.index() as usize;
    assert_eq!(
        after[stale],
        before[stale] + 1,
        "held down while epoch 1 is held"
    );
    // Epoch 1 removed: the generation and window it set are gone.
    g.dp.upsert_node(NODE, &keys(SLOT, &[(2, k2)])).unwrap();
    let s = g.state();
    assert_eq!((s.generation, s.max_seq, s.replay_bitmap), (0, 0, 0));
    assert_eq!((s.accepted, s.restarts), (2, 1), "counts kept");
    run(genuine(2), &k2);
    let s = g.state();
    assert_eq!((s.generation, s.accepted, s.restarts), (GEN + 1000, 3, 2));
    assert_eq!(s.accepted_epoch, ACCEPTED_EPOCH_KNOWN | 2);
    // Epoch 1 added back and dropped again: the node's window stays.
    g.dp.upsert_node(NODE, &keys(SLOT, &[(2, k2), (1, key())]))
        .unwrap();
    g.dp.upsert_node(NODE, &keys(SLOT, &[(2, k2)])).unwrap();
    let before = g.dp.counters().unwrap();
    run(genuine(2), &k2);
    let after = g.dp.counters().unwrap();
    let replay = GateResult::Replay.index() as usize;
    assert_eq!(after[replay], before[replay] + 1, "the window kept");
    // Moved to another slot by a rotation that revokes epoch 2: the state
    // moves, without what epoch 2 set.
    let k3 = NodeKey { k0: 7, k1: 8 };
    g.dp.upsert_node(NODE, &keys(SLOT + 1, &[(3, k3)])).unwrap();
    let s = g.dp.state(SLOT + 1).unwrap();
    assert_eq!((s.node_id, s.generation, s.accepted), (NODE, 0, 3));
    let d = Datagram {
        key_epoch: 3,
        generation: GEN + 2000,
        ..hb(1)
    };
    assert_eq!(run(d, &k3), XDP_DROP);
    let s = g.dp.state(SLOT + 1).unwrap();
    assert_eq!((s.generation, s.accepted, s.restarts), (GEN + 2000, 4, 3));
}

/// The quickest answer to a leaked key is to replace its epoch's secret in
/// place (same epoch id): that revokes it too. The generation the leaked
/// key forged goes with it, and the node's heartbeats under the new key
/// are taken (a restart); the leaked key is refused. A reload that installs
/// the same key again (another node's change, a keyring touched) keeps
/// everything. (Only a dropped epoch revoked: the node stayed `stale`.)
#[test]
fn replacing_the_accepted_epochs_secret_in_place_forgets_what_it_set() {
    let g = Gate::new(Config {
        port: PORT,
        ..Config::default()
    });
    let run = |d: Datagram, k: &NodeKey| g.run(&v4(&d.seal(k))).unwrap().0;
    let count = |r: GateResult| g.dp.counters().unwrap()[r.index() as usize];
    let leaked = key();
    let fresh = NodeKey { k0: 9, k1: 10 };
    run(hb(1), &leaked);
    let forged = Datagram {
        generation: u32::MAX,
        ..hb(2)
    };
    run(forged, &leaked);
    assert_eq!(g.state().generation, u32::MAX);
    // The same key installed again: nothing is forgotten.
    g.dp.upsert_node(NODE, &NodeKeys::single(SLOT, 1, leaked))
        .unwrap();
    assert_eq!(
        g.state().generation,
        u32::MAX,
        "the same key revokes nothing"
    );
    // Epoch 1's secret replaced.
    g.dp.upsert_node(NODE, &NodeKeys::single(SLOT, 1, fresh))
        .unwrap();
    let s = g.state();
    assert_eq!((s.generation, s.max_seq, s.replay_bitmap), (0, 0, 0));
    assert_eq!((s.accepted, s.restarts), (2, 1), "counts kept");
    let bad_tag = count(GateResult::BadTag);
    run(
        Datagram {
            generation: u32::MAX,
            ..hb(3)
        },
        &leaked,
    );
    assert_eq!(
        count(GateResult::BadTag),
        bad_tag + 1,
        "the leaked key refused"
    );
    let genuine = Datagram {
        generation: GEN + 1000,
        ..hb(1)
    };
    run(genuine, &fresh);
    let s = g.state();
    assert_eq!(
        (s.generation, s.accepted, s.restarts),
        (GEN + 1000, 3, 2),
        "the node's heartbeat under the new secret is taken"
    );
}

/// A heartbeat that travelled to or from a group address is taken but not
/// answered. To one: in an Ethernet broadcast frame (to the host's unicast
/// IP), or, with no address table (or more than 16 addresses), to
/// 255.255.255.255 or a multicast group; its ACK left with that group
/// address as its source. From one: a group source MAC, or a broadcast,
/// multicast or unspecified source IP (none is a sender's, but the headers
/// are not under the tag: a copy of a fresh heartbeat rewritten on the
/// way has them); its ACK went to that group, every host of the segment.
/// The same heartbeat between unicast addresses is answered.
#[test]
fn no_ack_goes_to_or_from_a_group_address() {
    let g = Gate::new(Config {
        port: PORT,
        ack_every: 1,
        ..Config::default()
    });
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    type Edit = Box<dyn Fn(&mut Udp)>;
    let cases: Vec<(&str, bool, Edit)> = vec![
        (
            "to the broadcast MAC",
            false,
            Box::new(|u| u.dst_mac = [0xff; 6]),
        ),
        (
            "to 255.255.255.255",
            false,
            Box::new(move |u| u.dst = ip("255.255.255.255")),
        ),
        (
            "to 224.0.0.1",
            false,
            Box::new(move |u| u.dst = ip("224.0.0.1")),
        ),
        (
            "from a multicast MAC",
            false,
            Box::new(|u| u.src_mac = [1, 0, 0x5e, 0, 0, 1]),
        ),
        (
            "from 255.255.255.255",
            false,
            Box::new(move |u| u.src = ip("255.255.255.255")),
        ),
        (
            "from 239.1.2.3",
            false,
            Box::new(move |u| u.src = ip("239.1.2.3")),
        ),
        (
            "from 0.0.0.0",
            false,
            Box::new(move |u| u.src = ip("0.0.0.0")),
        ),
        ("unicast v4", true, Box::new(|_| {})),
    ];
    let cases_v6: Vec<(&str, bool, Edit)> = vec![
        (
            "to ff02::1",
            false,
            Box::new(move |u| u.dst = ip("ff02::1")),
        ),
        (
            "from ff02::1",
            false,
            Box::new(move |u| u.src = ip("ff02::1")),
        ),
        ("from ::", false, Box::new(move |u| u.src = ip("::"))),
        ("unicast v6", true, Box::new(|_| {})),
    ];
    let mut seq = 0;
    let mut answered = 0;
    for (v6, (what, answer, edit)) in cases
        .iter()
        .map(|c| (false, c))
        .chain(cases_v6.iter().map(|c| (true, c)))
    {
        seq += 1;
        let payload = sealed(hb(seq));
        let mut u = if v6 {
            Udp::v6(PORT, &payload)
        } else {
            Udp::v4(PORT, &payload)
        };
        edit(&mut u);
        let (action, out) = g.run(&u.build()).unwrap();
        let (action_want, out_what) = if *answer {
            answered += 1;
            (XDP_TX, "an ACK")
        } else {
            (XDP_DROP, "no ACK")
        };
        assert_eq!(
            action,
            action_want,
            "{what}: want {out_what}; frame out {:02x?}",
            &out[..out.len().min(54)]
        );
    }
    // All taken.
    let c = g.dp.counters().unwrap();
    assert_eq!(c[GateResult::Accepted.index() as usize], seq, "{c:?}");
    assert_eq!(c[counter::ACK_SENT as usize], answered, "{c:?}");
}

/// PROTOCOL.md "ACK": with no opinion the ACK carries the sender's own
/// interval, the one the answered heartbeat carried; a reordered
/// heartbeat was answered with the newest one's.
#[test]
fn the_ack_of_a_late_heartbeat_echoes_its_own_interval() {
    let g = Gate::new(Config {
        port: PORT,
        ack_every: 1,
        ..Config::default()
    });
    let at = |seq, iv| {
        v4(&sealed(Datagram {
            interval_ms: iv,
            ..hb(seq)
        }))
    };
    assert_eq!(g.run(&at(1, 1000)).unwrap().0, XDP_TX);
    assert_eq!(g.run(&at(3, 500)).unwrap().0, XDP_TX);
    let late = at(2, 1000);
    let (action, out) = g.run(&late).unwrap();
    assert_eq!(action, XDP_TX);
    let (_, udp, _) = frames::offsets(&out);
    let p: &[u8; 48] = out[udp + 8..].try_into().unwrap();
    let a = hb_common::proto::parse(p, Kind::Ack).unwrap();
    assert_eq!(a.seq, 2);
    assert_eq!(a.interval_ms, 1000, "echo of seq 2's own interval");
}

/// Property: any frame, of any shape (IPv4 with options, fragments,
/// IPv6 with or without an extension header, a VLAN tag, any port, any
/// payload, then bits flipped, cut short or padded; or bytes alone) gets
/// exactly one gate result: `pass` hands it to the kernel untouched and
/// counts nothing, anything else is dropped and moves its result's counter
/// once; no frame but a genuine heartbeat is accepted. Where the headers
/// were left whole, the result is the userspace gate's on the payload.
#[test]
fn any_frame_gets_one_result_and_pass_leaves_it_untouched() {
    use proptest::{prelude::*, test_runner::TestRunner};

    #[derive(Clone, Debug)]
    enum Payload {
        Heartbeat(u64),
        Flipped(u64, usize),
        Bytes(Vec<u8>),
    }

    #[derive(Clone, Debug)]
    enum Damage {
        None,
        Flip(Vec<usize>),
        Cut(usize),
        Pad(Vec<u8>),
    }

    let payload = prop_oneof![
        (1..200u64).prop_map(Payload::Heartbeat),
        (1..200u64, 0..48 * 8usize).prop_map(|(s, b)| Payload::Flipped(s, b)),
        prop::collection::vec(any::<u8>(), 0..120).prop_map(Payload::Bytes),
    ];
    let shape = (
        any::<bool>(),
        prop::option::of(any::<u16>()),
        prop_oneof![Just(Vec::new()), prop::collection::vec(any::<u8>(), 0..=10)],
        prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
        any::<bool>(),
        prop_oneof![4 => Just(PORT), 1 => any::<u16>()],
    );
    let damage = prop_oneof![
        3 => Just(Damage::None),
        1 => prop::collection::vec(0..2000usize, 1..4).prop_map(Damage::Flip),
        1 => (14..200usize).prop_map(Damage::Cut),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Pad),
    ];
    let frame = prop_oneof![
        4 => (payload, shape, damage).prop_map(|(p, (v6, vlan, opts, frag, ext, dport), d)| {
            let bytes = match &p {
                Payload::Heartbeat(s) => sealed(hb(*s)),
                Payload::Flipped(s, bit) => {
                    let mut b = sealed(hb(*s));
                    b[bit / 8] ^= 1 << (bit % 8);
                    b
                }
                Payload::Bytes(b) => b.clone(),
            };
            let mut u = if v6 { Udp::v6(dport, &bytes) } else { Udp::v4(dport, &bytes) };
            u.vlan = vlan;
            if !v6 {
                // Options in whole words, as a header can only hold them.
                u.ip_options = opts[..opts.len() / 4 * 4].to_vec();
                u.frag = frag;
            }
            u.v6_ext_header = v6 && ext;
            let mut f = u.build();
            let whole = matches!(d, Damage::None);
            match d {
                Damage::None => {}
                Damage::Flip(bits) => {
                    for b in bits {
                        let n = f.len() * 8;
                        f[b % n / 8] ^= 1 << (b % 8);
                    }
                }
                Damage::Cut(len) => f.truncate(len.max(14)),
                Damage::Pad(tail) => f.extend(tail),
            }
            let clean = whole && u.frag == 0 && !u.v6_ext_header && dport == PORT;
            (f, bytes, clean)
        }),
        1 => prop::collection::vec(any::<u8>(), 14..300).prop_map(|f| (f, Vec::new(), false)),
    ];

    let g = Gate::new(Config {
        port: PORT,
        ..Config::default()
    });
    let mem = hb::dataplane::mem::MemDataplane::new();
    mem.set_config(&Config {
        port: PORT,
        ..Config::default()
    })
    .unwrap();
    mem.upsert_node(NODE, &NodeKeys::single(SLOT, 1, key()))
        .unwrap();
    let src = "198.18.0.2:40000".parse().unwrap();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&frame, |(f, payload, clean)| {
            let before = g.dp.counters().unwrap();
            let (action, out) = g.run(&f).unwrap();
            let after = g.dp.counters().unwrap();
            let moved: Vec<GateResult> = GateResult::ALL
                .into_iter()
                .filter(|r| after[r.index() as usize] != before[r.index() as usize])
                .collect();
            match action {
                XDP_PASS => {
                    prop_assert!(moved.is_empty(), "pass counted {:?}", moved);
                    prop_assert_eq!(&out, &f, "pass changed the frame");
                }
                XDP_DROP => {
                    prop_assert_eq!(moved.len(), 1, "counters {:?}", moved);
                    let r = moved[0];
                    prop_assert_eq!(after[r.index() as usize] - before[r.index() as usize], 1);
                    prop_assert!(r != GateResult::Pass);
                }
                other => prop_assert!(false, "action {} (no ACKs configured)", other),
            }
            let got = moved.first().copied().unwrap_or(GateResult::Pass);
            if clean || got == GateResult::Accepted {
                // Only a genuine heartbeat gets in, whatever else of its
                // frame was damaged (no IP or UDP checksum is checked):
                // the userspace gate sees its payload too, and agrees.
                let want = mem.gate(&payload, src, 1).result;
                prop_assert_eq!(got, want, "kernel and userspace gates differ");
            }
            Ok(())
        })
        .unwrap();
}

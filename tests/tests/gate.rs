//! The XDP gate through BPF_PROG_TEST_RUN: a table of frames (katran
//! style), one row per gate result and per header variant, each with the
//! expected XDP action, counter and per-node state effect; then the ACK
//! byte for byte, the report rate limit, restarts and a state sequence.
//! Needs root (CI runs it as root; nothing is skipped).

use std::{io::Write as _, net::IpAddr};

use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};
use hb::dataplane::{
    Dataplane,
    xdp::{XdpDataplane, XdpOptions},
};
use hb_common::{
    Datagram, GateResult, Kind, NodeKey,
    maps::{Config, NodeKeys, NodeState, REPORT_RESTART, REPORT_UNKNOWN_NODE, counter, names},
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

#[tokio::test]
async fn reports_unknown_nodes_at_a_bounded_rate_and_restarts() {
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
}

fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU 0"
        );
    }
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

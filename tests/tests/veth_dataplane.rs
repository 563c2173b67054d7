//! The XDP gate on a real veth pair in two namespaces: `hb_xdp` in native
//! mode on `veth-a` (namespace `a`, the monitor), `hb_pass` on `veth-b`
//! (namespace `b`, the node) so XDP_TX'd ACKs arrive. Heartbeats go out
//! of real UDP sockets in `b`. Plus the 1M-node capacity check and what
//! the node-state readers see, gating through BPF_PROG_TEST_RUN. Needs
//! root.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use hb::dataplane::{
    Dataplane,
    xdp::{AttachMode, XdpDataplane, XdpOptions},
};
use hb_common::{
    Datagram, GateResult, Kind, NodeKey,
    maps::{Config, MAX_NODES, NodeKeys, names},
    proto,
};
use hb_tests::netns::{IF_A, IF_B, NetNs, VethPair, sh};

const PORT: u16 = 7420;
const KEY: NodeKey = NodeKey {
    k0: 0x0123_4567_89ab_cdef,
    k1: 0x0fed_cba9_8765_4321,
};

fn log(s: String) {
    // Straight to fd 2: libtest captures eprintln!.
    let _ = writeln!(std::io::stderr(), "{s}");
}

fn keys(slot: u32) -> NodeKeys {
    NodeKeys::single(slot, 0, KEY)
}

fn hb(node_id: u32, seq: u64) -> [u8; proto::LEN] {
    Datagram {
        kind: Kind::Heartbeat,
        node_id,
        generation: 7,
        key_epoch: 0,
        flags: 0,
        load: 10,
        seq,
        sent_ns: seq * 1000,
        interval_ms: 1000,
        rtt_us: 0,
    }
    .seal(&KEY)
}

/// XDP_DROP: what the gate returns for a heartbeat it consumed (accepted
/// without an ACK).
const XDP_DROP: u32 = 1;

/// Runs the gate once over `datagram` (to `PORT`, as an IPv4 frame)
/// through BPF_PROG_TEST_RUN; returns the XDP action.
fn gate(dp: &XdpDataplane, datagram: &[u8]) -> u32 {
    let frame = hb_tests::frames::Udp::v4(PORT, datagram).build();
    let mut ebpf = dp.ebpf();
    let p: &mut Xdp = ebpf
        .program_mut(names::PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; 256];
    aya::programs::TestRun::test_run(
        &*p,
        aya::programs::TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        },
    )
    .unwrap()
    .return_value
}

#[test]
fn heartbeats_acks_and_other_traffic_over_veth() {
    let pair = VethPair::new("gate").unwrap();
    let dp = pair
        .a
        .run(|| {
            XdpDataplane::open(&XdpOptions {
                interfaces: vec![IF_A.into()],
                mode: AttachMode::Native,
                max_nodes: Some(1024),
                ..XdpOptions::default()
            })
        })
        .unwrap()
        .expect("attach in native mode");
    // hb_pass on the peer, so frames sent back with XDP_TX arrive.
    pair.b
        .run(|| {
            let mut ebpf = dp.ebpf();
            let p: &mut Xdp = ebpf.program_mut(names::PASS).unwrap().try_into().unwrap();
            p.attach(IF_B, XdpMode::Driver).map(|_| ())
        })
        .unwrap()
        .expect("hb_pass on veth-b");
    let link = String::from_utf8(pair.a.ip(&["link", "show", IF_A]).unwrap().stdout).unwrap();
    assert!(link.contains("xdp"), "native XDP attached: {link}");

    dp.upsert_node(5, &keys(0)).unwrap();
    dp.set_config(&Config {
        port: PORT,
        ack_every: 1,
        ..Config::default()
    })
    .unwrap();

    let monitors: [IpAddr; 2] = [pair.addrs.v4[0].into(), pair.addrs.v6[0].into()];
    let mut seq = 0;
    for (family, dst) in ["IPv4", "IPv6"].iter().zip(monitors) {
        let sock = pair
            .b
            .run(move || {
                let bind: SocketAddr = if dst.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap()
                } else {
                    "[::]:0".parse().unwrap()
                };
                UdpSocket::bind(bind)
            })
            .unwrap()
            .unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for _ in 0..3 {
            seq += 1;
            sock.send_to(&hb(5, seq), (dst, PORT)).unwrap();
            let mut buf = [0u8; 128];
            let (n, from) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("{family}: no ACK for seq {seq}: {e}"));
            assert_eq!(from, SocketAddr::new(dst, PORT), "{family}: ACK source");
            let ack = proto::parse(&buf[..n], Kind::Ack).expect("ACK parses");
            assert!(proto::verify(&KEY, buf[..n].try_into().unwrap()), "ACK tag");
            assert_eq!(
                (ack.seq, ack.interval_ms, ack.sent_ns),
                (seq, 1000, seq * 1000)
            );
        }
        log(format!(
            "{family}: 3 heartbeats accepted, 3 ACKs received and verified"
        ));
    }
    let c = dp.counters().unwrap();
    assert_eq!(c[GateResult::Accepted.index() as usize], 6);
    let s = dp.state(0).unwrap();
    assert_eq!(
        (s.accepted, s.max_seq, s.generation, s.acks_sent),
        (6, 6, 7, 6)
    );

    // Other traffic still flows with the program attached.
    sh(pair
        .b
        .command("ping")
        .args(["-c", "1", "-W", "2", &pair.addrs.v4[0].to_string()]))
    .expect("ping through the gate");
    let server = pair
        .a
        .run(|| UdpSocket::bind((pair.addrs.v4[0], 9000)))
        .unwrap()
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let client = pair
        .b
        .run(|| UdpSocket::bind((pair.addrs.v4[1], 0)))
        .unwrap()
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.send_to(b"ping", (pair.addrs.v4[0], 9000)).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = server.recv_from(&mut buf).expect("UDP on port 9000 passes");
    server.send_to(&buf[..n], from).unwrap();
    let (n, _) = client.recv_from(&mut buf).expect("UDP reply");
    assert_eq!(&buf[..n], b"ping");
    // Foreign traffic is handed to the stack uncounted (gate step 1).
    assert_eq!(dp.counters().unwrap()[GateResult::Pass.index() as usize], 0);

    drop(dp);
    let link = String::from_utf8(pair.a.ip(&["link", "show", IF_A]).unwrap().stdout).unwrap();
    assert!(!link.contains("xdp"), "detached cleanly: {link}");
}

#[test]
fn a_million_nodes_load_and_work() {
    let dp = XdpDataplane::open(&XdpOptions::default()).expect("load at full capacity");
    assert_eq!(dp.capacity(), MAX_NODES);
    dp.set_config(&Config {
        port: PORT,
        ..Config::default()
    })
    .unwrap();
    let n = 1_000_000u32;
    let t = Instant::now();
    for i in 0..n {
        dp.upsert_node(i + 1, &keys(i)).unwrap();
    }
    log(format!("provisioned {n} nodes in {:.2?}", t.elapsed()));
    assert_eq!(gate(&dp, &hb(n, 1)), XDP_DROP, "consumed");
    assert_eq!(dp.state(n - 1).unwrap().accepted, 1, "last node accepted");
    assert_eq!(
        dp.counters().unwrap()[GateResult::Accepted.index() as usize],
        1
    );
    let mem = dp.memlock().unwrap();
    let total: u64 = mem.iter().map(|(_, b)| b).sum();
    for (name, b) in &mem {
        log(format!("memlock {name}: {b} bytes"));
    }
    log(format!(
        "kernel memory: {total} bytes for {} node slots = {:.1} bytes per node (plus a 256 KiB ring buffer)",
        MAX_NODES,
        total as f64 / MAX_NODES as f64
    ));
}

/// Both readers of node state, `read_live` (the tick's scan: live lines,
/// the whole state on demand) and `read_states`, see what the gate
/// counted, slot by slot, and agree with a lookup syscall; empty slots
/// read as zero, and a range is clipped to the capacity. (What reading
/// costs at 1M nodes is for benchmarks: `bench_monitor`'s scan floor.)
#[test]
fn readers_see_what_the_gate_counted() {
    let dp = XdpDataplane::open(&XdpOptions {
        max_nodes: Some(64),
        ..XdpOptions::default()
    })
    .unwrap();
    dp.set_config(&Config {
        port: PORT,
        ..Config::default()
    })
    .unwrap();
    let cap = dp.capacity();
    // Node 100 + i at slot 3i, with i + 1 heartbeats; slots between stay
    // empty.
    let nodes: Vec<(u32, u32, u64)> = (0..5).map(|i| (100 + i, 3 * i, u64::from(i) + 1)).collect();
    for &(id, slot, n) in &nodes {
        dp.upsert_node(id, &keys(slot)).unwrap();
        for seq in 1..=n {
            assert_eq!(gate(&dp, &hb(id, seq)), XDP_DROP, "node {id} seq {seq}");
        }
    }
    // (accepted, max_seq, generation) the gate left at `slot`.
    let want = |slot: u32| match nodes.iter().find(|n| n.1 == slot) {
        Some(&(_, _, n)) => (n, n, 7),
        None => (0, 0, 0),
    };

    let mut live = Vec::new();
    dp.read_live(0..cap, &mut |slot, l, full| {
        let f = full();
        assert_eq!(
            (l.accepted, l.generation),
            (f.accepted, f.generation),
            "slot {slot}: live line and whole state"
        );
        live.push((slot, (l.accepted, f.max_seq, l.generation)));
    });
    let mut states = Vec::new();
    dp.read_states(0..cap, &mut |slot, st| {
        states.push((slot, (st.accepted, st.max_seq, st.generation)));
    });
    let expected: Vec<(u32, (u64, u64, u32))> = (0..cap).map(|slot| (slot, want(slot))).collect();
    assert_eq!(live, expected, "read_live");
    assert_eq!(states, expected, "read_states");
    for &(_, slot, n) in &nodes {
        assert_eq!(dp.live_by_syscall(slot).unwrap().accepted, n, "slot {slot}");
    }
    assert_eq!(
        dp.counters().unwrap()[GateResult::Accepted.index() as usize],
        nodes.iter().map(|n| n.2).sum::<u64>()
    );

    // A part of the range, and one reaching past the capacity.
    let mut seen = Vec::new();
    dp.read_states(2..7, &mut |slot, st| seen.push((slot, st.accepted)));
    assert_eq!(seen, [(2, 0), (3, 2), (4, 0), (5, 0), (6, 3)]);
    let mut seen = Vec::new();
    dp.read_live(cap - 2..cap + 10, &mut |slot, _, _| seen.push(slot));
    assert_eq!(seen, [cap - 2, cap - 1]);
}

/// A pin directory under /sys/fs/bpf, removed on drop.
struct PinDir(std::path::PathBuf);

impl PinDir {
    fn new(tag: &str) -> PinDir {
        PinDir(format!("/sys/fs/bpf/hb-test-gate-{tag}-{}", std::process::id()).into())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn xdp_attached(pair: &VethPair) -> bool {
    let out = pair.a.ip(&["link", "show", IF_A]).unwrap().stdout;
    String::from_utf8_lossy(&out).contains("xdp")
}

#[test]
fn a_restarted_monitor_readopts_pinned_maps_and_link() {
    let pair = VethPair::new("gpin").unwrap();
    let pins = PinDir::new("restart");
    let opts = XdpOptions {
        interfaces: vec![IF_A.into()],
        pin_dir: Some(pins.0.clone()),
        keep_attached: true,
        max_nodes: Some(1024),
        ..XdpOptions::default()
    };
    let open = || pair.a.run(|| XdpDataplane::open(&opts)).unwrap().unwrap();
    let send = |seq: u64| {
        let sock = pair
            .b
            .run(|| UdpSocket::bind((pair.addrs.v4[1], 0)))
            .unwrap()
            .unwrap();
        sock.send_to(&hb(9, seq), (pair.addrs.v4[0], PORT)).unwrap();
    };
    let wait_accepted = |dp: &XdpDataplane, n: u64| {
        let t = Instant::now();
        while dp.state(4).unwrap().accepted < n {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "heartbeat {n} not accepted"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    let dp = open();
    dp.upsert_node(9, &keys(4)).unwrap();
    dp.set_config(&Config {
        port: PORT,
        ..Config::default()
    })
    .unwrap();
    send(1);
    wait_accepted(&dp, 1);
    drop(dp);
    assert!(
        xdp_attached(&pair),
        "kept attached while the monitor is down"
    );
    // The program still gates with nobody watching.
    send(2);

    let mut dp = open();
    assert_eq!(
        dp.provisioned().unwrap(),
        vec![(9, keys(4))],
        "keys re-adopted"
    );
    wait_accepted(&dp, 2);
    send(3);
    wait_accepted(&dp, 3);
    let s = dp.state(4).unwrap();
    assert_eq!(
        (s.max_seq, s.generation),
        (3, 7),
        "state survived the restart"
    );
    log("restart: keys, state and the attached link re-adopted from pins".into());

    dp.detach().unwrap();
    assert!(!xdp_attached(&pair), "detach removes the kept link");
    assert!(
        !pins.0.join(format!("link_{IF_A}")).exists(),
        "link unpinned"
    );
}

/// With `--keep-attached`, an interface deleted and created again while no
/// monitor ran: the kernel released the pinned link with the old
/// interface, and the next start removes the stale pin and attaches afresh
/// (it used to fail at every start with ENOLINK).
#[test]
fn a_link_pinned_on_an_interface_since_recreated_is_replaced() {
    let ns = NetNs::new("grel").unwrap();
    // A veth pair inside one namespace (this kernel has no dummy driver);
    // deleting one end deletes both.
    let dummy = "hbrel0";
    let add = || {
        ns.ip(&[
            "link", "add", dummy, "type", "veth", "peer", "name", "hbrel1",
        ])
        .unwrap();
        ns.ip(&["link", "set", dummy, "up"]).unwrap();
        ns.ip(&["link", "set", "hbrel1", "up"]).unwrap();
    };
    let attached = || {
        let out = ns.ip(&["link", "show", dummy]).unwrap().stdout;
        String::from_utf8_lossy(&out).contains("xdp")
    };
    add();
    let pins = PinDir::new("released");
    let opts = XdpOptions {
        interfaces: vec![dummy.into()],
        pin_dir: Some(pins.0.clone()),
        keep_attached: true,
        max_nodes: Some(64),
        ..XdpOptions::default()
    };
    let open = || ns.run(|| XdpDataplane::open(&opts)).unwrap();
    drop(open().unwrap());
    assert!(attached(), "kept attached");
    let pin = pins.0.join(format!("link_{dummy}"));
    assert!(pin.exists(), "link pinned");

    ns.ip(&["link", "del", dummy]).unwrap();
    add();
    assert!(!attached(), "the new interface has no program");
    let mut dp = open().expect("a start over the released link");
    assert!(attached(), "attached afresh");
    assert!(pin.exists(), "pinned again");
    dp.detach().unwrap();
    assert!(!attached() && !pin.exists(), "detached and unpinned");
    log("a link released with its interface is replaced at the next start".into());
}

#[test]
fn errors_name_the_problem() {
    let e = XdpDataplane::open(&XdpOptions {
        interfaces: vec!["hb-no-such-if0".into()],
        max_nodes: Some(16),
        ..XdpOptions::default()
    })
    .err()
    .expect("unknown interface refused");
    assert!(
        format!("{e:#}").contains("unknown interface hb-no-such-if0"),
        "{e:#}"
    );

    // Another XDP program already on the interface: refused, not replaced.
    let pair = VethPair::new("gbusy").unwrap();
    let first = pair
        .a
        .run(|| {
            XdpDataplane::open(&XdpOptions {
                interfaces: vec![IF_A.into()],
                max_nodes: Some(16),
                ..XdpOptions::default()
            })
        })
        .unwrap()
        .unwrap();
    let e = pair
        .a
        .run(|| {
            XdpDataplane::open(&XdpOptions {
                interfaces: vec![IF_A.into()],
                max_nodes: Some(16),
                ..XdpOptions::default()
            })
        })
        .unwrap()
        .err()
        .expect("second attach refused");
    assert!(
        format!("{e:#}").contains("already has another XDP program"),
        "{e:#}"
    );
    drop(first);
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Userspace reads under the seqcount while the kernel writes: every copy
/// must be consistent. With in-order sequence numbers from 1, each
/// accepted datagram keeps `accepted + lost == max_seq`; a torn copy (some
/// fields from before a write, some from after) breaks it.
#[test]
fn reads_are_never_torn_while_the_kernel_writes() {
    let pair = VethPair::new("gtorn").unwrap();
    let dp = pair
        .a
        .run(|| {
            XdpDataplane::open(&XdpOptions {
                interfaces: vec![IF_A.into()],
                max_nodes: Some(16),
                ..XdpOptions::default()
            })
        })
        .unwrap()
        .unwrap();
    dp.upsert_node(3, &keys(1)).unwrap();
    dp.set_config(&Config {
        port: PORT,
        ..Config::default()
    })
    .unwrap();
    let total = 20_000u64;
    let done = AtomicBool::new(false);
    let (reads, max) = std::thread::scope(|s| {
        // Set however the body below ends, a panic included: the scope
        // waits for the reader, which stops only when `done` is set (or at
        // its deadline, should even that fail).
        let _stop = SetOnDrop(&done);
        let reader = s.spawn(|| {
            let (mut reads, mut max) = (0u64, 0u64);
            let deadline = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::Relaxed) {
                assert!(Instant::now() < deadline, "reader never told to stop");
                dp.read_states(1..2, &mut |_, st| {
                    assert_eq!(st.accepted + st.lost, st.max_seq, "torn read: {st:?}");
                    max = max.max(st.max_seq);
                });
                reads += 1;
            }
            (reads, max)
        });
        let sock = pair
            .b
            .run(|| UdpSocket::bind((pair.addrs.v4[1], 0)))
            .unwrap()
            .unwrap();
        let t = Instant::now();
        for seq in 1..=total {
            sock.send_to(&hb(3, seq), (pair.addrs.v4[0], PORT)).unwrap();
            assert!(t.elapsed() < Duration::from_secs(30), "send loop bounded");
        }
        std::thread::sleep(Duration::from_millis(100));
        done.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    });
    let s = dp.state(1).unwrap();
    log(format!(
        "{reads} consistent reads while {} of {total} heartbeats were accepted",
        s.accepted
    ));
    assert!(s.accepted > total / 2, "most heartbeats arrive on veth");
    assert!(max > 0 && reads > 100);
}

/// Node maps pinned by an hb before the node index (`HB_NODE_KEYS`,
/// `HB_NODE_STATE`) are removed, not left to hold kernel memory, and the
/// dataplane opens with fresh node maps.
#[test]
fn node_maps_of_an_earlier_layout_are_retired() {
    let pins = PinDir::new("old");
    std::fs::create_dir_all(&pins.0).unwrap();
    // Any BPF map will do as the stand-in: pin one of a loaded object's
    // under the old names.
    {
        let dp = XdpDataplane::open(&XdpOptions {
            max_nodes: Some(16),
            ..XdpOptions::default()
        })
        .unwrap();
        let mut ebpf = dp.ebpf();
        let map = ebpf.map_mut(names::LIMITS).unwrap();
        let aya::maps::Map::PerCpuArray(data) = map else {
            panic!("{} is a per-CPU array", names::LIMITS);
        };
        for old in ["HB_NODE_KEYS", "HB_NODE_STATE"] {
            data.pin(pins.0.join(old)).unwrap();
        }
    }
    let dp = XdpDataplane::open(&XdpOptions {
        pin_dir: Some(pins.0.clone()),
        max_nodes: Some(16),
        ..XdpOptions::default()
    })
    .unwrap();
    for old in ["HB_NODE_KEYS", "HB_NODE_STATE"] {
        assert!(!pins.0.join(old).exists(), "{old} retired");
    }
    for new in [names::NODE_INDEX, names::NODE_LIVE, names::NODE_REST] {
        assert!(pins.0.join(new).exists(), "{new} pinned");
    }
    dp.upsert_node(3, &keys(1)).unwrap();
    assert_eq!(dp.provisioned().unwrap(), vec![(3, keys(1))]);
}

//! The XDP gate on a real veth pair in two namespaces: `hb_xdp` in native
//! mode on `veth-a` (namespace `a`, the monitor), `hb_pass` on `veth-b`
//! (namespace `b`, the node) so XDP_TX'd ACKs arrive. Heartbeats go out
//! of real UDP sockets in `b`. Plus the 1M-node capacity check and the
//! measurement behind the node-state read design. Needs root.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
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
use hb_tests::netns::{IF_A, IF_B, VethPair, sh};

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
    let frame = hb_tests::frames::Udp::v4(PORT, &hb(n, 1)).build();
    {
        let mut ebpf = dp.ebpf();
        let p: &mut Xdp = ebpf
            .program_mut(names::PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; 256];
        let r = aya::programs::TestRun::test_run(
            &*p,
            aya::programs::TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(r.return_value, 1, "consumed (XDP_DROP)");
    }
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

/// The measurement behind `hb::dataplane::xdp::READ_DESIGN`.
#[test]
fn read_design() {
    let dp = XdpDataplane::open(&XdpOptions::default()).unwrap();
    let n = 1_000_000u32;
    // What the tick reads: every node's live line, under its seqcount.
    let t = Instant::now();
    let mut acc = 0u64;
    dp.read_live(0..n, &mut |_, s, _| acc += s.accepted);
    let mmap = t.elapsed();
    // A tenth of the nodes by syscall, scaled to 1M (keeps the test fast).
    let t = Instant::now();
    for slot in 0..n / 10 {
        acc += dp.live_by_syscall(slot).unwrap().accepted;
    }
    let syscall = t.elapsed() * 10;
    assert_eq!(acc, 0);
    log(format!(
        "read 1M node states: mmap+seqcount {mmap:.2?}, one lookup syscall per node {syscall:.2?} (scaled from 100k; {:.1}x)",
        syscall.as_secs_f64() / mmap.as_secs_f64()
    ));
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
    let done = std::sync::atomic::AtomicBool::new(false);
    let (reads, max) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut reads, mut max) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
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
        done.store(true, std::sync::atomic::Ordering::Relaxed);
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

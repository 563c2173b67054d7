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
    xdp::{AttachMode, XdpDataplane, XdpOptions, release_kept_links},
};
use hb_common::{
    Datagram, GateResult, Kind, NodeKey,
    maps::{self, Config, MAX_NODES, NodeKeys, counter, names},
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
    // Every map of the object but the ring buffer (the benchmarks' kernel
    // memory per node says so).
    let mut listed: Vec<&str> = mem.iter().map(|(name, _)| *name).collect();
    listed.sort_unstable();
    let mut all = [
        names::NODE_INDEX,
        names::NODE_LIVE,
        names::NODE_REST,
        names::COUNTERS,
        names::CONFIG,
        names::LIMITS,
        names::LOCAL_ADDRS,
    ];
    all.sort_unstable();
    assert_eq!(listed, all);
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
    // The monitor's record of the node (dead since 123456789 ns), which
    // the next monitor goes on from.
    dp.set_monitor_status(4, 3, 123_456_789);
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
    assert_eq!(
        (s.monitor_status, s.monitor_status_since_ns),
        (3, 123_456_789),
        "the monitor's record survived the restart, untouched by the gate"
    );
    log("restart: keys, state and the attached link re-adopted from pins".into());

    dp.detach().unwrap();
    assert!(!xdp_attached(&pair), "detach removes the kept link");
    assert!(
        !pins.0.join(format!("link_{IF_A}")).exists(),
        "link unpinned"
    );
}

/// A link kept attached (`--keep-attached`) keeps the mode it was
/// attached in. A start with `--mode skb` over a native one detaches it
/// and attaches anew in skb mode, kept again, and the gate goes on with
/// the pinned state (it re-adopted the link natively, saying nothing). A
/// start with `--mode native` over an skb one keeps it (most often the
/// fallback of a driver without native XDP, which a new attach would only
/// take again, leaving the gate at every restart) and says so.
#[test]
fn a_kept_link_changes_mode_when_asked() {
    let pair = VethPair::new("gmode").unwrap();
    let pins = PinDir::new("mode");
    let mode_of = || {
        let out = pair.a.ip(&["-j", "link", "show", IF_A]).unwrap().stdout;
        let links: serde_json::Value = serde_json::from_slice(&out).expect("ip -j JSON");
        // XDP_ATTACHED_DRV = 1, XDP_ATTACHED_SKB = 2.
        links[0]["xdp"]["mode"].as_u64()
    };
    let if_a = IF_A.to_string();
    let open = |mode: AttachMode| {
        let opts = XdpOptions {
            mode,
            ..kept(&[&if_a], &pins)
        };
        pair.a.run(|| XdpDataplane::open(&opts)).unwrap().unwrap()
    };
    let sock = pair
        .b
        .run(|| UdpSocket::bind((pair.addrs.v4[1], 0)))
        .unwrap()
        .unwrap();
    let beat = |dp: &XdpDataplane, seq: u64| {
        sock.send_to(&hb(9, seq), (pair.addrs.v4[0], PORT)).unwrap();
        let t = Instant::now();
        while dp.state(4).unwrap().accepted < seq {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "heartbeat {seq} not accepted"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };

    let dp = open(AttachMode::Native);
    dp.upsert_node(9, &keys(4)).unwrap();
    dp.set_config(&Config {
        port: PORT,
        ..Config::default()
    })
    .unwrap();
    beat(&dp, 1);
    drop(dp);
    assert_eq!(mode_of(), Some(1), "kept in native mode");
    for (seq, mode, code) in [
        (2, AttachMode::Native, 1),
        (3, AttachMode::Skb, 2),
        (4, AttachMode::Skb, 2),
        (5, AttachMode::Native, 2),
    ] {
        let dp = open(mode);
        assert_eq!(mode_of(), Some(code), "{mode:?}");
        beat(&dp, seq);
        drop(dp);
        assert_eq!(mode_of(), Some(code), "{mode:?}: kept");
        assert!(pins.0.join(format!("link_{IF_A}")).exists(), "pinned");
    }
    let mut dp = open(AttachMode::Native);
    assert_eq!(dp.state(4).unwrap().accepted, 5, "the state went on");
    dp.detach().unwrap();
    assert_eq!(mode_of(), None, "detached");
    log("keep-attached: a kept native link follows --mode skb; a kept skb one stays".into());
}

/// With `--keep-attached`, the interface renamed while no monitor ran and
/// another one created under its name: the next start attaches to the new
/// one, and takes the kept link off the renamed one (no longer listed).
/// It re-adopted the link there, and took the new one for gated.
#[test]
fn a_kept_link_on_a_renamed_interface_is_not_readopted() {
    const RENAMED: &str = "hbkeptren0";
    const NEW_PEER: &str = "hbkeptpeer0";
    let pair = VethPair::new("gkren").unwrap();
    let pins = PinDir::new("renamed");
    let opts = kept(&[&IF_A.to_string()], &pins);
    let open = || pair.a.run(|| XdpDataplane::open(&opts)).unwrap().unwrap();
    let dp = open();
    dp.upsert_node(9, &keys(4)).unwrap();
    drop(dp);
    assert!(has_xdp(&pair.a, IF_A), "kept attached");
    for args in [
        &["link", "set", IF_A, "down"][..],
        &["link", "set", IF_A, "name", RENAMED],
        &["link", "set", RENAMED, "up"],
        &[
            "link", "add", IF_A, "type", "veth", "peer", "name", NEW_PEER,
        ],
        &["link", "set", IF_A, "up"],
        &["link", "set", NEW_PEER, "up"],
    ] {
        pair.a.ip(args).unwrap();
    }
    assert!(has_xdp(&pair.a, RENAMED) && !has_xdp(&pair.a, IF_A));
    let mut dp = open();
    assert!(
        has_xdp(&pair.a, IF_A),
        "the interface of that name is gated"
    );
    assert!(!has_xdp(&pair.a, RENAMED), "the renamed one is not");
    assert!(pins.0.join(format!("link_{IF_A}")).exists(), "kept again");
    dp.detach().unwrap();
    assert!(!has_xdp(&pair.a, IF_A));
    log("keep-attached: a kept link left on a renamed interface is detached".into());
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
    let dp = open().unwrap();
    // A gate with a node to gate: one without is not kept.
    dp.upsert_node(3, &keys(1)).unwrap();
    drop(dp);
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

/// Pinned maps without node state that are not of this hb's shape
/// (another version's) are created afresh, not adopted: a rate limit of
/// fewer buckets adopted as it was suppressed every report of the
/// missing one. Node state is kept.
#[test]
fn stateless_pins_of_another_shape_are_created_afresh() {
    let first = PinDir::new("shape-a");
    let pins = PinDir::new("shape-b");
    let opts = |dir: &PinDir| XdpOptions {
        pin_dir: Some(dir.0.clone()),
        max_nodes: Some(64),
        ..XdpOptions::default()
    };
    // Maps of the wrong shape under the right names, in `pins`: the
    // configuration array as the rate limit, the rate limit as the
    // counters (bpffs renames pins).
    drop(XdpDataplane::open(&opts(&first)).unwrap());
    let dp = XdpDataplane::open(&opts(&pins)).unwrap();
    dp.upsert_node(7, &keys(1)).unwrap();
    drop(dp);
    let id = |name: &str| {
        aya::maps::MapInfo::from_pin(pins.0.join(name))
            .unwrap()
            .id()
    };
    // Left in place: of this hb's shape.
    let config = id(names::CONFIG);
    for (from, to) in [
        (names::CONFIG, names::LIMITS),
        (names::LIMITS, names::COUNTERS),
    ] {
        std::fs::rename(first.0.join(from), pins.0.join(to)).unwrap();
    }
    let dp = XdpDataplane::open(&opts(&pins)).expect("a start over maps of another shape");
    let shape = |name: &str| {
        let info = aya::maps::MapInfo::from_pin(pins.0.join(name)).unwrap();
        (info.value_size(), info.max_entries())
    };
    assert_eq!(
        shape(names::LIMITS),
        (
            size_of::<hb_common::maps::RateLimit>() as u32,
            maps::LIMITS_LEN
        )
    );
    assert_eq!(shape(names::COUNTERS), (8, counter::LEN));
    assert!(dp.counters().is_ok());
    assert_eq!(
        id(names::CONFIG),
        config,
        "a map of the right shape adopted"
    );
    assert_eq!(dp.state(1).unwrap().node_id, 7, "node state adopted");
}

/// Creates a map through the bpf syscall (`BPF_MAP_CREATE`) and pins it
/// at `pin`, as another hb version or a hand might have.
fn pin_a_map(pin: &std::path::Path, map_type: u32, key: u32, value: u32, entries: u32, flags: u32) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // union bpf_attr: map_type, key_size, value_size, max_entries,
    // map_flags; the rest zero.
    let mut attr = [0u8; 64];
    for (i, v) in [map_type, key, value, entries, flags]
        .into_iter()
        .enumerate()
    {
        attr[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: BPF_MAP_CREATE (0) with its attr, no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just gave us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(pin.to_str().unwrap()).unwrap();
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: BPF_OBJ_PIN (6) with a path that outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_ptr(), attr.len()) };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

/// Pinned node maps that are not what this hb creates (another type, key
/// size or flags: another version's, or made by hand) refuse the start,
/// naming the map, what differs and what to do, and are left as they
/// are: they hold node state. Only the value size was checked: a state
/// array without BPF_F_MMAPABLE was adopted and its mapping failed, with
/// no word of the pin; a hash map was adopted as an array.
#[test]
fn node_pins_of_another_shape_are_refused() {
    const ARRAY: u32 = 2;
    const HASH: u32 = 1;
    const MMAPABLE: u32 = 1 << 10;
    let live = size_of::<maps::NodeLive>() as u32;
    let rest = size_of::<maps::NodeRest>() as u32;
    for (tag, name, map_type, key, value, flags, differs) in [
        (
            "shape-flags",
            names::NODE_LIVE,
            ARRAY,
            4,
            live,
            0,
            &["flags 0x0, expected 0x400 (BPF_F_MMAPABLE)"][..],
        ),
        (
            "shape-type",
            names::NODE_REST,
            HASH,
            8,
            rest,
            0,
            &["type Hash, expected Array", "keys of 8 bytes, expected 4"][..],
        ),
        (
            "shape-value",
            names::NODE_LIVE,
            ARRAY,
            4,
            2 * live,
            MMAPABLE,
            &["values of 128 bytes, expected 64"][..],
        ),
    ] {
        let pins = PinDir::new(tag);
        let opts = XdpOptions {
            pin_dir: Some(pins.0.clone()),
            max_nodes: Some(64),
            ..XdpOptions::default()
        };
        let dp = XdpDataplane::open(&opts).unwrap();
        dp.upsert_node(7, &keys(1)).unwrap();
        drop(dp);
        let pin = pins.0.join(name);
        std::fs::remove_file(&pin).unwrap();
        pin_a_map(&pin, map_type, key, value, 64, flags);
        let ids = || {
            [names::NODE_INDEX, names::NODE_LIVE, names::NODE_REST]
                .map(|n| aya::maps::MapInfo::from_pin(pins.0.join(n)).unwrap().id())
        };
        let before = ids();
        let e = XdpDataplane::open(&opts)
            .err()
            .unwrap_or_else(|| panic!("{tag}: a start over {name} of another shape"));
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!("pinned map {name} is not what this hb creates")),
            "{tag}: {e}"
        );
        for d in differs {
            assert!(e.contains(d), "{tag}: {d} not in {e}");
        }
        assert!(
            e.contains(&format!("remove {} (losing node state)", pins.0.display())),
            "{tag}: {e}"
        );
        assert_eq!(ids(), before, "{tag}: the node maps left as they were");
    }
}

#[test]
fn errors_name_the_problem() {
    // Refused before its pin directory is made (one was left behind).
    let pins = PinDir::new("typo");
    let e = XdpDataplane::open(&XdpOptions {
        interfaces: vec!["hb-no-such-if0".into()],
        max_nodes: Some(16),
        pin_dir: Some(pins.0.clone()),
        ..XdpOptions::default()
    })
    .err()
    .expect("unknown interface refused");
    assert!(
        format!("{e:#}").contains("unknown interface hb-no-such-if0"),
        "{e:#}"
    );
    assert!(!pins.0.exists(), "{} left behind", pins.0.display());

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
    // Its maps are not left pinned for the next start to adopt (with
    // their capacity): in a directory it made, nor in one that was there,
    // whose entries stay.
    for made in [true, false] {
        let pins = PinDir::new(if made { "busy-made" } else { "busy-there" });
        if !made {
            std::fs::create_dir_all(pins.0.join("other")).unwrap();
        }
        let dir = pins.0.clone();
        let e = pair
            .a
            .run(move || {
                XdpDataplane::open(&XdpOptions {
                    interfaces: vec![IF_A.into()],
                    max_nodes: Some(16),
                    pin_dir: Some(dir),
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
        if made {
            assert!(!pins.0.exists(), "{} left behind", pins.0.display());
        } else {
            let left: Vec<_> = std::fs::read_dir(&pins.0)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, ["other"], "pins left behind");
        }
    }
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

/// A namespace with a veth pair inside it, `{tag}0` and `{tag}1`, both
/// up: names of its own, as pins name interfaces by name only.
fn ns_with_veth(tag: &str) -> (NetNs, [String; 2]) {
    let ns = NetNs::new(tag).unwrap();
    let names = [format!("{tag}0"), format!("{tag}1")];
    ns.ip(&[
        "link", "add", &names[0], "type", "veth", "peer", "name", &names[1],
    ])
    .unwrap();
    for i in &names {
        ns.ip(&["link", "set", i, "up"]).unwrap();
    }
    (ns, names)
}

fn has_xdp(ns: &NetNs, ifname: &str) -> bool {
    let out = ns.ip(&["link", "show", ifname]).unwrap().stdout;
    String::from_utf8_lossy(&out).contains("xdp")
}

/// Options that keep the gate attached on `interfaces`, pinned in `pins`.
fn kept(interfaces: &[&String], pins: &PinDir) -> XdpOptions {
    XdpOptions {
        interfaces: interfaces.iter().map(|i| i.to_string()).collect(),
        pin_dir: Some(pins.0.clone()),
        keep_attached: true,
        max_nodes: Some(64),
        ..XdpOptions::default()
    }
}

/// Maps pinned by an older hb (an index beside `HB_NODE_STATE`, its
/// single-array node state): the index must go with that array. Adopted
/// alone, its entries led to slots of fresh arrays, and moving a node the
/// index put elsewhere cleared whatever node the monitor had since put
/// at the old slot: node A, provisioned at B's old slot 1 after B took
/// A's old slot 0, wiped B.
#[test]
fn an_index_pinned_with_an_earlier_layout_wipes_no_node() {
    let pins = PinDir::new("oldindex");
    let opts = XdpOptions {
        pin_dir: Some(pins.0.clone()),
        max_nodes: Some(16),
        ..XdpOptions::default()
    };
    let (a, b) = (101, 202);
    {
        let dp = XdpDataplane::open(&opts).unwrap();
        dp.upsert_node(a, &keys(0)).unwrap();
        dp.upsert_node(b, &keys(1)).unwrap();
        // Stand-in for the old layout's array: any BPF map.
        let mut ebpf = dp.ebpf();
        let aya::maps::Map::PerCpuArray(data) = ebpf.map_mut(names::LIMITS).unwrap() else {
            panic!("{} is a per-CPU array", names::LIMITS);
        };
        data.pin(pins.0.join("HB_NODE_STATE")).unwrap();
    }
    for new in [names::NODE_LIVE, names::NODE_REST] {
        std::fs::remove_file(pins.0.join(new)).unwrap();
    }
    let dp = XdpDataplane::open(&opts).unwrap();
    assert!(!pins.0.join("HB_NODE_STATE").exists(), "old array retired");
    assert_eq!(dp.provisioned().unwrap(), vec![], "everything afresh");
    dp.upsert_node(b, &keys(0)).unwrap();
    dp.upsert_node(a, &keys(1)).unwrap();
    assert_eq!(dp.state(0).unwrap().node_id, b, "B at slot 0");
    assert_eq!(dp.state(1).unwrap().node_id, a, "A at slot 1");
    let mut p = dp.provisioned().unwrap();
    p.sort_by_key(|n| n.0);
    assert_eq!(p, vec![(a, keys(1)), (b, keys(0))]);
}

/// Five nodes (ids 10-14, node 12 in slot 6 having sent heartbeat 1)
/// pinned in `pins` for a capacity of 64, and the options that open them.
fn pin_five_nodes(pins: &PinDir) -> (XdpOptions, Vec<(u32, NodeKeys)>) {
    let opts = XdpOptions {
        pin_dir: Some(pins.0.clone()),
        max_nodes: Some(64),
        ..XdpOptions::default()
    };
    let nodes: Vec<(u32, NodeKeys)> = (0..5).map(|i| (10 + i, keys(3 * i))).collect();
    let dp = XdpDataplane::open(&opts).unwrap();
    dp.set_config(&Config {
        port: PORT,
        ..Config::default()
    })
    .unwrap();
    for (id, k) in &nodes {
        dp.upsert_node(*id, k).unwrap();
    }
    assert_eq!(gate(&dp, &hb(12, 1)), XDP_DROP);
    (opts, nodes)
}

/// Replaces the node index pinned in `pins` with one pinned for 4 nodes
/// (in a pin directory of its own, named after `tag`).
fn pin_a_small_index(pins: &PinDir, tag: &str) {
    let small = PinDir::new(&format!("{tag}-small"));
    drop(
        XdpDataplane::open(&XdpOptions {
            pin_dir: Some(small.0.clone()),
            max_nodes: Some(4),
            ..XdpOptions::default()
        })
        .unwrap(),
    );
    let index = pins.0.join(names::NODE_INDEX);
    std::fs::remove_file(&index).unwrap();
    std::fs::rename(small.0.join(names::NODE_INDEX), &index).unwrap();
}

/// The nodes `dp` has provisioned, by id.
fn sorted_provisioned(dp: &XdpDataplane) -> Vec<(u32, NodeKeys)> {
    let mut p = dp.provisioned().unwrap();
    p.sort_by_key(|n| n.0);
    p
}

/// The pinned node state keeps its nodes when its index is gone or too
/// small for it (pins removed or mixed by hand): the index is rebuilt from
/// the state, sized for its capacity. Both used to lose every node (an
/// empty index adopted or created), and a too small one to refuse nodes
/// long before the capacity.
#[test]
fn an_index_missing_or_too_small_is_rebuilt_from_the_node_state() {
    let pins = PinDir::new("rebuild");
    let (opts, nodes) = pin_five_nodes(&pins);
    let index = pins.0.join(names::NODE_INDEX);

    // Gone.
    std::fs::remove_file(&index).unwrap();
    {
        let dp = XdpDataplane::open(&opts).unwrap();
        assert_eq!(sorted_provisioned(&dp), nodes, "every node adopted");
        assert_eq!(dp.state(6).unwrap().accepted, 1, "with its state");
        assert_eq!(gate(&dp, &hb(12, 2)), XDP_DROP, "and gated");
    }

    // Too small: an index pinned for 4 nodes, beside state for 64.
    pin_a_small_index(&pins, "rebuild");
    let dp = XdpDataplane::open(&opts).unwrap();
    assert_eq!(sorted_provisioned(&dp), nodes, "every node adopted");
    assert_eq!(dp.state(6).unwrap().accepted, 2);
    assert!(dp.index_buckets() >= 16, "room for 64 nodes");
    for i in 0..64 {
        dp.upsert_node(100 + i, &keys(i)).unwrap();
    }
}

/// Every bucket of the node index pinned in `pins` from `first` on
/// zeroed: from 0, the map as the loader pins it when it creates it; from
/// 1, the index as `NodeIndex::new` leaves it (header and seed, no
/// entry). A start killed while it rebuilt the index left either pinned.
fn empty_pinned_index(pins: &PinDir, first: u32) {
    let map = aya::maps::MapData::from_pin(pins.0.join(names::NODE_INDEX)).unwrap();
    let mut arr: aya::maps::Array<_, [u64; 8]> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map)).unwrap();
    for i in first..arr.len() {
        arr.set(i, [0; 8], 0).unwrap();
    }
}

/// A pinned node index that lacks the nodes the pinned node state holds
/// (left empty, all-zero or with only its header, by a start killed
/// after the loader pinned it and before the index was rebuilt) is
/// completed from the state. It fits the state arrays, so it used to be
/// adopted as it was: no node provisioned, every node installed afresh by
/// the monitor, its anti-replay window and counters lost.
#[test]
fn an_index_left_empty_by_a_killed_rebuild_is_completed_from_the_node_state() {
    let pins = PinDir::new("emptyindex");
    let (opts, nodes) = pin_five_nodes(&pins);
    // The last heartbeat the gate took from node 12.
    let mut last = 1;
    for (first, what) in [(0, "all-zero"), (1, "header only")] {
        empty_pinned_index(&pins, first);
        let dp = XdpDataplane::open(&opts).unwrap();
        assert_eq!(sorted_provisioned(&dp), nodes, "{what}: every node adopted");
        let before = dp.state(6).unwrap();
        assert_eq!(
            (before.node_id, before.max_seq),
            (12, last),
            "{what}: with its state"
        );
        // The anti-replay window survived: heartbeat 1 again is refused,
        // a new one taken.
        gate(&dp, &hb(12, 1));
        let s = dp.state(6).unwrap();
        assert_eq!(
            (s.accepted, s.replay),
            (before.accepted, before.replay + 1),
            "{what}: a replayed heartbeat refused"
        );
        last += 1;
        assert_eq!(gate(&dp, &hb(12, last)), XDP_DROP);
        assert_eq!(dp.state(6).unwrap().accepted, before.accepted + 1);
        // Rebuilt once, the next start finds the index whole.
        drop(dp);
        let dp = XdpDataplane::open(&opts).unwrap();
        assert_eq!(dp.provisioned().unwrap().len(), nodes.len(), "{what}");
    }
}

/// A start that rebuilt an index too small for the node state and then
/// failed (dropped before it started) removes the index it pinned, as it
/// removes every pin it made: the old index, removed by the start, was
/// listed as there before, and the new one under its name stayed.
#[test]
fn a_failed_start_removes_the_index_it_rebuilt() {
    let pins = PinDir::new("undoindex");
    let opts = XdpOptions {
        pin_dir: Some(pins.0.clone()),
        max_nodes: Some(64),
        undo_until_started: true,
        ..XdpOptions::default()
    };
    {
        let dp = XdpDataplane::open(&opts).unwrap();
        dp.upsert_node(10, &keys(3)).unwrap();
        dp.started();
    }
    pin_a_small_index(&pins, "undoindex");
    let index = pins.0.join(names::NODE_INDEX);
    let dp = XdpDataplane::open(&opts).unwrap();
    assert_eq!(dp.provisioned().unwrap(), vec![(10, keys(3))]);
    drop(dp);
    assert!(!index.exists(), "the index the failed start pinned is gone");
    assert!(
        pins.0.join(names::NODE_REST).exists(),
        "the node state stays"
    );
    let dp = XdpDataplane::open(&opts).unwrap();
    assert_eq!(dp.provisioned().unwrap(), vec![(10, keys(3))], "rebuilt");
    dp.started();
}

/// A start detaches the links an earlier `--keep-attached` run kept on
/// interfaces it is no longer given: they used to stay attached for good
/// (no later exit detaches what it did not attach). An interface given
/// twice is refused.
#[test]
fn links_kept_on_interfaces_no_longer_given_are_detached() {
    let (ns, [i0, i1]) = ns_with_veth("hbunl");
    let pins = PinDir::new("unlisted");
    let open = |ifs: &[&String]| ns.run(|| XdpDataplane::open(&kept(ifs, &pins))).unwrap();
    let pin = |i: &str| pins.0.join(format!("link_{i}"));
    let dp = open(&[&i0, &i1]).unwrap();
    dp.upsert_node(3, &keys(1)).unwrap();
    drop(dp);
    assert!(has_xdp(&ns, &i0) && has_xdp(&ns, &i1), "both kept");

    let mut dp = open(&[&i0]).unwrap();
    assert!(!has_xdp(&ns, &i1), "{i1} detached");
    assert!(!pin(&i1).exists(), "and unpinned");
    assert!(has_xdp(&ns, &i0) && pin(&i0).exists(), "{i0} re-adopted");
    dp.detach().unwrap();
    drop(dp);
    assert!(!has_xdp(&ns, &i0));

    // One kept on an interface deleted since (the kernel released its
    // link): its pin goes too, and the start goes on.
    let gone = "hbunlx0".to_string();
    ns.ip(&[
        "link", "add", &gone, "type", "veth", "peer", "name", "hbunlx1",
    ])
    .unwrap();
    ns.ip(&["link", "set", &gone, "up"]).unwrap();
    let dp = open(&[&gone]).unwrap();
    dp.upsert_node(3, &keys(1)).unwrap();
    drop(dp);
    assert!(has_xdp(&ns, &gone) && pin(&gone).exists());
    ns.ip(&["link", "del", &gone]).unwrap();
    let mut dp = open(&[&i0]).expect("a start over a released link's pin");
    assert!(!pin(&gone).exists(), "its pin removed");
    dp.detach().unwrap();
    drop(dp);

    let e = open(&[&i0, &i1, &i0]).err().expect("refused");
    assert!(
        format!("{e:#}").contains(&format!("interface {i0} is given twice")),
        "{e:#}"
    );
    assert!(!has_xdp(&ns, &i0) && !has_xdp(&ns, &i1));
}

/// An hb gate kept attached with another pin directory: the kernel
/// refuses `ip link set dev IF xdp off` for a program attached through a
/// bpf_link (what the error used to advise), so the error names the pin
/// whose removal detaches it, and that works.
#[test]
fn a_gate_kept_with_another_pin_dir_is_named_and_its_pin_detaches_it() {
    let (ns, [i0, _]) = ns_with_veth("hbother");
    let (first, second) = (PinDir::new("first"), PinDir::new("second"));
    let dp = ns
        .run(|| XdpDataplane::open(&kept(&[&i0], &first)))
        .unwrap()
        .unwrap();
    dp.upsert_node(3, &keys(1)).unwrap();
    drop(dp);
    assert!(has_xdp(&ns, &i0));

    for off in ["xdp", "xdpdrv", "xdpgeneric"] {
        let out = ns
            .command("ip")
            .args(["link", "set", "dev", &i0, off, "off"])
            .output()
            .unwrap();
        log(format!(
            "`ip link set dev {i0} {off} off`: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        assert!(has_xdp(&ns, &i0), "`{off} off` left the link's program");
    }

    let open_second = || {
        ns.run(|| XdpDataplane::open(&kept(&[&i0], &second)))
            .unwrap()
    };
    let e = format!("{:#}", open_second().err().expect("refused"));
    let pin = first.0.join(format!("link_{i0}"));
    assert!(
        e.contains("already has another XDP program attached"),
        "{e}"
    );
    assert!(e.contains(&format!("here `rm {}`", pin.display())), "{e}");
    log(format!("busy: {e}"));

    std::fs::remove_file(&pin).unwrap();
    let t = Instant::now();
    while has_xdp(&ns, &i0) {
        assert!(t.elapsed() < Duration::from_secs(5), "still attached");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut dp = open_second().expect("attached once the pin is gone");
    dp.detach().unwrap();
}

/// `--keep-attached` keeps a gate only if it has nodes: a start that
/// failed before it provisioned any (the listen address in use, say) used
/// to leave a pinned gate refusing every heartbeat to the port, with no
/// monitor.
#[test]
fn a_kept_gate_without_nodes_is_detached() {
    let (ns, [i0, _]) = ns_with_veth("hbempty");
    let pins = PinDir::new("empty");
    let open = || {
        ns.run(|| XdpDataplane::open(&kept(&[&i0], &pins)))
            .unwrap()
            .unwrap()
    };
    drop(open());
    assert!(!has_xdp(&ns, &i0), "detached");
    assert!(!pins.0.join(format!("link_{i0}")).exists(), "unpinned");

    let dp = open();
    dp.upsert_node(3, &keys(1)).unwrap();
    drop(dp);
    assert!(has_xdp(&ns, &i0), "a gate with nodes is kept");
    let mut dp = open();
    dp.detach().unwrap();
    assert!(!has_xdp(&ns, &i0));
}

/// The id of the XDP program on `ifname`, if any.
fn xdp_prog_id(ns: &NetNs, ifname: &str) -> Option<u32> {
    let out = ns.ip(&["-d", "link", "show", ifname]).unwrap().stdout;
    let out = String::from_utf8_lossy(&out);
    let at = out.find("prog/xdp id ")? + "prog/xdp id ".len();
    out[at..].split_whitespace().next()?.parse().ok()
}

/// A start whose attach fails on a later `--iface` (another XDP program
/// there) puts the program an earlier run kept back into the links it had
/// re-adopted: they kept the failed start's program, a monitor that never
/// ran (after a failed upgrade, the new gate on some interfaces and the
/// old on others).
#[test]
fn a_failed_attach_puts_the_kept_links_program_back() {
    failed_attach_leaves_the_kept_link(false);
}

/// As the README's unit runs it: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON,
/// CAP_SYS_RESOURCE, no CAP_SYS_ADMIN, without which the kept link's
/// program cannot be reopened (by id) to be put back. The kept link is
/// taken over only after the interface that refuses: it never runs the
/// failed start's program.
#[test]
fn a_failed_attach_leaves_the_kept_link_without_cap_sys_admin() {
    failed_attach_leaves_the_kept_link(true);
}

/// Drops CAP_SYS_ADMIN from this thread's effective capabilities (the
/// permitted set keeps it; the thread is `NetNs::run`'s, and ends).
fn drop_cap_sys_admin() {
    const CAP_SYS_ADMIN: u32 = 21;
    const VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
    d[(CAP_SYS_ADMIN / 32) as usize].effective &= !(1 << (CAP_SYS_ADMIN % 32));
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
}

fn failed_attach_leaves_the_kept_link(no_sys_admin: bool) {
    let tag = if no_sys_admin { "hbbackc" } else { "hbback" };
    let (ns, [i0, i1]) = ns_with_veth(tag);
    let pins = PinDir::new(tag);
    let dp = ns
        .run(|| XdpDataplane::open(&kept(&[&i0], &pins)))
        .unwrap()
        .unwrap();
    dp.upsert_node(3, &keys(1)).unwrap();
    drop(dp);
    let kept_prog = xdp_prog_id(&ns, &i0).expect("kept attached");
    let other = ns
        .run(|| {
            XdpDataplane::open(&XdpOptions {
                interfaces: vec![i1.clone()],
                max_nodes: Some(16),
                ..XdpOptions::default()
            })
        })
        .unwrap()
        .unwrap();
    // The kept interface listed first, as a start after a failed upgrade
    // might list it.
    let e = ns
        .run(|| {
            if no_sys_admin {
                drop_cap_sys_admin();
            }
            XdpDataplane::open(&kept(&[&i0, &i1], &pins))
        })
        .unwrap()
        .err()
        .expect("refused: another XDP program on the second interface");
    assert!(
        format!("{e:#}").contains("already has another XDP program"),
        "{e:#}"
    );
    assert_eq!(
        xdp_prog_id(&ns, &i0),
        Some(kept_prog),
        "the kept link runs the earlier run's program again"
    );
    assert!(pins.0.join(format!("link_{i0}")).exists(), "still kept");
    drop(other);
    let mut dp = ns
        .run(|| XdpDataplane::open(&kept(&[&i0], &pins)))
        .unwrap()
        .unwrap();
    dp.detach().unwrap();
    assert!(!has_xdp(&ns, &i0));
}

/// Detaches the XDP link pinned at `pin` as `bpftool link detach` does
/// (`BPF_LINK_DETACH`), leaving the pin and every descriptor of it: what
/// a running monitor holds goes on existing, with no program attached.
fn detach_link_underneath(pin: &std::path::Path) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let bpf = |cmd: libc::c_long, attr: *const libc::c_void, size: usize| {
        // SAFETY: `attr` is the command's `union bpf_attr` part, `size`
        // bytes, alive for the call.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as libc::c_uint) }
    };
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = std::ffi::CString::new(pin.to_str().unwrap()).unwrap();
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(7, (&raw const get).cast(), size_of::<ObjGet>());
    assert!(fd >= 0, "BPF_OBJ_GET: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor the kernel just gave us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let detach = fd.as_raw_fd() as u32;
    let r = bpf(34, (&raw const detach).cast(), size_of::<u32>());
    assert_eq!(r, 0, "BPF_LINK_DETACH: {}", std::io::Error::last_os_error());
}

/// A gate detached under a running monitor (its link detached with
/// `bpftool link detach`, pin and descriptors left) is noticed: the tick
/// and /healthz ask `check_attached`, which used to ask only whether the
/// interface was still there, so heartbeats went past the gate, every
/// node went dead and /healthz said 200.
#[test]
fn a_gate_detached_under_the_monitor_is_noticed() {
    let (ns, [i0, i1]) = ns_with_veth("hbdet");
    let pins = PinDir::new("detached");
    let dp = ns
        .run(|| XdpDataplane::open(&kept(&[&i0, &i1], &pins)))
        .unwrap()
        .unwrap();
    dp.upsert_node(3, &keys(1)).unwrap();
    assert_eq!(ns.run(|| dp.check_attached()).unwrap(), Ok(()));

    detach_link_underneath(&pins.0.join(format!("link_{i1}")));
    assert!(!has_xdp(&ns, &i1) && has_xdp(&ns, &i0));
    let why = ns
        .run(|| dp.check_attached())
        .unwrap()
        .expect_err("the gate is gone from one interface");
    assert!(
        why.contains(&format!("detached from interface {i1}")),
        "{why}"
    );
    log(format!("detached: {why}"));

    // The next start attaches afresh over the pin of the detached link.
    drop(dp);
    let mut dp = ns
        .run(|| XdpDataplane::open(&kept(&[&i0, &i1], &pins)))
        .unwrap()
        .unwrap();
    assert!(has_xdp(&ns, &i0) && has_xdp(&ns, &i1));
    assert_eq!(ns.run(|| dp.check_attached()).unwrap(), Ok(()));
    dp.detach().unwrap();
    assert!(!has_xdp(&ns, &i0) && !has_xdp(&ns, &i1));
}

/// A monitor in userspace mode detaches the gates an earlier XDP run kept
/// in its pin directory (they took the heartbeats before its socket),
/// keeps the node maps, and leaves alone those of a monitor running on it.
#[test]
fn userspace_mode_releases_kept_links() {
    let (ns, ifs) = ns_with_veth("hbuser");
    let pins = PinDir::new("user");
    let dp = ns
        .run(|| XdpDataplane::open(&kept(&[&ifs[0], &ifs[1]], &pins)))
        .unwrap()
        .unwrap();
    dp.upsert_node(3, &keys(1)).unwrap();
    // Running: its links are its own.
    release_kept_links(&pins.0).unwrap();
    assert!(
        ifs.iter().all(|i| has_xdp(&ns, i)),
        "left to the running monitor"
    );
    drop(dp);
    assert!(ifs.iter().all(|i| has_xdp(&ns, i)), "kept");

    release_kept_links(&pins.0).unwrap();
    for i in &ifs {
        assert!(!has_xdp(&ns, i), "{i} detached");
        assert!(!pins.0.join(format!("link_{i}")).exists(), "{i} unpinned");
    }
    assert!(pins.0.join(names::NODE_REST).exists(), "node maps kept");
    release_kept_links(&pins.0).unwrap();
    release_kept_links(std::path::Path::new("/sys/fs/bpf/hb-test-no-such-dir")).unwrap();
}

/// A pin directory off bpffs: refused with what is wrong, not an EPERM
/// at the first pin that reads as missing privileges.
#[test]
fn a_pin_dir_off_bpffs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = XdpDataplane::open(&XdpOptions {
        pin_dir: Some(dir.path().join("hb")),
        max_nodes: Some(16),
        ..XdpOptions::default()
    })
    .err()
    .expect("refused");
    assert!(
        format!("{e:#}").contains("is not on a bpf filesystem"),
        "{e:#}"
    );
}

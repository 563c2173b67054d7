//! Monitor tick benchmark: time of one decision tick (a scan of every
//! node through phi and the state machine) and resident memory at 10k,
//! 100k and 1M nodes.
//!
//! The fleet sits in a `MemDataplane`, filled through the real gate (every
//! node has heartbeats accepted, so its statistics are learned); then the
//! monitor's real `Core::tick` runs over it at steady state (every node
//! healthy: the common case). The baseline, measured in the same run, is
//! the straightforward scan that evaluates phi (`exp` and `log10`) for
//! every node and classifies it, which the tick avoids by comparing
//! precomputed thresholds of the standardized lateness.
//!
//! The same tick over the native dataplane (`XdpDataplane`: the kernel
//! maps, read through their mapping under each node's seqcount), the
//! monitor's production path: the maps are loaded for exactly that many
//! nodes and filled by the kernel gate itself, three heartbeats per node
//! through BPF_PROG_TEST_RUN (interval 10 s, so that every node is still
//! healthy when the fill of a million nodes ends), then timed the same way
//! at the real clock. Needs root, else "n/a".
//!
//! Next to each size, the kernel memory the native dataplane's maps take
//! for that many node slots (memlock of every map but the ring buffer,
//! with the program loaded for exactly that capacity; needs root, else
//! "n/a").
//!
//! The thread is pinned to one CPU (`HB_BENCH_CPU`, default 0) and runs at
//! nice -20 when allowed: the machine is shared, and the tick's CPU time is
//! the figure that matters.
//!
//! `cargo run --release -p hb-tests --bin bench_monitor [-- --sizes 10000,100000,1000000 --ticks 50]`
//! prints a markdown table on stdout.

use std::{net::SocketAddr, time::Instant};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use hb::{
    dataplane::{
        Dataplane,
        mem::MemDataplane,
        xdp::{XdpDataplane, XdpOptions},
    },
    detector::{self, PhiParams},
    keys::{Keyring, Secret},
    monitor::{
        config::NodeSpec,
        fleet::Fleet,
        policy::FixedPolicy,
        state::{Level, Thresholds},
        table::Origin,
        tick::{Core, Detector},
    },
};
use hb_common::maps::names;
use hb_common::{
    Datagram, GateResult, Kind, NodeKey,
    maps::{NodeKeys, NodeLive},
};
use hb_tests::{bench::pin, frames::Udp};

const MS: u64 = 1_000_000;
const SRC: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(198, 18, 0, 2),
    40000,
));

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time of this thread, ms: what the tick costs the core it runs on,
/// whatever else the machine is doing.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// The native dataplane's figures at `n` nodes: kernel memory per node
/// slot (maps sized for `n`), and the tick over its maps: (median wall ms,
/// p99 wall ms, median CPU ms). `None` without the privileges to load it.
fn native(n: u32, ticks: usize) -> Option<(f64, (f64, f64, f64))> {
    let dp = XdpDataplane::open(&XdpOptions {
        max_nodes: Some(n),
        ..XdpOptions::default()
    })
    .map_err(|e| eprintln!("bench_monitor: native dataplane not measured: {e:#}"))
    .ok()?;
    let mem = dp.memlock().ok()?;
    let bytes = mem.iter().map(|(_, b)| *b).sum::<u64>() as f64 / n as f64;
    let mut core = provisioned(&dp, n);
    dp.set_config(&hb_common::maps::Config::default()).ok()?;
    {
        let mut ebpf = dp.ebpf();
        let prog: &mut Xdp = ebpf.program_mut(names::PROGRAM)?.try_into().ok()?;
        let mut out = [0u8; 256];
        for round in 1..=3u64 {
            for id in 1..=n {
                let d = heartbeat(id, round, 10_000);
                let frame = Udp::v4(hb_common::proto::DEFAULT_PORT, &d.seal(&KEY)).build();
                prog.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .ok()?;
            }
        }
    }
    let accepted = dp.counters().ok()?[GateResult::Accepted.index() as usize];
    assert_eq!(
        accepted,
        3 * n as u64,
        "the kernel gate accepted every heartbeat"
    );
    let mut events = Vec::new();
    core.tick(&dp, monotonic_ns(), &mut || "ts".into(), &mut events);
    assert_eq!(events.len(), n as usize, "every node joined");
    let (mut times, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..ticks {
        events.clear();
        let (t0, c0) = (Instant::now(), thread_cpu_ms());
        let st = core.tick(&dp, monotonic_ns(), &mut || "ts".into(), &mut events);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu.push(thread_cpu_ms() - c0);
        assert_eq!(st.scanned, n);
        assert!(events.is_empty(), "steady state: {:?}", events.first());
    }
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    Some((
        bytes,
        (
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            percentile(&cpu, 0.5),
        ),
    ))
}

/// Node `id`'s heartbeat number `seq` (generation 1, key epoch 1) at
/// `interval_ms`.
fn heartbeat(id: u32, seq: u64, interval_ms: u32) -> Datagram {
    Datagram {
        kind: Kind::Heartbeat,
        node_id: id,
        generation: 1,
        key_epoch: 1,
        flags: 0,
        load: 100,
        seq,
        sent_ns: 0,
        interval_ms,
        rtt_us: 0,
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    nodes: u32,
    median_ms: f64,
    p99_ms: f64,
    cpu_median_ms: f64,
    base_median_ms: f64,
    base_cpu_median_ms: f64,
    floor_cpu_median_ms: f64,
    rss_mib: f64,
    bytes_per_node: f64,
    setup_s: f64,
}

/// Every node's key.
const KEY: NodeKey = NodeKey { k0: 1, k1: 2 };

/// A monitor core with nodes `1..=n` in its table and in `dp` (one key
/// each), as the monitor provisions a node list.
fn provisioned(dp: &dyn Dataplane, n: u32) -> Core {
    let mut core = Core::new(
        Detector::new(Thresholds::default(), PhiParams::default()),
        Box::new(FixedPolicy::none()),
        1000,
    );
    core.table.set_capacity(dp.capacity());
    for id in 1..=n {
        let slot = core
            .table
            .insert(id, Origin::Configured, 0)
            .expect("capacity");
        dp.upsert_node(id, &NodeKeys::single(slot, 1, KEY))
            .expect("provision");
    }
    core
}

fn bench(n: u32, ticks: usize) -> Row {
    let rss0 = rss_bytes();
    let t_setup = Instant::now();
    let dp = MemDataplane::new();
    let mut core = provisioned(&dp, n);
    // Three heartbeats per node, 1 s apart (with a little per-node jitter),
    // through the real gate.
    for round in 1..=3u64 {
        for id in 1..=n {
            let d = heartbeat(id, round, 1000);
            let at = round * 1000 * MS + (id as u64 % 97) * MS;
            let v = dp.gate(&d.seal(&KEY), SRC, at);
            assert_eq!(v.result, GateResult::Accepted);
        }
    }
    // The first tick announces every join (not what we time).
    let mut events = Vec::new();
    let mut now = 3100 * MS;
    core.tick(&dp, now, &mut || "ts".into(), &mut events);
    assert_eq!(events.len(), n as usize, "every node joined");
    let setup_s = t_setup.elapsed().as_secs_f64();

    let mut times = Vec::with_capacity(ticks);
    let mut cpu = Vec::with_capacity(ticks);
    for _ in 0..ticks {
        events.clear();
        now += 10 * MS; // stays within the healthy range of every node
        let (t0, c0) = (Instant::now(), thread_cpu_ms());
        let st = core.tick(&dp, now, &mut || "ts".into(), &mut events);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu.push(thread_cpu_ms() - c0);
        assert_eq!(st.scanned, n);
        assert!(events.is_empty());
    }
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);

    // Baseline: phi for every node, then the reference classification.
    let th = Thresholds::default();
    let p = PhiParams::default();
    let mut base = Vec::with_capacity(ticks);
    let mut base_cpu = Vec::with_capacity(ticks);
    let mut sink = 0u64;
    for _ in 0..ticks {
        now += 10 * MS;
        let (t0, c0) = (Instant::now(), thread_cpu_ms());
        dp.read_live(0..core.table.len(), &mut |_, st: &NodeLive, _| {
            let phi = detector::phi(st, now, &p);
            let (mean, _) = detector::moments_ms(st, &p);
            let silence = now.saturating_sub(st.last_arrival_ns) as f64 / 1e6;
            sink += Level::classify(phi, silence, mean, &th) as u64;
        });
        base.push(t0.elapsed().as_secs_f64() * 1e3);
        base_cpu.push(thread_cpu_ms() - c0);
    }
    // Floor: the same scan doing nothing but touch each state's first line.
    let mut floor_cpu = Vec::with_capacity(ticks);
    for _ in 0..ticks {
        let c0 = thread_cpu_ms();
        dp.read_live(0..core.table.len(), &mut |_, st: &NodeLive, _| {
            sink = sink.wrapping_add(st.accepted ^ st.last_arrival_ns);
        });
        floor_cpu.push(thread_cpu_ms() - c0);
    }
    floor_cpu.sort_by(f64::total_cmp);
    std::hint::black_box(sink);
    base.sort_by(f64::total_cmp);
    base_cpu.sort_by(f64::total_cmp);

    let rss = rss_bytes();
    Row {
        nodes: n,
        median_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
        cpu_median_ms: percentile(&cpu, 0.5),
        base_median_ms: percentile(&base, 0.5),
        base_cpu_median_ms: percentile(&base_cpu, 0.5),
        floor_cpu_median_ms: percentile(&floor_cpu, 0.5),
        rss_mib: rss as f64 / (1 << 20) as f64,
        bytes_per_node: rss.saturating_sub(rss0) as f64 / n as f64,
        setup_s,
    }
}

/// Provisioning `n` nodes from a node list (HKDF per node and epoch) and a
/// SIGHUP-style reload that rotates the keyring (every node re-keyed).
fn provisioning(n: u32) -> (f64, f64) {
    let dp = MemDataplane::new();
    let mut core = Core::new(
        Detector::new(Thresholds::default(), PhiParams::default()),
        Box::new(FixedPolicy::none()),
        1000,
    );
    let keyring = |ids: &[u8]| {
        Keyring::from_secrets("bench", ids.iter().map(|id| (*id, Secret([*id; 32]))))
            .expect("distinct epochs")
    };
    let spec = NodeSpec::parse(&format!("1-{n}")).expect("spec");
    let t0 = Instant::now();
    let (mut fleet, _) =
        Fleet::start(&mut core, &dp, keyring(&[1]), spec.clone(), false).expect("start");
    let start_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    fleet
        .reload(&mut core, &dp, keyring(&[1, 2]), spec)
        .expect("reload");
    (start_s, t0.elapsed().as_secs_f64())
}

fn main() {
    let mut sizes = vec![10_000u32, 100_000, 1_000_000];
    let mut ticks = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sizes" => {
                sizes = args
                    .next()
                    .expect("--sizes N,N,...")
                    .split(',')
                    .map(|s| s.trim().parse().expect("a number of nodes"))
                    .collect()
            }
            "--ticks" => ticks = args.next().expect("--ticks N").parse().expect("a number"),
            other => {
                eprintln!(
                    "unknown argument {other}; usage: bench_monitor [--sizes N,N,...] [--ticks N]"
                );
                std::process::exit(2);
            }
        }
    }
    let cpu: usize = std::env::var("HB_BENCH_CPU")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pin(0, cpu);
    // SAFETY: setpriority(2) on this thread (fails harmlessly without
    // privileges).
    let niced = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) == 0 };
    println!("## Monitor tick (`cargo run --release -p hb-tests --bin bench_monitor`)");
    println!();
    println!(
        "Steady state (every node healthy), `MemDataplane`, one core (pinned to CPU {cpu}{}), {ticks} ticks per size. \
         Baseline: the same scan evaluating phi (exp + log10) for every node. \
         Scan floor: the dataplane's `read_live` (what the tick reads) over every node doing nothing but read it. \
         Wall times depend on the machine's load; CPU times are the tick thread's own. \
         RSS: the process' resident memory after the size's run, and its growth per node. \
         Native: the same tick over the kernel maps of the XDP dataplane (the production path), \
         filled by the kernel gate (BPF_PROG_TEST_RUN). \
         Kernel memory per node: memlock of the native dataplane's maps (all but the 256 KiB ring \
         buffer) loaded with exactly that many node slots.",
        if niced { ", nice -20" } else { "" }
    );
    println!();
    println!(
        "Machine: {} cores, load average at start {}.",
        // Online CPUs (available_parallelism would say 1: this thread is pinned).
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
        hb_tests::bench::loadavg()
    );
    println!();
    // Under 100 ticks the 99th percentile is the slowest tick: say so.
    let tail = if ticks >= 100 { "p99" } else { "max" };
    println!(
        "| nodes | tick median (ms) | tick {tail} (ms) | tick CPU median (ms) | baseline median (ms) | baseline CPU median (ms) | CPU speed-up | scan floor CPU (ms) | RSS after (MiB) | RSS per node (B) | **native: tick median / {tail} / CPU median (ms)** | kernel memory per node (B) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let largest = sizes.iter().copied().max().unwrap_or(0);
    for n in sizes {
        let r = bench(n, ticks);
        eprintln!("{} nodes: setup {:.1} s", r.nodes, r.setup_s);
        let nat = native(n, ticks);
        let kernel = nat
            .as_ref()
            .map_or_else(|| "n/a".into(), |(b, _)| format!("{b:.0}"));
        let native_tick = nat.as_ref().map_or_else(
            || "n/a".into(),
            |(_, (m, p, c))| format!("**{m:.3} / {p:.3} / {c:.3}**"),
        );
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1}x | {:.3} | {:.0} | {:.0} | {native_tick} | {kernel} |",
            r.nodes,
            r.median_ms,
            r.p99_ms,
            r.cpu_median_ms,
            r.base_median_ms,
            r.base_cpu_median_ms,
            r.base_cpu_median_ms / r.cpu_median_ms,
            r.floor_cpu_median_ms,
            r.rss_mib,
            r.bytes_per_node
        );
    }
    if largest > 0 {
        let (start_s, reload_s) = provisioning(largest);
        println!();
        println!(
            "Provisioning {largest} nodes from `--nodes` (HKDF-SHA256 per node): {start_s:.2} s; \
             SIGHUP reload adding a key epoch (every node re-keyed, two epochs): {reload_s:.2} s \
             (the monitor derives and installs keys without the tick's lock)."
        );
    }
}

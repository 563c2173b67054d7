//! Pieces every benchmark binary needs: the median of its rounds, CPU
//! pinning, the heartbeat frame the gate benchmarks measure, an AF_PACKET
//! socket to inject pre-built frames, and frames run through an XDP
//! program with BPF_PROG_TEST_RUN.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::ensure;
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use hb_common::{Datagram, Kind, NodeKey};

use crate::{frames::Udp, netns::NetNs};

/// The first three fields of `/proc/loadavg` (empty if unreadable): the
/// load averages a benchmark prints beside its figures.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `aa:bb:...` of a MAC address, as `ip link` takes it.
pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The IPv4 frame of heartbeat `seq` from `node_id` to UDP port `port`,
/// sealed with `key` (of `key_epoch`): generation 1, a 1 s interval, no
/// load or RTT, `sent_ns` = `seq`. The heartbeat every gate benchmark
/// measures.
pub fn heartbeat_frame(port: u16, node_id: u32, key_epoch: u8, seq: u64, key: &NodeKey) -> Vec<u8> {
    let d = Datagram {
        kind: Kind::Heartbeat,
        node_id,
        generation: 1,
        key_epoch,
        flags: 0,
        load: 0,
        seq,
        sent_ns: seq,
        interval_ms: 1000,
        rtt_us: 0,
    };
    Udp::v4(port, &d.seal(key)).build()
}

/// Median, min and max of the finite values of `xs` (NaN for all three
/// when there are none).
pub fn summary(xs: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

/// Kernel threads whose name starts with `prefix` (e.g. `napi/` for
/// threaded NAPI).
pub fn kthreads(prefix: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        comm.starts_with(prefix).then_some(pid)
    })
    .collect()
}

/// Pins thread `tid` (0: the calling thread) to `cpu`. Best effort: a
/// benchmark still runs, only noisier, where pinning is refused.
pub fn pin(tid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU set, for one thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A raw AF_PACKET socket bound to `ifname` in `ns`: `sendmmsg` on it
/// puts whole frames on the wire.
pub fn packet_socket(ns: &NetNs, ifname: &str) -> anyhow::Result<OwnedFd> {
    let ifindex = ns.ifindex(ifname)?;
    let ifname = ifname.to_owned();
    ns.run(move || -> anyhow::Result<OwnedFd> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by socket(2).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(
            rc == 0,
            "bind AF_PACKET to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        Ok(fd)
    })?
}

/// What one pass of [`test_run_frames`] measured.
pub struct TestRunTotals {
    /// Sum over the frames of BPF_PROG_TEST_RUN's mean ns per run.
    pub test_run_ns: u128,
    /// bpf_stats' run time and run count added during the pass (0 with
    /// stats off).
    pub stats_ns: u64,
    pub stats_runs: u64,
}

/// Runs `p` over each of `frames`, `repeat` times each, with
/// BPF_PROG_TEST_RUN.
pub fn test_run_frames(
    p: &mut Xdp,
    frames: &[Vec<u8>],
    repeat: u32,
) -> anyhow::Result<TestRunTotals> {
    let mut out = vec![0u8; 512];
    let i0 = p.info()?;
    let mut test_run_ns = 0u128;
    for f in frames {
        let r = p.test_run(TestRunOptions {
            data_in: Some(f),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })?;
        test_run_ns += r.duration.as_nanos();
    }
    let i1 = p.info()?;
    Ok(TestRunTotals {
        test_run_ns,
        stats_ns: (i1.run_time() - i0.run_time()).as_nanos() as u64,
        stats_runs: i1.run_count() - i0.run_count(),
    })
}

/// The gate's local-address table as on a typical monitor host (loopback,
/// a docker bridge, a management address, then the monitor's own, which
/// the benchmarks' frames are sent to: the scan's longest match), so that
/// the gate benchmarks pay for the destination check every monitor runs.
pub fn typical_local_addrs() -> hb_common::maps::LocalAddrs {
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().expect("literal").octets();
    hb_common::maps::LocalAddrs::of(
        &[
            [127, 0, 0, 1],
            [172, 17, 0, 1],
            [10, 0, 0, 5],
            [198, 18, 0, 1],
        ],
        &[v6("::1"), v6("fe80::248:42ff:fe00:1"), v6("fd00:4842::1")],
    )
}

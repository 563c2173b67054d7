//! Pieces every benchmark binary needs: the median of its rounds, CPU
//! pinning, and an AF_PACKET socket to inject pre-built frames.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::ensure;

use crate::netns::NetNs;

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

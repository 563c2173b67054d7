//! `--mode userspace`: the gate behind a UDP socket.
//!
//! For hosts without XDP, and as the honest baseline of the benchmarks:
//! the same gate code (`hb-common`, through `MemDataplane`) judges every
//! datagram that reaches the heartbeat port, and ACKs leave through the
//! socket the heartbeat came in on, so they carry the right source address.
//!
//! Sockets are bound to every address of the given interfaces (IPv4 and
//! IPv6, except link-local IPv6), or to the wildcard address when
//! no interface is given. Binding fails loudly: an unknown interface, an
//! interface without addresses, or a port already in use is one clear error
//! before the monitor starts.
//!
//! The kernel reassembles IPv4 and IPv6 fragments before a socket sees
//! them, but PROTOCOL.md says an IPv4 fragment is never a valid heartbeat
//! (XDP counts the first fragment `malformed`): each socket asks for
//! `IP_RECVFRAGSIZE` (and `IPV6_RECVFRAGSIZE`), a control message the
//! kernel adds only to a reassembled datagram, and such a datagram is
//! counted `malformed`. (XDP passes IPv6 fragments to the stack, a
//! fragment header being an extension header; reassembled, they are not
//! heartbeats here either.)

use std::{
    io::IoSliceMut,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use hb_common::GateResult;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
use tokio::{io::Interest, net::UdpSocket};

use super::metrics::Metrics;
use crate::dataplane::mem::MemDataplane;

/// The addresses to bind for `ifaces` (all of each interface's IPv4 and
/// IPv6 addresses), or the wildcard when `ifaces` is empty.
pub fn bind_addrs(ifaces: &[String], port: u16) -> anyhow::Result<Vec<SocketAddr>> {
    if ifaces.is_empty() {
        // Dual-stack wildcard: IPv4 arrives as v4-mapped addresses.
        return Ok(vec![SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            port,
        )]);
    }
    let all: Vec<_> = nix::ifaddrs::getifaddrs()
        .context("cannot list the interfaces' addresses")?
        .collect();
    let mut out = Vec::new();
    for iface in ifaces {
        nix::net::if_::if_nametoindex(iface.as_str())
            .map_err(|_| anyhow::anyhow!("unknown interface {iface}"))?;
        let before = out.len();
        for ifa in all.iter().filter(|a| &a.interface_name == iface) {
            let Some(addr) = ifa.address.as_ref() else {
                continue;
            };
            if let Some(v4) = addr.as_sockaddr_in() {
                out.push(SocketAddr::new(IpAddr::V4(v4.ip()), port));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let ip = v6.ip();
                if ip.is_unicast_link_local() {
                    // Senders address monitors by routable addresses; a
                    // link-local one is also still tentative (DAD) for a
                    // moment after the link comes up, so binding it would
                    // make start-up racy for no benefit.
                    tracing::debug!(%iface, %ip, "not binding link-local address");
                    continue;
                }
                out.push(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)));
            }
        }
        if out.len() == before {
            bail!(
                "interface {iface} has no IPv4 or (non-link-local) IPv6 address to bind in userspace mode"
            );
        }
    }
    Ok(out)
}

/// Binds one socket per address; a busy port or a missing address is an
/// error naming the address.
pub fn bind(addrs: &[SocketAddr]) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let s = match std::net::UdpSocket::bind(a) {
            Ok(s) => s,
            // No IPv6 in this namespace: the IPv4 wildcard then.
            Err(e)
                if a.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    && e.kind() == std::io::ErrorKind::AddrNotAvailable =>
            {
                let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), a.port());
                std::net::UdpSocket::bind(v4).map_err(|e| bind_error(&v4, e))?
            }
            Err(e) => return Err(bind_error(a, e)),
        };
        s.set_nonblocking(true)?;
        report_reassembly(&s, a).with_context(|| {
            format!("cannot ask the kernel to mark reassembled datagrams on {a}")
        })?;
        out.push(s);
    }
    Ok(out)
}

fn bind_error(a: &SocketAddr, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "UDP port {} on {} is already in use (another monitor running?)",
            a.port(),
            a.ip()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "not allowed to bind UDP port {} on {} (ports below 1024 need CAP_NET_BIND_SERVICE)",
            a.port(),
            a.ip()
        ),
        _ => anyhow::anyhow!("cannot bind UDP {a}: {e}"),
    }
}

/// Asks the kernel for `IP_RECVFRAGSIZE` (and, on an IPv6 socket, which
/// may also receive IPv4 as mapped addresses, `IPV6_RECVFRAGSIZE` too).
fn report_reassembly(s: &std::net::UdpSocket, a: &SocketAddr) -> std::io::Result<()> {
    let on = |level, name| {
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option of its size.
        let r = unsafe {
            libc::setsockopt(
                s.as_fd().as_raw_fd(),
                level,
                name,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    on(libc::IPPROTO_IP, libc::IP_RECVFRAGSIZE)?;
    if a.is_ipv6() {
        on(libc::IPPROTO_IPV6, libc::IPV6_RECVFRAGSIZE)?;
    }
    Ok(())
}

/// One datagram read from `fd` into `buf`: its length, its source, and
/// whether the kernel reassembled it from fragments.
fn recv_datagram(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, bool)> {
    // Room for a few control messages (one int each); only the fragment
    // size is asked for.
    let mut cmsg = [0u8; 64];
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let src = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(*v4))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
        })
        .ok_or_else(|| std::io::Error::other("a datagram from no IP address"))?;
    // A truncated control buffer (ENOBUFS) is as good as a mark.
    let reassembled = match msg.cmsgs() {
        Ok(mut c) => c.any(|m| match m {
            ControlMessageOwned::Unknown(u) => {
                let h = u.cmsg_header;
                (h.cmsg_level, h.cmsg_type) == (libc::IPPROTO_IP, libc::IP_RECVFRAGSIZE)
                    || (h.cmsg_level, h.cmsg_type) == (libc::IPPROTO_IPV6, libc::IPV6_RECVFRAGSIZE)
            }
            _ => false,
        }),
        Err(_) => true,
    };
    Ok((msg.bytes, src, reassembled))
}

/// CLOCK_MONOTONIC in ns: the clock of `NodeState::last_arrival_ns` in
/// both dataplanes.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Receives, gates and answers datagrams on `sock` until `shutdown` fires.
pub async fn serve(
    sock: std::net::UdpSocket,
    dp: Arc<MemDataplane>,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let local = sock.local_addr().ok();
    let sock = match UdpSocket::from_std(sock) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the socket with tokio");
            return;
        }
    };
    // Larger than a v1 datagram, so an oversized one is seen as such
    // (malformed) rather than truncated into 48 plausible bytes.
    let mut buf = [0u8; 2048];
    let fd = sock.as_raw_fd();
    loop {
        let recv = sock.async_io(Interest::READABLE, || recv_datagram(fd, &mut buf));
        let (n, src, reassembled) = tokio::select! {
            r = recv => match r {
                Ok(v) => v,
                Err(e) => {
                    // ICMP errors of earlier ACKs surface here: not fatal.
                    // Anything else gets a pause, so a persistent error
                    // cannot spin a core.
                    tracing::debug!(error = %e, "recv");
                    if e.kind() != std::io::ErrorKind::ConnectionRefused {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        if reassembled {
            dp.count(GateResult::Malformed);
            continue;
        }
        let now = monotonic_ns();
        let src = SocketAddr::new(src.ip().to_canonical(), src.port());
        let v = dp.gate(&buf[..n], src, now);
        if let Some(ack) = v.ack
            && let Err(e) = sock.try_send_to(&ack, reply_to(src, local))
        {
            metrics.ack_send_error();
            tracing::debug!(error = %e, %src, "cannot send ACK");
        }
    }
}

/// A v4 source on a dual-stack socket is answered at its mapped address.
fn reply_to(src: SocketAddr, local: Option<SocketAddr>) -> SocketAddr {
    match (src, local) {
        (SocketAddr::V4(v4), Some(SocketAddr::V6(_))) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => src,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_interface_is_named() {
        let e = bind_addrs(&["hb-no-such-if0".into()], 7420).unwrap_err();
        assert_eq!(e.to_string(), "unknown interface hb-no-such-if0");
    }

    #[test]
    fn loopback_addresses_and_busy_port() {
        let addrs = bind_addrs(&["lo".into()], 0).unwrap();
        assert!(
            addrs
                .iter()
                .any(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap();
        let e = bind(&[busy]).unwrap_err();
        assert!(e.to_string().contains("already in use"), "{e}");
    }
}

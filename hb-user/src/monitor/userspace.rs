//! `--mode userspace`: the gate behind a UDP socket.
//!
//! For hosts without XDP, and as the honest baseline of the benchmarks:
//! the same gate code (`hb-common`, through `MemDataplane`) judges every
//! datagram that reaches the heartbeat port, and ACKs leave through the
//! socket the heartbeat came in on.
//!
//! Sockets are bound to every address of the given interfaces (IPv4 and
//! IPv6, except link-local IPv6), or to the wildcard address when
//! no interface is given. Binding fails loudly: an unknown interface, an
//! interface without addresses, or a port already in use is one clear error
//! before the monitor starts.
//!
//! A sender accepts an ACK only from the exact address it sent the
//! heartbeat to. A bound socket's ACKs carry that address by construction;
//! a wildcard socket's would carry whatever address the kernel's routing
//! picks (on a multi-homed host, or a monitor reached through a VIP or a
//! secondary address, not the one the sender knows). So a wildcard socket
//! asks for `IP_PKTINFO` (and `IPV6_RECVPKTINFO`, the dual-stack socket
//! receiving IPv4 too) and sends each ACK from the address its heartbeat
//! was sent to, with `sendmsg` and the same control message.
//!
//! The kernel reassembles IPv4 and IPv6 fragments before a socket sees
//! them, but PROTOCOL.md says an IPv4 fragment is never a valid heartbeat
//! (XDP counts the first fragment `malformed`): each socket asks for
//! `IP_RECVFRAGSIZE` (and `IPV6_RECVFRAGSIZE`), a control message the
//! kernel adds only to a reassembled datagram, and such a datagram is
//! counted `malformed`. (XDP passes IPv6 fragments to the stack, a
//! fragment header being an extension header; reassembled, they are not
//! heartbeats here either.)
//!
//! Each datagram is stamped with the kernel's receive time
//! (`SO_TIMESTAMPNS`), not with the moment this task reads it: see
//! `stamp`.
//!
//! Heartbeats wait in the socket while this task is held up (a busy
//! runtime, a slow tick), and a full socket drops the rest silently: each
//! socket's receive buffer is made large (see [`RCVBUF_BYTES`]), and what
//! the kernel drops all the same is counted, from the drop count it adds
//! to every later datagram (`SO_RXQ_OVFL`), in
//! `hb_userspace_socket_drops_total`.

use std::{
    io::{IoSlice, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use hb_common::GateResult;
use nix::{
    errno::Errno,
    sys::{
        socket::{
            ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, getsockopt, recvmsg,
            sendmsg, setsockopt, sockopt,
        },
        time::TimeSpec,
    },
    time::{ClockId, clock_gettime},
};
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

/// How long a start waits for an IPv6 address that cannot be bound yet:
/// one still in duplicate address detection (tentative, about a second
/// after it was added) becomes bindable within it.
const TENTATIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The dual-stack wildcard: `[::]` with `IPV6_V6ONLY` cleared, so that
/// IPv4 arrives too (as v4-mapped addresses) whatever the host's
/// `net.ipv6.bindv6only` says; bound to the kernel's default there, a
/// hardened host's monitor heard no IPv4 node. The IPv4 wildcard where
/// the kernel has no IPv6 (`ipv6.disable=1`: no such socket) or the
/// namespace no IPv6 address.
fn bind_wildcard(port: u16) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let dual = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&v6.into())?;
        Ok(s)
    });
    match dual {
        Ok(s) => Ok(s.into()),
        Err(e)
            if e.raw_os_error() == Some(libc::EAFNOSUPPORT)
                || e.kind() == std::io::ErrorKind::AddrNotAvailable =>
        {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
            std::net::UdpSocket::bind(v4).map_err(|e| bind_error(&v4, e))
        }
        Err(e) => Err(bind_error(&v6, e)),
    }
}

/// Binds one socket per address; a busy port or a missing address is an
/// error naming the address. An IPv6 address that cannot be bound
/// (`EADDRNOTAVAIL`) is tried again for [`TENTATIVE_WAIT`] (a tentative
/// one, at boot); then, if another address could be bound, it is left
/// out with a warning (one that failed duplicate address detection:
/// another host has it), else the start fails.
pub fn bind(addrs: &[SocketAddr]) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut left_out = Vec::new();
    for a in addrs {
        let bound = if a.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            Some(bind_wildcard(a.port())?)
        } else {
            bind_waiting(a)?
        };
        let Some(s) = bound else {
            left_out.push(a.to_string());
            continue;
        };
        s.set_nonblocking(true)?;
        let granted = size_receive_buffer(&s)
            .with_context(|| format!("cannot size the receive buffer of the socket on {a}"))?;
        if granted < 2 * RCVBUF_BYTES {
            // Without CAP_NET_ADMIN (a container, say): what
            // net.core.rmem_max allows.
            tracing::warn!(
                socket = %s.local_addr()?,
                bytes = granted,
                wanted = 2 * RCVBUF_BYTES,
                "the socket's receive buffer is smaller than asked for (no CAP_NET_ADMIN: capped \
                 by net.core.rmem_max); heartbeats that arrive while the monitor falls behind \
                 are dropped sooner (hb_userspace_socket_drops_total)"
            );
        } else {
            tracing::debug!(socket = %s.local_addr()?, bytes = granted, "receive buffer");
        }
        ask_control_messages(&s).with_context(|| {
            format!("cannot ask the kernel for the control messages the gate needs on {a}")
        })?;
        out.push(s);
    }
    if out.is_empty() && !left_out.is_empty() {
        bail!(
            "cannot bind UDP {}: no such address (an IPv6 address still tentative after {} s, \
             or one that failed duplicate address detection: `ip -6 addr` says `dadfailed`)",
            left_out.join(", "),
            TENTATIVE_WAIT.as_secs()
        );
    }
    Ok(out)
}

/// `a` bound, waiting out an IPv6 address that is not bindable yet (see
/// [`bind`]); `None` for one still not bindable after [`TENTATIVE_WAIT`].
fn bind_waiting(a: &SocketAddr) -> anyhow::Result<Option<std::net::UdpSocket>> {
    let deadline = std::time::Instant::now() + TENTATIVE_WAIT;
    loop {
        match std::net::UdpSocket::bind(a) {
            Ok(s) => return Ok(Some(s)),
            Err(e) if a.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                if std::time::Instant::now() >= deadline {
                    tracing::warn!(
                        address = %a,
                        "IPv6 address not bindable after {} s (it failed duplicate address \
                         detection: another host on the link has it, `ip -6 addr` says \
                         `dadfailed`); not served: heartbeats sent to it are not heard until a \
                         start binds it",
                        TENTATIVE_WAIT.as_secs()
                    );
                    return Ok(None);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(bind_error(a, e)),
        }
    }
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

/// The receive buffer each socket asks for, in bytes. It is memory used
/// only while this task falls behind, and it then holds what the fleet
/// sends meanwhile: the kernel doubles the request (for its bookkeeping)
/// and charges each queued datagram its truesize, about 1 KiB for a
/// 48-byte heartbeat (832 bytes on loopback, 2-4 KiB from some NIC
/// drivers), so 64 MiB hold about 64k heartbeats, over half a second of
/// a 10k-node fleet at 10 Hz. The default (`net.core.rmem_default`,
/// often 212992 bytes: about 200 heartbeats) overflows in a 2 ms stall
/// at that rate.
const RCVBUF_BYTES: usize = 32 << 20;

/// Sizes `s`'s receive buffer to [`RCVBUF_BYTES`] and returns what the
/// kernel granted (twice the request). `SO_RCVBUFFORCE` needs root or
/// CAP_NET_ADMIN; without, `SO_RCVBUF` gets at most twice
/// `net.core.rmem_max`.
fn size_receive_buffer(s: &std::net::UdpSocket) -> std::io::Result<usize> {
    match setsockopt(s, sockopt::RcvBufForce, &RCVBUF_BYTES) {
        Err(Errno::EPERM) => setsockopt(s, sockopt::RcvBuf, &RCVBUF_BYTES)?,
        r => r?,
    }
    Ok(getsockopt(s, sockopt::RcvBuf)?)
}

/// Asks the kernel for each datagram's receive time (`SO_TIMESTAMPNS`,
/// see [`stamp`]), the socket's drop count (`SO_RXQ_OVFL`, see
/// [`Received::drops`]) and `IP_RECVFRAGSIZE` (and, on an IPv6 socket,
/// which may also receive IPv4 as mapped addresses, `IPV6_RECVFRAGSIZE`
/// too); on a wildcard socket, for the address each datagram was sent to
/// as well (`IP_PKTINFO`, and `IPV6_RECVPKTINFO` on an IPv6 socket).
///
/// The family is the socket's own, not the one asked for: `bind` falls
/// back to the IPv4 wildcard where there is no IPv6.
fn ask_control_messages(s: &std::net::UdpSocket) -> std::io::Result<()> {
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
    let local = s.local_addr()?;
    setsockopt(s, sockopt::ReceiveTimestampns, &true)?;
    setsockopt(s, sockopt::RxqOvfl, &1)?;
    on(libc::IPPROTO_IP, libc::IP_RECVFRAGSIZE)?;
    if local.is_ipv6() {
        on(libc::IPPROTO_IPV6, libc::IPV6_RECVFRAGSIZE)?;
    }
    if local.ip().is_unspecified() {
        on(libc::IPPROTO_IP, libc::IP_PKTINFO)?;
        if local.is_ipv6() {
            on(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
        }
    }
    Ok(())
}

/// Room for every control message a socket asks for at once: an IPv4
/// datagram reassembled on a dual-stack wildcard socket carries both
/// packet infos, a fragment size (room for both), its receive time and,
/// once the kernel has dropped any, the socket's drop count. A smaller
/// buffer would be truncated, and a truncated one reads as "reassembled"
/// (see `recv_datagram`).
const CMSG_ROOM: usize = cmsg_space(size_of::<libc::in6_pktinfo>())
    + cmsg_space(size_of::<libc::in_pktinfo>())
    + 2 * cmsg_space(size_of::<libc::c_int>())
    + cmsg_space(size_of::<libc::timespec>())
    + cmsg_space(size_of::<u32>());

const fn cmsg_space(len: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE(len as libc::c_uint) as usize }
}

/// A control buffer aligned for the `cmsghdr`s the kernel writes into it.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_ROOM]);

/// One datagram read by `recv_datagram`.
#[derive(Debug)]
struct Received {
    len: usize,
    /// Its source as the socket sees it (a mapped address for IPv4 on a
    /// dual-stack socket): the ACK's destination.
    src: SocketAddr,
    /// On a wildcard socket, the local address it was sent to: the ACK's
    /// source. `None` on a bound socket (whose address is that already).
    dst: Option<IpAddr>,
    /// The kernel reassembled it from fragments.
    reassembled: bool,
    /// When the kernel received it (CLOCK_REALTIME), if it said.
    rx_realtime: Option<TimeSpec>,
    /// How many datagrams the kernel dropped from the socket (its buffer
    /// full) before it queued this one, since the socket was made
    /// (wrapping); 0 while none were (the kernel then says nothing).
    drops: Option<u32>,
}

/// One datagram read from `fd` into `buf`.
fn recv_datagram(fd: RawFd, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut cmsg = CmsgBuf([0; CMSG_ROOM]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg.0), MsgFlags::empty())?;
    let src = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(*v4))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
        })
        .ok_or_else(|| std::io::Error::other("a datagram from no IP address"))?;
    let mut got = Received {
        len: msg.bytes,
        src,
        dst: None,
        reassembled: false,
        rx_realtime: None,
        drops: None,
    };
    let (mut dst_v4, mut dst_v6) = (None, None);
    match msg.cmsgs() {
        Ok(cmsgs) => {
            for m in cmsgs {
                match m {
                    // The local address to answer from, even when the
                    // datagram was sent to a broadcast address.
                    ControlMessageOwned::Ipv4PacketInfo(i) => {
                        dst_v4 = Some(Ipv4Addr::from(u32::from_be(i.ipi_spec_dst.s_addr)));
                    }
                    // A multicast destination is no address to answer
                    // from: the kernel then picks one, as it always did.
                    ControlMessageOwned::Ipv6PacketInfo(i) => {
                        dst_v6 =
                            Some(Ipv6Addr::from(i.ipi6_addr.s6_addr)).filter(|a| !a.is_multicast());
                    }
                    ControlMessageOwned::ScmTimestampns(t) => got.rx_realtime = Some(t),
                    ControlMessageOwned::RxqOvfl(n) => got.drops = Some(n),
                    ControlMessageOwned::Unknown(u) => {
                        let h = u.cmsg_header;
                        got.reassembled |= (h.cmsg_level, h.cmsg_type)
                            == (libc::IPPROTO_IP, libc::IP_RECVFRAGSIZE)
                            || (h.cmsg_level, h.cmsg_type)
                                == (libc::IPPROTO_IPV6, libc::IPV6_RECVFRAGSIZE);
                    }
                    _ => {}
                }
            }
        }
        // A truncated control buffer (ENOBUFS) is as good as a mark; it
        // cannot happen with `CMSG_ROOM`.
        Err(_) => got.reassembled = true,
    }
    // IPv4 on a dual-stack socket brings both: the IPv4 one is the better
    // (`ipi_spec_dst`, where the IPv6 one has the header's destination).
    got.dst = dst_v4.map(IpAddr::V4).or(dst_v6.map(IpAddr::V6));
    Ok(got)
}

/// Sends `payload` back to the source of `to`, from the address `to` was
/// sent to when the socket told it (a wildcard socket); the route to the
/// destination picks the interface. Non-blocking, as the socket is.
fn send_reply(fd: RawFd, payload: &[u8], to: &Received) -> std::io::Result<()> {
    let v4;
    let v6;
    let cmsg = match to.dst {
        Some(IpAddr::V4(a)) => {
            v4 = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(a).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            Some(ControlMessage::Ipv4PacketInfo(&v4))
        }
        Some(IpAddr::V6(a)) => {
            v6 = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                ipi6_ifindex: 0,
            };
            Some(ControlMessage::Ipv6PacketInfo(&v6))
        }
        None => None,
    };
    sendmsg(
        fd,
        &[IoSlice::new(payload)],
        cmsg.as_slice(),
        MsgFlags::empty(),
        Some(&SockaddrStorage::from(to.src)),
    )?;
    Ok(())
}

/// CLOCK_MONOTONIC in ns: the clock of `NodeState::last_arrival_ns` in
/// both dataplanes.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The arrival of a datagram the kernel received at `rx_realtime`, on the
/// gate's clock (CLOCK_MONOTONIC), given the kernel's stamp `prev_ns` of
/// the socket's previous datagram (or when it started serving); reads both
/// clocks once, side by side. Also whether it is the kernel's (see
/// below): only those become the next `prev_ns`.
///
/// The moment this task reads a datagram is not its arrival: a monitor
/// frozen or starved (SIGSTOP, a busy CPU, a stalled runtime) finds the
/// heartbeats queued in the socket, and stamping them "now" would teach
/// the gate (inter-arrival means, stall memory) a phantom stall as long as
/// the freeze for every node, and the runtime's scheduling latency as
/// every node's jitter. The kernel stamps each datagram as it receives
/// it, but only on CLOCK_REALTIME, so the stamp is converted by its age:
/// `now_mono - (now_real - rx_real)`. Realtime may step (NTP, an
/// operator) while a datagram waits. The kernel receives in order, so an
/// arrival before the previous one, or after now, is a step's: it
/// arrives now, as all did before the kernel's stamps were used (never
/// older than it is, so no node looks later than it is), and is not the
/// next datagram's `prev_ns` (the rest of a backlog would arrive now too).
/// One a little before the previous one (under [`STAMP_SLACK_NS`]: the
/// two clocks are read a moment apart) arrives with it. A datagram
/// without a receive time arrives now.
fn stamp(rx_realtime: Option<TimeSpec>, prev_ns: u64) -> (u64, bool) {
    let Some(rx) = rx_realtime else {
        return (monotonic_ns(), false);
    };
    // Real time first: a delay between the two reads makes the age
    // shorter, so the arrival later, never earlier, than it was.
    let now_real =
        clock_gettime(ClockId::CLOCK_REALTIME).expect("CLOCK_REALTIME is always available");
    arrival_ns(
        monotonic_ns(),
        timespec_ns(now_real),
        timespec_ns(rx),
        prev_ns,
    )
}

/// How far before the previous arrival a stamp may convert and still be
/// taken for it (see [`stamp`]).
const STAMP_SLACK_NS: i128 = 1_000_000;

/// `now_mono_ns` less the age `now_real_ns - rx_real_ns`, and true, if
/// that lies within `[prev_ns, now_mono_ns]` (`prev_ns` if a little
/// before it); `now_mono_ns` and false otherwise (see [`stamp`]).
fn arrival_ns(now_mono_ns: u64, now_real_ns: i128, rx_real_ns: i128, prev_ns: u64) -> (u64, bool) {
    let at = i128::from(now_mono_ns) - (now_real_ns - rx_real_ns);
    let (prev, now) = (i128::from(prev_ns), i128::from(now_mono_ns));
    if (prev - STAMP_SLACK_NS..=now).contains(&at) {
        (at.max(prev) as u64, true)
    } else {
        (now_mono_ns, false)
    }
}

fn timespec_ns(t: TimeSpec) -> i128 {
    i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
}

/// Receives, gates and answers datagrams on `sock` until `shutdown` fires.
/// (Registered with the runtime by the caller, so that a failure there
/// fails the start: here it ended this task alone, the address never
/// served again, and nothing said so but one line.)
pub async fn serve(
    sock: UdpSocket,
    dp: Arc<MemDataplane>,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // Larger than a v1 datagram, so an oversized one is seen as such
    // (malformed) rather than truncated into 48 plausible bytes.
    let mut buf = [0u8; 2048];
    let fd = sock.as_raw_fd();
    // Nothing arrives before the monitor listens (see `stamp`).
    let mut last_arrival_ns = monotonic_ns();
    // The socket's drop count as of its last datagram.
    let mut drops = 0u32;
    let local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
    loop {
        let recv = sock.async_io(Interest::READABLE, || recv_datagram(fd, &mut buf));
        let got = tokio::select! {
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
        // The gate ran now, whatever the datagram (the paused-host excuse
        // asks: `MemDataplane::note_read`).
        dp.note_read(monotonic_ns());
        // Only from a datagram that told it: one without (truncated
        // control messages) must not read as the count going back to 0.
        let dropped = got.drops.map_or(0, |n| n.wrapping_sub(drops));
        if dropped > 0 {
            metrics.socket_drops(dropped.into());
            if drops == 0 {
                tracing::warn!(
                    socket = %local,
                    dropped,
                    "the kernel dropped heartbeats to this socket, its receive buffer full: \
                     the monitor fell behind, and nodes may be suspected for heartbeats they sent; \
                     counted in hb_userspace_socket_drops_total, logged once per socket"
                );
            }
            drops = got.drops.unwrap_or(drops);
        }
        if got.reassembled {
            dp.count(GateResult::Malformed);
            continue;
        }
        let (now, kernels) = stamp(got.rx_realtime, last_arrival_ns);
        if kernels {
            last_arrival_ns = now;
        }
        let src = SocketAddr::new(got.src.ip().to_canonical(), got.src.port());
        let v = dp.gate_unsent(&buf[..got.len], src, now);
        // As the XDP gate: a heartbeat to a broadcast or multicast
        // address (the wildcard socket gets those) is not answered from it.
        let unicast = |ip: &IpAddr| match ip.to_canonical() {
            IpAddr::V4(a) => !(a.is_broadcast() || a.is_multicast()),
            IpAddr::V6(a) => !a.is_multicast(),
        };
        if let Some(ack) = v.ack.filter(|_| got.dst.as_ref().is_none_or(unicast)) {
            match sock.try_io(Interest::WRITABLE, || send_reply(fd, &ack, &got)) {
                Ok(()) => dp.ack_sent(),
                Err(e) => {
                    metrics.ack_send_error();
                    tracing::debug!(error = %e, %src, "cannot send ACK");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hb_common::{
        Datagram, Kind, NodeKey,
        maps::{Config, NodeKeys},
        proto,
    };

    use super::*;
    use crate::dataplane::Dataplane as _;

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

    const NODE: u32 = 7;
    const KEY: NodeKey = NodeKey { k0: 7, k1: 11 };

    /// Serves `sock` with a gate that ACKs every heartbeat of `NODE`,
    /// sends one heartbeat from a client bound to `from` to `to_ip` at the
    /// socket's port, and returns where the ACK came from.
    async fn ack_source(sock: std::net::UdpSocket, from: IpAddr, to_ip: IpAddr) -> SocketAddr {
        let port = sock.local_addr().unwrap().port();
        let dp = Arc::new(MemDataplane::new());
        dp.set_config(&Config {
            ack_every: 1,
            ..Config::default()
        })
        .unwrap();
        dp.upsert_node(NODE, &NodeKeys::single(0, 1, KEY)).unwrap();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let sock = UdpSocket::from_std(sock).unwrap();
        let task = tokio::spawn(serve(sock, dp.clone(), metrics.clone(), shutdown));

        let client = tokio::net::UdpSocket::bind(SocketAddr::new(from, 0))
            .await
            .unwrap();
        let to = SocketAddr::new(to_ip, port);
        let mut buf = [0u8; 64];
        // One heartbeat, answered once: a datagram on loopback is not
        // lost, so no answer is the gate's fault (a wakeup it missed).
        let hb = Datagram {
            kind: Kind::Heartbeat,
            node_id: NODE,
            generation: 1,
            key_epoch: 1,
            flags: 0,
            load: 0,
            seq: 1,
            sent_ns: 0,
            interval_ms: 100,
            rtt_us: 0,
        };
        client.send_to(&hb.seal(&KEY), to).await.unwrap();
        let wait = std::time::Duration::from_secs(5);
        let Ok(answered) = tokio::time::timeout(wait, client.recv_from(&mut buf)).await else {
            panic!(
                "no ACK to a heartbeat sent to {to} from {} (netns {:?}): gate counters {:?}, {}",
                client.local_addr().unwrap(),
                std::fs::read_link("/proc/thread-self/ns/net"),
                dp.counters().unwrap(),
                metrics
                    .render()
                    .lines()
                    .filter(|l| l.contains("ack"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        let (n, src) = answered.unwrap();
        let ack = proto::parse(&buf[..n], Kind::Ack).expect("an ACK");
        assert_eq!(ack.node_id, NODE);
        stop.send(true).unwrap();
        task.await.unwrap();
        SocketAddr::new(src.ip().to_canonical(), src.port())
    }

    /// A local address that is not the loopback one (127.0.0.0/8 is all
    /// local on `lo`): the ACK must not leave from 127.0.0.1, where the
    /// kernel's routing would put it.
    const SECOND_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    #[tokio::test]
    async fn dual_stack_wildcard_acks_from_the_v4_address_heartbeats_reach() {
        let sock = bind(&bind_addrs(&[], 0).unwrap()).unwrap().remove(0);
        let port = sock.local_addr().unwrap().port();
        let src = ack_source(sock, IpAddr::V4(Ipv4Addr::LOCALHOST), SECOND_V4).await;
        assert_eq!(src, SocketAddr::new(SECOND_V4, port));
    }

    #[tokio::test]
    async fn v4_wildcard_acks_from_the_address_heartbeats_reach() {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        let sock = bind(&[any]).unwrap().remove(0);
        let port = sock.local_addr().unwrap().port();
        let src = ack_source(sock, IpAddr::V4(Ipv4Addr::LOCALHOST), SECOND_V4).await;
        assert_eq!(src, SocketAddr::new(SECOND_V4, port));
    }

    /// The same over IPv6, on a host with a second IPv6 address: a
    /// heartbeat from `::1` to it is answered from it, not from `::1`. The
    /// address is made, so the test does not depend on the host's: this
    /// test's thread moves to a network namespace of its own (root, as CI
    /// runs; it fails without) whose loopback gets `fd00:4842:beef::2`.
    #[tokio::test]
    async fn dual_stack_wildcard_acks_from_the_v6_address_heartbeats_reach() {
        let second: Ipv6Addr = "fd00:4842:beef::2".parse().unwrap();
        // SAFETY: unshare(2) moves only this thread (the current-thread
        // runtime's, which opens the sockets below).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare: {} (needs root)",
            std::io::Error::last_os_error()
        );
        // Children inherit the thread's namespace.
        for args in [
            &["link", "set", "lo", "up"][..],
            &[
                "-6",
                "addr",
                "add",
                "fd00:4842:beef::2/128",
                "dev",
                "lo",
                "nodad",
            ],
        ] {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}: {st}");
        }
        // The address's local route is added by the kernel's address
        // work queue after `ip` returns: a datagram sent before it is
        // there finds no route (Ip6OutNoRoutes; under load, now and then).
        let t = std::time::Instant::now();
        loop {
            let out = std::process::Command::new("ip")
                .args(["-6", "route", "show", "table", "local", "fd00:4842:beef::2"])
                .output()
                .unwrap();
            if !out.stdout.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "no local route to fd00:4842:beef::2 after 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let sock = bind(&bind_addrs(&[], 0).unwrap()).unwrap().remove(0);
        let local = sock.local_addr().unwrap();
        assert!(local.is_ipv6(), "the wildcard socket is dual-stack");
        let to = IpAddr::V6(second);
        let src = ack_source(sock, IpAddr::V6(Ipv6Addr::LOCALHOST), to).await;
        assert_eq!(src, SocketAddr::new(to, local.port()));
    }

    /// Bound sockets send as before, with no control message.
    #[tokio::test]
    async fn bound_socket_acks_from_its_address() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let sock = bind(&[SocketAddr::new(lo, 0)]).unwrap().remove(0);
        let port = sock.local_addr().unwrap().port();
        assert_eq!(ack_source(sock, lo, lo).await, SocketAddr::new(lo, port));
    }

    /// What the dual-stack wildcard socket reads with each datagram: the
    /// address it was sent to (IPv4 and IPv6), and no "reassembled" mark
    /// from a control buffer too small for both packet infos.
    #[test]
    fn wildcard_reads_where_each_datagram_was_sent() {
        let sock = bind(&bind_addrs(&[], 0).unwrap()).unwrap().remove(0);
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let local = sock.local_addr().unwrap();
        let mut to = vec![SECOND_V4];
        if local.is_ipv6() {
            to.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
        }
        for ip in to {
            let from = if ip.is_ipv4() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                ip
            };
            let client = std::net::UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
            client
                .send_to(b"hello", SocketAddr::new(ip, local.port()))
                .unwrap();
            let mut buf = [0u8; 64];
            let got = recv_datagram(sock.as_raw_fd(), &mut buf).unwrap();
            assert_eq!(got.len, 5);
            assert_eq!(got.dst, Some(ip), "{got:?}");
            assert!(!got.reassembled, "{got:?}");
            assert!(got.rx_realtime.is_some(), "{got:?}");
            let client_addr = client.local_addr().unwrap();
            assert_eq!(
                SocketAddr::new(got.src.ip().to_canonical(), got.src.port()),
                client_addr
            );
        }
    }

    /// A datagram that waited in the socket arrived when the kernel
    /// received it, not when it was read: a monitor that was frozen or
    /// starved learns no phantom stall of its nodes.
    #[test]
    fn a_queued_datagram_arrives_when_the_kernel_received_it() {
        let lo = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let serving_ns = monotonic_ns();
        let sock = bind(&[lo]).unwrap().remove(0);
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let client = std::net::UdpSocket::bind(lo).unwrap();
        let mut buf = [0u8; 64];
        // The first socket to ask for receive times turns the kernel's
        // stamping on from a work queue; a datagram received before it
        // runs is stamped when read. Probe until one waiting 20 ms shows
        // it (bounded: 100 probes).
        for probe in 0.. {
            assert!(
                probe < 100,
                "the kernel never stamped a datagram on receipt"
            );
            client
                .send_to(b"probe", sock.local_addr().unwrap())
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let got = recv_datagram(sock.as_raw_fd(), &mut buf).unwrap();
            let (at, _) = stamp(got.rx_realtime, serving_ns);
            if monotonic_ns() - at >= 15_000_000 {
                break;
            }
        }
        let sent_ns = monotonic_ns();
        client
            .send_to(b"hello", sock.local_addr().unwrap())
            .unwrap();
        let sent_by_ns = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let got = recv_datagram(sock.as_raw_fd(), &mut buf).unwrap();
        let (at, kernels) = stamp(got.rx_realtime, serving_ns);
        let read_ns = monotonic_ns();
        assert!(kernels, "{got:?}");
        let ms = 1_000_000;
        // Slack for a loaded machine; it reads 300 ms later.
        assert!(
            at + 100 * ms >= sent_ns && at <= sent_by_ns + 100 * ms,
            "stamped {} ms after the send",
            (at as i128 - sent_ns as i128) / ms as i128
        );
        assert!(
            read_ns - at >= 200 * ms,
            "stamped {} ms before the read",
            (read_ns - at) / ms
        );
    }

    /// A socket holds what the fleet sends while its task is held up, not
    /// the default's few hundred datagrams: root's `SO_RCVBUFFORCE` is not
    /// capped by `net.core.rmem_max`.
    #[test]
    fn a_bound_socket_has_a_large_receive_buffer() {
        let lo = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let sock = bind(&[lo]).unwrap().remove(0);
        let granted = getsockopt(&sock, sockopt::RcvBuf).unwrap();
        let default: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_default")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            granted >= RCVBUF_BYTES && granted > default,
            "granted {granted} bytes (default {default})"
        );
    }

    /// Datagrams flooding a socket whose buffer holds a few, to 127.0.0.1.
    const FLOOD: u32 = 64;

    /// Shrinks `sock`'s buffer to a few datagrams (the kernel doubles the
    /// 4096), and sends `FLOOD` 1-byte datagrams to it: most are dropped.
    /// Returns the client and the address it sent to.
    fn flood(sock: &std::net::UdpSocket) -> (std::net::UdpSocket, SocketAddr) {
        setsockopt(sock, sockopt::RcvBuf, &4096).unwrap();
        let to = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            sock.local_addr().unwrap().port(),
        );
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..FLOOD {
            client.send_to(&[0], to).unwrap();
        }
        (client, to)
    }

    /// Each datagram carries how many the kernel dropped before it was
    /// queued: after a flood, the next datagram tells every drop (on a
    /// dual-stack wildcard socket, with both packet infos and the receive
    /// time, none truncated).
    #[test]
    fn a_datagram_carries_how_many_the_full_socket_dropped() {
        let sock = bind(&bind_addrs(&[], 0).unwrap()).unwrap().remove(0);
        let (client, to) = flood(&sock);
        let mut buf = [0u8; 64];
        let mut received = 0;
        // What was queued (`bind`'s socket does not block)...
        loop {
            match recv_datagram(sock.as_raw_fd(), &mut buf) {
                Ok(got) => {
                    assert!(!got.reassembled, "{got:?}");
                    received += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        // ...then one more, which brings the count.
        client.send_to(b"last", to).unwrap();
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let last = loop {
            let got = recv_datagram(sock.as_raw_fd(), &mut buf).unwrap();
            assert!(!got.reassembled, "{got:?}");
            received += 1;
            if got.len == 4 {
                break got;
            }
            assert!(received <= FLOOD, "more datagrams than were sent");
        };
        assert!(
            last.drops > Some(0),
            "{received} of {FLOOD} + 1 read, {last:?}"
        );
        assert_eq!(last.drops, Some(FLOOD + 1 - received), "{last:?}");
    }

    /// `serve` adds the drops each datagram tells to
    /// `hb_userspace_socket_drops_total`: every datagram sent is gated or
    /// counted dropped.
    #[tokio::test]
    async fn serve_counts_the_datagrams_the_kernel_dropped() {
        let lo = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let sock = bind(&[lo]).unwrap().remove(0);
        // Sent before the socket is served, so most are dropped.
        let (client, to) = flood(&sock);
        let dp = Arc::new(MemDataplane::new());
        let metrics = Arc::new(Metrics::new());
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let sock = UdpSocket::from_std(sock).unwrap();
        let task = tokio::spawn(serve(sock, dp.clone(), metrics.clone(), shutdown));
        // Drops are told by a later datagram, and one sent while the
        // flood still fills the socket may be dropped too: one more every
        // 20 ms until the count covers everything sent.
        let mut sent = u64::from(FLOOD);
        let (mut gated, mut dropped) = (0, 0);
        for _ in 0..250 {
            client.send_to(&[0], to).unwrap();
            sent += 1;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            gated = dp.counters().unwrap()[GateResult::Malformed.index() as usize];
            dropped = metrics.socket_drops_total();
            if dropped > 0 && gated + dropped == sent {
                break;
            }
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        assert!(dropped > 0, "{gated} gated, {dropped} dropped of {sent}");
        assert_eq!(gated + dropped, sent, "{gated} gated, {dropped} dropped");
        assert!(
            metrics
                .render()
                .contains(&format!("hb_userspace_socket_drops_total {dropped}")),
            "{}",
            metrics.render()
        );
    }

    #[test]
    fn arrival_is_the_kernels_receive_time_between_the_previous_and_now() {
        let s = 1_000_000_000_i128;
        let real = 1_700_000_000 * s;
        let (now, prev) = (500_000_000_000_u64, 499_000_000_000_u64);
        // Received 300 ms ago.
        assert_eq!(
            arrival_ns(now, real, real - 3 * s / 10, prev),
            (now - 300_000_000, true)
        );
        assert_eq!(arrival_ns(now, real, real, prev), (now, true));
        // Exactly the previous one, or a little before it (the clocks are
        // read a moment apart): with it.
        assert_eq!(arrival_ns(now, real, real - s, prev), (prev, true));
        assert_eq!(
            arrival_ns(now, real, real - s - s / 2000, prev),
            (prev, true)
        );
        // Received "in the future": realtime stepped back meanwhile.
        assert_eq!(arrival_ns(now, real, real + 5 * s, prev), (now, false));
        // Received well before the previous datagram: realtime stepped
        // forward meanwhile (by decades: a host without a real-time clock
        // setting it at boot). Now, not older than it is, and not the
        // next one's previous.
        assert_eq!(arrival_ns(now, real, real - 3600 * s, prev), (now, false));
        assert_eq!(arrival_ns(now, real, 0, prev), (now, false));
        assert_eq!(
            arrival_ns(now, i128::from(i64::MAX) * s, i128::from(i64::MIN) * s, 7),
            (now, false)
        );
    }

    /// A backlog read late, one datagram of which converts out of range
    /// (its clocks read 2 ms apart: the task preempted between them): the
    /// others still arrive when the kernel received them (the fallback
    /// became the next one's previous, and the rest of the backlog arrived
    /// at the read).
    #[test]
    fn one_stamp_out_of_range_leaves_the_rest_of_a_backlog_alone() {
        let us = 1_000_i128;
        let real = 1_700_000_000_000_000_000_i128;
        let read = 500_000_000_000_u64; // 2 s after the backlog
        let mut prev = read - 3_000_000_000;
        let mut late = 0;
        for i in 0..20_i128 {
            let rx = real - 2_000_000 * 1000 + i * 10 * us;
            // Datagram 5 is read with its clocks 2 ms apart.
            let skew = if i == 5 { 2_000 * us } else { 0 };
            let (at, kernels) = arrival_ns(read, real + skew, rx, prev);
            if kernels {
                prev = at;
            }
            late += usize::from(at == read);
        }
        assert_eq!(late, 1, "only the skewed one arrives at the read");
    }
}

//! Header parsing: Ethernet II with at most one 802.1Q tag, IPv4 (options
//! allowed), IPv6 (no extension headers), UDP. Gate steps 1 and 2 up to the
//! 48 payload bytes; everything about the payload itself is `hb-common`'s.
//!
//! Every access goes through [`at`], which checks the packet bounds right
//! before the access, so the verifier sees one check per access and never
//! has to relate offsets across branches (the VLAN tag and IPv4 options make
//! offsets variable).
//!
//! Decisions (PROTOCOL.md leaves these to the implementation):
//! - A frame truncated before we know it is UDP to our port is passed: it
//!   is not ours to judge, and the kernel stack drops runts anyway.
//! - UDP to our port whose UDP length or IP length do not describe exactly
//!   48 payload bytes, or whose frame is shorter than that, is `malformed`.
//! - An IPv4 first fragment (MF set, offset 0) to our port is `malformed`;
//!   non-first fragments carry no UDP header, so we cannot know their port:
//!   passed (other UDP traffic fragments legitimately).
//! - IPv6 with any extension header is passed, never parsed: the stack
//!   handles it correctly, and a heartbeat sender never adds one.
//! - UDP to our port but to an address that is not the host's
//!   (`hb_common::maps::LocalAddrs`) is passed: a heartbeat the host
//!   forwards to a monitor behind it is that monitor's.
//! - The incoming UDP checksum is not verified: the SipHash tag
//!   authenticates the payload, and on veth the checksum is often left to
//!   be computed (CHECKSUM_PARTIAL).

use aya_ebpf::programs::XdpContext;
use hb_common::{maps::LocalAddrs, proto};

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_UDP: u8 = 17;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// UDP length of every v1 datagram: header plus 48 payload bytes.
pub const UDP_DGRAM_LEN: u16 = (UDP_LEN + proto::LEN) as u16;

/// A pointer to `N` bytes at `off` in the packet, if the packet has them.
#[inline(always)]
pub fn at<const N: usize>(ctx: &XdpContext, off: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    let p = start + off;
    if p + N > end {
        return None;
    }
    Some(p as *mut [u8; N])
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    // SAFETY: `at` checked the bounds.
    at::<2>(ctx, off).map(|p| u16::from_be_bytes(unsafe { *p }))
}

/// Where the parts of a heartbeat-shaped frame are.
#[derive(Clone, Copy)]
pub struct Frame {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the UDP header; the payload follows it.
    pub udp: usize,
    /// IPv6 (else IPv4).
    pub v6: bool,
}

impl Frame {
    #[inline(always)]
    pub fn payload(&self) -> usize {
        self.udp + UDP_LEN
    }
}

/// What the headers say.
pub enum Parsed {
    /// Not UDP to our port (or not IP, or not sure): gate step 1.
    Pass,
    /// UDP to our port, but not a well-formed 48-byte datagram: step 2.
    Malformed,
    /// UDP to our port with exactly 48 payload bytes in the frame.
    Ours(Frame),
}

/// Gate step 1's common case, decided at fixed offsets before the full
/// [`parse`]: an untagged IPv4 (no options) or IPv6 frame that is not UDP,
/// or is UDP to another port. True only where `parse` returns
/// [`Parsed::Pass`] (`tests/gate.rs` runs both paths); false means "ask
/// `parse`". Foreign traffic is most of what crosses the interface, and
/// this path is a third of `parse`'s instructions.
#[inline(always)]
pub fn fast_pass(ctx: &XdpContext, port: u16) -> bool {
    // Ethernet, a 20-byte IPv4 header and the UDP ports: 38 bytes.
    let Some(p) = at::<{ ETH_LEN + IPV4_LEN + 4 }>(ctx, 0) else {
        return false;
    };
    // SAFETY: `at` checked the bounds.
    let p = unsafe { &*p };
    let ethertype = u16::from_be_bytes([p[12], p[13]]);
    if ethertype == ETH_P_IP {
        // `parse_v4` passes any protocol but UDP, and UDP to another port
        // (a later fragment, whose "ports" are payload, passes too).
        return p[ETH_LEN + 9] != IPPROTO_UDP
            || (p[ETH_LEN] == 0x45 && u16::from_be_bytes([p[36], p[37]]) != port);
    }
    if ethertype == ETH_P_IPV6 {
        let Some(p) = at::<{ ETH_LEN + IPV6_LEN + 4 }>(ctx, 0) else {
            return false;
        };
        // SAFETY: `at` checked the bounds.
        let p = unsafe { &*p };
        // `parse_v6` passes any next header but UDP (extension headers
        // included), and UDP to another port.
        return p[ETH_LEN + 6] != IPPROTO_UDP
            || u16::from_be_bytes([p[ETH_LEN + IPV6_LEN + 2], p[ETH_LEN + IPV6_LEN + 3]]) != port;
    }
    // Neither IP nor a VLAN tag: `parse` passes it.
    ethertype != ETH_P_8021Q
}

/// Gate steps 1 and 2 on the headers. `port` is in host byte order;
/// `local` the addresses heartbeats are ours at.
#[inline(always)]
pub fn parse(ctx: &XdpContext, port: u16, local: &LocalAddrs) -> Parsed {
    let Some(mut ethertype) = be16(ctx, 12) else {
        return Parsed::Pass;
    };
    let mut l3 = ETH_LEN;
    if ethertype == ETH_P_8021Q {
        let Some(inner) = be16(ctx, ETH_LEN + 2) else {
            return Parsed::Pass;
        };
        ethertype = inner;
        l3 = ETH_LEN + VLAN_LEN;
    }
    if ethertype == ETH_P_IP {
        parse_v4(ctx, l3, port, local)
    } else if ethertype == ETH_P_IPV6 {
        parse_v6(ctx, l3, port, local)
    } else {
        Parsed::Pass
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize, port: u16, local: &LocalAddrs) -> Parsed {
    let Some(h) = at::<IPV4_LEN>(ctx, l3) else {
        return Parsed::Pass;
    };
    // SAFETY: `at` checked the bounds.
    let h = unsafe { *h };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < IPV4_LEN || h[9] != IPPROTO_UDP {
        return Parsed::Pass;
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    if frag & IP_OFFSET != 0 {
        return Parsed::Pass;
    }
    let udp = l3 + ihl;
    let Some(dport) = be16(ctx, udp + 2) else {
        return Parsed::Pass;
    };
    if dport != port || !local.takes_v4([h[16], h[17], h[18], h[19]]) {
        return Parsed::Pass;
    }
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if frag & IP_MF != 0 || total != ihl + UDP_DGRAM_LEN as usize {
        return Parsed::Malformed;
    }
    udp_ours(ctx, Frame { l3, udp, v6: false })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize, port: u16, local: &LocalAddrs) -> Parsed {
    let Some(h) = at::<8>(ctx, l3) else {
        return Parsed::Pass;
    };
    // SAFETY: `at` checked the bounds.
    let h = unsafe { *h };
    // Next header other than UDP: another protocol or an extension header.
    if h[0] >> 4 != 6 || h[6] != IPPROTO_UDP {
        return Parsed::Pass;
    }
    let udp = l3 + IPV6_LEN;
    let Some(dport) = be16(ctx, udp + 2) else {
        return Parsed::Pass;
    };
    if dport != port {
        return Parsed::Pass;
    }
    // The destination address: 16 bytes at offset 24 of the header.
    let Some(dst) = at::<16>(ctx, l3 + 24) else {
        return Parsed::Pass;
    };
    // SAFETY: `at` checked the bounds.
    if !local.takes_v6(unsafe { &*dst }) {
        return Parsed::Pass;
    }
    if u16::from_be_bytes([h[4], h[5]]) != UDP_DGRAM_LEN {
        return Parsed::Malformed;
    }
    udp_ours(ctx, Frame { l3, udp, v6: true })
}

#[inline(always)]
fn udp_ours(ctx: &XdpContext, f: Frame) -> Parsed {
    match be16(ctx, f.udp + 4) {
        Some(UDP_DGRAM_LEN) if at::<{ proto::LEN }>(ctx, f.payload()).is_some() => Parsed::Ours(f),
        _ => Parsed::Malformed,
    }
}

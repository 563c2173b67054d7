//! Turning an accepted heartbeat into its ACK, in place (PROTOCOL.md,
//! "ACK"): the payload becomes `proto::make_ack`'s bytes, Ethernet
//! addresses, IP addresses and UDP ports are swapped (a VLAN tag stays
//! where it is), and the UDP checksum is computed from scratch over the
//! pseudo-header, the UDP header and the new payload. The incoming
//! checksum is never reused: on veth it is often CHECKSUM_PARTIAL (only
//! the pseudo-header sum), so incremental updates would propagate garbage.
//! The IPv4 header checksum does not change: swapping two 16-bit-aligned
//! fields leaves a ones' complement sum unchanged.
//!
//! The ACK leaves with a fresh TTL (IPv4) or hop limit (IPv6) of
//! [`ACK_TTL`], as any reply the host sends: keeping the heartbeat's
//! remaining one, it reached the sender with the initial TTL less twice
//! the path's hops, and died unseen on paths of 32 hops or more (Linux
//! starts at 64). The IPv4 header checksum takes the change incrementally
//! (RFC 1624).

use aya_ebpf::programs::XdpContext;

use crate::parse::{Frame, UDP_DGRAM_LEN, at};
use crate::payload::Payload;

/// TTL / hop limit of an ACK: Linux's default (`net.ipv4.ip_default_ttl`).
pub const ACK_TTL: u8 = 64;

/// Swaps `N` bytes at `a` with `N` bytes at `b` in the packet.
#[inline(always)]
fn swap<const N: usize>(ctx: &XdpContext, a: usize, b: usize) -> Option<()> {
    let pa = at::<N>(ctx, a)?;
    let pb = at::<N>(ctx, b)?;
    // SAFETY: both ranges are inside the packet (checked) and disjoint
    // (callers pass non-overlapping fields).
    unsafe { core::ptr::swap_nonoverlapping(pa, pb, 1) };
    Some(())
}

/// Ones' complement sum of `N` bytes (N even) read as native-endian 16-bit
/// words; RFC 1071 shows the sum is byte-order independent if the result
/// is stored the same way.
#[inline(always)]
fn sum<const N: usize>(b: &[u8; N]) -> u64 {
    let mut s = 0u64;
    let mut i = 0;
    while i < N {
        s += u16::from_ne_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    s
}

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Whether the heartbeat travelled between unicast addresses, so that its
/// ACK can go back the way it came. One sent to a group MAC (broadcast,
/// multicast) or to a broadcast or multicast IP address is taken but not
/// answered: its ACK would leave with that group address as its source.
/// Nor is one sent from a group MAC or from a group or unspecified IP
/// address (neither is a sender's; the headers are not under the tag, so
/// a copy of a fresh heartbeat rewritten on the way would do): its ACK
/// would go to that group, every host of the segment.
#[inline(always)]
pub fn answerable(ctx: &XdpContext, f: &Frame) -> bool {
    // Whole fields: a 1-byte bound check compiles to a 32-bit `>=` the
    // verifier cannot use for packet bounds.
    let Some(macs) = at::<12>(ctx, 0) else {
        return false;
    };
    // SAFETY: in bounds (checked by `at`). Bit 0 of an address's first
    // byte marks a group address: the destination's, then the source's.
    if unsafe { (*macs)[0] | (*macs)[6] } & 1 != 0 {
        return false;
    }
    if f.v6 {
        let Some(addrs) = at::<32>(ctx, f.l3 + 8) else {
            return false;
        };
        // SAFETY: in bounds (checked by `at`).
        let addrs = unsafe { &*addrs };
        // ff00::/8 is multicast; `::` (unspecified) is no one's.
        let mut any = 0;
        let mut i = 0;
        while i < 16 {
            any |= addrs[i];
            i += 1;
        }
        addrs[0] != 0xff && addrs[16] != 0xff && any != 0
    } else {
        let Some(addrs) = at::<8>(ctx, f.l3 + 12) else {
            return false;
        };
        // SAFETY: in bounds (checked by `at`).
        let addrs = unsafe { *addrs };
        let group = |a: [u8; 4]| a == [255; 4] || a[0] & 0xf0 == 0xe0;
        let (src, dst) = (
            [addrs[0], addrs[1], addrs[2], addrs[3]],
            [addrs[4], addrs[5], addrs[6], addrs[7]],
        );
        // 224.0.0.0/4 is multicast, 0.0.0.0 no one's; a subnet's own
        // broadcast address takes the prefix, which the gate does not
        // know.
        !group(src) && !group(dst) && src != [0; 4]
    }
}

/// Rewrites the frame into the ACK whose payload is `ack`. `None` if a
/// bounds check fails (it cannot after parsing; the caller then drops).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, f: &Frame, ack: &Payload) -> Option<()> {
    swap::<6>(ctx, 0, 6)?;
    let addrs = if f.v6 {
        swap::<16>(ctx, f.l3 + 8, f.l3 + 24)?;
        // SAFETY: in bounds (checked by `at`).
        sum(unsafe { &*at::<32>(ctx, f.l3 + 8)? })
    } else {
        swap::<4>(ctx, f.l3 + 12, f.l3 + 16)?;
        // SAFETY: in bounds (checked by `at`).
        sum(unsafe { &*at::<8>(ctx, f.l3 + 12)? })
    };
    if f.v6 {
        // SAFETY: in bounds (checked by `at`).
        unsafe { (*at::<1>(ctx, f.l3 + 7)?)[0] = ACK_TTL };
    } else {
        let ttl = at::<2>(ctx, f.l3 + 8)?;
        let check = at::<2>(ctx, f.l3 + 10)?;
        // SAFETY: in bounds (checked by `at`), disjoint. RFC 1624, eqn. 3:
        // HC' = ~(~HC + ~m + m') over the 16-bit word of TTL and protocol.
        unsafe {
            let old = u16::from_ne_bytes(*ttl);
            let new = u16::from_ne_bytes([ACK_TTL, (*ttl)[1]]);
            let hc = u16::from_ne_bytes(*check);
            let s = (!hc) as u64 + (!old) as u64 + new as u64;
            *ttl = new.to_ne_bytes();
            *check = (!fold(s)).to_ne_bytes();
        }
    }
    swap::<2>(ctx, f.udp, f.udp + 2)?;
    let udp = at::<8>(ctx, f.udp)?;
    let payload = at::<{ hb_common::proto::LEN }>(ctx, f.payload())?;
    // SAFETY: in bounds (checked by `at`); `udp` and `payload` are disjoint.
    unsafe {
        *payload = ack.0;
        let udp = &mut *udp;
        // Pseudo-header: addresses, zero + protocol 17, UDP length; then
        // the UDP header (ports, length, checksum 0) and the payload.
        let len = UDP_DGRAM_LEN.to_be_bytes();
        let mut s = addrs
            + u16::from_ne_bytes([0, 17]) as u64
            + 2 * u16::from_ne_bytes(len) as u64
            + u16::from_ne_bytes([udp[0], udp[1]]) as u64
            + u16::from_ne_bytes([udp[2], udp[3]]) as u64
            + sum(&ack.0);
        s = !fold(s) as u64;
        // 0 means "no checksum" (IPv4) or is forbidden (IPv6): send ~0.
        let c = if s == 0 { 0xffff } else { s as u16 };
        let c = c.to_ne_bytes();
        udp[6] = c[0];
        udp[7] = c[1];
    }
    Some(())
}

//! Frames for the gate's tests and benchmarks: a small builder (Ethernet II,
//! optional 802.1Q tag, IPv4 with optional options, IPv6 with an optional
//! extension header, UDP with a correct checksum) and an ACK checker.
//!
//! Hand-written (about 200 lines) rather than a dependency: the tests need
//! deliberately broken frames (wrong lengths, fragments, truncation at any
//! byte), which packet-building crates make awkward.

use std::net::IpAddr;

use hb_common::{
    NodeKey,
    proto::{self, Kind},
};

/// MAC addresses used by default: the monitor's and the node's.
pub const MAC_MONITOR: [u8; 6] = [0x02, 0x48, 0x42, 0, 0, 1];
pub const MAC_NODE: [u8; 6] = [0x02, 0x48, 0x42, 0, 0, 2];

/// Description of a UDP frame.
#[derive(Clone, Debug)]
pub struct Udp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub ip_options: Vec<u8>,
    /// IPv4 fragment field (flags and offset), host order.
    pub frag: u16,
    /// IPv6: insert a hop-by-hop options header (8 bytes) before UDP.
    pub v6_ext_header: bool,
    pub payload: Vec<u8>,
}

impl Udp {
    /// A frame from the node (198.18.0.2) to the monitor (198.18.0.1).
    pub fn v4(dport: u16, payload: &[u8]) -> Udp {
        Udp {
            src_mac: MAC_NODE,
            dst_mac: MAC_MONITOR,
            vlan: None,
            src: "198.18.0.2".parse().expect("literal"),
            dst: "198.18.0.1".parse().expect("literal"),
            sport: 40000,
            dport,
            ip_options: Vec::new(),
            frag: 0,
            v6_ext_header: false,
            payload: payload.to_vec(),
        }
    }

    /// The same over IPv6 (fd00:4842::2 to fd00:4842::1).
    pub fn v6(dport: u16, payload: &[u8]) -> Udp {
        Udp {
            src: "fd00:4842::2".parse().expect("literal"),
            dst: "fd00:4842::1".parse().expect("literal"),
            ..Udp::v4(dport, payload)
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        let udp_len = (8 + self.payload.len()) as u16;
        let mut udp = Vec::with_capacity(udp_len as usize);
        udp.extend_from_slice(&self.sport.to_be_bytes());
        udp.extend_from_slice(&self.dport.to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let c = udp_checksum(self.src, self.dst, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 20 + self.ip_options.len();
                let mut h = vec![0u8; 20];
                h[0] = 0x40 | (ihl / 4) as u8;
                h[2..4].copy_from_slice(&((ihl + udp.len()) as u16).to_be_bytes());
                h[6..8].copy_from_slice(&self.frag.to_be_bytes());
                // Three hops from its sender: an ACK must not reuse it.
                h[8] = 61;
                h[9] = 17;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                h.extend_from_slice(&self.ip_options);
                let c = !fold(sum16(&h));
                h[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let ext = if self.v6_ext_header { 8 } else { 0 };
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext + udp.len()) as u16).to_be_bytes());
                f.push(if self.v6_ext_header { 0 } else { 17 });
                f.push(61);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if self.v6_ext_header {
                    // Hop-by-hop: next header UDP, length 0 (8 bytes), PadN.
                    f.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
                }
            }
            _ => panic!("source and destination of different families"),
        }
        f.extend_from_slice(&udp);
        f
    }
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The UDP checksum of `udp` (header with checksum 0, and payload).
pub fn udp_checksum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut s = match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => sum16(&a.octets()) + sum16(&b.octets()),
        (IpAddr::V6(a), IpAddr::V6(b)) => sum16(&a.octets()) + sum16(&b.octets()),
        _ => panic!("mixed families"),
    };
    s += 17 + udp.len() as u32 + sum16(udp);
    match !fold(s) {
        0 => 0xffff,
        c => c,
    }
}

/// Whether the UDP checksum in `udp` is valid (0 = none, valid over IPv4).
pub fn udp_checksum_ok(src: IpAddr, dst: IpAddr, udp: &[u8]) -> bool {
    let mut s = match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            if udp[6..8] == [0, 0] {
                return true;
            }
            sum16(&a.octets()) + sum16(&b.octets())
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => sum16(&a.octets()) + sum16(&b.octets()),
        _ => return false,
    };
    s += 17 + udp.len() as u32 + sum16(udp);
    fold(s) == 0xffff
}

/// Offsets of the IP header and UDP header in a frame `build` made.
pub fn offsets(frame: &[u8]) -> (usize, usize, bool) {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([frame[12], frame[13]]);
    if et == 0x8100 {
        et = u16::from_be_bytes([frame[16], frame[17]]);
        l3 = 18;
    }
    if et == 0x86dd {
        (l3, l3 + 40, true)
    } else {
        (l3, l3 + ((frame[l3] & 0x0f) as usize) * 4, false)
    }
}

/// Checks that `ack` is the ACK of heartbeat frame `hb` (PROTOCOL.md
/// "ACK") under `key` asking for `interval_ms`: addresses, ports and MACs
/// swapped, everything else of the headers unchanged, kind 2, the
/// interval, rtt 0, bytes 0..32 unchanged but the kind, a valid tag and a
/// valid UDP checksum. Panics with what differs.
pub fn check_ack(hb: &[u8], ack: &[u8], key: &NodeKey, interval_ms: u32) {
    assert_eq!(hb.len(), ack.len(), "ACK length");
    assert_eq!(ack[0..6], hb[6..12], "destination MAC = heartbeat's source");
    assert_eq!(ack[6..12], hb[0..6], "source MAC = heartbeat's destination");
    let (l3, udp, v6) = offsets(hb);
    assert_eq!(ack[12..l3], hb[12..l3], "ethertype / VLAN unchanged");
    let (src, dst): (IpAddr, IpAddr) = if v6 {
        let a: [u8; 16] = ack[l3 + 8..l3 + 24].try_into().expect("16");
        let b: [u8; 16] = ack[l3 + 24..l3 + 40].try_into().expect("16");
        assert_eq!(ack[l3 + 8..l3 + 24], hb[l3 + 24..l3 + 40], "IPv6 src");
        assert_eq!(ack[l3 + 24..l3 + 40], hb[l3 + 8..l3 + 24], "IPv6 dst");
        assert_eq!(ack[l3..l3 + 7], hb[l3..l3 + 7], "IPv6 header rest");
        assert_eq!(ack[l3 + 7], 64, "IPv6 hop limit: a fresh one");
        (a.into(), b.into())
    } else {
        let a: [u8; 4] = ack[l3 + 12..l3 + 16].try_into().expect("4");
        let b: [u8; 4] = ack[l3 + 16..l3 + 20].try_into().expect("4");
        assert_eq!(ack[l3 + 12..l3 + 16], hb[l3 + 16..l3 + 20], "IPv4 src");
        assert_eq!(ack[l3 + 16..l3 + 20], hb[l3 + 12..l3 + 16], "IPv4 dst");
        assert_eq!(ack[l3..l3 + 8], hb[l3..l3 + 8], "IPv4 header rest");
        assert_eq!(ack[l3 + 8], 64, "IPv4 TTL: a fresh one");
        assert_eq!(ack[l3 + 9], hb[l3 + 9], "IPv4 protocol");
        assert_eq!(ack[l3 + 20..udp], hb[l3 + 20..udp], "IPv4 options");
        assert_eq!(fold(sum16(&ack[l3..udp])), 0xffff, "IPv4 header checksum");
        (a.into(), b.into())
    };
    assert_eq!(ack[udp..udp + 2], hb[udp + 2..udp + 4], "source port");
    assert_eq!(ack[udp + 2..udp + 4], hb[udp..udp + 2], "destination port");
    assert_eq!(ack[udp + 4..udp + 6], hb[udp + 4..udp + 6], "UDP length");
    assert!(udp_checksum_ok(src, dst, &ack[udp..]), "UDP checksum");
    let p: &[u8; proto::LEN] = ack[udp + 8..].try_into().expect("48-byte payload");
    let h: &[u8; proto::LEN] = hb[udp + 8..].try_into().expect("48-byte payload");
    let a = proto::parse(p, Kind::Ack).expect("ACK parses");
    assert!(proto::verify(key, p), "ACK tag verifies");
    assert_eq!(a.interval_ms, interval_ms, "ACK interval");
    assert_eq!(a.rtt_us, 0, "ACK rtt");
    assert_eq!(p[0..3], h[0..3], "magic, version");
    assert_eq!(p[4..32], h[4..32], "bytes 4..32 unchanged");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_of_built_frames_verify() {
        for u in [Udp::v4(7420, &[1; 48]), Udp::v6(7420, &[2; 47])] {
            let f = u.build();
            let (l3, udp, v6) = offsets(&f);
            assert_eq!(v6, matches!(u.src, IpAddr::V6(_)));
            assert!(udp_checksum_ok(u.src, u.dst, &f[udp..]));
            if !v6 {
                assert_eq!(fold(sum16(&f[l3..udp])), 0xffff);
            }
        }
    }

    #[test]
    fn options_and_vlan_shift_offsets() {
        let mut u = Udp::v4(7420, &[0; 48]);
        u.vlan = Some(5);
        u.ip_options = vec![1, 1, 1, 0];
        let f = u.build();
        assert_eq!(offsets(&f), (18, 18 + 24, false));
        assert_eq!(f.len(), 18 + 24 + 8 + 48);
    }
}

//! The 48-byte hb v1 datagram (`PROTOCOL.md`, "Datagram layout").
//!
//! [`parse`] applies the stateless steps of the gate (2 to 5: length,
//! magic, version, kind and flags) and is called by the XDP program on the
//! payload copied to its stack, by the userspace gate and by the sender on
//! ACKs. [`Datagram::seal`] builds a signed datagram; [`verify`] checks a
//! tag. Integers are big-endian on the wire; the tag is the SipHash-2-4
//! output as little-endian bytes.

use crate::{gate::GateResult, siphash::siphash24_words};

/// `"HB"`.
pub const MAGIC: u16 = 0x4842;
pub const VERSION: u8 = 1;
/// Length of every v1 UDP payload.
pub const LEN: usize = 48;
/// Length of the signed prefix (everything before the tag).
pub const SIGNED_LEN: usize = 40;
/// Default UDP destination port of the monitor.
pub const DEFAULT_PORT: u16 = 7420;

/// `flags` bit 0: the node is shutting down on purpose.
pub const FLAG_LEAVING: u8 = 1;
/// Flag bits a v1 datagram may set.
pub const FLAGS_KNOWN: u8 = FLAG_LEAVING;
/// Largest valid `load` (permille).
pub const LOAD_MAX: u16 = 1000;

/// Field offsets inside the datagram.
pub mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 2;
    pub const KIND: usize = 3;
    pub const NODE_ID: usize = 4;
    pub const GENERATION: usize = 8;
    pub const KEY_EPOCH: usize = 12;
    pub const FLAGS: usize = 13;
    pub const LOAD: usize = 14;
    pub const SEQ: usize = 16;
    pub const SENT_NS: usize = 24;
    pub const INTERVAL_MS: usize = 32;
    pub const RTT_US: usize = 36;
    pub const TAG: usize = 40;
}

/// The `kind` byte.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Heartbeat = 1,
    Ack = 2,
}

/// A node key: 16 bytes, used as SipHash words `k0 = le(key[0..8])`,
/// `k1 = le(key[8..16])`. Derivation from the master secret (HKDF) lives in
/// userspace (`hb-user`), since it needs `ring`.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeKey {
    pub k0: u64,
    pub k1: u64,
}

/// Key material stays out of logs and panic messages.
impl core::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    pub const fn from_bytes(b: &[u8; 16]) -> NodeKey {
        NodeKey {
            k0: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            k1: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    pub const fn to_bytes(&self) -> [u8; 16] {
        let a = self.k0.to_le_bytes();
        let b = self.k1.to_le_bytes();
        [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1], b[2], b[3], b[4], b[5],
            b[6], b[7],
        ]
    }
}

/// A decoded datagram (all fields but the tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub kind: Kind,
    pub node_id: u32,
    pub generation: u32,
    pub key_epoch: u8,
    pub flags: u8,
    pub load: u16,
    pub seq: u64,
    pub sent_ns: u64,
    pub interval_ms: u32,
    pub rtt_us: u32,
}

#[inline(always)]
fn be16(b: &[u8; LEN], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn be32(b: &[u8; LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline(always)]
fn be64(b: &[u8; LEN], at: usize) -> u64 {
    u64::from_be_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

/// Gate steps 3 to 5 on a payload of the right length: magic, version,
/// kind (`expect`) and reserved flag bits. Returns the decoded fields; the
/// tag is not checked here (that needs the node's key, see [`verify`]).
#[inline(always)]
pub fn parse_fixed(b: &[u8; LEN], expect: Kind) -> Result<Datagram, GateResult> {
    if be16(b, off::MAGIC) != MAGIC {
        return Err(GateResult::BadMagic);
    }
    if b[off::VERSION] != VERSION {
        return Err(GateResult::BadVersion);
    }
    let flags = b[off::FLAGS];
    if b[off::KIND] != expect as u8 || flags & !FLAGS_KNOWN != 0 {
        return Err(GateResult::BadKind);
    }
    Ok(Datagram {
        kind: expect,
        node_id: be32(b, off::NODE_ID),
        generation: be32(b, off::GENERATION),
        key_epoch: b[off::KEY_EPOCH],
        flags,
        load: be16(b, off::LOAD),
        seq: be64(b, off::SEQ),
        sent_ns: be64(b, off::SENT_NS),
        interval_ms: be32(b, off::INTERVAL_MS),
        rtt_us: be32(b, off::RTT_US),
    })
}

/// Gate steps 2 to 5 on a UDP payload of any length.
pub fn parse(payload: &[u8], expect: Kind) -> Result<Datagram, GateResult> {
    let b: &[u8; LEN] = payload.try_into().map_err(|_| GateResult::Malformed)?;
    parse_fixed(b, expect)
}

/// The signed prefix as the five little-endian words SipHash absorbs.
#[inline(always)]
pub fn signed_words(b: &[u8; LEN]) -> [u64; 5] {
    let w = |i: usize| {
        u64::from_le_bytes([
            b[i],
            b[i + 1],
            b[i + 2],
            b[i + 3],
            b[i + 4],
            b[i + 5],
            b[i + 6],
            b[i + 7],
        ])
    };
    [w(0), w(8), w(16), w(24), w(32)]
}

/// The tag of a datagram under `key`.
#[inline(always)]
pub fn tag(key: &NodeKey, b: &[u8; LEN]) -> u64 {
    siphash24_words(key.k0, key.k1, &signed_words(b))
}

/// The tag as carried on the wire (bytes 40..48, read little-endian).
#[inline(always)]
pub fn wire_tag(b: &[u8; LEN]) -> u64 {
    u64::from_le_bytes([b[40], b[41], b[42], b[43], b[44], b[45], b[46], b[47]])
}

/// Whether the datagram's tag verifies under `key`. Not constant-time: the
/// tag is a MAC over public data compared once per datagram, and the XDP
/// path must stay branch-light; an attacker learns nothing usable from the
/// timing of a 64-bit compare of a keyed PRF output.
#[inline(always)]
pub fn verify(key: &NodeKey, b: &[u8; LEN]) -> bool {
    tag(key, b) == wire_tag(b)
}

impl Datagram {
    /// The 48 bytes of this datagram with its tag under `key`.
    pub fn seal(&self, key: &NodeKey) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        b[off::VERSION] = VERSION;
        b[off::KIND] = self.kind as u8;
        b[4..8].copy_from_slice(&self.node_id.to_be_bytes());
        b[8..12].copy_from_slice(&self.generation.to_be_bytes());
        b[off::KEY_EPOCH] = self.key_epoch;
        b[off::FLAGS] = self.flags;
        b[14..16].copy_from_slice(&self.load.to_be_bytes());
        b[16..24].copy_from_slice(&self.seq.to_be_bytes());
        b[24..32].copy_from_slice(&self.sent_ns.to_be_bytes());
        b[32..36].copy_from_slice(&self.interval_ms.to_be_bytes());
        b[36..40].copy_from_slice(&self.rtt_us.to_be_bytes());
        let t = tag(key, &b);
        b[40..48].copy_from_slice(&t.to_le_bytes());
        b
    }

    /// Whether the LEAVING flag is set.
    pub const fn leaving(&self) -> bool {
        self.flags & FLAG_LEAVING != 0
    }
}

/// Rewrites a verified HEARTBEAT payload in place into its ACK
/// (`PROTOCOL.md`, "ACK"): `kind = 2`, `interval_ms = interval_ms`,
/// `rtt_us = 0`, bytes 0..32 otherwise unchanged, new tag under `key`.
/// Headers around the payload are the caller's business.
#[inline(always)]
pub fn make_ack(b: &mut [u8; LEN], key: &NodeKey, interval_ms: u32) {
    b[off::KIND] = Kind::Ack as u8;
    let iv = interval_ms.to_be_bytes();
    b[32] = iv[0];
    b[33] = iv[1];
    b[34] = iv[2];
    b[35] = iv[3];
    b[36] = 0;
    b[37] = 0;
    b[38] = 0;
    b[39] = 0;
    let t = tag(key, b).to_le_bytes();
    b[40] = t[0];
    b[41] = t[1];
    b[42] = t[2];
    b[43] = t[3];
    b[44] = t[4];
    b[45] = t[5];
    b[46] = t[6];
    b[47] = t[7];
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// Node key of node 42, epoch 1, under master secret 00..1f
    /// (PROTOCOL.md test vectors; HKDF itself is tested in hb-user).
    const KEY_42_1: [u8; 16] = [
        0x6d, 0xf2, 0x5b, 0x19, 0xdd, 0x02, 0x05, 0x34, 0x5e, 0x89, 0x31, 0x33, 0x51, 0x87, 0x57,
        0xd6,
    ];
    const HEARTBEAT: &str = "484201010000002a6553f100010000fa000000000000000700007048860ddf79000003e8000003520495d82c64a4996b";
    const ACK_500: &str = "484201020000002a6553f100010000fa000000000000000700007048860ddf79000001f40000000032ccfdbcb56bf715";

    fn vector() -> Datagram {
        Datagram {
            kind: Kind::Heartbeat,
            node_id: 42,
            generation: 1_700_000_000,
            key_epoch: 1,
            flags: 0,
            load: 250,
            seq: 7,
            sent_ns: 123_456_789_012_345,
            interval_ms: 1000,
            rtt_us: 850,
        }
    }

    #[test]
    fn heartbeat_vector_encodes_byte_for_byte() {
        let key = NodeKey::from_bytes(&KEY_42_1);
        assert_eq!(vector().seal(&key), hex(HEARTBEAT));
    }

    #[test]
    fn heartbeat_vector_parses_and_verifies() {
        let key = NodeKey::from_bytes(&KEY_42_1);
        let b = hex(HEARTBEAT);
        assert_eq!(parse(&b, Kind::Heartbeat), Ok(vector()));
        assert!(verify(&key, &b));
        let mut forged = b;
        forged[20] ^= 1;
        assert!(!verify(&key, &forged));
    }

    #[test]
    fn ack_vector() {
        let key = NodeKey::from_bytes(&KEY_42_1);
        let mut b = hex(HEARTBEAT);
        make_ack(&mut b, &key, 500);
        assert_eq!(b, hex(ACK_500));
        let ack = parse(&b, Kind::Ack).unwrap();
        assert_eq!(ack.interval_ms, 500);
        assert_eq!(ack.rtt_us, 0);
        assert!(verify(&key, &b));
        // The same ACK built from fields.
        let mut d = vector();
        d.kind = Kind::Ack;
        d.interval_ms = 500;
        d.rtt_us = 0;
        assert_eq!(d.seal(&key), hex(ACK_500));
    }

    #[test]
    fn stateless_gate_results_in_order() {
        let key = NodeKey::from_bytes(&KEY_42_1);
        let good = vector().seal(&key);
        assert_eq!(
            parse(&good[..47], Kind::Heartbeat),
            Err(GateResult::Malformed)
        );
        assert_eq!(
            parse(&[0u8; 49], Kind::Heartbeat),
            Err(GateResult::Malformed)
        );
        let mut b = good;
        b[0] = 0;
        b[2] = 9; // bad version too: magic is checked first
        assert_eq!(parse(&b, Kind::Heartbeat), Err(GateResult::BadMagic));
        let mut b = good;
        b[2] = 2;
        b[3] = 9;
        assert_eq!(parse(&b, Kind::Heartbeat), Err(GateResult::BadVersion));
        let mut b = good;
        b[3] = 2;
        assert_eq!(parse(&b, Kind::Heartbeat), Err(GateResult::BadKind));
        let mut b = good;
        b[13] = 0b10;
        assert_eq!(parse(&b, Kind::Heartbeat), Err(GateResult::BadKind));
        let mut b = good;
        b[13] = FLAG_LEAVING;
        assert!(parse(&b, Kind::Heartbeat).unwrap().leaving());
    }

    #[test]
    fn key_bytes_round_trip() {
        let k = NodeKey::from_bytes(&KEY_42_1);
        assert_eq!(k.to_bytes(), KEY_42_1);
    }

    /// Property tests of the wire format: whatever bytes arrive, the
    /// stateless gate gives one of its contract results, never a panic;
    /// every field survives encode then parse; no single bit of a signed
    /// HEARTBEAT or ACK can change without the gate or the tag noticing
    /// (the tag covers bytes 0..40, and is itself bytes 40..48).
    mod props {
        use proptest::prelude::*;

        use super::super::*;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 512,
                ..ProptestConfig::default()
            }
        }

        fn datagram(kind: Kind) -> impl Strategy<Value = Datagram> {
            (
                any::<u32>(),
                any::<u32>(),
                any::<u8>(),
                0..=FLAGS_KNOWN,
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
            )
                .prop_map(
                    move |(node_id, generation, key_epoch, flags, load, seq, sent_ns, iv, rtt)| {
                        Datagram {
                            kind,
                            node_id,
                            generation,
                            key_epoch,
                            flags,
                            load,
                            seq,
                            sent_ns,
                            interval_ms: iv,
                            rtt_us: rtt,
                        }
                    },
                )
        }

        fn kind() -> impl Strategy<Value = Kind> {
            prop_oneof![Just(Kind::Heartbeat), Just(Kind::Ack)]
        }

        fn key() -> impl Strategy<Value = NodeKey> {
            (any::<u64>(), any::<u64>()).prop_map(|(k0, k1)| NodeKey { k0, k1 })
        }

        proptest! {
            #![proptest_config(config())]

            /// Any payload, of any length up to a jumbo frame's: a
            /// result named in PROTOCOL.md, `malformed` exactly when the
            /// length is not 48.
            #[test]
            fn any_bytes_get_a_contract_result(
                payload in prop::collection::vec(any::<u8>(), 0..2100),
                kind in kind(),
            ) {
                match parse(&payload, kind) {
                    Ok(d) => {
                        prop_assert_eq!(payload.len(), LEN);
                        prop_assert_eq!(d.kind, kind);
                    }
                    Err(r) => {
                        prop_assert!(GateResult::from_name(r.name()) == Some(r));
                        prop_assert!((r.index() as usize) < GateResult::ALL.len());
                        prop_assert!(matches!(
                            r,
                            GateResult::Malformed
                                | GateResult::BadMagic
                                | GateResult::BadVersion
                                | GateResult::BadKind
                        ));
                        prop_assert_eq!(r == GateResult::Malformed, payload.len() != LEN);
                    }
                }
            }

            /// 48 bytes with a good header (so the fields are reached).
            #[test]
            fn any_fields_behind_a_good_header_parse_or_are_bad_kind(
                mut b in prop::array::uniform32(any::<u8>()),
                tail in prop::array::uniform16(any::<u8>()),
                kind in kind(),
            ) {
                b[0..2].copy_from_slice(&MAGIC.to_be_bytes());
                b[off::VERSION] = VERSION;
                b[off::KIND] = kind as u8;
                let mut p = [0u8; LEN];
                p[..32].copy_from_slice(&b);
                p[32..].copy_from_slice(&tail);
                let reserved = p[off::FLAGS] & !FLAGS_KNOWN != 0;
                match parse(&p, kind) {
                    Ok(d) => prop_assert!(!reserved && d.flags == p[off::FLAGS]),
                    Err(r) => prop_assert!(reserved && r == GateResult::BadKind),
                }
            }

            #[test]
            fn seal_then_parse_round_trips(
                d in kind().prop_flat_map(datagram),
                key in key(),
            ) {
                let b = d.seal(&key);
                prop_assert_eq!(parse(&b, d.kind), Ok(d));
                prop_assert!(verify(&key, &b));
                prop_assert_eq!(wire_tag(&b), tag(&key, &b));
                let other = if d.kind == Kind::Heartbeat { Kind::Ack } else { Kind::Heartbeat };
                prop_assert_eq!(parse(&b, other), Err(GateResult::BadKind));
            }

            /// `make_ack` of a sealed heartbeat is the ACK `seal` builds
            /// from the same fields (PROTOCOL.md, "ACK").
            #[test]
            fn make_ack_is_the_sealed_ack(
                d in datagram(Kind::Heartbeat),
                key in key(),
                interval_ms in any::<u32>(),
            ) {
                let mut b = d.seal(&key);
                make_ack(&mut b, &key, interval_ms);
                let ack = Datagram { kind: Kind::Ack, interval_ms, rtt_us: 0, ..d };
                prop_assert_eq!(b, ack.seal(&key));
                prop_assert_eq!(parse(&b, Kind::Ack), Ok(ack));
            }

            /// Every field of a v1 datagram is authenticated: one flipped
            /// bit anywhere is refused by the stateless gate or the tag.
            #[test]
            fn one_flipped_bit_is_always_refused(
                d in kind().prop_flat_map(datagram),
                key in key(),
                bit in 0..LEN * 8,
            ) {
                let mut b = d.seal(&key);
                b[bit / 8] ^= 1 << (bit % 8);
                let accepted = parse(&b, d.kind).is_ok() && verify(&key, &b);
                prop_assert!(!accepted, "bit {} flipped and still accepted", bit);
            }
        }
    }
}

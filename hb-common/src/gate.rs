//! The gate's results: every datagram to the heartbeat port gets exactly
//! one, in the order of `PROTOCOL.md` ("The gate"). The names are part of
//! the contract: metrics label values and tests use [`GateResult::name`].

/// One result of the gate. The discriminant is the index of the result's
/// counter in the per-CPU counter array (`maps::COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GateResult {
    /// Not UDP to the heartbeat port: handed to the kernel stack untouched.
    Pass = 0,
    /// Truncated frame, IPv4 fragment, or UDP payload other than 48 bytes.
    Malformed = 1,
    BadMagic = 2,
    BadVersion = 3,
    /// Kind other than HEARTBEAT, or reserved flag bits set.
    BadKind = 4,
    UnknownNode = 5,
    BadEpoch = 6,
    BadTag = 7,
    Stale = 8,
    Replay = 9,
    Accepted = 10,
}

impl GateResult {
    /// Every result, in gate order.
    pub const ALL: [GateResult; 11] = [
        GateResult::Pass,
        GateResult::Malformed,
        GateResult::BadMagic,
        GateResult::BadVersion,
        GateResult::BadKind,
        GateResult::UnknownNode,
        GateResult::BadEpoch,
        GateResult::BadTag,
        GateResult::Stale,
        GateResult::Replay,
        GateResult::Accepted,
    ];

    /// The contract name of the result (`PROTOCOL.md`).
    pub const fn name(self) -> &'static str {
        match self {
            GateResult::Pass => "pass",
            GateResult::Malformed => "malformed",
            GateResult::BadMagic => "bad_magic",
            GateResult::BadVersion => "bad_version",
            GateResult::BadKind => "bad_kind",
            GateResult::UnknownNode => "unknown_node",
            GateResult::BadEpoch => "bad_epoch",
            GateResult::BadTag => "bad_tag",
            GateResult::Stale => "stale",
            GateResult::Replay => "replay",
            GateResult::Accepted => "accepted",
        }
    }

    /// Index of this result's counter.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The result whose name is `name`, if any.
    pub fn from_name(name: &str) -> Option<GateResult> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if eq(Self::ALL[i].name(), name) {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }
}

fn eq(a: &str, b: &str) -> bool {
    a.as_bytes() == b.as_bytes()
}

impl core::fmt::Display for GateResult {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indices_are_dense() {
        for (i, r) in GateResult::ALL.iter().enumerate() {
            assert_eq!(r.index() as usize, i);
            assert_eq!(GateResult::from_name(r.name()), Some(*r));
        }
        assert_eq!(GateResult::from_name("nope"), None);
    }
}

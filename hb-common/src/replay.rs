//! RFC 4303 (section 3.4.3) style anti-replay window of 64 datagrams,
//! within one generation of one node.
//!
//! `max_seq` is the highest sequence number accepted so far and bit `i` of
//! `bitmap` says whether `max_seq - i` was accepted. Sequence numbers start
//! at 1; 0 is never valid. The kernel gate and the userspace gate both call
//! [`check`] and then [`Window::apply`], so both modes agree exactly.

/// Width of the window in datagrams.
pub const WINDOW: u64 = 64;

/// The window of one node in one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub max_seq: u64,
    pub bitmap: u64,
}

/// What accepting a fresh sequence number does to the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fresh {
    /// `seq` is above `max_seq`; `gap` datagrams in between were skipped
    /// (counted as lost until they arrive late).
    Advance { gap: u64 },
    /// `seq` is inside the window and not seen before: it fills a hole that
    /// an earlier advance had counted as lost.
    Late,
}

impl Window {
    /// A fresh window whose first accepted datagram is `seq`.
    #[inline(always)]
    pub const fn starting_at(seq: u64) -> Window {
        Window {
            max_seq: seq,
            bitmap: 1,
        }
    }

    /// Decides whether `seq` is fresh, without changing anything.
    /// `None` means replay: 0, seen already, or older than the window.
    #[inline(always)]
    pub fn check(&self, seq: u64) -> Option<Fresh> {
        if seq == 0 {
            return None;
        }
        if seq > self.max_seq {
            // A window that never accepted anything has max_seq 0: then
            // every sequence number below `seq` counts as a gap from 0.
            return Some(Fresh::Advance {
                gap: seq - self.max_seq - 1,
            });
        }
        let age = self.max_seq - seq;
        if age >= WINDOW || (self.bitmap >> age) & 1 == 1 {
            return None;
        }
        Some(Fresh::Late)
    }

    /// Records `seq`, which [`Window::check`] said is `fresh`.
    #[inline(always)]
    pub fn apply(&mut self, seq: u64, fresh: Fresh) {
        match fresh {
            Fresh::Advance { .. } => {
                let shift = seq - self.max_seq;
                self.bitmap = if shift >= WINDOW {
                    1
                } else {
                    (self.bitmap << shift) | 1
                };
                self.max_seq = seq;
            }
            Fresh::Late => self.bitmap |= 1 << (self.max_seq - seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_then_duplicate() {
        let mut w = Window::starting_at(1);
        assert_eq!(w.check(1), None);
        for s in 2..200 {
            let f = w.check(s).unwrap();
            assert_eq!(f, Fresh::Advance { gap: 0 });
            w.apply(s, f);
            assert_eq!(w.check(s), None);
        }
    }

    #[test]
    fn zero_is_never_valid() {
        assert_eq!(Window::default().check(0), None);
    }

    #[test]
    fn gaps_late_arrivals_and_the_window_edge() {
        let mut w = Window::starting_at(10);
        let f = w.check(15).unwrap();
        assert_eq!(f, Fresh::Advance { gap: 4 });
        w.apply(15, f);
        // 11..=14 are holes: late arrivals are fresh once.
        assert_eq!(w.check(12), Some(Fresh::Late));
        w.apply(12, Fresh::Late);
        assert_eq!(w.check(12), None);
        assert_eq!(w.check(10), None);
        // Jump far ahead: everything older than 64 behind is a replay.
        let f = w.check(15 + 100).unwrap();
        assert_eq!(f, Fresh::Advance { gap: 99 });
        w.apply(115, f);
        assert_eq!(w.bitmap, 1);
        assert_eq!(w.check(115 - 64), None, "just outside the window");
        assert_eq!(w.check(115 - 63), Some(Fresh::Late), "oldest slot inside");
    }

    #[test]
    fn first_datagram_of_an_empty_window() {
        let w = Window::default();
        assert_eq!(w.check(1), Some(Fresh::Advance { gap: 0 }));
        assert_eq!(w.check(5), Some(Fresh::Advance { gap: 4 }));
    }
}

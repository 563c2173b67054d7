//! The XDP program's maps: names, sizes and value layouts, shared by the
//! kernel and userspace (one definition, `#[repr(C)]`).
//!
//! Per node the kernel keeps two things:
//! - [`NodeKeys`] in the hash map [`names::NODE_KEYS`], keyed by node id:
//!   the node's slot and its keys for up to two epochs. Only userspace
//!   writes it (provisioning, key rotation).
//! - [`NodeState`] at that slot in the mmap-able array
//!   [`names::NODE_STATE`]: everything the gate learns from the node's
//!   accepted datagrams. The kernel writes it under the per-node
//!   `seqcount` (odd while a write is in progress), so userspace reads a
//!   consistent copy straight from the mapping without a syscall per node
//!   ([`NodeState::read_consistent`]). The one exception is
//!   `requested_interval_ms`, written only by userspace with an atomic
//!   store and only read by the kernel.
//!
//! [`NodeState::admit`] and [`NodeState::record`] are gate steps 9 to 11:
//! the kernel and the userspace gate run this same code.

use crate::{
    gate::GateResult,
    proto::{Datagram, FLAG_LEAVING, NodeKey},
    replay::{Fresh, Window},
};

/// Names of the program and maps in the eBPF object (at most 15 bytes:
/// the kernel's object-name limit). Userspace looks everything up by these.
pub mod names {
    pub const PROGRAM: &str = "hb_xdp";
    /// Returns XDP_PASS at once: attached to a peer veth so that frames
    /// the gate sends with XDP_TX arrive (veth needs an XDP program on the
    /// receiving end), in tests and the demo.
    pub const PASS: &str = "hb_pass";
    /// Returns XDP_DROP at once: the benchmark's floor.
    pub const FLOOR: &str = "hb_floor";
    pub const NODE_KEYS: &str = "HB_NODE_KEYS";
    pub const NODE_STATE: &str = "HB_NODE_STATE";
    pub const COUNTERS: &str = "HB_COUNTERS";
    pub const CONFIG: &str = "HB_CONFIG";
    pub const EVENTS: &str = "HB_EVENTS";
    pub const LIMITS: &str = "HB_LIMITS";
}

/// Capacity of the node maps: provisioned nodes and state slots.
pub const MAX_NODES: u32 = 1 << 20;
/// Size of the report ring buffer in bytes (a power of two, page multiple).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Counter indices past the gate results (which use `GateResult::index`).
pub mod counter {
    /// ACKs sent back with XDP_TX.
    pub const ACK_SENT: u32 = 11;
    /// Reports (unknown node, restart) lost because the ring buffer was full.
    pub const REPORT_DROPPED: u32 = 12;
    /// Reports suppressed by the in-kernel rate limit.
    pub const REPORT_LIMITED: u32 = 13;
    /// Datagrams that found their node's state locked by another CPU for
    /// too long; they are also counted as `replay` (see the XDP program).
    pub const CONTENDED: u32 = 14;
    /// Length of the per-CPU counter array.
    pub const LEN: u32 = 16;

    /// Names of the extra counters, for metrics.
    pub const EXTRA: [(u32, &str); 4] = [
        (ACK_SENT, "ack_sent"),
        (REPORT_DROPPED, "report_dropped"),
        (REPORT_LIMITED, "report_limited"),
        (CONTENDED, "contended"),
    ];
}

/// Value of [`names::NODE_KEYS`]: a provisioned node. 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeKeys {
    /// Index of the node's [`NodeState`] in [`names::NODE_STATE`].
    pub slot: u32,
    /// Epoch of `key[i]`.
    pub epoch: [u8; 2],
    /// Bit `i` set: `key[i]` is held.
    pub valid: u8,
    pub _pad: u8,
    pub key: [NodeKey; 2],
}

impl NodeKeys {
    /// A node at `slot` holding one key, `key` for `epoch`.
    pub const fn single(slot: u32, epoch: u8, key: NodeKey) -> NodeKeys {
        NodeKeys {
            slot,
            epoch: [epoch, 0],
            valid: 1,
            _pad: 0,
            key: [key, NodeKey { k0: 0, k1: 0 }],
        }
    }

    /// The key held for `epoch`, if any (gate step 7).
    #[inline(always)]
    pub fn find(&self, epoch: u8) -> Option<&NodeKey> {
        if self.valid & 1 != 0 && self.epoch[0] == epoch {
            Some(&self.key[0])
        } else if self.valid & 2 != 0 && self.epoch[1] == epoch {
            Some(&self.key[1])
        } else {
            None
        }
    }
}

/// `NodeState::flags` bit: the last accepted datagram had LEAVING set.
pub const NODE_LEAVING: u8 = 1;

/// EWMA gain of the inter-arrival mean: 1/2^5. Slower than RFC 6298's
/// 1/8, so one late heartbeat moves the mean by under 1% (its error is
/// also clipped, [`IA_CLIP_SHIFT`]). Chosen by `hb eval` (see
/// `hb::detector`, "Defaults").
pub const IA_MEAN_SHIFT: u32 = 5;
/// EWMA gain of the inter-arrival mean deviation: 1/2^5. Much slower than
/// RFC 6298's 1/4 so one late heartbeat or stall does not inflate sigma
/// past the detector's floor for the next beats. Chosen by `hb eval` (see
/// `hb::detector`, "Defaults").
pub const IA_DEV_SHIFT: u32 = 5;
/// An inter-arrival sample's error enters the EWMAs clipped to `+-mean /
/// 2^IA_CLIP_SHIFT` (a quarter of the interval): jitter moves the moments,
/// a stall of the sender does not drag the mean up or blow sigma up (it
/// goes to [`NodeState::stall`] instead). Chosen by `hb eval`.
pub const IA_CLIP_SHIFT: u32 = 2;
/// [`NodeState::stall`] is in units of `2^STALL_UNIT_SHIFT` ns (~1 us), so
/// a u32 holds 73 minutes without a division in the kernel.
pub const STALL_UNIT_SHIFT: u32 = 10;
/// Each inter-arrival sample decays the stall memory by `1/2^16`: a stall
/// is remembered for a long time (halved after ~45,000 samples, 12.6 hours
/// of 1 s heartbeats), because a node's pauses come from its heap, its
/// workload and its host, which do not change from hour to hour. Chosen
/// by `hb eval` (the `gc-pause` scenario; see `hb::detector`).
pub const STALL_DECAY_SHIFT: u32 = 16;

/// Value of [`names::NODE_STATE`]: what the gate knows of one node.
/// 128 bytes, two cache lines; the first holds what the detector reads on
/// every tick for every node, the second `stall`, which it reads for the
/// nodes that are late.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    // ---- line 0: the detector's view ----
    /// Even: stable. Odd: the kernel is writing this entry.
    pub seqcount: u32,
    /// Current generation (incarnation) of the node.
    pub generation: u32,
    /// Arrival of the last accepted datagram, CLOCK_MONOTONIC ns.
    pub last_arrival_ns: u64,
    /// Accepted datagrams, all generations.
    pub accepted: u64,
    /// EWMA of the inter-arrival time, ns.
    pub ia_mean_ns: u64,
    /// EWMA of the inter-arrival mean absolute deviation, ns
    /// (Jacobson/Karels, as TCP's RTTVAR; about 0.8 sigma for normal
    /// jitter).
    pub ia_dev_ns: u64,
    /// Inter-arrival samples since the generation or interval changed
    /// (saturating).
    pub ia_samples: u32,
    /// Heartbeat interval the node reports using, ms.
    pub interval_ms: u32,
    /// Generation increases seen after the first.
    pub restarts: u32,
    /// Smoothed RTT the node reports, us (0 = unknown).
    pub rtt_us: u32,
    /// Load the node reports, permille.
    pub load: u16,
    /// `NODE_LEAVING`.
    pub flags: u8,
    pub _pad0: u8,
    /// Interval the monitor asks the node to use, ms (0 = no opinion).
    /// Written by userspace only.
    pub requested_interval_ms: u32,
    // ---- line 1: the replay window and diagnostics ----
    pub max_seq: u64,
    pub replay_bitmap: u64,
    /// Sequence numbers skipped (heartbeats lost), net of late arrivals.
    pub lost: u64,
    pub bad_tag: u32,
    pub replay: u32,
    pub stale: u32,
    pub acks_sent: u32,
    /// Arrival of the first datagram of the current generation, ns.
    pub gen_start_ns: u64,
    /// The node's two most recent stalls, newest first: inter-arrival
    /// samples (consecutive sequence numbers, so no heartbeat was lost)
    /// longer than the mean by over a quarter of it, as their excess over
    /// the mean, in units of `2^STALL_UNIT_SHIFT` ns. Both decay by
    /// `1/2^STALL_DECAY_SHIFT` per sample. What the detector tolerates of
    /// a node's own pauses (GC, VM migration, CPU starvation): see
    /// `hb::detector`.
    pub stall: [u32; 2],
    pub _reserved: u64,
}

/// How [`NodeState::admit`] accepted a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// A generation larger than the current one: a new incarnation (or the
    /// node's first datagram ever, when nothing was accepted before).
    NewGeneration,
    /// The current generation, fresh in the anti-replay window.
    Fresh(Fresh),
}

/// What [`NodeState::record`] changed that the outside must hear about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// A larger generation replaced an earlier accepted one.
    pub restarted: bool,
    /// The generation before (valid when `restarted`).
    pub prev_generation: u32,
}

impl NodeState {
    /// Gate steps 9 and 10 for an authenticated datagram: `stale` if its
    /// generation is older, `replay` if seen or outside the window.
    #[inline(always)]
    pub fn admit(&self, d: &Datagram) -> Result<Admit, GateResult> {
        if d.generation < self.generation {
            return Err(GateResult::Stale);
        }
        if d.generation > self.generation {
            return if d.seq == 0 {
                Err(GateResult::Replay)
            } else {
                Ok(Admit::NewGeneration)
            };
        }
        let w = Window {
            max_seq: self.max_seq,
            bitmap: self.replay_bitmap,
        };
        match w.check(d.seq) {
            Some(f) => Ok(Admit::Fresh(f)),
            None => Err(GateResult::Replay),
        }
    }

    /// Gate step 11: folds an admitted datagram that arrived at `now_ns`
    /// into the state. Does not touch `seqcount` (the caller owns the write
    /// protocol) nor `requested_interval_ms`.
    #[inline(always)]
    pub fn record(&mut self, d: &Datagram, admit: Admit, now_ns: u64) -> Recorded {
        let mut out = Recorded::default();
        let mut sample = false;
        match admit {
            Admit::NewGeneration => {
                if self.accepted != 0 {
                    out.restarted = true;
                    out.prev_generation = self.generation;
                    self.restarts = self.restarts.wrapping_add(1);
                }
                self.generation = d.generation;
                let w = Window::starting_at(d.seq);
                self.max_seq = w.max_seq;
                self.replay_bitmap = w.bitmap;
                self.gen_start_ns = now_ns;
                // The gap across a restart is downtime, not an inter-arrival
                // time: keep the learned moments but take no sample.
                self.ia_samples = 0;
            }
            Admit::Fresh(f) => {
                let mut w = Window {
                    max_seq: self.max_seq,
                    bitmap: self.replay_bitmap,
                };
                w.apply(d.seq, f);
                self.max_seq = w.max_seq;
                self.replay_bitmap = w.bitmap;
                match f {
                    Fresh::Advance { gap } => {
                        self.lost = self.lost.wrapping_add(gap);
                        // Only the gap between consecutive sequence numbers
                        // is an inter-arrival time: one that lost heartbeats
                        // spans several intervals and says nothing of the
                        // node's rhythm or its pauses.
                        sample = self.accepted != 0 && self.gen_start_ns != 0 && gap == 0;
                    }
                    Fresh::Late => self.lost = self.lost.saturating_sub(1),
                }
                if self.gen_start_ns == 0 {
                    self.gen_start_ns = now_ns;
                }
            }
        }

        // The sender announced a new interval: re-seed the moments at it so
        // a node that slows down on request is not suspected, and one that
        // speeds up is judged by its new rhythm at once.
        if d.interval_ms != 0 && d.interval_ms != self.interval_ms {
            let iv = d.interval_ms as u64 * 1_000_000;
            self.ia_mean_ns = iv;
            self.ia_dev_ns = iv >> 3;
            self.ia_samples = 0;
            sample = false;
        }
        if sample && now_ns > self.last_arrival_ns {
            self.observe_interarrival(now_ns - self.last_arrival_ns);
        }

        self.interval_ms = d.interval_ms;
        self.rtt_us = d.rtt_us;
        self.load = d.load;
        self.flags = if d.flags & FLAG_LEAVING != 0 {
            NODE_LEAVING
        } else {
            0
        };
        if now_ns > self.last_arrival_ns {
            self.last_arrival_ns = now_ns;
        }
        self.accepted = self.accepted.wrapping_add(1);
        out
    }

    /// Jacobson/Karels EWMA update with one inter-arrival sample `x` ns,
    /// its error clipped to a quarter of the mean ([`IA_CLIP_SHIFT`]); the
    /// excess of a longer sample is remembered as a stall ([`Self::stall`]).
    #[inline(always)]
    pub fn observe_interarrival(&mut self, x: u64) {
        self.observe_interarrival_with(x, IA_MEAN_SHIFT, IA_DEV_SHIFT);
    }

    /// [`Self::observe_interarrival`] with other EWMA gains (`1/2^mean_shift`,
    /// `1/2^dev_shift`): what `hb eval` uses to try gains the kernel was not
    /// built with.
    #[inline(always)]
    pub fn observe_interarrival_with(&mut self, x: u64, mean_shift: u32, dev_shift: u32) {
        if self.ia_samples == 0 && self.ia_mean_ns == 0 {
            self.ia_mean_ns = x;
            self.ia_dev_ns = x >> 1;
        } else {
            let mean = self.ia_mean_ns as i64;
            let lim = mean >> IA_CLIP_SHIFT;
            let mut err = x as i64 - mean;
            self.stall[0] -= self.stall[0] >> STALL_DECAY_SHIFT;
            self.stall[1] -= self.stall[1] >> STALL_DECAY_SHIFT;
            if err > lim {
                let units = (err as u64) >> STALL_UNIT_SHIFT;
                self.stall[1] = self.stall[0];
                self.stall[0] = if units > u32::MAX as u64 {
                    u32::MAX
                } else {
                    units as u32
                };
                err = lim;
            } else if err < -lim {
                err = -lim;
            }
            self.ia_mean_ns = (mean + (err >> mean_shift)) as u64;
            let dev = self.ia_dev_ns as i64;
            let abs = if err < 0 { -err } else { err };
            self.ia_dev_ns = (dev + ((abs - dev) >> dev_shift)) as u64;
        }
        self.ia_samples = self.ia_samples.saturating_add(1);
    }

    /// The smaller of the node's two most recent stalls, ns: a pause it
    /// has shown at least twice (0 until it has).
    #[inline(always)]
    pub fn recurring_stall_ns(&self) -> u64 {
        let s = if self.stall[0] < self.stall[1] {
            self.stall[0]
        } else {
            self.stall[1]
        };
        (s as u64) << STALL_UNIT_SHIFT
    }

    /// Whether the last accepted datagram had LEAVING set.
    pub const fn leaving(&self) -> bool {
        self.flags & NODE_LEAVING != 0
    }
}

/// How the XDP program answers accepted heartbeats.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Heartbeat UDP port, host byte order. 0 = the program passes
    /// everything (not configured yet).
    pub port: u16,
    /// 1: accepted heartbeats go on to the kernel stack (XDP_PASS) instead
    /// of being consumed; for debugging and comparisons. No ACK then.
    pub pass_accepted: u8,
    /// 1: ACK whenever the node's requested interval is set and differs
    /// from the interval the node reports.
    pub ack_on_change: u8,
    /// ACK every N-th accepted heartbeat of a node (1 = every one, 0 =
    /// never periodically).
    pub ack_every: u32,
    /// Reports (unknown node, restart) per second, per CPU.
    pub report_rate: u32,
    /// Reports allowed in a burst, per CPU.
    pub report_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: crate::proto::DEFAULT_PORT,
            pass_accepted: 0,
            ack_on_change: 0,
            ack_every: 0,
            report_rate: 20,
            report_burst: 50,
        }
    }
}

/// Per-CPU token bucket of the report rate limit ([`names::LIMITS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens, in millitokens.
    pub tokens_milli: u64,
    pub last_ns: u64,
}

impl RateLimit {
    /// Takes one token at `now_ns` if there is one, refilling at `rate`
    /// tokens per second up to `burst`. A fresh bucket starts full.
    ///
    /// The refill is computed from the time since the last refill that
    /// produced something: when calls come faster than one per millitoken,
    /// the clock is not reset to `now` on every call, so a flood cannot
    /// stop the refill by rounding it to zero.
    #[inline(always)]
    pub fn take(&mut self, rate: u32, burst: u32, now_ns: u64) -> bool {
        let cap = burst as u64 * 1000;
        // Bounded so the product below fits in 64 bits (2^31 us = 35 min is
        // longer than any sane bucket takes to fill).
        let mut elapsed_us = now_ns.saturating_sub(self.last_ns) / 1000;
        if elapsed_us > 1 << 31 {
            elapsed_us = 1 << 31;
        }
        let refill = elapsed_us * rate as u64 / 1000;
        if self.last_ns == 0 {
            self.tokens_milli = cap;
            self.last_ns = now_ns;
        } else if refill != 0 {
            let t = self.tokens_milli + refill;
            self.tokens_milli = if t > cap { cap } else { t };
            self.last_ns = now_ns;
        }
        if self.tokens_milli < 1000 {
            return false;
        }
        self.tokens_milli -= 1000;
        true
    }
}

/// `Report::kind`: a datagram named a node id that is not provisioned.
pub const REPORT_UNKNOWN_NODE: u32 = 1;
/// `Report::kind`: an authenticated datagram raised a node's generation.
pub const REPORT_RESTART: u32 = 2;

/// A record of the [`names::EVENTS`] ring buffer. 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub ts_ns: u64,
    pub kind: u32,
    pub node_id: u32,
    pub generation: u32,
    /// REPORT_RESTART: the generation before.
    pub prev_generation: u32,
    /// Source UDP port, host byte order.
    pub src_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub key_epoch: u8,
    /// Source address; IPv4 in the first 4 bytes.
    pub src_addr: [u8; 16],
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays, no padding holes that
    // matter to the kernel (explicit `_pad` fields), valid for any bits.
    unsafe impl aya::Pod for super::NodeKeys {}
    unsafe impl aya::Pod for super::NodeState {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::RateLimit {}
    unsafe impl aya::Pod for super::Report {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Kind;

    #[test]
    fn layouts_are_what_the_kernel_expects() {
        assert_eq!(size_of::<NodeKeys>(), 40);
        assert_eq!(size_of::<NodeState>(), 128);
        assert_eq!(align_of::<NodeState>(), 64);
        assert_eq!(core::mem::offset_of!(NodeState, max_seq), 64);
        assert_eq!(core::mem::offset_of!(NodeState, gen_start_ns), 104);
        assert_eq!(core::mem::offset_of!(NodeState, stall), 112);
        assert_eq!(core::mem::offset_of!(NodeState, _reserved), 120);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<Report>(), 48);
        assert_eq!(size_of::<RateLimit>(), 16);
    }

    fn hb(generation: u32, seq: u64) -> Datagram {
        Datagram {
            kind: Kind::Heartbeat,
            node_id: 7,
            generation,
            key_epoch: 0,
            flags: 0,
            load: 10,
            seq,
            sent_ns: 0,
            interval_ms: 1000,
            rtt_us: 0,
        }
    }

    fn feed(s: &mut NodeState, d: &Datagram, now: u64) -> Result<Recorded, GateResult> {
        let a = s.admit(d)?;
        Ok(s.record(d, a, now))
    }

    #[test]
    fn first_datagram_is_not_a_restart_and_later_generations_are() {
        let mut s = NodeState::default();
        let r = feed(&mut s, &hb(100, 1), 1_000).unwrap();
        assert!(!r.restarted);
        assert_eq!((s.generation, s.max_seq, s.accepted), (100, 1, 1));
        feed(&mut s, &hb(100, 2), 2_000).unwrap();
        assert_eq!(feed(&mut s, &hb(99, 50), 3_000), Err(GateResult::Stale));
        assert_eq!(feed(&mut s, &hb(100, 2), 3_000), Err(GateResult::Replay));
        let r = feed(&mut s, &hb(101, 1), 4_000).unwrap();
        assert!(r.restarted);
        assert_eq!(r.prev_generation, 100);
        assert_eq!((s.generation, s.max_seq, s.restarts), (101, 1, 1));
    }

    #[test]
    fn losses_and_interarrival_moments() {
        let mut s = NodeState::default();
        let ms = 1_000_000u64;
        feed(&mut s, &hb(1, 1), 1000 * ms).unwrap();
        // The first datagram announces interval 1000 ms: moments seeded.
        assert_eq!(s.ia_mean_ns, 1000 * ms);
        feed(&mut s, &hb(1, 2), 2100 * ms).unwrap();
        assert_eq!(s.ia_samples, 1);
        // mean = 1000 + (1100 - 1000) / 2^IA_MEAN_SHIFT ms
        let mean = 1_000_000_000 + (100_000_000 >> IA_MEAN_SHIFT);
        assert_eq!(s.ia_mean_ns, mean);
        // Two heartbeats lost: the 3 s gap is no sample.
        feed(&mut s, &hb(1, 5), 5100 * ms).unwrap();
        assert_eq!(s.lost, 2);
        assert_eq!((s.ia_samples, s.ia_mean_ns), (1, mean));
        assert_eq!(s.stall, [0, 0], "a loss is no stall");
        feed(&mut s, &hb(1, 4), 5200 * ms).unwrap();
        assert_eq!(s.lost, 1, "a late arrival fills a hole");
        assert_eq!(s.ia_samples, 1, "late arrivals are no samples");
        assert_eq!(s.last_arrival_ns, 5200 * ms);
    }

    #[test]
    fn stalls_are_clipped_out_of_the_moments_and_remembered() {
        let mut s = NodeState::default();
        let ms = 1_000_000u64;
        let mut t = 1000 * ms;
        let mut seq = 1;
        let mut beat = |s: &mut NodeState, gap_ms: u64| {
            t += gap_ms * ms;
            feed(s, &hb(1, seq), t).unwrap();
            seq += 1;
        };
        beat(&mut s, 0);
        for _ in 0..10 {
            beat(&mut s, 1000);
        }
        let (mean, dev) = (s.ia_mean_ns, s.ia_dev_ns);
        assert_eq!(mean, 1000 * ms);
        // A 6 s pause: the moments move as for a quarter-interval error
        // only; the 5 s excess is the newest stall.
        beat(&mut s, 6000);
        let lim = (mean >> IA_CLIP_SHIFT) as i64;
        assert_eq!(s.ia_mean_ns, (mean as i64 + (lim >> IA_MEAN_SHIFT)) as u64);
        assert_eq!(
            s.ia_dev_ns,
            (dev as i64 + ((lim - dev as i64) >> IA_DEV_SHIFT)) as u64
        );
        assert_eq!(s.stall, [((5000 * ms) >> STALL_UNIT_SHIFT) as u32, 0]);
        assert_eq!(s.recurring_stall_ns(), 0, "seen once");
        // A 1.2 s sample is jitter, not a stall (within a quarter); a
        // 3 s one is the next stall; the smaller of the two is recurring.
        beat(&mut s, 1200);
        assert_eq!(s.stall[1], 0);
        let m = s.ia_mean_ns;
        beat(&mut s, 3000);
        let second = ((3000 * ms - m) >> STALL_UNIT_SHIFT) as u32;
        assert_eq!(s.stall[0], second);
        assert!(s.stall[1] < ((5000 * ms) >> STALL_UNIT_SHIFT) as u32);
        assert_eq!(s.recurring_stall_ns(), (second as u64) << STALL_UNIT_SHIFT);
        // Both decay with every sample: 1/2^16 each.
        let before = s.stall;
        beat(&mut s, 1000);
        assert_eq!(s.stall[0], before[0] - (before[0] >> STALL_DECAY_SHIFT));
        assert_eq!(s.stall[1], before[1] - (before[1] >> STALL_DECAY_SHIFT));
        // A stall too long for the units saturates.
        let mut long = s;
        long.observe_interarrival(u64::MAX / 2);
        assert_eq!(long.stall[0], u32::MAX);
    }

    #[test]
    fn interval_change_reseeds_and_leaving_is_recorded() {
        let mut s = NodeState::default();
        feed(&mut s, &hb(1, 1), 1).unwrap();
        let mut d = hb(1, 2);
        d.interval_ms = 5000;
        d.flags = FLAG_LEAVING;
        feed(&mut s, &d, 1_000_000_001).unwrap();
        assert_eq!(s.ia_mean_ns, 5_000_000_000);
        assert_eq!(s.ia_samples, 0);
        assert!(s.leaving());
    }

    #[test]
    fn rate_limit_bursts_then_refills_even_under_a_flood() {
        let mut b = RateLimit::default();
        let ms = 1_000_000u64;
        let mut t = 1_000 * ms;
        let mut ok = 0;
        for _ in 0..100 {
            ok += b.take(10, 5, t) as u32;
        }
        assert_eq!(ok, 5, "the burst");
        // A flood of one call per microsecond for one second refills at
        // 10/s: the clock must not be reset by calls that refill nothing.
        ok = 0;
        for _ in 0..1_000_000 {
            t += 1_000;
            ok += b.take(10, 5, t) as u32;
        }
        assert_eq!(ok, 10);
    }

    #[test]
    fn key_lookup_by_epoch() {
        let k = |n| NodeKey { k0: n, k1: n };
        let keys = NodeKeys {
            slot: 3,
            epoch: [1, 2],
            valid: 0b10,
            _pad: 0,
            key: [k(1), k(2)],
        };
        assert_eq!(keys.find(1), None, "slot 0 not valid");
        assert_eq!(keys.find(2), Some(&k(2)));
    }
}

//! The writer of the node index (`hb_common::maps::index`): node id ->
//! slot, a bucketed cuckoo hash table that the XDP program reads through
//! the map and userspace writes through its mapping.
//!
//! Layout and the reader's protocol are `hb_common`'s (the kernel and this
//! module's [`NodeIndex::lookup`] run the same `index::lookup`). This
//! module owns the writes, and with them the invariants a reader relies
//! on:
//! - every entry is written with one 64-bit store (id and slot together);
//! - a node is never absent from both of its buckets while it is
//!   provisioned: a move writes the entry at its new place before it
//!   clears the old one;
//! - moves happen only while the header's sequence number is odd, and it
//!   changes across them, so a reader that missed during moves searches
//!   again.
//!
//! # Size: as small as the fleet, not as the capacity
//! The map has room for twice the capacity's entries, but the table in
//! use is a prefix of it, the header's mask saying how many buckets: it
//! starts at [`MIN_BUCKETS`] and doubles in place whenever it would get
//! more than half full. A fleet of 10,000 nodes thus uses 4,096 buckets
//! (256 KB) whatever the capacity, and the XDP program's lookups stay
//! within a few dozen pages. That matters more than cache lines: on the
//! team's VM, with a million-slot index in use, 10,000 nodes cost 337 ns
//! per heartbeat against 174 ns with 16,384 slots (`bench_e2e`, bpf_stats;
//! TLB misses under nested paging).
//!
//! Doubling is linear hashing's split: with one more mask bit, an entry of
//! bucket `b` stays in `b` or goes to `b + old buckets`, both of which the
//! old entries fit. Entries are copied first, then the header switches
//! to the new mask, then the copies' originals are cleared, all with the
//! sequence number odd.
//!
//! # Inserts
//! A node goes to its first bucket unless it is full (then its second):
//! a lookup searches the first bucket first, so nearly every lookup reads
//! one cache line. Only when both are full does a breadth-first search
//! look for a chain of moves (cuckoo hashing with 8-entry buckets): with a
//! million sequential ids at half load, 99% of the nodes sit in their
//! first bucket and one insert in four thousand needs a chain (see the
//! tests).
//!
//! # Seed
//! Which ids share buckets depends on the index's seed
//! (`index::buckets`), drawn from the OS's random number generator when
//! the index is created and kept in the header for the kernel. Without
//! it anyone could compute sixteen ids whose two buckets are both a
//! target's two buckets; enrolled (`--enroll` provisions ids from
//! unauthenticated datagrams), they would fill those buckets with entries
//! no move can place elsewhere, and the target could never be indexed.
//! The seed stays with the index for its life: an adopted index keeps
//! its own, a doubling rehashes under the same one. An index pinned by a
//! version without a seed has 0, the unkeyed hash, and keeps it.
//!
//! One writer at a time: the mutating methods take `&mut self`.

use std::sync::atomic::{AtomicU64, Ordering};

use hb_common::maps::index::{self, Bucket, ENTRIES};

/// Where the index's words live: the map's shared mapping (page-aligned),
/// or memory of our own (tests).
pub enum Words<'a> {
    /// Must be 64-byte aligned, as the kernel's buckets are.
    Mapped(&'a [AtomicU64]),
    Owned(Box<[OwnedBucket]>),
}

/// A bucket of our own memory, aligned like [`Bucket`].
#[repr(C, align(64))]
pub struct OwnedBucket([AtomicU64; ENTRIES]);

impl OwnedBucket {
    pub fn empty() -> OwnedBucket {
        OwnedBucket(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Words<'_> {
    fn get(&self) -> &[AtomicU64] {
        match self {
            Words::Mapped(w) => w,
            // SAFETY: `OwnedBucket` is `ENTRIES` atomics, no padding.
            Words::Owned(b) => unsafe {
                std::slice::from_raw_parts(b.as_ptr().cast::<AtomicU64>(), b.len() * ENTRIES)
            },
        }
    }
}

/// The index is full: no chain of moves frees an entry in either of the
/// node's buckets (the node table should never let it get there).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the node index has no room for node {0} (both of its buckets full, no cuckoo path)")]
pub struct IndexFull(pub u32);

/// The index was written by something else: its header does not fit its
/// map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the node index's header says {found} buckets, its map holds at most {room}: it was left by another hb version"
)]
pub struct IndexMismatch {
    pub found: u64,
    pub room: u64,
}

/// Buckets of a fresh index (8 of them: 64 entries).
pub const MIN_BUCKETS: u32 = 8;

/// Most buckets a cuckoo search visits before giving up.
const SEARCH_LIMIT: usize = 4096;

/// The reader's lookup over an index's words (bucket 0, the header,
/// first), exactly as the kernel runs it: `hb_common`'s `index::lookup`.
pub fn lookup_in(w: &[AtomicU64], node_id: u32) -> index::Lookup {
    let n = w.len() / ENTRIES;
    index::lookup(node_id, |b| {
        ((b as usize) < n).then(|| {
            // SAFETY: `Bucket` is eight u64s; the words are aligned
            // like buckets (checked in `new`); `find_in` reads each
            // word with one volatile 64-bit load, as atomics are.
            unsafe { &*w[b as usize * ENTRIES..].as_ptr().cast::<Bucket>() }
        })
    })
}

/// A fresh seed for `index::buckets`, from the OS's random number
/// generator (as the master secret, `keys::new_secret`); never 0, which
/// marks an index of a version without a seed.
fn fresh_seed() -> u64 {
    use ring::rand::SecureRandom as _;
    let rng = ring::rand::SystemRandom::new();
    let mut seed = [0u8; 8];
    while u64::from_ne_bytes(seed) == 0 {
        rng.fill(&mut seed)
            // getrandom(2) blocks until the kernel's pool is ready, then
            // does not fail: nothing to recover from here.
            .expect("the system random number generator failed");
    }
    u64::from_ne_bytes(seed)
}

/// The node index. See the module docs.
pub struct NodeIndex<'a> {
    words: Words<'a>,
    /// Buckets in use, minus one.
    mask: u32,
    /// The seed of `index::buckets`, as in the header.
    seed: u64,
    /// Buckets the map holds (besides the header).
    room: u32,
    /// Entries in use.
    len: usize,
}

impl<'a> NodeIndex<'a> {
    /// The index in `words` (bucket 0, the header, first; then `room`
    /// buckets, a power of two). An all-zero index (a fresh map) gets its
    /// header and a fresh seed; one with a header (pinned, adopted) must
    /// fit, and keeps its seed. Either may lack nodes the node state holds
    /// (a pinned one left all-zero or part-filled by a start killed while
    /// it rebuilt it): the node maps' owner completes it from the state.
    pub fn new(words: Words<'a>) -> Result<NodeIndex<'a>, IndexMismatch> {
        let w = words.get();
        let room = (w.len() / ENTRIES).saturating_sub(1) as u64;
        assert!(
            w.len().is_multiple_of(ENTRIES) && room.is_power_of_two(),
            "index of {} words: not 1 + 2^k buckets",
            w.len()
        );
        assert!(
            w.as_ptr().cast::<Bucket>().is_aligned(),
            "index words not aligned like buckets"
        );
        let h = w[0].load(Ordering::Acquire);
        let seed;
        let mask = if h == 0 && w.iter().all(|e| e.load(Ordering::Relaxed) == 0) {
            let mask = (MIN_BUCKETS as u64).min(room) as u32 - 1;
            seed = fresh_seed();
            // The seed before the header word: a reader that sees the mask
            // sees the seed.
            w[index::SEED].store(seed, Ordering::Release);
            w[0].store(index::header(mask, 0), Ordering::Release);
            mask
        } else {
            seed = w[index::SEED].load(Ordering::Acquire);
            if seed == 0 {
                tracing::warn!(
                    "the adopted node index has no seed (pinned by an older hb version): which ids share its buckets is predictable, so with --enroll ids can be chosen to keep a node out of it; remove the pinned maps (losing node state) to start a seeded one"
                );
            }
            let mask = h as u32;
            let buckets = mask as u64 + 1;
            if !buckets.is_power_of_two() || buckets > room {
                return Err(IndexMismatch {
                    found: buckets,
                    room,
                });
            }
            mask
        };
        let mut ix = NodeIndex {
            words,
            mask,
            seed,
            room: room as u32,
            len: 0,
        };
        ix.len = ix.repair();
        Ok(ix)
    }

    /// Makes an adopted index whole again after a writer that stopped
    /// mid-move (the monitor killed during a chain or a doubling): clears
    /// the second copy of a node, entries outside their node's buckets and
    /// anything past the buckets in use, and closes the sequence number.
    /// Returns the entries in use. A no-op on an intact index.
    fn repair(&mut self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut cleared = 0;
        for b in 1..=self.room {
            for p in 0..ENTRIES {
                let e = self.word(b, p).load(Ordering::Relaxed);
                let id = index::entry_id(e);
                if e == 0 {
                    continue;
                }
                let (b1, b2) = index::buckets(id, self.mask, self.seed);
                if b > self.mask + 1 || (b != b1 && b != b2) || !seen.insert(id) {
                    self.word(b, p).store(0, Ordering::Release);
                    cleared += 1;
                }
            }
        }
        let header = &self.w()[0];
        let h = header.load(Ordering::Acquire);
        if (h >> 32) & 1 != 0 {
            header.fetch_add(1 << 32, Ordering::AcqRel);
        }
        if cleared != 0 || (h >> 32) & 1 != 0 {
            tracing::warn!(
                cleared,
                "the adopted node index was left mid-move by its last writer; repaired"
            );
        }
        seen.len()
    }

    /// An index of our own with room for `buckets` buckets (a power of
    /// two).
    pub fn owned(buckets: u32) -> NodeIndex<'static> {
        let words = (0..1 + buckets as usize)
            .map(|_| OwnedBucket::empty())
            .collect();
        NodeIndex::new(Words::Owned(words)).expect("a fresh index has no mismatch")
    }

    fn w(&self) -> &[AtomicU64] {
        self.words.get()
    }

    fn word(&self, bucket: u32, pos: usize) -> &AtomicU64 {
        &self.w()[bucket as usize * ENTRIES + pos]
    }

    /// Buckets in use (besides the header).
    pub fn buckets(&self) -> u32 {
        self.mask + 1
    }

    /// Entries in use: indexed nodes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot of `node_id`.
    pub fn get(&self, node_id: u32) -> Option<u32> {
        // The writer's own view has no moves in flight.
        match self.lookup(node_id) {
            index::Lookup::Found(slot) => Some(slot),
            index::Lookup::Absent | index::Lookup::Busy => None,
        }
    }

    /// The reader's lookup, exactly as the kernel runs it.
    pub fn lookup(&self, node_id: u32) -> index::Lookup {
        lookup_in(self.w(), node_id)
    }

    /// Where `node_id`'s entry is: (bucket, position).
    fn position(&self, node_id: u32) -> Option<(u32, usize)> {
        if node_id == 0 {
            // Every free entry holds id 0: id 0 has no entry.
            return None;
        }
        let (b1, b2) = index::buckets(node_id, self.mask, self.seed);
        [b1, b2].into_iter().find_map(|b| {
            (0..ENTRIES)
                .find(|&p| index::entry_id(self.word(b, p).load(Ordering::Relaxed)) == node_id)
                .map(|p| (b, p))
        })
    }

    fn free_pos(&self, bucket: u32) -> Option<usize> {
        (0..ENTRIES).find(|&p| self.word(bucket, p).load(Ordering::Relaxed) == 0)
    }

    /// Points `node_id` at `slot`: in place if it is indexed, else a new
    /// entry.
    pub fn set(&mut self, node_id: u32, slot: u32) -> Result<(), IndexFull> {
        assert!(node_id != 0, "node id 0 is never indexed");
        if let Some((b, p)) = self.position(node_id) {
            self.word(b, p)
                .store(index::entry(node_id, slot), Ordering::Release);
            return Ok(());
        }
        // At most half full, while there is room to grow.
        if (self.len + 1) * 2 > self.buckets() as usize * ENTRIES && self.buckets() < self.room {
            self.grow();
        }
        self.insert(node_id, slot)?;
        self.len += 1;
        Ok(())
    }

    fn insert(&mut self, node_id: u32, slot: u32) -> Result<(), IndexFull> {
        // The first bucket unless it is full: lookups search it first, so
        // a node there costs the kernel one cache line.
        let (b1, b2) = index::buckets(node_id, self.mask, self.seed);
        for b in [b1, b2] {
            if let Some(p) = self.free_pos(b) {
                self.word(b, p)
                    .store(index::entry(node_id, slot), Ordering::Release);
                return Ok(());
            }
        }
        self.cuckoo(node_id, slot, b1, b2)
    }

    /// Both buckets full: a breadth-first search for a chain of moves that
    /// ends at a free entry, then [`Self::apply`].
    fn cuckoo(&mut self, node_id: u32, slot: u32, b1: u32, b2: u32) -> Result<(), IndexFull> {
        let mut queue = vec![Step {
            bucket: b1,
            parent: None,
            pos: 0,
        }];
        if b2 != b1 {
            queue.push(Step {
                bucket: b2,
                parent: None,
                pos: 0,
            });
        }
        let mut i = 0;
        while i < queue.len() && queue.len() < SEARCH_LIMIT {
            let at = queue[i];
            for p in 0..ENTRIES {
                let id = index::entry_id(self.word(at.bucket, p).load(Ordering::Relaxed));
                let (x1, x2) = index::buckets(id, self.mask, self.seed);
                let alt = if x1 == at.bucket { x2 } else { x1 };
                if alt == at.bucket {
                    continue;
                }
                if let Some(free) = self.free_pos(alt) {
                    self.apply(&queue, i, p, (alt, free), index::entry(node_id, slot));
                    return Ok(());
                }
                queue.push(Step {
                    bucket: alt,
                    parent: Some(i),
                    pos: p,
                });
            }
            i += 1;
        }
        Err(IndexFull(node_id))
    }

    /// Moves the entry at (`queue[i].bucket`, `pos`) to the free `to`, then
    /// each parent's entry that leads there into the place just vacated,
    /// and finally puts `new` into the root's vacated place; all inside an
    /// odd sequence number.
    fn apply(&self, queue: &[Step], mut i: usize, mut pos: usize, mut to: (u32, usize), new: u64) {
        let header = &self.w()[0];
        header.fetch_add(1 << 32, Ordering::AcqRel); // odd: moves under way
        loop {
            let from = (queue[i].bucket, pos);
            let e = self.word(from.0, from.1).load(Ordering::Relaxed);
            // The new place first, then clear the old: never absent.
            self.word(to.0, to.1).store(e, Ordering::Release);
            self.word(from.0, from.1).store(0, Ordering::Release);
            match queue[i].parent {
                None => {
                    self.word(from.0, from.1).store(new, Ordering::Release);
                    break;
                }
                Some(parent) => {
                    to = from;
                    pos = queue[i].pos;
                    i = parent;
                }
            }
        }
        header.fetch_add(1 << 32, Ordering::AcqRel); // even again
    }

    /// Doubles the buckets in use, in place (see the module docs).
    fn grow(&mut self) {
        let old = self.buckets();
        let mask = self.mask * 2 + 1;
        let odd = self.w()[0].fetch_add(1 << 32, Ordering::AcqRel) + (1 << 32);
        // Copy every entry whose place changes into its new bucket (one of
        // the fresh upper half, which only this bucket's entries reach, so
        // there is room).
        let mut moved = Vec::new();
        for b in 1..=old {
            for p in 0..ENTRIES {
                let e = self.word(b, p).load(Ordering::Relaxed);
                let id = index::entry_id(e);
                if id == 0 {
                    continue;
                }
                let (o1, _) = index::buckets(id, self.mask, self.seed);
                let (n1, n2) = index::buckets(id, mask, self.seed);
                let to = if o1 == b { n1 } else { n2 };
                if to != b {
                    let q = self.free_pos(to).expect("a split bucket has room");
                    self.word(to, q).store(e, Ordering::Release);
                    moved.push((b, p));
                }
            }
        }
        // Switch: from now on readers search the new buckets.
        self.w()[0].store(index::header(mask, (odd >> 32) as u32), Ordering::Release);
        self.mask = mask;
        for (b, p) in moved {
            self.word(b, p).store(0, Ordering::Release);
        }
        self.w()[0].fetch_add(1 << 32, Ordering::AcqRel); // even again
    }

    /// Removes `node_id`; returns the slot it pointed at.
    pub fn remove(&mut self, node_id: u32) -> Option<u32> {
        let (b, p) = self.position(node_id)?;
        let e = self.word(b, p).swap(0, Ordering::AcqRel);
        self.len -= 1;
        Some(index::entry_slot(e))
    }

    /// Every (node id, slot), in no particular order.
    pub fn entries(&self) -> Vec<(u32, u32)> {
        self.w()[ENTRIES..ENTRIES * (1 + self.buckets() as usize)]
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .filter(|e| *e != 0)
            .map(|e| (index::entry_id(e), index::entry_slot(e)))
            .collect()
    }
}

/// A bucket the cuckoo search reached by moving the entry at `pos` of its
/// parent's bucket (roots, the new node's own buckets, have none).
#[derive(Clone, Copy)]
struct Step {
    bucket: u32,
    parent: Option<usize>,
    pos: usize,
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };

    use hb_common::maps::index::{self, ENTRIES};

    use super::{IndexFull, IndexMismatch, NodeIndex, OwnedBucket, Words};

    fn seq(ix: &NodeIndex) -> u32 {
        (ix.w()[0].load(Ordering::Relaxed) >> 32) as u32
    }

    /// A deterministic xorshift, for ids that are not sequential.
    fn ids(n: usize, mut x: u64) -> Vec<u32> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = x as u32;
            if id != 0 && seen.insert(id) {
                out.push(id);
            }
        }
        out
    }

    #[test]
    fn a_million_sequential_ids_at_full_capacity() {
        let n = 1u32 << 20;
        let mut ix = NodeIndex::owned(index::buckets_for(n));
        for id in 1..=n {
            ix.set(id, id - 1).unwrap();
        }
        // Chains of moves are rare at the design load (half full).
        let chains = seq(&ix) / 2;
        assert!(chains < n / 1000, "{chains} chains for {n} inserts");
        // Nearly every node sits in its first bucket: one cache line per
        // kernel lookup.
        let first = (1..=n)
            .filter(|&id| {
                let (b1, _) = index::buckets(id, ix.mask, ix.seed);
                (0..ENTRIES).any(|p| index::entry_id(ix.word(b1, p).load(Ordering::Relaxed)) == id)
            })
            .count();
        assert!(
            first as f64 > 0.97 * n as f64,
            "{first} of {n} in their first bucket"
        );
        for id in 1..=n {
            assert_eq!(ix.get(id), Some(id - 1));
        }
        assert_eq!(ix.get(n + 1), None);
        assert_eq!(ix.entries().len(), n as usize);
        eprintln!("{n} ids: {chains} chains, {first} in their first bucket");
    }

    #[test]
    fn random_ids_far_past_the_design_load_still_fit() {
        // 90% full (the design keeps it at 50%): chains of moves happen,
        // and every node stays findable.
        let buckets = 1 << 10;
        let n = buckets as usize * ENTRIES * 9 / 10;
        let mut ix = NodeIndex::owned(buckets);
        let all = ids(n, 0x9e37_79b9_7f4a_7c15);
        for (slot, id) in all.iter().enumerate() {
            ix.set(*id, slot as u32).unwrap();
        }
        assert!(seq(&ix) > 0, "moves were needed at 90%");
        assert_eq!(seq(&ix) % 2, 0, "every chain closed");
        for (slot, id) in all.iter().enumerate() {
            assert_eq!(ix.get(*id), Some(slot as u32), "node {id}");
        }
        assert_eq!(ix.entries().len(), n);
    }

    #[test]
    fn set_in_place_remove_and_reuse() {
        let mut ix = NodeIndex::owned(4);
        ix.set(7, 1).unwrap();
        ix.set(7, 2).unwrap();
        assert_eq!(ix.get(7), Some(2));
        assert_eq!(ix.entries(), vec![(7, 2)]);
        assert_eq!(ix.remove(7), Some(2));
        assert_eq!(ix.remove(7), None);
        assert_eq!(ix.get(7), None);
        ix.set(7, 3).unwrap();
        assert_eq!(ix.get(7), Some(3));
        // Id 0 is what a free entry holds: never found, never removed
        // (it once matched the first free entry: slot 0).
        assert_eq!(ix.lookup(0), index::Lookup::Absent);
        assert_eq!(ix.remove(0), None);
        assert_eq!(ix.entries(), vec![(7, 3)]);
    }

    #[test]
    fn a_full_index_refuses_and_loses_nothing() {
        let mut ix = NodeIndex::owned(1);
        for id in 1..=8 {
            ix.set(id, id).unwrap();
        }
        assert_eq!(ix.set(9, 9), Err(IndexFull(9)));
        for id in 1..=8 {
            assert_eq!(ix.get(id), Some(id));
        }
    }

    /// An index as a monitor left it: its header and seed.
    fn words(buckets: usize, header: u64, seed: u64) -> Box<[OwnedBucket]> {
        let w: Box<[OwnedBucket]> = (0..1 + buckets).map(|_| OwnedBucket::empty()).collect();
        w[0].0[0].store(header, Ordering::Relaxed);
        w[0].0[index::SEED].store(seed, Ordering::Relaxed);
        w
    }

    /// Memory that outlives the test, as the map's mapping outlives the
    /// index: to drop an index and adopt the same words again.
    fn leaked_words(buckets: usize) -> &'static [AtomicU64] {
        let owned: &'static [OwnedBucket] = Box::leak(
            (0..1 + buckets)
                .map(|_| OwnedBucket::empty())
                .collect::<Box<[OwnedBucket]>>(),
        );
        // SAFETY: `OwnedBucket` is `ENTRIES` atomics, no padding.
        unsafe {
            std::slice::from_raw_parts(owned.as_ptr().cast::<AtomicU64>(), owned.len() * ENTRIES)
        }
    }

    /// The attack on an unkeyed index: with 900 nodes in (256 buckets,
    /// 44% full), enroll 16 ids whose two buckets are both among node
    /// 901's two, computed with the seed the attacker `guess`es; then
    /// index 901.
    fn choose_ids_against_901(ix: &mut NodeIndex, guess: u64) -> Result<(), IndexFull> {
        for id in 1..=900 {
            ix.set(id, id).unwrap();
        }
        let mask = ix.buckets() - 1;
        let (p, q) = index::buckets(901, mask, guess);
        let hostile: Vec<u32> = (1_000_000u32..)
            .filter(|&id| {
                let (a, b) = index::buckets(id, mask, guess);
                (a == p || a == q) && (b == p || b == q)
            })
            .take(16)
            .collect();
        for (i, id) in hostile.iter().enumerate() {
            ix.set(*id, 2000 + i as u32).unwrap();
        }
        ix.set(901, 5000)?;
        assert_eq!(ix.get(901), Some(5000));
        Ok(())
    }

    #[test]
    fn ids_chosen_without_the_seed_cannot_keep_a_node_out() {
        // The attacker guesses the unkeyed hash (the seed of older
        // versions) or another seed: the index has its own.
        for guess in [0, 1, 0x9e37_79b9_7f4a_7c15] {
            let mut ix = NodeIndex::owned(1 << 17);
            assert_ne!(ix.seed, guess);
            assert_eq!(
                choose_ids_against_901(&mut ix, guess),
                Ok(()),
                "guess {guess:#x}"
            );
        }
        // The attack is real: an index whose seed the attacker knows (here
        // one pinned by a version without a seed, 0) refuses node 901.
        let mut ix = NodeIndex::new(Words::Owned(words(1 << 17, index::header(7, 0), 0))).unwrap();
        assert_eq!(ix.seed, 0);
        assert_eq!(choose_ids_against_901(&mut ix, 0), Err(IndexFull(901)));
    }

    #[test]
    fn the_seed_stays_with_the_index_through_doubling_and_adoption() {
        let words = leaked_words(1 << 10);
        let mut ix = NodeIndex::new(Words::Mapped(words)).unwrap();
        let seed = ix.seed;
        assert_ne!(seed, 0, "a fresh index is seeded");
        assert_eq!(
            words[index::SEED].load(Ordering::Relaxed),
            seed,
            "in the header"
        );
        for id in 1..=2000 {
            ix.set(id, id).unwrap();
        }
        assert_eq!(ix.buckets(), 512, "doubled six times");
        assert_eq!(words[index::SEED].load(Ordering::Relaxed), seed);
        drop(ix);
        // A restart adopts the pinned map: same seed, every node where the
        // kernel's lookup (which reads the seed from the header) finds it.
        let mut ix = NodeIndex::new(Words::Mapped(words)).unwrap();
        assert_eq!(ix.seed, seed);
        assert_eq!(ix.len(), 2000, "repair found every entry in its buckets");
        for id in 1..=2000 {
            assert_eq!(ix.lookup(id), index::Lookup::Found(id));
        }
        ix.set(2001, 2001).unwrap();
        assert_eq!(ix.get(2001), Some(2001));
        // Each index draws its own.
        assert_ne!(NodeIndex::owned(8).seed, seed);
    }

    #[test]
    fn an_index_without_a_seed_keeps_the_unkeyed_hash() {
        // Pinned by an older version: seed word 0, entries where the
        // unkeyed hash put them. Adopted as is, found as before.
        let mask = 3;
        let w = words(32, index::header(mask, 2), 0);
        for id in [5u32, 6, 7] {
            let (b, _) = index::buckets(id, mask, 0);
            let p = (0..ENTRIES)
                .find(|&p| w[b as usize].0[p].load(Ordering::Relaxed) == 0)
                .unwrap();
            w[b as usize].0[p].store(index::entry(id, id * 10), Ordering::Relaxed);
        }
        let mut ix = NodeIndex::new(Words::Owned(w)).unwrap();
        assert_eq!((ix.seed, ix.len()), (0, 3));
        for id in [5u32, 6, 7] {
            assert_eq!(ix.get(id), Some(id * 10));
        }
        for id in 8..=100 {
            ix.set(id, id * 10).unwrap();
        }
        assert_eq!(ix.buckets(), 32, "doubled three times");
        assert_eq!(ix.seed, 0, "kept through doubling");
        for id in 5..=100 {
            assert_eq!(ix.get(id), Some(id * 10));
        }
    }

    #[test]
    fn an_adopted_index_must_fit_its_map() {
        assert!(NodeIndex::new(Words::Owned(words(4, index::header(3, 6), 1))).is_ok());
        assert!(NodeIndex::new(Words::Owned(words(8, index::header(3, 6), 1))).is_ok());
        let bad = NodeIndex::new(Words::Owned(words(4, index::header(7, 0), 1)));
        assert_eq!(bad.err(), Some(IndexMismatch { found: 8, room: 4 }));
    }

    #[test]
    fn an_index_left_mid_move_is_repaired_on_adoption() {
        // Node a twice (a move's copy not yet cleared), node b outside its
        // buckets, node c past the buckets in use (a doubling's copy),
        // the sequence number odd.
        let (mask, seed) = (3, 0x5eed);
        let w = words(8, index::header(mask, 5), seed);
        let (a, b, c) = (11u32, 12u32, 13u32);
        let (a1, a2) = index::buckets(a, mask, seed);
        w[a1 as usize].0[0].store(index::entry(a, 1), Ordering::Relaxed);
        w[a2 as usize].0[1].store(index::entry(a, 1), Ordering::Relaxed);
        let (b1, b2) = index::buckets(b, mask, seed);
        let elsewhere = (1..=4).find(|x| *x != b1 && *x != b2).unwrap();
        w[elsewhere as usize].0[2].store(index::entry(b, 2), Ordering::Relaxed);
        w[7].0[3].store(index::entry(c, 3), Ordering::Relaxed);
        let mut ix = NodeIndex::new(Words::Owned(w)).unwrap();
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.entries(), vec![(a, 1)]);
        assert_eq!(seq(&ix) % 2, 0, "the sequence number is closed");
        assert_eq!(ix.remove(a), Some(1));
        assert_eq!(ix.get(a), None, "no second copy left behind");
    }

    #[test]
    fn the_table_in_use_grows_with_the_fleet_not_the_room() {
        let mut ix = NodeIndex::owned(1 << 16);
        assert_eq!(ix.buckets(), super::MIN_BUCKETS);
        for id in 1..=10_000 {
            ix.set(id, id).unwrap();
            assert!(
                ix.len() * 2 <= ix.buckets() as usize * ENTRIES,
                "at most half full"
            );
        }
        assert_eq!(ix.buckets(), 4096, "10,000 nodes: 4,096 buckets of 65,536");
        for id in 1..=10_000 {
            assert_eq!(ix.get(id), Some(id));
        }
        assert_eq!(seq(&ix) % 2, 0);
        // Nothing past the buckets in use.
        assert!(
            ix.w()[ENTRIES * (1 + 4096)..]
                .iter()
                .all(|e| e.load(Ordering::Relaxed) == 0)
        );
    }

    #[test]
    fn readers_never_miss_a_node_while_moves_run() {
        // A reader looks up nodes that stay provisioned while the writer
        // fills the index to 95% with others (forcing chains of moves that
        // shuffle the watched nodes too), the way the XDP program reads
        // while the monitor provisions.
        let buckets = 1u32 << 8;
        let total = buckets as usize * ENTRIES * 95 / 100;
        let all = ids(total, 12345);
        let (watched, rest) = all.split_at(64);
        let words = leaked_words(buckets as usize);
        let mut ix = NodeIndex::new(Words::Mapped(words)).unwrap();
        for (i, id) in watched.iter().enumerate() {
            ix.set(*id, i as u32).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let reader = {
            let (stop, ready) = (stop.clone(), ready.clone());
            let watched = watched.to_vec();
            std::thread::spawn(move || {
                let (mut reads, mut misses, mut busy) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    for (i, id) in watched.iter().enumerate() {
                        match super::lookup_in(words, *id) {
                            index::Lookup::Found(s) => assert_eq!(s, i as u32),
                            index::Lookup::Absent => misses += 1,
                            index::Lookup::Busy => busy += 1,
                        }
                        reads += 1;
                    }
                    ready.store(true, Ordering::Relaxed);
                }
                eprintln!("{reads} lookups: {busy} busy (moves kept running), {misses} missed");
                (reads, misses)
            })
        };
        // Bounded: a reader that panics before its first pass is done
        // never sets `ready`, and the test must fail, not hang.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !ready.load(Ordering::Relaxed) {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader never finished its first pass"
            );
            std::thread::yield_now();
        }
        // Fill to 95% and empty again, a few times: the first fill doubles
        // the table five times, every fill runs chains of moves.
        for _ in 0..10 {
            for (i, id) in rest.iter().enumerate() {
                ix.set(*id, 1000 + i as u32).unwrap();
            }
            for id in rest {
                ix.remove(*id).unwrap();
            }
        }
        let moved = seq(&ix) / 2;
        stop.store(true, Ordering::Relaxed);
        let (reads, misses) = reader.join().unwrap();
        assert!(moved > 10, "chains of moves ran: {moved}");
        assert!(reads > 64, "the reader ran: {reads}");
        assert_eq!(
            misses, 0,
            "{misses} of {reads} lookups missed during {moved} chains"
        );
    }
}

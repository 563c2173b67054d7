//! The monitor's node table: which node lives in which dataplane slot, and
//! what the monitor believes about it.
//!
//! Slots are dense indices into the dataplane's state array
//! (`NodeKeys::slot`). The monitor owns their assignment: a new node takes
//! the most recently freed slot, or the next one past the high-water mark,
//! so the tick's scan `0..len()` stays as short as the fleet allows.
//!
//! Per-slot data is kept as parallel arrays (struct of arrays) indexed by
//! slot: the tick touches `node_id` and `track` for every node and the rest
//! only on a transition, so the hot arrays stay small (4 + 16 bytes per
//! node) and the scan allocates nothing.

use std::collections::HashMap;

use hb_common::maps::MAX_NODES;
use serde::Serialize;

use super::state::{Status, Track};

/// Why a node is on this monitor.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Listed in `--nodes`.
    #[default]
    Configured,
    /// Provisioned by `--enroll` after a datagram under its derived key.
    Enrolled,
    /// Found provisioned in pinned maps at start and not (or no longer) in
    /// `--nodes`: kept until the next reload decides.
    Adopted,
}

/// Errors of slot management.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("node id 0 is reserved")]
    ZeroId,
    #[error(
        "the node table is full ({0} nodes: `hb monitor --capacity`, at most {MAX_NODES}; a restart keeps pinned maps at their capacity)"
    )]
    Full(u32),
    #[error("node {0} is already at slot {1}")]
    Exists(u32, u32),
    #[error("slot {slot} wanted by node {node_id} is taken by node {holder}")]
    SlotTaken {
        node_id: u32,
        slot: u32,
        holder: u32,
    },
}

/// The node table. See the module docs.
#[derive(Debug, Default)]
pub struct NodeTable {
    by_id: HashMap<u32, u32>,
    /// Node id at each slot; 0 = free.
    pub(crate) node_id: Vec<u32>,
    pub(crate) track: Vec<Track>,
    pub(crate) origin: Vec<Origin>,
    /// CLOCK_MONOTONIC ns of the last status change (or of provisioning).
    pub(crate) since_ns: Vec<u64>,
    /// Last interval decision written to the dataplane (0 = no opinion).
    pub(crate) requested_ms: Vec<u32>,
    /// When it was decided, ns (0 = never).
    pub(crate) decided_ns: Vec<u64>,
    /// Freed slots, the most recent last. May hold slots taken since by
    /// `insert_at` (and a slot more than once): `pop_free` skips them.
    free: Vec<u32>,
    /// Nodes per status, indexed by `Status as usize`; kept by the tick.
    pub(crate) counts: [u64; 5],
    /// Slots the dataplane has (0 = `MAX_NODES`).
    capacity: u32,
}

impl NodeTable {
    pub fn new() -> NodeTable {
        NodeTable::default()
    }

    /// Limits slots to `0..capacity` (the dataplane's node maps).
    pub fn set_capacity(&mut self, capacity: u32) {
        self.capacity = capacity.min(MAX_NODES);
    }

    /// Slots available.
    pub fn capacity(&self) -> u32 {
        if self.capacity == 0 {
            MAX_NODES
        } else {
            self.capacity
        }
    }

    /// One past the highest slot ever used: the tick scans `0..len()`.
    pub fn len(&self) -> u32 {
        self.node_id.len() as u32
    }

    /// Number of provisioned nodes.
    pub fn nodes(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn slot_of(&self, node_id: u32) -> Option<u32> {
        self.by_id.get(&node_id).copied()
    }

    pub fn contains(&self, node_id: u32) -> bool {
        self.by_id.contains_key(&node_id)
    }

    /// Node ids with their slots, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.by_id.iter().map(|(id, slot)| (*id, *slot))
    }

    pub fn origin(&self, slot: u32) -> Origin {
        self.origin[slot as usize]
    }

    pub fn set_origin(&mut self, slot: u32, origin: Origin) {
        self.origin[slot as usize] = origin;
    }

    pub fn track(&self, slot: u32) -> Track {
        self.track[slot as usize]
    }

    pub fn since_ns(&self, slot: u32) -> u64 {
        self.since_ns[slot as usize]
    }

    /// Nodes per status as of the last tick.
    pub fn count(&self, status: Status) -> u64 {
        self.counts[status as usize]
    }

    /// Last interval decision and when it was made.
    pub fn decision(&self, slot: u32) -> (u32, u64) {
        (
            self.requested_ms[slot as usize],
            self.decided_ns[slot as usize],
        )
    }

    /// Gives `node_id` a slot (a freed one first). Status `unknown`.
    pub fn insert(&mut self, node_id: u32, origin: Origin, now_ns: u64) -> Result<u32, TableError> {
        if node_id == 0 {
            return Err(TableError::ZeroId);
        }
        if let Some(slot) = self.slot_of(node_id) {
            return Err(TableError::Exists(node_id, slot));
        }
        let slot = match self.pop_free() {
            Some(s) => s,
            None => {
                if self.len() >= self.capacity() {
                    return Err(TableError::Full(self.capacity()));
                }
                self.grow(self.len() + 1);
                self.len() - 1
            }
        };
        self.occupy(node_id, slot, origin, Track::default(), now_ns);
        Ok(slot)
    }

    /// Puts `node_id` at a given `slot` (adopting pinned state), with the
    /// given belief.
    pub fn insert_at(
        &mut self,
        node_id: u32,
        slot: u32,
        origin: Origin,
        track: Track,
        now_ns: u64,
    ) -> Result<(), TableError> {
        if node_id == 0 {
            return Err(TableError::ZeroId);
        }
        if slot >= self.capacity() {
            return Err(TableError::Full(self.capacity()));
        }
        if let Some(s) = self.slot_of(node_id) {
            return Err(TableError::Exists(node_id, s));
        }
        if slot < self.len() && self.node_id[slot as usize] != 0 {
            return Err(TableError::SlotTaken {
                node_id,
                slot,
                holder: self.node_id[slot as usize],
            });
        }
        if slot >= self.len() {
            let old = self.len();
            self.grow(slot + 1);
            // Slots skipped over are free.
            self.free.extend((old..slot).rev());
        }
        // A free slot taken here stays on the free list (`pop_free` skips
        // it): removing it there cost a scan of the list per adopted node,
        // quadratic in the fleet when a restart adopts pinned nodes in
        // their index's (random) order.
        self.occupy(node_id, slot, origin, track, now_ns);
        Ok(())
    }

    /// Frees `node_id`'s slot; returns it.
    pub fn remove(&mut self, node_id: u32) -> Option<u32> {
        let slot = self.by_id.remove(&node_id)?;
        let i = slot as usize;
        self.counts[self.track[i].status as usize] =
            self.counts[self.track[i].status as usize].saturating_sub(1);
        self.node_id[i] = 0;
        self.track[i] = Track::default();
        self.origin[i] = Origin::default();
        self.since_ns[i] = 0;
        self.requested_ms[i] = 0;
        self.decided_ns[i] = 0;
        self.free.push(slot);
        Some(slot)
    }

    /// The most recently freed slot that is still free: entries for slots
    /// `insert_at` has taken since are dropped on the way.
    fn pop_free(&mut self) -> Option<u32> {
        while let Some(s) = self.free.pop() {
            if self.node_id[s as usize] == 0 {
                return Some(s);
            }
        }
        None
    }

    fn grow(&mut self, len: u32) {
        let n = len as usize;
        self.node_id.resize(n, 0);
        self.track.resize(n, Track::default());
        self.origin.resize(n, Origin::default());
        self.since_ns.resize(n, 0);
        self.requested_ms.resize(n, 0);
        self.decided_ns.resize(n, 0);
    }

    fn occupy(&mut self, node_id: u32, slot: u32, origin: Origin, track: Track, now_ns: u64) {
        let i = slot as usize;
        self.by_id.insert(node_id, slot);
        self.node_id[i] = node_id;
        self.track[i] = track;
        self.origin[i] = origin;
        self.since_ns[i] = now_ns;
        self.requested_ms[i] = 0;
        self.decided_ns[i] = 0;
        self.counts[track.status as usize] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_and_reused() {
        let mut t = NodeTable::new();
        assert_eq!(t.insert(10, Origin::Configured, 1).unwrap(), 0);
        assert_eq!(t.insert(11, Origin::Configured, 1).unwrap(), 1);
        assert_eq!(t.insert(12, Origin::Configured, 1).unwrap(), 2);
        assert_eq!(t.remove(11), Some(1));
        assert_eq!(t.remove(11), None);
        assert_eq!(
            t.insert(13, Origin::Enrolled, 1).unwrap(),
            1,
            "freed slot reused"
        );
        assert_eq!(t.len(), 3);
        assert_eq!(t.nodes(), 3);
        assert!(matches!(
            t.insert(13, Origin::Configured, 1),
            Err(TableError::Exists(13, 1))
        ));
        assert!(matches!(
            t.insert(0, Origin::Configured, 1),
            Err(TableError::ZeroId)
        ));
        assert_eq!(t.count(Status::Unknown), 3);
    }

    #[test]
    fn slots_stay_within_the_capacity() {
        let mut t = NodeTable::new();
        t.set_capacity(2);
        t.insert(1, Origin::Configured, 1).unwrap();
        t.insert(2, Origin::Configured, 1).unwrap();
        assert!(matches!(
            t.insert(3, Origin::Configured, 1),
            Err(TableError::Full(2))
        ));
        assert!(matches!(
            t.insert_at(4, 2, Origin::Adopted, Track::default(), 1),
            Err(TableError::Full(2))
        ));
        t.remove(1);
        assert_eq!(t.insert(3, Origin::Configured, 1).unwrap(), 0);
    }

    #[test]
    fn adopted_slots_leave_holes_free() {
        let mut t = NodeTable::new();
        t.insert_at(7, 3, Origin::Adopted, Track::default(), 1)
            .unwrap();
        assert_eq!(t.len(), 4);
        assert!(matches!(
            t.insert_at(8, 3, Origin::Adopted, Track::default(), 1),
            Err(TableError::SlotTaken { holder: 7, .. })
        ));
        let mut got: Vec<u32> = (0..3)
            .map(|i| t.insert(100 + i, Origin::Configured, 1).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(t.insert(200, Origin::Configured, 1).unwrap(), 4);
        // insert_at into a free hole.
        t.remove(101);
        let hole = (0..3).find(|s| t.node_id[*s as usize] == 0).unwrap();
        t.insert_at(300, hole, Origin::Adopted, Track::default(), 1)
            .unwrap();
        assert_eq!(t.insert(301, Origin::Configured, 1).unwrap(), 5);
    }

    #[test]
    fn nodes_adopted_in_any_order_leave_exactly_the_holes_free() {
        // A restart adopts pinned nodes in their index's order, which is
        // random; every third slot stays free.
        let n = 30_000u32;
        let mut slots: Vec<u32> = (0..n).filter(|s| s % 3 != 0).collect();
        let mut x = 0x9e37_79b9u32;
        for i in (1..slots.len()).rev() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            slots.swap(i, x as usize % (i + 1));
        }
        let mut t = NodeTable::new();
        for &s in &slots {
            t.insert_at(1_000_000 + s, s, Origin::Adopted, Track::default(), 1)
                .unwrap();
        }
        // Free, then taken again by a later adoption: not handed out.
        t.remove(1_000_000 + slots[0]);
        t.insert_at(500_000, slots[0], Origin::Adopted, Track::default(), 1)
            .unwrap();
        let mut got: Vec<u32> = (0..n / 3)
            .map(|i| t.insert(1 + i, Origin::Configured, 1).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, (0..n).step_by(3).collect::<Vec<_>>());
        assert_eq!(t.insert(2_000_000, Origin::Configured, 1).unwrap(), n);
        assert_eq!(t.nodes() as u32, n + 1);
    }
}

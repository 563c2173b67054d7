//! The kernel dataplane: the XDP gate of `hb-ebpf`, loaded with aya,
//! attached to one or more interfaces, its maps read and written by the
//! monitor.
//!
//! - Maps can be pinned under a directory (`/sys/fs/bpf/hb` for the
//!   monitor), so a restarted monitor re-adopts the node keys and node state
//!   instead of starting blind. The links can be pinned too
//!   (`keep_attached`): the program then keeps gating while the monitor is
//!   down, and a restarted monitor swaps its fresh program into the pinned
//!   link atomically. A start detaches the links kept for interfaces no
//!   longer listed, a monitor in userspace mode every link kept in its pin
//!   directory ([`release_kept_links`]), and a dataplane dropped without
//!   a node provisioned keeps no link: such a gate would only refuse
//!   heartbeats.
//! - Loading and attaching are two steps ([`XdpDataplane::load`],
//!   [`Dataplane::attach`]): the monitor attaches once nothing else of its
//!   start can fail, so a start that fails leaves its interfaces (and a
//!   link an earlier run kept) as they were.
//! - The node maps pinned are one unit (the index leads to slots of the
//!   two state arrays): a start adopts them whole, rebuilds the index from
//!   the state arrays when it is missing or too small for them (and adds
//!   to an adopted one the nodes it lacks: a start killed mid-rebuild
//!   leaves it pinned part-filled), and starts them afresh when the state
//!   arrays are not both there (an earlier layout's, or removed by hand).
//!   The pinned maps without node state are created afresh when they are
//!   not of this hb's shape ([`reconcile_stateless_pins`]).
//! - Node state is read straight from the mmap'ed `HB_NODE_LIVE` and
//!   `HB_NODE_REST` arrays under each node's seqcount (see [`XdpDataplane::read_states`]); node
//!   ids and keys are written into it under the same protocol, and the
//!   node index (`HB_NODE_INDEX`, see [`super::index`]) is written through
//!   its own mapping.
//! - Reports come from the `HB_EVENTS` ring buffer, polled with tokio's
//!   `AsyncFd`.
//!
//! # Why mmap + seqcount for the node state
//!
//! Measured on the team machine (2 cores, kernel 6.18) by the
//! `read_design` test in `tests/tests/veth_dataplane.rs`
//! (`cargo test --release -p hb-tests --test veth_dataplane read_design --
//! --nocapture`), reading the live line (what the tick reads) of every
//! node of a 1,000,000-node map:
//!
//! | method                                    | time for 1M nodes |
//! |-------------------------------------------|------------------:|
//! | mmap + seqcount (this module)             |            9.5 ms |
//! | one `BPF_MAP_LOOKUP_ELEM` per node        |   320 ms (34x)    |
//!
//! (Scaled from 100,000 lookups, in the same run. An earlier design read
//! 128-byte entries: 110-300 ms against 8.1-10.7 s in debug builds on a
//! loaded machine.) The numbers are in [`READ_DESIGN`]. A syscall per node
//! costs a third of a microsecond at best (a third of a second per tick at
//! 1M nodes); a batch lookup saves the per-call overhead but still copies
//! every value through the kernel and needs a key buffer; the mapping reads
//! memory at memory speed, with no syscall at all, and the seqcount makes
//! each copy consistent.
//!
//! # Why two arrays
//!
//! A node's 192 bytes are split in two arrays at the same slot:
//! `HB_NODE_LIVE` (64 bytes: the seqcount and what the detector reads) and
//! `HB_NODE_REST` (128 bytes: id, keys, anti-replay window, counters). The
//! tick reads every node's live line on every tick; in one array of
//! 192-byte entries that read strode over the other two lines, and the
//! hardware fetched lines it did not need (tick at 1M nodes 35.5 ms CPU,
//! `bench_monitor`, loaded machine); over a dense array it streams.
//!
//! # Writers that die holding a node
//!
//! A monitor killed (SIGKILL, OOM) while it writes a node leaves that
//! node's `seqcount` odd in the pinned maps, and perhaps its `keys_seq`
//! too: the kernel then refuses every heartbeat of the node (`contended`),
//! and a reader that waited for the counter to turn even would wait
//! forever. So:
//! - one monitor per pin directory (an `flock` on it, which the kernel
//!   drops however the holder dies): a counter held at start can then only
//!   be a dead writer's or the kernel's, which holds a node for well under
//!   a microsecond;
//! - at start, `NodeMaps::release_dead_writers` releases every counter
//!   that stays held for `SETTLE` (and resets the node if its keys may be
//!   half-written);
//! - every wait on a counter is bounded (`PATIENCE`): a node that stays
//!   held makes its writes fail with an error that says so, and its reads
//!   skipped, counted and logged, never a hang.

use std::{
    ops::Range,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicU64, Ordering, fence},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, IterableMap as _, Map, MapData, MapType, PerCpuArray, RingBuf},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use hb_common::maps::{
    self, Config, LocalAddrs, MAX_NODES, NodeKeys, NodeLive, NodeRest, NodeState, Report, counter,
    index, names,
};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{
    Counters, Dataplane, LiveFn, PREFETCH_AHEAD,
    index::{NodeIndex, Words},
    netlink::XdpAttach,
    prefetch,
};

/// Measured by `tests/tests/veth_dataplane.rs::read_design`; see the module
/// documentation. (mmap + seqcount, one lookup syscall per node), for
/// 1,000,000 nodes, on the team machine.
pub const READ_DESIGN: &str = "mmap+seqcount: 9.5 ms per 1M live lines; \
     BPF_MAP_LOOKUP_ELEM per node: 320 ms per 1M (34x slower)";

/// Default pin directory of the monitor.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/hb";

/// How to attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to skb (generic) mode with a
    /// warning when the driver has no XDP support.
    #[default]
    Native,
    /// Generic mode: works everywhere, slower (runs after skb allocation).
    Skb,
}

/// Options of [`XdpDataplane::open`] and [`XdpDataplane::load`].
#[derive(Clone, Debug, Default)]
pub struct XdpOptions {
    /// Interfaces to attach to (none: loaded only, e.g. for
    /// BPF_PROG_TEST_RUN).
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    /// Pin maps (and links with `keep_attached`) under this directory.
    pub pin_dir: Option<PathBuf>,
    /// Pin the XDP links so the program stays attached when the monitor
    /// exits; re-adopted on start. Needs `pin_dir`.
    pub keep_attached: bool,
    /// Capacity of the node maps (node state slots); default
    /// `MAX_NODES`. Pinned maps keep the capacity they were created with.
    pub max_nodes: Option<u32>,
    /// An eBPF object to load instead of the one embedded in `hb` (A/B
    /// benchmarks of gate variants); it must use this build's map layouts.
    pub object: Option<&'static [u8]>,
    /// The addresses the gate takes heartbeats at, written before the
    /// program is attached (default: any; see `LocalAddrs`).
    pub local_addrs: Option<LocalAddrs>,
    /// The pins this open makes are removed again when the dataplane is
    /// dropped before [`Dataplane::started`] (a caller whose start can
    /// still fail after the open: the monitor). Otherwise (default) they
    /// are kept once the open (or the attach after a `load`) succeeds.
    pub undo_until_started: bool,
}

/// Where and how [`Dataplane::attach`] attaches a loaded gate: what
/// [`XdpOptions`] said, and the interfaces' indexes as the load found
/// them.
struct AttachPlan {
    interfaces: Vec<(String, u32)>,
    mode: AttachMode,
    pin_dir: Option<PathBuf>,
    keep_attached: bool,
}

/// The file descriptor of an array map kept behind a lock (for `memlock`).
fn locked_fd<T: aya::Pod>(m: &Mutex<Array<MapData, T>>) -> std::os::fd::RawFd {
    m.lock()
        .unwrap_or_else(|e| e.into_inner())
        .map()
        .fd()
        .as_fd()
        .as_raw_fd()
}

/// Expected value sizes of the node maps, to refuse pinned ones of
/// another layout ([`check_node_pin`]; the maps without node state are
/// checked, and created afresh, by [`reconcile_stateless_pins`]).
const VALUE_SIZES: [(&str, u32); 3] = [
    (names::NODE_INDEX, size_of::<index::Bucket>() as u32),
    (names::NODE_LIVE, size_of::<NodeLive>() as u32),
    (names::NODE_REST, size_of::<NodeRest>() as u32),
];

/// How long a wait on a node's sequence counter lasts before it gives up
/// ([`Stuck`]). The kernel holds a node for well under a microsecond, and
/// this monitor's own writers (serialized by the index lock) for about as
/// long unless the scheduler takes their CPU mid-write: 50 ms covers a
/// descheduled writer on a loaded machine and costs a tick little if a
/// node ever does stay held.
const PATIENCE: Duration = Duration::from_millis(50);

/// Failed attempts spent spinning before a waiter starts to yield its CPU
/// and watch the clock: a few microseconds, longer than any kernel hold.
const SPINS: u32 = 1 << 10;

/// How long a counter found held at start must stay unchanged to be taken
/// for a dead writer's (see [`NodeMaps::release_dead_writers`]): ten
/// thousand times the kernel's longest hold, waited once per start and
/// only if some counter is held.
const SETTLE: Duration = Duration::from_millis(10);

/// A node whose sequence counter stayed held for writing (odd) for longer
/// than [`PATIENCE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "its sequence counter stayed held for writing (at {seq}) for over {} ms: a monitor killed mid-write leaves this, and the next start of the monitor releases it",
    PATIENCE.as_millis()
)]
struct Stuck {
    /// The counter's last value seen.
    seq: u32,
}

/// A bounded wait on a node's sequence counter: spins ([`SPINS`]) for a
/// writer that is about to release, then yields the CPU (a writer of ours
/// may be waiting for it) until [`PATIENCE`] has passed.
#[derive(Default)]
struct Patience {
    tries: u32,
    since: Option<Instant>,
    /// The previous call already found the time up: one more attempt was
    /// made after that, so a waiter descheduled past the deadline between
    /// its attempt and its look at the clock still tries once more.
    expired: bool,
}

impl Patience {
    /// Called after each failed attempt: whether to try again.
    #[inline]
    fn again(&mut self) -> bool {
        if self.tries < SPINS {
            self.tries += 1;
            std::hint::spin_loop();
            return true;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        let expired = since.elapsed() >= PATIENCE;
        if expired && self.expired {
            return false;
        }
        self.expired = expired;
        std::thread::yield_now();
        true
    }
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array map of `len`
/// values of `T`.
struct Mapping<T> {
    ptr: NonNull<T>,
    len: u32,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through
// the seqcount protocol or atomics.
unsafe impl<T> Send for Mapping<T> {}
unsafe impl<T> Sync for Mapping<T> {}

impl<T> Mapping<T> {
    fn new(map: &MapData, name: &str) -> anyhow::Result<Mapping<T>> {
        let len = map.info()?.max_entries();
        Mapping::shared(len, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd()).with_context(|| {
            format!("mmap of {name} failed (the map must be created with BPF_F_MMAPABLE)")
        })
    }

    /// A zeroed shared anonymous mapping of `len` values: the node maps
    /// without a kernel, for tests.
    #[cfg(test)]
    fn anonymous(len: u32) -> Mapping<T> {
        Mapping::shared(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1).expect("anonymous mmap")
    }

    /// A read-write mapping of `len` values of `fd` (-1: anonymous).
    fn shared(len: u32, flags: i32, fd: i32) -> std::io::Result<Mapping<T>> {
        let page = page_size();
        let bytes = (len as usize * size_of::<T>()).div_ceil(page) * page;
        // SAFETY: a fresh mapping, checked below; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).expect("mmap never returns NULL on success"),
            len,
            bytes,
        })
    }
}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Relaxed atomic loads of `N` words from `src` into a `T`: a copy a racing
/// writer may change under us (the seqcount around it detects that), which
/// plain reads must not race with. Plain moves once compiled.
///
/// # Safety
/// `src` points to a live, 8-byte aligned `T` of `N` 8-byte words whose
/// every bit pattern is valid.
unsafe fn copy_words<T>(src: *const T) -> T {
    let words = size_of::<T>() / 8;
    let mut out = std::mem::MaybeUninit::<T>::uninit();
    let (src, dst) = (src.cast::<AtomicU64>(), out.as_mut_ptr().cast::<u64>());
    for i in 0..words {
        // SAFETY: word `i` of the live `T` (aligned) and of `out`.
        unsafe { *dst.add(i) = (*src.add(i)).load(Ordering::Relaxed) };
    }
    // SAFETY: every byte written; any bit pattern is valid (the caller).
    unsafe { out.assume_init() }
}

/// Plain stores of a `T` to `dst`, word by word as relaxed atomics (the
/// kernel reads concurrently; the seqcount tells it the bytes are in
/// flux).
///
/// # Safety
/// As [`copy_words`], for writing, and the caller holds the node.
unsafe fn store_words<T>(dst: *mut T, v: &T) {
    let words = size_of::<T>() / 8;
    let (src, dst) = ((v as *const T).cast::<u64>(), dst.cast::<AtomicU64>());
    for i in 0..words {
        // SAFETY: word `i` of `v` and of the live `T` (aligned).
        unsafe { (*dst.add(i)).store(*src.add(i), Ordering::Relaxed) };
    }
}

/// The mappings of `HB_NODE_LIVE` and `HB_NODE_REST` and the per-node
/// protocols on them (see `hb_common::maps` and the XDP program's `state`
/// module): a node's seqcount is in its live line, its `keys_seq` in its
/// rest.
struct NodeMaps {
    live: Mapping<NodeLive>,
    rest: Mapping<NodeRest>,
}

/// One node's parts in the mappings.
#[derive(Clone, Copy)]
struct Entry {
    live: *mut NodeLive,
    rest: *mut NodeRest,
}

impl NodeMaps {
    /// Asks for the live line of `slot`, if below `end`.
    #[inline(always)]
    fn prefetch_live(&self, slot: usize, end: u32) {
        if slot < end as usize {
            // In bounds of the mapping (a hint needs no more).
            prefetch(self.live.ptr.as_ptr().wrapping_add(slot));
        }
    }

    fn len(&self) -> u32 {
        self.live.len.min(self.rest.len)
    }

    fn entry(&self, slot: u32) -> Option<Entry> {
        // SAFETY: in bounds of both mappings.
        (slot < self.len()).then(|| unsafe {
            Entry {
                live: self.live.ptr.as_ptr().add(slot as usize),
                rest: self.rest.ptr.as_ptr().add(slot as usize),
            }
        })
    }

    /// Releases the nodes that writers which died holding them left held
    /// (see [`Entry::release_dead_writer`]): every slot whose `seqcount`
    /// or `keys_seq` is odd now and unchanged `settle` later. Run at start
    /// over adopted maps, before anything reads them, with no other
    /// userspace writer (the pin directory's lock): the kernel holds a node
    /// for well under a microsecond, so a count held that long is a dead
    /// writer's. Returns how many nodes were released, and how many of
    /// them were reset.
    fn release_dead_writers(&self, settle: Duration) -> (u32, u32) {
        let held: Vec<(Entry, (u32, u32))> = (0..self.len())
            .filter_map(|slot| {
                let e = self.entry(slot)?;
                let seen = e.seqs();
                ((seen.0 | seen.1) & 1 == 1).then_some((e, seen))
            })
            .collect();
        if held.is_empty() {
            return (0, 0);
        }
        std::thread::sleep(settle);
        let (mut released, mut reset) = (0, 0);
        for (e, seen) in held {
            match e.release_dead_writer(seen) {
                Some(Released::Unlocked) => released += 1,
                Some(Released::Reset) => {
                    released += 1;
                    reset += 1;
                }
                // Moved meanwhile: a live writer (the kernel), not a dead one.
                None => {}
            }
        }
        (released, reset)
    }

    /// Provisions `node_id` at `keys.slot` (see [`Dataplane::upsert_node`]),
    /// with `ix` the node index these maps go with.
    fn upsert(&self, ix: &mut NodeIndex, node_id: u32, keys: &NodeKeys) -> anyhow::Result<()> {
        anyhow::ensure!(node_id != 0, "node id 0 is reserved");
        let Some(to) = self.entry(keys.slot) else {
            bail!(
                "slot {} is beyond the capacity of {} nodes",
                keys.slot,
                self.len()
            );
        };
        let take = |e: Entry, slot: u32| {
            e.lock().map_err(|s| {
                stuck_error(slot, s).context(format!("cannot provision node {node_id}"))
            })
        };
        match ix.get(node_id) {
            // Key rotation: the state stays.
            Some(slot) if slot == keys.slot => {
                if take(to, slot)?.rekey(node_id, keys) {
                    super::log_revoked(node_id);
                }
            }
            Some(old) => {
                // Moved: the state goes along, the index follows, the old
                // slot is freed. Both slots are held before either is
                // written (all or nothing), and the old one throughout, so
                // the state that moves is the last one. Only if the old
                // slot holds this node: an index entry that leads to
                // another node's slot (adopted from maps pinned apart)
                // must not move or free that node.
                let from = match self.entry(old) {
                    Some(e) => Some(take(e, old)?).filter(|h| h.state().node_id == node_id),
                    None => None,
                };
                match from {
                    Some(from) => {
                        let mut s = from.state();
                        let revoked = s.rekey(node_id, keys);
                        take(to, keys.slot)?.replace(|_| s);
                        if revoked {
                            super::log_revoked(node_id);
                        }
                        ix.set(node_id, keys.slot)
                            .expect("an indexed node is updated in place");
                        from.clear();
                    }
                    None => {
                        take(to, keys.slot)?.install(node_id, keys);
                        ix.set(node_id, keys.slot)
                            .expect("an indexed node is updated in place");
                    }
                }
            }
            None => {
                // The state first: the kernel never finds the node before
                // its keys are there.
                take(to, keys.slot)?.install(node_id, keys);
                if let Err(e) = ix.set(node_id, keys.slot) {
                    let e = anyhow!(e).context(format!(
                        "cannot provision node {node_id} in {}",
                        names::NODE_INDEX
                    ));
                    // Unindexed, so only the kernel's brief holds compete.
                    return Err(match to.lock() {
                        Ok(h) => {
                            h.clear();
                            e
                        }
                        Err(s) => e.context(format!("and slot {} keeps its keys: {s}", keys.slot)),
                    });
                }
            }
        }
        Ok(())
    }

    /// The nodes `ix` leads to, with their keys (see
    /// [`Dataplane::provisioned`]). An entry that leads beyond these maps
    /// or to a slot that holds another node (maps pinned apart, or by
    /// other versions) is removed, with one warning for all: its node is
    /// not here, and left in the index it would have a later move of that
    /// node take the other node's state.
    fn adopt(&self, ix: &mut NodeIndex) -> anyhow::Result<Vec<(u32, NodeKeys)>> {
        let mut out = Vec::new();
        let mut stray = Vec::new();
        for (id, slot) in ix.entries() {
            let Some(e) = self.entry(slot) else {
                stray.push(id);
                continue;
            };
            let s = e.read().map_err(|stuck| {
                stuck_error(slot, stuck).context(format!("cannot adopt pinned node {id}"))
            })?;
            if s.node_id == id {
                out.push((id, s.keys(slot)));
            } else {
                stray.push(id);
            }
        }
        if !stray.is_empty() {
            for id in &stray {
                ix.remove(*id);
            }
            tracing::warn!(
                removed = stray.len(),
                kept = out.len(),
                "removed node index entries that led to no node of theirs (a slot beyond the node state, or one holding another node): those nodes start afresh"
            );
        }
        Ok(out)
    }

    /// Makes `ix` lead to every node these maps hold (each slot names its
    /// node): into a fresh index, the index rebuilt from the node state;
    /// into an adopted one, the nodes it lacks added. A start killed while
    /// it rebuilt the index left it pinned with some of the nodes or none
    /// (the loader pins a fresh map before anything fills it), and adopted
    /// as it was, every node it lacked would start afresh, its anti-replay
    /// window and counters lost. A node indexed at this slot is left as it
    /// is; one whose entry leads to a slot that does not hold it has its
    /// entry pointed here; one found at a second slot besides the one its
    /// entry leads to (no writer of ours leaves that) is cleared there.
    /// Returns how many nodes were indexed and how many slots cleared: both
    /// 0 for an index that was whole.
    fn reindex(&self, ix: &mut NodeIndex) -> anyhow::Result<(u32, u32)> {
        let (mut indexed, mut cleared) = (0, 0);
        let id_at = |slot: u32, e: Entry| {
            e.node_id()
                .map_err(|stuck| stuck_error(slot, stuck).context("cannot rebuild the node index"))
        };
        for slot in 0..self.len() {
            let Some(e) = self.entry(slot) else { break };
            let id = id_at(slot, e)?;
            if id == 0 {
                continue;
            }
            let elsewhere = match ix.get(id) {
                Some(at) if at == slot => continue,
                Some(at) => match self.entry(at) {
                    Some(o) => id_at(at, o)? == id,
                    None => false,
                },
                None => false,
            };
            if elsewhere {
                e.lock().map_err(|stuck| stuck_error(slot, stuck))?.clear();
                cleared += 1;
                continue;
            }
            ix.set(id, slot).map_err(|full| {
                anyhow!(full).context(format!("cannot rebuild {}", names::NODE_INDEX))
            })?;
            indexed += 1;
        }
        Ok((indexed, cleared))
    }
}

/// The error of an access to `slot` that found the node held.
#[cold]
fn stuck_error(slot: u32, s: Stuck) -> anyhow::Error {
    anyhow!(s).context(format!("node slot {slot}"))
}

impl Entry {
    fn seqcount(self) -> &'static AtomicU32 {
        // SAFETY: `seqcount` is an aligned u32 in a live shared mapping
        // that outlives every caller (dropped with the dataplane).
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.live).seqcount)) }
    }

    fn keys_seq(self) -> &'static AtomicU32 {
        // SAFETY: as `seqcount`.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.rest).keys_seq)) }
    }

    /// The node's `seqcount` and `keys_seq`, as they are now.
    fn seqs(self) -> (u32, u32) {
        (
            self.seqcount().load(Ordering::Acquire),
            self.keys_seq().load(Ordering::Acquire),
        )
    }

    /// Runs `copy` until it saw the node stable: retried while a writer
    /// holds it (odd count) or wrote during the copy (count changed), for
    /// at most [`PATIENCE`].
    #[inline]
    fn consistent<T>(self, copy: impl Fn() -> T) -> Result<T, Stuck> {
        let sc = self.seqcount();
        let mut wait = Patience::default();
        loop {
            let s1 = sc.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let v = copy();
                fence(Ordering::Acquire);
                if sc.load(Ordering::Relaxed) == s1 {
                    return Ok(v);
                }
            }
            if !wait.again() {
                return Err(Stuck {
                    seq: sc.load(Ordering::Relaxed),
                });
            }
        }
    }

    /// A consistent copy of the node's live line: one cache line of a
    /// dense array.
    #[inline]
    fn read_live(self) -> Result<NodeLive, Stuck> {
        // SAFETY: a live, aligned map value of plain integers.
        self.consistent(|| unsafe { copy_words(self.live) })
    }

    /// The node's id, read consistently: without copying the rest of it
    /// (a start reads every slot's, [`NodeMaps::reindex`]).
    fn node_id(self) -> Result<u32, Stuck> {
        // SAFETY: as `keys_seq`; a relaxed atomic load, as `copy_words`
        // reads.
        let id = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.rest).node_id)) };
        self.consistent(|| id.load(Ordering::Relaxed))
    }

    /// A consistent copy of the whole node.
    fn read(self) -> Result<NodeState, Stuck> {
        self.consistent(|| self.copy())
    }

    /// A copy of the whole node as it stands (consistent only if the
    /// caller holds it, or checks the seqcount around it: `read`).
    fn copy(self) -> NodeState {
        // SAFETY: live, aligned map values of plain integers.
        let (live, rest) = unsafe { (copy_words(self.live), copy_words(self.rest)) };
        NodeState::from_parts(&live, &rest)
    }

    /// Takes the node with the kernel's write protocol (compare-and-
    /// exchange even to odd), waiting at most [`PATIENCE`] for whoever
    /// holds it. The kernel holds a node for well under a microsecond, so
    /// spinning is fine.
    fn lock(self) -> Result<Held, Stuck> {
        let sc = self.seqcount();
        let mut wait = Patience::default();
        loop {
            let s = sc.load(Ordering::Relaxed);
            if s & 1 == 0
                && sc
                    .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return Ok(Held {
                    entry: self,
                    seq: s + 1,
                });
            }
            if !wait.again() {
                return Err(Stuck {
                    seq: sc.load(Ordering::Relaxed),
                });
            }
        }
    }

    fn unlock(self) {
        self.seqcount().fetch_add(1, Ordering::Release);
    }

    /// [`Dataplane::set_monitor_status`]: only userspace reads and writes
    /// these fields (the kernel never does), so plain atomic stores
    /// outside the seqcount protocol, as `requested_interval_ms`. A
    /// monitor killed between the two leaves the time of the other
    /// status: only `state_for_ms` after the next start would show it.
    /// Whole writes of the node keep the record where the node goes
    /// (`rekey`, a move) and zero it where a node starts afresh
    /// (`install`, `clear`, a reset by `release_dead_writer`).
    fn set_monitor_status(self, status: u32, since_ns: u64) {
        // SAFETY: an aligned u64 and u32 in a live shared mapping.
        let (since, st) = unsafe {
            (
                AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.rest).monitor_status_since_ns)),
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.rest).monitor_status)),
            )
        };
        since.store(since_ns, Ordering::Relaxed);
        st.store(status, Ordering::Relaxed);
    }

    /// Releases the node if a writer that died holding it left it so:
    /// `seen` (its `seqcount` and `keys_seq`, one of them odd) was read
    /// [`SETTLE`] ago and neither has moved since. Only right when no
    /// other process writes these maps (the pin directory's lock).
    ///
    /// Every write of a node's data by this module (`replace`, `rekey`)
    /// happens with `keys_seq` odd, inside the `seqcount` hold:
    /// - `seqcount` odd, `keys_seq` even: the writer died before it wrote
    ///   anything or after it wrote everything, so the node is whole (the
    ///   old one or the new one); releasing the count is the whole repair.
    /// - `keys_seq` odd: the writer died mid-write. Its id, keys, replay
    ///   window and counters may mix two versions, e.g. a rotation that
    ///   wrote an epoch and its valid bit but not the key yet pairs the
    ///   new epoch with the retired key (which whoever forced the rotation
    ///   may hold), and a half-copied window can let replays through. None
    ///   of that is trusted: the node is reset to a fresh state without
    ///   keys, as a newly provisioned one. Only `node_id` is kept: it
    ///   shares an 8-byte word with `keys_seq`, written whole, so it is
    ///   either the old id or the new one, never torn, and it keeps the
    ///   slot matching the node index ([`XdpDataplane::provisioned`]
    ///   adopts the node). The node is then refused (`bad_epoch`) until
    ///   the monitor installs its keys again, which it does on start for
    ///   every adopted node. The monitor's record of its status goes too
    ///   (`monitor_status`, 0): nothing heard from the fresh state, the
    ///   node is adopted `unknown` and joins again on its next heartbeat.
    ///
    /// Both counters end on the next even value, so a reader that saw the
    /// old one retries.
    fn release_dead_writer(self, seen: (u32, u32)) -> Option<Released> {
        let (sc, ks) = (self.seqcount(), self.keys_seq());
        if self.seqs() != seen {
            return None;
        }
        let seq = if seen.0 & 1 == 1 {
            // The dead writer's hold, taken over: nobody else can take an
            // odd count.
            seen.0
        } else {
            // `keys_seq` odd under an even `seqcount`: no writer of ours
            // leaves that, but the repair is the same; take the node first.
            sc.compare_exchange(seen.0, seen.0 + 1, Ordering::Acquire, Ordering::Relaxed)
                .ok()?;
            seen.0 + 1
        };
        let done = if seen.1 & 1 == 1 {
            // SAFETY: we hold the node (and `keys_seq` is odd); aligned
            // values of a live mapping.
            unsafe {
                let node_id = std::ptr::read_volatile(std::ptr::addr_of!((*self.rest).node_id));
                let rest = NodeRest {
                    keys_seq: seen.1,
                    node_id,
                    ..NodeRest::default()
                };
                let live = NodeLive {
                    seqcount: seq,
                    ..NodeLive::default()
                };
                store_words(self.rest, &rest);
                store_words(self.live, &live);
            }
            ks.fetch_add(1, Ordering::Release);
            Released::Reset
        } else {
            Released::Unlocked
        };
        sc.fetch_add(1, Ordering::Release);
        Some(done)
    }
}

/// What [`Entry::release_dead_writer`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Released {
    /// Released the count; the node was whole.
    Unlocked,
    /// Reset the node (its id kept): its keys may have been half-written.
    Reset,
}

/// A node held for writing ([`Entry::lock`]), released when dropped: a
/// panic in `replace`'s closure never leaves it held.
struct Held {
    entry: Entry,
    /// The odd count we hold it at.
    seq: u32,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.entry.unlock();
    }
}

impl Held {
    /// The node as it is (we hold it: only the kernel's atomic counter
    /// adds change it meanwhile).
    fn state(&self) -> NodeState {
        self.entry.copy()
    }

    /// Replaces the node by `f(copy)`, with `keys_seq` odd around the
    /// write because the id and keys may change. For whole changes of the
    /// slot (a node installed, moved or removed): a concurrent atomic
    /// `bad_tag` increment of the kernel may be lost, which is what a reset
    /// means anyway.
    fn replace(self, f: impl FnOnce(NodeState) -> NodeState) {
        // Before `keys_seq` turns odd: if `f` panics, dropping `self`
        // releases a node nobody wrote.
        let mut v = f(self.state());
        let e = self.entry;
        let ks = e.keys_seq();
        let kseq = ks.fetch_add(1, Ordering::AcqRel) + 1;
        v.seqcount = self.seq;
        v.keys_seq = kseq;
        // SAFETY: we hold the node (and `keys_seq` is odd); both sequence
        // numbers are written with the values they have now (odd), so no
        // reader and no kernel key read ever sees an even count on a
        // half-written node.
        unsafe {
            store_words(e.rest, v.rest());
            store_words(e.live, v.live());
        }
        ks.fetch_add(1, Ordering::Release);
    }

    /// Installs `node_id` with `keys` with a fresh state.
    fn install(self, node_id: u32, keys: &NodeKeys) {
        self.replace(|_| {
            let mut s = NodeState::default();
            s.set_keys(node_id, keys);
            s
        });
    }

    /// Frees the slot.
    fn clear(self) {
        self.replace(|_| NodeState::default());
    }

    /// Replaces the node's id and keys (key rotation), keeping the state
    /// but for what a revoked epoch set (`hb_common::maps::rekey`, whose
    /// fields these are): writes only those fields, so nothing the kernel
    /// counts meanwhile is lost. Returns whether the rotation revoked the
    /// key of the node's newest accepted datagram.
    fn rekey(self, node_id: u32, keys: &NodeKeys) -> bool {
        let ks = self.entry.keys_seq();
        ks.fetch_add(1, Ordering::AcqRel);
        let (l, r) = (self.entry.live, self.entry.rest);
        // SAFETY: we hold the node (and `keys_seq` is odd); aligned fields
        // of a live mapping. The kernel writes these only while holding
        // the node.
        let revoked = unsafe {
            let accepted = std::ptr::read_volatile(std::ptr::addr_of!((*r).accepted_epoch));
            let old = NodeKeys {
                slot: 0,
                epoch: std::ptr::read_volatile(std::ptr::addr_of!((*r).key_epoch)),
                valid: std::ptr::read_volatile(std::ptr::addr_of!((*r).key_valid)),
                _pad: 0,
                key: std::ptr::read_volatile(std::ptr::addr_of!((*r).key)),
            };
            let revoked = maps::epoch_revoked(accepted, &old, keys);
            if revoked {
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*l).generation), 0);
                let flags = std::ptr::read_volatile(std::ptr::addr_of!((*l).flags));
                std::ptr::write_volatile(
                    std::ptr::addr_of_mut!((*l).flags),
                    flags & !maps::NODE_LEFT_BEFORE,
                );
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*r).max_seq), 0);
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*r).replay_bitmap), 0);
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*r).accepted_epoch), 0);
            }
            revoked
        };
        // SAFETY: as above.
        unsafe {
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*r).node_id), node_id);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*r).key_epoch), keys.epoch);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*r).key_valid), keys.valid);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*r).key), keys.key);
        }
        ks.fetch_add(1, Ordering::Release);
        revoked
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// An interface the program is attached to.
struct Attached {
    ifname: String,
    /// The interface's index when attached: another index under the same
    /// name is another interface (deleted and created again), without the
    /// program.
    ifindex: u32,
    /// Its name at the last check: it may be renamed since.
    name_now: Mutex<String>,
    /// How it is attached: `native`, `skb`, or `kept` (a re-adopted link
    /// whose mode rtnetlink did not tell).
    mode: &'static str,
    link: XdpLinkId,
    pin: Option<PathBuf>,
    /// A re-adopted link's program of the earlier run, held until the
    /// attach is through: one that fails on a later interface puts it
    /// back (swapped out and not held, the kernel frees it). `Err`: why it
    /// could not be held (reopening a program by id needs CAP_SYS_ADMIN,
    /// which the README's unit does not give). `None`: not re-adopted.
    previous: Option<Result<std::os::fd::OwnedFd, String>>,
}

/// The XDP gate.
pub struct XdpDataplane {
    ebpf: Mutex<Ebpf>,
    /// The node index, written through `index_map`'s mapping. Declared
    /// before it: dropped first, as it borrows the mapping.
    index: Mutex<NodeIndex<'static>>,
    index_map: Mapping<index::Bucket>,
    /// The index as a map (for `memlock`).
    index_fd: MapData,
    counters: PerCpuArray<MapData, u64>,
    config: Mutex<Array<MapData, Config>>,
    local_addrs: Mutex<Array<MapData, LocalAddrs>>,
    nodes: NodeMaps,
    /// The live array as a map (for `memlock` and the per-node lookup
    /// used to measure the read design).
    live_map: Array<MapData, NodeLive>,
    /// The rest array as a map (for `memlock`).
    rest_fd: MapData,
    events: Option<RingBuf<MapData>>,
    reports_task: Option<tokio::task::JoinHandle<()>>,
    attached: Mutex<Vec<Attached>>,
    /// What [`Dataplane::attach`] is to do; taken by it (it attaches
    /// once).
    plan: Mutex<Option<AttachPlan>>,
    /// [`XdpOptions::undo_until_started`].
    undo_until_started: bool,
    /// The kernel's id of `hb_xdp`: what an interface it is attached to
    /// reports ([`Dataplane::check_attached`]).
    prog_id: u32,
    keep_attached: bool,
    /// Reads skipped because a node stayed held ([`Stuck`]).
    stuck_reads: AtomicU64,
    /// What this start pinned, removed if it fails ([`UndoPins`]): before
    /// `_pin_lock` (fields drop in order), after `Drop::drop` detached.
    undo: Mutex<Option<UndoPins>>,
    /// The pin directory, locked for this process ([`lock_pin_dir`]).
    _pin_lock: Option<std::fs::File>,
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name).ok_or_else(|| {
        anyhow!(
            "the embedded eBPF object has no map {name}: hb was built from a mismatched hb-ebpf"
        )
    })
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let p = ebpf.program_mut(name).ok_or_else(|| {
        anyhow!(
            "the embedded eBPF object has no program {name}: hb was built from a mismatched hb-ebpf"
        )
    })?;
    p.try_into()
        .map_err(|e| anyhow!("program {name} is not an XDP program: {e}"))
}

/// Whether `path` is on a bpf filesystem (bpffs), the only place BPF
/// objects can be pinned.
fn on_bpffs(path: &Path) -> bool {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    statfs(path).is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf if it is not mounted, and creates `dir`,
/// which must be on a bpf filesystem: elsewhere every pin fails (with
/// EPERM, which reads as missing privileges). Refused before anything is
/// created, as far as `dir` exists. A relative `dir` is the current
/// directory's.
fn ensure_pin_dir(dir: &Path) -> anyhow::Result<()> {
    // Its ancestors must end at `/`, not at an empty path that exists
    // nowhere (a relative directory under bpffs was refused).
    let dir = &std::path::absolute(dir)
        .with_context(|| format!("cannot resolve pin directory {}", dir.display()))?;
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !on_bpffs(root) {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (src, tgt, fs) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
        // SAFETY: valid NUL-terminated strings.
        let rc =
            unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("bpffs is not mounted on /sys/fs/bpf and mounting it failed (run as root, or `mount -t bpf bpf /sys/fs/bpf`)");
        }
        tracing::info!(path = "/sys/fs/bpf", "mounted bpffs");
    }
    // The deepest part of `dir` that exists decides: what is created
    // under it is on its filesystem.
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !on_bpffs(existing) {
        bail!(
            "pin directory {} is not on a bpf filesystem ({} is not): BPF maps and links can be pinned only there; give a --pin-dir under /sys/fs/bpf, or mount one first (`mount -t bpf bpf DIR`)",
            dir.display(),
            existing.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create pin directory {}", dir.display()))
}

/// The pins a start makes in its pin directory, removed again if it
/// fails (on drop, unless [`UndoPins::keep`]): the maps of a start that
/// never ran (another XDP program on an interface, say) would otherwise be
/// adopted by the next start, with the capacity they were made with, and
/// a link kept for one interface would stay attached. Drop it after the
/// dataplane (declared before it), whose own drop detaches its links.
struct UndoPins {
    dir: PathBuf,
    /// The directory did not exist before this start.
    made: bool,
    before: std::collections::HashSet<std::ffi::OsString>,
    armed: bool,
    /// The pin directory's lock ([`lock_pin_dir`]), held until the pins
    /// are undone: another monitor starting meanwhile would take them for
    /// pins that were there.
    lock: Option<std::fs::File>,
}

impl UndoPins {
    fn new(dir: &Path, made: bool, lock: &std::fs::File) -> anyhow::Result<UndoPins> {
        let before = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read pin directory {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("cannot read pin directory {}", dir.display()))?;
        Ok(UndoPins {
            dir: dir.to_owned(),
            made,
            before,
            armed: true,
            // The same open file: its flock.
            lock: Some(
                lock.try_clone()
                    .context("cannot hold the pin directory's lock")?,
            ),
        })
    }

    /// The start succeeded: its pins stay.
    fn keep(&mut self) {
        self.armed = false;
        self.lock = None;
    }
}

impl Drop for UndoPins {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(pin_dir = %self.dir.display(), error = %e, "the start failed, and the pins it made could not be listed to remove them");
                return;
            }
        };
        let (mut removed, mut left) = (Vec::new(), Vec::new());
        for e in entries.flatten() {
            let name = e.file_name();
            if self.before.contains(&name) {
                continue;
            }
            let name = name.to_string_lossy().into_owned();
            match std::fs::remove_file(e.path()) {
                Ok(()) => removed.push(name),
                Err(_) => left.push(name),
            }
        }
        if self.made {
            let _ = std::fs::remove_dir(&self.dir);
        }
        if !left.is_empty() {
            tracing::warn!(pin_dir = %self.dir.display(), left = %left.join(","), "the start failed, and some pins it made could not be removed: the next start adopts them");
        }
        if !removed.is_empty() {
            tracing::info!(pin_dir = %self.dir.display(), removed = %removed.join(","), "the start failed: removed the pins it made");
        }
    }
}

/// Takes the pin directory for this process ([`crate::dirlock`]): one
/// monitor per pin directory. What a start repairs in adopted maps (node
/// counters left held, [`NodeMaps::release_dead_writers`]; an index left
/// mid-move, [`NodeIndex`]) it takes for a dead writer's, which is only
/// right if no other monitor is writing the same maps.
fn lock_pin_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    crate::dirlock::lock(
        dir,
        "pin directory",
        &format!(
            "another hb monitor is using the pin directory {}: stop it first, or give this one its own --pin-dir",
            dir.display()
        ),
    )
}

/// Node maps pinned by hb versions before the split of the node state
/// (`HB_NODE_STATE`, one array of 192-byte states, with the node index)
/// or before the node index (`HB_NODE_KEYS`, a hash map of keys, with
/// `HB_NODE_STATE` of 128-byte states): this version cannot read them.
const OLD_PINS: [&str; 2] = ["HB_NODE_KEYS", "HB_NODE_STATE"];

/// The pinned maps that hold no node state, and what this hb creates them
/// as: name, type, value size, entries (keys are u32 indexes; no flags).
const STATELESS_MAPS: [(&str, MapType, u32, u32); 3] = [
    (
        names::COUNTERS,
        MapType::PerCpuArray,
        size_of::<u64>() as u32,
        counter::LEN,
    ),
    (
        names::CONFIG,
        MapType::Array,
        size_of::<Config>() as u32,
        maps::CONFIG_LEN,
    ),
    (
        names::LIMITS,
        MapType::PerCpuArray,
        size_of::<maps::RateLimit>() as u32,
        maps::LIMITS_LEN,
    ),
];

/// Removes the pins in `dir` of maps that hold no node state (the gate's
/// counters, its configuration, the report rate limit) when they are not
/// what this hb creates (another hb version's): they are created afresh
/// (the counters start over, the configuration is written at every
/// start). Adopted as they were, a map of another shape was used by the
/// new gate as if it fitted: a rate limit with fewer buckets suppressed
/// every report of the missing one.
fn reconcile_stateless_pins(dir: &Path) -> anyhow::Result<()> {
    for (name, map_type, value_size, entries) in STATELESS_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = pinned_map_info(&path)?;
        let found = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        if found == (Some(map_type), 4, value_size, entries, 0) {
            continue;
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        tracing::warn!(
            pin = %path.display(),
            found = ?found,
            expected = ?(map_type, 4, value_size, entries, 0),
            "a pinned map of another shape (another hb version's; it holds no node state) was removed and is created afresh"
        );
    }
    Ok(())
}

/// The node maps: the index, and the two state arrays it leads to. One
/// unit: pinned apart they mean nothing.
const NODE_MAPS: [&str; 3] = [names::NODE_INDEX, names::NODE_LIVE, names::NODE_REST];

/// What [`reconcile_node_pins`] left of the node maps pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodePins {
    /// Nothing to do: none pinned (created afresh), or all three, which
    /// fit one another (adopted).
    AsTheyAre,
    /// The state arrays are adopted (`capacity` slots each), and the
    /// index, not pinned any more, is created afresh and rebuilt from the
    /// nodes they hold ([`NodeMaps::reindex`]).
    RebuildIndex { capacity: u32 },
}

/// What the kernel says of the map pinned at `path`.
fn pinned_map_info(path: &Path) -> anyhow::Result<aya::maps::MapInfo> {
    aya::maps::MapInfo::from_pin(path)
        .with_context(|| format!("cannot read the pinned map {}", path.display()))
}

/// `max_entries` of the map pinned at `path`.
fn pinned_max_entries(path: &Path) -> anyhow::Result<u32> {
    Ok(pinned_map_info(path)?.max_entries())
}

/// Makes the node maps pinned in `dir` one unit again, before they are
/// loaded:
/// - maps of an earlier layout ([`OLD_PINS`]) are removed, and the node
///   maps pinned with them too (an index pinned beside `HB_NODE_STATE`
///   leads into that array, not into this version's): node state starts
///   afresh;
/// - so it does when the state arrays are not both pinned (the index
///   would lead into empty arrays, or one array would be adopted with
///   the other empty);
/// - the state arrays pinned without an index, or with an index too small
///   for them (it could not take as many nodes as they have slots), keep
///   their nodes: the index is created afresh and rebuilt from them.
///
/// One warning says what was removed and why.
fn reconcile_node_pins(dir: &Path) -> anyhow::Result<NodePins> {
    let pinned = |name: &&str| dir.join(name).exists();
    let old = OLD_PINS.iter().any(pinned);
    let [index, live, rest] = NODE_MAPS.map(|n| pinned(&n));
    let remove = |why: &str| -> anyhow::Result<NodePins> {
        let gone: Vec<&str> = OLD_PINS
            .iter()
            .chain(&NODE_MAPS)
            .copied()
            .filter(|n| pinned(n))
            .collect();
        for name in &gone {
            let path = dir.join(name);
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        tracing::warn!(
            pin_dir = %dir.display(),
            removed = %gone.join(","),
            reason = why,
            "removed pinned node maps: node state starts afresh, every node rejoins on its next heartbeat"
        );
        Ok(NodePins::AsTheyAre)
    };
    if old {
        return remove("maps of an earlier hb version (another layout)");
    }
    if !(live && rest) {
        return if index || live || rest {
            remove("not all there (the node index goes with both state arrays)")
        } else {
            Ok(NodePins::AsTheyAre)
        };
    }
    for (name, value_size) in VALUE_SIZES {
        if pinned(&name) {
            check_node_pin(dir, name, value_size)?;
        }
    }
    let capacity = pinned_max_entries(&dir.join(names::NODE_LIVE))?;
    let want = index::buckets_for(capacity);
    if index {
        let path = dir.join(names::NODE_INDEX);
        let room = pinned_max_entries(&path)?.saturating_sub(1);
        if room.is_power_of_two() && room >= want {
            return Ok(NodePins::AsTheyAre);
        }
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        tracing::warn!(
            pin = %path.display(),
            buckets = room,
            needed = want,
            capacity,
            "the pinned node index does not fit the pinned node state (too small for its capacity): rebuilding it from the node state"
        );
    } else {
        tracing::warn!(
            pin_dir = %dir.display(),
            capacity,
            "the pinned node state has no pinned node index beside it: rebuilding the index from the node state"
        );
    }
    Ok(NodePins::RebuildIndex { capacity })
}

/// `BPF_F_MMAPABLE` (uapi `linux/bpf.h`): the node maps are created with
/// it, and read and written through their mappings.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Refuses the node map `name` pinned in `dir` unless it is what this hb
/// creates: an array (keys of 4 bytes) of `value_size`-byte values,
/// mappable. Adopted as it was, one of another type or flags failed later
/// and obscurely (the mapping of a map without `BPF_F_MMAPABLE` fails),
/// or was read as if it fitted. It holds node state: not removed, but
/// named, with what differs and what to do.
fn check_node_pin(dir: &Path, name: &str, value_size: u32) -> anyhow::Result<()> {
    let path = dir.join(name);
    let info = pinned_map_info(&path)?;
    let mut differs = Vec::new();
    match info.map_type() {
        Ok(MapType::Array) => {}
        Ok(t) => differs.push(format!("type {t:?}, expected Array")),
        Err(_) => differs.push("a type this hb does not know, expected Array".to_owned()),
    }
    if info.key_size() != 4 {
        differs.push(format!("keys of {} bytes, expected 4", info.key_size()));
    }
    if info.value_size() != value_size {
        differs.push(format!(
            "values of {} bytes, expected {value_size}",
            info.value_size()
        ));
    }
    if info.map_flags() != BPF_F_MMAPABLE {
        differs.push(format!(
            "flags {:#x}, expected {BPF_F_MMAPABLE:#x} (BPF_F_MMAPABLE)",
            info.map_flags()
        ));
    }
    if differs.is_empty() {
        return Ok(());
    }
    bail!(
        "pinned map {name} is not what this hb creates ({}): it was left by another hb version \
         or made by hand; remove {} (losing node state) or run the matching version",
        differs.join("; "),
        dir.display()
    )
}

/// The XDP links kept in `dir` (`link_IF`), with the interface each was
/// kept on, by name.
fn kept_links(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut links = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(ifname) = name.to_str().and_then(|n| n.strip_prefix("link_")) {
            links.push((ifname.to_owned(), entry.path()));
        }
    }
    links.sort();
    Ok(links)
}

/// A `bpf(2)` call with `attr` (the command's part of `union bpf_attr`);
/// its result, or the error.
///
/// # Safety
/// `T` is `repr(C)` and lays out the leading fields of `union bpf_attr`
/// for `cmd`; any pointer in it is valid for what `cmd` does with it.
unsafe fn bpf_call<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's; the size is given, so the kernel reads no more
    // than `attr`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *const T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A descriptor of the BPF object pinned at `pin` (`BPF_OBJ_GET`).
fn open_pinned(pin: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .with_context(|| format!("{} contains NUL", pin.display()))?;
    // SAFETY: `bpf_attr`'s layout for BPF_OBJ_GET; `path` outlives the
    // call.
    let fd = unsafe {
        bpf_call(
            BPF_OBJ_GET,
            &ObjGet {
                pathname: path.as_ptr() as u64,
                bpf_fd: 0,
                file_flags: 0,
            },
        )
    }
    .with_context(|| format!("cannot open the pinned XDP link {}", pin.display()))?;
    // SAFETY: a descriptor the kernel just gave us, owned from here.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The index of the interface the XDP link pinned at `pin` is attached
/// to; 0 once the kernel released it (its interface went away).
fn pinned_link_ifindex(pin: &Path) -> anyhow::Result<u32> {
    pinned_link_info(pin).map(|(ifindex, _)| ifindex)
}

/// A descriptor of the program the XDP link pinned at `pin` runs.
fn pinned_link_program(pin: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    #[repr(C)]
    struct GetFdById {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let (_, prog_id) = pinned_link_info(pin)?;
    // SAFETY: `bpf_attr`'s layout for BPF_PROG_GET_FD_BY_ID.
    let fd = unsafe {
        bpf_call(
            BPF_PROG_GET_FD_BY_ID,
            &GetFdById {
                prog_id,
                next_id: 0,
                open_flags: 0,
            },
        )
    }
    .with_context(|| format!("cannot open program {prog_id} of {}", pin.display()))?;
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Puts `prog` into the XDP link pinned at `pin` (`BPF_LINK_UPDATE`).
fn update_pinned_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let fd = open_pinned(pin)?;
    // SAFETY: `bpf_attr`'s layout for BPF_LINK_UPDATE.
    unsafe {
        bpf_call(
            BPF_LINK_UPDATE,
            &LinkUpdate {
                link_fd: fd.as_raw_fd() as u32,
                new_prog_fd: prog.as_raw_fd() as u32,
                flags: 0,
                old_prog_fd: 0,
            },
        )
    }
    .with_context(|| format!("cannot update the XDP link {}", pin.display()))?;
    Ok(())
}

/// The index of the interface the XDP link pinned at `pin` is attached
/// to (0 once the kernel released it), and the id of the program it runs.
fn pinned_link_info(pin: &Path) -> anyhow::Result<(u32, u32)> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    /// `struct bpf_link_info` up to its `xdp.ifindex` (the union starts
    /// 8-aligned, at 16): the kernel copies no more than it is given.
    #[repr(C, align(8))]
    #[derive(Default)]
    struct LinkInfo {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        xdp_ifindex: u32,
        _rest: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    /// `BPF_LINK_TYPE_XDP`.
    const LINK_TYPE_XDP: u32 = 6;
    let fd = open_pinned(pin)?;
    let mut info = LinkInfo::default();
    // SAFETY: `bpf_attr`'s layout for BPF_OBJ_GET_INFO_BY_FD; the kernel
    // writes at most `info_len` bytes to `info`, which outlives the call.
    unsafe {
        bpf_call(
            BPF_OBJ_GET_INFO_BY_FD,
            &InfoByFd {
                bpf_fd: fd.as_raw_fd() as u32,
                info_len: size_of::<LinkInfo>() as u32,
                info: (&raw mut info) as u64,
            },
        )
    }
    .with_context(|| format!("cannot read the pinned XDP link {}", pin.display()))?;
    if info.link_type != LINK_TYPE_XDP {
        bail!(
            "{} is not an XDP link (link type {})",
            pin.display(),
            info.link_type
        );
    }
    Ok((info.xdp_ifindex, info.prog_id))
}

/// Detaches the XDP link pinned at `pin` and removes the pin. The link is
/// detached first (`BPF_LINK_DETACH`), so the program is off the
/// interface when this returns, even if a descriptor of the link is still
/// open somewhere (removing the pin alone frees the link only with its
/// last reference, and then a moment later). A link the kernel released
/// already (its interface went away) detaches as a no-op.
fn unpin_link(pin: &Path) -> anyhow::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let fd = open_pinned(pin)?;
    // SAFETY: `bpf_attr`'s layout for BPF_LINK_DETACH.
    unsafe {
        bpf_call(
            BPF_LINK_DETACH,
            &LinkDetach {
                link_fd: fd.as_raw_fd() as u32,
            },
        )
    }
    .with_context(|| format!("cannot detach the XDP link pinned at {}", pin.display()))?;
    drop(fd);
    std::fs::remove_file(pin).with_context(|| format!("cannot remove the pin {}", pin.display()))
}

/// Detaches the links an earlier `--keep-attached` run pinned in `dir`
/// for interfaces other than `keep`, naming each in a warning: nothing
/// else would ever detach them (a start re-adopts the links of the
/// interfaces it is given, and only those go at its exit).
fn detach_unlisted_links(dir: &Path, keep: &[String]) -> anyhow::Result<()> {
    let links = kept_links(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for (ifname, pin) in links {
        if keep.contains(&ifname) {
            continue;
        }
        unpin_link(&pin)?;
        tracing::warn!(
            interface = ifname,
            pin = %pin.display(),
            "detached the XDP gate an earlier --keep-attached run left on an interface no longer given (--iface)"
        );
    }
    Ok(())
}

/// For a monitor in userspace mode: detaches the XDP links an earlier
/// `--keep-attached` run in an XDP mode left in `dir` (its pin directory,
/// default or given), each named in a warning. Left attached, such a gate
/// takes the heartbeats to its port before the socket sees them (counted
/// or refused under a configuration nobody updates any more), and every
/// node would be dead while the monitor looks healthy. Detached rather
/// than refused: the operator chose userspace mode, removing the pin is
/// what an error would ask for, and the pinned node maps stay for a later
/// start in an XDP mode.
///
/// Links of a monitor that runs (it holds the pin directory) are left to
/// it, with a warning. A directory that does not exist or cannot be read
/// (a monitor not run as root) has nothing this monitor can see; links it
/// finds and cannot detach are an error that names them.
pub fn release_kept_links(dir: &Path) -> anyhow::Result<()> {
    let links = match kept_links(dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(pin_dir = %dir.display(), error = %e, "no kept XDP links to look for");
            return Ok(());
        }
    };
    if links.is_empty() {
        return Ok(());
    }
    let pins = links
        .iter()
        .map(|(_, p)| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let _lock = match lock_pin_dir(dir) {
        Ok(l) => l,
        Err(e) if e.is::<crate::dirlock::Busy>() => {
            tracing::warn!(
                pin_dir = %dir.display(),
                links = %pins,
                "an XDP monitor is running on this pin directory; its gate, if on this port, takes heartbeats before this monitor's socket sees them"
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for (ifname, pin) in links {
        unpin_link(&pin).with_context(|| {
            format!(
                "the XDP gate an earlier --keep-attached run left on {ifname} would take the heartbeats before this socket: remove it as root (`rm {}`)",
                pin.display()
            )
        })?;
        tracing::warn!(
            interface = ifname,
            pin = %pin.display(),
            "userspace mode: detached the XDP gate an earlier --keep-attached run left (it took the heartbeats before the socket); the pinned node maps stay for a later XDP start"
        );
    }
    Ok(())
}

/// The capabilities XDP cannot do without that an effective capability
/// set (`CapEff` of `/proc/<pid>/status`, in `status`) lacks: CAP_BPF
/// (or CAP_SYS_ADMIN, which covers it) to load, CAP_PERFMON (or
/// CAP_SYS_ADMIN) for the pointer arithmetic the gate's verifier needs
/// (without it, the load failed with a hundred-line verifier log saying
/// "prohibited for !root"), CAP_NET_ADMIN to attach.
/// Empty when the set is complete or cannot be read (the kernel has the
/// last word then).
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return Vec::new();
    };
    let has = |cap: u32| eff & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Refuses at once, in one line, when this process cannot load and attach
/// XDP programs: before any bpffs mount, pin or load is tried.
fn check_privileges() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_capabilities(&status);
    if !missing.is_empty() {
        bail!(
            "XDP needs the capabilities CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_RESOURCE (root has them unless its bounding set drops them), and this process lacks {}: grant them (see the README's systemd unit)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Turns a load error into an operator-facing one.
fn load_error(e: aya::EbpfError) -> anyhow::Error {
    let text = format!("{e:#}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && (text.contains("EPERM") || text.contains("ermission")) {
        return anyhow!(e).context(
            "loading the XDP program needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON",
        );
    }
    anyhow!(e).context("loading hb's eBPF object failed (run `hb monitor` as root on Linux 5.12+)")
}

impl XdpDataplane {
    /// Loads the program (re-adopting pinned maps under `pin_dir`) and
    /// attaches it to `opts.interfaces`: [`XdpDataplane::load`], then
    /// [`Dataplane::attach`].
    pub fn open(opts: &XdpOptions) -> anyhow::Result<XdpDataplane> {
        let dp = XdpDataplane::load(opts)?;
        dp.attach()?;
        Ok(dp)
    }

    /// Loads the program (re-adopting pinned maps under `pin_dir`), and
    /// checks the interfaces, without attaching it: [`Dataplane::attach`]
    /// does, once the caller has done what else can fail. A start that
    /// fails then never touches its interfaces: on some NICs attaching or
    /// detaching native XDP resets the rings, a break for all the host's
    /// traffic, and a link an earlier run kept stays as it was.
    pub fn load(opts: &XdpOptions) -> anyhow::Result<XdpDataplane> {
        if opts.keep_attached && opts.pin_dir.is_none() {
            bail!("keep_attached needs a pin directory (the link is pinned there)");
        }
        for (i, ifname) in opts.interfaces.iter().enumerate() {
            if opts.interfaces[..i].contains(ifname) {
                bail!("interface {ifname} is given twice");
            }
        }
        check_privileges()?;
        // Resolve interfaces first: a typo should cost neither a load nor
        // a pin directory left behind.
        let mut ifindex = Vec::new();
        for ifname in &opts.interfaces {
            let idx = if_index(ifname).context("unknown interface")?;
            if idx == 0 {
                bail!("unknown interface {ifname} (see `ip link`)");
            }
            ifindex.push(idx);
        }
        // What this start pins is removed again if it fails: a later start
        // would adopt those maps (and their capacity) as a monitor's.
        // Bound after the lock, so dropped before it: the pins are undone
        // while the directory is still this process'.
        let (pin_lock, node_pins, undo) = match &opts.pin_dir {
            Some(dir) => {
                let made = !dir.exists();
                ensure_pin_dir(dir)?;
                let lock = lock_pin_dir(dir)?;
                // Listed after the reconciliation: a node map it removed
                // (an index too small, maps of an earlier layout) and this
                // start pins anew under the same name is this start's, and
                // goes if it fails. Listed before, it counted as there
                // before and stayed.
                let node_pins = reconcile_node_pins(dir)?;
                reconcile_stateless_pins(dir)?;
                let undo = UndoPins::new(dir, made, &lock)?;
                (Some(lock), node_pins, Some(undo))
            }
            None => (None, NodePins::AsTheyAre, None),
        };

        let mut loader = EbpfLoader::new();
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => [
                names::NODE_INDEX,
                names::NODE_LIVE,
                names::NODE_REST,
                names::COUNTERS,
                names::CONFIG,
                names::LIMITS,
            ]
            .iter()
            .map(|n| (*n, dir.join(n)))
            .collect(),
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(n) = opts.max_nodes {
            if n == 0 || n > MAX_NODES {
                bail!("a capacity of {n} nodes is out of range (1 to {MAX_NODES})");
            }
            loader.map_max_entries(names::NODE_INDEX, 1 + index::buckets_for(n));
            loader.map_max_entries(names::NODE_LIVE, n);
            loader.map_max_entries(names::NODE_REST, n);
        }
        if let NodePins::RebuildIndex { capacity } = node_pins {
            // For the state arrays adopted, whatever `max_nodes` says.
            loader.map_max_entries(names::NODE_INDEX, 1 + index::buckets_for(capacity));
        }
        let mut ebpf = loader
            .load(opts.object.unwrap_or(crate::EBPF_OBJECT))
            .map_err(load_error)?;

        for name in [names::PROGRAM, names::PASS, names::FLOOR] {
            xdp_program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the kernel verifier rejected {name}"))?;
        }

        let prog_id = xdp_program(&mut ebpf, names::PROGRAM)?
            .info()
            .with_context(|| format!("cannot read the loaded {}'s id", names::PROGRAM))?
            .id();
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, names::COUNTERS)?)?;
        let config = Array::try_from(take_map(&mut ebpf, names::CONFIG)?)?;
        // Not pinned: the host's addresses are read afresh at every start;
        // until then (as created) the gate takes any address.
        let mut local_addrs = Array::try_from(take_map(&mut ebpf, names::LOCAL_ADDRS)?)?;
        if let Some(a) = &opts.local_addrs {
            // Before attaching: with pinned maps the gate's port is
            // configured already, and it must not take any address for a
            // moment.
            local_addrs
                .set(0, a, 0)
                .with_context(|| format!("cannot write {}", names::LOCAL_ADDRS))?;
        }
        let live_map = take_map(&mut ebpf, names::NODE_LIVE)?;
        let Map::Array(live_data) = &live_map else {
            bail!("map {} is not an array", names::NODE_LIVE);
        };
        let live = Mapping::new(live_data, names::NODE_LIVE)?;
        let live_map = Array::try_from(live_map)?;
        let Map::Array(rest_fd) = take_map(&mut ebpf, names::NODE_REST)? else {
            bail!("map {} is not an array", names::NODE_REST);
        };
        let rest = Mapping::new(&rest_fd, names::NODE_REST)?;
        if live.len != rest.len {
            bail!(
                "pinned maps {} and {} hold {} and {} nodes: remove {} (losing node state)",
                names::NODE_LIVE,
                names::NODE_REST,
                live.len,
                rest.len,
                opts.pin_dir.as_deref().unwrap_or(Path::new("?")).display()
            );
        }
        let nodes = NodeMaps { live, rest };
        if opts.pin_dir.is_some() {
            // Adopted maps may hold nodes a killed monitor was writing.
            let (released, reset) = nodes.release_dead_writers(SETTLE);
            if released != 0 {
                tracing::warn!(
                    released,
                    reset,
                    "released node slots a monitor that died mid-write left held (their heartbeats were refused as contended); reset the ones whose keys may have been half-written, until their keys are installed again"
                );
            }
        }
        let Map::Array(index_fd) = take_map(&mut ebpf, names::NODE_INDEX)? else {
            bail!("map {} is not an array", names::NODE_INDEX);
        };
        let index_map: Mapping<index::Bucket> = Mapping::new(&index_fd, names::NODE_INDEX)?;
        // SAFETY: the mapping holds `index_map.len` buckets of eight
        // 64-bit words, page-aligned; it lives in the dataplane next to the
        // index, which is dropped first (field order), so the slice never
        // outlives it. Every access to it is atomic.
        let words: &'static [AtomicU64] = unsafe {
            std::slice::from_raw_parts(
                index_map.ptr.as_ptr().cast::<AtomicU64>(),
                index_map.len as usize * index::ENTRIES,
            )
        };
        let mut index = NodeIndex::new(Words::Mapped(words)).map_err(|e| {
            anyhow!(e).context(format!(
                "remove {} (losing node state) or run the matching hb version",
                opts.pin_dir.as_deref().unwrap_or(Path::new("?")).display()
            ))
        })?;
        if opts.pin_dir.is_some() {
            // An index adopted as it is may lack nodes too: one a start
            // killed mid-rebuild left pinned (empty, or partly filled) fits
            // the state arrays, and is adopted. Whole, it is only read.
            let (indexed, cleared) = nodes.reindex(&mut index)?;
            if let NodePins::RebuildIndex { .. } = node_pins {
                tracing::warn!(
                    indexed,
                    cleared,
                    "rebuilt the node index from the pinned node state"
                );
            } else if indexed != 0 || cleared != 0 {
                tracing::warn!(
                    indexed,
                    cleared,
                    "the pinned node index lacked nodes the pinned node state holds (a start killed while it rebuilt the index, or pins mixed by hand): indexed them from the node state"
                );
            }
        }
        let events = RingBuf::try_from(take_map(&mut ebpf, names::EVENTS)?)?;

        Ok(XdpDataplane {
            ebpf: Mutex::new(ebpf),
            index: Mutex::new(index),
            index_map,
            index_fd,
            counters,
            config: Mutex::new(config),
            local_addrs: Mutex::new(local_addrs),
            nodes,
            live_map,
            rest_fd,
            events: Some(events),
            reports_task: None,
            attached: Mutex::new(Vec::new()),
            plan: Mutex::new(Some(AttachPlan {
                interfaces: opts.interfaces.iter().cloned().zip(ifindex).collect(),
                mode: opts.mode,
                pin_dir: opts.pin_dir.clone(),
                keep_attached: opts.keep_attached,
            })),
            undo_until_started: opts.undo_until_started,
            prog_id,
            keep_attached: opts.keep_attached,
            stuck_reads: AtomicU64::new(0),
            undo: Mutex::new(undo),
            _pin_lock: pin_lock,
        })
    }

    /// Attaches the program to one interface of the plan.
    fn attach_to(&self, ifname: &str, ifindex: u32, plan: &AttachPlan) -> anyhow::Result<()> {
        // Where this interface's link is pinned when kept attached.
        let link_path = plan
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_{ifname}")));
        let mut ebpf = self.ebpf();
        let prog = xdp_program(&mut ebpf, names::PROGRAM)?;

        // A link pinned by an earlier run (`--keep-attached`) for this
        // name, on another interface: the one it was attached to was
        // renamed since, and another took the name. Re-adopted, the gate
        // stayed on the renamed one while the monitor took this one for
        // gated. (No longer listed, the renamed one goes ungated.)
        if let Some(path) = link_path.as_ref().filter(|p| p.exists()) {
            match pinned_link_ifindex(path) {
                Ok(on) if on != 0 && on != ifindex => {
                    tracing::warn!(
                        interface = ifname,
                        pin = %path.display(),
                        on_index = on,
                        "the XDP link an earlier run kept for this interface is on another one \
                         (renamed since, and this one took its name): detaching it to attach here"
                    );
                    unpin_link(path)?;
                }
                // On this interface, or released (0: handled below).
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    interface = ifname,
                    error = %format!("{e:#}"),
                    "cannot tell which interface the kept XDP link is on; re-adopting it"
                ),
            }
        }

        // How a re-adopted link is attached, for the start's log.
        let mut kept_mode = "kept";
        // A link pinned by an earlier run (`--keep-attached`) in another
        // mode than this run's `--mode` asks for: a link cannot change
        // mode, nor can the interface have both at once.
        // - Native, `--mode skb`: skb works on every interface, so detach
        //   it and attach anew (heartbeats in between go to the stack and
        //   count as lost; on some NICs attaching or detaching native XDP
        //   resets the rings, a short break for all their traffic).
        // - skb, `--mode native`: most often the fallback of a driver
        //   without native XDP, which a new attach would only take again,
        //   leaving the gate at every restart: kept, and said.
        if let Some(path) = link_path.as_ref().filter(|p| p.exists()) {
            let kept = super::netlink::xdp_attach(ifindex);
            kept_mode = match kept {
                Ok(XdpAttach::Driver) => "native",
                Ok(XdpAttach::Skb) => "skb",
                _ => "kept",
            };
            match (kept, plan.mode) {
                (Ok(XdpAttach::Driver), AttachMode::Skb) => {
                    tracing::info!(
                        interface = ifname,
                        pin = %path.display(),
                        "the XDP link an earlier run kept is attached in native mode, --mode asks \
                         for skb: detaching it to attach anew"
                    );
                    unpin_link(path)?;
                }
                (Ok(XdpAttach::Skb), AttachMode::Native) => tracing::info!(
                    interface = ifname,
                    pin = %path.display(),
                    "the XDP link an earlier run kept is attached in skb mode (the fallback of a \
                     driver without native XDP, or an earlier --mode skb): kept so; to try native \
                     mode, remove the pin and start again"
                ),
                (Ok(_), _) => {}
                // Not knowing it keeps the link as it is: re-adopted below.
                (Err(e), _) => tracing::warn!(
                    interface = ifname,
                    error = %format!("{e:#}"),
                    "cannot tell the kept XDP link's mode; re-adopting it in whichever it has"
                ),
            }
        }

        // A link pinned by an earlier run (`--keep-attached`): swap our
        // program into it, whether or not this run keeps it attached in
        // turn (if not, `detach` unpins and detaches it).
        if let Some(path) = link_path.as_ref().filter(|p| p.exists()) {
            let pinned = PinnedLink::from_pin(path)
                .with_context(|| format!("cannot open pinned XDP link {}", path.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .with_context(|| format!("{} is not a pinned XDP link", path.display()))?;
            // Said only if it is needed ([`Self::put_back_kept_links`]):
            // kept links are taken over last, after every interface that
            // can refuse a new program (another one there) was attached.
            let previous = Some(pinned_link_program(path).map_err(|e| format!("{e:#}")));
            match prog.attach_to_link(link) {
                Ok(id) => {
                    tracing::info!(interface = ifname, pin = %path.display(), "re-adopted pinned XDP link");
                    self.attached_now().push(Attached {
                        ifname: ifname.to_owned(),
                        ifindex,
                        name_now: Mutex::new(ifname.to_owned()),
                        mode: kept_mode,
                        link: id,
                        pin: Some(path.clone()),
                        previous,
                    });
                    return Ok(());
                }
                // The kernel released the link when its interface went
                // away (deleted, or created again since: a driver reload,
                // a bond rebuilt): the pin outlives it and can never be
                // updated again. Attach afresh below.
                Err(e) if has_errno(&e, &[libc::ENOLINK]) => {
                    tracing::warn!(
                        interface = ifname,
                        pin = %path.display(),
                        "the XDP link pinned by an earlier run was released by the kernel (its interface went away since): removing the pin and attaching afresh"
                    );
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove the stale XDP link pin {}", path.display())
                    })?;
                }
                Err(e) => {
                    return Err(anyhow!(e).context(format!(
                        "cannot re-adopt the XDP link pinned at {}",
                        path.display()
                    )));
                }
            }
        }

        let pin = link_path.filter(|_| plan.keep_attached);
        let (id, mode) = match plan.mode {
            AttachMode::Skb => (attach_mode(prog, ifname, ifindex, XdpMode::Skb)?, "skb"),
            AttachMode::Native => match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
                Ok(id) => (id, "native"),
                Err(e) if is_busy(&e) => return Err(busy(ifname, e)),
                Err(e) => {
                    tracing::warn!(
                        interface = ifname,
                        error = %e,
                        "driver has no native XDP support; falling back to skb (generic) mode, which is slower"
                    );
                    (attach_mode(prog, ifname, ifindex, XdpMode::Skb)?, "skb")
                }
            },
        };
        let pin = match pin {
            Some(path) => {
                let link = prog.take_link(id)?;
                let fd_link = FdLink::try_from(link).map_err(|e| {
                    anyhow!("cannot pin the XDP link of {ifname}: the kernel attached it through netlink ({e}); keep_attached needs bpf_link (Linux 5.9+)")
                })?;
                fd_link
                    .pin(&path)
                    .with_context(|| format!("cannot pin the XDP link at {}", path.display()))?;
                let pinned = PinnedLink::from_pin(&path)?;
                let id = prog.attach_to_link(XdpLink::try_from(FdLink::from(pinned))?)?;
                tracing::info!(interface = ifname, pin = %path.display(), "XDP gate attached, kept attached");
                self.attached_now().push(Attached {
                    ifname: ifname.to_owned(),
                    ifindex,
                    name_now: Mutex::new(ifname.to_owned()),
                    mode,
                    link: id,
                    pin: Some(path),
                    previous: None,
                });
                return Ok(());
            }
            None => None,
        };
        tracing::info!(interface = ifname, "XDP gate attached");
        self.attached_now().push(Attached {
            ifname: ifname.to_owned(),
            ifindex,
            name_now: Mutex::new(ifname.to_owned()),
            mode,
            link: id,
            pin,
            previous: None,
        });
        Ok(())
    }

    /// The attach failed on a later interface: the links an earlier run
    /// kept and this one re-adopted run that run's program again, and are
    /// left as they were (not this run's to detach). Kept with this run's
    /// program, they gated with a monitor's program that never ran: after
    /// a failed upgrade, the new gate on some interfaces, the old on the
    /// others.
    fn put_back_kept_links(&self) {
        self.attached_now().retain(|a| {
            let (Some(pin), Some(previous)) = (&a.pin, &a.previous) else {
                return true;
            };
            let previous = match previous {
                Ok(fd) => fd,
                Err(why) => {
                    tracing::warn!(
                        interface = a.ifname,
                        error = why,
                        "the start failed, and the XDP link an earlier run kept could not be given \
                         its program back (it was not held): it gates with this run's until the \
                         next start"
                    );
                    return true;
                }
            };
            match update_pinned_link(pin, previous.as_fd()) {
                Ok(()) => {
                    tracing::info!(
                        interface = a.ifname,
                        pin = %pin.display(),
                        "the start failed: the XDP link an earlier run kept runs that run's program again"
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!(
                        interface = a.ifname,
                        error = %format!("{e:#}"),
                        "the start failed, and the XDP link an earlier run kept could not be given its program back: it gates with this run's until the next start"
                    );
                    true
                }
            }
        });
    }

    /// Detaches from every interface, also unpinning kept links. Called by
    /// `Drop` too, unless `keep_attached`.
    pub fn detach(&mut self) -> anyhow::Result<()> {
        let ebpf = self.ebpf.get_mut().unwrap_or_else(|e| e.into_inner());
        let prog = xdp_program(ebpf, names::PROGRAM)?;
        let attached = self.attached.get_mut().unwrap_or_else(|e| e.into_inner());
        for a in attached.drain(..) {
            if let Some(p) = &a.pin {
                std::fs::remove_file(p)
                    .with_context(|| format!("cannot unpin XDP link {}", p.display()))?;
            }
            prog.detach(a.link)
                .with_context(|| format!("cannot detach XDP from {}", a.ifname))?;
            tracing::info!(interface = a.ifname, "XDP gate detached");
        }
        Ok(())
    }

    /// The eBPF object, for tests and benchmarks (BPF_PROG_TEST_RUN on its
    /// programs, verifier statistics).
    pub fn ebpf(&self) -> MutexGuard<'_, Ebpf> {
        self.ebpf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Instructions the verifier processed for `hb_xdp`.
    pub fn verified_instructions(&self) -> anyhow::Result<u32> {
        let mut ebpf = self.ebpf();
        let info = xdp_program(&mut ebpf, names::PROGRAM)?.info()?;
        info.verified_instruction_count()
            .ok_or_else(|| anyhow!("the kernel does not report verified instruction counts"))
    }

    /// A consistent copy of the state at `slot`; `None` beyond the
    /// capacity, or if the node stayed held for writing (logged).
    pub fn state(&self, slot: u32) -> Option<NodeState> {
        let e = self.nodes.entry(slot)?;
        e.read().map_err(|s| self.skipped(slot, s)).ok()
    }

    /// Counts a read of `slot` given up on, and logs it on the 1st, 2nd,
    /// 4th, 8th... time: a node that stays held is skipped on every tick.
    #[cold]
    fn skipped(&self, slot: u32, s: Stuck) {
        let n = self.stuck_reads.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::error!(
                slot,
                seqcount = s.seq,
                skipped = n,
                "cannot read a node's state: {s}; the read is skipped (the node's status is not updated) and its heartbeats are refused meanwhile"
            );
        }
    }

    /// The live line at `slot` through one `BPF_MAP_LOOKUP_ELEM` syscall:
    /// the alternative design [`READ_DESIGN`] measures against. Not
    /// consistent with respect to the seqcount (the kernel copies without
    /// it).
    pub fn live_by_syscall(&self, slot: u32) -> anyhow::Result<NodeLive> {
        Ok(self.live_map.get(&slot, 0)?)
    }

    /// Kernel memory of each map (`memlock` in /proc/self/fdinfo), by name.
    pub fn memlock(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
        let ebpf = self.ebpf();
        let limits = match ebpf.map(names::LIMITS) {
            Some(Map::PerCpuArray(m)) => m.fd().as_fd().as_raw_fd(),
            _ => bail!("no map {}", names::LIMITS),
        };
        let fds = [
            (names::NODE_INDEX, self.index_fd.fd().as_fd().as_raw_fd()),
            (
                names::NODE_LIVE,
                self.live_map.map().fd().as_fd().as_raw_fd(),
            ),
            (names::NODE_REST, self.rest_fd.fd().as_fd().as_raw_fd()),
            (
                names::COUNTERS,
                self.counters.map().fd().as_fd().as_raw_fd(),
            ),
            (names::CONFIG, locked_fd(&self.config)),
            (names::LIMITS, limits),
            (names::LOCAL_ADDRS, locked_fd(&self.local_addrs)),
        ];
        fds.iter()
            .map(|(name, fd)| {
                let path = format!("/proc/self/fdinfo/{fd}");
                let text =
                    std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
                let v = text
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| anyhow!("no memlock in {path}"))?;
                Ok((*name, v))
            })
            .collect()
    }

    /// Capacity of the node maps.
    pub fn capacity(&self) -> u32 {
        self.nodes.len()
    }

    /// Buckets of the node index (besides its header).
    pub fn index_buckets(&self) -> u32 {
        self.index_map.len - 1
    }

    fn index(&self) -> MutexGuard<'_, NodeIndex<'static>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn attached_now(&self) -> MutexGuard<'_, Vec<Attached>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Native XDP on a veth sends its `XDP_TX` frames (the gate's ACKs) on
/// to the peer only if the peer veth runs an XDP program too (the kernel
/// delivers them through the peer's XDP receive path; without a program
/// there it drops them, counted as `xdp_tx_errors` in `ethtool -S`, and
/// the gate's `ack_sent` counts them as sent): said once at the attach,
/// as the monitor cannot see the peer (in another namespace, a
/// container's). skb mode sends them through the stack.
fn warn_if_native_on_veth(a: &Attached) {
    if a.mode != "native" {
        return;
    }
    match super::netlink::link_kind(a.ifindex) {
        Ok(Some(kind)) if kind == "veth" => tracing::warn!(
            interface = %a.ifname,
            "native XDP on a veth: the gate's ACKs (XDP_TX) reach the peer only if the peer veth \
             has an XDP program attached (a pass-through one will do): attach one there, or run \
             with --mode skb"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(
            interface = %a.ifname,
            error = %format!("{e:#}"),
            "cannot ask rtnetlink for the interface's kind"
        ),
    }
}

/// The index of interface `name`, 0 if there is none by that name; an
/// error only for a name no interface can have (a NUL in it).
fn if_index(name: &str) -> anyhow::Result<u32> {
    if name.contains('\0') {
        bail!("interface name {name:?} contains NUL");
    }
    Ok(nix::net::if_::if_nametoindex(name).unwrap_or(0))
}

fn attach_mode(
    prog: &mut Xdp,
    ifname: &str,
    ifindex: u32,
    mode: XdpMode,
) -> anyhow::Result<XdpLinkId> {
    prog.attach_to_if_index(ifindex, mode).map_err(|e| {
        if is_busy(&e) {
            busy(ifname, e)
        } else {
            anyhow!(e).context(format!("cannot attach XDP to {ifname} in {mode:?} mode"))
        }
    })
}

/// Whether `e` or one of its causes is an OS error with one of `errnos`.
fn has_errno(e: &ProgramError, errnos: &[i32]) -> bool {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = src {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error().is_some_and(|n| errnos.contains(&n))
        {
            return true;
        }
        src = err.source();
    }
    false
}

fn is_busy(e: &ProgramError) -> bool {
    if has_errno(e, &[libc::EBUSY, libc::EEXIST]) {
        return true;
    }
    let t = format!("{e:?}");
    t.contains("EBUSY") || t.contains("Device or resource busy") || t.contains("File exists")
}

/// Pins under /sys/fs/bpf (and the directories in it) that could hold the
/// XDP link on `ifname`: an hb gate kept by `--keep-attached` with another
/// pin directory is pinned as `DIR/link_IF`.
fn link_pins_of(ifname: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/bpf");
    let name = format!("link_{ifname}");
    let mut dirs = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        dirs.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    let mut pins: Vec<PathBuf> = dirs
        .into_iter()
        .map(|d| d.join(&name))
        .filter(|p| p.exists())
        .collect();
    pins.sort();
    pins
}

/// Another program is on `ifname`. What detaches it depends on how it was
/// attached: `ip link set ... xdp off` for one attached through netlink;
/// one attached through a bpf_link (an hb gate is) makes the kernel refuse
/// that ("Can't replace active BPF XDP link") and goes with its link only.
/// Pins that may hold that link are named (a pin does not say which
/// network namespace its interface is in). It may be a running monitor's
/// gate, which is stopped, not detached under it: the error says so
/// before it says how to detach one.
fn busy(ifname: &str, e: ProgramError) -> anyhow::Error {
    let found = link_pins_of(ifname)
        .iter()
        .map(|p| format!("`rm {}`", p.display()))
        .collect::<Vec<_>>();
    let found = match found.len() {
        0 => String::new(),
        1 => format!("; here {}", found[0]),
        _ => format!("; here one of {}", found.join(", ")),
    };
    anyhow!(e).context(format!(
        "interface {ifname} already has another XDP program attached; hb will not replace it. \
         Check `ip link show {ifname}` and stop its owner: if it is another hb monitor's gate, stop that \
         monitor (or give this one another interface); detached under a running monitor, its gate is lost \
         and that monitor stops. A program nothing runs any more can be detached: \
         `ip link set dev {ifname} xdp off` (`xdpgeneric off` in skb mode) detaches one attached through netlink; \
         one attached through a bpf_link refuses that and goes only with its link: remove the link's pin \
         (an hb gate kept by --keep-attached after its monitor stopped is pinned as PIN_DIR/link_{ifname}{found}), \
         or `bpftool link detach id ID` (`bpftool link show` lists them)"
    ))
}

impl Drop for XdpDataplane {
    fn drop(&mut self) {
        if let Some(t) = self.reports_task.take() {
            t.abort();
        }
        if self.keep_attached {
            if !self.index().is_empty() {
                // Pinned links stay attached; dropping our fds is all.
                return;
            }
            // No node to gate (a monitor that stops with none
            // provisioned): kept, the gate would only refuse every
            // heartbeat to the port, with no monitor to tell.
            if self.attached_now().iter().any(|a| a.pin.is_some()) {
                tracing::warn!(
                    "no node is provisioned: the XDP gate is detached rather than kept attached (--keep-attached keeps a gate with nodes)"
                );
            }
        }
        if let Err(e) = self.detach() {
            tracing::warn!(error = %format!("{e:#}"), "XDP detach on drop failed");
        }
    }
}

/// Drains the ring buffer into `tx` whenever it becomes readable.
async fn pump_reports(ring: RingBuf<MapData>, tx: mpsc::Sender<Report>) {
    // SAFETY: the ring buffer owns its fd and `AsyncFd` owns the ring, so
    // the fd stays open exactly as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the report ring buffer; reports are lost");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "polling the report ring buffer failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<Report>() {
                tracing::warn!(len = item.len(), "short record in the report ring buffer");
                continue;
            }
            // SAFETY: the kernel wrote a `Report` (checked length);
            // unaligned read of a plain-old-data value.
            let r = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Report>()) };
            drop(item);
            if tx.send(r).await.is_err() {
                return;
            }
        }
        guard.clear_ready();
    }
}

impl Dataplane for XdpDataplane {
    fn upsert_node(&self, node_id: u32, keys: &NodeKeys) -> anyhow::Result<()> {
        self.nodes.upsert(&mut self.index(), node_id, keys)
    }

    fn remove_node(&self, node_id: u32) -> anyhow::Result<()> {
        let mut ix = self.index();
        let Some(slot) = ix.get(node_id) else {
            return Ok(());
        };
        // The node held first, so a slot that stays held fails the removal
        // before anything changed. Then the index: from then on no new
        // datagram reaches the slot; one that already did finds another id
        // (or none) there once it is cleared.
        let held = match self.nodes.entry(slot) {
            Some(e) => Some(e.lock().map_err(|s| {
                stuck_error(slot, s).context(format!("cannot remove node {node_id}"))
            })?),
            None => None,
        };
        ix.remove(node_id);
        if let Some(h) = held {
            h.clear();
        }
        Ok(())
    }

    fn provisioned(&self) -> anyhow::Result<Vec<(u32, NodeKeys)>> {
        self.nodes.adopt(&mut self.index())
    }

    fn read_states(&self, slots: Range<u32>, f: &mut dyn FnMut(u32, &NodeState)) {
        let end = slots.end.min(self.nodes.len());
        for slot in slots.start..end {
            if let Some(e) = self.nodes.entry(slot) {
                match e.read() {
                    Ok(s) => f(slot, &s),
                    Err(s) => self.skipped(slot, s),
                }
            }
        }
    }

    fn read_live(&self, slots: Range<u32>, f: &mut LiveFn) {
        let end = slots.end.min(self.nodes.len());
        for slot in slots.start..end {
            if let Some(e) = self.nodes.entry(slot) {
                self.nodes
                    .prefetch_live(slot as usize + PREFETCH_AHEAD, end);
                let live = match e.read_live() {
                    Ok(l) => l,
                    Err(s) => {
                        self.skipped(slot, s);
                        continue;
                    }
                };
                // `full`: the whole node, right after its live line read
                // fine. For the node to stay held for [`PATIENCE`] in
                // between is as unlikely as it gets; if it does, the
                // consistent line with the rest as it stands (logged),
                // rather than no state for a node that is changing state.
                f(slot, &live, &|| {
                    e.read().unwrap_or_else(|s| {
                        self.skipped(slot, s);
                        // SAFETY: a live, aligned map value of plain
                        // integers.
                        NodeState::from_parts(&live, &unsafe { copy_words(e.rest) })
                    })
                });
            }
        }
    }

    fn set_requested_interval(&self, slot: u32, interval_ms: u32) {
        if let Some(e) = self.nodes.entry(slot) {
            // Only the kernel reads this field and only userspace writes
            // it: a plain atomic store, outside the seqcount protocol.
            // SAFETY: aligned u32 in the live writable mapping.
            let a = unsafe {
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e.rest).requested_interval_ms))
            };
            a.store(interval_ms, Ordering::Relaxed);
        }
    }

    fn set_monitor_status(&self, slot: u32, status: u32, since_ns: u64) {
        if let Some(e) = self.nodes.entry(slot) {
            e.set_monitor_status(status, since_ns);
        }
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        let mut out = [0u64; counter::LEN as usize];
        for (i, o) in out.iter_mut().enumerate() {
            let v = self
                .counters
                .get(&(i as u32), 0)
                .with_context(|| format!("cannot read {}[{i}]", names::COUNTERS))?;
            *o = v.iter().sum();
        }
        Ok(out)
    }

    fn set_config(&self, cfg: &Config) -> anyhow::Result<()> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(0, cfg, 0)
            .with_context(|| format!("cannot write {}", names::CONFIG))
    }

    fn set_local_addrs(&self, addrs: &LocalAddrs) -> anyhow::Result<()> {
        self.local_addrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(0, addrs, 0)
            .with_context(|| format!("cannot write {}", names::LOCAL_ADDRS))
    }

    fn capacity(&self) -> u32 {
        XdpDataplane::capacity(self)
    }

    /// Reads skipped so far because a node stayed held for writing for
    /// over 50 ms (each also logged, sparingly).
    fn stuck_reads(&self) -> u64 {
        self.stuck_reads.load(Ordering::Relaxed)
    }

    fn started(&self) {
        if let Some(u) = self.undo.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            u.keep();
        }
    }

    fn attach(&self) -> anyhow::Result<()> {
        let Some(plan) = self.plan.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            bail!("the XDP gate is attached already");
        };
        if let Some(dir) = &plan.pin_dir {
            let names: Vec<String> = plan.interfaces.iter().map(|(n, _)| n.clone()).collect();
            detach_unlisted_links(dir, &names)?;
        }
        // Interfaces with a link an earlier run kept come last: an
        // attach that fails (another XDP program on an interface, say)
        // then fails before any kept link runs this run's program. (One
        // failing after that is put back if its program could be held.)
        let mut order: Vec<&(String, u32)> = plan.interfaces.iter().collect();
        if let Some(dir) = &plan.pin_dir {
            order.sort_by_key(|(ifname, _)| dir.join(format!("link_{ifname}")).exists());
        }
        for (ifname, ifindex) in order {
            if let Err(e) = self.attach_to(ifname, *ifindex, &plan) {
                self.put_back_kept_links();
                return Err(e);
            }
        }
        for a in self.attached_now().iter_mut() {
            a.previous = None;
            warn_if_native_on_veth(a);
        }
        if !self.undo_until_started {
            self.started();
        }
        Ok(())
    }

    fn attached(&self) -> Vec<(String, &'static str)> {
        self.attached_now()
            .iter()
            .map(|a| (a.ifname.clone(), a.mode))
            .collect()
    }

    fn check_attached(&self) -> Result<(), String> {
        for a in self.attached_now().iter() {
            // How the interface is named in what is said: under its last
            // name, with the one it was given if renamed since.
            let shown = |name: &str| {
                if name == a.ifname {
                    name.to_owned()
                } else {
                    format!("{name} (--iface {})", a.ifname)
                }
            };
            // By the index it was attached at, not by name: the kernel
            // keeps the gate on an interface that is renamed, and
            // detaches it from one that goes away, index and all (one
            // created again under the name has another index). One
            // rtnetlink question answers both what the interface is called
            // now and which XDP programs it runs.
            let link = match super::netlink::link_now(a.ifindex) {
                Ok(Some(link)) => link,
                Ok(None) => {
                    // Under its last name: renamed, then deleted, it is
                    // that name another interface may have taken since.
                    let name = a.name_now.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let shown = shown(&name);
                    return Err(match nix::net::if_::if_nametoindex(name.as_str()) {
                        Ok(i) if i != a.ifindex => format!(
                            "interface {shown} was created again (index {} -> {i}) without the gate",
                            a.ifindex
                        ),
                        _ => format!("interface {shown} is gone, and the gate with it"),
                    });
                }
                // No answer (no descriptor left: hooks by the hundred):
                // nothing said, and the next tick asks again.
                Err(e) => {
                    tracing::debug!(interface = %a.ifname, error = %format!("{e:#}"), "cannot ask rtnetlink about the interface");
                    continue;
                }
            };
            {
                let mut known = a.name_now.lock().unwrap_or_else(|e| e.into_inner());
                if *known != link.name {
                    tracing::warn!(
                        interface = %a.ifname,
                        now = %link.name,
                        "interface renamed; the gate stays on it, but the next start needs \
                         --iface {}",
                        link.name
                    );
                    *known = link.name.clone();
                }
            }
            // The interface is there; is the gate? Its link can be
            // detached under the monitor (`bpftool link detach`, or
            // BPF_LINK_DETACH by whoever holds it; `ip link set ... xdp
            // off` for a program attached through netlink), or another
            // program put in its place: heartbeats then go past it, and
            // every node would be judged dead for the monitor's loss.
            // Asked of the interface, as it covers both ways of attaching:
            // aya keeps the link's descriptor to itself.
            let ids = &link.xdp_prog_ids;
            if !ids.contains(&self.prog_id) {
                let shown = shown(&link.name);
                return Err(if ids.is_empty() {
                    format!(
                        "the gate was detached from interface {shown} under the monitor \
                         (its XDP link detached, or its program taken off)"
                    )
                } else {
                    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
                    format!(
                        "interface {shown} runs another XDP program (id {}) in place of the gate",
                        ids.join(", ")
                    )
                });
            }
        }
        Ok(())
    }

    fn take_reports(&mut self) -> Option<mpsc::Receiver<Report>> {
        let ring = self.events.take()?;
        let (tx, rx) = mpsc::channel(1024);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => self.reports_task = Some(h.spawn(pump_reports(ring, tx))),
            Err(_) => {
                // No runtime here (a synchronous caller): a small one of
                // our own, on its own thread, ends when the receiver drops.
                let spawned =
                    std::thread::Builder::new()
                        .name("hb-reports".into())
                        .spawn(move || {
                            match tokio::runtime::Builder::new_current_thread()
                                .enable_io()
                                .build()
                            {
                                Ok(rt) => rt.block_on(pump_reports(ring, tx)),
                                Err(e) => {
                                    tracing::error!(error = %e, "cannot start the report poller")
                                }
                            }
                        });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start the report poller thread");
                    return None;
                }
            }
        }
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, atomic::Ordering, mpsc},
        time::{Duration, Instant},
    };

    use hb_common::{
        NodeKey,
        maps::{NodeKeys, NodeState},
    };

    use super::{
        Entry, Mapping, NodeMaps, PATIENCE, Stuck, ensure_pin_dir, lock_pin_dir,
        missing_capabilities,
    };
    use crate::dataplane::index::NodeIndex;

    /// The node maps of `n` slots, in memory: what the kernel maps hold,
    /// without a kernel.
    fn maps(n: u32) -> NodeMaps {
        NodeMaps {
            live: Mapping::anonymous(n),
            rest: Mapping::anonymous(n),
        }
    }

    fn keys(slot: u32, epoch: u8) -> NodeKeys {
        NodeKeys::single(
            slot,
            epoch,
            NodeKey {
                k0: 0x1111,
                k1: 0x2222,
            },
        )
    }

    /// Node 7 at slot 1, with some state.
    fn provisioned(m: &NodeMaps) -> Entry {
        let e = m.entry(1).unwrap();
        e.lock().unwrap().replace(|_| {
            let mut s = NodeState {
                accepted: 5,
                max_seq: 5,
                ..NodeState::default()
            };
            s.set_keys(7, &keys(1, 1));
            s
        });
        e
    }

    /// What a monitor killed (SIGKILL, OOM) between `lock` and its
    /// release leaves: a node held for good.
    fn killed_holding(e: Entry) {
        std::mem::forget(e.lock().unwrap());
    }

    /// `f` on another thread, which must return within 2 s.
    fn within_2s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(2))
            .unwrap_or_else(|_| panic!("{what} still waiting after 2 s"))
    }

    #[test]
    fn a_node_left_held_fails_reads_and_writes_in_bounded_time() {
        let m = Arc::new(maps(4));
        killed_holding(provisioned(&m));
        let seq = m.entry(1).unwrap().seqs().0;
        assert_eq!(seq & 1, 1);
        for what in ["read", "read_live", "lock"] {
            let m = m.clone();
            let (r, took) = within_2s(what, move || {
                let e = m.entry(1).unwrap();
                let t = Instant::now();
                let r = match what {
                    "read" => e.read().map(drop),
                    "read_live" => e.read_live().map(drop),
                    _ => e.lock().map(drop),
                };
                (r, t.elapsed())
            });
            assert_eq!(r, Err(Stuck { seq }), "{what}");
            assert!(took >= PATIENCE, "{what} gave up after {took:?}");
        }
        // The other nodes are not held up.
        assert_eq!(m.entry(2).unwrap().read().unwrap(), NodeState::default());
    }

    #[test]
    fn a_dead_writer_that_wrote_nothing_or_everything_is_released_and_the_node_kept() {
        let m = maps(4);
        let e = provisioned(&m);
        let whole = e.read().unwrap();
        killed_holding(e);
        let (sc, ks) = e.seqs();
        assert_eq!((sc & 1, ks & 1), (1, 0));
        assert_eq!(m.release_dead_writers(Duration::from_millis(1)), (1, 0));
        assert_eq!(e.seqs(), (sc + 1, ks), "the next even count");
        let s = e.read().unwrap();
        assert_eq!(
            s,
            NodeState {
                seqcount: sc + 1,
                ..whole
            },
            "the node as it was"
        );
        // Writable again.
        e.lock().unwrap().rekey(7, &keys(1, 2));
        assert_eq!(e.read().unwrap().keys(1), keys(1, 2));
    }

    #[test]
    fn a_dead_writer_that_left_keys_half_written_leaves_a_reset_node_without_keys() {
        let m = maps(4);
        let e = provisioned(&m);
        // A rotation killed mid-write: the new epoch's valid bit is in,
        // its key is not (the slot pairs epoch 2 with epoch 1's key).
        killed_holding(e);
        e.keys_seq().fetch_add(1, Ordering::AcqRel);
        // SAFETY: we "hold" the node (the dead writer's count).
        unsafe { (*e.rest).key_epoch = [2, 0] };
        let (sc, ks) = e.seqs();
        assert_eq!((sc & 1, ks & 1), (1, 1));

        assert_eq!(m.release_dead_writers(Duration::from_millis(1)), (1, 1));
        assert_eq!(e.seqs(), (sc + 1, ks + 1), "both on the next even count");
        let s = e.read().unwrap();
        assert_eq!(
            s.node_id, 7,
            "the id stays: the node index still leads here"
        );
        assert_eq!(s.key_valid, 0, "no key trusted");
        assert_eq!(s.find_key(2), None);
        assert_eq!((s.accepted, s.max_seq), (0, 0), "a fresh state");
        // The monitor installs the keys again (a rotation in place).
        e.lock().unwrap().rekey(7, &keys(1, 2));
        assert_eq!(e.read().unwrap().keys(1), keys(1, 2));
    }

    #[test]
    fn a_counter_that_moves_is_a_live_writers_and_left_alone() {
        let m = maps(4);
        let e = provisioned(&m);
        let held = e.lock().unwrap();
        let seen = e.seqs();
        // Released and taken again (the kernel's next write) meanwhile.
        drop(held);
        let again = e.lock().unwrap();
        assert_eq!(e.release_dead_writer(seen), None);
        assert_eq!(e.seqs().0, seen.0 + 2, "untouched");
        drop(again);
        assert_eq!(e.seqs().0 & 1, 0);
        // An intact map: nothing to do, and no wait.
        let t = Instant::now();
        assert_eq!(m.release_dead_writers(Duration::from_secs(5)), (0, 0));
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn one_process_per_pin_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_pin_dir(dir.path()).unwrap();
        let e = lock_pin_dir(dir.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("another hb monitor is using the pin directory"),
            "{e:#}"
        );
        drop(first);
        lock_pin_dir(dir.path()).expect("free again once its holder is gone");
    }

    #[test]
    fn a_panic_while_holding_a_node_releases_it_unwritten() {
        let m = maps(4);
        let e = provisioned(&m);
        let before = e.read().unwrap();
        let r = std::panic::catch_unwind(|| {
            e.lock()
                .unwrap()
                .replace(|_| panic!("a bug in the closure"));
        });
        assert!(r.is_err());
        let after = e.read().unwrap();
        assert_eq!(
            after,
            NodeState {
                seqcount: before.seqcount + 2,
                ..before
            }
        );
        assert_eq!(after.keys_seq & 1, 0);
    }

    /// Node `id` installed at `slot` with `accepted` heartbeats, in the
    /// maps only (as maps pinned apart from their index hold it).
    fn put(m: &NodeMaps, slot: u32, id: u32, accepted: u64) {
        m.entry(slot).unwrap().lock().unwrap().replace(|_| {
            let mut s = NodeState {
                accepted,
                ..NodeState::default()
            };
            s.set_keys(id, &keys(slot, 1));
            s
        });
    }

    fn at(m: &NodeMaps, slot: u32) -> (u32, u64) {
        let s = m.entry(slot).unwrap().read().unwrap();
        (s.node_id, s.accepted)
    }

    #[test]
    fn a_move_takes_along_only_the_nodes_own_state() {
        let m = maps(4);
        let mut ix = NodeIndex::owned(8);
        // Node 7 at slot 0, moved to slot 2: its state goes along.
        m.upsert(&mut ix, 7, &keys(0, 1)).unwrap();
        put(&m, 0, 7, 5);
        m.upsert(&mut ix, 7, &keys(2, 1)).unwrap();
        assert_eq!((at(&m, 0), at(&m, 2)), ((0, 0), (7, 5)), "moved");
        assert_eq!(ix.get(7), Some(2));
        // An index entry that leads to another node's slot (node 8 at slot
        // 1, as maps pinned apart from their index leave it): provisioning
        // node 9 elsewhere neither takes nor frees node 8's state.
        put(&m, 1, 8, 3);
        ix.set(8, 1).unwrap();
        ix.set(9, 1).unwrap();
        m.upsert(&mut ix, 9, &keys(3, 1)).unwrap();
        assert_eq!(at(&m, 1), (8, 3), "node 8 untouched");
        assert_eq!(at(&m, 3), (9, 0), "node 9 fresh");
        assert_eq!((ix.get(8), ix.get(9)), (Some(1), Some(3)));
    }

    #[test]
    fn the_monitors_record_of_a_node_goes_where_the_node_goes() {
        let m = maps(4);
        let mut ix = NodeIndex::owned(8);
        let rec = |slot| {
            let s = m.entry(slot).unwrap().read().unwrap();
            (s.monitor_status, s.monitor_status_since_ns)
        };
        m.upsert(&mut ix, 7, &keys(0, 1)).unwrap();
        assert_eq!(rec(0), (0, 0), "a new node: none recorded");
        m.entry(0).unwrap().set_monitor_status(3, 99);
        // Rotation keeps it, a move takes it along, a removal clears it.
        m.upsert(&mut ix, 7, &keys(0, 2)).unwrap();
        assert_eq!(rec(0), (3, 99));
        m.upsert(&mut ix, 7, &keys(2, 2)).unwrap();
        assert_eq!((rec(0), rec(2)), ((0, 0), (3, 99)));
        m.entry(2).unwrap().lock().unwrap().clear();
        assert_eq!(rec(2), (0, 0));
        // A node provisioned where one was recorded starts without.
        m.entry(1).unwrap().set_monitor_status(2, 5);
        m.upsert(&mut ix, 8, &keys(1, 1)).unwrap();
        assert_eq!(rec(1), (0, 0));
        // A node reset after a writer died mid-rotation: no longer heard
        // from, none recorded.
        let e = m.entry(1).unwrap();
        e.set_monitor_status(3, 5);
        killed_holding(e);
        e.keys_seq().fetch_add(1, Ordering::AcqRel);
        assert_eq!(m.release_dead_writers(Duration::from_millis(1)), (1, 1));
        assert_eq!(rec(1), (0, 0));
    }

    #[test]
    fn adoption_drops_index_entries_that_lead_to_no_node_of_theirs() {
        let m = maps(4);
        let mut ix = NodeIndex::owned(8);
        put(&m, 0, 7, 5);
        put(&m, 1, 8, 3);
        ix.set(7, 0).unwrap();
        // Another node's slot, an empty one, one beyond the maps.
        ix.set(9, 1).unwrap();
        ix.set(10, 2).unwrap();
        ix.set(11, 40).unwrap();
        let adopted = m.adopt(&mut ix).unwrap();
        assert_eq!(adopted, vec![(7, keys(0, 1))]);
        let mut left = ix.entries();
        left.sort();
        assert_eq!(left, [(7, 0)], "the stray entries are gone");
        // Node 9, provisioned afresh, leaves node 8's slot alone.
        m.upsert(&mut ix, 9, &keys(2, 1)).unwrap();
        assert_eq!((at(&m, 1), at(&m, 2)), ((8, 3), (9, 0)));
    }

    #[test]
    fn the_index_is_rebuilt_from_the_node_state() {
        let m = maps(8);
        put(&m, 1, 7, 5);
        put(&m, 4, 8, 3);
        // Node 7 at a second slot: not indexed there, cleared.
        put(&m, 6, 7, 1);
        let mut ix = NodeIndex::owned(4);
        assert_eq!(m.reindex(&mut ix).unwrap(), (2, 1));
        assert_eq!((ix.get(7), ix.get(8)), (Some(1), Some(4)));
        assert_eq!(at(&m, 6), (0, 0));
        assert_eq!(
            m.adopt(&mut ix).unwrap().len(),
            2,
            "every node adopted as it was"
        );
    }

    #[test]
    fn a_pin_dir_off_bpffs_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join("hb").join("pins");
        let e = ensure_pin_dir(&pins).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("is not on a bpf filesystem") && text.contains("mount -t bpf"),
            "{text}"
        );
        assert!(!dir.path().join("hb").exists(), "nothing created");
    }

    /// A relative pin directory is checked as the current directory's.
    /// (The monitor passes none since its settings resolve it; the case
    /// that failed, a current directory on bpffs and a path under it not
    /// created yet, climbed to an empty path and then `/`: tested at the
    /// settings, as changing this process' directory would race the other
    /// tests.)
    #[test]
    fn a_relative_pin_dir_on_bpffs_is_accepted() {
        let name = format!("hb-test-rel-{}", std::process::id());
        let up = std::env::current_dir().unwrap().components().count() - 1;
        let rel: std::path::PathBuf = std::iter::repeat_n("..", up)
            .chain(["sys", "fs", "bpf", &name, "pins"])
            .collect();
        assert!(rel.is_relative());
        let made = std::path::Path::new("/sys/fs/bpf").join(&name);
        let r = ensure_pin_dir(&rel);
        let created = made.join("pins").is_dir();
        let _ = std::fs::remove_dir_all(&made);
        r.unwrap();
        assert!(created);
    }

    #[test]
    fn capabilities_xdp_needs() {
        let status = |eff: &str| format!("Name:\thb\nCapInh:\t0\nCapEff:\t{eff}\nCapBnd:\t0\n");
        // Root: everything.
        assert!(missing_capabilities(&status("000001ffffffffff")).is_empty());
        // Nothing at all.
        assert_eq!(
            missing_capabilities(&status("0000000000000000")),
            ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        // CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (the README's unit).
        let unit = (1u64 << 39) | (1 << 12) | (1 << 38);
        assert!(missing_capabilities(&status(&format!("{unit:016x}"))).is_empty());
        // CAP_SYS_ADMIN covers CAP_BPF (kernels before 5.8).
        let old = (1u64 << 21) | (1 << 12);
        assert!(missing_capabilities(&status(&format!("{old:016x}"))).is_empty());
        assert_eq!(
            missing_capabilities(&status(&format!("{:016x}", 1u64 << 39))),
            ["CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        // CAP_BPF + CAP_NET_ADMIN without CAP_PERFMON: the verifier
        // refuses the gate's pointer arithmetic.
        let no_perfmon = (1u64 << 39) | (1 << 12);
        assert_eq!(
            missing_capabilities(&status(&format!("{no_perfmon:016x}"))),
            ["CAP_PERFMON"]
        );
        // Unreadable: no verdict, the kernel decides.
        assert!(missing_capabilities("").is_empty());
    }
}

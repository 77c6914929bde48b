//! The datapath half of the flow tables (see `mdsec_common::flowtable` for the
//! layout and the concurrency rules): lookup, slot claim with eviction, and the
//! after-use check of a slot that may have changed hands.

use aya_ebpf::maps::Array;
use mdsec_common::{
    flow::FlowValue,
    flowtable::{
        age, claim, place, published, Aligned, FlowSet, Place, TableKey, EMPTY, MATCH_MASK, SLACK,
        STATUS_MASK, VALID, WAYS,
    },
    stats::Stat,
};

use crate::{
    atomic::{cas32, publish32},
    stats::count,
};

/// Set by the agent at load time (read-only data: the verifier sees constants).
/// The seed belongs to the pinned tables; the set counts to their sizes.
#[no_mangle]
static FLOW_HASH_SEED: u64 = 0;
#[no_mangle]
static FLOW4_SETS: u32 = 1;
#[no_mangle]
static FLOW6_SETS: u32 = 1;

#[inline(always)]
pub fn seed() -> u64 {
    // SAFETY: a plain read of a global the loader patched.
    unsafe { core::ptr::read_volatile(&FLOW_HASH_SEED) }
}

#[inline(always)]
pub fn sets4() -> u32 {
    // SAFETY: as for `seed`.
    unsafe { core::ptr::read_volatile(&FLOW4_SETS) }
}

#[inline(always)]
pub fn sets6() -> u32 {
    // SAFETY: as for `seed`.
    unsafe { core::ptr::read_volatile(&FLOW6_SETS) }
}

/// A flow in use by this frame: its value, and its slot's state word as it was
/// when the frame found (or created) it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Hit {
    pub value: *mut FlowValue,
    state: *mut u32,
    /// A full word: stack slots holding it are never partly written.
    seen: u64,
}

impl Hit {
    /// Called after the frame is done with the flow: if the slot was emptied or
    /// reused meanwhile, what this frame cached there (verdict, app) may belong to
    /// another flow, so the cache is invalidated and the next frame re-evaluates.
    #[inline(always)]
    pub fn recheck(&self) {
        // SAFETY: `state` and `value` point into the same live map value.
        unsafe {
            if core::ptr::read_volatile(self.state) as u64 != self.seen {
                (*self.value).generation = 0;
                (*self.value).app_done = 0;
                (*self.value).app = 0;
            }
        }
    }

    /// No flow (the out-of-line flow stage hands hits back through memory).
    pub const NONE: Hit = Hit { value: core::ptr::null_mut(), state: core::ptr::null_mut(), seen: 0 };

    #[inline(always)]
    pub fn some(self) -> Option<Hit> {
        (!self.value.is_null()).then_some(self)
    }

    #[inline(always)]
    pub fn at<K>(table: &Array<FlowSet<K>>, f: Found) -> Option<Hit> {
        Some(Hit::in_set(table.get_ptr_mut(f.set)?, f.slot, f.seen))
    }

    #[inline(always)]
    fn in_set<K>(set: *mut FlowSet<K>, slot: usize, seen: u32) -> Hit {
        let i = slot & (WAYS - 1);
        // SAFETY: live map value; i < WAYS.
        unsafe {
            Hit { value: &raw mut (*set).slots[i].value, state: &raw mut (*set).state[i], seen: seen as u64 }
        }
    }
}

/// A slot found or claimed by an insert, named by scalars only: every outcome
/// of an insert becomes a [`Hit`] at one place ([`Hit::at`]), so the verifier
/// sees one more pointer shape afterwards, not one per path that produced the
/// slot. (Lookup hits are made pointers in [`lookup`] itself.)
#[derive(Clone, Copy)]
pub struct Found {
    pub set: u32,
    /// Read back from `Slot::index`: unknown to the verifier, within 0..WAYS.
    pub slot: usize,
    pub seen: u32,
}

/// A stand-in flow: a state word nobody changes and a value.
#[repr(C)]
pub struct Scratch {
    state: u32,
    _pad: u32,
    pub value: FlowValue,
}

/// This CPU's stand-in flow for a frame whose own flow got no slot (its first
/// set's lock was busy): the frame is still judged, not passed unjudged. The
/// caller initialises the value as a new flow (generation 0: evaluated, and
/// never found again, so never cached).
#[inline(always)]
pub fn scratch() -> Option<Hit> {
    let s = crate::maps::FLOW_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's cell of a live per-CPU map value.
    unsafe { Some(Hit { value: &raw mut (*s).value, state: &raw mut (*s).state, seen: (*s).state as u64 }) }
}

/// A flow in the LRU-hash build's map: no slot state to recheck (the kernel's
/// LRU may recycle an entry under a frame; mdsec's own table can tell).
#[cfg(feature = "lru-flows")]
#[inline(always)]
pub fn fixed(value: *mut FlowValue) -> Option<Hit> {
    let s = crate::maps::FLOW_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's cell of a live per-CPU map value; its state word never changes.
    unsafe { Some(Hit { value, state: &raw mut (*s).state, seen: (*s).state as u64 }) }
}

/// Index and state word of the key's slot in `set`.
#[inline(always)]
fn find<K: TableKey>(set: *mut FlowSet<K>, key: &Aligned<K>, want: u32) -> Option<(usize, u32)> {
    let mut i = 0;
    while i < WAYS {
        // SAFETY: `set` is a live map value; i < WAYS.
        unsafe {
            let st = &raw const (*set).state[i];
            let s = core::ptr::read_volatile(st);
            // The second read: the key was not rewritten while compared.
            if s & MATCH_MASK == want
                && key.0.same_aligned(&(*set).slots[i].key)
                && core::ptr::read_volatile(st) == s
            {
                return Some((laundered(set, i), s));
            }
        }
        i += 1;
    }
    None
}

/// Slot `i` of `set` through its stored index (see `Slot::index`).
#[inline(always)]
fn laundered<K>(set: *mut FlowSet<K>, i: usize) -> usize {
    // SAFETY: live map value; i < WAYS.
    (unsafe { core::ptr::read_volatile(&raw const (*set).slots[i].index) } as usize) & (WAYS - 1)
}

#[inline(always)]
fn find_in<K: TableKey>(table: &Array<FlowSet<K>>, n: u32, key: &Aligned<K>, want: u32) -> Option<Found> {
    let set = table.get_ptr_mut(n)?;
    find(set, key, want).map(|(slot, seen)| Found { set: n, slot, seen })
}

/// Records that slot `i`'s flow was seen at `now` (see `FlowSet::age`). Only
/// when the tick changed: the header line stays clean (and unshared between
/// CPUs) for all but one packet per tick of a busy flow.
#[inline(always)]
fn touch<K>(set: *mut FlowSet<K>, i: usize, now: u64) {
    let a = age(now);
    // SAFETY: live map value; masked index.
    unsafe {
        let p = &raw mut (*set).age[i & (WAYS - 1)];
        if core::ptr::read_volatile(p) != a {
            core::ptr::write_volatile(p, a);
        }
    }
}

/// The key's flow, or where it would go. The hit becomes a pointer here, from
/// this lookup's set: one array lookup less per packet than [`Hit::at`], for a
/// second pointer shape after the flow stage.
#[inline(always)]
pub fn lookup<K: TableKey>(
    table: &Array<FlowSet<K>>,
    sets: u32,
    key: &Aligned<K>,
    now: u64,
) -> Result<Hit, Place> {
    // SAFETY: `Aligned`.
    let at = place(unsafe { key.0.hash_aligned(seed()) }, sets);
    let second = table.get_ptr_mut(at.second);
    if let Some(b) = second {
        // Starts the second header's cache miss before the first set is searched,
        // so a miss in both (every new flow) waits for memory about once, not twice.
        // SAFETY: live map value.
        unsafe { core::ptr::read_volatile(&raw const (*b).lock) };
    }
    if let Some(set) = table.get_ptr_mut(at.first) {
        if let Some((i, s)) = find(set, key, at.want) {
            touch(set, i, now);
            return Ok(Hit::in_set(set, i, s));
        }
    }
    if at.second != at.first {
        if let Some(set) = second {
            if let Some((i, s)) = find(set, key, at.want) {
                touch(set, i, now);
                return Ok(Hit::in_set(set, i, s));
            }
        }
    }
    Err(at)
}

/// A claimed slot, key written: the caller writes the flow through `slot`, then
/// [`Claimed::publish`]es it.
pub struct Claimed<K> {
    lock: *mut u32,
    state: *mut u32,
    claimed: u32,
    want: u32,
    found: Found,
    pub slot: *mut mdsec_common::flowtable::Slot<K>,
}

impl<K> Claimed<K> {
    /// Makes the flow visible and releases the insert lock.
    #[inline(always)]
    pub fn publish(self) -> Found {
        let s = published(self.claimed, self.want);
        publish32(self.state, s);
        publish32(self.lock, 0);
        Found { seen: s, ..self.found }
    }
}

pub enum Insert<K> {
    /// A free (or evicted) slot, key written, locked until published.
    Claimed(Claimed<K>),
    /// Another CPU inserted the key first.
    Existing(Found),
    /// The first set's lock was busy, or no slot could be claimed.
    Failed,
}

// `free_slots` counts on these values.
const _: () = assert!(EMPTY == 0 && STATUS_MASK == 3);

/// Empty slots of `set`, counted without a branch per slot: with branches the
/// verifier tracks every count as its own state and the program grows past its
/// limit.
#[inline(always)]
fn free_slots<K>(set: *mut FlowSet<K>) -> u32 {
    let mut n = 0;
    let mut i = 0;
    while i < WAYS {
        // SAFETY: live map value.
        let status = unsafe { core::ptr::read_volatile(&raw const (*set).state[i]) } & STATUS_MASK;
        // 1 for EMPTY (0), 0 for any other status (1..=3).
        n += 1 - ((status + 3) >> 2);
        i += 1;
    }
    n
}

/// Claims the first slot of `set` whose state is `EMPTY`, by compare-and-swap:
/// (index, claiming state word).
#[inline(always)]
fn claim_empty<K>(set: *mut FlowSet<K>) -> Option<(usize, u32)> {
    let mut i = 0;
    while i < WAYS {
        // SAFETY: live map value.
        unsafe {
            let st = &raw mut (*set).state[i];
            let s = core::ptr::read_volatile(st);
            if s & STATUS_MASK == EMPTY && cas32(st, s, claim(s)) {
                // Ours now: record its index, and continue with the read-back copy.
                (*set).slots[i].index = i as u32;
                return Some((laundered(set, i), claim(s)));
            }
        }
        i += 1;
    }
    None
}

/// The least recently seen valid slot of `set` by its header alone: (index,
/// state, ticks since seen). The index is laundered through the header's `zero`
/// word: the verifier sees one unknown index whichever slot won, instead of one
/// state per candidate (which, over two sets, grows the program past its limit),
/// and no slot line is read (the insert only writes the victim's; a read of it
/// would be a second wait for memory per insert).
#[inline(always)]
fn oldest<K>(set: *mut FlowSet<K>, now: u16) -> Option<(usize, u32, u16)> {
    // SAFETY: live map value.
    let zero = unsafe { core::ptr::read_volatile(&raw const (*set).zero) } as usize;
    // Plain sentinels, not an Option: LLVM would compare against an undefined
    // "none" payload, which the verifier rejects as an uninitialised register.
    let (mut best_i, mut best_s, mut best_idle) = (WAYS, 0u32, 0u16);
    let mut i = 0;
    while i < WAYS {
        // SAFETY: live map value.
        unsafe {
            let s = core::ptr::read_volatile(&raw const (*set).state[i]);
            if s & STATUS_MASK == VALID {
                let idle = now.wrapping_sub(core::ptr::read_volatile(&raw const (*set).age[i]));
                if best_i == WAYS || idle > best_idle {
                    // xor, not or: no bit of `i` stays known to the verifier.
                    (best_i, best_s, best_idle) = ((i ^ zero) & (WAYS - 1), s, idle);
                }
            }
        }
        i += 1;
    }
    (best_i < WAYS).then_some((best_i, best_s, best_idle))
}

/// The eviction victim of two full sets, `a` preferred on a tie: (set index,
/// slot, state).
#[inline(always)]
fn victim<K>(table: &Array<FlowSet<K>>, at: Place, now: u64) -> Option<(u32, usize, u32)> {
    let (a, b) = (table.get_ptr_mut(at.first)?, table.get_ptr_mut(at.second)?);
    let now = age(now);
    match (oldest(a, now), oldest(b, now)) {
        (Some(x), Some(y)) if y.2 > x.2 => Some((at.second, y.0, y.1)),
        (Some(x), _) => Some((at.first, x.0, x.1)),
        (None, Some(y)) => Some((at.second, y.0, y.1)),
        (None, None) => None,
    }
}

/// Claims a slot for `key`, whose lookup missed at `at`. Takes the first set's
/// lock (released by `publish`, or here on any other outcome). Sets are named by
/// index and looked up again where used, for the reason given at [`Found`].
#[inline(always)]
pub fn insert<K: TableKey>(
    table: &Array<FlowSet<K>>,
    key: &Aligned<K>,
    at: Place,
    now: u64,
    len: u64,
) -> Insert<K> {
    let Some(a) = table.get_ptr_mut(at.first) else {
        return Insert::Failed;
    };
    // SAFETY: `a` is a live map value.
    let lock = unsafe { &raw mut (*a).lock };
    if !cas32(lock, 0, 1) {
        return Insert::Failed;
    }
    // The lock holder of the key's first set may have inserted it meanwhile.
    if let Some(f) =
        find_in(table, at.first, key, at.want).or_else(|| find_in(table, at.second, key, at.want))
    {
        publish32(lock, 0);
        return Insert::Existing(f);
    }
    // The first set while it has slack (see the module doc), else the emptier.
    let Some(b) = table.get_ptr_mut(at.second) else {
        publish32(lock, 0);
        return Insert::Failed;
    };
    let fa = free_slots(a);
    let (near, far) =
        if fa < SLACK && free_slots(b) > fa { (at.second, at.first) } else { (at.first, at.second) };
    let mut got = table.get_ptr_mut(near).and_then(claim_empty).map(|(i, c)| (near, i, c));
    if got.is_none() {
        got = table.get_ptr_mut(far).and_then(claim_empty).map(|(i, c)| (far, i, c));
    }
    if got.is_none() {
        // Both sets full: evict the least recently seen flow of the two.
        if let Some((n, i, s)) = victim(table, at, now) {
            if let Some(set) = table.get_ptr_mut(n) {
                // SAFETY: live map value; i < WAYS.
                let st = unsafe { &raw mut (*set).state[i & (WAYS - 1)] };
                if cas32(st, s, claim(s)) {
                    count(Stat::FlowEvicted, len);
                    got = Some((n, i, claim(s)));
                }
            }
        }
    }
    let Some((n, i, claimed, set)) = got.and_then(|(n, i, c)| table.get_ptr_mut(n).map(|set| (n, i, c, set)))
    else {
        publish32(lock, 0);
        return Insert::Failed;
    };
    let i = i & (WAYS - 1);
    // SAFETY: we own slot i of `set` (state BUSY by our claim); i < WAYS.
    unsafe {
        let slot = &raw mut (*set).slots[i];
        (*slot).key = key.0;
        (*set).age[i] = age(now);
        Insert::Claimed(Claimed {
            lock,
            state: &raw mut (*set).state[i],
            claimed,
            want: at.want,
            found: Found { set: n, slot: i, seen: 0 },
            slot,
        })
    }
}

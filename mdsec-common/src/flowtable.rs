//! The flow tables (`FLOWS4`, `FLOWS`): a hash table the datapath manages itself in
//! an mmap-able BPF array, because the kernel's hash maps cost more per lookup than
//! the rest of the fast path together (jhash of the key, a bucket walk, a call per
//! key compare). Here a lookup is a few multiplies, an inlined array lookup and
//! one header cache line.
//!
//! Geometry: the array's elements are [`FlowSet`]s of [`WAYS`] slots. A key has
//! two candidate sets (both derived from one 64-bit [`TableKey::hash`]); it is
//! looked up in the first, then the second, and inserted into the first while
//! it has at least [`SLACK`] free slots, else into the emptier of the two
//! ("two choices", which keeps sets from overflowing until the table is well
//! filled), so that most flows are found in the first set read. When
//! both are full the least recently seen flow of the two is evicted, chosen from
//! the sets' headers alone ([`FlowSet::age`]).
//!
//! Memory: a set's header is one 64-byte line and sets are whole lines (the
//! array's values start page-aligned), so a lookup reads one header line, then
//! the slot's lines.
//!
//! Concurrency (datapath CPUs and the agent, through its mapping of the array):
//! - Each slot's [`FlowSet::state`] word holds a tag (16 hash bits, to skip key
//!   compares), an incarnation number and a status (`EMPTY`/`BUSY`/`VALID`).
//!   Writers claim a slot by compare-and-swap and publish it by a fresh
//!   incarnation, so a reader that sees the same state word before and after it
//!   read the key (or the whole slot) read one flow, not a mix.
//! - Inserts of a key serialise on its first set's `lock` (no duplicate keys).
//!   Only the datapath takes locks, and never waits: on a busy lock the insert
//!   fails (counted), and the frame is judged through a per-CPU stand-in flow.
//! - The agent removes an idle flow with one compare-and-swap of its state word,
//!   so it can never remove a flow that replaced the one it judged idle.
//! - A frame may race its flow's eviction; the datapath re-checks the state word
//!   after using the slot and invalidates the cached verdict and app if the slot
//!   changed hands, so a verdict is never cached for the wrong flow.

use crate::flow::{FlowKey, FlowKey4, FlowValue};

/// Slots per set.
pub const WAYS: usize = 8;

/// Free slots a key's first set must have to take it; with fewer, the key goes
/// to the emptier of its two sets. Below it, two choices balance the sets (so
/// they fill before anything is evicted); above it, keys stay in the set a
/// lookup reads first.
pub const SLACK: u32 = 2;

/// Status bits of a state word.
pub const STATUS_MASK: u32 = 0b11;
pub const EMPTY: u32 = 0;
/// Being written by its claimer.
pub const BUSY: u32 = 1;
pub const VALID: u32 = 2;
/// Incarnation: bits 2..16, bumped by every claim and removal.
pub const INC_ONE: u32 = 1 << 2;
pub const INC_MASK: u32 = 0xfffc;
pub const TAG_SHIFT: u32 = 16;
/// The bits a lookup compares: tag and status.
pub const MATCH_MASK: u32 = 0xffff_0000 | STATUS_MASK;

/// A slot's key and flow.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Slot<K> {
    pub key: K,
    /// The slot's own index in its set, written by every claimer. The datapath
    /// reads it back instead of using the index it found, so the verifier sees one
    /// pointer (set + unknown index) for all slots and verifies the stages after
    /// the lookup once, not once per slot.
    pub index: u32,
    pub value: FlowValue,
}

/// One element of a flow table array.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowSet<K> {
    /// Held (1) by the datapath while it inserts a key whose first set this is.
    pub lock: u32,
    /// Per slot: tag << 16 | incarnation | status. Together, so a lookup reads
    /// one cache line before it touches a key.
    pub state: [u32; WAYS],
    /// Per slot: when its flow was last seen, as [`age`] (a wrapping tick). An
    /// eviction picks its victim from these without reading any slot. A hint
    /// only: written without synchronisation by whoever saw the flow last.
    pub age: [u16; WAYS],
    /// Always 0: nothing writes it (the kernel zeroes the array). The datapath
    /// ORs it into a slot index it chose from the header, so the verifier sees
    /// an unknown index without a read of the slot's own line (see `Slot::index`).
    pub zero: u32,
    pub _pad: [u32; 2],
    pub slots: [Slot<K>; WAYS],
}

/// Ticks of [`FlowSet::age`]: 2^26 ns (67 ms); 16 bits wrap after 73 minutes,
/// longer than any flow stays idle in the table at the default idle timeout
/// (past the wrap an idle flow looks recent: evicted later, never misjudged).
pub const AGE_SHIFT: u32 = 26;

/// A `CLOCK_MONOTONIC` time as a [`FlowSet::age`] tick.
#[inline(always)]
pub fn age(now_ns: u64) -> u16 {
    (now_ns >> AGE_SHIFT) as u16
}

pub type FlowSet4 = FlowSet<FlowKey4>;
pub type FlowSet6 = FlowSet<FlowKey>;

/// A flow table key: hashed and compared as whole 32-bit words.
pub trait TableKey: Copy {
    fn hash(&self, seed: u64) -> u64;
    fn same(&self, other: &Self) -> bool;
    /// [`TableKey::hash`] reading 64-bit words (same result).
    ///
    /// # Safety
    /// `self` is 8-aligned (the datapath's keys are built in an [`Aligned`]).
    unsafe fn hash_aligned(&self, seed: u64) -> u64;
    /// [`TableKey::same`] comparing 64-bit words.
    ///
    /// # Safety
    /// Both keys are 8-aligned (slot keys are: sets and slots are multiples of 8).
    unsafe fn same_aligned(&self, other: &Self) -> bool;
}

/// A key on the datapath's stack, aligned for the 64-bit reads of
/// [`TableKey::hash_aligned`] and [`TableKey::same_aligned`] (half the loads
/// and compares of 32-bit ones).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Aligned<K>(pub K);

const K: [u64; 6] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
    0x27d4_eb2f_1656_67c5,
    0xff51_afd7_ed55_8ccd,
];

/// Each 64-bit chunk, xored with the seed rotated per chunk, is multiplied by its
/// own constant; the products are summed and mixed once. The multiplies do not
/// depend on each other, so they overlap (a chain of them was a visible part of
/// the per-packet cost). Not a keyed PRF: the secret seed only makes a key's
/// sets hard to predict (a targeted collision can evict flows, which are then
/// evaluated again, never mis-judged).
#[inline(always)]
fn hash_words<const N: usize>(w: &[u32; N], seed: u64) -> u64 {
    let mut h = seed;
    let mut i = 0;
    let mut j = 0;
    while i < N {
        let hi = if i + 1 < N { w[i + 1] as u64 } else { 0 };
        let c = w[i] as u64 | hi << 32;
        h = mix(h, c, j, seed);
        i += 2;
        j += 1;
    }
    finish(h)
}

/// One chunk's share of the hash (chunk `j` of the key, as a u64).
#[inline(always)]
fn mix(h: u64, c: u64, j: usize, seed: u64) -> u64 {
    h.wrapping_add((c ^ seed.rotate_left(13 * j as u32)).wrapping_mul(K[j % K.len()]).rotate_left(27))
}

#[inline(always)]
fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(K[1]);
    h ^ (h >> 29)
}

/// [`hash_words`] over a key of `N` u32s at an 8-aligned `p`.
///
/// # Safety
/// `p` is 8-aligned with `4 * N` readable bytes.
#[inline(always)]
unsafe fn hash_words64<const N: usize>(p: *const u8, seed: u64) -> u64 {
    let mut h = seed;
    let mut j = 0;
    while j < N / 2 {
        // SAFETY: in bounds and aligned per the contract.
        h = mix(h, unsafe { *(p as *const u64).add(j) }, j, seed);
        j += 1;
    }
    if N % 2 == 1 {
        // SAFETY: the last u32, in bounds.
        h = mix(h, unsafe { *(p as *const u32).add(N - 1) } as u64, j, seed);
    }
    finish(h)
}

/// [`same_words`] over keys of `N` u32s at 8-aligned `a` and `b`.
///
/// # Safety
/// As for [`hash_words64`], for both.
#[inline(always)]
unsafe fn same_words64<const N: usize>(a: *const u8, b: *const u8) -> bool {
    let mut j = 0;
    while j < N / 2 {
        // SAFETY: in bounds and aligned per the contract.
        if unsafe { *(a as *const u64).add(j) != *(b as *const u64).add(j) } {
            return false;
        }
        j += 1;
    }
    // SAFETY: the last u32, in bounds.
    N.is_multiple_of(2) || unsafe { *(a as *const u32).add(N - 1) == *(b as *const u32).add(N - 1) }
}

#[inline(always)]
fn same_words<const N: usize>(a: &[u32; N], b: &[u32; N]) -> bool {
    let mut i = 0;
    while i < N {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

macro_rules! table_key {
    ($t:ty, $words:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == 4 * $words);
        impl TableKey for $t {
            #[inline(always)]
            fn hash(&self, seed: u64) -> u64 {
                // SAFETY: a repr(C) key of exactly $words u32s, 4-aligned, no
                // uninitialised padding (explicit `_pad` fields).
                hash_words(unsafe { &*(self as *const Self as *const [u32; $words]) }, seed)
            }
            #[inline(always)]
            fn same(&self, other: &Self) -> bool {
                // SAFETY: as above.
                unsafe {
                    same_words(
                        &*(self as *const Self as *const [u32; $words]),
                        &*(other as *const Self as *const [u32; $words]),
                    )
                }
            }
            #[inline(always)]
            unsafe fn hash_aligned(&self, seed: u64) -> u64 {
                // SAFETY: alignment per the caller; size asserted above.
                unsafe { hash_words64::<$words>(self as *const Self as *const u8, seed) }
            }
            #[inline(always)]
            unsafe fn same_aligned(&self, other: &Self) -> bool {
                // SAFETY: alignment per the caller; size asserted above.
                unsafe {
                    same_words64::<$words>(
                        self as *const Self as *const u8,
                        other as *const Self as *const u8,
                    )
                }
            }
        }
    };
}
table_key!(FlowKey4, 5);
table_key!(FlowKey, 11);

/// Where a key lives in a table of `sets` sets: its two sets and its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub first: u32,
    pub second: u32,
    /// Tag and `VALID` status as they appear in the state word.
    pub want: u32,
}

#[inline(always)]
pub fn place(hash: u64, sets: u32) -> Place {
    // Multiply-shift range reduction: any set count, no division.
    let first = ((hash as u32 as u64 * sets as u64) >> 32) as u32;
    let second = (((hash >> 32) * sets as u64) >> 32) as u32;
    // Tag from bits 32..48, which the first set's index does not depend on.
    let tag = (hash >> 32) as u32 & 0xffff;
    Place { first, second, want: tag << TAG_SHIFT | VALID }
}

/// Sets for a table of at least `slots` slots.
pub const fn sets_for(slots: u32) -> u32 {
    let s = slots.div_ceil(WAYS as u32);
    if s == 0 { 1 } else { s }
}

/// The state word that publishes a claimed slot: same incarnation as the claim.
#[inline(always)]
pub fn published(claimed: u32, want: u32) -> u32 {
    (claimed & INC_MASK) | want
}

/// The state word that claims a slot currently in state `s`.
#[inline(always)]
pub fn claim(s: u32) -> u32 {
    (s.wrapping_add(INC_ONE) & INC_MASK) | BUSY
}

/// The state word that empties a slot currently in state `s`.
#[inline(always)]
pub fn emptied(s: u32) -> u32 {
    (s.wrapping_add(INC_ONE) & INC_MASK) | EMPTY
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for FlowSet4 {}
    unsafe impl aya::Pod for FlowSet6 {}
}

const _: () = assert!(core::mem::size_of::<Slot<FlowKey4>>() == 144);
const _: () = assert!(core::mem::size_of::<Slot<FlowKey>>() == 168);
// The header is one cache line and sets are whole lines (see the module doc).
const _: () = assert!(core::mem::offset_of!(FlowSet4, slots) == 64);
const _: () = assert!(core::mem::size_of::<FlowSet4>() == 64 + 8 * 144);
const _: () = assert!(core::mem::size_of::<FlowSet6>() == 64 + 8 * 168);
const _: () = assert!(core::mem::size_of::<FlowSet4>().is_multiple_of(64));
const _: () = assert!(core::mem::size_of::<FlowSet6>().is_multiple_of(64));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_cover_the_table_evenly() {
        let sets = 1000;
        let mut n = [0u32; 1000];
        for i in 0..100_000u32 {
            let k = FlowKey4 {
                ifindex: 2,
                vlan: 0,
                proto: 6,
                _pad: 0,
                src: [10, 0, (i >> 8) as u8, i as u8],
                dst: [10, 1, 0, 1],
                sport: 40000 + (i % 7) as u16,
                dport: 104,
            };
            let p = place(k.hash(7), sets);
            assert!(p.first < sets && p.second < sets);
            n[p.first as usize] += 1;
        }
        // 100 per set expected; a poor hash of sequential addresses piles up.
        assert!(n.iter().all(|&c| (50..=160).contains(&c)), "{:?}", n.iter().max());
    }

    #[test]
    fn the_aligned_hash_and_compare_agree_with_the_plain_ones() {
        for i in 0..1000u32 {
            let k4 = Aligned(FlowKey4 {
                ifindex: i,
                vlan: i as u16,
                proto: 6,
                _pad: 0,
                src: i.to_be_bytes(),
                dst: [9, 8, 7, i as u8],
                sport: 1,
                dport: i as u16,
            });
            let k6 = Aligned(FlowKey {
                ifindex: i,
                vlan: 3,
                proto: 17,
                _pad: 0,
                src: [i as u8; 16],
                dst: [7; 16],
                sport: i as u16,
                dport: 53,
            });
            let (mut o4, mut o6) = (k4, k6);
            o4.0.dport ^= 1;
            o6.0.dst[15] ^= 1;
            // SAFETY: all four are `Aligned`.
            unsafe {
                assert_eq!(k4.0.hash_aligned(i as u64), k4.0.hash(i as u64));
                assert_eq!(k6.0.hash_aligned(i as u64), k6.0.hash(i as u64));
                assert!(k4.0.same_aligned(&k4.0) && !k4.0.same_aligned(&o4.0));
                assert!(k6.0.same_aligned(&k6.0) && !k6.0.same_aligned(&o6.0));
            }
        }
    }

    #[test]
    fn seed_changes_the_place_and_keys_compare_whole() {
        let a = FlowKey4 {
            ifindex: 1,
            vlan: 0,
            proto: 17,
            _pad: 0,
            src: [1; 4],
            dst: [2; 4],
            sport: 1,
            dport: 2,
        };
        let mut b = a;
        b.dport = 3;
        assert!(a.same(&a) && !a.same(&b));
        assert_ne!(a.hash(1), a.hash(2));
        assert_ne!(a.hash(1), b.hash(1));
    }

    #[test]
    fn state_words_move_through_incarnations() {
        let s = (5 << TAG_SHIFT) | (3 * INC_ONE) | VALID;
        let c = claim(s);
        assert_eq!(c & STATUS_MASK, BUSY);
        assert_eq!(c & INC_MASK, 4 * INC_ONE);
        let p = published(c, (9 << TAG_SHIFT) | VALID);
        assert_eq!(p & MATCH_MASK, (9 << TAG_SHIFT) | VALID);
        assert_ne!(emptied(p), p);
        assert_eq!(emptied(p) & STATUS_MASK, EMPTY);
        // The incarnation wraps without touching the tag.
        assert_eq!(claim(INC_MASK | VALID) & !STATUS_MASK, 0);
    }
}

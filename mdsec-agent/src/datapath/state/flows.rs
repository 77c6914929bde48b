//! The agent's flow records: compact, in two dense stores (IPv4 flows under
//! their 20-byte key, the rest under the full key), indexed by a hash table of
//! positions.
//!
//! Why not a `HashMap<FlowKey, FlowRecord>`: at a million flows its buckets
//! (key and record inline, a power of two of them) held about 390 MiB. Here a
//! flow is its key, its owner and a 112-byte record in vectors that grow with
//! the flows, and the index costs 5 bytes per bucket.
//!
//! Records are kept in the order the agent first saw them (`id` ascending):
//! removal only marks a record dead, and compaction keeps the order. So a
//! cursor (the last id a reader got) stays meaningful across merges, removals
//! and compactions: paging returns every flow that existed throughout exactly
//! once.

use std::hash::{BuildHasher, Hash};

use hashbrown::{DefaultHashBuilder, HashTable};
use mdsec_common::flow::{FlowKey, FlowKey4};

use super::role::{Role, Side, decide};

use super::{Monotonic, Owned, Totals};

/// What the agent keeps of one flow (its key is kept next to it).
#[derive(Debug, Clone, Default)]
pub struct FlowRecord {
    /// Agent-wide and increasing: the order flows were first seen, and the
    /// API's paging cursor. A flow forgotten and seen again gets a new id.
    pub id: u64,
    /// Its frames across kernel incarnations.
    pub(super) counts: Monotonic,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// The frames it counts for its owner (see `FlowValue::owned`).
    pub(super) owned: Owned,
    /// Policy fields of the latest kernel snapshot.
    pub rule: u32,
    pub generation: u32,
    /// At most `segstats::MAX_SEGMENTS`.
    pub segment: u8,
    /// The low bits of the last merge whose snapshot had this flow. Only
    /// compared for equality with the current merge: a false match after 256
    /// missed merges skips a `vanished` that already happened.
    pub(super) seen: u8,
    pub tcp_flags: u8,
    pub verdict: u8,
    pub app: u8,
    pub app_confidence: u8,
    /// TCP flags of the segment that created the first kernel entry the agent
    /// saw (see `FlowValue::tcp_flags`).
    pub(super) open_flags: u8,
    flags: u8,
}

const APP_DONE: u8 = 1;
const DEAD: u8 = 2;
/// The role is final (see [`role`](super::role)); `SERVER` then says which.
const ROLE_SETTLED: u8 = 4;
const SERVER: u8 = 8;

impl FlowRecord {
    pub(super) fn new(id: u64, first_seen_ns: u64, last_seen_ns: u64, seen: u8) -> FlowRecord {
        FlowRecord { id, first_seen_ns, last_seen_ns, seen, ..Default::default() }
    }

    /// Every frame of the flow, across kernel incarnations.
    pub fn totals(&self) -> Totals {
        self.counts.totals()
    }

    /// The first payload has been classified (`app`/`app_confidence` are final).
    pub fn app_done(&self) -> bool {
        self.flags & APP_DONE != 0
    }

    pub(super) fn set_app_done(&mut self, done: bool) {
        self.flags = (self.flags & !APP_DONE) | if done { APP_DONE } else { 0 };
    }

    fn dead(&self) -> bool {
        self.flags & DEAD != 0
    }

    /// Which end sent this direction ([`super::role`]): a flow whose role is
    /// not settled has no reverse direction, so its sender is the client.
    pub fn role(&self) -> Role {
        if self.flags & (ROLE_SETTLED | SERVER) == ROLE_SETTLED | SERVER {
            Role::Server
        } else {
            Role::Client
        }
    }

    pub(super) fn role_settled(&self) -> bool {
        self.flags & ROLE_SETTLED != 0
    }

    pub(super) fn settle_role(&mut self, r: Role) {
        self.flags = (self.flags & !SERVER) | ROLE_SETTLED | if r == Role::Server { SERVER } else { 0 };
    }

    pub(super) fn side(&self, k: &impl StoreKey) -> Side {
        let (proto, (_, sport), (_, dport)) = k.ends();
        Side { proto, sport, dport, open_flags: self.open_flags, first_seen_ns: self.first_seen_ns }
    }
}

/// A flow's protocol and its two (address, port) ends.
pub type Ends<A> = (u8, (A, u16), (A, u16));

/// A key a store can hold.
pub trait StoreKey: Copy + Eq + Hash + Into<FlowKey> {
    type Addr: Copy + Eq + Ord + Hash;
    /// Protocol, source and destination (address, port) — the interface and
    /// VLAN left out.
    fn ends(&self) -> Ends<Self::Addr>;

    /// What the index hashes: the conversation (both directions, every
    /// interface alike), so a flow's reverse is found in its own probe
    /// sequence. Packed into as few words as the key allows (one hasher
    /// write is most of a lookup's cost at a million flows).
    fn conversation(&self) -> impl Hash;

    /// `other` is this flow's reverse direction (on any interface or VLAN: a
    /// routed answer enters by another port).
    fn is_reverse_of(&self, other: &Self) -> bool {
        let (p, a, b) = self.ends();
        let (q, c, d) = other.ends();
        p == q && a == d && b == c
    }
}

/// The two ends in a fixed order.
fn ordered<A: Ord>(a: A, b: A) -> (A, A) {
    if a <= b { (a, b) } else { (b, a) }
}

impl StoreKey for FlowKey4 {
    type Addr = [u8; 4];
    fn ends(&self) -> Ends<[u8; 4]> {
        (self.proto, (self.src, self.sport), (self.dst, self.dport))
    }

    fn conversation(&self) -> impl Hash {
        let end = |ip: [u8; 4], port: u16| ((u32::from_be_bytes(ip) as u64) << 16) | port as u64;
        let (lo, hi) = ordered(end(self.src, self.sport), end(self.dst, self.dport));
        ((hi as u128) << 56) | ((lo as u128) << 8) | self.proto as u128
    }
}

impl StoreKey for FlowKey {
    type Addr = [u8; 16];
    fn ends(&self) -> Ends<[u8; 16]> {
        (self.proto, (self.src, self.sport), (self.dst, self.dport))
    }

    fn conversation(&self) -> impl Hash {
        let end = |ip: [u8; 16], port: u16| (u128::from_be_bytes(ip), port);
        let (lo, hi) = ordered(end(self.src, self.sport), end(self.dst, self.dport));
        (lo, hi, self.proto)
    }
}

fn conversation_hash<K: StoreKey>(hasher: &DefaultHashBuilder, k: &K) -> u64 {
    hasher.hash_one(k.conversation())
}

/// The owner of a removed record.
const DEAD_OWNER: u32 = u32::MAX;

/// Dead records tolerated before a compaction: a quarter of the store (and at
/// least this many, so small stores do not compact on every removal).
const COMPACT_MIN: usize = 4096;

/// One kind of key's records, dense, in id order.
#[derive(Debug)]
pub struct FlowStore<K> {
    keys: Vec<K>,
    recs: Vec<FlowRecord>,
    /// Per record: the device its own frames count for (an index into
    /// `Devices`), [`DEAD_OWNER`] once removed. A column of its own, so a
    /// device's flows are found by scanning keys and owners, not records.
    owners: Vec<u32>,
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    dead: usize,
    /// Kernel slot → position + 1 of the record last merged from it (0:
    /// none). The poller reads the table slot by slot, and a flow mostly
    /// stays in its slot: a key compare instead of a hash lookup.
    slots: Vec<u32>,
}

impl<K> Default for FlowStore<K> {
    fn default() -> Self {
        FlowStore {
            keys: Vec::new(),
            recs: Vec::new(),
            owners: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            dead: 0,
            slots: Vec::new(),
        }
    }
}

impl<K: StoreKey> FlowStore<K> {
    fn hash(&self, k: &K) -> u64 {
        conversation_hash(&self.hasher, k)
    }

    pub(super) fn position(&self, k: &K) -> Option<usize> {
        let h = self.hash(k);
        self.index.find(h, |&i| self.keys[i as usize] == *k).map(|&i| i as usize)
    }

    /// [`FlowStore::position`] of `k`, read from kernel slot `slot`.
    pub(super) fn position_at(&self, slot: usize, k: &K) -> Option<usize> {
        if let Some(&p) = self.slots.get(slot)
            && p != 0
        {
            let p = p as usize - 1;
            if self.keys.get(p) == Some(k) && !self.recs[p].dead() {
                return Some(p);
            }
        }
        self.position(k)
    }

    /// Remembers that kernel slot `slot` holds the record at `p`.
    pub(super) fn remember(&mut self, slot: usize, p: usize) {
        if slot >= self.slots.len() {
            self.slots.resize(slot + 1, 0);
        }
        self.slots[slot] = p as u32 + 1;
    }

    pub fn get(&self, k: &K) -> Option<&FlowRecord> {
        self.position(k).map(|i| &self.recs[i])
    }

    /// The position of a reverse direction of `k`, if the store holds one.
    pub(super) fn reverse(&self, k: &K) -> Option<usize> {
        self.index
            .iter_hash(self.hash(k))
            .map(|&i| i as usize)
            .find(|&i| !self.recs[i].dead() && self.keys[i].is_reverse_of(k))
    }

    /// Merges kernel entry `v` into the record at `i` ([`super::merge_flow`]).
    pub(super) fn merge_at(
        &mut self,
        i: usize,
        devices: &mut super::Devices,
        merge: u64,
        k: &FlowKey,
        v: &mdsec_common::flow::FlowValue,
    ) -> bool {
        super::merge_flow(devices, merge, (&mut self.recs[i], &mut self.owners[i]), k, v)
    }

    /// Positions of live records with an id above `after`.
    pub(super) fn positions_after(&self, after: u64) -> std::ops::Range<usize> {
        self.recs.partition_point(|r| r.id <= after)..self.recs.len()
    }

    /// Settles the role of the record at `i`, and its reverse's when that one
    /// was still open (see [`super::role`]).
    pub(super) fn settle(&mut self, i: usize) {
        if self.recs[i].dead() || self.recs[i].role_settled() {
            return;
        }
        let k = self.keys[i];
        let me = self.recs[i].side(&k);
        let other = self.reverse(&k).map(|j| self.recs[j].side(&self.keys[j]));
        let (role, settled) = decide(&me, other.as_ref());
        if settled {
            self.recs[i].settle_role(role);
        }
        // Every open reverse, not only the first: behind two mdsec ports (a
        // routed port and a bump) one direction is a flow on each.
        for &j in self.index.iter_hash(conversation_hash(&self.hasher, &k)) {
            let j = j as usize;
            let r = &mut self.recs[j];
            if r.dead() || r.role_settled() || !self.keys[j].is_reverse_of(&k) {
                continue;
            }
            let (role, s) = decide(&r.side(&self.keys[j]), Some(&me));
            if s {
                r.settle_role(role);
            }
        }
    }

    /// Appends a record for a key the store does not hold; its id must be
    /// higher than every id already here (the order paging relies on).
    pub(super) fn push(&mut self, k: K, owner: u32, r: FlowRecord) -> usize {
        debug_assert!(self.recs.last().is_none_or(|l| l.id < r.id));
        let i = self.keys.len();
        assert!(i < u32::MAX as usize, "flow store full");
        self.keys.push(k);
        self.recs.push(r);
        self.owners.push(owner);
        self.index_push(i);
        i
    }

    /// Enters position `i` (of a key already in `keys`) in the index.
    fn index_push(&mut self, i: usize) {
        let (keys, hasher) = (&self.keys, &self.hasher);
        self.index.insert_unique(conversation_hash(hasher, &keys[i]), i as u32, |&j| {
            conversation_hash(hasher, &keys[j as usize])
        });
    }

    /// Removes `k`'s record (marks it dead; compacts now and then).
    pub(super) fn remove(&mut self, k: &K) -> Option<(FlowRecord, u32)> {
        let h = self.hash(k);
        let keys = &self.keys;
        let e = self.index.find_entry(h, |&i| keys[i as usize] == *k).ok()?;
        let (i, _) = e.remove();
        let r = &mut self.recs[i as usize];
        r.flags |= DEAD;
        let out = (r.clone(), std::mem::replace(&mut self.owners[i as usize], DEAD_OWNER));
        self.dead += 1;
        if self.dead >= COMPACT_MIN && self.dead * 4 >= self.recs.len() {
            self.compact();
        }
        Some(out)
    }

    /// Drops dead records, keeping the order, and rebuilds the index.
    fn compact(&mut self) {
        let mut w = 0;
        for r in 0..self.recs.len() {
            if !self.recs[r].dead() {
                self.keys.swap(w, r);
                self.recs.swap(w, r);
                self.owners.swap(w, r);
                w += 1;
            }
        }
        self.keys.truncate(w);
        self.recs.truncate(w);
        self.owners.truncate(w);
        self.keys.shrink_to(w + w / 4);
        self.recs.shrink_to(w + w / 4);
        self.owners.shrink_to(w + w / 4);
        self.dead = 0;
        // Positions moved: the slot hints are stale.
        self.slots.fill(0);
        self.index = HashTable::with_capacity(w);
        for i in 0..w {
            self.index_push(i);
        }
    }

    pub fn len(&self) -> usize {
        self.recs.len() - self.dead
    }

    /// Records and index slots allocated (changes when the store grows).
    pub(super) fn capacity(&self) -> usize {
        self.recs.capacity()
            + self.keys.capacity()
            + self.owners.capacity()
            + self.index.capacity()
            + self.slots.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live records, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (K, &FlowRecord)> {
        self.keys.iter().zip(&self.recs).filter(|(_, r)| !r.dead()).map(|(k, r)| (*k, r))
    }

    /// Live records with their owners.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (K, u32, &mut FlowRecord)> {
        self.keys
            .iter()
            .zip(&self.owners)
            .zip(&mut self.recs)
            .filter(|(_, r)| !r.dead())
            .map(|((k, o), r)| (*k, *o, r))
    }

    /// Live records with an id above `after`, and the devices they count for.
    pub fn after_owned(&self, after: u64) -> impl Iterator<Item = (K, u32, &FlowRecord)> {
        let from = self.recs.partition_point(|r| r.id <= after);
        self.keys[from..]
            .iter()
            .zip(&self.owners[from..])
            .zip(&self.recs[from..])
            .filter(|(_, r)| !r.dead())
            .map(|((k, o), r)| (*k, *o, r))
    }

    /// Live records with an id above `after` whose key and owner pass `pick`;
    /// the records of the others are never read (a scan over the key and
    /// owner columns only: how one device's flows are found among a million).
    pub fn after_picked<'a>(
        &'a self,
        after: u64,
        pick: impl Fn(&K, u32) -> bool + 'a,
    ) -> impl Iterator<Item = (K, u32, &'a FlowRecord)> + 'a {
        let from = self.recs.partition_point(|r| r.id <= after);
        (from..self.keys.len())
            .filter(move |&i| self.owners[i] != DEAD_OWNER && pick(&self.keys[i], self.owners[i]))
            .map(move |i| (self.keys[i], self.owners[i], &self.recs[i]))
    }

    /// Live records with an id above `after`, in id order.
    pub fn after(&self, after: u64) -> impl Iterator<Item = (K, &FlowRecord)> {
        let from = self.recs.partition_point(|r| r.id <= after);
        self.keys[from..].iter().zip(&self.recs[from..]).filter(|(_, r)| !r.dead()).map(|(k, r)| (*k, r))
    }
}

/// Every flow record: IPv4 flows (both addresses IPv4-mapped, [`FlowKey::v4`])
/// under [`FlowKey4`], the others under [`FlowKey`]. Callers see `FlowKey`s.
#[derive(Debug, Default)]
pub struct Flows {
    pub(super) v4: FlowStore<FlowKey4>,
    pub(super) v6: FlowStore<FlowKey>,
}

impl Flows {
    /// The IPv4 flows' store (scans that can work on its 20-byte keys).
    pub fn v4(&self) -> &FlowStore<FlowKey4> {
        &self.v4
    }

    pub fn v6(&self) -> &FlowStore<FlowKey> {
        &self.v6
    }

    pub fn get(&self, k: &FlowKey) -> Option<&FlowRecord> {
        match k.v4() {
            Some(k4) => self.v4.get(&k4),
            None => self.v6.get(k),
        }
    }

    pub fn contains_key(&self, k: &FlowKey) -> bool {
        self.get(k).is_some()
    }

    /// `k`'s record and the device it counts for.
    pub(super) fn get_owned(&self, k: &FlowKey) -> Option<(&FlowRecord, u32)> {
        match k.v4() {
            Some(k4) => self.v4.position(&k4).map(|i| (&self.v4.recs[i], self.v4.owners[i])),
            None => self.v6.position(k).map(|i| (&self.v6.recs[i], self.v6.owners[i])),
        }
    }

    /// The key of a reverse direction of `k` the stores hold (the first found).
    pub(super) fn reverse_key(&self, k: &FlowKey) -> Option<FlowKey> {
        match k.v4() {
            Some(k4) => self.v4.reverse(&k4).map(|i| self.v4.keys[i].into()),
            None => self.v6.reverse(k).map(|i| self.v6.keys[i]),
        }
    }

    /// A reverse direction of `k` is held (on any interface).
    pub fn has_reverse(&self, k: &FlowKey) -> bool {
        match k.v4() {
            Some(k4) => self.v4.reverse(&k4).is_some(),
            None => self.v6.reverse(k).is_some(),
        }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every flow, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (FlowKey, &FlowRecord)> {
        self.v6.iter().chain(self.v4.iter().map(|(k, r)| (k.into(), r)))
    }

    /// Flows with an id above `after`, in id order (both stores merged).
    pub fn after(&self, after: u64) -> impl Iterator<Item = (FlowKey, &FlowRecord)> {
        self.after_owned(after).map(|(k, _, r)| (k, r))
    }

    /// [`Flows::after`] with each flow's owner (an index into `Devices`).
    pub fn after_owned(&self, after: u64) -> impl Iterator<Item = (FlowKey, u32, &FlowRecord)> {
        let mut a = self.v4.after_owned(after).map(|(k, o, r)| (FlowKey::from(k), o, r)).peekable();
        let mut b = self.v6.after_owned(after).peekable();
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some((_, _, x)), Some((_, _, y))) => {
                if x.id < y.id {
                    a.next()
                } else {
                    b.next()
                }
            }
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        })
    }

    pub(super) fn capacity(&self) -> usize {
        self.v4.capacity() + self.v6.capacity()
    }

    pub(super) fn remove(&mut self, k: &FlowKey) -> Option<(FlowRecord, u32)> {
        match k.v4() {
            Some(k4) => self.v4.remove(&k4),
            None => self.v6.remove(k),
        }
    }
}

impl std::ops::Index<&FlowKey> for Flows {
    type Output = FlowRecord;
    fn index(&self, k: &FlowKey) -> &FlowRecord {
        self.get(k).expect("no such flow")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> FlowKey4 {
        FlowKey4 {
            ifindex: 1,
            vlan: 0,
            proto: 17,
            _pad: 0,
            src: i.to_be_bytes(),
            dst: [10, 0, 0, 1],
            sport: 1,
            dport: 2,
        }
    }

    #[test]
    fn the_record_stays_small() {
        // The memory target (1M flows in 160 MiB with the index) rests on this.
        assert!(size_of::<FlowRecord>() <= 112, "{}", size_of::<FlowRecord>());
    }

    #[test]
    fn slot_hints_find_records_and_never_a_wrong_one() {
        let mut s = FlowStore::<FlowKey4>::default();
        for i in 0..10u32 {
            let p = s.push(key(i), 0, FlowRecord::new(i as u64 + 1, 0, 0, 0));
            s.remember(100 + i as usize, p);
        }
        assert_eq!(s.position_at(103, &key(3)), Some(3));
        // A slot now holding another flow: the hint is checked, the hash decides.
        assert_eq!(s.position_at(103, &key(7)), Some(7));
        assert_eq!(s.position_at(103, &key(99)), None);
        // A removed record is not found through its old slot.
        s.remove(&key(3));
        assert_eq!(s.position_at(103, &key(3)), None);
    }

    #[test]
    fn removal_and_compaction_keep_order_and_lookups() {
        let mut s = FlowStore::<FlowKey4>::default();
        let n = 3 * COMPACT_MIN as u32;
        for i in 0..n {
            s.push(key(i), 0, FlowRecord::new(i as u64 + 1, 0, 0, 0));
        }
        // Remove two thirds, which compacts at least once.
        for i in (0..n).filter(|i| i % 3 != 0) {
            assert_eq!(s.remove(&key(i)).unwrap().0.id, i as u64 + 1);
        }
        assert!(s.dead < COMPACT_MIN, "compacted");
        assert_eq!(s.len(), n as usize / 3);
        for i in 0..n {
            assert_eq!(s.get(&key(i)).map(|r| r.id), (i % 3 == 0).then_some(i as u64 + 1), "{i}");
        }
        let ids: Vec<u64> = s.after(100).map(|(_, r)| r.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ids.first(), Some(&103));
        assert_eq!(ids.len(), s.iter().filter(|(_, r)| r.id > 100).count());
    }
}

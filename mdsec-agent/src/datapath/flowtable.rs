//! The user half of the flow tables (`FLOWS4`, `FLOWS`; layout and concurrency
//! rules in `mdsec_common::flowtable`): the load-time geometry and hash seed, and
//! [`FlowTable`], a shared mapping of one table through which the agent reads
//! every flow, looks one up and removes idle ones without a syscall per entry.

use std::{
    io::Read,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU32, AtomicU64, Ordering, fence},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    EbpfLoader,
    maps::{Map, MapData},
};
use mdsec_common::{
    flow::{FlowKey, FlowKey4, FlowValue},
    flowtable::{
        EMPTY, FlowSet, MATCH_MASK, SLACK, STATUS_MASK, TableKey, VALID, WAYS, age, claim, emptied, place,
        published, sets_for,
    },
};

/// What the datapath's read-only globals must say for the tables it is loaded
/// with: their set counts and their hash seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub sets4: u32,
    pub sets6: u32,
    pub seed: u64,
}

impl Geometry {
    /// Tables of at least `slots4` IPv4 and `slots6` IPv6 flows.
    pub fn new(slots4: u32, slots6: u32, seed: u64) -> Geometry {
        Geometry { sets4: sets_for(slots4), sets6: sets_for(slots6), seed }
    }

    /// Sizes the tables (in sets) and patches the globals. Call before `load`.
    pub fn configure<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        use mdsec_common::maps as names;
        loader.map_max_entries(names::FLOWS4, self.sets4);
        loader.map_max_entries(names::FLOWS, self.sets6);
        loader.override_global("FLOW4_SETS", &self.sets4, true);
        loader.override_global("FLOW6_SETS", &self.sets6, true);
        loader.override_global("FLOW_HASH_SEED", &self.seed, true);
    }
}

/// Slots a table of at least `slots` has (whole sets).
pub fn capacity(slots: u32) -> u32 {
    sets_for(slots) * WAYS as u32
}

/// A fresh non-zero seed from the kernel's random pool.
pub fn random_seed() -> Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("read /dev/urandom")?;
    Ok(u64::from_ne_bytes(b) | 1)
}

/// A second handle on a loaded flow table (tests and benchmarks read the table
/// while the program keeps its own handle).
pub fn reopen(map: &Map) -> Result<Map> {
    let Map::Array(data) = map else { bail!("flow table is not an array map") };
    Ok(Map::Array(MapData::from_id(data.info()?.id())?))
}

/// One flow table, mapped shared: the datapath's memory itself.
pub struct FlowTable<K> {
    base: *mut FlowSet<K>,
    sets: u32,
    seed: u64,
    len: usize,
    // Keeps the map (and so the mapping's object) alive.
    _map: MapData,
    _k: PhantomData<K>,
}

// SAFETY: the mapping is plain shared memory; every access below goes through
// atomics or tolerates concurrent writers as documented on each method.
unsafe impl<K: Send> Send for FlowTable<K> {}

/// Snapshot retries of a slot that keeps changing (a writer holds it for
/// nanoseconds, so this only runs out on a pathological flood).
const READ_RETRIES: usize = 64;

impl<K: TableKey> FlowTable<K> {
    /// Maps the table `map` (an mmap-able array of `FlowSet<K>`), whose keys are
    /// hashed with `seed`.
    pub fn new(map: Map, seed: u64) -> Result<FlowTable<K>> {
        let Map::Array(data) = map else { bail!("flow table is not an array map") };
        let info = data.info().context("flow table info")?;
        ensure!(
            info.value_size() as usize == size_of::<FlowSet<K>>(),
            "flow table value size {} != {}",
            info.value_size(),
            size_of::<FlowSet<K>>()
        );
        let sets = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (sets as usize * size_of::<FlowSet<K>>()).div_ceil(page) * page;
        // SAFETY: mapping an mmap-able BPF array of this size at offset 0 is what
        // the kernel offers; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("mmap flow table: {}", std::io::Error::last_os_error());
        }
        Ok(FlowTable { base: p as *mut FlowSet<K>, sets, seed, len, _map: data, _k: PhantomData })
    }

    /// Live flows, and how many of them sit in their second candidate set
    /// (a lookup of those reads two set headers before the slot).
    pub fn placement(&self) -> (usize, usize)
    where
        K: TableKey,
    {
        let (mut live, mut second) = (0, 0);
        self.for_each(|slot, k, _| {
            live += 1;
            let at = place(k.hash(self.seed), self.sets);
            if (slot / WAYS) as u32 != at.first {
                second += 1;
            }
        });
        (live, second)
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.sets as usize * WAYS
    }

    fn set(&self, n: u32) -> *mut FlowSet<K> {
        assert!(n < self.sets);
        // SAFETY: within the mapping.
        unsafe { self.base.add(n as usize) }
    }

    fn state(&self, set: *mut FlowSet<K>, i: usize) -> &AtomicU32 {
        // SAFETY: a live, aligned u32 of the mapping; shared with the datapath,
        // which only touches it atomically or while it owns the slot.
        unsafe { AtomicU32::from_ptr(&raw mut (*set).state[i]) }
    }

    /// The slot's key and flow if it holds one, read consistently: the state word
    /// is the same before and after the copy, so the copy is of one flow (its
    /// counters may move during the copy; see `FlowValue::owned`).
    fn read(&self, set: *mut FlowSet<K>, i: usize) -> Option<(u32, K, FlowValue)> {
        for _ in 0..READ_RETRIES {
            let s = self.state(set, i).load(Ordering::Acquire);
            if s & STATUS_MASK != VALID {
                return None;
            }
            // SAFETY: in the mapping; volatile because the datapath writes it.
            let (k, mut v) = unsafe {
                let slot = &raw const (*set).slots[i];
                (
                    std::ptr::read_volatile(&raw const (*slot).key),
                    std::ptr::read_volatile(&raw const (*slot).value),
                )
            };
            // The counters again, in an order a plain copy does not promise:
            // totals before foreign counts, so a torn read under-states the
            // owner's share, never over-states it (the datapath adds foreign
            // counts first).
            // SAFETY: aligned u64s of the mapping, written atomically or by
            // single aligned stores.
            unsafe {
                let vp = &raw mut (*set).slots[i].value;
                let load = |p: *mut u64| AtomicU64::from_ptr(p).load(Ordering::Acquire);
                v.packets = load(&raw mut (*vp).packets);
                v.bytes = load(&raw mut (*vp).bytes);
                v.remote_packets = load(&raw mut (*vp).remote_packets);
                v.remote_bytes = load(&raw mut (*vp).remote_bytes);
                v.foreign_packets = load(&raw mut (*vp).foreign_packets);
                v.foreign_bytes = load(&raw mut (*vp).foreign_bytes);
            }
            let v = v.folded();
            fence(Ordering::Acquire);
            if self.state(set, i).load(Ordering::Relaxed) == s {
                return Some((s, k, v));
            }
        }
        None
    }

    /// Every flow in the table.
    pub fn snapshot(&self) -> Vec<(K, FlowValue)> {
        let mut out = Vec::new();
        self.for_each(|_, k, v| out.push((k, *v)));
        out
    }

    /// Calls `f` with every flow in the table and the index of its slot, each
    /// read consistently (the poller merges this way, with no copy of the
    /// table; the slot lets it find the flow's record again without a hash
    /// lookup).
    pub fn for_each(&self, mut f: impl FnMut(usize, K, &FlowValue)) {
        for n in 0..self.sets {
            let set = self.set(n);
            for i in 0..WAYS {
                if let Some((_, k, v)) = self.read(set, i) {
                    f(n as usize * WAYS + i, k, &v);
                }
            }
        }
    }

    /// (set, slot, state) holding `key`.
    fn find(&self, key: &K) -> Option<(*mut FlowSet<K>, usize, u32, FlowValue)> {
        let at = place(key.hash(self.seed), self.sets);
        for n in [at.first, at.second] {
            let set = self.set(n);
            for i in 0..WAYS {
                if self.state(set, i).load(Ordering::Relaxed) & MATCH_MASK != at.want {
                    continue;
                }
                if let Some((s, k, v)) = self.read(set, i)
                    && k.same(key)
                {
                    return Some((set, i, s, v));
                }
            }
        }
        None
    }

    pub fn get(&self, key: &K) -> Option<FlowValue> {
        self.find(key).map(|(_, _, _, v)| v)
    }

    /// The flow as the datapath holds it, home and remote counts apart (tests).
    pub fn get_unfolded(&self, key: &K) -> Option<FlowValue> {
        let (set, i, _, _) = self.find(key)?;
        // SAFETY: in the mapping.
        Some(unsafe { std::ptr::read_volatile(&raw const (*set).slots[i].value) })
    }

    /// Removes `key`'s flow if `idle` holds for it, as read now. The removal is a
    /// compare-and-swap of the state word seen with that read, so a flow that
    /// replaced it in the slot meanwhile is never removed. `None` if the flow is
    /// not in the table, else whether it was removed.
    pub fn remove_if(&self, key: &K, idle: impl Fn(&FlowValue) -> bool) -> Option<bool> {
        let (set, i, s, v) = self.find(key)?;
        Some(
            idle(&v)
                && self
                    .state(set, i)
                    .compare_exchange(s, emptied(s), Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok(),
        )
    }

    /// Writes a flow as the datapath would create it (benchmarks and tests fill
    /// tables this way; nothing else may insert meanwhile: no lock is taken).
    pub fn insert(&self, key: &K, value: &FlowValue) -> Result<()> {
        ensure!(self.find(key).is_none(), "flow already in the table");
        let at = place(key.hash(self.seed), self.sets);
        let free = |n: u32| {
            let set = self.set(n);
            (0..WAYS).filter(|&i| self.state(set, i).load(Ordering::Relaxed) & STATUS_MASK == EMPTY).count()
                as u32
        };
        // As the datapath chooses: the first set while it has slack, else the emptier.
        let (fa, fb) = (free(at.first), free(at.second));
        let order = if fa < SLACK && fb > fa { [at.second, at.first] } else { [at.first, at.second] };
        for n in order {
            let set = self.set(n);
            for i in 0..WAYS {
                let st = self.state(set, i);
                let s = st.load(Ordering::Relaxed);
                if s & STATUS_MASK != EMPTY
                    || st.compare_exchange(s, claim(s), Ordering::AcqRel, Ordering::Relaxed).is_err()
                {
                    continue;
                }
                // SAFETY: the slot is ours (BUSY) until published.
                unsafe {
                    let slot = &raw mut (*set).slots[i];
                    (*slot).key = *key;
                    (*slot).index = i as u32;
                    (*slot).value = *value;
                    (*set).age[i] = age(value.last_seen_ns);
                }
                st.store(published(claim(s), at.want), Ordering::Release);
                return Ok(());
            }
        }
        bail!("both sets of the flow are full")
    }

    /// Takes (`true`) or releases (`false`) the insert lock of `key`'s first set,
    /// as a datapath CPU in the middle of an insert would hold it (tests).
    pub fn set_insert_lock(&self, key: &K, held: bool) {
        let set = self.set(place(key.hash(self.seed), self.sets).first);
        // SAFETY: an aligned u32 of the mapping, only ever used atomically.
        unsafe { AtomicU32::from_ptr(&raw mut (*set).lock) }.store(held as u32, Ordering::Release);
    }

    /// Empties every slot (tests, between cases; nothing may run the datapath).
    pub fn clear(&self) {
        for n in 0..self.sets {
            let set = self.set(n);
            for i in 0..WAYS {
                let st = self.state(set, i);
                let s = st.load(Ordering::Relaxed);
                if s & STATUS_MASK != EMPTY {
                    st.store(emptied(s), Ordering::Release);
                }
            }
        }
    }
}

impl<K> Drop for FlowTable<K> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Both tables, and the rule for which holds a flow ([`FlowKey::v4`]).
pub struct FlowTables {
    pub v4: FlowTable<FlowKey4>,
    pub v6: FlowTable<FlowKey>,
}

impl FlowTables {
    pub fn new(flows4: Map, flows6: Map, seed: u64) -> Result<FlowTables> {
        Ok(FlowTables { v4: FlowTable::new(flows4, seed)?, v6: FlowTable::new(flows6, seed)? })
    }

    pub fn get(&self, k: &FlowKey) -> Option<FlowValue> {
        match k.v4() {
            Some(k4) => self.v4.get(&k4),
            None => self.v6.get(k),
        }
    }

    pub fn get_unfolded(&self, k: &FlowKey) -> Option<FlowValue> {
        match k.v4() {
            Some(k4) => self.v4.get_unfolded(&k4),
            None => self.v6.get_unfolded(k),
        }
    }

    pub fn remove_if(&self, k: &FlowKey, idle: impl Fn(&FlowValue) -> bool) -> Option<bool> {
        match k.v4() {
            Some(k4) => self.v4.remove_if(&k4, idle),
            None => self.v6.remove_if(k, idle),
        }
    }

    /// Every flow of both tables, IPv4 flows as IPv4-mapped keys.
    pub fn snapshot(&self) -> Vec<(FlowKey, FlowValue)> {
        let mut v = self.v6.snapshot();
        v.extend(self.v4.snapshot().into_iter().map(|(k, v)| (FlowKey::from(k), v)));
        v
    }

    pub fn clear(&self) {
        self.v4.clear();
        self.v6.clear();
    }
}

//! The agent's view of flows and devices, merged from kernel map snapshots.
//!
//! Kernel entries can disappear (eviction, idle ageing) and reappear with
//! counters starting from zero. Each record therefore keeps a `base` of everything
//! counted by earlier kernel incarnations, so reported counters never go backwards.
//!
//! A device's counters are its `DEVICES` entry plus the owned counts of its flows
//! (see `mdsec_common::flow`): live flow records are summed on every merge, and a
//! flow record's counts move into its device's `flow_base` when the record is
//! forgotten or changes owner.

mod flows;
mod reported;
mod role;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use flows::StoreKey;
pub use flows::{FlowRecord, FlowStore, Flows};
pub use reported::{LedgerEntry, ledger_path, read_ledger, write_ledger};
pub use role::Role;

use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::{FlowKey, FlowKey4, FlowValue},
    net::ip_from_key,
    stats::{Counter, Stat},
};

/// How many distinct addresses a device record remembers.
pub const MAX_DEVICE_IPS: usize = 32;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
}

impl Totals {
    fn new(packets: u64, bytes: u64) -> Totals {
        Totals { packets, bytes }
    }

    fn saturating_sub(self, o: Totals) -> Totals {
        Totals::new(self.packets.saturating_sub(o.packets), self.bytes.saturating_sub(o.bytes))
    }
}

impl std::ops::Add for Totals {
    type Output = Totals;
    fn add(self, o: Totals) -> Totals {
        Totals::new(self.packets + o.packets, self.bytes + o.bytes)
    }
}

impl std::ops::AddAssign for Totals {
    fn add_assign(&mut self, o: Totals) {
        *self = *self + o;
    }
}

/// Counters of one key across kernel incarnations (flows and devices).
/// 40 bytes, no tag: `kernel_first_ns == NO_ENTRY` means no current entry
/// (no clock reaches it), which keeps a flow record at 112 bytes.
#[derive(Debug, Clone)]
struct Monotonic {
    base: Totals,
    /// The current kernel entry's counts and first sighting.
    kernel: Totals,
    kernel_first_ns: u64,
}

const NO_ENTRY: u64 = u64::MAX;

impl Default for Monotonic {
    fn default() -> Self {
        Monotonic { base: Totals::default(), kernel: Totals::default(), kernel_first_ns: NO_ENTRY }
    }
}

impl Monotonic {
    /// Returns true when this is a new kernel entry replacing one this record saw
    /// (it was evicted and recreated between two reads).
    fn observe(&mut self, first_seen_ns: u64, packets: u64, bytes: u64) -> bool {
        // A new kernel entry: the previous one's counts are final.
        let replaced = self.kernel_first_ns != NO_ENTRY
            && (self.kernel_first_ns != first_seen_ns || packets < self.kernel.packets);
        if replaced {
            self.base += self.kernel;
        }
        self.kernel = Totals::new(packets, bytes);
        self.kernel_first_ns = first_seen_ns;
        replaced
    }

    /// The kernel entry is gone; keep its counts. Returns true if there was one.
    fn vanished(&mut self) -> bool {
        if self.kernel_first_ns == NO_ENTRY {
            return false;
        }
        self.base += std::mem::take(&mut self.kernel);
        self.kernel_first_ns = NO_ENTRY;
        true
    }

    /// The current kernel entry's first sighting and counts, if there is one.
    fn kernel(&self) -> Option<(u64, Totals)> {
        (self.kernel_first_ns != NO_ENTRY).then_some((self.kernel_first_ns, self.kernel))
    }

    fn totals(&self) -> Totals {
        self.base + self.kernel().map_or(Totals::default(), |(_, t)| t)
    }
}

/// A flow's counts for its owner across kernel incarnations. Incarnations are
/// told apart by the flow's own counters ([`Monotonic`]): owned counts read from
/// a changing entry can dip for a moment (see `FlowValue::owned`), so within one
/// incarnation the highest read stands.
#[derive(Debug, Clone, Default)]
struct Owned {
    base: Totals,
    now: Totals,
}

impl Owned {
    fn observe(&mut self, new_incarnation: bool, (packets, bytes): (u64, u64)) {
        if new_incarnation {
            self.vanished();
        }
        self.now = Totals::new(self.now.packets.max(packets), self.now.bytes.max(bytes));
    }

    fn vanished(&mut self) {
        self.base += std::mem::take(&mut self.now);
    }

    fn totals(&self) -> Totals {
        self.base + self.now
    }
}

#[derive(Debug, Clone)]
pub struct DeviceRecord {
    /// Its `DEVICES` entry: frames no flow it owns counts.
    counts: Monotonic,
    /// Owned counts of flow records already forgotten (or now owned by another MAC).
    flow_base: Totals,
    /// Owned counts of the live flow records, as of the last merge.
    flow_live: Totals,
    /// The last merge whose snapshot had this device's entry.
    seen: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Every address seen for this device, oldest dropped beyond [`MAX_DEVICE_IPS`].
    pub ips: BTreeSet<IpAddr>,
    /// Insertion order of `ips`, to know which is oldest.
    ip_order: Vec<IpAddr>,
    /// Gratuitous ARPs sent since the agent started (`DeviceValue::
    /// gratuitous_arps` differences, across re-created entries).
    pub gratuitous_arps: u64,
    /// The kernel entry they were last read from: (its first_seen, its count).
    garp_entry: (u64, u32),
}

impl DeviceRecord {
    fn new(first_seen_ns: u64, last_seen_ns: u64) -> DeviceRecord {
        DeviceRecord {
            counts: Monotonic::default(),
            flow_base: Totals::default(),
            flow_live: Totals::default(),
            seen: 0,
            first_seen_ns,
            last_seen_ns,
            ips: BTreeSet::new(),
            ip_order: Vec::new(),
            gratuitous_arps: 0,
            garp_entry: (0, 0),
        }
    }

    /// Adds what the kernel entry counted since the last read: all of it
    /// when the entry is a new one (evicted and created again).
    fn observe_garp(&mut self, entry_first_seen: u64, count: u32) {
        let (first, last) = self.garp_entry;
        let new = if first == entry_first_seen { count.wrapping_sub(last) } else { count };
        self.gratuitous_arps += new as u64;
        self.garp_entry = (entry_first_seen, count);
    }

    /// Every frame the device sent: its own entry and its flows.
    pub fn totals(&self) -> Totals {
        self.counts.totals() + self.flow_base + self.flow_live
    }

    fn remember_ip(&mut self, ip: IpAddr) {
        if ip.is_unspecified() || !self.ips.insert(ip) {
            return;
        }
        self.ip_order.push(ip);
        if self.ip_order.len() > MAX_DEVICE_IPS {
            let old = self.ip_order.remove(0);
            self.ips.remove(&old);
        }
    }
}

/// Device records, each with a stable index (flows name their owner by it).
/// Devices are never removed while the agent runs.
#[derive(Debug, Default)]
pub struct Devices {
    keys: Vec<DeviceKey>,
    recs: Vec<DeviceRecord>,
    index: HashMap<DeviceKey, u32>,
}

impl Devices {
    pub fn get(&self, k: &DeviceKey) -> Option<&DeviceRecord> {
        self.index.get(k).map(|&i| &self.recs[i as usize])
    }

    pub fn index_of(&self, k: &DeviceKey) -> Option<u32> {
        self.index.get(k).copied()
    }

    pub fn key(&self, i: u32) -> DeviceKey {
        self.keys[i as usize]
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &DeviceKey> {
        self.keys.iter()
    }

    /// Every device with its index, in the order first seen.
    pub fn iter(&self) -> impl Iterator<Item = (u32, DeviceKey, &DeviceRecord)> {
        self.keys.iter().zip(&self.recs).enumerate().map(|(i, (k, r))| (i as u32, *k, r))
    }

    /// `k`'s index, creating its record with `new` if it has none.
    fn index_or_insert(&mut self, k: DeviceKey, new: impl FnOnce() -> DeviceRecord) -> u32 {
        if let Some(&i) = self.index.get(&k) {
            return i;
        }
        let i = self.keys.len() as u32;
        self.keys.push(k);
        self.recs.push(new());
        self.index.insert(k, i);
        i
    }

    fn at_mut(&mut self, i: u32) -> &mut DeviceRecord {
        &mut self.recs[i as usize]
    }
}

impl std::ops::Index<&DeviceKey> for Devices {
    type Output = DeviceRecord;
    fn index(&self, k: &DeviceKey) -> &DeviceRecord {
        self.get(k).expect("no such device")
    }
}

#[derive(Debug, Default)]
pub struct Tables {
    pub flows: Flows,
    pub devices: Devices,
    /// Entries in the kernel maps at the last read (`kernel_flows`: both flow
    /// maps; `kernel_flows4`: FLOWS4's share).
    pub kernel_flows: usize,
    pub kernel_flows4: usize,
    pub kernel_devices: usize,
    /// Kernel entries that disappeared without the agent removing them: evicted
    /// (flows by the datapath, devices by the LRU; idle flows the agent ages out
    /// are not counted).
    pub flow_evictions: u64,
    /// FLOWS4's share of `flow_evictions`.
    pub flow4_evictions: u64,
    pub device_evictions: u64,
    /// Summed over CPUs, indexed like [`Stat::ALL`].
    pub stats: Vec<Counter>,
    /// Snapshots merged so far: records stamped with an older number were not in
    /// the latest one (cheaper than a set of the snapshot's keys at 1M flows).
    merges: u64,
    /// The next flow record's id (ids start at 1: 0 is "before every flow").
    next_id: u64,
    /// Totals an earlier run stored for devices this run has not merged yet, and
    /// when (datapath clock) this run took them over.
    stored: HashMap<DeviceKey, Totals>,
    stored_at_ns: u64,
    /// Forgotten directions whose reverse was still held: a conversation
    /// ends once both have (see [`Tables::forget_flow`]).
    half_ended: HashMap<Conversation, Side>,
    /// By record id: what the flow exports already reported of a live flow
    /// (only flows with an active-timeout record, or carried over from the
    /// previous run, have an entry).
    reported: HashMap<u64, reported::Reported>,
    /// The previous run's ledger, by key: taken over when its kernel entry is
    /// first merged ([`Tables::carry`]).
    carried: HashMap<FlowKey, LedgerEntry>,
    /// The datapath clock at the last [`Tables::due`] with an active timeout.
    active_scan_ns: u64,
}

/// Why a conversation's record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Both directions aged out (idle timeout; a flow the datapath evicted
    /// keeps its record until then).
    Timeout,
    /// A TCP conversation closed (a RST, or a FIN each way) and went quiet.
    Closed,
    /// Still open, but its last record is older than the active timeout: what
    /// came since (the conversation goes on).
    Active,
    /// The agent stops: every conversation still held, as it stands.
    Shutdown,
}

/// A conversation that ended: its client's direction (its sender opened
/// it, see [`role`]) and the server's, if the gateway saw one.
#[derive(Debug, Clone)]
pub struct Ended {
    pub client: Side,
    pub server: Option<Side>,
    pub reason: EndReason,
}

/// One direction of an ended conversation: its key, record and the MAC of the
/// device that owns it, and what this record reports of it.
#[derive(Debug, Clone)]
pub struct Side {
    pub key: FlowKey,
    pub rec: FlowRecord,
    pub mac: [u8; 6],
    /// The frames since the direction's previous record (all of them for its
    /// first): what exports count, so each frame goes out once.
    pub delta: Totals,
    /// Where this record's span starts: the first packet, or the last one the
    /// previous record covered.
    pub start_ns: u64,
}

impl Ended {
    /// Counts a frame this conversation's earlier records did not.
    fn has_news(&self) -> bool {
        self.client.delta.packets + self.server.as_ref().map_or(0, |s| s.delta.packets) > 0
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// The timeouts [`Tables::due`] applies (datapath-clock nanoseconds).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle_ns: u64,
    /// Closed TCP conversations (none: only the idle timeout ends them).
    pub closed_ns: Option<u64>,
    /// Long conversations' records (none: only when they end).
    pub active_ns: Option<u64>,
}

/// What one poll ends or reports ([`Tables::due`]).
#[derive(Debug, Default)]
pub struct Due {
    pub idle: Vec<FlowKey>,
    pub closed: Vec<FlowKey>,
    pub active: Vec<FlowKey>,
}

/// No packet for longer than `ns` before `now_ns`.
fn quiet(r: &FlowRecord, now_ns: u64, ns: u64) -> bool {
    now_ns.saturating_sub(r.last_seen_ns) > ns
}

/// A conversation's place in the active-timeout cycle, in `0..period`: the
/// same for both directions (the ends combined symmetrically) and on every
/// interface.
fn phase(k: &FlowKey, period: u64) -> u64 {
    let word = |a: &[u8; 16]| {
        u32::from_be_bytes([a[12], a[13], a[14], a[15]]) ^ u32::from_be_bytes([a[0], a[1], a[2], a[3]])
    };
    let ends = (word(&k.src) ^ word(&k.dst)) as u64;
    let x =
        (ends << 24 | ((k.sport ^ k.dport) as u64) << 8 | k.proto as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // The high half of x × period: uniform in 0..period, no division.
    ((x as u128 * period as u128) >> 64) as u64
}

/// Both directions of one conversation alike (any interface, any VLAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Conversation {
    proto: u8,
    a: ([u8; 16], u16),
    b: ([u8; 16], u16),
}

impl Conversation {
    fn of(k: &FlowKey) -> Conversation {
        let (x, y) = ((k.src, k.sport), (k.dst, k.dport));
        let (a, b) = if x <= y { (x, y) } else { (y, x) };
        Conversation { proto: k.proto, a, b }
    }
}

/// At most this many directions wait for their reverse to end; past it a
/// direction ends alone (its reverse then ends alone too).
const HALF_ENDED_MAX: usize = 100_000;

/// Orders two directions client first: by their settled roles, else the one
/// seen first.
fn paired(x: Side, y: Side, reason: EndReason) -> Ended {
    let x_client = match (x.rec.role(), y.rec.role()) {
        (role::Role::Client, role::Role::Server) => true,
        (role::Role::Server, role::Role::Client) => false,
        _ => x.rec.first_seen_ns <= y.rec.first_seen_ns,
    };
    let (client, server) = if x_client { (x, y) } else { (y, x) };
    Ended { client, server: Some(server), reason }
}

/// One merge in progress: flows are fed one by one as the poller reads the
/// kernel tables (no copy of a million flows), then [`Merge::finish`] merges
/// the devices and derives their totals.
pub struct Merge<'a> {
    t: &'a mut Tables,
    n: usize,
    n4: usize,
    capacity: usize,
    /// Records with a higher id were created by this merge.
    before: u64,
}

impl Merge<'_> {
    pub fn flow4(&mut self, k: FlowKey4, v: &FlowValue) {
        self.flow4_in(None, k, v)
    }

    /// A flow read from slot `slot` of the kernel's FLOWS4.
    pub fn flow4_at(&mut self, slot: usize, k: FlowKey4, v: &FlowValue) {
        self.flow4_in(Some(slot), k, v)
    }

    fn flow4_in(&mut self, slot: Option<usize>, k: FlowKey4, v: &FlowValue) {
        self.n4 += 1;
        let t = &mut *self.t;
        let found = match slot {
            Some(s) => t.flows.v4.position_at(s, &k),
            None => t.flows.v4.position(&k),
        };
        let i = match found {
            Some(i) => i,
            None => {
                let (r, owner) = t.new_record(&k.into(), v);
                t.flows.v4.push(k, owner, r)
            }
        };
        if let Some(s) = slot {
            t.flows.v4.remember(s, i);
        }
        let evicted = t.flows.v4.merge_at(i, &mut t.devices, t.merges, &k.into(), v) as u64;
        t.flow_evictions += evicted;
        t.flow4_evictions += evicted;
    }

    pub fn flow(&mut self, k: FlowKey, v: &FlowValue) {
        self.flow_in(None, k, v)
    }

    /// A flow read from slot `slot` of the kernel's FLOWS.
    pub fn flow_at(&mut self, slot: usize, k: FlowKey, v: &FlowValue) {
        self.flow_in(Some(slot), k, v)
    }

    fn flow_in(&mut self, slot: Option<usize>, k: FlowKey, v: &FlowValue) {
        if let Some(k4) = k.v4() {
            // Not a FLOWS4 slot: no hint for the IPv4 store.
            return self.flow4_in(None, k4, v);
        }
        let t = &mut *self.t;
        let found = match slot {
            Some(s) => t.flows.v6.position_at(s, &k),
            None => t.flows.v6.position(&k),
        };
        let i = match found {
            Some(i) => i,
            None => {
                let (r, owner) = t.new_record(&k, v);
                t.flows.v6.push(k, owner, r)
            }
        };
        if let Some(s) = slot {
            t.flows.v6.remember(s, i);
        }
        t.flow_evictions += t.flows.v6.merge_at(i, &mut t.devices, t.merges, &k, v) as u64;
        self.n += 1;
    }

    pub fn finish(self, devices: &[(DeviceKey, DeviceValue)]) {
        let t = self.t;
        t.kernel_flows = self.n + self.n4;
        t.kernel_flows4 = self.n4;
        // Roles after every flow is in: a new flow's reverse may be new too.
        for i in t.flows.v4.positions_after(self.before) {
            t.flows.v4.settle(i);
        }
        for i in t.flows.v6.positions_after(self.before) {
            t.flows.v6.settle(i);
        }
        t.merge_devices(devices);
        let old = t.derive_devices();
        t.credit_stored(old);
        if t.flows.capacity() != self.capacity {
            // A store grew: its old arrays were freed into the heap, where
            // glibc keeps them resident (about 10% of the tables at 1M
            // flows). Give them back; this happens once per doubling.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// Updates `r` from its kernel entry `v`; true if the entry replaced one the
/// record saw (an eviction).
fn merge_flow(
    devices: &mut Devices,
    merge: u64,
    (r, owner): (&mut FlowRecord, &mut u32),
    k: &FlowKey,
    v: &FlowValue,
) -> bool {
    r.seen = merge as u8;
    let replaced = r.counts.observe(v.first_seen_ns, v.packets, v.bytes);
    let now_owner = v.owner(k);
    if devices.key(*owner) != now_owner {
        // Recreated by another MAC: what the old owner sent stays its own.
        devices.at_mut(*owner).flow_base += std::mem::take(&mut r.owned).totals();
        *owner = devices.index_or_insert(now_owner, || device_of_flow(k, v));
    }
    r.owned.observe(replaced, v.owned());
    r.first_seen_ns = r.first_seen_ns.min(v.first_seen_ns);
    r.last_seen_ns = r.last_seen_ns.max(v.last_seen_ns);
    r.tcp_flags |= v.tcp_flags as u8;
    if r.open_flags == 0 {
        r.open_flags = v.open_tcp_flags();
    }
    r.verdict = v.verdict;
    r.rule = v.rule;
    // MAX_SEGMENTS (127) fits: the kernel never names a higher index.
    r.segment = u8::try_from(v.segment).unwrap_or(u8::MAX);
    r.generation = v.generation;
    r.app = v.app;
    r.app_confidence = v.app_confidence;
    r.set_app_done(v.app_done == mdsec_common::flow::APP_FINAL);
    replaced
}

/// A device first known from one of its flows (its `DEVICES` entry was never
/// read: evicted, or the map was full): the flow's source is its address.
fn device_of_flow(k: &FlowKey, v: &FlowValue) -> DeviceRecord {
    let mut d = DeviceRecord::new(v.first_seen_ns, v.last_seen_ns);
    d.remember_ip(k.src_ip());
    d
}

impl Tables {
    /// Merges one poll's snapshots of both maps.
    pub fn merge(&mut self, flows: &[(FlowKey, FlowValue)], devices: &[(DeviceKey, DeviceValue)]) {
        let mut m = self.begin_merge();
        for (k, v) in flows {
            m.flow(*k, v);
        }
        m.finish(devices);
    }

    /// Snapshots merged so far (a reader's "has anything changed").
    pub fn merges(&self) -> u64 {
        self.merges
    }

    /// Starts a merge: feed it every flow of the snapshot, then `finish` it.
    pub fn begin_merge(&mut self) -> Merge<'_> {
        self.merges += 1;
        let capacity = self.flows.capacity();
        let before = self.next_id.max(1) - 1;
        Merge { t: self, n: 0, n4: 0, capacity, before }
    }

    fn new_record(&mut self, k: &FlowKey, v: &FlowValue) -> (FlowRecord, u32) {
        self.next_id = self.next_id.max(1);
        let id = self.next_id;
        self.next_id += 1;
        let owner = self.devices.index_or_insert(v.owner(k), || device_of_flow(k, v));
        if !self.carried.is_empty()
            && let Some(c) = self.carried.remove(k)
            && c.kernel_first_ns == v.first_seen_ns
        {
            // The kernel entry the previous run reported (up to its stop).
            self.reported.insert(id, reported::Reported { totals: c.totals, last_seen_ns: c.last_seen_ns });
        }
        // Stamped with an older merge, so `merge_flow` sees a fresh record.
        (FlowRecord::new(id, v.first_seen_ns, v.last_seen_ns, self.merges.wrapping_sub(1) as u8), owner)
    }

    /// Takes over the previous run's ledger ([`reported`]): flows whose kernel
    /// entry it names report only what came after.
    pub fn carry(&mut self, ledger: Vec<LedgerEntry>) {
        self.carried = ledger.into_iter().map(|e| (e.key, e)).collect();
    }

    /// The ledger to leave for the next run once [`Tables::end_all`] has
    /// reported everything: each live flow's current kernel entry, as merged
    /// last. The next run reports only what its kernel entry counts beyond.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.flows
            .iter()
            .filter_map(|(key, r)| {
                let (kernel_first_ns, totals) = r.counts.kernel()?;
                Some(LedgerEntry { key, kernel_first_ns, totals, last_seen_ns: r.last_seen_ns })
            })
            .collect()
    }

    /// `rec`'s side of a record about to be written: the frames since its
    /// previous one.
    fn side(&self, key: FlowKey, rec: FlowRecord, mac: [u8; 6]) -> Side {
        let t = rec.totals();
        let (delta, start_ns) = match self.reported.get(&rec.id) {
            Some(p) => (t.saturating_sub(p.totals), p.last_seen_ns.max(rec.first_seen_ns)),
            None => (t, rec.first_seen_ns),
        };
        Side { key, rec, mac, delta, start_ns }
    }

    /// Totals the previous run stored (the state database), applied to each device
    /// when this run first sees it. A device's totals live partly in this agent's
    /// memory (the counts of flows it already forgot), so a restart would otherwise
    /// lose them; what the kernel still holds is counted once.
    ///
    /// `now_ns` is the datapath clock now: kernel entries created before it
    /// (pinned, from the earlier run) are in the stored totals already; later ones
    /// are new counts.
    pub fn expect_stored(&mut self, stored: impl IntoIterator<Item = (DeviceKey, Totals)>, now_ns: u64) {
        self.stored.extend(stored);
        self.stored_at_ns = now_ns;
    }

    /// `old`: per device with stored totals, the owned counts of its flows older
    /// than the takeover (already in the stored totals).
    fn credit_stored(&mut self, mut old: HashMap<DeviceKey, Totals>) {
        let (devices, at) = (&mut self.devices, self.stored_at_ns);
        self.stored.retain(|k, s| {
            let Some(i) = devices.index_of(k) else { return true };
            let d = devices.at_mut(i);
            let mut old = old.remove(k).unwrap_or_default();
            if let Some((first_seen, t)) = d.counts.kernel()
                && first_seen < at
            {
                old += t;
            }
            d.flow_base += s.saturating_sub(old);
            false
        });
    }

    fn merge_devices(&mut self, snapshot: &[(DeviceKey, DeviceValue)]) {
        let now = self.merges;
        for (k, v) in snapshot {
            let i = self.devices.index_or_insert(*k, || DeviceRecord::new(v.first_seen_ns, v.last_seen_ns));
            let r = self.devices.at_mut(i);
            r.seen = now;
            self.device_evictions += r.counts.observe(v.first_seen_ns, v.packets, v.bytes) as u64;
            r.observe_garp(v.first_seen_ns, v.gratuitous_arps);
            r.first_seen_ns = r.first_seen_ns.min(v.first_seen_ns);
            r.last_seen_ns = r.last_seen_ns.max(v.last_seen_ns);
            if v.ipv4 != [0; 4] {
                r.remember_ip(IpAddr::from(v.ipv4));
            }
            if v.ipv6 != [0; 16] {
                r.remember_ip(ip_from_key(v.ipv6));
            }
        }
        for r in &mut self.devices.recs {
            if r.seen != now {
                self.device_evictions += r.counts.vanished() as u64;
            }
        }
        self.kernel_devices = snapshot.len();
    }

    /// One pass over the flow records: those the snapshot lacked keep their
    /// counts (`vanished`), and every record's owned counts are summed into its
    /// device. Returns, for devices whose stored totals are not credited yet,
    /// the part from flows older than the takeover (see `credit_stored`).
    fn derive_devices(&mut self) -> HashMap<DeviceKey, Totals> {
        for d in &mut self.devices.recs {
            d.flow_live = Totals::default();
        }
        let now = self.merges as u8;
        let mut old: HashMap<DeviceKey, Totals> = HashMap::new();
        let (devices, stored, at) = (&mut self.devices, &self.stored, self.stored_at_ns);
        let mut evicted = (0, 0);
        let mut visit = |owner: u32, r: &mut FlowRecord, v4: bool| {
            if r.seen != now {
                let e = r.counts.vanished() as u64;
                evicted.0 += e;
                evicted.1 += e * v4 as u64;
                r.owned.vanished();
            }
            let t = r.owned.totals();
            let d = &mut devices.recs[owner as usize];
            d.flow_live += t;
            d.first_seen_ns = d.first_seen_ns.min(r.first_seen_ns);
            d.last_seen_ns = d.last_seen_ns.max(r.last_seen_ns);
            if r.first_seen_ns < at && !stored.is_empty() {
                let k = devices.keys[owner as usize];
                if stored.contains_key(&k) {
                    *old.entry(k).or_default() += t;
                }
            }
        };
        for (_, owner, r) in self.flows.v4.iter_mut() {
            visit(owner, r, true);
        }
        for (_, owner, r) in self.flows.v6.iter_mut() {
            visit(owner, r, false);
        }
        self.flow_evictions += evicted.0;
        self.flow4_evictions += evicted.1;
        old
    }

    pub fn set_stats(&mut self, per_cpu_sums: Vec<Counter>) {
        self.stats = per_cpu_sums;
    }

    pub fn stat(&self, s: Stat) -> Counter {
        self.stats.get(s as usize).copied().unwrap_or_default()
    }

    /// Whether `k` belongs to a closed TCP conversation quiet for `closed_ns`.
    /// Only flows that saw a FIN or RST themselves look their reverse up.
    fn closed(&self, k: &FlowKey, r: &FlowRecord, now_ns: u64, closed_ns: u64) -> bool {
        if k.proto != 6 || r.tcp_flags & (TCP_FIN | TCP_RST) == 0 || !quiet(r, now_ns, closed_ns) {
            return false;
        }
        match self.flows.reverse_key(k).and_then(|rk| self.flows.get(&rk)) {
            None => r.tcp_flags & TCP_RST != 0,
            Some(rev) => {
                (r.tcp_flags | rev.tcp_flags) & TCP_RST != 0
                    || (r.tcp_flags & rev.tcp_flags & TCP_FIN != 0 && quiet(rev, now_ns, closed_ns))
            }
        }
    }

    /// One pass over every record: what this poll ages out (idle, closed)
    /// and which long conversations report (see [`Tables::active_records`]).
    ///
    /// A conversation older than the active timeout reports each time the
    /// clock passes its phase (a hash of its addresses, ports and protocol,
    /// alike for both directions, modulo the timeout): once per timeout,
    /// spread evenly over the polls, with no per-flow timer to look up.
    pub fn due(&mut self, now_ns: u64, t: &Timeouts) -> Due {
        let window = t.active_ns.map(|a| {
            let prev = std::mem::replace(&mut self.active_scan_ns, now_ns);
            // The first scan only sets the clock; a stalled poller (a window
            // past the timeout) reports everything due once.
            if prev == 0 { 0 } else { now_ns.saturating_sub(prev).min(a) }
        });
        // `now mod a` once: per flow, `(now - phase) mod a` is then a
        // subtraction (no division in a pass over a million records).
        let now_in_cycle = t.active_ns.map_or(0, |a| now_ns % a);
        let mut due = Due::default();
        for (k, r) in self.flows.iter() {
            if quiet(r, now_ns, t.idle_ns) {
                due.idle.push(k);
            } else if t.closed_ns.is_some_and(|c| self.closed(&k, r, now_ns, c)) {
                due.closed.push(k);
            } else if let (Some(a), Some(w)) = (t.active_ns, window)
                && now_ns.saturating_sub(r.first_seen_ns) > a
            {
                let p = phase(&k, a);
                let since = if now_in_cycle >= p { now_in_cycle - p } else { now_in_cycle + a - p };
                if since < w {
                    due.active.push(k);
                }
            }
        }
        due
    }

    /// The active-timeout records of `keys` ([`Tables::due`]): one per
    /// conversation (both directions together) with frames since its last
    /// record, after which it reports again from there.
    pub fn active_records(&mut self, keys: Vec<FlowKey>) -> Vec<Ended> {
        let mut done: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let mut out = Vec::new();
        for k in keys {
            let Some(me) = self.live_side(&k) else { continue };
            if !done.insert(me.rec.id) {
                continue;
            }
            let other = self.flows.reverse_key(&k).and_then(|rk| self.live_side(&rk));
            let e = match other {
                Some(o) if done.insert(o.rec.id) => paired(me, o, EndReason::Active),
                _ => Ended { client: me, server: None, reason: EndReason::Active },
            };
            if !e.has_news() {
                continue;
            }
            for s in [Some(&e.client), e.server.as_ref()].into_iter().flatten() {
                let r = reported::Reported { totals: s.rec.totals(), last_seen_ns: s.rec.last_seen_ns };
                self.reported.insert(s.rec.id, r);
            }
            out.push(e);
        }
        out
    }

    /// A live flow's side for a record.
    fn live_side(&self, k: &FlowKey) -> Option<Side> {
        let (r, owner) = self.flows.get_owned(k)?;
        Some(self.side(*k, r.clone(), self.devices.key(owner).mac))
    }

    /// Drops an aged-out flow record; its counts stay with its device. Returns
    /// its conversation when this ended it: alone, or with its reverse when
    /// that ended before (a reverse still held keeps this one waiting). A
    /// conversation with nothing new since its last active record ends
    /// without one.
    pub fn forget_flow(&mut self, k: &FlowKey, reason: EndReason) -> Option<Ended> {
        let (mut r, owner) = self.flows.remove(k)?;
        let t = std::mem::take(&mut r.owned).totals();
        let d = self.devices.at_mut(owner);
        d.flow_base += t;
        d.flow_live = d.flow_live.saturating_sub(t);
        let side = self.side(*k, r, self.devices.key(owner).mac);
        self.reported.remove(&side.rec.id);
        let conv = Conversation::of(k);
        let e = if self.half_ended.get(&conv).is_some_and(|o| o.key.is_reverse_of(k)) {
            let other = self.half_ended.remove(&conv).expect("just found");
            paired(side, other, reason)
        } else if self.flows.has_reverse(k) && self.half_ended.len() < HALF_ENDED_MAX {
            self.half_ended.insert(conv, side);
            return None;
        } else {
            Ended { client: side, server: None, reason }
        };
        e.has_news().then_some(e)
    }

    /// Every conversation held, as it stands (the agent stops): live flows
    /// paired with their reverse, and directions waiting for theirs. Nothing
    /// is removed, and conversations with nothing new since their last
    /// active record are left out.
    pub fn end_all(&self) -> Vec<Ended> {
        let mut out = Vec::new();
        let mut halves: HashMap<Conversation, Side> = self.half_ended.clone();
        let mut live: Vec<Side> = self
            .flows
            .after_owned(0)
            .map(|(key, owner, r)| self.side(key, r.clone(), self.devices.key(owner).mac))
            .collect();
        // Oldest first, so a direction meets its reverse in a stable order.
        live.sort_by_key(|s| s.rec.id);
        for side in live {
            let conv = Conversation::of(&side.key);
            if halves.get(&conv).is_some_and(|o| o.key.is_reverse_of(&side.key)) {
                let other = halves.remove(&conv).expect("just found");
                out.push(paired(side, other, EndReason::Shutdown));
            } else if let Some(same_way) = halves.insert(conv, side) {
                // The same direction on another interface: a conversation of its own.
                out.push(Ended { client: same_way, server: None, reason: EndReason::Shutdown });
            }
        }
        let mut rest: Vec<Side> = halves.into_values().collect();
        rest.sort_by_key(|s| s.rec.id);
        out.extend(rest.into_iter().map(|c| Ended { client: c, server: None, reason: EndReason::Shutdown }));
        out.retain(Ended::has_news);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey { ifindex: 2, vlan: 0, proto: 17, _pad: 0, src: [1; 16], dst: [2; 16], sport, dport: 53 }
    }

    /// A flow on interface 2 between `src` and `dst` (each address all one byte).
    fn flow_key(proto: u8, src: u8, dst: u8, sport: u16, dport: u16) -> FlowKey {
        FlowKey { ifindex: 2, vlan: 0, proto, _pad: 0, src: [src; 16], dst: [dst; 16], sport, dport }
    }

    /// Flows idle `idle_ns`, as [`Tables::due`] finds them.
    fn idle(t: &mut Tables, now_ns: u64, idle_ns: u64) -> Vec<FlowKey> {
        t.due(now_ns, &Timeouts { idle_ns, closed_ns: None, active_ns: None }).idle
    }

    /// Closed conversations quiet `closed_ns` (nothing is idle).
    fn closed(t: &mut Tables, now_ns: u64, closed_ns: u64) -> Vec<FlowKey> {
        t.due(now_ns, &Timeouts { idle_ns: u64::MAX, closed_ns: Some(closed_ns), active_ns: None }).closed
    }

    /// The active records due now, as the poller builds them.
    fn active(t: &mut Tables, now_ns: u64, active_ns: u64) -> Vec<Ended> {
        let due = t.due(now_ns, &Timeouts { idle_ns: u64::MAX, closed_ns: None, active_ns: Some(active_ns) });
        t.active_records(due.active)
    }

    fn val(first: u64, packets: u64) -> FlowValue {
        FlowValue {
            packets,
            bytes: packets * 100,
            first_seen_ns: first,
            last_seen_ns: first + packets,
            ..Default::default()
        }
    }

    #[test]
    fn roles_come_from_the_handshake_or_the_reverse_on_any_interface() {
        let v4 = |b: u8| {
            let mut a = [0u8; 16];
            a[10] = 0xff;
            a[11] = 0xff;
            a[15] = b;
            a
        };
        let k = |ifindex, proto, src, dst, sport, dport| FlowKey {
            ifindex,
            vlan: 0,
            proto,
            _pad: 0,
            src: v4(src),
            dst: v4(dst),
            sport,
            dport,
        };
        let tcp =
            |flags: u8| FlowValue { tcp_flags: mdsec_common::flow::first_tcp_flags(flags), ..val(10, 1) };
        let mut t = Tables::default();
        // A scan probe from port 53, unanswered: its sender is the client.
        let probe = k(2, 17, 9, 1, 53, 40000);
        // A DNS query whose answer enters by another interface, in the same merge.
        let (q, a) = (k(2, 17, 1, 2, 40000, 53), k(3, 17, 2, 1, 53, 40000));
        // TCP from a low source port to a high service port, the client side first.
        let (c, s) = (k(2, 6, 1, 3, 1000, 8443), k(3, 6, 3, 1, 8443, 1000));
        t.merge(&[(probe, val(1, 1)), (q, val(20, 1)), (a, val(10, 1)), (c, tcp(0x02))], &[]);
        // An answer read a poll before its query (the kernel table is read slot by
        // slot while it changes), and twice: a routed port and a bump's core port
        // each see it. The query settles both.
        let (q2, a2, a3) = (k(2, 17, 1, 2, 40001, 53), k(3, 17, 2, 1, 53, 40001), k(4, 17, 2, 1, 53, 40001));
        t.merge(&[(a2, val(10, 1)), (a3, val(10, 1))], &[]);
        t.merge(&[(q2, val(20, 1))], &[]);
        assert_eq!((t.flows[&a2].role(), t.flows[&a3].role()), (Role::Server, Role::Server), "every reverse");
        assert_eq!(t.flows[&probe].role(), Role::Client);
        assert_eq!((t.flows[&q].role(), t.flows[&a].role()), (Role::Client, Role::Server));
        assert_eq!(t.flows[&c].role(), Role::Client);
        // The answers arrive a poll later: the probe's answer settles it by the ports.
        let answer = k(2, 17, 1, 9, 40000, 53);
        t.merge(&[(probe, val(1, 1)), (answer, val(2, 1)), (c, tcp(0x02)), (s, tcp(0x12))], &[]);
        assert_eq!((t.flows[&probe].role(), t.flows[&answer].role()), (Role::Server, Role::Client));
        assert_eq!((t.flows[&c].role(), t.flows[&s].role()), (Role::Client, Role::Server));
    }

    #[test]
    fn a_conversation_ends_once_with_both_directions_client_first() {
        let k = |ifindex, src: u8, dst: u8, sport, dport| FlowKey {
            ifindex,
            vlan: 0,
            proto: 17,
            _pad: 0,
            src: [src; 16],
            dst: [dst; 16],
            sport,
            dport,
        };
        // A query and its answer on another interface; a lone probe.
        let (q, a, lone) = (k(2, 1, 2, 40000, 53), k(3, 2, 1, 53, 40000), k(2, 1, 9, 40001, 161));
        let mut t = Tables::default();
        t.merge(&[(q, val(10, 3)), (a, val(20, 2)), (lone, val(30, 4))], &[]);
        // The answer ages out first: the query still runs, nothing ends yet.
        assert!(t.forget_flow(&a, EndReason::Timeout).is_none());
        let e = t.forget_flow(&q, EndReason::Timeout).expect("both directions gone");
        assert_eq!(e.reason, EndReason::Timeout);
        assert_eq!(e.client.key, q, "the query's sender is the client");
        assert_eq!(e.client.rec.totals(), Totals { packets: 3, bytes: 300 });
        let s = e.server.expect("the answer");
        assert_eq!((s.key, s.rec.totals().packets), (a, 2));
        let alone = t.forget_flow(&lone, EndReason::Timeout).expect("no reverse: ends alone");
        assert!(alone.server.is_none() && alone.client.key == lone);
        assert!(t.forget_flow(&lone, EndReason::Timeout).is_none(), "ends once");
        // At a stop, every conversation held ends as it stands, paired, nothing removed.
        t.merge(&[(q, val(40, 1)), (a, val(41, 1)), (lone, val(42, 1))], &[]);
        assert!(t.forget_flow(&a, EndReason::Timeout).is_none());
        let all = t.end_all();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.iter().all(|e| e.reason == EndReason::Shutdown));
        let pair = all.iter().find(|e| e.server.is_some()).unwrap();
        assert_eq!((pair.client.key, pair.server.as_ref().unwrap().key), (q, a));
        assert_eq!(t.flows.len(), 2);
    }

    #[test]
    fn active_records_and_the_end_add_up_to_every_frame_once() {
        let k = |src, dst, sport, dport| flow_key(17, src, dst, sport, dport);
        let (q, a) = (k(1, 2, 40000, 53), k(2, 1, 53, 40000));
        assert_eq!(phase(&q, 1000), phase(&a, 1000), "both directions share a phase");
        let at = |first: u64, last: u64, packets: u64| FlowValue {
            packets,
            bytes: packets * 100,
            first_seen_ns: first,
            last_seen_ns: last,
            ..Default::default()
        };
        let mut t = Tables::default();
        // Polls every 50 ns for 6 active timeouts; a frame each way every 100.
        let (mut records, mut sent) = (Vec::new(), (0, 0));
        for now in (50..=6000).step_by(50) {
            if now % 100 == 0 {
                sent = (sent.0 + 1, sent.1 + 1);
                t.merge(&[(q, at(10, now, sent.0)), (a, at(20, now, sent.1))], &[]);
            }
            for e in active(&mut t, now, 1000) {
                records.push((now, e));
            }
        }
        let times: Vec<u64> = records.iter().map(|(n, _)| *n).collect();
        assert!(times.len() >= 4 && times.len() <= 6, "one per timeout after the first: {times:?}");
        assert!(times[0] > 1010, "not before the conversation is a timeout old: {times:?}");
        assert!(times.windows(2).all(|w| w[1] - w[0] == 1000), "once per timeout: {times:?}");
        for (_, e) in &records {
            assert_eq!(e.reason, EndReason::Active);
            assert_eq!(e.client.key, q, "the query's sender is the client");
            assert!(e.server.as_ref().is_some_and(|s| s.key == a), "both directions in one record");
        }
        // The end reports only what the active records did not.
        assert!(t.forget_flow(&a, EndReason::Timeout).is_none());
        let end = t.forget_flow(&q, EndReason::Timeout).unwrap();
        let count = |e: &Ended| (e.client.delta.packets, e.server.as_ref().map_or(0, |s| s.delta.packets));
        let (up, down) = records
            .iter()
            .map(|(_, e)| count(e))
            .chain([count(&end)])
            .fold((0, 0), |x, y| (x.0 + y.0, x.1 + y.1));
        assert_eq!((up, down), sent, "every frame exactly once");
        assert_eq!(
            records[1].1.client.start_ns, records[0].1.client.rec.last_seen_ns,
            "a later record starts where the last one ended"
        );
        assert!(t.reported.is_empty(), "nothing left behind for forgotten flows");
        // Nothing new since the last record: neither an active record nor an end record.
        let mut t = Tables::default();
        t.merge(&[(q, at(10, 20, 3))], &[]);
        assert_eq!(active(&mut t, 50, 1000).len(), 0, "the first scan only starts the clock");
        let first: usize = (100..=3000).step_by(50).map(|now| active(&mut t, now, 1000).len()).sum();
        assert_eq!(first, 1);
        assert!(t.forget_flow(&q, EndReason::Timeout).is_none(), "reported already, nothing since");
    }

    #[test]
    fn closed_tcp_conversations_end_after_their_quiet_time() {
        let k = |src, dst, sport, dport| flow_key(6, src, dst, sport, dport);
        let v = |flags: u64, last: u64| FlowValue {
            packets: 4,
            bytes: 400,
            first_seen_ns: 1,
            last_seen_ns: last,
            tcp_flags: flags,
            ..Default::default()
        };
        let (c, s) = (k(1, 2, 40000, 443), k(2, 1, 443, 40000));
        let (c2, s2) = (k(1, 2, 40001, 443), k(2, 1, 443, 40001));
        let (r, lone) = (k(1, 2, 40002, 443), k(1, 3, 40003, 22));
        let mut t = Tables::default();
        t.merge(
            &[
                (c, v(0x13, 100)),  // FIN from the client...
                (s, v(0x12, 100)),  // ...but none back: still open.
                (c2, v(0x11, 100)), // FIN each way: closed.
                (s2, v(0x11, 150)),
                (r, v(0x14, 100)),    // a RST, no reverse: closed.
                (lone, v(0x11, 100)), // one FIN, no reverse: may be a one-way view.
            ],
            &[],
        );
        let mut got = closed(&mut t, 200, 60);
        got.sort_by_key(|k| k.sport);
        assert_eq!(got, vec![r], "the server's FIN is only 50 ns quiet: the pair waits for it");
        let got: BTreeSet<_> = closed(&mut t, 300, 60).into_iter().map(|k| (k.sport, k.dport)).collect();
        assert_eq!(got, [c2, r, s2].iter().map(|k| (k.sport, k.dport)).collect());
        assert!(closed(&mut t, 120, 60).is_empty(), "nothing quiet long enough");
    }

    #[test]
    fn the_ledger_carries_what_was_reported_over_a_restart() {
        let k = |sport| flow_key(17, 1, 2, sport, 53);
        let mut before = Tables::default();
        before.merge(&[(k(1), val(10, 5)), (k(2), val(20, 7))], &[]);
        let stopped: u64 = before.end_all().iter().map(|e| e.client.delta.packets).sum();
        assert_eq!(stopped, 12);
        let ledger = before.ledger();
        assert_eq!(ledger.len(), 2);
        // The next run: flow 1's kernel entry counted on; flow 2's was
        // recreated meanwhile (another first sighting): all of it is new.
        let mut after = Tables::default();
        after.carry(ledger);
        after.merge(&[(k(1), val(10, 8)), (k(2), val(900, 2))], &[]);
        let mut again: Vec<(u16, u64)> =
            after.end_all().iter().map(|e| (e.client.key.sport, e.client.delta.packets)).collect();
        again.sort();
        assert_eq!(again, vec![(1, 3), (2, 2)], "only what came after the stop");
    }

    #[test]
    fn counters_survive_eviction_and_recreation() {
        let mut t = Tables::default();
        t.merge(&[(key(1), val(10, 5))], &[]);
        assert_eq!(t.flows[&key(1)].totals(), Totals { packets: 5, bytes: 500 });
        t.merge(&[(key(1), val(10, 8))], &[]);
        assert_eq!(t.flows[&key(1)].totals().packets, 8);
        // Evicted by the LRU: nothing lost.
        t.merge(&[], &[]);
        assert_eq!(t.flows[&key(1)].totals().packets, 8);
        // Recreated with fresh counters.
        t.merge(&[(key(1), val(50, 2))], &[]);
        assert_eq!(t.flows[&key(1)].totals(), Totals { packets: 10, bytes: 1000 });
        // Recreated between two polls (never seen missing).
        t.merge(&[(key(1), val(90, 1))], &[]);
        assert_eq!(t.flows[&key(1)].totals().packets, 11);
        assert_eq!(t.flows[&key(1)].first_seen_ns, 10);
        assert_eq!(t.flows[&key(1)].last_seen_ns, 91);
        // Both disappearances were evictions: one seen missing, one recreated.
        assert_eq!(t.flow_evictions, 2);
        assert_eq!(t.kernel_flows, 1);
    }

    #[test]
    fn idle_flows_are_found_and_forgotten() {
        let mut t = Tables::default();
        t.merge(&[(key(1), val(10, 1)), (key(2), val(1000, 1))], &[]);
        assert_eq!(idle(&mut t, 1100, 500), vec![key(1)]);
        t.forget_flow(&key(1), EndReason::Timeout);
        assert!(!t.flows.contains_key(&key(1)));
    }

    fn owned_by(mut v: FlowValue, mac: [u8; 6], foreign: u64) -> FlowValue {
        v.src_mac = mac;
        v.foreign_packets = foreign;
        v.foreign_bytes = foreign * 100;
        v
    }

    #[test]
    fn gratuitous_arps_add_up_across_reads_and_recreated_entries() {
        let mut t = Tables::default();
        let k = DeviceKey { ifindex: 2, vlan: 0, mac: [2, 0, 0, 0, 0, 1] };
        let entry = |first_seen_ns, gratuitous_arps| DeviceValue {
            first_seen_ns,
            last_seen_ns: first_seen_ns,
            packets: 1,
            gratuitous_arps,
            ..Default::default()
        };
        let garps = |t: &Tables| t.devices.iter().map(|(_, _, r)| r.gratuitous_arps).sum::<u64>();
        t.merge(&[], &[(k, entry(5, 5))]);
        t.merge(&[], &[(k, entry(5, 9))]);
        assert_eq!(garps(&t), 9);
        // Evicted and created again: its count starts over.
        t.merge(&[], &[(k, entry(50, 2))]);
        assert_eq!(garps(&t), 11);
        // The counter wraps.
        t.merge(&[], &[(k, entry(50, u32::MAX))]);
        t.merge(&[], &[(k, entry(50, 3))]);
        assert_eq!(garps(&t), 11 + (u32::MAX as u64 - 2) + 4);
    }

    #[test]
    fn devices_count_their_own_flows_and_keep_them_when_flows_go() {
        let mut t = Tables::default();
        let (a, b) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        let dev = |mac| DeviceKey { ifindex: 2, vlan: 0, mac };
        let entry = |packets| DeviceValue {
            first_seen_ns: 5,
            last_seen_ns: 6,
            packets,
            bytes: packets * 10,
            ..Default::default()
        };
        // A owns two flows; 2 frames of the second came from B (counted in B's entry).
        t.merge(
            &[(key(1), owned_by(val(10, 5), a, 0)), (key(2), owned_by(val(20, 4), a, 2))],
            &[(dev(a), entry(3)), (dev(b), entry(2))],
        );
        assert_eq!(t.devices[&dev(a)].totals(), Totals { packets: 3 + 5 + 2, bytes: 30 + 500 + 200 });
        assert_eq!(t.devices[&dev(b)].totals().packets, 2);
        assert_eq!(t.devices[&dev(a)].last_seen_ns, 24, "latest flow packet");
        // Flow 1 grows, then is evicted (kept as a record), then aged out.
        t.merge(&[(key(1), owned_by(val(10, 7), a, 0))], &[(dev(a), entry(3))]);
        assert_eq!(t.devices[&dev(a)].totals().packets, 3 + 7 + 2);
        t.merge(&[], &[(dev(a), entry(3))]);
        assert_eq!(t.devices[&dev(a)].totals().packets, 3 + 7 + 2);
        t.forget_flow(&key(1), EndReason::Timeout);
        t.forget_flow(&key(2), EndReason::Timeout);
        assert_eq!(t.devices[&dev(a)].totals().packets, 3 + 7 + 2);
        t.merge(&[], &[(dev(a), entry(3))]);
        assert_eq!(t.devices[&dev(a)].totals().packets, 3 + 7 + 2);
        // Recreated by B: A keeps what it sent, B gets the new incarnation.
        t.merge(&[(key(3), owned_by(val(30, 4), a, 0))], &[]);
        t.merge(&[(key(3), owned_by(val(40, 1), b, 0))], &[]);
        assert_eq!(t.devices[&dev(a)].totals().packets, 3 + 7 + 2 + 4);
        assert_eq!(t.devices[&dev(b)].totals().packets, 2 + 1);
        // A flow whose device entry was never read still makes a device.
        let c = [2, 0, 0, 0, 0, 0xc];
        t.merge(&[(key(4), owned_by(val(50, 6), c, 0))], &[]);
        assert_eq!(t.devices[&dev(c)].totals().packets, 6);
        assert!(t.devices[&dev(c)].ips.contains(&key(4).src_ip()));
    }

    #[test]
    fn a_torn_read_of_owned_counts_never_takes_a_device_backwards() {
        let mut t = Tables::default();
        let a = [2, 0, 0, 0, 0, 0xa];
        let dev = DeviceKey { ifindex: 2, vlan: 0, mac: a };
        t.merge(&[(key(1), owned_by(val(10, 5), a, 1))], &[]);
        assert_eq!(t.devices[&dev].totals().packets, 4);
        // A copy taken between the datapath's two adds: foreign counted, packets not yet.
        let mut torn = owned_by(val(10, 5), a, 2);
        torn.bytes = 500;
        t.merge(&[(key(1), torn)], &[]);
        assert_eq!(t.devices[&dev].totals().packets, 4, "no dip, and not a new incarnation");
        t.merge(&[(key(1), owned_by(val(10, 6), a, 2))], &[]);
        assert_eq!(t.devices[&dev].totals().packets, 4);
        t.merge(&[(key(1), owned_by(val(10, 8), a, 2))], &[]);
        assert_eq!(t.devices[&dev].totals().packets, 6);
    }

    #[test]
    fn a_restart_keeps_what_the_previous_run_counted() {
        let mut t = Tables::default();
        let a = [2, 0, 0, 0, 0, 0xa];
        let dev = DeviceKey { ifindex: 2, vlan: 0, mac: a };
        // The last run stored 100 frames (taken over at t=1000); the kernel still
        // holds a flow of 30 from before, and a new one of 4 started since.
        t.expect_stored([(dev, Totals { packets: 100, bytes: 10_000 })], 1000);
        t.merge(&[], &[]);
        t.merge(&[(key(1), owned_by(val(10, 30), a, 0)), (key(2), owned_by(val(2000, 4), a, 0))], &[]);
        assert_eq!(t.devices[&dev].totals(), Totals { packets: 104, bytes: 10_400 });
        // Counting goes on from there, once.
        t.merge(&[(key(1), owned_by(val(10, 35), a, 0)), (key(2), owned_by(val(2000, 4), a, 0))], &[]);
        assert_eq!(t.devices[&dev].totals().packets, 109);
        // A device the old entries say sent more than was stored keeps that.
        let b = DeviceKey { ifindex: 2, vlan: 0, mac: [2, 0, 0, 0, 0, 0xb] };
        t.expect_stored([(b, Totals { packets: 1, bytes: 1 })], 1000);
        t.merge(&[(key(3), owned_by(val(10, 9), b.mac, 0))], &[]);
        assert_eq!(t.devices[&b].totals().packets, 9);
    }

    #[test]
    fn device_ips_accumulate_and_stay_bounded() {
        let mut t = Tables::default();
        let k = DeviceKey { ifindex: 2, vlan: 0, mac: [2, 0, 0, 0, 0, 1] };
        for i in 0..40u8 {
            let v = DeviceValue {
                first_seen_ns: 1,
                last_seen_ns: 2,
                packets: 1 + i as u64,
                ipv4: [10, 0, 0, i],
                ..Default::default()
            };
            t.merge(&[], &[(k, v)]);
        }
        let ips = &t.devices[&k].ips;
        assert_eq!(ips.len(), MAX_DEVICE_IPS);
        assert!(ips.contains(&"10.0.0.39".parse().unwrap()));
        assert!(!ips.contains(&"10.0.0.0".parse().unwrap()));
        assert_eq!(t.devices[&k].totals().packets, 40);
    }
}

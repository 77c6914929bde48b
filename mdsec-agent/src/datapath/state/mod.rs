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
mod role;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

pub use flows::{FlowRecord, FlowStore, Flows};
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
        }
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
    r.set_app_done(v.app_done != 0);
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
        // Stamped with an older merge, so `merge_flow` sees a fresh record.
        (FlowRecord::new(id, v.first_seen_ns, v.last_seen_ns, self.merges.wrapping_sub(1) as u8), owner)
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

    /// Flows with no packet for longer than `idle_ns` before `now_ns`.
    pub fn idle_flows(&self, now_ns: u64, idle_ns: u64) -> Vec<FlowKey> {
        self.flows
            .iter()
            .filter(|(_, r)| now_ns.saturating_sub(r.last_seen_ns) > idle_ns)
            .map(|(k, _)| k)
            .collect()
    }

    /// Drops an aged-out flow record; its counts stay with its device.
    pub fn forget_flow(&mut self, k: &FlowKey) {
        if let Some((mut r, owner)) = self.flows.remove(k) {
            let t = std::mem::take(&mut r.owned).totals();
            let d = self.devices.at_mut(owner);
            d.flow_base += t;
            d.flow_live = d.flow_live.saturating_sub(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey { ifindex: 2, vlan: 0, proto: 17, _pad: 0, src: [1; 16], dst: [2; 16], sport, dport: 53 }
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
        assert_eq!(t.idle_flows(1100, 500), vec![key(1)]);
        t.forget_flow(&key(1));
        assert!(!t.flows.contains_key(&key(1)));
    }

    fn owned_by(mut v: FlowValue, mac: [u8; 6], foreign: u64) -> FlowValue {
        v.src_mac = mac;
        v.foreign_packets = foreign;
        v.foreign_bytes = foreign * 100;
        v
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
        t.forget_flow(&key(1));
        t.forget_flow(&key(2));
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

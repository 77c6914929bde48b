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

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

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

/// Counters of one key across kernel incarnations.
#[derive(Debug, Clone, Default)]
struct Monotonic {
    base: Totals,
    /// (first_seen_ns, packets, bytes) of the current kernel entry.
    kernel: Option<(u64, u64, u64)>,
}

impl Monotonic {
    /// Returns true when this is a new kernel entry replacing one this record saw
    /// (it was evicted and recreated between two reads).
    fn observe(&mut self, first_seen_ns: u64, packets: u64, bytes: u64) -> bool {
        let mut replaced = false;
        // A new kernel entry: the previous one's counts are final.
        if let Some((f, p, b)) = self.kernel
            && (f != first_seen_ns || packets < p)
        {
            self.base += Totals::new(p, b);
            replaced = true;
        }
        self.kernel = Some((first_seen_ns, packets, bytes));
        replaced
    }

    /// The kernel entry is gone; keep its counts. Returns true if there was one.
    fn vanished(&mut self) -> bool {
        match self.kernel.take() {
            Some((_, p, b)) => {
                self.base += Totals::new(p, b);
                true
            }
            None => false,
        }
    }

    fn totals(&self) -> Totals {
        self.base + self.kernel.map_or(Totals::default(), |(_, p, b)| Totals::new(p, b))
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
pub struct FlowRecord {
    counts: Monotonic,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub tcp_flags: u8,
    /// Policy fields of the latest kernel snapshot.
    pub verdict: u8,
    pub rule: u32,
    pub segment: u32,
    pub generation: u32,
    pub app: u8,
    pub app_confidence: u8,
    /// The first payload has been classified (`app`/`app_confidence` are final).
    pub app_done: bool,
    /// The device the flow's own frames count for, and those counts.
    owner: DeviceKey,
    owned: Owned,
    /// The last merge whose snapshot had this flow (see `Tables::merges`).
    seen: u64,
}

impl FlowRecord {
    pub fn totals(&self) -> Totals {
        self.counts.totals()
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

#[derive(Debug, Default)]
pub struct Tables {
    pub flows: HashMap<FlowKey, FlowRecord>,
    pub devices: HashMap<DeviceKey, DeviceRecord>,
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
    /// Totals an earlier run stored for devices this run has not merged yet, and
    /// when (datapath clock) this run took them over.
    stored: HashMap<DeviceKey, Totals>,
    stored_at_ns: u64,
}

impl Tables {
    /// Merges one poll's snapshots of both maps.
    pub fn merge(&mut self, flows: &[(FlowKey, FlowValue)], devices: &[(DeviceKey, DeviceValue)]) {
        self.merge_iter(flows.iter().copied(), devices);
    }

    /// Merges the snapshots as the poller reads them, FLOWS and FLOWS4 apart (no
    /// combined copy of a million flows).
    pub fn merge_maps(
        &mut self,
        flows: &[(FlowKey, FlowValue)],
        flows4: &[(FlowKey4, FlowValue)],
        devices: &[(DeviceKey, DeviceValue)],
    ) {
        self.merge_iter(
            flows.iter().copied().chain(flows4.iter().map(|(k, v)| (FlowKey::from(*k), *v))),
            devices,
        );
    }

    fn merge_iter(
        &mut self,
        flows: impl Iterator<Item = (FlowKey, FlowValue)>,
        devices: &[(DeviceKey, DeviceValue)],
    ) {
        self.merges += 1;
        self.merge_flows(flows);
        self.merge_devices(devices);
        let old = self.derive_devices();
        self.credit_stored(old);
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
            let Some(d) = devices.get_mut(k) else { return true };
            let mut old = old.remove(k).unwrap_or_default();
            if let Some((first_seen, p, b)) = d.counts.kernel
                && first_seen < at
            {
                old += Totals::new(p, b);
            }
            d.flow_base += s.saturating_sub(old);
            false
        });
    }

    fn merge_flows(&mut self, snapshot: impl Iterator<Item = (FlowKey, FlowValue)>) {
        let now = self.merges;
        let (mut n, mut n4) = (0, 0);
        for (k, v) in snapshot {
            let v4 = k.is_v4() as u64;
            n += 1;
            n4 += v4 as usize;
            let r = self.flows.entry(k).or_insert_with(|| FlowRecord {
                counts: Monotonic::default(),
                first_seen_ns: v.first_seen_ns,
                last_seen_ns: v.last_seen_ns,
                tcp_flags: 0,
                verdict: 0,
                rule: 0,
                segment: 0,
                generation: 0,
                app: 0,
                app_confidence: 0,
                app_done: false,
                owner: v.owner(&k),
                owned: Owned::default(),
                seen: now,
            });
            r.seen = now;
            let replaced = r.counts.observe(v.first_seen_ns, v.packets, v.bytes);
            let evicted = replaced as u64;
            self.flow_evictions += evicted;
            self.flow4_evictions += evicted * v4;
            if r.owner != v.owner(&k) {
                // Recreated by another MAC: what the old owner sent stays its own.
                keep_for_device(&mut self.devices, r);
                r.owner = v.owner(&k);
            }
            r.owned.observe(replaced, v.owned());
            r.first_seen_ns = r.first_seen_ns.min(v.first_seen_ns);
            r.last_seen_ns = r.last_seen_ns.max(v.last_seen_ns);
            r.tcp_flags |= v.tcp_flags as u8;
            r.verdict = v.verdict;
            r.rule = v.rule;
            r.segment = v.segment;
            r.generation = v.generation;
            r.app = v.app;
            r.app_confidence = v.app_confidence;
            r.app_done = v.app_done != 0;
        }
        for (k, r) in self.flows.iter_mut() {
            if r.seen != now {
                let evicted = r.counts.vanished() as u64;
                self.flow_evictions += evicted;
                self.flow4_evictions += evicted * k.is_v4() as u64;
                r.owned.vanished();
            }
        }
        self.kernel_flows = n;
        self.kernel_flows4 = n4;
    }

    fn merge_devices(&mut self, snapshot: &[(DeviceKey, DeviceValue)]) {
        let now = self.merges;
        for (k, v) in snapshot {
            let r =
                self.devices.entry(*k).or_insert_with(|| DeviceRecord::new(v.first_seen_ns, v.last_seen_ns));
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
        for r in self.devices.values_mut() {
            if r.seen != now {
                self.device_evictions += r.counts.vanished() as u64;
            }
        }
        self.kernel_devices = snapshot.len();
    }

    /// Sums each device's flow records into it. A flow whose device has no
    /// record (its `DEVICES` entry was never read: evicted, or the map was full)
    /// creates one, with the flow's source address. Returns, for devices whose
    /// stored totals are not credited yet, the part from flows older than the
    /// takeover (see `credit_stored`).
    fn derive_devices(&mut self) -> HashMap<DeviceKey, Totals> {
        for d in self.devices.values_mut() {
            d.flow_live = Totals::default();
        }
        let mut old: HashMap<DeviceKey, Totals> = HashMap::new();
        for (k, f) in &self.flows {
            let d = self.devices.entry(f.owner).or_insert_with(|| {
                let mut d = DeviceRecord::new(f.first_seen_ns, f.last_seen_ns);
                d.remember_ip(k.src_ip());
                d
            });
            let t = f.owned.totals();
            d.flow_live += t;
            if f.first_seen_ns < self.stored_at_ns && self.stored.contains_key(&f.owner) {
                *old.entry(f.owner).or_default() += t;
            }
            d.first_seen_ns = d.first_seen_ns.min(f.first_seen_ns);
            d.last_seen_ns = d.last_seen_ns.max(f.last_seen_ns);
        }
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
            .map(|(k, _)| *k)
            .collect()
    }

    /// Drops an aged-out flow record; its counts stay with its device.
    pub fn forget_flow(&mut self, k: &FlowKey) {
        if let Some(mut r) = self.flows.remove(k) {
            let t = keep_for_device(&mut self.devices, &mut r);
            let d = self.devices.get_mut(&r.owner).expect("kept above");
            d.flow_live = d.flow_live.saturating_sub(t);
        }
    }
}

/// Moves a flow record's owned counts into its device's base (creating the
/// device if it has no record) and returns them.
fn keep_for_device(devices: &mut HashMap<DeviceKey, DeviceRecord>, r: &mut FlowRecord) -> Totals {
    let t = std::mem::take(&mut r.owned).totals();
    devices.entry(r.owner).or_insert_with(|| DeviceRecord::new(r.first_seen_ns, r.last_seen_ns)).flow_base +=
        t;
    t
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

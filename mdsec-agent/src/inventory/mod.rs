//! The device inventory: typed device records (MAC, addresses, clinical
//! class, lifecycle, apps, fingerprints) built once per store pass from the
//! datapath's tables into one immutable [`Snapshot`] that detection, evidence,
//! metrics, the API and the state database read. Text forms exist only at
//! those edges ([`doc::DeviceDoc`]).

pub mod clinical;
pub mod doc;
pub mod fingerprint;
pub mod lifecycle;
pub mod oui;
pub mod samples;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::SystemTime,
};

use mdsec_common::app::{App, Confidence};

use crate::{
    base::{clock::Anchor, net::Mac},
    datapath::state::{Role, Tables},
    policy::model::{Member, Policy, Segment},
};
use clinical::{Class, Override};
use fingerprint::Trait;

/// A set of applications (one bit per [`App`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppSet(u32);

const _: () = assert!(App::ALL.len() <= 32);

impl AppSet {
    pub const EMPTY: AppSet = AppSet(0);

    pub fn insert(&mut self, a: App) {
        self.0 |= 1 << a as u32;
    }

    pub fn contains(self, a: App) -> bool {
        self.0 & (1 << a as u32) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = App> {
        App::ALL.iter().copied().filter(move |a| self.contains(*a))
    }

    /// Names in alphabetical order (the API's).
    pub fn names(self) -> Vec<String> {
        let mut v: Vec<String> = self.iter().map(|a| a.name().to_string()).collect();
        v.sort();
        v
    }
}

impl FromIterator<App> for AppSet {
    fn from_iter<I: IntoIterator<Item = App>>(it: I) -> AppSet {
        let mut s = AppSet::EMPTY;
        for a in it {
            s.insert(a);
        }
        s
    }
}

/// Which device: a MAC on an interface and VLAN.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId {
    pub iface: String,
    pub vlan: u16,
    pub mac: Mac,
}

/// One device, everything the agent knows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub iface: String,
    pub vlan: u16,
    pub mac: Mac,
    /// From the IEEE OUI registry; none for unknown and locally administered MACs.
    pub vendor: Option<String>,
    pub ips: Vec<IpAddr>,
    /// Apps it spoke as a client / answered as a server ([`Role`]).
    pub apps_client: AppSet,
    pub apps_server: AppSet,
    /// Addresses it exchanged traffic with (at most [`MAX_PEERS`]).
    pub peers: Vec<IpAddr>,
    pub class: Class,
    /// 0.0–1.0; 1.0 for an operator override.
    pub confidence: f32,
    /// The rules that decided the class.
    pub evidence: Vec<String>,
    pub fingerprints: BTreeMap<Trait, String>,
    /// From an operator override.
    pub name: Option<String>,
    pub model: Option<String>,
    /// The segment whose members include it ([`segment_of`]).
    pub segment: Option<String>,
    pub lifecycle: lifecycle::State,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
}

impl Device {
    pub fn new(iface: String, vlan: u16, mac: Mac) -> Device {
        Device {
            iface,
            vlan,
            mac,
            vendor: None,
            ips: Vec::new(),
            apps_client: AppSet::EMPTY,
            apps_server: AppSet::EMPTY,
            peers: Vec::new(),
            class: Class::Unknown,
            confidence: 0.0,
            evidence: Vec::new(),
            fingerprints: BTreeMap::new(),
            name: None,
            model: None,
            segment: None,
            lifecycle: lifecycle::State::default(),
            packets: 0,
            bytes: 0,
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
        }
    }

    pub fn id(&self) -> DeviceId {
        DeviceId { iface: self.iface.clone(), vlan: self.vlan, mac: self.mac }
    }
}

/// Devices stored by earlier runs (the state database), by id.
pub type History = HashMap<DeviceId, Device>;

/// The inventory as of one store pass, sorted by interface, VLAN and MAC.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub devices: Vec<Device>,
    /// The tables' merge it was built from ([`Tables::merges`]).
    pub merges: u64,
}

/// Peers listed per device.
pub const MAX_PEERS: usize = 32;

/// What a snapshot is built from.
pub struct Sources<'a> {
    pub tables: &'a Tables,
    pub ifname: &'a dyn Fn(u32) -> String,
    pub oui: &'a oui::Oui,
    pub fingerprints: &'a HashMap<(u32, u16, [u8; 6]), BTreeMap<Trait, String>>,
    /// Operator overrides by MAC.
    pub overrides: &'a HashMap<Mac, Override>,
    pub history: &'a History,
    pub policy: Option<&'a Policy>,
    /// Lifecycle rows by MAC, spelled as [`Mac`] shows it.
    pub lifecycle: &'a HashMap<String, lifecycle::Record>,
}

/// Builds the inventory: this run's devices from the tables (apps and peers
/// from their flows), merged with the devices earlier runs stored, classified,
/// placed in their segments and given their lifecycle state.
pub fn build(src: &Sources) -> Snapshot {
    let anchor = Anchor::now();
    let t = src.tables;
    let (client, server, peers) = apps_and_peers(t);
    let mut out: Vec<Device> = t
        .devices
        .iter()
        .map(|(i, k, r)| {
            let i = i as usize;
            let tot = r.totals();
            let mut d = Device::new((src.ifname)(k.ifindex), k.vlan, Mac(k.mac));
            d.vendor = src.oui.vendor(k.mac);
            d.ips = r.ips.iter().copied().collect();
            d.apps_client = client[i];
            d.apps_server = server[i];
            d.peers = peers[i].iter().copied().collect();
            d.fingerprints = src.fingerprints.get(&(k.ifindex, k.vlan, k.mac)).cloned().unwrap_or_default();
            (d.packets, d.bytes) = (tot.packets, tot.bytes);
            d.first_seen = anchor.wall(r.first_seen_ns);
            d.last_seen = anchor.wall(r.last_seen_ns);
            d
        })
        .collect();
    merge_history(&mut out, src.history);
    for d in &mut out {
        let over = src.overrides.get(&d.mac);
        classify(d, over);
        let decommissioned = over.is_some_and(|o| o.decommissioned);
        d.lifecycle = lifecycle::effective(src.lifecycle, decommissioned, &d.mac.to_string());
        d.segment = src.policy.and_then(|p| segment_of(p, d)).map(|(s, _)| s.name.clone());
    }
    out.sort_by(|a, b| (&a.iface, a.vlan, a.mac).cmp(&(&b.iface, b.vlan, b.mac)));
    Snapshot { devices: out, merges: t.merges() }
}

/// Per device index: apps as client, apps as server, peers.
fn apps_and_peers(t: &Tables) -> (Vec<AppSet>, Vec<AppSet>, Vec<BTreeSet<IpAddr>>) {
    // Which device owns an address (on its interface and VLAN), by device index.
    let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::new();
    for (i, _, d) in t.devices.iter() {
        for ip in &d.ips {
            by_ip.entry(*ip).or_default().push(i as usize);
        }
    }
    let n = t.devices.len();
    let mut client = vec![AppSet::EMPTY; n];
    let mut server = vec![AppSet::EMPTY; n];
    let mut peers: Vec<BTreeSet<IpAddr>> = vec![BTreeSet::new(); n];
    for (fk, r) in t.flows.iter() {
        let (src, dst) = match r.role() {
            Role::Client => (fk.src_ip(), fk.dst_ip()),
            Role::Server => (fk.dst_ip(), fk.src_ip()),
        };
        let app = (Confidence::from_u8(r.app_confidence) != Confidence::None).then(|| App::from_u8(r.app));
        let sender = src == fk.src_ip();
        for &i in by_ip.get(&src).into_iter().flatten() {
            // The sender is on the flow's interface; the other end may be anywhere.
            let k = t.devices.key(i as u32);
            if !sender || (k.ifindex == fk.ifindex && k.vlan == fk.vlan) {
                if let Some(a) = app {
                    client[i].insert(a);
                }
                if peers[i].len() < MAX_PEERS {
                    peers[i].insert(dst);
                }
            }
        }
        for &i in by_ip.get(&dst).into_iter().flatten() {
            if let Some(a) = app {
                server[i].insert(a);
            }
            if peers[i].len() < MAX_PEERS {
                peers[i].insert(src);
            }
        }
    }
    (client, server, peers)
}

fn classify(d: &mut Device, over: Option<&Override>) {
    let v = clinical::classify(d.vendor.as_deref(), d.apps_client, d.apps_server);
    (d.class, d.confidence, d.evidence) = (v.class, v.confidence, v.evidence);
    if let Some(o) = over {
        if let Some(c) = o.class {
            d.class = c;
            d.confidence = 1.0;
            d.evidence = vec!["operator override".into()];
        }
        d.name = o.name.clone();
        d.model = o.model.clone();
    }
}

/// Devices seen in earlier runs keep their first sighting, addresses and
/// fingerprints; those not seen in this run are listed as last stored.
fn merge_history(out: &mut Vec<Device>, history: &History) {
    let mut seen = BTreeSet::new();
    for d in out.iter_mut() {
        let id = d.id();
        if let Some(h) = history.get(&id) {
            d.first_seen = d.first_seen.min(h.first_seen);
            for ip in &h.ips {
                if !d.ips.contains(ip) {
                    d.ips.push(*ip);
                }
            }
            for (k, v) in &h.fingerprints {
                d.fingerprints.entry(*k).or_insert_with(|| v.clone());
            }
            // Apps and peers are evidence gathered over time: a device between
            // two short connections (ended flows leave the table) keeps what
            // it was seen doing, and so its class.
            for a in h.apps_client.iter() {
                d.apps_client.insert(a);
            }
            for a in h.apps_server.iter() {
                d.apps_server.insert(a);
            }
            for p in &h.peers {
                if d.peers.len() >= MAX_PEERS {
                    break;
                }
                if !d.peers.contains(p) {
                    d.peers.push(*p);
                }
            }
            d.peers.sort();
        }
        seen.insert(id);
    }
    out.extend(history.iter().filter(|(k, _)| !seen.contains(*k)).map(|(_, d)| d.clone()));
}

/// The segment a device belongs to, and whether it is a declared MAC member:
/// a segment declaring its MAC first, else one whose addresses include one of
/// its addresses.
pub fn segment_of<'a>(p: &'a Policy, d: &Device) -> Option<(&'a Segment, bool)> {
    let vlan_ok = |v: &Option<u16>| v.is_none_or(|v| v == d.vlan);
    for s in &p.segments {
        if s.members
            .iter()
            .any(|m| matches!(m, Member::Mac { mac, vlan } if *mac == d.mac.0 && vlan_ok(vlan)))
        {
            return Some((s, true));
        }
    }
    p.segments
        .iter()
        .find(|s| {
            s.members.iter().any(|m| match m {
                Member::Net { net, vlan } => vlan_ok(vlan) && d.ips.iter().any(|ip| net.contains(ip)),
                Member::Mac { .. } => false,
            })
        })
        .map(|s| (s, false))
}

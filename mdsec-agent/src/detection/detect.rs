//! Detections over the flow table: `scan`, `remote_access`, `external_dns`,
//! `east_west`, `first_contact`, `rogue_dhcp_server`, `rogue_router_advertisement`, the learned-baseline ones from [`crate::detection::learn`] (`new_destination`,
//! `new_port`, `new_app`), and `decommissioned_device` from the inventory.
//!
//! Runs on the store thread after each inventory pass. Every flow is examined
//! once, in its client → server direction ([`crate::datapath::state::Role`]), and only when a
//! segment member (a medical device) is at one end; a scan is counted for any
//! source that reaches into a segment. One flow yields at most one detection
//! (scan, then remote access, external DNS, east-west, then novelty). Equal
//! detections within `dedup_secs` are suppressed and counted instead, and a scan
//! is one event per source and window, so a sweep of thousands of ports is one
//! event.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use mdsec_common::{
    app::{App, port_hint},
    device::DeviceKey,
    flow::FlowKey,
    net::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    policy::Verdict,
};
use serde::{Deserialize, Serialize};

use crate::{
    base::clock::{Anchor, rfc3339},
    base::{diag::Step, event::Event, net::proto_name},
    datapath::state::{FlowRecord, Role, Tables},
    detection::learn::Learner,
    inventory::Device,
    policy::model::Policy,
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionConfig {
    /// The hospital's own resolvers (addresses or CIDRs). DNS from a device to any
    /// other address raises `external_dns`; with none listed that check is off.
    #[serde(default)]
    pub internal_resolvers: Vec<String>,
    /// Scan: distinct hosts, or distinct ports on one host, one source reaches
    /// within `scan_window_secs`.
    #[serde(default = "default_scan_hosts")]
    pub scan_hosts: usize,
    #[serde(default = "default_scan_ports")]
    pub scan_ports: usize,
    #[serde(default = "default_scan_window")]
    pub scan_window_secs: u64,
    /// An equal detection (type, source, destination, port) within this many
    /// seconds is suppressed and counted.
    #[serde(default = "default_dedup")]
    pub dedup_secs: u64,
    /// Policy zones that hold clinical servers (PACS, EMR, pharmacy), each
    /// with its clinical function (a key of the triage matrix). Remote-admin
    /// and file sharing toward them, scans of them and their first contact by
    /// a device of unknown class are detected whoever the source is.
    #[serde(default)]
    pub clinical_zones: std::collections::BTreeMap<String, String>,
    /// Zones of the hosts that administer those servers (IT jump hosts):
    /// remote administration from them toward a clinical zone is expected.
    #[serde(default)]
    pub admin_zones: Vec<String>,
    /// The hosts allowed to answer DHCP: addresses, CIDRs or MACs. A DHCP
    /// reply (UDP 67 → 68) from any other raises `rogue_dhcp_server`; with
    /// none listed that check is off.
    #[serde(default)]
    pub dhcp_servers: Vec<String>,
    /// The IPv6 routers: link-local addresses, CIDRs or MACs. A router
    /// advertisement (ICMPv6 134) from any other raises
    /// `rogue_router_advertisement`; with none listed that check is off.
    #[serde(default)]
    pub ipv6_routers: Vec<String>,
    /// Declared IPv4 → MAC bindings (gateways, clinical servers: what a
    /// static ARP entry would say). Another host claiming such an address
    /// (as ARP sender or IP source) raises `arp_spoofing`.
    #[serde(default)]
    pub arp_bindings: std::collections::BTreeMap<String, String>,
    /// A host sending at least this many gratuitous ARPs (sender address =
    /// target address) within `garp_flood_window_secs` raises
    /// `gratuitous_arp_flood` (a cache-poisoning or failover storm; a normal
    /// host sends a few at link-up).
    #[serde(default = "default_garp_frames")]
    pub garp_flood_frames: u64,
    #[serde(default = "default_garp_window")]
    pub garp_flood_window_secs: u64,
}

fn default_garp_frames() -> u64 {
    20
}
fn default_garp_window() -> u64 {
    10
}

fn default_scan_hosts() -> usize {
    16
}
fn default_scan_ports() -> usize {
    16
}
fn default_scan_window() -> u64 {
    60
}
fn default_dedup() -> u64 {
    3600
}

impl Default for DetectionConfig {
    fn default() -> Self {
        DetectionConfig {
            internal_resolvers: Vec::new(),
            scan_hosts: default_scan_hosts(),
            scan_ports: default_scan_ports(),
            scan_window_secs: default_scan_window(),
            dedup_secs: default_dedup(),
            clinical_zones: Default::default(),
            admin_zones: Vec::new(),
            dhcp_servers: Vec::new(),
            ipv6_routers: Vec::new(),
            arp_bindings: Default::default(),
            garp_flood_frames: default_garp_frames(),
            garp_flood_window_secs: default_garp_window(),
        }
    }
}

impl DetectionConfig {
    /// Errors as (path below `detection:` of the offending value, message).
    pub fn validate(&self) -> Result<(), (Vec<Step<'static>>, String)> {
        for (i, r) in self.internal_resolvers.iter().enumerate() {
            if parse_net(r).is_none() {
                let path = vec!["internal_resolvers".into(), i.into()];
                return Err((path, format!("internal_resolvers: `{r}` is not an address or CIDR")));
            }
        }
        for (key, list) in [("dhcp_servers", &self.dhcp_servers), ("ipv6_routers", &self.ipv6_routers)] {
            for (i, r) in list.iter().enumerate() {
                if Hosts::parse(r).is_none() {
                    let path = vec![key.into(), i.into()];
                    return Err((path, format!("{key}: `{r}` is not an address, CIDR or MAC")));
                }
            }
        }
        for (ip, mac) in &self.arp_bindings {
            let path = vec!["arp_bindings".into()];
            if !ip.parse::<IpAddr>().is_ok_and(|a| a.is_ipv4()) {
                return Err((path, format!("arp_bindings: `{ip}` is not an IPv4 address")));
            }
            if crate::base::net::parse_mac(mac).is_none() {
                return Err((path, format!("arp_bindings: `{mac}` (for {ip}) is not a MAC address")));
            }
        }
        for (key, v) in [("scan_hosts", self.scan_hosts), ("scan_ports", self.scan_ports)] {
            if v < 2 {
                return Err((vec![key.into()], format!("detection.{key} must be at least 2")));
            }
        }
        if self.garp_flood_frames < 2 {
            return Err((
                vec!["garp_flood_frames".into()],
                "detection.garp_flood_frames must be at least 2".into(),
            ));
        }
        if !(1..=3600).contains(&self.garp_flood_window_secs) {
            return Err((
                vec!["garp_flood_window_secs".into()],
                "detection.garp_flood_window_secs must be from 1 to 3600".into(),
            ));
        }
        for (key, v) in [("scan_window_secs", self.scan_window_secs), ("dedup_secs", self.dedup_secs)] {
            if v == 0 {
                return Err((vec![key.into()], format!("detection.{key} must be positive")));
            }
        }
        Ok(())
    }

    /// The zones this config names that `policy` does not define, as (path
    /// below `detection:`, message).
    pub fn unknown_zones(&self, policy: &Policy) -> Vec<(Vec<Step<'_>>, String)> {
        let known = |z: &str| policy.zones.iter().any(|x| x.name == z);
        let clinical = self.clinical_zones.keys().filter(|z| !known(z)).map(|z| {
            let path = vec!["clinical_zones".into(), Step::Key(z.as_str())];
            (path, format!("clinical_zones: `{z}` is not a zone of the policy"))
        });
        let admin = self.admin_zones.iter().enumerate().filter(|(_, z)| !known(z)).map(|(i, z)| {
            (vec!["admin_zones".into(), i.into()], format!("admin_zones: `{z}` is not a zone of the policy"))
        });
        clinical.chain(admin).collect()
    }

    fn resolvers(&self) -> Vec<IpNet> {
        self.internal_resolvers.iter().filter_map(|r| parse_net(r)).collect()
    }
}

/// Declared hosts of an infrastructure role (DHCP servers, IPv6 routers), by
/// address or MAC.
#[derive(Default)]
struct Hosts {
    nets: Vec<IpNet>,
    macs: HashSet<[u8; 6]>,
}

impl Hosts {
    fn parse(s: &str) -> Option<Result<IpNet, [u8; 6]>> {
        parse_net(s).map(Ok).or_else(|| crate::base::net::parse_mac(s).map(Err))
    }

    fn new(list: &[String]) -> Hosts {
        let mut h = Hosts::default();
        for e in list.iter().filter_map(|s| Hosts::parse(s)) {
            match e {
                Ok(n) => h.nets.push(n),
                Err(m) => {
                    h.macs.insert(m);
                }
            }
        }
        h
    }

    fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.macs.is_empty()
    }

    fn holds(&self, ip: &IpAddr, mac: Option<[u8; 6]>) -> bool {
        self.nets.iter().any(|n| n.contains(ip)) || mac.is_some_and(|m| self.macs.contains(&m))
    }
}

/// The infrastructure role a flow's sender plays, when only declared hosts
/// may: a DHCP reply, an IPv6 router advertisement (ICMPv6 flows carry the
/// type as `sport`).
fn infrastructure(k: &FlowKey) -> Option<&'static str> {
    match (k.proto, k.sport, k.dport) {
        (IPPROTO_UDP, 67, 68) => Some("rogue_dhcp_server"),
        (IPPROTO_ICMPV6, 134, _) => Some("rogue_router_advertisement"),
        _ => None,
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Apps that give remote control of a device or its files.
const REMOTE_ACCESS: [App; 4] = [App::Ssh, App::Telnet, App::Rdp, App::Smb];

/// The remote-administration or file-sharing protocol of a flow: its app, or
/// for VNC and WinRM (no signature in the datapath's classifier, whose
/// verifier budget is spent) the server port: VNC's 5900–5903, WinRM's
/// 5985 (HTTP) and 5986 (HTTPS).
fn remote_admin(app: App, proto: u8, dport: u16) -> Option<&'static str> {
    if REMOTE_ACCESS.contains(&app) {
        return Some(app.name());
    }
    match (proto, dport, app) {
        (IPPROTO_TCP, 5900..=5903, App::Unknown) => Some("vnc"),
        (IPPROTO_TCP, 5985 | 5986, App::Unknown | App::Http | App::Tls) => Some("winrm"),
        _ => None,
    }
}

/// A device claiming more IPv4 addresses than this is a router (on a bridge
/// or mirror port its MAC carries every address it forwards for): it claims
/// none of them for `arp_spoofing` or `duplicate_ip`. IPv4 only: a host's
/// IPv6 addresses (link-local, global, temporary) say nothing about routing.
const MAX_HOST_IPS: usize = 4;
/// Two hosts claim one address at once when both were seen within this.
const CLAIM_ACTIVE: Duration = Duration::from_secs(300);
/// Address bindings remembered for `duplicate_ip`.
const MAX_BINDINGS: usize = 100_000;

/// Pairs (client, clinical server) remembered for `first_contact`; past this
/// a pair is not remembered (its contacts are still deduplicated).
pub const MAX_CONTACTS: usize = 200_000;

struct ScanState {
    window_start: SystemTime,
    hosts: BTreeSet<IpAddr>,
    ports: HashMap<IpAddr, BTreeSet<u16>>,
    reported: bool,
}

impl ScanState {
    fn new(window_start: SystemTime) -> ScanState {
        ScanState { window_start, hosts: BTreeSet::new(), ports: HashMap::new(), reported: false }
    }
}

/// A flow end that matters clinically: a segment member (a medical device),
/// or a server in a clinical zone (`zone` set, `segment` empty); the default
/// is neither (an event about no segment or zone).
#[derive(Clone, Default)]
pub struct End {
    pub segment: String,
    pub function: String,
    pub mac: Option<String>,
    pub zone: String,
}

/// Who is a segment member: inventory devices by address (MAC membership
/// included), then CIDR members; and who is a clinical server (the most
/// specific clinical zone holding the address).
pub struct Members<'a> {
    policy: &'a Policy,
    by_ip: HashMap<IpAddr, End>,
    /// (zone net, zone, function), longest prefix first.
    servers: Vec<(IpNet, String, String)>,
    admin: Vec<IpNet>,
    /// Addresses of devices the inventory classified.
    pub classified: HashSet<IpAddr>,
}

impl<'a> Members<'a> {
    /// An address belongs to the device that claims the fewest addresses: a
    /// router's MAC seen on a bridge or mirror port carries every address it
    /// forwards for, and must not take a server's address into its segment.
    /// Clinical servers and admin hosts come from `cfg`'s zones.
    pub fn new(policy: &'a Policy, devices: &[Device], cfg: &DetectionConfig) -> Members<'a> {
        let mut owner: HashMap<IpAddr, &Device> = HashMap::new();
        for d in devices {
            for &ip in &d.ips {
                let o = owner.entry(ip).or_insert(d);
                if d.ips.len() < o.ips.len() {
                    *o = d;
                }
            }
        }
        let classified = owner
            .iter()
            .filter(|(_, d)| d.class != crate::inventory::clinical::Class::Unknown)
            .map(|(ip, _)| *ip)
            .collect();
        let by_ip = owner
            .into_iter()
            .filter_map(|(ip, d)| {
                let seg = d.segment.as_deref().and_then(|s| policy.segments.iter().find(|x| x.name == s))?;
                let end = End {
                    segment: seg.name.clone(),
                    function: seg.function.clone(),
                    mac: Some(d.mac.to_string()),
                    zone: String::new(),
                };
                Some((ip, end))
            })
            .collect();
        let zone_nets = |name: &str| -> Vec<IpNet> {
            policy.zones.iter().filter(|z| z.name == name).flat_map(|z| z.cidrs.iter().copied()).collect()
        };
        let mut servers: Vec<(IpNet, String, String)> = cfg
            .clinical_zones
            .iter()
            .flat_map(|(z, f)| zone_nets(z).into_iter().map(move |n| (n, z.clone(), f.clone())))
            .collect();
        servers.sort_by_key(|(n, _, _)| std::cmp::Reverse(n.prefix_len()));
        let admin = cfg.admin_zones.iter().flat_map(|z| zone_nets(z)).collect();
        Members { policy, by_ip, servers, admin, classified }
    }

    pub fn get(&self, ip: &IpAddr) -> Option<End> {
        self.by_ip.get(ip).cloned().or_else(|| {
            let seg = self.policy.net_segment(ip)?;
            Some(End {
                segment: seg.name.clone(),
                function: seg.function.clone(),
                mac: None,
                zone: String::new(),
            })
        })
    }

    /// The clinical server at `ip`, when a clinical zone holds it and it is
    /// not a segment member (a device's own segment describes it better).
    pub fn server(&self, ip: &IpAddr) -> Option<End> {
        let (_, zone, function) = self.servers.iter().find(|(n, _, _)| n.contains(ip))?;
        Some(End { segment: String::new(), function: function.clone(), mac: None, zone: zone.clone() })
    }

    fn is_admin(&self, ip: &IpAddr) -> bool {
        self.admin.iter().any(|n| n.contains(ip))
    }

    /// A device, or failing that a clinical server.
    pub fn target(&self, ip: &IpAddr) -> Option<End> {
        self.get(ip).or_else(|| self.server(ip))
    }
}

/// The client → server directions among `fresh` (the shared rule,
/// [`crate::datapath::state::Role`]): TCP, UDP and ICMP/ICMPv6 only (other protocols
/// have no service to reach).
fn client_side(k: &FlowKey, r: &FlowRecord) -> bool {
    matches!(k.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6) && r.role() == Role::Client
}

pub struct Detector {
    cfg: DetectionConfig,
    ifnames: HashMap<u32, String>,
    resolvers: Vec<IpNet>,
    /// The highest flow record id examined so far.
    checked: u64,
    scans: HashMap<IpAddr, ScanState>,
    last_emitted: HashMap<(String, IpAddr, IpAddr, u16), SystemTime>,
    /// Flows that raised (or had suppressed) a detection: no novelty for them.
    flagged: HashSet<FlowKey>,
    /// Decommissioned MACs (canonical spelling) → since when; set by the store
    /// pass from [`crate::inventory::lifecycle::decommissioned_since`].
    pub decommissioned: HashMap<String, SystemTime>,
    decommissioned_reported: HashSet<(String, SystemTime)>,
    /// (client, clinical server) pairs seen, for `first_contact`: seeded
    /// from the devices earlier runs stored ([`Detector::seed`]).
    contacts: HashSet<(IpAddr, IpAddr)>,
    /// Addresses of the devices classified as of the previous pass: a
    /// device's class from this pass already reflects the contact in question
    /// (a laptop that opens DICOM looks like a modality).
    classified_before: HashSet<IpAddr>,
    dhcp_servers: Hosts,
    ipv6_routers: Hosts,
    arp_bindings: HashMap<IpAddr, [u8; 6]>,
    /// (ifindex, VLAN, address) → the host that claimed it first, and when
    /// that host was last seen (monotonic ns).
    bindings: HashMap<(u32, u16, IpAddr), ([u8; 6], u64)>,
    /// (address, claimer) pairs already reported.
    claims_reported: HashSet<(IpAddr, [u8; 6])>,
    /// Per device that sent gratuitous ARPs: (monotonic ns, its total) at
    /// each pass within the flood window, oldest first.
    garp_samples: HashMap<DeviceKey, std::collections::VecDeque<(u64, u64)>>,
    /// When each device's flood was last reported (monotonic ns).
    garp_reported: HashMap<DeviceKey, u64>,
    /// The policy generation whose unknown zone names were last logged.
    zones_checked: Option<u32>,
    /// Baselines and `new_*` detections.
    pub learner: Learner,
}

/// What the detector needs to know about the installed policy.
pub struct PolicyView<'a> {
    pub policy: &'a Policy,
    pub generation: u32,
    /// When each segment's learning period ends (flows that start earlier are learned).
    pub learning_ends: &'a HashMap<String, SystemTime>,
}

impl Detector {
    pub fn new(cfg: DetectionConfig, ifnames: HashMap<u32, String>, learner: Learner) -> Detector {
        let (dhcp_servers, ipv6_routers) = (Hosts::new(&cfg.dhcp_servers), Hosts::new(&cfg.ipv6_routers));
        let arp_bindings = cfg
            .arp_bindings
            .iter()
            .filter_map(|(ip, mac)| Some((ip.parse().ok()?, crate::base::net::parse_mac(mac)?)))
            .collect();
        Detector {
            decommissioned: HashMap::new(),
            ifnames,
            resolvers: cfg.resolvers(),
            cfg,
            checked: 0,
            scans: HashMap::new(),
            last_emitted: HashMap::new(),
            flagged: HashSet::new(),
            decommissioned_reported: HashSet::new(),
            contacts: HashSet::new(),
            classified_before: HashSet::new(),
            dhcp_servers,
            ipv6_routers,
            arp_bindings,
            bindings: HashMap::new(),
            claims_reported: HashSet::new(),
            garp_samples: HashMap::new(),
            garp_reported: HashMap::new(),
            zones_checked: None,
            learner,
        }
    }

    /// Remembers what `devices` (from earlier runs) were: their classes, and
    /// every (address, peer) pair (a contact already made is not a first one).
    pub fn seed<'d>(&mut self, devices: impl IntoIterator<Item = &'d Device>) {
        for d in devices {
            if d.class != crate::inventory::clinical::Class::Unknown {
                self.classified_before.extend(d.ips.iter().copied());
            }
            for ip in &d.ips {
                for p in d.peers.iter().take(MAX_CONTACTS.saturating_sub(self.contacts.len())) {
                    self.contacts.insert((*ip, *p));
                }
            }
        }
    }

    /// Examines flows not seen before; returns events and suppressed counts by type.
    pub fn check(
        &mut self,
        tables: &Tables,
        view: &PolicyView,
        devices: &[Device],
        now: SystemTime,
    ) -> (Vec<Event>, HashMap<String, u64>) {
        let policy = view.policy;
        let anchor = Anchor::now();
        let members = Members::new(policy, devices, &self.cfg);
        if self.zones_checked != Some(view.generation) {
            self.zones_checked = Some(view.generation);
            for (_, m) in self.cfg.unknown_zones(policy) {
                log::warn!("detection.{m}: its checks are off until a policy defines it");
            }
        }
        let mut out = Vec::new();
        let mut suppressed: HashMap<String, u64> = HashMap::new();

        // New client-side flows, oldest first so windows advance in order.
        // Record ids only grow, so "not seen before" is "above the last id
        // checked" (no set of a million keys).
        let mut clients: Vec<FlowKey> = Vec::new();
        let mut new: Vec<(FlowKey, FlowRecord)> = Vec::new();
        let mut infra: Vec<(FlowKey, FlowRecord, [u8; 6], &'static str)> = Vec::new();
        for (k, owner, r) in tables.flows.after_owned(self.checked) {
            self.checked = r.id;
            if let Some(kind) = infrastructure(&k) {
                infra.push((k, r.clone(), tables.devices.key(owner).mac, kind));
            }
            if client_side(&k, r) {
                clients.push(k);
                if matches!(k.proto, IPPROTO_TCP | IPPROTO_UDP) {
                    new.push((k, r.clone()));
                }
            }
        }
        self.flagged.retain(|k| tables.flows.contains_key(k));
        new.sort_by_key(|(_, r)| r.first_seen_ns);

        // 1. Scans: per source, distinct hosts / ports per host in a window.
        let window = Duration::from_secs(self.cfg.scan_window_secs);
        let mut scanning: HashSet<IpAddr> = HashSet::new();
        for (k, r) in &new {
            let (src, dst) = (k.src_ip(), k.dst_ip());
            let (sm, dm) = (members.get(&src), members.target(&dst));
            if sm.is_none() && dm.is_none() {
                continue;
            }
            let t = anchor.wall(r.first_seen_ns);
            let st = self.scans.entry(src).or_insert_with(|| ScanState::new(t));
            if t.duration_since(st.window_start).unwrap_or_default() > window {
                *st = ScanState::new(t);
            }
            st.hosts.insert(dst);
            let ports = st.ports.entry(dst).or_default();
            ports.insert(k.dport);
            let most_ports = st.ports.values().map(|p| p.len()).max().unwrap_or(0);
            if st.reported {
                scanning.insert(src);
                *suppressed.entry("scan".into()).or_default() += 1;
                continue;
            }
            if st.hosts.len() >= self.cfg.scan_hosts || most_ports >= self.cfg.scan_ports {
                st.reported = true;
                scanning.insert(src);
                let target = dm.clone().or(sm.clone()).expect("one end is a member");
                let mut e = event("scan", "high", k, r.app, &target, now);
                e.iface = iface(&self.ifnames, k.ifindex);
                e.mac = sm.as_ref().and_then(|m| m.mac.clone());
                e.reason = format!(
                    "{src} reached {} hosts and up to {most_ports} ports on one host",
                    st.hosts.len()
                );
                e.evidence = format!(
                    "window {}s from {}; hosts {}",
                    self.cfg.scan_window_secs,
                    rfc3339(st.window_start),
                    st.hosts.iter().take(8).map(|h| h.to_string()).collect::<Vec<_>>().join(",")
                );
                out.push(e);
            }
        }
        // Scans of the previous windows are forgotten once their window is over.
        self.scans.retain(|_, st| now.duration_since(st.window_start).unwrap_or_default() <= window * 2);

        // 2. Per-flow detections, skipped for sources caught scanning.
        let mut found = Vec::new();
        for (k, r) in &new {
            let (src, dst) = (k.src_ip(), k.dst_ip());
            if scanning.contains(&src) {
                continue;
            }
            let (sm, dt) = (members.get(&src), members.target(&dst));
            let hit = self.per_flow(k, r, &sm, &dt, &members, now);
            // A clinical server's first contact by a device of unknown class
            // (remembered whatever else the flow raised).
            let server = dt.as_ref().filter(|t| !t.zone.is_empty());
            let first = server.is_some()
                && sm.is_none()
                && !members.is_admin(&src)
                && !self.classified_before.contains(&src)
                && !self.contacts.contains(&(src, dst))
                && self.contacts.len() < MAX_CONTACTS;
            if first {
                self.contacts.insert((src, dst));
            }
            if let Some(f) = hit {
                found.push(f);
            } else if let (true, Some(t)) = (first, server) {
                let mut e = event("first_contact", "medium", k, r.app, t, now);
                e.reason = format!(
                    "{src}, a device of unknown class, contacted {dst} (clinical zone {}) for the first time: {} port {}",
                    t.zone,
                    proto_name(k.proto),
                    k.dport
                );
                found.push((*k, e, t.clone()));
            }
        }
        self.flagged.extend(found.iter().map(|f| f.0));
        // 3. New destinations, ports and apps against the learned baseline.
        let scans = &self.scans;
        let novelties = self.learner.observe(
            tables,
            &clients,
            &members,
            view,
            |ip| scans.get(ip).is_some_and(|s| s.reported),
            now,
        );
        found.extend(
            novelties
                .into_iter()
                .filter(|n| !self.flagged.contains(&n.key))
                .map(|n| (n.key, n.event, n.device)),
        );
        let dedup = Duration::from_secs(self.cfg.dedup_secs);
        for (k, mut e, device) in found {
            let Some(r) = tables.flows.get(&k) else { continue };
            let key = (e.kind.clone(), k.src_ip(), k.dst_ip(), k.dport);
            if self.last_emitted.get(&key).is_some_and(|t| now.duration_since(*t).unwrap_or_default() < dedup)
            {
                *suppressed.entry(e.kind.clone()).or_default() += 1;
                continue;
            }
            self.last_emitted.insert(key, now);
            e.mac = e.mac.or(device.mac);
            e.iface = iface(&self.ifnames, k.ifindex);
            let detail = format!(
                "{} packets, {} bytes, verdict {}, first seen {}",
                r.totals().packets,
                r.totals().bytes,
                Verdict::from_u8(r.verdict).name(),
                rfc3339(anchor.wall(r.first_seen_ns))
            );
            e.evidence = if e.evidence.is_empty() { detail } else { format!("{}; {detail}", e.evidence) };
            out.push(e);
        }
        self.last_emitted.retain(|_, t| now.duration_since(*t).unwrap_or_default() < dedup);

        // 4. Infrastructure roles only declared hosts may play (any flow
        // direction: a DHCP offer or a router advertisement is sent unasked).
        for (k, r, mac, kind) in infra {
            let (declared, what) = match kind {
                "rogue_dhcp_server" => (&self.dhcp_servers, "DHCP reply"),
                _ => (&self.ipv6_routers, "IPv6 router advertisement"),
            };
            let src = k.src_ip();
            if declared.is_empty() || declared.holds(&src, Some(mac)) {
                continue;
            }
            // One event per sender and kind within the dedup window.
            let key = (kind.to_string(), src, src, 0);
            if self.last_emitted.get(&key).is_some_and(|t| now.duration_since(*t).unwrap_or_default() < dedup)
            {
                *suppressed.entry(kind.into()).or_default() += 1;
                continue;
            }
            self.last_emitted.insert(key, now);
            let affected = members.get(&src).or_else(|| members.get(&k.dst_ip())).unwrap_or_default();
            let mut e = event(kind, "high", &k, r.app, &affected, now);
            let mac = crate::base::net::mac_string(mac);
            e.iface = iface(&self.ifnames, k.ifindex);
            e.reason = format!(
                "{what} from {src} (MAC {mac}), which is not declared in detection.{}",
                if kind == "rogue_dhcp_server" { "dhcp_servers" } else { "ipv6_routers" }
            );
            e.evidence = format!("to {}, first seen {}", k.dst_ip(), rfc3339(anchor.wall(r.first_seen_ns)));
            e.mac = Some(mac);
            out.push(e);
        }

        // 5. Address claims on each link (interface and VLAN) by hosts, and
        // gratuitous-ARP floods.
        out.extend(self.claims(tables, &members, now));
        out.extend(self.garp_floods(tables, &members, now));

        // 6. Decommissioned devices that sent traffic (in this run) after they were
        // decommissioned: once per device and decommissioning.
        let in_this_run: HashSet<[u8; 6]> = if self.decommissioned.is_empty() {
            HashSet::new()
        } else {
            tables.devices.keys().map(|k| k.mac).collect()
        };
        for d in devices {
            let Some(&since) = self.decommissioned.get(&d.mac.to_string()) else { continue };
            if d.last_seen > since
                && in_this_run.contains(&d.mac.0)
                && self.decommissioned_reported.insert((d.mac.to_string(), since))
            {
                let seg = d.segment.as_deref().and_then(|s| policy.segments.iter().find(|x| x.name == s));
                let reason = format!("{} is decommissioned but sent traffic", d.mac);
                let mut e = crate::detection::devwatch::device_event(
                    "decommissioned_device",
                    "high",
                    d,
                    seg,
                    reason,
                    now,
                );
                e.evidence = format!("last seen {}, decommissioned {}", rfc3339(d.last_seen), rfc3339(since));
                out.push(e);
            }
        }
        // Next pass's "as of the previous pass".
        self.classified_before = members.classified;
        (out, suppressed)
    }

    /// `arp_spoofing`: a host claims (as ARP sender or IP source) an address
    /// `detection.arp_bindings` gives another MAC. `duplicate_ip`: two hosts
    /// on one link claim one IPv4 address while both are active. Each
    /// (address, claimer) once per run. An address whose first host went
    /// quiet passes to the next (a DHCP reassignment, a replaced device).
    fn claims(&mut self, tables: &Tables, members: &Members, now: SystemTime) -> Vec<Event> {
        let mono = crate::base::clock::mono_ns();
        let anchor = Anchor::now();
        let active = |seen: u64| mono.saturating_sub(seen) <= CLAIM_ACTIVE.as_nanos() as u64;
        let mut out = Vec::new();
        // In first-seen order: when two hosts' claims of one address reach the
        // same pass, the one seen first holds it and the later one is reported.
        let mut devices: Vec<_> = tables
            .devices
            .iter()
            .filter(|(_, _, d)| d.ips.iter().filter(|ip| ip.is_ipv4()).count() <= MAX_HOST_IPS)
            .collect();
        devices.sort_by_key(|(_, k, d)| (d.first_seen_ns, *k));
        for (_, key, d) in devices {
            for ip in d.ips.iter().filter(|ip| ip.is_ipv4()) {
                let (kind, owner) = match self.arp_bindings.get(ip) {
                    Some(declared) if *declared != key.mac => ("arp_spoofing", *declared),
                    Some(_) => continue,
                    None => {
                        let slot = (key.ifindex, key.vlan, *ip);
                        if self.bindings.len() >= MAX_BINDINGS && !self.bindings.contains_key(&slot) {
                            continue;
                        }
                        let b = self.bindings.entry(slot).or_insert((key.mac, d.last_seen_ns));
                        if b.0 == key.mac {
                            b.1 = b.1.max(d.last_seen_ns);
                            continue;
                        }
                        if !active(b.1) {
                            *b = (key.mac, d.last_seen_ns);
                            continue;
                        }
                        // The first host is still there: is it still claiming?
                        let first = tables.devices.get(&DeviceKey { mac: b.0, ..key });
                        if !first.is_some_and(|f| f.ips.contains(ip) && active(f.last_seen_ns))
                            || !active(d.last_seen_ns)
                        {
                            continue;
                        }
                        ("duplicate_ip", b.0)
                    }
                };
                if !self.claims_reported.insert((*ip, key.mac)) {
                    continue;
                }
                let (mac, was) = (crate::base::net::mac_string(key.mac), crate::base::net::mac_string(owner));
                let target = members.target(ip).unwrap_or_default();
                let (severity, what) = match kind {
                    "arp_spoofing" => {
                        ("high", format!("{mac} claims {ip}, which detection.arp_bindings gives {was}"))
                    }
                    _ => ("medium", format!("{mac} and {was} both claim {ip} on this link")),
                };
                let mut e = base_event(kind, severity, &target, now);
                (e.src, e.dst, e.vlan) = (ip.to_string(), ip.to_string(), key.vlan);
                e.iface = iface(&self.ifnames, key.ifindex);
                e.mac = Some(mac);
                e.reason = what;
                e.evidence = format!("claimer last seen {}", rfc3339(anchor.wall(d.last_seen_ns)));
                out.push(e);
            }
        }
        out
    }

    /// `gratuitous_arp_flood`: a host sent `garp_flood_frames` gratuitous
    /// ARPs or more within the window (compared with its total at the
    /// oldest pass inside the window, so a flood straddling passes counts
    /// whole). Once per host per `dedup_secs`.
    fn garp_floods(&mut self, tables: &Tables, members: &Members, now: SystemTime) -> Vec<Event> {
        let mono = crate::base::clock::mono_ns();
        let window = self.cfg.garp_flood_window_secs * 1_000_000_000;
        let dedup = self.cfg.dedup_secs.saturating_mul(1_000_000_000);
        let mut out = Vec::new();
        for (_, key, d) in tables.devices.iter() {
            if !self.garp_samples.contains_key(&key) && self.garp_samples.len() >= MAX_BINDINGS {
                continue;
            }
            // Every device gets a first sample, so a quiet host's first burst
            // counts whole; later ones only when its total changed.
            let samples = self.garp_samples.entry(key).or_insert_with(|| {
                // First seen within the window: everything it sent is recent;
                // else (an entry kept from before the start) its past is not.
                let first = if mono.saturating_sub(d.first_seen_ns) <= window {
                    (d.first_seen_ns, 0)
                } else {
                    (mono, d.gratuitous_arps)
                };
                std::collections::VecDeque::from([first])
            });
            if samples.back().is_some_and(|s| s.1 == d.gratuitous_arps) {
                continue;
            }
            // The base: the newest sample at or before the window's start
            // (the total held from then until the next sample).
            while samples.len() > 1 && mono.saturating_sub(samples[1].0) >= window {
                samples.pop_front();
            }
            let (since, base) = samples[0];
            let sent = d.gratuitous_arps.saturating_sub(base);
            samples.push_back((mono, d.gratuitous_arps));
            let recent = self.garp_reported.get(&key).is_some_and(|&t| mono.saturating_sub(t) < dedup);
            if sent < self.cfg.garp_flood_frames || recent {
                continue;
            }
            self.garp_reported.insert(key, mono);
            let ip = d.ips.iter().find(|ip| ip.is_ipv4()).copied();
            let target = ip.and_then(|ip| members.target(&ip)).unwrap_or_default();
            let mac = crate::base::net::mac_string(key.mac);
            let mut e = base_event("gratuitous_arp_flood", "high", &target, now);
            e.src = ip.map(|ip| ip.to_string()).unwrap_or_default();
            e.vlan = key.vlan;
            e.iface = iface(&self.ifnames, key.ifindex);
            e.mac = Some(mac.clone());
            let secs = (mono.saturating_sub(since).min(window) as f64 / 1e9).max(0.1);
            e.reason = format!(
                "{mac} sent {sent} gratuitous ARPs in {secs:.1} s (detection.garp_flood_frames: {} within {} s)",
                self.cfg.garp_flood_frames, self.cfg.garp_flood_window_secs
            );
            e.evidence = format!("{} gratuitous ARPs from it since the agent started", d.gratuitous_arps);
            out.push(e);
        }
        out
    }

    /// Remote access, external DNS or east-west for one client-side flow (in
    /// that order: one flow yields at most one).
    fn per_flow(
        &self,
        k: &FlowKey,
        r: &FlowRecord,
        sm: &Option<End>,
        dm: &Option<End>,
        members: &Members,
        now: SystemTime,
    ) -> Option<(FlowKey, Event, End)> {
        let (src, dst) = (k.src_ip(), k.dst_ip());
        let app =
            if r.app_confidence != 0 { App::from_u8(r.app) } else { port_hint(k.proto, k.sport, k.dport) };
        let verdict = Verdict::from_u8(r.verdict);
        // The segment's allow-list names this flow: a rule (not a default) allowed it.
        let named = matches!(verdict, Verdict::Allow | Verdict::Reply | Verdict::AppPending) && r.rule != 0;
        // Remote administration of a clinical server from its admin zone is expected.
        let to_server = dm.as_ref().is_some_and(|d| !d.zone.is_empty());
        let sanctioned = to_server && members.is_admin(&src);
        if let Some(name) = remote_admin(app, k.proto, k.dport)
            && !named
            && !sanctioned
            && (sm.is_some() || dm.is_some())
        {
            let device = dm.clone().or(sm.clone())?;
            let mut e = event("remote_access", "high", k, r.app, &device, now);
            e.app = name.into();
            e.reason = if to_server {
                format!("{name} from {src} to clinical server {dst} (zone {})", device.zone)
            } else {
                format!("{name} from {src} to {dst}, not named by the allow-list")
            };
            return Some((*k, e, device));
        }
        if let Some(m) = sm.as_ref().filter(|_| {
            (app == App::Dns || k.dport == 53)
                && !self.resolvers.is_empty()
                && !self.resolvers.iter().any(|n| n.contains(&dst))
        }) {
            let mut e = event("external_dns", "medium", k, r.app, m, now);
            e.app = "dns".into();
            e.reason = format!("DNS from {src} to {dst}, which is not an internal resolver");
            return Some((*k, e, m.clone()));
        }
        // Link-local control (DHCP, ND) is never policed, so never east-west:
        // a segment's own router answering DHCP inside its CIDR is expected.
        if let (Some(a), Some(b)) = (sm, dm)
            && a.segment == b.segment
            && !named
            && verdict != Verdict::Exempt
        {
            let mut e = event("east_west", "medium", k, r.app, a, now);
            e.reason = format!(
                "{src} to {dst} inside segment {}: {} port {} is not allowed by its rules",
                a.segment,
                proto_name(k.proto),
                k.dport
            );
            return Some((*k, e, a.clone()));
        }
        None
    }
}

fn iface(names: &HashMap<u32, String>, ifindex: u32) -> String {
    names.get(&ifindex).cloned().unwrap_or_else(|| format!("if{ifindex}"))
}

/// A detection about `m`, with no flow (address claims).
fn base_event(kind: &str, severity: &str, m: &End, now: SystemTime) -> Event {
    Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        kind: kind.into(),
        severity: severity.into(),
        time: rfc3339(now),
        segment: m.segment.clone(),
        zone: m.zone.clone(),
        function: m.function.clone(),
        ..Default::default()
    }
}

/// A detection about flow `k` and `m`, one of its ends.
pub(crate) fn event(kind: &str, severity: &str, k: &FlowKey, app: u8, m: &End, now: SystemTime) -> Event {
    Event {
        src: k.src_ip().to_string(),
        dst: k.dst_ip().to_string(),
        proto: proto_name(k.proto),
        sport: k.sport,
        dport: k.dport,
        vlan: k.vlan,
        app: App::from_u8(app).name().into(),
        ..base_event(kind, severity, m, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Member;

    #[test]
    fn declared_hosts_and_bindings_are_validated_with_their_key() {
        let bad = |c: DetectionConfig| c.validate().unwrap_err();
        let e = bad(DetectionConfig {
            dhcp_servers: vec!["10.0.0.1".into(), "nope".into()],
            ..Default::default()
        });
        assert_eq!(
            (e.0, e.1.as_str()),
            (
                vec![Step::Key("dhcp_servers"), Step::Index(1)],
                "dhcp_servers: `nope` is not an address, CIDR or MAC"
            )
        );
        let e = bad(DetectionConfig {
            arp_bindings: [("10.0.0.1".to_string(), "00:11:22".to_string())].into(),
            ..Default::default()
        });
        assert!(e.1.contains("`00:11:22` (for 10.0.0.1) is not a MAC address"), "{}", e.1);
        let e = bad(DetectionConfig {
            arp_bindings: [("fe80::1".to_string(), "00:11:22:33:44:55".to_string())].into(),
            ..Default::default()
        });
        assert!(e.1.contains("not an IPv4 address"), "{}", e.1);
        let ok = DetectionConfig {
            dhcp_servers: vec!["10.0.0.0/24".into(), "00:11:22:33:44:55".into()],
            ipv6_routers: vec!["fe80::1".into()],
            arp_bindings: [("10.0.0.1".to_string(), "00:11:22:33:44:55".to_string())].into(),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let h = Hosts::new(&ok.dhcp_servers);
        assert!(h.holds(&"10.0.0.9".parse().unwrap(), None));
        assert!(h.holds(&"10.9.0.9".parse().unwrap(), Some([0, 0x11, 0x22, 0x33, 0x44, 0x55])));
        assert!(!h.holds(&"10.9.0.9".parse().unwrap(), Some([2; 6])));
    }

    #[test]
    fn vnc_and_winrm_are_remote_administration_by_their_ports() {
        assert_eq!(remote_admin(App::Smb, IPPROTO_TCP, 40_000), Some("smb"));
        assert_eq!(remote_admin(App::Unknown, IPPROTO_TCP, 5901), Some("vnc"));
        assert_eq!(remote_admin(App::Http, IPPROTO_TCP, 5985), Some("winrm"));
        assert_eq!(remote_admin(App::Tls, IPPROTO_TCP, 5986), Some("winrm"));
        // A port says nothing against the payload's own app, or over UDP.
        assert_eq!(remote_admin(App::Http, IPPROTO_TCP, 5900), None);
        assert_eq!(remote_admin(App::Unknown, IPPROTO_UDP, 5900), None);
        assert_eq!(remote_admin(App::Http, IPPROTO_TCP, 80), None);
    }

    #[test]
    fn zones_the_policy_does_not_define_are_named_with_their_place() {
        let mut policy = Policy::pumps(Vec::new(), Default::default());
        policy.zones.push(crate::policy::model::Zone {
            name: "pacs".into(),
            cidrs: vec!["10.0.2.0/24".parse().unwrap()],
        });
        let cfg = DetectionConfig {
            clinical_zones: [("pacs".to_string(), "pacs".to_string()), ("emr".into(), "emr".into())].into(),
            admin_zones: vec!["pacs".into(), "it".into()],
            ..Default::default()
        };
        let bad: Vec<(Vec<Step>, String)> = cfg.unknown_zones(&policy);
        let msgs: Vec<&str> = bad.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(
            msgs,
            [
                "clinical_zones: `emr` is not a zone of the policy",
                "admin_zones: `it` is not a zone of the policy"
            ]
        );
        assert_eq!(bad[1].0, vec![Step::Key("admin_zones"), Step::Index(1)]);
        let m = Members::new(&policy, &[], &cfg);
        let pacs = m.server(&"10.0.2.9".parse().unwrap()).unwrap();
        assert_eq!((pacs.zone.as_str(), pacs.function.as_str(), pacs.segment.as_str()), ("pacs", "pacs", ""));
        assert!(m.server(&"10.0.3.9".parse().unwrap()).is_none());
        assert!(m.is_admin(&"10.0.2.1".parse().unwrap()));
    }

    #[test]
    fn a_routers_mac_does_not_take_the_addresses_it_forwards_for_into_its_segment() {
        let policy = Policy::pumps(
            vec![Member::Net { net: "10.10.0.0/24".parse().unwrap(), vlan: None }],
            Default::default(),
        );
        let device = |mac: &str, seg: Option<&str>, ips: &[&str]| {
            let mut d = Device::new("bump-core".into(), 0, mac.parse().unwrap());
            d.ips = ips.iter().map(|i| i.parse().unwrap()).collect();
            d.segment = seg.map(String::from);
            d
        };
        // The router leg on the ward's side of a bump: its own address (a
        // member) and the sources it routes; the pharmacy itself, elsewhere.
        let router = device("02:00:00:00:00:01", Some("pumps"), &["10.10.0.1", "10.40.0.20", "10.40.0.53"]);
        let pharmacy = device("c8:f7:50:40:00:20", None, &["10.40.0.20"]);
        let pump = device("58:46:e1:10:00:11", Some("pumps"), &["10.10.0.11"]);
        let m = Members::new(&policy, &[router, pharmacy, pump], &DetectionConfig::default());
        let seg = |ip: &str| m.get(&ip.parse().unwrap()).map(|e| e.segment);
        assert_eq!(seg("10.40.0.20"), None, "the pharmacy is in no segment");
        assert_eq!(seg("10.40.0.53"), Some("pumps".into()), "claimed by the router alone");
        assert_eq!((seg("10.10.0.1"), seg("10.10.0.11")), (Some("pumps".into()), Some("pumps".into())));
    }
}

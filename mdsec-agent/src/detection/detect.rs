//! Detections over the flow table: `scan`, `remote_access`, `external_dns`,
//! `east_west`, the learned-baseline ones from [`crate::detection::learn`] (`new_destination`,
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
        for (key, v) in [("scan_hosts", self.scan_hosts), ("scan_ports", self.scan_ports)] {
            if v < 2 {
                return Err((vec![key.into()], format!("detection.{key} must be at least 2")));
            }
        }
        for (key, v) in [("scan_window_secs", self.scan_window_secs), ("dedup_secs", self.dedup_secs)] {
            if v == 0 {
                return Err((vec![key.into()], format!("detection.{key} must be positive")));
            }
        }
        Ok(())
    }

    fn resolvers(&self) -> Vec<IpNet> {
        self.internal_resolvers.iter().filter_map(|r| parse_net(r)).collect()
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Apps that give remote control of a device or its files.
const REMOTE_ACCESS: [App; 4] = [App::Ssh, App::Telnet, App::Rdp, App::Smb];

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

/// A flow end that is a segment member (a device).
#[derive(Clone)]
pub struct End {
    pub segment: String,
    pub function: String,
    pub mac: Option<String>,
}

/// Who is a segment member: inventory devices by address (MAC membership
/// included), then CIDR members.
pub struct Members<'a> {
    policy: &'a Policy,
    by_ip: HashMap<IpAddr, End>,
}

impl<'a> Members<'a> {
    /// An address belongs to the device that claims the fewest addresses: a
    /// router's MAC seen on a bridge or mirror port carries every address it
    /// forwards for, and must not take a server's address into its segment.
    pub fn new(policy: &'a Policy, devices: &[Device]) -> Members<'a> {
        let mut owner: HashMap<IpAddr, &Device> = HashMap::new();
        for d in devices {
            for &ip in &d.ips {
                let o = owner.entry(ip).or_insert(d);
                if d.ips.len() < o.ips.len() {
                    *o = d;
                }
            }
        }
        let by_ip = owner
            .into_iter()
            .filter_map(|(ip, d)| {
                let seg = d.segment.as_deref().and_then(|s| policy.segments.iter().find(|x| x.name == s))?;
                let end = End {
                    segment: seg.name.clone(),
                    function: seg.function.clone(),
                    mac: Some(d.mac.to_string()),
                };
                Some((ip, end))
            })
            .collect();
        Members { policy, by_ip }
    }

    pub fn get(&self, ip: &IpAddr) -> Option<End> {
        self.by_ip.get(ip).cloned().or_else(|| {
            let seg = self.policy.net_segment(ip)?;
            Some(End { segment: seg.name.clone(), function: seg.function.clone(), mac: None })
        })
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
            learner,
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
        let members = Members::new(policy, devices);
        let mut out = Vec::new();
        let mut suppressed: HashMap<String, u64> = HashMap::new();

        // New client-side flows, oldest first so windows advance in order.
        // Record ids only grow, so "not seen before" is "above the last id
        // checked" (no set of a million keys).
        let mut clients: Vec<FlowKey> = Vec::new();
        let mut new: Vec<(FlowKey, FlowRecord)> = Vec::new();
        for (k, r) in tables.flows.after(self.checked) {
            self.checked = r.id;
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
            let (sm, dm) = (members.get(&src), members.get(&dst));
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
            if let Some(f) = self.per_flow(k, r, &members.get(&src), &members.get(&dst), now) {
                found.push(f);
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

        // 4. Decommissioned devices that sent traffic (in this run) after they were
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
        (out, suppressed)
    }

    /// Remote access, external DNS or east-west for one client-side flow (in
    /// that order: one flow yields at most one).
    fn per_flow(
        &self,
        k: &FlowKey,
        r: &FlowRecord,
        sm: &Option<End>,
        dm: &Option<End>,
        now: SystemTime,
    ) -> Option<(FlowKey, Event, End)> {
        let (src, dst) = (k.src_ip(), k.dst_ip());
        let app =
            if r.app_confidence != 0 { App::from_u8(r.app) } else { port_hint(k.proto, k.sport, k.dport) };
        let verdict = Verdict::from_u8(r.verdict);
        // The segment's allow-list names this flow: a rule (not a default) allowed it.
        let named = matches!(verdict, Verdict::Allow | Verdict::Reply | Verdict::AppPending) && r.rule != 0;
        if REMOTE_ACCESS.contains(&app) && !named && (sm.is_some() || dm.is_some()) {
            let device = dm.clone().or(sm.clone())?;
            let mut e = event("remote_access", "high", k, r.app, &device, now);
            e.app = app.name().into();
            e.reason = format!("{} from {src} to {dst}, not named by the allow-list", app.name());
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
        if let (Some(a), Some(b)) = (sm, dm)
            && a.segment == b.segment
            && !named
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

pub(crate) fn event(kind: &str, severity: &str, k: &FlowKey, app: u8, m: &End, now: SystemTime) -> Event {
    Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        kind: kind.into(),
        severity: severity.into(),
        time: rfc3339(now),
        src: k.src_ip().to_string(),
        dst: k.dst_ip().to_string(),
        proto: proto_name(k.proto),
        sport: k.sport,
        dport: k.dport,
        vlan: k.vlan,
        segment: m.segment.clone(),
        function: m.function.clone(),
        app: App::from_u8(app).name().into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Member;

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
        let m = Members::new(&policy, &[router, pharmacy, pump]);
        let seg = |ip: &str| m.get(&ip.parse().unwrap()).map(|e| e.segment);
        assert_eq!(seg("10.40.0.20"), None, "the pharmacy is in no segment");
        assert_eq!(seg("10.40.0.53"), Some("pumps".into()), "claimed by the router alone");
        assert_eq!((seg("10.10.0.1"), seg("10.10.0.11")), (Some("pumps".into()), Some("pumps".into())));
    }
}

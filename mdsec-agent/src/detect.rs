//! Detections over the flow table: `scan`, `remote_access`, `external_dns`,
//! `east_west`, and `decommissioned_device` from the inventory.
//!
//! Runs on the store thread after each inventory pass. Every flow is examined
//! once, in its client → server direction (the client uses the higher port), and
//! only when a segment member (a medical device) is at one end; a scan is counted
//! for any source that reaches into a segment. One flow yields at most one
//! detection (scan, then remote access, external DNS, east-west). Equal
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
    policy::Verdict,
};
use serde::{Deserialize, Serialize};

use crate::{
    clock::{Anchor, rfc3339},
    model::{Device, Event, proto_name},
    policy::model::{Member, Policy},
    state::Tables,
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
    /// Errors as (text to locate in the file, message).
    pub fn validate(&self) -> Result<(), (&str, String)> {
        for r in &self.internal_resolvers {
            if parse_net(r).is_none() {
                return Err((r.as_str(), format!("internal_resolvers: `{r}` is not an address or CIDR")));
            }
        }
        if self.scan_hosts < 2 || self.scan_ports < 2 {
            return Err(("scan_", "detection.scan_hosts and scan_ports must be at least 2".into()));
        }
        if self.scan_window_secs == 0 || self.dedup_secs == 0 {
            return Err(("_secs", "detection.scan_window_secs and dedup_secs must be positive".into()));
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

/// A flow end that is a segment member (a device).
#[derive(Clone)]
struct End {
    segment: String,
    function: String,
    mac: Option<String>,
}

pub struct Detector {
    cfg: DetectionConfig,
    ifnames: HashMap<u32, String>,
    resolvers: Vec<IpNet>,
    seen: HashSet<FlowKey>,
    scans: HashMap<IpAddr, ScanState>,
    last_emitted: HashMap<(String, IpAddr, IpAddr, u16), SystemTime>,
    /// MACs (canonical spelling) the operator marked decommissioned.
    decommissioned: HashSet<String>,
    decommissioned_reported: HashSet<String>,
}

impl Detector {
    pub fn new(
        cfg: DetectionConfig,
        ifnames: HashMap<u32, String>,
        decommissioned: HashSet<String>,
    ) -> Detector {
        Detector {
            decommissioned,
            ifnames,
            resolvers: cfg.resolvers(),
            cfg,
            seen: HashSet::new(),
            scans: HashMap::new(),
            last_emitted: HashMap::new(),
            decommissioned_reported: HashSet::new(),
        }
    }

    /// Examines flows not seen before; returns events and suppressed counts by type.
    pub fn check(
        &mut self,
        tables: &Tables,
        policy: &Policy,
        devices: &[Device],
        now: SystemTime,
    ) -> (Vec<Event>, HashMap<String, u64>) {
        let anchor = Anchor::now();
        let members = members(policy, devices);
        let member = |ip: &IpAddr| {
            members.get(ip).cloned().or_else(|| {
                let seg = policy.segments.iter().find(|s| {
                    s.members.iter().any(|m| matches!(m, Member::Net { net, .. } if net.contains(ip)))
                })?;
                Some(End { segment: seg.name.clone(), function: seg.function.clone(), mac: None })
            })
        };
        let mut out = Vec::new();
        let mut suppressed: HashMap<String, u64> = HashMap::new();

        // New client-side flows, oldest first so windows advance in order.
        let mut new: Vec<_> = tables
            .flows
            .iter()
            .filter(|(k, _)| !self.seen.contains(*k))
            .map(|(k, r)| (*k, r.clone()))
            .collect();
        self.seen.retain(|k| tables.flows.contains_key(k));
        self.seen.extend(new.iter().map(|(k, _)| *k));
        new.retain(|(k, _)| matches!(k.proto, 6 | 17) && k.sport > k.dport);
        new.sort_by_key(|(_, r)| r.first_seen_ns);

        // 1. Scans: per source, distinct hosts / ports per host in a window.
        let window = Duration::from_secs(self.cfg.scan_window_secs);
        let mut scanning: HashSet<IpAddr> = HashSet::new();
        for (k, r) in &new {
            let (src, dst) = (k.src_ip(), k.dst_ip());
            let (sm, dm) = (member(&src), member(&dst));
            if sm.is_none() && dm.is_none() {
                continue;
            }
            let t = anchor.wall(r.first_seen_ns);
            let st = self.scans.entry(src).or_insert_with(|| ScanState {
                window_start: t,
                hosts: BTreeSet::new(),
                ports: HashMap::new(),
                reported: false,
            });
            if t.duration_since(st.window_start).unwrap_or_default() > window {
                *st = ScanState {
                    window_start: t,
                    hosts: BTreeSet::new(),
                    ports: HashMap::new(),
                    reported: false,
                };
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
        let dedup = Duration::from_secs(self.cfg.dedup_secs);
        for (k, r) in &new {
            let (src, dst) = (k.src_ip(), k.dst_ip());
            if scanning.contains(&src) {
                continue;
            }
            let (sm, dm) = (member(&src), member(&dst));
            let app = if r.app_confidence != 0 {
                App::from_u8(r.app)
            } else {
                port_hint(k.proto, k.sport, k.dport)
            };
            let verdict = Verdict::from_u8(r.verdict);
            // The segment's allow-list names this flow: a rule (not a default) allowed it.
            let named =
                matches!(verdict, Verdict::Allow | Verdict::Reply | Verdict::AppPending) && r.rule != 0;
            let found = if REMOTE_ACCESS.contains(&app) && !named && (sm.is_some() || dm.is_some()) {
                let device = dm.clone().or(sm.clone()).unwrap();
                let mut e = event("remote_access", "high", k, r.app, &device, now);
                e.app = app.name().into();
                e.reason = format!("{} from {src} to {dst}, not named by the allow-list", app.name());
                Some((e, device))
            } else if let Some(m) = sm.as_ref().filter(|_| {
                (app == App::Dns || k.dport == 53)
                    && !self.resolvers.is_empty()
                    && !self.resolvers.iter().any(|n| n.contains(&dst))
            }) {
                let mut e = event("external_dns", "medium", k, r.app, m, now);
                e.app = "dns".into();
                e.reason = format!("DNS from {src} to {dst}, which is not an internal resolver");
                Some((e, m.clone()))
            } else if let (Some(a), Some(b)) = (&sm, &dm)
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
                Some((e, a.clone()))
            } else {
                None
            };
            let Some((mut e, device)) = found else { continue };
            let key = (e.kind.clone(), src, dst, k.dport);
            if self.last_emitted.get(&key).is_some_and(|t| now.duration_since(*t).unwrap_or_default() < dedup)
            {
                *suppressed.entry(e.kind.clone()).or_default() += 1;
                continue;
            }
            self.last_emitted.insert(key, now);
            e.mac = e.mac.or(device.mac);
            e.iface = iface(&self.ifnames, k.ifindex);
            e.evidence = format!(
                "{} packets, {} bytes, verdict {}, first seen {}",
                r.totals().packets,
                r.totals().bytes,
                verdict.name(),
                rfc3339(anchor.wall(r.first_seen_ns))
            );
            out.push(e);
        }
        self.last_emitted.retain(|_, t| now.duration_since(*t).unwrap_or_default() < dedup);

        // 3. Decommissioned devices seen sending in this run: once per device.
        for d in devices {
            if self.decommissioned.contains(&d.mac)
                && tables.devices.keys().any(|k| crate::model::mac_string(k.mac) == d.mac)
                && self.decommissioned_reported.insert(d.mac.clone())
            {
                let seg = d.segment.as_deref().and_then(|s| policy.segments.iter().find(|x| x.name == s));
                let reason = format!("{} is marked decommissioned but sent traffic", d.mac);
                let mut e =
                    crate::devwatch::device_event("decommissioned_device", "high", d, seg, reason, now);
                e.evidence = format!("{} packets since {}", d.packets, d.first_seen);
                out.push(e);
            }
        }
        (out, suppressed)
    }
}

fn iface(names: &HashMap<u32, String>, ifindex: u32) -> String {
    names.get(&ifindex).cloned().unwrap_or_else(|| format!("if{ifindex}"))
}

/// Segment members by address, from the inventory (MAC membership first).
fn members(policy: &Policy, devices: &[Device]) -> HashMap<IpAddr, End> {
    let mut out = HashMap::new();
    for d in devices {
        let Some(seg) = d.segment.as_deref().and_then(|s| policy.segments.iter().find(|x| x.name == s))
        else {
            continue;
        };
        for ip in d.ips.iter().filter_map(|i| i.parse::<IpAddr>().ok()) {
            out.insert(
                ip,
                End { segment: seg.name.clone(), function: seg.function.clone(), mac: Some(d.mac.clone()) },
            );
        }
    }
    out
}

fn event(kind: &str, severity: &str, k: &FlowKey, app: u8, m: &End, now: SystemTime) -> Event {
    Event {
        version: crate::model::EVENT_SCHEMA_VERSION,
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

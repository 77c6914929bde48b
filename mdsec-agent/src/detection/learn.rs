//! Learned baselines: what each segment's devices talk to.
//!
//! Every client-side flow with a segment member at one end becomes an observation
//! of that segment: (device, direction, peer address, proto, port, app) with a
//! flow count and first/last seen, persisted in the state database. During the
//! segment's learning period observations are marked `learned`; `suggest` turns
//! those into allow rules. After it, a flow whose peer, port or app the segment
//! has never shown raises `new_destination`, `new_port` or `new_app`; the flow is
//! then stored too, so each first contact is reported once.
//!
//! Peers are compared by *label* (the peer's segment, else the most specific zone
//! holding the address, else the address itself), computed with the current
//! policy: a second pharmacy server in the `pharmacy` zone is not a new destination.
//! A TCP flow is observed once its first payload is classified (or after
//! [`SETTLE`] without one), so the app is known when the baseline is compared.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use mdsec_common::{
    app::{App, Confidence},
    flow::FlowKey,
    net::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP},
    policy::exempt,
};

use crate::{
    base::clock::{Anchor, rfc3339},
    base::{event::Event, net::proto_name},
    datapath::state::{FlowRecord, Tables},
    detection::detect::{End, Members, PolicyView},
    policy::model::{Direction, Peer, Policy},
};

/// Observation rows kept (in memory and in the database); beyond this new rows
/// are counted as dropped, so a device talking to the whole internet cannot grow
/// the database without bound.
pub const MAX_OBSERVATIONS: usize = 100_000;

/// How long a TCP flow may go without payload before it is observed without an app.
pub const SETTLE: Duration = Duration::from_secs(10);

/// One observed communication of a segment. `app` is the payload-identified app,
/// `unknown` for a payload no classifier recognised, empty when no payload was seen.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObsKey {
    pub segment: String,
    /// `Out`: the device opened the flow; `In`: the peer did.
    pub direction: Direction,
    pub device: IpAddr,
    pub peer: IpAddr,
    /// The peer's segment when it is a segment member (empty otherwise).
    pub peer_segment: String,
    pub proto: u8,
    /// Server port for TCP/UDP, 0 for ICMP echo.
    pub port: u16,
    pub app: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObsVal {
    pub flows: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// First recorded during the segment's learning period.
    pub learned: bool,
}

/// Learning state per segment, served at `/api/v1/baseline` and in `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub segments: std::collections::BTreeMap<String, SegmentStatus>,
    /// Observations not stored because the table was full ([`MAX_OBSERVATIONS`]).
    pub dropped: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SegmentStatus {
    /// In its learning period: observations are learned, no `new_*` events.
    pub learning: bool,
    /// When the learning period ends (or ended), RFC 3339.
    pub learning_ends: String,
    /// Stored observations (learned or not).
    pub observations: u64,
}

/// The name under which rules and the baseline see a peer address.
pub fn label(policy: &Policy, peer: IpAddr, peer_segment: &str) -> Peer {
    if !peer_segment.is_empty() && policy.segment_index(peer_segment).is_some() {
        return Peer::Name(peer_segment.to_string());
    }
    if let Some(s) = policy.net_segment(&peer) {
        return Peer::Name(s.name.clone());
    }
    // The most specific zone; equal prefixes go to the first name in order.
    let zone = policy
        .zones
        .iter()
        .flat_map(|z| z.cidrs.iter().filter(|c| c.contains(&peer)).map(move |c| (c.prefix_len(), &z.name)))
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)));
    match zone {
        Some((_, name)) => Peer::Name(name.clone()),
        None => Peer::Cidr(IpNet::from(peer)),
    }
}

/// The app text an observation records for a flow.
fn app_text(r: &FlowRecord) -> String {
    if !r.app_done() {
        String::new()
    } else if r.app_confidence == Confidence::High as u8 {
        App::from_u8(r.app).name().into()
    } else {
        "unknown".into()
    }
}

type PeerKey = (String, Direction, Peer);
type PortKey = (String, Direction, Peer, u8, u16);
type AppKey = (String, Direction, Peer, u8, u16, String);

/// The baseline by label, for one policy generation.
#[derive(Default)]
struct Known {
    generation: u32,
    peers: HashSet<PeerKey>,
    ports: HashSet<PortKey>,
    apps: HashSet<AppKey>,
}

impl Known {
    fn add(&mut self, policy: &Policy, k: &ObsKey) {
        let p = label(policy, k.peer, &k.peer_segment);
        let s = k.segment.clone();
        self.peers.insert((s.clone(), k.direction, p.clone()));
        self.ports.insert((s.clone(), k.direction, p.clone(), k.proto, k.port));
        if !k.app.is_empty() {
            self.apps.insert((s, k.direction, p, k.proto, k.port, k.app.clone()));
        }
    }
}

/// A new-communication detection for one flow, before deduplication.
pub struct Novelty {
    pub key: FlowKey,
    pub event: Event,
    pub device: End,
}

#[derive(Default)]
pub struct Learner {
    rows: HashMap<ObsKey, ObsVal>,
    dirty: HashSet<ObsKey>,
    /// Client-side TCP flows waiting for their first payload.
    pending: HashSet<FlowKey>,
    known: Option<Known>,
    /// Observations not stored because the table was full.
    pub dropped: u64,
}

impl Learner {
    pub fn new(rows: Vec<(ObsKey, ObsVal)>) -> Learner {
        Learner { rows: rows.into_iter().collect(), ..Default::default() }
    }

    /// Stored observations per segment.
    pub fn counts(&self) -> HashMap<String, u64> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for k in self.rows.keys() {
            *out.entry(k.segment.clone()).or_default() += 1;
        }
        out
    }

    /// Observes the new client-side flows `clients` (plus earlier ones still
    /// waiting for payload) under the installed policy `view`: records each, and
    /// returns a novelty for a flow outside the learning period that the baseline
    /// lacks. Flows from `scanner` sources are neither recorded nor reported.
    pub fn observe(
        &mut self,
        tables: &Tables,
        clients: &[FlowKey],
        members: &Members,
        view: &PolicyView,
        scanner: impl Fn(&IpAddr) -> bool,
        now: SystemTime,
    ) -> Vec<Novelty> {
        let (policy, learning_ends) = (view.policy, view.learning_ends);
        if self.known.as_ref().is_none_or(|k| k.generation != view.generation) {
            let mut known = Known { generation: view.generation, ..Default::default() };
            for k in self.rows.keys() {
                known.add(policy, k);
            }
            self.known = Some(known);
        }
        let anchor = Anchor::now();
        let mut out = Vec::new();
        let candidates: Vec<FlowKey> = self.pending.drain().chain(clients.iter().copied()).collect();
        for key in candidates {
            let Some(r) = tables.flows.get(&key) else { continue };
            let started = anchor.wall(r.first_seen_ns);
            if key.proto == IPPROTO_TCP
                && !r.app_done()
                && now.duration_since(started).unwrap_or_default() < SETTLE
            {
                self.pending.insert(key);
                continue;
            }
            let (src, dst) = (key.src_ip(), key.dst_ip());
            // Link-local control traffic is never policed, so it is not learned either.
            if scanner(&src) || exempt(src.is_ipv4(), key.proto, key.sport, key.dport, &key.dst) {
                continue;
            }
            let (sm, dm) = (members.get(&src), members.get(&dst));
            let port = if matches!(key.proto, IPPROTO_ICMP | IPPROTO_ICMPV6) { 0 } else { key.dport };
            let app = app_text(r);
            let mut ends = Vec::new();
            if let Some(m) = &sm {
                let peer_seg = dm.as_ref().map(|d| d.segment.clone()).unwrap_or_default();
                ends.push((m.clone(), Direction::Out, src, dst, peer_seg));
            }
            // Inside one segment the outbound observation says it all.
            if let Some(m) = dm.as_ref().filter(|d| sm.as_ref().is_none_or(|s| s.segment != d.segment)) {
                let peer_seg = sm.as_ref().map(|s| s.segment.clone()).unwrap_or_default();
                ends.push((m.clone(), Direction::In, dst, src, peer_seg));
            }
            let mut reported = false;
            for (end, direction, device, peer, peer_segment) in ends {
                let obs = ObsKey {
                    segment: end.segment.clone(),
                    direction,
                    device,
                    peer,
                    peer_segment,
                    proto: key.proto,
                    port,
                    app: app.clone(),
                };
                // A flow that started inside the learning period is learned, however
                // late this pass sees it.
                let is_learning = learning_ends.get(&end.segment).is_some_and(|e| started < *e);
                if !is_learning
                    && !reported
                    && let Some(mut n) = self.novelty(policy, &obs, &key, &end, now)
                {
                    n.event.evidence = format!("baseline of segment {}: no such communication", end.segment);
                    out.push(n);
                    reported = true;
                }
                self.record(policy, obs, rfc3339(started), is_learning);
            }
        }
        out
    }

    /// What is new about `obs` relative to the baseline, if anything.
    fn novelty(
        &self,
        policy: &Policy,
        obs: &ObsKey,
        key: &FlowKey,
        end: &End,
        now: SystemTime,
    ) -> Option<Novelty> {
        let known = self.known.as_ref()?;
        let p = label(policy, obs.peer, &obs.peer_segment);
        let s = obs.segment.clone();
        let dir = obs.direction;
        let way = match dir {
            Direction::Out => format!("{} to {p}", obs.device),
            Direction::In => format!("{p} to {}", obs.device),
        };
        let what = format!("{} port {}", proto_name(obs.proto), obs.port);
        let (kind, severity, reason) = if !known.peers.contains(&(s.clone(), dir, p.clone())) {
            ("new_destination", "medium", format!("first contact {way} ({what}) since the baseline"))
        } else if !known.ports.contains(&(s.clone(), dir, p.clone(), obs.proto, obs.port)) {
            ("new_port", "low", format!("{way}: {what} is new since the baseline"))
        } else if !obs.app.is_empty()
            && !known.apps.contains(&(s, dir, p.clone(), obs.proto, obs.port, obs.app.clone()))
        {
            ("new_app", "medium", format!("{way}: {what} now carries {}, not seen in the baseline", obs.app))
        } else {
            return None;
        };
        let mut event = crate::detection::detect::event(kind, severity, key, 0, end, now);
        event.app = if obs.app.is_empty() { "unknown".into() } else { obs.app.clone() };
        event.reason = reason;
        Some(Novelty { key: *key, event, device: end.clone() })
    }

    fn record(&mut self, policy: &Policy, obs: ObsKey, seen: String, learning: bool) {
        if let Some(v) = self.rows.get_mut(&obs) {
            v.flows += 1;
            v.first_seen = v.first_seen.clone().min(seen.clone());
            v.last_seen = v.last_seen.clone().max(seen);
            v.learned |= learning;
        } else if self.rows.len() >= MAX_OBSERVATIONS {
            self.dropped += 1;
            return;
        } else {
            if let Some(k) = self.known.as_mut() {
                k.add(policy, &obs);
            }
            self.rows.insert(
                obs.clone(),
                ObsVal { flows: 1, first_seen: seen.clone(), last_seen: seen, learned: learning },
            );
        }
        self.dirty.insert(obs);
    }

    /// Rows changed since the last call, for the state database.
    pub fn take_dirty(&mut self) -> Vec<(ObsKey, ObsVal)> {
        self.dirty.drain().filter_map(|k| self.rows.get(&k).map(|v| (k.clone(), v.clone()))).collect()
    }

    /// Puts rows back after a failed save, so they are written next time.
    pub fn restore_dirty(&mut self, rows: &[(ObsKey, ObsVal)]) {
        self.dirty.extend(rows.iter().map(|(k, _)| k.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::load_dir;

    fn policy(name: &str) -> (Policy, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("mdsec-t-learn-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("zones.yaml"),
            "zones:\n  pharmacy: [10.0.2.0/24]\n  pharmacy-hl7: [10.0.2.10/32]\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("pumps.yaml"),
            "segment: pumps\nfunction: infusion-pump\nmode: monitor\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n",
        )
        .unwrap();
        let (p, d) = load_dir(&dir, SystemTime::now());
        (p.unwrap_or_else(|| panic!("{d:?}")), dir)
    }

    #[test]
    fn labels_prefer_segments_then_the_most_specific_zone() {
        let (p, dir) = policy("labels");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(label(&p, ip("10.0.1.7"), ""), Peer::Name("pumps".into()));
        assert_eq!(label(&p, ip("10.0.2.10"), ""), Peer::Name("pharmacy-hl7".into()));
        assert_eq!(label(&p, ip("10.0.2.11"), ""), Peer::Name("pharmacy".into()));
        assert_eq!(label(&p, ip("10.0.9.1"), ""), Peer::Cidr("10.0.9.1/32".parse().unwrap()));
        // A peer segment that no longer exists falls back to addresses.
        assert_eq!(label(&p, ip("10.0.9.1"), "gone"), Peer::Cidr("10.0.9.1/32".parse().unwrap()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rows_merge_and_the_table_is_bounded() {
        let (p, dir) = policy("rows");
        let mut l = Learner::default();
        let key = |port: u16| ObsKey {
            segment: "pumps".into(),
            direction: Direction::Out,
            device: "10.0.1.2".parse().unwrap(),
            peer: "10.0.2.2".parse().unwrap(),
            peer_segment: String::new(),
            proto: 6,
            port,
            app: "hl7".into(),
        };
        l.record(&p, key(2575), "2026-11-23T10:00:00.000Z".into(), true);
        l.record(&p, key(2575), "2026-11-23T09:00:00.000Z".into(), false);
        let v = l.rows[&key(2575)].clone();
        assert_eq!((v.flows, v.learned), (2, true));
        assert_eq!(v.first_seen, "2026-11-23T09:00:00.000Z");
        assert_eq!(v.last_seen, "2026-11-23T10:00:00.000Z");
        assert_eq!(l.take_dirty().len(), 1);
        assert!(l.take_dirty().is_empty());
        for port in 1..=MAX_OBSERVATIONS as u16 / 2 {
            l.rows.insert(key(port), v.clone());
        }
        // Fill to the cap with a second segment's rows, then one more is dropped.
        let mut i = 0u32;
        while l.rows.len() < MAX_OBSERVATIONS {
            let mut k = key(1);
            k.segment = format!("s{i}");
            l.rows.insert(k, v.clone());
            i += 1;
        }
        l.record(&p, key(65535), "2026-11-23T10:00:00.000Z".into(), true);
        assert_eq!(l.dropped, 1);
        assert!(!l.rows.contains_key(&key(65535)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

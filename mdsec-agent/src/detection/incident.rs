//! Incidents: the events of one source, correlated while it stays active.
//!
//! Every event but `new_device` (inventory, not behaviour) and `incident`
//! itself is keyed by its source address. A detection opens an incident at
//! once; policy drops, would-drops and novelty events (`new_*`) open one
//! when `min_events` of them arrive from one source within `window_secs`.
//! A segment in its learning period has no allow-list yet: its denials and
//! east-west events open nothing; nor do a server's answers (from the lower
//! port) to requests that were denied. While an incident is open every event of
//! its source joins it. It closes after `quiet_secs` without one.
//!
//! Notification: the incident itself is an event (`type: incident`, `reason`
//! `opened`, `updated` or `closed`): one when it opens, updates at most every
//! `update_secs` while it grows, one when it closes. Novelty events are held
//! back for `hold_secs` (an incident opening meanwhile subsumes them: kept
//! and queryable, `subsumed: true`, not sent to the sinks); drops and
//! detections are sent as always, tagged with the incident.
//!
//! Architecture invariant: only the event store (`surfaces::events`)
//! calls in here, once per event and once per store pass, so an incident
//! sees every event exactly once and in sequence order.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{
    base::{
        clock::{parse_rfc3339, rfc3339},
        diag::Step,
        event::Event,
    },
    detection::triage::{Impact, TriageConfig},
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentConfig {
    /// Drops and novelty events from one source within `window_secs` that open an incident.
    #[serde(default = "default_min_events")]
    pub min_events: usize,
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// An open incident closes after this long without an event of its source.
    #[serde(default = "default_quiet")]
    pub quiet_secs: u64,
    /// An open incident's updates are notified at most this often.
    #[serde(default = "default_update")]
    pub update_secs: u64,
    /// How long a novelty event waits for an incident that would subsume it.
    #[serde(default = "default_hold")]
    pub hold_secs: u64,
}

fn default_min_events() -> usize {
    5
}
fn default_window() -> u64 {
    300
}
fn default_quiet() -> u64 {
    900
}
fn default_update() -> u64 {
    300
}
fn default_hold() -> u64 {
    6
}

impl Default for IncidentConfig {
    fn default() -> Self {
        IncidentConfig {
            min_events: default_min_events(),
            window_secs: default_window(),
            quiet_secs: default_quiet(),
            update_secs: default_update(),
            hold_secs: default_hold(),
        }
    }
}

impl IncidentConfig {
    /// Errors as (path below `incidents:`, message).
    pub fn validate(&self) -> Result<(), (Vec<Step<'static>>, String)> {
        if self.min_events == 0 {
            return Err((vec!["min_events".into()], "incidents.min_events must be at least 1".into()));
        }
        for (key, v) in [
            ("window_secs", self.window_secs),
            ("quiet_secs", self.quiet_secs),
            ("update_secs", self.update_secs),
        ] {
            if v == 0 {
                return Err((vec![key.into()], format!("incidents.{key} must be positive")));
            }
        }
        Ok(())
    }
}

/// Targets listed per incident; the rest are counted in `targets_total`.
pub const MAX_TARGETS: usize = 64;
/// Incidents kept in memory for the API (the state database keeps them all).
pub const KEEP: usize = 10_000;
/// Sources whose drops are being counted toward an incident at most.
const MAX_PENDING: usize = 100_000;

/// Event types that open an incident on their own.
pub const DETECTIONS: &[&str] = &[
    "scan",
    "remote_access",
    "external_dns",
    "east_west",
    "first_contact",
    "rogue_dhcp_server",
    "rogue_router_advertisement",
    "arp_spoofing",
    "gratuitous_arp_flood",
    "duplicate_ip",
    "rogue_device",
    "decommissioned_device",
];

/// Novelty events: held back, and subsumed by an incident of their source.
pub fn is_novelty(kind: &str) -> bool {
    matches!(kind, "new_destination" | "new_port" | "new_app")
}

/// A drop or novelty event of a server's answer: TCP or UDP from the lower
/// port (the agent's fallback client rule: services listen on the lower one).
/// In monitor mode a request that would be dropped has its answers judged
/// too; the requester is the one acting, so answers open no incident of the
/// server's (they still join one already open).
fn answers(e: &Event) -> bool {
    !DETECTIONS.contains(&e.kind.as_str()) && matches!(e.proto.as_str(), "tcp" | "udp") && e.sport < e.dport
}

/// Whether an event of this type joins incidents at all.
fn correlated(kind: &str) -> bool {
    kind != "new_device" && kind != "incident"
}

/// One address an incident's source reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Target {
    pub ip: String,
    /// Its segment, or empty.
    pub segment: String,
    /// Its clinical zone (`detection.clinical_zones`), or empty.
    pub zone: String,
    pub function: String,
    pub clinical_impact: String,
    pub events: u64,
}

/// The flow of the event that opened an incident: its notifications carry
/// it (so an EVE alert's `flow_id` leads to that flow).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FirstFlow {
    pub iface: String,
    pub vlan: u16,
    pub proto: String,
    pub dst: String,
    pub sport: u16,
    pub dport: u16,
}

/// An incident: `GET /api/v1/incidents` serves these.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Incident {
    pub id: u64,
    /// `open` or `closed`.
    pub state: String,
    /// The source address every event of the incident came from.
    pub src: String,
    /// The source's MAC when an event named it.
    pub mac: Option<String>,
    pub first_seen: String,
    pub last_seen: String,
    /// When it closed (after `quiet_secs` without an event).
    pub closed: Option<String>,
    /// Events in the incident, and by type.
    pub events: u64,
    pub by_type: BTreeMap<String, u64>,
    /// Novelty events it subsumed (kept, not notified on their own).
    pub subsumed: u64,
    /// The addresses reached, most severe first (at most 64).
    pub targets: Vec<Target>,
    pub targets_total: u64,
    /// Segments of the targets.
    pub segments: Vec<String>,
    /// From the highest clinical impact among the targets: `critical`,
    /// `high`, `medium` or `low`.
    pub severity: String,
    pub clinical_impact: String,
    /// The function of the most severe target, and who is told about it.
    pub function: String,
    pub escalation: String,
    /// One sentence for the analyst.
    pub summary: String,
    /// Sequence numbers of its first and last event.
    pub first_seq: u64,
    pub last_seq: u64,
    /// The flow of the event that opened it.
    pub first_flow: FirstFlow,
}

/// Most severe first; a name the matrix does not have, last.
fn impact_rank(name: &str) -> u8 {
    Impact::from_name(name).map_or(u8::MAX, |i| i as u8)
}

impl Incident {
    fn new(id: u64, src: &str, now: SystemTime) -> Incident {
        Incident {
            id,
            state: "open".into(),
            src: src.into(),
            first_seen: rfc3339(now),
            last_seen: rfc3339(now),
            ..Default::default()
        }
    }

    fn absorb(&mut self, e: &Event) {
        self.events += 1;
        *self.by_type.entry(e.kind.clone()).or_default() += 1;
        if self.first_seq == 0 {
            self.first_seq = e.seq;
            self.first_flow = FirstFlow {
                iface: e.iface.clone(),
                vlan: e.vlan,
                proto: e.proto.clone(),
                dst: e.dst.clone(),
                sport: e.sport,
                dport: e.dport,
            };
        }
        self.last_seq = self.last_seq.max(e.seq);
        if self.mac.is_none() && e.mac.is_some() && e.kind != "policy_drop" {
            self.mac = e.mac.clone();
        }
        if e.time > self.last_seen {
            self.last_seen = e.time.clone();
        }
        if e.time < self.first_seen {
            self.first_seen = e.time.clone();
        }
        if e.subsumed {
            self.subsumed += 1;
        }
        // Device events are about the source itself: no target.
        if e.dst.is_empty() || e.dst == self.src {
            return;
        }
        match self.targets.iter_mut().find(|t| t.ip == e.dst) {
            Some(t) => t.events += 1,
            None => {
                self.targets_total += 1;
                let t = Target {
                    ip: e.dst.clone(),
                    segment: e.segment.clone(),
                    zone: e.zone.clone(),
                    function: e.function.clone(),
                    clinical_impact: e.clinical_impact.clone(),
                    events: 1,
                };
                if self.targets.len() < MAX_TARGETS {
                    self.targets.push(t);
                } else if let Some(last) = self.targets.last_mut()
                    && impact_rank(&t.clinical_impact) < impact_rank(&last.clinical_impact)
                {
                    *last = t;
                }
                self.targets.sort_by_key(|t| (impact_rank(&t.clinical_impact), t.ip.clone()));
            }
        }
        if !e.segment.is_empty() && !self.segments.contains(&e.segment) {
            self.segments.push(e.segment.clone());
            self.segments.sort();
        }
    }

    /// Severity, impact and summary from what it holds.
    fn describe(&mut self, triage: &TriageConfig) {
        let worst = self.targets.first();
        let function = worst.map(|t| t.function.clone()).unwrap_or_default();
        let entry = triage.lookup(&function);
        let impact = worst.map(|t| t.clinical_impact.clone()).filter(|i| !i.is_empty());
        self.clinical_impact = impact.unwrap_or_else(|| entry.impact.name().to_string());
        self.severity = Impact::from_name(&self.clinical_impact).map_or("low", Impact::severity).into();
        self.function = function;
        self.escalation = entry.escalation.clone();
        let kinds: Vec<String> = self.by_type.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let what = match worst {
            Some(t) => {
                let place = if !t.segment.is_empty() {
                    format!("segment {}", t.segment)
                } else if !t.zone.is_empty() {
                    format!("clinical zone {}", t.zone)
                } else {
                    "no segment".into()
                };
                format!(
                    "{} target(s), the most critical {} ({}, {place})",
                    self.targets_total,
                    t.ip,
                    if t.function.is_empty() { "no function" } else { &t.function }
                )
            }
            None => "no other address".into(),
        };
        self.summary = format!("{}: {} events ({}) toward {what}", self.src, self.events, kinds.join(", "));
    }
}

/// A novelty event waiting to learn whether an incident subsumes it.
struct Held {
    until: SystemTime,
    event: Event,
}

#[derive(Default)]
pub struct Incidents {
    pub cfg: IncidentConfig,
    next_id: u64,
    /// Recent incidents by id (open ones always among them).
    pub all: BTreeMap<u64, Incident>,
    /// Source → its open incident.
    open: HashMap<String, u64>,
    /// Source → when its latest events that count toward opening an
    /// incident came (at most `min_events`, within the window).
    pending: HashMap<String, VecDeque<SystemTime>>,
    held: VecDeque<Held>,
    /// Incident → when it was last notified, and whether it changed since.
    notified: HashMap<u64, (SystemTime, bool)>,
    /// Changed since the last save, for the state database.
    dirty: Vec<u64>,
    /// Incidents opened, by severity, since the start (metrics).
    pub opened: BTreeMap<String, u64>,
    /// Novelty events subsumed since the start (metrics).
    pub subsumed_total: u64,
    /// When each segment's learning period ends, from the store pass; none
    /// before the first.
    learning_ends: Option<HashMap<String, SystemTime>>,
}

impl Incidents {
    /// Continues from the incidents earlier runs stored (numbering, and the
    /// ones still open, which close on their own quiet timer).
    pub fn new(cfg: IncidentConfig, stored: Vec<Incident>) -> Incidents {
        let mut s = Incidents { cfg, ..Default::default() };
        for i in stored {
            s.next_id = s.next_id.max(i.id);
            if i.state == "open" {
                s.open.insert(i.src.clone(), i.id);
                s.notified.insert(i.id, (SystemTime::UNIX_EPOCH, false));
            }
            s.all.insert(i.id, i);
        }
        s
    }

    /// Sets when each segment's learning period ends (every store pass).
    pub fn set_learning(&mut self, ends: HashMap<String, SystemTime>) {
        self.learning_ends = Some(ends);
    }

    /// A denial or east-west event of a segment still learning: its
    /// allow-list is not written yet, so these are what it looks like, not
    /// an attack. They join an open incident but open none. (Before the
    /// first store pass every segment counts as learning.)
    fn while_learning(&self, e: &Event, now: SystemTime) -> bool {
        let kind = matches!(e.kind.as_str(), "policy_drop" | "policy_would_drop" | "east_west");
        kind && !e.segment.is_empty()
            && match &self.learning_ends {
                None => true,
                Some(m) => m.get(&e.segment).is_some_and(|t| now < *t),
            }
    }

    /// Whether `e` (at `at`) is behaviour an incident is about: not a
    /// learning segment's denial, not a server's answer. Only these open
    /// incidents, and only these join one as the earlier events of its window.
    fn counts(&self, e: &Event, at: SystemTime) -> bool {
        !self.while_learning(e, at) && !answers(e)
    }

    fn open_for(&self, src: &str) -> Option<u64> {
        self.open.get(src).copied()
    }

    /// Correlates one event before it is numbered: the event to keep now,
    /// or none when it is held back ([`Incidents::release`] hands it over).
    pub fn route(&mut self, mut e: Event, now: SystemTime) -> Option<Event> {
        if !correlated(&e.kind) {
            return Some(e);
        }
        if is_novelty(&e.kind) {
            if let Some(id) = self.open_for(&e.src) {
                e.incident = id;
                e.subsumed = true;
                return Some(e);
            }
            if self.cfg.hold_secs > 0 {
                self.held.push_back(Held { until: now + Duration::from_secs(self.cfg.hold_secs), event: e });
                return None;
            }
        }
        Some(e)
    }

    /// Joins a numbered event to its source's open incident. When the event
    /// opens one instead, returns its id: the store then hands the source's
    /// earlier events of the window and this one to [`Incidents::open_with`].
    pub fn join(&mut self, e: &mut Event, triage: &TriageConfig, now: SystemTime) -> Option<u64> {
        if !correlated(&e.kind) {
            return None;
        }
        let Some(id) = self.open_for(&e.src) else {
            let counts = self.counts(e, now);
            let n = if counts { self.count(&e.src, now) } else { 0 };
            let due = (counts && DETECTIONS.contains(&e.kind.as_str())) || n >= self.cfg.min_events;
            if !due {
                return None;
            }
            self.pending.remove(&e.src);
            self.next_id += 1;
            let id = self.next_id;
            self.open.insert(e.src.clone(), id);
            self.all.insert(id, Incident::new(id, &e.src, now));
            e.incident = id;
            return Some(id);
        };
        e.incident = id;
        let inc = self.all.get_mut(&id).expect("open incidents are kept");
        inc.absorb(e);
        inc.describe(triage);
        self.dirty.push(id);
        if e.subsumed {
            self.subsumed_total += 1;
        }
        if let Some(n) = self.notified.get_mut(&id) {
            n.1 = true;
        }
        None
    }

    /// Fills the incident `join` just opened with its events (the source's
    /// earlier ones of the window, then the one that opened it, in sequence
    /// order) and returns its `opened` notification.
    pub fn open_with<'e>(
        &mut self,
        id: u64,
        events: impl IntoIterator<Item = &'e Event>,
        triage: &TriageConfig,
        now: SystemTime,
    ) -> Event {
        let inc = self.all.get_mut(&id).expect("just opened");
        for e in events {
            inc.absorb(e);
            if e.subsumed {
                self.subsumed_total += 1;
            }
        }
        inc.describe(triage);
        *self.opened.entry(inc.severity.clone()).or_default() += 1;
        let note = notification(inc, "opened", now);
        self.dirty.push(id);
        self.notified.insert(id, (now, false));
        self.trim();
        note
    }

    /// The earlier events of `opener`'s source that join the incident `id`
    /// it just opened: within the window, not in an incident yet, and
    /// behaviour ([`Incidents::counts`]). Tags them and returns copies, in
    /// the order of `events`.
    pub fn earlier<'e>(
        &self,
        id: u64,
        opener: &Event,
        events: impl Iterator<Item = &'e mut Event>,
        now: SystemTime,
    ) -> Vec<Event> {
        let since =
            now.checked_sub(Duration::from_secs(self.cfg.window_secs)).unwrap_or(SystemTime::UNIX_EPOCH);
        let since = rfc3339(since);
        let mut out = Vec::new();
        for x in events {
            let at = parse_rfc3339(&x.time).unwrap_or(now);
            if x.incident == 0
                && x.src == opener.src
                && x.time >= since
                && correlated(&x.kind)
                && self.counts(x, at)
            {
                x.incident = id;
                out.push(x.clone());
            }
        }
        out
    }

    /// Counts an event of a source with no open incident in its window;
    /// returns how many the window holds.
    fn count(&mut self, src: &str, now: SystemTime) -> usize {
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(src) {
            return 0;
        }
        let window = Duration::from_secs(self.cfg.window_secs);
        let q = self.pending.entry(src.to_string()).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t).unwrap_or_default() > window)
            || q.len() >= self.cfg.min_events
        {
            q.pop_front();
        }
        q.push_back(now);
        q.len()
    }

    /// Held events whose time is up, in order: subsumed when their source's
    /// incident opened meanwhile.
    pub fn release(&mut self, now: SystemTime) -> Vec<Event> {
        let mut out = Vec::new();
        while self.held.front().is_some_and(|h| h.until <= now) {
            let mut e = self.held.pop_front().expect("checked").event;
            if let Some(id) = self.open_for(&e.src) {
                e.incident = id;
                e.subsumed = true;
            }
            out.push(e);
        }
        out
    }

    /// Every held event, now (at a stop: nothing is lost).
    pub fn release_all(&mut self) -> Vec<Event> {
        let last = self.held.iter().map(|h| h.until).max();
        last.map_or_else(Vec::new, |t| self.release(t))
    }

    /// Rate-limited updates and closes after the quiet period.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Event> {
        let mut out = Vec::new();
        let quiet = Duration::from_secs(self.cfg.quiet_secs);
        let every = Duration::from_secs(self.cfg.update_secs);
        let open: Vec<(String, u64)> = self.open.iter().map(|(s, i)| (s.clone(), *i)).collect();
        for (src, id) in open {
            let Some(inc) = self.all.get_mut(&id) else {
                self.open.remove(&src);
                continue;
            };
            let last = parse_rfc3339(&inc.last_seen).unwrap_or(now);
            if now.duration_since(last).unwrap_or_default() >= quiet {
                inc.state = "closed".into();
                inc.closed = Some(rfc3339(now));
                self.open.remove(&src);
                self.notified.remove(&id);
                self.dirty.push(id);
                out.push(notification(inc, "closed", now));
                continue;
            }
            if let Some((at, changed)) = self.notified.get_mut(&id)
                && *changed
                && now.duration_since(*at).unwrap_or_default() >= every
            {
                *at = now;
                *changed = false;
                out.push(notification(inc, "updated", now));
            }
        }
        let window = Duration::from_secs(self.cfg.window_secs);
        self.pending
            .retain(|_, q| q.back().is_some_and(|t| now.duration_since(*t).unwrap_or_default() <= window));
        out
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Incidents changed since the last call (for the state database).
    pub fn take_dirty(&mut self) -> Vec<Incident> {
        let mut ids = std::mem::take(&mut self.dirty);
        ids.sort_unstable();
        ids.dedup();
        ids.iter().filter_map(|id| self.all.get(id).cloned()).collect()
    }

    /// Forgets the oldest closed incidents beyond [`KEEP`].
    fn trim(&mut self) {
        while self.all.len() > KEEP {
            let Some(id) = self.all.iter().find(|(_, i)| i.state != "open").map(|(id, _)| *id) else { break };
            self.all.remove(&id);
        }
    }
}

/// The event that tells the sinks about an incident.
fn notification(inc: &Incident, what: &str, now: SystemTime) -> Event {
    let worst = inc.targets.first();
    let f = &inc.first_flow;
    Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        kind: "incident".into(),
        severity: inc.severity.clone(),
        time: rfc3339(now),
        iface: f.iface.clone(),
        vlan: f.vlan,
        src: inc.src.clone(),
        dst: f.dst.clone(),
        proto: f.proto.clone(),
        sport: f.sport,
        dport: f.dport,
        segment: worst.map(|t| t.segment.clone()).unwrap_or_default(),
        zone: worst.map(|t| t.zone.clone()).unwrap_or_default(),
        function: inc.function.clone(),
        mac: inc.mac.clone(),
        reason: what.into(),
        evidence: inc.summary.clone(),
        incident: inc.id,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn ev(kind: &str, src: &str, dst: &str, function: &str, at: SystemTime) -> Event {
        let mut e = Event {
            kind: kind.into(),
            src: src.into(),
            dst: dst.into(),
            function: function.into(),
            segment: if function.is_empty() { String::new() } else { format!("{function}s") },
            time: rfc3339(at),
            proto: "tcp".into(),
            sport: 40_000,
            dport: 104,
            ..Default::default()
        };
        TriageConfig::default().apply(&mut e);
        e
    }

    /// The store's part, in miniature: route, number, join; the events kept.
    struct Store {
        inc: Incidents,
        seq: u64,
        kept: Vec<Event>,
    }

    impl Store {
        fn new(cfg: IncidentConfig) -> Store {
            let mut inc = Incidents::new(cfg, Vec::new());
            inc.set_learning(HashMap::new());
            Store { inc, seq: 0, kept: Vec::new() }
        }
        fn keep(&mut self, mut e: Event, now: SystemTime) {
            self.seq += 1;
            e.seq = self.seq;
            let triage = TriageConfig::default();
            let mut notes = Vec::new();
            if let Some(id) = self.inc.join(&mut e, &triage, now) {
                let earlier = self.inc.earlier(id, &e, self.kept.iter_mut(), now);
                notes.push(self.inc.open_with(id, earlier.iter().chain([&e]), &triage, now));
            }
            self.kept.push(e);
            for n in notes {
                self.keep(n, now);
            }
        }
        fn push(&mut self, e: Event, now: SystemTime) {
            if let Some(e) = self.inc.route(e, now) {
                self.keep(e, now);
            }
        }
        fn tick(&mut self, now: SystemTime) {
            for e in self.inc.release(now) {
                self.keep(e, now);
            }
            for n in self.inc.tick(now) {
                self.keep(n, now);
            }
        }
        fn notes(&self) -> Vec<(u64, String)> {
            self.kept
                .iter()
                .filter(|e| e.kind == "incident")
                .map(|e| (e.incident, e.reason.clone()))
                .collect()
        }
    }

    #[test]
    fn a_scan_is_one_incident_that_subsumes_the_novelty_around_it() {
        let mut s = Store::new(IncidentConfig::default());
        let t = t0();
        // Novelty first (held), then the scan opens the incident.
        s.push(ev("new_destination", "10.0.5.2", "10.0.1.3", "infusion-pump", t), t);
        s.push(ev("scan", "10.0.5.2", "10.0.1.2", "infusion-pump", t), t);
        for i in 0..300 {
            s.push(ev("policy_drop", "10.0.5.2", &format!("10.0.1.{}", 2 + i % 14), "infusion-pump", t), t);
        }
        s.push(ev("new_port", "10.0.5.2", "10.0.1.4", "infusion-pump", t), t);
        // Another source's single drop opens nothing.
        s.push(ev("policy_drop", "10.0.9.9", "10.0.1.2", "infusion-pump", t), t);
        s.tick(t + Duration::from_secs(7));
        assert_eq!(s.notes(), [(1, "opened".to_string())]);
        let inc = &s.inc.all[&1];
        assert_eq!((inc.events, inc.subsumed, inc.targets_total), (303, 2, 14));
        assert_eq!(inc.by_type["policy_drop"], 300);
        assert_eq!((inc.severity.as_str(), inc.clinical_impact.as_str()), ("critical", "life-critical"));
        let novelty: Vec<&Event> = s.kept.iter().filter(|e| is_novelty(&e.kind)).collect();
        assert_eq!(novelty.len(), 2, "both novelty events are kept");
        assert!(novelty.iter().all(|e| e.subsumed && e.incident == 1), "{novelty:#?}");
        assert!(s.kept.iter().filter(|e| e.src == "10.0.9.9").all(|e| e.incident == 0));
        assert_eq!(s.inc.open_count(), 1);
    }

    #[test]
    fn drops_open_an_incident_at_the_threshold_updates_are_rate_limited_and_quiet_closes() {
        let cfg = IncidentConfig { min_events: 3, update_secs: 60, quiet_secs: 120, ..Default::default() };
        let mut s = Store::new(cfg);
        let t = t0();
        s.push(ev("policy_drop", "10.0.3.2", "10.0.2.2", "pacs", t), t);
        s.push(ev("policy_drop", "10.0.3.2", "10.0.2.2", "pacs", t), t);
        assert!(s.notes().is_empty(), "two drops are not an incident");
        s.push(ev("policy_would_drop", "10.0.3.2", "10.0.4.2", "imaging-modality", t), t);
        assert_eq!(s.notes(), [(1, "opened".to_string())]);
        assert_eq!(s.inc.all[&1].events, 3, "the drops that led to it are counted");
        assert!(s.kept.iter().filter(|e| e.kind != "incident").all(|e| e.incident == 1), "and tagged");
        // Growth: one update per minute at most.
        for i in 1..=5u64 {
            let at = t + Duration::from_secs(i * 20);
            s.push(ev("policy_drop", "10.0.3.2", "10.0.2.2", "pacs", at), at);
            s.tick(at);
        }
        let updates = s.notes().iter().filter(|n| n.1 == "updated").count();
        assert_eq!(updates, 1, "{:?}", s.notes());
        // Quiet for quiet_secs: closed, once.
        s.tick(t + Duration::from_secs(100 + 119));
        assert_eq!(s.inc.open_count(), 1);
        s.tick(t + Duration::from_secs(100 + 120));
        s.tick(t + Duration::from_secs(100 + 500));
        assert_eq!(s.notes().last(), Some(&(1, "closed".to_string())));
        assert_eq!(s.notes().iter().filter(|n| n.1 == "closed").count(), 1);
        assert_eq!(s.inc.all[&1].state, "closed");
        assert_eq!(s.inc.all[&1].severity, "high", "the PACS and the modality: high");
        // The same source later: a new incident.
        let later = t + Duration::from_secs(1000);
        s.push(ev("scan", "10.0.3.2", "10.0.2.2", "pacs", later), later);
        assert_eq!(s.notes().last(), Some(&(2, "opened".to_string())));
    }

    #[test]
    fn a_learning_segments_denials_open_nothing_but_join_an_open_incident() {
        let mut s = Store::new(IncidentConfig { min_events: 2, ..Default::default() });
        let t = t0();
        s.inc.set_learning(HashMap::from([("infusion-pumps".to_string(), t + Duration::from_secs(60))]));
        for _ in 0..10 {
            s.push(ev("policy_would_drop", "10.40.0.20", "10.10.0.11", "infusion-pump", t), t);
            s.push(ev("east_west", "10.10.0.1", "10.10.0.138", "infusion-pump", t), t);
        }
        assert!(s.notes().is_empty(), "{:?}", s.notes());
        // An attack during learning still opens one, and the denials join it.
        s.push(ev("scan", "10.50.0.66", "10.10.0.11", "infusion-pump", t), t);
        s.push(ev("policy_would_drop", "10.50.0.66", "10.10.0.12", "infusion-pump", t), t);
        assert_eq!(s.notes(), [(1, "opened".to_string())]);
        assert_eq!(s.inc.all[&1].events, 2);
        // The learning segment's sources opened nothing, and a detection of
        // theirs does not take those denials along (they were no behaviour).
        s.push(ev("remote_access", "10.40.0.20", "10.10.0.11", "infusion-pump", t), t);
        assert_eq!(s.inc.all[&2].events, 1);
        assert_eq!(s.inc.open_count(), 2);
        // After the learning period the same denials count again.
        let after = t + Duration::from_secs(61);
        s.push(ev("policy_would_drop", "10.40.0.21", "10.10.0.11", "infusion-pump", after), after);
        s.push(ev("policy_would_drop", "10.40.0.21", "10.10.0.11", "infusion-pump", after), after);
        assert_eq!(s.notes().last(), Some(&(3, "opened".to_string())));
        // A server's answers to denied requests open nothing of its own.
        for _ in 0..10 {
            let mut e = ev("policy_would_drop", "10.40.0.53", "10.10.0.11", "infusion-pump", after);
            (e.proto, e.sport, e.dport) = ("udp".into(), 53, 58_153);
            s.push(e, after);
        }
        assert_eq!(s.notes().len(), 3);
        // Before the first store pass every segment counts as learning.
        let mut fresh = Incidents::new(IncidentConfig { min_events: 1, ..Default::default() }, Vec::new());
        let mut e = ev("policy_drop", "10.0.3.2", "10.0.1.2", "infusion-pump", t);
        assert!(fresh.join(&mut e, &TriageConfig::default(), t).is_none());
    }

    #[test]
    fn novelty_nobody_subsumes_is_released_after_the_hold_and_at_a_stop() {
        let mut s = Store::new(IncidentConfig::default());
        let t = t0();
        s.push(ev("new_port", "10.0.1.2", "10.0.2.2", "infusion-pump", t), t);
        s.tick(t + Duration::from_secs(2));
        assert!(s.kept.is_empty(), "held");
        s.tick(t + Duration::from_secs(6));
        assert_eq!(s.kept.len(), 1);
        assert!(!s.kept[0].subsumed && s.kept[0].incident == 0);
        s.push(ev("new_app", "10.0.1.2", "10.0.2.2", "infusion-pump", t), t);
        assert_eq!(s.inc.release_all().len(), 1);
        assert_eq!(s.inc.held_count(), 0);
    }

    #[test]
    fn stored_incidents_continue_numbering_and_open_ones_close_on_their_own() {
        let t = t0();
        let old = Incident {
            id: 41,
            state: "open".into(),
            src: "10.0.5.2".into(),
            last_seen: rfc3339(t),
            ..Default::default()
        };
        let mut inc = Incidents::new(IncidentConfig::default(), vec![old]);
        let mut e = ev("scan", "10.0.5.2", "10.0.1.2", "infusion-pump", t);
        assert!(inc.join(&mut e, &TriageConfig::default(), t).is_none(), "joins the open one");
        assert_eq!(e.incident, 41);
        let closed = inc.tick(t + Duration::from_secs(900));
        assert_eq!(closed.len(), 1);
        let mut e = ev("scan", "10.0.6.2", "10.0.1.2", "infusion-pump", t);
        let opened = inc.join(&mut e, &TriageConfig::default(), t);
        let n = inc.open_with(42, [&e], &TriageConfig::default(), t);
        assert_eq!((opened, e.incident, n.incident, n.reason.as_str()), (Some(42), 42, 42, "opened"));
    }
}

//! Owns the EVENTS ring buffer on the user side: turns each deny event into a
//! described [`model::Event`], logs it, and keeps the most recent ones for the API.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use mdsec_common::{
    app::{App, Confidence},
    net::ip_from_key,
    policy::{DENY_APP_MISMATCH, Event, Verdict},
};

use crate::{
    base::clock::{Anchor, rfc3339},
    base::net::proto_name,
    policy::runtime::PolicyState,
    surfaces::model,
};

/// Events kept in memory for `/api/v1/events`.
pub const KEEP: usize = 10_000;

/// Every event passes through here: numbered, kept for the API, counted by type,
/// and handed to the exporter (JSON lines, syslog).
#[derive(Default)]
pub struct EventStore {
    pub next_seq: u64,
    pub events: VecDeque<model::Event>,
    /// Events by type since the start (for metrics).
    pub by_type: BTreeMap<String, u64>,
    /// Detections not emitted because an equal one was, by type (for metrics).
    pub suppressed: BTreeMap<String, u64>,
    pub exporter: Option<crate::surfaces::export::Exporter>,
    /// The fleet's events topic.
    pub kafka: Option<crate::surfaces::kafka::KafkaSink>,
    pub triage: crate::detection::triage::TriageConfig,
    /// Events not yet in the state database (the store thread writes them).
    pub unsaved: Vec<model::Event>,
    /// Events not kept for the database because [`UNSAVED_MAX`] were waiting.
    pub unsaved_dropped: u64,
    /// Correlation into incidents (every event passes through it once).
    pub incidents: crate::detection::incident::Incidents,
}

/// Events waiting for the database at most (a stuck disk must not grow memory).
pub const UNSAVED_MAX: usize = 100_000;

impl EventStore {
    pub fn push(&mut self, e: model::Event) {
        let now = std::time::SystemTime::now();
        if let Some(e) = self.incidents.route(e, now) {
            self.keep(e, now);
        }
    }

    /// Numbers, correlates, keeps and (unless subsumed) exports one event,
    /// then the incident notifications it caused.
    fn keep(&mut self, mut e: model::Event, now: std::time::SystemTime) {
        self.next_seq += 1;
        e.seq = self.next_seq;
        self.triage.apply(&mut e);
        let mut notes = Vec::new();
        if let Some(id) = self.incidents.join(&mut e, &self.triage, now) {
            notes.push(self.open_incident(id, &e, now));
        }
        *self.by_type.entry(e.kind.clone()).or_default() += 1;
        if let Some(x) = self.exporter.as_ref().filter(|_| !e.subsumed) {
            x.send(&e);
        }
        if let Some(k) = self.kafka.as_ref().filter(|_| !e.subsumed) {
            k.event(&e);
        }
        if self.unsaved.len() < UNSAVED_MAX {
            self.unsaved.push(e.clone());
        } else {
            self.unsaved_dropped += 1;
        }
        if self.events.len() == KEEP {
            self.events.pop_front();
        }
        self.events.push_back(e);
        for n in notes {
            self.keep(n, now);
        }
    }

    /// Fills the incident `e` opened with its source's earlier events of the
    /// window (those still in memory: the API's last [`KEEP`]) and tags them.
    fn open_incident(&mut self, id: u64, e: &model::Event, now: std::time::SystemTime) -> model::Event {
        let earlier = self.incidents.earlier(id, e, self.events.iter_mut(), now);
        // Those the store thread has not written yet carry the tag to the database.
        let seqs: std::collections::HashSet<u64> = earlier.iter().map(|x| x.seq).collect();
        for x in self.unsaved.iter_mut().filter(|x| seqs.contains(&x.seq)) {
            x.incident = id;
        }
        self.incidents.open_with(id, earlier.iter().chain([e]), &self.triage, now)
    }

    /// Once per store pass: held novelty events whose time is up (all of
    /// them at a stop), incident updates and closes.
    pub fn tick(&mut self, now: std::time::SystemTime, stop: bool) {
        let held = if stop { self.incidents.release_all() } else { self.incidents.release(now) };
        for e in held {
            self.keep(e, now);
        }
        for n in self.incidents.tick(now) {
            self.keep(n, now);
        }
    }

    /// Events with a sequence number above `since`.
    pub fn since(&self, since: u64) -> Vec<model::Event> {
        self.events.iter().filter(|e| e.seq > since).cloned().collect()
    }
}

/// Describes a raw event with the names of the generation that produced it.
pub fn describe(
    ev: &Event,
    policy: &PolicyState,
    ifnames: &HashMap<u32, String>,
    anchor: &Anchor,
) -> model::Event {
    let installed = policy.generation(ev.generation);
    let seg = policy.segment(ev.generation, ev.segment);
    let rule = match installed.and_then(|i| i.policy.rules.iter().find(|r| r.id == ev.rule)) {
        Some(r) => r.origin(),
        None => "default".to_string(),
    };
    let id_name =
        |id: u32| installed.and_then(|i| i.compiled.ids.get(id as usize)).map(|i| i.description.clone());
    let drop = ev.verdict == Verdict::Drop as u8;
    model::Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        seq: 0,
        kind: crate::base::event::verdict_event(Verdict::from_u8(ev.verdict))
            .unwrap_or("policy_would_drop")
            .into(),
        severity: if drop { "medium" } else { "low" }.into(),
        time: rfc3339(anchor.wall(ev.ts_ns)),
        iface: ifnames.get(&ev.ifindex).cloned().unwrap_or_else(|| format!("if{}", ev.ifindex)),
        vlan: ev.vlan,
        src: ip_from_key(ev.src).to_string(),
        dst: ip_from_key(ev.dst).to_string(),
        proto: proto_name(ev.proto),
        sport: ev.sport,
        dport: ev.dport,
        segment: seg.map(|s| s.name.clone()).unwrap_or_default(),
        rule,
        rule_id: ev.rule,
        reason: if ev.reason == DENY_APP_MISMATCH { "app_mismatch" } else { "default_deny" }.into(),
        app: App::from_u8(ev.app).name().into(),
        app_confidence: Confidence::from_u8(ev.app_confidence).name().into(),
        src_identity: id_name(ev.src_id),
        dst_identity: id_name(ev.dst_id),
        generation: ev.generation,
        mac: None,
        vendor: None,
        function: seg.map(|s| s.function.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Describes, logs and keeps every event of the ring buffer (see [`crate::datapath::ring`]).
pub fn spawn(
    ring: RingBuf<MapData>,
    store: Arc<RwLock<EventStore>>,
    policy: Arc<RwLock<PolicyState>>,
    ifnames: HashMap<u32, String>,
) -> std::thread::JoinHandle<()> {
    crate::datapath::ring::drain::<Event>("mdsec-events", ring, move |batch| {
        let anchor = Anchor::now();
        let p = policy.read().unwrap();
        let mut s = store.write().unwrap();
        for raw in &batch {
            let e = describe(raw, &p, &ifnames, &anchor);
            let line = format!(
                "{} {}:{} -> {}:{} {} on {} (segment {}, rule {}, {})",
                e.kind, e.src, e.sport, e.dst, e.dport, e.proto, e.iface, e.segment, e.rule, e.reason
            );
            if raw.verdict == Verdict::Drop as u8 {
                warn!("{line}");
            } else {
                info!("{line}");
            }
            s.push(e);
        }
    })
}

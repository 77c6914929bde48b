//! `GET /metrics`: Prometheus text exposition, built at scrape time from what the
//! agent already holds (kernel counters, policy state, inventory, event counts).
//!
//! Cardinality is bounded by construction: labels take values only from the
//! policy (segment names), fixed enums (verdict, reason, app, class, map, stat
//! names) and the configured interfaces. No address, port or MAC is ever a label.
//! Each family is documented in docs/OPERATIONS.md.

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::Ordering,
    time::SystemTime,
};

use mdsec_common::{policy::Verdict, stats::Stat};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{
    datapath::segstats::{self, Column, NO_SEGMENT},
    inventory::clinical::Class,
    surfaces::state::AppState,
};

struct R(Registry);

impl R {
    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }
    fn int_gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.0.register(Box::new(g.clone())).expect("unique metric");
        g
    }
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        self.0.register(Box::new(g.clone())).expect("unique metric");
        g
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Datapath reasons that describe protocols seen (not verdicts, not errors).
fn is_protocol(s: Stat) -> bool {
    matches!(
        s,
        Stat::VlanTagged
            | Stat::Arp
            | Stat::Ipv4
            | Stat::Ipv6
            | Stat::OtherL3
            | Stat::Tcp
            | Stat::Udp
            | Stat::Icmp
            | Stat::Icmpv6
            | Stat::OtherL4
            | Stat::FragFirst
            | Stat::FragMatched
            | Stat::FragBucket
    )
}

pub fn render(st: &AppState) -> String {
    let r = R(Registry::new());
    build_info(&r, st);
    datapath(&r, st);
    segments(&r, st);
    policy(&r, st);
    inventory(&r, st);
    baseline(&r, st);
    evidence(&r, st);
    events(&r, st);
    kafka(&r, st);
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.0.gather(), &mut out).expect("text encoding");
    String::from_utf8(out).expect("text exposition is UTF-8")
}

fn build_info(r: &R, st: &AppState) {
    r.int_gauge(
        "mdsec_build_info",
        "Agent version and kernel/user layout version; always 1.",
        &["version", "layout_version"],
    )
    .with_label_values(&[env!("CARGO_PKG_VERSION"), &mdsec_common::maps::LAYOUT_VERSION.to_string()])
    .set(1);
    r.gauge("mdsec_start_time_seconds", "When the agent started (Unix time).", &[])
        .with_label_values::<&str>(&[])
        .set(unix_secs(st.started));
    let g = r.int_gauge(
        "mdsec_interface_info",
        "Interfaces the datapath is attached to: role and effective XDP mode; always 1.",
        &["iface", "role", "xdp_mode"],
    );
    for a in &st.attached {
        g.with_label_values(&[a.name.as_str(), &format!("{:?}", a.role).to_lowercase(), &a.effective_mode])
            .set(1);
    }
}

fn datapath(r: &R, st: &AppState) {
    let t = st.tables.read().unwrap();
    let pk = r.counter(
        "mdsec_datapath_packets_total",
        "Frames the XDP program handled, by action (pass or drop).",
        &["action"],
    );
    let by = r.counter(
        "mdsec_datapath_bytes_total",
        "Frame bytes the XDP program handled, by action.",
        &["action"],
    );
    for (s, a) in [(Stat::Pass, "pass"), (Stat::Drop, "drop")] {
        pk.with_label_values(&[a]).inc_by(t.stat(s).packets);
        by.with_label_values(&[a]).inc_by(t.stat(s).bytes);
    }
    let bridged = r.counter(
        "mdsec_bridge_packets_total",
        "Passed frames of bump-in-the-wire ports, by how they crossed: xdp_redirect (to the peer \
         port) or kernel_bridge (no peer entry: handed to the Linux bridge).",
        &["path"],
    );
    for (s, p) in [(Stat::BridgeForwarded, "xdp_redirect"), (Stat::BridgeNoPeer, "kernel_bridge")] {
        bridged.with_label_values(&[p]).inc_by(t.stat(s).packets);
    }
    let proto = r.counter(
        "mdsec_protocol_packets_total",
        "Frames by protocol recognised (a frame counts once per layer).",
        &["protocol"],
    );
    let bad = r.counter(
        "mdsec_malformed_packets_total",
        "Frames the parser stopped on (passed, never dropped), by reason.",
        &["reason"],
    );
    for s in Stat::ALL {
        if is_protocol(*s) {
            proto.with_label_values(&[s.name()]).inc_by(t.stat(*s).packets);
        } else if s.is_malformed() {
            bad.with_label_values(&[s.name()]).inc_by(t.stat(*s).packets);
        }
    }
    let layers = r.counter(
        "mdsec_tunnel_layers_total",
        "Mirror ports: tunnel layers removed before the inner frame was judged, by kind.",
        &["kind"],
    );
    let overhead = r.counter(
        "mdsec_tunnel_overhead_bytes_total",
        "Mirror ports: bytes of the tunnel layers removed, by kind (outer bytes = inner + these).",
        &["kind"],
    );
    for s in Stat::TUNNEL_LAYERS {
        let kind = s.name().trim_start_matches("tunnel_");
        layers.with_label_values(&[kind]).inc_by(t.stat(*s).packets);
        overhead.with_label_values(&[kind]).inc_by(t.stat(*s).bytes);
    }
    let stops = r.counter(
        "mdsec_tunnel_stops_total",
        "Mirror ports: frames whose decapsulation stopped inside a tunnel (judged as they stood), by reason.",
        &["reason"],
    );
    for s in Stat::TUNNEL_STOPS {
        stops.with_label_values(&[s.name().trim_start_matches("tunnel_")]).inc_by(t.stat(*s).packets);
    }
    let lost = r.counter(
        "mdsec_datapath_events_lost_total",
        "Kernel events not delivered: ring buffer full or over the per-CPU event rate.",
        &["ring", "cause"],
    );
    lost.with_label_values(&["events", "ring_full"]).inc_by(t.stat(Stat::EventsLost).packets);
    lost.with_label_values(&["events", "rate_limited"]).inc_by(t.stat(Stat::EventsRateLimited).packets);
    lost.with_label_values(&["samples", "ring_full"]).inc_by(t.stat(Stat::SamplesLost).packets);
    let fails = r.counter(
        "mdsec_map_update_failures_total",
        "Kernel map inserts that failed (the packet was still handled).",
        &["map"],
    );
    for (s, m) in [
        (Stat::FlowUpdateFail, "flows"),
        (Stat::DeviceUpdateFail, "devices"),
        (Stat::FragUpdateFail, "fragments"),
    ] {
        fails.with_label_values(&[m]).inc_by(t.stat(s).packets);
    }
    r.counter(
        "mdsec_datapath_flow_evictions_total",
        "Flows the datapath evicted to make room in a full flow table (every one, read or not).",
        &[],
    )
    .with_label_values::<&str>(&[])
    .inc_by(t.stat(Stat::FlowEvicted).packets);
    r.int_gauge("mdsec_active_flows", "Flows in the kernel flow table at the last read.", &[])
        .with_label_values::<&str>(&[])
        .set(t.kernel_flows as i64);
    let entries = r.int_gauge("mdsec_map_entries", "Entries in a kernel map at the last read.", &["map"]);
    let cap = r.int_gauge("mdsec_map_capacity_entries", "Configured size of a kernel map.", &["map"]);
    let fill = r.gauge("mdsec_map_fill_ratio", "Entries divided by capacity (0–1).", &["map"]);
    let ev = r.counter(
        "mdsec_lru_evictions_total",
        "Kernel entries evicted before the agent aged them out, among those it had read (their counts are kept).",
        &["map"],
    );
    // IPv4 flows live in their own table (`maps.flows`), IPv6 in another.
    for (m, n, c, e) in [
        ("flows_ipv4", t.kernel_flows4, st.map_sizes.flows, t.flow4_evictions),
        (
            "flows_ipv6",
            t.kernel_flows - t.kernel_flows4,
            st.map_sizes.flows_ipv6,
            t.flow_evictions - t.flow4_evictions,
        ),
        ("devices", t.kernel_devices, st.map_sizes.devices, t.device_evictions),
    ] {
        entries.with_label_values(&[m]).set(n as i64);
        cap.with_label_values(&[m]).set(c as i64);
        fill.with_label_values(&[m]).set(n as f64 / c.max(1) as f64);
        ev.with_label_values(&[m]).inc_by(e);
    }
}

fn segments(r: &R, st: &AppState) {
    let totals = st.segstats.lock().unwrap().totals().clone();
    let pk = r.counter(
        "mdsec_segment_packets_total",
        "Packets by the segment they were accounted to and the policy verdict.",
        &["segment", "verdict"],
    );
    let by = r.counter(
        "mdsec_segment_bytes_total",
        "Bytes by segment and policy verdict.",
        &["segment", "verdict"],
    );
    let drops = r.counter(
        "mdsec_policy_drops_total",
        "Packets dropped by an enforce segment's policy, by reason.",
        &["segment", "reason"],
    );
    let would = r.counter(
        "mdsec_policy_would_drops_total",
        "Packets a monitor segment (or a mirror port) would have dropped, by reason.",
        &["segment", "reason"],
    );
    let viol = r.counter(
        "mdsec_policy_violations_total",
        "Unauthorized protocol occurrences: denied flows (once per flow and policy generation) by app.",
        &["segment", "app"],
    );
    // Every segment of the active policy starts at zero: rate() works from the
    // first scrape, a quiet segment is visible, and the set of series depends on
    // the policy only, not on what traffic happened to arrive.
    let deny_family = |v: &Verdict| if *v == Verdict::Drop { &drops } else { &would };
    let cols: BTreeMap<u32, Column> = segstats::columns().collect();
    if let Some(cur) = st.policy.read().unwrap().current.clone() {
        let names = cur.policy.segments.iter().map(|s| s.name.as_str()).chain([NO_SEGMENT]);
        for seg in names {
            for c in cols.values() {
                if let Column::Verdict { verdict, reason } = c {
                    pk.with_label_values(&[seg, verdict.name()]);
                    by.with_label_values(&[seg, verdict.name()]);
                    if let Some(r) = reason {
                        deny_family(verdict).with_label_values(&[seg, r]);
                    }
                }
            }
        }
    }
    for ((seg, col), c) in &totals {
        match cols.get(col) {
            Some(Column::Verdict { verdict, reason }) => {
                pk.with_label_values(&[seg.as_str(), verdict.name()]).inc_by(c.packets);
                by.with_label_values(&[seg.as_str(), verdict.name()]).inc_by(c.bytes);
                if let Some(reason) = reason {
                    deny_family(verdict).with_label_values(&[seg.as_str(), reason]).inc_by(c.packets);
                }
            }
            Some(Column::Violation(app)) => {
                viol.with_label_values(&[seg.as_str(), app.name()]).inc_by(c.packets);
            }
            None => {}
        }
    }
}

fn policy(r: &R, st: &AppState) {
    let p = st.policy.read().unwrap();
    let s = &p.status;
    r.int_gauge("mdsec_policy_generation", "Active policy generation (0: no policy loaded).", &[])
        .with_label_values::<&str>(&[])
        .set(s.generation as i64);
    r.int_gauge("mdsec_policy_last_reload_success", "1 if the last policy load succeeded, else 0.", &[])
        .with_label_values::<&str>(&[])
        .set(s.last_reload_ok as i64);
    r.gauge(
        "mdsec_policy_last_reload_timestamp_seconds",
        "When the policy was last loaded or reloaded, successfully or not (Unix time).",
        &[],
    )
    .with_label_values::<&str>(&[])
    .set(s.last_reload_at.map_or(0.0, unix_secs));
    r.gauge(
        "mdsec_policy_last_success_timestamp_seconds",
        "When a policy was last installed successfully (Unix time).",
        &[],
    )
    .with_label_values::<&str>(&[])
    .set(s.last_success_at.map_or(0.0, unix_secs));
    let reloads = r.counter("mdsec_policy_reloads_total", "Policy load attempts by result.", &["result"]);
    reloads.with_label_values(&["success"]).inc_by(s.reloads - s.failed_reloads);
    reloads.with_label_values(&["failure"]).inc_by(s.failed_reloads);
    let exc = r.int_gauge(
        "mdsec_policy_exceptions_active",
        "Time-bound exceptions in force (not yet expired), by segment.",
        &["segment"],
    );
    let segs = r.int_gauge(
        "mdsec_segment_info",
        "Segments of the active policy with their mode and clinical function; always 1.",
        &["segment", "mode", "function"],
    );
    let windows = r.int_gauge(
        "mdsec_maintenance_windows_open",
        "Maintenance windows of the active policy open now, per segment.",
        &["segment"],
    );
    let quarantined = r.int_gauge(
        "mdsec_quarantined_devices",
        "Devices in quarantine now (new_devices: quarantine or monitor), per segment and mode.",
        &["segment", "mode"],
    );
    if let Some(cur) = &p.current {
        let now = SystemTime::now();
        for seg in cur.policy.segments.iter().filter(|s| {
            s.new_devices != crate::policy::model::NewDevices::Allow
                && s.mode == crate::policy::model::Mode::Enforce
        }) {
            let n = cur.policy.quarantined.iter().filter(|q| q.segment == seg.name).count();
            quarantined.with_label_values(&[seg.name.as_str(), seg.new_devices.name()]).set(n as i64);
        }
        for (i, seg) in cur.policy.segments.iter().enumerate() {
            let open = cur
                .policy
                .rules
                .iter()
                .filter(|r| r.segment == i)
                .filter(|r| r.window.as_ref().is_some_and(|w| w.is_open(now)))
                .count();
            windows.with_label_values(&[seg.name.as_str()]).set(open as i64);
            let n = cur
                .policy
                .rules
                .iter()
                .filter(|r| r.segment == i && r.exception.as_ref().is_some_and(|e| e.expires > now))
                .count();
            exc.with_label_values(&[seg.name.as_str()]).set(n as i64);
            segs.with_label_values(&[seg.name.as_str(), seg.mode.name(), seg.function.as_str()]).set(1);
        }
    }
}

fn inventory(r: &R, st: &AppState) {
    let snap = st.inventory();
    let devices = &snap.devices;
    let g = r.int_gauge(
        "mdsec_devices",
        "Devices in the inventory by segment and clinical class.",
        &["segment", "class"],
    );
    let mut unknown = 0usize;
    for d in devices.iter() {
        let seg = d.segment.as_deref().unwrap_or(NO_SEGMENT);
        g.with_label_values(&[seg, d.class.name()]).inc();
        unknown += (d.class == Class::Unknown) as usize;
    }
    r.gauge(
        "mdsec_unclassified_device_ratio",
        "Share of inventory devices whose clinical class is unknown (0–1; 0 with no devices).",
        &[],
    )
    .with_label_values::<&str>(&[])
    .set(if devices.is_empty() { 0.0 } else { unknown as f64 / devices.len() as f64 });
}

fn baseline(r: &R, st: &AppState) {
    let b = st.baseline.read().unwrap();
    let learning = r.int_gauge(
        "mdsec_segment_learning",
        "1 while a segment is in its learning period (no new_* detections), else 0.",
        &["segment"],
    );
    let obs = r.int_gauge(
        "mdsec_baseline_observations",
        "Distinct observed communications (device, peer, proto, port, app) stored for a segment.",
        &["segment"],
    );
    for (name, s) in &b.segments {
        learning.with_label_values(&[name.as_str()]).set(s.learning as i64);
        obs.with_label_values(&[name.as_str()]).set(s.observations as i64);
    }
    r.counter(
        "mdsec_baseline_dropped_total",
        "Observations not stored because the baseline table was full.",
        &[],
    )
    .with_label_values::<&str>(&[])
    .inc_by(b.dropped);
}

fn evidence(r: &R, st: &AppState) {
    let ev = st.evidence.read().unwrap();
    let inventory = st.inventory();
    let labels: HashMap<String, (&str, &str)> = inventory
        .devices
        .iter()
        .map(|d| (d.mac.to_string(), (d.segment.as_deref().unwrap_or(NO_SEGMENT), d.class.name())))
        .collect();
    let l = &["segment", "class"];
    let vulnerable =
        r.int_gauge("mdsec_vulnerable_devices", "Devices with at least one CVE not patched (register).", l);
    let eol = r.int_gauge("mdsec_end_of_life_devices", "Devices whose vendor support ended (register).", l);
    let open = r.int_gauge("mdsec_open_vulnerabilities", "(device, CVE) pairs not patched (register).", l);
    let lag = r.int_gauge(
        "mdsec_patch_lag_days_max",
        "Largest running patch-compliance lag (days since disclosure) of an open (device, CVE).",
        l,
    );
    for (mac, findings) in &ev.findings {
        let (seg, class) = labels.get(mac.as_str()).copied().unwrap_or((NO_SEGMENT, "unknown"));
        let labels = [seg, class];
        let open_n = findings.iter().filter(|f| f.status.is_open()).count() as i64;
        vulnerable.with_label_values(&labels).add((open_n > 0) as i64);
        eol.with_label_values(&labels)
            .add(findings.iter().any(|f| f.status == crate::evidence::register::Status::EndOfLife) as i64);
        open.with_label_values(&labels).add(open_n);
        let g = lag.with_label_values(&labels);
        let worst = findings.iter().filter(|f| f.status.is_open()).map(|f| f.lag_days).max().unwrap_or(0);
        g.set(g.get().max(worst));
    }
    let states =
        r.int_gauge("mdsec_devices_by_lifecycle", "Inventory devices by lifecycle state.", &["state"]);
    for s in crate::inventory::lifecycle::State::ALL {
        states.with_label_values(&[s.name()]);
    }
    for d in &inventory.devices {
        states.with_label_values(&[d.lifecycle.name()]).inc();
    }
    r.int_gauge(
        "mdsec_register_load_success",
        "1 if the vulnerability register loaded (or none is configured), 0 if its last edit has errors (the previous one stays).",
        &[],
    )
    .with_label_values::<&str>(&[])
    .set((ev.register_ok || !ev.register_configured) as i64);
}

fn events(r: &R, st: &AppState) {
    let ev = r.counter("mdsec_events_total", "Events the agent emitted, by type.", &["type"]);
    for t in crate::base::event::EVENT_TYPES {
        ev.with_label_values(&[t]);
    }
    let sup = r.counter(
        "mdsec_events_suppressed_total",
        "Detections not emitted because an equal one was (deduplication, one scan event per window).",
        &["type"],
    );
    for t in crate::base::event::EVENT_TYPES {
        sup.with_label_values(&[t]);
    }
    let store = st.events.read().unwrap();
    for (t, n) in &store.by_type {
        ev.with_label_values(&[t.as_str()]).inc_by(*n);
    }
    for (t, n) in &store.suppressed {
        sup.with_label_values(&[t.as_str()]).inc_by(*n);
    }
    let inc = &store.incidents;
    r.int_gauge("mdsec_incidents_open", "Incidents open now (a source still active).", &[])
        .with_label_values::<&str>(&[])
        .set(inc.open_count() as i64);
    let opened = r.counter("mdsec_incidents_opened_total", "Incidents opened, by severity.", &["severity"]);
    for s in ["critical", "high", "medium", "low"] {
        opened.with_label_values(&[s]).inc_by(inc.opened.get(s).copied().unwrap_or(0));
    }
    r.counter(
        "mdsec_events_subsumed_total",
        "Novelty events an incident subsumed (kept and queryable, not sent to the sinks on their own).",
        &[],
    )
    .with_label_values::<&str>(&[])
    .inc_by(inc.subsumed_total);
    r.int_gauge(
        "mdsec_events_held",
        "Novelty events waiting (incidents.hold_secs) for an incident that would subsume them.",
        &[],
    )
    .with_label_values::<&str>(&[])
    .set(inc.held_count() as i64);
    drop(store);
    let x = &st.export_stats;
    let out = r.counter(
        "mdsec_event_exports_total",
        "Events written to an export sink, by result.",
        &["sink", "result"],
    );
    // Both sinks always appear (zero when not configured) so alerts need no guard.
    out.with_label_values(&["log", "ok"]).inc_by(x.log_written.load(Ordering::Relaxed));
    out.with_label_values(&["log", "failed"]).inc_by(x.log_failed.load(Ordering::Relaxed));
    out.with_label_values(&["syslog", "ok"]).inc_by(x.syslog_sent.load(Ordering::Relaxed));
    out.with_label_values(&["syslog", "failed"]).inc_by(x.syslog_failed.load(Ordering::Relaxed));
    out.with_label_values(&["socket", "ok"]).inc_by(x.socket_sent.load(Ordering::Relaxed));
    out.with_label_values(&["socket", "failed"]).inc_by(x.socket_failed.load(Ordering::Relaxed));
    let fl = r.counter(
        "mdsec_eve_flow_records_total",
        "EVE flow records (one per ended conversation, both directions in one) written to an \
         eve sink, by result.",
        &["sink", "result"],
    );
    fl.with_label_values(&["log", "ok"]).inc_by(x.flow_log_written.load(Ordering::Relaxed));
    fl.with_label_values(&["log", "failed"]).inc_by(x.flow_log_failed.load(Ordering::Relaxed));
    fl.with_label_values(&["syslog", "ok"]).inc_by(x.flow_syslog_sent.load(Ordering::Relaxed));
    fl.with_label_values(&["syslog", "failed"]).inc_by(x.flow_syslog_failed.load(Ordering::Relaxed));
    fl.with_label_values(&["socket", "ok"]).inc_by(x.flow_socket_sent.load(Ordering::Relaxed));
    fl.with_label_values(&["socket", "failed"]).inc_by(x.flow_socket_failed.load(Ordering::Relaxed));
    let ix = &st.ipfix_stats;
    let rec = r.counter(
        "mdsec_ipfix_records_total",
        "IPFIX flow records (one per direction of a conversation that ended), by result: sent to \
         every collector, failed for a collector, or lost before the exporter (queue full).",
        &["result"],
    );
    rec.with_label_values(&["sent"]).inc_by(ix.records_sent.load(Ordering::Relaxed));
    rec.with_label_values(&["failed"]).inc_by(ix.records_failed.load(Ordering::Relaxed));
    rec.with_label_values(&["lost"]).inc_by(ix.records_lost.load(Ordering::Relaxed));
    r.counter("mdsec_ipfix_messages_total", "IPFIX messages sent, over every collector.", &[])
        .with_label_values::<&str>(&[])
        .inc_by(ix.messages_sent.load(Ordering::Relaxed));
}

/// The fleet producer (docs/FLEET.md); absent without `kafka:`.
fn kafka(r: &R, st: &AppState) {
    if !st.kafka_configured {
        return;
    }
    let k = &st.kafka_stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let spooled = r.counter(
        "mdsec_kafka_spooled_total",
        "Messages appended to the Kafka spool (every message is, before it is sent), by topic.",
        &["topic"],
    );
    let delivered = r.counter(
        "mdsec_kafka_delivered_total",
        "Messages the broker acknowledged (acks=all), by topic.",
        &["topic"],
    );
    for (i, t) in crate::surfaces::kafka::TOPIC_KINDS.iter().enumerate() {
        spooled.with_label_values(&[t]).inc_by(load(&k.spooled[i]));
        delivered.with_label_values(&[t]).inc_by(load(&k.delivered[i]));
    }
    let plain = |name: &str, help: &str, v: u64| {
        r.counter(name, help, &[]).with_label_values::<&str>(&[]).inc_by(v);
    };
    plain(
        "mdsec_kafka_delivery_failures_total",
        "Deliveries that failed (each message is sent again from the spool).",
        load(&k.failed),
    );
    plain(
        "mdsec_kafka_dropped_total",
        "Messages removed undelivered because the spool was full (kafka.spool.max_mb).",
        load(&k.dropped),
    );
    plain(
        "mdsec_kafka_spool_errors_total",
        "Messages that could not be written to the spool.",
        load(&k.spool_errors),
    );
    let gauge = |name: &str, help: &str, v: u64| {
        r.int_gauge(name, help, &[]).with_label_values::<&str>(&[]).set(v as i64);
    };
    gauge(
        "mdsec_kafka_queued",
        "Messages handed to the client and not yet acknowledged.",
        load(&k.in_flight),
    );
    gauge("mdsec_kafka_spool_messages", "Messages in the spool not yet acknowledged.", load(&k.pending));
    gauge("mdsec_kafka_spool_bytes", "Size of the spool on disk.", load(&k.spool_bytes));
    gauge(
        "mdsec_kafka_connected",
        "1 when the last thing the broker did was acknowledge a message; 0 after a client error.",
        load(&k.connected),
    );
    r.0.register(Box::new(k.latency.clone())).expect("unique metric");
}

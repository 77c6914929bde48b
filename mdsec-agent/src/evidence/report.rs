//! `mdsec-agent report`: the compensating-controls evidence for a period.
//!
//! Built from the state database alone (inventory, lifecycle and audit, events,
//! snapshots), the current policy and the vulnerability register, so it works
//! while the agent runs or after it stopped. Per segment: mode, allow-list,
//! exceptions, packets dropped and would-be dropped, detections, time in enforce
//! mode. Per vulnerable device: its CVEs with patch lag and the controls around
//! it. Program KPIs with a daily trend. Rendered as JSON (schema in
//! `deploy/schema/report.schema.json`), Markdown or self-contained HTML
//! (`report_render.rs`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::{
    base::event::Event,
    detection::triage::TriageConfig,
    evidence::register::{Finding, Register},
    evidence::{Kpi, SegmentCounts, Snapshot},
    inventory::Device,
    inventory::lifecycle::{AuditRow, Record},
    policy::model::{DefaultVerdict, Member, Mode, Policy, Rule},
};

pub const REPORT_VERSION: u32 = 1;

/// Detections listed in full at most (the rest are counted).
pub const MAX_LISTED: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Report {
    pub version: u32,
    pub generated: String,
    /// Period, `from` inclusive, `to` exclusive (RFC 3339).
    pub from: String,
    pub to: String,
    /// Program KPIs: counts over the period and the state at its end.
    pub program: Program,
    /// One row per day (UTC) with evidence in the period.
    pub trend: Vec<Day>,
    pub segments: Vec<SegmentReport>,
    /// Devices with at least one CVE in the register.
    pub vulnerable_devices: Vec<DeviceReport>,
    /// Lifecycle changes in the period (from the audit table).
    pub lifecycle_changes: Vec<AuditRow>,
    /// Detections in the period (not policy events), newest last, at most 500.
    pub detections: Vec<EventBrief>,
    pub detections_not_listed: u64,
    /// Incidents active in the period (correlated events per source), by id.
    #[serde(default)]
    pub incidents: Vec<crate::detection::incident::Incident>,
    /// Policy generations installed in the period (the policy history; file
    /// texts left out), with their approval and diff.
    #[serde(default)]
    pub policy_changes: Vec<crate::policy::approval::Change>,
    /// What the report could not see (no snapshots, no register, …).
    pub caveats: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Program {
    /// KPIs at the last snapshot of the period (or now, without snapshots).
    pub end: Kpi,
    /// Packets over the period, all segments.
    pub counts: SegmentCounts,
    /// Detections by type over the period.
    pub detections: BTreeMap<String, u64>,
    /// Seconds of the period covered by snapshots (the agent was running).
    pub observed_secs: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Day {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    pub counts: SegmentCounts,
    pub detections: u64,
    /// KPIs at the day's last snapshot.
    pub unclassified_ratio: f64,
    pub vulnerable_devices: u64,
    pub max_open_lag_days: i64,
    pub exceptions_active: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SegmentReport {
    pub name: String,
    pub function: String,
    pub clinical_impact: String,
    pub escalation: String,
    /// Current mode and default.
    pub mode: String,
    pub default: String,
    pub members: Vec<String>,
    /// The allow-list, one line per rule (`to pharmacy tcp 2575 app hl7`).
    pub allow: Vec<String>,
    pub exceptions: Vec<ExceptionReport>,
    pub counts: SegmentCounts,
    pub enforce_secs: u64,
    pub monitor_secs: u64,
    pub devices: u64,
    pub detections: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExceptionReport {
    pub rule: String,
    pub expires: String,
    pub reason: String,
    pub ticket: String,
    /// Still in force at the end of the period.
    pub active: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceReport {
    pub mac: String,
    pub name: Option<String>,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub class: String,
    pub ips: Vec<String>,
    pub segment: Option<String>,
    pub mode: Option<String>,
    pub lifecycle: String,
    pub findings: Vec<Finding>,
    /// The compensating controls in force, in words.
    pub controls: Vec<String>,
    /// Denied flows involving the device in the period (from policy events;
    /// events are rate-limited in the datapath, so this is a lower bound).
    pub denied_flows: u64,
    pub would_deny_flows: u64,
    pub detections: Vec<EventBrief>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EventBrief {
    pub time: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub severity: String,
    pub segment: String,
    pub src: String,
    pub dst: String,
    pub dport: u16,
    pub app: String,
    pub mac: Option<String>,
    pub clinical_impact: String,
    pub reason: String,
}

impl From<&Event> for EventBrief {
    fn from(e: &Event) -> Self {
        EventBrief {
            time: e.time.clone(),
            kind: e.kind.clone(),
            severity: e.severity.clone(),
            segment: e.segment.clone(),
            src: e.src.clone(),
            dst: e.dst.clone(),
            dport: e.dport,
            app: e.app.clone(),
            mac: e.mac.clone(),
            clinical_impact: e.clinical_impact.clone(),
            reason: e.reason.clone(),
        }
    }
}

/// The period a report covers, and when it is made.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    pub from: SystemTime,
    pub to: SystemTime,
    pub now: SystemTime,
}

/// The report for `period` from the state database, the loaded policy and
/// register, and the agent config (triage, config-decommissioned devices).
pub fn collect(
    db: &crate::evidence::store::Store,
    triage: &TriageConfig,
    config_decommissioned: BTreeSet<String>,
    policy: Option<&Policy>,
    register: Option<&Register>,
    period: Period,
) -> anyhow::Result<Report> {
    let rfc = crate::base::clock::rfc3339;
    let (from, to) = (rfc(period.from), rfc(period.to));
    let inputs = Inputs {
        policy,
        register,
        devices: db.load_devices()?,
        lifecycle: db.lifecycle()?,
        config_decommissioned,
        audit: db.audit(None)?.into_iter().filter(|a| a.time >= from && a.time < to).collect(),
        events: db.events_between(&from, &to)?,
        incidents: db.incidents_between(&from, &to)?,
        policy_changes: db
            .policy_history_between(&from, &to)?
            .into_iter()
            .map(|mut c| {
                c.files.iter_mut().for_each(|f| f.text = None);
                c
            })
            .collect(),
        snapshots: db
            .snapshots_between(&from, &to)?
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect(),
        triage,
        from: period.from,
        to: period.to,
        now: period.now,
    };
    Ok(build(&inputs))
}

/// Everything the report is built from.
pub struct Inputs<'a> {
    pub policy: Option<&'a Policy>,
    pub register: Option<&'a Register>,
    pub devices: Vec<Device>,
    pub lifecycle: HashMap<String, Record>,
    /// MACs the agent config marks `decommissioned: true`.
    pub config_decommissioned: BTreeSet<String>,
    pub audit: Vec<AuditRow>,
    pub events: Vec<Event>,
    pub incidents: Vec<crate::detection::incident::Incident>,
    pub policy_changes: Vec<crate::policy::approval::Change>,
    pub snapshots: Vec<Snapshot>,
    pub triage: &'a TriageConfig,
    pub from: SystemTime,
    pub to: SystemTime,
    pub now: SystemTime,
}

fn is_policy(e: &Event) -> bool {
    e.kind.starts_with("policy_")
}

/// A detection: neither a policy event nor an incident's notification (the
/// report lists incidents on their own).
fn is_detection(e: &Event) -> bool {
    !is_policy(e) && e.kind != "incident"
}

fn member_text(m: &Member) -> String {
    match m {
        Member::Net { net, vlan } => vlan.map_or(net.to_string(), |v| format!("{net} (vlan {v})")),
        Member::Mac { mac, vlan } => {
            let s = crate::base::net::mac_string(*mac);
            vlan.map_or(s.clone(), |v| format!("{s} (vlan {v})"))
        }
    }
}

/// Does event `e` involve device `d`?
fn involves(e: &Event, d: &Device) -> bool {
    let mac = d.mac.to_string();
    e.mac.as_deref() == Some(mac.as_str())
        || d.ips.iter().map(|ip| ip.to_string()).any(|ip| ip == e.src || ip == e.dst)
}

pub fn build(inp: &Inputs) -> Report {
    let rfc = crate::base::clock::rfc3339;
    let mut caveats = Vec::new();
    if inp.snapshots.is_empty() {
        caveats.push(
            "no snapshots in the period: packet counts and time in enforce mode are unknown (was the agent running?)"
                .into(),
        );
    }
    if inp.register.is_none() {
        caveats.push("no vulnerability register configured (`register:` in the agent config)".into());
    }
    if inp.policy.is_none() {
        caveats.push("no valid policy: segments are not listed".into());
    }
    let detections: Vec<&Event> = inp.events.iter().filter(|e| is_detection(e)).collect();

    // Program: period sums and the state at the last snapshot.
    let mut program = Program::default();
    let mut trend: BTreeMap<String, Day> = BTreeMap::new();
    let mut seg_counts: BTreeMap<String, (SegmentCounts, u64, u64)> = BTreeMap::new();
    for s in &inp.snapshots {
        program.observed_secs += s.interval_secs;
        let day = trend.entry(s.time.get(..10).unwrap_or("").to_string()).or_default();
        for (name, (mode, c)) in &s.segments {
            program.counts.add(c);
            day.counts.add(c);
            let e = seg_counts.entry(name.clone()).or_default();
            e.0.add(c);
            match mode.as_str() {
                "enforce" => e.1 += s.interval_secs,
                "monitor" => e.2 += s.interval_secs,
                _ => {}
            }
        }
        day.unclassified_ratio = s.kpi.unclassified_ratio;
        day.vulnerable_devices = s.kpi.vulnerable_devices;
        day.max_open_lag_days = s.kpi.max_open_lag_days;
        day.exceptions_active = s.kpi.exceptions_active;
    }
    for e in &detections {
        *program.detections.entry(e.kind.clone()).or_default() += 1;
        trend.entry(e.time.get(..10).unwrap_or("").to_string()).or_default().detections += 1;
    }
    for (date, d) in trend.iter_mut() {
        d.date = date.clone();
    }

    // The state at the end: each device's lifecycle as of now (the stored
    // documents may predate a change), findings today, KPIs.
    let devices: Vec<Device> = inp
        .devices
        .iter()
        .cloned()
        .map(|mut d| {
            let mac = d.mac.to_string();
            d.lifecycle = crate::inventory::lifecycle::effective(
                &inp.lifecycle,
                inp.config_decommissioned.contains(&mac),
                &mac,
            );
            d
        })
        .collect();
    let findings = inp.register.map(|r| crate::evidence::assess(r, &devices, inp.now)).unwrap_or_default();
    program.end = crate::evidence::kpi(&devices, &findings, inp.policy, inp.to.min(inp.now));

    let mut segments = Vec::new();
    if let Some(p) = inp.policy {
        for (i, s) in p.segments.iter().enumerate() {
            let t = inp.triage.lookup(&s.function);
            let rules: Vec<&Rule> = p.rules.iter().filter(|r| r.segment == i).collect();
            let (counts, enforce_secs, monitor_secs) = seg_counts.get(&s.name).cloned().unwrap_or_default();
            let mut det: BTreeMap<String, u64> = BTreeMap::new();
            for e in detections.iter().filter(|e| e.segment == s.name) {
                *det.entry(e.kind.clone()).or_default() += 1;
            }
            segments.push(SegmentReport {
                name: s.name.clone(),
                function: s.function.clone(),
                clinical_impact: t.impact.name().into(),
                escalation: t.escalation.clone(),
                mode: s.mode.name().into(),
                default: match s.default {
                    DefaultVerdict::Deny => "deny".into(),
                    DefaultVerdict::Allow => "allow".into(),
                },
                members: s.members.iter().map(member_text).collect(),
                allow: rules.iter().filter(|r| r.permanent()).map(|r| r.text()).collect(),
                exceptions: rules
                    .iter()
                    .filter_map(|r| {
                        let e = r.exception.as_ref()?;
                        Some(ExceptionReport {
                            rule: r.text(),
                            expires: e.expires_text.clone(),
                            reason: e.reason.clone(),
                            ticket: e.ticket.clone(),
                            active: e.expires > inp.to.min(inp.now),
                        })
                    })
                    .collect(),
                counts,
                enforce_secs,
                monitor_secs,
                devices: devices.iter().filter(|d| d.segment.as_deref() == Some(s.name.as_str())).count()
                    as u64,
                detections: det,
            });
        }
    }

    let mut vulnerable = Vec::new();
    for d in &devices {
        let mac = d.mac.to_string();
        let Some(f) = findings.get(&mac) else { continue };
        let seg = d.segment.as_deref().and_then(|s| p_segment(inp.policy, s));
        let mut controls = Vec::new();
        match seg {
            Some((s, rules)) => {
                let deny = matches!(s.default, DefaultVerdict::Deny);
                controls.push(format!(
                    "segment {} ({}): {} allow rule(s), default {}, mode {}",
                    s.name,
                    s.function,
                    rules,
                    if deny { "deny" } else { "allow" },
                    s.mode.name()
                ));
                if s.mode == Mode::Enforce && deny {
                    controls.push("traffic outside the allow-list is dropped at the gateway (XDP)".into());
                } else if deny {
                    controls.push(
                        "monitor mode: traffic outside the allow-list is only counted and reported, not dropped".into(),
                    );
                }
            }
            None => controls.push("no segment: the device is not isolated by an allow-list".into()),
        }
        controls.push("passive monitoring: scans, remote access, outside DNS, east-west and new communication are detected".into());
        let mine: Vec<&Event> = inp.events.iter().filter(|e| involves(e, d)).collect();
        vulnerable.push(DeviceReport {
            name: d.name.clone(),
            vendor: d.vendor.clone(),
            model: d.model.clone(),
            class: d.class.name().into(),
            ips: d.ips.iter().map(|ip| ip.to_string()).collect(),
            segment: d.segment.clone(),
            mode: seg.map(|(s, _)| s.mode.name().to_string()),
            lifecycle: d.lifecycle.name().into(),
            mac,
            findings: f.clone(),
            controls,
            denied_flows: mine.iter().filter(|e| e.kind == "policy_drop").count() as u64,
            would_deny_flows: mine.iter().filter(|e| e.kind == "policy_would_drop").count() as u64,
            detections: mine.iter().filter(|e| is_detection(e)).map(|e| EventBrief::from(*e)).collect(),
        });
    }

    let listed: Vec<EventBrief> =
        detections.iter().rev().take(MAX_LISTED).rev().map(|e| EventBrief::from(*e)).collect();
    Report {
        version: REPORT_VERSION,
        generated: rfc(inp.now),
        from: rfc(inp.from),
        to: rfc(inp.to),
        program,
        trend: trend.into_values().collect(),
        segments,
        vulnerable_devices: vulnerable,
        lifecycle_changes: inp.audit.clone(),
        detections_not_listed: (detections.len() - listed.len()) as u64,
        detections: listed,
        incidents: inp.incidents.clone(),
        policy_changes: inp.policy_changes.clone(),
        caveats,
    }
}

fn p_segment<'a>(p: Option<&'a Policy>, name: &str) -> Option<(&'a crate::policy::model::Segment, usize)> {
    let p = p?;
    let i = p.segment_index(name)?;
    Some((&p.segments[i], p.rules.iter().filter(|r| r.segment == i && r.permanent()).count()))
}

/// JSON Schema of the JSON report.
pub fn schema() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(Report)).unwrap() + "\n"
}

/// `YYYY-MM-DD` (midnight UTC) or RFC 3339.
pub fn parse_when(s: &str) -> Result<SystemTime, String> {
    if let Some(t) = crate::base::clock::parse_rfc3339(s) {
        return Ok(t);
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        return d
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp().into())
            .map_err(|e| format!("`{s}`: {e}"));
    }
    Err(format!("`{s}` is not a date (YYYY-MM-DD) or an RFC 3339 time"))
}

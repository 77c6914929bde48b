//! `cutover-report`: what a proposed policy changes, for review and sign-off
//! before it is applied. Two simulations of the same recorded communication
//! (`simulate`: the active policy and the proposed one), their difference per
//! communication, the rules added and removed, what monitor mode recorded as
//! would-drop since the active policy last changed, the proposed policy's
//! content hash and a sign-off block. JSON, or self-contained HTML.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
    time::SystemTime,
};

use anyhow::Result;
use serde::Serialize;

use super::{
    report_render::{CSS, Row, Table, esc},
    simulate::{DeviceResult, Judged, Simulation, service},
};
use crate::{base::clock::rfc3339, base::event::Event, policy::model::Policy};

/// A communication whose outcome the proposed policy changes.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub device: String,
    pub segment: String,
    pub function: String,
    pub impact: String,
    pub direction: &'static str,
    pub peer: String,
    pub proto: String,
    pub port: u16,
    pub app: String,
    pub flows: u64,
    /// Outcome under the active policy, and under the proposed one.
    pub before: &'static str,
    pub after: &'static str,
    /// Why, under the proposed policy.
    pub reason: String,
}

/// Would-drops monitor mode recorded, per conversation.
#[derive(Debug, Clone, Serialize)]
pub struct WouldDrop {
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub dport: u16,
    pub segment: String,
    pub events: u64,
    pub last: String,
}

/// Blank until a reviewer fills it in (the HTML prints lines to sign on).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SignOff {
    pub reviewer: Option<String>,
    pub role: Option<String>,
    pub date: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cutover {
    pub generated: String,
    pub proposed_dir: String,
    /// `sha256:` over the proposed directory's YAML files (names and bytes).
    pub content_hash: String,
    pub files: Vec<String>,
    pub active_dir: Option<String>,
    /// The active policy's newest file change: the would-drops are from since.
    pub active_changed: Option<String>,
    pub rules_added: Vec<String>,
    pub rules_removed: Vec<String>,
    /// Passes today, dropped under the proposed policy.
    pub newly_dropped: Vec<Change>,
    /// Dropped or would-drop today, allowed under the proposed policy.
    pub newly_allowed: Vec<Change>,
    /// Every other outcome change (allowed → would-drop, dropped → would-drop).
    pub other_changes: Vec<Change>,
    pub would_drop_since_change: Vec<WouldDrop>,
    /// The proposed policy's verdict for every recorded communication.
    pub proposed: Simulation,
    pub sign_off: Vec<SignOff>,
}

/// Rules as `segment: rule` lines (exceptions are not permanent rules).
fn rule_set(p: &Policy) -> BTreeSet<String> {
    crate::policy::approval::rule_lines(p).0
}

type Key = (String, String, &'static str, String, String, u16, String);
/// A would-drop conversation: source, destination, protocol, port, segment.
type Conversation = (String, String, String, u16, String);

fn key(d: &DeviceResult, c: &Judged) -> Key {
    (d.segment.clone(), d.device.clone(), c.direction, c.peer.clone(), c.proto.clone(), c.port, c.app.clone())
}

pub struct Inputs<'a> {
    pub proposed_dir: &'a Path,
    pub proposed_policy: &'a Policy,
    pub proposed: Simulation,
    pub active_dir: Option<&'a Path>,
    pub active_policy: Option<&'a Policy>,
    pub active: Option<Simulation>,
    /// Events since the active policy changed (the would-drops are taken).
    pub events: &'a [Event],
    pub active_changed: Option<SystemTime>,
}

pub fn build(i: Inputs) -> Result<Cutover> {
    // The hash an approval of this proposal must carry (`policy apply`).
    let contents = crate::policy::approval::read(i.proposed_dir)?;
    let (content_hash, files) = (contents.hash, contents.files.into_keys().collect());
    let new_rules = rule_set(i.proposed_policy);
    let old_rules = i.active_policy.map(rule_set).unwrap_or_default();
    let before: BTreeMap<Key, &'static str> = i
        .active
        .iter()
        .flat_map(|s| s.devices.iter())
        .flat_map(|d| d.communications.iter().map(move |c| (key(d, c), c.outcome)))
        .collect();
    let (mut newly_dropped, mut newly_allowed, mut other_changes) = (Vec::new(), Vec::new(), Vec::new());
    for d in &i.proposed.devices {
        for c in &d.communications {
            // No active policy: everything passes today.
            let was = before.get(&key(d, c)).copied().unwrap_or("allowed");
            if was == c.outcome {
                continue;
            }
            let ch = Change {
                device: d.device.clone(),
                segment: d.segment.clone(),
                function: d.function.clone(),
                impact: d.impact.clone(),
                direction: c.direction,
                peer: c.peer.clone(),
                proto: c.proto.clone(),
                port: c.port,
                app: c.app.clone(),
                flows: c.flows,
                before: was,
                after: c.outcome,
                reason: c.reason.clone(),
            };
            match (was, c.outcome) {
                (_, "dropped") => newly_dropped.push(ch),
                (_, "allowed") => newly_allowed.push(ch),
                _ => other_changes.push(ch),
            }
        }
    }
    let mut wd: BTreeMap<Conversation, (u64, String)> = BTreeMap::new();
    for e in i.events.iter().filter(|e| e.kind == "policy_would_drop") {
        let w = wd
            .entry((e.src.clone(), e.dst.clone(), e.proto.clone(), e.dport, e.segment.clone()))
            .or_default();
        w.0 += 1;
        w.1 = w.1.clone().max(e.time.clone());
    }
    Ok(Cutover {
        generated: rfc3339(SystemTime::now()),
        proposed_dir: i.proposed_dir.display().to_string(),
        content_hash,
        files,
        active_dir: i.active_dir.map(|d| d.display().to_string()),
        active_changed: i.active_changed.map(rfc3339),
        rules_added: new_rules.difference(&old_rules).cloned().collect(),
        rules_removed: old_rules.difference(&new_rules).cloned().collect(),
        newly_dropped,
        newly_allowed,
        other_changes,
        would_drop_since_change: wd
            .into_iter()
            .map(|((src, dst, proto, dport, segment), (events, last))| WouldDrop {
                src,
                dst,
                proto,
                dport,
                segment,
                events,
                last,
            })
            .collect(),
        proposed: i.proposed,
        sign_off: ["Biomedical engineering", "Clinical informatics", "Network engineering"]
            .iter()
            .map(|r| SignOff { role: Some(r.to_string()), ..Default::default() })
            .collect(),
    })
}

/// The newest modification time among `dir`'s YAML files.
pub fn changed(dir: &Path) -> Option<SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".yaml"))
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
}

fn change_table(rows: &[Change]) -> Table {
    Table::new(
        &[
            "Device",
            "Segment (function, impact)",
            "Direction",
            "Peer",
            "Service",
            "App",
            "Flows",
            "Today",
            "Proposed",
            "Why",
        ],
        rows.iter()
            .map(|c| {
                Row::new(vec![
                    c.device.clone(),
                    format!("{} ({}, {})", c.segment, c.function, c.impact),
                    if c.direction == "out" { "to" } else { "from" }.into(),
                    c.peer.clone(),
                    service(&c.proto, c.port),
                    c.app.clone(),
                    c.flows.to_string(),
                    c.before.into(),
                    c.after.into(),
                    c.reason.clone(),
                ])
            })
            .collect(),
    )
}

fn outcome_class(o: &str) -> Option<&'static str> {
    match o {
        "dropped" => Some("no-patch"),
        "would-drop" => Some("open"),
        _ => None,
    }
}

pub fn html(c: &Cutover) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mdsec cutover review {}</title><style>{CSS}</style></head><body>",
        esc(&c.content_hash[..19.min(c.content_hash.len())])
    );
    let _ = write!(
        h,
        "<header><h1>Policy cutover review</h1><p>Proposed policy <b>{}</b> ({}) · content hash <code>{}</code> · generated {} by mdsec</p><p>Active policy: {}{}</p></header>",
        esc(&c.proposed_dir),
        esc(&c.files.join(", ")),
        esc(&c.content_hash),
        esc(&c.generated),
        esc(c.active_dir.as_deref().unwrap_or("none (nothing is enforced today)")),
        c.active_changed.as_deref().map(|t| format!(", last changed {}", esc(t))).unwrap_or_default()
    );
    let s = &c.proposed;
    h += "<section><h2>Summary</h2><div class=\"tiles\">";
    for (k, v) in [
        ("recorded communications", s.communications.to_string()),
        ("dropped under the proposal", s.dropped.to_string()),
        ("newly dropped", c.newly_dropped.len().to_string()),
        ("newly allowed", c.newly_allowed.len().to_string()),
        ("rules added / removed", format!("{} / {}", c.rules_added.len(), c.rules_removed.len())),
        (
            "would-drops since the last change",
            c.would_drop_since_change.iter().map(|w| w.events).sum::<u64>().to_string(),
        ),
    ] {
        let _ = write!(
            h,
            "<div class=\"tile\"><div class=\"v\">{}</div><div class=\"k\">{}</div></div>",
            esc(&v),
            esc(k)
        );
    }
    h += "</div>";
    if s.dropped_at_threshold > 0 {
        let _ = write!(
            h,
            "<p class=\"note\">{} communication(s) of {} devices or worse would be dropped.</p>",
            s.dropped_at_threshold,
            esc(&s.threshold)
        );
    }
    h += "</section><section><h2>Newly dropped</h2>";
    if c.newly_dropped.is_empty() {
        h += "<p>None: everything that passes today still passes.</p>";
    } else {
        let mut t = change_table(&c.newly_dropped);
        t.rows.iter_mut().for_each(|r| r.class = Some("no-patch"));
        t.html(&mut h);
    }
    h += "</section><section><h2>Newly allowed</h2>";
    if c.newly_allowed.is_empty() {
        h += "<p>None.</p>";
    } else {
        change_table(&c.newly_allowed).html(&mut h);
    }
    if !c.other_changes.is_empty() {
        h += "<h3>Other changes</h3>";
        change_table(&c.other_changes).html(&mut h);
    }
    h += "</section><section><h2>Rules</h2>";
    let rules: Vec<Row> = c
        .rules_added
        .iter()
        .map(|r| Row { class: None, cells: vec!["added".into(), r.clone()] })
        .chain(
            c.rules_removed
                .iter()
                .map(|r| Row { class: Some("open"), cells: vec!["removed".into(), r.clone()] }),
        )
        .collect();
    if rules.is_empty() {
        h += "<p>No rule changes.</p>";
    } else {
        let mut t = Table::new(&["Change", "Rule"], rules);
        t.code = Some(1);
        t.html(&mut h);
    }
    h += "</section><section><h2>Devices under the proposed policy</h2>";
    for d in &s.devices {
        let _ = write!(
            h,
            "<div class=\"dev\"><h3>{} <small>{} · segment {} · {} · {}</small></h3>",
            esc(&d.device),
            esc(if d.mac.is_empty() { "MAC unknown" } else { &d.mac }),
            esc(&d.segment),
            esc(&d.function),
            esc(&d.impact)
        );
        let rows = d
            .communications
            .iter()
            .map(|x| Row {
                class: outcome_class(x.outcome),
                cells: vec![
                    if x.direction == "out" { "to" } else { "from" }.into(),
                    x.peer.clone(),
                    service(&x.proto, x.port),
                    x.app.clone(),
                    x.flows.to_string(),
                    format!("{} … {}", x.first_seen, x.last_seen),
                    x.outcome.into(),
                    x.reason.clone(),
                ],
            })
            .collect();
        Table::new(&["Direction", "Peer", "Service", "App", "Flows", "Seen", "Proposed", "Why"], rows)
            .html(&mut h);
        h += "</div>";
    }
    h += "</section><section><h2>Would-drop since the last policy change</h2>";
    if c.would_drop_since_change.is_empty() {
        h += "<p>Monitor mode recorded none.</p>";
    } else {
        let rows = c
            .would_drop_since_change
            .iter()
            .map(|w| {
                Row::new(vec![
                    w.src.clone(),
                    w.dst.clone(),
                    service(&w.proto, w.dport),
                    w.segment.clone(),
                    w.events.to_string(),
                    w.last.clone(),
                ])
            })
            .collect();
        Table::new(&["Source", "Destination", "Service", "Segment", "Events", "Last"], rows).html(&mut h);
    }
    h += "</section><section><h2>Sign-off</h2><p>By signing, the reviewer confirms that the device functions listed above are preserved under the policy with content hash <code>";
    h += &esc(&c.content_hash);
    h += "</code>.</p><table class=\"sign\"><thead><tr><th>Role</th><th>Reviewer</th><th>Date</th><th>Signature</th></tr></thead><tbody>";
    for s in &c.sign_off {
        let _ = write!(
            h,
            "<tr><td style=\"height:34px;width:22%\">{}</td><td style=\"width:30%\">{}</td><td style=\"width:16%\">{}</td><td>&nbsp;</td></tr>",
            esc(s.role.as_deref().unwrap_or("")),
            esc(s.reviewer.as_deref().unwrap_or("")),
            esc(s.date.as_deref().unwrap_or(""))
        );
    }
    h += "</tbody></table></section></body></html>\n";
    h
}

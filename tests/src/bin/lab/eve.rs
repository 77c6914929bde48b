//! The lab's EVE log, checked record by record once the agent has stopped
//! (so every conversation has its flow record): each record against the
//! fields Suricata's schema allows (`mdsec_agent::surfaces::eve::schema`),
//! then the values a SIEM parser relies on, then alerts against flow records.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use serde::Serialize;
use serde_json::Value;

use mdsec_agent::surfaces::eve::schema;

#[derive(Debug, Default, Serialize)]
pub struct EveCheck {
    pub alerts: usize,
    pub flow_records: usize,
    /// Alerts by signature id (each id must name one signature text family:
    /// its signatures all start the same way).
    pub alerts_by_sid: BTreeMap<u64, usize>,
    /// Policy alerts (drops, would-drops) whose `flow_id` no flow record has.
    pub policy_alerts_without_flow: usize,
    /// `file:line: what` for every problem found, the first 20.
    pub problems: Vec<String>,
    pub problem_count: usize,
}

const PROTOS: [&str; 4] = ["TCP", "UDP", "ICMP", "IPv6-ICMP"];
const POLICY_SIDS: std::ops::Range<u64> = 9_100_000..9_100_000 + (1 << 20);

/// Checks `path`; `sensor` is the configured `sensor_name`, `ifaces` the
/// names `in_iface` may carry.
pub fn check(path: &Path, sensor: &str, ifaces: &[String]) -> EveCheck {
    let mut c = EveCheck::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            c.problems.push(format!("{}: {e}", path.display()));
            c.problem_count = 1;
            return c;
        }
    };
    let mut flow_ids = BTreeSet::new();
    let mut policy_alert_ids = Vec::new();
    let mut sid_names: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        let mut bad = |what: String| problems.push(format!("{at}: {what}"));
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                bad(format!("not JSON: {e}"));
                continue;
            }
        };
        let common = common_problems(&v, sensor, ifaces);
        match v["event_type"].as_str() {
            Some("alert") => {
                c.alerts += 1;
                schema::alert_violations(&v)
                    .into_iter()
                    .chain(common)
                    .chain(alert_problems(&v))
                    .for_each(&mut bad);
                let sid = v["alert"]["signature_id"].as_u64().unwrap_or(0);
                *c.alerts_by_sid.entry(sid).or_default() += 1;
                let sig = v["alert"]["signature"].as_str().unwrap_or("");
                // The signature's family: its words before the first address or number.
                let family: String = sig
                    .split_whitespace()
                    .take_while(|w| !w.chars().next().is_some_and(|c| c.is_ascii_digit()))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ");
                sid_names.entry(sid).or_default().insert(family);
                if POLICY_SIDS.contains(&sid) {
                    policy_alert_ids.push((at.clone(), v["flow_id"].as_u64().unwrap_or(0)));
                }
            }
            Some("flow") => {
                c.flow_records += 1;
                schema::flow_violations(&v)
                    .into_iter()
                    .chain(common)
                    .chain(flow_problems(&v))
                    .for_each(&mut bad);
                flow_ids.insert(v["flow_id"].as_u64().unwrap_or(0));
            }
            other => bad(format!("event_type {other:?}")),
        }
    }
    for (sid, names) in &sid_names {
        if names.len() > 1 && !POLICY_SIDS.contains(sid) {
            problems.push(format!("signature_id {sid} names {names:?}"));
        }
    }
    for (at, id) in &policy_alert_ids {
        if !flow_ids.contains(id) {
            c.policy_alerts_without_flow += 1;
            problems.push(format!("{at}: no flow record has this alert's flow_id {id}"));
        }
    }
    c.problem_count = problems.len();
    problems.truncate(20);
    c.problems = problems;
    c
}

/// The envelope's values (the schema checks only keys and types).
fn common_problems(v: &Value, sensor: &str, ifaces: &[String]) -> Vec<String> {
    let mut bad = Vec::new();
    if v["host"] != sensor {
        bad.push(format!("host {} (want {sensor:?})", v["host"]));
    }
    if !v["in_iface"].as_str().is_some_and(|i| ifaces.iter().any(|f| f == i)) {
        bad.push(format!("in_iface {} is none of the gateway's", v["in_iface"]));
    }
    let proto = v["proto"].as_str().unwrap_or("");
    if !PROTOS.contains(&proto) && proto.parse::<u8>().is_err() {
        bad.push(format!("proto {proto:?}"));
    }
    let cid = v["community_id"].as_str().unwrap_or("");
    // "1:" and the base64 of a 20-byte SHA-1.
    if !(cid.starts_with("1:") && cid.len() == 30 && cid.ends_with('=')) {
        bad.push(format!("community_id {cid:?}"));
    }
    if !v["flow_id"].as_u64().is_some_and(|i| i > 0 && i < 1 << 63) {
        bad.push(format!("flow_id {}", v["flow_id"]));
    }
    for k in ["src_ip", "dest_ip"] {
        if v[k].as_str().and_then(|s| s.parse::<std::net::IpAddr>().ok()).is_none() {
            bad.push(format!("{k} {}", v[k]));
        }
    }
    let ported = matches!(proto, "TCP" | "UDP");
    if ported != (v["src_port"].is_u64() && v["dest_port"].is_u64()) {
        bad.push(format!("{proto} with ports {} {}", v["src_port"], v["dest_port"]));
    }
    if let Some(vl) = v.get("vlan")
        && !vl
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x.as_u64().is_some_and(|x| x < 4096)))
    {
        bad.push(format!("vlan {vl}"));
    }
    bad
}

fn alert_problems(v: &Value) -> Vec<String> {
    let a = &v["alert"];
    let mut bad = Vec::new();
    if !matches!(a["action"].as_str(), Some("allowed" | "blocked")) {
        bad.push(format!("alert.action {}", a["action"]));
    }
    if !a["severity"].as_u64().is_some_and(|s| (1..=3).contains(&s)) {
        bad.push(format!("alert.severity {}", a["severity"]));
    }
    if a["signature"].as_str().is_none_or(str::is_empty) || a["category"].as_str().is_none_or(str::is_empty) {
        bad.push("alert.signature or alert.category empty".into());
    }
    if a["gid"] != 1 && a["gid"].as_u64().is_none() {
        bad.push(format!("alert.gid {}", a["gid"]));
    }
    bad
}

fn flow_problems(v: &Value) -> Vec<String> {
    let f = &v["flow"];
    let mut bad = Vec::new();
    if !matches!(f["state"].as_str(), Some("new" | "established" | "closed")) {
        bad.push(format!("flow.state {}", f["state"]));
    }
    if !matches!(f["reason"].as_str(), Some("timeout" | "active_timeout" | "shutdown")) {
        bad.push(format!("flow.reason {}", f["reason"]));
    }
    if !matches!(f["action"].as_str(), Some("pass" | "drop")) {
        bad.push(format!("flow.action {}", f["action"]));
    }
    let n = |k: &str| f[k].as_u64().unwrap_or(0);
    if n("pkts_toserver") + n("pkts_toclient") == 0 {
        bad.push("a flow record of no packet".into());
    }
    // 42 bytes: Ethernet, IPv4 and a UDP or ICMP header (veths do not pad).
    if n("bytes_toserver") < 42 * n("pkts_toserver") || n("bytes_toclient") < 42 * n("pkts_toclient") {
        bad.push("fewer bytes than the smallest frame".into());
    }
    // Suricata's timestamps sort as text within one offset (both +0000).
    if f["start"].as_str() > f["end"].as_str() {
        bad.push(format!("flow.start {} after flow.end {}", f["start"], f["end"]));
    }
    if f["action"] == "drop" && f["alerted"] != true {
        bad.push("a dropped flow not marked alerted".into());
    }
    bad
}

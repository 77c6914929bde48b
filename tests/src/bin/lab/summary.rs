//! What the lab reports at the end: devices and classes, apps, events, what
//! the attack achieved and what normal traffic lost; and the evidence report.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::Result;
use mdsec_agent::surfaces::model::{Device, Event, Flow, Incident};
use mdsec_tests::{
    agent::{Agent, agent_bin},
    hospital::DEVICES,
};
use serde::Serialize;

use crate::services::Attack;

#[derive(Serialize)]
pub struct DeviceLine {
    pub name: String,
    pub ip: String,
    pub mac: String,
    pub vendor: Option<String>,
    pub class: String,
    pub expected_class: String,
    pub segment: Option<String>,
}

#[derive(Serialize)]
pub struct Summary {
    pub duration_secs: u64,
    pub devices: Vec<DeviceLine>,
    /// Every device got the class the lab expects.
    pub classes_as_expected: bool,
    pub apps_seen: BTreeSet<String>,
    pub events_by_type: BTreeMap<String, usize>,
    pub attack_events: Vec<Event>,
    pub attack_flows: usize,
    pub attack_flows_blocked: usize,
    pub attack_packets_dropped: u64,
    /// Packets of normal (non-attack) traffic dropped while enforcing.
    pub normal_drops: u64,
    pub normal_flows_dropped: usize,
    /// Packets the suggested allow-lists would have dropped in the monitor phase
    /// (all normal traffic): how complete the suggestion was.
    pub normal_would_drops_in_monitor: Option<u64>,
    pub metrics: Option<String>,
    /// Every incident of the run: (id, source, severity, events).
    pub incidents: Vec<(u64, String, String, u64)>,
    /// Incidents of sources that are not the attack's (the normal scenario
    /// raises none).
    pub normal_incidents: usize,
    /// The EVE log checked once the agent stopped (not with `--keep`).
    pub eve: Option<crate::eve::EveCheck>,
}

pub fn summarize(
    agent: &Agent,
    attack: Option<&Attack>,
    normal_drops_in_enforce: Option<u64>,
    total: u64,
    metrics: Option<String>,
) -> Result<Summary> {
    let devices: Vec<Device> = agent.devices()?;
    let flows: Vec<Flow> = agent.flows()?;
    let events: Vec<Event> = agent.events()?;
    let incidents: Vec<Incident> = agent.get("/api/v1/incidents?limit=10000")?;
    let attack_sources = attack.map(|a| a.sources()).unwrap_or_default();
    let lines: Vec<DeviceLine> = DEVICES
        .iter()
        .map(|s| {
            let d = devices.iter().find(|d| d.mac == s.mac);
            DeviceLine {
                name: s.name.into(),
                ip: s.ip().to_string(),
                mac: s.mac.into(),
                vendor: d.and_then(|d| d.vendor.clone()),
                class: d.map_or("not seen".into(), |d| d.class.clone()),
                expected_class: s.class.into(),
                segment: d.and_then(|d| d.segment.clone()),
            }
        })
        .collect();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        *by_type.entry(e.kind.clone()).or_default() += 1;
    }
    const ATTACK_TYPES: [&str; 3] = ["scan", "external_dns", "remote_access"];
    let is_attack = |f: &Flow| attack.is_some_and(|a| a.is_attack(f));
    let attack_flows: Vec<&Flow> = flows.iter().filter(|f| is_attack(f)).collect();
    let normal_dropped: Vec<&Flow> = flows.iter().filter(|f| f.verdict == "drop" && !is_attack(f)).collect();
    Ok(Summary {
        duration_secs: total,
        // An outside host is classified only by what it is seen answering:
        // its one query in the lab (the attack's) is dropped by policy, so
        // where the gateway's kernel lets nothing else reach it, it stays
        // unknown, which is right too.
        classes_as_expected: lines
            .iter()
            .zip(DEVICES)
            .all(|(l, s)| l.class == l.expected_class || (s.lan == "outside" && l.class == "unknown")),
        devices: lines,
        // What the devices were seen speaking over the run (flows that
        // ended have left the flow table; the inventory keeps their apps).
        apps_seen: devices
            .iter()
            .flat_map(|d| d.apps_client.iter().chain(&d.apps_server))
            .filter(|a| *a != "unknown")
            .cloned()
            .chain(flows.iter().filter(|f| f.app_confidence == "high").map(|f| f.app.clone()))
            .collect(),
        events_by_type: by_type,
        attack_events: events.iter().filter(|e| ATTACK_TYPES.contains(&e.kind.as_str())).cloned().collect(),
        attack_flows: attack_flows.len(),
        attack_flows_blocked: attack_flows.iter().filter(|f| f.verdict == "drop").count(),
        attack_packets_dropped: attack_flows.iter().filter(|f| f.verdict == "drop").map(|f| f.packets).sum(),
        normal_drops: normal_drops_in_enforce.unwrap_or(0)
            + normal_dropped.iter().map(|f| f.packets).sum::<u64>(),
        normal_flows_dropped: normal_dropped.len(),
        normal_would_drops_in_monitor: None,
        metrics,
        normal_incidents: incidents.iter().filter(|i| !attack_sources.contains(&i.src)).count(),
        incidents: incidents.iter().map(|i| (i.id, i.src.clone(), i.severity.clone(), i.events)).collect(),
        eve: None,
    })
}

pub fn print_summary(s: &Summary) {
    println!("\nmdsec lab summary ({} s)", s.duration_secs);
    for d in &s.devices {
        let mark = if d.class == d.expected_class { "" } else { "  (expected {})" };
        println!(
            "  {:<12} {:<11} {:<28} {}{}",
            d.name,
            d.ip,
            d.vendor.as_deref().unwrap_or("-").chars().take(28).collect::<String>(),
            d.class,
            mark.replace("{}", &d.expected_class)
        );
    }
    println!("  apps seen: {}", s.apps_seen.iter().cloned().collect::<Vec<_>>().join(", "));
    for e in &s.attack_events {
        println!(
            "  event {} {} → {} ({}, {}): {}",
            e.kind, e.src, e.dst, e.segment, e.clinical_impact, e.escalation
        );
    }
    println!(
        "  attack flows blocked: {}/{} ({} packets); normal traffic dropped: {} packets",
        s.attack_flows_blocked, s.attack_flows, s.attack_packets_dropped, s.normal_drops
    );
    for (id, src, severity, n) in &s.incidents {
        println!("  incident {id} from {src}: {severity}, {n} events");
    }
    if let Some(w) = s.normal_would_drops_in_monitor {
        println!("  suggested allow-lists in monitor mode: {w} packets would have been dropped");
    }
    if let Some(e) = &s.eve {
        println!(
            "  EVE log: {} alerts, {} flow records, {} problems",
            e.alerts, e.flow_records, e.problem_count
        );
        for p in &e.problems {
            println!("    {p}");
        }
    }
}

/// Where the run's files are kept after teardown: `MDSEC_LAB_OUT` (`cargo
/// xtask lab` sets target/lab), else a directory in the temp dir.
pub fn out_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("MDSEC_LAB_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("mdsec-evidence"));
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// The evidence report of the run, kept after teardown (see [`out_dir`]).
pub fn evidence_report(agent: &Agent) -> Option<PathBuf> {
    let dir = out_dir()?;
    let out = dir.join("evidence.html");
    let st = Command::new(agent_bin())
        .args(["report", "--config"])
        .arg(agent.dir.join("agent.yaml"))
        .arg("--out")
        .arg(&out)
        .stderr(Stdio::null())
        .status()
        .ok()?;
    st.success().then(|| out.canonicalize().unwrap_or(out))
}

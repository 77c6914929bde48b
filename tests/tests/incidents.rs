//! Incidents with real traffic through real XDP: an `nmap -sS` of the pump
//! segment from an unknown laptop is exactly one incident, whose events stay
//! queryable, tagged with it; novelty events it subsumes are marked, and only
//! the incident is notified beyond the events themselves.
//!
//! Topology: h1 = 10.0.1.2 infusion pump (segment pumps, 10.0.1.0/24,
//! enforce), h2 = 10.0.2.2 pharmacy, h3 = 10.0.3.2 the laptop.

use std::time::Duration;

use mdsec_agent::{
    evidence::report::Report,
    surfaces::model::{Event, Incident},
};
use mdsec_tests::{
    agent::{Agent, AgentOptions, cli, cli_in},
    netns::Topology,
    traffic::tcp_exchange,
};

fn policy() -> Vec<(String, String)> {
    vec![
        ("zones.yaml".into(), "zones:\n  pharmacy: [10.0.2.0/24]\n".into()),
        (
            "pumps.yaml".into(),
            "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nlearning_period: 2s\nmembers:\n  - cidr: 10.0.1.0/24\nallow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n".into(),
        ),
    ]
}

#[test]
fn an_nmap_syn_scan_of_a_segment_is_exactly_one_incident() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions { policy: policy(), ..Default::default() }).unwrap();
    // Normal traffic, before and after the learning period: no incident.
    let hl7 = b"\x0bMSH|^~\\&|PUMP|WARD3|PHARM|HOSP|20261123||ORU^R01|1|P|2.5\r\x1c\r";
    tcp_exchange(&topo, 1, 2, 2575, hl7);
    agent
        .wait_for(
            Duration::from_secs(20),
            |a| a.get::<serde_json::Value>("/api/v1/baseline"),
            |b| (b["segments"]["pumps"]["learning"] == false).then_some(()),
        )
        .unwrap();
    tcp_exchange(&topo, 1, 2, 2575, hl7);

    // The laptop SYN-scans the pumps' /28: every address, the 100 top ports.
    let out = topo
        .host(3)
        .exec(&[
            "timeout",
            "120",
            "nmap",
            "-sS",
            "-Pn",
            "-n",
            "--top-ports",
            "100",
            "-T4",
            "--max-retries",
            "0",
            "--min-rate",
            "500",
            "10.0.1.0/28",
        ])
        .unwrap();
    assert!(out.status.success(), "nmap: {}", String::from_utf8_lossy(&out.stderr));
    let incidents = |a: &Agent| a.get::<Vec<Incident>>("/api/v1/incidents");
    agent
        .wait_for(Duration::from_secs(20), incidents, |i| {
            i.iter().any(|i| i.by_type.contains_key("scan")).then_some(())
        })
        .unwrap();
    // Past the hold of novelty events and two more store passes.
    std::thread::sleep(Duration::from_secs(10));
    let all = incidents(&agent).unwrap();
    assert_eq!(all.len(), 1, "{all:#?}");
    let inc = &all[0];
    assert_eq!((inc.src.as_str(), inc.state.as_str()), ("10.0.3.2", "open"));
    // One scan event per source and scan window.
    assert!(inc.by_type.get("scan").is_some_and(|n| *n >= 1), "{inc:#?}");
    assert!(inc.by_type.get("policy_drop").copied().unwrap_or(0) >= 100, "{inc:#?}");
    assert!((14..=16).contains(&inc.targets_total), "{inc:#?}");
    assert_eq!(
        (inc.severity.as_str(), inc.clinical_impact.as_str(), inc.function.as_str()),
        ("critical", "life-critical", "infusion-pump")
    );
    assert_eq!(inc.segments, ["pumps"]);
    assert_eq!(inc.escalation, "biomed on-call and charge nurse, immediately");

    // Every event of the laptop belongs to it, and the filter finds them all.
    let events = agent.events().unwrap();
    let laptop: Vec<&Event> = events.iter().filter(|e| e.src == "10.0.3.2").collect();
    assert!(
        laptop.iter().all(|e| e.incident == inc.id),
        "{:#?}",
        laptop.iter().find(|e| e.incident != inc.id)
    );
    let of_it: Vec<Event> =
        agent.get::<Vec<Event>>(&format!("/api/v1/events?incident={}&limit=10000", inc.id)).unwrap();
    assert_eq!(of_it.len(), laptop.len());
    assert_eq!(inc.events as usize, laptop.iter().filter(|e| e.kind != "incident").count());
    // Novelty from the laptop is subsumed, never on its own; the pump's normal
    // traffic raised nothing.
    assert!(
        laptop.iter().filter(|e| e.kind.starts_with("new_") && e.kind != "new_device").all(|e| e.subsumed)
    );
    let opened: Vec<&&Event> = laptop.iter().filter(|e| e.kind == "incident").collect();
    assert_eq!(opened.len(), 1, "one notification: {opened:#?}");
    assert_eq!((opened[0].reason.as_str(), opened[0].severity.as_str()), ("opened", "critical"));
    assert!(events.iter().filter(|e| e.src != "10.0.3.2").all(|e| e.incident == 0));

    let m = agent.metrics().unwrap();
    assert_eq!(m.get("mdsec_incidents_open"), Some(1.0));
    assert_eq!(m.get(r#"mdsec_incidents_opened_total{severity="critical"}"#), Some(1.0));
    assert_eq!(m.get(r#"mdsec_events_total{type="incident"}"#), Some(1.0));
    assert_eq!(m.get("mdsec_events_subsumed_total"), Some(inc.subsumed as f64));
    // Filters and paging as on the other lists.
    let none: Vec<Incident> = agent.get("/api/v1/incidents?state=closed").unwrap();
    assert!(none.is_empty());
    let by_target: Vec<Incident> = agent.get("/api/v1/incidents?ip=10.0.1.2&type=scan").unwrap();
    assert_eq!(by_target.len(), 1);
    let after: Vec<Incident> = agent.get(&format!("/api/v1/incidents?cursor={}", inc.id)).unwrap();
    assert!(after.is_empty());
    let bad = agent.get::<serde_json::Value>("/api/v1/incidents?state=solved").unwrap_err().to_string();
    assert!(bad.contains("state"), "{bad}");

    // The CLI: the same list as a table, and the incident's events.
    let (ok, table, err) = cli_in(&topo.gw, &["incidents", "--state", "open"]);
    assert!(ok, "{err}");
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.lines().any(|l| l.contains("10.0.3.2") && l.contains("critical")), "{table}");
    let (ok, json, err) = cli_in(&topo.gw, &["events", "--json", "--all", "--incident", &inc.id.to_string()]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Vec<Event>>(&json).unwrap().len(), laptop.len());

    // The evidence report lists it (from the state database), and no
    // incident notification among the detections.
    let cfg = agent.dir.join("agent.yaml");
    let (ok, out, err) =
        cli(&["report", "--config", cfg.to_str().unwrap(), "--format", "json", "--from", "2026-01-01"]);
    assert!(ok, "{err}");
    let r: Report = serde_json::from_str(&out).unwrap();
    let listed: Vec<(u64, &str, u64)> =
        r.incidents.iter().map(|i| (i.id, i.src.as_str(), i.targets_total)).collect();
    assert_eq!(listed, [(inc.id, "10.0.3.2", inc.targets_total)]);
    assert!(r.detections.iter().all(|d| d.kind != "incident"));
}

//! The lab end to end: `mdsec-lab --duration 60 --json` in a real 80×24 terminal
//! (tmux). The live view must fit and show devices, flows and events; the
//! summary must show the expected classes, the apps (DICOM, HL7, DNS, DHCP), the
//! attack's three events, every attack flow blocked and no normal packet dropped.

use std::{collections::BTreeMap, process::Command, time::Duration};

/// Removes the test's directory when dropped (also on panic).
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tmux session of our own, killed by name when dropped (also on panic).
struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).status();
    }
}

#[test]
fn the_lab_runs_its_timeline_in_an_80x24_terminal() {
    let lab = env!("CARGO_BIN_EXE_mdsec-lab");
    let agent = mdsec_tests::agent::agent_bin();
    let dir =
        std::env::temp_dir().join(format!("{}{}-labtest", mdsec_tests::netns::PREFIX, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = Dir(dir.clone());
    let json = dir.join("summary.json");
    let done = dir.join("done");
    let session = Tmux(format!("mdsec-t{}-lab", std::process::id()));
    let cmd = format!(
        "MDSEC_AGENT_BIN={} MDSEC_LAB_OUT={} {lab} --duration 60 --json > {} ; echo $? > {}; sleep 60",
        agent.display(),
        dir.display(),
        json.display(),
        done.display()
    );
    let st = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session.0, "-x", "80", "-y", "24", &cmd])
        .status()
        .unwrap();
    assert!(st.success());
    // The attack starts at 45 s; capture once it is under way.
    std::thread::sleep(Duration::from_secs(50));
    let cap = Command::new("tmux").args(["capture-pane", "-p", "-t", &session.0]).output().unwrap();
    let view = String::from_utf8(cap.stdout).unwrap();
    let lines: Vec<&str> = view.lines().collect();
    assert!(lines.len() <= 24, "{view}");
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{view}");
    for want in [
        "mdsec lab",
        "phase 4/4 attack",
        "DEVICE",
        "pump1",
        "infusion-pump",
        "imaging-modality",
        "FLOW FROM",
        "EVENTS",
        "metrics: http://127.0.0.1:",
    ] {
        assert!(view.contains(want), "{want:?} missing from the view:\n{view}");
    }
    let mut waited = 0;
    while !done.exists() && waited < 60 {
        std::thread::sleep(Duration::from_secs(1));
        waited += 1;
    }
    assert_eq!(std::fs::read_to_string(&done).unwrap().trim(), "0", "the lab failed:\n{view}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let report =
        std::fs::read_to_string(dir.join("evidence.html")).expect("the lab writes its evidence report");
    assert!(
        report.contains("infusion-pumps") && report.contains("CVE-2020-12040"),
        "evidence report incomplete"
    );

    assert_eq!(s["classes_as_expected"], true, "{:#}", s["devices"]);
    let apps: Vec<&str> = s["apps_seen"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    for app in ["dicom", "hl7", "dns", "dhcp"] {
        assert!(apps.contains(&app), "{app} not seen: {apps:?}");
    }
    let mut kinds: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for e in s["attack_events"].as_array().unwrap() {
        let prev = kinds.insert(
            e["type"].as_str().unwrap(),
            (e["src"].as_str().unwrap(), e["clinical_impact"].as_str().unwrap()),
        );
        assert!(prev.is_none(), "two {} events", e["type"]);
    }
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("external_dns", ("10.10.0.12", "life-critical")),
            ("remote_access", ("10.50.0.10", "high")),
            ("scan", ("10.50.0.66", "life-critical")),
        ])
    );
    // 300 sweep SYNs, the outside DNS query and the RDP connection: all blocked.
    let flows = s["attack_flows"].as_u64().unwrap();
    assert!(flows >= 302, "{s:#}");
    assert_eq!(s["attack_flows_blocked"].as_u64(), Some(flows));
    assert_eq!(s["normal_drops"].as_u64(), Some(0), "{s:#}");
    assert_eq!(s["normal_flows_dropped"].as_u64(), Some(0));
    assert_eq!(s["normal_would_drops_in_monitor"].as_u64(), Some(0), "the suggestion missed normal traffic");
    assert!(s["evidence_report"].as_str().is_some_and(|p| p.ends_with("evidence.html")));
}

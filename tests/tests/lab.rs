//! The lab end to end: `mdsec-lab --duration 60 --json` in a real 80×24 terminal
//! (tmux). The live view must fit and show devices, flows and events; the
//! summary must show the expected classes, the apps (DICOM, HL7, DNS, DHCP), the
//! attack's three events, every attack flow blocked and no normal packet dropped.

use std::{collections::BTreeMap, process::Command, time::Duration};

use mdsec_tests::netns::TempDir as Dir;

/// A tmux session of our own, killed by name when dropped (also on panic).
struct Tmux(String);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.0]).status();
    }
}

/// A lab run in its own 80×24 tmux session: its directory (removed when
/// dropped), the session, and the files its stdout and exit code go to.
struct LabRun {
    dir: std::path::PathBuf,
    out: std::path::PathBuf,
    done: std::path::PathBuf,
    session: Tmux,
    _dir: Dir,
}

impl LabRun {
    fn start(name: &str, env: &str, args: &str, out_name: &str) -> LabRun {
        let lab = env!("CARGO_BIN_EXE_mdsec-lab");
        let agent = mdsec_tests::agent::agent_bin();
        let dir =
            std::env::temp_dir().join(format!("{}{}-{name}", mdsec_tests::netns::PREFIX, std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (out, done) = (dir.join(out_name), dir.join("done"));
        let session = Tmux(format!("mdsec-t{}-{name}", std::process::id()));
        let cmd = format!(
            "{env} MDSEC_AGENT_BIN={} MDSEC_LAB_OUT={} {lab} {args} > {} ; echo $? > {}; sleep 120",
            agent.display(),
            dir.display(),
            out.display(),
            done.display()
        );
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", &session.0, "-x", "80", "-y", "24", &cmd])
            .status()
            .unwrap();
        assert!(st.success());
        LabRun { _dir: Dir(dir.clone()), dir, out, done, session }
    }

    /// Waits (at most `secs`) for the lab to exit.
    fn wait(&self, secs: u64) {
        let mut waited = 0;
        while !self.done.exists() && waited < secs {
            std::thread::sleep(Duration::from_secs(1));
            waited += 1;
        }
    }
}

/// One lab at a time: two would share the machine's two CPUs and blur timings.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_lab_runs_its_timeline_in_an_80x24_terminal() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let run = LabRun::start("lab", "", "--duration 60 --json", "summary.json");
    let (dir, json, done, session) = (&run.dir, &run.out, &run.done, &run.session);
    // The attack starts 45 s into the timeline (after the set-up): capture
    // once the view shows it under way.
    let capture = || {
        let cap = Command::new("tmux").args(["capture-pane", "-p", "-t", &session.0]).output().unwrap();
        String::from_utf8(cap.stdout).unwrap()
    };
    let t0 = std::time::Instant::now();
    let mut view = capture();
    while !(view.contains("phase 4/4 attack") && view.contains("EVENTS"))
        && t0.elapsed() < Duration::from_secs(75)
    {
        std::thread::sleep(Duration::from_secs(1));
        view = capture();
    }
    // One more second: the first frame of the phase, then its events.
    std::thread::sleep(Duration::from_secs(2));
    let view = capture();
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
    run.wait(60);
    assert_eq!(std::fs::read_to_string(done).unwrap().trim(), "0", "the lab failed:\n{view}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
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
    // One incident per attacking source; the normal scenario raises none.
    assert_eq!(s["normal_incidents"].as_u64(), Some(0), "{:#}", s["incidents"]);
    let mut sources: Vec<&str> =
        s["incidents"].as_array().unwrap().iter().map(|i| i[1].as_str().unwrap()).collect();
    sources.sort();
    assert_eq!(sources, ["10.10.0.12", "10.50.0.10", "10.50.0.66"], "{:#}", s["incidents"]);
    assert_eq!(s["normal_would_drops_in_monitor"].as_u64(), Some(0), "the suggestion missed normal traffic");
    assert!(s["evidence_report"].as_str().is_some_and(|p| p.ends_with("evidence.html")));

    // The EVE log of the whole run, checked record by record once the agent
    // stopped (so every conversation has its flow record): schema keys and
    // types, values, and every policy alert's flow_id among the flow records.
    let eve = &s["eve"];
    assert_eq!(eve["problem_count"].as_u64(), Some(0), "{eve:#}");
    assert!(eve["flow_records"].as_u64().is_some_and(|n| n > 100), "{eve:#}");
    let sids = eve["alerts_by_sid"].as_object().unwrap();
    // The attack's three detections, by their fixed ids (scan, outside DNS,
    // remote access), and policy drops (9100000 and up).
    for sid in ["9000104", "9000105", "9000106"] {
        assert!(sids.get(sid).is_some_and(|n| n.as_u64() >= Some(1)), "no alert {sid}: {eve:#}");
    }
    assert!(sids.keys().any(|k| k.parse::<u64>().unwrap() >= 9_100_000), "no policy alert: {eve:#}");
    assert_eq!(eve["policy_alerts_without_flow"].as_u64(), Some(0));
    assert!(dir.join("eve.json").exists(), "the lab keeps its EVE log beside the report");
}

/// Ctrl-C at a moment of the run chosen at random: the lab prints its summary,
/// writes the evidence report, removes every namespace and exits, with no
/// `Error:` and no backtrace; the view used the alternate screen, so the
/// terminal's scrollback holds the lab's own lines, not hundreds of redraws.
#[test]
fn ctrl_c_at_a_random_moment_stops_the_lab_cleanly() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let run = LabRun::start("labstop", "RUST_BACKTRACE=1", "--duration 120", "summary.txt");
    let (dir, out, done, session) = (&run.dir, &run.out, &run.done, &run.session);
    // Once the agent is up (about 10 s of set-up) until well into the attack.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let at = 15 + (nanos as u64 % 50);
    eprintln!("sending Ctrl-C after {at} s");
    std::thread::sleep(Duration::from_secs(at));
    let st = Command::new("tmux").args(["send-keys", "-t", &session.0, "C-c"]).status().unwrap();
    assert!(st.success());
    run.wait(90);
    let pane =
        Command::new("tmux").args(["capture-pane", "-p", "-S", "-", "-t", &session.0]).output().unwrap();
    let pane = String::from_utf8_lossy(&pane.stdout).to_string();
    assert_eq!(std::fs::read_to_string(done).unwrap_or_default().trim(), "0", "{pane}");
    let summary = std::fs::read_to_string(out).unwrap();
    assert!(summary.contains("mdsec lab summary"), "{summary}");
    assert!(summary.contains("evidence report:"), "{summary}");
    assert!(dir.join("evidence.html").exists(), "no evidence report");
    assert!(pane.contains("lab: stopping at") && pane.contains("torn down, nothing left behind"), "{pane}");
    assert!(
        !pane.contains("Error") && !pane.contains("panicked") && !pane.contains("stack backtrace"),
        "{pane}"
    );
    // The redraws stayed on the alternate screen.
    assert!(pane.matches("mdsec lab ").count() <= 1, "{pane}");
    // This lab's namespaces, named in its first line: `(mdsec-lab<pid>-*)`.
    let id = pane.split("(mdsec-lab").nth(1).and_then(|r| r.split('-').next()).expect("the lab names its id");
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout).to_string();
    assert!(!ns.contains(&format!("mdsec-lab{id}-")), "namespaces left:\n{ns}");
}

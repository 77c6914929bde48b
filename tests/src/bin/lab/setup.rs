//! The agent the lab runs on the gateway: its policy, register and device
//! overrides, and the step that applies the suggested allow-lists.

use std::{os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{Result, bail};
use mdsec_tests::{
    agent::{Agent, AgentOptions, agent_bin},
    hospital::{DEVICES, Hospital},
};

const REGISTER: &str = "vulnerabilities:
  - vendor: baxter
    model: Sigma Spectrum
    cves:
      - id: CVE-2020-12040
        disclosed: 2020-09-01
        patch: none
        title: Hard-coded credentials
  - vendor: Siemens Healthcare
    model: Somatom Emotion
    cves:
      - id: CVE-2019-10935
        disclosed: 2019-06-13
        patch: end-of-life
devices: []
";

pub fn start_agent(id: &str, work: &Path, learning: u64) -> Result<Agent> {
    let zones = "zones:\n  pacs: [10.40.0.10/32]\n  pharmacy: [10.40.0.20/32]\n  emr: [10.40.0.30/32]\n  dns-internal: [10.40.0.53/32]\n  workstations: [10.50.0.0/24]\n";
    let seg = |name: &str, function: &str, cidr: &str| {
        (
            format!("{name}.yaml"),
            format!(
                "segment: {name}\nfunction: {function}\nmode: monitor\ndefault: deny\nlearning_period: {learning}s\nmembers:\n  - cidr: {cidr}\n"
            ),
        )
    };
    let policy = vec![
        ("zones.yaml".to_string(), zones.to_string()),
        seg("infusion-pumps", "infusion-pump", "10.10.0.0/24"),
        seg("patient-monitors", "patient-monitor", "10.20.0.0/24"),
        seg("imaging", "imaging-modality", "10.30.0.0/24"),
    ];
    std::fs::write(work.join("register.yaml"), REGISTER)?;
    let mut devices = String::from("devices:\n");
    for d in DEVICES.iter().filter(|d| d.lan != "outside" && d.name != "attacker") {
        devices += &format!("  - mac: {}\n    name: {}\n", d.mac, d.name);
        match d.name {
            "pump1" => devices += "    model: Sigma Spectrum\n",
            "ct1" => devices += "    model: Somatom Emotion\n",
            // Workstations speak nothing that names them: biomed pins the class.
            "workstation" => devices += "    class: clinical-workstation\n",
            _ => {}
        }
    }
    // Every event and ended conversation as EVE too, checked at the end (eve.rs).
    let extra = format!(
        "{}detection:\n  internal_resolvers: [10.40.0.53]\nregister: {}\nevidence:\n  snapshot_secs: 5\n{devices}\
         events:\n  log: {}\n  log_format: eve\n  eve:\n    sensor_name: {EVE_SENSOR}\n",
        Hospital::bridges_yaml(),
        work.join("register.yaml").display(),
        work.join("eve.json").display()
    );
    let opts =
        AgentOptions { policy, extra_yaml: extra, state_dir: Some(work.join("state")), ..Default::default() };
    Agent::start_on(id, &format!("{id}-gw"), &Hospital::gw_ifs(), opts)
}

/// The lab gateway's `events.eve.sensor_name` (EVE's `host`).
pub const EVE_SENSOR: &str = "lab-gw";

/// Writes the suggested allow-list of every segment in `mode` and reloads.
pub fn apply_suggestion(agent: &Agent, mode: &str) -> Result<()> {
    let cfg = agent.dir.join("agent.yaml");
    for seg in ["infusion-pumps", "patient-monitors", "imaging"] {
        let out = agent.policy_dir().join(format!("{seg}.yaml"));
        let o = Command::new(agent_bin())
            .args(["suggest", "--config"])
            .arg(&cfg)
            .args(["--segment", seg, "--mode", mode, "--out"])
            .arg(&out)
            .process_group(0)
            .output()?;
        if !o.status.success() {
            bail!("suggest {seg}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    // On the gateway, as an operator would: `check` also looks at the bridge's ports.
    let o = Command::new("ip")
        .args(["netns", "exec", &agent.gw])
        .arg(agent_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .process_group(0)
        .output()?;
    if !o.status.success() {
        bail!("check: {}", String::from_utf8_lossy(&o.stderr));
    }
    let st = agent.reload()?;
    if st["last_reload_ok"] != true {
        bail!("reload failed: {st}");
    }
    Ok(())
}

/// Removes namespaces a kept or killed lab left (and what runs in them).
pub fn cleanup() -> usize {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let names: Vec<String> = out
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with("mdsec-lab"))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    mdsec_tests::netns::delete_namespaces(&names);
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("mdsec-lab") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    names.len()
}

//! Clinical change control, with real traffic through real XDP: an enforce
//! segment with `require_approval: true` installs only approved content; an
//! unapproved edit is refused and the approved generation goes on enforcing;
//! `policy apply` approves and installs; every installed generation is in the
//! policy history; a restart over an unapproved edit reinstalls the last
//! generation from the history.
//!
//! Topology: h1 = 10.0.1.2 an infusion pump (segment pumps), h2 = 10.0.2.2
//! the pharmacy.

use std::{net::SocketAddr, process::Command, time::Duration};

use mdsec_agent::policy::approval;
use mdsec_tests::{
    agent::{Agent, AgentOptions, agent_bin},
    netns::{TempDir, Topology},
    traffic,
};

const ZONES: &str = "zones:\n  pharmacy: [10.0.2.0/24]\n";

fn pumps(ports: &str) -> String {
    format!(
        "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nrequire_approval: true\n\
         members:\n  - cidr: 10.0.1.0/24\nallow:\n  - to: pharmacy\n    proto: udp\n    ports: [{ports}]\n"
    )
}

/// Three datagrams from a fresh socket of h1 to the pharmacy's `port`: how
/// many arrived, and the flow's verdict and packets as the agent saw them.
fn send(topo: &Topology, agent: &Agent, port: u16) -> (usize, String, u64) {
    let rx = traffic::udp_receiver(topo.host(2), false, port).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let tx = traffic::udp_socket(topo.host(1), false).unwrap();
    let sport = tx.local_addr().unwrap().port();
    let to: SocketAddr = format!("10.0.2.2:{port}").parse().unwrap();
    for _ in 0..3 {
        tx.send_to(&[0x5a; 40], to).unwrap();
    }
    let mut got = 0;
    let mut buf = [0u8; 64];
    while rx.recv(&mut buf).is_ok() {
        got += 1;
    }
    let flow = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.flows(),
            |fs| fs.iter().find(|f| f.sport == sport && f.dport == port && f.packets == 3).cloned(),
        )
        .unwrap();
    (got, flow.verdict, flow.packets)
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(agent_bin()).args(args).output().unwrap()
}

fn status(a: &Agent) -> serde_json::Value {
    a.policy_status().unwrap()
}

/// Waits until the agent has tried the files again after `reloads` attempts.
fn next_attempt(a: &Agent, reloads: u64) -> serde_json::Value {
    a.wait_for(
        Duration::from_secs(10),
        |a| a.policy_status(),
        |s| (s["reloads"].as_u64() > Some(reloads)).then(|| s.clone()),
    )
    .unwrap()
}

/// The approval of the first policy (zones + `pumps("9000")`), as `policy
/// apply` writes it: (its content hash, `approval.yaml`).
fn first_approval(topo: &Topology) -> (String, String) {
    let scratch = TempDir(std::env::temp_dir().join(format!("{}-review", topo.id)));
    std::fs::create_dir_all(&scratch.0).unwrap();
    std::fs::write(scratch.0.join("zones.yaml"), ZONES).unwrap();
    std::fs::write(scratch.0.join("pumps.yaml"), pumps("9000")).unwrap();
    let hash = approval::read(&scratch.0).unwrap().hash;
    let yaml = approval::render(&approval::Approval {
        content_hash: hash.clone(),
        approved_by: "B. Med (biomed)".into(),
        ticket: "CHG-100".into(),
        approved_at: None,
        at: (0, 0),
    });
    (hash, yaml)
}

#[test]
fn only_approved_policy_content_is_installed_and_every_generation_is_recorded() {
    let topo = Topology::new(2).unwrap();
    let state = TempDir(std::env::temp_dir().join(format!("{}-state", topo.id)));
    // The first policy comes approved (an agent is ready only once a policy
    // is installed): the approval of exactly these files, as `policy apply`
    // writes it.
    let (approved, first) = first_approval(&topo);
    let opts = |pumps_yaml: String, approval: Option<&str>| AgentOptions {
        policy: [("zones.yaml", ZONES.to_string()), ("pumps.yaml", pumps_yaml)]
            .into_iter()
            .chain(approval.map(|a| ("approval.yaml", a.to_string())))
            .map(|(n, t)| (n.to_string(), t))
            .collect(),
        state_dir: Some(state.0.clone()),
        ..Default::default()
    };
    let agent = Agent::start(&topo, opts(pumps("9000"), Some(&first))).unwrap();
    let cfg = agent.dir.join("agent.yaml");
    let cfg = cfg.to_str().unwrap();
    let pdir = agent.policy_dir();

    // 1. Approved: installed, and enforcing exactly what it says.
    let s = status(&agent);
    assert_eq!(
        (s["generation"].as_u64(), s["approved_by"].as_str()),
        (Some(1), Some("B. Med (biomed)")),
        "{s:#}"
    );
    assert_eq!(s["content_hash"], approved.as_str());
    assert_eq!(send(&topo, &agent, 9000), (3, "allow".into(), 3));
    assert_eq!(send(&topo, &agent, 9001), (0, "drop".into(), 3));

    // 2. An edit without approval: refused, pointing at the approval; the
    // approved generation keeps enforcing.
    std::fs::write(pdir.join("pumps.yaml"), pumps("9000, 9001")).unwrap();
    let s = next_attempt(&agent, s["reloads"].as_u64().unwrap());
    assert_eq!((s["generation"].as_u64(), s["last_reload_ok"].as_bool()), (Some(1), Some(false)), "{s:#}");
    let why = s["diagnostics"].to_string();
    assert!(
        why.contains("approval.yaml:3:15: the approval is for sha256:") && why.contains("generation 1"),
        "{why}"
    );
    assert_eq!(send(&topo, &agent, 9001), (0, "drop".into(), 3));

    // 3. An approval for other content is refused by `apply` and changes nothing.
    let other = format!("sha256:{}", "0".repeat(64));
    let out = cli(&[
        "policy",
        "apply",
        "--config",
        cfg,
        "--approved-by",
        "X",
        "--ticket",
        "T",
        "--content-hash",
        &other,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed since the review"), "{out:?}");
    assert_eq!(status(&agent)["generation"], 1);
    // A policy with errors is not approved (every diagnostic, exit 2).
    let broken = agent.dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("pumps.yaml"), pumps("9000").replace("to: pharmacy", "to: nowhere")).unwrap();
    let out = cli(&[
        "policy",
        "apply",
        "--config",
        cfg,
        "--approved-by",
        "X",
        "--ticket",
        "T",
        broken.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pumps.yaml:9:9: unknown zone or segment `nowhere`"),
        "{out:?}"
    );

    // 4. The edit approved: generation 2 allows 9001.
    let before = status(&agent)["reloads"].as_u64().unwrap();
    let out =
        cli(&["policy", "apply", "--config", cfg, "--approved-by", "C. Informatics", "--ticket", "CHG-101"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.policy_status(),
            |s| (s["generation"] == 2).then(|| s.clone()),
        )
        .unwrap();
    assert!(s["reloads"].as_u64().unwrap() > before);
    assert_eq!(s["ticket"], "CHG-101");
    assert_eq!(send(&topo, &agent, 9001), (3, "allow".into(), 3));

    // 5. The history: both generations, who approved them, and what changed.
    let h: serde_json::Value = agent.get("/api/v1/policy/history").unwrap();
    let rows = h["items"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{h:#}");
    let col = |k: &str| rows.iter().map(|r| r[k].clone()).collect::<Vec<_>>();
    assert_eq!(col("generation"), [1, 2]);
    assert_eq!(col("approved_by"), ["B. Med (biomed)", "C. Informatics"]);
    assert_eq!(col("ticket"), ["CHG-100", "CHG-101"]);
    assert_eq!(rows[0]["content_hash"], approved.as_str());
    assert_eq!(rows[1]["previous_hash"], approved.as_str());
    assert_eq!(rows[1]["diff"]["files_changed"], serde_json::json!(["pumps.yaml"]));
    assert_eq!(rows[1]["diff"]["rules_added"], serde_json::json!(["pumps: to pharmacy udp 9000,9001"]));
    assert_eq!(rows[1]["diff"]["rules_removed"], serde_json::json!(["pumps: to pharmacy udp 9000"]));
    assert!(rows[0]["files"][0].get("text").is_none(), "texts only when asked");
    let page: serde_json::Value = agent.get("/api/v1/policy/history?limit=1&files=true").unwrap();
    assert_eq!((page["items"][0]["id"].as_u64(), page["next"].as_str()), (Some(1), Some("1")));
    assert!(page["items"][0]["files"][0]["text"].as_str().unwrap().contains("segment: pumps"));
    let (code, body) = agent.request("GET", "/api/v1/policy/history?limt=1", None).unwrap();
    assert_eq!(code, 400);
    assert!(String::from_utf8_lossy(&body).contains("limt: unknown parameter"));
    let (ok, text, err) = mdsec_tests::agent::cli_in(&topo.gw, &["policy", "history"]);
    assert!(ok && text.contains("C. Informatics") && text.contains("CHG-101"), "{text}{err}");

    // The evidence report lists the changes with their approvals.
    let out = cli(&["report", "--config", cfg, "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let changes = r["policy_changes"].as_array().unwrap();
    assert_eq!(changes.iter().map(|c| c["ticket"].clone()).collect::<Vec<_>>(), ["CHG-100", "CHG-101"]);
    let out = cli(&["report", "--config", cfg, "--format", "md"]);
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.contains("## Policy changes") && md.contains("+ pumps: to pharmacy udp 9000,9001"), "{md}");

    // 6. A restart over an unapproved edit: the last recorded generation
    // (2) is reinstalled from the history and enforces; the edit is refused.
    agent.stop().unwrap();
    let agent = Agent::start(&topo, opts(pumps("9000, 9001, 9002"), None)).unwrap();
    let s = status(&agent);
    assert_eq!((s["restored"].as_bool(), s["ticket"].as_str()), (Some(true), Some("CHG-101")), "{s:#}");
    assert!(s["diagnostics"].to_string().contains("requires approval"), "{s:#}");
    assert_eq!(send(&topo, &agent, 9001), (3, "allow".into(), 3));
    assert_eq!(send(&topo, &agent, 9002), (0, "drop".into(), 3));
    let h: serde_json::Value = agent.get("/api/v1/policy/history").unwrap();
    let last = h["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["cause"].as_str(), last["content_hash"] == rows[1]["content_hash"]),
        (Some("restored"), true)
    );
}

/// A maintenance window opening and closing under traffic: the same UDP
/// conversation (one socket) is dropped before the window, passes while it
/// is open (the verdict cached before it is decided again at the opening),
/// and is dropped again after it closes; each transition is an event and the
/// open windows a metric. Minute-granular like the policy syntax, so the
/// test waits for the next minute boundary.
#[test]
fn a_maintenance_window_opens_and_closes_on_time_under_traffic() {
    use std::time::SystemTime;
    let topo = Topology::new(2).unwrap();
    // The window: the next whole minute (at least 20 s away) for one minute, UTC.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let opens = (now + 20).div_ceil(60) * 60;
    let (start, end) = ((opens % 86_400) / 60, (opens % 86_400) / 60 + 1);
    let hm = |m: u64| format!("{:02}:{:02}", m / 60, m % 60);
    let window = format!(
        "maintenance_windows:\n  - to: pharmacy\n    proto: udp\n    ports: [9100]\n    \
         days: [mon, tue, wed, thu, fri, sat, sun]\n    start: \"{}\"\n    end: \"{}\"\n    \
         time_zone: UTC\n    reason: \"vendor remote service\"\n    ticket: CHG-200\n",
        hm(start),
        hm(end)
    );
    let pumps = pumps("9000").replace("require_approval: true\n", "") + &window;
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: vec![("zones.yaml".into(), ZONES.into()), ("pumps.yaml".into(), pumps)],
            ..Default::default()
        },
    )
    .unwrap();
    let rx = traffic::udp_receiver(topo.host(2), false, 9100).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let tx = traffic::udp_socket(topo.host(1), false).unwrap();
    let sport = tx.local_addr().unwrap().port();
    let to: SocketAddr = "10.0.2.2:9100".parse().unwrap();
    // Three datagrams of the one conversation: how many arrived, and the
    // flow's verdict once the agent has seen `total` packets of it.
    let probe = |total: u64| {
        for _ in 0..3 {
            tx.send_to(&[0x5a; 40], to).unwrap();
        }
        let (mut got, mut buf) = (0, [0u8; 64]);
        while rx.recv(&mut buf).is_ok() {
            got += 1;
        }
        let f = agent
            .wait_for(
                Duration::from_secs(10),
                |a| a.flows(),
                |fs| fs.iter().find(|f| f.sport == sport && f.dport == 9100 && f.packets == total).cloned(),
            )
            .unwrap();
        (got, f.verdict)
    };
    let open_windows = || agent.metrics().unwrap().get("mdsec_maintenance_windows_open{segment=\"pumps\"}");
    let wait_until = |t: u64| {
        while SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64() < t as f64 + 1.5
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let kinds = |a: &Agent| -> Vec<String> {
        a.events()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind.starts_with("maintenance_window"))
            .map(|e| format!("{} {}", e.kind, e.rule_id))
            .collect()
    };

    // Before: closed, dropped.
    assert_eq!(open_windows(), Some(0.0));
    assert_eq!(probe(3), (0, "drop".into()));
    assert!(kinds(&agent).is_empty());
    // Open: the same conversation passes, without a reload.
    let generation = agent.generation().unwrap();
    wait_until(opens);
    assert_eq!(probe(6), (3, "allow".into()));
    assert_eq!(agent.generation().unwrap(), generation, "no reload");
    agent.wait_for(Duration::from_secs(5), |a| Ok(kinds(a)), |k| (k.len() == 1).then_some(())).unwrap();
    assert_eq!(kinds(&agent), ["maintenance_window_open 2"]);
    assert_eq!(open_windows(), Some(1.0));
    // Closed again: dropped.
    wait_until(opens + 60);
    assert_eq!(probe(9), (0, "drop".into()));
    agent.wait_for(Duration::from_secs(5), |a| Ok(kinds(a)), |k| (k.len() == 2).then_some(())).unwrap();
    assert_eq!(kinds(&agent), ["maintenance_window_open 2", "maintenance_window_close 2"]);
    let e = agent.events().unwrap().into_iter().find(|e| e.kind == "maintenance_window_close").unwrap();
    assert!(e.reason.contains("CHG-200") && e.reason.contains("opens next"), "{}", e.reason);
    assert_eq!(open_windows(), Some(0.0));
    assert_eq!(agent.generation().unwrap(), generation, "no reload");
}

/// On-demand access under traffic: `exception open` lets one conversation
/// through at once (a new generation of the same approved files), an early
/// `exception close` and the expiry each end it in the kernel, every step is
/// an event and a history row, bad requests change nothing, and an open
/// exception survives a restart.
#[test]
fn on_demand_access_opens_closes_and_expires_under_traffic() {
    let topo = Topology::new(2).unwrap();
    let state = TempDir(std::env::temp_dir().join(format!("{}-state", topo.id)));
    let (approved, approval_yaml) = first_approval(&topo);
    let opts = || AgentOptions {
        policy: vec![
            ("zones.yaml".into(), ZONES.into()),
            ("pumps.yaml".into(), pumps("9000")),
            ("approval.yaml".into(), approval_yaml.clone()),
        ],
        state_dir: Some(state.0.clone()),
        ..Default::default()
    };
    let agent = Agent::start(&topo, opts()).unwrap();
    let exc = |args: &[&str]| mdsec_tests::agent::cli_in(&topo.gw, &[&["exception"], args].concat());
    let listed = |all: bool| -> Vec<serde_json::Value> {
        let (ok, out, err) = exc(if all { &["list", "--all", "--json"] } else { &["list", "--json"] });
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let kinds = |a: &Agent| -> Vec<String> {
        a.events()
            .unwrap()
            .into_iter()
            .filter(|e| e.kind.starts_with("exception_"))
            .map(|e| format!("{} {}", e.kind, e.rule))
            .collect()
    };

    // One conversation of h1 to the pharmacy's port 9400, probed as in the
    // window test.
    let rx = traffic::udp_receiver(topo.host(2), false, 9400).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let tx = traffic::udp_socket(topo.host(1), false).unwrap();
    let sport = tx.local_addr().unwrap().port();
    let probe = |total: u64| {
        for _ in 0..3 {
            tx.send_to(&[0x5a; 40], "10.0.2.2:9400".parse::<SocketAddr>().unwrap()).unwrap();
        }
        let (mut got, mut buf) = (0, [0u8; 64]);
        while rx.recv(&mut buf).is_ok() {
            got += 1;
        }
        let f = agent
            .wait_for(
                Duration::from_secs(10),
                |a| a.flows(),
                |fs| fs.iter().find(|f| f.sport == sport && f.dport == 9400 && f.packets == total).cloned(),
            )
            .unwrap();
        (got, f.verdict)
    };
    assert_eq!(probe(3), (0, "drop".into()));
    let generation = agent.generation().unwrap();

    // Bad requests: each refused, naming its field; nothing recorded or installed.
    let base = ["open", "--segment", "pumps", "--to", "pharmacy", "--proto", "udp", "--ports", "9400"];
    for (extra, want) in [
        (&["--for", "9h", "--ticket", "T", "--reason", "r"][..], "for: 9h is longer than the longest"),
        (&["--for", "soon", "--ticket", "T", "--reason", "r"], "for: `soon` is not a duration"),
        (&["--for", "1h", "--ticket", " ", "--reason", "r"], "ticket: an on-demand exception needs a ticket"),
        (&["--for", "1h", "--ticket", "T", "--reason", "r", "--app", "gopher"], "app: unknown app `gopher`"),
    ] {
        let (ok, _, err) = exc(&[&base[..], extra].concat());
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
    }
    let (ok, _, err) = exc(&[
        "open",
        "--segment",
        "nope",
        "--peer",
        "pharmacy",
        "--for",
        "1h",
        "--ticket",
        "T",
        "--reason",
        "r",
    ]);
    assert!(!ok && err.contains("segment: no segment `nope`"), "{err}");
    assert!(listed(true).is_empty());
    assert_eq!(agent.generation().unwrap(), generation);

    // Open for 15 s: the same conversation passes at once, under the same
    // approved content.
    let (ok, out, err) = exc(&[
        &base[..],
        &["--for", "15s", "--ticket", "CHG-300", "--reason", "vendor remote service", "--by", "V. Endor"],
    ]
    .concat());
    let opened = std::time::Instant::now();
    assert!(ok && out.contains("on-demand exception #1 open in segment pumps"), "{out}{err}");
    assert_eq!(probe(6), (3, "allow".into()));
    let s = status(&agent);
    assert_eq!(s["generation"].as_u64(), Some(generation + 1));
    assert_eq!(
        (s["content_hash"].as_str(), s["approved_by"].as_str()),
        (Some(approved.as_str()), Some("B. Med (biomed)"))
    );
    let open = listed(false);
    assert_eq!((open.len(), open[0]["opened_by"].as_str()), (1, Some("V. Endor")), "{open:?}");
    let history: serde_json::Value = agent.get("/api/v1/policy/history").unwrap();
    let last = history["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["cause"], "exception", "{last:#}");
    assert!(last["diff"].to_string().contains("CHG-300"), "{last:#}");
    agent.wait_for(Duration::from_secs(5), |a| Ok(kinds(a)), |k| (k.len() == 1).then_some(())).unwrap();
    assert_eq!(kinds(&agent), ["exception_open on-demand exception #1"]);

    // A second one, closed early: allowed, then dropped.
    let (ok, out, err) = exc(&[
        "open",
        "--segment",
        "pumps",
        "--to",
        "10.0.2.2",
        "--proto",
        "udp",
        "--ports",
        "9401",
        "--for",
        "5m",
        "--ticket",
        "CHG-301",
        "--reason",
        "firmware upload",
    ]);
    assert!(ok && out.contains("#2"), "{out}{err}");
    assert_eq!(send(&topo, &agent, 9401), (3, "allow".into(), 3));
    let (ok, out, err) = exc(&["close", "2", "--reason", "upload done", "--by", "B. Med"]);
    assert!(ok && out.contains("closed"), "{out}{err}");
    assert_eq!(send(&topo, &agent, 9401), (0, "drop".into(), 3));
    let (ok, _, err) = exc(&["close", "2", "--reason", "again"]);
    assert!(!ok && err.contains("was closed at"), "{err}");
    let (ok, _, err) = exc(&["close", "9", "--reason", "x"]);
    assert!(!ok && err.contains("no on-demand exception #9"), "{err}");

    // #1 expires: the kernel ends the conversation on the instant.
    std::thread::sleep(Duration::from_secs(16).saturating_sub(opened.elapsed()));
    assert_eq!(probe(9), (0, "drop".into()));
    agent.wait_for(Duration::from_secs(5), |a| Ok(kinds(a)), |k| (k.len() == 4).then_some(())).unwrap();
    let events = agent.events().unwrap();
    let reasons: Vec<&str> =
        events.iter().filter(|e| e.kind == "exception_close").map(|e| e.reason.as_str()).collect();
    assert!(
        reasons[0].contains("#2")
            && reasons[0].contains("closed by B. Med")
            && reasons[0].contains("upload done"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("#1") && reasons[1].contains("expired at"), "{reasons:?}");
    let all = listed(true);
    let closed: Vec<(u64, &str)> = all
        .iter()
        .map(|g| (g["id"].as_u64().unwrap(), g["closed"]["reason"].as_str().unwrap_or("-")))
        .collect();
    assert_eq!(closed, [(1, "expired"), (2, "upload done")]);
    assert!(listed(false).is_empty());
    // Every write attempt, refused ones too, is in the API audit.
    let writes: Vec<serde_json::Value> = agent.get("/api/v1/writes").unwrap();
    let codes: Vec<u64> = writes
        .iter()
        .filter(|w| w["path"].as_str().is_some_and(|p| p.starts_with("/api/v1/exceptions")))
        .map(|w| w["status"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [400, 400, 400, 400, 400, 201, 201, 200, 409, 404]);

    // Open across a restart: applied again from the state database.
    let (ok, out, err) = exc(&[
        "open",
        "--segment",
        "pumps",
        "--to",
        "pharmacy",
        "--proto",
        "udp",
        "--ports",
        "9402",
        "--for",
        "5m",
        "--ticket",
        "CHG-302",
        "--reason",
        "overnight service",
    ]);
    assert!(ok && out.contains("#3"), "{out}{err}");
    agent.stop().unwrap();
    let agent = Agent::start(&topo, opts()).unwrap();
    assert_eq!(send(&topo, &agent, 9402), (3, "allow".into(), 3));
    assert_eq!(send(&topo, &agent, 9401), (0, "drop".into(), 3));
    agent.stop().unwrap();
}

/// Quarantine of a new device: h1 (10.0.1.2) is a pump seen during the
/// learning period, h3 (10.0.3.2) one first seen after it. h3 gets only its
/// segment's `quarantine_allow` (the onboarding port of 10.0.2.2) while h1
/// keeps the segment's rules; moving h3 to `active` lifts the quarantine.
/// Each step is an event, a policy-history row and an audit row.
#[test]
fn a_new_device_is_quarantined_until_it_is_moved_to_active() {
    let topo = Topology::new(3).unwrap();
    let zones = "zones:\n  pharmacy: [10.0.2.0/24]\n  onboarding: [10.0.2.2/32]\n";
    let pumps = "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nlearning_period: 3s\n\
                 new_devices: quarantine\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: 10.0.3.0/24\n\
                 allow:\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n\
                 quarantine_allow:\n  - to: onboarding\n    proto: udp\n    ports: [9500]\n";
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: vec![("zones.yaml".into(), zones.into()), ("pumps.yaml".into(), pumps.into())],
            ..Default::default()
        },
    )
    .unwrap();
    // Three datagrams from a fresh socket of host `h` to 10.0.2.2:`port`:
    // how many arrived, and the flow's verdict.
    let send_from = |h: u8, port: u16| {
        let rx = traffic::udp_receiver(topo.host(2), false, port).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let tx = traffic::udp_socket(topo.host(h), false).unwrap();
        let sport = tx.local_addr().unwrap().port();
        for _ in 0..3 {
            tx.send_to(&[0x5a; 40], format!("10.0.2.2:{port}").parse::<SocketAddr>().unwrap()).unwrap();
        }
        let (mut got, mut buf) = (0, [0u8; 64]);
        while rx.recv(&mut buf).is_ok() {
            got += 1;
        }
        let f = agent
            .wait_for(
                Duration::from_secs(10),
                |a| a.flows(),
                |fs| fs.iter().find(|f| f.sport == sport && f.dport == port && f.packets == 3).cloned(),
            )
            .unwrap();
        (got, f.verdict)
    };
    let quarantined = |a: &Agent| -> Vec<String> {
        let q: Vec<serde_json::Value> = a.get("/api/v1/quarantine").unwrap();
        q.iter().map(|q| q["mac"].as_str().unwrap().to_string()).collect()
    };

    // h1 during learning: a member like any other.
    assert_eq!(send_from(1, 9000), (3, "allow".into()));
    agent
        .wait_for(
            Duration::from_secs(15),
            |a| a.get::<serde_json::Value>("/api/v1/baseline"),
            |b| (b["segments"]["pumps"]["learning"] == false).then_some(()),
        )
        .unwrap();
    // h3 appears after it: quarantined within a store pass.
    let _ = send_from(3, 9000);
    let mac3 = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.devices(),
            |ds| ds.iter().find(|d| d.ips.iter().any(|ip| ip == "10.0.3.2")).map(|d| d.mac.clone()),
        )
        .unwrap();
    agent
        .wait_for(Duration::from_secs(10), |a| Ok(quarantined(a)), |q| (*q == [mac3.clone()]).then_some(()))
        .unwrap();
    assert_eq!(send_from(3, 9000), (0, "drop".into()), "quarantined: the segment's rules do not apply");
    assert_eq!(send_from(3, 9500), (3, "allow".into()), "quarantine_allow applies");
    assert_eq!(send_from(1, 9000), (3, "allow".into()), "the learned pump is not quarantined");
    assert_eq!(send_from(1, 9500), (0, "drop".into()), "quarantine_allow is for quarantined devices only");
    let m = agent.metrics().unwrap();
    assert_eq!(m.get("mdsec_quarantined_devices{mode=\"quarantine\",segment=\"pumps\"}"), Some(1.0));
    let e = agent
        .wait_for(
            Duration::from_secs(5),
            |a| a.events(),
            |es| es.iter().find(|e| e.kind == "quarantine").cloned(),
        )
        .unwrap();
    assert_eq!(
        (e.mac.as_deref(), e.segment.as_str(), e.src.as_str()),
        (Some(mac3.as_str()), "pumps", "10.0.3.2")
    );
    let history: serde_json::Value = agent.get("/api/v1/policy/history").unwrap();
    assert!(history["items"].as_array().unwrap().iter().any(|c| c["cause"] == "quarantine"), "{history:#}");

    // Biomed moves it to active: lifted, and the segment's rules apply.
    let (ok, _, err) = mdsec_tests::agent::cli_in(
        &topo.gw,
        &["device", "set-state", &mac3, "active", "--reason", "validated by biomed", "--actor", "biomed:ana"],
    );
    assert!(ok, "{err}");
    agent.wait_for(Duration::from_secs(10), |a| Ok(quarantined(a)), |q| q.is_empty().then_some(())).unwrap();
    assert_eq!(send_from(3, 9000), (3, "allow".into()));
    assert_eq!(send_from(3, 9500), (0, "drop".into()));
    agent
        .wait_for(
            Duration::from_secs(5),
            |a| a.events(),
            |es| {
                es.iter().find(|e| e.kind == "quarantine_lifted" && e.mac.as_deref() == Some(&mac3)).cloned()
            },
        )
        .unwrap();
    let (ok, out, err) = mdsec_tests::agent::cli_in(&topo.gw, &["device", "audit", "--mac", &mac3, "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let steps: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["from"].as_str().unwrap().into(),
                r["to"].as_str().unwrap().into(),
                r["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        steps,
        [
            want("onboarding", "quarantine", "mdsec"),
            want("onboarding", "active", "biomed:ana"),
            want("quarantine", "active", "mdsec"),
        ]
    );
    agent.stop().unwrap();
}

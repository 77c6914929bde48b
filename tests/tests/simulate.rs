//! `mdsec-agent simulate`: a proposed policy judged against the recorded
//! communication must say what the datapath then does. Real traffic through
//! real XDP: recorded in monitor mode, simulated under an enforce policy,
//! the policy applied, the same traffic sent again; the simulation's verdict
//! for every communication equals the datapath's.
//!
//! Topology: h1 = 10.0.1.2 an infusion pump (segment pumps), h2 = 10.0.2.2
//! the pharmacy, h3 = 10.0.3.2 a clinical workstation, h4 = 10.0.4.2 a host
//! in no zone.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::SocketAddr,
    process::Command,
    time::Duration,
};

use mdsec_agent::surfaces::model::Flow;
use mdsec_tests::{
    agent::{Agent, AgentOptions, agent_bin},
    fixtures,
    netns::Topology,
    traffic,
};

const ZONES: &str = "zones:\n  pharmacy: [10.0.2.0/24]\n  workstations: [10.0.3.0/24]\n";

fn pumps(mode: &str, rules: &str) -> String {
    format!(
        "segment: pumps\nfunction: infusion-pump\nmode: {mode}\ndefault: deny\nlearning_period: 1h\nmembers:\n  - cidr: 10.0.1.0/24\n{rules}"
    )
}

/// The proposed allow-list: HL7 on 2575 and 2576 (app-checked), UDP 9000 and
/// ICMP to the pharmacy, HTTP from the workstations. Denied by it: UDP to the
/// workstation, DNS to an outside host, SSH from one, HTTP bytes on 2576.
const PROPOSED: &str = "allow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575, 2576]\n    app: hl7\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n  - to: pharmacy\n    proto: icmp\n  - from: workstations\n    proto: tcp\n    ports: [8080]\n";

/// One TCP connection; the client sends `payload` and waits briefly for an
/// answer. Tolerates a dropped connection (the enforce phase drops some).
fn tcp_try(topo: &Topology, from: u8, to: u8, port: u16, payload: &'static [u8]) {
    let listener = traffic::tcp_listener(topo.host(to), port).unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok((mut s, _)) = listener.accept() {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"ok");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let to_addr = SocketAddr::new(topo.host(to).v4().into(), port);
    if let Ok(mut c) = traffic::tcp_connect(topo.host(from), to_addr) {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = c.write_all(payload);
        let mut back = [0u8; 2];
        let _ = c.read(&mut back);
    }
    server.join().unwrap();
}

fn udp(topo: &Topology, from: u8, to: SocketAddr, payload: &[u8]) {
    let tx = traffic::udp_socket(topo.host(from), false).unwrap();
    for _ in 0..3 {
        tx.send_to(payload, to).unwrap();
    }
}

/// The communication both phases send.
fn traffic(topo: &Topology) {
    let hl7: &'static [u8] = Box::leak(fixtures::load("hl7-mllp").into_boxed_slice());
    tcp_try(topo, 1, 2, 2575, hl7);
    tcp_try(topo, 1, 2, 2576, b"GET /pump HTTP/1.1\r\nHost: pharmacy\r\n\r\n");
    tcp_try(topo, 3, 1, 8080, b"GET /status HTTP/1.1\r\nHost: pump\r\n\r\n");
    tcp_try(topo, 4, 1, 22, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
    // Receivers everywhere: no ICMP port-unreachable answers, which would be
    // communication of their own.
    let _rx: Vec<_> = [(2, 9000), (3, 7000), (4, 53)]
        .into_iter()
        .map(|(h, port)| traffic::udp_receiver(topo.host(h), false, port).unwrap())
        .collect();
    udp(topo, 1, "10.0.2.2:9000".parse().unwrap(), &[0x5a; 40]);
    udp(topo, 1, "10.0.3.2:7000".parse().unwrap(), &[0x5a; 40]);
    udp(topo, 1, "10.0.4.2:53".parse().unwrap(), &traffic::dns_query());
    std::thread::sleep(Duration::from_millis(200));
    topo.host(1).exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.0.2.2"]).unwrap();
}

#[test]
fn a_simulated_policy_predicts_every_verdict_the_datapath_then_gives() {
    // No warm-up pings: the gateway's address would be a peer of its own,
    // which the replay does not repeat.
    let topo = Topology::new(4).unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: vec![("zones.yaml".into(), ZONES.into()), ("pumps.yaml".into(), pumps("monitor", ""))],
            ..Default::default()
        },
    )
    .unwrap();

    // 1. Recorded in monitor mode (learning): nothing is dropped.
    traffic(&topo);
    let baseline = |a: &Agent| -> anyhow::Result<u64> {
        let s: mdsec_agent::detection::learn::Status = a.get("/api/v1/baseline")?;
        Ok(s.segments.get("pumps").map_or(0, |x| x.observations))
    };
    agent.wait_for(Duration::from_secs(20), baseline, |n| (*n >= 8).then_some(())).unwrap();

    // 2. Simulated.
    let proposed = agent.dir.join("proposed");
    std::fs::create_dir_all(&proposed).unwrap();
    std::fs::write(proposed.join("zones.yaml"), ZONES).unwrap();
    std::fs::write(proposed.join("pumps.yaml"), pumps("enforce", PROPOSED)).unwrap();
    let cfg = agent.dir.join("agent.yaml");
    let run = |extra: &[&str]| {
        Command::new(agent_bin())
            .args(["simulate", "--config"])
            .arg(&cfg)
            .arg("--policy")
            .arg(&proposed)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--json"]);
    // The pump (life-critical) would lose communication: status 3.
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let sim: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run(&["--fail-on", "none"]).status.code(), Some(0));
    // Bad input: named, and nothing simulated.
    let bad = run(&["--from", "last tuesday"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--from"), "{bad:?}");
    let broken = agent.dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("zones.yaml"), ZONES).unwrap();
    std::fs::write(broken.join("pumps.yaml"), pumps("enforce", "allow:\n  - to: nowhere\n    proto: tcp\n"))
        .unwrap();
    let out = Command::new(agent_bin())
        .args(["simulate", "--config"])
        .arg(&cfg)
        .arg("--policy")
        .arg(&broken)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("pumps.yaml:9:") && err.contains("nowhere"), "{err}");
    assert!(out.stdout.is_empty());
    let text = String::from_utf8_lossy(&run(&[]).stdout).to_string();
    eprintln!("{text}");
    assert!(text.contains("10.0.1.2") && text.contains("infusion-pump, life-critical"), "{text}");

    let comms: Vec<(String, String, String, u16, String, String)> = sim["devices"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|d| {
            let dev = d["device"].as_str().unwrap().to_string();
            d["communications"].as_array().unwrap().iter().map(move |c| {
                let s = |k: &str| c[k].as_str().unwrap().to_string();
                (
                    dev.clone(),
                    s("direction"),
                    s("peer"),
                    c["port"].as_u64().unwrap() as u16,
                    s("proto"),
                    s("verdict"),
                )
            })
        })
        .collect();
    // Each kind of outcome is there.
    let verdicts: BTreeSet<&str> = comms.iter().map(|c| c.5.as_str()).collect();
    assert_eq!(verdicts, BTreeSet::from(["allow", "drop"]), "{sim:#}");
    assert_eq!(sim["dropped"].as_u64().unwrap() as usize, comms.iter().filter(|c| c.5 == "drop").count());

    // The cutover report: the proposal against the active (learning) policy.
    let report = |format: &str| {
        let out = Command::new(agent_bin())
            .args(["cutover-report", "--config"])
            .arg(&cfg)
            .arg("--policy")
            .arg(&proposed)
            .args(["--format", format])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let c: serde_json::Value = serde_json::from_str(&report("json")).unwrap();
    let hash = c["content_hash"].as_str().unwrap().to_string();
    assert!(hash.starts_with("sha256:") && hash.len() == 71, "{hash}");
    assert_eq!(c["files"], serde_json::json!(["pumps.yaml", "zones.yaml"]));
    let added: Vec<&str> = c["rules_added"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(added.contains(&"pumps: to pharmacy tcp 2575,2576 app hl7"), "{added:?}");
    assert!(added.contains(&"pumps: from workstations tcp 8080"), "{added:?}");
    assert_eq!(c["rules_removed"], serde_json::json!([]));
    // Everything is a would-drop of the learning policy today: the drops are
    // new drops, the rest newly allowed.
    let n = |k: &str| c[k].as_array().unwrap().len();
    assert_eq!((n("newly_dropped"), n("newly_allowed")), (4, 4), "{c:#}");
    assert!(c["newly_dropped"].as_array().unwrap().iter().all(|x| x["before"] == "would-drop"));
    assert!(n("would_drop_since_change") >= 1, "{c:#}");
    let html = report("html");
    for want in [hash.as_str(), "Newly dropped", "Sign-off", "Biomedical engineering", "10.0.1.2"] {
        assert!(html.contains(want), "no {want} in the HTML report");
    }
    assert!(
        !html.contains("<script") && !html.contains("http://") && !html.contains("https://"),
        "self-contained"
    );
    // What was reviewed is what gets applied: the same bytes, the same hash.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&report("json")).unwrap()["content_hash"],
        hash.as_str()
    );

    // 3. Applied in enforce mode, and the same traffic again.
    std::fs::write(agent.policy_dir().join("pumps.yaml"), pumps("enforce", PROPOSED)).unwrap();
    let st = agent.reload().unwrap();
    assert_eq!(st["last_error"], serde_json::Value::Null, "{st:#}");
    let applied = std::time::SystemTime::now();
    traffic(&topo);
    std::thread::sleep(Duration::from_millis(1500));
    // Flows the replay sent (an ICMP echo flow of the first phase is the same
    // flow again, judged again under the new generation).
    let flows: Vec<Flow> = agent
        .flows()
        .unwrap()
        .into_iter()
        .filter(|f| mdsec_agent::base::clock::parse_rfc3339(&f.last_seen).is_some_and(|t| t >= applied))
        .collect();

    // 4. Every simulated communication, judged alike by the datapath.
    let mut checked = 0;
    for (dev, dir, peer, port, proto, verdict) in &comms {
        let (src, dst) = if dir == "out" { (dev, peer) } else { (peer, dev) };
        let seen: Vec<&Flow> = flows
            .iter()
            .filter(|f| {
                &f.src == src && &f.dst == dst && &f.proto == proto && (proto == "icmp" || f.dport == *port)
            })
            .collect();
        assert!(!seen.is_empty(), "{src} -> {dst} {proto} {port}: no flow in the enforce phase: {flows:#?}");
        for f in seen {
            assert_eq!(
                &f.verdict, verdict,
                "{src} -> {dst} {proto} {port}: simulated {verdict}, datapath {f:#?}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 8, "{checked} communications checked: {sim:#}");
}

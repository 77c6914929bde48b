//! Learned baselines with real traffic through real XDP: observe → suggest →
//! check → enforce, and `new_destination` / `new_port` / `new_app` after the
//! learning period.
//!
//! Topology: h1 = 10.0.1.2 and h7 = 10.0.7.2 infusion pumps (segment pumps),
//! h2 = 10.0.2.2 pharmacy and internal DNS, h3 = 10.0.3.2 clinical workstation,
//! h4 = 10.0.4.2 imaging modality (segment imaging), h5 = 10.0.5.2 attacker,
//! h6 = 10.0.6.2 a resolver outside the internal list.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use mdsec_agent::{detection::learn::Status, surfaces::model::Event};
use mdsec_tests::{
    agent::{Agent, AgentOptions, cli},
    fixtures,
    frames::{self, RawSender, V4},
    netns::{Host, Topology, link_mac},
    traffic::{self, dns_query, tcp_exchange},
};

const ZONES: &str = "zones:\n  pharmacy: [10.0.2.0/24]\n  workstations: [10.0.3.0/24]\n";

fn segments(learning: &str) -> Vec<(String, String)> {
    vec![
        ("zones.yaml".into(), ZONES.into()),
        (
            "pumps.yaml".into(),
            format!(
                "segment: pumps\nfunction: infusion-pump\nmode: monitor\ndefault: deny\nlearning_period: {learning}\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: 10.0.7.0/24\n"
            ),
        ),
        (
            "imaging.yaml".into(),
            format!(
                "segment: imaging\nfunction: imaging-modality\nmode: monitor\ndefault: deny\nlearning_period: {learning}\nmembers:\n  - cidr: 10.0.4.0/24\n"
            ),
        ),
    ]
}

fn hl7() -> Vec<u8> {
    fixtures::load("hl7-mllp")
}

/// What the hospital does every day: both pumps report over HL7 and resolve names
/// internally, one pings the pharmacy, a workstation sends a study to the modality.
/// Returns the DNS datagrams the internal resolver received.
fn normal_traffic(topo: &Topology) -> usize {
    tcp_exchange(topo, 1, 2, 2575, &hl7());
    tcp_exchange(topo, 7, 2, 2575, &hl7());
    let rx = traffic::udp_receiver(topo.host(2), false, 53).unwrap();
    for h in [1, 7] {
        let tx = traffic::udp_socket(topo.host(h), false).unwrap();
        tx.send_to(&dns_query(), SocketAddr::new(topo.host(2).v4().into(), 53)).unwrap();
    }
    topo.host(1).exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.0.2.2"]).unwrap();
    tcp_exchange(topo, 3, 4, 104, &fixtures::load("dicom-associate-rq"));
    std::thread::sleep(Duration::from_millis(300));
    traffic::drain(&rx)
}

fn raw_syn(from: &Host, gw: &str, to: Ipv4Addr, ports: std::ops::Range<u16>) {
    let raw = RawSender::open(&from.ns, "eth0").unwrap();
    let (mac, gw_mac) = (from.mac().unwrap(), link_mac(gw, &from.gw_if).unwrap());
    for port in ports {
        let ip = V4::new(from.v4(), to, 6).build(&frames::tcp(41000, port, 0x02, b""));
        raw.send(&frames::eth(gw_mac, mac, &[], 0x0800, &ip)).unwrap();
    }
}

fn baseline(a: &Agent) -> Status {
    a.get("/api/v1/baseline").unwrap()
}

#[test]
fn learn_suggest_check_enforce_passes_normal_traffic_and_drops_the_attack() {
    let topo = Topology::new(7).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: segments("1h"),
            extra_yaml: "detection:\n  internal_resolvers: [10.0.2.2]\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(agent.generation().unwrap() >= 1, "{}", agent.log());

    // 1. Learning: normal traffic only, in monitor mode.
    assert_eq!(normal_traffic(&topo), 2);
    let st = agent
        .wait_for(
            Duration::from_secs(20),
            |a| Ok(baseline(a)),
            |s| {
                let n = |seg: &str| s.segments.get(seg).map_or(0, |x| x.observations);
                // pumps: 2× HL7, 2× DNS, ICMP; imaging: DICOM from the workstation.
                (n("pumps") >= 5 && n("imaging") >= 1).then(|| s.clone())
            },
        )
        .unwrap();
    assert!(st.segments["pumps"].learning && st.segments["imaging"].learning, "{st:#?}");

    // 2. Suggest both segments in enforce mode, straight over their files; check.
    let cfg = agent.dir.join("agent.yaml");
    let cfg = cfg.to_str().unwrap();
    for seg in ["pumps", "imaging"] {
        let out = agent.policy_dir().join(format!("{seg}.yaml"));
        let (ok, _, err) = cli(&[
            "suggest",
            "--config",
            cfg,
            "--segment",
            seg,
            "--mode",
            "enforce",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "suggest {seg}: {err}");
    }
    let pumps = std::fs::read_to_string(agent.policy_dir().join("pumps.yaml")).unwrap();
    let imaging = std::fs::read_to_string(agent.policy_dir().join("imaging.yaml")).unwrap();
    for want in [
        "mode: enforce",
        "  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n    app: hl7\n",
        "  - to: pharmacy\n    proto: udp\n    ports: [53]\n    app: dns\n",
        "  - to: pharmacy\n    proto: icmp\n",
        "# observed: 2 flows from 2 device(s) (10.0.1.2, 10.0.7.2)",
    ] {
        assert!(pumps.contains(want), "missing {want:?} in\n{pumps}");
    }
    assert!(
        imaging.contains("  - from: workstations\n    proto: tcp\n    ports: [104]\n    app: dicom\n"),
        "{imaging}"
    );
    assert_eq!(pumps.matches("  - to: ").count() + pumps.matches("  - from: ").count(), 3, "{pumps}");
    let (ok, out, err) = cli(&["check", "--config", cfg]);
    assert!(ok && out.contains("ok (2 segments, 2 zones, 4 rules"), "{out}{err}");
    let status = agent.reload().unwrap();
    assert_eq!(status["last_reload_ok"], true, "{status:#}");

    // 3. Enforce: the same normal traffic passes, nothing is dropped.
    let drops = |a: &Agent| a.stat("policy_drop").unwrap().packets;
    let would = |a: &Agent| a.stat("policy_would_drop").unwrap().packets;
    let (d0, w0) = (drops(&agent), would(&agent));
    assert_eq!(d0, 0, "monitor mode never dropped");
    assert_eq!(normal_traffic(&topo), 2, "both DNS queries answered in enforce mode");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((drops(&agent), would(&agent)), (0, w0), "normal traffic is never denied");

    // 4. The attack: a 100-port SYN sweep of a pump, a pump asking an outside
    // resolver, RDP from a workstation to the modality, pump to pump.
    let outside = traffic::udp_receiver(topo.host(6), false, 53).unwrap();
    raw_syn(topo.host(5), &topo.gw, topo.host(1).v4(), 1000..1100);
    let tx = traffic::udp_socket(topo.host(1), false).unwrap();
    tx.send_to(&dns_query(), SocketAddr::new(topo.host(6).v4().into(), 53)).unwrap();
    raw_syn(topo.host(3), &topo.gw, topo.host(4).v4(), 3389..3390);
    raw_syn(topo.host(1), &topo.gw, topo.host(7).v4(), 8443..8444);
    let after =
        agent.wait_for(Duration::from_secs(10), |a| Ok(drops(a)), |&d| (d >= 103).then_some(d)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((after, drops(&agent)), (103, 103), "every attack packet dropped, once");
    assert_eq!(traffic::drain(&outside), 0);
    let flows = agent.flows().unwrap();
    let dropped = |dst: &str, port: u16| {
        flows.iter().any(|f| f.dst == dst && f.dport == port && f.verdict == "drop" && f.packets == 1)
    };
    assert!(dropped("10.0.1.2", 1000) && dropped("10.0.1.2", 1099), "{flows:#?}");
    assert!(dropped("10.0.6.2", 53) && dropped("10.0.4.2", 3389) && dropped("10.0.7.2", 8443), "{flows:#?}");

    // Each attack is one detection; normal traffic none (still learning: no new_*).
    let detections = |e: &Vec<Event>| -> BTreeMap<String, (String, String)> {
        e.iter()
            .filter(|e| !e.kind.starts_with("policy_") && e.kind != "incident")
            .map(|e| (e.kind.clone(), (e.dst.clone(), e.clinical_impact.clone())))
            .collect()
    };
    agent
        .wait_for(Duration::from_secs(20), |a| a.events(), |e| (detections(e).len() >= 4).then_some(()))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let events = agent.events().unwrap();
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        detections(&events),
        BTreeMap::from([
            ("east_west".into(), s("10.0.7.2", "life-critical")),
            ("external_dns".into(), s("10.0.6.2", "life-critical")),
            ("remote_access".into(), s("10.0.4.2", "high")),
            ("scan".into(), s("10.0.1.2", "life-critical")),
        ])
    );
    assert_eq!(
        events.iter().filter(|e| !e.kind.starts_with("policy_") && e.kind != "incident").count(),
        4,
        "{events:#?}"
    );
}

#[test]
fn after_the_learning_period_new_destinations_ports_and_apps_raise_one_event_each() {
    let topo = Topology::new(7).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions { policy: segments("6s"), ..Default::default() }).unwrap();
    // Learned: HL7 and DNS to the pharmacy, ICMP, DICOM into imaging.
    assert_eq!(normal_traffic(&topo), 2);
    agent
        .wait_for(
            Duration::from_secs(20),
            |a| Ok(baseline(a)),
            |s| s.segments.get("pumps").is_some_and(|p| !p.learning && p.observations >= 5).then_some(()),
        )
        .unwrap();
    // The same communication again: nothing is new.
    assert_eq!(normal_traffic(&topo), 2);
    // New: a port on a known peer, a peer never contacted, another app on a known port.
    tcp_exchange(&topo, 1, 2, 8080, &fixtures::load("http-get"));
    let tx = traffic::udp_socket(topo.host(7), false).unwrap();
    tx.send_to(b"hello", SocketAddr::new(topo.host(5).v4().into(), 5000)).unwrap();
    tcp_exchange(&topo, 1, 2, 2575, &fixtures::load("http-get"));

    let novelty = |e: &Event| e.kind.starts_with("new_");
    agent
        .wait_for(
            Duration::from_secs(20),
            |a| a.events(),
            |e| (e.iter().filter(|e| novelty(e)).count() >= 3).then_some(()),
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let events = agent.events().unwrap();
    let detections: Vec<&Event> =
        events.iter().filter(|e| !e.kind.starts_with("policy_") && e.kind != "incident").collect();
    let by: BTreeMap<&str, (&str, &str, u16, &str)> = detections
        .iter()
        .map(|e| (e.kind.as_str(), (e.src.as_str(), e.dst.as_str(), e.dport, e.app.as_str())))
        .collect();
    assert_eq!(detections.len(), 3, "{detections:#?}");
    assert_eq!(
        by,
        BTreeMap::from([
            ("new_app", ("10.0.1.2", "10.0.2.2", 2575, "http")),
            ("new_destination", ("10.0.7.2", "10.0.5.2", 5000, "unknown")),
            ("new_port", ("10.0.1.2", "10.0.2.2", 8080, "http")),
        ])
    );
    for e in &detections {
        assert_eq!((e.segment.as_str(), e.clinical_impact.as_str()), ("pumps", "life-critical"), "{e:#?}");
        assert!(e.mac.is_some() && e.evidence.contains("baseline of segment pumps"), "{e:#?}");
    }
    // The new communication is in the baseline now, so it is reported once.
    let m = agent.metrics().unwrap();
    assert_eq!(m.get(r#"mdsec_segment_learning{segment="pumps"}"#), Some(0.0));
    assert!(m.get(r#"mdsec_baseline_observations{segment="pumps"}"#).unwrap() >= 8.0);
}

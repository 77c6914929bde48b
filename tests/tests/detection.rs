//! Detections with real traffic through real XDP: a scan of the pump segment, a
//! pump resolving names through a resolver outside the internal list, RDP from a
//! workstation to an imaging modality, and normal traffic next to it. Exactly the
//! expected detection events, each with the triage matrix's clinical impact and
//! escalation, and nothing else.
//!
//! Topology: h1 = 10.0.1.2 infusion pump (segment pumps, enforce), h2 = 10.0.2.2
//! pharmacy and internal DNS, h3 = 10.0.3.2 clinical workstation, h4 = 10.0.4.2
//! imaging modality (segment imaging, monitor), h5 = 10.0.5.2 attacker,
//! h6 = 10.0.6.2 a resolver outside the internal list.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use mdsec_agent::surfaces::model::Event;
use mdsec_tests::{
    agent::{Agent, AgentOptions},
    frames::{self, RawSender, V4},
    netns::{Topology, link_mac},
    traffic::{self, dns_query, tcp_exchange},
};

const DETECTIONS: [&str; 7] = [
    "scan",
    "remote_access",
    "external_dns",
    "east_west",
    "decommissioned_device",
    "new_device",
    "rogue_device",
];

fn policy() -> Vec<(String, String)> {
    vec![
        (
            "zones.yaml".into(),
            "zones:\n  pharmacy: [10.0.2.0/24]\n  workstations: [10.0.3.0/24]\n".into(),
        ),
        (
            "pumps.yaml".into(),
            "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\nallow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n  - to: pharmacy\n    proto: udp\n    ports: [53]\n".into(),
        ),
        (
            "imaging.yaml".into(),
            "segment: imaging\nfunction: imaging-modality\nmode: monitor\ndefault: deny\nmembers:\n  - cidr: 10.0.4.0/24\nallow:\n  - from: workstations\n    proto: tcp\n    ports: [104]\n".into(),
        ),
    ]
}

#[test]
fn scan_outside_dns_and_rdp_raise_exactly_their_events_with_clinical_triage() {
    let topo = Topology::new(6).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: policy(),
            extra_yaml: "detection:\n  internal_resolvers: [10.0.2.2]\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(agent.generation().unwrap() >= 1, "{}", agent.log());

    // Normal traffic first: HL7 to pharmacy, DNS to the internal resolver, DICOM
    // from a workstation to the modality. None of it is a detection.
    tcp_exchange(&topo, 1, 2, 2575, b"\x0bMSH|^~\\&|PUMP|WARD3|PHARM|HOSP|20261123||ORU^R01|1|P|2.5\r\x1c\r");
    let rx = traffic::udp_receiver(topo.host(2), false, 53).unwrap();
    let tx = traffic::udp_socket(topo.host(1), false).unwrap();
    tx.send_to(&dns_query(), SocketAddr::new(topo.host(2).v4().into(), 53)).unwrap();
    tcp_exchange(&topo, 3, 4, 104, b"\x01\x00\x00\x00\x00\x44\x00\x01");

    // 1. The attacker sweeps 100 ports of the pump with SYNs.
    let h5 = topo.host(5);
    let raw = RawSender::open(&h5.ns, "eth0").unwrap();
    let (mac, gw_mac) = (h5.mac().unwrap(), link_mac(&topo.gw, &h5.gw_if).unwrap());
    for port in 1000..1100u16 {
        let l4 = frames::tcp(41000, port, 0x02, b"");
        let ip = V4::new(h5.v4(), Ipv4Addr::new(10, 0, 1, 2), 6).build(&l4);
        raw.send(&frames::eth(gw_mac, mac, &[], 0x0800, &ip)).unwrap();
    }
    // 2. The pump asks a resolver that is not the hospital's.
    let rogue = traffic::udp_receiver(topo.host(6), false, 53).unwrap();
    tx.send_to(&dns_query(), SocketAddr::new(topo.host(6).v4().into(), 53)).unwrap();
    // 3. A workstation opens RDP (X.224 connection request) to the modality.
    tcp_exchange(
        &topo,
        3,
        4,
        3389,
        b"\x03\x00\x00\x13\x0e\xe0\x00\x00\x00\x00\x00\x01\x00\x08\x00\x03\x00\x00\x00",
    );

    let wanted = |e: &Vec<Event>| {
        let n = |t: &str| e.iter().filter(|e| e.kind == t).count();
        (n("scan") >= 1 && n("external_dns") >= 1 && n("remote_access") >= 1).then(|| e.to_vec())
    };
    agent.wait_for(Duration::from_secs(20), |a| a.events(), wanted).unwrap();
    // Two more store passes: nothing else may turn up late.
    std::thread::sleep(Duration::from_secs(5));
    let events = agent.events().unwrap();
    let detections: Vec<&Event> = events.iter().filter(|e| DETECTIONS.contains(&e.kind.as_str())).collect();
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &detections {
        *by_type.entry(e.kind.as_str()).or_default() += 1;
    }
    assert_eq!(
        by_type,
        BTreeMap::from([("external_dns", 1), ("remote_access", 1), ("scan", 1)]),
        "{detections:#?}"
    );
    let get = |t: &str| *detections.iter().find(|e| e.kind == t).unwrap();

    let scan = get("scan");
    assert_eq!(
        (scan.src.as_str(), scan.dst.as_str(), scan.segment.as_str()),
        ("10.0.5.2", "10.0.1.2", "pumps")
    );
    assert_eq!((scan.clinical_impact.as_str(), scan.function.as_str()), ("life-critical", "infusion-pump"));
    assert_eq!(scan.escalation, "biomed on-call and charge nurse, immediately");

    let dns = get("external_dns");
    assert_eq!((dns.src.as_str(), dns.dst.as_str(), dns.dport), ("10.0.1.2", "10.0.6.2", 53));
    assert_eq!(dns.clinical_impact, "life-critical");
    assert!(dns.mac.is_some(), "the pump's MAC identifies the device");

    let rdp = get("remote_access");
    assert_eq!((rdp.src.as_str(), rdp.dst.as_str(), rdp.app.as_str()), ("10.0.3.2", "10.0.4.2", "rdp"));
    assert_eq!((rdp.segment.as_str(), rdp.clinical_impact.as_str()), ("imaging", "high"));
    assert_eq!(rdp.escalation, "biomed on-call and radiology lead, within 1 hour");

    // Every event, policy ones included, carries impact and escalation.
    assert!(events.iter().all(|e| !e.clinical_impact.is_empty() && !e.escalation.is_empty()), "{events:#?}");
    // The rest of the sweep is counted, not emitted.
    let m = agent.metrics().unwrap();
    assert!(m.get(r#"mdsec_events_suppressed_total{type="scan"}"#).unwrap() >= 80.0);
    assert_eq!(m.get(r#"mdsec_events_total{type="scan"}"#), Some(1.0));
    // The normal DNS answer path and the outside one both saw their query.
    assert_eq!(traffic::drain(&rx), 1);
    assert_eq!(traffic::drain(&rogue), 0, "the pump segment enforces: the outside query is dropped");
}

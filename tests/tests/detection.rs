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

/// Lateral movement outside the segments: h2 = 10.0.2.2 is the PACS, a
/// server in no segment but in the `pacs` clinical zone; h3 = 10.0.3.2 an
/// unknown laptop; h4 = 10.0.4.2 the IT jump host (`it-admin`, an admin zone).
#[test]
fn smb_from_an_unknown_laptop_to_the_pacs_raises_remote_access_with_the_pacs_clinical_impact() {
    let topo = Topology::new(4).unwrap();
    topo.warm_up().unwrap();
    let policy = vec![
        ("zones.yaml".into(), "zones:\n  pacs: [10.0.2.2/32]\n  it-admin: [10.0.4.0/24]\n".into()),
        (
            "pumps.yaml".into(),
            "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n"
                .into(),
        ),
    ];
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy,
            extra_yaml: "detection:\n  clinical_zones:\n    pacs: pacs\n  admin_zones: [it-admin]\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let pacs = SocketAddr::new(topo.host(2).v4().into(), 445);
    let associate = b"\x01\x00\x00\x00\x00\x44\x00\x01";
    // The laptop opens DICOM to the PACS (its first contact), then tries
    // SMB, where nothing listens (SYN, RST: the port says SMB).
    tcp_exchange(&topo, 3, 2, 104, associate);
    std::thread::sleep(Duration::from_millis(100));
    assert!(traffic::tcp_connect(topo.host(3), pacs).is_err(), "nothing listens on the PACS's 445");
    // VNC: no signature in the datapath, its port says it.
    std::thread::sleep(Duration::from_millis(100));
    assert!(traffic::tcp_connect(topo.host(3), SocketAddr::new(pacs.ip(), 5900)).is_err());
    // The jump host administers the PACS: SMB and RDP from the admin zone are expected.
    tcp_exchange(&topo, 4, 2, 445, &mdsec_tests::fixtures::load("smb2-negotiate"));
    assert!(traffic::tcp_connect(topo.host(4), SocketAddr::new(pacs.ip(), 3389)).is_err());
    // A second association of the laptop is no longer a first contact.
    tcp_exchange(&topo, 3, 2, 104, associate);

    let lateral = ["remote_access", "first_contact"];
    let wanted = |e: &Vec<Event>| {
        let n = |t: &str| e.iter().filter(|e| e.kind == t).count();
        (n("remote_access") >= 2 && n("first_contact") >= 1).then(|| e.to_vec())
    };
    agent.wait_for(Duration::from_secs(20), |a| a.events(), wanted).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let events = agent.events().unwrap();
    let found: Vec<&Event> = events
        .iter()
        .filter(|e| lateral.contains(&e.kind.as_str()) || DETECTIONS[..5].contains(&e.kind.as_str()))
        .collect();
    // Sorted: what one detection pass finds comes in the flow table's order.
    let mut seen: Vec<(&str, &str, &str, u16)> =
        found.iter().map(|e| (e.kind.as_str(), e.src.as_str(), e.dst.as_str(), e.dport)).collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("first_contact", "10.0.3.2", "10.0.2.2", 104),
            ("remote_access", "10.0.3.2", "10.0.2.2", 445),
            ("remote_access", "10.0.3.2", "10.0.2.2", 5900)
        ],
        "{found:#?}"
    );
    for e in &found {
        assert_eq!(
            (e.zone.as_str(), e.function.as_str(), e.clinical_impact.as_str(), e.segment.as_str()),
            ("pacs", "pacs", "high", ""),
            "{e:#?}"
        );
        assert_eq!(e.escalation, "clinical IT on-call, within 1 hour");
    }
    assert_eq!((found[1].app.as_str(), found[2].app.as_str()), ("smb", "vnc"));
    assert!(found[1].reason.contains("clinical server 10.0.2.2 (zone pacs)"), "{}", found[1].reason);
}

/// Runs a scapy snippet (Debian's python3-scapy) in `ns`: real frames, built
/// by a tool independent of ours.
fn scapy(ns: &str, code: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "/usr/bin/python3", "-c"])
        .arg(format!("from scapy.all import *\n{code}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "scapy: {}", String::from_utf8_lossy(&out.stderr));
}

/// Infrastructure roles only declared hosts may play: h3 = 10.0.3.2 is the
/// declared DHCP server and IPv6 router (by MAC); h2 = 10.0.2.2 answers DHCP
/// and h4 advertises itself as a router.
#[test]
fn dhcp_offers_and_router_advertisements_from_undeclared_hosts_are_rogue() {
    let topo = Topology::new(4).unwrap();
    topo.warm_up().unwrap();
    let router_mac = mdsec_agent::base::net::mac_string(topo.host(3).mac().unwrap());
    let rogue_mac = mdsec_agent::base::net::mac_string(topo.host(4).mac().unwrap());
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: policy(),
            extra_yaml: format!(
                "detection:\n  dhcp_servers: [10.0.3.2]\n  ipv6_routers: [\"{router_mac}\"]\n"
            ),
            ..Default::default()
        },
    )
    .unwrap();
    let offer = |ip: &str| {
        format!(
            "sendp([Ether(dst='ff:ff:ff:ff:ff:ff')/IP(src='{ip}',dst='255.255.255.255')/UDP(sport=67,dport=68)\
             /BOOTP(op=2,yiaddr='10.0.9.77',xid=7)/DHCP(options=[('message-type','offer'),('server_id','{ip}'),'end'])]*3,\
             iface='eth0',verbose=0)"
        )
    };
    let ra = |ll: &str| {
        format!(
            "sendp([Ether(dst='33:33:00:00:00:01')/IPv6(src='{ll}',dst='ff02::1')/ICMPv6ND_RA()\
             /ICMPv6NDOptSrcLLAddr(lladdr=get_if_hwaddr('eth0'))]*3,iface='eth0',verbose=0)"
        )
    };
    scapy(&topo.host(3).ns, &offer("10.0.3.2"));
    scapy(&topo.host(3).ns, &ra("fe80::3"));
    scapy(&topo.host(2).ns, &offer("10.0.2.2"));
    scapy(&topo.host(4).ns, &ra("fe80::4"));

    let rogue = ["rogue_dhcp_server", "rogue_router_advertisement"];
    let wanted = |e: &Vec<Event>| {
        (e.iter().filter(|e| rogue.contains(&e.kind.as_str())).count() >= 2).then(|| e.clone())
    };
    agent.wait_for(Duration::from_secs(20), |a| a.events(), wanted).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    // The declared host's frames were seen too (so their silence means something).
    let flows = agent.flows().unwrap();
    assert!(flows.iter().any(|f| f.src == "10.0.3.2" && f.sport == 67), "{flows:#?}");
    assert!(flows.iter().any(|f| f.src == "fe80::3" && f.proto == "icmpv6"), "{flows:#?}");
    let events = agent.events().unwrap();
    let found = mdsec_tests::agent::sorted_kinds(&events, &rogue);
    let h2_mac = mdsec_agent::base::net::mac_string(topo.host(2).mac().unwrap());
    assert_eq!(
        found,
        [
            ("rogue_dhcp_server".into(), "10.0.2.2".into(), Some(h2_mac)),
            ("rogue_router_advertisement".into(), "fe80::4".into(), Some(rogue_mac.clone()))
        ],
        "{events:#?}"
    );
    let e = events.iter().find(|e| e.kind == "rogue_dhcp_server").unwrap();
    assert_eq!((e.severity.as_str(), e.iface.as_str()), ("high", topo.host(2).gw_if.as_str()));
    assert!(e.reason.contains("not declared in detection.dhcp_servers"), "{}", e.reason);
    // Each is an incident of its sender.
    let incidents: Vec<mdsec_agent::surfaces::model::Incident> = agent.get("/api/v1/incidents").unwrap();
    let mut srcs: Vec<&str> = incidents.iter().map(|i| i.src.as_str()).collect();
    srcs.sort();
    assert_eq!(srcs, ["10.0.2.2", "fe80::4"]);
}

/// A gratuitous-ARP flood on a routed port, in real frames: h1 announces
/// its address 40 times in a burst, h2 three times (a normal host at
/// link-up). Only h1 is reported, once, as an incident of its own.
#[test]
fn a_gratuitous_arp_flood_is_reported_once_and_a_few_announcements_are_not() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions { policy: policy(), ..Default::default() }).unwrap();
    let announce = |h: u8, n: usize| {
        let ip = topo.host(h).v4();
        scapy(
            &topo.host(h).ns,
            &format!(
                "m=get_if_hwaddr('eth0')\nsendp([Ether(src=m,dst='ff:ff:ff:ff:ff:ff')/ARP(op=1,hwsrc=m,psrc='{ip}',pdst='{ip}')]*{n},iface='eth0',verbose=0)"
            ),
        )
    };
    announce(2, 3);
    announce(1, 40);
    let kinds = ["gratuitous_arp_flood"];
    let found = |e: &Vec<Event>| {
        let f = mdsec_tests::agent::sorted_kinds(e, &kinds);
        (!f.is_empty()).then_some(f)
    };
    agent.wait_for(Duration::from_secs(10), |a| a.events(), found).unwrap();
    // Another burst within dedup_secs is the same flood.
    announce(1, 40);
    std::thread::sleep(Duration::from_secs(5));
    let h1_mac = mdsec_agent::base::net::mac_string(topo.host(1).mac().unwrap());
    let events = agent.events().unwrap();
    assert_eq!(
        mdsec_tests::agent::sorted_kinds(&events, &kinds),
        [("gratuitous_arp_flood".to_string(), "10.0.1.2".to_string(), Some(h1_mac))],
        "{events:#?}"
    );
    let e = events.iter().find(|e| e.kind == "gratuitous_arp_flood").unwrap();
    assert_eq!((e.severity.as_str(), e.iface.as_str()), ("high", topo.host(1).gw_if.as_str()));
    // All 40, or (a store pass fell inside the burst) at least the threshold.
    let sent: u64 = e.reason.split(" sent ").nth(1).and_then(|r| r.split(' ').next()?.parse().ok()).unwrap();
    assert!((20..=40).contains(&sent) && e.reason.contains("gratuitous ARPs in"), "{}", e.reason);
    let incidents: Vec<mdsec_agent::surfaces::model::Incident> = agent.get("/api/v1/incidents").unwrap();
    assert_eq!(incidents.iter().map(|i| i.src.as_str()).collect::<Vec<_>>(), ["10.0.1.2"]);
}

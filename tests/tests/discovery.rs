//! Passive inventory: vendor from the OUI registry and the apps and peers each device
//! is seen with, from real traffic through the gateway.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use mdsec_tests::{
    agent::{Agent, AgentOptions},
    netns::{Topology, ip},
    traffic,
};

#[test]
fn devices_carry_vendor_apps_and_peers() {
    let topo = Topology::new(2).unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    // h1 is an infusion pump with a Baxter MAC (OUI 58:46:E1 in the IEEE registry).
    ip(&["-n", &h1.ns, "link", "set", "dev", "eth0", "address", "58:46:e1:00:00:07"]).unwrap();
    topo.warm_up().unwrap();
    // The operator says what h2 is.
    let h2_mac = mdsec_agent::base::net::mac_string(h2.mac().unwrap());
    let overrides = format!(
        "devices:\n  - mac: \"{h2_mac}\"\n    class: server\n    name: Pharmacy IS\n    model: PIS 7\n"
    );
    let agent = Agent::start(&topo, AgentOptions { extra_yaml: overrides, ..Default::default() }).unwrap();

    // HL7 over MLLP to the pharmacy on a non-standard port: recognised by its bytes.
    let listener = traffic::tcp_listener(h2, 6600).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 128];
        let n = s.read(&mut buf).unwrap();
        s.write_all(b"\x0bMSH|^~\\&|PHARMACY|HOSP|PUMP|WARD3|20261123||ACK|1|P|2.5\rMSA|AA|1\r\x1c\r")
            .unwrap();
        n
    });
    let mut c = traffic::tcp_connect(h1, SocketAddr::new(h2.v4().into(), 6600)).unwrap();
    c.write_all(b"\x0bMSH|^~\\&|PUMP|WARD3|PHARMACY|HOSP|20261123||ORU^R01|1|P|2.5\r\x1c\r").unwrap();
    let mut ack = [0u8; 16];
    c.read_exact(&mut ack).unwrap();
    assert!(server.join().unwrap() > 0);

    // A DHCP request from the pump (the real option layout of a DHCPDISCOVER).
    let dhcp = mdsec_tests::fixtures::load("dhcp-discover");
    let from: SocketAddr = "10.0.1.2:68".parse().unwrap();
    let sock = mdsec_tests::netns::bind_in(&h1.ns, move || std::net::UdpSocket::bind(from)).unwrap();
    sock.send_to(&dhcp, "10.0.1.1:67").unwrap();

    let devices = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.devices(),
            |d| {
                // The fingerprint comes through the SAMPLES ring at once, the app
                // with the next flow poll: wait for both.
                let pump_ready = d.iter().any(|d| {
                    d.mac == "58:46:e1:00:00:07"
                        && d.fingerprints.contains_key("dhcp.hostname")
                        && d.apps_client.contains(&"dhcp".to_string())
                });
                let server_ready = d.iter().any(|d| d.apps_server.contains(&"hl7".to_string()));
                (pump_ready && server_ready).then(|| d.clone())
            },
        )
        .unwrap();
    let pump = devices.iter().find(|d| d.mac == "58:46:e1:00:00:07").expect("pump device");
    assert_eq!(pump.vendor.as_deref(), Some("Baxter International Inc"));
    assert_eq!(pump.apps_client, vec!["dhcp", "hl7"]);
    assert!(pump.peers.contains(&"10.0.2.2".to_string()), "{pump:?}");
    assert_eq!(pump.class, "infusion-pump");
    let fp = |k: &str| pump.fingerprints.get(k).map(String::as_str);
    assert_eq!(fp("hl7.sending_application"), Some("PUMP"), "{:?}", pump.fingerprints);
    assert_eq!(fp("hl7.sending_facility"), Some("WARD3"));
    assert_eq!(fp("dhcp.hostname"), Some("pump07"));
    assert_eq!(fp("dhcp.vendor_class"), Some("Alaris-8"));
    assert!(pump.confidence >= 0.8 && pump.evidence.len() == 2, "{pump:?}");
    let pharmacy = devices.iter().find(|d| d.ips.contains(&"10.0.2.2".to_string())).expect("pharmacy device");
    assert!(pharmacy.apps_server.contains(&"hl7".to_string()), "{pharmacy:?}");
    // veth MACs are locally administered: no vendor.
    assert_eq!(pharmacy.vendor, None);
    assert_eq!(
        (pharmacy.class.as_str(), pharmacy.confidence, pharmacy.name.as_deref(), pharmacy.model.as_deref()),
        ("server", 1.0, Some("Pharmacy IS"), Some("PIS 7"))
    );
    let flow = agent.flows().unwrap().into_iter().find(|f| f.dport == 6600).unwrap();
    assert_eq!((flow.app.as_str(), flow.app_confidence.as_str()), ("hl7", "high"));
}

#[test]
fn the_inventory_survives_an_agent_crash() {
    let topo = Topology::new(2).unwrap();
    let h1 = topo.host(1);
    ip(&["-n", &h1.ns, "link", "set", "dev", "eth0", "address", "00:a0:aa:00:00:42"]).unwrap();
    topo.warm_up().unwrap();
    let state = std::env::temp_dir().join(format!("{}-state", topo.id));
    let opts = || AgentOptions { state_dir: Some(state.clone()), ..Default::default() };
    let first = Agent::start(&topo, opts()).unwrap();
    h1.exec(&["ping", "-c", "2", "-i", "0.2", "10.0.2.2"]).unwrap();
    let seen = first
        .wait_for(
            Duration::from_secs(10),
            |a| a.devices(),
            |d| {
                d.iter()
                    .find(|d| d.mac == "00:a0:aa:00:00:42" && d.ips.contains(&"10.0.1.2".to_string()))
                    .cloned()
            },
        )
        .unwrap();
    // Past one flush interval (2 s), then a crash: nothing runs at exit.
    std::thread::sleep(Duration::from_millis(2500));
    first.crash();

    let second = Agent::start(&topo, opts()).unwrap();
    let d = second
        .devices()
        .unwrap()
        .into_iter()
        .find(|d| d.mac == "00:a0:aa:00:00:42")
        .expect("device from the database");
    assert_eq!(d.vendor.as_deref(), Some("SPACELABS MEDICAL"));
    assert!(d.ips.contains(&"10.0.1.2".to_string()));
    assert!(d.first_seen <= seen.first_seen, "{} > {}", d.first_seen, seen.first_seen);
    drop(second);
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
fn undeclared_and_late_devices_raise_rogue_and_new_device_events() {
    use mdsec_tests::frames::{self, RawSender, V4};
    let topo = Topology::new(2).unwrap();
    let h1 = topo.host(1);
    ip(&["-n", &h1.ns, "link", "set", "dev", "eth0", "address", "58:46:e1:00:00:07"]).unwrap();
    topo.warm_up().unwrap();
    // The pump segment declares its one pump by MAC; learning is already over.
    let seg = "segment: pumps\nfunction: infusion-pump\nmode: monitor\ndefault: deny\nlearning_period: 0s\nmembers:\n  - cidr: 10.0.1.0/24\n  - mac: \"58:46:e1:00:00:07\"\n";
    let agent = Agent::start(
        &topo,
        AgentOptions { policy: vec![("pumps.yaml".into(), seg.into())], ..Default::default() },
    )
    .unwrap();
    h1.exec(&["ping", "-c", "1", "10.0.2.2"]).unwrap();
    // An intruder in the pump subnet: another MAC with a pump-range address.
    let gw_mac = mdsec_tests::netns::link_mac(&topo.gw, &h1.gw_if).unwrap();
    let ipd = V4::new("10.0.1.77".parse().unwrap(), "10.0.2.2".parse().unwrap(), 17)
        .build(&frames::udp(5000, 9000, &[0; 8]));
    RawSender::open(&h1.ns, "eth0")
        .unwrap()
        .send(&frames::eth(gw_mac, [0x02, 0, 0, 0, 0, 0x66], &[], 0x0800, &ipd))
        .unwrap();

    agent.wait_for(Duration::from_secs(10), |a| a.events(), |e| (e.len() >= 3).then_some(())).unwrap();
    // One more flush interval: nothing is reported twice.
    std::thread::sleep(Duration::from_millis(2500));
    let events =
        agent.events().unwrap().into_iter().filter(|e| e.kind.ends_with("_device")).collect::<Vec<_>>();
    let mut got: Vec<(String, String)> =
        events.iter().map(|e| (e.kind.clone(), e.mac.clone().unwrap_or_default())).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("new_device".to_string(), "02:00:00:00:00:66".to_string()),
            ("new_device".to_string(), "58:46:e1:00:00:07".to_string()),
            ("rogue_device".to_string(), "02:00:00:00:00:66".to_string()),
        ],
        "{events:#?}"
    );
    let rogue = events.iter().find(|e| e.kind == "rogue_device").unwrap();
    assert_eq!((rogue.segment.as_str(), rogue.src.as_str()), ("pumps", "10.0.1.77"));
}

/// The client is the side that opened the connection, whatever the ports: a
/// TLS client on local port 1000 talking to a service on 8443 speaks TLS as a
/// client, and the service answers it as a server (the lower-port rule alone
/// would have it the other way round).
#[test]
fn the_side_that_opened_the_connection_is_the_client() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let hello = mdsec_tests::fixtures::load("tls-client-hello-sni");
    let listener = traffic::tcp_listener(h2, 8443).unwrap();
    let n = hello.len();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"ok").unwrap();
    });
    let mut c = traffic::tcp_connect_from(h1, 1000, SocketAddr::new(h2.v4().into(), 8443)).unwrap();
    c.write_all(&hello).unwrap();
    let mut back = [0u8; 2];
    c.read_exact(&mut back).unwrap();
    server.join().unwrap();

    let (m1, m2) = (
        mdsec_agent::base::net::mac_string(h1.mac().unwrap()),
        mdsec_agent::base::net::mac_string(h2.mac().unwrap()),
    );
    let has = |v: &[String]| v.iter().any(|a| a == "tls");
    let devices = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.devices(),
            |d| {
                d.iter()
                    .any(|d| d.mac == m1 && (has(&d.apps_client) || has(&d.apps_server)))
                    .then(|| d.to_vec())
            },
        )
        .unwrap();
    let client = devices.iter().find(|d| d.mac == m1).unwrap();
    assert!(has(&client.apps_client) && !has(&client.apps_server), "{client:?}");
    let service = devices.iter().find(|d| d.mac == m2).unwrap();
    assert!(has(&service.apps_server) && !has(&service.apps_client), "{service:?}");
}

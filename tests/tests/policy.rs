//! Segment policy through real XDP: allow, default deny, monitor vs enforce, replies,
//! identities (longest prefix, VLAN scope, IPv6), exceptions, app rules, events.
//!
//! Topology: h1 = 10.0.1.2 (infusion pumps), h2 = 10.0.2.2 (pharmacy),
//! h3 = 10.0.3.2 (workstations); the gateway routes between them.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::Duration,
};

use mdsec_tests::{
    agent::{Agent, AgentOptions},
    netns::Topology,
    traffic,
};

const WAIT: Duration = Duration::from_secs(10);

fn zones() -> (String, String) {
    (
        "zones.yaml".into(),
        "zones:\n  pharmacy: [10.0.2.0/24, fd00:0:0:2::/64]\n  workstations: [10.0.3.0/24]\n".into(),
    )
}

fn pumps(mode: &str, extra_rules: &str) -> (String, String) {
    (
        "pumps.yaml".into(),
        format!(
            "segment: pumps\nfunction: infusion-pump\nmode: {mode}\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: fd00:0:0:1::/64\nallow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n  - to: pharmacy\n    proto: udp\n    ports: [9000, \"9100-9110\"]\n{extra_rules}"
        ),
    )
}

fn start(topo: &Topology, policy: Vec<(String, String)>) -> Agent {
    topo.warm_up().unwrap();
    let a = Agent::start(topo, AgentOptions { policy, ..Default::default() }).unwrap();
    assert!(a.generation().unwrap() >= 1, "no policy loaded:\n{}", a.log());
    a
}

/// Sends `n` datagrams from h`from` to h`to`:`port` and returns how many arrived.
fn udp(topo: &Topology, from: u8, to: u8, port: u16, n: usize, v6: bool) -> usize {
    let rx = traffic::udp_receiver(topo.host(to), v6, port).unwrap();
    let tx = traffic::udp_socket(topo.host(from), v6).unwrap();
    traffic::send_and_settle(&tx, SocketAddr::new(topo.host(to).ip(v6), port), n, 64).unwrap();
    traffic::drain(&rx)
}

fn stat(a: &Agent, name: &str) -> u64 {
    a.stat(name).unwrap().packets
}

#[test]
fn enforce_allows_rules_and_replies_and_drops_the_rest() {
    let topo = Topology::new(3).unwrap();
    let agent = start(&topo, vec![zones(), pumps("enforce", "")]);

    // Allowed: pump → pharmacy UDP 9000 and a port inside 9100-9110.
    assert_eq!(udp(&topo, 1, 2, 9000, 50, false), 50);
    assert_eq!(udp(&topo, 1, 2, 9105, 50, false), 50);
    // Allowed TCP with replies: a full exchange works.
    let listener = traffic::tcp_listener(topo.host(2), 2575).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"ACK").unwrap();
    });
    let mut c = traffic::tcp_connect(topo.host(1), SocketAddr::new(topo.host(2).v4().into(), 2575)).unwrap();
    c.write_all(b"MSH|^").unwrap();
    let mut back = [0u8; 3];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ACK");
    server.join().unwrap();

    // Denied by default: another port, and traffic into the segment.
    let drops_before = stat(&agent, "policy_drop");
    assert_eq!(udp(&topo, 1, 2, 9001, 40, false), 0);
    assert_eq!(udp(&topo, 3, 1, 9000, 30, false), 0);
    // Zone to zone: no segment involved, not policed.
    assert_eq!(udp(&topo, 3, 2, 9001, 20, false), 20);

    let s = agent
        .wait_for(WAIT, |a| a.stats(), |s| (s["policy_drop"].packets >= drops_before + 70).then(|| s.clone()))
        .unwrap();
    assert_eq!(s["policy_drop"].packets, drops_before + 70);
    assert_eq!(s["policy_would_drop"].packets, 0);
    let events = agent.wait_for(WAIT, |a| a.events(), |e| (e.len() >= 2).then(|| e.clone())).unwrap();
    // One event per denied flow, not per packet.
    assert_eq!(events.len(), 2, "{events:#?}");
    let e = events.iter().find(|e| e.dport == 9001).expect("event for the denied port");
    assert_eq!(
        (e.kind.as_str(), e.segment.as_str(), e.rule.as_str(), e.reason.as_str()),
        ("policy_drop", "pumps", "default", "default_deny")
    );
    assert_eq!((e.src.as_str(), e.dst.as_str(), e.proto.as_str()), ("10.0.1.2", "10.0.2.2", "udp"));
    let e = events.iter().find(|e| e.dport == 9000).expect("event for traffic into the segment");
    assert_eq!((e.src.as_str(), e.segment.as_str()), ("10.0.3.2", "pumps"));

    // The API shows each flow's verdict and the rule that decided.
    let flows = agent.flows().unwrap();
    let allowed = flows.iter().find(|f| f.dport == 9000 && f.src == "10.0.1.2").unwrap();
    assert_eq!(allowed.verdict, "allow");
    assert!(allowed.rule.contains("pumps.yaml:"), "{allowed:?}");
    let reply = flows.iter().find(|f| f.sport == 2575 && f.src == "10.0.2.2").unwrap();
    assert_eq!(reply.verdict, "reply");
    let denied = flows.iter().find(|f| f.dport == 9001 && f.src == "10.0.1.2").unwrap();
    assert_eq!(
        (denied.verdict.as_str(), denied.rule.as_str(), denied.segment.as_str()),
        ("drop", "default", "pumps")
    );
    assert_eq!(denied.packets, 40, "dropped packets are still counted");
}

#[test]
fn monitor_passes_and_counts_would_drops() {
    let topo = Topology::new(3).unwrap();
    let agent = start(&topo, vec![zones(), pumps("monitor", "")]);
    assert_eq!(udp(&topo, 1, 2, 9001, 40, false), 40);
    assert_eq!(udp(&topo, 1, 2, 9000, 10, false), 10);
    let s = agent
        .wait_for(WAIT, |a| a.stats(), |s| (s["policy_would_drop"].packets >= 40).then(|| s.clone()))
        .unwrap();
    assert_eq!((s["policy_would_drop"].packets, s["policy_drop"].packets, s["drop"].packets), (40, 0, 0));
    let events = agent.wait_for(WAIT, |a| a.events(), |e| (!e.is_empty()).then(|| e.clone())).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].kind.as_str(), events[0].dport), ("policy_would_drop", 9001));
}

#[test]
fn longest_prefix_identity_and_ipv6_rules() {
    let topo = Topology::new(3).unwrap();
    let h2 = topo.host(2);
    // A second pharmacy address with its own, more specific zone.
    mdsec_tests::netns::ip(&["-n", &h2.ns, "addr", "add", "10.0.2.3/24", "dev", "eth0"]).unwrap();
    let z = (
        "zones.yaml".to_string(),
        "zones:\n  pharmacy: [10.0.2.0/24, fd00:0:0:2::/64]\n  pharmacy-db: [10.0.2.3/32]\n  workstations: [10.0.3.0/24]\n".to_string(),
    );
    let agent =
        start(&topo, vec![z, pumps("enforce", "  - to: pharmacy-db\n    proto: udp\n    ports: [9200]\n")]);
    let send = |dst: &str, port: u16| {
        let addr: SocketAddr = format!("{dst}:{port}").parse().unwrap();
        let rx =
            mdsec_tests::netns::in_netns(&h2.ns, move || std::net::UdpSocket::bind(addr)).unwrap().unwrap();
        let tx = traffic::udp_socket(topo.host(1), false).unwrap();
        traffic::send_and_settle(&tx, addr, 10, 32).unwrap();
        traffic::drain(&rx)
    };
    // The /32 is inside `pharmacy`, so pharmacy rules cover it too…
    assert_eq!(send("10.0.2.3", 9000), 10);
    // …and its own rule applies to it alone.
    assert_eq!(send("10.0.2.3", 9200), 10);
    assert_eq!(send("10.0.2.2", 9200), 0);
    // IPv6: the same rules by IPv6 prefix.
    assert_eq!(udp(&topo, 1, 2, 9000, 10, true), 10);
    assert_eq!(udp(&topo, 1, 2, 9002, 10, true), 0);
    assert_eq!(stat(&agent, "policy_drop"), 20);
}

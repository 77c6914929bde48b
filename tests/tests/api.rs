//! The list API at scale: 100,000 real flows through real XDP, read back
//! page by page while more arrive, filtered, exported as NDJSON, and bad
//! parameters refused with a 400 naming them.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use mdsec_agent::surfaces::model::{Device, Event, Flow};
use mdsec_tests::{
    agent::{Agent, AgentOptions},
    frames::{self, RawSender, V4},
    netns::{Topology, link_mac},
};

/// Sends one UDP frame per (source address, source port) from `mac`.
fn send_flows(tx: &RawSender, gw: [u8; 6], mac: [u8; 6], srcs: &[Ipv4Addr], ports: std::ops::Range<u16>) {
    for src in srcs {
        for sport in ports.clone() {
            let ip = V4::new(*src, Ipv4Addr::new(10, 0, 9, 9), 17).build(&frames::udp(sport, 9999, b"x"));
            tx.send(&frames::eth(gw, mac, &[], 0x0800, &ip)).unwrap();
        }
    }
}

type Key = (String, String, u16, u16);

fn key(f: &Flow) -> Key {
    (f.src.clone(), f.dst.clone(), f.sport, f.dport)
}

#[test]
fn pages_filters_and_the_export_hold_at_100k_flows() {
    let topo = Topology::new(1).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions { extra_yaml: "maps:\n  flows: 262144\n".into(), ..Default::default() },
    )
    .unwrap();
    let h1 = topo.host(1);
    let gw = link_mac(&topo.gw, &h1.gw_if).unwrap();
    let mac = h1.mac().unwrap();
    let tx = RawSender::open(&h1.ns, "eth0").unwrap();
    // 100,000 flows from the host, 10 from a second device (its own MAC and address).
    let srcs = [Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 1, 3)];
    send_flows(&tx, gw, mac, &srcs, 10_000..60_000);
    let other = [0x02, 0, 0, 0, 0, 0x99];
    send_flows(&tx, gw, other, &[Ipv4Addr::new(10, 0, 1, 99)], 1000..1010);
    let total = 100_010;
    let all: Vec<Flow> = agent
        .wait_for(
            Duration::from_secs(60),
            |a| a.flows(),
            |f: &Vec<Flow>| (f.iter().filter(|f| f.dport == 9999).count() == total).then(|| f.clone()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let ours: HashSet<Key> = all.iter().filter(|f| f.dport == 9999).map(key).collect();
    assert_eq!(ours.len(), total, "the export repeats no flow");

    // Pages of 7,000 while 5,000 more flows arrive: every flow that existed
    // before the walk comes exactly once, nothing twice.
    let mut seen: Vec<Key> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/flows?limit=7000&cursor={c}"),
            None => "/api/v1/flows?limit=7000".into(),
        };
        let (status, items, next) = agent.page::<Flow>(&path).unwrap();
        assert_eq!(status, 200, "{items:?}");
        let items = items.unwrap();
        assert!(items.len() <= 7000);
        seen.extend(items.iter().map(key));
        pages += 1;
        if pages == 3 {
            send_flows(&tx, gw, mac, &[Ipv4Addr::new(10, 0, 1, 4)], 20_000..25_000);
            std::thread::sleep(Duration::from_millis(500));
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let unique: HashSet<&Key> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a flow was repeated across pages");
    let missing = ours.iter().filter(|k| !unique.contains(k)).count();
    assert_eq!(missing, 0, "flows lost across pages");
    assert!(pages >= 15, "{pages} pages of 7,000 for over 100,000 flows");

    // Filters.
    let (s, mine, _) = agent.page::<Flow>("/api/v1/flows?mac=02:00:00:00:00:99").unwrap();
    let mine = mine.unwrap();
    assert_eq!((s, mine.len()), (200, 10), "the second device's own flows");
    assert!(mine.iter().all(|f| f.src == "10.0.1.99"));
    let (_, by_ip, _) = agent.page::<Flow>("/api/v1/flows?ip=10.0.1.99&limit=100").unwrap();
    assert_eq!(by_ip.unwrap().len(), 10);
    let (_, none, next) = agent.page::<Flow>("/api/v1/flows?verdict=drop").unwrap();
    assert_eq!((none.unwrap().len(), next), (0, None), "no policy: nothing dropped");
    let t0 = Instant::now();
    let (_, one, _) = agent.page::<Flow>("/api/v1/flows?ip=10.0.1.3&since=10m&limit=50").unwrap();
    assert_eq!(one.unwrap().len(), 50);
    eprintln!("filtered page of 50 over {} flows: {:?}", total + 5000, t0.elapsed());
    let (_, devs, _) = agent.page::<Device>("/api/v1/devices?mac=02:00:00:00:00:99").unwrap();
    let devs = devs.unwrap();
    assert_eq!(devs.len(), 1);
    assert_eq!(devs[0].ips, vec!["10.0.1.99".to_string()]);

    // The export streams every flow while /healthz keeps answering.
    let addr = agent.addr;
    let gwns = agent.gw.clone();
    let health = std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            let mut s = mdsec_tests::netns::in_netns(&gwns, move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            })
            .unwrap()
            .unwrap();
            let body = mdsec_agent::surfaces::client::request(&mut s, addr, "/healthz").unwrap();
            assert_eq!(body, b"ok\n");
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        worst
    });
    let exported: Vec<Flow> = agent.ndjson("/api/v1/flows?format=ndjson").unwrap();
    let worst = health.join().unwrap();
    assert!(exported.len() >= total + 5000, "{}", exported.len());
    let keys: HashSet<Key> = exported.iter().map(key).collect();
    assert_eq!(keys.len(), exported.len(), "the export repeats no flow");
    assert!(worst < Duration::from_secs(1), "/healthz took {worst:?} during the export");
    let limited: Vec<Flow> = agent.ndjson("/api/v1/flows?format=ndjson&mac=02:00:00:00:00:99").unwrap();
    assert_eq!(limited.len(), 10);
}

#[test]
fn bad_parameters_are_a_400_naming_the_parameter() {
    let topo = Topology::new(1).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    for (path, param) in [
        ("/api/v1/flows?mac=58:46:e1", "mac"),
        ("/api/v1/flows?ip=10.0.0.300", "ip"),
        ("/api/v1/flows?verdict=dropped", "verdict"),
        ("/api/v1/flows?app=nosuchapp", "app"),
        ("/api/v1/flows?since=yesterday", "since"),
        ("/api/v1/flows?limit=0", "limit"),
        ("/api/v1/flows?limit=20000", "limit"),
        ("/api/v1/flows?cursor=x", "cursor"),
        ("/api/v1/flows?format=xml", "format"),
        ("/api/v1/flows?iface=nope0", "iface"),
        ("/api/v1/flows?segment=pumps", "segment"),
        ("/api/v1/flows?colour=red", "colour"),
        ("/api/v1/devices?verdict=drop", "verdict"),
        ("/api/v1/devices?cursor=garbage", "cursor"),
        ("/api/v1/events?type=bogus", "type"),
        ("/api/v1/events?since=yesterday", "since"),
    ] {
        let (status, body) = agent.request("GET", path, None).unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "{path}: {body}");
        let err: serde_json::Value = serde_json::from_str(&body).unwrap();
        let msg = err["error"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{param}: ")), "{path}: {msg}");
    }
    // Good ones still answer.
    let (s, ev, _) = agent.page::<Event>("/api/v1/events?since=0&limit=5").unwrap();
    assert_eq!((s, ev.is_ok()), (200, true));
    let (s, _, _) = agent.page::<Flow>(&format!("/api/v1/flows?iface={}", topo.host(1).gw_if)).unwrap();
    assert_eq!(s, 200);
}

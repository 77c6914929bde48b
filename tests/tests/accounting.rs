//! Exact counts through real XDP on real veths, read back through the agent's API.
//! Each test builds its own gateway + hosts in fresh network namespaces.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use mdsec_agent::surfaces::model::Flow;
use mdsec_tests::{
    agent::{Agent, AgentOptions},
    frames::{self, RawSender, TPID_8021Q, V4},
    netns::{Topology, link_mac},
    traffic::{self, Tap},
};

const WAIT: Duration = Duration::from_secs(10);

/// What identifies a flow in the API.
struct Id<'a> {
    iface: &'a str,
    src: &'a str,
    dst: &'a str,
    proto: &'a str,
    sport: u16,
    dport: u16,
}

impl Id<'_> {
    fn matches(&self, f: &Flow) -> bool {
        f.iface == self.iface
            && f.src == self.src
            && f.dst == self.dst
            && f.proto == self.proto
            && f.sport == self.sport
            && f.dport == self.dport
    }
}

/// Waits until the flow reaches `packets`; callers then check it is exact.
fn wait_flow(agent: &Agent, id: Id, packets: u64) -> Flow {
    agent
        .wait_for(
            WAIT,
            |a| a.flows(),
            |flows| flows.iter().find(|f| id.matches(f) && f.packets >= packets).cloned(),
        )
        .unwrap_or_else(|e| {
            panic!(
                "flow {}:{} -> {}:{} on {}: {e}\nagent log:\n{}",
                id.src,
                id.sport,
                id.dst,
                id.dport,
                id.iface,
                agent.log()
            )
        })
}

fn udp_flow_exact(v6: bool) {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    let _rx = traffic::udp_receiver(h2, v6, 9000).unwrap();
    let tx = traffic::udp_socket(h1, v6).unwrap();
    let to = SocketAddr::new(h2.ip(v6), 9000);
    traffic::send_udp(&tx, to, 1000, 200).unwrap();
    let sport = tx.local_addr().unwrap().port();
    let f = wait_flow(
        &agent,
        Id {
            iface: &h1.gw_if,
            src: &h1.ip(v6).to_string(),
            dst: &h2.ip(v6).to_string(),
            proto: "udp",
            sport,
            dport: 9000,
        },
        1000,
    );
    let l3 = if v6 { 40 } else { 20 };
    assert_eq!(f.packets, 1000);
    assert_eq!(f.bytes, 1000 * (14 + l3 + 8 + 200));
    assert_eq!(f.vlan, 0);
    assert!(f.first_seen <= f.last_seen && f.first_seen.ends_with('Z'), "{f:?}");
    // The sender shows up as a device with its address.
    let devices = agent.devices().unwrap();
    let mac = mdsec_agent::base::net::mac_string(h1.mac().unwrap());
    let d = devices.iter().find(|d| d.mac == mac && d.iface == h1.gw_if).expect("sender device");
    assert!(d.ips.contains(&h1.ip(v6).to_string()), "{d:?}");
    assert!(d.packets >= 1000 && d.bytes >= f.bytes, "{d:?}");
}

#[test]
fn udp_ipv4_flow_counts_exactly() {
    udp_flow_exact(false);
}

#[test]
fn udp_ipv6_flow_counts_exactly() {
    udp_flow_exact(true);
}

/// Raw frames with every byte chosen: a VLAN-tagged flow and an IPv4 flow with options.
#[test]
fn vlan_tagged_and_ipv4_options_flows_count_exactly() {
    let topo = Topology::new(1).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let h1 = topo.host(1);
    let gw_mac = link_mac(&topo.gw, &h1.gw_if).unwrap();
    let src_mac = h1.mac().unwrap();
    let tx = RawSender::open(&h1.ns, "eth0").unwrap();
    let (a, b) = (Ipv4Addr::new(10, 100, 0, 5), Ipv4Addr::new(10, 200, 0, 9));

    let tagged = frames::eth(
        gw_mac,
        src_mac,
        &[(TPID_8021Q, 100)],
        0x0800,
        &V4::new(a, b, 17).build(&frames::udp(5555, 6666, &[1; 200])),
    );
    assert_eq!(tagged.len(), 18 + 20 + 8 + 200);
    let mut with_opts = V4::new(a, b, 17);
    with_opts.options = vec![1, 1, 1, 0, 0, 0, 0, 0]; // NOP NOP NOP EOL + padding
    let opts =
        frames::eth(gw_mac, src_mac, &[], 0x0800, &with_opts.build(&frames::udp(7777, 8888, &[2; 200])));
    assert_eq!(opts.len(), 14 + 28 + 8 + 200);
    for i in 0..1000 {
        tx.send(&tagged).unwrap();
        tx.send(&opts).unwrap();
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let f = wait_flow(
        &agent,
        Id { iface: &h1.gw_if, src: "10.100.0.5", dst: "10.200.0.9", proto: "udp", sport: 5555, dport: 6666 },
        1000,
    );
    assert_eq!((f.vlan, f.packets, f.bytes), (100, 1000, 1000 * 246));
    let f = wait_flow(
        &agent,
        Id { iface: &h1.gw_if, src: "10.100.0.5", dst: "10.200.0.9", proto: "udp", sport: 7777, dport: 8888 },
        1000,
    );
    assert_eq!((f.vlan, f.packets, f.bytes), (0, 1000, 1000 * 250));
    // A poll reads the counters before the flow tables, so they may trail the
    // flows by one poll: wait for them to reach the count, then check it exactly.
    let s = agent.wait_for(WAIT, |a| a.stat("vlan_tagged"), |s| (s.packets >= 1000).then_some(*s)).unwrap();
    assert_eq!((s.packets, s.bytes), (1000, 1000 * 246));
}

/// A TCP connection is two flows, one per direction, each counted on the gateway
/// interface it arrives on. The oracle is an AF_PACKET tap on each sender.
#[test]
fn tcp_connection_is_two_exact_flows() {
    tcp_two_flows("driver");
}

#[test]
fn tcp_connection_is_two_exact_flows_in_generic_mode() {
    tcp_two_flows("skb");
}

fn tcp_two_flows(xdp_mode: &'static str) {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions { xdp_mode, ..Default::default() }).unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    let (tap1, tap2) = (Tap::open(h1).unwrap(), Tap::open(h2).unwrap());
    let listener = traffic::tcp_listener(h2, 7000).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&buf[..1000]).unwrap();
        buf.len()
    });
    let mut c = traffic::tcp_connect(h1, SocketAddr::new(h2.v4().into(), 7000)).unwrap();
    let client = c.local_addr().unwrap();
    let server_addr = SocketAddr::new(h2.v4().into(), 7000);
    c.write_all(&vec![7u8; 100_000]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!((server.join().unwrap(), back.len()), (100_000, 1000));
    drop(c);
    std::thread::sleep(Duration::from_millis(300));

    let up = tap1.tally(6, client, server_addr);
    let down = tap2.tally(6, server_addr, client);
    assert!(up.packets > 10 && down.packets > 2, "{up:?} {down:?}");
    let (cs, ss) = (client.ip().to_string(), server_addr.ip().to_string());
    let f_up = wait_flow(
        &agent,
        Id { iface: &h1.gw_if, src: &cs, dst: &ss, proto: "tcp", sport: client.port(), dport: 7000 },
        up.packets,
    );
    let f_down = wait_flow(
        &agent,
        Id { iface: &h2.gw_if, src: &ss, dst: &cs, proto: "tcp", sport: 7000, dport: client.port() },
        down.packets,
    );
    assert_eq!((f_up.packets, f_up.bytes), (up.packets, up.bytes));
    assert_eq!((f_down.packets, f_down.bytes), (down.packets, down.bytes));
    for f in [&f_up, &f_down] {
        for flag in ["SYN", "ACK", "FIN"] {
            assert!(f.tcp_flags.iter().any(|x| x == flag), "{flag} missing in {f:?}");
        }
    }
}

/// Documented rule: every fragment is accounted to the flow of its datagram (the
/// first fragment's ports); see docs/ARCHITECTURE.md.
#[test]
fn fragmented_datagrams_count_on_their_flow() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    let _rx = traffic::udp_receiver(h2, false, 9100).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    // 3000 bytes of UDP payload over a 1500 MTU: IP payload 3008 = 1480 + 1480 + 48.
    traffic::send_udp(&tx, SocketAddr::new(h2.v4().into(), 9100), 10, 3000).unwrap();
    let sport = tx.local_addr().unwrap().port();
    let f = wait_flow(
        &agent,
        Id {
            iface: &h1.gw_if,
            src: &h1.v4().to_string(),
            dst: &h2.v4().to_string(),
            proto: "udp",
            sport,
            dport: 9100,
        },
        30,
    );
    assert_eq!((f.packets, f.bytes), (30, 10 * (1514 + 1514 + 14 + 20 + 48)));
    // A poll reads the counters before the flow table (which is then at least
    // as new): the frames a flow shows may reach the counters a poll later.
    agent.wait_for(WAIT, |a| a.stat("fragment_matched"), |c| (c.packets >= 20).then_some(())).unwrap();
    assert_eq!(agent.stat("fragment_first").unwrap().packets, 10);
    assert_eq!(agent.stat("fragment_matched").unwrap().packets, 20);
    assert_eq!(agent.stat("fragment_bucket").unwrap().packets, 0);
}

/// Garbage and truncated frames are counted by reason; the agent keeps running
/// and a legitimate flow sent at the same time is counted exactly.
#[test]
fn malformed_frames_are_counted_and_do_not_disturb_good_flows() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let mut agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let (h1, h2, h3) = (topo.host(1), topo.host(2), topo.host(3));
    let gw_mac = link_mac(&topo.gw, &h3.gw_if).unwrap();
    let bad_mac = h3.mac().unwrap();
    let raw = RawSender::open(&h3.ns, "eth0").unwrap();
    let _rx = traffic::udp_receiver(h2, false, 9200).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    let good = std::thread::spawn(move || {
        traffic::send_udp(&tx, SocketAddr::new("10.0.2.2".parse().unwrap(), 9200), 500, 100).map(|_| tx)
    });

    let ip = V4::new(h3.v4(), h2.v4(), 17).build(&frames::udp(1, 2, &[0; 32]));
    let full = frames::eth(gw_mac, bad_mac, &[], 0x0800, &ip);
    let mut bogus_ihl = full.clone();
    bogus_ihl[14] = 0x43;
    let vlan_cut = frames::eth(gw_mac, bad_mac, &[(TPID_8021Q, 5)], 0x0800, &ip)[..16].to_vec();
    let mut x: u32 = 12345;
    for i in 0..300 {
        raw.send(&full[..30]).unwrap(); // IPv4 header cut short
        raw.send(&bogus_ihl).unwrap();
        raw.send(&vlan_cut).unwrap();
        let junk: Vec<u8> = (0..60)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        raw.send(&junk).unwrap();
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let tx = good.join().unwrap().unwrap();
    let sport = tx.local_addr().unwrap().port();
    let f = wait_flow(
        &agent,
        Id { iface: &h1.gw_if, src: "10.0.1.2", dst: "10.0.2.2", proto: "udp", sport, dport: 9200 },
        500,
    );
    assert_eq!((f.packets, f.bytes), (500, 500 * (14 + 20 + 8 + 100)));
    let s = agent
        .wait_for(WAIT, |a| a.stats(), |s| (s["bad_ipv4_ihl"].packets >= 300).then(|| s.clone()))
        .unwrap();
    assert_eq!(s["truncated_ipv4"].packets, 300);
    assert_eq!(s["bad_ipv4_ihl"].packets, 300);
    assert!(s["truncated_vlan"].packets >= 300, "{s:?}");
    assert!(agent.alive(), "agent died:\n{}", agent.log());
    // Nothing was dropped: the datapath only observes.
    assert_eq!(s["drop"].packets, 0);
    assert_eq!(s["pass"].packets, s["frames"].packets);
}

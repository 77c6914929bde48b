//! Mirror ports decapsulate: a capture written by scapy (an encoder independent
//! of mdsec's) with flows inside ERSPAN II and III, GRE carrying Ethernet and
//! IP, VXLAN, PPPoE, IP-in-IP, 6in4 and ERSPAN inside VXLAN, replayed with
//! tcpreplay into a real mirror port. Every inner flow must show up with its
//! own addresses, exact packets and bytes, and its verdict; every tunnel layer
//! must be counted by kind with its overhead in bytes, exactly as scapy's
//! lengths say; a tunnel mdsec does not open (PPTP's GRE) is counted as such
//! and its frames kept as the outer flow.

use std::{collections::BTreeMap, process::Command, time::Duration};

use mdsec_agent::surfaces::model::Flow;
use mdsec_tests::{
    agent::{Agent, AgentOptions},
    netns::Topology,
};

/// Writes `<dir>/tunnels.pcap` and prints what it holds as JSON: per inner
/// flow (by source port) its packets and frame bytes once decapsulated, and
/// per tunnel counter its packets and overhead bytes.
const GENERATOR: &str = r#"
import json, sys
from scapy.all import Ether, IP, IPv6, UDP, GRE, Raw, PPPoE, PPP, wrpcap
from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III, ERSPAN_PlatformSpecific
from scapy.layers.vxlan import VXLAN

out = sys.argv[1]
SW, SENSOR = "02:00:00:00:aa:01", "02:00:00:00:aa:02"
DEV, SRV = "02:00:00:00:01:05", "02:00:00:00:02:02"

def inner(k, v6=False):
    ip = IPv6(src="fd00:1::%d" % k, dst="fd00:2::2") if v6 else IP(src="10.0.1.%d" % k, dst="10.0.2.2")
    dport = 9999 if k == 3 else 9000
    return Ether(src=DEV, dst=SRV) / ip / UDP(sport=40000 + k, dport=dport) / Raw(b"m" * (20 + k))

def outer4(payload, proto=None):
    ip = IP(src="192.0.2.1", dst="192.0.2.2")
    if proto is not None:
        ip.proto = proto
    return Ether(src=SW, dst=SENSOR) / ip / payload

def l3(frame):
    return frame.payload

kinds = {
    1: ("erspan2", lambda f: [("tunnel_erspan", outer4(GRE(seqnum_present=1, sequence_number=1, proto=0x88BE) / ERSPAN_II(ver=1, session_id=1) / f))]),
    2: ("erspan3", lambda f: [("tunnel_erspan", outer4(GRE(seqnum_present=1, sequence_number=1, proto=0x22EB) / ERSPAN_III(ver=2, session_id=2, o=1) / ERSPAN_PlatformSpecific() / f))]),
    3: ("gre-teb", lambda f: [("tunnel_gre", outer4(GRE(key_present=1, key=5, proto=0x6558) / f))]),
    4: ("gre-ip", lambda f: [("tunnel_gre", outer4(GRE(proto=0x0800) / l3(f)))]),
    5: ("vxlan", lambda f: [("tunnel_vxlan", outer4(UDP(sport=50000, dport=4789) / VXLAN(vni=5001, flags=0x08) / f))]),
    # scapy compresses the PPP protocol to one byte (RFC 1661 PFC); k=11 spells out both.
    6: ("pppoe", lambda f: [("tunnel_pppoe", Ether(src=DEV, dst=SW, type=0x8864) / PPPoE(sessionid=7) / PPP(proto=0x0021) / l3(f))]),
    11: ("pppoe6", lambda f: [("tunnel_pppoe", Ether(src=DEV, dst=SW, type=0x8864) / PPPoE(sessionid=8) / Raw(b"\x00\x57") / l3(f))]),
    7: ("ipip", lambda f: [("tunnel_ip_in_ip", outer4(l3(f), proto=4))]),
    8: ("6in4", lambda f: [("tunnel_ip_in_ip", outer4(l3(f), proto=41))]),
}

frames, flows, stats = [], {}, {}
def count(stat, pkts, overhead):
    s = stats.setdefault(stat, [0, 0])
    s[0] += pkts
    s[1] += pkts * overhead

for k, (name, wrap) in kinds.items():
    f = inner(k, v6=(name in ("6in4", "pppoe6")))
    n = 5 + k
    (stat, o), = wrap(f)
    # A bare IP payload gets a 14-byte Ethernet header back in front.
    count(stat, n, len(o) - len(f))
    frames += [o] * n
    flows[40000 + k] = [n, n * len(f)]

# Two layers: ERSPAN II inside VXLAN (a fabric carrying a remote SPAN).
k, n = 9, 4
f = inner(k)
mid = Ether(src=SW, dst=SENSOR) / IP(src="192.0.2.3", dst="192.0.2.2") / GRE(seqnum_present=1, proto=0x88BE) / ERSPAN_II(ver=1, session_id=9) / f
o = outer4(UDP(sport=50001, dport=4789) / VXLAN(vni=7, flags=0x08) / mid)
count("tunnel_vxlan", n, len(o) - len(mid))
count("tunnel_erspan", n, len(mid) - len(f))
frames += [o] * n
flows[40000 + k] = [n, n * len(f)]

# Not a tunnel: judged as it is.
k, n = 10, 3
f = inner(k)
frames += [f] * n
flows[40000 + k] = [n, n * len(f)]

# PPTP's enhanced GRE (version 1): not opened, counted, kept as the outer flow.
n = 6
o = outer4(GRE(version=1, proto=0x880B, key_present=1) / Raw(b"p" * 30))
count("tunnel_opaque", n, 0)
frames += [o] * n
outer_gre = [n, n * len(o)]

wrpcap(out, frames)
json.dump({"flows": flows, "stats": stats, "outer_gre": outer_gre}, sys.stdout)
"#;

const POLICY: &[(&str, &str)] = &[
    ("zones.yaml", "zones:\n  pharmacy: [10.0.2.0/24, fd00:2::/64]\n"),
    (
        "pumps.yaml",
        "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: fd00:1::/64\nallow:\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n",
    ),
];

/// An agent whose only port is `h1`'s gateway side, as a mirror port, with
/// the tests' policy and `extra` configuration.
fn mirror_agent(topo: &Topology, extra: &str) -> Agent {
    let yaml = format!(
        "interfaces:\n  - name: {}\n    role: mirror\n    xdp_mode: driver\n{extra}",
        topo.host(1).gw_if
    );
    let policy = POLICY.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
    Agent::start_on(&topo.id, &topo.gw, &[], AgentOptions { extra_yaml: yaml, policy, ..Default::default() })
        .unwrap()
}

/// Writes the capture the scapy program `code` makes (its first argument is
/// the file), replays it with tcpreplay from `h1` into the mirror port, and
/// returns what the program printed.
fn replay(topo: &Topology, agent: &Agent, name: &str, code: &str) -> Vec<u8> {
    let pcap = agent.dir.join(name);
    let out = Command::new("/usr/bin/python3").arg("-c").arg(code).arg(&pcap).output().unwrap();
    assert!(out.status.success(), "scapy: {}", String::from_utf8_lossy(&out.stderr));
    let replay = Command::new("ip")
        .args(["netns", "exec", &topo.host(1).ns, "tcpreplay", "-q", "-i", "eth0"])
        .arg(&pcap)
        .output()
        .unwrap();
    assert!(replay.status.success(), "tcpreplay: {}", String::from_utf8_lossy(&replay.stderr));
    out.stdout
}

#[test]
fn a_mirror_port_judges_the_frames_inside_tunnels() {
    let topo = Topology::new(1).unwrap();
    let h1 = topo.host(1);
    let agent = mirror_agent(&topo, "");
    let before = agent.stats().unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&replay(&topo, &agent, "tunnels.pcap", GENERATOR)).unwrap();

    let flows_of = |flows: &[Flow]| -> BTreeMap<u16, (u64, u64, String, String)> {
        flows
            .iter()
            .filter(|f| f.iface == h1.gw_if && (40001..=40011).contains(&f.sport))
            .map(|f| (f.sport, (f.packets, f.bytes, f.src.clone(), f.verdict.clone())))
            .collect()
    };
    let wanted: BTreeMap<u16, (u64, u64)> = want["flows"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), (v[0].as_u64().unwrap(), v[1].as_u64().unwrap())))
        .collect();
    let got = agent
        .wait_for(
            Duration::from_secs(15),
            |a| a.flows(),
            |flows| {
                let got = flows_of(flows);
                let counts: BTreeMap<u16, (u64, u64)> = got.iter().map(|(k, v)| (*k, (v.0, v.1))).collect();
                (counts == wanted).then_some(got)
            },
        )
        .unwrap_or_else(|e| panic!("inner flows (want {wanted:?}): {e}\nagent log:\n{}", agent.log()));
    for (sport, (_, _, src, verdict)) in &got {
        let k = sport - 40000;
        let want_src = if k == 8 || k == 11 { format!("fd00:1::{k}") } else { format!("10.0.1.{k}") };
        assert_eq!(src, &want_src, "flow from port {sport}");
        // Port 9999 is denied: on a mirror port a would-drop; the rest allowed.
        let want_verdict = if k == 3 { "would_drop" } else { "allow" };
        assert_eq!(verdict, want_verdict, "flow from {src}:{sport}");
    }

    // The PPTP GRE frames: one outer flow, untouched.
    let outer = agent.flows().unwrap();
    let gre = outer
        .iter()
        .find(|f| f.iface == h1.gw_if && f.proto_num == 47 && f.src == "192.0.2.1")
        .expect("the unopened GRE flow");
    assert_eq!(
        [gre.packets, gre.bytes],
        [want["outer_gre"][0].as_u64().unwrap(), want["outer_gre"][1].as_u64().unwrap()]
    );

    use mdsec_common::stats::Stat;
    let names: Vec<&str> = Stat::TUNNEL_LAYERS.iter().chain(Stat::TUNNEL_STOPS).map(|s| s.name()).collect();
    let wanted = |stat: &str| {
        want["stats"].get(stat).map_or((0, 0), |v| (v[0].as_u64().unwrap(), v[1].as_u64().unwrap()))
    };
    // A poll reads the counters before the flow table: the last frames a flow
    // shows may reach the counters a poll later.
    let after = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.stats(),
            |after| {
                names
                    .iter()
                    .all(|s| after[*s].packets - before[*s].packets >= wanted(s).0)
                    .then(|| after.clone())
            },
        )
        .unwrap();
    for stat in names {
        let d = (after[stat].packets - before[stat].packets, after[stat].bytes - before[stat].bytes);
        assert_eq!(d, wanted(stat), "{stat} (packets, bytes)");
    }
    // Nothing on a mirror port is dropped.
    assert_eq!(after["drop"].packets, before["drop"].packets);
}

/// The L2 and infrastructure detections on a mirror port fed by remote SPAN:
/// every frame arrives inside ERSPAN II. A declared DHCP server's offer and a
/// declared router's advertisement raise nothing; an undeclared host's do; a
/// host claiming an address `arp_bindings` gives another MAC is spoofing; two
/// hosts claiming one address are a duplicate.
#[test]
fn l2_detections_work_on_a_mirror_port_behind_erspan() {
    let topo = Topology::new(1).unwrap();
    let h1 = topo.host(1);
    let agent = mirror_agent(
        &topo,
        "detection:\n  dhcp_servers: [10.0.3.2]\n  ipv6_routers: [\"02:00:00:00:03:02\"]\n  \
         arp_bindings:\n    \"10.0.2.2\": \"02:00:00:00:02:02\"\n",
    );
    let code = r#"
import sys
from scapy.all import *
from scapy.contrib.erspan import ERSPAN_II
def span(f):
    return Ether(src="02:00:00:00:aa:01", dst="02:00:00:00:aa:02") / IP(src="192.0.2.1", dst="192.0.2.2") \
        / GRE(seqnum_present=1, proto=0x88BE) / ERSPAN_II(ver=1, session_id=3) / f
def offer(mac, ip):
    return Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=ip, dst="255.255.255.255") / UDP(sport=67, dport=68) \
        / BOOTP(op=2, yiaddr="10.0.9.77", xid=7) / DHCP(options=[("message-type", "offer"), ("server_id", ip), "end"])
def ra(mac, ll):
    return Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src=ll, dst="ff02::1") / ICMPv6ND_RA() / ICMPv6NDOptSrcLLAddr(lladdr=mac)
def claim(mac, ip):
    return Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=mac, psrc=ip, hwdst="ff:ff:ff:ff:ff:ff", pdst=ip)
frames = [offer("02:00:00:00:03:02", "10.0.3.2"), ra("02:00:00:00:03:02", "fe80::3"),
          offer("02:00:00:00:02:05", "10.0.2.5"), ra("02:00:00:00:04:04", "fe80::4"),
          claim("02:00:00:00:02:02", "10.0.2.2"), claim("02:00:00:00:01:01", "10.0.1.1"),
          claim("02:00:00:00:06:06", "10.0.2.2"), claim("02:00:00:00:07:07", "10.0.1.1")]
# 50 ms apart (tcpreplay keeps the capture's timing): the second claimer of
# an address comes after the first, as on a real link.
out = [span(f) for f in frames for _ in range(3)]
# A gratuitous-ARP flood: 30 announcements of one host (the claims above
# are 3 each, below detection.garp_flood_frames).
out += [span(claim("02:00:00:00:08:08", "10.0.2.8")) for _ in range(30)]
for i, p in enumerate(out):
    p.time = 1700000000 + i * 0.05
wrpcap(sys.argv[1], out)
"#;
    replay(&topo, &agent, "l2.pcap", code);

    let kinds = [
        "rogue_dhcp_server",
        "rogue_router_advertisement",
        "arp_spoofing",
        "duplicate_ip",
        "gratuitous_arp_flood",
    ];
    let found = |e: &Vec<mdsec_agent::surfaces::model::Event>| {
        let f = mdsec_tests::agent::sorted_kinds(e, &kinds);
        (f.len() >= 5).then_some(f)
    };
    let got = agent
        .wait_for(Duration::from_secs(20), |a| a.events(), found)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(found(&agent.events().unwrap()).unwrap(), got, "each is reported once");
    let s = |v: &str| v.to_string();
    assert_eq!(
        got,
        [
            (s("arp_spoofing"), s("10.0.2.2"), Some(s("02:00:00:00:06:06"))),
            (s("duplicate_ip"), s("10.0.1.1"), Some(s("02:00:00:00:07:07"))),
            (s("gratuitous_arp_flood"), s("10.0.2.8"), Some(s("02:00:00:00:08:08"))),
            (s("rogue_dhcp_server"), s("10.0.2.5"), Some(s("02:00:00:00:02:05"))),
            (s("rogue_router_advertisement"), s("fe80::4"), Some(s("02:00:00:00:04:04"))),
        ]
    );
    // The declared server's and router's frames were seen, inner addresses and all.
    let flows = agent.flows().unwrap();
    assert!(flows.iter().any(|f| f.src == "10.0.3.2" && f.sport == 67), "{flows:#?}");
    assert!(flows.iter().any(|f| f.src == "fe80::3" && f.proto == "icmpv6"), "{flows:#?}");
    let events = agent.events().unwrap();
    assert!(events.iter().filter(|e| kinds.contains(&e.kind.as_str())).all(|e| e.iface == h1.gw_if));
}

/// The decap stage is its own program: the judge's verification is not
/// repeated behind it, and it stays far from the verifier's budget.
#[test]
fn the_mirror_entry_verifies_on_its_own_budget() {
    use mdsec_common::maps::{MIRROR_PROGRAM, PROGRAM};
    let prog = mdsec_tests::kernel::TestProg::load_with(MIRROR_PROGRAM, &[]).unwrap();
    let (mirror, judge) =
        (prog.verified_insns(MIRROR_PROGRAM).unwrap(), prog.verified_insns(PROGRAM).unwrap());
    eprintln!("verified instructions: mdsec_mirror {mirror}, mdsec_xdp {judge} (limit 1000000)");
    assert!(mirror < 100_000, "mdsec_mirror: {mirror}");
    assert!(judge < 1_000_000, "mdsec_xdp: {judge}");
}

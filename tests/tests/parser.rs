//! The real XDP program under BPF_PROG_TEST_RUN: parser edge cases, malformed
//! frames by reason, and the flow keys that well-formed frames produce.

use std::net::{Ipv4Addr, Ipv6Addr};

use mdsec_common::{
    flow::FlowKey,
    net::{ip_to_key, v4_mapped},
    stats::Stat,
};
use mdsec_tests::{
    frames::{self, TPID_8021AD, TPID_8021Q, V4},
    kernel::{TestProg, XDP_PASS},
};

const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);

/// BPF_PROG_TEST_RUN runs XDP as if received on loopback.
const TEST_RUN_IFINDEX: u32 = 1;

fn a6() -> Ipv6Addr {
    "fd00:1::2".parse().unwrap()
}
fn b6() -> Ipv6Addr {
    "fd00:2::2".parse().unwrap()
}

fn udp4(payload: usize) -> Vec<u8> {
    let l4 = frames::udp(4000, 53, &vec![0xab; payload]);
    frames::eth(DST, SRC, &[], 0x0800, &V4::new(A, B, 17).build(&l4))
}

fn key(src: [u8; 16], dst: [u8; 16], proto: u8, sport: u16, dport: u16, vlan: u16) -> FlowKey {
    FlowKey { ifindex: TEST_RUN_IFINDEX, vlan, proto, _pad: 0, src, dst, sport, dport }
}

/// Runs `frame` and returns the malformed reasons that moved, plus everything else
/// it changed in STATS, by name.
fn run(p: &mut TestProg, frame: &[u8]) -> Vec<&'static str> {
    let before = p.stats().unwrap();
    assert_eq!(p.run(frame).unwrap(), XDP_PASS, "frame {frame:02x?}");
    let after = p.stats().unwrap();
    let moved: Vec<&'static str> = Stat::ALL
        .iter()
        .filter(|s| after[**s as usize].packets != before[**s as usize].packets)
        .map(|s| s.name())
        .collect();
    // Every frame: exactly one `frames` and one verdict, bytes = frame length.
    assert_eq!(after[Stat::Frames as usize].packets - before[Stat::Frames as usize].packets, 1);
    assert_eq!(after[Stat::Frames as usize].bytes - before[Stat::Frames as usize].bytes, frame.len() as u64);
    assert_eq!(after[Stat::Pass as usize].packets - before[Stat::Pass as usize].packets, 1);
    moved
}

fn malformed(moved: &[&'static str]) -> Vec<&'static str> {
    moved.iter().copied().filter(|n| Stat::ALL.iter().any(|s| s.name() == *n && s.is_malformed())).collect()
}

#[test]
fn udp_over_ipv4_is_counted_exactly() {
    let mut p = TestProg::load().unwrap();
    let f = udp4(200);
    assert_eq!(f.len(), 14 + 20 + 8 + 200);
    for _ in 0..1000 {
        assert_eq!(p.run(&f).unwrap(), XDP_PASS);
    }
    let flows = p.flows().unwrap();
    assert_eq!(flows.len(), 1);
    let (k, v) = flows[0];
    assert_eq!(k, key(v4_mapped(A.octets()), v4_mapped(B.octets()), 17, 4000, 53, 0));
    assert_eq!((v.packets, v.bytes), (1000, 1000 * 242));
    let devs = p.devices().unwrap();
    assert_eq!(devs.len(), 1);
    assert_eq!(devs[0].0.mac, SRC);
    assert_eq!(devs[0].1.ipv4, A.octets());
    // The flow counts the device's frames: its DEVICES entry only records it.
    assert_eq!(devs[0].1.packets, 0);
    assert_eq!(p.device_totals().unwrap()[&devs[0].0], (1000, 1000 * 242));
    assert_eq!(p.stat(Stat::Udp).unwrap(), 1000);
}

#[test]
fn a_flow_counts_for_its_creator_and_another_macs_frames_for_that_mac() {
    let mut p = TestProg::load().unwrap();
    let own = udp4(10);
    // Same 5-tuple from another MAC (a spoofer, or a second router on the LAN).
    let other_mac = [0x02, 0, 0, 0, 0, 0x03];
    let mut spoof = own.clone();
    spoof[6..12].copy_from_slice(&other_mac);
    let arp = arp_request();
    for _ in 0..7 {
        run(&mut p, &own);
    }
    for _ in 0..3 {
        run(&mut p, &spoof);
    }
    run(&mut p, &arp);
    let flows = p.flows().unwrap();
    assert_eq!(flows.len(), 1);
    let v = flows[0].1;
    assert_eq!((v.packets, v.foreign_packets, v.src_mac), (10, 3, SRC));
    let dev = |mac| mdsec_common::device::DeviceKey { ifindex: TEST_RUN_IFINDEX, vlan: 0, mac };
    let totals = p.device_totals().unwrap();
    let n = own.len() as u64;
    assert_eq!(totals[&dev(SRC)], (7 + 1, 7 * n + arp.len() as u64));
    assert_eq!(totals[&dev(other_mac)], (3, 3 * n));
    assert_eq!(totals.len(), 2);
}

#[test]
fn ipv4_flows_and_ipv6_flows_live_in_their_own_maps() {
    let mut p = TestProg::load().unwrap();
    let l4 = frames::udp(4000, 53, &[0xab; 10]);
    let v6 = frames::eth(DST, SRC, &[], 0x86dd, &frames::ipv6(a6(), b6(), &[], 17, &l4));
    // IPv4-mapped addresses inside an IPv6 header are the IPv4 flow's key: the
    // same FLOWS4 entry, whatever header carried them.
    let mapped = frames::eth(
        DST,
        SRC,
        &[],
        0x86dd,
        &frames::ipv6(A.to_ipv6_mapped(), B.to_ipv6_mapped(), &[], 17, &l4),
    );
    let v4 = frames::eth(DST, SRC, &[], 0x0800, &V4::new(A, B, 17).build(&l4));
    for f in [&v6, &mapped, &v4] {
        run(&mut p, f);
    }
    let k4 = key(v4_mapped(A.octets()), v4_mapped(B.octets()), 17, 4000, 53, 0);
    let k6 = key(ip_to_key(a6().into()), ip_to_key(b6().into()), 17, 4000, 53, 0);
    assert!(k4.v4().is_some() && k6.v4().is_none());
    assert_eq!(p.flow(&k4).unwrap().unwrap().packets, 2);
    assert_eq!(p.flow(&k6).unwrap().unwrap().packets, 1);
    assert_eq!(p.flows().unwrap().len(), 2);
}

#[test]
fn truncation_at_every_ipv4_boundary_is_counted_and_passes() {
    let mut p = TestProg::load().unwrap();
    let full = udp4(4);
    for len in 14..full.len() {
        p.clear().unwrap();
        let moved = run(&mut p, &full[..len]);
        let want = if len < 34 { "truncated_ipv4" } else { "bad_ipv4_length" };
        assert_eq!(malformed(&moved), vec![want], "cut at {len}");
        assert!(p.flows().unwrap().is_empty(), "no flow from a frame cut at {len}");
        // The sender is still known: the Ethernet header was whole.
        assert_eq!(p.devices().unwrap().len(), 1);
    }
    // A consistent IPv4 header whose datagram is too short for its UDP header.
    let short = frames::eth(DST, SRC, &[], 0x0800, &V4::new(A, B, 17).build(&[0, 53, 0, 53]));
    assert_eq!(malformed(&run(&mut p, &short)), vec!["truncated_l4"]);
}

#[test]
fn truncation_in_vlan_tags_ipv6_extensions_and_arp() {
    let mut p = TestProg::load().unwrap();
    let l4 = frames::udp(5000, 6000, &[1, 2, 3, 4]);
    let v6 = frames::ipv6(a6(), b6(), &[(0, vec![0; 6])], 17, &l4);
    let qinq = frames::eth(DST, SRC, &[(TPID_8021AD, 100), (TPID_8021Q, 200)], 0x86dd, &v6);
    // 14..22: inside the two tags; 22..62: IPv6 header; 62..70: hop-by-hop; 70..78:
    // UDP header; 78..: payload (IPv6 payload length is not checked against the frame).
    for len in 14..qinq.len() {
        let moved = run(&mut p, &qinq[..len]);
        let want: &[&str] = match len {
            0..22 => &["truncated_vlan"],
            22..62 => &["truncated_ipv6"],
            62..70 => &["truncated_ipv6_ext"],
            70..78 => &["truncated_l4"],
            _ => &[],
        };
        assert_eq!(malformed(&moved), want, "cut at {len}");
    }
    let arp = arp_request();
    for len in 14..42 {
        assert_eq!(malformed(&run(&mut p, &arp[..len])), vec!["truncated_arp"], "cut at {len}");
    }
    assert_eq!(malformed(&run(&mut p, &arp)), Vec::<&str>::new());
}

fn arp_request() -> Vec<u8> {
    let mut body = vec![0, 1, 8, 0, 6, 4, 0, 1];
    body.extend_from_slice(&SRC);
    body.extend_from_slice(&A.octets());
    body.extend_from_slice(&[0; 6]);
    body.extend_from_slice(&B.octets());
    frames::eth([0xff; 6], SRC, &[], 0x0806, &body)
}

#[test]
fn arp_sender_address_identifies_the_device() {
    let mut p = TestProg::load().unwrap();
    let moved = run(&mut p, &arp_request());
    assert!(moved.contains(&"arp"));
    let d = p.devices().unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].0.mac, d[0].1.ipv4), (SRC, A.octets()));
    assert!(p.flows().unwrap().is_empty());
}

#[test]
fn bogus_ihl_and_version() {
    let mut p = TestProg::load().unwrap();
    let mut f = udp4(8);
    f[14] = 0x44; // IHL 4 (16 bytes)
    assert_eq!(malformed(&run(&mut p, &f)), vec!["bad_ipv4_ihl"]);
    f[14] = 0x4f; // IHL 15 (60 bytes) > total length 36
    assert_eq!(malformed(&run(&mut p, &f)), vec!["bad_ipv4_length"]);
    f[14] = 0x65; // version 6 under the IPv4 ethertype
    assert_eq!(malformed(&run(&mut p, &f)), vec!["bad_ipv4_version"]);
    let mut t = frames::eth(DST, SRC, &[], 0x0800, &V4::new(A, B, 6).build(&frames::tcp(1, 2, 0x02, &[])));
    t[14 + 20 + 12] = 0x40; // TCP data offset 4
    assert_eq!(malformed(&run(&mut p, &t)), vec!["bad_tcp_offset"]);
    assert!(p.flows().unwrap().is_empty());
}

#[test]
fn ipv4_options_of_any_length_are_skipped() {
    let mut p = TestProg::load().unwrap();
    for opt_len in [4usize, 8, 20, 40] {
        p.clear().unwrap();
        let mut ip = V4::new(A, B, 17);
        // NOP options ending with End-of-options.
        ip.options = vec![1; opt_len];
        ip.options[opt_len - 1] = 0;
        let f = frames::eth(DST, SRC, &[], 0x0800, &ip.build(&frames::udp(1111, 2222, &[7; 10])));
        assert_eq!(malformed(&run(&mut p, &f)), Vec::<&str>::new());
        let flows = p.flows().unwrap();
        assert_eq!(flows.len(), 1, "options {opt_len}");
        assert_eq!((flows[0].0.sport, flows[0].0.dport), (1111, 2222), "options {opt_len}");
        assert_eq!(flows[0].1.bytes, f.len() as u64);
    }
}

#[test]
fn vlan_stacks() {
    let mut p = TestProg::load().unwrap();
    let ip = V4::new(A, B, 17).build(&frames::udp(1, 2, &[0; 4]));
    let one = frames::eth(DST, SRC, &[(TPID_8021Q, 42)], 0x0800, &ip);
    let two = frames::eth(DST, SRC, &[(TPID_8021AD, 7), (TPID_8021Q, 43)], 0x0800, &ip);
    let three = frames::eth(DST, SRC, &[(TPID_8021AD, 7), (TPID_8021Q, 43), (TPID_8021Q, 44)], 0x0800, &ip);
    assert!(run(&mut p, &one).contains(&"vlan_tagged"));
    assert!(run(&mut p, &two).contains(&"vlan_tagged"));
    assert_eq!(malformed(&run(&mut p, &three)), vec!["vlan_too_deep"]);
    let mut vlans: Vec<u16> = p.flows().unwrap().iter().map(|(k, _)| k.vlan).collect();
    vlans.sort();
    // The innermost tag keys the flow; the 3-tag frame makes none.
    assert_eq!(vlans, vec![42, 43]);
    let mut dev_vlans: Vec<u16> = p.devices().unwrap().iter().map(|(k, _)| k.vlan).collect();
    dev_vlans.sort();
    // The 3-tag frame still counts for its sender, under the inner tag it parsed (43).
    assert_eq!(dev_vlans, vec![42, 43]);
    let k43 = p.devices().unwrap().iter().find(|(k, _)| k.vlan == 43).unwrap().0;
    assert_eq!(p.device_totals().unwrap()[&k43].0, 2);
}

fn dstopts() -> (u8, Vec<u8>) {
    (60, vec![1, 4, 0, 0, 0, 0]) // PadN option filling the 8 bytes
}

#[test]
fn ipv6_extension_chain_is_bounded() {
    let mut p = TestProg::load().unwrap();
    let l4 = frames::udp(7000, 8000, &[0; 16]);
    // MAX_IPV6_EXT_HEADERS = 6: hop-by-hop + 5 destination options still parse.
    let mut exts = vec![(0u8, vec![1, 4, 0, 0, 0, 0])];
    exts.extend(std::iter::repeat_n(dstopts(), 5));
    let ok = frames::eth(DST, SRC, &[], 0x86dd, &frames::ipv6(a6(), b6(), &exts, 17, &l4));
    assert_eq!(malformed(&run(&mut p, &ok)), Vec::<&str>::new());
    let flows = p.flows().unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].0, key(ip_to_key(a6().into()), ip_to_key(b6().into()), 17, 7000, 8000, 0));
    // One more header than the bound: counted, passed, no flow.
    exts.push(dstopts());
    p.clear().unwrap();
    let deep = frames::eth(DST, SRC, &[], 0x86dd, &frames::ipv6(a6(), b6(), &exts, 17, &l4));
    assert_eq!(malformed(&run(&mut p, &deep)), vec!["ipv6_ext_too_deep"]);
    assert!(p.flows().unwrap().is_empty());
    // A routing header is skipped too.
    let rh = frames::eth(
        DST,
        SRC,
        &[],
        0x86dd,
        &frames::ipv6(a6(), b6(), &[(43, vec![0; 14])], 6, &frames::tcp(1, 443, 0x02, &[])),
    );
    assert_eq!(malformed(&run(&mut p, &rh)), Vec::<&str>::new());
    assert_eq!(p.flows().unwrap()[0].0.dport, 443);
}

#[test]
fn ipv4_fragments_follow_their_first_fragment() {
    let mut p = TestProg::load().unwrap();
    let l4 = frames::udp(3333, 4444, &[0; 1472]);
    let mut ip = V4::new(A, B, 17);
    ip.id = 77;
    ip.frag = 0x2000; // MF, offset 0
    let first = frames::eth(DST, SRC, &[], 0x0800, &ip.build(&l4[..1480]));
    ip.frag = 0x2000 | (1480 / 8);
    let middle = frames::eth(DST, SRC, &[], 0x0800, &ip.build(&[0; 8]));
    ip.frag = 1488 / 8; // last: MF clear
    let last = frames::eth(DST, SRC, &[], 0x0800, &ip.build(&[0; 8]));
    assert!(run(&mut p, &first).contains(&"fragment_first"));
    assert!(run(&mut p, &middle).contains(&"fragment_matched"));
    assert!(run(&mut p, &last).contains(&"fragment_matched"));
    // A later fragment of a datagram whose first fragment was never seen.
    ip.id = 78;
    let orphan = frames::eth(DST, SRC, &[], 0x0800, &ip.build(&[0; 8]));
    assert!(run(&mut p, &orphan).contains(&"fragment_bucket"));

    let mut flows = p.flows().unwrap();
    flows.sort_by_key(|(k, _)| k.sport);
    assert_eq!(flows.len(), 2);
    let (bucket, full) = (flows[0], flows[1]);
    assert_eq!((bucket.0.sport, bucket.0.dport, bucket.1.packets), (0, 0, 1));
    assert_eq!((full.0.sport, full.0.dport, full.1.packets), (3333, 4444, 3));
    assert_eq!(full.1.bytes, (first.len() + middle.len() + last.len()) as u64);
}

#[test]
fn ipv6_fragments_follow_their_first_fragment() {
    let mut p = TestProg::load().unwrap();
    let frag = |off8: u16, more: bool| -> (u8, Vec<u8>) {
        let fo = (off8 << 3) | more as u16;
        let mut b = fo.to_be_bytes().to_vec();
        b.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        (44, b)
    };
    let first = frames::eth(
        DST,
        SRC,
        &[],
        0x86dd,
        &frames::ipv6(a6(), b6(), &[frag(0, true)], 17, &frames::udp(9, 10, &[0; 40])),
    );
    let later =
        frames::eth(DST, SRC, &[], 0x86dd, &frames::ipv6(a6(), b6(), &[frag(6, false)], 17, &[0; 16]));
    assert!(run(&mut p, &first).contains(&"fragment_first"));
    assert!(run(&mut p, &later).contains(&"fragment_matched"));
    let flows = p.flows().unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].0.sport, flows[0].0.dport, flows[0].1.packets), (9, 10, 2));
}

#[test]
fn icmp_type_and_code_are_the_ports() {
    let mut p = TestProg::load().unwrap();
    let f = frames::eth(DST, SRC, &[], 0x0800, &V4::new(A, B, 1).build(&frames::icmp_echo(&[0; 56])));
    assert!(run(&mut p, &f).contains(&"icmp"));
    let k = p.flows().unwrap()[0].0;
    assert_eq!((k.proto, k.sport, k.dport), (1, 8, 0));
}

#[test]
fn tcp_flags_accumulate() {
    let mut p = TestProg::load().unwrap();
    for flags in [0x02u8, 0x10, 0x18, 0x11] {
        let f =
            frames::eth(DST, SRC, &[], 0x0800, &V4::new(A, B, 6).build(&frames::tcp(40000, 104, flags, &[])));
        run(&mut p, &f);
    }
    let flows = p.flows().unwrap();
    assert_eq!(flows.len(), 1);
    // The union in the low byte; the creating SYN in the second.
    assert_eq!(flows[0].1.tcp_flags, 0x02 | 0x10 | 0x08 | 0x01 | (0x02 << 8));
}

#[test]
fn random_frames_never_stop_the_program() {
    let mut p = TestProg::load().unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let before = p.stats().unwrap();
    let n = 5000u64;
    let mut bytes = 0u64;
    for i in 0..n {
        let len = 14 + (next() % 200) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Steer a share of frames into the deeper parsers.
        match i % 4 {
            0 => f[12..14].copy_from_slice(&[0x08, 0x00]),
            1 => f[12..14].copy_from_slice(&[0x86, 0xdd]),
            2 => f[12..14].copy_from_slice(&[0x81, 0x00]),
            _ => {}
        }
        bytes += len as u64;
        assert_eq!(p.run(&f).unwrap(), XDP_PASS);
    }
    let after = p.stats().unwrap();
    let d = |s: Stat| after[s as usize].packets - before[s as usize].packets;
    assert_eq!(d(Stat::Frames), n);
    assert_eq!(d(Stat::Pass), n);
    assert_eq!(after[Stat::Frames as usize].bytes - before[Stat::Frames as usize].bytes, bytes);
    let bad: u64 = Stat::ALL.iter().filter(|s| s.is_malformed()).map(|s| d(*s)).sum();
    assert!(bad > n / 4, "random bytes should mostly be malformed, got {bad}");
}

//! Deny events under BPF_PROG_TEST_RUN: one per flow and generation, rate-limited
//! per CPU, and the suppressed ones counted.

use std::net::Ipv4Addr;

use aya::maps::RingBuf;
use mdsec_common::{
    maps as names,
    policy::{Event, IFACE_MIRROR, Verdict},
    stats::Stat,
};
use mdsec_tests::{
    frames::{self, V4},
    kernel::{self, TestProg, XDP_DROP, XDP_PASS},
};

const PUMPS: &[(&str, &str)] = &[(
    "s.yaml",
    "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.1.0.0/24\n",
)];

/// The datapath with the pump segment at `event_rate`, and its event ring.
fn load(event_rate: u32) -> (TestProg, RingBuf<aya::maps::MapData>) {
    let (mut prog, _maps, _, _) = kernel::with_policy(PUMPS, event_rate).unwrap();
    let ring = RingBuf::try_from(prog.take_map(names::EVENTS).unwrap()).unwrap();
    (prog, ring)
}

#[test]
fn one_event_per_flow_and_rate_limited() {
    // At most 5 events per second per CPU.
    let (mut prog, mut ring) = load(5);

    let frame = |dport: u16| {
        let ip = V4::new(Ipv4Addr::new(10, 1, 0, 7), Ipv4Addr::new(10, 9, 0, 1), 17)
            .build(&frames::udp(5000, dport, &[0; 8]));
        frames::eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &[], 0x0800, &ip)
    };
    // The same flow 10 times: dropped every time, reported once.
    for _ in 0..10 {
        assert_eq!(prog.run(&frame(1)).unwrap(), XDP_DROP);
    }
    // 9 more flows: 4 fit the rate, 5 are suppressed and counted.
    for port in 2..=10 {
        assert_eq!(prog.run(&frame(port)).unwrap(), XDP_DROP);
    }
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        // SAFETY: the kernel wrote an Event.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
    }
    let ports: Vec<u16> = events.iter().map(|e| e.dport).collect();
    assert_eq!(ports, vec![1, 2, 3, 4, 5]);
    assert!(events.iter().all(|e| e.segment == 1 && e.rule == 0 && e.generation == 1));
    assert_eq!(prog.stat(Stat::EventsRateLimited).unwrap(), 5);
    assert_eq!(prog.stat(Stat::PolicyDrop).unwrap(), 19);
    assert_eq!(prog.stat(Stat::EventsLost).unwrap(), 0);
}

#[test]
fn a_full_event_ring_loses_events_but_counts_every_one() {
    // No rate limit to speak of: only the ring's size stops events.
    let (mut prog, mut ring) = load(10_000_000);
    // 5,000 denied flows while nobody drains the 256 KiB ring (about 3,000 events fit).
    const FLOWS: u16 = 5000;
    // DHCP ports are exempt from policy (never dropped): leave them out.
    let ports: Vec<u16> = (1..=FLOWS + 4).filter(|p| !matches!(p, 67 | 68 | 546 | 547)).collect();
    assert_eq!(ports.len(), FLOWS as usize);
    for port in ports {
        let ip = V4::new(Ipv4Addr::new(10, 1, 0, 7), Ipv4Addr::new(10, 9, 0, 1), 17)
            .build(&frames::udp(5000, port, &[0; 8]));
        let f = frames::eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &[], 0x0800, &ip);
        assert_eq!(prog.run(&f).unwrap(), XDP_DROP, "a full ring never changes a verdict");
    }
    let mut delivered = 0u64;
    while ring.next().is_some() {
        delivered += 1;
    }
    let lost = prog.stat(Stat::EventsLost).unwrap();
    assert!(lost > 0 && delivered > 1000, "delivered {delivered}, lost {lost}");
    assert_eq!(delivered + lost, FLOWS as u64, "every violation is an event or a counted loss");
    assert_eq!(prog.stat(Stat::EventsRateLimited).unwrap(), 0);
    assert_eq!(prog.stat(Stat::PolicyDrop).unwrap(), FLOWS as u64);
}

#[test]
fn a_mirror_port_never_drops_and_reports_would_drops() {
    let (mut prog, mut ring) = load(1000);
    // BPF_PROG_TEST_RUN receives on loopback (ifindex 1): make it a mirror port.
    prog.set_iface(1, IFACE_MIRROR).unwrap();
    let ip = V4::new(Ipv4Addr::new(10, 1, 0, 7), Ipv4Addr::new(10, 9, 0, 1), 17)
        .build(&frames::udp(5000, 7, &[0; 8]));
    let f = frames::eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &[], 0x0800, &ip);
    for _ in 0..5 {
        assert_eq!(prog.run(&f).unwrap(), XDP_PASS, "a copy on a mirror port is never dropped");
    }
    assert_eq!(prog.stat(Stat::PolicyWouldDrop).unwrap(), 5);
    assert_eq!(prog.stat(Stat::PolicyDrop).unwrap(), 0);
    assert_eq!(prog.stat(Stat::Drop).unwrap(), 0);
    let e = ring.next().map(|item| {
        // SAFETY: the kernel wrote an Event.
        unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) }
    });
    assert_eq!(e.map(|e| e.verdict), Some(Verdict::WouldDrop as u8), "the event says nothing was dropped");
    // The same denied traffic on an inline port is dropped.
    prog.set_iface(1, 0).unwrap();
    prog.clear().unwrap();
    assert_eq!(prog.run(&f).unwrap(), XDP_DROP);
    assert_eq!(prog.stat(Stat::PolicyDrop).unwrap(), 1);
}

//! The datapath-managed flow tables (`mdsec_common::flowtable`) under
//! BPF_PROG_TEST_RUN: the kernel inserts, the agent's mapping finds and removes,
//! a full table evicts and counts it, and the policy verdict of a flow that
//! comes back after eviction or removal is decided again.

use std::net::Ipv4Addr;

use mdsec_common::{flow::FlowKey, maps as names, net::v4_mapped, stats::Stat};
use mdsec_tests::{
    frames::{self, V4},
    kernel::{TestProg, XDP_DROP, XDP_PASS, test_run_on, with_policy_sized},
};

const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const A: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
/// BPF_PROG_TEST_RUN runs XDP as if received on loopback.
const IFINDEX: u32 = 1;

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    frames::eth(DST, SRC, &[], 0x0800, &V4::new(A, B, 17).build(&frames::udp(sport, dport, &[1, 2, 3])))
}

fn key(sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        ifindex: IFINDEX,
        vlan: 0,
        proto: 17,
        _pad: 0,
        src: v4_mapped(A.octets()),
        dst: v4_mapped(B.octets()),
        sport,
        dport,
    }
}

#[test]
fn a_full_table_evicts_one_flow_per_new_flow_and_counts_it() {
    // One set of eight slots: the ninth flow on must evict.
    let mut p = TestProg::load_with(names::PROGRAM, &[(names::FLOWS4, 8)]).unwrap();
    assert_eq!(p.flow_tables().v4.capacity(), 8);
    for port in 0..20u16 {
        assert_eq!(p.run(&udp(1000 + port, 53)).unwrap(), XDP_PASS);
    }
    assert_eq!(p.stat(Stat::FlowEvicted).unwrap(), 12);
    assert_eq!(p.stat(Stat::FlowUpdateFail).unwrap(), 0);
    let flows = p.flows().unwrap();
    assert_eq!(flows.len(), 8, "the table stays full");
    assert!(flows.iter().all(|(_, v)| v.packets == 1));
    // Every frame still counted for the device: flows that were evicted took
    // their frames with them, the ones left hold theirs.
    assert_eq!(p.stat(Stat::Frames).unwrap(), 20);
    // A frame of a flow still there is found, not inserted again.
    let (k, v) = flows[0];
    p.run(&udp(k.sport, k.dport)).unwrap();
    assert_eq!(p.flow(&k).unwrap().unwrap().packets, v.packets + 1);
    assert_eq!(p.stat(Stat::FlowEvicted).unwrap(), 12);
}

#[test]
fn the_flow_evicted_is_the_one_seen_longest_ago() {
    // One set of eight: flows seen in a later age tick (FlowSet::age, 67 ms)
    // than the rest survive a new flow; the one not seen since is evicted, even
    // though it was not the first created.
    let mut p = TestProg::load_with(names::PROGRAM, &[(names::FLOWS4, 8)]).unwrap();
    for port in 0..8u16 {
        p.run(&udp(2000 + port, 53)).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    let stale = 2005;
    for port in (0..8u16).map(|i| 2000 + i).filter(|&port| port != stale) {
        p.run(&udp(port, 53)).unwrap();
    }
    p.run(&udp(3000, 53)).unwrap();
    assert_eq!(p.stat(Stat::FlowEvicted).unwrap(), 1);
    assert!(p.flow(&key(stale, 53)).unwrap().is_none(), "the stale flow left");
    assert_eq!(p.flow(&key(3000, 53)).unwrap().unwrap().packets, 1);
    for port in (0..8u16).map(|i| 2000 + i).filter(|&port| port != stale) {
        assert_eq!(p.flow(&key(port, 53)).unwrap().unwrap().packets, 2, "flow {port} stays");
    }
}

#[test]
fn flows_spread_over_two_sets_fill_the_table_before_evicting() {
    // 4,096 slots. At two thirds full (the 1.5 slots per flow ARCHITECTURE.md
    // advises) nothing has been evicted, and most flows sit in the first set a
    // lookup reads (a first set takes keys until it is nearly full, then the
    // emptier of the two does); at three quarters, under 1 % were evicted.
    let mut p = TestProg::load_with(names::PROGRAM, &[(names::FLOWS4, 4096)]).unwrap();
    for i in 0..2731u16 {
        p.run(&udp(10_000 + i, 53)).unwrap();
    }
    assert_eq!(p.stat(Stat::FlowEvicted).unwrap(), 0);
    let (live, second) = p.flow_tables().v4.placement();
    assert_eq!(live, 2731);
    assert!(second * 10 < live, "{second} of {live} flows in their second set");
    for i in (0..2731u16).step_by(97) {
        assert_eq!(p.flow(&key(10_000 + i, 53)).unwrap().unwrap().packets, 1, "flow {i}");
    }
    for i in 2731..3072u16 {
        p.run(&udp(10_000 + i, 53)).unwrap();
    }
    let evicted = p.stat(Stat::FlowEvicted).unwrap();
    assert!(evicted < 31, "{evicted} of 3072 flows evicted");
    assert_eq!(p.flows().unwrap().len() as u64, 3072 - evicted);
}

const PUMPS: &[(&str, &str)] = &[(
    "s.yaml",
    "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.1.0.0/24\n",
)];

fn pump(dport: u16) -> Vec<u8> {
    let ip = V4::new(Ipv4Addr::new(10, 1, 0, 7), Ipv4Addr::new(10, 9, 0, 1), 17)
        .build(&frames::udp(5000, dport, &[0; 8]));
    frames::eth(DST, SRC, &[], 0x0800, &ip)
}

#[test]
fn a_denied_flow_stays_denied_through_eviction_and_removal() {
    let (mut p, _maps, _, _) = with_policy_sized(PUMPS, 1000, &[(names::FLOWS4, 8)]).unwrap();
    // 30 denied flows through 8 slots, each twice: every frame dropped, whether
    // its flow was found, created or created again after an eviction.
    for round in 0..2 {
        for port in 1..=30 {
            assert_eq!(p.run(&pump(port)).unwrap(), XDP_DROP, "round {round} port {port}");
        }
    }
    assert_eq!(p.stat(Stat::PolicyDrop).unwrap(), 60);
    // Round one evicts 22; how many of round two's flows are still there depends
    // on which flows tie on the coarse clock's last-seen tick.
    assert!(p.stat(Stat::FlowEvicted).unwrap() >= 22);
    assert_eq!(p.flows().unwrap().len(), 8);

    // The agent removes an idle flow; its next frame creates it again, judged anew.
    let k = p.flows().unwrap()[0].0;
    assert_eq!(p.flow_tables().remove_if(&k, |_| false), Some(false), "not idle: stays");
    assert!(p.flow(&k).unwrap().is_some());
    assert_eq!(p.flow_tables().remove_if(&k, |_| true), Some(true));
    assert!(p.flow(&k).unwrap().is_none());
    assert_eq!(p.flow_tables().remove_if(&k, |_| true), None, "already gone");
    assert_eq!(p.run(&pump(k.dport)).unwrap(), XDP_DROP);
    assert_eq!(p.flow(&k).unwrap().unwrap().packets, 1, "a new flow, not the removed one");
}

/// Runs `f` on the calling thread pinned to `cpu` (BPF_PROG_TEST_RUN runs the
/// program on the caller's CPU).
fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> T {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0, "pin to CPU {cpu}");
    }
    f()
}

#[test]
fn frames_on_another_cpu_than_the_flows_home_count_exactly() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let mut p = TestProg::load().unwrap();
    let k = key(7000, 53);
    let f = udp(7000, 53);
    let len = f.len() as u64;
    // Created on CPU 0: its home. CPU 1 adds atomically to the remote counts.
    on_cpu(0, || p.run(&f).unwrap());
    on_cpu(1, || {
        p.run(&f).unwrap();
        p.run(&f).unwrap();
    });
    on_cpu(0, || p.run(&f).unwrap());
    let raw = p.flow_tables().get_unfolded(&k).unwrap();
    assert_eq!(raw.home_cpu, 0);
    assert_eq!((raw.packets, raw.bytes), (2, 2 * len), "home CPU's plain adds");
    assert_eq!((raw.remote_packets, raw.remote_bytes), (2, 2 * len), "other CPU's atomic adds");
    let v = p.flow(&k).unwrap().unwrap();
    assert_eq!((v.packets, v.bytes, v.remote_packets), (4, 4 * len, 0), "the agent reads totals");
}

#[test]
fn a_frame_whose_flow_gets_no_slot_is_still_judged() {
    let (mut p, _maps, _, _) = with_policy_sized(PUMPS, 1000, &[]).unwrap();
    let k = FlowKey {
        src: v4_mapped([10, 1, 0, 7]),
        dst: v4_mapped([10, 9, 0, 1]),
        sport: 5000,
        dport: 9,
        ..key(0, 0)
    };
    // Another CPU is inserting into this flow's first set: no slot for it now.
    p.flow_tables().v4.set_insert_lock(&k.v4().unwrap(), true);
    assert_eq!(p.run(&pump(9)).unwrap(), XDP_DROP, "denied without a flow entry too");
    assert_eq!(p.stat(Stat::FlowUpdateFail).unwrap(), 1);
    assert_eq!(p.stat(Stat::PolicyDrop).unwrap(), 1);
    assert!(p.flow(&k).unwrap().is_none());
    let dev = p.devices().unwrap();
    assert_eq!(dev.len(), 1);
    assert_eq!(dev[0].1.packets, 1, "counted for its device");
    // Lock released: the next frame creates the flow, judged the same way.
    p.flow_tables().v4.set_insert_lock(&k.v4().unwrap(), false);
    assert_eq!(p.run(&pump(9)).unwrap(), XDP_DROP);
    assert_eq!(p.flow(&k).unwrap().unwrap().packets, 1);
    assert_eq!(p.stat(Stat::FlowUpdateFail).unwrap(), 1);
}

/// Both CPUs run the same stream of distinct flows at once (the bench entry
/// `mdsec_bench_flows`: every packet another flow), so they insert the same
/// new keys into the same sets at the same moment; then a stream eight times
/// the table, so they also evict at once. Every frame is judged and counted
/// once, and every packet of a flow that stays is on that flow.
#[test]
fn both_cpus_inserting_and_evicting_at_once_keep_the_counts_exact() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let f = udp(7000, 53);
    // The flow number goes into the low 32 bits of the source address.
    const SRC_LOW: u32 = 14 + 12;
    for (slots, flows, rounds) in [(4096u32, 2048u32, 40u32), (1024, 8192, 4)] {
        let mut p =
            TestProg::load_with(names::BENCH_FLOWS, &[(names::FLOWS4, slots), (names::FLOWS, 64)]).unwrap();
        p.set_flow_stream(flows, SRC_LOW).unwrap();
        let fd = p.raw_fd().unwrap();
        let per_cpu = flows * rounds;
        let runs: Vec<_> = (0..2)
            .map(|cpu| {
                let f = f.clone();
                std::thread::spawn(move || on_cpu(cpu, || test_run_on(fd, &f, per_cpu).unwrap()))
            })
            .collect();
        for r in runs {
            assert_eq!(r.join().unwrap(), XDP_PASS);
        }
        let frames = 2 * per_cpu as u64;
        let (pass, failed, evicted) = (
            p.stat(Stat::Pass).unwrap(),
            p.stat(Stat::FlowUpdateFail).unwrap(),
            p.stat(Stat::FlowEvicted).unwrap(),
        );
        assert_eq!((pass, p.stat(Stat::Drop).unwrap()), (frames, 0), "{slots} slots, {flows} flows");
        let live = p.flows().unwrap();
        let on_flows: u64 = live.iter().map(|(_, v)| v.packets).sum();
        if flows <= slots / 2 {
            // No eviction: every frame is on its flow, or judged through the
            // stand-in flow when its set's insert lock was held (counted).
            assert_eq!(evicted, 0);
            assert_eq!(live.len() as u32, flows);
            assert_eq!(on_flows + failed, frames, "{failed} frames without a slot");
            assert!(live.iter().all(|(_, v)| v.packets <= 2 * rounds as u64));
        } else {
            // Eviction at both CPUs: the table stays within its slots and every
            // flow it no longer holds was an eviction it counted.
            assert!(live.len() as u32 <= slots);
            assert!(evicted >= (flows - slots) as u64, "{evicted} evictions");
            assert!(on_flows <= frames);
        }
    }
}

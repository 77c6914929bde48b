//! Fault survival with real traffic through real XDP: the agent killed with
//! SIGKILL under traffic, a spoofed flood of ten times the flow table, and the
//! policy directory deleted or made unreadable. Enforcement never depends on the
//! agent being alive, on table residency, or on the files staying readable.
//!
//! Topology: h1 = 10.0.1.2 infusion pump (segment pumps, enforce), h2 = 10.0.2.2
//! pharmacy (allowed: UDP 9000), h3 = 10.0.3.2 a workstation (denied).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use mdsec_tests::{
    agent::{Agent, AgentOptions},
    frames::{self, RawSender, V4},
    netns::{SharedBpffs, Topology, link_mac},
    traffic,
};

fn policy() -> Vec<(String, String)> {
    vec![
        ("zones.yaml".into(), "zones:\n  pharmacy: [10.0.2.0/24]\n".into()),
        (
            "pumps.yaml".into(),
            "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\nallow:\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n".into(),
        ),
    ]
}

fn udp(topo: &Topology, from: u8, to: u8, port: u16, n: usize) -> usize {
    traffic::udp_delivered(topo, from, to, port, n, false)
}

fn drops(a: &Agent) -> u64 {
    a.stat("policy_drop").unwrap().packets
}

#[test]
fn sigkill_under_traffic_keeps_enforcing_and_the_restart_adopts_the_pins() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let state = std::env::temp_dir().join(format!("{}-state", topo.id));
    // Pins must outlive the crashed process, as the host's /sys/fs/bpf does.
    let fs = SharedBpffs::new(&topo.id);
    let opts = || AgentOptions {
        policy: policy(),
        state_dir: Some(state.clone()),
        extra_yaml: format!("pin_dir: {}\n", fs.0.join("mdsec").display()),
        ..Default::default()
    };
    let agent = Agent::start(&topo, opts()).unwrap();
    assert_eq!((udp(&topo, 1, 2, 9000, 50), udp(&topo, 3, 1, 7000, 50)), (50, 0));
    agent.wait_for(Duration::from_secs(5), |a| Ok(drops(a)), |&d| (d == 50).then_some(())).unwrap();
    let frames_before = agent.stat("frames").unwrap().packets;
    // A crash: no cleanup runs, the pinned program and maps stay.
    agent.crash();
    // The datapath enforces on its own: allowed traffic passes, denied is dropped.
    let tx = traffic::udp_socket(topo.host(1), false).unwrap();
    traffic::send_and_settle(&tx, SocketAddr::new(topo.host(2).v4().into(), 9001), 100, 100).unwrap();
    assert_eq!((udp(&topo, 1, 2, 9000, 50), udp(&topo, 3, 1, 7000, 50)), (50, 0));
    // The restarted agent adopts the pinned maps: every count, downtime included.
    let agent = Agent::start(&topo, opts()).unwrap();
    let s = agent.stats().unwrap();
    assert_eq!(
        s["policy_drop"].packets,
        50 + 50 + 100,
        "50 before, 50 + 100 (port 9001) during the downtime"
    );
    assert!(s["frames"].packets >= frames_before + 200, "counters are monotonic across the crash");
    let flows = agent.flows().unwrap();
    // Each burst used its own socket (source port): sum the flows per port.
    let f = |dport: u16| {
        let mine: Vec<_> = flows.iter().filter(|f| f.src == "10.0.1.2" && f.dport == dport).collect();
        let verdicts: std::collections::BTreeSet<&str> = mine.iter().map(|f| f.verdict.as_str()).collect();
        (mine.iter().map(|f| f.packets).sum::<u64>(), verdicts.into_iter().collect::<Vec<_>>().join(","))
    };
    assert_eq!(f(9000), (100, "allow".to_string()));
    assert_eq!(f(9001), (100, "drop".to_string()));
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);
}

/// Under `ip netns exec` the agent's bpffs is private to its mount
/// namespace: pins, and with them the XDP links, would die with the process.
/// With an enforce segment that is refused at start (a crash would silently
/// end enforcement), unless explicitly allowed.
#[test]
fn an_enforcing_agent_whose_pins_would_die_with_it_refuses_to_start() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let refused = Agent::start(
        &topo,
        AgentOptions { policy: policy(), allow_private_bpffs: false, ..Default::default() },
    );
    let err = refused.err().expect("the agent must not start").to_string();
    assert!(err.contains("segment pumps enforces, but the pins under"), "{err}");
    assert!(err.contains("allow_private_bpffs: true"), "{err}");
    assert!(!err.contains("XDP attached"), "nothing was attached first: {err}");
    // Nothing was attached: traffic the policy would drop passes.
    assert_eq!(udp(&topo, 2, 1, 7000, 20), 20);
    // With a bpffs the parent shares, the same agent starts and enforces.
    let fs = SharedBpffs::new(&topo.id);
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: policy(),
            allow_private_bpffs: false,
            extra_yaml: format!("pin_dir: {}\n", fs.0.join("mdsec").display()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(agent.log().contains("outlive the agent"), "{}", agent.log());
    assert_eq!(udp(&topo, 2, 1, 7000, 20), 0);
}

#[test]
fn a_spoofed_flood_of_ten_times_the_flow_table_changes_no_verdict() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: policy(),
            extra_yaml: "maps:\n  flows: 1024\n  devices: 256\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    // 10,240 spoofed sources (address and MAC) from h3 towards the pump: ten times
    // FLOWS and forty times DEVICES.
    let h3 = topo.host(3);
    let raw = RawSender::open(&h3.ns, "eth0").unwrap();
    let gw_mac = link_mac(&topo.gw, &h3.gw_if).unwrap();
    let flood = std::thread::spawn(move || {
        for i in 0..10_240u32 {
            // The first table-full is read by the agent (polls every 100 ms) before
            // the rest of the flood evicts it, so the evictions are seen.
            if i == 1024 {
                std::thread::sleep(Duration::from_millis(500));
            }
            let src = Ipv4Addr::new(10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            let mac = [0x02, 0x55, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let ip = V4::new(src, Ipv4Addr::new(10, 0, 1, 2), 17).build(&frames::udp(40000, 7000, &[0; 18]));
            raw.send(&frames::eth(gw_mac, mac, &[], 0x0800, &ip)).unwrap();
        }
    });
    // The agent answers throughout.
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() || t0.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        agent.stats().unwrap();
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    flood.join().unwrap();
    assert!(slowest < Duration::from_secs(1), "an API call took {slowest:?} during the flood");
    // Every spoofed packet was a denied flow, and was dropped.
    agent.wait_for(Duration::from_secs(10), |a| Ok(drops(a)), |&d| (d >= 10_240).then_some(())).unwrap();
    assert_eq!(drops(&agent), 10_240);
    // The pump's allowed and denied traffic are decided exactly as before.
    assert_eq!(udp(&topo, 1, 2, 9000, 100), 100);
    assert_eq!(udp(&topo, 1, 2, 9001, 100), 0);
    assert_eq!(drops(&agent), 10_340);
    // The tables stayed within their size; the agent saw and counted evictions.
    let m = agent.metrics().unwrap();
    assert!(m.get(r#"mdsec_map_entries{map="flows_ipv4"}"#).unwrap() <= 1024.0);
    assert!(m.get(r#"mdsec_map_entries{map="devices"}"#).unwrap() <= 256.0);
    let evicted = m.get(r#"mdsec_lru_evictions_total{map="flows_ipv4"}"#).unwrap();
    assert!(evicted >= 500.0, "only {evicted} flow evictions counted");
    assert_eq!(m.get(r#"mdsec_map_update_failures_total{map="flows"}"#), Some(0.0));
}

#[test]
fn a_deleted_or_unreadable_policy_directory_keeps_the_last_good_policy() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions { policy: policy(), ..Default::default() }).unwrap();
    let generation = agent.generation().unwrap();
    let dir = agent.policy_dir();
    let check = |why: &str| {
        assert_eq!(udp(&topo, 1, 2, 9000, 20), 20, "{why}: allowed traffic passes");
        assert_eq!(udp(&topo, 3, 1, 7000, 20), 0, "{why}: denied traffic is dropped");
    };
    check("start");
    // A file replaced by something unreadable (a directory named like a policy file).
    std::fs::remove_file(dir.join("pumps.yaml")).unwrap();
    std::fs::create_dir(dir.join("pumps.yaml")).unwrap();
    let st = agent.reload().unwrap();
    assert_eq!(st["last_reload_ok"], false, "{st:#}");
    assert_eq!(st["generation"].as_u64(), Some(generation));
    check("unreadable file");
    // The whole directory gone.
    std::fs::remove_dir_all(&dir).unwrap();
    let st = agent.reload().unwrap();
    assert_eq!(st["last_reload_ok"], false, "{st:#}");
    assert!(st["diagnostics"].to_string().contains("cannot read the policy directory"), "{st:#}");
    assert_eq!(st["generation"].as_u64(), Some(generation));
    check("directory deleted");
    let m = agent.metrics().unwrap();
    assert_eq!(m.get("mdsec_policy_last_reload_success"), Some(0.0));
}

#[test]
fn a_devices_totals_survive_a_restart_after_its_flows_aged_out() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let state = std::env::temp_dir().join(format!("{}-state", topo.id));
    // Fresh kernel maps on each start (no shared pins): only the state database
    // carries the device's totals over.
    let opts = || AgentOptions {
        state_dir: Some(state.clone()),
        extra_yaml: "flow_idle_timeout_secs: 1\n".into(),
        ..Default::default()
    };
    let h1 = topo.host(1);
    let mac = mdsec_agent::base::net::mac_string(h1.mac().unwrap());
    let device = |a: &Agent| -> anyhow::Result<Option<u64>> {
        Ok(a.devices()?.into_iter().find(|d| d.mac == mac && d.iface == h1.gw_if).map(|d| d.packets))
    };
    let agent = Agent::start(&topo, opts()).unwrap();
    assert_eq!(udp(&topo, 1, 2, 9400, 20), 20);
    // The flows age out of the kernel: the device keeps their frames.
    let before = agent
        .wait_for(
            Duration::from_secs(15),
            |a| Ok((device(a)?, a.flows()?.iter().any(|f| f.dport == 9400))),
            |&(d, flowing)| d.filter(|&n| n >= 20 && !flowing),
        )
        .unwrap();
    drop(agent); // a clean stop stores the inventory
    let agent = Agent::start(&topo, opts()).unwrap();
    assert_eq!(udp(&topo, 1, 2, 9401, 5), 5);
    // Stored totals + this run's frames, none counted twice or lost.
    let after =
        agent.wait_for(Duration::from_secs(10), |a| device(a), |d| d.filter(|&n| n >= before + 5)).unwrap();
    assert!(after < before + 5 + 20, "{before} then {after}: counted twice?");
    drop(agent);
    let _ = std::fs::remove_dir_all(&state);
}

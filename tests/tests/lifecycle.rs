//! Agent lifecycle: clean stop detaches, `on_exit: keep` hands the datapath to the
//! next agent without losing counts, and a failing test leaves nothing behind.

use std::{net::SocketAddr, process::Command, time::Duration};

use mdsec_tests::{
    agent::{Agent, AgentOptions},
    netns::{self, SharedBpffs, Topology},
    traffic,
};

fn xdp_attached(ns: &str, ifname: &str) -> bool {
    let out = netns::ip(&["-n", ns, "-d", "link", "show", "dev", ifname]).unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    s.contains("prog/xdp")
}

#[test]
fn clean_stop_detaches_xdp() {
    let topo = Topology::new(1).unwrap();
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let gw_if = &topo.host(1).gw_if;
    assert!(xdp_attached(&topo.gw, gw_if));
    let ifaces: Vec<mdsec_agent::surfaces::model::Interface> = agent.get("/api/v1/interfaces").unwrap();
    assert_eq!(ifaces.len(), 1);
    assert_eq!((ifaces[0].requested_mode.as_str(), ifaces[0].effective_mode.as_str()), ("driver", "driver"));
    assert!(agent.stop().unwrap().success());
    assert!(!xdp_attached(&topo.gw, gw_if), "XDP still attached after a clean stop");
}

#[test]
fn generic_mode_is_attached_as_asked() {
    let topo = Topology::new(1).unwrap();
    let agent = Agent::start(&topo, AgentOptions { xdp_mode: "skb", ..Default::default() }).unwrap();
    let ifaces: Vec<mdsec_agent::surfaces::model::Interface> = agent.get("/api/v1/interfaces").unwrap();
    assert_eq!(ifaces[0].effective_mode, "skb");
    assert!(agent.log().contains("effective mode skb"), "{}", agent.log());
}

#[test]
fn keep_on_exit_hands_over_without_losing_counts() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let fs = SharedBpffs::new(&topo.id);
    let opts = || AgentOptions {
        extra_yaml: format!("on_exit: keep\npin_dir: {}\n", fs.0.join("mdsec").display()),
        ..Default::default()
    };
    let (h1, h2) = (topo.host(1), topo.host(2));
    let _rx = traffic::udp_receiver(h2, false, 9300).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    let to = SocketAddr::new(h2.v4().into(), 9300);
    let sport = tx.local_addr().unwrap().port();
    let flow = |a: &Agent| {
        a.flows()
            .unwrap()
            .into_iter()
            .find(|f| f.sport == sport && f.dport == 9300)
            .map(|f| f.packets)
            .unwrap_or(0)
    };

    let first = Agent::start(&topo, opts()).unwrap();
    traffic::send_udp(&tx, to, 100, 64).unwrap();
    first.wait_for(Duration::from_secs(10), |a| Ok(flow(a)), |n| (*n == 100).then_some(())).unwrap();
    assert!(first.stop().unwrap().success());
    assert!(xdp_attached(&topo.gw, &h1.gw_if), "on_exit: keep must leave XDP attached");

    // Counted by the datapath while no agent runs.
    traffic::send_udp(&tx, to, 50, 64).unwrap();
    let second = Agent::start(&topo, opts()).unwrap();
    assert!(second.log().contains("replaced the program of a pinned link"), "{}", second.log());
    second.wait_for(Duration::from_secs(10), |a| Ok(flow(a)), |n| (*n == 150).then_some(())).unwrap();
    traffic::send_udp(&tx, to, 25, 64).unwrap();
    second.wait_for(Duration::from_secs(10), |a| Ok(flow(a)), |n| (*n == 175).then_some(())).unwrap();

    // `detach` removes what `keep` left.
    assert!(second.stop().unwrap().success());
    let cfg = std::env::temp_dir().join(format!("{}-detach.yaml", topo.id));
    std::fs::write(
        &cfg,
        format!(
            "interfaces:\n  - name: gw1\n    role: inline\n    xdp_mode: driver\npin_dir: {}\n",
            fs.0.join("mdsec").display()
        ),
    )
    .unwrap();
    let st = Command::new(mdsec_tests::agent::agent_bin())
        .args(["detach", "--config"])
        .arg(&cfg)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_file(&cfg).unwrap();
    // The kernel releases a link whose last pin is gone from a work queue
    // (`detach` waits for it where it can see the interfaces; here they are
    // in another namespace).
    let t0 = std::time::Instant::now();
    while xdp_attached(&topo.gw, &h1.gw_if) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!xdp_attached(&topo.gw, &h1.gw_if), "detach left XDP attached");
    // bpffs comes with maps.debug and progs.debug of its own.
    let left: Vec<_> =
        walk(&fs.0).into_iter().filter(|p| p.extension().is_none_or(|e| e != "debug")).collect();
    assert!(left.is_empty(), "pins left behind: {left:?}");
}

/// Run only as the child of `a_failing_test_leaves_nothing_behind`.
#[test]
#[ignore]
fn deliberately_failing_run() {
    if std::env::var_os("MDSEC_DELIBERATE_FAILURE").is_none() {
        return;
    }
    let topo = Topology::new(2).unwrap();
    let _agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    println!("topology {}", topo.id);
    panic!("deliberate failure with a topology and an agent up");
}

#[test]
fn a_failing_test_leaves_nothing_behind() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "deliberately_failing_run", "--nocapture"])
        .env("MDSEC_DELIBERATE_FAILURE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the child test should fail:\n{stdout}");
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("topology "))
        .expect("child printed its topology")
        .to_string();
    assert!(
        stdout.contains("deliberate failure")
            || String::from_utf8_lossy(&out.stderr).contains("deliberate failure")
    );
    let left: Vec<String> = netns::leftover_namespaces().into_iter().filter(|n| n.starts_with(&id)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!std::env::temp_dir().join(&id).exists(), "agent dir left behind");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[test]
fn a_pinned_policy_survives_a_keep_restart_and_goes_when_policy_dir_is_removed() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let fs = SharedBpffs::new(&topo.id);
    let pins = format!("on_exit: keep\npin_dir: {}\n", fs.0.join("mdsec").display());
    let seg = "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n";
    let (h1, h2) = (topo.host(1), topo.host(2));
    let rx = traffic::udp_receiver(h2, false, 9400).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    let to = SocketAddr::new(h2.v4().into(), 9400);
    let probe = || {
        traffic::send_and_settle(&tx, to, 5, 16).unwrap();
        traffic::drain(&rx)
    };

    let first = Agent::start(
        &topo,
        AgentOptions {
            extra_yaml: pins.clone(),
            policy: vec![("pumps.yaml".into(), seg.into())],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(probe(), 0);
    assert!(first.stop().unwrap().success());
    // No agent: the pinned datapath keeps enforcing.
    assert_eq!(probe(), 0);
    // A new agent without policy_dir turns the old policy off.
    let second =
        Agent::start(&topo, AgentOptions { extra_yaml: pins.clone(), ..Default::default() }).unwrap();
    assert_eq!(probe(), 5);
    assert!(second.log().contains("turning off policy generation 1"), "{}", second.log());
    drop(second);
    let _ = mdsec_agent::datapath::loader::remove_pins(&mdsec_agent::datapath::loader::layout_dir(
        &fs.0.join("mdsec"),
    ));
}

/// An upgrade appends counters to `STATS`: the pinned map an older agent left
/// (fewer cells) is not thrown away, its counts move into the new one.
#[test]
fn an_upgrade_carries_the_older_agents_counters_over() {
    use mdsec_common::stats::{Counter, STATS_LEN, Stat};
    let topo = Topology::new(1).unwrap();
    let fs = SharedBpffs::new(&topo.id);
    let pin_dir = fs.0.join("mdsec");
    let opts = || AgentOptions {
        extra_yaml: format!("on_exit: keep\npin_dir: {}\n", pin_dir.display()),
        ..Default::default()
    };
    let first = Agent::start(&topo, opts()).unwrap();
    assert!(first.stop().unwrap().success());
    // What an agent with ten reasons fewer would have pinned.
    let stats = mdsec_agent::datapath::loader::layout_dir(&pin_dir).join("maps/STATS");
    std::fs::remove_file(&stats).unwrap();
    let old = [
        (Stat::Pass as u32, Counter { packets: 7000, bytes: 700_000 }),
        (Stat::Arp as u32, Counter { packets: 1234, bytes: 74_040 }),
    ];
    mdsec_tests::kernel::pin_old_stats(&stats, STATS_LEN - 10, &old).unwrap();

    let second = Agent::start(&topo, opts()).unwrap();
    assert!(
        second.log().contains(&format!("STATS: carrying {} counters", STATS_LEN - 10)),
        "{}",
        second.log()
    );
    let s = second.stats().unwrap();
    assert!(s["pass"].packets >= 7000 && s["pass"].bytes >= 700_000, "{:?}", s["pass"]);
    assert!(s["arp"].packets >= 1234, "{:?}", s["arp"]);
    // Counting goes on in the carried cells.
    topo.warm_up().unwrap();
    second
        .wait_for(Duration::from_secs(10), |a| a.stat("arp"), |c| (c.packets > 1234).then_some(()))
        .unwrap();
    assert!(second.stop().unwrap().success());
}

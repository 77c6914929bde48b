//! The CLI against a running agent, flow ageing, and `check` on bad input.

use std::{net::SocketAddr, process::Command, time::Duration};

use mdsec_agent::surfaces::model::{Device, Flow};
use mdsec_tests::{
    agent::{Agent, AgentOptions, agent_bin},
    netns::Topology,
    traffic,
};

fn cli(topo: &Topology, args: &[&str]) -> String {
    let out =
        Command::new("ip").args(["netns", "exec", &topo.gw]).arg(agent_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn flows_and_devices_commands_print_tables_and_json() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    let _rx = traffic::udp_receiver(h2, false, 9400).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    traffic::send_udp(&tx, SocketAddr::new(h2.v4().into(), 9400), 10, 50).unwrap();
    let sport = tx.local_addr().unwrap().port();
    agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.flows(),
            |f| f.iter().find(|f| f.sport == sport && f.packets == 10).cloned(),
        )
        .unwrap();

    let flows: Vec<Flow> = serde_json::from_str(&cli(&topo, &["flows", "--json"])).unwrap();
    let f = flows.iter().find(|f| f.sport == sport).expect("flow in CLI JSON");
    assert_eq!((f.packets, f.bytes, f.dport, f.proto.as_str()), (10, 10 * (14 + 20 + 8 + 50), 9400, "udp"));
    assert_eq!(flows, agent.flows().unwrap().into_iter().filter(|x| flows.contains(x)).collect::<Vec<_>>());

    let table = cli(&topo, &["flows"]);
    assert!(table.starts_with("IFACE"), "{table}");
    let row = table.lines().find(|l| l.contains(&format!("10.0.1.2:{sport}"))).expect("flow row");
    assert!(row.contains("10.0.2.2:9400") && row.contains("udp"), "{row}");

    let mac = mdsec_agent::base::net::mac_string(h1.mac().unwrap());
    let devices: Vec<Device> = serde_json::from_str(&cli(&topo, &["devices", "--json"])).unwrap();
    assert!(devices.iter().any(|d| d.mac == mac && d.ips.contains(&"10.0.1.2".to_string())));
    assert!(cli(&topo, &["devices"]).lines().any(|l| l.contains(&mac) && l.contains("10.0.1.2")));
    assert!(cli(&topo, &["stats"]).lines().any(|l| l.starts_with("udp ")));

    // The API's filters: the device's flows only, paging, and a bad value refused
    // with the parameter named.
    let mine: Vec<Flow> =
        serde_json::from_str(&cli(&topo, &["flows", "--json", "--device", &mac, "--all"])).unwrap();
    assert!(mine.iter().any(|f| f.sport == sport));
    // The device's own addresses, IPv6 too (its neighbour advertisements,
    // from its global or its link-local address): the ones the agent lists.
    let listed: Vec<Device> = agent.devices().unwrap();
    let mut own: Vec<String> = listed.iter().filter(|d| d.mac == mac).flat_map(|d| d.ips.clone()).collect();
    own.extend([h1.v4().to_string(), h1.v6().to_string()]);
    assert!(mine.iter().all(|f| own.contains(&f.src) || own.contains(&f.dst)), "{mine:?} {own:?}");
    let one: Vec<Flow> = serde_json::from_str(&cli(&topo, &["flows", "--json", "--limit", "1"])).unwrap();
    assert_eq!(one.len(), 1);
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.gw])
        .arg(agent_bin())
        .args(["flows", "--verdict", "dropped"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("400") && err.contains("verdict: `dropped`"), "{err}");
}

#[test]
fn idle_flows_age_out_of_kernel_and_api() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions { extra_yaml: "flow_idle_timeout_secs: 1\n".into(), ..Default::default() },
    )
    .unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    let _rx = traffic::udp_receiver(h2, false, 9500).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    let to = SocketAddr::new(h2.v4().into(), 9500);
    let sport = tx.local_addr().unwrap().port();
    let packets = |a: &Agent| Ok(a.flows()?.iter().find(|f| f.sport == sport).map(|f| f.packets));
    traffic::send_udp(&tx, to, 5, 10).unwrap();
    agent.wait_for(Duration::from_secs(5), packets, |p| (*p == Some(5)).then_some(())).unwrap();
    agent.wait_for(Duration::from_secs(10), packets, |p| p.is_none().then_some(())).unwrap();
    // The kernel entry went too: new packets start a new flow from zero.
    traffic::send_udp(&tx, to, 3, 10).unwrap();
    agent.wait_for(Duration::from_secs(5), packets, |p| (*p == Some(3)).then_some(())).unwrap();
}

#[test]
fn check_names_file_line_and_column() {
    let dir = std::env::temp_dir().join(mdsec_tests::netns::unique_id());
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("agent.yaml");
    std::fs::write(&bad, "interfaces:\n  - name: eth1\n    role: inline\n    xdp_mode: native\n").unwrap();
    let out = Command::new(agent_bin()).args(["check", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("{}:4:15: ", bad.display())), "{err}");

    let good = dir.join("good.yaml");
    std::fs::write(&good, "interfaces:\n  - name: eth1\n    role: inline\n    xdp_mode: skb\n").unwrap();
    let out = Command::new(agent_bin()).args(["check", "--config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // `run` refuses a bad config the same way, before touching anything.
    let out = Command::new(agent_bin()).args(["run", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":4:15:"));
    std::fs::remove_dir_all(&dir).unwrap();
}

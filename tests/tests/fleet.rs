//! The fleet's Kafka producer against a real Kafka-protocol broker (Tansu,
//! installed by `cargo xtask setup`), on loopback in the gateway's namespace:
//! every event, flow record and inventory record the agent spooled reaches
//! the topics, across an agent killed with a full spool and a broker killed
//! under traffic, with no message id missing.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mdsec_tests::{
    agent::{Agent, AgentOptions, cli_in},
    netns::{TempDir, Topology, in_netns},
    traffic,
};
use rdkafka::{
    ClientConfig, Message, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};

const PORT: u16 = 19092;
const TOPICS: [&str; 3] = ["mdsec.events", "mdsec.flows", "mdsec.inventory"];

fn tansu() -> PathBuf {
    let home = std::env::var("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
    });
    home.join("bin/tansu")
}

/// The broker, in `ns`, storing in `dir` (kept across restarts: the topics
/// survive a SIGKILL). Killed with SIGKILL when dropped.
struct Broker {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    fn start(ns: &str, dir: &std::path::Path) -> Broker {
        std::fs::create_dir_all(dir).unwrap();
        let mut b = Broker { ns: ns.into(), dir: dir.into(), child: None };
        b.restart();
        b
    }

    fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{PORT}");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("broker.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://broker.db"])
            .current_dir(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("tansu (cargo xtask setup installs it)");
        self.child = Some(child);
        let t0 = Instant::now();
        while !self.answers() {
            assert!(t0.elapsed() < Duration::from_secs(20), "the broker did not come up: {}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn answers(&self) -> bool {
        let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{PORT}");
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "bash", "-c", &probe])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own child, not yet reaped, by PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    fn create_topics(&self) {
        for (t, compact) in [(TOPICS[0], false), (TOPICS[1], false), (TOPICS[2], true)] {
            let url = format!("tcp://127.0.0.1:{PORT}");
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &self.ns]).arg(tansu()).args(["topic", "create", "--broker", &url]);
            cmd.args(["--partitions", "3"]);
            if compact {
                cmd.args(["--config", "cleanup.policy=compact"]);
            }
            let out = cmd.arg(t).output().unwrap();
            assert!(out.status.success(), "topic create {t}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every message of `topic` from the beginning: (key, value) with the value
/// parsed (None for a tombstone).
fn read_topic(ns: &str, topic: &'static str) -> Vec<(String, Option<serde_json::Value>)> {
    in_netns(ns, move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{PORT}"))
            .set("group.id", "mdsec-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let parts = md.topics()[0].partitions().len() as i32;
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..parts {
            let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let t0 = Instant::now();
        while ends.iter().any(|(p, h)| next.get(p).copied().unwrap_or(0) < *h) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "reading {topic} stalled at {next:?} of {ends:?}"
            );
            let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
            let m = m.unwrap();
            next.insert(m.partition(), m.offset() + 1);
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let value = m.payload().map(|v| serde_json::from_slice(v).expect("messages are JSON"));
            out.push((key, value));
        }
        out
    })
    .unwrap()
}

fn metric(agent: &Agent, name: &str, topic: Option<&str>) -> f64 {
    let m = agent.metrics().unwrap();
    match topic {
        Some(t) => m.sum(name, &[("topic", t)]),
        None => m.sum(name, &[]),
    }
}

/// `n` short UDP conversations h1 → h2, each from its own port (a flow
/// record each once idle), and h2's answers make it a device too.
fn conversations(topo: &Topology, n: usize) {
    let rx = traffic::udp_receiver(topo.host(2), false, 7000).unwrap();
    for _ in 0..n {
        let tx = traffic::udp_socket(topo.host(1), false).unwrap();
        traffic::send_udp(&tx, std::net::SocketAddr::new(topo.host(2).ip(false), 7000), 2, 64).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    traffic::drain(&rx);
}

#[test]
fn every_spooled_message_reaches_the_broker_across_an_agent_kill_and_a_broker_kill() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let state_dir = TempDir(std::env::temp_dir().join(format!("{}-state", topo.id)));
    let state = state_dir.0.clone();
    let yaml = format!(
        "flow_idle_timeout_secs: 1\nkafka:\n  brokers: [\"127.0.0.1:{PORT}\"]\n  site: north\n  gateway: gw-a\n  \
         inventory_refresh_secs: 3600\n"
    );
    let opts =
        || AgentOptions { extra_yaml: yaml.clone(), state_dir: Some(state.clone()), ..Default::default() };

    // 1. No broker yet: everything goes to the spool.
    let agent = Agent::start(&topo, opts()).unwrap();
    conversations(&topo, 20);
    let spooled = |a: &Agent, t: &str| metric(a, "mdsec_kafka_spooled_total", Some(t));
    agent
        .wait_for(
            Duration::from_secs(20),
            |a| Ok((spooled(a, "flows"), spooled(a, "inventory"))),
            |&(f, i)| (f >= 20.0 && i >= 2.0).then_some(()),
        )
        .unwrap();
    let kinds = ["events", "flows", "inventory"];
    let first: Vec<f64> = kinds.iter().map(|t| spooled(&agent, t)).collect();
    let first_run: f64 = first.iter().sum();
    assert_eq!(metric(&agent, "mdsec_kafka_delivered_total", Some("flows")), 0.0);
    assert!(metric(&agent, "mdsec_kafka_spool_messages", None) >= first_run);
    // 2. Killed with a full spool.
    agent.crash();

    // 3. The broker comes; the agent restarts on the same state: the first run's messages go out.
    let broker_dir = std::env::temp_dir().join(format!("{}-broker", topo.id));
    let mut broker = Broker::start(&topo.gw, &broker_dir);
    broker.create_topics();
    let agent = Agent::start(&topo, opts()).unwrap();
    let drained = |a: &Agent| -> Result<(f64, f64, f64), anyhow::Error> {
        let d: f64 = ["events", "flows", "inventory"]
            .iter()
            .map(|t| metric(a, "mdsec_kafka_delivered_total", Some(t)))
            .sum();
        Ok((d, metric(a, "mdsec_kafka_spool_messages", None), metric(a, "mdsec_kafka_connected", None)))
    };
    agent
        .wait_for(Duration::from_secs(60), drained, |&(d, p, _)| (d >= first_run && p == 0.0).then_some(()))
        .unwrap();

    // 4. The broker killed under traffic for 10 s, then back.
    conversations(&topo, 10);
    std::thread::sleep(Duration::from_secs(2));
    broker.kill();
    conversations(&topo, 30);
    std::thread::sleep(Duration::from_secs(8));
    assert!(metric(&agent, "mdsec_kafka_spool_messages", None) >= 30.0, "{}", agent.log());
    broker.restart();
    agent.wait_for(Duration::from_secs(90), drained, |&(_, p, _)| (p == 0.0).then_some(())).unwrap();
    let second: Vec<f64> = kinds.iter().map(|t| spooled(&agent, t)).collect();
    assert!(metric(&agent, "mdsec_kafka_dropped_total", None) == 0.0);

    // What the topics hold: every message id of both runs, each with its origin.
    let mut ids = BTreeSet::new();
    let mut per_topic = BTreeMap::new();
    for t in TOPICS {
        let msgs = read_topic(&topo.gw, t);
        let mut distinct = BTreeSet::new();
        for (key, v) in &msgs {
            let v = v.as_ref().expect("no device was decommissioned");
            assert_eq!(v["site"], "north", "{v}");
            assert_eq!(v["gateway"], "gw-a", "{v}");
            let id = v["message_id"].as_str().unwrap().to_string();
            distinct.insert(id.clone());
            ids.insert(id);
            if t == "mdsec.inventory" {
                assert_eq!(key, &format!("north/{}", v["mac"].as_str().unwrap()));
            } else {
                assert_eq!(key, "north/gw-a");
            }
        }
        per_topic.insert(t, (msgs.len(), distinct.len()));
    }
    // Events and flows: every message of both runs, each once. The
    // inventory topic is compacted: the newest record of each device.
    for (i, t) in TOPICS.iter().enumerate().take(2) {
        assert_eq!(per_topic[t].1 as f64, first[i] + second[i], "{t}: {per_topic:?}");
    }
    assert_eq!(per_topic["mdsec.inventory"].1, 2, "{per_topic:?}");
    // The spool numbers every message of both runs 0, 1, 2, … under one
    // incarnation; the only numbers absent are inventory records compaction replaced.
    let total = first_run + second.iter().sum::<f64>();
    let incarnations: BTreeSet<&str> = ids.iter().map(|i| i.split('-').next().unwrap()).collect();
    assert_eq!(incarnations.len(), 1);
    let seqs: BTreeSet<u64> = ids.iter().map(|i| i.split('-').nth(1).unwrap().parse().unwrap()).collect();
    let missing = (0..total as u64).filter(|s| !seqs.contains(s)).count() as f64;
    assert_eq!(missing, first[2] + second[2] - 2.0, "{per_topic:?}");
    let macs: BTreeSet<String> = read_topic(&topo.gw, "mdsec.inventory")
        .into_iter()
        .filter_map(|(_, v)| Some(v?["mac"].as_str()?.to_string()))
        .collect();
    for h in [1, 2] {
        let mac = topo.host(h).mac().unwrap();
        let text = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        assert!(macs.contains(&text), "{text} not in {macs:?}");
    }
    // The fleet view: each device once, with its site and gateway.
    let brokers = format!("127.0.0.1:{PORT}");
    let (ok, out, err) = cli_in(&topo.gw, &["fleet", "--brokers", &brokers, "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let shown: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["site"].as_str().unwrap().into(),
                r["gateway"].as_str().unwrap().into(),
                r["mac"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut expect: Vec<(String, String, String)> =
        macs.iter().map(|m| ("north".to_string(), "gw-a".to_string(), m.clone())).collect();
    expect.sort();
    assert_eq!(shown, expect);
    let (ok, out, err) = cli_in(&topo.gw, &["fleet", "--brokers", &brokers, "--show", "sites", "--json"]);
    assert!(ok, "{err}");
    let sites: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(sites[0]["site"], "north");
    assert_eq!(sites[0]["devices"], 2);
    agent.stop().unwrap();
    drop(broker);
}

#[test]
fn a_broker_without_the_topics_is_a_clear_error_and_the_datapath_carries_on() {
    let topo = Topology::new(2).unwrap();
    topo.warm_up().unwrap();
    let broker_dir = std::env::temp_dir().join(format!("{}-broker", topo.id));
    // Topics are never created: the broker refuses every produce.
    let _broker = Broker::start(&topo.gw, &broker_dir);
    let yaml =
        format!("flow_idle_timeout_secs: 1\nkafka:\n  brokers: [\"127.0.0.1:{PORT}\"]\n  site: south\n");
    let agent = Agent::start(&topo, AgentOptions { extra_yaml: yaml, ..Default::default() }).unwrap();
    conversations(&topo, 10);
    let log = agent
        .wait_for(
            Duration::from_secs(60),
            |a| Ok(a.log()),
            |l| l.contains("create the topic").then(|| l.clone()),
        )
        .unwrap();
    assert!(log.contains("kafka:"), "{log}");
    assert_eq!(metric(&agent, "mdsec_kafka_delivered_total", Some("flows")), 0.0);
    assert!(metric(&agent, "mdsec_kafka_spool_messages", None) >= 10.0);
    // The datapath and the API are unaffected: the next traffic is counted
    // exactly (5 conversations of 2 datagrams) and spooled as flow records.
    let udp = |a: &Agent| a.stat("udp").map(|c| c.packets);
    let before = udp(&agent).unwrap();
    let spooled = metric(&agent, "mdsec_kafka_spooled_total", Some("flows"));
    conversations(&topo, 5);
    agent.wait_for(Duration::from_secs(10), udp, |&n| (n == before + 10).then_some(())).unwrap();
    agent
        .wait_for(
            Duration::from_secs(10),
            |a| Ok(metric(a, "mdsec_kafka_spooled_total", Some("flows"))),
            |&n| (n == spooled + 5.0).then_some(()),
        )
        .unwrap();
    agent.stop().unwrap();
}

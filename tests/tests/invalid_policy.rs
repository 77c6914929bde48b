//! Every invalid policy in `tests/corpus/invalid` (plus a non-UTF-8 and an oversized
//! file made here) is refused by `check` with a `file:line` message and exit 1, and,
//! applied as a hot reload, leaves the previous policy enforcing.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mdsec_tests::{
    agent::{Agent, AgentOptions, agent_bin},
    netns::{Topology, unique_id},
    traffic,
};

const ZONES: &str = "zones:\n  pharmacy: [10.0.2.0/24]\n  workstations: [10.0.3.0/24]\n";
const PUMPS: &str = "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\nallow:\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n";

struct Case {
    name: String,
    /// File name inside the policy directory.
    target: String,
    bytes: Vec<u8>,
    /// Expected line, or None for "any line".
    line: Option<u64>,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/invalid");
    let mut cases = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line `# expect: LINE`");
        let target = text
            .lines()
            .find_map(|l| l.strip_prefix("# file: "))
            .map_or("bad.yaml".to_string(), |t| t.trim().to_string());
        cases.push(Case {
            name: f.file_name().unwrap().to_string_lossy().into(),
            target,
            bytes,
            line: expect.trim().parse().ok(),
        });
    }
    let mut non_utf8 = b"segment: extra\nfunction: \"caf".to_vec();
    non_utf8.extend_from_slice(&[0xe9, 0xff]);
    non_utf8.extend_from_slice(b"\"\nmode: enforce\n");
    cases.push(Case { name: "non-utf8".into(), target: "bad.yaml".into(), bytes: non_utf8, line: Some(2) });
    let mut huge = b"segment: extra\nfunction: \"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 2 << 20));
    huge.extend_from_slice(b"\"\n");
    cases.push(Case { name: "huge-file".into(), target: "bad.yaml".into(), bytes: huge, line: Some(1) });
    assert!(cases.len() >= 20, "the corpus shrank to {}", cases.len());
    cases
}

fn write_policy(dir: &Path, case: Option<&Case>) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("zones.yaml"), ZONES).unwrap();
    std::fs::write(dir.join("pumps.yaml"), PUMPS).unwrap();
    if let Some(c) = case {
        std::fs::write(dir.join(&c.target), &c.bytes).unwrap();
    }
}

fn expected_prefix(dir: &Path, c: &Case) -> String {
    let path = dir.join(&c.target);
    match c.line {
        Some(l) => format!("{}:{l}:", path.display()),
        None => format!("{}:", path.display()),
    }
}

#[test]
fn check_refuses_every_invalid_policy_with_its_location() {
    let root = std::env::temp_dir().join(unique_id());
    let pdir = root.join("policy");
    let cfg = root.join("agent.yaml");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "interfaces:\n  - name: eth1\n    role: inline\n    xdp_mode: skb\npolicy_dir: {}\n",
            pdir.display()
        ),
    )
    .unwrap();
    write_policy(&pdir, None);
    let ok = Command::new(agent_bin()).args(["check", "--config"]).arg(&cfg).output().unwrap();
    assert!(ok.status.success(), "the base policy must be valid: {}", String::from_utf8_lossy(&ok.stderr));

    let mut failures = Vec::new();
    for c in corpus() {
        write_policy(&pdir, Some(&c));
        let t0 = Instant::now();
        let out = Command::new(agent_bin()).args(["check", "--config"]).arg(&cfg).output().unwrap();
        let took = t0.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        let want = expected_prefix(&pdir, &c);
        if out.status.code() != Some(1)
            || !err.lines().any(|l| l.starts_with(&want))
            || took > Duration::from_secs(3)
        {
            failures.push(format!(
                "{}: exit {:?} in {took:?}, wanted a line starting {want}\n{err}",
                c.name,
                out.status.code()
            ));
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn check_refuses_detection_zones_the_policy_does_not_define_at_their_place() {
    // Removed also when an assertion fails.
    let dir = mdsec_tests::netns::TempDir(std::env::temp_dir().join(unique_id()));
    let root = &dir.0;
    let pdir = root.join("policy");
    let cfg = root.join("agent.yaml");
    std::fs::create_dir_all(root).unwrap();
    write_policy(&pdir, None);
    let write = |detection: &str| {
        let text = format!(
            "interfaces:\n  - name: eth1\n    role: inline\n    xdp_mode: skb\npolicy_dir: {}\ndetection:\n{detection}",
            pdir.display()
        );
        std::fs::write(&cfg, text).unwrap();
        Command::new(agent_bin()).args(["check", "--config"]).arg(&cfg).output().unwrap()
    };
    let ok = write("  clinical_zones:\n    pharmacy: pharmacy\n  admin_zones: [workstations]\n");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let bad = write(
        "  clinical_zones:\n    pharmacy: pharmacy\n    pacs: pacs\n  admin_zones: [workstations, it]\n",
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    let c = cfg.display();
    for want in [
        format!("{c}:9:11: detection.clinical_zones: `pacs` is not a zone of the policy"),
        format!("{c}:10:31: detection.admin_zones: `it` is not a zone of the policy"),
    ] {
        assert!(err.lines().any(|l| l.starts_with(&want)), "wanted {want}\n{err}");
    }
}

#[test]
fn invalid_hot_reloads_keep_the_previous_policy_enforcing() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let mut agent = Agent::start(
        &topo,
        AgentOptions {
            policy: vec![("zones.yaml".into(), ZONES.into()), ("pumps.yaml".into(), PUMPS.into())],
            ..Default::default()
        },
    )
    .unwrap();
    let good_gen = agent.generation().unwrap();
    assert!(good_gen >= 1);
    let pdir = agent.policy_dir();
    let (h1, h2) = (topo.host(1), topo.host(2));
    let rx_ok = traffic::udp_receiver(h2, false, 9000).unwrap();
    let rx_denied = traffic::udp_receiver(h2, false, 9001).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    let probe = || {
        traffic::send_and_settle(&tx, SocketAddr::new(h2.v4().into(), 9000), 5, 32).unwrap();
        traffic::send_and_settle(&tx, SocketAddr::new(h2.v4().into(), 9001), 5, 32).unwrap();
        (traffic::drain(&rx_ok), traffic::drain(&rx_denied))
    };
    assert_eq!(probe(), (5, 0));

    for c in corpus() {
        write_policy(&pdir, Some(&c));
        let st = agent.reload().unwrap();
        assert_eq!(st["last_reload_ok"], false, "{}: {st}", c.name);
        assert_eq!(st["generation"].as_u64(), Some(good_gen), "{}: generation moved", c.name);
        let want = expected_prefix(&pdir, &c);
        let diags: Vec<String> = serde_json::from_value(st["diagnostics"].clone()).unwrap();
        assert!(diags.iter().any(|d| d.starts_with(&want)), "{}: {diags:?}", c.name);
        assert_eq!(probe(), (5, 0), "{}: the previous policy must keep enforcing", c.name);
    }
    // Fixing the directory makes the next reload succeed.
    write_policy(&pdir, None);
    let st = agent.reload().unwrap();
    assert_eq!(st["last_reload_ok"], true);
    assert!(st["generation"].as_u64().unwrap() > good_gen);
    assert!(agent.alive());
}

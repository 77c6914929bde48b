//! The surfaces' security: TLS (rustls) for the API and `/metrics`, basic
//! auth for `/metrics` scraped by Debian's real Prometheus, bearer tokens,
//! write endpoints that need a token off loopback, the audit of API writes,
//! and the refusal of unsafe or broken configurations with located errors.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mdsec_tests::{
    agent::{Agent, AgentOptions, agent_bin, curl_in},
    netns::{Bg, Topology, in_netns},
    pki::Pki,
};

const TOKEN: &str = "0123456789abcdef-test-token";

fn tls_yaml(pki: &Pki, listen: &str, token: Option<&Path>, users: &str) -> String {
    let mut y = format!(
        "listen: {listen}\napi:\n  tls_server_config:\n    cert_file: {}\n    key_file: {}\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    );
    if let Some(t) = token {
        y += &format!("  token_file: {}\n", t.display());
    }
    y += users;
    y
}

/// Debian's Prometheus in `ns`, scraping `target` over HTTPS with basic auth.
/// Ended by PID when dropped (`Bg`).
struct Prometheus {
    _bg: Bg,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(ns: &str, dir: &Path, target: &str, ca: &Path) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mdsec\n    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: prometheus\n      password: s3cret\n    static_configs:\n      - targets: ['{target}']\n",
            ca.display()
        );
        std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let bg = Bg::spawn(
            Command::new("ip")
                .args(["netns", "exec", ns, "prometheus"])
                .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg("--web.listen-address=127.0.0.1:19091")
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        Prometheus { _bg: bg, dir: dir.to_path_buf() }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

#[test]
fn tls_basic_auth_and_tokens_with_a_real_prometheus() {
    let topo = Topology::new(1).unwrap();
    topo.warm_up().unwrap();
    let dir = std::env::temp_dir().join(format!("{}-sec", topo.id));
    let pki = Pki::new(&dir, &["127.0.0.1"]).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    let users = format!("  basic_auth_users:\n    prometheus: \"{hash}\"\n");
    let agent = Agent::start(
        &topo,
        AgentOptions {
            extra_yaml: tls_yaml(&pki, "127.0.0.1:9740", Some(&token), &users),
            https_ca: Some(pki.path("ca.pem")),
            ..Default::default()
        },
    )
    .unwrap();

    // /metrics: basic auth; /api: the bearer token.
    assert_eq!(agent.curl("/metrics", &[]).unwrap().0, 401);
    assert_eq!(agent.curl("/metrics", &["-u", "prometheus:wrong"]).unwrap().0, 401);
    let (st, body) = agent.curl("/metrics", &["-u", "prometheus:s3cret"]).unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("mdsec_datapath_packets_total"), "{body}");
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    assert_eq!(agent.curl("/api/v1/stats", &["-H", &bearer("wrong-token-0000000")]).unwrap().0, 401);
    assert_eq!(agent.curl("/api/v1/stats", &[]).unwrap().0, 401);
    assert_eq!(agent.curl("/api/v1/stats", &["-H", &bearer(TOKEN)]).unwrap().0, 200);
    // Without the test CA the server is not trusted.
    let untrusted = curl_in(&topo.gw, None, "https://127.0.0.1:9740/healthz", &[]);
    assert!(untrusted.is_err_and(|e| e.to_string().contains("certificate")));

    // A plain-HTTP client against the TLS port gets no HTTP answer (the
    // handshake fails and the connection closes), and the agent carries on.
    let addr: SocketAddr = "127.0.0.1:9740".parse().unwrap();
    let mut s = in_netns(&topo.gw, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/"), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(agent.curl("/healthz", &[]).unwrap(), (200, "ok\n".into()));

    // The CLI speaks TLS too.
    let cli = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &topo.gw])
            .arg(agent_bin())
            .args(args)
            .args(["--api", "https://127.0.0.1:9740", "--ca-file"])
            .arg(pki.path("ca.pem"))
            .output()
            .unwrap()
    };
    let o = cli(&["stats", "--json", "--token-file", token.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(stats["pass"]["packets"].is_u64() && stats["drop"]["packets"].is_u64(), "{stats}");
    let o = cli(&["stats"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("401"));

    // Debian's Prometheus scrapes over TLS with basic auth.
    let prom = Prometheus::start(&topo.gw, &dir.join("prom"), "127.0.0.1:9740", &pki.path("ca.pem"));
    let t0 = Instant::now();
    loop {
        let up = curl_in(
            &topo.gw,
            None,
            "http://127.0.0.1:19091/api/v1/query?query=up%7Bjob%3D%22mdsec%22%7D",
            &[],
        );
        if let Ok((200, body)) = &up
            && body.contains(r#""value":["#)
            && body.contains(r#","1"]"#)
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(40), "no successful scrape: {up:?}\n{}", prom.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(prom);
    drop(agent);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writes_from_another_host_need_a_token_and_every_write_is_audited() {
    let topo = Topology::new(1).unwrap();
    topo.warm_up().unwrap();
    let h1 = topo.host(1);
    let dir = std::env::temp_dir().join(format!("{}-sec", topo.id));
    let gw_ip = h1.gw_v4().to_string();
    let pki = Pki::new(&dir, &["127.0.0.1", &gw_ip]).unwrap();
    // TLS and no token: a non-loopback listen is allowed, writes off loopback are not.
    let agent = Agent::start(
        &topo,
        AgentOptions {
            extra_yaml: tls_yaml(&pki, "0.0.0.0:9740", None, ""),
            https_ca: Some(pki.path("ca.pem")),
            ..Default::default()
        },
    )
    .unwrap();
    let body = r#"{"state":"active","reason":"commissioned","actor":"biomed"}"#;
    let post = ["-X", "POST", "-H", "Content-Type: application/json", "-d", body];
    let url = format!("https://{gw_ip}:9740/api/v1/devices/02:00:00:00:00:99/state");
    let (st, msg) = curl_in(&h1.ns, Some(&pki.path("ca.pem")), &url, &post).unwrap();
    assert_eq!(st, 403, "{msg}");
    assert!(msg.contains("api.token_file"), "{msg}");
    // Reading from the other host works; writing from loopback reaches the handler.
    let stats = format!("https://{gw_ip}:9740/api/v1/stats");
    assert_eq!(curl_in(&h1.ns, Some(&pki.path("ca.pem")), &stats, &[]).unwrap().0, 200);
    let (st, msg) = agent.curl("/api/v1/devices/02:00:00:00:00:99/state", &post).unwrap();
    assert_eq!(st, 404, "{msg}");
    let (st, rows) = agent.curl("/api/v1/writes", &[]).unwrap();
    assert_eq!(st, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&rows).unwrap();
    let seen: Vec<(String, u64)> = rows
        .iter()
        .map(|r| (r["client"].as_str().unwrap().to_string(), r["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(seen, vec![(h1.v4().to_string(), 403), ("127.0.0.1".to_string(), 404)], "{rows:?}");
    assert!(
        rows.iter().all(|r| r["path"] == "/api/v1/devices/02:00:00:00:00:99/state" && r["method"] == "POST")
    );
    drop(agent);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn client_certificates_are_required_when_configured() {
    let topo = Topology::new(1).unwrap();
    topo.warm_up().unwrap();
    let dir = std::env::temp_dir().join(format!("{}-sec", topo.id));
    let pki = Pki::new(&dir, &["127.0.0.1"]).unwrap();
    let foreign = Pki::new(&dir.join("foreign"), &["127.0.0.1"]).unwrap();
    let cert_args = |p: &Pki| {
        vec![
            "--cert".to_string(),
            p.path("client.pem").display().to_string(),
            "--key".to_string(),
            p.path("client.key").display().to_string(),
        ]
    };
    let agent = Agent::start(
        &topo,
        AgentOptions {
            extra_yaml: format!(
                "{}    client_auth_type: RequireAndVerifyClientCert\n    client_ca_file: {}\n",
                tls_yaml(&pki, "127.0.0.1:9740", None, ""),
                pki.path("ca.pem").display()
            ),
            https_ca: Some(pki.path("ca.pem")),
            curl_args: cert_args(&pki),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(agent.curl("/healthz", &[]).unwrap().0, 200);
    let url = "https://127.0.0.1:9740/healthz";
    let ca = pki.path("ca.pem");
    // No client certificate, or one of another CA: the handshake fails.
    assert!(curl_in(&topo.gw, Some(&ca), url, &[]).is_err());
    let other: Vec<String> = cert_args(&foreign);
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    assert!(curl_in(&topo.gw, Some(&ca), url, &other).is_err());
    // The CLI with the client certificate.
    let o = Command::new("ip")
        .args(["netns", "exec", &topo.gw])
        .arg(agent_bin())
        .args(["stats", "--json", "--api", "https://127.0.0.1:9740", "--ca-file"])
        .arg(&ca)
        .arg("--client-cert")
        .arg(pki.path("client.pem"))
        .arg("--client-key")
        .arg(pki.path("client.key"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(agent);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `mdsec-agent CMD --config` on `yaml`: (exit code, stderr).
fn agent_cmd(dir: &Path, cmd: &str, yaml: &str) -> (i32, String) {
    let cfg = dir.join("agent.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let o =
        Command::new(agent_bin()).args([cmd, "--config"]).arg(&cfg).stdin(Stdio::null()).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn unsafe_or_broken_surfaces_are_refused_with_located_errors() {
    let dir = std::env::temp_dir().join(format!("mdsec-t-sec-{}", std::process::id()));
    let pki = Pki::new(&dir, &["127.0.0.1"]).unwrap();
    let base = "interfaces:\n  - name: lo\n    role: inline\n    xdp_mode: skb\npin_dir: /sys/fs/bpf/mdsec-t-never\n";
    let cfg = dir.join("agent.yaml").display().to_string();

    // A network listen with neither TLS nor a token: refused by check and run,
    // at the listen line, naming the setting that would accept it.
    let open = format!("{base}listen: 0.0.0.0:9740\n");
    for cmd in ["check", "run"] {
        let (code, err) = agent_cmd(&dir, cmd, &open);
        assert_eq!(code, 1, "{cmd}: {err}");
        assert!(
            err.starts_with(&format!("{cfg}:6:9: listen 0.0.0.0:9740 is not a loopback")),
            "{cmd}: {err}"
        );
        assert!(err.contains("api.insecure_listen: true"), "{err}");
    }
    let (code, err) = agent_cmd(&dir, "check", &format!("{open}api:\n  insecure_listen: true\n"));
    assert_eq!(code, 0, "{err}");

    let tls = |cert: &str, key: &str| {
        format!(
            "{base}api:\n  tls_server_config:\n    cert_file: {}\n    key_file: {}\n",
            pki.path(cert).display(),
            pki.path(key).display()
        )
    };
    let (code, err) = agent_cmd(&dir, "check", &tls("server.pem", "server.key"));
    assert_eq!(code, 0, "{err}");
    // A missing certificate, a key of another certificate: at their fields.
    let (code, err) = agent_cmd(&dir, "check", &tls("missing.pem", "server.key"));
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{cfg}:8:16: ")) && err.contains("missing.pem: cannot read"), "{err}");
    let (code, err) = agent_cmd(&dir, "check", &tls("server.pem", "other.key"));
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("{cfg}:9:15: ")) && err.contains("does not belong to the certificate"),
        "{err}"
    );
    // An expired certificate: a warning for check, an error for run (before
    // anything is attached).
    let (code, err) = agent_cmd(&dir, "check", &tls("expired.pem", "expired.key"));
    assert_eq!(code, 0, "{err}");
    assert!(err.starts_with(&format!("{cfg}:8:16: warning: ")) && err.contains("expired on"), "{err}");
    let (code, err) = agent_cmd(&dir, "run", &tls("expired.pem", "expired.key"));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(&format!("{cfg}:8:16: ")) && err.contains("expired on") && !err.contains("warning"),
        "{err}"
    );
    // A malformed bcrypt hash, at its user.
    let (code, err) = agent_cmd(
        &dir,
        "check",
        &format!("{base}api:\n  basic_auth_users:\n    prometheus: \"$2y$10$short\"\n"),
    );
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("{cfg}:8:17: user `prometheus`: not a bcrypt hash")), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

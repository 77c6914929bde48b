//! Compensating-controls evidence with real traffic through real XDP: a
//! vulnerability register for the topology's devices (an unpatchable CVE on a
//! pump, an end-of-life modality), lifecycle changes through the CLI (one
//! refused), a decommissioned pump that sends again, and the report in JSON
//! (checked against its published schema by Python's jsonschema), Markdown and
//! HTML (rendered by headless Chromium; the screenshot shows the charts).
//!
//! Topology: h1 = 10.0.1.2 Baxter pump (segment pumps, enforce), h2 = 10.0.2.2
//! pharmacy, h3 = 10.0.3.2 workstation, h4 = 10.0.4.2 GE modality (segment
//! imaging, monitor), h5 = 10.0.5.2 second pump, decommissioned during the test.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use mdsec_agent::evidence::report::Report;
use mdsec_tests::{
    agent::{Agent, AgentOptions, cli, cli_in},
    fixtures,
    netns::Topology,
    traffic::{self, dns_query, tcp_exchange},
};

const PUMP: &str = "58:46:e1:00:00:01";
const MODALITY: &str = "44:4b:5d:00:00:04";
const OLD_PUMP: &str = "58:46:e1:00:00:05";

const REGISTER: &str = "vulnerabilities:
  - vendor: baxter
    model: Sigma Spectrum
    firmware: \"8.00.01\"
    cves:
      - id: CVE-2020-12040
        disclosed: 2020-09-01
        patch: none
        title: Hard-coded WEP key
      - id: CVE-2020-12041
        disclosed: 2020-09-01
        patch: 2021-01-11
  - vendor: GE Healthcare
    model: Optima CT660
    cves:
      - id: CVE-2019-10960
        disclosed: 2019-06-13
        patch: end-of-life
devices:
  - mac: 58:46:e1:00:00:01
    patched:
      CVE-2020-12041: 2021-03-01
";

fn policy() -> Vec<(String, String)> {
    vec![
        ("zones.yaml".into(), "zones:\n  pharmacy: [10.0.2.0/24]\n  workstations: [10.0.3.0/24]\n".into()),
        (
            "pumps.yaml".into(),
            "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: 10.0.5.0/24\nallow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n    app: hl7\nexceptions:\n  - to: 203.0.113.40/32\n    proto: tcp\n    ports: [443]\n    expires: 2099-01-01T00:00:00Z\n    reason: vendor remote maintenance\n    ticket: CHG-20412\n".into(),
        ),
        (
            "imaging.yaml".into(),
            "segment: imaging\nfunction: imaging-modality\nmode: monitor\ndefault: deny\nmembers:\n  - cidr: 10.0.4.0/24\nallow:\n  - from: workstations\n    proto: tcp\n    ports: [104]\n".into(),
        ),
    ]
}

/// Removes a directory when dropped (also on panic).
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pixels of the screenshot within a small distance of `hex`.
fn pixels_like(img: &(Vec<u8>, usize), hex: &str) -> usize {
    let c: Vec<i32> = (0..3).map(|i| i32::from_str_radix(&hex[1 + 2 * i..3 + 2 * i], 16).unwrap()).collect();
    img.0.chunks(img.1).filter(|p| (0..3).all(|i| (p[i] as i32 - c[i]).abs() <= 6)).count()
}

#[test]
fn register_lifecycle_and_report_match_the_traffic() {
    let topo = Topology::new(5).unwrap();
    for (h, mac) in [(1, PUMP), (4, MODALITY), (5, OLD_PUMP)] {
        topo.host(h).exec(&["ip", "link", "set", "eth0", "address", mac]).unwrap();
    }
    topo.warm_up().unwrap();
    let work = TempDir(std::env::temp_dir().join(format!("{}-evidence", topo.id)));
    std::fs::create_dir_all(&work.0).unwrap();
    let register = work.0.join("register.yaml");
    std::fs::write(&register, REGISTER).unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions {
            policy: policy(),
            state_dir: Some(work.0.join("state")),
            extra_yaml: format!(
                "register: {}\nevidence:\n  snapshot_secs: 1\ndetection:\n  internal_resolvers: [10.0.2.2]\ndevices:\n  - mac: {PUMP}\n    name: pump-icu-1\n    model: Sigma Spectrum\n  - mac: {MODALITY}\n    model: Optima CT660\n",
                register.display()
            ),
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = agent.dir.join("agent.yaml");
    let cfg = cfg.to_str().unwrap().to_string();

    // Traffic: allowed HL7 from both pumps and DICOM to the modality; 30 denied datagrams from the pump (enforce)
    // and its query to an outside resolver; 20 datagrams into the modality (monitor).
    tcp_exchange(&topo, 1, 2, 2575, &fixtures::load("hl7-mllp"));
    tcp_exchange(&topo, 5, 2, 2575, &fixtures::load("hl7-mllp"));
    tcp_exchange(&topo, 3, 4, 104, &fixtures::load("dicom-associate-rq"));
    let rx3 = traffic::udp_receiver(topo.host(3), false, 9999).unwrap();
    let tx1 = traffic::udp_socket(topo.host(1), false).unwrap();
    traffic::send_udp(&tx1, SocketAddr::new(topo.host(3).v4().into(), 9999), 30, 100).unwrap();
    tx1.send_to(&dns_query(), SocketAddr::new(topo.host(3).v4().into(), 53)).unwrap();
    let rx4 = traffic::udp_receiver(topo.host(4), false, 7777).unwrap();
    let tx3 = traffic::udp_socket(topo.host(3), false).unwrap();
    traffic::send_and_settle(&tx3, SocketAddr::new(topo.host(4).v4().into(), 7777), 20, 100).unwrap();
    assert_eq!((traffic::drain(&rx3), traffic::drain(&rx4)), (0, 20));

    // Lifecycle: the old pump is commissioned, then replaced; a jump back to active
    // is refused and changes nothing.
    agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.devices(),
            |d| d.iter().any(|d| d.mac == OLD_PUMP).then_some(()),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    for (state, reason) in
        [("active", "commissioned on ward 3"), ("decommissioned", "replaced by pump-icu-1")]
    {
        let (ok, out, err) = cli_in(
            &agent.gw,
            &["device", "set-state", OLD_PUMP, state, "--reason", reason, "--actor", "biomed:ana"],
        );
        assert!(ok, "{out}{err}");
    }
    let (ok, _, err) = cli_in(&agent.gw, &["device", "set-state", OLD_PUMP, "active", "--reason", "oops"]);
    assert!(!ok);
    assert!(
        err.contains("decommissioned → active is not a lifecycle transition; from decommissioned a device can go to: onboarding"),
        "{err}"
    );
    let (ok, _, err) = cli_in(&agent.gw, &["device", "set-state", OLD_PUMP, "retired", "--reason", "x"]);
    assert!(!ok && err.contains("`retired` is not a lifecycle state"), "{err}");
    let (ok, out, _) = cli_in(&agent.gw, &["device", "audit", "--mac", OLD_PUMP, "--json"]);
    assert!(ok);
    let audit: Vec<mdsec_agent::inventory::lifecycle::AuditRow> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        audit.iter().map(|a| (a.from.as_str(), a.to.as_str(), a.actor.as_str())).collect::<Vec<_>>(),
        vec![("onboarding", "active", "biomed:ana"), ("active", "decommissioned", "biomed:ana")]
    );
    let d = agent.devices().unwrap();
    assert_eq!(d.iter().find(|d| d.mac == OLD_PUMP).unwrap().lifecycle, "decommissioned");

    // The decommissioned pump sends again, twice: exactly one event.
    tcp_exchange(&topo, 5, 2, 2575, &fixtures::load("hl7-mllp"));
    let decom = |e: &Vec<mdsec_agent::surfaces::model::Event>| {
        e.iter().filter(|e| e.kind == "decommissioned_device").cloned().collect::<Vec<_>>()
    };
    agent
        .wait_for(Duration::from_secs(10), |a| a.events(), |e| (!decom(e).is_empty()).then_some(()))
        .unwrap();
    tcp_exchange(&topo, 5, 2, 2575, &fixtures::load("hl7-mllp"));
    std::thread::sleep(Duration::from_secs(3));
    let events = agent.events().unwrap();
    let d = decom(&events);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!((d[0].mac.as_deref(), d[0].segment.as_str()), (Some(OLD_PUMP), "pumps"));

    // Metrics: the register and the lifecycle, with bounded labels.
    let m = agent.metrics().unwrap();
    assert_eq!(m.sum("mdsec_vulnerable_devices", &[]), 2.0);
    assert_eq!(m.sum("mdsec_end_of_life_devices", &[]), 1.0);
    assert_eq!(m.sum("mdsec_open_vulnerabilities", &[("segment", "pumps")]), 1.0);
    assert_eq!(m.get(r#"mdsec_devices_by_lifecycle{state="decommissioned"}"#), Some(1.0));
    assert_eq!(m.get("mdsec_register_load_success"), Some(1.0));

    // Wait for a snapshot holding every count, then report.
    let state = work.0.join("state");
    let state2 = state.clone();
    agent
        .wait_for(
            Duration::from_secs(10),
            move |_| mdsec_agent::evidence::store::Store::open(&state2)?.snapshots_between("0", "9"),
            |docs| {
                let total = |seg: &str, f: fn(&mdsec_agent::evidence::SegmentCounts) -> u64| -> u64 {
                    docs.iter()
                        .filter_map(|d| serde_json::from_str::<mdsec_agent::evidence::Snapshot>(d).ok())
                        .filter_map(|s| s.segments.get(seg).map(|c| f(&c.1)))
                        .sum()
                };
                (total("pumps", |c| c.dropped) >= 31 && total("imaging", |c| c.would_drop) >= 20)
                    .then_some(())
            },
        )
        .unwrap();
    let out = work.0.join("report.json");
    let (ok, _, err) = cli(&[
        "report",
        "--config",
        &cfg,
        "--format",
        "json",
        "--from",
        "2026-01-01",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let r: Report = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let seg = |n: &str| r.segments.iter().find(|s| s.name == n).unwrap();
    let (pumps, imaging) = (seg("pumps"), seg("imaging"));
    assert_eq!((pumps.counts.dropped, pumps.counts.would_drop, pumps.mode.as_str()), (31, 0, "enforce"));
    assert_eq!(
        (imaging.counts.dropped, imaging.counts.would_drop, imaging.mode.as_str()),
        (0, 20, "monitor")
    );
    assert_eq!((pumps.counts.violations, imaging.counts.violations), (2, 1));
    assert!(pumps.enforce_secs > 0 && pumps.monitor_secs == 0 && imaging.monitor_secs > 0, "{pumps:?}");
    assert_eq!(pumps.allow, vec!["to pharmacy tcp 2575 app hl7"]);
    assert_eq!(
        (
            pumps.exceptions[0].ticket.as_str(),
            pumps.exceptions[0].reason.as_str(),
            pumps.exceptions[0].active
        ),
        ("CHG-20412", "vendor remote maintenance", true)
    );
    assert_eq!(pumps.clinical_impact, "life-critical");
    let devs: BTreeMap<&str, &mdsec_agent::evidence::report::DeviceReport> =
        r.vulnerable_devices.iter().map(|d| (d.mac.as_str(), d)).collect();
    assert_eq!(devs.keys().copied().collect::<Vec<_>>(), vec![MODALITY, PUMP]);
    let pump = devs[PUMP];
    let status = |d: &mdsec_agent::evidence::report::DeviceReport| {
        d.findings
            .iter()
            .map(|f| (f.cve.clone(), serde_json::to_value(f.status).unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        status(pump),
        vec![("CVE-2020-12040".into(), "no-patch".into()), ("CVE-2020-12041".into(), "patched".into())]
    );
    assert_eq!(pump.findings[1].lag_days, 181);
    assert_eq!(
        (pump.segment.as_deref(), pump.mode.as_deref(), pump.name.as_deref()),
        (Some("pumps"), Some("enforce"), Some("pump-icu-1"))
    );
    assert!(pump.controls.iter().any(|c| c.contains("dropped at the gateway")), "{:?}", pump.controls);
    assert_eq!((pump.denied_flows, pump.would_deny_flows), (2, 0));
    assert_eq!(pump.detections.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), vec!["external_dns"]);
    let ct = devs[MODALITY];
    assert_eq!(status(ct), vec![("CVE-2019-10960".into(), "end-of-life".into())]);
    assert_eq!((ct.mode.as_deref(), ct.would_deny_flows), (Some("monitor"), 1));
    assert!(ct.controls.iter().any(|c| c.contains("monitor mode")), "{:?}", ct.controls);
    let k = &r.program.end;
    assert_eq!((k.vulnerable_devices, k.end_of_life_devices, k.open_vulnerabilities), (2, 1, 2));
    assert_eq!((r.program.counts.dropped, r.program.counts.would_drop), (31, 20));
    assert_eq!(
        r.program.detections,
        BTreeMap::from([("decommissioned_device".into(), 1), ("external_dns".into(), 1)])
    );
    assert_eq!(r.lifecycle_changes.len(), 2);
    assert_eq!(r.trend.len(), 1);
    assert_eq!((r.trend[0].counts.dropped, r.trend[0].counts.would_drop), (31, 20));
    assert!(r.caveats.is_empty(), "{:?}", r.caveats);

    // The JSON against its published schema, with an independent validator.
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/schema/report.schema.json");
    let v = Command::new("/usr/bin/python3")
        .args(["-c", "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))); print('valid')"])
        .arg(&out)
        .arg(schema)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // A broken copy is caught: the validator is really checking.
    let mut bad: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    bad["segments"][0]["counts"]["dropped"] = serde_json::json!("many");
    let bad_path = work.0.join("bad.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    let v = Command::new("/usr/bin/python3")
        .args(["-c", "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2])))"])
        .arg(&bad_path)
        .arg(schema)
        .output()
        .unwrap();
    assert!(!v.status.success());

    // Markdown.
    let (ok, md, err) = cli(&["report", "--config", &cfg, "--format", "md", "--from", "2026-01-01"]);
    assert!(ok, "{err}");
    assert!(md.contains("| CVE-2020-12040 | 2020-09-01 | none | no-patch |"), "{md}");
    // The trend table has the HTML's nine columns, Exceptions included, in every row.
    let trend: Vec<&str> = md
        .split("## Daily trend")
        .nth(1)
        .unwrap()
        .lines()
        .skip_while(|l| l.is_empty())
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(trend[0].ends_with("| Max open lag (days) | Exceptions |") && trend.len() > 2, "{trend:?}");
    assert!(trend.iter().all(|l| l.matches('|').count() == 10), "{trend:?}");
    assert!(md.contains("Packets allowed") && md.contains("dropped 31, would drop 0"), "{md}");

    // HTML in a real browser: the DOM has the tables and charts, the screenshot
    // shows the bar and line colours.
    let html = work.0.join("report.html");
    let (ok, _, err) =
        cli(&["report", "--config", &cfg, "--from", "2026-01-01", "--out", html.to_str().unwrap()]);
    assert!(ok, "{err}");
    let page = std::fs::read_to_string(&html).unwrap();
    for external in ["src=", "href=", "<link", "<script", "url(", "@import"] {
        assert!(!page.contains(external), "the page must be self-contained: found {external}");
    }
    assert!(page.matches("<svg").count() == 2 && page.matches("<table").count() >= 6);
    let png = work.0.join("report.png");
    let profile = work.0.join("chromium");
    let shot = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1200,1600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(png.exists(), "no screenshot: {}", String::from_utf8_lossy(&shot.stderr));
    // For looking at it: MDSEC_KEEP_SCREENSHOT=DIR.
    if let Ok(dir) = std::env::var("MDSEC_KEEP_SCREENSHOT") {
        std::fs::copy(&png, PathBuf::from(&dir).join("report.png")).unwrap();
        std::fs::copy(&html, PathBuf::from(dir).join("report.html")).unwrap();
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let img = (buf[..info.buffer_size()].to_vec(), px);
    assert_eq!((info.width, info.height), (1200, 1600));
    use mdsec_agent::evidence::report_render::{COLOR_DROPPED, COLOR_LAG, COLOR_WOULD_DROP};
    // Each legend square is 144 pixels; the bars (31 and 20 packets) are thousands,
    // the one-day lag point a disc of about 110.
    for (name, color, min) in [
        ("dropped bars", COLOR_DROPPED, 2000),
        ("would-drop bars", COLOR_WOULD_DROP, 1500),
        ("lag point", COLOR_LAG, 200),
    ] {
        let n = pixels_like(&img, color);
        assert!(n > min, "{name}: only {n} pixels of {color} in the screenshot");
    }
}

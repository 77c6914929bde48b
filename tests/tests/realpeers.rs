//! Discovery with real protocol peers from Debian in the lab topology: dcmtk,
//! dnsmasq + dhclient, OpenSSH, curl, openssl, dig. Recognition must come from the
//! bytes: every service runs on a non-standard port except DNS.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::Duration,
};

use mdsec_agent::surfaces::model::{Device, Flow};
use mdsec_tests::{
    agent::{Agent, AgentOptions},
    netns::{Bg, Topology, in_netns, ip},
    traffic,
};

fn run(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("timeout").arg("10").args(["ip", "netns", "exec", ns]).args(args).output().unwrap()
}

/// A TCP listener in h2 that answers `greeting` and reads what the client sends.
fn listen(topo: &Topology, port: u16, greeting: &'static [u8]) -> std::thread::JoinHandle<()> {
    let addr: SocketAddr = format!("10.0.2.2:{port}").parse().unwrap();
    let l: TcpListener = in_netns(&topo.host(2).ns, move || TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let _ = s.write_all(greeting);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
        }
    })
}

fn flow<'a>(flows: &'a [Flow], src: &str, dport: u16) -> Option<&'a Flow> {
    flows.iter().find(|f| f.src == src && f.dport == dport)
}

fn device<'a>(devices: &'a [Device], mac: &str) -> &'a Device {
    devices.iter().find(|d| d.mac == mac).unwrap_or_else(|| panic!("no device {mac}: {devices:#?}"))
}

#[test]
fn real_peers_are_identified_by_their_bytes() {
    let topo = Topology::new(2).unwrap();
    let (h1, h2) = (topo.host(1), topo.host(2));
    ip(&["-n", &h1.ns, "link", "set", "dev", "eth0", "address", "44:4b:5d:00:00:21"]).unwrap(); // GE Healthcare
    topo.warm_up().unwrap();
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let mac = "44:4b:5d:00:00:21";

    // DICOM: dcmtk echoscu against storescp on port 11199. No reverse DNS lookups:
    // the namespaces have no resolver, and dcmtk would wait for it.
    let _scp = Bg::in_ns(&h2.ns, &["storescp", "-dhl", "-aet", "ARCHIVE", "-od", "/tmp", "11199"]);
    std::thread::sleep(Duration::from_millis(500));
    let out = run(&h1.ns, &["echoscu", "-aet", "MONITOR-12", "-aec", "ARCHIVE", "10.0.2.2", "11199"]);
    assert!(
        out.status.success(),
        "echoscu {:?}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // SSH, TLS, HTTP from the real clients, to plain listeners on odd ports.
    let ssh = listen(&topo, 2222, b"SSH-2.0-OpenSSH_9.2p1\r\n");
    let _ = run(
        &h1.ns,
        &[
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "ConnectTimeout=3",
            "-p",
            "2222",
            "10.0.2.2",
        ],
    );
    ssh.join().unwrap();
    let tls = listen(&topo, 8444, b"");
    let _ = Command::new("timeout")
        .args([
            "5",
            "ip",
            "netns",
            "exec",
            &h1.ns,
            "openssl",
            "s_client",
            "-connect",
            "10.0.2.2:8444",
            "-servername",
            "pacs.hospital.example",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    tls.join().unwrap();
    let http = listen(&topo, 8081, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let _ = run(&h1.ns, &["curl", "-s", "-m", "3", "-A", "VitalsBridge/2.1", "http://10.0.2.2:8081/api"]);
    http.join().unwrap();

    // DNS: dig to port 53; and non-DNS bytes to port 53 from another socket.
    let _ = run(&h1.ns, &["dig", "+tries=1", "+time=1", "@10.0.2.2", "pacs.hospital.example"]);
    let junk = traffic::udp_socket(h1, false).unwrap();
    junk.send_to(b"hello, this is not a DNS message", "10.0.2.2:53").unwrap();
    let junk_port = junk.local_addr().unwrap().port();

    let flows = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.flows(),
            |f| {
                let all = [11199u16, 2222, 8444, 8081].iter().all(|p| flow(f, "10.0.1.2", *p).is_some());
                // dig's query and the non-DNS datagram.
                let dns = f.iter().any(|f| f.dport == 53 && f.sport == junk_port)
                    && f.iter().any(|f| f.dport == 53 && f.sport != junk_port);
                (all && dns).then(|| f.clone())
            },
        )
        .unwrap();
    let app = |port: u16| {
        let f = flow(&flows, "10.0.1.2", port).unwrap();
        (f.app.as_str(), f.app_confidence.as_str())
    };
    assert_eq!(app(11199), ("dicom", "high"));
    assert_eq!(app(2222), ("ssh", "high"));
    assert_eq!(app(8444), ("tls", "high"));
    assert_eq!(app(8081), ("http", "high"));
    let dns = flows.iter().find(|f| f.dport == 53 && f.sport != junk_port && f.src == "10.0.1.2").unwrap();
    assert_eq!((dns.app.as_str(), dns.app_confidence.as_str()), ("dns", "high"));
    let not_dns = flows.iter().find(|f| f.dport == 53 && f.sport == junk_port).unwrap();
    assert_ne!(not_dns.app, "dns", "{not_dns:?}");

    let devices = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.devices(),
            |d| d.iter().any(|d| d.mac == mac && d.fingerprints.len() >= 6).then(|| d.clone()),
        )
        .unwrap();
    let d = device(&devices, mac);
    let fp = |k: &str| d.fingerprints.get(k).map(String::as_str);
    assert_eq!(fp("dicom.calling_ae"), Some("MONITOR-12"));
    assert_eq!(fp("dicom.called_ae"), Some("ARCHIVE"));
    assert!(fp("dicom.implementation_version").unwrap().starts_with("OFFIS_DCMTK"));
    assert!(fp("ssh.banner").unwrap().starts_with("SSH-2.0-OpenSSH"));
    assert_eq!(fp("tls.sni"), Some("pacs.hospital.example"));
    assert_eq!(fp("http.user_agent"), Some("VitalsBridge/2.1"));
    assert_eq!(d.vendor.as_deref(), Some("GE Healthcare"));
    // An imaging vendor's device that stores studies over DICOM.
    assert_eq!(d.class, "imaging-modality");
    assert!(d.confidence >= 0.9 && d.evidence.len() == 2, "{d:?}");
}

#[test]
fn a_real_dhcp_exchange_leaves_hostname_and_option_55() {
    let topo = Topology::new(1).unwrap();
    let h1 = topo.host(1);
    let agent = Agent::start(&topo, AgentOptions::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-dhcp", topo.id));
    std::fs::create_dir_all(&dir).unwrap();
    let _dnsmasq = Bg::in_ns(
        &topo.gw,
        &[
            "dnsmasq",
            "--no-daemon",
            "--port=0",
            "--interface=gw1",
            "--bind-interfaces",
            "--dhcp-range=10.0.1.100,10.0.1.150,1h",
            "--leasefile-ro",
            &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        ],
    );
    let conf = dir.join("dhclient.conf");
    std::fs::write(&conf, "send host-name \"pump-ward3-07\";\nrequest subnet-mask, routers, domain-name-servers, ntp-servers;\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = run(
        &h1.ns,
        &[
            "dhclient",
            "-1",
            "-v",
            "-sf",
            "/bin/true",
            "-cf",
            conf.to_str().unwrap(),
            "-lf",
            dir.join("leases").to_str().unwrap(),
            "-pf",
            dir.join("dhclient.pid").to_str().unwrap(),
            "eth0",
        ],
    );
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(log.contains("DHCPACK"), "no lease: {log}");
    let _ = run(&h1.ns, &["dhclient", "-x", "-pf", dir.join("dhclient.pid").to_str().unwrap()]);
    let mac = mdsec_agent::base::net::mac_string(h1.mac().unwrap());
    let devices = agent
        .wait_for(
            Duration::from_secs(10),
            |a| a.devices(),
            |d| {
                d.iter()
                    .any(|d| d.mac == mac && d.fingerprints.contains_key("dhcp.hostname"))
                    .then(|| d.clone())
            },
        )
        .unwrap();
    let d = device(&devices, &mac);
    assert_eq!(d.fingerprints.get("dhcp.hostname").map(String::as_str), Some("pump-ward3-07"));
    let prl = d.fingerprints.get("dhcp.parameter_request_list").expect("option 55");
    for opt in ["1", "3", "6", "42"] {
        assert!(prl.split(',').any(|o| o == opt), "option {opt} missing in {prl}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

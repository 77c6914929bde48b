//! Bridge mode: mdsec as a transparent bump in the wire between a ward and the
//! core, in one /24 (see `mdsec_tests::bump`). Real frames through the real
//! XDP program; what each side receives is the oracle, the agent's flows and
//! counters must match it exactly.
//!
//! Ward: 10.20.0.11 an infusion pump (segment pumps, enforce), 10.20.0.12 a
//! patient monitor (segment monitors, monitor mode). Core: 10.20.0.21 the
//! pharmacy (allowed: HL7 over MLLP on TCP 2575, the first payload checked, and
//! HL7 datagrams on UDP 9000), 10.20.0.22 a workstation (denied, but for an
//! exception with an expiry).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use mdsec_agent::surfaces::model;
use mdsec_tests::{
    agent::{Agent, AgentOptions},
    bump::{Bump, CORE_PORT, End, WARD_PORT},
    frames::{self, Capture, RawSender, TPID_8021AD, TPID_8021Q, V4},
    traffic::drain,
};

const HL7: &[u8] = b"\x0bMSH|^~\\&|PUMP|WARD3|PHARMACY|HOSP|202612011200||ORM^O01|1|P|2.5\r";

fn hl7(len: usize) -> Vec<u8> {
    let mut p = HL7.to_vec();
    p.resize(len, b'x');
    p
}

fn policy(exception_until: Option<SystemTime>) -> Vec<(String, String)> {
    let exception = exception_until.map_or(String::new(), |t| {
        let stamp = mdsec_agent::base::clock::rfc3339(t);
        format!(
            "exceptions:\n  - to: workstation\n    proto: udp\n    ports: [7100]\n    expires: {stamp}\n    reason: vendor maintenance\n    ticket: CHG-7\n"
        )
    });
    vec![
        ("zones.yaml".into(), "zones:\n  pharmacy: [10.20.0.21/32]\n  workstation: [10.20.0.22/32]\n".into()),
        (
            "pumps.yaml".into(),
            format!(
                "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.20.0.11/32\n\
                 allow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n    app: hl7\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n{exception}"
            ),
        ),
        (
            "monitors.yaml".into(),
            "segment: monitors\nfunction: patient-monitor\nmode: monitor\ndefault: deny\nmembers:\n  - cidr: 10.20.0.12/32\n".into(),
        ),
    ]
}

fn start(b: &Bump, extra: &str, policy: Vec<(String, String)>) -> Agent {
    let opts = AgentOptions {
        extra_yaml: format!("{}{extra}", b.yaml("driver", "open")),
        policy,
        ..Default::default()
    };
    Agent::start_on(&b.id, &b.gw, &[], opts).unwrap()
}

/// Sends `n` datagrams of `payload` from `from`:`sport` to `to`:`dport`
/// and returns how many `to` received.
fn send(from: &End, sport: u16, to: &End, dport: u16, n: usize, payload: &[u8]) -> usize {
    let rx = to.udp(dport).unwrap();
    let tx = from.udp(sport).unwrap();
    for i in 0..n {
        tx.send_to(payload, to.addr(dport)).unwrap();
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    drain(&rx)
}

/// The one flow of this 5-tuple (on the port it entered by): packets, bytes, verdict.
fn flow(a: &Agent, iface: &str, src: &End, sport: u16, dst: &End, dport: u16) -> Option<(u64, u64, String)> {
    let flows = a.flows().unwrap();
    let mine: Vec<&model::Flow> = flows
        .iter()
        .filter(|f| {
            f.iface == iface
                && f.src == src.ip.to_string()
                && f.sport == sport
                && f.dst == dst.ip.to_string()
                && f.dport == dport
        })
        .collect();
    assert!(mine.len() <= 1, "one flow per 5-tuple and port: {mine:?}");
    mine.first().map(|f| (f.packets, f.bytes, f.verdict.clone()))
}

fn wait_flow(
    a: &Agent,
    iface: &str,
    src: &End,
    sport: u16,
    dst: &End,
    dport: u16,
    packets: u64,
) -> (u64, u64, String) {
    a.wait_for(
        Duration::from_secs(10),
        |a| Ok(flow(a, iface, src, sport, dst, dport)),
        |f| f.clone().filter(|f| f.0 >= packets),
    )
    .unwrap()
}

/// Packets of the flows to `dport` with `verdict` (both ports).
fn flows_of(a: &Agent, dport: u16, verdict: &str) -> u64 {
    a.flows().unwrap().iter().filter(|f| f.dport == dport && f.verdict == verdict).map(|f| f.packets).sum()
}

/// One TCP connection from `from` to `to`:`port` carrying `payload`: the
/// bytes the server read within a second, or `None` if it read nothing.
fn tcp(from: &End, to: &End, port: u16, payload: &[u8]) -> Option<usize> {
    use std::io::{Read, Write};
    let bind = to.addr(port);
    let listener = mdsec_tests::netns::bind_in(&to.ns, move || std::net::TcpListener::bind(bind)).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n;
        }
        (got > 0).then_some(got)
    });
    let dst = to.addr(port);
    let mut c = mdsec_tests::netns::in_netns(&from.ns, move || {
        std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    c.write_all(payload).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    server.join().unwrap()
}

/// UDP frame bytes on the wire for `payload` bytes (Ethernet + IPv4 + UDP).
fn wire(payload: usize) -> u64 {
    (14 + 20 + 8 + payload) as u64
}

#[test]
fn a_bump_enforces_monitors_and_counts_each_direction_once_on_its_ingress_port() {
    let b = Bump::new(2, 2, true).unwrap();
    b.warm_up().unwrap();
    let (pump, monitor, pharmacy, ws) = (&b.ward[0], &b.ward[1], &b.core[0], &b.core[1]);
    let until = SystemTime::now() + Duration::from_secs(10);
    let a = start(&b, "", policy(Some(until)));
    let ifs: Vec<model::Interface> = a.get("/api/v1/interfaces").unwrap();
    let described: Vec<(String, String, Option<String>)> =
        ifs.iter().map(|i| (i.name.clone(), i.role.clone(), i.peer.clone())).collect();
    assert_eq!(
        described,
        vec![
            (WARD_PORT.into(), "bridge".into(), Some(CORE_PORT.into())),
            (CORE_PORT.into(), "bridge".into(), Some(WARD_PORT.into()))
        ]
    );

    // The preflight knows the veth driver (ETHTOOL_GDRVINFO: veth has no sysfs driver link).
    assert!(a.log().contains("interface ward: driver veth has native XDP"), "{}", a.log());

    // The exception, while it lasts.
    let n = send(pump, 5004, ws, 7100, 10, b"maintenance");
    assert_eq!(n, 10, "{:#?}\n{}", a.flows().unwrap(), a.log());
    // HL7 to the pharmacy and its answers; another payload on the same port.
    assert_eq!(send(pump, 5000, pharmacy, 9000, 50, &hl7(100)), 50);
    assert_eq!(send(pharmacy, 9000, pump, 5000, 30, &[0x06; 60]), 30);
    // The app rule: HL7 over MLLP passes, another first payload on the port does not.
    assert_eq!(tcp(pump, pharmacy, 2575, &hl7(120)), Some(120));
    assert_eq!(tcp(pump, pharmacy, 2575, b"GET / HTTP/1.0\r\n\r\n"), None);
    // Denied by the pumps' default; the monitor's denial only counts.
    assert_eq!(send(pump, 5002, ws, 7000, 20, &[1; 40]), 0);
    assert_eq!(send(monitor, 5003, ws, 7000, 20, &[2; 40]), 20);
    // The exception has expired: denied again without a reload.
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    std::thread::sleep(left + Duration::from_millis(300));
    assert_eq!(send(pump, 5005, ws, 7100, 10, b"maintenance"), 0);

    let w = |sport, dst: &End, dport, n| wait_flow(&a, WARD_PORT, pump, sport, dst, dport, n);
    assert_eq!(w(5000, pharmacy, 9000, 50), (50, 50 * wire(100), "allow".into()));
    assert_eq!(
        wait_flow(&a, CORE_PORT, pharmacy, 9000, pump, 5000, 30),
        (30, 30 * wire(60), "reply".into()),
        "the answers are counted once, on the port they entered by"
    );
    let tcp_verdicts = a
        .wait_for(
            Duration::from_secs(10),
            |a| a.flows(),
            |fl| {
                let v: Vec<(String, String)> = fl
                    .iter()
                    .filter(|f| f.iface == WARD_PORT && f.dport == 2575)
                    .map(|f| (f.verdict.clone(), f.app.clone()))
                    .collect();
                (v.len() == 2).then_some(v)
            },
        )
        .unwrap();
    let mut tcp_verdicts = tcp_verdicts;
    tcp_verdicts.sort();
    assert_eq!(tcp_verdicts, vec![("allow".into(), "hl7".into()), ("drop".into(), "http".into())]);
    assert_eq!(w(5002, ws, 7000, 20), (20, 20 * wire(40), "drop".into()));
    assert_eq!(
        wait_flow(&a, WARD_PORT, monitor, 5003, ws, 7000, 20),
        (20, 20 * wire(40), "would_drop".into())
    );
    assert_eq!(w(5004, ws, 7100, 10), (10, 10 * wire(11), "allow".into()));
    assert_eq!(w(5005, ws, 7100, 10), (10, 10 * wire(11), "drop".into()));
    // Nothing of the pump's crossed on the core port: each crossing counts once.
    assert_eq!(flow(&a, CORE_PORT, pump, 5000, pharmacy, 9000), None);

    let s = a.stats().unwrap();
    // The TCP flow's handshake passed before its first payload was judged.
    let tcp_drops = s["policy_drop"].packets - 20 - 10;
    assert!((1..flows_of(&a, 2575, "drop")).contains(&tcp_drops), "{tcp_drops} TCP drops");
    assert_eq!(s["app_mismatch"].packets, 1, "one flow's first payload was not HL7");
    assert_eq!(s["bridge_no_peer"].packets, 0);
    assert_eq!(s["bridge_forwarded"], s["pass"], "every passed frame left by the peer port");
    assert_eq!(s["pass"].packets + s["drop"].packets, s["frames"].packets);
}

/// The frames of the L2 tests, each with what it is. Addressed to nobody
/// (`dst`, `to`): the far host's stack ignores them, so nothing answers.
fn l2_frames(src: [u8; 6], dst: [u8; 6], from: Ipv4Addr, to: Ipv4Addr) -> Vec<(&'static str, Vec<u8>)> {
    let llc = |dsap_ssap: [u8; 3], body: &[u8]| {
        let mut p = dsap_ssap.to_vec();
        p.extend_from_slice(body);
        p
    };
    // 802.3 frames carry a length where Ethernet II carries an ethertype.
    let dot3 = |dst: [u8; 6], payload: Vec<u8>| frames::eth(dst, src, &[], payload.len() as u16, &payload);
    let stp_config = {
        let mut b = vec![0, 0, 0, 0, 0];
        b.extend_from_slice(&[0x80, 0, 2, 0, 0, 0, 0, 0, 1]);
        b.resize(35, 0);
        b
    };
    let rstp = {
        let mut b = vec![0, 0, 2, 2, 0x3c];
        b.resize(36, 0);
        b
    };
    let lldp = {
        // Chassis ID (MAC), port ID, TTL, end.
        let mut t = vec![0x02, 0x07, 0x04];
        t.extend_from_slice(&src);
        t.extend_from_slice(&[0x04, 0x05, 0x05, b'e', b't', b'h', b'0', 0x06, 0x02, 0x00, 0x78, 0, 0]);
        t
    };
    let lacp = {
        let mut p = vec![0x01, 0x01, 0x01, 0x14];
        p.resize(110, 0);
        p
    };
    let eapol_start = vec![0x02, 0x01, 0x00, 0x00];
    let arp = {
        let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
        p.extend_from_slice(&src);
        p.extend_from_slice(&from.octets());
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&to.octets());
        p
    };
    let udp = |sport| V4::new(from, to, 17).build(&frames::udp(sport, 9999, &[7; 32]));
    let at_mtu = V4::new(from, to, 17).build(&frames::udp(6100, 9999, &vec![9; 1500 - 28]));
    let mut runt = V4::new(from, to, 17).build(&frames::udp(6200, 9999, &[]));
    runt.truncate(10);
    let mut bad_ihl = V4::new(from, to, 17).build(&frames::udp(6300, 9999, &[3; 20]));
    bad_ihl[0] = 0x43;
    let bad_inner = V4::new(from, to, 17).build(&frames::udp(6400, 9999, &[4; 20]));
    let bcast = [0xff; 6];
    vec![
        ("ARP request", frames::eth(bcast, src, &[], 0x0806, &arp)),
        ("STP configuration BPDU", dot3([0x01, 0x80, 0xc2, 0, 0, 0], llc([0x42, 0x42, 0x03], &stp_config))),
        ("RSTP BPDU", dot3([0x01, 0x80, 0xc2, 0, 0, 0], llc([0x42, 0x42, 0x03], &rstp))),
        ("LLDP", frames::eth([0x01, 0x80, 0xc2, 0, 0, 0x0e], src, &[], 0x88cc, &lldp)),
        ("LACP", frames::eth([0x01, 0x80, 0xc2, 0, 0, 0x02], src, &[], 0x8809, &lacp)),
        ("EAPOL-Start", frames::eth([0x01, 0x80, 0xc2, 0, 0, 0x03], src, &[], 0x888e, &eapol_start)),
        ("802.1Q-tagged UDP", frames::eth(dst, src, &[(TPID_8021Q, 110)], 0x0800, &udp(6000))),
        (
            "QinQ-tagged UDP",
            frames::eth(dst, src, &[(TPID_8021AD, 20), (TPID_8021Q, 110)], 0x0800, &udp(6001)),
        ),
        ("UDP at the MTU", frames::eth(dst, src, &[], 0x0800, &at_mtu)),
        ("runt (IPv4 cut at 10 bytes)", frames::eth(dst, src, &[], 0x0800, &runt)),
        ("IPv4 with IHL 3", frames::eth(dst, src, &[], 0x0800, &bad_ihl)),
        (
            "tagged, IPv6 ethertype over an IPv4 header",
            frames::eth(dst, src, &[(TPID_8021Q, 110)], 0x86dd, &bad_inner),
        ),
    ]
}

#[test]
fn l2_control_tags_the_mtu_and_malformed_frames_cross_intact_and_only_to_the_peer() {
    let b = Bump::new(1, 1, true).unwrap();
    let (pump, pharmacy) = (&b.ward[0], &b.core[0]);
    let a = start(&b, "", policy(None));
    let before = a.stats().unwrap();
    let tx = RawSender::open(&pump.ns, "eth0").unwrap();
    let far = Capture::open(&pharmacy.ns, "eth0").unwrap();
    let back = Capture::open(&pump.ns, "eth0").unwrap();
    let nobody = [0x02, 0, 0, 0, 0, 0x99];
    // From an address in no segment: nothing here is the policy's to drop.
    let list = l2_frames(pump.mac, nobody, Ipv4Addr::new(10, 20, 0, 77), Ipv4Addr::new(10, 20, 0, 99));
    for (_, f) in &list {
        tx.send(f).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let got = far.frames();
    for (what, f) in &list {
        // veth pads nothing; the frame arrives exactly as sent, tags included.
        let n = got.iter().filter(|g| *g == f).count();
        let heads: Vec<(usize, &[u8])> = got.iter().map(|g| (g.len(), &g[..g.len().min(18)])).collect();
        assert_eq!(
            n,
            1,
            "{what}: arrived {n} times on the far side; sent {} bytes {:02x?}, got {heads:02x?}",
            f.len(),
            &f[..18]
        );
    }
    assert_eq!(got.len(), list.len(), "nothing else crossed");
    assert!(back.frames().is_empty(), "nothing came back out of the port it entered by");

    let s = a.stats().unwrap();
    let d = |k: &str| s[k].packets - before.get(k).map_or(0, |c| c.packets);
    let expected: BTreeMap<&str, u64> = [
        ("frames", list.len() as u64),
        ("bridge_forwarded", list.len() as u64),
        ("arp", 1),
        ("other_l3", 5),
        ("vlan_tagged", 3),
        ("truncated_ipv4", 1),
        ("bad_ipv4_ihl", 1),
        ("bad_ipv6_version", 1),
        ("drop", 0),
    ]
    .into();
    let seen: BTreeMap<&str, u64> = expected.keys().map(|k| (*k, d(k))).collect();
    assert_eq!(seen, expected);
}

/// The pump streams HL7 to the pharmacy at 2,000 datagrams/s (sequence numbers
/// in the payload) while a workstation port keeps being denied; returns the
/// sender thread's stop flag and handle.
struct Stream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(from: &End, to: &End, dport: u16, sport: u16) -> Stream {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        };
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tx = from.udp(sport).unwrap();
        let dst = to.addr(dport);
        let (s2, n2) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut seq: u64 = 0;
            while !s2.load(Ordering::Relaxed) {
                // Paced by the clock: datagram k leaves at k × 0.5 ms.
                let due = t0 + Duration::from_micros(500 * seq);
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(w);
                }
                let mut p = hl7(80);
                p[72..80].copy_from_slice(&seq.to_be_bytes());
                tx.send_to(&p, dst).unwrap();
                seq += 1;
                n2.store(seq, Ordering::Relaxed);
            }
        });
        Stream { stop, sent, thread: Some(thread) }
    }
    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.sent()
    }
}

/// Every sequence number that arrived on a socket, drained by a thread of its
/// own (a socket buffer holds a few hundred datagrams, a phase sends thousands).
struct Receiver {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Receiver {
    fn start(sock: UdpSocket) -> Receiver {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s2, c2) = (seen.clone(), count.clone());
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        // Ends with the test process; the socket closes with its namespace.
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok(n) = sock.recv(&mut buf) {
                    c2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= 80 {
                        s2.lock().unwrap().insert(u64::from_be_bytes(buf[72..80].try_into().unwrap()));
                    }
                }
            }
        });
        Receiver { seen, count }
    }
    /// Sequence numbers below `upto` that never arrived.
    fn lost(&self, upto: u64) -> u64 {
        upto - self.seen.lock().unwrap().range(..upto).count() as u64
    }
    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[test]
fn under_a_2_kpps_hl7_stream_kill_detach_reattach_and_reload_lose_nothing_allowed() {
    use mdsec_tests::netns::SharedBpffs;
    let b = Bump::new(1, 2, true).unwrap();
    b.warm_up().unwrap();
    let (pump, pharmacy, ws) = (&b.ward[0], &b.core[0], &b.core[1]);
    // Pins that outlive a killed agent, as the host's /sys/fs/bpf does.
    let fs = SharedBpffs::new(&b.id);
    let state = std::env::temp_dir().join(format!("{}-state", b.id));
    let pol = policy(None);
    let opts = |on_exit: &str| AgentOptions {
        extra_yaml: format!(
            "{}pin_dir: {}\non_exit: {on_exit}\n",
            b.yaml("driver", "open"),
            fs.0.join("mdsec").display()
        ),
        policy: pol.clone(),
        state_dir: Some(state.clone()),
        ..Default::default()
    };
    let rx = Receiver::start(pharmacy.udp(9000).unwrap());
    let denied_rx = Receiver::start(ws.udp(7000).unwrap());
    let a = Agent::start_on(&b.id, &b.gw, &[], opts("keep")).unwrap();
    let stream = Stream::start(pump, pharmacy, 9000, 5000);
    let denied = Stream::start(pump, ws, 7000, 5001);
    let settle = || std::thread::sleep(Duration::from_millis(500));
    settle();

    // 1. SIGKILL: the pinned program keeps forwarding (and enforcing).
    a.crash();
    settle();
    let at_kill = stream.sent();
    settle();
    assert_eq!(rx.lost(at_kill), 0, "allowed datagrams lost while the agent was killed");
    assert_eq!(denied_rx.count(), 0, "denied datagrams passed while the agent was dead");

    // 2. A restart adopts the pins (the program is replaced in place), then a
    // stop that detaches (on_exit: detach): the kernel bridge carries it all.
    let a = Agent::start_on(&b.id, &b.gw, &[], opts("detach")).unwrap();
    settle();
    a.stop().unwrap();
    settle();
    let at_detach = stream.sent();
    settle();
    let lost_detach = rx.lost(at_detach);
    let through_bridge = denied_rx.count();
    assert!(through_bridge > 0, "fail-open: with XDP detached the kernel bridge carries even denied flows");

    // 3. Re-attach.
    let a = Agent::start_on(&b.id, &b.gw, &[], opts("keep")).unwrap();
    settle();
    let at_attach = stream.sent();
    let denied_at_attach = denied_rx.count();
    settle();
    let lost_attach = rx.lost(at_attach);
    assert!(denied_rx.count() - denied_at_attach <= 1, "re-attached: denied again");
    eprintln!(
        "2 kpps HL7 stream: lost {lost_detach} of {at_detach} through detach, {} more through re-attach; \
         {through_bridge} denied datagrams crossed the kernel bridge while XDP was detached",
        lost_attach - lost_detach
    );
    assert_eq!((lost_detach, lost_attach), (0, 0), "datagrams lost through detach / re-attach");

    // 4. Reloads under traffic: a changed file, then SIGHUP, twice.
    let dir = a.policy_dir();
    let denied_before = denied_rx.count();
    for k in 0..2 {
        let mut z = std::fs::read_to_string(dir.join("zones.yaml")).unwrap();
        z += &format!("  spare{k}: [10.20.0.{}/32]\n", 200 + k);
        std::fs::write(dir.join("zones.yaml"), z).unwrap();
        let st = a.reload().unwrap();
        assert_eq!(st["last_reload_ok"], true, "{st:#}");
        settle();
    }
    let at_reload = stream.sent();
    settle();
    assert_eq!(rx.lost(at_reload), 0, "allowed datagrams lost through policy reloads");
    assert_eq!(denied_rx.count(), denied_before, "denied datagrams passed during policy reloads");
    let total = stream.finish();
    denied.finish();
    settle();
    assert_eq!(rx.lost(total), 0);
    assert!(total > 5_000, "the stream ran for more than 2.5 s ({total} datagrams)");
    drop(a);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn three_ports_on_one_linux_bridge_are_judged_on_each_member_and_forwarded_by_the_kernel() {
    let b = Bump::with_extra(1, 1, 1, true).unwrap();
    b.warm_up().unwrap();
    let (pump, pharmacy, lab) = (&b.ward[0], &b.core[0], &b.extra[0]);
    let a = start(&b, "", policy(None));
    let ifs: Vec<model::Interface> = a.get("/api/v1/interfaces").unwrap();
    assert!(
        ifs.iter().all(|i| i.role == "bridge" && i.peer.is_none() && i.bridge.as_deref() == Some("ward3")),
        "{ifs:?}"
    );
    assert_eq!(ifs.len(), 3);
    assert_eq!(send(pump, 5000, pharmacy, 9000, 30, &hl7(100)), 30);
    assert_eq!(send(pump, 5001, lab, 7000, 20, &[1; 40]), 0, "the pumps' default denies the lab host");
    assert_eq!(send(lab, 5002, pharmacy, 7000, 10, &[2; 40]), 10, "no segment: not the policy's");
    assert_eq!(
        wait_flow(&a, WARD_PORT, pump, 5000, pharmacy, 9000, 30),
        (30, 30 * wire(100), "allow".into())
    );
    assert_eq!(flow(&a, CORE_PORT, pump, 5000, pharmacy, 9000), None, "counted on its ingress port only");
    let s = a.stats().unwrap();
    assert_eq!(s["policy_drop"].packets, 20);
    // XDP passes, the kernel bridge forwards: nothing goes through the devmap.
    assert_eq!((s["bridge_forwarded"].packets, s["bridge_no_peer"].packets), (0, 0));
}

#[test]
fn on_failure_closed_carries_frames_only_while_xdp_is_attached() {
    let b = Bump::new(1, 1, false).unwrap();
    let (pump, pharmacy) = (&b.ward[0], &b.core[0]);
    // Raw frames (a UDP send would leave the pump's ARP entry failed for the
    // next step): without XDP and without a kernel bridge nothing crosses.
    let raw = |n: usize| {
        let tx = RawSender::open(&pump.ns, "eth0").unwrap();
        let rx = Capture::open(&pharmacy.ns, "eth0").unwrap();
        let udp = frames::udp(4000, 9000, &hl7(60));
        let f =
            frames::eth(pharmacy.mac, pump.mac, &[], 0x0800, &V4::new(pump.ip, pharmacy.ip, 17).build(&udp));
        for _ in 0..n {
            tx.send(&f).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        rx.frames().iter().filter(|g| **g == f).count()
    };
    assert_eq!(raw(5), 0, "no kernel bridge: nothing crosses by itself");
    let opts =
        AgentOptions { extra_yaml: b.yaml("driver", "closed"), policy: policy(None), ..Default::default() };
    let a = Agent::start_on(&b.id, &b.gw, &[], opts).unwrap();
    assert_eq!(send(pump, 5001, pharmacy, 9000, 20, &hl7(60)), 20, "XDP forwards (ARP included)");
    assert_eq!(raw(5), 5);
    a.stop().unwrap();
    assert_eq!(raw(5), 0, "detached: closed");
}

/// `check` and `run` in the gateway namespace with this config: (ok, stderr).
fn agent_with(b: &Bump, yaml: &str, cmd: &str) -> (bool, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("{}-cfg", b.id));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.yaml");
    std::fs::write(
        &path,
        format!("{yaml}allow_private_bpffs: true\nstate_dir: {}\n", dir.join("state").display()),
    )
    .unwrap();
    let (ok, _, err) = mdsec_tests::agent::cli_in(&b.gw, &[cmd, "--config", path.to_str().unwrap()]);
    (ok, err, path)
}

#[test]
fn a_bad_bridge_is_refused_at_check_and_at_start_at_its_position() {
    let b = Bump::new(1, 1, true).unwrap();
    let bridge = |ports: &str, extra: &str| {
        format!("bridges:\n  - name: ward3\n    ports: {ports}\n    xdp_mode: driver\n{extra}")
    };
    let routed = "interfaces:\n  - name: ward\n    role: inline\n    xdp_mode: driver\n";
    let cases: Vec<(String, &str, (usize, &str), &str)> = vec![
        (bridge("[ward]", ""), "check", (3, "[ward]"), "has 1 port(s)"),
        (bridge("[ward, ward]", ""), "check", (3, "ward]"), "lists port `ward` twice"),
        (format!("{routed}{}", bridge("[ward, core]", "")), "check", (7, "ward,"), "also a routed port"),
        (
            bridge("[ward, core, nosuch0]", "    on_failure: closed\n"),
            "check",
            (5, "closed"),
            "needs exactly two ports",
        ),
        (bridge("[ward, nosuch0]", ""), "check", (3, "nosuch0"), "no interface named `nosuch0`"),
        (bridge("[ward, nosuch0]", ""), "run", (3, "nosuch0"), "no interface named `nosuch0`"),
        (bridge("[ward, core]", "    on_failure: closed\n"), "check", (3, "core"), "is a member of `br0`"),
        (bridge("[ward, core]", "    on_failure: closed\n"), "run", (3, "core"), "is a member of `br0`"),
    ];
    for (yaml, cmd, (line, at), message) in cases {
        let (ok, err, path) = agent_with(&b, &yaml, cmd);
        let col = yaml.lines().nth(line - 1).unwrap().find(at).unwrap() + 1;
        let want = format!("{}:{line}:{col}: ", path.display());
        assert!(
            !ok && err.contains(&want) && err.contains(message),
            "{cmd} of\n{yaml}\nwants {want}…{message}, got:\n{err}"
        );
    }
    let (ok, err, _) = agent_with(&b, &bridge("[ward, core]", ""), "check");
    assert!(ok, "a good bridge passes: {err}");

    // Ports whose driver has no native XDP (macvlans of a spare veth): driver
    // mode does not start, and does not fall back to skb by itself.
    let gw = |args: &[&str]| {
        let mut full = vec!["-n", b.gw.as_str()];
        full.extend_from_slice(args);
        mdsec_tests::netns::ip(&full).unwrap();
    };
    gw(&["link", "add", "spare0", "type", "veth", "peer", "name", "spare1"]);
    gw(&["link", "add", "br1", "type", "bridge"]);
    for (d, on) in [("d0", "spare0"), ("d1", "spare1")] {
        gw(&["link", "add", "link", on, "name", d, "type", "macvlan"]);
        gw(&["link", "set", d, "master", "br1", "up"]);
    }
    let dummies = "bridges:\n  - name: lab\n    ports: [d0, d1]\n    xdp_mode: driver\n";
    let (ok, err, _) = agent_with(&b, dummies, "run");
    assert!(!ok && err.contains("attach XDP to d0"), "driver mode on a dummy must not start:\n{err}");
    let (ok, err, path) = agent_with(&b, &dummies.replace("driver", "skb"), "check");
    assert!(ok, "skb is the operator's explicit choice: {err}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// ARP spoofing and duplicate addresses on a bump, in real ARP frames built
/// by scapy: ward host 2 claims the pharmacy's address (bound to its MAC by
/// `detection.arp_bindings`) and then pump 1's, while pump 1 is active.
#[test]
fn arp_claims_of_a_bound_address_and_of_an_active_hosts_address_are_detected() {
    let b = Bump::new(2, 2, true).unwrap();
    b.warm_up().unwrap();
    let (pump, intruder, pharmacy) = (&b.ward[0], &b.ward[1], &b.core[0]);
    let mac = |e: &End| mdsec_agent::base::net::mac_string(e.mac);
    let extra = format!("detection:\n  arp_bindings:\n    \"{}\": \"{}\"\n", pharmacy.ip, mac(pharmacy));
    let a = start(&b, &extra, policy(None));
    // The warm-up's ARP and pings came first: nothing was claimed twice.
    std::thread::sleep(Duration::from_secs(3));
    let claim = |ip: Ipv4Addr| {
        let code = format!(
            "from scapy.all import *\nm=get_if_hwaddr('eth0')\n\
             sendp([Ether(src=m,dst='ff:ff:ff:ff:ff:ff')/ARP(op=2,hwsrc=m,psrc='{ip}',hwdst='ff:ff:ff:ff:ff:ff',pdst='{ip}')]*3,iface='eth0',verbose=0)"
        );
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &intruder.ns, "/usr/bin/python3", "-c", &code])
            .output()
            .unwrap();
        assert!(out.status.success(), "scapy: {}", String::from_utf8_lossy(&out.stderr));
    };
    // The pump is active (and its address known to this agent, which started
    // after the warm-up) before the claims: after them its frames may never
    // cross the bump, since the broadcast claims can poison the ward hosts'
    // ARP caches (whether they do depends on the kernel's neighbour state).
    send(pump, 5000, pharmacy, 9000, 5, &hl7(100));
    a.wait_for(
        Duration::from_secs(10),
        |a| a.devices(),
        |d| d.iter().any(|d| d.mac == mac(pump) && d.ips.contains(&pump.ip.to_string())).then_some(()),
    )
    .unwrap();
    claim(pharmacy.ip);
    claim(pump.ip);
    let kinds = ["arp_spoofing", "duplicate_ip"];
    let found = |e: &Vec<model::Event>| {
        let f = mdsec_tests::agent::sorted_kinds(e, &kinds);
        (f.len() >= 2).then_some(f)
    };
    let got = a.wait_for(Duration::from_secs(20), |a| a.events(), found).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let again = found(&a.events().unwrap()).unwrap();
    assert_eq!(got, again, "each claim is reported once");
    assert_eq!(
        got,
        [
            ("arp_spoofing".to_string(), pharmacy.ip.to_string(), Some(mac(intruder))),
            ("duplicate_ip".to_string(), pump.ip.to_string(), Some(mac(intruder)))
        ],
        "{}",
        a.log()
    );
    let events = a.events().unwrap();
    let spoof = events.iter().find(|e| e.kind == "arp_spoofing").unwrap();
    assert_eq!((spoof.severity.as_str(), spoof.iface.as_str()), ("high", WARD_PORT));
    assert!(spoof.reason.contains(&mac(pharmacy)), "{}", spoof.reason);
    let dup = events.iter().find(|e| e.kind == "duplicate_ip").unwrap();
    assert!(dup.reason.contains(&mac(pump)), "{}", dup.reason);
    // Pump 1's own address is its own: it is reported as neither.
    assert!(events.iter().filter(|e| kinds.contains(&e.kind.as_str())).all(|e| e.mac != Some(mac(pump))));
    // Three announcements each were no flood; thirty from the pump are.
    assert!(!events.iter().any(|e| e.kind == "gratuitous_arp_flood"), "{events:#?}");
    let code = format!(
        "from scapy.all import *\nm=get_if_hwaddr('eth0')\n\
         sendp([Ether(src=m,dst='ff:ff:ff:ff:ff:ff')/ARP(op=1,hwsrc=m,psrc='{ip}',pdst='{ip}')]*30,iface='eth0',verbose=0)",
        ip = pump.ip
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &pump.ns, "/usr/bin/python3", "-c", &code])
        .output()
        .unwrap();
    assert!(out.status.success(), "scapy: {}", String::from_utf8_lossy(&out.stderr));
    let flood = |e: &Vec<model::Event>| {
        let f = mdsec_tests::agent::sorted_kinds(e, &["gratuitous_arp_flood"]);
        (!f.is_empty()).then_some(f)
    };
    let got = a.wait_for(Duration::from_secs(10), |a| a.events(), flood).unwrap();
    assert_eq!(got, [("gratuitous_arp_flood".to_string(), pump.ip.to_string(), Some(mac(pump)))]);
    let e = a.events().unwrap().into_iter().find(|e| e.kind == "gratuitous_arp_flood").unwrap();
    assert!(e.reason.contains(" gratuitous ARPs in ") && e.severity == "high", "{}", e.reason);
}

//! IPFIX export to real collectors: nfcapd (nfdump's collector, from Debian)
//! and pmacct's nfacctd receive the agent's UDP export in the gateway's
//! namespace; nfdump reads back, and nfacctd prints, per-flow packets and
//! bytes, which must equal what packet taps on the hosts counted, for TCP, UDP and ICMP over IPv4 and UDP over IPv6. A TCP
//! collector gets the same records framed as a stream, templates first. tshark
//! decodes every message shape the exporter writes, none malformed.
//!
//! Topology: h1, h2, h3 routed by the gateway (no policy: observe only).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mdsec_tests::{
    agent::{Agent, AgentOptions},
    netns::{Bg, SharedBpffs, TempDir, Topology, in_netns},
    traffic::{self, Tap},
};

const WAIT: Duration = Duration::from_secs(20);

/// A collector daemon of ours in the gateway's namespace, with its working
/// directory: stopped by PID and the directory removed when dropped.
struct Collector {
    bg: Bg,
    dir: PathBuf,
}

impl Collector {
    /// `ip netns exec NS ARGS…`; `settle`: how long it takes to bind (records
    /// sent before would be lost).
    fn start(ns: &str, dir: &Path, args: &[&std::ffi::OsStr], settle: Duration) -> Collector {
        std::fs::create_dir_all(dir).unwrap();
        let bg = Bg::in_ns(ns, args);
        std::thread::sleep(settle);
        Collector { bg, dir: dir.to_path_buf() }
    }

    fn stop(&mut self) {
        self.bg.stop();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nfcapd writing into `dir`.
fn nfcapd(ns: &str, port: u16, dir: &Path) -> Collector {
    let port = port.to_string();
    let args: Vec<&std::ffi::OsStr> = ["nfcapd", "-b", "127.0.0.1", "-p", &port, "-t", "3600", "-w"]
        .into_iter()
        .map(std::ffi::OsStr::new)
        .chain([dir.as_os_str()])
        .collect();
    Collector::start(ns, dir, &args, Duration::from_millis(500))
}

/// Stops nfcapd (which closes its file on SIGTERM) and returns every flow
/// nfdump reads: (src, dst, sport, dport, proto, packets, bytes); ports as
/// nfdump prints them (ICMP: `type.code` in the destination port).
fn nfdump_flows(nfcapd: &mut Collector) -> Vec<(String, String, String, String, String, u64, u64)> {
    nfcapd.stop();
    let out = Command::new("nfdump")
        .arg("-R")
        .arg(&nfcapd.dir)
        // -N: plain numbers (protocols too), not 1.2 K.
        .args(["-q", "-N", "-o", "fmt:%sa|%da|%sp|%dp|%pr|%pkt|%byt"])
        .output()
        .unwrap();
    assert!(out.status.success(), "nfdump: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            assert_eq!(f.len(), 7, "{l}");
            (
                f[0].to_string(),
                f[1].to_string(),
                f[2].to_string(),
                f[3].to_string(),
                f[4].to_string(),
                f[5].parse().unwrap(),
                f[6].parse().unwrap(),
            )
        })
        .collect()
}

/// (src, dst, sport, dport, proto) → (packets, bytes).
type Totals = std::collections::BTreeMap<(String, String, u16, u16, u8), (u64, u64)>;

/// pmacct's nfacctd, its print plugin appending CSV to `dir`/flows.csv every
/// second.
fn nfacctd(ns: &str, port: u16, dir: &Path) -> Collector {
    std::fs::create_dir_all(dir).unwrap();
    let conf = dir.join("nfacctd.conf");
    std::fs::write(
        &conf,
        format!(
            "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\nplugins: print\n\
             print_output: csv\nprint_output_file: {}\nprint_output_file_append: true\n\
             print_refresh_time: 1\nprint_num_protos: true\n\
             aggregate: src_host, dst_host, src_port, dst_port, proto\n",
            dir.join("flows.csv").display()
        ),
    )
    .unwrap();
    let args = ["nfacctd".as_ref(), "-f".as_ref(), conf.as_os_str()];
    Collector::start(ns, dir, &args, Duration::from_millis(800))
}

/// What nfacctd printed, summed over every interval.
fn nfacctd_totals(nfacctd: &Collector) -> Totals {
    let text = std::fs::read_to_string(nfacctd.dir.join("flows.csv")).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    let mut cols: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.iter().any(|c| c.eq_ignore_ascii_case("SRC_IP")) {
            cols = f.iter().map(|c| c.to_ascii_uppercase()).collect();
            continue;
        }
        let get = |name: &str| {
            f[cols.iter().position(|c| c == name).unwrap_or_else(|| panic!("{name} in {cols:?}"))]
        };
        let key = (
            get("SRC_IP").to_string(),
            get("DST_IP").to_string(),
            get("SRC_PORT").parse().unwrap(),
            get("DST_PORT").parse().unwrap(),
            get("PROTOCOL").parse().unwrap(),
        );
        let e = out.entry(key).or_insert((0, 0));
        e.0 += get("PACKETS").parse::<u64>().unwrap();
        e.1 += get("BYTES").parse::<u64>().unwrap();
    }
    out
}

fn sent(agent: &Agent) -> u64 {
    agent.metrics().unwrap().sum("mdsec_ipfix_records_total", &[("result", "sent")]) as u64
}

#[test]
fn nfcapd_and_nfdump_read_exactly_what_the_hosts_sent() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let dir = std::env::temp_dir().join(format!("{}-nfcapd", topo.id));
    let mut nfcapd = nfcapd(&topo.gw, 14739, &dir);
    let nfacctd = nfacctd(&topo.gw, 14741, &std::env::temp_dir().join(format!("{}-nfacctd", topo.id)));
    // A TCP collector too: the same records, as a stream.
    let tcp: TcpListener = in_netns(&topo.gw, || TcpListener::bind("127.0.0.1:14740")).unwrap().unwrap();
    let agent = Agent::start(
        &topo,
        AgentOptions {
            extra_yaml: "flow_idle_timeout_secs: 2\nipfix:\n  collectors: [\"udp://127.0.0.1:14739\", \"tcp://127.0.0.1:14740\", \"udp://127.0.0.1:14741\"]\n  observation_domain: 7\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let (h1, h2, h3) = (topo.host(1), topo.host(2), topo.host(3));
    let (tap1, tap2) = (Tap::open(h1).unwrap(), Tap::open(h2).unwrap());

    // TCP h1 -> h2:7200, closed by both ends.
    let server_addr = SocketAddr::new(h2.v4().into(), 7200);
    let listener = traffic::tcp_listener(h2, 7200).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&vec![1u8; 5000]).unwrap();
    });
    let mut c = traffic::tcp_connect(h1, server_addr).unwrap();
    let client = c.local_addr().unwrap();
    c.write_all(&vec![7u8; 30_000]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    server.join().unwrap();
    drop(c);
    // UDP h1 -> h3:9300 (5 datagrams), over IPv4 and IPv6.
    for v6 in [false, true] {
        let rx = traffic::udp_receiver(h3, v6, 9300).unwrap();
        let tx = traffic::udp_socket(h1, v6).unwrap();
        traffic::send_and_settle(&tx, SocketAddr::new(h3.ip(v6), 9300), 5, 100).unwrap();
        assert_eq!(traffic::drain(&rx), 5);
    }
    // ICMP echo h1 -> h2, 3 requests and their replies.
    let ping = Command::new("ip")
        .args(["netns", "exec", &h1.ns, "ping", "-c", "3", "-i", "0.2", "-q", &h2.v4().to_string()])
        .output()
        .unwrap();
    assert!(ping.status.success());
    std::thread::sleep(Duration::from_millis(300));
    let up = tap1.tally(6, client, server_addr);
    let down = tap2.tally(6, server_addr, client);

    // Every conversation of the test ages out (2 s idle): TCP 2 records, UDP
    // 1 + 1, ICMP 2. The hosts' own IPv6 neighbour discovery is flows too, which
    // end when they end: the test's are picked out below.
    let ours = |sport: u16, dport: u16, proto: u8| {
        matches!((proto, sport, dport), (6, 7200, _) | (6, _, 7200) | (17, _, 9300) | (1, 8 | 0, 0))
    };
    let t0 = Instant::now();
    while t0.elapsed() < WAIT && agent.flows().unwrap().iter().any(|f| ours(f.sport, f.dport, f.proto_num)) {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(sent(&agent) >= 6, "records sent");
    // Sent is not yet received: give nfcapd its socket buffer's worth of time.
    std::thread::sleep(Duration::from_millis(1000));
    let flows = nfdump_flows(&mut nfcapd);
    let find = |sa: &str, sp: u16, dp: u16, pr: &str| {
        flows
            .iter()
            .find(|f| f.0 == sa && f.2 == sp.to_string() && f.3 == dp.to_string() && f.4 == pr)
            .unwrap_or_else(|| panic!("no {sa}:{sp} -> {dp} {pr} in {flows:?}"))
    };
    let (cs, ss) = (client.ip().to_string(), server_addr.ip().to_string());
    let f_up = find(&cs, client.port(), 7200, "6");
    assert_eq!((f_up.1.as_str(), f_up.5, f_up.6), (ss.as_str(), up.packets, up.bytes));
    let f_down = find(&ss, 7200, client.port(), "6");
    assert_eq!((f_down.5, f_down.6), (down.packets, down.bytes));
    // UDP: 5 frames of 14 + 20 + 8 + 100 bytes (IPv6: 40-byte header).
    let u4 = flows.iter().find(|f| f.3 == "9300" && f.4 == "17" && !f.0.contains(':')).unwrap();
    assert_eq!((u4.5, u4.6), (5, 5 * 142));
    let u6 = flows.iter().find(|f| f.3 == "9300" && f.4 == "17" && f.0.contains(':')).unwrap();
    assert_eq!((u6.5, u6.6), (5, 5 * 162));
    // ICMP: each direction its own record, 3 echoes of 98-byte frames.
    let icmp: Vec<_> = flows.iter().filter(|f| f.4 == "1").collect();
    assert_eq!(icmp.len(), 2, "{icmp:?}");
    assert!(icmp.iter().all(|f| (f.5, f.6) == (3, 3 * 98)), "{icmp:?}");
    // Type and code in the destination port: echo request 8.0 out, reply 0.0 back.
    let mut types: Vec<&str> = icmp.iter().map(|f| f.3.as_str()).collect();
    types.sort();
    assert_eq!(types, ["0.0", "8.0"], "{icmp:?}");
    let mine: Vec<_> = flows
        .iter()
        .filter(|f| {
            let port = |p: &str| p.parse::<u16>().unwrap_or(0);
            let pr: u8 = f.4.parse().unwrap();
            (pr == 1 && !f.0.contains(':')) || (pr != 1 && ours(port(&f.2), port(&f.3), pr))
        })
        .collect();
    assert_eq!(mine.len(), 6, "nothing twice: {flows:?}");

    // pmacct's nfacctd printed the same totals (it prints every second).
    let want: std::collections::BTreeMap<_, _> = mine
        .iter()
        .filter(|f| f.4 != "1")
        .map(|f| {
            (
                (f.0.clone(), f.1.clone(), f.2.parse().unwrap(), f.3.parse().unwrap(), f.4.parse().unwrap()),
                (f.5, f.6),
            )
        })
        .collect();
    // nfacctd prints on its own timer: the ICMP records may come a print later.
    let icmp = |t: &Totals| -> u64 {
        t.iter().filter(|(k, _)| k.4 == 1 && !k.0.contains(':')).map(|(_, v)| v.0).sum()
    };
    let printed = agent
        .wait_for(
            WAIT,
            |_| Ok(nfacctd_totals(&nfacctd)),
            |t| (want.keys().all(|k| t.get(k) == want.get(k)) && icmp(t) >= 6).then(|| t.clone()),
        )
        .unwrap_or_else(|e| panic!("nfacctd printed {:?}, want {want:?}: {e}", nfacctd_totals(&nfacctd)));
    let icmp_pk = icmp(&printed);
    assert_eq!(icmp_pk, 6, "ICMP echo and reply, 3 each: {printed:?}");

    // The TCP collector: templates first, then the same 6 records.
    let (mut s, _) = tcp.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut stream = Vec::new();
    let _ = s.read_to_end(&mut stream);
    let (templates, records) = walk(&stream);
    assert!(templates >= 1);
    let mut got: Vec<(u8, u64)> = records
        .iter()
        .filter(|r| ours(r.sport, r.dport, r.proto) || r.proto == 1)
        .map(|r| (r.proto, r.packets))
        .collect();
    got.sort();
    let mut want: Vec<(u8, u64)> = mine.iter().map(|f| (f.4.parse().unwrap(), f.5)).collect();
    want.sort();
    assert_eq!(got, want, "the TCP collector got the same records");
    drop(agent);
}

/// One data record, as [`walk`] reads it.
#[derive(Debug, Clone, Copy)]
struct Rec {
    proto: u8,
    sport: u16,
    dport: u16,
    packets: u64,
    bytes: u64,
    end_reason: u8,
}

/// Walks a TCP stream of IPFIX messages (or UDP messages end to end), every
/// message and set length checked against the bytes: the number of template
/// sets, and each data record.
fn walk(b: &[u8]) -> (usize, Vec<Rec>) {
    let (mut templates, mut records) = (0, Vec::new());
    let mut i = 0;
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    while i < b.len() {
        assert_eq!(u16_at(i), 10, "IPFIX version at {i}");
        let len = u16_at(i + 2) as usize;
        assert!(len >= 16 && i + len <= b.len(), "message length at {i}");
        assert_eq!(u32::from_be_bytes(b[i + 12..i + 16].try_into().unwrap()), 7, "observation domain");
        let mut j = i + 16;
        while j < i + len {
            let (id, slen) = (u16_at(j), u16_at(j + 2) as usize);
            assert!(slen >= 4 && j + slen <= i + len, "set length");
            // Record sizes and field offsets of the two templates: IPv4 77 bytes,
            // IPv6 101 (the addresses 24 bytes longer).
            let (size, extra) = match id {
                2 => {
                    templates += 1;
                    (0, 0)
                }
                256 => (77, 0),
                257 => (101, 24),
                other => panic!("set {other}"),
            };
            if size > 0 {
                assert_eq!((slen - 4) % size, 0, "whole records");
                for r in b[j + 4..j + slen].chunks(size) {
                    let at = |o: usize| u16::from_be_bytes([r[o + extra], r[o + extra + 1]]);
                    let u64_at = |o: usize| u64::from_be_bytes(r[o..o + 8].try_into().unwrap());
                    records.push(Rec {
                        proto: r[58 + extra],
                        sport: at(44),
                        dport: at(46),
                        packets: u64_at(8),
                        bytes: u64_at(0),
                        end_reason: r[59 + extra],
                    });
                }
            }
            j += slen;
        }
        i += len;
    }
    (templates, records)
}

/// Every frame goes out once: a long UDP flow reports every active timeout
/// (flowEndReason 2), a TCP conversation closed both ways ends a closed
/// timeout after its close, long before the idle timeout (3), and a restart
/// with `on_exit: keep` (the datapath counting on meanwhile) reports only what
/// came after the first run's shutdown records (4). The deltas of every record
/// of a flow add up to exactly what the hosts sent.
#[test]
fn active_timeouts_closes_and_a_restart_report_every_frame_once() {
    let topo = Topology::new(3).unwrap();
    topo.warm_up().unwrap();
    let fs = SharedBpffs::new(&topo.id);
    let state = TempDir(std::env::temp_dir().join(format!("{}-state", topo.id)));
    std::fs::create_dir_all(&state.0).unwrap();
    // The EVE sink's flow records come from the same ledger: checked alike.
    let eve_log = state.0.join("eve.json");
    let rx = in_netns(&topo.gw, || std::net::UdpSocket::bind("127.0.0.1:14750")).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let opts = |on_exit: &str| AgentOptions {
        extra_yaml: format!(
            "on_exit: {on_exit}\npin_dir: {}\nflow_idle_timeout_secs: 60\nflow_closed_timeout_secs: 1\n\
             flow_active_timeout_secs: 1\nipfix:\n  collectors: [\"udp://127.0.0.1:14750\"]\n  observation_domain: 7\n\
             events:\n  log: {}\n  log_format: eve\n",
            fs.0.join("mdsec").display(),
            eve_log.display()
        ),
        state_dir: Some(state.0.clone()),
        ..Default::default()
    };
    let mut messages = Vec::new();
    let mut collect = || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = rx.recv(&mut buf) {
            messages.extend_from_slice(&buf[..n]);
        }
        walk(&messages).1
    };
    let (h1, h2, h3) = (topo.host(1), topo.host(2), topo.host(3));
    // One tap per tally: a tally drains its tap.
    let (tap, udp_tap) = (Tap::open(h1).unwrap(), Tap::open(h1).unwrap());
    let udp_rx = traffic::udp_receiver(h3, false, 9400).unwrap();
    let tx = traffic::udp_socket(h1, false).unwrap();
    let to = SocketAddr::new(h3.v4().into(), 9400);
    let burst = || {
        traffic::send_and_settle(&tx, to, 5, 100).unwrap();
        std::thread::sleep(Duration::from_millis(1600));
    };

    let first = Agent::start(&topo, opts("keep")).unwrap();
    burst();
    burst();
    // A TCP conversation, closed by both ends.
    let server_addr = SocketAddr::new(h2.v4().into(), 7201);
    let listener = traffic::tcp_listener(h2, 7201).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(b"bye").unwrap();
    });
    let mut c = traffic::tcp_connect(h1, server_addr).unwrap();
    let client = c.local_addr().unwrap();
    c.write_all(&[7u8; 3000]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    c.read_to_end(&mut Vec::new()).unwrap();
    server.join().unwrap();
    drop(c);
    let closed_at = Instant::now();
    let tcp_records = |recs: &[Rec]| -> Vec<Rec> {
        recs.iter().filter(|r| r.proto == 6 && (r.sport == 7201 || r.dport == 7201)).copied().collect()
    };
    let mut recs = collect();
    while tcp_records(&recs).len() < 2 && closed_at.elapsed() < WAIT {
        recs = collect();
    }
    let tcp = tcp_records(&recs);
    assert!(closed_at.elapsed() < Duration::from_secs(10), "ended well before the 60 s idle timeout");
    assert_eq!(tcp.len(), 2, "one record per direction: {tcp:?}");
    assert!(tcp.iter().all(|r| r.end_reason == 3), "end of flow detected: {tcp:?}");
    let up = tap.tally(6, client, server_addr);
    let got_up = tcp.iter().find(|r| r.sport == client.port()).unwrap();
    assert_eq!((got_up.packets, got_up.bytes), (up.packets, up.bytes));
    // Frames no active record covered yet go out as the agent stops.
    traffic::send_and_settle(&tx, to, 5, 100).unwrap();
    assert!(first.stop().unwrap().success());

    // Counted by the datapath while no agent runs, then by the next one.
    traffic::send_and_settle(&tx, to, 5, 100).unwrap();
    let second = Agent::start(&topo, opts("detach")).unwrap();
    assert!(second.log().contains("carry on from there"), "{}", second.log());
    burst();
    traffic::send_and_settle(&tx, to, 5, 100).unwrap();
    assert!(second.stop().unwrap().success());
    assert_eq!(traffic::drain(&udp_rx), 30);

    let sport = tx.local_addr().unwrap().port();
    let recs = collect();
    let udp: Vec<&Rec> =
        recs.iter().filter(|r| r.proto == 17 && r.sport == sport && r.dport == 9400).collect();
    let sent = udp_tap.tally(17, tx.local_addr().unwrap(), to);
    assert_eq!(sent.packets, 30);
    let total = |f: fn(&Rec) -> u64| udp.iter().map(|r| f(r)).sum::<u64>();
    assert_eq!((total(|r| r.packets), total(|r| r.bytes)), (30, sent.bytes), "every frame once: {udp:?}");
    let count = |reason: u8| udp.iter().filter(|r| r.end_reason == reason).count();
    // At least one active record in each run (the first comes one to two
    // timeouts into the flow, then one a timeout); each run's last five go
    // out in its last poll (an active record, if the flow's phase falls in
    // it) or as the agent stops.
    assert!(count(2) >= 2 && count(2) + count(4) == udp.len(), "{udp:?}");
    assert_eq!(tcp_records(&recs).len(), 2, "the closed conversation is not reported again: {recs:?}");

    // EVE: the same spans, one record per span for both directions, under
    // one flow_id, each valid against the schema's flow fields.
    let eve: Vec<serde_json::Value> = std::fs::read_to_string(&eve_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["event_type"] == "flow")
        .collect();
    let eve_udp: Vec<&serde_json::Value> =
        eve.iter().filter(|v| v["src_port"] == sport && v["dest_port"] == 9400).collect();
    assert_eq!(eve_udp.len(), udp.len(), "{eve_udp:?}");
    let pkts: u64 = eve_udp.iter().map(|v| v["flow"]["pkts_toserver"].as_u64().unwrap()).sum();
    assert_eq!(pkts, 30);
    assert!(eve_udp.iter().all(|v| v["flow_id"] == eve_udp[0]["flow_id"]));
    let reasons: std::collections::BTreeSet<&str> =
        eve_udp.iter().map(|v| v["flow"]["reason"].as_str().unwrap()).collect();
    assert!(
        reasons.contains("active_timeout")
            && reasons.iter().all(|r| ["active_timeout", "shutdown"].contains(r))
    );
    for v in &eve {
        let bad = mdsec_agent::surfaces::eve::schema::flow_violations(v);
        assert!(bad.is_empty(), "{bad:?} in {v}");
    }
    let eve_tcp: Vec<_> = eve.iter().filter(|v| v["dest_port"] == 7201).collect();
    assert_eq!(eve_tcp.len(), 1, "{eve_tcp:?}");
    assert_eq!(
        (eve_tcp[0]["flow"]["reason"].as_str(), eve_tcp[0]["flow"]["state"].as_str()),
        (Some("timeout"), Some("closed"))
    );
}

/// tshark (Wireshark's dissector, an independent decoder) reads messages of
/// every shape this exporter writes: templates alone, IPv4 and IPv6 data sets,
/// messages split at the size limit. Every message decodes, none is malformed,
/// and every record is found with its counters.
#[test]
fn tshark_decodes_every_message_and_record() {
    use mdsec_agent::surfaces::ipfix::{Record, Stream};
    use mdsec_common::flow::FlowKey;
    let mut stream = Stream { domain: 7, sequence: 0 };
    let records: Vec<Record> = (0..60u32)
        .map(|i| {
            let v6 = i % 5 == 0;
            let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
            if v6 {
                (src[0], dst[0], dst[15]) = (0xfd, 0xfd, 9);
            } else {
                (src[10], src[11], dst[10], dst[11], src[12], dst[12], dst[15]) =
                    (0xff, 0xff, 0xff, 0xff, 10, 10, 9);
            }
            src[14..16].copy_from_slice(&(i as u16).to_be_bytes());
            Record {
                key: FlowKey {
                    ifindex: 2,
                    vlan: 0,
                    proto: if i % 7 == 0 { 1 } else { 17 },
                    _pad: 0,
                    src,
                    dst,
                    sport: 1000 + i as u16,
                    dport: 53,
                },
                mac: [2, 0, 0, 0, 0, 1],
                packets: 100 + i as u64,
                bytes: 10_000 + i as u64,
                start_ms: 1_764_000_000_000,
                end_ms: 1_764_000_001_000,
                tcp_flags: 0,
                end_reason: 1,
                forwarding: 64,
                app: "dns",
            }
        })
        .collect();
    let mut messages = stream.messages(&[], true, 1_764_000_000);
    messages.extend(stream.messages(&records, false, 1_764_000_001));
    assert!(messages.len() >= 5, "{} messages", messages.len());
    let pcap = std::env::temp_dir().join(format!("ipfix-tshark-{}.pcap", std::process::id()));
    write_pcap(&pcap, &messages);
    let tshark = |extra: &[&str]| {
        let out = Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args(["-d", "udp.port==4739,cflow"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let malformed = tshark(&["-Y", "_ws.malformed || _ws.expert.severity >= warning"]);
    assert!(malformed.trim().is_empty(), "tshark flags: {malformed}");
    // tshark calls a message shorter than its header's length "partial".
    let summary = tshark(&[]);
    assert!(!summary.contains("partial"), "{summary}");
    let decoded = tshark(&["-T", "fields", "-e", "cflow.version", "-e", "cflow.od_id"]);
    let lines: Vec<&str> = decoded.lines().collect();
    assert_eq!(lines.len(), messages.len());
    assert!(lines.iter().all(|l| *l == "10\t7"), "{lines:?}");
    let packets = tshark(&["-T", "fields", "-e", "cflow.packets"]);
    let mut seen: Vec<u64> = packets
        .split(['\n', ','])
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().parse().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, (100..160).collect::<Vec<u64>>(), "every record, once");
    // The check can fail: a message cut short (its header still claiming the
    // whole length) is reported.
    let mut cut = messages.clone();
    let last = cut.last_mut().unwrap();
    last.truncate(last.len() - 10);
    write_pcap(&pcap, &cut);
    assert!(tshark(&[]).contains("IPFIX partial flow"));
    let _ = std::fs::remove_file(&pcap);
}

/// A pcap of one UDP datagram (10.0.0.1:40000 → 10.0.0.2:4739) per message.
fn write_pcap(path: &Path, messages: &[Vec<u8>]) {
    let mut f = Vec::new();
    for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65_535, 1] {
        if v == 0x0004_0002 {
            f.extend_from_slice(&2u16.to_le_bytes());
            f.extend_from_slice(&4u16.to_le_bytes());
        } else {
            f.extend_from_slice(&v.to_le_bytes());
        }
    }
    for (i, m) in messages.iter().enumerate() {
        let udp_len = 8 + m.len();
        let ip_len = 20 + udp_len;
        let mut ip = vec![
            0x45,
            0,
            (ip_len >> 8) as u8,
            ip_len as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
            10,
            0,
            0,
            1,
            10,
            0,
            0,
            2,
        ];
        let sum = ip.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum::<u32>();
        let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&40000u16.to_be_bytes());
        frame.extend_from_slice(&4739u16.to_be_bytes());
        frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(m);
        for v in [1_764_000_000 + i as u32, 0, frame.len() as u32, frame.len() as u32] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&frame);
    }
    std::fs::write(path, f).unwrap();
}

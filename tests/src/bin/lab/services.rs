//! The hospital's services and traffic: real peers from Debian in the device
//! namespaces, our own HL7 over MLLP, and the attack phase's frames.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt;

use anyhow::{Context, Result, bail};
use mdsec_agent::surfaces::model::Flow;
use mdsec_tests::{
    frames::{self, RawSender, V4},
    hospital::Hospital,
    netns::{bind_in, in_netns},
};

/// `ip netns exec NS args…` (under `timeout SECS` if given), quiet and out
/// of the terminal's process group: Ctrl-C is the lab's to handle.
fn quiet(ns: &str, args: &[&str], timeout: Option<u32>) -> Command {
    let mut c = match timeout {
        Some(secs) => {
            let mut t = Command::new("timeout");
            t.arg(secs.to_string()).arg("ip");
            t
        }
        None => Command::new("ip"),
    };
    c.args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    c
}

/// A background process in a namespace, killed by PID when dropped.
pub struct Bg(Child);

impl Bg {
    pub fn start(ns: &str, args: &[&str]) -> Result<Bg> {
        let child = quiet(ns, args, None).spawn().with_context(|| format!("start {args:?}"))?;
        Ok(Bg(child))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a short command in a device's namespace (bounded by `timeout`).
pub fn run_in(ns: &str, secs: u32, args: &[&str]) -> bool {
    quiet(ns, args, Some(secs)).status().is_ok_and(|s| s.success())
}

/// A tiny deterministic jitter source (no dependency, no shared state).
pub struct Jitter(u64);

impl Jitter {
    pub fn sleep(&mut self, base_ms: u64, spread_ms: u64, running: &AtomicBool) {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let ms = base_ms - spread_ms + (self.0 >> 33) % (2 * spread_ms + 1);
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until && running.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn hl7_message(app: &str, n: u64) -> Vec<u8> {
    format!(
        "\x0bMSH|^~\\&|{app}|WARD3|CLINICAL|HOSP|20261125120000||ORU^R01|{app}{n}|P|2.5\rPID|1||MRN{:04}\rOBX|1|NM|RATE^Infusion rate||12.5|mL/h\r\x1c\r",
        n % 10_000
    )
    .into_bytes()
}

/// A TCP server in `ns` on `ip:port`: each connection handled on its own thread
/// until `running` is cleared.
pub fn serve(
    ns: &str,
    ip: Ipv4Addr,
    port: u16,
    running: Arc<AtomicBool>,
    handle: fn(TcpStream),
) -> Result<thread::JoinHandle<()>> {
    let addr = SocketAddr::new(ip.into(), port);
    let l: TcpListener = bind_in(ns, move || TcpListener::bind(addr))?;
    l.set_nonblocking(true)?;
    Ok(thread::spawn(move || {
        while running.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    thread::spawn(move || handle(s));
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }))
}

/// MLLP: answers every message with an HL7 ACK.
pub fn hl7_ack(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.ends_with(b"\x1c\r") {
            let _ = s.write_all(b"\x0bMSH|^~\\&|HIS|HOSP|||20261125120000||ACK|1|P|2.5\rMSA|AA|1\r\x1c\r");
            got.clear();
        }
    }
}

/// The EMR's web front end: 200 to anything.
pub fn http_ok(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 2048];
    let _ = s.read(&mut buf);
    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
}

pub fn hl7_send(ns: &str, to: Ipv4Addr, msg: &[u8]) -> Result<()> {
    let to = SocketAddr::new(to.into(), 2575);
    let mut s: TcpStream = in_netns(ns, move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))??;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(msg)?;
    let mut buf = [0u8; 512];
    let _ = s.read(&mut buf)?;
    Ok(())
}

pub type Workers = (Vec<Bg>, Vec<thread::JoinHandle<()>>);

pub fn start_services_and_traffic(h: &Hospital, work: &Path, running: Arc<AtomicBool>) -> Result<Workers> {
    let ip = |n: &str| Hospital::spec(n).ip();
    let mut bg = Vec::new();
    // Internal DNS and an outside resolver (dnsmasq), DHCP on the gateway for
    // the pump and monitor LANs, PACS (dcmtk storescp).
    let pid = |n: &str| format!("--pid-file={}", work.join(format!("{n}.pid")).display());
    bg.push(Bg::start(
        &h.ns("dns"),
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=10.40.0.53",
            "--bind-interfaces",
            "--address=/hospital.internal/10.40.0.20",
            &pid("dns"),
        ],
    )?);
    bg.push(Bg::start(
        &h.ns("resolver"),
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=10.99.0.53",
            "--bind-interfaces",
            "--address=/#/203.0.113.66",
            &pid("resolver"),
        ],
    )?);
    bg.push(Bg::start(
        &h.gw,
        &[
            "dnsmasq",
            "--no-daemon",
            "--port=0",
            "--interface=seg-pumps",
            "--interface=seg-monitors",
            "--bind-interfaces",
            "--dhcp-range=10.10.0.100,10.10.0.150,1h",
            "--dhcp-range=10.20.0.100,10.20.0.150,1h",
            "--leasefile-ro",
            &pid("dhcp"),
        ],
    )?);
    let studies = work.join("pacs");
    std::fs::create_dir_all(&studies)?;
    bg.push(Bg::start(
        &h.ns("pacs"),
        &["storescp", "-dhl", "-aet", "PACS", "-od", studies.to_str().unwrap(), "104"],
    )?);
    let dump = work.join("ct.dump");
    std::fs::write(
        &dump,
        "(0008,0016) UI =CTImageStorage\n(0008,0018) UI [1.2.826.0.1.3680043.9.7433.1.1]\n(0008,0060) CS [CT]\n(0010,0010) PN [Doe^Jane]\n(0010,0020) LO [MRN0001]\n(0020,000d) UI [1.2.826.0.1.3680043.9.7433.1]\n(0020,000e) UI [1.2.826.0.1.3680043.9.7433.1.0]\n(7fe0,0010) OW 0000\\0000\\0000\\0000\n",
    )?;
    let study = work.join("ct.dcm");
    let o = Command::new("dump2dcm").args(["--write-xfer-little"]).arg(&dump).arg(&study).output()?;
    if !o.status.success() {
        bail!("dump2dcm: {}", String::from_utf8_lossy(&o.stderr));
    }

    let mut w = vec![
        serve(&h.ns("pharmacy"), ip("pharmacy"), 2575, running.clone(), hl7_ack)?,
        serve(&h.ns("emr"), ip("emr"), 2575, running.clone(), hl7_ack)?,
        serve(&h.ns("emr"), ip("emr"), 8080, running.clone(), http_ok)?,
    ];
    thread::sleep(Duration::from_millis(300));
    // HL7: pumps → pharmacy, monitors → EMR, every ~3 s.
    for (i, (dev, server)) in [
        ("pump1", "pharmacy"),
        ("pump2", "pharmacy"),
        ("pump3", "pharmacy"),
        ("monitor1", "emr"),
        ("monitor2", "emr"),
    ]
    .into_iter()
    .enumerate()
    {
        let (ns, to, r) = (h.ns(dev), ip(server), running.clone());
        let app = dev.to_uppercase();
        w.push(thread::spawn(move || {
            let mut j = Jitter(i as u64 + 1);
            let mut n = 0u64;
            while r.load(Ordering::SeqCst) {
                n += 1;
                let _ = hl7_send(&ns, to, &hl7_message(&app, n));
                j.sleep(3000, 1000, &r);
            }
        }));
    }
    // DNS lookups from the pumps and monitors, every ~6 s (dig against dnsmasq).
    for (i, dev) in ["pump1", "pump2", "pump3", "monitor1", "monitor2"].into_iter().enumerate() {
        let (ns, r) = (h.ns(dev), running.clone());
        w.push(thread::spawn(move || {
            let mut j = Jitter(100 + i as u64);
            j.sleep(1000, 900, &r);
            while r.load(Ordering::SeqCst) {
                run_in(
                    &ns,
                    4,
                    &["dig", "+short", "+tries=1", "+time=1", "@10.40.0.53", "pharmacy.hospital.internal"],
                );
                j.sleep(6000, 2000, &r);
            }
        }));
    }
    // DHCP (dhclient against the gateway's dnsmasq), every ~40 s per device.
    for (i, dev) in ["pump1", "pump2", "pump3", "monitor1", "monitor2"].into_iter().enumerate() {
        let (ns, r) = (h.ns(dev), running.clone());
        let dir = work.join(format!("dhcp-{dev}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("conf"),
            format!(
                "send host-name \"{dev}\";\nrequest subnet-mask, routers, domain-name-servers, ntp-servers;\n"
            ),
        )?;
        w.push(thread::spawn(move || {
            let mut j = Jitter(200 + i as u64);
            j.sleep(2000, 1500, &r);
            let p = |f: &str| dir.join(f).display().to_string();
            while r.load(Ordering::SeqCst) {
                run_in(
                    &ns,
                    6,
                    &[
                        "dhclient",
                        "-1",
                        "-sf",
                        "/bin/true",
                        "-cf",
                        &p("conf"),
                        "-lf",
                        &p("leases"),
                        "-pf",
                        &p("pid"),
                        "eth0",
                    ],
                );
                run_in(&ns, 4, &["dhclient", "-x", "-sf", "/bin/true", "-pf", &p("pid")]);
                j.sleep(40_000, 5000, &r);
            }
        }));
    }
    // DICOM: the CT stores a study on the PACS every ~10 s (dcmtk storescu).
    {
        let (ns, r) = (h.ns("ct1"), running.clone());
        w.push(thread::spawn(move || {
            let mut j = Jitter(300);
            j.sleep(1500, 1000, &r);
            while r.load(Ordering::SeqCst) {
                run_in(
                    &ns,
                    8,
                    &[
                        "storescu",
                        "-aet",
                        "CT1",
                        "-aec",
                        "PACS",
                        "10.40.0.10",
                        "104",
                        study.to_str().unwrap(),
                    ],
                );
                j.sleep(10_000, 3000, &r);
            }
        }));
    }
    // The workstation reads the EMR's web front end (curl) every ~8 s.
    {
        let (ns, r) = (h.ns("workstation"), running.clone());
        w.push(thread::spawn(move || {
            let mut j = Jitter(400);
            while r.load(Ordering::SeqCst) {
                run_in(
                    &ns,
                    4,
                    &["curl", "-s", "-m", "2", "-A", "ClinicalPortal/5.2", "http://10.40.0.30:8080/chart"],
                );
                j.sleep(8000, 2000, &r);
            }
        }));
    }
    Ok((bg, w))
}

/// What the attack phase sent, to tell attack flows from normal ones.
pub struct Attack {
    attacker: String,
    outside_dns: (String, String),
    rdp: (String, String),
}

pub fn attack(h: &Hospital) -> Result<Attack> {
    let a = Hospital::spec("attacker");
    // A SYN sweep of 100 ports on each pump (raw frames: no retries to blur counts).
    let raw = RawSender::open(&h.ns("attacker"), "eth0")?;
    let mac = mdsec_agent::base::net::parse_mac(a.mac).unwrap();
    let gw_mac = h.gw_mac("clinical")?;
    for pump in ["pump1", "pump2", "pump3"] {
        for port in 1000..1100u16 {
            let ip =
                V4::new(a.ip(), Hospital::spec(pump).ip(), 6).build(&frames::tcp(41000, port, 0x02, b""));
            raw.send(&frames::eth(gw_mac, mac, &[], 0x0800, &ip))?;
        }
    }
    // pump2 resolves a name through a resolver outside the hospital (real dig).
    run_in(&h.ns("pump2"), 4, &["dig", "+tries=1", "+time=1", "@10.99.0.53", "update.vendor-cloud.example"]);
    // The workstation opens RDP (X.224 connection request) to the CT.
    let to = SocketAddr::new(Hospital::spec("ct1").ip().into(), 3389);
    if let Ok(Ok(mut s)) =
        in_netns(&h.ns("workstation"), move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))
    {
        let _ = s.write_all(b"\x03\x00\x00\x13\x0e\xe0\x00\x00\x00\x00\x00\x01\x00\x08\x00\x03\x00\x00\x00");
    }
    Ok(Attack {
        attacker: a.ip().to_string(),
        outside_dns: (Hospital::spec("pump2").ip().to_string(), "10.99.0.53".into()),
        rdp: (Hospital::spec("workstation").ip().to_string(), Hospital::spec("ct1").ip().to_string()),
    })
}

impl Attack {
    /// The addresses the attack's traffic comes from.
    pub fn sources(&self) -> Vec<String> {
        vec![self.attacker.clone(), self.outside_dns.0.clone(), self.rdp.0.clone()]
    }

    pub fn is_attack(&self, f: &Flow) -> bool {
        f.src == self.attacker
            || (f.src == self.outside_dns.0 && f.dst == self.outside_dns.1)
            || (f.src == self.rdp.0 && f.dst == self.rdp.1 && f.dport == 3389)
    }
}

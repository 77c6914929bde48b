//! `cargo xtask lab`: a gateway with three hosts in network namespaces, the agent
//! attached to the gateway, periodic real traffic, and a live device/flow table.
//! Everything is torn down on exit, Ctrl-C, SIGTERM and panic.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use mdsec_agent::table::{human, render};
use mdsec_tests::{
    agent::{Agent, AgentOptions},
    netns::{Host, Topology},
    traffic,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Args {
    duration: Option<u64>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { duration: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--duration" => a.duration = Some(it.next().unwrap_or_default().parse()?),
            "-h" | "--help" => {
                println!("usage: cargo xtask lab [--duration SECS]   (default: until Ctrl-C)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let id = format!("mdsec-lab{}", std::process::id());
    println!("lab: creating gateway and 3 hosts ({id}-*)");
    let topo = Topology::named(id, 3)?;
    topo.warm_up()?;
    // h1 plays an infusion pump, h2 the pharmacy, h3 a workstation. The pump
    // segment runs in monitor mode: denied traffic shows as would_drop.
    let policy = vec![
        ("zones.yaml".to_string(), "zones:\n  pharmacy: [10.0.2.0/24]\n  workstations: [10.0.3.0/24]\n".to_string()),
        (
            "pumps.yaml".to_string(),
            "segment: pumps\nfunction: infusion-pump\nmode: monitor\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: fd00:0:0:1::/64\n\
             allow:\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n"
                .to_string(),
        ),
    ];
    let agent = Agent::start(&topo, AgentOptions { policy, ..Default::default() })?;
    println!("lab: agent attached; traffic starting");
    let running = Arc::new(AtomicBool::new(true));
    let workers = start_traffic(&topo, running.clone())?;

    let t0 = Instant::now();
    while !STOP.load(Ordering::SeqCst) && args.duration.is_none_or(|d| t0.elapsed() < Duration::from_secs(d))
    {
        draw(&agent, t0.elapsed())?;
        for _ in 0..10 {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    running.store(false, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let flows = agent.flows()?;
    let devices = agent.devices()?;
    let frames = agent.stat("frames")?;
    println!(
        "lab: {} devices, {} flows, {} frames ({} bytes) seen; tearing down",
        devices.len(),
        flows.len(),
        frames.packets,
        frames.bytes
    );
    drop(agent);
    drop(topo);
    println!("lab: done, nothing left behind");
    Ok(())
}

fn draw(agent: &Agent, elapsed: Duration) -> Result<()> {
    let mut devices = agent.devices()?;
    devices.sort_by_key(|d| std::cmp::Reverse(d.bytes));
    let mut flows = agent.flows()?;
    flows.sort_by_key(|f| std::cmp::Reverse(f.bytes));
    let dev_rows: Vec<Vec<String>> = devices
        .iter()
        .take(6)
        .map(|d| {
            vec![
                d.iface.clone(),
                d.mac.clone(),
                d.ips.first().cloned().unwrap_or_default(),
                human(d.packets),
                human(d.bytes),
            ]
        })
        .collect();
    let flow_rows: Vec<Vec<String>> = flows
        .iter()
        .take(10)
        .map(|f| {
            vec![
                f.proto.clone(),
                f.app.clone(),
                endpoint(&f.src, f.sport),
                endpoint(&f.dst, f.dport),
                human(f.packets),
                f.verdict.clone(),
            ]
        })
        .collect();
    let mut out = String::from("\x1b[2J\x1b[H");
    out += &format!("mdsec lab: {}s   (Ctrl-C to stop)\n\nDEVICES\n", elapsed.as_secs());
    out += &render(&["IFACE", "MAC", "IP", "PKTS", "BYTES"], &dev_rows);
    out += "\nFLOWS (top by bytes)\n";
    out += &render(&["PROTO", "APP", "SRC", "DST", "PKTS", "VERDICT"], &flow_rows);
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// `addr:port` (IPv6 in brackets) in at most 20 columns: long addresses are
/// shortened so the live view fits an 80-column terminal.
fn endpoint(ip: &str, port: u16) -> String {
    let (open, close) = if ip.contains(':') { ("[", "]") } else { ("", "") };
    let port = format!(":{port}");
    let room = 20 - port.len() - open.len() - close.len();
    let ip = if ip.chars().count() > room {
        format!("{}…", ip.chars().take(room - 1).collect::<String>())
    } else {
        ip.to_string()
    };
    format!("{open}{ip}{close}{port}")
}

fn start_traffic(topo: &Topology, running: Arc<AtomicBool>) -> Result<Vec<thread::JoinHandle<()>>> {
    let (h1, h2, h3) = (topo.host(1), topo.host(2), topo.host(3));
    let mut w = Vec::new();

    // h1 → h2: small UDP telemetry every 200 ms.
    let rx = traffic::udp_receiver(h2, false, 9000)?;
    let tx = traffic::udp_socket(h1, false)?;
    let to = SocketAddr::new(h2.v4().into(), 9000);
    let r = running.clone();
    w.push(thread::spawn(move || {
        let _rx = rx;
        while r.load(Ordering::SeqCst) {
            let _ = tx.send_to(&[0x42; 120], to);
            thread::sleep(Duration::from_millis(200));
        }
    }));

    // h3 → h2: a TCP transfer every 2 s.
    let listener = traffic::tcp_listener(h2, 7000)?;
    listener.set_nonblocking(true)?;
    w.push(serve_tcp(listener, running.clone()));
    let h3_ns = Host { ns: h3.ns.clone(), index: h3.index, gw_if: h3.gw_if.clone() };
    let server = SocketAddr::new(h2.v4().into(), 7000);
    let r = running.clone();
    w.push(thread::spawn(move || {
        while r.load(Ordering::SeqCst) {
            if let Ok(mut c) = traffic::tcp_connect(&h3_ns, server) {
                let _ = c.write_all(&[7u8; 10_000]);
            }
            for _ in 0..20 {
                if !r.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }));

    // h1 → h3 over IPv6: UDP every second.
    let rx6 = traffic::udp_receiver(h3, true, 9001)?;
    let tx6 = traffic::udp_socket(h1, true)?;
    let to6 = SocketAddr::new(h3.v6().into(), 9001);
    w.push(thread::spawn(move || {
        let _rx = rx6;
        while running.load(Ordering::SeqCst) {
            let _ = tx6.send_to(&[0x17; 300], to6);
            thread::sleep(Duration::from_secs(1));
        }
    }));
    Ok(w)
}

fn serve_tcp(listener: TcpListener, running: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while running.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = std::io::copy(&mut s, &mut std::io::sink());
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    })
}

//! The live view (within 80×24 on stderr) and the metrics forwarder it names.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::Result;
use mdsec_agent::surfaces::model::{Event, Flow};
use mdsec_tests::{agent::Agent, hospital::DEVICES, netns::in_netns};

use crate::timeline::Log;

/// Serves the agent's API on the host's 127.0.0.1 (it listens inside the
/// gateway namespace): 9740, or the next free port.
pub fn metrics_forwarder(agent: &Agent) -> Option<u16> {
    let l = (9740..9750).find_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())?;
    let port = l.local_addr().ok()?.port();
    let (gw, target) = (agent.gw.clone(), agent.addr);
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            let gw = gw.clone();
            thread::spawn(move || {
                let Ok(Ok(up)) =
                    in_netns(&gw, move || TcpStream::connect_timeout(&target, Duration::from_secs(2)))
                else {
                    return;
                };
                let (mut a, mut b) = (c, up);
                let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else { return };
                let t = thread::spawn(move || {
                    let _ = std::io::copy(&mut a2, &mut b2);
                    let _ = b2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut b, &mut a);
                let _ = t.join();
            });
        }
    });
    Some(port)
}

pub fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// The live view: at most 80 columns and 24 lines.
pub fn draw(agent: &Agent, log: &Log, el: Duration, total: u64, metrics: Option<&str>) -> Result<()> {
    let names: BTreeMap<&str, &str> = DEVICES.iter().map(|d| (d.mac, d.name)).collect();
    let ipname: BTreeMap<String, &str> = DEVICES.iter().map(|d| (d.ip().to_string(), d.name)).collect();
    let who = |ip: &str| ipname.get(ip).map_or(ip.to_string(), |n| n.to_string());
    let mut devices = agent.devices()?;
    devices.retain(|d| names.contains_key(d.mac.as_str()));
    devices.sort_by_key(|d| DEVICES.iter().position(|s| s.mac == d.mac));
    let mut flows = agent.flows()?;
    flows.retain(|f| f.proto == "tcp" || f.proto == "udp");
    flows.sort_by_key(|f| std::cmp::Reverse(f.last_seen.clone()));
    // The three latest denied flows first, then the latest others.
    let denied = |f: &Flow| f.verdict == "drop" || f.verdict == "would_drop";
    let (mut shown, rest): (Vec<Flow>, Vec<Flow>) = flows.into_iter().partition(|f| denied(f));
    shown.truncate(3);
    shown.extend(rest.into_iter().take(6 - shown.len()));
    let flows = shown;
    let events = agent.events()?;
    let mut out = String::from("\x1b[2J\x1b[H");
    out += &cut(&format!("mdsec lab {:>3}/{}s  {}", el.as_secs(), total, log.phase), 80);
    out += "\n";
    out += &format!("{:<11} {:<22} {:<20} {:<22}\n", "DEVICE", "VENDOR", "CLASS", "APPS");
    for d in devices.iter().take(9) {
        let apps: BTreeSet<&str> = d.apps_client.iter().chain(&d.apps_server).map(String::as_str).collect();
        out += &format!(
            "{:<11} {:<22} {:<20} {}\n",
            names.get(d.mac.as_str()).copied().unwrap_or(""),
            cut(d.vendor.as_deref().unwrap_or("-"), 22),
            cut(&d.class, 20),
            cut(&apps.into_iter().collect::<Vec<_>>().join(","), 23)
        );
    }
    out += &format!(
        "{:<12} {:<18} {:<6} {:<7} {:>6} {:<10}\n",
        "FLOW FROM", "TO", "PROTO", "APP", "PKTS", "VERDICT"
    );
    for f in flows.iter().take(6) {
        out += &format!(
            "{:<12} {:<18} {:<6} {:<7} {:>6} {:<10}\n",
            cut(&who(&f.src), 12),
            cut(&format!("{}:{}", who(&f.dst), f.dport), 18),
            f.proto,
            cut(&f.app, 7),
            mdsec_agent::cli::table::human(f.packets),
            f.verdict
        );
    }
    out += "EVENTS\n";
    let recent: Vec<&Event> =
        events.iter().filter(|e| !e.kind.starts_with("policy_")).rev().take(4).collect();
    for e in recent.iter().rev() {
        out += &cut(
            &format!(
                "{} {:<15} {}→{} {}",
                e.time.get(11..19).unwrap_or(""),
                e.kind,
                who(&e.src),
                who(&e.dst),
                e.clinical_impact
            ),
            80,
        );
        out += "\n";
    }
    out += &cut(&format!("metrics: {}   Ctrl-C stops", metrics.unwrap_or("-")), 80);
    let mut err = std::io::stderr().lock();
    err.write_all(out.as_bytes())?;
    err.flush()?;
    Ok(())
}

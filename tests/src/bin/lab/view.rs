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

/// The live view's terminal: the alternate screen (no scrollback grows),
/// raw keys for `q`, restored when dropped (also on an error or a panic).
pub struct Screen;

impl Screen {
    pub fn enter() -> Result<Screen> {
        crossterm::terminal::enable_raw_mode()?;
        let mut err = std::io::stderr();
        crossterm::execute!(err, crossterm::terminal::EnterAlternateScreen, crossterm::cursor::Hide)?;
        // A panic leaves the terminal usable.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            hook(info);
        }));
        Ok(Screen)
    }

    /// `q`, or Ctrl-C (raw mode turns it into a key): true when one was
    /// pressed since the last call.
    pub fn quit_pressed(&self) -> bool {
        use crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers, poll, read};
        let mut quit = false;
        while poll(Duration::ZERO).unwrap_or(false) {
            if let Ok(Event::Key(k)) = read()
                && k.kind == KeyEventKind::Press
            {
                quit |= k.code == KeyCode::Char('q')
                    || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL));
            }
        }
        quit
    }
}

fn restore() {
    let mut err = std::io::stderr();
    let _ = crossterm::execute!(err, crossterm::cursor::Show, crossterm::terminal::LeaveAlternateScreen);
    let _ = crossterm::terminal::disable_raw_mode();
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// The live view, fitted to the terminal (80×24 and up shows everything).
pub fn draw(agent: &Agent, log: &Log, el: Duration, total: u64, metrics: Option<&str>) -> Result<()> {
    let (cols, rows) = crossterm::terminal::size().unwrap_or((80, 24));
    let (cols, rows) = (cols.max(20) as usize, rows.max(8) as usize);
    // Five fixed lines (title, two headers, EVENTS, footer); the rest shared
    // 9 : 6 : 4 between devices, flows and events, as at 80×24.
    let room = rows - 5;
    let n_dev = (room * 9 / 19).min(9);
    let n_flow = (room * 6 / 19).min(6);
    let n_ev = (room - n_dev - n_flow).min(4);
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
    let mut out: Vec<String> = vec![format!("mdsec lab {:>3}/{}s  {}", el.as_secs(), total, log.phase)];
    out.push(format!("{:<11} {:<22} {:<20} {:<22}", "DEVICE", "VENDOR", "CLASS", "APPS"));
    for d in devices.iter().take(n_dev) {
        let apps: BTreeSet<&str> = d.apps_client.iter().chain(&d.apps_server).map(String::as_str).collect();
        out.push(format!(
            "{:<11} {:<22} {:<20} {}",
            names.get(d.mac.as_str()).copied().unwrap_or(""),
            cut(d.vendor.as_deref().unwrap_or("-"), 22),
            cut(&d.class, 20),
            apps.into_iter().collect::<Vec<_>>().join(",")
        ));
    }
    out.push(format!(
        "{:<12} {:<18} {:<6} {:<7} {:>6} {:<10}",
        "FLOW FROM", "TO", "PROTO", "APP", "PKTS", "VERDICT"
    ));
    for f in flows.iter().take(n_flow) {
        out.push(format!(
            "{:<12} {:<18} {:<6} {:<7} {:>6} {:<10}",
            cut(&who(&f.src), 12),
            cut(&format!("{}:{}", who(&f.dst), f.dport), 18),
            f.proto,
            cut(&f.app, 7),
            mdsec_agent::cli::table::human(f.packets),
            f.verdict
        ));
    }
    out.push("EVENTS".into());
    let recent: Vec<&Event> =
        events.iter().filter(|e| !e.kind.starts_with("policy_")).rev().take(n_ev).collect();
    for e in recent.iter().rev() {
        out.push(format!(
            "{} {:<15} {}→{} {}",
            e.time.get(11..19).unwrap_or(""),
            e.kind,
            who(&e.src),
            who(&e.dst),
            e.clinical_impact
        ));
    }
    out.push(format!("metrics: {}   q or Ctrl-C stops", metrics.unwrap_or("-")));
    // Redrawn in place: home, each line cut to the width and cleared to its end.
    let mut frame = String::from("\x1b[H");
    let lines: Vec<String> = out.iter().take(rows).map(|l| cut(l, cols)).collect();
    frame += &lines.join("\x1b[K\r\n");
    frame += "\x1b[K\x1b[J";
    let mut err = std::io::stderr().lock();
    err.write_all(frame.as_bytes())?;
    err.flush()?;
    Ok(())
}

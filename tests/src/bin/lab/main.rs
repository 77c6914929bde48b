//! `cargo xtask lab`: a simulated hospital on one machine.
//!
//! Three infusion pumps, two patient monitors, a CT, PACS, pharmacy, EMR, an
//! internal DNS, a clinical workstation, an attacker and an outside resolver, each
//! in its own network namespace behind a gateway with one veth per LAN, the
//! pumps' ward behind a bump in the wire (see `mdsec_tests::hospital`). Real peers where Debian has them: dcmtk storescu →
//! storescp, dnsmasq (DNS, and DHCP on the gateway) with dig and dhclient; HL7
//! over MLLP from our own sender (Debian has none). A scripted timeline:
//! learning → suggested policy in monitor → enforce → attack (scan, outside DNS,
//! RDP), each phase announced; a live view within 80×24 on stderr; metrics on
//! http://127.0.0.1:9740/metrics; a JSON summary with `--json`. Everything is
//! torn down on exit, Ctrl-C, SIGTERM and panic (`--keep` leaves it running;
//! `--cleanup` removes what a kept or killed lab left).

mod args;
mod eve;
mod services;
mod setup;
mod summary;
mod timeline;
mod view;

use std::{
    io::IsTerminal,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Parser;
use mdsec_tests::{
    agent::agent_bin,
    hospital::{DEVICES, Hospital},
};

use args::Args;
use services::{attack, start_services_and_traffic};
use setup::{apply_suggestion, cleanup, start_agent};
use summary::{evidence_report, print_summary, summarize};
use timeline::{Log, Timeline};
use view::{Screen, draw, metrics_forwarder};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The lab's scratch directory, removed when dropped (also on an error exit).
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.cleanup {
        let n = cleanup();
        println!("lab: removed {n} leftover namespaces");
        return ExitCode::SUCCESS;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // Every error unwinds through the guards (namespaces, agent, services),
    // so it is reported after the teardown, as one line, never a backtrace.
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if stopping() => {
            eprintln!("lab: stopped ({e:#}); torn down, nothing left behind");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fails once Ctrl-C or SIGTERM arrived: the lab stops between set-up steps.
fn not_stopped(step: &str) -> Result<()> {
    if stopping() { bail!("interrupted while {step}") } else { Ok(()) }
}

fn run(args: &Args) -> Result<()> {
    let tty = std::io::stderr().is_terminal() && std::io::stdin().is_terminal();
    let id = format!("mdsec-lab{}", std::process::id());
    let work = std::env::temp_dir().join(&id).with_extension("work");
    std::fs::create_dir_all(&work)?;
    let work_guard = WorkDir(work.clone());
    let log = Arc::new(Mutex::new(Log::default()));
    // Plain lines until the view starts, and all along without a terminal.
    let say = |msg: String, view: bool| log.lock().unwrap().say(view, msg);
    say(format!("building the hospital: {} devices, the pumps behind a bump ({id}-*)", DEVICES.len()), false);
    let hospital = Hospital::new(&id)?;
    not_stopped("building the hospital")?;
    hospital.warm_up()?;
    not_stopped("warming up the hospital")?;

    let total = args.duration.unwrap_or(120);
    let tl = Timeline::new(total);
    let agent = start_agent(&id, &work, tl.learning)?;
    let forwarder = metrics_forwarder(&agent);
    let metrics_url = forwarder.as_ref().map(|p| format!("http://127.0.0.1:{p}/metrics"));
    if let Some(u) = &metrics_url {
        say(format!("Prometheus metrics at {u}"), false);
    }

    let running = Arc::new(AtomicBool::new(true));
    let (bg, workers) = start_services_and_traffic(&hospital, &work, running.clone())?;
    let screen = if tty && !stopping() { Some(Screen::enter()?) } else { None };
    let quiet = screen.is_some();
    let t0 = Instant::now();
    let mut phase = 0;
    let announce = |msg: &str| {
        let mut l = log.lock().unwrap();
        l.phase = msg.to_string();
        l.say(quiet, msg.to_string());
    };
    announce(&format!(
        "phase 1/4 learning ({}s): segments in monitor mode, no rules; the baseline is recorded",
        tl.learning
    ));
    let mut drops_at_enforce = 0;
    let (mut would_at_monitor, mut would_in_monitor) = (0, None);
    let mut normal_drops_in_enforce = None;
    let mut attack_sent = None;
    let mut last_draw = Instant::now() - Duration::from_secs(5);
    let end = args.duration.map(Duration::from_secs);
    let packets = |stat: &str| agent.stat(stat).map(|c| c.packets).unwrap_or(0);
    while !stopping() && end.is_none_or(|e| t0.elapsed() < e) {
        let el = t0.elapsed().as_secs();
        if phase == 0 && el >= tl.monitor {
            phase = 1;
            apply_suggestion(&agent, "monitor")?;
            would_at_monitor = packets("policy_would_drop");
            announce(
                "phase 2/4 monitor: the suggested allow-lists are active; would-be drops are only counted",
            );
        } else if phase == 1 && el >= tl.enforce {
            phase = 2;
            would_in_monitor = Some(packets("policy_would_drop") - would_at_monitor);
            apply_suggestion(&agent, "enforce")?;
            drops_at_enforce = packets("policy_drop");
            announce("phase 3/4 enforce: the same allow-lists now drop what they do not allow");
        } else if phase == 2 && el >= tl.attack && args.attack() {
            phase = 3;
            normal_drops_in_enforce = Some(packets("policy_drop") - drops_at_enforce);
            announce(
                "phase 4/4 attack: attacker scans the pumps, pump2 asks an outside resolver, the workstation opens RDP to the CT",
            );
            attack_sent = Some(attack(&hospital)?);
        }
        if let Some(s) = &screen {
            if s.quit_pressed() {
                STOP.store(true, Ordering::SeqCst);
            }
            if last_draw.elapsed() >= Duration::from_secs(1) {
                last_draw = Instant::now();
                let _ = draw(&agent, &log.lock().unwrap(), t0.elapsed(), total, metrics_url.as_deref());
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    drop(screen);
    if stopping() {
        eprintln!("lab: stopping at {} s: summary, evidence report, then teardown", t0.elapsed().as_secs());
    }
    if normal_drops_in_enforce.is_none() && phase >= 2 {
        normal_drops_in_enforce = Some(packets("policy_drop") - drops_at_enforce);
    }
    // Let the last detections and store passes land.
    thread::sleep(Duration::from_secs(3));
    running.store(false, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let mut summary = summarize(&agent, attack_sent.as_ref(), normal_drops_in_enforce, total, metrics_url)?;
    summary.duration_secs = t0.elapsed().as_secs().min(total);
    summary.normal_would_drops_in_monitor = would_in_monitor;
    let report = evidence_report(&agent);
    let keep = args.keep && !stopping();
    let agent = if keep {
        Some(agent)
    } else {
        // Stopped first: every conversation still open gets its flow record.
        let _ = agent.stop();
        let mut ifaces = Hospital::gw_ifs();
        ifaces.extend([mdsec_tests::hospital::BUMP_WARD.into(), mdsec_tests::hospital::BUMP_CORE.into()]);
        let log = work.join("eve.json");
        summary.eve = Some(eve::check(&log, setup::EVE_SENSOR, &ifaces));
        if let Some(dir) = summary::out_dir() {
            let _ = std::fs::copy(&log, dir.join("eve.json"));
        }
        None
    };
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["evidence_report"] = serde_json::json!(report.as_ref().map(|p| p.display().to_string()));
        v["stopped_early"] = serde_json::json!(stopping());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_summary(&summary);
        if let Some(p) = &report {
            println!("evidence report: {}", p.display());
        }
    }
    if args.keep && !stopping() {
        eprintln!(
            "lab: --keep: the hospital stays up. Inspect with\n  ip netns exec {} {} devices\nand remove it with `cargo xtask lab --cleanup`.",
            hospital.gw,
            agent_bin().display()
        );
        std::mem::forget(work_guard);
        std::mem::forget(bg);
        std::mem::forget(agent);
        hospital.keep();
        return Ok(());
    }
    drop(bg);
    drop(agent);
    drop(hospital);
    drop(work_guard);
    eprintln!("lab: torn down, nothing left behind");
    Ok(())
}

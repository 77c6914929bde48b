//! Flow export at scale: the agent's tables from the scale bench (1,000,000
//! flows) all reported at once through the real IPFIX exporter (UDP to a
//! local receiver) and the real EVE exporter (a log file), and the scans the
//! poller adds to every poll for closed and long flows. The steady-state
//! share of a poll's CPU follows from them.

use std::{
    net::UdpSocket,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use mdsec_agent::{
    base::clock,
    datapath::state::{Tables, Timeouts},
};

/// What a poll adds on a gateway with the defaults: a record per flow every
/// `flow_active_timeout_secs`, polled every `poll_interval_ms`.
const ACTIVE_SECS: u64 = 300;
const POLL_SECS: f64 = 1.0;

fn thread_cpu() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

fn process_cpu() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

fn rusage(who: i32) -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Measured on `tables` (every flow older than the active timeout once the
/// clock is moved on); `poll_cpu` is a steady poll's CPU at the same size.
pub fn run(tables: &RwLock<Tables>, poll_cpu: Duration) -> Result<String> {
    let flows = tables.read().unwrap().flows.len();
    let active = Duration::from_secs(ACTIVE_SECS);
    let later = clock::mono_ns() + 2 * active.as_nanos() as u64;

    // The one pass every poll makes over the records: idle flows only (as
    // without exports), and with the closed and active checks too (none
    // due: the pass is what every poll pays).
    let idle_only = Timeouts { idle_ns: 3_600_000_000_000, closed_ns: None, active_ns: None };
    let all =
        Timeouts { closed_ns: Some(10_000_000_000), active_ns: Some(active.as_nanos() as u64), ..idle_only };
    let pass = |t: &Timeouts, now: u64| {
        let c0 = thread_cpu();
        let due = tables.write().unwrap().due(now, t);
        (thread_cpu() - c0, due)
    };
    let (base_scan, _) = pass(&idle_only, later);
    let (_, _) = pass(&all, later - 1);
    let (full_scan, none) = pass(&all, later - 1);
    anyhow::ensure!(none.active.is_empty() && none.closed.is_empty(), "due at once");
    let extra_scan = full_scan.saturating_sub(base_scan);
    // Every flow due at once: the scan's window spans a whole timeout.
    let (c0, w0) = (thread_cpu(), Instant::now());
    let due = tables.write().unwrap().due(later + active.as_nanos() as u64, &all);
    let batch = tables.write().unwrap().active_records(due.active);
    let (build_cpu, build_wall) = (thread_cpu() - c0, w0.elapsed());
    anyhow::ensure!(batch.len() == flows, "{} due of {flows}", batch.len());
    let records = batch.len();
    let batch = Arc::new(batch);

    // IPFIX: UDP to a receiver on loopback that counts what arrives.
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    let port = rx.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (stop, got) = (stop.clone(), got.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = rx.recv(&mut buf) {
                    got.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let ipfix_cfg: mdsec_agent::surfaces::ipfix::IpfixConfig =
        serde_json::from_value(serde_json::json!({"collectors": [format!("udp://127.0.0.1:{port}")]}))?;
    let ipfix_stats = Arc::new(mdsec_agent::surfaces::ipfix::IpfixStats::default());
    let ipfix = mdsec_agent::surfaces::ipfix::spawn(&ipfix_cfg, ipfix_stats.clone())?;
    let (c0, w0) = (process_cpu(), Instant::now());
    ipfix.send(batch.clone());
    anyhow::ensure!(ipfix.flush(Duration::from_secs(120)), "IPFIX export did not finish");
    let (ipfix_cpu, ipfix_wall) = (process_cpu() - c0, w0.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    let sent = ipfix_stats.records_sent.load(Ordering::Relaxed);
    let messages = ipfix_stats.messages_sent.load(Ordering::Relaxed);
    anyhow::ensure!(sent == records as u64, "IPFIX sent {sent} of {records}");

    // EVE: flow records into a log file.
    let dir = std::env::temp_dir().join(format!("mdsec-bench-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("eve.json");
    let events_cfg: mdsec_agent::surfaces::export::EventsConfig =
        serde_json::from_value(serde_json::json!({"log": log, "log_format": "eve"}))?;
    let export_stats = Arc::new(mdsec_agent::surfaces::export::ExportStats::default());
    let exporter =
        mdsec_agent::surfaces::export::spawn(&events_cfg, export_stats.clone())?.context("no exporter")?;
    let (c0, w0) = (process_cpu(), Instant::now());
    exporter.ended(batch.clone());
    anyhow::ensure!(exporter.flush(Duration::from_secs(300)), "EVE export did not finish");
    let (eve_cpu, eve_wall) = (process_cpu() - c0, w0.elapsed());
    let written = export_stats.flow_log_written.load(Ordering::Relaxed);
    let eve_bytes = std::fs::metadata(&log)?.len();
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(written == records as u64, "EVE wrote {written} of {records}");
    drop(batch);

    let per = |d: Duration| d.as_secs_f64() / records as f64;
    let per_record = per(build_cpu) + per(ipfix_cpu) + per(eve_cpu);
    let due_per_poll = flows as f64 * POLL_SECS / ACTIVE_SECS as f64;
    let added = extra_scan.as_secs_f64() + due_per_poll * per_record;
    let share = added / poll_cpu.as_secs_f64();
    let rate = |d: Duration| records as f64 / d.as_secs_f64();
    let mut t = String::from("| measure | target | this run | |\n|---|---|---|---|\n");
    let row = |what: &str, target: &str, got: String, ok: Option<bool>| {
        let verdict = match ok {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "",
        };
        format!("| {what} | {target} | {got} | {verdict} |\n")
    };
    t += &row(
        "IPFIX: 1M records encoded and sent (UDP, loopback)",
        "",
        format!(
            "{:.2} s = {:.0} k records/s; CPU {:.2} µs/record; {messages} messages, {:.0} MiB received",
            ipfix_wall.as_secs_f64(),
            rate(ipfix_wall) / 1e3,
            per(ipfix_cpu) * 1e6,
            got.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
        ),
        None,
    );
    t += &row(
        "EVE: 1M flow records formatted and written (file)",
        "",
        format!(
            "{:.2} s = {:.0} k records/s; CPU {:.2} µs/record; {:.0} MiB",
            eve_wall.as_secs_f64(),
            rate(eve_wall) / 1e3,
            per(eve_cpu) * 1e6,
            eve_bytes as f64 / (1 << 20) as f64
        ),
        None,
    );
    t += &row(
        "poller: all 1M due in one poll (records built)",
        "",
        format!("{:.2} s, CPU {:.2} µs/record", build_wall.as_secs_f64(), per(build_cpu) * 1e6),
        None,
    );
    t += &row(
        "poller: the pass over the records (idle only → with closed and active checks)",
        "",
        format!(
            "{:.1} ms → {:.1} ms (+{:.1} ms)",
            base_scan.as_secs_f64() * 1e3,
            full_scan.as_secs_f64() * 1e3,
            extra_scan.as_secs_f64() * 1e3
        ),
        None,
    );
    t += &row(
        &format!(
            "steady state: the checks + {due_per_poll:.0} records a poll ({ACTIVE_SECS} s active timeout, {POLL_SECS} s polls), share of a poll's CPU ({:.2} s)",
            poll_cpu.as_secs_f64()
        ),
        "≤ 25 %",
        format!("{:.1} ms = {:.1} %", added * 1e3, share * 100.0),
        Some(share <= 0.25),
    );
    Ok(t)
}

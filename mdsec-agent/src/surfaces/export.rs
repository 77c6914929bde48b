//! Event export: every event the agent keeps is also written as one JSON line (to a
//! file or stdout) and, if configured, sent as an RFC 5424 syslog message, each
//! sink in the native format or as Suricata EVE; `eve` sinks also get a flow
//! record for every conversation that ends.
//!
//! Writing happens on a thread of its own so a slow disk or syslog server never
//! holds the event store's lock; the channel is unbounded so nothing is dropped on
//! the way. Failures are counted per sink and logged once per burst.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{LineWriter, Write},
    net::{TcpStream, UdpSocket},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use log::warn;

use serde::{Deserialize, Serialize};

use crate::{
    base::{
        clock::{Anchor, rfc3339},
        event::Event,
    },
    datapath::state::Ended,
    surfaces::{
        eve::{Eve, EveConfig, Format},
        socket::{SocketConfig, SocketSink},
    },
};

pub enum Msg {
    Event(Box<Event>),
    /// A poll's ended conversations: EVE flow records for the `eve` sinks.
    Ended(Arc<Vec<Ended>>),
    /// Interface names by ifindex (the flow records' `in_iface`).
    Interfaces(HashMap<u32, String>),
    /// Answer once everything sent before is written.
    Flush(mpsc::Sender<()>),
    /// Reopen the log file (after logrotate moved it).
    Reopen,
}

/// Counters the metrics read.
#[derive(Default)]
pub struct ExportStats {
    pub log_written: AtomicU64,
    pub log_failed: AtomicU64,
    pub syslog_sent: AtomicU64,
    pub syslog_failed: AtomicU64,
    /// EVE flow records written to the log and syslog sinks (not events: the
    /// four above count events only).
    pub flow_log_written: AtomicU64,
    pub flow_log_failed: AtomicU64,
    pub flow_syslog_sent: AtomicU64,
    pub flow_syslog_failed: AtomicU64,
    pub socket_sent: AtomicU64,
    pub socket_failed: AtomicU64,
    pub flow_socket_sent: AtomicU64,
    pub flow_socket_failed: AtomicU64,
}

#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Msg>,
}

impl Exporter {
    pub fn send(&self, e: &Event) {
        let _ = self.tx.send(Msg::Event(Box::new(e.clone())));
    }

    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    pub fn ended(&self, batch: Arc<Vec<Ended>>) {
        let _ = self.tx.send(Msg::Ended(batch));
    }

    pub fn interfaces(&self, names: HashMap<u32, String>) {
        let _ = self.tx.send(Msg::Interfaces(names));
    }

    /// Waits (at most `timeout`) until everything sent before is written.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Msg::Flush(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }
}

enum Log {
    Stdout,
    File { path: PathBuf, out: LineWriter<File> },
}

fn open_log(path: &str) -> Result<Log> {
    if path == "-" {
        return Ok(Log::Stdout);
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open event log {path}"))?;
    Ok(Log::File { path: path.into(), out: LineWriter::new(f) })
}

/// Starts the exporter if any output is configured. Opening the log and resolving
/// the syslog target happen here, so a wrong path fails the start, not later.
pub fn spawn(cfg: &EventsConfig, stats: Arc<ExportStats>) -> Result<Option<Exporter>> {
    if cfg.log.is_none() && cfg.syslog.is_none() && cfg.socket.is_none() {
        return Ok(None);
    }
    let mut log = cfg.log.as_deref().map(open_log).transpose()?;
    let eve = Eve::new(&cfg.eve, &crate::base::net::hostname());
    let log_format = cfg.log_format;
    let syslog_format = cfg.syslog.as_ref().map_or(Format::Native, |s| s.format);
    let socket_format = cfg.socket.as_ref().map_or(Format::Native, |s| s.format);
    let any_eve = [log_format, syslog_format, socket_format].contains(&Format::Eve);
    let flows = cfg.eve.flows && any_eve;
    let mut socket = cfg.socket.clone().map(SocketSink::new);
    let mut ifnames: HashMap<u32, String> = HashMap::new();
    let mut syslog = match &cfg.syslog {
        Some(s) => {
            let target = SyslogTarget::parse(&s.target).map_err(anyhow::Error::msg)?;
            let facility = facility_code(&s.facility).context("syslog facility")?;
            Some(Syslog::new(target, facility, s.app_name.clone())?)
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Msg>();
    std::thread::Builder::new().name("mdsec-export".into()).spawn(move || {
        let mut last_warning = None::<Instant>;
        let mut warn_once = |what: String| {
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                warn!("{what}");
                last_warning = Some(Instant::now());
            }
        };
        for msg in rx {
            let e = match msg {
                Msg::Interfaces(n) => {
                    ifnames = n;
                    continue;
                }
                Msg::Flush(done) => {
                    if let Some(Log::File { out, .. }) = &mut log {
                        let _ = out.flush();
                    }
                    let _ = done.send(());
                    continue;
                }
                Msg::Ended(batch) => {
                    if !flows {
                        continue;
                    }
                    let name = |i: u32| ifnames.get(&i).cloned().unwrap_or_else(|| i.to_string());
                    let anchor = Anchor::now();
                    let to_log = log.is_some() && log_format == Format::Eve;
                    let to_syslog = syslog.is_some() && syslog_format == Format::Eve;
                    let to_socket = socket.is_some() && socket_format == Format::Eve;
                    let socket_counts = (&stats.flow_socket_sent, &stats.flow_socket_failed);
                    // Lines go straight into one buffer written every 256 KiB
                    // (a few syscalls for a million records, never a buffer
                    // the size of the batch); syslog gets a message each.
                    const CHUNK: usize = 256 << 10;
                    let mut lines = String::with_capacity(CHUNK + 4096);
                    let mut n = 0u64;
                    let counts = (&stats.flow_log_written, &stats.flow_log_failed);
                    // The syslog header needs an event: a flow record's is `flow`, `info`.
                    let header = Event {
                        kind: "flow".into(),
                        severity: "info".into(),
                        time: rfc3339(std::time::SystemTime::now()),
                        ..Default::default()
                    };
                    for f in batch.iter() {
                        let at = lines.len();
                        eve.flow_line(f, &name, &anchor, &mut lines);
                        if let Some(s) = syslog.as_mut().filter(|_| to_syslog) {
                            let counts = (&stats.flow_syslog_sent, &stats.flow_syslog_failed);
                            send_syslog(s, &header, &lines[at..], counts, &mut warn_once);
                        }
                        if !to_log && !to_socket {
                            lines.clear();
                            continue;
                        }
                        n += 1;
                        if lines.len() >= CHUNK {
                            if let Some(l) = log.as_mut().filter(|_| to_log) {
                                write_lines(l, &lines, n, counts, &mut warn_once);
                            }
                            if let Some(s) = socket.as_mut().filter(|_| to_socket) {
                                send_socket(s, &lines, n, socket_counts, &mut warn_once);
                            }
                            n = 0;
                            lines.clear();
                        } else {
                            lines.push('\n');
                        }
                    }
                    if n > 0 {
                        lines.pop();
                        if let Some(l) = log.as_mut().filter(|_| to_log) {
                            write_lines(l, &lines, n, counts, &mut warn_once);
                        }
                        if let Some(s) = socket.as_mut().filter(|_| to_socket) {
                            send_socket(s, &lines, n, socket_counts, &mut warn_once);
                        }
                    }
                    continue;
                }
                Msg::Reopen => {
                    if let Some(Log::File { path, .. }) = &log {
                        match open_log(&path.display().to_string()) {
                            Ok(l) => log = Some(l),
                            Err(e) => warn_once(format!("{e:#}")),
                        }
                    }
                    continue;
                }
                Msg::Event(e) => e,
            };
            let native = serde_json::to_string(&*e).expect("events serialise");
            let eve_line = any_eve.then(|| eve.alert(&e).to_string());
            let line_for = |f: Format| match f {
                Format::Native => native.as_str(),
                Format::Eve => eve_line.as_deref().unwrap_or(&native),
            };
            if let Some(l) = &mut log {
                write_line(l, line_for(log_format), (&stats.log_written, &stats.log_failed), &mut warn_once);
            }
            if let Some(s) = &mut syslog {
                let counts = (&stats.syslog_sent, &stats.syslog_failed);
                send_syslog(s, &e, line_for(syslog_format), counts, &mut warn_once);
            }
            if let Some(s) = &mut socket {
                let counts = (&stats.socket_sent, &stats.socket_failed);
                send_socket(s, line_for(socket_format), 1, counts, &mut warn_once);
            }
        }
    })?;
    Ok(Some(Exporter { tx }))
}

/// Counters of one sink and record kind: (written, failed).
type Counts<'a> = (&'a AtomicU64, &'a AtomicU64);

/// `n` lines to the socket sink.
fn send_socket(
    s: &mut SocketSink,
    lines: &str,
    n: u64,
    (ok, failed): Counts,
    warn_once: &mut impl FnMut(String),
) {
    match s.send(lines) {
        Ok(()) => ok.fetch_add(n, Ordering::Relaxed),
        Err(err) => {
            warn_once(format!("sending events to socket {} failed: {err}", s.cfg.path.display()));
            failed.fetch_add(n, Ordering::Relaxed)
        }
    };
}

/// One line to the log.
fn write_line(l: &mut Log, line: &str, counts: Counts, warn_once: &mut impl FnMut(String)) {
    write_lines(l, line, 1, counts, warn_once)
}

/// Writes `n` lines (joined by newlines, without the last one) at once.
fn write_lines(l: &mut Log, lines: &str, n: u64, (ok, failed): Counts, warn_once: &mut impl FnMut(String)) {
    let r = match l {
        Log::Stdout => writeln!(std::io::stdout().lock(), "{lines}"),
        Log::File { out, .. } => writeln!(out, "{lines}"),
    };
    match r {
        Ok(()) => ok.fetch_add(n, Ordering::Relaxed),
        Err(err) => {
            warn_once(format!("writing the event log failed: {err}"));
            failed.fetch_add(n, Ordering::Relaxed)
        }
    };
}

fn send_syslog(
    s: &mut Syslog,
    e: &Event,
    line: &str,
    (ok, failed): Counts,
    warn_once: &mut impl FnMut(String),
) {
    match s.send(e, line) {
        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
        Err(err) => {
            warn_once(format!("sending syslog to {:?} failed: {err:#}", s.target));
            failed.fetch_add(1, Ordering::Relaxed)
        }
    };
}

/// Documentation enterprise number (RFC 5612) naming the structured-data element;
/// replace with your own PEN if your SIEM requires one.
pub const SD_ID: &str = "mdsec@32473";

struct Syslog {
    target: SyslogTarget,
    facility: u8,
    app_name: String,
    hostname: String,
    conn: Option<Conn>,
    /// After a failed connect (a TCP server that is down).
    backoff: crate::base::net::Backoff,
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Unix(UnixDatagram),
}

impl Syslog {
    fn new(target: SyslogTarget, facility: u8, app_name: String) -> Result<Syslog> {
        let mut s = Syslog {
            target,
            facility,
            app_name,
            hostname: crate::base::net::hostname(),
            conn: None,
            backoff: Default::default(),
        };
        // UDP and unix targets must be valid at start; a TCP server may come later.
        if !matches!(s.target, SyslogTarget::Tcp(_)) {
            s.connect().with_context(|| format!("syslog target {:?}", s.target))?;
        }
        Ok(s)
    }

    fn connect(&mut self) -> Result<()> {
        self.conn = Some(match &self.target {
            SyslogTarget::Udp(addr) => {
                let any = if addr.starts_with('[') { "[::]:0" } else { "0.0.0.0:0" };
                let s = UdpSocket::bind(any)?;
                s.connect(addr)?;
                Conn::Udp(s)
            }
            SyslogTarget::Tcp(addr) => {
                // A bounded connect: an unreachable host would otherwise hold
                // the exporter (and every sink behind it) for minutes.
                let to = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())?
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("{addr}: no address"))?;
                let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
                s.set_write_timeout(Some(Duration::from_secs(2)))?;
                Conn::Tcp(s)
            }
            SyslogTarget::Unix(path) => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                Conn::Unix(s)
            }
        });
        Ok(())
    }

    fn send(&mut self, e: &Event, json: &str) -> Result<()> {
        let msg = format_5424(e, json, self.facility, &self.hostname, &self.app_name);
        if self.conn.is_none() {
            if let Err(wait) = self.backoff.due() {
                anyhow::bail!("not connected (retrying in {wait:?})");
            }
            if let Err(e) = self.connect() {
                self.backoff.failed();
                return Err(e);
            }
            self.backoff.connected();
        }
        let r = match self.conn.as_mut().expect("connected above") {
            Conn::Udp(s) => s.send(msg.as_bytes()).map(|_| ()),
            // RFC 6587 octet counting: "LEN SP MSG".
            Conn::Tcp(s) => s.write_all(format!("{} {msg}", msg.len()).as_bytes()),
            Conn::Unix(s) => s.send(msg.as_bytes()).map(|_| ()),
        };
        if r.is_err() {
            // Reconnect on the next message (TCP peer restarted, socket recreated).
            self.conn = None;
        }
        Ok(r?)
    }
}

/// Escapes a structured-data parameter value (RFC 5424 section 6.3.3).
fn sd_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One RFC 5424 message: the event's key fields as structured data, its JSON as
/// the (UTF-8, BOM-prefixed) message.
pub fn format_5424(e: &Event, json: &str, facility: u8, hostname: &str, app_name: &str) -> String {
    let pri = facility as u32 * 8 + e.syslog_severity() as u32;
    let mut sd = format!("[{SD_ID} seq=\"{}\" type=\"{}\" severity=\"{}\"", e.seq, e.kind, e.severity);
    for (k, v) in [
        ("segment", e.segment.as_str()),
        ("src", e.src.as_str()),
        ("dst", e.dst.as_str()),
        ("proto", e.proto.as_str()),
        ("app", e.app.as_str()),
        ("reason", e.reason.as_str()),
        ("mac", e.mac.as_deref().unwrap_or("")),
    ] {
        if !v.is_empty() {
            sd.push_str(&format!(" {k}=\"{}\"", sd_escape(v)));
        }
    }
    sd.push(']');
    // MSGID: 1–32 printable ASCII; event types are short snake_case names.
    let msgid: String = e.kind.chars().filter(|c| c.is_ascii_graphic()).take(32).collect();
    format!(
        "<{pri}>1 {} {hostname} {app_name} {} {} {sd} \u{feff}{json}",
        e.time,
        std::process::id(),
        if msgid.is_empty() { "-" } else { &msgid }
    )
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Every event as one JSON line: an absolute file path (appended to, reopened on
    /// SIGHUP for log rotation) or `-` for standard output.
    #[serde(default)]
    pub log: Option<String>,
    /// What `log` writes: `native` (mdsec's event JSON) or `eve` (Suricata EVE).
    #[serde(default)]
    pub log_format: Format,
    /// RFC 5424 syslog messages (the event's JSON as message).
    #[serde(default)]
    pub syslog: Option<SyslogConfig>,
    /// JSON lines to a unix socket another program listens on.
    #[serde(default)]
    pub socket: Option<SocketConfig>,
    /// Settings of every `eve` sink.
    #[serde(default)]
    pub eve: EveConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `udp://HOST:PORT`, `tcp://HOST:PORT` (RFC 6587 octet counting) or
    /// `unix:///PATH` (a datagram socket such as /dev/log).
    pub target: String,
    /// Syslog facility name (`local0`…`local7`, `daemon`, `auth`, …).
    #[serde(default = "default_facility")]
    pub facility: String,
    #[serde(default = "default_app_name")]
    pub app_name: String,
    /// The message's JSON: `native` or `eve`.
    #[serde(default)]
    pub format: Format,
}

fn default_facility() -> String {
    "local0".into()
}
fn default_app_name() -> String {
    "mdsec".into()
}

/// Syslog facility codes (RFC 5424 table 1) by name.
pub fn facility_code(name: &str) -> Option<u8> {
    const NAMES: [&str; 24] = [
        "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp",
        "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4", "local5",
        "local6", "local7",
    ];
    NAMES.iter().position(|n| *n == name).map(|i| i as u8)
}

/// A parsed syslog target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    Udp(String),
    Tcp(String),
    Unix(PathBuf),
}

impl SyslogTarget {
    pub fn parse(s: &str) -> Result<SyslogTarget, String> {
        let host_port = |rest: &str| crate::base::net::host_port(s, rest);
        if let Some(rest) = s.strip_prefix("udp://") {
            return host_port(rest).map(SyslogTarget::Udp);
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return host_port(rest).map(SyslogTarget::Tcp);
        }
        if let Some(rest) = s.strip_prefix("unix://") {
            if rest.starts_with('/') {
                return Ok(SyslogTarget::Unix(rest.into()));
            }
            return Err(format!("`{s}`: expected an absolute path after unix://"));
        }
        Err(format!("`{s}`: the target must start with udp://, tcp:// or unix://"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_syslog_server_that_is_down_is_retried_with_backoff_not_per_event() {
        // A port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let target = SyslogTarget::Tcp(format!("127.0.0.1:{port}"));
        let mut s = Syslog::new(target, 16, "mdsec".into()).unwrap();
        let e = Event { kind: "policy_drop".into(), ..Default::default() };
        let first = s.send(&e, "{}").unwrap_err().to_string();
        assert!(!first.contains("retrying"), "{first}");
        let second = s.send(&e, "{}").unwrap_err().to_string();
        assert!(second.contains("retrying"), "no connect within the backoff: {second}");
        assert_eq!(s.backoff.delay(), Duration::from_secs(2), "doubled");
        // Once the server is up and the backoff over, it connects and sends.
        let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        s.backoff.expire();
        s.send(&e, "{}").unwrap();
        assert_eq!(s.backoff.delay(), Duration::from_secs(1), "reset");
        drop(l);
    }

    #[test]
    fn structured_data_is_escaped() {
        let e = Event {
            version: 1,
            seq: 7,
            kind: "policy_drop".into(),
            severity: "medium".into(),
            time: "2026-11-23T10:00:00.000Z".into(),
            reason: "a \"quoted\" ] \\ reason".into(),
            ..Default::default()
        };
        let m = format_5424(&e, "{}", 16, "gw1", "mdsec");
        // local0 (16) * 8 + warning (4) = 132.
        assert!(m.starts_with("<132>1 2026-11-23T10:00:00.000Z gw1 mdsec "), "{m}");
        assert!(m.contains(r#"reason="a \"quoted\" \] \\ reason""#), "{m}");
        assert!(m.ends_with(" \u{feff}{}"), "{m}");
    }
}

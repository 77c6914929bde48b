//! Agent configuration: one YAML file. Parsing is strict (unknown keys are errors)
//! and every error names `file:line:col`.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use mdsec_common::maps;
use serde::{Deserialize, Serialize};

/// Largest config file accepted; a config is a few kilobytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9740";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mdsec";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mdsec";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Gateway interfaces the datapath attaches to.
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub maps: MapSizes,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// bpffs directory for pinned maps and links.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// HTTP API and metrics. Loopback by default: the API is not meant for the network.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How often maps are read.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// Flows idle this long are removed from the kernel map and the API.
    #[serde(default = "default_idle_secs")]
    pub flow_idle_timeout_secs: u64,
    /// What a clean stop (SIGINT/SIGTERM) does to the datapath.
    #[serde(default)]
    pub on_exit: OnExit,
    /// Directory of segment policy files (`zones.yaml` + one YAML per segment).
    /// Without it the datapath only observes.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Deny events per second per CPU before the datapath rate-limits them.
    #[serde(default = "default_event_rate")]
    pub event_rate: u32,
    /// Operator statements about devices: pin a MAC to a class, name, model.
    #[serde(default)]
    pub devices: Vec<crate::clinical::Override>,
    /// Access to `/api/*`: bearer token and request limits.
    #[serde(default)]
    pub api: ApiConfig,
    /// Where events go besides `/api/v1/events`: a JSON-lines log, syslog.
    #[serde(default)]
    pub events: EventsConfig,
    /// Clinical triage matrix: clinical function → patient-safety impact →
    /// escalation path. Every event carries the impact and escalation of its
    /// segment's function.
    #[serde(default)]
    pub triage: crate::triage::TriageConfig,
    /// Anomaly detection thresholds (scan, DNS resolvers, deduplication).
    #[serde(default)]
    pub detection: crate::detect::DetectionConfig,
    /// The vulnerability register (YAML; see docs/EVIDENCE.md). Relative to this file.
    #[serde(default)]
    pub register: Option<PathBuf>,
    /// Snapshots for the evidence report.
    #[serde(default)]
    pub evidence: crate::evidence::EvidenceConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// File holding the bearer token `/api/*` requires (`Authorization: Bearer …`).
    /// Without it `/api` is open to whoever can reach `listen` (loopback by default).
    /// `/metrics`, `/healthz` and `/readyz` never need it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Requests per second per client address, sustained.
    #[serde(default = "default_rate")]
    pub rate_limit_per_sec: u32,
    /// Requests a client may make at once before the sustained rate applies.
    #[serde(default = "default_burst")]
    pub rate_limit_burst: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { token_file: None, rate_limit_per_sec: default_rate(), rate_limit_burst: default_burst() }
    }
}

fn default_rate() -> u32 {
    20
}
fn default_burst() -> u32 {
    100
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Every event as one JSON line: an absolute file path (appended to, reopened on
    /// SIGHUP for log rotation) or `-` for standard output.
    #[serde(default)]
    pub log: Option<String>,
    /// RFC 5424 syslog messages (the event's JSON as message).
    #[serde(default)]
    pub syslog: Option<SyslogConfig>,
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
        let host_port = |rest: &str| match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => Ok(rest.to_string()),
            _ => Err(format!("`{s}`: expected HOST:PORT after the scheme")),
        };
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

fn default_event_rate() -> u32 {
    1000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    pub role: Role,
    /// Required: the operator decides between native and generic XDP. There is no
    /// silent fallback from one to the other.
    pub xdp_mode: XdpMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Traffic crosses this interface: the datapath may enforce here.
    Inline,
    /// A SPAN/mirror port: frames are copies, mdsec only observes.
    Mirror,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native XDP in the driver.
    Driver,
    /// Generic XDP in the stack (works on every interface, slower).
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Driver => "driver",
            XdpMode::Skb => "skb",
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Detach XDP and remove every pin: a stopped agent leaves nothing behind.
    #[default]
    Detach,
    /// Leave the datapath attached and its maps pinned (for upgrades: the next start
    /// atomically replaces the program and keeps counting into the same maps).
    Keep,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MapSizes {
    /// IPv4 flows (`FLOWS4`).
    #[serde(default = "default_flows")]
    pub flows: u32,
    /// Flows with an IPv6 address (`FLOWS`): a separate table with a longer key.
    #[serde(default = "default_flows_ipv6")]
    pub flows_ipv6: u32,
    #[serde(default = "default_devices")]
    pub devices: u32,
    #[serde(default = "default_fragments")]
    pub fragments: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            flows: default_flows(),
            flows_ipv6: default_flows_ipv6(),
            devices: default_devices(),
            fragments: default_fragments(),
        }
    }
}

fn default_flows() -> u32 {
    maps::DEFAULT_FLOWS_MAX
}
fn default_flows_ipv6() -> u32 {
    maps::DEFAULT_FLOWS6_MAX
}
fn default_devices() -> u32 {
    maps::DEFAULT_DEVICES_MAX
}
fn default_fragments() -> u32 {
    maps::DEFAULT_FRAGS_MAX
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_pin_dir() -> PathBuf {
    DEFAULT_PIN_DIR.into()
}
fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().unwrap()
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_idle_secs() -> u64 {
    300
}

/// A configuration error located in a file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    pub fn flow_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.flow_idle_timeout_secs)
    }

    /// MACs (canonical spelling) that `devices:` marks `decommissioned: true`.
    pub fn decommissioned_macs(&self) -> std::collections::BTreeSet<String> {
        self.devices
            .iter()
            .filter(|o| o.decommissioned)
            .filter_map(|o| crate::model::parse_mac(&o.mac).map(crate::model::mac_string))
            .collect()
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let at = |line, col, message: String| ConfigError { file: path.to_owned(), line, col, message };
        let meta = std::fs::metadata(path).map_err(|e| at(0, 0, format!("cannot read: {e}")))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(at(1, 1, format!("file is {} bytes; the limit is {MAX_CONFIG_BYTES}", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|e| at(0, 0, format!("cannot read: {e}")))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let (line, col) = line_col(&bytes, e.valid_up_to());
            at(line, col, "not valid UTF-8".into())
        })?;
        let mut cfg = Self::parse(text).map_err(|mut e| {
            e.file = path.to_owned();
            e
        })?;
        // A relative policy_dir or register is relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.policy_dir, &mut cfg.register] {
            if let Some(d) = p
                && d.is_relative()
            {
                *p = Some(base.join(&*d));
            }
        }
        Ok(cfg)
    }

    /// Parses and validates YAML text; errors carry an empty file name.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_saphyr::from_str(text).map_err(|e| {
            let (line, col) =
                e.location().map(|l| (l.line() as usize, l.column() as usize)).unwrap_or((1, 1));
            ConfigError { file: PathBuf::new(), line, col, message: saphyr_message(&e.to_string()) }
        })?;
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str) -> Result<(), ConfigError> {
        // Semantic errors point at the line that names the offending value.
        let at = |needle: &str, message: String| {
            let (line, col) = find(text, needle);
            ConfigError { file: PathBuf::new(), line, col, message }
        };
        if self.interfaces.is_empty() {
            return Err(at("interfaces", "`interfaces` must name at least one interface".into()));
        }
        let mut seen = HashSet::new();
        for i in &self.interfaces {
            if i.name.is_empty() || i.name.len() >= libc::IFNAMSIZ || i.name.contains('/') {
                return Err(at(&i.name, format!("`{}` is not a valid interface name", i.name)));
            }
            if !seen.insert(&i.name) {
                return Err(at(&i.name, format!("interface `{}` is listed twice", i.name)));
            }
        }
        for (name, v) in [
            ("flows", self.maps.flows),
            ("flows_ipv6", self.maps.flows_ipv6),
            ("devices", self.maps.devices),
            ("fragments", self.maps.fragments),
        ] {
            if !(16..=1 << 26).contains(&v) {
                return Err(at(name, format!("maps.{name} = {v} is outside 16..=67108864")));
            }
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return Err(at("poll_interval_ms", "poll_interval_ms must be within 10..=60000".into()));
        }
        if self.flow_idle_timeout_secs == 0 {
            return Err(at("flow_idle_timeout_secs", "flow_idle_timeout_secs must be positive".into()));
        }
        for d in &self.devices {
            if crate::model::parse_mac(&d.mac).is_none() {
                return Err(at(&d.mac, format!("`{}` is not a MAC address (aa:bb:cc:dd:ee:ff)", d.mac)));
            }
        }
        if self.event_rate == 0 {
            return Err(at("event_rate", "event_rate must be positive".into()));
        }
        if !self.pin_dir.is_absolute() || !self.state_dir.is_absolute() {
            return Err(at("_dir", "pin_dir and state_dir must be absolute paths".into()));
        }
        if self.api.rate_limit_per_sec == 0 || self.api.rate_limit_burst == 0 {
            return Err(at(
                "rate_limit",
                "api.rate_limit_per_sec and api.rate_limit_burst must be positive".into(),
            ));
        }
        if let Some(t) = &self.api.token_file
            && !t.is_absolute()
        {
            return Err(at("token_file", "api.token_file must be an absolute path".into()));
        }
        if let Some(l) = &self.events.log
            && l != "-"
            && !Path::new(l).is_absolute()
        {
            return Err(at(l, format!("events.log `{l}` must be an absolute path or `-` (stdout)")));
        }
        self.detection.validate().map_err(|(needle, m)| at(needle, m))?;
        if self.evidence.snapshot_secs == 0 || self.evidence.retention_days == 0 {
            return Err(at("evidence", "evidence.snapshot_secs and retention_days must be positive".into()));
        }
        if let Some(sl) = &self.events.syslog {
            SyslogTarget::parse(&sl.target)
                .map_err(|e| at(&sl.target, format!("events.syslog.target {e}")))?;
            if facility_code(&sl.facility).is_none() {
                return Err(at(&sl.facility, format!("`{}` is not a syslog facility", sl.facility)));
            }
            // RFC 5424 APP-NAME: 1–48 printable ASCII characters, no spaces.
            if sl.app_name.is_empty()
                || sl.app_name.len() > 48
                || !sl.app_name.bytes().all(|b| (33..=126).contains(&b))
            {
                return Err(at(
                    "app_name",
                    "events.syslog.app_name must be 1–48 printable ASCII characters".into(),
                ));
            }
        }
        Ok(())
    }
}

/// serde-saphyr renders "error: line L column C: message" plus a snippet; keep the
/// message only, the location is printed in `file:line:col` form.
pub(crate) fn saphyr_message(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or(rendered);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.split_once(": ") {
        Some((loc, msg)) if loc.starts_with("line ") => msg.to_string(),
        _ => first.to_string(),
    }
}

/// 1-based line and column of the first occurrence of `needle`, or 1:1.
fn find(text: &str, needle: &str) -> (usize, usize) {
    text.find(needle).map(|off| line_col(text.as_bytes(), off)).unwrap_or((1, 1))
}

fn line_col(bytes: &[u8], off: usize) -> (usize, usize) {
    let before = &bytes[..off.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = off - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "interfaces:\n  - name: eth1\n    role: inline\n    xdp_mode: driver\n";

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.maps.flows, maps::DEFAULT_FLOWS_MAX);
        assert_eq!(c.maps.flows_ipv6, maps::DEFAULT_FLOWS6_MAX);
        assert_eq!(c.on_exit, OnExit::Detach);
        assert_eq!(c.interfaces[0].xdp_mode, XdpMode::Driver);
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = Config::parse("interfaces:\n  - name: eth1\n    role: inline\n    xdp_mode: native\n")
            .unwrap_err();
        assert_eq!((e.line, e.col), (4, 15), "{e}");
        let e = Config::parse(&format!("{GOOD}bogus: 1\n")).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("bogus"), "{e}");
    }

    #[test]
    fn shipped_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for f in ["deploy/mdsec.yaml", "deploy/examples/agent.yaml"] {
            let c = Config::load(&root.join(f)).unwrap_or_else(|e| panic!("{e}"));
            assert!(c.listen.ip().is_loopback(), "{f}");
        }
    }

    #[test]
    fn event_outputs_are_validated() {
        let e = Config::parse(&format!("{GOOD}events:\n  log: events.jsonl\n")).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        let e = Config::parse(&format!("{GOOD}events:\n  syslog:\n    target: 10.0.0.1:514\n")).unwrap_err();
        assert!(e.message.contains("udp://"), "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e =
            Config::parse(&format!("{GOOD}events:\n  syslog:\n    target: udp://h:1\n    facility: locl0\n"))
                .unwrap_err();
        assert!(e.message.contains("facility"), "{e}");
        let c = Config::parse(&format!(
            "{GOOD}events:\n  log: \"-\"\n  syslog:\n    target: tcp://127.0.0.1:6514\n"
        ))
        .unwrap();
        assert_eq!(c.events.syslog.unwrap().facility, "local0");
        assert_eq!(facility_code("local0"), Some(16));
        assert_eq!(SyslogTarget::parse("unix:///dev/log"), Ok(SyslogTarget::Unix("/dev/log".into())));
        assert!(SyslogTarget::parse("udp://:514").is_err());
    }

    #[test]
    fn xdp_mode_is_required() {
        let e = Config::parse("interfaces:\n  - name: eth1\n    role: inline\n").unwrap_err();
        assert!(e.message.contains("xdp_mode"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let text = format!("{GOOD}  - name: eth1\n    role: mirror\n    xdp_mode: skb\n");
        let e = Config::parse(&text).unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
        let e = Config::parse(&format!("{GOOD}maps:\n  flows: 3\n")).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
    }

    #[test]
    fn non_utf8_file_is_located() {
        let dir = std::env::temp_dir().join(format!("mdsec-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.yaml");
        std::fs::write(&p, b"interfaces:\n  - name: \xff\n").unwrap();
        let e = Config::load(&p).unwrap_err();
        assert_eq!((e.line, e.col), (2, 11), "{e}");
        assert!(e.to_string().starts_with(&format!("{}:2:11:", p.display())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

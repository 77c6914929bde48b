//! Agent configuration: one YAML file. Parsing is strict (unknown keys are errors)
//! and every error names `file:line:col`.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::base::diag::{Step, Tree, line_col, saphyr_message};
pub use crate::{
    base::diag::Diagnostic,
    datapath::settings::{Bridge, Interface, MapSizes, OnFailure, Port, Role, XdpMode},
    surfaces::export::{EventsConfig, SyslogConfig, SyslogTarget, facility_code},
};

/// A name the kernel could give an interface.
fn valid_ifname(n: &str) -> bool {
    !n.is_empty() && n.len() < libc::IFNAMSIZ && !n.contains('/')
}

/// Largest config file accepted; a config is a few kilobytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9740";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mdsec";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mdsec";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeControl {
    /// Longest maintenance window a policy may declare, in minutes (default 720: 12 h).
    #[serde(default = "default_max_window")]
    pub max_window_minutes: u64,
    /// Longest on-demand exception (`exception open --for`), in minutes
    /// (default 480: 8 h).
    #[serde(default = "default_max_exception")]
    pub max_exception_minutes: u64,
}

fn default_max_exception() -> u64 {
    crate::policy::ondemand::DEFAULT_MAX.as_secs() / 60
}

fn default_max_window() -> u64 {
    crate::policy::window::DEFAULT_MAX_WINDOW.as_secs() / 60
}

impl Default for ChangeControl {
    fn default() -> Self {
        ChangeControl {
            max_window_minutes: default_max_window(),
            max_exception_minutes: default_max_exception(),
        }
    }
}

impl ChangeControl {
    pub fn max_exception(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.max_exception_minutes * 60)
    }

    pub fn load_options(&self) -> crate::policy::model::LoadOptions {
        crate::policy::model::LoadOptions {
            max_window: std::time::Duration::from_secs(self.max_window_minutes * 60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Gateway interfaces the datapath attaches to (routed or mirror ports).
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Transparent bridges: a bump in the wire, or the members of a Linux bridge.
    #[serde(default)]
    pub bridges: Vec<Bridge>,
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
    /// A TCP conversation that closed (a RST, or a FIN each way) ends once
    /// quiet this long, before the idle timeout: the last ACK still counts.
    #[serde(default = "default_closed_secs")]
    pub flow_closed_timeout_secs: u64,
    /// Conversations longer than this get a flow record (EVE, IPFIX) of what
    /// came since their last one, every this often; 0: only when they end.
    #[serde(default = "default_active_secs")]
    pub flow_active_timeout_secs: u64,
    /// What a clean stop (SIGINT/SIGTERM) does to the datapath.
    #[serde(default)]
    pub on_exit: OnExit,
    /// Start even when the pins would die with the agent (a bpffs private to
    /// its mount namespace) although a segment enforces: then a crash of the
    /// agent detaches XDP and ends enforcement. For tests and trials only.
    #[serde(default)]
    pub allow_private_bpffs: bool,
    /// Directory of segment policy files (`zones.yaml` + one YAML per segment).
    /// Without it the datapath only observes.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Deny events per second per CPU before the datapath rate-limits them.
    #[serde(default = "default_event_rate")]
    pub event_rate: u32,
    /// Operator statements about devices: pin a MAC to a class, name, model.
    #[serde(default)]
    pub devices: Vec<crate::inventory::clinical::Override>,
    /// Access to `/api/*`: bearer token and request limits.
    #[serde(default)]
    pub api: ApiConfig,
    /// Where events go besides `/api/v1/events`: a JSON-lines log, syslog.
    #[serde(default)]
    pub events: EventsConfig,
    /// IPFIX export of every conversation that ends (docs/OPERATIONS.md,
    /// "Send flows to your collector").
    #[serde(default)]
    pub ipfix: Option<crate::surfaces::ipfix::IpfixConfig>,
    /// Events, flow records and inventory to a Kafka broker the fleet shares
    /// (docs/FLEET.md).
    #[serde(default)]
    pub kafka: Option<crate::surfaces::kafka::KafkaConfig>,
    /// Clinical triage matrix: clinical function → patient-safety impact →
    /// escalation path. Every event carries the impact and escalation of its
    /// segment's function.
    #[serde(default)]
    pub triage: crate::detection::triage::TriageConfig,
    /// Anomaly detection thresholds (scan, DNS resolvers, deduplication).
    #[serde(default)]
    pub detection: crate::detection::detect::DetectionConfig,
    /// Correlation of events into incidents (thresholds, quiet period, updates).
    #[serde(default)]
    pub incidents: crate::detection::incident::IncidentConfig,
    /// Limits of clinical change control (maintenance windows).
    #[serde(default)]
    pub change_control: ChangeControl,
    /// The vulnerability register (YAML; see docs/EVIDENCE.md). Relative to this file.
    #[serde(default)]
    pub register: Option<PathBuf>,
    /// Snapshots for the evidence report.
    #[serde(default)]
    pub evidence: crate::evidence::EvidenceConfig,
    /// Found by [`Config::load`] (a certificate that expired or is not valid
    /// yet: warnings for `check`) and [`Config::check_host`] (a bridge this
    /// host cannot carry: errors): reasons for `run` to refuse to start.
    #[serde(skip)]
    pub start_blockers: Vec<Diagnostic>,
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
    /// TLS for the API and `/metrics` (as Prometheus's web-config).
    #[serde(default)]
    pub tls_server_config: Option<crate::surfaces::tls::TlsServerConfig>,
    /// User name → bcrypt hash: `/metrics` then needs HTTP basic auth of one
    /// of them (or the bearer token, with `metrics_token`).
    #[serde(default)]
    pub basic_auth_users: std::collections::BTreeMap<String, String>,
    /// `/metrics` needs the bearer token of `token_file` (or a basic-auth user).
    #[serde(default)]
    pub metrics_token: bool,
    /// Accept a non-loopback `listen` with neither TLS nor a token: the API
    /// (device lifecycle changes included) open to whoever reaches it.
    #[serde(default)]
    pub insecure_listen: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token_file: None,
            rate_limit_per_sec: default_rate(),
            rate_limit_burst: default_burst(),
            tls_server_config: None,
            basic_auth_users: Default::default(),
            metrics_token: false,
            insecure_listen: false,
        }
    }
}

fn default_rate() -> u32 {
    20
}
fn default_burst() -> u32 {
    100
}

fn default_event_rate() -> u32 {
    1000
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
fn default_closed_secs() -> u64 {
    10
}
fn default_active_secs() -> u64 {
    // What network exporters commonly use, so a long flow shows up in each
    // 5-minute nfcapd file.
    300
}

impl Config {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    pub fn flow_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.flow_idle_timeout_secs)
    }

    /// The flow timeouts, as the poller applies them.
    pub fn ageing(&self) -> crate::datapath::poller::Ageing {
        crate::datapath::poller::Ageing {
            idle: self.flow_idle_timeout(),
            closed: Duration::from_secs(self.flow_closed_timeout_secs),
            active: (self.flow_active_timeout_secs > 0)
                .then(|| Duration::from_secs(self.flow_active_timeout_secs)),
        }
    }

    /// MACs (canonical spelling) that `devices:` marks `decommissioned: true`.
    pub fn decommissioned_macs(&self) -> std::collections::BTreeSet<String> {
        self.devices
            .iter()
            .filter(|o| o.decommissioned)
            .filter_map(|o| crate::base::net::parse_mac(&o.mac).map(crate::base::net::mac_string))
            .collect()
    }

    pub fn load(path: &Path) -> Result<Config, Diagnostic> {
        let at = |line, col, message: String| Diagnostic::error(path, (line, col), message);
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
        if let Some(tls) = &mut cfg.api.tls_server_config {
            // As web-config: files relative to the file that names them.
            for p in [&mut tls.cert_file, &mut tls.key_file] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            if let Some(ca) = &mut tls.client_ca_file
                && ca.is_relative()
            {
                *ca = base.join(&*ca);
            }
            let tree = Tree::parse(text);
            let located = |field: &str, message: String, warning: bool| {
                let pos = tree
                    .as_ref()
                    .map_or((1, 1), |t| t.locate(&["api".into(), "tls_server_config".into(), field.into()]));
                Diagnostic { warning, ..Diagnostic::error(path, pos, message) }
            };
            match crate::surfaces::tls::load(tls, std::time::SystemTime::now()) {
                Ok(l) => cfg
                    .start_blockers
                    .extend(l.warnings.into_iter().map(|w| located(w.field, w.message, true))),
                Err(e) => return Err(located(e.field, e.message, false)),
            }
        }
        Ok(cfg)
    }

    /// Adds what this host says against the config (its bridges) to
    /// `start_blockers`. Only `check` and `run` ask: the other commands read
    /// the config for its paths and addresses, often from another namespace.
    pub fn check_host(&mut self, path: &Path) {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let tree = Tree::parse(&text);
        let mut problems = self.bridge_problems(path, tree.as_ref());
        problems.extend(self.sink_problems(path, tree.as_ref()));
        self.start_blockers.extend(problems);
    }

    /// Zones `detection:` names that `policy` does not define, located in
    /// the config file (errors: the check they configure would be off).
    pub fn zone_problems(&self, path: &Path, policy: &crate::policy::model::Policy) -> Vec<Diagnostic> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let tree = Tree::parse(&text);
        self.detection
            .unknown_zones(policy)
            .into_iter()
            .map(|(steps, m)| {
                let full: Vec<Step> = std::iter::once(Step::Key("detection")).chain(steps).collect();
                let pos = tree.as_ref().map_or((1, 1), |t| t.locate(&full));
                Diagnostic::error(path, pos, format!("detection.{m}"))
            })
            .collect()
    }

    /// What this host says against the export sinks (and `kafka:`): a log or socket in a
    /// directory that does not exist, a collector or syslog host that does
    /// not resolve (errors); a socket nobody listens on yet (a warning: the
    /// exporter connects when its consumer starts).
    fn sink_problems(&self, path: &Path, tree: Option<&Tree>) -> Vec<Diagnostic> {
        use crate::surfaces::{export::SyslogTarget, ipfix::Collector};
        let mut out = Vec::new();
        let mut at = |steps: Vec<Step>, warning: bool, message: String| {
            let pos = tree.map_or((1, 1), |t| t.locate(&steps));
            let d = Diagnostic::error(path, pos, message);
            out.push(Diagnostic { warning, ..d });
        };
        let no_dir = |p: &Path| p.parent().is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir());
        if let Some(l) = self.events.log.as_deref().filter(|l| *l != "-")
            && no_dir(Path::new(l))
        {
            let steps = vec!["events".into(), "log".into()];
            at(steps, false, format!("events.log `{l}`: its directory does not exist"));
        }
        if let Some(s) = &self.events.socket {
            let steps = vec!["events".into(), "socket".into(), "path".into()];
            if no_dir(&s.path) {
                at(
                    steps,
                    false,
                    format!("events.socket.path `{}`: its directory does not exist", s.path.display()),
                );
            } else if !s.path.exists() {
                let m = format!("events.socket.path `{}`: nothing listens there yet", s.path.display());
                at(steps, true, m);
            }
        }
        let resolves =
            |hp: &str| std::net::ToSocketAddrs::to_socket_addrs(hp).is_ok_and(|mut a| a.next().is_some());
        if let Some(ix) = &self.ipfix {
            for (i, c) in ix.collectors.iter().enumerate() {
                // Validation parsed it already; the address is what must resolve.
                let Ok(Collector::Udp(hp) | Collector::Tcp(hp)) = Collector::parse(c) else { continue };
                if !resolves(&hp) {
                    let steps = vec![Step::Key("ipfix"), "collectors".into(), Step::Index(i)];
                    at(steps, false, format!("ipfix collector `{c}`: the address does not resolve"));
                }
            }
        }
        if let Some(k) = &self.kafka {
            for p in k.host_problems(&self.state_dir) {
                at(kafka_steps(&p), false, p.message.clone());
            }
        }
        if let Some(sl) = &self.events.syslog {
            let steps = || vec![Step::Key("events"), "syslog".into(), "target".into()];
            match SyslogTarget::parse(&sl.target) {
                Ok(SyslogTarget::Udp(hp) | SyslogTarget::Tcp(hp)) if !resolves(&hp) => {
                    at(
                        steps(),
                        false,
                        format!("events.syslog.target `{}`: the address does not resolve", sl.target),
                    );
                }
                Ok(SyslogTarget::Unix(p)) if !p.exists() => {
                    at(steps(), false, format!("events.syslog.target `{}`: no such socket", sl.target));
                }
                _ => {}
            }
        }
        out
    }

    /// What this host says against the configured bridges (see
    /// `datapath::bridge::problems`), located at the port or the bridge's name.
    /// Errors for `check` as well as `run`: a bridge that cannot come up, or
    /// would not fail open, is a fault of this gateway's set-up.
    fn bridge_problems(&self, path: &Path, tree: Option<&Tree>) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for (n, b) in self.bridges.iter().enumerate() {
            for p in crate::datapath::bridge::problems(b) {
                let steps: Vec<Step> = match p.port {
                    Some(k) => vec!["bridges".into(), n.into(), "ports".into(), k.into()],
                    None => vec!["bridges".into(), n.into(), "name".into()],
                };
                let pos = tree.map_or((1, 1), |t| t.locate(&steps));
                out.push(Diagnostic::error(path, pos, p.message));
            }
        }
        out
    }

    /// Parses and validates YAML text; errors carry an empty file name.
    pub fn parse(text: &str) -> Result<Config, Diagnostic> {
        let cfg: Config = serde_saphyr::from_str(text).map_err(|e| {
            let at = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            Diagnostic::error(PathBuf::new(), at, saphyr_message(&e.to_string()))
        })?;
        cfg.validate(Tree::parse(text).as_ref())?;
        Ok(cfg)
    }

    /// Semantic checks; each error points where the parser saw the value (or,
    /// for a default, the section it belongs to).
    fn validate(&self, tree: Option<&Tree>) -> Result<(), Diagnostic> {
        let at = |path: &[Step], message: String| {
            Diagnostic::error(PathBuf::new(), tree.map_or((1, 1), |t| t.locate(path)), message)
        };
        if self.interfaces.is_empty() && self.bridges.is_empty() {
            return Err(at(
                &["interfaces".into()],
                "`interfaces` or `bridges` must name at least one interface".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (n, i) in self.interfaces.iter().enumerate() {
            let here = [Step::Key("interfaces"), n.into(), "name".into()];
            if !valid_ifname(&i.name) {
                return Err(at(&here, format!("`{}` is not a valid interface name", i.name)));
            }
            if !seen.insert(i.name.as_str()) {
                return Err(at(&here, format!("interface `{}` is listed twice", i.name)));
            }
        }
        self.validate_bridges(&at)?;
        for (name, v) in [
            ("flows", self.maps.flows),
            ("flows_ipv6", self.maps.flows_ipv6),
            ("devices", self.maps.devices),
            ("fragments", self.maps.fragments),
        ] {
            if !(16..=1 << 26).contains(&v) {
                return Err(at(
                    &["maps".into(), name.into()],
                    format!("maps.{name} = {v} is outside 16..=67108864"),
                ));
            }
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return Err(at(
                &["poll_interval_ms".into()],
                "poll_interval_ms must be within 10..=60000".into(),
            ));
        }
        if self.flow_idle_timeout_secs == 0 {
            return Err(at(
                &["flow_idle_timeout_secs".into()],
                "flow_idle_timeout_secs must be positive".into(),
            ));
        }
        if self.flow_closed_timeout_secs == 0 {
            return Err(at(
                &["flow_closed_timeout_secs".into()],
                "flow_closed_timeout_secs must be positive (the last ACK of a close comes after the FINs)"
                    .into(),
            ));
        }
        if self.flow_active_timeout_secs != 0
            && self.flow_active_timeout_secs * 1000 < 2 * self.poll_interval_ms
        {
            return Err(at(
                &["flow_active_timeout_secs".into()],
                format!(
                    "flow_active_timeout_secs = {} is under two poll intervals ({} ms); use 0 to report only when flows end",
                    self.flow_active_timeout_secs, self.poll_interval_ms
                ),
            ));
        }
        for (n, d) in self.devices.iter().enumerate() {
            if crate::base::net::parse_mac(&d.mac).is_none() {
                let here = [Step::Key("devices"), n.into(), "mac".into()];
                return Err(at(&here, format!("`{}` is not a MAC address (aa:bb:cc:dd:ee:ff)", d.mac)));
            }
        }
        if self.event_rate == 0 {
            return Err(at(&["event_rate".into()], "event_rate must be positive".into()));
        }
        for (key, dir) in [("pin_dir", &self.pin_dir), ("state_dir", &self.state_dir)] {
            if !dir.is_absolute() {
                return Err(at(&[key.into()], format!("{key} must be an absolute path")));
            }
        }
        for (key, v) in [
            ("rate_limit_per_sec", self.api.rate_limit_per_sec),
            ("rate_limit_burst", self.api.rate_limit_burst),
        ] {
            if v == 0 {
                return Err(at(&["api".into(), key.into()], format!("api.{key} must be positive")));
            }
        }
        if let Some(t) = &self.api.token_file
            && !t.is_absolute()
        {
            return Err(at(
                &["api".into(), "token_file".into()],
                "api.token_file must be an absolute path".into(),
            ));
        }
        if let Some(s) = &self.events.socket
            && !s.path.is_absolute()
        {
            return Err(at(
                &["events".into(), "socket".into(), "path".into()],
                format!("events.socket.path `{}` must be an absolute path", s.path.display()),
            ));
        }
        if let Some(l) = &self.events.log
            && l != "-"
            && !Path::new(l).is_absolute()
        {
            return Err(at(
                &["events".into(), "log".into()],
                format!("events.log `{l}` must be an absolute path or `-` (stdout)"),
            ));
        }
        self.detection.validate().map_err(|(path, m)| {
            let full: Vec<Step> = std::iter::once(Step::Key("detection")).chain(path).collect();
            at(&full, m)
        })?;
        if !(1..=7 * 24 * 60).contains(&self.change_control.max_window_minutes) {
            return Err(at(
                &["change_control".into(), "max_window_minutes".into()],
                "change_control.max_window_minutes must be from 1 to 10080 (a week)".into(),
            ));
        }
        if !(1..=7 * 24 * 60).contains(&self.change_control.max_exception_minutes) {
            return Err(at(
                &["change_control".into(), "max_exception_minutes".into()],
                "change_control.max_exception_minutes must be from 1 to 10080 (a week)".into(),
            ));
        }
        self.incidents.validate().map_err(|(path, m)| {
            let full: Vec<Step> = std::iter::once(Step::Key("incidents")).chain(path).collect();
            at(&full, m)
        })?;
        for (key, v) in
            [("snapshot_secs", self.evidence.snapshot_secs), ("retention_days", self.evidence.retention_days)]
        {
            if v == 0 {
                return Err(at(&["evidence".into(), key.into()], format!("evidence.{key} must be positive")));
            }
        }
        for (user, hash) in &self.api.basic_auth_users {
            crate::surfaces::tls::check_hash(hash).map_err(|m| {
                at(
                    &["api".into(), "basic_auth_users".into(), user.as_str().into()],
                    format!("user `{user}`: {m}"),
                )
            })?;
        }
        if self.api.metrics_token && self.api.token_file.is_none() {
            return Err(at(
                &["api".into(), "metrics_token".into()],
                "api.metrics_token needs api.token_file (the token /metrics would accept)".into(),
            ));
        }
        if !self.listen.ip().is_loopback()
            && self.api.tls_server_config.is_none()
            && self.api.token_file.is_none()
            && !self.api.insecure_listen
        {
            return Err(at(
                &["listen".into()],
                format!(
                    "listen {} is not a loopback address, and the API has neither TLS \
                     (api.tls_server_config) nor a token (api.token_file): anyone who reaches it could \
                     read the inventory and change device lifecycle states. Configure one of them, or \
                     set api.insecure_listen: true to accept that",
                    self.listen
                ),
            ));
        }
        if let Some(ix) = &self.ipfix {
            let here = |key: &'static str| [Step::Key("ipfix"), key.into()];
            if ix.collectors.is_empty() {
                return Err(at(&here("collectors"), "ipfix.collectors needs at least one collector".into()));
            }
            for (i, c) in ix.collectors.iter().enumerate() {
                crate::surfaces::ipfix::Collector::parse(c).map_err(|e| {
                    at(
                        &[Step::Key("ipfix"), "collectors".into(), Step::Index(i)],
                        format!("ipfix.collectors {e}"),
                    )
                })?;
            }
            if ix.template_refresh_secs == 0 {
                return Err(at(
                    &here("template_refresh_secs"),
                    "ipfix.template_refresh_secs must be positive".into(),
                ));
            }
        }
        if let Some(p) = self.kafka.as_ref().and_then(|k| k.problems().into_iter().next()) {
            return Err(at(&kafka_steps(&p), p.message.clone()));
        }
        if let Some(sl) = &self.events.syslog {
            let here = |key: &'static str| [Step::Key("events"), "syslog".into(), key.into()];
            SyslogTarget::parse(&sl.target)
                .map_err(|e| at(&here("target"), format!("events.syslog.target {e}")))?;
            if facility_code(&sl.facility).is_none() {
                return Err(at(&here("facility"), format!("`{}` is not a syslog facility", sl.facility)));
            }
            // RFC 5424 APP-NAME: 1–48 printable ASCII characters, no spaces.
            if sl.app_name.is_empty()
                || sl.app_name.len() > 48
                || !sl.app_name.bytes().all(|b| (33..=126).contains(&b))
            {
                return Err(at(
                    &here("app_name"),
                    "events.syslog.app_name must be 1–48 printable ASCII characters".into(),
                ));
            }
        }
        Ok(())
    }

    /// Bridges are checked after the interfaces: a port may be in one place only.
    fn validate_bridges(&self, at: &dyn Fn(&[Step], String) -> Diagnostic) -> Result<(), Diagnostic> {
        let routed: std::collections::HashMap<&str, usize> =
            self.interfaces.iter().enumerate().map(|(n, i)| (i.name.as_str(), n)).collect();
        let mut names = HashSet::new();
        let mut owner: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        for (n, b) in self.bridges.iter().enumerate() {
            let field = |k: &'static str| [Step::Key("bridges"), n.into(), k.into()];
            if b.name.is_empty()
                || b.name.len() > 32
                || !b.name.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
            {
                return Err(at(
                    &field("name"),
                    format!(
                        "bridge name `{}` must be 1–32 characters of A–Z, a–z, 0–9, `-`, `_`, `.`",
                        b.name
                    ),
                ));
            }
            if !names.insert(b.name.as_str()) {
                return Err(at(&field("name"), format!("bridge `{}` is listed twice", b.name)));
            }
            if b.ports.len() < 2 {
                return Err(at(
                    &field("ports"),
                    format!(
                        "bridge `{}` has {} port(s): it needs two (a bump in the wire) or more (the members \
                         of one Linux bridge)",
                        b.name,
                        b.ports.len()
                    ),
                ));
            }
            if b.on_failure == OnFailure::Closed && b.ports.len() != 2 {
                return Err(at(
                    &field("on_failure"),
                    format!(
                        "bridge `{}`: on_failure: closed needs exactly two ports; with more, the kernel \
                         bridge forwards, and it keeps forwarding when XDP is detached",
                        b.name
                    ),
                ));
            }
            for (k, p) in b.ports.iter().enumerate() {
                let here = [Step::Key("bridges"), n.into(), "ports".into(), k.into()];
                if !valid_ifname(p) {
                    return Err(at(&here, format!("`{p}` is not a valid interface name")));
                }
                if let Some(i) = routed.get(p.as_str()) {
                    return Err(at(
                        &here,
                        format!(
                            "port `{p}` of bridge `{}` is also a routed port (interfaces[{i}]); an interface \
                             is either routed or bridged",
                            b.name
                        ),
                    ));
                }
                if let Some(other) = owner.insert(p.as_str(), b.name.as_str()) {
                    let m = if other == b.name {
                        format!(
                            "bridge `{}` lists port `{p}` twice; its ports must be different interfaces",
                            b.name
                        )
                    } else {
                        format!("port `{p}` is in bridge `{other}` and in bridge `{}`", b.name)
                    };
                    return Err(at(&here, m));
                }
            }
        }
        Ok(())
    }

    /// Every interface the datapath attaches to.
    pub fn ports(&self) -> Vec<Port> {
        Port::all(&self.interfaces, &self.bridges)
    }
}

/// Where under `kafka:` a problem is.
fn kafka_steps(p: &crate::surfaces::kafka::config::Problem) -> Vec<Step<'_>> {
    let mut steps = vec![Step::Key("kafka")];
    steps.extend(p.steps.iter().map(|s| Step::Key(s.as_str())));
    steps.extend(p.index.map(Step::Index));
    steps
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
        assert_eq!(c.maps.flows, mdsec_common::maps::DEFAULT_FLOWS_MAX);
        assert_eq!(c.maps.flows_ipv6, mdsec_common::maps::DEFAULT_FLOWS6_MAX);
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
    fn change_control_limits_are_bounded() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!((c.change_control.max_window_minutes, c.change_control.max_exception_minutes), (720, 480));
        for key in ["max_window_minutes", "max_exception_minutes"] {
            for v in ["0", "10081"] {
                let e = Config::parse(&format!("{GOOD}change_control:\n  {key}: {v}\n")).unwrap_err();
                assert!(e.message.contains(&format!("change_control.{key} must be from 1")), "{e}");
            }
        }
    }

    #[test]
    fn gratuitous_arp_flood_thresholds_are_bounded() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!((c.detection.garp_flood_frames, c.detection.garp_flood_window_secs), (20, 10));
        for (yaml, want) in [
            ("garp_flood_frames: 1", "garp_flood_frames must be at least 2"),
            ("garp_flood_window_secs: 0", "garp_flood_window_secs must be from 1 to 3600"),
            ("garp_flood_window_secs: 3601", "garp_flood_window_secs must be from 1 to 3600"),
        ] {
            let e = Config::parse(&format!("{GOOD}detection:\n  {yaml}\n")).unwrap_err();
            assert!(e.message.contains(want), "{yaml}: {e}");
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
    fn ipfix_collectors_are_validated_where_they_are_written() {
        let c = Config::parse(&format!(
            "{GOOD}ipfix:\n  collectors: [\"udp://10.0.0.5:4739\", \"tcp://[fd00::5]:4739\"]\n  observation_domain: 7\n"
        ))
        .unwrap();
        let ix = c.ipfix.unwrap();
        assert_eq!((ix.observation_domain, ix.template_refresh_secs, ix.collectors.len()), (7, 60, 2));
        let e = Config::parse(&format!(
            "{GOOD}ipfix:\n  collectors:\n    - udp://10.0.0.5:4739\n    - 10.0.0.6:4739\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("udp:// or tcp://"), "{e}");
        let e = Config::parse(&format!("{GOOD}ipfix:\n  collectors: []\n")).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        let e = Config::parse(&format!(
            "{GOOD}ipfix:\n  collectors: [\"udp://h:1\"]\n  template_refresh_secs: 0\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 7, "{e}");
        let e = Config::parse(&format!("{GOOD}ipfix:\n  collector: [\"udp://h:1\"]\n")).unwrap_err();
        assert!(e.message.contains("collector"), "{e}");
    }

    #[test]
    fn eve_formats_are_chosen_per_sink() {
        use crate::surfaces::eve::{Format, MetadataStyle};
        let c = Config::parse(&format!(
            "{GOOD}events:\n  log: \"-\"\n  log_format: eve\n  syslog:\n    target: tcp://127.0.0.1:6514\n  eve:\n    sensor_name: gw-3\n    community_id_seed: 9\n"
        ))
        .unwrap();
        assert_eq!(c.events.log_format, Format::Eve);
        assert_eq!(c.events.syslog.as_ref().unwrap().format, Format::Native);
        assert_eq!((c.events.eve.community_id_seed, c.events.eve.metadata), (9, MetadataStyle::Strict));
        let e = Config::parse(&format!("{GOOD}events:\n  log: \"-\"\n  log_format: cef\n")).unwrap_err();
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("cef"), "{e}");
        let e = Config::parse(&format!("{GOOD}events:\n  eve:\n    community_id_seed: 70000\n")).unwrap_err();
        assert_eq!(e.line, 7, "{e}");
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
        // The second entry's name, not the first occurrence of the text.
        assert_eq!((e.line, e.col), (5, 11), "{e}");
        let e = Config::parse(&format!("{GOOD}maps:\n  flows: 3\n")).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        // An active timeout under two polls, and a closed timeout of 0.
        let e = Config::parse(&format!("{GOOD}poll_interval_ms: 1000\nflow_active_timeout_secs: 1\n"))
            .unwrap_err();
        assert!(e.message.contains("flow_active_timeout_secs = 1") && e.line == 6, "{e}");
        let e = Config::parse(&format!("{GOOD}flow_closed_timeout_secs: 0\n")).unwrap_err();
        assert!(e.message.contains("flow_closed_timeout_secs") && e.line == 5, "{e}");
        let off = Config::parse(&format!("{GOOD}flow_active_timeout_secs: 0\n")).unwrap();
        assert_eq!(off.ageing().active, None);
    }

    #[test]
    fn positions_come_from_the_parser_not_from_the_text() {
        // A comment and another key mention the value first; the error is
        // where the offending value was written.
        let text = format!(
            "# poll_interval_ms: keep it above the poll time\n{GOOD}devices:\n  - mac: \"58:46:e1:00:00:07\"\n  - mac: 58:46:e1:00:00\npoll_interval_ms: 5\n"
        );
        let e = Config::parse(&text.replace("poll_interval_ms: 5\n", "")).unwrap_err();
        assert_eq!((e.line, e.col), (8, 10), "{e}");
        let e = Config::parse(&text.replace("  - mac: 58:46:e1:00:00\n", "")).unwrap_err();
        assert_eq!((e.line, e.col), (8, 19), "{e}");
        assert!(e.message.contains("poll_interval_ms"), "{e}");
    }

    #[test]
    fn sinks_this_host_cannot_reach_are_located() {
        let dir = std::env::temp_dir().join(format!("mdsec-cfg-sinks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.yaml");
        let text = format!(
            "{GOOD}events:\n  log: /nonexistent-mdsec/events.json\n  socket:\n    path: {}/eve.sock\n    format: eve\n\
             ipfix:\n  collectors: [\"udp://127.0.0.1:4739\", \"udp://no-such-host.invalid:4739\"]\n",
            dir.display()
        );
        std::fs::write(&p, &text).unwrap();
        let mut c = Config::load(&p).unwrap();
        c.check_host(&p);
        let found: Vec<(u64, bool, String)> =
            c.start_blockers.iter().map(|d| (d.line, d.warning, d.message.clone())).collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].0 == 6 && !found[0].1 && found[0].2.contains("directory does not exist"),
            "{found:?}"
        );
        assert!(found[1].0 == 8 && found[1].1 && found[1].2.contains("nothing listens"), "{found:?}");
        assert!(found[2].0 == 11 && !found[2].1 && found[2].2.contains("no-such-host.invalid"), "{found:?}");
        let e = Config::parse(&format!("{GOOD}events:\n  socket:\n    path: eve.sock\n")).unwrap_err();
        assert!(e.message.contains("absolute") && e.line == 7, "{e}");
        let e = Config::parse(&format!("{GOOD}events:\n  socket:\n    path: /x\n    mode: seqpacket\n"))
            .unwrap_err();
        assert!(e.message.contains("seqpacket"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
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

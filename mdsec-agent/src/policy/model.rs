//! Segment policy files: one YAML per segment plus `zones.yaml`, in one directory.
//! Loading is strict (unknown keys are errors) and collects every problem it can
//! find, each as `file:line:col: message`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use ipnet::IpNet;
use mdsec_common::app::App;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// Learning period of a segment that does not set one.
pub const DEFAULT_LEARNING: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// `90s`, `30m`, `12h`, `7d` (one number, one unit).
pub fn parse_period(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        's' => n,
        'm' => n.checked_mul(60)?,
        'h' => n.checked_mul(3600)?,
        'd' => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

/// A policy file larger than this is refused before parsing.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// At most this many policy files in the directory.
pub const MAX_FILES: usize = 1024;

pub const ZONES_FILE: &str = "zones.yaml";
/// The approval beside the policy files (`policy::approval`): not a segment
/// file, and not part of the content it approves.
pub const APPROVAL_FILE: &str = "approval.yaml";

pub use crate::base::diag::Diagnostic;

// ---- YAML shapes -----------------------------------------------------------------

/// `zones.yaml`: named address sets that rules can name as peers.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ZonesYaml {
    /// Zone name → addresses or CIDRs (IPv4 or IPv6).
    #[schemars(with = "BTreeMap<String, Vec<String>>")]
    zones: BTreeMap<String, Vec<Spanned<String>>>,
}

/// One segment: its members, mode, default verdict, allow rules and exceptions.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentYaml {
    /// Unique name (letters, digits, `-`, `_`); rules of other segments can name it.
    #[schemars(with = "String")]
    segment: Spanned<String>,
    /// Clinical function, e.g. `infusion-pump`, `patient-monitor`, `imaging-modality`.
    function: String,
    /// `monitor` counts would-be drops and never drops; `enforce` drops.
    mode: Mode,
    /// Verdict for traffic of this segment that no rule allows.
    default: DefaultVerdict,
    /// Devices in the segment, by CIDR or MAC, optionally on one VLAN only.
    members: Vec<MemberYaml>,
    /// Allowed communication, in either direction.
    #[serde(default)]
    allow: Vec<RuleYaml>,
    /// Time-bound allow rules (vendor maintenance, …) with a reason and a ticket.
    #[serde(default)]
    exceptions: Vec<ExceptionYaml>,
    /// Recurring allow rules (vendor remote service): open on the given days
    /// from `start` to `end` local time; the datapath opens and closes them
    /// on the instant, without a reload.
    #[serde(default)]
    maintenance_windows: Vec<WindowYaml>,
    /// How long after the segment is first loaded devices are learned silently; a
    /// device first seen later raises `new_device`. `30m`, `12h`, `7d`; default `7d`.
    #[schemars(with = "Option<String>")]
    learning_period: Option<Spanned<String>>,
    /// Enforce segments only: a change of the policy directory is installed
    /// only with an approval of its content hash (`mdsec-agent policy apply
    /// --approved-by NAME --ticket T`, or `approval.yaml`); an unapproved
    /// change is refused and the last approved generation keeps enforcing.
    #[serde(default)]
    #[schemars(with = "bool")]
    require_approval: Option<Spanned<bool>>,
    /// Enforce segments only: what a device inside the segment's addresses
    /// gets when it is first seen after the learning period, is not a MAC
    /// member and is still `onboarding`. `quarantine`: only exempt traffic
    /// and `quarantine_allow` until it is moved to `active`; `monitor`: the
    /// same, counted as would-drop instead of dropped; `allow` (default):
    /// the segment's rules.
    #[serde(default)]
    #[schemars(with = "Option<NewDevices>")]
    new_devices: Option<Spanned<NewDevices>>,
    /// What a quarantined device may reach (or be reached by), e.g. the
    /// biomed onboarding server; rules as in `allow`.
    #[serde(default)]
    quarantine_allow: Vec<RuleYaml>,
}

/// `new_devices:` of a segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NewDevices {
    Quarantine,
    Monitor,
    #[default]
    Allow,
}

impl NewDevices {
    pub fn name(self) -> &'static str {
        match self {
            NewDevices::Quarantine => "quarantine",
            NewDevices::Monitor => "monitor",
            NewDevices::Allow => "allow",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Monitor,
    Enforce,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Monitor => "monitor",
            Mode::Enforce => "enforce",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DefaultVerdict {
    Deny,
    Allow,
}

/// A member: exactly one of `cidr` or `mac`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct MemberYaml {
    /// Address or CIDR, IPv4 or IPv6, without host bits.
    #[schemars(with = "Option<String>")]
    cidr: Option<Spanned<String>>,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    #[schemars(with = "Option<String>")]
    mac: Option<Spanned<String>>,
    /// Only on this VLAN (1-4094); a VLAN-scoped member wins over an unscoped one.
    #[schemars(with = "Option<u16>", range(min = 1, max = 4094))]
    vlan: Option<Spanned<u16>>,
}

/// An allow rule: exactly one of `to` (from the segment to the peer) or `from`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RuleYaml {
    /// Peer the segment may reach: a zone, a segment, or a CIDR.
    #[schemars(with = "Option<String>")]
    to: Option<Spanned<String>>,
    /// Peer that may reach the segment: a zone, a segment, or a CIDR.
    #[schemars(with = "Option<String>")]
    from: Option<Spanned<String>>,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or `any` (default).
    #[schemars(with = "Option<ProtoName>")]
    proto: Option<Spanned<String>>,
    /// Destination ports (tcp/udp only): numbers or ranges like `"5000-5010"`.
    #[serde(default)]
    #[schemars(with = "Vec<PortYaml>")]
    ports: Vec<Spanned<PortYaml>>,
    /// Application the traffic must be (identified from the first payload).
    #[schemars(with = "Option<String>")]
    app: Option<Spanned<String>>,
}

#[derive(schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum ProtoName {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Any,
}

/// A rule that allows only until `expires`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExceptionYaml {
    #[schemars(with = "Option<String>")]
    to: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    from: Option<Spanned<String>>,
    #[schemars(with = "Option<ProtoName>")]
    proto: Option<Spanned<String>>,
    #[serde(default)]
    #[schemars(with = "Vec<PortYaml>")]
    ports: Vec<Spanned<PortYaml>>,
    #[schemars(with = "Option<String>")]
    app: Option<Spanned<String>>,
    /// RFC 3339 time, e.g. `2026-12-01T18:00:00+01:00`; the datapath stops allowing
    /// at that instant without a reload.
    #[schemars(with = "String")]
    expires: Spanned<String>,
    /// Why the exception exists.
    reason: String,
    /// Change or incident ticket.
    ticket: String,
}

/// A maintenance window: a rule (as in `allow`) plus when it is open.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct WindowYaml {
    #[schemars(with = "Option<String>")]
    to: Option<Spanned<String>>,
    #[schemars(with = "Option<String>")]
    from: Option<Spanned<String>>,
    #[schemars(with = "Option<ProtoName>")]
    proto: Option<Spanned<String>>,
    #[serde(default)]
    #[schemars(with = "Vec<PortYaml>")]
    ports: Vec<Spanned<PortYaml>>,
    #[schemars(with = "Option<String>")]
    app: Option<Spanned<String>>,
    /// `mon` … `sun` (or full names); the day the window starts.
    #[schemars(with = "Vec<String>")]
    days: Spanned<Vec<Spanned<String>>>,
    /// Local time `HH:MM`.
    #[schemars(with = "String")]
    start: Spanned<String>,
    /// Local time `HH:MM` after `start` (up to `24:00`); a window over midnight is two windows.
    #[schemars(with = "String")]
    end: Spanned<String>,
    /// IANA time zone, e.g. `Europe/Berlin`, `America/New_York`, `UTC`.
    #[schemars(with = "String")]
    time_zone: Spanned<String>,
    reason: String,
    ticket: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum PortYaml {
    Number(i64),
    Range(String),
}

/// JSON Schemas for editors: (file name, schema).
pub fn schemas() -> Vec<(&'static str, String)> {
    let seg = schemars::schema_for!(SegmentYaml);
    let zones = schemars::schema_for!(ZonesYaml);
    vec![
        ("segment.schema.json", serde_json::to_string_pretty(&seg).unwrap() + "\n"),
        ("zones.schema.json", serde_json::to_string_pretty(&zones).unwrap() + "\n"),
    ]
}

// ---- The validated policy ----------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Policy {
    pub zones: Vec<Zone>,
    pub segments: Vec<Segment>,
    pub rules: Vec<Rule>,
    /// Devices in quarantine now (not from the files: the agent selects
    /// them from the inventory and merges them in, `policy::quarantine`).
    pub quarantined: Vec<super::quarantine::Quarantined>,
}

#[derive(Debug, Clone)]
pub struct Zone {
    pub name: String,
    pub cidrs: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub name: String,
    pub function: String,
    pub mode: Mode,
    pub default: DefaultVerdict,
    pub members: Vec<Member>,
    pub file: PathBuf,
    pub learning_period: std::time::Duration,
    /// As written; it takes effect in enforce mode ([`Segment::approval_required`]).
    pub require_approval: bool,
    /// As written; it takes effect in enforce mode only (every user checks
    /// the mode too).
    pub new_devices: NewDevices,
}

impl Segment {
    /// Does a change of the policy need an approval because of this segment?
    pub fn approval_required(&self) -> bool {
        self.require_approval && self.mode == Mode::Enforce
    }
}

#[cfg(test)]
impl Policy {
    /// A policy of one monitor segment, `pumps` (infusion-pump, default deny,
    /// no rules) with these members: the fixture of the detection tests.
    pub fn pumps(members: Vec<Member>, learning_period: std::time::Duration) -> Policy {
        Policy {
            zones: vec![],
            rules: vec![],
            segments: vec![Segment {
                name: "pumps".into(),
                function: "infusion-pump".into(),
                mode: Mode::Monitor,
                default: DefaultVerdict::Deny,
                members,
                file: PathBuf::from("pumps.yaml"),
                learning_period,
                require_approval: false,
                new_devices: NewDevices::Allow,
            }],
            quarantined: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    Net { net: IpNet, vlan: Option<u16> },
    Mac { mac: [u8; 6], vlan: Option<u16> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From the segment to the peer (`to:`).
    Out,
    /// From the peer to the segment (`from:`).
    In,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A zone or a segment.
    Name(String),
    Cidr(IpNet),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Name(n) => f.write_str(n),
            Peer::Cidr(c) => write!(f, "{c}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// 1-based, in file order; what events and flows call `rule`.
    pub id: u32,
    /// Index into `Policy::segments`.
    pub segment: usize,
    pub direction: Direction,
    pub peer: Peer,
    /// IP protocol number, `None` = any.
    pub proto: Option<u8>,
    /// Inclusive port ranges; empty = any port.
    pub ports: Vec<(u16, u16)>,
    pub app: Option<App>,
    pub exception: Option<ExceptionInfo>,
    /// A maintenance window: allows only while one of its occurrences is open.
    pub window: Option<super::window::Window>,
    /// From `quarantine_allow`: it applies to the segment's quarantined
    /// devices, not to its members.
    pub quarantine: bool,
    /// Where the rule is written (its `to`/`from`).
    pub file: PathBuf,
    pub line: u64,
    pub col: u64,
}

impl Rule {
    /// `file:line:col`, for events and the API.
    pub fn origin(&self) -> String {
        // On-demand exceptions have no file position (`ondemand`).
        if self.line == 0 {
            return self.file.display().to_string();
        }
        format!("{}:{}:{}", self.file.display(), self.line, self.col)
    }

    /// Neither a time-bound exception nor a maintenance window.
    pub fn permanent(&self) -> bool {
        self.exception.is_none() && self.window.is_none()
    }

    /// `to PEER PROTO PORTS [app APP]`: how reports and diffs name a rule
    /// (`quarantine to …` for a `quarantine_allow` rule).
    pub fn text(&self) -> String {
        let word = match self.direction {
            Direction::Out => "to",
            Direction::In => "from",
        };
        let t = rule_text(word, &self.peer.to_string(), self.proto, &self.ports, self.app.map(|a| a.name()));
        if self.quarantine { format!("quarantine {t}") } else { t }
    }
}

/// `WORD PEER PROTO [PORTS] [app APP]`: one text for rules and on-demand
/// exceptions (`ondemand::Grant::text`).
pub fn rule_text(
    word: &str,
    peer: &str,
    proto: Option<u8>,
    ports: &[(u16, u16)],
    app: Option<&str>,
) -> String {
    let mut t = format!("{word} {peer} {}", proto.map_or("any".into(), crate::base::net::proto_name));
    if !ports.is_empty() {
        let ports: Vec<String> =
            ports.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        t += &format!(" {}", ports.join(","));
    }
    if let Some(a) = app {
        t += &format!(" app {a}");
    }
    t
}

#[derive(Debug, Clone)]
pub struct ExceptionInfo {
    pub expires: SystemTime,
    pub expires_text: String,
    pub reason: String,
    pub ticket: String,
}

impl Policy {
    pub fn segment_index(&self, name: &str) -> Option<usize> {
        self.segments.iter().position(|s| s.name == name)
    }

    /// The first segment with a CIDR member containing `ip` (MAC members need
    /// the inventory to know a device's addresses).
    pub fn net_segment(&self, ip: &std::net::IpAddr) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| s.members.iter().any(|m| matches!(m, Member::Net { net, .. } if net.contains(ip))))
    }

    /// Does the zone or segment called `name` hold `ip` by address?
    pub fn name_contains(&self, name: &str, ip: &std::net::IpAddr) -> bool {
        let in_segment = self
            .segments
            .iter()
            .filter(|s| s.name == name)
            .any(|s| s.members.iter().any(|m| matches!(m, Member::Net { net, .. } if net.contains(ip))));
        in_segment
            || self.zones.iter().filter(|z| z.name == name).any(|z| z.cidrs.iter().any(|c| c.contains(ip)))
    }
}

// ---- Loading ------------------------------------------------------------------------

struct Ctx {
    diags: Vec<Diagnostic>,
}

impl Ctx {
    fn err(&mut self, file: &Path, line: u64, col: u64, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: file.to_owned(),
            line,
            col,
            message: message.into(),
            warning: false,
        });
    }
    fn err_at<T>(&mut self, file: &Path, s: &Spanned<T>, message: impl Into<String>) {
        self.err(file, s.referenced.line(), s.referenced.column(), message);
    }
    fn warn_at<T>(&mut self, file: &Path, s: &Spanned<T>, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: file.to_owned(),
            line: s.referenced.line(),
            col: s.referenced.column(),
            message: message.into(),
            warning: true,
        });
    }
}

/// What the agent config sets about loading policies (`change_control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Longest maintenance window accepted.
    pub max_window: std::time::Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { max_window: super::window::DEFAULT_MAX_WINDOW }
    }
}

/// Loads and validates a policy directory. Returns the policy when there are no
/// errors, plus every diagnostic (warnings included) either way.
pub fn load_dir(dir: &Path, now: SystemTime) -> (Option<Policy>, Vec<Diagnostic>) {
    load_dir_with(dir, now, &LoadOptions::default())
}

/// [`load_dir`] with the agent config's options.
pub fn load_dir_with(dir: &Path, now: SystemTime, opts: &LoadOptions) -> (Option<Policy>, Vec<Diagnostic>) {
    let mut cx = Ctx { diags: Vec::new() };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml") && p.is_file())
            .filter(|p| p.file_name().is_none_or(|n| n != APPROVAL_FILE))
            .collect(),
        Err(e) => {
            cx.err(dir, 0, 0, format!("cannot read the policy directory: {e}"));
            return (None, cx.diags);
        }
    };
    files.sort();
    if files.len() > MAX_FILES {
        cx.err(dir, 0, 0, format!("{} policy files; the limit is {MAX_FILES}", files.len()));
        return (None, cx.diags);
    }
    let mut zones_yaml = None;
    let mut segments_yaml = Vec::new();
    for f in &files {
        let Some(text) = read_text(&mut cx, f) else { continue };
        if f.file_name().is_some_and(|n| n == ZONES_FILE) {
            zones_yaml = parse::<ZonesYaml>(&mut cx, f, &text).map(|z| (f.clone(), z));
        } else if let Some(s) = parse::<SegmentYaml>(&mut cx, f, &text) {
            segments_yaml.push((f.clone(), s));
        }
    }
    if segments_yaml.is_empty() && !cx.diags.iter().any(|d| !d.warning) {
        cx.err(dir, 0, 0, "no segment files in the policy directory");
    }
    let policy = build(&mut cx, zones_yaml, segments_yaml, now, opts);
    let ok = !cx.diags.iter().any(|d| !d.warning);
    (if ok { policy } else { None }, cx.diags)
}

fn read_text(cx: &mut Ctx, f: &Path) -> Option<String> {
    match std::fs::metadata(f) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            cx.err(f, 1, 1, format!("file is {} bytes; the limit is {MAX_FILE_BYTES}", m.len()));
            return None;
        }
        Err(e) => {
            cx.err(f, 0, 0, format!("cannot read: {e}"));
            return None;
        }
        _ => {}
    }
    let bytes = match std::fs::read(f) {
        Ok(b) => b,
        Err(e) => {
            cx.err(f, 0, 0, format!("cannot read: {e}"));
            return None;
        }
    };
    match String::from_utf8(bytes) {
        Ok(t) => Some(t),
        Err(e) => {
            let bytes = e.as_bytes();
            let off = e.utf8_error().valid_up_to();
            let line = bytes[..off].iter().filter(|&&b| b == b'\n').count() as u64 + 1;
            let col = (off - bytes[..off].iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1)) as u64 + 1;
            cx.err(f, line, col, "not valid UTF-8");
            None
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(cx: &mut Ctx, f: &Path, text: &str) -> Option<T> {
    if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        cx.err(f, 1, 1, "empty file (nothing but blank lines and comments)");
        return None;
    }
    match serde_saphyr::from_str::<T>(text) {
        Ok(v) => Some(v),
        Err(e) => {
            let (line, col) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            cx.err(f, line, col, crate::base::diag::saphyr_message(&e.to_string()));
            None
        }
    }
}

fn parse_net(cx: &mut Ctx, f: &Path, s: &Spanned<String>) -> Option<IpNet> {
    let text = s.value.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>().ok()
    } else {
        text.parse::<std::net::IpAddr>().ok().map(IpNet::from)
    };
    match net {
        Some(n) if n.trunc() == n => Some(n),
        Some(n) => {
            cx.err_at(f, s, format!("`{text}` has host bits set; did you mean {}?", n.trunc()));
            None
        }
        None => {
            cx.err_at(f, s, format!("`{text}` is not an IP address or CIDR"));
            None
        }
    }
}

fn parse_mac(cx: &mut Ctx, f: &Path, s: &Spanned<String>) -> Option<[u8; 6]> {
    let mac = crate::base::net::parse_mac(&s.value);
    if mac.is_none() {
        cx.err_at(f, s, format!("`{}` is not a MAC address (aa:bb:cc:dd:ee:ff)", s.value));
    }
    mac
}

fn parse_proto(cx: &mut Ctx, f: &Path, s: &Spanned<String>) -> Option<Option<u8>> {
    Some(match s.value.as_str() {
        "any" => None,
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        "icmpv6" => Some(58),
        other => {
            cx.err_at(f, s, format!("unknown proto `{other}` (tcp, udp, icmp, icmpv6, any)"));
            return None;
        }
    })
}

fn parse_port(cx: &mut Ctx, f: &Path, s: &Spanned<PortYaml>) -> Option<(u16, u16)> {
    let check = |cx: &mut Ctx, v: i64| -> Option<u16> {
        if (1..=65535).contains(&v) {
            Some(v as u16)
        } else {
            cx.err_at(f, s, format!("port {v} is out of range (1-65535)"));
            None
        }
    };
    match &s.value {
        PortYaml::Number(n) => check(cx, *n).map(|p| (p, p)),
        PortYaml::Range(r) => {
            let Some((a, b)) = r.split_once('-') else {
                cx.err_at(f, s, format!("`{r}` is not a port or a range like 5000-5010"));
                return None;
            };
            let (Ok(a), Ok(b)) = (a.trim().parse::<i64>(), b.trim().parse::<i64>()) else {
                cx.err_at(f, s, format!("`{r}` is not a port range like 5000-5010"));
                return None;
            };
            let (a, b) = (check(cx, a)?, check(cx, b)?);
            if a > b {
                cx.err_at(f, s, format!("port range `{r}` is reversed"));
                return None;
            }
            Some((a, b))
        }
    }
}

/// Where a rule or exception comes from, and its raw fields.
struct RawRule<'a> {
    to: &'a Option<Spanned<String>>,
    from: &'a Option<Spanned<String>>,
    proto: &'a Option<Spanned<String>>,
    ports: &'a [Spanned<PortYaml>],
    app: &'a Option<Spanned<String>>,
}

fn build(
    cx: &mut Ctx,
    zones_yaml: Option<(PathBuf, ZonesYaml)>,
    segments_yaml: Vec<(PathBuf, SegmentYaml)>,
    now: SystemTime,
    opts: &LoadOptions,
) -> Option<Policy> {
    let mut policy =
        Policy { zones: Vec::new(), segments: Vec::new(), rules: Vec::new(), quarantined: Vec::new() };
    // Names: zones and segments share one namespace.
    let mut names: HashMap<String, String> = HashMap::new();
    if let Some((f, z)) = &zones_yaml {
        for (name, cidrs) in &z.zones {
            let mut zone = Zone { name: name.clone(), cidrs: Vec::new() };
            for c in cidrs {
                if let Some(n) = parse_net(cx, f, c) {
                    zone.cidrs.push(n);
                }
            }
            if zone.cidrs.is_empty() {
                let at =
                    cidrs.first().map(|c| (c.referenced.line(), c.referenced.column())).unwrap_or((1, 1));
                cx.err(f, at.0, at.1, format!("zone `{name}` has no addresses"));
            }
            names.insert(name.clone(), format!("{}", f.display()));
            policy.zones.push(zone);
        }
    }
    for (f, s) in &segments_yaml {
        let name = s.segment.value.trim().to_string();
        if name.is_empty() || name.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
            cx.err_at(f, &s.segment, format!("segment name `{name}` must be letters, digits, - or _"));
        }
        if let Some(prev) =
            names.insert(name.clone(), format!("{}:{}", f.display(), s.segment.referenced.line()))
        {
            cx.err_at(f, &s.segment, format!("`{name}` is already defined at {prev}"));
        }
        let mut members = Vec::new();
        for m in &s.members {
            let vlan = m.vlan.as_ref().and_then(|v| {
                if (1..=4094).contains(&v.value) {
                    Some(v.value)
                } else {
                    cx.err_at(f, v, format!("vlan {} is out of range (1-4094)", v.value));
                    None
                }
            });
            match (&m.cidr, &m.mac) {
                (Some(c), None) => {
                    if let Some(net) = parse_net(cx, f, c) {
                        members.push((Member::Net { net, vlan }, c.referenced.line(), c.referenced.column()));
                    }
                }
                (None, Some(mac)) => {
                    if let Some(mac_v) = parse_mac(cx, f, mac) {
                        members.push((
                            Member::Mac { mac: mac_v, vlan },
                            mac.referenced.line(),
                            mac.referenced.column(),
                        ));
                    }
                }
                (Some(c), Some(_)) => cx.err_at(f, c, "a member has either `cidr` or `mac`, not both"),
                (None, None) => cx.err_at(f, &s.segment, "a member needs `cidr` or `mac`"),
            }
        }
        if s.members.is_empty() {
            cx.err_at(f, &s.segment, format!("segment `{name}` has no members"));
        }
        let seg_index = policy.segments.len();
        policy.segments.push(Segment {
            name,
            function: s.function.clone(),
            mode: s.mode,
            default: s.default,
            members: members.iter().map(|m| m.0).collect(),
            file: f.clone(),
            learning_period: match &s.learning_period {
                None => DEFAULT_LEARNING,
                Some(p) => parse_period(&p.value).unwrap_or_else(|| {
                    cx.err_at(f, p, format!("`{}` is not a period like 30m, 12h or 7d", p.value));
                    DEFAULT_LEARNING
                }),
            },
            require_approval: s.require_approval.as_ref().is_some_and(|r| r.value),
            new_devices: s.new_devices.as_ref().map_or(NewDevices::Allow, |n| n.value),
        });
        if let Some(n) = &s.new_devices
            && n.value != NewDevices::Allow
            && s.mode == Mode::Monitor
        {
            cx.warn_at(
                f,
                n,
                format!(
                    "new_devices: {} takes effect in enforce mode only (a monitor segment quarantines nothing)",
                    n.value.name()
                ),
            );
        }
        if let Some(r) = s.quarantine_allow.first()
            && policy.segments[seg_index].new_devices == NewDevices::Allow
            && let Some(at) = r.to.as_ref().or(r.from.as_ref())
        {
            cx.warn_at(f, at, "quarantine_allow has no effect without new_devices: quarantine or monitor");
        }
        if let Some(r) = &s.require_approval
            && r.value
            && s.mode == Mode::Monitor
        {
            cx.warn_at(
                f,
                r,
                "require_approval takes effect in enforce mode only (a monitor segment never drops)",
            );
        }
        check_member_overlaps(cx, &policy, seg_index, f, &members);

        let raw_rules = s.allow.iter().map(|r| {
            (RawRule { to: &r.to, from: &r.from, proto: &r.proto, ports: &r.ports, app: &r.app }, None)
        });
        let raw_exceptions = s.exceptions.iter().map(|e| {
            (RawRule { to: &e.to, from: &e.from, proto: &e.proto, ports: &e.ports, app: &e.app }, Some(e))
        });
        for (raw, exc) in raw_rules.chain(raw_exceptions) {
            let id = policy.rules.len() as u32 + 1;
            if let Some(rule) = build_rule(cx, f, seg_index, id, raw, exc, now) {
                policy.rules.push(rule);
            }
        }
        for r in &s.quarantine_allow {
            let raw = RawRule { to: &r.to, from: &r.from, proto: &r.proto, ports: &r.ports, app: &r.app };
            let id = policy.rules.len() as u32 + 1;
            if let Some(rule) = build_rule(cx, f, seg_index, id, raw, None, now) {
                policy.rules.push(Rule { quarantine: true, ..rule });
            }
        }
        let mut windows: Vec<(super::window::Window, Peer, Direction, u64, u64)> = Vec::new();
        for w in &s.maintenance_windows {
            let raw = RawRule { to: &w.to, from: &w.from, proto: &w.proto, ports: &w.ports, app: &w.app };
            let id = policy.rules.len() as u32 + 1;
            let window = parse_window(cx, f, w, opts);
            if let (Some(mut rule), Some(window)) = (build_rule(cx, f, seg_index, id, raw, None, now), window)
            {
                for (other, peer, dir, line, _) in &windows {
                    if *peer == rule.peer && *dir == rule.direction && other.overlaps(&window) {
                        cx.err_at(
                            f,
                            &w.start,
                            format!(
                                "this window ({}) overlaps the window for {} at line {line} ({})",
                                window.text(),
                                rule.peer,
                                other.text()
                            ),
                        );
                    }
                }
                windows.push((window.clone(), rule.peer.clone(), rule.direction, rule.line, rule.col));
                rule.window = Some(window);
                policy.rules.push(rule);
            }
        }
    }
    // Peers must name a zone or a segment (checked once every name is known).
    for r in &policy.rules {
        if let Peer::Name(n) = &r.peer
            && !names.contains_key(n)
        {
            cx.err(&r.file, r.line, r.col, format!("unknown zone or segment `{n}`"));
        }
    }
    Some(policy)
}

fn parse_window(cx: &mut Ctx, f: &Path, w: &WindowYaml, opts: &LoadOptions) -> Option<super::window::Window> {
    use super::window::{self, Window};
    let errors = cx.diags.len();
    let mut days = [false; 7];
    for d in &w.days.value {
        match window::parse_day(&d.value) {
            Some(i) => days[i] = true,
            None => {
                cx.err_at(f, d, format!("`{}` is not a day (mon, tue, wed, thu, fri, sat, sun)", d.value))
            }
        }
    }
    if w.days.value.is_empty() {
        cx.err_at(f, &w.days, "a window needs at least one day");
    }
    let time = |cx: &mut Ctx, s: &Spanned<String>| {
        let t = window::parse_time(&s.value);
        if t.is_none() {
            cx.err_at(f, s, format!("`{}` is not a time of day HH:MM (00:00-24:00)", s.value));
        }
        t
    };
    let (start, end) = (time(cx, &w.start), time(cx, &w.end));
    let tz = match jiff::tz::TimeZone::get(w.time_zone.value.trim()) {
        Ok(tz) => Some(tz),
        Err(_) => {
            cx.err_at(
                f,
                &w.time_zone,
                format!("unknown time zone `{}` (an IANA name like Europe/Berlin)", w.time_zone.value),
            );
            None
        }
    };
    if w.reason.trim().is_empty() || w.ticket.trim().is_empty() {
        cx.err_at(f, &w.start, "a maintenance window needs a `reason` and a `ticket`");
    }
    let (Some(start), Some(end), Some(time_zone)) = (start, end, tz) else { return None };
    if end <= start {
        cx.err_at(
            f,
            &w.end,
            format!(
                "the window ends ({}) before it starts ({}): write a window over midnight as two windows",
                window::time_text(end),
                window::time_text(start)
            ),
        );
        return None;
    }
    let win = Window {
        days,
        start,
        end,
        time_zone,
        time_zone_name: w.time_zone.value.trim().to_string(),
        reason: w.reason.clone(),
        ticket: w.ticket.clone(),
    };
    if win.length() > opts.max_window {
        cx.err_at(
            f,
            &w.end,
            format!(
                "the window is {} min long; the longest allowed is {} min (change_control.max_window)",
                win.length().as_secs() / 60,
                opts.max_window.as_secs() / 60
            ),
        );
    }
    (cx.diags.len() == errors).then_some(win)
}

fn check_member_overlaps(cx: &mut Ctx, p: &Policy, seg: usize, f: &Path, members: &[(Member, u64, u64)]) {
    for (m, line, col) in members {
        // Against earlier segments; members of one segment are compared below.
        for other in &p.segments[..seg] {
            for o in &other.members {
                let clash = match (m, o) {
                    (Member::Net { net: a, vlan: va }, Member::Net { net: b, vlan: vb }) => {
                        (va.is_none() || vb.is_none() || va == vb) && (a.contains(b) || b.contains(a))
                    }
                    (Member::Mac { mac: a, vlan: va }, Member::Mac { mac: b, vlan: vb }) => {
                        a == b && (va.is_none() || vb.is_none() || va == vb)
                    }
                    _ => false,
                };
                if clash {
                    cx.err(
                        f,
                        *line,
                        *col,
                        format!(
                            "member {} overlaps a member of segment `{}` ({})",
                            member_text(m),
                            other.name,
                            other.file.display()
                        ),
                    );
                }
            }
        }
    }
    // Members of this segment among themselves.
    for (i, (a, line, col)) in members.iter().enumerate() {
        for (b, _, _) in &members[..i] {
            let same = match (a, b) {
                (Member::Net { net: x, vlan: vx }, Member::Net { net: y, vlan: vy }) => {
                    vx == vy && (x.contains(y) || y.contains(x))
                }
                _ => a == b,
            };
            if same {
                cx.err(
                    f,
                    *line,
                    *col,
                    format!(
                        "member {} duplicates or overlaps another member of this segment",
                        member_text(a)
                    ),
                );
            }
        }
    }
}

fn member_text(m: &Member) -> String {
    match m {
        Member::Net { net, vlan: Some(v) } => format!("{net} (vlan {v})"),
        Member::Net { net, vlan: None } => net.to_string(),
        Member::Mac { mac, vlan } => {
            let s = crate::base::net::mac_string(*mac);
            vlan.map_or(s.clone(), |v| format!("{s} (vlan {v})"))
        }
    }
}

fn build_rule(
    cx: &mut Ctx,
    f: &Path,
    segment: usize,
    id: u32,
    raw: RawRule,
    exc: Option<&ExceptionYaml>,
    now: SystemTime,
) -> Option<Rule> {
    let (direction, peer_s) = match (raw.to, raw.from) {
        (Some(t), None) => (Direction::Out, t),
        (None, Some(fr)) => (Direction::In, fr),
        (Some(t), Some(_)) => {
            cx.err_at(f, t, "a rule has `to` or `from`, not both");
            return None;
        }
        (None, None) => {
            let at = exc.map(|e| (e.expires.referenced.line(), e.expires.referenced.column()));
            let (line, col) = at
                .or(raw.proto.as_ref().map(|p| (p.referenced.line(), p.referenced.column())))
                .unwrap_or((1, 1));
            cx.err(f, line, col, "a rule needs `to: PEER` or `from: PEER`");
            return None;
        }
    };
    let text = peer_s.value.trim();
    let peer = if text.contains('/') || text.parse::<std::net::IpAddr>().is_ok() {
        Peer::Cidr(parse_net(cx, f, peer_s)?)
    } else if text.is_empty() {
        cx.err_at(f, peer_s, "empty peer");
        return None;
    } else {
        Peer::Name(text.to_string())
    };
    let proto = match raw.proto {
        Some(p) => parse_proto(cx, f, p)?,
        None => None,
    };
    let mut ports = Vec::new();
    for p in raw.ports {
        if let Some(r) = parse_port(cx, f, p) {
            ports.push(r);
        }
    }
    if !raw.ports.is_empty() && !matches!(proto, Some(6) | Some(17)) {
        cx.err_at(f, &raw.ports[0], "ports need `proto: tcp` or `proto: udp`");
        return None;
    }
    let app = match raw.app {
        Some(a) => match App::from_name(&a.value) {
            Some(App::Unknown) | None => {
                let known: Vec<&str> = App::ALL[1..].iter().map(|a| a.name()).collect();
                cx.err_at(f, a, format!("unknown app `{}` (one of: {})", a.value, known.join(", ")));
                return None;
            }
            Some(app) => Some(app),
        },
        None => None,
    };
    let exception = match exc {
        None => None,
        Some(e) => {
            let ts = match e.expires.value.parse::<jiff::Timestamp>() {
                Ok(t) => t,
                Err(err) => {
                    cx.err_at(f, &e.expires, format!("`{}` is not an RFC 3339 time: {err}", e.expires.value));
                    return None;
                }
            };
            let expires = SystemTime::from(ts);
            if expires <= now {
                cx.warn_at(
                    f,
                    &e.expires,
                    format!("exception expired at {} (ticket {})", e.expires.value, e.ticket),
                );
            }
            if e.reason.trim().is_empty() || e.ticket.trim().is_empty() {
                cx.err_at(f, &e.expires, "an exception needs a `reason` and a `ticket`");
            }
            Some(ExceptionInfo {
                expires,
                expires_text: e.expires.value.clone(),
                reason: e.reason.clone(),
                ticket: e.ticket.clone(),
            })
        }
    };
    Some(Rule {
        id,
        segment,
        direction,
        peer,
        proto,
        ports,
        app,
        exception,
        window: None,
        quarantine: false,
        file: f.to_owned(),
        line: peer_s.referenced.line(),
        col: peer_s.referenced.column(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    #[test]
    fn shipped_examples_are_valid() {
        let (policy, diags) = load_dir(&root().join("deploy/examples/policy"), SystemTime::now());
        let errors: Vec<_> = diags.iter().filter(|d| !d.warning).collect();
        assert!(errors.is_empty(), "{errors:#?}");
        let p = policy.unwrap();
        assert_eq!(p.segments.len(), 3);
        let pumps = &p.segments[p.segment_index("infusion-pumps").unwrap()];
        assert_eq!((pumps.mode, pumps.default), (Mode::Monitor, DefaultVerdict::Deny));
        assert!(p.rules.iter().any(|r| r.app == Some(App::Hl7) && r.ports == vec![(2575, 2575)]));
        assert!(p.rules.iter().any(|r| r.exception.as_ref().is_some_and(|e| e.ticket == "CHG-20412")));
    }

    #[test]
    fn periods_parse() {
        assert_eq!(parse_period("90s"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(parse_period("7d"), Some(DEFAULT_LEARNING));
        assert_eq!(parse_period("0s"), Some(std::time::Duration::ZERO));
        for bad in ["", "7", "d", "7w", "-1h", "1.5h"] {
            assert_eq!(parse_period(bad), None, "{bad}");
        }
    }

    #[test]
    fn quarantine_settings_that_do_nothing_are_warnings() {
        let d = std::env::temp_dir().join(format!("mdsec-t-newdev-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let head = "segment: s\nfunction: f\ndefault: deny\nmembers:\n  - cidr: 10.0.0.0/24\n";
        let q = "quarantine_allow:\n  - to: 10.9.0.0/24\n";
        for (yaml, want) in [
            (format!("{head}mode: monitor\nnew_devices: quarantine\n"), Some((7, "enforce mode only"))),
            (format!("{head}mode: enforce\n{q}"), Some((8, "quarantine_allow has no effect"))),
            (format!("{head}mode: enforce\nnew_devices: monitor\n{q}"), None),
        ] {
            std::fs::write(d.join("s.yaml"), &yaml).unwrap();
            let (p, diags) = load_dir(&d, SystemTime::now());
            assert!(p.is_some(), "{diags:?}");
            match want {
                None => assert!(diags.is_empty(), "{diags:?}"),
                Some((line, text)) => assert!(
                    diags.len() == 1
                        && diags[0].warning
                        && diags[0].line == line
                        && diags[0].message.contains(text),
                    "{yaml}: {diags:?}"
                ),
            }
        }
        std::fs::write(d.join("s.yaml"), format!("{head}mode: enforce\nnew_devices: isolate\n")).unwrap();
        let (p, diags) = load_dir(&d, SystemTime::now());
        assert!(p.is_none() && diags[0].line == 7, "{diags:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn expired_exception_is_a_warning_not_an_error() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("s.yaml"),
            "segment: s\nfunction: f\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.0.0/24\nexceptions:\n  - to: 10.1.0.0/24\n    expires: 2020-01-01T00:00:00Z\n    reason: r\n    ticket: T-1\n",
        )
        .unwrap();
        let (p, diags) = load_dir(&dir, SystemTime::now());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(p.is_some());
        assert_eq!(diags.len(), 1);
        assert!(
            diags[0].warning && diags[0].line == 9 && diags[0].message.contains("expired"),
            "{:?}",
            diags[0]
        );
    }

    #[test]
    fn bad_maintenance_windows_are_located_and_refused() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-windows-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let head = "segment: s\nfunction: f\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.0.0/24\nmaintenance_windows:\n";
        let win = |days: &str, start: &str, end: &str, tz: &str| {
            format!(
                "  - to: 10.1.0.0/24\n    days: [{days}]\n    start: \"{start}\"\n    end: \"{end}\"\n    time_zone: {tz}\n    reason: vendor\n    ticket: T-1\n"
            )
        };
        let cases = [
            (win("tue", "22:00", "02:00", "UTC"), "11:10: the window ends (02:00) before it starts (22:00)"),
            (win("tue", "08:00", "10:00", "Mars/Olympus"), "12:16: unknown time zone `Mars/Olympus`"),
            (
                win("tue", "00:00", "23:00", "UTC"),
                "11:10: the window is 1380 min long; the longest allowed is 720 min",
            ),
            (win("tus", "08:00", "10:00", "UTC"), "9:12: `tus` is not a day"),
            (win("tue", "8:00", "10:00", "UTC"), "10:12: `8:00` is not a time of day"),
            (
                win("tue", "08:00", "10:00", "UTC") + &win("mon, tue", "09:00", "11:00", "UTC"),
                "17:12: this window (mon,tue 09:00-11:00 UTC) overlaps the window for 10.1.0.0/24 at line 8",
            ),
        ];
        for (body, want) in cases {
            std::fs::write(dir.join("s.yaml"), format!("{head}{body}")).unwrap();
            let (p, diags) = load_dir(&dir, SystemTime::now());
            let texts: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
            assert!(p.is_none(), "{want}: loaded");
            assert!(texts.iter().any(|t| t.contains(&format!("s.yaml:{want}"))), "{want}: {texts:?}");
        }
        // A good one loads as a window rule, and two on one peer that do not overlap are fine.
        std::fs::write(
            dir.join("s.yaml"),
            format!("{head}{}{}", win("tue", "08:00", "10:00", "UTC"), win("tue", "10:00", "11:00", "UTC")),
        )
        .unwrap();
        let (p, diags) = load_dir(&dir, SystemTime::now());
        std::fs::remove_dir_all(&dir).unwrap();
        let p = p.unwrap_or_else(|| panic!("{diags:?}"));
        assert_eq!(p.rules.iter().filter(|r| r.window.is_some() && !r.permanent()).count(), 2);
    }
}

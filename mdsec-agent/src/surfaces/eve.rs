//! Suricata EVE JSON, the format the SOC's tools already parse (Elastic's and
//! Graylog's Suricata content, SC4S, Wazuh, Security Onion): every event the
//! agent keeps becomes one `event_type: "alert"` object, next to the native
//! schema (which stays, versioned). Only the exporter calls this; the API keeps
//! the native shape.
//!
//! Field choices (docs/OPERATIONS.md, "Send events to your SIEM"):
//! - `flow_id` is a 63-bit hash of the conversation (both endpoints in
//!   Community ID order, protocol), so both directions, every alert and the
//!   flow record of one conversation share it.
//! - `community_id` is Community ID v1 with the configured seed.
//! - `alert.signature_id`: a fixed number per detection type; for policy events
//!   one per (segment, rule), hashed into its own range, so it stays the same
//!   across reloads while the rule keeps its place.
//! - `alert.metadata` holds only keys the EVE schema allows (`tag`, `policy`,
//!   `attack_target`, `affected_product`, `signature_severity`, `deployment`);
//!   mdsec's own fields are `tag` entries `name:value`. `metadata: named`
//!   writes them as keys of their own instead (for a SIEM that stores metadata
//!   as a flattened object; Suricata's schema rejects those keys).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use mdsec_common::{app::App, policy::Verdict};

use crate::{
    base::{clock::Anchor, event::Event, net::proto_number},
    datapath::state::{EndReason, Ended},
};

/// `events.eve`: settings shared by every sink whose format is `eve`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EveConfig {
    /// `host` in every record; the machine's hostname when unset.
    #[serde(default)]
    pub sensor_name: Option<String>,
    /// Community ID v1 seed (0–65535); use the one your other sensors use.
    #[serde(default)]
    pub community_id_seed: u16,
    #[serde(default)]
    pub metadata: MetadataStyle,
    /// `event_type: "flow"` records of conversations that end (idle timeout,
    /// agent stop) in the `eve` sinks.
    #[serde(default = "yes")]
    pub flows: bool,
}

fn yes() -> bool {
    true
}

impl Default for EveConfig {
    fn default() -> EveConfig {
        EveConfig { sensor_name: None, community_id_seed: 0, metadata: MetadataStyle::Strict, flows: true }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetadataStyle {
    /// Only the keys Suricata's EVE schema allows; mdsec's fields as `tag`s.
    #[default]
    Strict,
    /// mdsec's fields as keys of their own (`segment`, `rule`, …).
    Named,
}

/// Per sink: the native event JSON or EVE.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Native,
    Eve,
}

/// What an EVE writer needs besides the event.
#[derive(Debug, Clone)]
pub struct Eve {
    pub host: String,
    pub seed: u16,
    pub metadata: MetadataStyle,
}

impl Eve {
    pub fn new(cfg: &EveConfig, hostname: &str) -> Eve {
        Eve {
            host: cfg.sensor_name.clone().unwrap_or_else(|| hostname.to_string()),
            seed: cfg.community_id_seed,
            metadata: cfg.metadata,
        }
    }

    /// The event as one EVE alert object.
    pub fn alert(&self, e: &Event) -> Value {
        let mut o = Map::new();
        o.insert("timestamp".into(), suricata_time(&e.time).into());
        let (src, dst) = (e.src.parse::<IpAddr>().ok(), e.dst.parse::<IpAddr>().ok());
        let proto = proto_number(&e.proto);
        if let (Some(s), Some(d), Some(p)) = (src, dst, proto) {
            o.insert("flow_id".into(), flow_id(s, d, p, e.sport, e.dport).into());
            o.insert("community_id".into(), community_id(self.seed, s, d, p, e.sport, e.dport).into());
        }
        if !e.iface.is_empty() {
            o.insert("in_iface".into(), e.iface.clone().into());
        }
        o.insert("event_type".into(), "alert".into());
        if e.vlan != 0 {
            o.insert("vlan".into(), json!([e.vlan]));
        }
        if let (Some(s), Some(d)) = (src, dst) {
            o.insert("src_ip".into(), s.to_string().into());
            o.insert("dest_ip".into(), d.to_string().into());
            o.insert("proto".into(), proto.map_or_else(|| e.proto.clone(), eve_proto).into());
            if matches!(proto, Some(1 | 58)) {
                o.insert("icmp_type".into(), e.sport.into());
                o.insert("icmp_code".into(), e.dport.into());
            } else if matches!(proto, Some(6 | 17 | 132)) {
                o.insert("src_port".into(), e.sport.into());
                o.insert("dest_port".into(), e.dport.into());
            }
        }
        if !e.app.is_empty() && e.app != "unknown" {
            o.insert("app_proto".into(), e.app.clone().into());
        }
        o.insert("host".into(), self.host.clone().into());
        o.insert("alert".into(), self.alert_object(e));
        Value::Object(o)
    }

    fn alert_object(&self, e: &Event) -> Value {
        let policy = e.kind.starts_with("policy_");
        json!({
            "action": if e.kind == "policy_drop" { "blocked" } else { "allowed" },
            "gid": GID,
            "signature_id": signature_id(e),
            "rev": 1,
            "signature": signature(e),
            "category": category(&e.kind),
            "severity": severity(&e.clinical_impact, &e.severity),
            "metadata": self.metadata(e, policy),
        })
    }

    fn metadata(&self, e: &Event, policy: bool) -> Value {
        let mode = match e.kind.as_str() {
            "policy_drop" => "enforce",
            "policy_would_drop" => "monitor",
            _ => "detect",
        };
        let fields: Vec<(&str, String)> = [
            ("type", e.kind.clone()),
            ("segment", e.segment.clone()),
            ("zone", e.zone.clone()),
            ("rule", if policy { e.rule.clone() } else { String::new() }),
            ("mode", mode.to_string()),
            ("function", e.function.clone()),
            ("clinical_impact", e.clinical_impact.clone()),
            ("escalation", e.escalation.clone()),
            ("vendor", e.vendor.clone().unwrap_or_default()),
            ("src_identity", e.src_identity.clone().unwrap_or_default()),
            ("dst_identity", e.dst_identity.clone().unwrap_or_default()),
            ("mac", e.mac.clone().unwrap_or_default()),
            ("would_drop", (e.kind == "policy_would_drop").to_string()),
            ("incident", if e.incident == 0 { String::new() } else { e.incident.to_string() }),
            ("reason", if policy { e.reason.clone() } else { String::new() }),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
        let mut m = Map::new();
        match self.metadata {
            MetadataStyle::Named => {
                for (k, v) in fields {
                    m.insert(k.into(), json!([v]));
                }
            }
            MetadataStyle::Strict => {
                let tags: Vec<String> = fields.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                m.insert("tag".into(), json!(tags));
                if !e.segment.is_empty() {
                    m.insert("policy".into(), json!([e.segment]));
                }
                if !e.function.is_empty() {
                    m.insert("attack_target".into(), json!([e.function]));
                }
                if let Some(v) = e.vendor.as_deref().filter(|v| !v.is_empty()) {
                    m.insert("affected_product".into(), json!([v]));
                }
                if !e.clinical_impact.is_empty() {
                    m.insert("signature_severity".into(), json!([e.clinical_impact]));
                }
                m.insert("deployment".into(), json!(["Internal"]));
            }
        }
        Value::Object(m)
    }
}

impl Eve {
    /// A conversation that ended as one `event_type: "flow"` record, oriented
    /// client → server (Suricata's `toserver`/`toclient`). `ifname` names an
    /// ifindex; `anchor` turns datapath times into wall-clock ones. (The
    /// exporter writes [`Eve::flow_line`]; this is its parsed form for tests.)
    #[cfg(test)]
    pub fn flow(&self, e: &Ended, ifname: &dyn Fn(u32) -> String, anchor: &Anchor) -> Value {
        let mut line = String::new();
        self.flow_line(e, ifname, anchor, &mut line);
        serde_json::from_str(&line).expect("flow records are JSON")
    }

    /// [`Eve::flow`] written straight into `out` as one line (no newline),
    /// keys in Suricata's order: a million records at a mass end cost a
    /// fraction of building each as a `Value` first (BENCHMARKS.md, "Flow
    /// export at scale").
    pub fn flow_line(&self, e: &Ended, ifname: &dyn Fn(u32) -> String, anchor: &Anchor, out: &mut String) {
        use std::fmt::Write;
        let (ck, cr) = (&e.client.key, &e.client.rec);
        let server = e.server.as_ref().map(|s| &s.rec);
        // What this record's span counted: a long conversation's records add
        // up to it (see EndReason::Active).
        let (up, down) = (e.client.delta, e.server.as_ref().map(|s| s.delta).unwrap_or_default());
        let start = e.server.as_ref().map_or(e.client.start_ns, |s| s.start_ns.min(e.client.start_ns));
        let end = server.map_or(cr.last_seen_ns, |r| r.last_seen_ns.max(cr.last_seen_ns));
        let (src, dst) = (ck.src_ip(), ck.dst_ip());
        let flags = cr.tcp_flags | server.map_or(0, |r| r.tcp_flags);
        let verdicts = [Some(cr.verdict), server.map(|r| r.verdict)];
        let has = |v: Verdict| verdicts.contains(&Some(v as u8));
        let state = if e.reason == EndReason::Closed || (ck.proto == 6 && flags & (TCP_FIN | TCP_RST) != 0) {
            "closed"
        } else if down.packets > 0 {
            "established"
        } else {
            "new"
        };
        let app = [Some(cr), server]
            .into_iter()
            .flatten()
            .map(|r| App::from_u8(r.app))
            .find(|a| *a != App::Unknown);
        let reason = match e.reason {
            // Suricata's word for a flow that ended after its close.
            EndReason::Timeout | EndReason::Closed => "timeout",
            EndReason::Active => "active_timeout",
            EndReason::Shutdown => "shutdown",
        };
        let time = |out: &mut String, ns: u64| {
            out.push('"');
            write_suricata_time(out, anchor.wall(ns));
            out.push('"');
        };
        out.push_str("{\"timestamp\":");
        time(out, start);
        let _ = write!(out, ",\"flow_id\":{},\"in_iface\":", flow_id(src, dst, ck.proto, ck.sport, ck.dport));
        push_json_str(out, &ifname(ck.ifindex));
        out.push_str(",\"event_type\":\"flow\"");
        if ck.vlan != 0 {
            let _ = write!(out, ",\"vlan\":[{}]", ck.vlan);
        }
        let _ = write!(out, ",\"src_ip\":\"{src}\"");
        let ported = matches!(ck.proto, 6 | 17 | 132);
        if ported {
            let _ = write!(out, ",\"src_port\":{}", ck.sport);
        }
        let _ = write!(out, ",\"dest_ip\":\"{dst}\"");
        if ported {
            let _ = write!(out, ",\"dest_port\":{}", ck.dport);
        }
        out.push_str(",\"proto\":");
        push_json_str(out, &eve_proto(ck.proto));
        if matches!(ck.proto, 1 | 58) {
            let _ = write!(out, ",\"icmp_type\":{},\"icmp_code\":{}", ck.sport, ck.dport);
        }
        if let Some(a) = app {
            out.push_str(",\"app_proto\":");
            push_json_str(out, a.name());
        }
        let _ = write!(
            out,
            ",\"community_id\":\"{}\",\"host\":",
            community_id(self.seed, src, dst, ck.proto, ck.sport, ck.dport)
        );
        push_json_str(out, &self.host);
        let _ = write!(
            out,
            ",\"flow\":{{\"pkts_toserver\":{},\"pkts_toclient\":{},\"bytes_toserver\":{},\"bytes_toclient\":{},\"start\":",
            up.packets, down.packets, up.bytes, down.bytes
        );
        time(out, start);
        out.push_str(",\"end\":");
        time(out, end);
        let _ = write!(
            out,
            ",\"age\":{},\"state\":\"{state}\",\"reason\":\"{reason}\",\"alerted\":{},\"action\":\"{}\"}}",
            end.saturating_sub(start) / 1_000_000_000,
            has(Verdict::Drop) || has(Verdict::WouldDrop),
            if has(Verdict::Drop) { "drop" } else { "pass" },
        );
        if ck.proto == 6 {
            let ts = cr.tcp_flags;
            let tc = server.map_or(0, |r| r.tcp_flags);
            let _ = write!(
                out,
                ",\"tcp\":{{\"tcp_flags\":\"{flags:02x}\",\"tcp_flags_ts\":\"{ts:02x}\",\"tcp_flags_tc\":\"{tc:02x}\",\
                 \"syn\":{},\"fin\":{},\"rst\":{},\"psh\":{},\"ack\":{}}}",
                flags & TCP_SYN != 0,
                flags & TCP_FIN != 0,
                flags & TCP_RST != 0,
                flags & TCP_PSH != 0,
                flags & TCP_ACK != 0,
            );
        }
        out.push('}');
    }
}

/// `s` as a JSON string (quoted, escaped) appended to `out`.
fn push_json_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `t` as Suricata writes times, to the microsecond: `2026-12-01T08:20:09.089123+0000`.
fn write_suricata_time(out: &mut String, t: std::time::SystemTime) {
    use std::fmt::Write;
    let (y, mo, d, h, mi, sec, us) = crate::base::clock::utc(t);
    let _ = write!(out, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}.{us:06}+0000");
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

/// The generator id of every mdsec signature (Suricata's own rules use 1).
pub const GID: u32 = 1;

/// Signature ids of detections, by event type: fixed, never reused.
const DETECTION_SIDS: &[(&str, u32)] = &[
    ("new_device", 9_000_101),
    ("rogue_device", 9_000_102),
    ("east_west", 9_000_103),
    ("external_dns", 9_000_104),
    ("scan", 9_000_105),
    ("remote_access", 9_000_106),
    ("new_destination", 9_000_107),
    ("new_port", 9_000_108),
    ("new_app", 9_000_109),
    ("decommissioned_device", 9_000_110),
    ("first_contact", 9_000_111),
    ("incident", 9_000_112),
    ("rogue_dhcp_server", 9_000_113),
    ("rogue_router_advertisement", 9_000_114),
    ("arp_spoofing", 9_000_115),
    ("duplicate_ip", 9_000_116),
    ("maintenance_window_open", 9_000_117),
    ("maintenance_window_close", 9_000_118),
    ("exception_open", 9_000_119),
    ("exception_close", 9_000_120),
    ("quarantine", 9_000_121),
    ("quarantine_lifted", 9_000_122),
    ("gratuitous_arp_flood", 9_000_123),
];

/// Policy signatures: 9,100,000 + a 20-bit hash of (segment, rule).
const POLICY_SID_BASE: u32 = 9_100_000;

pub fn signature_id(e: &Event) -> u32 {
    if let Some((_, sid)) = DETECTION_SIDS.iter().find(|(k, _)| *k == e.kind) {
        return *sid;
    }
    if e.kind.starts_with("policy_") {
        let rule = if e.rule.is_empty() { "default" } else { &e.rule };
        return POLICY_SID_BASE + (fnv1a(format!("{}\0{rule}", e.segment).as_bytes()) & 0xf_ffff) as u32;
    }
    9_000_100
}

fn signature(e: &Event) -> String {
    let what = match e.kind.as_str() {
        "policy_drop" => "blocked by policy",
        "policy_would_drop" => "would be blocked by policy (monitor mode)",
        "incident" => return format!("mdsec incident {} {}: {}", e.incident, e.reason, e.evidence),
        other => return format!("mdsec {}: {}", other.replace('_', " "), e.reason),
    };
    let app = if e.app.is_empty() { String::new() } else { format!(" ({})", e.app) };
    let seg = if e.segment.is_empty() { String::new() } else { format!(" of segment {}", e.segment) };
    let why =
        if e.reason == "app_mismatch" { "the app does not match the rule" } else { "no rule allows it" };
    format!("mdsec {} {}/{}{app} {what}{seg}: {why}", e.dst, e.proto, e.dport)
}

/// Suricata classification names (classification.config), so SIEM dashboards
/// that group by category place mdsec's alerts with their peers.
fn category(kind: &str) -> &'static str {
    match kind {
        "policy_drop" | "policy_would_drop" => "Potential Corporate Privacy Violation",
        "scan" => "Detection of a Network Scan",
        "remote_access"
        | "east_west"
        | "external_dns"
        | "rogue_device"
        | "first_contact"
        | "rogue_dhcp_server"
        | "rogue_router_advertisement"
        | "arp_spoofing"
        | "gratuitous_arp_flood"
        | "duplicate_ip"
        | "incident" => "Potentially Bad Traffic",
        "new_device" | "new_destination" | "new_port" | "new_app" => "Misc activity",
        _ => "Not Suspicious Traffic",
    }
}

/// 1 (highest) – 3 from the clinical impact; without one, from mdsec's severity.
fn severity(impact: &str, sev: &str) -> u8 {
    match impact {
        "life-critical" => 1,
        "high" => 2,
        "moderate" | "low" => 3,
        _ => match sev {
            "critical" | "high" => 1,
            "medium" => 2,
            _ => 3,
        },
    }
}

/// EVE's protocol names.
fn eve_proto(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        1 => "ICMP".into(),
        58 => "IPv6-ICMP".into(),
        132 => "SCTP".into(),
        other => other.to_string(),
    }
}

/// `2026-12-01T08:20:09.089Z` (the native events' time) as Suricata writes it:
/// `2026-12-01T08:20:09.089000+0000`.
pub fn suricata_time(rfc3339: &str) -> String {
    let t = rfc3339.trim_end_matches('Z');
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let mut us: String = frac.chars().filter(|c| c.is_ascii_digit()).take(6).collect();
    while us.len() < 6 {
        us.push('0');
    }
    format!("{whole}.{us}+0000")
}

/// Community ID v1 (corelight/community-id-spec): SHA-1 over seed, the two
/// endpoints in order (smaller address, then port, first), protocol and ports,
/// base64. For ICMP the ports are type and code, or type and the counterpart
/// type for request/reply pairs (which makes the two directions equal).
pub fn community_id(seed: u16, src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> String {
    let ((a, ap), (b, bp)) = ordered(src, dst, proto, sport, dport);
    let mut buf = Vec::with_capacity(40);
    buf.extend_from_slice(&seed.to_be_bytes());
    push_ip(&mut buf, a);
    push_ip(&mut buf, b);
    buf.extend_from_slice(&[proto, 0]);
    if matches!(proto, 1 | 6 | 17 | 58 | 132) {
        buf.extend_from_slice(&ap.to_be_bytes());
        buf.extend_from_slice(&bp.to_be_bytes());
    }
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &buf);
    use base64::Engine;
    format!("1:{}", base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

/// The conversation's two endpoints in Community ID order, ports mapped for ICMP.
fn ordered(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> ((IpAddr, u16), (IpAddr, u16)) {
    let (sp, dp, one_way) = match proto {
        1 | 58 => match icmp_counterpart(proto, sport as u8) {
            Some(t) => (sport, t as u16, false),
            None => (sport, dport, true),
        },
        _ => (sport, dport, false),
    };
    let key = |ip: IpAddr| match ip {
        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
        IpAddr::V6(v) => v.octets(),
    };
    if one_way || (key(src), sp) <= (key(dst), dp) { ((src, sp), (dst, dp)) } else { ((dst, dp), (src, sp)) }
}

/// The reply type of an ICMP request type and vice versa.
fn icmp_counterpart(proto: u8, t: u8) -> Option<u8> {
    let pairs: &[(u8, u8)] = if proto == 1 {
        &[(8, 0), (13, 14), (15, 16), (10, 9), (17, 18)]
    } else {
        &[(128, 129), (133, 134), (135, 136), (130, 131), (144, 145)]
    };
    pairs.iter().find_map(|&(q, r)| {
        if q == t {
            Some(r)
        } else if r == t {
            Some(q)
        } else {
            None
        }
    })
}

fn push_ip(buf: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v) => buf.extend_from_slice(&v.octets()),
        IpAddr::V6(v) => buf.extend_from_slice(&v.octets()),
    }
}

/// The conversation's id: both directions give the same one (endpoints in
/// Community ID order), on every interface and VLAN (a routed conversation
/// arrives on two), positive as a JSON integer (63 bits).
pub fn flow_id(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> u64 {
    let ((a, ap), (b, bp)) = ordered(src, dst, proto, sport, dport);
    let mut buf = Vec::with_capacity(40);
    push_ip(&mut buf, a);
    push_ip(&mut buf, b);
    buf.push(proto);
    buf.extend_from_slice(&ap.to_be_bytes());
    buf.extend_from_slice(&bp.to_be_bytes());
    fnv1a(&buf) & (u64::MAX >> 1)
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// What Suricata's EVE schema (`etc/schema.json`, which sets
/// `additionalProperties: false` at each of these levels) allows where mdsec
/// writes. `in_iface` and `host` are what Suricata itself writes in live
/// capture (`host` with `sensor-name`); the schema copies seen while writing
/// this lack them. The tests hold every record mdsec writes against these.
pub mod schema {
    use serde_json::Value;

    pub const TOP: &[&str] = &[
        "timestamp",
        "flow_id",
        "in_iface",
        "event_type",
        "vlan",
        "src_ip",
        "src_port",
        "dest_ip",
        "dest_port",
        "proto",
        "icmp_type",
        "icmp_code",
        "app_proto",
        "community_id",
        "host",
    ];
    pub const ALERT: &[&str] = &[
        "action",
        "gid",
        "signature_id",
        "rev",
        "signature",
        "category",
        "severity",
        "metadata",
        "rule",
        "xff",
        "source",
        "target",
    ];
    pub const METADATA: &[&str] = &[
        "affected_product",
        "attack_target",
        "created_at",
        "deployment",
        "former_category",
        "malware_family",
        "policy",
        "signature_severity",
        "tag",
        "updated_at",
    ];

    /// `flow{}` (Suricata's `flow` object).
    pub const FLOW: &[&str] = &[
        "action",
        "age",
        "alerted",
        "bypass",
        "bypassed",
        "bytes_toclient",
        "bytes_toserver",
        "dest_ip",
        "dest_port",
        "end",
        "pkts_toclient",
        "pkts_toserver",
        "reason",
        "src_ip",
        "src_port",
        "start",
        "state",
    ];
    /// `tcp{}`.
    pub const TCP: &[&str] = &[
        "ack",
        "cwr",
        "ecn",
        "fin",
        "psh",
        "rst",
        "state",
        "syn",
        "tcp_flags",
        "tcp_flags_tc",
        "tcp_flags_ts",
        "urg",
    ];

    /// Every key or type of a flow record the schema would refuse.
    pub fn flow_violations(v: &Value) -> Vec<String> {
        let mut bad = envelope_violations(v, &["flow", "tcp"]);
        let Some(f) = v.get("flow").and_then(Value::as_object) else {
            bad.push("no `flow` object".into());
            return bad;
        };
        for k in f.keys().filter(|k| !FLOW.contains(&k.as_str())) {
            bad.push(format!("`flow.{k}`"));
        }
        for k in ["pkts_toserver", "pkts_toclient", "bytes_toserver", "bytes_toclient", "age"] {
            if !f.get(k).is_some_and(Value::is_u64) {
                bad.push(format!("`flow.{k}` missing or not an integer"));
            }
        }
        for k in ["start", "end"] {
            if !f.get(k).and_then(Value::as_str).is_some_and(timestamp_ok) {
                bad.push(format!("`flow.{k}` not a timestamp"));
            }
        }
        if !f.get("alerted").is_some_and(Value::is_boolean) {
            bad.push("`flow.alerted` missing or not a boolean".into());
        }
        if let Some(t) = v.get("tcp").and_then(Value::as_object) {
            for k in t.keys().filter(|k| !TCP.contains(&k.as_str())) {
                bad.push(format!("`tcp.{k}`"));
            }
        }
        bad
    }

    /// Every key or type of an alert record the schema would refuse.
    pub fn alert_violations(v: &Value) -> Vec<String> {
        let mut bad = envelope_violations(v, &["alert"]);
        let Some(a) = v.get("alert").and_then(Value::as_object) else {
            bad.push("no `alert` object".into());
            return bad;
        };
        for k in a.keys().filter(|k| !ALERT.contains(&k.as_str())) {
            bad.push(format!("`alert.{k}`"));
        }
        for k in ["gid", "signature_id", "rev", "severity"] {
            if !a.get(k).is_some_and(Value::is_u64) {
                bad.push(format!("`alert.{k}` missing or not an integer"));
            }
        }
        if let Some(m) = a.get("metadata").and_then(Value::as_object) {
            for (k, v) in m {
                if !METADATA.contains(&k.as_str()) {
                    bad.push(format!("`alert.metadata.{k}`"));
                }
                if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    bad.push(format!("`alert.metadata.{k}` not an array of strings"));
                }
            }
        }
        bad
    }

    /// The top level: known keys (`objects` are the ones this event type may
    /// carry), types, the timestamp's pattern.
    fn envelope_violations(v: &Value, objects: &[&str]) -> Vec<String> {
        let mut bad = Vec::new();
        let Some(o) = v.as_object() else { return vec!["not an object".into()] };
        for k in o.keys().filter(|k| {
            let k = k.as_str();
            !TOP.contains(&k) && !objects.contains(&k)
        }) {
            bad.push(format!("top-level `{k}`"));
        }
        for k in ["timestamp", "event_type"] {
            if !o.get(k).is_some_and(Value::is_string) {
                bad.push(format!("`{k}` missing or not a string"));
            }
        }
        let ts = o.get("timestamp").and_then(Value::as_str).unwrap_or("");
        if !timestamp_ok(ts) {
            bad.push(format!("timestamp `{ts}`"));
        }
        for k in ["flow_id", "src_port", "dest_port", "icmp_type", "icmp_code"] {
            if o.get(k).is_some_and(|x| !x.is_u64()) {
                bad.push(format!("`{k}` not an integer"));
            }
        }
        if o.get("vlan").is_some_and(|x| !x.as_array().is_some_and(|a| a.iter().all(Value::is_number))) {
            bad.push("`vlan` not an array of numbers".into());
        }
        bad
    }

    /// The schema's pattern `^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+[+\-]\d+$`.
    fn timestamp_ok(t: &str) -> bool {
        let b = t.as_bytes();
        let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
        if b.len() < 22 || !digits(0..4) || !digits(5..7) || !digits(8..10) || !digits(11..13) {
            return false;
        }
        if (b[4], b[7], b[10], b[13], b[16], b[19]) != (b'-', b'-', b'T', b':', b':', b'.') {
            return false;
        }
        if !digits(14..16) || !digits(17..19) {
            return false;
        }
        let rest = &t[20..];
        let Some(sign) = rest.find(['+', '-']) else { return false };
        sign > 0
            && rest[..sign].bytes().all(|c| c.is_ascii_digit())
            && rest.len() > sign + 1
            && rest[sign + 1..].bytes().all(|c| c.is_ascii_digit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Vectors computed with pycommunityid (PyPI `communityid` 1.5), the
    /// spec's reference implementation; the first is the spec's own example.
    #[test]
    fn community_ids_match_the_reference_implementation() {
        let cases = [
            (
                "128.232.110.120",
                "66.35.250.204",
                6,
                34855,
                80,
                "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
                "1:uZNg8EfF5M99KLdQ6q/AIpt8Pyg=",
            ),
            (
                "66.35.250.204",
                "128.232.110.120",
                6,
                80,
                34855,
                "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
                "1:uZNg8EfF5M99KLdQ6q/AIpt8Pyg=",
            ),
            (
                "fd00::1",
                "fd00::200:2",
                17,
                40000,
                2575,
                "1:LlkP31qiWlfWI49M1/ox36TKdlM=",
                "1:g5xtBA2Wrqeg/MdI6TLDcztqhws=",
            ),
            (
                "10.0.0.1",
                "10.0.0.2",
                1,
                8,
                0,
                "1:YcMyyWJfhc95EW1GfXt6jlZ3DiQ=",
                "1:XaByqrxEauBB/9sSqRdTbwx3Lbw=",
            ),
            (
                "10.0.0.2",
                "10.0.0.1",
                1,
                0,
                0,
                "1:YcMyyWJfhc95EW1GfXt6jlZ3DiQ=",
                "1:XaByqrxEauBB/9sSqRdTbwx3Lbw=",
            ),
            (
                "10.0.0.2",
                "10.0.0.1",
                1,
                3,
                1,
                "1:JHjlyD5IJJjl3wHWOMj46lLWZag=",
                "1:XJb4A3pvCpWfsdnvnOV5yY7Ish0=",
            ),
            (
                "fd00::1",
                "fd00::2",
                58,
                128,
                0,
                "1:cHVm51rRL0MQihNiyq5ZLwFkyko=",
                "1:8in3YBEvVV0/JdHcO/Du3hQALr0=",
            ),
        ];
        for (s, d, p, sp, dp, seed0, seed7) in cases {
            assert_eq!(community_id(0, ip(s), ip(d), p, sp, dp), seed0, "{s} {d} {p}");
            assert_eq!(community_id(7, ip(s), ip(d), p, sp, dp), seed7, "{s} {d} {p} seed 7");
        }
    }

    #[test]
    fn every_event_type_has_a_signature() {
        for t in crate::base::event::EVENT_TYPES {
            assert!(
                t.starts_with("policy_") || DETECTION_SIDS.iter().any(|(k, _)| k == t),
                "{t} has no signature id"
            );
        }
    }

    #[test]
    fn flow_ids_are_per_conversation_and_positive() {
        let a = flow_id(ip("10.0.0.1"), ip("10.0.0.2"), 6, 40000, 2575);
        assert_eq!(a, flow_id(ip("10.0.0.2"), ip("10.0.0.1"), 6, 2575, 40000));
        assert_ne!(a, flow_id(ip("10.0.0.1"), ip("10.0.0.2"), 17, 40000, 2575));
        assert_ne!(a, flow_id(ip("10.0.0.1"), ip("10.0.0.2"), 6, 40001, 2575));
        assert_ne!(a, flow_id(ip("10.0.0.1"), ip("10.0.0.3"), 6, 40000, 2575));
        assert!(a <= i64::MAX as u64);
    }

    #[test]
    fn an_ended_conversation_becomes_one_schema_valid_flow_record_client_to_server() {
        use mdsec_common::flow::{FlowKey, FlowValue};
        let v4 = |b: u8| {
            let mut a = [0u8; 16];
            (a[10], a[11], a[15]) = (0xff, 0xff, b);
            a
        };
        let k = |ifindex, src, dst, sport, dport| FlowKey {
            ifindex,
            vlan: 110,
            proto: 6,
            _pad: 0,
            src: v4(src),
            dst: v4(dst),
            sport,
            dport,
        };
        let (c, srv) = (k(2, 5, 9, 40000, 2575), k(3, 9, 5, 2575, 40000));
        let val = |packets, bytes, first, flags| FlowValue {
            packets,
            bytes,
            first_seen_ns: first,
            last_seen_ns: first + 4_000_000_000,
            tcp_flags: mdsec_common::flow::first_tcp_flags(flags) | 0x11,
            verdict: Verdict::Allow as u8,
            app: App::Hl7 as u8,
            app_done: 1,
            ..Default::default()
        };
        let mut t = crate::datapath::state::Tables::default();
        t.merge(&[(c, val(7, 700, 1_000, 0x02)), (srv, val(5, 900, 2_000, 0x12))], &[]);
        assert!(t.forget_flow(&c, EndReason::Timeout).is_none());
        let e = t.forget_flow(&srv, EndReason::Timeout).unwrap();
        let eve = Eve { host: "gw".into(), seed: 0, metadata: MetadataStyle::Strict };
        let names = |i: u32| format!("if{i}");
        let f = eve.flow(&e, &names, &Anchor::now());
        assert_eq!(schema::flow_violations(&f), Vec::<String>::new(), "{f}");
        assert_eq!(f["event_type"], "flow");
        assert_eq!((f["src_ip"].as_str(), f["dest_port"].as_u64()), (Some("0.0.0.5"), Some(2575)));
        assert_eq!(f["in_iface"], "if2");
        assert_eq!(f["vlan"], json!([110]));
        assert_eq!(f["app_proto"], "hl7");
        let fl = &f["flow"];
        assert_eq!((fl["pkts_toserver"].as_u64(), fl["bytes_toserver"].as_u64()), (Some(7), Some(700)));
        assert_eq!((fl["pkts_toclient"].as_u64(), fl["bytes_toclient"].as_u64()), (Some(5), Some(900)));
        assert_eq!((fl["reason"].as_str(), fl["state"].as_str()), (Some("timeout"), Some("closed")));
        assert_eq!((fl["alerted"].as_bool(), fl["action"].as_str()), (Some(false), Some("pass")));
        assert_eq!(fl["age"], 4);
        assert_eq!(f["tcp"]["syn"], true);
        // The alert of the same conversation carries the same flow_id.
        let (s, d) = ("0.0.0.5".parse().unwrap(), "0.0.0.9".parse().unwrap());
        assert_eq!(f["flow_id"], flow_id(d, s, 6, 2575, 40000));
        // An alert in a flow record is refused, and the check says so.
        let mut bad = f.clone();
        bad["alert"] = json!({});
        bad["flow"]["segment"] = json!("pumps");
        assert_eq!(schema::flow_violations(&bad).len(), 2);
    }

    #[test]
    fn times_take_suricatas_form() {
        assert_eq!(suricata_time("2026-12-01T08:20:09.089Z"), "2026-12-01T08:20:09.089000+0000");
        assert_eq!(suricata_time("2026-12-01T08:20:09Z"), "2026-12-01T08:20:09.000000+0000");
    }

    fn drop_event() -> Event {
        Event {
            version: 1,
            seq: 7,
            kind: "policy_drop".into(),
            severity: "high".into(),
            time: "2026-12-01T08:20:09.089Z".into(),
            iface: "ward".into(),
            vlan: 110,
            src: "10.20.0.5".into(),
            dst: "10.30.0.9".into(),
            proto: "tcp".into(),
            sport: 40000,
            dport: 2575,
            segment: "pumps".into(),
            rule: "pumps.yaml:12:7".into(),
            rule_id: 3,
            reason: "app_mismatch".into(),
            app: "http".into(),
            app_confidence: "high".into(),
            function: "infusion-pump".into(),
            clinical_impact: "life-critical".into(),
            escalation: "biomed on call".into(),
            vendor: Some("Baxter".into()),
            ..Default::default()
        }
    }

    fn keys(v: &Value) -> Vec<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn a_drop_becomes_a_schema_valid_alert() {
        let eve = Eve { host: "gw-3".into(), seed: 0, metadata: MetadataStyle::Strict };
        let a = eve.alert(&drop_event());
        assert_eq!(schema::alert_violations(&a), Vec::<String>::new());
        assert!(keys(&a["alert"]["metadata"]).contains(&"tag".to_string()));
        assert_eq!(a["timestamp"], "2026-12-01T08:20:09.089000+0000");
        assert_eq!(a["event_type"], "alert");
        assert_eq!(a["in_iface"], "ward");
        assert_eq!(a["vlan"], json!([110]));
        assert_eq!((a["src_port"].as_u64(), a["dest_port"].as_u64()), (Some(40000), Some(2575)));
        assert_eq!(a["proto"], "TCP");
        assert_eq!(a["app_proto"], "http");
        assert_eq!(a["host"], "gw-3");
        assert_eq!(
            a["community_id"],
            community_id(0, ip("10.20.0.5"), ip("10.30.0.9"), 6, 40000, 2575).as_str()
        );
        let al = &a["alert"];
        assert_eq!(al["action"], "blocked");
        assert_eq!(al["severity"], 1, "life-critical");
        assert_eq!(al["category"], "Potential Corporate Privacy Violation");
        let tags: Vec<&str> =
            al["metadata"]["tag"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        for t in [
            "segment:pumps",
            "rule:pumps.yaml:12:7",
            "mode:enforce",
            "function:infusion-pump",
            "clinical_impact:life-critical",
            "escalation:biomed on call",
            "vendor:Baxter",
            "would_drop:false",
        ] {
            assert!(tags.contains(&t), "{t} in {tags:?}");
        }
        // Stable per (segment, rule), distinct across rules.
        let mut other = drop_event();
        assert_eq!(signature_id(&other), al["signature_id"].as_u64().unwrap() as u32);
        other.rule = "pumps.yaml:20:7".into();
        assert_ne!(signature_id(&other), al["signature_id"].as_u64().unwrap() as u32);
    }

    #[test]
    fn would_drops_and_detections_are_allowed_alerts_with_fixed_signatures() {
        let eve = Eve { host: "gw".into(), seed: 0, metadata: MetadataStyle::Named };
        let mut e = drop_event();
        e.kind = "policy_would_drop".into();
        let a = eve.alert(&e);
        // Named metadata is what a strict validator refuses, and the check says so.
        assert!(schema::alert_violations(&a).iter().any(|v| v == "`alert.metadata.segment`"));
        assert_eq!(a["alert"]["action"], "allowed");
        assert_eq!(a["alert"]["metadata"]["mode"], json!(["monitor"]));
        assert_eq!(a["alert"]["metadata"]["would_drop"], json!(["true"]));
        let scan = Event {
            kind: "scan".into(),
            severity: "high".into(),
            time: "2026-12-01T08:20:09.089Z".into(),
            src: "10.9.9.9".into(),
            dst: "10.20.0.0".into(),
            proto: "icmp".into(),
            sport: 8,
            reason: "ICMP sweep of 14 addresses in 10 s".into(),
            ..Default::default()
        };
        let s = eve.alert(&scan);
        let strict = Eve { metadata: MetadataStyle::Strict, ..eve.clone() };
        assert_eq!(schema::alert_violations(&strict.alert(&scan)), Vec::<String>::new());
        assert_eq!(s["alert"]["signature_id"], 9_000_105);
        assert_eq!(s["alert"]["action"], "allowed");
        assert_eq!(s["alert"]["category"], "Detection of a Network Scan");
        assert_eq!(s["proto"], "ICMP");
        assert_eq!((s["icmp_type"].as_u64(), s.get("src_port")), (Some(8), None));
        assert!(s["alert"]["signature"].as_str().unwrap().contains("ICMP sweep"));
        // A device event without addresses has no flow fields.
        let dev = Event { kind: "new_device".into(), time: scan.time.clone(), ..Default::default() };
        let d = eve.alert(&dev);
        assert!(d.get("flow_id").is_none() && d.get("src_ip").is_none());
        assert_eq!(d["alert"]["signature_id"], 9_000_101);
    }
}

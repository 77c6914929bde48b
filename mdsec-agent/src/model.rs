//! JSON shapes of the HTTP API, shared by the server, the CLI and the tests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Flow {
    pub iface: String,
    pub vlan: u16,
    pub src: String,
    pub dst: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number for others.
    pub proto: String,
    pub proto_num: u8,
    /// For ICMP/ICMPv6: the type.
    pub sport: u16,
    /// For ICMP/ICMPv6: the code.
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub tcp_flags: Vec<String>,
    /// Policy verdict: none (no policy), unevaluated, exempt, allow, reply,
    /// app_pending, would_drop, drop.
    pub verdict: String,
    /// `file:line:col` of the rule that decided, or `default`.
    pub rule: String,
    /// Segment whose default denied the flow, if any.
    pub segment: String,
    /// Application from the first payload (`unknown` until one is seen).
    pub app: String,
    /// `high` (payload signature), `low` (well-known port only) or `none`.
    pub app_confidence: String,
}

/// Version of the event JSON (`version` in every event). Fields may be added
/// within a version; it increases when a field is renamed, removed or changes meaning.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// Every event `type` the agent emits (metrics start each at zero).
pub const EVENT_TYPES: &[&str] = &[
    "policy_drop",
    "policy_would_drop",
    "new_device",
    "rogue_device",
    "east_west",
    "external_dns",
    "scan",
    "remote_access",
    "new_destination",
    "new_port",
    "new_app",
    "decommissioned_device",
];

/// The event type a policy verdict raises: only denials do.
pub fn verdict_event(v: mdsec_common::policy::Verdict) -> Option<&'static str> {
    use mdsec_common::policy::Verdict;
    match v {
        Verdict::Drop => Some("policy_drop"),
        Verdict::WouldDrop => Some("policy_would_drop"),
        _ => None,
    }
}

/// An event: `GET /api/v1/events`, the JSON-lines log and syslog carry the same
/// object. Documented field by field in docs/OPERATIONS.md.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Event {
    /// [`EVENT_SCHEMA_VERSION`].
    pub version: u32,
    /// Increases by one per event; `?since=SEQ` returns later ones.
    pub seq: u64,
    /// `policy_drop`, `policy_would_drop`, `new_device`, `rogue_device`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `critical`, `high`, `medium`, `low` or `info`.
    pub severity: String,
    pub time: String,
    pub iface: String,
    pub vlan: u16,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub sport: u16,
    pub dport: u16,
    /// The segment that decided.
    pub segment: String,
    /// `file:line:col` of the rule, or `default` for the segment's default verdict.
    pub rule: String,
    pub rule_id: u32,
    /// `default_deny` or `app_mismatch` for policy events; a sentence otherwise.
    pub reason: String,
    /// From the payload, or the port's service when the flow was denied before any
    /// payload (then `app_confidence` is `low`).
    pub app: String,
    /// `high` (payload signature), `low` (port only) or `none`.
    #[serde(default)]
    pub app_confidence: String,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    pub generation: u32,
    /// Device events (`new_device`, `rogue_device`): the device's MAC and vendor.
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub vendor: Option<String>,
    /// Clinical function of the segment (or device) involved, e.g. `infusion-pump`.
    #[serde(default)]
    pub function: String,
    /// From the triage matrix: `life-critical`, `high`, `moderate` or `low`.
    #[serde(default)]
    pub clinical_impact: String,
    /// From the triage matrix: who is told.
    #[serde(default)]
    pub escalation: String,
    /// Detections: what was observed (counts, window, peers).
    #[serde(default)]
    pub evidence: String,
}

/// Every published JSON Schema (`deploy/schema/`): the policy files and events.
pub fn schemas() -> Vec<(&'static str, String)> {
    let mut all = crate::policy::model::schemas();
    let s = schemars::schema_for!(Event);
    all.push(("event.schema.json", serde_json::to_string_pretty(&s).unwrap() + "\n"));
    all.push(("register.schema.json", crate::register::schema()));
    all.push(("report.schema.json", crate::report::schema()));
    all
}

impl Event {
    /// RFC 5424 severity (0 emergency … 7 debug) of the event's severity.
    pub fn syslog_severity(&self) -> u8 {
        match self.severity.as_str() {
            "critical" => 2,
            "high" => 3,
            "medium" => 4,
            "low" => 5,
            _ => 6,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Device {
    pub iface: String,
    pub vlan: u16,
    pub mac: String,
    /// From the IEEE OUI registry; none for unknown and locally administered MACs.
    pub vendor: Option<String>,
    pub ips: Vec<String>,
    /// Apps this device spoke as a client / answered as a server (from its flows).
    pub apps_client: Vec<String>,
    pub apps_server: Vec<String>,
    /// Addresses it exchanged traffic with (at most 32).
    pub peers: Vec<String>,
    /// Clinical class (infusion-pump, patient-monitor, imaging-modality, pacs,
    /// clinical-workstation, server, network-infra, unknown).
    #[serde(default)]
    pub class: String,
    /// 0.0–1.0; 1.0 for an operator override.
    #[serde(default)]
    pub confidence: f32,
    /// The rules that decided the class.
    #[serde(default)]
    pub evidence: Vec<String>,
    /// Passive fingerprints: dhcp.hostname, dicom.calling_ae, hl7.sending_application,
    /// tls.sni, http.user_agent, ssh.banner, …
    #[serde(default)]
    pub fingerprints: std::collections::BTreeMap<String, String>,
    /// From an operator override.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// The segment whose members include it (declared MAC, else address), if any.
    #[serde(default)]
    pub segment: Option<String>,
    /// Lifecycle state: onboarding, active, exception or decommissioned.
    #[serde(default)]
    pub lifecycle: String,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// `GET /api/v1/stats`: datapath counters by reason name (see `mdsec_common::stats`).
pub type Stats = BTreeMap<String, Count>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub role: String,
    pub requested_mode: String,
    pub effective_mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
    }
}

pub fn tcp_flag_names(f: u8) -> Vec<String> {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    (0..8).filter(|b| f & (1 << b) != 0).map(|b| NAMES[b].to_string()).collect()
}

/// `aa:bb:cc:dd:ee:ff` (or `-` separated), exactly six two-digit hex groups.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in s.trim().split([':', '-']) {
        if n == 6 || part.len() != 2 {
            return None;
        }
        mac[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6).then_some(mac)
}

pub fn mac_string(m: [u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly_and_round_trip() {
        let m = parse_mac("58:46:E1:00:00:07").unwrap();
        assert_eq!(mac_string(m), "58:46:e1:00:00:07");
        assert_eq!(parse_mac("58-46-e1-00-00-07"), Some(m));
        for bad in [
            "",
            "58:46:e1:00:00",
            "58:46:e1:00:00:07:08",
            "58:46:zz:00:00:07",
            "5:46:e1:00:00:07",
            "58:46:e1::00:07",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}

//! The event record: one shape for policy events, detections and device
//! events, carried unchanged by the API, the native-format log and syslog sinks
//! and the state database (documented field by field in docs/OPERATIONS.md);
//! `surfaces::eve` turns it into a Suricata alert for `eve` sinks.

use serde::{Deserialize, Serialize};

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
    "first_contact",
    "rogue_dhcp_server",
    "rogue_router_advertisement",
    "arp_spoofing",
    "gratuitous_arp_flood",
    "duplicate_ip",
    "incident",
    "maintenance_window_open",
    "maintenance_window_close",
    "exception_open",
    "exception_close",
    "quarantine",
    "quarantine_lifted",
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
    /// Detections about a clinical server: its clinical zone (`detection.clinical_zones`).
    #[serde(default)]
    pub zone: String,
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
    /// The incident (`GET /api/v1/incidents`) this event belongs to; 0 for none.
    /// An `incident` event is that incident's notification.
    #[serde(default)]
    pub incident: u64,
    /// A novelty event its incident subsumed: kept and queryable, not sent
    /// to the sinks on its own.
    #[serde(default)]
    pub subsumed: bool,
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

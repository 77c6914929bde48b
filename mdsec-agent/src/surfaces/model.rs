//! JSON shapes of the HTTP API, shared by the server, the CLI and the tests.

pub use crate::{
    base::event::Event,
    detection::incident::{Incident, Target as IncidentTarget},
    inventory::doc::DeviceDoc as Device,
};

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
    /// The `bridges:` entry of a bridge port (role `bridge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// A bump port's other port: where XDP forwards the frames it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

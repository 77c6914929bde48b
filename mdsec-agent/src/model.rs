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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Device {
    pub iface: String,
    pub vlan: u16,
    pub mac: String,
    pub ips: Vec<String>,
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
    (0..8)
        .filter(|b| f & (1 << b) != 0)
        .map(|b| NAMES[b].to_string())
        .collect()
}

pub fn mac_string(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

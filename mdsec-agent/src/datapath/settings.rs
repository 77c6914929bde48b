//! The datapath's part of the agent config: the interfaces it attaches to and
//! the sizes of its maps.

use std::fmt;

use mdsec_common::maps;
use serde::{Deserialize, Serialize};

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

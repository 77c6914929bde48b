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
    /// A port of a transparent bridge (from `bridges:`, never from `interfaces:`).
    #[serde(skip_deserializing)]
    Bridge,
}

/// A transparent bridge: mdsec in front of a device group with no address of
/// its own (`bridges:` in the agent config).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    /// The operator's name for it (logs, the API, metrics).
    pub name: String,
    /// Two ports: a bump in the wire that forwards in XDP. More: the members
    /// of one Linux bridge, which forwards; XDP judges on each.
    pub ports: Vec<String>,
    pub xdp_mode: XdpMode,
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// What crosses the bridge when mdsec's XDP is not attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The ports are members of one Linux bridge, which carries every frame
    /// while XDP is detached: devices keep working, unpoliced.
    #[default]
    Open,
    /// The ports are in no Linux bridge: without XDP nothing crosses.
    Closed,
}

/// One interface the datapath attaches to, from `interfaces:` or a bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub role: Role,
    pub xdp_mode: XdpMode,
    /// The bump's other port: what this port's passed frames are redirected to.
    pub peer: Option<String>,
    /// The `bridges:` entry this port belongs to.
    pub bridge: Option<String>,
}

impl Port {
    /// Every port of the config: the interfaces, then each bridge's ports.
    pub fn all(interfaces: &[Interface], bridges: &[Bridge]) -> Vec<Port> {
        let mut v: Vec<Port> = interfaces
            .iter()
            .map(|i| Port {
                name: i.name.clone(),
                role: i.role,
                xdp_mode: i.xdp_mode,
                peer: None,
                bridge: None,
            })
            .collect();
        for b in bridges {
            let bump = b.ports.len() == 2;
            for (k, p) in b.ports.iter().enumerate() {
                v.push(Port {
                    name: p.clone(),
                    role: Role::Bridge,
                    xdp_mode: b.xdp_mode,
                    peer: bump.then(|| b.ports[1 - k].clone()),
                    bridge: Some(b.name.clone()),
                });
            }
        }
        v
    }
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

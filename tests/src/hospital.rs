//! The simulated hospital of `cargo xtask lab`: a gateway namespace with one
//! segment-facing veth per LAN, a switch namespace per LAN (a Linux bridge the
//! LAN's devices hang off), and one namespace per device with a MAC from its
//! real vendor's IEEE OUI (so vendor lookup and classification work as on a
//! ward). Dropping it deletes every namespace (killing what runs inside), also
//! on panic.
//!
//! The pumps' ward sits behind a bump in the wire instead of a routed mdsec
//! port: the gateway routes it through `seg-pumps` (no XDP: the hospital's
//! router leg), whose veth peer `bump-core` and the ward's `bump-ward` are the
//! two ports of a bridge mdsec judges (`bridges:` in the agent config). A pump's
//! traffic to another LAN crosses two mdsec points: the bump and the other
//! LAN's routed port; each counts its own crossing.

use std::net::Ipv4Addr;

use anyhow::Result;

use crate::netns::{ethtool, ip, link_mac};

/// LAN name, second octet of its 10.X.0.0/24.
pub const LANS: &[(&str, u8)] =
    &[("pumps", 10), ("monitors", 20), ("imaging", 30), ("servers", 40), ("clinical", 50), ("outside", 99)];

/// The LAN behind a bump in the wire, and the bump's two ports (in the
/// gateway namespace, members of the Linux bridge `br-pumps`).
pub const BUMPED: &str = "pumps";
pub const BUMP_WARD: &str = "bump-ward";
pub const BUMP_CORE: &str = "bump-core";

/// One device of the hospital.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub lan: &'static str,
    /// Last octet of its address.
    pub host: u8,
    pub mac: &'static str,
    /// The class the inventory should give it.
    pub class: &'static str,
}

/// Vendors (IEEE OUI): Baxter ×2 and CareFusion pumps, Mindray and Draeger
/// monitors, a Siemens Healthcare CT, Dell servers, locally administered MACs
/// for the attacker and the outside resolver.
pub const DEVICES: &[Spec] = &[
    Spec { name: "pump1", lan: "pumps", host: 11, mac: "58:46:e1:10:00:11", class: "infusion-pump" },
    Spec { name: "pump2", lan: "pumps", host: 12, mac: "58:42:e4:10:00:12", class: "infusion-pump" },
    Spec { name: "pump3", lan: "pumps", host: 13, mac: "f8:c6:78:10:00:13", class: "infusion-pump" },
    Spec { name: "monitor1", lan: "monitors", host: 11, mac: "00:a0:37:20:00:11", class: "patient-monitor" },
    Spec { name: "monitor2", lan: "monitors", host: 12, mac: "00:10:5d:20:00:12", class: "patient-monitor" },
    Spec { name: "ct1", lan: "imaging", host: 11, mac: "00:18:65:30:00:11", class: "imaging-modality" },
    Spec { name: "pacs", lan: "servers", host: 10, mac: "98:e7:43:40:00:10", class: "pacs" },
    Spec { name: "pharmacy", lan: "servers", host: 20, mac: "c8:f7:50:40:00:20", class: "server" },
    Spec { name: "emr", lan: "servers", host: 30, mac: "6c:2b:59:40:00:30", class: "server" },
    Spec { name: "dns", lan: "servers", host: 53, mac: "dc:f4:01:40:00:53", class: "network-infra" },
    Spec {
        name: "workstation",
        lan: "clinical",
        host: 10,
        mac: "4c:d9:8f:50:00:10",
        class: "clinical-workstation",
    },
    Spec { name: "attacker", lan: "clinical", host: 66, mac: "02:00:00:50:00:66", class: "unknown" },
    // Classified by what it is seen answering: DNS.
    Spec { name: "resolver", lan: "outside", host: 53, mac: "02:00:00:99:00:53", class: "network-infra" },
];

fn lan_octet(lan: &str) -> u8 {
    LANS.iter().find(|l| l.0 == lan).map(|l| l.1).expect("known LAN")
}

impl Spec {
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, lan_octet(self.lan), 0, self.host)
    }
}

pub struct Hospital {
    pub id: String,
    pub gw: String,
    namespaces: Vec<String>,
}

impl Hospital {
    /// Gateway interface of a LAN.
    pub fn gw_if(lan: &str) -> String {
        format!("seg-{lan}")
    }

    /// The routed ports mdsec attaches to (every LAN but the bumped one).
    pub fn gw_ifs() -> Vec<String> {
        LANS.iter().filter(|l| l.0 != BUMPED).map(|l| Self::gw_if(l.0)).collect()
    }

    /// The agent config's `bridges:` section: the bump in front of the pumps.
    pub fn bridges_yaml() -> String {
        format!(
            "bridges:\n  - name: {BUMPED}-ward\n    ports: [{BUMP_WARD}, {BUMP_CORE}]\n    xdp_mode: driver\n    on_failure: open\n"
        )
    }

    /// Namespace of a device.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    pub fn spec(name: &str) -> &'static Spec {
        DEVICES.iter().find(|d| d.name == name).expect("known device")
    }

    /// MAC of the gateway's interface on a LAN (for raw frames).
    pub fn gw_mac(&self, lan: &str) -> Result<[u8; 6]> {
        link_mac(&self.gw, &Self::gw_if(lan))
    }

    pub fn new(id: &str) -> Result<Hospital> {
        let gw = format!("{id}-gw");
        let mut h = Hospital { id: id.into(), gw: gw.clone(), namespaces: Vec::new() };
        h.add_ns(&gw)?;
        ip(&["-n", &gw, "link", "set", "lo", "up"])?;
        ip(&["netns", "exec", &gw, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for &(lan, octet) in LANS {
            let sw = format!("{id}-sw-{lan}");
            h.add_ns(&sw)?;
            ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", "br0", "up"])?;
            let gif = Self::gw_if(lan);
            if lan == BUMPED {
                h.bump(&gif, &sw)?;
            } else {
                ip(&[
                    "link", "add", "name", &gif, "netns", &gw, "type", "veth", "peer", "name", "uplink",
                    "netns", &sw,
                ])?;
            }
            ip(&["-n", &sw, "link", "set", "uplink", "master", "br0", "up"])?;
            ip(&["-n", &gw, "addr", "add", &format!("10.{octet}.0.1/24"), "dev", &gif])?;
            ip(&["-n", &gw, "link", "set", &gif, "up"])?;
            if lan == BUMPED {
                // The bump's two redirect targets, now that both are up.
                crate::netns::redirect_target(&gw, &gif)?;
                crate::netns::redirect_target(&sw, "uplink")?;
            }
        }
        for d in DEVICES {
            let ns = h.ns(d.name);
            h.add_ns(&ns)?;
            let sw = format!("{id}-sw-{}", d.lan);
            let port = format!("p{}", d.host);
            ip(&[
                "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
                &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            // Quiet devices: no router solicitations or DAD chatter.
            for k in ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.router_solicitations=0"] {
                ip(&["netns", "exec", &ns, "sysctl", "-qw", k])?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "address", d.mac])?;
            // A wire carries finished checksums; a veth leaves them to
            // "hardware", which an XDP redirect (the bump) does not carry along.
            ethtool(&ns, &["-K", "eth0", "tx", "off"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", d.ip()), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let via = format!("10.{}.0.1", lan_octet(d.lan));
            ip(&["-n", &ns, "route", "add", "default", "via", &via])?;
        }
        Ok(h)
    }

    /// `router` (the gateway's routed leg) ─ bump-core │br-pumps│ bump-ward ─ the
    /// ward switch's `uplink`. The bridge has no address and forwards at once
    /// (STP off) whenever mdsec's XDP is not attached (docs/BRIDGE.md).
    fn bump(&self, router: &str, sw: &str) -> Result<()> {
        let gw = &self.gw;
        ip(&["-n", gw, "link", "add", router, "type", "veth", "peer", "name", BUMP_CORE])?;
        ip(&[
            "link", "add", "name", BUMP_WARD, "netns", gw, "type", "veth", "peer", "name", "uplink", "netns",
            sw,
        ])?;
        // Silent: no IPv6 of its own, and no ARP answers for the gateway's
        // addresses from the bridge (the ward would learn the wrong MAC).
        crate::netns::carrier_bridge(gw, "br-pumps", &[BUMP_CORE, BUMP_WARD])?;
        // The router's own frames (DHCP replies) need finished checksums.
        ethtool(gw, &["-K", router, "tx", "off"])?;
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// Every device pings its gateway once, so neighbour entries exist before
    /// traffic is counted.
    pub fn warm_up(&self) -> Result<()> {
        for d in DEVICES {
            let via = format!("10.{}.0.1", lan_octet(d.lan));
            ip(&["netns", "exec", &self.ns(d.name), "ping", "-c", "1", "-W", "2", &via])?;
        }
        Ok(())
    }

    /// Leaves everything running (`--keep`): the namespaces outlive this process.
    pub fn keep(mut self) {
        self.namespaces.clear();
    }
}

impl Drop for Hospital {
    fn drop(&mut self) {
        crate::netns::delete_namespaces(&self.namespaces);
    }
}

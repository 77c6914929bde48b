//! A transparent bridge for tests: ward hosts | the bump (the gateway
//! namespace, ports `ward` and `core`) | core hosts, all in 10.20.0.0/24.
//!
//! A side with one host has it on the bump port's veth directly (nothing in
//! between eats link-local control frames); a side with more hangs them off a
//! switch namespace (a Linux bridge). Ward host `i` (from 1) is `10.20.0.1<i>`,
//! core host `i` is `10.20.0.2<i>`. IPv6 is off everywhere: the counts are the
//! test's own frames and ARP. Dropping it deletes every namespace.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

use anyhow::Result;

use crate::netns::{bind_in, delete_namespaces, ip, link_mac, unique_id};

pub const WARD_PORT: &str = "ward";
pub const CORE_PORT: &str = "core";
/// A third port, for a multi-port bridge (hosts `10.20.0.3<i>`).
pub const EXTRA_PORT: &str = "extra";
/// The Linux bridge under the bump (the fail-open carrier), when there is one.
pub const KERNEL_BRIDGE: &str = "br0";

pub struct End {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

impl End {
    pub fn udp(&self, port: u16) -> Result<UdpSocket> {
        let bind = SocketAddr::new(self.ip.into(), port);
        bind_in(&self.ns, move || UdpSocket::bind(bind))
    }
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip.into(), port)
    }
}

pub struct Bump {
    pub id: String,
    /// The gateway namespace: the bump's ports (and `br0` when asked for).
    pub gw: String,
    pub ward: Vec<End>,
    pub core: Vec<End>,
    pub extra: Vec<End>,
    namespaces: Vec<String>,
    /// (namespace, device) at the far end of each bump port's veth.
    peers: Vec<(String, String)>,
}

impl Drop for Bump {
    fn drop(&mut self) {
        delete_namespaces(&self.namespaces);
    }
}

fn sysctl(ns: &str, kv: &str) -> Result<()> {
    ip(&["netns", "exec", ns, "sysctl", "-qw", kv])?;
    Ok(())
}

impl Bump {
    /// `kernel_bridge`: enslave both ports to `br0` (STP off, 802.1X and LLDP
    /// forwarded, no address), as docs/BRIDGE.md sets a bridge up for
    /// `on_failure: open`.
    pub fn new(n_ward: u8, n_core: u8, kernel_bridge: bool) -> Result<Bump> {
        Self::with_extra(n_ward, n_core, 0, kernel_bridge)
    }

    /// Like [`Bump::new`], plus `n_extra` hosts on a third port `extra` (a
    /// Linux bridge of three members, not a bump).
    pub fn with_extra(n_ward: u8, n_core: u8, n_extra: u8, kernel_bridge: bool) -> Result<Bump> {
        let id = unique_id();
        let gw = format!("{id}-gw");
        let mut b = Bump {
            id: id.clone(),
            gw: gw.clone(),
            ward: Vec::new(),
            core: Vec::new(),
            extra: Vec::new(),
            namespaces: Vec::new(),
            peers: Vec::new(),
        };
        b.add_ns(&gw)?;
        b.ward = b.side("w", WARD_PORT, n_ward, 10)?;
        b.core = b.side("c", CORE_PORT, n_core, 20)?;
        let mut ports = vec![WARD_PORT, CORE_PORT];
        if n_extra > 0 {
            b.extra = b.side("x", EXTRA_PORT, n_extra, 30)?;
            ports.push(EXTRA_PORT);
        }
        if kernel_bridge {
            crate::netns::carrier_bridge(&gw, KERNEL_BRIDGE, &ports)?;
        }
        for p in &ports {
            ip(&["-n", &gw, "link", "set", p, "up"])?;
        }
        for (ns, dev) in &b.peers {
            crate::netns::redirect_target(ns, dev)?;
        }
        Ok(b)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        // Before any device exists, so every new one takes it.
        for k in ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"] {
            sysctl(name, k)?;
        }
        Ok(())
    }

    fn side(&mut self, tag: &str, port: &str, n: u8, base: u8) -> Result<Vec<End>> {
        let mut ends = Vec::new();
        // The namespace and device the bump port's veth ends in.
        let (peer_ns, peer_dev) = if n == 1 {
            (format!("{}-{tag}1", self.id), "eth0".to_string())
        } else {
            (format!("{}-{tag}sw", self.id), "uplink".to_string())
        };
        self.add_ns(&peer_ns)?;
        self.peers.push((peer_ns.clone(), peer_dev.clone()));
        ip(&[
            "link", "add", "name", port, "netns", &self.gw, "type", "veth", "peer", "name", &peer_dev,
            "netns", &peer_ns,
        ])?;
        if n > 1 {
            ip(&["-n", &peer_ns, "link", "add", "sw", "type", "bridge", "stp_state", "0"])?;
            ip(&["-n", &peer_ns, "link", "set", "uplink", "master", "sw", "up"])?;
            ip(&["-n", &peer_ns, "link", "set", "sw", "up"])?;
        }
        for i in 1..=n {
            let ns = format!("{}-{tag}{i}", self.id);
            if n > 1 {
                self.add_ns(&ns)?;
                let sp = format!("p{i}");
                ip(&[
                    "link", "add", "name", "eth0", "netns", &ns, "type", "veth", "peer", "name", &sp,
                    "netns", &peer_ns,
                ])?;
                ip(&["-n", &peer_ns, "link", "set", &sp, "master", "sw", "up"])?;
            }
            let addr = Ipv4Addr::new(10, 20, 0, base + i);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            // A wire carries finished checksums. A veth sender leaves them to
            // "hardware" (CHECKSUM_PARTIAL), which a native XDP redirect does
            // not carry along: the far host would drop every TCP/UDP segment.
            crate::netns::ethtool(&ns, &["-K", "eth0", "tx", "off"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ends.push(End { mac: link_mac(&ns, "eth0")?, ns, ip: addr });
        }
        Ok(ends)
    }

    /// The agent config's `bridges:` section: every port of this bump.
    pub fn yaml(&self, xdp_mode: &str, on_failure: &str) -> String {
        let ports = if self.extra.is_empty() {
            format!("{WARD_PORT}, {CORE_PORT}")
        } else {
            format!("{WARD_PORT}, {CORE_PORT}, {EXTRA_PORT}")
        };
        format!(
            "bridges:\n  - name: ward3\n    ports: [{ports}]\n    xdp_mode: {xdp_mode}\n    on_failure: {on_failure}\n"
        )
    }

    /// Every host pings every host across the bump once, so ARP is settled
    /// before a test counts.
    pub fn warm_up(&self) -> Result<()> {
        for w in &self.ward {
            for c in &self.core {
                ip(&["netns", "exec", &w.ns, "ping", "-c", "1", "-W", "2", &c.ip.to_string()])?;
            }
        }
        Ok(())
    }
}

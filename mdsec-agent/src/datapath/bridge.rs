//! What the host says about a configured bridge: do its ports exist, which
//! Linux bridge are they members of, who carries an address. Read from sysfs
//! and `getifaddrs`, in the agent's network namespace. The config turns the
//! problems into located diagnostics that stop `run`; the doctor prints the
//! rest (STP, group forwarding) as advice.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::settings::{Bridge, OnFailure};

/// `group_fwd_mask` bits the fail-open path needs: 802.1X PAE (01:80:c2:00:00:03)
/// and LLDP (…:0e). STP (…:00) crosses a bridge without STP anyway; LACP and
/// pause (…:01, …:02) can never cross a Linux bridge.
pub const GROUP_FWD_NEEDED: u32 = 0x4008;

fn sys(name: &str) -> PathBuf {
    Path::new("/sys/class/net").join(name)
}

pub fn exists(name: &str) -> bool {
    sys(name).exists()
}

/// The Linux bridge `port` is enslaved to, if any (another kind of master,
/// a bond or a VRF, is reported by name too: it is not a bridge).
pub fn master(port: &str) -> Option<String> {
    let target = std::fs::read_link(sys(port).join("master")).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

pub fn is_bridge(dev: &str) -> bool {
    sys(dev).join("bridge").is_dir()
}

/// A bridge attribute from `/sys/class/net/<br>/bridge/<attr>` (decimal or 0x hex).
pub fn attr(dev: &str, name: &str) -> Option<u32> {
    let t = std::fs::read_to_string(sys(dev).join("bridge").join(name)).ok()?;
    let t = t.trim();
    match t.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    }
}

/// `net.ipv4.conf.<dev>.arp_ignore`: 0 answers ARP for any of the host's
/// addresses on any interface, a bridge's included.
pub fn arp_ignore(dev: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/arp_ignore")).ok()?.trim().parse().ok()
}

/// Addresses on `dev`, link-local IPv6 apart (returned second): those appear on
/// every interface that is up unless IPv6 is disabled on it.
pub fn addresses(dev: &str) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let (mut routable, mut link_local) = (BTreeSet::new(), BTreeSet::new());
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return (Vec::new(), Vec::new());
        }
        let mut p = head;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || CStr::from_ptr(ifa.ifa_name).to_bytes() != dev.as_bytes() {
                continue;
            }
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    routable.insert(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let a = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    if a.segments()[0] & 0xffc0 == 0xfe80 {
                        link_local.insert(IpAddr::V6(a));
                    } else {
                        routable.insert(IpAddr::V6(a));
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(head);
    }
    (routable.into_iter().collect(), link_local.into_iter().collect())
}

/// A reason `run` must not attach to this bridge; `port` is the index in
/// `ports` it is about, `None` for the bridge as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub port: Option<usize>,
    pub message: String,
}

fn list(a: &[IpAddr]) -> String {
    a.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}

/// Everything about `b` on this host that would make it unsafe or not
/// transparent: a missing port, the wrong kernel bridge underneath for its
/// `on_failure`, an address on a port or on the bridge.
pub fn problems(b: &Bridge) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut masters = BTreeSet::new();
    for (k, p) in b.ports.iter().enumerate() {
        let at = |message: String| Problem { port: Some(k), message };
        if !exists(p) {
            out.push(at(format!("bridge `{}`: no interface named `{p}` on this host", b.name)));
            continue;
        }
        let (routable, _) = addresses(p);
        if !routable.is_empty() {
            out.push(at(format!(
                "bridge `{}`: port `{p}` carries {}; a bridge port is not a routed port (remove the address)",
                b.name,
                list(&routable)
            )));
        }
        match (b.on_failure, master(p)) {
            (OnFailure::Open, None) => out.push(at(format!(
                "bridge `{}` (on_failure: open): port `{p}` is in no Linux bridge, so nothing would carry \
                 its frames while mdsec's XDP is detached; enslave both ports to one bridge \
                 (ip link set {p} master <bridge>), see docs/BRIDGE.md",
                b.name
            ))),
            (OnFailure::Open, Some(m)) if !is_bridge(&m) => out.push(at(format!(
                "bridge `{}`: port `{p}` is enslaved to `{m}`, which is not a Linux bridge",
                b.name
            ))),
            (OnFailure::Open, Some(m)) => {
                masters.insert(m);
            }
            (OnFailure::Closed, Some(m)) => out.push(at(format!(
                "bridge `{}` (on_failure: closed): port `{p}` is a member of `{m}`, which would carry \
                 frames while mdsec's XDP is detached; release it (ip link set {p} nomaster) or use \
                 on_failure: open",
                b.name
            ))),
            (OnFailure::Closed, None) => {}
        }
    }
    if masters.len() > 1 {
        out.push(Problem {
            port: None,
            message: format!(
                "bridge `{}`: its ports are in different Linux bridges ({}); they must share one",
                b.name,
                masters.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    for m in &masters {
        let (routable, _) = addresses(m);
        if !routable.is_empty() {
            out.push(Problem {
                port: None,
                message: format!(
                    "bridge `{}`: Linux bridge `{m}` carries {}; a transparent bridge has no address \
                     (the devices behind it could reach the gateway)",
                    b.name,
                    list(&routable)
                ),
            });
        }
    }
    out
}

/// The Linux bridge under `b`'s ports, when they share one.
pub fn kernel_bridge(b: &Bridge) -> Option<String> {
    let ms: BTreeSet<Option<String>> = b.ports.iter().map(|p| master(p)).collect();
    match ms.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(m)] if is_bridge(m) => Some(m.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_port_is_a_problem_of_that_port() {
        let b = Bridge {
            name: "ward".into(),
            ports: vec!["lo".into(), "mdsec-nonexistent0".into()],
            xdp_mode: super::super::settings::XdpMode::Skb,
            on_failure: OnFailure::Closed,
        };
        let p = problems(&b);
        // `lo` exists but carries 127.0.0.1: a routed interface.
        assert!(p.iter().any(|p| p.port == Some(0) && p.message.contains("127.0.0.1")), "{p:?}");
        assert!(p.iter().any(|p| p.port == Some(1) && p.message.contains("no interface named")), "{p:?}");
    }
}

//! Quarantine of new devices (`new_devices: quarantine | monitor` on an
//! enforce segment). The agent selects the devices from the inventory
//! (`detection::quarantine`) and hands them to the policy thread, which
//! merges them into every install: `compile` gives each such segment one
//! quarantine identity (a member of the segment, default deny, enforcing
//! or only counting per `new_devices`, and named by no peer) and maps the
//! devices' MACs and addresses to it, so only exempt traffic and the
//! segment's `quarantine_allow` rules reach them.
//!
//! Architecture Invariant: a quarantine never changes the policy files or
//! their content hash; lifting one is a lifecycle change (`active`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::model::{Member, Mode, NewDevices, Policy};

/// One device in quarantine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub segment: String,
    pub mac: String,
    /// 0 = untagged.
    pub vlan: u16,
    /// Its addresses inside the segment's members (mapped to the quarantine
    /// identity too, so traffic towards it is judged as quarantine traffic
    /// also where it arrives with the gateway's MAC).
    pub ips: Vec<IpAddr>,
    pub first_seen: String,
    /// `quarantine` or `monitor`.
    pub mode: String,
}

impl Quarantined {
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        crate::base::net::parse_mac(&self.mac)
    }
}

/// The entries of `list` this policy quarantines: their segment exists, is
/// in enforce mode with `new_devices` other than `allow`, and does not
/// declare the MAC; addresses outside the segment's members are left out.
pub fn applicable(policy: &Policy, list: &[Quarantined]) -> Vec<Quarantined> {
    let mut out = Vec::new();
    for q in list {
        let Some(seg) = policy.segments.iter().find(|s| s.name == q.segment) else { continue };
        if seg.mode != Mode::Enforce || seg.new_devices == NewDevices::Allow {
            continue;
        }
        let Some(mac) = q.mac_bytes() else { continue };
        let declared = policy
            .segments
            .iter()
            .flat_map(|s| &s.members)
            .any(|m| matches!(m, Member::Mac { mac: m, .. } if *m == mac));
        if declared {
            continue;
        }
        let ips = q
            .ips
            .iter()
            .copied()
            .filter(|ip| seg.members.iter().any(|m| matches!(m, Member::Net { net, .. } if net.contains(ip))))
            .collect();
        out.push(Quarantined { ips, mode: seg.new_devices.name().into(), ..q.clone() });
    }
    out
}

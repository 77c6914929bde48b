//! Which devices are in quarantine now (`new_devices:` of an enforce
//! segment, `policy::quarantine`): selected from the inventory each store
//! pass; the policy thread installs the set.

use std::{collections::HashSet, time::SystemTime};

use crate::{
    base::{clock::rfc3339, net::Mac},
    inventory::{Device, lifecycle::State, segment_of},
    policy::{
        model::{Mode, NewDevices, Policy},
        quarantine::Quarantined,
    },
};

/// More addresses than this in one segment under one MAC look like a
/// router forwarding for others: quarantining it would cut off everything
/// behind it, so it is left alone (and logged by the caller).
pub const MAX_ADDRESSES: usize = 8;

/// The devices to quarantine, sorted by segment and MAC: inside an enforce
/// segment with `new_devices: quarantine | monitor`, not among its MAC
/// members nor in the agent config's `devices:`, still `onboarding`, and
/// first seen after the segment's learning period ended. The second list
/// names those skipped for too many addresses.
pub fn select(
    devices: &[Device],
    policy: &Policy,
    learning_ends: impl Fn(&str) -> Option<SystemTime>,
    configured: &HashSet<Mac>,
) -> (Vec<Quarantined>, Vec<String>) {
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for d in devices {
        let Some((seg, declared)) = segment_of(policy, d) else { continue };
        if declared || seg.mode != Mode::Enforce || seg.new_devices == NewDevices::Allow {
            continue;
        }
        if d.lifecycle != State::Onboarding || configured.contains(&d.mac) {
            continue;
        }
        let Some(ends) = learning_ends(&seg.name) else { continue };
        if d.first_seen < ends {
            continue;
        }
        let ips: Vec<_> = d
            .ips
            .iter()
            .copied()
            .filter(|ip| {
                seg.members
                    .iter()
                    .any(|m| matches!(m, crate::policy::model::Member::Net { net, .. } if net.contains(ip)))
            })
            .collect();
        if ips.len() > MAX_ADDRESSES {
            skipped.push(format!("{} in segment {} ({} addresses)", d.mac, seg.name, ips.len()));
            continue;
        }
        out.push(Quarantined {
            segment: seg.name.clone(),
            mac: d.mac.to_string(),
            vlan: d.vlan,
            ips,
            first_seen: rfc3339(d.first_seen),
            mode: seg.new_devices.name().into(),
        });
    }
    out.sort_by(|a, b| (&a.segment, &a.mac, a.vlan).cmp(&(&b.segment, &b.mac, b.vlan)));
    out.dedup_by(|a, b| a.segment == b.segment && a.mac == b.mac);
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::model::Member;

    fn policy(new_devices: NewDevices, mode: Mode) -> Policy {
        let mut p = Policy::pumps(
            vec![
                Member::Net { net: "10.0.1.0/24".parse().unwrap(), vlan: None },
                Member::Mac { mac: [0x58, 0x46, 0xe1, 0, 0, 9], vlan: None },
            ],
            Duration::from_secs(60),
        );
        p.segments[0].mode = mode;
        p.segments[0].new_devices = new_devices;
        p
    }

    fn device(mac: [u8; 6], ip: &str, first_seen: SystemTime) -> Device {
        let mut d = Device::new("eth1".into(), 0, Mac(mac));
        d.ips = vec![ip.parse().unwrap()];
        d.first_seen = first_seen;
        d
    }

    #[test]
    fn only_undeclared_onboarding_devices_first_seen_after_learning_are_selected() {
        let ends = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let (early, late) = (ends - Duration::from_secs(1), ends + Duration::from_secs(1));
        let mut active = device([2, 0, 0, 0, 0, 4], "10.0.1.4", late);
        active.lifecycle = State::Active;
        let devices = vec![
            device([2, 0, 0, 0, 0, 1], "10.0.1.1", late),          // selected
            device([2, 0, 0, 0, 0, 2], "10.0.1.2", early),         // learned
            device([0x58, 0x46, 0xe1, 0, 0, 9], "10.0.1.9", late), // a MAC member
            device([2, 0, 0, 0, 0, 3], "10.0.9.3", late),          // no segment
            active,                                                // moved to active
            device([2, 0, 0, 0, 0, 5], "10.0.1.5", late),          // in the config's devices
        ];
        let configured: HashSet<Mac> = [Mac([2, 0, 0, 0, 0, 5])].into();
        let (q, skipped) =
            select(&devices, &policy(NewDevices::Quarantine, Mode::Enforce), |_| Some(ends), &configured);
        assert_eq!(q.iter().map(|q| q.mac.as_str()).collect::<Vec<_>>(), ["02:00:00:00:00:01"]);
        assert_eq!((q[0].mode.as_str(), q[0].ips.len(), skipped.len()), ("quarantine", 1, 0));
        // Never in a monitor segment, nor with new_devices: allow.
        for p in [policy(NewDevices::Quarantine, Mode::Monitor), policy(NewDevices::Allow, Mode::Enforce)] {
            assert!(select(&devices, &p, |_| Some(ends), &configured).0.is_empty());
        }
        // A MAC with many addresses in the segment (a router) is left alone.
        let mut router = device([2, 0, 0, 0, 0, 7], "10.0.1.70", late);
        router.ips = (70..80).map(|i| format!("10.0.1.{i}").parse().unwrap()).collect();
        let (q, skipped) =
            select(&[router], &policy(NewDevices::Monitor, Mode::Enforce), |_| Some(ends), &configured);
        assert!(q.is_empty() && skipped[0].contains("10 addresses"), "{skipped:?}");
    }
}

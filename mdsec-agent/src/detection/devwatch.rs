//! Device events from the inventory: `rogue_device` for a device inside a segment's
//! addresses that is not among the MACs the segment declares, and `new_device` for
//! a device first seen in a segment after its learning period. Each device is
//! reported once, the first time the inventory sees it.

use std::time::SystemTime;

use crate::{
    base::{clock::rfc3339, event::Event},
    inventory::{Device, segment_of},
    policy::model::{Member, Policy, Segment},
};

/// An event about a device (`new_device`, `rogue_device`, `decommissioned_device`).
/// Without a segment, the device's class stands in for the clinical function.
pub fn device_event(
    kind: &str,
    severity: &str,
    d: &Device,
    segment: Option<&Segment>,
    reason: String,
    now: SystemTime,
) -> Event {
    Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        kind: kind.into(),
        severity: severity.into(),
        time: rfc3339(now),
        iface: d.iface.clone(),
        vlan: d.vlan,
        src: d.ips.first().map(|ip| ip.to_string()).unwrap_or_default(),
        segment: segment.map(|s| s.name.clone()).unwrap_or_default(),
        function: segment.map(|s| s.function.clone()).unwrap_or_else(|| d.class.name().into()),
        reason,
        mac: Some(d.mac.to_string()),
        vendor: d.vendor.clone(),
        ..Default::default()
    }
}

/// Events for devices the inventory sees for the first time. `learning_started`
/// gives when the agent first loaded a segment.
pub fn check(
    new: &[Device],
    policy: &Policy,
    mut learning_started: impl FnMut(&str) -> Option<SystemTime>,
    now: SystemTime,
) -> Vec<Event> {
    let mut out = Vec::new();
    for d in new {
        let Some((seg, declared)) = segment_of(policy, d) else { continue };
        let declares_macs = seg.members.iter().any(|m| matches!(m, Member::Mac { .. }));
        if declares_macs && !declared {
            out.push(device_event(
                "rogue_device",
                "high",
                d,
                Some(seg),
                format!("{} is inside segment {} but not among its declared MAC members", d.mac, seg.name),
                now,
            ));
        }
        if let Some(start) = learning_started(&seg.name) {
            let ends = start + seg.learning_period;
            if now >= ends {
                out.push(device_event(
                    "new_device",
                    "low",
                    d,
                    Some(seg),
                    format!("first seen after the learning period ended at {}", rfc3339(ends)),
                    now,
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(learning: Duration) -> Policy {
        Policy::pumps(
            vec![
                Member::Net { net: "10.0.1.0/24".parse().unwrap(), vlan: None },
                Member::Mac { mac: [0x58, 0x46, 0xe1, 0, 0, 7], vlan: None },
            ],
            learning,
        )
    }

    fn device(mac: &str, ip: &str) -> Device {
        let mut d = Device::new("gw1".into(), 0, mac.parse().unwrap());
        d.ips = vec![ip.parse().unwrap()];
        d
    }

    #[test]
    fn undeclared_mac_in_a_segment_is_rogue_and_late_devices_are_new() {
        let now = SystemTime::now();
        let started = now - Duration::from_secs(3600);
        let devs = [
            device("58:46:e1:00:00:07", "10.0.1.2"),
            device("02:00:00:00:00:66", "10.0.1.77"),
            device("02:00:00:00:00:99", "10.9.9.9"),
        ];
        let kinds = |learning: Duration| -> Vec<(String, String)> {
            check(&devs, &policy(learning), |_| Some(started), now)
                .into_iter()
                .map(|e| (e.kind, e.mac.unwrap()))
                .collect()
        };
        // Learning period over (1 h ago + 30 min): both segment devices are new.
        assert_eq!(
            kinds(Duration::from_secs(1800)),
            vec![
                ("new_device".to_string(), "58:46:e1:00:00:07".to_string()),
                ("rogue_device".to_string(), "02:00:00:00:00:66".to_string()),
                ("new_device".to_string(), "02:00:00:00:00:66".to_string()),
            ]
        );
        // Still learning: only the rogue one. Devices outside segments: nothing.
        assert_eq!(
            kinds(Duration::from_secs(7200)),
            vec![("rogue_device".to_string(), "02:00:00:00:00:66".to_string())]
        );
    }
}

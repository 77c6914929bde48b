//! A device as the API serves it and the state database stores it: the typed
//! record's one text form.

use std::{collections::BTreeMap, time::SystemTime};

use mdsec_common::app::App;
use serde::{Deserialize, Serialize};

use super::{Device, clinical::Class, fingerprint::Trait, lifecycle::State};
use crate::base::{
    clock::{parse_rfc3339, rfc3339},
    net::Mac,
};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceDoc {
    pub iface: String,
    pub vlan: u16,
    pub mac: String,
    /// From the IEEE OUI registry; none for unknown and locally administered MACs.
    pub vendor: Option<String>,
    pub ips: Vec<String>,
    /// Apps this device spoke as a client / answered as a server (from its flows).
    pub apps_client: Vec<String>,
    pub apps_server: Vec<String>,
    /// Addresses it exchanged traffic with (at most 32).
    pub peers: Vec<String>,
    /// Clinical class (infusion-pump, patient-monitor, imaging-modality, pacs,
    /// clinical-workstation, server, network-infra, unknown).
    #[serde(default)]
    pub class: String,
    /// 0.0–1.0; 1.0 for an operator override.
    #[serde(default)]
    pub confidence: f32,
    /// The rules that decided the class.
    #[serde(default)]
    pub evidence: Vec<String>,
    /// Passive fingerprints: dhcp.hostname, dicom.calling_ae, hl7.sending_application,
    /// tls.sni, http.user_agent, ssh.banner, …
    #[serde(default)]
    pub fingerprints: BTreeMap<String, String>,
    /// From an operator override.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// The segment whose members include it (declared MAC, else address), if any.
    #[serde(default)]
    pub segment: Option<String>,
    /// Lifecycle state: onboarding, active, exception or decommissioned.
    #[serde(default)]
    pub lifecycle: String,
    pub packets: u64,
    pub bytes: u64,
    pub first_seen: String,
    pub last_seen: String,
}

impl From<&Device> for DeviceDoc {
    fn from(d: &Device) -> DeviceDoc {
        DeviceDoc {
            iface: d.iface.clone(),
            vlan: d.vlan,
            mac: d.mac.to_string(),
            vendor: d.vendor.clone(),
            ips: d.ips.iter().map(|ip| ip.to_string()).collect(),
            apps_client: d.apps_client.names(),
            apps_server: d.apps_server.names(),
            peers: d.peers.iter().map(|p| p.to_string()).collect(),
            class: d.class.name().into(),
            confidence: d.confidence,
            evidence: d.evidence.clone(),
            fingerprints: d.fingerprints.iter().map(|(k, v)| (k.name().to_string(), v.clone())).collect(),
            name: d.name.clone(),
            model: d.model.clone(),
            segment: d.segment.clone(),
            lifecycle: d.lifecycle.name().into(),
            packets: d.packets,
            bytes: d.bytes,
            first_seen: rfc3339(d.first_seen),
            last_seen: rfc3339(d.last_seen),
        }
    }
}

impl DeviceDoc {
    /// The typed record of a stored document, or None when its MAC does not
    /// parse. Parts written by another version that this one does not know
    /// (an app, a class, a fingerprint) are left out.
    pub fn typed(&self) -> Option<Device> {
        let mac = self.mac.parse::<Mac>().ok()?;
        let mut d = Device::new(self.iface.clone(), self.vlan, mac);
        d.vendor = self.vendor.clone();
        d.ips = self.ips.iter().filter_map(|i| i.parse().ok()).collect();
        d.apps_client = self.apps_client.iter().filter_map(|a| App::from_name(a)).collect();
        d.apps_server = self.apps_server.iter().filter_map(|a| App::from_name(a)).collect();
        d.peers = self.peers.iter().filter_map(|i| i.parse().ok()).collect();
        d.class = Class::from_name(&self.class).unwrap_or(Class::Unknown);
        d.confidence = self.confidence;
        d.evidence = self.evidence.clone();
        d.fingerprints =
            self.fingerprints.iter().filter_map(|(k, v)| Some((Trait::from_name(k)?, v.clone()))).collect();
        d.name = self.name.clone();
        d.model = self.model.clone();
        d.segment = self.segment.clone();
        d.lifecycle = State::from_name(&self.lifecycle).unwrap_or_default();
        (d.packets, d.bytes) = (self.packets, self.bytes);
        d.first_seen = parse_rfc3339(&self.first_seen).unwrap_or(SystemTime::UNIX_EPOCH);
        d.last_seen = parse_rfc3339(&self.last_seen).unwrap_or(SystemTime::UNIX_EPOCH);
        Some(d)
    }
}

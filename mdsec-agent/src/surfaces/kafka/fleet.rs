//! The fleet view: every site's inventory and incidents merged from the
//! topics (the compacted inventory topic is the source of truth; this holds
//! only what it read). Pure: [`super::consume`] feeds it messages.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use serde::Serialize;
use serde_json::Value;

use crate::inventory::doc::DeviceDoc;

/// Incidents kept for `recent_incidents`, newest last.
pub const KEEP_INCIDENTS: usize = 200;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FleetDevice {
    pub site: String,
    pub gateway: String,
    #[serde(flatten)]
    pub device: DeviceDoc,
}

#[derive(Debug, Default)]
pub struct FleetView {
    /// (site, MAC) → the device's newest record.
    devices: BTreeMap<(String, String), FleetDevice>,
    incidents: VecDeque<Value>,
    event_ids: HashSet<String>,
    /// Messages read again (at-least-once delivery): counted, not shown twice.
    pub duplicates: u64,
    /// Messages that are not what their topic holds: skipped and counted.
    pub malformed: u64,
    pub events: u64,
}

/// One site's numbers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SiteSummary {
    pub site: String,
    pub devices: usize,
    pub gateways: BTreeSet<String>,
    pub by_class: BTreeMap<String, usize>,
    pub by_vendor: BTreeMap<String, usize>,
    /// Share of devices of class `unknown` (0.0–1.0).
    pub unclassified_share: f64,
}

/// A MAC present at more than one site, newest sighting last.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Moved {
    pub mac: String,
    pub sites: Vec<String>,
}

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub site: Option<String>,
    pub class: Option<String>,
    pub vendor: Option<String>,
}

impl FleetView {
    /// A message of the inventory topic: `site/MAC` → a record, or a tombstone.
    pub fn inventory(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Some((site, mac)) = std::str::from_utf8(key).ok().and_then(|k| k.split_once('/')) else {
            self.malformed += 1;
            return;
        };
        let id = (site.to_string(), mac.to_ascii_lowercase());
        let Some(value) = value else {
            self.devices.remove(&id);
            return;
        };
        let parsed: Option<(DeviceDoc, String)> = serde_json::from_slice::<Value>(value).ok().and_then(|v| {
            let gateway = v.get("gateway")?.as_str()?.to_string();
            Some((serde_json::from_value(v).ok()?, gateway))
        });
        match parsed {
            Some((device, gateway)) if device.mac.eq_ignore_ascii_case(&id.1) => {
                self.devices.insert(id, FleetDevice { site: site.to_string(), gateway, device });
            }
            _ => self.malformed += 1,
        }
    }

    /// A message of the events topic (EVE or native): de-duplicated by
    /// `message_id`; incidents are kept.
    pub fn event(&mut self, value: Option<&[u8]>) {
        let Some(v) = value.and_then(|b| serde_json::from_slice::<Value>(b).ok()) else {
            self.malformed += 1;
            return;
        };
        let Some(id) = v.get("message_id").and_then(Value::as_str) else {
            self.malformed += 1;
            return;
        };
        if !self.event_ids.insert(id.to_string()) {
            self.duplicates += 1;
            return;
        }
        self.events += 1;
        if kind(&v).as_deref() == Some("incident") {
            if self.incidents.len() == KEEP_INCIDENTS {
                self.incidents.pop_front();
            }
            self.incidents.push_back(v);
        }
    }

    pub fn devices(&self, f: &Filter) -> Vec<&FleetDevice> {
        self.devices
            .values()
            .filter(|d| f.site.as_ref().is_none_or(|s| *s == d.site))
            .filter(|d| f.class.as_ref().is_none_or(|c| *c == d.device.class))
            .filter(|d| {
                f.vendor
                    .as_ref()
                    .is_none_or(|v| d.device.vendor.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(v)))
            })
            .collect()
    }

    pub fn sites(&self) -> Vec<SiteSummary> {
        let mut out: BTreeMap<&str, SiteSummary> = BTreeMap::new();
        for d in self.devices.values() {
            let s = out.entry(&d.site).or_insert_with(|| SiteSummary {
                site: d.site.clone(),
                devices: 0,
                gateways: BTreeSet::new(),
                by_class: BTreeMap::new(),
                by_vendor: BTreeMap::new(),
                unclassified_share: 0.0,
            });
            s.devices += 1;
            s.gateways.insert(d.gateway.clone());
            *s.by_class.entry(d.device.class.clone()).or_default() += 1;
            *s.by_vendor.entry(d.device.vendor.clone().unwrap_or_else(|| "unknown".into())).or_default() += 1;
        }
        out.into_values()
            .map(|mut s| {
                s.unclassified_share = *s.by_class.get("unknown").unwrap_or(&0) as f64 / s.devices as f64;
                s
            })
            .collect()
    }

    /// MACs with a record at more than one site, sites by last sighting.
    pub fn moved(&self) -> Vec<Moved> {
        let mut by_mac: BTreeMap<&str, Vec<&FleetDevice>> = BTreeMap::new();
        for ((_, mac), d) in &self.devices {
            by_mac.entry(mac).or_default().push(d);
        }
        by_mac
            .into_iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(mac, mut v)| {
                v.sort_by(|a, b| a.device.last_seen.cmp(&b.device.last_seen));
                Moved { mac: mac.to_string(), sites: v.iter().map(|d| d.site.clone()).collect() }
            })
            .collect()
    }

    pub fn incidents(&self) -> impl Iterator<Item = &Value> {
        self.incidents.iter()
    }
}

/// An event's type: native `kind`, EVE's `type` metadata (named or a tag).
fn kind(v: &Value) -> Option<String> {
    if let Some(k) = v.get("kind").and_then(Value::as_str) {
        return Some(k.into());
    }
    let md = v.get("alert")?.get("metadata")?;
    if let Some(t) = md.get("type").and_then(|t| t.get(0)).and_then(Value::as_str) {
        return Some(t.into());
    }
    md.get("tag")?
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|t| t.strip_prefix("type:"))
        .map(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mac: &str, class: &str, last_seen: &str, gateway: &str) -> Vec<u8> {
        let d = DeviceDoc {
            mac: mac.into(),
            class: class.into(),
            last_seen: last_seen.into(),
            ..Default::default()
        };
        let mut v = serde_json::to_value(d).unwrap();
        v["gateway"] = gateway.into();
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn sites_merge_moves_show_and_tombstones_remove() {
        let mut f = FleetView::default();
        f.inventory(
            b"north/aa:00:00:00:00:01",
            Some(&record("aa:00:00:00:00:01", "infusion-pump", "2026-01-01T00:00:00Z", "g1")),
        );
        f.inventory(
            b"north/aa:00:00:00:00:02",
            Some(&record("aa:00:00:00:00:02", "unknown", "2026-01-01T00:00:00Z", "g1")),
        );
        f.inventory(
            b"south/aa:00:00:00:00:01",
            Some(&record("aa:00:00:00:00:01", "infusion-pump", "2026-01-02T00:00:00Z", "g2")),
        );
        // A newer record of the same key replaces the older one.
        f.inventory(
            b"north/aa:00:00:00:00:02",
            Some(&record("aa:00:00:00:00:02", "patient-monitor", "2026-01-03T00:00:00Z", "g1")),
        );
        f.inventory(b"nokey", Some(b"{}"));
        f.inventory(b"east/aa:00:00:00:00:09", Some(b"not json"));
        assert_eq!(f.malformed, 2);
        let sites = f.sites();
        assert_eq!(sites.len(), 2);
        assert_eq!(
            (sites[0].site.as_str(), sites[0].devices, sites[0].unclassified_share),
            ("north", 2, 0.0)
        );
        assert_eq!(
            f.moved(),
            vec![Moved { mac: "aa:00:00:00:00:01".into(), sites: vec!["north".into(), "south".into()] }]
        );
        assert_eq!(f.devices(&Filter { class: Some("infusion-pump".into()), ..Default::default() }).len(), 2);
        f.inventory(b"north/aa:00:00:00:00:01", None);
        assert!(f.moved().is_empty());
        assert_eq!(f.devices(&Filter::default()).len(), 2);
    }

    #[test]
    fn events_are_deduplicated_by_message_id_and_incidents_kept() {
        let mut f = FleetView::default();
        let incident =
            br#"{"message_id":"a-1","alert":{"metadata":{"tag":["type:incident","segment:pumps"]}}}"#;
        let other = br#"{"message_id":"a-2","kind":"scan"}"#;
        f.event(Some(incident));
        f.event(Some(incident));
        f.event(Some(other));
        f.event(Some(b"{}"));
        assert_eq!((f.events, f.duplicates, f.malformed), (2, 1, 1));
        assert_eq!(f.incidents().count(), 1);
    }
}

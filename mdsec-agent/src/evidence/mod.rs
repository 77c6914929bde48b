//! Evidence kept for the compensating-controls report: periodic snapshots of the
//! per-segment counters (as deltas, so they add up across agent restarts) and of
//! the program KPIs, written to the state database every `evidence.snapshot_secs`
//! and at a clean stop; plus the register assessment the metrics show.

pub mod cutover;
pub mod register;
pub mod report;
pub mod report_render;
pub mod simulate;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap},
    time::SystemTime,
};

use mdsec_common::policy::Verdict;
use serde::{Deserialize, Serialize};

use crate::{
    datapath::segstats::{Column, Totals},
    evidence::register::{Finding, Register, Status},
    inventory::Device,
    inventory::clinical::Class,
    inventory::lifecycle::State,
    policy::model::Policy,
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceConfig {
    /// How often counters and KPIs are snapshotted into the state database.
    #[serde(default = "default_snapshot")]
    pub snapshot_secs: u64,
    /// Events and snapshots older than this are deleted.
    #[serde(default = "default_retention")]
    pub retention_days: u64,
}

fn default_snapshot() -> u64 {
    300
}
fn default_retention() -> u64 {
    800
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        EvidenceConfig { snapshot_secs: default_snapshot(), retention_days: default_retention() }
    }
}

/// Packets of one segment in one snapshot interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SegmentCounts {
    /// Allowed by a rule, replies, and flows waiting for their app.
    pub allowed: u64,
    /// Dropped (enforce).
    pub dropped: u64,
    /// Would have been dropped (monitor, mirror ports).
    pub would_drop: u64,
    /// Unauthorized protocol occurrences: denied flows.
    pub violations: u64,
}

impl SegmentCounts {
    pub fn add(&mut self, o: &SegmentCounts) {
        self.allowed += o.allowed;
        self.dropped += o.dropped;
        self.would_drop += o.would_drop;
        self.violations += o.violations;
    }
}

/// Program KPIs at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Kpi {
    pub devices: u64,
    pub unclassified_devices: u64,
    /// unclassified / devices (0 with no devices).
    pub unclassified_ratio: f64,
    /// Devices with at least one CVE not patched.
    pub vulnerable_devices: u64,
    pub end_of_life_devices: u64,
    /// (device, CVE) pairs not patched.
    pub open_vulnerabilities: u64,
    /// Largest running patch lag of an open (device, CVE), days.
    pub max_open_lag_days: i64,
    /// Mean lag of the patched (device, CVE) pairs, days (0 with none).
    pub mean_patched_lag_days: f64,
    /// Time-bound exceptions not yet expired.
    pub exceptions_active: u64,
    /// Devices by lifecycle state.
    pub lifecycle: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub time: String,
    /// Seconds the deltas cover.
    pub interval_secs: u64,
    /// Segment → (mode during the interval, counter deltas).
    pub segments: BTreeMap<String, (String, SegmentCounts)>,
    pub kpi: Kpi,
}

/// Per-segment totals from the SEG_STATS totals.
pub fn summarize(totals: &Totals) -> BTreeMap<String, SegmentCounts> {
    let cols: HashMap<u32, Column> = crate::datapath::segstats::columns().collect();
    let mut out: BTreeMap<String, SegmentCounts> = BTreeMap::new();
    for ((seg, col), c) in totals {
        let e = out.entry(seg.clone()).or_default();
        match cols.get(col) {
            Some(Column::Verdict {
                verdict: Verdict::Allow | Verdict::Reply | Verdict::AppPending, ..
            }) => e.allowed += c.packets,
            Some(Column::Verdict { verdict: Verdict::Drop, .. }) => e.dropped += c.packets,
            Some(Column::Verdict { verdict: Verdict::WouldDrop, .. }) => e.would_drop += c.packets,
            Some(Column::Violation(_)) => e.violations += c.packets,
            _ => {}
        }
    }
    out
}

/// Register findings per device (MAC), today.
pub fn assess(register: &Register, devices: &[Device], now: SystemTime) -> BTreeMap<String, Vec<Finding>> {
    let today = jiff::Timestamp::try_from(now)
        .map(|t| t.to_zoned(jiff::tz::TimeZone::UTC).date())
        .unwrap_or_default();
    devices
        .iter()
        .map(|d| (d.mac.to_string(), register.assess(d, today)))
        .filter(|(_, f)| !f.is_empty())
        .collect()
}

/// KPIs from the inventory, findings, policy and lifecycle states.
pub fn kpi(
    devices: &[Device],
    findings: &BTreeMap<String, Vec<Finding>>,
    policy: Option<&Policy>,
    now: SystemTime,
) -> Kpi {
    let mut k = Kpi { devices: devices.len() as u64, ..Default::default() };
    k.unclassified_devices = devices.iter().filter(|d| d.class == Class::Unknown).count() as u64;
    k.unclassified_ratio =
        if devices.is_empty() { 0.0 } else { k.unclassified_devices as f64 / devices.len() as f64 };
    let (mut patched, mut patched_days) = (0u64, 0i64);
    for f in findings.values() {
        if f.iter().any(|x| x.status.is_open()) {
            k.vulnerable_devices += 1;
        }
        if f.iter().any(|x| x.status == Status::EndOfLife) {
            k.end_of_life_devices += 1;
        }
        for x in f {
            if x.status.is_open() {
                k.open_vulnerabilities += 1;
                k.max_open_lag_days = k.max_open_lag_days.max(x.lag_days);
            } else {
                patched += 1;
                patched_days += x.lag_days;
            }
        }
    }
    k.mean_patched_lag_days = if patched == 0 { 0.0 } else { patched_days as f64 / patched as f64 };
    k.exceptions_active = policy.map_or(0, |p| {
        p.rules.iter().filter(|r| r.exception.as_ref().is_some_and(|e| e.expires > now)).count() as u64
    });
    for s in State::ALL {
        k.lifecycle.insert(s.name().into(), 0);
    }
    for d in devices {
        *k.lifecycle.entry(d.lifecycle.name().into()).or_default() += 1;
    }
    k
}

/// Turns running segment totals into snapshot deltas.
pub struct Snapshotter {
    last: BTreeMap<String, SegmentCounts>,
    last_time: SystemTime,
}

impl Snapshotter {
    pub fn new(start: SystemTime) -> Snapshotter {
        Snapshotter { last: BTreeMap::new(), last_time: start }
    }

    pub fn due(&self, now: SystemTime, every_secs: u64) -> bool {
        now.duration_since(self.last_time).unwrap_or_default().as_secs() >= every_secs
    }

    pub fn take(
        &mut self,
        totals: &BTreeMap<String, SegmentCounts>,
        policy: Option<&Policy>,
        kpi: Kpi,
        now: SystemTime,
    ) -> Snapshot {
        let mode = |seg: &str| {
            policy
                .and_then(|p| p.segments.iter().find(|s| s.name == seg))
                .map_or("none".to_string(), |s| s.mode.name().to_string())
        };
        let mut segments = BTreeMap::new();
        // Every segment of the policy appears, so time in a mode is counted even
        // without traffic.
        let names: std::collections::BTreeSet<String> = totals
            .keys()
            .cloned()
            .chain(policy.into_iter().flat_map(|p| p.segments.iter().map(|s| s.name.clone())))
            .collect();
        for name in names {
            let now_c = totals.get(&name).cloned().unwrap_or_default();
            let before = self.last.get(&name).cloned().unwrap_or_default();
            let d = SegmentCounts {
                allowed: now_c.allowed.saturating_sub(before.allowed),
                dropped: now_c.dropped.saturating_sub(before.dropped),
                would_drop: now_c.would_drop.saturating_sub(before.would_drop),
                violations: now_c.violations.saturating_sub(before.violations),
            };
            segments.insert(name.clone(), (mode(&name), d));
        }
        let snap = Snapshot {
            time: crate::base::clock::rfc3339(now),
            interval_secs: now.duration_since(self.last_time).unwrap_or_default().as_secs(),
            segments,
            kpi,
        };
        self.last = totals.clone();
        self.last_time = now;
        snap
    }
}

/// What `/metrics` shows of the register (store thread); segment, class and
/// lifecycle come from the inventory.
#[derive(Debug, Clone, Default)]
pub struct EvidenceStatus {
    pub findings: BTreeMap<String, Vec<Finding>>,
    pub register_ok: bool,
    pub register_configured: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_add_up_and_every_segment_appears() {
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let mut s = Snapshotter::new(t0);
        let c = |d, w| SegmentCounts { dropped: d, would_drop: w, ..Default::default() };
        let a = s.take(
            &BTreeMap::from([("pumps".into(), c(5, 0))]),
            None,
            Kpi::default(),
            t0 + std::time::Duration::from_secs(60),
        );
        let b = s.take(
            &BTreeMap::from([("pumps".into(), c(8, 1))]),
            None,
            Kpi::default(),
            t0 + std::time::Duration::from_secs(90),
        );
        assert_eq!((a.interval_secs, &a.segments["pumps"].1), (60, &c(5, 0)));
        assert_eq!((b.interval_secs, &b.segments["pumps"].1), (30, &c(3, 1)));
        assert!(!s.due(t0 + std::time::Duration::from_secs(100), 60));
        assert!(s.due(t0 + std::time::Duration::from_secs(150), 60));
    }
}

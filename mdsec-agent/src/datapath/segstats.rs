//! Owns the SEG_STATS map on the user side: turns the per-generation-half,
//! per-segment-index counters into totals by segment *name*.
//!
//! The kernel counts into the half of the active generation, by that generation's
//! segment index (see `mdsec_common::segstats`). Each read credits the increase
//! since the previous read to the names of the generation the half holds; before a
//! new generation is written into a half, [`SegStats::retire`] credits what is left
//! to the old names. A half whose generation this process did not install (the
//! previous run's) has no names: its increase is not credited, so the totals count
//! from this process's start, like any Prometheus counter.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use mdsec_common::{
    app::App,
    policy::Verdict,
    segstats::{self, COL_DROP_APP_MISMATCH, COL_VIOLATIONS, COL_WOULD_DROP_APP_MISMATCH, SEG_SLOTS},
    stats::Counter,
};

/// Segment label of traffic that belongs to no segment.
pub const NO_SEGMENT: &str = "none";

/// What a column counts, in metric terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// Packets and bytes by verdict; `reason` for drops and would-drops.
    Verdict { verdict: Verdict, reason: Option<&'static str> },
    /// Denied flows by app.
    Violation(App),
}

/// Every column the kernel writes, with its meaning.
pub fn columns() -> impl Iterator<Item = (u32, Column)> {
    // No column for `None`: a frame is counted under its evaluated verdict.
    let verdicts = Verdict::ALL.into_iter().filter(|v| *v != Verdict::None).map(|v| {
        let reason = matches!(v, Verdict::Drop | Verdict::WouldDrop).then_some("default_deny");
        (v as u32, Column::Verdict { verdict: v, reason })
    });
    let mismatch =
        [(COL_DROP_APP_MISMATCH, Verdict::Drop), (COL_WOULD_DROP_APP_MISMATCH, Verdict::WouldDrop)]
            .into_iter()
            .map(|(c, v)| (c, Column::Verdict { verdict: v, reason: Some("app_mismatch") }));
    let apps = App::ALL.iter().map(|a| (COL_VIOLATIONS + *a as u32, Column::Violation(*a)));
    verdicts.chain(mismatch).chain(apps)
}

/// Totals by (segment name, column).
pub type Totals = BTreeMap<(String, u32), Counter>;

pub struct SegStats {
    map: PerCpuArray<MapData, Counter>,
    cols: Vec<u32>,
    /// Last value read per index, summed over CPUs.
    last: Vec<Counter>,
    /// Segment names of the generation each half holds (index 0 = no segment).
    halves: [Option<Vec<String>>; 2],
    totals: Totals,
}

impl SegStats {
    /// Takes the map and reads every counter as the starting point.
    pub fn new(map: Map) -> Result<SegStats> {
        let mut s = SegStats {
            map: PerCpuArray::try_from(map)?,
            cols: columns().map(|(c, _)| c).collect(),
            last: vec![Counter::default(); segstats::SEG_STATS_LEN as usize],
            halves: [None, None],
            totals: Totals::new(),
        };
        for bit in 0..2 {
            s.read_half(bit, SEG_SLOTS)?;
        }
        Ok(s)
    }

    /// Credits every half's increase since the last read.
    pub fn poll(&mut self) -> Result<()> {
        for bit in 0..2 {
            // Only indexes of the generation's segments can have counted.
            let slots = self.halves[bit as usize].as_ref().map_or(0, |n| n.len() as u32);
            self.read_half(bit, slots)?;
        }
        Ok(())
    }

    /// A new generation with segments `segments` is about to be written into half
    /// `bit`: credit the old generation's remaining counts, then switch names.
    pub fn retire(&mut self, bit: u32, segments: Vec<String>) -> Result<()> {
        self.read_half(bit, SEG_SLOTS)?;
        let mut names = vec![NO_SEGMENT.to_string()];
        names.extend(segments);
        self.halves[bit as usize & 1] = Some(names);
        Ok(())
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    fn read_half(&mut self, bit: u32, slots: u32) -> Result<()> {
        for seg in 0..slots.min(SEG_SLOTS) {
            for &col in &self.cols {
                let idx = segstats::index(bit, seg, col);
                let per_cpu = self.map.get(&idx, 0).context("read SEG_STATS")?;
                let now = per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                    packets: a.packets + c.packets,
                    bytes: a.bytes + c.bytes,
                });
                let last = std::mem::replace(&mut self.last[idx as usize], now);
                let delta = Counter {
                    packets: now.packets.saturating_sub(last.packets),
                    bytes: now.bytes.saturating_sub(last.bytes),
                };
                if delta == Counter::default() {
                    continue;
                }
                let name = self.halves[bit as usize & 1].as_ref().and_then(|n| n.get(seg as usize));
                if let Some(name) = name {
                    let t = self.totals.entry((name.clone(), col)).or_default();
                    t.packets += delta.packets;
                    t.bytes += delta.bytes;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_distinct_and_fit() {
        let cols: Vec<u32> = columns().map(|(c, _)| c).collect();
        let mut sorted = cols.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), cols.len());
        assert!(cols.iter().all(|c| *c < segstats::SEG_COLS));
        // Every app has a violation column; every deny reason is named.
        assert_eq!(columns().filter(|(_, c)| matches!(c, Column::Violation(_))).count(), App::ALL.len());
        assert!(
            columns()
                .any(|(_, c)| c == Column::Verdict { verdict: Verdict::Drop, reason: Some("app_mismatch") })
        );
    }
}

//! Owns the FLOWS, FLOWS4 (through [`FlowTables`]), DEVICES and STATS maps on the
//! user side: reads them every poll interval, merges into [`Tables`] (IPv4 flows as IPv4-mapped
//! [`FlowKey`]s, so the rest of the agent sees one kind of flow), and ages idle
//! flows out of the kernel. Drives the per-segment counters' reads ([`SegStats`])
//! on the same clock.

use std::{
    borrow::Borrow,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use log::warn;
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::FlowValue,
    maps as names,
    stats::{Counter, STATS_LEN},
};

use crate::{
    base::clock, datapath::flowtable::FlowTables, datapath::loader::Datapath, datapath::segstats::SegStats,
    datapath::state::Tables,
};

pub struct Poller {
    flows: FlowTables,
    devices: BpfHashMap<MapData, DeviceKey, DeviceValue>,
    stats: PerCpuArray<MapData, Counter>,
    segstats: Arc<Mutex<SegStats>>,
    idle: Duration,
}

impl Poller {
    pub fn new(dp: &mut Datapath, segstats: Arc<Mutex<SegStats>>, idle: Duration) -> Result<Poller> {
        Self::from_maps(
            dp.take_map(names::FLOWS)?,
            dp.take_map(names::FLOWS4)?,
            dp.geometry.seed,
            dp.take_map(names::DEVICES)?,
            dp.take_map(names::STATS)?,
            segstats,
            idle,
        )
    }

    /// From the maps themselves (the benchmark polls a loaded, unattached datapath).
    pub fn from_maps(
        flows: aya::maps::Map,
        flows4: aya::maps::Map,
        seed: u64,
        devices: aya::maps::Map,
        stats: aya::maps::Map,
        segstats: Arc<Mutex<SegStats>>,
        idle: Duration,
    ) -> Result<Poller> {
        Ok(Poller {
            flows: FlowTables::new(flows4, flows, seed)?,
            devices: BpfHashMap::try_from(devices)?,
            stats: PerCpuArray::try_from(stats)?,
            segstats,
            idle,
        })
    }

    /// One poll: DEVICES and STATS read outside the lock, the flow tables
    /// merged under it, then idle flows aged out.
    pub fn poll(&mut self, tables: &RwLock<Tables>) -> Result<()> {
        // Counters first: the flow table read after them is at least as new.
        self.segstats.lock().unwrap().poll()?;
        let devices = snapshot(&self.devices);
        let stats = stat_sums(&self.stats)?;
        let idle = {
            // The flow tables are read under the lock, straight into the
            // records: they are mapped memory (no syscalls), and a copy of a
            // million flows would cost 120 MiB for the length of a poll.
            let mut t = tables.write().unwrap();
            let mut m = t.begin_merge();
            self.flows.v6.for_each(|slot, k, v| m.flow_at(slot, k, v));
            self.flows.v4.for_each(|slot, k, v| m.flow4_at(slot, k, v));
            m.finish(&devices);
            t.set_stats(stats);
            t.idle_flows(clock::mono_ns(), self.idle.as_nanos() as u64)
        };
        let idle_ns = self.idle.as_nanos() as u64;
        for k in idle {
            // A packet may have arrived since the snapshot: only remove what is
            // still idle, so no count is lost. A flow already gone (evicted) is
            // forgotten too.
            let still_idle = |v: &FlowValue| clock::mono_ns().saturating_sub(v.last_seen_ns) > idle_ns;
            if self.flows.remove_if(&k, still_idle) != Some(false) {
                tables.write().unwrap().forget_flow(&k);
            }
        }
        Ok(())
    }

    /// Polls forever on a dedicated thread: map reads are blocking syscalls.
    pub fn spawn(mut self, tables: Arc<RwLock<Tables>>, every: Duration) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("mdsec-poller".into())
            .spawn(move || {
                loop {
                    if let Err(e) = self.poll(&tables) {
                        warn!("poll failed: {e:#}");
                    }
                    std::thread::sleep(every);
                }
            })
            .expect("spawn poller thread")
    }
}

/// `STATS` summed over CPUs, indexed like [`Stat::ALL`](mdsec_common::stats::Stat::ALL),
/// with the counters the datapath leaves to userspace filled in
/// ([`derive_frames`](mdsec_common::stats::derive_frames)).
pub fn stat_sums<T: Borrow<MapData>>(m: &PerCpuArray<T, Counter>) -> Result<Vec<Counter>> {
    let mut sums = (0..STATS_LEN)
        .map(|i| {
            let per_cpu = m.get(&i, 0).context("read STATS")?;
            Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    mdsec_common::stats::derive_frames(&mut sums);
    Ok(sums)
}

/// Every entry of a kernel hash map: batched, or entry by entry if the kernel
/// refuses the batch call.
fn snapshot<K: aya::Pod, V: aya::Pod>(m: &BpfHashMap<MapData, K, V>) -> Vec<(K, V)> {
    use aya::maps::IterableMap;
    match crate::datapath::batch::read_all(m.map()) {
        Ok(v) => v,
        Err(e) => {
            warn!("batched map read failed ({e}); reading entry by entry");
            m.iter().filter_map(Result::ok).collect()
        }
    }
}

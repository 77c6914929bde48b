//! Owns the FLOWS, FLOWS4, DEVICES and STATS maps on the user side: reads them
//! every poll interval, merges into [`Tables`] (IPv4 flows as IPv4-mapped
//! [`FlowKey`]s, so the rest of the agent sees one kind of flow), and ages idle
//! flows out of the kernel. Drives the per-segment counters' reads ([`SegStats`])
//! on the same clock.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use log::warn;
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::{FlowKey, FlowKey4, FlowValue},
    maps as names,
    stats::{Counter, STATS_LEN},
};

use crate::{clock, loader::Datapath, segstats::SegStats, state::Tables};

pub struct Poller {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    flows4: BpfHashMap<MapData, FlowKey4, FlowValue>,
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
        devices: aya::maps::Map,
        stats: aya::maps::Map,
        segstats: Arc<Mutex<SegStats>>,
        idle: Duration,
    ) -> Result<Poller> {
        Ok(Poller {
            flows: BpfHashMap::try_from(flows)?,
            flows4: BpfHashMap::try_from(flows4)?,
            devices: BpfHashMap::try_from(devices)?,
            stats: PerCpuArray::try_from(stats)?,
            segstats,
            idle,
        })
    }

    /// One poll: snapshot the maps outside the lock, merge under it, then age.
    pub fn poll(&mut self, tables: &RwLock<Tables>) -> Result<()> {
        // Counters first: the flow table read after them is at least as new.
        self.segstats.lock().unwrap().poll()?;
        let flows = snapshot(&self.flows);
        let flows4 = snapshot(&self.flows4);
        let devices = snapshot(&self.devices);
        let mut stats = Vec::with_capacity(STATS_LEN as usize);
        for i in 0..STATS_LEN {
            let per_cpu = self.stats.get(&i, 0).context("read STATS")?;
            stats.push(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            }));
        }
        let idle = {
            let mut t = tables.write().unwrap();
            t.merge_maps(&flows, &flows4, &devices);
            t.set_stats(stats);
            t.idle_flows(clock::mono_ns(), self.idle.as_nanos() as u64)
        };
        for k in idle {
            // A packet may have arrived since the snapshot: only delete what is
            // still idle, so no count is lost.
            // FlowKey::v4 says which map holds the flow.
            let k4 = k.v4();
            let entry = match &k4 {
                Some(k4) => self.flows4.get(k4, 0),
                None => self.flows.get(&k, 0),
            };
            let still_idle = match entry {
                Ok(v) => clock::mono_ns().saturating_sub(v.last_seen_ns) > self.idle.as_nanos() as u64,
                Err(_) => true,
            };
            if !still_idle {
                continue;
            }
            let _ = match &k4 {
                Some(k4) => self.flows4.remove(k4),
                None => self.flows.remove(&k),
            };
            tables.write().unwrap().forget_flow(&k);
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

/// Every entry of a kernel hash map: batched, or entry by entry if the kernel
/// refuses the batch call.
fn snapshot<K: aya::Pod, V: aya::Pod>(m: &BpfHashMap<MapData, K, V>) -> Vec<(K, V)> {
    use aya::maps::IterableMap;
    match crate::batch::read_all(m.map()) {
        Ok(v) => v,
        Err(e) => {
            warn!("batched map read failed ({e}); reading entry by entry");
            m.iter().filter_map(Result::ok).collect()
        }
    }
}

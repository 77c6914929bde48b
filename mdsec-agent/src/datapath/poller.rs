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
    base::clock,
    datapath::flowtable::FlowTables,
    datapath::loader::Datapath,
    datapath::segstats::SegStats,
    datapath::state::{EndReason, Ended, Tables, Timeouts},
};

/// When flows end, and when long ones report.
#[derive(Debug, Clone, Copy)]
pub struct Ageing {
    /// No packet for this long: the flow ends (and leaves the kernel table).
    pub idle: Duration,
    /// A closed TCP conversation (RST, or FIN each way) quiet this long ends.
    pub closed: Duration,
    /// Conversations still open report what came since, this often.
    pub active: Option<Duration>,
}

impl Ageing {
    /// Only the idle timeout (the benchmarks).
    pub fn idle(idle: Duration) -> Ageing {
        Ageing { idle, closed: idle, active: None }
    }
}

pub struct Poller {
    flows: FlowTables,
    devices: BpfHashMap<MapData, DeviceKey, DeviceValue>,
    stats: PerCpuArray<MapData, Counter>,
    segstats: Arc<Mutex<SegStats>>,
    ageing: Ageing,
    /// Where conversations that end go (the exporter's EVE flow records), if
    /// anywhere: a callback, so this layer does not know the surfaces.
    ended: Option<Box<dyn Fn(Vec<Ended>) + Send>>,
}

impl Poller {
    pub fn new(dp: &mut Datapath, segstats: Arc<Mutex<SegStats>>, ageing: Ageing) -> Result<Poller> {
        Self::from_maps(
            dp.take_map(names::FLOWS)?,
            dp.take_map(names::FLOWS4)?,
            dp.geometry.seed,
            dp.take_map(names::DEVICES)?,
            dp.take_map(names::STATS)?,
            segstats,
            ageing,
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
        ageing: Ageing,
    ) -> Result<Poller> {
        Ok(Poller {
            flows: FlowTables::new(flows4, flows, seed)?,
            devices: BpfHashMap::try_from(devices)?,
            stats: PerCpuArray::try_from(stats)?,
            segstats,
            ageing,
            ended: None,
        })
    }

    /// Hands every conversation that ends to `f`: one batch per poll (a
    /// million flows may end in one), never an empty one.
    pub fn on_ended(&mut self, f: impl Fn(Vec<Ended>) + Send + 'static) {
        self.ended = Some(Box::new(f));
    }

    /// One poll: DEVICES and STATS read outside the lock, the flow tables
    /// merged under it, then idle and closed flows aged out and long ones
    /// reported.
    pub fn poll(&mut self, tables: &RwLock<Tables>) -> Result<()> {
        // Counters first: the flow table read after them is at least as new.
        self.segstats.lock().unwrap().poll()?;
        let devices = snapshot(&self.devices);
        let stats = stat_sums(&self.stats)?;
        let due = {
            // The flow tables are read under the lock, straight into the
            // records: they are mapped memory (no syscalls), and a copy of a
            // million flows would cost 120 MiB for the length of a poll.
            let mut t = tables.write().unwrap();
            let mut m = t.begin_merge();
            self.flows.v6.for_each(|slot, k, v| m.flow_at(slot, k, v));
            self.flows.v4.for_each(|slot, k, v| m.flow4_at(slot, k, v));
            m.finish(&devices);
            t.set_stats(stats);
            let a = &self.ageing;
            let timeouts = Timeouts {
                idle_ns: a.idle.as_nanos() as u64,
                closed_ns: (a.closed < a.idle).then_some(a.closed.as_nanos() as u64),
                // Records go nowhere without a callback.
                active_ns: a.active.filter(|_| self.ended.is_some()).map(|d| d.as_nanos() as u64),
            };
            t.due(clock::mono_ns(), &timeouts)
        };
        let mut ended = Vec::new();
        for (keys, quiet, reason) in [
            (due.idle, self.ageing.idle, EndReason::Timeout),
            (due.closed, self.ageing.closed, EndReason::Closed),
        ] {
            let quiet_ns = quiet.as_nanos() as u64;
            for k in keys {
                // A packet may have arrived since the snapshot: only remove what
                // is still quiet, so no count is lost. A flow already gone
                // (evicted) is forgotten too.
                let still_quiet = |v: &FlowValue| clock::mono_ns().saturating_sub(v.last_seen_ns) > quiet_ns;
                if self.flows.remove_if(&k, still_quiet) != Some(false)
                    && let Some(e) = tables.write().unwrap().forget_flow(&k, reason)
                {
                    ended.push(e);
                }
            }
        }
        if let Some(f) = &self.ended {
            if !due.active.is_empty() {
                ended.extend(tables.write().unwrap().active_records(due.active));
            }
            if !ended.is_empty() {
                f(ended);
            }
        }
        Ok(())
    }

    /// Polls on a dedicated thread (map reads are blocking syscalls) until
    /// [`Polling::stop`], which runs one last poll first.
    pub fn spawn(mut self, tables: Arc<RwLock<Tables>>, every: Duration) -> Polling {
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mdsec-poller".into())
            .spawn(move || {
                loop {
                    if let Err(e) = self.poll(&tables) {
                        warn!("poll failed: {e:#}");
                    }
                    match stop_rx.recv_timeout(every) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => {
                            if let Err(e) = self.poll(&tables) {
                                warn!("last poll failed: {e:#}");
                            }
                            return;
                        }
                    }
                }
            })
            .expect("spawn poller thread");
        Polling { stop: stop_tx, thread }
    }
}

/// The polling thread.
pub struct Polling {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Polling {
    /// Polls once more and stops: what the tables hold afterwards is final
    /// (no flow ends concurrently with a shutdown's records).
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
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

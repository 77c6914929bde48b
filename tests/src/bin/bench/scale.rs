//! Agent scale: one poll (read the kernel maps, merge into the agent's tables)
//! with 1,000,000 flows and 10,000 devices in the real (loaded, unattached)
//! datapath maps; time per poll, CPU time and resident memory.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::HashMap as BpfHashMap;
use mdsec_agent::{poller::Poller, segstats::SegStats, state::Tables};
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::{FlowKey4, FlowValue},
    maps as names,
};
use mdsec_tests::kernel::{TEST_SEED, TestProg};

pub const FLOWS: u32 = 1_000_000;
pub const DEVICES: u32 = 10_000;
const POLLS: usize = 5;

/// The process's own (anonymous) resident memory. Not VmRSS: that also counts
/// the pages of the kernel's flow tables the process has mapped and read, which
/// are the datapath's memory (see ARCHITECTURE.md, Memory), not the agent's.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("RssAnon:"))?.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn run() -> Result<()> {
    let mut prog =
        TestProg::load_with(names::PROGRAM, &[(names::FLOWS4, FLOWS * 2), (names::DEVICES, DEVICES * 2)])?;
    let now = mdsec_agent::clock::mono_ns();
    let fill = Instant::now();
    {
        let flows6_map = prog.take_map(names::FLOWS)?;
        let flows_map = prog.take_map(names::FLOWS4)?;
        let mut devices_map = prog.take_map(names::DEVICES)?;
        for i in 0..FLOWS {
            let k = FlowKey4 {
                ifindex: 1,
                vlan: 0,
                proto: 6,
                _pad: 0,
                src: [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                dst: [10, 255, 0, 1],
                sport: 40000,
                dport: 2575,
            };
            // Spread over the devices, so the merge sums flows into every one.
            let d = i % DEVICES;
            let v = FlowValue {
                packets: 10,
                bytes: 1500,
                first_seen_ns: now,
                last_seen_ns: now,
                src_mac: [0x02, 0, 0, (d >> 16) as u8, (d >> 8) as u8, d as u8],
                ..Default::default()
            };
            prog.flow_tables().v4.insert(&k, &v)?;
        }
        let mut devices: BpfHashMap<_, DeviceKey, DeviceValue> = BpfHashMap::try_from(&mut devices_map)?;
        for i in 0..DEVICES {
            let k = DeviceKey {
                ifindex: 1,
                vlan: 0,
                mac: [0x02, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            };
            let v = DeviceValue {
                first_seen_ns: now,
                last_seen_ns: now,
                packets: 10,
                bytes: 1500,
                ipv4: [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                ..Default::default()
            };
            devices.insert(k, v, 0)?;
        }
        let segstats = Arc::new(Mutex::new(SegStats::new(prog.take_map(names::SEG_STATS)?)?));
        let fill_t = fill.elapsed();
        let mut poller = Poller::from_maps(
            flows6_map,
            flows_map,
            TEST_SEED,
            devices_map,
            prog.take_map(names::STATS)?,
            segstats,
            Duration::from_secs(3600),
        )?;
        let tables = RwLock::new(Tables::default());
        let rss0 = rss_mib();
        let (mut times, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..POLLS {
            let (t0, c0) = (Instant::now(), cpu_time());
            poller.poll(&tables)?;
            times.push(t0.elapsed());
            cpus.push(cpu_time() - c0);
        }
        let rss1 = rss_mib();
        let t = tables.read().unwrap();
        anyhow::ensure!(
            t.flows.len() == FLOWS as usize && t.devices.len() == DEVICES as usize,
            "poll missed entries"
        );
        drop(t);
        times.sort();
        cpus.sort();
        let (slowest, med, cpu) = (times[POLLS - 1], times[POLLS / 2], cpus[POLLS / 2]);
        let table = format!(
            "| flows | devices | poll + merge (median of {POLLS}) | slowest poll | CPU per poll | agent RSS (tables held) |\n|---|---|---|---|---|---|\n\
             | {FLOWS} | {DEVICES} | {:.2} s | {:.2} s | {:.2} s | {:.0} MiB (+{:.0} MiB for the tables) |\n",
            med.as_secs_f64(),
            slowest.as_secs_f64(),
            cpu.as_secs_f64(),
            rss1,
            rss1 - rss0
        );
        println!("{table}");
        let section = format!(
            "## Agent scale\n\nCommand: `cargo xtask bench scale`. {FLOWS} IPv4 flows (spread over the devices, \
             whose totals the merge derives from them) and {DEVICES} devices are written into the real \
             FLOWS4 table (2,000,000 slots) and DEVICES map of a loaded (unattached) datapath ({:.1} s to fill from userspace), \
             then the agent's poller reads both maps and merges them into its tables {POLLS} times (release \
             build; the flow tables read through their shared mapping, DEVICES with batched reads, as the \
             agent does every `poll_interval_ms`). RSS is the whole benchmark process's anonymous memory \
             after the polls (RssAnon: the mapped flow table is the kernel's memory, not counted). \
             Machine: {}.\n\n{table}\nWith 1,000,000 flows a poll takes \
             about this long: keep `poll_interval_ms` above it (the poller runs on its own thread; the API \
             serves the last merged tables meanwhile). The 10,000-rule policy compile + swap is below.",
            fill_t.as_secs_f64(),
            crate::machine()
        );
        crate::write_section("## Agent scale", &section)
    }
}

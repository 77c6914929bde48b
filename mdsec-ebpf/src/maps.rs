//! Map definitions. Names are fixed (see `mdsec_common::maps`) because they are the
//! pin file names; sizes here are placeholders the agent overrides at load time.
//! Pinning is chosen at load time by the agent (`map_pin_path`), so tests can load
//! the same object without touching bpffs.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::{FlowKey, FlowValue},
    frag::{FragKey, FragValue},
    maps::{DEFAULT_DEVICES_MAX, DEFAULT_FLOWS_MAX, DEFAULT_FRAGS_MAX},
    stats::{Counter, STATS_LEN},
};

#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOWS_MAX, 0);

#[map(name = "DEVICES")]
pub static DEVICES: LruHashMap<DeviceKey, DeviceValue> =
    LruHashMap::with_max_entries(DEFAULT_DEVICES_MAX, 0);

#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_FRAGS_MAX, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);

//! Map definitions. Names are fixed (see `mdsec_common::maps`) because they are the
//! pin file names; sizes here are placeholders the agent overrides at load time.
//! Pinning is chosen at load time by the agent (`map_pin_path`), so tests can load
//! the same object without touching bpffs.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flowtable::{sets_for, FlowSet4, FlowSet6},
    frag::{FragKey, FragValue},
    maps::{
        DEFAULT_ALLOWED_MAX, DEFAULT_DEVICES_MAX, DEFAULT_FLOWS6_MAX, DEFAULT_FLOWS_MAX, DEFAULT_FRAGS_MAX,
        DEFAULT_IDENT_MAX, DEFAULT_MACS_MAX, DEFAULT_POLICY_MAX, EVENTS_BYTES, IFACES_MAX, PORTS_MAX,
        SAMPLES_BYTES,
    },
    policy::{IdentData, MacKey, PolicyConfig, PolicyData, PolicyValue, SegmentInfo, TupleKey, MAX_IDS},
    segstats::SEG_STATS_LEN,
    stats::{Counter, STATS_LEN},
};

// Flow tables managed by the datapath (see `crate::flowtable`); mmap-able so the
// agent reads and ages flows without a syscall per entry.
#[map(name = "FLOWS")]
pub static FLOWS: Array<FlowSet6> = Array::with_max_entries(sets_for(DEFAULT_FLOWS6_MAX), BPF_F_MMAPABLE);

#[map(name = "FLOWS4")]
pub static FLOWS4: Array<FlowSet4> = Array::with_max_entries(sets_for(DEFAULT_FLOWS_MAX), BPF_F_MMAPABLE);

/// The flow tables' hash seed, kept with them; the datapath reads its copy from
/// read-only data (`FLOW_HASH_SEED` in `crate::flowtable`), this map is for the next agent.
#[map(name = "FLOW_SEED")]
pub static FLOW_SEED: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "DEVICES")]
pub static DEVICES: LruHashMap<DeviceKey, DeviceValue> = LruHashMap::with_max_entries(DEFAULT_DEVICES_MAX, 0);

#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(DEFAULT_FRAGS_MAX, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[map(name = "SEG_STATS")]
pub static SEG_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(SEG_STATS_LEN, 0);

// Policy maps (see mdsec_common::policy). Double-buffered by the generation bit in
// every key; `CONFIG` holds the active generation.

#[map(name = "IDENT")]
pub static IDENT: LpmTrie<IdentData, u32> = LpmTrie::with_max_entries(DEFAULT_IDENT_MAX, 0);

#[map(name = "MACS")]
pub static MACS: HashMap<MacKey, u32> = HashMap::with_max_entries(DEFAULT_MACS_MAX, 0);

#[map(name = "POLICY")]
pub static POLICY: LpmTrie<PolicyData, PolicyValue> = LpmTrie::with_max_entries(DEFAULT_POLICY_MAX, 0);

#[map(name = "SEGMENTS")]
pub static SEGMENTS: Array<SegmentInfo> = Array::with_max_entries(2 * MAX_IDS, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<PolicyConfig> = Array::with_max_entries(1, 0);

#[map(name = "IFACES")]
pub static IFACES: HashMap<u32, u32> = HashMap::with_max_entries(IFACES_MAX, 0);

#[map(name = "ALLOWED")]
pub static ALLOWED: LruHashMap<TupleKey, u8> = LruHashMap::with_max_entries(DEFAULT_ALLOWED_MAX, 0);

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "SAMPLES")]
pub static SAMPLES: RingBuf = RingBuf::with_byte_size(SAMPLES_BYTES, 0);

/// A frame's stand-in flow when its own got no slot (see `flowtable::scratch`).
#[map(name = "FLOW_SCRATCH")]
pub static FLOW_SCRATCH: PerCpuArray<crate::flowtable::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// (tokens left in this second, start of the second in ns), per CPU.
#[map(name = "EVENT_BUCKET")]
pub static EVENT_BUCKET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Bump in the wire: ingress ifindex → the peer port's devmap entry.
#[map(name = "PORTS")]
pub static PORTS: DevMapHash = DevMapHash::with_max_entries(PORTS_MAX, 0);

/// Mirror ports: the datapath `mdsec_mirror` hands decapsulated frames to.
#[map(name = "JUDGE")]
pub static JUDGE: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Benchmark only (see `crate::bench`): `[flows, frame offset of the flow number,
/// stride through the flows, unused]`.
#[map(name = "BENCH_CFG")]
pub static BENCH_CFG: Array<[u32; 4]> = Array::with_max_entries(1, 0);

/// Benchmark only: packets of the flow stream so far, per CPU.
#[map(name = "BENCH_I")]
pub static BENCH_I: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The LRU-hash build's flow tables (`lru-flows`, benchmark only): the same
/// keys and values as `FLOWS4` / `FLOWS` in the kernel's own LRU hash.
#[cfg(feature = "lru-flows")]
#[map(name = "FLOWS4_LRU")]
pub static FLOWS4_LRU: LruHashMap<mdsec_common::flow::FlowKey4, mdsec_common::flow::FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOWS_MAX, 0);

#[cfg(feature = "lru-flows")]
#[map(name = "FLOWS6_LRU")]
pub static FLOWS6_LRU: LruHashMap<mdsec_common::flow::FlowKey, mdsec_common::flow::FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_FLOWS6_MAX, 0);

//! Map names and default sizes. The names are the ELF symbol names in the eBPF
//! object and the file names under the pin directory, so they must stay stable.

/// Benchmark baselines in the same object (empty XDP_PASS / XDP_DROP programs).
pub const BASELINE_PASS: &str = "mdsec_baseline_pass";
pub const BASELINE_DROP: &str = "mdsec_baseline_drop";
/// Benchmark: the datapath / an empty program on a stream of distinct flows
/// (the flow number written into each frame, see `BENCH_CFG`).
pub const BENCH_FLOWS: &str = "mdsec_bench_flows";
pub const BENCH_EMPTY: &str = "mdsec_bench_empty";
/// Array[1] of `[flows, frame offset]` for the two entries above; per-CPU
/// `BENCH_I` counts their packets. Never pinned.
pub const BENCH_CFG: &str = "BENCH_CFG";
/// Benchmark baseline: redirect every frame to its peer in `PORTS`.
pub const BASELINE_REDIRECT: &str = "mdsec_baseline_redirect";

/// Mmap-able array of [`crate::flowtable::FlowSet6`]: the table of flows with an
/// IPv6 address.
pub const FLOWS: &str = "FLOWS";
/// Mmap-able array of [`crate::flowtable::FlowSet4`]: the table of IPv4 flows.
pub const FLOWS4: &str = "FLOWS4";
/// Array[1]: the flow tables' hash seed (u64), pinned with them.
pub const FLOW_SEED: &str = "FLOW_SEED";
/// LRU hash: [`crate::device::DeviceKey`] → [`crate::device::DeviceValue`].
pub const DEVICES: &str = "DEVICES";
/// LRU hash: [`crate::frag::FragKey`] → [`crate::frag::FragValue`].
pub const FRAGS: &str = "FRAGS";
/// Per-CPU array indexed by [`crate::stats::Stat`].
pub const STATS: &str = "STATS";

/// LPM trie: [`crate::policy::IdentData`] → identity id (u32).
pub const IDENT: &str = "IDENT";
/// Hash: [`crate::policy::MacKey`] → identity id (u32).
pub const MACS: &str = "MACS";
/// LPM trie: [`crate::policy::PolicyData`] → [`crate::policy::PolicyValue`].
pub const POLICY: &str = "POLICY";
/// Array: gen bit × MAX_IDS + id → [`crate::policy::SegmentInfo`].
pub const SEGMENTS: &str = "SEGMENTS";
/// Array[1]: [`crate::policy::PolicyConfig`].
pub const CONFIG: &str = "CONFIG";
/// Hash: ifindex → `IFACE_*` flags.
pub const IFACES: &str = "IFACES";
/// LRU hash: [`crate::policy::TupleKey`] → u8, reverse tuples of allowed flows.
pub const ALLOWED: &str = "ALLOWED";
/// Ring buffer of [`crate::policy::Event`].
pub const EVENTS: &str = "EVENTS";
/// Ring buffer of [`crate::app::Sample`]: first payloads for fingerprints.
pub const SAMPLES: &str = "SAMPLES";
pub const SAMPLES_BYTES: u32 = 512 * 1024;
/// Per-CPU array of per-segment counters (see [`crate::segstats`]).
pub const SEG_STATS: &str = "SEG_STATS";
/// Per-CPU array[1]: event rate-limit bucket (tokens, last refill ns).
pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
/// Per-CPU array[1]: the stand-in flow of a frame whose flow got no slot, so it
/// is still judged (kernel-private, not pinned).
pub const FLOW_SCRATCH: &str = "FLOW_SCRATCH";

/// Devmap hash: ingress ifindex → the peer port of a bump in the wire
/// (`bpf_devmap_val`, 8 bytes). The agent fills it at every start.
pub const PORTS: &str = "PORTS";
/// Two ports per bump; one entry per port.
pub const PORTS_MAX: u32 = 64;

/// Program array[1]: slot [`JUDGE_SLOT`] holds `mdsec_xdp`, which the mirror
/// entry tail-calls once it has removed a frame's tunnel layers. Pinned: the
/// kernel empties a program array when its last user reference goes, and a
/// mirror port left attached by `on_exit: keep` must go on judging.
pub const JUDGE: &str = "JUDGE";
pub const JUDGE_SLOT: u32 = 0;

/// All maps the agent pins, in a fixed order. The ring buffers (`EVENTS`,
/// `SAMPLES`) and `EVENT_BUCKET` are not pinned: a new agent starts fresh ones.
pub const ALL: [&str; 16] = [
    FLOWS, FLOWS4, FLOW_SEED, DEVICES, FRAGS, STATS, SEG_STATS, IDENT, MACS, POLICY, SEGMENTS, CONFIG,
    IFACES, ALLOWED, PORTS, JUDGE,
];

/// Name of the XDP program in the object (routed, mirror and multi-port bridge ports).
pub const PROGRAM: &str = "mdsec_xdp";
/// Mirror (SPAN/RSPAN/ERSPAN) ports: removes up to `net::MAX_TUNNEL_DEPTH`
/// tunnel layers, then tail-calls [`PROGRAM`] on the inner frame.
pub const MIRROR_PROGRAM: &str = "mdsec_mirror";
/// The same datapath for the two ports of a bump in the wire: forwards what it
/// passes to the peer port (`PORTS`).
pub const BRIDGE_PROGRAM: &str = "mdsec_bridge";

/// Bumped whenever a key or value layout changes. Pins live under a directory named
/// after it, so an upgraded agent never reinterprets the bytes of an older map.
pub const LAYOUT_VERSION: u32 = 7;

/// Compile-time sizes in the object; the agent overrides them at load time.
/// `FLOWS4` (IPv4 flows) and `FLOWS` (IPv6): hospital device traffic is mostly
/// IPv4, so the IPv6 table defaults to a quarter (both preallocate). Flow tables
/// hold whole sets of `flowtable::WAYS` slots: sizes round up to a multiple.
pub const DEFAULT_FLOWS_MAX: u32 = 262_144;
pub const DEFAULT_FLOWS6_MAX: u32 = 65_536;
pub const DEFAULT_DEVICES_MAX: u32 = 16_384;
pub const DEFAULT_FRAGS_MAX: u32 = 8_192;
/// Identity prefixes, both generations together.
pub const DEFAULT_IDENT_MAX: u32 = 16_384;
pub const DEFAULT_MACS_MAX: u32 = 16_384;
/// Policy entries, both generations together.
pub const DEFAULT_POLICY_MAX: u32 = 262_144;
pub const IFACES_MAX: u32 = 256;
pub const DEFAULT_ALLOWED_MAX: u32 = 65_536;
pub const EVENTS_BYTES: u32 = 256 * 1024;

//! Map names and default sizes. The names are the ELF symbol names in the eBPF
//! object and the file names under the pin directory, so they must stay stable.

/// LRU hash: [`crate::flow::FlowKey`] → [`crate::flow::FlowValue`].
pub const FLOWS: &str = "FLOWS";
/// LRU hash: [`crate::device::DeviceKey`] → [`crate::device::DeviceValue`].
pub const DEVICES: &str = "DEVICES";
/// LRU hash: [`crate::frag::FragKey`] → [`crate::frag::FragValue`].
pub const FRAGS: &str = "FRAGS";
/// Per-CPU array indexed by [`crate::stats::Stat`].
pub const STATS: &str = "STATS";

/// All maps the agent pins, in a fixed order.
pub const ALL: [&str; 4] = [FLOWS, DEVICES, FRAGS, STATS];

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "mdsec_xdp";

/// Bumped whenever a key or value layout changes. Pins live under a directory named
/// after it, so an upgraded agent never reinterprets the bytes of an older map.
pub const LAYOUT_VERSION: u32 = 1;

/// Compile-time sizes in the object; the agent overrides them at load time.
pub const DEFAULT_FLOWS_MAX: u32 = 262_144;
pub const DEFAULT_DEVICES_MAX: u32 = 16_384;
pub const DEFAULT_FRAGS_MAX: u32 = 8_192;

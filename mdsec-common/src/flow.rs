//! Flows: one entry per (interface, VLAN, src, dst, proto, sport, dport) as seen on
//! ingress of a gateway interface. Both directions of a connection are two flows.
//!
//! A flow also carries its device's counts: its frames count for the MAC that
//! created it ([`FlowValue::src_mac`]), so the datapath touches `DEVICES` only for
//! frames without a flow, a flow's first frame and frames from another MAC
//! (`foreign_*`, counted in their sender's entry instead). A device's frames are
//! its `DEVICES` counts plus [`FlowValue::owned`] of every flow it owns
//! ([`FlowValue::owner`]).

use crate::{device::DeviceKey, net::is_v4_mapped};

/// Key of the `FLOWS` table. Addresses are IPv6 or IPv4-mapped IPv6; ports are
/// host byte order. For ICMP/ICMPv6, `sport` is the type and `dport` the code (the
/// Zeek convention). For protocols without ports both are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub ifindex: u32,
    /// Innermost VLAN id, 0 when untagged.
    pub vlan: u16,
    pub proto: u8,
    pub _pad: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Key of the `FLOWS4` table: flows whose two addresses are IPv4 (IPv4 frames,
/// and IPv6 frames carrying IPv4-mapped addresses). 20 bytes hash and compare
/// in half the words of [`FlowKey`]'s 44. Userspace sees every flow as a
/// [`FlowKey`]; [`FlowKey::v4`] says which table holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey4 {
    pub ifindex: u32,
    pub vlan: u16,
    pub proto: u8,
    pub _pad: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey4 {
    /// The key of a flow whose addresses `src`/`dst` are IPv4-mapped (the
    /// caller has checked): the one place both sides build it, the datapath
    /// from its packet, userspace in [`FlowKey::v4`].
    #[inline(always)]
    pub fn from_mapped(
        ifindex: u32,
        vlan: u16,
        proto: u8,
        src: &[u8; 16],
        dst: &[u8; 16],
        ports: (u16, u16),
    ) -> FlowKey4 {
        FlowKey4 {
            ifindex,
            vlan,
            proto,
            _pad: 0,
            src: [src[12], src[13], src[14], src[15]],
            dst: [dst[12], dst[13], dst[14], dst[15]],
            sport: ports.0,
            dport: ports.1,
        }
    }
}

impl FlowKey {
    /// Whether `FLOWS4` holds this flow (both addresses IPv4-mapped), without
    /// building its key.
    pub fn is_v4(&self) -> bool {
        is_v4_mapped(&self.src) && is_v4_mapped(&self.dst)
    }

    /// The `FLOWS4` key of this flow, if both addresses are IPv4-mapped (then
    /// that is the table that holds it, never `FLOWS`).
    pub fn v4(&self) -> Option<FlowKey4> {
        if !self.is_v4() {
            return None;
        }
        Some(FlowKey4::from_mapped(
            self.ifindex,
            self.vlan,
            self.proto,
            &self.src,
            &self.dst,
            (self.sport, self.dport),
        ))
    }
}

impl From<FlowKey4> for FlowKey {
    fn from(k: FlowKey4) -> FlowKey {
        FlowKey {
            ifindex: k.ifindex,
            vlan: k.vlan,
            proto: k.proto,
            _pad: 0,
            src: crate::net::v4_mapped(k.src),
            dst: crate::net::v4_mapped(k.dst),
            sport: k.sport,
            dport: k.dport,
        }
    }
}

/// Where [`FlowValue::tcp_flags`] keeps the creating segment's flags.
pub const OPEN_FLAGS_SHIFT: u32 = 8;

/// A new entry's `tcp_flags` word: the creating segment's flags as the
/// union so far and, kept from then on, as its creating flags.
pub const fn first_tcp_flags(flags: u8) -> u64 {
    (flags as u64) | ((flags as u64) << OPEN_FLAGS_SHIFT)
}

/// A flow in the `FLOWS` and `FLOWS4` tables. Timestamps are `CLOCK_MONOTONIC_COARSE` nanoseconds.
///
/// Counts are split by writer: the flow's home CPU (the one that created it,
/// where RSS keeps steering it) adds to `packets`/`bytes` with plain adds, as
/// the only writer of those words (XDP never nests on a CPU); any other CPU adds
/// to `remote_*` atomically. The flow's frames are the sum; the agent's reads
/// fold `remote_*` in (`mdsec_agent::flowtable`), so userspace sees totals in
/// `packets`/`bytes` and zeros here. Read order matters for torn reads: the
/// totals come before the foreign counts in memory (see [`FlowValue::owned`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub packets: u64,
    /// Frame bytes, Ethernet header and VLAN tags included.
    pub bytes: u64,
    pub remote_packets: u64,
    pub remote_bytes: u64,
    /// Frames (and their bytes) of this flow sent by a MAC other than `src_mac`
    /// (included in the totals).
    pub foreign_packets: u64,
    pub foreign_bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Union of the TCP flags byte of every segment (bits 0–7), and the flags of
    /// the segment that created the entry (bits 8–15, [`OPEN_FLAGS_SHIFT`]): a
    /// SYN without ACK there means this direction opened the connection. A full
    /// word so the kernel can OR into it atomically (BPF atomics are 32/64-bit only).
    pub tcp_flags: u64,
    /// Policy cache: the verdict below holds until this `CLOCK_MONOTONIC_COARSE` ns (an
    /// exception's expiry), u64::MAX otherwise.
    pub valid_until_ns: u64,
    /// Policy generation that produced the cached verdict (0: never evaluated).
    pub generation: u32,
    /// Rule that allowed (or, for app mismatches, required the app); 0 = default.
    pub rule: u32,
    pub src_id: u32,
    pub dst_id: u32,
    /// Segment the verdict is accounted to (1-based in its generation): the
    /// allowing rule's segment, or the segment whose default denied; 0 for
    /// traffic of no segment and exempt control traffic.
    pub segment: u32,
    /// Generation for which a deny event was emitted (one event per flow and gen).
    pub reported_generation: u32,
    /// Source MAC of the frame that created the flow: the device that owns it.
    pub src_mac: [u8; 6],
    /// The CPU that writes `packets`/`bytes` ([`NO_HOME_CPU`]: none).
    pub home_cpu: u16,
    /// [`crate::policy::Verdict`] as u8.
    pub verdict: u8,
    /// Application identified from the first payload ([`crate::app::App`]).
    pub app: u8,
    /// Application the allowing rule requires, 0 = any.
    pub required_app: u8,
    /// [`crate::app::Confidence`] of `app`.
    pub app_confidence: u8,
    /// [`APP_FINAL`] once the label is final; [`APP_TRYING`] | n after n
    /// payloads too short to decide ([`next_app_done`]); 0 before any.
    pub app_done: u8,
    pub _pad: [u8; 3],
}

/// `FlowValue::app_done` once the direction's label is final.
pub const APP_FINAL: u8 = 1;
/// `FlowValue::app_done` bit: payloads were classified but decided nothing yet.
pub const APP_TRYING: u8 = 0x80;
/// Payloads a direction gets before its label is final, at most.
pub const APP_TRIES: u8 = 4;
/// A payload this long decides, matched or not; a shorter one (a 2-byte
/// leading segment) without a match leaves the direction to its next payload.
pub const APP_DECISIVE_BYTES: usize = 8;

/// `app_done` after classifying one more payload of `len` bytes with
/// `confidence`: final on a payload match, on a payload long enough to
/// decide, or after [`APP_TRIES`] payloads; else one more try counted. The
/// datapath and the reference model both step with this.
#[inline(always)]
pub const fn next_app_done(done: u8, high: bool, len: usize) -> u8 {
    let tries = if done & APP_TRYING != 0 { (done & !APP_TRYING) + 1 } else { 1 };
    if high || len >= APP_DECISIVE_BYTES || tries >= APP_TRIES { APP_FINAL } else { APP_TRYING | tries }
}

/// `FlowValue::home_cpu` of a flow no CPU counts with plain adds (CPU numbers
/// beyond a u16).
pub const NO_HOME_CPU: u16 = u16::MAX;

impl FlowValue {
    /// The TCP flags of the segment that created this entry.
    pub const fn open_tcp_flags(&self) -> u8 {
        (self.tcp_flags >> OPEN_FLAGS_SHIFT) as u8
    }

    /// Both writers' counts as totals in `packets`/`bytes` (what userspace works
    /// with).
    pub fn folded(mut self) -> FlowValue {
        self.packets = self.packets.wrapping_add(self.remote_packets);
        self.bytes = self.bytes.wrapping_add(self.remote_bytes);
        self.remote_packets = 0;
        self.remote_bytes = 0;
        self
    }

    /// The device the flow's own frames count for.
    pub fn owner(&self, k: &FlowKey) -> DeviceKey {
        DeviceKey { ifindex: k.ifindex, vlan: k.vlan, mac: self.src_mac }
    }

    /// (frames, bytes) the flow counts for its owner, of a [`FlowValue::folded`]
    /// copy. A copy taken while the datapath updates the entry may say too few
    /// (the datapath adds the foreign counts first, readers read them last),
    /// never too many.
    pub fn owned(&self) -> (u64, u64) {
        (self.packets.saturating_sub(self.foreign_packets), self.bytes.saturating_sub(self.foreign_bytes))
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for FlowValue {}

    impl FlowKey {
        pub fn src_ip(&self) -> std::net::IpAddr {
            crate::net::ip_from_key(self.src)
        }
        pub fn dst_ip(&self) -> std::net::IpAddr {
            crate::net::ip_from_key(self.dst)
        }
    }
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);
const _: () = assert!(core::mem::size_of::<FlowKey4>() == 20);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 120);
// The datapath compares `src_mac` as one u32 and one u16 load.
const _: () = assert!(core::mem::offset_of!(FlowValue, src_mac) % 8 == 0);

//! Flows: one entry per (interface, VLAN, src, dst, proto, sport, dport) as seen on
//! ingress of a gateway interface. Both directions of a connection are two flows.

/// Key of the `FLOWS` LRU hash. Addresses are IPv6 or IPv4-mapped IPv6; ports are
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

/// Value of the `FLOWS` LRU hash. Timestamps are `CLOCK_BOOTTIME` nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub packets: u64,
    /// Frame bytes, Ethernet header and VLAN tags included.
    pub bytes: u64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Union of the TCP flags byte of every segment (low 8 bits). A full word so the
    /// kernel can OR into it atomically (BPF atomics are 32/64-bit only).
    pub tcp_flags: u64,
    /// Policy cache: the verdict below holds until this `CLOCK_BOOTTIME` ns (an
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
    /// [`crate::policy::Verdict`] as u8.
    pub verdict: u8,
    /// Application identified from the first payload ([`crate::app::App`]).
    pub app: u8,
    /// Application the allowing rule requires, 0 = any.
    pub required_app: u8,
    /// [`crate::app::Confidence`] of `app`.
    pub app_confidence: u8,
    /// 1 once the first payload has been classified (classification runs once).
    pub app_done: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for FlowKey {}
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
const _: () = assert!(core::mem::size_of::<FlowValue>() == 80);

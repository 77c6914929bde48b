//! Devices: one entry per (interface, VLAN, source MAC) seen on ingress.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub ifindex: u32,
    /// Innermost VLAN id, 0 when untagged.
    pub vlan: u16,
    pub mac: [u8; 6],
}

/// Value of the `DEVICES` LRU hash. Timestamps are `CLOCK_MONOTONIC_COARSE` nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceValue {
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Frames and frame bytes sent by this MAC that no flow it owns counts (see
    /// `crate::flow`): the device's total adds its flows' [`owned`] counts.
    ///
    /// [`owned`]: crate::flow::FlowValue::owned
    pub packets: u64,
    pub bytes: u64,
    /// Last IPv4 source address (IP header or ARP sender) of a frame that touched
    /// this entry (a new address always starts a new flow), all zero if none yet.
    pub ipv4: [u8; 4],
    /// Last IPv6 source address, all zero if none yet.
    pub ipv6: [u8; 16],
    /// Gratuitous ARPs ([`crate::net::arp_gratuitous`]) this MAC sent, for
    /// the flood detection (it wraps; users take differences).
    pub gratuitous_arps: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for DeviceKey {}
    unsafe impl aya::Pod for DeviceValue {}
}

const _: () = assert!(core::mem::size_of::<DeviceKey>() == 12);
const _: () = assert!(core::mem::size_of::<DeviceValue>() == 56);

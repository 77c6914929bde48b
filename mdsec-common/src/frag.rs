//! Fragment tracking: later fragments carry no ports, so the first fragment of each
//! datagram leaves its ports here, keyed by the datagram identity, and later fragments
//! are accounted to that flow. A later fragment whose first fragment was not seen
//! (reordering, or a first fragment lost) goes to the *fragment bucket*: the flow with
//! the same addresses and protocol and ports 0.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub ifindex: u32,
    pub vlan: u16,
    pub proto: u8,
    pub _pad: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification (32 bits).
    pub id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
}

const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

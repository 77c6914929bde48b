//! Parse stage: Ethernet → up to two VLAN tags → ARP / IPv4 / IPv6 (+ bounded
//! extension headers) → TCP / UDP / ICMP / ICMPv6 / other.
//!
//! `parse` fills a [`Packet`] as far as the frame allows and returns the reason it
//! stopped early, if any. What was filled before the stop is still used by the
//! account stage (a frame with a good Ethernet header but a truncated IP header still
//! counts for its sending device).

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use mdsec_common::{
    net::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_DSTOPTS,
        IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_ROUTING, IPPROTO_TCP,
        IPPROTO_UDP, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS,
    },
    stats::Stat,
};

pub use mdsec_common::net::{FRAG_FIRST, FRAG_LATER, FRAG_NONE, L3_ARP, L3_IPV4, L3_IPV6, L3_NONE, L3_OTHER};

// Packet::init relies on the "nothing yet" values being zero.
const _: () = assert!(L3_NONE == 0 && FRAG_NONE == 0);
// account::same_mac loads the MAC as a u32 and a u16, account::mapped an address
// as a u64 and a u32.
const _: () = assert!(core::mem::offset_of!(Packet, src_mac) % 8 == 0);
const _: () =
    assert!(core::mem::offset_of!(Packet, src) % 8 == 0 && core::mem::offset_of!(Packet, dst) % 8 == 0);

// 8-byte aligned, arrays first: the all-zero start is ten 64-bit stores, not a
// call to the BPF target's byte-wise memset (see `Packet::init`).
#[repr(C, align(8))]
pub struct Packet {
    /// Source and destination addresses (IPv4-mapped for IPv4); valid with `has_addrs`.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_mac: [u8; 6],
    /// ARP sender protocol address.
    pub arp_spa: [u8; 4],
    /// ARP target protocol address (with `arp_spa`, for
    /// `mdsec_common::net::arp_announces`).
    pub arp_tpa: [u8; 4],
    pub ifindex: u32,
    pub frag_id: u32,
    /// Innermost VLAN id, 0 when untagged.
    pub vlan: u16,
    pub sport: u16,
    pub dport: u16,
    /// Bytes of L4 payload (by the IP lengths, so Ethernet padding is not payload).
    pub payload_len: u16,
    /// Frame offset of the L4 payload.
    pub payload_off: u16,
    /// Frame offset where the IP datagram ends (from its length fields).
    l3_end: u16,
    /// An Ethernet header was present (the frame has a source MAC).
    pub has_eth: bool,
    pub vlan_tags: u8,
    pub l3: u8,
    /// Source and destination addresses are valid.
    pub has_addrs: bool,
    pub proto: u8,
    /// Ports (or ICMP type/code) are known; for port-less protocols they are 0.
    pub has_l4: bool,
    pub tcp_flags: u8,
    pub frag: u8,
}

impl Packet {
    /// Zeroes `slot` in place and returns it as a packet of `ifindex`. In place
    /// and with volatile 64-bit stores: a by-value all-zero Packet becomes a call
    /// to the BPF target's byte-wise memset (about 400 instructions).
    #[inline(always)]
    pub fn init(slot: &mut core::mem::MaybeUninit<Packet>, ifindex: u32) -> &mut Packet {
        let words = slot.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < size_of::<Packet>() / 8 {
            // SAFETY: in bounds of the 8-aligned struct.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
            i += 1;
        }
        // SAFETY: every field is an integer, a bool or an array of u8, and all-zero
        // is a valid value of each (false, 0, L3_NONE, FRAG_NONE).
        let p = unsafe { slot.assume_init_mut() };
        p.ifindex = ifindex;
        p
    }
}

/// Writes `::ffff:a.b.c.d` (the map address form, see `mdsec_common::net::v4_mapped`)
/// into an address field of [`Packet`] (8-aligned) with three stores: building
/// the array by value makes LLVM call a byte-wise memset for its zeros.
#[inline(always)]
fn set_v4_mapped(dst: &mut [u8; 16], a: [u8; 4]) {
    let w = dst.as_mut_ptr();
    // SAFETY: `dst` is a 16-byte field at an 8-aligned offset of the 8-aligned
    // Packet; volatile keeps LLVM from merging the stores into a memset.
    unsafe {
        core::ptr::write_volatile(w as *mut u64, 0);
        core::ptr::write_volatile(w.add(8) as *mut u32, u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        core::ptr::write_volatile(w.add(12) as *mut u32, u32::from_ne_bytes(a));
    }
}

/// Bounds-checked pointer to a `T` at `off` bytes into the frame. The explicit
/// comparison against `data_end` is what the verifier needs to see.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
pub(crate) fn be16(a: u8, b: u8) -> u16 {
    ((a as u16) << 8) | b as u16
}

// Inlined: packet pointers must not cross a BPF-to-BPF call (LLVM would pass
// data_end as a truncated scalar, which the verifier rejects).
#[inline(always)]
pub fn parse(ctx: &XdpContext, p: &mut Packet) -> Result<(), Stat> {
    let eth: *const [u8; ETH_HLEN] = ptr_at(ctx, 0).ok_or(Stat::TruncEth)?;
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &*eth };
    p.has_eth = true;
    p.src_mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    let mut ethertype = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;

    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag: *const [u8; 4] = ptr_at(ctx, off).ok_or(Stat::TruncVlan)?;
        // SAFETY: bounds checked by ptr_at.
        let tag = unsafe { &*tag };
        p.vlan = be16(tag[0], tag[1]) & 0x0fff;
        p.vlan_tags += 1;
        ethertype = be16(tag[2], tag[3]);
        off += 4;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(Stat::VlanTooDeep);
    }

    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, off, p),
        ETH_P_IPV6 => parse_ipv6(ctx, off, p),
        ETH_P_ARP => parse_arp(ctx, off, p),
        _ => {
            p.l3 = L3_OTHER;
            Ok(())
        }
    }
}

#[inline(always)]
fn parse_arp(ctx: &XdpContext, off: usize, p: &mut Packet) -> Result<(), Stat> {
    p.l3 = L3_ARP;
    // Ethernet/IPv4 ARP: 8-byte header, sender MAC (6), sender IP (4), …
    let h: *const [u8; 28] = ptr_at(ctx, off).ok_or(Stat::TruncArp)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    // Only Ethernet (1) / IPv4 (0x0800) ARP carries an IPv4 sender address.
    if be16(h[0], h[1]) == 1 && be16(h[2], h[3]) == ETH_P_IP {
        p.arp_spa = [h[14], h[15], h[16], h[17]];
        p.arp_tpa = [h[24], h[25], h[26], h[27]];
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize, p: &mut Packet) -> Result<(), Stat> {
    p.l3 = L3_IPV4;
    let h: *const [u8; 20] = ptr_at(ctx, off).ok_or(Stat::TruncIpv4)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    if h[0] >> 4 != 4 {
        return Err(Stat::BadIpv4Version);
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    if ihl < 20 {
        return Err(Stat::BadIpv4Ihl);
    }
    let total = be16(h[2], h[3]) as usize;
    // Frames may be longer than the datagram (Ethernet padding), never shorter.
    if total < ihl || off + total > ctx.data_end() - ctx.data() {
        return Err(Stat::BadIpv4Len);
    }
    p.l3_end = (off + total) as u16;
    set_v4_mapped(&mut p.src, [h[12], h[13], h[14], h[15]]);
    set_v4_mapped(&mut p.dst, [h[16], h[17], h[18], h[19]]);
    p.has_addrs = true;
    p.proto = h[9];

    let frag = be16(h[6], h[7]);
    if frag & 0x3fff != 0 {
        p.frag_id = be16(h[4], h[5]) as u32;
        if frag & 0x1fff != 0 {
            p.frag = FRAG_LATER;
            return Ok(());
        }
        p.frag = FRAG_FIRST;
    }
    parse_l4(ctx, off + ihl, p)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize, p: &mut Packet) -> Result<(), Stat> {
    p.l3 = L3_IPV6;
    let h: *const [u8; 40] = ptr_at(ctx, off).ok_or(Stat::TruncIpv6)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*h };
    if h[0] >> 4 != 6 {
        return Err(Stat::BadIpv6Version);
    }
    p.l3_end = (off + 40 + be16(h[4], h[5]) as usize) as u16;
    let mut i = 0;
    while i < 16 {
        p.src[i] = h[8 + i];
        p.dst[i] = h[24 + i];
        i += 1;
    }
    p.has_addrs = true;
    let mut nh = h[6];
    let mut off = off + 40;

    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match nh {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e: *const [u8; 2] = ptr_at(ctx, off).ok_or(Stat::TruncIpv6Ext)?;
                // SAFETY: bounds checked by ptr_at.
                let e = unsafe { &*e };
                nh = e[0];
                off += (e[1] as usize + 1) * 8;
                // The header's body is skipped, not read: check it is all there.
                if off > ctx.data_end() - ctx.data() {
                    return Err(Stat::TruncIpv6Ext);
                }
            }
            IPPROTO_FRAGMENT => {
                let e: *const [u8; 8] = ptr_at(ctx, off).ok_or(Stat::TruncIpv6Ext)?;
                // SAFETY: bounds checked by ptr_at.
                let e = unsafe { &*e };
                nh = e[0];
                off += 8;
                let fo = be16(e[2], e[3]);
                p.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                if fo & 0xfff8 != 0 {
                    p.proto = nh;
                    p.frag = FRAG_LATER;
                    return Ok(());
                }
                // An atomic fragment (offset 0, M clear) is a whole datagram.
                if fo & 1 != 0 {
                    p.frag = FRAG_FIRST;
                }
            }
            _ => break,
        }
    }
    p.proto = nh;
    if matches!(nh, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT) {
        return Err(Stat::Ipv6ExtTooDeep);
    }
    parse_l4(ctx, off, p)
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, off: usize, p: &mut Packet) -> Result<(), Stat> {
    let header = match p.proto {
        IPPROTO_TCP => {
            let h: *const [u8; 20] = ptr_at(ctx, off).ok_or(Stat::TruncL4)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            if h[12] >> 4 < 5 {
                return Err(Stat::BadTcpOffset);
            }
            p.sport = be16(h[0], h[1]);
            p.dport = be16(h[2], h[3]);
            p.tcp_flags = h[13];
            (h[12] >> 4) as usize * 4
        }
        IPPROTO_UDP => {
            let h: *const [u8; 8] = ptr_at(ctx, off).ok_or(Stat::TruncL4)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            p.sport = be16(h[0], h[1]);
            p.dport = be16(h[2], h[3]);
            8
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // type, code, checksum
            let h: *const [u8; 4] = ptr_at(ctx, off).ok_or(Stat::TruncL4)?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*h };
            p.sport = h[0] as u16;
            p.dport = h[1] as u16;
            4
        }
        _ => 0,
    };
    p.has_l4 = true;
    let end = p.l3_end as usize;
    if end > off + header {
        p.payload_len = (end - off - header) as u16;
        p.payload_off = (off + header) as u16;
    }
    Ok(())
}

//! Wire constants shared by the kernel parser and userspace.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
/// PPPoE session stage (RFC 2516); discovery (0x8863) is not a tunnel.
pub const ETH_P_PPPOE_SESSION: u16 = 0x8864;
/// Transparent Ethernet bridging: GRE carrying a whole Ethernet frame.
pub const ETH_P_TEB: u16 = 0x6558;
/// GRE protocol of ERSPAN type I and II (type I has no sequence number and no
/// ERSPAN header).
pub const ETH_P_ERSPAN: u16 = 0x88BE;
/// GRE protocol of ERSPAN type III.
pub const ETH_P_ERSPAN3: u16 = 0x22EB;
/// PPP protocol numbers of the network layers a PPPoE session carries.
pub const PPP_IPV4: u16 = 0x0021;
pub const PPP_IPV6: u16 = 0x0057;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 in IP (RFC 2003).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 in IP: 6in4 (RFC 4213) and IPv6 in IPv6.
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// What the parser found at layer 3 (`l3` of a parsed packet). Zero means
/// nothing yet: the kernel zero-fills its packet before parsing.
pub const L3_NONE: u8 = 0;
pub const L3_ARP: u8 = 1;
pub const L3_IPV4: u8 = 4;
pub const L3_IPV6: u8 = 6;
pub const L3_OTHER: u8 = 255;

/// Fragment position (`frag` of a parsed packet); zero means not a fragment.
pub const FRAG_NONE: u8 = 0;
/// Offset 0 with more-fragments set: carries the L4 header.
pub const FRAG_FIRST: u8 = 1;
/// Offset > 0: no L4 header.
pub const FRAG_LATER: u8 = 2;

/// At most this many VLAN tags are parsed (802.1ad S-tag + 802.1Q C-tag).
pub const MAX_VLAN_TAGS: usize = 2;
/// At most this many IPv6 extension headers are skipped before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// VXLAN's IANA port (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;
/// Mirror ports: at most this many tunnel layers are removed before a frame is
/// judged (ERSPAN carrying a VXLAN fabric's frame is two).
pub const MAX_TUNNEL_DEPTH: usize = 3;

/// Writes an IPv4 address as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), the
/// single address form used in every map key.
#[inline(always)]
pub fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// A gratuitous ARP (an announcement, request or reply): Ethernet/IPv4 ARP
/// whose sender address is set and equal to its target address. `arp` is
/// the ARP header and body (28 bytes). Element by element: a slice compare
/// would be a memcmp call in BPF.
#[inline(always)]
pub fn arp_gratuitous(arp: &[u8; 28]) -> bool {
    let eth_ipv4 = arp[0] == 0 && arp[1] == 1 && arp[2] == 0x08 && arp[3] == 0x00;
    let spa = [arp[14], arp[15], arp[16], arp[17]];
    let tpa = [arp[24], arp[25], arp[26], arp[27]];
    eth_ipv4 && arp_announces(spa, tpa) == 1
}

/// 1 when the sender address is set and equals the target address, else 0.
/// Arithmetic only: in the datapath a branch here would be followed by the
/// verifier through the whole rest of the program.
#[inline(always)]
pub fn arp_announces(spa: [u8; 4], tpa: [u8; 4]) -> u32 {
    let (s, t) = (u32::from_ne_bytes(spa), u32::from_ne_bytes(tpa));
    let x = s ^ t;
    // The top bit of `v | -v` is set exactly when `v != 0`.
    let differ = (x | x.wrapping_neg()) >> 31;
    let set = (s | s.wrapping_neg()) >> 31;
    (differ ^ 1) & set
}

/// True for `::ffff:a.b.c.d`, the form [`v4_mapped`] writes.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

#[cfg(feature = "user")]
mod user {
    use std::net::{IpAddr, Ipv6Addr};

    /// Turns a map address back into the address family it came from.
    pub fn ip_from_key(addr: [u8; 16]) -> IpAddr {
        let v6 = Ipv6Addr::from(addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    /// The inverse of [`ip_from_key`].
    pub fn ip_to_key(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => super::v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }
}
#[cfg(feature = "user")]
pub use user::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arps_are_announcements_of_a_set_address() {
        let arp = |htype: u8, spa: [u8; 4], tpa: [u8; 4]| {
            let mut a = [0u8; 28];
            a[..8].copy_from_slice(&[0, htype, 8, 0, 6, 4, 0, 1]);
            a[14..18].copy_from_slice(&spa);
            a[24..28].copy_from_slice(&tpa);
            a
        };
        assert!(arp_gratuitous(&arp(1, [10, 0, 1, 2], [10, 0, 1, 2])));
        assert!(!arp_gratuitous(&arp(1, [10, 0, 1, 2], [10, 0, 1, 1])), "an ordinary request");
        assert!(!arp_gratuitous(&arp(1, [0; 4], [0; 4])), "a probe (sender 0.0.0.0)");
        assert!(!arp_gratuitous(&arp(6, [10, 0, 1, 2], [10, 0, 1, 2])), "not Ethernet");
        for (s, t) in [([1, 2, 3, 4], [1, 2, 3, 4]), ([255; 4], [255; 4]), ([0, 0, 0, 1], [0, 0, 0, 1])] {
            assert_eq!(arp_announces(s, t), 1, "{s:?}");
        }
        for (s, t) in [([1, 2, 3, 4], [1, 2, 3, 5]), ([0; 4], [0; 4]), ([128, 0, 0, 0], [0; 4])] {
            assert_eq!(arp_announces(s, t), 0, "{s:?} {t:?}");
        }
    }
}

//! Account stage: per-reason category counters, the sending device, the flow, and
//! fragment bookkeeping. Counters shared between CPUs use atomic adds so counts are
//! exact under concurrent receive queues.

use aya_ebpf::bindings::BPF_NOEXIST;
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::{FlowKey, FlowValue},
    frag::{FragKey, FragValue},
    net::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    stats::Stat,
};

use crate::{
    maps::{DEVICES, FLOWS, FRAGS},
    parse::{Packet, FRAG_FIRST, FRAG_LATER, L3_ARP, L3_IPV4, L3_IPV6, L3_OTHER},
    stats::count,
};

use crate::atomic::{add, or};

/// Accounts the frame and returns its flow entry, if it has one, for the verdict
/// stage.
pub fn account(p: &Packet, now: u64, len: u64) -> Option<*mut FlowValue> {
    if !p.has_eth {
        return None;
    }
    categories(p, len);
    device(p, now, len);
    if p.has_addrs && (p.has_l4 || p.frag == FRAG_LATER) {
        return flow(p, now, len);
    }
    None
}

#[inline(always)]
fn categories(p: &Packet, len: u64) {
    if p.vlan_tags > 0 {
        count(Stat::VlanTagged, len);
    }
    match p.l3 {
        L3_ARP => count(Stat::Arp, len),
        L3_IPV4 => count(Stat::Ipv4, len),
        L3_IPV6 => count(Stat::Ipv6, len),
        L3_OTHER => count(Stat::OtherL3, len),
        _ => {}
    }
    if p.has_addrs {
        match p.proto {
            IPPROTO_TCP => count(Stat::Tcp, len),
            IPPROTO_UDP => count(Stat::Udp, len),
            IPPROTO_ICMP => count(Stat::Icmp, len),
            IPPROTO_ICMPV6 => count(Stat::Icmpv6, len),
            _ => count(Stat::OtherL4, len),
        }
    }
}

#[inline(always)]
fn is_zero<const N: usize>(a: &[u8; N]) -> bool {
    let mut i = 0;
    while i < N {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

// Not inlined: each stage gets its own 512-byte BPF stack frame.
#[inline(never)]
fn device(p: &Packet, now: u64, len: u64) {
    let key = DeviceKey { ifindex: p.ifindex, vlan: p.vlan, mac: p.src_mac };
    // Unspecified sources (DHCP discover, IPv6 DAD) say nothing about the device.
    let mut v4 = [0u8; 4];
    let mut v6 = [0u8; 16];
    if p.l3 == L3_ARP {
        v4 = p.arp_spa;
    } else if p.has_addrs && p.l3 == L3_IPV4 {
        v4 = [p.src[12], p.src[13], p.src[14], p.src[15]];
    } else if p.has_addrs && p.l3 == L3_IPV6 {
        v6 = p.src;
    }
    let link_local = v6[0] == 0xfe && v6[1] & 0xc0 == 0x80;

    if let Some(d) = DEVICES.get_ptr_mut(&key) {
        update_device(d, now, len, &v4, &v6, link_local);
        return;
    }
    let new = DeviceValue {
        first_seen_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: len,
        ipv4: v4,
        ipv6: v6,
        _pad: [0; 4],
    };
    if DEVICES.insert(&key, &new, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU created it between our lookup and insert.
    match DEVICES.get_ptr_mut(&key) {
        Some(d) => update_device(d, now, len, &v4, &v6, link_local),
        None => count(Stat::DeviceUpdateFail, len),
    }
}

#[inline(always)]
fn update_device(d: *mut DeviceValue, now: u64, len: u64, v4: &[u8; 4], v6: &[u8; 16], ll: bool) {
    // SAFETY: `d` is a live map value; racing plain stores of timestamps/addresses
    // only ever write a value some CPU just observed.
    unsafe {
        add(&mut (*d).packets, 1);
        add(&mut (*d).bytes, len);
        (*d).last_seen_ns = now;
        if !is_zero(v4) {
            (*d).ipv4 = *v4;
        }
        // A global address is more useful than the link-local one every host has.
        if !is_zero(v6) && (!ll || is_zero(&(*d).ipv6)) {
            (*d).ipv6 = *v6;
        }
    }
}

#[inline(never)]
fn flow(p: &Packet, now: u64, len: u64) -> Option<*mut FlowValue> {
    let mut key = FlowKey {
        ifindex: p.ifindex,
        vlan: p.vlan,
        proto: p.proto,
        _pad: 0,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
    };
    if p.frag != 0 {
        fragment(p, &mut key, len);
    }

    if let Some(f) = FLOWS.get_ptr_mut(&key) {
        update_flow(f, now, len, p.tcp_flags);
        return Some(f);
    }
    let new = FlowValue {
        packets: 1,
        bytes: len,
        first_seen_ns: now,
        last_seen_ns: now,
        tcp_flags: p.tcp_flags as u64,
        valid_until_ns: 0,
        generation: 0,
        rule: 0,
        src_id: 0,
        dst_id: 0,
        segment: 0,
        reported_generation: 0,
        verdict: 0,
        app: 0,
        required_app: 0,
        app_confidence: 0,
        app_done: 0,
        _pad: [0; 3],
    };
    let inserted = FLOWS.insert(&key, &new, BPF_NOEXIST as u64).is_ok();
    match FLOWS.get_ptr_mut(&key) {
        Some(f) => {
            // Lost the race to another CPU's insert: add this packet to its entry.
            if !inserted {
                update_flow(f, now, len, p.tcp_flags);
            }
            Some(f)
        }
        None => {
            count(Stat::FlowUpdateFail, len);
            None
        }
    }
}

#[inline(always)]
fn update_flow(f: *mut FlowValue, now: u64, len: u64, tcp_flags: u8) {
    // SAFETY: `f` is a live map value.
    unsafe {
        add(&mut (*f).packets, 1);
        add(&mut (*f).bytes, len);
        (*f).last_seen_ns = now;
        // Read first: most segments add no new flag, and a plain load is cheaper.
        if tcp_flags as u64 & !(*f).tcp_flags != 0 {
            or(&mut (*f).tcp_flags, tcp_flags as u64);
        }
    }
}

/// First fragments leave their ports for the later ones; later fragments take them
/// (or stay in the ports-0 bucket flow when the first fragment was not seen).
#[inline(always)]
fn fragment(p: &Packet, key: &mut FlowKey, len: u64) {
    let fkey = FragKey {
        ifindex: p.ifindex,
        vlan: p.vlan,
        proto: p.proto,
        _pad: 0,
        src: p.src,
        dst: p.dst,
        id: p.frag_id,
    };
    if p.frag == FRAG_FIRST {
        count(Stat::FragFirst, len);
        let ports = FragValue { sport: p.sport, dport: p.dport };
        if FRAGS.insert(&fkey, &ports, 0).is_err() {
            count(Stat::FragUpdateFail, len);
        }
    } else if let Some(ports) = FRAGS.get_ptr(&fkey) {
        // SAFETY: live map value.
        unsafe {
            key.sport = (*ports).sport;
            key.dport = (*ports).dport;
        }
        count(Stat::FragMatched, len);
    } else {
        count(Stat::FragBucket, len);
    }
}

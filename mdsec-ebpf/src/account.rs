//! Account stage: per-reason category counters, the flow, the sending device, and
//! fragment bookkeeping. Counters shared between CPUs use atomic adds so counts are
//! exact under concurrent receive queues.
//!
//! A frame of an established flow from the flow's own MAC touches only its flow:
//! the flow counts for its device (see `mdsec_common::flow`). `DEVICES` is written
//! for frames without a flow, a flow's first frame (to record the device and its
//! address) and frames from another MAC (`foreign_*` on the flow).

use aya_ebpf::{bindings::BPF_NOEXIST, maps::Array};
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::{first_tcp_flags, FlowKey, FlowKey4, FlowValue, NO_HOME_CPU},
    flowtable::{Aligned, FlowSet, TableKey},
    frag::{FragKey, FragValue},
    net::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    stats::Stat,
};

use crate::{
    flowtable::{self, Hit, Insert},
    maps::{DEVICES, FLOWS, FLOWS4, FRAGS},
    parse::{Packet, FRAG_FIRST, FRAG_LATER, L3_ARP, L3_IPV4, L3_IPV6, L3_OTHER},
    stats::count,
};

use crate::atomic::{add, add32, or};

/// Accounts the frame and returns its flow entry, if it has one, for the verdict
/// stage.
pub fn account(p: &Packet, now: u64, len: u64) -> Option<Hit> {
    if !p.has_eth {
        return None;
    }
    categories(p, len);
    if p.has_addrs && (p.has_l4 || p.frag == FRAG_LATER) {
        let mut f = Hit::NONE;
        let dev = flow(p, now, len, &mut f);
        match dev {
            Dev::Untouched => {}
            Dev::Record => device(p, now, 0, 0),
            Dev::Count => device(p, now, 1, len),
        }
        return f.some();
    }
    device(p, now, 1, len);
    None
}

/// What the frame means for its sender's `DEVICES` entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dev {
    /// Counted by a flow the sender owns.
    Untouched,
    /// Counted by a new flow the sender owns: record the device and address only.
    Record,
    /// Not counted for the sender by any flow (another MAC's flow, or no flow).
    Count,
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

/// Adds `packets` frames of `len` bytes to the sender's entry (creating it) and
/// records its address. Not inlined: each stage gets its own 512-byte stack frame.
#[inline(never)]
fn device(p: &Packet, now: u64, packets: u64, len: u64) {
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
    // Zero unless an Ethernet/IPv4 ARP set the addresses; computed without
    // a branch (one here is followed through the rest of the program).
    let garp = mdsec_common::net::arp_announces(p.arp_spa, p.arp_tpa);

    if let Some(d) = DEVICES.get_ptr_mut(&key) {
        update_device(d, now, packets, len, &v4, &v6, link_local, garp);
        return;
    }
    let new = DeviceValue {
        first_seen_ns: now,
        last_seen_ns: now,
        packets,
        bytes: len,
        ipv4: v4,
        ipv6: v6,
        gratuitous_arps: garp,
    };
    if DEVICES.insert(&key, &new, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU created it between our lookup and insert.
    match DEVICES.get_ptr_mut(&key) {
        Some(d) => update_device(d, now, packets, len, &v4, &v6, link_local, garp),
        None => count(Stat::DeviceUpdateFail, len),
    }
}

// One call site per path (found / raced): arguments are cheaper than a struct on
// the 512-byte stack.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update_device(
    d: *mut DeviceValue,
    now: u64,
    packets: u64,
    len: u64,
    v4: &[u8; 4],
    v6: &[u8; 16],
    ll: bool,
    garp: u32,
) {
    // SAFETY: `d` is a live map value; racing plain stores of timestamps/addresses
    // only ever write a value some CPU just observed.
    unsafe {
        if packets != 0 {
            add(&mut (*d).packets, packets);
            add(&mut (*d).bytes, len);
        }
        (*d).last_seen_ns = now;
        // Only then: an atomic add of 0 on every device update would cost
        // the per-packet path for nothing.
        if garp != 0 {
            add32(&mut (*d).gratuitous_arps, garp);
        }
        if !is_zero(v4) {
            (*d).ipv4 = *v4;
        }
        // A global address is more useful than the link-local one every host has.
        if !is_zero(v6) && (!ll || is_zero(&(*d).ipv6)) {
            (*d).ipv6 = *v6;
        }
    }
}

/// The frame's flow (created if new), and what its sender's device entry needs.
/// IPv4 flows live in `FLOWS4` (a shorter key: half the hashing and compares).
/// The flow goes out through `out` (`Hit::NONE` if none), not the return value:
/// returning a struct, LLVM may hand back the caller's stack address, which the
/// verifier refuses.
#[inline(never)]
fn flow(p: &Packet, now: u64, len: u64, out: &mut Hit) -> Dev {
    let (mut sport, mut dport) = (p.sport, p.dport);
    if p.frag != 0 {
        fragment(p, &mut sport, &mut dport, len);
    }
    let (f, dev) = if p.l3 == L3_IPV4 || (mapped(&p.src) && mapped(&p.dst)) {
        let key = Aligned(FlowKey4::from_mapped(p.ifindex, p.vlan, p.proto, &p.src, &p.dst, (sport, dport)));
        #[cfg(feature = "lru-flows")]
        let r = flow_lru(&crate::maps::FLOWS4_LRU, &key.0, p, now, len);
        #[cfg(not(feature = "lru-flows"))]
        let r = flow_in(&FLOWS4, flowtable::sets4(), &key, p, now, len);
        r
    } else {
        let key = Aligned(FlowKey {
            ifindex: p.ifindex,
            vlan: p.vlan,
            proto: p.proto,
            _pad: 0,
            src: p.src,
            dst: p.dst,
            sport,
            dport,
        });
        #[cfg(feature = "lru-flows")]
        let r = flow_lru(&crate::maps::FLOWS6_LRU, &key.0, p, now, len);
        #[cfg(not(feature = "lru-flows"))]
        let r = flow_in(&FLOWS, flowtable::sets6(), &key, p, now, len);
        r
    };
    *out = f.unwrap_or(Hit::NONE);
    dev
}

#[inline(always)]
fn flow_in<K: TableKey>(
    table: &Array<FlowSet<K>>,
    sets: u32,
    key: &Aligned<K>,
    p: &Packet,
    now: u64,
    len: u64,
) -> (Option<Hit>, Dev) {
    let at = match flowtable::lookup(table, sets, key, now) {
        Ok(h) => return (Some(h), update_flow(h.value, p, now, len)),
        Err(at) => at,
    };
    let (found, new) = match flowtable::insert(table, key, at, now, len) {
        Insert::Claimed(c) => {
            // SAFETY: the claimed slot is ours until published.
            unsafe { init_flow(&raw mut (*c.slot).value, p, now, len) };
            (c.publish(), true)
        }
        // Lost the race to another CPU's insert: add this packet to its entry.
        Insert::Existing(f) => (f, false),
        Insert::Failed => {
            count(Stat::FlowUpdateFail, len);
            // Judged through a stand-in flow; counted for its device directly.
            let h = flowtable::scratch();
            if let Some(h) = h {
                // SAFETY: this CPU's scratch value.
                unsafe { init_flow(h.value, p, now, len) };
            }
            return (h, Dev::Count);
        }
    };
    let Some(h) = Hit::at(table, found) else {
        // Not reached (the set index came from a lookup); a published new flow
        // holds this frame already.
        return (None, if new { Dev::Record } else { Dev::Count });
    };
    if new {
        return (Some(h), Dev::Record);
    }
    (Some(h), update_flow(h.value, p, now, len))
}

/// The LRU-hash build's flow stage (benchmark only): look up, else write the
/// new flow in this CPU's scratch value and insert a copy of it.
#[cfg(feature = "lru-flows")]
#[inline(always)]
fn flow_lru<K>(
    map: &aya_ebpf::maps::LruHashMap<K, FlowValue>,
    key: &K,
    p: &Packet,
    now: u64,
    len: u64,
) -> (Option<Hit>, Dev) {
    if let Some(v) = map.get_ptr_mut(key) {
        return (flowtable::fixed(v), update_flow(v, p, now, len));
    }
    let Some(s) = flowtable::scratch() else { return (None, Dev::Count) };
    // SAFETY: this CPU's scratch value.
    unsafe { init_flow(s.value, p, now, len) };
    // SAFETY: the scratch value is initialised; the map copies it.
    let new = map.insert(key, unsafe { &*s.value }, BPF_NOEXIST as u64).is_ok();
    match map.get_ptr_mut(key) {
        Some(v) if new => (flowtable::fixed(v), Dev::Record),
        Some(v) => (flowtable::fixed(v), update_flow(v, p, now, len)),
        None => {
            count(Stat::FlowUpdateFail, len);
            (Some(s), Dev::Count)
        }
    }
}

/// Writes a new flow's first frame into `v`.
///
/// # Safety
/// `v` is a live map value nobody else writes meanwhile.
#[inline(always)]
unsafe fn init_flow(v: *mut FlowValue, p: &Packet, now: u64, len: u64) {
    // SAFETY: per the contract.
    unsafe {
        *v = FlowValue {
            packets: 1,
            bytes: len,
            remote_packets: 0,
            remote_bytes: 0,
            foreign_packets: 0,
            foreign_bytes: 0,
            first_seen_ns: now,
            last_seen_ns: now,
            // Updates only OR into the low byte: the creating flags stay.
            tcp_flags: first_tcp_flags(p.tcp_flags),
            valid_until_ns: 0,
            generation: 0,
            rule: 0,
            src_id: 0,
            dst_id: 0,
            segment: 0,
            reported_generation: 0,
            src_mac: p.src_mac,
            home_cpu: home_cpu(),
            verdict: 0,
            app: 0,
            required_app: 0,
            app_confidence: 0,
            app_done: 0,
            _pad: [0; 3],
        };
    }
}

#[inline(always)]
fn update_flow(f: *mut FlowValue, p: &Packet, now: u64, len: u64) -> Dev {
    // SAFETY: `f` is a live map value.
    unsafe {
        let own = same_mac(&(*f).src_mac, &p.src_mac);
        // Foreign counts first: a reader copying the value (packets before
        // foreign_packets) can then only see too few owned frames, never too many.
        if !own {
            add(&mut (*f).foreign_packets, 1);
            add(&mut (*f).foreign_bytes, len);
        }
        let cpu = home_cpu();
        if cpu != NO_HOME_CPU && (*f).home_cpu == cpu {
            // The only writer of these words: no lock needed (see FlowValue).
            (*f).packets += 1;
            (*f).bytes += len;
        } else {
            add(&mut (*f).remote_packets, 1);
            add(&mut (*f).remote_bytes, len);
        }
        (*f).last_seen_ns = now;
        let flags = p.tcp_flags as u64;
        // Read first: most segments add no new flag, and a plain load is cheaper.
        if flags & !(*f).tcp_flags != 0 {
            or(&mut (*f).tcp_flags, flags);
        }
        if own {
            Dev::Untouched
        } else {
            Dev::Count
        }
    }
}

/// This CPU as a `FlowValue::home_cpu` (the verifier inlines the helper into
/// one per-CPU load).
#[inline(always)]
fn home_cpu() -> u16 {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { aya_ebpf::helpers::bpf_get_smp_processor_id() };
    if cpu < NO_HOME_CPU as u32 {
        cpu as u16
    } else {
        NO_HOME_CPU
    }
}

/// `mdsec_common::net::is_v4_mapped` for the 8-aligned addresses of [`Packet`]
/// (asserted there), with two loads instead of twelve.
#[inline(always)]
fn mapped(a: &[u8; 16]) -> bool {
    let a = a.as_ptr();
    // SAFETY: 16 readable bytes at an 8-aligned address.
    unsafe { *(a as *const u64) == 0 && *(a.add(8) as *const u32) == u32::from_ne_bytes([0, 0, 0xff, 0xff]) }
}

/// Compares two MACs stored at 8-aligned offsets (`FlowValue::src_mac`,
/// `Packet::src_mac`, both asserted) with two loads each instead of six.
#[inline(always)]
fn same_mac(a: &[u8; 6], b: &[u8; 6]) -> bool {
    let (a, b) = (a.as_ptr(), b.as_ptr());
    // SAFETY: both are 6 readable bytes at 4-aligned (indeed 8-aligned) addresses.
    unsafe {
        *(a as *const u32) == *(b as *const u32) && *(a.add(4) as *const u16) == *(b.add(4) as *const u16)
    }
}

/// First fragments leave their ports for the later ones; later fragments take them
/// (or stay in the ports-0 bucket flow when the first fragment was not seen).
#[inline(always)]
fn fragment(p: &Packet, sport: &mut u16, dport: &mut u16, len: u64) {
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
            *sport = (*ports).sport;
            *dport = (*ports).dport;
        }
        count(Stat::FragMatched, len);
    } else {
        count(Stat::FragBucket, len);
    }
}

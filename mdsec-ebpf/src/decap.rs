//! Decap stage of mirror ports: removes up to `MAX_TUNNEL_DEPTH` tunnel layers
//! (PPPoE sessions, IP-in-IP and 6in4, GRE carrying Ethernet or IP, ERSPAN
//! types I–III over GRE, VXLAN) from the front of the frame with
//! `bpf_xdp_adjust_head`, so the datapath judges the frame the tunnel carries.
//!
//! Only mirror ports run this (`mdsec_mirror`): their frames are copies, so
//! rewriting the front of one changes nothing on the wire. A tunnel that carries
//! IP without an Ethernet header gets one written in front of it, with the MACs
//! of the innermost Ethernet header seen and the tunnel's declared ethertype.
//!
//! Every layer removed is counted under its kind with its overhead in bytes;
//! every stop inside a tunnel is counted by reason (`mdsec_common::stats`). The
//! reference model's `decap` is the userspace twin this is differential-tested
//! against.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use mdsec_common::{
    net::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ERSPAN, ETH_P_ERSPAN3, ETH_P_IP, ETH_P_IPV6,
        ETH_P_PPPOE_SESSION, ETH_P_TEB, IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP,
        MAX_TUNNEL_DEPTH, MAX_VLAN_TAGS, PPP_IPV4, PPP_IPV6, VXLAN_PORT,
    },
    stats::Stat,
};

use crate::{
    parse::{be16, ptr_at},
    stats::count,
};

/// Where the next layer starts: an Ethernet header (`ethertype` 0), or a bare
/// IP header of that ethertype. Plain integers, not an enum with payloads:
/// LLVM leaves an unused payload undefined, and the verifier refuses to see an
/// uninitialised register stored.
#[derive(Clone, Copy)]
struct Next {
    off: usize,
    ethertype: u16,
}

const fn eth_at(off: usize) -> Next {
    Next { off, ethertype: 0 }
}

const fn ip_at(off: usize, ethertype: u16) -> Next {
    Next { off, ethertype }
}

const DONE: u8 = 0;
const INNER: u8 = 1;
const STOP: u8 = 2;

/// What one layer turned out to be: not a tunnel (`DONE`: judged from here), a
/// tunnel layer of kind `stat` whose payload starts at `next` (`INNER`), or a
/// tunnel that is not opened, for reason `stat` (`STOP`).
#[derive(Clone, Copy)]
struct Step {
    outcome: u8,
    stat: Stat,
    next: Next,
}

const fn done() -> Step {
    Step { outcome: DONE, stat: Stat::Pass, next: eth_at(0) }
}

const fn inner(stat: Stat, next: Next) -> Step {
    Step { outcome: INNER, stat, next }
}

const fn stop(stat: Stat) -> Step {
    Step { outcome: STOP, stat, next: eth_at(0) }
}

/// `N` bytes at `off`, or `None` past the frame's end (the parser's
/// bounds check). Valid until [`peel`] moves the frame's front
/// (`bpf_xdp_adjust_head` invalidates every packet pointer): callers copy what
/// they need first, and `peel` re-derives its own.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<&[u8; N]> {
    // SAFETY: `ptr_at` checked the bytes are inside the frame; packet memory
    // is valid for the program's run and nothing else writes it meanwhile.
    ptr_at::<[u8; N]>(ctx, off).map(|p| unsafe { &*p })
}

/// Removes the frame's tunnel layers in place, one at a time: each layer
/// removed puts the next at the front of the frame, so every round parses from
/// offset 0 and the verifier sees one state per round, not one per path
/// through the layers before it.
#[inline(always)]
pub fn strip(ctx: &XdpContext) {
    let mut depth = 0;
    while depth <= MAX_TUNNEL_DEPTH {
        let step = layer(ctx);
        if step.outcome == DONE {
            break;
        }
        if step.outcome == STOP {
            count(step.stat, 0);
            break;
        }
        if depth == MAX_TUNNEL_DEPTH {
            count(Stat::TunnelTooDeep, 0);
            break;
        }
        // A layer is removed only if something is left behind it: a whole
        // Ethernet header, or at least one byte of a bare IP one.
        let next = step.next;
        let len = ctx.data_end() - ctx.data();
        let fits = if next.ethertype == 0 { next.off + ETH_HLEN <= len } else { next.off < len };
        // `peel` fails only where `fits` already says no.
        if !fits || !peel(ctx, next) {
            count(Stat::TunnelTruncated, 0);
            break;
        }
        count(step.stat, start(next) as u64);
        depth += 1;
    }
}

/// The frame offset the layer at `n` starts at once it is the frame's front: a
/// bare IP header gets an Ethernet header written before it.
#[inline(always)]
fn start(n: Next) -> usize {
    if n.ethertype == 0 {
        n.off
    } else {
        n.off - ETH_HLEN
    }
}

/// Moves the frame's front to the layer at `next`; a bare IP one gets the
/// front Ethernet header's MACs (the innermost Ethernet header seen, or one
/// written by an earlier round from it) and its ethertype.
#[inline(always)]
fn peel(ctx: &XdpContext, next: Next) -> bool {
    let mut macs = [0u8; 12];
    if next.ethertype != 0 {
        let Some(m) = bytes::<12>(ctx, 0) else { return false };
        macs = *m;
    }
    // SAFETY: a helper on the program's own context; afterwards only pointers
    // derived from the new data/data_end are used.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, start(next) as i32) } != 0 {
        return false;
    }
    if next.ethertype != 0 {
        let start = ctx.data();
        if start + ETH_HLEN > ctx.data_end() {
            return false;
        }
        let h = start as *mut [u8; ETH_HLEN];
        // SAFETY: in bounds (checked above); the frame is a mirror copy, ours to rewrite.
        unsafe {
            let mut i = 0;
            while i < 12 {
                (*h)[i] = macs[i];
                i += 1;
            }
            (*h)[12] = (next.ethertype >> 8) as u8;
            (*h)[13] = next.ethertype as u8;
        }
    }
    true
}

/// What the frame's front layer is.
#[inline(always)]
fn layer(ctx: &XdpContext) -> Step {
    let Some(h) = bytes::<ETH_HLEN>(ctx, 0) else { return done() };
    let mut off = ETH_HLEN;
    let mut ethertype = be16(h[12], h[13]);
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(t) = bytes::<4>(ctx, off) else { return done() };
        ethertype = be16(t[2], t[3]);
        off += 4;
    }
    match ethertype {
        ETH_P_PPPOE_SESSION => pppoe(ctx, off),
        ETH_P_IP => {
            let Some(h) = bytes::<20>(ctx, off) else { return done() };
            let ihl = (h[0] & 0x0f) as usize * 4;
            if h[0] >> 4 != 4 || ihl < 20 || !is_tunnel(h[9]) {
                return done();
            }
            // A later fragment has no inner header; a first one only part of the frame.
            if be16(h[6], h[7]) & 0x3fff != 0 {
                return stop(Stat::TunnelFragment);
            }
            over_ip(ctx, h[9], off + ihl)
        }
        ETH_P_IPV6 => {
            let Some(h) = bytes::<40>(ctx, off) else { return done() };
            if h[0] >> 4 != 6 || !is_tunnel(h[6]) {
                return done();
            }
            over_ip(ctx, h[6], off + 40)
        }
        _ => done(),
    }
}

#[inline(always)]
fn is_tunnel(proto: u8) -> bool {
    matches!(proto, IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE | IPPROTO_UDP)
}

/// The payload of an IP header whose protocol is `proto`, at `off`.
#[inline(always)]
fn over_ip(ctx: &XdpContext, proto: u8, off: usize) -> Step {
    match proto {
        IPPROTO_IPIP => inner(Stat::TunnelIpInIp, ip_at(off, ETH_P_IP)),
        IPPROTO_IPV6 => inner(Stat::TunnelIpInIp, ip_at(off, ETH_P_IPV6)),
        IPPROTO_GRE => gre(ctx, off),
        _ => {
            let Some(u) = bytes::<16>(ctx, off) else {
                return done();
            };
            if be16(u[2], u[3]) != VXLAN_PORT {
                return done();
            }
            // Flags: the I bit says the VNI is valid (RFC 7348).
            if u[8] & 0x08 == 0 {
                return stop(Stat::TunnelOpaque);
            }
            inner(Stat::TunnelVxlan, eth_at(off + 16))
        }
    }
}

/// PPPoE session header (6 bytes) and PPP protocol (2, or 1 compressed) at `off`.
#[inline(always)]
fn pppoe(ctx: &XdpContext, off: usize) -> Step {
    let Some(h) = bytes::<8>(ctx, off) else { return stop(Stat::TunnelTruncated) };
    // Version 1, type 1, code 0 (session data).
    if h[0] != 0x11 || h[1] != 0 {
        return stop(Stat::TunnelOpaque);
    }
    // An odd first byte is a compressed one-byte protocol (RFC 1661 PFC).
    let (proto, body) = if h[6] & 1 != 0 { (h[6] as u16, off + 7) } else { (be16(h[6], h[7]), off + 8) };
    match proto {
        PPP_IPV4 => inner(Stat::TunnelPppoe, ip_at(body, ETH_P_IP)),
        PPP_IPV6 => inner(Stat::TunnelPppoe, ip_at(body, ETH_P_IPV6)),
        _ => stop(Stat::TunnelOpaque),
    }
}

/// GRE (RFC 2784/2890) at `off`, and the ERSPAN header behind it.
#[inline(always)]
fn gre(ctx: &XdpContext, off: usize) -> Step {
    let Some(h) = bytes::<4>(ctx, off) else { return stop(Stat::TunnelTruncated) };
    let flags = be16(h[0], h[1]);
    // Version 0 only (1 is PPTP's enhanced GRE); routing (R) is long deprecated.
    if flags & 0x0007 != 0 || flags & 0x4000 != 0 {
        return stop(Stat::TunnelOpaque);
    }
    let seq = flags & 0x1000 != 0;
    let len = 4
        + if flags & 0x8000 != 0 { 4 } else { 0 }
        + if flags & 0x2000 != 0 { 4 } else { 0 }
        + if seq { 4 } else { 0 };
    let body = off + len;
    match be16(h[2], h[3]) {
        ETH_P_TEB => inner(Stat::TunnelGre, eth_at(body)),
        ETH_P_IP => inner(Stat::TunnelGre, ip_at(body, ETH_P_IP)),
        ETH_P_IPV6 => inner(Stat::TunnelGre, ip_at(body, ETH_P_IPV6)),
        // Type I has no sequence number and no ERSPAN header; type II has both.
        ETH_P_ERSPAN if !seq => inner(Stat::TunnelErspan, eth_at(body)),
        ETH_P_ERSPAN => {
            let Some(e) = bytes::<8>(ctx, body) else { return stop(Stat::TunnelTruncated) };
            if e[0] >> 4 != 1 {
                return stop(Stat::TunnelOpaque);
            }
            inner(Stat::TunnelErspan, eth_at(body + 8))
        }
        ETH_P_ERSPAN3 => {
            let Some(e) = bytes::<12>(ctx, body) else { return stop(Stat::TunnelTruncated) };
            // Version 2 (type III); frame type 0 (Ethernet); O: an 8-byte
            // platform-specific subheader follows.
            if e[0] >> 4 != 2 || (e[10] >> 2) & 0x1f != 0 {
                return stop(Stat::TunnelOpaque);
            }
            inner(Stat::TunnelErspan, eth_at(body + 12 + if e[11] & 1 != 0 { 8 } else { 0 }))
        }
        _ => done(),
    }
}

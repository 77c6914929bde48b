//! mdsec XDP datapath: one judgement per frame, behind three entries: `mdsec_xdp`
//! (routed and multi-port bridge ports), `mdsec_bridge` (the two ports of a bump
//! in the wire, which forwards in XDP) and `mdsec_mirror` (mirror ports: [`decap`],
//! then a tail call into `mdsec_xdp`).
//!
//! Stages, one module each: [`parse`] → [`account`] → [`app`] → [`verdict`]. Malformed
//! frames are counted by reason and passed; nothing here ever stops the program early
//! without a counted reason.
#![no_std]
#![no_main]
// BPF has atomic add/or instructions, but the target has no CAS, so core's atomic
// types lack fetch_add there; the intrinsics lower to BPF_ATOMIC directly.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// Map keys are passed by reference on purpose: a by-value 44-byte key is one more
// copy on the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]
// The LRU-hash build (benchmark only) leaves mdsec's own flow table unused.
#![cfg_attr(feature = "lru-flows", allow(dead_code, unused_imports))]

mod account;
mod app;
mod atomic;
mod bench;
mod decap;
mod flowtable;
mod maps;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext};
use mdsec_common::stats::Stat;

use crate::maps::{JUDGE, PORTS};

/// A routed gateway's (or a multi-port bridge member's) port: the verdict is
/// the action; what passes goes up the stack (routing, or the kernel bridge).
/// Also the judge of mirror ports, through [`mdsec_mirror`]'s tail call.
#[xdp]
pub fn mdsec_xdp(ctx: XdpContext) -> u32 {
    judge(&ctx, frame_len(&ctx))
}

/// A port of a two-port bump in the wire: the same judgement as [`mdsec_xdp`],
/// then every frame it lets through (L2 control, malformed and would-drop frames
/// included) leaves by the peer port in `PORTS`. A port without a peer entry
/// passes its frames up to the kernel bridge underneath instead, so a half-set-up
/// bump still carries traffic (fail-open).
#[xdp]
pub fn mdsec_bridge(ctx: XdpContext) -> u32 {
    let len = frame_len(&ctx);
    let action = judge(&ctx, len);
    if action == xdp_action::XDP_DROP {
        return action;
    }
    let a = match PORTS.redirect(ctx.ingress_ifindex() as u32, xdp_action::XDP_PASS as u64) {
        Ok(a) | Err(a) => a,
    };
    stats::count(if a == xdp_action::XDP_REDIRECT { Stat::BridgeForwarded } else { Stat::BridgeNoPeer }, len);
    a
}

/// A mirror port: its tunnel layers removed ([`decap`]), the frame the tunnel
/// carries is judged by [`mdsec_xdp`] through a tail call. A separate program
/// because the verifier's budget for one program is nearly spent by `judge`.
#[xdp]
pub fn mdsec_mirror(ctx: XdpContext) -> u32 {
    decap::strip(&ctx);
    // SAFETY: a tail call with the program's own context; on success it does
    // not return.
    unsafe { JUDGE.tail_call(&ctx, mdsec_common::maps::JUDGE_SLOT) };
    // Only without a judge in JUDGE (not while an agent has set it up): the
    // copy passes, counted as a frame like every other.
    let len = frame_len(&ctx);
    stats::count(Stat::TunnelNoJudge, len);
    stats::count(Stat::Pass, len);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Parse, account, classify and decide one frame of `len` bytes: `XDP_DROP`
/// or `XDP_PASS`.
#[inline(always)]
fn judge(ctx: &XdpContext, len: u64) -> u32 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    let mut slot = core::mem::MaybeUninit::uninit();
    let pkt = parse::Packet::init(&mut slot, ctx.ingress_ifindex() as u32);
    if let Err(reason) = parse::parse(ctx, pkt) {
        stats::count(reason, len);
    }
    let hit = account::account(pkt, now, len);
    let flow = hit.map(|h| h.value);
    if let Some(f) = flow {
        // Only a flow's first payloads are classified (until one decides): test
        // here, so every later packet skips the out-of-line call.
        // SAFETY: `f` is a live FLOWS value.
        if pkt.payload_len > 0 && unsafe { (*f).app_done } != mdsec_common::flow::APP_FINAL {
            app::identify(ctx.ctx, pkt, f);
        }
    }
    let action = verdict::decide(ctx.ctx, pkt, flow, now, len);
    if let Some(h) = hit {
        h.recheck();
    }
    stats::count(if action == xdp_action::XDP_DROP { Stat::Drop } else { Stat::Pass }, len);
    action
}

/// Benchmark baseline: the cheapest possible XDP program (`cargo xtask bench`
/// measures the datapath's marginal cost against it). Never attached by the agent.
#[xdp]
pub fn mdsec_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark baseline: drop everything (the attach point's throughput floor).
#[xdp]
pub fn mdsec_baseline_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Benchmark baseline: forward every frame to the peer port in `PORTS` and
/// nothing else (the floor of a bump in the wire).
#[xdp]
pub fn mdsec_baseline_redirect(ctx: XdpContext) -> u32 {
    match PORTS.redirect(ctx.ingress_ifindex() as u32, xdp_action::XDP_PASS as u64) {
        Ok(a) | Err(a) => a,
    }
}

/// Benchmark: the datapath on a stream of distinct flows (`crate::bench`).
#[xdp]
pub fn mdsec_bench_flows(ctx: XdpContext) -> u32 {
    bench::next_flow(&ctx);
    judge(&ctx, frame_len(&ctx))
}

/// Benchmark baseline of [`mdsec_bench_flows`]: the same rewrite, then pass.
#[xdp]
pub fn mdsec_bench_empty(ctx: XdpContext) -> u32 {
    bench::next_flow(&ctx);
    xdp_action::XDP_PASS
}

// Host builds (clippy) get std's handler through mdsec-common's `user` feature.
#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel's name for a GPL-compatible dual licence (see `license_is_gpl_compatible`).
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

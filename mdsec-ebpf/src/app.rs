//! App stage: classify each flow direction's first payloads until one decides
//! (`mdsec_common::flow::next_app_done`), with the shared classifier
//! (`mdsec_common::app::classify`), and store the result on the flow for the
//! verdict stage and the agent.

use aya_ebpf::{
    bindings::xdp_md,
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
};
use mdsec_common::{
    app::{classify, worth_sampling, App, Confidence, Sample, CLASSIFY_BYTES, SAMPLE_BYTES},
    flow::{next_app_done, FlowValue, APP_FINAL},
    stats::Stat,
};

use crate::{
    maps::SAMPLES,
    parse::{Packet, FRAG_LATER},
    stats::count,
};

// Not inlined: the 96-byte buffer gets its own stack frame. Only the context
// pointer crosses the call (packet pointers must not).
#[inline(never)]
pub fn identify(ctx: *mut xdp_md, p: &Packet, f: *mut FlowValue) {
    // SAFETY: `f` is a live FLOWS value (see verdict::decide on racing writers).
    let fv = unsafe { &mut *f };
    if fv.app_done == APP_FINAL || p.payload_len == 0 || p.frag == FRAG_LATER {
        return;
    }
    let mut buf = [0u8; CLASSIFY_BYTES];
    let want =
        if (p.payload_len as usize) < CLASSIFY_BYTES { p.payload_len as u32 } else { CLASSIFY_BYTES as u32 };
    // Bounded for the verifier: 1..=CLASSIFY_BYTES.
    let n = want & 0x7f;
    if n == 0 || n > CLASSIFY_BYTES as u32 {
        return;
    }
    // SAFETY: the helper copies at most `n` bytes into `buf`, which holds more.
    if unsafe { bpf_xdp_load_bytes(ctx, p.payload_off as u32, buf.as_mut_ptr().cast(), n) } != 0 {
        return;
    }
    let (app, confidence) = classify(&buf, n as usize, p.proto, p.sport, p.dport);
    fv.app = app as u8;
    fv.app_confidence = confidence as u8;
    fv.app_done = next_app_done(fv.app_done, confidence == Confidence::High, n as usize);
    if confidence == Confidence::High && worth_sampling(app) {
        sample(ctx, p, app);
    }
}

/// Sends the first payload (up to SAMPLE_BYTES) to userspace for fingerprints.
#[inline(never)]
fn sample(ctx: *mut xdp_md, p: &Packet, app: App) {
    let Some(mut entry) = SAMPLES.reserve::<Sample>(0) else {
        count(Stat::SamplesLost, 0);
        return;
    };
    let want =
        if (p.payload_len as usize) < SAMPLE_BYTES { p.payload_len as u64 } else { SAMPLE_BYTES as u64 };
    // 1..=SAMPLE_BYTES by construction, in a form the verifier can follow (an AND
    // after a zero check would lose the lower bound). `want` >= 1: payload_len > 0.
    let n = ((want.wrapping_sub(1)) & (SAMPLE_BYTES as u64 - 1)) + 1;
    let s = entry.as_mut_ptr();
    // SAFETY: `s` points at the reserved, exclusively owned ring-buffer record;
    // the helper writes at most `n` <= SAMPLE_BYTES bytes into `data`.
    unsafe {
        if bpf_xdp_load_bytes(ctx, p.payload_off as u32, (*s).data.as_mut_ptr().cast(), n as u32) != 0 {
            entry.discard(0);
            return;
        }
        (*s).ts_ns = bpf_ktime_get_coarse_ns();
        (*s).ifindex = p.ifindex;
        (*s).vlan = p.vlan;
        (*s).proto = p.proto;
        (*s).app = app as u8;
        (*s).src = p.src;
        (*s).dst = p.dst;
        (*s).sport = p.sport;
        (*s).dport = p.dport;
        (*s).mac = p.src_mac;
        (*s).len = want as u16;
        (*s)._pad = [0; 4];
    }
    entry.submit(0);
}

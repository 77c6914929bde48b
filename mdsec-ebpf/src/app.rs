//! App stage: classify the first payload of each flow direction, once, with the
//! shared classifier (`mdsec_common::app::classify`), and store the result on the
//! flow for the verdict stage and the agent.

use aya_ebpf::{bindings::xdp_md, helpers::bpf_xdp_load_bytes};
use mdsec_common::{
    app::{classify, CLASSIFY_BYTES},
    flow::FlowValue,
};

use crate::parse::{Packet, FRAG_LATER};

// Not inlined: the 96-byte buffer gets its own stack frame. Only the context
// pointer crosses the call (packet pointers must not).
#[inline(never)]
pub fn identify(ctx: *mut xdp_md, p: &Packet, f: *mut FlowValue) {
    // SAFETY: `f` is a live FLOWS value (see verdict::decide on racing writers).
    let fv = unsafe { &mut *f };
    if fv.app_done != 0 || p.payload_len == 0 || p.frag == FRAG_LATER {
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
    fv.app_done = 1;
}

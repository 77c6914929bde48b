//! Verdict stage. The foundation datapath only observes: every frame passes.
//! Policy (a later stage) is the only thing allowed to return `XDP_DROP`.

use aya_ebpf::bindings::xdp_action;

use crate::parse::Packet;

#[inline(always)]
pub fn decide(_pkt: &Packet) -> u32 {
    xdp_action::XDP_PASS
}

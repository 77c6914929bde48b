//! Benchmark support: a stream of distinct flows through `BPF_PROG_TEST_RUN`.
//!
//! `BPF_PROG_TEST_RUN` repeats one frame; the cost curve needs every packet to
//! belong to another flow than the one before. `next_flow` writes the flow's
//! number (`i * stride mod n`, `i` counted per CPU) as a big-endian u32 at a
//! configured frame offset (the low 32 bits of the source address) before the
//! frame is judged. A stride coprime to `n` visits every flow once per `n`
//! packets; a stride other than the one the flows were created with makes the
//! visiting order unrelated to the creation order, as on a real link (a table
//! that allocates entries in creation order would otherwise be walked
//! sequentially). The same rewrite runs in front of the empty baseline, so it
//! cancels out of the datapath's marginal cost. `BENCH_CFG[0] = [n, offset,
//! stride, _]`; `n = 0` leaves the frame alone. Never attached by the agent.

use aya_ebpf::programs::XdpContext;

use crate::maps::{BENCH_CFG, BENCH_I};

#[inline(always)]
pub fn next_flow(ctx: &XdpContext) {
    let Some(cfg) = BENCH_CFG.get(0) else { return };
    let Some(i) = BENCH_I.get_ptr_mut(0) else { return };
    let (n, stride) = (cfg[0], cfg[2]);
    if n == 0 {
        return;
    }
    // Bounded, so the verifier can check the packet access.
    let off = (cfg[1] & 0x3f) as usize;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + 4 > end {
        return;
    }
    // SAFETY: this CPU's counter cell; the 4 bytes at `off` are inside the frame.
    unsafe {
        let id = (*i as u64 * stride as u64 % n as u64) as u32;
        *i = (*i).wrapping_add(1);
        core::ptr::write_unaligned((start + off) as *mut [u8; 4], id.to_be_bytes());
    }
}

//! Atomic read-modify-write on map values shared by all CPUs.
//!
//! On BPF these are `lock *(u64 *)(rX + off) += rY` / `|=` instructions. On the host
//! (only compiled there for `cargo clippy`) core's atomics do the same job.

#[cfg(target_arch = "bpf")]
#[inline(always)]
pub fn add(cell: *mut u64, v: u64) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    // SAFETY: `cell` points into a live map value; the result is unused, so LLVM
    // emits the plain BPF_ATOMIC add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(cell, v) };
}

#[cfg(target_arch = "bpf")]
#[inline(always)]
pub fn or(cell: *mut u64, v: u64) {
    use core::intrinsics::{atomic_or, AtomicOrdering};
    // SAFETY: as for `add`.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(cell, v) };
}

#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn add(cell: *mut u64, v: u64) {
    use core::sync::atomic::{AtomicU64, Ordering};
    // SAFETY: `cell` points into a live, 8-byte aligned map value.
    unsafe { AtomicU64::from_ptr(cell) }.fetch_add(v, Ordering::Relaxed);
}

#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn or(cell: *mut u64, v: u64) {
    use core::sync::atomic::{AtomicU64, Ordering};
    // SAFETY: as above.
    unsafe { AtomicU64::from_ptr(cell) }.fetch_or(v, Ordering::Relaxed);
}

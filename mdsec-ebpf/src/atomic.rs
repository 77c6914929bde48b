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
pub fn add32(cell: *mut u32, v: u32) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    // SAFETY: as for `add` (a 32-bit BPF_ATOMIC add).
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(cell, v) };
}

#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn add32(cell: *mut u32, v: u32) {
    use core::sync::atomic::{AtomicU32, Ordering};
    // SAFETY: `cell` points into a live, 4-byte aligned map value.
    unsafe { AtomicU32::from_ptr(cell) }.fetch_add(v, Ordering::Relaxed);
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

/// Compare-and-swap (BPF_CMPXCHG, ISA v3); true when `cell` held `old`.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub fn cas32(cell: *mut u32, old: u32, new: u32) -> bool {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering};
    // SAFETY: `cell` points into a live map value.
    unsafe { atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(cell, old, new).1 }
}

/// Fully ordered store (BPF_XCHG): everything written before is visible first.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub fn publish32(cell: *mut u32, v: u32) {
    use core::intrinsics::{atomic_xchg, AtomicOrdering};
    // SAFETY: as for `cas32`.
    unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(cell, v) };
}

#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn cas32(cell: *mut u32, old: u32, new: u32) -> bool {
    use core::sync::atomic::{AtomicU32, Ordering};
    // SAFETY: `cell` points into a live, 4-byte aligned map value.
    unsafe { AtomicU32::from_ptr(cell) }
        .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn publish32(cell: *mut u32, v: u32) {
    use core::sync::atomic::{AtomicU32, Ordering};
    // SAFETY: as above.
    unsafe { AtomicU32::from_ptr(cell) }.swap(v, Ordering::SeqCst);
}

//! The `STATS` per-CPU array: per-CPU cells need no atomics; userspace sums them.

use mdsec_common::stats::Stat;

use crate::maps::STATS;

#[inline(always)]
pub fn count(reason: Stat, bytes: u64) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer is a valid per-CPU cell of the array.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

//! `SEG_STATS`: per-segment counters, the source of the per-segment metrics.
//!
//! A per-CPU array of [`Counter`], indexed by (generation bit, segment, column).
//! Segment numbers are per generation (1-based indexes into that generation's
//! segment table, 0 = traffic of no segment), so the array is double-buffered by
//! the generation bit like the policy maps: a half only counts for the generation
//! installed in it, and userspace credits a half to the names of the generation it
//! holds before installing a new one there.
//!
//! Columns:
//! - `0..8`: packets and bytes by [`Verdict`](crate::policy::Verdict) (a deny for the
//!   default reason);
//! - [`COL_DROP_APP_MISMATCH`], [`COL_WOULD_DROP_APP_MISMATCH`]: denies because the
//!   payload was not the app the rule requires;
//! - `COL_VIOLATIONS + app`: denied flows (counted once per flow and generation, in
//!   `packets`) by [`App`](crate::app::App) (from the payload, or the port's service
//!   when the flow was denied before any payload).

/// Segments per generation (the policy compiler refuses more).
pub const MAX_SEGMENTS: u32 = 127;
/// Segment slots per generation: 0 (no segment) and 1..=MAX_SEGMENTS.
pub const SEG_SLOTS: u32 = MAX_SEGMENTS + 1;
/// Columns per segment slot.
pub const SEG_COLS: u32 = 48;
pub const COL_DROP_APP_MISMATCH: u32 = 8;
pub const COL_WOULD_DROP_APP_MISMATCH: u32 = 9;
/// First violation column; apps are below 32 (checked below).
pub const COL_VIOLATIONS: u32 = 16;
/// Entries of the array: both generation halves.
pub const SEG_STATS_LEN: u32 = 2 * SEG_SLOTS * SEG_COLS;

const _: () = assert!(COL_VIOLATIONS + 32 <= SEG_COLS);
const _: () = assert!(crate::app::App::ALL.len() <= 32);

/// Index of a counter; callers keep `segment < SEG_SLOTS` and `col < SEG_COLS`.
#[inline(always)]
pub const fn index(gen_bit: u32, segment: u32, col: u32) -> u32 {
    ((gen_bit & 1) * SEG_SLOTS + segment) * SEG_COLS + col
}

//! Value types and helpers every layer uses: clocks and time stamps, MAC and
//! protocol names, the event record, located diagnostics. Depends on nothing
//! else in the crate.

pub mod clock;
pub mod diag;
pub mod event;
pub mod net;

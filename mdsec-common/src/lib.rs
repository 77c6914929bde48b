//! The kernel/user contract of mdsec.
//!
//! Every type that crosses the kernel boundary (map keys, map values, enums indexing
//! per-CPU arrays) lives here, `#[repr(C)]` with explicit padding so that hash keys
//! built in the kernel compare equal to keys built in userspace byte for byte.
//! Each concept is one module; its userspace half (aya `Pod` impls, conversions,
//! display) sits behind the `user` feature inside the same module.
#![no_std]

pub mod app;
pub mod device;
pub mod flow;
pub mod flowtable;
pub mod frag;
pub mod maps;
#[cfg(feature = "user")]
pub mod model;
pub mod net;
pub mod policy;
pub mod segstats;
pub mod stats;

#[cfg(feature = "user")]
extern crate std;

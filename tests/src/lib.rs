//! Test harness for mdsec: network-namespace topologies with guaranteed teardown,
//! a handle on a running agent, a frame builder, and a `BPF_PROG_TEST_RUN` loader.
//!
//! Everything a test creates is named with [`netns::PREFIX`] plus a per-run id, so
//! parallel tests never collide and `cargo xtask cleanup` can find leftovers.

pub mod agent;
pub mod bump;
pub mod differential;
pub mod fixtures;
pub mod frames;
pub mod hospital;
pub mod kernel;
pub mod netns;
pub mod pki;
pub mod prom;
pub mod traffic;

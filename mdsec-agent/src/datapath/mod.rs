//! The kernel side as the agent sees it: loading and attaching the XDP
//! program, reading its maps (flows, devices, counters, segment counters) and
//! merging them into the agent's own flow and device tables. Nothing here knows
//! about policy files, classes or HTTP.

pub mod batch;
pub mod bridge;
pub mod doctor;
pub mod flowtable;
pub mod loader;
pub mod netlink;
pub mod poller;
pub mod ring;
pub mod segstats;
pub mod settings;
pub mod state;

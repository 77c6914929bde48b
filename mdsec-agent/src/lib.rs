//! mdsec agent: loads the XDP datapath, polls its maps and serves what it counts.
//! See docs/ARCHITECTURE.md for the module map.

pub mod api;
pub mod batch;
pub mod client;
pub mod clinical;
pub mod clock;
pub mod config;
pub mod detect;
pub mod devwatch;
pub mod events;
pub mod evidence;
pub mod export;
pub mod fingerprint;
pub mod flowtable;
pub mod learn;
pub mod lifecycle;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod oui;
pub mod policy;
pub mod poller;
pub mod register;
pub mod report;
pub mod report_render;
pub mod ring;
pub mod run;
pub mod samples;
pub mod segstats;
pub mod state;
pub mod store;
pub mod suggest;
pub mod table;
pub mod triage;

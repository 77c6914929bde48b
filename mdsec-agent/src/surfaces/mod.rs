//! What the outside sees: the HTTP API and `/metrics`, the event log and
//! syslog export, the event store behind them, and the JSON shapes (the only
//! place JSON is written for the API). The CLI's HTTP client lives here too.

pub mod api;
pub mod client;
pub mod eve;
pub mod events;
pub mod export;
pub mod ipfix;
pub mod kafka;
pub mod limiter;
pub mod metrics;
pub mod model;
pub mod socket;
pub mod state;
pub mod tls;

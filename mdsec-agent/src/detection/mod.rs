//! Detection over the inventory and the flow table: per-flow detections
//! (scans, remote access, outside DNS, east-west, novelty), device events
//! (new, rogue, decommissioned), the devices to quarantine, the learned baseline and the suggested
//! allow-list, the triage matrix that gives each event its clinical impact,
//! and the incidents that correlate events per source.

pub mod detect;
pub mod devwatch;
pub mod incident;
pub mod learn;
pub mod quarantine;
pub mod suggest;
pub mod triage;

//! Owns the SAMPLES ring buffer on the user side: turns sampled first payloads into
//! per-device fingerprints (see [`crate::inventory::fingerprint`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, RingBuf};
use mdsec_common::app::{App, SAMPLE_BYTES, Sample};

use crate::inventory::fingerprint::{self, Trait};

/// Device key (ifindex, vlan, MAC) → fingerprint key → value.
pub type Fingerprints = Arc<RwLock<HashMap<(u32, u16, [u8; 6]), BTreeMap<Trait, String>>>>;

/// Keys kept per device, so a chatty or hostile device cannot grow memory.
const MAX_KEYS: usize = 32;

pub fn record(fp: &Fingerprints, s: &Sample) {
    let len = (s.len as usize).min(SAMPLE_BYTES);
    let found = fingerprint::extract(App::from_u8(s.app), &s.data[..len]);
    if found.is_empty() {
        return;
    }
    let mut all = fp.write().unwrap();
    let entry = all.entry((s.ifindex, s.vlan, s.mac)).or_default();
    for (k, v) in found {
        if entry.len() < MAX_KEYS || entry.contains_key(&k) {
            entry.insert(k, v);
        }
    }
}

pub fn spawn(ring: RingBuf<MapData>, fp: Fingerprints) -> std::thread::JoinHandle<()> {
    crate::datapath::ring::drain::<Sample>("mdsec-samples", ring, move |batch| {
        for s in &batch {
            record(&fp, s);
        }
    })
}

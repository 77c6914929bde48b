//! The payload parsers on hostile bytes: the shared classifier (the kernel runs
//! the same code) and every fingerprint extractor, never a panic; and the
//! reference model's frame parser.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mdsec_common::app::{App, CLASSIFY_BYTES, classify};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (proto, sport, dport) = (data[0], u16::from_be_bytes([data[1], data[2]]), u16::from_be_bytes([data[3], data[4]]));
    let payload = &data[5..];
    let mut buf = [0u8; CLASSIFY_BYTES];
    let n = payload.len().min(CLASSIFY_BYTES);
    buf[..n].copy_from_slice(&payload[..n]);
    let _ = classify(&buf, n, proto, sport, dport);
    for app in App::ALL {
        let _ = mdsec_agent::inventory::fingerprint::extract(*app, payload);
    }
    let _ = mdsec_common::model::parse(data);
});

//! The classifier on real first payloads (see tests/payloads/README.md), on
//! arbitrary ports: recognition must come from the bytes.

use mdsec_common::app::{App, CLASSIFY_BYTES, Confidence, classify};

/// (fixture, protocol, the port its service normally uses, expected app), from
/// `tests/payloads/index.txt` (shared with the kernel agreement test).
fn fixtures() -> Vec<(String, u8, u16, App)> {
    let path = format!("{}/tests/payloads/index.txt", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].parse().unwrap(), f[2].parse().unwrap(), App::from_name(f[3]).unwrap())
        })
        .collect()
}

/// Protocols whose signature needs their port (no distinctive bytes of their own).
const PORT_BOUND: &[App] = &[App::Dns, App::Dhcp, App::Ntp, App::Mdns, App::WsDiscovery];

fn load(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/payloads/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let hex = std::fs::read_to_string(&path).unwrap();
    let hex = hex.trim();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn run(payload: &[u8], proto: u8, sport: u16, dport: u16) -> (App, Confidence) {
    let mut b = [0u8; CLASSIFY_BYTES];
    let n = payload.len().min(CLASSIFY_BYTES);
    b[..n].copy_from_slice(&payload[..n]);
    classify(&b, n, proto, sport, dport)
}

#[test]
fn real_payloads_are_recognised_on_their_own_port() {
    for (name, proto, port, app) in fixtures() {
        let name = name.as_str();
        assert_eq!(run(&load(name), proto, 40_000, port), (app, Confidence::High), "{name}");
        // Direction does not matter.
        assert_eq!(run(&load(name), proto, port, 40_000), (app, Confidence::High), "{name} reversed");
    }
}

#[test]
fn payload_signatures_do_not_need_the_port() {
    for (name, proto, _, app) in fixtures() {
        let name = name.as_str();
        if PORT_BOUND.contains(&app) {
            continue;
        }
        assert_eq!(run(&load(name), proto, 40_001, 40_002), (app, Confidence::High), "{name} on odd ports");
    }
}

#[test]
fn unknown_payload_on_a_well_known_port_is_a_low_confidence_guess() {
    let junk = b"\x00\x00\x00\x00\x13\x37 this is not a protocol we know";
    assert_eq!(run(junk, 6, 51_000, 104), (App::Dicom, Confidence::Low));
    assert_eq!(run(junk, 6, 51_000, 2575), (App::Hl7, Confidence::Low));
    assert_eq!(run(junk, 17, 51_000, 161), (App::Snmp, Confidence::Low));
    // Protocols with a structural check are not guessed from the port when the bytes
    // fail it: non-DNS bytes on port 53 are not DNS.
    assert_eq!(run(b"hello, this is not a DNS message", 17, 51_000, 53), (App::Unknown, Confidence::None));
    assert_eq!(run(junk, 17, 68, 67), (App::Unknown, Confidence::None));
    assert_eq!(run(junk, 6, 51_000, 51_001), (App::Unknown, Confidence::None));
    // Empty payloads carry nothing but the port.
    assert_eq!(run(&[], 6, 51_000, 443), (App::Tls, Confidence::Low));
}

#[test]
fn a_payload_of_one_protocol_is_not_taken_for_another() {
    // HTTP on the DICOM port is HTTP, with confidence.
    assert_eq!(run(&load("http-get"), 6, 51_000, 104), (App::Http, Confidence::High));
    // Truncated to a few bytes, a DICOM PDU still needs its version field.
    let rq = load("dicom-associate-rq");
    assert_eq!(run(&rq[..6], 6, 51_000, 51_001).0, App::Unknown);
    // A DICOM-looking header without the application-context item is not DICOM.
    let mut fake = rq.clone();
    fake[74] = 0x99;
    assert_eq!(run(&fake, 6, 51_000, 51_001).0, App::Unknown);
}

#[test]
fn random_bytes_are_rarely_recognised() {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut high = 0;
    for i in 0..20_000 {
        let len = (i % CLASSIFY_BYTES) + 1;
        let mut b = [0u8; CLASSIFY_BYTES];
        for v in b.iter_mut().take(len) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = x as u8;
        }
        let proto = if i % 2 == 0 { 6 } else { 17 };
        if classify(&b, len, proto, 40_000, 40_001).1 == Confidence::High {
            high += 1;
        }
    }
    // Short signatures (Telnet's IAC, TLS's first bytes) match by chance now and then.
    assert!(high < 200, "{high} of 20000 random payloads recognised");
}

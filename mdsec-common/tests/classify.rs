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
/// Fixtures of other protocols that need their port: an MQTT control packet
/// other than CONNECT is two bytes of fixed header.
const PORT_BOUND_FIXTURES: &[&str] = &["mqtt-pingreq"];

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
        if PORT_BOUND.contains(&app) || PORT_BOUND_FIXTURES.contains(&name) {
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

#[test]
fn iso_on_tcp_is_not_rdp_and_short_headers_need_their_port() {
    // S7comm's COTP connection request (TPKT + X.224 CR with TSAP parameters
    // 0xC1/0xC2, as Siemens PLCs and building-automation gateways send it on
    // port 102): the same X.224 type as RDP's, but not RDP, and not guessed
    // as anything from its port either.
    let s7_cr = [
        0x03, 0x00, 0x00, 0x16, 0x11, 0xe0, 0x00, 0x00, 0x00, 0x01, 0x00, 0xc1, 0x02, 0x01, 0x00, 0xc2, 0x02,
        0x01, 0x02, 0xc0, 0x01, 0x0a,
    ];
    assert_eq!(run(&s7_cr, 6, 40_000, 102), (App::Unknown, Confidence::None));
    assert_eq!(run(&s7_cr, 6, 40_000, 3389).0, App::Rdp, "on RDP's port a low guess only");
    assert_eq!(run(&s7_cr, 6, 40_000, 3389).1, Confidence::Low);
    // Its connection confirm (0xD0 with TSAPs) and an S7 data TPDU: not RDP either.
    let mut s7_cc = s7_cr;
    s7_cc[5] = 0xd0;
    assert_eq!(run(&s7_cc, 6, 102, 40_000).0, App::Unknown);
    let s7_dt = [0x03, 0x00, 0x00, 0x19, 0x02, 0xf0, 0x80, 0x32, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08];
    assert_eq!(run(&s7_dt, 6, 40_000, 102).0, App::Unknown);
    // RDP's confirm with an RDP_NEG_RSP (MS-RDPBCGR 2.2.1.2) is RDP.
    let rdp_cc = [
        0x03, 0x00, 0x00, 0x13, 0x0e, 0xd0, 0x00, 0x00, 0x12, 0x34, 0x00, 0x02, 0x1f, 0x08, 0x00, 0x02, 0, 0,
        0,
    ];
    assert_eq!(run(&rdp_cc, 6, 3389, 40_000), (App::Rdp, Confidence::High));
    // NTP control (mode 6) and MQTT PINGREQ say too little off their ports.
    let ntpq = load("ntp-control");
    assert_eq!(run(&ntpq, 17, 40_000, 40_001).0, App::Unknown);
    assert_eq!(run(b"\xc0\x00", 6, 40_000, 40_001).0, App::Unknown);
    // A TLS-looking header with an impossible record length is not TLS.
    assert_eq!(run(b"\x17\x03\x03\xff\xff", 6, 40_000, 40_001).0, App::Unknown);
    // A 2-byte leading segment decides nothing (the datapath tries the next
    // payload: mdsec_common::flow::next_app_done).
    use mdsec_common::flow::{APP_FINAL, APP_TRYING, next_app_done};
    assert_eq!(next_app_done(0, false, 2), APP_TRYING | 1);
    assert_eq!(next_app_done(APP_TRYING | 1, true, 20), APP_FINAL);
    assert_eq!(next_app_done(APP_TRYING | 3, false, 2), APP_FINAL, "bounded");
    assert_eq!(next_app_done(0, false, 40), APP_FINAL, "a long unmatched payload decides");
}

#[test]
fn fhir_is_told_from_plain_http_and_http_rules_accept_it() {
    use mdsec_common::policy::app_satisfies;
    assert_eq!(run(&load("fhir-search"), 6, 40_000, 8080), (App::Fhir, Confidence::High));
    let post = b"POST /fhir/Observation HTTP/1.1\r\nContent-Type: application/fhir+json\r\n\r\n{}";
    assert_eq!(run(post, 6, 40_000, 80).0, App::Fhir);
    // Plain HTTP stays http, and so does FHIR under another base path (its
    // content type is not looked for).
    assert_eq!(run(&load("http-get"), 6, 40_000, 80).0, App::Http);
    let other_base = b"POST /baseR4/Observation HTTP/1.1\r\nContent-Type: application/fhir+json\r\n\r\n";
    assert_eq!(run(other_base, 6, 40_000, 80).0, App::Http);
    let high = Confidence::High as u8;
    assert!(app_satisfies(App::Fhir as u8, high, App::Http as u8), "an http rule carries FHIR");
    assert!(app_satisfies(App::Fhir as u8, high, App::Fhir as u8));
    assert!(!app_satisfies(App::Http as u8, high, App::Fhir as u8), "a fhir rule wants FHIR");
}

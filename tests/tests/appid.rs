//! Kernel and userspace classify alike: every payload fixture goes through the XDP
//! program (BPF_PROG_TEST_RUN) and through `mdsec_common::app::classify`, on its
//! service port and on arbitrary ports; the app and confidence on the flow must be
//! what userspace computes.

use std::net::Ipv4Addr;

use mdsec_common::app::{App, CLASSIFY_BYTES, classify};
use mdsec_tests::{
    frames::{self, V4},
    kernel::{TestProg, XDP_PASS},
};

fn frame(proto: u8, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let l4 = if proto == 6 {
        frames::tcp(sport, dport, 0x18, payload)
    } else {
        frames::udp(sport, dport, payload)
    };
    let ip = V4::new(Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 2, 0, 2), proto).build(&l4);
    frames::eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &[], 0x0800, &ip)
}

#[test]
fn kernel_and_userspace_agree_on_every_fixture() {
    let mut prog = TestProg::load().unwrap();
    let mut checked = 0;
    for (name, payload, proto, port) in mdsec_tests::fixtures::all() {
        for (sport, dport) in [(40_000, port), (port, 40_000), (40_001, 40_002)] {
            prog.clear().unwrap();
            assert_eq!(prog.run(&frame(proto, sport, dport, &payload)).unwrap(), XDP_PASS);
            let flows = prog.flows().unwrap();
            assert_eq!(flows.len(), 1, "{name}");
            let v = flows[0].1;
            let mut b = [0u8; CLASSIFY_BYTES];
            let n = payload.len().min(CLASSIFY_BYTES);
            b[..n].copy_from_slice(&payload[..n]);
            let (app, conf) = classify(&b, n, proto, sport, dport);
            let done = mdsec_common::flow::next_app_done(0, conf == mdsec_common::app::Confidence::High, n);
            assert_eq!(
                (v.app, v.app_confidence, v.app_done),
                (app as u8, conf as u8, done),
                "{name} {sport}->{dport}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 60, "{checked}");
}

#[test]
fn classification_runs_once_per_flow_and_skips_empty_segments() {
    let mut prog = TestProg::load().unwrap();
    // A bare SYN (no payload) leaves the flow unclassified…
    assert_eq!(prog.run(&frame(6, 40_000, 2575, &[])).unwrap(), XDP_PASS);
    assert_eq!(prog.flows().unwrap()[0].1.app_done, 0);
    // …the first payload decides…
    let hl7 = b"\x0bMSH|^~\\&|PUMP|WARD3|PHARMACY|HOSP|20261123||ORU^R01|1|P|2.5\r\x1c\r";
    prog.run(&frame(6, 40_000, 2575, hl7)).unwrap();
    // …and later payloads do not change it.
    prog.run(&frame(6, 40_000, 2575, b"GET / HTTP/1.1\r\n\r\n")).unwrap();
    let v = prog.flows().unwrap()[0].1;
    assert_eq!((v.app, v.app_done, v.packets), (App::Hl7 as u8, 1, 3));
}

/// A 2-byte leading segment does not lock the label (an evasion the
/// replayed captures showed): the next payload decides; and a direction of
/// only tiny segments ends up final after its bounded tries.
#[test]
fn a_tiny_leading_segment_decides_nothing() {
    use mdsec_common::flow::{APP_FINAL, APP_TRIES, APP_TRYING};
    let mut prog = TestProg::load().unwrap();
    prog.run(&frame(6, 40_000, 8_080, b"\x00\x00")).unwrap();
    let v = prog.flows().unwrap()[0].1;
    assert_eq!(v.app_done, APP_TRYING | 1, "not final after two bytes");
    prog.run(&frame(6, 40_000, 8_080, b"GET /pump/status HTTP/1.1\r\nHost: p\r\n\r\n")).unwrap();
    let v = prog.flows().unwrap()[0].1;
    assert_eq!((v.app, v.app_confidence, v.app_done), (App::Http as u8, 2, APP_FINAL));
    prog.clear().unwrap();
    for i in 1..=APP_TRIES + 1 {
        prog.run(&frame(6, 40_000, 40_001, b"\x01")).unwrap();
        let done = prog.flows().unwrap()[0].1.app_done;
        let want = if i < APP_TRIES { APP_TRYING | i } else { APP_FINAL };
        assert_eq!(done, want, "after {i} tiny segments");
    }
}

#[test]
fn ethernet_padding_is_not_payload() {
    let mut prog = TestProg::load().unwrap();
    // A 54-byte ACK padded to the 60-byte Ethernet minimum.
    let mut f = frame(6, 40_000, 12_345, &[]);
    f.resize(60, 0);
    prog.run(&f).unwrap();
    assert_eq!(prog.flows().unwrap()[0].1.app_done, 0);
}

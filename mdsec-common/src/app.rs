//! Application identification from the first payload of a flow direction.
//!
//! One classifier, two homes: [`classify`] is plain `no_std` Rust over a fixed-size
//! buffer with constant indices, so the XDP program runs exactly this code (on the
//! first [`CLASSIFY_BYTES`] of the payload, copied with `bpf_xdp_load_bytes`) and
//! userspace runs it on the same bytes. Payload signatures are port-independent
//! and give [`Confidence::High`]; when none matches, a well-known port gives a
//! [`Confidence::Low`] guess. Policy rules with `app` only accept `High`.

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum App {
    Unknown = 0,
    Dicom = 1,
    Hl7 = 2,
    Tls = 3,
    Http = 4,
    Dns = 5,
    Dhcp = 6,
    Ssh = 7,
    Telnet = 8,
    Smb = 9,
    Rdp = 10,
    Ntp = 11,
    Snmp = 12,
    Syslog = 13,
    Mdns = 14,
    Ssdp = 15,
    WsDiscovery = 16,
    Mqtt = 17,
    Modbus = 18,
}

impl App {
    pub const ALL: &'static [App] = &[
        App::Unknown,
        App::Dicom,
        App::Hl7,
        App::Tls,
        App::Http,
        App::Dns,
        App::Dhcp,
        App::Ssh,
        App::Telnet,
        App::Smb,
        App::Rdp,
        App::Ntp,
        App::Snmp,
        App::Syslog,
        App::Mdns,
        App::Ssdp,
        App::WsDiscovery,
        App::Mqtt,
        App::Modbus,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            App::Unknown => "unknown",
            App::Dicom => "dicom",
            App::Hl7 => "hl7",
            App::Tls => "tls",
            App::Http => "http",
            App::Dns => "dns",
            App::Dhcp => "dhcp",
            App::Ssh => "ssh",
            App::Telnet => "telnet",
            App::Smb => "smb",
            App::Rdp => "rdp",
            App::Ntp => "ntp",
            App::Snmp => "snmp",
            App::Syslog => "syslog",
            App::Mdns => "mdns",
            App::Ssdp => "ssdp",
            App::WsDiscovery => "ws-discovery",
            App::Mqtt => "mqtt",
            App::Modbus => "modbus",
        }
    }

    pub fn from_u8(v: u8) -> App {
        App::ALL.get(v as usize).copied().unwrap_or(App::Unknown)
    }

    pub fn from_name(s: &str) -> Option<App> {
        App::ALL.iter().copied().find(|a| a.name() == s)
    }
}

/// Payload bytes sampled for fingerprints (enough for a TLS ClientHello's SNI, DHCP
/// options after the fixed 240 bytes, a DICOM user-information item).
pub const SAMPLE_BYTES: usize = 512;

/// One sampled first payload (`SAMPLES` ring buffer), for userspace fingerprints.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sample {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub vlan: u16,
    pub proto: u8,
    /// [`App`] as u8.
    pub app: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Source MAC: the device the sample describes.
    pub mac: [u8; 6],
    /// Bytes of `data` that are payload.
    pub len: u16,
    pub _pad: [u8; 4],
    pub data: [u8; SAMPLE_BYTES],
}

const _: () = assert!(core::mem::size_of::<Sample>() == 576);

/// Apps whose first payload carries a fingerprint worth sampling.
#[inline(always)]
pub fn worth_sampling(app: App) -> bool {
    matches!(app, App::Dhcp | App::Dicom | App::Hl7 | App::Tls | App::Http | App::Ssh)
}

/// Payload bytes the classifier looks at (the DICOM application context item sits
/// at offset 74 of an A-ASSOCIATE PDU).
pub const CLASSIFY_BYTES: usize = 96;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Confidence {
    None = 0,
    /// Guessed from a well-known port only.
    Low = 1,
    /// Recognised from the payload bytes.
    High = 2,
}

impl Confidence {
    pub const fn from_u8(v: u8) -> Confidence {
        match v {
            2 => Confidence::High,
            1 => Confidence::Low,
            _ => Confidence::None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Confidence::None => "none",
            Confidence::Low => "low",
            Confidence::High => "high",
        }
    }
}

#[inline(always)]
fn starts(b: &[u8; CLASSIFY_BYTES], len: usize, pat: &[u8]) -> bool {
    if len < pat.len() {
        return false;
    }
    let mut i = 0;
    while i < pat.len() && i < CLASSIFY_BYTES {
        if b[i] != pat[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn at(b: &[u8; CLASSIFY_BYTES], off: usize, pat: &[u8], len: usize) -> bool {
    if len < off + pat.len() {
        return false;
    }
    let mut i = 0;
    while i < pat.len() && off + i < CLASSIFY_BYTES {
        if b[off + i] != pat[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn either(sport: u16, dport: u16, p: u16) -> bool {
    sport == p || dport == p
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Classifies a payload. `b` holds the first `len` (≤ [`CLASSIFY_BYTES`]) payload
/// bytes; the rest of `b` is ignored.
#[inline(always)]
pub fn classify(
    b: &[u8; CLASSIFY_BYTES],
    len: usize,
    proto: u8,
    sport: u16,
    dport: u16,
) -> (App, Confidence) {
    let len = if len > CLASSIFY_BYTES { CLASSIFY_BYTES } else { len };
    let app = if proto == TCP {
        classify_tcp(b, len)
    } else if proto == UDP {
        classify_udp(b, len, sport, dport)
    } else {
        App::Unknown
    };
    if app as u8 != App::Unknown as u8 {
        return (app, Confidence::High);
    }
    let guess = by_port(proto, sport, dport, len > 0);
    if guess as u8 != App::Unknown as u8 {
        return (guess, Confidence::Low);
    }
    (App::Unknown, Confidence::None)
}

#[inline(always)]
fn classify_tcp(b: &[u8; CLASSIFY_BYTES], len: usize) -> App {
    if len < 2 {
        return App::Unknown;
    }
    // DICOM upper layer (PS3.8 9.3): A-ASSOCIATE-RQ (1) / -AC (2), reserved 0,
    // 4-byte length, protocol version 0x0001; the application context item (0x10)
    // follows the fixed 68-byte header.
    if (b[0] == 0x01 || b[0] == 0x02)
        && b[1] == 0
        && len >= 10
        && b[6] == 0
        && b[7] == 1
        && (len < 75 || b[74] == 0x10)
    {
        return App::Dicom;
    }
    // HL7 v2 over MLLP: start block 0x0B, then the MSH segment.
    if b[0] == 0x0b && at(b, 1, b"MSH", len) {
        return App::Hl7;
    }
    // TLS handshake record: ClientHello (1) or ServerHello (2).
    if b[0] == 0x16 && b[1] == 0x03 && len >= 6 && b[2] <= 0x04 && (b[5] == 0x01 || b[5] == 0x02) {
        return App::Tls;
    }
    if starts(b, len, b"SSH-") {
        return App::Ssh;
    }
    // RDP: TPKT version 3, then X.224 Connection Request (0xE0) or Confirm (0xD0).
    if b[0] == 0x03 && b[1] == 0x00 && len >= 6 && (b[5] == 0xe0 || b[5] == 0xd0) {
        return App::Rdp;
    }
    // SMB over NetBIOS session service: message type 0, then \xffSMB or \xfeSMB.
    if b[0] == 0x00 && (at(b, 4, b"\xffSMB", len) || at(b, 4, b"\xfeSMB", len)) {
        return App::Smb;
    }
    // MQTT CONNECT: fixed header 0x10, remaining length (1 or 2 bytes), then the
    // protocol name "MQTT" (3.1.1/5) or "MQIsdp" (3.1).
    if b[0] == 0x10 {
        let name = if b[1] & 0x80 == 0 { 2 } else { 3 };
        if at(b, name, b"\x00\x04MQTT", len) || at(b, name, b"\x00\x06MQIsdp", len) {
            return App::Mqtt;
        }
    }
    // Modbus/TCP MBAP: protocol id 0, length covering unit id + PDU, function 1..127.
    if len >= 8 && b[2] == 0 && b[3] == 0 && b[4] == 0 {
        let mb_len = b[5] as usize;
        if mb_len >= 2 && mb_len + 6 == len && b[7] >= 1 && b[7] <= 127 {
            return App::Modbus;
        }
    }
    // Telnet option negotiation: IAC followed by WILL/WONT/DO/DONT.
    if b[0] == 0xff && b[1] >= 0xfb && b[1] <= 0xfe {
        return App::Telnet;
    }
    if is_http(b, len) {
        return App::Http;
    }
    App::Unknown
}

#[inline(always)]
fn is_http(b: &[u8; CLASSIFY_BYTES], len: usize) -> bool {
    starts(b, len, b"GET ")
        || starts(b, len, b"POST ")
        || starts(b, len, b"PUT ")
        || starts(b, len, b"HEAD ")
        || starts(b, len, b"DELETE ")
        || starts(b, len, b"OPTIONS ")
        || starts(b, len, b"PATCH ")
        || starts(b, len, b"HTTP/1.")
}

#[inline(always)]
fn classify_udp(b: &[u8; CLASSIFY_BYTES], len: usize, sport: u16, dport: u16) -> App {
    if len < 2 {
        return App::Unknown;
    }
    // SSDP (UPnP) and WS-Discovery (IEEE 11073 SDC) before generic checks.
    if starts(b, len, b"M-SEARCH * HTTP/1.1") || starts(b, len, b"NOTIFY * HTTP/1.1") {
        return App::Ssdp;
    }
    if either(sport, dport, 3702) && b[0] == b'<' {
        return App::WsDiscovery;
    }
    // SNMP: SEQUENCE, INTEGER version 0/1/3, then the community OCTET STRING (v1/v2c)
    // or a header SEQUENCE (v3).
    if b[0] == 0x30 && len >= 7 {
        let o = if b[1] & 0x80 == 0 { 2 } else { 2 + (b[1] & 0x7f) as usize };
        if o <= 4 && at(b, o, b"\x02\x01", len) && len > o + 3 {
            let v = b[(o + 2) & 0x3f];
            let next = b[(o + 3) & 0x3f];
            if (v == 0 || v == 1) && next == 0x04 || v == 3 && next == 0x30 {
                return App::Snmp;
            }
        }
    }
    // Syslog (RFC 3164/5424): "<PRI>" with 1-3 digits.
    if b[0] == b'<' && len >= 3 && b[1].is_ascii_digit() {
        let close = b[2] == b'>'
            || (len >= 4 && b[2].is_ascii_digit() && b[3] == b'>')
            || (len >= 5 && b[2].is_ascii_digit() && b[3].is_ascii_digit() && b[4] == b'>');
        if close {
            return App::Syslog;
        }
    }
    // DHCP (RFC 2131): op 1/2, Ethernet htype 1, hlen 6, on the DHCP ports.
    if (either(sport, dport, 67) || either(sport, dport, 68))
        && len >= 4
        && (b[0] == 1 || b[0] == 2)
        && b[1] == 1
        && b[2] == 6
    {
        return App::Dhcp;
    }
    // DNS and mDNS: a 12-byte header with at least one question, opcode 0..2.
    if len >= 12 && (b[2] >> 3) & 0x0f <= 2 && (b[4] != 0 || b[5] != 0) {
        if either(sport, dport, 5353) {
            return App::Mdns;
        }
        if either(sport, dport, 53) {
            return App::Dns;
        }
    }
    // NTP (RFC 5905): 48+ bytes, version 1-4, mode 1-5, on port 123.
    if either(sport, dport, 123) && len >= 48 {
        let v = (b[0] >> 3) & 7;
        let m = b[0] & 7;
        if (1..=4).contains(&v) && (1..=5).contains(&m) {
            return App::Ntp;
        }
    }
    App::Unknown
}

/// The service a flow's ports suggest, for a flow denied before any payload.
#[inline(always)]
pub fn port_hint(proto: u8, sport: u16, dport: u16) -> App {
    by_port(proto, sport, dport, false)
}

/// Well-known ports, for a low-confidence guess when the payload says nothing.
/// The lower port is tried first (usually the service side).
#[inline(always)]
fn by_port(proto: u8, sport: u16, dport: u16, has_payload: bool) -> App {
    let (p, q) = if dport < sport { (dport, sport) } else { (sport, dport) };
    if proto == TCP {
        let a = tcp_port(p);
        return if a as u8 != App::Unknown as u8 { a } else { tcp_port(q) };
    }
    if proto == UDP {
        let a = udp_port(p);
        let a = if a as u8 != App::Unknown as u8 { a } else { udp_port(q) };
        // These have a structural check above; bytes that failed it are not them,
        // whatever the port says (a port-53 flow of non-DNS bytes is not DNS).
        return if matches!(a, App::Dns | App::Mdns | App::Dhcp | App::Ntp) && has_payload {
            App::Unknown
        } else {
            a
        };
    }
    App::Unknown
}

#[inline(always)]
fn tcp_port(port: u16) -> App {
    match port {
        104 | 11112 => App::Dicom,
        2575 => App::Hl7,
        443 | 8443 => App::Tls,
        80 | 8080 => App::Http,
        22 => App::Ssh,
        23 => App::Telnet,
        139 | 445 => App::Smb,
        3389 => App::Rdp,
        1883 | 8883 => App::Mqtt,
        502 => App::Modbus,
        _ => App::Unknown,
    }
}

#[inline(always)]
fn udp_port(port: u16) -> App {
    match port {
        53 => App::Dns,
        67 | 68 => App::Dhcp,
        123 => App::Ntp,
        161 | 162 => App::Snmp,
        514 => App::Syslog,
        5353 => App::Mdns,
        1900 => App::Ssdp,
        3702 => App::WsDiscovery,
        _ => App::Unknown,
    }
}

//! Application identification from a flow direction's first payload (its first
//! few, when a tiny one decides nothing: `flow::next_app_done`).
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
    /// HL7 FHIR's REST API over plain HTTP, from a `/fhir` request path (a
    /// kind of `Http`: rules for `http` accept it, see `policy::app_satisfies`).
    Fhir = 19,
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
        App::Fhir,
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
            App::Fhir => "fhir",
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
    matches!(app, App::Dhcp | App::Dicom | App::Hl7 | App::Tls | App::Http | App::Fhir | App::Ssh)
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
        classify_tcp(b, len, sport, dport)
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

/// The big-endian 16-bit value at `off` (a constant index after inlining).
#[inline(always)]
fn be16(b: &[u8; CLASSIFY_BYTES], off: usize) -> usize {
    ((b[off & 0x3f] as usize) << 8) | b[(off + 1) & 0x3f] as usize
}

/// A DNS header at `off` that a real message has: opcode 0 (query), 1
/// (inverse) or 2 (status), and a question or an answer (mDNS announcements
/// and inverse queries carry no question). Counts are small in real traffic.
#[inline(always)]
fn dns_header(b: &[u8; CLASSIFY_BYTES], off: usize) -> bool {
    let (qd, an) = (be16(b, off + 4), be16(b, off + 6));
    (b[(off + 2) & 0x3f] >> 3) & 0x0f <= 2 && (qd != 0 || an != 0) && qd <= 32 && an <= 255
}

/// A syslog priority `<N>`, `<NN>` or `<NNN>` at `off`.
#[inline(always)]
fn syslog_pri(b: &[u8; CLASSIFY_BYTES], off: usize, len: usize) -> bool {
    let d = |i: usize| b[(off + i) & 0x3f].is_ascii_digit();
    let c = |i: usize| b[(off + i) & 0x3f] == b'>';
    len >= off + 3
        && b[off & 0x3f] == b'<'
        && d(1)
        && (c(2) || (len >= off + 4 && d(2) && c(3)) || (len >= off + 5 && d(2) && d(3) && c(4)))
}

/// A payload of exactly one message of `total` bytes, or the start of a
/// longer one when the classifier saw only its first [`CLASSIFY_BYTES`].
#[inline(always)]
fn whole_or_longer(total: usize, len: usize) -> bool {
    total == len || (len == CLASSIFY_BYTES && total > len)
}

#[inline(always)]
fn classify_tcp(b: &[u8; CLASSIFY_BYTES], len: usize, sport: u16, dport: u16) -> App {
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
    // A TLS record header of any content type (change_cipher_spec 20, alert
    // 21, handshake 22, application_data 23), version 3.0–1.3, a record length
    // within the limit: a flow first seen mid-connection is still TLS.
    if b[0] >= 0x14 && b[0] <= 0x17 && b[1] == 0x03 && b[2] <= 0x04 && len >= 5 {
        let rec = be16(b, 3);
        if rec > 0 && rec <= 18_432 {
            return App::Tls;
        }
    }
    if starts(b, len, b"SSH-") {
        return App::Ssh;
    }
    // TPKT (version 3) carries RDP and also ISO-on-TCP: Siemens S7comm,
    // S7comm-plus and IEC 61850 MMS use the same X.224 connection request
    // (0xE0) and confirm (0xD0). RDP's carry its own data after the 7-byte
    // X.224 header: a request a routing cookie ("Cookie: ") or an
    // RDP_NEG_REQ (type 1, length 8), a confirm an RDP_NEG_RSP or _FAILURE
    // (type 2 or 3, length 8), or nothing at all (LI 6). ISO-on-TCP's carry
    // TSAP parameters (0xC0–0xC2) there: not RDP, and no label of ours.
    if b[0] == 0x03 && b[1] == 0x00 && len >= 6 && (b[5] == 0xe0 || b[5] == 0xd0) {
        let neg = |t: u8| len >= 15 && b[11] == t && b[13] == 0x08 && b[14] == 0x00;
        let bare = b[4] == 6 && len == 11;
        let rdp = if b[5] == 0xe0 { at(b, 11, b"Cookie: ", len) || neg(1) } else { neg(2) || neg(3) };
        return if rdp || bare { App::Rdp } else { App::Unknown };
    }
    // SMB over NetBIOS session service: message type 0, then \xffSMB or \xfeSMB.
    if b[0] == 0x00 && (at(b, 4, b"\xffSMB", len) || at(b, 4, b"\xfeSMB", len)) {
        return App::Smb;
    }
    // The NetBIOS session request that opens SMB on port 139 (RFC 1002
    // 4.3.2): type 0x81, then the called name, first-level encoded (length
    // 32, letters A–P).
    if b[0] == 0x81 && b[1] == 0 && len >= 8 && b[4] == 0x20 {
        let nb = |c: u8| (b'A'..=b'P').contains(&c);
        if nb(b[5]) && nb(b[6]) && nb(b[7]) {
            return App::Smb;
        }
    }
    // MQTT CONNECT: fixed header 0x10, remaining length (1 or 2 bytes), then the
    // protocol name "MQTT" (3.1.1/5) or "MQIsdp" (3.1).
    if b[0] == 0x10 {
        let name = if b[1] & 0x80 == 0 { 2 } else { 3 };
        if at(b, name, b"\x00\x04MQTT", len) || at(b, name, b"\x00\x06MQIsdp", len) {
            return App::Mqtt;
        }
    }
    // Any other MQTT control packet (a flow first seen after its CONNECT:
    // PUBLISH, PINGREQ, SUBSCRIBE…), on MQTT's port only: a 2-byte fixed
    // header alone says too little elsewhere. The type's fixed flags, a
    // one- or two-byte remaining length covering the payload.
    if either(sport, dport, 1883) {
        let t = b[0] >> 4;
        let flags = b[0] & 0x0f;
        let flags_ok = match t {
            3 => flags & 0x06 != 0x06,
            6 | 8 | 10 => flags == 2,
            2 | 4 | 5 | 7 | 9 | 11 | 12 | 13 | 14 | 15 => flags == 0,
            _ => false,
        };
        let (rem, hdr) = if b[1] & 0x80 == 0 {
            (b[1] as usize, 2)
        } else if b[2] & 0x80 == 0 {
            ((b[1] & 0x7f) as usize | (b[2] as usize) << 7, 3)
        } else {
            (usize::MAX / 2, 4) // longer lengths: never a payload this short
        };
        if flags_ok && len >= hdr && whole_or_longer(rem + hdr, len) {
            return App::Mqtt;
        }
    }
    // DNS over TCP (RFC 1035 4.2.2): a 2-byte length, then the message.
    if either(sport, dport, 53) && len >= 14 && whole_or_longer(be16(b, 0) + 2, len) && dns_header(b, 2) {
        return App::Dns;
    }
    // Syslog over TCP (RFC 6587): octet counting ("LEN <PRI>…") or
    // non-transparent framing ("<PRI>…").
    if syslog_pri(b, 0, len) {
        return App::Syslog;
    }
    if b[0].is_ascii_digit() {
        let sp = if b[1] == b' ' {
            1
        } else if b[1].is_ascii_digit() && b[2] == b' ' {
            2
        } else if b[1].is_ascii_digit() && b[2].is_ascii_digit() && b[3] == b' ' {
            3
        } else if b[1].is_ascii_digit() && b[2].is_ascii_digit() && b[3].is_ascii_digit() && b[4] == b' ' {
            4
        } else {
            0
        };
        if sp > 0 && syslog_pri(b, sp + 1, len) {
            return App::Syslog;
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
        return if is_fhir(b, len) { App::Fhir } else { App::Http };
    }
    App::Unknown
}

/// An HTTP request of HL7 FHIR's REST API: one for a `/fhir` path. (A FHIR
/// content type is mostly past the bytes the classifier sees, and a scan for
/// it costs the verifier more than the datapath may spend.)
#[inline(always)]
fn is_fhir(b: &[u8; CLASSIFY_BYTES], len: usize) -> bool {
    // The path follows the method and its space: offsets 4 (GET, PUT) to 7 (DELETE).
    at(b, 4, b"/fhir", len) || at(b, 5, b"/fhir", len) || at(b, 6, b"/fhir", len) || at(b, 7, b"/fhir", len)
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
    // Over UDP, HTTP is SSDP: its searches, notifications and the replies to
    // searches (`HTTP/1.1 200 OK`).
    if starts(b, len, b"M-SEARCH * HTTP/1.1")
        || starts(b, len, b"NOTIFY * HTTP/1.1")
        || starts(b, len, b"HTTP/1.1 ")
    {
        return App::Ssdp;
    }
    // RDP over UDP (MS-RDPEUDP 2.2.2): the SYN (and SYN+ACK) datagram: flags
    // with RDPUDP_FLAG_SYN, a receive window, then the initial sequence
    // number and both MTUs, each 1132–1232.
    if len >= 16 && b[7] & 0x01 != 0 && (b[4] != 0 || b[5] != 0) {
        let (up, down) = (be16(b, 12), be16(b, 14));
        if (1132..=1232).contains(&up) && (1132..=1232).contains(&down) {
            return App::Rdp;
        }
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
    if syslog_pri(b, 0, len) {
        return App::Syslog;
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
    // DNS and mDNS: a 12-byte header with a question or an answer, opcode 0..2.
    if len >= 12 && dns_header(b, 0) {
        if either(sport, dport, 5353) {
            return App::Mdns;
        }
        if either(sport, dport, 53) {
            return App::Dns;
        }
    }
    // NTP (RFC 5905): modes 1–5 on any port: 48+ bytes, version 1–4, a
    // stratum up to 16, a poll exponent up to 17, a precision of 2^-32..1 s.
    // Modes 6 (control, ntpq) and 7 (private, ntpdc: the amplification
    // kind) on port 123 only: their few header bytes say too little
    // elsewhere (0x16/0x17 also start TLS records).
    let (v, m) = ((b[0] >> 3) & 7, b[0] & 7);
    if len >= 48 && (1..=4).contains(&v) && (1..=5).contains(&m) && b[1] <= 16 && b[2] <= 17 {
        let precision = b[3] as i8;
        if (-32..=0).contains(&precision) {
            return App::Ntp;
        }
    }
    if either(sport, dport, 123) && (2..=4).contains(&v) && ((m == 6 && len >= 12) || (m == 7 && len >= 8)) {
        return App::Ntp;
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

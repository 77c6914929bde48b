//! Passive fingerprints from sampled first payloads: what a device says about itself
//! without being asked. Every parser treats the bytes as hostile: bounds-checked,
//! lengths capped, non-printable text dropped.

use mdsec_common::app::App;

/// Longest value kept.
const MAX_VALUE: usize = 128;

fn text(b: &[u8]) -> Option<String> {
    let s: String = String::from_utf8_lossy(b).chars().filter(|c| !c.is_control()).take(MAX_VALUE).collect();
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn u16be(b: &[u8], i: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize)
}

/// What a fingerprint says: one variant per value a parser extracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Trait {
    DhcpHostname,
    DhcpParameterRequestList,
    DhcpVendorClass,
    DhcpClientId,
    DicomCalledAe,
    DicomCallingAe,
    DicomImplementationClassUid,
    DicomImplementationVersion,
    Hl7SendingApplication,
    Hl7SendingFacility,
    TlsSni,
    HttpUserAgent,
    SshBanner,
}

impl Trait {
    pub const ALL: &'static [Trait] = &[
        Trait::DhcpHostname,
        Trait::DhcpParameterRequestList,
        Trait::DhcpVendorClass,
        Trait::DhcpClientId,
        Trait::DicomCalledAe,
        Trait::DicomCallingAe,
        Trait::DicomImplementationClassUid,
        Trait::DicomImplementationVersion,
        Trait::Hl7SendingApplication,
        Trait::Hl7SendingFacility,
        Trait::TlsSni,
        Trait::HttpUserAgent,
        Trait::SshBanner,
    ];

    /// The name in the API and the state database, e.g. `dhcp.hostname`.
    pub fn name(self) -> &'static str {
        match self {
            Trait::DhcpHostname => "dhcp.hostname",
            Trait::DhcpParameterRequestList => "dhcp.parameter_request_list",
            Trait::DhcpVendorClass => "dhcp.vendor_class",
            Trait::DhcpClientId => "dhcp.client_id",
            Trait::DicomCalledAe => "dicom.called_ae",
            Trait::DicomCallingAe => "dicom.calling_ae",
            Trait::DicomImplementationClassUid => "dicom.implementation_class_uid",
            Trait::DicomImplementationVersion => "dicom.implementation_version",
            Trait::Hl7SendingApplication => "hl7.sending_application",
            Trait::Hl7SendingFacility => "hl7.sending_facility",
            Trait::TlsSni => "tls.sni",
            Trait::HttpUserAgent => "http.user_agent",
            Trait::SshBanner => "ssh.banner",
        }
    }

    pub fn from_name(s: &str) -> Option<Trait> {
        Trait::ALL.iter().copied().find(|t| t.name() == s)
    }
}

/// (trait, value) pairs such as `(Trait::DhcpHostname, "pump07")`.
pub fn extract(app: App, p: &[u8]) -> Vec<(Trait, String)> {
    let kv = |k: Trait, v: Option<String>| v.map(|v| (k, v));
    let out: Vec<Option<(Trait, String)>> = match app {
        App::Dhcp => dhcp(p),
        App::Dicom => dicom(p),
        App::Hl7 => {
            let (app_, facility) = hl7(p);
            vec![kv(Trait::Hl7SendingApplication, app_), kv(Trait::Hl7SendingFacility, facility)]
        }
        App::Tls => vec![kv(Trait::TlsSni, sni(p))],
        App::Http | App::Fhir => vec![kv(Trait::HttpUserAgent, header(p, b"user-agent:"))],
        App::Ssh => vec![kv(Trait::SshBanner, p.split(|&c| c == b'\n').next().and_then(text))],
        _ => vec![],
    };
    out.into_iter().flatten().collect()
}

fn dhcp(p: &[u8]) -> Vec<Option<(Trait, String)>> {
    let mut out = Vec::new();
    if p.get(236..240) != Some(&[99, 130, 83, 99]) {
        return out;
    }
    let mut i = 240;
    while let Some(&code) = p.get(i) {
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let Some(&len) = p.get(i + 1) else { break };
        let Some(v) = p.get(i + 2..i + 2 + len as usize) else { break };
        match code {
            12 => out.push(text(v).map(|t| (Trait::DhcpHostname, t))),
            55 => out.push(Some((
                Trait::DhcpParameterRequestList,
                v.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
            ))),
            60 => out.push(text(v).map(|t| (Trait::DhcpVendorClass, t))),
            61 => out.push(Some((Trait::DhcpClientId, v.iter().map(|b| format!("{b:02x}")).collect()))),
            _ => {}
        }
        i += 2 + len as usize;
    }
    out
}

fn dicom(p: &[u8]) -> Vec<Option<(Trait, String)>> {
    let mut out = Vec::new();
    if p.len() < 74 || !(p[0] == 1 || p[0] == 2) {
        return out;
    }
    out.push(text(&p[10..26]).map(|t| (Trait::DicomCalledAe, t)));
    out.push(text(&p[26..42]).map(|t| (Trait::DicomCallingAe, t)));
    // Variable items from offset 74: type, reserved, 2-byte length.
    let mut i = 74;
    while let (Some(&ty), Some(len)) = (p.get(i), u16be(p, i + 2)) {
        let Some(body) = p.get(i + 4..i + 4 + len) else { break };
        if ty == 0x50 {
            // User information: sub-items of the same shape.
            let mut j = 0;
            while let (Some(&sub), Some(sl)) = (body.get(j), u16be(body, j + 2)) {
                let Some(v) = body.get(j + 4..j + 4 + sl) else { break };
                match sub {
                    0x52 => out.push(text(v).map(|t| (Trait::DicomImplementationClassUid, t))),
                    0x55 => out.push(text(v).map(|t| (Trait::DicomImplementationVersion, t))),
                    _ => {}
                }
                j += 4 + sl;
            }
        }
        i += 4 + len;
    }
    out
}

/// MSH-3 and MSH-4 of an MLLP-framed HL7 v2 message.
fn hl7(p: &[u8]) -> (Option<String>, Option<String>) {
    let p = p.strip_prefix(b"\x0b").unwrap_or(p);
    if !p.starts_with(b"MSH") || p.len() < 5 {
        return (None, None);
    }
    let sep = p[3];
    let seg_end = p.iter().position(|&c| c == b'\r').unwrap_or(p.len());
    // Fields: MSH-1 is the separator itself, so split index 2 is MSH-3.
    let fields: Vec<&[u8]> = p[..seg_end].split(|&c| c == sep).collect();
    let comp = |f: Option<&&[u8]>| f.and_then(|f| text(f.split(|&c| c == b'^').next().unwrap_or(f)));
    (comp(fields.get(2)), comp(fields.get(3)))
}

/// server_name from a TLS ClientHello.
fn sni(p: &[u8]) -> Option<String> {
    if p.first() != Some(&0x16) || p.get(5) != Some(&0x01) {
        return None;
    }
    // record (5) + handshake header (4) + version (2) + random (32)
    let mut i = 43;
    let sid = *p.get(i)? as usize;
    i += 1 + sid;
    let suites = u16be(p, i)?;
    i += 2 + suites;
    let comp = *p.get(i)? as usize;
    i += 1 + comp;
    let ext_end = (i + 2 + u16be(p, i)?).min(p.len());
    i += 2;
    while i + 4 <= ext_end {
        let (ty, len) = (u16be(p, i)?, u16be(p, i + 2)?);
        if ty == 0 {
            // server_name_list: length (2), type (1), name length (2), name
            let name_len = u16be(p, i + 7)?;
            return text(p.get(i + 9..i + 9 + name_len)?);
        }
        i += 4 + len;
    }
    None
}

/// Value of an HTTP header (name given lower case with its colon).
fn header(p: &[u8], name: &[u8]) -> Option<String> {
    p.split(|&c| c == b'\n')
        .skip(1)
        .take_while(|l| !l.is_empty() && *l != b"\r")
        .find(|l| l.len() > name.len() && l[..name.len()].eq_ignore_ascii_case(name))
        .and_then(|l| text(&l[name.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/../mdsec-common/tests/payloads/{name}.hex", env!("CARGO_MANIFEST_DIR"));
        let hex = std::fs::read_to_string(path).unwrap();
        let hex = hex.trim();
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    fn get(app: App, name: &str, key: &str) -> Option<String> {
        extract(app, &fixture(name)).into_iter().find(|(k, _)| k.name() == key).map(|(_, v)| v)
    }

    #[test]
    fn fingerprints_from_real_first_payloads() {
        assert_eq!(get(App::Dhcp, "dhcp-discover", "dhcp.hostname").as_deref(), Some("pump07"));
        assert_eq!(
            get(App::Dhcp, "dhcp-discover", "dhcp.parameter_request_list").as_deref(),
            Some("1,3,6,15")
        );
        assert_eq!(get(App::Dhcp, "dhcp-discover", "dhcp.vendor_class").as_deref(), Some("Alaris-8"));
        assert_eq!(get(App::Dhcp, "dhcp-discover", "dhcp.client_id").as_deref(), Some("0100095d1a2b3c"));
        assert_eq!(get(App::Dicom, "dicom-associate-rq", "dicom.called_ae").as_deref(), Some("PACS"));
        assert_eq!(get(App::Dicom, "dicom-associate-rq", "dicom.calling_ae").as_deref(), Some("PUMP-GW"));
        assert!(
            get(App::Dicom, "dicom-associate-rq", "dicom.implementation_class_uid")
                .unwrap()
                .starts_with("1.2.276.0.7230010")
        );
        assert!(
            get(App::Dicom, "dicom-associate-rq", "dicom.implementation_version")
                .unwrap()
                .starts_with("OFFIS_DCMTK")
        );
        assert_eq!(get(App::Hl7, "hl7-mllp", "hl7.sending_application").as_deref(), Some("PUMP"));
        assert_eq!(get(App::Hl7, "hl7-mllp", "hl7.sending_facility").as_deref(), Some("WARD3"));
        assert_eq!(
            get(App::Tls, "tls-client-hello-sni", "tls.sni").as_deref(),
            Some("pacs.hospital.example")
        );
        assert_eq!(get(App::Tls, "tls-client-hello", "tls.sni"), None);
        assert!(get(App::Http, "http-get", "http.user_agent").unwrap().starts_with("curl/"));
        assert!(get(App::Ssh, "ssh-banner", "ssh.banner").unwrap().starts_with("SSH-2.0-OpenSSH"));
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut x: u64 = 7;
        for len in 0..600 {
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for app in [App::Dhcp, App::Dicom, App::Hl7, App::Tls, App::Http, App::Ssh] {
                let _ = extract(app, &b);
            }
        }
        // Truncations of real payloads at every length.
        for (app, name) in [
            (App::Tls, "tls-client-hello-sni"),
            (App::Dicom, "dicom-associate-rq"),
            (App::Dhcp, "dhcp-discover"),
        ] {
            let f = fixture(name);
            for n in 0..f.len() {
                let _ = extract(app, &f[..n]);
            }
        }
    }
}

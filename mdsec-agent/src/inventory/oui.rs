//! Vendor names from the IEEE OUI registry. Reads Debian's ieee-data
//! (`/usr/share/ieee-data/oui.csv`, MA-L assignments) when present; otherwise a
//! small embedded table of medical-device vendors (copied from that registry) so a
//! gateway without ieee-data still names the devices that matter most. Never
//! downloads anything.

use std::collections::HashMap;

pub const REGISTRY: &str = "/usr/share/ieee-data/oui.csv";

/// MA-L assignments of medical-device vendors, from the IEEE registry.
const EMBEDDED: &[(&str, &str)] = &[
    ("444B5D", "GE Healthcare"),
    ("F8C678", "Carefusion"),
    ("9CC8AE", "Becton, Dickinson  and Company"),
    ("5846E1", "Baxter International Inc"),
    ("5842E4", "Baxter International Inc"),
    ("001865", "Siemens Healthcare Diagnostics Manufacturing Ltd"),
    ("20E791", "Siemens Healthcare Diagnostics, Inc"),
    ("00105D", "Draeger Medical"),
    ("0030E6", "Draeger Medical Systems, Inc."),
    ("F0E5C3", "Drägerwerk AG & Co. KG aA"),
    ("0003B1", "ICU Medical, Inc."),
    ("B04C05", "Fresenius Medical Care Deutschland GmbH"),
    ("001338", "FRESENIUS-VIAL"),
    ("DC16A2", "Medtronic Diabetes"),
    ("00095C", "Philips Medical Systems - Cardiac and Monitoring Systems (CM"),
    ("00A037", "Mindray DS USA, Inc."),
    ("000F14", "Mindray Co., Ltd."),
    ("001A01", "Smiths Medical"),
    ("00A0AA", "SPACELABS MEDICAL"),
    ("00A09A", "NIHON KOHDEN AMERICA"),
];

pub struct Oui {
    by_prefix: HashMap<[u8; 3], String>,
    pub source: String,
}

impl Oui {
    /// The registry file if readable, else the embedded table.
    pub fn load() -> Oui {
        match std::fs::read_to_string(REGISTRY) {
            Ok(text) => {
                let o = Oui::parse_csv(&text);
                if !o.by_prefix.is_empty() {
                    return Oui { source: REGISTRY.into(), ..o };
                }
                Oui::embedded()
            }
            Err(_) => Oui::embedded(),
        }
    }

    pub fn embedded() -> Oui {
        let by_prefix = EMBEDDED.iter().filter_map(|(h, n)| Some((hex3(h)?, n.to_string()))).collect();
        Oui { by_prefix, source: "embedded medical-vendor table".into() }
    }

    /// `Registry,Assignment,Organization Name,Organization Address` with RFC 4180
    /// quoting; rows other than MA-L are skipped.
    pub fn parse_csv(text: &str) -> Oui {
        let mut by_prefix = HashMap::new();
        for line in text.lines().skip(1) {
            let f = csv_fields(line, 3);
            if f.len() == 3
                && f[0] == "MA-L"
                && let Some(p) = hex3(&f[1])
            {
                by_prefix.insert(p, f[2].trim().to_string());
            }
        }
        Oui { by_prefix, source: "csv".into() }
    }

    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// Vendor of a MAC; locally administered MACs (randomised, virtual) have none.
    pub fn vendor(&self, mac: [u8; 6]) -> Option<String> {
        if mac[0] & 0x02 != 0 {
            return None;
        }
        self.by_prefix.get(&[mac[0], mac[1], mac[2]]).cloned()
    }
}

fn hex3(h: &str) -> Option<[u8; 3]> {
    if h.len() != 6 {
        return None;
    }
    let b = |i: usize| u8::from_str_radix(&h[i..i + 2], 16).ok();
    Some([b(0)?, b(2)?, b(4)?])
}

/// The first `n` fields of a CSV line, unquoted.
fn csv_fields(line: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                if out.len() == n {
                    return out;
                }
            }
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quoted_registry_rows() {
        let o = Oui::parse_csv(
            "Registry,Assignment,Organization Name,Organization Address\n\
             MA-L,9CC8AE,\"Becton, Dickinson and Company\",\"1 Becton Drive Franklin Lakes NJ US 07417 \"\n\
             MA-M,5846E1A,Someone,Somewhere\n\
             MA-L,5846E1,Baxter International Inc,\"One Baxter Parkway, Deerfield IL US\"\n",
        );
        assert_eq!(o.len(), 2);
        assert_eq!(o.vendor([0x9c, 0xc8, 0xae, 1, 2, 3]).as_deref(), Some("Becton, Dickinson and Company"));
        assert_eq!(o.vendor([0x58, 0x46, 0xe1, 0, 0, 7]).as_deref(), Some("Baxter International Inc"));
        assert_eq!(o.vendor([0x00, 0x11, 0x22, 0, 0, 7]), None);
    }

    #[test]
    fn locally_administered_macs_have_no_vendor() {
        let o = Oui::embedded();
        assert!(o.vendor([0x58, 0x46, 0xe1, 0, 0, 1]).is_some());
        assert_eq!(o.vendor([0x5a, 0x46, 0xe1, 0, 0, 1]), None);
    }

    #[test]
    fn embedded_table_matches_the_registry_when_present() {
        let Ok(text) = std::fs::read_to_string(REGISTRY) else { return };
        let reg = Oui::parse_csv(&text);
        for (h, name) in EMBEDDED {
            let p = hex3(h).unwrap();
            let mac = [p[0], p[1], p[2], 0, 0, 0];
            assert_eq!(reg.vendor(mac).as_deref(), Some(*name), "{h}");
        }
    }
}

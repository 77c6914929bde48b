//! The vulnerability register: what the operator knows about the devices' CVEs.
//!
//! Supplied as YAML (`register:` in the agent config; `mdsec-agent register
//! import --csv` converts a spreadsheet export) and never fetched from the
//! network. Entries describe a vendor/model/firmware with its CVEs, disclosure
//! dates and whether the vendor offers a patch (a date, `none`, or
//! `end-of-life`); `devices:` records when a device was patched. Devices match
//! an entry through the inventory: the entry's `macs`, or its `vendor` (a
//! case-insensitive part of the IEEE OUI vendor name) and, if given, its `model`
//! (the device's `model` from the agent config's `devices:`).
//!
//! Patch-compliance lag of a (device, CVE) is the days from disclosure to the
//! patch, or to today while it is open.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::{base::diag::Diagnostic, base::net::Mac, inventory::Device};

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RegisterYaml {
    #[serde(default)]
    vulnerabilities: Vec<EntryYaml>,
    #[serde(default)]
    devices: Vec<DeviceYaml>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct EntryYaml {
    /// Part of the device's IEEE OUI vendor name, case-insensitive.
    #[schemars(with = "Option<String>")]
    vendor: Option<Spanned<String>>,
    /// The device's model as the agent config's `devices:` names it.
    model: Option<String>,
    /// Informational: firmware is not visible on the wire.
    firmware: Option<String>,
    /// Devices this entry applies to regardless of vendor and model.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    macs: Vec<Spanned<String>>,
    cves: Vec<CveYaml>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CveYaml {
    #[schemars(with = "String")]
    id: Spanned<String>,
    /// `YYYY-MM-DD`.
    #[schemars(with = "String")]
    disclosed: Spanned<String>,
    /// `YYYY-MM-DD` (the vendor's patch is available since), `none` or `end-of-life`.
    #[schemars(with = "String")]
    patch: Spanned<String>,
    #[serde(default)]
    title: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DeviceYaml {
    #[schemars(with = "String")]
    mac: Spanned<String>,
    /// CVE id → `YYYY-MM-DD` the device was patched.
    #[schemars(with = "BTreeMap<String, String>")]
    patched: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Patch {
    Available,
    None,
    EndOfLife,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cve {
    pub id: String,
    pub title: String,
    pub disclosed: Date,
    pub patch: Patch,
    pub patch_date: Option<Date>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub firmware: Option<String>,
    /// Canonical spelling.
    pub macs: Vec<Mac>,
    pub cves: Vec<Cve>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Register {
    pub entries: Vec<Entry>,
    /// MAC → CVE → patched on.
    pub patched: HashMap<Mac, HashMap<String, Date>>,
}

/// Where a (device, CVE) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Patched,
    /// A patch exists and is not applied.
    Open,
    /// The vendor offers no patch.
    NoPatch,
    /// The product is out of vendor support.
    EndOfLife,
}

impl Status {
    pub fn is_open(self) -> bool {
        self != Status::Patched
    }

    /// The name the JSON report uses (`no-patch`), for the other renderings.
    pub fn name(self) -> &'static str {
        match self {
            Status::Patched => "patched",
            Status::Open => "open",
            Status::NoPatch => "no-patch",
            Status::EndOfLife => "end-of-life",
        }
    }
}

/// One CVE of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Finding {
    pub cve: String,
    pub title: String,
    pub disclosed: String,
    /// `YYYY-MM-DD`, `none` or `end-of-life`.
    pub patch_available: String,
    pub status: Status,
    pub patched_on: Option<String>,
    /// Days from disclosure to the patch, or to `today` while open.
    pub lag_days: i64,
    /// Days from the vendor's patch to its installation (or `today`), when a patch exists.
    pub lag_since_patch_days: Option<i64>,
    pub vendor: Option<String>,
    pub model: Option<String>,
    pub firmware: Option<String>,
}

fn parse_date(s: &str) -> Option<Date> {
    s.trim().parse::<Date>().ok()
}

impl Register {
    /// Loads and validates a register file; every problem as `file:line:col`.
    pub fn load(path: &Path) -> Result<Register, Vec<Diagnostic>> {
        let err = |line: u64, col: u64, message: String| Diagnostic {
            file: path.to_owned(),
            line,
            col,
            message,
            warning: false,
        };
        let text = std::fs::read_to_string(path).map_err(|e| vec![err(0, 0, format!("cannot read: {e}"))])?;
        if text.len() as u64 > crate::policy::model::MAX_FILE_BYTES * 16 {
            return Err(vec![err(1, 1, "the register is larger than 16 MiB".into())]);
        }
        let y: RegisterYaml = serde_saphyr::from_str(&text).map_err(|e| {
            let (line, col) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            vec![err(line, col, crate::base::diag::saphyr_message(&e.to_string()))]
        })?;
        let mut diags = Vec::new();
        let mut at =
            |s: &Spanned<String>, m: String| diags.push(err(s.referenced.line(), s.referenced.column(), m));
        let mut reg = Register::default();
        for e in &y.vulnerabilities {
            let mut macs = Vec::new();
            for m in &e.macs {
                match crate::base::net::parse_mac(&m.value) {
                    Some(mac) => macs.push(Mac(mac)),
                    None => at(m, format!("`{}` is not a MAC address (aa:bb:cc:dd:ee:ff)", m.value)),
                }
            }
            let vendor = e.vendor.as_ref().map(|v| v.value.trim().to_string()).filter(|v| !v.is_empty());
            if vendor.is_none()
                && e.macs.is_empty()
                && let Some(c) = e.cves.first()
            {
                at(&c.id, "an entry needs `vendor` or `macs` to match devices".into());
            }
            let mut cves = Vec::new();
            for c in &e.cves {
                let id = c.id.value.trim().to_string();
                if !is_cve_id(&id) {
                    at(&c.id, format!("`{id}` is not a CVE id like CVE-2021-33885"));
                }
                let disclosed = parse_date(&c.disclosed.value);
                if disclosed.is_none() {
                    at(&c.disclosed, format!("`{}` is not a date (YYYY-MM-DD)", c.disclosed.value));
                }
                let (patch, patch_date) = match c.patch.value.trim() {
                    "none" => (Patch::None, None),
                    "end-of-life" => (Patch::EndOfLife, None),
                    d => match parse_date(d) {
                        Some(d) => (Patch::Available, Some(d)),
                        None => {
                            at(
                                &c.patch,
                                format!("`{d}` is not a date (YYYY-MM-DD), `none` or `end-of-life`"),
                            );
                            continue;
                        }
                    },
                };
                if let Some(d) = disclosed {
                    cves.push(Cve { id, title: c.title.clone(), disclosed: d, patch, patch_date });
                }
            }
            if e.cves.is_empty()
                && let Some(v) = &e.vendor
            {
                at(v, "an entry needs at least one CVE under `cves`".into());
            }
            reg.entries.push(Entry {
                vendor,
                model: e.model.clone(),
                firmware: e.firmware.clone(),
                macs,
                cves,
            });
        }
        for d in &y.devices {
            let Some(mac) = crate::base::net::parse_mac(&d.mac.value) else {
                at(&d.mac, format!("`{}` is not a MAC address (aa:bb:cc:dd:ee:ff)", d.mac.value));
                continue;
            };
            let mut map = HashMap::new();
            for (cve, date) in &d.patched {
                match parse_date(&date.value) {
                    Some(day) => {
                        map.insert(cve.trim().to_string(), day);
                    }
                    None => {
                        at(date, format!("patched date `{}` of {cve} is not a date (YYYY-MM-DD)", date.value))
                    }
                }
            }
            reg.patched.insert(Mac(mac), map);
        }
        if diags.is_empty() { Ok(reg) } else { Err(diags) }
    }

    /// The register's entries that apply to a device.
    pub fn entries_for<'a>(&'a self, d: &'a Device) -> impl Iterator<Item = &'a Entry> + 'a {
        let vendor = d.vendor.as_deref().unwrap_or("").to_ascii_lowercase();
        self.entries.iter().filter(move |e| {
            if e.macs.contains(&d.mac) {
                return true;
            }
            let Some(v) = &e.vendor else { return false };
            let vendor_ok = !vendor.is_empty() && vendor.contains(&v.to_ascii_lowercase());
            let model_ok = match (&e.model, &d.model) {
                (None, _) => true,
                (Some(want), Some(have)) => want.eq_ignore_ascii_case(have.trim()),
                (Some(_), None) => false,
            };
            vendor_ok && model_ok
        })
    }

    /// Every CVE of a device with its status and lag on `today`.
    pub fn assess(&self, d: &Device, today: Date) -> Vec<Finding> {
        let patched = self.patched.get(&d.mac);
        let mut out: Vec<Finding> = Vec::new();
        for e in self.entries_for(d) {
            for c in &e.cves {
                if out.iter().any(|f| f.cve == c.id) {
                    continue;
                }
                let on = patched.and_then(|p| p.get(&c.id)).copied();
                let status = match (on, c.patch) {
                    (Some(_), _) => Status::Patched,
                    (None, Patch::Available) => Status::Open,
                    (None, Patch::None) => Status::NoPatch,
                    (None, Patch::EndOfLife) => Status::EndOfLife,
                };
                let until = on.unwrap_or(today);
                let days = |from: Date| (until - from).get_days() as i64;
                out.push(Finding {
                    cve: c.id.clone(),
                    title: c.title.clone(),
                    disclosed: c.disclosed.to_string(),
                    patch_available: match c.patch {
                        Patch::Available => c.patch_date.map(|d| d.to_string()).unwrap_or_default(),
                        Patch::None => "none".into(),
                        Patch::EndOfLife => "end-of-life".into(),
                    },
                    status,
                    patched_on: on.map(|d| d.to_string()),
                    lag_days: days(c.disclosed).max(0),
                    lag_since_patch_days: c.patch_date.map(|p| days(p).max(0)),
                    vendor: e.vendor.clone(),
                    model: e.model.clone(),
                    firmware: e.firmware.clone(),
                });
            }
        }
        out
    }
}

fn is_cve_id(s: &str) -> bool {
    let mut parts = s.splitn(3, '-');
    parts.next() == Some("CVE")
        && parts.next().is_some_and(|y| y.len() == 4 && y.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_some_and(|n| n.len() >= 4 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Converts a CSV export (header `vendor,model,firmware,cve,disclosed,patch`,
/// optional `title`) into register YAML, one entry per vendor/model/firmware.
/// Errors name the CSV line and column.
pub fn import_csv(text: &str, source: &str) -> Result<String, String> {
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text.as_bytes());
    let headers = rdr.headers().map_err(|e| format!("{source}:1: {e}"))?.clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let need = ["vendor", "model", "firmware", "cve", "disclosed", "patch"];
    let mut idx = HashMap::new();
    for n in need {
        idx.insert(
            n,
            col(n).ok_or_else(|| format!("{source}:1: missing column `{n}` (need {})", need.join(",")))?,
        );
    }
    let title = col("title");
    let mut groups: Vec<((String, String, String), Vec<String>)> = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| format!("{source}: {e}"))?;
        let line = rec.position().map_or(0, |p| p.line());
        let get = |n: &str| rec.get(idx[n]).unwrap_or("").to_string();
        let (cve, disclosed, patch) = (get("cve"), get("disclosed"), get("patch"));
        if get("vendor").is_empty() {
            return Err(format!("{source}:{line}: column `vendor` is empty"));
        }
        if !is_cve_id(&cve) {
            return Err(format!(
                "{source}:{line}: column `cve`: `{cve}` is not a CVE id like CVE-2021-33885"
            ));
        }
        if parse_date(&disclosed).is_none() {
            return Err(format!(
                "{source}:{line}: column `disclosed`: `{disclosed}` is not a date (YYYY-MM-DD)"
            ));
        }
        if !matches!(patch.as_str(), "none" | "end-of-life") && parse_date(&patch).is_none() {
            return Err(format!(
                "{source}:{line}: column `patch`: `{patch}` is not a date (YYYY-MM-DD), `none` or `end-of-life`"
            ));
        }
        let mut item = format!("      - id: {cve}\n        disclosed: {disclosed}\n        patch: {patch}\n");
        if let Some(t) = title.and_then(|i| rec.get(i)).filter(|t| !t.is_empty()) {
            item += &format!("        title: {}\n", serde_json::to_string(t).unwrap());
        }
        let key = (get("vendor"), get("model"), get("firmware"));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, items)) => items.push(item),
            None => groups.push((key, vec![item])),
        }
    }
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let mut y = format!("# Imported from {source} by `mdsec-agent register import`.\nvulnerabilities:\n");
    for ((vendor, model, firmware), items) in groups {
        y += &format!("  - vendor: {}\n", q(&vendor));
        if !model.is_empty() {
            y += &format!("    model: {}\n", q(&model));
        }
        if !firmware.is_empty() {
            y += &format!("    firmware: {}\n", q(&firmware));
        }
        y += "    cves:\n";
        for i in items {
            y += &i;
        }
    }
    y += "devices: []\n";
    Ok(y)
}

/// JSON Schema of the register file, for editors.
pub fn schema() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(RegisterYaml)).unwrap() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: &str = "vulnerabilities:\n  - vendor: baxter\n    model: Sigma Spectrum\n    firmware: \"8.00\"\n    cves:\n      - id: CVE-2020-12040\n        disclosed: 2020-09-01\n        patch: none\n      - id: CVE-2020-12041\n        disclosed: 2020-09-01\n        patch: 2021-01-11\n  - macs: [\"44:4b:5d:00:00:04\"]\n    cves:\n      - id: CVE-2019-10960\n        disclosed: 2019-06-13\n        patch: end-of-life\ndevices:\n  - mac: 58-46-E1-00-00-01\n    patched:\n      CVE-2020-12041: 2021-03-01\n";

    fn dev(mac: &str, vendor: Option<&str>, model: Option<&str>) -> Device {
        let mut d = Device::new(String::new(), 0, mac.parse().unwrap());
        d.vendor = vendor.map(Into::into);
        d.model = model.map(Into::into);
        d
    }

    fn load(text: &str, name: &str) -> Result<Register, Vec<Diagnostic>> {
        let p = std::env::temp_dir().join(format!("mdsec-t-register-{name}-{}.yaml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        let r = Register::load(&p);
        std::fs::remove_file(&p).unwrap();
        r
    }

    #[test]
    fn devices_match_by_vendor_model_or_mac_and_lag_is_counted_in_days() {
        let r = load(REG, "ok").unwrap();
        let today: Date = "2026-11-25".parse().unwrap();
        let pump = dev("58:46:e1:00:00:01", Some("Baxter International Inc"), Some("sigma spectrum"));
        let f = r.assess(&pump, today);
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].status, f[0].lag_days, f[0].lag_since_patch_days), (Status::NoPatch, 2276, None));
        // Markdown and HTML print the JSON name.
        for s in [Status::Patched, Status::Open, Status::NoPatch, Status::EndOfLife] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        assert_eq!((f[1].status, f[1].lag_days, f[1].lag_since_patch_days), (Status::Patched, 181, Some(49)));
        // Another model of the same vendor, or no model known: no match.
        assert!(
            r.assess(&dev("58:46:e1:00:00:02", Some("Baxter International Inc"), Some("AS50")), today)
                .is_empty()
        );
        assert!(
            r.assess(&dev("58:46:e1:00:00:02", Some("Baxter International Inc"), None), today).is_empty()
        );
        let ge = r.assess(&dev("44:4b:5d:00:00:04", None, None), today);
        assert_eq!((ge[0].status, ge[0].patch_available.as_str()), (Status::EndOfLife, "end-of-life"));
    }

    #[test]
    fn errors_name_line_and_column() {
        let bad = REG
            .replace("disclosed: 2019-06-13", "disclosed: 13.06.2019")
            .replace("CVE-2020-12040", "CVE-20-1");
        let d = load(&bad, "bad").unwrap_err();
        let msgs: Vec<String> = d.iter().map(|d| format!("{}:{}: {}", d.line, d.col, d.message)).collect();
        assert_eq!(
            msgs,
            vec![
                "6:13: `CVE-20-1` is not a CVE id like CVE-2021-33885",
                "15:20: `13.06.2019` is not a date (YYYY-MM-DD)"
            ]
        );
        let d = load("vulnerabilities:\n  - vendr: x\n", "key").unwrap_err();
        assert_eq!((d[0].line, d[0].message.contains("vendr")), (2, true), "{d:?}");
    }

    #[test]
    fn csv_import_round_trips_through_the_loader() {
        let csv = "vendor,model,firmware,cve,disclosed,patch,title\nBaxter,Sigma Spectrum,8.00,CVE-2020-12040,2020-09-01,none,\"Hard-coded key, \"\"WEP\"\"\"\nBaxter,Sigma Spectrum,8.00,CVE-2020-12041,2020-09-01,2021-01-11,\nGE Healthcare,CARESCAPE,1.0,CVE-2019-10960,2019-06-13,end-of-life,\n";
        let y = import_csv(csv, "reg.csv").unwrap();
        let r = load(&y, "csv").unwrap_or_else(|d| panic!("{y}\n{d:?}"));
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.entries[0].cves.len(), 2);
        assert_eq!(r.entries[0].cves[0].title, "Hard-coded key, \"WEP\"");
        assert_eq!(r.entries[1].cves[0].patch, Patch::EndOfLife);
        let e = import_csv(&csv.replace("2019-06-13", "June 2019"), "reg.csv").unwrap_err();
        assert_eq!(e, "reg.csv:4: column `disclosed`: `June 2019` is not a date (YYYY-MM-DD)");
        let e = import_csv("vendor,cve\n", "r.csv").unwrap_err();
        assert!(e.starts_with("r.csv:1: missing column `model`"), "{e}");
    }
}

//! Clinical class of a device from transparent rules: vendor (IEEE OUI) and the
//! applications it speaks as client or server. Every rule that fired is listed as
//! evidence; an operator override (agent config `devices:`) always wins.

use mdsec_common::app::App;
use serde::{Deserialize, Serialize};

use super::AppSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    InfusionPump,
    PatientMonitor,
    ImagingModality,
    Pacs,
    ClinicalWorkstation,
    Server,
    NetworkInfra,
    Unknown,
}

impl Class {
    pub const ALL: [Class; 8] = [
        Class::InfusionPump,
        Class::PatientMonitor,
        Class::ImagingModality,
        Class::Pacs,
        Class::ClinicalWorkstation,
        Class::Server,
        Class::NetworkInfra,
        Class::Unknown,
    ];

    pub fn from_name(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::InfusionPump => "infusion-pump",
            Class::PatientMonitor => "patient-monitor",
            Class::ImagingModality => "imaging-modality",
            Class::Pacs => "pacs",
            Class::ClinicalWorkstation => "clinical-workstation",
            Class::Server => "server",
            Class::NetworkInfra => "network-infra",
            Class::Unknown => "unknown",
        }
    }
}

/// Vendor-name fragments (lower case) of infusion-pump makers.
const PUMP_VENDORS: &[&str] =
    &["baxter", "carefusion", "becton", "icu medical", "hospira", "fresenius", "b. braun", "smiths medical"];
/// Vendor-name fragments of patient-monitor makers.
const MONITOR_VENDORS: &[&str] =
    &["philips medical", "mindray", "draeger", "dräger", "spacelabs", "nihon kohden", "ge healthcare"];
/// Vendor-name fragments of imaging-modality makers.
const IMAGING_VENDORS: &[&str] =
    &["ge healthcare", "siemens healthcare", "siemens healthineers", "philips medical"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub class: Class,
    /// 0.0–1.0.
    pub confidence: f32,
    pub evidence: Vec<String>,
}

fn vendor_in(vendor: Option<&str>, list: &[&str]) -> Option<String> {
    let v = vendor?.to_lowercase();
    list.iter().any(|f| v.contains(f)).then(|| vendor.unwrap().to_string())
}

/// Scores every class from the evidence and returns the best one.
pub fn classify(vendor: Option<&str>, client: AppSet, server: AppSet) -> Verdict {
    let mut scores: Vec<(Class, f32, Vec<String>)> = Vec::new();
    let mut add = |class: Class, score: f32, why: String| match scores.iter_mut().find(|s| s.0 == class) {
        Some(s) => {
            s.1 += score;
            s.2.push(why);
        }
        None => scores.push((class, score, vec![why])),
    };
    if let Some(v) = vendor_in(vendor, PUMP_VENDORS) {
        add(Class::InfusionPump, 0.5, format!("vendor {v} makes infusion pumps"));
    }
    if let Some(v) = vendor_in(vendor, MONITOR_VENDORS) {
        add(Class::PatientMonitor, 0.4, format!("vendor {v} makes patient monitors"));
    }
    if let Some(v) = vendor_in(vendor, IMAGING_VENDORS) {
        add(Class::ImagingModality, 0.3, format!("vendor {v} makes imaging modalities"));
    }
    if client.contains(App::Hl7) {
        add(Class::InfusionPump, 0.3, "sends HL7 (pumps report to pharmacy systems)".into());
        add(Class::PatientMonitor, 0.3, "sends HL7 (monitors report vitals to the EMR)".into());
    }
    if client.contains(App::Dicom) {
        add(Class::ImagingModality, 0.6, "sends DICOM associations (stores studies)".into());
    }
    if server.contains(App::Dicom) {
        add(Class::Pacs, 0.7, "accepts DICOM associations".into());
    }
    for app in [App::Rdp, App::Smb] {
        if client.contains(app) {
            add(Class::ClinicalWorkstation, 0.3, format!("uses {} as a client", app.name()));
        }
    }
    for app in [App::Dns, App::Dhcp, App::Ntp, App::Syslog] {
        if server.contains(app) {
            add(Class::NetworkInfra, 0.5, format!("serves {}", app.name()));
        }
    }
    for app in [App::Http, App::Fhir, App::Tls, App::Hl7, App::Smb, App::Ssh] {
        if server.contains(app) {
            add(Class::Server, 0.3, format!("serves {}", app.name()));
        }
    }
    scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.name().cmp(b.0.name())));
    match scores.into_iter().next() {
        Some((class, score, evidence)) => Verdict { class, confidence: score.min(1.0), evidence },
        None => Verdict {
            class: Class::Unknown,
            confidence: 0.0,
            evidence: vec!["no vendor or protocol evidence yet".into()],
        },
    }
}

/// An operator's statement about one device (agent config `devices:`).
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub class: Option<Class>,
    pub name: Option<String>,
    pub model: Option<String>,
    /// Taken out of service: any traffic from it raises `decommissioned_device`.
    #[serde(default)]
    pub decommissioned: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> AppSet {
        v.iter().map(|x| App::from_name(x).unwrap()).collect()
    }

    #[test]
    fn vendor_and_protocols_decide_with_evidence() {
        let v = classify(Some("Baxter International Inc"), s(&["hl7"]), AppSet::EMPTY);
        assert_eq!(v.class, Class::InfusionPump);
        assert!((v.confidence - 0.8).abs() < 1e-6);
        assert_eq!(v.evidence.len(), 2);
        let v = classify(Some("SPACELABS MEDICAL"), s(&["hl7"]), AppSet::EMPTY);
        assert_eq!(v.class, Class::PatientMonitor);
        assert_eq!(classify(None, s(&["dicom"]), AppSet::EMPTY).class, Class::ImagingModality);
        assert_eq!(classify(None, AppSet::EMPTY, s(&["dicom"])).class, Class::Pacs);
        assert_eq!(classify(None, AppSet::EMPTY, s(&["dns"])).class, Class::NetworkInfra);
        assert_eq!(classify(None, s(&["rdp"]), AppSet::EMPTY).class, Class::ClinicalWorkstation);
    }

    #[test]
    fn no_evidence_is_unknown() {
        let v = classify(None, AppSet::EMPTY, AppSet::EMPTY);
        assert_eq!((v.class, v.confidence), (Class::Unknown, 0.0));
        // A vendor we do not associate with medical devices says nothing either.
        assert_eq!(classify(Some("Intel Corporate"), AppSet::EMPTY, AppSet::EMPTY).class, Class::Unknown);
    }
}

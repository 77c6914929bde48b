//! The clinical triage matrix: which patient-safety impact an event has and who
//! is called, by the clinical function of the segment (or device) involved.
//! Configured by the operator (`triage:` in the agent config); the defaults below
//! follow the usual hospital reading (a pump failing can harm a patient at once).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Patient-safety impact, most severe first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Impact {
    LifeCritical,
    High,
    Moderate,
    Low,
}

impl Impact {
    pub const ALL: [Impact; 4] = [Impact::LifeCritical, Impact::High, Impact::Moderate, Impact::Low];

    pub fn from_name(name: &str) -> Option<Impact> {
        Impact::ALL.into_iter().find(|i| i.name() == name)
    }

    /// The event severity this impact means (an incident's, from its worst target).
    pub fn severity(self) -> &'static str {
        match self {
            Impact::LifeCritical => "critical",
            Impact::High => "high",
            Impact::Moderate => "medium",
            Impact::Low => "low",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Impact::LifeCritical => "life-critical",
            Impact::High => "high",
            Impact::Moderate => "moderate",
            Impact::Low => "low",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub impact: Impact,
    /// Who is told, in the operator's words (on-call rota, ticket queue, phone).
    pub escalation: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TriageConfig {
    /// For functions the matrix does not list, and events outside any segment.
    #[serde(default = "default_entry")]
    pub default: Entry,
    /// Clinical function (a segment's `function:`, e.g. `infusion-pump`) → entry.
    #[serde(default = "default_functions")]
    pub functions: BTreeMap<String, Entry>,
}

impl Default for TriageConfig {
    fn default() -> Self {
        TriageConfig { default: default_entry(), functions: default_functions() }
    }
}

fn default_entry() -> Entry {
    Entry { impact: Impact::Moderate, escalation: "security operations queue".into() }
}

fn default_functions() -> BTreeMap<String, Entry> {
    let e = |impact, escalation: &str| Entry { impact, escalation: escalation.into() };
    BTreeMap::from([
        ("infusion-pump".into(), e(Impact::LifeCritical, "biomed on-call and charge nurse, immediately")),
        ("patient-monitor".into(), e(Impact::LifeCritical, "biomed on-call and charge nurse, immediately")),
        ("imaging-modality".into(), e(Impact::High, "biomed on-call and radiology lead, within 1 hour")),
        ("pacs".into(), e(Impact::High, "clinical IT on-call, within 1 hour")),
        ("pharmacy".into(), e(Impact::High, "clinical IT on-call, within 1 hour")),
        ("emr".into(), e(Impact::High, "clinical IT on-call, within 1 hour")),
        ("clinical-workstation".into(), e(Impact::Moderate, "security operations queue")),
    ])
}

impl TriageConfig {
    pub fn lookup(&self, function: &str) -> &Entry {
        self.functions.get(function).unwrap_or(&self.default)
    }

    /// Fills `clinical_impact` and `escalation` from the event's `function`.
    pub fn apply(&self, e: &mut crate::base::event::Event) {
        let entry = self.lookup(&e.function);
        e.clinical_impact = entry.impact.name().into();
        e.escalation = entry.escalation.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_map_to_impact_and_unknown_ones_to_the_default() {
        let t = TriageConfig::default();
        let mut e = crate::base::event::Event { function: "infusion-pump".into(), ..Default::default() };
        t.apply(&mut e);
        assert_eq!(e.clinical_impact, "life-critical");
        let mut e = crate::base::event::Event { function: "coffee-machine".into(), ..Default::default() };
        t.apply(&mut e);
        assert_eq!(
            (e.clinical_impact.as_str(), e.escalation.as_str()),
            ("moderate", "security operations queue")
        );
    }
}

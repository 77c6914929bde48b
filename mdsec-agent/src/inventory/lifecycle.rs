//! Device lifecycle: `onboarding` → `active` ⇄ `exception` → `decommissioned`.
//!
//! Biomed owns each device from onboarding to decommissioning. The state lives in
//! the state database (`lifecycle` table, one row per MAC); every change appends
//! one row to the `audit` table (when, from, to, why, who as given), which SQLite
//! triggers keep append-only. A device without a row is `onboarding`, or
//! `decommissioned` if the agent config marks it `decommissioned: true` (a row,
//! once written, wins over the config; see [`effective`]). A
//! decommissioned device that sends traffic after the change raises
//! `decommissioned_device` (detect.rs).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// New: seen, not yet confirmed by biomed.
    #[default]
    Onboarding,
    /// In clinical service under its segment's policy.
    Active,
    /// In service with a documented deviation (e.g. waiting for a patch).
    Exception,
    /// Out of service: any traffic from it is an incident.
    Decommissioned,
}

impl State {
    pub const ALL: [State; 4] = [State::Onboarding, State::Active, State::Exception, State::Decommissioned];

    pub fn name(self) -> &'static str {
        match self {
            State::Onboarding => "onboarding",
            State::Active => "active",
            State::Exception => "exception",
            State::Decommissioned => "decommissioned",
        }
    }

    pub fn from_name(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|x| x.name() == s)
    }

    /// States reachable from this one.
    pub fn next(self) -> &'static [State] {
        match self {
            State::Onboarding => &[State::Active, State::Exception, State::Decommissioned],
            State::Active => &[State::Exception, State::Decommissioned],
            State::Exception => &[State::Active, State::Decommissioned],
            // Back into service only through onboarding again.
            State::Decommissioned => &[State::Onboarding],
        }
    }
}

/// A device's current lifecycle row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub state: State,
    pub since: String,
    pub reason: String,
    pub actor: String,
}

/// A device's effective state: its lifecycle row, else `decommissioned` when the
/// agent config marks it so, else `onboarding`. The one precedence rule the API,
/// the detector, the metrics and the report share.
pub fn effective(
    records: &std::collections::HashMap<String, Record>,
    config_decommissioned: bool,
    mac: &str,
) -> State {
    match records.get(mac) {
        Some(r) => r.state,
        None if config_decommissioned => State::Decommissioned,
        None => State::Onboarding,
    }
}

/// Decommissioned MACs and since when (by [`effective`]'s precedence); a
/// config-only decommissioning counts from the epoch.
pub fn decommissioned_since(
    records: &std::collections::HashMap<String, Record>,
    config: &std::collections::BTreeSet<String>,
) -> std::collections::HashMap<String, std::time::SystemTime> {
    let from_records = records.iter().filter(|(_, r)| r.state == State::Decommissioned).map(|(mac, r)| {
        (
            mac.clone(),
            crate::base::clock::parse_rfc3339(&r.since).unwrap_or(std::time::SystemTime::UNIX_EPOCH),
        )
    });
    let from_config = config
        .iter()
        .filter(|mac| !records.contains_key(*mac))
        .map(|mac| (mac.clone(), std::time::SystemTime::UNIX_EPOCH));
    from_records.chain(from_config).collect()
}

/// One audit row: `GET /api/v1/audit`, the CLI and the report show these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditRow {
    pub id: i64,
    pub time: String,
    pub mac: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub actor: String,
}

/// The body of `POST /api/v1/devices/{mac}/state`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub state: String,
    pub reason: String,
    /// Who asks (as given; the agent cannot verify it).
    #[serde(default)]
    pub actor: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// Not a transition the lifecycle allows (HTTP 409).
    Invalid(String),
    /// Bad request: reason missing (HTTP 400).
    Bad(String),
    Database(String),
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Invalid(m) | ChangeError::Bad(m) => f.write_str(m),
            ChangeError::Database(m) => write!(f, "state database: {m}"),
        }
    }
}

/// Checks a change before anything is written.
pub fn check_transition(from: State, to: State, reason: &str) -> Result<(), ChangeError> {
    if reason.trim().is_empty() {
        return Err(ChangeError::Bad("a lifecycle change needs a reason".into()));
    }
    if reason.len() > 1000 {
        return Err(ChangeError::Bad("the reason is longer than 1000 bytes".into()));
    }
    if from == to {
        return Err(ChangeError::Invalid(format!("the device is already {}", to.name())));
    }
    if !from.next().contains(&to) {
        let allowed: Vec<&str> = from.next().iter().map(|s| s.name()).collect();
        return Err(ChangeError::Invalid(format!(
            "{} → {} is not a lifecycle transition; from {} a device can go to: {}",
            from.name(),
            to.name(),
            from.name(),
            allowed.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_lifecycle() {
        use State::*;
        for (from, to, ok) in [
            (Onboarding, Active, true),
            (Active, Exception, true),
            (Exception, Active, true),
            (Active, Decommissioned, true),
            (Decommissioned, Onboarding, true),
            (Decommissioned, Active, false),
            (Active, Onboarding, false),
            (Active, Active, false),
        ] {
            assert_eq!(check_transition(from, to, "r").is_ok(), ok, "{from:?} → {to:?}");
        }
        let e = check_transition(Decommissioned, Active, "r").unwrap_err().to_string();
        assert_eq!(
            e,
            "decommissioned → active is not a lifecycle transition; from decommissioned a device can go to: onboarding"
        );
        assert!(matches!(check_transition(Onboarding, Active, " "), Err(ChangeError::Bad(_))));
    }
}

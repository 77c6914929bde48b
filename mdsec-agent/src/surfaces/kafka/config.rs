//! `kafka:` in the agent configuration, and its checks.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::surfaces::eve::Format;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `HOST:PORT`, one or more.
    pub brokers: Vec<String>,
    /// This site's id in every message (letters, digits, `.`, `_`, `-`).
    pub site: String,
    /// This gateway's id in every message; the host name when unset.
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub topics: Topics,
    /// Events as Suricata EVE alerts (`eve`, the default) or the native JSON.
    #[serde(default = "eve")]
    pub event_format: Format,
    #[serde(default)]
    pub spool: SpoolConfig,
    /// An unchanged device is published again this often (its counters and
    /// last-seen time); a change is published at the next store pass.
    #[serde(default = "default_refresh")]
    pub inventory_refresh_secs: u64,
    /// librdkafka properties passed to the client as they are: TLS
    /// (`security.protocol`, `ssl.ca.location`, …) and SASL (`sasl.mechanism`,
    /// `sasl.username`, …). mdsec sets `bootstrap.servers`,
    /// `enable.idempotence` and `acks` itself.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
}

fn eve() -> Format {
    Format::Eve
}

fn default_refresh() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Events (`null`: none).
    #[serde(default = "events_topic")]
    pub events: Option<String>,
    /// Flow records of conversations that end (`null`: none).
    #[serde(default = "flows_topic")]
    pub flows: Option<String>,
    /// The inventory: a compacted topic, keyed `site/MAC` (`null`: none).
    #[serde(default = "inventory_topic")]
    pub inventory: Option<String>,
}

fn events_topic() -> Option<String> {
    Some("mdsec.events".into())
}
fn flows_topic() -> Option<String> {
    Some("mdsec.flows".into())
}
fn inventory_topic() -> Option<String> {
    Some("mdsec.inventory".into())
}

impl Default for Topics {
    fn default() -> Self {
        Topics { events: events_topic(), flows: flows_topic(), inventory: inventory_topic() }
    }
}

impl Topics {
    /// By spool topic index.
    pub fn by_kind(&self) -> [Option<String>; 3] {
        [self.events.clone(), self.flows.clone(), self.inventory.clone()]
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool; `state_dir/kafka-spool` when unset.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The spool's size limit in MiB: when full, the oldest messages go
    /// (counted in `mdsec_kafka_dropped_total`).
    #[serde(default = "default_max_mb")]
    pub max_mb: u64,
}

fn default_max_mb() -> u64 {
    256
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { dir: None, max_mb: default_max_mb() }
    }
}

/// Properties mdsec owns: delivery guarantees are not a setting.
pub const OWNED: &[&str] =
    &["bootstrap.servers", "metadata.broker.list", "enable.idempotence", "acks", "request.required.acks"];

/// A problem at a field under `kafka:` (the config locates it).
pub struct Problem {
    pub steps: Vec<String>,
    pub index: Option<usize>,
    pub message: String,
}

impl KafkaConfig {
    pub fn gateway(&self) -> String {
        // The host name as an id: only what a key may hold, at most 64 characters.
        self.gateway.clone().unwrap_or_else(|| {
            let h: String = crate::base::net::hostname()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
                .take(64)
                .collect();
            if h.is_empty() { "gateway".into() } else { h }
        })
    }

    pub fn spool_dir(&self, state_dir: &std::path::Path) -> PathBuf {
        self.spool.dir.clone().unwrap_or_else(|| state_dir.join("kafka-spool"))
    }

    /// What is wrong with the settings themselves (every command that reads
    /// the config refuses it).
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut at = |steps: &[&str], index: Option<usize>, message: String| {
            out.push(Problem { steps: steps.iter().map(|s| s.to_string()).collect(), index, message })
        };
        if self.brokers.is_empty() {
            at(&["brokers"], None, "kafka.brokers needs at least one HOST:PORT".into());
        }
        for (i, b) in self.brokers.iter().enumerate() {
            if let Err(e) = crate::base::net::host_port(b, b) {
                at(&["brokers"], Some(i), format!("kafka.brokers {e}"));
            }
        }
        if let Err(e) = id_text(&self.site) {
            at(&["site"], None, format!("kafka.site {e}"));
        }
        if let Some(g) = &self.gateway
            && let Err(e) = id_text(g)
        {
            at(&["gateway"], None, format!("kafka.gateway {e}"));
        }
        let topics = [
            ("events", &self.topics.events),
            ("flows", &self.topics.flows),
            ("inventory", &self.topics.inventory),
        ];
        for (name, t) in topics {
            if let Some(t) = t
                && let Err(e) = topic_name(t)
            {
                at(&["topics", name], None, format!("kafka.topics.{name} {e}"));
            }
        }
        if self.spool.max_mb == 0 {
            at(&["spool", "max_mb"], None, "kafka.spool.max_mb must be at least 1".into());
        }
        if self.inventory_refresh_secs == 0 {
            at(&["inventory_refresh_secs"], None, "kafka.inventory_refresh_secs must be positive".into());
        }
        for k in self.client.keys() {
            if OWNED.contains(&k.as_str()) {
                let m = format!(
                    "kafka.client.{k}: set by mdsec (idempotent, acks=all, brokers from kafka.brokers)"
                );
                at(&["client", k], None, m);
            }
        }
        out
    }

    /// What this host says (`check` and `run`): the spool directory is
    /// writable, the brokers resolve, and librdkafka accepts every client
    /// property and value (it knows them all; mdsec keeps no list).
    pub fn host_problems(&self, state_dir: &std::path::Path) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut at = |steps: &[&str], index: Option<usize>, message: String| {
            out.push(Problem { steps: steps.iter().map(|s| s.to_string()).collect(), index, message })
        };
        if let Err(e) = writable(&self.spool_dir(state_dir)) {
            at(&["spool", "dir"], None, format!("kafka.spool.dir {e}"));
        }
        for (i, b) in self.brokers.iter().enumerate() {
            if !std::net::ToSocketAddrs::to_socket_addrs(b.as_str()).is_ok_and(|mut a| a.next().is_some()) {
                at(&["brokers"], Some(i), format!("kafka.brokers `{b}`: the address does not resolve"));
            }
        }
        if let Err(e) = super::producer::client_check(self) {
            let key = self.client.keys().find(|k| e.contains(&format!("\"{k}\"")) || e.contains(k.as_str()));
            match key {
                Some(k) => at(&["client", k], None, format!("kafka.client.{k}: {e}")),
                None => at(&["client"], None, format!("kafka.client: {e}")),
            }
        }
        out
    }
}

/// Site and gateway ids: part of every key (`site/MAC`), so no `/`.
fn id_text(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err(format!("`{s}`: 1 to 64 characters"));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(format!("`{s}`: only letters, digits, `.`, `_` and `-`"));
    }
    Ok(())
}

/// Kafka's rule for topic names.
fn topic_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 249 || s == "." || s == ".." {
        return Err(format!("`{s}`: not a Kafka topic name (1 to 249 characters, not `.` or `..`)"));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(format!("`{s}`: a Kafka topic name has only letters, digits, `.`, `_` and `-`"));
    }
    Ok(())
}

/// The directory, or the nearest existing one above it, is writable.
fn writable(dir: &std::path::Path) -> Result<(), String> {
    let mut p = dir;
    loop {
        if p.exists() {
            if !p.is_dir() {
                return Err(format!("{}: not a directory", p.display()));
            }
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: a NUL-terminated path; access only reads it.
            return if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
                Ok(())
            } else {
                Err(format!("{}: not writable ({})", p.display(), std::io::Error::last_os_error()))
            };
        }
        match p.parent() {
            Some(up) if !up.as_os_str().is_empty() => p = up,
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_topics_follow_their_rules() {
        assert!(id_text("site-1.north_a").is_ok());
        assert!(id_text("a/b").is_err());
        assert!(id_text("").is_err());
        assert!(topic_name("mdsec.events").is_ok());
        assert!(topic_name("bad topic").is_err());
        assert!(topic_name("..").is_err());
    }

    fn cfg(yaml: &str) -> KafkaConfig {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn bad_settings_name_their_field() {
        let c = cfg("brokers: [\"kafka1\", \"k2:9092\"]\nsite: \"a/b\"\nclient: {acks: \"1\"}\n");
        let p = c.problems();
        let fields: Vec<(Vec<String>, Option<usize>)> =
            p.iter().map(|p| (p.steps.clone(), p.index)).collect();
        assert_eq!(
            fields,
            vec![
                (vec!["brokers".to_string()], Some(0)),
                (vec!["site".to_string()], None),
                (vec!["client".to_string(), "acks".to_string()], None),
            ]
        );
    }

    #[test]
    fn librdkafka_judges_the_client_properties() {
        let state = std::env::temp_dir();
        let good =
            cfg("brokers: [\"127.0.0.1:9\"]\nsite: s\nclient: {security.protocol: ssl, linger.ms: \"5\"}\n");
        assert!(good.host_problems(&state).is_empty());
        let bad = cfg("brokers: [\"127.0.0.1:9\"]\nsite: s\nclient: {no.such.property: \"1\"}\n");
        let p = bad.host_problems(&state);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].steps, ["client", "no.such.property"]);
        assert!(p[0].message.contains("No such configuration property"), "{}", p[0].message);
        let bad_value =
            cfg("brokers: [\"127.0.0.1:9\"]\nsite: s\nclient: {security.protocol: carrier-pigeon}\n");
        let p = bad_value.host_problems(&state);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].steps, ["client", "security.protocol"], "{}", p[0].message);
    }
}

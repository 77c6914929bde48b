//! What the surfaces serve: the shared state the agent's threads fill (tables,
//! policy, events, the inventory snapshot, evidence status) and the API, the
//! metrics and the store thread read.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use crate::{
    base::net::Mac,
    datapath::{loader::Attached, state::Tables},
    inventory::{self, History, Snapshot, clinical::Override, oui::Oui},
    policy::runtime::PolicyState,
    surfaces::{events::EventStore, limiter::Limiter},
};

pub struct AppState {
    pub tables: Arc<RwLock<Tables>>,
    pub attached: Vec<Attached>,
    pub policy: Arc<RwLock<PolicyState>>,
    pub events: Arc<RwLock<EventStore>>,
    /// A policy directory is configured (then readiness needs a loaded policy).
    pub policy_configured: bool,
    pub oui: Arc<Oui>,
    pub fingerprints: crate::inventory::samples::Fingerprints,
    /// Operator overrides by MAC.
    pub overrides: HashMap<Mac, Override>,
    /// Devices the state database holds (earlier runs, and this one's saved passes).
    pub history: RwLock<History>,
    /// The inventory as of the last store pass (or lifecycle change).
    pub inventory: RwLock<Arc<Snapshot>>,
    /// Held while a snapshot is built: concurrent readers wait for one build.
    pub inventory_build: Mutex<()>,
    pub segstats: Arc<Mutex<crate::datapath::segstats::SegStats>>,
    pub map_sizes: crate::datapath::settings::MapSizes,
    pub started: SystemTime,
    pub export_stats: Arc<crate::surfaces::export::ExportStats>,
    pub ipfix_stats: Arc<crate::surfaces::ipfix::IpfixStats>,
    pub kafka_stats: Arc<crate::surfaces::kafka::KafkaStats>,
    /// `kafka:` is configured (its metrics appear from the start).
    pub kafka_configured: bool,
    /// Bearer token `/api/*` requires, if configured.
    pub token: Option<String>,
    /// `api.basic_auth_users` (for `/metrics`).
    pub basic_auth: crate::surfaces::tls::BasicAuth,
    /// `/metrics` accepts (and then needs) the bearer token.
    pub metrics_token: bool,
    pub limiter: Mutex<Limiter>,
    /// Learning state and baseline size per segment, as of the last store pass.
    pub baseline: RwLock<crate::detection::learn::Status>,
    /// Lifecycle rows by MAC (state database; refreshed each store pass and on change).
    pub lifecycle: RwLock<HashMap<String, crate::inventory::lifecycle::Record>>,
    /// Register findings and lifecycle states, for metrics.
    pub evidence: RwLock<crate::evidence::EvidenceStatus>,
    /// Where the state database lives (lifecycle changes open their own connection).
    pub state_dir: std::path::PathBuf,
    /// The policy thread's triggers (none without a policy_dir): on-demand
    /// exceptions are installed through it.
    pub policy_trigger: Option<std::sync::mpsc::Sender<crate::policy::runtime::Trigger>>,
    /// `change_control.max_exception_minutes`.
    pub max_exception: std::time::Duration,
}

impl AppState {
    /// A state serving `tables` with nothing else configured: no interfaces,
    /// policy or database (the scale benchmark serves its tables with it).
    pub fn bare(
        tables: Arc<RwLock<Tables>>,
        segstats: Arc<Mutex<crate::datapath::segstats::SegStats>>,
        state_dir: std::path::PathBuf,
    ) -> AppState {
        AppState {
            tables,
            attached: Vec::new(),
            policy: Default::default(),
            events: Default::default(),
            policy_configured: false,
            oui: Arc::new(Oui::embedded()),
            fingerprints: Default::default(),
            overrides: HashMap::new(),
            history: Default::default(),
            inventory: Default::default(),
            inventory_build: Mutex::new(()),
            segstats,
            map_sizes: crate::datapath::settings::MapSizes::default(),
            started: SystemTime::now(),
            export_stats: Default::default(),
            ipfix_stats: Default::default(),
            kafka_stats: Default::default(),
            kafka_configured: false,
            token: None,
            basic_auth: crate::surfaces::tls::BasicAuth::new(Default::default()),
            metrics_token: false,
            limiter: Mutex::new(Limiter::new(1_000_000, 1_000_000)),
            baseline: Default::default(),
            lifecycle: Default::default(),
            evidence: Default::default(),
            state_dir,
            policy_trigger: None,
            max_exception: crate::policy::ondemand::DEFAULT_MAX,
        }
    }
}

impl AppState {
    pub fn ifname(&self, ifindex: u32) -> String {
        ifname(&self.attached, ifindex)
    }

    /// Builds the inventory from the current tables and records, publishes it
    /// and returns it.
    pub fn rebuild_inventory(&self) -> Arc<Snapshot> {
        let _one = self.inventory_build.lock().unwrap();
        self.build_inventory()
    }

    fn build_inventory(&self) -> Arc<Snapshot> {
        let snap = {
            let tables = self.tables.read().unwrap();
            let fingerprints = self.fingerprints.read().unwrap();
            let history = self.history.read().unwrap();
            let policy = self.policy.read().unwrap().current.clone();
            let lifecycle = self.lifecycle.read().unwrap();
            let ifname = |i| self.ifname(i);
            Arc::new(inventory::build(&inventory::Sources {
                tables: &tables,
                ifname: &ifname,
                oui: &self.oui,
                fingerprints: &fingerprints,
                overrides: &self.overrides,
                history: &history,
                policy: policy.as_ref().map(|p| &p.policy),
                lifecycle: &lifecycle,
            }))
        };
        *self.inventory.write().unwrap() = snap.clone();
        snap
    }

    /// The inventory as of the latest poll: the store pass's snapshot, or a
    /// new one when a poll has landed since (at most one build per poll).
    pub fn inventory(&self) -> Arc<Snapshot> {
        let fresh = || {
            let snap = self.inventory.read().unwrap().clone();
            (snap.merges >= self.tables.read().unwrap().merges()).then_some(snap)
        };
        if let Some(s) = fresh() {
            return s;
        }
        let _one = self.inventory_build.lock().unwrap();
        fresh().unwrap_or_else(|| self.build_inventory())
    }
}

/// An interface's name, or `if<index>` for one not attached (any more).
pub fn ifname(attached: &[Attached], ifindex: u32) -> String {
    attached
        .iter()
        .find(|a| a.ifindex == ifindex)
        .map(|a| a.name.clone())
        .unwrap_or_else(|| format!("if{ifindex}"))
}

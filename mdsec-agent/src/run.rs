//! `mdsec-agent run`: attach, poll, serve, and stop cleanly.
//!
//! Stop semantics: on SIGINT/SIGTERM with `on_exit: detach` (default) the XDP
//! program is detached and every pin removed. With `on_exit: keep` the datapath
//! stays attached and counting (pinned links and maps), and the next `run` takes it
//! over without a gap. A crash leaves the pins in place either way, so a restarted
//! agent continues the same counts; `mdsec-agent detach` removes them by hand.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock, mpsc::RecvTimeoutError},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use log::{error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use aya::maps::RingBuf;
use mdsec_common::maps as names;

use crate::{
    base::clock::rfc3339,
    config::{Config, OnExit},
    datapath::loader::Datapath,
    datapath::poller::Poller,
    datapath::segstats::SegStats,
    datapath::state::Tables,
    detection::devwatch,
    detection::learn::{self, Learner},
    evidence::store::Store,
    inventory::oui::Oui,
    policy::{
        maps::PolicyMaps,
        model::Policy,
        runtime::{Installed, PolicyState, Reloader, Trigger},
    },
    surfaces::events::{self, EventStore},
    surfaces::{api, limiter::Limiter, state::AppState},
};

pub async fn run(cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("create state dir {}", cfg.state_dir.display()))?;
    // Bind before touching the datapath: a busy port should fail without side effects.
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;

    let token = match &cfg.api.token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    // Loaded again (Config::load checked the files): what is served is what
    // is on disk now.
    let tls = match &cfg.api.tls_server_config {
        Some(t) => {
            let l = crate::surfaces::tls::load(t, SystemTime::now())
                .map_err(|e| anyhow::anyhow!("api.tls_server_config.{}: {}", e.field, e.message))?;
            Some(l.server)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let export_stats = Arc::new(crate::surfaces::export::ExportStats::default());
    let exporter = crate::surfaces::export::spawn(&cfg.events, export_stats.clone())?;

    let oui = Oui::load();
    info!("vendor names: {} OUIs from {}", oui.len(), oui.source);
    preflight(&cfg)?;
    let mut dp = Datapath::load(&cfg.pin_dir, &cfg.maps, &cfg.ports())?;
    let segstats = Arc::new(Mutex::new(SegStats::new(dp.take_map(names::SEG_STATS)?)?));
    let mut poller = Poller::new(&mut dp, segstats.clone(), cfg.ageing())?;
    let ipfix_stats = Arc::new(crate::surfaces::ipfix::IpfixStats::default());
    let ipfix =
        cfg.ipfix.as_ref().map(|c| crate::surfaces::ipfix::spawn(c, ipfix_stats.clone())).transpose()?;
    let kafka_stats = Arc::new(crate::surfaces::kafka::KafkaStats::default());
    let kafka = match &cfg.kafka {
        Some(k) => {
            let eve = crate::surfaces::eve::Eve::new(&cfg.events.eve, &crate::base::net::hostname());
            let sink = crate::surfaces::kafka::spawn(k, &cfg.state_dir, eve, kafka_stats.clone())?;
            sink.interfaces(dp.ifnames());
            info!("kafka: producing to {} as site {} gateway {}", k.brokers.join(","), k.site, k.gateway());
            Some(sink)
        }
        None => None,
    };
    if let Some(x) = &exporter {
        x.interfaces(dp.ifnames());
    }
    let ended = EndedSinks { events: exporter.clone(), ipfix, kafka: kafka.clone() };
    if ended.any() {
        let sinks = ended.clone();
        poller.on_ended(move |e| sinks.send(e));
    }
    let tables = Arc::new(RwLock::new(Tables::default()));
    let db = Store::open(&cfg.state_dir)?;
    let history: crate::inventory::History = db.load_devices()?.into_iter().map(|d| (d.id(), d)).collect();
    // Devices' totals carry on from what this database stored (see Tables::expect_stored).
    let ifindex: HashMap<String, u32> = dp.ifnames().into_iter().map(|(i, n)| (n, i)).collect();
    tables.write().unwrap().expect_stored(
        history.values().filter_map(|d| {
            let key = mdsec_common::device::DeviceKey {
                ifindex: *ifindex.get(&d.iface)?,
                vlan: d.vlan,
                mac: d.mac.0,
            };
            Some((key, crate::datapath::state::Totals { packets: d.packets, bytes: d.bytes }))
        }),
        crate::base::clock::mono_ns(),
    );
    let ledger = crate::datapath::state::ledger_path(&cfg.state_dir);
    if ended.any() {
        // What the previous run already reported of flows the kernel still
        // holds (on_exit: keep): reported again, it would count twice.
        match crate::datapath::state::read_ledger(&ledger) {
            Ok(l) => {
                if !l.is_empty() {
                    info!("flow exports: {} flows reported by the previous run carry on from there", l.len());
                }
                tables.write().unwrap().carry(l);
            }
            Err(e) => warn!("{e:#}: ignored, so flows still open since the previous run are reported whole"),
        }
    }
    poller.poll(&tables)?;
    let polling = poller.spawn(tables.clone(), cfg.poll_interval());

    let policy = Arc::new(RwLock::new(PolicyState::default()));
    let store = Arc::new(RwLock::new(EventStore {
        exporter: exporter.clone(),
        kafka: kafka.clone(),
        triage: cfg.triage.clone(),
        incidents: crate::detection::incident::Incidents::new(
            cfg.incidents.clone(),
            db.load_incidents(crate::detection::incident::KEEP)?,
        ),
        ..Default::default()
    }));
    let ring = RingBuf::try_from(dp.take_map(names::EVENTS)?)?;
    events::spawn(ring, store.clone(), policy.clone(), dp.ifnames());
    let fingerprints = crate::inventory::samples::Fingerprints::default();
    crate::inventory::samples::spawn(RingBuf::try_from(dp.take_map(names::SAMPLES)?)?, fingerprints.clone());
    let (reload_tx, reload_rx) = std::sync::mpsc::channel();
    let mut policy_maps = PolicyMaps::new(|n| dp.take_map(n))?;
    let pinned_generation = policy_maps.config()?.generation;
    match &cfg.policy_dir {
        Some(dir) => {
            // The policy history has its own connection: the policy thread
            // appends to it while the store thread writes the rest.
            let mut history_db = Store::open(&cfg.state_dir)?;
            let last = history_db.last_policy_change()?;
            let record: crate::policy::runtime::Recorder =
                Box::new(move |c| history_db.append_policy_change(c));
            let mut reloader = Reloader::new(
                policy_maps,
                dir.clone(),
                cfg.event_rate,
                policy.clone(),
                segstats.clone(),
                (record, last),
                {
                    let store = store.clone();
                    let state_dir = cfg.state_dir.clone();
                    Box::new(move |e| {
                        // Quarantine steps belong to the device's audit trail too.
                        if let (Some(mac), "quarantine" | "quarantine_lifted") = (&e.mac, e.kind.as_str()) {
                            let on = e.kind == "quarantine";
                            let saved = Store::open(&state_dir)
                                .and_then(|mut db| db.audit_quarantine(mac, on, &e.reason, &e.time));
                            if let Err(err) = saved {
                                warn!("recording the quarantine of {mac} in the audit trail failed: {err:#}");
                            }
                        }
                        store.write().unwrap().push(e)
                    })
                },
            )
            .with_load_options(cfg.change_control.load_options())
            .with_grants(Box::new(StoredGrants(Store::open(&cfg.state_dir)?)))
            // The devices quarantined when the agent stopped stay so from
            // the first install, not only from the first store pass.
            .with_quarantine(read_quarantine(&cfg.state_dir));
            if !reloader.reload() && !reloader.restore(&cfg.state_dir.join(RESTORED_POLICY_DIR)) {
                if pinned_generation != 0 {
                    error!(
                        "no valid policy at start: generation {pinned_generation} of the previous run stays active"
                    );
                } else {
                    error!(
                        "no valid policy at start: the datapath observes only until the policy directory is fixed"
                    );
                }
            }
            reloader.spawn(reload_rx);
        }
        None => {
            if pinned_generation != 0 {
                info!(
                    "no policy_dir: turning off policy generation {pinned_generation} left by the previous run"
                );
            }
            policy_maps.disable(cfg.event_rate)?;
            info!("no policy_dir: observing only");
        }
    }

    let observations = db.load_observations(None)?;
    info!(
        "state database: {} devices and {} baseline observations from earlier runs",
        history.len(),
        observations.len()
    );
    let mut pass = StorePass {
        detector: crate::detection::detect::Detector::new(
            cfg.detection.clone(),
            dp.ifnames(),
            Learner::new(observations),
        ),
        evidence: EvidencePass {
            register: RegisterFile::new(cfg.register.clone()),
            snapshotter: crate::evidence::Snapshotter::new(SystemTime::now()),
            every: cfg.evidence.snapshot_secs,
            retention: Duration::from_secs(cfg.evidence.retention_days * 86_400),
            pruned: None,
        },
        config_decommissioned: cfg.decommissioned_macs(),
        quarantine: None,
        inventory_feed: kafka.clone().map(|k| InventoryFeed {
            sink: k,
            publisher: Default::default(),
            refresh: Duration::from_secs(cfg.kafka.as_ref().map_or(300, |c| c.inventory_refresh_secs)),
        }),
        db,
    };
    pass.detector.seed(history.values());

    let state = Arc::new(AppState {
        tables,
        attached: dp.attached.clone(),
        policy,
        events: store,
        policy_configured: cfg.policy_dir.is_some(),
        oui: Arc::new(oui),
        history: RwLock::new(history),
        fingerprints,
        // Validation guarantees the MACs parse.
        overrides: cfg.devices.iter().filter_map(|o| Some((o.mac.parse().ok()?, o.clone()))).collect(),
        inventory: RwLock::new(Default::default()),
        inventory_build: Mutex::new(()),
        segstats,
        // The flow tables hold whole sets: report the slots they really have.
        map_sizes: crate::datapath::settings::MapSizes {
            flows: crate::datapath::flowtable::capacity(cfg.maps.flows),
            flows_ipv6: crate::datapath::flowtable::capacity(cfg.maps.flows_ipv6),
            ..cfg.maps.clone()
        },
        started: SystemTime::now(),
        export_stats,
        ipfix_stats,
        kafka_stats,
        kafka_configured: cfg.kafka.is_some(),
        token,
        basic_auth: crate::surfaces::tls::BasicAuth::new(cfg.api.basic_auth_users.clone()),
        metrics_token: cfg.api.metrics_token,
        limiter: Mutex::new(Limiter::new(cfg.api.rate_limit_per_sec, cfg.api.rate_limit_burst)),
        baseline: RwLock::new(Default::default()),
        lifecycle: RwLock::new(pass.db.lifecycle().unwrap_or_default()),
        evidence: RwLock::new(Default::default()),
        state_dir: cfg.state_dir.clone(),
        policy_trigger: cfg.policy_dir.is_some().then(|| reload_tx.clone()),
        max_exception: cfg.change_control.max_exception(),
    });
    // The first poll has landed: the API starts with an inventory.
    state.rebuild_inventory();
    let (flush_tx, flush_rx) = std::sync::mpsc::channel::<()>();
    let flusher = {
        let state = state.clone();
        std::thread::Builder::new().name("mdsec-store".into()).spawn(move || {
            // Every 2 s, and once more when told to stop.
            loop {
                let stop =
                    !matches!(flush_rx.recv_timeout(Duration::from_secs(2)), Err(RecvTimeoutError::Timeout));
                pass.run(&state, stop);
                if stop {
                    return;
                }
            }
        })?
    };
    // Before the API answers /readyz: a stop asked for the moment the agent
    // is ready must be a clean stop, not the signal's default action.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    info!("API on {scheme}://{}", cfg.listen);
    let tables = state.tables.clone();
    let server = tokio::spawn(api::serve(listener, tls, state));
    tokio::pin!(server);
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                info!("SIGHUP: reloading the policy and reopening the event log");
                let _ = reload_tx.send(Trigger::Reload);
                if let Some(x) = &exporter {
                    x.reopen();
                }
            }
            r = &mut server => {
                error!("HTTP server stopped: {r:?}");
                break "HTTP server failure";
            }
        }
    };
    // One last poll, and no flow ends behind the shutdown records' back.
    polling.stop();
    let _ = flush_tx.send(());
    let _ = flusher.join();
    if ended.any() {
        // Conversations still open end with the agent (EVE `reason: shutdown`,
        // IPFIX flowEndReason 4).
        let open = tables.read().unwrap().end_all();
        let n = open.len();
        ended.send(open);
        ended.flush(n);
        match cfg.on_exit {
            OnExit::Keep => {
                let l = tables.read().unwrap().ledger();
                match crate::datapath::state::write_ledger(&ledger, &l) {
                    Ok(()) => info!("flow exports: ledger of {} open flows left for the next run", l.len()),
                    Err(e) => warn!("{e:#}: the next run reports flows still open whole"),
                }
            }
            OnExit::Detach => {
                // The kernel entries go with the maps: nothing to carry over.
                let _ = std::fs::remove_file(&ledger);
            }
        }
    }
    if let Some(k) = &kafka {
        k.stop(Duration::from_secs(5));
    }
    match cfg.on_exit {
        OnExit::Detach => {
            info!("{why}: detaching XDP and removing pins");
            let still = dp.detach_and_unpin()?;
            if !still.is_empty() {
                warn!("XDP still attached after 5 s on {} (another program or pin)", still.join(", "));
            }
        }
        OnExit::Keep => info!("{why}: leaving the datapath attached (on_exit: keep)"),
    }
    Ok(())
}

/// Where conversations that end go: the EVE sinks' flow records and IPFIX.
#[derive(Clone)]
struct EndedSinks {
    events: Option<crate::surfaces::export::Exporter>,
    ipfix: Option<crate::surfaces::ipfix::Ipfix>,
    kafka: Option<crate::surfaces::kafka::KafkaSink>,
}

impl EndedSinks {
    fn any(&self) -> bool {
        self.events.is_some() || self.ipfix.is_some() || self.kafka.is_some()
    }

    /// One batch to both (shared: the exporters' threads encode it).
    fn send(&self, batch: Vec<crate::datapath::state::Ended>) {
        if batch.is_empty() {
            return;
        }
        let batch = Arc::new(batch);
        if let Some(ix) = &self.ipfix {
            ix.send(batch.clone());
        }
        if let Some(k) = &self.kafka {
            k.ended(batch.clone());
        }
        if let Some(x) = &self.events {
            x.ended(batch);
        }
    }

    /// Waits (10 s at most each) until both have written the `n` sent last.
    fn flush(&self, n: usize) {
        if let Some(ix) = &self.ipfix
            && !ix.flush(Duration::from_secs(10))
        {
            warn!("the IPFIX exporter did not finish sending {n} conversations within 10 s");
        }
        if let Some(x) = &self.events
            && !x.flush(Duration::from_secs(10))
        {
            warn!("the event exporter did not finish writing {n} flow records within 10 s");
        }
        if let Some(k) = &self.kafka
            && !k.flush(Duration::from_secs(10))
        {
            warn!("the kafka spool did not take {n} flow records within 10 s");
        }
    }
}

/// The store thread's work, every 2 s: inventory, device events, detections
/// and baselines, evidence, and the state database.
struct StorePass {
    db: Store,
    detector: crate::detection::detect::Detector,
    evidence: EvidencePass,
    config_decommissioned: std::collections::BTreeSet<String>,
    /// The quarantine set last handed to the policy thread.
    quarantine: Option<Vec<crate::policy::quarantine::Quarantined>>,
    /// The inventory's changes to the fleet's compacted topic.
    inventory_feed: Option<InventoryFeed>,
}

struct InventoryFeed {
    sink: crate::surfaces::kafka::KafkaSink,
    publisher: crate::surfaces::kafka::InventoryPublisher,
    refresh: Duration,
}

impl StorePass {
    fn run(&mut self, state: &AppState, stop: bool) {
        match self.db.lifecycle() {
            Ok(l) => *state.lifecycle.write().unwrap() = l,
            Err(e) => warn!("reading lifecycle states failed: {e:#}"),
        }
        let snap = state.rebuild_inventory();
        let devices = &snap.devices;
        if let Some(installed) = state.policy.read().unwrap().current.clone() {
            let now = SystemTime::now();
            let starts = self.learning_starts(&installed.policy, now);
            self.report_new_devices(state, &installed.policy, devices, &starts, now);
            self.detector.decommissioned = crate::inventory::lifecycle::decommissioned_since(
                &state.lifecycle.read().unwrap(),
                &self.config_decommissioned,
            );
            self.detect(state, &installed, devices, &starts, now);
            self.quarantine(state, &installed.policy, devices, &starts);
        }
        self.evidence.pass(state, &mut self.db, devices, stop);
        match self.db.save_devices(devices) {
            Ok(()) => {
                let mut h = state.history.write().unwrap();
                for d in devices {
                    h.insert(d.id(), d.clone());
                }
            }
            Err(e) => warn!("saving devices failed: {e:#}"),
        }
        if let Some(f) = &mut self.inventory_feed {
            f.sink.inventory(f.publisher.changes(devices, f.refresh, SystemTime::now()));
        }
    }

    /// Hands the policy thread the devices to quarantine when the set
    /// changed (and keeps it in `state_dir` for the next start).
    fn quarantine(
        &mut self,
        state: &AppState,
        policy: &Policy,
        devices: &[crate::inventory::Device],
        starts: &HashMap<String, SystemTime>,
    ) {
        let Some(tx) = &state.policy_trigger else { return };
        let ends = |seg: &str| {
            let s = policy.segments.iter().find(|s| s.name == seg)?;
            Some(*starts.get(seg)? + s.learning_period)
        };
        let configured = state.overrides.keys().copied().collect();
        let (list, skipped) = crate::detection::quarantine::select(devices, policy, ends, &configured);
        if self.quarantine.as_ref() == Some(&list) {
            return;
        }
        for s in skipped {
            warn!(
                "quarantine: not applied to {s}: more than {} addresses look like a router",
                crate::detection::quarantine::MAX_ADDRESSES
            );
        }
        let path = state.state_dir.join(QUARANTINE_FILE);
        let tmp = path.with_extension("json.tmp");
        let saved = serde_json::to_vec(&list)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(std::fs::write(&tmp, b)?))
            .and_then(|()| Ok(std::fs::rename(&tmp, &path)?));
        if let Err(e) = saved {
            warn!("saving the quarantine to {} failed: {e:#}", path.display());
        }
        let _ = tx.send(Trigger::Quarantine(list.clone()));
        self.quarantine = Some(list);
    }

    /// When each segment's learning period started: the first time a policy
    /// containing it was installed (recorded now if never, within one pass).
    fn learning_starts(&self, policy: &Policy, now: SystemTime) -> HashMap<String, SystemTime> {
        let now_text = rfc3339(now);
        policy
            .segments
            .iter()
            .map(|s| {
                let start = match self.db.learning_started(&s.name, &now_text) {
                    Ok(t) => crate::base::clock::parse_rfc3339(&t).unwrap_or(now),
                    Err(e) => {
                        warn!("recording the learning start of {}: {e:#}", s.name);
                        now
                    }
                };
                (s.name.clone(), start)
            })
            .collect()
    }

    /// Raises `new_device` / `rogue_device` for devices the inventory has not stored yet.
    fn report_new_devices(
        &self,
        state: &AppState,
        policy: &Policy,
        devices: &[crate::inventory::Device],
        starts: &HashMap<String, SystemTime>,
        now: SystemTime,
    ) {
        let new: Vec<_> = {
            let h = state.history.read().unwrap();
            devices.iter().filter(|d| !h.contains_key(&d.id())).cloned().collect()
        };
        let events = devwatch::check(&new, policy, |segment| starts.get(segment).copied(), now);
        let mut store = state.events.write().unwrap();
        for e in events {
            warn!(
                "{} {} ({}) in segment {}: {}",
                e.kind,
                e.mac.as_deref().unwrap_or(""),
                e.src,
                e.segment,
                e.reason
            );
            store.push(e);
        }
    }

    /// Runs the flow detections, keeps their events and suppressed counts, and
    /// writes the baseline observations they recorded.
    fn detect(
        &mut self,
        state: &AppState,
        installed: &Installed,
        devices: &[crate::inventory::Device],
        starts: &HashMap<String, SystemTime>,
        now: SystemTime,
    ) {
        let mut status = learn::Status::default();
        let mut learning_ends = HashMap::new();
        for s in &installed.policy.segments {
            let ends = starts.get(&s.name).copied().unwrap_or(now) + s.learning_period;
            learning_ends.insert(s.name.clone(), ends);
            status.segments.insert(
                s.name.clone(),
                learn::SegmentStatus { learning: now < ends, learning_ends: rfc3339(ends), observations: 0 },
            );
        }
        let view = crate::detection::detect::PolicyView {
            policy: &installed.policy,
            generation: installed.generation,
            learning_ends: &learning_ends,
        };
        let (events, suppressed) = {
            let t = state.tables.read().unwrap();
            self.detector.check(&t, &view, devices, now)
        };
        let learner = &mut self.detector.learner;
        let rows = learner.take_dirty();
        if !rows.is_empty()
            && let Err(e) = self.db.save_observations(&rows)
        {
            warn!("saving {} baseline observations failed (kept for the next pass): {e:#}", rows.len());
            learner.restore_dirty(&rows);
        }
        for (name, n) in learner.counts() {
            if let Some(s) = status.segments.get_mut(&name) {
                s.observations = n;
            }
        }
        status.dropped = learner.dropped;
        *state.baseline.write().unwrap() = status;
        let mut store = state.events.write().unwrap();
        store.incidents.set_learning(learning_ends);
        for (kind, n) in suppressed {
            *store.suppressed.entry(kind).or_default() += n;
        }
        for e in events {
            warn!("{} {} -> {} ({}, segment {}): {}", e.kind, e.src, e.dst, e.app, e.segment, e.reason);
            store.push(e);
        }
    }
}

/// The doctor's checks at start: each logged; a failure stops the start, and
/// so do pins that would die with the agent while a segment enforces
/// (unless `allow_private_bpffs`).
fn preflight(cfg: &Config) -> Result<()> {
    use crate::datapath::doctor::{self, Level};
    let checks = doctor::run(&cfg.pin_dir, &cfg.ports(), &cfg.bridges);
    for c in &checks {
        match c.level {
            Level::Ok => info!("preflight: {}", c.what),
            _ => warn!("preflight: {c}"),
        }
    }
    if let Some(c) = checks.iter().find(|c| c.level == Level::Fail) {
        anyhow::bail!("preflight failed: {c}\n(`mdsec-agent doctor --config …` lists every check)");
    }
    let (_, durable) = doctor::pins_outlive_agent(&cfg.pin_dir);
    let enforcing = cfg.policy_dir.as_deref().and_then(|d| {
        let (p, _) = crate::policy::model::load_dir(d, SystemTime::now());
        p?.segments.into_iter().find(|s| s.mode == crate::policy::model::Mode::Enforce).map(|s| s.name)
    });
    if let (false, Some(seg), false) = (durable, &enforcing, cfg.allow_private_bpffs) {
        anyhow::bail!(
            "segment {seg} enforces, but the pins under {} would die with this process (its bpffs is \
             private to its mount namespace, as under `ip netns exec`): a crash of the agent would \
             detach XDP and silently end enforcement. Run it in the host's mount namespace (the \
             systemd unit does), or set allow_private_bpffs: true to accept that",
            cfg.pin_dir.display()
        );
    }
    Ok(())
}

/// The API token: the file's first line, at least 16 characters.
fn read_token(path: &std::path::Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read api.token_file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "{}: the API token must be at least 16 printable characters on the first line",
            path.display()
        );
    }
    Ok(token)
}

/// Where a start that refused the policy files writes the last recorded
/// generation's files to load them (inside `state_dir`).
pub const RESTORED_POLICY_DIR: &str = "policy-restored";

/// The register file, reloaded when it changes; a bad edit keeps the last good one.
struct RegisterFile {
    path: Option<std::path::PathBuf>,
    modified: Option<SystemTime>,
    current: crate::evidence::register::Register,
    ok: bool,
}

impl RegisterFile {
    fn new(path: Option<std::path::PathBuf>) -> RegisterFile {
        RegisterFile { path, modified: None, current: Default::default(), ok: true }
    }

    fn refresh(&mut self) {
        let Some(path) = &self.path else { return };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.modified {
            return;
        }
        self.modified = modified;
        match crate::evidence::register::Register::load(path) {
            Ok(r) => {
                info!("vulnerability register {}: {} entries", path.display(), r.entries.len());
                self.current = r;
                self.ok = true;
            }
            Err(diags) => {
                for d in diags {
                    error!("{d}");
                }
                error!("vulnerability register {}: keeping the last good one", path.display());
                self.ok = false;
            }
        }
    }
}

/// Register assessment, lifecycle, event persistence and snapshots: the store
/// thread's evidence work.
struct EvidencePass {
    register: RegisterFile,
    snapshotter: crate::evidence::Snapshotter,
    every: u64,
    retention: Duration,
    pruned: Option<SystemTime>,
}

impl EvidencePass {
    fn pass(&mut self, state: &AppState, db: &mut Store, devices: &[crate::inventory::Device], stop: bool) {
        let now = SystemTime::now();
        // Events reach the database on this thread, never from the hot paths.
        let (unsaved, incidents) = {
            let mut st = state.events.write().unwrap();
            st.tick(now, stop);
            (std::mem::take(&mut st.unsaved), st.incidents.take_dirty())
        };
        if !incidents.is_empty()
            && let Err(e) = db.save_incidents(&incidents)
        {
            warn!("saving {} incidents failed (saved again when they change): {e:#}", incidents.len());
        }
        if !unsaved.is_empty()
            && let Err(e) = db.save_events(&unsaved)
        {
            warn!("saving {} events failed (kept for the next pass): {e:#}", unsaved.len());
            let mut st = state.events.write().unwrap();
            let newer = std::mem::replace(&mut st.unsaved, unsaved);
            st.unsaved.extend(newer);
        }
        self.register.refresh();
        let findings = crate::evidence::assess(&self.register.current, devices, now);
        let installed = state.policy.read().unwrap().current.clone();
        if stop || self.snapshotter.due(now, self.every) {
            let totals = crate::evidence::summarize(state.segstats.lock().unwrap().totals());
            let policy = installed.as_ref().map(|i| &i.policy);
            let kpi = crate::evidence::kpi(devices, &findings, policy, now);
            let snap = self.snapshotter.take(&totals, policy, kpi, now);
            match serde_json::to_string(&snap) {
                Ok(doc) => {
                    if let Err(e) = db.save_snapshot(&snap.time, &doc) {
                        warn!("saving the evidence snapshot failed: {e:#}");
                    }
                }
                Err(e) => warn!("encoding the evidence snapshot failed: {e}"),
            }
        }
        if self.pruned.is_none_or(|t| now.duration_since(t).unwrap_or_default() > Duration::from_secs(86_400))
        {
            self.pruned = Some(now);
            if let Err(e) = db.prune(&rfc3339(now - self.retention)) {
                warn!("pruning old evidence failed: {e:#}");
            }
        }
        *state.evidence.write().unwrap() = crate::evidence::EvidenceStatus {
            findings,
            register_ok: self.register.ok,
            register_configured: self.register.path.is_some(),
        };
    }
}

/// On-demand exceptions in the state database, for the policy thread (its
/// own connection).
struct StoredGrants(Store);

impl crate::policy::runtime::GrantStore for StoredGrants {
    fn open(&mut self) -> anyhow::Result<Vec<crate::policy::ondemand::Grant>> {
        self.0.grants(true)
    }

    fn get(&mut self, id: u64) -> anyhow::Result<Option<crate::policy::ondemand::Grant>> {
        Ok(self.0.grants(false)?.into_iter().find(|g| g.id == id))
    }

    fn close(&mut self, id: u64, c: &crate::policy::ondemand::Closed) -> anyhow::Result<()> {
        self.0.close_grant(id, c)?.map(|_| ()).map_err(anyhow::Error::msg)
    }
}

/// The quarantine set as last handed to the policy thread (`state_dir`).
const QUARANTINE_FILE: &str = "quarantine.json";

fn read_quarantine(dir: &std::path::Path) -> Vec<crate::policy::quarantine::Quarantined> {
    let path = dir.join(QUARANTINE_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            warn!(
                "{}: {e}; no device starts in quarantine (the first store pass selects them)",
                path.display()
            );
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

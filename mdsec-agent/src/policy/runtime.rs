//! The live policy: loads, compiles and installs the policy directory at start, on
//! SIGHUP and when its files change. A failed load is logged and kept in the
//! status; the last good generation stays active.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, mpsc},
    time::{Duration, SystemTime},
};

use log::{error, info, warn};
use serde::Serialize;

use super::{
    approval::{self, Approval, Change, Contents},
    compile::{self, Compiled},
    maps::PolicyMaps,
    model::{self, Policy},
    ondemand::{self, Closed, Grant},
    quarantine::{self, Quarantined},
};
use crate::{
    base::clock::{Anchor, rfc3339},
    datapath::segstats::SegStats,
};

/// A generation as installed, kept so flows and events can be described.
#[derive(Debug, Clone)]
pub struct Installed {
    pub generation: u32,
    pub policy: Policy,
    pub compiled: Compiled,
    /// The files it was loaded from, and their content hash.
    pub contents: Contents,
    pub approval: Option<Approval>,
    /// `policy.rules[..file_rules]` are the files'; the rest are these
    /// on-demand exceptions' (`ondemand::merge`).
    pub file_rules: usize,
    pub grants: Vec<Grant>,
}

impl Installed {
    /// The policy as its files say, without on-demand exceptions.
    pub fn file_policy(&self) -> Policy {
        let mut p = self.policy.clone();
        p.rules.truncate(self.file_rules);
        p.quarantined.clear();
        p
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Status {
    pub policy_dir: Option<String>,
    /// Active generation, 0 when no policy is loaded.
    pub generation: u32,
    pub last_reload_ok: bool,
    pub last_reload: Option<String>,
    pub last_success: Option<String>,
    pub reloads: u64,
    pub failed_reloads: u64,
    #[serde(skip)]
    pub last_reload_at: Option<SystemTime>,
    #[serde(skip)]
    pub last_success_at: Option<SystemTime>,
    /// Diagnostics of the last attempt (`file:line:col: message`), warnings included.
    pub diagnostics: Vec<String>,
    /// The active generation's content hash, and who approved it.
    pub content_hash: Option<String>,
    pub approved_by: Option<String>,
    pub ticket: Option<String>,
    /// The active generation was reinstalled from the policy history at start
    /// because the files were refused: it is the last one installed before.
    pub restored: bool,
}

#[derive(Default)]
pub struct PolicyState {
    pub status: Status,
    /// The active generation and the one before it (events may still name it).
    pub current: Option<Arc<Installed>>,
    pub previous: Option<Arc<Installed>>,
}

impl PolicyState {
    pub fn generation(&self, g: u32) -> Option<&Arc<Installed>> {
        [&self.current, &self.previous].into_iter().flatten().find(|i| i.generation == g)
    }

    /// The segment a datapath segment index (1-based; 0 is none) means in
    /// generation `g`.
    pub fn segment(&self, g: u32, index: u32) -> Option<&crate::policy::model::Segment> {
        self.generation(g)?.policy.segments.get((index as usize).checked_sub(1)?)
    }
}

pub enum Trigger {
    /// SIGHUP or an API request.
    Reload,
    /// On-demand exceptions were opened or closed: reinstall the active
    /// generation's files with the open ones. The answer is the generation
    /// installed, or why none was.
    Grants(Option<mpsc::Sender<Result<u32, String>>>),
    /// The devices to quarantine now (from the inventory, each store pass
    /// that changes the set): reinstall the active generation with them.
    Quarantine(Vec<Quarantined>),
}

/// Where on-demand exceptions are kept (the state database, given by the
/// app layer).
pub trait GrantStore: Send {
    /// Those not closed, oldest first.
    fn open(&mut self) -> anyhow::Result<Vec<Grant>>;
    /// One grant, closed or not.
    fn get(&mut self, id: u64) -> anyhow::Result<Option<Grant>>;
    fn close(&mut self, id: u64, c: &Closed) -> anyhow::Result<()>;
}

/// Loads, validates and compiles; returns the diagnostics on failure.
pub fn prepare(
    dir: &Path,
    limits: compile::Limits,
    opts: &model::LoadOptions,
) -> Result<(Policy, Compiled, Vec<String>), Vec<String>> {
    let m = prepare_merged(dir, limits, opts, &[], &[])?;
    Ok((m.policy, m.compiled, m.diags))
}

/// A loaded policy with on-demand exceptions merged, compiled.
struct Merged {
    policy: Policy,
    compiled: Compiled,
    diags: Vec<String>,
    file_rules: usize,
    grants: Vec<Grant>,
}

fn prepare_merged(
    dir: &Path,
    limits: compile::Limits,
    opts: &model::LoadOptions,
    grants: &[Grant],
    quarantined: &[Quarantined],
) -> Result<Merged, Vec<String>> {
    let (policy, diags) = model::load_dir_with(dir, SystemTime::now(), opts);
    let texts: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    let Some(policy) = policy else { return Err(texts) };
    merge_compile(policy, texts, grants, quarantined, limits).map_err(|(mut texts, e)| {
        texts.push(format!("{}: {e}", dir.display()));
        texts
    })
}

fn merge_compile(
    policy: Policy,
    mut texts: Vec<String>,
    grants: &[Grant],
    quarantined: &[Quarantined],
    limits: compile::Limits,
) -> Result<Merged, (Vec<String>, String)> {
    let file_rules = policy.rules.len();
    let (mut merged, applied, warnings) = ondemand::merge(&policy, grants, SystemTime::now());
    merged.quarantined = quarantine::applicable(&merged, quarantined);
    texts.extend(warnings);
    let grants = grants.iter().filter(|g| applied.contains(&g.id)).cloned().collect();
    match compile::compile(&merged, &Anchor::now(), limits) {
        Ok(c) => Ok(Merged { policy: merged, compiled: c, diags: texts, file_rules, grants }),
        Err(e) => Err((texts, e.to_string())),
    }
}

/// Where installed generations are recorded (the state database's policy
/// history, given by the app layer): it sets the row's id.
pub type Recorder = Box<dyn FnMut(&mut Change) -> anyhow::Result<()> + Send>;

/// Where the policy thread's events go (`EventStore::push`, given by the app layer).
pub type EventSink = Box<dyn FnMut(crate::base::event::Event) + Send>;

pub struct Reloader {
    maps: PolicyMaps,
    dir: PathBuf,
    event_rate: u32,
    state: Arc<RwLock<PolicyState>>,
    segstats: Arc<Mutex<SegStats>>,
    record: Recorder,
    /// The newest history row (what a start compares the files with).
    last: Option<Change>,
    events: EventSink,
    load_options: model::LoadOptions,
    /// Maintenance windows (by their rule line) and whether each was open at
    /// the last check: a change is an event and a reschedule.
    windows_open: std::collections::BTreeMap<String, bool>,
    grant_store: Option<Box<dyn GrantStore>>,
    /// The devices the app layer last asked to quarantine.
    quarantine: Vec<Quarantined>,
}

/// A policy ready to install, and what it was loaded from.
struct Prepared {
    policy: Policy,
    compiled: Compiled,
    diags: Vec<String>,
    contents: Contents,
    approval: Option<Approval>,
    file_rules: usize,
    grants: Vec<Grant>,
}

impl Reloader {
    pub fn new(
        maps: PolicyMaps,
        dir: PathBuf,
        event_rate: u32,
        state: Arc<RwLock<PolicyState>>,
        segstats: Arc<Mutex<SegStats>>,
        (record, last): (Recorder, Option<Change>),
        events: EventSink,
    ) -> Reloader {
        state.write().unwrap().status.policy_dir = Some(dir.display().to_string());
        Reloader {
            maps,
            dir,
            event_rate,
            state,
            segstats,
            record,
            last,
            events,
            load_options: Default::default(),
            windows_open: Default::default(),
            grant_store: None,
            quarantine: Vec::new(),
        }
    }

    /// The devices in quarantine at the previous stop: merged from the
    /// first install on (the store pass sends the current set after).
    pub fn with_quarantine(mut self, q: Vec<Quarantined>) -> Reloader {
        self.quarantine = q;
        self
    }

    /// Where on-demand exceptions are kept: each install merges the open ones.
    pub fn with_grants(mut self, g: Box<dyn GrantStore>) -> Reloader {
        self.grant_store = Some(g);
        self
    }

    /// The open on-demand exceptions. Those expired (also while the agent
    /// was down) are closed here, each with its event.
    fn open_grants(&mut self) -> Vec<Grant> {
        let Some(gs) = self.grant_store.as_mut() else { return Vec::new() };
        let open = match gs.open() {
            Ok(v) => v,
            Err(e) => {
                error!("policy: reading on-demand exceptions failed: {e:#}; none applied");
                return Vec::new();
            }
        };
        let now = SystemTime::now();
        let (live, expired): (Vec<_>, Vec<_>) =
            open.into_iter().partition(|g| g.expires_at().is_some_and(|t| t > now));
        for mut g in expired {
            let c = Closed { time: rfc3339(now), by: "mdsec".into(), reason: "expired".into() };
            if let Err(e) = gs.close(g.id, &c) {
                error!("policy: recording the expiry of on-demand exception #{} failed: {e:#}", g.id);
                continue;
            }
            info!("policy: on-demand exception #{} ({}) expired at {}", g.id, g.ticket, g.expires);
            g.closed = Some(c);
            let generation = self.state.read().unwrap().status.generation;
            (self.events)(grant_event(&g, false, generation, now));
        }
        live
    }

    /// An on-demand exception of the active generation has expired: the
    /// kernel stopped allowing it on the instant; this records it and
    /// reinstalls without it.
    fn check_grants(&mut self) {
        let now = SystemTime::now();
        let due = self
            .state
            .read()
            .unwrap()
            .current
            .as_ref()
            .is_some_and(|c| c.grants.iter().any(|g| g.expires_at().is_none_or(|t| t <= now)));
        if due && let Err(e) = self.regrant() {
            error!("policy: removing expired on-demand exceptions failed: {e}");
        }
    }

    /// The active generation's files reinstalled with the open on-demand
    /// exceptions (no re-read of the files, so an unapproved edit waiting in
    /// the directory does not stop an exception from opening or closing).
    fn regrant(&mut self) -> Result<u32, String> {
        self.reinstall("exception")
    }

    /// The active generation's files reinstalled with the current grants and
    /// quarantine, recorded with `cause`.
    fn reinstall(&mut self, cause: &str) -> Result<u32, String> {
        let Some(cur) = self.state.read().unwrap().current.clone() else {
            return Err("no policy generation is active".into());
        };
        let grants = self.open_grants();
        let m = merge_compile(cur.file_policy(), Vec::new(), &grants, &self.quarantine, self.maps.limits())
            .map_err(|(_, e)| format!("compiling with the on-demand exceptions failed: {e}"))?;
        let p = Prepared {
            policy: m.policy,
            compiled: m.compiled,
            diags: m.diags,
            contents: cur.contents.clone(),
            approval: cur.approval.clone(),
            file_rules: m.file_rules,
            grants: m.grants,
        };
        if self.finish(Ok(p), cause) {
            Ok(self.state.read().unwrap().status.generation)
        } else {
            Err(self.state.read().unwrap().status.diagnostics.join("; "))
        }
    }

    /// The agent config's `change_control` limits for loading.
    pub fn with_load_options(mut self, o: model::LoadOptions) -> Reloader {
        self.load_options = o;
        self
    }

    /// Raises an event for every maintenance window that opened or closed
    /// since the last check and, if any did, writes the windows' next
    /// occurrences into the active generation's entries (the kernel already
    /// opened or closed them on the instant; this only schedules the next).
    fn check_windows(&mut self, rescheduled_on_change: bool) {
        let Some(cur) = self.state.read().unwrap().current.clone() else { return };
        let now = SystemTime::now();
        let mut changed = false;
        let mut seen = std::collections::BTreeSet::new();
        for r in &cur.policy.rules {
            let Some(w) = &r.window else { continue };
            let seg = &cur.policy.segments[r.segment];
            let id = format!("{}: {} during {}", seg.name, r.text(), w.text());
            let open = w.is_open(now);
            seen.insert(id.clone());
            let was = self.windows_open.insert(id, open);
            if was == Some(open) || (was.is_none() && !open) {
                continue;
            }
            changed = true;
            let until = w.occurrence(now).map(|(o, c)| if open { c } else { o });
            (self.events)(window_event(&cur, r, w, open, until, now));
        }
        self.windows_open.retain(|k, _| seen.contains(k));
        if changed && rescheduled_on_change {
            self.reschedule(&cur);
        }
    }

    /// The windows' entries compiled for now, written where they differ.
    fn reschedule(&mut self, cur: &Installed) {
        let fresh = match compile::compile(&cur.policy, &Anchor::now(), self.maps.limits()) {
            Ok(c) => c,
            Err(e) => return error!("policy: maintenance windows: recompiling failed: {e}"),
        };
        let windowed =
            |rule: u32| cur.policy.rules.get(rule as usize - 1).is_some_and(|r| r.window.is_some());
        let installed: std::collections::HashMap<_, _> = cur.compiled.policy.iter().copied().collect();
        let changed: Vec<_> = fresh
            .policy
            .iter()
            .filter(|(k, v)| windowed(v.rule) && installed.get(k) != Some(v))
            .copied()
            .collect();
        match self.maps.reschedule(cur.generation, &changed, fresh.reevaluate_at_ns) {
            Ok(()) => {
                info!("policy: maintenance windows: {} entries rescheduled", changed.len());
                // What is in the maps now, for the next comparison.
                let mut st = self.state.write().unwrap();
                if let Some(c) = st.current.as_mut().filter(|c| c.generation == cur.generation) {
                    let written: std::collections::HashMap<_, _> = changed.iter().copied().collect();
                    let mut next = (**c).clone();
                    for (k, v) in next.compiled.policy.iter_mut() {
                        if let Some(nv) = written.get(k) {
                            *v = *nv;
                        }
                    }
                    next.compiled.reevaluate_at_ns = fresh.reevaluate_at_ns;
                    *c = Arc::new(next);
                }
            }
            Err(e) => error!("policy: maintenance windows: writing the next occurrences failed: {e:#}"),
        }
    }

    /// The directory's files read, approved, loaded and compiled. The files
    /// are read before and after loading: an edit in between is refused
    /// (and loaded at the next check), so what is approved and recorded is
    /// exactly what is installed.
    fn prepare(&mut self, dir: &Path, check_approval: bool) -> Result<Prepared, Vec<String>> {
        let read = |d: &Path| approval::read(d).map_err(|e| vec![format!("{e:#}")]);
        // A file the loader refuses (too large, unreadable) gets its located
        // diagnostic from the loader, not from the hash.
        let before = approval::read(dir).ok();
        let grants = self.open_grants();
        let Merged { policy, compiled, diags, file_rules, grants } =
            prepare_merged(dir, self.maps.limits(), &self.load_options, &grants, &self.quarantine)?;
        let contents = read(dir)?;
        if before.as_ref() != Some(&contents) {
            return Err(vec![format!("{}: the policy files changed while loading", dir.display())]);
        }
        let approval = if check_approval {
            let st = self.state.read().unwrap();
            let active = match (&st.current, &self.last) {
                (Some(i), _) => Some(approval::Active {
                    generation: i.generation,
                    hash: &i.contents.hash,
                    approved_by: i.approval.as_ref().map(|a| a.approved_by.as_str()),
                    requires_approval: i.policy.segments.iter().any(|s| s.approval_required()),
                }),
                // At start: the generation the history says was installed last.
                (None, Some(c)) => Some(approval::Active {
                    generation: c.generation,
                    hash: &c.content_hash,
                    approved_by: c.approved_by.as_deref(),
                    requires_approval: c.requires_approval,
                }),
                (None, None) => None,
            };
            approval::decide(dir, active.as_ref(), &policy, &contents, approval::load(dir))?
        } else {
            None
        };
        Ok(Prepared { policy, compiled, diags, contents, approval, file_rules, grants })
    }

    /// At a start whose files were refused: the last generation of the
    /// history, reinstalled from its recorded files (written to
    /// `restore_dir`), so an unapproved or broken edit made while the agent
    /// was down does not leave the segments unenforced.
    pub fn restore(&mut self, restore_dir: &Path) -> bool {
        let Some(last) = self.last.clone() else { return false };
        let written = (|| -> anyhow::Result<()> {
            let _ = std::fs::remove_dir_all(restore_dir);
            std::fs::create_dir_all(restore_dir)?;
            for (name, text) in &last.contents().files {
                std::fs::write(restore_dir.join(name), text)?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            error!("policy: cannot write the last generation to {}: {e:#}", restore_dir.display());
            return false;
        }
        let restored = self.prepare(restore_dir, false).and_then(|p| {
            if p.contents.hash != last.content_hash {
                return Err(vec![format!(
                    "the recorded files hash to {}",
                    approval::short(&p.contents.hash)
                )]);
            }
            Ok(p)
        });
        match restored {
            Ok(mut p) => {
                p.approval = last.approval();
                let keep = self.state.read().unwrap().status.diagnostics.clone();
                let ok = self.finish(Ok(p), "restored");
                if ok {
                    warn!(
                        "policy: generation {} reinstalled from the history ({}): the files in {} were refused",
                        self.state.read().unwrap().status.generation,
                        approval::short(&last.content_hash),
                        self.dir.display()
                    );
                    let mut st = self.state.write().unwrap();
                    st.status.restored = true;
                    st.status.diagnostics = keep;
                    st.status.last_reload_ok = false;
                }
                ok
            }
            Err(d) => {
                error!("policy: the last recorded generation does not load: {}", d.join("; "));
                false
            }
        }
    }

    /// Credits the counters of the half `c` is about to overwrite, then installs it.
    fn install(&mut self, p: &Policy, c: &Compiled) -> anyhow::Result<u32> {
        let next = self.maps.next_generation()?;
        let names = p.segments.iter().map(|s| s.name.clone()).collect();
        self.segstats.lock().unwrap().retire(next & 1, names)?;
        self.maps.apply(c, self.event_rate)
    }

    /// One reload attempt; returns whether a new generation is active.
    pub fn reload(&mut self) -> bool {
        let cause = if self.state.read().unwrap().current.is_none() { "start" } else { "reload" };
        let dir = self.dir.clone();
        let prepared = self.prepare(&dir, true);
        self.finish(prepared, cause)
    }

    /// Installs and records a prepared generation, or keeps the status of a
    /// refused one.
    fn finish(&mut self, prepared: Result<Prepared, Vec<String>>, cause: &str) -> bool {
        let at = SystemTime::now();
        let now = rfc3339(at);
        let result = prepared.and_then(|p| match self.install(&p.policy, &p.compiled) {
            Ok(g) => Ok((p, g)),
            Err(e) => Err(vec![format!("installing the policy failed: {e:#}")]),
        });
        let mut st = self.state.write().unwrap();
        st.status.reloads += 1;
        st.status.last_reload = Some(now.clone());
        st.status.last_reload_at = Some(at);
        match result {
            Ok((p, generation)) => {
                for d in &p.diags {
                    warn!("policy: {d}");
                }
                info!(
                    "policy generation {generation} active: {} segments, {} rules, {} datapath entries, {}{}",
                    p.policy.segments.len(),
                    p.policy.rules.len(),
                    p.compiled.policy.len(),
                    approval::short(&p.contents.hash),
                    p.approval
                        .as_ref()
                        .map(|a| format!(", approved by {} ({})", a.approved_by, a.ticket))
                        .unwrap_or_default()
                );
                // The history row, diffed against the one recorded before
                // (at a start, the previous run's last generation).
                let mut change = Change::new(&p.contents, self.last.as_ref(), &p.policy, p.approval.as_ref());
                change.time = now.clone();
                change.generation = generation;
                change.policy_dir = self.dir.display().to_string();
                change.cause = cause.into();
                // A restart over unchanged files installs a new generation of
                // the same content: recorded too, the history is every install.
                if let Err(e) = (self.record)(&mut change) {
                    error!("policy: recording generation {generation} in the history failed: {e:#}");
                }
                self.last = Some(change);
                st.status.content_hash = Some(p.contents.hash.clone());
                st.status.approved_by = p.approval.as_ref().map(|a| a.approved_by.clone());
                st.status.ticket = p.approval.as_ref().map(|a| a.ticket.clone());
                st.status.restored = false;
                let before: Vec<Grant> = st.current.as_ref().map(|c| c.grants.clone()).unwrap_or_default();
                let quarantine_changes = if st.current.is_none() {
                    // At a start: raised by the run that quarantined them.
                    (Vec::new(), Vec::new())
                } else {
                    let before: Vec<Quarantined> =
                        st.current.as_ref().map(|c| c.policy.quarantined.clone()).unwrap_or_default();
                    let key = |q: &Quarantined| (q.segment.clone(), q.mac.clone());
                    let now: Vec<_> = p.policy.quarantined.iter().map(key).collect();
                    let was: Vec<_> = before.iter().map(key).collect();
                    let added: Vec<Quarantined> =
                        p.policy.quarantined.iter().filter(|q| !was.contains(&key(q))).cloned().collect();
                    let lifted: Vec<Quarantined> =
                        before.into_iter().filter(|q| !now.contains(&key(q))).collect();
                    (added, lifted)
                };
                let grant_changes = st.current.is_some().then(|| {
                    let opened: Vec<Grant> =
                        p.grants.iter().filter(|g| !before.iter().any(|b| b.id == g.id)).cloned().collect();
                    let closed: Vec<Grant> =
                        before.into_iter().filter(|b| !p.grants.iter().any(|g| g.id == b.id)).collect();
                    (opened, closed)
                });
                st.previous = st.current.take();
                st.current = Some(Arc::new(Installed {
                    generation,
                    policy: p.policy,
                    compiled: p.compiled,
                    contents: p.contents,
                    approval: p.approval,
                    file_rules: p.file_rules,
                    grants: p.grants,
                }));
                st.status.generation = generation;
                st.status.last_reload_ok = true;
                st.status.last_success = Some(now);
                st.status.last_success_at = Some(at);
                st.status.diagnostics = p.diags;
                drop(st);
                // Windows open in the new generation that were not open
                // before are events; its entries are already current.
                self.check_windows(false);
                if let Some((opened, closed)) = grant_changes {
                    self.grant_events(opened, closed, generation, at);
                }
                let (added, lifted) = quarantine_changes;
                for (q, on) in added.iter().map(|q| (q, true)).chain(lifted.iter().map(|q| (q, false))) {
                    info!(
                        "policy: {} {} in segment {} ({})",
                        q.mac,
                        if on { "quarantined" } else { "out of quarantine" },
                        q.segment,
                        q.mode
                    );
                    (self.events)(quarantine_event(q, on, generation, at));
                }
                true
            }
            Err(diags) => {
                for d in &diags {
                    error!("policy: {d}");
                }
                error!("policy reload failed; generation {} stays active", st.status.generation);
                st.status.last_reload_ok = false;
                st.status.failed_reloads += 1;
                st.status.diagnostics = diags;
                false
            }
        }
    }

    /// `exception_open` for grants this install applied, `exception_close`
    /// for those it removed (closed by an operator, or expired: that event
    /// was raised when the expiry was recorded).
    fn grant_events(&mut self, opened: Vec<Grant>, closed: Vec<Grant>, generation: u32, at: SystemTime) {
        for g in opened {
            info!(
                "policy: on-demand exception #{} open until {} ({}, by {})",
                g.id, g.expires, g.ticket, g.opened_by
            );
            (self.events)(grant_event(&g, true, generation, at));
        }
        for g in closed {
            let stored = self.grant_store.as_mut().and_then(|s| s.get(g.id).ok().flatten());
            let g = stored.unwrap_or(g);
            if g.closed.as_ref().is_some_and(|c| c.by == "mdsec" && c.reason == "expired") {
                continue;
            }
            info!("policy: on-demand exception #{} ({}) closed", g.id, g.ticket);
            (self.events)(grant_event(&g, false, generation, at));
        }
    }

    /// Reloads on triggers and when the directory's files change (checked twice a
    /// second; a change must hold still for one check so half-written files are not
    /// read).
    pub fn spawn(mut self, triggers: mpsc::Receiver<Trigger>) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("mdsec-policy".into())
            .spawn(move || {
                let mut seen = fingerprint(&self.dir);
                let mut pending: Option<Vec<(PathBuf, SystemTime, u64)>> = None;
                loop {
                    self.check_windows(true);
                    self.check_grants();
                    match triggers.recv_timeout(Duration::from_millis(500)) {
                        Ok(Trigger::Reload) => {
                            self.reload();
                            seen = fingerprint(&self.dir);
                            pending = None;
                        }
                        Ok(Trigger::Quarantine(list)) => {
                            if list != self.quarantine {
                                self.quarantine = list;
                                if let Err(e) = self.reinstall("quarantine") {
                                    error!("policy: applying the quarantine failed: {e}");
                                }
                            }
                        }
                        Ok(Trigger::Grants(answer)) => {
                            let r = self.regrant();
                            if let Some(a) = answer {
                                let _ = a.send(r);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let now = fingerprint(&self.dir);
                            if now == seen {
                                pending = None;
                            } else if pending.as_ref() == Some(&now) {
                                info!("policy files changed; reloading");
                                self.reload();
                                seen = now;
                                pending = None;
                            } else {
                                pending = Some(now);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawn policy thread")
    }
}

/// `maintenance_window_open` / `_close`: which window, its rule and when it
/// closes (or opens next).
fn window_event(
    cur: &Installed,
    r: &super::model::Rule,
    w: &super::window::Window,
    open: bool,
    until: Option<SystemTime>,
    now: SystemTime,
) -> crate::base::event::Event {
    let seg = &cur.policy.segments[r.segment];
    let when = until.map(rfc3339).unwrap_or_else(|| "never".into());
    crate::base::event::Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        kind: if open { "maintenance_window_open" } else { "maintenance_window_close" }.into(),
        severity: "info".into(),
        time: rfc3339(now),
        dst: r.peer.to_string(),
        proto: r.proto.map_or("any".into(), crate::base::net::proto_name),
        dport: r.ports.first().map_or(0, |p| p.0),
        segment: seg.name.clone(),
        function: seg.function.clone(),
        rule: r.origin(),
        rule_id: r.id,
        generation: cur.generation,
        reason: format!(
            "maintenance window {} ({}) {}: {}, ticket {}; {} {when}",
            r.text(),
            w.text(),
            if open { "opened" } else { "closed" },
            w.reason,
            w.ticket,
            if open { "closes" } else { "opens next" }
        ),
        ..Default::default()
    }
}

/// `quarantine` / `quarantine_lifted` of a device.
fn quarantine_event(
    q: &Quarantined,
    on: bool,
    generation: u32,
    now: SystemTime,
) -> crate::base::event::Event {
    let ips: Vec<String> = q.ips.iter().map(|ip| ip.to_string()).collect();
    crate::base::event::Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        kind: if on { "quarantine" } else { "quarantine_lifted" }.into(),
        severity: if on { "medium" } else { "info" }.into(),
        time: rfc3339(now),
        src: ips.first().cloned().unwrap_or_default(),
        vlan: q.vlan,
        segment: q.segment.clone(),
        mac: Some(q.mac.clone()),
        generation,
        reason: if on {
            format!(
                "new device first seen {} after the learning period, not declared by the segment: quarantined \
                 ({}): only exempt traffic and quarantine_allow{} until it is moved to active",
                q.first_seen,
                q.mode,
                if q.mode == "monitor" { " pass silently, the rest is counted as would-drop" } else { "" }
            )
        } else {
            "out of quarantine: no longer an onboarding device the segment quarantines (moved to active, declared, \
             or the segment's policy changed)"
                .into()
        },
        ..Default::default()
    }
}

/// `exception_open` / `exception_close` of an on-demand exception.
fn grant_event(g: &Grant, open: bool, generation: u32, now: SystemTime) -> crate::base::event::Event {
    let how = match (&g.closed, open) {
        (_, true) => format!("opened by {} until {}", g.opened_by, g.expires),
        (Some(c), false) if c.by == "mdsec" && c.reason == "expired" => format!("expired at {}", g.expires),
        (Some(c), false) => format!("closed by {} before {}: {}", c.by, g.expires, c.reason),
        (None, false) => "no longer applied (see the policy diagnostics)".into(),
    };
    crate::base::event::Event {
        version: crate::base::event::EVENT_SCHEMA_VERSION,
        kind: if open { "exception_open" } else { "exception_close" }.into(),
        severity: "info".into(),
        time: rfc3339(now),
        dst: g.peer.clone(),
        proto: g.proto.map_or("any".into(), crate::base::net::proto_name),
        dport: g.ports.first().map_or(0, |p| p.0),
        segment: g.segment.clone(),
        rule: g.origin().display().to_string(),
        generation,
        reason: format!(
            "on-demand exception #{} {} ({}, ticket {}): {how}",
            g.id,
            g.text(),
            g.reason,
            g.ticket
        ),
        ..Default::default()
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((e.path(), m.modified().ok()?, m.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

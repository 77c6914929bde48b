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
    compile::{self, Compiled},
    maps::PolicyMaps,
    model::{self, Policy},
};
use crate::{
    base::clock::{Anchor, rfc3339},
    datapath::segstats::SegStats,
};

/// A generation as installed, kept so flows and events can be described.
#[derive(Debug)]
pub struct Installed {
    pub generation: u32,
    pub policy: Policy,
    pub compiled: Compiled,
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
}

/// Loads, validates and compiles; returns the diagnostics on failure.
pub fn prepare(dir: &Path, limits: compile::Limits) -> Result<(Policy, Compiled, Vec<String>), Vec<String>> {
    let (policy, diags) = model::load_dir(dir, SystemTime::now());
    let mut texts: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    let Some(policy) = policy else { return Err(texts) };
    match compile::compile(&policy, &Anchor::now(), limits) {
        Ok(c) => Ok((policy, c, texts)),
        Err(e) => {
            texts.push(format!("{}: {e}", dir.display()));
            Err(texts)
        }
    }
}

pub struct Reloader {
    maps: PolicyMaps,
    dir: PathBuf,
    event_rate: u32,
    state: Arc<RwLock<PolicyState>>,
    segstats: Arc<Mutex<SegStats>>,
}

impl Reloader {
    pub fn new(
        maps: PolicyMaps,
        dir: PathBuf,
        event_rate: u32,
        state: Arc<RwLock<PolicyState>>,
        segstats: Arc<Mutex<SegStats>>,
    ) -> Reloader {
        state.write().unwrap().status.policy_dir = Some(dir.display().to_string());
        Reloader { maps, dir, event_rate, state, segstats }
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
        let at = SystemTime::now();
        let now = rfc3339(at);
        let result =
            prepare(&self.dir, self.maps.limits()).and_then(|(p, c, diags)| match self.install(&p, &c) {
                Ok(g) => Ok((p, c, diags, g)),
                Err(e) => Err(vec![format!("installing the policy failed: {e:#}")]),
            });
        let mut st = self.state.write().unwrap();
        st.status.reloads += 1;
        st.status.last_reload = Some(now.clone());
        st.status.last_reload_at = Some(at);
        match result {
            Ok((policy, compiled, diags, generation)) => {
                for d in &diags {
                    warn!("policy: {d}");
                }
                info!(
                    "policy generation {generation} active: {} segments, {} rules, {} datapath entries",
                    policy.segments.len(),
                    policy.rules.len(),
                    compiled.policy.len()
                );
                st.previous = st.current.take();
                st.current = Some(Arc::new(Installed { generation, policy, compiled }));
                st.status.generation = generation;
                st.status.last_reload_ok = true;
                st.status.last_success = Some(now);
                st.status.last_success_at = Some(at);
                st.status.diagnostics = diags;
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
                    match triggers.recv_timeout(Duration::from_millis(500)) {
                        Ok(Trigger::Reload) => {
                            self.reload();
                            seen = fingerprint(&self.dir);
                            pending = None;
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

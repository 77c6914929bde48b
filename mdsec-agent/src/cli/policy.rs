//! `suggest`, `simulate` and `schema`: writing policy files, and judging one
//! before it is applied.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;

use super::{load_config, load_policy};
use crate::{
    detection::suggest::{self, Options},
    evidence::store::Store,
    policy::model::Mode,
};

/// An allow-list for `segment` from its learned baseline.
pub fn suggest(
    config: &Path,
    segment: &str,
    mode: Option<&str>,
    all: bool,
    out: Option<&PathBuf>,
) -> Result<ExitCode> {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Some(dir) = &cfg.policy_dir else {
        anyhow::bail!("{}: no policy_dir: suggest needs the segment's file", config.display());
    };
    let policy = match load_policy(dir) {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let rows = Store::open_existing(&cfg.state_dir)?.load_observations(Some(segment))?;
    let mode = mode.map(|m| if m == "enforce" { Mode::Enforce } else { Mode::Monitor });
    let now = crate::base::clock::rfc3339(std::time::SystemTime::now());
    let text = suggest::suggest(&policy, &rows, &Options { segment, mode, all, now })?;
    match out {
        None => print!("{text}"),
        Some(path) => {
            // Write beside the target, then rename: the agent's file watcher
            // must never read half a file.
            let tmp = path.with_extension("yaml.tmp~");
            std::fs::write(&tmp, &text).map_err(|e| anyhow::anyhow!("write {}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("rename to {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub struct SimulateArgs<'a> {
    pub config: &'a Path,
    pub policy: &'a Path,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub fail_on: &'a str,
    pub json: bool,
}

/// Exit status of a simulation in which a device at the threshold would be cut off.
pub const SIMULATE_DROPS: u8 = 3;

/// What the state database recorded: each segment's observations, and the
/// inventory (addresses' MACs and VLANs), read once per command.
struct Recorded {
    observations: Vec<(crate::detection::learn::ObsKey, crate::detection::learn::ObsVal)>,
    devices: Vec<crate::inventory::Device>,
}

impl Recorded {
    fn load(db: &Store) -> Result<Recorded> {
        Ok(Recorded { observations: db.load_observations(None)?, devices: db.load_devices()? })
    }
}

/// A policy directory loaded and compiled, and the recorded communication
/// judged under it; `Err` carries the exit code after its diagnostics.
fn simulation(
    cfg: &crate::config::Config,
    dir: &Path,
    rec: &Recorded,
    period: (Option<std::time::SystemTime>, Option<std::time::SystemTime>),
    threshold: Option<crate::detection::triage::Impact>,
) -> Result<(crate::policy::model::Policy, crate::evidence::simulate::Simulation), ExitCode> {
    use crate::evidence::simulate;
    let (policy, compiled, warnings) = crate::policy::runtime::prepare(
        dir,
        crate::policy::compile::Limits::DATAPATH,
        &cfg.change_control.load_options(),
    )
    .map_err(super::print_policy_diags)?;
    for w in warnings {
        eprintln!("{w}");
    }
    let s = simulate::simulate(
        &simulate::Inputs {
            policy: &policy,
            compiled: &compiled,
            observations: &rec.observations,
            devices: &rec.devices,
            triage: &cfg.triage,
            from: period.0,
            to: period.1,
            threshold,
        },
        &dir.display().to_string(),
    );
    Ok((policy, s))
}

pub fn simulate(a: &SimulateArgs) -> Result<ExitCode> {
    use crate::{detection::triage::Impact, evidence::simulate};
    let cfg = match load_config(a.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let when = |flag: &str, v: Option<&str>| {
        v.map(|t| crate::evidence::report::parse_when(t).map_err(|e| anyhow::anyhow!("{flag} {e}")))
            .transpose()
    };
    let (from, to) = (when("--from", a.from)?, when("--to", a.to)?);
    if let (Some(f), Some(t)) = (from, to) {
        anyhow::ensure!(f < t, "--from must be before --to");
    }
    let rec = Recorded::load(&Store::open_existing(&cfg.state_dir)?)?;
    let s = match simulation(&cfg, a.policy, &rec, (from, to), Impact::from_name(a.fail_on)) {
        Ok((_, s)) => s,
        Err(code) => return Ok(code),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", simulate::text(&s));
    }
    if s.dropped_at_threshold > 0 {
        eprintln!(
            "{} communication(s) of {} devices or worse would be dropped",
            s.dropped_at_threshold, s.threshold
        );
        return Ok(ExitCode::from(SIMULATE_DROPS));
    }
    Ok(ExitCode::SUCCESS)
}

/// The cutover report: the proposed policy against the active one (`policy_dir`).
pub fn cutover_report(config: &Path, proposed: &Path, format: &str, out: Option<&Path>) -> Result<ExitCode> {
    use crate::{detection::triage::Impact, evidence::cutover};
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let threshold = Some(Impact::LifeCritical);
    let db = Store::open_existing(&cfg.state_dir)?;
    let rec = Recorded::load(&db)?;
    let (new_policy, new_sim) = match simulation(&cfg, proposed, &rec, (None, None), threshold) {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    // The active policy as the agent loads it; one that no longer loads is
    // reported as absent (the agent keeps its last good generation).
    let active = cfg.policy_dir.as_deref().and_then(|dir| {
        let s = simulation(&cfg, dir, &rec, (None, None), threshold).ok();
        if s.is_none() {
            eprintln!("{}: the active policy does not load; comparing against no policy", dir.display());
        }
        s
    });
    let changed = cfg.policy_dir.as_deref().and_then(cutover::changed);
    let since = crate::base::clock::rfc3339(changed.unwrap_or(std::time::UNIX_EPOCH));
    let until =
        crate::base::clock::rfc3339(std::time::SystemTime::now() + std::time::Duration::from_secs(60));
    let events = db.events_between(&since, &until)?;
    let (active_policy, active_sim) = active.unzip();
    let c = cutover::build(cutover::Inputs {
        proposed_dir: proposed,
        proposed_policy: &new_policy,
        proposed: new_sim,
        active_dir: cfg.policy_dir.as_deref().filter(|_| active_policy.is_some()),
        active_policy: active_policy.as_ref(),
        active: active_sim,
        events: &events,
        active_changed: changed,
    })?;
    let text = match format {
        "json" => serde_json::to_string_pretty(&c)? + "\n",
        _ => cutover::html(&c),
    };
    super::write_out(out, &text)?;
    Ok(ExitCode::SUCCESS)
}

pub struct ApplyArgs<'a> {
    pub config: &'a Path,
    pub approved_by: &'a str,
    pub ticket: &'a str,
    pub content_hash: Option<&'a str>,
    pub dir: Option<&'a Path>,
}

/// Writes `text` to `path` through a temporary file beside it and a rename:
/// the agent's file watcher never reads half a file.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp~",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    std::fs::write(&tmp, text).map_err(|e| anyhow::anyhow!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("rename to {}: {e}", path.display()))
}

/// `policy apply`: the reviewed directory validated, copied into the
/// agent's `policy_dir`, and approved there by content hash.
pub fn apply(a: &ApplyArgs) -> Result<ExitCode> {
    use crate::policy::{approval, model::APPROVAL_FILE};
    let cfg = match load_config(a.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Some(target) = cfg.policy_dir.clone() else {
        anyhow::bail!("{}: no policy_dir: there is no policy to apply to", a.config.display());
    };
    for (flag, v) in [("--approved-by", a.approved_by), ("--ticket", a.ticket)] {
        anyhow::ensure!(!v.trim().is_empty(), "{flag} is empty");
        anyhow::ensure!(!v.contains(['\n', '\r']), "{flag}: one line only");
    }
    let source = a.dir.unwrap_or(&target);
    if let Err(diags) = crate::policy::runtime::prepare(
        source,
        crate::policy::compile::Limits::DATAPATH,
        &cfg.change_control.load_options(),
    ) {
        return Ok(super::print_policy_diags(diags));
    }
    let contents = approval::read(source)?;
    if let Some(h) = a.content_hash
        && h.trim().to_ascii_lowercase() != contents.hash
    {
        eprintln!(
            "{}: the files hash to {}, not {}: they changed since the review; nothing applied",
            source.display(),
            contents.hash,
            h.trim()
        );
        return Ok(ExitCode::FAILURE);
    }
    let same = |x: &Path, y: &Path| match (x.canonicalize(), y.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if !same(source, &target) {
        std::fs::create_dir_all(&target).map_err(|e| anyhow::anyhow!("create {}: {e}", target.display()))?;
        for (name, text) in &contents.files {
            write_atomic(&target.join(name), text)?;
        }
        // Files the reviewed directory does not have leave the policy.
        for old in approval::read(&target)?.files.keys().filter(|n| !contents.files.contains_key(*n)) {
            std::fs::remove_file(target.join(old))
                .map_err(|e| anyhow::anyhow!("remove {}: {e}", target.join(old).display()))?;
        }
        let now = approval::read(&target)?;
        anyhow::ensure!(
            now.hash == contents.hash,
            "{} changed while it was written ({}); run apply again",
            target.display(),
            approval::short(&now.hash)
        );
    }
    let approval = approval::Approval {
        content_hash: contents.hash.clone(),
        approved_by: a.approved_by.trim().to_string(),
        ticket: a.ticket.trim().to_string(),
        approved_at: Some(crate::base::clock::rfc3339(std::time::SystemTime::now())),
        at: (0, 0),
    };
    write_atomic(&target.join(APPROVAL_FILE), &approval::render(&approval))?;
    println!(
        "approved {} ({} files) by {} under {}: {} — the agent installs it within a second (or at SIGHUP)",
        contents.hash,
        contents.files.len(),
        approval.approved_by,
        approval.ticket,
        target.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `policy history`: the running agent's installed generations.
pub fn history(cursor: Option<u64>, limit: usize, q: &super::Query) -> Result<ExitCode> {
    let mut path = format!("/api/v1/policy/history?limit={limit}");
    if let Some(c) = cursor {
        path += &format!("&cursor={c}");
    }
    let page: serde_json::Value = q.get(&path)?;
    let rows: Vec<crate::policy::approval::Change> =
        serde_json::from_value(page.get("items").cloned().unwrap_or_default())?;
    let head = ["ID", "TIME", "GEN", "CONTENT", "CAUSE", "APPROVED BY", "TICKET", "CHANGE"];
    super::table::print(q.json, &rows, &head, |c| {
        let d = &c.diff;
        vec![
            c.id.to_string(),
            c.time.clone(),
            c.generation.to_string(),
            crate::policy::approval::short(&c.content_hash).to_string(),
            c.cause.clone(),
            c.approved_by.clone().unwrap_or_else(|| "-".into()),
            c.ticket.clone().unwrap_or_else(|| "-".into()),
            format!(
                "+{} -{} rules, {} files",
                d.rules_added.len() + d.exceptions_added.len(),
                d.rules_removed.len() + d.exceptions_removed.len(),
                d.files_added.len() + d.files_removed.len() + d.files_changed.len()
            ),
        ]
    })?;
    if let Some(next) = page.get("next").and_then(|n| n.as_str()) {
        eprintln!("more: --cursor {next}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes every published JSON Schema into `out`.
pub fn schema(out: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(out)?;
    for (name, text) in schemas() {
        std::fs::write(out.join(name), text)?;
        println!("{}", out.join(name).display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Every published JSON Schema (`deploy/schema/`): the policy files, events,
/// incidents, the register and the report.
pub fn schemas() -> Vec<(&'static str, String)> {
    let mut all = crate::policy::model::schemas();
    let s = schemars::schema_for!(crate::base::event::Event);
    all.push(("event.schema.json", serde_json::to_string_pretty(&s).unwrap() + "\n"));
    let s = schemars::schema_for!(crate::detection::incident::Incident);
    all.push(("incident.schema.json", serde_json::to_string_pretty(&s).unwrap() + "\n"));
    all.push(("register.schema.json", crate::evidence::register::schema()));
    all.push(("approval.schema.json", crate::policy::approval::schema()));
    all.push(("report.schema.json", crate::evidence::report::schema()));
    all
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_schemas_are_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (name, text) in super::schemas() {
            let path = root.join("deploy/schema").join(name);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == text,
                "{} is stale: run `mdsec-agent schema --out deploy/schema`",
                path.display()
            );
        }
    }
}

//! `report` and `register import`: compensating-controls evidence from the
//! state database, and the vulnerability register.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Result;

use super::{load_config, load_policy, load_register, write_out};
use crate::evidence::{register, report, report_render, store::Store};

pub struct ReportArgs<'a> {
    pub config: &'a Path,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub format: &'a str,
    pub out: Option<&'a Path>,
}

pub fn report(a: &ReportArgs) -> Result<ExitCode> {
    let cfg = match load_config(a.config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let now = SystemTime::now();
    let to = match a.to {
        Some(t) => report::parse_when(t).map_err(|e| anyhow::anyhow!("--to {e}"))?,
        None => now,
    };
    let from = match a.from {
        Some(f) => report::parse_when(f).map_err(|e| anyhow::anyhow!("--from {e}"))?,
        None => to - Duration::from_secs(30 * 86_400),
    };
    anyhow::ensure!(from < to, "--from must be before --to");
    let policy = match cfg.policy_dir.as_deref().map(load_policy).transpose() {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let reg = match cfg.register.as_deref().map(load_register).transpose() {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let db = Store::open_existing(&cfg.state_dir)?;
    let r = report::collect(
        &db,
        &cfg.triage,
        cfg.decommissioned_macs(),
        policy.as_ref(),
        reg.as_ref(),
        report::Period { from, to, now },
    )?;
    let text = match a.format {
        "json" => serde_json::to_string_pretty(&r)? + "\n",
        "md" => report_render::markdown(&r),
        _ => report_render::html(&r),
    };
    write_out(a.out, &text)?;
    Ok(ExitCode::SUCCESS)
}

pub fn import(csv: &PathBuf, out: Option<&Path>) -> Result<ExitCode> {
    let text = std::fs::read_to_string(csv).map_err(|e| anyhow::anyhow!("read {}: {e}", csv.display()))?;
    match register::import_csv(&text, &csv.display().to_string()) {
        Ok(yaml) => {
            write_out(out, &yaml)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

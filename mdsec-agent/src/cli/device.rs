//! `device set-state` and `device audit`: the lifecycle, through the running
//! agent's API.

use std::process::ExitCode;

use anyhow::Result;

use super::{Query, table};
use crate::{inventory::lifecycle::AuditRow, surfaces::client};

pub fn set_state(mac: &str, state: &str, reason: &str, actor: Option<String>, q: &Query) -> Result<ExitCode> {
    let actor = actor
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    let body = serde_json::json!({ "state": state, "reason": reason, "actor": actor });
    let (status, answer) = client::post_json(
        &q.endpoint()?,
        &format!("/api/v1/devices/{mac}/state"),
        q.token()?.as_deref(),
        &body,
    )?;
    if status != 200 {
        let msg = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).into());
        eprintln!("error: {mac}: {msg}");
        return Ok(ExitCode::FAILURE);
    }
    let row: AuditRow = serde_json::from_slice(&answer)?;
    println!("{}: {} → {} (audit #{}, {} by {})", row.mac, row.from, row.to, row.id, row.time, row.actor);
    Ok(ExitCode::SUCCESS)
}

pub fn audit(mac: Option<&str>, q: &Query) -> Result<ExitCode> {
    let path = match mac {
        Some(m) => format!("/api/v1/audit?mac={m}"),
        None => "/api/v1/audit".into(),
    };
    let rows: Vec<AuditRow> = q.get(&path)?;
    table::print(q.json, &rows, &["#", "TIME", "MAC", "FROM", "TO", "BY", "REASON"], |r| {
        vec![
            r.id.to_string(),
            r.time.clone(),
            r.mac.clone(),
            r.from.clone(),
            r.to.clone(),
            r.actor.clone(),
            r.reason.clone(),
        ]
    })?;
    Ok(ExitCode::SUCCESS)
}

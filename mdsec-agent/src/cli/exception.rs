//! `exception open|close|list`: on-demand access through the running agent's
//! API (`policy::ondemand`).

use std::process::ExitCode;

use anyhow::Result;

use super::{Query, table};
use crate::{
    policy::ondemand::{Grant, Request},
    surfaces::client,
};

/// Who is acting: `--by`, else the login that ran sudo, else the user.
fn actor(by: Option<String>) -> String {
    by.or_else(|| std::env::var("SUDO_USER").ok()).or_else(|| std::env::var("USER").ok()).unwrap_or_default()
}

/// The API's answer: the grant and its generation, or the error printed.
fn post(q: &Query, path: &str, body: &serde_json::Value) -> Result<Result<(Grant, u32), ExitCode>> {
    let (status, answer) = client::post_json(&q.endpoint()?, path, q.token()?.as_deref(), body)?;
    if !(200..300).contains(&status) || status == 202 {
        let msg = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer).into());
        eprintln!("error: {msg}");
        return Ok(Err(ExitCode::FAILURE));
    }
    let v: serde_json::Value = serde_json::from_slice(&answer)?;
    let g: Grant = serde_json::from_value(v["exception"].clone())?;
    Ok(Ok((g, v["generation"].as_u64().unwrap_or(0) as u32)))
}

pub fn open(mut req: Request, by: Option<String>, q: &Query) -> Result<ExitCode> {
    req.actor = actor(by);
    let (g, generation) = match post(q, "/api/v1/exceptions", &serde_json::to_value(&req)?)? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    if q.json {
        println!("{}", serde_json::to_string_pretty(&g)?);
    } else {
        println!(
            "on-demand exception #{} open in segment {}: {} until {} (ticket {}, generation {generation})",
            g.id,
            g.segment,
            g.text(),
            g.expires,
            g.ticket
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn close(id: u64, reason: &str, by: Option<String>, q: &Query) -> Result<ExitCode> {
    let body = serde_json::json!({ "reason": reason, "actor": actor(by) });
    let (g, generation) = match post(q, &format!("/api/v1/exceptions/{id}/close"), &body)? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    println!("on-demand exception #{} ({}) closed (generation {generation})", g.id, g.ticket);
    Ok(ExitCode::SUCCESS)
}

pub fn list(all: bool, q: &Query) -> Result<ExitCode> {
    let rows: Vec<Grant> = q.get(if all { "/api/v1/exceptions?all=true" } else { "/api/v1/exceptions" })?;
    table::print(
        q.json,
        &rows,
        &["#", "SEGMENT", "ACCESS", "UNTIL", "TICKET", "BY", "CLOSED", "REASON"],
        |g| {
            vec![
                g.id.to_string(),
                g.segment.clone(),
                g.text(),
                g.expires.clone(),
                g.ticket.clone(),
                g.opened_by.clone(),
                g.closed.as_ref().map_or("-".into(), |c| format!("{} by {}: {}", c.time, c.by, c.reason)),
                g.reason.clone(),
            ]
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

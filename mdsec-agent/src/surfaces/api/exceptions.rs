//! `/api/v1/exceptions`: on-demand access (`policy::ondemand`). Opening and
//! closing are recorded in the state database first, then installed by the
//! policy thread; the answer says which generation carries the change.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::{S, error};
use crate::{
    base::clock::rfc3339,
    evidence::store::Store,
    policy::{
        ondemand::{self, Closed, Grant},
        runtime::Trigger,
    },
    surfaces::state::AppState,
};

/// How long a request waits for the policy thread to install the change.
const INSTALL_WAIT: Duration = Duration::from_secs(10);

/// `GET /api/v1/exceptions[?all=true]`: open ones (or all), oldest first.
pub async fn list(
    axum::extract::State(st): S,
    axum::extract::Query(q): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let mut all = false;
    for (k, v) in &q {
        match (k.as_str(), v.as_str()) {
            ("all", "true") => all = true,
            ("all", "false") => all = false,
            ("all", _) => return error(StatusCode::BAD_REQUEST, "all: true or false"),
            _ => return error(StatusCode::BAD_REQUEST, format!("{k}: unknown parameter (all)")),
        }
    }
    let dir = st.state_dir.clone();
    match tokio::task::spawn_blocking(move || Store::open(&dir)?.grants(!all)).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Answer {
    pub exception: Grant,
    /// The policy generation that carries the change.
    pub generation: u32,
}

/// The policy thread, told to reinstall with the open exceptions: the
/// generation, or why not.
fn install(st: &AppState) -> Result<u32, (StatusCode, String)> {
    let Some(tx) = &st.policy_trigger else {
        return Err((StatusCode::CONFLICT, "no policy_dir is configured: there is no policy to open".into()));
    };
    let (atx, arx) = std::sync::mpsc::channel();
    tx.send(Trigger::Grants(Some(atx)))
        .map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "the policy thread has stopped".to_string()))?;
    match arx.recv_timeout(INSTALL_WAIT) {
        Ok(Ok(g)) => Ok(g),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(_) => Err((
            StatusCode::ACCEPTED,
            format!("recorded; the policy thread has not installed it within {} s", INSTALL_WAIT.as_secs()),
        )),
    }
}

/// `POST /api/v1/exceptions` with an `ondemand::Request`: 201 and the
/// installed grant; 400 bad input (naming the field); 409 no policy.
pub async fn open(axum::extract::State(st): S, body: axum::body::Bytes) -> Response {
    let req: ondemand::Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let Some(cur) = st.policy.read().unwrap().current.clone() else {
        return error(StatusCode::CONFLICT, "no policy generation is active");
    };
    let grant = match ondemand::validate(&req, &cur.policy, st.max_exception, std::time::SystemTime::now()) {
        Ok(g) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let st2: Arc<AppState> = st.clone();
    let r = tokio::task::spawn_blocking(move || {
        let mut db =
            Store::open(&st2.state_dir).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        let g = db.open_grant(&grant).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        match install(&st2) {
            Ok(generation) => Ok(Answer { exception: g, generation }),
            Err((code, msg)) if code != StatusCode::ACCEPTED => {
                // Not in force: recorded as closed, so it cannot open later
                // behind the operator's back.
                let c = Closed {
                    time: rfc3339(std::time::SystemTime::now()),
                    by: "mdsec".into(),
                    reason: format!("not installed: {msg}"),
                };
                let _ = db.close_grant(g.id, &c);
                Err((code, msg))
            }
            Err(e) => Err(e),
        }
    })
    .await;
    match r {
        Ok(Ok(a)) => (StatusCode::CREATED, Json(a)).into_response(),
        Ok(Err((code, msg))) => error(code, msg),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /api/v1/exceptions/{id}/close` with `{"reason", "actor"}`: 200 and
/// the closed grant; 404 unknown id; 409 closed before.
pub async fn close(
    axum::extract::State(st): S,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(StatusCode::BAD_REQUEST, format!("`{id}` is not an exception id"));
    };
    let req: ondemand::CloseRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let c = match req.closed(std::time::SystemTime::now()) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let st2 = st.clone();
    let r = tokio::task::spawn_blocking(move || {
        let mut db =
            Store::open(&st2.state_dir).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        let g = match db
            .close_grant(id, &c)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?
        {
            Ok(g) => g,
            Err(m) if m.starts_with("no ") => return Err((StatusCode::NOT_FOUND, m)),
            Err(m) => return Err((StatusCode::CONFLICT, m)),
        };
        let generation = install(&st2)?;
        Ok(Answer { exception: g, generation })
    })
    .await;
    match r {
        Ok(Ok(a)) => Json(a).into_response(),
        Ok(Err((code, msg))) => error(code, msg),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

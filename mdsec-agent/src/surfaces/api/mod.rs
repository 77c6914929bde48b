//! HTTP surface: `/api/v1/{flows,devices,stats,interfaces,events,policy,exceptions}`,
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! Every request passes the per-client rate limit and the size limits; `/api/*`
//! also needs the bearer token when one is configured. Every error is a JSON
//! `{"error": …}` with a 4xx status.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Request},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use mdsec_common::stats::Stat;

mod exceptions;
mod flows;
mod lists;
pub mod query;

pub use flows::{FlowMatch, FlowView};
pub use lists::{devices_page, events_page, flows_page};

use crate::{
    base::{clock::rfc3339, net::Mac},
    policy::runtime::PolicyState,
    surfaces::{model, state::AppState},
};

/// Largest request accepted: the API takes no uploads.
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024;
pub const MAX_URI_BYTES: usize = 4096;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(model::ApiError { error: msg.into() })).into_response()
}

/// Rate and size limits for every request.
async fn limits(
    axum::extract::State(st): S,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !st.limiter.lock().unwrap().allow(peer.ip(), Instant::now()) {
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded; retry in a second");
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    }
    if req.uri().to_string().len() > MAX_URI_BYTES {
        return error(StatusCode::URI_TOO_LONG, format!("request URI longer than {MAX_URI_BYTES} bytes"));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REQUEST_BYTES)
        || req.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {MAX_REQUEST_BYTES} bytes"),
        );
    }
    next.run(req).await
}

/// The request's bearer token equals `token` (compared in constant time).
fn bearer_is(req: &Request, token: &str) -> bool {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn unauthorized(msg: &str, scheme: &'static str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static(scheme));
    r
}

fn is_write(req: &Request) -> bool {
    !matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD)
}

/// `/api/*`: the bearer token when one is configured; and a write from
/// another host needs one configured at all (never an open write endpoint off
/// loopback, whatever `insecure_listen` says).
async fn auth(
    axum::extract::State(st): S,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    match &st.token {
        Some(token) if !bearer_is(&req, token) => {
            return unauthorized("missing or wrong bearer token", "Bearer");
        }
        None if is_write(&req) && !peer.ip().is_loopback() => {
            return error(
                StatusCode::FORBIDDEN,
                "writes from another host need the bearer token, and no api.token_file is configured",
            );
        }
        _ => {}
    }
    next.run(req).await
}

/// `/metrics`: open, unless `basic_auth_users` or `metrics_token` ask for a
/// basic-auth user or the bearer token.
async fn metrics_auth(axum::extract::State(st): S, req: Request, next: Next) -> Response {
    let token_ok = st.metrics_token && st.token.as_deref().is_some_and(|t| bearer_is(&req, t));
    if st.basic_auth.is_empty() && !st.metrics_token {
        return next.run(req).await;
    }
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let basic_ok = !st.basic_auth.is_empty() && header.starts_with("Basic ") && {
        // bcrypt is slow on purpose: off the async workers.
        let (st2, h) = (st.clone(), header.to_string());
        tokio::task::spawn_blocking(move || st2.basic_auth.allows(&h)).await.unwrap_or(false)
    };
    if token_ok || basic_ok {
        return next.run(req).await;
    }
    let scheme = if st.basic_auth.is_empty() { "Bearer" } else { "Basic realm=\"mdsec\"" };
    unauthorized("/metrics needs credentials (api.basic_auth_users or the bearer token)", scheme)
}

/// Every write attempt to `/api/*`, refused ones included, is logged and
/// kept in the state database's append-only `api_writes` table.
async fn audit_writes(
    axum::extract::State(st): S,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !is_write(&req) {
        return next.run(req).await;
    }
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let r = next.run(req).await;
    let w = crate::evidence::store::ApiWrite {
        id: 0,
        time: rfc3339(std::time::SystemTime::now()),
        client: peer.ip().to_string(),
        method,
        path,
        status: r.status().as_u16(),
    };
    log::info!("api write: {} {} {} from {} → {}", w.time, w.method, w.path, w.client, w.status);
    let dir = st.state_dir.clone();
    let saved =
        tokio::task::spawn_blocking(move || crate::evidence::store::Store::open(&dir)?.record_api_write(&w))
            .await;
    if !matches!(saved, Ok(Ok(()))) {
        log::warn!("recording an API write in the state database failed: {saved:?}");
    }
    r
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/v1/flows", get(lists::flows))
        .route("/api/v1/devices", get(lists::devices))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/interfaces", get(interfaces))
        .route("/api/v1/events", get(lists::events))
        .route("/api/v1/incidents", get(lists::incidents))
        .route("/api/v1/policy", get(policy_status))
        .route("/api/v1/policy/history", get(policy_history))
        .route("/api/v1/baseline", get(baseline))
        .route("/api/v1/devices/{mac}/state", axum::routing::post(set_state))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/exceptions", get(exceptions::list).post(exceptions::open))
        .route("/api/v1/quarantine", get(quarantine))
        .route("/api/v1/exceptions/{id}/close", axum::routing::post(exceptions::close))
        .route("/api/v1/writes", get(writes))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        // Outside the token check, so refused writes are audited too.
        .route_layer(middleware::from_fn_with_state(state.clone(), audit_writes));
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), metrics_auth));
    Router::new()
        .merge(api)
        .merge(metrics)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed") })
        .layer(middleware::from_fn_with_state(state.clone(), limits))
        .with_state(state)
}

/// Serves the API on `listener`: over TLS when `tls` is given (a plain-HTTP
/// client then fails its handshake and is dropped; others are unaffected).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<AppState>,
) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => axum::serve(listener, app).await,
        Some(cfg) => {
            let config = axum_server::tls_rustls::RustlsConfig::from_config(cfg);
            axum_server::from_tcp_rustls(listener.into_std()?, config)?.serve(app).await
        }
    }
}

async fn metrics(axum::extract::State(st): S) -> Response {
    let body = tokio::task::spawn_blocking(move || crate::surfaces::metrics::render(&st)).await;
    match body {
        Ok(b) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], b).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering metrics failed: {e}")),
    }
}

type S = axum::extract::State<Arc<AppState>>;

async fn stats(axum::extract::State(st): S) -> Json<model::Stats> {
    let t = st.tables.read().unwrap();
    Json(
        Stat::ALL
            .iter()
            .map(|s| {
                let c = t.stat(*s);
                (s.name().to_string(), model::Count { packets: c.packets, bytes: c.bytes })
            })
            .collect(),
    )
}

async fn interfaces(axum::extract::State(st): S) -> Json<Vec<model::Interface>> {
    Json(
        st.attached
            .iter()
            .map(|a| model::Interface {
                name: a.name.clone(),
                ifindex: a.ifindex,
                role: format!("{:?}", a.role).to_lowercase(),
                requested_mode: a.requested_mode.to_string(),
                effective_mode: a.effective_mode.clone(),
                bridge: a.bridge.clone(),
                peer: a.peer.clone(),
            })
            .collect(),
    )
}

pub(crate) fn describe_rule(p: &PolicyState, generation: u32, rule: u32) -> String {
    if rule == 0 {
        return "default".into();
    }
    p.generation(generation)
        .and_then(|i| i.policy.rules.iter().find(|r| r.id == rule))
        .map(|r| r.origin())
        .unwrap_or_else(|| format!("rule {rule} of generation {generation}"))
}

async fn policy_status(axum::extract::State(st): S) -> Json<crate::policy::runtime::Status> {
    Json(st.policy.read().unwrap().status.clone())
}

/// `GET /api/v1/policy/history?cursor=ID&limit=N&files=true`: installed
/// generations, oldest first, `{"items": [...], "next": ID}`; file texts only
/// with `files=true`.
async fn policy_history(
    axum::extract::State(st): S,
    axum::extract::Query(q): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let (mut after, mut limit, mut files) = (0u64, query::DEFAULT_LIMIT, false);
    for (k, v) in &q {
        let bad = |m: &str| error(StatusCode::BAD_REQUEST, format!("{k}: {m}"));
        match k.as_str() {
            "cursor" => match v.parse() {
                Ok(n) => after = n,
                Err(_) => return bad("not a history id"),
            },
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=query::MAX_LIMIT).contains(&n) => limit = n,
                _ => return bad(&format!("not a number from 1 to {}", query::MAX_LIMIT)),
            },
            "files" => match v.as_str() {
                "true" => files = true,
                "false" => files = false,
                _ => return bad("true or false"),
            },
            _ => return bad("unknown parameter (cursor, limit, files)"),
        }
    }
    let dir = st.state_dir.clone();
    let rows = tokio::task::spawn_blocking(move || {
        crate::evidence::store::Store::open(&dir)?.policy_history(after, limit + 1)
    })
    .await;
    match rows {
        Ok(Ok(mut rows)) => {
            let next = (rows.len() > limit).then(|| rows[limit - 1].id.to_string());
            rows.truncate(limit);
            if !files {
                rows.iter_mut().flat_map(|c| c.files.iter_mut()).for_each(|f| f.text = None);
            }
            Json(serde_json::json!({ "items": rows, "next": next })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /api/v1/devices/{mac}/state` with `{"state", "reason", "actor"}`: one
/// lifecycle change, audited. 400 bad input, 404 device never seen, 409 not a
/// lifecycle transition (nothing changes).
async fn set_state(
    axum::extract::State(st): S,
    axum::extract::Path(mac): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let mac = match mac.parse::<Mac>() {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let change: crate::inventory::lifecycle::Change = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let Some(to) = crate::inventory::lifecycle::State::from_name(&change.state) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "`{}` is not a lifecycle state (onboarding, active, exception, decommissioned)",
                change.state
            ),
        );
    };
    // Seen by the datapath in this run, or stored by an earlier one.
    let known = st.tables.read().unwrap().devices.keys().any(|k| k.mac == mac.0)
        || st.history.read().unwrap().keys().any(|id| id.mac == mac);
    if !known {
        return error(StatusCode::NOT_FOUND, format!("no device {mac} in the inventory"));
    }
    let dir = st.state_dir.clone();
    let st2 = st.clone();
    let res = tokio::task::spawn_blocking(move || {
        let mut db = crate::evidence::store::Store::open(&dir)
            .map_err(|e| crate::inventory::lifecycle::ChangeError::Database(format!("{e:#}")))?;
        let now = rfc3339(std::time::SystemTime::now());
        let actor = if change.actor.trim().is_empty() { "unknown".to_string() } else { change.actor.clone() };
        let row = db.set_lifecycle(&mac.to_string(), to, change.reason.trim(), &actor, &now)?;
        let records = db
            .lifecycle()
            .map_err(|e| crate::inventory::lifecycle::ChangeError::Database(format!("{e:#}")))?;
        *st2.lifecycle.write().unwrap() = records;
        // Readers see the new state now, not at the next store pass.
        st2.rebuild_inventory();
        Ok::<_, crate::inventory::lifecycle::ChangeError>(row)
    })
    .await;
    use crate::inventory::lifecycle::ChangeError;
    match res {
        Ok(Ok(row)) => {
            log::info!("lifecycle: {} {} → {} by {}: {}", row.mac, row.from, row.to, row.actor, row.reason);
            Json(row).into_response()
        }
        Ok(Err(ChangeError::Invalid(m))) => error(StatusCode::CONFLICT, m),
        Ok(Err(ChangeError::Bad(m))) => error(StatusCode::BAD_REQUEST, m),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("lifecycle change failed: {e}")),
    }
}

/// `GET /api/v1/audit[?mac=…]`: the lifecycle audit trail, oldest first.
async fn audit(
    axum::extract::State(st): S,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let dir = st.state_dir.clone();
    let mac = q.get("mac").map(|m| crate::base::net::parse_mac(m).map(crate::base::net::mac_string));
    if let Some(None) = mac {
        return error(StatusCode::BAD_REQUEST, "mac: not a MAC address");
    }
    let mac = mac.flatten();
    match tokio::task::spawn_blocking(move || {
        crate::evidence::store::Store::open(&dir)?.audit(mac.as_deref())
    })
    .await
    {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/writes`: every API write attempt, oldest first.
async fn writes(axum::extract::State(st): S) -> Response {
    let dir = st.state_dir.clone();
    match tokio::task::spawn_blocking(move || crate::evidence::store::Store::open(&dir)?.api_writes()).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/quarantine`: the devices the active generation quarantines.
async fn quarantine(axum::extract::State(st): S) -> Json<Vec<crate::policy::quarantine::Quarantined>> {
    Json(st.policy.read().unwrap().current.as_ref().map(|c| c.policy.quarantined.clone()).unwrap_or_default())
}

async fn baseline(axum::extract::State(st): S) -> Json<crate::detection::learn::Status> {
    Json(st.baseline.read().unwrap().clone())
}

/// Ready once the datapath is attached everywhere and the first poll has landed.
async fn ready(axum::extract::State(st): S) -> impl IntoResponse {
    let polled = !st.tables.read().unwrap().stats.is_empty();
    let policy_ok = !st.policy_configured || st.policy.read().unwrap().status.generation != 0;
    if polled && policy_ok && !st.attached.is_empty() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

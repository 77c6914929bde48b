//! HTTP surface: `/api/v1/{flows,devices,stats,interfaces,events,policy}`,
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! Every request passes the per-client rate limit and the size limits; `/api/*`
//! also needs the bearer token when one is configured. Every error is a JSON
//! `{"error": …}` with a 4xx status.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Request},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use mdsec_common::{
    app::{App, Confidence},
    stats::Stat,
};

mod flows;
mod lists;
pub mod query;

pub use flows::{FlowMatch, FlowView};
pub use lists::{devices_page, events_page, flows_page};

use crate::{
    clock::{Anchor, rfc3339},
    events::EventStore,
    loader::Attached,
    model::{self, mac_string},
    oui::Oui,
    policy::runtime::PolicyState,
    state::Tables,
};

pub struct AppState {
    pub tables: Arc<RwLock<Tables>>,
    pub attached: Vec<Attached>,
    pub policy: Arc<RwLock<PolicyState>>,
    pub events: Arc<RwLock<EventStore>>,
    /// A policy directory is configured (then readiness needs a loaded policy).
    pub policy_configured: bool,
    pub oui: Arc<Oui>,
    pub fingerprints: crate::samples::Fingerprints,
    /// Operator overrides by MAC, spelled as `model::mac_string` does.
    pub overrides: HashMap<String, crate::clinical::Override>,
    /// Devices from the state database (earlier runs), by (iface, vlan, mac).
    pub history: RwLock<HashMap<(String, u16, String), model::Device>>,
    /// The inventory as last computed by the store thread (for metrics).
    pub inventory: RwLock<Vec<model::Device>>,
    pub segstats: Arc<Mutex<crate::segstats::SegStats>>,
    pub map_sizes: crate::config::MapSizes,
    pub started: SystemTime,
    pub export_stats: Arc<crate::export::ExportStats>,
    /// Bearer token `/api/*` requires, if configured.
    pub token: Option<String>,
    pub limiter: Mutex<Limiter>,
    /// Learning state and baseline size per segment, as of the last store pass.
    pub baseline: RwLock<crate::learn::Status>,
    /// Lifecycle rows by MAC (state database; refreshed each store pass and on change).
    pub lifecycle: RwLock<HashMap<String, crate::lifecycle::Record>>,
    /// Register findings and lifecycle states, for metrics.
    pub evidence: RwLock<crate::evidence::EvidenceStatus>,
    /// Where the state database lives (lifecycle changes open their own connection).
    pub state_dir: std::path::PathBuf,
}

impl AppState {
    /// A state serving `tables` with nothing else configured: no interfaces,
    /// policy or database (the scale benchmark serves its tables with it).
    pub fn bare(
        tables: Arc<RwLock<Tables>>,
        segstats: Arc<Mutex<crate::segstats::SegStats>>,
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
            segstats,
            map_sizes: crate::config::MapSizes::default(),
            started: SystemTime::now(),
            export_stats: Default::default(),
            token: None,
            limiter: Mutex::new(Limiter::new(1_000_000, 1_000_000)),
            baseline: Default::default(),
            lifecycle: Default::default(),
            evidence: Default::default(),
            state_dir,
        }
    }
}

/// Token bucket per client address. The table is bounded: when full, clients
/// whose bucket has refilled are forgotten (they would start full anyway).
pub struct Limiter {
    per_sec: f64,
    burst: f64,
    clients: HashMap<IpAddr, (f64, Instant)>,
}

/// Client addresses tracked by the limiter.
const LIMITER_CLIENTS: usize = 4096;

impl Limiter {
    pub fn new(per_sec: u32, burst: u32) -> Limiter {
        Limiter { per_sec: per_sec as f64, burst: burst as f64, clients: HashMap::new() }
    }

    /// Takes one token for `ip`; false when the client is over its rate.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.clients.len() >= LIMITER_CLIENTS && !self.clients.contains_key(&ip) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.clients
                .retain(|_, (tokens, t)| *tokens + now.duration_since(*t).as_secs_f64() * per_sec < burst);
            if self.clients.len() >= LIMITER_CLIENTS {
                return false;
            }
        }
        let (tokens, t) = self.clients.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*t).as_secs_f64() * self.per_sec).min(self.burst);
        *t = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

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

/// Bearer token check for `/api/*`, in constant time.
async fn auth(axum::extract::State(st): S, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let same = given.len() == token.len()
            && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !same {
            let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

impl AppState {
    fn ifname(&self, ifindex: u32) -> String {
        ifname(&self.attached, ifindex)
    }
}

/// An interface's name, or `if<index>` for one not attached (any more).
fn ifname(attached: &[Attached], ifindex: u32) -> String {
    attached
        .iter()
        .find(|a| a.ifindex == ifindex)
        .map(|a| a.name.clone())
        .unwrap_or_else(|| format!("if{ifindex}"))
}

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/v1/flows", get(lists::flows))
        .route("/api/v1/devices", get(lists::devices))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/interfaces", get(interfaces))
        .route("/api/v1/events", get(lists::events))
        .route("/api/v1/policy", get(policy_status))
        .route("/api/v1/baseline", get(baseline))
        .route("/api/v1/devices/{mac}/state", axum::routing::post(set_state))
        .route("/api/v1/audit", get(audit))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed") })
        .layer(middleware::from_fn_with_state(state.clone(), limits))
        .with_state(state)
}

pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    axum::serve(listener, router(state).into_make_service_with_connect_info::<SocketAddr>()).await
}

async fn metrics(axum::extract::State(st): S) -> Response {
    let body = tokio::task::spawn_blocking(move || crate::metrics::render(&st)).await;
    match body {
        Ok(b) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], b).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering metrics failed: {e}")),
    }
}

type S = axum::extract::State<Arc<AppState>>;

/// Peers listed per device.
const MAX_PEERS: usize = 32;

pub fn devices_json(st: &AppState) -> Vec<model::Device> {
    let anchor = Anchor::now();
    let t = st.tables.read().unwrap();
    // Which device owns an address (on its interface and VLAN), by device index.
    let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::new();
    for (i, _, d) in t.devices.iter() {
        for ip in &d.ips {
            by_ip.entry(*ip).or_default().push(i as usize);
        }
    }
    let n = t.devices.len();
    let mut client: Vec<BTreeSet<String>> = vec![BTreeSet::new(); n];
    let mut server: Vec<BTreeSet<String>> = vec![BTreeSet::new(); n];
    let mut peers: Vec<BTreeSet<IpAddr>> = vec![BTreeSet::new(); n];
    for (fk, r) in t.flows.iter() {
        // Client → server direction: services listen on the lower port (ephemeral
        // ports are high), so a flow from the lower port is a server's answer.
        let (src, dst) = if fk.sport < fk.dport && matches!(fk.proto, 6 | 17) {
            (fk.dst_ip(), fk.src_ip())
        } else {
            (fk.src_ip(), fk.dst_ip())
        };
        let app =
            (Confidence::from_u8(r.app_confidence) != Confidence::None).then(|| App::from_u8(r.app).name());
        let sender = src == fk.src_ip();
        for &i in by_ip.get(&src).into_iter().flatten() {
            // The sender is on the flow's interface; the other end may be anywhere.
            let k = t.devices.key(i as u32);
            if !sender || (k.ifindex == fk.ifindex && k.vlan == fk.vlan) {
                if let Some(a) = app {
                    client[i].insert(a.to_string());
                }
                if peers[i].len() < MAX_PEERS {
                    peers[i].insert(dst);
                }
            }
        }
        for &i in by_ip.get(&dst).into_iter().flatten() {
            if let Some(a) = app {
                server[i].insert(a.to_string());
            }
            if peers[i].len() < MAX_PEERS {
                peers[i].insert(src);
            }
        }
    }
    let fps = st.fingerprints.read().unwrap();
    let mut out: Vec<_> = t
        .devices
        .iter()
        .map(|(i, k, r)| {
            let i = i as usize;
            let tot = r.totals();
            model::Device {
                iface: st.ifname(k.ifindex),
                vlan: k.vlan,
                mac: mac_string(k.mac),
                vendor: st.oui.vendor(k.mac),
                ips: r.ips.iter().map(|ip| ip.to_string()).collect(),
                apps_client: client[i].iter().cloned().collect(),
                apps_server: server[i].iter().cloned().collect(),
                peers: peers[i].iter().map(|p| p.to_string()).collect(),
                fingerprints: fps.get(&(k.ifindex, k.vlan, k.mac)).cloned().unwrap_or_default(),
                packets: tot.packets,
                bytes: tot.bytes,
                first_seen: rfc3339(anchor.wall(r.first_seen_ns)),
                last_seen: rfc3339(anchor.wall(r.last_seen_ns)),
                // Class, evidence and overrides are filled in below.
                ..Default::default()
            }
        })
        .collect();
    merge_history(&mut out, &st.history.read().unwrap());
    let policy = st.policy.read().unwrap().current.clone();
    let lifecycle = st.lifecycle.read().unwrap();
    for d in &mut out {
        classify_device(d, st.overrides.get(&d.mac));
        let decommissioned = st.overrides.get(&d.mac).is_some_and(|o| o.decommissioned);
        d.lifecycle = crate::lifecycle::effective(&lifecycle, decommissioned, &d.mac).name().into();
        d.segment = policy
            .as_ref()
            .and_then(|p| crate::devwatch::segment_of(&p.policy, d))
            .map(|(s, _)| s.name.clone());
    }
    out.sort_by(|a, b| (&a.iface, a.vlan, &a.mac).cmp(&(&b.iface, b.vlan, &b.mac)));
    out
}

fn classify_device(d: &mut model::Device, over: Option<&crate::clinical::Override>) {
    let v = crate::clinical::classify(d.vendor.as_deref(), &d.apps_client, &d.apps_server);
    (d.class, d.confidence, d.evidence) = (v.class.name().into(), v.confidence, v.evidence);
    if let Some(o) = over {
        if let Some(c) = o.class {
            d.class = c.name().into();
            d.confidence = 1.0;
            d.evidence = vec!["operator override".into()];
        }
        d.name = o.name.clone();
        d.model = o.model.clone();
    }
}

/// Devices seen in earlier runs keep their first sighting and addresses; those not
/// seen in this run are listed with what was last stored.
fn merge_history(out: &mut Vec<model::Device>, history: &HashMap<(String, u16, String), model::Device>) {
    let mut seen = BTreeSet::new();
    for d in out.iter_mut() {
        let key = (d.iface.clone(), d.vlan, d.mac.clone());
        if let Some(h) = history.get(&key) {
            d.first_seen = d.first_seen.clone().min(h.first_seen.clone());
            for ip in &h.ips {
                if !d.ips.contains(ip) {
                    d.ips.push(ip.clone());
                }
            }
            for (k, v) in &h.fingerprints {
                d.fingerprints.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        seen.insert(key);
    }
    out.extend(history.iter().filter(|(k, _)| !seen.contains(*k)).map(|(_, d)| d.clone()));
}

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

/// `POST /api/v1/devices/{mac}/state` with `{"state", "reason", "actor"}`: one
/// lifecycle change, audited. 400 bad input, 404 device never seen, 409 not a
/// lifecycle transition (nothing changes).
async fn set_state(
    axum::extract::State(st): S,
    axum::extract::Path(mac): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(mac) = crate::model::parse_mac(&mac).map(crate::model::mac_string) else {
        return error(StatusCode::BAD_REQUEST, format!("`{mac}` is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    };
    let change: crate::lifecycle::Change = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let Some(to) = crate::lifecycle::State::from_name(&change.state) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "`{}` is not a lifecycle state (onboarding, active, exception, decommissioned)",
                change.state
            ),
        );
    };
    // Seen by the datapath in this run, or stored by an earlier one.
    let known = st.tables.read().unwrap().devices.keys().any(|k| mac_string(k.mac) == mac)
        || st.history.read().unwrap().keys().any(|(_, _, m)| *m == mac);
    if !known {
        return error(StatusCode::NOT_FOUND, format!("no device {mac} in the inventory"));
    }
    let dir = st.state_dir.clone();
    let st2 = st.clone();
    let res = tokio::task::spawn_blocking(move || {
        let mut db = crate::store::Store::open(&dir)
            .map_err(|e| crate::lifecycle::ChangeError::Database(format!("{e:#}")))?;
        let now = rfc3339(std::time::SystemTime::now());
        let actor = if change.actor.trim().is_empty() { "unknown".to_string() } else { change.actor.clone() };
        let row = db.set_lifecycle(&mac, to, change.reason.trim(), &actor, &now)?;
        let records =
            db.lifecycle().map_err(|e| crate::lifecycle::ChangeError::Database(format!("{e:#}")))?;
        *st2.lifecycle.write().unwrap() = records;
        Ok::<_, crate::lifecycle::ChangeError>(row)
    })
    .await;
    use crate::lifecycle::ChangeError;
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
    let mac = q.get("mac").map(|m| crate::model::parse_mac(m).map(crate::model::mac_string));
    if let Some(None) = mac {
        return error(StatusCode::BAD_REQUEST, "mac: not a MAC address");
    }
    let mac = mac.flatten();
    match tokio::task::spawn_blocking(move || crate::store::Store::open(&dir)?.audit(mac.as_deref())).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn baseline(axum::extract::State(st): S) -> Json<crate::learn::Status> {
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

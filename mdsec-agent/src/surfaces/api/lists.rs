//! The list endpoints: `/api/v1/flows`, `/devices`, `/events`, `/incidents`. Each parses its
//! query in one step ([`query::parse`]), then answers a page (a JSON array;
//! `X-Next-Cursor` and a `Link: rel="next"` header when more may follow) or,
//! with `format=ndjson`, one JSON object per line. Work that scans tables runs
//! on a blocking thread.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Json,
    body::Body,
    extract::{Query as RawQuery, State, rejection::QueryRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;

use super::{
    error,
    flows::{self, FlowMatch, FlowView},
    query::{self, BadParam, Cursor, Endpoint, Query},
};
use crate::{
    base::{clock::Anchor, net::Mac},
    datapath::state::Tables,
    inventory::Device,
    surfaces::{model, state::AppState},
};

type Pairs = Result<RawQuery<Vec<(String, String)>>, QueryRejection>;

/// One page of a list and the cursor of the next, if more may follow.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// Records looked at per lock hold while streaming (the poller's merge waits
/// for at most one such step).
const STREAM_STEP: usize = 65_536;
/// Flows per encoded chunk (about 1.3 MiB of NDJSON).
const STREAM_CHUNK: usize = 4096;
/// Encoded chunks in flight to a slow client: memory stays bounded.
const STREAM_QUEUE: usize = 4;

/// The query, or the 400 message naming what is wrong with it.
fn parsed(ep: Endpoint, pairs: Pairs) -> Result<(Query, Vec<(String, String)>), String> {
    let RawQuery(pairs) = pairs.map_err(|e| format!("bad query string: {e}"))?;
    match query::parse(ep, &pairs, SystemTime::now()) {
        Ok(q) => Ok((q, pairs)),
        Err(e) => Err(e.to_string()),
    }
}

fn bad_param(e: BadParam) -> Response {
    error(StatusCode::BAD_REQUEST, e.to_string())
}

/// The page as a JSON array, with the next cursor in `X-Next-Cursor` and
/// `Link` (the same query with the cursor replaced).
fn page_response<T: serde::Serialize>(
    path: &str,
    pairs: &[(String, String)],
    cursor: &str,
    p: Page<T>,
) -> Response {
    let mut r = Json(p.items).into_response();
    if let Some(next) = p.next {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs.iter().filter(|(k, v)| k != cursor && !(k == "since" && v.parse::<u64>().is_ok()))
        {
            q.append_pair(k, v);
        }
        q.append_pair(cursor, &next);
        let link = format!("<{path}?{}>; rel=\"next\"", q.finish());
        if let (Ok(n), Ok(l)) = (HeaderValue::from_str(&next), HeaderValue::from_str(&link)) {
            r.headers_mut().insert("x-next-cursor", n);
            r.headers_mut().insert(header::LINK, l);
        }
    }
    r
}

/// Appends `item` as one NDJSON line.
fn push_line<T: serde::Serialize>(out: &mut Vec<u8>, item: &T) {
    // Serializing our own types into a Vec cannot fail.
    serde_json::to_writer(&mut *out, item).expect("serialize");
    out.push(b'\n');
}

fn ndjson(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("request failed: {e}")))
}

/// A list endpoint's answer to a parsed query: the page, built on a blocking
/// thread, as JSON, or (with `format=ndjson`) every item as NDJSON.
async fn answer<T: serde::Serialize + Send + 'static>(
    st: Arc<AppState>,
    ep: Endpoint,
    cursor_param: &str,
    (q, pairs): (Query, Vec<(String, String)>),
    page: fn(&AppState, &Query) -> Result<Page<T>, BadParam>,
) -> Response {
    let as_ndjson = q.ndjson;
    match blocking(move || page(&st, &q)).await {
        Ok(Ok(p)) if as_ndjson => {
            let mut out = Vec::new();
            p.items.iter().for_each(|i| push_line(&mut out, i));
            ndjson(Body::from(out))
        }
        Ok(Ok(p)) => page_response(ep.path(), &pairs, cursor_param, p),
        Ok(Err(e)) => bad_param(e),
        Err(r) => r,
    }
}

/// The first `limit` of `items` (all without a limit), and the cursor of the
/// last when more follow.
fn take_page<T>(
    items: impl Iterator<Item = T>,
    limit: Option<usize>,
    cursor: impl Fn(&T) -> String,
) -> Page<T> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut items = items.peekable();
    let page: Vec<T> = items.by_ref().take(limit).collect();
    let next = items.peek().is_some().then(|| page.last().map(cursor)).flatten();
    Page { items: page, next }
}

/// `iface=` and `segment=` must name an attached interface and a segment of
/// the policy, whatever the list.
fn check_names(st: &AppState, f: &query::Filter) -> Result<(), BadParam> {
    if let Some(n) = &f.iface {
        flows::ifindex(n, &st.attached)?;
    }
    if let Some(n) = &f.segment {
        flows::check_segment(n, &st.policy.read().unwrap())?;
    }
    Ok(())
}

/// Runs `f` over the flow records with `filter` resolved, under the policy and
/// tables read locks (taken in that order, as everywhere).
fn with_flows<R>(
    st: &AppState,
    filter: &query::Filter,
    f: impl FnOnce(&Tables, &FlowMatch, &FlowView) -> R,
) -> Result<R, BadParam> {
    let anchor = Anchor::now();
    let policy = st.policy.read().unwrap();
    let t = st.tables.read().unwrap();
    let m = FlowMatch::new(filter, &t, &policy, &st.attached, &anchor)?;
    Ok(f(&t, &m, &FlowView { anchor, policy: &policy, attached: &st.attached }))
}

/// One page of flows, in the order the agent first saw them.
pub fn flows_page(st: &AppState, q: &Query) -> Result<Page<model::Flow>, BadParam> {
    let limit = q.limit.unwrap_or(query::MAX_LIMIT);
    let (items, more) =
        with_flows(st, &q.filter, |t, m, view| flows::page(t, m, view, q.cursor.id(), limit))?;
    let next = more.then(|| items.last().map(|(id, _)| id.to_string())).flatten();
    Ok(Page { next, items: items.into_iter().map(|(_, f)| f).collect() })
}

pub(super) async fn flows(State(st): State<Arc<AppState>>, pairs: Pairs) -> Response {
    match parsed(Endpoint::Flows, pairs) {
        Ok((q, _)) if q.ndjson => stream_flows(st, q).await,
        Ok(q) => answer(st, Endpoint::Flows, "cursor", q, flows_page).await,
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

/// Streams every matching flow as NDJSON: a blocking thread walks the records
/// in steps (one lock hold each) and hands encoded chunks to a bounded queue,
/// so memory does not grow with the table and the poller is never held up for
/// long. A flow that exists for the whole export is sent exactly once.
async fn stream_flows(st: Arc<AppState>, q: Query) -> Response {
    // Resolve the filter first, so a bad name is a 400 before any body is sent.
    let check = {
        let (st, f) = (st.clone(), q.filter.clone());
        blocking(move || with_flows(&st, &f, |_, _, _| ())).await
    };
    match check {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return bad_param(e),
        Err(r) => return r,
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_QUEUE);
    tokio::task::spawn_blocking(move || {
        let (mut after, mut left) = (q.cursor.id(), q.limit.unwrap_or(usize::MAX));
        let mut chunk = Vec::new();
        loop {
            // Encoded as found: no list of flows is built.
            let step = with_flows(&st, &q.filter, |t, m, view| {
                flows::step(t, m, view, after, left.min(STREAM_CHUNK), STREAM_STEP, |f| {
                    push_line(&mut chunk, &f)
                })
            });
            let Ok(s) = step else { return };
            left -= s.found;
            after = s.last;
            if !chunk.is_empty() && tx.blocking_send(Bytes::from(std::mem::take(&mut chunk))).is_err() {
                return; // The client went away.
            }
            if s.end || left == 0 {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    ndjson(Body::from_stream(body))
}

/// `iface/vlan/mac`: a device's place in the list's order.
fn device_cursor(d: &Device) -> String {
    format!("{}/{}/{}", d.iface, d.vlan, d.mac)
}

/// One page of devices, ordered by interface, VLAN and MAC: from the
/// inventory snapshot, as documents.
pub fn devices_page(st: &AppState, q: &Query) -> Result<Page<model::Device>, BadParam> {
    let f = &q.filter;
    check_names(st, f)?;
    let after = match &q.cursor {
        Cursor::Key(c) => {
            let mut it = c.splitn(3, '/');
            match (it.next(), it.next().and_then(|v| v.parse::<u16>().ok()), it.next().map(str::parse::<Mac>))
            {
                (Some(i), Some(v), Some(Ok(m))) => Some((i.to_string(), v, m)),
                _ => {
                    return Err(BadParam {
                        param: "cursor".into(),
                        message: format!("`{c}` is not a cursor this endpoint gave"),
                    });
                }
            }
        }
        _ => None,
    };
    let keep = |d: &&Device| {
        after.as_ref().is_none_or(|(i, v, m)| (d.iface.as_str(), d.vlan, d.mac) > (i.as_str(), *v, *m))
            && f.mac.is_none_or(|m| d.mac.0 == m)
            && f.ip.is_none_or(|ip| d.ips.contains(&ip))
            && f.segment.as_ref().is_none_or(|s| d.segment.as_ref() == Some(s))
            && f.iface.as_ref().is_none_or(|i| d.iface == *i)
            && f.app.is_none_or(|a| d.apps_client.contains(a) || d.apps_server.contains(a))
            && f.since.is_none_or(|s| d.last_seen >= s)
    };
    let snap = st.inventory();
    let page = take_page(snap.devices.iter().filter(keep), q.limit, |d| device_cursor(d));
    Ok(Page { items: page.items.into_iter().map(model::Device::from).collect(), next: page.next })
}

pub(super) async fn devices(State(st): State<Arc<AppState>>, pairs: Pairs) -> Response {
    match parsed(Endpoint::Devices, pairs) {
        Ok(q) => answer(st, Endpoint::Devices, "cursor", q, devices_page).await,
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

/// One page of events, oldest first, after the `since` sequence number.
pub fn events_page(st: &AppState, q: &Query) -> Result<Page<model::Event>, BadParam> {
    let f = &q.filter;
    check_names(st, f)?;
    // `mac=`: the device's own events, and policy events to or from its addresses.
    let (mac, mac_ips) = match f.mac {
        Some(m) => {
            let t = st.tables.read().unwrap();
            let ips: Vec<String> = t
                .devices
                .iter()
                .filter(|(_, k, _)| k.mac == m)
                .flat_map(|(_, _, d)| d.ips.iter().map(|i| i.to_string()))
                .collect();
            (Some(crate::base::net::mac_string(m)), ips)
        }
        None => (None, Vec::new()),
    };
    // Only drops and would-drops raise events; another verdict matches none.
    let verdict_kind = f.verdict.map(|v| crate::base::event::verdict_event(v).unwrap_or(""));
    let ip = f.ip.map(|i| i.to_string());
    let app = f.app.map(|a| a.name());
    let since = f.since.map(crate::base::clock::rfc3339);
    let keep = |e: &&model::Event| {
        e.seq > q.cursor.id()
            && mac.as_ref().is_none_or(|m| {
                e.mac.as_ref() == Some(m) || mac_ips.iter().any(|ip| *ip == e.src || *ip == e.dst)
            })
            && ip.as_ref().is_none_or(|ip| e.src == *ip || e.dst == *ip)
            && f.segment.as_ref().is_none_or(|s| e.segment == *s)
            && f.iface.as_ref().is_none_or(|i| e.iface == *i)
            && app.is_none_or(|a| e.app == a)
            && f.kind.as_ref().is_none_or(|k| e.kind == *k)
            && verdict_kind.is_none_or(|k| e.kind == k)
            && f.incident.is_none_or(|i| e.incident == i)
            && since.as_ref().is_none_or(|s| e.time >= *s)
    };
    let store = st.events.read().unwrap();
    let page = take_page(store.events.iter().filter(keep), q.limit, |e| e.seq.to_string());
    Ok(Page { items: page.items.into_iter().cloned().collect(), next: page.next })
}

pub(super) async fn events(State(st): State<Arc<AppState>>, pairs: Pairs) -> Response {
    match parsed(Endpoint::Events, pairs) {
        Ok(q) => answer(st, Endpoint::Events, "since", q, events_page).await,
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

/// One page of incidents, by id (the order they opened in).
pub fn incidents_page(
    st: &AppState,
    q: &Query,
) -> Result<Page<crate::detection::incident::Incident>, BadParam> {
    let f = &q.filter;
    check_names(st, f)?;
    let mac = f.mac.map(crate::base::net::mac_string);
    let ip = f.ip.map(|i| i.to_string());
    let since = f.since.map(crate::base::clock::rfc3339);
    let keep = |i: &&crate::detection::incident::Incident| {
        mac.as_ref().is_none_or(|m| i.mac.as_ref() == Some(m))
            && ip.as_ref().is_none_or(|ip| i.src == *ip || i.targets.iter().any(|t| t.ip == *ip))
            && f.segment.as_ref().is_none_or(|s| i.segments.contains(s))
            && f.kind.as_ref().is_none_or(|k| i.by_type.contains_key(k))
            && f.state.as_ref().is_none_or(|s| i.state == *s)
            && since.as_ref().is_none_or(|s| i.last_seen >= *s)
    };
    let store = st.events.read().unwrap();
    let after = q.cursor.id();
    let items = store.incidents.all.range(after + 1..).map(|(_, i)| i).filter(keep);
    let page = take_page(items, q.limit, |i| i.id.to_string());
    Ok(Page { items: page.items.into_iter().cloned().collect(), next: page.next })
}

pub(super) async fn incidents(State(st): State<Arc<AppState>>, pairs: Pairs) -> Response {
    match parsed(Endpoint::Incidents, pairs) {
        Ok(q) => answer(st, Endpoint::Incidents, "cursor", q, incidents_page).await,
        Err(m) => error(StatusCode::BAD_REQUEST, m),
    }
}

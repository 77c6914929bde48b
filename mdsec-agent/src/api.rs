//! HTTP surface: `/api/v1/{flows,devices,stats,interfaces}`, `/healthz`, `/readyz`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use anyhow::{Context, Result};
use axum::{Json, Router, http::StatusCode, response::IntoResponse, routing::get};
use mdsec_common::stats::Stat;

use crate::{
    clock::{Anchor, rfc3339},
    loader::Attached,
    model::{self, mac_string, proto_name, tcp_flag_names},
    state::Tables,
};

pub struct AppState {
    pub tables: Arc<RwLock<Tables>>,
    pub attached: Vec<Attached>,
}

impl AppState {
    fn ifname(&self, ifindex: u32) -> String {
        self.attached
            .iter()
            .find(|a| a.ifindex == ifindex)
            .map(|a| a.name.clone())
            .unwrap_or_else(|| format!("if{ifindex}"))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/flows", get(flows))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/interfaces", get(interfaces))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(model::ApiError {
                    error: "no such endpoint".into(),
                }),
            )
        })
        .with_state(state)
}

pub async fn serve(addr: SocketAddr, state: Arc<AppState>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    axum::serve(listener, router(state)).await?;
    Ok(())
}

type S = axum::extract::State<Arc<AppState>>;

pub fn flows_json(st: &AppState) -> Vec<model::Flow> {
    let anchor = Anchor::now();
    let t = st.tables.read().unwrap();
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut out: Vec<_> = t
        .flows
        .iter()
        .map(|(k, r)| {
            let tot = r.totals();
            model::Flow {
                iface: names
                    .entry(k.ifindex)
                    .or_insert_with(|| st.ifname(k.ifindex))
                    .clone(),
                vlan: k.vlan,
                src: k.src_ip().to_string(),
                dst: k.dst_ip().to_string(),
                proto: proto_name(k.proto),
                proto_num: k.proto,
                sport: k.sport,
                dport: k.dport,
                packets: tot.packets,
                bytes: tot.bytes,
                first_seen: rfc3339(anchor.wall(r.first_seen_ns)),
                last_seen: rfc3339(anchor.wall(r.last_seen_ns)),
                tcp_flags: tcp_flag_names(r.tcp_flags),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (
            &a.iface,
            a.vlan,
            &a.src,
            &a.dst,
            a.proto_num,
            a.sport,
            a.dport,
        )
            .cmp(&(
                &b.iface,
                b.vlan,
                &b.src,
                &b.dst,
                b.proto_num,
                b.sport,
                b.dport,
            ))
    });
    out
}

pub fn devices_json(st: &AppState) -> Vec<model::Device> {
    let anchor = Anchor::now();
    let t = st.tables.read().unwrap();
    let mut out: Vec<_> = t
        .devices
        .iter()
        .map(|(k, r)| {
            let tot = r.totals();
            model::Device {
                iface: st.ifname(k.ifindex),
                vlan: k.vlan,
                mac: mac_string(k.mac),
                ips: r.ips.iter().map(|ip| ip.to_string()).collect(),
                packets: tot.packets,
                bytes: tot.bytes,
                first_seen: rfc3339(anchor.wall(r.first_seen_ns)),
                last_seen: rfc3339(anchor.wall(r.last_seen_ns)),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.iface, a.vlan, &a.mac).cmp(&(&b.iface, b.vlan, &b.mac)));
    out
}

async fn flows(axum::extract::State(st): S) -> Json<Vec<model::Flow>> {
    Json(flows_json(&st))
}

async fn devices(axum::extract::State(st): S) -> Json<Vec<model::Device>> {
    Json(devices_json(&st))
}

async fn stats(axum::extract::State(st): S) -> Json<model::Stats> {
    let t = st.tables.read().unwrap();
    Json(
        Stat::ALL
            .iter()
            .map(|s| {
                let c = t.stat(*s);
                (
                    s.name().to_string(),
                    model::Count {
                        packets: c.packets,
                        bytes: c.bytes,
                    },
                )
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

/// Ready once the datapath is attached everywhere and the first poll has landed.
async fn ready(axum::extract::State(st): S) -> impl IntoResponse {
    let polled = !st.tables.read().unwrap().stats.is_empty();
    if polled && !st.attached.is_empty() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

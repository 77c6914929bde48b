//! `mdsec-agent flows|devices|events|incidents|stats`: the API's list endpoints with the same
//! filters, printed as one table (or JSON). Arguments become the query string
//! in one place ([`ListArgs::query`]); the server validates the values, so
//! the CLI and the API cannot disagree on what a filter means.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::{
    Query,
    table::{self, human},
};
use crate::surfaces::{client, model};

#[derive(Args)]
pub struct ListArgs {
    /// A device's MAC: its flows (sent by it, or to/from its addresses), its
    /// record, or its events.
    #[arg(long, visible_alias = "mac", value_name = "MAC")]
    device: Option<String>,
    /// An address at either end (or one of a device's addresses).
    #[arg(long)]
    ip: Option<String>,
    #[arg(long)]
    segment: Option<String>,
    /// An attached interface's name.
    #[arg(long)]
    iface: Option<String>,
    /// none, unevaluated, exempt, allow, reply, app_pending, would_drop, drop
    /// (flows and events).
    #[arg(long)]
    verdict: Option<String>,
    /// An application name (dicom, hl7, tls, …).
    #[arg(long)]
    app: Option<String>,
    /// An event type (events), or incidents holding events of that type.
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
    /// Events of this incident.
    #[arg(long)]
    incident: Option<String>,
    /// Incidents: open or closed.
    #[arg(long)]
    state: Option<String>,
    /// Seen at or after: RFC 3339, or an age such as 15m, 2h, 7d.
    #[arg(long)]
    since: Option<String>,
    /// Items per page (server default 1000, at most 10000).
    #[arg(long)]
    limit: Option<usize>,
    /// Continue after this cursor (printed on stderr when more may follow).
    #[arg(long)]
    cursor: Option<String>,
    /// Every match: all pages (flows as one streamed export).
    #[arg(long, conflicts_with_all = ["cursor"])]
    all: bool,
    #[command(flatten)]
    q: Query,
}

#[derive(Clone, Copy, PartialEq)]
enum List {
    Flows,
    Devices,
    Events,
    Incidents,
}

impl List {
    fn path(self) -> &'static str {
        match self {
            List::Flows => "/api/v1/flows",
            List::Devices => "/api/v1/devices",
            List::Events => "/api/v1/events",
            List::Incidents => "/api/v1/incidents",
        }
    }

    /// The parameter that carries the cursor.
    fn cursor(self) -> &'static str {
        if self == List::Events { "since" } else { "cursor" }
    }
}

impl ListArgs {
    fn query(&self, list: List, cursor: Option<&str>, ndjson: bool) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let pairs = [
            ("mac", &self.device),
            ("ip", &self.ip),
            ("segment", &self.segment),
            ("iface", &self.iface),
            ("verdict", &self.verdict),
            ("app", &self.app),
            ("type", &self.kind),
            ("incident", &self.incident),
            ("state", &self.state),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        // On events `since` is the cursor; a time filter goes as `since` only
        // when no cursor is given.
        match (list, cursor, &self.since) {
            (List::Events, Some(_), Some(_)) => {}
            (_, _, Some(s)) => {
                q.append_pair("since", s);
            }
            _ => {}
        }
        if let Some(n) = self.limit {
            q.append_pair("limit", &n.to_string());
        }
        if let Some(c) = cursor {
            q.append_pair(list.cursor(), c);
        }
        if ndjson {
            q.append_pair("format", "ndjson");
        }
        format!("{}?{}", list.path(), q.finish())
    }

    /// Every item asked for, and the cursor of the next page if one may follow.
    fn fetch<T: serde::de::DeserializeOwned>(&self, list: List) -> Result<(Vec<T>, Option<String>)> {
        let addr = self.q.endpoint()?;
        let token = self.q.token()?;
        if self.all && list == List::Flows {
            let body = client::get(&addr, &self.query(list, None, true), token.as_deref())?;
            let items = body
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
                .map(|(i, l)| serde_json::from_slice(l).with_context(|| format!("bad NDJSON line {}", i + 1)))
                .collect::<Result<_>>()?;
            return Ok((items, None));
        }
        let mut cursor = self.cursor.clone();
        let mut all = Vec::new();
        loop {
            let path = self.query(list, cursor.as_deref(), false);
            let (body, next) = client::get_page(&addr, &path, token.as_deref())?;
            let page: Vec<T> =
                serde_json::from_slice(&body).with_context(|| format!("bad JSON from {path}"))?;
            all.extend(page);
            match next {
                Some(n) if self.all => cursor = Some(n),
                next => return Ok((all, next)),
            }
        }
    }
}

/// Fetches the list and prints it: JSON (in the API's order), or one table
/// (`head`, a row per item, in `order` if given), then where the next page
/// starts.
fn show<T: serde::Serialize + serde::de::DeserializeOwned>(
    a: &ListArgs,
    list: List,
    head: &[&str],
    order: Option<fn(&T, &T) -> std::cmp::Ordering>,
    row: impl Fn(&T) -> Vec<String>,
) -> Result<ExitCode> {
    let (mut items, next): (Vec<T>, _) = a.fetch(list)?;
    if let Some(order) = order.filter(|_| !a.q.json) {
        items.sort_by(order);
    }
    table::print(a.q.json, &items, head, row)?;
    if let Some(c) = next {
        eprintln!("(more may follow: --cursor {c}, or --all)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `stats`: datapath counters by reason (the table leaves out zeros).
pub fn stats(q: &Query) -> Result<ExitCode> {
    let stats: model::Stats = q.get("/api/v1/stats")?;
    if q.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<(&String, &model::Count)> = stats.iter().filter(|(_, c)| c.packets > 0).collect();
    table::print(false, &rows, &["REASON", "PACKETS", "BYTES"], |(k, c)| {
        vec![k.to_string(), c.packets.to_string(), c.bytes.to_string()]
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn flows(a: &ListArgs) -> Result<ExitCode> {
    let head = ["IFACE", "VLAN", "PROTO", "APP", "SRC", "DST", "PKTS", "BYTES", "VERDICT"];
    // The table reads by interface and endpoints; the API pages in first-seen order.
    let by_key = |x: &model::Flow, y: &model::Flow| {
        (&x.iface, x.vlan, &x.src, &x.dst, x.proto_num, x.sport, x.dport).cmp(&(
            &y.iface,
            y.vlan,
            &y.src,
            &y.dst,
            y.proto_num,
            y.sport,
            y.dport,
        ))
    };
    show(a, List::Flows, &head, Some(by_key), |f: &model::Flow| {
        vec![
            f.iface.clone(),
            f.vlan.to_string(),
            f.proto.clone(),
            f.app.clone(),
            format!("{}:{}", f.src, f.sport),
            format!("{}:{}", f.dst, f.dport),
            human(f.packets),
            human(f.bytes),
            f.verdict.clone(),
        ]
    })
}

pub fn devices(a: &ListArgs) -> Result<ExitCode> {
    let head = ["IFACE", "VLAN", "MAC", "VENDOR", "CLASS", "IPS", "APPS", "PKTS", "BYTES", "LAST SEEN"];
    show(a, List::Devices, &head, None, |d: &model::Device| {
        vec![
            d.iface.clone(),
            d.vlan.to_string(),
            d.mac.clone(),
            d.vendor.clone().unwrap_or_default().chars().take(24).collect(),
            d.class.clone(),
            d.ips.join(","),
            d.apps_client.iter().chain(&d.apps_server).cloned().collect::<Vec<_>>().join(","),
            human(d.packets),
            human(d.bytes),
            d.last_seen.clone(),
        ]
    })
}

pub fn events(a: &ListArgs) -> Result<ExitCode> {
    let head = ["SEQ", "TIME", "TYPE", "SEVERITY", "SRC", "DST", "APP", "SEGMENT", "IMPACT"];
    show(a, List::Events, &head, None, |e: &model::Event| {
        vec![
            e.seq.to_string(),
            e.time.clone(),
            e.kind.clone(),
            e.severity.clone(),
            format!("{}:{}", e.src, e.sport),
            format!("{}:{}", e.dst, e.dport),
            e.app.clone(),
            e.segment.clone(),
            e.clinical_impact.clone(),
        ]
    })
}

pub fn incidents(a: &ListArgs) -> Result<ExitCode> {
    let head = ["ID", "STATE", "SEVERITY", "SOURCE", "TARGETS", "EVENTS", "FIRST", "LAST", "MOST CRITICAL"];
    show(a, List::Incidents, &head, None, |i: &model::Incident| {
        let worst = i.targets.first().map(|t| {
            let at = if t.segment.is_empty() { &t.zone } else { &t.segment };
            format!("{} ({at})", t.ip)
        });
        vec![
            i.id.to_string(),
            i.state.clone(),
            i.severity.clone(),
            i.src.clone(),
            i.targets_total.to_string(),
            i.by_type.iter().map(|(k, n)| format!("{k}:{n}")).collect::<Vec<_>>().join(","),
            i.first_seen.clone(),
            i.last_seen.clone(),
            worst.unwrap_or_default(),
        ]
    })
}

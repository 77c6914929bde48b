//! Query parameters of the list endpoints (`/api/v1/flows`, `/devices`,
//! `/events`), turned into typed filters and a page in one step. Every bad
//! value, and every parameter an endpoint does not take, is an error naming
//! the parameter (the handler answers 400 with it).

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use mdsec_common::{app::App, policy::Verdict};

/// Items per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 1000;
/// The largest `limit` a page takes; a full export is `format=ndjson`.
pub const MAX_LIMIT: usize = 10_000;

/// Which list a query is for: each takes its own set of parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Flows,
    Devices,
    Events,
    Incidents,
}

impl Endpoint {
    fn params(self) -> &'static [&'static str] {
        const COMMON: [&str; 9] =
            ["mac", "ip", "segment", "iface", "app", "since", "limit", "cursor", "format"];
        match self {
            Endpoint::Flows => {
                &["mac", "ip", "segment", "iface", "app", "since", "limit", "cursor", "format", "verdict"]
            }
            Endpoint::Devices => &COMMON,
            Endpoint::Events => &[
                "mac", "ip", "segment", "iface", "app", "since", "limit", "format", "verdict", "type",
                "incident",
            ],
            Endpoint::Incidents => {
                &["mac", "ip", "segment", "since", "limit", "cursor", "format", "type", "state"]
            }
        }
    }

    pub(super) fn path(self) -> &'static str {
        match self {
            Endpoint::Flows => "/api/v1/flows",
            Endpoint::Devices => "/api/v1/devices",
            Endpoint::Events => "/api/v1/events",
            Endpoint::Incidents => "/api/v1/incidents",
        }
    }
}

/// What a list query selects. Every field is optional; all given must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// Flows: the device's own (it sent them) or to/from one of its addresses.
    /// Devices and events: that MAC.
    pub mac: Option<[u8; 6]>,
    /// Either end (flows, events) or one of the device's addresses.
    pub ip: Option<IpAddr>,
    pub segment: Option<String>,
    pub iface: Option<String>,
    pub app: Option<App>,
    /// Flows and devices: seen at or after this time. Events: at or after it.
    pub since: Option<SystemTime>,
    pub verdict: Option<Verdict>,
    /// Events: the event type. Incidents: holding events of that type.
    pub kind: Option<String>,
    /// Events: of this incident.
    pub incident: Option<u64>,
    /// Incidents: `open` or `closed`.
    pub state: Option<String>,
}

/// The page asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub filter: Filter,
    /// Items after this cursor (flows: a record id; devices: `iface/vlan/mac`;
    /// events: a sequence number, also accepted as `since=SEQ`).
    pub cursor: Cursor,
    /// At most this many items. `None`: every match (NDJSON export only).
    pub limit: Option<usize>,
    /// Newline-delimited JSON, streamed.
    pub ndjson: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub enum Cursor {
    #[default]
    Start,
    Id(u64),
    Key(String),
}

impl Cursor {
    pub fn id(&self) -> u64 {
        match self {
            Cursor::Id(n) => *n,
            _ => 0,
        }
    }
}

/// A parameter that cannot be used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BadParam {
    pub param: String,
    pub message: String,
}

impl std::fmt::Display for BadParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.param, self.message)
    }
}

fn bad(param: &str, message: impl Into<String>) -> BadParam {
    BadParam { param: param.into(), message: message.into() }
}

/// Parses the decoded `(name, value)` pairs of a query string.
pub fn parse(ep: Endpoint, pairs: &[(String, String)], now: SystemTime) -> Result<Query, BadParam> {
    let mut q = Query { filter: Filter::default(), cursor: Cursor::Start, limit: None, ndjson: false };
    let mut seen: Vec<&str> = Vec::new();
    let mut limit = None;
    for (name, value) in pairs {
        let name = name.as_str();
        if !ep.params().contains(&name) {
            return Err(bad(
                name,
                format!("not a parameter of {} (it takes: {})", ep.path(), ep.params().join(", ")),
            ));
        }
        if seen.contains(&name) {
            return Err(bad(name, "given twice"));
        }
        seen.push(name);
        let v = value.trim();
        let f = &mut q.filter;
        match name {
            "mac" => {
                f.mac =
                    Some(crate::base::net::parse_mac(v).ok_or_else(|| {
                        bad(name, format!("`{v}` is not a MAC address (aa:bb:cc:dd:ee:ff)"))
                    })?)
            }
            "ip" => {
                f.ip =
                    Some(v.parse().map_err(|_| bad(name, format!("`{v}` is not an IPv4 or IPv6 address")))?)
            }
            "segment" => f.segment = Some(nonempty(name, v)?.to_string()),
            "iface" => f.iface = Some(nonempty(name, v)?.to_string()),
            "app" => {
                f.app = Some(App::from_name(v).ok_or_else(|| {
                    let all: Vec<&str> = App::ALL.iter().map(|a| a.name()).collect();
                    bad(name, format!("`{v}` is not an app ({})", all.join(", ")))
                })?)
            }
            "verdict" => f.verdict = Some(verdict(v).ok_or_else(|| bad(name, verdict_help(v)))?),
            "type" => {
                if !crate::base::event::EVENT_TYPES.contains(&v) {
                    return Err(bad(
                        name,
                        format!(
                            "`{v}` is not an event type ({})",
                            crate::base::event::EVENT_TYPES.join(", ")
                        ),
                    ));
                }
                f.kind = Some(v.to_string());
            }
            "incident" => {
                f.incident = Some(v.parse().map_err(|_| bad(name, format!("`{v}` is not an incident id")))?)
            }
            "state" => {
                if v != "open" && v != "closed" {
                    return Err(bad(name, format!("`{v}` is not an incident state (open, closed)")));
                }
                f.state = Some(v.to_string());
            }
            "since" => {
                // On events a number is the sequence cursor (as it always was).
                if ep == Endpoint::Events
                    && let Ok(seq) = v.parse::<u64>()
                {
                    q.cursor = Cursor::Id(seq);
                } else {
                    f.since = Some(time(v, now).ok_or_else(|| {
                        let seq = if ep == Endpoint::Events { ", or an event sequence number" } else { "" };
                        bad(
                            name,
                            format!(
                                "`{v}` is not a time (RFC 3339, or an age such as 90s, 15m, 2h, 7d{seq})"
                            ),
                        )
                    })?)
                }
            }
            "limit" => {
                let n: usize = v.parse().map_err(|_| bad(name, format!("`{v}` is not a whole number")))?;
                if n == 0 || n > MAX_LIMIT {
                    return Err(bad(
                        name,
                        format!("{n} is out of range: 1 to {MAX_LIMIT} (for everything, use format=ndjson)"),
                    ));
                }
                limit = Some(n);
            }
            "cursor" => {
                q.cursor = match ep {
                    Endpoint::Flows | Endpoint::Incidents => Cursor::Id(
                        v.parse()
                            .map_err(|_| bad(name, format!("`{v}` is not a cursor this endpoint gave")))?,
                    ),
                    _ => Cursor::Key(nonempty(name, v)?.to_string()),
                }
            }
            "format" => {
                q.ndjson = match v {
                    "json" => false,
                    "ndjson" => true,
                    _ => return Err(bad(name, format!("`{v}` is not a format (json, ndjson)"))),
                }
            }
            _ => unreachable!("checked against the endpoint's parameters"),
        }
    }
    // A page is bounded; an NDJSON export streams everything unless limited.
    q.limit = if q.ndjson { limit } else { Some(limit.unwrap_or(DEFAULT_LIMIT)) };
    Ok(q)
}

fn nonempty<'a>(name: &str, v: &'a str) -> Result<&'a str, BadParam> {
    if v.is_empty() { Err(bad(name, "must not be empty")) } else { Ok(v) }
}

fn verdict(v: &str) -> Option<Verdict> {
    Verdict::ALL.into_iter().find(|x| x.name() == v)
}

fn verdict_help(v: &str) -> String {
    let all: Vec<&str> = Verdict::ALL.iter().map(|x| x.name()).collect();
    format!("`{v}` is not a verdict ({})", all.join(", "))
}

/// RFC 3339, or an age before `now` (`90s`, `15m`, `2h`, `7d`).
fn time(v: &str, now: SystemTime) -> Option<SystemTime> {
    if let Some(t) = crate::base::clock::parse_rfc3339(v) {
        return Some(t);
    }
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    now.checked_sub(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ep: Endpoint, q: &[(&str, &str)]) -> Result<Query, BadParam> {
        let pairs: Vec<(String, String)> = q.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        parse(ep, &pairs, SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
    }

    #[test]
    fn filters_parse_into_types() {
        let q = p(
            Endpoint::Flows,
            &[
                ("mac", "58:46:E1:00:00:07"),
                ("verdict", "drop"),
                ("app", "hl7"),
                ("limit", "50"),
                ("since", "15m"),
            ],
        )
        .unwrap();
        assert_eq!(q.filter.mac, Some([0x58, 0x46, 0xe1, 0, 0, 7]));
        assert_eq!(q.filter.verdict, Some(Verdict::Drop));
        assert_eq!(q.filter.app, Some(App::Hl7));
        assert_eq!(q.limit, Some(50));
        assert_eq!(q.filter.since, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - 900)));
        assert_eq!(p(Endpoint::Flows, &[]).unwrap().limit, Some(DEFAULT_LIMIT));
        assert_eq!(p(Endpoint::Flows, &[("format", "ndjson")]).unwrap().limit, None);
        assert_eq!(p(Endpoint::Events, &[("since", "42")]).unwrap().cursor, Cursor::Id(42));
        assert_eq!(p(Endpoint::Flows, &[("cursor", "7")]).unwrap().cursor, Cursor::Id(7));
    }

    #[test]
    fn every_bad_value_names_its_parameter() {
        for (ep, q, param) in [
            (Endpoint::Flows, ("mac", "58:46:e1"), "mac"),
            (Endpoint::Flows, ("ip", "10.0.0.300"), "ip"),
            (Endpoint::Flows, ("verdict", "dropped"), "verdict"),
            (Endpoint::Flows, ("app", "telnet2"), "app"),
            (Endpoint::Flows, ("since", "yesterday"), "since"),
            (Endpoint::Events, ("since", "yesterday"), "since"),
            (Endpoint::Flows, ("limit", "0"), "limit"),
            (Endpoint::Flows, ("limit", "10001"), "limit"),
            (Endpoint::Flows, ("limit", "-1"), "limit"),
            (Endpoint::Flows, ("cursor", "abc"), "cursor"),
            (Endpoint::Flows, ("format", "xml"), "format"),
            (Endpoint::Flows, ("segment", ""), "segment"),
            (Endpoint::Devices, ("verdict", "drop"), "verdict"),
            (Endpoint::Flows, ("colour", "red"), "colour"),
            (Endpoint::Events, ("type", "bogus"), "type"),
            (Endpoint::Events, ("incident", "x"), "incident"),
            (Endpoint::Incidents, ("state", "resolved"), "state"),
            (Endpoint::Incidents, ("cursor", "abc"), "cursor"),
            (Endpoint::Incidents, ("iface", "gw1"), "iface"),
        ] {
            let e = p(ep, &[q]).unwrap_err();
            assert_eq!(e.param, param, "{q:?}: {e}");
            assert!(e.message.len() > 5, "{e}");
        }
        let e = p(Endpoint::Flows, &[("ip", "10.0.0.1"), ("ip", "10.0.0.2")]).unwrap_err();
        assert_eq!(e.to_string(), "ip: given twice");
    }
}

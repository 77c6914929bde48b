//! On-demand access (`mdsec-agent exception open`): a time-boxed exception
//! an operator opens for a ticket, without editing (or re-approving) the
//! policy files. Grants live in the state database (opened and closed rows,
//! both append-only); every install merges the open ones into the loaded
//! policy as exception rules, so the kernel closes each on its expiry like a
//! file exception.
//!
//! Architecture Invariant: a grant never changes the policy files or their
//! content hash; it is recorded in the policy history as its own install.

use std::{path::PathBuf, time::SystemTime};

use ipnet::IpNet;
use mdsec_common::app::App;
use serde::{Deserialize, Serialize};

use super::model::{Direction, ExceptionInfo, Mode, Peer, Policy, Rule};
use crate::base::clock::rfc3339;

/// Longest grant when `change_control.max_exception_minutes` is not set: one shift.
pub const DEFAULT_MAX: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

/// Which way a grant lets traffic start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// From the segment to the peer.
    To,
    /// From the peer to the segment (a vendor's remote service).
    From,
    /// Either way.
    Both,
}

/// One granted access, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The state database's id (`exception close ID`).
    pub id: u64,
    pub segment: String,
    pub access: Access,
    pub peer: String,
    /// IP protocol number, none = any.
    pub proto: Option<u8>,
    /// Inclusive ranges; empty = any port.
    pub ports: Vec<(u16, u16)>,
    pub app: Option<String>,
    pub opened_at: String,
    pub expires: String,
    pub ticket: String,
    pub reason: String,
    pub opened_by: String,
    /// Set once closed (by an operator, or `expired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<Closed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    pub time: String,
    pub by: String,
    pub reason: String,
}

/// `POST /api/v1/exceptions`: what an operator asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub segment: String,
    /// Either way (`--peer`), or one way (`--to` / `--from`).
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub proto: Option<String>,
    /// `22`, `8000-8010`.
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub app: Option<String>,
    /// `90m`, `2h`.
    #[serde(rename = "for")]
    pub duration: String,
    pub ticket: String,
    pub reason: String,
    #[serde(default)]
    pub actor: String,
}

/// `POST /api/v1/exceptions/{id}/close`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    pub reason: String,
    #[serde(default)]
    pub actor: String,
}

impl CloseRequest {
    /// The closing it asks for at `now`, or the error naming the field.
    pub fn closed(&self, now: SystemTime) -> Result<Closed, String> {
        if self.reason.trim().is_empty() {
            return Err("reason: a closing needs a reason".into());
        }
        one_line("reason", &self.reason, 1024)?;
        one_line("actor", &self.actor, 128)?;
        Ok(Closed {
            time: rfc3339(now),
            by: actor_or_unknown(&self.actor),
            reason: self.reason.trim().into(),
        })
    }
}

/// At most `limit` bytes and no control characters (a ticket, reason or
/// actor goes into logs and syslog lines).
fn one_line(field: &str, v: &str, limit: usize) -> Result<(), String> {
    if v.len() > limit || v.chars().any(char::is_control) {
        return Err(format!("{field}: at most {limit} bytes, no control characters"));
    }
    Ok(())
}

fn actor_or_unknown(actor: &str) -> String {
    if actor.trim().is_empty() { "unknown".into() } else { actor.trim().into() }
}

impl Grant {
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
    }

    /// `to PEER tcp 22 for CHG-1`: how events and lists name it.
    pub fn text(&self) -> String {
        let word = match self.access {
            Access::To => "to",
            Access::From => "from",
            Access::Both => "with",
        };
        super::model::rule_text(word, &self.peer, self.proto, &self.ports, self.app.as_deref())
    }

    /// Where its rules say they come from (`Rule::file`).
    pub fn origin(&self) -> PathBuf {
        PathBuf::from(format!("on-demand exception #{}", self.id))
    }
}

/// Validates `req` against the active policy: the grant to store (id 0),
/// or the error naming the field.
pub fn validate(
    req: &Request,
    policy: &Policy,
    max: std::time::Duration,
    now: SystemTime,
) -> Result<Grant, String> {
    let seg = policy.segments.iter().find(|s| s.name == req.segment.trim()).ok_or_else(|| {
        let names: Vec<&str> = policy.segments.iter().map(|s| s.name.as_str()).collect();
        format!("segment: no segment `{}` in the active policy (one of: {})", req.segment, names.join(", "))
    })?;
    if seg.mode != Mode::Enforce {
        return Err(format!(
            "segment: `{}` is in monitor mode: it drops nothing, so there is nothing to open",
            seg.name
        ));
    }
    let (access, peer) = match (&req.peer, &req.to, &req.from) {
        (Some(p), None, None) => (Access::Both, p),
        (None, Some(p), None) => (Access::To, p),
        (None, None, Some(p)) => (Access::From, p),
        (None, None, None) => return Err("peer: give one of peer, to or from".into()),
        _ => return Err("peer: give only one of peer, to or from".into()),
    };
    let peer = peer.trim().to_string();
    parse_peer(&peer, policy).map_err(|e| format!("peer: {e}"))?;
    let proto = match req.proto.as_deref().map(str::trim) {
        None | Some("any") => None,
        Some("tcp") => Some(6),
        Some("udp") => Some(17),
        Some("icmp") => Some(1),
        Some("icmpv6") => Some(58),
        Some(other) => return Err(format!("proto: unknown proto `{other}` (tcp, udp, icmp, icmpv6, any)")),
    };
    let mut ports = Vec::new();
    for p in &req.ports {
        ports.push(parse_port(p).map_err(|e| format!("ports: {e}"))?);
    }
    if !ports.is_empty() && !matches!(proto, Some(6) | Some(17)) {
        return Err("ports: ports need proto tcp or udp".into());
    }
    if ports.len() > 16 {
        return Err("ports: at most 16 ports or ranges".into());
    }
    let app = match req.app.as_deref().map(str::trim) {
        None => None,
        Some(a) => match App::from_name(a) {
            Some(App::Unknown) | None => {
                let known: Vec<&str> = App::ALL[1..].iter().map(|a| a.name()).collect();
                return Err(format!("app: unknown app `{a}` (one of: {})", known.join(", ")));
            }
            Some(app) => Some(app.name().to_string()),
        },
    };
    let duration = super::model::parse_period(&req.duration)
        .ok_or_else(|| format!("for: `{}` is not a duration like 90m or 2h", req.duration))?;
    if duration.is_zero() {
        return Err("for: the duration must be more than zero".into());
    }
    if duration > max {
        return Err(format!(
            "for: {} is longer than the longest on-demand exception allowed ({} minutes, change_control.max_exception_minutes)",
            req.duration,
            max.as_secs() / 60
        ));
    }
    for (field, v, limit) in [("ticket", &req.ticket, 128), ("reason", &req.reason, 1024)] {
        if v.trim().is_empty() {
            return Err(format!("{field}: an on-demand exception needs a {field}"));
        }
        one_line(field, v, limit)?;
    }
    one_line("actor", &req.actor, 128)?;
    Ok(Grant {
        id: 0,
        segment: seg.name.clone(),
        access,
        peer,
        proto,
        ports,
        app,
        opened_at: rfc3339(now),
        expires: rfc3339(now + duration),
        ticket: req.ticket.trim().into(),
        reason: req.reason.trim().into(),
        opened_by: actor_or_unknown(&req.actor),
        closed: None,
    })
}

fn parse_peer(text: &str, policy: &Policy) -> Result<Peer, String> {
    if text.contains('/') || text.parse::<std::net::IpAddr>().is_ok() {
        let net = if text.contains('/') {
            text.parse::<IpNet>().map_err(|_| format!("`{text}` is not an address or CIDR"))?
        } else {
            IpNet::from(text.parse::<std::net::IpAddr>().unwrap())
        };
        if net.trunc() != net {
            return Err(format!("`{text}` has host bits set; did you mean {}?", net.trunc()));
        }
        return Ok(Peer::Cidr(net));
    }
    let known = policy.segments.iter().map(|s| &s.name).chain(policy.zones.iter().map(|z| &z.name));
    if text.is_empty() || !known.clone().any(|n| n == text) {
        let names: Vec<&str> = known.map(String::as_str).collect();
        return Err(format!(
            "`{text}` is not an address, a CIDR or a zone or segment ({})",
            names.join(", ")
        ));
    }
    Ok(Peer::Name(text.into()))
}

fn parse_port(s: &str) -> Result<(u16, u16), String> {
    let one = |v: &str| match v.trim().parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(format!("`{s}` is not a port (1-65535) or a range like 8000-8010")),
    };
    match s.split_once('-') {
        None => one(s).map(|p| (p, p)),
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            if a > b {
                return Err(format!("`{s}` is an inverted range"));
            }
            Ok((a, b))
        }
    }
}

/// `policy` with the open grants appended as exception rules (ids after the
/// files' rules). A grant the policy no longer supports (its segment or peer
/// was removed, or it expired) is left out with a warning.
pub fn merge(policy: &Policy, grants: &[Grant], now: SystemTime) -> (Policy, Vec<u64>, Vec<String>) {
    let mut out = policy.clone();
    let (mut applied, mut warnings) = (Vec::new(), Vec::new());
    for g in grants {
        let expires = match g.expires_at() {
            Some(t) if t > now => t,
            _ => continue,
        };
        let Some(segment) =
            policy.segment_index(&g.segment).filter(|&i| policy.segments[i].mode == Mode::Enforce)
        else {
            warnings.push(format!(
                "on-demand exception #{} ({}): segment `{}` is no longer an enforce segment of the policy; not applied",
                g.id, g.ticket, g.segment
            ));
            continue;
        };
        let peer = match parse_peer(&g.peer, policy) {
            Ok(p) => p,
            Err(e) => {
                warnings.push(format!("on-demand exception #{} ({}): {e}; not applied", g.id, g.ticket));
                continue;
            }
        };
        let dirs: &[Direction] = match g.access {
            Access::To => &[Direction::Out],
            Access::From => &[Direction::In],
            Access::Both => &[Direction::Out, Direction::In],
        };
        for &direction in dirs {
            out.rules.push(Rule {
                id: out.rules.len() as u32 + 1,
                segment,
                direction,
                peer: peer.clone(),
                proto: g.proto,
                ports: g.ports.clone(),
                app: g.app.as_deref().and_then(App::from_name),
                exception: Some(ExceptionInfo {
                    expires,
                    expires_text: g.expires.clone(),
                    reason: g.reason.clone(),
                    ticket: g.ticket.clone(),
                }),
                window: None,
                quarantine: false,
                file: g.origin(),
                line: 0,
                col: 0,
            });
        }
        applied.push(g.id);
    }
    (out, applied, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{DefaultVerdict, Member, Segment};

    fn policy() -> Policy {
        let mut p =
            Policy::pumps(vec![Member::Net { net: "10.0.0.0/24".parse().unwrap(), vlan: None }], DEFAULT_MAX);
        p.segments[0].mode = Mode::Enforce;
        p.segments.push(Segment {
            name: "watch".into(),
            mode: Mode::Monitor,
            default: DefaultVerdict::Deny,
            ..p.segments[0].clone()
        });
        p
    }

    fn req() -> Request {
        Request {
            segment: "pumps".into(),
            from: Some("192.0.2.7".into()),
            proto: Some("tcp".into()),
            ports: vec!["22".into(), "8000-8010".into()],
            duration: "2h".into(),
            ticket: "CHG-7".into(),
            reason: "vendor service".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_request_becomes_one_grant_and_merges_as_expiring_rules() {
        let now = SystemTime::now();
        let g = validate(&req(), &policy(), DEFAULT_MAX, now).unwrap();
        assert_eq!(
            (g.access, g.proto, g.ports.clone()),
            (Access::From, Some(6), vec![(22, 22), (8000, 8010)])
        );
        assert_eq!(g.opened_by, "unknown");
        let g = Grant { id: 3, ..g };
        let (p, applied, warnings) = merge(&policy(), std::slice::from_ref(&g), now);
        assert_eq!((applied, warnings.len()), (vec![3], 0));
        let r = p.rules.last().unwrap();
        assert_eq!((r.id, r.direction), (1, Direction::In));
        assert!(r.exception.as_ref().unwrap().expires > now + std::time::Duration::from_secs(7199));
        assert_eq!(r.origin(), "on-demand exception #3");
        // Expired: not merged.
        let (p, applied, _) = merge(&policy(), &[g], now + std::time::Duration::from_secs(7201));
        assert!(p.rules.is_empty() && applied.is_empty());
    }

    #[test]
    fn bad_requests_name_their_field() {
        let now = SystemTime::now();
        let cases: Vec<(Request, &str)> = vec![
            (Request { segment: "nope".into(), ..req() }, "segment: no segment `nope`"),
            (Request { segment: "watch".into(), ..req() }, "segment: `watch` is in monitor mode"),
            (Request { from: None, ..req() }, "peer: give one of"),
            (Request { to: Some("10.9.0.0/16".into()), ..req() }, "peer: give only one"),
            (Request { from: Some("10.0.0.1/24".into()), ..req() }, "host bits set"),
            (Request { from: Some("pacs".into()), ..req() }, "peer: `pacs` is not an address"),
            (Request { proto: Some("sctp".into()), ..req() }, "proto: unknown proto `sctp`"),
            (Request { ports: vec!["70000".into()], ..req() }, "ports: `70000` is not a port"),
            (Request { ports: vec!["90-80".into()], ..req() }, "inverted range"),
            (Request { proto: None, ..req() }, "ports: ports need proto"),
            (Request { app: Some("gopher".into()), ..req() }, "app: unknown app `gopher`"),
            (Request { duration: "2 weeks".into(), ..req() }, "for: `2 weeks` is not a duration"),
            (Request { duration: "0m".into(), ..req() }, "more than zero"),
            (Request { duration: "9h".into(), ..req() }, "longer than the longest"),
            (Request { ticket: " ".into(), ..req() }, "ticket: an on-demand exception needs a ticket"),
            (Request { reason: "".into(), ..req() }, "reason: an on-demand exception needs a reason"),
            (Request { actor: "a\nb".into(), ..req() }, "actor: at most"),
        ];
        for (r, want) in cases {
            let e = validate(&r, &policy(), DEFAULT_MAX, now).unwrap_err();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
    }

    #[test]
    fn a_grant_the_policy_no_longer_supports_is_left_out_with_a_warning() {
        let now = SystemTime::now();
        let g = Grant { id: 9, ..validate(&req(), &policy(), DEFAULT_MAX, now).unwrap() };
        let mut p = policy();
        p.segments[0].mode = Mode::Monitor;
        let (out, applied, warnings) = merge(&p, &[g], now);
        assert!(out.rules.is_empty() && applied.is_empty());
        assert!(warnings[0].contains("#9 (CHG-7)"), "{warnings:?}");
    }
}

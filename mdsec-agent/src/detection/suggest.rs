//! `mdsec-agent suggest`: an allow-list for one segment from its learned baseline.
//!
//! Observe, suggest, review, enforce: the output is a complete segment file that
//! `mdsec-agent check` accepts unchanged. It keeps the segment's members, settings,
//! rules and exceptions from the current file, and adds one rule per (direction,
//! peer, protocol, app) for observed communication that no current rule or
//! exception covers, with its ports, flow count, devices and dates as comments.
//! Traffic an exception covered is never turned into a permanent rule: vendor
//! maintenance stays time-bound.
//!
//! A rule gets `app:` only when every payload seen on that peer and port was
//! recognised as the same app (then the datapath enforces the app, not only the
//! port); flows without any payload do not count against it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use anyhow::{Result, bail};
use mdsec_common::{
    app::App,
    net::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    base::net::proto_name,
    detection::learn::{ObsKey, ObsVal, label},
    policy::model::{DEFAULT_LEARNING, Direction, Member, Mode, Peer, Policy, Rule},
};

pub struct Options<'a> {
    pub segment: &'a str,
    /// Mode of the suggested file; the segment's current mode when `None`.
    pub mode: Option<Mode>,
    /// Also use observations made after the learning period.
    pub all: bool,
    /// Written into the header (RFC 3339).
    pub now: String,
}

/// One suggested rule before printing.
#[derive(Default)]
struct Group {
    ports: BTreeSet<u16>,
    flows: u64,
    devices: BTreeSet<IpAddr>,
    first: String,
    last: String,
}

/// The suggested segment file.
pub fn suggest(policy: &Policy, rows: &[(ObsKey, ObsVal)], opts: &Options) -> Result<String> {
    let Some(si) = policy.segment_index(opts.segment) else {
        let names: Vec<&str> = policy.segments.iter().map(|s| s.name.as_str()).collect();
        bail!(
            "segment `{}` is not in the policy directory (segments: {}); add its file with members first",
            opts.segment,
            names.join(", ")
        );
    };
    let seg = &policy.segments[si];
    let rules: Vec<&Rule> = policy.rules.iter().filter(|r| r.segment == si).collect();
    let rows: Vec<&(ObsKey, ObsVal)> =
        rows.iter().filter(|(k, v)| k.segment == seg.name && (opts.all || v.learned)).collect();
    if rows.is_empty() {
        bail!(
            "no {}observations for segment `{}` in the state database yet: let the agent run with it in the policy{}",
            if opts.all { "" } else { "learned " },
            seg.name,
            if opts.all { "" } else { " (or pass --all to use observations after the learning period)" }
        );
    }

    // Apps seen per (direction, peer, proto, port), to decide `app:`.
    let mut apps: BTreeMap<(Direction, Peer, u8, u16), BTreeSet<&str>> = BTreeMap::new();
    let mut uncovered = Vec::new();
    let (mut by_rule, mut by_exception, mut inexpressible) = (0u64, 0u64, BTreeSet::new());
    for (k, v) in &rows {
        let peer = label(policy, k.peer, &k.peer_segment);
        match rules.iter().find(|r| covers(policy, r, k)) {
            Some(r) if !r.permanent() => by_exception += v.flows,
            Some(_) => by_rule += v.flows,
            None if !matches!(k.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6) => {
                inexpressible.insert(format!("{} {peer} proto {}", dir_word(k.direction), k.proto));
            }
            None => {
                if !k.app.is_empty() {
                    apps.entry((k.direction, peer.clone(), k.proto, k.port)).or_default().insert(&k.app);
                }
                uncovered.push((peer, k, v));
            }
        }
    }
    let mut groups: BTreeMap<(Peer, Direction, u8, Option<App>), Group> = BTreeMap::new();
    for (peer, k, v) in uncovered {
        let app = apps.get(&(k.direction, peer.clone(), k.proto, k.port)).and_then(|set| {
            let mut it = set.iter();
            match (it.next(), it.next()) {
                (Some(one), None) => App::from_name(one).filter(|a| *a != App::Unknown),
                _ => None,
            }
        });
        let g = groups.entry((peer, k.direction, k.proto, app)).or_default();
        if matches!(k.proto, IPPROTO_TCP | IPPROTO_UDP) {
            g.ports.insert(k.port);
        }
        g.flows += v.flows;
        g.devices.insert(k.device);
        if g.first.is_empty() || v.first_seen < g.first {
            g.first = v.first_seen.clone();
        }
        g.last = g.last.clone().max(v.last_seen.clone());
    }

    let mut y = String::new();
    let first = rows.iter().map(|(_, v)| v.first_seen.as_str()).min().unwrap_or("");
    let last = rows.iter().map(|(_, v)| v.last_seen.as_str()).max().unwrap_or("");
    let flows: u64 = rows.iter().map(|(_, v)| v.flows).sum();
    let _ = writeln!(y, "# Suggested by `mdsec-agent suggest --segment {}` at {}.", seg.name, opts.now);
    let _ = writeln!(
        y,
        "# From {} {}observations ({flows} flows) between {first} and {last}.",
        rows.len(),
        if opts.all { "" } else { "learned " }
    );
    let _ = writeln!(
        y,
        "# Already allowed by the current rules: {by_rule} flows; by exceptions (not made permanent): {by_exception} flows."
    );
    let _ = writeln!(y, "# Review every rule, then replace {} with this file.", seg.file.display());
    for x in &inexpressible {
        let _ = writeln!(y, "# Not expressible as a rule, left out: {x}.");
    }
    let _ = writeln!(y, "segment: {}", seg.name);
    let _ = writeln!(y, "function: {}", yaml_str(&seg.function));
    let _ = writeln!(y, "mode: {}", opts.mode.unwrap_or(seg.mode).name());
    let _ = writeln!(
        y,
        "default: {}",
        match seg.default {
            crate::policy::model::DefaultVerdict::Deny => "deny",
            crate::policy::model::DefaultVerdict::Allow => "allow",
        }
    );
    if seg.learning_period != DEFAULT_LEARNING {
        let _ = writeln!(y, "learning_period: {}", period_text(seg.learning_period));
    }
    if seg.require_approval {
        y += "require_approval: true\n";
    }
    if seg.new_devices != crate::policy::model::NewDevices::Allow {
        let _ = writeln!(y, "new_devices: {}", seg.new_devices.name());
    }
    y += "members:\n";
    for m in &seg.members {
        let (key, value, vlan) = match m {
            Member::Net { net, vlan } => ("cidr", net.to_string(), vlan),
            Member::Mac { mac, vlan } => ("mac", crate::base::net::mac_string(*mac), vlan),
        };
        let _ = writeln!(y, "  - {key}: {value}");
        if let Some(v) = vlan {
            let _ = writeln!(y, "    vlan: {v}");
        }
    }
    let kept: Vec<&&Rule> = rules.iter().filter(|r| r.permanent() && !r.quarantine).collect();
    if !kept.is_empty() || !groups.is_empty() {
        y += "allow:\n";
    }
    for r in kept {
        let _ = writeln!(y, "  # kept from {}", r.origin());
        write_rule(&mut y, r.direction, &r.peer, r.proto, &ports_text(&r.ports), r.app);
    }
    for ((peer, dir, proto, app), g) in &groups {
        let devices: Vec<String> = g.devices.iter().take(3).map(|d| d.to_string()).collect();
        let more =
            if g.devices.len() > 3 { format!(" and {} more", g.devices.len() - 3) } else { String::new() };
        let _ = writeln!(
            y,
            "  # observed: {} flows from {} device(s) ({}{more}), {} to {}",
            g.flows,
            g.devices.len(),
            devices.join(", "),
            g.first,
            g.last
        );
        let ranges = compress(&g.ports);
        let proto = match *proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6 => Some(*proto),
            _ => None,
        };
        write_rule(&mut y, *dir, peer, proto, &ports_text(&ranges), *app);
    }
    let quarantine: Vec<&&Rule> = rules.iter().filter(|r| r.quarantine).collect();
    if !quarantine.is_empty() {
        y += "quarantine_allow:\n";
    }
    for r in quarantine {
        let _ = writeln!(y, "  # kept from {}", r.origin());
        write_rule(&mut y, r.direction, &r.peer, r.proto, &ports_text(&r.ports), r.app);
    }
    let exceptions: Vec<&&Rule> = rules.iter().filter(|r| r.exception.is_some()).collect();
    if !exceptions.is_empty() {
        y += "exceptions:\n";
    }
    for r in exceptions {
        let e = r.exception.as_ref().unwrap();
        let _ = writeln!(y, "  # kept from {}", r.origin());
        write_rule(&mut y, r.direction, &r.peer, r.proto, &ports_text(&r.ports), r.app);
        let _ = writeln!(y, "    expires: {}", yaml_str(&e.expires_text));
        let _ = writeln!(y, "    reason: {}", yaml_str(&e.reason));
        let _ = writeln!(y, "    ticket: {}", yaml_str(&e.ticket));
    }
    let windows: Vec<(&&Rule, &crate::policy::window::Window)> =
        rules.iter().filter_map(|r| Some((r, r.window.as_ref()?))).collect();
    if !windows.is_empty() {
        y += "maintenance_windows:\n";
    }
    for (r, w) in windows {
        use crate::policy::window::{DAY_NAMES, time_text};
        let _ = writeln!(y, "  # kept from {}", r.origin());
        write_rule(&mut y, r.direction, &r.peer, r.proto, &ports_text(&r.ports), r.app);
        let days: Vec<&str> = (0..7).filter(|&d| w.days[d]).map(|d| DAY_NAMES[d]).collect();
        let _ = writeln!(y, "    days: [{}]", days.join(", "));
        let _ = writeln!(y, "    start: \"{}\"", time_text(w.start));
        let _ = writeln!(y, "    end: \"{}\"", time_text(w.end));
        let _ = writeln!(y, "    time_zone: {}", yaml_str(&w.time_zone_name));
        let _ = writeln!(y, "    reason: {}", yaml_str(&w.reason));
        let _ = writeln!(y, "    ticket: {}", yaml_str(&w.ticket));
    }
    Ok(y)
}

fn dir_word(d: Direction) -> &'static str {
    match d {
        Direction::Out => "to",
        Direction::In => "from",
    }
}

fn write_rule(
    y: &mut String,
    dir: Direction,
    peer: &Peer,
    proto: Option<u8>,
    ports: &[String],
    app: Option<App>,
) {
    let _ = writeln!(y, "  - {}: {}", dir_word(dir), yaml_str(&peer.to_string()));
    let _ = writeln!(y, "    proto: {}", proto.map_or("any".into(), proto_name));
    if !ports.is_empty() {
        let _ = writeln!(y, "    ports: [{}]", ports.join(", "));
    }
    if let Some(a) = app {
        let _ = writeln!(y, "    app: {}", a.name());
    }
}

/// Does `rule` (of the observation's segment) allow this observed communication?
fn covers(policy: &Policy, rule: &Rule, k: &ObsKey) -> bool {
    let peer_ok = match &rule.peer {
        Peer::Cidr(c) => c.contains(&k.peer),
        Peer::Name(n) => k.peer_segment == *n || policy.name_contains(n, &k.peer),
    };
    rule.direction == k.direction
        && peer_ok
        && rule.proto.is_none_or(|p| p == k.proto)
        && (rule.ports.is_empty() || rule.ports.iter().any(|&(a, b)| (a..=b).contains(&k.port)))
        // A flow without payload passes an app rule (the handshake does).
        && rule.app.is_none_or(|a| k.app.is_empty() || a.name() == k.app)
}

/// Consecutive ports as ranges.
fn compress(ports: &BTreeSet<u16>) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match out.last_mut() {
            Some((_, b)) if b.checked_add(1) == Some(p) => *b = p,
            _ => out.push((p, p)),
        }
    }
    out
}

fn ports_text(ranges: &[(u16, u16)]) -> Vec<String> {
    ranges.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("\"{a}-{b}\"") }).collect()
}

fn period_text(d: std::time::Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s > 0 && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// A plain scalar when that reads back as the same string, else a JSON string
/// (a valid YAML double-quoted scalar).
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null"
        );
    if plain { s.to_string() } else { serde_json::to_string(s).unwrap() }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::policy::model::load_dir;

    const PUMPS: &str = "segment: pumps\nfunction: infusion-pump\nmode: monitor\ndefault: deny\nlearning_period: 12h\nmembers:\n  - cidr: 10.0.1.0/24\n  - mac: 00:1a:2b:3c:4d:5e\n    vlan: 110\nallow:\n  - to: dns\n    proto: udp\n    ports: [53]\nexceptions:\n  - to: 203.0.113.40/32\n    proto: tcp\n    ports: [443]\n    expires: 2099-01-01T00:00:00Z\n    reason: \"vendor: firmware rollout\"\n    ticket: CHG-1\n";

    fn dir(name: &str, pumps: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mdsec-t-suggest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("zones.yaml"),
            "zones:\n  pharmacy: [10.0.2.0/24]\n  dns: [10.0.2.53/32]\n  workstations: [10.0.3.0/24]\n",
        )
        .unwrap();
        std::fs::write(d.join("pumps.yaml"), pumps).unwrap();
        d
    }

    fn obs(
        direction: Direction,
        device: &str,
        peer: &str,
        proto: u8,
        port: u16,
        app: &str,
        n: u64,
    ) -> (ObsKey, ObsVal) {
        (
            ObsKey {
                segment: "pumps".into(),
                direction,
                device: device.parse().unwrap(),
                peer: peer.parse().unwrap(),
                peer_segment: String::new(),
                proto,
                port,
                app: app.into(),
            },
            ObsVal {
                flows: n,
                first_seen: format!("2026-11-25T10:00:0{n}.000Z"),
                last_seen: format!("2026-11-25T11:00:0{n}.000Z"),
                learned: true,
            },
        )
    }

    #[test]
    fn suggestion_is_accepted_by_check_and_covers_what_was_seen() {
        let d = dir("ok", PUMPS);
        let (p, diags) = load_dir(&d, SystemTime::now());
        let p = p.unwrap_or_else(|| panic!("{diags:?}"));
        let rows = vec![
            obs(Direction::Out, "10.0.1.2", "10.0.2.10", 6, 2575, "hl7", 5),
            obs(Direction::Out, "10.0.1.3", "10.0.2.11", 6, 2575, "", 1),
            obs(Direction::Out, "10.0.1.2", "10.0.2.53", 17, 53, "dns", 7),
            obs(Direction::Out, "10.0.1.2", "10.0.2.10", 6, 2576, "hl7", 1),
            obs(Direction::Out, "10.0.1.2", "10.0.2.10", 6, 2577, "hl7", 1),
            obs(Direction::In, "10.0.1.2", "10.0.3.7", 6, 8443, "tls", 2),
            obs(Direction::In, "10.0.1.2", "10.0.3.8", 6, 8443, "unknown", 1),
            obs(Direction::Out, "10.0.1.2", "10.0.9.9", 1, 0, "", 3),
            obs(Direction::Out, "10.0.1.2", "203.0.113.40", 6, 443, "tls", 4),
            obs(Direction::Out, "10.0.1.2", "10.0.9.9", 47, 0, "", 1),
        ];
        let opts = Options { segment: "pumps", mode: Some(Mode::Enforce), all: false, now: "T".into() };
        let y = suggest(&p, &rows, &opts).unwrap();
        std::fs::write(d.join("pumps.yaml"), &y).unwrap();
        let (p2, diags) = load_dir(&d, SystemTime::now());
        let p2 = p2.unwrap_or_else(|| panic!("{y}\n{diags:?}"));
        assert!(diags.is_empty(), "{diags:?}");
        let s = &p2.segments[p2.segment_index("pumps").unwrap()];
        assert_eq!(s.mode, Mode::Enforce);
        assert_eq!(s.learning_period, std::time::Duration::from_secs(12 * 3600));
        assert_eq!(s.members, p.segments[0].members);
        // Every observation but the exception's and the GRE one is now covered by a
        // permanent rule; the exception stays an exception.
        for (k, _) in &rows {
            let permanent = p2.rules.iter().any(|r| r.exception.is_none() && covers(&p2, r, k));
            let expect = k.port != 443 && k.proto != 47;
            assert_eq!(permanent, expect, "{k:?}\n{y}");
        }
        assert_eq!(p2.rules.iter().filter(|r| r.exception.is_some()).count(), 1);
        // HL7 ports 2575-2577 in one rule with the app; TLS/unknown on 8443 gets no app.
        let hl7 = p2.rules.iter().find(|r| r.ports.contains(&(2575, 2577))).expect(&y);
        assert_eq!((hl7.app, &hl7.peer), (Some(App::Hl7), &Peer::Name("pharmacy".into())));
        let bench = p2.rules.iter().find(|r| r.direction == Direction::In).expect(&y);
        assert_eq!(
            (bench.app, &bench.peer, &bench.ports),
            (None, &Peer::Name("workstations".into()), &vec![(8443, 8443)])
        );
        let icmp = p2.rules.iter().find(|r| r.proto == Some(1)).expect(&y);
        assert_eq!(icmp.peer, Peer::Cidr("10.0.9.9/32".parse().unwrap()));
        assert!(y.contains("Not expressible as a rule, left out: to 10.0.9.9/32 proto 47"), "{y}");
        assert!(y.contains("# observed: 8 flows from 2 device(s) (10.0.1.2, 10.0.1.3), 2026-11-25T10:00:01.000Z to 2026-11-25T11:00:05.000Z"), "{y}");
        assert!(y.contains("# kept from ") && y.contains("reason: \"vendor: firmware rollout\""), "{y}");
        // Idempotent: suggesting again from the new file adds nothing.
        let again = suggest(&p2, &rows, &opts).unwrap();
        assert_eq!(again.matches("# observed:").count(), 0, "{again}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_suggestion_keeps_the_quarantine_settings() {
        let pumps = PUMPS.replace("mode: monitor", "mode: enforce")
            + "new_devices: quarantine\nquarantine_allow:\n  - to: workstations\n    proto: tcp\n    ports: [443]\n";
        let d = dir("quarantine", &pumps);
        let (p, diags) = load_dir(&d, SystemTime::now());
        let p = p.unwrap_or_else(|| panic!("{diags:?}"));
        let rows = vec![obs(Direction::Out, "10.0.1.2", "10.0.2.10", 6, 2575, "hl7", 5)];
        let opts = Options { segment: "pumps", mode: None, all: false, now: "T".into() };
        let y = suggest(&p, &rows, &opts).unwrap();
        std::fs::write(d.join("pumps.yaml"), &y).unwrap();
        let (p2, diags) = load_dir(&d, SystemTime::now());
        let p2 = p2.unwrap_or_else(|| panic!("{y}\n{diags:?}"));
        assert_eq!(p2.segments[0].new_devices, crate::policy::model::NewDevices::Quarantine, "{y}");
        let q: Vec<String> = p2.rules.iter().filter(|r| r.quarantine).map(|r| r.text()).collect();
        assert_eq!(q, ["quarantine to workstations tcp 443"], "{y}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn clear_errors_for_unknown_segments_and_empty_baselines() {
        let d = dir("err", PUMPS);
        let (p, _) = load_dir(&d, SystemTime::now());
        let p = p.unwrap();
        let opts = |segment| Options { segment, mode: None, all: false, now: "T".into() };
        let e = suggest(&p, &[], &opts("pump")).unwrap_err().to_string();
        assert!(e.contains("segment `pump` is not in the policy directory (segments: pumps)"), "{e}");
        let mut late = obs(Direction::Out, "10.0.1.2", "10.0.2.10", 6, 2575, "hl7", 1);
        late.1.learned = false;
        let e = suggest(&p, &[late.clone()], &opts("pumps")).unwrap_err().to_string();
        assert!(e.contains("no learned observations for segment `pumps`") && e.contains("--all"), "{e}");
        let all = Options { all: true, ..opts("pumps") };
        assert!(suggest(&p, &[late], &all).unwrap().contains("to: pharmacy"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn scalars_are_quoted_when_yaml_would_read_them_differently() {
        assert_eq!(yaml_str("infusion-pump"), "infusion-pump");
        assert_eq!(yaml_str("yes"), "\"yes\"");
        assert_eq!(yaml_str("10.0.2.0/24"), "\"10.0.2.0/24\"");
        assert_eq!(yaml_str("vendor: x # y"), "\"vendor: x # y\"");
        assert_eq!(compress(&BTreeSet::from([1, 2, 3, 5, 65535])), vec![(1, 3), (5, 5), (65535, 65535)]);
        assert_eq!(period_text(std::time::Duration::from_secs(90)), "90s");
        assert_eq!(period_text(std::time::Duration::from_secs(7200)), "2h");
    }
}

//! `simulate`: a proposed policy judged against the communication recorded in
//! the state database (each segment's baseline observations), before it is
//! applied. Every communication goes through the reference model
//! (`mdsec_common::model::Model::judge`: identity, policy, replies, defaults,
//! app rules, the stage code the differential test holds equal to the
//! datapath's) with the proposed policy compiled exactly as the loader would
//! write it.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::SystemTime,
};

use mdsec_common::{
    app::App,
    model::{Communication, Model},
    net::ip_to_key,
    policy::Verdict,
};
use serde::Serialize;

use crate::{
    base::clock::{mono_ns, parse_rfc3339},
    detection::{
        learn::{ObsKey, ObsVal},
        triage::{Impact, TriageConfig},
    },
    inventory::Device,
    policy::{compile::Compiled, model::Direction, model::Policy},
};

/// What became of one recorded communication under the proposed policy.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Judged {
    /// `out`: the device opened it; `in`: the peer did.
    pub direction: &'static str,
    pub peer: String,
    pub peer_segment: String,
    pub proto: String,
    pub port: u16,
    /// The app its payload was identified as (empty: no payload seen).
    pub app: String,
    pub flows: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// The datapath's verdict name (`allow`, `reply`, `exempt`, `app_pending`,
    /// `would_drop`, `drop`, `unevaluated`).
    pub verdict: &'static str,
    /// `allowed`, `would-drop` (passes, counted: monitor mode) or `dropped`.
    pub outcome: &'static str,
    /// The rule that decided it (`file:line:col`: the allowing rule, or the app
    /// rule whose app the payload was not), or `default`.
    pub rule: String,
    /// Why, in words: the rule, the app a rule required, the default.
    pub reason: String,
}

/// One device's communication under the proposed policy.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceResult {
    pub device: String,
    pub mac: String,
    pub segment: String,
    pub function: String,
    pub impact: String,
    pub communications: Vec<Judged>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Simulation {
    pub policy_dir: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub communications: usize,
    pub allowed: usize,
    pub would_drop: usize,
    pub dropped: usize,
    /// Dropped communications of devices at or above the `--fail-on` impact.
    pub dropped_at_threshold: usize,
    pub threshold: String,
    pub devices: Vec<DeviceResult>,
}

pub struct Inputs<'a> {
    pub policy: &'a Policy,
    pub compiled: &'a Compiled,
    pub observations: &'a [(ObsKey, ObsVal)],
    /// The stored inventory: each address's MAC and VLAN (MAC members and
    /// VLAN-scoped members are identities too).
    pub devices: &'a [Device],
    pub triage: &'a TriageConfig,
    pub from: Option<SystemTime>,
    pub to: Option<SystemTime>,
    /// Dropped communication of a device at this impact or worse fails the run.
    pub threshold: Option<Impact>,
}

/// The outcome name of a datapath verdict.
pub fn outcome(v: Verdict) -> &'static str {
    match v {
        Verdict::Drop => "dropped",
        Verdict::WouldDrop => "would-drop",
        _ => "allowed",
    }
}

pub fn simulate(i: &Inputs, policy_dir: &str) -> Simulation {
    let mut model = Model::new(i.compiled.model_tables(1));
    let now = mono_ns();
    let ident: HashMap<IpAddr, ([u8; 6], u16)> =
        i.devices.iter().flat_map(|d| d.ips.iter().map(move |ip| (*ip, (d.mac.0, d.vlan)))).collect();
    let when = |s: &str| parse_rfc3339(s);
    let mut by_device: BTreeMap<(String, IpAddr), Vec<Judged>> = BTreeMap::new();
    for (k, v) in i.observations {
        // Within the period: seen at some point between `from` and `to`.
        if i.from.is_some_and(|f| when(&v.last_seen).is_some_and(|l| l < f))
            || i.to.is_some_and(|t| when(&v.first_seen).is_some_and(|f| f > t))
        {
            continue;
        }
        let (src, dst) = match k.direction {
            Direction::Out => (k.device, k.peer),
            Direction::In => (k.peer, k.device),
        };
        let (src_mac, vlan) = ident.get(&src).copied().unwrap_or_default();
        let (dst_mac, _) = ident.get(&dst).copied().unwrap_or_default();
        // An ephemeral client port; ICMP: the echo request (type 8 / 128, code 0).
        let (sport, dport) = match k.proto {
            1 => (8, 0),
            58 => (128, 0),
            _ => (40000, k.port),
        };
        let c = Communication {
            ifindex: 0,
            vlan,
            src_mac,
            dst_mac,
            src: ip_to_key(src),
            dst: ip_to_key(dst),
            proto: k.proto,
            sport,
            dport,
            // No payload seen: none to classify (an app rule stays pending).
            app: (!k.app.is_empty()).then(|| App::from_name(&k.app).unwrap_or(App::Unknown) as u8),
        };
        let fs = model.judge(&c, now);
        let verdict = Verdict::from_u8(fs.verdict);
        let rule = i.policy.rules.iter().find(|r| r.id == fs.rule && fs.rule != 0).map(|r| r.origin());
        let short = |r: &str| r.rsplit('/').next().unwrap_or(r).to_string();
        let reason = match (verdict, &rule) {
            (Verdict::Drop | Verdict::WouldDrop, Some(r)) => {
                let want = App::from_u8(fs.required_app).name();
                format!("{} requires app {want}", short(r))
            }
            (Verdict::Drop | Verdict::WouldDrop, None) => "default deny".to_string(),
            (Verdict::AppPending, Some(r)) => format!("{}: no payload seen to check", short(r)),
            (Verdict::Exempt, _) => "link-local control, never policed".to_string(),
            (Verdict::Unevaluated, _) => "no segment involved".to_string(),
            (_, Some(r)) => short(r),
            (_, None) => verdict.name().to_string(),
        };
        by_device.entry((k.segment.clone(), k.device)).or_default().push(Judged {
            direction: if k.direction == Direction::Out { "out" } else { "in" },
            peer: k.peer.to_string(),
            peer_segment: k.peer_segment.clone(),
            proto: crate::base::net::proto_name(k.proto),
            port: k.port,
            app: k.app.clone(),
            flows: v.flows,
            first_seen: v.first_seen.clone(),
            last_seen: v.last_seen.clone(),
            verdict: verdict.name(),
            outcome: outcome(verdict),
            rule: rule.unwrap_or_else(|| "default".into()),
            reason,
        });
    }
    let mut s = Simulation {
        policy_dir: policy_dir.into(),
        from: i.from.map(crate::base::clock::rfc3339),
        to: i.to.map(crate::base::clock::rfc3339),
        communications: 0,
        allowed: 0,
        would_drop: 0,
        dropped: 0,
        dropped_at_threshold: 0,
        threshold: i.threshold.map_or("none", Impact::name).into(),
        devices: Vec::new(),
    };
    for ((segment, ip), comms) in by_device {
        let function = i.policy.segments.iter().find(|g| g.name == segment).map(|g| g.function.clone());
        let function = function.unwrap_or_default();
        let impact = i.triage.lookup(&function).impact;
        for c in &comms {
            s.communications += 1;
            match c.outcome {
                "dropped" => {
                    s.dropped += 1;
                    if i.threshold.is_some_and(|t| impact <= t) {
                        s.dropped_at_threshold += 1;
                    }
                }
                "would-drop" => s.would_drop += 1,
                _ => s.allowed += 1,
            }
        }
        s.devices.push(DeviceResult {
            device: ip.to_string(),
            mac: ident.get(&ip).map(|m| crate::base::net::mac_string(m.0)).unwrap_or_default(),
            segment,
            function,
            impact: impact.name().into(),
            communications: comms,
        });
    }
    s
}

/// `tcp/2575`, or `icmp` alone (ICMP has no port).
pub fn service(proto: &str, port: u16) -> String {
    if matches!(proto, "icmp" | "icmpv6") { proto.into() } else { format!("{proto}/{port}") }
}

/// The simulation as a terminal report (80 columns): one block per device,
/// its dropped communication first; dates and full paths are in `--json`.
pub fn text(s: &Simulation) -> String {
    let mut out = format!(
        "{} communications under {}:\n{} allowed, {} would-drop, {} dropped",
        s.communications, s.policy_dir, s.allowed, s.would_drop, s.dropped
    );
    if s.threshold != "none" {
        out += &format!(" ({} of {} devices or worse)", s.dropped_at_threshold, s.threshold);
    }
    out += "\n";
    for d in &s.devices {
        out += &format!(
            "\n{} {} segment {} ({}, {})\n",
            d.device,
            if d.mac.is_empty() { "-" } else { &d.mac },
            d.segment,
            d.function,
            d.impact
        );
        let mut comms: Vec<&Judged> = d.communications.iter().collect();
        comms.sort_by_key(|c| (c.outcome != "dropped", c.outcome != "would-drop", c.peer.clone(), c.port));
        for c in comms {
            let arrow = if c.direction == "out" { "->" } else { "<-" };
            let service = service(&c.proto, c.port);
            let app = if c.app.is_empty() { "-" } else { &c.app };
            out += &format!(
                "  {:<10} {arrow} {:<15} {:<9} {:<7} {:>4}  {}\n",
                c.outcome, c.peer, service, app, c.flows, c.reason
            );
        }
    }
    out
}

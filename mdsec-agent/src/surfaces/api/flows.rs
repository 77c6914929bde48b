//! `GET /api/v1/flows`: filtered pages (cursor = record id) and the streamed
//! NDJSON export. Both walk the flow records in id order under the tables'
//! read lock, on a blocking thread, never on the async workers.

use mdsec_common::{
    app::{App, Confidence},
    flow::{FlowKey, FlowKey4},
    net::{ip_to_key, is_v4_mapped},
    policy::Verdict,
};

use super::query::{BadParam, Filter};
use crate::{
    base::clock::{Anchor, rfc3339},
    base::net::{proto_name, tcp_flag_names},
    datapath::loader::Attached,
    datapath::state::{FlowRecord, Tables},
    policy::runtime::PolicyState,
    surfaces::model,
};

/// Addresses a filter compares with flow keys, in both key forms (IPv4 flows
/// are compared on their own 4-byte addresses).
#[derive(Default)]
struct Addrs {
    any: Vec<[u8; 16]>,
    v4: Vec<[u8; 4]>,
}

impl Addrs {
    fn push(&mut self, ip: std::net::IpAddr) {
        let k = ip_to_key(ip);
        if is_v4_mapped(&k) {
            self.v4.push([k[12], k[13], k[14], k[15]]);
        }
        self.any.push(k);
    }

    fn either(&self, k: &FlowKey) -> bool {
        self.any.iter().any(|ip| k.src == *ip || k.dst == *ip)
    }

    fn either4(&self, k: &FlowKey4) -> bool {
        self.v4.iter().any(|ip| k.src == *ip || k.dst == *ip)
    }
}

/// A filter resolved against the tables and the policy: names become the
/// indexes and numbers the records hold.
pub struct FlowMatch {
    /// `mac=`: the device records of that MAC (a flow they own is the
    /// device's) and their addresses (flows to or from them).
    device: Option<(Vec<u32>, Addrs)>,
    ip: Option<Addrs>,
    ifindex: Option<u32>,
    /// (generation, segment index) pairs that name the segment asked for.
    segment: Option<Vec<(u32, u32)>>,
    verdict: Option<u8>,
    app: Option<App>,
    since_ns: Option<u64>,
}

/// The datapath clock at a wall-clock time (for `since`).
pub fn mono_at(anchor: &Anchor, t: std::time::SystemTime) -> u64 {
    match anchor.wall(anchor.mono_ns()).duration_since(t) {
        Ok(ago) => anchor.mono_ns().saturating_sub(ago.as_nanos() as u64),
        Err(ahead) => anchor.mono_ns().saturating_add(ahead.duration().as_nanos() as u64),
    }
}

/// `iface=NAME` → its ifindex, or a 400 naming the attached ones.
pub fn ifindex(name: &str, attached: &[Attached]) -> Result<u32, BadParam> {
    attached.iter().find(|a| a.name == name).map(|a| a.ifindex).ok_or_else(|| {
        let all: Vec<&str> = attached.iter().map(|a| a.name.as_str()).collect();
        BadParam {
            param: "iface".into(),
            message: format!("no interface `{name}` is attached ({})", all.join(", ")),
        }
    })
}

/// `segment=NAME` must name a segment of the active (or previous) policy.
pub fn check_segment(name: &str, policy: &PolicyState) -> Result<Vec<(u32, u32)>, BadParam> {
    let pairs: Vec<(u32, u32)> = [&policy.current, &policy.previous]
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let idx = i.policy.segments.iter().position(|s| s.name == name)?;
            Some((i.generation, idx as u32 + 1))
        })
        .collect();
    if pairs.is_empty() {
        let all: Vec<String> =
            policy.current.iter().flat_map(|i| i.policy.segments.iter().map(|s| s.name.clone())).collect();
        return Err(BadParam {
            param: "segment".into(),
            message: format!("no segment `{name}` in the active policy ({})", all.join(", ")),
        });
    }
    Ok(pairs)
}

impl FlowMatch {
    pub fn new(
        f: &Filter,
        t: &Tables,
        policy: &PolicyState,
        attached: &[Attached],
        anchor: &Anchor,
    ) -> Result<FlowMatch, BadParam> {
        let device = f.mac.map(|mac| {
            let (mut owners, mut ips) = (Vec::new(), Addrs::default());
            // One MAC may have records on several interfaces or VLANs.
            for (i, _, d) in t.devices.iter().filter(|(_, k, _)| k.mac == mac) {
                owners.push(i);
                d.ips.iter().for_each(|ip| ips.push(*ip));
            }
            (owners, ips)
        });
        Ok(FlowMatch {
            device,
            ip: f.ip.map(|ip| {
                let mut a = Addrs::default();
                a.push(ip);
                a
            }),
            ifindex: f.iface.as_deref().map(|n| ifindex(n, attached)).transpose()?,
            segment: f.segment.as_deref().map(|n| check_segment(n, policy)).transpose()?,
            verdict: f.verdict.map(|v| v as u8),
            app: f.app,
            since_ns: f.since.map(|s| mono_at(anchor, s)),
        })
    }

    /// The record's own fields (not the key's addresses).
    fn record_matches(&self, ifindex: u32, r: &FlowRecord) -> bool {
        self.ifindex.is_none_or(|ix| ix == ifindex)
            && self.verdict.is_none_or(|v| r.verdict == v)
            && self.app.is_none_or(|a| {
                Confidence::from_u8(r.app_confidence) != Confidence::None && App::from_u8(r.app) == a
            })
            && self.since_ns.is_none_or(|s| r.last_seen_ns >= s)
            && self.segment.as_ref().is_none_or(|seg| seg.contains(&(r.generation, u32::from(r.segment))))
    }

    /// `owner`: the device the flow's frames count for (an index into `Devices`).
    pub fn matches(&self, k: &FlowKey, owner: u32, r: &FlowRecord) -> bool {
        self.record_matches(k.ifindex, r)
            && self.ip.as_ref().is_none_or(|ip| ip.either(k))
            && self.device.as_ref().is_none_or(|(owners, ips)| owners.contains(&owner) || ips.either(k))
    }

    /// The key and owner conditions alone, on an IPv4 flow's own key: a
    /// device's flows are found among a million by a scan of the key and
    /// owner columns, with 4-byte compares, before any record is read.
    pub fn key_matches4(&self, k: &FlowKey4, owner: u32) -> bool {
        self.ifindex.is_none_or(|ix| ix == k.ifindex)
            && self.ip.as_ref().is_none_or(|ip| ip.either4(k))
            && self.device.as_ref().is_none_or(|(owners, ips)| owners.contains(&owner) || ips.either4(k))
    }
}

/// What turns a record into its JSON shape (interface names, rule origins,
/// segment names, wall-clock times).
pub struct FlowView<'a> {
    pub anchor: Anchor,
    pub policy: &'a PolicyState,
    pub attached: &'a [Attached],
}

impl FlowView<'_> {
    pub fn flow(&self, k: &FlowKey, r: &FlowRecord) -> model::Flow {
        let tot = r.totals();
        let policy = self.policy;
        model::Flow {
            iface: crate::surfaces::state::ifname(self.attached, k.ifindex),
            vlan: k.vlan,
            src: k.src_ip().to_string(),
            dst: k.dst_ip().to_string(),
            proto: proto_name(k.proto),
            proto_num: k.proto,
            sport: k.sport,
            dport: k.dport,
            packets: tot.packets,
            bytes: tot.bytes,
            first_seen: rfc3339(self.anchor.wall(r.first_seen_ns)),
            last_seen: rfc3339(self.anchor.wall(r.last_seen_ns)),
            tcp_flags: tcp_flag_names(r.tcp_flags),
            verdict: Verdict::from_u8(r.verdict).name().into(),
            rule: super::describe_rule(policy, r.generation, r.rule),
            segment: policy
                .segment(r.generation, u32::from(r.segment))
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            app: App::from_u8(r.app).name().into(),
            app_confidence: Confidence::from_u8(r.app_confidence).name().into(),
        }
    }
}

/// One step of a walk: the matches after `after` (at most `limit`, having
/// looked at no more than `budget` records), the last id looked at, and
/// whether the walk reached the end of the records. `emit` gets each match.
pub struct Step {
    pub found: usize,
    pub last: u64,
    pub end: bool,
}

pub fn step(
    t: &Tables,
    m: &FlowMatch,
    view: &FlowView,
    after: u64,
    limit: usize,
    budget: usize,
    mut emit: impl FnMut(model::Flow),
) -> Step {
    let mut s = Step { found: 0, last: after, end: true };
    for (n, (k, owner, r)) in t.flows.after_owned(after).enumerate() {
        if n == budget || s.found == limit {
            s.end = false;
            break;
        }
        s.last = r.id;
        if m.matches(&k, owner, r) {
            s.found += 1;
            emit(view.flow(&k, r));
        }
    }
    s
}

/// One page (no scan budget): each store's first `limit` matches after
/// `after`, merged by id. Every match with an id up to the page's last is in
/// it, so the next page starts there. The IPv4 store is scanned on its own
/// keys. Returns the page and whether more may follow.
pub fn page(
    t: &Tables,
    m: &FlowMatch,
    view: &FlowView,
    after: u64,
    limit: usize,
) -> (Vec<(u64, model::Flow)>, bool) {
    let v4 = t
        .flows
        .v4()
        .after_picked(after, |k, o| m.key_matches4(k, o))
        .filter(|(k, _, r)| m.record_matches(k.ifindex, r))
        .map(|(k, _, r)| (k.into(), r));
    let v6 = t.flows.v6().after_owned(after).filter(|(k, o, r)| m.matches(k, *o, r)).map(|(k, _, r)| (k, r));
    // One more than a page from each: whether more follow. Only the page's
    // own flows are turned into their JSON shape.
    let mut all: Vec<(FlowKey, &FlowRecord)> = v4.take(limit + 1).chain(v6.take(limit + 1)).collect();
    all.sort_by_key(|(_, r)| r.id);
    let more = all.len() > limit;
    all.truncate(limit);
    let all = all.into_iter().map(|(k, r)| (r.id, view.flow(&k, r))).collect();
    (all, more)
}

//! Compiles a validated [`Policy`] into datapath entries: identities (LPM prefixes
//! and MACs → id), per-id segment info, and allow entries keyed by
//! (src id, dst id, proto, port prefix).
//!
//! Identities are per distinct prefix, not per name: the longest matching prefix
//! decides an address's id, and each id carries every name (zone, segment, CIDR
//! peer) whose addresses contain that prefix. A rule naming a zone therefore also
//! covers a more specific prefix inside it that some other name introduced.

use std::time::SystemTime;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use mdsec_common::{
    net::ip_to_key,
    policy::{
        IDENT_HEADER_BITS, IdentData, MAX_IDS, MacKey, POLICY_ANY_PORT_BITS, POLICY_ANY_PROTO_BITS,
        POLICY_FLAG_EXCEPTION, PolicyData, PolicyValue, SEG_DEFAULT_ALLOW, SEG_ENFORCE, SEG_MEMBER,
        SegmentInfo,
    },
    segstats::MAX_SEGMENTS,
};

use super::model::{DefaultVerdict, Direction, Member, Mode, NewDevices, Peer, Policy};
use crate::base::clock::Anchor;

/// An IDENT entry without its generation byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdentEntry {
    pub prefix_len: u32,
    pub vlan: Option<u16>,
    pub addr: [u8; 16],
    pub id: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacEntry {
    pub mac: [u8; 6],
    pub vlan: Option<u16>,
    pub id: u32,
}

/// A POLICY entry without its generation byte: (src, dst, proto, port) and how many
/// of those 88 bits (after the gen byte) are significant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub prefix_len: u32,
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub port: u16,
}

impl IdentEntry {
    /// The IDENT key data in generation half `bit`.
    pub fn data(&self, bit: u8) -> IdentData {
        IdentData {
            generation: bit,
            scoped: self.vlan.is_some() as u8,
            vlan: self.vlan.unwrap_or(0).to_be_bytes(),
            addr: self.addr,
        }
    }
}

impl MacEntry {
    /// The MACS key in generation half `bit`.
    pub fn key(&self, bit: u8) -> MacKey {
        MacKey {
            generation: bit,
            scoped: self.vlan.is_some() as u8,
            vlan: self.vlan.unwrap_or(0),
            mac: self.mac,
            _pad: [0; 2],
        }
    }
}

impl PolicyKey {
    /// The POLICY key data in generation half `bit`.
    pub fn data(&self, bit: u8) -> PolicyData {
        PolicyData {
            generation: bit,
            src: self.src.to_be_bytes(),
            dst: self.dst.to_be_bytes(),
            proto: self.proto,
            port: self.port.to_be_bytes(),
        }
    }
}

/// What one identity stands for (index = id; id 0 is "no identity").
#[derive(Debug, Clone, Default)]
pub struct IdInfo {
    pub names: BTreeSet<Peer>,
    pub segment: Option<usize>,
    pub description: String,
    /// The quarantine identity of `segment` (`policy::quarantine`).
    pub quarantine: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Compiled {
    pub idents: Vec<IdentEntry>,
    pub macs: Vec<MacEntry>,
    /// SEGMENTS entries for ids that belong to a segment.
    pub segments: Vec<(u32, SegmentInfo)>,
    pub policy: Vec<(PolicyKey, PolicyValue)>,
    pub ids: Vec<IdInfo>,
    /// The earliest future opening among the entries (`PolicyConfig::reevaluate_at_ns`), 0 = none.
    pub reevaluate_at_ns: u64,
}

impl Compiled {
    /// The reference model's view of the maps this policy is written into as
    /// `generation` (the key construction `PolicyMaps::apply` uses): what the
    /// differential test and `simulate` decide with.
    pub fn model_tables(&self, generation: u32) -> mdsec_common::model::Tables {
        let bit = (generation & 1) as u8;
        mdsec_common::model::Tables {
            generation,
            idents: self.idents.iter().map(|e| (e.prefix_len, e.data(bit), e.id)).collect(),
            macs: self.macs.iter().map(|m| (m.key(bit), m.id)).collect(),
            segments: self.segments.iter().copied().collect(),
            policy: self.policy.iter().map(|(k, v)| (k.prefix_len, k.data(bit), *v)).collect(),
            reevaluate_at_ns: self.reevaluate_at_ns,
        }
    }
}

/// Capacity limits (per generation) the compiled policy must fit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idents: usize,
    pub macs: usize,
    pub policy: usize,
}

impl Limits {
    /// What the datapath's maps hold: each generation gets half of every map.
    pub const DATAPATH: Limits = Limits {
        idents: mdsec_common::maps::DEFAULT_IDENT_MAX as usize / 2,
        macs: mdsec_common::maps::DEFAULT_MACS_MAX as usize / 2,
        policy: mdsec_common::maps::DEFAULT_POLICY_MAX as usize / 2,
    };
}

fn v4_or_v6(net: &IpNet) -> ([u8; 16], u32) {
    match net {
        IpNet::V4(n) => (ip_to_key(IpAddr::V4(n.network())), 96 + n.prefix_len() as u32),
        IpNet::V6(n) => (ip_to_key(IpAddr::V6(n.network())), n.prefix_len() as u32),
    }
}

/// Splits an inclusive port range into prefix-aligned blocks: (first port, bits).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (lo as u32, hi as u32);
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = 1u32;
        while size < 65536 && lo.is_multiple_of(size * 2) && lo + size * 2 - 1 <= hi {
            size *= 2;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

pub fn compile(p: &Policy, anchor: &Anchor, limits: Limits) -> Result<Compiled, String> {
    let mut c = Compiled { ids: vec![IdInfo::default()], ..Default::default() };
    if p.segments.len() > MAX_SEGMENTS as usize {
        return Err(format!("{} segments; the datapath holds {MAX_SEGMENTS}", p.segments.len()));
    }

    // 1. Every distinct (scope, prefix) becomes an identity.
    let mut prefixes: BTreeSet<(Option<u16>, IpNet)> = BTreeSet::new();
    for s in &p.segments {
        for m in &s.members {
            if let Member::Net { net, vlan } = m {
                prefixes.insert((*vlan, *net));
            }
        }
    }
    for z in &p.zones {
        prefixes.extend(z.cidrs.iter().map(|n| (None, *n)));
    }
    for r in &p.rules {
        if let Peer::Cidr(n) = &r.peer {
            prefixes.insert((None, *n));
        }
    }
    for (scope, net) in &prefixes {
        let id = c.ids.len() as u32;
        let mut info = IdInfo {
            description: scope.map_or(net.to_string(), |v| format!("{net} vlan {v}")),
            ..Default::default()
        };
        for (i, s) in p.segments.iter().enumerate() {
            for m in &s.members {
                if let Member::Net { net: mnet, vlan } = m
                    && (vlan.is_none() || vlan == scope)
                    && mnet.contains(net)
                {
                    info.names.insert(Peer::Name(s.name.clone()));
                    // Validation rejects overlapping members of different segments;
                    // a VLAN-scoped member beats an unscoped one.
                    if info.segment.is_none() || vlan.is_some() {
                        info.segment = Some(i);
                    }
                }
            }
        }
        for z in &p.zones {
            if z.cidrs.iter().any(|zc| zc.contains(net)) {
                info.names.insert(Peer::Name(z.name.clone()));
            }
        }
        for r in &p.rules {
            if let Peer::Cidr(rc) = &r.peer
                && rc.contains(net)
            {
                info.names.insert(Peer::Cidr(*rc));
            }
        }
        let (addr, bits) = v4_or_v6(net);
        c.idents.push(IdentEntry { prefix_len: IDENT_HEADER_BITS + bits, vlan: *scope, addr, id });
        c.ids.push(info);
    }
    // 2. MAC members: an identity each, naming only their segment.
    for (i, s) in p.segments.iter().enumerate() {
        for m in &s.members {
            if let Member::Mac { mac, vlan } = m {
                let id = c.ids.len() as u32;
                let mut info = IdInfo {
                    segment: Some(i),
                    description: crate::base::net::mac_string(*mac),
                    ..Default::default()
                };
                info.names.insert(Peer::Name(s.name.clone()));
                c.ids.push(info);
                c.macs.push(MacEntry { mac: *mac, vlan: *vlan, id });
            }
        }
    }
    // 2b. Quarantine: one identity per segment that quarantines new
    // devices, named by no peer; the devices' MACs and in-segment addresses
    // map to it (an address entry replaces a member prefix of the same key).
    for (i, s) in p.segments.iter().enumerate() {
        if s.mode != Mode::Enforce || s.new_devices == NewDevices::Allow {
            continue;
        }
        let id = c.ids.len() as u32;
        c.ids.push(IdInfo {
            segment: Some(i),
            description: format!("quarantine of {}", s.name),
            quarantine: true,
            ..Default::default()
        });
        let mut macs = BTreeSet::new();
        for q in p.quarantined.iter().filter(|q| q.segment == s.name) {
            if let Some(mac) = q.mac_bytes()
                && macs.insert(mac)
            {
                c.macs.push(MacEntry { mac, vlan: None, id });
            }
            for ip in &q.ips {
                let (addr, bits) = v4_or_v6(&IpNet::from(*ip));
                let scopes = std::iter::once(None).chain((q.vlan != 0).then_some(Some(q.vlan)));
                for vlan in scopes {
                    let e = IdentEntry { prefix_len: IDENT_HEADER_BITS + bits, vlan, addr, id };
                    match c
                        .idents
                        .iter_mut()
                        .find(|x| (x.prefix_len, x.vlan, x.addr) == (e.prefix_len, vlan, addr))
                    {
                        Some(x) => x.id = id,
                        None => c.idents.push(e),
                    }
                }
            }
        }
    }
    if c.ids.len() >= MAX_IDS as usize {
        return Err(format!("{} identities; the datapath holds {}", c.ids.len() - 1, MAX_IDS - 1));
    }
    // 3. Segment info per member id.
    for (id, info) in c.ids.iter().enumerate() {
        if let Some(si) = info.segment {
            let s = &p.segments[si];
            let mut flags = SEG_MEMBER;
            if info.quarantine {
                // Default deny; `new_devices: monitor` only counts.
                if s.new_devices == NewDevices::Quarantine {
                    flags |= SEG_ENFORCE;
                }
            } else {
                if s.mode == Mode::Enforce {
                    flags |= SEG_ENFORCE;
                }
                if s.default == DefaultVerdict::Allow {
                    flags |= SEG_DEFAULT_ALLOW;
                }
            }
            c.segments.push((id as u32, SegmentInfo { flags, _pad: [0; 3], segment: si as u32 + 1 }));
        }
    }
    // 4. Allow entries. Permanent rules win over exceptions on the same key.
    let mut entries: BTreeMap<PolicyKey, PolicyValue> = BTreeMap::new();
    let now = anchor.wall(anchor.mono_ns());
    // Datapath time of a wall-clock instant (at least 1: 0 means "none").
    let mono = |t: SystemTime| {
        let ahead = t.duration_since(now).unwrap_or_default();
        anchor.mono_ns().saturating_add(ahead.as_nanos() as u64).max(1)
    };
    for r in &p.rules {
        let (flags, expires_ns, opens_ns) = match (&r.exception, &r.window) {
            (None, None) => (0, 0, 0),
            (Some(e), _) if e.expires <= now => continue,
            (Some(e), _) => (POLICY_FLAG_EXCEPTION, mono(e.expires), 0),
            // The occurrence open now, or the next: the kernel opens and
            // closes it; the reloader writes the one after (`runtime`).
            (None, Some(w)) => match w.occurrence(now) {
                None => continue,
                Some((opens, closes)) => {
                    (POLICY_FLAG_EXCEPTION, mono(closes), if opens > now { mono(opens) } else { 0 })
                }
            },
        };
        let value = PolicyValue {
            rule: r.id,
            app: r.app.map_or(0, |a| a as u8),
            flags,
            segment: r.segment as u16 + 1,
            expires_ns,
            opens_ns,
        };
        let own: Vec<u32> =
            ids_where(&c.ids, |i| i.segment == Some(r.segment) && i.quarantine == r.quarantine);
        let peer: Vec<u32> = ids_where(&c.ids, |i| i.names.contains(&r.peer));
        for &a in &own {
            for &b in &peer {
                let (src, dst) = if r.direction == Direction::Out { (a, b) } else { (b, a) };
                for key in keys(src, dst, r.proto, &r.ports) {
                    match entries.get(&key) {
                        // Windows on one key: the earliest occurrence
                        // holds it (the next is written when it closes).
                        Some(old) if old.opens_ns > 0 && value.opens_ns < old.opens_ns => {
                            entries.insert(key, value);
                        }
                        Some(old) if old.flags & POLICY_FLAG_EXCEPTION == 0 || flags != 0 => {}
                        _ => {
                            entries.insert(key, value);
                        }
                    }
                }
            }
        }
    }
    drop_shadowed_exceptions(&mut entries);
    c.reevaluate_at_ns = entries.values().map(|v| v.opens_ns).filter(|&o| o > 0).min().unwrap_or(0);
    c.policy = entries.into_iter().collect();

    if c.idents.len() > limits.idents {
        return Err(format!("{} address prefixes; the datapath holds {}", c.idents.len(), limits.idents));
    }
    if c.macs.len() > limits.macs {
        return Err(format!("{} MAC members; the datapath holds {}", c.macs.len(), limits.macs));
    }
    if c.policy.len() > limits.policy {
        return Err(format!(
            "the rules expand to {} datapath entries; the datapath holds {}",
            c.policy.len(),
            limits.policy
        ));
    }
    Ok(c)
}

fn ids_where(ids: &[IdInfo], f: impl Fn(&IdInfo) -> bool) -> Vec<u32> {
    ids.iter().enumerate().skip(1).filter(|(_, i)| f(i)).map(|(id, _)| id as u32).collect()
}

fn keys(src: u32, dst: u32, proto: Option<u8>, ports: &[(u16, u16)]) -> Vec<PolicyKey> {
    let base = PolicyKey { prefix_len: POLICY_ANY_PROTO_BITS, src, dst, proto: 0, port: 0 };
    let Some(proto) = proto else { return vec![base] };
    if ports.is_empty() {
        return vec![PolicyKey { prefix_len: POLICY_ANY_PORT_BITS, proto, ..base }];
    }
    ports
        .iter()
        .flat_map(|&(lo, hi)| port_blocks(lo, hi))
        .map(|(port, bits)| PolicyKey { prefix_len: POLICY_ANY_PORT_BITS + bits, proto, port, ..base })
        .collect()
}

/// An exception entry more specific than a permanent entry covering it would shadow
/// that entry once it expires (the LPM returns only the longest match): drop it, the
/// permanent rule already allows that traffic.
fn drop_shadowed_exceptions(entries: &mut BTreeMap<PolicyKey, PolicyValue>) {
    let permanent: Vec<PolicyKey> =
        entries.iter().filter(|(_, v)| v.flags & POLICY_FLAG_EXCEPTION == 0).map(|(k, _)| *k).collect();
    entries.retain(|k, v| {
        v.flags & POLICY_FLAG_EXCEPTION == 0
            || !permanent
                .iter()
                .any(|p| p.src == k.src && p.dst == k.dst && p.prefix_len < k.prefix_len && covers(p, k))
    });
}

fn covers(p: &PolicyKey, k: &PolicyKey) -> bool {
    if p.prefix_len == POLICY_ANY_PROTO_BITS {
        return true;
    }
    if p.proto != k.proto {
        return false;
    }
    let bits = p.prefix_len - POLICY_ANY_PORT_BITS;
    let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
    p.port & mask == k.port & mask
}

/// For tests and the API: which allow entry (if any) a lookup would find.
pub fn lookup(c: &Compiled, src: u32, dst: u32, proto: u8, port: u16) -> Option<PolicyValue> {
    c.policy
        .iter()
        .filter(|(k, _)| {
            k.src == src
                && k.dst == dst
                && (k.prefix_len == POLICY_ANY_PROTO_BITS
                    || (k.proto == proto && covers(k, &PolicyKey { port, ..*k })))
        })
        .max_by_key(|(k, _)| k.prefix_len)
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_split_into_aligned_blocks() {
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(5000, 5010), vec![(5000, 13), (5008, 15), (5010, 16)]);
        assert_eq!(port_blocks(1, 65535).len(), 16);
        let covered: u32 = port_blocks(1024, 65535).iter().map(|(_, b)| 1u32 << (16 - b)).sum();
        assert_eq!(covered, 65535 - 1024 + 1);
    }
}

#[cfg(test)]
mod policy_tests {
    use std::{path::Path, time::SystemTime};

    use super::*;
    use crate::policy::model::load_dir;

    fn examples() -> (Policy, Compiled) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policy");
        let (p, _) = load_dir(&dir, SystemTime::now());
        let p = p.unwrap();
        let c = compile(&p, &Anchor::now(), Limits { idents: 1000, macs: 1000, policy: 10_000 }).unwrap();
        (p, c)
    }

    fn id_of(c: &Compiled, desc: &str) -> u32 {
        c.ids.iter().position(|i| i.description == desc).unwrap_or_else(|| panic!("no id {desc}")) as u32
    }

    #[test]
    fn rules_compile_to_lookups_that_allow_exactly_what_they_say() {
        let (_, c) = examples();
        let pumps = id_of(&c, "10.10.0.0/22");
        let pharmacy = id_of(&c, "10.20.0.10/32");
        let emr = id_of(&c, "10.21.0.0/24");
        let hl7 = lookup(&c, pumps, pharmacy, 6, 2575).expect("pumps → pharmacy tcp/2575");
        assert_eq!(hl7.app, mdsec_common::app::App::Hl7 as u8);
        assert!(lookup(&c, pumps, pharmacy, 6, 2576).is_none());
        assert!(lookup(&c, pumps, pharmacy, 17, 2575).is_none());
        assert!(lookup(&c, pumps, emr, 6, 2575).is_none());
        // `from:` rules allow the other direction only.
        let bench = id_of(&c, "10.40.5.0/24");
        assert!(lookup(&c, bench, pumps, 6, 8444).is_some());
        assert!(lookup(&c, pumps, bench, 6, 8444).is_none());
        // The VLAN-scoped member is the same segment.
        let ward = id_of(&c, "10.10.8.0/24 vlan 110");
        assert!(lookup(&c, ward, pharmacy, 6, 2575).is_some());
        // MAC members too.
        let monitor = id_of(&c, "00:09:fb:12:34:56");
        assert!(lookup(&c, monitor, emr, 6, 6663).is_some());
    }

    #[test]
    fn segment_info_carries_mode_and_default() {
        let (p, c) = examples();
        let info = |desc: &str| c.segments.iter().find(|(id, _)| *id == id_of(&c, desc)).unwrap().1;
        let pumps = info("10.10.0.0/22");
        assert_eq!(pumps.flags, SEG_MEMBER);
        assert_eq!(p.segments[pumps.segment as usize - 1].name, "infusion-pumps");
        assert_eq!(info("10.12.0.0/24").flags, SEG_MEMBER | SEG_ENFORCE);
        // Zones are not segments.
        assert!(!c.segments.iter().any(|(id, _)| *id == id_of(&c, "10.21.0.0/24")));
    }

    /// A quarantined device, judged by the reference model over the
    /// compiled tables: its own traffic and traffic towards it get only the
    /// quarantine rules; its neighbours keep the segment's; a monitor
    /// segment never quarantines.
    #[test]
    fn quarantined_devices_get_only_quarantine_rules() {
        use mdsec_common::{
            model::{Communication, Model},
            policy::Verdict,
        };
        let dir = std::env::temp_dir().join(format!("mdsec-t-quarantine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("zones.yaml"),
            "zones:\n  pharmacy: [10.0.2.0/24]\n  onboarding: [10.0.2.9/32]\n",
        )
        .unwrap();
        let seg = |mode: &str| {
            format!(
                "segment: pumps\nfunction: infusion-pump\nmode: {mode}\ndefault: deny\nnew_devices: quarantine\n\
                 members:\n  - cidr: 10.0.1.0/24\nallow:\n  - to: pharmacy\n    proto: udp\n    ports: [9000]\n  \
                 - from: pharmacy\n    proto: udp\n    ports: [7000]\n\
                 quarantine_allow:\n  - to: onboarding\n    proto: udp\n    ports: [9500]\n"
            )
        };
        let q = crate::policy::quarantine::Quarantined {
            segment: "pumps".into(),
            mac: "02:00:00:00:00:07".into(),
            vlan: 0,
            ips: vec!["10.0.1.7".parse().unwrap()],
            first_seen: String::new(),
            mode: String::new(),
        };
        let key = |ip: &str| ip_to_key(ip.parse().unwrap());
        let verdict = |mode: &str, src: ([u8; 6], &str), dst: &str, dport: u16| {
            std::fs::write(dir.join("pumps.yaml"), seg(mode)).unwrap();
            let (p, d) = load_dir(&dir, SystemTime::now());
            let mut p = p.unwrap_or_else(|| panic!("{d:?}"));
            p.quarantined = crate::policy::quarantine::applicable(&p, std::slice::from_ref(&q));
            let c = compile(&p, &Anchor::now(), Limits { idents: 1000, macs: 1000, policy: 10_000 }).unwrap();
            let mut m = Model::new(c.model_tables(2));
            let comm = Communication {
                src_mac: src.0,
                src: key(src.1),
                dst: key(dst),
                proto: 17,
                sport: 40000,
                dport,
                ..Default::default()
            };
            Verdict::from_u8(m.judge(&comm, 1).verdict)
        };
        let (quarantined, neighbour) = (([2, 0, 0, 0, 0, 7], "10.0.1.7"), ([2, 0, 0, 0, 0, 8], "10.0.1.8"));
        let pharmacy = ([2, 0, 0, 0, 2, 2], "10.0.2.2");
        assert_eq!(verdict("enforce", quarantined, "10.0.2.2", 9000), Verdict::Drop);
        assert_eq!(verdict("enforce", quarantined, "10.0.2.9", 9500), Verdict::Allow);
        assert_eq!(verdict("enforce", pharmacy, "10.0.1.7", 7000), Verdict::Drop, "towards it, by address");
        assert_eq!(verdict("enforce", neighbour, "10.0.2.2", 9000), Verdict::Allow);
        assert_eq!(verdict("enforce", pharmacy, "10.0.1.8", 7000), Verdict::Allow);
        assert_eq!(verdict("monitor", quarantined, "10.0.2.2", 9000), Verdict::Allow, "monitor: never");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exceptions_never_shadow_a_broader_permanent_rule() {
        let mut e = BTreeMap::new();
        let permanent = PolicyValue { rule: 1, ..Default::default() };
        let exception =
            PolicyValue { rule: 2, flags: POLICY_FLAG_EXCEPTION, expires_ns: 5, ..Default::default() };
        let k = |prefix_len, proto, port| PolicyKey { prefix_len, src: 1, dst: 2, proto, port };
        e.insert(k(POLICY_ANY_PORT_BITS, 6, 0), permanent);
        e.insert(k(96, 6, 22), exception);
        e.insert(k(96, 17, 53), exception);
        drop_shadowed_exceptions(&mut e);
        assert_eq!(e.len(), 2);
        assert!(!e.contains_key(&k(96, 6, 22)));
        assert!(e.contains_key(&k(96, 17, 53)));
    }
}

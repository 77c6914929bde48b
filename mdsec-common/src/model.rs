//! The reference model of the datapath: parse, flow key (fragments included),
//! app-ID, identity, policy and verdict, written as plain Rust over a byte slice
//! with the same stage boundaries as the kernel program. The differential test
//! (`tests/tests/differential.rs`, `cargo xtask bench differential`) runs random
//! and malformed frames through both and requires the same action, flow key,
//! verdict, app and packet count. Where the two disagree, one of them is wrong.
//!
//! Mirror ports are modelled by [`Model::run_mirror`]: [`decap`] (the twin of
//! the kernel's decap stage) removes a frame's tunnel layers, and a deny on a
//! mirror port is a would-drop.
//!
//! Not modelled: the per-CPU event rate limit and ring buffers (they never change
//! a verdict), and flow-table eviction and insert contention (the test clears
//! both sides together, and runs on one CPU).

use std::collections::{HashMap, HashSet};
use std::vec::Vec;

use crate::{
    app::{CLASSIFY_BYTES, classify},
    device::DeviceKey,
    flow::{APP_FINAL, FlowKey, next_app_done},
    frag::FragKey,
    net::*,
    policy::{
        IdentData, MAX_IDS, MacKey, PolicyData, PolicyValue, SEG_MEMBER, SegmentInfo, TupleKey, Verdict,
        app_satisfies, deny, exempt, reply_rule_port, reply_tuple,
    },
    stats::Stat,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// What the parse stage learns from a frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Why parsing stopped early, if it did.
    pub reason: Option<Stat>,
    pub has_eth: bool,
    /// A gratuitous ARP (`net::arp_gratuitous`).
    pub arp_gratuitous: bool,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: u16,
    pub l3: u8,
    pub has_addrs: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
    pub has_l4: bool,
    pub sport: u16,
    pub dport: u16,
    pub frag: u8,
    pub frag_id: u32,
    pub payload_len: usize,
    pub payload_off: usize,
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// Parses a frame as the kernel's parse stage does.
pub fn parse(f: &[u8]) -> Parsed {
    let mut p = Parsed::default();
    p.reason = parse_into(f, &mut p).err();
    p
}

fn parse_into(f: &[u8], p: &mut Parsed) -> Result<(), Stat> {
    if f.len() < ETH_HLEN {
        return Err(Stat::TruncEth);
    }
    p.has_eth = true;
    p.dst_mac.copy_from_slice(&f[0..6]);
    p.src_mac.copy_from_slice(&f[6..12]);
    let mut ethertype = be16(f, 12);
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        if f.len() < off + 4 {
            return Err(Stat::TruncVlan);
        }
        p.vlan = be16(f, off) & 0x0fff;
        ethertype = be16(f, off + 2);
        off += 4;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(Stat::VlanTooDeep);
    }
    match ethertype {
        ETH_P_IP => ipv4(f, off, p),
        ETH_P_IPV6 => ipv6(f, off, p),
        ETH_P_ARP => {
            p.l3 = L3_ARP;
            if f.len() < off + 28 {
                return Err(Stat::TruncArp);
            }
            p.arp_gratuitous = crate::net::arp_gratuitous(f[off..off + 28].try_into().unwrap());
            Ok(())
        }
        _ => {
            p.l3 = L3_OTHER;
            Ok(())
        }
    }
}

fn ipv4(f: &[u8], off: usize, p: &mut Parsed) -> Result<(), Stat> {
    p.l3 = L3_IPV4;
    if f.len() < off + 20 {
        return Err(Stat::TruncIpv4);
    }
    let h = &f[off..];
    if h[0] >> 4 != 4 {
        return Err(Stat::BadIpv4Version);
    }
    let ihl = (h[0] & 0x0f) as usize * 4;
    if ihl < 20 {
        return Err(Stat::BadIpv4Ihl);
    }
    let total = be16(h, 2) as usize;
    if total < ihl || off + total > f.len() {
        return Err(Stat::BadIpv4Len);
    }
    let l3_end = off + total;
    p.src = v4_mapped([h[12], h[13], h[14], h[15]]);
    p.dst = v4_mapped([h[16], h[17], h[18], h[19]]);
    p.has_addrs = true;
    p.proto = h[9];
    let frag = be16(h, 6);
    if frag & 0x3fff != 0 {
        p.frag_id = be16(h, 4) as u32;
        if frag & 0x1fff != 0 {
            p.frag = FRAG_LATER;
            return Ok(());
        }
        p.frag = FRAG_FIRST;
    }
    l4(f, off + ihl, l3_end, p)
}

fn ipv6(f: &[u8], off: usize, p: &mut Parsed) -> Result<(), Stat> {
    p.l3 = L3_IPV6;
    if f.len() < off + 40 {
        return Err(Stat::TruncIpv6);
    }
    let h = &f[off..];
    if h[0] >> 4 != 6 {
        return Err(Stat::BadIpv6Version);
    }
    let l3_end = off + 40 + be16(h, 4) as usize;
    p.src.copy_from_slice(&h[8..24]);
    p.dst.copy_from_slice(&h[24..40]);
    p.has_addrs = true;
    let mut nh = h[6];
    let mut off = off + 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match nh {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                if f.len() < off + 2 {
                    return Err(Stat::TruncIpv6Ext);
                }
                nh = f[off];
                off += (f[off + 1] as usize + 1) * 8;
                if off > f.len() {
                    return Err(Stat::TruncIpv6Ext);
                }
            }
            IPPROTO_FRAGMENT => {
                if f.len() < off + 8 {
                    return Err(Stat::TruncIpv6Ext);
                }
                nh = f[off];
                let fo = be16(f, off + 2);
                p.frag_id = u32::from_be_bytes([f[off + 4], f[off + 5], f[off + 6], f[off + 7]]);
                off += 8;
                if fo & 0xfff8 != 0 {
                    p.proto = nh;
                    p.frag = FRAG_LATER;
                    return Ok(());
                }
                if fo & 1 != 0 {
                    p.frag = FRAG_FIRST;
                }
            }
            _ => break,
        }
    }
    p.proto = nh;
    if matches!(nh, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT) {
        return Err(Stat::Ipv6ExtTooDeep);
    }
    l4(f, off, l3_end, p)
}

fn l4(f: &[u8], off: usize, l3_end: usize, p: &mut Parsed) -> Result<(), Stat> {
    let header = match p.proto {
        IPPROTO_TCP => {
            if f.len() < off + 20 {
                return Err(Stat::TruncL4);
            }
            if f[off + 12] >> 4 < 5 {
                return Err(Stat::BadTcpOffset);
            }
            p.sport = be16(f, off);
            p.dport = be16(f, off + 2);
            (f[off + 12] >> 4) as usize * 4
        }
        IPPROTO_UDP => {
            if f.len() < off + 8 {
                return Err(Stat::TruncL4);
            }
            p.sport = be16(f, off);
            p.dport = be16(f, off + 2);
            8
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if f.len() < off + 4 {
                return Err(Stat::TruncL4);
            }
            p.sport = f[off] as u16;
            p.dport = f[off + 1] as u16;
            4
        }
        _ => 0,
    };
    p.has_l4 = true;
    if l3_end > off + header {
        // The kernel keeps these in u16 fields.
        p.payload_len = (l3_end - off - header) & 0xffff;
        p.payload_off = (off + header) & 0xffff;
    }
    Ok(())
}

/// The policy maps of one generation, as the agent wrote them.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub generation: u32,
    /// IDENT entries: (prefix length in bits, key, id).
    pub idents: Vec<(u32, IdentData, u32)>,
    pub macs: HashMap<MacKey, u32>,
    /// SEGMENTS by id (of the active generation's half).
    pub segments: HashMap<u32, SegmentInfo>,
    /// POLICY entries: (prefix length in bits, key, value).
    pub policy: Vec<(u32, PolicyData, PolicyValue)>,
    /// `PolicyConfig::reevaluate_at_ns`: the next window opening, 0 = none.
    pub reevaluate_at_ns: u64,
}

fn ident_bytes(d: &IdentData) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0] = d.generation;
    b[1] = d.scoped;
    b[2..4].copy_from_slice(&d.vlan);
    b[4..].copy_from_slice(&d.addr);
    b
}

fn policy_bytes(d: &PolicyData) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = d.generation;
    b[1..5].copy_from_slice(&d.src);
    b[5..9].copy_from_slice(&d.dst);
    b[9] = d.proto;
    b[10..12].copy_from_slice(&d.port);
    b
}

/// Do the first `bits` bits of `a` and `b` agree?
fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let (full, rest) = ((bits / 8) as usize, bits % 8);
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || (a[full] ^ b[full]) & (0xffu8 << (8 - rest)) == 0
}

fn lpm<'a, K, V, const N: usize>(
    entries: &'a [(u32, K, V)],
    key: &[u8; N],
    bytes: impl Fn(&K) -> [u8; N],
) -> Option<&'a V> {
    entries
        .iter()
        .filter(|(len, k, _)| prefix_eq(&bytes(k), key, *len))
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, v)| v)
}

/// What the model keeps per flow (the kernel's FlowValue fields that matter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowState {
    pub packets: u64,
    pub generation: u32,
    pub valid_until: u64,
    pub verdict: u8,
    pub rule: u32,
    pub segment: u32,
    pub required_app: u8,
    pub src_id: u32,
    pub dst_id: u32,
    pub app: u8,
    pub app_confidence: u8,
    /// As `FlowValue::app_done` ([`crate::flow::next_app_done`]'s steps).
    pub app_done: u8,
}

/// The result of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    pub key: Option<FlowKey>,
    /// Why the parser stopped early, if it did (the kernel counts it in STATS).
    pub reason: Option<Stat>,
}

#[derive(Default)]
pub struct Model {
    pub tables: Tables,
    /// Interfaces flagged `IFACE_MIRROR`: their denies are would-drops.
    pub mirrors: HashSet<u32>,
    pub flows: HashMap<FlowKey, FlowState>,
    /// Frames and bytes each device sent (every frame with an Ethernet header).
    pub devices: HashMap<DeviceKey, (u64, u64)>,
    /// Gratuitous ARPs each device sent (`DeviceValue::gratuitous_arps`).
    pub gratuitous_arps: HashMap<DeviceKey, u32>,
    frags: HashMap<FragKey, (u16, u16)>,
    allowed: HashSet<TupleKey>,
}

impl Model {
    pub fn new(tables: Tables) -> Model {
        Model { tables, ..Default::default() }
    }

    /// Forgets flows, devices, fragments and reply tuples (the kernel's tables
    /// cleared).
    pub fn clear(&mut self) {
        self.flows.clear();
        self.devices.clear();
        self.gratuitous_arps.clear();
        self.frags.clear();
        self.allowed.clear();
    }

    /// One frame through the mirror entry (`mdsec_mirror`) on `ifindex` (a
    /// port in [`Model::mirrors`]): its tunnel layers removed, the inner frame
    /// judged. Returns the decap result too (the kernel counts its layers and
    /// stop reason in STATS).
    pub fn run_mirror(&mut self, frame: &[u8], ifindex: u32, now: u64) -> (Outcome, Decapped) {
        let d = decap(frame);
        (self.run(&d.frame, ifindex, now), d)
    }

    /// One frame on `ifindex` at `now` (CLOCK_MONOTONIC_COARSE ns).
    pub fn run(&mut self, frame: &[u8], ifindex: u32, now: u64) -> Outcome {
        let p = parse(frame);
        if p.has_eth {
            let d = self.devices.entry(DeviceKey { ifindex, vlan: p.vlan, mac: p.src_mac }).or_default();
            d.0 += 1;
            d.1 += frame.len() as u64;
            if p.l3 == L3_ARP && p.arp_gratuitous {
                let g = self
                    .gratuitous_arps
                    .entry(DeviceKey { ifindex, vlan: p.vlan, mac: p.src_mac })
                    .or_default();
                *g = g.wrapping_add(1);
            }
        }
        let Some(key) = self.flow_key(&p, ifindex) else {
            return Outcome { action: XDP_PASS, key: None, reason: p.reason };
        };
        let fs = self.flows.entry(key).or_default();
        fs.packets += 1;
        // App stage: the flow's first payloads, until one decides.
        if p.payload_len > 0 && fs.app_done != APP_FINAL && p.frag != FRAG_LATER {
            let n = p.payload_len.min(CLASSIFY_BYTES);
            // bpf_xdp_load_bytes fails past the frame's end: nothing is recorded.
            if p.payload_off + n <= frame.len() {
                let mut buf = [0u8; CLASSIFY_BYTES];
                buf[..n].copy_from_slice(&frame[p.payload_off..p.payload_off + n]);
                let (app, conf) = classify(&buf, n, p.proto, p.sport, p.dport);
                fs.app = app as u8;
                fs.app_confidence = conf as u8;
                fs.app_done = next_app_done(fs.app_done, conf == crate::app::Confidence::High, n);
            }
        }
        let action = self.decide(&p, key, ifindex, now);
        Outcome { action, key: Some(key), reason: p.reason }
    }

    fn flow_key(&mut self, p: &Parsed, ifindex: u32) -> Option<FlowKey> {
        if !p.has_eth || !p.has_addrs || !(p.has_l4 || p.frag == FRAG_LATER) {
            return None;
        }
        let mut key = FlowKey {
            ifindex,
            vlan: p.vlan,
            proto: p.proto,
            _pad: 0,
            src: p.src,
            dst: p.dst,
            sport: p.sport,
            dport: p.dport,
        };
        if p.frag != 0 {
            let fk = FragKey {
                ifindex,
                vlan: p.vlan,
                proto: p.proto,
                _pad: 0,
                src: p.src,
                dst: p.dst,
                id: p.frag_id,
            };
            if p.frag == FRAG_FIRST {
                self.frags.insert(fk, (p.sport, p.dport));
            } else if let Some(&(s, d)) = self.frags.get(&fk) {
                key.sport = s;
                key.dport = d;
            }
        }
        Some(key)
    }

    fn identity(&self, addr: &[u8; 16], mac: &[u8; 6], vlan: u16) -> u32 {
        let bit = (self.tables.generation & 1) as u8;
        let mut mk = MacKey { generation: bit, scoped: 1, vlan, mac: *mac, _pad: [0; 2] };
        if let Some(id) = self.tables.macs.get(&mk) {
            return *id;
        }
        mk.scoped = 0;
        mk.vlan = 0;
        if let Some(id) = self.tables.macs.get(&mk) {
            return *id;
        }
        let key = IdentData { generation: bit, scoped: 1, vlan: vlan.to_be_bytes(), addr: *addr };
        if let Some(id) = lpm(&self.tables.idents, &ident_bytes(&key), ident_bytes) {
            return *id;
        }
        let key = IdentData { generation: bit, scoped: 0, vlan: [0; 2], addr: *addr };
        lpm(&self.tables.idents, &ident_bytes(&key), ident_bytes).copied().unwrap_or(0)
    }

    fn seg(&self, id: u32) -> SegmentInfo {
        if id == 0 || id >= MAX_IDS {
            return SegmentInfo::default();
        }
        self.tables.segments.get(&id).copied().unwrap_or_default()
    }

    fn allowed(&self, src: u32, dst: u32, proto: u8, port: u16, now: u64) -> Option<(u32, u8, u64, u32)> {
        let key = PolicyData {
            generation: (self.tables.generation & 1) as u8,
            src: src.to_be_bytes(),
            dst: dst.to_be_bytes(),
            proto,
            port: port.to_be_bytes(),
        };
        let v = lpm(&self.tables.policy, &policy_bytes(&key), policy_bytes)?;
        Some((v.rule, v.app, v.live_until(now)?, v.segment as u32))
    }

    /// A deny on a mirror port is a would-drop (the kernel's `verdict::on_port`).
    fn on_port(&self, v: Verdict, ifindex: u32) -> Verdict {
        if v == Verdict::Drop && self.mirrors.contains(&ifindex) { Verdict::WouldDrop } else { v }
    }

    fn decide(&mut self, p: &Parsed, key: FlowKey, ifindex: u32, now: u64) -> u32 {
        let generation = self.tables.generation;
        if generation == 0 {
            return XDP_PASS;
        }
        let fs = self.flows[&key];
        let mut fs = if fs.generation != generation || now >= fs.valid_until {
            let mut fs = self.evaluate(p, fs, ifindex, now);
            let cfg = crate::policy::PolicyConfig {
                reevaluate_at_ns: self.tables.reevaluate_at_ns,
                ..Default::default()
            };
            fs.valid_until = cfg.verdict_until(now, fs.valid_until);
            fs
        } else {
            fs
        };
        self.settle_app(&mut fs, ifindex);
        self.flows.insert(key, fs);
        if fs.verdict == Verdict::Drop as u8 { XDP_DROP } else { XDP_PASS }
    }

    /// An app rule's flow once its app is final: allowed if the app is the
    /// rule's, denied otherwise.
    fn settle_app(&self, fs: &mut FlowState, ifindex: u32) {
        if fs.verdict == Verdict::AppPending as u8 && fs.app_done == APP_FINAL {
            if app_satisfies(fs.app, fs.app_confidence, fs.required_app) {
                fs.verdict = Verdict::Allow as u8;
            } else {
                let (v, s) = deny(&self.seg(fs.src_id), &self.seg(fs.dst_id), true);
                fs.verdict = self.on_port(v, ifindex) as u8;
                fs.segment = s;
            }
        }
    }

    /// The verdict the datapath reaches for a new flow of `c` at `now`, once
    /// its first payload is classified as `c.app` (an app rule's flow stays
    /// `AppPending` without one): the same stages as [`Model::run`], without a
    /// frame. What `mdsec-agent simulate` judges recorded communication with.
    pub fn judge(&mut self, c: &Communication, now: u64) -> FlowState {
        let p = Parsed {
            has_eth: true,
            src_mac: c.src_mac,
            dst_mac: c.dst_mac,
            vlan: c.vlan,
            l3: if is_v4_mapped(&c.src) && is_v4_mapped(&c.dst) { L3_IPV4 } else { L3_IPV6 },
            has_addrs: true,
            src: c.src,
            dst: c.dst,
            proto: c.proto,
            has_l4: true,
            sport: c.sport,
            dport: c.dport,
            ..Default::default()
        };
        if self.tables.generation == 0 {
            return FlowState::default();
        }
        let mut fs = self.evaluate(&p, FlowState::default(), c.ifindex, now);
        if let Some(app) = c.app {
            fs.app = app;
            fs.app_confidence = crate::app::Confidence::High as u8;
            fs.app_done = APP_FINAL;
        }
        self.settle_app(&mut fs, c.ifindex);
        fs
    }

    fn evaluate(&mut self, p: &Parsed, mut fs: FlowState, ifindex: u32, now: u64) -> FlowState {
        fs.generation = self.tables.generation;
        fs.valid_until = u64::MAX;
        fs.rule = 0;
        fs.segment = 0;
        fs.required_app = 0;
        if exempt(p.l3 == L3_IPV4, p.proto, p.sport, p.dport, &p.dst) {
            fs.verdict = Verdict::Exempt as u8;
            return fs;
        }
        let src_id = self.identity(&p.src, &p.src_mac, p.vlan);
        let dst_id = self.identity(&p.dst, &p.dst_mac, p.vlan);
        fs.src_id = src_id;
        fs.dst_id = dst_id;
        let (s, d) = (self.seg(src_id), self.seg(dst_id));
        if s.flags & SEG_MEMBER == 0 && d.flags & SEG_MEMBER == 0 {
            fs.verdict = Verdict::Unevaluated as u8;
            return fs;
        }
        if let Some((rule, app, until, segment)) = self.allowed(src_id, dst_id, p.proto, p.dport, now) {
            fs.rule = rule;
            fs.segment = segment;
            fs.valid_until = until;
            fs.required_app = app;
            fs.verdict = if app == 0 { Verdict::Allow as u8 } else { Verdict::AppPending as u8 };
            self.allowed.insert(reply_tuple(&p.src, &p.dst, p.proto, p.sport, p.dport));
            return fs;
        }
        let tuple =
            TupleKey { src: p.src, dst: p.dst, sport: p.sport, dport: p.dport, proto: p.proto, _pad: [0; 3] };
        if self.allowed.contains(&tuple) {
            let original = reply_rule_port(p.proto, p.sport, p.dport);
            if let Some((rule, _, until, segment)) = self.allowed(dst_id, src_id, p.proto, original, now) {
                fs.rule = rule;
                fs.segment = segment;
                fs.valid_until = until;
                fs.verdict = Verdict::Reply as u8;
                return fs;
            }
        }
        let (v, segment) = deny(&s, &d, false);
        fs.verdict = self.on_port(v, ifindex) as u8;
        fs.segment = segment;
        fs
    }
}

/// One communication to judge without a frame ([`Model::judge`]): addresses in
/// the map form (IPv4-mapped), the MACs and VLAN identity lookups use, and the
/// app its first payload was identified as, if one was seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Communication {
    pub ifindex: u32,
    pub vlan: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub app: Option<u8>,
}

/// What the decap stage made of a mirror port's frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decapped {
    /// The frame the datapath judges: the innermost frame reached, with an
    /// Ethernet header written in front of a bare IP one.
    pub frame: Vec<u8>,
    /// Each layer removed: its kind and its overhead in bytes.
    pub layers: Vec<(Stat, u64)>,
    /// Why decapsulation stopped inside a tunnel, if it did.
    pub stop: Option<Stat>,
}

/// Where the next layer starts (the kernel decap stage's `Next`).
#[derive(Clone, Copy)]
enum Next {
    Eth(usize),
    Ip(usize, u16),
}

impl Next {
    /// The frame offset this layer starts at once it is the front.
    fn start(self) -> usize {
        match self {
            Next::Eth(o) => o,
            Next::Ip(o, _) => o - ETH_HLEN,
        }
    }
}

enum Step {
    Done,
    Inner(Stat, Next),
    Stop(Stat),
}

/// The reference twin of the kernel's decap stage (`mdsec-ebpf/src/decap.rs`).
pub fn decap(f: &[u8]) -> Decapped {
    let mut d = Decapped::default();
    let mut at = Next::Eth(0);
    let mut eth = 0;
    for depth in 0..=MAX_TUNNEL_DEPTH {
        match layer(f, at) {
            Step::Done => break,
            Step::Stop(reason) => {
                d.stop = Some(reason);
                break;
            }
            Step::Inner(kind, next) => {
                if depth == MAX_TUNNEL_DEPTH {
                    d.stop = Some(Stat::TunnelTooDeep);
                    break;
                }
                let fits = match next {
                    Next::Eth(o) => o + ETH_HLEN <= f.len(),
                    Next::Ip(o, _) => o < f.len(),
                };
                if !fits {
                    d.stop = Some(Stat::TunnelTruncated);
                    break;
                }
                d.layers.push((kind, (next.start() - at.start()) as u64));
                if let Next::Eth(o) = next {
                    eth = o;
                }
                at = next;
            }
        }
    }
    d.frame = match at {
        _ if d.layers.is_empty() => f.to_vec(),
        Next::Eth(o) => f[o..].to_vec(),
        Next::Ip(o, ethertype) => {
            let mut v = f[eth..eth + 12].to_vec();
            v.extend_from_slice(&ethertype.to_be_bytes());
            v.extend_from_slice(&f[o..]);
            v
        }
    };
    d
}

fn layer(f: &[u8], at: Next) -> Step {
    let (off, ethertype) = match at {
        Next::Ip(o, t) => (o, t),
        Next::Eth(o) => {
            if f.len() < o + ETH_HLEN {
                return Step::Done;
            }
            let mut off = o + ETH_HLEN;
            let mut t = be16(f, o + 12);
            for _ in 0..MAX_VLAN_TAGS {
                if t != ETH_P_8021Q && t != ETH_P_8021AD {
                    break;
                }
                if f.len() < off + 4 {
                    return Step::Done;
                }
                t = be16(f, off + 2);
                off += 4;
            }
            (off, t)
        }
    };
    let tunnel = |p: u8| matches!(p, IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE | IPPROTO_UDP);
    match ethertype {
        ETH_P_PPPOE_SESSION => {
            if f.len() < off + 8 {
                return Step::Stop(Stat::TunnelTruncated);
            }
            if f[off] != 0x11 || f[off + 1] != 0 {
                return Step::Stop(Stat::TunnelOpaque);
            }
            let (proto, body) =
                if f[off + 6] & 1 != 0 { (f[off + 6] as u16, off + 7) } else { (be16(f, off + 6), off + 8) };
            match proto {
                PPP_IPV4 => Step::Inner(Stat::TunnelPppoe, Next::Ip(body, ETH_P_IP)),
                PPP_IPV6 => Step::Inner(Stat::TunnelPppoe, Next::Ip(body, ETH_P_IPV6)),
                _ => Step::Stop(Stat::TunnelOpaque),
            }
        }
        ETH_P_IP => {
            if f.len() < off + 20 {
                return Step::Done;
            }
            let ihl = (f[off] & 0x0f) as usize * 4;
            if f[off] >> 4 != 4 || ihl < 20 || !tunnel(f[off + 9]) {
                return Step::Done;
            }
            if be16(f, off + 6) & 0x3fff != 0 {
                return Step::Stop(Stat::TunnelFragment);
            }
            over_ip(f, f[off + 9], off + ihl)
        }
        ETH_P_IPV6 => {
            if f.len() < off + 40 || f[off] >> 4 != 6 || !tunnel(f[off + 6]) {
                return Step::Done;
            }
            over_ip(f, f[off + 6], off + 40)
        }
        _ => Step::Done,
    }
}

fn over_ip(f: &[u8], proto: u8, off: usize) -> Step {
    match proto {
        IPPROTO_IPIP => Step::Inner(Stat::TunnelIpInIp, Next::Ip(off, ETH_P_IP)),
        IPPROTO_IPV6 => Step::Inner(Stat::TunnelIpInIp, Next::Ip(off, ETH_P_IPV6)),
        IPPROTO_GRE => gre(f, off),
        _ => {
            if f.len() < off + 16 || be16(f, off + 2) != VXLAN_PORT {
                return Step::Done;
            }
            if f[off + 8] & 0x08 == 0 {
                return Step::Stop(Stat::TunnelOpaque);
            }
            Step::Inner(Stat::TunnelVxlan, Next::Eth(off + 16))
        }
    }
}

fn gre(f: &[u8], off: usize) -> Step {
    if f.len() < off + 4 {
        return Step::Stop(Stat::TunnelTruncated);
    }
    let flags = be16(f, off);
    if flags & 0x0007 != 0 || flags & 0x4000 != 0 {
        return Step::Stop(Stat::TunnelOpaque);
    }
    let seq = flags & 0x1000 != 0;
    let len = 4 + 4 * ((flags & 0x8000 != 0) as usize + (flags & 0x2000 != 0) as usize + seq as usize);
    let body = off + len;
    match be16(f, off + 2) {
        ETH_P_TEB => Step::Inner(Stat::TunnelGre, Next::Eth(body)),
        ETH_P_IP => Step::Inner(Stat::TunnelGre, Next::Ip(body, ETH_P_IP)),
        ETH_P_IPV6 => Step::Inner(Stat::TunnelGre, Next::Ip(body, ETH_P_IPV6)),
        ETH_P_ERSPAN if !seq => Step::Inner(Stat::TunnelErspan, Next::Eth(body)),
        ETH_P_ERSPAN => {
            if f.len() < body + 8 {
                return Step::Stop(Stat::TunnelTruncated);
            }
            if f[body] >> 4 != 1 {
                return Step::Stop(Stat::TunnelOpaque);
            }
            Step::Inner(Stat::TunnelErspan, Next::Eth(body + 8))
        }
        ETH_P_ERSPAN3 => {
            if f.len() < body + 12 {
                return Step::Stop(Stat::TunnelTruncated);
            }
            if f[body] >> 4 != 2 || (f[body + 10] >> 2) & 0x1f != 0 {
                return Step::Stop(Stat::TunnelOpaque);
            }
            Step::Inner(Stat::TunnelErspan, Next::Eth(body + 12 + if f[body + 11] & 1 != 0 { 8 } else { 0 }))
        }
        _ => Step::Done,
    }
}

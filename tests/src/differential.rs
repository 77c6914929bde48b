//! Differential testing: random and malformed frames through the kernel program
//! (BPF_PROG_TEST_RUN) and through the reference model (`mdsec_common::model`),
//! which must agree on the action, the flow key, the flow's verdict, app and
//! packet count, and on the parser's stop reason counts.
//!
//! Frames come from a seeded generator driven by `arbitrary::Unstructured`: a
//! structure (Ethernet, VLAN stacks, ARP, IPv4 with options and fragments, IPv6
//! with extension chains, TCP/UDP/ICMP/other) over small address and port pools
//! that the test policy names, real payloads from the fixtures, replies of
//! earlier flows, and mutations (truncation, flipped bytes, bogus lengths).

use std::{collections::BTreeMap, net::Ipv6Addr};

use anyhow::Result;
use arbitrary::Unstructured;
use mdsec_agent::policy::maps::PolicyMaps;
use mdsec_common::{
    model::Model,
    stats::{STATS_LEN, Stat},
};

use crate::{
    fixtures,
    frames::{self, V4},
    kernel::TestProg,
};

/// The policy both sides decide with: enforce and monitor segments, a MAC
/// member, a VLAN-scoped member, a default-allow segment, app rules, port ranges.
/// Two maintenance windows that take turns (UTC mornings on tcp/22,
/// afternoons on tcp/443): whenever the run happens, one entry is open and
/// one opens later (`opens_ns`, `reevaluate_at_ns`), and both sides must agree.
pub const POLICY: &[(&str, &str)] = &[
    (
        "zones.yaml",
        "zones:\n  pharmacy: [10.0.2.0/24, fd00:2::/64]\n  dns: [10.0.2.53/32]\n  workstations: [10.0.3.0/24]\n",
    ),
    (
        "pumps.yaml",
        "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: fd00:1::/64\n  - mac: 02:00:00:00:01:99\nallow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n    app: hl7\n  - to: dns\n    proto: udp\n    ports: [53]\n  - to: pharmacy\n    proto: udp\n    ports: [\"9000-9010\"]\n  - to: pharmacy\n    proto: icmp\n  - to: pharmacy\n    proto: icmpv6\nmaintenance_windows:\n  - to: pharmacy\n    proto: tcp\n    ports: [22]\n    days: [mon, tue, wed, thu, fri, sat, sun]\n    start: \"00:00\"\n    end: \"12:00\"\n    time_zone: UTC\n    reason: morning window\n    ticket: T-1\n  - to: pharmacy\n    proto: tcp\n    ports: [443]\n    days: [mon, tue, wed, thu, fri, sat, sun]\n    start: \"12:00\"\n    end: \"24:00\"\n    time_zone: UTC\n    reason: afternoon window\n    ticket: T-2\n",
    ),
    (
        "imaging.yaml",
        "segment: imaging\nfunction: imaging-modality\nmode: monitor\ndefault: deny\nmembers:\n  - cidr: 10.0.4.0/24\nallow:\n  - from: workstations\n    proto: tcp\n    ports: [104]\n    app: dicom\n",
    ),
    (
        "ward.yaml",
        "segment: ward\nfunction: patient-monitor\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.6.0/24\n    vlan: 110\nallow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n",
    ),
    (
        "lab.yaml",
        "segment: lab\nfunction: lab-analyzer\nmode: enforce\ndefault: allow\nmembers:\n  - cidr: 10.0.7.0/24\n",
    ),
];

const V4_POOL: &[[u8; 4]] = &[
    [10, 0, 1, 2],
    [10, 0, 1, 3],
    [10, 0, 2, 2],
    [10, 0, 2, 53],
    [10, 0, 3, 2],
    [10, 0, 4, 2],
    [10, 0, 6, 2],
    [10, 0, 7, 2],
    [10, 0, 9, 9],
    [224, 0, 0, 5],
    [255, 255, 255, 255],
];
const V6_POOL: &[&str] = &["fd00:1::2", "fd00:2::2", "fd00:9::9", "fe80::1", "ff02::1"];
const PORT_POOL: &[u16] =
    &[2575, 53, 9000, 9005, 9011, 104, 22, 67, 68, 546, 3389, 80, 443, 40000, 40001, 40002];
const MAC_POOL: &[[u8; 6]] =
    &[[2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 2], [2, 0, 0, 0, 1, 0x99], [2, 0, 0, 0, 2, 1]];
const PAYLOADS: &[&str] =
    &["hl7-mllp", "dicom-associate-rq", "dns-query", "http-get", "tls-client-hello", "ssh-banner"];

/// The kernel program and the model with the same policy installed.
pub struct Pair {
    pub prog: TestProg,
    _maps: PolicyMaps,
    pub model: Model,
    payloads: Vec<Vec<u8>>,
}

impl Pair {
    pub fn new() -> Result<Pair> {
        Self::on(mdsec_common::maps::PROGRAM)
    }

    /// The mirror entry (`mdsec_mirror`, judging through `mdsec_xdp`) on a port
    /// flagged as a mirror on both sides.
    pub fn mirror() -> Result<Pair> {
        let mut pair = Self::on(mdsec_common::maps::MIRROR_PROGRAM)?;
        pair.prog.set_iface(TEST_IFINDEX, mdsec_common::policy::IFACE_MIRROR)?;
        pair.model.mirrors.insert(TEST_IFINDEX);
        Ok(pair)
    }

    fn on(program: &'static str) -> Result<Pair> {
        let (prog, maps, c, generation) = crate::kernel::with_policy_in(program, POLICY, 1_000_000, &[])?;
        Ok(Pair {
            prog,
            _maps: maps,
            model: Model::new(c.model_tables(generation)),
            payloads: PAYLOADS.iter().map(|n| fixtures::load(n)).collect(),
        })
    }
}

/// BPF_PROG_TEST_RUN's ingress interface (the loopback device's).
pub const TEST_IFINDEX: u32 = 1;

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub packets: u64,
    pub dropped: u64,
    pub flows: u64,
    /// Devices compared (summed over batches).
    pub devices: u64,
    /// Gratuitous ARPs the model counted (and the kernel agreed on).
    pub gratuitous_arps: u64,
    /// Frames of a flow sent by another MAC than its creator's (the device
    /// accounting's second path).
    pub foreign: u64,
    pub disagreements: u64,
    /// The first few, described.
    pub examples: Vec<String>,
    /// Frames by the model's parse outcome (for the record).
    pub reasons: BTreeMap<String, u64>,
    /// Mirror runs: tunnel layers removed and decap stops, by stat name.
    pub tunnels: BTreeMap<String, u64>,
}

/// An earlier flow (src, dst, proto, sport, dport, IPv6) to send a reply for.
type Recent = ([u8; 16], [u8; 16], u8, u16, u16, bool);

struct Gen {
    state: u64,
    recent: Vec<Recent>,
}

impl Gen {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                (self.state >> 24) as u8
            })
            .collect()
    }
}

fn mapped(a: [u8; 4]) -> [u8; 16] {
    mdsec_common::net::v4_mapped(a)
}

/// One frame from the generator.
fn frame(g: &mut Gen, payloads: &[Vec<u8>]) -> arbitrary::Result<Vec<u8>> {
    let raw = g.bytes(256);
    let mut u = Unstructured::new(&raw);
    let src_mac = *u.choose(MAC_POOL)?;
    let dst_mac = *u.choose(MAC_POOL)?;
    let kind = u.int_in_range(0..=99u8)?;
    if kind < 3 {
        // Pure noise of any length.
        let n = u.int_in_range(0..=120usize)?;
        return Ok(g.bytes(n));
    }
    let tags: Vec<(u16, u16)> = match u.int_in_range(0..=9u8)? {
        0..=6 => vec![],
        7 => vec![(0x8100, *u.choose(&[110u16, 200, 0])?)],
        8 => vec![(0x88a8, 5), (0x8100, *u.choose(&[110u16, 200])?)],
        _ => vec![(0x8100, 1), (0x8100, 2), (0x8100, 3)],
    };
    let reply = !g.recent.is_empty() && u.ratio(1, 5)?;
    let (src, dst, proto, sport, dport, v6) = if reply {
        let (s, d, p, sp, dp, v6) = g.recent[u.choose_index(g.recent.len())?];
        let (sp, dp) = match p {
            1 if sp == 8 => (0, dp),
            58 if sp == 128 => (129, dp),
            _ => (dp, sp),
        };
        (d, s, p, sp, dp, v6)
    } else {
        let v6 = u.ratio(1, 4)?;
        let addr = |u: &mut Unstructured| -> arbitrary::Result<[u8; 16]> {
            Ok(if v6 {
                u.choose(V6_POOL)?.parse::<Ipv6Addr>().unwrap().octets()
            } else {
                mapped(*u.choose(V4_POOL)?)
            })
        };
        let (s, d) = (addr(&mut u)?, addr(&mut u)?);
        let proto = match u.int_in_range(0..=9u8)? {
            0..=3 => 6,
            4..=6 => 17,
            7 | 8 => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            _ => *u.choose(&[47u8, 132, 0, 255])?,
        };
        let port = |u: &mut Unstructured| -> arbitrary::Result<u16> {
            Ok(if u.ratio(3, 4)? { *u.choose(PORT_POOL)? } else { u.int_in_range(40000..=40015)? })
        };
        let (sp, dp) = if matches!(proto, 1 | 58) {
            (*u.choose(&[8u16, 0, 3, 128, 129, 135, 143])?, u.int_in_range(0..=1)?)
        } else {
            (port(&mut u)?, port(&mut u)?)
        };
        (s, d, proto, sp, dp, v6)
    };
    if !reply && matches!(proto, 6 | 17 | 1 | 58) && g.recent.len() < 64 {
        g.recent.push((src, dst, proto, sport, dport, v6));
    } else if !reply && g.recent.len() >= 64 {
        let i = u.choose_index(64)?;
        g.recent[i] = (src, dst, proto, sport, dport, v6);
    }
    let payload: Vec<u8> = match u.int_in_range(0..=5u8)? {
        0 | 1 => vec![],
        2 | 3 => u.choose(payloads)?.clone(),
        _ => {
            let n = u.int_in_range(1..=200usize)?;
            g.bytes(n)
        }
    };
    let l4 = match proto {
        6 => {
            let mut t = frames::tcp(sport, dport, *u.choose(&[0x02u8, 0x10, 0x18, 0x11, 0x04])?, &payload);
            // A data offset below 5 words or past the segment: rare from bit
            // flips alone, so the parser's bad_tcp_offset stop is aimed at.
            if u.ratio(1, 30)? {
                t[12] = *u.choose(&[0x00u8, 0x40, 0xf0, 0xa0])?;
            }
            t
        }
        17 => frames::udp(sport, dport, &payload),
        1 | 58 => {
            let mut h = vec![sport as u8, dport as u8, 0, 0, 0, 1, 0, 1];
            h.extend_from_slice(&payload);
            h
        }
        _ => payload.clone(),
    };
    let mut l3 = if v6 {
        let mut exts = Vec::new();
        for _ in 0..u.int_in_range(0..=7u8)? {
            let t = *u.choose(&[0u8, 43, 60, 44])?;
            let body = if t == 44 {
                // Offset (units of 8) and M flag, then the identification.
                let fo: u16 = *u.choose(&[0u16, 1, 8, 9, 0x100])?;
                let id = u.int_in_range(1..=3u32)?;
                let mut b = fo.to_be_bytes().to_vec();
                b.extend_from_slice(&id.to_be_bytes());
                b
            } else {
                vec![0u8; 6]
            };
            exts.push((t, body));
        }
        frames::ipv6(Ipv6Addr::from(src), Ipv6Addr::from(dst), &exts, proto, &l4)
    } else {
        let mut h = V4::new(
            std::net::Ipv4Addr::new(src[12], src[13], src[14], src[15]),
            std::net::Ipv4Addr::new(dst[12], dst[13], dst[14], dst[15]),
            proto,
        );
        h.id = u.int_in_range(1..=3)?;
        h.frag = *u.choose(&[0u16, 0, 0, 0, 0x2000, 0x2000, 0x0010, 0x2010, 0x4000])?;
        if u.ratio(1, 8)? {
            h.options = vec![1, 1, 1, 1];
        }
        h.build(&l4)
    };
    // Mutations.
    match u.int_in_range(0..=19u8)? {
        0 => {
            let i = u.choose_index(l3.len().max(1))?.min(l3.len().saturating_sub(1));
            if !l3.is_empty() {
                l3[i] ^= 1 << u.int_in_range(0..=7u8)?;
            }
        }
        1 if !l3.is_empty() => l3[0] = u.arbitrary()?, // version / IHL
        2 if l3.len() > 4 => {
            let len: u16 = u.arbitrary()?;
            l3[2..4].copy_from_slice(&len.to_be_bytes()); // IPv4 total / IPv6 flow label
        }
        3 if l3.len() > 6 => {
            let len: u16 = u.int_in_range(0..=400)?;
            l3[4..6].copy_from_slice(&len.to_be_bytes()); // IPv6 payload length / IPv4 id
        }
        _ => {}
    }
    let ethertype = match (v6, u.int_in_range(0..=29u8)?) {
        (_, 0) => 0x0806,
        (_, 1) => 0x88cc,
        (true, _) => 0x86dd,
        (false, _) => 0x0800,
    };
    // Half the ARP frames are well-formed Ethernet/IPv4 ARP, most of those
    // gratuitous (sender = target address).
    let l3 = if ethertype == 0x0806 && u.ratio(1, 2)? {
        let spa: [u8; 4] = u.arbitrary()?;
        let tpa: [u8; 4] = if u.ratio(2, 3)? { spa } else { u.arbitrary()? };
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, *u.choose(&[1u8, 2])?];
        a.extend_from_slice(&src_mac);
        a.extend_from_slice(&spa);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&tpa);
        a
    } else {
        l3
    };
    let mut f = frames::eth(dst_mac, src_mac, &tags, ethertype, &l3);
    if u.ratio(1, 10)? {
        let cut = u.int_in_range(0..=f.len())?;
        f.truncate(cut);
    }
    Ok(f)
}

/// Wraps `inner` in one random tunnel layer (sometimes a malformed one, or one
/// the decap stage does not open), or returns it as it is.
fn encap(g: &mut Gen, inner: Vec<u8>) -> arbitrary::Result<Vec<u8>> {
    let raw = g.bytes(64);
    let mut u = Unstructured::new(&raw);
    let l3 = frames::l3_of(&inner).map(|(t, d)| (t, d.to_vec()));
    let v6 = u.ratio(1, 3)?;
    let mut frag = 0u16;
    if u.ratio(1, 25)? {
        frag = *u.choose(&[0x2000u16, 0x0008])?;
    }
    let ip = |proto: u8, payload: &[u8]| -> Vec<u8> {
        if v6 {
            frames::ipv6("fd00:99::1".parse().unwrap(), "fd00:99::2".parse().unwrap(), &[], proto, payload)
        } else {
            let mut h = V4::new([192, 0, 2, 1].into(), [192, 0, 2, 2].into(), proto);
            h.frag = frag;
            h.build(payload)
        }
    };
    let gre_flags = |u: &mut Unstructured| -> arbitrary::Result<u16> {
        Ok(*u.choose(&[0u16, 0, 0x8000, 0x2000, 0x1000, 0xb000, 0x0001, 0x4000])?)
    };
    let outer_type = if v6 { 0x86dd } else { 0x0800 };
    let tags: Vec<(u16, u16)> = if u.ratio(1, 6)? { vec![(0x8100, 30)] } else { vec![] };
    let (ethertype, payload) = match (u.int_in_range(0..=9u8)?, l3) {
        (0, _) => {
            let flags = if u.ratio(1, 15)? { 0 } else { 0x08 };
            let port = if u.ratio(1, 15)? { 4790 } else { mdsec_common::net::VXLAN_PORT };
            (outer_type, ip(17, &frames::udp(40000, port, &frames::vxlan(flags, 5001, &inner))))
        }
        (1, _) => {
            let f = gre_flags(&mut u)?;
            (outer_type, ip(47, &frames::gre(f, 0x6558, &inner)))
        }
        (2, _) => (outer_type, ip(47, &frames::gre(0, 0x88be, &inner))),
        (3, _) => {
            let mut e = frames::erspan2(7, &inner);
            if u.ratio(1, 15)? {
                e[0] = 0x00;
            }
            (outer_type, ip(47, &frames::gre(0x1000, 0x88be, &e)))
        }
        (4, _) => {
            let mut e = frames::erspan3(9, u.ratio(1, 2)?, &inner);
            if u.ratio(1, 15)? {
                e[10] = 2 << 2; // frame type IP
            }
            (outer_type, ip(47, &frames::gre(0x1000, 0x22eb, &e)))
        }
        (5, Some((t, l3))) => {
            let f = gre_flags(&mut u)?;
            (outer_type, ip(47, &frames::gre(f, t, &l3)))
        }
        (6, Some((t, l3))) => (outer_type, ip(if t == 0x0800 { 4 } else { 41 }, &l3)),
        (7, Some((t, l3))) => {
            let ppp = if u.ratio(1, 10)? {
                0xc021
            } else if t == 0x0800 {
                0x0021
            } else {
                0x0057
            };
            let mut p = frames::pppoe(0x1234, ppp, &l3);
            // Protocol-field compression: the protocol's one odd byte.
            if u.ratio(1, 3)? {
                p.remove(6);
            }
            (0x8864, p)
        }
        _ => return Ok(inner),
    };
    Ok(frames::eth([2, 0, 0, 0, 0x99, 2], [2, 0, 0, 0, 0x99, 1], &tags, ethertype, &payload))
}

/// Runs `n` generated frames through both sides from `seed`.
pub fn run(n: u64, seed: u64) -> Result<Report> {
    run_on(Pair::new()?, n, seed, false)
}

/// [`run`] on a mirror port: half of the frames wrapped in one to four tunnel
/// layers first; the frame the kernel's decap stage leaves must equal the
/// model's, and so must the tunnel counters.
pub fn run_mirror(n: u64, seed: u64) -> Result<Report> {
    run_on(Pair::mirror()?, n, seed, true)
}

fn run_on(mut pair: Pair, n: u64, seed: u64, mirror: bool) -> Result<Report> {
    let mut g = Gen { state: seed | 1, recent: Vec::new() };
    let mut r = Report::default();
    let mut model_reasons = [0u64; STATS_LEN as usize];
    let mut model_tunnels = [(0u64, 0u64); STATS_LEN as usize];
    let mut last_stats = pair.prog.stats()?;
    const BATCH: u64 = 5000;
    for i in 0..n {
        let mut f = frame(&mut g, &pair.payloads).unwrap_or_default();
        if mirror && g.bytes(1)[0] < 128 {
            for _ in 0..=(g.bytes(1)[0] % 4) {
                f = encap(&mut g, f).unwrap_or_default();
            }
            if g.bytes(1)[0] < 26 {
                let cut = g.bytes(1)[0] as usize * f.len() / 256;
                f.truncate(cut);
            }
        }
        // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header (and
        // no driver hands XDP one): pad the runt instead of skipping it.
        if f.len() < 14 {
            f.resize(14, 0);
        }
        let now = mdsec_agent::base::clock::mono_ns();
        let mut problem = None;
        let (want, got) = if mirror {
            let (want, d) = pair.model.run_mirror(&f, TEST_IFINDEX, now);
            let (got, out) = pair.prog.run_out(&f)?;
            for (kind, bytes) in &d.layers {
                model_tunnels[*kind as usize].0 += 1;
                model_tunnels[*kind as usize].1 += bytes;
            }
            if let Some(s) = d.stop {
                model_tunnels[s as usize].0 += 1;
            }
            if out != d.frame {
                problem = Some(format!("decapsulated frame: kernel {}, model {}", hex(&out), hex(&d.frame)));
            }
            (want, got)
        } else {
            (pair.model.run(&f, TEST_IFINDEX, now), pair.prog.run(&f)?)
        };
        r.packets += 1;
        r.dropped += (got == mdsec_common::model::XDP_DROP) as u64;
        if let Some(s) = want.reason {
            model_reasons[s as usize] += 1;
        }
        *r.reasons.entry(want.reason.map_or("ok".to_string(), |s| s.name().to_string())).or_default() += 1;
        if problem.is_some() {
            // The decapsulated frame already differs.
        } else if got != want.action {
            problem = Some(format!("action: kernel {got}, model {}", want.action));
        } else if let Some(k) = want.key {
            let m = pair.model.flows[&k];
            match pair.prog.flow(&k)? {
                None => problem = Some(format!("flow key {k:?}: not in the kernel")),
                Some(v) => {
                    let app_k = (v.app_done != 0).then_some((v.app, v.app_confidence, v.app_done));
                    let app_m = (m.app_done != 0).then_some((m.app, m.app_confidence, m.app_done));
                    if v.packets != m.packets
                        || v.verdict != m.verdict
                        || app_k != app_m
                        || v.segment != m.segment
                    {
                        problem = Some(format!(
                            "flow {k:?}: kernel packets {} verdict {} app {app_k:?} segment {}, model packets {} verdict {} app {app_m:?} segment {}",
                            v.packets, v.verdict, v.segment, m.packets, m.verdict, m.segment
                        ));
                    }
                }
            }
        }
        if let Some(p) = problem {
            r.disagreements += 1;
            if r.examples.len() < 10 {
                r.examples.push(format!("packet {i} (seed {seed}): {p}; frame {}", hex(&f)));
            }
        }
        if (i + 1) % BATCH == 0 || i + 1 == n {
            // The parser's stop reasons, per batch, from the kernel's counters.
            let now_stats = pair.prog.stats()?;
            for s in Stat::ALL.iter().filter(|s| s.is_malformed()) {
                let k = now_stats[*s as usize].packets - last_stats[*s as usize].packets;
                if k != model_reasons[*s as usize] {
                    r.disagreements += 1;
                    if r.examples.len() < 10 {
                        r.examples.push(format!(
                            "batch ending at packet {i} (seed {seed}): {}: kernel {k}, model {}",
                            s.name(),
                            model_reasons[*s as usize]
                        ));
                    }
                }
            }
            for s in Stat::TUNNEL_LAYERS.iter().chain(Stat::TUNNEL_STOPS) {
                let si = *s as usize;
                let k = (
                    now_stats[si].packets - last_stats[si].packets,
                    now_stats[si].bytes - last_stats[si].bytes,
                );
                *r.tunnels.entry(s.name().to_string()).or_default() += model_tunnels[si].0;
                if k != model_tunnels[si] {
                    r.disagreements += 1;
                    if r.examples.len() < 10 {
                        r.examples.push(format!(
                            "batch ending at packet {i} (seed {seed}): {}: kernel {k:?}, model {:?}",
                            s.name(),
                            model_tunnels[si]
                        ));
                    }
                }
            }
            model_tunnels = [(0, 0); STATS_LEN as usize];
            // Every device's frames, as the agent derives them from DEVICES and
            // the flows it owns, against the model's plain per-MAC count.
            let flows = pair.prog.flows()?;
            let kernel_devices = crate::kernel::device_totals(&flows, &pair.prog.devices()?);
            let model_devices: std::collections::BTreeMap<_, _> =
                pair.model.devices.iter().map(|(k, v)| (*k, *v)).collect();
            if kernel_devices != model_devices {
                r.disagreements += 1;
                let differ: Vec<_> = model_devices
                    .iter()
                    .filter(|(k, v)| kernel_devices.get(k) != Some(v))
                    .map(|(k, v)| format!("{k:?}: kernel {:?}, model {v:?}", kernel_devices.get(k)))
                    .take(3)
                    .collect();
                if r.examples.len() < 10 {
                    r.examples.push(format!(
                        "batch ending at packet {i} (seed {seed}): devices ({} kernel, {} model) differ: {differ:?}",
                        kernel_devices.len(),
                        model_devices.len()
                    ));
                }
            }
            // Gratuitous ARPs per device: DEVICES' counter against the model's.
            let kernel_garp: std::collections::BTreeMap<_, _> = pair
                .prog
                .devices()?
                .into_iter()
                .filter(|(_, v)| v.gratuitous_arps != 0)
                .map(|(k, v)| (k, v.gratuitous_arps))
                .collect();
            let model_garp: std::collections::BTreeMap<_, _> =
                pair.model.gratuitous_arps.iter().map(|(k, v)| (*k, *v)).collect();
            if kernel_garp != model_garp {
                r.disagreements += 1;
                if r.examples.len() < 10 {
                    r.examples.push(format!(
                        "batch ending at packet {i} (seed {seed}): gratuitous ARPs differ: kernel {kernel_garp:?}, model {model_garp:?}"
                    ));
                }
            }
            r.gratuitous_arps += model_garp.values().map(|&n| n as u64).sum::<u64>();
            r.devices += model_devices.len() as u64;
            r.foreign += flows.iter().map(|(_, v)| v.foreign_packets).sum::<u64>();
            model_reasons = [0; STATS_LEN as usize];
            last_stats = now_stats;
            r.flows += pair.model.flows.len() as u64;
            // Keep the LRU maps far from full: both sides forget together.
            pair.prog.clear()?;
            pair.model.clear();
        }
    }
    Ok(r)
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

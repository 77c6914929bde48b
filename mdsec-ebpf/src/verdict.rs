//! Verdict stage: the only place that may return `XDP_DROP`.
//!
//! Fast path: the flow's cached verdict, valid while its generation is the active
//! one and its exception (if any) has not expired. Slow path ([`evaluate`]):
//! exemptions → identity (MAC, then VLAN-scoped LPM, then LPM) → policy (one LPM
//! lookup: exact port, port range block, any port, any proto) → replies of allowed
//! flows → the segments' defaults. Monitor segments and mirror ports never drop.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::bpf_xdp_load_bytes,
    maps::lpm_trie::Key,
};
use mdsec_common::{
    app::{port_hint, Confidence},
    flow::FlowValue,
    policy::{
        app_satisfies, deny, reply_rule_port, reply_tuple, Event, IdentData, MacKey, PolicyData, SegmentInfo,
        TupleKey, Verdict, DENY_APP_MISMATCH, DENY_DEFAULT, IDENT_HEADER_BITS, IFACE_MIRROR, MAX_IDS,
        POLICY_FULL_BITS, SEG_MEMBER,
    },
    segstats::{self, COL_DROP_APP_MISMATCH, COL_VIOLATIONS, COL_WOULD_DROP_APP_MISMATCH, SEG_SLOTS},
    stats::{Counter, Stat},
};

use crate::{
    maps::{ALLOWED, CONFIG, EVENTS, EVENT_BUCKET, IDENT, IFACES, MACS, POLICY, SEGMENTS, SEG_STATS},
    parse::{Packet, L3_IPV4},
    stats::count,
};

pub fn decide(ctx: *mut xdp_md, p: &Packet, flow: Option<*mut FlowValue>, now: u64, len: u64) -> u32 {
    let Some(f) = flow else {
        return xdp_action::XDP_PASS;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let gen = cfg.generation;
    if gen == 0 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: `f` is a live FLOWS value; racing writers store whole verdicts computed
    // from the same policy, so any interleaving is a valid verdict.
    let fv = unsafe { &mut *f };
    if fv.generation != gen || now >= fv.valid_until_ns {
        evaluate(ctx, p, f, gen, now);
        fv.valid_until_ns = cfg.verdict_until(now, fv.valid_until_ns);
    }
    // A rule's app is checked once the label is final; payloads too short to
    // decide pass meanwhile (at most APP_TRIES - 1 of them, each under
    // APP_DECISIVE_BYTES).
    if fv.verdict == Verdict::AppPending as u8 && fv.app_done == mdsec_common::flow::APP_FINAL {
        check_app(fv, gen, p.ifindex);
    }

    let verdict = fv.verdict;
    if verdict == Verdict::Drop as u8 || verdict == Verdict::WouldDrop as u8 {
        if fv.reported_generation != gen {
            emit(p, fv, gen, now, cfg.event_rate);
        }
        let app_rule = fv.required_app != 0;
        if verdict == Verdict::Drop as u8 {
            count(Stat::PolicyDrop, len);
            let col = if app_rule { COL_DROP_APP_MISMATCH } else { Verdict::Drop as u32 };
            count_segment(gen, fv.segment, col, len);
            return xdp_action::XDP_DROP;
        }
        count(Stat::PolicyWouldDrop, len);
        let col = if app_rule { COL_WOULD_DROP_APP_MISMATCH } else { Verdict::WouldDrop as u32 };
        count_segment(gen, fv.segment, col, len);
        return xdp_action::XDP_PASS;
    }
    count_segment(gen, fv.segment, verdict as u32 & 7, len);
    count(
        match Verdict::from_u8(verdict) {
            Verdict::Allow | Verdict::AppPending => Stat::PolicyAllow,
            Verdict::Reply => Stat::PolicyReply,
            Verdict::Exempt => Stat::PolicyExempt,
            _ => Stat::PolicyUnevaluated,
        },
        len,
    );
    xdp_action::XDP_PASS
}

/// Adds one packet (or, in a violation column, one flow) and `bytes` to the
/// per-segment counters of the generation's half of `SEG_STATS`.
#[inline(always)]
fn count_segment(gen: u32, segment: u32, col: u32, bytes: u64) {
    if segment >= SEG_SLOTS {
        return;
    }
    if let Some(c) = SEG_STATS.get_ptr_mut(segstats::index(gen, segment, col)) {
        // SAFETY: a valid per-CPU cell; per-CPU cells have no concurrent writer.
        let c: &mut Counter = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
    }
}

/// The first payload of a flow whose rule requires an app has been classified:
/// only a payload-based (high-confidence) match satisfies the rule.
#[inline(always)]
fn check_app(fv: &mut FlowValue, gen: u32, ifindex: u32) {
    if app_satisfies(fv.app, fv.app_confidence, fv.required_app) {
        fv.verdict = Verdict::Allow as u8;
        return;
    }
    let bit = gen & 1;
    let s = seg_info(bit, fv.src_id);
    let d = seg_info(bit, fv.dst_id);
    let (verdict, segment) = deny(&s, &d, true);
    fv.verdict = on_port(verdict, ifindex) as u8;
    fv.segment = segment;
    // A new verdict: report it even if the flow was reported before.
    fv.reported_generation = 0;
    count(Stat::AppMismatch, 0);
}

#[inline(always)]
fn seg_info(bit: u32, id: u32) -> SegmentInfo {
    if id == 0 || id >= MAX_IDS {
        return SegmentInfo::default();
    }
    SEGMENTS.get(bit * MAX_IDS + id).copied().unwrap_or_default()
}

/// Link-local control traffic is never policed (the rule lives in mdsec-common,
/// shared with the agent's learner).
#[inline(always)]
fn exempt(p: &Packet) -> bool {
    mdsec_common::policy::exempt(p.l3 == L3_IPV4, p.proto, p.sport, p.dport, &p.dst)
}

#[inline(always)]
fn identity(bit: u8, addr: &[u8; 16], mac: &[u8; 6], vlan: u16) -> u32 {
    let vlan_be = vlan.to_be_bytes();
    let mut mk = MacKey { generation: bit, scoped: 1, vlan, mac: *mac, _pad: [0; 2] };
    // SAFETY: plain map lookups.
    unsafe {
        if let Some(id) = MACS.get(&mk) {
            return *id;
        }
        mk.scoped = 0;
        mk.vlan = 0;
        if let Some(id) = MACS.get(&mk) {
            return *id;
        }
    }
    let mut key = Key::new(
        IDENT_HEADER_BITS + 128,
        IdentData { generation: bit, scoped: 1, vlan: vlan_be, addr: *addr },
    );
    if let Some(id) = IDENT.get(&key) {
        return *id;
    }
    key.data.scoped = 0;
    key.data.vlan = [0; 2];
    IDENT.get(&key).copied().unwrap_or(0)
}

/// The allow entry for (src, dst, proto, port), if any and not expired.
/// Returns (rule, app, expires_ns, segment of the rule).
#[inline(always)]
fn allowed(bit: u8, src: u32, dst: u32, proto: u8, port: u16, now: u64) -> Option<(u32, u8, u64, u32)> {
    let key = Key::new(
        POLICY_FULL_BITS,
        PolicyData {
            generation: bit,
            src: src.to_be_bytes(),
            dst: dst.to_be_bytes(),
            proto,
            port: port.to_be_bytes(),
        },
    );
    let v = POLICY.get(&key)?;
    Some((v.rule, v.app, v.live_until(now)?, v.segment as u32))
}

/// Only the context crosses the call, not packet pointers: the destination MAC is
/// read here with a helper, so the parser need not copy it for every frame.
#[inline(never)]
fn evaluate(ctx: *mut xdp_md, p: &Packet, f: *mut FlowValue, gen: u32, now: u64) {
    // SAFETY: see `decide`.
    let fv = unsafe { &mut *f };
    fv.generation = gen;
    fv.valid_until_ns = u64::MAX;
    fv.rule = 0;
    fv.segment = 0;
    fv.required_app = 0;
    if exempt(p) {
        fv.verdict = Verdict::Exempt as u8;
        return;
    }
    let bit = (gen & 1) as u8;
    let src_id = identity(bit, &p.src, &p.src_mac, p.vlan);
    let mut dst_mac = [0u8; 6];
    // SAFETY: the helper writes at most 6 bytes into `dst_mac`; a flow's frame has
    // a whole Ethernet header, so it cannot fail (on failure the MAC stays zero).
    unsafe { bpf_xdp_load_bytes(ctx, 0, dst_mac.as_mut_ptr().cast(), 6) };
    let dst_id = identity(bit, &p.dst, &dst_mac, p.vlan);
    fv.src_id = src_id;
    fv.dst_id = dst_id;
    let s = seg_info(bit as u32, src_id);
    let d = seg_info(bit as u32, dst_id);
    if s.flags & SEG_MEMBER == 0 && d.flags & SEG_MEMBER == 0 {
        fv.verdict = Verdict::Unevaluated as u8;
        return;
    }
    if let Some((rule, app, until, segment)) = allowed(bit, src_id, dst_id, p.proto, p.dport, now) {
        fv.rule = rule;
        fv.segment = segment;
        fv.valid_until_ns = until;
        fv.required_app = app;
        fv.verdict = if app == 0 { Verdict::Allow as u8 } else { Verdict::AppPending as u8 };
        let _ = ALLOWED.insert(&reply_tuple(&p.src, &p.dst, p.proto, p.sport, p.dport), &1, 0);
        return;
    }
    let tuple =
        TupleKey { src: p.src, dst: p.dst, sport: p.sport, dport: p.dport, proto: p.proto, _pad: [0; 3] };
    // SAFETY: plain map lookup.
    if unsafe { ALLOWED.get(&tuple) }.is_some() {
        // Still allowed in this direction under the current policy?
        let original_port = reply_rule_port(p.proto, p.sport, p.dport);
        if let Some((rule, _, until, segment)) = allowed(bit, dst_id, src_id, p.proto, original_port, now) {
            fv.rule = rule;
            fv.segment = segment;
            fv.valid_until_ns = until;
            fv.verdict = Verdict::Reply as u8;
            return;
        }
    }
    let (verdict, segment) = deny(&s, &d, false);
    fv.verdict = on_port(verdict, p.ifindex) as u8;
    fv.segment = segment;
}

/// A mirror port only sees copies: dropping them protects nothing, so a deny
/// there is a would-drop. Decided with the flow's verdict (the interface is part
/// of the flow key, and a role change comes with a restart, which installs a new
/// generation), so the drop path does no per-packet IFACES lookup.
#[inline(always)]
fn on_port(v: Verdict, ifindex: u32) -> Verdict {
    // SAFETY: plain map lookup.
    if v == Verdict::Drop && unsafe { IFACES.get(&ifindex) }.is_some_and(|f| *f & IFACE_MIRROR != 0) {
        return Verdict::WouldDrop;
    }
    v
}

/// One violation per denied flow and generation: counted by app, then reported as
/// an event at most `rate` per second per CPU (beyond that only counted as
/// rate-limited, so every violation is either an event or a counted suppression).
#[inline(never)]
fn emit(p: &Packet, fv: &mut FlowValue, gen: u32, now: u64, rate: u32) {
    fv.reported_generation = gen;
    // Denied before any payload (a dropped SYN): the port names the service.
    let (app, confidence) = if fv.app_done != 0 {
        (fv.app, fv.app_confidence)
    } else {
        let hint = port_hint(p.proto, p.sport, p.dport) as u8;
        (hint, if hint != 0 { Confidence::Low as u8 } else { Confidence::None as u8 })
    };
    count_segment(gen, fv.segment, COL_VIOLATIONS + (app as u32 & 31), 0);
    let Some(bucket) = EVENT_BUCKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU cell, no concurrent writer.
    let bucket = unsafe { &mut *bucket };
    if now.wrapping_sub(bucket[1]) >= 1_000_000_000 {
        bucket[0] = rate as u64;
        bucket[1] = now;
    }
    if bucket[0] == 0 {
        count(Stat::EventsRateLimited, 0);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(Stat::EventsLost, 0);
        return;
    };
    bucket[0] -= 1;
    entry.write(Event {
        ts_ns: now,
        ifindex: p.ifindex,
        vlan: p.vlan,
        proto: p.proto,
        verdict: fv.verdict,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        src_id: fv.src_id,
        dst_id: fv.dst_id,
        segment: fv.segment,
        rule: fv.rule,
        generation: gen,
        reason: if fv.required_app != 0 { DENY_APP_MISMATCH } else { DENY_DEFAULT },
        app,
        app_confidence: confidence,
        _pad: [0; 5],
    });
    entry.submit(0);
}

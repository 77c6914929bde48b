//! Segment policy as the datapath sees it: identities, allow entries, segment
//! modes, the active generation, and the events it emits.
//!
//! Everything policy-related is double-buffered by *generation*: the low bit of the
//! generation is part of every identity and policy key (and selects the half of the
//! `SEGMENTS` array), so userspace fills the inactive half and then flips `CONFIG`
//! with one write. A flow caches its verdict together with the generation that
//! produced it and is re-evaluated when they differ.

/// Link-local control traffic that is never policed (and never learned): DHCP,
/// IPv4 broadcast and 224.0.0.0/24, IPv6 link-local and link-scope multicast
/// destinations, ICMPv6 MLD and router/neighbour discovery. A device that loses
/// its address or a neighbour entry must never be a policy outcome. `dst` is the
/// map address form (IPv4-mapped for IPv4); `sport` is the ICMP type.
#[inline(always)]
pub fn exempt(v4: bool, proto: u8, sport: u16, dport: u16, dst: &[u8; 16]) -> bool {
    if proto == crate::net::IPPROTO_UDP && matches!(dport, 67 | 68 | 546 | 547) {
        return true;
    }
    if v4 {
        let bcast = dst[12] == 255 && dst[13] == 255 && dst[14] == 255 && dst[15] == 255;
        let local_mcast = dst[12] == 224 && dst[13] == 0 && dst[14] == 0;
        return bcast || local_mcast;
    }
    let link_local = (dst[0] == 0xfe && dst[1] & 0xc0 == 0x80) || (dst[0] == 0xff && dst[1] & 0x0f == 0x02);
    // ICMPv6: MLD (130–132, 143), router/neighbour discovery (133–137).
    let nd_mld = proto == crate::net::IPPROTO_ICMPV6 && matches!(sport, 130..=137 | 143);
    link_local || nd_mld
}

/// The deny outcome from the segments at both ends: drop if a denying segment
/// enforces, would-drop if denying segments only monitor, else allowed by the
/// defaults. `app_rule` denies even where the default allows (the matching rule
/// required an app). Returns the verdict and the segment it is accounted to.
#[inline(always)]
pub fn deny(s: &SegmentInfo, d: &SegmentInfo, app_rule: bool) -> (Verdict, u32) {
    let denies =
        |x: &SegmentInfo| x.flags & SEG_MEMBER != 0 && (app_rule || x.flags & SEG_DEFAULT_ALLOW == 0);
    let (sd, dd) = (denies(s), denies(d));
    if sd && s.flags & SEG_ENFORCE != 0 {
        return (Verdict::Drop, s.segment);
    }
    if dd && d.flags & SEG_ENFORCE != 0 {
        return (Verdict::Drop, d.segment);
    }
    if sd {
        return (Verdict::WouldDrop, s.segment);
    }
    if dd {
        return (Verdict::WouldDrop, d.segment);
    }
    // Allowed by a segment's default: accounted to that segment.
    (Verdict::Allow, if s.flags & SEG_MEMBER != 0 { s.segment } else { d.segment })
}

/// The tuple a reply of the flow (src, dst, proto, sport, dport) carries. ICMP
/// echo requests are answered by echo replies (type 8 → 0, 128 → 129).
#[inline(always)]
pub fn reply_tuple(src: &[u8; 16], dst: &[u8; 16], proto: u8, sport: u16, dport: u16) -> TupleKey {
    let (mut rs, mut rd) = (dport, sport);
    if proto == crate::net::IPPROTO_ICMP && sport == 8 {
        rs = 0;
        rd = dport;
    } else if proto == crate::net::IPPROTO_ICMPV6 && sport == 128 {
        rs = 129;
        rd = dport;
    }
    TupleKey { src: *dst, dst: *src, sport: rs, dport: rd, proto, _pad: [0; 3] }
}

/// For a packet that may answer an allowed flow: the port the original flow's
/// rule was matched on (the reply's source port; for ICMP the code).
#[inline(always)]
pub fn reply_rule_port(proto: u8, sport: u16, dport: u16) -> u16 {
    if proto == crate::net::IPPROTO_ICMP || proto == crate::net::IPPROTO_ICMPV6 { dport } else { sport }
}

/// Does the first payload's classification satisfy a rule that requires
/// `required`? Only a payload match (high confidence) does, never a port guess.
#[inline(always)]
pub fn app_satisfies(app: u8, confidence: u8, required: u8) -> bool {
    use crate::app::App;
    // FHIR is HTTP: a rule for `http` that carried it before FHIR had a
    // label of its own keeps carrying it.
    let same = app == required || (required == App::Http as u8 && app == App::Fhir as u8);
    same && confidence == crate::app::Confidence::High as u8
}

/// Identities per generation (index into `SEGMENTS`). Id 0 is "no identity".
pub const MAX_IDS: u32 = 4096;

/// `IDENT` LPM trie data. Prefix length counts bits from `gen`: 32 bits of
/// gen/scoped/vlan, then the address prefix (IPv4 as mapped IPv6: 96 + len).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdentData {
    pub generation: u8,
    /// 1 for VLAN-scoped members (then `vlan` matters), 0 otherwise (vlan 0).
    pub scoped: u8,
    /// Big-endian VLAN id.
    pub vlan: [u8; 2],
    pub addr: [u8; 16],
}

/// Bits of `IdentData` before the address.
pub const IDENT_HEADER_BITS: u32 = 32;

/// `MACS` hash key: MAC membership, optionally VLAN-scoped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacKey {
    pub generation: u8,
    pub scoped: u8,
    pub vlan: u16,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// `POLICY` LPM trie data: (src id, dst id, proto, dport), all big-endian so a
/// prefix means "any proto" (72 bits) or "any port" (80 bits) or a port range block.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyData {
    pub generation: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub port: [u8; 2],
}

pub const POLICY_ANY_PROTO_BITS: u32 = 72;
pub const POLICY_ANY_PORT_BITS: u32 = 80;
pub const POLICY_FULL_BITS: u32 = 96;

/// An allow entry. Presence in `POLICY` means allow (while not expired).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// Rule id (index into the agent's rule table), never 0.
    pub rule: u32,
    /// Required application ([`crate::app::App`] as u8), 0 = any.
    pub app: u8,
    pub flags: u8,
    /// Segment (1-based) whose file the rule comes from: allowed traffic is
    /// accounted to it.
    pub segment: u16,
    /// `CLOCK_MONOTONIC_COARSE` ns after which the entry no longer allows; 0 = never.
    pub expires_ns: u64,
    /// `CLOCK_MONOTONIC_COARSE` ns before which the entry does not allow yet
    /// (a maintenance window's next opening); 0 = from the start.
    pub opens_ns: u64,
}

impl PolicyValue {
    /// Until when (`CLOCK_MONOTONIC_COARSE` ns) the entry allows, seen at `now`; `None`
    /// once it has expired. `u64::MAX` for an entry without expiry.
    #[inline(always)]
    pub fn live_until(&self, now: u64) -> Option<u64> {
        if now < self.opens_ns {
            return None;
        }
        match self.expires_ns {
            0 => Some(u64::MAX),
            e if now >= e => None,
            e => Some(e),
        }
    }
}

/// `PolicyValue::flags`: the entry comes from a time-bound exception.
pub const POLICY_FLAG_EXCEPTION: u8 = 1;

/// `SEGMENTS[gen_bit * MAX_IDS + id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    pub flags: u8,
    pub _pad: [u8; 3],
    /// Segment index (1-based) in the agent's segment table; 0 when not a segment.
    pub segment: u32,
}

/// The identity belongs to a segment (its traffic is evaluated).
pub const SEG_MEMBER: u8 = 1;
/// The segment enforces (drops); otherwise it monitors (counts would-drops).
pub const SEG_ENFORCE: u8 = 2;
/// The segment's default verdict is allow.
pub const SEG_DEFAULT_ALLOW: u8 = 4;

/// `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Active generation; 0 = no policy loaded (everything passes unevaluated).
    pub generation: u32,
    /// Events per second per CPU before rate limiting.
    pub event_rate: u32,
    /// The next instant (`CLOCK_MONOTONIC_COARSE` ns) an entry opens (a
    /// maintenance window): a verdict decided before it is decided again then,
    /// so a flow denied before the window passes once it is open. 0 = none.
    pub reevaluate_at_ns: u64,
}

impl PolicyConfig {
    /// A verdict decided at `now` valid until `until` holds until this instead.
    #[inline(always)]
    pub fn verdict_until(&self, now: u64, until: u64) -> u64 {
        let at = self.reevaluate_at_ns;
        if at > now && at < until { at } else { until }
    }
}

/// `IFACES[ifindex]` flags.
pub const IFACE_MIRROR: u32 = 1;

/// Cached verdict of a flow (`FlowValue::verdict`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not evaluated yet (or no policy loaded).
    None = 0,
    /// No segment involved: nothing to enforce.
    Unevaluated = 1,
    /// Link-local control traffic (ND, DHCP, …) always passes.
    Exempt = 2,
    Allow = 3,
    /// A reply of an allowed flow.
    Reply = 4,
    /// Allowed by a rule that requires an app; waiting for the first payload.
    AppPending = 5,
    /// Denied in a monitor segment: passes, counted.
    WouldDrop = 6,
    Drop = 7,
}

impl Verdict {
    /// Every verdict, in discriminant order.
    pub const ALL: [Verdict; 8] = [
        Verdict::None,
        Verdict::Unevaluated,
        Verdict::Exempt,
        Verdict::Allow,
        Verdict::Reply,
        Verdict::AppPending,
        Verdict::WouldDrop,
        Verdict::Drop,
    ];

    pub const fn from_u8(v: u8) -> Verdict {
        match v {
            1 => Verdict::Unevaluated,
            2 => Verdict::Exempt,
            3 => Verdict::Allow,
            4 => Verdict::Reply,
            5 => Verdict::AppPending,
            6 => Verdict::WouldDrop,
            7 => Verdict::Drop,
            _ => Verdict::None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::None => "none",
            Verdict::Unevaluated => "unevaluated",
            Verdict::Exempt => "exempt",
            Verdict::Allow => "allow",
            Verdict::Reply => "reply",
            Verdict::AppPending => "app_pending",
            Verdict::WouldDrop => "would_drop",
            Verdict::Drop => "drop",
        }
    }
}

/// Why a flow was denied (`Event::reason`).
pub const DENY_DEFAULT: u8 = 1;
pub const DENY_APP_MISMATCH: u8 = 2;

/// One ring-buffer event: a flow denied (dropped or would-be dropped), once per
/// flow and generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub vlan: u16,
    pub proto: u8,
    /// [`Verdict::Drop`] or [`Verdict::WouldDrop`].
    pub verdict: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub src_id: u32,
    pub dst_id: u32,
    /// Segment whose default denied (1-based), 0 if none.
    pub segment: u32,
    /// Rule id for app mismatches, 0 for a default verdict.
    pub rule: u32,
    pub generation: u32,
    pub reason: u8,
    /// [`crate::app::App`] from the payload, or the port's service before any payload.
    pub app: u8,
    /// [`crate::app::Confidence`] of `app`.
    pub app_confidence: u8,
    pub _pad: [u8; 5],
}

/// `ALLOWED` key: a flow tuple without interface, to recognise replies of allowed
/// flows whichever interface they come back on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for IdentData {}
    unsafe impl aya::Pod for MacKey {}
    unsafe impl aya::Pod for PolicyData {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for SegmentInfo {}
    unsafe impl aya::Pod for PolicyConfig {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for TupleKey {}
}

const _: () = assert!(core::mem::size_of::<IdentData>() == 20);
const _: () = assert!(core::mem::size_of::<PolicyData>() == 12);
const _: () = assert!(core::mem::size_of::<Event>() == 80);

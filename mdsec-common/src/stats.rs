//! Per-CPU counters by reason. Every frame increments exactly one verdict
//! (`Pass`/`Drop`; `Frames` is their sum); every early return of the parser increments exactly one
//! malformed/truncated reason, so nothing leaves the program uncounted.

/// One counter cell of the `STATS` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

macro_rules! stats {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Index into the `STATS` map.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat { $($(#[$doc])* $variant,)* }

        impl Stat {
            pub const ALL: &'static [Stat] = &[$(Stat::$variant,)*];
            /// Stable snake_case name used in the API and in metric labels.
            pub const fn name(self) -> &'static str {
                match self { $(Stat::$variant => $name,)* }
            }
        }
    };
}

stats! {
    /// Every frame the program saw: `Pass` + `Drop`, which every frame moves
    /// exactly once. Derived on the user side ([`derive_frames`]), so the
    /// datapath writes one counter less per frame; the kernel's cell stays 0.
    Frames = "frames",
    Pass = "pass",
    Drop = "drop",
    /// Passed frames of a bump-in-the-wire port sent on to its peer port by
    /// XDP_REDIRECT (a subset of `Pass`).
    BridgeForwarded = "bridge_forwarded",
    /// Passed frames of a bump port without a peer in `PORTS`: handed to the
    /// kernel bridge underneath (a subset of `Pass`).
    BridgeNoPeer = "bridge_no_peer",
    /// Frames carrying one or two VLAN tags.
    VlanTagged = "vlan_tagged",
    Arp = "arp",
    Ipv4 = "ipv4",
    Ipv6 = "ipv6",
    /// Ethertypes mdsec does not parse further (LLDP, STP, …).
    OtherL3 = "other_l3",
    Tcp = "tcp",
    Udp = "udp",
    Icmp = "icmp",
    Icmpv6 = "icmpv6",
    OtherL4 = "other_l4",
    /// First fragment of a fragmented datagram (carries the ports).
    FragFirst = "fragment_first",
    /// Later fragment accounted to the flow of its first fragment.
    FragMatched = "fragment_matched",
    /// Later fragment whose first fragment was not seen (yet): accounted to the
    /// fragment bucket flow (ports 0).
    FragBucket = "fragment_bucket",
    /// Frame shorter than an Ethernet header.
    TruncEth = "truncated_ethernet",
    /// Frame ends inside a VLAN tag.
    TruncVlan = "truncated_vlan",
    /// More than two VLAN tags: the rest is not parsed.
    VlanTooDeep = "vlan_too_deep",
    TruncArp = "truncated_arp",
    TruncIpv4 = "truncated_ipv4",
    /// IPv4 version field is not 4.
    BadIpv4Version = "bad_ipv4_version",
    /// IHL below 5 (shorter than the fixed header).
    BadIpv4Ihl = "bad_ipv4_ihl",
    /// Total length below the header length or beyond the frame.
    BadIpv4Len = "bad_ipv4_length",
    TruncIpv6 = "truncated_ipv6",
    /// Version field of an IPv6 ethertype frame is not 6.
    BadIpv6Version = "bad_ipv6_version",
    /// Frame ends inside an IPv6 extension header.
    TruncIpv6Ext = "truncated_ipv6_ext",
    /// More extension headers than the parser's bound.
    Ipv6ExtTooDeep = "ipv6_ext_too_deep",
    /// Frame ends inside the TCP/UDP/ICMP header.
    TruncL4 = "truncated_l4",
    /// TCP data offset below 5.
    BadTcpOffset = "bad_tcp_offset",
    /// Policy: packets of flows allowed by a rule.
    PolicyAllow = "policy_allow",
    /// Policy: packets of replies to allowed flows.
    PolicyReply = "policy_reply",
    /// Policy: link-local control traffic (ND, DHCP, …) that is never policed.
    PolicyExempt = "policy_exempt",
    /// Policy loaded but no segment involved in the flow.
    PolicyUnevaluated = "policy_unevaluated",
    /// Denied in monitor mode (or on a mirror port): passed and counted.
    PolicyWouldDrop = "policy_would_drop",
    /// Denied in enforce mode: dropped.
    PolicyDrop = "policy_drop",
    /// First payload did not match the app the allowing rule requires.
    AppMismatch = "app_mismatch",
    /// A deny event could not be reserved in the ring buffer.
    EventsLost = "events_lost",
    /// A deny event was suppressed by the per-CPU rate limit.
    EventsRateLimited = "events_rate_limited",
    /// A first-payload sample could not be reserved in the `SAMPLES` ring buffer.
    SamplesLost = "samples_lost",
    /// A new flow got no slot: its first set was locked by another CPU's insert.
    /// The frame is still judged (through a per-CPU stand-in flow) and counted
    /// for its device; its flow is created by its next frame.
    FlowUpdateFail = "flow_update_failed",
    /// A flow was evicted from a full flow table to make room for a new one.
    FlowEvicted = "flow_evicted",
    /// A device could not be inserted into `DEVICES`.
    DeviceUpdateFail = "device_update_failed",
    /// A first fragment could not be remembered in `FRAGS`.
    FragUpdateFail = "fragment_update_failed",
    /// Mirror ports (`mdsec_mirror`): one tunnel layer removed before the inner
    /// frame was judged, per kind. Bytes are the layer's overhead, so a tunnel
    /// frame's outer length is its inner frame's (under `pass`) plus these.
    TunnelErspan = "tunnel_erspan",
    /// GRE carrying Ethernet (0x6558) or IP.
    TunnelGre = "tunnel_gre",
    TunnelVxlan = "tunnel_vxlan",
    TunnelPppoe = "tunnel_pppoe",
    /// IPv4 or IPv6 directly inside IPv4 or IPv6 (protocols 4 and 41: IP-in-IP, 6in4).
    TunnelIpInIp = "tunnel_ip_in_ip",
    /// Decapsulation stopped: the frame ends inside a tunnel header, or its
    /// inner frame is shorter than an Ethernet header. Judged as it stands.
    TunnelTruncated = "tunnel_truncated",
    /// Decapsulation stopped at a tunnel mdsec does not open: GRE version 1
    /// (PPTP) or with routing, ERSPAN of a non-Ethernet frame, VXLAN without a
    /// VNI, PPP control (LCP, IPCP) in a PPPoE session. Judged as it stands.
    TunnelOpaque = "tunnel_opaque",
    /// Decapsulation stopped at an outer IP fragment: the inner frame is split
    /// across datagrams. Judged as it stands.
    TunnelFragment = "tunnel_fragment",
    /// Still a tunnel after `net::MAX_TUNNEL_DEPTH` layers: judged at that depth.
    TunnelTooDeep = "tunnel_too_deep",
    /// The mirror entry could not hand the frame to the datapath (its tail call
    /// failed): passed without a verdict. Never expected while an agent runs.
    TunnelNoJudge = "tunnel_judge_missing",
}

/// Number of entries in the `STATS` array.
pub const STATS_LEN: u32 = Stat::ALL.len() as u32;

impl Stat {
    /// Tunnel layers the mirror entry removes, by kind.
    pub const TUNNEL_LAYERS: &'static [Stat] =
        &[Stat::TunnelErspan, Stat::TunnelGre, Stat::TunnelVxlan, Stat::TunnelPppoe, Stat::TunnelIpInIp];
    /// Why the mirror entry stopped inside a tunnel (or could not judge).
    pub const TUNNEL_STOPS: &'static [Stat] = &[
        Stat::TunnelTruncated,
        Stat::TunnelOpaque,
        Stat::TunnelFragment,
        Stat::TunnelTooDeep,
        Stat::TunnelNoJudge,
    ];

    /// True for reasons that mean the frame was malformed or truncated.
    pub const fn is_malformed(self) -> bool {
        matches!(
            self,
            Stat::TruncEth
                | Stat::TruncVlan
                | Stat::VlanTooDeep
                | Stat::TruncArp
                | Stat::TruncIpv4
                | Stat::BadIpv4Version
                | Stat::BadIpv4Ihl
                | Stat::BadIpv4Len
                | Stat::TruncIpv6
                | Stat::BadIpv6Version
                | Stat::TruncIpv6Ext
                | Stat::Ipv6ExtTooDeep
                | Stat::TruncL4
                | Stat::BadTcpOffset
        )
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

/// Fills `Frames` in per-CPU sums indexed like [`Stat::ALL`] read from `STATS`.
pub fn derive_frames(sums: &mut [Counter]) {
    let (p, d) = (sums[Stat::Pass as usize], sums[Stat::Drop as usize]);
    sums[Stat::Frames as usize] =
        Counter { packets: p.packets.wrapping_add(d.packets), bytes: p.bytes.wrapping_add(d.bytes) };
}

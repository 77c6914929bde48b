//! Bridge forwarding on veth: one UDP flood (trafgen, one CPU) from a sender
//! namespace across a two-port bridge namespace into a receiver, forwarded by
//! the mdsec bump (`mdsec_bridge`, an allowed flow), an empty XDP_REDIRECT
//! program (the floor), the Linux bridge alone, and the Linux bridge with
//! mdsec's XDP on its member ports; plus the bump judging a denied flow. Same
//! sender, same run. A forwarding rate is what arrives at the receiver, counted
//! by an empty XDP_DROP program there (its `run_cnt`), the same sink for every
//! forwarder.

use anyhow::{Context, Result};
use mdsec_common::{maps as names, stats::Stat};
use mdsec_tests::{
    frames::{self, V4},
    kernel::{TestProg, with_policy_in},
    netns::{ip, link_mac},
};

use crate::throughput::{InNs, Pair, measure, run_cnt};

/// The sender may reach the receiver on UDP 9 (`allow`), or only on 10.
fn policy(allow: bool) -> Vec<(&'static str, String)> {
    let port = if allow { 9 } else { 10 };
    vec![
        ("zones.yaml", "zones:\n  receiver: [10.200.0.2/32]\n".into()),
        (
            "senders.yaml",
            format!(
                "segment: senders\nfunction: bench\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.200.0.1/32\nallow:\n  - to: receiver\n    proto: udp\n    ports: [{port}]\n"
            ),
        ),
    ]
}

fn bridged(program: &'static str, allow: bool) -> Result<TestProg> {
    let files = policy(allow);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    // The loaded program holds its maps: the user-side owner may go.
    let (prog, _, _, _) = with_policy_in(program, &refs, 1000, &[])?;
    Ok(prog)
}

/// Attaches `prog` to both bridge ports (and, for a bump, makes them peers).
fn attach_ports(bridge_ns: &str, prog: &mut TestProg, peers: bool) -> Result<()> {
    let _g = InNs::enter(bridge_ns)?;
    if peers {
        prog.set_peers("pa", "pb")?;
    }
    prog.attach("pa")?;
    prog.attach("pb")
}

pub fn run() -> Result<()> {
    let pid = std::process::id();
    let br = format!("mdsec-bench{pid}-br");
    let pair = Pair {
        tx: format!("mdsec-bench{pid}-tx"),
        rx: format!("mdsec-bench{pid}-rx"),
        more: vec![br.clone()],
    };
    for ns in [&pair.tx, &pair.rx, &br] {
        ip(&["netns", "add", ns])?;
        ip(&["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
    }
    ip(&["link", "add", "s0", "netns", &pair.tx, "type", "veth", "peer", "name", "pa", "netns", &br])?;
    ip(&["link", "add", "pb", "netns", &br, "type", "veth", "peer", "name", "r0", "netns", &pair.rx])?;
    ip(&["-n", &pair.tx, "addr", "add", "10.200.0.1/24", "dev", "s0"])?;
    ip(&["-n", &pair.rx, "addr", "add", "10.200.0.2/24", "dev", "r0"])?;
    for (ns, dev) in [(&pair.tx, "s0"), (&br, "pa"), (&br, "pb"), (&pair.rx, "r0")] {
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    // The reverse direction's redirect target (pa's peer) needs NAPI too.
    mdsec_tests::netns::redirect_target(&pair.tx, "s0")?;
    let (dst, src) = (link_mac(&pair.rx, "r0")?, link_mac(&pair.tx, "s0")?);
    let l3 =
        V4::new([10, 200, 0, 1].into(), [10, 200, 0, 2].into(), 17).build(&frames::udp(1234, 9, &[0u8; 22]));
    let frame = frames::eth(dst, src, &[], 0x0800, &l3);
    let conf = std::env::temp_dir().join(format!("mdsec-bench{pid}-fwd.trafgen"));
    let bytes: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
    std::fs::write(&conf, format!("{{ {} }}\n", bytes.join(", ")))?;

    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enable bpf stats")?;
    let result = (|| -> Result<Vec<(&str, f64)>> {
        // The sink: what arrives at the receiver. Attached first, so b is a
        // redirect target (the receiving veth has NAPI) in every case: pb's peer.
        let mut sink = TestProg::load_with(names::BASELINE_DROP, &[])?;
        {
            let _g = InNs::enter(&pair.rx)?;
            sink.attach("r0")?;
        }
        let sink_id = sink.id()?;
        let arrived = || run_cnt(sink_id);
        let mut out = Vec::new();
        {
            // A discarded first run warms the path up (see `throughput`).
            let mut p = TestProg::load_with(names::BASELINE_REDIRECT, &[])?;
            attach_ports(&br, &mut p, true)?;
            let _ = measure(&pair, &conf, arrived);
        }
        {
            let mut p = TestProg::load_with(names::BASELINE_REDIRECT, &[])?;
            attach_ports(&br, &mut p, true)?;
            out.push(("empty XDP_REDIRECT (driver), the floor", measure(&pair, &conf, arrived)?));
        }
        {
            let mut p = bridged(names::BRIDGE_PROGRAM, true)?;
            attach_ports(&br, &mut p, true)?;
            let pps = measure(&pair, &conf, arrived)?;
            anyhow::ensure!(p.stat(Stat::BridgeForwarded)? > 0, "the bump forwarded nothing");
            out.push(("mdsec bump (driver), allowed flow", pps));
        }
        {
            let mut p = bridged(names::BRIDGE_PROGRAM, false)?;
            attach_ports(&br, &mut p, true)?;
            let before = arrived()?;
            let pps = measure(&pair, &conf, || p.stat(Stat::Drop))?;
            anyhow::ensure!(arrived()? == before, "a denied frame crossed the bump");
            out.push(("mdsec bump (driver), denied flow: judged and dropped", pps));
        }
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
        for p in ["pa", "pb"] {
            ip(&["-n", &br, "link", "set", p, "master", "br0"])?;
        }
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        out.push(("Linux bridge", measure(&pair, &conf, arrived)?));
        {
            let mut p = bridged(names::PROGRAM, true)?;
            attach_ports(&br, &mut p, false)?;
            out.push((
                "Linux bridge + mdsec XDP on its ports, allowed flow",
                measure(&pair, &conf, arrived)?,
            ));
        }
        Ok(out)
    })();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    let _ = std::fs::remove_file(&conf);
    let rates = result?;
    let rate = |prefix: &str| rates.iter().find(|r| r.0.starts_with(prefix)).map_or(0.0, |r| r.1);
    let (floor, bump, linux) =
        (rate("empty XDP_REDIRECT"), rate("mdsec bump (driver), allowed"), rate("Linux bridge"));
    let mut table = String::from("| forwarder | rate | vs empty XDP_REDIRECT |\n|---|---|---|\n");
    for (name, pps) in &rates {
        table += &format!("| {name} | {:.3} Mpps | {:.0} % |\n", pps / 1e6, pps / floor * 100.0);
    }
    table += &format!(
        "\nTargets: the mdsec bump ≥ 90 % of the empty XDP_REDIRECT: **{:.0} %**; ≥ the Linux bridge \
         alone: **{:.2}×**.\n",
        bump / floor * 100.0,
        bump / linux
    );
    println!("{table}");
    let section = format!(
        "## Bridge forwarding on veth\n\nCommand: `cargo xtask bench forwarding`. One sender (trafgen, one \
         CPU, 64-byte UDP frames) floods a veth into a bridge namespace with two ports; each forwarder in \
         turn carries the flood to the receiver, same run. The rate is what arrives at the receiver, counted \
         by an empty XDP_DROP program there (the kernel's `run_cnt`), the same sink for every forwarder; the \
         denied row counts the bump's own `drop` counter (nothing arrives). The median of 5 windows of 2 s \
         after 1.5 s of warm-up. Machine: {}.\n\n{table}\n\
         What veth can show: the cost of each forwarder relative to the others on one attach point, with \
         the same sender. What it cannot: a NIC's line rate. A veth builds an skb before its XDP runs and \
         the sending CPU bounds the rate; on a physical NIC, native XDP and its redirect run in the \
         driver before any skb exists and the Linux bridge pays for the skb, so the gap grows.",
        crate::machine()
    );
    crate::write_section("## Bridge forwarding on veth", &section)
}

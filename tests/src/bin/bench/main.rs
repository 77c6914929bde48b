//! `cargo xtask bench`: measurements, never assertions. Prints a table and rewrites
//! the matching section of BENCHMARKS.md.
//!
//! - policy: compile + swap of a 10,000-rule policy into the real (loaded, not
//!   attached) datapath maps; median of several runs.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use ipnet::IpNet;
use mdsec_agent::{
    base::clock::Anchor,
    policy::{
        compile,
        maps::PolicyMaps,
        model::{DefaultVerdict, Direction, Member, Mode, NewDevices, Peer, Policy, Rule, Segment, Zone},
    },
};
use mdsec_tests::kernel::TestProg;

mod curve;
mod differential;
mod export;
mod forwarding;
mod mirror;
mod perpacket;
mod scale;
mod throughput;

fn net(a: u8, b: u8, c: u8) -> IpNet {
    IpNet::new(IpAddr::V4(Ipv4Addr::new(a, b, c, 0)), 24).unwrap()
}

/// `segments` segments of `rules_per_segment` rules each, every rule one zone and
/// one TCP port.
fn synthetic(segments: usize, zones: usize, rules_per_segment: usize) -> Policy {
    let mut p =
        Policy { zones: Vec::new(), segments: Vec::new(), rules: Vec::new(), quarantined: Vec::new() };
    for z in 0..zones {
        p.zones.push(Zone {
            name: format!("zone{z}"),
            cidrs: vec![net(172, 16 + (z / 250) as u8, (z % 250) as u8)],
        });
    }
    for s in 0..segments {
        p.segments.push(Segment {
            name: format!("seg{s}"),
            function: "bench".into(),
            mode: Mode::Enforce,
            default: DefaultVerdict::Deny,
            members: vec![Member::Net { net: net(10, (s / 250) as u8, (s % 250) as u8), vlan: None }],
            file: PathBuf::from(format!("seg{s}.yaml")),
            learning_period: std::time::Duration::ZERO,
            require_approval: false,
            new_devices: NewDevices::Allow,
        });
        for r in 0..rules_per_segment {
            let id = p.rules.len() as u32 + 1;
            p.rules.push(Rule {
                id,
                segment: s,
                direction: Direction::Out,
                peer: Peer::Name(format!("zone{}", (s * rules_per_segment + r) % zones)),
                proto: Some(6),
                ports: vec![(1000 + r as u16, 1000 + r as u16)],
                app: None,
                exception: None,
                window: None,
                quarantine: false,
                file: PathBuf::from(format!("seg{s}.yaml")),
                line: 10 + r as u64,
                col: 9,
            });
        }
    }
    p
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    let all = ["packet", "mirror", "curve", "throughput", "forwarding", "scale", "policy", "differential"];
    for w in &which {
        if !all.contains(&w.as_str()) {
            anyhow::bail!("unknown benchmark {w} (one of: {})", all.join(", "));
        }
    }
    let want = |n: &str| which.is_empty() || which.iter().any(|w| w == n);
    if want("packet") {
        perpacket::run()?;
    }
    if want("mirror") {
        mirror::run()?;
    }
    if want("curve") {
        curve::run()?;
    }
    if want("throughput") {
        throughput::run()?;
    }
    if want("forwarding") {
        forwarding::run()?;
    }
    if want("scale") {
        scale::run()?;
    }
    if want("policy") {
        policy_bench()?;
    }
    if want("differential") {
        differential::run()?;
    }
    Ok(())
}

fn policy_bench() -> Result<()> {
    let policy = synthetic(100, 200, 100);
    let mut prog = TestProg::load()?;
    let mut maps = PolicyMaps::new(|n| prog.take_map(n))?;
    let runs = 11;
    let (mut compile_t, mut swap_t, mut entries) = (Vec::new(), Vec::new(), 0);
    for _ in 0..runs {
        let t0 = Instant::now();
        let c = compile::compile(&policy, &Anchor::now(), maps.limits()).map_err(anyhow::Error::msg)?;
        let t1 = Instant::now();
        maps.apply(&c, 1000)?;
        let t2 = Instant::now();
        compile_t.push(t1 - t0);
        swap_t.push(t2 - t1);
        entries = c.policy.len();
    }
    let (c, s) = (median(compile_t), median(swap_t));
    let total = c + s;
    let table = format!(
        "| policy | rules | datapath entries | compile (median) | swap (median) | compile + swap | target |\n\
         |---|---|---|---|---|---|---|\n\
         | 100 segments × 100 rules, 200 zones | {} | {entries} | {:.1} ms | {:.1} ms | {:.1} ms | ≤ 100 ms |\n",
        policy.rules.len(),
        c.as_secs_f64() * 1e3,
        s.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3
    );
    println!("{table}");
    let section = format!(
        "## Policy compile + swap\n\nCommand: `cargo xtask bench` ({runs} runs, median; release build; real kernel \
         maps of the loaded datapath, not attached). The swap clears the inactive generation, writes it and flips \
         `CONFIG`. Machine: {}.\n\n{table}",
        machine()
    );
    write_section("## Policy compile + swap", &section)?;
    Ok(())
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // The machine's, not this thread's (benches pin themselves to one CPU).
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map_or(0, |c| c.lines().filter(|l| l.starts_with("processor")).count());
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// Replaces the section titled `title` of BENCHMARKS.md (or appends it).
pub fn write_section(title: &str, section: &str) -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nMeasured with `cargo xtask bench` on the machine described below; numbers from one run.\n\n"
            .to_string()
    });
    let start = old.find(title);
    let section = if section.ends_with('\n') { format!("{section}\n") } else { format!("{section}\n\n") };
    let new = match start {
        Some(s) => {
            let end = old[s + 3..].find("\n## ").map_or(old.len(), |e| s + 3 + e + 1);
            format!("{}{section}{}", &old[..s], &old[end..])
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::write(&path, new.trim_end().to_string() + "\n")?;
    println!("wrote {} ({title})", path.display());
    Ok(())
}

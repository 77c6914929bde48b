//! The differential run at scale: 1,000,000 generated frames through the kernel
//! program and the reference model; every disagreement is listed.

use std::time::Instant;

use anyhow::{Result, bail};

pub const FRAMES: u64 = 1_000_000;

pub fn run() -> Result<()> {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let t0 = Instant::now();
    let r = mdsec_tests::differential::run(FRAMES, seed)?;
    let took = t0.elapsed();
    let reasons: Vec<String> = r.reasons.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let table = format!(
        "| frames | seed | disagreements | dropped | flows | devices | foreign-MAC frames | time |\n|---|---|---|---|---|---|---|---|\n| {} | {seed} | **{}** | {} | {} | {} | {} | {:.0} s |\n",
        r.packets,
        r.disagreements,
        r.dropped,
        r.flows,
        r.devices,
        r.foreign,
        took.as_secs_f64()
    );
    println!("{table}");
    for e in &r.examples {
        println!("  {e}");
    }
    let section = format!(
        "## Differential: kernel vs reference model\n\nCommand: `cargo xtask bench differential` (`cargo xtask test` \
         runs 2 × 20,000). Generated frames (Ethernet, VLAN stacks, ARP, IPv4 with options and fragments, IPv6 \
         with extension chains, TCP/UDP/ICMP/other, fixture and random payloads, replies of earlier flows, \
         truncations and corrupted headers) go through the kernel program (BPF_PROG_TEST_RUN) and through \
         `mdsec_common::model` with the same five-segment policy; they must agree on the action, the flow key, \
         the flow's verdict, segment, app and packet count, and, per batch of 5,000, on the parser's stop \
         reasons and on every device's frame and byte counts (the kernel's derived from DEVICES and the flows \
         each device owns, as the agent sums them). Machine: {}.\n\n{table}\nParse outcomes of the frames: {}.\n",
        crate::machine(),
        reasons.join(", ")
    );
    crate::write_section("## Differential: kernel vs reference model", &section)?;
    if r.disagreements > 0 {
        bail!("{} disagreements between the kernel and the model", r.disagreements);
    }
    Ok(())
}

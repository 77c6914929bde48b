//! What opening tunnels costs on a mirror port: the same inner frame judged by
//! `mdsec_xdp` bare, and by `mdsec_mirror` bare and inside each tunnel (the
//! decap stage, its rewrite of the frame's front and the tail call), with the
//! empty program as the harness floor, all in the same run.
//!
//! One BPF_PROG_TEST_RUN per packet (`repeat` 1, the kernel's own timing of
//! the run): with `repeat` N the kernel runs the program N times on one buffer,
//! and after the first run the tunnel is already gone.

use anyhow::Result;
use mdsec_common::{maps as names, policy::IFACE_MIRROR};
use mdsec_tests::{
    frames::{self, V4},
    kernel::TestProg,
};

const RUNS: usize = 200_000;

fn inner() -> Vec<u8> {
    let ip =
        V4::new([10, 0, 1, 2].into(), [10, 0, 2, 2].into(), 17).build(&frames::udp(40000, 9000, &[0x5a; 64]));
    frames::eth([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], &[], 0x0800, &ip)
}

fn outer(proto: u8, payload: &[u8]) -> Vec<u8> {
    let ip = V4::new([192, 0, 2, 1].into(), [192, 0, 2, 2].into(), proto).build(payload);
    frames::eth([2, 0, 0, 0, 0xaa, 2], [2, 0, 0, 0, 0xaa, 1], &[], 0x0800, &ip)
}

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let f = inner();
    let l3 = frames::l3_of(&f).unwrap().1.to_vec();
    vec![
        ("no tunnel", f.clone()),
        ("ERSPAN II", outer(47, &frames::gre(0x1000, 0x88be, &frames::erspan2(1, &f)))),
        ("ERSPAN III + subheader", outer(47, &frames::gre(0x1000, 0x22eb, &frames::erspan3(1, true, &f)))),
        ("VXLAN", outer(17, &frames::udp(50000, 4789, &frames::vxlan(0x08, 5001, &f)))),
        ("GRE, IP inside", outer(47, &frames::gre(0, 0x0800, &l3))),
        (
            "PPPoE",
            frames::eth(
                [2, 0, 0, 0, 0xaa, 2],
                [2, 0, 0, 0, 0, 1],
                &[],
                0x8864,
                &frames::pppoe(7, 0x0021, &l3),
            ),
        ),
        (
            "ERSPAN II in VXLAN",
            outer(
                17,
                &frames::udp(
                    50000,
                    4789,
                    &frames::vxlan(
                        0x08,
                        7,
                        &outer(47, &frames::gre(0x1000, 0x88be, &frames::erspan2(1, &f))),
                    ),
                ),
            ),
        ),
    ]
}

/// Mean ns of one run of `frame` through `prog`, over [`RUNS`] runs.
fn mean(prog: &mut TestProg, frame: &[u8]) -> Result<f64> {
    let mut total = 0u128;
    for _ in 0..RUNS {
        total += prog.time(frame, 1)?.as_nanos();
    }
    Ok(total as f64 / RUNS as f64)
}

pub fn run() -> Result<()> {
    crate::perpacket::pin(0)?;
    let (mut mirror, _m) =
        mdsec_tests::kernel::with_policy_in(names::MIRROR_PROGRAM, crate::perpacket::POLICY, 1000, &[])
            .map(|(p, m, _, _)| (p, m))?;
    let (mut judge, _j) =
        mdsec_tests::kernel::with_policy(crate::perpacket::POLICY, 1000).map(|(p, m, _, _)| (p, m))?;
    // BPF_PROG_TEST_RUN receives on the loopback device: a mirror port for both.
    mirror.set_iface(1, IFACE_MIRROR)?;
    judge.set_iface(1, IFACE_MIRROR)?;
    let mut empty = TestProg::load_with(names::BASELINE_PASS, &[])?;
    let f = inner();
    // Warm: the flow exists before timing, as for an established conversation.
    mirror.run(&f)?;
    judge.run(&f)?;
    let e = mean(&mut empty, &f)?;
    let j = mean(&mut judge, &f)?;
    let mut rows = vec![format!(
        "| no tunnel, `mdsec_xdp` (a routed port's judge) | {} B | {j:.0} ns | {e:.0} ns | 1.00× |",
        f.len()
    )];
    for (name, frame) in cases() {
        let m = mean(&mut mirror, &frame)?;
        rows.push(format!(
            "| {name}, `mdsec_mirror` | {} B | {m:.0} ns | {e:.0} ns | {:.2}× |",
            frame.len(),
            (m - e) / (j - e)
        ));
    }
    let table = format!(
        "| frame | size | mean per run | empty XDP_PASS | cost over the bare judge's (both less the empty program) |\n|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    let section = format!(
        "## Mirror ports: opening tunnels\n\nCommand: `cargo xtask bench mirror`. The same inner frame (IPv4 UDP, \
         64-byte payload, an established allowed flow) judged by `mdsec_xdp` bare and by `mdsec_mirror` bare \
         and inside each tunnel: the decap stage, its rewrite of the frame's front and the tail call into \
         `mdsec_xdp`. One BPF_PROG_TEST_RUN per packet ({RUNS} runs, the kernel's own timing, pinned to one \
         CPU): with `repeat` N the kernel would run the program N times on one buffer, whose tunnel is gone \
         after the first. The per-run timing overhead is in every figure, the empty program's included. \
         Machine: {}.\n\n{table}\nThe inner frame of GRE carrying IP gets the tunnel's MACs (a bare IP \
         datagram has none), so the established flow's frames come from another MAC than its creator's: \
         the foreign-MAC path, one `DEVICES` update per frame, on top of the rewrite.",
        crate::machine()
    );
    crate::write_section("## Mirror ports: opening tunnels", &section)
}

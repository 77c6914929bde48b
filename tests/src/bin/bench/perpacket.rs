//! Per-packet cost with BPF_PROG_TEST_RUN: the full mdsec program (with a policy
//! installed) against an empty XDP_PASS program and Debian's xdp-filter, each run
//! by `bpftool prog run … repeat N` on the same packets in the same run.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use mdsec_agent::policy::maps::PolicyMaps;
use mdsec_common::maps as names;
use mdsec_tests::{
    fixtures,
    frames::{self, V4},
    kernel::TestProg,
};

pub const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 3;

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// The policy the mdsec program decides with (pumps enforce, imaging monitor).
pub const POLICY: &[(&str, &str)] = &[
    ("zones.yaml", "zones:\n  pharmacy: [10.0.2.0/24, fd00:2::/64]\n  workstations: [10.0.3.0/24]\n"),
    (
        "pumps.yaml",
        "segment: pumps\nfunction: infusion-pump\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.1.0/24\n  - cidr: fd00:1::/64\nallow:\n  - to: pharmacy\n    proto: tcp\n    ports: [2575]\n    app: hl7\n  - to: pharmacy\n    proto: udp\n    ports: [53, 9000]\n",
    ),
    (
        "imaging.yaml",
        "segment: imaging\nfunction: imaging-modality\nmode: monitor\ndefault: deny\nmembers:\n  - cidr: 10.0.4.0/24\nallow:\n  - from: workstations\n    proto: tcp\n    ports: [104]\n    app: dicom\n",
    ),
];

fn v4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// The packet mix: (name, frame).
pub fn mix() -> Vec<(&'static str, Vec<u8>)> {
    let tcp4 = |src: [u8; 4], dst: [u8; 4], sport, dport, flags, payload: &[u8]| {
        frames::eth(
            MAC_B,
            MAC_A,
            &[],
            0x0800,
            &V4::new(v4(src), v4(dst), 6).build(&frames::tcp(sport, dport, flags, payload)),
        )
    };
    let udp4 = |tags: &[(u16, u16)], src: [u8; 4], dst: [u8; 4], sport, dport, payload: &[u8]| {
        frames::eth(
            MAC_B,
            MAC_A,
            tags,
            0x0800,
            &V4::new(v4(src), v4(dst), 17).build(&frames::udp(sport, dport, payload)),
        )
    };
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    vec![
        ("tcp-syn", tcp4([10, 0, 1, 2], [10, 0, 2, 2], 40000, 2575, 0x02, b"")),
        (
            "tcp-dicom",
            tcp4([10, 0, 3, 2], [10, 0, 4, 2], 40001, 104, 0x18, &fixtures::load("dicom-associate-rq")),
        ),
        ("tcp-hl7", tcp4([10, 0, 1, 2], [10, 0, 2, 2], 40002, 2575, 0x18, &fixtures::load("hl7-mllp"))),
        ("udp-dns", udp4(&[], [10, 0, 1, 2], [10, 0, 2, 53], 40003, 53, &fixtures::load("dns-query"))),
        (
            "ipv6-udp",
            frames::eth(
                MAC_B,
                MAC_A,
                &[],
                0x86dd,
                &frames::ipv6(
                    v6("fd00:1::2"),
                    v6("fd00:2::2"),
                    &[],
                    17,
                    &frames::udp(40004, 9000, &[0x5a; 64]),
                ),
            ),
        ),
        ("vlan-udp", udp4(&[(0x8100, 110)], [10, 0, 1, 2], [10, 0, 2, 2], 40005, 9000, &[0x5a; 64])),
        ("denied-tcp", tcp4([10, 0, 5, 2], [10, 0, 1, 2], 40006, 22, 0x02, b"")),
    ]
}

/// Loads the datapath with the benchmark policy installed.
pub fn datapath_with_policy() -> Result<(TestProg, PolicyMaps)> {
    datapath_with_policy_text(POLICY)
}

/// Loads the datapath with the policy of these (file, YAML) installed.
pub fn datapath_with_policy_text(files: &[(&str, &str)]) -> Result<(TestProg, PolicyMaps)> {
    let (prog, maps, _, _) = mdsec_tests::kernel::with_policy(files, 1000)?;
    Ok((prog, maps))
}

/// `bpftool prog run`: (return value, mean ns per run).
pub fn bpftool_run(id: u32, frame_file: &Path, repeat: u32) -> Result<(u32, f64)> {
    let out = Command::new("bpftool")
        .args(["prog", "run", "id", &id.to_string(), "data_in"])
        .arg(frame_file)
        .args(["repeat", &repeat.to_string()])
        .output()
        .context("run bpftool")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("bpftool prog run id {id}: {text}");
    }
    let ret = text
        .split("Return value:")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|r| r.trim().parse().ok())
        .with_context(|| format!("no return value in {text:?}"))?;
    let ns = text
        .split("duration (average):")
        .nth(1)
        .and_then(|r| r.trim().strip_suffix("ns").or(Some(r.trim())))
        .and_then(|r| r.trim().trim_end_matches("ns").trim().parse().ok())
        .with_context(|| format!("no duration in {text:?}"))?;
    Ok((ret, ns))
}

/// xdp-filter from xdp-tools in a namespace of its own, dropping TCP port 22 like
/// the mdsec policy does; removed when dropped.
struct XdpFilter {
    ns: String,
    id: u32,
}

impl XdpFilter {
    fn start() -> Result<XdpFilter> {
        let ns = format!("mdsec-bench{}-xf", std::process::id());
        let ip = |args: &[&str]| mdsec_tests::netns::ip(args).map(|_| ());
        ip(&["netns", "add", &ns])?;
        let mut xf = XdpFilter { ns: ns.clone(), id: 0 };
        ip(&["-n", &ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
        ip(&["-n", &ns, "link", "set", "v0", "up"])?;
        ip(&["-n", &ns, "link", "set", "v1", "up"])?;
        // `ip netns exec` remounts /sys: xdp-filter needs a bpffs there for its maps.
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "sh", "-c"])
            .arg("mount -t bpf bpf /sys/fs/bpf && xdp-filter load v0 --mode skb -f tcp,udp,ipv4,ipv6,ethernet && xdp-filter port 22 --mode dst")
            .output()?;
        if !out.status.success() {
            bail!("xdp-filter: {}", String::from_utf8_lossy(&out.stderr));
        }
        let show = Command::new("bpftool").args(["-j", "prog", "show"]).output()?;
        let progs: serde_json::Value = serde_json::from_slice(&show.stdout)?;
        xf.id = progs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("xdpfilt")))
            .filter_map(|p| p["id"].as_u64())
            .max()
            .context("xdp-filter's program not found")? as u32;
        Ok(xf)
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        mdsec_tests::netns::delete_namespaces(std::slice::from_ref(&self.ns));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Pins this process, and so the `bpftool` runs it starts, to `cpu`.
pub fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this process.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    anyhow::ensure!(rc == 0, "pin to CPU {cpu}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The mix through a fresh datapath whose flows were created on CPU 1 and
/// measured on CPU 0: every count goes to the flow's remote (atomic) counters.
fn cross_cpu_mix(files: &[PathBuf]) -> Result<f64> {
    let (mdsec, _maps) = datapath_with_policy()?;
    pin(1)?;
    for f in files {
        bpftool_run(mdsec.id()?, f, 2)?;
    }
    pin(0)?;
    let mut sum = 0.0;
    for f in files {
        let mut m = Vec::new();
        for _ in 0..ROUNDS {
            m.push(bpftool_run(mdsec.id()?, f, REPEAT)?.1);
        }
        sum += median(m);
    }
    Ok(sum / files.len() as f64)
}

pub fn run() -> Result<()> {
    // One CPU for every run: under RSS a flow's packets arrive on one CPU, the
    // one that created it, which counts them without atomics. Unpinned, runs
    // would alternate between CPUs at random; that case is measured on its own
    // below (`cross_cpu_mix`).
    pin(0)?;
    let (mdsec, _maps) = datapath_with_policy()?;
    let empty = TestProg::load_with(names::BASELINE_PASS, &[])?;
    let xf = XdpFilter::start()?;
    let dir = std::env::temp_dir().join(format!("mdsec-bench-frames-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Removed on every way out, errors included.
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&dir);
    let mut rows = Vec::new();
    let (mut sum_m, mut sum_e, mut sum_x) = (0.0, 0.0, 0.0);
    let mut files = Vec::new();
    for (name, frame) in mix() {
        let file = dir.join(format!("{name}.bin"));
        std::fs::write(&file, &frame)?;
        files.push(file.clone());
        let (mut m, mut e, mut x) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ret_m, mut ret_x) = (0, 0);
        for _ in 0..ROUNDS {
            let r = bpftool_run(mdsec.id()?, &file, REPEAT)?;
            ret_m = r.0;
            m.push(r.1);
            e.push(bpftool_run(empty.id()?, &file, REPEAT)?.1);
            let r = bpftool_run(xf.id, &file, REPEAT)?;
            ret_x = r.0;
            x.push(r.1);
        }
        let (m, e, x) = (median(m), median(e), median(x));
        sum_m += m;
        sum_e += e;
        sum_x += x;
        let verdict = |r: u32| if r == 1 { "drop" } else { "pass" };
        rows.push(format!(
            "| {name} | {} B | {m:.0} ns ({}) | {e:.0} ns | {x:.0} ns ({}) | {:.2}× | {:.0} ns |",
            frame.len(),
            verdict(ret_m),
            verdict(ret_x),
            m / x,
            m - e
        ));
    }
    let cross = cross_cpu_mix(&files)?;
    let n = rows.len() as f64;
    let (m, e, x) = (sum_m / n, sum_e / n, sum_x / n);
    rows.push(format!(
        "| **mix (mean)** | | **{m:.0} ns** | {e:.0} ns | {x:.0} ns | **{:.2}×** (target ≤ 1.0×) | **{:.0} ns** (target ≤ 60 ns) |",
        m / x,
        m - e
    ));
    rows.push(format!(
        "| mix, each flow on another CPU than the one that created it | | {cross:.0} ns | {e:.0} ns | {x:.0} ns | {:.2}× | {:.0} ns |",
        cross / x,
        cross - e
    ));
    let table = format!(
        "| packet | size | mdsec (verdict) | empty XDP_PASS | xdp-filter (verdict) | mdsec / xdp-filter | mdsec − empty |\n|---|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    let section = format!(
        "## Per-packet cost\n\nCommand: `cargo xtask bench packet`. Each packet is run {REPEAT} times with \
         `bpftool prog run` (BPF_PROG_TEST_RUN) through each program, {ROUNDS} rounds, median; all three \
         programs in the same run, pinned to one CPU (under RSS a flow's packets arrive on one CPU, the one \
         that created it and counts them without atomics; the last row measures the other case, a flow \
         counted from another CPU with atomic adds). mdsec is the release datapath with a two-segment policy installed (the \
         packets after the first hit an established flow: parse, one flow lookup, counters, cached verdict); \
         the empty program returns XDP_PASS; xdp-filter (xdp-tools {}) is loaded with features \
         tcp,udp,ipv4,ipv6,ethernet and one rule dropping TCP port 22, so both drop the denied packet. \
         Machine: {}.\n\n{table}\nThe harness floor (the empty program) is included in every figure; \
         `mdsec − empty` is what the datapath adds per packet.",
        xdp_tools_version(),
        crate::machine()
    );
    crate::write_section("## Per-packet cost", &section)
}

fn xdp_tools_version() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "xdp-tools"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "?".into())
}

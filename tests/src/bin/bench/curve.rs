//! Cost curves: per-packet cost with N active flows, every packet another flow
//! than the one before, through BPF_PROG_TEST_RUN (`mdsec_bench_flows`: the flow
//! number is written into each frame before it is judged, see mdsec-ebpf's
//! bench.rs). Series: mdsec, the same datapath built with the kernel's LRU hash
//! as its flow table (`lru-flows`, the object in `MDSEC_LRU_OBJECT`), and the
//! empty program behind the same rewrite. Next to them: one DRAM access's
//! latency on this machine (a pointer chase), LLC misses per packet where the
//! PMU can count them, and the insert rate into a full table.

use std::time::Instant;

use anyhow::{Context, Result};
use mdsec_common::maps as names;
use mdsec_tests::{
    frames::{self, TPID_8021Q, V4},
    kernel::TestProg,
};

const FLOWS: [u32; 5] = [1, 1_000, 65_536, 1_000_000, 4_000_000];
/// Packets per timed run (at least every flow once).
const PACKETS: u32 = 2_000_000;
const RUNS: usize = 5;

/// A test frame and the offset of the low 32 bits of its source address.
struct Frame {
    bytes: Vec<u8>,
    offset: u32,
}

fn frames() -> Vec<Frame> {
    let udp = frames::udp(40000, 2575, &[0u8; 18]);
    let v4 = V4::new([10, 0, 0, 1].into(), [10, 200, 0, 2].into(), 17).build(&udp);
    let v6 = frames::ipv6("fd00::1".parse().unwrap(), "fd00::200:2".parse().unwrap(), &[], 17, &udp);
    let (src, dst) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    vec![
        Frame { bytes: frames::eth(dst, src, &[], 0x0800, &v4), offset: 14 + 12 },
        Frame { bytes: frames::eth(dst, src, &[], 0x86dd, &v6), offset: 14 + 8 + 12 },
        // IPv4 in 802.1Q.
        Frame { bytes: frames::eth(dst, src, &[(TPID_8021Q, 110)], 0x0800, &v4), offset: 18 + 12 },
    ]
}

/// The first frame of a TCP connection (what a SYN flood sends): a new flow
/// with no payload to classify.
fn syn_frame() -> Frame {
    let syn = frames::tcp(40000, 104, 0x02, &[]);
    let v4 = V4::new([10, 0, 0, 1].into(), [10, 200, 0, 2].into(), 6).build(&syn);
    Frame { bytes: frames::eth([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], &[], 0x0800, &v4), offset: 14 + 12 }
}

/// ns per new flow inserted into a full table of `slots` slots, every packet
/// a new flow that evicts (a stream of 16× the slots); `lru`: the LRU-hash
/// build's object instead of mdsec's.
fn inserts(lru: Option<&[u8]>, f: &Frame, slots: u32) -> Result<f64> {
    let mut p = match lru {
        None => TestProg::load_with(names::BENCH_FLOWS, &[(names::FLOWS4, slots), (names::FLOWS, 1024)])?,
        Some(obj) => TestProg::load_object(
            obj,
            names::BENCH_FLOWS,
            &[(names::FLOWS4, 16), (names::FLOWS, 16), ("FLOWS4_LRU", slots), ("FLOWS6_LRU", 1024)],
        )?,
    };
    p.set_flow_stream(16 * slots, f.offset)?;
    p.time(&f.bytes, slots * 2)?;
    let mut ns: Vec<f64> =
        (0..RUNS).map(|_| Ok(p.time(&f.bytes, 2_000_000)?.as_nanos() as f64)).collect::<Result<_>>()?;
    ns.sort_by(f64::total_cmp);
    Ok(ns[RUNS / 2])
}

/// Flow-table slots for `n` flows: 1.5× (the sizing ARCHITECTURE.md advises).
fn slots(n: u32) -> u32 {
    (n.saturating_mul(3) / 2).max(1024)
}

/// A stride through `n` flows that visits each once per `n` packets in an order
/// unrelated to their numbers: coprime to `n`, near n/φ, so neighbours in time
/// are far apart in number (and in any table that allocates entries in creation
/// order).
fn stride(n: u32) -> u32 {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let mut s = ((n as f64 * 0.618_034) as u32) | 1;
    while gcd(s, n) != 1 {
        s += 2;
    }
    s
}

/// How the timed packets visit the flows.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    /// In an order unrelated to the one they were created in (a real link).
    Shuffled,
    /// In creation order: the best case for a table that hands out entries in
    /// creation order, as the kernel's preallocated LRU hash does.
    Created,
}

/// Median ns per packet over `RUNS` runs after every flow was created once, in
/// flow-number order (and, with `perf`, LLC misses per packet over the same runs).
fn cost(prog: &mut TestProg, f: &Frame, n: u32, perf: &mut Option<Llc>) -> Result<(f64, Option<f64>)> {
    cost_in(prog, f, n, Order::Shuffled, perf)
}

fn cost_in(
    prog: &mut TestProg,
    f: &Frame,
    n: u32,
    order: Order,
    perf: &mut Option<Llc>,
) -> Result<(f64, Option<f64>)> {
    prog.set_flow_stream(n, f.offset)?;
    // The table holds all `n` flows before the clock starts.
    prog.time(&f.bytes, n.max(10_000))?;
    if order == Order::Shuffled {
        prog.set_flow_order(n, f.offset, stride(n))?;
    }
    let packets = PACKETS.max(n);
    let mut ns = Vec::new();
    let mut misses = 0u64;
    for _ in 0..RUNS {
        let before = perf.as_mut().map(|p| p.read()).transpose()?;
        ns.push(prog.time(&f.bytes, packets)?.as_nanos() as f64);
        if let (Some(p), Some(b)) = (perf.as_mut(), before) {
            misses += p.read()? - b;
        }
    }
    ns.sort_by(f64::total_cmp);
    let llc = perf.as_ref().map(|_| misses as f64 / (RUNS as f64 * packets as f64));
    Ok((ns[RUNS / 2], llc))
}

/// LLC misses of this thread, kernel included (BPF_PROG_TEST_RUN runs the
/// program in the caller's context), through perf_event_open.
struct Llc {
    counter: std::fs::File,
}

impl Llc {
    fn open() -> std::result::Result<Llc, String> {
        use std::os::fd::FromRawFd;
        // struct perf_event_attr (PERF_ATTR_SIZE_VER0 = 64 bytes is enough):
        // type HARDWARE, config CACHE_MISSES, flags: exclude_hv.
        let mut attr = [0u64; 16];
        attr[0] = 64u64 << 32; // size, type 0 (PERF_TYPE_HARDWARE)
        attr[1] = 3; // PERF_COUNT_HW_CACHE_MISSES
        attr[5] = 1 << 6; // exclude_hv
        // SAFETY: a valid attr buffer; pid 0 = this thread, any CPU.
        let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0u64) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: a new descriptor we own.
        Ok(Llc { counter: unsafe { std::fs::File::from_raw_fd(fd as i32) } })
    }

    fn read(&mut self) -> Result<u64> {
        use std::io::Read;
        let mut b = [0u8; 8];
        self.counter.read_exact(&mut b)?;
        Ok(u64::from_ne_bytes(b))
    }
}

/// ns per dependent load to a random cache line of a 1 GiB buffer: DRAM
/// latency (TLB misses included; no huge pages).
fn dram_latency() -> f64 {
    const LINES: usize = (1 << 30) / 64;
    let stride = 8; // u64 per cache line
    let mut next = vec![0u64; LINES * stride];
    // A random cyclic order of the lines (Sattolo's algorithm, xorshift).
    let mut order: Vec<u32> = (0..LINES as u32).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..LINES).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = (x % i as u64) as usize;
        order.swap(i, j);
    }
    for w in 0..LINES {
        let (a, b) = (order[w] as usize, order[(w + 1) % LINES] as usize);
        next[a * stride] = (b * stride) as u64;
    }
    let steps = 20_000_000;
    let mut at = 0usize;
    let t = Instant::now();
    for _ in 0..steps {
        at = next[at] as usize;
    }
    let ns = t.elapsed().as_nanos() as f64 / steps as f64;
    std::hint::black_box(at);
    ns
}

struct Series {
    name: String,
    points: Vec<(u32, f64)>,
}

/// A log-x line chart of the series, as SVG.
fn svg(series: &[Series], dram: f64) -> String {
    let (w, h, l, r, t, b) = (780.0, 420.0, 60.0, 240.0, 20.0, 50.0);
    // Round the axis up to a multiple of 100 ns, ticks every fifth of it.
    let top = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(dram, f64::max) * 1.05;
    let ymax = (top / 100.0).ceil() * 100.0;
    let x = |n: u32| l + ((n as f64).log10() / 7.0) * (w - l - r);
    let y = |v: f64| h - b - v / ymax * (h - t - b);
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for e in 0..=7 {
        let xv = l + e as f64 / 7.0 * (w - l - r);
        s += &format!(
            "<line x1=\"{xv}\" y1=\"{}\" x2=\"{xv}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{xv}\" y=\"{}\" text-anchor=\"middle\">1e{e}</text>\n",
            t,
            h - b,
            h - b + 16.0
        );
    }
    for k in 0..=5 {
        let v = ymax * k as f64 / 5.0;
        s += &format!(
            "<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3}\" text-anchor=\"end\">{v:.0}</text>\n",
            y(v),
            w - r,
            l - 6.0,
            y(v) + 4.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">active flows (log scale)</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">ns per packet</text>\n",
        (l + w - r) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    s += &format!(
        "<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#555\" stroke-dasharray=\"6 4\"/>\n",
        y(dram),
        w - r
    );
    let mut legend = vec![(format!("one DRAM access ({dram:.0} ns)"), "#555", true)];
    for (i, se) in series.iter().enumerate() {
        let c = colours[i % colours.len()];
        let pts: Vec<String> = se.points.iter().map(|&(n, v)| format!("{:.1},{:.1}", x(n), y(v))).collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        for &(n, v) in &se.points {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>\n", x(n), y(v));
        }
        legend.push((se.name.clone(), c, false));
    }
    for (i, (name, c, dashed)) in legend.iter().enumerate() {
        let ly = t + 14.0 + i as f64 * 18.0;
        let dash = if *dashed { " stroke-dasharray=\"6 4\"" } else { "" };
        s += &format!(
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"{dash}/><text x=\"{2}\" y=\"{3}\">{name}</text>\n",
            w - r + 10.0,
            w - r + 34.0,
            w - r + 40.0,
            ly + 4.0
        );
    }
    s + "</svg>\n"
}

pub fn run() -> Result<()> {
    let lru_object = match std::env::var_os("MDSEC_LRU_OBJECT") {
        Some(p) => Some(std::fs::read(&p).with_context(|| format!("read {}", p.to_string_lossy()))?),
        None => None,
    };
    let (mut llc, perf_note) = match Llc::open() {
        Ok(l) => (
            Some(l),
            "counted with perf_event_open (PERF_COUNT_HW_CACHE_MISSES, kernel included)".to_string(),
        ),
        Err(e) => (None, format!("not counted: this machine's PMU gives no hardware cache events ({e})")),
    };
    let dram = dram_latency();
    eprintln!("one DRAM access: {dram:.1} ns");
    let fs = frames();
    let mut series: Vec<Series> = Vec::new();
    let mut push = |name: String, n: u32, v: f64| match series.iter_mut().find(|s| s.name == name) {
        Some(s) => s.points.push((n, v)),
        None => series.push(Series { name, points: vec![(n, v)] }),
    };
    let mut rows = String::from(
        "| active flows | empty | mdsec IPv4 | LRU-hash IPv4 | mdsec ÷ LRU | mdsec IPv6 | IPv6 ÷ IPv4 | mdsec 802.1Q | IPv4 flows in their second set | LLC misses / packet (mdsec IPv4) | LRU-hash IPv4, flows visited in creation order |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    // (N, mdsec IPv4, LRU IPv4, mdsec IPv6) for the targets.
    let mut marks: Vec<(u32, f64, Option<f64>, f64)> = Vec::new();
    // Kernel memory per flow (memlock of the IPv4 table ÷ N): mdsec, LRU-hash build.
    let mut memory =
        String::from("| active flows | mdsec `FLOWS4` | LRU-hash `FLOWS4_LRU` |\n|---|---|---|\n");
    let mut empty = TestProg::load_with(names::BENCH_EMPTY, &[])?;
    for &n in &FLOWS {
        let (e, _) = cost(&mut empty, &fs[0], n, &mut None)?;
        let sizes = [(names::FLOWS4, slots(n)), (names::FLOWS, slots(n))];
        let mut m = TestProg::load_with(names::BENCH_FLOWS, &sizes)?;
        let (v4, miss) = cost(&mut m, &fs[0], n, &mut llc)?;
        let (live, second) = m.flow_tables().v4.placement();
        let second = second as f64 / live.max(1) as f64;
        let (v6, _) = cost(&mut m, &fs[1], n, &mut None)?;
        let (vlan, _) = cost(&mut m, &fs[2], n, &mut None)?;
        let mem = m.map_memlock(names::FLOWS4)? as f64 / n as f64;
        drop(m);
        let lru = match &lru_object {
            Some(obj) => {
                let sizes = [
                    (names::FLOWS4, 16),
                    (names::FLOWS, 16),
                    ("FLOWS4_LRU", slots(n)),
                    ("FLOWS6_LRU", slots(n)),
                ];
                let mut l = TestProg::load_object(obj, names::BENCH_FLOWS, &sizes)?;
                let (l4, _) = cost(&mut l, &fs[0], n, &mut None)?;
                let (l6, _) = cost(&mut l, &fs[1], n, &mut None)?;
                let (lc, _) = cost_in(&mut l, &fs[0], n, Order::Created, &mut None)?;
                Some((l4, l6, lc, l.map_memlock("FLOWS4_LRU")? as f64 / n as f64))
            }
            None => None,
        };
        eprintln!(
            "{n} flows: empty {e:.1} mdsec v4 {v4:.1} v6 {v6:.1} vlan {vlan:.1} lru {lru:?} ns; {:.0} % in their second set",
            second * 100.0
        );
        push("empty program".into(), n, e);
        push("mdsec IPv4".into(), n, v4);
        push("mdsec IPv6".into(), n, v6);
        push("mdsec 802.1Q".into(), n, vlan);
        if n >= 65_536 {
            memory += &format!(
                "| {n} | {mem:.0} bytes | {} |\n",
                lru.map_or("–".to_string(), |l| format!("{:.0} bytes", l.3))
            );
        }
        if let Some((l4, l6, ..)) = lru {
            push("LRU-hash IPv4".into(), n, l4);
            push("LRU-hash IPv6".into(), n, l6);
        }
        marks.push((n, v4, lru.map(|l| l.0), v6));
        let f = |v: Option<f64>, unit: &str| v.map_or("–".to_string(), |v| format!("{v:.1}{unit}"));
        rows += &format!(
            "| {n} | {e:.1} ns | {v4:.1} ns | {} | {} | {v6:.1} ns | {:.2}× | {vlan:.1} ns | {:.0} % | {} | {} |\n",
            f(lru.map(|l| l.0), " ns"),
            f(lru.map(|l| v4 / l.0), "×"),
            v6 / v4,
            second * 100.0,
            f(miss, ""),
            f(lru.map(|l| l.2), " ns"),
        );
    }

    // Inserts into a full table: 1M slots, a stream of 16M flows, so every
    // packet is a new flow that evicts the least recently seen of its sets.
    let full = 1u32 << 20;
    let syn = syn_frame();
    let ins = inserts(None, &syn, full)?;
    let ins_udp = inserts(None, &fs[0], full)?;
    let ins_lru = lru_object.as_deref().map(|o| inserts(Some(o), &syn, full)).transpose()?;
    let ins_lru_udp = lru_object.as_deref().map(|o| inserts(Some(o), &fs[0], full)).transpose()?;
    eprintln!("inserts: syn {ins:.0} udp {ins_udp:.0} lru {ins_lru:?} {ins_lru_udp:?} ns");
    let rate = |ns: Option<f64>| {
        ns.map_or("–".to_string(), |ns| format!("{ns:.0} ns = **{:.2} M flows/s** per CPU", 1e3 / ns))
    };
    let svg_text = svg(&series, dram);
    let svg_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench-curve.svg");
    std::fs::write(&svg_path, svg_text).with_context(|| format!("write {}", svg_path.display()))?;

    let mut table = rows;
    table += &format!(
        "\nOne DRAM access (a dependent load to a random line of 1 GiB, TLB misses included): **{dram:.0} ns**.\n\n\
         Inserts into a full table (1,048,576 slots; every packet a new IPv4 flow that evicts the least \
         recently seen flow of its two sets; median of {RUNS} runs of 2,000,000):\n\n\
         | first packet of each new flow | mdsec | LRU-hash build |\n|---|---|---|\n\
         | TCP SYN (no payload: the table's own work, what a SYN flood costs) | {} | {} |\n\
         | UDP with an 18-byte payload (the app classifier runs too) | {} | {} |\n\n\
         Kernel memory per flow (the map's `memlock` in its fdinfo, as `bpftool map show` reports it, \
         ÷ N; both tables sized at 1.5 slots per flow, preallocated):\n\n{memory}\n\
         LLC misses: {perf_note}.\n",
        rate(Some(ins)),
        rate(ins_lru),
        rate(Some(ins_udp)),
        rate(ins_lru_udp),
    );
    let met = |ok: bool| if ok { "met" } else { "**not met**" };
    let big: Vec<&(u32, f64, Option<f64>, f64)> = marks.iter().filter(|m| m.0 >= 65_536).collect();
    let worst_lru = big.iter().filter_map(|m| m.2.map(|l| m.1 / l)).fold(0.0, f64::max);
    let worst_v6 = marks.iter().map(|m| m.3 / m.1).fold(0.0, f64::max);
    table += &format!(
        "\nTargets, this run: mdsec ≤ 1.0× the LRU-hash build at every N ≥ 64k: {} (worst {worst_lru:.2}×); \
         IPv6 ≤ 1.15× IPv4 at every N: {} (worst {worst_v6:.2}×); inserts into a full table ≥ 2 M flows/s \
         per CPU (SYN): {} ({:.2} M/s); ≤ 2.2 LLC misses per packet at 1M flows: not measurable here. Past the \
         caches the curve sits on the DRAM floor: at 1M and 4M flows mdsec costs {:.1} and {:.1} DRAM \
         accesses' worth per packet, the LRU-hash build {} and {}.\n",
        met(worst_lru <= 1.0 && worst_lru > 0.0),
        met(worst_v6 <= 1.15),
        met(1e3 / ins >= 2.0),
        1e3 / ins,
        marks.iter().find(|m| m.0 == 1_000_000).map_or(0.0, |m| m.1 / dram),
        marks.iter().find(|m| m.0 == 4_000_000).map_or(0.0, |m| m.1 / dram),
        marks
            .iter()
            .find(|m| m.0 == 1_000_000)
            .and_then(|m| m.2)
            .map_or("–".into(), |l| format!("{:.1}", l / dram)),
        marks
            .iter()
            .find(|m| m.0 == 4_000_000)
            .and_then(|m| m.2)
            .map_or("–".into(), |l| format!("{:.1}", l / dram)),
    );
    if lru_object.is_none() {
        table += "\nThe LRU-hash build was not measured: run through `cargo xtask bench curve`, which builds it.\n";
    }
    println!("{table}");
    let section = format!(
        "## Cost curves: N active flows\n\nCommand: `cargo xtask bench curve`. BPF_PROG_TEST_RUN on one \
         CPU; every packet belongs to another flow than the one before: the bench entry \
         `mdsec_bench_flows` writes a flow number into the source address, then runs the datapath's \
         judgement; `mdsec_bench_empty` does the same rewrite and passes, so the rewrite is in both. \
         The table is sized at 1.5 slots per flow and holds all N flows before the clock starts: they \
         are created in number order, and the timed packets visit them in another order (flow i·s mod \
         N for packet i, s coprime to N near N/φ), as a real link interleaves flows regardless of when \
         they started. Visiting them in creation order instead walks the kernel LRU hash's \
         preallocated entries sequentially, which the last column shows. The median of {RUNS} runs of max(N, {PACKETS}) packets. The LRU-hash build is the \
         same datapath with `--features lru-flows` (the kernel's BPF_MAP_TYPE_LRU_HASH as flow table, \
         sized alike). Machine: {}.\n\n{table}\n![ns per packet against active flows](docs/bench-curve.svg)\n",
        crate::machine()
    );
    crate::write_section("## Cost curves: N active flows", &section)
}

//! Project tasks: `cargo xtask <setup|build|test|lab|bench|fuzz|package|cleanup>`.
//!
//! Every task except `cleanup` runs `setup` first, which is idempotent: it installs
//! only what is missing (Debian packages, the eBPF toolchain, bpf-linker).

mod package;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Build the agent (with the embedded eBPF object) in release mode.
    Build,
    /// Run every test: unit, BPF_PROG_TEST_RUN, network-namespace integration; plus fmt and clippy.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the lab: a gateway and hosts in network namespaces, live traffic, live tables.
    Lab {
        /// Arguments for the lab (see `cargo xtask lab -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks (release build) and update BENCHMARKS.md.
    Bench {
        /// Which: packet, throughput, forwarding, scale, policy, differential (default: all).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the config loader, the policy loader, the register and the payload
    /// parsers with cargo-fuzz (libFuzzer; needs the rustup nightly toolchain).
    Fuzz {
        /// One of agent_config, policy_files, register, payloads (default: all).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Build the Debian package target/debian/mdsec_<version>_<arch>.deb and lint it.
    Package,
    /// Remove namespaces, mounts and temp dirs that a crashed test or lab left.
    Cleanup,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Package => {
            setup_with(PACKAGE_PACKAGES)?;
            let deb = package::build(&root)?;
            package::lint(&deb)?;
            Ok(())
        }
        Cmd::Build => {
            setup()?;
            cargo(&["build", "--release", "-p", "mdsec-agent"])?;
            println!("agent: {}", root.join("target/release/mdsec-agent").display());
            Ok(())
        }
        Cmd::Test { no_lint, args } => {
            setup_with(PACKAGE_PACKAGES)?;
            require_root("the tests create network namespaces and load XDP programs")?;
            let stale = cleanup()?;
            if stale > 0 {
                eprintln!("xtask: removed {stale} leftovers of an earlier run");
            }
            if !no_lint {
                cargo(&["fmt", "--all", "--", "--check"])?;
                cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
            }
            // The integration tests run this binary inside namespaces.
            cargo(&["build", "-p", "mdsec-agent"])?;
            // tests/tests/package.rs installs the package into a clean Debian 12.
            let deb = package::build(&root)?;
            package::lint(&deb)?;
            let base = package::debian_base()?;
            // SAFETY: single-threaded here; the test processes inherit them.
            unsafe {
                std::env::set_var("MDSEC_DEB", &deb);
                std::env::set_var("MDSEC_DEBIAN_BASE", &base);
            }
            // Every test binary runs even after a failure: one run shows every failing test.
            let mut test_args = vec!["test", "--workspace", "--no-fail-fast"];
            test_args.extend(args.iter().map(String::as_str));
            let result = cargo_test(&test_args);
            let leaked = cleanup()?;
            let tally = result?;
            println!("summary: {} passed, {} failed, {} skipped", tally.0, tally.1, tally.2);
            if tally.1 > 0 {
                bail!("{} tests failed", tally.1);
            }
            if leaked > 0 {
                bail!("the tests left {leaked} namespaces/mounts/dirs behind (removed now)");
            }
            println!("xtask: all tests passed, nothing left behind");
            Ok(())
        }
        Cmd::Lab { args } => {
            setup()?;
            require_root("the lab creates network namespaces and loads XDP programs")?;
            cleanup()?;
            cargo(&[
                "build",
                "-p",
                "mdsec-agent",
                "-p",
                "mdsec-tests",
                "--bin",
                "mdsec-agent",
                "--bin",
                "mdsec-lab",
            ])?;
            let mut lab = Command::new(root.join("target/debug/mdsec-lab"))
                .args(&args)
                .env("MDSEC_AGENT_BIN", root.join("target/debug/mdsec-agent"))
                .env("MDSEC_LAB_OUT", root.join("target/lab"))
                .spawn()?;
            // Ctrl-C reaches the lab too (same process group): it tears down and
            // prints its summary. Wait for that instead of returning the shell
            // prompt while namespaces are still being removed.
            // SAFETY: SIG_IGN for SIGINT in this process only.
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
            }
            let st = lab.wait()?;
            if !st.success() {
                bail!("lab failed ({st})");
            }
            Ok(())
        }
        Cmd::Bench { args } => {
            setup_with(BENCH_PACKAGES)?;
            require_root("the benchmarks load XDP programs")?;
            cargo(&["build", "--release", "-p", "mdsec-tests", "--bin", "mdsec-bench"])?;
            let mut bench = Command::new(root.join("target/release/mdsec-bench"));
            if args.is_empty() || args.iter().any(|a| a == "curve") {
                bench.env("MDSEC_LRU_OBJECT", lru_object(&root)?);
            }
            run(bench.args(&args))
        }
        Cmd::Fuzz { target, secs } => {
            setup()?;
            let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let have = Command::new(&cargo_bin)
                .args(["fuzz", "--version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !have {
                eprintln!("xtask fuzz: installing cargo-fuzz");
                run(Command::new(&cargo_bin).args(["install", "cargo-fuzz", "--locked"]))?;
            }
            let all = ["agent_config", "policy_files", "register", "payloads"];
            let targets: Vec<&str> = match &target {
                Some(t) if all.contains(&t.as_str()) => vec![t.as_str()],
                Some(t) => bail!("unknown fuzz target {t} (one of: {})", all.join(", ")),
                None => all.to_vec(),
            };
            let mut result = Ok(());
            for t in targets {
                eprintln!("xtask fuzz: {t} for {secs} s");
                result = run(Command::new("cargo")
                    .current_dir(root.join("fuzz"))
                    .env_remove("CARGO")
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .args(["+nightly", "fuzz", "run", t, "--", &format!("-max_total_time={secs}")]));
                if result.is_err() {
                    break;
                }
            }
            // The file-based targets write scratch files named after their process.
            for e in std::fs::read_dir(std::env::temp_dir())?.flatten() {
                if e.file_name().to_string_lossy().starts_with("mdsec-fuzz-") {
                    let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
                }
            }
            result
        }
        Cmd::Cleanup => {
            let n = cleanup()?;
            println!("removed {n} leftovers");
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo).args(args).status().with_context(|| format!("spawn {cargo}"))?;
    if !st.success() {
        bail!("cargo {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines
/// into (passed, failed, ignored).
fn cargo_test(args: &[&str]) -> Result<(u64, u64, u64)> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo).args(args).stdout(std::process::Stdio::piped()).spawn()?;
    let mut tally = (0, 0, 0);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                    })
                    .unwrap_or(0)
            };
            tally.0 += num(" passed");
            tally.1 += num(" failed");
            tally.2 += num(" ignored");
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("cargo {} failed ({st}); {} passed, {} failed", args.join(" "), tally.0, tally.1);
    }
    Ok(tally)
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Debian packages the tests and the lab run (ieee-data: the OUI registry).
/// `dnsmasq-base` rather than `dnsmasq`: the binary without a system service.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    // librdkafka (the fleet's Kafka client) links the system OpenSSL.
    "libssl-dev",
    "pkg-config",
    // GRO on the veth peers of a bump in the wire: native XDP_REDIRECT into a
    // veth needs NAPI on the receiving end.
    "ethtool",
    "iputils-ping",
    "procps",
    "mount",
    "ieee-data",
    // Real protocol peers for the discovery tests.
    "dcmtk",
    "dnsmasq-base",
    "isc-dhcp-client",
    "openssh-client",
    "curl",
    "openssl",
    "bind9-dnsutils",
    // The operations tests: a real Prometheus (with promtool) and systemd-analyze.
    "prometheus",
    "systemd",
    // The evidence report: its JSON checked by an independent JSON Schema
    // validator, its HTML rendered by a real browser.
    "python3-jsonschema",
    "chromium",
    // The lab's live view is checked at 80×24 in a real terminal.
    "tmux",
    // IPFIX export is checked by real collectors (nfcapd, read with nfdump;
    // pmacct's nfacctd) and by Wireshark's dissector.
    "nfdump",
    "pmacct",
    "tshark",
    // The incidents test scans a segment with a real nmap.
    "nmap",
    // Independent frames for the L2 and infrastructure detections and the
    // mirror ports' tunnels, replayed as captures by tcpreplay.
    "python3-scapy",
    "tcpreplay",
];
/// Building and checking the Debian package: lintian, and debootstrap for the
/// clean Debian 12 chroot it is installed into by the tests.
const PACKAGE_PACKAGES: &[&str] = &["lintian", "debootstrap", "binutils", "xz-utils"];
/// The offline eBPF toolchain (see shared/toolchain.md): rustc 1.96 with its library
/// source, and LLVM 22 for bpf-linker.
const TOOLCHAIN_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"];

/// What `cargo xtask bench` compares against: xdp-filter and bpftool (per-packet
/// cost), trafgen (the flood), nftables and iptables (the other drop points).
const BENCH_PACKAGES: &[&str] = &["xdp-tools", "bpftool", "netsniff-ng", "nftables", "iptables"];

/// The datapath built with the kernel's LRU hash as its flow table (the cost
/// curve's comparison; never shipped): a second eBPF build, benches only.
fn lru_object(root: &std::path::Path) -> Result<std::path::PathBuf> {
    let tc = toolchain::detect().context("no eBPF toolchain (run `cargo xtask setup`)")?;
    let target = root.join("target/ebpf-lru");
    let mut cmd = toolchain::ebpf_build_command(&tc, &root.join("mdsec-ebpf"), &target);
    run(cmd.args(["--features", "lru-flows"]))?;
    Ok(target.join("bpfel-unknown-none/release/mdsec"))
}

fn setup() -> Result<()> {
    setup_with(&[])
}

fn setup_with(extra: &[&'static str]) -> Result<()> {
    let mut want: Vec<&str> = TEST_PACKAGES.to_vec();
    want.extend_from_slice(extra);
    let nightly_ok = toolchain::detect().is_some_and(|t| matches!(t, toolchain::Toolchain::RustupNightly));
    if !nightly_ok {
        want.extend_from_slice(TOOLCHAIN_PACKAGES);
    }
    let missing: Vec<&str> = want.into_iter().filter(|p| !dpkg_installed(p)).collect();
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        eprintln!("xtask setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if toolchain::bpf_linker().is_none() {
        eprintln!("xtask setup: building bpf-linker against LLVM 22 (about a minute)");
        run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    if !tansu_ready() {
        // The fleet tests' Kafka-protocol broker (Apache Kafka's jars need
        // Maven Central, which these machines cannot reach). Built once into
        // cargo's bin directory; a fresh machine's first setup pays ~15 min.
        eprintln!("xtask setup: building the Tansu Kafka broker {TANSU_VERSION} (about 15 minutes, once)");
        run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "tansu",
            "--version",
            TANSU_VERSION,
            "--locked",
            "--features",
            "libsql",
        ]))?;
    }
    match toolchain::detect() {
        Some(tc) => {
            eprintln!("xtask setup: eBPF toolchain ready ({tc:?})");
            Ok(())
        }
        None => bail!("no eBPF toolchain after setup: see shared/toolchain.md"),
    }
}

/// The broker the fleet tests run (`tansu --version` prints `tansu 0.6.0`).
const TANSU_VERSION: &str = "0.6.0";

fn tansu_ready() -> bool {
    Command::new(toolchain::cargo_bin_dir().join("tansu"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == format!("tansu {TANSU_VERSION}"))
}

/// Test and lab artefacts are all named with these prefixes.
const NS_PREFIXES: &[&str] = &["mdsec-t", "mdsec-lab"];

/// Removes leftovers of tests and labs; returns how many things it removed.
fn cleanup() -> Result<usize> {
    let mut n = 0;
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if !NS_PREFIXES.iter().any(|p| ns.starts_with(p)) {
            continue;
        }
        // Only test and lab processes live in these namespaces.
        let pids = Command::new("ip").args(["netns", "pids", ns]).output()?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        run(Command::new("ip").args(["netns", "del", ns]))?;
        n += 1;
    }
    let tmp = std::env::temp_dir();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let Some(mp) = line.split_whitespace().nth(1) else {
            continue;
        };
        let p = Path::new(mp);
        if p.starts_with(&tmp)
            && p.file_name().is_some_and(|f| NS_PREFIXES.iter().any(|x| f.to_string_lossy().starts_with(x)))
        {
            run(Command::new("umount").arg(p))?;
            n += 1;
        }
    }
    for e in std::fs::read_dir(&tmp)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if NS_PREFIXES.iter().any(|p| name.starts_with(p)) {
            let _ = std::fs::remove_dir_all(e.path());
            n += 1;
        }
    }
    Ok(n)
}

//! Finding a toolchain that can build the eBPF crate. Shared verbatim by
//! `cargo xtask setup` and `mdsec-agent/build.rs` (via `#[path]`), so both agree on
//! what "installed" means.
//!
//! Two routes, tried in order:
//! 1. rustup `nightly` with the `rust-src` component, plus `bpf-linker` on PATH.
//! 2. Debian's `rustc-web` 1.96 (`/usr/bin/rustc`, `/usr/bin/cargo`) with
//!    `rust-web-src`, plus `bpf-linker` built against LLVM 22, driven with
//!    `RUSTC_BOOTSTRAP=1` (`-Z build-std` is unstable).

#![allow(dead_code)]

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";
pub const DEBIAN_SRC: &str = "/usr/lib/rustlib/src/rust/library/Cargo.lock";

#[derive(Debug, Clone)]
pub enum Toolchain {
    RustupNightly,
    Debian,
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin` or `~/.cargo/bin`.
pub fn cargo_bin_dir() -> PathBuf {
    match env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h).join("bin"),
        None => PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo/bin"),
    }
}

pub fn bpf_linker() -> Option<PathBuf> {
    let in_cargo_home = cargo_bin_dir().join("bpf-linker");
    if in_cargo_home.is_file() {
        return Some(in_cargo_home);
    }
    env::var_os("PATH").and_then(|p| env::split_paths(&p).map(|d| d.join("bpf-linker")).find(|c| c.is_file()))
}

fn rustup_nightly_has_src() -> bool {
    let Ok(out) = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot).join("lib/rustlib/src/rust/library/Cargo.lock").is_file()
}

pub fn debian_ready() -> bool {
    Path::new(DEBIAN_RUSTC).is_file() && Path::new(DEBIAN_CARGO).is_file() && Path::new(DEBIAN_SRC).is_file()
}

/// The first usable route, or `None` when `cargo xtask setup` still has work to do.
pub fn detect() -> Option<Toolchain> {
    bpf_linker()?;
    if rustup_nightly_has_src() {
        return Some(Toolchain::RustupNightly);
    }
    if debian_ready() {
        return Some(Toolchain::Debian);
    }
    None
}

/// A `cargo build` command for the eBPF crate in `ebpf_dir`, with the outer cargo's
/// environment scrubbed (it would otherwise point the inner build at the host rustc).
pub fn ebpf_build_command(tc: &Toolchain, ebpf_dir: &Path, target_dir: &Path) -> Command {
    let mut cmd = match tc {
        Toolchain::RustupNightly => {
            let mut c = Command::new("cargo");
            c.arg("+nightly");
            c
        }
        Toolchain::Debian => Command::new(DEBIAN_CARGO),
    };
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        let inherited = k.starts_with("CARGO_")
            && k != "CARGO_HOME"
            && k != "CARGO_NET_OFFLINE"
            && k != "CARGO_REGISTRIES_CRATES_IO_PROTOCOL";
        if inherited
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTUP_TOOLCHAIN")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    if let Toolchain::Debian = tc {
        cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
    }
    // bpf-linker is found on PATH; make sure cargo's bin dir is on it.
    let mut path = vec![cargo_bin_dir()];
    if let Some(p) = env::var_os("PATH") {
        path.extend(env::split_paths(&p));
    }
    cmd.env("PATH", env::join_paths(path).expect("PATH"));
    // BPF ISA v3 (ALU32, JMP32; Linux 5.1, older than the helpers mdsec needs):
    // about 3 ns less per packet than LLVM's v1 default.
    cmd.env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", "-C target-cpu=v3");
    cmd.current_dir(ebpf_dir).env("CARGO_TARGET_DIR", target_dir).args([
        "build",
        "--release",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
    ]);
    cmd
}

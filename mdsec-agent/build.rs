//! Builds the eBPF object (mdsec-ebpf) for `bpfel-unknown-none` so the agent can embed
//! it with `include_bytes_aligned!`: the agent binary is the whole deployment.
//! Set `MDSEC_EBPF_OBJECT` to embed a prebuilt object instead.

#[path = "../xtask/src/toolchain.rs"]
mod toolchain;

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("mdsec.bpf.o");
    println!("cargo:rerun-if-env-changed=MDSEC_EBPF_OBJECT");
    if let Some(obj) = env::var_os("MDSEC_EBPF_OBJECT") {
        println!("cargo:rerun-if-changed={}", PathBuf::from(&obj).display());
        fs::copy(&obj, &out).expect("copy MDSEC_EBPF_OBJECT");
        return;
    }

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for p in [
        "mdsec-ebpf/src",
        "mdsec-ebpf/Cargo.toml",
        "mdsec-common/src",
        "mdsec-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    // One eBPF target dir per workspace, whatever profile builds the agent.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ebpf");

    let Some(tc) = toolchain::detect() else {
        panic!(
            "no eBPF toolchain found (rustup nightly with rust-src, or Debian rustc-web + \
             rust-web-src, plus bpf-linker). Run `cargo xtask setup` first."
        );
    };
    let status = toolchain::ebpf_build_command(&tc, &root.join("mdsec-ebpf"), &target_dir)
        .status()
        .expect("spawn cargo for mdsec-ebpf");
    assert!(status.success(), "building mdsec-ebpf with {tc:?} failed");
    let obj = target_dir.join("bpfel-unknown-none/release/mdsec");
    fs::copy(&obj, &out).unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}

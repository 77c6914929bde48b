//! The policy loader on an arbitrary segment file next to a fixed zones.yaml (and
//! on an arbitrary zones.yaml): diagnostics or a policy, never a panic; a policy
//! that loads also compiles.
#![no_main]
use std::{sync::OnceLock, time::SystemTime};

use libfuzzer_sys::fuzz_target;

fn dir() -> &'static std::path::Path {
    static D: OnceLock<std::path::PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("mdsec-fuzz-policy-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    let (zones, segment): (&[u8], &[u8]) = match data.first() {
        Some(b) if b & 1 == 1 => (&data[1..], b"segment: s\nfunction: f\nmode: enforce\ndefault: deny\nmembers:\n  - cidr: 10.0.0.0/24\nallow:\n  - to: z\n"),
        _ => (b"zones:\n  z: [10.1.0.0/16]\n", data.get(1..).unwrap_or(&[])),
    };
    std::fs::write(d.join("zones.yaml"), zones).unwrap();
    std::fs::write(d.join("s.yaml"), segment).unwrap();
    let (p, _diags) = mdsec_agent::policy::model::load_dir(d, SystemTime::now());
    if let Some(p) = p {
        let _ = mdsec_agent::policy::compile::compile(
            &p,
            &mdsec_agent::base::clock::Anchor::now(),
            mdsec_agent::policy::compile::Limits::DATAPATH,
        );
    }
});

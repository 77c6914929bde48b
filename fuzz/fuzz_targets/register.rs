//! The vulnerability register: YAML loader and CSV import on arbitrary text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = mdsec_agent::evidence::register::import_csv(text, "fuzz.csv");
    let p = std::env::temp_dir().join(format!("mdsec-fuzz-register-{}.yaml", std::process::id()));
    std::fs::write(&p, data).unwrap();
    let _ = mdsec_agent::evidence::register::Register::load(&p);
});

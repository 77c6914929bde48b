//! The agent config loader on arbitrary text: an error or a config, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = mdsec_agent::config::Config::parse(text);
});

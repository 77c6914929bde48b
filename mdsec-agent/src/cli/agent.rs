//! `run`, `check` and `detach`: the agent itself, its configuration and its
//! datapath.

use std::{path::Path, process::ExitCode};

use anyhow::Result;

use super::{load_config, load_register, print_diags};
use crate::datapath::loader;

/// Attaches the datapath and serves until SIGTERM/SIGINT.
pub fn run(config: &Path) -> Result<ExitCode> {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(crate::run::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}

/// Validates the config, its policy directory and its register.
pub fn check(config: &Path) -> Result<ExitCode> {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if let Some(dir) = &cfg.policy_dir {
        match crate::policy::runtime::prepare(dir, crate::policy::compile::Limits::DATAPATH) {
            Ok((p, c, diags)) => {
                for d in diags {
                    eprintln!("{d}");
                }
                println!(
                    "{}: ok ({} segments, {} zones, {} rules, {} datapath entries)",
                    dir.display(),
                    p.segments.len(),
                    p.zones.len(),
                    p.rules.len(),
                    c.policy.len()
                );
            }
            Err(diags) => return Ok(print_diags(diags)),
        }
    }
    if let Some(reg) = &cfg.register {
        match load_register(reg) {
            Ok(r) => println!("{}: ok ({} entries)", reg.display(), r.entries.len()),
            Err(code) => return Ok(code),
        }
    }
    println!("{}: ok", config.display());
    Ok(ExitCode::SUCCESS)
}

/// Removes the pins (and with them the XDP attachments).
pub fn detach(config: &Path) -> Result<ExitCode> {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    loader::remove_pins(&loader::layout_dir(&cfg.pin_dir))?;
    println!("removed pins under {}", cfg.pin_dir.display());
    Ok(ExitCode::SUCCESS)
}

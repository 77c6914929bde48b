//! `run`, `check` and `detach`: the agent itself, its configuration and its
//! datapath.

use std::{path::Path, process::ExitCode};

use anyhow::Result;

use super::{load_config, load_register, print_diags};
use crate::{base::diag::Diagnostic, datapath::loader};

/// Attaches the datapath and serves until SIGTERM/SIGINT.
pub fn run(config: &Path) -> Result<ExitCode> {
    let mut cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    cfg.check_host(config);
    if !cfg.start_blockers.is_empty() {
        // Warnings for `check`; the agent does not start serving with them.
        return Ok(print_diags(
            cfg.start_blockers.iter().map(|d| Diagnostic { warning: false, ..d.clone() }),
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(crate::run::run(cfg))?;
    Ok(ExitCode::SUCCESS)
}

/// Validates the config, its policy directory and its register.
pub fn check(config: &Path) -> Result<ExitCode> {
    let mut cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    cfg.check_host(config);
    for w in &cfg.start_blockers {
        eprintln!("{w} (`run` refuses to start with it)");
    }
    if cfg.start_blockers.iter().any(|d| !d.warning) {
        return Ok(ExitCode::FAILURE);
    }
    if let Some(dir) = &cfg.policy_dir {
        match crate::policy::runtime::prepare(
            dir,
            crate::policy::compile::Limits::DATAPATH,
            &cfg.change_control.load_options(),
        ) {
            Ok((p, c, diags)) => {
                for d in diags {
                    eprintln!("{d}");
                }
                let zones = cfg.zone_problems(config, &p);
                for d in &zones {
                    eprintln!("{d}");
                }
                if !zones.is_empty() {
                    return Ok(ExitCode::FAILURE);
                }
                println!(
                    "{}: ok ({} segments, {} zones, {} rules, {} datapath entries)",
                    dir.display(),
                    p.segments.len(),
                    p.zones.len(),
                    p.rules.len(),
                    c.policy.len()
                );
                // What the agent would say about approval (against no active
                // generation: `check` does not know the running one).
                let contents = crate::policy::approval::read(dir)?;
                match crate::policy::approval::load(dir) {
                    Err(diags) => {
                        for d in &diags {
                            eprintln!("{d}");
                        }
                        return Ok(ExitCode::FAILURE);
                    }
                    Ok(Some(a)) if a.content_hash == contents.hash => {
                        println!(
                            "{}: approves {} ({}, {})",
                            crate::policy::model::APPROVAL_FILE,
                            a.content_hash,
                            a.approved_by,
                            a.ticket
                        )
                    }
                    Ok(Some(a)) => println!(
                        "{}: approves {}, not these files ({}){}",
                        crate::policy::model::APPROVAL_FILE,
                        a.content_hash,
                        contents.hash,
                        if p.segments.iter().any(|s| s.approval_required()) {
                            ": the agent refuses them"
                        } else {
                            ""
                        }
                    ),
                    Ok(None) if p.segments.iter().any(|s| s.approval_required()) => println!(
                        "no {}: a change to these files ({}) is refused until approved (mdsec-agent policy apply)",
                        crate::policy::model::APPROVAL_FILE,
                        contents.hash
                    ),
                    Ok(None) => {}
                }
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

/// Prints every doctor check; fails when one fails.
pub fn doctor(config: &Path) -> Result<ExitCode> {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let checks = crate::datapath::doctor::run(&cfg.pin_dir, &cfg.ports(), &cfg.bridges);
    for c in &checks {
        println!("{c}");
    }
    let failed = checks.iter().filter(|c| c.level == crate::datapath::doctor::Level::Fail).count();
    if failed > 0 {
        eprintln!("{failed} check(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes the pins (and with them the XDP attachments).
pub fn detach(config: &Path) -> Result<ExitCode> {
    let cfg = match load_config(config) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let still = loader::remove_pins(&loader::layout_dir(&cfg.pin_dir))?;
    println!("removed pins under {}", cfg.pin_dir.display());
    if !still.is_empty() {
        eprintln!(
            "XDP still attached after 5 s on {} (another pin or process holds the link, or another program)",
            still.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

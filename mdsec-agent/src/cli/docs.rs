//! `manpages` and `completions` (hidden): the package's man pages and shell
//! completions, from the clap definitions themselves.

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::Cli;

/// `mdsec-agent.1` and one page per command (`mdsec-agent-run.1`, …).
pub fn manpages(out: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let cmd = Cli::command();
    let write = |name: &str, page: clap::Command| -> Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        let path = out.join(format!("{name}.1"));
        std::fs::write(&path, buf).with_context(|| format!("write {}", path.display()))?;
        println!("{}", path.display());
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("mdsec-agent-{}", sub.get_name());
        // clap wants a &'static name without its `string` feature; this
        // command runs once and exits.
        write(&name, sub.clone().name(name.clone().leak() as &'static str))?;
    }
    write("mdsec-agent", cmd)?;
    Ok(ExitCode::SUCCESS)
}

pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    clap_complete::generate(shell, &mut Cli::command(), "mdsec-agent", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

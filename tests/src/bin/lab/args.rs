//! The lab's command line.

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Learning, monitor, enforce, attack.
    Full,
    /// The same without the attack.
    Normal,
}

/// A simulated hospital behind an mdsec gateway, on one machine.
#[derive(Parser)]
#[command(name = "cargo xtask lab")]
pub struct Args {
    /// Stop after SECS (at least 60); default: the 120 s timeline, then run until Ctrl-C.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(60..))]
    pub duration: Option<u64>,
    #[arg(long, value_enum, default_value = "full")]
    pub scenario: Scenario,
    /// Leave the hospital and the agent running for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Print a JSON summary on stdout at exit (the live view goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Remove what a kept or killed lab left, then exit.
    #[arg(long)]
    pub cleanup: bool,
}

impl Args {
    pub fn attack(&self) -> bool {
        self.scenario == Scenario::Full
    }
}

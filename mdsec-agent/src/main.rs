use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use mdsec_agent::{
    client,
    config::{self, Config},
    loader, model,
    policy::model::Mode,
    table::render,
};

mod cli_lists;

#[derive(Parser)]
#[command(name = "mdsec-agent", version, about = "Network-layer security for medical devices (XDP)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the datapath to the configured interfaces and serve the API.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file; prints `file:line:col: message` and exits 1 on error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List flows seen by a running agent (filters and paging as the API's).
    Flows(cli_lists::ListArgs),
    /// List devices seen by a running agent.
    Devices(cli_lists::ListArgs),
    /// List recent events of a running agent, oldest first.
    Events(cli_lists::ListArgs),
    /// Show datapath counters by reason.
    Stats(Query),
    /// Write the JSON Schemas of the policy files (for editors) and of events to a directory.
    Schema {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print an allow-list for a segment from its learned baseline (a complete
    /// segment file that `check` accepts; review it, then replace the segment's file).
    Suggest {
        #[arg(long, short)]
        config: PathBuf,
        /// The segment (its file must be in policy_dir).
        #[arg(long)]
        segment: String,
        /// Mode of the suggested file (default: the segment's current mode).
        #[arg(long, value_parser = ["monitor", "enforce"])]
        mode: Option<String>,
        /// Also use communication first seen after the learning period.
        #[arg(long)]
        all: bool,
        /// Write to this file (atomically) instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Compensating-controls evidence for a period, from the state database, the
    /// policy and the vulnerability register (works with the agent stopped too).
    Report {
        #[arg(long, short)]
        config: PathBuf,
        /// Start, `YYYY-MM-DD` (UTC) or RFC 3339; default 30 days before `--to`.
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive); default now.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_parser = ["html", "md", "json"], default_value = "html")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Device lifecycle (through the running agent's API).
    #[command(subcommand)]
    Device(DeviceCmd),
    /// The vulnerability register.
    #[command(subcommand)]
    Register(RegisterCmd),
    /// Detach the datapath and remove its pins (after a crash, or an `on_exit: keep` stop).
    Detach {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Change a device's lifecycle state (onboarding, active, exception,
    /// decommissioned); audited with the reason and actor.
    SetState {
        mac: String,
        state: String,
        #[arg(long)]
        reason: String,
        /// Who makes the change (default: $SUDO_USER or $USER).
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        q: Query,
    },
    /// The lifecycle audit trail (of one device, or all).
    Audit {
        #[arg(long)]
        mac: Option<String>,
        #[command(flatten)]
        q: Query,
    },
}

#[derive(Subcommand)]
enum RegisterCmd {
    /// Convert a CSV export (vendor,model,firmware,cve,disclosed,patch[,title]) to register YAML.
    Import {
        #[arg(long)]
        csv: PathBuf,
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub(crate) struct Query {
    /// API address of the agent.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    pub(crate) api: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// File with the API bearer token (the agent's `api.token_file`); the
    /// MDSEC_API_TOKEN environment variable works too.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl Query {
    pub(crate) fn token(&self) -> Result<Option<String>> {
        if let Some(f) = &self.token_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("read token file {}: {e}", f.display()))?;
            return Ok(Some(text.lines().next().unwrap_or("").trim().to_string()));
        }
        Ok(std::env::var("MDSEC_API_TOKEN").ok().filter(|t| !t.is_empty()))
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        client::get_json(client::parse_api(&self.api)?, path, self.token()?.as_deref())
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::FAILURE
    })
}

/// Prints every diagnostic; the exit code a command ends with when there were any.
fn print_diags(diags: impl IntoIterator<Item = impl std::fmt::Display>) -> ExitCode {
    for d in diags {
        eprintln!("{d}");
    }
    ExitCode::FAILURE
}

/// The policy directory loaded now, or its diagnostics printed.
fn load_policy(dir: &std::path::Path) -> Result<mdsec_agent::policy::model::Policy, ExitCode> {
    let (p, diags) = mdsec_agent::policy::model::load_dir(dir, std::time::SystemTime::now());
    p.ok_or_else(|| print_diags(diags))
}

/// The vulnerability register, or its diagnostics printed.
fn load_register(path: &std::path::Path) -> Result<mdsec_agent::register::Register, ExitCode> {
    mdsec_agent::register::Register::load(path).map_err(print_diags)
}

fn real_main() -> Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Run { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(mdsec_agent::run::run(cfg))?;
        }
        Cmd::Check { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            if let Some(dir) = &cfg.policy_dir {
                match mdsec_agent::policy::runtime::prepare(
                    dir,
                    mdsec_agent::policy::compile::Limits::DATAPATH,
                ) {
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
                    Err(diags) => {
                        for d in diags {
                            eprintln!("{d}");
                        }
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
            if let Some(reg) = &cfg.register {
                match load_register(reg) {
                    Ok(r) => println!("{}: ok ({} entries)", reg.display(), r.entries.len()),
                    Err(code) => return Ok(code),
                }
            }
            println!("{}: ok", config.display());
        }
        Cmd::Report { config, from, to, format, out } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let now = std::time::SystemTime::now();
            let to = match to {
                Some(t) => mdsec_agent::report::parse_when(&t).map_err(|e| anyhow::anyhow!("--to {e}"))?,
                None => now,
            };
            let from = match from {
                Some(f) => mdsec_agent::report::parse_when(&f).map_err(|e| anyhow::anyhow!("--from {e}"))?,
                None => to - std::time::Duration::from_secs(30 * 86_400),
            };
            anyhow::ensure!(from < to, "--from must be before --to");
            let policy = match cfg.policy_dir.as_deref().map(load_policy).transpose() {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let register = match cfg.register.as_deref().map(load_register).transpose() {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            let db = mdsec_agent::store::Store::open_existing(&cfg.state_dir)?;
            let report = mdsec_agent::report::collect(
                &db,
                &cfg,
                policy.as_ref(),
                register.as_ref(),
                mdsec_agent::report::Period { from, to, now },
            )?;
            let text = match format.as_str() {
                "json" => serde_json::to_string_pretty(&report)? + "\n",
                "md" => mdsec_agent::report_render::markdown(&report),
                _ => mdsec_agent::report_render::html(&report),
            };
            match out {
                Some(p) => {
                    std::fs::write(&p, text).map_err(|e| anyhow::anyhow!("write {}: {e}", p.display()))?
                }
                None => print!("{text}"),
            }
        }
        Cmd::Device(DeviceCmd::SetState { mac, state, reason, actor, q }) => {
            let actor = actor
                .or_else(|| std::env::var("SUDO_USER").ok())
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_default();
            let body = serde_json::json!({ "state": state, "reason": reason, "actor": actor });
            let (status, answer) = client::post_json(
                client::parse_api(&q.api)?,
                &format!("/api/v1/devices/{mac}/state"),
                q.token()?.as_deref(),
                &body,
            )?;
            if status != 200 {
                let msg = serde_json::from_slice::<serde_json::Value>(&answer)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(String::from))
                    .unwrap_or_else(|| String::from_utf8_lossy(&answer).into());
                eprintln!("error: {mac}: {msg}");
                return Ok(ExitCode::FAILURE);
            }
            let row: mdsec_agent::lifecycle::AuditRow = serde_json::from_slice(&answer)?;
            println!(
                "{}: {} → {} (audit #{}, {} by {})",
                row.mac, row.from, row.to, row.id, row.time, row.actor
            );
        }
        Cmd::Device(DeviceCmd::Audit { mac, q }) => {
            let path = match &mac {
                Some(m) => format!("/api/v1/audit?mac={m}"),
                None => "/api/v1/audit".into(),
            };
            let rows: Vec<mdsec_agent::lifecycle::AuditRow> = q.get(&path)?;
            if q.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.time.clone(),
                            r.mac.clone(),
                            r.from.clone(),
                            r.to.clone(),
                            r.actor.clone(),
                            r.reason.clone(),
                        ]
                    })
                    .collect();
                print!("{}", render(&["#", "TIME", "MAC", "FROM", "TO", "BY", "REASON"], &rows));
            }
        }
        Cmd::Register(RegisterCmd::Import { csv, out }) => {
            let text =
                std::fs::read_to_string(&csv).map_err(|e| anyhow::anyhow!("read {}: {e}", csv.display()))?;
            let yaml = match mdsec_agent::register::import_csv(&text, &csv.display().to_string()) {
                Ok(y) => y,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            match out {
                Some(p) => {
                    std::fs::write(&p, yaml).map_err(|e| anyhow::anyhow!("write {}: {e}", p.display()))?
                }
                None => print!("{yaml}"),
            }
        }
        Cmd::Suggest { config, segment, mode, all, out } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let Some(dir) = &cfg.policy_dir else {
                anyhow::bail!("{}: no policy_dir: suggest needs the segment's file", config.display());
            };
            let policy = match load_policy(dir) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let rows = mdsec_agent::store::Store::open_existing(&cfg.state_dir)?
                .load_observations(Some(&segment))?;
            let mode = mode.map(|m| if m == "enforce" { Mode::Enforce } else { Mode::Monitor });
            let now = mdsec_agent::clock::rfc3339(std::time::SystemTime::now());
            let text = mdsec_agent::suggest::suggest(
                &policy,
                &rows,
                &mdsec_agent::suggest::Options { segment: &segment, mode, all, now },
            )?;
            match out {
                None => print!("{text}"),
                Some(path) => {
                    // Write beside the target, then rename: the agent's file watcher
                    // must never read half a file.
                    let tmp = path.with_extension("yaml.tmp~");
                    std::fs::write(&tmp, &text)
                        .map_err(|e| anyhow::anyhow!("write {}: {e}", tmp.display()))?;
                    std::fs::rename(&tmp, &path)
                        .map_err(|e| anyhow::anyhow!("rename to {}: {e}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
            }
        }
        Cmd::Schema { out } => {
            std::fs::create_dir_all(&out)?;
            for (name, text) in model::schemas() {
                std::fs::write(out.join(name), text)?;
                println!("{}", out.join(name).display());
            }
        }
        Cmd::Detach { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            loader::remove_pins(&loader::layout_dir(&cfg.pin_dir))?;
            println!("removed pins under {}", cfg.pin_dir.display());
        }
        Cmd::Flows(a) => cli_lists::flows(&a)?,
        Cmd::Devices(a) => cli_lists::devices(&a)?,
        Cmd::Events(a) => cli_lists::events(&a)?,
        Cmd::Stats(q) => {
            let stats: model::Stats = q.get("/api/v1/stats")?;
            if q.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                let rows: Vec<Vec<String>> = stats
                    .iter()
                    .filter(|(_, c)| c.packets > 0)
                    .map(|(k, c)| vec![k.clone(), c.packets.to_string(), c.bytes.to_string()])
                    .collect();
                print!("{}", render(&["REASON", "PACKETS", "BYTES"], &rows));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

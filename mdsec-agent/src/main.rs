use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use mdsec_agent::{
    client,
    config::{self, Config},
    loader, model,
    policy::model::Mode,
    table::{human, render},
};

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
    /// List flows seen by a running agent.
    Flows(Query),
    /// List devices seen by a running agent.
    Devices(Query),
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
    /// Detach the datapath and remove its pins (after a crash, or an `on_exit: keep` stop).
    Detach {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct Query {
    /// API address of the agent.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    api: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// File with the API bearer token (the agent's `api.token_file`); the
    /// MDSEC_API_TOKEN environment variable works too.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl Query {
    fn token(&self) -> Result<Option<String>> {
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
            println!("{}: ok", config.display());
        }
        Cmd::Suggest { config, segment, mode, all, out } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let Some(dir) = &cfg.policy_dir else {
                anyhow::bail!("{}: no policy_dir: suggest needs the segment's file", config.display());
            };
            let (policy, diags) = mdsec_agent::policy::model::load_dir(dir, std::time::SystemTime::now());
            let Some(policy) = policy else {
                for d in diags {
                    eprintln!("{d}");
                }
                return Ok(ExitCode::FAILURE);
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
        Cmd::Flows(q) => {
            let flows: Vec<model::Flow> = q.get("/api/v1/flows")?;
            if q.json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                let rows: Vec<Vec<String>> = flows
                    .iter()
                    .map(|f| {
                        vec![
                            f.iface.clone(),
                            f.vlan.to_string(),
                            f.proto.clone(),
                            f.app.clone(),
                            format!("{}:{}", f.src, f.sport),
                            format!("{}:{}", f.dst, f.dport),
                            human(f.packets),
                            human(f.bytes),
                            f.verdict.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &["IFACE", "VLAN", "PROTO", "APP", "SRC", "DST", "PKTS", "BYTES", "VERDICT"],
                        &rows
                    )
                );
            }
        }
        Cmd::Devices(q) => {
            let devices: Vec<model::Device> = q.get("/api/v1/devices")?;
            if q.json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                let rows: Vec<Vec<String>> = devices
                    .iter()
                    .map(|d| {
                        vec![
                            d.iface.clone(),
                            d.vlan.to_string(),
                            d.mac.clone(),
                            d.vendor.clone().unwrap_or_default().chars().take(24).collect(),
                            d.class.clone(),
                            d.ips.join(","),
                            d.apps_client.iter().chain(&d.apps_server).cloned().collect::<Vec<_>>().join(","),
                            human(d.packets),
                            human(d.bytes),
                            d.last_seen.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(
                        &[
                            "IFACE",
                            "VLAN",
                            "MAC",
                            "VENDOR",
                            "CLASS",
                            "IPS",
                            "APPS",
                            "PKTS",
                            "BYTES",
                            "LAST SEEN"
                        ],
                        &rows
                    )
                );
            }
        }
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

//! The command line: [`main`] → [`run`] → one function per command, in one
//! module per command group (`agent`: run/check/detach; `lists`: flows,
//! devices, events, incidents, stats; `device`: lifecycle; `exception`: on-demand
//! access; `evidence`: report, register;
//! `policy`: suggest, simulate, cutover-report, schema). Every table goes through [`table::print`].

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{
    config::{self, Config},
    surfaces::client,
};

mod agent;
mod device;
mod docs;
mod evidence;
mod exception;
mod fleet;
mod lists;
mod policy;
pub mod table;

pub use policy::schemas;

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
    /// Check what the datapath needs from this kernel and host (features,
    /// bpffs, pins that outlive the agent, interfaces); exits 1 on a failure.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file; prints `file:line:col: message` and exits 1 on error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List flows seen by a running agent (filters and paging as the API's).
    Flows(lists::ListArgs),
    /// List devices seen by a running agent.
    Devices(lists::ListArgs),
    /// List recent events of a running agent, oldest first.
    Events(lists::ListArgs),
    /// List incidents (events correlated per source) of a running agent.
    Incidents(lists::ListArgs),
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
    /// Judge a proposed policy directory against the communication recorded in
    /// the state database (each segment's baseline), with the datapath's decision
    /// code, before applying it. Exit status 3 when a device at the `--fail-on`
    /// impact or worse would have communication dropped.
    Simulate {
        #[arg(long, short)]
        config: PathBuf,
        /// The proposed policy directory (zones.yaml and one file per segment).
        #[arg(long)]
        policy: PathBuf,
        /// Only communication seen since, `YYYY-MM-DD` (UTC) or RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// Only communication seen before.
        #[arg(long)]
        to: Option<String>,
        /// Fail when a device of this clinical impact or worse would be cut off.
        #[arg(long, default_value = "life-critical", value_parser = ["life-critical", "high", "moderate", "low", "none"])]
        fail_on: String,
        #[arg(long)]
        json: bool,
    },
    /// A review of a proposed policy for sign-off before cutover: per device its
    /// recorded communication under the proposal, what changes against the
    /// active policy (rules, newly dropped, newly allowed), the would-drops
    /// since the active policy changed, the content hash and a sign-off block.
    CutoverReport {
        #[arg(long, short)]
        config: PathBuf,
        /// The proposed policy directory.
        #[arg(long)]
        policy: PathBuf,
        #[arg(long, default_value = "html", value_parser = ["html", "json"])]
        format: String,
        /// Write to this file instead of standard output.
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
    /// Policy change control: apply a reviewed policy with its approval, and
    /// the history of installed generations.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Device lifecycle (through the running agent's API).
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Time-boxed on-demand access (vendor service) through the running
    /// agent's API: recorded, audited and closed by the kernel on expiry.
    #[command(subcommand)]
    Exception(ExceptionCmd),
    /// The vulnerability register.
    #[command(subcommand)]
    Register(RegisterCmd),
    /// Every site at once: devices, per-site numbers, devices that moved
    /// between sites, recent incidents, read (read-only) from the Kafka topics
    /// the gateways produce (docs/FLEET.md).
    Fleet {
        /// Bootstrap brokers, HOST:PORT[,HOST:PORT…].
        #[arg(long)]
        brokers: String,
        /// What to list: devices, sites, moved or incidents.
        #[arg(long, default_value = "devices")]
        show: String,
        #[arg(long, default_value = "mdsec.inventory")]
        inventory_topic: String,
        #[arg(long, default_value = "mdsec.events")]
        events_topic: String,
        /// A librdkafka property (TLS, SASL), PROPERTY=VALUE; repeatable.
        #[arg(long)]
        client: Vec<String>,
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        /// Only devices of this clinical class.
        #[arg(long)]
        class: Option<String>,
        /// Only devices of this vendor (case-insensitive).
        #[arg(long)]
        vendor: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Skip this many rows first.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// The rows as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages (one per command) into a directory.
    #[command(hide = true)]
    Manpages {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a shell completion script.
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
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

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ExceptionCmd {
    /// Open access for a peer to or from an enforce segment, for a while.
    Open {
        /// The enforce segment the access is for.
        #[arg(long)]
        segment: String,
        /// The peer, either way (an address, CIDR, zone or segment).
        #[arg(long, group = "peer_of")]
        peer: Option<String>,
        /// Only from the segment to this peer.
        #[arg(long, group = "peer_of")]
        to: Option<String>,
        /// Only from this peer to the segment (a vendor's remote service).
        #[arg(long, group = "peer_of")]
        from: Option<String>,
        /// tcp, udp, icmp, icmpv6 or any (default any).
        #[arg(long)]
        proto: Option<String>,
        /// Ports or ranges (with --proto tcp or udp), e.g. 22,8000-8010.
        #[arg(long, value_delimiter = ',')]
        ports: Vec<String>,
        /// Only this application (by payload), e.g. ssh.
        #[arg(long)]
        app: Option<String>,
        /// How long, e.g. 90m or 2h (at most change_control.max_exception_minutes).
        #[arg(long = "for")]
        duration: String,
        /// The change or incident ticket (recorded, and in its events).
        #[arg(long)]
        ticket: String,
        /// Why (recorded, and in its events).
        #[arg(long)]
        reason: String,
        /// Who opens it (default: $SUDO_USER or $USER).
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        q: Query,
    },
    /// Close an open exception before it expires.
    Close {
        /// Its id (`exception list`).
        id: u64,
        /// Why it closes early (recorded).
        #[arg(long)]
        reason: String,
        /// Who closes it (default: $SUDO_USER or $USER).
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        q: Query,
    },
    /// The open exceptions (with --all, also those closed or expired).
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        q: Query,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Approve a reviewed policy directory and install it as the agent's
    /// `policy_dir`: validates it, copies its files in (each replaced
    /// atomically) and writes `approval.yaml` with its content hash, the
    /// approver and the ticket. The agent installs it within a second.
    Apply {
        #[arg(long, short)]
        config: PathBuf,
        /// Who approves (recorded in the policy history).
        #[arg(long)]
        approved_by: String,
        /// The change ticket.
        #[arg(long)]
        ticket: String,
        /// Refuse unless the files still have this content hash (the one the
        /// cutover report that was signed off shows).
        #[arg(long)]
        content_hash: Option<String>,
        /// The reviewed directory (default: the config's policy_dir itself).
        dir: Option<PathBuf>,
    },
    /// The installed generations of a running agent, oldest first.
    History {
        /// Only the rows after this id.
        #[arg(long)]
        cursor: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
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
    /// API address of the agent: HOST:PORT or http://… (plain), https://… (TLS).
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    pub(crate) api: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// File with the API bearer token (the agent's `api.token_file`); the
    /// MDSEC_API_TOKEN environment variable works too.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// For an `https://` API: the CA certificate (PEM) that signed the agent's.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A client certificate (PEM), when the agent asks for one.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
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

    /// The API's address and TLS settings.
    pub(crate) fn endpoint(&self) -> Result<client::Endpoint> {
        client::parse_api_tls(
            &self.api,
            &client::TlsFiles {
                ca_file: self.ca_file.as_deref(),
                client_cert: self.client_cert.as_deref(),
                client_key: self.client_key.as_deref(),
            },
        )
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        client::get_json(&self.endpoint()?, path, self.token()?.as_deref())
    }
}

pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cmd = Cli::parse().cmd;
    if !matches!(cmd, Cmd::Run { .. }) {
        // A command piped into `head` ends quietly when the pipe closes, as
        // Unix tools do (Rust ignores SIGPIPE, which turns it into a panic).
        // Not for `run`: the agent must see EPIPE on a closed socket instead.
        // SAFETY: restores the default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Run { config } => agent::run(&config),
        Cmd::Check { config } => agent::check(&config),
        Cmd::Doctor { config } => agent::doctor(&config),
        Cmd::Detach { config } => agent::detach(&config),
        Cmd::Flows(a) => lists::flows(&a),
        Cmd::Devices(a) => lists::devices(&a),
        Cmd::Events(a) => lists::events(&a),
        Cmd::Incidents(a) => lists::incidents(&a),
        Cmd::Stats(q) => lists::stats(&q),
        Cmd::Device(DeviceCmd::SetState { mac, state, reason, actor, q }) => {
            device::set_state(&mac, &state, &reason, actor, &q)
        }
        Cmd::Device(DeviceCmd::Audit { mac, q }) => device::audit(mac.as_deref(), &q),
        Cmd::Exception(ExceptionCmd::Open {
            segment,
            peer,
            to,
            from,
            proto,
            ports,
            app,
            duration,
            ticket,
            reason,
            by,
            q,
        }) => exception::open(
            crate::policy::ondemand::Request {
                segment,
                peer,
                to,
                from,
                proto,
                ports,
                app,
                duration,
                ticket,
                reason,
                actor: String::new(),
            },
            by,
            &q,
        ),
        Cmd::Exception(ExceptionCmd::Close { id, reason, by, q }) => exception::close(id, &reason, by, &q),
        Cmd::Exception(ExceptionCmd::List { all, q }) => exception::list(all, &q),
        Cmd::Fleet {
            brokers,
            show,
            inventory_topic,
            events_topic,
            client,
            site,
            class,
            vendor,
            limit,
            offset,
            json,
        } => fleet::run(fleet::FleetArgs {
            brokers,
            inventory_topic,
            events_topic,
            client,
            show,
            filter: crate::surfaces::kafka::fleet::Filter { site, class, vendor },
            limit,
            offset,
            json,
        }),
        Cmd::Policy(PolicyCmd::Apply { config, approved_by, ticket, content_hash, dir }) => {
            policy::apply(&policy::ApplyArgs {
                config: &config,
                approved_by: &approved_by,
                ticket: &ticket,
                content_hash: content_hash.as_deref(),
                dir: dir.as_deref(),
            })
        }
        Cmd::Policy(PolicyCmd::History { cursor, limit, q }) => policy::history(cursor, limit, &q),
        Cmd::Report { config, from, to, format, out } => evidence::report(&evidence::ReportArgs {
            config: &config,
            from: from.as_deref(),
            to: to.as_deref(),
            format: &format,
            out: out.as_deref(),
        }),
        Cmd::Register(RegisterCmd::Import { csv, out }) => evidence::import(&csv, out.as_deref()),
        Cmd::Suggest { config, segment, mode, all, out } => {
            policy::suggest(&config, &segment, mode.as_deref(), all, out.as_ref())
        }
        Cmd::Simulate { config, policy: dir, from, to, fail_on, json } => {
            policy::simulate(&policy::SimulateArgs {
                config: &config,
                policy: &dir,
                from: from.as_deref(),
                to: to.as_deref(),
                fail_on: &fail_on,
                json,
            })
        }
        Cmd::CutoverReport { config, policy: dir, format, out } => {
            policy::cutover_report(&config, &dir, &format, out.as_deref())
        }
        Cmd::Schema { out } => policy::schema(&out),
        Cmd::Manpages { out } => docs::manpages(&out),
        Cmd::Completions { shell } => docs::completions(shell),
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

/// Exit status of a command given a policy directory with errors.
pub const POLICY_ERRORS: u8 = 2;

/// Prints every diagnostic of a policy that does not load; exit status 2.
fn print_policy_diags(diags: impl IntoIterator<Item = impl std::fmt::Display>) -> ExitCode {
    print_diags(diags);
    ExitCode::from(POLICY_ERRORS)
}

/// The policy directory loaded now, or its diagnostics printed.
fn load_policy(dir: &std::path::Path) -> Result<crate::policy::model::Policy, ExitCode> {
    let (p, diags) = crate::policy::model::load_dir(dir, std::time::SystemTime::now());
    p.ok_or_else(|| print_diags(diags))
}

/// The vulnerability register, or its diagnostics printed.
fn load_register(path: &std::path::Path) -> Result<crate::evidence::register::Register, ExitCode> {
    crate::evidence::register::Register::load(path).map_err(print_diags)
}

/// `text` to the file `out`, or to standard output.
fn write_out(out: Option<&std::path::Path>, text: &str) -> Result<()> {
    match out {
        Some(p) => std::fs::write(p, text).map_err(|e| anyhow::anyhow!("write {}: {e}", p.display())),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

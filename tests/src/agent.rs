//! A running `mdsec-agent` inside a topology's gateway namespace.

use std::{
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mdsec_agent::{surfaces::client, surfaces::model};
use serde::de::DeserializeOwned;

use crate::netns::{Topology, in_netns};

/// Path of the agent binary: `MDSEC_AGENT_BIN`, else the debug build next to the
/// test binary (`cargo xtask test` builds it first).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MDSEC_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/mdsec-agent
    exe.parent().and_then(|d| d.parent()).unwrap().join("mdsec-agent")
}

/// What a CLI run printed: (success, stdout, stderr).
pub type CliOutput = (bool, String, String);

/// Runs `mdsec-agent ARGS` in this namespace (commands that read files).
pub fn cli(args: &[&str]) -> CliOutput {
    output(Command::new(agent_bin()).args(args))
}

/// Runs `mdsec-agent ARGS` inside namespace `ns` (commands that talk to the API).
pub fn cli_in(ns: &str, args: &[&str]) -> CliOutput {
    output(Command::new("ip").args(["netns", "exec", ns]).arg(agent_bin()).args(args))
}

fn output(cmd: &mut Command) -> CliOutput {
    let out = cmd.output().expect("run mdsec-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The events of these kinds as (kind, source, MAC), sorted: what one
/// detection pass finds comes in its tables' hash order.
pub fn sorted_kinds(events: &[model::Event], kinds: &[&str]) -> Vec<(String, String, Option<String>)> {
    let mut f: Vec<_> = events
        .iter()
        .filter(|e| kinds.contains(&e.kind.as_str()))
        .map(|e| (e.kind.clone(), e.src.clone(), e.mac.clone()))
        .collect();
    f.sort();
    f
}

/// A list page: status, the items (or the error body) and the next cursor.
pub type Page<T> = (u16, Result<Vec<T>, String>, Option<String>);

pub struct Agent {
    child: Child,
    pub gw: String,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    /// See [`AgentOptions::https_ca`].
    pub https_ca: Option<PathBuf>,
    curl_args: Vec<String>,
}

pub struct AgentOptions {
    pub xdp_mode: &'static str,
    pub extra_yaml: String,
    /// Policy files (name, YAML) written to `<dir>/policy`, which becomes `policy_dir`.
    pub policy: Vec<(String, String)>,
    /// State directory to use instead of a fresh one (to test persistence).
    pub state_dir: Option<PathBuf>,
    /// The API speaks TLS with a certificate of this CA (readiness is then
    /// checked with curl over HTTPS).
    pub https_ca: Option<PathBuf>,
    /// Passed to every `curl` of [`Agent::curl`] (a client certificate).
    pub curl_args: Vec<String>,
    /// Write `allow_private_bpffs: true`: the tests' agents run under `ip
    /// netns exec`, whose bpffs dies with them (most tests do not need pins
    /// that outlive the agent; those that do use `SharedBpffs`).
    pub allow_private_bpffs: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            xdp_mode: "driver",
            extra_yaml: String::new(),
            policy: Vec::new(),
            state_dir: None,
            https_ca: None,
            curl_args: Vec::new(),
            allow_private_bpffs: true,
        }
    }
}

impl Agent {
    /// Starts an agent on every gateway interface of `topo` and waits for `/readyz`.
    pub fn start(topo: &Topology, opts: AgentOptions) -> Result<Agent> {
        Self::start_on(&topo.id, &topo.gw, &topo.gw_ifs(), opts)
    }

    /// Starts an agent in namespace `gw` on interfaces `ifs`; its files live in
    /// `<tmp>/<id>` (removed when the agent is dropped).
    pub fn start_on(id: &str, gw: &str, ifs: &[String], opts: AgentOptions) -> Result<Agent> {
        let dir = std::env::temp_dir().join(id);
        std::fs::create_dir_all(&dir)?;
        // No interfaces: a bridge-only gateway (`bridges:` comes in extra_yaml).
        let mut yaml = String::from(if ifs.is_empty() { "" } else { "interfaces:\n" });
        for ifname in ifs {
            yaml += &format!("  - name: {ifname}\n    role: inline\n    xdp_mode: {}\n", opts.xdp_mode);
        }
        if opts.allow_private_bpffs {
            yaml += "allow_private_bpffs: true\n";
        }
        yaml += &format!(
            "state_dir: {}\npoll_interval_ms: 100\n{}",
            opts.state_dir.clone().unwrap_or_else(|| dir.join("state")).display(),
            opts.extra_yaml
        );
        if !opts.policy.is_empty() {
            let pdir = dir.join("policy");
            std::fs::create_dir_all(&pdir)?;
            for (name, text) in &opts.policy {
                std::fs::write(pdir.join(name), text)?;
            }
            yaml += &format!("policy_dir: {}\n", pdir.display());
        }
        let cfg = dir.join("agent.yaml");
        std::fs::write(&cfg, yaml)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", gw])
            .arg(agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            // Its own process group: a terminal's Ctrl-C (the lab in tmux)
            // reaches the lab, which stops the agent in order, not the agent.
            .process_group(0)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .context("spawn mdsec-agent")?;
        let mut a = Agent {
            child,
            gw: gw.to_string(),
            dir,
            addr: "127.0.0.1:9740".parse().unwrap(),
            https_ca: opts.https_ca,
            curl_args: opts.curl_args,
        };
        a.wait_ready(Duration::from_secs(20))?;
        Ok(a)
    }

    /// `curl` in the gateway namespace against `https://127.0.0.1:9740{path}`
    /// (the test CA trusted) with `args`: the status code and body.
    pub fn curl(&self, path: &str, args: &[&str]) -> Result<(u16, String)> {
        let all: Vec<&str> = self.curl_args.iter().map(String::as_str).chain(args.iter().copied()).collect();
        curl_in(&self.gw, self.https_ca.as_deref(), &format!("https://{}{path}", self.addr), &all)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < limit {
            if let Some(st) = self.child.try_wait()? {
                bail!("agent exited with {st}:\n{}", self.log());
            }
            let ready = match &self.https_ca {
                Some(_) => {
                    self.curl("/readyz", &[]).map(|(s, b)| (s == 200).then_some(()).ok_or(format!("{s} {b}")))
                }
                None => self.raw_get("/readyz").map(|_| Ok(())),
            };
            let ready = match ready {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    last = e;
                    false
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            };
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("agent not ready after {limit:?} ({last}):\n{}", self.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the agent process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn raw_get(&self, path: &str) -> Result<Vec<u8>> {
        let addr = self.addr;
        let mut s: TcpStream =
            in_netns(&self.gw, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        client::request(&mut s, addr, path)
    }

    /// One request with an optional bearer token and extra header lines; returns
    /// the status and body whatever the status.
    pub fn request(&self, method: &str, path: &str, token: Option<&str>) -> Result<(u16, Vec<u8>)> {
        let addr = self.addr;
        let mut s: TcpStream =
            in_netns(&self.gw, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        client::exchange(&mut s, addr, method, path, token)
    }

    /// `/metrics`, parsed.
    pub fn metrics(&self) -> Result<crate::prom::Samples> {
        crate::prom::Samples::parse(&String::from_utf8(self.raw_get("/metrics")?)?)
    }

    pub fn metrics_text(&self) -> Result<String> {
        Ok(String::from_utf8(self.raw_get("/metrics")?)?)
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(serde_json::from_slice(&self.raw_get(path)?)?)
    }

    /// Every flow: the API's NDJSON export (pages hold at most 10,000).
    pub fn flows(&self) -> Result<Vec<model::Flow>> {
        self.ndjson("/api/v1/flows?format=ndjson")
    }

    pub fn devices(&self) -> Result<Vec<model::Device>> {
        self.ndjson("/api/v1/devices?format=ndjson")
    }

    /// A list endpoint's NDJSON answer, line by line.
    pub fn ndjson<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>> {
        let body = self.raw_get(path)?;
        body.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| Ok(serde_json::from_slice(l)?))
            .collect()
    }

    /// One page of a list endpoint: the items, status and next cursor
    /// (`X-Next-Cursor`), whatever the status (the body of an error is in `Err`).
    pub fn page<T: DeserializeOwned>(&self, path: &str) -> Result<Page<T>> {
        let addr = self.addr;
        let mut s: TcpStream =
            in_netns(&self.gw, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        let (status, head, body) = client::exchange_head(&mut s, addr, "GET", path, None, None)?;
        let next = client::next_cursor(&head);
        let items = if status == 200 {
            Ok(serde_json::from_slice(&body)?)
        } else {
            Err(String::from_utf8_lossy(&body).into_owned())
        };
        Ok((status, items, next))
    }

    pub fn stats(&self) -> Result<model::Stats> {
        self.get("/api/v1/stats")
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.join("policy")
    }

    pub fn policy_status(&self) -> Result<serde_json::Value> {
        self.get("/api/v1/policy")
    }

    pub fn generation(&self) -> Result<u64> {
        self.policy_status()?["generation"].as_u64().context("no generation")
    }

    pub fn events(&self) -> Result<Vec<model::Event>> {
        self.ndjson("/api/v1/events?format=ndjson")
    }

    /// Sends SIGHUP and waits for the next reload attempt to finish; returns the
    /// status after it.
    pub fn reload(&self) -> Result<serde_json::Value> {
        let before = self.policy_status()?["reloads"].as_u64().unwrap_or(0);
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        self.wait_for(
            Duration::from_secs(10),
            |a| a.policy_status(),
            |s| (s["reloads"].as_u64().unwrap_or(0) > before).then(|| s.clone()),
        )
    }

    pub fn stat(&self, reason: &str) -> Result<model::Count> {
        self.stats()?.get(reason).copied().with_context(|| format!("no stat {reason}"))
    }

    /// Polls `f` over the API until it returns `Some`, or fails after `limit`
    /// with the last value seen.
    pub fn wait_for<T, R: std::fmt::Debug>(
        &self,
        limit: Duration,
        mut fetch: impl FnMut(&Agent) -> Result<R>,
        mut done: impl FnMut(&R) -> Option<T>,
    ) -> Result<T> {
        let t0 = Instant::now();
        loop {
            let r = fetch(self)?;
            if let Some(v) = done(&r) {
                return Ok(v);
            }
            if t0.elapsed() > limit {
                bail!("condition not met after {limit:?}; last value: {r:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the agent with SIGKILL (a crash: no cleanup runs).
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(st);
        }
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        bail!("agent ignored SIGTERM for 10 s")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.terminate();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `curl` in namespace `ns` against `url` (trusting `ca` if given) with
/// `args`: the HTTP status and the body. Transport failures (refused, TLS)
/// are errors carrying curl's message.
pub fn curl_in(ns: &str, ca: Option<&std::path::Path>, url: &str, args: &[&str]) -> Result<(u16, String)> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(ca) = ca {
        c.arg("--cacert").arg(ca);
    }
    let o = c.args(args).arg(url).output()?;
    if !o.status.success() {
        bail!("curl {url}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok((code.trim().parse()?, body.to_string()))
}

//! Network namespaces and veth pairs for tests.
//!
//! A [`Topology`] is a gateway namespace plus host namespaces, each host joined to
//! the gateway by one veth pair (`gw<i>` in the gateway, `eth0` in the host). Host
//! `i` (from 1) gets `10.0.<i>.2/24` and `fd00:0:0:<i>::2/64`; the gateway side
//! `.1`/`::1`, with forwarding on, so hosts reach each other through it.
//! Dropping the topology deletes every namespace, which also destroys the veths and
//! any XDP attachment on them; this runs on panic too (unwinding drops it).

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

/// Every namespace the tests create starts with this.
pub const PREFIX: &str = "mdsec-t";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `mdsec-t<pid>x<n>`.
pub fn unique_id() -> String {
    format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    // Out of the terminal's process group: Ctrl-C stops the lab between
    // steps, never a namespace set-up half done.
    use std::os::unix::process::CommandExt;
    let out = cmd.process_group(0).output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Binds a fixed address in `ns`, retrying for up to two seconds while it is
/// in use. A socket this process closed a moment ago can still be held by a
/// child another test thread is forking: between fork and exec the child has
/// a copy of every descriptor (close-on-exec only acts at the exec).
pub fn bind_in<T: Send + 'static>(
    ns: &str,
    bind: impl Fn() -> std::io::Result<T> + Send + Sync + Clone + 'static,
) -> Result<T> {
    let t0 = std::time::Instant::now();
    loop {
        match in_netns(ns, bind.clone())? {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && t0.elapsed() < std::time::Duration::from_secs(2) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs `f` on a thread that has entered namespace `ns`. Sockets created there stay
/// in that namespace whichever thread uses them later.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

pub struct Host {
    pub ns: String,
    pub index: u8,
    /// Name of the gateway-side veth.
    pub gw_if: String,
}

impl Host {
    pub fn v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, self.index, 2)
    }
    pub fn v6(&self) -> Ipv6Addr {
        format!("fd00:0:0:{}::2", self.index).parse().unwrap()
    }
    pub fn gw_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, self.index, 1)
    }
    pub fn gw_v6(&self) -> Ipv6Addr {
        format!("fd00:0:0:{}::1", self.index).parse().unwrap()
    }
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 { self.v6().into() } else { self.v4().into() }
    }
    /// MAC of the host's `eth0`.
    pub fn mac(&self) -> Result<[u8; 6]> {
        link_mac(&self.ns, "eth0")
    }
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.ns];
        full.extend_from_slice(args);
        ip(&full)
    }
}

/// Lets a native XDP_REDIRECT deliver into the veth whose peer is `dev` (in
/// `ns`): that needs NAPI on `dev`, which GRO turns on (a physical NIC's driver
/// has its own transmit rings). Call once `dev` and its peer are up: set on a
/// veth that is down, GRO does not make the peer a redirect target (6.18).
pub fn redirect_target(ns: &str, dev: &str) -> Result<()> {
    ethtool(ns, &["-K", dev, "gro", "on"])
}

/// `ethtool ARGS` in namespace `ns`.
pub fn ethtool(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["netns", "exec", ns, "ethtool"]).args(args))?;
    Ok(())
}

/// A Linux bridge `name` in `ns` over `ports`, set up as docs/BRIDGE.md says
/// for a bump's fail-open carrier: STP off, 802.1X and LLDP forwarded, no IPv6
/// of its own, and no ARP answers for the namespace's addresses from the
/// bridge or its ports. Ports and bridge are left up.
pub fn carrier_bridge(ns: &str, name: &str, ports: &[&str]) -> Result<()> {
    ip(&["-n", ns, "link", "add", name, "type", "bridge", "stp_state", "0", "group_fwd_mask", "0x4008"])?;
    for k in std::iter::once(name).chain(ports.iter().copied()) {
        for kv in [format!("net.ipv6.conf.{k}.disable_ipv6=1"), format!("net.ipv4.conf.{k}.arp_ignore=1")] {
            ip(&["netns", "exec", ns, "sysctl", "-qw", &kv])?;
        }
    }
    for p in ports {
        ip(&["-n", ns, "link", "set", p, "master", name, "up"])?;
    }
    ip(&["-n", ns, "link", "set", name, "up"])?;
    Ok(())
}

pub fn link_mac(ns: &str, ifname: &str) -> Result<[u8; 6]> {
    let out = ip(&["-n", ns, "-br", "link", "show", "dev", ifname])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text.split_whitespace().nth(2).context("no MAC in ip output")?;
    let mut m = [0u8; 6];
    for (i, part) in mac.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

pub struct Topology {
    pub id: String,
    pub gw: String,
    pub hosts: Vec<Host>,
    namespaces: Vec<String>,
}

impl Topology {
    /// A gateway and `n` hosts (1..=250).
    pub fn new(n: u8) -> Result<Topology> {
        Self::named(unique_id(), n)
    }

    /// Like [`Topology::new`] with a chosen id (namespace name prefix).
    pub fn named(id: String, n: u8) -> Result<Topology> {
        let gw = format!("{id}-gw");
        let mut t = Topology { id: id.clone(), gw: gw.clone(), hosts: Vec::new(), namespaces: Vec::new() };
        t.add_ns(&gw)?;
        no_dad(&gw)?;
        ip(&["-n", &gw, "link", "set", "lo", "up"])?;
        for (k, v) in [("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")] {
            ip(&["netns", "exec", &gw, "sysctl", "-qw", &format!("{k}={v}")])?;
        }
        for i in 1..=n {
            let ns = format!("{id}-h{i}");
            t.add_ns(&ns)?;
            // Before the veth exists: a device takes `default.*` when it is
            // created, so set later it would still run DAD on its link-local.
            no_dad(&ns)?;
            let gw_if = format!("gw{i}");
            ip(&[
                "link", "add", "name", &gw_if, "netns", &gw, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            let h = Host { ns: ns.clone(), index: i, gw_if: gw_if.clone() };
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", h.v4()), "dev", "eth0"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/64", h.v6()), "dev", "eth0", "nodad"])?;
            ip(&["-n", &gw, "addr", "add", &format!("{}/24", h.gw_v4()), "dev", &gw_if])?;
            ip(&["-n", &gw, "addr", "add", &format!("{}/64", h.gw_v6()), "dev", &gw_if, "nodad"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &gw, "link", "set", &gw_if, "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &h.gw_v4().to_string()])?;
            ip(&["-n", &ns, "-6", "route", "add", "default", "via", &h.gw_v6().to_string()])?;
            t.hosts.push(h);
        }
        for ns in &t.namespaces {
            wait_untentative(ns)?;
        }
        Ok(t)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    pub fn host(&self, i: u8) -> &Host {
        &self.hosts[i as usize - 1]
    }

    /// The gateway's interface names, in host order.
    pub fn gw_ifs(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.gw_if.clone()).collect()
    }

    /// Fills neighbour caches both ways (gateway ↔ every host) so ARP/ND frames are
    /// over before a test starts counting.
    pub fn warm_up(&self) -> Result<()> {
        for h in &self.hosts {
            h.exec(&["ping", "-c", "1", "-W", "2", &h.gw_v4().to_string()])?;
            h.exec(&["ping", "-6", "-c", "1", "-W", "2", &h.gw_v6().to_string()])?;
        }
        Ok(())
    }
}

/// Quiet IPv6 in a new namespace: no duplicate-address detection (an address
/// held tentative cannot be pinged, which made warm-ups flaky) and no router
/// solicitations in the counts.
fn no_dad(ns: &str) -> Result<()> {
    for k in [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
        "net.ipv6.conf.default.router_solicitations=0",
    ] {
        ip(&["netns", "exec", ns, "sysctl", "-qw", k])?;
    }
    Ok(())
}

/// Waits until no IPv6 address in `ns` is tentative. With DAD off this holds at
/// once; the check makes that an assertion instead of an assumption.
pub fn wait_untentative(ns: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = Command::new("ip").args(["-n", ns, "-6", "addr", "show", "tentative"]).output()?;
        if out.status.success() && out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{ns}: IPv6 addresses still tentative after 5 s:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        delete_namespaces(&self.namespaces);
    }
}

/// Deletes namespaces (last first) after killing what still runs inside them
/// (e.g. a helper a failed test left). Only our own namespaces are passed here.
pub fn delete_namespaces(namespaces: &[String]) {
    for ns in namespaces.iter().rev() {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: signalling a process of our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

/// Namespaces whose names start with [`PREFIX`] (leftovers of crashed runs).
pub fn leftover_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(String::from)
        .collect()
}

/// A bpffs mounted under the temp dir in the test process's mount namespace, so
/// pins outlive an agent that `ip netns exec` ran (it remounts /sys, and a bpffs
/// mounted there would die with the agent). On a gateway the host's /sys/fs/bpf
/// plays this part. Unmounted when dropped.
pub struct SharedBpffs(pub std::path::PathBuf);

impl SharedBpffs {
    pub fn new(id: &str) -> SharedBpffs {
        let dir = std::env::temp_dir().join(format!("{id}-bpffs"));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir).status().unwrap();
        assert!(st.success());
        SharedBpffs(dir)
    }
}

impl Drop for SharedBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A directory of the test's, removed when dropped (also on panic).
pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A background process of the test's (a peer daemon in a namespace), ended
/// by its own PID when dropped: SIGTERM, then SIGKILL if it is still there
/// after 2 s (nfacctd's core process can outlive its plugin's exit). Once
/// reaped it is never signalled again (the PID may belong to another process).
pub struct Bg(std::process::Child);

impl Bg {
    pub fn spawn(cmd: &mut Command) -> Bg {
        Bg(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }

    /// `ip netns exec NS ARGS…`, its output discarded.
    pub fn in_ns<S: AsRef<std::ffi::OsStr>>(ns: &str, args: &[S]) -> Bg {
        Bg::spawn(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
    }

    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        // SAFETY: signalling our own, not yet reaped child by PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(2) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.stop();
    }
}

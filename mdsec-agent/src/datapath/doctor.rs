//! `mdsec-agent doctor` (and the same checks at start): what the datapath
//! needs from this kernel and this host, probed rather than assumed, each
//! failure with a one-line fix.
//!
//! The minimum kernel follows from the probes: `bpf_xdp_load_bytes` (Linux
//! 5.18) is the newest thing the datapath uses; BPF ISA v3 atomics
//! (compare-and-exchange, 5.12), `bpf_ktime_get_coarse_ns` (5.11), ring
//! buffers (5.8) and mmap-able arrays (5.5) are older.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported},
};

use super::{
    loader::is_bpffs,
    settings::{Bridge, OnFailure, Port, XdpMode},
};

pub const MIN_KERNEL: (u32, u32) = (5, 18);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Works, with a caveat the operator should know.
    Warn,
    /// The datapath cannot run (or cannot run safely) like this.
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub level: Level,
    pub what: String,
    /// What to do about a warning or a failure.
    pub fix: Option<String>,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      fix: {fix}")?;
        }
        Ok(())
    }
}

fn ok(what: impl Into<String>) -> Check {
    Check { level: Level::Ok, what: what.into(), fix: None }
}

fn bad(level: Level, what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { level, what: what.into(), fix: Some(fix.into()) }
}

/// Every check, in the order printed.
pub fn run(pin_dir: &Path, ports: &[Port], bridges: &[Bridge]) -> Vec<Check> {
    let mut out = vec![kernel(), btf(), bpffs(pin_dir), pins_outlive_agent(pin_dir).0];
    out.extend(features());
    out.push(memlock());
    for i in ports {
        out.extend(interface(i));
    }
    for b in bridges {
        out.extend(bridge(b));
    }
    out
}

/// The fail-open carrier under a bridge: it must forward at once (no STP
/// listening/learning delay) and carry the link-local groups the XDP path carries.
fn bridge(b: &Bridge) -> Vec<Check> {
    use super::bridge as host;
    let mut out = Vec::new();
    for p in host::problems(b) {
        out.push(bad(Level::Fail, p.message, "see docs/BRIDGE.md for the bridge set-up"));
    }
    let Some(br) = host::kernel_bridge(b) else {
        if b.on_failure == OnFailure::Closed {
            out.push(ok(format!("bridge {}: on_failure closed, no kernel bridge under its ports", b.name)));
        }
        return out;
    };
    out.push(ok(format!("bridge {}: ports are members of Linux bridge {br} (fail-open carrier)", b.name)));
    out.push(match host::attr(&br, "stp_state") {
        Some(0) => ok(format!("bridge {}: {br} runs no STP of its own (BPDUs cross it)", b.name)),
        _ => bad(
            Level::Warn,
            format!(
                "bridge {}: {br} runs STP: it consumes the switches' BPDUs and, when XDP detaches, holds                  its ports in listening/learning (about 30 s without traffic)",
                b.name
            ),
            format!("ip link set {br} type bridge stp_state 0"),
        ),
    });
    let mask = host::attr(&br, "group_fwd_mask").unwrap_or(0);
    out.push(if mask & host::GROUP_FWD_NEEDED == host::GROUP_FWD_NEEDED {
        ok(format!("bridge {}: {br} forwards 802.1X and LLDP (group_fwd_mask {mask:#x})", b.name))
    } else {
        bad(
            Level::Warn,
            format!(
                "bridge {}: while XDP is detached {br} would not carry 802.1X (EAPOL) or LLDP                  (group_fwd_mask {mask:#x})",
                b.name
            ),
            format!("ip link set {br} type bridge group_fwd_mask {:#x}", host::GROUP_FWD_NEEDED),
        )
    });
    let loud: Vec<&str> = std::iter::once(br.as_str())
        .chain(b.ports.iter().map(String::as_str))
        .filter(|d| host::arp_ignore(d).unwrap_or(0) == 0)
        .collect();
    if !loud.is_empty() {
        out.push(bad(
            Level::Warn,
            format!(
                "bridge {}: {} would answer ARP for the gateway's own addresses (arp_ignore 0): a device \
                 that learns such an answer sends to a MAC the bump does not pass on",
                b.name,
                loud.join(", ")
            ),
            loud.iter()
                .map(|d| format!("sysctl -w net.ipv4.conf.{d}.arp_ignore=1"))
                .collect::<Vec<_>>()
                .join("; "),
        ));
    }
    let (_, link_local) = host::addresses(&br);
    if !link_local.is_empty() {
        out.push(bad(
            Level::Warn,
            format!("bridge {}: {br} has an IPv6 link-local address: the gateway speaks on the ward", b.name),
            format!("sysctl -w net.ipv6.conf.{br}.disable_ipv6=1"),
        ));
    }
    out
}

/// `uname -r` as (major, minor).
pub fn kernel_version() -> Option<(u32, u32, String)> {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let rel = rel.trim().to_string();
    let mut it = rel.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, rel))
}

fn kernel() -> Check {
    match kernel_version() {
        Some((a, b, rel)) if (a, b) >= MIN_KERNEL => {
            ok(format!("kernel {rel} (needs ≥ {}.{})", MIN_KERNEL.0, MIN_KERNEL.1))
        }
        Some((_, _, rel)) => bad(
            Level::Fail,
            format!("kernel {rel} is older than {}.{} (bpf_xdp_load_bytes)", MIN_KERNEL.0, MIN_KERNEL.1),
            "run a newer kernel (Debian 12 ships 6.1; bookworm-backports newer)",
        ),
        None => bad(
            Level::Warn,
            "kernel version unreadable (/proc/sys/kernel/osrelease)",
            "check /proc is mounted",
        ),
    }
}

fn btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        ok("kernel BTF at /sys/kernel/btf/vmlinux")
    } else {
        bad(
            Level::Warn,
            "no kernel BTF (/sys/kernel/btf/vmlinux): bpftool and verifier logs lose type names",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)",
        )
    }
}

/// The deepest existing directory of `p` (a pin dir may not exist yet).
fn existing(p: &Path) -> PathBuf {
    p.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/")).to_path_buf()
}

fn bpffs(pin_dir: &Path) -> Check {
    let at = existing(pin_dir);
    if is_bpffs(&at) {
        ok(format!("bpffs at {}", at.display()))
    } else if pin_dir.starts_with("/sys/fs/bpf") {
        ok(format!("no bpffs at /sys/fs/bpf yet: the agent mounts one there ({})", pin_dir.display()))
    } else {
        bad(
            Level::Fail,
            format!("pin_dir {} is not on a bpffs", pin_dir.display()),
            "put pin_dir under /sys/fs/bpf, or mount one: mount -t bpf bpf DIR",
        )
    }
}

/// Whether pins under `pin_dir` outlive this process: they do when the
/// bpffs holding them is also seen, at the same place, by the host's init or
/// by the process that started the agent (or, not mounted yet, when the
/// agent shares a mount namespace with one of them, so the bpffs it mounts
/// lives on). An agent started under `ip netns exec` gets a mount namespace
/// of its own; a bpffs it mounts there dies with it, and with the pins the
/// XDP links: a crash then turns enforcement off without a trace.
pub fn pins_outlive_agent(pin_dir: &Path) -> (Check, bool) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getppid has no preconditions.
    let others = [1, unsafe { libc::getppid() }];
    let at = existing(pin_dir);
    let mine = std::fs::read_link("/proc/self/ns/mnt").ok();
    // A bpffs mount the host propagates to us (or from us): `shared:` or
    // `master:` in mountinfo. This needs no access to other processes, which
    // a capability-bounded service (the systemd unit) does not have.
    let propagated = mount_of(&at).is_some_and(|m| m.bpf && m.propagated);
    let durable = propagated
        || others.iter().any(|pid| {
            if is_bpffs(&at) {
                let theirs =
                    Path::new(&format!("/proc/{pid}/root")).join(at.strip_prefix("/").unwrap_or(&at));
                match (std::fs::metadata(&at), std::fs::metadata(&theirs)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev(),
                    _ => false,
                }
            } else {
                mine.is_some() && std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == mine
            }
        });
    let check = if durable {
        ok(format!("pins under {} outlive the agent (a bpffs its parent or init shares)", pin_dir.display()))
    } else {
        bad(
            Level::Warn,
            format!(
                "pins under {} die with the agent: its bpffs is private to its own mount namespace \
                 (started under `ip netns exec` or unshare?), so a crash detaches XDP and ends enforcement",
                pin_dir.display()
            ),
            "run the agent in the host's mount namespace (systemd unit), or set allow_private_bpffs: true",
        )
    };
    (check, durable)
}

/// The mount holding a path, from /proc/self/mountinfo.
struct Mount {
    bpf: bool,
    /// Peer group or master: the mount is shared with another namespace.
    propagated: bool,
}

fn mount_of(path: &Path) -> Option<Mount> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last matching line is the topmost mount at the deepest point.
    let mut best: Option<(usize, Mount)> = None;
    for line in info.lines() {
        let (pre, post) = line.split_once(" - ")?;
        let f: Vec<&str> = pre.split(' ').collect();
        let point = Path::new(f.get(4)?);
        if !path.starts_with(point) {
            continue;
        }
        let depth = point.components().count();
        let m = Mount {
            bpf: post.split(' ').next() == Some("bpf"),
            propagated: f[6..].iter().any(|o| o.starts_with("shared:") || o.starts_with("master:")),
        };
        if best.as_ref().is_none_or(|(d, _)| depth >= *d) {
            best = Some((depth, m));
        }
    }
    best.map(|(_, m)| m)
}

fn features() -> Vec<Check> {
    let mut out = Vec::new();
    for (t, name) in [
        (MapType::RingBuf, "ring buffer maps (events, samples)"),
        (MapType::LpmTrie, "LPM trie maps (identities, policy)"),
        (MapType::LruHash, "LRU hash maps (devices, fragments, replies)"),
        (MapType::PerCpuArray, "per-CPU arrays (counters)"),
    ] {
        out.push(match is_map_supported(t) {
            Ok(true) => ok(name),
            Ok(false) => bad(Level::Fail, format!("{name}: not supported"), "run a kernel ≥ 5.18"),
            Err(e) => {
                bad(Level::Fail, format!("{name}: probe failed: {e}"), "run as root (CAP_BPF, CAP_NET_ADMIN)")
            }
        });
    }
    for (h, name) in [
        (BpfHelper::BPF_FUNC_xdp_load_bytes, "bpf_xdp_load_bytes (app-ID payload copy)"),
        (BpfHelper::BPF_FUNC_ktime_get_coarse_ns, "bpf_ktime_get_coarse_ns (flow clock)"),
        (BpfHelper::BPF_FUNC_ringbuf_output, "bpf_ringbuf_output (events)"),
        (BpfHelper::BPF_FUNC_get_smp_processor_id, "bpf_get_smp_processor_id (home CPU)"),
    ] {
        out.push(match is_helper_supported(ProgramType::Xdp, h) {
            Ok(true) => ok(format!("helper {name} from XDP")),
            Ok(false) => {
                bad(Level::Fail, format!("helper {name}: not available to XDP"), "run a kernel ≥ 5.18")
            }
            Err(e) => bad(Level::Fail, format!("helper {name}: probe failed: {e}"), "run as root"),
        });
    }
    out.push(match probe_mmapable_array() {
        Ok(()) => ok("mmap-able arrays (the flow tables, read without syscalls)"),
        Err(e) => bad(Level::Fail, format!("mmap-able arrays: {e}"), "run a kernel ≥ 5.5"),
    });
    out.push(match probe_atomic_cmpxchg() {
        Ok(()) => ok("BPF ISA v3 atomics (compare-and-exchange: flow slot claims)"),
        Err(e) => bad(Level::Fail, format!("BPF atomics: {e}"), "run a kernel ≥ 5.12 with the BPF JIT"),
    });
    out
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer the kernel reads (and
    // for a log, writes into memory it points to, which outlives the call).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel handed us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An array with `BPF_F_MMAPABLE`, mapped once.
fn probe_mmapable_array() -> Result<(), String> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const ARRAY: u64 = 2;
    const MMAPABLE: u64 = 1 << 10;
    let mut attr = [0u64; 16];
    // map_type, key_size | value_size, max_entries | map_flags.
    attr[0] = ARRAY | (4 << 32);
    attr[1] = 8 | (512 << 32);
    attr[2] = MMAPABLE;
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr).map_err(|e| format!("create: {e}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping of the array, unmapped right away.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0);
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        libc::munmap(p, 4096);
    }
    Ok(())
}

/// An XDP program with one 64-bit `BPF_CMPXCHG` on the stack.
fn probe_atomic_cmpxchg() -> Result<(), String> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const XDP: u64 = 6;
    let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| -> u64 {
        (code as u64)
            | (((src << 4 | dst) as u64) << 8)
            | ((off as u16 as u64) << 16)
            | ((imm as u32 as u64) << 32)
    };
    let prog = [
        insn(0xb7, 1, 0, 0, 0),      // r1 = 0
        insn(0x7b, 10, 1, -8, 0),    // *(u64 *)(r10 - 8) = r1
        insn(0xb7, 0, 0, 0, 0),      // r0 = 0
        insn(0xb7, 1, 0, 0, 1),      // r1 = 1
        insn(0xdb, 10, 1, -8, 0xf1), // r0 = cmpxchg(r10 - 8, r0, r1)
        insn(0xb7, 0, 0, 0, 2),      // r0 = XDP_PASS
        insn(0x95, 0, 0, 0, 0),      // exit
    ];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = [0u64; 16];
    attr[0] = XDP | ((prog.len() as u64) << 32);
    attr[1] = prog.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | ((log.len() as u64) << 32); // log_level, log_size
    attr[4] = log.as_mut_ptr() as u64;
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let msg = String::from_utf8_lossy(&log[..end]);
            Err(format!("{e}: {}", msg.lines().last().unwrap_or("")))
        }
    }
}

fn memlock() -> Check {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    let unlimited = r.rlim_cur == libc::RLIM_INFINITY;
    // Since 5.11 BPF memory is charged to the memory cgroup, not to memlock.
    match kernel_version() {
        Some((a, b, _)) if (a, b) >= (5, 11) => ok(format!(
            "memlock {} (not used for BPF maps on ≥ 5.11: memory cgroup accounting)",
            if unlimited { "unlimited".to_string() } else { format!("{} bytes", r.rlim_cur) }
        )),
        _ if unlimited => ok("memlock unlimited"),
        _ => bad(
            Level::Fail,
            format!("memlock limit {} bytes: too small for the flow tables", r.rlim_cur),
            "LimitMEMLOCK=infinity in the unit, or ulimit -l unlimited",
        ),
    }
}

/// Drivers with native (driver-mode) XDP in mainline Linux.
const NATIVE_XDP: &[&str] = &[
    "veth",
    "virtio_net",
    "tun",
    "ixgbe",
    "ixgbevf",
    "i40e",
    "ice",
    "igb",
    "igc",
    "mlx4_core",
    "mlx5_core",
    "bnxt_en",
    "nfp",
    "qede",
    "ena",
    "sfc",
    "thunder-nicvf",
    "mvneta",
    "mvpp2",
    "stmmaceth",
    "fec",
    "dpaa2-eth",
    "hv_netvsc",
    "netsec",
    "gve",
    "atlantic",
    "octeontx2-nicpf",
    "bond",
    "lan966x-switch",
    "tsnep",
];

/// XDP without multi-buffer support handles frames that fit one page: a
/// 4096-byte page less the headroom (256) and the shared info (320).
const XDP_MAX_MTU: u32 = 4096 - 256 - 320 - 14 - 8;

/// The driver name `ethtool -i` shows (ETHTOOL_GDRVINFO), for devices sysfs
/// gives no driver link for.
fn ethtool_driver(ifname: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], … (196 bytes).
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    // struct ifreq: the name, then (in the union) a pointer to the request.
    let mut ifr = [0u8; 40];
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    ifr[..name.len()].copy_from_slice(name);
    ifr[16..24].copy_from_slice(&(info.as_mut_ptr() as usize as u64).to_ne_bytes());
    // SAFETY: a datagram socket for the ioctl, closed below; the buffers outlive the call.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, ifr.as_mut_ptr());
        libc::close(fd);
        rc
    };
    if rc != 0 {
        return None;
    }
    let d = &info[4..36];
    let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
    (end > 0).then(|| String::from_utf8_lossy(&d[..end]).into_owned())
}

fn interface(i: &Port) -> Vec<Check> {
    let sys = Path::new("/sys/class/net").join(&i.name);
    if !sys.exists() {
        return vec![bad(
            Level::Fail,
            format!("interface {}: does not exist", i.name),
            "fix interfaces: in the agent config (ip link shows the names)",
        )];
    }
    let mut out = Vec::new();
    let mtu: Option<u32> = std::fs::read_to_string(sys.join("mtu")).ok().and_then(|m| m.trim().parse().ok());
    out.push(match mtu {
        Some(m) if m <= XDP_MAX_MTU => {
            ok(format!("interface {}: MTU {m} (XDP takes up to {XDP_MAX_MTU})", i.name))
        }
        Some(m) => bad(
            Level::Fail,
            format!("interface {}: MTU {m} is above what single-buffer XDP takes ({XDP_MAX_MTU})", i.name),
            format!("ip link set dev {} mtu 1500 (jumbo frames are not supported)", i.name),
        ),
        None => bad(Level::Warn, format!("interface {}: MTU unreadable", i.name), "check /sys is mounted"),
    });
    let driver = std::fs::read_link(sys.join("device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        // Virtual devices have no `device`: ask the driver itself (veth has no
        // DEVTYPE in uevent), then fall back to the kind uevent names (bond …).
        .or_else(|| ethtool_driver(&i.name))
        .or_else(|| {
            let ue = std::fs::read_to_string(sys.join("uevent")).ok()?;
            ue.lines().find_map(|l| l.strip_prefix("DEVTYPE=").map(String::from))
        });
    let native = driver.as_deref().is_some_and(|d| NATIVE_XDP.contains(&d));
    let d = driver.clone().unwrap_or_else(|| "unknown".into());
    out.push(match (i.xdp_mode, native) {
        (XdpMode::Driver, true) => ok(format!("interface {}: driver {d} has native XDP", i.name)),
        (XdpMode::Driver, false) => bad(
            Level::Warn,
            format!(
                "interface {}: driver {d} is not known to have native XDP; attaching in driver mode may fail",
                i.name
            ),
            format!("try it on a spare port first, or set xdp_mode: skb for {}", i.name),
        ),
        (XdpMode::Skb, true) => bad(
            Level::Warn,
            format!("interface {}: generic (skb) XDP although driver {d} has native XDP", i.name),
            format!("xdp_mode: driver for {} is faster and counts wire frames", i.name),
        ),
        (XdpMode::Skb, false) => ok(format!("interface {}: generic (skb) XDP", i.name)),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_has_what_the_datapath_needs() {
        // The test machine runs the datapath for real: every feature probe passes.
        for c in features() {
            assert_eq!(c.level, Level::Ok, "{c}");
        }
        assert_eq!(kernel().level, Level::Ok);
        let c = interface(&Port {
            name: "no-such-if0".into(),
            role: crate::datapath::settings::Role::Inline,
            xdp_mode: XdpMode::Driver,
            peer: None,
            bridge: None,
        });
        assert_eq!(c[0].level, Level::Fail);
        assert!(c[0].to_string().contains("fix: "), "{}", c[0]);
    }
}

//! Owns the eBPF object, the XDP program and its links: load, pin, attach, detach.
//!
//! Pin layout under `pin_dir` (default `/sys/fs/bpf/mdsec`):
//! `v<LAYOUT_VERSION>/maps/<MAP>` and `v<LAYOUT_VERSION>/links/<ifname>`.
//! A restart finds both: maps are reused (counts continue) and the program inside
//! each pinned link is replaced atomically (no moment without the datapath).

use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapInfo},
    programs::{
        Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use log::{info, warn};
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flowtable::{FlowSet4, FlowSet6},
    frag::{FragKey, FragValue},
    maps as names,
    policy::{
        IFACE_MIRROR, IdentData, MAX_IDS, MacKey, PolicyConfig, PolicyData, PolicyValue, SegmentInfo,
        TupleKey,
    },
    stats::{Counter, STATS_LEN},
};

use crate::{
    datapath::flowtable::{self, Geometry},
    datapath::netlink,
    datapath::settings::{MapSizes, Port, Role, XdpMode},
};

/// The eBPF object built by build.rs from `mdsec-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mdsec.bpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// An interface the datapath is attached to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attached {
    pub name: String,
    pub ifindex: u32,
    pub role: Role,
    pub requested_mode: XdpMode,
    /// What the kernel reports after attaching (netlink IFLA_XDP_ATTACHED).
    pub effective_mode: String,
    /// True when a pinned link from an earlier run was reused.
    pub replaced: bool,
    /// The `bridges:` entry of a bridge port.
    pub bridge: Option<String>,
    /// A bump port's other port (where XDP forwards what it passes).
    pub peer: Option<String>,
}

pub struct Datapath {
    pub ebpf: Ebpf,
    pub attached: Vec<Attached>,
    /// The flow tables' set counts and hash seed the program was loaded with.
    pub geometry: Geometry,
    root: PathBuf,
}

/// Expected (key size, value size) of each map, to detect pins from another layout.
fn map_layout(name: &str) -> (u32, u32) {
    use std::mem::size_of;
    match name {
        names::FLOWS => (4, size_of::<FlowSet6>() as u32),
        names::FLOWS4 => (4, size_of::<FlowSet4>() as u32),
        names::FLOW_SEED => (4, 8),
        names::DEVICES => (size_of::<DeviceKey>() as u32, size_of::<DeviceValue>() as u32),
        names::FRAGS => (size_of::<FragKey>() as u32, size_of::<FragValue>() as u32),
        names::STATS => (4, size_of::<Counter>() as u32),
        names::IDENT => (4 + size_of::<IdentData>() as u32, 4),
        names::MACS => (size_of::<MacKey>() as u32, 4),
        names::POLICY => (4 + size_of::<PolicyData>() as u32, size_of::<PolicyValue>() as u32),
        names::SEGMENTS => (4, size_of::<SegmentInfo>() as u32),
        names::CONFIG => (4, size_of::<PolicyConfig>() as u32),
        names::IFACES => (4, 4),
        names::ALLOWED => (size_of::<TupleKey>() as u32, 1),
        names::PORTS => (4, 8),
        names::JUDGE => (4, 4),
        _ => unreachable!("unknown map {name}"),
    }
}

pub fn layout_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{}", names::LAYOUT_VERSION))
}

impl Datapath {
    pub fn load(pin_dir: &std::path::Path, maps: &MapSizes, ports: &[Port]) -> Result<Datapath> {
        ensure_bpffs(pin_dir)?;
        let root = layout_dir(pin_dir);
        let maps_dir = root.join("maps");
        let links_dir = root.join("links");
        fs::create_dir_all(&maps_dir).with_context(|| format!("create {}", maps_dir.display()))?;
        fs::create_dir_all(&links_dir).with_context(|| format!("create {}", links_dir.display()))?;

        let sets = Geometry::new(maps.flows, maps.flows_ipv6, 0);
        let sizes = [
            (names::FLOWS, sets.sets6),
            (names::FLOWS4, sets.sets4),
            (names::FLOW_SEED, 1),
            (names::DEVICES, maps.devices),
            (names::FRAGS, maps.fragments),
            (names::STATS, STATS_LEN),
            (names::IDENT, names::DEFAULT_IDENT_MAX),
            (names::MACS, names::DEFAULT_MACS_MAX),
            (names::POLICY, names::DEFAULT_POLICY_MAX),
            (names::SEGMENTS, 2 * MAX_IDS),
            (names::CONFIG, 1),
            (names::IFACES, names::IFACES_MAX),
            (names::ALLOWED, names::DEFAULT_ALLOWED_MAX),
            (names::PORTS, names::PORTS_MAX),
            (names::JUDGE, 1),
        ];
        // A newer agent's STATS has more reasons (appended): the old counts move over.
        let carried = carry_stats(&maps_dir.join(names::STATS));
        for (name, max) in sizes {
            drop_incompatible_pin(&maps_dir.join(name), name, max)?;
        }
        let geometry = Geometry { seed: flow_seed(&maps_dir)?, ..sets };
        let pins: Vec<(&str, PathBuf)> = names::ALL.iter().map(|n| (*n, maps_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, max) in sizes {
            loader.map_max_entries(name, max);
        }
        geometry.configure(&mut loader);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context("load the eBPF object")?;
        let mut seed: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(ebpf.map_mut(names::FLOW_SEED).context("FLOW_SEED missing")?)?;
        seed.set(0, geometry.seed, 0).context("write FLOW_SEED")?;

        // Peers first: a bump port's program forwards from its first frame, and
        // never through a stale entry of a port that is no longer a bump's.
        let ifindex: HashMap<&str, u32> =
            ports.iter().map(|p| Ok((p.name.as_str(), ifindex_of(&p.name)?))).collect::<Result<_>>()?;
        set_peers(&mut ebpf, ports, &ifindex)?;

        if let Some(old) = carried {
            restore_stats(&mut ebpf, old)?;
        }

        let mut attached = Vec::new();
        let program_of = |p: &Port| match (p.peer.is_some(), p.role) {
            (true, _) => names::BRIDGE_PROGRAM,
            (false, Role::Mirror) => names::MIRROR_PROGRAM,
            (false, _) => names::PROGRAM,
        };
        let mirrors = ports.iter().any(|p| program_of(p) == names::MIRROR_PROGRAM);
        // In this order: the mirror entry judges through mdsec_xdp, which is
        // loaded (whenever there is a mirror) and in JUDGE before a mirror
        // port is attached.
        for program in [names::PROGRAM, names::BRIDGE_PROGRAM, names::MIRROR_PROGRAM] {
            let mine: Vec<&Port> = ports.iter().filter(|p| program_of(p) == program).collect();
            if mine.is_empty() && !(program == names::PROGRAM && mirrors) {
                continue;
            }
            if program == names::MIRROR_PROGRAM {
                set_judge(&mut ebpf)?;
            }
            let prog: &mut Xdp = ebpf
                .program_mut(program)
                .with_context(|| format!("{program} missing from object"))?
                .try_into()?;
            prog.load().map_err(verifier_tail)?;
            for p in mine {
                attached.push(attach_port(prog, &links_dir, p, ifindex[p.name.as_str()])?);
            }
        }
        // In config order, as the operator wrote them.
        attached.sort_by_key(|a| ports.iter().position(|p| p.name == a.name));
        let mut ifaces: aya::maps::HashMap<_, u32, u32> =
            aya::maps::HashMap::try_from(ebpf.map_mut(names::IFACES).context("IFACES missing")?)?;
        for a in &attached {
            let flags = if a.role == Role::Mirror { IFACE_MIRROR } else { 0 };
            ifaces.insert(a.ifindex, flags, 0).context("write IFACES")?;
        }
        Ok(Datapath { ebpf, attached, geometry, root })
    }

    pub fn take_map(&mut self, name: &str) -> Result<Map> {
        self.ebpf.take_map(name).with_context(|| format!("map {name} missing from object"))
    }

    pub fn ifnames(&self) -> HashMap<u32, String> {
        self.attached.iter().map(|a| (a.ifindex, a.name.clone())).collect()
    }

    /// Detach from every interface and remove all pins of this layout; the
    /// interfaces XDP stayed on (see [`remove_pins`]).
    pub fn detach_and_unpin(self) -> Result<Vec<String>> {
        let root = self.root.clone();
        drop(self);
        remove_pins(&root)
    }
}

/// Attaches `prog` to one port and logs what the kernel made of it.
fn attach_port(prog: &mut Xdp, links_dir: &Path, p: &Port, ifindex: u32) -> Result<Attached> {
    let replaced = attach(prog, links_dir, &p.name, ifindex, p.xdp_mode)
        .with_context(|| format!("attach XDP to {}", p.name))?;
    let effective = netlink::xdp_attached_mode(ifindex)
        .map(|m| m.to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let what = match (&p.bridge, &p.peer) {
        (Some(b), Some(peer)) => format!(", bump in the wire {b}: forwards to {peer}"),
        (Some(b), None) => format!(", member of bridge {b}"),
        _ => String::new(),
    };
    info!(
        "{}: XDP attached (ifindex {ifindex}, requested mode {}, effective mode {effective}{}{what})",
        p.name,
        p.xdp_mode,
        if replaced { ", replaced the program of a pinned link" } else { "" }
    );
    if p.xdp_mode == XdpMode::Skb {
        // Generic XDP runs on socket buffers after GRO (and, on veth, before GSO
        // segmentation): a merged TCP burst is one packet with all its bytes.
        info!(
            "{}: generic (skb) XDP counts merged GRO/GSO packets as one; bytes stay exact. \
             For per-frame packet counts use driver mode or `ethtool -K {} gro off`",
            p.name, p.name
        );
    }
    if effective != p.xdp_mode.to_string() {
        warn!("{}: effective XDP mode {effective} differs from the requested {}", p.name, p.xdp_mode);
    }
    Ok(Attached {
        name: p.name.clone(),
        ifindex,
        role: p.role,
        requested_mode: p.xdp_mode,
        effective_mode: effective,
        replaced,
        bridge: p.bridge.clone(),
        peer: p.peer.clone(),
    })
}

/// Puts the loaded `mdsec_xdp` into `JUDGE`, where the mirror entry's tail call
/// finds it (before any mirror port is attached, so none runs without a judge).
fn set_judge(ebpf: &mut Ebpf) -> Result<()> {
    let prog: &Xdp = ebpf.program(names::PROGRAM).context("mdsec_xdp missing")?.try_into()?;
    let fd = prog.fd()?.try_clone()?;
    let mut judge: aya::maps::ProgramArray<_> =
        aya::maps::ProgramArray::try_from(ebpf.map_mut(names::JUDGE).context("JUDGE missing")?)?;
    judge.set(names::JUDGE_SLOT, &fd, 0).context("write JUDGE")
}

/// The per-CPU counts of a pinned `STATS` shorter than this agent's (an older
/// agent's, before reasons were appended), to carry into the new map.
fn carry_stats(path: &Path) -> Option<Vec<aya::maps::PerCpuValues<Counter>>> {
    let info = MapInfo::from_pin(path).ok()?;
    if info.max_entries() >= STATS_LEN || info.value_size() != std::mem::size_of::<Counter>() as u32 {
        return None;
    }
    let data = aya::maps::MapData::from_pin(path).ok()?;
    let old: aya::maps::PerCpuArray<_, Counter> =
        aya::maps::PerCpuArray::try_from(Map::PerCpuArray(data)).ok()?;
    let values: Vec<_> = (0..info.max_entries()).map_while(|i| old.get(&i, 0).ok()).collect();
    info!("STATS: carrying {} counters of the pinned map into one with {STATS_LEN}", values.len());
    Some(values)
}

fn restore_stats(ebpf: &mut Ebpf, old: Vec<aya::maps::PerCpuValues<Counter>>) -> Result<()> {
    let mut stats: aya::maps::PerCpuArray<_, Counter> =
        aya::maps::PerCpuArray::try_from(ebpf.map_mut(names::STATS).context("STATS missing")?)?;
    for (i, v) in old.into_iter().enumerate() {
        stats.set(i as u32, v, 0).context("carry STATS over")?;
    }
    Ok(())
}

/// Writes every bump port's peer into `PORTS` and removes entries of ports
/// that are no longer a bump's (a pinned map from an earlier config).
fn set_peers(ebpf: &mut Ebpf, ports: &[Port], ifindex: &HashMap<&str, u32>) -> Result<()> {
    let mut peers: aya::maps::DevMapHash<_> =
        aya::maps::DevMapHash::try_from(ebpf.map_mut(names::PORTS).context("PORTS missing")?)?;
    let want: HashMap<u32, u32> =
        ports.iter().filter_map(|p| Some((ifindex[p.name.as_str()], ifindex[p.peer.as_deref()?]))).collect();
    let stale: Vec<u32> = peers.keys().filter_map(|k| k.ok()).filter(|k| !want.contains_key(k)).collect();
    for k in stale {
        peers.remove(k).context("remove a stale PORTS entry")?;
    }
    for (from, to) in want {
        peers.insert(from, to, None, 0).with_context(|| format!("write PORTS[{from}] = {to}"))?;
    }
    Ok(())
}

fn ifindex_of(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface named {name}");
    }
    Ok(ifindex)
}

/// Removes pinned links (which detaches XDP once nothing else holds them) and
/// maps. The kernel releases a link whose last pin is gone from a work queue,
/// so this waits (up to 5 s each) until the interfaces the link pins are named
/// after have no XDP any more; it returns those that still have (interfaces
/// not in this network namespace are not waited for).
pub fn remove_pins(root: &Path) -> Result<Vec<String>> {
    let links: Vec<String> = fs::read_dir(root.join("links"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    for sub in ["links", "maps"] {
        let dir = root.join(sub);
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            fs::remove_file(e.path()).with_context(|| format!("unpin {}", e.path().display()))?;
        }
        let _ = fs::remove_dir(&dir);
    }
    let _ = fs::remove_dir(root);
    if let Some(parent) = root.parent() {
        // Only succeeds when empty, i.e. no other layout version is pinned.
        let _ = fs::remove_dir(parent);
    }
    let attached =
        |ifindex| netlink::xdp_attached_mode(ifindex).is_ok_and(|m| m != netlink::XdpAttached::None);
    let mut still = Vec::new();
    for name in links {
        let Ok(ifindex) = ifindex_of(&name) else { continue };
        let t0 = std::time::Instant::now();
        while attached(ifindex) && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if attached(ifindex) {
            still.push(name);
        }
    }
    Ok(still)
}

/// Attaches `prog` to `ifname`, reusing a pinned link when there is one.
/// Returns whether a pinned link's program was replaced.
fn attach(prog: &mut Xdp, links_dir: &Path, ifname: &str, ifindex: u32, mode: XdpMode) -> Result<bool> {
    let pin = links_dir.join(ifname);
    if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = XdpLink::try_from(FdLink::from(pinned))?;
                match prog.attach_to_link(link) {
                    Ok(_) => return Ok(true),
                    Err(e) => warn!(
                        "{ifname}: cannot replace the program in {}: {e}; attaching anew",
                        pin.display()
                    ),
                }
            }
            Err(e) => warn!("{ifname}: stale link pin {}: {e}", pin.display()),
        }
        fs::remove_file(&pin).with_context(|| format!("remove {}", pin.display()))?;
    }
    let aya_mode = match mode {
        XdpMode::Driver => aya::programs::XdpMode::Driver,
        XdpMode::Skb => aya::programs::XdpMode::Skb,
    };
    let id = prog.attach_to_if_index(ifindex, aya_mode)?;
    let link = prog.take_link(id)?;
    let fd_link = FdLink::try_from(link).context(
        "the kernel attached XDP through netlink, not a bpf_link; mdsec needs bpf_link (Linux ≥ 5.9)",
    )?;
    fd_link.pin(&pin).with_context(|| format!("pin link at {}", pin.display()))?;
    Ok(false)
}

/// The full verifier log can be thousands of lines; its end says why.
fn verifier_tail(e: aya::programs::ProgramError) -> anyhow::Error {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            anyhow::anyhow!(
                "the kernel verifier rejected the XDP program ({io_error}); end of its log:\n{tail}"
            )
        }
        e => anyhow::Error::new(e).context("load the XDP program"),
    }
}

/// A pinned map whose shape differs from what this agent needs would be silently
/// misread (different layout) or wrongly sized: unpin it so a fresh one is created.
fn drop_incompatible_pin(path: &Path, name: &str, max: u32) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let (ks, vs) = map_layout(name);
    match MapInfo::from_pin(path) {
        Ok(info) if info.key_size() == ks && info.value_size() == vs && info.max_entries() == max => {
            info!("{name}: reusing pinned map {}", path.display());
            return Ok(());
        }
        Ok(info) => warn!(
            "{name}: pinned map {} has key/value/max {}/{}/{}, need {ks}/{vs}/{max}; replacing it (its counts restart)",
            path.display(),
            info.key_size(),
            info.value_size(),
            info.max_entries()
        ),
        Err(e) => warn!("{name}: unreadable pin {}: {e}; replacing it", path.display()),
    }
    fs::remove_file(path).with_context(|| format!("remove {}", path.display()))
}

/// The hash seed of the pinned flow tables, or a new one. Tables pinned without
/// a readable seed are removed: their flows could not be found again.
fn flow_seed(maps_dir: &Path) -> Result<u64> {
    let pin = maps_dir.join(names::FLOW_SEED);
    let pinned = aya::maps::MapData::from_pin(&pin)
        .ok()
        .and_then(|d| aya::maps::Array::<_, u64>::try_from(Map::Array(d)).ok())
        .and_then(|a| a.get(&0, 0).ok())
        .filter(|s| *s != 0);
    if let Some(s) = pinned {
        return Ok(s);
    }
    for name in [names::FLOWS, names::FLOWS4] {
        let p = maps_dir.join(name);
        if p.exists() {
            warn!("{name}: pinned without a hash seed; replacing it (its counts restart)");
            fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    flowtable::random_seed()
}

/// systemd mounts bpffs at /sys/fs/bpf; `ip netns exec` remounts /sys without it.
/// Mount it when the pin directory's bpffs is missing.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(mount_point) || is_bpffs(mount_point) {
        return Ok(());
    }
    let src = CString::new("bpf")?;
    let dst = CString::new("/sys/fs/bpf")?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("mount bpffs at /sys/fs/bpf: {}", std::io::Error::last_os_error());
    }
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Whether `p` is on a bpffs (the doctor asks too).
pub(super) fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC
    }
}

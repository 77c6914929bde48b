//! The real XDP program, loaded without pins or attachment, driven with
//! `BPF_PROG_TEST_RUN` on crafted frames. Each [`TestProg`] has private maps.

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use mdsec_agent::{
    datapath::flowtable::{FlowTables, Geometry, reopen},
    datapath::loader::EBPF_OBJECT,
};
use mdsec_common::{
    device::{DeviceKey, DeviceValue},
    flow::{FlowKey, FlowValue},
    maps as names,
    stats::{Counter, Stat},
};

pub const XDP_PASS: u32 = 2;
pub const XDP_DROP: u32 = 1;

pub struct TestProg {
    ebpf: Ebpf,
    program: &'static str,
    flows: FlowTables,
}

/// A fixed hash seed: tests exercise the seeded path and stay reproducible.
pub const TEST_SEED: u64 = 0x5eed_f10e_0dd5_eed5;

impl TestProg {
    pub fn load() -> Result<TestProg> {
        Self::load_with(names::PROGRAM, &[])
    }

    /// Loads `program` of the object (the datapath or a benchmark baseline) with
    /// map sizes overridden by `sizes` (flow tables in slots, as configured).
    pub fn load_with(program: &'static str, sizes: &[(&str, u32)]) -> Result<TestProg> {
        Self::load_object(EBPF_OBJECT, program, sizes)
    }

    /// [`TestProg::load_with`] from another build of the object (the bench's
    /// LRU-hash build).
    pub fn load_object(object: &[u8], program: &'static str, sizes: &[(&str, u32)]) -> Result<TestProg> {
        let size = |name: &str, default: u32| sizes.iter().find(|(n, _)| *n == name).map_or(default, |s| s.1);
        let geometry = Geometry::new(
            size(names::FLOWS4, names::DEFAULT_FLOWS_MAX),
            size(names::FLOWS, names::DEFAULT_FLOWS6_MAX),
            TEST_SEED,
        );
        let mut loader = EbpfLoader::new();
        // Flow tables are sized in sets, by the geometry.
        for (name, max) in sizes.iter().filter(|(n, _)| ![names::FLOWS, names::FLOWS4].contains(n)) {
            loader.map_max_entries(name, *max);
        }
        geometry.configure(&mut loader);
        let mut ebpf = loader.load(object).context("load object")?;
        let flows = FlowTables::new(
            reopen(ebpf.map(names::FLOWS4).context("no FLOWS4")?)?,
            reopen(ebpf.map(names::FLOWS).context("no FLOWS")?)?,
            TEST_SEED,
        )?;
        let load = |ebpf: &mut Ebpf, program: &str| -> Result<()> {
            let prog: &mut Xdp = ebpf.program_mut(program).context("no program")?.try_into()?;
            prog.load().map_err(|e| match e {
                ProgramError::LoadError { verifier_log, .. } => {
                    anyhow::anyhow!("verifier: {verifier_log}")
                }
                e => e.into(),
            })
        };
        load(&mut ebpf, program)?;
        // The mirror entry judges through a tail call into mdsec_xdp, as the
        // loader sets it up.
        if program == names::MIRROR_PROGRAM {
            load(&mut ebpf, names::PROGRAM)?;
            let judge: &Xdp = ebpf.program(names::PROGRAM).unwrap().try_into()?;
            let fd = judge.fd()?.try_clone()?;
            let mut array: aya::maps::ProgramArray<_> =
                aya::maps::ProgramArray::try_from(ebpf.map_mut(names::JUDGE).context("no JUDGE")?)?;
            array.set(names::JUDGE_SLOT, &fd, 0)?;
        }
        Ok(TestProg { ebpf, program, flows })
    }

    /// The kernel's id of the loaded program (for `bpftool prog run`).
    pub fn id(&self) -> Result<u32> {
        let prog: &Xdp = self.ebpf.program(self.program).unwrap().try_into()?;
        Ok(prog.info()?.id())
    }

    /// Instructions the verifier processed to load `program` of this object
    /// (its budget is 1,000,000 per program).
    pub fn verified_insns(&self, program: &str) -> Result<u32> {
        let prog: &Xdp = self.ebpf.program(program).context("no program")?.try_into()?;
        prog.info()?.verified_instruction_count().context("the kernel does not report verified_insns")
    }

    /// Attaches the program to `ifname` in the calling thread's network namespace
    /// (driver mode); detached when the TestProg is dropped.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: a NUL-terminated name; resolved in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {ifname}");
        let prog: &mut Xdp = self.ebpf.program_mut(self.program).unwrap().try_into()?;
        prog.attach_to_if_index(ifindex, aya::programs::XdpMode::Driver)
            .with_context(|| format!("attach to {ifname}"))?;
        Ok(())
    }

    /// Makes `from` and `to` (names in the calling thread's namespace) each
    /// other's peer in `PORTS`: a bump in the wire for `mdsec_bridge` and the
    /// redirect baseline.
    pub fn set_peers(&mut self, a: &str, b: &str) -> Result<()> {
        let index = |n: &str| -> Result<u32> {
            let c = std::ffi::CString::new(n)?;
            // SAFETY: a NUL-terminated name.
            let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
            anyhow::ensure!(i != 0, "no interface {n}");
            Ok(i)
        };
        let (ia, ib) = (index(a)?, index(b)?);
        let mut m: aya::maps::DevMapHash<_> =
            aya::maps::DevMapHash::try_from(self.ebpf.map_mut(names::PORTS).context("no PORTS")?)?;
        m.insert(ia, ib, None, 0)?;
        m.insert(ib, ia, None, 0)?;
        Ok(())
    }

    /// Sets the distinct-flow stream of the bench entries: `flows` flows, the
    /// flow number written at frame offset `offset` (see `mdsec-ebpf`'s bench.rs).
    pub fn set_flow_stream(&mut self, flows: u32, offset: u32) -> Result<()> {
        self.set_flow_order(flows, offset, 1)
    }

    /// [`TestProg::set_flow_stream`] visiting flow `i * stride mod flows` as
    /// packet `i` (a stride coprime to `flows` visits each once per round).
    pub fn set_flow_order(&mut self, flows: u32, offset: u32, stride: u32) -> Result<()> {
        let mut m: aya::maps::Array<_, [u32; 4]> =
            aya::maps::Array::try_from(self.ebpf.map_mut(names::BENCH_CFG).context("no BENCH_CFG")?)?;
        m.set(0, [flows, offset, stride, 0], 0)?;
        Ok(())
    }

    /// The program's fd, for [`test_run_on`] from several threads at once.
    pub fn raw_fd(&self) -> Result<std::os::fd::RawFd> {
        use std::os::fd::{AsFd, AsRawFd};
        let prog: &Xdp = self.ebpf.program(self.program).unwrap().try_into()?;
        Ok(prog.fd()?.as_fd().as_raw_fd())
    }

    /// The kernel memory charged to map `name` (`memlock` in its fdinfo, what
    /// `bpftool map show` prints).
    pub fn map_memlock(&self, name: &str) -> Result<u64> {
        use std::os::fd::{AsFd, AsRawFd};
        let map = self.ebpf.map(name).with_context(|| format!("no map {name}"))?;
        let data: &MapData = match map {
            aya::maps::Map::Array(d) | aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => d,
            _ => anyhow::bail!("map {name}: not an array or hash"),
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no memlock in the fdinfo of map {name}"))
    }

    /// Hands a map to its user-side owner (e.g. `PolicyMaps`).
    pub fn take_map(&mut self, name: &str) -> Result<aya::maps::Map> {
        self.ebpf.take_map(name).with_context(|| format!("no map {name}"))
    }

    /// Runs `frame` `repeat` times in the kernel; returns the mean time per run.
    pub fn time(&mut self, frame: &[u8], repeat: u32) -> Result<std::time::Duration> {
        let prog: &mut Xdp = self.ebpf.program_mut(self.program).unwrap().try_into()?;
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })?;
        Ok(r.duration)
    }

    /// Runs the program once on `frame` and returns its XDP action.
    pub fn run(&mut self, frame: &[u8]) -> Result<u32> {
        let prog: &mut Xdp = self.ebpf.program_mut(self.program).unwrap().try_into()?;
        let r = prog.test_run(TestRunOptions { data_in: Some(frame), repeat: 1, ..Default::default() })?;
        Ok(r.return_value)
    }

    /// Runs the program once on `frame`; returns its XDP action and the frame
    /// as the program left it (the mirror entry removes tunnel layers).
    pub fn run_out(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let prog: &mut Xdp = self.ebpf.program_mut(self.program).unwrap().try_into()?;
        let mut out = vec![0u8; frame.len() + 64];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// STATS summed over CPUs, indexed like [`Stat::ALL`].
    pub fn stats(&self) -> Result<Vec<Counter>> {
        let m: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(self.ebpf.map(names::STATS).unwrap())?;
        mdsec_agent::datapath::poller::stat_sums(&m)
    }

    pub fn stat(&self, s: Stat) -> Result<u64> {
        Ok(self.stats()?[s as usize].packets)
    }

    /// Both flow tables, IPv4 flows as IPv4-mapped keys (as the agent reads them).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        Ok(self.flows.snapshot())
    }

    /// One flow entry, from the table that holds its key.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>> {
        Ok(self.flows.get(key))
    }

    /// The flow tables themselves (shared mappings).
    pub fn flow_tables(&self) -> &FlowTables {
        &self.flows
    }

    pub fn devices(&self) -> Result<Vec<(DeviceKey, DeviceValue)>> {
        let m: BpfHashMap<&MapData, DeviceKey, DeviceValue> =
            BpfHashMap::try_from(self.ebpf.map(names::DEVICES).unwrap())?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// Sets an interface's `IFACE_*` flags (as the loader does on attach).
    pub fn set_iface(&mut self, ifindex: u32, flags: u32) -> Result<()> {
        let mut m: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut(names::IFACES).unwrap())?;
        m.insert(ifindex, flags, 0)?;
        Ok(())
    }

    /// Each device's frames and bytes, as the agent derives them (its DEVICES
    /// entry plus the flows it owns), keyed like DEVICES.
    pub fn device_totals(&self) -> Result<DeviceTotals> {
        Ok(device_totals(&self.flows()?, &self.devices()?))
    }

    /// Empties the flow tables, DEVICES and FRAGS (STATS are compared as deltas instead).
    pub fn clear(&mut self) -> Result<()> {
        macro_rules! clear {
            ($name:expr, $k:ty, $v:ty) => {{
                let mut m: BpfHashMap<&mut MapData, $k, $v> =
                    BpfHashMap::try_from(self.ebpf.map_mut($name).unwrap())?;
                let keys: Vec<$k> = m.keys().filter_map(Result::ok).collect();
                for k in keys {
                    m.remove(&k)?;
                }
            }};
        }
        self.flows.clear();
        clear!(names::DEVICES, DeviceKey, DeviceValue);
        clear!(names::FRAGS, mdsec_common::frag::FragKey, mdsec_common::frag::FragValue);
        if self.ebpf.map(names::ALLOWED).is_some() {
            clear!(names::ALLOWED, mdsec_common::policy::TupleKey, u8);
        }
        Ok(())
    }
}

/// (frames, bytes) per device.
pub type DeviceTotals = std::collections::BTreeMap<DeviceKey, (u64, u64)>;

/// Each device's frames and bytes from snapshots of the flow maps and DEVICES,
/// derived by the agent's own merge.
pub fn device_totals(flows: &[(FlowKey, FlowValue)], devices: &[(DeviceKey, DeviceValue)]) -> DeviceTotals {
    let mut t = mdsec_agent::datapath::state::Tables::default();
    t.merge(flows, devices);
    t.devices
        .iter()
        .map(|(_, k, r)| {
            let n = r.totals();
            (k, (n.packets, n.bytes))
        })
        .collect()
}

/// The datapath loaded with the policy of these (file name, YAML) installed as a
/// generation: the program, the policy maps' owner, what was compiled and the
/// generation number.
pub fn with_policy(
    files: &[(&str, &str)],
    event_rate: u32,
) -> Result<(TestProg, mdsec_agent::policy::maps::PolicyMaps, mdsec_agent::policy::compile::Compiled, u32)> {
    with_policy_sized(files, event_rate, &[])
}

/// [`with_policy`] with map sizes overridden as in [`TestProg::load_with`].
pub fn with_policy_sized(
    files: &[(&str, &str)],
    event_rate: u32,
    sizes: &[(&str, u32)],
) -> Result<(TestProg, mdsec_agent::policy::maps::PolicyMaps, mdsec_agent::policy::compile::Compiled, u32)> {
    with_policy_in(names::PROGRAM, files, event_rate, sizes)
}

/// [`with_policy_sized`] for another entry of the object (`mdsec_bridge`).
pub fn with_policy_in(
    program: &'static str,
    files: &[(&str, &str)],
    event_rate: u32,
    sizes: &[(&str, u32)],
) -> Result<(TestProg, mdsec_agent::policy::maps::PolicyMaps, mdsec_agent::policy::compile::Compiled, u32)> {
    use mdsec_agent::policy::{compile, maps::PolicyMaps, model::load_dir};
    let dir = std::env::temp_dir().join(format!("{}-policy", crate::netns::unique_id()));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    let (p, diags) = load_dir(&dir, std::time::SystemTime::now());
    let _ = std::fs::remove_dir_all(&dir);
    let p = p.with_context(|| format!("{diags:?}"))?;
    let mut prog = TestProg::load_with(program, sizes)?;
    let mut maps = PolicyMaps::new(|n| prog.take_map(n))?;
    let c = compile::compile(&p, &mdsec_agent::base::clock::Anchor::now(), maps.limits())
        .map_err(anyhow::Error::msg)?;
    let generation = maps.apply(&c, event_rate)?;
    Ok((prog, maps, c, generation))
}

/// BPF_PROG_TEST_RUN of program `fd` on `frame`, `repeat` times, on the calling
/// thread's CPU: the raw syscall, so two threads can run one program at once
/// (aya's `test_run` needs the program mutably). Returns the last XDP action.
pub fn test_run_on(fd: std::os::fd::RawFd, frame: &[u8], repeat: u32) -> Result<u32> {
    // union bpf_attr, the `test` member: prog_fd, retval, data_size_in,
    // data_size_out, data_in, data_out, repeat, duration, then zeros.
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // SAFETY: a valid attr of the stated size; the kernel reads `frame` only.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, attr.as_mut_ptr(), attr.len() as u32) };
    anyhow::ensure!(rc == 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    Ok(u32::from_ne_bytes(attr[4..8].try_into().unwrap()))
}

/// Creates a per-CPU array of `Counter`s with `entries` cells, sets cell `i`
/// to `counts[i]` on CPU 0, and pins it at `path`: what an older agent, with
/// fewer `STATS` reasons, would have left behind. The raw syscalls: aya creates
/// maps only from an object.
pub fn pin_old_stats(path: &std::path::Path, entries: u32, counts: &[(u32, Counter)]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bpf = |cmd: libc::c_long, attr: &mut [u8]| -> Result<i64> {
        // SAFETY: `attr` is a zero-padded union bpf_attr for `cmd`; the kernel
        // reads only the pointers written into it, which outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
        anyhow::ensure!(rc >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
        Ok(rc)
    };
    // BPF_MAP_CREATE: map_type PERCPU_ARRAY (6), key 4, value 16, max_entries.
    let mut attr = [0u8; 128];
    for (i, v) in [6u32, 4, std::mem::size_of::<Counter>() as u32, entries].iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    attr[48..52].copy_from_slice(b"STAT"); // map_name
    let fd = bpf(0, &mut attr)? as u32;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for (index, c) in counts {
        let mut value = vec![Counter::default(); cpus];
        value[0] = *c;
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&fd.to_ne_bytes());
        attr[8..16].copy_from_slice(&(index as *const u32 as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
        bpf(2, &mut attr)?; // BPF_MAP_UPDATE_ELEM
    }
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&fd.to_ne_bytes());
    let pinned = bpf(6, &mut attr); // BPF_OBJ_PIN
    // SAFETY: our own descriptor; the pin holds the map from here on.
    unsafe { libc::close(fd as i32) };
    pinned.map(|_| ())
}

//! What the flow exports (EVE flow records, IPFIX) already reported of each
//! live flow, so every packet and byte goes out exactly once: across
//! active-timeout records of one long flow, and across an agent restart that
//! leaves the datapath running (`on_exit: keep`).
//!
//! A restart is bridged by the ledger file in `state_dir`: at a clean stop,
//! after every open conversation went out as `shutdown`, it lists each flow's
//! kernel entry (key and first sighting) with the counts reported of it. The
//! next run sees the same kernel entry (pinned maps) and reports only what
//! came after. A kernel entry created later never matches its line (another
//! first sighting), so a stale ledger reports nothing short.

use std::{
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use mdsec_common::flow::FlowKey;

use super::Totals;

/// One live flow's reported share.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Reported {
    pub totals: Totals,
    /// Its last packet at the time (the next record starts after it).
    pub last_seen_ns: u64,
}

/// One ledger line: a kernel entry and what was reported of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry {
    pub key: FlowKey,
    pub kernel_first_ns: u64,
    pub totals: Totals,
    pub last_seen_ns: u64,
}

const MAGIC: &[u8; 8] = b"MDSECLG1";
const ENTRY_LEN: usize = 4 + 2 + 1 + 16 + 16 + 2 + 2 + 8 * 4;

/// The ledger file in `state_dir`.
pub fn ledger_path(state_dir: &Path) -> PathBuf {
    state_dir.join("export-ledger")
}

/// Writes `entries` atomically (a temporary file renamed over the old one).
pub fn write_ledger(path: &Path, entries: &[LedgerEntry]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut w = BufWriter::new(f);
    w.write_all(MAGIC)?;
    w.write_all(&(entries.len() as u64).to_le_bytes())?;
    for e in entries {
        let k = &e.key;
        w.write_all(&k.ifindex.to_le_bytes())?;
        w.write_all(&k.vlan.to_le_bytes())?;
        w.write_all(&[k.proto])?;
        w.write_all(&k.src)?;
        w.write_all(&k.dst)?;
        w.write_all(&k.sport.to_le_bytes())?;
        w.write_all(&k.dport.to_le_bytes())?;
        for v in [e.kernel_first_ns, e.totals.packets, e.totals.bytes, e.last_seen_ns] {
            w.write_all(&v.to_le_bytes())?;
        }
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Reads a ledger; a missing file is an empty ledger.
pub fn read_ledger(path: &Path) -> Result<Vec<LedgerEntry>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
    };
    let size = f.metadata()?.len();
    let mut r = BufReader::new(f);
    let mut head = [0u8; 16];
    r.read_exact(&mut head).with_context(|| format!("{}: shorter than its header", path.display()))?;
    if &head[..8] != MAGIC {
        bail!("{}: not an mdsec export ledger (bad magic)", path.display());
    }
    let n = u64::from_le_bytes(head[8..].try_into().unwrap());
    if size != 16 + n.saturating_mul(ENTRY_LEN as u64) {
        bail!("{}: {size} bytes, but its header announces {n} entries", path.display());
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut b = [0u8; ENTRY_LEN];
    for _ in 0..n {
        r.read_exact(&mut b)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let key = FlowKey {
            ifindex: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            vlan: u16_at(4),
            proto: b[6],
            _pad: 0,
            src: b[7..23].try_into().unwrap(),
            dst: b[23..39].try_into().unwrap(),
            sport: u16_at(39),
            dport: u16_at(41),
        };
        out.push(LedgerEntry {
            key,
            kernel_first_ns: u64_at(43),
            totals: Totals { packets: u64_at(51), bytes: u64_at(59) },
            last_seen_ns: u64_at(67),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_round_trips_and_refuses_a_damaged_file() {
        let dir = std::env::temp_dir().join(format!("mdsec-ledger-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = ledger_path(&dir);
        assert_eq!(read_ledger(&p).unwrap(), vec![], "missing = empty");
        let e = |i: u8| LedgerEntry {
            key: FlowKey {
                ifindex: 7,
                vlan: 110,
                proto: 6,
                _pad: 0,
                src: [i; 16],
                dst: [2; 16],
                sport: 40000 + i as u16,
                dport: 443,
            },
            kernel_first_ns: 1_000 + i as u64,
            totals: Totals { packets: 3 * i as u64, bytes: 300 * i as u64 },
            last_seen_ns: 9_000 + i as u64,
        };
        let all: Vec<_> = (0..50).map(e).collect();
        write_ledger(&p, &all).unwrap();
        assert_eq!(read_ledger(&p).unwrap(), all);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let err = read_ledger(&p).unwrap_err().to_string();
        assert!(err.contains("export-ledger") && err.contains("announces 50"), "{err}");
        std::fs::write(&p, b"garbage!garbage!").unwrap();
        assert!(read_ledger(&p).unwrap_err().to_string().contains("bad magic"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

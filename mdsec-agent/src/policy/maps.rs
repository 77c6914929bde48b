//! Owns the policy maps on the user side (IDENT, MACS, POLICY, SEGMENTS, CONFIG) and
//! swaps generations: clear the inactive half, write it, then flip `CONFIG` with
//! one array write. The kernel sees either the old policy or the new one, never a
//! mix; flows re-evaluate on their next packet.

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use mdsec_common::{
    maps as names,
    policy::{IdentData, MAX_IDS, MacKey, PolicyConfig, PolicyData, PolicyValue, SegmentInfo},
};

use super::compile::{Compiled, Limits};

pub struct PolicyMaps {
    ident: LpmTrie<MapData, IdentData, u32>,
    macs: HashMap<MapData, MacKey, u32>,
    policy: LpmTrie<MapData, PolicyData, PolicyValue>,
    segments: Array<MapData, SegmentInfo>,
    config: Array<MapData, PolicyConfig>,
    limits: Limits,
}

impl PolicyMaps {
    /// Takes the maps out of a loaded object (`take` is `Ebpf::take_map`).
    pub fn new(mut take: impl FnMut(&str) -> Result<Map>) -> Result<PolicyMaps> {
        Ok(PolicyMaps {
            ident: LpmTrie::try_from(take(names::IDENT)?)?,
            macs: HashMap::try_from(take(names::MACS)?)?,
            policy: LpmTrie::try_from(take(names::POLICY)?)?,
            segments: Array::try_from(take(names::SEGMENTS)?)?,
            config: Array::try_from(take(names::CONFIG)?)?,
            limits: Limits::DATAPATH,
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn config(&self) -> Result<PolicyConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Turns policy off (generation 0: every flow passes unevaluated), e.g. when a
    /// restarted agent has no `policy_dir` but finds a pinned policy.
    pub fn disable(&mut self, event_rate: u32) -> Result<()> {
        let cfg = PolicyConfig { generation: 0, event_rate, reevaluate_at_ns: 0 };
        self.config.set(0, cfg, 0).context("write CONFIG")?;
        Ok(())
    }

    /// The number the next [`apply`](Self::apply) installs. It always lands in the
    /// half the active generation does not use (u32::MAX is odd, so it wraps to 2).
    pub fn next_generation(&self) -> Result<u32> {
        Ok(match self.config()?.generation {
            u32::MAX => 2,
            g => g + 1,
        })
    }

    /// Installs `c` as the next generation and returns its number.
    pub fn apply(&mut self, c: &Compiled, event_rate: u32) -> Result<u32> {
        let next = self.next_generation()?;
        let bit = (next & 1) as u8;
        self.clear_half(bit)?;
        for e in &c.idents {
            self.ident.insert(&Key::new(e.prefix_len, e.data(bit)), e.id, 0).context("write IDENT")?;
        }
        for m in &c.macs {
            self.macs.insert(m.key(bit), m.id, 0).context("write MACS")?;
        }
        for (id, info) in &c.segments {
            self.segments.set(bit as u32 * MAX_IDS + id, info, 0).context("write SEGMENTS")?;
        }
        for (k, v) in &c.policy {
            self.policy.insert(&Key::new(k.prefix_len, k.data(bit)), v, 0).context("write POLICY")?;
        }
        let cfg = PolicyConfig { generation: next, event_rate, reevaluate_at_ns: c.reevaluate_at_ns };
        self.config.set(0, cfg, 0).context("flip CONFIG")?;
        Ok(next)
    }

    /// Rewrites entries of the active generation `gen` in place (a
    /// maintenance window's next occurrence) and the instant verdicts are
    /// decided again; no generation flip, no reload.
    pub fn reschedule(
        &mut self,
        generation: u32,
        entries: &[(super::compile::PolicyKey, PolicyValue)],
        reevaluate_at_ns: u64,
    ) -> Result<()> {
        let mut cfg = self.config()?;
        anyhow::ensure!(cfg.generation == generation, "generation {generation} is no longer active");
        let bit = (generation & 1) as u8;
        for (k, v) in entries {
            self.policy.insert(&Key::new(k.prefix_len, k.data(bit)), v, 0).context("write POLICY")?;
        }
        cfg.reevaluate_at_ns = reevaluate_at_ns;
        self.config.set(0, cfg, 0).context("write CONFIG")
    }

    /// Empties one generation's half of every policy map.
    fn clear_half(&mut self, bit: u8) -> Result<()> {
        let idents: Vec<_> =
            self.ident.keys().filter_map(Result::ok).filter(|k| k.data().generation == bit).collect();
        for k in idents {
            self.ident.remove(&k)?;
        }
        let macs: Vec<_> = self.macs.keys().filter_map(Result::ok).filter(|k| k.generation == bit).collect();
        for k in macs {
            self.macs.remove(&k)?;
        }
        let policy: Vec<_> =
            self.policy.keys().filter_map(Result::ok).filter(|k| k.data().generation == bit).collect();
        for k in policy {
            self.policy.remove(&k)?;
        }
        let empty = SegmentInfo::default();
        for id in 0..MAX_IDS {
            let idx = bit as u32 * MAX_IDS + id;
            if self.segments.get(&idx, 0)? != empty {
                self.segments.set(idx, empty, 0)?;
            }
        }
        Ok(())
    }
}

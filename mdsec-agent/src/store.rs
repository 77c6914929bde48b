//! The state database (SQLite in `state_dir`, WAL): what must survive restarts and
//! crashes: the device inventory, segments' learning starts and the learned
//! observations (`learn.rs`). Schema changes are numbered migrations
//! recorded in `PRAGMA user_version`.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, params};

use crate::{
    learn::{ObsKey, ObsVal},
    model::Device,
    policy::model::Direction,
};

pub const FILE: &str = "mdsec.db";

/// Each entry upgrades the schema by one version; never edit a released entry.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE devices (
        iface TEXT NOT NULL,
        vlan INTEGER NOT NULL,
        mac TEXT NOT NULL,
        vendor TEXT,
        ips TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        packets INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (iface, vlan, mac)
    )",
    "CREATE TABLE segments (name TEXT PRIMARY KEY, learning_started TEXT NOT NULL)",
    "ALTER TABLE devices ADD COLUMN fingerprints TEXT NOT NULL DEFAULT '{}'",
    "CREATE TABLE observations (
        segment TEXT NOT NULL,
        direction TEXT NOT NULL,
        device TEXT NOT NULL,
        peer TEXT NOT NULL,
        peer_segment TEXT NOT NULL,
        proto INTEGER NOT NULL,
        port INTEGER NOT NULL,
        app TEXT NOT NULL,
        flows INTEGER NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        learned INTEGER NOT NULL,
        PRIMARY KEY (segment, direction, device, peer, peer_segment, proto, port, app)
    )",
];

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.join(FILE);
        let conn = Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut s = Store { conn };
        s.migrate().with_context(|| format!("migrate {}", path.display()))?;
        Ok(s)
    }

    /// Opens the database of an agent that has run (for readers such as
    /// `suggest`); never creates one.
    pub fn open_existing(dir: &Path) -> Result<Store> {
        let path = dir.join(FILE);
        anyhow::ensure!(
            path.exists(),
            "no state database at {}: has the agent run with this state_dir?",
            path.display()
        );
        Store::open(dir)
    }

    pub fn schema_version(&self) -> Result<u32> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn migrate(&mut self) -> Result<()> {
        let have = self.schema_version()? as usize;
        anyhow::ensure!(
            have <= MIGRATIONS.len(),
            "database schema {have} is newer than this agent ({}); refusing to touch it",
            MIGRATIONS.len()
        );
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as u32 + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Inserts or updates devices; keeps the earliest first_seen and the union of
    /// addresses already stored.
    pub fn save_devices(&mut self, devices: &[Device]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut get = tx.prepare_cached(
                "SELECT first_seen, ips, fingerprints FROM devices WHERE iface = ?1 AND vlan = ?2 AND mac = ?3",
            )?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO devices (iface, vlan, mac, vendor, ips, first_seen, last_seen, packets, bytes, fingerprints)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for d in devices {
                let old: Option<(String, String, String)> = get
                    .query_row(params![d.iface, d.vlan, d.mac], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .ok();
                let mut ips = d.ips.clone();
                let mut first = d.first_seen.clone();
                let mut fps = d.fingerprints.clone();
                if let Some((f, old_ips, old_fps)) = old {
                    let old_fps: std::collections::BTreeMap<String, String> =
                        serde_json::from_str(&old_fps).unwrap_or_default();
                    for (k, v) in old_fps {
                        fps.entry(k).or_insert(v);
                    }
                    // RFC 3339 UTC strings of one format sort chronologically.
                    first = first.min(f);
                    for ip in serde_json::from_str::<Vec<String>>(&old_ips).unwrap_or_default() {
                        if !ips.contains(&ip) {
                            ips.push(ip);
                        }
                    }
                }
                put.execute(params![
                    d.iface,
                    d.vlan,
                    d.mac,
                    d.vendor,
                    serde_json::to_string(&ips)?,
                    first,
                    d.last_seen,
                    d.packets as i64,
                    d.bytes as i64,
                    serde_json::to_string(&fps)?
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Writes observation rows (whole rows: the agent holds the totals).
    pub fn save_observations(&mut self, rows: &[(ObsKey, ObsVal)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO observations (segment, direction, device, peer, peer_segment, proto, port, app, flows, first_seen, last_seen, learned)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for (k, v) in rows {
                put.execute(params![
                    k.segment,
                    direction_text(k.direction),
                    k.device.to_string(),
                    k.peer.to_string(),
                    k.peer_segment,
                    k.proto,
                    k.port,
                    k.app,
                    v.flows as i64,
                    v.first_seen,
                    v.last_seen,
                    v.learned
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Observation rows, of one segment or all; rows this agent cannot read
    /// (hand-edited) are skipped.
    pub fn load_observations(&self, segment: Option<&str>) -> Result<Vec<(ObsKey, ObsVal)>> {
        let mut st = self.conn.prepare(
            "SELECT segment, direction, device, peer, peer_segment, proto, port, app, flows, first_seen, last_seen, learned
             FROM observations WHERE ?1 IS NULL OR segment = ?1",
        )?;
        let rows = st.query_map(params![segment], |r| {
            let direction: String = r.get(1)?;
            let device: String = r.get(2)?;
            let peer: String = r.get(3)?;
            Ok((
                (|| {
                    Some(ObsKey {
                        segment: r.get(0).ok()?,
                        direction: match direction.as_str() {
                            "out" => Direction::Out,
                            "in" => Direction::In,
                            _ => return None,
                        },
                        device: device.parse().ok()?,
                        peer: peer.parse().ok()?,
                        peer_segment: r.get(4).ok()?,
                        proto: r.get(5).ok()?,
                        port: r.get(6).ok()?,
                        app: r.get(7).ok()?,
                    })
                })(),
                ObsVal {
                    flows: r.get::<_, i64>(8)? as u64,
                    first_seen: r.get(9)?,
                    last_seen: r.get(10)?,
                    learned: r.get(11)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            if let (Some(k), v) = row? {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// When the agent first loaded segment `name`, if it ever did.
    pub fn learning_start(&self, name: &str) -> Result<Option<String>> {
        let mut st = self.conn.prepare("SELECT learning_started FROM segments WHERE name = ?1")?;
        let mut rows = st.query(params![name])?;
        Ok(match rows.next()? {
            Some(r) => Some(r.get(0)?),
            None => None,
        })
    }

    /// When the agent first loaded segment `name` (recorded now if never).
    pub fn learning_started(&self, name: &str, now: &str) -> Result<String> {
        self.conn.execute(
            "INSERT OR IGNORE INTO segments (name, learning_started) VALUES (?1, ?2)",
            params![name, now],
        )?;
        Ok(self.conn.query_row(
            "SELECT learning_started FROM segments WHERE name = ?1",
            params![name],
            |r| r.get(0),
        )?)
    }

    pub fn load_devices(&self) -> Result<Vec<Device>> {
        let mut st = self
            .conn
            .prepare("SELECT iface, vlan, mac, vendor, ips, first_seen, last_seen, packets, bytes, fingerprints FROM devices ORDER BY iface, vlan, mac")?;
        let rows = st.query_map([], |r| {
            let ips: String = r.get(4)?;
            Ok(Device {
                iface: r.get(0)?,
                vlan: r.get(1)?,
                mac: r.get(2)?,
                vendor: r.get(3)?,
                ips: serde_json::from_str(&ips).unwrap_or_default(),
                fingerprints: serde_json::from_str(&r.get::<_, String>(9)?).unwrap_or_default(),
                first_seen: r.get(5)?,
                last_seen: r.get(6)?,
                packets: r.get::<_, i64>(7)? as u64,
                bytes: r.get::<_, i64>(8)? as u64,
                ..Default::default()
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn direction_text(d: Direction) -> &'static str {
    match d {
        Direction::Out => "out",
        Direction::In => "in",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(mac: &str, ip: &str, first: &str) -> Device {
        Device {
            iface: "gw1".into(),
            vlan: 0,
            mac: mac.into(),
            vendor: Some("Baxter International Inc".into()),
            ips: vec![ip.into()],
            packets: 10,
            bytes: 1000,
            first_seen: first.into(),
            last_seen: "2026-11-23T10:00:00.000Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn devices_survive_reopen_and_merge() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let mut s = Store::open(&dir).unwrap();
            assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u32);
            s.save_devices(&[dev("58:46:e1:00:00:07", "10.0.1.2", "2026-11-20T08:00:00.000Z")]).unwrap();
        }
        let mut s = Store::open(&dir).unwrap();
        // A later sighting with a new address keeps the first sighting and both
        // addresses, and fingerprints accumulate.
        let mut later = dev("58:46:e1:00:00:07", "10.0.1.9", "2026-11-23T09:00:00.000Z");
        later.fingerprints.insert("dhcp.hostname".into(), "pump07".into());
        s.save_devices(&[later]).unwrap();
        let d = s.load_devices().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].first_seen, "2026-11-20T08:00:00.000Z");
        assert_eq!(d[0].ips, vec!["10.0.1.9", "10.0.1.2"]);
        assert_eq!(d[0].vendor.as_deref(), Some("Baxter International Inc"));
        assert_eq!(d[0].fingerprints.get("dhcp.hostname").map(String::as_str), Some("pump07"));
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn observations_round_trip() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-store-obs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = ObsKey {
            segment: "pumps".into(),
            direction: Direction::In,
            device: "10.0.1.2".parse().unwrap(),
            peer: "fd00::7".parse().unwrap(),
            peer_segment: "workstations".into(),
            proto: 6,
            port: 8443,
            app: "tls".into(),
        };
        let v = ObsVal {
            flows: 3,
            first_seen: "2026-11-23T09:00:00.000Z".into(),
            last_seen: "2026-11-23T10:00:00.000Z".into(),
            learned: true,
        };
        {
            let mut s = Store::open(&dir).unwrap();
            s.save_observations(&[(k.clone(), v.clone())]).unwrap();
            let mut v2 = v.clone();
            v2.flows = 4;
            s.save_observations(&[(k.clone(), v2)]).unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let rows = s.load_observations(Some("pumps")).unwrap();
        assert_eq!(rows, vec![(k, ObsVal { flows: 4, ..v })]);
        assert!(s.load_observations(Some("other")).unwrap().is_empty());
        assert_eq!(s.learning_start("pumps").unwrap(), None);
        s.learning_started("pumps", "2026-11-23T08:00:00.000Z").unwrap();
        assert_eq!(s.learning_start("pumps").unwrap().as_deref(), Some("2026-11-23T08:00:00.000Z"));
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-store-new-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Connection::open(dir.join(FILE)).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let e = Store::open(&dir).err().unwrap();
        assert!(format!("{e:#}").contains("newer than this agent"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The state database (SQLite in `state_dir`, WAL): what must survive restarts and
//! crashes. Today the device inventory; schema changes are numbered migrations
//! recorded in `PRAGMA user_version`.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, params};

use crate::model::Device;

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
    fn a_newer_schema_is_refused() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-store-new-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Connection::open(dir.join(FILE)).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let e = Store::open(&dir).err().unwrap();
        assert!(format!("{e:#}").contains("newer than this agent"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

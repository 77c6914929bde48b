//! The state database (SQLite in `state_dir`, WAL): what must survive restarts and
//! crashes: the device inventory, segments' learning starts and the learned
//! observations (`learn.rs`). Schema changes are numbered migrations
//! recorded in `PRAGMA user_version`.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, params};

use crate::{
    detection::learn::{ObsKey, ObsVal},
    inventory::{Device, doc::DeviceDoc},
    policy::{
        model::Direction,
        ondemand::{Closed, Grant},
    },
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
    // The whole device as the API last showed it (class, segment, model …), for
    // reports made while the agent is down.
    "ALTER TABLE devices ADD COLUMN doc TEXT NOT NULL DEFAULT '{}'",
    // Lifecycle: the current state per MAC, and the append-only audit trail.
    "CREATE TABLE lifecycle (mac TEXT PRIMARY KEY, state TEXT NOT NULL, since TEXT NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL);
     CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, mac TEXT NOT NULL,
        from_state TEXT NOT NULL, to_state TEXT NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL);
     CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit table is append-only'); END;
     CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit table is append-only'); END;",
    // Evidence: every event, and periodic snapshots (segment counter deltas, KPIs).
    "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, type TEXT NOT NULL, doc TEXT NOT NULL);
     CREATE INDEX events_time ON events (time);
     CREATE TABLE snapshots (time TEXT PRIMARY KEY, doc TEXT NOT NULL);",
    // Every API write attempt (refused ones too), append-only like `audit`.
    "CREATE TABLE api_writes (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, client TEXT NOT NULL,
        method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL);
     CREATE TRIGGER api_writes_no_update BEFORE UPDATE ON api_writes BEGIN SELECT RAISE(ABORT, 'the api_writes table is append-only'); END;
     CREATE TRIGGER api_writes_no_delete BEFORE DELETE ON api_writes BEGIN SELECT RAISE(ABORT, 'the api_writes table is append-only'); END;",
    // Incidents, as the API shows them (rewritten while open).
    "CREATE TABLE incidents (id INTEGER PRIMARY KEY, first_seen TEXT NOT NULL, last_seen TEXT NOT NULL, doc TEXT NOT NULL);
     CREATE INDEX incidents_last_seen ON incidents (last_seen);",
    // The policy history: every installed generation, its files, diff and approval.
    "CREATE TABLE policy_history (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
        generation INTEGER NOT NULL, content_hash TEXT NOT NULL, approved_by TEXT, ticket TEXT, doc TEXT NOT NULL);
     CREATE TRIGGER policy_history_no_update BEFORE UPDATE ON policy_history BEGIN SELECT RAISE(ABORT, 'the policy_history table is append-only'); END;
     CREATE TRIGGER policy_history_no_delete BEFORE DELETE ON policy_history BEGIN SELECT RAISE(ABORT, 'the policy_history table is append-only'); END;",
    // On-demand exceptions: each opening, and its closing, append-only.
    "CREATE TABLE exceptions_opened (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, expires TEXT NOT NULL, doc TEXT NOT NULL);
     CREATE TABLE exceptions_closed (exception INTEGER PRIMARY KEY REFERENCES exceptions_opened (id), time TEXT NOT NULL,
        by TEXT NOT NULL, reason TEXT NOT NULL);
     CREATE TRIGGER exceptions_opened_no_update BEFORE UPDATE ON exceptions_opened BEGIN SELECT RAISE(ABORT, 'the exceptions_opened table is append-only'); END;
     CREATE TRIGGER exceptions_opened_no_delete BEFORE DELETE ON exceptions_opened BEGIN SELECT RAISE(ABORT, 'the exceptions_opened table is append-only'); END;
     CREATE TRIGGER exceptions_closed_no_update BEFORE UPDATE ON exceptions_closed BEGIN SELECT RAISE(ABORT, 'the exceptions_closed table is append-only'); END;
     CREATE TRIGGER exceptions_closed_no_delete BEFORE DELETE ON exceptions_closed BEGIN SELECT RAISE(ABORT, 'the exceptions_closed table is append-only'); END;",
];

/// One API write attempt: who (client address), what, and the answer's status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApiWrite {
    pub id: i64,
    pub time: String,
    pub client: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.join(FILE);
        let conn = Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The agent, the API and CLI readers share the file: wait for a writer
        // rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
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

    #[cfg(test)]
    pub fn raw_execute(&self, sql: &str) -> rusqlite::Result<usize> {
        self.conn.execute(sql, [])
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
        let docs: Vec<DeviceDoc> = devices.iter().map(DeviceDoc::from).collect();
        self.save_device_docs(&docs)
    }

    fn save_device_docs(&mut self, devices: &[DeviceDoc]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut get = tx.prepare_cached(
                "SELECT first_seen, ips, fingerprints FROM devices WHERE iface = ?1 AND vlan = ?2 AND mac = ?3",
            )?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO devices (iface, vlan, mac, vendor, ips, first_seen, last_seen, packets, bytes, fingerprints, doc)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
                    serde_json::to_string(&fps)?,
                    serde_json::to_string(d)?
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

    /// Devices as the agent last showed them (class, segment, model included),
    /// with the merged first sighting, addresses and fingerprints.
    pub fn load_devices(&self) -> Result<Vec<Device>> {
        Ok(self
            .device_rows()?
            .into_iter()
            .filter_map(|(base, doc)| match serde_json::from_str::<DeviceDoc>(&doc) {
                Ok(d) => DeviceDoc {
                    first_seen: base.first_seen,
                    ips: base.ips,
                    fingerprints: base.fingerprints,
                    ..d
                }
                .typed(),
                Err(_) => base.typed(),
            })
            .collect())
    }

    /// Current lifecycle rows by MAC.
    pub fn lifecycle(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::inventory::lifecycle::Record>> {
        let mut st = self.conn.prepare("SELECT mac, state, since, reason, actor FROM lifecycle")?;
        let rows = st.query_map([], |r| {
            let state: String = r.get(1)?;
            Ok((r.get::<_, String>(0)?, state, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (mac, state, since, reason, actor) = row?;
            if let Some(state) = crate::inventory::lifecycle::State::from_name(&state) {
                out.insert(mac, crate::inventory::lifecycle::Record { state, since, reason, actor });
            }
        }
        Ok(out)
    }

    /// Changes a device's lifecycle state and appends the audit row, in one
    /// transaction; an invalid transition changes nothing.
    pub fn set_lifecycle(
        &mut self,
        mac: &str,
        to: crate::inventory::lifecycle::State,
        reason: &str,
        actor: &str,
        now: &str,
    ) -> Result<crate::inventory::lifecycle::AuditRow, crate::inventory::lifecycle::ChangeError> {
        use crate::inventory::lifecycle::{AuditRow, ChangeError, State};
        let db = |e: rusqlite::Error| ChangeError::Database(e.to_string());
        // IMMEDIATE: two concurrent changes of one device serialise here.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
        let from: State = tx
            .query_row("SELECT state FROM lifecycle WHERE mac = ?1", params![mac], |r| r.get::<_, String>(0))
            .ok()
            .and_then(|s| State::from_name(&s))
            .unwrap_or_default();
        crate::inventory::lifecycle::check_transition(from, to, reason)?;
        tx.execute(
            "INSERT OR REPLACE INTO lifecycle (mac, state, since, reason, actor) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![mac, to.name(), now, reason, actor],
        )
        .map_err(db)?;
        tx.execute(
            "INSERT INTO audit (time, mac, from_state, to_state, reason, actor) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now, mac, from.name(), to.name(), reason, actor],
        )
        .map_err(db)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(db)?;
        Ok(AuditRow {
            id,
            time: now.into(),
            mac: mac.into(),
            from: from.name().into(),
            to: to.name().into(),
            reason: reason.into(),
            actor: actor.into(),
        })
    }

    /// A quarantine step in a device's audit trail: `on` from its lifecycle
    /// state to `quarantine`, or back. The lifecycle state itself does not
    /// change (a quarantine is lifted by a change to `active`).
    pub fn audit_quarantine(&mut self, mac: &str, on: bool, reason: &str, now: &str) -> Result<()> {
        let state: String = self
            .conn
            .query_row("SELECT state FROM lifecycle WHERE mac = ?1", params![mac], |r| r.get(0))
            .unwrap_or_else(|_| crate::inventory::lifecycle::State::Onboarding.name().into());
        let (from, to) = if on { (state.as_str(), "quarantine") } else { ("quarantine", state.as_str()) };
        self.conn.execute(
            "INSERT INTO audit (time, mac, from_state, to_state, reason, actor) VALUES (?1, ?2, ?3, ?4, ?5, 'mdsec')",
            params![now, mac, from, to, reason],
        )?;
        Ok(())
    }

    /// The audit trail, oldest first (of one MAC or all).
    pub fn audit(&self, mac: Option<&str>) -> Result<Vec<crate::inventory::lifecycle::AuditRow>> {
        let mut st = self.conn.prepare(
            "SELECT id, time, mac, from_state, to_state, reason, actor FROM audit WHERE ?1 IS NULL OR mac = ?1 ORDER BY id",
        )?;
        let rows = st.query_map(params![mac], |r| {
            Ok(crate::inventory::lifecycle::AuditRow {
                id: r.get(0)?,
                time: r.get(1)?,
                mac: r.get(2)?,
                from: r.get(3)?,
                to: r.get(4)?,
                reason: r.get(5)?,
                actor: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn record_api_write(&mut self, w: &ApiWrite) -> Result<()> {
        self.conn.execute(
            "INSERT INTO api_writes (time, client, method, path, status) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![w.time, w.client, w.method, w.path, w.status],
        )?;
        Ok(())
    }

    /// API write attempts, oldest first.
    pub fn api_writes(&self) -> Result<Vec<ApiWrite>> {
        let mut st =
            self.conn.prepare("SELECT id, time, client, method, path, status FROM api_writes ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(ApiWrite {
                id: r.get(0)?,
                time: r.get(1)?,
                client: r.get(2)?,
                method: r.get(3)?,
                path: r.get(4)?,
                status: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Appends an installed generation to the policy history; sets its `id`.
    pub fn append_policy_change(&mut self, c: &mut crate::policy::approval::Change) -> Result<()> {
        let tx = self.conn.transaction()?;
        let next: i64 =
            tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM policy_history", [], |r| r.get(0))?;
        c.id = next as u64;
        tx.execute(
            "INSERT INTO policy_history (id, time, generation, content_hash, approved_by, ticket, doc)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                next,
                c.time,
                c.generation,
                c.content_hash,
                c.approved_by,
                c.ticket,
                serde_json::to_string(c)?
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` history rows after `after` (an id), oldest first.
    pub fn policy_history(&self, after: u64, limit: usize) -> Result<Vec<crate::policy::approval::Change>> {
        let mut st =
            self.conn.prepare("SELECT doc FROM policy_history WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let rows = st.query_map(params![after as i64, limit as i64], |r| r.get::<_, String>(0))?;
        rows.map(|d| Ok(serde_json::from_str(&d?)?)).collect()
    }

    /// History rows installed in `from <= time < to`, oldest first.
    pub fn policy_history_between(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Vec<crate::policy::approval::Change>> {
        let mut st =
            self.conn.prepare("SELECT doc FROM policy_history WHERE time >= ?1 AND time < ?2 ORDER BY id")?;
        let rows = st.query_map(params![from, to], |r| r.get::<_, String>(0))?;
        rows.map(|d| Ok(serde_json::from_str(&d?)?)).collect()
    }

    /// The newest history row: the generation installed last.
    pub fn last_policy_change(&self) -> Result<Option<crate::policy::approval::Change>> {
        let mut st = self.conn.prepare("SELECT doc FROM policy_history ORDER BY id DESC LIMIT 1")?;
        let mut rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.next().map(|d| Ok(serde_json::from_str(&d?)?)).transpose()
    }

    /// Records an on-demand exception; returns it with its id.
    pub fn open_grant(&mut self, g: &Grant) -> Result<Grant> {
        let tx = self.conn.transaction()?;
        let next: i64 =
            tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM exceptions_opened", [], |r| r.get(0))?;
        let g = Grant { id: next as u64, closed: None, ..g.clone() };
        tx.execute(
            "INSERT INTO exceptions_opened (id, time, expires, doc) VALUES (?1, ?2, ?3, ?4)",
            params![next, g.opened_at, g.expires, serde_json::to_string(&g)?],
        )?;
        tx.commit()?;
        Ok(g)
    }

    /// Closes an on-demand exception: the grant as closed, or why not
    /// (`Ok(Err)`: unknown id, or closed before).
    pub fn close_grant(&mut self, id: u64, c: &Closed) -> Result<std::result::Result<Grant, String>> {
        let Some(g) = self.grants(false)?.into_iter().find(|g| g.id == id) else {
            return Ok(Err(format!("no on-demand exception #{id}")));
        };
        if let Some(was) = &g.closed {
            return Ok(Err(format!(
                "on-demand exception #{id} was closed at {} by {} ({})",
                was.time, was.by, was.reason
            )));
        }
        self.conn.execute(
            "INSERT INTO exceptions_closed (exception, time, by, reason) VALUES (?1, ?2, ?3, ?4)",
            params![id as i64, c.time, c.by, c.reason],
        )?;
        Ok(Ok(Grant { closed: Some(c.clone()), ..g }))
    }

    /// On-demand exceptions, oldest first: all, or only those not closed.
    pub fn grants(&self, open_only: bool) -> Result<Vec<Grant>> {
        let mut st = self.conn.prepare(
            "SELECT o.doc, c.time, c.by, c.reason FROM exceptions_opened o
             LEFT JOIN exceptions_closed c ON c.exception = o.id
             WHERE NOT ?1 OR c.exception IS NULL ORDER BY o.id",
        )?;
        let rows = st.query_map(params![open_only], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (doc, time, by, reason) = row?;
            let mut g: Grant = serde_json::from_str(&doc)?;
            g.closed = match (time, by, reason) {
                (Some(time), Some(by), Some(reason)) => Some(Closed { time, by, reason }),
                _ => None,
            };
            out.push(g);
        }
        Ok(out)
    }

    /// Appends events (the evidence report reads them back by time).
    pub fn save_events(&mut self, events: &[crate::base::event::Event]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut put = tx.prepare_cached("INSERT INTO events (time, type, doc) VALUES (?1, ?2, ?3)")?;
            for e in events {
                put.execute(params![e.time, e.kind, serde_json::to_string(e)?])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Events with `from <= time < to` (RFC 3339 UTC strings compare in time order).
    pub fn events_between(&self, from: &str, to: &str) -> Result<Vec<crate::base::event::Event>> {
        let mut st =
            self.conn.prepare("SELECT doc FROM events WHERE time >= ?1 AND time < ?2 ORDER BY id")?;
        let rows = st.query_map(params![from, to], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in rows {
            if let Ok(e) = serde_json::from_str(&doc?) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Writes incidents (new ones, and the latest state of changed ones).
    pub fn save_incidents(&mut self, incidents: &[crate::detection::incident::Incident]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO incidents (id, first_seen, last_seen, doc) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for i in incidents {
                put.execute(params![i.id as i64, i.first_seen, i.last_seen, serde_json::to_string(i)?])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The `limit` most recent incidents, oldest first.
    pub fn load_incidents(&self, limit: usize) -> Result<Vec<crate::detection::incident::Incident>> {
        let mut st = self.conn.prepare("SELECT doc FROM incidents ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map(params![limit as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in rows {
            out.push(serde_json::from_str(&doc?)?);
        }
        out.reverse();
        Ok(out)
    }

    /// Incidents active at some time in `from <= t < to`.
    pub fn incidents_between(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Vec<crate::detection::incident::Incident>> {
        let mut st = self
            .conn
            .prepare("SELECT doc FROM incidents WHERE last_seen >= ?1 AND first_seen < ?2 ORDER BY id")?;
        let rows = st.query_map(params![from, to], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for doc in rows {
            out.push(serde_json::from_str(&doc?)?);
        }
        Ok(out)
    }

    pub fn save_snapshot(&mut self, time: &str, doc: &str) -> Result<()> {
        self.conn
            .execute("INSERT OR REPLACE INTO snapshots (time, doc) VALUES (?1, ?2)", params![time, doc])?;
        Ok(())
    }

    /// Snapshot documents with `from <= time < to`, oldest first.
    pub fn snapshots_between(&self, from: &str, to: &str) -> Result<Vec<String>> {
        let mut st =
            self.conn.prepare("SELECT doc FROM snapshots WHERE time >= ?1 AND time < ?2 ORDER BY time")?;
        let rows = st.query_map(params![from, to], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Drops events and snapshots older than `before` (retention).
    pub fn prune(&mut self, before: &str) -> Result<()> {
        self.conn.execute("DELETE FROM events WHERE time < ?1", params![before])?;
        self.conn.execute("DELETE FROM snapshots WHERE time < ?1", params![before])?;
        self.conn.execute("DELETE FROM incidents WHERE last_seen < ?1", params![before])?;
        Ok(())
    }

    /// Every stored device (the merged columns) with its last API document.
    fn device_rows(&self) -> Result<Vec<(DeviceDoc, String)>> {
        let mut st = self.conn.prepare(
            "SELECT iface, vlan, mac, vendor, ips, first_seen, last_seen, packets, bytes, fingerprints, doc
             FROM devices ORDER BY iface, vlan, mac",
        )?;
        let rows = st.query_map([], |r| {
            let ips: String = r.get(4)?;
            let d = DeviceDoc {
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
            };
            Ok((d, r.get(10)?))
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
    use crate::{
        base::clock::{parse_rfc3339, rfc3339},
        inventory::fingerprint::Trait,
    };

    fn dev(mac: &str, ip: &str, first: &str) -> Device {
        let mut d = Device::new("gw1".into(), 0, mac.parse().unwrap());
        d.vendor = Some("Baxter International Inc".into());
        d.ips = vec![ip.parse().unwrap()];
        (d.packets, d.bytes) = (10, 1000);
        d.first_seen = parse_rfc3339(first).unwrap();
        d.last_seen = parse_rfc3339("2026-11-23T10:00:00.000Z").unwrap();
        d
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
        later.fingerprints.insert(Trait::DhcpHostname, "pump07".into());
        s.save_devices(&[later]).unwrap();
        let d = s.load_devices().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(rfc3339(d[0].first_seen), "2026-11-20T08:00:00.000Z");
        assert_eq!(
            d[0].ips,
            vec!["10.0.1.9".parse::<std::net::IpAddr>().unwrap(), "10.0.1.2".parse().unwrap()]
        );
        assert_eq!(d[0].vendor.as_deref(), Some("Baxter International Inc"));
        assert_eq!(d[0].fingerprints.get(&Trait::DhcpHostname).map(String::as_str), Some("pump07"));
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
        // The first call records the start; later calls return it unchanged.
        assert_eq!(
            s.learning_started("pumps", "2026-11-23T08:00:00.000Z").unwrap(),
            "2026-11-23T08:00:00.000Z"
        );
        assert_eq!(
            s.learning_started("pumps", "2026-11-24T08:00:00.000Z").unwrap(),
            "2026-11-23T08:00:00.000Z"
        );
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

    #[test]
    fn the_policy_history_is_append_only_and_pages_in_order() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Store::open(&dir).unwrap();
        for g in 1..=3u32 {
            let mut c = crate::policy::approval::Change {
                generation: g,
                time: format!("2026-12-02T10:0{g}:00.000Z"),
                content_hash: format!("sha256:{g}"),
                approved_by: (g == 2).then(|| "B. Med".into()),
                ..Default::default()
            };
            s.append_policy_change(&mut c).unwrap();
            assert_eq!(c.id, g as u64);
        }
        let page = s.policy_history(1, 10).unwrap();
        assert_eq!(page.iter().map(|c| c.generation).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(page[0].approved_by.as_deref(), Some("B. Med"));
        assert_eq!(s.last_policy_change().unwrap().unwrap().generation, 3);
        assert_eq!(s.policy_history_between("2026-12-02T10:02", "2026-12-02T10:03").unwrap().len(), 1);
        let e = s.raw_execute("DELETE FROM policy_history").unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        let e = s.raw_execute("UPDATE policy_history SET approved_by = 'x'").unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn on_demand_exceptions_open_and_close_once_and_stay_recorded() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-grants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Store::open(&dir).unwrap();
        let g = Grant {
            id: 0,
            segment: "pumps".into(),
            access: crate::policy::ondemand::Access::From,
            peer: "192.0.2.7".into(),
            proto: Some(6),
            ports: vec![(22, 22)],
            app: None,
            opened_at: "2026-12-02T10:00:00.000Z".into(),
            expires: "2026-12-02T12:00:00.000Z".into(),
            ticket: "CHG-1".into(),
            reason: "vendor".into(),
            opened_by: "ana".into(),
            closed: None,
        };
        let (a, b) = (s.open_grant(&g).unwrap(), s.open_grant(&g).unwrap());
        assert_eq!((a.id, b.id), (1, 2));
        let c = Closed { time: "2026-12-02T11:00:00.000Z".into(), by: "ana".into(), reason: "done".into() };
        let closed = s.close_grant(1, &c).unwrap().unwrap();
        assert_eq!(closed.closed.as_ref(), Some(&c));
        assert!(s.close_grant(1, &c).unwrap().unwrap_err().contains("was closed at"));
        assert!(s.close_grant(7, &c).unwrap().unwrap_err().contains("no on-demand exception #7"));
        assert_eq!(s.grants(true).unwrap().iter().map(|g| g.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.grants(false).unwrap().len(), 2);
        for sql in ["UPDATE exceptions_opened SET expires = 'x'", "DELETE FROM exceptions_closed"] {
            assert!(s.raw_execute(sql).unwrap_err().to_string().contains("append-only"), "{sql}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn changes_are_audited_and_the_audit_is_append_only() {
        let dir = std::env::temp_dir().join(format!("mdsec-t-lifecycle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Store::open(&dir).unwrap();
        let mac = "58:46:e1:00:00:01";
        s.set_lifecycle(
            mac,
            crate::inventory::lifecycle::State::Active,
            "commissioned",
            "biomed:ana",
            "2026-11-25T10:00:00.000Z",
        )
        .unwrap();
        s.set_lifecycle(
            mac,
            crate::inventory::lifecycle::State::Decommissioned,
            "replaced",
            "biomed:ana",
            "2026-11-25T11:00:00.000Z",
        )
        .unwrap();
        let before = s.audit(None).unwrap();
        let e = s
            .set_lifecycle(
                mac,
                crate::inventory::lifecycle::State::Active,
                "oops",
                "x",
                "2026-11-25T12:00:00.000Z",
            )
            .unwrap_err();
        assert!(matches!(e, crate::inventory::lifecycle::ChangeError::Invalid(_)));
        // The refused change wrote nothing.
        assert_eq!(s.audit(None).unwrap(), before);
        assert_eq!(s.lifecycle().unwrap()[mac].state, crate::inventory::lifecycle::State::Decommissioned);
        assert_eq!(
            before.iter().map(|r| (r.from.as_str(), r.to.as_str())).collect::<Vec<_>>(),
            vec![("onboarding", "active"), ("active", "decommissioned")]
        );
        // The triggers refuse edits and deletes, even by hand.
        for sql in ["UPDATE audit SET reason = 'x'", "DELETE FROM audit"] {
            let err = s.raw_execute(sql).unwrap_err().to_string();
            assert!(err.contains("append-only"), "{err}");
        }
        assert_eq!(s.audit(Some(mac)).unwrap().len(), 2);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

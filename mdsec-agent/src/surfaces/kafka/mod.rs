//! Kafka: this gateway's events, flow records and inventory to a broker the
//! fleet shares (docs/FLEET.md), and the fleet view's reading side.
//!
//! Two threads. `mdsec-kafka-spool` encodes what the agent hands it (events,
//! ended conversations, inventory changes) and appends it to the on-disk
//! [`spool::Spool`]; `mdsec-kafka` reads the spool in order and produces
//! through librdkafka (idempotent, `acks=all`), advancing the spool's
//! delivered mark only over acknowledged messages. Neither can block the
//! datapath or the event store: the hand-over is an unbounded channel whose
//! other end only writes to the page cache.

pub mod config;
pub mod consume;
pub mod fleet;
pub mod producer;
pub mod spool;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use log::warn;
use serde_json::Value;

pub use config::KafkaConfig;

use crate::{
    base::{clock::Anchor, event::Event},
    datapath::state::Ended,
    inventory::doc::DeviceDoc,
    surfaces::eve::{Eve, Format},
};

/// The topics, by their index in a spool record.
pub const EVENTS: u8 = 0;
pub const FLOWS: u8 = 1;
pub const INVENTORY: u8 = 2;
pub const TOPIC_KINDS: [&str; 3] = ["events", "flows", "inventory"];

/// Counters and gauges the metrics read.
pub struct KafkaStats {
    /// Appended to the spool, by topic kind.
    pub spooled: [AtomicU64; 3],
    /// Acknowledged by the broker, by topic kind.
    pub delivered: [AtomicU64; 3],
    /// Deliveries the broker or the client failed (each is sent again).
    pub failed: AtomicU64,
    /// Removed from a full spool before delivery.
    pub dropped: AtomicU64,
    /// Could not be written to the spool (a full or failing disk).
    pub spool_errors: AtomicU64,
    /// In the client, sent and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// In the spool, not yet acknowledged.
    pub pending: AtomicU64,
    pub spool_bytes: AtomicU64,
    /// 1 while the broker answers (a delivery succeeded since the last error).
    pub connected: AtomicU64,
    /// Spool append → acknowledgement (registered into each scrape).
    pub latency: prometheus::Histogram,
    /// The last error the client reported.
    pub last_error: Mutex<Option<String>>,
}

impl Default for KafkaStats {
    fn default() -> Self {
        let opts = prometheus::HistogramOpts::new(
            "mdsec_kafka_delivery_latency_seconds",
            "From a message's append to the spool to the broker's acknowledgement (acks=all).",
        )
        .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0]);
        KafkaStats {
            spooled: Default::default(),
            delivered: Default::default(),
            failed: Default::default(),
            dropped: Default::default(),
            spool_errors: Default::default(),
            in_flight: Default::default(),
            pending: Default::default(),
            spool_bytes: Default::default(),
            connected: Default::default(),
            latency: prometheus::Histogram::with_opts(opts).expect("valid histogram"),
            last_error: Mutex::default(),
        }
    }
}

enum Msg {
    Event(Box<Event>),
    Ended(Arc<Vec<Ended>>),
    Interfaces(HashMap<u32, String>),
    Inventory(Vec<InventoryChange>),
    Flush(mpsc::Sender<()>),
}

/// One device's record changed, or it was decommissioned (a tombstone).
pub enum InventoryChange {
    Upsert(Box<DeviceDoc>),
    Remove(String),
}

/// The agent's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct KafkaSink {
    tx: mpsc::Sender<Msg>,
    producer: Arc<producer::Handle>,
}

impl KafkaSink {
    pub fn event(&self, e: &Event) {
        let _ = self.tx.send(Msg::Event(Box::new(e.clone())));
    }

    pub fn ended(&self, batch: Arc<Vec<Ended>>) {
        let _ = self.tx.send(Msg::Ended(batch));
    }

    pub fn interfaces(&self, names: HashMap<u32, String>) {
        let _ = self.tx.send(Msg::Interfaces(names));
    }

    pub fn inventory(&self, changes: Vec<InventoryChange>) {
        if !changes.is_empty() {
            let _ = self.tx.send(Msg::Inventory(changes));
        }
    }

    /// Waits (at most `timeout`) until everything sent before is in the spool.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Msg::Flush(tx)).is_ok() && rx.recv_timeout(timeout).is_ok()
    }

    /// At the agent's stop: everything into the spool, then up to `timeout`
    /// for the broker to take it (the rest is sent at the next start).
    pub fn stop(&self, timeout: Duration) {
        if !self.flush(Duration::from_secs(10)) {
            warn!("kafka: the spool writer did not finish within 10 s");
        }
        self.producer.stop(timeout);
    }
}

/// A message's JSON object.
enum Body {
    Value(Value),
    /// One line already written (EVE flow records are written, not built).
    Line(String),
}

/// Who this gateway is in every message.
#[derive(Clone)]
pub struct Origin {
    pub site: String,
    pub gateway: String,
}

impl Origin {
    /// Adds `site`, `gateway` and the message's unique `message_id` to a
    /// record (a JSON object, as a value or already one line).
    fn stamp(&self, body: Body, id: &str) -> Vec<u8> {
        let mut line = match body {
            Body::Value(v) => serde_json::to_string(&v).expect("JSON values serialise"),
            Body::Line(l) => l,
        };
        if line.ends_with('}') {
            line.pop();
            let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
            let sep = if line.ends_with('{') { "" } else { "," };
            line.push_str(&format!(
                "{sep}\"site\":{},\"gateway\":{},\"message_id\":{}}}",
                q(&self.site),
                q(&self.gateway),
                q(id)
            ));
        }
        line.into_bytes()
    }
}

/// How long a clean stop waits for the broker to take what is spooled.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the spool (warnings for what it moved aside) and starts both threads.
pub fn spawn(
    cfg: &KafkaConfig,
    state_dir: &std::path::Path,
    eve: Eve,
    stats: Arc<KafkaStats>,
) -> anyhow::Result<KafkaSink> {
    let dir = cfg.spool_dir(state_dir);
    let (spool, warnings) = spool::Spool::open(&dir, cfg.spool.max_mb << 20)
        .map_err(|e| anyhow::anyhow!("kafka spool {}: {e}", dir.display()))?;
    for w in warnings {
        warn!("kafka spool: {w}");
    }
    let origin = Origin { site: cfg.site.clone(), gateway: cfg.gateway() };
    let spool = Arc::new(Mutex::new(spool));
    let wake = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let producer =
        producer::spawn(cfg, origin.clone(), spool.clone(), wake.clone(), stats.clone(), STOP_TIMEOUT)?;
    let (tx, rx) = mpsc::channel::<Msg>();
    let format = cfg.event_format;
    let flows = cfg.topics.flows.is_some();
    let inventory = cfg.topics.inventory.is_some();
    std::thread::Builder::new().name("mdsec-kafka-spool".into()).spawn(move || {
        let mut w = Writer { spool, origin, stats, wake, warned: None, unflushed: [0; 3] };
        let mut ifnames: HashMap<u32, String> = HashMap::new();
        for msg in rx {
            match msg {
                Msg::Event(e) => {
                    let v = match format {
                        Format::Eve => eve.alert(&e),
                        Format::Native => serde_json::to_value(&*e).expect("events serialise"),
                    };
                    w.append(EVENTS, None, Some(Body::Value(v)));
                }
                Msg::Ended(batch) if flows => {
                    let name = |i: u32| ifnames.get(&i).cloned().unwrap_or_else(|| i.to_string());
                    let anchor = Anchor::now();
                    for f in batch.iter() {
                        let mut line = String::new();
                        eve.flow_line(f, &name, &anchor, &mut line);
                        w.append(FLOWS, None, Some(Body::Line(line)));
                    }
                }
                Msg::Ended(_) => {}
                Msg::Interfaces(n) => ifnames = n,
                Msg::Inventory(changes) if inventory => {
                    for c in changes {
                        match c {
                            InventoryChange::Upsert(d) => {
                                let key = d.mac.clone();
                                w.append(
                                    INVENTORY,
                                    Some(&key),
                                    Some(Body::Value(serde_json::to_value(&*d).expect("devices serialise"))),
                                );
                            }
                            InventoryChange::Remove(mac) => w.append(INVENTORY, Some(&mac), None),
                        }
                    }
                }
                Msg::Inventory(_) => {}
                Msg::Flush(done) => {
                    w.flush();
                    let _ = done.send(());
                    continue;
                }
            }
            w.flush();
        }
    })?;
    Ok(KafkaSink { tx, producer: Arc::new(producer) })
}

/// The spool thread's side: encode, append, wake the producer.
struct Writer {
    spool: Arc<Mutex<spool::Spool>>,
    origin: Origin,
    stats: Arc<KafkaStats>,
    wake: producer::Wake,
    warned: Option<Instant>,
    /// Appended but still in this process's buffer: counted as spooled once
    /// they reach the kernel (which a kill -9 does not undo).
    unflushed: [u64; 3],
}

impl Writer {
    /// `key_mac`: the inventory's `site/MAC` key; events and flows are keyed
    /// `site/gateway` (one gateway's records stay in order in one partition).
    fn append(&mut self, kind: u8, key_mac: Option<&str>, v: Option<Body>) {
        let key = match key_mac {
            Some(mac) => format!("{}/{mac}", self.origin.site),
            None => format!("{}/{}", self.origin.site, self.origin.gateway),
        };
        let mut s = self.spool.lock().unwrap();
        let id = s.next_id();
        let value = v.map(|v| self.origin.stamp(v, &id));
        let before = s.dropped;
        match s.append(kind, key.as_bytes(), value.as_deref()) {
            Ok(_) => self.unflushed[kind as usize] += 1,
            Err(e) => {
                self.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
                if self.warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!("kafka spool {}: appending failed: {e}", s.dir().display());
                    self.warned = Some(Instant::now());
                }
            }
        }
        let dropped = s.dropped - before;
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        self.stats.pending.store(s.pending(), Ordering::Relaxed);
        self.stats.spool_bytes.store(s.bytes(), Ordering::Relaxed);
    }

    fn flush(&mut self) {
        let unflushed = std::mem::take(&mut self.unflushed);
        match self.spool.lock().unwrap().flush() {
            Ok(()) => {
                for (c, n) in self.stats.spooled.iter().zip(unflushed) {
                    c.fetch_add(n, Ordering::Relaxed);
                }
            }
            Err(e) => {
                self.stats.spool_errors.fetch_add(unflushed.iter().sum(), Ordering::Relaxed);
                warn!("kafka spool: writing failed: {e}");
            }
        }
        producer::wake(&self.wake);
    }
}

/// What changed in the inventory since the last pass, for the compacted
/// topic: a device whose record differs in anything but its counters and
/// last-seen time, or that was not published for `refresh`; a tombstone for
/// each decommissioned one.
#[derive(Default)]
pub struct InventoryPublisher {
    /// MAC → (the record as last published without counters, when).
    sent: HashMap<String, (DeviceDoc, SystemTime)>,
}

impl InventoryPublisher {
    pub fn changes(
        &mut self,
        devices: &[crate::inventory::Device],
        refresh: Duration,
        now: SystemTime,
    ) -> Vec<InventoryChange> {
        let mut out = Vec::new();
        for d in devices {
            let doc = DeviceDoc::from(d);
            let mac = doc.mac.clone();
            if d.lifecycle == crate::inventory::lifecycle::State::Decommissioned {
                if self.sent.remove(&mac).is_some() || !self.tombstoned(&mac) {
                    out.push(InventoryChange::Remove(mac.clone()));
                }
                self.sent.insert(format!("-{mac}"), (DeviceDoc::default(), now));
                continue;
            }
            self.sent.remove(&format!("-{mac}"));
            let key = without_counters(&doc);
            let due = match self.sent.get(&mac) {
                Some((last, at)) => *last != key || now.duration_since(*at).unwrap_or_default() >= refresh,
                None => true,
            };
            if due {
                self.sent.insert(mac, (key, now));
                out.push(InventoryChange::Upsert(Box::new(doc)));
            }
        }
        out
    }

    fn tombstoned(&self, mac: &str) -> bool {
        self.sent.contains_key(&format!("-{mac}"))
    }
}

/// The record as compared between passes: what does not change with every packet.
fn without_counters(d: &DeviceDoc) -> DeviceDoc {
    DeviceDoc { packets: 0, bytes: 0, last_seen: String::new(), peers: Vec::new(), ..d.clone() }
}

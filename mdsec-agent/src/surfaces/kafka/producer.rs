//! The `mdsec-kafka` thread: reads the spool in order, produces through
//! librdkafka, and moves the spool's delivered mark over what the broker
//! acknowledged (`acks=all`, idempotent: the broker drops the client's own
//! retries, so in-order delivery within a partition holds).
//!
//! A failed delivery (the broker gone for longer than the client's message
//! timeout, a refused topic) rewinds the reader to the first unacknowledged
//! message once nothing is in flight, and everything from there is sent again
//! after a back-off: at least once, duplicates carry their first `message_id`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use rdkafka::{
    ClientConfig, ClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
};

use super::{KafkaConfig, KafkaStats, Origin, spool::Spool};

/// The writer's nudge: something was appended.
pub type Wake = Arc<(Mutex<bool>, Condvar)>;

pub fn wake(w: &Wake) {
    *w.0.lock().unwrap() = true;
    w.1.notify_one();
}

/// Messages handed to the client and not yet acknowledged, at most: bounds
/// the client's memory while the spool holds the rest on disk.
const WINDOW: usize = 10_000;

struct Ctx {
    acks: Mutex<Vec<(u64, Result<(), String>)>>,
    stats: Arc<KafkaStats>,
    warned: Mutex<Option<Instant>>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        self.stats.connected.store(0, Ordering::Relaxed);
        let text = describe(&error, reason);
        *self.stats.last_error.lock().unwrap() = Some(text.clone());
        let mut w = self.warned.lock().unwrap();
        if w.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            warn!("kafka: {text} (messages stay in the spool until the broker takes them)");
            *w = Some(Instant::now());
        }
    }
}

/// The client's error with what an operator does about it.
fn describe(error: &KafkaError, reason: &str) -> String {
    let code = error.rdkafka_error_code();
    let hint = match code {
        Some(RDKafkaErrorCode::Authentication) | Some(RDKafkaErrorCode::SaslAuthenticationFailed) => {
            " — the broker refused the credentials (kafka.client sasl.*)"
        }
        Some(RDKafkaErrorCode::TopicAuthorizationFailed)
        | Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => " — the broker's ACLs refuse this client",
        Some(RDKafkaErrorCode::UnknownTopic) | Some(RDKafkaErrorCode::UnknownTopicOrPartition) => {
            " — create the topic on the broker (docs/FLEET.md)"
        }
        Some(RDKafkaErrorCode::AllBrokersDown) => " — no broker of kafka.brokers answers",
        _ => "",
    };
    if reason.is_empty() { format!("{error}{hint}") } else { format!("{reason}{hint}") }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, r: &DeliveryResult<'_>, seq: usize) {
        let outcome = match r {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(describe(e, "")),
        };
        self.acks.lock().unwrap().push((seq as u64, outcome));
    }
}

/// The client configuration: the operator's properties, then mdsec's own.
fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", format!("mdsec-{}", cfg.gateway()));
    // A broker back within seconds is used within seconds (librdkafka's default is 10 s).
    c.set("reconnect.backoff.max.ms", "2000");
    c.set("linger.ms", "20");
    // Long enough to ride out a broker restart without a rewind; the spool
    // holds everything beyond it anyway.
    c.set("message.timeout.ms", "120000");
    for (k, v) in &cfg.client {
        c.set(k, v);
    }
    c.set("bootstrap.servers", cfg.brokers.join(","));
    c.set("enable.idempotence", "true");
    c.set("acks", "all");
    c
}

/// What `check` asks librdkafka: does it accept every property and value?
pub fn client_check(cfg: &KafkaConfig) -> Result<(), String> {
    let ctx = Ctx { acks: Mutex::default(), stats: Arc::default(), warned: Mutex::default() };
    client_config(cfg).create_with_context::<_, BaseProducer<Ctx>>(ctx).map(drop).map_err(|e| match e {
        KafkaError::ClientCreation(m) => m,
        e => e.to_string(),
    })
}

/// The running producer's handle (the agent's stop waits for it).
pub struct Handle {
    stop: Arc<AtomicBool>,
    wake: Wake,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    /// Gives the producer up to `timeout` to deliver what is spooled, then
    /// records the delivered mark; what is left is sent at the next start.
    pub fn stop(&self, timeout: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        wake(&self.wake);
        let deadline = Instant::now() + timeout;
        if let Some(t) = self.thread.lock().unwrap().take() {
            while !t.is_finished() && Instant::now() < deadline + Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

pub fn spawn(
    cfg: &KafkaConfig,
    origin: Origin,
    spool: Arc<Mutex<Spool>>,
    wake: Wake,
    stats: Arc<KafkaStats>,
    stop_timeout: Duration,
) -> anyhow::Result<Handle> {
    let ctx = Ctx { acks: Mutex::default(), stats: stats.clone(), warned: Mutex::default() };
    let producer: BaseProducer<Ctx> =
        client_config(cfg).create_with_context(ctx).map_err(|e| anyhow::anyhow!("kafka client: {e}"))?;
    let topics = cfg.topics.by_kind();
    let stop = Arc::new(AtomicBool::new(false));
    let mut run = Run {
        producer,
        topics,
        origin,
        spool,
        wake: wake.clone(),
        stats,
        inflight: BTreeMap::new(),
        held: None,
        failed_at: None,
        backoff: Duration::from_secs(1),
        resume_at: None,
        stop: stop.clone(),
        stop_timeout,
    };
    let thread = std::thread::Builder::new().name("mdsec-kafka".into()).spawn(move || run.run())?;
    Ok(Handle { stop, wake, thread: Mutex::new(Some(thread)) })
}

struct Run {
    producer: BaseProducer<Ctx>,
    topics: [Option<String>; 3],
    origin: Origin,
    spool: Arc<Mutex<Spool>>,
    wake: Wake,
    stats: Arc<KafkaStats>,
    /// Sent, not acknowledged: seq → (topic kind, spooled at, ms).
    inflight: BTreeMap<u64, (u8, u64)>,
    /// Read but refused by a full client queue: sent first next time.
    held: Option<super::spool::Record>,
    /// The first failed delivery since the last rewind.
    failed_at: Option<u64>,
    backoff: Duration,
    resume_at: Option<Instant>,
    stop: Arc<AtomicBool>,
    stop_timeout: Duration,
}

impl Run {
    fn run(&mut self) {
        let mut stop_deadline = None;
        loop {
            self.producer.poll(Duration::from_millis(if self.inflight.is_empty() { 0 } else { 10 }));
            self.settle();
            if self.stop.load(Ordering::Relaxed) {
                let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + self.stop_timeout);
                let pending = self.spool.lock().unwrap().pending();
                if pending == 0 || Instant::now() >= deadline {
                    if pending > 0 {
                        info!("kafka: {pending} messages stay in the spool for the next start");
                    }
                    let _ = self.spool.lock().unwrap().sync();
                    return;
                }
            }
            if let Some(t) = self.resume_at {
                if Instant::now() < t {
                    self.idle(t - Instant::now());
                    continue;
                }
                self.resume_at = None;
            }
            let sent = self.send_more();
            if self.inflight.is_empty() && sent == 0 {
                self.idle(Duration::from_millis(100));
            }
        }
    }

    /// Waits for the writer's nudge (or the stop), at most `d`.
    fn idle(&self, d: Duration) {
        let (m, cv) = &*self.wake;
        let g = m.lock().unwrap();
        let (mut g, _) =
            cv.wait_timeout_while(g, d, |woken| !*woken && !self.stop.load(Ordering::Relaxed)).unwrap();
        *g = false;
    }

    /// Takes the acknowledgements, moves the delivered mark, rewinds after a failure.
    fn settle(&mut self) {
        let acks = std::mem::take(&mut *self.producer.context().acks.lock().unwrap());
        let now = now_ms();
        for (seq, outcome) in acks {
            let Some((kind, at)) = self.inflight.remove(&seq) else { continue };
            match outcome {
                Ok(()) => {
                    self.stats.delivered[kind as usize].fetch_add(1, Ordering::Relaxed);
                    self.stats.connected.store(1, Ordering::Relaxed);
                    let secs = now.saturating_sub(at) as f64 / 1000.0;
                    self.stats.latency.observe(secs);
                    self.backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    if self.failed_at.is_none() {
                        warn!("kafka: delivery failed ({e}); sending again from the spool");
                        *self.stats.last_error.lock().unwrap() = Some(e);
                    }
                    self.failed_at = Some(self.failed_at.map_or(seq, |f| f.min(seq)));
                }
            }
        }
        let mut spool = self.spool.lock().unwrap();
        let mut mark = spool.read_position();
        if let Some(h) = &self.held {
            mark = mark.min(h.seq);
        }
        if let Some((&first, _)) = self.inflight.first_key_value() {
            mark = mark.min(first);
        }
        if let Some(f) = self.failed_at {
            mark = mark.min(f);
        }
        if let Err(e) = spool.delivered(mark) {
            warn!("kafka spool: recording deliveries failed: {e}");
        }
        if self.failed_at.is_some() && self.inflight.is_empty() {
            spool.rewind();
            self.held = None;
            self.failed_at = None;
            self.resume_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
        }
        self.stats.in_flight.store(self.inflight.len() as u64, Ordering::Relaxed);
        self.stats.pending.store(spool.pending(), Ordering::Relaxed);
        self.stats.spool_bytes.store(spool.bytes(), Ordering::Relaxed);
    }

    /// Hands the client what the window allows; returns how many.
    fn send_more(&mut self) -> usize {
        let mut sent = 0;
        while self.inflight.len() < WINDOW && self.failed_at.is_none() {
            let rec = match self.held.take() {
                Some(r) => r,
                None => match self.spool.lock().unwrap().read_next() {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        warn!("kafka spool: reading failed: {e}");
                        self.resume_at = Some(Instant::now() + Duration::from_secs(1));
                        break;
                    }
                },
            };
            // A topic switched off since the message was spooled: nothing to send it to.
            let Some(topic) = self.topics.get(rec.topic as usize).cloned().flatten() else { continue };
            let id = self.spool.lock().unwrap().id_of(rec.seq);
            let headers = OwnedHeaders::new()
                .insert(Header { key: "site", value: Some(self.origin.site.as_str()) })
                .insert(Header { key: "gateway", value: Some(self.origin.gateway.as_str()) })
                .insert(Header { key: "message_id", value: Some(id.as_str()) });
            let mut record =
                BaseRecord::with_opaque_to(&topic, rec.seq as usize).key(&rec.key[..]).headers(headers);
            if let Some(v) = &rec.value {
                record = record.payload(&v[..]);
            }
            match self.producer.send(record) {
                Ok(()) => {
                    self.inflight.insert(rec.seq, (rec.topic, rec.at_ms));
                    sent += 1;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.held = Some(rec);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    // Never deliverable: counted and passed over, or it would stop the queue.
                    warn!("kafka: message {id} is larger than the client's message.max.bytes; dropped");
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err((e, _)) => {
                    warn!("kafka: the client refused message {id}: {}", describe(&e, ""));
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    self.failed_at = Some(rec.seq);
                    break;
                }
            }
        }
        sent
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

//! Reads the fleet's topics from their beginning to their current end into a
//! [`FleetView`] (read-only: no consumer group offsets are committed, so
//! reading changes nothing on the broker).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};

use super::fleet::FleetView;

/// Where the fleet reads.
pub struct Source {
    pub brokers: String,
    pub inventory_topic: String,
    pub events_topic: Option<String>,
    /// librdkafka properties (TLS, SASL), as the agent's `kafka.client`.
    pub client: Vec<(String, String)>,
    pub timeout: Duration,
}

pub fn snapshot(src: &Source) -> Result<FleetView> {
    let mut cfg = ClientConfig::new();
    for (k, v) in &src.client {
        cfg.set(k, v);
    }
    cfg.set("bootstrap.servers", &src.brokers)
        .set("group.id", "mdsec-fleet")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    let c: BaseConsumer = cfg.create().context("kafka client")?;
    let mut view = FleetView::default();
    read(&c, &src.inventory_topic, src.timeout, |m| {
        view.inventory(m.key().unwrap_or_default(), m.payload())
    })?;
    if let Some(t) = &src.events_topic {
        read(&c, t, src.timeout, |m| view.event(m.payload()))?;
    }
    Ok(view)
}

/// Every message of `topic` up to its high watermarks at the start.
fn read(
    c: &BaseConsumer,
    topic: &str,
    timeout: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage),
) -> Result<()> {
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("kafka: metadata of topic {topic}"))?;
    let Some(t) = md.topics().first() else { bail!("kafka: no topic {topic}") };
    if let Some(e) = t.error() {
        bail!("kafka: topic {topic}: {}", rdkafka::error::RDKafkaErrorCode::from(e));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in t.partitions() {
        let (low, high) =
            c.fetch_watermarks(topic, p.id(), timeout).with_context(|| format!("kafka: {topic} offsets"))?;
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    c.assign(&tpl)?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut quiet = Instant::now();
    while ends.iter().any(|(p, h)| next.get(p).copied().unwrap_or(0) < *h) {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                next.insert(m.partition(), m.offset() + 1);
                each(&m);
                quiet = Instant::now();
            }
            Some(Err(e)) => bail!("kafka: reading {topic}: {e}"),
            None if quiet.elapsed() > timeout => {
                bail!("kafka: reading {topic} stalled at {next:?} of {ends:?}")
            }
            None => {}
        }
    }
    c.unassign()?;
    Ok(())
}

//! The Kafka bus (rdkafka / librdkafka).
//!
//! * Producer: idempotent, `acks=all`, records keyed by device DID so one
//!   device stays in one partition; `message.timeout.ms=0`, so a reading
//!   waits (and intake slows) while Kafka is down instead of being dropped.
//!   A full local queue waits too (backpressure).
//! * Consumer: the attestor is *assigned* its partitions explicitly (one
//!   attestor per partition set, like a StatefulSet ordinal) and starts each
//!   at the offset stored with its durable log. Group offsets are committed
//!   after the state is durable, for lag monitoring.
//!
//! Topics: `vitals.verified` (readings), `vitals.rejected` (dead letters,
//! JSON), and [`crate::logged`]'s `vitals.logged`.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{CommitMode, Consumer, DefaultConsumerContext, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use vitaltrail_core::busauth::BusKey;

use crate::deadletter::Rejection;
use crate::{Delivery, Error, Outcome, PartitionSource, Producer, Record, Result};

/// Topic of verified readings.
pub const VERIFIED_TOPIC: &str = "vitals.verified";
/// Topic of rejected readings.
pub const REJECTED_TOPIC: &str = "vitals.rejected";
/// The device registry, compacted: key = DID, value = the device's entry
/// (JSON, see `vitaltrail_bus::registry::DeviceEntry`). Every ingest and
/// attestor process reads it from the start and follows it.
pub const DEVICES_TOPIC: &str = "vitals.devices";
/// Signed checkpoints: key = log origin, value = JSON
/// `{partition, origin, size, time_ms, note}`.
pub const CHECKPOINTS_TOPIC: &str = "vitals.checkpoints";
/// Alarm events, written by the alert engines: key = patient, value = the
/// event's line of the engine's events file (`docs/alerts.md`).
pub const ALERTS_TOPIC: &str = "alerts";

/// Typed Kafka settings.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Partitions of `vitals.verified` when this process creates it.
    pub partitions: i32,
    /// Consumer group of the attestors.
    pub group_id: String,
    /// The key of the MAC on `vitals.verified` records (ingest adds it, the
    /// attestor checks it). `None` disables both: any producer can then
    /// append to the log.
    pub bus_key: Option<BusKey>,
    /// Further librdkafka client properties for every client of the
    /// pipeline, e.g. `security.protocol=SASL_SSL`, `sasl.mechanisms=SCRAM-SHA-512`,
    /// `sasl.username`, `sasl.password`, `ssl.ca.location` (values may be
    /// secrets: never logged).
    pub client: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("partitions", &self.partitions)
            .field("group_id", &self.group_id)
            .field("bus_key", &self.bus_key)
            .field(
                "client",
                &self.client.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            partitions: 4,
            group_id: "vitaltrail-attestor".into(),
            bus_key: None,
            client: vec![],
        }
    }
}

impl KafkaConfig {
    /// A librdkafka client configuration with the brokers and the extra
    /// client properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// Name of the header carrying a record's MAC.
pub const MAC_HEADER: &str = "vt-mac";

pub(crate) fn kerr(e: rdkafka::error::KafkaError) -> Error {
    match e {
        // librdkafka's message names the value, which may be a secret
        // (`sasl.password`): name the property only.
        rdkafka::error::KafkaError::ClientConfig(_, _, key, _) => Error::Kafka(format!(
            "librdkafka refused the client property {key:?} (unknown, or a bad value; the value is not shown)"
        )),
        e => Error::Kafka(e.to_string()),
    }
}

/// Create the pipeline's topics that do not exist yet (`vitals.verified`
/// and `vitals.logged` with `cfg.partitions` partitions, and the
/// one-partition topics).
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<()> {
    create_topics(
        cfg,
        &[
            NewTopic::new(VERIFIED_TOPIC, cfg.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(REJECTED_TOPIC, 1, TopicReplication::Fixed(1)),
            registry_topic(),
            NewTopic::new(CHECKPOINTS_TOPIC, 1, TopicReplication::Fixed(1)),
            NewTopic::new(
                crate::logged::LOGGED_TOPIC,
                cfg.partitions,
                TopicReplication::Fixed(1),
            ),
        ],
    )
    .await
}

/// Create only `vitals.devices` if it does not exist (what a registry
/// client needs; it must not decide how many partitions the readings get).
pub async fn ensure_registry_topic(cfg: &KafkaConfig) -> Result<()> {
    create_topics(cfg, &[registry_topic()]).await
}

fn registry_topic() -> NewTopic<'static> {
    NewTopic::new(DEVICES_TOPIC, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact")
}

/// Create `alerts` (the configured partition count) if it does not exist.
pub async fn ensure_alerts_topic(cfg: &KafkaConfig) -> Result<()> {
    create_topics(
        cfg,
        &[NewTopic::new(
            ALERTS_TOPIC,
            cfg.partitions,
            TopicReplication::Fixed(1),
        )],
    )
    .await
}

pub(crate) async fn create_topics(cfg: &KafkaConfig, topics: &[NewTopic<'_>]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = cfg.client_config().create().map_err(kerr)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(topics.iter(), &opts)
        .await
        .map_err(kerr)?
    {
        match r {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(Error::Kafka(format!("creating topic {t}: {code}"))),
        }
    }
    Ok(())
}

/// The producing end (ingest, and registry and checkpoint publishers).
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
    bus_key: Option<BusKey>,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("in_flight", &self.producer.in_flight_count())
            .finish()
    }
}

impl KafkaProducer {
    /// An idempotent, `acks=all` producer.
    pub fn new(cfg: &KafkaConfig) -> Result<Self> {
        let producer: FutureProducer = cfg
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", "0")
            .set("queue.buffering.max.messages", "100000")
            .create()
            .map_err(kerr)?;
        Ok(KafkaProducer {
            producer,
            bus_key: cfg.bus_key.clone(),
        })
    }

    pub(crate) fn inner(&self) -> &FutureProducer {
        &self.producer
    }

    /// Produce one keyed record and wait until Kafka has it.
    pub async fn send_to(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Timeout::Never,
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| kerr(e))
    }

    /// Produce one keyed record with headers and wait until Kafka has it.
    pub async fn send_with_headers(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<()> {
        let mut h = rdkafka::message::OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(rdkafka::message::Header {
                key: k,
                value: Some(*v),
            });
        }
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload).headers(h),
                Timeout::Never,
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| kerr(e))
    }

    /// Produce rejections to `vitals.rejected` and wait for all of them.
    pub async fn send_rejections(&self, rejections: Vec<Rejection>) -> Result<()> {
        let sends = rejections.iter().map(|r| {
            let json = serde_json::to_vec(r).unwrap_or_default();
            let key = r.device.clone().unwrap_or_default();
            async move {
                self.producer
                    .send(
                        FutureRecord::to(REJECTED_TOPIC).key(&key).payload(&json),
                        Timeout::Never,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| kerr(e))
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
        Ok(())
    }
}

impl Producer for KafkaProducer {
    async fn send(&self, record: Record) -> Result<Outcome> {
        let received = record.received_ms.to_be_bytes();
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "received_ms",
            value: Some(&received[..]),
        });
        let mac = self
            .bus_key
            .as_ref()
            .map(|k| k.mac(&record.key, record.received_ms, &record.payload));
        if let Some(mac) = &mac {
            headers = headers.insert(Header {
                key: MAC_HEADER,
                value: Some(&mac[..]),
            });
        }
        let fr = FutureRecord::to(VERIFIED_TOPIC)
            .key(&record.key)
            .payload(&record.payload)
            .headers(headers);
        let d = self
            .producer
            .send(fr, Timeout::Never)
            .await
            .map_err(|(e, _)| kerr(e))?;
        Ok(Outcome::Accepted {
            partition: d.partition as u32,
        })
    }

    fn queue_depth(&self) -> usize {
        self.producer.in_flight_count().max(0) as usize
    }
}

/// A consumer assigned a fixed set of partitions, each read separately.
pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer").finish()
    }
}

/// How many partitions `topic` has, from the cluster's metadata.
pub fn topic_partitions(cfg: &KafkaConfig, topic: &str) -> Result<u32> {
    let consumer: rdkafka::consumer::BaseConsumer = cfg.client_config().create().map_err(kerr)?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kerr)?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| Error::Kafka(format!("topic {topic} is not in the metadata")))?;
    if let Some(e) = t.error() {
        return Err(Error::Kafka(format!("topic {topic}: {e:?}")));
    }
    Ok(t.partitions().len() as u32)
}

impl KafkaConsumer {
    /// Assign `topic` partitions, each starting at the given offset (`None`:
    /// from the beginning), and return one source per partition. The main
    /// queue is served by a background task, as rdkafka requires.
    pub fn assign(
        cfg: &KafkaConfig,
        topic: &str,
        starts: &[(u32, Option<u64>)],
    ) -> Result<(Self, Vec<KafkaPartition>)> {
        let consumer: StreamConsumer<DefaultConsumerContext> = cfg
            .client_config()
            .set("group.id", &cfg.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Readings wait for the log, not for a fuller fetch.
            .set("fetch.wait.max.ms", "5")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(kerr)?;
        let consumer = Arc::new(consumer);
        let mut tpl = TopicPartitionList::new();
        for (p, start) in starts {
            let off = match start {
                Some(o) => Offset::Offset(*o as i64),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(topic, *p as i32, off)
                .map_err(kerr)?;
        }
        consumer.assign(&tpl).map_err(kerr)?;
        let mut parts = Vec::new();
        for (p, _) in starts {
            let queue = consumer
                .split_partition_queue(topic, *p as i32)
                .ok_or_else(|| Error::Kafka(format!("cannot split partition {p} of {topic}")))?;
            parts.push(KafkaPartition {
                partition: *p,
                topic: topic.to_owned(),
                queue,
                consumer: consumer.clone(),
                // Only ingest's readings carry a MAC.
                bus_key: (topic == VERIFIED_TOPIC)
                    .then(|| cfg.bus_key.clone())
                    .flatten(),
            });
        }
        let main = consumer.clone();
        tokio::spawn(async move {
            // Serves events (rebalances, errors, commits); every message goes
            // to a partition queue.
            loop {
                if let Err(e) = main.recv().await {
                    tracing::warn!(error = %e, "kafka consumer event");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Ok((KafkaConsumer { consumer }, parts))
    }
}

/// One assigned partition.
pub struct KafkaPartition {
    partition: u32,
    topic: String,
    queue: StreamPartitionQueue<DefaultConsumerContext>,
    consumer: Arc<StreamConsumer>,
    bus_key: Option<BusKey>,
}

impl std::fmt::Debug for KafkaPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPartition")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .finish()
    }
}

fn to_delivery(m: &rdkafka::message::BorrowedMessage<'_>, bus_key: Option<&BusKey>) -> Delivery {
    let header = |name: &str| {
        m.headers()
            .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
    };
    let received_ms = header("received_ms")
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    let record = Record {
        key: m
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default(),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        received_ms,
    };
    let authentic = match bus_key {
        None => true,
        Some(k) => header(MAC_HEADER).is_some_and(|mac| {
            m.key().is_some_and(|raw| raw == record.key.as_bytes())
                && k.check(&record.key, received_ms, &record.payload, mac)
        }),
    };
    Delivery {
        partition: m.partition() as u32,
        offset: m.offset().max(0) as u64,
        record,
        authentic,
        ack: None,
    }
}

impl PartitionSource for KafkaPartition {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn next_batch(&mut self, max: usize, out: &mut Vec<Delivery>) -> Result<bool> {
        loop {
            match self.queue.recv().await {
                Ok(m) => {
                    out.push(to_delivery(&m, self.bus_key.as_ref()));
                    break;
                }
                Err(e) => {
                    // Broker down or similar: librdkafka reconnects; keep waiting.
                    tracing::warn!(error = %e, partition = self.partition, "kafka receive");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        while out.len() < max {
            match self.queue.recv().now_or_never() {
                Some(Ok(m)) => out.push(to_delivery(&m, self.bus_key.as_ref())),
                _ => break,
            }
        }
        Ok(true)
    }

    fn durable_offsets(&self) -> bool {
        true
    }

    async fn commit(&mut self, next: u64) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.topic,
            self.partition as i32,
            Offset::Offset(next as i64),
        )
        .map_err(kerr)?;
        self.consumer.commit(&tpl, CommitMode::Async).map_err(kerr)
    }
}

/// Read a one-partition topic from its beginning and keep following it:
/// `apply(key, value)` runs for every record, in order. Returns once
/// everything that was in the topic when it was called has been applied
/// (so a caller starts from a complete view); following goes on in the
/// returned task. No consumer group offsets are committed.
pub async fn follow_topic(
    cfg: &KafkaConfig,
    topic: &str,
    mut apply: impl FnMut(&[u8], Option<&[u8]>) + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>> {
    let group = format!(
        "vitaltrail-follow-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let consumer: StreamConsumer = cfg
        .client_config()
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(kerr)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(kerr)?;
    consumer.assign(&tpl).map_err(kerr)?;
    let topic_name = topic.to_owned();
    let c = Arc::new(consumer);
    let high = {
        let c = c.clone();
        let t = topic_name.clone();
        tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, 0, Duration::from_secs(10)))
            .await
            .map_err(|e| Error::Kafka(e.to_string()))?
            .map_err(kerr)?
            .1
    };
    // One loop applies everything; it says when it has passed `high`.
    let (tx, ready) = tokio::sync::oneshot::channel();
    let mut caught_up = Some(tx);
    if high <= 0
        && let Some(tx) = caught_up.take()
    {
        let _ = tx.send(());
    }
    let task = tokio::spawn(async move {
        loop {
            match c.recv().await {
                Ok(m) => {
                    apply(m.key().unwrap_or_default(), m.payload());
                    if m.offset() + 1 >= high
                        && let Some(tx) = caught_up.take()
                    {
                        let _ = tx.send(());
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, topic = %topic_name, "kafka receive");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    ready
        .await
        .map_err(|_| Error::Kafka(format!("following {topic} stopped before catching up")))?;
    Ok(task)
}

impl KafkaConsumer {
    /// The underlying consumer (for metrics and tests).
    pub fn inner(&self) -> &StreamConsumer {
        &self.consumer
    }
}

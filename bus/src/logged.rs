//! `vitals.logged`: the attestor announces every leaf once it is durable
//! in its log, for the alert engine, which may run on another machine.
//! Specified in `docs/kafka-topics.md`.
//!
//! - key: the patient the device was registered to when the leaf was
//!   announced (the device DID if the registry no longer knows it), so one
//!   engine sees all of a patient's devices;
//! - value: the leaf, byte for byte as in the log;
//! - header `vt-log`: `u32be(log partition) ‖ u64be(leaf index)`;
//! - header `vt-mac`: [`LoggedKey::mac`] over all of it.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use vitaltrail_core::busauth::LoggedKey;

use crate::kafka::{KafkaConfig, KafkaProducer, MAC_HEADER, kerr};
use crate::{Error, Result};

/// The topic.
pub const LOGGED_TOPIC: &str = "vitals.logged";
/// The header naming the leaf's log partition and index.
pub const LOG_HEADER: &str = "vt-log";

/// One leaf to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedLeaf {
    /// The log partition.
    pub partition: u32,
    /// Its index in that log.
    pub index: u64,
    /// The record key (patient, or DID).
    pub key: String,
    /// The leaf bytes.
    pub leaf: Vec<u8>,
}

impl KafkaProducer {
    /// Announce `leaves` on `vitals.logged` and wait until Kafka has every
    /// one. The producer is idempotent and never times a record out, so the
    /// records of one topic partition arrive in the order given.
    pub async fn send_logged(&self, key: &LoggedKey, leaves: &[LoggedLeaf]) -> Result<()> {
        let sends = leaves.iter().map(|l| {
            let mut pos = [0u8; 12];
            pos[..4].copy_from_slice(&l.partition.to_be_bytes());
            pos[4..].copy_from_slice(&l.index.to_be_bytes());
            let mac = key.mac(&l.key, l.partition, l.index, &l.leaf);
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: LOG_HEADER,
                    value: Some(&pos[..]),
                })
                .insert(Header {
                    key: MAC_HEADER,
                    value: Some(&mac[..]),
                });
            let fr = FutureRecord::to(LOGGED_TOPIC)
                .key(&l.key)
                .payload(&l.leaf)
                .headers(headers);
            self.inner().send(fr, Timeout::Never)
        });
        for r in futures::future::join_all(sends).await {
            r.map_err(|(e, _)| kerr(e))?;
        }
        Ok(())
    }
}

/// Create `vitals.logged` (with the configured partition count) if it
/// does not exist; an alert engine creates no other topic, so it never
/// decides how many partitions the readings get.
pub async fn ensure_logged_topic(cfg: &KafkaConfig) -> Result<()> {
    crate::kafka::create_topics(
        cfg,
        &[rdkafka::admin::NewTopic::new(
            LOGGED_TOPIC,
            cfg.partitions,
            rdkafka::admin::TopicReplication::Fixed(1),
        )],
    )
    .await
}

/// One announcement as consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// Its `vitals.logged` partition.
    pub topic_partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// The record key.
    pub key: String,
    /// The log partition and leaf index it names (`None`: no well-formed
    /// `vt-log` header).
    pub position: Option<(u32, u64)>,
    /// The leaf.
    pub leaf: Vec<u8>,
    /// Whether its MAC checks out under the logged key.
    pub authentic: bool,
}

/// A consumer of assigned `vitals.logged` partitions.
pub struct LoggedConsumer {
    consumer: Arc<StreamConsumer>,
    key: LoggedKey,
}

impl std::fmt::Debug for LoggedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedConsumer").finish_non_exhaustive()
    }
}

impl LoggedConsumer {
    /// Assign `vitals.logged` partitions, each from the given offset
    /// (`None`: the earliest Kafka still holds), in consumer group `group`
    /// (offsets are committed there only for lag monitoring).
    pub fn assign(
        cfg: &KafkaConfig,
        group: &str,
        key: LoggedKey,
        starts: &[(u32, Option<u64>)],
    ) -> Result<Self> {
        let consumer: StreamConsumer = cfg
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(kerr)?;
        let mut tpl = TopicPartitionList::new();
        for (p, start) in starts {
            let off = start.map_or(Offset::Beginning, |o| Offset::Offset(o as i64));
            tpl.add_partition_offset(LOGGED_TOPIC, *p as i32, off)
                .map_err(kerr)?;
        }
        consumer.assign(&tpl).map_err(kerr)?;
        Ok(LoggedConsumer {
            consumer: Arc::new(consumer),
            key,
        })
    }

    fn decode(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Announced {
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
        };
        let position = header(LOG_HEADER)
            .and_then(|v| <[u8; 12]>::try_from(v).ok())
            .map(|v| {
                let mut p = [0u8; 4];
                let mut i = [0u8; 8];
                p.copy_from_slice(&v[..4]);
                i.copy_from_slice(&v[4..]);
                (u32::from_be_bytes(p), u64::from_be_bytes(i))
            });
        let raw_key = m.key().unwrap_or_default();
        let key = String::from_utf8_lossy(raw_key).into_owned();
        let leaf = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
        let authentic = match (position, header(MAC_HEADER)) {
            (Some((p, i)), Some(mac)) => {
                raw_key == key.as_bytes() && self.key.check(&key, p, i, &leaf, mac)
            }
            _ => false,
        };
        Announced {
            topic_partition: m.partition() as u32,
            offset: m.offset().max(0) as u64,
            key,
            position,
            leaf,
            authentic,
        }
    }

    /// Wait up to `wait` for one announcement, then take up to `max` in all
    /// of those ready. Kafka errors (a broker down) are logged and waited
    /// out: librdkafka reconnects.
    pub async fn next_batch(&self, max: usize, wait: Duration, out: &mut Vec<Announced>) {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return,
            Ok(Ok(m)) => out.push(self.decode(&m)),
            Ok(Err(e)) => {
                // Broker down or similar: librdkafka reconnects; a pause
                // keeps this from spinning (and flooding the log).
                tracing::warn!(error = %e, topic = LOGGED_TOPIC, "kafka receive");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
        }
        while out.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => out.push(self.decode(&m)),
                _ => break,
            }
        }
    }

    /// Commit the group's offsets (`next` per topic partition), for lag
    /// monitoring only: the engine resumes from its own saved offsets.
    pub fn commit(&self, next: &std::collections::BTreeMap<u32, u64>) -> Result<()> {
        if next.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(LOGGED_TOPIC, *p as i32, Offset::Offset(*o as i64))
                .map_err(kerr)?;
        }
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| Error::Kafka(e.to_string()))
    }
}

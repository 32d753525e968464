//! # vitaltrail-bus
//!
//! The seam between the stateless ingest tier and the attestor, kept small:
//! one producer trait ([`Producer`]) and one per-partition consumer trait
//! ([`PartitionSource`]).
//!
//! * **In-process** ([`inproc`]): bounded channels, one per partition, used
//!   when everything runs in one process (`vitaltrail up`). There is no broker
//!   here, so "durably accepted" means "the attestor has committed it to its
//!   write-ahead Merkle log (or durably rejected it)": [`Producer::send`]
//!   resolves only then, and ingest acknowledges MQTT only after that.
//! * **Kafka** ([`kafka`]): `send` resolves on the broker's acknowledgement
//!   (idempotent producer, `acks=all`); the attestor stores the offset it
//!   consumed in the same durable commit as its log, resumes from there, and
//!   commits the group offset afterwards.
//!
//! Records are keyed by device DID, so one device always lands in one
//! partition and the attestor that owns the partition sees its readings in
//! order.

pub mod checkpoints;
pub mod datadir;
pub mod deadletter;
pub mod inproc;
pub mod kafka;
pub mod logged;
pub mod metrics;
pub mod registry;

use std::future::Future;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors on the bus.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The other side has shut down. Retrying later (after a restart) helps.
    #[error("bus closed")]
    Closed,
    /// The consumer dropped the record without deciding its fate.
    #[error("record was dropped before it was durably handled")]
    Dropped,
    /// The dead-letter store could not be written.
    #[error("dead-letter store {path}: {detail}")]
    DeadLetter { path: String, detail: String },
    /// Kafka failed (the broker is down, a topic is missing…). Retryable.
    #[error("kafka: {0}")]
    Kafka(String),
    /// The device registry file could not be read or written.
    #[error("device registry {path}: {detail}")]
    Registry {
        path: std::path::PathBuf,
        detail: String,
    },
    /// A key, token or settings file of the data directory could not be
    /// read, made or parsed.
    #[error("{path}: {detail}")]
    DataDir {
        path: std::path::PathBuf,
        detail: String,
    },
    /// A bad argument from the operator (a registry change that cannot be
    /// made). Not retryable.
    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    /// Bus errors other than a bad argument are worth a retry.
    pub fn is_retryable(&self) -> bool {
        !self.is_caller_fault() && !matches!(self, Error::DataDir { .. })
    }

    /// True when the operator asked for something invalid.
    pub fn is_caller_fault(&self) -> bool {
        matches!(self, Error::InvalidArgument(_))
    }
}

/// What became of a record once it was durably handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durably on the bus (Kafka) or in the log (in-process).
    Accepted {
        /// The partition it went to.
        partition: u32,
    },
    /// Appended to the partition's Merkle log at `index` (in-process only).
    Logged {
        /// The partition.
        partition: u32,
        /// Its leaf index in that partition's log.
        index: u64,
    },
    /// Durably rejected (written to the dead-letter store) with a reason code.
    Rejected {
        /// Machine-readable reason, e.g. `duplicate`.
        reason: String,
    },
}

/// A record to publish: the envelope bytes as received, keyed by device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The device DID (the partitioning key).
    pub key: String,
    /// The COSE envelope, byte for byte as the device sent it.
    pub payload: Vec<u8>,
    /// When ingest received it, Unix ms.
    pub received_ms: u64,
}

/// The partition for `key` among `partitions`: librdkafka's default
/// partitioner for keyed records (`consistent_random`: CRC-32 of the key,
/// modulo the partition count), so the in-process bus and Kafka put a
/// device in the same partition and a data directory can move between the
/// two modes.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    crc32fast::hash(key.as_bytes()) % partitions.max(1)
}

/// The producing side (ingest).
pub trait Producer: Clone + Send + Sync + 'static {
    /// Publish a record; resolves once it is durably accepted (see the crate docs).
    fn send(&self, record: Record) -> impl Future<Output = Result<Outcome>> + Send;

    /// Records waiting in bounded queues (for the backpressure metric).
    fn queue_depth(&self) -> usize;
}

/// One record delivered to the consumer of a partition.
#[derive(Debug)]
pub struct Delivery {
    /// Partition.
    pub partition: u32,
    /// Offset within the partition (in-process: since start-up).
    pub offset: u64,
    /// The record.
    pub record: Record,
    /// Whether the record provably comes from ingest: always on the
    /// in-process bus; on Kafka, when its MAC checks out (or no bus key is
    /// configured).
    pub authentic: bool,
    ack: Option<tokio::sync::oneshot::Sender<Result<Outcome>>>,
}

impl Delivery {
    /// Report what became of the record, once that is durable.
    pub fn complete(mut self, outcome: Outcome) {
        if let Some(tx) = self.ack.take() {
            // The producer may have given up waiting; that is fine.
            let _ = tx.send(Ok(outcome));
        }
    }
}

/// The consuming side of one partition (the attestor).
pub trait PartitionSource: Send + 'static {
    /// The partition this source reads.
    fn partition(&self) -> u32;

    /// Wait for at least one record, then take up to `max` that are ready.
    /// Returns `false` when the bus is closed and drained.
    fn next_batch(
        &mut self,
        max: usize,
        out: &mut Vec<Delivery>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// True when [`Delivery::offset`]s survive restarts (Kafka), so the
    /// consumer can store them with its state and resume from there.
    fn durable_offsets(&self) -> bool {
        false
    }

    /// Everything before offset `next` is durably handled (Kafka: commit the
    /// consumer group's offset, for lag monitoring).
    fn commit(&mut self, next: u64) -> impl Future<Output = Result<()>> + Send {
        let _ = next;
        async { Ok(()) }
    }
}

/// Where rejected readings go: the local dead-letter file (one process) or
/// the `vitals.rejected` topic (distributed).
#[derive(Debug, Clone)]
pub enum RejectSink {
    /// Append to a local, fsynced file.
    File(std::sync::Arc<deadletter::RejectLog>),
    /// Produce to Kafka.
    Kafka(kafka::KafkaProducer),
}

impl RejectSink {
    /// Make `rejections` durable; returns once they are.
    pub async fn record(&self, rejections: Vec<deadletter::Rejection>) -> Result<()> {
        if rejections.is_empty() {
            return Ok(());
        }
        match self {
            RejectSink::File(log) => {
                let log = log.clone();
                tokio::task::block_in_place(move || log.append(&rejections))
            }
            RejectSink::Kafka(p) => p.send_rejections(rejections).await,
        }
    }
}

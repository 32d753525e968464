//! # vitaltrail-attestor
//!
//! The attestor owns a set of Kafka partitions and, for each one, an
//! append-only BLAKE3 Merkle log (RFC 9162 structure, see
//! `docs/merkle-log.md`):
//!
//! * [`durable`]: the durable, crash-safe, file-backed Merkle log;
//! * [`pipeline`]: one worker per partition that rejects duplicate and replayed
//!   `(device, seq)` pairs and clock skew, appends durably, reports outcomes to
//!   the bus only after that, and signs rolling checkpoints;
//! * [`index`]: per device, its anti-replay window and (seq → leaf index),
//!   on disk (redb) with a bounded cache in memory;
//! * [`parquet_out`]: the `readings` table, exactly once;
//! * [`metrics`]: its Prometheus metrics;
//! * [`stage`]: [`run`], the stage: its partitions, over Kafka or the
//!   in-process bus, with the checkpoint, receipt and dead-letter tasks.
//!
//! After each commit a worker builds one signed receipt per device
//! (`docs/receipts.md`) and hands it to the caller's publisher.
//!
//! The log's on-disk format and its crash-safety argument are described in
//! [`durable`].

/// The durable log, from `vitaltrail-log` (shared with the anchor's
/// epoch log).
pub use vitaltrail_log as durable;
mod error;
pub mod index;
pub mod metrics;
pub mod parquet_out;
pub mod pipeline;
pub mod stage;

pub use durable::DurableLog;
pub use error::{Error, Result};
pub use stage::{AttestBus, StageConfig, run};

//! # vitaltrail-attestor
//!
//! The attestor owns a set of Kafka partitions and, for each one, an
//! append-only BLAKE3 Merkle log (RFC 9162 structure, see
//! `docs/merkle-log.md`). Today this crate holds the durable, file-backed log
//! ([`durable::DurableLog`]); the Kafka consumer, duplicate and replay
//! rejection, rolling checkpoints and Parquet output arrive with issue #4.
//!
//! The log's on-disk format and its crash-safety argument are described in
//! [`durable`].

pub mod durable;
mod error;

pub use durable::DurableLog;
pub use error::{Error, Result};

//! # vitaltrail-ingest
//!
//! **Status: planned (issue #4).** This crate will own the stateless ingest tier:
//!
//! - subscribe to `vitals/+` over MQTT (shared subscription, QoS 1);
//! - batch-verify envelopes with `vitaltrail_core::envelope::verify_parsed`
//!   and look each device up in the device registry;
//! - produce accepted readings, original bytes untouched, to Kafka topic
//!   `vitals.verified` keyed by device (idempotent producer, `acks=all`);
//! - send rejects to `vitals.rejected` with their machine-readable reason
//!   (`vitaltrail_core::Error::code`);
//! - acknowledge an MQTT message only after Kafka has acknowledged it.

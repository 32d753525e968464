//! # vitaltrail-ingest
//!
//! The stateless ingest tier. It owns:
//!
//! - the MQTT intake: a QoS-1 subscription to `vitals/#` (shared,
//!   `$share/<group>/vitals/#`, so several ingest processes split the load;
//!   a message on any topic but exactly `vitals/<did>` is dead-lettered),
//!   with manual acknowledgements;
//! - batch verification with `vitaltrail_core::envelope::verify_parsed`, after
//!   checking that the topic names the signing device and that the device is
//!   registered and not revoked ([`registry`]);
//! - handing accepted readings, original bytes untouched, to the bus keyed by
//!   device, and rejects to the dead-letter store with their reason;
//! - acknowledging each MQTT message only after the bus has durably accepted
//!   it (or its rejection is durable), in the order the messages arrived.
//!
//! Its own state is nothing but in-flight messages, so it scales out.

mod error;
pub mod metrics;
pub mod receipts;
pub mod registry;
pub mod service;

pub use error::{Error, Result};
pub use service::{IngestConfig, run};

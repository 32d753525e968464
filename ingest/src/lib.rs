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
//!   registered and not revoked (`vitaltrail_bus::registry`);
//! - handing accepted readings, original bytes untouched, to the bus keyed by
//!   device, and rejects to the dead-letter store with their reason;
//! - acknowledging each MQTT message once the bus has taken it (or its
//!   rejection is durable), in the order the messages arrived; the
//!   device's own proof of durability is the pipeline's signed receipt;
//! - the stage: [`run`] with a typed [`StageConfig`], over Kafka or the
//!   in-process bus of `vitaltrail up`.
//!
//! Its own state is nothing but in-flight messages, so it scales out.

mod error;
pub mod metrics;
pub mod service;
pub mod stage;

pub use error::{Error, Result};
pub use service::IngestConfig;
pub use stage::{IngestBus, StageConfig, run};

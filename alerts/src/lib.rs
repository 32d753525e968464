//! # vitaltrail-alerts
//!
//! Critical-event alerts for remote-monitoring nurses, over readings once
//! they are durable in the log, so every alert knows the log positions of
//! the readings that triggered it.
//!
//! | module | owns |
//! |---|---|
//! | [`engine`] | the rules (NEWS2 from `vitaltrail_core::news2`, thresholds with duration and repeat, silent devices) and the alarm lifecycle (raise once, severity updates, hysteresis on clearing, escalation, acknowledgement); no I/O, time given by the caller |
//! | [`ack`] | acknowledgements on their way from the HTTP server to the engine, answered once durable |
//! | [`config`] | the typed `[alerts]` configuration |
//! | [`stage`] | `run(config, shutdown)`: follows the partition logs read-only, feeds the engine, writes `<data>/alerts/` (events, state) |
//! | [`delivery`] | the outbox (the events files, one durable cursor per channel), retries with backoff, dead letters past the bound |
//! | [`webhook`] | `[[alerts.webhooks]]`: a FHIR `Communication` per event, POSTed and signed with HMAC-SHA256 |
//! | [`mqtt_topic`] | each event of a ward to MQTT `alerts/<ward>`, QoS 1, for nurse stations |
//! | [`kafka_topic`] | `[alerts.kafka_topic]`: each event to the Kafka topic `alerts`, keyed by patient, signed |
//! | [`fhir`] | events as FHIR R4 `Communication`s; event keys |
//! | `metrics` | `vitaltrail_alerts_*` |
//!
//! The engine's whole state serialises ([`engine::Engine::to_json`]), so it
//! survives a restart.

pub mod ack;
pub mod config;
pub mod delivery;
pub mod engine;
mod error;
pub mod fhir;
pub mod kafka_topic;
mod metrics;
pub mod mqtt_topic;
pub mod stage;
pub mod webhook;

pub use ack::{AckHandle, AckInbox, AckRefusal, Actor};
pub use config::AlertsConfig;
pub use engine::{Alarm, Engine, Event, EventKind, LoggedReading, Severity};
pub use error::{Error, Result};
pub use stage::{AlertsSource, StageConfig, run};

//! The Kafka topic `alerts` (`[alerts.kafka_topic]`): each alarm event as
//! one record, keyed by patient, its value the event's line of the events
//! file, signed with HMAC-SHA256 in a header (`docs/alerts.md` §Kafka).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vitaltrail_bus::kafka::{ALERTS_TOPIC, KafkaConfig, KafkaProducer};

use crate::delivery::{SendError, Sink};
use crate::engine::Event;
use crate::error::Result;
use crate::fhir;
use crate::webhook::Secret;

/// The header with the value's signature: `sha256=<64 hex digits>`.
pub const SIGNATURE_HEADER: &str = "vt-signature";
/// The header with the event's key.
pub const EVENT_KEY_HEADER: &str = "vt-event-key";

/// `[alerts.kafka_topic]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaTopicConfig {
    /// Write every alarm event to the topic `alerts` (the engine must run
    /// over Kafka: `vitaltrail alerts`, `up --kafka`).
    pub enabled: bool,
    /// The HMAC key shared with the topic's consumers (at least 16 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

impl KafkaTopicConfig {
    /// Refuse what cannot work as meant.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.enabled && self.secret_file.is_none() {
            return Err(
                "alerts.kafka_topic.enabled needs alerts.kafka_topic.secret_file (the key its consumers check records with)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The partition key of an event: its patient (for a device rule, the
/// device's patient), else its subject.
pub fn record_key(e: &Event) -> &str {
    e.alarm.patient.as_deref().unwrap_or(&e.alarm.subject)
}

/// The topic as a delivery channel.
#[derive(Debug)]
pub struct KafkaTopic {
    producer: KafkaProducer,
    secret: Secret,
}

impl KafkaTopic {
    /// An idempotent, `acks=all` producer; the topic is created if missing.
    pub async fn new(kafka: &KafkaConfig, cfg: &KafkaTopicConfig) -> Result<KafkaTopic> {
        let secret = match &cfg.secret_file {
            Some(f) => Secret::load(f)?,
            None => {
                return Err(crate::Error::Setting(
                    "alerts.kafka_topic.secret_file is not set".into(),
                ));
            }
        };
        vitaltrail_bus::kafka::ensure_alerts_topic(kafka).await?;
        Ok(KafkaTopic {
            producer: KafkaProducer::new(kafka)?,
            secret,
        })
    }
}

impl Sink for KafkaTopic {
    async fn send(&mut self, event: &Event, line: &[u8]) -> std::result::Result<(), SendError> {
        let sig = self.secret.sign(line);
        let key = fhir::event_key(event);
        self.producer
            .send_with_headers(
                ALERTS_TOPIC,
                record_key(event),
                line,
                &[
                    (EVENT_KEY_HEADER, key.as_bytes()),
                    (SIGNATURE_HEADER, sig.as_bytes()),
                ],
            )
            .await
            .map_err(|e| SendError::transient(format!("kafka topic {ALERTS_TOPIC}: {e}")))
    }
}

//! The one error type of `vitaltrail-ingest`.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in ingest. Bad readings are not errors: they are
/// rejected to the dead-letter store with a reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bad argument from the operator.
    #[error("{0}")]
    InvalidArgument(String),
    /// The bus or dead-letter store failed (retryable).
    #[error(transparent)]
    Bus(#[from] vitaltrail_bus::Error),
    /// The receipt publisher or the MQTT settings failed.
    #[error(transparent)]
    MqttSetup(#[from] vitaltrail_mqtt::Error),
    /// Metrics could not be registered (a name registered twice).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The MQTT client could not be driven.
    #[error("mqtt: {0}")]
    Mqtt(String),
}

impl Error {
    /// True when the operator asked for something invalid.
    pub fn is_caller_fault(&self) -> bool {
        matches!(self, Error::InvalidArgument(_))
    }
}

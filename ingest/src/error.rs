//! The one error type of `vitaltrail-ingest`.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in ingest. Bad readings are not errors: they are
/// rejected to the dead-letter store with a reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry file could not be read or written.
    #[error("device registry {path}: {detail}")]
    Registry { path: PathBuf, detail: String },
    /// A bad argument from the operator.
    #[error("{0}")]
    InvalidArgument(String),
    /// The bus or dead-letter store failed (retryable).
    #[error(transparent)]
    Bus(#[from] vitaltrail_bus::Error),
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

//! The one error type of `vitaltrail-attestor`.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the attestor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error (disk full, permissions…). Retrying may help.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A request about the log that cannot be met (e.g. an index past the end).
    #[error(transparent)]
    Core(#[from] vitaltrail_core::Error),
    /// The durable log failed (I/O, corruption, locked).
    #[error(transparent)]
    Log(#[from] vitaltrail_log::Error),
    /// The bus or the dead-letter store failed.
    #[error(transparent)]
    Bus(#[from] vitaltrail_bus::Error),
    /// The log is not an extension of the last checkpoint this partition
    /// signed (an older log restored beside a newer checkpoint, or an
    /// edited one). Signing now would fork the history; needs an operator.
    #[error("fork guard: log at {path}: {detail}; refusing to sign")]
    Fork { path: PathBuf, detail: String },
    /// The partitions asked for do not match the topic (a partition that
    /// does not exist, or one nobody would attest). Needs an operator.
    #[error("partition coverage: {0}")]
    Coverage(String),
    /// The receipt publisher failed.
    #[error(transparent)]
    Mqtt(#[from] vitaltrail_mqtt::Error),
    /// Metrics could not be registered (a name registered twice).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A partition worker panicked.
    #[error("a partition worker panicked: {0}")]
    Panicked(String),
    /// A state file (index, checkpoint list) is not what we wrote.
    #[error("state file {path}: {detail}")]
    State { path: PathBuf, detail: String },
}

impl Error {
    /// True when the caller asked for something invalid.
    pub fn is_caller_fault(&self) -> bool {
        matches!(self, Error::Core(e) if e.is_caller_fault())
            || matches!(self, Error::Log(e) if e.is_caller_fault())
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::Bus(_))
            || matches!(self, Error::Log(e) if e.is_retryable())
    }
}

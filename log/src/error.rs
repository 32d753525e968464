//! The one error type of `vitaltrail-log`.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a durable log.
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
    /// Stored data contradicts itself: committed data is missing or was
    /// altered. Never retried; needs an operator.
    #[error("log at {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// Another process holds the log open for writing.
    #[error("log at {0} is locked by another process")]
    Locked(PathBuf),
    /// A request about the log that cannot be met (e.g. an index past the end).
    #[error(transparent)]
    Core(#[from] vitaltrail_core::Error),
}

impl Error {
    /// True when the caller asked for something invalid.
    pub fn is_caller_fault(&self) -> bool {
        matches!(self, Error::Core(e) if e.is_caller_fault())
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::Locked(_))
    }
}

//! The one error type of `vitaltrail-anchor`.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the anchor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error (disk full, permissions…).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The epoch log failed.
    #[error(transparent)]
    Log(#[from] vitaltrail_log::Error),
    /// A format error (a record that does not parse or verify).
    #[error(transparent)]
    Core(#[from] vitaltrail_core::Error),
    /// Kafka, or a key in the data directory.
    #[error(transparent)]
    Bus(#[from] vitaltrail_bus::Error),
    /// The anchor's state database.
    #[error("anchor state {path}: {detail}")]
    State { path: PathBuf, detail: String },
    /// The ledger was edited, reordered, cut short or is not ours. Needs an
    /// operator; nothing is appended to it.
    #[error("ledger {path}: {detail}")]
    Ledger { path: PathBuf, detail: String },
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The chain's JSON-RPC failed (retried).
    #[error("evm: {0}")]
    Evm(String),
    /// A setting of the EVM backend is wrong (no key, no contract, another
    /// chain), or someone else anchors with its key: not retried.
    #[error("evm: {0}")]
    Setting(String),
    /// What was asked cannot be answered (no such reading, not anchored).
    #[error("{0}")]
    NotFound(String),
}

impl Error {
    /// True when the caller asked for something that does not exist.
    pub fn is_caller_fault(&self) -> bool {
        matches!(self, Error::NotFound(_) | Error::Setting(_))
    }
}

pub(crate) fn state_err(path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::State {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

//! The one error type of `vitaltrail-alerts`.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the alert engine and its stage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The saved state does not parse (an edited or foreign file; delete
    /// it to rebuild from the logs), or a task failed.
    #[error("alert state: {0}")]
    State(String),
    /// An operating-system I/O error (disk full, permissions…): retried by
    /// restarting the stage.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A partition log could not be read.
    #[error(transparent)]
    Log(#[from] vitaltrail_log::Error),
    /// The device registry could not be read.
    #[error(transparent)]
    Bus(#[from] vitaltrail_bus::Error),
    /// `vitals.logged` partitions that are not the topic's, or not all of
    /// them without `partial`: a configuration error.
    #[error("{0}")]
    Coverage(String),
    /// A setting that cannot work (a webhook's URL or secret file).
    #[error("{0}")]
    Setting(String),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

//! The one error type of `vitaltrail-node`.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop a node: a bad setting (the operator's to fix) or a stage
/// that failed (the stage's error says whether a restart can help).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration (file, environment or flags) is invalid: an
    /// unknown key, a value of the wrong type, a contradiction.
    #[error("configuration: {0}")]
    Config(String),
    /// The data directory does not fit what was asked (for example, its
    /// partition count).
    #[error("{0}")]
    DataDir(String),
    /// Ingest failed.
    #[error("ingest: {0}")]
    Ingest(#[from] vitaltrail_ingest::Error),
    /// The attestor failed.
    #[error("attestor: {0}")]
    Attestor(#[from] vitaltrail_attestor::Error),
    /// The bus, the registry or a data-directory file failed.
    #[error(transparent)]
    Bus(#[from] vitaltrail_bus::Error),
    /// The broker, the gate, the receipt publisher or the MQTT credentials
    /// failed.
    #[error("mqtt: {0}")]
    Mqtt(#[from] vitaltrail_mqtt::Error),
    /// An I/O error (creating the data directory, binding a listener).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A stage panicked or stopped while it should have been running.
    #[error("{0}")]
    StageStopped(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// True when the operator's settings are at fault (fix them, do not
    /// restart in a loop).
    pub fn is_caller_fault(&self) -> bool {
        matches!(self, Error::Config(_) | Error::DataDir(_))
    }
}

impl From<figment::Error> for Error {
    fn from(e: figment::Error) -> Self {
        // Every error of a layered extraction, each with where its value
        // came from (file, environment variable or flag).
        Error::Config(
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

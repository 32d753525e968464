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
    #[error("ingest")]
    Ingest(#[from] vitaltrail_ingest::Error),
    /// The attestor failed.
    #[error("attestor")]
    Attestor(#[from] vitaltrail_attestor::Error),
    /// The anchor failed.
    #[error("anchor")]
    Anchor(#[from] vitaltrail_anchor::Error),
    /// The alert engine failed.
    #[error("alerts")]
    Alerts(#[from] vitaltrail_alerts::Error),
    /// The bus, the registry or a data-directory file failed.
    #[error(transparent)]
    Bus(#[from] vitaltrail_bus::Error),
    /// The broker, the gate, the receipt publisher or the MQTT credentials
    /// failed.
    #[error("mqtt")]
    Mqtt(#[from] vitaltrail_mqtt::Error),
    /// An I/O error (creating the data directory, binding a listener).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics")]
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
        match self {
            Error::Config(_) | Error::DataDir(_) => true,
            Error::Ingest(e) => e.is_caller_fault(),
            Error::Attestor(e) => {
                e.is_caller_fault() || matches!(e, vitaltrail_attestor::Error::Coverage(_))
            }
            Error::Bus(e) => e.is_caller_fault(),
            _ => false,
        }
    }
}

impl From<figment::Error> for Error {
    fn from(e: figment::Error) -> Self {
        // Every error of a layered extraction, each with its key and where
        // its value came from (file, environment variable or flag), on one
        // line, and never a value under [kafka.client] (it may be a secret).
        Error::Config(
            e.into_iter()
                .map(|e| describe(&e))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    let path = e.path.join(".");
    let secret = e.path.first().is_some_and(|p| p == "kafka")
        && e.path.get(1).is_some_and(|p| p == "client");
    let what = match &e.kind {
        // A parser's message (TOML) may quote the source line: keep its
        // first line, which says where.
        Kind::Message(m) => m.lines().next().unwrap_or_default().to_owned(),
        Kind::InvalidType(_, exp) if secret => format!("invalid type (not shown), expected {exp}"),
        Kind::InvalidValue(_, exp) if secret => {
            format!("invalid value (not shown), expected {exp}")
        }
        Kind::Unsupported(_) | Kind::UnsupportedKey(..) if secret => {
            "unsupported value (not shown)".to_owned()
        }
        k => k.to_string(),
    };
    let from = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(src) => format!(" (in {} {src})", m.name),
            None => format!(" (in {})", m.name),
        })
        .unwrap_or_default();
    if path.is_empty() {
        format!("{what}{from}")
    } else {
        format!("{path}: {what}{from}")
    }
}

//! The one error type of `vitaltrail-alerts`.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the alert engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The saved state does not parse (the caller's fault: an edited or
    /// foreign file; rebuild from the log).
    #[error("alert state: {0}")]
    State(String),
    /// An acknowledgement that cannot be taken (no such active alarm,
    /// already acknowledged, nobody named): the caller's fault.
    #[error("acknowledge: {0}")]
    Ack(String),
}

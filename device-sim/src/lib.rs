//! # vitaltrail-device-sim
//!
//! `vitaltrail sim`: simulated wearables. It owns
//!
//! - [`physiology`]: virtual patients with a baseline and coherent vitals
//!   (HR, SpO2, respiration, temperature, blood pressure, optional glucose)
//!   that drift with a clinical [`physiology::Scenario`] and AR(1) noise;
//! - [`attacks`]: switches that inject each kind of bad message the pipeline
//!   must reject, with the reason it must give;
//! - [`publisher`]: signing and QoS-1 publishing to `vitals/<DID>` with
//!   rumqttc, which resends unacknowledged readings after a reconnect.
//!
//! - [`replay`]: real data: RR-interval files become heart-rate readings at
//!   the times the beats happened;
//! - [`ecg`]: the real MIT-BIH ECG (record 208, scipy's `ecg.dat`), whose
//!   beats a Pan–Tompkins detector finds and [`replay`] turns into readings.

pub mod attacks;
pub mod ecg;
pub mod physiology;
pub mod publisher;
pub mod replay;

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Signing failed (a bug in the simulator's values).
    #[error(transparent)]
    Core(#[from] vitaltrail_core::Error),
    /// The MQTT client failed.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// Not every reading was acknowledged in time.
    #[error("{missing} readings were not acknowledged within {waited_ms} ms")]
    Unacknowledged { missing: u64, waited_ms: u64 },
    /// Receipts were on, and not every reading got one in time.
    #[error(
        "{missing} readings were not receipted within {waited_ms} ms (acknowledged by the broker: \
         {acked}); does the pipeline publish receipts (embedded `up` does; `attest` needs --mqtt)? \
         --no-receipts ignores them"
    )]
    Unreceipted {
        missing: u64,
        waited_ms: u64,
        acked: u64,
    },
    /// Readings meant to be logged were rejected by receipt.
    #[error("readings that should have been logged were rejected: {0}")]
    UnexpectedRejections(String),
    /// A receipt did not verify: the pipeline claimed what it cannot prove.
    #[error("{0} receipts did not verify against the log key")]
    BadReceipts(u64),
    /// An ECG recording could not be read.
    #[error("ECG file {path}: {reason}")]
    Ecg { path: String, reason: String },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

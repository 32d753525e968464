//! Prometheus metrics of the alert stage, registered in an injected registry.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The alert stage's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Alarm events written, by kind.
    pub events: IntCounterVec,
    /// Durable readings taken from the logs.
    pub readings: IntCounter,
    /// Leaves that did not decode as readings (not scored).
    pub undecodable: IntCounter,
    /// Active alarms.
    pub active: IntGauge,
    /// Patients with state.
    pub patients: IntGauge,
    /// Readings not scored because the patient or device cap was reached.
    pub dropped: IntGauge,
    /// Patients and devices forgotten after `forget_after_ms` idle.
    pub forgotten: IntGauge,
    /// Readings taken as history (late: a backlog, or a clock set back).
    pub late: IntGauge,
    /// Times the state file was written.
    pub state_saves: IntCounter,
    /// Leaves committed but not yet taken, per partition.
    pub lag: IntGaugeVec,
    /// The events file's size limit before a new generation starts.
    pub events_file_max_bytes: IntGauge,
    /// `vitals.logged` records dropped for a missing or wrong MAC.
    pub unauthentic: IntCounter,
    /// `vitals.logged` records dropped as repeats of leaves already taken.
    pub repeats: IntCounter,
    /// `vitals.logged` records dropped for being in a partition their key
    /// does not belong in (a copy).
    pub misplaced: IntCounter,
    /// Alarm events delivered, per channel.
    pub delivered: IntCounterVec,
    /// Delivery attempts that failed (each is retried), per channel.
    pub delivery_failures: IntCounterVec,
    /// Committed bytes of the current events generation a channel has not
    /// delivered yet (-1: it is behind by a generation or more).
    pub delivery_backlog: IntGaugeVec,
    /// Events moved to a channel's dead letters, past the outbox's bound.
    pub dead_letters: IntCounterVec,
    /// Dead letters discarded, past their own bound.
    pub dead_letters_discarded: IntCounterVec,
    /// Acknowledgements the engine answered, by outcome.
    pub acks: IntCounterVec,
}

impl Metrics {
    /// Create and register the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            events: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_alerts_events_total",
                    "Alarm events written, by kind",
                ),
                &["kind"],
            )?,
            readings: IntCounter::new(
                "vitaltrail_alerts_readings_total",
                "Durable readings the alert engine took from the logs",
            )?,
            undecodable: IntCounter::new(
                "vitaltrail_alerts_undecodable_total",
                "Log leaves that did not decode as readings",
            )?,
            active: IntGauge::new("vitaltrail_alerts_active", "Active alarms")?,
            patients: IntGauge::new("vitaltrail_alerts_patients", "Patients with alert state")?,
            dropped: IntGauge::new(
                "vitaltrail_alerts_dropped",
                "Readings not scored because the patient or device cap was reached",
            )?,
            late: IntGauge::new(
                "vitaltrail_alerts_late_readings",
                "Readings the engine took as history, behind their device's usual clock offset by more than the freshness window (a backlog, or a clock set back)",
            )?,
            state_saves: IntCounter::new(
                "vitaltrail_alerts_state_saves_total",
                "Times the alert engine's state file was written (rounds that raised nothing save at most every 5 s)",
            )?,
            forgotten: IntGauge::new(
                "vitaltrail_alerts_forgotten",
                "Patients and devices whose state was freed after forget_after_ms with no reading and no active alarm",
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_alerts_lag_leaves",
                    "Leaves committed to a partition log but not yet taken by the alert engine",
                ),
                &["partition"],
            )?,
            events_file_max_bytes: IntGauge::new(
                "vitaltrail_alerts_events_file_max_bytes",
                "Size of an events file before a new generation starts",
            )?,
            unauthentic: IntCounter::new(
                "vitaltrail_alerts_unauthentic_announcements_total",
                "vitals.logged records dropped because their MAC is missing or wrong",
            )?,
            repeats: IntCounter::new(
                "vitaltrail_alerts_repeated_announcements_total",
                "vitals.logged records dropped as repeats of leaves already taken",
            )?,
            misplaced: IntCounter::new(
                "vitaltrail_alerts_misplaced_announcements_total",
                "vitals.logged records dropped for being in a partition their key does not belong in",
            )?,
            delivered: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_alerts_delivered_total",
                    "Alarm events delivered, per channel",
                ),
                &["channel"],
            )?,
            delivery_failures: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_alerts_delivery_failures_total",
                    "Alarm event deliveries that failed and are retried, per channel",
                ),
                &["channel"],
            )?,
            delivery_backlog: IntGaugeVec::new(
                Opts::new(
                    "vitaltrail_alerts_delivery_backlog_bytes",
                    "Committed bytes of the current events file a channel has not delivered (-1: a generation or more behind)",
                ),
                &["channel"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_alerts_dead_letters_total",
                    "Alarm events moved to a channel's dead letters, undelivered past the outbox's bound",
                ),
                &["channel"],
            )?,
            dead_letters_discarded: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_alerts_dead_letters_discarded_total",
                    "Dead letters discarded past their own bound (two files of max_events_bytes per channel)",
                ),
                &["channel"],
            )?,
            acks: IntCounterVec::new(
                Opts::new(
                    "vitaltrail_alerts_acks_total",
                    "Acknowledgements the alert engine answered, by outcome (taken, or why refused)",
                ),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(m.acks.clone()))?;
        registry.register(Box::new(m.dead_letters_discarded.clone()))?;
        registry.register(Box::new(m.delivered.clone()))?;
        registry.register(Box::new(m.delivery_failures.clone()))?;
        registry.register(Box::new(m.delivery_backlog.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.misplaced.clone()))?;
        registry.register(Box::new(m.unauthentic.clone()))?;
        registry.register(Box::new(m.repeats.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.readings.clone()))?;
        registry.register(Box::new(m.undecodable.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        registry.register(Box::new(m.patients.clone()))?;
        registry.register(Box::new(m.dropped.clone()))?;
        registry.register(Box::new(m.forgotten.clone()))?;
        registry.register(Box::new(m.state_saves.clone()))?;
        registry.register(Box::new(m.late.clone()))?;
        registry.register(Box::new(m.lag.clone()))?;
        registry.register(Box::new(m.events_file_max_bytes.clone()))?;
        Ok(m)
    }
}

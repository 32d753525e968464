//! The alert engine's typed configuration: the `[alerts]` section.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vitaltrail_core::news2::SpO2Scale;

use crate::engine::Severity;

/// `[alerts]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Run the engine inside `up`.
    pub enabled: bool,
    /// NEWS2.
    pub news2: News2Rule,
    /// Threshold rules with duration and repeat conditions.
    pub thresholds: Vec<ThresholdRule>,
    /// Raise `device-silent` when a device that has streamed sends nothing
    /// for this long (ms); `None` turns the rule off.
    pub silent_after_ms: Option<u64>,
    /// An active alarm nobody acknowledges escalates after this long (ms),
    /// and again after each further interval, once per row of `escalation`.
    pub escalate_after_ms: u64,
    /// Who is told at each escalation level, in order.
    pub escalation: Vec<String>,
    /// Per-patient settings (SpO2 scale, oxygen), by patient ID.
    pub patients: BTreeMap<String, PatientSetting>,
    /// At most this many patients have state; readings of more are counted
    /// (`vitaltrail_alerts_dropped`) and not scored.
    pub max_patients: usize,
    /// At most this many devices have state; readings of more are counted
    /// (`vitaltrail_alerts_dropped`) and not scored.
    pub max_devices: usize,
    /// Cleared alarms kept in the state (the events file keeps them all).
    pub keep_cleared: usize,
    /// How often time-driven rules run and the state is saved (ms).
    pub tick_ms: u64,
    /// The events file is rotated (one `.1` kept) past this many bytes.
    pub max_events_bytes: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            enabled: true,
            news2: News2Rule::default(),
            thresholds: vec![
                ThresholdRule {
                    id: "spo2-low".into(),
                    codes: vec!["2708-6".into(), "59408-5".into()],
                    op: Op::Below,
                    value: 88.0,
                    for_ms: 30_000,
                    repeat: 1,
                    clear_value: Some(90.0),
                    clear_for_ms: 30_000,
                    severity: Severity::Urgent,
                },
                ThresholdRule {
                    id: "hr-high".into(),
                    codes: vec!["8867-4".into(), "8889-8".into()],
                    op: Op::Above,
                    value: 130.0,
                    for_ms: 60_000,
                    repeat: 1,
                    clear_value: Some(120.0),
                    clear_for_ms: 30_000,
                    severity: Severity::Urgent,
                },
            ],
            silent_after_ms: Some(300_000),
            escalate_after_ms: 300_000,
            escalation: vec!["charge-nurse".into(), "rapid-response-team".into()],
            patients: BTreeMap::new(),
            max_patients: 100_000,
            max_devices: 100_000,
            keep_cleared: 1024,
            tick_ms: 200,
            max_events_bytes: 256 * 1024 * 1024,
        }
    }
}

/// NEWS2 as an alert rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct News2Rule {
    /// Score at all.
    pub enabled: bool,
    /// Values whose device time is older than this (ms) at the log time of
    /// the reading being scored are not scored, and are reported missing.
    pub freshness_ms: u64,
    /// Raise `urgent` at this aggregate (or on any single 3).
    pub urgent: u8,
    /// Raise `emergency` at this aggregate.
    pub emergency: u8,
    /// Hysteresis: clear only at or below this aggregate with no single 3…
    pub clear_at_or_below: u8,
    /// …held for this long (ms, device time).
    pub clear_for_ms: u64,
}

impl Default for News2Rule {
    fn default() -> Self {
        News2Rule {
            enabled: true,
            freshness_ms: 300_000,
            urgent: 5,
            emergency: 7,
            clear_at_or_below: 3,
            clear_for_ms: 60_000,
        }
    }
}

/// Above or below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Fires on values below `value`.
    Below,
    /// Fires on values above `value`.
    Above,
}

/// "SpO2 < 88 for 30 s": a value past a threshold, held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    /// The rule's name, unique: the alarm's `rule`.
    pub id: String,
    /// LOINC codes it watches.
    pub codes: Vec<String>,
    /// Below or above.
    pub op: Op,
    /// The threshold.
    pub value: f64,
    /// The condition must hold this long (device time, first violating
    /// reading to the current one)…
    #[serde(default)]
    pub for_ms: u64,
    /// …over at least this many consecutive readings.
    #[serde(default = "one")]
    pub repeat: u32,
    /// Hysteresis: clear only once values are back past this (default: the
    /// threshold)…
    #[serde(default)]
    pub clear_value: Option<f64>,
    /// …for this long.
    #[serde(default)]
    pub clear_for_ms: u64,
    /// The alarm's severity.
    pub severity: Severity,
}

fn one() -> u32 {
    1
}

/// A patient's NEWS2 settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatientSetting {
    /// Which SpO2 chart (`"1"` or `"2"`).
    pub spo2_scale: SpO2Scale,
    /// On supplemental oxygen.
    pub oxygen: bool,
}

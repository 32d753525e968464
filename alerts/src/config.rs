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
    /// A patient, or a device, with no reading for this long (ms) and no
    /// active alarm is forgotten: its state is freed, so the caps bound
    /// who is being monitored, not everyone ever seen.
    pub forget_after_ms: u64,
    /// Cleared alarms kept in the state (the events file keeps them all).
    pub keep_cleared: usize,
    /// How often time-driven rules run and the state is saved (ms).
    pub tick_ms: u64,
    /// The events file is rotated (one `.1` kept) past this many bytes.
    pub max_events_bytes: u64,
    /// Over Kafka (`vitaltrail alerts`): the `vitals.logged` partitions
    /// this engine owns; unset: every partition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<u32>>,
    /// Over Kafka: other engines own the topic's other partitions.
    pub partial: bool,
    /// Over Kafka: the file holding the `vitals.logged` key (64 hex digits,
    /// `vitaltrail alerts export-key`); unset: derived from the bus key
    /// file, which must then exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logged_key_file: Option<std::path::PathBuf>,
    /// Webhooks: each alarm event POSTed as a FHIR `Communication`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<crate::webhook::WebhookConfig>,
    /// Publish each event of a ward to MQTT `alerts/<ward>` (QoS 1), when
    /// the engine has a broker (`up`; `vitaltrail alerts` with
    /// `mqtt.broker`).
    pub mqtt: bool,
    /// The Kafka topic `alerts` (over Kafka only).
    pub kafka_topic: crate::kafka_topic::KafkaTopicConfig,
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
            forget_after_ms: 24 * 3_600_000,
            keep_cleared: 1024,
            tick_ms: 200,
            max_events_bytes: 256 * 1024 * 1024,
            partitions: None,
            partial: false,
            logged_key_file: None,
            webhooks: Vec::new(),
            mqtt: true,
            kafka_topic: Default::default(),
        }
    }
}

impl AlertsConfig {
    /// Refuse settings the engine cannot act on as meant.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.news2;
        if !(1..=20).contains(&n.urgent) || !(n.urgent..=20).contains(&n.emergency) {
            return Err(format!(
                "news2.urgent ({}) must be 1-20 and news2.emergency ({}) from it to 20",
                n.urgent, n.emergency
            ));
        }
        if n.clear_at_or_below >= n.urgent {
            return Err("news2.clear_at_or_below must be under news2.urgent".into());
        }
        if n.freshness_ms < 10_000 {
            // Below the pipeline's own latency every value is stale on
            // arrival: nothing would ever be scored.
            return Err("news2.freshness_ms must be at least 10000 (10 s)".into());
        }
        let mut ids = std::collections::BTreeSet::new();
        for r in &self.thresholds {
            if r.id.is_empty()
                || r.id.contains('/')
                || r.id.chars().any(char::is_whitespace)
                || r.id == "news2"
                || r.id == "device-silent"
            {
                return Err(format!(
                    "threshold id {:?} is empty, holds '/' or whitespace, or is a built-in rule's",
                    r.id
                ));
            }
            if r.repeat == 0 {
                // "Held over 0 readings" means nothing (the engine would
                // take it as 1): say so rather than guess.
                return Err(format!("threshold {:?}: repeat must be at least 1", r.id));
            }
            if !ids.insert(&r.id) {
                return Err(format!("threshold id {:?} is used twice", r.id));
            }
            if r.codes.is_empty()
                || r.codes
                    .iter()
                    .any(|c| !vitaltrail_core::envelope::is_loinc(c))
            {
                return Err(format!("threshold {:?}: codes must be LOINC codes", r.id));
            }
            if !r.value.is_finite() || r.clear_value.is_some_and(|v| !v.is_finite()) {
                return Err(format!("threshold {:?}: values must be finite", r.id));
            }
            // Clearing is on the far side of the threshold (hysteresis): a
            // clear_value past it would clear while the condition holds.
            match (r.op, r.clear_value) {
                (Op::Below, Some(c)) if c < r.value => {
                    return Err(format!(
                        "threshold {:?}: clear_value {c} is below value {} of a `below` rule; it must be at or above it",
                        r.id, r.value
                    ));
                }
                (Op::Above, Some(c)) if c > r.value => {
                    return Err(format!(
                        "threshold {:?}: clear_value {c} is above value {} of an `above` rule; it must be at or below it",
                        r.id, r.value
                    ));
                }
                _ => {}
            }
        }
        if self.max_patients == 0 || self.max_devices == 0 {
            return Err("max_patients and max_devices must be at least 1".into());
        }
        // Forgetting sooner would drop what the rules still use: the
        // freshness window, a silent device's alarm, a clearing hold.
        let floor = [
            Some(3_600_000),
            Some(n.freshness_ms),
            self.silent_after_ms,
            Some(n.clear_for_ms),
        ]
        .into_iter()
        .flatten()
        .chain(
            self.thresholds
                .iter()
                .flat_map(|r| [r.for_ms, r.clear_for_ms]),
        )
        .max()
        .unwrap_or(0);
        if self.forget_after_ms < floor
            || self
                .silent_after_ms
                .is_some_and(|s| self.forget_after_ms <= s)
        {
            return Err(format!(
                "forget_after_ms ({}) must be at least {floor}: 1 hour, no shorter than the \
                 freshness window or any rule's for_ms and clear_for_ms, and longer than \
                 silent_after_ms",
                self.forget_after_ms
            ));
        }
        if self.max_events_bytes < 1 << 20 {
            return Err("max_events_bytes must be at least 1 MiB".into());
        }
        if self.tick_ms < 10 {
            return Err("tick_ms must be at least 10".into());
        }
        if let Some(p) = self
            .patients
            .keys()
            .find(|p| p.trim() != p.as_str() || p.is_empty())
        {
            // Patient IDs are matched exactly, and the registry refuses them
            // with whitespace around (`devices add`).
            return Err(format!(
                "patients: {p:?} is empty or has whitespace around it"
            ));
        }
        if let Some(e) = self
            .escalation
            .iter()
            .find(|e| e.trim() != e.as_str() || e.is_empty())
        {
            return Err(format!(
                "escalation: {e:?} is empty or has whitespace around it"
            ));
        }
        if self.partitions.as_ref().is_some_and(Vec::is_empty) {
            return Err("partitions, when given, must name at least one".into());
        }
        self.kafka_topic.validate()?;
        let mut names = std::collections::BTreeSet::new();
        for w in &self.webhooks {
            w.validate()?;
            if !names.insert(w.name.as_str()) {
                return Err(format!("webhooks: the name {:?} is used twice", w.name));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_what_cannot_act_as_meant() {
        assert_eq!(AlertsConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut AlertsConfig)| {
            let mut c = AlertsConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        bad(|c| c.thresholds[1].id = c.thresholds[0].id.clone());
        bad(|c| c.thresholds[0].id = "news2".into());
        bad(|c| c.thresholds[0].id = "a/b".into());
        bad(|c| c.thresholds[0].codes = vec!["heart rate".into()]);
        bad(|c| c.thresholds[0].value = f64::NAN);
        bad(|c| c.news2.urgent = 0);
        bad(|c| c.news2.emergency = 30);
        bad(|c| c.news2.clear_at_or_below = 5);
        bad(|c| c.max_patients = 0);
        bad(|c| c.max_events_bytes = 0);
        bad(|c| c.tick_ms = 0);
        // Left from the engine's review (issue #21 part 5).
        bad(|c| c.thresholds[0].repeat = 0);
        bad(|c| c.thresholds[0].clear_value = Some(80.0)); // spo2-low: below 88
        bad(|c| c.thresholds[1].clear_value = Some(140.0)); // hr-high: above 130
        bad(|c| c.thresholds[0].id = " spo2-low".into());
        bad(|c| c.thresholds[0].id = "spo2 low".into());
        bad(|c| c.news2.freshness_ms = 0);
        bad(|c| c.news2.freshness_ms = 1);
        bad(|c| c.partitions = Some(vec![]));
        bad(|c| {
            c.patients.insert("p1 ".into(), PatientSetting::default());
        });
        bad(|c| c.escalation = vec!["charge-nurse".into(), " ".into()]);
        let hook = crate::webhook::WebhookConfig {
            name: "ehr".into(),
            url: "https://ehr.example/hook".into(),
            wards: vec!["*".into()],
            secret_file: "/dev/null".into(),
            timeout_ms: 10_000,
            first_backoff_ms: 500,
            max_backoff_ms: 60_000,
        };
        let mut c = AlertsConfig {
            webhooks: vec![hook.clone()],
            ..AlertsConfig::default()
        };
        assert_eq!(c.validate(), Ok(()));
        c.webhooks.push(hook);
        assert!(c.validate().is_err(), "a name used twice");
        // At the threshold itself is allowed (no hysteresis, but meant).
        let mut c = AlertsConfig::default();
        c.thresholds[0].clear_value = Some(88.0);
        assert_eq!(c.validate(), Ok(()));
    }
}

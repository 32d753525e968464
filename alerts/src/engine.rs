//! The alert engine: rules over durable readings, and the alarm lifecycle.
//! No I/O and no clock of its own: every call is given the time, so tests
//! drive it with a mock clock and a restart is a serialised [`Engine`].
//!
//! Lifecycle (ThingsBoard-style): an alarm is raised once when its
//! condition first holds (for its duration, or its number of repeats); while
//! the condition keeps holding it is not raised again, only `updated` when
//! its severity rises. It clears only after the condition has stopped
//! holding for `clear_for_ms`, and for thresholds only once the value is
//! past `clear_value` (hysteresis). An active alarm nobody acknowledges
//! within `escalate_after_ms` escalates, one level of the escalation table
//! per interval. An acknowledgement records who and when.
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use vitaltrail_core::news2;

use crate::ack::{AckRefusal, AckResult, AckVia, Actor};
use crate::config::{AlertsConfig, Op, ThresholdRule};
use crate::error::{Error, Result};

/// At most this many readings are kept as one alarm's evidence.
pub const MAX_EVIDENCE: usize = 16;

/// A reading once it is durable in the log, as the engine sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedReading {
    /// The log partition.
    pub partition: u32,
    /// Its leaf index in that partition's log.
    pub log_index: u64,
    /// The signing device's DID.
    pub device: String,
    /// The device's per-device seq.
    pub seq: u64,
    /// The device's time, Unix ms.
    pub time_ms: u64,
    /// The patient the device is registered to (`None`: unknown).
    pub patient: Option<String>,
    /// The patient's ward.
    pub ward: Option<String>,
    /// (LOINC code, value) pairs.
    pub measurements: Vec<(String, f64)>,
}

/// One triggering reading, with where to fetch its proof.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The device.
    pub device: String,
    /// Its seq (`vitaltrail prove --device D --seq S`).
    pub seq: u64,
    /// Log partition.
    pub partition: u32,
    /// Leaf index.
    pub log_index: u64,
    /// Device time, Unix ms.
    pub time_ms: u64,
    /// The LOINC code that triggered.
    pub code: String,
    /// Its value.
    pub value: f64,
}

/// How urgent an alarm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Look when you can (a silent device).
    Warning,
    /// An urgent response (NEWS2 5–6, or any single parameter scoring 3).
    Urgent,
    /// An emergency response (NEWS2 7 or more).
    Emergency,
}

impl Severity {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Urgent => "urgent",
            Severity::Emergency => "emergency",
        }
    }
}

/// Who acknowledged an alarm, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Who.
    pub by: String,
    /// When, Unix ms (the engine's clock when it took it).
    pub at_ms: u64,
    /// How `by` was proved (absent in events written before it was
    /// recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<AckVia>,
}

/// One alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    /// `<rule>/<subject>/<raised_ms>-<episode>` (the episode counts from 1
    /// per rule and subject): unique, and the same on a rebuild.
    pub id: String,
    /// The rule that raised it (`news2`, `device-silent`, a threshold's id).
    pub rule: String,
    /// The patient (or, for device rules, the device).
    pub subject: String,
    /// The patient's ward, when known.
    pub ward: Option<String>,
    /// The patient: the subject, or for device rules the device's patient
    /// (absent in events written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// How urgent.
    pub severity: Severity,
    /// Why, in words.
    pub reason: String,
    /// Active (else cleared).
    pub active: bool,
    /// The acknowledgement, if any.
    pub ack: Option<Ack>,
    /// When raised, Unix ms.
    pub raised_ms: u64,
    /// When last changed, Unix ms.
    pub updated_ms: u64,
    /// When cleared.
    pub cleared_ms: Option<u64>,
    /// Escalation level reached (0: none).
    pub escalation: u32,
    /// The triggering readings, newest last, at most [`MAX_EVIDENCE`].
    pub evidence: Vec<Evidence>,
}

/// What happened to an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// First raised.
    Raised,
    /// Its severity rose while active.
    Updated,
    /// Unacknowledged past the escalation interval.
    Escalated,
    /// Acknowledged.
    Acknowledged,
    /// Cleared.
    Cleared,
}

impl EventKind {
    /// The stored name (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Raised => "raised",
            EventKind::Updated => "updated",
            EventKind::Escalated => "escalated",
            EventKind::Acknowledged => "acknowledged",
            EventKind::Cleared => "cleared",
        }
    }
}

/// One change of one alarm: what delivery sends and the `alerts` table holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The alarm's state after the change.
    pub alarm: Alarm,
    /// What changed.
    pub kind: EventKind,
    /// When, Unix ms.
    pub at_ms: u64,
    /// For `escalated`: who is to be told, from the escalation table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
}

/// A condition's progress towards firing or clearing, per (rule, subject).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Progress {
    /// Device time of the first reading of the current violating run.
    holding_since: Option<u64>,
    /// Violating readings in the current run.
    count: u32,
    /// Device time since which the condition has been clear.
    clear_since: Option<u64>,
    /// The run's readings, newest last (bounded).
    evidence: VecDeque<Evidence>,
    /// NEWS2: parameters scored when the alarm was last raised or updated;
    /// it clears only with at least as many scored again.
    #[serde(default)]
    scored: usize,
}

/// What the engine knows of one patient.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Patient {
    ward: Option<String>,
    /// Latest value per LOINC code, with its evidence.
    latest: BTreeMap<String, Evidence>,
    /// When each latest value was taken, on the log's clock (its device
    /// time corrected by its device's clock offset): what freshness is
    /// judged by. Absent (state saved before it was kept): the device time.
    #[serde(default)]
    taken_at: BTreeMap<String, u64>,
    /// Per rule.
    progress: BTreeMap<String, Progress>,
    /// Log time of its last reading (0: state saved before it was kept;
    /// taken as the next tick's time).
    #[serde(default)]
    seen_ms: u64,
}

/// How far a device's clock is behind the log's: the least
/// `log time - device time` of its current readings (network delay plus
/// the clock's offset), allowed to grow by [`CLOCK_RELEARN`] of the log
/// time passed, so a clock that falls behind is learned again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct DeviceClock {
    /// The offset, ms (negative: the device's clock is ahead).
    behind_ms: i64,
    /// Log time of the reading it was last updated by.
    at_ms: u64,
}

/// A device's clock offset may grow by one part in this many of the log
/// time passed: a clock set back by D is learned again within 10·D, and a
/// device back from 60 minutes offline has its backlog older than 6
/// minutes plus the freshness window taken as history.
pub const CLOCK_RELEARN: u64 = 10;

/// The engine's whole state: what survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Engine {
    #[serde(skip)]
    config: AlertsConfig,
    patients: BTreeMap<String, Patient>,
    /// device → (last seen, Unix ms by the engine's clock; patient; ward).
    devices: BTreeMap<String, (u64, String, Option<String>)>,
    /// device → its clock's offset from the log's (the same devices).
    #[serde(default)]
    clocks: BTreeMap<String, DeviceClock>,
    /// Patients and devices forgotten so far (idle past `forget_after_ms`).
    #[serde(default)]
    pub forgotten: u64,
    /// Readings taken as history (late: a backlog, or a clock set back).
    #[serde(default)]
    pub late_readings: u64,
    /// The clock offsets of forgotten devices, so a device back after a
    /// long time offline has its backlog judged by its old offset (at most
    /// `max_devices`, the oldest dropped first).
    #[serde(default)]
    retired_clocks: BTreeMap<String, DeviceClock>,
    /// When idle patients and devices were last looked for (not saved).
    #[serde(skip)]
    forget_checked_ms: u64,
    /// Active alarms by (rule, subject); saved as a list.
    #[serde(with = "as_list")]
    active: BTreeMap<(String, String), Alarm>,
    /// Cleared alarms, newest last, at most `config.keep_cleared`.
    cleared: VecDeque<Alarm>,
    /// Readings ignored because the patient cap was reached.
    pub dropped_patients: u64,
    /// Episodes raised so far per `<rule>/<subject>`: the last part of an
    /// alarm ID, so two episodes raised at one log time differ.
    #[serde(default)]
    episodes: BTreeMap<String, u64>,
}

/// The active map saved as a list of alarms (JSON keys are strings only);
/// each alarm names its own (rule, subject).
mod as_list {
    use super::*;
    pub fn serialize<S: serde::Serializer>(
        m: &BTreeMap<(String, String), Alarm>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.values())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<(String, String), Alarm>, D::Error> {
        let v: Vec<Alarm> = Vec::deserialize(d)?;
        Ok(v.into_iter()
            .map(|a| ((a.rule.clone(), a.subject.clone()), a))
            .collect())
    }
}

/// When a latest value was taken, on the log's clock.
fn taken_at(taken: &BTreeMap<String, u64>, e: &Evidence) -> u64 {
    taken.get(&e.code).copied().unwrap_or(e.time_ms)
}

fn push_bounded(q: &mut VecDeque<Evidence>, e: Evidence) {
    if q.len() == MAX_EVIDENCE {
        q.pop_front();
    }
    q.push_back(e);
}

impl Engine {
    /// A fresh engine.
    pub fn new(config: AlertsConfig) -> Self {
        Engine {
            config,
            ..Default::default()
        }
    }

    /// An engine restored from [`Engine::to_json`], with `config`.
    pub fn restore(json: &[u8], config: AlertsConfig) -> Result<Self> {
        let e: Engine = serde_json::from_slice(json).map_err(|e| Error::State(e.to_string()))?;
        Ok(e.with_config(config))
    }

    /// A deserialised engine, given its configuration (which is not saved).
    pub fn with_config(mut self, config: AlertsConfig) -> Self {
        self.config = config;
        self
    }

    /// The state, for [`Engine::restore`].
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::State(e.to_string()))
    }

    /// The active alarms.
    pub fn active(&self) -> impl Iterator<Item = &Alarm> {
        self.active.values()
    }

    /// The recently cleared alarms, oldest first.
    pub fn cleared(&self) -> impl Iterator<Item = &Alarm> {
        self.cleared.iter()
    }

    /// Patients with state.
    pub fn patients(&self) -> usize {
        self.patients.len()
    }

    /// The current NEWS2 of a patient, from values fresh at `now_ms`.
    pub fn news2(&self, patient: &str, now_ms: u64) -> Option<news2::Score> {
        let p = self.patients.get(patient)?;
        news2::score(&self.observations(patient, p, now_ms)).ok()
    }

    fn observations(&self, patient: &str, p: &Patient, now_ms: u64) -> news2::Observations {
        let fresh = |codes: &[&str]| {
            codes
                .iter()
                .filter_map(|c| p.latest.get(*c))
                .filter(|e| {
                    taken_at(&p.taken_at, e).saturating_add(self.config.news2.freshness_ms)
                        >= now_ms
                })
                // A value no body shows (a fault, a sentinel) is missing,
                // not a reason to stop scoring the others.
                .filter(|e| {
                    news2::codes::parameter(&e.code).is_some_and(|p| news2::plausible(p, e.value))
                })
                .max_by_key(|e| taken_at(&p.taken_at, e))
                .map(|e| e.value)
        };
        let setting = self.config.patients.get(patient);
        news2::Observations {
            respiration_rate: fresh(news2::codes::RESPIRATION_RATE),
            spo2: fresh(news2::codes::SPO2),
            scale: setting.map(|s| s.spo2_scale).unwrap_or_default(),
            oxygen: setting.is_some_and(|s| s.oxygen),
            systolic_bp: fresh(news2::codes::SYSTOLIC_BP),
            pulse: fresh(news2::codes::PULSE),
            consciousness: None,
            temperature: fresh(news2::codes::TEMPERATURE),
        }
    }

    /// Take one durable reading, at `now_ms` by the engine's clock.
    pub fn reading(&mut self, r: &LoggedReading, now_ms: u64) -> Vec<Event> {
        let mut out = Vec::new();
        // A silent device is back.
        let dev_key = ("device-silent".to_owned(), r.device.clone());
        if let Some(a) = self.active.remove(&dev_key) {
            out.push(self.clear(a, now_ms));
        }
        let Some(patient) = r.patient.clone() else {
            return out;
        };
        if !self.devices.contains_key(&r.device) && self.devices.len() >= self.config.max_devices {
            self.dropped_patients += 1;
            return out;
        }
        self.devices
            .insert(r.device.clone(), (now_ms, patient.clone(), r.ward.clone()));
        // Judged on the log's clock: how far this reading is behind its
        // device's usual offset, not how far its device time is behind
        // the log (a device whose clock is slow is not always late).
        let behind = i64::try_from(now_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(r.time_ms).unwrap_or(i64::MAX));
        if !self.clocks.contains_key(&r.device)
            && let Some(c) = self.retired_clocks.remove(&r.device)
        {
            self.clocks.insert(r.device.clone(), c);
        }
        let usual = match self.clocks.get(&r.device) {
            None => behind,
            Some(c) => behind.min(c.behind_ms.saturating_add(
                i64::try_from(now_ms.saturating_sub(c.at_ms) / CLOCK_RELEARN).unwrap_or(i64::MAX),
            )),
        };
        self.clocks.insert(
            r.device.clone(),
            DeviceClock {
                behind_ms: usual,
                at_ms: now_ms,
            },
        );
        let late_by = u64::try_from(behind.saturating_sub(usual)).unwrap_or(0);
        let taken = u64::try_from(
            i64::try_from(r.time_ms)
                .unwrap_or(i64::MAX)
                .saturating_add(usual),
        )
        .unwrap_or(0);
        if !self.patients.contains_key(&patient) && self.patients.len() >= self.config.max_patients
        {
            self.dropped_patients += 1;
            return out;
        }
        let mut p = self.patients.remove(&patient).unwrap_or_default();
        p.ward.clone_from(&r.ward);
        p.seen_ms = p.seen_ms.max(now_ms);
        let evidence = |code: &str, value: f64| Evidence {
            device: r.device.clone(),
            seq: r.seq,
            partition: r.partition,
            log_index: r.log_index,
            time_ms: r.time_ms,
            code: code.to_owned(),
            value,
        };
        // Only NEWS2's codes are kept as latest values (thresholds take each
        // reading as it comes), so a device sending many codes cannot grow
        // a patient's state.
        // A reading older than the freshness window (an offline sync) is
        // history: it changes no latest value and does not start or clear a
        // threshold episode now.
        let stale = late_by > self.config.news2.freshness_ms;
        if stale {
            self.late_readings += 1;
        }
        for (code, value) in &r.measurements {
            if stale || news2::codes::parameter(code).is_none() {
                continue;
            }
            // Latest on the log's clock (taken), never by the device's
            // word: a second device with a fast clock cannot pin an old
            // value, nor a nearly-late one displace a fresher value.
            if p.taken_at.get(code).is_some_and(|t| *t > taken) {
                continue;
            }
            p.latest.insert(code.clone(), evidence(code, *value));
            p.taken_at.insert(code.clone(), taken);
        }
        let rules = if stale {
            Vec::new()
        } else {
            std::mem::take(&mut self.config.thresholds)
        };
        for rule in &rules {
            for (code, value) in r
                .measurements
                .iter()
                .filter(|(c, _)| rule.codes.contains(c))
            {
                // Held on the log's clock (the device time corrected by its
                // offset), so runs and holds of a patient's devices with
                // different clocks add up.
                self.threshold(
                    rule,
                    &patient,
                    &mut p,
                    (evidence(code, *value), taken),
                    &mut out,
                    now_ms,
                );
            }
        }
        if !stale {
            self.config.thresholds = rules;
        }
        // A late reading changes no value, so it is not scored again (nor
        // does it time a clearing hold).
        if self.config.news2.enabled && !stale {
            self.news2_rule(&patient, &mut p, taken, &mut out, now_ms);
        }
        self.patients.insert(patient, p);
        out
    }

    fn threshold(
        &mut self,
        rule: &ThresholdRule,
        patient: &str,
        p: &mut Patient,
        (e, t): (Evidence, u64),
        out: &mut Vec<Event>,
        now_ms: u64,
    ) {
        let key = (rule.id.clone(), patient.to_owned());
        let violating = match rule.op {
            Op::Below => e.value < rule.value,
            Op::Above => e.value > rule.value,
        };
        let clear_value = rule.clear_value.unwrap_or(rule.value);
        let past_clear = match rule.op {
            Op::Below => e.value >= clear_value,
            Op::Above => e.value <= clear_value,
        };
        let active = self.active.contains_key(&key);
        let pr = p.progress.entry(rule.id.clone()).or_default();
        if violating {
            let since = *pr.holding_since.get_or_insert(t);
            pr.count = pr.count.saturating_add(1);
            pr.clear_since = None;
            push_bounded(&mut pr.evidence, e);
            if !active && t.saturating_sub(since) >= rule.for_ms && pr.count >= rule.repeat.max(1) {
                let reason = format!(
                    "{} {} {} for {} s ({} readings)",
                    rule.codes.join("/"),
                    if rule.op == Op::Below { "<" } else { ">" },
                    rule.value,
                    t.saturating_sub(since) / 1000,
                    pr.count
                );
                let ev = pr.evidence.iter().cloned().collect();
                let who = (key.1.clone(), p.ward.clone());
                out.push(self.raise(key, who, rule.severity, reason, ev, now_ms));
            }
        } else {
            pr.holding_since = None;
            pr.count = 0;
            pr.evidence.clear();
            if active {
                if past_clear {
                    let since = *pr.clear_since.get_or_insert(t);
                    if t.saturating_sub(since) >= rule.clear_for_ms {
                        pr.clear_since = None;
                        if let Some(a) = self.active.remove(&key) {
                            out.push(self.clear(a, now_ms));
                        }
                    }
                } else {
                    pr.clear_since = None;
                }
            }
        }
    }

    fn news2_rule(
        &mut self,
        patient: &str,
        p: &mut Patient,
        t: u64,
        out: &mut Vec<Event>,
        now_ms: u64,
    ) {
        let cfg = self.config.news2.clone();
        let Ok(score) = news2::score(&self.observations(patient, p, now_ms)) else {
            return;
        };
        let key = ("news2".to_owned(), patient.to_owned());
        let severity = if score.total >= cfg.emergency {
            Some(Severity::Emergency)
        } else if score.total >= cfg.urgent || score.any_three() {
            Some(Severity::Urgent)
        } else {
            None
        };
        let threes: Vec<&str> = score
            .parameters
            .iter()
            .filter(|(_, s)| **s == 3)
            .map(|(k, _)| *k)
            .collect();
        let reason = format!(
            "NEWS2 {} ({}){}{}",
            score.total,
            score.risk.as_str(),
            if threes.is_empty() {
                String::new()
            } else {
                format!("; 3 in {}", threes.join(", "))
            },
            if score.missing.is_empty() {
                String::new()
            } else {
                format!("; missing {}", score.missing.join(", "))
            }
        );
        let evidence = || -> Vec<Evidence> {
            let mut v: Vec<Evidence> = p
                .latest
                .values()
                .filter(|e| taken_at(&p.taken_at, e).saturating_add(cfg.freshness_ms) >= now_ms)
                .cloned()
                .collect();
            v.sort_by_key(|e| (e.time_ms, e.log_index));
            v.truncate(MAX_EVIDENCE);
            v
        };
        let pr = p.progress.entry("news2".to_owned()).or_default();
        match (severity, self.active.get_mut(&key)) {
            (Some(sev), None) => {
                pr.clear_since = None;
                pr.scored = score.parameters.len();
                let ev = evidence();
                let who = (key.1.clone(), p.ward.clone());
                out.push(self.raise(key, who, sev, reason, ev, now_ms));
            }
            (Some(sev), Some(a)) => {
                pr.clear_since = None;
                pr.scored = pr.scored.max(score.parameters.len());
                if sev > a.severity {
                    a.severity = sev;
                    a.reason = reason;
                    // An acknowledgement covers the severity it was given
                    // for: a rise must be acknowledged again, and escalates
                    // until it is.
                    a.ack = None;
                    a.evidence = evidence();
                    a.updated_ms = now_ms;
                    out.push(Event {
                        alarm: a.clone(),
                        kind: EventKind::Updated,
                        at_ms: now_ms,
                        notify: None,
                    });
                }
            }
            (None, Some(_)) => {
                // Hysteresis: clear only well below the firing line, and
                // only after it has stayed there for clear_for_ms.
                // A parameter gone stale (a sensor off) is not a recovery.
                if score.total <= cfg.clear_at_or_below && score.parameters.len() >= pr.scored {
                    let since = *pr.clear_since.get_or_insert(t);
                    if t.saturating_sub(since) >= cfg.clear_for_ms {
                        pr.clear_since = None;
                        if let Some(a) = self.active.remove(&key) {
                            out.push(self.clear(a, now_ms));
                        }
                    }
                } else {
                    pr.clear_since = None;
                }
            }
            (None, None) => pr.clear_since = None,
        }
    }

    fn raise(
        &mut self,
        key: (String, String),
        (patient, ward): (String, Option<String>),
        severity: Severity,
        reason: String,
        evidence: Vec<Evidence>,
        now_ms: u64,
    ) -> Event {
        let n = self
            .episodes
            .entry(format!("{}/{}", key.0, key.1))
            .or_default();
        *n += 1;
        let a = Alarm {
            id: format!("{}/{}/{}-{}", key.0, key.1, now_ms, n),
            rule: key.0.clone(),
            subject: key.1.clone(),
            ward,
            patient: Some(patient),
            severity,
            reason,
            active: true,
            ack: None,
            raised_ms: now_ms,
            updated_ms: now_ms,
            cleared_ms: None,
            escalation: 0,
            evidence,
        };
        self.active.insert(key, a.clone());
        Event {
            alarm: a,
            kind: EventKind::Raised,
            at_ms: now_ms,
            notify: None,
        }
    }

    fn clear(&mut self, mut a: Alarm, now_ms: u64) -> Event {
        a.active = false;
        a.cleared_ms = Some(now_ms);
        a.updated_ms = now_ms;
        if self.cleared.len() >= self.config.keep_cleared.max(1) {
            self.cleared.pop_front();
        }
        self.cleared.push_back(a.clone());
        Event {
            alarm: a,
            kind: EventKind::Cleared,
            at_ms: now_ms,
            notify: None,
        }
    }

    /// Time-driven rules: silent devices and escalation.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(after) = self.config.silent_after_ms {
            let silent: Vec<(String, String, Option<String>, u64)> = self
                .devices
                .iter()
                .filter(|(d, (seen, _, _))| {
                    now_ms.saturating_sub(*seen) >= after
                        && !self
                            .active
                            .contains_key(&("device-silent".to_owned(), (*d).clone()))
                })
                .map(|(d, (seen, p, w))| (d.clone(), p.clone(), w.clone(), *seen))
                .collect();
            for (device, patient, ward, seen) in silent {
                let reason = format!(
                    "no reading from {device} (patient {patient}) for {} s",
                    now_ms.saturating_sub(seen) / 1000
                );
                let key = ("device-silent".to_owned(), device);
                out.push(self.raise(
                    key,
                    (patient, ward),
                    Severity::Warning,
                    reason,
                    Vec::new(),
                    now_ms,
                ));
            }
        }
        // After the silent check, so a device is called silent before it
        // can be forgotten.
        out.extend(self.forget_idle(now_ms));
        let every = self.config.escalate_after_ms;
        let table = &self.config.escalation;
        if every > 0 && !table.is_empty() {
            for a in self.active.values_mut() {
                // Warnings (a silent device) are not escalated to responders.
                if a.ack.is_some()
                    || a.severity == Severity::Warning
                    || a.escalation as usize >= table.len()
                {
                    continue;
                }
                let due = a
                    .raised_ms
                    .saturating_add(every.saturating_mul(u64::from(a.escalation) + 1));
                if now_ms >= due {
                    let notify = table[a.escalation as usize].clone();
                    a.escalation += 1;
                    a.updated_ms = now_ms;
                    out.push(Event {
                        alarm: a.clone(),
                        kind: EventKind::Escalated,
                        at_ms: now_ms,
                        notify: Some(notify),
                    });
                }
            }
        }
        out
    }

    /// Free the state of patients and devices idle past
    /// `forget_after_ms` with no active alarm (looked for once a minute).
    fn forget_idle(&mut self, now_ms: u64) -> Vec<Event> {
        let mut out = Vec::new();
        if now_ms < self.forget_checked_ms.saturating_add(60_000) {
            return out;
        }
        self.forget_checked_ms = now_ms;
        let after = self.config.forget_after_ms;
        // A device silent for that long is gone (discharged, lost): its
        // `device-silent` alarm is cleared, so it and its patient can be.
        let gone: Vec<(String, String)> = self
            .active
            .keys()
            .filter(|(rule, d)| {
                rule == "device-silent"
                    && self
                        .devices
                        .get(d)
                        .is_none_or(|(seen, _, _)| now_ms.saturating_sub(*seen) >= after)
            })
            .cloned()
            .collect();
        for key in gone {
            if let Some(mut a) = self.active.remove(&key) {
                a.reason = format!(
                    "{}; no reading for {} h: forgotten",
                    a.reason,
                    after / 3_600_000
                );
                out.push(self.clear(a, now_ms));
            }
        }
        // Whom an active alarm is about: never forgotten while it is.
        let mut alarmed: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        for ((_, subject), a) in &self.active {
            alarmed.insert(subject);
            if let Some(p) = &a.patient {
                alarmed.insert(p);
            }
        }
        let mut gone = 0u64;
        self.patients.retain(|id, p| {
            if p.seen_ms == 0 {
                p.seen_ms = now_ms;
            }
            let keep = now_ms.saturating_sub(p.seen_ms) < after || alarmed.contains(id.as_str());
            gone += u64::from(!keep);
            keep
        });
        let mut dropped_devices = Vec::new();
        self.devices.retain(|d, (seen, _, _)| {
            let keep = now_ms.saturating_sub(*seen) < after || alarmed.contains(d.as_str());
            if !keep {
                dropped_devices.push(d.clone());
            }
            keep
        });
        for d in &dropped_devices {
            if let Some(c) = self.clocks.remove(d) {
                self.retired_clocks.insert(d.clone(), c);
            }
        }
        while self.retired_clocks.len() > self.config.max_devices {
            let oldest = self
                .retired_clocks
                .iter()
                .min_by_key(|(_, c)| c.at_ms)
                .map(|(d, _)| d.clone());
            match oldest {
                Some(d) => self.retired_clocks.remove(&d),
                None => break,
            };
        }
        // Episode counters of whom no alarm is left about (IDs stay unique:
        // they hold the time raised).
        let kept: std::collections::BTreeSet<String> = self
            .patients
            .keys()
            .chain(self.devices.keys())
            .cloned()
            .collect();
        self.episodes.retain(|k, _| {
            k.split_once('/')
                .is_none_or(|(_, subject)| kept.contains(subject))
        });
        self.forgotten += gone + dropped_devices.len() as u64;
        out
    }

    /// Acknowledge the active alarm `id` as `actor` (who may act only on
    /// its wards, if it has any), at `now_ms`. An alarm cleared within the
    /// last `keep_cleared` is told apart from one never raised here.
    pub fn acknowledge(&mut self, id: &str, actor: &Actor, now_ms: u64) -> AckResult {
        let by = actor.name();
        // No control characters, nor the invisible ones that make a name
        // look like another (bidirectional overrides, zero-width).
        let invisible = |c: char| {
            c.is_control()
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
        };
        if by.is_empty() || by.len() > 128 || by.chars().any(invisible) {
            return Err(AckRefusal::Invalid(
                "who acknowledges must be named (1-128 bytes, no control characters)".into(),
            ));
        }
        let on_wards = |a: &Alarm| match actor.wards() {
            None => true,
            Some(ws) => a.ward.as_ref().is_some_and(|w| ws.contains(w)),
        };
        let Some(a) = self.active.values_mut().find(|a| a.id == id) else {
            return Err(match self.cleared.iter().rev().find(|a| a.id == id) {
                Some(c) if !on_wards(c) => AckRefusal::Unknown(id.to_owned()),
                Some(c) => AckRefusal::Cleared {
                    id: id.to_owned(),
                    cleared_ms: c.cleared_ms.unwrap_or(c.updated_ms),
                },
                None => AckRefusal::Unknown(id.to_owned()),
            });
        };
        if !on_wards(a) {
            // As if there were none: a station learns nothing of other
            // wards' alarms.
            return Err(AckRefusal::Unknown(id.to_owned()));
        }
        if let Some(prev) = &a.ack {
            return Err(AckRefusal::AlreadyAcknowledged {
                id: id.to_owned(),
                by: prev.by.clone(),
                at_ms: prev.at_ms,
            });
        }
        a.ack = Some(Ack {
            by: by.to_owned(),
            at_ms: now_ms,
            via: Some(actor.via()),
        });
        a.updated_ms = now_ms;
        Ok(Event {
            alarm: a.clone(),
            kind: EventKind::Acknowledged,
            at_ms: now_ms,
            notify: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PatientSetting;

    const T0: u64 = 1_700_000_000_000;

    /// A mock clock: readings at device time `t`, processed at `t`.
    struct Rig {
        e: Engine,
        seq: u64,
    }

    impl Rig {
        fn new(cfg: AlertsConfig) -> Self {
            Rig {
                e: Engine::new(cfg),
                seq: 0,
            }
        }
        fn read(&mut self, patient: &str, t: u64, m: &[(&str, f64)]) -> Vec<Event> {
            self.seq += 1;
            let r = LoggedReading {
                partition: 0,
                log_index: self.seq - 1,
                device: format!("did:key:dev-{patient}"),
                seq: self.seq,
                time_ms: t,
                patient: Some(patient.to_owned()),
                ward: Some("ward-7".into()),
                measurements: m.iter().map(|(c, v)| ((*c).to_owned(), *v)).collect(),
            };
            self.e.reading(&r, t)
        }
    }

    fn only_thresholds(rules: Vec<ThresholdRule>) -> AlertsConfig {
        AlertsConfig {
            thresholds: rules,
            news2: crate::config::News2Rule {
                enabled: false,
                ..Default::default()
            },
            silent_after_ms: None,
            ..Default::default()
        }
    }

    fn spo2_rule(for_ms: u64, repeat: u32) -> ThresholdRule {
        ThresholdRule {
            id: "spo2-low".into(),
            codes: vec!["2708-6".into()],
            op: Op::Below,
            value: 88.0,
            for_ms,
            repeat,
            clear_value: Some(90.0),
            clear_for_ms: 30_000,
            severity: Severity::Urgent,
        }
    }

    fn kinds(ev: &[Event]) -> Vec<EventKind> {
        ev.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_threshold_fires_after_its_duration_and_only_once() {
        let mut r = Rig::new(only_thresholds(vec![spo2_rule(30_000, 1)]));
        for i in 0..6 {
            // 0, 5, …, 25 s: holding, not yet long enough.
            assert!(
                r.read("p1", T0 + i * 5_000, &[("2708-6", 85.0)]).is_empty(),
                "{i}"
            );
        }
        let ev = r.read("p1", T0 + 30_000, &[("2708-6", 84.0)]);
        assert_eq!(kinds(&ev), [EventKind::Raised]);
        let a = &ev[0].alarm;
        assert_eq!((a.rule.as_str(), a.subject.as_str()), ("spo2-low", "p1"));
        assert_eq!(a.severity, Severity::Urgent);
        assert_eq!(a.ward.as_deref(), Some("ward-7"));
        // The evidence is the run: seven readings with their log positions.
        assert_eq!(a.evidence.len(), 7);
        assert_eq!(a.evidence[0].log_index, 0);
        assert_eq!(a.evidence[6].value, 84.0);
        // Deduplicated: the condition keeps holding and nothing refires.
        for i in 7..40 {
            assert!(r.read("p1", T0 + i * 5_000, &[("2708-6", 80.0)]).is_empty());
        }
        assert_eq!(r.e.active().count(), 1);
        // A run broken by a normal reading starts again.
        let mut r = Rig::new(only_thresholds(vec![spo2_rule(30_000, 1)]));
        r.read("p1", T0, &[("2708-6", 85.0)]);
        r.read("p1", T0 + 20_000, &[("2708-6", 95.0)]);
        assert!(r.read("p1", T0 + 30_000, &[("2708-6", 85.0)]).is_empty());
        assert!(r.read("p1", T0 + 59_000, &[("2708-6", 85.0)]).is_empty());
        assert_eq!(
            kinds(&r.read("p1", T0 + 60_000, &[("2708-6", 85.0)])),
            [EventKind::Raised]
        );
    }

    #[test]
    fn two_episodes_at_one_log_time_have_two_ids() {
        let mut rule = spo2_rule(0, 1);
        rule.clear_for_ms = 0;
        let mut r = Rig::new(only_thresholds(vec![rule]));
        let mut at = |v: f64, t: u64| {
            r.seq += 1;
            let x = LoggedReading {
                partition: 0,
                log_index: r.seq,
                device: "d".into(),
                seq: r.seq,
                time_ms: t,
                patient: Some("p".into()),
                ward: None,
                measurements: vec![("2708-6".into(), v)],
            };
            r.e.reading(&x, T0)
        };
        let a = at(80.0, T0)[0].alarm.id.clone();
        assert_eq!(at(95.0, T0 + 1)[0].kind, EventKind::Cleared);
        let b = at(80.0, T0 + 2)[0].alarm.id.clone();
        assert_ne!(a, b);
    }

    #[test]
    fn a_repeat_condition_counts_consecutive_readings() {
        let mut r = Rig::new(only_thresholds(vec![spo2_rule(0, 3)]));
        assert!(r.read("p1", T0, &[("2708-6", 85.0)]).is_empty());
        assert!(r.read("p1", T0 + 1, &[("2708-6", 85.0)]).is_empty());
        assert!(r.read("p1", T0 + 2, &[("2708-6", 97.0)]).is_empty());
        assert!(r.read("p1", T0 + 3, &[("2708-6", 85.0)]).is_empty());
        assert!(r.read("p1", T0 + 4, &[("2708-6", 85.0)]).is_empty());
        assert_eq!(
            kinds(&r.read("p1", T0 + 5, &[("2708-6", 85.0)])),
            [EventKind::Raised]
        );
        // Other patients and other codes are their own.
        assert!(r.read("p2", T0 + 6, &[("2708-6", 85.0)]).is_empty());
        assert!(r.read("p1", T0 + 7, &[("8867-4", 20.0)]).is_empty());
    }

    #[test]
    fn clearing_has_hysteresis_in_value_and_time() {
        let mut r = Rig::new(only_thresholds(vec![spo2_rule(0, 1)]));
        assert_eq!(
            kinds(&r.read("p1", T0, &[("2708-6", 85.0)])),
            [EventKind::Raised]
        );
        // 89 is no longer below 88, but not back past 90: still active.
        for i in 1..20 {
            assert!(r.read("p1", T0 + i * 5_000, &[("2708-6", 89.0)]).is_empty());
        }
        // Back at 92, but a dip to 89 restarts the 30 s.
        let t = T0 + 100_000;
        assert!(r.read("p1", t, &[("2708-6", 92.0)]).is_empty());
        assert!(r.read("p1", t + 20_000, &[("2708-6", 89.0)]).is_empty());
        assert!(r.read("p1", t + 25_000, &[("2708-6", 92.0)]).is_empty());
        assert!(r.read("p1", t + 50_000, &[("2708-6", 92.0)]).is_empty());
        let ev = r.read("p1", t + 55_000, &[("2708-6", 93.0)]);
        assert_eq!(kinds(&ev), [EventKind::Cleared]);
        assert!(!ev[0].alarm.active);
        assert_eq!(ev[0].alarm.cleared_ms, Some(t + 55_000));
        assert_eq!(r.e.active().count(), 0);
        assert_eq!(r.e.cleared().count(), 1);
        // A new episode is a new alarm.
        let ev = r.read("p1", t + 60_000, &[("2708-6", 80.0)]);
        assert_eq!(kinds(&ev), [EventKind::Raised]);
        assert_ne!(ev[0].alarm.id, r.e.cleared().next().unwrap().id);
    }

    #[test]
    fn unacknowledged_alarms_escalate_and_acknowledged_ones_do_not() {
        let mut cfg = only_thresholds(vec![spo2_rule(0, 1)]);
        cfg.escalate_after_ms = 300_000;
        cfg.escalation = vec!["charge-nurse".into(), "rapid-response".into()];
        let mut r = Rig::new(cfg);
        let id = r.read("p1", T0, &[("2708-6", 85.0)])[0].alarm.id.clone();
        let id2 = r.read("p2", T0, &[("2708-6", 85.0)])[0].alarm.id.clone();
        let kim = Actor::Viewer {
            name: "nurse.kim".into(),
            wards: vec!["ward-7".into()],
        };
        let lee = Actor::Operator {
            name: "nurse.lee".into(),
        };
        let stranger = Actor::Viewer {
            name: "nurse.ng".into(),
            wards: vec!["ward-1".into()],
        };
        assert_eq!(
            r.e.acknowledge(&id2, &stranger, T0 + 59_000),
            Err(AckRefusal::Unknown(id2.clone())),
            "another ward's station"
        );
        let ack = r.e.acknowledge(&id2, &kim, T0 + 60_000).unwrap();
        assert_eq!(ack.kind, EventKind::Acknowledged);
        assert_eq!(
            ack.alarm.ack,
            Some(Ack {
                by: "nurse.kim".into(),
                at_ms: T0 + 60_000,
                via: Some(AckVia::Viewer),
            })
        );
        assert_eq!(
            r.e.acknowledge(&id2, &lee, T0 + 61_000),
            Err(AckRefusal::AlreadyAcknowledged {
                id: id2.clone(),
                by: "nurse.kim".into(),
                at_ms: T0 + 60_000
            }),
            "twice"
        );
        assert_eq!(
            r.e.acknowledge("news2/nobody/1", &lee, T0),
            Err(AckRefusal::Unknown("news2/nobody/1".into()))
        );
        let nobody = Actor::Operator { name: "".into() };
        assert!(matches!(
            r.e.acknowledge(&id, &nobody, T0),
            Err(AckRefusal::Invalid(_))
        ));
        for odd in ["a\u{7}", "kim\u{202E}eel", "k\u{200B}im"] {
            let who = Actor::Operator { name: odd.into() };
            assert!(
                matches!(r.e.acknowledge(&id, &who, T0), Err(AckRefusal::Invalid(_))),
                "{odd:?}"
            );
        }
        assert!(r.e.tick(T0 + 299_999).is_empty());
        let ev = r.e.tick(T0 + 300_000);
        assert_eq!(kinds(&ev), [EventKind::Escalated]);
        assert_eq!(ev[0].alarm.id, id);
        assert_eq!(ev[0].notify.as_deref(), Some("charge-nurse"));
        assert!(r.e.tick(T0 + 300_500).is_empty(), "once per level");
        let ev = r.e.tick(T0 + 600_000);
        assert_eq!(ev[0].notify.as_deref(), Some("rapid-response"));
        assert_eq!(ev[0].alarm.escalation, 2);
        assert!(
            r.e.tick(T0 + 10_000_000).is_empty(),
            "the table is exhausted"
        );
        // Acknowledging stops nothing retroactively but is recorded.
        let ev = r.e.acknowledge(&id, &lee, T0 + 700_000).unwrap();
        assert_eq!(ev.alarm.escalation, 2);
        assert_eq!(ev.alarm.ack.unwrap().via, Some(AckVia::Operator));
        // Cleared: told apart from unknown, and still not another ward's.
        let ev = r.read("p2", T0 + 800_000, &[("2708-6", 95.0)]);
        let ev2 = r.read("p2", T0 + 900_000, &[("2708-6", 95.0)]);
        let cleared = ev.iter().chain(&ev2).find(|e| e.kind == EventKind::Cleared);
        let cleared_ms = cleared.expect("p2 clears").alarm.cleared_ms.unwrap();
        assert_eq!(
            r.e.acknowledge(&id2, &lee, T0 + 901_000),
            Err(AckRefusal::Cleared {
                id: id2.clone(),
                cleared_ms
            })
        );
        assert_eq!(
            r.e.acknowledge(&id2, &stranger, T0 + 901_000),
            Err(AckRefusal::Unknown(id2.clone()))
        );
    }

    #[test]
    fn news2_fires_urgent_then_updates_to_emergency_then_clears() {
        let cfg = AlertsConfig {
            thresholds: vec![],
            silent_after_ms: None,
            ..Default::default()
        };
        let mut r = Rig::new(cfg);
        // Normal: nothing.
        let ok = [
            ("9279-1", 16.0),
            ("2708-6", 97.0),
            ("8480-6", 120.0),
            ("8867-4", 75.0),
            ("8310-5", 37.0),
        ];
        assert!(r.read("p1", T0, &ok).is_empty());
        // Pulse 115 (2), RR 22 (2), temp 38.5 (1): 5, urgent.
        let ev = r.read(
            "p1",
            T0 + 1_000,
            &[("8867-4", 115.0), ("9279-1", 22.0), ("8310-5", 38.5)],
        );
        assert_eq!(kinds(&ev), [EventKind::Raised]);
        assert_eq!(ev[0].alarm.severity, Severity::Urgent);
        assert!(
            ev[0].alarm.reason.starts_with("NEWS2 5 (medium)"),
            "{}",
            ev[0].alarm.reason
        );
        assert!(ev[0].alarm.reason.contains("missing consciousness"));
        assert_eq!(ev[0].alarm.evidence.len(), 5, "the five fresh values");
        // Still 5: no refire.
        assert!(r.read("p1", T0 + 2_000, &[("8867-4", 116.0)]).is_empty());
        let id = ev[0].alarm.id.clone();
        let nurse = Actor::Viewer {
            name: "nurse.kim".into(),
            wards: vec!["ward-7".into()],
        };
        r.e.acknowledge(&id, &nurse, T0 + 2_500).unwrap();
        // SpO2 93 (2), SBP 100 (2): 9, emergency: an update, not a new alarm,
        // and the acknowledgement of the urgent one no longer holds.
        let ev = r.read("p1", T0 + 3_000, &[("2708-6", 93.0), ("8480-6", 100.0)]);
        assert_eq!(kinds(&ev), [EventKind::Updated]);
        assert_eq!(ev[0].alarm.severity, Severity::Emergency);
        assert_eq!(ev[0].alarm.ack, None, "a rise must be acknowledged again");
        let ack = r.e.acknowledge(&id, &nurse, T0 + 3_500).unwrap();
        assert_eq!(ack.alarm.severity, Severity::Emergency);
        assert_eq!(r.e.news2("p1", T0 + 3_000).unwrap().total, 9);
        // Back to normal: clears after 60 s at or below 3, not before.
        let t = T0 + 10_000;
        assert!(r.read("p1", t, &ok).is_empty());
        assert!(r.read("p1", t + 59_000, &ok).is_empty());
        assert_eq!(kinds(&r.read("p1", t + 60_000, &ok)), [EventKind::Cleared]);
        // A single parameter scoring 3 is urgent on its own.
        let ev = r.read("p1", t + 70_000, &[("2708-6", 90.0)]);
        assert_eq!(kinds(&ev), [EventKind::Raised]);
        assert!(
            ev[0].alarm.reason.contains("3 in spo2"),
            "{}",
            ev[0].alarm.reason
        );
    }

    #[test]
    fn news2_uses_each_patients_scale_and_ignores_stale_values() {
        let mut cfg = AlertsConfig {
            thresholds: vec![],
            silent_after_ms: None,
            ..Default::default()
        };
        cfg.patients.insert(
            "copd".into(),
            PatientSetting {
                spo2_scale: scale2(),
                oxygen: false,
            },
        );
        let mut r = Rig::new(cfg);
        // 89 % is 3 on scale 1, 0 on scale 2.
        assert_eq!(
            kinds(&r.read("p1", T0, &[("2708-6", 89.0)])),
            [EventKind::Raised]
        );
        assert!(r.read("copd", T0, &[("2708-6", 89.0)]).is_empty());
        // A pulse of 140 (3) five minutes stale is missing, not scored.
        let mut r = Rig::new(AlertsConfig {
            thresholds: vec![],
            silent_after_ms: None,
            ..Default::default()
        });
        assert_eq!(
            kinds(&r.read("p3", T0, &[("8867-4", 140.0)])),
            [EventKind::Raised]
        );
        let s = r.e.news2("p3", T0 + 300_001).unwrap();
        assert!(s.missing.contains(&"pulse"), "{s:?}");
    }

    #[test]
    fn news2_does_not_clear_when_a_sensor_falls_off_nor_stop_on_a_sentinel() {
        let mut r = Rig::new(AlertsConfig {
            thresholds: vec![],
            silent_after_ms: None,
            ..Default::default()
        });
        // SpO2 90 (3) and pulse 80 (0): urgent.
        let ev = r.read("p1", T0, &[("2708-6", 90.0), ("8867-4", 80.0)]);
        assert_eq!(kinds(&ev), [EventKind::Raised]);
        // The oximeter falls off: only the pulse keeps coming, scoring 0,
        // for ten minutes. SpO2 is missing, not recovered: still active.
        for i in 1..=60 {
            assert!(
                r.read("p1", T0 + i * 10_000, &[("8867-4", 80.0)])
                    .is_empty(),
                "{i}"
            );
        }
        assert_eq!(r.e.active().count(), 1);
        // A sentinel pulse is missing, and the rest is still scored.
        let s = r.e.news2("p1", T0 + 600_000).unwrap();
        assert!(s.missing.contains(&"spo2"), "{s:?}");
        r.read(
            "p1",
            T0 + 601_000,
            &[("8867-4", 4_294_967_295.0), ("2708-6", 85.0)],
        );
        let s = r.e.news2("p1", T0 + 601_000).unwrap();
        assert!(s.missing.contains(&"pulse"), "{s:?}");
        assert_eq!(s.parameters["spo2"], 3, "{s:?}");
    }

    fn scale2() -> news2::SpO2Scale {
        news2::SpO2Scale::Scale2
    }

    #[test]
    fn a_silent_device_raises_once_and_clears_when_it_speaks() {
        let mut cfg = only_thresholds(vec![]);
        cfg.silent_after_ms = Some(300_000);
        let mut r = Rig::new(cfg);
        r.read("p1", T0, &[("8867-4", 70.0)]);
        assert!(r.e.tick(T0 + 299_999).is_empty());
        let ev = r.e.tick(T0 + 300_000);
        assert_eq!(kinds(&ev), [EventKind::Raised]);
        assert_eq!(ev[0].alarm.rule, "device-silent");
        assert_eq!(ev[0].alarm.severity, Severity::Warning);
        assert!(r.e.tick(T0 + 400_000).is_empty(), "raised once");
        let ev = r.read("p1", T0 + 500_000, &[("8867-4", 70.0)]);
        assert_eq!(kinds(&ev), [EventKind::Cleared]);
    }

    #[test]
    fn state_is_bounded() {
        let mut cfg = only_thresholds(vec![spo2_rule(0, 1)]);
        cfg.max_patients = 2;
        cfg.keep_cleared = 3;
        let mut r = Rig::new(cfg);
        for p in ["a", "b", "c", "d"] {
            r.read(p, T0, &[("2708-6", 97.0)]);
        }
        assert_eq!(r.e.patients(), 2);
        assert_eq!(r.e.dropped_patients, 2);
        for i in 0..10 {
            r.read("a", T0 + i * 100_000, &[("2708-6", 80.0)]);
            r.read("a", T0 + i * 100_000 + 1, &[("2708-6", 97.0)]);
            r.read("a", T0 + i * 100_000 + 40_000, &[("2708-6", 97.0)]);
        }
        assert_eq!(r.e.cleared().count(), 3);
    }

    #[test]
    fn a_device_whose_clock_is_slow_alarms_and_its_backlog_does_not() {
        let mut r = Rig::new(AlertsConfig {
            silent_after_ms: None,
            ..Default::default()
        });
        // Ten minutes slow: every reading's device time is 10 min behind
        // the log's. Judged by its own clock's offset, it is current.
        let slow = |i: u64, dev: &str, t: u64, spo2: f64| LoggedReading {
            partition: 0,
            log_index: i,
            device: dev.into(),
            seq: i + 1,
            time_ms: t - 600_000,
            patient: Some(format!("patient-{dev}")),
            ward: Some("ward-7".into()),
            measurements: vec![("2708-6".into(), spo2)],
        };
        let mut ev = Vec::new();
        for i in 0..4 {
            ev.extend(r.e.reading(&slow(i, "a", T0 + i * 5_000, 97.0), T0 + i * 5_000 + 150));
        }
        assert!(ev.is_empty());
        for i in 4..12 {
            ev.extend(r.e.reading(&slow(i, "a", T0 + i * 5_000, 84.0), T0 + i * 5_000 + 150));
        }
        let rules: Vec<&str> = ev.iter().map(|e| e.alarm.rule.as_str()).collect();
        assert_eq!(rules, ["news2", "spo2-low"], "{ev:#?}");
        assert_eq!(
            r.e.news2("patient-a", T0 + 60_000).unwrap().parameters["spo2"],
            3,
            "its values are fresh"
        );
        // Another slow device streams normally, goes offline for an hour,
        // and syncs its first half-hour offline at once: history, no alarm.
        for i in 0..4 {
            assert!(
                r.e.reading(&slow(i, "b", T0 + i * 5_000, 97.0), T0 + i * 5_000 + 150)
                    .is_empty()
            );
        }
        let back = T0 + 3_600_000;
        for i in 0..360 {
            let t = T0 + 20_000 + i * 5_000;
            assert!(
                r.e.reading(&slow(100 + i, "b", t, 70.0), back + i)
                    .is_empty(),
                "reading {i} of the backlog raised"
            );
        }
        // Then it streams again, still slow: current, so it alarms.
        let mut ev = Vec::new();
        for i in 0..8 {
            let t = back + 10_000 + i * 5_000;
            ev.extend(r.e.reading(&slow(500 + i, "b", t, 84.0), t + 150));
        }
        assert!(!ev.is_empty(), "back online and current");
    }

    #[test]
    fn idle_patients_and_devices_are_forgotten_so_the_caps_free_up() {
        let hour = 3_600_000;
        let mut r = Rig::new(AlertsConfig {
            max_patients: 2,
            max_devices: 3,
            forget_after_ms: hour,
            silent_after_ms: None,
            ..Default::default()
        });
        // Two patients fill the cap; one of them has an active alarm.
        r.read("p1", T0, &[("2708-6", 97.0)]);
        let ev = r.read("p2", T0, &[("2708-6", 80.0)]);
        assert!(!ev.is_empty(), "p2 is alarmed");
        assert!(r.read("p3", T0 + 1, &[("2708-6", 80.0)]).is_empty());
        assert_eq!(r.e.dropped_patients, 1, "the cap held p3 out");
        // An hour of silence: p1 is forgotten, p2 kept (its alarm is
        // active); so are the three devices (p2's alarm is about p2, and
        // p3's device was seen though p3 was never scored).
        r.e.tick(T0 + hour + 60_000);
        assert_eq!(r.e.patients(), 1);
        assert_eq!(r.e.forgotten, 4);
        // So p3 is scored now.
        let ev = r.read("p3", T0 + hour + 61_000, &[("2708-6", 80.0)]);
        assert!(!ev.is_empty(), "p3 alarmed once there was room");
        assert_eq!(r.e.patients(), 2);
        // A state saved before the last reading's time was kept forgets
        // nobody at once: the first tick starts the patient's hour.
        let mut r = Rig::new(AlertsConfig {
            forget_after_ms: hour,
            silent_after_ms: None,
            ..Default::default()
        });
        r.read("p1", T0, &[("2708-6", 97.0)]);
        let json = String::from_utf8(r.e.to_json().unwrap())
            .unwrap()
            .replace("\"seen_ms\":", "\"old_seen_ms\":");
        let mut e = Engine::restore(json.as_bytes(), r.e.config.clone()).unwrap();
        e.tick(T0 + 10 * hour);
        assert_eq!(e.patients(), 1);
        e.tick(T0 + 11 * hour + 60_000);
        assert_eq!(e.patients(), 0);
    }

    #[test]
    fn with_the_shipped_defaults_a_device_gone_for_good_is_forgotten_too() {
        let hour = 3_600_000;
        let mut r = Rig::new(AlertsConfig {
            forget_after_ms: hour,
            ..Default::default()
        });
        r.read("p1", T0, &[("2708-6", 97.0)]);
        let ev = r.e.tick(T0 + 300_000);
        assert_eq!(kinds(&ev), [EventKind::Raised], "silent after 5 min");
        assert!(r.e.tick(T0 + hour - 1).is_empty());
        let ev = r.e.tick(T0 + hour + 60_000);
        assert_eq!(kinds(&ev), [EventKind::Cleared], "{ev:#?}");
        assert!(ev[0].alarm.reason.contains("forgotten"));
        assert_eq!(r.e.patients(), 0);
        assert_eq!(r.e.active().count(), 0);
        // Back a day later with its old clock offset, not a new one: a
        // backlog from yesterday is history.
        let old = LoggedReading {
            partition: 0,
            log_index: 99,
            device: "did:key:dev-p1".into(),
            seq: 99,
            time_ms: T0 + 10_000,
            patient: Some("p1".into()),
            ward: Some("ward-7".into()),
            measurements: vec![("2708-6".into(), 70.0)],
        };
        assert!(r.e.reading(&old, T0 + 24 * hour).is_empty());
        assert_eq!(r.e.late_readings, 1);
    }

    #[test]
    fn holds_add_up_across_a_patients_devices_whatever_their_clocks() {
        let mut r = Rig::new(only_thresholds(vec![spo2_rule(30_000, 1)]));
        let reading = |dev: &str, i: u64, t: u64, spo2: f64| LoggedReading {
            partition: 0,
            log_index: i,
            device: dev.into(),
            seq: i,
            time_ms: t,
            patient: Some("p1".into()),
            ward: Some("ward-7".into()),
            measurements: vec![("2708-6".into(), spo2)],
        };
        // A device ten minutes slow, then an accurate one, 5 s apart on the
        // log: the 30 s hold has not passed.
        let slow = reading("did:key:slow", 1, T0 - 600_000, 84.0);
        assert!(r.e.reading(&slow, T0).is_empty());
        let ok = reading("did:key:ok", 2, T0 + 5_000, 84.0);
        assert!(
            r.e.reading(&ok, T0 + 5_000).is_empty(),
            "held 5 s, not 10 min"
        );
        let ok = reading("did:key:ok", 3, T0 + 30_000, 84.0);
        assert_eq!(kinds(&r.e.reading(&ok, T0 + 30_000)), [EventKind::Raised]);
    }

    #[test]
    fn late_readings_and_unknown_codes_change_nothing_now() {
        let mut r = Rig::new(only_thresholds(vec![spo2_rule(0, 1)]));
        // The device streamed (its clock on time), then went offline.
        r.read("p1", T0 - 5_000, &[("2708-6", 97.0)]);
        // An offline sync an hour late: SpO2 80 then, but not an episode now.
        let late = LoggedReading {
            partition: 0,
            log_index: 0,
            device: "did:key:dev-p1".into(),
            seq: 1,
            time_ms: T0,
            patient: Some("p1".into()),
            ward: None,
            measurements: vec![("2708-6".into(), 80.0)],
        };
        assert!(r.e.reading(&late, T0 + 3_600_000).is_empty());
        assert_eq!(r.e.active().count(), 0);
        // Nor does it replace a live value: SpO2 90 (3) now, then the late 97.
        let now = T0 + 3_600_000;
        r.read("p2", now, &[("2708-6", 90.0)]);
        let mut late2 = late.clone();
        late2.patient = Some("p2".into());
        late2.measurements = vec![("2708-6".into(), 97.0)];
        r.e.reading(&late2, now + 1);
        assert_eq!(r.e.news2("p2", now + 1).unwrap().parameters["spo2"], 3);
        // Thousands of distinct codes keep no state beyond NEWS2's.
        for i in 0..2_000u64 {
            let m = [(format!("{}-{}", 10_000 + i, i % 10), 1.0)];
            let m: Vec<(&str, f64)> = m.iter().map(|(c, v)| (c.as_str(), *v)).collect();
            r.read("p1", T0 + i, &m);
        }
        assert!(
            r.e.to_json().unwrap().len() < 4_096,
            "state grew with codes"
        );
    }

    use proptest::prelude::*;

    proptest! {
        /// A restart at any point (the state saved and restored) changes
        /// nothing: the same events as an engine that never stopped.
        #[test]
        fn a_restart_anywhere_changes_nothing(
            values in proptest::collection::vec((70.0f64..100.0, 1u64..20_000, any::<bool>()), 1..80),
            cut in 0usize..80,
        ) {
            let cfg = AlertsConfig {
                silent_after_ms: Some(15_000),
                escalate_after_ms: 30_000,
                ..Default::default()
            };
            let run = |restart: Option<usize>| {
                let mut r = Rig::new(cfg.clone());
                let mut t = T0;
                let mut out = Vec::new();
                for (i, (v, dt, hr)) in values.iter().enumerate() {
                    if Some(i) == restart {
                        r.e = Engine::restore(&r.e.to_json().unwrap(), cfg.clone()).unwrap();
                    }
                    t += dt;
                    out.extend(r.e.tick(t));
                    let m = if *hr { ("8867-4", v + 60.0) } else { ("2708-6", *v) };
                    out.extend(r.read("p1", t, &[m]));
                }
                out
            };
            prop_assert_eq!(run(None), run(Some(cut)));
        }
    }
}

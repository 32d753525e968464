//! FHIR R4 for alarm events: each event as a `Communication`
//! (`docs/alerts.md` §FHIR), what a webhook receives.
//!
//! References are logical (by identifier), so nothing here depends on a
//! FHIR server's resource IDs:
//! - the patient: `urn:vitaltrail:patient` and the registry's patient ID;
//! - a device: `urn:ietf:rfc:3986` and its `did:key`;
//! - a triggering reading: [`READING_SYSTEM`] and `<partition>/<leaf index>/<LOINC code>`,
//!   the identifier the reading's Observation carries.
use serde_json::{Value, json};

use crate::engine::{Event, EventKind, Severity};

/// The identifier system of an alarm (`Alarm.id`).
pub const ALARM_SYSTEM: &str = "urn:vitaltrail:alarm";
/// The identifier system of one alarm event: [`event_key`].
pub const EVENT_SYSTEM: &str = "urn:vitaltrail:alarm-event";
/// The identifier system of patients (the registry's patient IDs).
pub const PATIENT_SYSTEM: &str = "urn:vitaltrail:patient";
/// The identifier system of a reading's measurement in the log.
pub const READING_SYSTEM: &str = "urn:vitaltrail:reading";
/// The code system of alarm event kinds (`raised`, `updated`, …).
pub const KIND_SYSTEM: &str = "urn:vitaltrail:alarm-event-kind";
/// The code system of alert rules (`news2`, `device-silent`, threshold IDs).
pub const RULE_SYSTEM: &str = "urn:vitaltrail:alert-rule";
/// The extension carrying the alarm's severity by name.
pub const SEVERITY_EXTENSION: &str = "urn:vitaltrail:fhir:alarm-severity";

/// The key that names one event of one alarm, the same every time the
/// event is delivered (and when a rebuild raises it again), so a receiver
/// drops repeats by it: `<alarm id>#<kind>`, with the severity reached for
/// `updated` (severity only rises while an alarm is active, so each is
/// reached once) and the level for `escalated`.
pub fn event_key(e: &Event) -> String {
    match e.kind {
        EventKind::Updated => format!("{}#updated-{}", e.alarm.id, e.alarm.severity.as_str()),
        EventKind::Escalated => format!("{}#escalated-{}", e.alarm.id, e.alarm.escalation),
        k => format!("{}#{}", e.alarm.id, k.as_str()),
    }
}

/// FHIR `request-priority` of a severity: `routine`, `urgent`, `stat`.
pub fn priority(s: Severity) -> &'static str {
    match s {
        Severity::Warning => "routine",
        Severity::Urgent => "urgent",
        Severity::Emergency => "stat",
    }
}

/// RFC 3339 UTC with milliseconds (a FHIR `instant`).
pub fn instant(ms: u64) -> String {
    // Past year 9999 (a damaged time): the latest instant, never a panic.
    let t = time::OffsetDateTime::UNIX_EPOCH
        .checked_add(time::Duration::milliseconds(
            i64::try_from(ms).unwrap_or(i64::MAX),
        ))
        .filter(|t| t.year() <= 9999)
        .unwrap_or(time::macros::datetime!(9999-12-31 23:59:59.999 UTC));
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_owned())
}

/// The identifier value of a reading's measurement: `<partition>/<leaf index>/<code>`.
pub fn reading_id(partition: u32, log_index: u64, code: &str) -> String {
    format!("{partition}/{log_index}/{code}")
}

/// The event as a FHIR R4 `Communication` resource.
pub fn communication(e: &Event) -> Value {
    let a = &e.alarm;
    let what = match e.kind {
        EventKind::Raised => "raised",
        EventKind::Updated => "severity rose",
        EventKind::Escalated => "escalated",
        EventKind::Acknowledged => "acknowledged",
        EventKind::Cleared => "cleared",
    };
    let mut text = format!(
        "{} alarm {} {what}: {}",
        a.severity.as_str(),
        a.rule,
        a.reason
    );
    if let Some(n) = &e.notify {
        text.push_str(&format!("; tell {n}"));
    }
    if let Some(ack) = &a.ack {
        text.push_str(&format!(
            "; acknowledged by {}{} at {}",
            ack.by,
            match ack.via {
                Some(crate::ack::AckVia::Operator) => " (through the operator)",
                _ => "",
            },
            instant(ack.at_ms)
        ));
    }
    let about: Vec<Value> = a
        .evidence
        .iter()
        .map(|ev| {
            json!({
                "type": "Observation",
                "identifier": {
                    "system": READING_SYSTEM,
                    "value": reading_id(ev.partition, ev.log_index, &ev.code),
                },
                "display": format!("{} = {} at {} ({} seq {})", ev.code, ev.value, instant(ev.time_ms), ev.device, ev.seq),
            })
        })
        .collect();
    let mut c = json!({
        "resourceType": "Communication",
        "identifier": [
            {"system": ALARM_SYSTEM, "value": a.id},
            {"system": EVENT_SYSTEM, "value": event_key(e)},
        ],
        "status": "completed",
        "category": [{
            "coding": [{"system": KIND_SYSTEM, "code": e.kind.as_str()}],
            "text": e.kind.as_str(),
        }],
        "priority": priority(a.severity),
        "extension": [{"url": SEVERITY_EXTENSION, "valueCode": a.severity.as_str()}],
        "sent": instant(e.at_ms),
        "reasonCode": [{
            "coding": [{"system": RULE_SYSTEM, "code": a.rule}],
            "text": a.reason,
        }],
        "payload": [{"contentString": text}],
    });
    let obj = c.as_object_mut().expect("a JSON object");
    let patient = a
        .patient
        .as_deref()
        .or((a.rule != "device-silent").then_some(a.subject.as_str()));
    if let Some(p) = patient {
        obj.insert(
            "subject".into(),
            json!({
                "type": "Patient",
                "identifier": {"system": PATIENT_SYSTEM, "value": p},
            }),
        );
    }
    if a.rule == "device-silent" {
        obj.insert(
            "about".into(),
            json!([{
                "type": "Device",
                "identifier": {"system": "urn:ietf:rfc:3986", "value": a.subject},
            }]),
        );
    } else if !about.is_empty() {
        obj.insert("about".into(), Value::Array(about));
    }
    if let Some(n) = &e.notify {
        obj.insert("recipient".into(), json!([{ "display": n }]));
    }
    if let Some(w) = &a.ward {
        obj.insert("note".into(), json!([{ "text": format!("ward {w}") }]));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Ack, Alarm, Evidence};

    fn event(kind: EventKind, severity: Severity, escalation: u32) -> Event {
        Event {
            alarm: Alarm {
                id: "news2/patient-1/1700000005005-1".into(),
                rule: "news2".into(),
                subject: "patient-1".into(),
                ward: Some("ward-3".into()),
                patient: Some("patient-1".into()),
                severity,
                reason: "NEWS2 7 (high)".into(),
                active: true,
                ack: None,
                raised_ms: 1_700_000_005_005,
                updated_ms: 1_700_000_005_005,
                cleared_ms: None,
                escalation,
                evidence: vec![Evidence {
                    device: "did:key:z6Mkexample".into(),
                    seq: 2,
                    partition: 0,
                    log_index: 1,
                    time_ms: 1_700_000_005_000,
                    code: "2708-6".into(),
                    value: 84.0,
                }],
            },
            kind,
            at_ms: 1_700_000_005_005,
            notify: None,
        }
    }

    /// Each event of an alarm has its own key, the same every time.
    #[test]
    fn event_keys_name_each_event_of_an_alarm_once() {
        let keys: Vec<String> = [
            event(EventKind::Raised, Severity::Urgent, 0),
            event(EventKind::Updated, Severity::Emergency, 0),
            event(EventKind::Escalated, Severity::Emergency, 1),
            event(EventKind::Escalated, Severity::Emergency, 2),
            event(EventKind::Acknowledged, Severity::Emergency, 2),
            event(EventKind::Cleared, Severity::Emergency, 2),
        ]
        .iter()
        .map(event_key)
        .collect();
        let unique: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        assert_eq!(keys[1], "news2/patient-1/1700000005005-1#updated-emergency");
        assert_eq!(keys[2], "news2/patient-1/1700000005005-1#escalated-1");
        assert_eq!(
            event_key(&event(EventKind::Raised, Severity::Urgent, 0)),
            keys[0]
        );
    }

    #[test]
    fn instants_of_any_time_never_panic() {
        assert_eq!(instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(instant(100_000_000_000_000_000), "9999-12-31T23:59:59.999Z");
        assert_eq!(instant(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_communication_carries_the_alarm_its_evidence_and_the_patient() {
        let mut e = event(EventKind::Escalated, Severity::Emergency, 1);
        e.notify = Some("charge-nurse".into());
        e.alarm.ack = Some(Ack {
            by: "nurse-a".into(),
            at_ms: 1_700_000_006_000,
            via: None,
        });
        let c = communication(&e);
        assert_eq!(c["resourceType"], "Communication");
        assert_eq!(c["status"], "completed");
        assert_eq!(c["priority"], "stat");
        assert_eq!(c["identifier"][0]["value"], e.alarm.id);
        assert_eq!(c["identifier"][1]["value"], event_key(&e));
        assert_eq!(c["category"][0]["coding"][0]["code"], "escalated");
        assert_eq!(c["sent"], "2023-11-14T22:13:25.005Z");
        assert_eq!(c["subject"]["identifier"]["value"], "patient-1");
        assert_eq!(c["about"][0]["identifier"]["value"], "0/1/2708-6");
        assert_eq!(
            c["about"][0]["display"],
            "2708-6 = 84 at 2023-11-14T22:13:25.000Z (did:key:z6Mkexample seq 2)"
        );
        assert_eq!(c["recipient"][0]["display"], "charge-nurse");
        assert_eq!(c["extension"][0]["valueCode"], "emergency");
        let text = c["payload"][0]["contentString"].as_str().unwrap();
        assert!(text.contains("tell charge-nurse"), "{text}");
        assert!(text.contains("acknowledged by nurse-a"), "{text}");
        // A silent device: about the device, for its patient (when recorded).
        let mut s = event(EventKind::Raised, Severity::Warning, 0);
        s.alarm.rule = "device-silent".into();
        s.alarm.subject = "did:key:z6Mkexample".into();
        s.alarm.evidence.clear();
        let c = communication(&s);
        assert_eq!(c["subject"]["identifier"]["value"], "patient-1");
        s.alarm.patient = None;
        let c = communication(&s);
        assert!(c.get("subject").is_none(), "the device is no patient");
        assert_eq!(c["about"][0]["type"], "Device");
        assert_eq!(c["priority"], "routine");
    }
}

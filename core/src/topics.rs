//! MQTT topic names of devices (`docs/reading-envelope.md` §5), without I/O.
//!
//! A device publishes its readings to `vitals/<did>` and takes its receipts
//! from `receipts/<did>`. An authenticated broker (the embedded one's gate,
//! or Mosquitto with the ACL `vitaltrail mqtt mosquitto` writes) lets a
//! device touch nothing else.

/// Prefix of device topics.
pub const VITALS: &str = "vitals/";
/// Prefix of receipt topics.
pub const RECEIPTS: &str = "receipts/";
/// Prefix of the alert topics of nurse stations: `alerts/<ward>`.
pub const ALERTS: &str = "alerts/";

/// Whether `ward` can be one topic level: 1-64 bytes, no level separator,
/// wildcard, `$`, control character or whitespace.
pub fn ward_topic_safe(ward: &str) -> bool {
    !ward.is_empty()
        && ward.len() <= 64
        && !ward.starts_with('$')
        && ward
            .chars()
            .all(|c| !matches!(c, '/' | '+' | '#') && !c.is_control() && !c.is_whitespace())
}

/// Where a ward's alarm events are published. `None` for a ward that
/// cannot be one topic level ([`ward_topic_safe`]).
pub fn alerts_topic(ward: &str) -> Option<String> {
    ward_topic_safe(ward).then(|| format!("{ALERTS}{ward}"))
}

/// The filter that takes every device topic (a message on any topic under
/// it that is not exactly a device topic is dead-lettered).
pub const VITALS_FILTER: &str = "vitals/#";

/// Whether a string can be part of a topic: a well-formed `did:key` is
/// ASCII alphanumeric after its `did:key:` prefix (base58btc always is), so
/// it holds no level separator or wildcard.
fn topic_safe(did: &str) -> bool {
    did.strip_prefix("did:key:")
        .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Where a device publishes its readings. `None` for a string that is not
/// shaped like a `did:key` (never a topic a hostile string could shape).
pub fn vitals_topic(did: &str) -> Option<String> {
    topic_safe(did).then(|| format!("{VITALS}{did}"))
}

/// Where a device's receipts are published (same rules as [`vitals_topic`]).
pub fn receipts_topic(did: &str) -> Option<String> {
    topic_safe(did).then(|| format!("{RECEIPTS}{did}"))
}

/// The device a readings topic names, if the topic is exactly
/// `vitals/<one level>`. Anything else, such as `vitals/<did>/extra`, is
/// `None`.
pub fn vitals_device(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(VITALS)
        .filter(|d| !d.is_empty() && !d.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";

    #[test]
    fn a_ward_is_one_safe_topic_level() {
        assert_eq!(alerts_topic("ward-3").as_deref(), Some("alerts/ward-3"));
        assert_eq!(alerts_topic("Station Süd"), None, "whitespace");
        assert_eq!(alerts_topic("Süd").as_deref(), Some("alerts/Süd"));
        for bad in [
            "",
            "a/b",
            "+",
            "#",
            "w#",
            "$SYS",
            "a\u{0}b",
            &"x".repeat(65),
        ] {
            assert_eq!(alerts_topic(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn device_topics_round_trip() {
        let t = vitals_topic(DID).unwrap();
        assert_eq!(t, format!("vitals/{DID}"));
        assert_eq!(vitals_device(&t), Some(DID));
        assert_eq!(vitals_device(&receipts_topic(DID).unwrap()), None);
        for t in [
            "vitals/".to_owned(),
            format!("vitals/{DID}/extra"),
            format!("x/vitals/{DID}"),
        ] {
            assert_eq!(vitals_device(&t), None, "{t}");
        }
    }

    #[test]
    fn no_topic_for_a_string_that_is_not_a_did_key() {
        for bad in [
            "did:web:x",
            "did:key:",
            "did:key:a/b",
            "did:key:+",
            "did:key:#",
            "",
        ] {
            assert_eq!(vitals_topic(bad), None, "{bad}");
            assert_eq!(receipts_topic(bad), None, "{bad}");
        }
    }
}

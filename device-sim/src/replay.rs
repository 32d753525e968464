//! Replay of real data: a beat-to-beat (RR) interval file, the common export
//! of chest straps and HRV tools (one interval in milliseconds per line),
//! becomes heart-rate readings at the times the beats happened.

use vitaltrail_core::Measurement;
use vitaltrail_core::envelope::UnsignedReading;

/// RR intervals outside this range (ms) are not heartbeats (30–300 /min).
pub const RR_RANGE_MS: std::ops::RangeInclusive<f64> = 200.0..=2000.0;

/// A line of an RR file that is not an interval.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {reason}")]
pub struct RrError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Parse an RR file: one interval in ms per line; blank lines and lines
/// starting with `#` are skipped. Anything else that is not a plausible
/// interval is an error naming its line.
pub fn parse_rr(text: &str) -> Result<Vec<f64>, RrError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let v: f64 = line.parse().map_err(|_| RrError {
            line: i + 1,
            reason: format!("{line:?} is not a number of milliseconds"),
        })?;
        if !RR_RANGE_MS.contains(&v) {
            return Err(RrError {
                line: i + 1,
                reason: format!("{v} ms is not a plausible RR interval (200-2000 ms)"),
            });
        }
        out.push(v);
    }
    if out.is_empty() {
        return Err(RrError {
            line: 0,
            reason: "no RR intervals in the file".into(),
        });
    }
    Ok(out)
}

/// Beat times (ms, the first beat at 0) of a series of RR intervals.
pub fn rr_beat_times(rr: &[f64]) -> Vec<f64> {
    let mut t = 0.0;
    let mut times = Vec::with_capacity(rr.len() + 1);
    times.push(0.0);
    times.extend(rr.iter().map(|ms| {
        t += ms;
        t
    }));
    times
}

/// One heart-rate reading per beat after the first, at the time the beat
/// happened (`start_ms` + its offset), with HR = 60000 / RR from the beat
/// before. Intervals outside [`RR_RANGE_MS`] (a missed or extra beat) give
/// no reading. `source` names the data in the reading's `meta`.
pub fn beat_readings(
    beat_times_ms: &[f64],
    start_ms: u64,
    first_seq: u64,
    source: &str,
) -> Vec<UnsignedReading> {
    let mut seq = first_seq;
    beat_times_ms
        .windows(2)
        .filter_map(|w| {
            let ms = w[1] - w[0];
            if !RR_RANGE_MS.contains(&ms) {
                return None;
            }
            let reading = UnsignedReading {
                seq,
                time: (start_ms as f64 + w[1]).round() as u64,
                measurements: vec![Measurement {
                    code: "8867-4".into(),
                    value: (60_000.0 / ms * 10.0).round() / 10.0,
                    unit: "/min".into(),
                }],
                meta: Some(
                    serde_json::json!({ "source": source, "rr_ms": (ms * 10.0).round() / 10.0 })
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                ),
            };
            seq += 1;
            Some(reading)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rr_file_becomes_hr_at_beat_times() {
        let rr = parse_rr("# polar export\n800\n\n750\n1000.0\n").unwrap();
        assert_eq!(rr, vec![800.0, 750.0, 1000.0]);
        let r = beat_readings(&rr_beat_times(&rr), 1_000_000, 1, "rr-replay");
        assert_eq!(
            r.iter().map(|r| r.time).collect::<Vec<_>>(),
            vec![1_000_800, 1_001_550, 1_002_550]
        );
        assert_eq!(
            r.iter()
                .map(|r| r.measurements[0].value)
                .collect::<Vec<_>>(),
            vec![75.0, 80.0, 60.0]
        );
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        for x in &r {
            vitaltrail_core::envelope::sign(
                &vitaltrail_core::SecretKey::from_seed(&[1; 32]).unwrap(),
                x,
            )
            .unwrap();
        }
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(parse_rr("800\nabc\n").unwrap_err().line, 2);
        assert_eq!(parse_rr("800\n50\n").unwrap_err().line, 2);
        assert!(parse_rr("# nothing\n").is_err());
    }
}

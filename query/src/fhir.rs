//! Readings as FHIR R4 `Observation`s, following the vital-signs profiles,
//! and the search `GET /fhir/Observation?patient=P&date=ge…` that returns
//! them in a `searchset` Bundle. The mapping is specified in
//! `docs/fhir.md`.
//!
//! One reading (one signed envelope, one leaf) gives one Observation per
//! measurement, except blood pressure: its systolic, diastolic and mean
//! pressures are one Observation (LOINC 85354-9) with a component each.
//! Every Observation names where its proof is: the leaf (partition, index,
//! hash) and the device and seq `vitaltrail prove` takes.

use std::collections::BTreeMap;

use arrow::array::{
    Array, Float64Array, StringArray, TimestampMillisecondArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::prelude::{col, lit};
use datafusion::scalar::ScalarValue;
use serde_json::{Value, json};
pub use vitaltrail_alerts::fhir::{instant, reading_id};

use crate::{CappedStream, Error, QueryEngine, Result};

/// The LOINC code system.
pub const LOINC: &str = "http://loinc.org";
/// IEEE 11073-10101 (MDC) codes.
pub const MDC: &str = "urn:iso:std:iso:11073:10101";
/// UCUM units.
pub const UCUM: &str = "http://unitsofmeasure.org";
/// Patients, by their pseudonymous ID, and a reading's measurement
/// (`<partition>/<leaf index>/<LOINC>`): the systems `Communication`
/// uses, so its references resolve to these Observations.
pub use vitaltrail_alerts::fhir::{PATIENT_SYSTEM, READING_SYSTEM};
/// A reading's proof: `<did:key>/<seq>` (`vitaltrail prove --device --seq`).
pub const PROOF_SYSTEM: &str = "urn:vitaltrail:proof";
/// A reading's leaf hash (hex), as in its proof bundle.
pub const LEAF_SYSTEM: &str = "urn:vitaltrail:leaf-hash";
/// The blood-pressure panel.
pub const BP_PANEL: &str = "85354-9";
/// The codes of a blood-pressure panel's components, in order.
pub const BP_PARTS: [&str; 3] = ["8480-6", "8462-4", "8478-0"];

/// Observations a page holds by default, and at most.
pub const DEFAULT_COUNT: usize = 100;
/// See [`DEFAULT_COUNT`].
pub const MAX_COUNT: usize = 1000;

const VITALSIGNS: &str = "http://hl7.org/fhir/StructureDefinition/vitalsigns";

/// UCUM units of the vital-signs value set (ucum-vitals-common): the base
/// profile is claimed only with one of these.
const VITAL_UNITS: &[&str] = &[
    "%", "/min", "Cel", "[degF]", "mm[Hg]", "cm", "[in_i]", "kg", "g", "[lb_av]", "[oz_av]",
    "kg/m2", "m2",
];

/// What is known of a code: its display, MDC code, category, and the
/// specific vital-signs profile with the unit it requires.
struct Known {
    loinc: &'static str,
    display: &'static str,
    mdc: Option<&'static str>,
    category: Option<&'static str>,
    profile: Option<(&'static str, &'static [&'static str])>,
    /// Codings the profile requires besides this code's own.
    also: Option<(&'static str, &'static str)>,
}

const KNOWN: &[Known] = &[
    Known {
        loinc: "8867-4",
        display: "Heart rate",
        mdc: Some("147842"),
        category: Some("vital-signs"),
        profile: Some(("heartrate", &["/min"])),
        also: None,
    },
    Known {
        loinc: "8889-8",
        display: "Heart rate by Pulse oximetry",
        mdc: Some("149530"),
        category: Some("vital-signs"),
        profile: None,
        also: None,
    },
    Known {
        loinc: "2708-6",
        display: "Oxygen saturation in Arterial blood",
        mdc: Some("150456"),
        category: Some("vital-signs"),
        profile: Some(("oxygensat", &["%"])),
        also: None,
    },
    Known {
        loinc: "59408-5",
        display: "Oxygen saturation in Arterial blood by Pulse oximetry",
        mdc: Some("150456"),
        category: Some("vital-signs"),
        profile: Some(("oxygensat", &["%"])),
        also: Some(("2708-6", "Oxygen saturation in Arterial blood")),
    },
    Known {
        loinc: "9279-1",
        display: "Respiratory rate",
        mdc: Some("151562"),
        category: Some("vital-signs"),
        profile: Some(("resprate", &["/min"])),
        also: None,
    },
    Known {
        loinc: "8310-5",
        display: "Body temperature",
        mdc: Some("150364"),
        category: Some("vital-signs"),
        profile: Some(("bodytemp", &["Cel", "[degF]"])),
        also: None,
    },
    Known {
        loinc: "8480-6",
        display: "Systolic blood pressure",
        mdc: Some("150021"),
        category: Some("vital-signs"),
        profile: None,
        also: None,
    },
    Known {
        loinc: "8462-4",
        display: "Diastolic blood pressure",
        mdc: Some("150022"),
        category: Some("vital-signs"),
        profile: None,
        also: None,
    },
    Known {
        loinc: "8478-0",
        display: "Mean blood pressure",
        mdc: Some("150023"),
        category: Some("vital-signs"),
        profile: None,
        also: None,
    },
    Known {
        loinc: "2339-0",
        display: "Glucose [Mass/volume] in Blood",
        mdc: Some("160184"),
        category: None,
        profile: None,
        also: None,
    },
    Known {
        loinc: "99504-3",
        display: "Glucose [Mass/volume] in Interstitial fluid",
        mdc: None,
        category: None,
        profile: None,
        also: None,
    },
    Known {
        loinc: "41950-7",
        display: "Number of steps in 24 hour Measured",
        mdc: None,
        category: Some("activity"),
        profile: None,
        also: None,
    },
];

fn known(code: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.loinc == code)
}

/// One logged reading of a patient, as the `readings` table holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The signing device.
    pub device: String,
    /// The patient.
    pub patient: String,
    /// The device's seq.
    pub seq: u64,
    /// Device time, Unix ms.
    pub device_time_ms: i64,
    /// Log time, Unix ms.
    pub log_time_ms: i64,
    /// Log partition.
    pub partition: u32,
    /// Leaf index.
    pub log_index: u64,
    /// The leaf hash, hex.
    pub leaf_hash: String,
    /// (LOINC, value, UCUM unit), in LOINC order.
    pub measurements: Vec<(String, f64, String)>,
}

fn instant_of(ms: i64) -> String {
    instant(u64::try_from(ms).unwrap_or(0))
}

fn coding(code: &str) -> Vec<Value> {
    let k = known(code);
    let mut c = vec![match k {
        Some(k) => json!({"system": LOINC, "code": code, "display": k.display}),
        None => json!({"system": LOINC, "code": code}),
    }];
    if let Some((code, display)) = k.and_then(|k| k.also) {
        c.push(json!({"system": LOINC, "code": code, "display": display}));
    }
    if let Some(mdc) = k.and_then(|k| k.mdc) {
        c.push(json!({"system": MDC, "code": mdc}));
    }
    c
}

fn concept(code: &str) -> Value {
    let mut v = json!({ "coding": coding(code) });
    if let Some(k) = known(code) {
        v["text"] = json!(k.display);
    }
    v
}

fn quantity(value: f64, unit: &str) -> Value {
    json!({"value": value, "unit": unit, "system": UCUM, "code": unit})
}

fn category(code: &str) -> Value {
    let display = match code {
        "vital-signs" => "Vital Signs",
        "activity" => "Activity",
        other => other,
    };
    json!([{
        "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": code,
            "display": display
        }],
        "text": display
    }])
}

/// The Observations of one reading: one per measurement, blood pressure
/// (whichever of systolic, diastolic and mean it holds, with systolic or
/// diastolic) as one panel with components. A value that is not a finite
/// number is left out.
pub fn observations(r: &Reading) -> Vec<Value> {
    let ms: Vec<&(String, f64, String)> =
        r.measurements.iter().filter(|m| m.1.is_finite()).collect();
    let is_bp = |c: &str| BP_PARTS.contains(&c);
    let bp: Vec<&&(String, f64, String)> = ms.iter().filter(|m| is_bp(&m.0)).collect();
    let panel = bp.iter().any(|m| m.0 == BP_PARTS[0]) && bp.iter().any(|m| m.0 == BP_PARTS[1]);
    let mut out = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &ms {
        if panel && is_bp(&m.0) {
            continue;
        }
        // A code twice in one reading: the second gets its own ID.
        let n = seen.entry(m.0.as_str()).or_default();
        *n += 1;
        let suffix = if *n > 1 {
            format!(".{n}")
        } else {
            String::new()
        };
        let mut o = base(r, &format!("{}{suffix}", m.0), &[m.0.as_str()]);
        let k = known(&m.0);
        if let Some(c) = k.and_then(|k| k.category) {
            o["category"] = category(c);
        }
        o["code"] = concept(&m.0);
        o["valueQuantity"] = quantity(m.1, &m.2);
        let mut profiles = Vec::new();
        if k.and_then(|k| k.category) == Some("vital-signs") && VITAL_UNITS.contains(&m.2.as_str())
        {
            profiles.push(VITALSIGNS.to_owned());
            if let Some((p, units)) = k.and_then(|k| k.profile)
                && units.contains(&m.2.as_str())
            {
                profiles.push(format!("http://hl7.org/fhir/StructureDefinition/{p}"));
            }
        }
        if !profiles.is_empty() {
            o["meta"] = json!({ "profile": profiles });
        }
        out.push(o);
    }
    if panel {
        let mut parts: Vec<&(String, f64, String)> = Vec::new();
        for code in BP_PARTS {
            // One of each; a repeated code stays out of the panel.
            if let Some(m) = bp.iter().find(|m| m.0 == code) {
                parts.push(m);
            }
        }
        let codes: Vec<&str> = parts.iter().map(|m| m.0.as_str()).collect();
        let mut o = base(r, "bp", &codes);
        o["category"] = category("vital-signs");
        o["code"] = json!({
            "coding": [
                {"system": LOINC, "code": BP_PANEL, "display": "Blood pressure panel with all children optional"},
                {"system": MDC, "code": "150020"}
            ],
            "text": "Blood pressure"
        });
        o["component"] = parts
            .iter()
            .map(|m| json!({"code": concept(&m.0), "valueQuantity": quantity(m.1, &m.2)}))
            .collect();
        if parts.iter().all(|m| m.2 == "mm[Hg]") {
            o["meta"] =
                json!({ "profile": [VITALSIGNS, "http://hl7.org/fhir/StructureDefinition/bp"] });
        }
        out.push(o);
        // Repeats of a component code beyond the panel's one each: the
        // second `.2`, the third `.3`…
        let mut repeats: BTreeMap<&str, usize> = BTreeMap::new();
        for m in bp
            .iter()
            .map(|m| **m)
            .filter(|m| !parts.iter().any(|p| std::ptr::eq(*p, *m)))
        {
            let n = repeats.entry(m.0.as_str()).or_insert(1);
            *n += 1;
            let mut o = base(r, &format!("{}.{n}", m.0), &[m.0.as_str()]);
            o["category"] = category("vital-signs");
            o["code"] = concept(&m.0);
            o["valueQuantity"] = quantity(m.1, &m.2);
            if VITAL_UNITS.contains(&m.2.as_str()) {
                o["meta"] = json!({ "profile": [VITALSIGNS] });
            }
            out.push(o);
        }
    }
    out
}

/// What every Observation of a reading shares; `tail` ends its ID.
fn base(r: &Reading, tail: &str, codes: &[&str]) -> Value {
    let mut identifier: Vec<Value> = codes
        .iter()
        .map(
            |c| json!({"system": READING_SYSTEM, "value": reading_id(r.partition, r.log_index, c)}),
        )
        .collect();
    identifier.push(json!({"system": PROOF_SYSTEM, "value": format!("{}/{}", r.device, r.seq)}));
    identifier.push(json!({"system": LEAF_SYSTEM, "value": r.leaf_hash}));
    json!({
        "resourceType": "Observation",
        "id": observation_id(r.partition, r.log_index, tail),
        "identifier": identifier,
        "status": "final",
        "subject": {
            "type": "Patient",
            "identifier": {"system": PATIENT_SYSTEM, "value": r.patient}
        },
        "effectiveDateTime": instant_of(r.device_time_ms),
        "issued": instant_of(r.log_time_ms),
        "device": {
            "type": "Device",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": r.device},
            "display": format!("{} seq {}", r.device, r.seq)
        }
    })
}

/// An Observation's ID: `<partition>-<leaf index>-<LOINC or "bp">`
/// (letters, digits, `-` and `.`, as FHIR IDs are).
pub fn observation_id(partition: u32, log_index: u64, tail: &str) -> String {
    format!("{partition}-{log_index}-{tail}")
}

/// Where a page starts: after this reading, in (device time, partition,
/// leaf index) order, within the snapshot the search's first page took
/// (per partition, the last leaf exported then), so a traversal neither
/// skips nor repeats what is exported while it runs. Its text,
/// `<ms>.<partition>.<index>.<p>_<last>-<p>_<last>…`, is the `_cursor` of
/// the next page's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Device time, Unix ms.
    pub time_ms: i64,
    /// Log partition.
    pub partition: u32,
    /// Leaf index.
    pub log_index: u64,
    /// Per partition, the last leaf index the traversal sees.
    pub snapshot: Vec<(u32, u64)>,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}.", self.time_ms, self.partition, self.log_index)?;
        for (k, (p, h)) in self.snapshot.iter().enumerate() {
            write!(f, "{}{p}_{h}", if k == 0 { "" } else { "-" })?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Cursor {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("_cursor {s:?}: not a page cursor (take it from a next link)");
        let mut it = s.split('.');
        let (Some(t), Some(p), Some(i), Some(snap), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(bad());
        };
        let snapshot = snap
            .split('-')
            .map(|x| {
                let (p, h) = x.split_once('_')?;
                Some((p.parse().ok()?, h.parse().ok()?))
            })
            .collect::<Option<Vec<(u32, u64)>>>()
            .filter(|v| !v.is_empty() && v.len() <= 4096)
            .ok_or_else(bad)?;
        Ok(Cursor {
            time_ms: t.parse().map_err(|_| bad())?,
            partition: p.parse().map_err(|_| bad())?,
            log_index: i.parse().map_err(|_| bad())?,
            snapshot,
        })
    }
}

/// A search: one patient's readings, by device time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    /// The patient.
    pub patient: String,
    /// Device time at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Device time before (Unix ms).
    pub until_ms: Option<i64>,
    /// Only Observations whose `code` holds, for each set, one of its
    /// LOINC codes (each `code` parameter is a set; repeats must all
    /// match); empty: all.
    pub codes: Vec<Vec<String>>,
    /// Observations per page, at most.
    pub count: usize,
    /// Start after this reading.
    pub after: Option<Cursor>,
}

impl Search {
    /// All of `patient`'s readings.
    pub fn patient(patient: &str) -> Search {
        Search {
            patient: patient.to_owned(),
            from_ms: None,
            until_ms: None,
            codes: Vec::new(),
            count: DEFAULT_COUNT,
            after: None,
        }
    }

    /// From a query string's pairs (`patient`, `date` with prefixes `ge`,
    /// `gt`, `le`, `lt`, `eq` (or none), `code`, `_count`, `_cursor`,
    /// `_format=json`); an unknown or malformed parameter is an error,
    /// never ignored.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Search> {
        let bad = |m: String| Error::Format(m);
        let mut s = Search::patient("");
        let mut patient = None;
        for (k, v) in pairs {
            match k {
                "patient" | "subject" => {
                    let p = v.strip_prefix("Patient/").unwrap_or(v).to_owned();
                    set_patient(&mut patient, p)?;
                }
                "patient:identifier" | "subject:identifier" => {
                    let Some(p) = v
                        .strip_prefix(PATIENT_SYSTEM)
                        .and_then(|r| r.strip_prefix('|'))
                    else {
                        return Err(bad(format!(
                            "{k}: the patient's identifier is {PATIENT_SYSTEM}|<patient>"
                        )));
                    };
                    set_patient(&mut patient, p.to_owned())?;
                }
                "date" => {
                    let (lo, hi) = date_bounds(v)?;
                    if let Some(lo) = lo {
                        s.from_ms = Some(s.from_ms.map_or(lo, |x| x.max(lo)));
                    }
                    if let Some(hi) = hi {
                        s.until_ms = Some(s.until_ms.map_or(hi, |x| x.min(hi)));
                    }
                }
                "code" => {
                    let mut set = Vec::new();
                    for token in v.split(',') {
                        let code = match token.split_once('|') {
                            Some((LOINC, c)) | Some(("", c)) => c,
                            Some((sys, _)) => {
                                return Err(bad(format!(
                                    "code {token:?}: codes are searched by LOINC ({LOINC}), not {sys}"
                                )));
                            }
                            None => token,
                        };
                        if !vitaltrail_core::envelope::is_loinc(code) {
                            return Err(bad(format!("code {code:?} is not a LOINC code")));
                        }
                        set.push(code.to_owned());
                    }
                    set.sort();
                    set.dedup();
                    s.codes.push(set);
                }
                "_count" => {
                    s.count = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_COUNT).contains(n))
                        .ok_or_else(|| bad(format!("_count {v:?}: 1 to {MAX_COUNT}")))?;
                }
                "_cursor" => s.after = Some(v.parse().map_err(bad)?),
                "_format" if matches!(v, "json" | "application/fhir+json" | "application/json") => {
                }
                _ => {
                    return Err(bad(format!(
                        "search parameter {k:?} is not supported (patient, date, code, _count, _cursor)"
                    )));
                }
            }
        }
        s.patient = patient
            .ok_or_else(|| bad("a search names one patient: patient=<patient ID>".into()))?;
        if s.patient.is_empty() {
            return Err(bad("patient is empty".into()));
        }
        Ok(s)
    }
}

fn set_patient(slot: &mut Option<String>, p: String) -> Result<()> {
    match slot {
        Some(q) if *q != p => Err(Error::Format(
            "a search names one patient, not several".into(),
        )),
        _ => {
            *slot = Some(p);
            Ok(())
        }
    }
}

/// A `date` parameter as bounds on device time: [from, until) in Unix ms.
/// A date, or a date-time to the second, stands for its whole range (`ge`
/// from its start, `le` to its end).
pub fn date_bounds(v: &str) -> Result<(Option<i64>, Option<i64>)> {
    let (prefix, rest) = match v.get(..2) {
        Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &v[2..]),
        _ => ("eq", v),
    };
    let (start, end) = instant_range(rest)?;
    Ok(match prefix {
        "ge" => (Some(start), None),
        "gt" => (Some(end), None),
        "le" => (None, Some(end)),
        "lt" => (None, Some(start)),
        _ => (Some(start), Some(end)),
    })
}

/// The range of Unix ms a FHIR date or dateTime covers: `YYYY`,
/// `YYYY-MM`, `YYYY-MM-DD` (UTC), or an RFC 3339 date-time with a zone.
fn instant_range(v: &str) -> Result<(i64, i64)> {
    use time::{Date, Month, OffsetDateTime};
    let bad = || {
        Error::Format(format!(
            "date {v:?}: YYYY, YYYY-MM, YYYY-MM-DD or a date-time with a zone (2026-12-08T10:00:00Z), after an optional ge, gt, le, lt or eq"
        ))
    };
    let ms = |d: Date| (d.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let num = |s: &str| -> Result<i32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let parts: Vec<&str> = v.split('-').collect();
    if !v.contains('T') {
        let (y, m, d) = match parts.as_slice() {
            [y] if y.len() == 4 => (num(y)?, None, None),
            [y, m] if y.len() == 4 && m.len() == 2 => (num(y)?, Some(num(m)?), None),
            [y, m, d] if y.len() == 4 && m.len() == 2 && d.len() == 2 => {
                (num(y)?, Some(num(m)?), Some(num(d)?))
            }
            _ => return Err(bad()),
        };
        let month =
            |m: i32| Month::try_from(u8::try_from(m).map_err(|_| bad())?).map_err(|_| bad());
        return match (m, d) {
            (None, _) => {
                let a = Date::from_calendar_date(y, Month::January, 1).map_err(|_| bad())?;
                let b = Date::from_calendar_date(y + 1, Month::January, 1).map_err(|_| bad())?;
                Ok((ms(a), ms(b)))
            }
            (Some(m), None) => {
                let a = Date::from_calendar_date(y, month(m)?, 1).map_err(|_| bad())?;
                let next = a.replace_day(a.month().length(y)).map_err(|_| bad())?;
                let b = next.next_day().ok_or_else(bad)?;
                Ok((ms(a), ms(b)))
            }
            (Some(m), Some(d)) => {
                let a = Date::from_calendar_date(y, month(m)?, u8::try_from(d).map_err(|_| bad())?)
                    .map_err(|_| bad())?;
                Ok((ms(a), ms(a.next_day().ok_or_else(bad)?)))
            }
        };
    }
    let t = OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map_err(|_| bad())?;
    let at = (t.unix_timestamp_nanos() / 1_000_000) as i64;
    // To the second: that whole second; with a fraction, its millisecond.
    let time = v.split_once('T').map_or("", |x| x.1);
    let width = if time.contains('.') { 1 } else { 1_000 };
    Ok((at, at + width))
}

/// Whether an Observation's `code` answers every code set of a search.
fn answers(o: &Value, codes: &[Vec<String>]) -> bool {
    let coded: Vec<&str> = o["code"]["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["system"] == LOINC)
        .filter_map(|c| c["code"].as_str())
        .collect();
    codes
        .iter()
        .all(|set| set.iter().any(|c| coded.contains(&c.as_str())))
}

/// The rows a code search needs: every code asked, all of the blood
/// pressure's parts if any of them or the panel is (whether they form a
/// panel depends on them all), and pulse oximetry's SpO2 for 2708-6 (its
/// Observations carry 2708-6 too).
fn rows_for(codes: &[Vec<String>]) -> Vec<String> {
    let mut out = Vec::new();
    for c in codes.iter().flatten() {
        out.push(c.clone());
        if c == BP_PANEL || BP_PARTS.contains(&c.as_str()) {
            out.extend(BP_PARTS.iter().map(|p| (*p).to_owned()));
        }
        if c == "2708-6" {
            out.push("59408-5".into());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Scans of the table one page may take while a code search finds too
/// few matches; then the page ends early, with a `next` link.
const MAX_SCANS: usize = 16;

/// One page of a search.
#[derive(Debug, Clone)]
pub struct Page {
    /// The Observations, in (device time, partition, leaf index) order.
    pub observations: Vec<Value>,
    /// Where the next page starts, if there may be one.
    pub next: Option<Cursor>,
}

/// An Observation ID's reading: (partition, leaf index), or `None` if it
/// is not one of [`observation_id`]'s.
pub fn parse_id(id: &str) -> Option<(u32, u64)> {
    let mut it = id.splitn(3, '-');
    let p = it.next()?.parse().ok()?;
    let i = it.next()?.parse().ok()?;
    it.next().filter(|t| !t.is_empty())?;
    Some((p, i))
}

fn ts(ms: i64) -> datafusion::logical_expr::Expr {
    lit(ScalarValue::TimestampMillisecond(
        Some(ms),
        Some("UTC".into()),
    ))
}

impl QueryEngine {
    /// The Observation with ID `id`, if its reading is in the table.
    pub async fn observation(&self, id: &str) -> Result<Option<Value>> {
        let Some((p, i)) = parse_id(id) else {
            return Ok(None);
        };
        let df = self
            .ctx
            .table("readings")
            .await?
            .filter(col("partition").eq(lit(p)).and(col("log_index").eq(lit(i))))?
            .sort(vec![
                col("loinc").sort(true, false),
                col("value").sort(true, false),
                col("unit").sort(true, false),
            ])?;
        let rows = self.capped(df).await?;
        Ok(group(&rows)?
            .iter()
            .flat_map(observations)
            .find(|o| o["id"] == id))
    }

    async fn capped(&self, df: datafusion::dataframe::DataFrame) -> Result<Vec<RecordBatch>> {
        let df = df.select_columns(&[
            "device",
            "patient",
            "seq",
            "device_time",
            "log_time",
            "loinc",
            "value",
            "unit",
            "partition",
            "log_index",
            "leaf_hash",
        ])?;
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        CappedStream::start(df, self.limits, deadline)
            .await?
            .collect()
            .await
    }

    /// Per partition, the last leaf of `patient` exported now: the
    /// snapshot a traversal keeps to.
    async fn snapshot(&self, patient: &str) -> Result<Vec<(u32, u64)>> {
        use datafusion::functions_aggregate::expr_fn::max;
        let df = self
            .ctx
            .table("readings")
            .await?
            .filter(col("patient").eq(lit(patient)))?
            .aggregate(
                vec![col("partition")],
                vec![max(col("log_index")).alias("last")],
            )?;
        let mut out = Vec::new();
        for b in df.collect().await? {
            let p = arrow::compute::cast(b.column(0), &DataType::UInt32)?;
            let h = arrow::compute::cast(b.column(1), &DataType::UInt64)?;
            let (Some(p), Some(h)) = (
                p.as_any().downcast_ref::<UInt32Array>(),
                h.as_any().downcast_ref::<UInt64Array>(),
            ) else {
                return Err(Error::Data(
                    "readings: partition or log_index not as expected".into(),
                ));
            };
            for i in 0..b.num_rows() {
                if !h.is_null(i) {
                    out.push((p.value(i), h.value(i)));
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// One page of `s`: whole readings, at most `s.count` Observations
    /// (one reading more only if the page would be empty), within the
    /// snapshot of the first page.
    pub async fn observations(&self, s: &Search) -> Result<Page> {
        let snapshot = match &s.after {
            Some(c) => c.snapshot.clone(),
            None => self.snapshot(&s.patient).await?,
        };
        if snapshot.is_empty() {
            return Ok(Page {
                observations: Vec::new(),
                next: None,
            });
        }
        let seen = snapshot
            .iter()
            .map(|(p, h)| {
                col("partition")
                    .eq(lit(*p))
                    .and(col("log_index").lt_eq(lit(*h)))
            })
            .reduce(datafusion::logical_expr::Expr::or)
            .unwrap_or_else(|| lit(false));
        let rows_for = rows_for(&s.codes);
        let mut after = s
            .after
            .as_ref()
            .map(|c| (c.time_ms, c.partition, c.log_index));
        let mut out = Vec::new();
        // Enough rows for `count` Observations and the rest of the last
        // reading (a reading holds at most MAX_MEASUREMENTS).
        let fetch = s.count + vitaltrail_core::envelope::MAX_MEASUREMENTS + 1;
        let cursor = |after: Option<(i64, u32, u64)>| {
            after.map(|(time_ms, partition, log_index)| Cursor {
                time_ms,
                partition,
                log_index,
                snapshot: snapshot.clone(),
            })
        };
        for _ in 0..MAX_SCANS {
            let mut df = self
                .ctx
                .table("readings")
                .await?
                .filter(col("patient").eq(lit(s.patient.as_str())))?
                .filter(seen.clone())?;
            if let Some(from) = s.from_ms {
                df = df.filter(col("device_time").gt_eq(ts(from)))?;
            }
            if let Some(until) = s.until_ms {
                df = df.filter(col("device_time").lt(ts(until)))?;
            }
            if !rows_for.is_empty() {
                df = df.filter(
                    col("loinc").in_list(rows_for.iter().map(|c| lit(c.as_str())).collect(), false),
                )?;
            }
            if let Some((t, p, i)) = after {
                let t = ts(t);
                df = df.filter(
                    col("device_time")
                        .gt(t.clone())
                        .or(col("device_time").eq(t).and(
                            col("partition")
                                .gt(lit(p))
                                .or(col("partition").eq(lit(p)).and(col("log_index").gt(lit(i)))),
                        )),
                )?;
            }
            let df = df
                .sort(vec![
                    col("device_time").sort(true, false),
                    col("partition").sort(true, false),
                    col("log_index").sort(true, false),
                    col("loinc").sort(true, false),
                    col("value").sort(true, false),
                    col("unit").sort(true, false),
                ])?
                .limit(0, Some(fetch))?;
            let rows = self.capped(df).await?;
            let n: usize = rows.iter().map(RecordBatch::num_rows).sum();
            let readings = group(&rows)?;
            // The last reading may be cut off by the limit: not yet.
            let complete = if n >= fetch {
                readings.len().saturating_sub(1)
            } else {
                readings.len()
            };
            for r in readings.iter().take(complete) {
                let o: Vec<Value> = observations(r)
                    .into_iter()
                    .filter(|o| answers(o, &s.codes))
                    .collect();
                if !out.is_empty() && out.len() + o.len() > s.count {
                    // Full: the rest on the next page.
                    return Ok(Page {
                        observations: out,
                        next: cursor(after),
                    });
                }
                out.extend(o);
                after = Some((r.device_time_ms, r.partition, r.log_index));
            }
            if n < fetch {
                // Every matching row read.
                return Ok(Page {
                    observations: out,
                    next: None,
                });
            }
            if out.len() >= s.count {
                break;
            }
        }
        Ok(Page {
            observations: out,
            next: cursor(after),
        })
    }
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::Data(format!("readings: column {name} is not as expected")))
}

/// Rows (sorted by reading) as readings.
fn group(batches: &[RecordBatch]) -> Result<Vec<Reading>> {
    let mut out: Vec<Reading> = Vec::new();
    for b in batches {
        // Whatever the reader produced (string views), as the schema says.
        let b = &cast_batch(b)?;
        let device = column::<StringArray>(b, "device")?;
        let patient = column::<StringArray>(b, "patient")?;
        let seq = column::<UInt64Array>(b, "seq")?;
        let dt = column::<TimestampMillisecondArray>(b, "device_time")?;
        let lt = column::<TimestampMillisecondArray>(b, "log_time")?;
        let loinc = column::<StringArray>(b, "loinc")?;
        let value = column::<Float64Array>(b, "value")?;
        let unit = column::<StringArray>(b, "unit")?;
        let partition = column::<UInt32Array>(b, "partition")?;
        let index = column::<UInt64Array>(b, "log_index")?;
        let hash = column::<StringArray>(b, "leaf_hash")?;
        for i in 0..b.num_rows() {
            let m = (
                loinc.value(i).to_owned(),
                value.value(i),
                unit.value(i).to_owned(),
            );
            if let Some(r) = out.last_mut()
                && r.partition == partition.value(i)
                && r.log_index == index.value(i)
            {
                r.measurements.push(m);
                continue;
            }
            out.push(Reading {
                device: device.value(i).to_owned(),
                patient: if patient.is_null(i) {
                    String::new()
                } else {
                    patient.value(i).to_owned()
                },
                seq: seq.value(i),
                device_time_ms: dt.value(i),
                log_time_ms: lt.value(i),
                partition: partition.value(i),
                log_index: index.value(i),
                leaf_hash: hash.value(i).to_owned(),
                measurements: vec![m],
            });
        }
    }
    Ok(out)
}

fn cast_batch(b: &RecordBatch) -> Result<RecordBatch> {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let want = |name: &str| match name {
        "seq" | "log_index" => DataType::UInt64,
        "partition" => DataType::UInt32,
        "device_time" | "log_time" => ts.clone(),
        "value" => DataType::Float64,
        _ => DataType::Utf8,
    };
    let schema = b.schema();
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    for (f, c) in schema.fields().iter().zip(b.columns()) {
        let t = want(f.name());
        let c = if c.data_type() == &t {
            c.clone()
        } else {
            arrow::compute::cast(c, &t)?
        };
        fields.push(arrow::datatypes::Field::new(f.name(), t, true));
        cols.push(c);
    }
    Ok(RecordBatch::try_new(
        std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
        cols,
    )?)
}

/// A `searchset` Bundle of one page; `self_url` is the request's,
/// `next_url` the next page's, and `full_url` gives each Observation's
/// `fullUrl` from its ID. No `entry` when there is none (FHIR JSON has no
/// empty arrays).
pub fn searchset(
    page: &Page,
    self_url: &str,
    next_url: Option<&str>,
    full_url: &dyn Fn(&str) -> String,
    now_ms: u64,
) -> Value {
    let mut link = vec![json!({"relation": "self", "url": self_url})];
    if let Some(n) = next_url {
        link.push(json!({"relation": "next", "url": n}));
    }
    let mut b = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": instant(now_ms),
        "link": link,
    });
    if !page.observations.is_empty() {
        b["entry"] = page
            .observations
            .iter()
            .map(|o| entry(o, full_url))
            .collect();
    }
    b
}

/// One searchset entry.
pub fn entry(o: &Value, full_url: &dyn Fn(&str) -> String) -> Value {
    json!({
        "fullUrl": full_url(o["id"].as_str().unwrap_or_default()),
        "resource": o,
        "search": {"mode": "match"}
    })
}

/// A `fullUrl` where no server names the Observation (an export): a
/// `urn:uuid:` derived from its ID (BLAKE3, as a version-8 UUID), the same
/// for the same Observation in every export.
pub fn urn_uuid(id: &str) -> String {
    let h = blake3::hash(format!("vitaltrail observation {id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x: String = b.iter().map(|v| format!("{v:02x}")).collect();
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// An `OperationOutcome` saying why a request failed.
pub fn outcome(code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(ms: &[(&str, f64, &str)]) -> Reading {
        Reading {
            device: "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK".into(),
            patient: "patient-1".into(),
            seq: 41,
            device_time_ms: 1_796_685_910_000,
            log_time_ms: 1_796_685_910_250,
            partition: 2,
            log_index: 161,
            leaf_hash: "ab".repeat(32),
            measurements: ms
                .iter()
                .map(|(c, v, u)| ((*c).into(), *v, (*u).into()))
                .collect(),
        }
    }

    #[test]
    fn a_reading_is_an_observation_per_vital_and_blood_pressure_is_one() {
        let r = reading(&[
            ("2708-6", 93.0, "%"),
            ("8310-5", 37.2, "Cel"),
            ("8462-4", 80.0, "mm[Hg]"),
            ("8480-6", 120.0, "mm[Hg]"),
            ("8867-4", 72.0, "/min"),
            ("9279-1", 16.0, "/min"),
        ]);
        let obs = observations(&r);
        assert_eq!(obs.len(), 5, "{obs:#?}");
        let by = |code: &str| {
            obs.iter()
                .find(|o| o["code"]["coding"][0]["code"] == code)
                .unwrap_or_else(|| panic!("{code}"))
                .clone()
        };
        let hr = by("8867-4");
        assert_eq!(hr["id"], "2-161-8867-4");
        assert_eq!(hr["status"], "final");
        assert_eq!(hr["category"][0]["coding"][0]["code"], "vital-signs");
        assert_eq!(hr["code"]["coding"][1]["system"], MDC);
        assert_eq!(hr["code"]["coding"][1]["code"], "147842");
        assert_eq!(hr["valueQuantity"]["code"], "/min");
        assert_eq!(hr["valueQuantity"]["system"], UCUM);
        assert_eq!(hr["valueQuantity"]["value"], 72.0);
        assert_eq!(hr["effectiveDateTime"], "2026-12-07T23:25:10.000Z");
        assert_eq!(
            urn_uuid("2-161-8867-4"),
            urn_uuid("2-161-8867-4"),
            "the same fullUrl in every export"
        );
        assert!(urn_uuid("2-161-8867-4").starts_with("urn:uuid:"));
        assert_eq!(hr["issued"], "2026-12-07T23:25:10.250Z");
        assert_eq!(hr["subject"]["identifier"]["value"], "patient-1");
        assert_eq!(hr["device"]["identifier"]["value"], r.device.as_str());
        assert_eq!(
            hr["meta"]["profile"],
            json!([
                VITALSIGNS,
                "http://hl7.org/fhir/StructureDefinition/heartrate"
            ])
        );
        let ids: Vec<&Value> = hr["identifier"].as_array().unwrap().iter().collect();
        assert_eq!(ids[0]["value"], "2/161/8867-4", "as Communication.about");
        assert_eq!(ids[1]["value"], format!("{}/41", r.device));
        assert_eq!(ids[2]["value"], r.leaf_hash.as_str());
        let bp = by(BP_PANEL);
        assert_eq!(bp["id"], "2-161-bp");
        assert!(bp.get("valueQuantity").is_none());
        let parts = bp["component"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0]["code"]["coding"][0]["code"], "8480-6");
        assert_eq!(parts[0]["valueQuantity"]["value"], 120.0);
        assert_eq!(parts[1]["code"]["coding"][0]["code"], "8462-4");
        assert_eq!(parts[1]["valueQuantity"]["value"], 80.0);
        assert_eq!(bp["identifier"][0]["value"], "2/161/8480-6");
        assert_eq!(bp["identifier"][1]["value"], "2/161/8462-4");
        assert_eq!(
            bp["meta"]["profile"][1],
            "http://hl7.org/fhir/StructureDefinition/bp"
        );
    }

    #[test]
    fn odd_readings_stay_truthful() {
        // A lone systolic: no panel (the bp profile needs both).
        let obs = observations(&reading(&[("8480-6", 120.0, "mm[Hg]")]));
        assert_eq!(obs.len(), 1);
        assert_eq!(obs[0]["code"]["coding"][0]["code"], "8480-6");
        assert_eq!(obs[0]["valueQuantity"]["value"], 120.0);
        // A unit the vital-signs units do not hold: no profile claimed;
        // one they hold but the vital's profile does not: the base only.
        let obs = observations(&reading(&[("8867-4", 1.2, "Hz")]));
        assert!(obs[0].get("meta").is_none(), "{obs:#?}");
        let obs = observations(&reading(&[("8867-4", 72.0, "%")]));
        assert_eq!(obs[0]["meta"]["profile"], json!([VITALSIGNS]));
        // An unknown code: no category, no profile; a repeat: its own ID.
        let obs = observations(&reading(&[("1234-5", 1.0, "1"), ("1234-5", 2.0, "1")]));
        assert_eq!(obs.len(), 2);
        assert!(obs[0].get("category").is_none() && obs[0].get("meta").is_none());
        assert_ne!(obs[0]["id"], obs[1]["id"]);
        // Pulse oximetry carries 2708-6 for the oxygensat profile.
        let obs = observations(&reading(&[("59408-5", 97.0, "%")]));
        assert_eq!(obs[0]["code"]["coding"][1]["code"], "2708-6");
        // Not a number: left out.
        assert!(observations(&reading(&[("8867-4", f64::NAN, "/min")])).is_empty());
        // Systolic three times in one reading: one panel, each repeat on
        // its own, every ID distinct.
        let obs = observations(&reading(&[
            ("8480-6", 120.0, "mm[Hg]"),
            ("8480-6", 121.0, "mm[Hg]"),
            ("8480-6", 122.0, "mm[Hg]"),
            ("8462-4", 80.0, "mm[Hg]"),
        ]));
        let ids: Vec<&str> = obs.iter().map(|o| o["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["2-161-bp", "2-161-8480-6.2", "2-161-8480-6.3"]);
    }

    #[test]
    fn search_parameters_are_parsed_or_refused() {
        let s = Search::from_pairs([
            ("patient", "Patient/patient-1"),
            ("date", "ge2026-12-08"),
            ("date", "lt2026-12-08T12:00:00Z"),
            ("code", "http://loinc.org|8867-4,85354-9"),
            ("_count", "10"),
        ])
        .unwrap();
        assert_eq!(s.patient, "patient-1");
        assert_eq!(s.from_ms, Some(1_796_688_000_000));
        assert_eq!(s.until_ms, Some(1_796_688_000_000 + 12 * 3_600_000));
        assert_eq!(s.codes, [vec!["85354-9".to_owned(), "8867-4".to_owned()]]);
        assert_eq!(s.count, 10);
        assert_eq!(date_bounds("le2026-12").unwrap().1, Some(1_798_761_600_000));
        assert_eq!(
            date_bounds("2026").unwrap(),
            (Some(1_767_225_600_000), Some(1_798_761_600_000))
        );
        assert_eq!(
            date_bounds("gt2026-12-08").unwrap().0,
            Some(1_796_774_400_000)
        );
        for bad in [
            vec![("date", "ge2026-12-08")],
            vec![("patient", "a"), ("patient", "b")],
            vec![("patient", "a"), ("date", "ge2026-13-01")],
            vec![("patient", "a"), ("date", "ge2026-12-08T10:00:00")],
            vec![("patient", "a"), ("date", "sa2026")],
            vec![("patient", "a"), ("code", "snomed|123")],
            vec![("patient", "a"), ("code", "8867-5")],
            vec![("patient", "a"), ("_count", "0")],
            vec![("patient", "a"), ("_count", "1001")],
            vec![("patient", "a"), ("_sort", "date")],
            vec![("patient", "a"), ("_cursor", "1.2")],
            vec![("patient", "")],
        ] {
            assert!(Search::from_pairs(bad.clone()).is_err(), "{bad:?}");
        }
        let c: Cursor = "1796685910000.2.161.0_7-2_161".parse().unwrap();
        assert_eq!(c.snapshot, [(0, 7), (2, 161)]);
        assert_eq!(c.to_string(), "1796685910000.2.161.0_7-2_161");
        for bad in ["1.2.3", "1.2.3.", "1.2.3.x_1", "1.2.3.1_2.5"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
        // A date-time to the second is its whole second.
        assert_eq!(
            date_bounds("2026-12-08T00:00:00Z").unwrap(),
            (Some(1_796_688_000_000), Some(1_796_688_001_000))
        );
        assert_eq!(
            date_bounds("2026-12-08T00:00:00.250Z").unwrap(),
            (Some(1_796_688_000_250), Some(1_796_688_000_251))
        );
        // Code searches: every set must be answered by a LOINC coding.
        let spo2 = observations(&reading(&[("59408-5", 97.0, "%")])).remove(0);
        let code = |sets: &[&[&str]]| -> Vec<Vec<String>> {
            sets.iter()
                .map(|s| s.iter().map(|c| (*c).to_owned()).collect())
                .collect()
        };
        assert!(
            answers(&spo2, &code(&[&["2708-6"]])),
            "pulse oximetry is SpO2 too"
        );
        assert!(answers(&spo2, &code(&[&["59408-5"], &["2708-6"]])));
        assert!(
            !answers(&spo2, &code(&[&["59408-5"], &["8867-4"]])),
            "repeats are AND"
        );
        assert!(
            answers(&spo2, &code(&[&["8867-4", "59408-5"]])),
            "a list is OR"
        );
        assert_eq!(
            rows_for(&code(&[&["8480-6"]])),
            ["8462-4", "8478-0", "8480-6"],
            "a part needs all parts to know if it is a panel"
        );
    }
}

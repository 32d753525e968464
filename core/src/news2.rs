//! NEWS2, the National Early Warning Score 2 (Royal College of Physicians,
//! 2017, chart 1): the one scoring code behind `vitaltrail news2` and the
//! alert engine.
//!
//! Scoring rules, as chart 1 states them and as this module decides where it
//! is silent:
//! - Only the parameters present are scored; [`Score::missing`] names the
//!   others. A missing parameter is never counted as 0 without saying so.
//! - Temperature bands are in tenths of a degree and every other band in
//!   whole units, so each value is rounded to its band's precision first.
//! - **A value exactly halfway between two bands' precision** (35.05 °C,
//!   20.5 /min, 95.5 %) is scored in whichever neighbouring band scores
//!   higher: the error that makes a nurse look, never the one that hides a
//!   deterioration. "Exactly" allows for binary floating point: 35.05 is
//!   stored as 35.04999…, and still counts as halfway.
//! - SpO2 scale 2 is for patients with hypercapnic respiratory failure and a
//!   prescribed target of 88–92 %; its upper bands score only on oxygen.
//! - Values outside what a body can show ([`plausible`]: SpO2 above 100 %,
//!   a negative rate, a temperature under 20 °C) are errors, not scores.
//! - Air or oxygen is always known (a per-patient setting), so it is always
//!   scored.
use serde::Serialize;

use crate::error::{Error, Result};

/// LOINC codes that feed each parameter.
pub mod codes {
    /// Respiratory rate.
    pub const RESPIRATION_RATE: &[&str] = &["9279-1"];
    /// SpO2 (and SpO2 by pulse oximetry).
    pub const SPO2: &[&str] = &["2708-6", "59408-5"];
    /// Systolic blood pressure.
    pub const SYSTOLIC_BP: &[&str] = &["8480-6"];
    /// Heart rate, and pulse rate from a pulse oximeter.
    pub const PULSE: &[&str] = &["8867-4", "8889-8"];
    /// Body temperature.
    pub const TEMPERATURE: &[&str] = &["8310-5"];

    /// The parameter (a key of [`super::PARAMETERS`]) that `code` feeds.
    pub fn parameter(code: &str) -> Option<&'static str> {
        [
            ("respiration_rate", RESPIRATION_RATE),
            ("spo2", SPO2),
            ("systolic_bp", SYSTOLIC_BP),
            ("pulse", PULSE),
            ("temperature", TEMPERATURE),
        ]
        .into_iter()
        .find(|(_, codes)| codes.contains(&code))
        .map(|(p, _)| p)
    }
}

/// Which SpO2 chart applies to a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
pub enum SpO2Scale {
    /// Everyone not on scale 2.
    #[default]
    #[serde(rename = "1")]
    Scale1,
    /// Hypercapnic respiratory failure with a prescribed 88–92 % target.
    #[serde(rename = "2")]
    Scale2,
}

/// ACVPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Consciousness {
    /// Alert.
    A,
    /// New confusion.
    C,
    /// Responds to voice.
    V,
    /// Responds to pain.
    P,
    /// Unresponsive.
    U,
}

impl std::str::FromStr for Consciousness {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "A" | "a" => Consciousness::A,
            "C" | "c" => Consciousness::C,
            "V" | "v" => Consciousness::V,
            "P" | "p" => Consciousness::P,
            "U" | "u" => Consciousness::U,
            _ => {
                return Err(Error::InvalidField {
                    field: "consciousness",
                    reason: format!("{s:?} is not one of A, C, V, P, U"),
                });
            }
        })
    }
}

/// The observations to score; `None` is a parameter not measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// Respiration rate, /min.
    pub respiration_rate: Option<f64>,
    /// SpO2, %.
    pub spo2: Option<f64>,
    /// Which SpO2 chart.
    pub scale: SpO2Scale,
    /// On supplemental oxygen (else air).
    pub oxygen: bool,
    /// Systolic blood pressure, mmHg.
    pub systolic_bp: Option<f64>,
    /// Pulse, /min.
    pub pulse: Option<f64>,
    /// ACVPU.
    pub consciousness: Option<Consciousness>,
    /// Temperature, °C.
    pub temperature: Option<f64>,
}

/// The clinical risk band of a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Risk {
    /// 0–4, no single 3.
    #[serde(rename = "low")]
    Low,
    /// A single parameter scoring 3, aggregate under 5.
    #[serde(rename = "low-medium")]
    LowMedium,
    /// 5–6.
    #[serde(rename = "medium")]
    Medium,
    /// 7 or more.
    #[serde(rename = "high")]
    High,
}

impl Risk {
    /// The name printed and stored (`low`, `low-medium`, `medium`, `high`).
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::LowMedium => "low-medium",
            Risk::Medium => "medium",
            Risk::High => "high",
        }
    }
}

/// Parameter names, in chart order: the keys of [`Score::parameters`] and
/// the entries of [`Score::missing`].
pub const PARAMETERS: [&str; 7] = [
    "respiration_rate",
    "spo2",
    "air_or_oxygen",
    "systolic_bp",
    "pulse",
    "consciousness",
    "temperature",
];

/// A NEWS2 score.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Score {
    /// The aggregate of the parameters present, 0–20.
    pub total: u8,
    /// Each scored parameter's score, by key.
    pub parameters: std::collections::BTreeMap<&'static str, u8>,
    /// The parameters not measured, in chart order.
    pub missing: Vec<&'static str>,
    /// The risk band.
    pub risk: Risk,
}

impl Score {
    /// Some parameter scored 3.
    pub fn any_three(&self) -> bool {
        self.parameters.values().any(|&s| s == 3)
    }
}

/// The values a body can show, per parameter: outside them a value is an
/// error (a sensor fault or a sentinel), never a score.
pub fn plausible(name: &str, x: f64) -> bool {
    let (lo, hi) = match name {
        "respiration_rate" | "spo2" => (0.0, 100.0),
        "systolic_bp" | "pulse" => (0.0, 400.0),
        "temperature" => (20.0, 46.0),
        _ => return false,
    };
    x.is_finite() && (lo..=hi).contains(&x)
}

/// Score `x` against `band`, a function of the value rounded to whole units
/// of the band's precision (`scale` units per whole: 1, or 10 for tenths).
/// A value halfway between two rounded values takes the higher score.
fn banded(name: &'static str, x: f64, scale: f64, band: impl Fn(i64) -> u8) -> Result<u8> {
    if !plausible(name, x) {
        return Err(Error::InvalidField {
            field: name,
            reason: format!("{x} is not a plausible value"),
        });
    }
    let s = x * scale;
    let lo = s.floor();
    let frac = s - lo;
    // Halfway, allowing for the binary representation of decimals.
    if (frac - 0.5).abs() < 1e-9 {
        let lo = lo as i64;
        Ok(band(lo).max(band(lo + 1)))
    } else {
        Ok(band(s.round() as i64))
    }
}

fn respiration(r: i64) -> u8 {
    match r {
        ..=8 => 3,
        9..=11 => 1,
        12..=20 => 0,
        21..=24 => 2,
        _ => 3,
    }
}

fn spo2_scale1(s: i64) -> u8 {
    match s {
        ..=91 => 3,
        92..=93 => 2,
        94..=95 => 1,
        _ => 0,
    }
}

fn spo2_scale2(s: i64, oxygen: bool) -> u8 {
    match s {
        ..=83 => 3,
        84..=85 => 2,
        86..=87 => 1,
        88..=92 => 0,
        _ if !oxygen => 0,
        93..=94 => 1,
        95..=96 => 2,
        _ => 3,
    }
}

fn systolic(s: i64) -> u8 {
    match s {
        ..=90 => 3,
        91..=100 => 2,
        101..=110 => 1,
        111..=219 => 0,
        _ => 3,
    }
}

fn pulse(p: i64) -> u8 {
    match p {
        ..=40 => 3,
        41..=50 => 1,
        51..=90 => 0,
        91..=110 => 1,
        111..=130 => 2,
        _ => 3,
    }
}

/// Temperature in tenths of a degree.
fn temperature(t: i64) -> u8 {
    match t {
        ..=350 => 3,
        351..=360 => 1,
        361..=380 => 0,
        381..=390 => 1,
        _ => 2,
    }
}

/// Score the observations present.
pub fn score(o: &Observations) -> Result<Score> {
    let mut parameters = std::collections::BTreeMap::new();
    let mut missing = Vec::new();
    let mut put = |name: &'static str, s: Option<u8>| match s {
        Some(s) => {
            parameters.insert(name, s);
        }
        None => missing.push(name),
    };
    put(
        "respiration_rate",
        o.respiration_rate
            .map(|x| banded("respiration_rate", x, 1.0, respiration))
            .transpose()?,
    );
    put(
        "spo2",
        o.spo2
            .map(|x| match o.scale {
                SpO2Scale::Scale1 => banded("spo2", x, 1.0, spo2_scale1),
                SpO2Scale::Scale2 => banded("spo2", x, 1.0, |s| spo2_scale2(s, o.oxygen)),
            })
            .transpose()?,
    );
    put("air_or_oxygen", Some(if o.oxygen { 2 } else { 0 }));
    put(
        "systolic_bp",
        o.systolic_bp
            .map(|x| banded("systolic_bp", x, 1.0, systolic))
            .transpose()?,
    );
    put(
        "pulse",
        o.pulse
            .map(|x| banded("pulse", x, 1.0, pulse))
            .transpose()?,
    );
    put(
        "consciousness",
        o.consciousness
            .map(|c| if c == Consciousness::A { 0 } else { 3 }),
    );
    put(
        "temperature",
        o.temperature
            .map(|x| banded("temperature", x, 10.0, temperature))
            .transpose()?,
    );
    let total: u8 = parameters.values().sum();
    let any_three = parameters.values().any(|&s| s == 3);
    let risk = match total {
        7.. => Risk::High,
        5..=6 => Risk::Medium,
        _ if any_three => Risk::LowMedium,
        _ => Risk::Low,
    };
    Ok(Score {
        total,
        parameters,
        missing,
        risk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(f: impl FnOnce(&mut Observations)) -> Observations {
        let mut o = Observations::default();
        f(&mut o);
        o
    }

    fn param(o: &Observations, name: &str) -> u8 {
        score(o).unwrap().parameters[name]
    }

    /// Every band edge of every parameter: (value, expected score).
    #[test]
    fn respiration_band_edges() {
        for (v, s) in [
            (0.0, 3),
            (8.0, 3),
            (9.0, 1),
            (11.0, 1),
            (12.0, 0),
            (20.0, 0),
            (21.0, 2),
            (24.0, 2),
            (25.0, 3),
            (60.0, 3),
            // Rounding to whole breaths, and halfway values take the higher score.
            (8.4, 3),
            (8.6, 1),
            (8.5, 3),
            (11.5, 1),
            (11.4, 1),
            (20.4, 0),
            (20.5, 2),
            (24.5, 3),
        ] {
            assert_eq!(
                param(&one(|o| o.respiration_rate = Some(v)), "respiration_rate"),
                s,
                "RR {v}"
            );
        }
    }

    #[test]
    fn spo2_scale1_band_edges() {
        for (v, s) in [
            (50.0, 3),
            (91.0, 3),
            (92.0, 2),
            (93.0, 2),
            (94.0, 1),
            (95.0, 1),
            (96.0, 0),
            (100.0, 0),
            (91.4, 3),
            (91.5, 3),
            (91.6, 2),
            (95.5, 1),
            (95.6, 0),
        ] {
            for oxygen in [false, true] {
                let o = one(|o| {
                    o.spo2 = Some(v);
                    o.oxygen = oxygen;
                });
                assert_eq!(param(&o, "spo2"), s, "SpO2 {v} scale 1 oxygen {oxygen}");
            }
        }
    }

    #[test]
    fn spo2_scale2_band_edges() {
        // (value, on air, on oxygen)
        for (v, air, o2) in [
            (70.0, 3, 3),
            (83.0, 3, 3),
            (84.0, 2, 2),
            (85.0, 2, 2),
            (86.0, 1, 1),
            (87.0, 1, 1),
            (88.0, 0, 0),
            (92.0, 0, 0),
            (93.0, 0, 1),
            (94.0, 0, 1),
            (95.0, 0, 2),
            (96.0, 0, 2),
            (97.0, 0, 3),
            (100.0, 0, 3),
            (83.5, 3, 3),
            (87.5, 1, 1),
            (92.5, 0, 1),
            (96.5, 0, 3),
            (92.4, 0, 0),
        ] {
            for (oxygen, s) in [(false, air), (true, o2)] {
                let o = one(|o| {
                    o.spo2 = Some(v);
                    o.scale = SpO2Scale::Scale2;
                    o.oxygen = oxygen;
                });
                assert_eq!(param(&o, "spo2"), s, "SpO2 {v} scale 2 oxygen {oxygen}");
            }
        }
    }

    #[test]
    fn air_or_oxygen() {
        assert_eq!(param(&one(|_| {}), "air_or_oxygen"), 0);
        assert_eq!(param(&one(|o| o.oxygen = true), "air_or_oxygen"), 2);
    }

    #[test]
    fn systolic_band_edges() {
        for (v, s) in [
            (40.0, 3),
            (90.0, 3),
            (91.0, 2),
            (100.0, 2),
            (101.0, 1),
            (110.0, 1),
            (111.0, 0),
            (219.0, 0),
            (220.0, 3),
            (300.0, 3),
            (90.5, 3),
            (110.5, 1),
            (110.6, 0),
            (219.5, 3),
            (219.4, 0),
        ] {
            assert_eq!(
                param(&one(|o| o.systolic_bp = Some(v)), "systolic_bp"),
                s,
                "SBP {v}"
            );
        }
    }

    #[test]
    fn pulse_band_edges() {
        for (v, s) in [
            (20.0, 3),
            (40.0, 3),
            (41.0, 1),
            (50.0, 1),
            (51.0, 0),
            (90.0, 0),
            (91.0, 1),
            (110.0, 1),
            (111.0, 2),
            (130.0, 2),
            (131.0, 3),
            (220.0, 3),
            (40.5, 3),
            (50.5, 1),
            (90.5, 1),
            (90.4, 0),
            (130.5, 3),
        ] {
            assert_eq!(param(&one(|o| o.pulse = Some(v)), "pulse"), s, "pulse {v}");
        }
    }

    #[test]
    fn consciousness_levels() {
        for (c, s) in [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3)] {
            let o = one(|o| o.consciousness = Some(c.parse().unwrap()));
            assert_eq!(param(&o, "consciousness"), s, "{c}");
        }
        assert!("X".parse::<Consciousness>().is_err());
    }

    #[test]
    fn temperature_band_edges() {
        for (v, s) in [
            (30.0, 3),
            (35.0, 3),
            (35.1, 1),
            (36.0, 1),
            (36.1, 0),
            (38.0, 0),
            (38.1, 1),
            (39.0, 1),
            (39.1, 2),
            (42.0, 2),
            // Rounded to tenths; between bands, the higher score.
            (35.04, 3),
            (35.05, 3),
            (35.06, 1),
            (36.05, 1),
            (36.06, 0),
            (38.05, 1),
            (38.04, 0),
            (39.05, 2),
            (39.04, 1),
        ] {
            assert_eq!(
                param(&one(|o| o.temperature = Some(v)), "temperature"),
                s,
                "temperature {v}"
            );
        }
    }

    #[test]
    fn totals_risk_and_missing() {
        // Only what is present is scored; the rest is named missing.
        let s = score(&one(|o| o.pulse = Some(120.0))).unwrap();
        assert_eq!(s.total, 2);
        assert_eq!(
            s.missing,
            vec![
                "respiration_rate",
                "spo2",
                "systolic_bp",
                "consciousness",
                "temperature"
            ]
        );
        assert_eq!(s.risk, Risk::Low);
        // A single 3 with an aggregate under 5.
        let s = score(&one(|o| o.spo2 = Some(90.0))).unwrap();
        assert_eq!((s.total, s.risk), (3, Risk::LowMedium));
        assert!(s.any_three());
        // 5–6 medium, 7+ high; the maximum is 20.
        let s = score(&one(|o| {
            o.pulse = Some(115.0);
            o.respiration_rate = Some(22.0);
            o.temperature = Some(38.5);
        }))
        .unwrap();
        assert_eq!((s.total, s.risk), (5, Risk::Medium));
        let worst = Observations {
            respiration_rate: Some(30.0),
            spo2: Some(80.0),
            scale: SpO2Scale::Scale1,
            oxygen: true,
            systolic_bp: Some(80.0),
            pulse: Some(150.0),
            consciousness: Some(Consciousness::U),
            temperature: Some(34.0),
        };
        let s = score(&worst).unwrap();
        assert_eq!((s.total, s.risk), (20, Risk::High));
        assert!(s.missing.is_empty());
        assert_eq!(s.parameters.len(), PARAMETERS.len());
        // Nonsense is an error, not a score.
        assert!(score(&one(|o| o.pulse = Some(f64::NAN))).is_err());
        assert!(score(&one(|o| o.temperature = Some(f64::INFINITY))).is_err());
        assert!(score(&one(|o| o.spo2 = Some(150.0))).is_err());
        assert!(score(&one(|o| o.respiration_rate = Some(-5.0))).is_err());
        assert!(score(&one(|o| o.pulse = Some(4_294_967_295.0))).is_err());
    }

    /// Against a naive reference: chart 1 written out as rows of
    /// (lowest, highest, score) in whole units, looked up by scanning, for
    /// every value in tenths from 0 to 300.
    #[test]
    fn agrees_with_the_chart_over_every_tenth() {
        const MAX: i64 = i64::MAX;
        const MIN: i64 = i64::MIN;
        let rr = [
            (MIN, 8, 3),
            (9, 11, 1),
            (12, 20, 0),
            (21, 24, 2),
            (25, MAX, 3),
        ];
        let spo2 = [(MIN, 91, 3), (92, 93, 2), (94, 95, 1), (96, MAX, 0)];
        let sbp = [
            (MIN, 90, 3),
            (91, 100, 2),
            (101, 110, 1),
            (111, 219, 0),
            (220, MAX, 3),
        ];
        let hr = [
            (MIN, 40, 3),
            (41, 50, 1),
            (51, 90, 0),
            (91, 110, 1),
            (111, 130, 2),
            (131, MAX, 3),
        ];
        let temp = [
            (MIN, 350, 3),
            (351, 360, 1),
            (361, 380, 0),
            (381, 390, 1),
            (391, MAX, 2),
        ];
        let look = |rows: &[(i64, i64, u8)], v: i64| {
            rows.iter()
                .find(|(lo, hi, _)| *lo <= v && v <= *hi)
                .map(|r| r.2)
                .unwrap()
        };
        // Whole-unit parameters: tenths .0–.4 round down, .6–.9 up, .5 takes
        // the worse neighbour.
        let whole = |rows: &[(i64, i64, u8)], tenths: i64| {
            let lo = tenths.div_euclid(10);
            match tenths.rem_euclid(10) {
                0..=4 => look(rows, lo),
                5 => look(rows, lo).max(look(rows, lo + 1)),
                _ => look(rows, lo + 1),
            }
        };
        for tenths in 0..=3000i64 {
            let x = tenths as f64 / 10.0;
            // Each parameter over its plausible range (elsewhere an error).
            let v = |name: &str| plausible(name, x).then_some(x);
            let o = Observations {
                respiration_rate: v("respiration_rate"),
                spo2: v("spo2"),
                systolic_bp: v("systolic_bp"),
                pulse: v("pulse"),
                temperature: v("temperature"),
                ..Default::default()
            };
            let s = score(&o).unwrap();
            let got = |name: &str| s.parameters.get(name).copied();
            let want = |name: &str, f: u8| plausible(name, x).then_some(f);
            assert_eq!(
                got("respiration_rate"),
                want("respiration_rate", whole(&rr, tenths)),
                "{x}"
            );
            assert_eq!(got("spo2"), want("spo2", whole(&spo2, tenths)), "{x}");
            assert_eq!(
                got("systolic_bp"),
                want("systolic_bp", whole(&sbp, tenths)),
                "{x}"
            );
            assert_eq!(got("pulse"), want("pulse", whole(&hr, tenths)), "{x}");
            assert_eq!(
                got("temperature"),
                want("temperature", look(&temp, tenths)),
                "{x}"
            );
            let sum: u8 = s.parameters.values().sum();
            assert_eq!(s.total, sum);
        }
    }
}

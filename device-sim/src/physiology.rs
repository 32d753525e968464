//! Virtual patients whose vitals stay coherent with each other.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vitaltrail_core::Measurement;

/// A clinical course for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Stable vitals around the baseline.
    Steady,
    /// Sepsis-like: HR, respiration and temperature rise; BP and SpO2 fall.
    Deterioration,
    /// SpO2 falls fast; HR and respiration rise in response.
    AcuteHypoxia,
    /// Heart rate climbs to ~150/min.
    Tachyarrhythmia,
    /// Heart rate falls to ~38/min.
    Bradyarrhythmia,
    /// The sensor loses contact: bursts of missing readings.
    SensorDropout,
    /// The device stops sending a third of the way through.
    Silent,
    /// The device clock runs 10 minutes fast.
    ClockSkew,
}

impl Scenario {
    /// Every scenario, for mixes.
    pub const ALL: [Scenario; 8] = [
        Scenario::Steady,
        Scenario::Deterioration,
        Scenario::AcuteHypoxia,
        Scenario::Tachyarrhythmia,
        Scenario::Bradyarrhythmia,
        Scenario::SensorDropout,
        Scenario::Silent,
        Scenario::ClockSkew,
    ];

    /// Parse a CLI name (`steady`, `deterioration`, `hypoxia`, `tachy`,
    /// `brady`, `dropout`, `silent`, `clock-skew`).
    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "steady" => Scenario::Steady,
            "deterioration" | "sepsis" => Scenario::Deterioration,
            "hypoxia" => Scenario::AcuteHypoxia,
            "tachy" | "tachyarrhythmia" => Scenario::Tachyarrhythmia,
            "brady" | "bradyarrhythmia" => Scenario::Bradyarrhythmia,
            "dropout" => Scenario::SensorDropout,
            "silent" => Scenario::Silent,
            "clock-skew" => Scenario::ClockSkew,
            _ => return None,
        })
    }

    /// Clock offset this scenario applies to device time, ms.
    pub fn clock_offset_ms(self) -> i64 {
        if self == Scenario::ClockSkew {
            10 * 60 * 1000
        } else {
            0
        }
    }
}

/// One virtual patient.
#[derive(Debug, Clone)]
pub struct Patient {
    scenario: Scenario,
    base: [f64; 7],
    noise: [f64; 7],
    rng: StdRng,
    glucose: bool,
}

// Index of each vital in the arrays.
const HR: usize = 0;
const RR: usize = 1;
const SPO2: usize = 2;
const TEMP: usize = 3;
const SBP: usize = 4;
const DBP: usize = 5;
const GLU: usize = 6;

impl Patient {
    /// A patient with a random but plausible baseline.
    pub fn new(seed: u64, scenario: Scenario, glucose: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let base = [
            rng.gen_range(60.0..85.0),
            rng.gen_range(12.0..18.0),
            rng.gen_range(96.0..99.0),
            rng.gen_range(36.4..37.0),
            rng.gen_range(110.0..135.0),
            rng.gen_range(65.0..85.0),
            rng.gen_range(85.0..120.0),
        ];
        Patient {
            scenario,
            base,
            noise: [0.0; 7],
            rng,
            glucose,
        }
    }

    /// The scenario.
    pub fn scenario(&self) -> Scenario {
        self.scenario
    }

    /// Whether a reading is produced at `progress` (0..1 of the run).
    pub fn sends_at(&mut self, progress: f64) -> bool {
        match self.scenario {
            Scenario::Silent => progress < 0.33,
            // Bursty gaps: lose contact in a few windows.
            Scenario::SensorDropout => {
                !(((progress * 10.0) as u32) % 3 == 1 && self.rng.gen_bool(0.9))
            }
            _ => true,
        }
    }

    /// The vitals at `progress` (0 at the start of the run, 1 at the end).
    pub fn vitals(&mut self, progress: f64) -> Vec<Measurement> {
        let p = progress.clamp(0.0, 1.0);
        // AR(1) noise: x' = 0.9 x + e.
        let scale = [2.0, 0.8, 0.5, 0.05, 3.0, 2.0, 4.0];
        for (n, s) in self.noise.iter_mut().zip(scale) {
            *n = 0.9 * *n + self.rng.gen_range(-s..s);
        }
        let mut v = self.base;
        match self.scenario {
            Scenario::Deterioration => {
                v[HR] += 45.0 * p;
                v[RR] += 12.0 * p;
                v[TEMP] += 2.4 * p;
                v[SBP] -= 40.0 * p;
                v[DBP] -= 22.0 * p;
                v[SPO2] -= 6.0 * p;
            }
            Scenario::AcuteHypoxia => {
                let q = (p * 3.0).min(1.0);
                v[SPO2] -= 14.0 * q;
                v[HR] += 25.0 * q;
                v[RR] += 10.0 * q;
            }
            Scenario::Tachyarrhythmia => v[HR] += (150.0 - v[HR]) * (p * 2.0).min(1.0),
            Scenario::Bradyarrhythmia => v[HR] -= (v[HR] - 38.0) * (p * 2.0).min(1.0),
            _ => {}
        }
        for (x, n) in v.iter_mut().zip(self.noise) {
            *x += n;
        }
        v[SPO2] = v[SPO2].min(100.0);
        let mut out = vec![
            m("8867-4", v[HR].round(), "/min"),
            m("2708-6", v[SPO2].round(), "%"),
            m("9279-1", v[RR].round().max(4.0), "/min"),
            m("8310-5", (v[TEMP] * 10.0).round() / 10.0, "Cel"),
            m("8480-6", v[SBP].round(), "mm[Hg]"),
            m(
                "8462-4",
                v[DBP].round().min(v[SBP].round() - 10.0),
                "mm[Hg]",
            ),
        ];
        if self.glucose {
            out.push(m("2339-0", v[GLU].round(), "mg/dL"));
        }
        out
    }
}

fn m(code: &str, value: f64, unit: &str) -> Measurement {
    Measurement {
        code: code.into(),
        value,
        unit: unit.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(p: &mut Patient, progress: f64, code: &str) -> f64 {
        p.vitals(progress)
            .into_iter()
            .find(|m| m.code == code)
            .unwrap()
            .value
    }

    #[test]
    fn deterioration_moves_vitals_together() {
        let mut p = Patient::new(1, Scenario::Deterioration, false);
        let (hr0, rr0, t0, sbp0, spo0) = (
            at(&mut p, 0.0, "8867-4"),
            at(&mut p, 0.0, "9279-1"),
            at(&mut p, 0.0, "8310-5"),
            at(&mut p, 0.0, "8480-6"),
            at(&mut p, 0.0, "2708-6"),
        );
        let (hr1, rr1, t1, sbp1, spo1) = (
            at(&mut p, 1.0, "8867-4"),
            at(&mut p, 1.0, "9279-1"),
            at(&mut p, 1.0, "8310-5"),
            at(&mut p, 1.0, "8480-6"),
            at(&mut p, 1.0, "2708-6"),
        );
        assert!(
            hr1 > hr0 + 25.0 && rr1 > rr0 + 6.0 && t1 > t0 + 1.5,
            "{hr0}->{hr1} {rr0}->{rr1} {t0}->{t1}"
        );
        assert!(
            sbp1 < sbp0 - 20.0 && spo1 < spo0 - 2.0,
            "{sbp0}->{sbp1} {spo0}->{spo1}"
        );
    }

    #[test]
    fn vitals_are_valid_measurements_in_every_scenario() {
        for s in Scenario::ALL {
            let mut p = Patient::new(7, s, true);
            for i in 0..=100 {
                for m in p.vitals(i as f64 / 100.0) {
                    vitaltrail_core::envelope::validate_measurement(&m).unwrap();
                    assert!(m.value > 0.0 && m.value < 260.0, "{s:?} {m:?}");
                }
            }
        }
        assert_eq!(Scenario::parse("clock-skew"), Some(Scenario::ClockSkew));
        assert_eq!(Scenario::parse("nope"), None);
    }

    #[test]
    fn hypoxia_and_rhythm_scenarios_reach_their_targets() {
        let mut p = Patient::new(3, Scenario::AcuteHypoxia, false);
        assert!(at(&mut p, 1.0, "2708-6") <= 87.0);
        let mut p = Patient::new(3, Scenario::Tachyarrhythmia, false);
        assert!(at(&mut p, 1.0, "8867-4") >= 140.0);
        let mut p = Patient::new(3, Scenario::Bradyarrhythmia, false);
        assert!(at(&mut p, 1.0, "8867-4") <= 48.0);
    }
}
